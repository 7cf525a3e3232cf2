//! The cloud's access rules, forwards, NAT and `ip_forward` against the real kernel: network
//! namespaces stand in for VMs (a veth on the network's bridge, an address from its CIDR, a
//! default route via the gateway, `busybox httpd` on port 80) and for the outside world (a veth
//! `203.0.113.1/24` ↔ `203.0.113.2/24` with routes to the tenant networks, `busybox httpd`).
//!
//! Each test re-runs itself inside a fresh network namespace `tkt<id>h` that plays the host, so
//! `nft flush ruleset`, `ip_forward` and the addresses it uses can never touch the machine's own
//! network or another test: the host namespace has no uplink and dies with the test. Servers echo
//! the client address (`/cgi-bin/who`) so a test can tell NAT'ed from original sources.
//! Everything is removed by Drop guards — in the inner run and again, by name and pid, in the
//! outer one — even when an assertion fails.
//!
//! The ports between hosts (migration channel, VXLAN) are checked with listeners of the test
//! itself in the host namespace and two neighbours on links of their own: a "peer" (a host of
//! the cloud) and a "third" party.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sh, wait_for, Scratch};
use tuchka_api::agent::{EgressRule, ForwardDesired, IngressRule, NetworkDesired, PortMatch};
use tuchka_host::cmd::CommandError;
use tuchka_host::net::listening::{listening_ports, parse_proc_net, SocketTable};
use tuchka_host::net::nft::{Firewall, NftFirewall};
use tuchka_host::net::Underlay;
use tuchka_host::{Dataplane, HostError, LinuxDataplane};

/// Set (to the test id) in the inner run, inside the host namespace.
const ENV_ID: &str = "TKT_FIREWALL_TEST_ID";
/// The scratch directory the outer run made for the inner one.
const ENV_SCRATCH: &str = "TKT_FIREWALL_TEST_SCRATCH";

const OUTSIDE_HOST: &str = "203.0.113.1";
const OUTSIDE_PEER: &str = "203.0.113.2";

fn require() {
    common::require_root();
    common::require_tool("nft", "nftables");
    common::require_tool("ip", "iproute2");
    common::require_tool("dnsmasq", "dnsmasq-base");
    common::require_tool("busybox", "busybox-static");
    common::require_tool("curl", "curl");
}

/// What the inner run knows: its id (prefix of every name) and the scratch directory.
struct Env {
    id: String,
    scratch: PathBuf,
}

impl Env {
    fn pool(&self) -> PathBuf {
        self.scratch.join("pool")
    }

    /// A name `tkt<id><tag>` (≤ 15 chars for tags of up to 6).
    fn name(&self, tag: &str) -> String {
        format!("tkt{}{tag}", self.id)
    }
}

/// Run `body` inside a fresh network namespace playing the host: the outer run (cargo's)
/// creates it and re-runs this very test in it; the inner run calls `body`.
fn in_host_netns(test: &str, body: fn(&Env)) {
    if let (Ok(id), Ok(scratch)) = (std::env::var(ENV_ID), std::env::var(ENV_SCRATCH)) {
        let (ok, _) = sh("ip", &["link", "set", "lo", "up"]);
        assert!(ok, "bring lo up in the host namespace");
        // A new namespace inherits the root namespace's IPv4 settings
        // (net.core.devconf_inherit_init_net=0), and other tests running at the same time may
        // have turned routing on there: start every simulated host with routing off.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")
            .expect("turn routing off in the host namespace");
        body(&Env {
            id,
            scratch: PathBuf::from(scratch),
        });
        return;
    }
    require();
    let id = common::unique();
    let scratch = Scratch::new();
    std::fs::create_dir_all(scratch.dir.join("pids")).expect("pids dir");
    let host = format!("tkt{id}h");
    let _cleanup = OuterCleanup {
        prefix: format!("tkt{id}"),
        scratch: scratch.dir.clone(),
    };
    let (ok, _) = sh("ip", &["netns", "add", &host]);
    assert!(ok, "ip netns add {host}");
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(tuchka_host::cmd::tool("ip"))
        .args(["netns", "exec", &host])
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV_ID, &id)
        .env(ENV_SCRATCH, &scratch.dir)
        .stdin(Stdio::null())
        .output()
        .expect("run the test inside its host namespace");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} failed inside network namespace {host}:\n{text}"
    );
}

/// After the inner run, whatever it may have left: dnsmasq (by pid file, checked), servers (by
/// recorded pid, checked), then every namespace `tkt<id>*`.
struct OuterCleanup {
    prefix: String,
    scratch: PathBuf,
}

impl Drop for OuterCleanup {
    fn drop(&mut self) {
        kill_all_dnsmasq(&self.scratch);
        if let Ok(pids) = std::fs::read_dir(self.scratch.join("pids")) {
            for p in pids.flatten() {
                let pid = p.file_name().to_string_lossy().into_owned();
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("httpd") {
                    let _ = sh("kill", &["-9", &pid]);
                }
            }
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

/// The namespaces, links and servers of one inner run; removed on drop.
struct World<'a> {
    env: &'a Env,
    netns: Vec<String>,
    links: Vec<String>,
    servers: Vec<Child>,
}

impl<'a> World<'a> {
    fn new(env: &'a Env) -> Self {
        World {
            env,
            netns: Vec::new(),
            links: Vec::new(),
            servers: Vec::new(),
        }
    }

    fn run(&self, args: &[&str]) {
        let (ok, _) = sh("ip", args);
        assert!(ok, "ip {}", args.join(" "));
    }

    /// A namespace `tkt<id><tag>` joined to the host by a veth of the same name (host side)
    /// and `eth0` inside, with `addr` on `eth0`. Returns the namespace name.
    fn netns_with_veth(&mut self, tag: &str, addr: &str, mtu: u32) -> String {
        let ns = self.env.name(tag);
        self.run(&["netns", "add", &ns]);
        self.netns.push(ns.clone());
        let mtu = mtu.to_string();
        self.run(&[
            "link", "add", &ns, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
            "netns", &ns,
        ]);
        self.links.push(ns.clone());
        self.run(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
        self.run(&["-n", &ns, "link", "set", "eth0", "up"]);
        self.run(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A "VM" on `net`'s bridge with address `ip` and a web server answering `tag`.
    fn vm(&mut self, tag: &str, net: &NetworkDesired, ip: &str) -> String {
        let prefix = net.cidr.split('/').nth(1).expect("cidr prefix");
        let ns = self.netns_with_veth(tag, &format!("{ip}/{prefix}"), net.mtu);
        self.run(&["link", "set", &ns, "master", &net.bridge, "up"]);
        self.run(&["-n", &ns, "route", "add", "default", "via", &net.gateway]);
        self.serve(&ns, tag);
        ns
    }

    /// A neighbour of the host on a link of its own: `<net3>.2/24` in namespace `tkt<id><tag>`,
    /// `<net3>.1/24` on the host's side. Returns the namespace name.
    fn neighbour(&mut self, tag: &str, net3: &str) -> String {
        let ns = self.netns_with_veth(tag, &format!("{net3}.2/24"), 1500);
        self.run(&["addr", "add", &format!("{net3}.1/24"), "dev", &ns]);
        self.run(&["link", "set", &ns, "up"]);
        ns
    }

    /// The outside world: `203.0.113.2` behind the host's `203.0.113.1`, with routes to the
    /// tenant networks `cidrs` via the host, and a web server answering `outside`.
    fn outside(&mut self, cidrs: &[&str]) -> String {
        let ns = self.neighbour("o", "203.0.113");
        for cidr in cidrs {
            self.run(&["-n", &ns, "route", "add", cidr, "via", OUTSIDE_HOST]);
        }
        self.serve(&ns, "outside");
        ns
    }

    /// `busybox httpd` on port 80 in `ns`: `/` answers `body`, `/cgi-bin/who` the client address.
    fn serve(&mut self, ns: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let root = self.env.scratch.join(format!("www-{ns}"));
        std::fs::create_dir_all(root.join("cgi-bin")).expect("www dir");
        std::fs::write(root.join("index.html"), body).expect("index");
        let who = root.join("cgi-bin/who");
        std::fs::write(
            &who,
            // httpd listens on `::`: IPv4 clients show up as `[::ffff:a.b.c.d]`.
            "#!/bin/sh\na=\"${REMOTE_ADDR#\\[}\"; a=\"${a%\\]}\"; a=\"${a#::ffff:}\"\n\
             printf 'Content-Type: text/plain\\r\\n\\r\\n%s' \"$a\"\n",
        )
        .expect("cgi");
        std::fs::set_permissions(&who, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let child = Command::new(tuchka_host::cmd::tool("ip"))
            .args([
                "netns", "exec", ns, "busybox", "httpd", "-f", "-p", "80", "-h",
            ])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        // `ip netns exec` execs the server: this pid is the server's.
        let _ = std::fs::write(
            self.env.scratch.join("pids").join(child.id().to_string()),
            "",
        );
        self.servers.push(child);
        // busybox httpd listens on `::` (dual stack): look in both tables.
        let listening = wait_for(5, || {
            let (_, tcp) = sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "cat",
                    "/proc/net/tcp",
                    "/proc/net/tcp6",
                ],
            );
            parse_proc_net(&tcp, SocketTable::Tcp)
                .contains(&80)
                .then_some(())
        });
        assert!(listening.is_some(), "httpd in {ns} listens on port 80");
    }
}

impl Drop for World<'_> {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for l in &self.links {
            let _ = sh("ip", &["link", "del", l]);
        }
        for ns in &self.netns {
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

/// Stops the dnsmasq of every network in the pools under `scratch` (see [`kill_all_dnsmasq`])
/// and deletes `tables` (inner run, on drop).
struct NetCleanup {
    scratch: PathBuf,
    tables: Vec<String>,
}

/// Kill the dnsmasq of every network of every pool `<scratch>/*/net/*` (checked by pid file).
fn kill_all_dnsmasq(scratch: &Path) {
    let Ok(pools) = std::fs::read_dir(scratch) else {
        return;
    };
    for pool in pools.flatten() {
        if let Ok(nets) = std::fs::read_dir(pool.path().join("net")) {
            for n in nets.flatten() {
                common::kill_dnsmasq(&n.path().join("dnsmasq.pid"));
            }
        }
    }
}

impl Drop for NetCleanup {
    fn drop(&mut self) {
        kill_all_dnsmasq(&self.scratch);
        for t in &self.tables {
            let _ = sh("nft", &["delete", "table", "inet", t]);
        }
    }
}

/// GET `url` from namespace `ns` (the host namespace when `None`); the body, or `None` when
/// the connection fails within 1.5 s.
fn fetch(ns: Option<&str>, url: &str) -> Option<String> {
    let curl = [
        "curl",
        "-sf",
        "--noproxy",
        "*",
        "--connect-timeout",
        "1.5",
        "--max-time",
        "4",
        url,
    ];
    let (ok, out) = match ns {
        Some(ns) => {
            let mut args = vec!["netns", "exec", ns];
            args.extend_from_slice(&curl);
            sh("ip", &args)
        }
        None => sh("curl", &curl[1..]),
    };
    ok.then_some(out)
}

fn who(ns: Option<&str>) -> String {
    ns.unwrap_or("the host").to_string()
}

/// `from` gets `want` from `url` (retried for a few seconds).
#[track_caller]
fn assert_reaches(from: Option<&str>, url: &str, want: &str, why: &str) {
    let got = wait_for(5, || fetch(from, url).filter(|b| b == want));
    assert!(
        got.is_some(),
        "{why}: {} should get {want:?} from {url}; got {:?}",
        who(from),
        fetch(from, url)
    );
}

/// `from` cannot connect to `url`.
#[track_caller]
fn assert_blocked(from: Option<&str>, url: &str, why: &str) {
    let got = fetch(from, url);
    assert!(
        got.is_none(),
        "{why}: {} must not reach {url}; got {got:?}",
        who(from)
    );
}

fn network(env: &Env, tag: &str, third: u8) -> NetworkDesired {
    NetworkDesired {
        name: env.name(tag),
        vni: 4200 + u32::from(third),
        bridge: env.name(tag),
        cidr: format!("10.77.{third}.0/24"),
        gateway: format!("10.77.{third}.1"),
        gateway_here: true,
        mtu: 1450,
        hosts: vec![],
        nat: false,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: None,
    }
}

fn tcp(port: u16) -> PortMatch {
    PortMatch {
        proto: "tcp".parse().expect("proto"),
        port_from: Some(port),
        port_to: None,
    }
}

fn allow_in(id: &str, port: u16, sources: &[&str], targets: &[&str]) -> IngressRule {
    IngressRule {
        id: id.into(),
        matches: tcp(port),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
    }
}

fn egress(id: &str, action: &str, matches: PortMatch, to: &[&str]) -> EgressRule {
    EgressRule {
        id: id.into(),
        action: action.parse().expect("action"),
        matches,
        destinations: to.iter().map(|s| s.to_string()).collect(),
    }
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("read ip_forward")
        .trim()
        .to_string()
}

fn nft_list(table: &str) -> Option<String> {
    let (ok, out) = sh("nft", &["list", "table", "inet", table]);
    ok.then_some(out)
}

fn url(ip: &str, path: &str) -> String {
    format!("http://{ip}{path}")
}

#[test]
fn outside_access_follows_rules_forwards_and_nat() {
    in_host_netns(
        "outside_access_follows_rules_forwards_and_nat",
        outside_access_body,
    );
}

fn outside_access_body(env: &Env) {
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&env.pool(), &cloud);
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![dp.table_name()],
    };
    let mut net = network(env, "na", 1);
    let record = env.pool().join("net/ip_forward.saved");
    assert_eq!(ip_forward(), "0", "a fresh host namespace does not route");

    dp.ensure_network(&net).expect("ensure network");
    let mut w = World::new(env);
    let (a1_ip, a2_ip) = ("10.77.1.5", "10.77.1.6");
    let a1 = w.vm("a1", &net, a1_ip);
    let a2 = w.vm("a2", &net, a2_ip);
    let out = w.outside(&[&net.cidr]);
    let (a1_url, out_url) = (url(a1_ip, "/"), url(OUTSIDE_PEER, "/"));

    assert_reaches(Some(&a2), &a1_url, "a1", "same network (bridged)");
    assert_blocked(Some(&out), &a1_url, "no ingress rule: closed by default");
    assert_blocked(Some(&a1), &out_url, "no NAT: no route out");
    assert_eq!(ip_forward(), "0", "nothing to route yet");

    // An ingress rule from anywhere opens port 80 of the network.
    net.ingress = vec![allow_in("web", 80, &["0.0.0.0/0"], &[])];
    dp.ensure_network(&net).expect("add rule");
    assert_eq!(ip_forward(), "1", "an ingress rule needs routing");
    assert_eq!(
        std::fs::read_to_string(&record).ok().as_deref(),
        Some("0\n"),
        "the original value is recorded in the pool"
    );
    assert_reaches(
        Some(&out),
        &url(a1_ip, "/cgi-bin/who"),
        OUTSIDE_PEER,
        "rule from 0.0.0.0/0, source kept",
    );
    assert_reaches(
        Some(&out),
        &url(a2_ip, "/"),
        "a2",
        "no targets: the whole network",
    );

    // A rule for a CIDR the client is not in opens nothing.
    net.ingress = vec![allow_in("office", 80, &["198.51.100.0/24"], &[])];
    dp.ensure_network(&net).expect("other source");
    assert_blocked(Some(&out), &a1_url, "rule for another source CIDR");

    // Targets restrict the rule to some VMs.
    net.ingress = vec![allow_in("a2-only", 80, &["203.0.113.0/24"], &[a2_ip])];
    dp.ensure_network(&net).expect("targets");
    assert_reaches(Some(&out), &url(a2_ip, "/"), "a2", "the target");
    assert_blocked(Some(&out), &a1_url, "not a target");

    // The rule is gone: closed again.
    net.ingress.clear();
    dp.ensure_network(&net).expect("remove rule");
    assert_blocked(Some(&out), &url(a2_ip, "/"), "rule removed");

    // A forward host:8080 → a1:80, from outside and from the host itself; no masquerade.
    net.forwards = vec![ForwardDesired {
        id: "web".into(),
        proto: "tcp".parse().expect("proto"),
        host_port: 8080,
        vm_ip: a1_ip.into(),
        vm_port: 80,
    }];
    dp.ensure_network(&net).expect("forward");
    let fwd = format!("http://{OUTSIDE_HOST}:8080");
    assert_reaches(Some(&out), &format!("{fwd}/"), "a1", "forward from outside");
    assert_reaches(
        Some(&out),
        &format!("{fwd}/cgi-bin/who"),
        OUTSIDE_PEER,
        "the VM sees the real client",
    );
    assert_reaches(
        None,
        &format!("{fwd}/"),
        "a1",
        "forward from the host itself",
    );
    assert_blocked(Some(&out), &a1_url, "a forward opens only its port");
    assert_eq!(ip_forward(), "1");

    // NAT: the VM reaches the outside, masqueraded behind the host's address.
    net.nat = true;
    dp.ensure_network(&net).expect("nat on");
    assert_reaches(
        Some(&a1),
        &url(OUTSIDE_PEER, "/cgi-bin/who"),
        OUTSIDE_HOST,
        "NAT: out, masqueraded",
    );

    // Egress rules come first, in order: allow 203.0.113.2:80, deny everything else.
    net.egress = vec![
        egress("peer-web", "allow", tcp(80), &[OUTSIDE_PEER]),
        egress(
            "nothing-else",
            "deny",
            PortMatch {
                proto: "any".parse().expect("proto"),
                port_from: None,
                port_to: None,
            },
            &["0.0.0.0/0"],
        ),
    ];
    dp.ensure_network(&net).expect("egress allow then deny");
    assert_reaches(Some(&a1), &out_url, "outside", "egress allow before deny");
    net.egress = vec![egress("no-web-out", "deny", tcp(80), &["203.0.113.0/24"])];
    dp.ensure_network(&net).expect("egress deny");
    assert_blocked(Some(&a1), &out_url, "egress deny wins over NAT");
    assert_reaches(
        Some(&a2),
        &a1_url,
        "a1",
        "egress rules do not touch the same network",
    );

    // NAT off: no route out again.
    net.egress.clear();
    net.nat = false;
    dp.ensure_network(&net).expect("nat off");
    assert_blocked(Some(&a1), &out_url, "NAT off");
    assert_reaches(
        Some(&out),
        &format!("{fwd}/"),
        "a1",
        "the forward still works",
    );

    // Gone: table deleted, forwarding back off, record dropped.
    dp.remove_network(&net.name).expect("remove network");
    assert!(nft_list(&dp.table_name()).is_none(), "table removed");
    assert_eq!(ip_forward(), "0", "ip_forward restored");
    assert!(!record.exists(), "record dropped");
}

#[test]
fn two_networks_are_isolated_until_a_rule_opens_one_way() {
    in_host_netns(
        "two_networks_are_isolated_until_a_rule_opens_one_way",
        two_networks_body,
    );
}

fn two_networks_body(env: &Env) {
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&env.pool(), &cloud);
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![dp.table_name()],
    };
    let a = network(env, "na", 1);
    let mut b = network(env, "nb", 2);
    dp.ensure_network(&a).expect("a");
    dp.ensure_network(&b).expect("b");
    let mut w = World::new(env);
    let (a1_ip, b1_ip, b2_ip) = ("10.77.1.5", "10.77.2.5", "10.77.2.6");
    let a1 = w.vm("a1", &a, a1_ip);
    let b1 = w.vm("b1", &b, b1_ip);
    let b2 = w.vm("b2", &b, b2_ip);
    assert_reaches(Some(&b2), &url(b1_ip, "/"), "b1", "same network");
    assert_blocked(Some(&a1), &url(b1_ip, "/"), "A → B closed by default");
    assert_blocked(Some(&b1), &url(a1_ip, "/"), "B → A closed by default");

    // B lets a1 (a /32, as a group resolves) in to b1: one way only, sources kept.
    b.ingress = vec![allow_in("from-a1", 80, &[&format!("{a1_ip}/32")], &[b1_ip])];
    dp.ensure_network(&b).expect("rule on b");
    assert_reaches(
        Some(&a1),
        &url(b1_ip, "/cgi-bin/who"),
        a1_ip,
        "A → B by rule, not NAT'ed",
    );
    assert_blocked(Some(&a1), &url(b2_ip, "/"), "b2 is not a target");
    assert_blocked(Some(&b1), &url(a1_ip, "/"), "B → A still closed");

    // An egress deny on A wins over B's ingress rule.
    let mut a2 = a.clone();
    a2.egress = vec![egress("no-b", "deny", tcp(80), &[&b.cidr])];
    dp.ensure_network(&a2).expect("egress on a");
    assert_blocked(Some(&a1), &url(b1_ip, "/"), "A's egress deny");
    dp.ensure_network(&a).expect("egress gone");
    assert_reaches(Some(&a1), &url(b1_ip, "/"), "b1", "egress deny removed");

    dp.remove_network(&b.name).expect("remove b");
    assert_blocked(Some(&a1), &url(b1_ip, "/"), "B's bridge is gone");
    dp.remove_network(&a.name).expect("remove a");
}

#[test]
fn drift_is_repaired_by_the_next_ensure() {
    in_host_netns("drift_is_repaired_by_the_next_ensure", drift_body);
}

/// The table's kernel handle: it changes only when the table is re-created.
fn table_handle(table: &str) -> Option<u64> {
    let (ok, out) = sh("nft", &["-j", "list", "tables"]);
    let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
    v["nftables"].as_array()?.iter().find_map(|i| {
        let t = i.get("table")?;
        (t["name"] == table && t["family"] == "inet").then(|| t["handle"].as_u64())?
    })
}

fn drift_body(env: &Env) {
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&env.pool(), &cloud);
    let table = dp.table_name();
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![table.clone()],
    };
    let mut net = network(env, "na", 1);
    net.ingress = vec![allow_in("web", 80, &["0.0.0.0/0"], &[])];
    dp.ensure_network(&net).expect("ensure");
    let mut w = World::new(env);
    let a1_ip = "10.77.1.5";
    let a1 = w.vm("a1", &net, a1_ip);
    let out = w.outside(&[&net.cidr]);
    let (a1_url, out_url) = (url(a1_ip, "/"), url(OUTSIDE_PEER, "/"));
    assert_reaches(Some(&out), &a1_url, "a1", "rule");
    assert_blocked(Some(&a1), &out_url, "no NAT");
    let listing = nft_list(&table).expect("table");

    // An unchanged pass does not re-create the table.
    let handle = table_handle(&table).expect("handle");
    dp.ensure_network(&net).expect("unchanged");
    assert_eq!(
        table_handle(&table),
        Some(handle),
        "unchanged: not re-applied"
    );

    let drifts: [(&str, &[&str]); 3] = [
        ("nft flush ruleset", &["flush", "ruleset"]),
        ("nft delete table", &["delete", "table", "inet", &table]),
        ("nft flush table", &["flush", "table", "inet", &table]),
    ];
    for (what, args) in drifts {
        let (ok, _) = sh("nft", args);
        assert!(ok, "{what}");
        assert_ne!(
            nft_list(&table).as_ref(),
            Some(&listing),
            "{what} changed the table"
        );
        assert_reaches(
            Some(&a1),
            &out_url,
            "outside",
            &format!("after {what} nothing filters"),
        );
        dp.ensure_network(&net).expect("ensure after drift");
        assert_eq!(
            nft_list(&table).as_ref(),
            Some(&listing),
            "{what}: table restored"
        );
        assert_reaches(Some(&out), &a1_url, "a1", &format!("{what}: rule back"));
        assert_blocked(Some(&a1), &out_url, &format!("{what}: default drop back"));
    }
    dp.remove_network(&net.name).expect("remove");
}

/// nft that appends a line nft rejects to every script while `corrupt` is set.
#[derive(Debug)]
struct Corrupting {
    inner: NftFirewall,
    corrupt: Arc<AtomicBool>,
}

impl Firewall for Corrupting {
    fn apply(&self, script: &str) -> Result<(), CommandError> {
        if self.corrupt.load(Ordering::SeqCst) {
            self.inner
                .apply(&format!("{script}this is not an nft command\n"))
        } else {
            self.inner.apply(script)
        }
    }
    fn list_table(&self, table: &str) -> Result<Option<String>, CommandError> {
        self.inner.list_table(table)
    }
    fn tables_with_chain(&self, chain: &str) -> Result<Vec<String>, CommandError> {
        self.inner.tables_with_chain(chain)
    }
    fn generation(&self) -> Option<u32> {
        self.inner.generation()
    }
}

#[test]
fn a_refused_ruleset_leaves_the_previous_one() {
    in_host_netns("a_refused_ruleset_leaves_the_previous_one", refused_body);
}

fn stored(pool: &Path, name: &str) -> NetworkDesired {
    let text = std::fs::read_to_string(pool.join("net").join(name).join("network.json"))
        .expect("network.json");
    serde_json::from_str(&text).expect("parse network.json")
}

fn refused_body(env: &Env) {
    let cloud = common::cloud_id();
    let corrupt = Arc::new(AtomicBool::new(false));
    let dp = LinuxDataplane::with_firewall(
        &env.pool(),
        &cloud,
        Box::new(Corrupting {
            inner: NftFirewall::new(),
            corrupt: corrupt.clone(),
        }),
    );
    let table = dp.table_name();
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![table.clone()],
    };
    let mut net = network(env, "na", 1);
    net.ingress = vec![allow_in("web", 80, &["0.0.0.0/0"], &[])];
    dp.ensure_network(&net).expect("ensure");
    let mut w = World::new(env);
    let a1_ip = "10.77.1.5";
    w.vm("a1", &net, a1_ip);
    let out = w.outside(&[&net.cidr]);
    let a1_url = url(a1_ip, "/");
    assert_reaches(Some(&out), &a1_url, "a1", "rule");
    let listing = nft_list(&table).expect("table");

    // nft refuses the new ruleset: error naming the network, old ruleset and state kept.
    corrupt.store(true, Ordering::SeqCst);
    let mut closed = net.clone();
    closed.ingress.clear();
    let err = dp.ensure_network(&closed).expect_err("nft must refuse");
    let chain = err.chain();
    assert!(matches!(err, HostError::Tool { .. }), "{chain}");
    assert!(chain.contains(&format!("network {}", net.name)), "{chain}");
    assert!(chain.contains("previous ruleset stays"), "{chain}");
    assert!(chain.contains("syntax error"), "nft's own message: {chain}");
    assert_eq!(
        nft_list(&table).as_ref(),
        Some(&listing),
        "previous ruleset in place"
    );
    assert_reaches(Some(&out), &a1_url, "a1", "previous rule still works");
    assert_eq!(
        stored(&env.pool(), &net.name).ingress.len(),
        1,
        "previous state kept"
    );

    // A bad rule is refused before anything is applied.
    corrupt.store(false, Ordering::SeqCst);
    let mut bad = net.clone();
    bad.ingress = vec![allow_in("bad", 80, &["10.0.0.0/33"], &[])];
    let err = dp.ensure_network(&bad).expect_err("invalid source");
    assert!(matches!(err, HostError::Invalid { .. }), "{}", err.chain());
    assert!(
        err.chain().contains("ingress rule \"bad\""),
        "{}",
        err.chain()
    );
    assert_eq!(nft_list(&table).as_ref(), Some(&listing), "nothing applied");

    // nft takes it again: the change goes through.
    dp.ensure_network(&closed).expect("apply");
    assert_blocked(Some(&out), &a1_url, "rule removed");
    dp.remove_network(&net.name).expect("remove");
}

#[test]
fn ip_forward_that_was_on_stays_on_and_clouds_share_it() {
    in_host_netns(
        "ip_forward_that_was_on_stays_on_and_clouds_share_it",
        ip_forward_body,
    );
}

fn ip_forward_body(env: &Env) {
    let (x, y) = (common::cloud_id(), common::cloud_id());
    let dx = LinuxDataplane::new(&env.scratch.join("pool-x"), &x);
    let dy = LinuxDataplane::new(&env.scratch.join("pool-y"), &y);
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![dx.table_name(), dy.table_name()],
    };
    let mut nx = network(env, "nx", 1);
    nx.gateway_here = false; // no dnsmasq needed; NAT on a non-gateway host routes nothing
    nx.nat = true;
    dx.ensure_network(&nx).expect("non-gateway nat");
    assert_eq!(ip_forward(), "0", "a non-gateway host does not route");
    nx.gateway_here = true;
    dx.ensure_network(&nx).expect("nat");
    assert_eq!(ip_forward(), "1");

    // Cloud y also needs routing; x leaves: y keeps it.
    let mut ny = network(env, "ny", 2);
    ny.nat = true;
    dy.ensure_network(&ny).expect("y nat");
    dx.remove_network(&nx.name).expect("x gone");
    assert_eq!(ip_forward(), "1", "another cloud still routes");
    dy.remove_network(&ny.name).expect("y gone");

    // On before any network came: stays on.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").expect("set ip_forward");
    dx.ensure_network(&nx).expect("nat");
    dx.remove_network(&nx.name).expect("remove");
    assert_eq!(ip_forward(), "1", "was on before: never turned off");
    assert!(!env.scratch.join("pool-x/net/ip_forward.saved").exists());

    // Listening ports of this (fresh) namespace: exactly what we start.
    assert_eq!(
        listening_ports().expect("read /proc/net"),
        Vec::<u16>::new()
    );
    let mut w = World::new(env);
    w.serve(&env.name("h"), "host"); // the host namespace itself, by name
    assert_eq!(listening_ports().expect("read /proc/net"), vec![80]);
}

/// A TCP server in the host namespace (this process) answering every connection with an HTTP
/// response `body`, so `curl` can tell it answered. Lives as long as the test process.
fn answer_http(port: u16, body: &'static str) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("listen");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// `curl`'s exit code for `url` from namespace `ns` with a 1.5 s connect timeout: 28 when the
/// SYN goes unanswered (dropped), 7 when the connection is refused (reset).
fn curl_exit(ns: &str, url: &str) -> Option<i32> {
    Command::new(tuchka_host::cmd::tool("ip"))
        .args(["netns", "exec", ns, "curl", "-s", "--noproxy", "*"])
        .args(["--connect-timeout", "1.5", "--max-time", "4", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run curl")
        .code()
}

/// `from` cannot connect to `url`, and the reason is silence: the SYN is dropped, no reset.
#[track_caller]
fn assert_dropped(from: &str, url: &str, why: &str) {
    assert_eq!(
        curl_exit(from, url),
        Some(28),
        "{why}: {from} must time out connecting to {url} (28; 7 = refused, 0 = reached)"
    );
}

/// Send `count` UDP datagrams from namespace `ns` to `to` (bash's `/dev/udp`).
fn send_udp(ns: &str, to: SocketAddr, count: usize) {
    for _ in 0..count {
        let script = format!("printf x > /dev/udp/{}/{}", to.ip(), to.port());
        let (ok, _) = sh("ip", &["netns", "exec", ns, "bash", "-c", &script]);
        assert!(ok, "send a datagram from {ns} to {to}");
    }
}

/// The sources of the datagrams `socket` receives until `expected` came from `wanted` (or
/// 3 s passed), plus 300 ms for stragglers.
fn udp_sources(socket: &UdpSocket, wanted: Option<IpAddr>, expected: usize) -> Vec<IpAddr> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut settle: Option<Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if settle.is_some_and(|t| now >= t) || now >= deadline {
            return got;
        }
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            got.push(from.ip());
        }
        let done = got.iter().filter(|ip| Some(**ip) == wanted).count() >= expected;
        if settle.is_none() && (done || wanted.is_none()) {
            settle = Some(Instant::now() + Duration::from_millis(300));
        }
    }
}

/// What reached the host's VXLAN port when `peer` and `third` (namespace, host address to send
/// to) each sent 3 datagrams, third first; waits for those from `admitted`, if given.
fn vxlan_from(
    socket: &UdpSocket,
    peer: (&str, &str),
    third: (&str, &str),
    admitted: Option<&str>,
) -> Vec<IpAddr> {
    let port = socket.local_addr().expect("local addr").port();
    let to = |ip: &str| SocketAddr::new(ip.parse().expect("ip"), port);
    // Drain anything left from an earlier round.
    let _ = udp_sources(socket, None, 0);
    send_udp(third.0, to(third.1), 3);
    send_udp(peer.0, to(peer.1), 3);
    udp_sources(socket, admitted.map(|a| a.parse().expect("ip")), 3)
}

/// The peer's and the third party's addresses; the host is `.1` on each link.
const PEER: &str = "198.18.1.2";
const THIRD: &str = "198.18.2.2";
const CHANNEL: u16 = 7481;
const UNFILTERED: u16 = 7482;

#[test]
fn the_ports_between_hosts_answer_only_the_clouds_hosts() {
    in_host_netns(
        "the_ports_between_hosts_answer_only_the_clouds_hosts",
        underlay_body,
    );
}

fn underlay_body(env: &Env) {
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&env.pool(), &cloud);
    let table = dp.table_name();
    let _nets = NetCleanup {
        scratch: env.scratch.clone(),
        tables: vec![table.clone()],
    };
    let mut w = World::new(env);
    let peer = w.neighbour("p", "198.18.1");
    let third = w.neighbour("x", "198.18.2");
    w.run(&["-n", &third, "route", "add", "default", "via", "198.18.2.1"]);
    answer_http(CHANNEL, "channel");
    answer_http(UNFILTERED, "other");
    let vxlan = UdpSocket::bind(("0.0.0.0", 4789)).expect("bind the VXLAN port");
    let from_peer = (peer.as_str(), "198.18.1.1");
    let from_third = (third.as_str(), "198.18.2.1");
    let channel = |host: &str| format!("http://{host}:{CHANNEL}/");
    let (peer_ip, third_ip): (IpAddr, IpAddr) =
        (PEER.parse().expect("ip"), THIRD.parse().expect("ip"));

    // Before: nothing is filtered.
    assert_reaches(
        Some(&third),
        &channel("198.18.2.1"),
        "channel",
        "no underlay yet",
    );
    assert!(vxlan_from(&vxlan, from_peer, from_third, Some(THIRD)).contains(&third_ip));

    // Only the peer (and the host itself) reach the channel and VXLAN.
    dp.ensure_underlay(&Underlay::new(vec![peer_ip]))
        .expect("ensure underlay");
    assert_reaches(Some(&peer), &channel("198.18.1.1"), "channel", "a peer");
    assert_reaches(None, &channel("127.0.0.1"), "channel", "loopback");
    assert_reaches(
        None,
        &channel("198.18.1.1"),
        "channel",
        "the host, by its address",
    );
    assert_dropped(&third, &channel("198.18.2.1"), "not a host of the cloud");
    assert_dropped(
        &third,
        &channel("198.18.1.1"),
        "not a host, to the other address",
    );
    assert_reaches(
        Some(&third),
        &format!("http://198.18.2.1:{UNFILTERED}/"),
        "other",
        "every other port stays open",
    );
    assert_eq!(
        vxlan_from(&vxlan, from_peer, from_third, Some(PEER)),
        vec![peer_ip; 3],
        "VXLAN only from the peer"
    );

    // The same underlay again (peers in any order, duplicated): nothing is applied.
    let handle = table_handle(&table).expect("the table exists");
    dp.ensure_underlay(&Underlay::new(vec![peer_ip, peer_ip]))
        .expect("unchanged");
    assert_eq!(
        table_handle(&table),
        Some(handle),
        "unchanged: not re-applied"
    );

    // A restarted agent keeps the underlay in every apply; networks come and go around it.
    drop(dp);
    let dp = LinuxDataplane::new(&env.pool(), &cloud);
    let mut net = network(env, "na", 1);
    net.gateway_here = false;
    dp.ensure_network(&net).expect("a network");
    assert!(
        nft_list(&table).is_some_and(|l| l.contains("chain underlay")),
        "the network's apply keeps the underlay"
    );
    assert_dropped(&third, &channel("198.18.2.1"), "with a network");
    assert_reaches(
        Some(&peer),
        &channel("198.18.1.1"),
        "channel",
        "with a network",
    );
    dp.remove_network(&net.name).expect("remove the network");
    assert!(
        nft_list(&table).is_some_and(|l| l.contains("chain underlay")),
        "no network left: the table stays for the underlay"
    );
    assert_dropped(&third, &channel("198.18.2.1"), "after the network left");

    // A forward may not take the channel port, nor an underlay a forwarded port.
    net.forwards = vec![ForwardDesired {
        id: "steal".into(),
        proto: "tcp".parse().expect("proto"),
        host_port: CHANNEL,
        vm_ip: "10.77.1.5".into(),
        vm_port: 80,
    }];
    net.gateway_here = true;
    let err = dp
        .ensure_network(&net)
        .expect_err("forward of the channel port");
    assert!(matches!(err, HostError::Invalid { .. }), "{}", err.chain());
    assert!(err.chain().contains("migration channel"), "{}", err.chain());
    net.forwards[0].host_port = 8080;
    dp.ensure_network(&net).expect("forward of another port");
    let listing = nft_list(&table).expect("table");
    let onto_forward = Underlay {
        channel_port: Some(8080),
        ..Underlay::new(vec![peer_ip])
    };
    let err = dp
        .ensure_underlay(&onto_forward)
        .expect_err("channel on a forwarded port");
    assert!(err.chain().contains("\"steal\""), "{}", err.chain());
    assert_eq!(nft_list(&table), Some(listing), "refused: nothing applied");
    dp.remove_network(&net.name).expect("remove the network");

    // A single-host cloud: the channel from loopback only, VXLAN from no one.
    dp.ensure_underlay(&Underlay::new(vec![]))
        .expect("no peers");
    assert_dropped(
        &peer,
        &channel("198.18.1.1"),
        "no peers: not even the old one",
    );
    assert_reaches(None, &channel("127.0.0.1"), "channel", "loopback, no peers");
    assert_eq!(
        vxlan_from(&vxlan, from_peer, from_third, None),
        Vec::<IpAddr>::new(),
        "no peers: VXLAN from no one"
    );

    // Peers change: the new one is in, the old one out.
    dp.ensure_underlay(&Underlay::new(vec![third_ip]))
        .expect("another peer");
    assert_reaches(
        Some(&third),
        &channel("198.18.2.1"),
        "channel",
        "the new peer",
    );
    assert_dropped(&peer, &channel("198.18.1.1"), "no longer a peer");
    let got = vxlan_from(&vxlan, from_peer, from_third, Some(THIRD));
    assert!(
        got.contains(&third_ip) && !got.contains(&peer_ip),
        "VXLAN from the new peer only: {got:?}"
    );
}
