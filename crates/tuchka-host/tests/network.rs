//! The dataplane against the real kernel, dnsmasq and nftables: unique `tkt…` bridges and a
//! random cloud id; everything is removed by Drop guards even when an assertion fails.

mod common;

use common::{dnsmasq_pid, ip_link, ipv4_addrs, link_exists, sh, wait_for, NetGuard, Scratch};
use tuchka_api::agent::{DhcpHost, NetworkDesired};
use tuchka_host::{cloud8, Dataplane, HostError, LinuxDataplane};

fn require() {
    common::require_root();
    common::require_tool("dnsmasq", "dnsmasq-base");
    common::require_tool("nft", "nftables");
    common::require_tool("ip", "iproute2");
}

/// A /24 in 10.<second>.x.0 unlikely to clash with anything on the machine (each test uses its
/// own `second`, so tests running in parallel never share a subnet).
fn network(u: &str, gateway_here: bool, second: u8) -> NetworkDesired {
    let third = u8::from_str_radix(&u[..2], 16).unwrap_or(1);
    NetworkDesired {
        name: format!("tkt{u}"),
        vni: 4242,
        bridge: format!("tkt{u}"),
        cidr: format!("10.{second}.{third}.0/24"),
        gateway: format!("10.{second}.{third}.1"),
        gateway_here,
        mtu: 1450,
        hosts: vec![
            DhcpHost {
                mac: "52:54:00:aa:00:05".into(),
                ip: format!("10.{second}.{third}.5"),
                name: "web-0".into(),
            },
            DhcpHost {
                mac: "52:54:00:aa:00:06".into(),
                ip: format!("10.{second}.{third}.6"),
                name: "web-1".into(),
            },
        ],
        nat: false,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: None,
    }
}

/// A process is gone when it no longer exists or is a zombie (empty cmdline).
fn gone(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.is_empty())
        .unwrap_or(true)
}

fn nft_table(table: &str) -> Option<String> {
    let (ok, out) = sh("nft", &["list", "table", "inet", table]);
    ok.then_some(out)
}

#[test]
fn gateway_network_lifecycle() {
    require();
    let scratch = Scratch::new();
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&scratch.pool(), &cloud);
    let u = common::unique();
    let mut net = network(&u, true, 231);
    let dir = scratch.pool().join("net").join(&net.name);
    let pid_file = dir.join("dnsmasq.pid");
    let _guard = NetGuard {
        links: vec![net.bridge.clone()],
        pid_files: vec![pid_file.clone()],
        table: Some(format!("tk_{}", cloud8(&cloud))),
    };

    dp.ensure_network(&net).expect("ensure network");

    // The bridge: up, MTU, STP off, forward delay 0, the gateway address.
    let link = ip_link(&net.bridge).expect("bridge exists");
    assert_eq!(link["mtu"], 1450);
    assert!(
        link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "bridge is up: {link}"
    );
    let info = &link["linkinfo"];
    assert_eq!(info["info_kind"], "bridge");
    assert_eq!(info["info_data"]["stp_state"], 0);
    assert_eq!(info["info_data"]["forward_delay"], 0);
    assert_eq!(
        link["ifalias"],
        format!("tuchka:{cloud}:{}", net.name),
        "the bridge is marked as ours"
    );
    let gw = net.gateway.clone();
    assert_eq!(ipv4_addrs(&net.bridge), vec![format!("{gw}/24")]);

    // dnsmasq: running, bound to this bridge, answering for the VMs' names.
    let pid = dnsmasq_pid(&pid_file).expect("dnsmasq runs");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        cmdline.contains(&format!("--interface={}", net.bridge)),
        "{cmdline}"
    );
    let web0 = net.hosts[0].ip.clone();
    let fqdn = format!("web-0.{}", net.name);
    assert_eq!(
        wait_for(5, || Some(common::dns_a(&gw, &fqdn))
            .filter(|v| !v.is_empty())),
        Some(vec![web0.clone()])
    );
    assert_eq!(common::dns_a(&gw, "web-0"), vec![web0]);
    let hostsfile = std::fs::read_to_string(dir.join("dhcp-hosts")).expect("hosts file");
    assert!(hostsfile.contains("52:54:00:aa:00:05,"), "{hostsfile}");

    // The isolation firewall names the bridge and closes the network by default.
    let table = dp.table_name();
    let rules = nft_table(&table).expect("firewall table exists");
    assert!(
        rules.contains(&format!(
            "oifname vmap {{ \"{}\" : jump in_{} }}",
            net.bridge, net.name
        )),
        "{rules}"
    );
    assert!(
        rules.contains(&format!(
            "chain in_{} {{\n\t\tct status dnat accept\n\t\tdrop\n",
            net.name
        )),
        "{rules}"
    );
    assert!(rules.contains("udp dport 67 accept"), "{rules}");

    // Same desired state again: nothing restarts.
    dp.ensure_network(&net).expect("ensure again");
    assert_eq!(
        dnsmasq_pid(&pid_file),
        Some(pid),
        "an unchanged network keeps its dnsmasq"
    );

    // A new reservation: files rewritten, dnsmasq reloaded (same pid), the name resolves.
    let third = net.hosts[0]
        .ip
        .rsplit_once('.')
        .map(|(a, _)| a.to_string())
        .expect("prefix");
    net.hosts.push(DhcpHost {
        mac: "52:54:00:aa:00:07".into(),
        ip: format!("{third}.7"),
        name: "db-0".into(),
    });
    dp.ensure_network(&net).expect("ensure with a new host");
    assert_eq!(
        dnsmasq_pid(&pid_file),
        Some(pid),
        "a reservation change reloads, not restarts"
    );
    let db = format!("{third}.7");
    assert_eq!(
        wait_for(5, || Some(common::dns_a(
            &gw,
            &format!("db-0.{}", net.name)
        ))
        .filter(|v| !v.is_empty())),
        Some(vec![db])
    );

    // dnsmasq died: the next ensure starts it again.
    common::kill_dnsmasq(&pid_file);
    assert!(
        wait_for(5, || gone(pid).then_some(())).is_some(),
        "dnsmasq {pid} was killed"
    );
    dp.ensure_network(&net).expect("ensure after dnsmasq died");
    let pid2 = dnsmasq_pid(&pid_file).expect("dnsmasq restarted");
    assert_ne!(pid2, pid);

    assert_eq!(dp.networks().expect("networks"), vec![net.name.clone()]);

    // Remove: bridge, dnsmasq, state and (last network) the table are gone.
    dp.remove_network(&net.name).expect("remove network");
    assert!(!link_exists(&net.bridge), "bridge deleted");
    assert!(
        wait_for(5, || gone(pid2).then_some(())).is_some(),
        "dnsmasq stopped"
    );
    assert!(!dir.exists(), "state dir removed");
    assert!(
        nft_table(&table).is_none(),
        "firewall table removed with the last network"
    );
    assert!(dp.networks().expect("networks").is_empty());
    dp.remove_network(&net.name).expect("remove again is fine");
}

#[test]
fn non_gateway_host_has_a_bare_bridge_and_moving_the_gateway_away_cleans_up() {
    require();
    let scratch = Scratch::new();
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&scratch.pool(), &cloud);
    let u = common::unique();
    let mut net = network(&u, false, 234);
    let pid_file = scratch
        .pool()
        .join("net")
        .join(&net.name)
        .join("dnsmasq.pid");
    let _guard = NetGuard {
        links: vec![net.bridge.clone()],
        pid_files: vec![pid_file.clone()],
        table: Some(dp.table_name()),
    };

    dp.ensure_network(&net).expect("ensure");
    assert!(link_exists(&net.bridge));
    assert!(
        ipv4_addrs(&net.bridge).is_empty(),
        "no address on a non-gateway host"
    );
    assert!(
        dnsmasq_pid(&pid_file).is_none(),
        "no dnsmasq on a non-gateway host"
    );

    net.gateway_here = true;
    dp.ensure_network(&net).expect("become gateway");
    assert_eq!(ipv4_addrs(&net.bridge).len(), 1);
    assert!(dnsmasq_pid(&pid_file).is_some());

    net.gateway_here = false;
    dp.ensure_network(&net).expect("stop being gateway");
    assert!(ipv4_addrs(&net.bridge).is_empty(), "address removed");
    assert!(dnsmasq_pid(&pid_file).is_none(), "dnsmasq stopped");

    dp.remove_network(&net.name).expect("remove");
    assert!(!link_exists(&net.bridge));
}

#[test]
fn failed_setup_rolls_back_what_it_created() {
    require();
    let scratch = Scratch::new();
    let cloud = common::cloud_id();
    let dp = LinuxDataplane::new(&scratch.pool(), &cloud);
    let u = common::unique();
    let net = network(&u, true, 235);
    // Occupy the bridge name with a device that is not a bridge.
    let peer = format!("tkp{u}");
    let (ok, _) = sh(
        "ip",
        &[
            "link",
            "add",
            &net.bridge,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ],
    );
    assert!(ok, "create veth {}", net.bridge);
    let _guard = NetGuard {
        links: vec![net.bridge.clone()],
        pid_files: vec![],
        table: Some(dp.table_name()),
    };

    let err = dp
        .ensure_network(&net)
        .expect_err("a non-bridge device must be refused");
    assert!(matches!(err, HostError::Link { .. }), "{err:?}");
    assert!(err.chain().contains("not a bridge"), "{}", err.chain());
    assert!(
        !scratch.pool().join("net").join(&net.name).exists(),
        "state dir rolled back"
    );
    assert!(dp.networks().expect("networks").is_empty());
    assert!(
        nft_table(&dp.table_name()).is_none(),
        "firewall re-applied without the network"
    );
    assert_eq!(
        ip_link(&net.bridge).map(|l| l["linkinfo"]["info_kind"].clone()),
        Some("veth".into()),
        "the foreign device is untouched"
    );
}

#[test]
fn two_clouds_do_not_touch_each_other() {
    require();
    let scratch = Scratch::new();
    let (cloud_a, cloud_b) = (common::cloud_id(), common::cloud_id());
    let a = LinuxDataplane::new(&scratch.dir.join("pool-a"), &cloud_a);
    let b = LinuxDataplane::new(&scratch.dir.join("pool-b"), &cloud_b);
    let (ua, ub) = (common::unique(), common::unique());
    let (na, nb) = (network(&ua, false, 236), network(&ub, false, 237));
    let _guard = NetGuard {
        links: vec![na.bridge.clone(), nb.bridge.clone()],
        pid_files: vec![],
        table: Some(a.table_name()),
    };
    let _guard_b = NetGuard {
        links: vec![],
        pid_files: vec![],
        table: Some(b.table_name()),
    };
    a.ensure_network(&na).expect("a");
    b.ensure_network(&nb).expect("b");
    assert_eq!(a.networks().expect("a"), vec![na.name.clone()]);
    assert_eq!(b.networks().expect("b"), vec![nb.name.clone()]);
    let ta = nft_table(&a.table_name()).expect("table a");
    assert!(ta.contains(&na.bridge) && !ta.contains(&nb.bridge), "{ta}");
    // Same bridge name picked by another cloud: refused, and the owner's bridge is untouched.
    let clash = NetworkDesired {
        name: format!("tkx{ub}"),
        ..nb.clone()
    };
    let err = a
        .ensure_network(&clash)
        .expect_err("another cloud's bridge must not be adopted");
    assert!(err.chain().contains("belongs to"), "{}", err.chain());
    assert!(
        a.networks().expect("a").iter().all(|n| *n != clash.name),
        "rolled back"
    );
    assert!(link_exists(&nb.bridge));
    a.remove_network(&na.name).expect("remove a");
    assert!(link_exists(&nb.bridge), "b's bridge survives a's removal");
    assert!(
        nft_table(&b.table_name()).is_some(),
        "b's firewall survives"
    );
    b.remove_network(&nb.name).expect("remove b");
}
