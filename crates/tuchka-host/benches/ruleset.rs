//! Cost of the cloud firewall at scale: 1,000 ingress rules over 100 VMs in 10 networks (plus
//! NAT on half of them, 2 forwards and 3 egress rules each). Prints the p50 of a few runs of:
//! rendering the script (pure), the `nft -f` transaction, the `nft list table` an unchanged
//! agent pass costs, and a whole unchanged [`nft::ensure`] — next to the same for a small
//! ruleset (one network, two rules).
//!
//! The benchmark re-runs itself inside a throw-away network namespace `tktbench<pid>` (removed
//! on exit), so the host's own firewall is never touched. Run as root:
//! `cargo bench -p tuchka-host --bench ruleset` (environment: BENCH_RUNS, default 7).

use std::process::Command;
use std::time::{Duration, Instant};

use tuchka_api::agent::{EgressRule, ForwardDesired, IngressRule, NetworkDesired, PortMatch};
use tuchka_host::net::nfgen;
use tuchka_host::net::nft::{self, Firewall, FirewallModel, NftFirewall};
use tuchka_host::net::NetPlan;

const NETWORKS: u8 = 10;
const VMS_PER_NETWORK: u8 = 10;
const RULES_PER_NETWORK: u16 = 100;
/// Set in the inner run (inside the namespace).
const ENV_INSIDE: &str = "TKT_RULESET_BENCH_INSIDE";

/// Deletes the namespace on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = tuchka_host::cmd::run("ip", &["netns", "del", &self.0], None);
    }
}

fn vm_ip(net: u8, vm: u8) -> String {
    format!("10.90.{net}.{}", 10 + u16::from(vm))
}

fn group(net: u8, vms: std::ops::Range<u8>) -> Vec<String> {
    vms.map(|v| format!("{}/32", vm_ip(net, v))).collect()
}

fn pm(proto: &str, from: Option<u16>, to: Option<u16>) -> PortMatch {
    PortMatch {
        proto: proto.parse().expect("proto"),
        port_from: from,
        port_to: to,
    }
}

/// Network `n` with its share of the 1,000 rules: a quarter from CIDRs to the whole network,
/// half from another network's group (its 10 VMs) to a group of 5 of ours, a quarter from one
/// VM of another network to one of ours.
fn network(n: u8) -> NetworkDesired {
    let other = (n + 1) % NETWORKS;
    let ingress = (0..RULES_PER_NETWORK)
        .map(|r| {
            let id = format!("n{n}-r{r}");
            let port = 1000 + r;
            match r % 4 {
                0 => IngressRule {
                    id,
                    matches: pm("tcp", Some(port), None),
                    sources: vec![format!("198.51.{}.0/24", r % 250)],
                    targets: vec![],
                },
                1 | 2 => IngressRule {
                    id,
                    matches: pm("tcp", Some(port), Some(port + 10)),
                    sources: group(other, 0..VMS_PER_NETWORK),
                    targets: group(n, 0..5),
                },
                _ => IngressRule {
                    id,
                    matches: if r % 8 == 3 {
                        pm("udp", Some(port), None)
                    } else {
                        pm("icmp", None, None)
                    },
                    sources: vec![vm_ip(other, (r % 10) as u8)],
                    targets: vec![vm_ip(n, (r % 10) as u8)],
                },
            }
        })
        .collect();
    let egress = vec![
        EgressRule {
            id: format!("n{n}-no-smtp"),
            action: "deny".parse().expect("action"),
            matches: pm("tcp", Some(25), None),
            destinations: vec!["0.0.0.0/0".into()],
        },
        EgressRule {
            id: format!("n{n}-dns"),
            action: "allow".parse().expect("action"),
            matches: pm("udp", Some(53), None),
            destinations: vec!["192.0.2.53".into()],
        },
        EgressRule {
            id: format!("n{n}-partners"),
            action: "allow".parse().expect("action"),
            matches: pm("any", None, None),
            destinations: vec!["203.0.113.0/24".into(), "198.51.100.0/24".into()],
        },
    ];
    let forwards = (0..2)
        .map(|f| ForwardDesired {
            id: format!("n{n}-f{f}"),
            proto: "tcp".parse().expect("proto"),
            host_port: 20000 + u16::from(n) * 10 + f,
            vm_ip: vm_ip(n, f as u8),
            vm_port: 80,
        })
        .collect();
    NetworkDesired {
        name: format!("bench{n}"),
        vni: 9000 + u32::from(n),
        bridge: format!("tkb{n}"),
        cidr: format!("10.90.{n}.0/24"),
        gateway: format!("10.90.{n}.1"),
        gateway_here: true,
        mtu: 1450,
        hosts: vec![],
        nat: n.is_multiple_of(2),
        ingress,
        egress,
        forwards,
        vxlan: None,
    }
}

fn model(nets: &[NetworkDesired]) -> FirewallModel {
    let mut m = FirewallModel::new("be9c0000");
    for d in nets {
        let plan = NetPlan::from_desired(d).expect("valid benchmark network");
        m.add(plan.rules).expect("no clash");
    }
    m
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    p50((0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn measure(label: &str, nets: &[NetworkDesired], fw: &NftFirewall, runs: usize) {
    let m = model(nets);
    let table = nft::table_name(&m.cloud8);
    let render = time(runs, || nft::render_firewall(&m));
    let script = nft::render_firewall(&m);
    let apply = time(runs, || {
        fw.apply(&script)
            .expect("nft applies the benchmark ruleset")
    });
    let listing = fw
        .list_table(&table)
        .expect("list")
        .expect("the table exists");
    let list = time(runs, || fw.list_table(&table).expect("list"));
    let generation = time(runs, || nfgen::generation().expect("nftables generation"));
    let mut last = None;
    nft::ensure(fw, &table, &script, &mut last).expect("ensure");
    let unchanged = time(runs, || {
        let applied = nft::ensure(fw, &table, &script, &mut last).expect("ensure");
        assert!(!applied, "an unchanged ruleset is not re-applied");
    });
    // Another table changes before every pass: ours must be listed to be checked.
    let other = "table inet tkt_bench_other\ndelete table inet tkt_bench_other\ntable inet tkt_bench_other {\n}\n";
    let touched = p50((0..runs)
        .map(|_| {
            fw.apply(other).expect("touch another table");
            let t = Instant::now();
            let applied = nft::ensure(fw, &table, &script, &mut last).expect("ensure");
            assert!(!applied, "a change elsewhere does not re-apply ours");
            t.elapsed()
        })
        .collect());
    fw.apply("table inet tkt_bench_other\ndelete table inet tkt_bench_other\n")
        .expect("delete the other table");
    let rules = listing.matches("comment \"ingress ").count();
    let sets = listing.matches("\tset addrs").count();
    println!(
        "{label}: {} networks, {rules} ingress rules, {sets} address sets, script {} KiB",
        nets.len(),
        script.len() / 1024
    );
    println!("  render (pure)                  p50 {}", ms(render));
    println!("  nft -f transaction             p50 {}", ms(apply));
    println!("  nft list table                 p50 {}", ms(list));
    println!("  nftables generation (netlink)  p50 {}", ms(generation));
    println!(
        "  unchanged pass (render+ensure) p50 {}",
        ms(unchanged + render)
    );
    println!(
        "  same, after a commit elsewhere p50 {}",
        ms(touched + render)
    );
    fw.apply(&nft::render_firewall(&FirewallModel::new(&m.cloud8)))
        .expect("delete the table");
}

fn main() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_string)
        });
    assert!(
        uid.is_some_and(|l| l.split_whitespace().nth(1) == Some("0")),
        "the ruleset benchmark needs root (network namespace, nftables)"
    );
    assert!(
        tuchka_host::cmd::find_tool("nft").is_some(),
        "tool `nft` is missing: apt-get install nftables"
    );
    if std::env::var_os(ENV_INSIDE).is_none() {
        let ns = Netns(format!("tktbench{}", std::process::id()));
        tuchka_host::cmd::run("ip", &["netns", "add", &ns.0], None).expect("ip netns add");
        let exe = std::env::current_exe().expect("benchmark binary");
        let status = Command::new(tuchka_host::cmd::tool("ip"))
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_INSIDE, "1")
            .status()
            .expect("run the benchmark inside its namespace");
        assert!(status.success(), "benchmark failed inside {}", ns.0);
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let fw = NftFirewall::new();
    let big: Vec<NetworkDesired> = (0..NETWORKS).map(network).collect();
    let mut small = network(0);
    small.ingress.truncate(2);
    small.egress.clear();
    small.forwards.clear();
    measure("small", &[small], &fw, runs);
    measure("large", &big, &fw, runs);
}
