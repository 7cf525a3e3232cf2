//! Virtual networks with access rules, for real: TCG guests on two networks, an "outside world"
//! network namespace connected to the host by a veth (nothing leaves the machine), and probes
//! that the guests run themselves (their user-data loops over targets and prints `PROBE` lines
//! on the serial console).
//!
//! Checked the way a user would: who answers HTTP and ping, from where, before and after rules,
//! forwards and NAT; then drift (killed dnsmasq, deleted bridge, flushed firewall table) heals.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::{probe_script, sh, Cloud, Outside, HOST_ADDR, OUTSIDE_ADDR};

/// Results of the latest complete probe round of a VM: "tcp ADDR" → Some(body) | None.
fn latest(c: &Cloud, vm: &str) -> Option<(u32, HashMap<String, Option<String>>)> {
    let log = c.tk(&["vm", "console", vm]).out.replace('\r', "");
    let round = log
        .lines()
        .filter_map(|l| l.find("PROBE-DONE ").map(|i| &l[i + 11..]))
        .filter_map(|n| n.trim().parse::<u32>().ok())
        .max()?;
    let mut out = HashMap::new();
    let prefix = format!("PROBE {round} ");
    for l in log.lines() {
        let Some(i) = l.find(&prefix) else { continue };
        let parts: Vec<&str> = l[i + prefix.len()..].splitn(4, ' ').collect();
        if parts.len() >= 3 {
            let ok = parts[2] == "ok";
            out.insert(
                format!("{} {}", parts[0], parts[1]),
                ok.then(|| parts.get(3).unwrap_or(&"").to_string()),
            );
        }
    }
    Some((round, out))
}

/// Wait until a fresh probe round (started after now) of `vm` shows `key` as `want`.
fn expect_probe(c: &Cloud, vm: &str, key: &str, want: bool, body: Option<&str>) {
    let start_round = latest(c, vm).map(|(n, _)| n).unwrap_or(0);
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some((n, r)) = latest(c, vm) {
            if n > start_round {
                let v = r.get(key).cloned();
                last = Some(v.clone());
                let ok = matches!(&v, Some(Some(_)));
                let body_ok = body.is_none_or(|b| matches!(&v, Some(Some(x)) if x == b));
                if ok == want && (!want || body_ok) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{vm}: probe {key} should be {} (body {body:?}); last seen {last:?}\n{}",
        if want { "ok" } else { "fail" },
        c.log_tail()
    );
}

fn wait_outside(c: &Cloud, o: &Outside, url: &str, want: Option<&str>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = o.get(url);
        if last.as_deref() == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "from outside, {url} should answer {want:?}, got {last:?}\n{}",
        c.log_tail()
    );
}

#[test]
fn rules_forwards_nat_and_drift() {
    let image = common::test_image();
    let p = std::process::id();
    let (a, b) = (50 + p % 100, (p / 100) % 250);
    let app = format!("10.{a}.{b}.0/24");
    let db = format!("10.{}.{b}.0/24", a + 100);
    let ip = |cidr: &str, host: u8| {
        format!(
            "{}.{host}",
            cidr.rsplit_once('.').map(|x| x.0).unwrap_or_default()
        )
    };
    let (web0, web1, pg0) = (ip(&app, 2), ip(&app, 3), ip(&db, 2));

    let outside = Outside::start(&[&app, &db]);
    let c = Cloud::start("net");
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    c.ok(&["net", "create", "app", "--cidr", &app, "--nat", "--wait"]);
    c.track_network("app");
    c.ok(&["net", "create", "db", "--cidr", &db, "--wait"]);
    c.track_network("db");

    let web_probe = c.dir.join("web.sh");
    std::fs::write(
        &web_probe,
        probe_script(&[
            "tcp:web-0.app".into(),
            "tcp:web-1.app".into(),
            format!("tcp:{pg0}"),
            format!("icmp:{pg0}"),
            format!("tcp:{OUTSIDE_ADDR}:8000"),
        ]),
    )
    .expect("user-data");
    let pg_probe = c.dir.join("pg.sh");
    std::fs::write(
        &pg_probe,
        probe_script(&[
            format!("tcp:{web0}"),
            format!("icmp:{web0}"),
            format!("tcp:{OUTSIDE_ADDR}:8000"),
        ]),
    )
    .expect("user-data");
    let web_ud = web_probe.to_str().expect("p").to_string();
    let pg_ud = pg_probe.to_str().expect("p").to_string();
    c.ok(&[
        "group",
        "create",
        "web",
        "--image",
        "tiny",
        "--count",
        "2",
        "--memory",
        "160M",
        "--net",
        "app",
        "--user-data",
        &web_ud,
        "--wait",
    ]);
    c.ok(&[
        "group",
        "create",
        "pg",
        "--image",
        "tiny",
        "--count",
        "1",
        "--memory",
        "160M",
        "--net",
        "db",
        "--user-data",
        &pg_ud,
        "--wait",
    ]);
    assert_eq!(c.ip("web-0").to_string(), web0);
    assert_eq!(c.ip("web-1").to_string(), web1);
    assert_eq!(c.ip("pg-0").to_string(), pg0);

    // Same network: by DNS name; other network: nothing, either way; NAT only where asked.
    expect_probe(&c, "web-0", "tcp web-1.app", true, Some("web-1"));
    expect_probe(&c, "web-1", "tcp web-0.app", true, Some("web-0"));
    expect_probe(&c, "web-0", &format!("tcp {pg0}"), false, None);
    expect_probe(&c, "web-0", &format!("icmp {pg0}"), false, None);
    expect_probe(&c, "pg-0", &format!("tcp {web0}"), false, None);
    expect_probe(&c, "pg-0", &format!("icmp {web0}"), false, None);
    expect_probe(
        &c,
        "web-0",
        &format!("tcp {OUTSIDE_ADDR}:8000"),
        true,
        Some("outside"),
    );
    expect_probe(&c, "pg-0", &format!("tcp {OUTSIDE_ADDR}:8000"), false, None);

    // From outside: closed; a rule for another CIDR does not open it; 0.0.0.0/0 does; rm closes.
    let url = format!("http://{web0}/");
    wait_outside(&c, &outside, &url, None);
    let other = c
        .ok(&[
            "net",
            "rule",
            "add",
            "app",
            "--allow",
            "tcp:80",
            "--from",
            "192.0.2.0/24",
            "-o",
            "json",
        ])
        .json();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        outside.get(&url),
        None,
        "a rule for a CIDR the client is not in opens nothing"
    );
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
    let rule_id = rule["id"].as_str().expect("id").to_string();
    wait_outside(&c, &outside, &url, Some("web-0"));
    c.ok(&["net", "rule", "rm", "app", &rule_id]);
    wait_outside(&c, &outside, &url, None);
    c.ok(&[
        "net",
        "rule",
        "rm",
        "app",
        other["id"].as_str().expect("id"),
    ]);

    // Between groups: web may reach pg, not the reverse.
    c.ok(&[
        "net",
        "rule",
        "add",
        "db",
        "--allow",
        "tcp:80",
        "--from-group",
        "web",
        "--to-group",
        "pg",
    ]);
    c.ok(&[
        "net",
        "rule",
        "add",
        "db",
        "--allow",
        "icmp",
        "--from-group",
        "web",
        "--to-group",
        "pg",
    ]);
    expect_probe(&c, "web-0", &format!("tcp {pg0}"), true, Some("pg-0"));
    expect_probe(&c, "web-1", &format!("icmp {pg0}"), true, None);
    expect_probe(&c, "pg-0", &format!("tcp {web0}"), false, None);
    expect_probe(&c, "pg-0", &format!("icmp {web0}"), false, None);
    let shown = c.ok(&["net", "show", "db"]).out;
    assert!(
        shown.contains("group web") && shown.contains("icmp"),
        "{shown}"
    );

    // Outbound rules: a deny-out wins over NAT; removing it restores access.
    let deny = c
        .ok(&[
            "net",
            "rule",
            "add",
            "app",
            "--deny-out",
            "tcp:8000",
            "--to",
            "198.51.100.0/24",
            "-o",
            "json",
        ])
        .json();
    expect_probe(
        &c,
        "web-0",
        &format!("tcp {OUTSIDE_ADDR}:8000"),
        false,
        None,
    );
    c.ok(&["net", "rule", "rm", "app", deny["id"].as_str().expect("id")]);
    expect_probe(
        &c,
        "web-0",
        &format!("tcp {OUTSIDE_ADDR}:8000"),
        true,
        Some("outside"),
    );

    // A forward host:8080 → web-0:80 answers from outside.
    c.ok(&[
        "net",
        "forward",
        "add",
        "app",
        "--host-port",
        "8080",
        "--to",
        "web-0:80",
    ]);
    let fwd = format!("http://{HOST_ADDR}:8080/");
    wait_outside(&c, &outside, &fwd, Some("web-0"));
    let err = c.fails(&[
        "net",
        "forward",
        "add",
        "app",
        "--host-port",
        "8080",
        "--to",
        "web-1:80",
    ]);
    assert!(err.contains("already forwarded"), "{err}");

    // Drift: kill dnsmasq, delete the bridge, flush the firewall table — the next pass heals.
    let net = c.ok(&["net", "show", "app", "-o", "json"]).json();
    let bridge = net["bridge"].as_str().expect("bridge").to_string();
    let pidfile = c.dir.join("pool/net/app/dnsmasq.pid");
    let pid = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .to_string();
    sh(&["kill", &pid]);
    sh(&["ip", "link", "del", &bridge]);
    let tables = String::from_utf8_lossy(
        &Command::new("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft")
            .stdout,
    )
    .into_owned();
    let table = tables
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .find(|t| {
            let body = Command::new("nft")
                .args(["list", "table", "inet", t])
                .output()
                .expect("nft")
                .stdout;
            String::from_utf8_lossy(&body).contains(&bridge)
        })
        .expect("the cloud's firewall table")
        .to_string();
    sh(&["nft", "flush", "table", "inet", &table]);
    c.wait_for("the bridge to come back", Duration::from_secs(30), || {
        common::link_exists(&bridge)
    });
    c.wait_for("dnsmasq to be restarted", Duration::from_secs(30), || {
        let new = std::fs::read_to_string(&pidfile)
            .unwrap_or_default()
            .trim()
            .to_string();
        !new.is_empty()
            && new != pid
            && std::fs::read_to_string(format!("/proc/{new}/cmdline"))
                .unwrap_or_default()
                .contains("dnsmasq")
    });
    wait_outside(&c, &outside, &fwd, Some("web-0"));
    expect_probe(&c, "web-0", "tcp web-1.app", true, Some("web-1"));
    expect_probe(&c, "web-0", &format!("tcp {pg0}"), true, Some("pg-0"));
    expect_probe(&c, "pg-0", &format!("tcp {web0}"), false, None);
    assert_eq!(
        outside.get(&url),
        None,
        "port 80 is closed again from outside"
    );

    // Removing the VM removes its forward.
    c.ok(&["group", "rm", "web", "--wait"]);
    assert_eq!(
        c.ok(&["net", "forward", "list", "app", "-o", "json"])
            .json(),
        serde_json::json!([])
    );
    wait_outside(&c, &outside, &fwd, None);
}
