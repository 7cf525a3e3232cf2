//! The operations engine: every running operation is re-evaluated against the observed state
//! after every report and every change, and on a timer. Each kind is evaluated by the module of
//! its resource; migrations, drains and balance rounds are moved on first.
//!
//! An operation that fails part-way rolls back what it added (a group create removes the whole
//! group, a scale up removes the VMs it added, a network that could not be built is removed) and
//! is marked failed only when the rollback is complete, so `--wait` returns to a clean state.
//! The error keeps the cause chain the host reported.

use std::time::Duration;

use rusqlite::Connection;
use tuchka_core::migration::Limits;
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, OpRow};

use crate::error::{Error, Result};
use crate::operations::{self, failure, Step};
use crate::state::Controller;

/// A short operation (not a migration, drain or balance round) still running after this long
/// fails.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Re-evaluate every running operation and finish deletions. Cheap; call it often.
pub fn progress(ctl: &Controller) {
    if let Err(e) = try_progress(ctl) {
        tracing::error!(error = %e, "evaluating operations failed");
    }
}

fn try_progress(ctl: &Controller) -> Result<()> {
    let mut finished = vec![];
    let mut bump = false;
    let limits = ctl.config().migration_limits;
    ctl.db().atomic(|c| {
        crate::groups::finalize_deletions(c)?;
        finalize_networks(c)?;
        bump |= !crate::networks::fail_over(ctl, c)?.is_empty();
        bump |= crate::migrations::advance(ctl, c, &limits)?;
        bump |= crate::drain::advance(ctl, c)?;
        bump |= crate::balance::advance(ctl, c)?;
        for mut o in db::running_operations(c)? {
            let step = evaluate(ctl, c, &o)?;
            let step = match step {
                Step::Running { .. } if has_deadline(&o.record.kind) && age(&o) > OP_TIMEOUT => {
                    Step::Failed {
                        error: format!(
                            "timed out after {} s waiting for the host (see: tuchka host list)",
                            OP_TIMEOUT.as_secs()
                        ),
                        chain: vec![],
                    }
                }
                s => s,
            };
            match step {
                Step::Running { done, message } => {
                    let message = if message.is_empty() {
                        o.op.message.clone()
                    } else {
                        message
                    };
                    if o.op.done != done || o.op.message != message {
                        o.op.done = done;
                        o.op.message = message;
                        db::save_operation(c, &o)?;
                    }
                }
                Step::RollingBack { error, chain } => {
                    bump = true;
                    o.op.message = format!("rolling back: {error}");
                    o.record.rollback_error = Some(error);
                    o.record.rollback_chain = chain;
                    db::save_operation(c, &o)?;
                }
                Step::Succeeded { message } => {
                    // An empty message keeps the one it had (e.g. what a resize did when).
                    let message = if message.is_empty() {
                        o.op.message.clone()
                    } else {
                        message
                    };
                    operations::finish(&mut o, message, None);
                    db::save_operation(c, &o)?;
                    finished.push(o.op.clone());
                }
                Step::Failed { error, mut chain } => {
                    if chain.is_empty() {
                        chain = o.record.rollback_chain.clone();
                    }
                    let e = failure(&error, chain);
                    operations::finish(&mut o, error, Some(e));
                    db::save_operation(c, &o)?;
                    finished.push(o.op.clone());
                }
            }
        }
        Ok::<_, Error>(())
    })?;
    if bump {
        ctl.bump();
    }
    for op in finished {
        crate::monitoring::operation_finished(ctl, &op);
        ctl.emit(
            "operation.finished",
            &op.target,
            format!("{} {}: {} ({})", op.kind, op.target, op.state, op.message),
        );
    }
    Ok(())
}

fn age(o: &OpRow) -> Duration {
    humantime::parse_rfc3339(&o.op.created_at)
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
}

/// Migrations carry their own time limits per phase, builds their `--timeout`; drains and
/// balance rounds last as long as their moves.
fn has_deadline(k: &OpKind) -> bool {
    !matches!(
        k,
        OpKind::VmMigrate { .. }
            | OpKind::HostDrain { .. }
            | OpKind::BalanceApply { .. }
            | OpKind::ImageBuild { .. }
    )
}

fn evaluate(ctl: &Controller, c: &Connection, o: &OpRow) -> Result<Step> {
    let rollback = o.record.rollback_error.as_deref();
    match &o.record.kind {
        k @ (OpKind::GroupCreate { .. }
        | OpKind::GroupScale { .. }
        | OpKind::GroupDelete { .. }) => crate::groups::evaluate(
            c,
            k,
            rollback,
            (o.op.done, o.op.total),
            ctl.config().down_after.as_secs() as i64,
        ),
        k @ (OpKind::VmStart { .. }
        | OpKind::VmStop { .. }
        | OpKind::VmPause { .. }
        | OpKind::VmResume { .. }
        | OpKind::VmReboot { .. }
        | OpKind::VmDelete { .. }) => crate::vms::evaluate(c, k),
        OpKind::VmMigrate { .. } => crate::migrations::evaluate(c, &o.op.id),
        k @ (OpKind::NetCreate { .. } | OpKind::NetDelete { .. }) => {
            crate::networks::evaluate(c, k, rollback)
        }
        OpKind::HostDrain { .. } => crate::drain::evaluate(c, o),
        OpKind::BalanceApply { .. } => crate::balance::evaluate(c, o),
        k @ (OpKind::VolumeAttach { .. }
        | OpKind::VolumeDetach { .. }
        | OpKind::VolumeResize { .. }) => crate::volumes::evaluate(c, k),
        k @ OpKind::VmResize { .. } => crate::vms::evaluate(c, k),
        OpKind::ImageCapture { .. } => crate::captures::evaluate(c, o),
        OpKind::ImageBuild { .. } => crate::builds::evaluate(ctl, c, o),
    }
}

/// Remove network rows whose deletion every host has completed.
fn finalize_networks(c: &Connection) -> Result<()> {
    for n in db::networks(c)? {
        if n.deleting && db::network_presence(c, &n.name)?.is_empty() {
            db::delete_network(c, &n.name)?;
        }
    }
    Ok(())
}

/// Default time limits of migrations.
pub fn default_limits() -> Limits {
    Limits::default()
}
