//! What the controller tells monitoring and the dashboard about itself: the `/metrics` scrape
//! (the state read from the database at each scrape, next to the event counters of
//! [`crate::metrics`]), the hosts' load history and the sampler that feeds it, and the hooks
//! that count finished operations and migrations.
//!
//! The figures come from the same views as `tuchka host list` and `tuchka vm list`
//! ([`crate::hosts::view`], [`crate::vms::list`]), so a scrape and the CLI always agree.

use std::time::Duration;

use tuchka_api::{HostHistory, HostState, LoadHistory, LoadPoint, Operation, OperationKind};
use tuchka_store as db;

use crate::error::{Error, Result};
use crate::metrics::{HostFigures, MigrationFigures, Scrape};
use crate::state::Controller;

/// The text of `GET /metrics`.
pub fn scrape(ctl: &Controller) -> Result<String> {
    let mut s = {
        let db = ctl.db();
        let c = db.conn();
        let snap = ctl.snapshot(c)?;
        let hosts = snap
            .hosts
            .iter()
            .map(|h| {
                let v = crate::hosts::view(&snap, h);
                HostFigures {
                    name: v.name,
                    state: v.state,
                    cpus: v.cpus,
                    cpus_used: v.cpus_used,
                    memory_mib: v.memory_mib,
                    memory_used_mib: v.memory_used_mib,
                    memory_in_use_mib: v.memory_in_use_mib,
                    disk_mib: v.disk_mib,
                    disk_free_mib: v.disk_free_mib,
                    disk_provisioned_mib: v.disk_provisioned_mib,
                    cpu_usage: v.cpu_usage,
                    load_1m: v.load_1m,
                    vms: v.vms.len(),
                    cached_images: v.cached_images.len(),
                    pass_ms: h.facts.pass_ms,
                    last_seen_unix: h.last_seen_unix,
                }
            })
            .collect();
        Scrape {
            hosts,
            vms: vec![],
            running_operations: db::running_operations(c)?
                .into_iter()
                .map(|o| o.op.kind)
                .collect(),
            images: snap.images.len(),
            groups: snap.groups.len(),
            networks: snap.networks.len(),
        }
    };
    s.vms = crate::vms::list(ctl)?
        .into_iter()
        .map(|v| v.state)
        .collect();
    ctl.metrics().render(&s).map_err(|e| Error::Internal {
        message: "cannot encode the metrics".into(),
        chain: vec![e.to_string()],
    })
}

/// Record one load sample of every host that reports (for the dashboard's charts).
pub fn sample_loads(ctl: &Controller) -> Result<()> {
    let now = tuchka_store::now_unix();
    let hosts = crate::hosts::list(ctl)?;
    let history = ctl.history();
    for h in &hosts {
        if !matches!(h.state, HostState::Up | HostState::Draining) {
            continue;
        }
        let memory = if h.memory_mib > 0 {
            (h.memory_in_use_mib as f64 / h.memory_mib as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        history.record(
            &h.id,
            LoadPoint {
                t: now,
                cpu: h.cpu_usage.clamp(0.0, 1.0),
                memory,
                load_1m: h.load_1m,
            },
        );
    }
    history.retain(|id| hosts.iter().any(|h| h.id == id));
    Ok(())
}

/// The hosts' load over the last hour (`GET /v1/history`).
pub fn history(ctl: &Controller) -> Result<LoadHistory> {
    let hosts = crate::hosts::list(ctl)?;
    Ok(LoadHistory {
        interval_s: crate::history::INTERVAL.as_secs(),
        hosts: hosts
            .into_iter()
            .map(|h| HostHistory {
                points: ctl.history().points(&h.id),
                host: h.name,
            })
            .collect(),
    })
}

/// Sample the hosts' load every [`crate::history::INTERVAL`], from now on, for as long as the
/// runtime runs.
pub fn spawn_sampler(ctl: Controller) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::history::INTERVAL);
        loop {
            every.tick().await;
            let c = ctl.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || sample_loads(&c)).await {
                tracing::warn!(error = %e, "cannot sample the hosts' load");
            }
        }
    });
}

/// Count a finished operation (and, for `vm.migrate`, its migration).
pub fn operation_finished(ctl: &Controller, op: &Operation) {
    let recorded = match (&op.finished_at, humantime::parse_rfc3339(&op.created_at)) {
        (Some(end), Ok(start)) => humantime::parse_rfc3339(end)
            .ok()
            .and_then(|end| end.duration_since(start).ok())
            .unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let result = op.state.as_str();
    ctl.metrics()
        .operation_finished(&op.id, op.kind, result, recorded);
    if op.kind != OperationKind::VmMigrate {
        return;
    }
    let row = match db::migration(ctl.db().conn(), &op.id) {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a finished migration for the metrics");
            return;
        }
    };
    ctl.metrics().migration_finished(&MigrationFigures {
        mode: row.mode.to_string(),
        result: result.to_string(),
        duration: row.total_ms.map(Duration::from_millis).or(Some(recorded)),
        downtime: row.downtime_ms.map(Duration::from_millis),
    });
}
