//! The controller's side of the scheduler: turn the state into the pure scheduler's inputs
//! ([`tuchka_core::placement`]) for a new group, a scale-up, and a migration target.

use std::collections::BTreeMap;

use tuchka_core::placement::{self, GroupRequest, HostCapacity, Placement};
use tuchka_store::{GroupRow, HostRow};

use crate::error::{Error, Result};
use crate::metrics::Purpose;
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// What the scheduler knows of host `h`; `reserve`: the share of its pool kept free.
pub fn capacity(s: &Snapshot, h: &HostRow, reserve: f64) -> HostCapacity {
    let u = s.usage(&h.id);
    HostCapacity {
        id: h.id.clone(),
        name: h.name.clone(),
        up: s.is_up(h) && !h.revoked,
        draining: h.draining,
        cpus: h.facts.cpus,
        cpus_used: u.cpus,
        memory_mib: h.facts.memory_mib,
        memory_used_mib: u.memory_mib,
        disk_mib: h.facts.disk_mib,
        disk_provisioned_mib: u.disk_mib,
        disk_free_mib: (h.facts.disk_mib > 0).then_some(h.facts.disk_free_mib),
        disk_reserve_mib: reserve_mib(h.facts.disk_mib, reserve),
        cached_images: h.cached_images.clone(),
    }
}

/// The part of a pool of `pool_mib` kept free, MiB.
pub fn reserve_mib(pool_mib: u64, reserve: f64) -> u64 {
    (pool_mib as f64 * reserve.clamp(0.0, 1.0)).ceil() as u64
}

/// Every host's capacity.
pub fn capacities(s: &Snapshot, reserve: f64) -> Vec<HostCapacity> {
    s.hosts.iter().map(|h| capacity(s, h, reserve)).collect()
}

/// The request for `count` more VMs of group `g`, given where its live VMs are (`except`: a VM
/// not to count, the one being moved).
pub fn request(s: &Snapshot, g: &GroupRow, count: u32, except: Option<&str>) -> GroupRequest {
    let mut existing: BTreeMap<String, u32> = BTreeMap::new();
    for v in s
        .vms_of_group(&g.name)
        .filter(|v| !v.deleting && Some(v.id.as_str()) != except)
    {
        *existing.entry(v.host_id.clone()).or_default() += 1;
    }
    // A VM on its way to a host already counts there.
    for m in &s.migrations {
        if Some(m.vm_id.as_str()) != except
            && s.vms.iter().any(|v| v.id == m.vm_id && v.group == g.name)
        {
            *existing.entry(m.target_host.clone()).or_default() += 1;
        }
    }
    GroupRequest {
        group: g.name.clone(),
        count,
        cpus: g.cpus,
        memory_mib: g.memory_mib,
        disk_mib: g.disk_mib,
        image_sha256: g.image_sha256.clone(),
        image_mib: s
            .images
            .iter()
            .find(|i| i.sha256 == g.image_sha256)
            .map(|i| i.stored_size.div_ceil(1 << 20))
            .unwrap_or(0),
        volume_mib: g.volume_size_mib.unwrap_or(0),
        anti_affinity: g.anti_affinity,
        existing,
        policy: g.placement,
    }
}

/// Place `count` new VMs of group `g`, all or none.
pub fn place(ctl: &Controller, s: &Snapshot, g: &GroupRow, count: u32) -> Result<Vec<Placement>> {
    let placed = placement::place_group(
        &capacities(s, ctl.config().disk_reserve),
        &request(s, g, count, None),
        &ctl.config().ratios,
    );
    match &placed {
        Ok(p) => ctl.metrics().placed(Purpose::Group, p.len()),
        Err(_) => ctl.metrics().refused(Purpose::Group),
    }
    placed.map_err(|e| Error::conflict("PlacementFailed", e.to_string()))
}

/// A target for VM `vm_id` of group `g` now on host `source`: the same filters as placement
/// (up, not draining, room under the overcommit ratios, anti-affinity of the group kept), minus
/// the source and hosts without a migration channel; `only`: the host the user asked for.
pub fn migration_target(
    ctl: &Controller,
    s: &Snapshot,
    g: &GroupRow,
    vm_id: &str,
    source: &str,
    only: Option<&str>,
) -> std::result::Result<Placement, String> {
    let mut reasons = vec![];
    let mut candidates = vec![];
    for h in &s.hosts {
        if h.id == source {
            continue;
        }
        if only.is_some_and(|o| o != h.id) {
            continue;
        }
        if h.facts.channel_port == 0 {
            reasons.push(format!("{}: no migration channel (agent too old?)", h.name));
            continue;
        }
        candidates.push(capacity(s, h, ctl.config().disk_reserve));
    }
    if candidates.is_empty() && reasons.is_empty() {
        ctl.metrics().refused(Purpose::Migration);
        return Err("there is no other host".into());
    }
    let mut req = request(s, g, 1, Some(vm_id));
    // The VM as it is: resized, and with the volumes that move with it.
    if let Some(v) = s.vms.iter().find(|v| v.id == vm_id) {
        let size = crate::snapshot::size_of(v, g);
        req.cpus = size.cpus;
        req.memory_mib = size.memory_mib;
        req.disk_mib = size.disk_mib;
        req.volume_mib = s.vm_volumes(vm_id).iter().map(|x| x.size_mib).sum();
    }
    match placement::place_group(&candidates, &req, &ctl.config().ratios) {
        Ok(mut p) => {
            ctl.metrics().placed(Purpose::Migration, 1);
            p.pop().ok_or_else(|| "no placement".to_string())
        }
        Err(e) => {
            ctl.metrics().refused(Purpose::Migration);
            reasons.insert(0, e.detail);
            Err(reasons
                .into_iter()
                .filter(|r| !r.is_empty())
                .collect::<Vec<_>>()
                .join("; "))
        }
    }
}
