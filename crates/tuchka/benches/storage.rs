//! Disks and images benchmark against a real `tuchka serve` (real libvirt, TCG guests):
//!
//! 1. a group of 10 VMs when the image is not yet cached on the host (the first launch fetches
//!    it from the controller) and when it is (the second launch): create → all running;
//! 2. volume attach → the guest sees the disk (polled over its HTTP disk endpoint), BENCH_N
//!    times, p50/p95;
//! 3. an image captured from a running VM: total time of `image create --from-vm --wait`, and
//!    the guest's pause as the host measured it (the capture of 1 GiB of written data is
//!    measured at the host level by `cargo bench -p tuchka-host --bench capture`).
//!
//! Run: `cargo bench -p tuchka --bench storage` (as root, libvirt started). Environment:
//! BENCH_N (default 5), TUCHKA_TEST_IMAGE. Everything it makes is removed, even on failure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{http_path, Cloud};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sees(ip: Ipv4Addr, serial: &str) -> bool {
    http_path(ip, "/cgi-bin/disks", Duration::from_secs(10)).is_some_and(|(s, body)| {
        s == 200
            && body
                .lines()
                .any(|l| l.split_whitespace().nth(2) == Some(serial))
    })
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let image = common::test_image();
    let c = Cloud::start_with("bstor", &["--accel", "tcg", "--cpu-overcommit", "8"]);
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 60 + p % 40, (p / 40) % 256);
    c.ok(&["net", "create", "bench", "--cidr", &cidr, "--wait"]);
    c.track_network("bench");

    for (label, name) in [("not cached", "cold"), ("cached", "warm")] {
        let t = Instant::now();
        c.ok(&[
            "group", "create", name, "--image", "tiny", "--count", "10", "--memory", "96M",
            "--net", "bench", "--wait",
        ]);
        println!(
            "group of 10, image {label}: all running in {:.0} ms",
            ms(t.elapsed())
        );
        c.ok(&["group", "rm", name, "--wait"]);
    }

    c.ok(&[
        "group", "create", "vol", "--image", "tiny", "--memory", "128M", "--net", "bench", "--wait",
    ]);
    let ip = c.ip("vol-0");
    c.wait_for("vol-0 to answer", Duration::from_secs(120), || {
        http_path(ip, "/", Duration::from_secs(5)).is_some_and(|(s, _)| s == 200)
    });
    c.ok(&[
        "volume",
        "create",
        "bench-data",
        "--size",
        "64M",
        "--near",
        "vol-0",
    ]);
    let id = c.ok(&["volume", "show", "bench-data", "-o", "json"]).json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let serial: String = id.chars().filter(|ch| *ch != '-').take(20).collect();
    let mut times = vec![];
    for _ in 0..n {
        let t = Instant::now();
        c.ok(&["volume", "attach", "bench-data", "vol-0"]);
        c.wait_for(
            "the guest to see the volume",
            Duration::from_secs(60),
            || sees(ip, &serial),
        );
        times.push(t.elapsed());
        c.ok(&["volume", "detach", "bench-data", "--wait"]);
        c.wait_for("the volume gone", Duration::from_secs(60), || {
            !sees(ip, &serial)
        });
    }
    times.sort();
    println!(
        "volume attach -> visible in the guest ({n} times): p50 {:.0} ms, p95 {:.0} ms",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.95))
    );
    c.ok(&["volume", "rm", "bench-data"]);

    let t = Instant::now();
    c.ok(&[
        "image",
        "create",
        "bench-snap",
        "--from-vm",
        "vol-0",
        "--wait",
    ]);
    let total = t.elapsed();
    let log = std::fs::read_to_string(c.dir.join("serve.log")).unwrap_or_default();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("disk captured; sending it"))
        .unwrap_or("");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "image from the running vol-0: {:.0} ms total; guest paused {} ms; copy {} ms, convert {} ms, {} bytes",
        ms(total),
        field("paused_ms"),
        field("copy_ms"),
        field("convert_ms"),
        field("bytes")
    );
    c.ok(&["group", "rm", "vol", "--wait"]);
    c.ok(&["image", "rm", "bench-snap"]);
}
