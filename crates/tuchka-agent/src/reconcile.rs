//! One reconcile pass: converge this host to a [`HostDesired`] and say what it now has.
//!
//! Order matters for cleanliness: the host firewall for the channel and VXLAN, networks (VMs
//! plug into bridges), then VMs, then the removals the controller named, then cached images
//! and networks nothing uses any more. Every step is idempotent; a failure is reported on the
//! object it concerns (with its cause chain) and retried on the next pass.
//!
//! Removal is explicit: a domain or VM directory of this cloud is destroyed only when the
//! controller names its VM in `removals`. Anything else found that no desired VM explains is
//! reported as an orphan and left alone — a restored database, a renamed host or a VM arriving
//! by migration never loses a disk.
//!
//! A VM in a migration is not converged as usual: on the target (`incoming`) the pass only
//! prepares (image, overlay, seed — networks come with the desired state) and never defines or
//! starts it; on the source (`outgoing`) the pass starts, watches or aborts the [`Mover`]'s
//! job and never re-creates a domain that left.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tuchka_api::agent::{
    HostDesired, HostReport, MigrationObserved, MigrationStatus, NetworkObserved, Orphan,
    OrphanKind, VmDesired, VmMigrationDesired, VmObserved, VolumeObserved,
};
use tuchka_api::{MigrationMode, VmState};
use tuchka_host::net::Underlay;
use tuchka_host::{
    Accel, Dataplane, DomainInfo, DomainSpec, HostError, Hypervisor, NicSpec, Storage, VolumeSpec,
};

use crate::mover::{cold_files, IncomingJob, Mover, OutgoingJob};
use crate::plan::{next_action, observed_state, outgoing_action, Action, OutgoingAction, VmMemory};

/// The side-effect adapters of one host.
pub struct HostParts {
    /// libvirt.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The storage pool.
    pub storage: Arc<dyn Storage>,
    /// Bridges, DHCP/DNS, firewall.
    pub dataplane: Arc<dyn Dataplane>,
    /// Moves VMs to other hosts.
    pub mover: Arc<dyn Mover>,
    /// Accelerator for new domains.
    pub accel: Accel,
    /// Id of the cloud (domain metadata).
    pub cloud_id: String,
    /// Port of this host's migration channel (None: it has none).
    pub channel_port: Option<u16>,
    /// This host's underlay address, if it has one: guests may not reach it.
    pub underlay_address: Option<IpAddr>,
    /// The controller's API endpoint, if it is on TCP: guests may reach neither its port
    /// (anywhere) nor its address (unless unspecified).
    pub controller: Option<SocketAddr>,
}

/// What the agent remembers between passes.
#[derive(Debug, Default)]
pub struct Memory {
    shutdown_since: HashMap<String, Instant>,
    shutdown_last: HashMap<String, Instant>,
    reboot_done: HashMap<String, u64>,
    resume_done: HashMap<String, u64>,
}

impl Memory {
    fn vm(&self, id: &str, domain: Option<&DomainInfo>) -> VmMemory {
        VmMemory {
            shutdown_since: self.shutdown_since.get(id).map(Instant::elapsed),
            shutdown_last: self.shutdown_last.get(id).map(Instant::elapsed),
            reboot_done: self.reboot_done.get(id).copied().unwrap_or(0),
            resume_done: self.resume_done.get(id).copied().unwrap_or(0),
            paused_on_io_error: domain.is_some_and(|d| d.paused_on_io_error),
            powered_off_by_guest: domain.is_some_and(|d| d.powered_off_by_guest),
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

/// A failure as a user sees it: what failed, then its causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The outermost message.
    pub message: String,
    /// The causes, outermost first.
    pub chain: Vec<String>,
}

impl Failure {
    /// From an error and its sources.
    pub fn of(e: &dyn std::error::Error) -> Self {
        let mut chain = vec![];
        let mut cur = e.source();
        while let Some(s) = cur {
            chain.push(s.to_string());
            cur = s.source();
        }
        Failure {
            message: e.to_string(),
            chain,
        }
    }

    fn text(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            chain: vec![],
        }
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        Failure::of(&e)
    }
}

fn observed(id: &str, state: VmState, error: Option<Failure>) -> VmObserved {
    let (error, error_chain) = match error {
        Some(f) => (Some(f.message), f.chain),
        None => (None, vec![]),
    };
    VmObserved {
        id: id.to_string(),
        state,
        error,
        error_chain,
        reboot_seq: 0,
        domain: false,
        migration: None,
        cpu_usage: 0.0,
        pause_reason: None,
        resume_seq: 0,
        running_with: None,
        powered_off: false,
        console_tail: None,
        resize_error: None,
    }
}

/// The host firewall's view of the cloud: who may reach the channel and VXLAN (the other
/// hosts), and what guests may not reach (the hosts, this one and the controller included,
/// and the control ports: every host's channel port, the controller's API port).
fn underlay(desired: &HostDesired, parts: &HostParts) -> Underlay {
    let mut u = Underlay::new(
        desired
            .peers
            .iter()
            .filter_map(|p| p.address.parse::<IpAddr>().ok())
            .collect(),
    );
    u.channel_port = parts.channel_port;
    // Loopback and wildcard addresses are not reachable from a guest's network anyway.
    u.guarded = parts
        .underlay_address
        .into_iter()
        .chain(parts.controller.map(|c| c.ip()))
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast())
        .collect();
    u.control_ports = desired
        .peers
        .iter()
        .map(|p| p.channel_port)
        .chain(parts.controller.map(|c| c.port()))
        .filter(|&p| p > 0)
        .collect();
    u
}

/// Converge the host once. `image_errors` holds images that could not be fetched (sha → why);
/// `cpu`: each VM's CPU use lately (cores), by id.
pub fn reconcile(
    parts: &HostParts,
    desired: &HostDesired,
    mem: &mut Memory,
    image_errors: &HashMap<String, String>,
    cpu: &HashMap<String, f64>,
) -> PassResult {
    let mut settled = true;
    // A host of a single-host cloud (no channel, no peers) leaves its host firewall alone.
    if parts.channel_port.is_some() || !desired.peers.is_empty() {
        if let Err(e) = parts.dataplane.ensure_underlay(&underlay(desired, parts)) {
            tracing::warn!(error = %e.chain(), "host firewall for the channel and VXLAN not converged");
            settled = false;
        }
    }
    let mut net_errors: HashMap<String, Failure> = HashMap::new();
    for n in &desired.networks {
        if let Err(e) = parts.dataplane.ensure_network(n) {
            tracing::warn!(network = %n.name, error = %e.chain(), "network not converged");
            net_errors.insert(n.name.clone(), e.into());
            settled = false;
        }
    }

    let domains: HashMap<String, DomainInfo> = match parts.hypervisor.list() {
        Ok(d) => d.into_iter().map(|d| (d.vm_id.clone(), d)).collect(),
        Err(e) => {
            tracing::warn!(error = %e.chain(), "cannot list domains");
            let f = Failure::of(&e);
            // libvirt cannot be asked (e.g. libvirtd restarting): the VMs' state is unknown —
            // not failed; they most likely run on, and the next pass sees them again. A
            // migration this host plays a part in fails with it (the controller aborts it), and
            // every removal is still to do.
            let mut vms: Vec<VmObserved> = desired
                .vms
                .iter()
                .map(|v| {
                    let mut o = observed(&v.id, VmState::Unknown, Some(f.clone()));
                    o.migration = match &v.migration {
                        Some(VmMigrationDesired::Incoming { id, .. }) => {
                            let mut m = crate::mover::failed(id, &f.message);
                            m.error_chain = f.chain.clone();
                            Some(m)
                        }
                        Some(VmMigrationDesired::Outgoing { id, .. }) => parts.mover.status(id),
                        None => None,
                    };
                    o
                })
                .collect();
            vms.extend(desired.removals.iter().map(|r| {
                let mut o = observed(&r.id, VmState::Stopping, Some(f.clone()));
                o.domain = true;
                o
            }));
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
    // Volume files first: a new VM's definition plugs its volumes in.
    let mut volume_errors: HashMap<String, Failure> = HashMap::new();
    for v in &desired.volumes {
        if let Err(e) = parts.storage.ensure_volume(&v.id, v.size_mib) {
            tracing::warn!(volume = %v.name, error = %e.chain(), "cannot make the volume");
            volume_errors.insert(v.id.clone(), e.into());
            settled = false;
        }
    }
    let volume_errors = Mutex::new(volume_errors);
    // VMs converge independently, a few at a time: starting or destroying a domain takes
    // libvirt hundreds of milliseconds, mostly waiting on qemu.
    let shared = Mutex::new(std::mem::take(mem));
    let mut report_vms: Vec<VmObserved> = parallel_map(&desired.vms, |want| {
        let domain = domains.get(&want.id);
        let mut o = match &want.migration {
            Some(VmMigrationDesired::Incoming { id, mode, source }) => incoming(
                parts,
                want,
                id,
                *mode,
                &source.host_id,
                domain,
                image_errors,
            ),
            Some(VmMigrationDesired::Outgoing {
                id,
                mode,
                target,
                target_pool,
                go,
                abort,
            }) => {
                let job = OutgoingJob {
                    id: id.clone(),
                    mode: *mode,
                    target: target.clone(),
                    target_pool: target_pool.clone(),
                    vm: want.clone(),
                };
                outgoing(parts, want, &job, *go, *abort, domain)
            }
            None => converge_one(
                parts,
                want,
                domain,
                &shared,
                &mtus,
                image_errors,
                &volume_errors,
            ),
        };
        let m = lock(&shared);
        o.reboot_seq = m.reboot_done.get(&want.id).copied().unwrap_or(0);
        o.resume_seq = m.resume_done.get(&want.id).copied().unwrap_or(0);
        drop(m);
        o.cpu_usage = cpu.get(&want.id).copied().unwrap_or(0.0);
        o
    });
    *mem = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut volume_errors = volume_errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    if report_vms.iter().any(|o| {
        !matches!(
            o.state,
            VmState::Running | VmState::Paused | VmState::Stopped
        ) || o
            .migration
            .as_ref()
            .is_some_and(|m| m.status != MigrationStatus::Idle)
    }) {
        settled = false;
    }

    // A bridge recreated under running VMs has lost their taps: plug them back.
    for (want, seen) in desired.vms.iter().zip(&report_vms) {
        if want.migration.is_none()
            && matches!(
                seen.state,
                VmState::Running | VmState::Paused | VmState::Stopping
            )
        {
            for nic in &want.nics {
                if let Err(e) = parts.dataplane.ensure_port(&nic.bridge, &nic.tap) {
                    tracing::warn!(vm = %want.name, tap = %nic.tap, error = %e.chain(), "cannot plug the tap into its bridge");
                }
            }
        }
    }

    // Migrations this host no longer plays a part in.
    let outgoing_ids: HashSet<&str> = desired
        .vms
        .iter()
        .filter_map(|v| match &v.migration {
            Some(VmMigrationDesired::Outgoing { id, .. }) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    for id in parts.mover.known() {
        if !outgoing_ids.contains(id.as_str()) {
            parts.mover.abort(&id);
            parts.mover.forget(&id);
        }
    }
    let incoming_ids: Vec<String> = desired
        .vms
        .iter()
        .filter_map(|v| match &v.migration {
            Some(VmMigrationDesired::Incoming { id, .. }) => Some(id.clone()),
            _ => None,
        })
        .collect();
    parts.mover.keep_incoming(&incoming_ids);

    // The removals the controller named: domains (matched by VM id, never by name alone), then
    // directories.
    let wanted: HashSet<&str> = desired.vms.iter().map(|v| v.id.as_str()).collect();
    let removal_ids: HashSet<&str> = desired.removals.iter().map(|r| r.id.as_str()).collect();
    let dirs: HashSet<String> = parts
        .storage
        .vm_dirs()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let present: Vec<&tuchka_api::agent::VmRemoval> = desired
        .removals
        .iter()
        .filter(|r| !wanted.contains(r.id.as_str()))
        .filter(|r| domains.contains_key(&r.id) || dirs.contains(&r.id))
        .collect();
    let failed_removals = parallel_map(&present, |r| {
        let gone = match domains.get(&r.id) {
            Some(d) => parts.hypervisor.undefine(&d.name),
            None => Ok(()),
        }
        .and_then(|_| parts.storage.remove_vm(&r.id));
        gone.err().map(|e| {
            tracing::warn!(vm = %r.name, error = %e.chain(), "cannot remove VM");
            let mut o = observed(&r.id, VmState::Stopping, Some(e.into()));
            o.domain = domains.contains_key(&r.id);
            o
        })
    });
    for r in &present {
        forget(mem, &r.id);
    }
    for f in failed_removals.into_iter().flatten() {
        report_vms.push(f);
        settled = false;
    }

    let volumes = converge_volumes(parts, desired, &mut volume_errors);
    if volumes.iter().any(|v| v.error.is_some()) {
        settled = false;
    }

    // What nothing explains: reported, left alone.
    let mut orphans: Vec<Orphan> = domains
        .values()
        .filter(|d| !wanted.contains(d.vm_id.as_str()) && !removal_ids.contains(d.vm_id.as_str()))
        .map(|d| Orphan {
            kind: OrphanKind::Domain,
            name: d.name.clone(),
            vm_id: d.vm_id.clone(),
        })
        .collect();
    orphans.extend(
        dirs.iter()
            .filter(|id| {
                !wanted.contains(id.as_str())
                    && !removal_ids.contains(id.as_str())
                    && !domains.contains_key(id.as_str())
            })
            .map(|id| Orphan {
                kind: OrphanKind::Disk,
                name: parts
                    .storage
                    .root_disk_path(id)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                vm_id: id.clone(),
            }),
    );
    orphans.sort_by(|a, b| (a.kind, &a.vm_id).cmp(&(b.kind, &b.vm_id)));

    // Cached images the cloud no longer has and no desired VM uses (the storage refuses to
    // remove one that still backs a disk, an orphan's included).
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
                tracing::debug!(image = %sha, error = %e.chain(), "cached image kept");
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
            tracing::warn!(network = %name, error = %e.chain(), "cannot remove network");
            let f = Failure::from(e);
            networks.push(NetworkObserved {
                name,
                ready: false,
                error: Some(f.message),
                error_chain: f.chain,
            });
            settled = false;
        }
    }
    for n in &desired.networks {
        let error = net_errors.remove(&n.name);
        networks.push(NetworkObserved {
            name: n.name.clone(),
            ready: error.is_none(),
            error_chain: error.as_ref().map(|f| f.chain.clone()).unwrap_or_default(),
            error: error.map(|f| f.message),
        });
    }

    PassResult {
        report: HostReport {
            generation: desired.generation,
            facts: Default::default(),
            vms: report_vms,
            networks,
            cached_images: cached,
            orphans,
            volumes,
            captures: vec![],
        },
        settled,
    }
}

/// Grow the volumes that must be larger (through the running guest when one has it plugged
/// in), remove those the controller named (unplugging them first), and say what is here.
fn converge_volumes(
    parts: &HostParts,
    desired: &HostDesired,
    errors: &mut HashMap<String, Failure>,
) -> Vec<VolumeObserved> {
    let files = match parts.storage.volumes() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e.chain(), "cannot list volumes");
            return vec![];
        }
    };
    if files.is_empty() {
        return vec![];
    }
    // Where each volume is plugged in: (vm id, domain, its disk, domain running).
    let mut plugged: HashMap<String, (String, String, VolumeSpec, bool)> = HashMap::new();
    for d in parts.hypervisor.list().unwrap_or_default() {
        for v in parts.hypervisor.volumes(&d.name).unwrap_or_default() {
            plugged.insert(
                v.id.clone(),
                (d.vm_id.clone(), d.name.clone(), v, d.state.is_active()),
            );
        }
    }
    let sizes: HashMap<&str, u64> = files.iter().map(|(id, s, _)| (id.as_str(), *s)).collect();
    for v in &desired.volumes {
        let Some(&have) = sizes.get(v.id.as_str()) else {
            continue;
        };
        if have >= v.size_mib {
            continue;
        }
        let grown = match plugged.get(&v.id) {
            Some((_, domain, disk, true)) => {
                parts.hypervisor.grow_disk(domain, &disk.target, v.size_mib)
            }
            _ => parts.storage.grow_volume(&v.id, v.size_mib),
        };
        if let Err(e) = grown {
            tracing::warn!(volume = %v.name, error = %e.chain(), "cannot grow the volume");
            errors.insert(v.id.clone(), e.into());
        }
    }
    let mut gone: HashSet<&str> = HashSet::new();
    for id in &desired.volume_removals {
        if !sizes.contains_key(id.as_str()) {
            continue;
        }
        let removed = match plugged.get(id) {
            Some((_, domain, disk, _)) => parts.hypervisor.detach_volume(domain, disk),
            None => parts.storage.remove_volume(id).map(|()| {
                gone.insert(id.as_str());
            }),
        };
        if let Err(e) = removed {
            tracing::warn!(volume = %id, error = %e.chain(), "cannot remove the volume");
            errors.insert(id.clone(), e.into());
        }
    }
    let after: HashMap<String, (u64, u64)> = parts
        .storage
        .volumes()
        .unwrap_or(files)
        .into_iter()
        .map(|(id, size, alloc)| (id, (size, alloc)))
        .collect();
    let mut out: Vec<VolumeObserved> = after
        .into_iter()
        .filter(|(id, _)| !gone.contains(id.as_str()))
        .map(|(id, (size_mib, allocated_mib))| {
            let error = errors.remove(&id);
            VolumeObserved {
                attached_to: plugged.get(&id).map(|p| p.0.clone()),
                size_mib,
                allocated_mib,
                error: error.map(|f| f.message),
                id,
            }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The usual convergence of one VM, and what to report.
fn converge_one(
    parts: &HostParts,
    want: &VmDesired,
    domain: Option<&DomainInfo>,
    mem: &Mutex<Memory>,
    mtus: &HashMap<&str, u32>,
    image_errors: &HashMap<String, String>,
    volume_errors: &Mutex<HashMap<String, Failure>>,
) -> VmObserved {
    let result = match image_errors.get(&want.image_sha256) {
        Some(why) => Err(Failure::text(format!(
            "image not available on this host: {why}"
        ))),
        None => converge_vm(parts, want, domain.cloned(), mem, mtus),
    };
    match result {
        Ok(now) => {
            let state_now = now.as_ref().map(|d| &d.state);
            let mut o = observed(&want.id, observed_state(want, state_now), None);
            o.domain = now.is_some();
            if let Some(d) = &now {
                let (vol, resize) = converge_shape(parts, want, d, mtus);
                lock(volume_errors).extend(vol);
                o.resize_error = resize.map(|f| f.message);
                describe(parts, want, d, &mut o);
            }
            o
        }
        Err(f) => {
            tracing::warn!(vm = %want.name, error = %f.message, chain = ?f.chain, "vm not converged");
            let mut o = observed(&want.id, VmState::Error, Some(f));
            o.domain = domain.is_some();
            o
        }
    }
}

/// What the report says of a VM beyond its state: what it runs with, why its host paused it,
/// whether a run-once guest is done (with its console's end).
fn describe(parts: &HostParts, want: &VmDesired, d: &DomainInfo, o: &mut VmObserved) {
    if d.state.is_active() {
        o.running_with = Some((
            d.vcpus,
            d.memory_mib,
            parts.storage.root_disk_mib(&want.id).unwrap_or(0),
        ));
    }
    if d.paused_on_io_error {
        o.pause_reason = Some(match parts.storage.capacity() {
            Ok((total, free)) if total > 0 => format!(
                "pool {} % used ({free} MiB free of {total} MiB)",
                (total - free.min(total)) * 100 / total
            ),
            _ => "a disk write failed".to_string(),
        });
    }
    if want.run_once {
        o.powered_off = d.powered_off_by_guest;
        if o.powered_off {
            o.state = VmState::Stopped;
        }
        o.console_tail = console_tail(&parts.storage.console_log_path(&want.id), 20);
    }
}

/// The last `lines` lines of a console log (None: no log yet).
fn console_tail(path: &std::path::Path, lines: usize) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).replace('\r', "");
    let all: Vec<&str> = text.lines().collect();
    Some(all[all.len().saturating_sub(lines)..].join("\n"))
}

/// Bring an existing domain's shape to what is wanted: volumes plugged in and out, the root
/// disk grown, vCPUs hot-plugged while it runs; a stopped domain is redefined with its new
/// size (applied at its next start). Returns the volumes that failed, and a resize that failed.
fn converge_shape(
    parts: &HostParts,
    want: &VmDesired,
    d: &DomainInfo,
    mtus: &HashMap<&str, u32>,
) -> (Vec<(String, Failure)>, Option<Failure>) {
    let hv = &parts.hypervisor;
    let mut vol_errors = vec![];
    let mut resize = None;
    let active = d.state.is_active();
    let current = match hv.volumes(&want.domain) {
        Ok(v) => v,
        Err(e) => return (vec![], Some(e.into())),
    };
    for c in current
        .iter()
        .filter(|c| !want.volumes.iter().any(|w| w.id == c.id))
    {
        if let Err(e) = hv.detach_volume(&want.domain, c) {
            tracing::warn!(vm = %want.name, volume = %c.id, error = %e.chain(), "cannot unplug the volume");
            vol_errors.push((c.id.clone(), e.into()));
        }
    }
    let specs = volume_specs(parts, want, &current);
    for spec in specs
        .iter()
        .filter(|s| !current.iter().any(|c| c.id == s.id))
    {
        if let Err(e) = hv.attach_volume(&want.domain, spec) {
            tracing::warn!(vm = %want.name, volume = %spec.id, error = %e.chain(), "cannot plug the volume in");
            vol_errors.push((spec.id.clone(), e.into()));
        }
    }
    let disk_now = parts.storage.root_disk_mib(&want.id).unwrap_or(0);
    if disk_now > 0 && want.disk_mib > disk_now {
        let grown = if active {
            hv.grow_disk(&want.domain, "vda", want.disk_mib)
        } else {
            parts.storage.grow_root_disk(&want.id, want.disk_mib)
        };
        if let Err(e) = grown {
            tracing::warn!(vm = %want.name, error = %e.chain(), "cannot grow the root disk");
            resize = Some(e.into());
        }
    }
    if active {
        if want.cpus > d.vcpus && want.cpus <= want.max_cpus.max(want.cpus) {
            // Beyond the domain's maximum libvirt refuses: it applies at the next start.
            if let Err(e) = hv.set_vcpus(&want.domain, want.cpus) {
                tracing::info!(vm = %want.name, error = %e.chain(), "vCPUs apply at the next start");
            }
        }
    } else if d.vcpus != want.cpus || d.memory_mib != want.memory_mib {
        let spec = DomainSpec {
            volumes: specs,
            ..domain_spec(
                parts,
                want,
                parts.storage.root_disk_path(&want.id),
                seed_path(parts, &want.id),
                mtus,
            )
        };
        if let Err(e) = hv.define(&spec) {
            tracing::warn!(vm = %want.name, error = %e.chain(), "cannot apply the new size");
            resize = Some(e.into());
        }
    }
    (vol_errors, resize)
}

/// The seed ISO's path of a VM (next to its root disk).
fn seed_path(parts: &HostParts, vm_id: &str) -> std::path::PathBuf {
    parts
        .storage
        .root_disk_path(vm_id)
        .with_file_name("seed.iso")
}

/// The disks of `want`'s volumes whose files exist: those plugged in keep their device, the
/// others get the first free one (`vdb`…).
fn volume_specs(parts: &HostParts, want: &VmDesired, current: &[VolumeSpec]) -> Vec<VolumeSpec> {
    let mut taken: HashSet<String> = current.iter().map(|c| c.target.clone()).collect();
    // Only volumes whose file is here (it is made before the VMs are converged).
    let present: HashSet<String> = parts
        .storage
        .volumes()
        .unwrap_or_default()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let mut out = vec![];
    for w in &want.volumes {
        if let Some(c) = current.iter().find(|c| c.id == w.id) {
            out.push(c.clone());
            continue;
        }
        if !present.contains(&w.id) {
            continue;
        }
        let path = parts.storage.volume_path(&w.id);
        let Some(target) = (0..24)
            .filter_map(tuchka_host::volume_target)
            .find(|t| !taken.contains(t))
        else {
            continue;
        };
        taken.insert(target.clone());
        out.push(VolumeSpec {
            id: w.id.clone(),
            path,
            target,
        });
    }
    out
}

/// The target's part: prepare, never define or start.
fn incoming(
    parts: &HostParts,
    want: &VmDesired,
    id: &str,
    mode: MigrationMode,
    source_host_id: &str,
    domain: Option<&DomainInfo>,
    image_errors: &HashMap<String, String>,
) -> VmObserved {
    let status = |status: MigrationStatus, error: Option<Failure>| MigrationObserved {
        error_chain: error.as_ref().map(|f| f.chain.clone()).unwrap_or_default(),
        error: error.map(|f| f.message),
        ..MigrationObserved::new(id, status)
    };
    let prepared = match image_errors.get(&want.image_sha256) {
        Some(why) => Err(Failure::text(format!(
            "image not available on this host: {why}"
        ))),
        None => (|| -> Result<(), HostError> {
            match mode {
                // The overlay the copy writes into: same backing image, same virtual size.
                MigrationMode::Live => {
                    parts
                        .storage
                        .ensure_root_disk(&want.id, &want.image_sha256, want.disk_mib)?;
                    // Its volumes: empty, of their size; the copy fills them.
                    for v in &want.volumes {
                        parts.storage.ensure_volume(&v.id, v.size_mib)?;
                    }
                    parts.storage.ensure_seed(
                        &want.id,
                        &want.name,
                        want.user_data.as_deref(),
                        &want.ssh_keys,
                    )?;
                }
                // The disks arrive whole through the channel: the root disk into the VM's
                // directory, each volume over an empty one of its size.
                MigrationMode::Cold => {
                    parts.storage.ensure_vm_dir(&want.id)?;
                    for v in &want.volumes {
                        parts.storage.ensure_volume(&v.id, v.size_mib)?;
                    }
                }
            }
            Ok(())
        })()
        .map_err(Failure::from)
        .and_then(|()| {
            parts
                .mover
                .expect_incoming(&IncomingJob {
                    id: id.to_string(),
                    mode,
                    source_host_id: source_host_id.to_string(),
                    vm_id: want.id.clone(),
                    files: match mode {
                        MigrationMode::Live => vec![],
                        MigrationMode::Cold => cold_files(&*parts.storage, want),
                    },
                })
                .map_err(|e| Failure::text(format!("cannot admit the migration: {e}")))
        }),
    };
    let state = match domain {
        Some(d) => observed_state(want, Some(&d.state)),
        None => VmState::Starting,
    };
    let mut o = observed(&want.id, state, None);
    o.domain = domain.is_some();
    o.migration = Some(match prepared {
        Ok(()) => status(MigrationStatus::Prepared, None),
        Err(f) => {
            tracing::warn!(vm = %want.name, migration = %id, error = %f.message, "cannot prepare for the incoming VM");
            status(MigrationStatus::Failed, Some(f))
        }
    });
    o
}

/// The source's part: start, watch or abort the job; never re-create a domain that left.
fn outgoing(
    parts: &HostParts,
    want: &VmDesired,
    job: &OutgoingJob,
    go: bool,
    abort: bool,
    domain: Option<&DomainInfo>,
) -> VmObserved {
    let known = parts.mover.status(&job.id);
    match outgoing_action(
        go,
        abort,
        known.as_ref().map(|m| m.status),
        domain.is_some(),
    ) {
        OutgoingAction::Begin => {
            tracing::info!(vm = %want.name, migration = %job.id, to = %job.target.name, mode = %job.mode, "moving");
            if let Err(e) = parts.mover.begin(job) {
                tracing::warn!(vm = %want.name, migration = %job.id, error = %e, "cannot start the migration");
            }
        }
        OutgoingAction::Abort => {
            tracing::info!(vm = %want.name, migration = %job.id, "aborting the migration");
            parts.mover.abort(&job.id);
        }
        OutgoingAction::None => {}
    }
    let state = match domain {
        Some(d) => observed_state(want, Some(&d.state)),
        None => VmState::Starting,
    };
    let mut o = observed(&want.id, state, None);
    o.domain = domain.is_some();
    o.migration = Some(
        parts
            .mover
            .status(&job.id)
            .unwrap_or_else(|| MigrationObserved::new(&job.id, MigrationStatus::Idle)),
    );
    o
}

fn forget(mem: &mut Memory, id: &str) {
    mem.shutdown_since.remove(id);
    mem.shutdown_last.remove(id);
    mem.reboot_done.remove(id);
    mem.resume_done.remove(id);
}

/// Take the next action for one VM (several in a row while they are quick: create → start →
/// suspend). Returns the domain afterwards.
fn converge_vm(
    parts: &HostParts,
    want: &VmDesired,
    domain: Option<DomainInfo>,
    mem: &Mutex<Memory>,
    mtus: &HashMap<&str, u32>,
) -> Result<Option<DomainInfo>, Failure> {
    if want.power != tuchka_api::PowerState::Stopped {
        let mut m = lock(mem);
        m.shutdown_since.remove(&want.id);
        m.shutdown_last.remove(&want.id);
    }
    let mut domain = domain;
    for _ in 0..4 {
        let known = lock(mem).vm(&want.id, domain.as_ref());
        let action = next_action(want, domain.as_ref().map(|d| &d.state), &known);
        if action == Action::None {
            break;
        }
        apply(parts, want, action, mem, mtus)?;
        // Only this VM's domain: a listing of all after every action is O(N²) in a busy pass.
        domain = parts
            .hypervisor
            .lookup(&want.domain)?
            .filter(|d| d.vm_id == want.id);
        if matches!(action, Action::Shutdown | Action::Reboot) {
            break; // the guest acts on its own time
        }
    }
    Ok(domain)
}

/// Workers per reconcile pass: enough to start a group of ten at once, as bare `virsh create`
/// processes would (the machine's floor); libvirt and qemu, not the agent, are the limit.
const PARALLEL: usize = 16;

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
        Action::Resume => {
            hv.resume(&want.domain)?;
            lock(mem)
                .resume_done
                .insert(want.id.clone(), want.resume_seq);
            Ok(())
        }
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

/// The domain spec of `want` on this host.
pub fn domain_spec(
    parts: &HostParts,
    want: &VmDesired,
    root_disk: std::path::PathBuf,
    seed_iso: std::path::PathBuf,
    mtus: &HashMap<&str, u32>,
) -> DomainSpec {
    DomainSpec {
        name: want.domain.clone(),
        vm_id: want.id.clone(),
        cloud_id: parts.cloud_id.clone(),
        accel: parts.accel,
        vcpus: want.cpus,
        max_vcpus: want.max_cpus.max(want.cpus),
        memory_mib: want.memory_mib,
        root_disk,
        seed_iso,
        console_log: parts.storage.console_log_path(&want.id),
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
        volumes: volume_specs(parts, want, &[]),
    }
}

/// Disk, seed and definition of a new VM; the definition is undone if a later step fails. A
/// disk that was there before (it arrived by migration, or survived a failed start) is kept.
fn create(parts: &HostParts, want: &VmDesired, mtus: &HashMap<&str, u32>) -> Result<(), HostError> {
    let st = &parts.storage;
    let had_disk = st.root_disk_path(&want.id).exists();
    let result = (|| {
        let root_disk = st.ensure_root_disk(&want.id, &want.image_sha256, want.disk_mib)?;
        let seed_iso = st.ensure_seed(
            &want.id,
            &want.name,
            want.user_data.as_deref(),
            &want.ssh_keys,
        )?;
        parts
            .hypervisor
            .define(&domain_spec(parts, want, root_disk, seed_iso, mtus))
    })();
    if result.is_err() {
        let _ = parts.hypervisor.undefine(&want.domain);
        if !had_disk {
            let _ = st.remove_vm(&want.id);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mover::FakeMover;
    use tuchka_api::agent::{NetworkDesired, NicDesired, PeerHost, VmRemoval};
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
        mover: Arc<FakeMover>,
        parts: HostParts,
        _dir: tempfile::TempDir,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Arc::new(FakeHypervisor::new(CLOUD));
        let st = Arc::new(FakeStorage::new(dir.path()).expect("fake storage"));
        let dp = Arc::new(FakeDataplane::new());
        let mover = Arc::new(FakeMover::default());
        st.add_image(IMG, 64);
        let parts = HostParts {
            hypervisor: hv.clone(),
            storage: st.clone(),
            dataplane: dp.clone(),
            mover: mover.clone(),
            accel: Accel::Tcg,
            cloud_id: CLOUD.into(),
            channel_port: Some(7481),
            underlay_address: Some("10.250.0.11".parse().expect("ip")),
            controller: Some("10.250.0.1:7480".parse().expect("addr")),
        };
        Host {
            hv,
            st,
            dp,
            mover,
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
            migration: None,
            max_cpus: 1,
            volumes: vec![],
            resume_seq: 0,
            run_once: false,
        }
    }

    fn desired(vms: Vec<VmDesired>) -> HostDesired {
        HostDesired {
            generation: 1,
            cloud_id: CLOUD.into(),
            vms,
            networks: vec![net()],
            images: vec![IMG.into()],
            removals: vec![],
            peers: vec![peer()],
            volumes: vec![],
            volume_removals: vec![],
            captures: vec![],
        }
    }

    fn peer() -> PeerHost {
        PeerHost {
            host_id: "h2".into(),
            name: "h2".into(),
            address: "10.250.0.12".into(),
            channel_port: 7481,
        }
    }

    fn pass(h: &Host, d: &HostDesired, mem: &mut Memory) -> PassResult {
        reconcile(&h.parts, d, mem, &HashMap::new(), &HashMap::new())
    }

    fn state_of(r: &PassResult) -> VmState {
        r.report
            .vms
            .iter()
            .find(|v| v.id == VM)
            .map(|v| v.state)
            .expect("vm reported")
    }

    fn removal() -> VmRemoval {
        VmRemoval {
            id: VM.into(),
            name: "web-0".into(),
            domain: "tk-0f2a6c1e-web-0".into(),
        }
    }

    #[test]
    fn a_pass_lists_the_domains_once_however_many_vms_it_starts() {
        let h = host();
        let mut mem = Memory::default();
        let vms: Vec<VmDesired> = (0..40)
            .map(|i| {
                let mut v = vm(PowerState::Running);
                v.id = format!("3b0e8a52-5a1f-4c55-9a0e-1d2c3b4a{i:04}");
                v.name = format!("web-{i}");
                v.domain = format!("tk-0f2a6c1e-web-{i}");
                v.nics[0].mac = format!("52:54:00:aa:{:02x}:{:02x}", i / 256, i % 256);
                v.nics[0].tap = format!("tkvaa{:02x}{:02x}", i / 256, i % 256);
                v
            })
            .collect();
        let r = pass(&h, &desired(vms), &mut mem);
        assert!(r.report.vms.iter().all(|v| v.state == VmState::Running));
        // One listing for the pass; after each action only that VM's domain is looked up.
        assert_eq!(h.hv.count("list"), 1, "{:?}", h.hv.calls());
        assert_eq!(h.hv.count("start"), 40);
        assert!(h.hv.count("lookup") <= 40 * 4, "{}", h.hv.count("lookup"));
    }

    #[test]
    fn when_libvirt_cannot_list_its_vms_are_unknown_not_failed_and_the_next_pass_sees_them() {
        let h = host();
        let mut mem = Memory::default();
        let d = desired(vec![vm(PowerState::Running)]);
        assert_eq!(pass(&h, &d, &mut mem).report.vms[0].state, VmState::Running);
        h.hv.fail_once("list");
        let r = pass(&h, &d, &mut mem);
        assert_eq!(
            r.report.vms[0].state,
            VmState::Unknown,
            "{:?}",
            r.report.vms[0]
        );
        let r = pass(&h, &d, &mut mem);
        assert_eq!(r.report.vms[0].state, VmState::Running);
    }

    #[test]
    fn a_new_vm_gets_network_disk_seed_and_runs() {
        let h = host();
        let mut mem = Memory::default();
        let r = pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        assert_eq!(state_of(&r), VmState::Running);
        assert!(r.report.vms[0].domain);
        assert!(r.settled);
        assert!(h.dp.network("lan").is_some());
        let u = h.dp.underlay().expect("underlay applied");
        assert_eq!(u.channel_port, Some(7481));
        assert_eq!(u.peers, vec!["10.250.0.12".parse::<IpAddr>().expect("ip")]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            u.guarded,
            vec![ip("10.250.0.1"), ip("10.250.0.11")],
            "guests may not reach this host or the controller"
        );
        assert_eq!(
            u.control_ports,
            vec![7480, 7481],
            "the API, the peer's channel"
        );
        let d = h.hv.domain("tk-0f2a6c1e-web-0").expect("defined");
        assert_eq!(d.state, DomainState::Running);
        let storage = h.st.vm(VM).expect("storage");
        assert_eq!(storage.disk_mib, Some(1024));
        assert_eq!(storage.seed.map(|s| s.0), Some("web-0".to_string()));
        assert!(r.report.networks[0].ready);
        // A second pass changes nothing.
        h.hv.take_calls();
        let r = pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        assert_eq!(state_of(&r), VmState::Running);
        assert_eq!(h.hv.count("start") + h.hv.count("define"), 0);
    }

    #[test]
    fn a_failed_define_is_reported_with_its_cause_and_leaves_no_storage() {
        let h = host();
        h.hv.fail("define");
        let r = pass(
            &h,
            &desired(vec![vm(PowerState::Running)]),
            &mut Memory::default(),
        );
        assert_eq!(state_of(&r), VmState::Error);
        let o = &r.report.vms[0];
        assert!(
            o.error.as_deref().unwrap_or_default().contains("define"),
            "{o:?}"
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
            &HashMap::new(),
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
    fn what_is_not_desired_is_an_orphan_and_stays_until_named_for_removal() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        // A restored database (or a renamed host) no longer lists the VM: nothing is destroyed.
        let mut empty = desired(vec![]);
        empty.networks.clear();
        empty.images.clear();
        let r = pass(&h, &empty, &mut mem);
        assert!(r.report.vms.is_empty(), "{:?}", r.report.vms);
        assert_eq!(
            h.hv.domain("tk-0f2a6c1e-web-0").map(|d| d.state),
            Some(DomainState::Running),
            "the VM keeps running"
        );
        assert!(h.st.vm(VM).is_some(), "its disk stays");
        assert_eq!(r.report.orphans.len(), 1, "{:?}", r.report.orphans);
        assert_eq!(r.report.orphans[0].kind, OrphanKind::Domain);
        assert_eq!(r.report.orphans[0].vm_id, VM);
        assert!(
            h.st.images().contains(IMG),
            "the image backing the orphan's disk is kept"
        );
        // Named for removal: now it goes, domain and directory.
        let mut remove = empty.clone();
        remove.removals = vec![removal()];
        let r = pass(&h, &remove, &mut mem);
        assert!(
            r.report.vms.is_empty() && r.report.orphans.is_empty(),
            "{:?}",
            r.report
        );
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none());
        assert!(h.st.vm(VM).is_none());
        assert!(h.dp.network("lan").is_none());
    }

    #[test]
    fn a_removal_matches_the_vm_id_not_just_the_domain_name() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        // A removal for another VM that had the same name must not touch this one.
        let mut d = desired(vec![vm(PowerState::Running)]);
        d.removals = vec![VmRemoval {
            id: "0000aaaa-0000-4000-8000-000000000000".into(),
            ..removal()
        }];
        pass(&h, &d, &mut mem);
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_some());
        assert_eq!(h.hv.count("undefine"), 0);
    }

    #[test]
    fn a_failed_removal_is_reported_with_its_cause_and_retried() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        h.hv.fail_once("undefine");
        let mut d = desired(vec![]);
        d.removals = vec![removal()];
        let r = pass(&h, &d, &mut mem);
        let o = r.report.vms.iter().find(|v| v.id == VM).expect("reported");
        assert!(o.error.is_some() && o.domain, "{o:?}");
        assert!(!r.settled);
        let r = pass(&h, &d, &mut mem);
        assert!(r.report.vms.is_empty());
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none());
    }

    #[test]
    fn stop_waits_for_acpi_then_forces_after_the_timeout() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        h.hv.set_ignore_acpi(true);
        let mut stop = vm(PowerState::Stopped);
        stop.stop_timeout_s = 0;
        let r = pass(&h, &desired(vec![stop.clone()]), &mut mem);
        assert_eq!(state_of(&r), VmState::Stopping);
        assert!(!r.settled);
        assert_eq!(h.hv.count("shutdown"), 1);
        let r = pass(&h, &desired(vec![stop]), &mut mem);
        assert_eq!(state_of(&r), VmState::Stopped);
        assert_eq!(h.hv.count("destroy"), 1);
    }

    #[test]
    fn a_domain_deleted_behind_our_back_comes_back() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        h.hv.undefine("tk-0f2a6c1e-web-0").expect("undefine");
        let r = pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        assert_eq!(state_of(&r), VmState::Running);
        assert_eq!(
            h.hv.domain("tk-0f2a6c1e-web-0").map(|d| d.state),
            Some(DomainState::Running)
        );
    }

    fn incoming_vm(mode: MigrationMode) -> VmDesired {
        let mut v = vm(PowerState::Running);
        v.migration = Some(VmMigrationDesired::Incoming {
            id: "m1".into(),
            mode,
            source: peer(),
        });
        v
    }

    fn outgoing_vm(go: bool, abort: bool) -> VmDesired {
        let mut v = vm(PowerState::Running);
        v.migration = Some(VmMigrationDesired::Outgoing {
            id: "m1".into(),
            mode: MigrationMode::Live,
            target: peer(),
            target_pool: "/var/lib/tuchka/pool".into(),
            go,
            abort,
        });
        v
    }

    #[test]
    fn the_target_prepares_disk_and_seed_but_never_defines_the_vm() {
        let h = host();
        let mut mem = Memory::default();
        let r = pass(
            &h,
            &desired(vec![incoming_vm(MigrationMode::Live)]),
            &mut mem,
        );
        let o = &r.report.vms[0];
        assert_eq!(
            o.migration.as_ref().map(|m| m.status),
            Some(MigrationStatus::Prepared)
        );
        assert!(!o.domain);
        let st = h.st.vm(VM).expect("prepared");
        assert_eq!(st.disk_mib, Some(1024), "an overlay of the same size");
        assert!(st.seed.is_some());
        assert_eq!(h.hv.count("define"), 0, "libvirt brings the domain");
        assert_eq!(h.mover.incoming().len(), 1, "its streams are admitted");
        // Once the migration is over, nothing more is admitted.
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        assert!(h.mover.incoming().is_empty());
        assert!(h.dp.network("lan").is_some());
        // Preparing fails (e.g. the disk cannot be made): reported with the cause.
        let h = host();
        h.st.fail("ensure_root_disk");
        let r = pass(
            &h,
            &desired(vec![incoming_vm(MigrationMode::Live)]),
            &mut mem,
        );
        let m = r.report.vms[0].migration.clone().expect("migration");
        assert_eq!(m.status, MigrationStatus::Failed);
        assert!(m.error.unwrap_or_default().contains("injected"));
        // Cold: only the directory the disk arrives in.
        let h = host();
        let r = pass(
            &h,
            &desired(vec![incoming_vm(MigrationMode::Cold)]),
            &mut mem,
        );
        assert_eq!(
            r.report.vms[0].migration.as_ref().map(|m| m.status),
            Some(MigrationStatus::Prepared)
        );
        assert_eq!(h.st.vm(VM).and_then(|v| v.disk_mib), None);
    }

    #[test]
    fn the_source_moves_when_told_aborts_when_told_and_never_recreates_a_domain_that_left() {
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        // Preparing: nothing happens yet.
        let r = pass(&h, &desired(vec![outgoing_vm(false, false)]), &mut mem);
        assert!(h.mover.calls().is_empty());
        assert_eq!(
            r.report.vms[0].migration.as_ref().map(|m| m.status),
            Some(MigrationStatus::Idle)
        );
        // Go: the job starts once.
        let r = pass(&h, &desired(vec![outgoing_vm(true, false)]), &mut mem);
        assert_eq!(h.mover.calls(), vec!["begin m1"]);
        assert_eq!(
            r.report.vms[0].migration.as_ref().map(|m| m.status),
            Some(MigrationStatus::Running)
        );
        pass(&h, &desired(vec![outgoing_vm(true, false)]), &mut mem);
        assert_eq!(h.mover.calls().len(), 1, "never begun twice");
        // Abort: the running job is cut; the VM stays.
        let r = pass(&h, &desired(vec![outgoing_vm(true, true)]), &mut mem);
        assert!(h.mover.calls().contains(&"abort m1".to_string()));
        let o = &r.report.vms[0];
        assert_eq!(
            o.migration.as_ref().map(|m| m.status),
            Some(MigrationStatus::Failed)
        );
        assert!(o.domain);
        // A fresh migration that completes: the domain leaves; the pass must not re-create it.
        let h = host();
        let mut mem = Memory::default();
        pass(&h, &desired(vec![vm(PowerState::Running)]), &mut mem);
        pass(&h, &desired(vec![outgoing_vm(true, false)]), &mut mem);
        h.mover.finish("m1", 120);
        h.hv.undefine("tk-0f2a6c1e-web-0")
            .expect("libvirt moved it");
        let r = pass(&h, &desired(vec![outgoing_vm(true, false)]), &mut mem);
        let o = &r.report.vms[0];
        assert!(!o.domain);
        let m = o.migration.clone().expect("migration");
        assert_eq!(
            (m.status, m.downtime_ms),
            (MigrationStatus::Completed, Some(120))
        );
        assert!(h.hv.domain("tk-0f2a6c1e-web-0").is_none(), "not re-created");
        assert_eq!(h.hv.count("define"), 1);
        // The controller gives the VM to the target and names it for removal here.
        let mut d = desired(vec![]);
        d.removals = vec![removal()];
        let r = pass(&h, &d, &mut mem);
        assert!(r.report.vms.is_empty() && r.report.orphans.is_empty());
        assert!(h.st.vm(VM).is_none(), "the source's copy is gone");
        assert!(h.mover.calls().contains(&"forget m1".to_string()));
    }
}
