//! What the API does, without HTTP: validate, decide, record in one transaction, wake agents.
//!
//! Handlers in [`crate::api`] only parse, call a function here and map the result.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use rusqlite::Connection;
use serde_json::json;
use tuchka_api::{
    GroupCreate, GroupScale, Host, Image, Network, NetworkCreate, Operation, PowerState, Vm,
    VmAddress, VmState, VmStop,
};
use tuchka_core::ipam::{self, Cidr};
use tuchka_core::names::{self, validate_name};
use tuchka_core::placement::{self, GroupRequest, HostCapacity, Policy};
use tuchka_store::{self as db, GroupRow, NetworkRow, NicRow, OpRow, VmRow};

use crate::error::{Error, Result};
use crate::state::Controller;

/// Most VMs in one group.
pub const MAX_COUNT: u32 = 100;
/// Most vCPUs per VM.
pub const MAX_CPUS: u32 = 64;
/// Least memory per VM (the test image panics below 96 MiB).
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most memory per VM (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest root disk per VM (64 TiB).
pub const MAX_DISK_MIB: u64 = 64 << 20;
/// Largest user-data accepted.
pub const MAX_USER_DATA: usize = 64 * 1024;

fn not_found(kind: &'static str, cli: &'static str, name: &str) -> Error {
    Error::NotFound {
        kind,
        cli,
        name: name.to_string(),
    }
}

fn name_ok(kind: &'static str, name: &str) -> Result<()> {
    validate_name(kind, name).map_err(|e| Error::invalid("InvalidName", e.to_string()))
}

// ------------------------------------------------------------------ views

/// Whether a host reported recently.
pub fn host_is_up(ctl: &Controller, h: &db::HostRow) -> bool {
    h.last_seen_unix > 0
        && db::now_unix() - h.last_seen_unix <= ctl.config().down_after.as_secs() as i64
}

fn host_names(c: &Connection) -> Result<HashMap<String, db::HostRow>> {
    Ok(db::hosts(c)?
        .into_iter()
        .map(|h| (h.id.clone(), h))
        .collect())
}

fn vm_view(
    ctl: &Controller,
    c: &Connection,
    v: &VmRow,
    hosts: &HashMap<String, db::HostRow>,
) -> Result<Vm> {
    let g = db::group(c, &v.group)?.ok_or_else(|| not_found("group", "group", &v.group))?;
    let host = hosts.get(&v.host_id);
    let up = host.is_some_and(|h| host_is_up(ctl, h));
    let addresses = db::vm_nics(c, &v.id)?
        .into_iter()
        .map(|n| VmAddress {
            network: n.network,
            mac: n.mac,
            ip: n.ip,
            vm: None,
        })
        .collect();
    Ok(Vm {
        name: v.name.clone(),
        id: v.id.clone(),
        group: v.group.clone(),
        index: v.idx,
        state: if up || v.observed == VmState::Pending {
            v.observed
        } else {
            VmState::Unknown
        },
        desired: v.desired,
        host: host
            .map(|h| h.name.clone())
            .unwrap_or_else(|| v.host_id.clone()),
        placement_reason: v.placement_reason.clone(),
        image: g.image,
        cpus: g.cpus,
        memory_mib: g.memory_mib,
        disk_mib: g.disk_mib,
        addresses,
        domain: names::domain_name(ctl.cloud_id(), &v.name),
        error: v.error.clone(),
        created_at: v.created_at.clone(),
    })
}

/// All VMs.
pub fn list_vms(ctl: &Controller) -> Result<Vec<Vm>> {
    let db = ctl.db();
    let c = db.conn();
    let hosts = host_names(c)?;
    db::vms(c)?
        .iter()
        .map(|v| vm_view(ctl, c, v, &hosts))
        .collect()
}

/// One VM.
pub fn get_vm(ctl: &Controller, name: &str) -> Result<Vm> {
    let db = ctl.db();
    let c = db.conn();
    let v = db::vm(c, name)?.ok_or_else(|| not_found("vm", "vm", name))?;
    vm_view(ctl, c, &v, &host_names(c)?)
}

fn image_view(c: &Connection, i: db::ImageRow) -> Result<Image> {
    let used_by = db::groups(c)?
        .into_iter()
        .filter(|g| g.image == i.name)
        .map(|g| {
            db::group_vms(c, &g.name).map(|vs| vs.into_iter().map(|v| v.name).collect::<Vec<_>>())
        })
        .collect::<std::result::Result<Vec<_>, _>>()?
        .concat();
    Ok(Image {
        name: i.name,
        sha256: i.sha256,
        source_format: i.source_format,
        virtual_size: i.virtual_size,
        stored_size: i.stored_size,
        created_at: i.created_at,
        used_by,
    })
}

/// All images.
pub fn list_images(ctl: &Controller) -> Result<Vec<Image>> {
    let db = ctl.db();
    let c = db.conn();
    db::images(c)?
        .into_iter()
        .map(|i| image_view(c, i))
        .collect()
}

/// One image.
pub fn get_image(ctl: &Controller, name: &str) -> Result<Image> {
    let db = ctl.db();
    let c = db.conn();
    let i = db::image(c, name)?.ok_or_else(|| not_found("image", "image", name))?;
    image_view(c, i)
}

fn network_view(
    c: &Connection,
    n: NetworkRow,
    hosts: &HashMap<String, db::HostRow>,
) -> Result<Network> {
    let vm_names: HashMap<String, String> =
        db::vms(c)?.into_iter().map(|v| (v.id, v.name)).collect();
    let addresses = db::nics(c)?
        .into_iter()
        .filter(|x| x.network == n.name)
        .map(|x| VmAddress {
            network: x.network,
            mac: x.mac,
            ip: x.ip,
            vm: vm_names.get(&x.vm_id).cloned(),
        })
        .collect();
    let (rules, forwards) = crate::netrules::views(c, &n.name, hosts, n.gateway_host.as_deref())?;
    Ok(Network {
        gateway: gateway_of(&n),
        nat: n.nat,
        rules,
        forwards,
        bridge: names::bridge_name(n.vni),
        state: if n.deleting {
            "deleting".into()
        } else {
            n.state
        },
        gateway_host: n.gateway_host.as_ref().map(|id| {
            hosts
                .get(id)
                .map(|h| h.name.clone())
                .unwrap_or_else(|| id.clone())
        }),
        addresses,
        error: n.error,
        name: n.name,
        cidr: n.cidr,
        vni: n.vni,
    })
}

/// All networks.
pub fn list_networks(ctl: &Controller) -> Result<Vec<Network>> {
    let db = ctl.db();
    let c = db.conn();
    let hosts = host_names(c)?;
    db::networks(c)?
        .into_iter()
        .map(|n| network_view(c, n, &hosts))
        .collect()
}

/// One network.
pub fn get_network(ctl: &Controller, name: &str) -> Result<Network> {
    let db = ctl.db();
    let c = db.conn();
    let n = db::network(c, name)?.ok_or_else(|| not_found("network", "net", name))?;
    network_view(c, n, &host_names(c)?)
}

fn group_view(c: &Connection, g: GroupRow) -> Result<tuchka_api::Group> {
    let vms = db::group_vms(c, &g.name)?
        .into_iter()
        .map(|v| v.name)
        .collect();
    Ok(tuchka_api::Group {
        name: g.name,
        image: g.image,
        count: g.count,
        cpus: g.cpus,
        memory_mib: g.memory_mib,
        disk_mib: g.disk_mib,
        networks: g.networks,
        placement: g.placement,
        vms,
        created_at: g.created_at,
    })
}

/// All groups.
pub fn list_groups(ctl: &Controller) -> Result<Vec<tuchka_api::Group>> {
    let db = ctl.db();
    let c = db.conn();
    db::groups(c)?
        .into_iter()
        .map(|g| group_view(c, g))
        .collect()
}

/// One group.
pub fn get_group(ctl: &Controller, name: &str) -> Result<tuchka_api::Group> {
    let db = ctl.db();
    let c = db.conn();
    let g = db::group(c, name)?.ok_or_else(|| not_found("group", "group", name))?;
    group_view(c, g)
}

/// Resources promised on a host: (vCPUs, memory MiB, disk MiB).
fn host_usage(c: &Connection, host_id: &str) -> Result<(u32, u64, u64)> {
    let mut groups: HashMap<String, GroupRow> = HashMap::new();
    let (mut cpu, mut mem, mut disk) = (0, 0, 0);
    for v in db::host_vms(c, host_id)? {
        if !groups.contains_key(&v.group) {
            if let Some(g) = db::group(c, &v.group)? {
                groups.insert(v.group.clone(), g);
            }
        }
        if let Some(g) = groups.get(&v.group) {
            cpu += g.cpus;
            mem += g.memory_mib;
            disk += g.disk_mib;
        }
    }
    Ok((cpu, mem, disk))
}

fn host_view(ctl: &Controller, c: &Connection, h: db::HostRow) -> Result<Host> {
    let (cpus_used, memory_used_mib, disk_provisioned_mib) = host_usage(c, &h.id)?;
    let state = if h.revoked {
        "revoked"
    } else if !host_is_up(ctl, &h) {
        "down"
    } else if h.draining {
        "draining"
    } else {
        "up"
    };
    Ok(Host {
        state: state.into(),
        address: h.facts.address.clone(),
        load_1m: h.facts.load_1m,
        memory_available_mib: h.facts.memory_available_mib,
        accel: h.facts.accel.clone(),
        accel_reason: h.facts.accel_reason.clone(),
        cpus: h.facts.cpus,
        cpus_used,
        memory_mib: h.facts.memory_mib,
        memory_used_mib,
        disk_mib: h.facts.disk_mib,
        disk_free_mib: h.facts.disk_free_mib,
        disk_provisioned_mib,
        vms: db::host_vms(c, &h.id)?
            .into_iter()
            .map(|v| v.name)
            .collect(),
        cached_images: h.cached_images,
        last_seen: h.last_seen,
        name: h.name,
        id: h.id,
    })
}

/// All hosts.
pub fn list_hosts(ctl: &Controller) -> Result<Vec<Host>> {
    let db = ctl.db();
    let c = db.conn();
    db::hosts(c)?
        .into_iter()
        .map(|h| host_view(ctl, c, h))
        .collect()
}

/// One host.
pub fn get_host(ctl: &Controller, name: &str) -> Result<Host> {
    let db = ctl.db();
    let c = db.conn();
    let h = db::host(c, name)?.ok_or_else(|| not_found("host", "host", name))?;
    host_view(ctl, c, h)
}

/// Latest operations.
pub fn list_operations(ctl: &Controller) -> Result<Vec<Operation>> {
    Ok(db::operations(ctl.db().conn(), 200)?
        .into_iter()
        .map(|o| o.op)
        .collect())
}

/// One operation.
pub fn get_operation(ctl: &Controller, id: &str) -> Result<Operation> {
    db::operation(ctl.db().conn(), id)?
        .map(|o| o.op)
        .ok_or_else(|| not_found("operation", "op", id))
}

// ------------------------------------------------------------------ operations

fn new_op(kind: &str, target: &str, total: u32, message: &str, params: serde_json::Value) -> OpRow {
    OpRow {
        op: Operation {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            target: target.into(),
            state: "running".into(),
            done: 0,
            total,
            message: message.into(),
            error: None,
            created_at: db::now(),
            finished_at: None,
        },
        params,
    }
}

/// Record the change, wake the agents and tell the world.
fn started(ctl: &Controller, op: OpRow) -> Operation {
    ctl.bump();
    ctl.emit(
        "operation.started",
        &op.op.target,
        format!("{} {}: {}", op.op.kind, op.op.target, op.op.message),
    );
    crate::ops::progress(ctl);
    get_operation(ctl, &op.op.id).unwrap_or(op.op)
}

// ------------------------------------------------------------------ networks

/// `net create`.
pub fn create_network(ctl: &Controller, req: NetworkCreate) -> Result<Operation> {
    name_ok("network", &req.name)?;
    let cidr =
        Cidr::parse_network(&req.cidr).map_err(|e| Error::invalid("InvalidCidr", e.to_string()))?;
    let gateway = req
        .gateway
        .as_deref()
        .map(|g| check_gateway(&cidr, g))
        .transpose()?;
    let op = ctl.db().atomic(|c| {
        if db::network(c, &req.name)?.is_some() {
            return Err(Error::conflict(
                "NetworkExists",
                format!(
                    "network {:?} already exists (see: tuchka net show {})",
                    req.name, req.name
                ),
            ));
        }
        let nets = db::networks(c)?;
        ipam::check_overlap(
            &cidr,
            nets.iter().map(|n| (n.name.as_str(), n.cidr.as_str())),
        )
        .map_err(|e| Error::invalid("CidrOverlap", e.to_string()))?;
        let gateway_host = pick_gateway_host(ctl, c)?;
        let used: HashSet<u32> = nets.iter().map(|n| n.vni).collect();
        let vni = ipam::allocate_vni(&mut rand::thread_rng(), &used);
        db::insert_network(
            c,
            &NetworkRow {
                name: req.name.clone(),
                cidr: cidr.to_string(),
                vni,
                gateway_host: Some(gateway_host),
                state: "creating".into(),
                error: None,
                deleting: false,
                created_at: db::now(),
                nat: req.nat,
                gateway: gateway.clone(),
            },
        )?;
        let op = new_op(
            "net.create",
            &format!("network/{}", req.name),
            1,
            "creating bridge and DHCP",
            json!({"network": req.name}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

/// A gateway given by the user must be a usable address of the network that VMs do not get.
fn check_gateway(cidr: &Cidr, gateway: &str) -> Result<String> {
    let ip: Ipv4Addr = gateway.parse().map_err(|_| {
        Error::invalid(
            "InvalidGateway",
            format!("gateway {gateway:?} is not an IPv4 address"),
        )
    })?;
    if !cidr.contains(ip) || ip == cidr.network() || ip == cidr.broadcast() {
        return Err(Error::invalid(
            "InvalidGateway",
            format!("gateway {ip} is outside network {cidr} (or its network/broadcast address): use an address inside it, e.g. {}", cidr.gateway()),
        ));
    }
    Ok(ip.to_string())
}

/// The gateway address of a network.
pub fn gateway_of(n: &NetworkRow) -> String {
    n.gateway.clone().unwrap_or_else(|| {
        n.cidr
            .parse::<Cidr>()
            .map(|c| c.gateway().to_string())
            .unwrap_or_default()
    })
}

fn pick_gateway_host(ctl: &Controller, c: &Connection) -> Result<String> {
    let hosts = db::hosts(c)?;
    hosts
        .iter()
        .filter(|h| host_is_up(ctl, h) && !h.draining && !h.revoked)
        .min_by(|a, b| a.name.cmp(&b.name))
        .map(|h| h.id.clone())
        .ok_or_else(|| {
            Error::conflict(
                "NoHost",
                "no host is up to run the network's gateway (see: tuchka host list)",
            )
        })
}

/// `net rm`: refused while VMs use it.
pub fn delete_network(ctl: &Controller, name: &str) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let mut n = db::network(c, name)?.ok_or_else(|| not_found("network", "net", name))?;
        let users: Vec<String> = {
            let ids: HashSet<String> = db::nics(c)?
                .into_iter()
                .filter(|x| x.network == name)
                .map(|x| x.vm_id)
                .collect();
            db::vms(c)?
                .into_iter()
                .filter(|v| ids.contains(&v.id))
                .map(|v| v.name)
                .collect()
        };
        if !users.is_empty() {
            return Err(Error::conflict(
                "NetworkInUse",
                format!(
                    "network {name:?} is used by {}: remove them first (tuchka group rm …)",
                    users.join(", ")
                ),
            ));
        }
        n.deleting = true;
        db::update_network(c, &n)?;
        let op = new_op(
            "net.delete",
            &format!("network/{name}"),
            1,
            "removing bridge and DHCP",
            json!({"network": name}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

// ------------------------------------------------------------------ groups

/// Validate a group request against the catalogue; returns (image row, disk MiB).
fn check_group(c: &Connection, req: &GroupCreate) -> Result<(db::ImageRow, u64, Policy)> {
    name_ok("group", &req.name)?;
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
    if req.cpus == 0 || req.cpus > MAX_CPUS {
        return Err(Error::invalid(
            "InvalidCpus",
            format!("cpus {} is out of range: use 1 to {MAX_CPUS}", req.cpus),
        ));
    }
    if req.memory_mib < MIN_MEMORY_MIB || req.memory_mib > MAX_MEMORY_MIB {
        return Err(Error::invalid(
            "InvalidMemory",
            format!("memory {} MiB is out of range: use {MIN_MEMORY_MIB} MiB to {} GiB, e.g. --memory 256M", req.memory_mib, MAX_MEMORY_MIB >> 10),
        ));
    }
    let policy = Policy::parse(req.placement.as_deref().unwrap_or("spread")).ok_or_else(|| {
        Error::invalid(
            "InvalidPlacement",
            "placement must be \"spread\" or \"pack\"",
        )
    })?;
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
    let img = db::image(c, &req.image)?.ok_or_else(|| not_found("image", "image", &req.image))?;
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
        let net = db::network(c, n)?.ok_or_else(|| not_found("network", "net", n))?;
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

fn capacities(ctl: &Controller, c: &Connection) -> Result<Vec<HostCapacity>> {
    db::hosts(c)?
        .into_iter()
        .map(|h| {
            let (cpus_used, memory_used_mib, disk_provisioned_mib) = host_usage(c, &h.id)?;
            Ok(HostCapacity {
                up: host_is_up(ctl, &h) && !h.revoked,
                draining: h.draining,
                cpus: h.facts.cpus,
                cpus_used,
                memory_mib: h.facts.memory_mib,
                memory_used_mib,
                disk_mib: h.facts.disk_mib,
                disk_provisioned_mib,
                cached_images: h.cached_images,
                id: h.id,
                name: h.name,
            })
        })
        .collect()
}

/// Place, address and insert VMs `indexes` of group `g`. Returns their ids.
fn add_vms(
    ctl: &Controller,
    c: &Connection,
    g: &GroupRow,
    indexes: std::ops::Range<u32>,
) -> Result<Vec<String>> {
    let existing: BTreeMap<String, u32> = db::group_vms(c, &g.name)?
        .iter()
        .filter(|v| !v.deleting)
        .fold(BTreeMap::new(), |mut m, v| {
            *m.entry(v.host_id.clone()).or_default() += 1;
            m
        });
    let req = GroupRequest {
        group: g.name.clone(),
        count: indexes.len() as u32,
        cpus: g.cpus,
        memory_mib: g.memory_mib,
        disk_mib: g.disk_mib,
        image_sha256: g.image_sha256.clone(),
        anti_affinity: g.anti_affinity,
        existing,
        policy: Policy::parse(&g.placement).unwrap_or(Policy::Spread),
    };
    let placements = placement::place_group(&capacities(ctl, c)?, &req, &ctl.config().ratios)
        .map_err(|e| Error::conflict("PlacementFailed", e.to_string()))?;
    let all_nics = db::nics(c)?;
    let mut used_macs: HashSet<String> = all_nics.iter().map(|n| n.mac.clone()).collect();
    let mut used_ips: HashMap<String, HashSet<Ipv4Addr>> = HashMap::new();
    for n in db::networks(c)? {
        if let Ok(gw) = gateway_of(&n).parse() {
            used_ips.entry(n.name.clone()).or_default().insert(gw);
        }
    }
    for n in &all_nics {
        if let Ok(ip) = n.ip.parse() {
            used_ips.entry(n.network.clone()).or_default().insert(ip);
        }
    }
    let mut nets = HashMap::new();
    for n in &g.networks {
        let row = db::network(c, n)?.ok_or_else(|| not_found("network", "net", n))?;
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
        if db::vm(c, &name)?.is_some() {
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
                host_id: p.host_id,
                placement_reason: p.reason,
                desired: PowerState::Running,
                observed: VmState::Pending,
                error: None,
                reboot_seq: 0,
                reboot_done: 0,
                force_stop: false,
                stop_timeout_s: 60,
                deleting: false,
                created_at: db::now(),
            },
        )?;
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
pub fn create_group(ctl: &Controller, req: GroupCreate) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let (img, disk_mib, policy) = check_group(c, &req)?;
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
            placement: match policy {
                Policy::Spread => "spread".into(),
                Policy::Pack => "pack".into(),
            },
            anti_affinity: req.anti_affinity,
            deleting: false,
            created_at: db::now(),
        };
        db::insert_group(c, &g)?;
        let ids = add_vms(ctl, c, &g, 0..req.count)?;
        let op = new_op(
            "group.create",
            &format!("group/{}", req.name),
            req.count,
            &format!("starting {} VMs", req.count),
            json!({"group": req.name, "added": ids}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

/// `group scale`: up adds the next indexes; down removes the highest.
pub fn scale_group(ctl: &Controller, name: &str, req: GroupScale) -> Result<Operation> {
    if req.count > MAX_COUNT {
        return Err(Error::invalid(
            "InvalidCount",
            format!("count {} is out of range: use 0 to {MAX_COUNT}", req.count),
        ));
    }
    let op = ctl.db().atomic(|c| {
        let g = db::group(c, name)?.ok_or_else(|| not_found("group", "group", name))?;
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
            for mut v in by_idx.into_iter().take(live.len() - req.count as usize) {
                v.deleting = true;
                db::update_vm(c, &v)?;
                removed.push(v.id);
            }
        }
        db::update_group(c, name, req.count, false)?;
        let total = (added.len() + removed.len()) as u32;
        let op = new_op(
            "group.scale",
            &format!("group/{name}"),
            total,
            &format!("scaling from {} to {}", live.len(), req.count),
            json!({"group": name, "added": added, "removed": removed, "previous": live.len()}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

/// `group rm`: every VM, disk, seed and address goes.
pub fn delete_group(ctl: &Controller, name: &str) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let g = db::group(c, name)?.ok_or_else(|| not_found("group", "group", name))?;
        let vms = db::group_vms(c, name)?;
        for mut v in vms.clone() {
            v.deleting = true;
            db::update_vm(c, &v)?;
        }
        db::update_group(c, name, g.count, true)?;
        let op = new_op(
            "group.delete",
            &format!("group/{name}"),
            vms.len() as u32,
            "removing VMs",
            json!({"group": name}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

// ------------------------------------------------------------------ vms

/// A VM action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Start a stopped VM (or resume a paused one).
    Start,
    /// Shut down (ACPI, then force after the timeout).
    Stop,
    /// Pause.
    Pause,
    /// Resume from pause.
    Resume,
    /// ACPI reboot.
    Reboot,
}

/// Ask a VM to change power state.
pub fn vm_action(
    ctl: &Controller,
    name: &str,
    action: VmAction,
    stop: VmStop,
) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let mut v = db::vm(c, name)?.ok_or_else(|| not_found("vm", "vm", name))?;
        if v.deleting {
            return Err(Error::conflict(
                "VmDeleting",
                format!("vm {name:?} is being removed"),
            ));
        }
        let target = format!("vm/{name}");
        let op = match action {
            VmAction::Reboot => {
                if v.desired != PowerState::Running {
                    return Err(Error::conflict(
                        "VmNotRunning",
                        format!(
                            "vm {name:?} is {}: start it first (tuchka vm start {name})",
                            v.desired.as_str()
                        ),
                    ));
                }
                v.reboot_seq = v.reboot_seq.max(v.reboot_done) + 1;
                new_op(
                    "vm.reboot",
                    &target,
                    1,
                    "rebooting",
                    json!({"vm": name, "seq": v.reboot_seq}),
                )
            }
            _ => {
                let want = match action {
                    VmAction::Start | VmAction::Resume => PowerState::Running,
                    VmAction::Pause => PowerState::Paused,
                    _ => PowerState::Stopped,
                };
                if action == VmAction::Resume && v.desired != PowerState::Paused {
                    return Err(Error::conflict(
                        "VmNotPaused",
                        format!("vm {name:?} is not paused (it is {})", v.desired.as_str()),
                    ));
                }
                if action == VmAction::Pause && v.desired == PowerState::Stopped {
                    return Err(Error::conflict(
                        "VmStopped",
                        format!("vm {name:?} is stopped: start it first (tuchka vm start {name})"),
                    ));
                }
                v.desired = want;
                if action == VmAction::Stop {
                    v.force_stop = stop.force;
                    v.stop_timeout_s = stop.timeout_s.unwrap_or(60).clamp(1, 3600);
                }
                let verb = match action {
                    VmAction::Start => "starting",
                    VmAction::Stop if stop.force => "powering off",
                    VmAction::Stop => "shutting down (ACPI)",
                    VmAction::Pause => "pausing",
                    _ => "resuming",
                };
                new_op(
                    &format!("vm.{}", action_name(action)),
                    &target,
                    1,
                    verb,
                    json!({"vm": name, "want": want.as_str()}),
                )
            }
        };
        v.error = None;
        db::update_vm(c, &v)?;
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

fn action_name(a: VmAction) -> &'static str {
    match a {
        VmAction::Start => "start",
        VmAction::Stop => "stop",
        VmAction::Pause => "pause",
        VmAction::Resume => "resume",
        VmAction::Reboot => "reboot",
    }
}

/// `vm rm`: removes one VM; its group shrinks by one.
pub fn delete_vm(ctl: &Controller, name: &str) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let mut v = db::vm(c, name)?.ok_or_else(|| not_found("vm", "vm", name))?;
        v.deleting = true;
        db::update_vm(c, &v)?;
        if let Some(g) = db::group(c, &v.group)? {
            db::update_group(c, &g.name, g.count.saturating_sub(1), g.deleting)?;
        }
        let op = new_op(
            "vm.delete",
            &format!("vm/{name}"),
            1,
            "removing",
            json!({"vm": name, "id": v.id}),
        );
        db::save_operation(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    Ok(started(ctl, op))
}

/// The serial console log of a VM on the local host.
pub fn vm_console(ctl: &Controller, name: &str) -> Result<String> {
    let v = get_vm(ctl, name)?;
    let pool = ctl.config().local_pool.clone().ok_or_else(|| {
        Error::conflict(
            "ConsoleUnavailable",
            format!(
                "vm {name:?} runs on host {}; its console is on that host",
                v.host
            ),
        )
    })?;
    let path = pool.join("vms").join(&v.id).join("console.log");
    match std::fs::read(&path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::internal(
            format!("cannot read the console log of vm {name:?}"),
            &e,
        )),
    }
}

/// `image rm`: refused while a group uses it.
pub fn delete_image(ctl: &Controller, name: &str) -> Result<()> {
    let file = ctl.db().atomic(|c| {
        let img = db::image(c, name)?.ok_or_else(|| not_found("image", "image", name))?;
        let users: Vec<String> = db::groups(c)?
            .into_iter()
            .filter(|g| g.image == name)
            .map(|g| g.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::conflict(
                "ImageInUse",
                format!(
                    "image {name:?} is used by group(s) {}: remove them first (tuchka group rm …)",
                    users.join(", ")
                ),
            ));
        }
        db::delete_image(c, name)?;
        let still_used = db::image_by_sha(c, &img.sha256)?.is_some();
        Ok((!still_used).then_some(img.sha256))
    })?;
    if let Some(sha) = file {
        let path = crate::images::stored_path(ctl, &sha);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove image file");
        }
    }
    ctl.bump();
    ctl.emit(
        "image.deleted",
        &format!("image/{name}"),
        format!("image {name} removed"),
    );
    Ok(())
}
