//! Scheduler at scale: place 10,000 VMs in groups of 10 on 1,000 simulated hosts (spread, then
//! pack, then anti-affinity), each group placed as a whole on the capacities the previous groups
//! left. Prints total time and placements per second.
//!
//! Run: `cargo bench -p tuchka-core --bench scheduler`.

use std::collections::BTreeMap;
use std::time::Instant;

use tuchka_core::placement::{place_group, GroupRequest, HostCapacity, Ratios};

fn hosts(n: usize) -> Vec<HostCapacity> {
    (0..n)
        .map(|i| HostCapacity {
            id: format!("h{i}"),
            name: format!("h{i}"),
            up: i % 97 != 0,
            draining: i % 101 == 0,
            cpus: 32,
            cpus_used: 0,
            memory_mib: 128 * 1024,
            memory_used_mib: 0,
            disk_mib: 2_000_000,
            disk_provisioned_mib: 0,
            disk_free_mib: None,
            disk_reserve_mib: 0,
            cached_images: if i % 3 == 0 {
                vec!["img".into()]
            } else {
                vec![]
            },
        })
        .collect()
}

fn run(policy: tuchka_api::PlacementPolicy, anti_affinity: bool) {
    let mut hs = hosts(1000);
    let ratios = Ratios::default();
    let groups = 1000;
    let start = Instant::now();
    let mut placed = 0usize;
    for g in 0..groups {
        let req = GroupRequest {
            group: format!("g{g}"),
            count: 10,
            cpus: 2,
            memory_mib: 2048,
            disk_mib: 10_240,
            image_sha256: "img".into(),
            image_mib: 0,
            volume_mib: 0,
            anti_affinity,
            existing: BTreeMap::new(),
            policy,
        };
        let p = place_group(&hs, &req, &ratios).expect("fits");
        for x in &p {
            let h = hs.iter_mut().find(|h| h.id == x.host_id).expect("host");
            h.cpus_used += req.cpus;
            h.memory_used_mib += req.memory_mib;
            h.disk_provisioned_mib += req.disk_mib;
        }
        placed += p.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:<6} anti-affinity={:<5}: {placed} VMs in {groups} groups on 1000 hosts in {:.3} s = {:.0} placements/s",
        format!("{policy:?}").to_lowercase(),
        anti_affinity,
        secs,
        placed as f64 / secs
    );
}

fn main() {
    run(tuchka_api::PlacementPolicy::Spread, false);
    run(tuchka_api::PlacementPolicy::Pack, false);
    run(tuchka_api::PlacementPolicy::Spread, true);
}
