//! A network outlives its gateway host, for real: three simulated hosts; network `app` (NAT, a
//! port forward) has its gateway (DHCP, DNS, NAT, forwards) on h1, its VMs run on h2 and h3. Then
//! the whole of h1 is taken away — its libvirtd, dnsmasq, agent and every other process killed,
//! its cable pulled — and, as a user would check:
//!
//! - `host list` shows h1 down; `net show app` names a new gateway host and says it took over
//!   from h1, and the network is `ready` again;
//! - the addresses did not change, and the VMs renew their DHCP leases, resolve each other by
//!   name and reach an address outside the cloud through NAT again (their own probes, on their
//!   consoles);
//! - the port forward answers on the new gateway host's address;
//! - once no host of the cloud is up, the network is `degraded` with the reason, and a new group
//!   on it is refused with that reason.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cluster::Cluster;
use serde_json::Value;

/// The "outside" web server: an address of the fabric that is no host's (guests reach it only
/// through their gateway host's NAT).
const OUTSIDE_HOST: u8 = 200;

/// user-data: every round, renew the DHCP lease (SIGUSR1 to udhcpc, whose hook rewrites
/// `/run/net/eth0.ip` when the server answered; udhcpc itself logs nothing once in the
/// background), fetch every peer by name (DNS + L2 across hosts) and the
/// outside server (NAT), and print one line with the results and the address of eth0.
fn probe(peers: &[&str], outside: &str) -> String {
    format!(
        r#"#!/bin/sh
exec >/dev/ttyS0 2>&1
(
n=0
while true; do
  n=$((n+1))
  touch /tmp/fo.mark
  sleep 1
  kill -USR1 "$(cat /run/udhcpc.eth0.pid)" 2>/dev/null
  sleep 2
  if [ -n "$(find /run/net/eth0.ip -newer /tmp/fo.mark 2>/dev/null)" ]; then line="renew=ok"; else line="renew=fail"; fi
  for peer in {peers}; do
    body=$(timeout 3 wget -q -O - "http://$peer.app/" 2>/dev/null | head -n1)
    line="$line $peer=${{body:-fail}}"
  done
  body=$(timeout 3 wget -q -O - "http://{outside}/" 2>/dev/null | head -n1)
  ip=$(ip -4 -o addr show eth0 | awk '{{print $4}}' | cut -d/ -f1)
  echo "FO $n ip=$ip $line outside=${{body:-fail}}"
  sleep 1
done
) &
"#,
        peers = peers.join(" ")
    )
}

/// The probe lines `FO n ip=… renew=… PEER=… outside=…` of a console text, as key=value maps.
fn rounds(console: &str) -> Vec<HashMap<String, String>> {
    console
        .replace('\r', "")
        .lines()
        .filter_map(|l| l.split("FO ").nth(1))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Whether a round saw everything work: renewed, every peer answered with its name, the
/// outside answered, and the address is `ip`.
fn all_ok(r: &HashMap<String, String>, peers: &[&str], ip: &str) -> bool {
    let is = |k: &str, v: &str| r.get(k).map(String::as_str) == Some(v);
    is("renew", "ok") && peers.iter().all(|p| is(p, p)) && is("outside", "outside") && is("ip", ip)
}

#[test]
fn a_network_outlives_its_gateway_host() {
    let image = common::test_image();
    let mut c = Cluster::start(3);
    c.wait_hosts_up(3);

    // The outside: a web server on an extra address of the fabric.
    let fabric = c.mh().fabric().clone();
    let prefix = fabric.ip.octets();
    let outside_ip = format!("{}.{}.{}.{OUTSIDE_HOST}", prefix[0], prefix[1], prefix[2]);
    c.mh()
        .run(
            "fabric",
            &[
                "ip",
                "addr",
                "add",
                &format!("{outside_ip}/24"),
                "dev",
                &fabric.bridge,
            ],
        )
        .expect("outside address");
    let www = c.dir.join("outside-www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "outside\n").expect("index");
    let mut httpd = c
        .mh()
        .spawn_in_fabric(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            &format!("{outside_ip}:8000"),
            "-h",
            www.to_str().expect("p"),
        ])
        .expect("busybox httpd in the fabric");
    let outside = format!("{outside_ip}:8000");

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
        "app",
        "--cidr",
        "10.93.0.0/24",
        "--nat",
        "--wait",
    ]);
    let net = |c: &Cluster| -> Value { c.ok(&["net", "show", "app", "-o", "json"]).json() };
    assert_eq!(net(&c)["gateway_host"], "h1", "{}", net(&c));
    // The VMs go to h2 and h3 only: h1 takes nothing new.
    c.ok(&["host", "drain", "h1", "--wait"]);

    let peers = ["web-0", "web-1"];
    let ud = c.dir.join("probe.sh");
    std::fs::write(&ud, probe(&peers, &outside)).expect("user-data");
    c.ok(&[
        "group",
        "create",
        "web",
        "--image",
        "tiny",
        "--count",
        "2",
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
    let info = |vm: &str| -> (String, String, String) {
        let shown = c.ok(&["vm", "show", vm, "-o", "json"]).json();
        (
            shown["host"].as_str().unwrap_or_default().to_string(),
            shown["id"].as_str().unwrap_or_default().to_string(),
            shown["addresses"][0]["ip"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let vms = [info("web-0"), info("web-1")];
    let mut placed = [vms[0].0.clone(), vms[1].0.clone()];
    placed.sort();
    assert_eq!(placed, ["h2", "h3"], "one VM on each of h2 and h3");
    let console = |(host, id, _): &(String, String, String)| c.console(host, id);
    let working_since = |offsets: [usize; 2]| -> bool {
        vms.iter().zip(offsets).all(|(vm, from)| {
            let text = console(vm);
            rounds(text.get(from..).unwrap_or_default())
                .iter()
                .any(|r| all_ok(r, &peers, &vm.2))
        })
    };
    // On a timeout, what the guests printed tells why.
    let wait_working = |what: &str, offsets: [usize; 2]| {
        let start = Instant::now();
        while !working_since(offsets) {
            if start.elapsed() > Duration::from_secs(180) {
                let tails: Vec<String> = vms
                    .iter()
                    .map(|vm| {
                        let text = console(vm).replace('\r', "");
                        let lines: Vec<&str> = text.lines().collect();
                        format!(
                            "--- console of the VM on {} ---\n{}",
                            vm.0,
                            lines[lines.len().saturating_sub(25)..].join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}\n{}\n{}",
                    tails.join("\n"),
                    c.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_working(
        "both VMs to renew, resolve each other and reach the outside through h1",
        [0, 0],
    );

    // A port forward on the gateway host to web-1's web server.
    c.ok(&[
        "net",
        "forward",
        "add",
        "app",
        "--host-port",
        "8080",
        "--to",
        "web-1:80",
    ]);
    let address_of = |c: &Cluster, host: &str| -> String {
        c.hosts()
            .iter()
            .find(|h| h["name"] == host)
            .and_then(|h| h["address"].as_str().map(String::from))
            .unwrap_or_default()
    };
    let fetch = |c: &Cluster, url: &str| -> String {
        let out = c
            .mh()
            .exec("fabric", &["curl", "-s", "--max-time", "3", url])
            .expect("curl in the fabric");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let h1_url = format!("http://{}:8080/", address_of(&c, "h1"));
    c.wait_for("the forward on h1", Duration::from_secs(60), || {
        fetch(&c, &h1_url) == "web-1"
    });

    // h1's machine dies.
    let offsets = [console(&vms[0]).len(), console(&vms[1]).len()];
    let gone = Instant::now();
    c.mh().kill_host("h1").expect("take h1 away");
    c.wait_for("h1 down", Duration::from_secs(60), || {
        c.hosts()
            .iter()
            .any(|h| h["name"] == "h1" && h["state"] == "down")
    });
    let mut moved = Value::Null;
    c.wait_for(
        "another host to take the gateway of app over, ready",
        Duration::from_secs(60),
        || {
            moved = net(&c);
            moved["gateway_host"] != "h1" && moved["state"] == "ready"
        },
    );
    let took_over = gone.elapsed();
    let new_gw = moved["gateway_host"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(["h2", "h3"].contains(&new_gw.as_str()), "{moved}");
    assert_eq!(moved["gateway_moved_from"], "h1", "{moved}");
    assert!(moved["gateway_moved_at"].is_string(), "{moved}");
    let shown = c.ok(&["net", "show", "app"]).out;
    assert!(
        shown.contains(&format!("{new_gw} (took over from h1")),
        "net show says where the gateway went and why:\n{shown}"
    );
    assert!(
        moved["forwards"]
            .as_array()
            .is_some_and(|fs| fs.len() == 1 && fs[0]["host"] == new_gw.as_str()),
        "the forward moved with the gateway: {moved}"
    );
    let addresses: Vec<String> = moved["addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["ip"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        vms.iter().all(|vm| addresses.contains(&vm.2)),
        "reservations kept: {addresses:?} vs {vms:?}"
    );

    // The guests carry on: lease renewed, names resolved, NAT out — with the same addresses.
    wait_working(
        "both VMs to renew, resolve and reach the outside again through the new gateway",
        offsets,
    );
    let recovered = gone.elapsed();
    let new_url = format!("http://{}:8080/", address_of(&c, &new_gw));
    c.wait_for(
        "the forward on the new gateway host",
        Duration::from_secs(60),
        || fetch(&c, &new_url) == "web-1",
    );
    eprintln!(
        "failover: gateway role on {new_gw} and ready {:.1}s after h1 died; both guests fully \
         working again after {:.1}s (a host is down after --down-after 6 s)",
        took_over.as_secs_f64(),
        recovered.as_secs_f64()
    );

    // No host left to take the role: degraded, and new VMs on it are refused with the reason.
    c.kill_agent("h2");
    c.kill_agent("h3");
    c.wait_for("app degraded", Duration::from_secs(60), || {
        net(&c)["state"] == "degraded"
    });
    let why = net(&c)["error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains(&format!("gateway host {new_gw} is down")),
        "the reason: {why}"
    );
    let r = c.tk(&[
        "group", "create", "late", "--image", "tiny", "--count", "1", "--memory", "128M", "--net",
        "app",
    ]);
    assert_ne!(r.code, 0, "{}", r.out);
    assert!(
        r.err.contains("degraded") && r.err.contains(&format!("gateway host {new_gw} is down")),
        "{}",
        r.err
    );
    assert!(
        !c.vms().iter().any(|v| v["group"] == "late"),
        "a refused group leaves nothing"
    );
    let _ = httpd.kill();
    let _ = httpd.wait();
}
