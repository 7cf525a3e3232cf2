//! End to end on one host: the project's test image (scripts/build-test-image) booted through
//! Storage + Dataplane + Hypervisor under TCG. Checks what a user would: the guest gets its
//! reserved address from our dnsmasq, knows its name from the seed, answers HTTP, resolves in
//! DNS, and powers off on an ACPI shutdown.

mod common;

use std::path::Path;

use common::{console_has, http_get, sha256_file, wait_for, DomainGuard, NetGuard, Scratch, URI};
use tuchka_api::agent::{DhcpHost, NetworkDesired};
use tuchka_host::{
    Accel, Dataplane, DirStorage, DomainSpec, DomainState, Hypervisor, Libvirt, LinuxDataplane,
    NicSpec, Storage,
};

fn build_test_image(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-image");
    assert!(script.exists(), "{} is missing", script.display());
    let res = std::process::Command::new(&script)
        .arg(out)
        .output()
        .expect("run scripts/build-test-image");
    assert!(
        res.status.success(),
        "scripts/build-test-image failed (see ./scripts/install-deps):\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn test_image_boots_gets_its_address_and_shuts_down() {
    common::require_root();
    common::require_libvirt();
    common::require_tool("qemu-img", "qemu-utils");
    common::require_tool("genisoimage", "genisoimage");
    common::require_tool("dnsmasq", "dnsmasq-base");
    common::require_tool("nft", "nftables");

    let scratch = Scratch::new();
    let u = common::unique();
    let cloud = common::cloud_id();
    let vm_id = format!("tkt-vm-{u}");
    let vm_name = format!("tkt-{u}");
    let domain = format!("tkt-{u}-boot");
    let third = u8::from_str_radix(&u[..2], 16).unwrap_or(1);
    let ip = format!("10.233.{third}.10");
    let mac = "52:54:00:e8:00:10".to_string();
    let net = NetworkDesired {
        name: format!("tkt{u}"),
        vni: 2,
        bridge: format!("tkt{u}"),
        cidr: format!("10.233.{third}.0/24"),
        gateway: format!("10.233.{third}.1"),
        gateway_here: true,
        mtu: 1450,
        hosts: vec![DhcpHost {
            mac: mac.clone(),
            ip: ip.clone(),
            name: vm_name.clone(),
        }],
        nat: false,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: None,
    };
    let dp = LinuxDataplane::new(&scratch.pool(), &cloud);
    let tap = format!("tkt{u}t0");
    let _dom = DomainGuard(domain.clone());
    let _net = NetGuard {
        links: vec![net.bridge.clone(), tap.clone()],
        pid_files: vec![scratch
            .pool()
            .join("net")
            .join(&net.name)
            .join("dnsmasq.pid")],
        table: Some(dp.table_name()),
    };

    let st = DirStorage::open(&scratch.pool()).expect("pool");
    let image = scratch.dir.join("test-image.qcow2");
    build_test_image(&image);
    let sha = sha256_file(&image);
    std::fs::copy(&image, st.image_partial_path(&sha)).expect("partial");
    st.commit_image(&sha, &sha).expect("commit");
    let root = st.ensure_root_disk(&vm_id, &sha, 64).expect("root disk");
    let seed = st.ensure_seed(&vm_id, &vm_name, None, &[]).expect("seed");
    dp.ensure_network(&net).expect("network");

    let hv = Libvirt::connect(URI, &cloud).expect("libvirt");
    let log = st.console_log_path(&vm_id);
    hv.define(&DomainSpec {
        name: domain.clone(),
        vm_id: vm_id.clone(),
        cloud_id: cloud.clone(),
        accel: Accel::Tcg,
        vcpus: 1,
        max_vcpus: 1,
        volumes: vec![],
        memory_mib: 256,
        root_disk: root,
        seed_iso: seed,
        console_log: log.clone(),
        nics: vec![NicSpec {
            bridge: net.bridge.clone(),
            mac,
            tap,
            mtu: 1450,
        }],
    })
    .expect("define");
    hv.start(&domain).expect("start");

    let ready = wait_for(120, || console_has(&log, "TESTIMG-READY").then_some(()));
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(
        ready.is_some(),
        "guest did not reach TESTIMG-READY in 120 s; console:\n{console}"
    );
    assert!(
        console.contains(&format!("TESTIMG-HOSTNAME {vm_name}")),
        "hostname from the seed; console:\n{console}"
    );
    assert!(
        console.contains(&format!("TESTIMG-IP eth0 {ip}")),
        "reserved address from dnsmasq; console:\n{console}"
    );

    let page = wait_for(20, || http_get(&ip).filter(|p| p.contains(&vm_name)));
    assert!(
        page.is_some(),
        "the guest answers HTTP on {ip} with its name"
    );
    assert_eq!(
        common::dns_a(&net.gateway, &format!("{vm_name}.{}", net.name)),
        vec![ip.clone()]
    );

    hv.shutdown(&domain).expect("ACPI shutdown");
    let off = wait_for(60, || {
        (hv.list().ok()?.iter().find(|d| d.name == domain)?.state == DomainState::ShutOff)
            .then_some(())
    });
    assert!(off.is_some(), "guest powered off after ACPI shutdown");
    assert!(console_has(&log, "TESTIMG-SHUTDOWN") || console_has(&log, "TESTIMG-POWERBUTTON"));

    hv.undefine(&domain).expect("undefine");
    st.remove_vm(&vm_id).expect("remove vm");
    dp.remove_network(&net.name).expect("remove network");
}
