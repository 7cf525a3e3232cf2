//! One reconcile pass: converge this host to a [`HostDesired`] and say what it now has.
//!
//! Order matters for cleanliness: networks first (VMs plug into bridges), then VMs, then
//! removal of what is not desired (domains, VM directories), then cached images and networks
//! nothing uses any more. Every step is idempotent; a failure is reported on the object it
//! concerns and retried on the next pass.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tuchka_api::agent::{HostDesired, HostReport, NetworkObserved, VmDesired, VmObserved};
use tuchka_api::VmState;
use tuchka_host::{
    Accel, Dataplane, DomainInfo, DomainSpec, HostError, Hypervisor, NicSpec, Storage,
};

use crate::plan::{next_action, observed_state, Action, VmMemory};

/// The side-effect adapters of one host.
pub struct HostParts {
    /// libvirt.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The storage pool.
    pub storage: Arc<dyn Storage>,
    /// Bridges, DHCP/DNS, firewall.
    pub dataplane: Arc<dyn Dataplane>,
    /// Accelerator for new domains.
    pub accel: Accel,
    /// Id of the cloud (domain metadata).
    pub cloud_id: String,
}

/// What the agent remembers between passes.
#[derive(Debug, Default)]
pub struct Memory {
    shutdown_since: HashMap<String, Instant>,
    shutdown_last: HashMap<String, Instant>,
    reboot_done: HashMap<String, u64>,
}

impl Memory {
    fn vm(&self, id: &str) -> VmMemory {
        VmMemory {
            shutdown_since: self.shutdown_since.get(id).map(Instant::elapsed),
            shutdown_last: self.shutdown_last.get(id).map(Instant::elapsed),
            reboot_done: self.reboot_done.get(id).copied().unwrap_or(0),
        }
    }
}

/// Result of a pass.
#[derive(Debug)]
pub struct PassResult {
    /// The report (without facts; the caller adds them).
    pub report: HostReport,
    /// True when nothing is in transition: the next pass can wait for a change.
    pub settled: bool,
}

/// Converge the host once. `image_errors` holds images that could not be fetched (sha → why).
pub fn reconcile(
    parts: &HostParts,
    desired: &HostDesired,
    mem: &mut Memory,
    image_errors: &HashMap<String, String>,
) -> PassResult {
    let mut settled = true;
    let mut net_errors: HashMap<String, String> = HashMap::new();
    for n in &desired.networks {
        if let Err(e) = parts.dataplane.ensure_network(n) {
            tracing::warn!(network = %n.name, error = %e, "network not converged");
            net_errors.insert(n.name.clone(), e.to_string());
            settled = false;
        }
    }

    let domains: HashMap<String, DomainInfo> = match parts.hypervisor.list() {
        Ok(d) => d.into_iter().map(|d| (d.vm_id.clone(), d)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list domains");
            let vms = desired
                .vms
                .iter()
                .map(|v| VmObserved {
                    id: v.id.clone(),
                    state: VmState::Error,
                    error: Some(e.to_string()),
                    reboot_seq: 0,
                })
                .collect();
            return PassResult {
                report: HostReport {
                    generation: desired.generation,
                    vms,
                    ..Default::default()
                },
                settled: false,
            };
        }
    };

    let mtus: HashMap<&str, u32> = desired
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n.mtu))
        .collect();
    // VMs converge independently, a few at a time: starting or destroying a domain takes
    // libvirt hundreds of milliseconds, mostly waiting on qemu.
    let shared = Mutex::new(std::mem::take(mem));
    let mut observed: Vec<VmObserved> = parallel_map(&desired.vms, |want| {
        let result = match image_errors.get(&want.image_sha256) {
            Some(why) => Err(format!("image not available on this host: {why}")),
            None => converge_vm(
                parts,
                want,
                domains.get(&want.id).map(|d| &d.state),
                &shared,
                &mtus,
            ),
        };
        let (state, error) = match result {
            Ok(state_now) => (observed_state(want, state_now.as_ref()), None),
            Err(e) => {
                tracing::warn!(vm = %want.name, error = %e, "vm not converged");
                (VmState::Error, Some(e))
            }
        };
        let reboot_seq = lock(&shared)
            .reboot_done
            .get(&want.id)
            .copied()
            .unwrap_or(0);
        VmObserved {
            id: want.id.clone(),
            state,
            error,
            reboot_seq,
        }
    });
    *mem = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if observed.iter().any(|o| {
        !matches!(
            o.state,
            VmState::Running | VmState::Paused | VmState::Stopped
        )
    }) {
        settled = false;
    }

    // A bridge recreated under running VMs has lost their taps: plug them back.
    for (want, seen) in desired.vms.iter().zip(&observed) {
        if matches!(
            seen.state,
            VmState::Running | VmState::Paused | VmState::Stopping
        ) {
            for nic in &want.nics {
                if let Err(e) = parts.dataplane.ensure_port(&nic.bridge, &nic.tap) {
                    tracing::warn!(vm = %want.name, tap = %nic.tap, error = %e, "cannot plug the tap into its bridge");
                }
            }
        }
    }

    // Remove what is not desired: domains, then their directories.
    let wanted: HashSet<&str> = desired.vms.iter().map(|v| v.id.as_str()).collect();
    let unwanted: Vec<&DomainInfo> = domains
        .values()
        .filter(|d| !wanted.contains(d.vm_id.as_str()))
        .collect();
    let failed_removals = parallel_map(&unwanted, |d| {
        let gone = parts
            .hypervisor
            .undefine(&d.name)
            .and_then(|_| parts.storage.remove_vm(&d.vm_id));
        gone.err().map(|e| {
            tracing::warn!(domain = %d.name, error = %e, "cannot remove domain");
            VmObserved {
                id: d.vm_id.clone(),
                state: VmState::Stopping,
                error: Some(e.to_string()),
                reboot_seq: 0,
            }
        })
    });
    for d in &unwanted {
        forget(mem, &d.vm_id);
    }
    for f in failed_removals.into_iter().flatten() {
        observed.push(f);
        settled = false;
    }
    if let Ok(dirs) = parts.storage.vm_dirs() {
        for id in dirs
            .iter()
            .filter(|id| !wanted.contains(id.as_str()) && !domains.contains_key(id.as_str()))
        {
            if let Err(e) = parts.storage.remove_vm(id) {
                tracing::warn!(vm = %id, error = %e, "cannot remove VM directory");
                observed.push(VmObserved {
                    id: id.clone(),
                    state: VmState::Stopping,
                    error: Some(e.to_string()),
                    reboot_seq: 0,
                });
            }
        }
    }

    // Cached images the cloud no longer has and no desired VM uses.
    let keep: HashSet<&str> = desired
        .images
        .iter()
        .map(String::as_str)
        .chain(desired.vms.iter().map(|v| v.image_sha256.as_str()))
        .collect();
    let mut cached = parts.storage.cached_images().unwrap_or_default();
    cached.retain(|sha| {
        if keep.contains(sha.as_str()) {
            return true;
        }
        match parts.storage.remove_image(sha) {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(image = %sha, error = %e, "cannot remove cached image");
                true
            }
        }
    });

    // Networks nothing here needs any more.
    let wanted_nets: HashSet<&str> = desired.networks.iter().map(|n| n.name.as_str()).collect();
    let mut networks = vec![];
    for name in parts.dataplane.networks().unwrap_or_default() {
        if wanted_nets.contains(name.as_str()) {
            continue;
        }
        if let Err(e) = parts.dataplane.remove_network(&name) {
            tracing::warn!(network = %name, error = %e, "cannot remove network");
            networks.push(NetworkObserved {
                name,
                ready: false,
                error: Some(e.to_string()),
            });
            settled = false;
        }
    }
    for n in &desired.networks {
        let error = net_errors.remove(&n.name);
        networks.push(NetworkObserved {
            name: n.name.clone(),
            ready: error.is_none(),
            error,
        });
    }

    PassResult {
        report: HostReport {
            generation: desired.generation,
            facts: Default::default(),
            vms: observed,
            networks,
            cached_images: cached,
        },
        settled,
    }
}

fn forget(mem: &mut Memory, id: &str) {
    mem.shutdown_since.remove(id);
    mem.shutdown_last.remove(id);
    mem.reboot_done.remove(id);
}

/// Take the next action for one VM (several in a row while they are quick: create → start →
/// suspend). Returns the domain's state afterwards; errors come back as the message to report.
fn converge_vm(
    parts: &HostParts,
    want: &VmDesired,
    state: Option<&tuchka_host::DomainState>,
    mem: &Mutex<Memory>,
    mtus: &HashMap<&str, u32>,
) -> Result<Option<tuchka_host::DomainState>, String> {
    if want.power != tuchka_api::PowerState::Stopped {
        let mut m = lock(mem);
        m.shutdown_since.remove(&want.id);
        m.shutdown_last.remove(&want.id);
    }
    let mut state = state.cloned();
    for _ in 0..4 {
        let action = next_action(want, state.as_ref(), &lock(mem).vm(&want.id));
        if action == Action::None {
            break;
        }
        apply(parts, want, action, mem, mtus).map_err(|e| e.to_string())?;
        state = parts
            .hypervisor
            .list()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|d| d.vm_id == want.id)
            .map(|d| d.state);
        if matches!(action, Action::Shutdown | Action::Reboot) {
            break; // the guest acts on its own time
        }
    }
    Ok(state)
}

/// Workers per reconcile pass.
const PARALLEL: usize = 4;

/// `f` over `items` on up to [`PARALLEL`] threads; results in input order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                lock(&results)[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn apply(
    parts: &HostParts,
    want: &VmDesired,
    action: Action,
    mem: &Mutex<Memory>,
    mtus: &HashMap<&str, u32>,
) -> Result<(), HostError> {
    let hv = &parts.hypervisor;
    tracing::debug!(vm = %want.name, ?action, "converging");
    match action {
        Action::None => Ok(()),
        Action::Create => create(parts, want, mtus),
        Action::Start => hv.start(&want.domain),
        Action::Suspend => hv.suspend(&want.domain),
        Action::Resume => hv.resume(&want.domain),
        Action::Destroy => {
            hv.destroy(&want.domain)?;
            let mut m = lock(mem);
            m.shutdown_since.remove(&want.id);
            m.shutdown_last.remove(&want.id);
            Ok(())
        }
        Action::Shutdown => {
            hv.shutdown(&want.domain)?;
            let now = Instant::now();
            let mut m = lock(mem);
            m.shutdown_since.entry(want.id.clone()).or_insert(now);
            m.shutdown_last.insert(want.id.clone(), now);
            Ok(())
        }
        Action::Reboot => {
            hv.reboot(&want.domain)?;
            lock(mem)
                .reboot_done
                .insert(want.id.clone(), want.reboot_seq);
            Ok(())
        }
    }
}

/// Disk, seed and definition of a new VM; undone if a later step fails.
fn create(parts: &HostParts, want: &VmDesired, mtus: &HashMap<&str, u32>) -> Result<(), HostError> {
    let st = &parts.storage;
    let result = (|| {
        let root_disk = st.ensure_root_disk(&want.id, &want.image_sha256, want.disk_mib)?;
        let seed_iso = st.ensure_seed(
            &want.id,
            &want.name,
            want.user_data.as_deref(),
            &want.ssh_keys,
        )?;
        let spec = DomainSpec {
            name: want.domain.clone(),
            vm_id: want.id.clone(),
            cloud_id: parts.cloud_id.clone(),
            accel: parts.accel,
            vcpus: want.cpus,
            memory_mib: want.memory_mib,
            root_disk,
            seed_iso,
            console_log: st.console_log_path(&want.id),
            nics: want
                .nics
                .iter()
                .map(|n| NicSpec {
                    bridge: n.bridge.clone(),
                    mac: n.mac.clone(),
                    tap: n.tap.clone(),
                    mtu: mtus.get(n.network.as_str()).copied().unwrap_or(1500),
                })
                .collect(),
        };
        parts.hypervisor.define(&spec)
    })();
    if result.is_err() {
        let _ = parts.hypervisor.undefine(&want.domain);
        let _ = st.remove_vm(&want.id);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::agent::{NetworkDesired, NicDesired};
    use tuchka_api::PowerState;
    use tuchka_host::fake::{FakeDataplane, FakeHypervisor, FakeStorage};
    use tuchka_host::DomainState;

    const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";
    const VM: &str = "3b0e8a52-5a1f-4c55-9a0e-1d2c3b4a5f60";
    const IMG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    struct Host {
        hv: Arc<FakeHypervisor>,
        st: Arc<FakeStorage>,
        dp: Arc<FakeDataplane>,
        parts: HostParts,
        _dir: tempfile::TempDir,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Arc::new(FakeHypervisor::new(CLOUD));
        let st = Arc::new(FakeStorage::new(dir.path()).expect("fake storage"));
        let dp = Arc::new(FakeDataplane::new());
        st.add_image(IMG, 64);
        let parts = HostParts {
            hypervisor: hv.clone(),
            storage: st.clone(),
            dataplane: dp.clone(),
            accel: Accel::Tcg,
            cloud_id: CLOUD.into(),
        };
        Host {
            hv,
            st,
            dp,
            parts,
            _dir: dir,
        }
    }

    fn net() -> NetworkDesired {
        NetworkDesired {
            name: "lan".into(),
            vni: 5000,
            bridge: "tk5000".into(),
            cidr: "10.80.0.0/24".into(),
            gateway: "10.80.0.1".into(),
            gateway_here: true,
            mtu: 1450,
            hosts: vec![],
            nat: false,
            ingress: vec![],
            egress: vec![],
            forwards: vec![],
            vxlan: None,
        }
    }

    fn vm(power: PowerState) -> VmDesired {
        VmDesired {
            id: VM.into(),
            name: "web-0".into(),
            domain: "tk-0f2a6c1e-web-0".into(),
            power,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            image_sha256: IMG.into(),
            image_file_sha256: IMG.into(),
            nics: vec![NicDesired {
                network: "lan".into(),
                bridge: "tk5000".into(),
                mac: "52:54:00:aa:bb:cc".into(),
                ip: "10.80.0.2".into(),
                tap: "tkvaabbcc".into(),
            }],
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            ssh_keys: vec![],
            reboot_seq: 0,
            force_stop: false,
            stop_timeout_s: 60,
        }
    }

    fn desired(vms: Vec<VmDesired>) -> HostDesired {
        HostDesired {
            generation: 1,
            cloud_id: CLOUD.into(),
            vms,
            networks: vec![net()],
            images: vec![IMG.into()],
        }
    }

    fn state_of(r: &PassResult) -> VmState {
        r.report
            .vms
            .iter()
            .find(|v| v.id == VM)
            .map(|v| v.state)
            .expect("vm reported")
    }

    #[test]
    fn a_new_vm_gets_network_disk_seed_and_runs() {
        let h = host();
        let mut mem = Memory::default();
        let r = reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        assert_eq!(state_of(&r), VmState::Running);
        assert!(r.settled);
        assert!(h.dp.network("lan").is_some());
        let d = h.hv.domain("tk-0f2a6c1e-web-0").expect("defined");
        assert_eq!(d.state, DomainState::Running);
        let storage = h.st.vm(VM).expect("storage");
        assert_eq!(storage.disk_mib, Some(1024));
        assert_eq!(storage.seed.map(|s| s.0), Some("web-0".to_string()));
        assert!(r.report.networks[0].ready);
        // A second pass changes nothing.
        h.hv.take_calls();
        let r = reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        assert_eq!(state_of(&r), VmState::Running);
        assert_eq!(h.hv.count("start") + h.hv.count("define"), 0);
    }

    #[test]
    fn a_failed_define_is_reported_and_leaves_no_storage() {
        let h = host();
        h.hv.fail("define");
        let r = reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut Memory::default(),
            &HashMap::new(),
        );
        assert_eq!(state_of(&r), VmState::Error);
        assert!(
            r.report.vms[0]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("define"),
            "{:?}",
            r.report.vms[0].error
        );
        assert!(h.st.vm(VM).is_none(), "disk and seed are removed again");
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none());
    }

    #[test]
    fn an_image_that_could_not_be_fetched_fails_the_vm() {
        let h = host();
        let errors = HashMap::from([(IMG.to_string(), "sha256 mismatch".to_string())]);
        let r = reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut Memory::default(),
            &errors,
        );
        assert_eq!(state_of(&r), VmState::Error);
        assert!(r.report.vms[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("sha256 mismatch"));
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none());
    }

    #[test]
    fn what_is_not_desired_is_removed() {
        let h = host();
        let mut mem = Memory::default();
        reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        let empty = HostDesired {
            generation: 2,
            cloud_id: CLOUD.into(),
            vms: vec![],
            networks: vec![],
            images: vec![],
        };
        let r = reconcile(&h.parts, &empty, &mut mem, &HashMap::new());
        assert!(r.report.vms.is_empty(), "{:?}", r.report.vms);
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none());
        assert!(h.st.vm(VM).is_none());
        assert!(h.dp.network("lan").is_none());
        assert!(
            h.st.images().is_empty(),
            "the unused cached image is removed"
        );
        assert!(r.report.networks.is_empty());
    }

    #[test]
    fn stop_waits_for_acpi_then_forces_after_the_timeout() {
        let h = host();
        let mut mem = Memory::default();
        reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        h.hv.set_ignore_acpi(true);
        let mut stop = vm(PowerState::Stopped);
        stop.stop_timeout_s = 0;
        let r = reconcile(
            &h.parts,
            &desired(vec![stop.clone()]),
            &mut mem,
            &HashMap::new(),
        );
        assert_eq!(state_of(&r), VmState::Stopping);
        assert!(!r.settled);
        assert_eq!(h.hv.count("shutdown"), 1);
        let r = reconcile(&h.parts, &desired(vec![stop]), &mut mem, &HashMap::new());
        assert_eq!(state_of(&r), VmState::Stopped);
        assert_eq!(h.hv.count("destroy"), 1);
    }

    #[test]
    fn a_domain_deleted_behind_our_back_comes_back() {
        let h = host();
        let mut mem = Memory::default();
        reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        h.hv.undefine("tk-0f2a6c1e-web-0").expect("undefine");
        let r = reconcile(
            &h.parts,
            &desired(vec![vm(PowerState::Running)]),
            &mut mem,
            &HashMap::new(),
        );
        assert_eq!(state_of(&r), VmState::Running);
        assert_eq!(
            h.hv.domain("tk-0f2a6c1e-web-0").map(|d| d.state),
            Some(DomainState::Running)
        );
    }
}
