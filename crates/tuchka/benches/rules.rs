//! Rule latency against a real `tuchka serve`: one TCG guest answering HTTP, an "outside"
//! network namespace; N times: `net rule add … --allow tcp:80 --from 0.0.0.0/0`, then poll from
//! outside every 20 ms until port 80 answers; `rule rm` and wait until it is closed again.
//! Prints p50/p95 of add → answering (includes the CLI call, the agent's pass and the nft
//! transaction).
//!
//! Run: `cargo bench -p tuchka --bench rules` (as root, libvirt started). Environment: BENCH_N
//! (default 10).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Cloud, Outside};

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let image = common::test_image();
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 30 + p % 20, (p / 20) % 250);
    let outside = Outside::start(&[&cidr]);
    let c = Cloud::start("rulebench");
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    // --nat keeps net.ipv4.ip_forward on throughout; otherwise every first rule would also toggle
    // it, and the first packet after a toggle is lost (one TCP retransmit, 1 s).
    c.ok(&["net", "create", "app", "--cidr", &cidr, "--nat", "--wait"]);
    c.track_network("app");
    c.ok(&[
        "group", "create", "web", "--image", "tiny", "--count", "1", "--memory", "160M", "--net",
        "app", "--wait",
    ]);
    let ip = c.ip("web-0");
    let url = format!("http://{ip}/");
    // The guest must be up (answers on its own network) before timing starts.
    c.wait_for("web-0 to boot", Duration::from_secs(120), || {
        common::http_get(ip, 80).is_some()
    });
    let mut times = vec![];
    for _ in 0..n {
        let t = Instant::now();
        let rule = c
            .ok(&[
                "net",
                "rule",
                "add",
                "app",
                "--allow",
                "tcp:80",
                "--from",
                "0.0.0.0/0",
                "-o",
                "json",
            ])
            .json();
        while outside.get_within(&url, "0.2").is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "rule did not take effect\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        times.push(t.elapsed());
        c.ok(&["net", "rule", "rm", "app", rule["id"].as_str().expect("id")]);
        let t = Instant::now();
        while outside.get_within(&url, "0.2").is_some() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "rule removal did not take effect"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    times.sort();
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!("rule add → port answering from outside (n={n}): p50 {:.0} ms, p95 {:.0} ms, min {:.0} ms, max {:.0} ms", pct(0.5), pct(0.95), pct(0.0), pct(1.0));
    c.ok(&["group", "rm", "web", "--wait"]);
    c.ok(&["net", "rm", "app", "--wait"]);
    c.ok(&["image", "rm", "tiny"]);
}
