//! Balancer at scale: one balancing round (the plan for the next round, every rule applied but
//! the hold) for 1,000 simulated hosts and 10,000 VMs with seeded random loads; then the score
//! alone and the drain of the busiest host. Prints the times.
//!
//! The cloud: hosts of 32 or 64 CPUs and 128 or 256 GiB (~1 % down, ~1 % draining); VMs of
//! 1–8 vCPUs and 1–16 GiB in groups of 10 (one group in ten with anti-affinity), placed at
//! random under the default overcommit ratios; each host has a "heat" so that its VMs use
//! between a tenth and all of their vCPUs; resident memory is 30–100 % of the VM's size; 30 %
//! of the VMs have a dirty-rate estimate, 5 % moved recently, 2 % are opted out, 1 % are busy.
//!
//! Run: `cargo bench -p tuchka-core --bench balance`.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tuchka_core::balance::{
    balance_round, imbalance, plan_drain, preview, BalanceConfig, BalanceState, Constraints,
    HostLoad, VmLoad,
};
use tuchka_core::placement::{HostCapacity, Ratios};

const HOSTS: usize = 1000;
const VMS: usize = 10_000;
const NOW: u64 = 1_000_000;

fn cloud(rng: &mut StdRng) -> (Vec<HostLoad>, Vec<VmLoad>, Constraints) {
    let ratios = Ratios::default();
    let mut hosts: Vec<HostLoad> = (0..HOSTS)
        .map(|i| {
            let big = rng.gen_bool(0.5);
            HostLoad {
                capacity: HostCapacity {
                    id: format!("h{i:04}"),
                    name: format!("h{i:04}"),
                    up: i % 97 != 0,
                    draining: i % 101 == 0,
                    cpus: if big { 64 } else { 32 },
                    cpus_used: 0,
                    memory_mib: if big { 256 } else { 128 } * 1024,
                    memory_used_mib: 0,
                    disk_mib: 4_000_000,
                    disk_provisioned_mib: 0,
                    disk_free_mib: None,
                    disk_reserve_mib: 0,
                    cached_images: if i % 3 == 0 {
                        vec!["img".into()]
                    } else {
                        vec![]
                    },
                },
                cpu_usage: None,
                memory_in_use_mib: 0,
            }
        })
        .collect();
    let heat: Vec<f64> = (0..HOSTS).map(|_| rng.gen_range(0.1..1.0)).collect();
    let mut cons = Constraints {
        ratios,
        ..Constraints::default()
    };
    let mut vms = Vec::with_capacity(VMS);
    let mut busy = vec![0.0f64; HOSTS];
    let mut resident = vec![0u64; HOSTS];
    for i in 0..VMS {
        let g = i / 10;
        let group = format!("g{g:04}");
        let aa = g % 10 == 0;
        if aa {
            cons.anti_affinity.insert(group.clone());
        }
        let vcpus = [1u32, 2, 4, 8][rng.gen_range(0..4)];
        let memory_mib = [1u64, 2, 4, 8, 16][rng.gen_range(0..5)] * 1024;
        let disk_mib = 10_240;
        let group_hosts: BTreeSet<&str> = if aa {
            vms.iter()
                .filter(|v: &&VmLoad| v.group == group)
                .map(|v| v.host_id.as_str())
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut tried = HashSet::new();
        let h = loop {
            let h = rng.gen_range(0..HOSTS);
            let c = &hosts[h].capacity;
            let fits = c.up
                && !c.draining
                && u64::from(c.cpus_used + vcpus) <= (f64::from(c.cpus) * ratios.cpu) as u64
                && c.memory_used_mib + memory_mib
                    <= c.memory_mib.saturating_sub(ratios.memory_reserved_mib)
                && !group_hosts.contains(c.id.as_str());
            if fits || tried.len() >= HOSTS {
                break h;
            }
            tried.insert(h);
        };
        let host_id = hosts[h].capacity.id.clone();
        let c = &mut hosts[h].capacity;
        c.cpus_used += vcpus;
        c.memory_used_mib += memory_mib;
        c.disk_provisioned_mib += disk_mib;
        let cores = f64::from(vcpus) * heat[h] * rng.gen_range(0.1..1.0);
        let rss = (memory_mib as f64 * rng.gen_range(0.3..1.0)) as u64;
        busy[h] += cores;
        resident[h] += rss;
        let x: f64 = rng.gen();
        vms.push(VmLoad {
            id: format!("vm{i:05}"),
            name: format!("{group}-{}", i % 10),
            group,
            host_id,
            running: true,
            vcpus,
            memory_mib,
            disk_mib,
            image_sha256: "img".into(),
            cpu_cores: cores,
            memory_in_use_mib: Some(rss),
            dirty_rate_mib_s: rng.gen_bool(0.3).then(|| rng.gen_range(1.0..80.0)),
            last_moved_at: (x < 0.05).then(|| NOW - rng.gen_range(0..600)),
            opt_out: (0.05..0.07).contains(&x),
            cannot_move: (0.07..0.08)
                .contains(&x)
                .then(|| "a migration of it is running".to_string()),
        });
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.cpu_usage =
            Some((busy[i] / f64::from(h.capacity.cpus) + rng.gen_range(0.0..0.03)).min(1.0));
        h.memory_in_use_mib = 2048 + resident[i];
    }
    (hosts, vms, cons)
}

fn timed<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, Vec<Duration>) {
    let mut times = Vec::with_capacity(runs);
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        out = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    (out.expect("at least one run"), times)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let mut rng = StdRng::seed_from_u64(20261201);
    let t = Instant::now();
    let (hosts, vms, cons) = cloud(&mut rng);
    println!(
        "cloud: {HOSTS} hosts, {VMS} VMs, {} anti-affinity groups (built in {})",
        cons.anti_affinity.len(),
        ms(t.elapsed())
    );
    let cfg = BalanceConfig::default();

    let (imb, times) = timed(20, || imbalance(&hosts, &cfg));
    println!(
        "score: {:.1} % (CPU mean {:.0} % ± {:.0}, memory mean {:.0} % ± {:.0}) over {} balanced hosts, in {} (median of 20)",
        imb.score_pct,
        imb.cpu_mean_pct,
        imb.cpu_stddev_pct,
        imb.memory_mean_pct,
        imb.memory_stddev_pct,
        imb.hosts,
        ms(times[times.len() / 2]),
    );

    let (plan, times) = timed(5, || preview(&hosts, &vms, &cons, &cfg, NOW));
    println!(
        "plan (default settings: max {} moves): {} moves, score {:.1} % → {:.1} %; min {} / median {} / max {} over 5 runs",
        cfg.max_moves,
        plan.moves.len(),
        plan.imbalance.score_pct,
        plan.score_after_pct,
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
    );
    for m in &plan.moves {
        println!("  {}  [{} MiB to copy]", m.reason, m.cost.copy_mib);
    }
    for r in &plan.reasons {
        println!("  ({:?}) {}", r.code, r.message);
    }

    let (_, times) = timed(5, || {
        balance_round(
            &hosts,
            &vms,
            &cons,
            &cfg,
            BalanceState { rounds_above: 2 },
            NOW,
        )
    });
    println!(
        "balance_round (hold reached): median {} over 5 runs",
        ms(times[times.len() / 2])
    );

    let many = BalanceConfig {
        max_moves: 50,
        ..cfg
    };
    let (plan, times) = timed(3, || preview(&hosts, &vms, &cons, &many, NOW));
    println!(
        "plan with max_moves = 50: {} moves, score {:.1} % → {:.1} %; median {} over 3 runs",
        plan.moves.len(),
        plan.imbalance.score_pct,
        plan.score_after_pct,
        ms(times[times.len() / 2]),
    );

    // The worst case: nothing qualifies, so the fast pass visits every (VM, target) pair and
    // the explanation survey visits them all again.
    let none = BalanceConfig {
        margin_pct: 99.0,
        ..cfg
    };
    let (plan, times) = timed(3, || preview(&hosts, &vms, &cons, &none, NOW));
    println!(
        "plan where no move qualifies (margin 99 %, worst case): {} moves, {} reasons; median {} over 3 runs",
        plan.moves.len(),
        plan.reasons.len(),
        ms(times[times.len() / 2]),
    );
    for r in &plan.reasons {
        println!("  ({:?}) {}", r.code, r.message);
    }

    let busiest = hosts
        .iter()
        .filter(|h| h.capacity.up && !h.capacity.draining)
        .max_by(|a, b| a.capacity.cpus_used.cmp(&b.capacity.cpus_used))
        .expect("a host");
    let caps: Vec<HostCapacity> = hosts.iter().map(|h| h.capacity.clone()).collect();
    let (drain, times) = timed(5, || {
        plan_drain(&busiest.capacity.id, &caps, &vms, &cons, &cfg).expect("known host")
    });
    println!(
        "drain of {} ({} vCPUs given): {} VMs placed, {} stuck; median {} over 5 runs",
        busiest.capacity.name,
        busiest.capacity.cpus_used,
        drain.moves.len(),
        drain.stuck.len(),
        ms(times[times.len() / 2]),
    );
}
