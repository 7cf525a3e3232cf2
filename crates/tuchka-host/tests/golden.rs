//! Golden-file tests of everything tuchka-host renders: domain XML, the nft script, dnsmasq
//! arguments and files, NoCloud meta-data. Pure; no libvirt needed.
//!
//! To accept a deliberate change: `UPDATE_GOLDEN=1 cargo test -p tuchka-host --test golden`,
//! then review the diff of `tests/golden/`.

use std::path::{Path, PathBuf};

use tuchka_api::agent::DhcpHost;
use tuchka_host::domain_xml::{domain_uuid, parse_vm_metadata};
use tuchka_host::net::cidr::Ipv4Net;
use tuchka_host::net::dnsmasq::{
    dnsmasq_args, render_addn_hosts, render_dhcp_hosts, DnsmasqConfig, DnsmasqFiles,
};
use tuchka_host::net::nft::{render_firewall, FirewallModel};
use tuchka_host::seed::render_meta_data;
use tuchka_host::{render_domain_xml, Accel, DomainSpec, NicSpec};

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

#[test]
fn nft_golden_two_bridges() {
    let model = FirewallModel {
        cloud8: "0f2a6c1e".into(),
        bridges: vec!["tk101".into(), "tk100".into()],
    };
    golden("firewall-two-bridges.nft", &render_firewall(&model));
}

#[test]
fn nft_golden_no_bridges_only_deletes_the_table() {
    let model = FirewallModel {
        cloud8: "0f2a6c1e".into(),
        bridges: vec![],
    };
    golden("firewall-empty.nft", &render_firewall(&model));
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
        net: Ipv4Net::parse("10.10.0.0/24").expect("cidr"),
        gateway: "10.10.0.1".parse().expect("ip"),
        files: DnsmasqFiles::in_dir(Path::new("/var/lib/tuchka/net/blue")),
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
