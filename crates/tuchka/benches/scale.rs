//! The control plane at scale: one `tuchka serve` (HTTPS on loopback, no local agent), 1,000
//! simulated hosts (tasks in this process speaking the real agent protocol over HTTPS: they
//! register with the join token, long-poll their desired state and report it converged — no
//! libvirt) and 10,000 VMs in 100 groups on 10 networks. Then, with the hosts heartbeating:
//!
//! - reads: `vm show`, `host list`, `vm list` — requests/s and latency p50/p99 with
//!   BENCH_CLIENTS concurrent clients for BENCH_SECONDS each, over HTTPS with the API token;
//! - writes: create and remove a one-VM group (the `202` answers) — pairs/s and p50/p99;
//! - fan-out: a rule added to one network → the time until every host has received the new
//!   desired-state generation;
//! - the controller's RSS and CPU in each phase.
//!
//! Everything stays on loopback and ends with the bench. Run:
//! `cargo bench -p tuchka --bench scale` (as root for /var/tmp). Environment: BENCH_HOSTS
//! (default 1000), BENCH_VMS (default 10000), BENCH_CLIENTS (default 16), BENCH_SECONDS
//! (default 10), TUCHKA_TEST_IMAGE (any qcow2; the VMs never boot).

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::sim::{self, Seen};
use support::{cpu_seconds, env_or, ms, peak_rss_mib, quantile, rss_mib};
use tuchka_api::{GroupCreate, JoinToken, JoinTokenCreate, NetworkCreate, Operation, RuleCreate};
use tuchka_client::{Client, Endpoint};

struct Serve {
    child: Child,
    dir: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed run keeps the controller's directory (its serve.log says why).
        if std::thread::panicking() {
            eprintln!("kept for reading: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Run `phase` and print the controller's CPU (% of one core) and RSS over it.
async fn measured<T>(pid: u32, label: &str, phase: impl std::future::Future<Output = T>) -> T {
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    let out = phase.await;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "  controller during {label}: CPU {:.0} % of one core over {wall:.1} s, RSS {:.1} MiB",
        100.0 * (cpu_seconds(pid) - c0) / wall,
        rss_mib(pid)
    );
    out
}

/// `clients` tasks calling `request(i)` for `seconds`: (requests, latencies, errors).
async fn load<F, Fut>(clients: usize, seconds: u64, request: F) -> (usize, Vec<Duration>, usize)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let request = request.clone();
            tokio::spawn(async move {
                let (mut lat, mut errors, mut i) = (vec![], 0, c);
                while Instant::now() < end {
                    let t = Instant::now();
                    if !request(i).await {
                        errors += 1;
                    }
                    lat.push(t.elapsed());
                    i += clients;
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (vec![], 0);
    for t in tasks {
        let (lat, e) = t.await.expect("load task");
        all.extend(lat);
        errors += e;
    }
    (all.len(), all, errors)
}

fn report(label: &str, seconds: u64, (n, mut lat, errors): (usize, Vec<Duration>, usize)) {
    println!(
        "{label}: {:.0} req/s ({n} in {seconds} s, {errors} errors), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        n as f64 / seconds as f64,
        ms(quantile(&mut lat, 0.5)),
        ms(quantile(&mut lat, 0.99)),
        ms(quantile(&mut lat, 1.0)),
    );
}

/// A group of `count` one-vCPU VMs of the uploaded image on `networks`.
fn group(name: String, count: u32, memory_mib: u64, networks: Vec<String>) -> GroupCreate {
    GroupCreate {
        name,
        image: "tiny".into(),
        count,
        cpus: 1,
        memory_mib,
        disk_mib: 0,
        networks,
        user_data: None,
        ssh_keys: vec![],
        placement: None,
        anti_affinity: false,
        volume_size_mib: None,
        keep_volumes: false,
        max_cpus: None,
    }
}

async fn wait_op(client: &Client, op: Operation) -> Operation {
    client
        .wait_operation(&op.id, |_| {})
        .await
        .expect("operation")
}

#[tokio::main]
async fn main() {
    let hosts: usize = env_or("BENCH_HOSTS", 1000);
    let vms: usize = env_or("BENCH_VMS", 10000);
    let clients: usize = env_or("BENCH_CLIENTS", 16);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let image = std::env::var("TUCHKA_TEST_IMAGE").expect(
        "TUCHKA_TEST_IMAGE: a qcow2 to upload (./scripts/test builds target/testimg/tiny.qcow2)",
    );
    let dir = PathBuf::from(format!("/var/tmp/tuchka-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .args(["serve", "--no-local-agent", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--cpu-overcommit", "16", "--memory-overcommit", "4"])
        // Every simulated host connects from 127.0.0.1: lift the per-client cap above them.
        .args([
            "--max-connections",
            "4096",
            "--max-connections-per-client",
            "4096",
        ])
        .env("TUCHKA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).expect("log"))
        .spawn()
        .expect("tuchka serve");
    let serve = Serve { child, dir };
    let pid = serve.child.id();
    let sock = serve.dir.join("tuchka.sock");
    let start = Instant::now();
    while !serve.dir.join("join.txt").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let local = Client::new(Endpoint::Unix(sock));
    let join: JoinToken = local
        .post(
            "/v1/join-tokens",
            &JoinTokenCreate {
                ttl_s: Some(3600),
                ..Default::default()
            },
        )
        .await
        .expect("join token");
    let url = join.url.clone().expect("url");
    let fingerprint = join.fingerprint.clone().expect("fingerprint");
    let token = std::fs::read_to_string(serve.dir.join("token")).expect("token");
    let user = Client::new(Endpoint::Http {
        url: url.clone(),
        token: Some(token.trim().to_string()),
    })
    .with_fingerprint(&fingerprint);
    let agents = Client::new(Endpoint::Http { url, token: None }).with_fingerprint(&fingerprint);
    println!(
        "controller idle: RSS {:.1} MiB; {hosts} hosts, {vms} VMs, {clients} clients, {seconds} s per load",
        rss_mib(pid)
    );

    // The hosts.
    let epoch = Instant::now();
    let t = Instant::now();
    let mut seen = vec![];
    let mut tasks = vec![];
    for i in 0..hosts {
        let (host_id, client) = sim::register(&agents, &format!("sim-{i:04}"), &join.token).await;
        let s = Arc::new(Seen::default());
        seen.push(s.clone());
        tasks.push(tokio::spawn(sim::run(client, host_id, s, epoch)));
    }
    println!(
        "{hosts} hosts registered in {:.1} s; controller RSS {:.1} MiB",
        t.elapsed().as_secs_f64(),
        rss_mib(pid)
    );
    let up = || async {
        let list: Vec<tuchka_api::Host> = user.get("/v1/hosts").await.expect("hosts");
        list.iter()
            .filter(|h| h.state == tuchka_api::HostState::Up)
            .count()
    };
    while up().await < hosts {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The VMs: 10 networks, 100 groups.
    let t = Instant::now();
    user.upload_image("tiny", std::path::Path::new(&image), |_| {})
        .await
        .expect("upload image");
    let nets = 10usize;
    for n in 0..nets {
        let op: Operation = user
            .post(
                "/v1/networks",
                &NetworkCreate {
                    name: format!("net-{n}"),
                    cidr: format!("10.{}.0.0/18", 64 + n),
                    gateway: None,
                    nat: false,
                },
            )
            .await
            .expect("net create");
        wait_op(&user, op).await;
    }
    let groups = 100usize.min(vms.max(1));
    let per = vms / groups;
    let populate = async {
        for g in 0..groups {
            let op: Operation = user
                .post(
                    "/v1/groups",
                    &group(
                        format!("g{g:03}"),
                        per as u32,
                        256,
                        vec![format!("net-{}", g % nets)],
                    ),
                )
                .await
                .expect("group create");
            let op = wait_op(&user, op).await;
            assert!(
                op.state == tuchka_api::OperationState::Succeeded,
                "group g{g:03}: {:?}",
                op.error
            );
        }
    };
    measured(pid, "populating", populate).await;
    println!(
        "{} VMs in {groups} groups created and running in {:.1} s; controller RSS {:.1} MiB (peak {:.1} MiB)",
        groups * per,
        t.elapsed().as_secs_f64(),
        rss_mib(pid),
        peak_rss_mib(pid)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reports0: u64 = seen.iter().map(|s| s.reports.load(Ordering::Relaxed)).sum();
    let heartbeat = measured(pid, "10 s of heartbeats only", async {
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    heartbeat.await;
    let reports1: u64 = seen.iter().map(|s| s.reports.load(Ordering::Relaxed)).sum();
    println!(
        "heartbeats: {:.0} reports/s from {hosts} hosts",
        (reports1 - reports0) as f64 / 10.0
    );

    // Reads.
    let names: Arc<Vec<String>> = Arc::new(
        (0..groups)
            .flat_map(|g| (0..per).map(move |i| format!("g{g:03}-{i}")))
            .collect(),
    );
    let (u, n) = (user.clone(), names.clone());
    let r = measured(
        pid,
        "vm show",
        load(clients, seconds, move |i| {
            let (u, name) = (u.clone(), n[(i * 7919) % n.len()].clone());
            async move {
                u.get::<tuchka_api::Vm>(&format!("/v1/vms/{name}"))
                    .await
                    .is_ok()
            }
        }),
    )
    .await;
    report("vm show (HTTPS)", seconds, r);
    let u = user.clone();
    let r = measured(
        pid,
        "host list",
        load(clients, seconds, move |_| {
            let u = u.clone();
            async move { u.get::<Vec<tuchka_api::Host>>("/v1/hosts").await.is_ok() }
        }),
    )
    .await;
    report(&format!("host list of {hosts} (HTTPS)"), seconds, r);
    let u = user.clone();
    let r = measured(
        pid,
        "vm list",
        load(clients.min(4), seconds, move |_| {
            let u = u.clone();
            async move { u.get::<Vec<tuchka_api::Vm>>("/v1/vms").await.is_ok() }
        }),
    )
    .await;
    report(
        &format!(
            "vm list of {} (HTTPS, {} clients)",
            groups * per,
            clients.min(4)
        ),
        seconds,
        r,
    );

    // Writes: create and remove a one-VM group.
    let u = user.clone();
    let r = measured(
        pid,
        "writes",
        load(clients, seconds, move |i| {
            let u = u.clone();
            async move {
                let name = format!("w{i}");
                let created: Result<Operation, _> = u
                    .post(
                        "/v1/groups",
                        &group(name.clone(), 1, 128, vec!["net-0".into()]),
                    )
                    .await;
                let removed = u.delete::<Operation>(&format!("/v1/groups/{name}")).await;
                created.is_ok() && removed.is_ok()
            }
        }),
    )
    .await;
    let pairs = r.0;
    report(
        "group create + rm of one VM (HTTPS, the 202 answers; one pair = 2 writes)",
        seconds,
        r,
    );
    println!("  = {:.0} writes/s", 2.0 * pairs as f64 / seconds as f64);
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Fan-out: one rule on net-0.
    let mut fan = vec![];
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t0 = epoch.elapsed().as_nanos() as u64;
        let before: Vec<u64> = seen
            .iter()
            .map(|s| s.generation.load(Ordering::Relaxed))
            .collect();
        let _: serde_json::Value = user
            .post(
                "/v1/networks/net-0/rules",
                &RuleCreate {
                    direction: None,
                    action: None,
                    spec: format!("tcp:{}", 8000 + round),
                    from: Some("0.0.0.0/0".into()),
                    from_group: None,
                    from_network: None,
                    to_group: None,
                    to: None,
                },
            )
            .await
            .expect("rule add");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let waiting = seen
                .iter()
                .zip(&before)
                .filter(|(s, b)| s.generation.load(Ordering::Relaxed) <= **b)
                .count();
            if waiting == 0 || Instant::now() > deadline {
                let last = seen
                    .iter()
                    .map(|s| s.at_ns.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(t0);
                let d = Duration::from_nanos(last.saturating_sub(t0));
                println!(
                    "fan-out {}: a rule on net-0 → all {hosts} hosts had the new generation after {:.0} ms{}",
                    round + 1,
                    ms(d),
                    if waiting > 0 { format!(" ({waiting} never did)") } else { String::new() }
                );
                fan.push(d);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!(
        "fan-out median {:.0} ms; controller RSS {:.1} MiB (peak {:.1} MiB) with {} VMs",
        ms(support::median(&fan)),
        rss_mib(pid),
        peak_rss_mib(pid),
        groups * per
    );
    for t in tasks {
        t.abort();
    }
    drop(serve);
}
