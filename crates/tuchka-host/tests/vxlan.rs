//! One network across three simulated hosts over VXLAN, against the real kernel.
//!
//! Topology (every object is a network namespace or lives in one; the root namespace only gets
//! the namespace names, and nothing is routed anywhere):
//!
//! ```text
//! tkt<id>f  fabric: bridge fab0 (MTU 1500, like a LAN)
//!   ├─ tkt<id>a  host A 10.99.0.11 — the network's gateway (10.98.0.1 + dnsmasq); "VM" v1
//!   ├─ tkt<id>b  host B 10.99.0.12 — "VM" v2 gets its address by DHCP from A over VXLAN
//!   ├─ tkt<id>c  host C 10.99.0.13 — on the network, no VM
//!   └─ tkt<id>d  host D 10.99.0.14 — only for the rollback case (its dnsmasq cannot start)
//! tkt<id>v1 / tkt<id>v2: "VMs", a veth on their host's bridge, busybox httpd on port 80
//! ```
//!
//! The scenario: converge A, B, C (device, FDB, MTU, alias, firewall present); a second pass
//! changes nothing; DHCP, ping, HTTP (256 KiB) and DNS between the VMs across hosts, through
//! the firewall (a probe rule counts the bridged packets); a peer leaving B's desired state
//! loses its FDB entry and traffic stops; no peers, no device; B's underlay address changes
//! (device recreated); with the underlay filter on (`ensure_underlay`), VXLAN still flows between
//! peers and stops from a host that is not one; a source address the host does not have is
//! refused; a failed first call on D leaves no device behind; `remove_network` deletes device
//! and bridge.
//!
//! The dataplane code has to run inside a host's namespace, so every `ensure_network` /
//! `remove_network` is a step: the test binary re-runs itself with `ip netns exec <host>` and
//! [`ENV_STEP`] naming a JSON file with the step; the inner run performs it with a
//! [`LinuxDataplane`] on that host's pool and prints the outcome. The outer run builds the
//! namespaces, checks what a user would check (`ip -d link`, `bridge fdb`, DHCP, ping, HTTP,
//! DNS across hosts) and removes everything on drop — servers and dnsmasq by pid, then the
//! fabric veths, then every `tkt<id>*` namespace — even when an assertion fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::{sh, wait_for, Scratch};
use serde::{Deserialize, Serialize};
use tuchka_api::agent::{DhcpHost, NetworkDesired, VxlanDesired};
use tuchka_host::net::Underlay;
use tuchka_host::{Dataplane, LinuxDataplane};

/// Set in the inner run: the path of the [`Step`] file to perform.
const ENV_STEP: &str = "TKT_VXLAN_STEP";
/// What the inner run prints before the step's outcome (`ok` or the error chain).
const RESULT: &str = "TKT-VXLAN-RESULT ";
const TEST: &str = "one_network_spans_three_hosts_over_vxlan";

const VNI: u32 = 4242;
const VX: &str = "vx4242";
const MTU: u32 = 1450;
const CIDR: &str = "10.98.0.0/24";
const GATEWAY: &str = "10.98.0.1";
const VM1_IP: &str = "10.98.0.10";
const VM1_MAC: &str = "52:54:00:98:00:0a";
const VM2_IP: &str = "10.98.0.20";
const VM2_MAC: &str = "52:54:00:98:00:14";
const A_IP: &str = "10.99.0.11";
const B_IP: &str = "10.99.0.12";
const C_IP: &str = "10.99.0.13";
const D_IP: &str = "10.99.0.14";
/// Host tags: A, B and C carry the network; D only tries (the rollback case).
const HOSTS: [&str; 4] = ["a", "b", "c", "d"];
/// A second address of host B, for the "underlay address changed" step.
const B_IP2: &str = "10.99.0.22";
const ZERO_MAC: &str = "00:00:00:00:00:00";

/// One dataplane call inside a host namespace.
#[derive(Debug, Serialize, Deserialize)]
struct Step {
    pool: PathBuf,
    cloud: String,
    op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Ensure(Box<NetworkDesired>),
    Remove(String),
    Underlay(Underlay),
}

fn require() {
    common::require_root();
    common::require_tool("ip", "iproute2");
    common::require_tool("bridge", "iproute2");
    common::require_tool("nft", "nftables");
    common::require_tool("dnsmasq", "dnsmasq-base");
    common::require_tool("busybox", "busybox-static");
    common::require_tool("curl", "curl");
    assert!(
        Path::new("/sys/module/vxlan").exists() || sh("modprobe", &["vxlan"]).0,
        "the kernel has no vxlan support (modprobe vxlan failed)"
    );
}

/// The inner run: perform the step in this (host) namespace and print the outcome.
fn run_step(path: &str) {
    let text = std::fs::read_to_string(path).expect("read the step file");
    let step: Step = serde_json::from_str(&text).expect("parse the step file");
    let dp = LinuxDataplane::new(&step.pool, &step.cloud);
    let result = match &step.op {
        Op::Ensure(net) => dp.ensure_network(net),
        Op::Remove(name) => dp.remove_network(name),
        Op::Underlay(u) => dp.ensure_underlay(u),
    };
    match result {
        Ok(()) => println!("{RESULT}ok"),
        Err(e) => println!("{RESULT}{}", e.chain()),
    }
}

/// The namespaces, servers and pools of one run; everything is removed on drop.
struct World {
    prefix: String,
    scratch: PathBuf,
    cloud: String,
    servers: Vec<Child>,
    steps: u32,
}

impl World {
    fn new(prefix: String, scratch: PathBuf) -> Self {
        World {
            prefix,
            scratch,
            cloud: common::cloud_id(),
            servers: Vec::new(),
            steps: 0,
        }
    }

    /// `tkt<id><tag>`.
    fn name(&self, tag: &str) -> String {
        format!("{}{tag}", self.prefix)
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new(tuchka_host::cmd::tool("ip"))
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `args` inside namespace `ns`; (success, stdout + stderr).
    fn exec(&self, ns: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(tuchka_host::cmd::tool("ip"))
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The fabric namespace with bridge `fab0`.
    fn fabric(&self) {
        let f = self.name("f");
        self.ip(&["netns", "add", &f]);
        self.ip(&["-n", &f, "link", "add", "fab0", "type", "bridge"]);
        self.ip(&["-n", &f, "link", "set", "fab0", "up"]);
        self.ip(&["-n", &f, "link", "set", "lo", "up"]);
    }

    /// Host namespace `tkt<id><tag>`: `eth0` with `addr`/24 on the fabric (its peer, named
    /// like the host, is a port of `fab0`).
    fn host(&self, tag: &str, addr: &str) -> String {
        let (f, h) = (self.name("f"), self.name(tag));
        self.ip(&["netns", "add", &h]);
        self.ip(&[
            "-n", &f, "link", "add", &h, "type", "veth", "peer", "name", "eth0", "netns", &h,
        ]);
        self.ip(&["-n", &f, "link", "set", &h, "master", "fab0", "up"]);
        self.ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        self.ip(&["-n", &h, "link", "set", "eth0", "up"]);
        self.ip(&["-n", &h, "link", "set", "lo", "up"]);
        h
    }

    /// "VM" namespace `tkt<id><tag>` plugged into `bridge` of host `host` (veth `tkt<id><tag>`
    /// there, `eth0` with `mac` and MTU 1450 inside), serving `tag` over HTTP. `addr` (CIDR)
    /// is configured statically; `None` leaves that to DHCP.
    fn vm(&mut self, host: &str, bridge: &str, tag: &str, mac: &str, addr: Option<&str>) -> String {
        let v = self.name(tag);
        let mtu = MTU.to_string();
        self.ip(&["netns", "add", &v]);
        self.ip(&[
            "-n", host, "link", "add", &v, "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
            "mtu", &mtu, "address", mac, "netns", &v,
        ]);
        self.ip(&["-n", host, "link", "set", &v, "master", bridge, "up"]);
        if let Some(a) = addr {
            self.ip(&["-n", &v, "addr", "add", a, "dev", "eth0"]);
        }
        self.ip(&["-n", &v, "link", "set", "eth0", "up"]);
        self.ip(&["-n", &v, "link", "set", "lo", "up"]);
        self.serve(&v, tag);
        v
    }

    /// `busybox httpd` on port 80 in `ns`: `/` answers `body`, `/big` is 256 KiB of data.
    fn serve(&mut self, ns: &str, body: &str) {
        self.serve_on(ns, body, "80", 80);
    }

    /// `busybox httpd -p listen` in `ns`, waiting until port `port` listens.
    fn serve_on(&mut self, ns: &str, body: &str, listen: &str, port: u16) {
        let root = self.scratch.join(format!("www-{ns}-{port}"));
        std::fs::create_dir_all(&root).expect("www dir");
        std::fs::write(root.join("index.html"), body).expect("index");
        std::fs::write(root.join("big"), big_file()).expect("big file");
        let child = Command::new(tuchka_host::cmd::tool("ip"))
            .args([
                "netns", "exec", ns, "busybox", "httpd", "-f", "-p", listen, "-h",
            ])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        self.servers.push(child);
        let up = wait_for(5, || {
            let (_, tcp) = self.exec(ns, &["cat", "/proc/net/tcp", "/proc/net/tcp6"]);
            // Local address field `…:PORT` in hex, state 0A = LISTEN.
            let local = format!(":{port:04X}");
            tcp.lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.get(1).is_some_and(|a| a.ends_with(&local)) && f.get(3) == Some(&"0A")
                })
                .then_some(())
        });
        assert!(up.is_some(), "httpd in {ns} listens on {listen}");
    }

    /// Run one dataplane step in host namespace `host`; Ok or the error chain.
    fn step(&mut self, host: &str, op: Op) -> Result<(), String> {
        self.steps += 1;
        let step = Step {
            pool: self.scratch.join(host).join("pool"),
            cloud: self.cloud.clone(),
            op,
        };
        let file = self.scratch.join(format!("step-{}.json", self.steps));
        std::fs::write(&file, serde_json::to_vec(&step).expect("step json")).expect("step file");
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(tuchka_host::cmd::tool("ip"))
            .args(["netns", "exec", host])
            .arg(&exe)
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_STEP, &file)
            .stdin(Stdio::null())
            .output()
            .expect("run the step inside its host namespace");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "step {step:?} crashed inside {host}:\n{text}"
        );
        let result = text
            .lines()
            .find_map(|l| l.split_once(RESULT).map(|(_, r)| r))
            .unwrap_or_else(|| panic!("step in {host} printed no result:\n{text}"));
        if result == "ok" {
            Ok(())
        } else {
            Err(result.to_string())
        }
    }

    /// `ensure_underlay` on `host` with the default ports and `peers`.
    #[track_caller]
    fn underlay(&mut self, host: &str, peers: &[&str]) {
        let peers = peers.iter().map(|p| p.parse().expect("ip")).collect();
        if let Err(e) = self.step(host, Op::Underlay(Underlay::new(peers))) {
            panic!("ensure_underlay on {host}: {e}");
        }
    }

    #[track_caller]
    fn ensure(&mut self, host: &str, net: &NetworkDesired) {
        let t = Instant::now();
        if let Err(e) = self.step(host, Op::Ensure(Box::new(net.clone()))) {
            panic!("ensure_network {} on {host}: {e}", net.name);
        }
        eprintln!("ensure_network on {host}: {:?}", t.elapsed());
    }

    #[track_caller]
    fn remove(&mut self, host: &str, name: &str) {
        let t = Instant::now();
        let _log = Defer(move || eprintln!("remove_network on {host}: {:?}", t.elapsed()));
        if let Err(e) = self.step(host, Op::Remove(name.to_string())) {
            panic!("remove_network {name} on {host}: {e}");
        }
    }

    /// `ip -d link show dev` in `ns` as JSON, `None` when the device does not exist.
    fn link(&self, ns: &str, dev: &str) -> Option<serde_json::Value> {
        let (ok, out) = self.exec(ns, &["ip", "-j", "-d", "link", "show", "dev", dev]);
        if !ok {
            return None;
        }
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()?
            .get(0)
            .cloned()
    }

    /// The destinations of the all-zeros FDB entries of `dev` in `ns`, sorted.
    fn flood_fdb(&self, ns: &str, dev: &str) -> Vec<String> {
        let (ok, out) = self.exec(ns, &["bridge", "-j", "fdb", "show", "dev", dev]);
        assert!(ok, "bridge fdb show dev {dev} in {ns}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("bridge fdb json");
        let mut dsts: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["mac"] == ZERO_MAC)
            .map(|e| e["dst"].as_str().unwrap_or("?").to_string())
            .collect();
        dsts.sort();
        dsts
    }

    /// Whether `ns` gets an answer to a ping of `ip` within 2 s.
    fn ping(&self, ns: &str, ip: &str) -> bool {
        let t = Instant::now();
        let ok = self
            .exec(
                ns,
                &["busybox", "ping", "-c", "1", "-w", "2", "-W", "2", ip],
            )
            .0;
        eprintln!("ping {ip} from {ns}: {ok} in {:?}", t.elapsed());
        ok
    }

    /// GET `url` from namespace `ns`; the body, or `None`.
    fn fetch(&self, ns: &str, url: &str) -> Option<Vec<u8>> {
        let out = Command::new(tuchka_host::cmd::tool("ip"))
            .args(["netns", "exec", ns, "curl", "-sf", "--noproxy", "*"])
            .args(["--connect-timeout", "2", "--max-time", "10", url])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// The dnsmasq of every network of every host pool (checked by pid file).
    fn kill_dnsmasq(&self) {
        for host in HOSTS {
            let nets = self.scratch.join(self.name(host)).join("pool/net");
            if let Ok(entries) = std::fs::read_dir(nets) {
                for n in entries.flatten() {
                    common::kill_dnsmasq(&n.path().join("dnsmasq.pid"));
                }
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        self.kill_dnsmasq();
        // Fabric veths first: netns teardown is asynchronous (multihost-facts, pitfall 7).
        let f = self.name("f");
        for h in HOSTS {
            let _ = sh("ip", &["-n", &f, "link", "del", &self.name(h)]);
        }
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    let _ = sh("ip", &["netns", "del", &name]);
                }
            }
        }
    }
}

struct Defer<F: FnMut()>(F);
impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// 256 KiB of varied bytes: several full-size frames per TCP window.
fn big_file() -> Vec<u8> {
    (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The network as host `local` sees it (`peers`: the other hosts' underlay addresses).
fn network(
    name: &str,
    bridge: &str,
    gateway_here: bool,
    local: &str,
    peers: &[&str],
) -> NetworkDesired {
    NetworkDesired {
        name: name.to_string(),
        vni: VNI,
        bridge: bridge.to_string(),
        cidr: CIDR.into(),
        gateway: GATEWAY.into(),
        gateway_here,
        mtu: MTU,
        hosts: vec![
            DhcpHost {
                mac: VM1_MAC.into(),
                ip: VM1_IP.into(),
                name: "vm1".into(),
            },
            DhcpHost {
                mac: VM2_MAC.into(),
                ip: VM2_IP.into(),
                name: "vm2".into(),
            },
        ],
        nat: false,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: Some(VxlanDesired {
            local: local.to_string(),
            port: 4789,
            peers: peers.iter().map(|p| p.to_string()).collect(),
        }),
    }
}

#[test]
fn one_network_spans_three_hosts_over_vxlan() {
    if let Ok(step) = std::env::var(ENV_STEP) {
        run_step(&step);
        return;
    }
    require();
    let start = Instant::now();
    let _total = Defer(move || eprintln!("whole test incl. cleanup: {:?}", start.elapsed()));
    let scratch = Scratch::new();
    let mut w = World::new(format!("tkt{}", common::unique()), scratch.dir.clone());
    w.fabric();
    let a = w.host("a", A_IP);
    let b = w.host("b", B_IP);
    let c = w.host("c", C_IP);
    let (net, br) = (w.name("n"), w.name("br"));
    let on_a = network(&net, &br, true, A_IP, &[B_IP, C_IP]);
    let mut on_b = network(&net, &br, false, B_IP, &[A_IP, C_IP]);
    let on_c = network(&net, &br, false, C_IP, &[A_IP, B_IP]);
    let t = Instant::now();
    w.ensure(&a, &on_a);
    w.ensure(&b, &on_b);
    w.ensure(&c, &on_c);
    eprintln!("three hosts converged in {:?}", t.elapsed());

    // What `ip -d link` and `bridge fdb` show on every host.
    for (host, peers) in [(&a, [B_IP, C_IP]), (&b, [A_IP, C_IP]), (&c, [A_IP, B_IP])] {
        let vx = w
            .link(host, VX)
            .unwrap_or_else(|| panic!("{VX} exists on {host}"));
        let data = &vx["linkinfo"]["info_data"];
        assert_eq!(vx["linkinfo"]["info_kind"], "vxlan", "{vx}");
        assert_eq!(data["id"], VNI, "{vx}");
        assert_eq!(data["port"], 4789, "{vx}");
        assert_eq!(data["learning"], false, "nolearning: {vx}");
        assert!(
            data.get("group").is_none() && data.get("remote").is_none(),
            "{vx}"
        );
        assert_eq!(vx["mtu"], MTU, "{vx}");
        assert_eq!(vx["master"], br.as_str(), "{vx}");
        assert!(
            vx["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            "{vx}"
        );
        assert_eq!(vx["ifalias"], format!("tuchka:{}:{net}", w.cloud), "{vx}");
        let bridge = w.link(host, &br).expect("bridge exists");
        assert_eq!(bridge["mtu"], MTU, "bridge MTU: {bridge}");
        assert_eq!(
            w.flood_fdb(host, VX),
            peers.to_vec(),
            "one flood entry per peer on {host}"
        );
        // The firewall is in place and bridged IPv4 goes through it (br_netfilter).
        let table = format!("tk_{}", &w.cloud[..8]);
        assert!(
            w.exec(host, &["nft", "list", "table", "inet", &table]).0,
            "{table} on {host}"
        );
        let (_, brnf) = w.exec(
            host,
            &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
        );
        assert_eq!(brnf.trim(), "1", "br_netfilter on in {host}");
    }
    let local_of = |w: &World, host: &str| {
        let vx = w.link(host, VX).expect("vxlan device");
        (
            vx["ifindex"].as_u64().unwrap_or(0),
            vx["linkinfo"]["info_data"]["local"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    assert_eq!(local_of(&w, &b).1, B_IP);

    // Idempotent: another pass changes nothing (same device, same entries).
    let before = local_of(&w, &a);
    w.ensure(&a, &on_a);
    assert_eq!(
        local_of(&w, &a),
        before,
        "the device is kept, not recreated"
    );
    assert_eq!(w.flood_fdb(&a, VX), vec![B_IP, C_IP]);

    // VMs: v1 on A (static), v2 on B gets its reserved address from A's dnsmasq over VXLAN.
    let v1 = w.vm(&a, &br, "v1", VM1_MAC, Some(&format!("{VM1_IP}/24")));
    let v2 = w.vm(&b, &br, "v2", VM2_MAC, None);
    let script = scratch.dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  echo \"lease $ip\";;\nesac\n",
    )
    .expect("udhcpc script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let t = Instant::now();
    let script_path = script.to_string_lossy().into_owned();
    let (ok, out) = w.exec(
        &v2,
        &[
            "busybox",
            "udhcpc",
            "-f",
            "-n",
            "-q",
            "-i",
            "eth0",
            "-t",
            "5",
            "-T",
            "2",
            "-s",
            &script_path,
        ],
    );
    assert!(
        ok && out.contains(&format!("lease {VM2_IP}")),
        "DHCP over VXLAN from A's dnsmasq:\n{out}"
    );
    eprintln!("DHCP lease over VXLAN in {:?}", t.elapsed());

    let t = Instant::now();
    assert!(w.ping(&v2, VM1_IP), "v2 (host B) pings v1 (host A)");
    assert!(w.ping(&v1, VM2_IP), "v1 (host A) pings v2 (host B)");
    assert!(w.ping(&v2, GATEWAY), "v2 pings the gateway on host A");
    eprintln!("pings across hosts in {:?}", t.elapsed());

    // The firewall sees the bridged traffic to and from the VXLAN port with the bridge as
    // input and output interface (br_netfilter) and lets it through: a probe rule counts it
    // on B (the next ensure removes the probe as drift).
    let table = format!("tk_{}", &w.cloud[..8]);
    let probe = [
        "nft", "insert", "rule", "inet", &table, "forward", "iifname", &br, "oifname", &br,
        "counter",
    ];
    let (ok, out) = w.exec(&b, &probe);
    assert!(ok, "insert the probe rule: {out}");
    assert!(w.ping(&v2, VM1_IP), "ping through the probed firewall");
    let (_, chain) = w.exec(&b, &["nft", "list", "chain", "inet", &table, "forward"]);
    let counted: u64 = chain
        .lines()
        .find_map(|l| l.split("counter packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        counted >= 2,
        "the forward chain saw the bridged echo and reply:\n{chain}"
    );
    w.ensure(&b, &on_b);
    let (_, chain) = w.exec(&b, &["nft", "list", "chain", "inet", &table, "forward"]);
    assert!(!chain.contains("counter"), "the probe is gone:\n{chain}");
    assert_eq!(
        w.fetch(&v1, &format!("http://{VM2_IP}/")).as_deref(),
        Some(&b"v2"[..])
    );
    assert_eq!(
        w.fetch(&v2, &format!("http://{VM1_IP}/")).as_deref(),
        Some(&b"v1"[..])
    );
    let t = Instant::now();
    let big = w
        .fetch(&v2, &format!("http://{VM1_IP}/big"))
        .expect("256 KiB across hosts");
    assert!(
        big == big_file(),
        "the 256 KiB file arrives intact ({} bytes)",
        big.len()
    );
    eprintln!("256 KiB over HTTP across hosts in {:?}", t.elapsed());
    let (_, dns) = w.exec(
        &v2,
        &["busybox", "nslookup", &format!("vm1.{net}"), GATEWAY],
    );
    assert!(
        dns.contains(VM1_IP),
        "A's DNS answers B's VM over VXLAN:\n{dns}"
    );

    // Host A leaves B's desired state: B's entry for A goes, traffic between them stops.
    on_b = network(&net, &br, false, B_IP, &[C_IP]);
    w.ensure(&b, &on_b);
    assert_eq!(w.flood_fdb(&b, VX), vec![C_IP], "only C is left on B");
    assert!(
        !w.ping(&v2, VM1_IP),
        "without its FDB entry, B cannot reach A"
    );
    // No peers at all: no device.
    on_b = network(&net, &br, false, B_IP, &[]);
    w.ensure(&b, &on_b);
    assert!(
        w.link(&b, VX).is_none(),
        "{VX} is deleted when B has no peers"
    );
    assert!(w.link(&b, &br).is_some(), "the bridge stays");
    // Back again.
    on_b = network(&net, &br, false, B_IP, &[A_IP, C_IP]);
    w.ensure(&b, &on_b);
    assert_eq!(w.flood_fdb(&b, VX), vec![A_IP, C_IP]);
    assert!(
        wait_for(10, || w.ping(&v2, VM1_IP).then_some(())).is_some(),
        "B reaches A again"
    );

    // B's underlay address changes: its device is recreated with the new source, and once
    // the other hosts follow, traffic flows again.
    w.ip(&[
        "-n",
        &b,
        "addr",
        "add",
        &format!("{B_IP2}/24"),
        "dev",
        "eth0",
    ]);
    let old = local_of(&w, &b);
    on_b = network(&net, &br, false, B_IP2, &[A_IP, C_IP]);
    w.ensure(&b, &on_b);
    let new = local_of(&w, &b);
    assert_eq!(new.1, B_IP2, "new source address");
    assert_ne!(new.0, old.0, "a new device");
    assert_eq!(w.flood_fdb(&b, VX), vec![A_IP, C_IP]);
    w.ensure(&a, &network(&net, &br, true, A_IP, &[B_IP2, C_IP]));
    w.ensure(&c, &network(&net, &br, false, C_IP, &[A_IP, B_IP2]));
    assert_eq!(
        w.flood_fdb(&a, VX),
        vec![C_IP, B_IP2],
        "A follows B's new address"
    );
    assert!(
        wait_for(10, || w.ping(&v2, VM1_IP).then_some(())).is_some(),
        "B reaches A from its new address"
    );
    assert_eq!(
        w.fetch(&v1, &format!("http://{VM2_IP}/")).as_deref(),
        Some(&b"v2"[..])
    );

    // The underlay filter: VXLAN between the cloud's hosts still flows; A drops it from B
    // once B is not among A's peers, and takes it again when B is back.
    w.underlay(&a, &[B_IP2, C_IP]);
    w.underlay(&b, &[A_IP, C_IP]);
    assert!(w.ping(&v2, VM1_IP), "VXLAN between peers, filter on");
    assert_eq!(
        w.fetch(&v2, &format!("http://{VM1_IP}/big"))
            .map(|b| b == big_file()),
        Some(true),
        "256 KiB across hosts with the filter on"
    );
    w.underlay(&a, &[C_IP]);
    assert!(!w.ping(&v2, VM1_IP), "A drops VXLAN from B, not a peer");
    w.ensure(&a, &network(&net, &br, true, A_IP, &[B_IP2, C_IP]));
    assert!(
        !w.ping(&v2, VM1_IP),
        "a network pass keeps A's underlay filter"
    );
    w.underlay(&a, &[B_IP2, C_IP]);
    assert!(
        wait_for(10, || w.ping(&v2, VM1_IP).then_some(())).is_some(),
        "B is a peer of A again"
    );

    // An address the host does not have is refused with a clear message; nothing is torn down.
    let bad = network(&net, &br, false, "10.99.0.99", &[A_IP, C_IP]);
    let err = w
        .step(&b, Op::Ensure(Box::new(bad)))
        .expect_err("a VXLAN source that is not the host's must be refused");
    assert!(
        err.contains("10.99.0.99") && err.contains("not assigned"),
        "{err}"
    );
    assert_eq!(local_of(&w, &b), new, "the working device is left alone");

    // A failed call rolls back what it made, the VXLAN device included. On host D something
    // already listens on the gateway's DNS port, so dnsmasq, the last step, cannot start.
    let d = w.host("d", D_IP);
    w.ip(&[
        "-n",
        &d,
        "addr",
        "add",
        &format!("{GATEWAY}/32"),
        "dev",
        "lo",
    ]);
    w.serve_on(&d, "squatter", &format!("{GATEWAY}:53"), 53);
    let on_d = network(&net, &br, true, D_IP, &[A_IP]);
    let err = w
        .step(&d, Op::Ensure(Box::new(on_d)))
        .expect_err("dnsmasq cannot start on an address in use");
    assert!(err.contains("dnsmasq"), "{err}");
    eprintln!("rollback case: {err}");
    assert!(
        w.link(&d, VX).is_none(),
        "the VXLAN device it made is deleted"
    );
    assert!(w.link(&d, &br).is_none(), "the bridge it made is deleted");

    // Removing the network removes the VXLAN device and the bridge.
    for host in [&a, &b, &c] {
        w.remove(host, &net);
        assert!(w.link(host, VX).is_none(), "{VX} removed on {host}");
        assert!(w.link(host, &br).is_none(), "bridge removed on {host}");
    }
    assert!(!w.ping(&v2, VM1_IP), "no network, no traffic");
    eprintln!("scenario done in {:?}", start.elapsed());
}
