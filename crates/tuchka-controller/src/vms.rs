//! VMs: views, power actions, removal, console; and how their operations stand. Moving a VM is
//! [`crate::migrations`].

use std::collections::HashMap;

use rusqlite::Connection;
use tuchka_api::{Operation, PowerState, Vm, VmAddress, VmResize, VmState, VmStop};
use tuchka_core::names;
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, MigrationRow, VmRow};

use crate::error::{Error, Result};
use crate::operations::{self, migration_view, new_op, Step};
use crate::snapshot::{size_of, Size, Snapshot};
use crate::state::Controller;

fn view(ctl: &Controller, s: &Snapshot, v: &VmRow, last: Option<&MigrationRow>) -> Result<Vm> {
    let g = s
        .groups
        .get(&v.group)
        .ok_or_else(|| Error::not_found("group", "group", &v.group))?;
    let up = s.id_is_up(&v.host_id);
    let size = size_of(v, g);
    let host_name = |id: &str| s.host_name(id);
    Ok(Vm {
        name: v.name.clone(),
        id: v.id.clone(),
        group: v.group.clone(),
        index: v.idx,
        state: if up || matches!(v.observed, VmState::Pending | VmState::Lost) {
            v.observed
        } else {
            VmState::Unknown
        },
        desired: v.desired,
        host: v
            .extra
            .lost_from
            .clone()
            .unwrap_or_else(|| s.host_name(&v.host_id)),
        placement_reason: v.placement_reason.clone(),
        image: g.image.clone(),
        cpus: size.cpus,
        memory_mib: size.memory_mib,
        disk_mib: size.disk_mib,
        addresses: s
            .vm_nics(&v.id)
            .map(|n| VmAddress {
                network: n.network.clone(),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
                vm: None,
            })
            .collect(),
        domain: names::domain_name(ctl.cloud_id(), &v.name),
        error: v.error.clone(),
        error_chain: v.error_chain.clone(),
        created_at: v.created_at.clone(),
        migration: s.migration_of(&v.id).map(|m| migration_view(m, host_name)),
        last_migration: last.map(|m| migration_view(m, host_name)),
        cpu_usage: v.cpu_usage,
        volumes: s.vm_volumes(&v.id).iter().map(|x| x.name.clone()).collect(),
        pending_resize: pending_resize(size, v.extra.running_with),
        pause_reason: (v.observed == VmState::Paused)
            .then(|| v.extra.pause_reason.clone())
            .flatten(),
    })
}

/// What of `want` a running VM does not have yet (it gets it at its next start), in words.
fn pending_resize(want: Size, now: Option<(u32, u64, u64)>) -> Option<String> {
    let (cpus, memory_mib, _) = now?;
    let mut parts = vec![];
    if cpus != want.cpus {
        parts.push(format!("cpus {}", want.cpus));
    }
    if memory_mib != want.memory_mib {
        parts.push(format!("memory {} MiB", want.memory_mib));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// All VMs.
pub fn list(ctl: &Controller) -> Result<Vec<Vm>> {
    let (s, last): (_, HashMap<String, MigrationRow>) =
        ctl.read(|c| Ok((ctl.snapshot(c)?, db::last_migrations(c)?)))?;
    s.vms
        .iter()
        .map(|v| view(ctl, &s, v, last.get(&v.id)))
        .collect()
}

/// One VM.
pub fn get(ctl: &Controller, name: &str) -> Result<Vm> {
    // A few indexed rows: the writer's connection, whose page cache stays warm, answers it
    // faster than a read connection (measured: 10,100 against 4,400 `vm show`/s).
    let db = ctl.db();
    let c = db.conn();
    let s = Snapshot::load_vm(c, name, ctl.config().down_after.as_secs() as i64)?
        .ok_or_else(|| Error::not_found("vm", "vm", name))?;
    let v = &s.vms[0];
    view(ctl, &s, v, db::last_migration(c, &v.id)?.as_ref())
}

/// A lost VM (its host was removed) can only be removed.
pub fn refuse_if_lost(v: &VmRow) -> Result<()> {
    if v.observed != VmState::Lost {
        return Ok(());
    }
    Err(Error::conflict(
        "VmLost",
        format!(
            "vm {:?} is lost: its host {} was removed (tuchka host rm --force); remove it (tuchka vm rm {}) and scale its group up again for a new one",
            v.name,
            v.extra.lost_from.as_deref().unwrap_or("?"),
            v.name
        ),
    ))
}

/// Refuse to `what` while one of `vms` is migrating: a VM is in at most one change of place
/// at a time, and its power state must not change under a live copy.
pub fn refuse_while_migrating(c: &Connection, vms: &[VmRow], what: &str) -> Result<()> {
    let active = db::active_migrations(c)?;
    for v in vms {
        if let Some(m) = active.iter().find(|m| m.vm_id == v.id) {
            return Err(Error::conflict(
                "VmMigrating",
                format!(
                    "vm {:?} is migrating (operation {}): wait for it to finish (tuchka op wait {}), then {what}",
                    v.name, m.id, m.id
                ),
            ));
        }
    }
    Ok(())
}

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

impl VmAction {
    /// The action named in the URL.
    pub fn parse(s: &str) -> Option<VmAction> {
        Some(match s {
            "start" => VmAction::Start,
            "stop" => VmAction::Stop,
            "pause" => VmAction::Pause,
            "resume" => VmAction::Resume,
            "reboot" => VmAction::Reboot,
            _ => return None,
        })
    }
}

/// Ask a VM to change power state.
pub fn action(ctl: &Controller, name: &str, action: VmAction, stop: VmStop) -> Result<Operation> {
    operations::start(ctl, |c| {
        let mut v = db::vm(c, name)?.ok_or_else(|| Error::not_found("vm", "vm", name))?;
        if v.deleting {
            return Err(Error::conflict(
                "VmDeleting",
                format!("vm {name:?} is being removed"),
            ));
        }
        refuse_if_lost(&v)?;
        let verb = match action {
            VmAction::Start => "start it",
            VmAction::Stop => "stop it",
            VmAction::Pause => "pause it",
            VmAction::Resume => "resume it",
            VmAction::Reboot => "reboot it",
        };
        refuse_while_migrating(c, std::slice::from_ref(&v), verb)?;
        let target = format!("vm/{name}");
        let op = match action {
            VmAction::Reboot => {
                if v.desired != PowerState::Running {
                    return Err(Error::conflict(
                        "VmNotRunning",
                        format!(
                            "vm {name:?} is {}: start it first (tuchka vm start {name})",
                            v.desired
                        ),
                    ));
                }
                v.reboot_seq = v.reboot_seq.max(v.reboot_done) + 1;
                new_op(
                    OpKind::VmReboot {
                        vm: name.to_string(),
                        seq: v.reboot_seq,
                    },
                    &target,
                    1,
                    "rebooting",
                )
            }
            _ => {
                if action == VmAction::Resume
                    && v.desired == PowerState::Running
                    && v.observed == VmState::Paused
                    && v.extra.pause_reason.is_some()
                {
                    // Its host paused it (a full pool): resume once, now that there is room.
                    v.extra.resume_seq = v.extra.resume_seq.max(v.extra.resume_done) + 1;
                    v.error = None;
                    v.error_chain.clear();
                    db::update_vm(c, &v)?;
                    return Ok(new_op(
                        OpKind::VmResume {
                            vm: name.to_string(),
                        },
                        &target,
                        1,
                        "resuming (it was paused by its host)",
                    ));
                }
                if action == VmAction::Resume && v.desired != PowerState::Paused {
                    return Err(Error::conflict(
                        "VmNotPaused",
                        format!("vm {name:?} is not paused (it is {})", v.desired),
                    ));
                }
                if action == VmAction::Pause && v.desired == PowerState::Stopped {
                    return Err(Error::conflict(
                        "VmStopped",
                        format!("vm {name:?} is stopped: start it first (tuchka vm start {name})"),
                    ));
                }
                let vm = name.to_string();
                let (kind, message) = match action {
                    VmAction::Start => (OpKind::VmStart { vm }, "starting"),
                    VmAction::Stop if stop.force => (OpKind::VmStop { vm }, "powering off"),
                    VmAction::Stop => (OpKind::VmStop { vm }, "shutting down (ACPI)"),
                    VmAction::Pause => (OpKind::VmPause { vm }, "pausing"),
                    _ => (OpKind::VmResume { vm }, "resuming"),
                };
                if let Some(want) = kind.wanted_power() {
                    v.desired = want;
                }
                if action == VmAction::Stop {
                    v.force_stop = stop.force;
                    v.stop_timeout_s = stop.timeout_s.unwrap_or(60).clamp(1, 3600);
                }
                new_op(kind, &target, 1, message)
            }
        };
        v.error = None;
        v.error_chain.clear();
        db::update_vm(c, &v)?;
        Ok(op)
    })
}

/// `vm rm`: removes one VM; its group shrinks by one.
pub fn delete(ctl: &Controller, name: &str) -> Result<Operation> {
    operations::start(ctl, |c| {
        let mut v = db::vm(c, name)?.ok_or_else(|| Error::not_found("vm", "vm", name))?;
        refuse_while_migrating(c, std::slice::from_ref(&v), "remove it")?;
        v.deleting = true;
        db::update_vm(c, &v)?;
        if let Some(g) = db::group(c, &v.group)? {
            db::update_group(c, &g.name, g.count.saturating_sub(1), g.deleting)?;
        }
        let op = new_op(
            OpKind::VmDelete {
                vm: name.to_string(),
                id: v.id.clone(),
            },
            &format!("vm/{name}"),
            1,
            "removing",
        );
        Ok(op)
    })
}

/// The serial console log of a VM, as its host's agent shipped it (the last MiB; the same for
/// a VM on any host, see [`crate::consoles`]).
pub fn console(ctl: &Controller, name: &str) -> Result<String> {
    crate::consoles::read(ctl, name, None).map(|l| l.text)
}

/// How a VM power or removal operation stands.
pub fn evaluate(c: &Connection, kind: &OpKind) -> Result<Step> {
    let removed = |vm: &str| Step::Failed {
        error: format!("vm {vm:?} was removed"),
        chain: vec![],
    };
    Ok(match kind {
        OpKind::VmStart { vm }
        | OpKind::VmStop { vm }
        | OpKind::VmPause { vm }
        | OpKind::VmResume { vm } => {
            let want = kind.wanted_power().unwrap_or(PowerState::Running);
            let Some(v) = db::vm(c, vm)? else {
                return Ok(removed(vm));
            };
            if v.desired != want {
                return Ok(Step::Failed {
                    error: format!("superseded: vm {vm} was asked to be {}", v.desired),
                    chain: vec![],
                });
            }
            if let Some((error, chain)) = crate::groups::vm_failure(&v) {
                return Ok(Step::Failed { error, chain });
            }
            let reached = matches!(
                (v.desired, v.observed),
                (PowerState::Running, VmState::Running)
                    | (PowerState::Paused, VmState::Paused)
                    | (PowerState::Stopped, VmState::Stopped)
            );
            if reached {
                Step::Succeeded {
                    message: format!("vm {vm} is {}", v.observed),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: format!("vm {vm} is {}", v.observed),
                }
            }
        }
        OpKind::VmReboot { vm, seq } => {
            let Some(v) = db::vm(c, vm)? else {
                return Ok(removed(vm));
            };
            if let Some((error, chain)) = crate::groups::vm_failure(&v) {
                return Ok(Step::Failed { error, chain });
            }
            if v.reboot_done >= *seq {
                Step::Succeeded {
                    message: format!("vm {vm} rebooted"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "waiting for the host to reboot it".into(),
                }
            }
        }
        OpKind::VmDelete { vm, id } => {
            if db::vm_by_id(c, id)?.is_none() {
                Step::Succeeded {
                    message: format!("vm {vm} removed"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "removing".into(),
                }
            }
        }
        OpKind::VmResize { vm, vm_id, now } => {
            let Some(v) = db::vm_by_id(c, vm_id)? else {
                return Ok(removed(vm));
            };
            if let Some(e) = &v.extra.resize_error {
                return Ok(Step::Failed {
                    error: format!("vm {vm}: the new size could not be applied: {e}"),
                    chain: vec![],
                });
            }
            let seen = v.extra.running_with;
            let reached = match (now, seen) {
                ((None, None, None), _) => true,
                (_, None) => false,
                ((cpus, memory, disk), Some((c_now, m_now, d_now))) => {
                    cpus.is_none_or(|x| x == c_now)
                        && memory.is_none_or(|x| x == m_now)
                        && disk.is_none_or(|x| d_now >= x)
                }
            };
            if reached {
                Step::Succeeded {
                    message: String::new(),
                }
            } else {
                // The operation's message (what applies now, what at the next start) stays.
                Step::Running {
                    done: 0,
                    message: String::new(),
                }
            }
        }
        _ => Step::Failed {
            error: "not a VM operation".into(),
            chain: vec![],
        },
    })
}

/// `vm resize`: the root disk grows at once (the running guest sees it); vCPUs go up at once
/// while running, up to the VM's maximum; the rest waits for the next start. The operation's
/// message says which is which. The scheduler counts the new size from now on.
pub fn resize(ctl: &Controller, name: &str, req: VmResize) -> Result<Operation> {
    if req.cpus.is_none() && req.memory_mib.is_none() && req.disk_mib.is_none() {
        return Err(Error::invalid(
            "InvalidResize",
            "say what to change: --cpus, --memory and/or --disk",
        ));
    }
    operations::start(ctl, |c| {
        let mut v = db::vm(c, name)?.ok_or_else(|| Error::not_found("vm", "vm", name))?;
        if v.deleting {
            return Err(Error::conflict(
                "VmDeleting",
                format!("vm {name:?} is being removed"),
            ));
        }
        refuse_if_lost(&v)?;
        refuse_while_migrating(c, std::slice::from_ref(&v), "resize it")?;
        let g =
            db::group(c, &v.group)?.ok_or_else(|| Error::not_found("group", "group", &v.group))?;
        let have = size_of(&v, &g);
        let want = Size {
            cpus: req.cpus.unwrap_or(have.cpus),
            memory_mib: req.memory_mib.unwrap_or(have.memory_mib),
            disk_mib: req.disk_mib.unwrap_or(have.disk_mib),
        };
        crate::groups::check_size(want.cpus, want.memory_mib)?;
        if want.disk_mib < have.disk_mib {
            return Err(Error::invalid(
                "ShrinkRefused",
                format!(
                    "vm {name:?} has a {} MiB disk: a disk only grows (shrinking would cut its file system)",
                    have.disk_mib
                ),
            ));
        }
        if want.disk_mib > crate::groups::MAX_DISK_MIB {
            return Err(Error::invalid(
                "InvalidDisk",
                format!(
                    "disk {} MiB is larger than {} TiB",
                    want.disk_mib,
                    crate::groups::MAX_DISK_MIB >> 20
                ),
            ));
        }
        let s = ctl.snapshot(c)?;
        if let Some(h) = s.host(&v.host_id) {
            let cap = crate::scheduler::capacity(&s, h, ctl.config().disk_reserve);
            let more = tuchka_core::placement::GroupRequest {
                group: g.name.clone(),
                count: 1,
                cpus: want.cpus.saturating_sub(have.cpus),
                memory_mib: want.memory_mib.saturating_sub(have.memory_mib),
                disk_mib: want.disk_mib - have.disk_mib,
                image_sha256: String::new(),
                image_mib: 0,
                volume_mib: 0,
                anti_affinity: false,
                existing: Default::default(),
                policy: g.placement,
            };
            let cap = tuchka_core::placement::HostCapacity {
                draining: false,
                cached_images: vec![String::new()],
                ..cap
            };
            if let Some(why) =
                tuchka_core::placement::refuse_reason(&cap, &more, &ctl.config().ratios, 0)
            {
                return Err(Error::conflict(
                    "PlacementFailed",
                    format!("vm {name:?} cannot grow on host {}: {why}", h.name),
                ));
            }
        }
        let running = v.desired != PowerState::Stopped && v.observed != VmState::Stopped;
        let max_cpus = v.extra.max_cpus.max(have.cpus);
        let cpus_now =
            running && want.cpus != have.cpus && want.cpus > have.cpus && want.cpus <= max_cpus;
        let disk_now = running && want.disk_mib != have.disk_mib;
        let mut now_words = vec![];
        let mut later_words = vec![];
        if want.disk_mib != have.disk_mib {
            if running {
                now_words.push(format!("disk {} MiB", want.disk_mib));
            } else {
                later_words.push(format!("disk {} MiB", want.disk_mib));
            }
        }
        if want.cpus != have.cpus {
            let w = format!("cpus {}", want.cpus);
            if cpus_now {
                now_words.push(w);
            } else {
                later_words.push(if running && want.cpus > max_cpus {
                    format!("{w} (above its maximum of {max_cpus} while running)")
                } else {
                    w
                });
            }
        }
        if want.memory_mib != have.memory_mib {
            later_words.push(format!("memory {} MiB", want.memory_mib));
        }
        let mut message = String::new();
        if !now_words.is_empty() {
            message.push_str(&format!("now: {}", now_words.join(", ")));
        }
        if !later_words.is_empty() {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "at the next start: {}{}",
                later_words.join(", "),
                if running {
                    format!(" (tuchka vm stop {name} --wait && tuchka vm start {name})")
                } else {
                    String::new()
                }
            ));
        }
        if message.is_empty() {
            message = "nothing to change".into();
        }
        v.extra.cpus = Some(want.cpus);
        v.extra.memory_mib = Some(want.memory_mib);
        v.extra.disk_mib = Some(want.disk_mib);
        v.extra.resize_error = None;
        db::update_vm(c, &v)?;
        let now = (
            cpus_now.then_some(want.cpus),
            None,
            disk_now.then_some(want.disk_mib),
        );
        Ok(new_op(
            OpKind::VmResize {
                vm: name.to_string(),
                vm_id: v.id.clone(),
                now,
            },
            &format!("vm/{name}"),
            1,
            &message,
        ))
    })
}
