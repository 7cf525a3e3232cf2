//! Draining a host: no new placements, and every VM on it moves off (live if it runs or is
//! paused, cold if it is stopped) — one `vm.migrate` child per VM, at most `parallel` at a time
//! from the host, each target picked by the scheduler when its move starts (spread by free
//! resources, anti-affinity kept). What cannot move is listed with the reason and the host stays
//! `draining`.

use rusqlite::Connection;
use tuchka_api::{Drain, HostDrain, OperationKind, OperationState, Unmovable};
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::state::Controller;

/// Default migrations at once per host.
pub const DEFAULT_PARALLEL: u32 = 2;

/// `host drain`.
pub fn start(ctl: &Controller, name: &str, req: HostDrain) -> Result<Drain> {
    let parallel = req.parallel.unwrap_or(DEFAULT_PARALLEL);
    if !(1..=16).contains(&parallel) {
        return Err(Error::invalid(
            "InvalidParallel",
            format!("parallel {parallel} is out of range: use 1 to 16"),
        ));
    }
    let (host_id, op, unmovable) = ctl.db().atomic(|c| {
        let h = crate::hosts::find(c, name)?;
        let s = ctl.snapshot(c)?;
        db::set_draining(c, &h.id, true)?;
        // A drain already under way is the answer (draining twice changes nothing).
        for o in db::running_operations(c)? {
            if let OpKind::HostDrain { host_id, unmovable, .. } = &o.record.kind {
                if *host_id == h.id {
                    let list = unmovable_view(unmovable);
                    return Ok::<_, Error>((h.id.clone(), Some(o), list));
                }
            }
        }
        let on_host: Vec<_> = s
            .vms
            .iter()
            .filter(|v| v.host_id == h.id && !v.deleting)
            .collect();
        if on_host.is_empty() {
            return Ok((h.id.clone(), None, vec![]));
        }
        if !s.is_up(&h) {
            return Err(Error::conflict(
                "HostDown",
                format!(
                    "host {} is down: its VMs cannot move without its agent (it stays draining; see: tuchka host list)",
                    h.name
                ),
            ));
        }
        let op = new_op(
            OpKind::HostDrain {
                host_id: h.id.clone(),
                host: h.name.clone(),
                parallel,
                waiting: on_host.iter().map(|v| v.id.clone()).collect(),
                unmovable: vec![],
            },
            &format!("host/{}", h.name),
            on_host.len() as u32,
            &format!("moving {} VMs off {}", on_host.len(), h.name),
        );
        operations::record(c, &op)?;
        Ok((h.id.clone(), Some(op), vec![]))
    })?;
    ctl.emit(
        "host.draining",
        &format!("host/{name}"),
        format!("host {name} draining: no new placements, its VMs move off"),
    );
    if let Some(op) = &op {
        operations::announce(ctl, &op.op);
    }
    Ok(Drain {
        host: crate::hosts::get(ctl, &host_id)?,
        operation: op.map(|o| o.op),
        unmovable,
    })
}

fn unmovable_view(list: &[(String, String)]) -> Vec<Unmovable> {
    list.iter()
        .map(|(vm, reason)| Unmovable {
            vm: vm.clone(),
            reason: reason.clone(),
        })
        .collect()
}

/// Start the next moves of every running drain. Returns true when it started any.
pub fn advance(ctl: &Controller, c: &Connection) -> Result<bool> {
    let mut started = false;
    for mut o in db::running_operations(c)? {
        let OpKind::HostDrain {
            host_id,
            parallel,
            waiting,
            unmovable,
            host,
        } = &mut o.record.kind
        else {
            continue;
        };
        if waiting.is_empty() {
            continue;
        }
        let s = ctl.snapshot(c)?;
        let mut busy = s
            .migrations
            .iter()
            .filter(|m| m.source_host == *host_id)
            .count() as u32;
        let mut changed = false;
        while busy < *parallel && !waiting.is_empty() {
            let id = waiting.remove(0);
            changed = true;
            let Some(v) = s.vms.iter().find(|v| v.id == id) else {
                continue; // removed meanwhile
            };
            if v.host_id != *host_id || v.deleting {
                continue; // moved or going anyway
            }
            // Each start sees the moves started before it.
            let s = ctl.snapshot(c)?;
            match crate::migrations::start_in(
                ctl,
                c,
                &s,
                v,
                None,
                Some(&o.op.id),
                &format!("drain of {host}"),
            ) {
                Ok(child) => {
                    o.op.children.push(child.op.id.clone());
                    busy += 1;
                    started = true;
                }
                Err(r) => unmovable.push((v.name.clone(), r.message)),
            }
        }
        if changed {
            db::save_operation(c, &o)?;
        }
    }
    Ok(started)
}

/// How a `host.drain` operation stands: done when every VM moved or was found unmovable.
pub fn evaluate(c: &Connection, o: &db::OpRow) -> Result<Step> {
    let OpKind::HostDrain {
        host,
        waiting,
        unmovable,
        ..
    } = &o.record.kind
    else {
        return Ok(Step::Failed {
            error: "not a drain".into(),
            chain: vec![],
        });
    };
    children_step(c, o, waiting.len(), unmovable, |moved, left| {
        if left.is_empty() {
            format!("host {host} is empty: {moved} VMs moved off")
        } else {
            format!(
                "host {host} stays draining: {} could not move: {}",
                plural(left.len(), "VM"),
                left.join("; ")
            )
        }
    })
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The step of an operation made of `vm.migrate` children (a drain, a balance apply):
/// running while moves wait or run; then succeeded if every child succeeded and nothing was
/// left out, else failed naming what did not move. `summary(moved, left)` words the end.
pub fn children_step(
    c: &Connection,
    o: &db::OpRow,
    waiting: usize,
    skipped: &[(String, String)],
    summary: impl Fn(usize, &[String]) -> String,
) -> Result<Step> {
    let mut moved = 0;
    let mut running = 0;
    let mut left: Vec<String> = skipped
        .iter()
        .map(|(vm, why)| format!("{vm}: {why}"))
        .collect();
    for id in &o.op.children {
        match db::operation(c, id)? {
            Some(ch) if ch.op.kind == OperationKind::VmMigrate => match ch.op.state {
                OperationState::Running => running += 1,
                OperationState::Succeeded => moved += 1,
                OperationState::Failed => left.push(format!(
                    "{}: {}",
                    ch.op.target.trim_start_matches("vm/"),
                    ch.op.error.map(|e| e.message).unwrap_or(ch.op.message)
                )),
            },
            _ => {}
        }
    }
    if waiting > 0 || running > 0 {
        return Ok(Step::Running {
            done: moved as u32,
            message: format!(
                "{moved} moved, {running} moving, {waiting} waiting{}",
                if left.is_empty() {
                    String::new()
                } else {
                    format!(", {} could not move", left.len())
                }
            ),
        });
    }
    let text = summary(moved, &left);
    Ok(if left.is_empty() {
        Step::Succeeded { message: text }
    } else {
        Step::Failed {
            error: text,
            chain: left,
        }
    })
}
