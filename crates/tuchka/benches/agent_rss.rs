//! Agent footprint: a one-host cloud from the multi-host harness (controller in the fabric
//! namespace, a `tuchka agent` joined over HTTPS), 10 TCG guests on the host; after they settle,
//! the agent process's RSS and CPU use while idle.
//!
//! Run: `cargo bench -p tuchka --bench agent_rss` (as root, libvirt usable).

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/common/cluster.rs"]
mod cluster;

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use support::{cpu_ticks, status_kib};

fn main() {
    let image = common::test_image();
    let c = Cluster::start_with(1, &["--cpu-overcommit", "8"]);
    c.wait_for("the host up", Duration::from_secs(60), || {
        c.hosts().iter().any(|h| h["state"] == "up")
    });
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("p"),
        "--name",
        "tiny",
    ]);
    c.ok(&["net", "create", "app", "--cidr", "10.93.0.0/24", "--wait"]);
    c.ok(&[
        "group", "create", "ten", "--image", "tiny", "--count", "10", "--memory", "128M", "--net",
        "app", "--wait",
    ]);
    std::thread::sleep(Duration::from_secs(20));
    let pid = c.agent_pid("h1").expect("agent pid");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        cmdline.contains("agent"),
        "pid {pid} is not the agent: {cmdline:?}"
    );
    let t0 = cpu_ticks(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let cpu = 100.0 * (cpu_ticks(pid) - t0) as f64 / 100.0 / start.elapsed().as_secs_f64();
    println!(
        "tuchka agent, idle with 10 VMs: RSS {:.1} MiB (peak {:.1} MiB; heap and stacks {:.1} MiB, \
         mapped files {:.1} MiB), {} threads, CPU {cpu:.1} % of one core",
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0,
        status_kib(pid, "RssAnon:") as f64 / 1024.0,
        status_kib(pid, "RssFile:") as f64 / 1024.0,
        status_kib(pid, "Threads:"),
    );
}
