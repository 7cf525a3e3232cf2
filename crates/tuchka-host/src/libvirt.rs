//! The hypervisor: libvirt domains of one cloud.
//!
//! [`Hypervisor`] is the narrow interface the agent converges with; [`Libvirt`] implements it
//! over the `virt` crate. Every operation is idempotent where that makes sense (stopping a
//! stopped domain, undefining an absent one) and refuses to touch a domain whose metadata names
//! another cloud. A broken connection (libvirtd restarted) is reopened transparently and the
//! call retried once.

use std::path::Path;
use std::sync::{Arc, Mutex};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

use crate::capture::{CaptureOutcome, CaptureProgress, CaptureRequest};
use crate::domain_xml::{
    parse_vm_metadata, render_domain_xml, render_volume_xml, validate_spec, DomainSpec, VolumeSpec,
    METADATA_NS,
};
use crate::migrate::{
    parse_completed_stats, CompletedStats, LiveMigration, MigrationOutcome, MigrationProgress,
};
use crate::HostError;

/// Observed power state of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or blocked on I/O).
    Running,
    /// Paused by the host.
    Paused,
    /// Defined but not running.
    ShutOff,
    /// Shutting down after an ACPI request.
    ShuttingDown,
    /// Crashed.
    Crashed,
    /// Anything else libvirt reports (e.g. `pmsuspended`).
    Other(String),
}

impl DomainState {
    /// Map libvirt's `virDomainState`.
    pub fn from_libvirt(state: sys::virDomainState) -> Self {
        match state {
            sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => DomainState::Running,
            sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
            sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Other("pmsuspended".to_string()),
            other => DomainState::Other(format!("state {other}")),
        }
    }

    /// Whether a qemu process exists for the domain.
    pub fn is_active(&self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainState::Running => f.write_str("running"),
            DomainState::Paused => f.write_str("paused"),
            DomainState::ShutOff => f.write_str("shut off"),
            DomainState::ShuttingDown => f.write_str("shutting down"),
            DomainState::Crashed => f.write_str("crashed"),
            DomainState::Other(s) => f.write_str(s),
        }
    }
}

/// One domain of this cloud as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain name.
    pub name: String,
    /// VM id from the metadata.
    pub vm_id: String,
    /// Power state.
    pub state: DomainState,
    /// CPU time the guest used so far, ns (0 when not running).
    pub cpu_time_ns: u64,
    /// Paused by qemu because a disk write failed (with `error_policy='enospace'`: the pool
    /// is full), not by a user.
    pub paused_on_io_error: bool,
    /// Shut off because the guest powered itself off (not destroyed, never started).
    pub powered_off_by_guest: bool,
    /// vCPUs it has now.
    pub vcpus: u32,
    /// Memory it has now, MiB.
    pub memory_mib: u64,
}

/// Domains of one cloud on one host. Synchronous: call from a blocking thread.
pub trait Hypervisor: Send + Sync {
    /// Domains whose metadata names this cloud (running or not).
    fn list(&self) -> Result<Vec<DomainInfo>, HostError>;
    /// Domain `name` of this cloud as [`Hypervisor::list`] would show it: a few libvirt calls
    /// for one domain, not a listing of all (None when there is none of that name or it
    /// belongs to no cloud or another one).
    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, HostError>;
    /// Persistently define the domain; redefining updates its configuration (applied at the next
    /// start). Refuses when a domain of that name belongs to another cloud.
    fn define(&self, spec: &DomainSpec) -> Result<(), HostError>;
    /// Start a defined domain; Ok if it is already running or paused.
    fn start(&self, name: &str) -> Result<(), HostError>;
    /// Ask the guest to power off (ACPI power button); Ok if it is not running. Safe to repeat.
    fn shutdown(&self, name: &str) -> Result<(), HostError>;
    /// Power off at once; Ok if already off.
    fn destroy(&self, name: &str) -> Result<(), HostError>;
    /// Pause a running domain; Ok if already paused.
    fn suspend(&self, name: &str) -> Result<(), HostError>;
    /// Unpause; Ok if already running.
    fn resume(&self, name: &str) -> Result<(), HostError>;
    /// Ask the guest to reboot (ACPI).
    fn reboot(&self, name: &str) -> Result<(), HostError>;
    /// Destroy if running, then remove the definition; Ok if absent.
    fn undefine(&self, name: &str) -> Result<(), HostError>;
    /// The domain's XML as a migration destination should get it (libvirt's migratable form
    /// of the live definition when it runs); retarget its pool paths with
    /// [`crate::migrate::retarget_domain_xml`] before migrating.
    fn migratable_xml(&self, name: &str) -> Result<String, HostError>;
    /// Live-migrate a running or paused domain as `m` says (see [`crate::migrate`]) and block
    /// until libvirt is done, calling `progress` from this thread every
    /// [`LiveMigration::poll_interval`] while the job runs. On success the domain runs (or
    /// stays paused) on the destination and is gone from here; on failure it is still here, in
    /// the state it had, and the destination has nothing of it.
    fn migrate_live(
        &self,
        m: &LiveMigration,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationOutcome, HostError>;
    /// Write disk `target` of domain `name` — named by its target (`vda`) or its source file,
    /// as libvirt names disks — into `out` as a new compressed standalone qcow2 image (no
    /// backing file) and block until it is there, calling `progress` from this thread (see
    /// [`crate::capture`]). A running or paused domain keeps running and writing: its disk is
    /// copied point-in-time into `work_dir` (an absolute directory on a file system qemu sees;
    /// created if missing) by a libvirt backup job, then converted. A stopped domain's disk,
    /// or with no domain a qcow2 disk named by its path, is converted directly. `out` (absolute)
    /// must not exist and its directory must. On failure the backup job is aborted, the copy and the
    /// partial image are deleted and `out` is not created; the error names the domain, the
    /// disk and `out`, with the cause.
    fn capture_disk(
        &self,
        name: &str,
        target: &str,
        work_dir: &Path,
        out: &Path,
        progress: &dyn Fn(CaptureProgress),
    ) -> Result<CaptureOutcome, HostError>;
    /// The data volumes the domain has now (its live definition when it runs, else the
    /// persistent one): disks other than `vda` whose file is `…/volumes/<id>.qcow2`.
    fn volumes(&self, name: &str) -> Result<Vec<VolumeSpec>, HostError>;
    /// Plug a volume in: into the running guest (hot-plug) and into the persistent definition.
    fn attach_volume(&self, name: &str, v: &VolumeSpec) -> Result<(), HostError>;
    /// Unplug a volume (live and persistent); Ok if it is not plugged in.
    fn detach_volume(&self, name: &str, v: &VolumeSpec) -> Result<(), HostError>;
    /// Grow disk `target` of a running domain to `size_mib`; the guest sees the new size.
    fn grow_disk(&self, name: &str, target: &str, size_mib: u64) -> Result<(), HostError>;
    /// Give a running domain `vcpus` vCPUs (hot-plug, up to its maximum), persistently too.
    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HostError>;
}

/// The data volumes in a domain XML (pure): disks other than `vda` whose source is a
/// `volumes/<id>.qcow2` file.
pub fn parse_volumes(xml: &str) -> Vec<VolumeSpec> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return vec![];
    };
    let mut out = vec![];
    for disk in doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk"))
    {
        let child = |tag: &str| disk.children().find(|c| c.has_tag_name(tag));
        let (Some(target), Some(file)) = (
            child("target").and_then(|t| t.attribute("dev")),
            child("source").and_then(|t| t.attribute("file")),
        ) else {
            continue;
        };
        let path = std::path::PathBuf::from(file);
        let in_volumes = path
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "volumes");
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".qcow2"));
        if let (true, Some(id), false) = (in_volumes, id, target == "vda") {
            out.push(VolumeSpec {
                id: id.to_string(),
                path: path.clone(),
                target: target.to_string(),
            });
        }
    }
    out
}

/// An open libvirt connection, closed when the last user drops it (`virt::Connect` has no Drop).
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// Connections to libvirtd, used in turn. libvirtd serves at most `max_client_requests`
/// (default 5) calls of one connection at a time, so a pass that starts ten domains at once
/// needs more than one.
const CONNECTIONS: usize = 4;

/// [`Hypervisor`] over libvirt.
pub struct Libvirt {
    uri: String,
    cloud_id: String,
    conns: [Mutex<Option<Arc<Conn>>>; CONNECTIONS],
    next: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt")
            .field("uri", &self.uri)
            .field("cloud_id", &self.cloud_id)
            .finish()
    }
}

impl Libvirt {
    /// Connect to `uri` (e.g. `qemu:///system`) for cloud `cloud_id`. Fails at once when libvirt
    /// is unreachable; later connection breaks are healed by reconnecting.
    pub fn connect(uri: &str, cloud_id: &str) -> Result<Self, HostError> {
        if cloud_id.is_empty() || cloud_id.contains('\0') {
            return Err(HostError::invalid("cloud id", "must be a non-empty string"));
        }
        // libvirt's default error handler prints every error on stderr; we report them ourselves.
        virt::error::clear_error_callback();
        let lv = Libvirt {
            uri: uri.to_string(),
            cloud_id: cloud_id.to_string(),
            conns: Default::default(),
            next: Default::default(),
        };
        lv.current()?;
        Ok(lv)
    }

    /// The libvirt URI this talks to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn open(&self) -> Result<Arc<Conn>, HostError> {
        if self.uri.contains('\0') {
            return Err(HostError::invalid("libvirt uri", "contains a NUL byte"));
        }
        Connect::open(Some(&self.uri))
            .map(|c| Arc::new(Conn(c)))
            .map_err(|source| HostError::Connect {
                uri: self.uri.clone(),
                source,
            })
    }

    /// The next live connection in turn, opening one if there is none or the old one died.
    fn current(&self) -> Result<Arc<Conn>, HostError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % CONNECTIONS;
        let mut slot = self.conns[i].lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            if c.0.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        let fresh = self.open()?;
        *slot = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forget `dead` (wherever it is still in use) so the next call reconnects.
    fn forget(&self, dead: &Arc<Conn>) {
        for conn in &self.conns {
            let mut slot = conn.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, dead)) {
                *slot = None;
            }
        }
    }

    /// Run `f` on the connection; if it fails and the connection turns out dead, reconnect and
    /// run it once more.
    fn with_conn<T>(&self, f: impl Fn(&Connect) -> Result<T, HostError>) -> Result<T, HostError> {
        let conn = self.current()?;
        match f(&conn.0) {
            Ok(v) => Ok(v),
            Err(e) => {
                if conn.0.is_alive().unwrap_or(false) {
                    return Err(e);
                }
                tracing::warn!(uri = %self.uri, error = %e.chain(), "libvirt connection lost; reconnecting");
                self.forget(&conn);
                let conn = self.current()?;
                f(&conn.0)
            }
        }
    }

    /// Look up `name` and check it is ours. `Ok(None)` when no such domain exists.
    /// What [`Hypervisor::list`] shows of `dom`: None when it is not this cloud's, or vanished
    /// while it was read.
    fn info_of(&self, dom: &Domain) -> Option<DomainInfo> {
        let Ok(Some((cloud, vm_id))) = owner_of(dom) else {
            return None;
        };
        if cloud != self.cloud_id {
            return None;
        }
        let (Ok(name), Ok((state, reason))) = (dom.get_name(), dom.get_state()) else {
            return None;
        };
        let info = dom.get_info().ok();
        Some(DomainInfo {
            name,
            vm_id,
            state: DomainState::from_libvirt(state),
            cpu_time_ns: info.as_ref().map(|i| i.cpu_time).unwrap_or(0),
            paused_on_io_error: state == sys::VIR_DOMAIN_PAUSED
                && reason == sys::VIR_DOMAIN_PAUSED_IOERROR as i32,
            powered_off_by_guest: state == sys::VIR_DOMAIN_SHUTOFF
                && reason == sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN as i32,
            vcpus: info.as_ref().map(|i| i.nr_virt_cpu).unwrap_or(0),
            memory_mib: info.as_ref().map(|i| i.max_mem / 1024).unwrap_or(0),
        })
    }

    fn lookup_own(&self, conn: &Connect, name: &str) -> Result<Option<Domain>, HostError> {
        check_name(name)?;
        let dom = match Domain::lookup_by_name(conn, name) {
            Ok(d) => d,
            Err(e) if e.code() == ErrorNumber::NoDomain => return Ok(None),
            Err(source) => {
                return Err(HostError::Domain {
                    name: name.to_string(),
                    action: "look up",
                    source,
                })
            }
        };
        match owner_of(&dom) {
            Ok(Some((cloud, _))) if cloud == self.cloud_id => Ok(Some(dom)),
            Ok(Some((cloud, _))) => Err(HostError::ForeignDomain {
                name: name.to_string(),
                owner: format!("cloud {cloud}"),
                cloud: self.cloud_id.clone(),
            }),
            Ok(None) => Err(HostError::ForeignDomain {
                name: name.to_string(),
                owner: "no tuchka metadata".to_string(),
                cloud: self.cloud_id.clone(),
            }),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(source) => Err(HostError::Domain {
                name: name.to_string(),
                action: "read metadata of",
                source,
            }),
        }
    }

    /// Look up a domain that must exist.
    fn require_own(&self, conn: &Connect, name: &str) -> Result<Domain, HostError> {
        self.lookup_own(conn, name)?
            .ok_or_else(|| HostError::NoDomain {
                name: name.to_string(),
            })
    }
}

fn check_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() || name.contains('\0') {
        return Err(HostError::invalid(
            format!("domain {name:?}"),
            "name is empty or contains a NUL byte",
        ));
    }
    Ok(())
}

/// `(cloud, vm id)` from the domain's tuchka metadata; `Ok(None)` when it has none.
fn owner_of(dom: &Domain) -> Result<Option<(String, String)>, VirtError> {
    match dom.get_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(METADATA_NS),
        0,
    ) {
        Ok(xml) => Ok(parse_vm_metadata(&xml)),
        Err(e) if e.code() == ErrorNumber::NoDomainMetadata => Ok(None),
        Err(e) => Err(e),
    }
}

fn state_of(dom: &Domain, name: &str) -> Result<DomainState, HostError> {
    dom.get_state()
        .map(|(s, _)| DomainState::from_libvirt(s))
        .map_err(|source| HostError::Domain {
            name: name.to_string(),
            action: "read state of",
            source,
        })
}

/// `Ok(())` when libvirt says the operation is pointless because of the state (a race between our
/// state check and the call), else the error.
fn ok_if_invalid(
    r: Result<(), VirtError>,
    name: &str,
    action: &'static str,
) -> Result<(), HostError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.code() == ErrorNumber::OperationInvalid => Ok(()),
        Err(source) => Err(HostError::Domain {
            name: name.to_string(),
            action,
            source,
        }),
    }
}

impl Hypervisor for Libvirt {
    fn list(&self) -> Result<Vec<DomainInfo>, HostError> {
        self.with_conn(|conn| {
            let doms = conn
                .list_all_domains(0)
                .map_err(|source| HostError::Libvirt {
                    action: "list domains",
                    source,
                })?;
            let mut out: Vec<DomainInfo> =
                doms.iter().filter_map(|dom| self.info_of(dom)).collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, HostError> {
        check_name(name)?;
        self.with_conn(|conn| match Domain::lookup_by_name(conn, name) {
            Ok(dom) => Ok(self.info_of(&dom)),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(source) => Err(HostError::Domain {
                name: name.to_string(),
                action: "look up",
                source,
            }),
        })
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), HostError> {
        validate_spec(spec).map_err(|m| HostError::invalid(format!("domain {}", spec.name), m))?;
        if spec.cloud_id != self.cloud_id {
            return Err(HostError::invalid(
                format!("domain {}", spec.name),
                format!(
                    "spec names cloud {} but this hypervisor serves cloud {}",
                    spec.cloud_id, self.cloud_id
                ),
            ));
        }
        let xml = render_domain_xml(spec);
        self.with_conn(|conn| {
            self.lookup_own(conn, &spec.name)?;
            Domain::define_xml(conn, &xml)
                .map(drop)
                .map_err(|source| HostError::Domain {
                    name: spec.name.clone(),
                    action: "define",
                    source,
                })
        })
    }

    fn start(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            if state_of(&dom, name)?.is_active() {
                return Ok(());
            }
            dom.create().map(drop).map_err(|source| HostError::Domain {
                name: name.to_string(),
                action: "start",
                source,
            })
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            if !state_of(&dom, name)?.is_active() {
                return Ok(());
            }
            ok_if_invalid(
                dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    .map(drop),
                name,
                "shut down",
            )
        })
    }

    fn destroy(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            if !state_of(&dom, name)?.is_active() {
                return Ok(());
            }
            ok_if_invalid(dom.destroy(), name, "destroy")
        })
    }

    fn suspend(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            match state_of(&dom, name)? {
                DomainState::Paused => Ok(()),
                DomainState::Running | DomainState::ShuttingDown => {
                    dom.suspend().map(drop).map_err(|source| HostError::Domain {
                        name: name.to_string(),
                        action: "suspend",
                        source,
                    })
                }
                other => Err(HostError::BadState {
                    name: name.to_string(),
                    action: "suspend",
                    state: other.to_string(),
                }),
            }
        })
    }

    fn resume(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            match state_of(&dom, name)? {
                DomainState::Running => Ok(()),
                DomainState::Paused => dom.resume().map(drop).map_err(|source| HostError::Domain {
                    name: name.to_string(),
                    action: "resume",
                    source,
                }),
                other => Err(HostError::BadState {
                    name: name.to_string(),
                    action: "resume",
                    state: other.to_string(),
                }),
            }
        })
    }

    fn reboot(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            match state_of(&dom, name)? {
                DomainState::Running => {
                    dom.reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
                        .map_err(|source| HostError::Domain {
                            name: name.to_string(),
                            action: "reboot",
                            source,
                        })
                }
                other => Err(HostError::BadState {
                    name: name.to_string(),
                    action: "reboot",
                    state: other.to_string(),
                }),
            }
        })
    }

    fn undefine(&self, name: &str) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let Some(dom) = self.lookup_own(conn, name)? else {
                return Ok(());
            };
            if state_of(&dom, name)?.is_active() {
                ok_if_invalid(dom.destroy(), name, "destroy")?;
            }
            let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
            match dom.undefine_flags(flags) {
                Ok(()) => Ok(()),
                Err(e) if e.code() == ErrorNumber::NoDomain => Ok(()),
                Err(source) => Err(HostError::Domain {
                    name: name.to_string(),
                    action: "undefine",
                    source,
                }),
            }
        })
    }

    fn volumes(&self, name: &str) -> Result<Vec<VolumeSpec>, HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            let flags = if state_of(&dom, name)?.is_active() {
                0
            } else {
                sys::VIR_DOMAIN_XML_INACTIVE
            };
            dom.get_xml_desc(flags)
                .map(|xml| parse_volumes(&xml))
                .map_err(|source| HostError::Domain {
                    name: name.to_string(),
                    action: "read the disks of",
                    source,
                })
        })
    }

    fn attach_volume(&self, name: &str, v: &VolumeSpec) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
            if state_of(&dom, name)?.is_active() {
                flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            dom.attach_device_flags(&render_volume_xml(v), flags)
                .map(drop)
                .map_err(|source| HostError::Domain {
                    name: name.to_string(),
                    action: "plug a volume into",
                    source,
                })
        })
    }

    fn detach_volume(&self, name: &str, v: &VolumeSpec) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            let active = state_of(&dom, name)?.is_active();
            let xml = render_volume_xml(v);
            // Each definition separately: the volume may be in one and not the other (a detach
            // the guest has not finished yet).
            let plugged = |flags: u32, inactive: bool| -> Result<(), HostError> {
                let def = dom
                    .get_xml_desc(if inactive {
                        sys::VIR_DOMAIN_XML_INACTIVE
                    } else {
                        0
                    })
                    .map_err(|source| HostError::Domain {
                        name: name.to_string(),
                        action: "read the disks of",
                        source,
                    })?;
                if !parse_volumes(&def).iter().any(|x| x.target == v.target) {
                    return Ok(());
                }
                ok_if_invalid(
                    dom.detach_device_flags(&xml, flags).map(drop),
                    name,
                    "unplug a volume from",
                )
            };
            plugged(sys::VIR_DOMAIN_AFFECT_CONFIG, true)?;
            if active {
                plugged(sys::VIR_DOMAIN_AFFECT_LIVE, false)?;
            }
            Ok(())
        })
    }

    fn grow_disk(&self, name: &str, target: &str, size_mib: u64) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            dom.block_resize(target, size_mib << 20, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                .map(drop)
                .map_err(|source| HostError::Domain {
                    name: name.to_string(),
                    action: "grow a disk of",
                    source,
                })
        })
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            dom.set_vcpus_flags(
                vcpus,
                sys::VIR_DOMAIN_VCPU_LIVE | sys::VIR_DOMAIN_VCPU_CONFIG,
            )
            .map(drop)
            .map_err(|source| HostError::Domain {
                name: name.to_string(),
                action: "set the vCPUs of",
                source,
            })
        })
    }

    fn migratable_xml(&self, name: &str) -> Result<String, HostError> {
        self.with_conn(|conn| {
            let dom = self.require_own(conn, name)?;
            dom.get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
                .map_err(|source| HostError::Domain {
                    name: name.to_string(),
                    action: "read the migratable XML of",
                    source,
                })
        })
    }

    fn migrate_live(
        &self,
        m: &LiveMigration,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationOutcome, HostError> {
        m.validate()
            .map_err(|msg| HostError::invalid(format!("migration of domain {}", m.domain), msg))?;
        // Not retried on a lost connection: a migration is not idempotent.
        let conn = self.current()?;
        let dom = self.require_own(&conn.0, &m.domain)?;
        let state = state_of(&dom, &m.domain)?;
        if !state.is_active() {
            return Err(HostError::BadState {
                name: m.domain.clone(),
                action: "live-migrate (a stopped VM moves by copying its disk)",
                state: state.to_string(),
            });
        }
        // A second handle to poll the job while the first one is busy migrating.
        let watcher = self.require_own(&conn.0, &m.domain)?;
        let params = virt::domain::MigrateParameters {
            uri: Some(m.memory_uri.clone()),
            disks_uri: Some(m.disks_uri.clone()),
            dest_xml: Some(m.dest_xml.clone()),
            persist_xml: Some(m.persist_xml.clone().unwrap_or_else(|| m.dest_xml.clone())),
            migrate_disks: m.disks.clone(),
            bandwidth: m.bandwidth_mib_s,
            ..Default::default()
        };
        let flags = m.flags();
        let dest_uri = m.dest_uri.clone();
        tracing::info!(domain = %m.domain, dest = %m.dest_uri, "live migration starts");
        let started = std::time::Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let (result, last) = std::thread::scope(|scope| {
            scope.spawn(move || {
                let r = dom.migrate_to_uri3(Some(&dest_uri), params, flags);
                let _ = tx.send(r);
            });
            let mut downtime_pending = m.max_downtime;
            let mut last: Option<MigrationProgress> = None;
            loop {
                match rx.recv_timeout(m.poll_interval) {
                    Ok(r) => return (Some(r), last),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return (None, last),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let Some(p) = job_progress(&watcher) else {
                            continue;
                        };
                        // Set while the job runs: libvirt hands it to qemu's migration at once.
                        if let Some(limit) = downtime_pending {
                            let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
                            match watcher.migrate_set_max_downtime(ms, 0) {
                                Ok(_) => downtime_pending = None,
                                Err(e) => {
                                    tracing::debug!(domain = %m.domain, error = %e, "cannot set the downtime limit yet")
                                }
                            }
                        }
                        progress(&p);
                        last = Some(p);
                    }
                }
            }
        });
        let total = started.elapsed();
        match result {
            Some(Ok(())) => {
                let completed = completed_stats(&m.dest_uri, &m.domain);
                let outcome = MigrationOutcome::new(total, completed.as_ref(), last.as_ref());
                tracing::info!(domain = %m.domain, total_ms = total.as_millis(), downtime_ms = ?outcome.downtime.map(|d| d.as_millis()), bytes = outcome.bytes, "live migration done");
                Ok(outcome)
            }
            Some(Err(source)) => Err(HostError::Domain {
                name: m.domain.clone(),
                action: "live-migrate",
                source,
            }),
            None => Err(HostError::invalid(
                format!("domain {}", m.domain),
                "the migration thread ended without an answer",
            )),
        }
    }

    fn capture_disk(
        &self,
        name: &str,
        target: &str,
        work_dir: &Path,
        out: &Path,
        progress: &dyn Fn(CaptureProgress),
    ) -> Result<CaptureOutcome, HostError> {
        let req = CaptureRequest {
            name,
            disk: target,
            work_dir,
            out,
        };
        let fail = |e| capture_failed(name, target, out, e);
        req.check().map_err(fail)?;
        // Not retried on a lost connection: a backup job is not idempotent.
        let conn = self.current().map_err(fail)?;
        let dom = self.lookup_own(&conn.0, name).map_err(fail)?;
        tracing::info!(domain = name, disk = target, out = %out.display(), "capture starts");
        let outcome =
            crate::capture::capture(dom.as_ref(), &self.uri, &req, progress).map_err(fail)?;
        tracing::info!(
            domain = name,
            disk = target,
            bytes = outcome.bytes,
            copy_ms = outcome.copy_ms,
            convert_ms = outcome.convert_ms,
            paused_ms = outcome.paused_ms,
            "capture done"
        );
        Ok(outcome)
    }
}

/// Wrap a capture failure with what was being captured.
fn capture_failed(name: &str, disk: &str, out: &Path, source: HostError) -> HostError {
    HostError::Capture {
        name: name.to_string(),
        disk: disk.to_string(),
        out: out.to_path_buf(),
        source: Box::new(source),
    }
}

/// The running job's progress (`None` when there is no job). Uses `virDomainGetJobInfo`, not
/// the `virt` crate's `get_job_stats`, which aborts when libvirt answers with no statistics
/// (see [`parse_completed_stats`]).
fn job_progress(dom: &Domain) -> Option<MigrationProgress> {
    let info = dom.get_job_info().ok()?;
    if info.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 {
        return None;
    }
    Some(MigrationProgress {
        elapsed: std::time::Duration::from_millis(info.time_elapsed.unwrap_or(0)),
        data_total: info.data_total.unwrap_or(0),
        data_processed: info.data_processed.unwrap_or(0),
        data_remaining: info.data_remaining.unwrap_or(0),
        mem_processed: info.mem_processed.unwrap_or(0),
        mem_remaining: info.mem_remaining.unwrap_or(0),
        disk_processed: info.disk_processed.unwrap_or(0),
        disk_remaining: info.disk_remaining.unwrap_or(0),
    })
}

/// The completed-job statistics of `domain` at `uri` (the destination, through the channel),
/// kept for later readers; `None` (with a warning) when they cannot be read.
fn completed_stats(uri: &str, domain: &str) -> Option<CompletedStats> {
    let args = [
        "-c",
        uri,
        "domjobinfo",
        "--completed",
        "--keep-completed",
        "--rawstats",
        domain,
    ];
    match crate::cmd::run("virsh", &args, None) {
        Ok(text) => {
            let stats = parse_completed_stats(&text);
            if stats.downtime.is_none() {
                tracing::warn!(%domain, "the destination kept no completed migration statistics");
            }
            Some(stats)
        }
        Err(e) => {
            tracing::warn!(%domain, error = %e, "cannot read the completed migration statistics");
            None
        }
    }
}
