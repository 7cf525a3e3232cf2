//! Operations move on when hosts report: each running operation is re-evaluated against the
//! observed state after every report and every change, and on a timer.
//!
//! An operation that fails part-way rolls back what it added (a group create removes the whole
//! group, a scale up removes the VMs it added, a network that could not be built is removed) and
//! is marked failed only when the rollback is complete, so `--wait` returns to a clean state.

use std::time::Duration;

use rusqlite::Connection;
use serde_json::Value;
use tuchka_api::{ApiError, PowerState, VmState};
use tuchka_store::{self as db, OpRow};

use crate::error::{Error, Result};
use crate::state::Controller;

/// An operation still running after this long fails.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What became of one evaluation.
#[derive(Debug, PartialEq)]
enum Step {
    /// Still going; new progress.
    Running { done: u32, message: String },
    /// Something failed: roll back (side effects done), then fail with this error.
    RollingBack { error: String },
    /// Finished well.
    Succeeded { message: String },
    /// Finished badly.
    Failed { error: String },
}

/// Re-evaluate every running operation and finish deletions. Cheap; call it often.
pub fn progress(ctl: &Controller) {
    if let Err(e) = try_progress(ctl) {
        tracing::error!(error = %e, "evaluating operations failed");
    }
}

fn try_progress(ctl: &Controller) -> Result<()> {
    let mut finished = vec![];
    let mut rolled_back = false;
    ctl.db().atomic(|c| {
        finalize_deletions(c)?;
        for mut o in db::running_operations(c)? {
            let step = evaluate(c, &mut o)?;
            let age = humantime::parse_rfc3339(&o.op.created_at)
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let step = match step {
                Step::Running { .. } if age > OP_TIMEOUT => Step::Failed {
                    error: format!(
                        "timed out after {} s waiting for the host (see: tuchka host list)",
                        OP_TIMEOUT.as_secs()
                    ),
                },
                s => s,
            };
            match step {
                Step::Running { done, message } => {
                    if o.op.done != done || o.op.message != message {
                        o.op.done = done;
                        o.op.message = message;
                        db::save_operation(c, &o)?;
                    }
                }
                Step::RollingBack { error } => {
                    rolled_back = true;
                    o.op.message = format!("rolling back: {error}");
                    o.params["rollback_error"] = Value::String(error);
                    db::save_operation(c, &o)?;
                }
                Step::Succeeded { message } => {
                    o.op.state = "succeeded".into();
                    o.op.done = o.op.total;
                    o.op.message = message;
                    o.op.finished_at = Some(db::now());
                    db::save_operation(c, &o)?;
                    finished.push(o.op.clone());
                }
                Step::Failed { error } => {
                    o.op.state = "failed".into();
                    o.op.message = error.clone();
                    o.op.error = Some(ApiError {
                        code: "OperationFailed".into(),
                        message: error,
                        chain: vec![],
                    });
                    o.op.finished_at = Some(db::now());
                    db::save_operation(c, &o)?;
                    finished.push(o.op.clone());
                }
            }
        }
        Ok::<_, Error>(())
    })?;
    if rolled_back {
        ctl.bump();
    }
    for op in finished {
        ctl.emit(
            "operation.finished",
            &op.target,
            format!("{} {}: {} ({})", op.kind, op.target, op.state, op.message),
        );
    }
    Ok(())
}

/// Remove rows whose deletion the hosts have completed.
fn finalize_deletions(c: &Connection) -> Result<()> {
    for g in db::groups(c)? {
        if g.deleting && db::group_vms(c, &g.name)?.is_empty() {
            db::delete_group(c, &g.name)?;
        }
    }
    for n in db::networks(c)? {
        if n.deleting && db::network_presence(c, &n.name)?.is_empty() {
            db::delete_network(c, &n.name)?;
        }
    }
    Ok(())
}

fn param<'a>(o: &'a OpRow, key: &str) -> &'a str {
    o.params
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn param_list(o: &OpRow, key: &str) -> Vec<String> {
    o.params
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn vm_failure(v: &db::VmRow) -> Option<String> {
    (v.observed == VmState::Error).then(|| {
        format!(
            "vm {}: {}",
            v.name,
            v.error.as_deref().unwrap_or("failed on its host")
        )
    })
}

fn evaluate(c: &Connection, o: &mut OpRow) -> Result<Step> {
    let rollback = o
        .params
        .get("rollback_error")
        .and_then(Value::as_str)
        .map(String::from);
    Ok(match o.op.kind.as_str() {
        "group.create" => {
            let group = param(o, "group").to_string();
            let Some(g) = db::group(c, &group)? else {
                return Ok(Step::Failed {
                    error: rollback.unwrap_or_else(|| format!("group {group:?} was removed")),
                });
            };
            if rollback.is_some() {
                let left = db::group_vms(c, &group)?.len() as u32;
                return Ok(Step::Running {
                    done: o.op.done,
                    message: format!("rolling back: {left} VMs left to remove"),
                });
            }
            let vms: Vec<db::VmRow> = db::group_vms(c, &group)?
                .into_iter()
                .filter(|v| !v.deleting)
                .collect();
            if let Some(error) = vms.iter().find_map(vm_failure) {
                db::update_group(c, &group, g.count, true)?;
                for mut v in db::group_vms(c, &group)? {
                    v.deleting = true;
                    db::update_vm(c, &v)?;
                }
                return Ok(Step::RollingBack { error });
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
        "group.scale" => {
            let group = param(o, "group").to_string();
            let added = param_list(o, "added");
            let removed = param_list(o, "removed");
            let mut added_rows = vec![];
            for id in &added {
                if let Some(v) = db::vm_by_id(c, id)? {
                    added_rows.push(v);
                }
            }
            let mut removed_left = 0;
            for id in &removed {
                removed_left += u32::from(db::vm_by_id(c, id)?.is_some());
            }
            if let Some(error) = rollback {
                return Ok(if added_rows.is_empty() {
                    Step::Failed { error }
                } else {
                    Step::Running {
                        done: o.op.done,
                        message: format!("rolling back: {} VMs left to remove", added_rows.len()),
                    }
                });
            }
            if let Some(error) = added_rows.iter().find_map(vm_failure) {
                for mut v in added_rows {
                    v.deleting = true;
                    db::update_vm(c, &v)?;
                }
                if let Some(g) = db::group(c, &group)? {
                    let previous = o
                        .params
                        .get("previous")
                        .and_then(Value::as_u64)
                        .unwrap_or(g.count as u64) as u32;
                    db::update_group(c, &group, previous, g.deleting)?;
                }
                return Ok(Step::RollingBack { error });
            }
            let running = added_rows
                .iter()
                .filter(|v| v.observed == VmState::Running)
                .count() as u32;
            let done = running + (removed.len() as u32 - removed_left);
            if done == o.op.total {
                Step::Succeeded {
                    message: format!(
                        "group {group} has {} VMs",
                        db::group(c, &group)?.map(|g| g.count).unwrap_or(0)
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
        "group.delete" => {
            let group = param(o, "group");
            match db::group(c, group)? {
                None => Step::Succeeded {
                    message: format!("group {group} removed"),
                },
                Some(_) => {
                    let left = db::group_vms(c, group)?.len() as u32;
                    Step::Running {
                        done: o.op.total.saturating_sub(left),
                        message: format!("{left} VMs left to remove"),
                    }
                }
            }
        }
        "vm.start" | "vm.stop" | "vm.pause" | "vm.resume" => {
            let name = param(o, "vm");
            let want = param(o, "want");
            let Some(v) = db::vm(c, name)? else {
                return Ok(Step::Failed {
                    error: format!("vm {name:?} was removed"),
                });
            };
            if v.desired.as_str() != want {
                return Ok(Step::Failed {
                    error: format!(
                        "superseded: vm {name} was asked to be {}",
                        v.desired.as_str()
                    ),
                });
            }
            if let Some(error) = vm_failure(&v) {
                return Ok(Step::Failed { error });
            }
            let reached = matches!(
                (v.desired, v.observed),
                (PowerState::Running, VmState::Running)
                    | (PowerState::Paused, VmState::Paused)
                    | (PowerState::Stopped, VmState::Stopped)
            );
            if reached {
                Step::Succeeded {
                    message: format!("vm {name} is {}", v.observed.as_str()),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: format!("vm {name} is {}", v.observed.as_str()),
                }
            }
        }
        "vm.reboot" => {
            let name = param(o, "vm");
            let seq = o.params.get("seq").and_then(Value::as_u64).unwrap_or(0);
            let Some(v) = db::vm(c, name)? else {
                return Ok(Step::Failed {
                    error: format!("vm {name:?} was removed"),
                });
            };
            if let Some(error) = vm_failure(&v) {
                return Ok(Step::Failed { error });
            }
            if v.reboot_done >= seq {
                Step::Succeeded {
                    message: format!("vm {name} rebooted"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "waiting for the host to reboot it".into(),
                }
            }
        }
        "vm.delete" => {
            let name = param(o, "vm");
            let id = param(o, "id");
            if db::vm_by_id(c, id)?.is_none() {
                Step::Succeeded {
                    message: format!("vm {name} removed"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "removing".into(),
                }
            }
        }
        "net.create" => {
            let name = param(o, "network").to_string();
            let Some(mut n) = db::network(c, &name)? else {
                return Ok(Step::Failed {
                    error: rollback.unwrap_or_else(|| format!("network {name:?} was removed")),
                });
            };
            if rollback.is_some() {
                return Ok(Step::Running {
                    done: 0,
                    message: "rolling back".into(),
                });
            }
            match n.state.as_str() {
                "ready" => Step::Succeeded {
                    message: format!(
                        "network {name} ready on bridge {}",
                        tuchka_core::names::bridge_name(n.vni)
                    ),
                },
                "error" => {
                    let error = format!(
                        "network {name}: {}",
                        n.error
                            .clone()
                            .unwrap_or_else(|| "failed on its host".into())
                    );
                    n.deleting = true;
                    db::update_network(c, &n)?;
                    Step::RollingBack { error }
                }
                _ => Step::Running {
                    done: 0,
                    message: "creating bridge and DHCP".into(),
                },
            }
        }
        "net.delete" => {
            let name = param(o, "network");
            if db::network(c, name)?.is_none() {
                Step::Succeeded {
                    message: format!("network {name} removed"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "removing bridge and DHCP".into(),
                }
            }
        }
        other => Step::Failed {
            error: format!("unknown operation kind {other:?}"),
        },
    })
}
