//! Many hosts, one cloud, for real: three simulated hosts (each a network + mount namespace with
//! its own libvirtd, from `tuchka-testkit`), the controller in the fabric namespace serving HTTPS,
//! an agent per host joined with the join token and the pinned fingerprint. TCG guests.
//!
//! Checked as a user would: three hosts up with real capacity; a spread group lands 2 per host, a
//! pack group fills one host, an anti-affinity group larger than the cluster is refused and
//! leaves nothing; VMs of one network on different hosts reach each other by name (DHCP, DNS and
//! L2 over VXLAN from the gateway host) while another network stays isolated; a killed agent's
//! host goes down, gets nothing new, keeps its VMs, and comes back up with the same VMs.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/metrics.rs"]
mod metrics;

use std::collections::HashMap;
use std::time::Duration;

use cluster::Cluster;

#[test]
fn three_hosts_one_cloud() {
    let image = common::test_image();
    let mut c = Cluster::start(3);
    c.wait_hosts_up(3);
    for h in c.hosts() {
        assert!(
            h["cpus"].as_u64().unwrap_or(0) > 0 && h["memory_mib"].as_u64().unwrap_or(0) > 1024,
            "{h}"
        );
        assert!(h["disk_mib"].as_u64().unwrap_or(0) > 0, "{h}");
        assert_eq!(h["accel"], "tcg");
        assert!(
            h["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.250.")),
            "the host's underlay address: {h}"
        );
        assert!(h["memory_available_mib"].as_u64().unwrap_or(0) > 0, "{h}");
    }
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("p"),
        "--name",
        "tiny",
    ]);
    c.ok(&["net", "create", "app", "--cidr", "10.91.0.0/24", "--wait"]);
    c.ok(&["net", "create", "other", "--cidr", "10.92.0.0/24", "--wait"]);

    // An anti-affinity group larger than the cluster is refused and leaves nothing.
    let r = c.tk(&[
        "group",
        "create",
        "aa",
        "--image",
        "tiny",
        "--count",
        "4",
        "--anti-affinity",
        "--memory",
        "128M",
        "--net",
        "app",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.err.contains("anti-affinity"), "{}", r.err);
    assert!(c.vms().is_empty());

    // Spread: 2 per host. Every VM probes every other by name.
    let names: Vec<String> = (0..6).map(|i| format!("tcp:web-{i}.app")).collect();
    let ud = c.dir.join("probe.sh");
    std::fs::write(&ud, common::probe_script(&names)).expect("user-data");
    c.ok(&[
        "group",
        "create",
        "web",
        "--image",
        "tiny",
        "--count",
        "6",
        "--memory",
        "128M",
        "--net",
        "app",
        "--placement",
        "spread",
        "--user-data",
        ud.to_str().expect("p"),
        "--wait",
    ]);
    let spread = c.per_host("web");
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|n| *n == 2), "{spread:?}");
    let why = c.ok(&["vm", "show", "web-0", "-o", "json"]).json()["placement_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("spread"), "vm show tells why: {why}");

    // Cross-host L2 + DHCP + DNS: web-0 reaches all six by name, each answering with its own name.
    let web_hosts: HashMap<String, String> = c
        .vms()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                v["host"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let console_of = |vm: &str| -> String {
        let host = &web_hosts[vm];
        let id = c.ok(&["vm", "show", vm, "-o", "json"]).json()["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        c.console(host, &id)
    };
    c.wait_for(
        "web-0 to reach all six VMs across hosts by name",
        Duration::from_secs(240),
        || {
            let log = console_of("web-0").replace('\r', "");
            let Some(round) = log
                .lines()
                .filter_map(|l| l.split("PROBE-DONE ").nth(1))
                .filter_map(|n| n.trim().parse::<u32>().ok())
                .max()
            else {
                return false;
            };
            (0..6).all(|i| log.contains(&format!("PROBE {round} tcp web-{i}.app ok web-{i}")))
        },
    );

    // Another network on these hosts stays isolated from app.
    let web3_ip = c.ok(&["vm", "show", "web-3", "-o", "json"]).json()["addresses"][0]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ud2 = c.dir.join("iso.sh");
    std::fs::write(&ud2, common::probe_script(&[format!("tcp:{web3_ip}")])).expect("user-data");
    c.ok(&[
        "group",
        "create",
        "iso",
        "--image",
        "tiny",
        "--count",
        "1",
        "--memory",
        "128M",
        "--net",
        "other",
        "--user-data",
        ud2.to_str().expect("p"),
        "--wait",
    ]);
    let iso_host = c
        .vms()
        .iter()
        .find(|v| v["name"] == "iso-0")
        .and_then(|v| v["host"].as_str().map(String::from))
        .unwrap_or_default();
    let iso_id = c.ok(&["vm", "show", "iso-0", "-o", "json"]).json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.wait_for(
        "iso-0 to finish probe rounds",
        Duration::from_secs(180),
        || {
            let log = c.console(&iso_host, &iso_id);
            log.matches("PROBE-DONE").count() >= 2 && !log.contains(&format!("tcp {web3_ip} ok"))
        },
    );

    // Pack: fills one host first.
    c.ok(&[
        "group",
        "create",
        "packed",
        "--image",
        "tiny",
        "--count",
        "2",
        "--memory",
        "128M",
        "--placement",
        "pack",
        "--wait",
    ]);
    assert_eq!(c.per_host("packed").len(), 1, "{:?}", c.per_host("packed"));

    // Each host fetched the image once.
    for h in c.hosts() {
        let cached = h["cached_images"].as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(cached, 1, "{h}");
    }

    // Consoles from any host: the controller has no agent of its own here, yet every VM's
    // console reads through it; `--follow` then shows the lines the guest prints later (its
    // probe rounds go on).
    let log = c.ok(&["vm", "console", "web-3"]).out.replace('\r', "");
    assert!(
        log.contains("TESTIMG-HOSTNAME web-3") && log.contains("TESTIMG-READY"),
        "web-3's boot, shipped from host {}: {log}",
        web_hosts["web-3"]
    );
    let last_round = |text: &str| -> u32 {
        text.lines()
            .filter_map(|l| l.split("PROBE-DONE ").nth(1))
            .filter_map(|n| n.trim().parse::<u32>().ok())
            .max()
            .unwrap_or(0)
    };
    let followed = c.dir.join("follow.txt");
    let mut follower = std::process::Command::new(common::bin())
        .arg("--socket")
        .arg(c.dir.join("tuchka.sock"))
        .args(["vm", "console", "web-3", "--follow"])
        .stdout(std::fs::File::create(&followed).expect("follow.txt"))
        .spawn()
        .expect("vm console --follow");
    c.wait_for(
        "--follow prints the log so far",
        Duration::from_secs(30),
        || std::fs::read_to_string(&followed).is_ok_and(|t| t.contains("TESTIMG-READY")),
    );
    let then = last_round(&c.ok(&["vm", "console", "web-3"]).out);
    let later = format!("PROBE-DONE {}", then + 1);
    c.wait_for(
        &format!("--follow to show {later:?}, printed after it started"),
        Duration::from_secs(90),
        || std::fs::read_to_string(&followed).is_ok_and(|t| t.contains(&later)),
    );
    follower.kill().expect("stop the follower");
    let _ = follower.wait();

    // Metrics over HTTPS: refused without the token; with it, Prometheus text whose figures
    // are what `host list` and `vm list` say.
    let url = format!("https://{}:7480/metrics", c.mh().controller_ip());
    let curl = |token: Option<&str>| -> (String, String) {
        let mut cmd = c.mh().fabric_command("curl");
        cmd.args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(c.dir.join("tls/ca.crt"));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd
            .arg(&url)
            .output()
            .expect("curl in the fabric namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (body.to_string(), code.trim().to_string())
    };
    let (_, code) = curl(None);
    assert_eq!(code, "401", "/metrics without the token");
    let token = std::fs::read_to_string(c.dir.join("token")).expect("token");
    let (body, code) = curl(Some(token.trim()));
    assert_eq!(code, "200", "{body}");
    let m = metrics::parse(&body);
    let (hosts, vms) = (c.hosts(), c.vms());
    for h in &hosts {
        let name = h["name"].as_str().unwrap_or_default();
        assert_eq!(
            m.get("tuchka_host_up", &[("host", name)]),
            Some(1.0),
            "{name}"
        );
        let placed = vms.iter().filter(|v| v["host"] == name).count() as f64;
        assert_eq!(
            m.get("tuchka_host_vms", &[("host", name)]),
            Some(placed),
            "{name}"
        );
        assert_eq!(
            m.get("tuchka_host_cpus", &[("host", name)]),
            h["cpus"].as_f64(),
            "{name}"
        );
    }
    let running = vms.iter().filter(|v| v["state"] == "running").count() as f64;
    assert_eq!(m.get("tuchka_vms", &[("state", "running")]), Some(running));
    assert!(
        m.get("tuchka_scheduler_placements_total", &[("purpose", "group")])
            .is_some_and(|n| n >= 9.0),
        "the placements of web, iso and packed are counted"
    );
    assert!(
        m.get("tuchka_scheduler_refusals_total", &[("purpose", "group")])
            .is_some_and(|n| n >= 1.0),
        "the anti-affinity refusal is counted"
    );
    assert!(
        m.get(
            "tuchka_operations_total",
            &[("kind", "group.create"), ("result", "succeeded")]
        )
        .is_some_and(|n| n >= 3.0),
        "web, iso and packed are counted as finished group.create operations"
    );
    assert!(
        m.get(
            "tuchka_api_requests_total",
            &[("method", "GET"), ("route", "/v1/hosts"), ("status", "200")]
        )
        .is_some_and(|n| n >= 1.0),
        "the `host list` calls are counted by route"
    );

    // Kill h2's agent: h2 goes down, its VMs show unknown but keep running, nothing new lands there.
    c.kill_agent("h2");
    c.wait_for("h2 down", Duration::from_secs(30), || {
        c.hosts()
            .iter()
            .any(|h| h["name"] == "h2" && h["state"] == "down")
    });
    let on_h2: Vec<String> = c
        .vms()
        .iter()
        .filter(|v| v["host"] == "h2")
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!on_h2.is_empty());
    for v in c.vms().iter().filter(|v| v["host"] == "h2") {
        assert_eq!(v["state"], "unknown", "{v}");
    }
    let running = c
        .mh()
        .run(
            "h2",
            &[
                "virsh",
                "-c",
                "qemu:///system",
                "list",
                "--name",
                "--state-running",
            ],
        )
        .expect("virsh on h2");
    assert_eq!(
        running.lines().filter(|l| !l.trim().is_empty()).count(),
        on_h2.len(),
        "VMs on h2 keep running: {running}"
    );
    c.ok(&[
        "group", "create", "late", "--image", "tiny", "--count", "2", "--memory", "128M", "--wait",
    ]);
    assert!(
        !c.per_host("late").contains_key("h2"),
        "{:?}",
        c.per_host("late")
    );

    // Restart it: up again, same VMs, running.
    c.start_agent("h2");
    c.wait_for(
        "h2 up with its VMs running",
        Duration::from_secs(60),
        || {
            c.hosts()
                .iter()
                .any(|h| h["name"] == "h2" && h["state"] == "up")
                && c.vms()
                    .iter()
                    .filter(|v| v["host"] == "h2")
                    .all(|v| v["state"] == "running")
        },
    );
    let again: Vec<String> = c
        .vms()
        .iter()
        .filter(|v| v["host"] == "h2")
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(again, on_h2);
}
