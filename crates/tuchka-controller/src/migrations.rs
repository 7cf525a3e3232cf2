//! Moving VMs between hosts: start a migration (the controller records the move and picks or
//! checks the target), carry it through its phases as the two hosts report
//! ([`tuchka_core::migration::decide`]), and say what each host must do (the `migration` of a
//! VM in the hosts' desired states, and removals).
//!
//! Protocol (see docs/architecture.md, "Migration"): the target gets the VM as `incoming` and
//! prepares (image, overlay of the same size, seed, networks), reporting `prepared`; the source
//! gets it as `outgoing` and, once told `go`, moves it through the target's migration channel;
//! when it reports `completed` the controller gives the VM to the target in one transaction
//! (addresses, DNS, VXLAN peers, rules and forwards follow from the desired state) and names the
//! source's copy for removal. A failure tells the source to abort; once the source confirms it
//! still holds the VM, the target's copy is named for removal.

use rusqlite::Connection;
use tuchka_api::agent::{CaptureStatus, PeerHost, VmMigrationDesired};
use tuchka_api::{
    MigrationMode, MigrationPhase, Operation, OperationPhase, PhaseState, PowerState, VmMigrate,
    VmState,
};
use tuchka_core::migration::{self as machine, Limits, MigrationInput, Step as MStep};
use tuchka_core::names;
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, MigrationRow, OpRow, RemovalRow, VmRow};

use crate::error::{Error, Result};
use crate::operations::{self, failure, new_op, Step};
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// The phases of a migration as its operation shows them.
const PHASES: [&str; 4] = ["prepare target", "copy", "switch over", "clean up"];

/// Why a VM cannot move now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable code.
    pub code: &'static str,
    /// In words.
    pub message: String,
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        Error::conflict(r.code, r.message)
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// `vm migrate`: move VM `name` (live if it runs or is paused, cold if it is stopped) to
/// `req.to` or where the scheduler puts it.
pub fn start(ctl: &Controller, name: &str, req: VmMigrate) -> Result<Operation> {
    operations::start(ctl, |c| {
        let s = ctl.snapshot(c)?;
        let v = s
            .vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::not_found("vm", "vm", name))?;
        let target = match req.to.as_deref() {
            Some(t) => Some(
                s.hosts
                    .iter()
                    .find(|h| h.name == t || h.id == t)
                    .ok_or_else(|| Error::not_found("host", "host", t))?
                    .id
                    .clone(),
            ),
            None => None,
        };
        Ok(start_in(
            ctl,
            c,
            &s,
            v,
            target.as_deref(),
            None,
            "asked for",
        )?)
    })
}

/// Record a migration of `v` inside the caller's transaction (`target` None: the scheduler
/// picks; `parent`: the drain or balance operation it belongs to). Returns its operation.
pub fn start_in(
    ctl: &Controller,
    c: &Connection,
    s: &Snapshot,
    v: &VmRow,
    target: Option<&str>,
    parent: Option<&str>,
    why: &str,
) -> std::result::Result<OpRow, Refusal> {
    let mode = mode_of(v)?;
    if v.deleting {
        return Err(refuse(
            "VmDeleting",
            format!("vm {:?} is being removed", v.name),
        ));
    }
    if let Some(m) = s.migration_of(&v.id) {
        return Err(refuse(
            "VmMigrating",
            format!(
                "vm {:?} is already migrating (operation {}); a VM is in one migration at a time",
                v.name, m.id
            ),
        ));
    }
    if let Some(x) = s.captures.iter().find(|x| {
        x.vm_id == v.id && matches!(x.status, CaptureStatus::Copying | CaptureStatus::Uploading)
    }) {
        return Err(refuse(
            "VmCapturing",
            format!(
                "vm {:?} is being captured as image {:?} (operation {}); migrate it when that is done",
                v.name, x.image, x.id
            ),
        ));
    }
    let source = s
        .host(&v.host_id)
        .ok_or_else(|| refuse("HostNotFound", format!("vm {:?} has no host", v.name)))?;
    if !s.is_up(source) {
        return Err(refuse(
            "HostDown",
            format!(
                "host {} of vm {:?} is down: a migration needs its agent (see: tuchka host list)",
                source.name, v.name
            ),
        ));
    }
    if source.facts.channel_port == 0 {
        return Err(refuse(
            "NoChannel",
            format!(
                "host {} has no migration channel (is its agent up to date?)",
                source.name
            ),
        ));
    }
    if let Some(t) = target {
        if t == source.id {
            return Err(refuse(
                "SameHost",
                format!("vm {:?} is already on host {}", v.name, source.name),
            ));
        }
    }
    let g = s
        .groups
        .get(&v.group)
        .ok_or_else(|| refuse("GroupNotFound", format!("group {:?} not found", v.group)))?;
    let p = crate::scheduler::migration_target(ctl, s, g, &v.id, &source.id, target)
        .map_err(|why| refuse("NoTarget", format!("vm {:?} cannot move: {why}", v.name)))?;
    if s.removals
        .iter()
        .any(|r| r.vm_id == v.id && r.host_id == p.host_id)
    {
        return Err(refuse(
            "CleanupPending",
            format!(
                "host {} still removes what an earlier migration of vm {:?} left there; try again shortly",
                s.host_name(&p.host_id),
                v.name
            ),
        ));
    }
    let now_ms = db::now_unix_ms();
    let target_name = s.host_name(&p.host_id);
    let mut op = new_op(
        OpKind::VmMigrate {
            vm: v.name.clone(),
            vm_id: v.id.clone(),
            mode,
        },
        &format!("vm/{}", v.name),
        PHASES.len() as u32,
        &format!(
            "{mode} migration {} → {target_name}: preparing the target",
            source.name
        ),
    );
    op.op.parent = parent.map(String::from);
    op.op.phases = phases(MigrationPhase::Preparing, "");
    let m = MigrationRow {
        id: op.op.id.clone(),
        vm_id: v.id.clone(),
        vm_name: v.name.clone(),
        source_host: source.id.clone(),
        target_host: p.host_id.clone(),
        mode,
        phase: MigrationPhase::Preparing,
        reason: format!("{why}; {}", p.reason),
        copied_bytes: 0,
        remaining_bytes: 0,
        mib_per_s: 0.0,
        total_ms: None,
        downtime_ms: None,
        bytes: None,
        error: None,
        started_at: db::now(),
        started_unix_ms: now_ms,
        phase_since_unix_ms: now_ms,
        finished_at: None,
        source_obs: Default::default(),
        target_obs: Default::default(),
        target_cleanup: false,
    };
    let stored = db::save_migration(c, &m).and_then(|()| db::save_operation(c, &op));
    stored.map_err(|e| refuse("Internal", format!("cannot record the migration: {e}")))?;
    Ok(op)
}

/// Live for a VM that runs or is paused, cold for a stopped one; nothing in between.
fn mode_of(v: &VmRow) -> std::result::Result<MigrationMode, Refusal> {
    match (v.desired, v.observed) {
        (PowerState::Running, VmState::Running) | (PowerState::Paused, VmState::Paused) => {
            Ok(MigrationMode::Live)
        }
        (PowerState::Stopped, VmState::Stopped) => Ok(MigrationMode::Cold),
        (_, state) => Err(refuse(
            "VmBusy",
            format!(
                "vm {:?} is {state} (asked to be {}): it can move when it is running, paused or stopped",
                v.name, v.desired
            ),
        )),
    }
}

/// The operation's phases for a migration in `phase` (`message`: what the current one does).
fn phases(phase: MigrationPhase, message: &str) -> Vec<OperationPhase> {
    let current = match phase {
        MigrationPhase::Preparing => 0,
        MigrationPhase::Copying => 1,
        MigrationPhase::SwitchingOver => 2,
        MigrationPhase::CleaningUp => 3,
        MigrationPhase::Done => 4,
        MigrationPhase::Aborting | MigrationPhase::Failed => 5,
    };
    PHASES
        .iter()
        .enumerate()
        .map(|(i, name)| OperationPhase {
            name: name.to_string(),
            state: if current == 5 {
                PhaseState::Skipped
            } else if i < current {
                PhaseState::Done
            } else if i == current {
                PhaseState::Running
            } else {
                PhaseState::Pending
            },
            message: if i == current {
                message.to_string()
            } else {
                String::new()
            },
            started_at: None,
            finished_at: None,
        })
        .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The copy's progress in words: `412 of 1024 MiB (40 %), 96 MiB/s`.
fn copy_progress(m: &MigrationRow) -> String {
    let total = m.copied_bytes + m.remaining_bytes;
    if total == 0 {
        return "starting the copy".into();
    }
    format!(
        "{} copied, {} to go ({:.0} %), {:.0} MiB/s",
        mib(m.copied_bytes),
        mib(m.remaining_bytes),
        100.0 * m.copied_bytes as f64 / total as f64,
        m.mib_per_s
    )
}

/// The outcome in words: `h1 → h2 in 1.9 s, downtime 120 ms, 300 MiB moved`.
pub fn outcome(m: &MigrationRow, from: &str, to: &str) -> String {
    let mut s = format!("{} {from} → {to}", m.mode);
    if let Some(t) = m.total_ms {
        s += &format!(" in {:.1} s", t as f64 / 1000.0);
    }
    if let Some(d) = m.downtime_ms {
        s += &format!(", downtime {d} ms");
    }
    if let Some(b) = m.bytes {
        s += &format!(", {} moved", mib(b));
    }
    s
}

/// Move every active migration on as far as the hosts' reports allow. Returns true when the
/// desired state of some host changed.
pub fn advance(ctl: &Controller, c: &Connection, limits: &Limits) -> Result<bool> {
    // Called on every tick: the whole state is read only while a migration is under way.
    if db::active_migrations(c)?.is_empty() {
        return Ok(false);
    }
    let s = ctl.snapshot(c)?;
    let mut changed = false;
    for mut m in s.migrations.clone() {
        let now_ms = db::now_unix_ms();
        let mut source = m.source_obs.clone();
        source.up = s.id_is_up(&m.source_host);
        let mut target = m.target_obs.clone();
        target.up = s.id_is_up(&m.target_host);
        if let Some(o) = &source.migration {
            m.copied_bytes = o.copied_bytes;
            m.remaining_bytes = o.remaining_bytes;
            m.mib_per_s = o.mib_per_s;
        }
        let size_mib = s
            .vms
            .iter()
            .find(|v| v.id == m.vm_id)
            .and_then(|v| s.groups.get(&v.group))
            .map(|g| g.memory_mib + g.disk_mib)
            .unwrap_or(0);
        let in_phase =
            std::time::Duration::from_millis((now_ms - m.phase_since_unix_ms).max(0) as u64);
        let input = MigrationInput {
            phase: m.phase,
            mode: m.mode,
            in_phase,
            source,
            target: target.clone(),
            size_mib,
        };
        let step = machine::decide(&input, limits);
        let from = s.host_name(&m.source_host);
        let to = s.host_name(&m.target_host);
        let mut message = None;
        let set_phase = |m: &mut MigrationRow, p: MigrationPhase| {
            m.phase = p;
            m.phase_since_unix_ms = now_ms;
        };
        match step {
            MStep::Wait { message: w } => {
                if m.phase == MigrationPhase::Copying {
                    message = Some(copy_progress(&m));
                } else if !w.is_empty() {
                    message = Some(w);
                }
            }
            MStep::Go => {
                set_phase(&mut m, MigrationPhase::Copying);
                message = Some("target ready: copying".into());
                changed = true;
            }
            MStep::SwitchOver => {
                if let Some(o) = &m.source_obs.migration {
                    m.total_ms = o.total_ms;
                    m.downtime_ms = o.downtime_ms;
                    m.bytes = o.bytes;
                }
                if m.total_ms.is_none() {
                    m.total_ms = Some((now_ms - m.started_unix_ms).max(0) as u64);
                }
                switch_over(ctl, c, &m, &from, &to)?;
                set_phase(&mut m, MigrationPhase::CleaningUp);
                message = Some(format!(
                    "{}; the source removes its copy",
                    outcome(&m, &from, &to)
                ));
                changed = true;
                ctl.emit(
                    "vm.migrated",
                    &format!("vm/{}", m.vm_name),
                    format!("vm {} moved: {}", m.vm_name, outcome(&m, &from, &to)),
                );
            }
            MStep::Done { note } => {
                set_phase(&mut m, MigrationPhase::Done);
                m.finished_at = Some(db::now());
                let mut text = outcome(&m, &from, &to);
                if let Some(n) = note {
                    text += &format!(" ({n})");
                }
                message = Some(text);
                changed = true;
            }
            MStep::Abort(f) => {
                set_phase(&mut m, MigrationPhase::Aborting);
                message = Some(format!("aborting: {}", f.message));
                m.error = Some(failure(
                    &format!(
                        "migration of vm {} to {to} failed: {}",
                        m.vm_name, f.message
                    ),
                    f.chain,
                ));
                changed = true;
                ctl.emit(
                    "vm.migration",
                    &format!("vm/{}", m.vm_name),
                    format!(
                        "migration of vm {} to {to} aborting: {}",
                        m.vm_name, f.message
                    ),
                );
            }
            MStep::CleanTarget => {
                db::insert_removal(
                    c,
                    &RemovalRow {
                        vm_id: m.vm_id.clone(),
                        host_id: m.target_host.clone(),
                        name: m.vm_name.clone(),
                        domain: names::domain_name(ctl.cloud_id(), &m.vm_name),
                        reason: format!("failed migration {}", m.id),
                    },
                )?;
                m.target_cleanup = true;
                set_phase(&mut m, MigrationPhase::Failed);
                m.finished_at = Some(db::now());
                message = Some(format!("the VM stays on {from}; {to} removes its copy"));
                changed = true;
            }
            MStep::Failed { note } => {
                set_phase(&mut m, MigrationPhase::Failed);
                m.finished_at = Some(db::now());
                if let (Some(n), Some(e)) = (note, m.error.as_mut()) {
                    e.message += &format!(" ({n})");
                }
                changed = true;
            }
        }
        db::save_migration(c, &m)?;
        if let Some(mut op) = db::operation(c, &m.id)? {
            let text = message.unwrap_or_else(|| op.op.message.clone());
            op.op.phases = phases(m.phase, &text);
            op.op.done = op
                .op
                .phases
                .iter()
                .filter(|p| p.state == PhaseState::Done)
                .count() as u32;
            op.op.message = text;
            db::save_operation(c, &op)?;
        }
    }
    Ok(changed)
}

/// The VM now belongs to the target: move it there and name the source's copy for removal.
fn switch_over(
    ctl: &Controller,
    c: &Connection,
    m: &MigrationRow,
    from: &str,
    to: &str,
) -> Result<()> {
    let Some(mut v) = db::vm_by_id(c, &m.vm_id)? else {
        return Ok(());
    };
    v.host_id = m.target_host.clone();
    // Its volumes were copied with it: they live on the target now (the source's copies are
    // named for removal with the VM's, see desired::build).
    for mut x in db::volumes(c)?
        .into_iter()
        .filter(|x| x.vm_id.as_deref() == Some(v.id.as_str()))
    {
        x.host_id = m.target_host.clone();
        x.present = false;
        x.attached_to = None;
        db::save_volume(c, &x)?;
    }
    v.placement_reason = format!("migrated from {from} ({})", m.reason);
    v.error = None;
    v.error_chain.clear();
    db::update_vm(c, &v)?;
    db::insert_removal(
        c,
        &RemovalRow {
            vm_id: m.vm_id.clone(),
            host_id: m.source_host.clone(),
            name: m.vm_name.clone(),
            domain: names::domain_name(ctl.cloud_id(), &m.vm_name),
            reason: format!("migrated to {to}"),
        },
    )?;
    Ok(())
}

/// How a `vm.migrate` operation stands: it follows its migration row.
pub fn evaluate(c: &Connection, op_id: &str) -> Result<Step> {
    let Some(m) = db::migration(c, op_id)? else {
        return Ok(Step::Failed {
            error: "the migration record is gone".into(),
            chain: vec![],
        });
    };
    let names = |id: &str| {
        db::host(c, id)
            .ok()
            .flatten()
            .map(|h| h.name)
            .unwrap_or_else(|| id.to_string())
    };
    Ok(match m.phase {
        MigrationPhase::Done => Step::Succeeded {
            message: outcome(&m, &names(&m.source_host), &names(&m.target_host)),
        },
        MigrationPhase::Failed => {
            let e = m
                .error
                .clone()
                .unwrap_or_else(|| failure("migration failed", vec![]));
            Step::Failed {
                error: e.message,
                chain: e.chain,
            }
        }
        _ => Step::Running {
            done: 0,
            message: String::new(),
        },
    })
}

/// The part host `host_id` plays in the migration of VM `v`, if any (see the module docs).
/// `None` also when the host plays no part any more (the target after its copy was named for
/// removal).
pub fn desired_role(s: &Snapshot, v: &VmRow, host_id: &str) -> Option<VmMigrationDesired> {
    let m = s.migration_of(&v.id)?;
    let peer = |id: &str| {
        let h = s.host(id)?;
        Some(PeerHost {
            host_id: h.id.clone(),
            name: h.name.clone(),
            address: h.facts.address.clone(),
            channel_port: h.facts.channel_port,
        })
    };
    let before_switch = matches!(
        m.phase,
        MigrationPhase::Preparing | MigrationPhase::Copying | MigrationPhase::Aborting
    );
    if !before_switch {
        return None;
    }
    if host_id == m.target_host && !m.target_cleanup {
        return Some(VmMigrationDesired::Incoming {
            id: m.id.clone(),
            mode: m.mode,
            source: peer(&m.source_host)?,
        });
    }
    if host_id == m.source_host && !m.target_cleanup {
        let target = peer(&m.target_host)?;
        let target_pool = s
            .host(&m.target_host)
            .map(|h| h.facts.pool.clone())
            .unwrap_or_default();
        return Some(VmMigrationDesired::Outgoing {
            id: m.id.clone(),
            mode: m.mode,
            target,
            target_pool,
            go: m.phase == MigrationPhase::Copying,
            abort: m.phase == MigrationPhase::Aborting,
        });
    }
    None
}
