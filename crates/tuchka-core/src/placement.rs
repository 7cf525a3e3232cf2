//! The scheduler: place a whole group of identical VMs on hosts, or explain why not.
//!
//! Filters (a host must pass all): it is up and not draining; it has free vCPU, memory and disk
//! for the VM under the overcommit ratios (disk: the virtual sizes of root disks and volumes
//! within the provisioning ratio of the pool); its pool has the real space the VM takes at once
//! (the image when the host does not cache it yet) beyond the reserve kept free; with
//! anti-affinity it holds no other VM of the group.
//! Weights pick among the hosts that pass: `spread` prefers the host with the most free memory
//! (then fewest VMs of the group), `pack` the one with the least; a host that already caches the
//! image wins ties. VMs are placed one at a time on an updated copy of the capacities, so a
//! group either fits as a whole or nothing is placed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use thiserror::Error;
use tuchka_api::PlacementPolicy;

/// What the scheduler knows of a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCapacity {
    /// Host id.
    pub id: String,
    /// Host name (for messages).
    pub name: String,
    /// Reporting and accepting VMs.
    pub up: bool,
    /// Draining: no new placements.
    pub draining: bool,
    /// Logical CPUs.
    pub cpus: u32,
    /// vCPUs already given to VMs.
    pub cpus_used: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Memory already given to VMs, MiB.
    pub memory_used_mib: u64,
    /// Storage pool size, MiB.
    pub disk_mib: u64,
    /// Root disk and volume sizes already provisioned, MiB.
    pub disk_provisioned_mib: u64,
    /// Free space its pool reports, MiB (None: not known; no real-space check).
    pub disk_free_mib: Option<u64>,
    /// Space of its pool never placed on, MiB (`serve --disk-reserve`).
    pub disk_reserve_mib: u64,
    /// Images in the host's cache (sha256).
    pub cached_images: Vec<String>,
}

/// Overcommit ratios: how much of a resource may be promised relative to what exists.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// vCPUs per logical CPU.
    pub cpu: f64,
    /// Memory promised per MiB of memory (after `memory_reserved_mib`).
    pub memory: f64,
    /// Provisioned root disk per MiB of pool (disks are thin overlays).
    pub disk: f64,
    /// Memory kept for the host itself, MiB.
    pub memory_reserved_mib: u64,
}

impl Default for Ratios {
    fn default() -> Self {
        Ratios {
            cpu: 4.0,
            memory: 1.0,
            disk: 2.0,
            memory_reserved_mib: 512,
        }
    }
}

/// What each VM of the group needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRequest {
    /// Group name (for messages).
    pub group: String,
    /// Number of VMs to place.
    pub count: u32,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Memory per VM, MiB.
    pub memory_mib: u64,
    /// Root disk per VM, MiB.
    pub disk_mib: u64,
    /// Image sha256 (cached-image weight).
    pub image_sha256: String,
    /// The image's stored size, MiB: what a host that does not cache it must fetch.
    pub image_mib: u64,
    /// A data volume per VM (virtual size), MiB; 0: none.
    pub volume_mib: u64,
    /// Never two VMs of the group on one host.
    pub anti_affinity: bool,
    /// Host ids that already hold VMs of this group (scale up), with how many.
    pub existing: BTreeMap<String, u32>,
    /// Spread or pack.
    pub policy: PlacementPolicy,
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Chosen host id.
    pub host_id: String,
    /// Why, for `vm show`.
    pub reason: String,
}

/// The group does not fit.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("group {group:?} cannot be placed: {placed} of {count} VMs fit; {detail}")]
pub struct PlacementError {
    /// Group name.
    pub group: String,
    /// VMs wanted.
    pub count: u32,
    /// VMs that fit before the first failure.
    pub placed: u32,
    /// Per-host reasons, e.g. `h1: memory: 1024 MiB free, 4096 MiB needed`.
    pub detail: String,
}

/// Why `host` cannot take one more VM of `req`, or None if it can.
pub fn refuse_reason(
    host: &HostCapacity,
    req: &GroupRequest,
    ratios: &Ratios,
    in_group: u32,
) -> Option<String> {
    if !host.up {
        return Some("host is down".into());
    }
    if host.draining {
        return Some("host is draining".into());
    }
    let cpu_cap = (host.cpus as f64 * ratios.cpu).floor() as u64;
    let cpu_free = cpu_cap.saturating_sub(host.cpus_used as u64);
    if (req.cpus as u64) > cpu_free {
        return Some(format!(
            "vCPU: {cpu_free} free of {cpu_cap} ({} CPUs x {} overcommit), {} needed",
            host.cpus, ratios.cpu, req.cpus
        ));
    }
    let mem_cap =
        (host.memory_mib.saturating_sub(ratios.memory_reserved_mib) as f64 * ratios.memory) as u64;
    let mem_free = mem_cap.saturating_sub(host.memory_used_mib);
    if req.memory_mib > mem_free {
        return Some(format!(
            "memory: {mem_free} MiB free of {mem_cap} MiB, {} MiB needed",
            req.memory_mib
        ));
    }
    let disk_cap = (host.disk_mib as f64 * ratios.disk) as u64;
    let disk_free = disk_cap.saturating_sub(host.disk_provisioned_mib);
    let provision = req.disk_mib + req.volume_mib;
    if provision > disk_free {
        return Some(format!(
            "disk: {disk_free} MiB free to provision of {disk_cap} MiB ({} MiB pool x {} overcommit, {} MiB provisioned), {provision} MiB needed",
            host.disk_mib, ratios.disk, host.disk_provisioned_mib
        ));
    }
    if let Some(free) = host.disk_free_mib {
        let usable = free.saturating_sub(host.disk_reserve_mib);
        let now = space_now(host, req);
        if now > usable {
            return Some(format!(
                "disk space: {free} MiB free of {} MiB, {} MiB kept in reserve, {now} MiB needed now",
                host.disk_mib, host.disk_reserve_mib
            ));
        }
    }
    if req.anti_affinity && in_group > 0 {
        return Some(format!(
            "anti-affinity: already holds a VM of group {:?}",
            req.group
        ));
    }
    None
}

/// Real space a new VM takes on `host` at once, MiB: the image when the host does not cache
/// it, plus its overlay, seed and volume's metadata (a thin disk grows later).
pub fn space_now(host: &HostCapacity, req: &GroupRequest) -> u64 {
    let image = if host.cached_images.contains(&req.image_sha256) {
        0
    } else {
        req.image_mib
    };
    image + NEW_VM_MIB
}

/// What a new VM's overlay, seed and volume headers take at first, MiB.
pub const NEW_VM_MIB: u64 = 2;

/// Place all `req.count` VMs, or none.
pub fn place_group(
    hosts: &[HostCapacity],
    req: &GroupRequest,
    ratios: &Ratios,
) -> Result<Vec<Placement>, PlacementError> {
    let mut hosts: Vec<HostCapacity> = hosts.to_vec();
    let mut in_group: Vec<u32> = hosts
        .iter()
        .map(|h| req.existing.get(&h.id).copied().unwrap_or(0))
        .collect();
    let mut out = Vec::with_capacity(req.count as usize);
    for placed in 0..req.count {
        let mut reasons = BTreeMap::new();
        let mut best: Option<(usize, (i64, i64, i64))> = None;
        for (i, h) in hosts.iter().enumerate() {
            if let Some(why) = refuse_reason(h, req, ratios, in_group[i]) {
                reasons.insert(h.name.clone(), why);
                continue;
            }
            let free_mem = h.memory_mib as i64 - h.memory_used_mib as i64;
            let cached = i64::from(h.cached_images.contains(&req.image_sha256));
            let score = match req.policy {
                PlacementPolicy::Spread => (free_mem, -(in_group[i] as i64), cached),
                PlacementPolicy::Pack => (-free_mem, in_group[i] as i64, cached),
            };
            if best.as_ref().is_none_or(|(_, s)| score > *s) {
                best = Some((i, score));
            }
        }
        let Some((i, _)) = best else {
            let mut detail = String::new();
            if hosts.is_empty() {
                detail.push_str("there are no hosts (is an agent running? see: tuchka host list)");
            }
            for (n, (name, why)) in reasons.iter().enumerate() {
                let _ = write!(detail, "{}{name}: {why}", if n > 0 { "; " } else { "" });
            }
            return Err(PlacementError {
                group: req.group.clone(),
                count: req.count,
                placed,
                detail,
            });
        };
        let h = &mut hosts[i];
        let candidates = in_group.len() - reasons.len();
        let reason = format!(
            "{}: {} of {} hosts passed the filters (up, not draining, vCPU/memory/disk{}); {} MiB memory free{}",
            req.policy,
            candidates,
            in_group.len(),
            if req.anti_affinity { ", anti-affinity" } else { "" },
            h.memory_mib.saturating_sub(h.memory_used_mib),
            if h.cached_images.contains(&req.image_sha256) { ", image cached" } else { "" },
        );
        let now = space_now(h, req);
        h.cpus_used += req.cpus;
        h.memory_used_mib += req.memory_mib;
        h.disk_provisioned_mib += req.disk_mib + req.volume_mib;
        h.disk_free_mib = h.disk_free_mib.map(|f| f.saturating_sub(now));
        if !h.cached_images.contains(&req.image_sha256) {
            h.cached_images.push(req.image_sha256.clone());
        }
        in_group[i] += 1;
        out.push(Placement {
            host_id: h.id.clone(),
            reason,
        });
    }
    Ok(out)
}

/// Why `host` cannot take a new volume of `size_mib`, or None if it can: it must be up and
/// not draining, within the provisioning ratio, and have the real space for its header.
pub fn volume_refusal(host: &HostCapacity, size_mib: u64, ratios: &Ratios) -> Option<String> {
    if !host.up {
        return Some("host is down".into());
    }
    if host.draining {
        return Some("host is draining".into());
    }
    let disk_cap = (host.disk_mib as f64 * ratios.disk) as u64;
    let disk_free = disk_cap.saturating_sub(host.disk_provisioned_mib);
    if size_mib > disk_free {
        return Some(format!(
            "disk: {disk_free} MiB free to provision of {disk_cap} MiB ({} MiB pool x {} overcommit, {} MiB provisioned), {size_mib} MiB needed",
            host.disk_mib, ratios.disk, host.disk_provisioned_mib
        ));
    }
    if let Some(free) = host.disk_free_mib {
        if NEW_VM_MIB > free.saturating_sub(host.disk_reserve_mib) {
            return Some(format!(
                "disk space: {free} MiB free of {} MiB, {} MiB kept in reserve, {NEW_VM_MIB} MiB needed now",
                host.disk_mib, host.disk_reserve_mib
            ));
        }
    }
    None
}

/// The host for a new volume of `size_mib` among `hosts`: the one with the most real free
/// space above its reserve. The error lists every host with its reason.
pub fn place_volume(
    hosts: &[HostCapacity],
    size_mib: u64,
    ratios: &Ratios,
) -> Result<Placement, String> {
    let mut detail = String::new();
    let mut best: Option<(&HostCapacity, u64)> = None;
    for h in hosts {
        match volume_refusal(h, size_mib, ratios) {
            Some(why) => {
                let _ = write!(
                    detail,
                    "{}{}: {why}",
                    if detail.is_empty() { "" } else { "; " },
                    h.name
                );
            }
            None => {
                let room = h
                    .disk_free_mib
                    .unwrap_or(h.disk_mib)
                    .saturating_sub(h.disk_reserve_mib);
                if best.is_none_or(|(b, r)| room > r || (room == r && h.name < b.name)) {
                    best = Some((h, room));
                }
            }
        }
    }
    match best {
        Some((h, room)) => Ok(Placement {
            host_id: h.id.clone(),
            reason: format!("most free space ({room} MiB above the reserve)"),
        }),
        None if hosts.is_empty() => Err("no hosts".into()),
        None => Err(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, mem: u64) -> HostCapacity {
        HostCapacity {
            id: id.into(),
            name: id.into(),
            up: true,
            draining: false,
            cpus: 2,
            cpus_used: 0,
            memory_mib: mem,
            memory_used_mib: 0,
            disk_mib: 100_000,
            disk_provisioned_mib: 0,
            disk_free_mib: None,
            disk_reserve_mib: 0,
            cached_images: vec![],
        }
    }

    fn req(count: u32, mem: u64, policy: PlacementPolicy) -> GroupRequest {
        GroupRequest {
            group: "web".into(),
            count,
            cpus: 1,
            memory_mib: mem,
            disk_mib: 1024,
            image_sha256: "abc".into(),
            image_mib: 0,
            volume_mib: 0,
            anti_affinity: false,
            existing: BTreeMap::new(),
            policy,
        }
    }

    fn count_on(p: &[Placement], id: &str) -> usize {
        p.iter().filter(|x| x.host_id == id).count()
    }

    #[test]
    fn spread_balances_and_pack_fills_first() {
        let hosts = [host("h1", 8192), host("h2", 8192), host("h3", 8192)];
        let p = place_group(
            &hosts,
            &req(6, 256, PlacementPolicy::Spread),
            &Ratios::default(),
        )
        .expect("fits");
        for h in ["h1", "h2", "h3"] {
            assert_eq!(count_on(&p, h), 2, "{p:?}");
        }
        let p = place_group(
            &hosts,
            &req(6, 256, PlacementPolicy::Pack),
            &Ratios::default(),
        )
        .expect("fits");
        assert_eq!(count_on(&p, "h1"), 6, "{p:?}");
    }

    #[test]
    fn refuses_whole_group_with_per_host_reasons() {
        let hosts = [host("h1", 2048)];
        let e = place_group(
            &hosts,
            &req(1, 30_000, PlacementPolicy::Spread),
            &Ratios::default(),
        )
        .expect_err("too big");
        assert!(
            e.to_string()
                .contains("h1: memory: 1536 MiB free of 1536 MiB, 30000 MiB needed"),
            "{e}"
        );
        assert_eq!(e.placed, 0);
        let e = place_group(
            &hosts,
            &req(7, 256, PlacementPolicy::Spread),
            &Ratios::default(),
        )
        .expect_err("7th does not fit");
        assert_eq!(e.placed, 6);
    }

    #[test]
    fn anti_affinity_and_down_hosts() {
        let mut hosts = vec![host("h1", 8192), host("h2", 8192), host("h3", 8192)];
        let mut r = req(4, 256, PlacementPolicy::Spread);
        r.anti_affinity = true;
        let e = place_group(&hosts, &r, &Ratios::default()).expect_err("4 on 3");
        assert!(e.to_string().contains("anti-affinity"), "{e}");
        r.count = 3;
        assert!(place_group(&hosts, &r, &Ratios::default()).is_ok());
        hosts[1].up = false;
        hosts[2].draining = true;
        let e = place_group(&hosts, &r, &Ratios::default()).expect_err("only one host usable");
        assert!(
            e.detail.contains("h2: host is down") && e.detail.contains("h3: host is draining"),
            "{e}"
        );
    }

    #[test]
    fn cpu_overcommit_and_cached_image_tie_break() {
        let mut hosts = vec![host("h1", 8192), host("h2", 8192)];
        hosts[1].cached_images = vec!["abc".into()];
        let p = place_group(
            &hosts,
            &req(1, 256, PlacementPolicy::Spread),
            &Ratios::default(),
        )
        .expect("fits");
        assert_eq!(p[0].host_id, "h2");
        assert!(p[0].reason.contains("image cached"));
        let mut r = req(1, 256, PlacementPolicy::Spread);
        r.cpus = 9;
        let e = place_group(&hosts, &r, &Ratios::default()).expect_err("9 vCPU > 2x4");
        assert!(e.detail.contains("vCPU: 8 free"), "{e}");
    }

    #[test]
    fn no_hosts_says_so() {
        let e = place_group(
            &[],
            &req(1, 256, PlacementPolicy::Spread),
            &Ratios::default(),
        )
        .expect_err("none");
        assert!(e.to_string().contains("no hosts"));
    }

    #[test]
    fn real_free_space_above_the_reserve_decides_and_refusals_give_the_figures() {
        let ratios = Ratios {
            cpu: 4.0,
            memory: 1.0,
            disk: 2.0,
            memory_reserved_mib: 0,
        };
        let mut small = host("h1", 4096);
        small.disk_mib = 100;
        small.disk_free_mib = Some(40);
        small.disk_reserve_mib = 10;
        let mut r = req(1, 128, PlacementPolicy::Spread);
        r.disk_mib = 50;
        r.image_mib = 35;
        // Not cached: 35 MiB image + 2 MiB > 40 - 10.
        let why = refuse_reason(&small, &r, &ratios, 0).expect("refused");
        assert_eq!(
            why,
            "disk space: 40 MiB free of 100 MiB, 10 MiB kept in reserve, 37 MiB needed now"
        );
        // Cached: only the overlay is needed now.
        small.cached_images = vec!["abc".into()];
        assert_eq!(refuse_reason(&small, &r, &ratios, 0), None);
        // Volumes count against the provisioning ratio: 100 MiB x 2 = 200.
        r.volume_mib = 151;
        let why = refuse_reason(&small, &r, &ratios, 0).expect("refused");
        assert!(why.starts_with("disk: 200 MiB free to provision"), "{why}");

        let mut big = host("h2", 4096);
        big.disk_mib = 1000;
        big.disk_free_mib = Some(900);
        big.disk_reserve_mib = 100;
        let p = place_volume(&[small.clone(), big.clone()], 100, &ratios).expect("placed");
        assert_eq!(p.host_id, "h2");
        assert_eq!(p.reason, "most free space (800 MiB above the reserve)");
        let err = place_volume(&[small, big], 5000, &ratios).expect_err("too big");
        assert!(err.contains("h1: disk: 200 MiB free to provision"), "{err}");
        assert!(
            err.contains("h2: disk: 2000 MiB free to provision"),
            "{err}"
        );
    }
}
