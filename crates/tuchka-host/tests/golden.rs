//! Golden-file tests of everything tuchka-host renders: domain XML, the nft script, dnsmasq
//! arguments and files, NoCloud meta-data. Pure; no libvirt needed. The nft scripts are also
//! checked by nft itself (`nft -c`: root and nftables needed; it changes nothing).
//!
//! To accept a deliberate change: `UPDATE_GOLDEN=1 cargo test -p tuchka-host --test golden`,
//! then review the diff of `tests/golden/`.

use std::path::{Path, PathBuf};

use tuchka_api::agent::{
    DhcpHost, EgressRule, ForwardDesired, IngressRule, NetworkDesired, PortMatch,
};
use tuchka_host::domain_xml::{domain_uuid, parse_vm_metadata};
use tuchka_host::net::dnsmasq::{
    dnsmasq_args, render_addn_hosts, render_dhcp_hosts, DnsmasqConfig, DnsmasqFiles, DnsmasqUser,
};
use tuchka_host::net::nft::{render_firewall, FirewallModel};
use tuchka_host::net::{NetPlan, Underlay};
use tuchka_host::seed::render_meta_data;
use tuchka_host::{render_domain_xml, Accel, DomainSpec, NicSpec, VolumeSpec};

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden file {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the rendered output (UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn spec() -> DomainSpec {
    DomainSpec {
        name: "tk-0f2a6c1e-web-0".into(),
        vm_id: "6d3f1a9e-5b7c-4e21-9a0b-1c2d3e4f5a6b".into(),
        cloud_id: "0f2a6c1e-0000-4000-8000-000000000001".into(),
        accel: Accel::Tcg,
        vcpus: 2,
        max_vcpus: 4,
        volumes: vec![VolumeSpec {
            id: "9b1c2d3e-4f5a-4b6c-8d7e-0f1a2b3c4d5e".into(),
            path: PathBuf::from(
                "/var/lib/tuchka/volumes/9b1c2d3e-4f5a-4b6c-8d7e-0f1a2b3c4d5e.qcow2",
            ),
            target: "vdb".into(),
        }],
        memory_mib: 256,
        root_disk: PathBuf::from(
            "/var/lib/tuchka/vms/6d3f1a9e-5b7c-4e21-9a0b-1c2d3e4f5a6b/root.qcow2",
        ),
        seed_iso: PathBuf::from(
            "/var/lib/tuchka/vms/6d3f1a9e-5b7c-4e21-9a0b-1c2d3e4f5a6b/seed.iso",
        ),
        console_log: PathBuf::from(
            "/var/lib/tuchka/vms/6d3f1a9e-5b7c-4e21-9a0b-1c2d3e4f5a6b/console.log",
        ),
        nics: vec![
            NicSpec {
                bridge: "tk100".into(),
                mac: "52:54:00:0a:00:05".into(),
                tap: "tkt6d3f1a9e0".into(),
                mtu: 1450,
            },
            NicSpec {
                bridge: "tk101".into(),
                mac: "52:54:00:0b:00:07".into(),
                tap: "tkt6d3f1a9e1".into(),
                mtu: 1450,
            },
        ],
    }
}

#[test]
fn domain_xml_golden() {
    golden("domain-tcg-two-nics.xml", &render_domain_xml(&spec()));
}

#[test]
fn domain_xml_kvm_uses_domain_type_kvm() {
    let xml = render_domain_xml(&DomainSpec {
        accel: Accel::Kvm,
        ..spec()
    });
    assert!(xml.starts_with("<domain type='kvm'>"));
}

#[test]
fn hostile_names_render_to_valid_xml_and_parse_back() {
    let nasty = r#"web'<&">-0 ]]> <!-- x"#;
    let s = DomainSpec {
        name: nasty.into(),
        vm_id: "vm'<&\"".into(),
        cloud_id: "cloud&<'\"".into(),
        root_disk: PathBuf::from("/pool/it's <a> & \"b\"/root.qcow2"),
        nics: vec![NicSpec {
            bridge: "br'&".into(),
            mac: "52:54:00:00:00:01".into(),
            tap: "t<a>p".into(),
            mtu: 1500,
        }],
        ..spec()
    };
    let xml = render_domain_xml(&s);
    let doc = roxmltree::Document::parse(&xml).expect("rendered XML must be well-formed");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "domain");
    let text = |tag: &str| {
        root.descendants()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(str::to_string)
    };
    assert_eq!(text("name").as_deref(), Some(nasty));
    assert_eq!(text("uuid"), Some(domain_uuid(&s.cloud_id, &s.vm_id)));
    let source = root
        .descendants()
        .find(|n| n.has_tag_name("source") && n.attribute("file").is_some())
        .and_then(|n| n.attribute("file"));
    assert_eq!(source, Some("/pool/it's <a> & \"b\"/root.qcow2"));
    let tap = root
        .descendants()
        .find(|n| n.has_tag_name("target") && n.attribute("dev") == Some("t<a>p"));
    assert!(tap.is_some(), "tap name must survive escaping");
    assert_eq!(
        parse_vm_metadata(&xml),
        Some((s.cloud_id.clone(), s.vm_id.clone()))
    );
}

/// A network as the controller would send it, without rules.
fn net(name: &str, bridge: &str, cidr: &str, gateway: &str) -> NetworkDesired {
    NetworkDesired {
        name: name.into(),
        vni: 100,
        bridge: bridge.into(),
        cidr: cidr.into(),
        gateway: gateway.into(),
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

fn model(nets: &[NetworkDesired]) -> FirewallModel {
    let mut m = FirewallModel::new("0f2a6c1e");
    for d in nets {
        let plan = NetPlan::from_desired(d).expect("valid network");
        m.add(plan.rules).expect("no clash");
    }
    m
}

fn pm(proto: &str, from: Option<u16>, to: Option<u16>) -> PortMatch {
    PortMatch {
        proto: proto.parse().expect("proto"),
        port_from: from,
        port_to: to,
    }
}

/// Golden-compare a rendered nft script and have nft itself check it (`nft -c`, which changes
/// nothing).
fn nft_golden(name: &str, script: &str) {
    golden(name, script);
    assert!(
        tuchka_host::cmd::find_tool("nft").is_some(),
        "tool `nft` is missing: apt-get install nftables"
    );
    let checked = tuchka_host::cmd::run("nft", &["-c", "-f", "-"], Some(script.as_bytes()));
    assert!(
        checked.is_ok(),
        "nft -c refuses {name} (needs root and nftables): {:?}",
        checked.err().map(|e| e.to_string())
    );
}

#[test]
fn nft_golden_two_plain_networks() {
    let m = model(&[
        net("red", "tk101", "10.11.0.0/24", "10.11.0.1"),
        net("blue", "tk100", "10.10.0.0/24", "10.10.0.1"),
    ]);
    assert!(!m.needs_forwarding(), "no rules, no NAT: nothing to route");
    nft_golden("firewall-two-networks.nft", &render_firewall(&m));
}

#[test]
fn nft_golden_rules_nat_and_forwards() {
    let web_group = vec!["10.20.0.5/32".to_string(), "10.20.0.6".to_string()];
    let mut blue = net("blue", "tk100", "10.10.0.0/24", "10.10.0.1");
    blue.nat = true;
    blue.ingress = vec![
        IngressRule {
            id: "http-from-anywhere".into(),
            matches: pm("tcp", Some(80), None),
            sources: vec!["0.0.0.0/0".into()],
            targets: vec![],
        },
        IngressRule {
            id: "ssh-from-office".into(),
            matches: pm("tcp", Some(22), None),
            sources: vec!["203.0.113.0/24".into(), "198.51.100.7".into()],
            targets: vec!["10.10.0.5".into(), "10.10.0.6".into()],
        },
        IngressRule {
            id: "app-from-web".into(),
            matches: pm("tcp", Some(8000), Some(8100)),
            sources: web_group.clone(),
            targets: vec!["10.10.0.7".into()],
        },
        IngressRule {
            id: "ping-from-web".into(),
            matches: pm("icmp", None, None),
            sources: web_group.clone(),
            targets: vec![],
        },
        IngressRule {
            id: "empty-group".into(),
            matches: pm("any", None, None),
            sources: vec![],
            targets: vec![],
        },
    ];
    blue.egress = vec![
        EgressRule {
            id: "no-smtp".into(),
            action: "deny".parse().expect("action"),
            matches: pm("tcp", Some(25), None),
            destinations: vec!["0.0.0.0/0".into()],
        },
        EgressRule {
            id: "dns".into(),
            action: "allow".parse().expect("action"),
            matches: pm("udp", Some(53), None),
            destinations: vec!["192.0.2.53".into()],
        },
    ];
    blue.forwards = vec![
        ForwardDesired {
            id: "web".into(),
            proto: "tcp".parse().expect("proto"),
            host_port: 8080,
            vm_ip: "10.10.0.5".into(),
            vm_port: 80,
        },
        ForwardDesired {
            id: "dns".into(),
            proto: "udp".parse().expect("proto"),
            host_port: 5353,
            vm_ip: "10.10.0.6".into(),
            vm_port: 53,
        },
    ];
    // Another network of the cloud (the web group lives there): no NAT, one outbound allow to
    // a third party, and a rule from two of blue's VMs (the same list as blue's ssh targets:
    // one shared set).
    let mut red = net("red", "tk101", "10.20.0.0/24", "10.20.0.1");
    red.ingress = vec![IngressRule {
        id: "dns-from-blue".into(),
        matches: pm("udp", None, None),
        sources: vec!["10.10.0.6".into(), "10.10.0.5".into()],
        targets: vec![],
    }];
    red.egress = vec![EgressRule {
        id: "to-partner".into(),
        action: "allow".parse().expect("action"),
        matches: pm("any", None, None),
        destinations: vec!["198.51.100.0/24".into()],
    }];
    // Not the gateway here: its forward and NAT belong to another host.
    let mut green = net("green", "tk102", "10.30.0.0/24", "10.30.0.1");
    green.gateway_here = false;
    green.nat = true;
    green.forwards = vec![ForwardDesired {
        id: "elsewhere".into(),
        proto: "tcp".parse().expect("proto"),
        host_port: 8080,
        vm_ip: "10.30.0.5".into(),
        vm_port: 80,
    }];
    let m = model(&[blue, red, green]);
    assert!(m.needs_forwarding());
    nft_golden("firewall-rules-nat-forwards.nft", &render_firewall(&m));
}

#[test]
fn nft_golden_no_networks_only_deletes_the_table() {
    nft_golden(
        "firewall-empty.nft",
        &render_firewall(&FirewallModel::new("0f2a6c1e")),
    );
}

fn underlay(peers: &[&str]) -> Underlay {
    Underlay::new(
        peers
            .iter()
            .map(|p| p.parse().expect("test address"))
            .collect(),
    )
}

#[test]
fn nft_golden_underlay_without_networks() {
    let mut m = FirewallModel::new("0f2a6c1e");
    m.set_underlay(&underlay(&[
        "192.0.2.13",
        "192.0.2.12",
        "fd00::12",
        "192.0.2.13",
    ]))
    .expect("valid underlay");
    nft_golden("firewall-underlay.nft", &render_firewall(&m));
}

#[test]
fn nft_golden_underlay_of_a_single_host_cloud() {
    let mut m = FirewallModel::new("0f2a6c1e");
    m.set_underlay(&underlay(&[])).expect("valid underlay");
    nft_golden("firewall-underlay-no-peers.nft", &render_firewall(&m));
}

#[test]
fn nft_golden_underlay_with_networks_and_no_channel() {
    let mut m = model(&[
        net("red", "tk101", "10.11.0.0/24", "10.11.0.1"),
        net("blue", "tk100", "10.10.0.0/24", "10.10.0.1"),
    ]);
    let u = Underlay {
        channel_port: None,
        vxlan_port: 8472,
        ..underlay(&["192.0.2.12"])
    };
    m.set_underlay(&u).expect("valid underlay");
    nft_golden("firewall-two-networks-underlay.nft", &render_firewall(&m));
}

/// A NAT network on the gateway host of a three-host cloud, with outbound rules that name a
/// host (IPv4 and IPv6 underlay), a control port anywhere, and neither; a deny before them.
#[test]
fn nft_golden_guest_guard_with_rules_that_name_hosts_and_ports() {
    let mut red = net("red", "tk101", "10.11.0.0/24", "10.11.0.1");
    red.nat = true;
    let rule = |id: &str, action: &str, m: PortMatch, to: &[&str]| EgressRule {
        id: id.into(),
        action: action.parse().expect("action"),
        matches: m,
        destinations: to.iter().map(|s| s.to_string()).collect(),
    };
    red.egress = vec![
        rule("no-smtp", "deny", pm("tcp", Some(25), None), &["0.0.0.0/0"]),
        rule(
            "libvirt-h2",
            "allow",
            pm("tcp", Some(16509), None),
            &["192.0.2.12"],
        ),
        rule(
            "tls-anywhere",
            "allow",
            pm("tcp", Some(16514), None),
            &["0.0.0.0/0"],
        ),
        rule(
            "lan",
            "allow",
            pm("any", None, None),
            &["198.51.100.0/24", "198.51.100.7", "10.11.0.1"],
        ),
    ];
    let blue = net("blue", "tk100", "10.10.0.0/24", "10.10.0.1");
    let mut m = model(&[red, blue]);
    let mut u = underlay(&["192.0.2.12", "192.0.2.13", "fd00::12"]);
    u.guarded = vec![
        "192.0.2.11".parse().expect("ip"),
        "192.0.2.1".parse().expect("ip"),
    ];
    u.control_ports = vec![7480, 7481];
    m.set_underlay(&u).expect("valid underlay");
    nft_golden("firewall-guest-guard.nft", &render_firewall(&m));
}

#[test]
fn nft_model_refuses_forwards_of_the_ports_between_hosts() {
    let mut blue = net("blue", "tk100", "10.10.0.0/24", "10.10.0.1");
    blue.forwards = vec![ForwardDesired {
        id: "sneaky".into(),
        proto: "tcp".parse().expect("proto"),
        host_port: 7481,
        vm_ip: "10.10.0.5".into(),
        vm_port: 80,
    }];
    let rules = |d: &NetworkDesired| NetPlan::from_desired(d).expect("valid network").rules;

    // Underlay first, then the network.
    let mut m = FirewallModel::new("0f2a6c1e");
    m.set_underlay(&underlay(&["192.0.2.12"]))
        .expect("underlay");
    let err = m
        .add(rules(&blue))
        .expect_err("forward of the channel port");
    assert!(
        err.contains("\"sneaky\"") && err.contains("migration channel"),
        "{err}"
    );

    // The network first, then the underlay.
    let mut m = FirewallModel::new("0f2a6c1e");
    m.add(rules(&blue)).expect("no underlay yet");
    let err = m
        .set_underlay(&underlay(&["192.0.2.12"]))
        .expect_err("forward of the channel port");
    assert!(err.contains("network blue"), "{err}");
    assert_eq!(m.underlay, None, "refused: nothing set");

    // A forward of the same port number over the other protocol is fine.
    blue.forwards[0].proto = tuchka_api::Protocol::Udp;
    let mut m = FirewallModel::new("0f2a6c1e");
    m.set_underlay(&underlay(&[])).expect("underlay");
    m.add(rules(&blue)).expect("udp 7481 is not the channel");
}

#[test]
fn nft_model_refuses_clashes() {
    let mut m = model(&[net("blue", "tk100", "10.10.0.0/24", "10.10.0.1")]);
    let same_bridge =
        NetPlan::from_desired(&net("red", "tk100", "10.11.0.0/24", "10.11.0.1")).expect("valid");
    let err = m.add(same_bridge.rules).expect_err("bridge clash");
    assert!(err.contains("already used by network blue"), "{err}");
}

fn hosts() -> Vec<DhcpHost> {
    vec![
        DhcpHost {
            mac: "52:54:00:0A:00:07".into(),
            ip: "10.10.0.7".into(),
            name: "web-1".into(),
        },
        DhcpHost {
            mac: "52:54:00:0a:00:05".into(),
            ip: "10.10.0.5".into(),
            name: "web-0".into(),
        },
    ]
}

#[test]
fn dnsmasq_golden() {
    let cfg = DnsmasqConfig {
        domain: "blue".into(),
        bridge: "tk100".into(),
        net: "10.10.0.0/24".parse().expect("cidr"),
        gateway: "10.10.0.1".parse().expect("ip"),
        files: DnsmasqFiles::in_dir(Path::new("/var/lib/tuchka/net/blue")),
        user: DnsmasqUser {
            user: "tuchka-dnsmasq".into(),
            group: "tuchka-dnsmasq".into(),
        },
    };
    let mut args = dnsmasq_args(&cfg).join("\n");
    args.push('\n');
    golden("dnsmasq-args.txt", &args);
    golden("dnsmasq-dhcp-hosts", &render_dhcp_hosts(&hosts()));
    golden("dnsmasq-addn-hosts", &render_addn_hosts(&hosts(), "blue"));
}

#[test]
fn meta_data_golden_with_awkward_values() {
    let keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk user@laptop".to_string(),
        "ssh-rsa AAAAB3Nza \"quoted\" comment: with # and \\ backslash".to_string(),
    ];
    golden(
        "meta-data.yaml",
        &render_meta_data("6d3f1a9e-5b7c-4e21-9a0b-1c2d3e4f5a6b", "web-0", &keys),
    );
    let tricky = render_meta_data("id", "name: \"x\"\n- y", &[]);
    assert_eq!(
        tricky,
        "instance-id: \"id\"\nlocal-hostname: \"name: \\\"x\\\"\\n- y\"\n"
    );
}

#[test]
fn migratable_xml_is_retargeted_to_the_destination_pool() {
    // A migratable XML as libvirt 9 gives it for a tuchka VM (plus a data disk outside the
    // pool and a NIC): only the pool's paths move; everything else stays byte for byte.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let input = std::fs::read_to_string(dir.join("migratable-h1.xml")).expect("input");
    let out = tuchka_host::retarget_domain_xml(
        &input,
        Path::new("/var/lib/tuchka/h1/pool"),
        Path::new("/srv/tuchka/h2/pool"),
    )
    .expect("retarget");
    golden("migratable-h1-to-h2.xml", &out);
    assert_eq!(
        out.matches("/srv/tuchka/h2/pool/").count(),
        4,
        "disk, seed, serial, console"
    );
    assert!(out.contains("/var/lib/tuchka/h1/pool-old/volumes/data.raw"));
}
