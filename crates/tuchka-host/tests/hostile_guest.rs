//! A hostile guest against the underlay, tried the way an attacker would, on the multi-host
//! harness (`tuchka-testkit`: two hosts, each a network namespace with its own libvirtd
//! listening on TCP 16509 of its fabric address — an unauthenticated libvirt, the best prize).
//!
//! ```text
//! fabric  10.250.X.1 "controller" (API port 7480) + 10.250.X.200 "outside" (ports 80, 16514)
//!   ├─ h1 10.250.X.11: network red (NAT, gateway here): guest r1 — the attacker
//!   │                  network blue (VNI 5102):      guest b1
//!   └─ h2 10.250.X.12: network blue (gateway here):  guest b2 — the victim; a stand-in for
//!                      the migration channel on 7481
//! ```
//!
//! Guests are network namespaces plugged into their network's bridge with a veth (no VM boot:
//! the packets are what matters). The attacker crafts VXLAN datagrams — an 8-byte VXLAN header
//! with blue's VNI and a whole Ethernet/IPv4/UDP frame for b2 inside — and sends them from r1
//! with an ordinary UDP socket to h2's VXLAN port. Through red's NAT they would leave h1 with
//! h1's underlay address, which h2 admits as a peer's, and b2 would receive the inner datagram.
//! b2 listens with a UDP socket; the same crafted packet sent by h1 itself does arrive (so the
//! packet is well-formed and only the guard stops the guest's), and real traffic between b1 and
//! b2 flows all along. The attacker also sends them to its own host, plainly and with a peer
//! host's address as the source (which the underlay filter admits): refused from a bridge. Then the control ports: libvirt on both hosts, the channel, the
//! controller's API, and a libvirt-TLS port on an outside address — refused until an outbound
//! rule names them, as docs/networking.md says.
//!
//! The dataplane runs inside each host namespace: the test binary re-runs itself there (and
//! in the guests, to send and to listen) with [`ENV_STEP`] naming a JSON file with the step.
//! Guests are deleted by a Drop guard, dnsmasq by pid file; the harness removes the rest.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sh, wait_for, Scratch};
use serde::{Deserialize, Serialize};
use tuchka_api::agent::{DhcpHost, EgressRule, NetworkDesired, PortMatch, VxlanDesired};
use tuchka_host::net::Underlay;
use tuchka_host::{Dataplane, LinuxDataplane};
use tuchka_testkit::MultiHost;

/// Set in an inner run: the path of the [`Step`] file.
const ENV_STEP: &str = "TKT_GUARD_STEP";
const RESULT: &str = "TKT-GUARD-RESULT ";
const GOT: &str = "TKT-GUARD-GOT ";
const TEST: &str = "a_guest_cannot_reach_other_networks_or_the_hosts_through_the_underlay";

const API_PORT: u16 = 7480;
const CHANNEL_PORT: u16 = 7481;
const VICTIM_PORT: u16 = 9999;
/// The dnsmasq log bound of the test (red is a /26: its lease file needs no more).
const LOG_LIMIT: u64 = 32 * 1024;
const RED_VNI: u32 = 5101;
const BLUE_VNI: u32 = 5102;
const R1: (&str, &str) = ("10.61.0.10", "52:54:00:61:00:0a");
const B1: (&str, &str) = ("10.62.0.10", "52:54:00:62:00:0a");
const B2: (&str, &str) = ("10.62.0.20", "52:54:00:62:00:14");

/// One thing to do inside a namespace.
#[derive(Debug, Serialize, Deserialize)]
struct Step {
    pool: PathBuf,
    cloud: String,
    /// Bound of the dnsmasq logs.
    log_limit: u64,
    op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Ensure(Box<NetworkDesired>),
    Remove(String),
    Underlay(Underlay),
    /// Send `count` copies of `payload` as UDP datagrams to `to`.
    Send {
        to: SocketAddr,
        payload: Vec<u8>,
        count: u32,
    },
    /// The same from the local address `from` (which the sender may have no business using).
    SendFrom {
        from: Ipv4Addr,
        to: SocketAddr,
        payload: Vec<u8>,
        count: u32,
    },
    /// Print every datagram received on UDP `port` until one says `END` (`secs` at most).
    Listen {
        port: u16,
        secs: u64,
    },
    /// Broadcast `count` DHCPDISCOVERs, each from another MAC, as fast as possible.
    Flood {
        count: u32,
    },
}

fn require() {
    common::require_root();
    common::require_tool("ip", "iproute2");
    common::require_tool("nft", "nftables");
    common::require_tool("dnsmasq", "dnsmasq-base");
    common::require_tool("busybox", "busybox-static");
    common::require_tool("bash", "bash");
}

/// The inner run: perform the step here and print the outcome.
fn run_step(path: &str) {
    let text = std::fs::read_to_string(path).expect("read the step file");
    let step: Step = serde_json::from_str(&text).expect("parse the step file");
    let dp = || LinuxDataplane::new(&step.pool, &step.cloud).with_dnsmasq_log_limit(step.log_limit);
    let result = match &step.op {
        Op::Ensure(net) => dp().ensure_network(net).map_err(|e| e.chain()),
        Op::Remove(name) => dp().remove_network(name).map_err(|e| e.chain()),
        Op::Underlay(u) => dp().ensure_underlay(u).map_err(|e| e.chain()),
        Op::Send { to, payload, count }
        | Op::SendFrom {
            to, payload, count, ..
        } => {
            let from = match &step.op {
                Op::SendFrom { from, .. } => *from,
                _ => Ipv4Addr::UNSPECIFIED,
            };
            let s = UdpSocket::bind((from, 0)).expect("bind a UDP socket");
            for _ in 0..*count {
                // Unreachable destinations (a dropped packet may come back as ICMP) are fine.
                let _ = s.send_to(payload, to);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
        Op::Flood { count } => {
            let s = UdpSocket::bind("0.0.0.0:68").expect("bind the DHCP client port");
            s.set_broadcast(true).expect("broadcast");
            for i in 0..*count {
                let _ = s.send_to(&dhcp_discover(i), "255.255.255.255:67");
            }
            Ok(())
        }
        Op::Listen { port, secs } => {
            let s = UdpSocket::bind(("0.0.0.0", *port)).expect("bind the victim's port");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            println!("{GOT}listening");
            let deadline = Instant::now() + Duration::from_secs(*secs);
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    println!("{GOT}{from} {}", String::from_utf8_lossy(&buf[..n]));
                    if &buf[..n] == b"END" {
                        break;
                    }
                }
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => println!("{RESULT}ok"),
        Err(e) => println!("{RESULT}{e}"),
    }
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("mac");
    }
    m
}

/// The one's-complement sum of an IPv4 header.
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN datagram's payload as an attacker builds it: the VXLAN header with `vni`, then an
/// Ethernet frame `src` → `dst` (MAC, IP) carrying a UDP datagram to `port` with `payload`.
fn vxlan_packet(
    vni: u32,
    src: (&str, &str),
    dst: (&str, &str),
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&mac(dst.1));
    p.extend_from_slice(&mac(src.1));
    p.extend_from_slice(&[0x08, 0x00]);
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.0.parse::<Ipv4Addr>().expect("ip").octets());
    ip.extend_from_slice(&dst.0.parse::<Ipv4Addr>().expect("ip").octets());
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum
    p.extend_from_slice(payload);
    p
}

/// A DHCPDISCOVER from MAC `52:54:01:xx:xx:xx` (`n` in the last three bytes).
fn dhcp_discover(n: u32) -> Vec<u8> {
    let mut p = vec![1, 1, 6, 0];
    p.extend_from_slice(&n.to_be_bytes()); // xid
    p.extend_from_slice(&[0, 0, 0x80, 0]); // secs, flags: broadcast
    p.extend_from_slice(&[0; 16]); // ciaddr, yiaddr, siaddr, giaddr
    let b = n.to_be_bytes();
    p.extend_from_slice(&[0x52, 0x54, 0x01, b[1], b[2], b[3]]);
    p.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr padding, sname, file
    p.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 255]);
    p
}

/// The guests (namespaces) of a run, deleted on drop, the pools whose dnsmasq to stop, and
/// the servers started in the harness (killed on drop; the harness would too).
struct Guests {
    names: Vec<String>,
    pools: Vec<PathBuf>,
    servers: Vec<Child>,
}

impl Drop for Guests {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for pool in &self.pools {
            if let Ok(nets) = std::fs::read_dir(pool.join("net")) {
                for n in nets.flatten() {
                    common::kill_dnsmasq(&n.path().join("dnsmasq.pid"));
                }
            }
        }
        for ns in &self.names {
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

struct World {
    mh: MultiHost,
    scratch: PathBuf,
    cloud: String,
    prefix: String,
    guests: Guests,
    steps: u32,
    log_limit: u64,
}

impl World {
    fn ip(&self, args: &[&str]) {
        let (ok, out) = sh("ip", args);
        assert!(ok, "ip {}: {out}", args.join(" "));
    }

    fn netns(&self, host: &str) -> String {
        self.mh.host(host).expect("host").netns.clone()
    }

    fn addr(&self, host: &str) -> String {
        self.mh.host(host).expect("host").fabric_ip.to_string()
    }

    fn pool(&self, host: &str) -> PathBuf {
        self.scratch.join(host).join("pool")
    }

    /// Run `op` inside namespace `ns` (with `host`'s pool); Ok or the error chain, and the
    /// lines the step printed after [`GOT`].
    fn step_in(&mut self, ns: &str, host: &str, op: Op) -> Result<Vec<String>, String> {
        let out = self
            .start_in(ns, host, op)
            .wait_with_output()
            .expect("wait");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        step_result(&text, ns)
    }

    fn start_in(&mut self, ns: &str, host: &str, op: Op) -> Child {
        self.steps += 1;
        let step = Step {
            pool: self.pool(host),
            cloud: self.cloud.clone(),
            log_limit: self.log_limit,
            op,
        };
        let file = self.scratch.join(format!("step-{}.json", self.steps));
        std::fs::write(&file, serde_json::to_vec(&step).expect("json")).expect("step file");
        Command::new(tuchka_host::cmd::tool("ip"))
            .args(["netns", "exec", ns])
            .arg(std::env::current_exe().expect("test binary"))
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_STEP, &file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run a step in a namespace")
    }

    #[track_caller]
    fn on(&mut self, host: &str, op: Op) {
        let ns = self.netns(host);
        if let Err(e) = self.step_in(&ns, host, op) {
            panic!("step on {host}: {e}");
        }
    }

    /// A guest `tag` on `bridge` of `host` with `ip_mac`, default route via `gateway`.
    fn guest(
        &mut self,
        host: &str,
        bridge: &str,
        tag: &str,
        ip_mac: (&str, &str),
        gateway: &str,
    ) -> String {
        let ns = format!("{}{tag}", self.prefix);
        let h = self.netns(host);
        self.ip(&["netns", "add", &ns]);
        self.guests.names.push(ns.clone());
        self.ip(&[
            "-n", &h, "link", "add", &ns, "mtu", "1450", "type", "veth", "peer", "name", "eth0",
            "mtu", "1450", "address", ip_mac.1, "netns", &ns,
        ]);
        self.ip(&["-n", &h, "link", "set", &ns, "master", bridge, "up"]);
        self.ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", ip_mac.0),
            "dev",
            "eth0",
        ]);
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        self.ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.ip(&["-n", &ns, "route", "add", "default", "via", gateway]);
        ns
    }

    /// What `victims` (namespace, host) received on [`VICTIM_PORT`] while `send` ran.
    fn received(&mut self, victims: &[(&str, &str)], send: impl FnOnce(&mut Self)) -> Vec<String> {
        use std::io::{BufRead, BufReader};
        let mut listeners = Vec::new();
        for (ns, host) in victims {
            let mut child = self.start_in(
                ns,
                host,
                Op::Listen {
                    port: VICTIM_PORT,
                    secs: 60,
                },
            );
            // Wait until it is bound: a packet sent before would prove nothing.
            let mut out = BufReader::new(child.stdout.take().expect("listener stdout"));
            let mut line = String::new();
            loop {
                line.clear();
                let n = out.read_line(&mut line).expect("read the listener");
                assert!(n > 0, "the listener in {ns} ended before it listened");
                if line.contains(&format!("{GOT}listening")) {
                    break;
                }
            }
            listeners.push((ns.to_string(), child, out));
        }
        send(self);
        // What was sent has crossed the hosts by now (microseconds; leave room for a loaded
        // machine), then each listener is told to stop, over its own loopback.
        std::thread::sleep(Duration::from_millis(500));
        let mut got = Vec::new();
        for (ns, mut child, out) in listeners {
            let end = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), VICTIM_PORT);
            if let Err(e) = self.step_in(
                &ns,
                "h1",
                Op::Send {
                    to: end,
                    payload: b"END".to_vec(),
                    count: 1,
                },
            ) {
                panic!("stop the listener in {ns}: {e}");
            }
            got.extend(
                out.lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.strip_prefix(GOT).map(str::to_string))
                    .filter(|l| !l.ends_with(" END")),
            );
            let _ = child.wait();
        }
        got
    }

    /// Send `payload` `count` times from namespace `ns` to `to`.
    fn send(&mut self, ns: &str, to: SocketAddr, payload: Vec<u8>, count: u32) {
        let ns = ns.to_string();
        if let Err(e) = self.step_in(&ns, "h1", Op::Send { to, payload, count }) {
            panic!("send from {ns}: {e}");
        }
    }
}

fn step_result(text: &str, ns: &str) -> Result<Vec<String>, String> {
    assert!(
        text.contains("1 passed"),
        "step crashed inside {ns}:\n{text}"
    );
    let result = text
        .lines()
        .find_map(|l| l.split_once(RESULT).map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("step in {ns} printed no result:\n{text}"));
    if result != "ok" {
        return Err(result);
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(GOT).map(str::to_string))
        .collect())
}

/// Real, effective, saved and filesystem uid of `pid`.
fn process_uids(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What `busybox udhcpc` in `ns` prints (`lease <ip>` once it got one).
fn dhcp_lease(w: &World, ns: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let script = w.scratch.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"lease $ip\"\nexit 0\n",
    )
    .expect("udhcpc script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let script = script.to_string_lossy().into_owned();
    let (_, out) = sh(
        "ip",
        &[
            "netns", "exec", ns, "busybox", "udhcpc", "-f", "-n", "-q", "-i", "eth0", "-t", "5",
            "-T", "2", "-s", &script,
        ],
    );
    out
}

/// Whether `ns` can open a TCP connection to `ip:port` within 2 s.
fn connects(ns: &str, ip: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{ip}/{port}");
    let (ok, _) = sh(
        "ip",
        &["netns", "exec", ns, "timeout", "2", "bash", "-c", &script],
    );
    ok
}

fn ping(ns: &str, ip: &str) -> bool {
    sh(
        "ip",
        &[
            "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "2", ip,
        ],
    )
    .0
}

#[allow(clippy::too_many_arguments)]
fn network(
    name: &str,
    bridge: &str,
    vni: u32,
    third: u8,
    here: &str,
    gateway_here: bool,
    peers: &[String],
    nat: bool,
) -> NetworkDesired {
    NetworkDesired {
        name: name.to_string(),
        vni,
        bridge: bridge.to_string(),
        cidr: format!("10.{third}.0.0/24"),
        gateway: format!("10.{third}.0.1"),
        gateway_here,
        mtu: 1450,
        hosts: vec![],
        nat,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: (!peers.is_empty()).then(|| VxlanDesired {
            local: here.to_string(),
            port: 4789,
            peers: peers.to_vec(),
        }),
    }
}

fn allow_out(id: &str, proto: &str, port: Option<u16>, to: &str) -> EgressRule {
    EgressRule {
        id: id.into(),
        action: "allow".parse().expect("action"),
        matches: PortMatch {
            proto: proto.parse().expect("proto"),
            port_from: port,
            port_to: port,
        },
        destinations: vec![to.to_string()],
    }
}

/// The underlay of host `me` as the agent hands it over: the other host as peer, its own and
/// the controller's address guarded, the controller's API port a control port.
fn underlay(peer: &str, me: &str, controller: &str) -> Underlay {
    let mut u = Underlay::new(vec![peer.parse().expect("ip")]);
    u.guarded = vec![me.parse().expect("ip"), controller.parse().expect("ip")];
    u.control_ports = vec![API_PORT];
    u
}

#[test]
fn a_guest_cannot_reach_other_networks_or_the_hosts_through_the_underlay() {
    if let Ok(step) = std::env::var(ENV_STEP) {
        run_step(&step);
        return;
    }
    require();
    let start = Instant::now();
    let scratch = Scratch::new();
    let mh = MultiHost::up(2).expect("multi-host harness");
    let prefix = format!("tkg{}", common::unique());
    let mut w = World {
        guests: Guests {
            names: vec![],
            servers: vec![],
            pools: vec![scratch.dir.join("h1/pool"), scratch.dir.join("h2/pool")],
        },
        mh,
        scratch: scratch.dir.clone(),
        cloud: common::cloud_id(),
        prefix: prefix.clone(),
        steps: 0,
        log_limit: LOG_LIMIT,
    };
    let (h1, h2, ctl) = (w.addr("h1"), w.addr("h2"), w.mh.controller_ip().to_string());
    let third_octets: Vec<&str> = ctl.split('.').collect();
    let outside = format!(
        "{}.{}.{}.200",
        third_octets[0], third_octets[1], third_octets[2]
    );
    eprintln!(
        "harness up in {:?}: h1 {h1}, h2 {h2}, controller {ctl}, outside {outside}",
        start.elapsed()
    );

    // The fabric: the controller's API and an "outside" machine (web and libvirt-TLS ports).
    let fab = w.mh.fabric().netns.clone();
    let fab_bridge = w.mh.fabric().bridge.clone();
    w.ip(&[
        "-n",
        &fab,
        "addr",
        "add",
        &format!("{outside}/24"),
        "dev",
        &fab_bridge,
    ]);
    let www = scratch.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "outside").expect("index");
    let www = www.to_string_lossy().into_owned();
    for listen in [
        format!("{ctl}:{API_PORT}"),
        format!("{outside}:80"),
        format!("{outside}:16514"),
    ] {
        let server =
            w.mh.spawn_in_fabric(&["busybox", "httpd", "-f", "-p", &listen, "-h", &www])
                .expect("a server in the fabric");
        w.guests.servers.push(server);
    }
    // A stand-in for h2's migration channel (the agent's is tested elsewhere).
    let channel =
        w.mh.spawn(
            "h2",
            &[
                "busybox",
                "httpd",
                "-f",
                "-p",
                &format!("{h2}:{CHANNEL_PORT}"),
                "-h",
                &www,
            ],
        )
        .expect("a channel stand-in on h2");
    w.guests.servers.push(channel);

    // The cloud: red (NAT) on h1 only, blue across h1 and h2 with its gateway on h2.
    let (red, blue) = (format!("{prefix}r"), format!("{prefix}b"));
    let mut red_net = network(&red, &red, RED_VNI, 61, &h1, true, &[], true);
    red_net.cidr = "10.61.0.0/26".into();
    red_net.hosts = vec![DhcpHost {
        mac: R1.1.into(),
        ip: R1.0.into(),
        name: "r1".into(),
    }];
    let blue_h1 = network(
        &blue,
        &blue,
        BLUE_VNI,
        62,
        &h1,
        false,
        std::slice::from_ref(&h2),
        false,
    );
    let blue_h2 = network(
        &blue,
        &blue,
        BLUE_VNI,
        62,
        &h2,
        true,
        std::slice::from_ref(&h1),
        false,
    );
    w.on("h1", Op::Underlay(underlay(&h2, &h1, &ctl)));
    w.on("h2", Op::Underlay(underlay(&h1, &h2, &ctl)));
    w.on("h1", Op::Ensure(Box::new(red_net.clone())));
    w.on("h1", Op::Ensure(Box::new(blue_h1.clone())));
    w.on("h2", Op::Ensure(Box::new(blue_h2.clone())));
    let r1 = w.guest("h1", &red, "r1", R1, "10.61.0.1");
    w.ip(&["-n", &r1, "addr", "flush", "dev", "eth0"]);
    w.ip(&[
        "-n",
        &r1,
        "addr",
        "add",
        &format!("{}/26", R1.0),
        "dev",
        "eth0",
    ]);
    w.ip(&["-n", &r1, "route", "add", "default", "via", "10.61.0.1"]);
    let b1 = w.guest("h1", &blue, "b1", B1, "10.62.0.1");
    let b2 = w.guest("h2", &blue, "b2", B2, "10.62.0.1");

    // Real traffic: blue's guests talk across the hosts; red's guest reaches out through NAT.
    assert!(
        wait_for(10, || ping(&b1, B2.0).then_some(())).is_some(),
        "b1 (h1) pings b2 (h2) over VXLAN"
    );
    assert!(
        connects(&r1, &outside, 80),
        "r1 reaches an outside web server through NAT"
    );
    let b2_addr = SocketAddr::new(B2.0.parse().expect("ip"), VICTIM_PORT);
    let h2_vxlan = SocketAddr::new(h2.parse().expect("ip"), 4789);
    let h1_vxlan = SocketAddr::new(h1.parse().expect("ip"), 4789);
    let (b1c, b2c) = (b1.clone(), b2.clone());
    let got = w.received(&[(&b2, "h2")], |w| {
        w.send(&b1c, b2_addr, b"GENUINE-FROM-B1".to_vec(), 3);
    });
    assert!(
        got.iter().any(|g| g.ends_with("GENUINE-FROM-B1")),
        "b2 receives b1's datagrams across the hosts: {got:?}"
    );

    // The crafted packet is good: sent by h1 itself (a peer), h2 delivers it to b2.
    let to_b2 = |tag: &str| vxlan_packet(BLUE_VNI, R1, B2, VICTIM_PORT, tag.as_bytes());
    let to_b1 = |tag: &str| vxlan_packet(BLUE_VNI, R1, B1, VICTIM_PORT, tag.as_bytes());
    let h1ns = w.netns("h1");
    let got = w.received(&[(&b2, "h2")], |w| {
        w.send(&h1ns, h2_vxlan, to_b2("CRAFTED-BY-HOST-H1"), 3);
    });
    assert!(
        got.iter().any(|g| g.ends_with("CRAFTED-BY-HOST-H1")),
        "the crafted VXLAN packet is well-formed: from a peer host it reaches b2: {got:?}"
    );

    // The attack: r1 sends the same packets, through red's NAT to h2, and to its own host h1.
    let r1c = r1.clone();
    let got = w.received(&[(&b2, "h2"), (&b1c, "h1")], |w| {
        w.send(&r1c, h2_vxlan, to_b2("INJECTED-THROUGH-NAT"), 10);
        w.send(&r1c, h1_vxlan, to_b1("INJECTED-INTO-OWN-HOST"), 10);
    });
    assert!(
        got.iter().all(|g| !g.contains("INJECTED")),
        "a guest's crafted VXLAN packets must not reach another network: {got:?}"
    );
    // Spoofing a peer's address as the source (the underlay filter admits VXLAN from it) does
    // not get the packet into r1's own host either: what comes from a guest's bridge is not
    // VXLAN, whatever its source says.
    w.ip(&["-n", &r1, "addr", "add", &format!("{h2}/32"), "dev", "eth0"]);
    let spoofer = h2.parse().expect("ip");
    let got = w.received(&[(&b1c, "h1")], |w| {
        let op = Op::SendFrom {
            from: spoofer,
            to: h1_vxlan,
            payload: to_b1("INJECTED-WITH-A-PEER-SOURCE"),
            count: 10,
        };
        if let Err(e) = w.step_in(&r1c, "h1", op) {
            panic!("send from r1: {e}");
        }
    });
    w.ip(&["-n", &r1, "addr", "del", &format!("{h2}/32"), "dev", "eth0"]);
    assert!(
        got.iter().all(|g| !g.contains("INJECTED")),
        "a guest spoofing a peer's address must not reach another network: {got:?}"
    );
    // Real traffic still flows.
    assert!(ping(&b2c, B1.0), "b2 still pings b1 across the hosts");
    let got = w.received(&[(&b2, "h2")], |w| {
        w.send(&b1c, b2_addr, b"GENUINE-AGAIN".to_vec(), 3);
    });
    assert!(
        got.iter().any(|g| g.ends_with("GENUINE-AGAIN")),
        "b2 still receives b1's datagrams: {got:?}"
    );

    // The control ports and the hosts: nothing without a rule.
    let blocked = [
        (h2.as_str(), 16509, "h2's libvirt"),
        (h1.as_str(), 16509, "its own host's libvirt"),
        (h2.as_str(), CHANNEL_PORT, "h2's migration channel"),
        (ctl.as_str(), API_PORT, "the controller's API"),
        (outside.as_str(), 16514, "libvirt-TLS on an outside address"),
    ];
    for (ip, port, what) in blocked {
        assert!(
            !connects(&r1, ip, port),
            "r1 must not reach {what} ({ip}:{port})"
        );
    }
    assert!(
        connects(&r1, &outside, 80),
        "the outside web server still answers"
    );

    // Rules that name them open exactly what they name.
    red_net.egress = vec![
        allow_out("libvirt-h2", "tcp", Some(16509), &h2),
        allow_out("libvirt-h1", "tcp", Some(16509), &h1),
        allow_out("tls-anywhere", "tcp", Some(16514), "0.0.0.0/0"),
        allow_out("channel-anywhere", "tcp", Some(CHANNEL_PORT), "0.0.0.0/0"),
    ];
    w.on("h1", Op::Ensure(Box::new(red_net.clone())));
    assert!(
        connects(&r1, &h2, 16509),
        "a rule naming h2 and the port opens h2's libvirt"
    );
    assert!(
        connects(&r1, &h1, 16509),
        "a rule naming h1 and the port opens h1's libvirt"
    );
    assert!(
        connects(&r1, &outside, 16514),
        "a rule naming the port opens it on other addresses"
    );
    assert!(
        !connects(&r1, &h2, CHANNEL_PORT),
        "naming the port is not naming the host: h2's channel stays closed"
    );
    assert!(
        !connects(&r1, &ctl, API_PORT),
        "the controller is not named"
    );
    let got = w.received(&[(&b2, "h2")], |w| {
        w.send(&r1c, h2_vxlan, to_b2("INJECTED-WITH-RULES"), 10);
    });
    assert!(
        got.iter().all(|g| !g.contains("INJECTED")),
        "no rule names VXLAN to h2: {got:?}"
    );

    // dnsmasq, which every guest can talk to, runs unprivileged with a bounded log.
    let red_dir = w.pool("h1").join("net").join(&red);
    let (log, log1) = (red_dir.join("dnsmasq.log"), red_dir.join("dnsmasq.log.1"));
    let pid = common::dnsmasq_pid(&red_dir.join("dnsmasq.pid")).expect("red's dnsmasq runs");
    let uids = process_uids(pid);
    assert!(
        uids.iter().all(|&u| u != 0),
        "dnsmasq must not run as root (real, effective, saved, fs uid): {uids:?}"
    );
    eprintln!("dnsmasq {pid} runs as uid {uids:?}");
    let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let flood = |w: &mut World, ns: &str| {
        if let Err(e) = w.step_in(ns, "h1", Op::Flood { count: 3000 }) {
            panic!("flood from {ns}: {e}");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    flood(&mut w, &r1);
    let full = size(&log);
    eprintln!("dnsmasq log after 3000 requests from unknown MACs: {full} bytes");
    assert!(
        full <= LOG_LIMIT,
        "the log never grows beyond {LOG_LIMIT} bytes: {full}"
    );
    assert!(
        full > LOG_LIMIT - 1024,
        "the flood filled the log to its bound (so it would have gone beyond): {full}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("no address available"),
        "dnsmasq logged the flood"
    );
    assert_eq!(
        common::dnsmasq_pid(&red_dir.join("dnsmasq.pid")),
        Some(pid),
        "a full log does not stop dnsmasq"
    );
    assert!(
        dhcp_lease(&w, &r1).contains(&format!("lease {}", R1.0)),
        "DHCP still answers the reserved MAC"
    );
    // The next pass rotates it; the new log is bounded the same way.
    w.on("h1", Op::Ensure(Box::new(red_net.clone())));
    assert!(
        size(&log1) > LOG_LIMIT / 2 && size(&log1) <= LOG_LIMIT,
        "rotated to {}",
        log1.display()
    );
    assert!(size(&log) < LOG_LIMIT / 2, "a fresh log after the rotation");
    flood(&mut w, &r1);
    let (now, old) = (size(&log), size(&log1));
    eprintln!("after a second flood: {now} + {old} bytes");
    assert!(
        now <= LOG_LIMIT && old <= LOG_LIMIT,
        "both logs bounded: {now}, {old}"
    );
    assert!(now > LOG_LIMIT / 2, "dnsmasq writes to the new log: {now}");
    assert_eq!(
        common::dnsmasq_pid(&red_dir.join("dnsmasq.pid")),
        Some(pid),
        "same dnsmasq"
    );
    let (_, dns) = sh(
        "ip",
        &[
            "netns",
            "exec",
            &r1,
            "busybox",
            "nslookup",
            &format!("r1.{red}"),
            "10.61.0.1",
        ],
    );
    assert!(dns.contains(R1.0), "DNS still answers:\n{dns}");

    // The rules go, the guard is back; removing the networks removes it with them.
    red_net.egress.clear();
    w.on("h1", Op::Ensure(Box::new(red_net.clone())));
    assert!(
        !connects(&r1, &h2, 16509),
        "rule removed: h2's libvirt closed again"
    );
    assert!(
        !connects(&r1, &h1, 16509),
        "rule removed: h1's libvirt closed again"
    );
    let table = format!("tk_{}", &w.cloud[..8]);
    w.on("h1", Op::Remove(red.clone()));
    w.on("h1", Op::Remove(blue.clone()));
    let listing =
        w.mh.run("h1", &["nft", "list", "table", "inet", &table])
            .expect("the table stays for the underlay filter");
    assert!(
        !listing.contains("route_out") && !listing.contains("hosts4"),
        "no network left on h1, no guard chains:\n{listing}"
    );
    assert!(listing.contains("chain underlay"), "{listing}");
    eprintln!("scenario done in {:?}", start.elapsed());
}
