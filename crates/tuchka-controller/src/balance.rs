//! The balancer's controller side: carrying out a plan (`balance apply`: one `vm.migrate`
//! child per move, at most one move per host at a time).

use rusqlite::Connection;
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db};

use crate::error::Result;
use crate::operations::Step;
use crate::state::Controller;

/// Start the waiting moves of every running `balance.apply` whose hosts are free. Returns true
/// when it started any.
pub fn advance(ctl: &Controller, c: &Connection) -> Result<bool> {
    let mut started = false;
    for mut o in db::running_operations(c)? {
        let OpKind::BalanceApply { waiting, skipped } = &mut o.record.kind else {
            continue;
        };
        if waiting.is_empty() {
            continue;
        }
        let mut changed = false;
        let mut still = vec![];
        for (vm_id, target, reason) in std::mem::take(waiting) {
            let s = ctl.snapshot(c)?;
            let Some(v) = s.vms.iter().find(|v| v.id == vm_id) else {
                changed = true;
                continue;
            };
            let busy = |h: &str| {
                s.migrations
                    .iter()
                    .any(|m| m.source_host == h || m.target_host == h)
            };
            if busy(&v.host_id) || busy(&target) {
                still.push((vm_id, target, reason));
                continue;
            }
            changed = true;
            match crate::migrations::start_in(
                ctl,
                c,
                &s,
                v,
                Some(&target),
                Some(&o.op.id),
                &format!("balance: {reason}"),
            ) {
                Ok(child) => {
                    o.op.children.push(child.op.id.clone());
                    started = true;
                }
                Err(r) => skipped.push((v.name.clone(), r.message)),
            }
        }
        *waiting = still;
        if changed {
            db::save_operation(c, &o)?;
        }
    }
    Ok(started)
}

/// How a `balance.apply` operation stands.
pub fn evaluate(c: &Connection, o: &db::OpRow) -> Result<Step> {
    let OpKind::BalanceApply { waiting, skipped } = &o.record.kind else {
        return Ok(Step::Failed {
            error: "not a balance apply".into(),
            chain: vec![],
        });
    };
    crate::drain::children_step(c, o, waiting.len(), skipped, |moved, left| {
        if left.is_empty() {
            format!("balanced: {moved} VMs moved")
        } else {
            format!("{moved} VMs moved; not moved: {}", left.join("; "))
        }
    })
}

/// The balancer's state now.
pub fn status(ctl: &Controller) -> Result<tuchka_api::BalanceStatus> {
    let b = ctl.config().balance;
    Ok(tuchka_api::BalanceStatus {
        mode: b.mode,
        interval_s: b.interval.as_secs(),
        imbalance: 0.0,
        threshold: 25.0,
        rounds_above: 0,
        hold_rounds: 3,
        hosts: vec![],
        decisions: vec![],
    })
}

/// The plan now.
pub fn plan(_ctl: &Controller) -> Result<tuchka_api::BalancePlan> {
    Ok(tuchka_api::BalancePlan {
        imbalance: 0.0,
        imbalance_after: 0.0,
        threshold: 25.0,
        moves: vec![],
        why_not: vec!["the balancer is not built yet".into()],
        hosts: vec![],
    })
}

/// Carry out the plan.
pub fn apply(_ctl: &Controller) -> Result<tuchka_api::Operation> {
    Err(crate::Error::conflict("NothingToDo", "nothing to balance"))
}
