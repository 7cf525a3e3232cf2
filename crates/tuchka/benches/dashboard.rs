//! The dashboard's first load with a cloud of 100 VMs, in a real headless chromium: bytes over
//! the wire (document, assets, API answers) and the time to the first render of the overview,
//! then the VMs page with its 100 rows.
//!
//! The controller is the real `tuchka serve --no-local-agent --listen`; its 4 hosts are
//! simulated agents (tasks in this process, as in the `agents` bench: no libvirt) that speak
//! the real agent protocol over the unix socket and report every VM they are given as running.
//! The VMs are made by a real `group create` through the CLI; the page reads them through the
//! real API. Nothing boots, so this measures the dashboard and the API, not the guests.
//!
//! Run: `cargo bench -p tuchka --bench dashboard` (needs chromium and chromedriver).
//! Environment: BENCH_VMS (default 100).

#[path = "../tests/common/browser.rs"]
mod browser;
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tuchka_api::agent::{
    HostDesired, HostFacts, HostRegister, HostRegistered, HostReport, VmObserved,
};
use tuchka_client::{Client, Endpoint};

const HOSTS: usize = 4;

fn tk(sock: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run tuchka");
    assert!(
        out.status.success(),
        "tuchka {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One simulated host: registers, then every second takes its desired state and reports every
/// VM in it as running, its images as cached.
async fn simulated_host(sock: PathBuf, i: usize) {
    let client = Client::new(Endpoint::Unix(sock));
    let facts = HostFacts {
        cpus: 64,
        memory_mib: 262_144,
        memory_available_mib: 200_000,
        memory_in_use_mib: 40_000 + 9_000 * i as u64,
        cpu_usage: 0.1 + 0.15 * i as f64,
        load_1m: 1.5 * i as f64,
        disk_mib: 2_000_000,
        disk_free_mib: 1_500_000,
        accel: "kvm".into(),
        accel_reason: "simulated".into(),
        ..Default::default()
    };
    let reg: HostRegistered = client
        .post(
            "/v1/agent/register",
            &HostRegister {
                name: format!("sim-{i}"),
                join_token: String::new(),
                facts: facts.clone(),
                identity: None,
                csr_pem: None,
            },
        )
        .await
        .expect("register");
    let client = client.with_token(Some(reg.credential));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(d) = client
            .get::<HostDesired>(&format!("/v1/agent/hosts/{}/desired?after=0", reg.host_id))
            .await
        else {
            continue;
        };
        let vms = d
            .vms
            .iter()
            .map(|v| VmObserved {
                id: v.id.clone(),
                state: tuchka_api::VmState::Running,
                error: None,
                error_chain: vec![],
                reboot_seq: v.reboot_seq,
                domain: true,
                migration: None,
                cpu_usage: 0.02,
                pause_reason: None,
                resume_seq: 0,
                running_with: Some((v.cpus, v.memory_mib, v.disk_mib)),
                powered_off: false,
                console_tail: None,
                resize_error: None,
            })
            .collect();
        let report = HostReport {
            generation: d.generation,
            facts: facts.clone(),
            vms,
            cached_images: d.images.clone(),
            ..Default::default()
        };
        let _ = client
            .post_empty(&format!("/v1/agent/hosts/{}/report", reg.host_id), &report)
            .await;
    }
}

fn figures(b: &browser::Browser) -> Value {
    b.js(
        "const nav = performance.getEntriesByType('navigation')[0];
         const res = performance.getEntriesByType('resource');
         const mark = performance.getEntriesByName('tuchka-first-render')[0];
         const apis = res.filter(r => r.name.includes('/v1/') && !r.name.includes('/v1/events'));
         const sum = (l, k) => l.reduce((n, r) => n + (r[k] || 0), 0);
         return {
           transfer_bytes: nav.transferSize + sum(res, 'transferSize'),
           api_body_bytes: sum(apis, 'decodedBodySize'),
           requests: 1 + res.length,
           first_render_ms: mark ? Math.round(mark.startTime) : null,
         };",
        json!([]),
    )
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    browser::require_browser();
    let dir = PathBuf::from(format!(
        "/var/tmp/tuchka-dashboard-bench-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .args([
            "serve",
            "--no-local-agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&dir)
        .env("TUCHKA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let sock = dir.join("tuchka.sock");
    let start = Instant::now();
    while !sock.exists() || !dir.join("tls/server.crt").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hosts: Vec<_> = (0..HOSTS)
        .map(|i| tokio::spawn(simulated_host(sock.clone(), i)))
        .collect();

    let image = dir.join("empty.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "qemu-img create (package qemu-utils)");
    let sock2 = sock.clone();
    let count_s = count.to_string();
    let link = tokio::task::spawn_blocking(move || {
        tk(
            &sock2,
            &[
                "image",
                "upload",
                image.to_str().expect("path"),
                "--name",
                "empty",
            ],
        );
        tk(
            &sock2,
            &[
                "group", "create", "web", "--image", "empty", "--count", &count_s, "--cpus", "1",
                "--memory", "256M", "--disk", "1G", "--wait",
            ],
        );
        let login: Value =
            serde_json::from_str(&tk(&sock2, &["ui", "-o", "json"])).expect("ui json");
        login["link"].as_str().expect("link").to_string()
    })
    .await
    .expect("setup");

    let b = browser::Browser::start(&dir.join("tls/server.crt"), 1280, 900);
    b.goto(&link);
    b.wait_for(
        "article[data-host=\"sim-3\"]",
        Duration::from_secs(30),
        "the overview",
    );
    b.wait_for(
        "b[data-count=\"running\"]",
        Duration::from_secs(30),
        "VMs by state",
    );
    let cold = figures(&b);
    let t = Instant::now();
    b.click("a[data-nav=\"vms\"]");
    b.wait_for(
        &format!("tr[data-vm=\"web-{}\"][data-state=\"running\"]", count - 1),
        Duration::from_secs(30),
        "the VMs page",
    );
    let vms_page_ms = t.elapsed().as_millis();
    let rows = b.js(
        "return document.querySelectorAll('tr[data-vm]').length",
        json!([]),
    );
    let vms_bytes = b.js(
        "return performance.getEntriesByType('resource').filter(r => r.name.endsWith('/v1/vms')).map(r => r.decodedBodySize).pop()",
        json!([]),
    );
    println!(
        "dashboard, {HOSTS} hosts and {count} VMs: first load (cold cache) {cold}; VMs page: {rows} rows in {vms_page_ms} ms (click to rendered, as seen through WebDriver), GET /v1/vms {vms_bytes} bytes"
    );
    drop(b);
    for h in hosts {
        h.abort();
    }
    let _ = Command::new("kill").arg(serve.id().to_string()).status();
    let _ = serve.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
