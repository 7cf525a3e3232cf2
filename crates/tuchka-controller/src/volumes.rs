//! Data volumes: thin qcow2 disks in one host's pool, attached to at most one VM on that host.
//!
//! The controller records what is wanted (`vm_id`, `size_mib`, `deleting`); the host's agent
//! makes the file, plugs it into the VM's domain, grows it, and removes it when named; its
//! reports say what is there (`present`, sizes, `attached_to`). A volume's state is derived
//! from the two, so it can never disagree with the host.

use rusqlite::Connection;
use tuchka_api::{Operation, Volume, VolumeAttach, VolumeCreate, VolumeResize, VolumeState};
use tuchka_core::names::validate_name;
use tuchka_core::ops::OpKind;
use tuchka_core::placement;
use tuchka_store::{self as db, VolumeRow};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// Largest volume, MiB (64 TiB).
pub const MAX_SIZE_MIB: u64 = 64 << 20;
/// Most volumes one VM may have (its disks vdb to vdz).
pub const MAX_PER_VM: usize = 25;

/// Refuse a size out of range.
pub fn check_size(size_mib: u64) -> Result<()> {
    if size_mib == 0 || size_mib > MAX_SIZE_MIB {
        return Err(Error::invalid(
            "InvalidSize",
            format!(
                "volume size {size_mib} MiB is out of range: use 1 MiB to {} TiB, e.g. --size 10G",
                MAX_SIZE_MIB >> 20
            ),
        ));
    }
    Ok(())
}

/// The state of a volume, from what is wanted and what its host last said.
pub fn state_of(v: &VolumeRow) -> VolumeState {
    if v.deleting {
        return VolumeState::Deleting;
    }
    let settled = v.present
        && v.observed_size_mib >= v.size_mib
        && v.attached_to.as_deref() == v.vm_id.as_deref();
    if v.error.is_some() && !settled {
        return VolumeState::Error;
    }
    if !v.present {
        return VolumeState::Pending;
    }
    match (v.vm_id.as_deref(), v.attached_to.as_deref()) {
        (Some(want), Some(have)) if want == have => VolumeState::Attached,
        (Some(_), _) => VolumeState::Attaching,
        (None, Some(_)) => VolumeState::Detaching,
        (None, None) => VolumeState::Available,
    }
}

fn view(s: &Snapshot, v: &VolumeRow) -> Volume {
    let vm_name = |id: &str| {
        s.vms
            .iter()
            .find(|x| x.id == id)
            .map(|x| x.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    Volume {
        name: v.name.clone(),
        id: v.id.clone(),
        host: s.host_name(&v.host_id),
        size_mib: v.size_mib.max(v.observed_size_mib),
        allocated_mib: v.allocated_mib,
        vm: v.vm_id.as_deref().or(v.attached_to.as_deref()).map(vm_name),
        state: state_of(v),
        with_vm: v.with_vm,
        error: v.error.clone(),
        created_at: v.created_at.clone(),
    }
}

/// All volumes.
pub fn list(ctl: &Controller) -> Result<Vec<Volume>> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    Ok(s.volumes.iter().map(|v| view(&s, v)).collect())
}

/// One volume.
pub fn get(ctl: &Controller, name: &str) -> Result<Volume> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    let v = s
        .volumes
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| Error::not_found("volume", "volume", name))?;
    Ok(view(&s, v))
}

fn row(c: &Connection, name: &str) -> Result<VolumeRow> {
    let v = db::volume(c, name)?.ok_or_else(|| Error::not_found("volume", "volume", name))?;
    if v.deleting {
        return Err(Error::conflict(
            "VolumeDeleting",
            format!("volume {name:?} is being removed"),
        ));
    }
    Ok(v)
}

fn new_row(
    name: &str,
    host_id: &str,
    size_mib: u64,
    vm_id: Option<&str>,
    with_vm: bool,
) -> VolumeRow {
    VolumeRow {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        host_id: host_id.to_string(),
        size_mib,
        vm_id: vm_id.map(str::to_string),
        with_vm,
        deleting: false,
        present: false,
        observed_size_mib: 0,
        allocated_mib: 0,
        attached_to: None,
        error: None,
        created_at: db::now(),
    }
}

fn refuse_taken(c: &Connection, name: &str) -> Result<()> {
    if db::volume(c, name)?.is_some() {
        return Err(Error::conflict(
            "VolumeExists",
            format!("a volume named {name:?} already exists (see: tuchka volume list)"),
        ));
    }
    Ok(())
}

/// `volume create`: recorded at once on the host chosen (`--host`, the host of `--near`, or
/// the one with the most free space); its host makes the file on its next pass.
pub fn create(ctl: &Controller, req: VolumeCreate) -> Result<Volume> {
    validate_name("volume", &req.name).map_err(|_| Error::bad_name("volume", &req.name))?;
    check_size(req.size_mib)?;
    let name = req.name.clone();
    ctl.db().atomic(|c| {
        refuse_taken(c, &req.name)?;
        let s = ctl.snapshot(c)?;
        let caps = crate::scheduler::capacities(&s, ctl.config().disk_reserve);
        let ratios = ctl.config().ratios;
        let only = match (&req.host, &req.near) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "InvalidVolume",
                    "give --host or --near, not both",
                ))
            }
            (Some(h), None) => Some(
                s.hosts
                    .iter()
                    .find(|x| &x.name == h)
                    .ok_or_else(|| Error::not_found("host", "host", h))?
                    .id
                    .clone(),
            ),
            (None, Some(vm)) => Some(
                s.vms
                    .iter()
                    .find(|x| &x.name == vm)
                    .ok_or_else(|| Error::not_found("vm", "vm", vm))?
                    .host_id
                    .clone(),
            ),
            (None, None) => None,
        };
        let host_id = match only {
            Some(id) => {
                let cap = caps
                    .iter()
                    .find(|h| h.id == id)
                    .ok_or_else(|| Error::not_found("host", "host", &id))?;
                if let Some(why) = placement::volume_refusal(cap, req.size_mib, &ratios) {
                    return Err(Error::conflict(
                        "PlacementFailed",
                        format!(
                            "volume {:?} cannot be made on host {}: {why}",
                            req.name, cap.name
                        ),
                    ));
                }
                id
            }
            None => {
                placement::place_volume(&caps, req.size_mib, &ratios)
                    .map_err(|why| {
                        Error::conflict(
                            "PlacementFailed",
                            format!("volume {:?} cannot be placed: {why}", req.name),
                        )
                    })?
                    .host_id
            }
        };
        db::save_volume(c, &new_row(&req.name, &host_id, req.size_mib, None, false))?;
        Ok::<_, Error>(())
    })?;
    ctl.bump();
    ctl.emit(
        "volume.created",
        &format!("volume/{name}"),
        format!("volume {name} recorded ({} MiB)", req.size_mib),
    );
    get(ctl, &name)
}

/// The volume `group create --volume-size` gives VM `vm` (named `<vm>-data`), in the same
/// transaction as the VM.
pub fn insert_for_vm(
    c: &Connection,
    s: &Snapshot,
    vm: &str,
    vm_id: &str,
    host_id: &str,
    size_mib: u64,
    with_vm: bool,
) -> Result<()> {
    let name = format!("{vm}-data");
    if s.volumes.iter().any(|v| v.name == name) {
        return Err(Error::conflict(
            "VolumeExists",
            format!("a volume named {name:?} already exists (kept from an earlier VM? remove it: tuchka volume rm {name})"),
        ));
    }
    refuse_taken(c, &name)?;
    db::save_volume(c, &new_row(&name, host_id, size_mib, Some(vm_id), with_vm))?;
    Ok(())
}

/// A VM is gone: its own volumes go too, the others stay, detached.
pub fn release_vm(c: &Connection, vm_id: &str) -> Result<()> {
    for mut v in db::volumes(c)?
        .into_iter()
        .filter(|v| v.vm_id.as_deref() == Some(vm_id))
    {
        v.vm_id = None;
        v.deleting = v.with_vm;
        db::save_volume(c, &v)?;
    }
    Ok(())
}

/// `volume attach`: hot-plugged into a running VM, or added to a stopped one's disks.
pub fn attach(ctl: &Controller, name: &str, req: VolumeAttach) -> Result<Operation> {
    operations::start(ctl, |c| {
        let mut v = row(c, name)?;
        let vm = db::vm(c, &req.vm)?.ok_or_else(|| Error::not_found("vm", "vm", &req.vm))?;
        if vm.deleting {
            return Err(Error::conflict(
                "VmDeleting",
                format!("vm {:?} is being removed", vm.name),
            ));
        }
        if let Some(other) = &v.vm_id {
            let other = db::vm_by_id(c, other)?.map(|x| x.name).unwrap_or_default();
            return Err(Error::conflict(
                "VolumeAttached",
                if other == vm.name {
                    format!("volume {name:?} is already attached to vm {other:?}")
                } else {
                    format!("volume {name:?} is attached to vm {other:?}: detach it first (tuchka volume detach {name})")
                },
            ));
        }
        let hosts = db::hosts(c)?;
        let host_name = |id: &str| {
            hosts
                .iter()
                .find(|h| h.id == id)
                .map(|h| h.name.clone())
                .unwrap_or_else(|| id.to_string())
        };
        if vm.host_id != v.host_id {
            return Err(Error::conflict(
                "VolumeElsewhere",
                format!(
                    "volume {name:?} lives on host {} and vm {:?} runs on host {}: a volume attaches only to a VM on its host (move the VM: tuchka vm migrate {} --to {}, or make a volume near it: tuchka volume create NAME --size SIZE --near {})",
                    host_name(&v.host_id),
                    vm.name,
                    host_name(&vm.host_id),
                    vm.name,
                    host_name(&v.host_id),
                    vm.name
                ),
            ));
        }
        crate::vms::refuse_while_migrating(c, std::slice::from_ref(&vm), "attach the volume")?;
        let attached = db::volumes(c)?
            .iter()
            .filter(|x| x.vm_id.as_deref() == Some(vm.id.as_str()) && !x.deleting)
            .count();
        if attached >= MAX_PER_VM {
            return Err(Error::conflict(
                "TooManyVolumes",
                format!(
                    "vm {:?} has {attached} volumes, the most it can have",
                    vm.name
                ),
            ));
        }
        v.vm_id = Some(vm.id.clone());
        v.error = None;
        db::save_volume(c, &v)?;
        Ok(new_op(
            OpKind::VolumeAttach {
                volume: name.to_string(),
                volume_id: v.id.clone(),
                vm: vm.name.clone(),
                vm_id: vm.id.clone(),
            },
            &format!("volume/{name}"),
            1,
            &format!("attaching to vm {}", vm.name),
        ))
    })
}

/// `volume detach`: unplugged from its VM (running or not).
pub fn detach(ctl: &Controller, name: &str) -> Result<Operation> {
    operations::start(ctl, |c| {
        let mut v = row(c, name)?;
        let Some(vm_id) = v.vm_id.clone() else {
            return Err(Error::conflict(
                "VolumeNotAttached",
                format!("volume {name:?} is not attached"),
            ));
        };
        if let Some(vm) = db::vm_by_id(c, &vm_id)? {
            crate::vms::refuse_while_migrating(c, std::slice::from_ref(&vm), "detach the volume")?;
        }
        v.vm_id = None;
        v.error = None;
        db::save_volume(c, &v)?;
        Ok(new_op(
            OpKind::VolumeDetach {
                volume: name.to_string(),
                volume_id: v.id.clone(),
            },
            &format!("volume/{name}"),
            1,
            "detaching",
        ))
    })
}

/// `volume resize`: grow only; a VM using it sees the new size at once.
pub fn resize(ctl: &Controller, name: &str, req: VolumeResize) -> Result<Operation> {
    check_size(req.size_mib)?;
    operations::start(ctl, |c| {
        let mut v = row(c, name)?;
        let have = v.size_mib.max(v.observed_size_mib);
        if req.size_mib < have {
            return Err(Error::invalid(
                "ShrinkRefused",
                format!(
                    "volume {name:?} is {have} MiB: a volume only grows (shrinking would cut the data at its end)"
                ),
            ));
        }
        let host = db::host(c, &v.host_id)?;
        let s = ctl.snapshot(c)?;
        if let Some(h) = host {
            let cap = crate::scheduler::capacity(&s, &h, ctl.config().disk_reserve);
            let more = req.size_mib - have;
            if more > 0 {
                if let Some(why) = placement::volume_refusal(&cap, more, &ctl.config().ratios) {
                    return Err(Error::conflict(
                        "PlacementFailed",
                        format!("volume {name:?} cannot grow on host {}: {why}", h.name),
                    ));
                }
            }
        }
        v.size_mib = req.size_mib;
        v.error = None;
        db::save_volume(c, &v)?;
        Ok(new_op(
            OpKind::VolumeResize {
                volume: name.to_string(),
                volume_id: v.id.clone(),
                size_mib: req.size_mib,
            },
            &format!("volume/{name}"),
            1,
            &format!("growing to {} MiB", req.size_mib),
        ))
    })
}

/// `volume rm`: refused while attached; its host removes the file on its next pass.
pub fn delete(ctl: &Controller, name: &str) -> Result<()> {
    ctl.db().atomic(|c| {
        let mut v = row(c, name)?;
        if let Some(vm_id) = v.vm_id.as_deref().or(v.attached_to.as_deref()) {
            let vm = db::vm_by_id(c, vm_id)?
                .map(|x| x.name)
                .unwrap_or_else(|| vm_id.to_string());
            return Err(Error::conflict(
                "VolumeAttached",
                format!("volume {name:?} is attached to vm {vm:?}: detach it first (tuchka volume detach {name})"),
            ));
        }
        if v.present {
            v.deleting = true;
            db::save_volume(c, &v)?;
        } else {
            db::delete_volume(c, &v.id)?;
        }
        Ok::<_, Error>(())
    })?;
    ctl.bump();
    ctl.emit(
        "volume.removed",
        &format!("volume/{name}"),
        format!("volume {name} removed"),
    );
    Ok(())
}

/// Record what host `host_id` says of its volumes; rows being removed go once the file is gone.
pub fn apply_observed(
    c: &Connection,
    host_id: &str,
    seen: &[tuchka_api::agent::VolumeObserved],
) -> Result<Vec<(String, String)>> {
    let mut changes = vec![];
    for mut v in db::volumes(c)?.into_iter().filter(|v| v.host_id == host_id) {
        let before = state_of(&v);
        match seen.iter().find(|o| o.id == v.id) {
            None if v.deleting => {
                db::delete_volume(c, &v.id)?;
                changes.push((format!("volume {}", v.name), "removed".into()));
                continue;
            }
            None => {
                v.present = false;
                v.attached_to = None;
            }
            Some(o) => {
                v.present = true;
                v.observed_size_mib = o.size_mib;
                v.allocated_mib = o.allocated_mib;
                v.attached_to = o.attached_to.clone();
                v.error = o.error.clone();
            }
        }
        db::save_volume(c, &v)?;
        let after = state_of(&v);
        if after != before {
            changes.push((format!("volume {}", v.name), after.to_string()));
        }
    }
    Ok(changes)
}

/// How a volume operation stands.
pub fn evaluate(c: &Connection, kind: &OpKind) -> Result<Step> {
    let (volume, id) = match kind {
        OpKind::VolumeAttach {
            volume, volume_id, ..
        }
        | OpKind::VolumeDetach { volume, volume_id }
        | OpKind::VolumeResize {
            volume, volume_id, ..
        } => (volume, volume_id),
        _ => {
            return Ok(Step::Failed {
                error: "not a volume operation".into(),
                chain: vec![],
            })
        }
    };
    let Some(v) = db::volumes(c)?.into_iter().find(|v| &v.id == id) else {
        return Ok(Step::Failed {
            error: format!("volume {volume:?} was removed"),
            chain: vec![],
        });
    };
    let (done, superseded, what) = match kind {
        OpKind::VolumeAttach { vm, vm_id, .. } => (
            v.present && v.attached_to.as_deref() == Some(vm_id.as_str()),
            v.vm_id.as_deref() != Some(vm_id.as_str()),
            format!("volume {volume} attached to vm {vm}"),
        ),
        OpKind::VolumeDetach { .. } => (
            v.present && v.attached_to.is_none(),
            v.vm_id.is_some(),
            format!("volume {volume} detached"),
        ),
        OpKind::VolumeResize { size_mib, .. } => (
            v.present && v.observed_size_mib >= *size_mib,
            v.size_mib != *size_mib,
            format!("volume {volume} is {} MiB", v.observed_size_mib),
        ),
        _ => unreachable!("matched above"),
    };
    Ok(if done {
        Step::Succeeded { message: what }
    } else if superseded {
        Step::Failed {
            error: format!("superseded: volume {volume} was changed again"),
            chain: vec![],
        }
    } else if let Some(e) = &v.error {
        if let OpKind::VolumeAttach { .. } = kind {
            // Not plugged in: it stays where it was, available.
            let mut v = v.clone();
            v.vm_id = None;
            db::save_volume(c, &v)?;
        }
        Step::Failed {
            error: format!("volume {volume}: {e}"),
            chain: vec![],
        }
    } else {
        Step::Running {
            done: 0,
            message: format!("volume {volume} is {}", state_of(&v)),
        }
    })
}
