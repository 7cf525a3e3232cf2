//! Drain benchmark on three simulated hosts (the multi-host harness, TCG guests): a host with
//! BENCH_N (default 10) running VMs is drained with `tuchka host drain --wait` (live migrations
//! through the channel, 2 at a time); prints the total time, the per-VM time and where they went.
//!
//! Run: `cargo bench -p tuchka --bench drain` (as root). Environment: BENCH_N, BENCH_MEMORY
//! (default 128M), BENCH_PARALLEL (default 2), TUCHKA_TEST_IMAGE.

#[path = "../tests/common/cluster.rs"]
mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cluster::Cluster;

fn main() {
    let n: u32 = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let memory = std::env::var("BENCH_MEMORY").unwrap_or_else(|_| "128M".into());
    let parallel = std::env::var("BENCH_PARALLEL").unwrap_or_else(|_| "2".into());
    let image = common::test_image();
    let c = Cluster::start_with(3, &["--cpu-overcommit", "16"]);
    c.wait_for("three hosts up", Duration::from_secs(90), || {
        let hs = c.hosts();
        hs.len() == 3
            && hs
                .iter()
                .all(|h| h["state"] == "up" && h["channel_port"].as_u64().unwrap_or(0) > 0)
    });
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("p"),
        "--name",
        "tiny",
    ]);
    c.ok(&["net", "create", "bench", "--cidr", "10.94.0.0/24", "--wait"]);
    // Put all N on h1: the others take no placements meanwhile.
    c.ok(&["host", "drain", "h2"]);
    c.ok(&["host", "drain", "h3"]);
    c.ok(&[
        "group",
        "create",
        "d",
        "--image",
        "tiny",
        "--count",
        &n.to_string(),
        "--memory",
        &memory,
        "--net",
        "bench",
        "--wait",
    ]);
    c.ok(&["host", "undrain", "h2"]);
    c.ok(&["host", "undrain", "h3"]);
    assert_eq!(c.per_host("d").get("h1").copied(), Some(n as usize));
    // Let the guests finish booting: a drain of booting guests measures the boot.
    let ids: Vec<String> = c
        .vms()
        .iter()
        .filter(|v| v["group"] == "d")
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect();
    c.wait_for("every guest booted", Duration::from_secs(300), || {
        ids.iter().all(|id| {
            std::fs::read_to_string(
                c.mh()
                    .dir()
                    .join("h1/tuchka-pool/vms")
                    .join(id)
                    .join("console.log"),
            )
            .is_ok_and(|l| l.contains("TESTIMG-READY"))
        })
    });
    std::thread::sleep(Duration::from_secs(5));
    let t = Instant::now();
    c.ok(&["host", "drain", "h1", "--parallel", &parallel, "--wait"]);
    let total = t.elapsed();
    let spread = c.per_host("d");
    let downtimes: Vec<u64> = c
        .vms()
        .iter()
        .filter_map(|v| v["last_migration"]["downtime_ms"].as_u64())
        .collect();
    let mut sorted = downtimes.clone();
    sorted.sort();
    println!(
        "drain of {n} VMs ({memory} each, {parallel} at a time) off h1: {:.1} s total, {:.2} s per VM; now {spread:?}; downtime p50 {} ms, max {} ms",
        total.as_secs_f64(),
        total.as_secs_f64() / f64::from(n),
        sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        sorted.last().copied().unwrap_or(0),
    );
    c.ok(&["group", "rm", "d", "--wait"]);
}
