//! Launch benchmark against a real `tuchka serve` (real libvirt, TCG guests):
//!
//! 1. create-VM → domain running: N one-VM groups created one after another; the time from the
//!    API call to the operation succeeding (the host reports the domain running — guest boot is
//!    not included), p50/p95;
//! 2. a group of 10 VMs from one image → all running, and its removal.
//!
//! Run: `cargo bench -p tuchka --bench launch` (as root, libvirt started; `./scripts/start-libvirt`).
//! Environment: BENCH_N (default 10), TUCHKA_TEST_IMAGE (default target/testimg/tiny.qcow2).
//! It uses the integration tests' harness, so everything it creates is removed even on failure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Cloud;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let image = common::test_image();
    let c = Cloud::start_with("bench", &["--accel", "tcg", "--cpu-overcommit", "8"]);
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 100 + p % 50, (p / 50) % 256);
    c.ok(&["net", "create", "bench", "--cidr", &cidr, "--wait"]);
    c.track_network("bench");

    let mut times = vec![];
    for i in 0..n {
        let name = format!("one{i}");
        let t = Instant::now();
        c.ok(&[
            "group", "create", &name, "--image", "tiny", "--count", "1", "--memory", "128M",
            "--net", "bench", "--wait",
        ]);
        times.push(t.elapsed());
        c.vm(&format!("{name}-0"));
        c.ok(&["group", "rm", &name, "--wait"]);
    }
    times.sort();
    println!(
        "create-VM → domain running (n={n}, excludes guest boot): p50 {:.0} ms, p95 {:.0} ms, min {:.0} ms, max {:.0} ms",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.95)),
        ms(times[0]),
        ms(times[times.len() - 1]),
    );

    let t = Instant::now();
    c.ok(&[
        "group", "create", "ten", "--image", "tiny", "--count", "10", "--memory", "128M", "--net",
        "bench", "--wait",
    ]);
    println!(
        "group of 10 from one image → all running: {:.0} ms",
        ms(t.elapsed())
    );
    for i in 0..10 {
        c.vm(&format!("ten-{i}"));
    }
    std::thread::sleep(std::time::Duration::from_secs(10));
    if let Some(pid) = c.serve_pid() {
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        println!(
            "tuchka serve (controller + local agent) RSS, idle with 10 VMs: {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    let t = Instant::now();
    c.ok(&["group", "rm", "ten", "--wait"]);
    println!(
        "group of 10 → removed (domains, disks, seeds, addresses): {:.0} ms",
        ms(t.elapsed())
    );
    c.ok(&["net", "rm", "bench", "--wait"]);
    c.ok(&["image", "rm", "tiny"]);
}
