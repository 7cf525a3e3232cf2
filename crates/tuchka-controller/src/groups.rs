//! Groups: N identical VMs placed, addressed and recorded in one transaction (all or nothing),
//! scaled, removed; and how their operations stand.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use rusqlite::Connection;
use tuchka_api::{GroupCreate, GroupScale, Operation, PlacementPolicy, PowerState, VmState};
use tuchka_core::ipam::{self, Cidr};
use tuchka_core::names::{self, validate_name};
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, GroupRow, NicRow, VmExtra, VmRow};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// Most VMs in one group.
pub const MAX_COUNT: u32 = 100;
/// Most vCPUs per VM.
pub const MAX_CPUS: u32 = 64;
/// Most vCPUs a VM may get while running, unless `--max-cpus` says otherwise (at least its own).
pub const DEFAULT_MAX_CPUS: u32 = 4;
/// Least memory per VM (the test image panics below 96 MiB).
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most memory per VM (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest root disk per VM (64 TiB).
pub const MAX_DISK_MIB: u64 = 64 << 20;
/// Largest user-data accepted.
pub const MAX_USER_DATA: usize = 64 * 1024;

fn view(s: &Snapshot, g: &GroupRow) -> tuchka_api::Group {
    tuchka_api::Group {
        name: g.name.clone(),
        image: g.image.clone(),
        count: g.count,
        cpus: g.cpus,
        memory_mib: g.memory_mib,
        disk_mib: g.disk_mib,
        networks: g.networks.clone(),
        placement: g.placement,
        vms: s.vms_of_group(&g.name).map(|v| v.name.clone()).collect(),
        created_at: g.created_at.clone(),
    }
}

/// All groups.
pub fn list(ctl: &Controller) -> Result<Vec<tuchka_api::Group>> {
    let s = ctl.read(|c| ctl.snapshot(c))?;
    let mut out: Vec<_> = s.groups.values().map(|g| view(&s, g)).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One group.
pub fn get(ctl: &Controller, name: &str) -> Result<tuchka_api::Group> {
    let s = ctl.read(|c| ctl.snapshot(c))?;
    let g = s
        .groups
        .get(name)
        .ok_or_else(|| Error::not_found("group", "group", name))?;
    Ok(view(&s, g))
}

/// Validate a group request against the catalogue; returns (image row, disk MiB, policy).
fn check(c: &Connection, req: &GroupCreate) -> Result<(db::ImageRow, u64, PlacementPolicy)> {
    validate_name("group", &req.name).map_err(|_| Error::bad_name("group", &req.name))?;
    if req.count == 0 || req.count > MAX_COUNT {
        return Err(Error::invalid(
            "InvalidCount",
            format!("count {} is out of range: use 1 to {MAX_COUNT}", req.count),
        ));
    }
    let last = names::vm_name(&req.name, req.count - 1);
    validate_name("vm", &last).map_err(|e| {
        Error::invalid(
            "InvalidName",
            format!("group name too long for its VM names: {e}"),
        )
    })?;
    check_size(req.cpus, req.memory_mib)?;
    if let Some(m) = req.max_cpus {
        if m < req.cpus || m > MAX_CPUS {
            return Err(Error::invalid(
                "InvalidCpus",
                format!(
                    "max cpus {m} is out of range: use {} to {MAX_CPUS}",
                    req.cpus
                ),
            ));
        }
    }
    if let Some(v) = req.volume_size_mib {
        crate::volumes::check_size(v)?;
    }
    let policy = req.placement.unwrap_or(PlacementPolicy::Spread);
    if req
        .user_data
        .as_ref()
        .is_some_and(|u| u.len() > MAX_USER_DATA)
    {
        return Err(Error::invalid(
            "InvalidUserData",
            format!("user-data is larger than {} KiB", MAX_USER_DATA / 1024),
        ));
    }
    for k in &req.ssh_keys {
        if k.trim().is_empty() || k.trim().contains('\n') || k.contains('\0') {
            return Err(Error::invalid(
                "InvalidSshKey",
                "each ssh key must be one non-empty line (an OpenSSH public key)",
            ));
        }
    }
    let img =
        db::image(c, &req.image)?.ok_or_else(|| Error::not_found("image", "image", &req.image))?;
    let image_mib = img.virtual_size.div_ceil(1 << 20);
    let disk = if req.disk_mib == 0 {
        image_mib
    } else {
        req.disk_mib
    };
    if disk < image_mib {
        return Err(Error::invalid(
            "DiskTooSmall",
            format!("disk {disk} MiB is smaller than image {:?} ({image_mib} MiB): use --disk {image_mib}M or more", img.name),
        ));
    }
    if disk > MAX_DISK_MIB {
        return Err(Error::invalid(
            "InvalidDisk",
            format!("disk {disk} MiB is larger than {} TiB", MAX_DISK_MIB >> 20),
        ));
    }
    let mut seen = HashSet::new();
    for n in &req.networks {
        let net = db::network(c, n)?.ok_or_else(|| Error::not_found("network", "net", n))?;
        if net.deleting {
            return Err(Error::conflict(
                "NetworkDeleting",
                format!("network {n:?} is being removed"),
            ));
        }
        if !seen.insert(n) {
            return Err(Error::invalid(
                "DuplicateNetwork",
                format!("network {n:?} is given twice"),
            ));
        }
    }
    Ok((img, disk, policy))
}

/// Refuse vCPUs or memory out of range.
pub fn check_size(cpus: u32, memory_mib: u64) -> Result<()> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::invalid(
            "InvalidCpus",
            format!("cpus {cpus} is out of range: use 1 to {MAX_CPUS}"),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(Error::invalid(
            "InvalidMemory",
            format!("memory {memory_mib} MiB is out of range: use {MIN_MEMORY_MIB} MiB to {} GiB, e.g. --memory 256M", MAX_MEMORY_MIB >> 10),
        ));
    }
    Ok(())
}

/// Place, address and insert VMs `indexes` of group `g`. Returns their ids.
fn add_vms(
    ctl: &Controller,
    c: &Connection,
    g: &GroupRow,
    indexes: std::ops::Range<u32>,
) -> Result<Vec<String>> {
    let s = ctl.snapshot(c)?;
    for n in s.networks.iter().filter(|n| g.networks.contains(&n.name)) {
        crate::networks::check_usable(n)?;
    }
    let placements = crate::scheduler::place(ctl, &s, g, indexes.len() as u32)?;
    let mut used_macs: HashSet<String> = s.nics.iter().map(|n| n.mac.clone()).collect();
    let mut used_ips: HashMap<String, HashSet<Ipv4Addr>> = HashMap::new();
    for n in &s.networks {
        if let Ok(gw) = crate::networks::gateway_of(n).parse() {
            used_ips.entry(n.name.clone()).or_default().insert(gw);
        }
    }
    for n in &s.nics {
        if let Ok(ip) = n.ip.parse() {
            used_ips.entry(n.network.clone()).or_default().insert(ip);
        }
    }
    let mut nets = HashMap::new();
    for n in &g.networks {
        let row = s
            .networks
            .iter()
            .find(|x| &x.name == n)
            .ok_or_else(|| Error::not_found("network", "net", n))?;
        let cidr: Cidr = row
            .cidr
            .parse()
            .map_err(|e: ipam::IpamError| Error::internal("bad CIDR in database", &e))?;
        nets.insert(n.clone(), cidr);
    }
    let mut rng = rand::thread_rng();
    let mut ids = vec![];
    for (idx, p) in indexes.zip(placements) {
        let id = uuid::Uuid::new_v4().to_string();
        let name = names::vm_name(&g.name, idx);
        if s.vms.iter().any(|v| v.name == name) {
            return Err(Error::conflict(
                "VmExists",
                format!("a VM named {name:?} already exists"),
            ));
        }
        db::insert_vm(
            c,
            &VmRow {
                id: id.clone(),
                name,
                group: g.name.clone(),
                idx,
                host_id: p.host_id.clone(),
                placement_reason: p.reason,
                desired: PowerState::Running,
                observed: VmState::Pending,
                error: None,
                error_chain: vec![],
                cpu_usage: 0.0,
                reboot_seq: 0,
                reboot_done: 0,
                force_stop: false,
                stop_timeout_s: 60,
                deleting: false,
                created_at: db::now(),
                extra: VmExtra {
                    max_cpus: g.max_cpus,
                    ..VmExtra::default()
                },
            },
        )?;
        if let Some(size_mib) = g.volume_size_mib {
            crate::volumes::insert_for_vm(
                c,
                &s,
                &names::vm_name(&g.name, idx),
                &id,
                &p.host_id,
                size_mib,
                !g.keep_volumes,
            )?;
        }
        for (i, net) in g.networks.iter().enumerate() {
            let used = used_ips.entry(net.clone()).or_default();
            let ip = ipam::allocate_ip(net, &nets[net], used)
                .map_err(|e| Error::conflict("AddressesExhausted", e.to_string()))?;
            used.insert(ip);
            let mac = ipam::allocate_mac(&mut rng, &used_macs);
            used_macs.insert(mac.clone());
            db::insert_nic(
                c,
                &NicRow {
                    vm_id: id.clone(),
                    idx: i as u32,
                    network: net.clone(),
                    mac,
                    ip: ip.to_string(),
                },
            )?;
        }
        ids.push(id);
    }
    Ok(ids)
}

/// `group create`: all VMs placed and addressed in one transaction, or nothing.
pub fn create(ctl: &Controller, req: GroupCreate) -> Result<Operation> {
    operations::start(ctl, |c| {
        insert(ctl, c, &req, false)?;
        let op = new_op(
            OpKind::GroupCreate {
                group: req.name.clone(),
            },
            &format!("group/{}", req.name),
            req.count,
            &format!("starting {} VMs", req.count),
        );
        Ok(op)
    })
}

/// Check, record and place group `req` inside the caller's transaction; `run_once`: its VMs
/// power on once and stay off when their guest powers off (image builders).
pub fn insert(
    ctl: &Controller,
    c: &Connection,
    req: &GroupCreate,
    run_once: bool,
) -> Result<Vec<String>> {
    let (img, disk_mib, policy) = check(c, req)?;
    if db::group(c, &req.name)?.is_some() {
        return Err(Error::conflict(
            "GroupExists",
            format!(
                "group {:?} already exists (see: tuchka group show {})",
                req.name, req.name
            ),
        ));
    }
    let g = GroupRow {
        name: req.name.clone(),
        image: img.name.clone(),
        image_sha256: img.sha256.clone(),
        count: req.count,
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        disk_mib,
        networks: req.networks.clone(),
        user_data: req.user_data.clone(),
        ssh_keys: req.ssh_keys.iter().map(|k| k.trim().to_string()).collect(),
        placement: policy,
        anti_affinity: req.anti_affinity,
        deleting: false,
        created_at: db::now(),
        volume_size_mib: req.volume_size_mib,
        keep_volumes: req.keep_volumes,
        max_cpus: req.max_cpus.unwrap_or(req.cpus.max(DEFAULT_MAX_CPUS)),
    };
    db::insert_group(c, &g)?;
    let ids = add_vms(ctl, c, &g, 0..req.count)?;
    if run_once {
        for id in &ids {
            if let Some(mut v) = db::vm_by_id(c, id)? {
                v.extra.run_once = true;
                db::update_vm(c, &v)?;
            }
        }
    }
    Ok(ids)
}

/// Mark group `name` and all its VMs for removal (the hosts remove them; the group row goes
/// with its last VM). Returns how many VMs it had.
pub fn mark_deleting(c: &Connection, name: &str) -> Result<u32> {
    let g = db::group(c, name)?.ok_or_else(|| Error::not_found("group", "group", name))?;
    let vms = db::group_vms(c, name)?;
    crate::vms::refuse_while_migrating(c, &vms, "remove the group")?;
    for mut v in vms.clone() {
        v.deleting = true;
        db::update_vm(c, &v)?;
    }
    db::update_group(c, name, g.count, true)?;
    Ok(vms.len() as u32)
}

/// `group scale`: up adds the next indexes; down removes the highest.
pub fn scale(ctl: &Controller, name: &str, req: GroupScale) -> Result<Operation> {
    if req.count > MAX_COUNT {
        return Err(Error::invalid(
            "InvalidCount",
            format!("count {} is out of range: use 0 to {MAX_COUNT}", req.count),
        ));
    }
    operations::start(ctl, |c| {
        let g = db::group(c, name)?.ok_or_else(|| Error::not_found("group", "group", name))?;
        if g.deleting {
            return Err(Error::conflict(
                "GroupDeleting",
                format!("group {name:?} is being removed"),
            ));
        }
        if req.count > 0 {
            let last = names::vm_name(name, req.count - 1);
            validate_name("vm", &last).map_err(|e| {
                Error::invalid(
                    "InvalidName",
                    format!("group name too long for {} VMs: {e}", req.count),
                )
            })?;
        }
        let live: Vec<VmRow> = db::group_vms(c, name)?
            .into_iter()
            .filter(|v| !v.deleting)
            .collect();
        let mut added = vec![];
        let mut removed = vec![];
        if req.count as usize > live.len() {
            let next = live.iter().map(|v| v.idx + 1).max().unwrap_or(0);
            added = add_vms(ctl, c, &g, next..next + (req.count - live.len() as u32))?;
        } else {
            let mut by_idx = live.clone();
            by_idx.sort_by_key(|v| std::cmp::Reverse(v.idx));
            let going: Vec<VmRow> = by_idx
                .into_iter()
                .take(live.len() - req.count as usize)
                .collect();
            crate::vms::refuse_while_migrating(c, &going, "scale the group down")?;
            for mut v in going {
                v.deleting = true;
                db::update_vm(c, &v)?;
                removed.push(v.id);
            }
        }
        db::update_group(c, name, req.count, false)?;
        let total = (added.len() + removed.len()) as u32;
        let op = new_op(
            OpKind::GroupScale {
                group: name.to_string(),
                added,
                removed,
                previous: live.len() as u32,
            },
            &format!("group/{name}"),
            total,
            &format!("scaling from {} to {}", live.len(), req.count),
        );
        Ok(op)
    })
}

/// `group rm`: every VM, disk, seed and address goes.
pub fn delete(ctl: &Controller, name: &str) -> Result<Operation> {
    operations::start(ctl, |c| {
        let n = mark_deleting(c, name)?;
        let op = new_op(
            OpKind::GroupDelete {
                group: name.to_string(),
            },
            &format!("group/{name}"),
            n,
            "removing VMs",
        );
        Ok(op)
    })
}

/// The failure of a VM its host reported, with its causes.
pub fn vm_failure(v: &VmRow) -> Option<(String, Vec<String>)> {
    (matches!(v.observed, VmState::Error | VmState::Lost)).then(|| {
        (
            format!(
                "vm {}: {}",
                v.name,
                v.error.as_deref().unwrap_or("failed on its host")
            ),
            v.error_chain.clone(),
        )
    })
}

/// How a group operation stands. Failing ones mark what they added for removal first.
pub fn evaluate(
    c: &Connection,
    kind: &OpKind,
    rollback: Option<&str>,
    (done, total): (u32, u32),
    down_after_s: i64,
) -> Result<Step> {
    Ok(match kind {
        OpKind::GroupCreate { group } => {
            let Some(g) = db::group(c, group)? else {
                return Ok(Step::Failed {
                    error: rollback
                        .map(String::from)
                        .unwrap_or_else(|| format!("group {group:?} was removed")),
                    chain: vec![],
                });
            };
            if rollback.is_some() {
                let left = db::group_vms(c, group)?.len() as u32;
                return Ok(Step::Running {
                    done,
                    message: format!("rolling back: {left} VMs left to remove"),
                });
            }
            let vms: Vec<VmRow> = db::group_vms(c, group)?
                .into_iter()
                .filter(|v| !v.deleting)
                .collect();
            if let Some((error, chain)) = vms.iter().find_map(vm_failure) {
                db::update_group(c, group, g.count, true)?;
                for mut v in db::group_vms(c, group)? {
                    v.deleting = true;
                    db::update_vm(c, &v)?;
                }
                return Ok(Step::RollingBack { error, chain });
            }
            let running = vms
                .iter()
                .filter(|v| v.observed == VmState::Running)
                .count() as u32;
            if running == g.count && vms.len() as u32 == g.count {
                Step::Succeeded {
                    message: format!("{running} VMs running"),
                }
            } else {
                Step::Running {
                    done: running,
                    message: format!("{running} of {} VMs running", g.count),
                }
            }
        }
        OpKind::GroupScale {
            group,
            added,
            removed,
            previous,
        } => {
            let mut added_rows = vec![];
            for id in added {
                if let Some(v) = db::vm_by_id(c, id)? {
                    added_rows.push(v);
                }
            }
            let mut removed_left = 0;
            for id in removed {
                removed_left += u32::from(db::vm_by_id(c, id)?.is_some());
            }
            if let Some(error) = rollback {
                return Ok(if added_rows.is_empty() {
                    Step::Failed {
                        error: error.to_string(),
                        chain: vec![],
                    }
                } else {
                    Step::Running {
                        done,
                        message: format!("rolling back: {} VMs left to remove", added_rows.len()),
                    }
                });
            }
            if let Some((error, chain)) = added_rows.iter().find_map(vm_failure) {
                for mut v in added_rows {
                    v.deleting = true;
                    db::update_vm(c, &v)?;
                }
                if let Some(g) = db::group(c, group)? {
                    db::update_group(c, group, *previous, g.deleting)?;
                }
                return Ok(Step::RollingBack { error, chain });
            }
            let running = added_rows
                .iter()
                .filter(|v| v.observed == VmState::Running)
                .count() as u32;
            let done = running + (removed.len() as u32 - removed_left);
            if done == total {
                Step::Succeeded {
                    message: format!(
                        "group {group} has {} VMs",
                        db::group(c, group)?.map(|g| g.count).unwrap_or(0)
                    ),
                }
            } else {
                Step::Running {
                    done,
                    message: format!(
                        "{running} of {} new VMs running, {removed_left} left to remove",
                        added.len()
                    ),
                }
            }
        }
        OpKind::GroupDelete { group } => match db::group(c, group)? {
            None => Step::Succeeded {
                message: format!("group {group} removed"),
            },
            Some(_) => {
                let vms = db::group_vms(c, group)?;
                let left = vms.len() as u32;
                Step::Running {
                    done: total.saturating_sub(left),
                    message: format!(
                        "{left} VMs left to remove{}",
                        waiting_on_down_hosts(c, &vms, down_after_s)?
                    ),
                }
            }
        },
        _ => Step::Failed {
            error: "not a group operation".into(),
            chain: vec![],
        },
    })
}

/// What of `vms` waits on a host that is down, in words (`; web-2 waits on host h2, which is
/// down: …`), or nothing.
fn waiting_on_down_hosts(c: &Connection, vms: &[VmRow], down_after_s: i64) -> Result<String> {
    let now = db::now_unix();
    let mut by_host: Vec<(String, Vec<&str>)> = vec![];
    for v in vms {
        let Some(h) = db::host(c, &v.host_id)? else {
            continue;
        };
        if crate::snapshot::is_up(&h, now, down_after_s) && !h.revoked {
            continue;
        }
        match by_host.iter_mut().find(|(n, _)| *n == h.name) {
            Some((_, list)) => list.push(&v.name),
            None => by_host.push((h.name.clone(), vec![&v.name])),
        }
    }
    Ok(by_host
        .iter()
        .map(|(h, list)| {
            format!(
                "; {} wait{} on host {h}, which is down: they go when it is back, or with tuchka host rm {h} --force if it is gone",
                list.join(", "),
                if list.len() == 1 { "s" } else { "" }
            )
        })
        .collect())
}

/// Remove group rows whose VMs are all gone, and lost VMs asked to be removed (their host is
/// gone: nothing has to confirm it).
pub fn finalize_deletions(c: &Connection) -> Result<()> {
    for v in db::lost_vms_to_remove(c)? {
        crate::volumes::release_vm(c, &v.id)?;
        db::delete_vm(c, &v.id)?;
    }
    for g in db::groups(c)? {
        if g.deleting && db::group_vms(c, &g.name)?.is_empty() {
            db::delete_group(c, &g.name)?;
        }
    }
    Ok(())
}
