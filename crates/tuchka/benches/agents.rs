//! Controller load: 100 simulated agents (tasks in this process, no libvirt) register over the
//! unix socket and heartbeat every 2 s (fetch their desired state, post a report). Measures the
//! controller process's CPU use and RSS over 30 s, then the time of a `/metrics` scrape while
//! they go on heartbeating (the scrape reads every host from the database).
//!
//! Run: `cargo bench -p tuchka --bench agents`. Environment: BENCH_AGENTS (default 100),
//! BENCH_SECONDS (default 30), BENCH_SCRAPES (default 20).

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{cpu_ticks, sim};
use tuchka_api::agent::{HostDesired, HostReport};
use tuchka_client::{Client, Endpoint};

fn rss_kib(pid: u32) -> u64 {
    support::status_kib(pid, "VmRSS:")
}

#[tokio::main]
async fn main() {
    let agents: usize = std::env::var("BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = PathBuf::from(format!(
        "/var/tmp/tuchka-agents-bench-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .args(["serve", "--no-local-agent", "--data-dir"])
        .arg(&dir)
        .env("TUCHKA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let pid = serve.id();
    let sock = dir.join("tuchka.sock");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kib(pid);
    let mut tasks = vec![];
    for i in 0..agents {
        let client = Client::new(Endpoint::Unix(sock.clone()));
        tasks.push(tokio::spawn(async move {
            let facts = sim::facts();
            let (host_id, client) = sim::register(&client, &format!("sim-{i}"), "").await;
            // Spread the heartbeats over the 2 s period.
            tokio::time::sleep(Duration::from_millis((i as u64 * 2000) / 100)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let d: HostDesired = client
                    .get(&format!("/v1/agent/hosts/{host_id}/desired?after=0"))
                    .await
                    .expect("desired");
                let report = HostReport {
                    generation: d.generation,
                    facts: facts.clone(),
                    ..Default::default()
                };
                client
                    .post_empty(&format!("/v1/agent/hosts/{host_id}/report"), &report)
                    .await
                    .expect("report");
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let ticks = cpu_ticks(pid) - t0;
    let wall = w0.elapsed().as_secs_f64();
    let hz = 100.0; // USER_HZ on Linux
    let rss = rss_kib(pid);
    let scrapes: usize = std::env::var("BENCH_SCRAPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let scraper = Client::new(Endpoint::Unix(sock.clone()));
    let scrape = |label: &'static str| {
        let scraper = scraper.clone();
        async move {
            let mut times = vec![];
            let mut bytes = 0;
            for _ in 0..scrapes {
                let t = Instant::now();
                let text = scraper.get_text("/metrics").await.expect("scrape");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                bytes = text.len();
            }
            times.sort_by(f64::total_cmp);
            let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            println!(
                "/metrics with {agents} hosts ({label}): {scrapes} scrapes, p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms, {:.0} KiB each",
                at(0.5),
                at(0.95),
                at(1.0),
                bytes as f64 / 1024.0
            );
        }
    };
    scrape("while they heartbeat").await;
    let up = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .args(["--socket"])
        .arg(&sock)
        .args(["host", "list", "-o", "json"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("\"state\": \"up\"")
                .count()
        })
        .unwrap_or(0);
    println!(
        "controller with {agents} agents heartbeating every 2 s: CPU {:.1} % of one core over {wall:.0} s, RSS {:.1} MiB (idle before: {:.1} MiB); hosts up: {up}",
        100.0 * ticks as f64 / hz / wall,
        rss as f64 / 1024.0,
        rss_idle as f64 / 1024.0
    );
    for t in tasks {
        t.abort();
    }
    scrape("heartbeats stopped").await;
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = serve.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
