//! The balancer's controller side: build the pure balancer's inputs from the state
//! ([`tuchka_core::balance`]), show its plan, carry a plan out (`balance apply`: one
//! `vm.migrate` child per move, at most one move per host at a time), and run it by itself every
//! `--balance-interval` in `--balance auto` mode. Every decision — moves, or why nothing moved —
//! is kept (the last [`KEEP_DECISIONS`]) for `balance status` and published as a
//! `balance.decision` event.
//!
//! The hold counter of the balancer ([`BalanceState`]) is stored in the database, so a restart
//! only restarts the hold. A round is skipped while migrations run: their hosts' loads are in
//! flux and they hold their VMs.

use std::collections::BTreeSet;

use rusqlite::Connection;
use tuchka_api::{
    BalanceDecision, BalanceMode, BalanceMove, BalancePlan, BalanceStatus, HostLoad as ApiLoad,
    Operation, PowerState, VmState,
};
use tuchka_core::balance::{
    self, BalanceConfig, BalanceState, Constraints, HostLoad, Reason, VmLoad,
};
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// Decisions kept for `balance status`.
pub const KEEP_DECISIONS: usize = 20;
const STATE_META: &str = "balance_state";
const DECISIONS_META: &str = "balance_decisions";

/// The balancer's inputs from the state: every host with its measured load (none for a host
/// that is down: it is not balanced), every VM with its size, measured CPU and last move.
pub fn inputs(
    ctl: &Controller,
    c: &Connection,
    s: &Snapshot,
) -> Result<(Vec<HostLoad>, Vec<VmLoad>, Constraints)> {
    let hosts = s
        .hosts
        .iter()
        .filter(|h| !h.revoked)
        .map(|h| HostLoad {
            capacity: crate::scheduler::capacity(s, h, ctl.config().disk_reserve),
            cpu_usage: s.is_up(h).then_some(h.facts.cpu_usage),
            memory_in_use_mib: h.facts.memory_in_use_mib,
        })
        .collect();
    let last = db::last_migrations(c)?;
    let vms = s
        .vms
        .iter()
        .filter_map(|v| {
            let g = s.groups.get(&v.group)?;
            let moving = s.migration_of(&v.id).is_some();
            let size = crate::snapshot::size_of(v, g);
            Some(VmLoad {
                id: v.id.clone(),
                name: v.name.clone(),
                group: v.group.clone(),
                host_id: v.host_id.clone(),
                running: v.desired == PowerState::Running && v.observed == VmState::Running,
                vcpus: size.cpus,
                memory_mib: size.memory_mib,
                // Its volumes move with it: the target provisions them too.
                disk_mib: size.disk_mib
                    + s.vm_volumes(&v.id).iter().map(|x| x.size_mib).sum::<u64>(),
                image_sha256: g.image_sha256.clone(),
                cpu_cores: v.cpu_usage,
                memory_in_use_mib: None,
                dirty_rate_mib_s: None,
                last_moved_at: last
                    .get(&v.id)
                    .filter(|m| m.phase == tuchka_api::MigrationPhase::Done)
                    .map(|m| (m.started_unix_ms / 1000).max(0) as u64),
                opt_out: false,
                cannot_move: if v.deleting {
                    Some("being removed".into())
                } else if moving {
                    Some("already migrating".into())
                } else {
                    None
                },
            })
        })
        .collect();
    let anti_affinity: BTreeSet<String> = s
        .groups
        .values()
        .filter(|g| g.anti_affinity)
        .map(|g| g.name.clone())
        .collect();
    Ok((
        hosts,
        vms,
        Constraints {
            ratios: ctl.config().ratios,
            anti_affinity,
        },
    ))
}

fn loads(s: &Snapshot, hosts: &[HostLoad]) -> Vec<ApiLoad> {
    hosts
        .iter()
        .map(|h| {
            let mem = h.capacity.memory_mib.max(1) as f64;
            ApiLoad {
                host: h.capacity.name.clone(),
                cpu: h.cpu_usage.unwrap_or(0.0),
                memory: h.memory_in_use_mib as f64 / mem,
                vms: s.usage(&h.capacity.id).vms,
                target: h.capacity.up && !h.capacity.draining,
            }
        })
        .collect()
}

fn move_view(m: &balance::Move) -> BalanceMove {
    let mut cost = format!("{} MiB to copy", m.cost.copy_mib);
    if let Some(d) = m.cost.dirty_rate_mib_s {
        cost += &format!(", guest dirties {d:.0} MiB/s");
    }
    if let Some(t) = m.cost.seconds {
        cost += &format!(", about {t:.0} s");
    }
    BalanceMove {
        vm: m.vm_name.clone(),
        from: m.from_name.clone(),
        to: m.to_name.clone(),
        reason: m.reason.clone(),
        imbalance_before: m.score_before_pct,
        imbalance_after: m.score_after_pct,
        cost_mib: m.cost.copy_mib,
        cost,
    }
}

fn plan_view(
    s: &Snapshot,
    hosts: &[HostLoad],
    p: &balance::BalancePlan,
    cfg: &BalanceConfig,
) -> BalancePlan {
    BalancePlan {
        imbalance: p.imbalance.score_pct,
        imbalance_after: p.score_after_pct,
        threshold: cfg.threshold_pct,
        moves: p.moves.iter().map(move_view).collect(),
        why_not: p
            .reasons
            .iter()
            .map(|r: &Reason| r.message.clone())
            .collect(),
        hosts: loads(s, hosts),
    }
}

fn now_s() -> u64 {
    db::now_unix().max(0) as u64
}

/// `balance plan`: what would move now (every rule but the hold). Changes nothing.
pub fn plan(ctl: &Controller) -> Result<BalancePlan> {
    let db = ctl.db();
    let c = db.conn();
    let s = ctl.snapshot(c)?;
    let (hosts, vms, cons) = inputs(ctl, c, &s)?;
    let cfg = BalanceConfig::default();
    let p = balance::preview(&hosts, &vms, &cons, &cfg, now_s());
    Ok(plan_view(&s, &hosts, &p, &cfg))
}

fn stored_state(c: &Connection) -> Result<BalanceState> {
    Ok(db::meta_get(c, STATE_META)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

fn decisions(c: &Connection) -> Result<Vec<BalanceDecision>> {
    Ok(db::meta_get(c, DECISIONS_META)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

fn record_decision(c: &Connection, d: BalanceDecision) -> Result<()> {
    let mut all = decisions(c)?;
    all.insert(0, d);
    all.truncate(KEEP_DECISIONS);
    db::meta_set(
        c,
        DECISIONS_META,
        &serde_json::to_string(&all).unwrap_or_default(),
    )?;
    Ok(())
}

/// `balance status`.
pub fn status(ctl: &Controller) -> Result<BalanceStatus> {
    let db = ctl.db();
    let c = db.conn();
    let s = ctl.snapshot(c)?;
    let (hosts, _, _) = inputs(ctl, c, &s)?;
    let cfg = BalanceConfig::default();
    let b = ctl.config().balance;
    Ok(BalanceStatus {
        mode: b.mode,
        interval_s: b.interval.as_secs(),
        imbalance: balance::imbalance(&hosts, &cfg).score_pct,
        threshold: cfg.threshold_pct,
        rounds_above: stored_state(c)?.rounds_above,
        hold_rounds: cfg.hold_rounds,
        hosts: loads(&s, &hosts),
        decisions: decisions(c)?,
    })
}

/// Record the moves of `p` as a `balance.apply` operation (none: Ok(None)).
fn start_apply(c: &Connection, p: &balance::BalancePlan, why: &str) -> Result<Option<db::OpRow>> {
    if p.moves.is_empty() {
        return Ok(None);
    }
    let op = new_op(
        OpKind::BalanceApply {
            waiting: p
                .moves
                .iter()
                .map(|m| (m.vm_id.clone(), m.to.clone(), m.reason.clone()))
                .collect(),
            skipped: vec![],
        },
        "cloud",
        p.moves.len() as u32,
        &format!(
            "{why}: {} moves, imbalance {:.0} % → {:.0} %",
            p.moves.len(),
            p.imbalance.score_pct,
            p.score_after_pct
        ),
    );
    operations::record(c, &op)?;
    Ok(Some(op))
}

fn busy(c: &Connection) -> Result<Option<String>> {
    if let Some(m) = db::active_migrations(c)?.first() {
        return Ok(Some(format!(
            "migrations are under way (vm {}): the balancer waits for them",
            m.vm_name
        )));
    }
    for o in db::running_operations(c)? {
        if matches!(
            o.record.kind,
            OpKind::BalanceApply { .. } | OpKind::HostDrain { .. }
        ) {
            return Ok(Some(format!(
                "operation {} ({}) is running: the balancer waits for it",
                o.op.id, o.op.kind
            )));
        }
    }
    Ok(None)
}

/// `balance apply`: carry out the plan now (every rule but the hold).
pub fn apply(ctl: &Controller) -> Result<Operation> {
    let op = ctl.db().atomic(|c| {
        if let Some(why) = busy(c)? {
            return Err(Error::conflict("BalancerBusy", why));
        }
        let s = ctl.snapshot(c)?;
        let (hosts, vms, cons) = inputs(ctl, c, &s)?;
        let cfg = BalanceConfig::default();
        let p = balance::preview(&hosts, &vms, &cons, &cfg, now_s());
        let view = plan_view(&s, &hosts, &p, &cfg);
        let op = start_apply(c, &p, "asked for")?;
        record_decision(
            c,
            BalanceDecision {
                time: db::now(),
                imbalance: view.imbalance,
                summary: match &op {
                    Some(_) => format!("balance apply: {} moves", view.moves.len()),
                    None => format!(
                        "balance apply: nothing to move ({})",
                        view.why_not.join("; ")
                    ),
                },
                moves: view.moves.clone(),
                operation: op.as_ref().map(|o| o.op.id.clone()),
            },
        )?;
        op.ok_or_else(|| {
            Error::conflict(
                "NothingToBalance",
                format!(
                    "nothing to move: {}",
                    if view.why_not.is_empty() {
                        "the cloud is balanced".to_string()
                    } else {
                        view.why_not.join("; ")
                    }
                ),
            )
        })
    })?;
    operations::announce(ctl, &op.op);
    Ok(op.op)
}

/// One round of the automatic balancer (`--balance auto`): hold, plan, act, record.
pub fn auto_round(ctl: &Controller) -> Result<()> {
    if ctl.config().balance.mode != BalanceMode::Auto {
        return Ok(());
    }
    let (decision, op) = ctl.db().atomic(|c| {
        let s = ctl.snapshot(c)?;
        let (hosts, vms, cons) = inputs(ctl, c, &s)?;
        let cfg = BalanceConfig::default();
        if let Some(why) = busy(c)? {
            let d = BalanceDecision {
                time: db::now(),
                imbalance: balance::imbalance(&hosts, &cfg).score_pct,
                summary: format!("no round: {why}"),
                moves: vec![],
                operation: None,
            };
            record_decision(c, d.clone())?;
            return Ok::<_, Error>((d, None));
        }
        let (p, next) =
            balance::balance_round(&hosts, &vms, &cons, &cfg, stored_state(c)?, now_s());
        db::meta_set(
            c,
            STATE_META,
            &serde_json::to_string(&next).unwrap_or_default(),
        )?;
        let view = plan_view(&s, &hosts, &p, &cfg);
        let op = start_apply(c, &p, "automatic balancing")?;
        let d = BalanceDecision {
            time: db::now(),
            imbalance: view.imbalance,
            summary: if view.moves.is_empty() {
                format!("nothing moved: {}", view.why_not.join("; "))
            } else {
                format!(
                    "{} moves: {}",
                    view.moves.len(),
                    view.moves
                        .iter()
                        .map(|m| format!("{} {} → {}", m.vm, m.from, m.to))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            moves: view.moves.clone(),
            operation: op.as_ref().map(|o| o.op.id.clone()),
        };
        record_decision(c, d.clone())?;
        Ok((d, op))
    })?;
    ctl.emit("balance.decision", "cloud", decision.summary.clone());
    if let Some(op) = op {
        operations::announce(ctl, &op.op);
        crate::progress::progress(ctl);
    }
    Ok(())
}

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
