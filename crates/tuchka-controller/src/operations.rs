//! Operations as records: creating one, showing them. The engine that moves them on is
//! [`crate::progress`]; each resource module records the operations of its own actions here.

use rusqlite::Connection;
use tuchka_api::{ApiError, Migration, Operation, OperationState, PhaseState};
use tuchka_core::ops::{OpKind, OpRecord};
use tuchka_store::{self as db, MigrationRow, OpRow};

use crate::error::{Error, Result};
use crate::state::Controller;

/// What became of one evaluation of a running operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Still going; new progress.
    Running {
        /// Steps done.
        done: u32,
        /// Progress message.
        message: String,
    },
    /// Something failed: roll back (the side effects are done), then fail with this error.
    RollingBack {
        /// What failed.
        error: String,
        /// Its causes.
        chain: Vec<String>,
    },
    /// Finished well.
    Succeeded {
        /// Final message.
        message: String,
    },
    /// Finished badly.
    Failed {
        /// What failed.
        error: String,
        /// Its causes.
        chain: Vec<String>,
    },
}

/// A new running operation of `kind` on `target` with `total` steps.
pub fn new_op(kind: OpKind, target: &str, total: u32, message: &str) -> OpRow {
    OpRow {
        op: Operation {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.kind(),
            target: target.into(),
            state: OperationState::Running,
            done: 0,
            total,
            message: message.into(),
            error: None,
            created_at: db::now(),
            finished_at: None,
            phases: vec![],
            parent: None,
            children: vec![],
            migration: None,
        },
        record: OpRecord::new(kind),
    }
}

/// Start an operation: `f` checks, changes what it must and returns the operation, all in one
/// transaction with the operation's record; once committed, the agents wake and the start is
/// published. Nothing is changed when `f` fails.
pub fn start(ctl: &Controller, f: impl FnOnce(&Connection) -> Result<OpRow>) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        let op = f(c)?;
        record(c, &op)?;
        Ok::<_, Error>(op)
    })?;
    announce(ctl, &op.op);
    Ok(op.op)
}

/// Store a new operation; wake the agents and tell the world once the caller's transaction is
/// committed (see [`announce`]).
pub fn record(c: &Connection, op: &OpRow) -> Result<()> {
    db::save_operation(c, op)?;
    Ok(())
}

/// After the transaction that recorded `op`: wake the agents, publish the start.
pub fn announce(ctl: &Controller, op: &Operation) {
    ctl.metrics().operation_started(&op.id);
    ctl.bump();
    ctl.emit(
        "operation.started",
        &op.target,
        format!("{} {}: {}", op.kind, op.target, op.message),
    );
}

/// Mark `o` finished: `error` None for success.
pub fn finish(o: &mut OpRow, message: String, error: Option<ApiError>) {
    o.op.state = if error.is_some() {
        OperationState::Failed
    } else {
        OperationState::Succeeded
    };
    if error.is_none() {
        o.op.done = o.op.total;
    }
    o.op.message = message;
    o.op.error = error;
    o.op.finished_at = Some(db::now());
    for p in &mut o.op.phases {
        if p.state == PhaseState::Running || p.state == PhaseState::Pending {
            p.state = if o.op.state == OperationState::Succeeded {
                PhaseState::Done
            } else if p.state == PhaseState::Running {
                PhaseState::Failed
            } else {
                PhaseState::Skipped
            };
            p.finished_at.get_or_insert_with(db::now);
        }
    }
}

/// The error body of a failed operation.
pub fn failure(message: &str, chain: Vec<String>) -> ApiError {
    ApiError {
        code: "OperationFailed".into(),
        message: message.to_string(),
        chain,
    }
}

/// The public view of a migration row.
pub fn migration_view(m: &MigrationRow, host_name: impl Fn(&str) -> String) -> Migration {
    Migration {
        id: m.id.clone(),
        vm: m.vm_name.clone(),
        from: host_name(&m.source_host),
        to: host_name(&m.target_host),
        mode: m.mode,
        phase: m.phase,
        reason: m.reason.clone(),
        copied_bytes: m.copied_bytes,
        remaining_bytes: m.remaining_bytes,
        mib_per_s: m.mib_per_s,
        total_ms: m.total_ms,
        downtime_ms: m.downtime_ms,
        bytes: m.bytes,
        started_at: m.started_at.clone(),
        finished_at: m.finished_at.clone(),
        error: m.error.clone(),
    }
}

fn host_namer(c: &Connection) -> Result<impl Fn(&str) -> String> {
    let hosts: std::collections::HashMap<String, String> =
        db::hosts(c)?.into_iter().map(|h| (h.id, h.name)).collect();
    Ok(move |id: &str| hosts.get(id).cloned().unwrap_or_else(|| id.to_string()))
}

fn view(c: &Connection, o: OpRow, names: &impl Fn(&str) -> String) -> Result<Operation> {
    let mut op = o.op;
    if matches!(o.record.kind, OpKind::VmMigrate { .. }) {
        op.migration = db::migration(c, &op.id)?.map(|m| migration_view(&m, names));
    }
    Ok(op)
}

/// Latest operations, newest first.
pub fn list(ctl: &Controller) -> Result<Vec<Operation>> {
    let db = ctl.db();
    let c = db.conn();
    let names = host_namer(c)?;
    db::operations(c, 200)?
        .into_iter()
        .map(|o| view(c, o, &names))
        .collect()
}

/// One operation.
pub fn get(ctl: &Controller, id: &str) -> Result<Operation> {
    let db = ctl.db();
    let c = db.conn();
    let o = db::operation(c, id)?.ok_or_else(|| Error::not_found("operation", "op", id))?;
    view(c, o, &host_namer(c)?)
}
