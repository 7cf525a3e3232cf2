//! The hypervisor: libvirt domains of one cloud.
//!
//! [`Hypervisor`] is the narrow interface the agent converges with; [`Libvirt`] implements it
//! over the `virt` crate. Every operation is idempotent where that makes sense (stopping a
//! stopped domain, undefining an absent one) and refuses to touch a domain whose metadata names
//! another cloud. A broken connection (libvirtd restarted) is reopened transparently and the
//! call retried once.

use std::sync::{Arc, Mutex};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

use crate::domain_xml::{
    parse_vm_metadata, render_domain_xml, validate_spec, DomainSpec, METADATA_NS,
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
}

/// Domains of one cloud on one host. Synchronous: call from a blocking thread.
pub trait Hypervisor: Send + Sync {
    /// Domains whose metadata names this cloud (running or not).
    fn list(&self) -> Result<Vec<DomainInfo>, HostError>;
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
}

/// An open libvirt connection, closed when the last user drops it (`virt::Connect` has no Drop).
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// [`Hypervisor`] over libvirt.
pub struct Libvirt {
    uri: String,
    cloud_id: String,
    conn: Mutex<Option<Arc<Conn>>>,
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
            conn: Mutex::new(None),
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

    /// The live connection, opening one if there is none or the old one died.
    fn current(&self) -> Result<Arc<Conn>, HostError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            if c.0.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        let fresh = self.open()?;
        *slot = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forget `dead` (if it is still the current connection) so the next call reconnects.
    fn forget(&self, dead: &Arc<Conn>) {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, dead)) {
            *slot = None;
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
            let mut out = Vec::new();
            for dom in doms {
                // Domains can vanish between the listing and these calls: skip them.
                let Ok(Some((cloud, vm_id))) = owner_of(&dom) else {
                    continue;
                };
                if cloud != self.cloud_id {
                    continue;
                }
                let (Ok(name), Ok((state, _))) = (dom.get_name(), dom.get_state()) else {
                    continue;
                };
                out.push(DomainInfo {
                    name,
                    vm_id,
                    state: DomainState::from_libvirt(state),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
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
}
