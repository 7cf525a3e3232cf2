//! Hand-written fakes of [`Hypervisor`], [`Storage`] and [`Dataplane`] for unit tests of the
//! code that drives them (the agent's reconcile loop and its migrations: see
//! [`FakeHypervisor::add_migration_peer`]).
//!
//! Each fake keeps an in-memory state that follows the same rules as the real implementation
//! (idempotent stops, `NoDomain` for unknown domains, refusal of foreign domains, validation of
//! inputs), records every call as `"<op> <arg>"`, and can be told to fail an operation:
//!
//! ```
//! use tuchka_host::fake::FakeHypervisor;
//! use tuchka_host::Hypervisor;
//! let hv = FakeHypervisor::new("0f2a6c1e-0000-4000-8000-000000000001");
//! hv.fail_on("start", "tk-0f2a6c1e-web-0");
//! assert!(hv.start("tk-0f2a6c1e-web-0").is_err());
//! assert_eq!(hv.calls(), vec!["start tk-0f2a6c1e-web-0"]);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tuchka_api::agent::NetworkDesired;

use crate::capture::{CaptureOutcome, CapturePhase, CaptureProgress, CaptureRequest};
use crate::domain_xml::{render_domain_xml, validate_spec, DomainSpec};
use crate::libvirt::{DomainInfo, DomainState, Hypervisor};
use crate::migrate::{LiveMigration, MigrationOutcome, MigrationProgress};
use crate::net::{Dataplane, NetPlan, Underlay};
use crate::storage::{is_sha256, is_vm_id, Storage};
use crate::HostError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One failure rule.
#[derive(Debug, Clone)]
struct Rule {
    op: String,
    arg: Option<String>,
    /// `None`: forever; `Some(n)`: the next n matching calls.
    remaining: Option<u32>,
}

/// Call log plus failure injection, shared by the fakes.
#[derive(Debug, Default)]
pub struct Recorder {
    calls: Mutex<Vec<String>>,
    rules: Mutex<Vec<Rule>>,
}

impl Recorder {
    /// Record `op arg` and return the injected failure, if a rule matches.
    fn call(&self, op: &str, arg: &str) -> Result<(), HostError> {
        lock(&self.calls).push(if arg.is_empty() {
            op.to_string()
        } else {
            format!("{op} {arg}")
        });
        self.injected(op, arg)
    }

    /// The injected failure for `op arg`, if a rule matches, without recording a call (for
    /// failure points inside an operation, e.g. `migrate_live.copy`).
    fn injected(&self, op: &str, arg: &str) -> Result<(), HostError> {
        let mut rules = lock(&self.rules);
        let hit = rules.iter_mut().find(|r| {
            r.op == op && r.arg.as_deref().is_none_or(|a| a == arg) && r.remaining != Some(0)
        });
        match hit {
            Some(rule) => {
                if let Some(n) = rule.remaining.as_mut() {
                    *n -= 1;
                }
                Err(HostError::Injected {
                    op: op.to_string(),
                    arg: arg.to_string(),
                })
            }
            None => Ok(()),
        }
    }

    fn add(&self, op: &str, arg: Option<&str>, remaining: Option<u32>) {
        lock(&self.rules).push(Rule {
            op: op.to_string(),
            arg: arg.map(str::to_string),
            remaining,
        });
    }
}

/// The failure-injection and call-log methods every fake has.
macro_rules! recorder_methods {
    () => {
        /// Every call so far, as `"<op> <arg>"` (e.g. `"start tk-1a2b3c4d-web-0"`).
        pub fn calls(&self) -> Vec<String> {
            lock(&self.rec.calls).clone()
        }

        /// Return and forget the calls so far.
        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut *lock(&self.rec.calls))
        }

        /// How many calls of `op` were made.
        pub fn count(&self, op: &str) -> usize {
            lock(&self.rec.calls)
                .iter()
                .filter(|c| c.split(' ').next() == Some(op))
                .count()
        }

        /// Make every call of `op` fail with [`HostError::Injected`] (until [`Self::clear_failures`]).
        pub fn fail(&self, op: &str) {
            self.rec.add(op, None, None);
        }

        /// Make every call of `op` with main argument `arg` fail.
        pub fn fail_on(&self, op: &str, arg: &str) {
            self.rec.add(op, Some(arg), None);
        }

        /// Make only the next call of `op` fail.
        pub fn fail_once(&self, op: &str) {
            self.rec.add(op, None, Some(1));
        }

        /// Remove all failure rules.
        pub fn clear_failures(&self) {
            lock(&self.rec.rules).clear();
        }
    };
}

/// A domain as the fake hypervisor holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDomain {
    /// The spec it was last defined with.
    pub spec: DomainSpec,
    /// Current state.
    pub state: DomainState,
    /// ACPI reboots carried out.
    pub reboots: u32,
    /// Starts carried out.
    pub starts: u32,
    /// vCPUs it runs with (set at start from the spec, changed by `set_vcpus`).
    pub live_vcpus: u32,
    /// Disk sizes the running guest sees, by target (after `grow_disk`).
    pub grown: BTreeMap<String, u64>,
    /// Paused by a failed write (a full pool), see [`FakeHypervisor::pause_on_io_error`].
    pub io_error: bool,
    /// The guest powered itself off, see [`FakeHypervisor::guest_power_off`].
    pub guest_off: bool,
}

impl FakeDomain {
    /// What the hypervisor shows of it under `name`.
    fn info(&self, name: &str) -> DomainInfo {
        let d = self;
        DomainInfo {
            name: name.to_string(),
            vm_id: d.spec.vm_id.clone(),
            state: d.state.clone(),
            cpu_time_ns: 0,
            paused_on_io_error: d.io_error && d.state == DomainState::Paused,
            powered_off_by_guest: d.guest_off && d.state == DomainState::ShutOff,
            vcpus: if d.state.is_active() && d.live_vcpus > 0 {
                d.live_vcpus
            } else {
                d.spec.vcpus
            },
            memory_mib: d.spec.memory_mib,
        }
    }
}

#[derive(Debug, Default)]
struct HvState {
    domains: BTreeMap<String, FakeDomain>,
    /// Domains of other clouds (name → their cloud id).
    foreign: BTreeMap<String, String>,
    ignore_acpi: bool,
    /// Migration destinations by destination URI.
    peers: BTreeMap<String, Arc<FakeHypervisor>>,
    /// The destination XML each domain that migrated here arrived with.
    received_xml: BTreeMap<String, String>,
}

/// In-memory [`Hypervisor`] of one cloud.
#[derive(Debug)]
pub struct FakeHypervisor {
    cloud_id: String,
    rec: Recorder,
    state: Mutex<HvState>,
}

impl FakeHypervisor {
    /// An empty hypervisor for cloud `cloud_id`.
    pub fn new(cloud_id: &str) -> Self {
        FakeHypervisor {
            cloud_id: cloud_id.to_string(),
            rec: Recorder::default(),
            state: Mutex::new(HvState::default()),
        }
    }

    recorder_methods!();

    /// The domain `name`, if defined.
    pub fn domain(&self, name: &str) -> Option<FakeDomain> {
        lock(&self.state).domains.get(name).cloned()
    }

    /// Change a domain's state behind the agent's back (guest powered off, crashed, …).
    pub fn set_state(&self, name: &str, state: DomainState) {
        if let Some(d) = lock(&self.state).domains.get_mut(name) {
            d.state = state;
        }
    }

    /// The guest's write hit a full pool: qemu paused it.
    pub fn pause_on_io_error(&self, name: &str) {
        if let Some(d) = lock(&self.state).domains.get_mut(name) {
            d.state = DomainState::Paused;
            d.io_error = true;
        }
    }

    /// The guest powered itself off (`poweroff` inside it).
    pub fn guest_power_off(&self, name: &str) {
        if let Some(d) = lock(&self.state).domains.get_mut(name) {
            d.state = DomainState::ShutOff;
            d.guest_off = true;
        }
    }

    /// When `true`, ACPI shutdown requests are ignored (the guest keeps running), so a caller's
    /// "wait, then destroy" path can be tested. Default `false`: shutdown powers off at once.
    pub fn set_ignore_acpi(&self, ignore: bool) {
        lock(&self.state).ignore_acpi = ignore;
    }

    /// Make `peer` the host that live migrations to `dest_uri` arrive at: a successful
    /// [`Hypervisor::migrate_live`] moves the domain there, in the state it had. Without a
    /// peer the domain just leaves this host.
    pub fn add_migration_peer(&self, dest_uri: &str, peer: Arc<FakeHypervisor>) {
        lock(&self.state).peers.insert(dest_uri.to_string(), peer);
    }

    /// The destination XML domain `name` arrived with, if it migrated here.
    pub fn received_xml(&self, name: &str) -> Option<String> {
        lock(&self.state).received_xml.get(name).cloned()
    }

    /// Pretend a domain `name` of another cloud exists on the host.
    pub fn add_foreign(&self, name: &str, other_cloud: &str) {
        lock(&self.state)
            .foreign
            .insert(name.to_string(), other_cloud.to_string());
    }

    fn check_foreign(&self, st: &HvState, name: &str) -> Result<(), HostError> {
        match st.foreign.get(name) {
            Some(owner) => Err(HostError::ForeignDomain {
                name: name.to_string(),
                owner: format!("cloud {owner}"),
                cloud: self.cloud_id.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Apply `f` to the existing domain `name`.
    fn with_domain<T>(
        &self,
        op: &str,
        name: &str,
        f: impl FnOnce(&mut FakeDomain, bool) -> Result<T, HostError>,
    ) -> Result<T, HostError> {
        self.rec.call(op, name)?;
        let mut st = lock(&self.state);
        self.check_foreign(&st, name)?;
        let ignore_acpi = st.ignore_acpi;
        let dom = st
            .domains
            .get_mut(name)
            .ok_or_else(|| HostError::NoDomain {
                name: name.to_string(),
            })?;
        f(dom, ignore_acpi)
    }
}

fn bad_state(name: &str, action: &'static str, state: &DomainState) -> HostError {
    HostError::BadState {
        name: name.to_string(),
        action,
        state: state.to_string(),
    }
}

impl Hypervisor for FakeHypervisor {
    fn list(&self) -> Result<Vec<DomainInfo>, HostError> {
        self.rec.call("list", "")?;
        let st = lock(&self.state);
        Ok(st.domains.iter().map(|(name, d)| d.info(name)).collect())
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, HostError> {
        self.rec.call("lookup", name)?;
        let st = lock(&self.state);
        Ok(st.domains.get(name).map(|d| d.info(name)))
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), HostError> {
        self.rec.call("define", &spec.name)?;
        validate_spec(spec).map_err(|m| HostError::invalid(format!("domain {}", spec.name), m))?;
        if spec.cloud_id != self.cloud_id {
            return Err(HostError::invalid(
                format!("domain {}", spec.name),
                "spec names another cloud",
            ));
        }
        let mut st = lock(&self.state);
        self.check_foreign(&st, &spec.name)?;
        st.domains
            .entry(spec.name.clone())
            .and_modify(|d| d.spec = spec.clone())
            .or_insert_with(|| FakeDomain {
                spec: spec.clone(),
                state: DomainState::ShutOff,
                reboots: 0,
                starts: 0,
                live_vcpus: 0,
                grown: BTreeMap::new(),
                io_error: false,
                guest_off: false,
            });
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("start", name, |d, _| {
            if !d.state.is_active() {
                d.state = DomainState::Running;
                d.starts += 1;
                d.live_vcpus = d.spec.vcpus;
                d.grown.clear();
                d.guest_off = false;
            }
            Ok(())
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("shutdown", name, |d, ignore_acpi| {
            if d.state.is_active() && !ignore_acpi {
                d.state = DomainState::ShutOff;
            }
            Ok(())
        })
    }

    fn destroy(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("destroy", name, |d, _| {
            d.state = DomainState::ShutOff;
            Ok(())
        })
    }

    fn suspend(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("suspend", name, |d, _| match d.state {
            DomainState::Paused => Ok(()),
            DomainState::Running | DomainState::ShuttingDown => {
                d.state = DomainState::Paused;
                Ok(())
            }
            ref other => Err(bad_state(name, "suspend", other)),
        })
    }

    fn resume(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("resume", name, |d, _| match d.state {
            DomainState::Running => Ok(()),
            DomainState::Paused => {
                d.state = DomainState::Running;
                d.io_error = false;
                Ok(())
            }
            ref other => Err(bad_state(name, "resume", other)),
        })
    }

    fn reboot(&self, name: &str) -> Result<(), HostError> {
        self.with_domain("reboot", name, |d, _| match d.state {
            DomainState::Running => {
                d.reboots += 1;
                Ok(())
            }
            ref other => Err(bad_state(name, "reboot", other)),
        })
    }

    fn undefine(&self, name: &str) -> Result<(), HostError> {
        self.rec.call("undefine", name)?;
        let mut st = lock(&self.state);
        self.check_foreign(&st, name)?;
        st.domains.remove(name);
        Ok(())
    }

    fn migratable_xml(&self, name: &str) -> Result<String, HostError> {
        self.with_domain("migratable_xml", name, |d, _| {
            Ok(render_domain_xml(&d.spec))
        })
    }

    /// Reports three progress steps (a third of the VM's memory each), then moves the domain
    /// to the peer registered for `m.dest_uri`. Failure points: `migrate_live` (before
    /// anything happens) and `migrate_live.copy` (after the progress reports, as when the
    /// channel is cut mid-copy); either way the domain stays here unchanged.
    fn migrate_live(
        &self,
        m: &LiveMigration,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationOutcome, HostError> {
        self.rec.call("migrate_live", &m.domain)?;
        m.validate()
            .map_err(|msg| HostError::invalid(format!("migration of domain {}", m.domain), msg))?;
        let memory = {
            let st = lock(&self.state);
            self.check_foreign(&st, &m.domain)?;
            let d = st
                .domains
                .get(&m.domain)
                .ok_or_else(|| HostError::NoDomain {
                    name: m.domain.clone(),
                })?;
            if !d.state.is_active() {
                return Err(bad_state(&m.domain, "live-migrate", &d.state));
            }
            d.spec.memory_mib * 1024 * 1024
        };
        // The lock is not held while the caller's callback runs.
        let mut last = MigrationProgress::default();
        for step in 1..=3u64 {
            last = MigrationProgress {
                elapsed: Duration::from_millis(100 * step),
                data_total: memory,
                data_processed: memory * step / 3,
                data_remaining: memory - memory * step / 3,
                mem_processed: memory * step / 3,
                mem_remaining: memory - memory * step / 3,
                disk_processed: 0,
                disk_remaining: 0,
            };
            progress(&last);
        }
        self.rec.injected("migrate_live.copy", &m.domain)?;
        let (dom, peer) = {
            let mut st = lock(&self.state);
            let dom = st
                .domains
                .remove(&m.domain)
                .ok_or_else(|| HostError::NoDomain {
                    name: m.domain.clone(),
                })?;
            (dom, st.peers.get(&m.dest_uri).cloned())
        };
        if let Some(peer) = peer {
            let mut pst = lock(&peer.state);
            pst.received_xml
                .insert(m.domain.clone(), m.dest_xml.clone());
            pst.domains.insert(
                m.domain.clone(),
                FakeDomain {
                    starts: 0,
                    reboots: 0,
                    ..dom
                },
            );
        }
        let completed = crate::migrate::CompletedStats {
            time_elapsed: Some(last.elapsed),
            downtime: Some(Duration::from_millis(30)),
            downtime_net: Some(Duration::from_millis(25)),
            data_processed: Some(memory),
            memory_bps: None,
            memory_iteration: Some(2),
        };
        Ok(MigrationOutcome::new(
            last.elapsed,
            Some(&completed),
            Some(&last),
        ))
    }

    fn volumes(&self, name: &str) -> Result<Vec<crate::VolumeSpec>, HostError> {
        self.with_domain("volumes", name, |d, _| Ok(d.spec.volumes.clone()))
    }

    fn attach_volume(&self, name: &str, v: &crate::VolumeSpec) -> Result<(), HostError> {
        self.rec
            .call("attach_volume", &format!("{name} {}", v.id))?;
        self.with_domain("attach_volume.domain", name, |d, _| {
            if d.spec.volumes.iter().any(|x| x.target == v.target) {
                return Err(HostError::invalid(
                    format!("domain {name}"),
                    format!("target {} is taken", v.target),
                ));
            }
            d.spec.volumes.push(v.clone());
            Ok(())
        })
    }

    fn detach_volume(&self, name: &str, v: &crate::VolumeSpec) -> Result<(), HostError> {
        self.rec
            .call("detach_volume", &format!("{name} {}", v.id))?;
        self.with_domain("detach_volume.domain", name, |d, _| {
            d.spec.volumes.retain(|x| x.target != v.target);
            Ok(())
        })
    }

    fn grow_disk(&self, name: &str, target: &str, size_mib: u64) -> Result<(), HostError> {
        self.with_domain("grow_disk", name, |d, _| {
            if !d.state.is_active() {
                return Err(bad_state(name, "grow a disk of", &d.state));
            }
            d.grown.insert(target.to_string(), size_mib);
            Ok(())
        })
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HostError> {
        self.with_domain("set_vcpus", name, |d, _| {
            if vcpus > d.spec.max_vcpus.max(d.spec.vcpus) {
                return Err(HostError::invalid(
                    format!("domain {name}"),
                    format!("{vcpus} vCPUs is more than its maximum"),
                ));
            }
            d.live_vcpus = vcpus;
            d.spec.vcpus = vcpus;
            Ok(())
        })
    }

    /// Checks the request as the real one does (the domain is defined here, `target` is `vda`
    /// or its root disk's path, `out` does not exist); a running or paused domain reports two
    /// copying steps; then it reports converting at 0 and at the end and writes an empty qcow2
    /// ([`crate::qcow2::empty_image`]) to `out`, of the root disk's virtual size when that file
    /// is a qcow2, else of [`FAKE_CAPTURE_SIZE`]. It touches nothing else (`work_dir` is
    /// unused). Failure points: `capture_disk` (before anything) and `capture_disk.convert`
    /// (after the copy); `out` is not created then. Errors are wrapped in
    /// [`HostError::Capture`] like the real ones.
    fn capture_disk(
        &self,
        name: &str,
        target: &str,
        work_dir: &Path,
        out: &Path,
        progress: &dyn Fn(CaptureProgress),
    ) -> Result<CaptureOutcome, HostError> {
        let fail = |source| HostError::Capture {
            name: name.to_string(),
            disk: target.to_string(),
            out: out.to_path_buf(),
            source: Box::new(source),
        };
        self.rec.call("capture_disk", name).map_err(fail)?;
        CaptureRequest {
            name,
            disk: target,
            work_dir,
            out,
        }
        .check()
        .map_err(fail)?;
        let (root, active) = {
            let st = lock(&self.state);
            self.check_foreign(&st, name).map_err(fail)?;
            let d = st.domains.get(name).ok_or_else(|| {
                fail(HostError::NoDomain {
                    name: name.to_string(),
                })
            })?;
            (d.spec.root_disk.clone(), d.state.is_active())
        };
        if target != crate::migrate::ROOT_DISK_TARGET && Path::new(target) != root {
            return Err(fail(HostError::invalid(
                format!("domain {name}"),
                format!("has no disk {target} (its disks: vda)"),
            )));
        }
        let total = match crate::qcow2::read_header(&root) {
            Ok(Some(h)) => h.virtual_size,
            _ => FAKE_CAPTURE_SIZE,
        };
        let mut outcome = CaptureOutcome::default();
        if active {
            for done in [total / 2, total] {
                progress(CaptureProgress {
                    phase: CapturePhase::Copying,
                    done,
                    total,
                });
            }
            outcome.copy_ms = 10;
        }
        progress(CaptureProgress {
            phase: CapturePhase::Converting,
            done: 0,
            total,
        });
        self.rec
            .injected("capture_disk.convert", name)
            .map_err(fail)?;
        let image = crate::qcow2::empty_image(total);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &image))
            .map_err(|e| fail(HostError::io("captured image", "write", out, e)))?;
        progress(CaptureProgress {
            phase: CapturePhase::Converting,
            done: total,
            total,
        });
        outcome.convert_ms = 10;
        outcome.bytes = image.len() as u64;
        Ok(outcome)
    }
}

/// The virtual size of the images [`FakeHypervisor::capture_disk`] writes when the domain's
/// root disk is no qcow2 file it can read.
pub const FAKE_CAPTURE_SIZE: u64 = 64 << 20;

/// A VM's storage as the fake holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FakeVm {
    /// Image the root disk was created from.
    pub image: Option<String>,
    /// Root disk size.
    pub disk_mib: Option<u64>,
    /// Seed inputs: `(name, user-data, ssh keys)`.
    pub seed: Option<(String, Option<String>, Vec<String>)>,
    /// How many times the seed was (re)built.
    pub seed_builds: u32,
}

#[derive(Debug)]
struct StoreState {
    /// sha256 → virtual size in MiB.
    images: BTreeMap<String, u64>,
    vms: BTreeMap<String, FakeVm>,
    capacity: (u64, u64),
    /// volume id → size MiB.
    volumes: BTreeMap<String, u64>,
}

/// [`Storage`] whose VMs live in memory. Image downloads are real files under `root` (the agent
/// writes to [`Storage::image_partial_path`]); [`Storage::commit_image`] really hashes them.
#[derive(Debug)]
pub struct FakeStorage {
    root: PathBuf,
    rec: Recorder,
    state: Mutex<StoreState>,
}

impl FakeStorage {
    /// A fake pool whose image files go to `root/images` (created).
    pub fn new(root: &Path) -> Result<Self, HostError> {
        let images = root.join("images");
        std::fs::create_dir_all(&images)
            .map_err(|e| HostError::io("fake pool", "create", &images, e))?;
        Ok(FakeStorage {
            root: root.to_path_buf(),
            rec: Recorder::default(),
            state: Mutex::new(StoreState {
                images: BTreeMap::new(),
                vms: BTreeMap::new(),
                capacity: (100_000, 90_000),
                volumes: BTreeMap::new(),
            }),
        })
    }

    recorder_methods!();

    /// Put an image into the cache without downloading it.
    pub fn add_image(&self, sha256: &str, virtual_mib: u64) {
        lock(&self.state)
            .images
            .insert(sha256.to_string(), virtual_mib);
    }

    /// Images in the cache.
    pub fn images(&self) -> BTreeSet<String> {
        lock(&self.state).images.keys().cloned().collect()
    }

    /// The storage of VM `vm_id`, if it has any.
    pub fn vm(&self, vm_id: &str) -> Option<FakeVm> {
        lock(&self.state).vms.get(vm_id).cloned()
    }

    /// The volumes: id → size MiB.
    pub fn volume_sizes(&self) -> BTreeMap<String, u64> {
        lock(&self.state).volumes.clone()
    }

    /// Set what [`Storage::capacity`] reports.
    pub fn set_capacity(&self, total_mib: u64, free_mib: u64) {
        lock(&self.state).capacity = (total_mib, free_mib);
    }

    fn check_vm_id(vm_id: &str) -> Result<(), HostError> {
        if is_vm_id(vm_id) {
            Ok(())
        } else {
            Err(HostError::invalid(
                format!("vm id {vm_id:?}"),
                "not a valid vm id",
            ))
        }
    }
}

impl Storage for FakeStorage {
    fn cached_images(&self) -> Result<Vec<String>, HostError> {
        self.rec.call("cached_images", "")?;
        Ok(lock(&self.state).images.keys().cloned().collect())
    }

    fn image_path(&self, sha256: &str) -> PathBuf {
        self.root.join("images").join(format!("{sha256}.qcow2"))
    }

    fn image_partial_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{sha256}.qcow2.partial"))
    }

    fn commit_image(&self, sha256: &str, file_sha256: &str) -> Result<PathBuf, HostError> {
        self.rec.call("commit_image", sha256)?;
        if !is_sha256(sha256) {
            return Err(HostError::invalid(
                format!("image {sha256:?}"),
                "not a sha256",
            ));
        }
        let partial = self.image_partial_path(sha256);
        let obj = format!("image {sha256}");
        let mut data = Vec::new();
        std::fs::File::open(&partial)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| HostError::io(&obj, "read", &partial, e))?;
        let actual = tuchka_core::digest::sha256_hex(&data);
        let expected = file_sha256.to_ascii_lowercase();
        if actual != expected {
            let _ = std::fs::remove_file(&partial);
            return Err(HostError::Corrupt {
                sha256: sha256.to_string(),
                expected,
                actual,
            });
        }
        let dest = self.image_path(sha256);
        std::fs::rename(&partial, &dest)
            .map_err(|e| HostError::io(&obj, "move into place", &dest, e))?;
        let virtual_mib = crate::qcow2::parse_header(&data)
            .map(|h| h.virtual_size.div_ceil(1 << 20))
            .unwrap_or(0);
        lock(&self.state)
            .images
            .insert(sha256.to_string(), virtual_mib);
        Ok(dest)
    }

    fn remove_image(&self, sha256: &str) -> Result<(), HostError> {
        self.rec.call("remove_image", sha256)?;
        let mut st = lock(&self.state);
        if let Some((vm_id, _)) = st
            .vms
            .iter()
            .find(|(_, v)| v.image.as_deref() == Some(sha256))
        {
            return Err(HostError::ImageInUse {
                sha256: sha256.to_string(),
                vm_id: vm_id.clone(),
            });
        }
        st.images.remove(sha256);
        let _ = std::fs::remove_file(self.image_path(sha256));
        let _ = std::fs::remove_file(self.image_partial_path(sha256));
        Ok(())
    }

    fn ensure_root_disk(
        &self,
        vm_id: &str,
        image_sha256: &str,
        disk_mib: u64,
    ) -> Result<PathBuf, HostError> {
        self.rec.call("ensure_root_disk", vm_id)?;
        Self::check_vm_id(vm_id)?;
        let mut st = lock(&self.state);
        let path = self.root.join("vms").join(vm_id).join("root.qcow2");
        if st.vms.get(vm_id).is_some_and(|v| v.image.is_some()) {
            return Ok(path);
        }
        let obj = format!("vm {vm_id} root disk");
        let virtual_mib = *st.images.get(image_sha256).ok_or_else(|| {
            HostError::invalid(&obj, format!("image {image_sha256} is not in the cache"))
        })?;
        if disk_mib < virtual_mib {
            return Err(HostError::invalid(
                obj,
                format!("disk of {disk_mib} MiB is smaller than the image's {virtual_mib} MiB"),
            ));
        }
        let vm = st.vms.entry(vm_id.to_string()).or_default();
        vm.image = Some(image_sha256.to_string());
        vm.disk_mib = Some(disk_mib);
        Ok(path)
    }

    fn ensure_seed(
        &self,
        vm_id: &str,
        name: &str,
        user_data: Option<&str>,
        ssh_keys: &[String],
    ) -> Result<PathBuf, HostError> {
        self.rec.call("ensure_seed", vm_id)?;
        Self::check_vm_id(vm_id)?;
        let want = (
            name.to_string(),
            user_data.map(str::to_string),
            ssh_keys.to_vec(),
        );
        let mut st = lock(&self.state);
        let vm = st.vms.entry(vm_id.to_string()).or_default();
        if vm.seed.as_ref() != Some(&want) {
            vm.seed = Some(want);
            vm.seed_builds += 1;
        }
        Ok(self.root.join("vms").join(vm_id).join("seed.iso"))
    }

    fn console_log_path(&self, vm_id: &str) -> PathBuf {
        self.root.join("vms").join(vm_id).join("console.log")
    }

    fn root_disk_path(&self, vm_id: &str) -> PathBuf {
        self.root.join("vms").join(vm_id).join("root.qcow2")
    }

    fn ensure_vm_dir(&self, vm_id: &str) -> Result<PathBuf, HostError> {
        self.rec.call("ensure_vm_dir", vm_id)?;
        Self::check_vm_id(vm_id)?;
        lock(&self.state).vms.entry(vm_id.to_string()).or_default();
        Ok(self.root.join("vms").join(vm_id))
    }

    fn vm_dirs(&self) -> Result<Vec<String>, HostError> {
        self.rec.call("vm_dirs", "")?;
        Ok(lock(&self.state).vms.keys().cloned().collect())
    }

    fn remove_vm(&self, vm_id: &str) -> Result<(), HostError> {
        self.rec.call("remove_vm", vm_id)?;
        Self::check_vm_id(vm_id)?;
        lock(&self.state).vms.remove(vm_id);
        Ok(())
    }

    fn usage(&self) -> Result<crate::storage::PoolUsage, HostError> {
        self.rec.call("usage", "")?;
        let st = lock(&self.state);
        let disks: u64 = st.vms.values().filter_map(|v| v.disk_mib).sum();
        let volumes: u64 = st.volumes.values().sum();
        Ok(crate::storage::PoolUsage {
            allocated_mib: 0,
            provisioned_mib: disks + volumes,
            image_cache_mib: st.images.values().sum(),
        })
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.qcow2"))
    }

    fn ensure_volume(&self, id: &str, size_mib: u64) -> Result<PathBuf, HostError> {
        self.rec.call("ensure_volume", id)?;
        Self::check_vm_id(id)?;
        lock(&self.state)
            .volumes
            .entry(id.to_string())
            .or_insert(size_mib);
        Ok(self.volume_path(id))
    }

    fn grow_volume(&self, id: &str, size_mib: u64) -> Result<(), HostError> {
        self.rec.call("grow_volume", id)?;
        let mut st = lock(&self.state);
        let v = st
            .volumes
            .get_mut(id)
            .ok_or_else(|| HostError::invalid(format!("volume {id}"), "not on this host"))?;
        *v = (*v).max(size_mib);
        Ok(())
    }

    fn grow_root_disk(&self, vm_id: &str, size_mib: u64) -> Result<(), HostError> {
        self.rec.call("grow_root_disk", vm_id)?;
        let mut st = lock(&self.state);
        let vm = st
            .vms
            .get_mut(vm_id)
            .ok_or_else(|| HostError::invalid(format!("vm {vm_id}"), "no root disk"))?;
        vm.disk_mib = Some(vm.disk_mib.unwrap_or(0).max(size_mib));
        Ok(())
    }

    fn root_disk_mib(&self, vm_id: &str) -> Option<u64> {
        lock(&self.state).vms.get(vm_id).and_then(|v| v.disk_mib)
    }

    fn volumes(&self) -> Result<Vec<(String, u64, u64)>, HostError> {
        self.rec.call("volumes", "")?;
        Ok(lock(&self.state)
            .volumes
            .iter()
            .map(|(id, size)| (id.clone(), *size, 0))
            .collect())
    }

    fn remove_volume(&self, id: &str) -> Result<(), HostError> {
        self.rec.call("remove_volume", id)?;
        lock(&self.state).volumes.remove(id);
        Ok(())
    }

    fn capacity(&self) -> Result<(u64, u64), HostError> {
        self.rec.call("capacity", "")?;
        Ok(lock(&self.state).capacity)
    }
}

/// In-memory [`Dataplane`]: networks, the underlay, and taps a test marks as unplugged.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    rec: Recorder,
    networks: Mutex<BTreeMap<String, NetworkDesired>>,
    underlay: Mutex<Option<Underlay>>,
    unplugged: Mutex<BTreeSet<String>>,
}

impl FakeDataplane {
    /// No networks.
    pub fn new() -> Self {
        Self::default()
    }

    recorder_methods!();

    /// The last desired state applied for network `name`, if present.
    pub fn network(&self, name: &str) -> Option<NetworkDesired> {
        lock(&self.networks).get(name).cloned()
    }

    /// The last underlay applied (normalized), if any.
    pub fn underlay(&self) -> Option<Underlay> {
        lock(&self.underlay).clone()
    }

    /// Take `tap` off its bridge behind the agent's back: the next [`Dataplane::ensure_port`]
    /// of it plugs it back and returns `true`.
    pub fn unplug(&self, tap: &str) {
        lock(&self.unplugged).insert(tap.to_string());
    }
}

impl Dataplane for FakeDataplane {
    fn ensure_network(&self, net: &NetworkDesired) -> Result<(), HostError> {
        self.rec.call("ensure_network", &net.name)?;
        NetPlan::from_desired(net)
            .map_err(|m| HostError::invalid(format!("network {:?}", net.name), m))?;
        lock(&self.networks).insert(net.name.clone(), net.clone());
        Ok(())
    }

    fn remove_network(&self, name: &str) -> Result<(), HostError> {
        self.rec.call("remove_network", name)?;
        lock(&self.networks).remove(name);
        Ok(())
    }

    fn networks(&self) -> Result<Vec<String>, HostError> {
        self.rec.call("networks", "")?;
        Ok(lock(&self.networks).keys().cloned().collect())
    }

    fn ensure_port(&self, _bridge: &str, tap: &str) -> Result<bool, HostError> {
        self.rec.call("ensure_port", tap)?;
        Ok(lock(&self.unplugged).remove(tap))
    }

    fn ensure_underlay(&self, underlay: &Underlay) -> Result<(), HostError> {
        self.rec.call("ensure_underlay", "")?;
        let underlay = underlay
            .normalized()
            .map_err(|m| HostError::invalid("underlay", m))?;
        *lock(&self.underlay) = Some(underlay);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;

    const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";

    fn spec(name: &str) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            vm_id: "vm-1".into(),
            cloud_id: CLOUD.into(),
            accel: Accel::Tcg,
            vcpus: 1,
            max_vcpus: 1,
            volumes: vec![],
            memory_mib: 128,
            root_disk: "/p/vms/vm-1/root.qcow2".into(),
            seed_iso: "/p/vms/vm-1/seed.iso".into(),
            console_log: "/p/vms/vm-1/console.log".into(),
            nics: vec![],
        }
    }

    #[test]
    fn live_migration_moves_the_domain_and_failures_leave_it() {
        let src = FakeHypervisor::new(CLOUD);
        let dst = Arc::new(FakeHypervisor::new(CLOUD));
        let paths = crate::channel::MigrationPaths::new(Path::new("/run/tuchka"), CLOUD, "m1")
            .expect("paths");
        src.add_migration_peer(&paths.dest_uri(), dst.clone());
        src.define(&spec("a")).expect("define");
        let xml = src.migratable_xml("a").expect("xml");
        let dest_xml = crate::migrate::retarget_domain_xml(&xml, Path::new("/p"), Path::new("/q"))
            .expect("retarget");
        let m = LiveMigration::through(&paths, "a", dest_xml.clone());
        let mut seen = Vec::new();
        assert!(
            matches!(
                src.migrate_live(&m, &mut |p| seen.push(p.data_processed)),
                Err(HostError::BadState { .. })
            ),
            "a stopped domain is not live-migrated"
        );
        src.start("a").expect("start");
        src.suspend("a").expect("pause");

        src.fail_once("migrate_live.copy");
        assert!(src
            .migrate_live(&m, &mut |p| seen.push(p.data_processed))
            .is_err());
        assert_eq!(src.domain("a").map(|d| d.state), Some(DomainState::Paused));
        assert!(dst.domain("a").is_none());

        seen.clear();
        let out = src
            .migrate_live(&m, &mut |p| seen.push(p.data_processed))
            .expect("migrate");
        assert_eq!(seen.len(), 3);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(out.bytes, 128 << 20);
        assert!(out.downtime.is_some());
        assert!(src.domain("a").is_none(), "gone from the source");
        assert_eq!(dst.domain("a").map(|d| d.state), Some(DomainState::Paused));
        assert_eq!(dst.received_xml("a"), Some(dest_xml));
        assert!(dst
            .received_xml("a")
            .is_some_and(|x| x.contains("/q/vms/vm-1/root.qcow2")));
        assert_eq!(src.count("migrate_live"), 3);
    }

    #[test]
    fn capture_writes_a_placeholder_image_and_failures_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = FakeHypervisor::new(CLOUD);
        let out = dir.path().join("img.qcow2");
        let seen = Mutex::new(Vec::new());
        let record = |p: CaptureProgress| lock(&seen).push(p.phase);
        let err = hv
            .capture_disk("a", "vda", dir.path(), &out, &record)
            .expect_err("no domain");
        assert!(
            matches!(&err, HostError::Capture { source, .. } if matches!(**source, HostError::NoDomain { .. })),
            "{err:?}"
        );
        hv.define(&spec("a")).expect("define");
        assert!(hv
            .capture_disk("a", "vdz", dir.path(), &out, &record)
            .expect_err("no vdz")
            .chain()
            .contains("has no disk vdz"));

        // Stopped: converted only.
        let o = hv
            .capture_disk("a", "/p/vms/vm-1/root.qcow2", dir.path(), &out, &record)
            .expect("capture stopped");
        assert_eq!(o.copy_ms, 0);
        assert_eq!(
            *lock(&seen),
            vec![CapturePhase::Converting, CapturePhase::Converting]
        );
        let header = crate::qcow2::read_header(&out)
            .expect("read")
            .expect("qcow2");
        assert_eq!(header.virtual_size, FAKE_CAPTURE_SIZE);
        assert_eq!(header.backing_file, None);
        assert_eq!(o.bytes, std::fs::metadata(&out).expect("out").len());
        assert!(hv
            .capture_disk("a", "vda", dir.path(), &out, &record)
            .expect_err("out exists")
            .chain()
            .contains("already exists"));

        // Running: copied, then converted; an injected failure leaves no file.
        hv.start("a").expect("start");
        let out2 = dir.path().join("img2.qcow2");
        hv.fail_once("capture_disk.convert");
        lock(&seen).clear();
        assert!(hv
            .capture_disk("a", "vda", dir.path(), &out2, &record)
            .is_err());
        assert!(!out2.exists());
        assert_eq!(
            *lock(&seen),
            vec![
                CapturePhase::Copying,
                CapturePhase::Copying,
                CapturePhase::Converting
            ]
        );
        let o = hv
            .capture_disk("a", "vda", dir.path(), &out2, &record)
            .expect("capture running");
        assert!(o.copy_ms > 0 && out2.exists());
        assert_eq!(hv.domain("a").map(|d| d.state), Some(DomainState::Running));
        assert_eq!(hv.count("capture_disk"), 6);
    }

    #[test]
    fn hypervisor_lifecycle_and_idempotence() {
        let hv = FakeHypervisor::new(CLOUD);
        assert!(matches!(hv.start("x"), Err(HostError::NoDomain { .. })));
        hv.define(&spec("x")).expect("define");
        hv.start("x").expect("start");
        hv.start("x").expect("start again");
        assert_eq!(
            hv.domain("x").map(|d| (d.state, d.starts)),
            Some((DomainState::Running, 1))
        );
        hv.suspend("x").expect("suspend");
        assert_eq!(hv.list().expect("list")[0].state, DomainState::Paused);
        hv.resume("x").expect("resume");
        hv.set_ignore_acpi(true);
        hv.shutdown("x").expect("shutdown");
        assert_eq!(hv.domain("x").map(|d| d.state), Some(DomainState::Running));
        hv.destroy("x").expect("destroy");
        hv.destroy("x").expect("destroy again");
        assert!(matches!(hv.reboot("x"), Err(HostError::BadState { .. })));
        hv.undefine("x").expect("undefine");
        hv.undefine("x").expect("undefine again");
        assert!(hv.list().expect("list").is_empty());
    }

    #[test]
    fn failures_are_injected_by_op_and_arg() {
        let hv = FakeHypervisor::new(CLOUD);
        hv.define(&spec("a")).expect("define");
        hv.define(&spec("b")).expect("define");
        hv.fail_on("start", "a");
        assert!(matches!(hv.start("a"), Err(HostError::Injected { .. })));
        hv.start("b").expect("b unaffected");
        hv.fail_once("destroy");
        assert!(hv.destroy("b").is_err());
        hv.destroy("b").expect("only once");
        hv.clear_failures();
        hv.start("a").expect("cleared");
        assert_eq!(hv.count("start"), 3);
    }

    #[test]
    fn foreign_domains_are_refused() {
        let hv = FakeHypervisor::new(CLOUD);
        hv.add_foreign("theirs", "other");
        assert!(matches!(
            hv.undefine("theirs"),
            Err(HostError::ForeignDomain { .. })
        ));
        assert!(matches!(
            hv.define(&spec("theirs")),
            Err(HostError::ForeignDomain { .. })
        ));
    }

    #[test]
    fn storage_tracks_disks_seeds_and_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = FakeStorage::new(dir.path()).expect("fake");
        let sha = "a".repeat(64);
        assert!(st.ensure_root_disk("vm-1", &sha, 100).is_err());
        st.add_image(&sha, 64);
        assert!(st.ensure_root_disk("vm-1", &sha, 32).is_err());
        st.ensure_root_disk("vm-1", &sha, 100).expect("root disk");
        st.ensure_seed("vm-1", "web-0", None, &[]).expect("seed");
        st.ensure_seed("vm-1", "web-0", None, &[])
            .expect("seed again");
        assert_eq!(st.vm("vm-1").map(|v| v.seed_builds), Some(1));
        assert!(matches!(
            st.remove_image(&sha),
            Err(HostError::ImageInUse { .. })
        ));
        st.remove_vm("vm-1").expect("remove vm");
        st.remove_image(&sha).expect("remove image");

        let data = b"image bytes";
        let file_sha = tuchka_core::digest::sha256_hex(data);
        let sha2 = "b".repeat(64);
        std::fs::write(st.image_partial_path(&sha2), data).expect("write partial");
        assert!(matches!(
            st.commit_image(&sha2, &"0".repeat(64)),
            Err(HostError::Corrupt { .. })
        ));
        assert!(!st.image_partial_path(&sha2).exists());
        std::fs::write(st.image_partial_path(&sha2), data).expect("write partial");
        st.commit_image(&sha2, &file_sha).expect("commit");
        assert_eq!(st.cached_images().expect("list"), vec![sha2]);
    }

    #[test]
    fn dataplane_validates_and_records() {
        let dp = FakeDataplane::new();
        let mut net = NetworkDesired {
            name: "blue".into(),
            vni: 100,
            bridge: "tk100".into(),
            cidr: "10.10.0.0/24".into(),
            gateway: "10.10.0.1".into(),
            gateway_here: true,
            mtu: 1450,
            hosts: vec![],
            nat: false,
            ingress: vec![],
            egress: vec![],
            forwards: vec![],
            vxlan: None,
        };
        dp.ensure_network(&net).expect("ensure");
        net.cidr = "bogus".into();
        assert!(dp.ensure_network(&net).is_err());
        assert_eq!(dp.networks().expect("list"), vec!["blue"]);
        dp.fail("remove_network");
        assert!(dp.remove_network("blue").is_err());
        assert_eq!(dp.count("ensure_network"), 2);
    }

    #[test]
    fn dataplane_ports_and_underlay_never_touch_the_host() {
        let dp = FakeDataplane::new();
        assert_eq!(dp.ensure_port("tk100", "tkv000001").ok(), Some(false));
        dp.unplug("tkv000001");
        assert_eq!(dp.ensure_port("tk100", "tkv000001").ok(), Some(true));
        assert_eq!(dp.ensure_port("tk100", "tkv000001").ok(), Some(false));
        dp.fail_on("ensure_port", "tkv000002");
        assert!(dp.ensure_port("tk100", "tkv000002").is_err());

        let peer = std::net::IpAddr::from([10, 0, 0, 2]);
        dp.ensure_underlay(&Underlay::new(vec![peer, peer]))
            .expect("underlay");
        assert_eq!(dp.underlay().map(|u| u.peers), Some(vec![peer]));
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        assert!(dp.ensure_underlay(&Underlay::new(vec![loopback])).is_err());
        assert_eq!(dp.underlay().map(|u| u.peers), Some(vec![peer]), "kept");
        dp.fail_once("ensure_underlay");
        assert!(dp.ensure_underlay(&Underlay::new(vec![])).is_err());
        assert_eq!(dp.count("ensure_port"), 4);
        assert_eq!(dp.count("ensure_underlay"), 3);
    }
}
