//! Chaos, for real: three simulated hosts, 100 random operations (group create / scale / rm,
//! vm stop / start / reboot / migrate, rule add / rm, net create / rm) while, at random moments,
//! the controller, an agent or a host's libvirtd is killed with SIGKILL and started again.
//! After convergence, as an operator would check:
//!
//! - every operation ended `succeeded` or `failed` (none stuck);
//! - every VM is in the state it should be in, and every VM that should run answers (its guest
//!   keeps printing heartbeats on its console);
//! - nothing is orphaned or leaked on any host or in the state: no domain, VM directory (disk,
//!   seed), tap, bridge, VXLAN device, dnsmasq, DHCP lease or address the cloud does not account
//!   for, and every row points at something real.
//!
//! The run is reproducible: it prints its seed; `TUCHKA_CHAOS_SEED=N` replays one,
//! `TUCHKA_CHAOS_OPS=N` changes the number of operations.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster::Cluster;
use serde_json::Value;

/// A small seeded generator (SplitMix64): the same seed gives the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// 0..n
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len()))
        }
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from).max(1))
    }
}

/// Most VMs at once: TCG guests on 2 cores.
const MAX_VMS: usize = 6;

/// The guests' heartbeat, every 2 s on the console.
const HEARTBEAT: &str = "#!/bin/sh\n(n=0; while true; do n=$((n+1)); echo \"CHAOS-ALIVE $(hostname) $n\" >/dev/ttyS0; sleep 2; done) &\n";

fn names(list: &[Value]) -> Vec<String> {
    list.iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect()
}

fn list(c: &Cluster, what: &str) -> Vec<Value> {
    let r = c.tk(&[what, "list", "-o", "json"]);
    if r.code != 0 {
        return vec![];
    }
    r.json().as_array().cloned().unwrap_or_default()
}

/// One random operation, as a user would type it (never waiting: crashes happen meanwhile).
/// Returns the command line; a refusal is an answer too.
fn random_op(c: &Cluster, rng: &mut Rng, seq: &mut u32, user_data: &str) -> Vec<String> {
    let groups = list(c, "group");
    let vms = list(c, "vm");
    let nets: Vec<String> = names(&list(c, "net"));
    let group_names = names(&groups);
    let vm_names = names(&vms);
    let room = MAX_VMS.saturating_sub(vms.len());
    *seq += 1;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    loop {
        match rng.below(12) {
            0 | 1 if room > 0 => {
                let count = (1 + rng.below(2)).min(room).to_string();
                let name = format!("g{seq}");
                let mut cmd = s(&[
                    "group",
                    "create",
                    &name,
                    "--image",
                    "tiny",
                    "--count",
                    &count,
                    "--memory",
                    "128M",
                    "--user-data",
                    user_data,
                ]);
                if let Some(n) = rng.pick(&nets) {
                    cmd.extend(s(&["--net", n]));
                }
                return cmd;
            }
            2 => {
                if let Some(g) = rng.pick(&groups) {
                    let now = g["count"].as_u64().unwrap_or(1) as usize;
                    let want = (1 + rng.below(3)).min(now + room).max(1);
                    let name = g["name"].as_str().unwrap_or_default();
                    return s(&["group", "scale", name, "--count", &want.to_string()]);
                }
            }
            3 => {
                if let Some(g) = rng.pick(&group_names) {
                    return s(&["group", "rm", g]);
                }
            }
            4..=7 => {
                if let Some(v) = rng.pick(&vm_names) {
                    let action = ["stop", "start", "reboot", "migrate"][rng.below(4)];
                    return s(&["vm", action, v]);
                }
            }
            8 => {
                if let Some(n) = rng.pick(&nets) {
                    let port = format!("tcp:{}", 8000 + rng.below(100));
                    return s(&[
                        "net",
                        "rule",
                        "add",
                        n,
                        "--allow",
                        &port,
                        "--from",
                        "10.0.0.0/8",
                    ]);
                }
            }
            9 => {
                if let Some(n) = rng.pick(&nets) {
                    let shown = c.tk(&["net", "show", n, "-o", "json"]);
                    if shown.code == 0 {
                        let rules = shown.json()["rules"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        if let Some(id) = rng.pick(&rules).and_then(|r| r["id"].as_str()) {
                            return s(&["net", "rule", "rm", n, id]);
                        }
                    }
                }
            }
            10 if nets.len() < 3 => {
                let name = format!("n{seq}");
                let cidr = format!("10.{}.0.0/24", 100 + *seq % 100);
                return s(&["net", "create", &name, "--cidr", &cidr, "--nat"]);
            }
            11 => {
                if let Some(n) = rng.pick(&nets) {
                    return s(&["net", "rm", n]);
                }
            }
            _ => {}
        }
    }
}

/// What a crash did, for the log.
fn random_crash(c: &mut Cluster, rng: &mut Rng) -> String {
    let host = format!("h{}", 1 + rng.below(3));
    match rng.below(3) {
        0 => {
            c.kill_controller();
            std::thread::sleep(rng.millis(0, 2000));
            c.start_controller();
            "controller killed and restarted".into()
        }
        1 => {
            c.crash_agent(&host);
            format!("agent of {host} killed and restarted")
        }
        _ => {
            c.mh()
                .restart_libvirtd(&host)
                .unwrap_or_else(|e| panic!("restart libvirtd of {host}: {e}"));
            format!("libvirtd of {host} killed and restarted")
        }
    }
}

/// Device names of a kind (`bridge`, `vxlan`, `tun`) in a host's namespace.
fn devices(c: &Cluster, host: &str, kind: &str) -> BTreeSet<String> {
    c.mh()
        .run(host, &["ip", "-o", "link", "show", "type", kind])
        .unwrap_or_else(|e| panic!("ip link on {host}: {e}"))
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn dir_names(path: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_hundred_operations_through_crashes_converge_with_nothing_leaked() {
    let image = common::test_image();
    let seed: u64 = std::env::var("TUCHKA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    let ops: usize = std::env::var("TUCHKA_CHAOS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    eprintln!("chaos: seed {seed} ({ops} operations); replay with TUCHKA_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);

    let mut c = Cluster::start(3);
    c.wait_hosts_up(3);
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("p"),
        "--name",
        "tiny",
    ]);
    c.ok(&[
        "net",
        "create",
        "n0",
        "--cidr",
        "10.99.0.0/24",
        "--nat",
        "--wait",
    ]);
    let ud = c.dir.join("heartbeat.sh");
    std::fs::write(&ud, HEARTBEAT).expect("user-data");
    let ud = ud.to_str().expect("p").to_string();

    let started = Instant::now();
    let mut seq = 0;
    let mut refused = 0;
    let mut crashes = vec![];
    for i in 0..ops {
        let cmd = random_op(&c, &mut rng, &mut seq, &ud);
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let r = c.tk(&args);
        if r.code != 0 {
            refused += 1;
        }
        eprintln!(
            "chaos {i:3}: tuchka {} → {}",
            cmd.join(" ").replace(&ud, "heartbeat.sh"),
            if r.code == 0 {
                "accepted".to_string()
            } else {
                format!("refused: {}", r.err.lines().next().unwrap_or_default())
            }
        );
        if rng.chance(15) {
            let what = random_crash(&mut c, &mut rng);
            eprintln!("chaos {i:3}: {what}");
            crashes.push(what);
        }
        std::thread::sleep(rng.millis(100, 1500));
    }
    eprintln!(
        "chaos: {ops} operations ({refused} refused at once) and {} crashes in {:.0}s",
        crashes.len(),
        started.elapsed().as_secs_f64()
    );

    // Convergence: no operation running, every VM where it should be.
    let settled = |c: &Cluster| -> bool {
        let ops = list(c, "op");
        let vms = list(c, "vm");
        ops.iter().all(|o| o["state"] != "running")
            && vms.iter().all(|v| v["state"] == v["desired"])
    };
    c.wait_for(
        "every operation to end and every VM to reach its desired state",
        Duration::from_secs(600),
        || settled(&c),
    );
    eprintln!(
        "chaos: converged {:.0}s after the start",
        started.elapsed().as_secs_f64()
    );

    // Every operation ever started ended (the state, not only `op list`'s latest 200).
    let store = tuchka_store::Store::open(&c.dir.join("state.db")).expect("state.db");
    let by_state: BTreeMap<String, i64> = {
        let conn = store.conn();
        let mut q = conn
            .prepare("SELECT state, count(*) FROM operations GROUP BY state")
            .expect("query");
        q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .expect("rows")
            .map(|r| r.expect("row"))
            .collect()
    };
    eprintln!("chaos: operations by state: {by_state:?}");
    {
        let conn = store.conn();
        let mut q = conn
            .prepare(
                "SELECT kind, target, coalesce(error, '') FROM operations WHERE state = 'failed'",
            )
            .expect("query");
        for r in q
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .expect("rows")
        {
            let (kind, target, error) = r.expect("row");
            eprintln!("chaos: failed {kind} {target}: {error}");
        }
    }
    assert!(
        by_state.keys().all(|s| s == "succeeded" || s == "failed"),
        "operations stuck: {by_state:?}\n{}",
        c.logs()
    );
    assert!(by_state.get("succeeded").is_some_and(|n| *n > 0));

    let vms = list(&c, "vm");
    let nets = list(&c, "net");
    let net_detail: Vec<Value> = nets
        .iter()
        .map(|n| {
            c.ok(&[
                "net",
                "show",
                n["name"].as_str().unwrap_or_default(),
                "-o",
                "json",
            ])
            .json()
        })
        .collect();

    // Running VMs answer: a heartbeat printed after convergence.
    let console_of = |v: &Value| {
        c.console(
            v["host"].as_str().unwrap_or_default(),
            v["id"].as_str().unwrap_or_default(),
        )
    };
    let running: Vec<&Value> = vms.iter().filter(|v| v["state"] == "running").collect();
    let before: Vec<usize> = running.iter().map(|v| console_of(v).len()).collect();
    c.wait_for(
        "every running VM to print a heartbeat",
        Duration::from_secs(120),
        || {
            running.iter().zip(&before).all(|(v, from)| {
                let text = console_of(v);
                let fresh = if text.len() >= *from {
                    &text[*from..]
                } else {
                    &text[..]
                };
                fresh.contains(&format!(
                    "CHAOS-ALIVE {}",
                    v["name"].as_str().unwrap_or_default()
                ))
            })
        },
    );

    // Nothing on a host that the cloud does not account for, nothing missing.
    let mut reservations: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for n in &net_detail {
        let name = n["name"].as_str().unwrap_or_default().to_string();
        for a in n["addresses"].as_array().cloned().unwrap_or_default() {
            let vm = a["vm"].as_str().unwrap_or_default();
            assert!(
                vms.iter().any(|v| v["name"] == vm),
                "address {a} of network {name} belongs to no VM"
            );
            reservations.entry(name.clone()).or_default().insert((
                a["mac"].as_str().unwrap_or_default().to_lowercase(),
                a["ip"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    for v in &vms {
        for a in v["addresses"].as_array().cloned().unwrap_or_default() {
            let net = a["network"].as_str().unwrap_or_default();
            let mac = a["mac"].as_str().unwrap_or_default().to_lowercase();
            let ip = a["ip"].as_str().unwrap_or_default().to_string();
            assert!(
                reservations
                    .get(net)
                    .is_some_and(|r| r.contains(&(mac, ip))),
                "VM {} has an address network {net} does not reserve: {a}",
                v["name"]
            );
        }
    }
    for host in ["h1", "h2", "h3"] {
        let on_host: Vec<&Value> = vms.iter().filter(|v| v["host"] == host).collect();
        let virsh_list = |state: &str| -> BTreeSet<String> {
            c.mh()
                .run(
                    host,
                    &[
                        "virsh",
                        "-q",
                        "-c",
                        "qemu:///system",
                        "list",
                        state,
                        "--name",
                    ],
                )
                .expect("virsh list")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        };
        // Every VM of the host has its (persistent) domain; those that run are the active ones.
        let want_domains: BTreeSet<String> = on_host
            .iter()
            .filter_map(|v| v["domain"].as_str().map(String::from))
            .collect();
        assert_eq!(virsh_list("--all"), want_domains, "domains on {host}");
        let want_active: BTreeSet<String> = on_host
            .iter()
            .filter(|v| v["state"] == "running" || v["state"] == "paused")
            .filter_map(|v| v["domain"].as_str().map(String::from))
            .collect();
        let mut active = virsh_list("--state-running");
        active.extend(virsh_list("--state-paused"));
        assert_eq!(active, want_active, "running domains on {host}");
        let dirs = dir_names(&c.pool(host).join("vms"));
        let want_dirs: BTreeSet<String> = on_host
            .iter()
            .filter_map(|v| v["id"].as_str().map(String::from))
            .collect();
        assert_eq!(dirs, want_dirs, "VM directories (disks, seeds) on {host}");
        let taps: BTreeSet<String> = devices(&c, host, "tun")
            .into_iter()
            .filter(|t| t.starts_with("tkv"))
            .collect();
        let want_taps: BTreeSet<String> = on_host
            .iter()
            .filter(|v| v["state"] == "running" || v["state"] == "paused")
            .flat_map(|v| v["addresses"].as_array().cloned().unwrap_or_default())
            .map(|a| tuchka_core::names::tap_name(a["mac"].as_str().unwrap_or_default()))
            .collect();
        assert_eq!(taps, want_taps, "taps on {host}");
        // A network is on a host when it is its gateway host or runs one of its VMs.
        let here: Vec<&Value> = net_detail
            .iter()
            .filter(|n| {
                n["gateway_host"] == host
                    || on_host.iter().any(|v| {
                        v["addresses"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x["network"] == n["name"]))
                    })
            })
            .collect();
        let bridges: BTreeSet<String> = devices(&c, host, "bridge")
            .into_iter()
            .filter(|b| b.starts_with("tk"))
            .collect();
        let want_bridges: BTreeSet<String> = here
            .iter()
            .filter_map(|n| n["bridge"].as_str().map(String::from))
            .collect();
        assert_eq!(bridges, want_bridges, "bridges on {host}");
        let vxlans = devices(&c, host, "vxlan");
        for vx in &vxlans {
            assert!(
                here.iter().any(|n| format!("vx{}", n["vni"]) == *vx),
                "VXLAN device {vx} on {host} of no network there ({vxlans:?})"
            );
        }
        let net_dirs = dir_names(&c.pool(host).join("net"));
        let want_net_dirs: BTreeSet<String> = here
            .iter()
            .filter_map(|n| n["name"].as_str().map(String::from))
            .collect();
        assert_eq!(net_dirs, want_net_dirs, "network directories on {host}");
        for n in &here {
            let name = n["name"].as_str().unwrap_or_default();
            let dir = c.pool(host).join("net").join(name);
            let pid = std::fs::read_to_string(dir.join("dnsmasq.pid")).unwrap_or_default();
            let dnsmasq_runs = pid
                .trim()
                .parse::<u32>()
                .is_ok_and(tuchka_testkit::multihost::process_is_running);
            assert_eq!(
                dnsmasq_runs,
                n["gateway_host"] == host,
                "dnsmasq of {name} on {host} (runs only on its gateway host)"
            );
            let leases = std::fs::read_to_string(dir.join("leases")).unwrap_or_default();
            for l in leases.lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (mac, ip) = (
                    f.get(1).copied().unwrap_or(""),
                    f.get(2).copied().unwrap_or(""),
                );
                assert!(
                    reservations
                        .get(name)
                        .is_some_and(|r| r.contains(&(mac.to_lowercase(), ip.to_string()))),
                    "lease {l:?} of {name} on {host} belongs to no VM"
                );
            }
        }
    }

    // Rows: every VM row is a VM the API shows; NICs, forwards and rules point at real things.
    let count = |sql: &str| -> i64 {
        store
            .conn()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    assert_eq!(
        count("SELECT count(*) FROM vms") as usize,
        vms.len(),
        "VM rows vs vm list"
    );
    assert_eq!(
        count("SELECT count(*) FROM nics WHERE vm_id NOT IN (SELECT id FROM vms)"),
        0,
        "NIC rows of no VM"
    );
    assert_eq!(
        count("SELECT count(*) FROM networks") as usize,
        nets.len(),
        "network rows vs net list"
    );
    assert_eq!(
        count("SELECT count(*) FROM groups") as usize,
        list(&c, "group").len(),
        "group rows vs group list"
    );
    eprintln!(
        "chaos: seed {seed}: {} VMs, {} networks, all accounted for; {:.0}s in all",
        vms.len(),
        nets.len(),
        started.elapsed().as_secs_f64()
    );
}
