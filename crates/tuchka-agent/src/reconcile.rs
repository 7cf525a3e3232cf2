//! One reconcile pass: converge this host to a [`HostDesired`] and say what it now has.
//!
//! Order matters for cleanliness: networks first (VMs plug into bridges), then VMs, then
//! removal of what is not desired (domains, VM directories), then cached images and networks
//! nothing uses any more. Every step is idempotent; a failure is reported on the object it
//! concerns and retried on the next pass.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tuchka_api::agent::{HostDesired, HostReport, NetworkObserved, VmDesired, VmObserved};
use tuchka_api::VmState;
use tuchka_host::{Accel, Dataplane, DomainInfo, DomainSpec, HostError, Hypervisor, NicSpec, Storage};

use crate::plan::{next_action, observed_state, Action, VmMemory};

/// The side-effect adapters of one host.
pub struct HostParts {
    /// libvirt.
    pub hypervisor: Box<dyn Hypervisor>,
    /// The storage pool.
    pub storage: Box<dyn Storage>,
    /// Bridges, DHCP/DNS, firewall.
    pub dataplane: Box<dyn Dataplane>,
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
pub fn reconcile(parts: &HostParts, desired: &HostDesired, mem: &mut Memory, image_errors: &HashMap<String, String>) -> PassResult {
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
                .map(|v| VmObserved { id: v.id.clone(), state: VmState::Error, error: Some(e.to_string()), reboot_seq: 0 })
                .collect();
            return PassResult { report: HostReport { generation: desired.generation, vms, ..Default::default() }, settled: false };
        }
    };

    let mtus: HashMap<&str, u32> = desired.networks.iter().map(|n| (n.name.as_str(), n.mtu)).collect();
    let mut observed = vec![];
    for want in &desired.vms {
        let result = match image_errors.get(&want.image_sha256) {
            Some(why) => Err(format!("image not available on this host: {why}")),
            None => converge_vm(parts, want, domains.get(&want.id).map(|d| &d.state), mem, &mtus),
        };
        let state_now = parts.hypervisor.list().ok().and_then(|l| l.into_iter().find(|d| d.vm_id == want.id)).map(|d| d.state);
        let (state, error) = match result {
            Ok(()) => (observed_state(want, state_now.as_ref()), None),
            Err(e) => {
                tracing::warn!(vm = %want.name, error = %e, "vm not converged");
                (VmState::Error, Some(e))
            }
        };
        if !matches!(state, VmState::Running | VmState::Paused | VmState::Stopped) {
            settled = false;
        }
        observed.push(VmObserved { id: want.id.clone(), state, error, reboot_seq: mem.reboot_done.get(&want.id).copied().unwrap_or(0) });
    }

    // Remove what is not desired: domains, then their directories.
    let wanted: HashSet<&str> = desired.vms.iter().map(|v| v.id.as_str()).collect();
    for d in domains.values().filter(|d| !wanted.contains(d.vm_id.as_str())) {
        let gone = parts.hypervisor.undefine(&d.name).and_then(|_| parts.storage.remove_vm(&d.vm_id));
        if let Err(e) = gone {
            tracing::warn!(domain = %d.name, error = %e, "cannot remove domain");
            observed.push(VmObserved { id: d.vm_id.clone(), state: VmState::Stopping, error: Some(e.to_string()), reboot_seq: 0 });
            settled = false;
        }
        forget(mem, &d.vm_id);
    }
    if let Ok(dirs) = parts.storage.vm_dirs() {
        for id in dirs.iter().filter(|id| !wanted.contains(id.as_str()) && !domains.contains_key(id.as_str())) {
            if let Err(e) = parts.storage.remove_vm(id) {
                tracing::warn!(vm = %id, error = %e, "cannot remove VM directory");
                observed.push(VmObserved { id: id.clone(), state: VmState::Stopping, error: Some(e.to_string()), reboot_seq: 0 });
            }
        }
    }

    // Cached images the cloud no longer has and no desired VM uses.
    let keep: HashSet<&str> = desired.images.iter().map(String::as_str).chain(desired.vms.iter().map(|v| v.image_sha256.as_str())).collect();
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
            networks.push(NetworkObserved { name, ready: false, error: Some(e.to_string()) });
            settled = false;
        }
    }
    for n in &desired.networks {
        let error = net_errors.remove(&n.name);
        networks.push(NetworkObserved { name: n.name.clone(), ready: error.is_none(), error });
    }

    PassResult {
        report: HostReport { generation: desired.generation, facts: Default::default(), vms: observed, networks, cached_images: cached },
        settled,
    }
}

fn forget(mem: &mut Memory, id: &str) {
    mem.shutdown_since.remove(id);
    mem.shutdown_last.remove(id);
    mem.reboot_done.remove(id);
}

/// Take the next action for one VM (several in a row while they are quick: create → start →
/// suspend). Errors come back as the message to report.
fn converge_vm(
    parts: &HostParts,
    want: &VmDesired,
    state: Option<&tuchka_host::DomainState>,
    mem: &mut Memory,
    mtus: &HashMap<&str, u32>,
) -> Result<(), String> {
    if want.power != tuchka_api::PowerState::Stopped {
        mem.shutdown_since.remove(&want.id);
        mem.shutdown_last.remove(&want.id);
    }
    let mut state = state.cloned();
    for _ in 0..4 {
        let action = next_action(want, state.as_ref(), &mem.vm(&want.id));
        if action == Action::None {
            return Ok(());
        }
        apply(parts, want, action, mem, mtus).map_err(|e| e.to_string())?;
        if matches!(action, Action::Shutdown | Action::Reboot) {
            return Ok(()); // the guest acts on its own time
        }
        state = parts.hypervisor.list().map_err(|e| e.to_string())?.into_iter().find(|d| d.vm_id == want.id).map(|d| d.state);
    }
    Ok(())
}

fn apply(parts: &HostParts, want: &VmDesired, action: Action, mem: &mut Memory, mtus: &HashMap<&str, u32>) -> Result<(), HostError> {
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
            mem.shutdown_since.remove(&want.id);
            mem.shutdown_last.remove(&want.id);
            Ok(())
        }
        Action::Shutdown => {
            hv.shutdown(&want.domain)?;
            let now = Instant::now();
            mem.shutdown_since.entry(want.id.clone()).or_insert(now);
            mem.shutdown_last.insert(want.id.clone(), now);
            Ok(())
        }
        Action::Reboot => {
            hv.reboot(&want.domain)?;
            mem.reboot_done.insert(want.id.clone(), want.reboot_seq);
            Ok(())
        }
    }
}

/// Disk, seed and definition of a new VM; undone if a later step fails.
fn create(parts: &HostParts, want: &VmDesired, mtus: &HashMap<&str, u32>) -> Result<(), HostError> {
    let st = &parts.storage;
    let result = (|| {
        let root_disk = st.ensure_root_disk(&want.id, &want.image_sha256, want.disk_mib)?;
        let seed_iso = st.ensure_seed(&want.id, &want.name, want.user_data.as_deref(), &want.ssh_keys)?;
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
