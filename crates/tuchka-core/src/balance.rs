//! The balancer: which running VMs to live-migrate so that CPU and memory load are even across
//! hosts, and — when it moves nothing — why, in words a user can act on.
//!
//! Everything here is pure. [`balance_round`] is one round of the controller's balancing loop:
//! it takes the hosts ([`HostLoad`]: the scheduler's [`HostCapacity`] plus measured load), the
//! VMs ([`VmLoad`]), the [`Constraints`], the [`BalanceConfig`], the [`BalanceState`] carried
//! over from the previous round and the time, and returns a [`BalancePlan`] and the state to
//! store for the next round. [`preview`] is the same without the hold (for `tuchka balance
//! plan`), [`imbalance`] is the score alone (for `tuchka balance status`), and [`plan_drain`]
//! chooses a target for every VM of a host being emptied, through the scheduler itself.
//!
//! # The score
//!
//! Only *balanced hosts* take part: up, not draining, and with a CPU measurement. For each such
//! host `i`, its CPU load `c_i` is the measured busy fraction of its CPUs (0..1, from
//! `/proc/stat`) and its memory load `m_i` is memory in use / memory (0..1). With `σ_c`, `σ_m`
//! the population standard deviations of these over the `n` balanced hosts and the weights
//! `w_c`, `w_m` (default 1 and 1):
//!
//! ```text
//! imbalance = 100 % × sqrt((w_c·σ_c² + w_m·σ_m²) / (w_c + w_m)) / 0.5
//! ```
//!
//! 0.5 is the largest standard deviation that numbers in 0..1 can have (half the hosts full,
//! half empty), so the score is 0 % when every host carries the same share of its capacity and
//! 100 % at the worst possible spread. Like Ganeti hbal it adds up per-resource spreads (as
//! variances, so a resource that is badly spread is not averaged away by one that is not). It is
//! not Proxmox CRS's coefficient of variation (σ / mean): that reads 100 % on an idle cloud where
//! one host is at 3 % CPU and the others at 0 %, and would migrate VMs for noise; what hurts is
//! distance in percentage points.
//!
//! The *pair imbalance* of two hosts is the same formula over just those two, measured from the
//! cloud's means `μ_c`, `μ_m` (so it is on the same 0–100 % scale):
//!
//! ```text
//! P(a, b) = 100 % × sqrt(Σ_{i∈{a,b}} (w_c·(c_i − μ_c)² + w_m·(m_i − μ_m)²) / (2·(w_c + w_m))) / 0.5
//! ```
//!
//! The score is cheap to update: the balancer keeps `Σx` and `Σx²` per resource, so the score
//! after a candidate move, which changes two hosts, costs O(1) (`σ² = Σx²/n − (Σx/n)²`). To
//! find the best move without trying every (VM, target) pair, VMs are visited by an upper bound
//! of the gain any target could give them, and the search stops when no VM left can be chosen
//! (see `Model::best_moves`); every pair is tried only to explain a round that moves nothing.
//!
//! A move's predicted effect: the VM's measured CPU (cores) leaves the source and arrives at the
//! target (`c_src −= cores / cpus_src`, `c_dst += cores / cpus_dst`), and so does its resident
//! memory (the measured RSS when known, else its configured size).
//!
//! # Rules (no ping-pong)
//!
//! 1. **Threshold**: a round acts only when the imbalance is above `threshold_pct` (25 %).
//! 2. **Hold**: ... and has been for `hold_rounds` (3) consecutive rounds. The count is [`BalanceState`]; it
//!    restarts after a round that moves something, so the next action rests on measurements
//!    taken after those migrations.
//! 3. **Margin**: a move from `a` to `b` is made only if the pair imbalance `P(a, b)` is above the
//!    threshold before the move and the move cuts it by at least `margin_pct` (10 %) of its
//!    value — `P_after ≤ P_before × (1 − margin/100)`, both from the cloud's means before the move
//!    — and the cloud's score goes down. The margin is on the pair, not on the cloud's score,
//!    because on a cloud of `n` hosts one move changes the cloud's score by about `1/n`: a margin
//!    on the cloud's score would forbid every move on a large cloud. Requiring the pair itself to
//!    be above the threshold stops moves between two hosts that are both near the mean while an
//!    unfixable hot spot keeps the cloud's score high.
//! 4. **Cooldown**: a VM that moved less than `cooldown_s` (600 s) ago is not moved.
//! 5. **Caps**: at most one move per host per round (as source or target) and at most
//!    `max_moves` (4) per round. Moves of one round thus run on disjoint host pairs: they can
//!    run at the same time without sharing a host's link, and the prediction of one move does
//!    not depend on another's on the same host. The round also stops once the predicted score
//!    is at or below the threshold.
//! 6. **Targets**: a balanced host, not the source; room for the VM's vCPU, memory and disk
//!    under the overcommit ratios (the scheduler's own rule, [`placement::refuse_reason`]);
//!    anti-affinity kept; its CPU and memory load at or below `target_ceiling_pct` (90 %) after
//!    the move. Draining and down hosts are never targets; their VMs are left to drain and
//!    recovery, and their loads are not in the score.
//! 7. **Candidates**: running VMs on balanced hosts that are not opted out, not unable to move
//!    (another migration runs), not in cooldown, and whose memory dirty rate (when known) is
//!    below the link's bandwidth (else pre-copy would never finish).
//! 8. **Choice**: greedy with one-step lookahead, like hbal: every candidate move is scored by
//!    the cloud score it would leave; among the qualifying moves whose gain is within
//!    `similar_gain_pct` (20 %) of the best gain, the one that copies least memory wins (DRS
//!    prefers small VMs), then the larger gain, then the VM id; it is applied to the model and
//!    the next move is chosen on the updated model.
//!
//! Inputs are sorted by id first, so the same input (in any order) gives the same plan.
//!
//! # Cost
//!
//! A move's [`MoveCost`]: the memory to copy is the VM's resident memory (QEMU does not send
//! zero pages); with a dirty-rate estimate `d` and the link's bandwidth `B`, pre-copy resends
//! what the guest dirties meanwhile, a geometric series: `copy = resident / (1 − d/B)`, taking
//! `copy / B` seconds; when `d ≥ B` it does not converge (the VM is not a candidate).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::placement::{self, GroupRequest, HostCapacity, Ratios};
use tuchka_api::PlacementPolicy;

/// The largest standard deviation of numbers in 0..1: the score's 100 %.
const NORM: f64 = 0.5;

/// What the balancer knows of a host: the scheduler's view plus measured load.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    /// The scheduler's view: id, name, up/draining, CPUs and memory, and what VMs were given
    /// (allocation, for the overcommit check).
    pub capacity: HostCapacity,
    /// Measured CPU busy fraction of the whole host, 0..=1 (from `/proc/stat`); `None` until the
    /// agent has two samples (such a host is left out of balancing).
    pub cpu_usage: Option<f64>,
    /// Measured memory in use, MiB (`MemTotal − MemAvailable`).
    pub memory_in_use_mib: u64,
}

/// What the balancer knows of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmLoad {
    /// VM id.
    pub id: String,
    /// VM name (for messages).
    pub name: String,
    /// Its group (anti-affinity is per group).
    pub group: String,
    /// The host it is on.
    pub host_id: String,
    /// Running (or paused): it has memory on its host. A stopped VM changes no load and is not
    /// balanced; drain moves it cold.
    pub running: bool,
    /// vCPUs given to it.
    pub vcpus: u32,
    /// Memory given to it, MiB.
    pub memory_mib: u64,
    /// Root disk size, MiB (the target must have room to provision it).
    pub disk_mib: u64,
    /// Its image's sha256 (a target that caches it needs no image copy first).
    pub image_sha256: String,
    /// Measured CPU use, cores (1.0 = one core busy all the time).
    pub cpu_cores: f64,
    /// Measured resident memory, MiB, when the agent reports it; else `memory_mib` is assumed.
    pub memory_in_use_mib: Option<u64>,
    /// Estimated rate at which the guest dirties memory, MiB/s, when known.
    pub dirty_rate_mib_s: Option<f64>,
    /// When it last moved (started migrating), Unix seconds.
    pub last_moved_at: Option<u64>,
    /// Opted out: the balancer never moves it (drain still does: the host is going away).
    pub opt_out: bool,
    /// Why it cannot move now, e.g. `a migration of it is running`; `None` when it can.
    pub cannot_move: Option<String>,
}

/// Rules a plan keeps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    /// Overcommit ratios: the same the scheduler uses.
    pub ratios: Ratios,
    /// Groups with anti-affinity: never two of their VMs on one host.
    pub anti_affinity: BTreeSet<String>,
}

/// The balancer's settings. Percentages are in percent (25.0 = 25 %).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// Act only when the imbalance is above this, %.
    pub threshold_pct: f64,
    /// ... for this many consecutive rounds.
    pub hold_rounds: u32,
    /// A move must cut its pair's imbalance by at least this share of it, %.
    pub margin_pct: f64,
    /// A moved VM is not moved again for this long, seconds.
    pub cooldown_s: u64,
    /// Most moves in one round.
    pub max_moves: u32,
    /// Moves whose gain is within this share of the best gain count as equal; the one copying
    /// least memory wins, %.
    pub similar_gain_pct: f64,
    /// A target's CPU and memory load must stay at or below this after the move, %.
    pub target_ceiling_pct: f64,
    /// Weight of CPU load in the score.
    pub cpu_weight: f64,
    /// Weight of memory load in the score.
    pub memory_weight: f64,
    /// Bandwidth of a migration, MiB/s (for cost estimates and convergence).
    pub link_mib_s: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            threshold_pct: 25.0,
            hold_rounds: 3,
            margin_pct: 10.0,
            cooldown_s: 600,
            max_moves: 4,
            similar_gain_pct: 20.0,
            target_ceiling_pct: 90.0,
            cpu_weight: 1.0,
            memory_weight: 1.0,
            // 1 Gbit/s Ethernet after TCP/TLS overhead: the common link of a small cloud.
            link_mib_s: 112.0,
        }
    }
}

impl BalanceConfig {
    /// Check every setting's range; call it where settings are read. The planning functions
    /// clamp out-of-range values rather than fail.
    pub fn validate(&self) -> Result<(), BalanceError> {
        let pct = |setting: &'static str, value: f64| {
            if (0.0..=100.0).contains(&value) {
                Ok(())
            } else {
                Err(BalanceError::Config {
                    setting,
                    value,
                    expected: "a percentage from 0 to 100",
                })
            }
        };
        pct("threshold_pct", self.threshold_pct)?;
        pct("margin_pct", self.margin_pct)?;
        pct("similar_gain_pct", self.similar_gain_pct)?;
        if !(self.target_ceiling_pct > 0.0 && self.target_ceiling_pct <= 100.0) {
            return Err(BalanceError::Config {
                setting: "target_ceiling_pct",
                value: self.target_ceiling_pct,
                expected: "a percentage above 0 and at most 100",
            });
        }
        for (setting, value) in [
            ("cpu_weight", self.cpu_weight),
            ("memory_weight", self.memory_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(BalanceError::Config {
                    setting,
                    value,
                    expected: "a weight of 0 or more",
                });
            }
        }
        if self.cpu_weight + self.memory_weight <= 0.0 {
            return Err(BalanceError::Config {
                setting: "cpu_weight",
                value: self.cpu_weight,
                expected: "cpu_weight and memory_weight must not both be 0",
            });
        }
        if !(self.link_mib_s.is_finite() && self.link_mib_s > 0.0) {
            return Err(BalanceError::Config {
                setting: "link_mib_s",
                value: self.link_mib_s,
                expected: "a bandwidth above 0 MiB/s",
            });
        }
        Ok(())
    }

    /// The settings with every out-of-range value replaced by the nearest valid one (NaN by the
    /// default).
    fn sane(&self) -> BalanceConfig {
        let d = BalanceConfig::default();
        let clamp = |v: f64, lo: f64, hi: f64, dflt: f64| {
            if v.is_nan() {
                dflt
            } else {
                v.clamp(lo, hi)
            }
        };
        let mut c = BalanceConfig {
            threshold_pct: clamp(self.threshold_pct, 0.0, 100.0, d.threshold_pct),
            hold_rounds: self.hold_rounds,
            margin_pct: clamp(self.margin_pct, 0.0, 100.0, d.margin_pct),
            cooldown_s: self.cooldown_s,
            max_moves: self.max_moves,
            similar_gain_pct: clamp(self.similar_gain_pct, 0.0, 100.0, d.similar_gain_pct),
            target_ceiling_pct: clamp(self.target_ceiling_pct, 1.0, 100.0, d.target_ceiling_pct),
            cpu_weight: clamp(self.cpu_weight, 0.0, f64::MAX, d.cpu_weight),
            memory_weight: clamp(self.memory_weight, 0.0, f64::MAX, d.memory_weight),
            link_mib_s: clamp(self.link_mib_s, 1e-3, f64::MAX, d.link_mib_s),
        };
        if c.cpu_weight + c.memory_weight <= 0.0 {
            c.cpu_weight = 1.0;
            c.memory_weight = 1.0;
        }
        c
    }
}

/// What the balancer carries from one round to the next; the controller stores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceState {
    /// Consecutive rounds the imbalance has been above the threshold, counted since the last
    /// round that moved something.
    pub rounds_above: u32,
}

/// Errors of the balancer.
#[derive(Debug, Error, PartialEq)]
pub enum BalanceError {
    /// The host to drain is not in the list.
    #[error("host {host:?} not found (see: tuchka host list)")]
    UnknownHost {
        /// The id asked for.
        host: String,
    },
    /// A setting is out of range.
    #[error("balancer setting {setting} = {value}: expected {expected}")]
    Config {
        /// The setting's name.
        setting: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },
}

/// How unevenly the balanced hosts are loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Imbalance {
    /// The score, 0–100 % (see the module docs).
    pub score_pct: f64,
    /// Mean CPU load of the balanced hosts, %.
    pub cpu_mean_pct: f64,
    /// Standard deviation of their CPU load, percentage points.
    pub cpu_stddev_pct: f64,
    /// Mean memory load, %.
    pub memory_mean_pct: f64,
    /// Standard deviation of memory load, percentage points.
    pub memory_stddev_pct: f64,
    /// Balanced hosts (up, not draining, measured).
    pub hosts: usize,
}

/// One round's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancePlan {
    /// The cloud before the plan.
    pub imbalance: Imbalance,
    /// Predicted score after all moves, % (equal to the score when nothing moves).
    pub score_after_pct: f64,
    /// Moves, in the order they were chosen; they involve disjoint hosts and may run together.
    pub moves: Vec<Move>,
    /// Why nothing (more) moved: always at least one.
    pub reasons: Vec<Reason>,
}

/// One migration of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// VM id.
    pub vm_id: String,
    /// VM name.
    pub vm_name: String,
    /// Source host id.
    pub from: String,
    /// Source host name.
    pub from_name: String,
    /// Target host id.
    pub to: String,
    /// Target host name.
    pub to_name: String,
    /// Why, in words: `h1 CPU 92 % vs cloud mean 35 %: move web-3 (0.9 cores, 2 GiB) to h3 (CPU
    /// 10 %); imbalance 61 % → 38 %`.
    pub reason: String,
    /// Cloud score before this move (after the plan's earlier moves), %.
    pub score_before_pct: f64,
    /// Predicted cloud score after it, %.
    pub score_after_pct: f64,
    /// What it costs.
    pub cost: MoveCost,
}

/// The estimated cost of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveCost {
    /// Live (running VM: memory is copied) or cold (stopped: only the definition moves).
    pub live: bool,
    /// Memory given to the VM, MiB.
    pub memory_mib: u64,
    /// Estimated memory to send, MiB: its resident memory (zero pages are not sent), and when
    /// the dirty rate is known, the pages it dirties again while they are copied
    /// (`resident / (1 − dirty_rate / link)`).
    pub copy_mib: u64,
    /// The dirty rate used, MiB/s.
    pub dirty_rate_mib_s: Option<f64>,
    /// Estimated duration of the memory copy at `link_mib_s`, seconds; `None` when it would
    /// not converge without throttling the guest (dirty rate ≥ link).
    pub seconds: Option<f64>,
    /// The target already caches the VM's image (else it fetches it first).
    pub image_cached: bool,
}

/// Stable codes of [`Reason`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReasonCode {
    /// Fewer than two balanced hosts.
    TooFewHosts,
    /// Hosts left out: no measurement yet.
    Unmeasured,
    /// The imbalance is at or below the threshold.
    BelowThreshold,
    /// Above the threshold, but not yet for `hold_rounds` rounds.
    Holding,
    /// The plan's moves bring the imbalance to or below the threshold.
    ReachedThreshold,
    /// `max_moves` reached.
    RoundCap,
    /// No allowed move improves by the margin.
    NoMoveByMargin,
    /// No VM can move anywhere.
    NoMove,
    /// A good move's VM is in cooldown.
    Cooldown,
    /// A good move's VM is opted out.
    OptOut,
    /// A good move's VM cannot move now.
    CannotMove,
    /// A good move's VM dirties memory faster than the link carries it.
    WouldNotConverge,
    /// A good move involves a host already in this round's plan.
    HostInPlan,
    /// A good move's target has no room under the overcommit ratios.
    Capacity,
    /// A good move's target holds a VM of the same anti-affinity group.
    AntiAffinity,
    /// A good move would load its target above the ceiling.
    TargetCeiling,
    /// VMs not considered (summary).
    Excluded,
}

/// Why nothing (more) moved, for `balance status` and `balance plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Stable code.
    pub code: ReasonCode,
    /// The sentence shown to users.
    pub message: String,
}

/// A drain's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainPlan {
    /// The host being emptied.
    pub host_id: String,
    /// Its name.
    pub host_name: String,
    /// A target for every VM that can move, largest first (the order they were placed in).
    pub moves: Vec<DrainMove>,
    /// VMs that cannot move, with why.
    pub stuck: Vec<DrainStuck>,
}

/// Where one VM of a drained host goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainMove {
    /// VM id.
    pub vm_id: String,
    /// VM name.
    pub vm_name: String,
    /// Target host id.
    pub to: String,
    /// Target host name.
    pub to_name: String,
    /// The scheduler's reason for the target.
    pub reason: String,
    /// What it costs.
    pub cost: MoveCost,
}

/// A VM of a drained host that cannot move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainStuck {
    /// VM id.
    pub vm_id: String,
    /// VM name.
    pub vm_name: String,
    /// Why, e.g. `no host can take it (4 vCPU, 16 GiB): h2: memory: …`.
    pub reason: String,
}

/// The score of the hosts as they are.
pub fn imbalance(hosts: &[HostLoad], config: &BalanceConfig) -> Imbalance {
    let cfg = config.sane();
    let m = Model::new(hosts, &[], &Constraints::default(), &cfg, 0);
    m.imbalance()
}

/// One round of the balancer: the plan, and the state to store for the next round.
///
/// Preconditions: `vms` lists every VM placed in the cloud (opted out, unable to move or
/// stopped ones too: they take room and count for anti-affinity); `now_s` is Unix seconds on the
/// clock `last_moved_at` uses. The returned state is for the round that is acted on; a dry run
/// discards it (or calls [`preview`]).
pub fn balance_round(
    hosts: &[HostLoad],
    vms: &[VmLoad],
    constraints: &Constraints,
    config: &BalanceConfig,
    state: BalanceState,
    now_s: u64,
) -> (BalancePlan, BalanceState) {
    run(hosts, vms, constraints, config, Some(state), now_s)
}

/// What the balancer would move now if the imbalance had been held long enough: every rule but
/// the hold. For `tuchka balance plan`.
pub fn preview(
    hosts: &[HostLoad],
    vms: &[VmLoad],
    constraints: &Constraints,
    config: &BalanceConfig,
    now_s: u64,
) -> BalancePlan {
    run(hosts, vms, constraints, config, None, now_s).0
}

/// Choose a target for every VM on `host_id`, to empty it, through the scheduler itself
/// ([`placement::place_group`], policy spread: most free memory first, fewest VMs of the group,
/// image cached), so a drain keeps exactly the rules of `group create`: up, not draining,
/// vCPU/memory/disk under the overcommit ratios, anti-affinity. VMs are placed largest first
/// (memory, then vCPUs), each on the capacities the previous ones left. Opted-out VMs move too;
/// VMs that cannot move now are listed in `stuck` (retry later). How many migrations run at
/// once per host is the caller's concern.
pub fn plan_drain(
    host_id: &str,
    hosts: &[HostCapacity],
    vms: &[VmLoad],
    constraints: &Constraints,
    config: &BalanceConfig,
) -> Result<DrainPlan, BalanceError> {
    let cfg = config.sane();
    let src = hosts
        .iter()
        .find(|h| h.id == host_id)
        .ok_or_else(|| BalanceError::UnknownHost {
            host: host_id.to_string(),
        })?;
    let mut caps: Vec<HostCapacity> = hosts.iter().filter(|h| h.id != host_id).cloned().collect();
    caps.sort_by(|a, b| a.id.cmp(&b.id));
    let mut existing: BTreeMap<&str, BTreeMap<String, u32>> = BTreeMap::new();
    for v in vms.iter().filter(|v| v.host_id != host_id) {
        *existing
            .entry(v.group.as_str())
            .or_default()
            .entry(v.host_id.clone())
            .or_default() += 1;
    }
    let mut on: Vec<&VmLoad> = vms.iter().filter(|v| v.host_id == host_id).collect();
    on.sort_by(|a, b| {
        b.memory_mib
            .cmp(&a.memory_mib)
            .then(b.vcpus.cmp(&a.vcpus))
            .then(a.id.cmp(&b.id))
    });
    let mut plan = DrainPlan {
        host_id: src.id.clone(),
        host_name: src.name.clone(),
        moves: Vec::new(),
        stuck: Vec::new(),
    };
    for v in on {
        if let Some(why) = &v.cannot_move {
            plan.stuck.push(DrainStuck {
                vm_id: v.id.clone(),
                vm_name: v.name.clone(),
                reason: format!("cannot move now: {why}"),
            });
            continue;
        }
        let req = GroupRequest {
            group: v.group.clone(),
            count: 1,
            cpus: v.vcpus,
            memory_mib: v.memory_mib,
            disk_mib: v.disk_mib,
            image_sha256: v.image_sha256.clone(),
            image_mib: 0,
            volume_mib: 0,
            anti_affinity: constraints.anti_affinity.contains(&v.group),
            existing: existing.get(v.group.as_str()).cloned().unwrap_or_default(),
            policy: PlacementPolicy::Spread,
        };
        let size = format!("{} vCPU, {}", v.vcpus, mib(v.memory_mib));
        if caps.is_empty() {
            plan.stuck.push(DrainStuck {
                vm_id: v.id.clone(),
                vm_name: v.name.clone(),
                reason: format!("no host can take it ({size}): there is no other host"),
            });
            continue;
        }
        match placement::place_group(&caps, &req, &constraints.ratios) {
            Ok(p) => {
                let Some(to) = p.into_iter().next() else {
                    continue;
                };
                let Some(h) = caps.iter_mut().find(|h| h.id == to.host_id) else {
                    continue;
                };
                h.cpus_used = h.cpus_used.saturating_add(v.vcpus);
                h.memory_used_mib = h.memory_used_mib.saturating_add(v.memory_mib);
                h.disk_provisioned_mib = h.disk_provisioned_mib.saturating_add(v.disk_mib);
                *existing
                    .entry(v.group.as_str())
                    .or_default()
                    .entry(h.id.clone())
                    .or_default() += 1;
                plan.moves.push(DrainMove {
                    vm_id: v.id.clone(),
                    vm_name: v.name.clone(),
                    to: h.id.clone(),
                    to_name: h.name.clone(),
                    reason: to.reason,
                    cost: cost(v, h.cached_images.contains(&v.image_sha256), cfg.link_mib_s),
                });
            }
            Err(e) => plan.stuck.push(DrainStuck {
                vm_id: v.id.clone(),
                vm_name: v.name.clone(),
                reason: format!("no host can take it ({size}): {}", e.detail),
            }),
        }
    }
    Ok(plan)
}

fn run(
    hosts: &[HostLoad],
    vms: &[VmLoad],
    constraints: &Constraints,
    config: &BalanceConfig,
    state: Option<BalanceState>,
    now_s: u64,
) -> (BalancePlan, BalanceState) {
    let cfg = config.sane();
    let mut m = Model::new(hosts, vms, constraints, &cfg, now_s);
    let imb = m.imbalance();
    let score0 = imb.score_pct;
    let mut reasons = Vec::new();
    if !m.unmeasured.is_empty() {
        let n = m.unmeasured.len();
        reasons.push(Reason {
            code: ReasonCode::Unmeasured,
            message: format!(
                "{} left out of balancing: no CPU measurement yet (an agent needs two samples)",
                listing(&m.unmeasured, 5, if n == 1 { "host" } else { "hosts" }),
            ),
        });
    }
    let plan = |reasons: Vec<Reason>, moves: Vec<Move>, after: f64| BalancePlan {
        imbalance: imb.clone(),
        score_after_pct: after,
        moves,
        reasons,
    };
    let held = state.map(|s| s.rounds_above);
    if m.targets.len() < 2 {
        reasons.push(Reason {
            code: ReasonCode::TooFewHosts,
            message: format!(
                "{} up, not draining and measured: nothing to balance",
                match m.targets.len() {
                    0 => "no host is".to_string(),
                    _ => "only 1 host is".to_string(),
                }
            ),
        });
        return (plan(reasons, vec![], score0), BalanceState::default());
    }
    if score0 <= cfg.threshold_pct {
        let (s, t) = distinct(score0, cfg.threshold_pct);
        reasons.push(Reason {
            code: ReasonCode::BelowThreshold,
            message: format!("imbalance {s} is not above the threshold {t}: nothing to do"),
        });
        return (plan(reasons, vec![], score0), BalanceState::default());
    }
    let rounds = held.map(|r| r.saturating_add(1));
    if let Some(r) = rounds {
        if r < cfg.hold_rounds {
            let left = cfg.hold_rounds - r;
            let (s, t) = distinct(score0, cfg.threshold_pct);
            reasons.push(Reason {
                code: ReasonCode::Holding,
                message: format!(
                    "imbalance {s} has been above the threshold {t} for {r} of {} rounds: waiting {left} more round{} before moving anything",
                    cfg.hold_rounds,
                    if left == 1 { "" } else { "s" },
                ),
            });
            return (
                plan(reasons, vec![], score0),
                BalanceState { rounds_above: r },
            );
        }
    }
    let mut moves = Vec::new();
    let mut cur = m.wvar();
    loop {
        if moves.len() >= cfg.max_moves as usize {
            reasons.push(Reason {
                code: ReasonCode::RoundCap,
                message: format!(
                    "stopped at {} move{}, the most in one round; the imbalance will still be {}, so the balancer continues after the hold",
                    cfg.max_moves,
                    if cfg.max_moves == 1 { "" } else { "s" },
                    spct(score(cur)),
                ),
            });
            break;
        }
        let Some(pick) = m.choose(&m.best_moves(cur), cur) else {
            m.explain(&m.survey(cur), cur, moves.len(), &mut reasons);
            break;
        };
        let mv = m.apply(pick, cur);
        cur = m.wvar();
        moves.push(mv);
        if score(cur) <= cfg.threshold_pct {
            let (s, t) = distinct(score(cur), cfg.threshold_pct);
            reasons.push(Reason {
                code: ReasonCode::ReachedThreshold,
                message: format!(
                    "stopped after {} move{}: the imbalance will be {s}, not above the threshold {t}",
                    moves.len(),
                    if moves.len() == 1 { "" } else { "s" },
                ),
            });
            break;
        }
    }
    let next = match rounds {
        Some(_) if !moves.is_empty() => BalanceState::default(),
        Some(r) => BalanceState { rounds_above: r },
        None => BalanceState::default(),
    };
    (plan(reasons, moves, score(cur)), next)
}

/// The score, %, of a weighted variance.
fn score(wvar: f64) -> f64 {
    100.0 * wvar.max(0.0).sqrt() / NORM
}

/// The weighted variance whose score is `pct`.
fn wvar_of(pct: f64) -> f64 {
    (pct / 100.0 * NORM).powi(2)
}

#[derive(Clone, Copy)]
struct Weights {
    c: f64,
    m: f64,
    sum: f64,
}

/// Why a candidate move is not allowed. VM-level kinds first, then target-level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    OptOut,
    CannotMove,
    Cooldown,
    WouldNotConverge,
    HostInPlan,
    Capacity,
    AntiAffinity,
    Ceiling,
}

const KINDS: usize = 8;

impl Kind {
    fn code(self) -> ReasonCode {
        match self {
            Kind::OptOut => ReasonCode::OptOut,
            Kind::CannotMove => ReasonCode::CannotMove,
            Kind::Cooldown => ReasonCode::Cooldown,
            Kind::WouldNotConverge => ReasonCode::WouldNotConverge,
            Kind::HostInPlan => ReasonCode::HostInPlan,
            Kind::Capacity => ReasonCode::Capacity,
            Kind::AntiAffinity => ReasonCode::AntiAffinity,
            Kind::Ceiling => ReasonCode::TargetCeiling,
        }
    }
}

/// Why an allowed move does not qualify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    PairBalanced,
    BelowMargin,
    NoGain,
}

struct HostM<'a> {
    cap: &'a HostCapacity,
    balanced: bool,
    c: f64,
    m: f64,
    inv_cpus: f64,
    inv_mem: f64,
    cpu_used: u64,
    cpu_cap: u64,
    mem_used: u64,
    mem_cap: u64,
    disk_used: u64,
    disk_cap: u64,
    in_plan: bool,
}

impl HostM<'_> {
    /// Room for `v` under the overcommit ratios: the arithmetic of
    /// [`placement::refuse_reason`].
    fn fits(&self, v: &VmLoad) -> bool {
        u64::from(v.vcpus) <= self.cpu_cap.saturating_sub(self.cpu_used)
            && v.memory_mib <= self.mem_cap.saturating_sub(self.mem_used)
            && v.disk_mib <= self.disk_cap.saturating_sub(self.disk_used)
    }
}

struct VmM<'a> {
    v: &'a VmLoad,
    host: usize,
    aa: Option<usize>,
    cores: f64,
    resident: f64,
    copy_mib: u64,
    block: Option<Kind>,
}

#[derive(Debug, Clone, Copy)]
struct Cand {
    wvar: f64,
    pair: f64,
    pair_after: f64,
    vm: usize,
    to: usize,
}

struct Step {
    /// The best qualifying allowed target of each VM that has one.
    qualifying: Vec<Cand>,
    /// The allowed move that would leave the lowest score, though it does not qualify.
    best_failing: Option<(Cand, Fail)>,
    /// Per kind, the qualifying move blocked by it that would leave the lowest score.
    blocked: [Option<Cand>; KINDS],
}

/// Constants of one step's evaluations (weights normalised to sum 1).
struct Consts {
    inv_n: f64,
    wc: f64,
    wm: f64,
    mu_c: f64,
    mu_m: f64,
    /// The threshold as a weighted variance.
    thr2: f64,
    /// `(1 − margin)²`: the most of its pair variance a move may leave.
    keep: f64,
}

/// A balanced host as a target, laid out for the inner loop.
struct Tgt {
    i: usize,
    c: f64,
    m: f64,
    inv_c: f64,
    inv_m: f64,
    dev2: f64,
    in_plan: bool,
}

/// A VM as a move's candidate: the cloud's sums with the VM taken off its host.
struct Src {
    a: usize,
    cores: f64,
    resident: f64,
    sc: f64,
    qc: f64,
    sm: f64,
    qm: f64,
    dev_a: f64,
    dev_a2: f64,
}

/// The least loads and the extreme capacities over a step's targets.
struct Extremes {
    c: f64,
    m: f64,
    inv_c_min: f64,
    inv_c_max: f64,
    inv_m_min: f64,
    inv_m_max: f64,
}

impl Extremes {
    fn of(tg: &[Tgt]) -> Extremes {
        let mut e = Extremes {
            c: f64::INFINITY,
            m: f64::INFINITY,
            inv_c_min: f64::INFINITY,
            inv_c_max: 0.0,
            inv_m_min: f64::INFINITY,
            inv_m_max: 0.0,
        };
        for t in tg {
            e.c = e.c.min(t.c);
            e.m = e.m.min(t.m);
            e.inv_c_min = e.inv_c_min.min(t.inv_c);
            e.inv_c_max = e.inv_c_max.max(t.inv_c);
            e.inv_m_min = e.inv_m_min.min(t.inv_m);
            e.inv_m_max = e.inv_m_max.max(t.inv_m);
        }
        if tg.is_empty() {
            e = Extremes {
                c: 0.0,
                m: 0.0,
                inv_c_min: 0.0,
                inv_c_max: 0.0,
                inv_m_min: 0.0,
                inv_m_max: 0.0,
            };
        }
        e
    }
}

impl Consts {
    /// A lower bound of [`Consts::wvar_at`] over every target: Σx² grows by at least
    /// `d_min·(2·x_min + d_min)` and (Σx)² by at most `(Σx + d_max)²`, per resource.
    fn wvar_floor(&self, s: &Src, e: &Extremes) -> f64 {
        let (dc_lo, dc_hi) = (s.cores * e.inv_c_min, s.cores * e.inv_c_max);
        let (dm_lo, dm_hi) = (s.resident * e.inv_m_min, s.resident * e.inv_m_max);
        let vc = (s.qc + dc_lo * (2.0 * e.c + dc_lo)) * self.inv_n
            - ((s.sc + dc_hi) * self.inv_n).powi(2);
        let vm = (s.qm + dm_lo * (2.0 * e.m + dm_lo)) * self.inv_n
            - ((s.sm + dm_hi) * self.inv_n).powi(2);
        self.wc * vc + self.wm * vm
    }

    /// A host's deviation from the cloud's means (weighted variance units).
    #[inline]
    fn dev2(&self, c: f64, m: f64) -> f64 {
        self.wc * (c - self.mu_c).powi(2) + self.wm * (m - self.mu_m).powi(2)
    }

    /// The cloud's weighted variance after moving `s` to `t`, and `t`'s loads then.
    #[inline]
    fn wvar_at(&self, s: &Src, t: &Tgt) -> (f64, f64, f64) {
        let dc = s.cores * t.inv_c;
        let dm = s.resident * t.inv_m;
        let (cb, mb) = (t.c + dc, t.m + dm);
        let sc = s.sc + dc;
        let qc = s.qc + dc * (2.0 * t.c + dc);
        let sm = s.sm + dm;
        let qm = s.qm + dm * (2.0 * t.m + dm);
        let vc = qc * self.inv_n - (sc * self.inv_n).powi(2);
        let vm = qm * self.inv_n - (sm * self.inv_n).powi(2);
        (self.wc * vc + self.wm * vm, cb, mb)
    }

    /// The pair imbalance of the source and `t` before and after the move (weighted variance
    /// units).
    #[inline]
    fn pair_at(&self, s: &Src, t: &Tgt, cb: f64, mb: f64) -> (f64, f64) {
        (
            (s.dev_a + t.dev2) / 2.0,
            (s.dev_a2 + self.dev2(cb, mb)) / 2.0,
        )
    }

    /// Why a move does not qualify (rules 3 and "the cloud's score goes down"), or None.
    #[inline]
    fn fails(&self, cur: f64, wv: f64, pair: f64, pair_after: f64) -> Option<Fail> {
        if pair <= self.thr2 {
            Some(Fail::PairBalanced)
        } else if pair_after > pair * self.keep {
            Some(Fail::BelowMargin)
        } else if wv >= cur {
            Some(Fail::NoGain)
        } else {
            None
        }
    }
}

struct Model<'a> {
    hosts: Vec<HostM<'a>>,
    vms: Vec<VmM<'a>>,
    targets: Vec<usize>,
    unmeasured: Vec<&'a str>,
    w: Weights,
    cfg: BalanceConfig,
    ratios: Ratios,
    now_s: u64,
    aa_names: Vec<&'a str>,
    aa_count: HashMap<(usize, usize), u32>,
    aa_bits: Vec<u64>,
    words: usize,
    n: f64,
    sc: f64,
    qc: f64,
    sm: f64,
    qm: f64,
}

fn cost(v: &VmLoad, image_cached: bool, link: f64) -> MoveCost {
    let resident = if v.running {
        v.memory_in_use_mib.unwrap_or(v.memory_mib)
    } else {
        0
    };
    let dirty = v.dirty_rate_mib_s.filter(|d| d.is_finite() && *d >= 0.0);
    let (copy, seconds) = match dirty {
        Some(d) if v.running && d >= link => (resident as f64, None),
        Some(d) if v.running => {
            let copy = resident as f64 / (1.0 - d / link);
            (copy, Some(copy / link))
        }
        _ => (resident as f64, Some(resident as f64 / link)),
    };
    MoveCost {
        live: v.running,
        memory_mib: v.memory_mib,
        copy_mib: copy.ceil() as u64,
        dirty_rate_mib_s: if v.running { dirty } else { None },
        seconds,
        image_cached,
    }
}

impl<'a> Model<'a> {
    fn new(
        hosts: &'a [HostLoad],
        vms: &'a [VmLoad],
        constraints: &Constraints,
        cfg: &BalanceConfig,
        now_s: u64,
    ) -> Model<'a> {
        let r = constraints.ratios;
        let mut sorted: Vec<&HostLoad> = hosts.iter().collect();
        sorted.sort_by(|a, b| a.capacity.id.cmp(&b.capacity.id));
        let mut unmeasured = Vec::new();
        let hs: Vec<HostM> = sorted
            .iter()
            .map(|h| {
                let cap = &h.capacity;
                let usable = cap.up && !cap.draining;
                let cpu = h.cpu_usage.filter(|u| u.is_finite());
                let measured = cpu.is_some() && cap.cpus > 0 && cap.memory_mib > 0;
                if usable && !measured {
                    unmeasured.push(cap.name.as_str());
                }
                HostM {
                    cap,
                    balanced: usable && measured,
                    c: cpu.unwrap_or(0.0).clamp(0.0, 1.0),
                    m: if cap.memory_mib > 0 {
                        (h.memory_in_use_mib as f64 / cap.memory_mib as f64).clamp(0.0, 1.0)
                    } else {
                        0.0
                    },
                    inv_cpus: if cap.cpus > 0 {
                        1.0 / f64::from(cap.cpus)
                    } else {
                        0.0
                    },
                    inv_mem: if cap.memory_mib > 0 {
                        1.0 / cap.memory_mib as f64
                    } else {
                        0.0
                    },
                    cpu_used: u64::from(cap.cpus_used),
                    cpu_cap: (f64::from(cap.cpus) * r.cpu).floor() as u64,
                    mem_used: cap.memory_used_mib,
                    mem_cap: (cap.memory_mib.saturating_sub(r.memory_reserved_mib) as f64
                        * r.memory) as u64,
                    disk_used: cap.disk_provisioned_mib,
                    disk_cap: (cap.disk_mib as f64 * r.disk) as u64,
                    in_plan: false,
                }
            })
            .collect();
        let index: HashMap<&str, usize> = hs
            .iter()
            .enumerate()
            .map(|(i, h)| (h.cap.id.as_str(), i))
            .collect();
        let targets: Vec<usize> = (0..hs.len()).filter(|&i| hs[i].balanced).collect();
        let words = hs.len().div_ceil(64);
        let mut aa_index: HashMap<&str, usize> = HashMap::new();
        let mut aa_names = Vec::new();
        let mut sorted_vms: Vec<&VmLoad> = vms.iter().collect();
        sorted_vms.sort_by(|a, b| a.id.cmp(&b.id));
        let mut ms = Vec::with_capacity(sorted_vms.len());
        let mut aa_count: HashMap<(usize, usize), u32> = HashMap::new();
        for v in sorted_vms {
            let Some(&host) = index.get(v.host_id.as_str()) else {
                continue;
            };
            let aa = if constraints.anti_affinity.contains(&v.group) {
                let next = aa_names.len();
                let g = *aa_index.entry(v.group.as_str()).or_insert(next);
                if g == next {
                    aa_names.push(v.group.as_str());
                }
                *aa_count.entry((g, host)).or_default() += 1;
                Some(g)
            } else {
                None
            };
            let mc = cost(v, false, cfg.link_mib_s);
            let block = if v.opt_out {
                Some(Kind::OptOut)
            } else if v.cannot_move.is_some() {
                Some(Kind::CannotMove)
            } else if v
                .last_moved_at
                .is_some_and(|t| now_s < t.saturating_add(cfg.cooldown_s))
            {
                Some(Kind::Cooldown)
            } else if v.running && mc.seconds.is_none() {
                Some(Kind::WouldNotConverge)
            } else {
                None
            };
            let cores = if v.cpu_cores.is_finite() {
                v.cpu_cores.max(0.0)
            } else {
                0.0
            };
            ms.push(VmM {
                v,
                host,
                aa,
                cores: if v.running { cores } else { 0.0 },
                resident: if v.running {
                    v.memory_in_use_mib.unwrap_or(v.memory_mib) as f64
                } else {
                    0.0
                },
                copy_mib: mc.copy_mib,
                block,
            });
        }
        let mut aa_bits = vec![0u64; aa_names.len() * words];
        for (&(g, h), &n) in &aa_count {
            if n > 0 {
                aa_bits[g * words + h / 64] |= 1 << (h % 64);
            }
        }
        let wsum = cfg.cpu_weight + cfg.memory_weight;
        let mut m = Model {
            hosts: hs,
            vms: ms,
            targets,
            unmeasured,
            w: Weights {
                c: cfg.cpu_weight,
                m: cfg.memory_weight,
                sum: wsum,
            },
            cfg: *cfg,
            ratios: r,
            now_s,
            aa_names,
            aa_count,
            aa_bits,
            words,
            n: 0.0,
            sc: 0.0,
            qc: 0.0,
            sm: 0.0,
            qm: 0.0,
        };
        m.resum();
        m
    }

    /// Recompute Σx and Σx² over the balanced hosts.
    fn resum(&mut self) {
        let (mut sc, mut qc, mut sm, mut qm) = (0.0, 0.0, 0.0, 0.0);
        for &i in &self.targets {
            let h = &self.hosts[i];
            sc += h.c;
            qc += h.c * h.c;
            sm += h.m;
            qm += h.m * h.m;
        }
        self.n = self.targets.len() as f64;
        (self.sc, self.qc, self.sm, self.qm) = (sc, qc, sm, qm);
    }

    /// Weighted variance for the given sums.
    fn wvar_of(&self, sc: f64, qc: f64, sm: f64, qm: f64) -> f64 {
        if self.n < 1.0 {
            return 0.0;
        }
        let vc = (qc / self.n - (sc / self.n).powi(2)).max(0.0);
        let vm = (qm / self.n - (sm / self.n).powi(2)).max(0.0);
        (self.w.c * vc + self.w.m * vm) / self.w.sum
    }

    fn wvar(&self) -> f64 {
        self.wvar_of(self.sc, self.qc, self.sm, self.qm)
    }

    fn means(&self) -> (f64, f64) {
        if self.n < 1.0 {
            (0.0, 0.0)
        } else {
            (self.sc / self.n, self.sm / self.n)
        }
    }

    fn imbalance(&self) -> Imbalance {
        let (mc, mm) = self.means();
        let sd = |s: f64, q: f64| {
            if self.n < 1.0 {
                0.0
            } else {
                (q / self.n - (s / self.n).powi(2)).max(0.0).sqrt()
            }
        };
        Imbalance {
            score_pct: score(self.wvar()),
            cpu_mean_pct: mc * 100.0,
            cpu_stddev_pct: sd(self.sc, self.qc) * 100.0,
            memory_mean_pct: mm * 100.0,
            memory_stddev_pct: sd(self.sm, self.qm) * 100.0,
            hosts: self.targets.len(),
        }
    }

    fn aa_on(&self, g: usize, h: usize) -> bool {
        self.aa_bits[g * self.words + h / 64] & (1 << (h % 64)) != 0
    }

    /// Why target `b` cannot take VM `vm` with predicted loads `cb`, `mb`, or None.
    fn target_block(&self, vm: &VmM, b: usize, cb: f64, mb: f64) -> Option<Kind> {
        let h = &self.hosts[b];
        let ceil = self.cfg.target_ceiling_pct / 100.0;
        if h.in_plan {
            Some(Kind::HostInPlan)
        } else if !h.fits(vm.v) {
            Some(Kind::Capacity)
        } else if vm.aa.is_some_and(|g| self.aa_on(g, b)) {
            Some(Kind::AntiAffinity)
        } else if cb > ceil + 1e-12 || mb > ceil + 1e-12 {
            Some(Kind::Ceiling)
        } else {
            None
        }
    }

    /// What every candidate evaluation of this step shares.
    fn prepare(&self) -> (Consts, Vec<Tgt>) {
        let (mu_c, mu_m) = self.means();
        let k = Consts {
            inv_n: if self.n > 0.0 { 1.0 / self.n } else { 0.0 },
            wc: self.w.c / self.w.sum,
            wm: self.w.m / self.w.sum,
            mu_c,
            mu_m,
            thr2: wvar_of(self.cfg.threshold_pct),
            keep: (1.0 - self.cfg.margin_pct / 100.0).powi(2),
        };
        let tg = self
            .targets
            .iter()
            .map(|&i| {
                let h = &self.hosts[i];
                Tgt {
                    i,
                    c: h.c,
                    m: h.m,
                    inv_c: h.inv_cpus,
                    inv_m: h.inv_mem,
                    dev2: k.dev2(h.c, h.m),
                    in_plan: h.in_plan,
                }
            })
            .collect();
        (k, tg)
    }

    /// A VM as the candidate of a move: None when it cannot be one at all (not on a balanced
    /// host, not running, or moving it changes no load).
    fn src(&self, k: &Consts, vm: &VmM) -> Option<Src> {
        let ha = &self.hosts[vm.host];
        if !ha.balanced || !vm.v.running || (vm.cores == 0.0 && vm.resident == 0.0) {
            return None;
        }
        let ca = (ha.c - vm.cores * ha.inv_cpus).max(0.0);
        let ma = (ha.m - vm.resident * ha.inv_mem).max(0.0);
        Some(Src {
            a: vm.host,
            cores: vm.cores,
            resident: vm.resident,
            sc: self.sc + (ca - ha.c),
            qc: self.qc + (ca * ca - ha.c * ha.c),
            sm: self.sm + (ma - ha.m),
            qm: self.qm + (ma * ma - ha.m * ha.m),
            dev_a: k.dev2(ha.c, ha.m),
            dev_a2: k.dev2(ca, ma),
        })
    }

    /// The best qualifying allowed move of the VMs that can still be chosen: the fast pass,
    /// which keeps nothing for explanations ([`Model::survey`] does).
    ///
    /// VMs are visited by decreasing *bound*: an upper bound on the gain any target could give
    /// (from the least loaded target and the extreme capacities, see [`Consts::wvar_floor`]).
    /// Once a VM's bound is below the similar-gain band of the best gain found so far, no VM
    /// after it can be chosen by [`Model::choose`], and the pass stops: the choice is the same
    /// as over every VM.
    fn best_moves(&self, cur: f64) -> Vec<Cand> {
        let (k, tg) = self.prepare();
        let s0 = score(cur);
        let band = 1.0 - self.cfg.similar_gain_pct / 100.0;
        let ext = Extremes::of(&tg);
        let mut order: Vec<(f64, usize, Src)> = self
            .vms
            .iter()
            .enumerate()
            .filter(|(_, vm)| vm.block.is_none() && !self.hosts[vm.host].in_plan)
            .filter_map(|(vi, vm)| {
                let s = self.src(&k, vm)?;
                Some((s0 - score(k.wvar_floor(&s, &ext)), vi, s))
            })
            .collect();
        order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let mut out = Vec::new();
        let mut best_gain = f64::NEG_INFINITY;
        for (bound, vi, s) in &order {
            if bound < &(best_gain * band - 1e-9) {
                break;
            }
            let vm = &self.vms[*vi];
            let mut best: Option<Cand> = None;
            let mut best_wv = cur;
            for t in &tg {
                if t.i == s.a || t.in_plan {
                    continue;
                }
                let (wv, cb, mb) = k.wvar_at(s, t);
                // Only a lower score can replace the best so far (the first one found must
                // lower the cloud's score at all).
                if wv >= best_wv {
                    continue;
                }
                let (pair, pair_after) = k.pair_at(s, t, cb, mb);
                if k.fails(cur, wv, pair, pair_after).is_some()
                    || self.target_block(vm, t.i, cb, mb).is_some()
                {
                    continue;
                }
                best_wv = wv;
                best = Some(Cand {
                    wvar: wv,
                    pair,
                    pair_after,
                    vm: *vi,
                    to: t.i,
                });
            }
            if let Some(c) = best {
                best_gain = best_gain.max(s0 - score(c.wvar));
                out.push(c);
            }
        }
        out.sort_by_key(|c| c.vm);
        out
    }

    /// Evaluate every (VM, target) move on the current model, keeping for each rule the best
    /// move it blocks and the best allowed move that does not qualify: the explanation of a
    /// step that found nothing.
    fn survey(&self, cur: f64) -> Step {
        let (k, tg) = self.prepare();
        let mut st = Step {
            qualifying: Vec::new(),
            best_failing: None,
            blocked: [None; KINDS],
        };
        for (vi, vm) in self.vms.iter().enumerate() {
            let Some(s) = self.src(&k, vm) else { continue };
            let vm_block = vm
                .block
                .or(self.hosts[vm.host].in_plan.then_some(Kind::HostInPlan));
            let mut best: Option<Cand> = None;
            for t in &tg {
                if t.i == s.a {
                    continue;
                }
                let (wv, cb, mb) = k.wvar_at(&s, t);
                let (pair, pair_after) = k.pair_at(&s, t, cb, mb);
                let cand = Cand {
                    wvar: wv,
                    pair,
                    pair_after,
                    vm: vi,
                    to: t.i,
                };
                match k.fails(cur, wv, pair, pair_after) {
                    None => match vm_block.or_else(|| self.target_block(vm, t.i, cb, mb)) {
                        Some(kind) => {
                            let slot = &mut st.blocked[kind as usize];
                            if slot.is_none_or(|x| wv < x.wvar) {
                                *slot = Some(cand);
                            }
                        }
                        None => {
                            if best.is_none_or(|x| wv < x.wvar) {
                                best = Some(cand);
                            }
                        }
                    },
                    Some(f) => {
                        if vm_block.is_none()
                            && st.best_failing.is_none_or(|(x, _)| wv < x.wvar)
                            && self.target_block(vm, t.i, cb, mb).is_none()
                        {
                            st.best_failing = Some((cand, f));
                        }
                    }
                }
            }
            st.qualifying.extend(best);
        }
        st
    }

    /// The move to make: among qualifying moves whose gain is within `similar_gain_pct` of the
    /// best, the one copying least memory, then the larger gain, then the VM id.
    fn choose(&self, qualifying: &[Cand], cur: f64) -> Option<Cand> {
        if qualifying.is_empty() {
            return None;
        }
        let s0 = score(cur);
        let best_gain = qualifying
            .iter()
            .map(|c| s0 - score(c.wvar))
            .fold(f64::NEG_INFINITY, f64::max);
        let floor = best_gain * (1.0 - self.cfg.similar_gain_pct / 100.0) - 1e-9;
        qualifying
            .iter()
            .filter(|c| s0 - score(c.wvar) >= floor)
            .min_by(|x, y| {
                self.vms[x.vm]
                    .copy_mib
                    .cmp(&self.vms[y.vm].copy_mib)
                    .then(x.wvar.total_cmp(&y.wvar))
                    .then(x.vm.cmp(&y.vm))
            })
            .copied()
    }

    /// Apply `c` to the model; describe it.
    fn apply(&mut self, c: Cand, cur: f64) -> Move {
        let (mu_c, mu_m) = self.means();
        let (a, b) = (self.vms[c.vm].host, c.to);
        let vm = &self.vms[c.vm];
        let v = vm.v;
        let (ha, hb) = (&self.hosts[a], &self.hosts[b]);
        let ca = (ha.c - vm.cores * ha.inv_cpus).max(0.0);
        let ma = (ha.m - vm.resident * ha.inv_mem).max(0.0);
        let cb = hb.c + vm.cores * hb.inv_cpus;
        let mb = hb.m + vm.resident * hb.inv_mem;
        let gain_c = self.w.c
            * ((ha.c - mu_c).powi(2) + (hb.c - mu_c).powi(2)
                - (ca - mu_c).powi(2)
                - (cb - mu_c).powi(2));
        let gain_m = self.w.m
            * ((ha.m - mu_m).powi(2) + (hb.m - mu_m).powi(2)
                - (ma - mu_m).powi(2)
                - (mb - mu_m).powi(2));
        let size = format!(
            "{}, {}",
            cores(vm.cores),
            mib(v.memory_in_use_mib.unwrap_or(v.memory_mib))
        );
        let lead = if gain_c >= gain_m {
            format!(
                "{} CPU {} vs cloud mean {}: move {} ({size}) to {} (CPU {})",
                ha.cap.name,
                fpct(ha.c),
                fpct(mu_c),
                v.name,
                hb.cap.name,
                fpct(hb.c)
            )
        } else {
            format!(
                "{} memory {} vs cloud mean {}: move {} ({size}) to {} (memory {})",
                ha.cap.name,
                fpct(ha.m),
                fpct(mu_m),
                v.name,
                hb.cap.name,
                fpct(hb.m)
            )
        };
        let mv = Move {
            vm_id: v.id.clone(),
            vm_name: v.name.clone(),
            from: ha.cap.id.clone(),
            from_name: ha.cap.name.clone(),
            to: hb.cap.id.clone(),
            to_name: hb.cap.name.clone(),
            reason: format!("{lead}; imbalance {}", change(score(cur), score(c.wvar))),
            score_before_pct: score(cur),
            score_after_pct: score(c.wvar),
            cost: cost(
                v,
                hb.cap.cached_images.contains(&v.image_sha256),
                self.cfg.link_mib_s,
            ),
        };
        let (vcpus, mem, disk, aa) = (u64::from(v.vcpus), v.memory_mib, v.disk_mib, vm.aa);
        {
            let ha = &mut self.hosts[a];
            ha.c = ca;
            ha.m = ma;
            ha.cpu_used = ha.cpu_used.saturating_sub(vcpus);
            ha.mem_used = ha.mem_used.saturating_sub(mem);
            ha.disk_used = ha.disk_used.saturating_sub(disk);
            ha.in_plan = true;
        }
        {
            let hb = &mut self.hosts[b];
            hb.c = cb;
            hb.m = mb;
            hb.cpu_used = hb.cpu_used.saturating_add(vcpus);
            hb.mem_used = hb.mem_used.saturating_add(mem);
            hb.disk_used = hb.disk_used.saturating_add(disk);
            hb.in_plan = true;
        }
        if let Some(g) = aa {
            let left = {
                let n = self.aa_count.entry((g, a)).or_default();
                *n = n.saturating_sub(1);
                *n
            };
            *self.aa_count.entry((g, b)).or_default() += 1;
            if left == 0 {
                self.aa_bits[g * self.words + a / 64] &= !(1 << (a % 64));
            }
            self.aa_bits[g * self.words + b / 64] |= 1 << (b % 64);
        }
        self.vms[c.vm].host = b;
        self.resum();
        mv
    }

    /// Reasons why the step found no move.
    fn explain(&self, st: &Step, cur: f64, done: usize, out: &mut Vec<Reason>) {
        debug_assert!(
            st.qualifying.is_empty(),
            "the fast pass missed a move the survey found"
        );
        let s0 = score(cur);
        let thr = self.cfg.threshold_pct;
        let what = |c: &Cand| {
            let v = self.vms[c.vm].v;
            format!(
                "{} from {} to {}",
                v.name, self.hosts[self.vms[c.vm].host].cap.name, self.hosts[c.to].cap.name
            )
        };
        match st.best_failing {
            Some((c, f)) => {
                let (ha, hb) = (
                    &self.hosts[self.vms[c.vm].host].cap.name,
                    &self.hosts[c.to].cap.name,
                );
                let message = match f {
                    Fail::PairBalanced => format!(
                        "no move qualifies: the best, {}, would bring the imbalance from {} to {}, but {ha} and {hb} are already balanced between them ({}, not above the threshold {})",
                        what(&c),
                        spct(s0),
                        spct(score(c.wvar)),
                        spct(score(c.pair)),
                        spct(thr),
                    ),
                    Fail::BelowMargin => format!(
                        "no move improves by the margin: the best, {}, would cut the imbalance between {ha} and {hb} from {} to {} ({:.0} % better; the margin is {})",
                        what(&c),
                        spct(score(c.pair)),
                        spct(score(c.pair_after)),
                        (1.0 - c.pair_after.sqrt() / c.pair.sqrt()) * 100.0,
                        spct(self.cfg.margin_pct),
                    ),
                    Fail::NoGain => format!(
                        "no move lowers the imbalance: the best, {}, would leave it at {}",
                        what(&c),
                        spct(score(c.wvar)),
                    ),
                };
                out.push(Reason {
                    code: ReasonCode::NoMoveByMargin,
                    message,
                });
            }
            None => out.push(Reason {
                code: ReasonCode::NoMove,
                message: if done == 0 {
                    "no VM can move to another host under the rules below".into()
                } else {
                    "no further VM can move under the rules below".into()
                },
            }),
        }
        let mut blocked: Vec<(Kind, Cand)> = [
            Kind::OptOut,
            Kind::CannotMove,
            Kind::Cooldown,
            Kind::WouldNotConverge,
            Kind::HostInPlan,
            Kind::Capacity,
            Kind::AntiAffinity,
            Kind::Ceiling,
        ]
        .into_iter()
        .filter_map(|k| st.blocked[k as usize].map(|c| (k, c)))
        .collect();
        blocked.sort_by(|x, y| x.1.wvar.total_cmp(&y.1.wvar));
        for (k, c) in blocked {
            let why = self.why(k, &c);
            out.push(Reason {
                code: k.code(),
                message: format!(
                    "{} would bring the imbalance from {} to {}, but {why}",
                    what(&c),
                    spct(s0),
                    spct(score(c.wvar)),
                ),
            });
        }
        if let Some(r) = self.excluded() {
            out.push(r);
        }
    }

    /// The words for a move blocked by `k`.
    fn why(&self, k: Kind, c: &Cand) -> String {
        let vm = &self.vms[c.vm];
        let v = vm.v;
        let (ha, hb) = (&self.hosts[vm.host], &self.hosts[c.to]);
        match k {
            Kind::OptOut => format!("{} is opted out of balancing", v.name),
            Kind::CannotMove => format!(
                "{} cannot move now: {}",
                v.name,
                v.cannot_move.as_deref().unwrap_or("unknown")
            ),
            Kind::Cooldown => {
                let t = v.last_moved_at.unwrap_or(self.now_s);
                let ago = self.now_s.saturating_sub(t);
                let left = t
                    .saturating_add(self.cfg.cooldown_s)
                    .saturating_sub(self.now_s);
                format!(
                    "{} moved {} ago (cooldown {}: {} left)",
                    v.name,
                    dur(ago),
                    dur(self.cfg.cooldown_s),
                    dur(left)
                )
            }
            Kind::WouldNotConverge => format!(
                "{} dirties memory at {:.0} MiB/s, not slower than the link ({:.0} MiB/s): live migration would not converge",
                v.name,
                v.dirty_rate_mib_s.unwrap_or(0.0),
                self.cfg.link_mib_s
            ),
            Kind::HostInPlan => format!(
                "{} already takes part in a move this round (one move per host per round)",
                if ha.in_plan { &ha.cap.name } else { &hb.cap.name }
            ),
            Kind::Capacity => {
                let mut cap = hb.cap.clone();
                cap.up = true;
                cap.draining = false;
                cap.cpus_used = u32::try_from(hb.cpu_used).unwrap_or(u32::MAX);
                cap.memory_used_mib = hb.mem_used;
                cap.disk_provisioned_mib = hb.disk_used;
                let req = GroupRequest {
                    group: v.group.clone(),
                    count: 1,
                    cpus: v.vcpus,
                    memory_mib: v.memory_mib,
                    disk_mib: v.disk_mib,
                    image_sha256: v.image_sha256.clone(),
                    image_mib: 0,
                    volume_mib: 0,
                    anti_affinity: false,
                    existing: BTreeMap::new(),
                    policy: PlacementPolicy::Spread,
                };
                let msg = placement::refuse_reason(&cap, &req, &self.ratios, 0)
                    .unwrap_or_else(|| "no room".into());
                format!("{} has no room for it: {msg}", hb.cap.name)
            }
            Kind::AntiAffinity => format!(
                "{} already holds a VM of anti-affinity group {:?}",
                hb.cap.name,
                vm.aa.map(|g| self.aa_names[g]).unwrap_or(&v.group)
            ),
            Kind::Ceiling => {
                let cb = hb.c + vm.cores * hb.inv_cpus;
                let mb = hb.m + vm.resident * hb.inv_mem;
                let ceil = self.cfg.target_ceiling_pct / 100.0;
                let (what, x) = if cb > ceil + 1e-12 {
                    ("CPU", cb)
                } else {
                    ("memory", mb)
                };
                format!(
                    "{} would reach {what} {} (a target may reach at most {})",
                    hb.cap.name,
                    fpct(x),
                    spct(self.cfg.target_ceiling_pct)
                )
            }
        }
    }

    /// A summary of the VMs on balanced hosts that were not considered.
    fn excluded(&self) -> Option<Reason> {
        let mut by: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
        for vm in &self.vms {
            if !self.hosts[vm.host].balanced || !vm.v.running {
                continue;
            }
            let Some(k) = vm.block else { continue };
            let v = vm.v;
            let item = match k {
                Kind::Cooldown => {
                    let left = v
                        .last_moved_at
                        .unwrap_or(self.now_s)
                        .saturating_add(self.cfg.cooldown_s)
                        .saturating_sub(self.now_s);
                    format!("{} ({} left)", v.name, dur(left))
                }
                Kind::CannotMove => format!(
                    "{} ({})",
                    v.name,
                    v.cannot_move.as_deref().unwrap_or("unknown")
                ),
                _ => v.name.clone(),
            };
            by.entry(k).or_default().push(item);
        }
        if by.is_empty() {
            return None;
        }
        let mut parts = Vec::new();
        for (k, names) in &by {
            let n = names.len();
            let s = if n == 1 { "" } else { "s" };
            let label = match k {
                Kind::OptOut => format!("{n} VM{s} opted out"),
                Kind::CannotMove => format!("{n} VM{s} that cannot move now"),
                Kind::Cooldown => format!("{n} VM{s} in cooldown"),
                _ => format!("{n} VM{s} dirtying memory faster than the link"),
            };
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            parts.push(format!("{label}: {}", listing(&refs, 3, "")));
        }
        Some(Reason {
            code: ReasonCode::Excluded,
            message: format!("not considered: {}", parts.join("; ")),
        })
    }
}

/// `a, b, c and 4 more` (with `noun` before the names when given).
fn listing(names: &[&str], max: usize, noun: &str) -> String {
    let mut s = String::new();
    if !noun.is_empty() {
        s.push_str(noun);
        s.push(' ');
    }
    for (i, n) in names.iter().take(max).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(n);
    }
    if names.len() > max {
        let _ = write!(s, " and {} more", names.len() - max);
    }
    s
}

/// A fraction as `92 %`.
fn fpct(f: f64) -> String {
    // `+ 0.0` turns -0.0 (an empty f64 sum) into 0.0.
    format!("{:.0} %", (f * 100.0).max(0.0) + 0.0)
}

/// A percentage as `25 %`.
fn spct(p: f64) -> String {
    format!("{:.0} %", p.max(0.0) + 0.0)
}

/// `75 % → 49 %`; with as many decimals (up to 2) as it takes to show a change, e.g.
/// `33.9 % → 33.8 %` on a large cloud, where one move changes the score little.
fn change(before: f64, after: f64) -> String {
    let (b, a) = distinct(before, after);
    format!("{b} → {a}")
}

/// Two percentages with as many decimals (up to 2) as it takes to tell them apart:
/// `24.7 %` and `25.0 %`, not `25 %` and `25 %`.
fn distinct(x: f64, y: f64) -> (String, String) {
    let (x, y) = (x.max(0.0) + 0.0, y.max(0.0) + 0.0);
    let mut d = 0;
    while d < 2 && format!("{x:.d$}") == format!("{y:.d$}") {
        d += 1;
    }
    (format!("{x:.d$} %"), format!("{y:.d$} %"))
}

/// MiB as `512 MiB`, `2 GiB`, `1.5 GiB`.
fn mib(v: u64) -> String {
    if v < 1024 {
        return format!("{v} MiB");
    }
    let g = v as f64 / 1024.0;
    if (g - g.round()).abs() < 0.05 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
    }
}

/// Seconds as `45 s`, `4 min`, `2.5 h` (minutes rounded up).
fn dur(s: u64) -> String {
    if s < 120 {
        format!("{s} s")
    } else if s < 2 * 3600 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{:.1} h", s as f64 / 3600.0)
    }
}

/// Cores as `1 core`, `0.9 cores`.
fn cores(c: f64) -> String {
    if (c - 1.0).abs() < 0.05 {
        "1 core".into()
    } else {
        format!("{c:.1} cores")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024;

    fn host(id: &str, cpus: u32, memory_mib: u64) -> HostLoad {
        HostLoad {
            capacity: HostCapacity {
                id: id.into(),
                name: id.into(),
                up: true,
                draining: false,
                cpus,
                cpus_used: 0,
                memory_mib,
                memory_used_mib: 0,
                disk_mib: 1_000_000,
                disk_provisioned_mib: 0,
                disk_free_mib: None,
                disk_reserve_mib: 0,
                cached_images: vec![],
            },
            cpu_usage: Some(0.0),
            memory_in_use_mib: 512,
        }
    }

    fn vm(id: &str, host: &str, cores: f64, memory_mib: u64) -> VmLoad {
        VmLoad {
            id: id.into(),
            name: id.into(),
            group: id.split('-').next().unwrap_or(id).into(),
            host_id: host.into(),
            running: true,
            vcpus: 1,
            memory_mib,
            disk_mib: 1024,
            image_sha256: "img".into(),
            cpu_cores: cores,
            memory_in_use_mib: None,
            dirty_rate_mib_s: None,
            last_moved_at: None,
            opt_out: false,
            cannot_move: None,
        }
    }

    /// Allocation and measured load of every host from the VMs on it (the host itself uses
    /// 512 MiB and no CPU), as an agent would report them.
    fn measure(hosts: &mut [HostLoad], vms: &[VmLoad]) {
        for h in hosts.iter_mut() {
            let on: Vec<&VmLoad> = vms.iter().filter(|v| v.host_id == h.capacity.id).collect();
            h.capacity.cpus_used = on.iter().map(|v| v.vcpus).sum();
            h.capacity.memory_used_mib = on.iter().map(|v| v.memory_mib).sum();
            h.capacity.disk_provisioned_mib = on.iter().map(|v| v.disk_mib).sum();
            let busy: f64 = on.iter().map(|v| v.cpu_cores).sum();
            h.cpu_usage = Some((busy / f64::from(h.capacity.cpus)).min(1.0));
            h.memory_in_use_mib = 512
                + on.iter()
                    .map(|v| v.memory_in_use_mib.unwrap_or(v.memory_mib))
                    .sum::<u64>();
        }
    }

    fn apply(vms: &mut [VmLoad], plan: &BalancePlan, now: u64) {
        for m in &plan.moves {
            let v = vms.iter_mut().find(|v| v.id == m.vm_id).expect("vm");
            assert_eq!(v.host_id, m.from);
            v.host_id = m.to.clone();
            v.last_moved_at = Some(now);
        }
    }

    fn codes(p: &BalancePlan) -> Vec<ReasonCode> {
        p.reasons.iter().map(|r| r.code).collect()
    }

    fn text(p: &BalancePlan) -> String {
        p.reasons
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// 3 hosts of 4 CPUs and 8 GiB; `burners` 1-core VMs of 1 GiB on h1, the others idle.
    fn packed(burners: usize) -> (Vec<HostLoad>, Vec<VmLoad>) {
        let mut hosts = vec![
            host("h1", 4, 8 * GIB),
            host("h2", 4, 8 * GIB),
            host("h3", 4, 8 * GIB),
        ];
        let vms: Vec<VmLoad> = (0..burners)
            .map(|i| vm(&format!("web-{i}"), "h1", 1.0, GIB))
            .collect();
        measure(&mut hosts, &vms);
        (hosts, vms)
    }

    fn cpu_only() -> BalanceConfig {
        BalanceConfig {
            memory_weight: 0.0,
            ..BalanceConfig::default()
        }
    }

    #[test]
    fn score_formula() {
        let cfg = BalanceConfig::default();
        let mut hs = vec![host("a", 4, 8 * GIB), host("b", 4, 8 * GIB)];
        hs[0].cpu_usage = Some(1.0);
        hs[0].memory_in_use_mib = 8 * GIB;
        hs[1].memory_in_use_mib = 0;
        // Both resources at the worst spread: 100 %.
        assert!((imbalance(&hs, &cfg).score_pct - 100.0).abs() < 1e-9);
        // CPU at the worst spread, memory even: sqrt(0.25 / 2) / 0.5 = 70.7 %.
        hs[0].memory_in_use_mib = 0;
        let i = imbalance(&hs, &cfg);
        assert!((i.score_pct - 70.710_678).abs() < 1e-4, "{i:?}");
        assert!((i.cpu_mean_pct - 50.0).abs() < 1e-9 && (i.cpu_stddev_pct - 50.0).abs() < 1e-9);
        // Equal loads: 0 %. An idle cloud with one host at 3 % is not "imbalanced" (CV would
        // say 100 %).
        hs[0].cpu_usage = Some(0.03);
        hs.push(host("c", 4, 8 * GIB));
        hs[1].memory_in_use_mib = 0;
        hs[2].memory_in_use_mib = 0;
        assert!(imbalance(&hs, &cfg).score_pct < 5.0);
    }

    #[test]
    fn predicted_score_matches_a_full_recompute() {
        let (mut hosts, mut vms) = packed(4);
        vms[1].cpu_cores = 0.6;
        vms[2].memory_in_use_mib = Some(300);
        hosts[1].capacity.cpus = 8;
        hosts[2].capacity.memory_mib = 16 * GIB;
        measure(&mut hosts, &vms);
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &Constraints::default(), &cfg, 0);
        assert!(!p.moves.is_empty(), "{p:#?}");
        apply(&mut vms, &p, 0);
        measure(&mut hosts, &vms);
        let after = imbalance(&hosts, &cfg).score_pct;
        assert!(
            (after - p.score_after_pct).abs() < 1e-9,
            "{after} vs {p:#?}"
        );
        assert!(
            (p.moves[0].score_before_pct - p.imbalance.score_pct).abs() < 1e-9
                && p.moves[0].score_after_pct < p.moves[0].score_before_pct
        );
    }

    #[test]
    fn the_reason_of_a_move_reads_well() {
        let (hosts, vms) = packed(4);
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert_eq!(
            p.moves[0].reason,
            "h1 CPU 100 % vs cloud mean 33 %: move web-0 (1 core, 1 GiB) to h2 (CPU 0 %); imbalance 75 % → 49 %"
        );
        assert_eq!(p.moves[0].cost.copy_mib, 1024);
    }

    #[test]
    fn a_balanced_cloud_gives_an_empty_plan_with_its_reason() {
        let mut hosts = vec![host("h1", 4, 8 * GIB), host("h2", 4, 8 * GIB)];
        let vms = vec![
            vm("a-0", "h1", 1.0, GIB),
            vm("b-0", "h2", 0.9, GIB),
            vm("c-0", "h2", 0.2, 512),
        ];
        measure(&mut hosts, &vms);
        let state = BalanceState { rounds_above: 7 };
        let (p, next) = balance_round(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            state,
            0,
        );
        assert!(p.moves.is_empty());
        assert_eq!(codes(&p), [ReasonCode::BelowThreshold]);
        assert!(
            p.reasons[0]
                .message
                .starts_with("imbalance 5 % is not above the threshold 25 %"),
            "{}",
            text(&p)
        );
        assert_eq!(
            next.rounds_above, 0,
            "the hold restarts below the threshold"
        );
        assert_eq!(p.score_after_pct, p.imbalance.score_pct);
    }

    #[test]
    fn threshold_is_configurable() {
        let mut hosts = vec![host("h1", 4, 8 * GIB), host("h2", 4, 8 * GIB)];
        let vms = vec![vm("a-0", "h1", 1.0, GIB), vm("a-1", "h1", 1.0, GIB)];
        measure(&mut hosts, &vms);
        let cons = Constraints::default();
        let s = imbalance(&hosts, &BalanceConfig::default()).score_pct;
        let above = BalanceConfig {
            threshold_pct: s + 1.0,
            ..BalanceConfig::default()
        };
        assert!(preview(&hosts, &vms, &cons, &above, 0).moves.is_empty());
        let below = BalanceConfig {
            threshold_pct: s - 1.0,
            ..BalanceConfig::default()
        };
        assert_eq!(preview(&hosts, &vms, &cons, &below, 0).moves.len(), 1);
    }

    #[test]
    fn holds_for_n_rounds_before_acting_and_restarts_after() {
        let (hosts, vms) = packed(4);
        let cons = Constraints::default();
        let cfg = BalanceConfig::default();
        let (p1, s1) = balance_round(&hosts, &vms, &cons, &cfg, BalanceState::default(), 0);
        assert!(p1.moves.is_empty());
        assert_eq!(codes(&p1), [ReasonCode::Holding]);
        assert_eq!(
            p1.reasons[0].message,
            "imbalance 75 % has been above the threshold 25 % for 1 of 3 rounds: waiting 2 more rounds before moving anything"
        );
        let (p2, s2) = balance_round(&hosts, &vms, &cons, &cfg, s1, 60);
        assert!(p2.moves.is_empty());
        assert!(p2.reasons[0]
            .message
            .contains("for 2 of 3 rounds: waiting 1 more round "));
        let (p3, s3) = balance_round(&hosts, &vms, &cons, &cfg, s2, 120);
        assert_eq!(p3.moves.len(), 1, "{p3:#?}");
        assert_eq!(
            s3.rounds_above, 0,
            "the hold restarts after a round that moved"
        );
        // A round above the threshold that could move nothing keeps the count.
        let mut stuck = vms.clone();
        for v in &mut stuck {
            v.opt_out = true;
        }
        let (p, s) = balance_round(&hosts, &stuck, &cons, &cfg, s2, 120);
        assert!(p.moves.is_empty());
        assert_eq!(s.rounds_above, 3);
        // hold_rounds 0 and 1 both act in the first round above.
        for hold in [0, 1] {
            let cfg = BalanceConfig {
                hold_rounds: hold,
                ..cfg
            };
            let (p, _) = balance_round(&hosts, &vms, &cons, &cfg, BalanceState::default(), 0);
            assert_eq!(p.moves.len(), 1);
        }
    }

    #[test]
    fn every_move_must_improve_by_the_margin() {
        // h1 at 80 % (a 3.1-core VM and a 0.1-core one), h2 at 20 %; CPU only. Moving the big
        // VM overshoots; moving the small one cuts the gap by 8.3 %: less than 10 %.
        let mut hosts = vec![host("h1", 4, 32 * GIB), host("h2", 4, 32 * GIB)];
        let mut vms = vec![
            vm("big-0", "h1", 3.1, GIB),
            vm("small-0", "h1", 0.1, GIB),
            vm("other-0", "h2", 0.8, GIB),
        ];
        vms[0].vcpus = 4;
        measure(&mut hosts, &vms);
        let cons = Constraints::default();
        let p = preview(&hosts, &vms, &cons, &cpu_only(), 0);
        assert!(p.moves.is_empty(), "{p:#?}");
        assert_eq!(codes(&p), [ReasonCode::NoMoveByMargin]);
        assert_eq!(
            p.reasons[0].message,
            "no move improves by the margin: the best, small-0 from h1 to h2, would cut the imbalance between h1 and h2 from 60 % to 55 % (8 % better; the margin is 10 %)"
        );
        let lax = BalanceConfig {
            margin_pct: 5.0,
            ..cpu_only()
        };
        let p = preview(&hosts, &vms, &cons, &lax, 0);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].vm_id, "small-0");
    }

    #[test]
    fn a_vm_in_cooldown_does_not_move_until_it_ends() {
        let (hosts, mut vms) = packed(4);
        for v in &mut vms {
            v.last_moved_at = Some(1_000 - 240);
        }
        let cons = Constraints::default();
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &cons, &cfg, 1_000);
        assert!(p.moves.is_empty());
        assert_eq!(
            codes(&p),
            [
                ReasonCode::NoMove,
                ReasonCode::Cooldown,
                ReasonCode::Excluded
            ]
        );
        assert_eq!(
            p.reasons[1].message,
            "web-0 from h1 to h2 would bring the imbalance from 75 % to 49 %, but web-0 moved 4 min ago (cooldown 10 min: 6 min left)"
        );
        assert_eq!(
            p.reasons[2].message,
            "not considered: 4 VMs in cooldown: web-0 (6 min left), web-1 (6 min left), web-2 (6 min left) and 1 more"
        );
        assert_eq!(preview(&hosts, &vms, &cons, &cfg, 1_360).moves.len(), 1);
        let short = BalanceConfig {
            cooldown_s: 60,
            ..cfg
        };
        assert_eq!(preview(&hosts, &vms, &cons, &short, 1_000).moves.len(), 1);
    }

    #[test]
    fn opted_out_and_busy_vms_stay() {
        let (hosts, mut vms) = packed(2);
        vms[0].opt_out = true;
        vms[1].cannot_move = Some("a migration of it is running".into());
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert!(p.moves.is_empty());
        let t = text(&p);
        assert!(t.contains("but web-0 is opted out of balancing"), "{t}");
        assert!(
            t.contains("but web-1 cannot move now: a migration of it is running"),
            "{t}"
        );
        assert!(
            t.contains("not considered: 1 VM opted out: web-0; 1 VM that cannot move now: web-1 (a migration of it is running)"),
            "{t}"
        );
    }

    #[test]
    fn anti_affinity_is_kept() {
        // h1 runs a-0 and b-0 (2 cores each of 4); h2 is idle but holds a-1 already.
        let mut hosts = vec![host("h1", 4, 8 * GIB), host("h2", 4, 8 * GIB)];
        let mut vms = vec![
            vm("a-0", "h1", 2.0, GIB),
            vm("b-0", "h1", 2.0, GIB),
            vm("a-1", "h2", 0.0, GIB),
        ];
        measure(&mut hosts, &vms);
        let mut cons = Constraints::default();
        cons.anti_affinity.insert("a".into());
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &cons, &cfg, 0);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].vm_id, "b-0", "a-0 must not join a-1: {p:#?}");
        // b has anti-affinity too and h2 holds b-1: nothing can move.
        vms.push(vm("b-1", "h2", 0.0, GIB));
        measure(&mut hosts, &vms);
        cons.anti_affinity.insert("b".into());
        let p = preview(&hosts, &vms, &cons, &cfg, 0);
        assert!(p.moves.is_empty());
        assert!(
            text(&p).contains("but h2 already holds a VM of anti-affinity group \"a\""),
            "{}",
            text(&p)
        );
    }

    #[test]
    fn a_target_needs_room_under_the_overcommit_ratios() {
        let (mut hosts, vms) = packed(4);
        // h2 is idle but its memory is all given away; h3 is a little busier.
        hosts[1].capacity.memory_used_mib = 8 * GIB - 512;
        hosts[2].cpu_usage = Some(0.1);
        let cons = Constraints::default();
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &cons, &cfg, 0);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].to, "h3");
        // Without h3 nothing fits, and the scheduler's own words say why.
        let p = preview(&hosts[..2], &vms, &cons, &cfg, 0);
        assert!(p.moves.is_empty());
        assert!(
            text(&p).contains(
                "but h2 has no room for it: memory: 0 MiB free of 7680 MiB, 1024 MiB needed"
            ),
            "{}",
            text(&p)
        );
        // vCPU overcommit: with a ratio of 1, 4 vCPUs given on 4 CPUs leave none.
        hosts[1].capacity.memory_used_mib = 0;
        hosts[1].capacity.cpus_used = 4;
        let strict = Constraints {
            ratios: Ratios {
                cpu: 1.0,
                ..Ratios::default()
            },
            ..Constraints::default()
        };
        let p = preview(&hosts[..2], &vms, &strict, &cfg, 0);
        assert!(p.moves.is_empty());
        assert!(text(&p).contains("vCPU: 0 free of 4"), "{}", text(&p));
    }

    #[test]
    fn the_capacity_check_is_the_schedulers() {
        let v = vm("a-0", "h1", 1.0, 3000);
        for (cpus_used, mem_used, disk_used, ratios) in [
            (0, 0, 0, Ratios::default()),
            (15, 0, 0, Ratios::default()),
            (16, 0, 0, Ratios::default()),
            (
                3,
                0,
                0,
                Ratios {
                    cpu: 1.0,
                    ..Ratios::default()
                },
            ),
            (0, 4_000, 0, Ratios::default()),
            (0, 4_680, 0, Ratios::default()),
            (0, 4_681, 0, Ratios::default()),
            (
                0,
                9_000,
                0,
                Ratios {
                    memory: 1.5,
                    ..Ratios::default()
                },
            ),
            (0, 0, 1_999_000, Ratios::default()),
            (
                0,
                0,
                2_000_000,
                Ratios {
                    disk: 1.0,
                    ..Ratios::default()
                },
            ),
            (99, 99_999, 9_999_999, Ratios::default()),
        ] {
            let mut h = host("h2", 4, 8 * GIB);
            h.capacity.cpus_used = cpus_used;
            h.capacity.memory_used_mib = mem_used;
            h.capacity.disk_provisioned_mib = disk_used;
            let hosts = [h];
            let cons = Constraints {
                ratios,
                ..Constraints::default()
            };
            let m = Model::new(&hosts, &[], &cons, &BalanceConfig::default(), 0);
            let req = GroupRequest {
                group: "a".into(),
                count: 1,
                cpus: v.vcpus,
                memory_mib: v.memory_mib,
                disk_mib: v.disk_mib,
                image_sha256: String::new(),
                image_mib: 0,
                volume_mib: 0,
                anti_affinity: false,
                existing: BTreeMap::new(),
                policy: PlacementPolicy::Spread,
            };
            let sched = placement::refuse_reason(&hosts[0].capacity, &req, &ratios, 0);
            assert_eq!(
                m.hosts[0].fits(&v),
                sched.is_none(),
                "{cpus_used} {mem_used} {disk_used} {ratios:?}: {sched:?}"
            );
        }
    }

    #[test]
    fn draining_and_down_hosts_are_never_targets() {
        let (mut hosts, vms) = packed(4);
        hosts[1].capacity.draining = true;
        hosts[2].capacity.up = false;
        let cons = Constraints::default();
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &cons, &cfg, 0);
        assert!(p.moves.is_empty());
        assert_eq!(codes(&p), [ReasonCode::TooFewHosts]);
        assert_eq!(
            p.reasons[0].message,
            "only 1 host is up, not draining and measured: nothing to balance"
        );
        // With a fourth, busier host, that one takes the VM, not the idle draining/down ones.
        let mut h4 = host("h4", 4, 8 * GIB);
        h4.cpu_usage = Some(0.3);
        hosts.push(h4);
        let p = preview(&hosts, &vms, &cons, &cfg, 0);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].to, "h4");
        // The draining host's own VMs are left to the drain.
        let mut vms2 = vms.clone();
        for v in &mut vms2 {
            v.host_id = "h2".into();
        }
        let p = preview(&hosts, &vms2, &cons, &cfg, 0);
        assert!(p.moves.iter().all(|m| m.from != "h2"), "{p:#?}");
    }

    #[test]
    fn unmeasured_hosts_are_left_out_and_said_so() {
        let (mut hosts, vms) = packed(4);
        hosts[2].cpu_usage = None;
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert_eq!(p.imbalance.hosts, 2);
        assert!(p.moves.iter().all(|m| m.to != "h3"));
        assert_eq!(p.reasons[0].code, ReasonCode::Unmeasured);
        assert_eq!(
            p.reasons[0].message,
            "host h3 left out of balancing: no CPU measurement yet (an agent needs two samples)"
        );
    }

    #[test]
    fn one_move_per_host_per_round() {
        let (hosts, vms) = packed(4);
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert_eq!(p.moves.len(), 1, "h1 can be the source once: {p:#?}");
        assert!(
            text(&p).contains(
                "but h1 already takes part in a move this round (one move per host per round)"
            ),
            "{}",
            text(&p)
        );
        // Two busy hosts and two idle ones: two moves on disjoint pairs.
        let mut hosts: Vec<HostLoad> = ["h1", "h2", "h3", "h4"]
            .iter()
            .map(|h| host(h, 4, 8 * GIB))
            .collect();
        let mut vms: Vec<VmLoad> = (0..4)
            .map(|i| vm(&format!("a-{i}"), "h1", 1.0, GIB))
            .collect();
        vms.extend((0..4).map(|i| vm(&format!("b-{i}"), "h2", 1.0, GIB)));
        measure(&mut hosts, &vms);
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert_eq!(p.moves.len(), 2);
        let mut seen = BTreeSet::new();
        for m in &p.moves {
            assert!(
                seen.insert(m.from.clone()) && seen.insert(m.to.clone()),
                "{p:#?}"
            );
        }
    }

    #[test]
    fn at_most_max_moves_per_round() {
        let mut hosts: Vec<HostLoad> = (0..20)
            .map(|i| host(&format!("h{i:02}"), 4, 8 * GIB))
            .collect();
        let mut vms = Vec::new();
        for h in 0..10 {
            for i in 0..4 {
                vms.push(vm(&format!("g{h}-{i}"), &format!("h{h:02}"), 1.0, GIB));
            }
        }
        measure(&mut hosts, &vms);
        let cfg = BalanceConfig::default();
        let p = preview(&hosts, &vms, &Constraints::default(), &cfg, 0);
        assert_eq!(p.moves.len(), 4);
        assert_eq!(p.reasons.last().map(|r| r.code), Some(ReasonCode::RoundCap));
        assert!(
            text(&p).starts_with(
                "stopped at 4 moves, the most in one round; the imbalance will still be 66 %"
            ),
            "{}",
            text(&p)
        );
        let one = BalanceConfig {
            max_moves: 1,
            ..cfg
        };
        assert_eq!(
            preview(&hosts, &vms, &Constraints::default(), &one, 0)
                .moves
                .len(),
            1
        );
    }

    #[test]
    fn a_round_stops_once_below_the_threshold() {
        // h1 and h3 at 75 %, h2 and h4 at 25 %: 50 %. After h1 → h2 the score is 35 %; with
        // a threshold of 40 % the round stops there, though h3 → h4 would still qualify.
        let mut hosts: Vec<HostLoad> = ["h1", "h2", "h3", "h4"]
            .iter()
            .map(|h| host(h, 4, 8 * GIB))
            .collect();
        let mut vms = Vec::new();
        for (h, n) in [("h1", 3), ("h2", 1), ("h3", 3), ("h4", 1)] {
            for i in 0..n {
                vms.push(vm(&format!("{h}-{i}"), h, 1.0, 512));
            }
        }
        measure(&mut hosts, &vms);
        let cfg = BalanceConfig {
            threshold_pct: 40.0,
            ..cpu_only()
        };
        let p = preview(&hosts, &vms, &Constraints::default(), &cfg, 0);
        assert_eq!(p.moves.len(), 1, "{p:#?}");
        assert_eq!(
            p.reasons.last().map(|r| r.code),
            Some(ReasonCode::ReachedThreshold)
        );
        assert!(p.score_after_pct <= 40.0);
        let cfg = BalanceConfig {
            threshold_pct: 30.0,
            ..cpu_only()
        };
        assert_eq!(
            preview(&hosts, &vms, &Constraints::default(), &cfg, 0)
                .moves
                .len(),
            2
        );
        assert!(text(&p).starts_with("stopped after 1 move: the imbalance will be"));
    }

    #[test]
    fn prefers_the_smaller_vm_when_gains_are_similar() {
        let mut hosts = vec![host("h1", 4, 64 * GIB), host("h2", 4, 64 * GIB)];
        let mut vms = vec![
            vm("big-0", "h1", 1.0, 16 * GIB),
            vm("small-0", "h1", 0.9, GIB),
            vm("stay-0", "h1", 1.0, GIB),
        ];
        vms[2].opt_out = true;
        measure(&mut hosts, &vms);
        let cons = Constraints::default();
        // Moving big-0 takes the score from 72 % to 22 %, small-0 to 28 %: a gain 10 % smaller,
        // for a sixteenth of the copy.
        let p = preview(&hosts, &vms, &cons, &cpu_only(), 0);
        assert_eq!(p.moves[0].vm_id, "small-0", "{p:#?}");
        // With no tolerance the largest gain wins.
        let strict = BalanceConfig {
            similar_gain_pct: 0.0,
            ..cpu_only()
        };
        let p = preview(&hosts, &vms, &cons, &strict, 0);
        assert_eq!(p.moves[0].vm_id, "big-0", "{p:#?}");
    }

    #[test]
    fn a_target_is_not_loaded_above_the_ceiling() {
        let mut hosts = vec![host("h1", 4, 8 * GIB), host("h2", 4, 8 * GIB)];
        let vms = vec![
            vm("a-0", "h1", 1.0, 512),
            vm("a-1", "h1", 1.0, 512),
            vm("a-2", "h1", 1.0, 512),
            vm("a-3", "h1", 1.0, 512),
            vm("b-0", "h2", 2.8, 512),
        ];
        measure(&mut hosts, &vms);
        let p = preview(&hosts, &vms, &Constraints::default(), &cpu_only(), 0);
        assert!(p.moves.is_empty(), "{p:#?}");
        assert!(
            text(&p).contains("but h2 would reach CPU 95 % (a target may reach at most 90 %)"),
            "{}",
            text(&p)
        );
        let full = BalanceConfig {
            target_ceiling_pct: 100.0,
            ..cpu_only()
        };
        assert_eq!(
            preview(&hosts, &vms, &Constraints::default(), &full, 0)
                .moves
                .len(),
            1
        );
    }

    #[test]
    fn cost_estimates_and_vms_that_would_not_converge() {
        let mut v = vm("db-0", "h1", 1.0, 4 * GIB);
        v.memory_in_use_mib = Some(2 * GIB);
        let c = cost(&v, true, 112.0);
        assert_eq!(
            (c.live, c.memory_mib, c.copy_mib, c.image_cached),
            (true, 4096, 2048, true)
        );
        assert!((c.seconds.expect("converges") - 2048.0 / 112.0).abs() < 1e-9);
        v.dirty_rate_mib_s = Some(56.0);
        let c = cost(&v, false, 112.0);
        assert_eq!(c.copy_mib, 4096, "2048 / (1 - 56/112)");
        assert!((c.seconds.expect("converges") - 4096.0 / 112.0).abs() < 1e-9);
        v.dirty_rate_mib_s = Some(200.0);
        assert_eq!(cost(&v, false, 112.0).seconds, None);
        v.running = false;
        let c = cost(&v, false, 112.0);
        assert_eq!((c.live, c.copy_mib, c.dirty_rate_mib_s), (false, 0, None));

        let (hosts, mut vms) = packed(4);
        for v in &mut vms {
            v.dirty_rate_mib_s = Some(500.0);
        }
        let p = preview(
            &hosts,
            &vms,
            &Constraints::default(),
            &BalanceConfig::default(),
            0,
        );
        assert!(p.moves.is_empty());
        assert!(
            text(&p).contains("but web-0 dirties memory at 500 MiB/s, not slower than the link (112 MiB/s): live migration would not converge"),
            "{}",
            text(&p)
        );
    }

    #[test]
    fn an_unfixable_hot_spot_does_not_churn_the_other_hosts() {
        // h1 is hot with VMs that may not move; h2..h4 are close to one another. The cloud's
        // score stays above the threshold, but moves among h2..h4 are not worth it.
        let mut hosts: Vec<HostLoad> = ["h1", "h2", "h3", "h4"]
            .iter()
            .map(|h| host(h, 4, 8 * GIB))
            .collect();
        let mut vms: Vec<VmLoad> = (0..4)
            .map(|i| {
                let mut v = vm(&format!("pinned-{i}"), "h1", 1.0, 512);
                v.opt_out = true;
                v
            })
            .collect();
        vms.extend([
            vm("a-0", "h2", 1.0, 512),
            vm("a-1", "h2", 1.0, 512),
            vm("a-2", "h2", 0.2, 512),
            vm("b-0", "h3", 1.0, 512),
            vm("b-1", "h3", 1.0, 512),
            vm("c-0", "h4", 1.0, 512),
            vm("c-1", "h4", 1.0, 512),
        ]);
        measure(&mut hosts, &vms);
        let p = preview(&hosts, &vms, &Constraints::default(), &cpu_only(), 0);
        assert!(p.imbalance.score_pct > 25.0);
        assert!(p.moves.is_empty(), "{p:#?}");
        assert_eq!(p.reasons[0].code, ReasonCode::NoMoveByMargin);
        assert!(
            p.reasons[0]
                .message
                .contains("are already balanced between them"),
            "{}",
            text(&p)
        );
        assert!(codes(&p).contains(&ReasonCode::OptOut));
    }

    #[test]
    fn change_shows_enough_decimals() {
        assert_eq!(change(75.2, 49.4), "75 % → 49 %");
        assert_eq!(change(33.94, 33.61), "33.9 % → 33.6 %");
        assert_eq!(change(33.941, 33.939), "33.94 % → 33.94 %");
        assert_eq!(distinct(24.7, 25.0), ("24.7 %".into(), "25.0 %".into()));
    }

    #[test]
    fn the_fast_pass_finds_what_the_full_survey_finds() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut applied = 0;
        for round in 0..20 {
            let mut hosts: Vec<HostLoad> = (0..15)
                .map(|i| host(&format!("h{i:02}"), 4 + 4 * (i % 3), 16 * GIB))
                .collect();
            let mut vms = Vec::new();
            for i in 0..80 {
                let h = (rnd() * rnd() * 15.0) as usize;
                let mut v = vm(
                    &format!("g{}-{i:02}", i % 9),
                    &format!("h{h:02}"),
                    rnd() * 3.0,
                    512 * (1 + (rnd() * 6.0) as u64),
                );
                v.vcpus = 1 + (rnd() * 4.0) as u32;
                v.opt_out = rnd() < 0.05;
                vms.push(v);
            }
            measure(&mut hosts, &vms);
            hosts[round % 15].capacity.memory_used_mib = 16 * GIB;
            let mut cons = Constraints::default();
            cons.anti_affinity.insert("g2".into());
            let cfg = BalanceConfig {
                threshold_pct: 5.0 * (round % 5) as f64,
                ..BalanceConfig::default()
            };
            let mut m = Model::new(&hosts, &vms, &cons, &cfg, 0);
            for _ in 0..3 {
                let cur = m.wvar();
                let (k, tg) = m.prepare();
                let ext = Extremes::of(&tg);
                for vm in &m.vms {
                    let Some(s) = m.src(&k, vm) else { continue };
                    let floor = k.wvar_floor(&s, &ext);
                    for t in tg.iter().filter(|t| t.i != s.a) {
                        assert!(k.wvar_at(&s, t).0 >= floor - 1e-15, "round {round}");
                    }
                }
                let fast = m.best_moves(cur);
                let full = m.survey(cur).qualifying;
                let key = |c: &Cand| (c.vm, c.to, c.wvar.to_bits());
                // The fast pass stops early, but what it finds is what the survey finds, and
                // the choice is the same.
                for c in &fast {
                    assert!(full.iter().any(|f| key(f) == key(c)), "round {round}");
                }
                assert_eq!(
                    m.choose(&fast, cur).as_ref().map(key),
                    m.choose(&full, cur).as_ref().map(key),
                    "round {round}"
                );
                let Some(c) = m.choose(&fast, cur) else { break };
                m.apply(c, cur);
                applied += 1;
            }
        }
        assert!(applied > 10, "the clouds must exercise moves: {applied}");
    }

    #[test]
    fn same_input_same_plan_in_any_order() {
        let mut seed = 42u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut hosts: Vec<HostLoad> = (0..12)
            .map(|i| host(&format!("h{i:02}"), 8, 32 * GIB))
            .collect();
        let mut vms = Vec::new();
        for i in 0..60 {
            let h = (rnd() * rnd() * 12.0) as usize;
            let mut v = vm(
                &format!("g{}-{i:02}", i % 7),
                &format!("h{h:02}"),
                rnd() * 2.0,
                GIB * (1 + (rnd() * 4.0) as u64),
            );
            v.vcpus = 2;
            vms.push(v);
        }
        measure(&mut hosts, &vms);
        let mut cons = Constraints::default();
        cons.anti_affinity.insert("g3".into());
        let cfg = BalanceConfig::default();
        let a = preview(&hosts, &vms, &cons, &cfg, 0);
        assert!(!a.moves.is_empty(), "{a:#?}");
        let b = preview(&hosts, &vms, &cons, &cfg, 0);
        assert_eq!(a, b);
        hosts.reverse();
        vms.reverse();
        let c = preview(&hosts, &vms, &cons, &cfg, 0);
        assert_eq!(a, c);
    }

    #[test]
    fn four_burners_on_one_of_three_hosts_settle_without_ping_pong() {
        let (mut hosts, mut vms) = packed(4);
        let cons = Constraints::default();
        let cfg = BalanceConfig::default();
        let mut state = BalanceState::default();
        let mut moved: BTreeMap<String, u32> = BTreeMap::new();
        let mut rounds_with_moves = Vec::new();
        for round in 0..40u64 {
            let now = 1_000 + round * 60;
            // Measurements wobble by up to ±2 points from round to round.
            measure(&mut hosts, &vms);
            for (i, h) in hosts.iter_mut().enumerate() {
                let wobble = ((round * 7 + i as u64 * 13) % 5) as f64 / 100.0 - 0.02;
                h.cpu_usage = h.cpu_usage.map(|u| (u + wobble).clamp(0.0, 1.0));
            }
            let (plan, next) = balance_round(&hosts, &vms, &cons, &cfg, state, now);
            state = next;
            if !plan.moves.is_empty() {
                rounds_with_moves.push(round);
            }
            for m in &plan.moves {
                *moved.entry(m.vm_id.clone()).or_default() += 1;
            }
            apply(&mut vms, &plan, now);
            if round >= 10 {
                assert!(plan.moves.is_empty(), "round {round}: {plan:#?}");
                assert_eq!(codes(&plan), [ReasonCode::BelowThreshold]);
            }
        }
        // Round 3 (after the hold) moves one off h1; the hold restarts; round 6 another.
        assert_eq!(rounds_with_moves, [2, 5]);
        assert!(moved.values().all(|&n| n == 1), "{moved:?}");
        let on = |h: &str| vms.iter().filter(|v| v.host_id == h).count();
        assert_eq!((on("h1"), on("h2"), on("h3")), (2, 1, 1));
    }

    #[test]
    fn drain_spreads_keeps_anti_affinity_and_says_what_cannot_move() {
        let mut hosts = vec![
            host("h1", 8, 16 * GIB),
            host("h2", 8, 16 * GIB),
            host("h3", 8, 16 * GIB),
        ];
        let mut vms = vec![
            vm("web-0", "h1", 0.5, 2 * GIB),
            vm("web-1", "h2", 0.5, 2 * GIB),
            vm("db-0", "h1", 1.0, 4 * GIB),
            vm("cache-0", "h1", 0.1, GIB),
            vm("huge-0", "h1", 0.1, 20 * GIB),
            vm("busy-0", "h1", 0.1, GIB),
        ];
        vms[5].cannot_move = Some("a migration of it is running".into());
        vms[3].opt_out = true;
        measure(&mut hosts, &vms);
        hosts[2].capacity.cached_images = vec!["img".into()];
        let caps: Vec<HostCapacity> = hosts.iter().map(|h| h.capacity.clone()).collect();
        let mut cons = Constraints::default();
        cons.anti_affinity.insert("web".into());
        let d = plan_drain("h1", &caps, &vms, &cons, &BalanceConfig::default()).expect("h1");
        let to: BTreeMap<&str, &str> = d
            .moves
            .iter()
            .map(|m| (m.vm_name.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(to.get("web-0"), Some(&"h3"), "web-1 is on h2: {d:#?}");
        assert_eq!(
            to.get("db-0"),
            Some(&"h3"),
            "most free memory first: {d:#?}"
        );
        assert_eq!(
            to.get("cache-0"),
            Some(&"h2"),
            "spread, opted out moves too"
        );
        assert_eq!(d.moves[0].vm_name, "db-0", "largest first");
        assert!(d.moves[0]
            .reason
            .starts_with("spread: 2 of 2 hosts passed the filters"));
        assert!(d.moves[0].cost.image_cached);
        let stuck: BTreeMap<&str, &str> = d
            .stuck
            .iter()
            .map(|s| (s.vm_name.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            stuck.get("busy-0"),
            Some(&"cannot move now: a migration of it is running")
        );
        let huge = stuck.get("huge-0").expect("huge-0 is stuck");
        assert!(
            huge.starts_with("no host can take it (1 vCPU, 20 GiB): h2: memory:"),
            "{huge}"
        );
        assert!(!huge.contains("h1"), "{huge}");

        let e = plan_drain("nope", &caps, &vms, &cons, &BalanceConfig::default());
        assert_eq!(
            e.expect_err("unknown").to_string(),
            "host \"nope\" not found (see: tuchka host list)"
        );
        let d = plan_drain("h1", &caps[..1], &vms, &cons, &BalanceConfig::default()).expect("h1");
        assert!(d.moves.is_empty());
        assert!(d
            .stuck
            .iter()
            .any(|s| s.reason.ends_with("there is no other host")));
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(BalanceConfig::default().validate(), Ok(()));
        let bad = BalanceConfig {
            threshold_pct: 120.0,
            ..BalanceConfig::default()
        };
        assert_eq!(
            bad.validate().expect_err("bad").to_string(),
            "balancer setting threshold_pct = 120: expected a percentage from 0 to 100"
        );
        let zero = BalanceConfig {
            cpu_weight: 0.0,
            memory_weight: 0.0,
            ..BalanceConfig::default()
        };
        assert!(zero.validate().is_err());
        assert_eq!(zero.sane().cpu_weight, 1.0);
        let nan = BalanceConfig {
            link_mib_s: f64::NAN,
            ..BalanceConfig::default()
        };
        assert!(nan.validate().is_err());
        assert_eq!(nan.sane().link_mib_s, 112.0);
        let cfg: BalanceConfig =
            serde_json::from_str(r#"{"threshold_pct": 30}"#).expect("partial config");
        assert_eq!(cfg.threshold_pct, 30.0);
        assert_eq!(cfg.hold_rounds, 3);
    }
}
