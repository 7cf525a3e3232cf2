//! The migration state machine of the controller: from what the two hosts last reported about a
//! VM, decide the next step of its migration. Pure, so every phase and every failure in it is
//! unit-tested.
//!
//! ```text
//!  preparing ──target prepared──▶ copying ──source completed──▶ (switch over) ─▶ cleaning-up ─▶ done
//!      │                             │                                              ▲
//!      └─failure/timeout/host down──┴──▶ aborting ──source still has it──▶ failed (target cleaned)
//!                                            └──source completed after all──▶ (switch over)
//! ```
//!
//! Safety rules (peers lose data exactly here, see the migration notes): the source's copy of
//! the VM is never named for removal before the VM runs on the target (live) or its verified disk
//! is there (cold); the target's copy is named for removal only once the source has reported
//! that it still holds the VM and no copy is running. The removal outlives the migration: a
//! target that cannot act now (its libvirtd down, its agent dead) removes its copy when it can,
//! and no new migration of the VM goes there before it has. A host that stops reporting holds a step
//! until it is back; after [`Limits::give_up`] an abort ends as failed without touching the
//! silent host (what it left is reported as an orphan when it returns).

use std::time::Duration;

use tuchka_api::agent::{MigrationObserved, MigrationStatus};
use tuchka_api::{MigrationMode, MigrationPhase};

/// What one host last reported about the VM.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Side {
    /// The host reported recently (not stored: the controller sets it from the host's last
    /// report time).
    #[serde(skip)]
    pub up: bool,
    /// The host's last report lists the VM.
    pub reported: bool,
    /// A libvirt domain of the VM exists there.
    pub domain: bool,
    /// The host's view of this migration (None: it did not mention it).
    pub migration: Option<MigrationObserved>,
}

impl Side {
    fn status(&self) -> Option<MigrationStatus> {
        self.migration.as_ref().map(|m| m.status)
    }
}

/// Everything the decision needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInput {
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// Live or cold.
    pub mode: MigrationMode,
    /// Time spent in this phase.
    pub in_phase: Duration,
    /// The source host.
    pub source: Side,
    /// The target host.
    pub target: Side,
    /// Memory plus disk to copy, MiB (sets the copy timeout).
    pub size_mib: u64,
}

/// Time limits of the phases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most time the target may take to prepare (it may have to fetch the image).
    pub prepare: Duration,
    /// Least time a copy may take before it is called stuck.
    pub copy_min: Duration,
    /// Extra copy time allowed per GiB to move (Nova: 800 s per GiB).
    pub copy_per_gib: Duration,
    /// After this long waiting on a silent host, an abort or a clean-up ends anyway.
    pub give_up: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            prepare: Duration::from_secs(600),
            copy_min: Duration::from_secs(300),
            copy_per_gib: Duration::from_secs(800),
            give_up: Duration::from_secs(600),
        }
    }
}

impl Limits {
    /// Most time the copy of `size_mib` may take.
    pub fn copy(&self, size_mib: u64) -> Duration {
        let per = self.copy_per_gib.as_secs_f64() * size_mib as f64 / 1024.0;
        self.copy_min.max(Duration::from_secs_f64(per))
    }
}

/// Why a migration fails: the message, and the causes when a host gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed, in words.
    pub message: String,
    /// The causes, outermost first.
    pub chain: Vec<String>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            chain: vec![],
        }
    }

    fn from_host(what: &str, m: &MigrationObserved) -> Self {
        Failure {
            message: format!(
                "{what}: {}",
                m.error.as_deref().unwrap_or("failed without a reason")
            ),
            chain: m.error_chain.clone(),
        }
    }
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to change (progress, if any, is copied from the source's report).
    Wait {
        /// What the migration waits for, in words.
        message: String,
    },
    /// The target is ready: tell the source to copy (phase `copying`).
    Go,
    /// The copy finished: the VM now belongs to the target; name the source's copy for removal
    /// (phase `cleaning-up`).
    SwitchOver,
    /// The source has removed its copy (or is gone for good): the migration succeeded.
    Done {
        /// A note for the user (e.g. a silent source will clean up when it is back).
        note: Option<String>,
    },
    /// Something failed: tell the source to stop (phase `aborting`).
    Abort(Failure),
    /// The source confirmed it keeps the VM and no copy runs: name the target's copy for
    /// removal; the migration failed (the target removes its copy whenever it can: at once, or
    /// when its libvirtd or agent is back).
    CleanTarget,
    /// The abort is complete (or ends anyway): the migration failed.
    Failed {
        /// A note for the user (what was left where), if any.
        note: Option<String>,
    },
}

fn down(which: &str) -> String {
    format!("the {which} host stopped reporting")
}

/// The copy is over and the VM lives on the target.
fn completed(i: &MigrationInput) -> bool {
    let source_done = i.source.status() == Some(MigrationStatus::Completed);
    match i.mode {
        // The domain moved: the source lost it and the target has it — once the source's
        // job is over (libvirt undefines the source before the job returns its statistics), or
        // when the source has no job any more (its agent restarted after the copy).
        MigrationMode::Live => {
            source_done
                || (i.source.up
                    && i.source.reported
                    && !i.source.domain
                    && i.target.domain
                    && i.source.status() != Some(MigrationStatus::Running))
        }
        // The receiver verified the disk, then the source said so.
        MigrationMode::Cold => source_done,
    }
}

/// The source still holds the VM and runs no copy: the target's copy is a leftover.
fn source_holds_it(i: &MigrationInput) -> bool {
    i.source.up
        && i.source.reported
        && i.source.domain
        && !matches!(
            i.source.status(),
            Some(MigrationStatus::Running | MigrationStatus::Completed)
        )
}

/// Decide the next step (see the module docs).
pub fn decide(i: &MigrationInput, limits: &Limits) -> Step {
    match i.phase {
        MigrationPhase::Preparing => {
            if let Some(m) = &i.target.migration {
                if m.status == MigrationStatus::Failed {
                    return Step::Abort(Failure::from_host("the target could not prepare", m));
                }
            }
            if !i.target.up {
                return Step::Abort(Failure::new(down("target")));
            }
            if !i.source.up {
                return Step::Abort(Failure::new(down("source")));
            }
            if i.target.status() == Some(MigrationStatus::Prepared) {
                return Step::Go;
            }
            if i.in_phase > limits.prepare {
                return Step::Abort(Failure::new(format!(
                    "the target did not get ready within {} s",
                    limits.prepare.as_secs()
                )));
            }
            Step::Wait {
                message: "the target prepares: image, disk, seed, networks".into(),
            }
        }
        MigrationPhase::Copying => {
            if completed(i) {
                return Step::SwitchOver;
            }
            if let Some(m) = &i.source.migration {
                if m.status == MigrationStatus::Failed {
                    return Step::Abort(Failure::from_host("the copy failed", m));
                }
            }
            if let Some(m) = &i.target.migration {
                if m.status == MigrationStatus::Failed {
                    return Step::Abort(Failure::from_host("the target failed", m));
                }
            }
            if !i.target.up {
                return Step::Abort(Failure::new(down("target")));
            }
            if !i.source.up {
                return Step::Abort(Failure::new(down("source")));
            }
            let limit = limits.copy(i.size_mib);
            if i.in_phase > limit {
                return Step::Abort(Failure::new(format!(
                    "the copy did not finish within {} s",
                    limit.as_secs()
                )));
            }
            Step::Wait {
                message: "copying".into(),
            }
        }
        MigrationPhase::Aborting => {
            if completed(i) {
                // The copy finished before the source heard of the abort: the VM is on the
                // target now, which is a success.
                return Step::SwitchOver;
            }
            if source_holds_it(i) {
                return Step::CleanTarget;
            }
            if i.in_phase > limits.give_up {
                return Step::Failed {
                    note: Some(format!(
                        "gave up waiting after {} s: {}; anything left there is reported as an orphan",
                        limits.give_up.as_secs(),
                        if i.source.up {
                            "the source did not confirm it keeps the VM"
                        } else {
                            "the source host is silent"
                        }
                    )),
                };
            }
            Step::Wait {
                message: if i.source.up {
                    "waiting for the source to stop copying".into()
                } else {
                    format!("{}; waiting for it", down("source"))
                },
            }
        }
        MigrationPhase::CleaningUp => {
            if i.source.up && !i.source.reported {
                return Step::Done { note: None };
            }
            if !i.source.up && i.in_phase > limits.give_up {
                return Step::Done {
                    note: Some(
                        "the source host is silent: it removes its copy when it is back".into(),
                    ),
                };
            }
            Step::Wait {
                message: "the source removes its copy".into(),
            }
        }
        // Switching over is done by the controller in one transaction; the end states rest.
        MigrationPhase::SwitchingOver | MigrationPhase::Done | MigrationPhase::Failed => {
            Step::Wait {
                message: String::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(status: MigrationStatus) -> Option<MigrationObserved> {
        Some(MigrationObserved {
            error: (status == MigrationStatus::Failed).then(|| "boom".to_string()),
            error_chain: if status == MigrationStatus::Failed {
                vec!["libvirt: connection reset".into()]
            } else {
                vec![]
            },
            ..MigrationObserved::new("m", status)
        })
    }

    fn side(domain: bool, status: Option<MigrationStatus>) -> Side {
        Side {
            up: true,
            reported: true,
            domain,
            migration: status.and_then(obs),
        }
    }

    fn input(phase: MigrationPhase, source: Side, target: Side) -> MigrationInput {
        MigrationInput {
            phase,
            mode: MigrationMode::Live,
            in_phase: Duration::from_secs(1),
            source,
            target,
            size_mib: 256,
        }
    }

    const L: Limits = Limits {
        prepare: Duration::from_secs(600),
        copy_min: Duration::from_secs(300),
        copy_per_gib: Duration::from_secs(800),
        give_up: Duration::from_secs(600),
    };

    #[test]
    fn a_live_migration_goes_through_every_phase() {
        use MigrationPhase::*;
        use MigrationStatus as S;
        let i = input(Preparing, side(true, None), side(false, Some(S::Preparing)));
        assert!(matches!(decide(&i, &L), Step::Wait { .. }));
        let i = input(Preparing, side(true, None), side(false, Some(S::Prepared)));
        assert_eq!(decide(&i, &L), Step::Go);
        let i = input(
            Copying,
            side(true, Some(S::Running)),
            side(true, Some(S::Prepared)),
        );
        assert!(matches!(decide(&i, &L), Step::Wait { .. }));
        let i = input(
            Copying,
            side(false, Some(S::Completed)),
            side(true, Some(S::Prepared)),
        );
        assert_eq!(decide(&i, &L), Step::SwitchOver);
        let mut gone = side(false, None);
        gone.reported = false;
        let i = input(CleaningUp, gone, side(true, None));
        assert_eq!(decide(&i, &L), Step::Done { note: None });
    }

    #[test]
    fn a_running_job_is_waited_for_even_once_the_domain_left() {
        let i = input(
            MigrationPhase::Copying,
            side(false, Some(MigrationStatus::Running)),
            side(true, None),
        );
        assert!(
            matches!(decide(&i, &L), Step::Wait { .. }),
            "its statistics are still to come"
        );
    }

    #[test]
    fn a_source_that_restarted_after_the_copy_is_seen_as_completed() {
        let i = input(
            MigrationPhase::Copying,
            side(false, Some(MigrationStatus::Idle)),
            side(true, None),
        );
        assert_eq!(decide(&i, &L), Step::SwitchOver);
        // Cold: only the source's word counts (the target defines nothing before the switch).
        let mut cold = i.clone();
        cold.mode = MigrationMode::Cold;
        assert!(matches!(decide(&cold, &L), Step::Wait { .. }));
    }

    #[test]
    fn a_failure_in_each_phase_aborts_with_the_host_s_reason() {
        use MigrationPhase::*;
        use MigrationStatus as S;
        // prepare fails on the target
        let i = input(Preparing, side(true, None), side(false, Some(S::Failed)));
        match decide(&i, &L) {
            Step::Abort(f) => {
                assert!(f.message.contains("could not prepare: boom"), "{f:?}");
                assert_eq!(f.chain, vec!["libvirt: connection reset".to_string()]);
            }
            s => panic!("{s:?}"),
        }
        // the target vanishes while preparing
        let mut t = side(false, Some(S::Preparing));
        t.up = false;
        assert!(
            matches!(decide(&input(Preparing, side(true, None), t), &L), Step::Abort(f) if f.message.contains("target host stopped"))
        );
        // prepare takes too long
        let mut i = input(Preparing, side(true, None), side(false, Some(S::Preparing)));
        i.in_phase = Duration::from_secs(601);
        assert!(matches!(decide(&i, &L), Step::Abort(f) if f.message.contains("within 600 s")));
        // the copy fails on the source
        let i = input(
            Copying,
            side(true, Some(S::Failed)),
            side(true, Some(S::Prepared)),
        );
        assert!(matches!(decide(&i, &L), Step::Abort(f) if f.message.contains("copy failed")));
        // the target agent dies mid-copy
        let mut t = side(true, Some(S::Prepared));
        t.up = false;
        let i = input(Copying, side(true, Some(S::Running)), t);
        assert!(matches!(decide(&i, &L), Step::Abort(_)));
        // the copy is stuck
        let mut i = input(
            Copying,
            side(true, Some(S::Running)),
            side(true, Some(S::Prepared)),
        );
        i.in_phase = Duration::from_secs(301);
        assert!(matches!(decide(&i, &L), Step::Abort(f) if f.message.contains("did not finish")));
    }

    #[test]
    fn an_abort_cleans_the_target_only_once_the_source_holds_the_vm() {
        use MigrationPhase::*;
        use MigrationStatus as S;
        // still copying: wait
        let i = input(
            Aborting,
            side(true, Some(S::Running)),
            side(true, Some(S::Prepared)),
        );
        assert!(matches!(decide(&i, &L), Step::Wait { .. }));
        // the source silent: never clean the target on a guess
        let mut s = side(true, Some(S::Failed));
        s.up = false;
        let i = input(Aborting, s, side(false, Some(S::Prepared)));
        assert!(matches!(decide(&i, &L), Step::Wait { .. }));
        // the source holds it, no copy: clean the target
        let i = input(
            Aborting,
            side(true, Some(S::Failed)),
            side(false, Some(S::Prepared)),
        );
        assert_eq!(decide(&i, &L), Step::CleanTarget);
        // the copy finished before the abort reached the source: it is a success after all
        let i = input(Aborting, side(false, Some(S::Completed)), side(true, None));
        assert_eq!(decide(&i, &L), Step::SwitchOver);
    }

    #[test]
    fn silent_hosts_end_aborts_and_clean_ups_only_after_the_give_up_time() {
        use MigrationPhase::*;
        let mut s = side(true, Some(MigrationStatus::Failed));
        s.up = false;
        let mut i = input(Aborting, s.clone(), side(false, None));
        i.in_phase = Duration::from_secs(601);
        assert!(matches!(decide(&i, &L), Step::Failed { note: Some(n) } if n.contains("orphan")));
        let mut i = input(CleaningUp, s, side(true, None));
        assert!(matches!(decide(&i, &L), Step::Wait { .. }));
        i.in_phase = Duration::from_secs(601);
        assert!(matches!(decide(&i, &L), Step::Done { note: Some(_) }));
    }

    #[test]
    fn the_copy_timeout_grows_with_the_size() {
        assert_eq!(L.copy(256), Duration::from_secs(300));
        assert_eq!(L.copy(10 * 1024), Duration::from_secs(8000));
    }
}
