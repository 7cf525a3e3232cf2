//! A consistent read of the whole state, in a fixed number of queries, for everything that looks
//! at many objects at once: listings, the desired state of a host, the scheduler, the balancer.
//! Views built from it cost time linear in the state, never one query per VM.

use std::collections::HashMap;

use rusqlite::Connection;
use tuchka_api::HostState;
use tuchka_store::{
    self as db, CaptureRow, GroupRow, HostRow, ImageRow, MigrationRow, NetworkRow, NicRow,
    RemovalRow, VmRow, VolumeRow,
};

use crate::error::Result;

/// What is promised on a host: vCPUs, memory and root disk of the VMs placed there, plus those
/// migrating onto it (they hold their place on both hosts until the move ends), and the
/// volumes that live there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Root disks and volumes (virtual sizes), MiB.
    pub disk_mib: u64,
    /// VMs.
    pub vms: u32,
}

impl Usage {
    fn add(&mut self, size: Size) {
        self.cpus += size.cpus;
        self.memory_mib += size.memory_mib;
        self.disk_mib += size.disk_mib;
        self.vms += 1;
    }
}

/// The size of one VM: its group's, or what `vm resize` gave it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Root disk, MiB.
    pub disk_mib: u64,
}

/// The size VM `v` of group `g` must have.
pub fn size_of(v: &VmRow, g: &GroupRow) -> Size {
    Size {
        cpus: v.extra.cpus.unwrap_or(g.cpus),
        memory_mib: v.extra.memory_mib.unwrap_or(g.memory_mib),
        disk_mib: v.extra.disk_mib.unwrap_or(g.disk_mib),
    }
}

/// The rows a [`Snapshot`] is made of.
struct Rows {
    hosts: Vec<HostRow>,
    groups: Vec<GroupRow>,
    vms: Vec<VmRow>,
    nics: Vec<NicRow>,
    networks: Vec<NetworkRow>,
    images: Vec<ImageRow>,
    migrations: Vec<MigrationRow>,
    removals: Vec<RemovalRow>,
    volumes: Vec<VolumeRow>,
    captures: Vec<CaptureRow>,
}

/// The state at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was read, Unix seconds.
    pub now_unix: i64,
    /// A host silent longer than this (s) is down.
    pub down_after_s: i64,
    /// Hosts by name.
    pub hosts: Vec<HostRow>,
    /// Groups by name.
    pub groups: HashMap<String, GroupRow>,
    /// VMs by group and index.
    pub vms: Vec<VmRow>,
    /// NICs by VM and index.
    pub nics: Vec<NicRow>,
    /// Networks by name.
    pub networks: Vec<NetworkRow>,
    /// Images by name.
    pub images: Vec<ImageRow>,
    /// Migrations under way.
    pub migrations: Vec<MigrationRow>,
    /// Removals the hosts have not done yet.
    pub removals: Vec<RemovalRow>,
    /// Volumes by name.
    pub volumes: Vec<VolumeRow>,
    /// Captures asked for, oldest first.
    pub captures: Vec<CaptureRow>,
    host_index: HashMap<String, usize>,
    nics_of: HashMap<String, Vec<usize>>,
    vms_on: HashMap<String, Vec<usize>>,
    vms_of_group: HashMap<String, Vec<usize>>,
    usage: HashMap<String, Usage>,
}

impl Snapshot {
    /// Read everything (call inside a transaction for a consistent view across tables).
    pub fn load(c: &Connection, down_after_s: i64) -> Result<Snapshot> {
        Ok(Self::assemble(
            Rows {
                hosts: db::hosts(c)?,
                groups: db::groups(c)?,
                vms: db::vms(c)?,
                nics: db::nics(c)?,
                networks: db::networks(c)?,
                images: db::images(c)?,
                migrations: db::active_migrations(c)?,
                removals: db::removals(c)?,
                volumes: db::volumes(c)?,
                captures: db::captures(c)?,
            },
            down_after_s,
        ))
    }

    /// What the view of VM `name` needs, in a handful of indexed queries whatever the size of
    /// the cloud: the VM, its group, NICs, volumes and migration, and the hosts they name. None
    /// when there is no such VM. (Usage figures cover only this VM.)
    pub fn load_vm(c: &Connection, name: &str, down_after_s: i64) -> Result<Option<Snapshot>> {
        let Some(vm) = db::vm(c, name)? else {
            return Ok(None);
        };
        let migrations = db::vm_active_migration(c, &vm.id)?
            .into_iter()
            .collect::<Vec<_>>();
        let mut host_ids = vec![vm.host_id.clone()];
        for m in &migrations {
            host_ids.extend([m.source_host.clone(), m.target_host.clone()]);
        }
        if let Some(m) = db::last_migration(c, &vm.id)? {
            host_ids.extend([m.source_host, m.target_host]);
        }
        host_ids.sort();
        host_ids.dedup();
        let mut hosts = vec![];
        for id in &host_ids {
            hosts.extend(db::host(c, id)?);
        }
        Ok(Some(Self::assemble(
            Rows {
                hosts,
                groups: db::group(c, &vm.group)?.into_iter().collect(),
                nics: db::vm_nics(c, &vm.id)?,
                volumes: db::vm_volumes(c, &vm.id)?,
                vms: vec![vm],
                networks: vec![],
                images: vec![],
                migrations,
                removals: vec![],
                captures: vec![],
            },
            down_after_s,
        )))
    }

    fn assemble(r: Rows, down_after_s: i64) -> Snapshot {
        let Rows {
            hosts,
            groups,
            vms,
            nics,
            networks,
            images,
            migrations,
            removals,
            volumes,
            captures,
        } = r;
        let groups: HashMap<String, GroupRow> =
            groups.into_iter().map(|g| (g.name.clone(), g)).collect();
        let host_index = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id.clone(), i))
            .collect();
        let mut nics_of: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in nics.iter().enumerate() {
            nics_of.entry(n.vm_id.clone()).or_default().push(i);
        }
        let mut vms_on: HashMap<String, Vec<usize>> = HashMap::new();
        let mut vms_of_group: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, v) in vms.iter().enumerate() {
            vms_on.entry(v.host_id.clone()).or_default().push(i);
            vms_of_group.entry(v.group.clone()).or_default().push(i);
        }
        let mut usage: HashMap<String, Usage> = HashMap::new();
        let vm_index: HashMap<&str, &VmRow> = vms.iter().map(|v| (v.id.as_str(), v)).collect();
        for v in &vms {
            if let Some(g) = groups.get(&v.group) {
                usage
                    .entry(v.host_id.clone())
                    .or_default()
                    .add(size_of(v, g));
            }
        }
        for m in &migrations {
            if let Some(v) = vm_index.get(m.vm_id.as_str()) {
                if let Some(g) = groups.get(&v.group) {
                    usage
                        .entry(m.target_host.clone())
                        .or_default()
                        .add(size_of(v, g));
                }
            }
        }
        let moving: HashMap<&str, &str> = migrations
            .iter()
            .map(|m| (m.vm_id.as_str(), m.target_host.as_str()))
            .collect();
        for v in &volumes {
            usage.entry(v.host_id.clone()).or_default().disk_mib += v.size_mib;
            // A volume moving with its VM holds its place on the target too.
            if let Some(target) = v.vm_id.as_deref().and_then(|id| moving.get(id)) {
                usage.entry(target.to_string()).or_default().disk_mib += v.size_mib;
            }
        }
        Snapshot {
            now_unix: db::now_unix(),
            down_after_s,
            hosts,
            groups,
            vms,
            nics,
            networks,
            images,
            migrations,
            removals,
            volumes,
            captures,
            host_index,
            nics_of,
            vms_on,
            vms_of_group,
            usage,
        }
    }

    /// The host with this id.
    pub fn host(&self, id: &str) -> Option<&HostRow> {
        self.host_index.get(id).map(|&i| &self.hosts[i])
    }

    /// The name of host `id` (the id itself for a host that is gone).
    pub fn host_name(&self, id: &str) -> String {
        self.host(id)
            .map(|h| h.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// The host reported within `down_after`.
    pub fn is_up(&self, h: &HostRow) -> bool {
        is_up(h, self.now_unix, self.down_after_s)
    }

    /// Host `id` exists and is up.
    pub fn id_is_up(&self, id: &str) -> bool {
        self.host(id).is_some_and(|h| self.is_up(h))
    }

    /// The state a user sees.
    pub fn host_state(&self, h: &HostRow) -> HostState {
        host_state(h, self.is_up(h))
    }

    /// What is promised on host `id`.
    pub fn usage(&self, id: &str) -> Usage {
        self.usage.get(id).copied().unwrap_or_default()
    }

    /// The VMs placed on host `id`, in the snapshot's order.
    pub fn vms_on(&self, id: &str) -> impl Iterator<Item = &VmRow> {
        rows_at(&self.vms_on, id, &self.vms)
    }

    /// The VMs of group `name`, in the snapshot's order.
    pub fn vms_of_group(&self, name: &str) -> impl Iterator<Item = &VmRow> {
        rows_at(&self.vms_of_group, name, &self.vms)
    }

    /// NICs of VM `id`, in order.
    pub fn vm_nics(&self, id: &str) -> impl Iterator<Item = &NicRow> {
        rows_at(&self.nics_of, id, &self.nics)
    }

    /// The volumes attached (or to be attached) to VM `id`, oldest first.
    pub fn vm_volumes(&self, id: &str) -> Vec<&VolumeRow> {
        let mut out: Vec<&VolumeRow> = self
            .volumes
            .iter()
            .filter(|x| x.vm_id.as_deref() == Some(id) && !x.deleting)
            .collect();
        out.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        out
    }

    /// The migration under way of VM `id`.
    pub fn migration_of(&self, vm_id: &str) -> Option<&MigrationRow> {
        self.migrations.iter().find(|m| m.vm_id == vm_id)
    }
}

/// The rows of `rows` that `index` lists under `key`, in order.
fn rows_at<'a, T>(
    index: &'a HashMap<String, Vec<usize>>,
    key: &str,
    rows: &'a [T],
) -> impl Iterator<Item = &'a T> {
    index.get(key).into_iter().flatten().map(move |&i| &rows[i])
}

/// Whether a host reported within `down_after_s` of `now_unix`.
pub fn is_up(h: &HostRow, now_unix: i64, down_after_s: i64) -> bool {
    h.last_seen_unix > 0 && now_unix - h.last_seen_unix <= down_after_s
}

/// The state a user sees for host `h`.
pub fn host_state(h: &HostRow, up: bool) -> HostState {
    if h.revoked {
        HostState::Revoked
    } else if !up {
        HostState::Down
    } else if h.draining {
        HostState::Draining
    } else {
        HostState::Up
    }
}
