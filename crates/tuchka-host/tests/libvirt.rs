//! Domain lifecycle against the real libvirtd (`qemu:///system`, TCG). The disk is an empty
//! overlay (no OS): enough for define/start/pause/stop/undefine. Everything created is named
//! `tkt…` and removed by Drop guards.

mod common;

use std::path::PathBuf;

use common::{ip_link, make_qcow2, sha256_file, wait_for, DomainGuard, NetGuard, Scratch, URI};
use tuchka_api::agent::NetworkDesired;
use tuchka_host::{
    Accel, Dataplane, DirStorage, DomainSpec, DomainState, HostError, Hypervisor, Libvirt,
    LinuxDataplane, NicSpec, Storage,
};

fn require() {
    common::require_root();
    common::require_libvirt();
    common::require_tool("qemu-img", "qemu-utils");
    common::require_tool("genisoimage", "genisoimage");
}

/// A pool with one cached 16 MiB image, a root disk and a seed for `vm_id`.
fn prepare(scratch: &Scratch, vm_id: &str) -> (DirStorage, PathBuf, PathBuf) {
    let st = DirStorage::open(&scratch.pool()).expect("open pool");
    let sha = "b".repeat(64);
    let src = scratch.dir.join("base.qcow2");
    make_qcow2(&src, 16);
    std::fs::copy(&src, st.image_partial_path(&sha)).expect("write partial");
    st.commit_image(&sha, &sha256_file(&src)).expect("commit");
    let root = st.ensure_root_disk(vm_id, &sha, 32).expect("root disk");
    let seed = st.ensure_seed(vm_id, "lifecycle", None, &[]).expect("seed");
    (st, root, seed)
}

fn state_of(hv: &dyn Hypervisor, name: &str) -> Option<DomainState> {
    hv.list()
        .expect("list")
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.state)
}

#[test]
fn domain_lifecycle() {
    require();
    let scratch = Scratch::new();
    let u = common::unique();
    let cloud = common::cloud_id();
    let vm_id = format!("tkt-vm-{u}");
    let name = format!("tkt-{u}-life");
    let _dom = DomainGuard(name.clone());
    let (st, root, seed) = prepare(&scratch, &vm_id);

    // A NIC on a bare bridge of our own (no dnsmasq needed).
    let net = NetworkDesired {
        name: format!("tkt{u}"),
        vni: 1,
        bridge: format!("tkt{u}"),
        cidr: "10.232.0.0/24".into(),
        gateway: "10.232.0.1".into(),
        gateway_here: false,
        mtu: 1400,
        hosts: vec![],
        nat: false,
        ingress: vec![],
        egress: vec![],
        forwards: vec![],
        vxlan: None,
    };
    let dp = LinuxDataplane::new(&scratch.pool(), &cloud);
    let tap = format!("tkt{u}t0");
    let _net = NetGuard {
        links: vec![net.bridge.clone(), tap.clone()],
        pid_files: vec![],
        table: Some(dp.table_name()),
    };
    dp.ensure_network(&net).expect("bridge");

    let hv = Libvirt::connect(URI, &cloud).expect("connect to libvirt");
    let mut spec = DomainSpec {
        name: name.clone(),
        vm_id: vm_id.clone(),
        cloud_id: cloud.clone(),
        accel: Accel::Tcg,
        vcpus: 1,
        max_vcpus: 1,
        volumes: vec![],
        memory_mib: 128,
        root_disk: root,
        seed_iso: seed,
        console_log: st.console_log_path(&vm_id),
        nics: vec![NicSpec {
            bridge: net.bridge.clone(),
            mac: "52:54:00:e7:00:01".into(),
            tap: tap.clone(),
            mtu: 1400,
        }],
    };

    hv.define(&spec).expect("define");
    let listed = hv.list().expect("list");
    let mine: Vec<_> = listed.iter().filter(|d| d.name == name).collect();
    assert_eq!(mine.len(), 1, "{listed:?}");
    assert_eq!(mine[0].vm_id, vm_id);
    assert_eq!(mine[0].state, DomainState::ShutOff);

    hv.start(&name).expect("start");
    assert_eq!(state_of(&hv, &name), Some(DomainState::Running));
    hv.start(&name).expect("start is idempotent");

    // libvirt made the tap from the XML: on our bridge, with the MTU.
    let link = ip_link(&tap).expect("tap exists while running");
    assert_eq!(link["master"], net.bridge.as_str());
    assert_eq!(link["mtu"], 1400);
    assert!(
        wait_for(10, || st.console_log_path(&vm_id).exists().then_some(())).is_some(),
        "the serial console log file is created"
    );

    hv.suspend(&name).expect("suspend");
    assert_eq!(state_of(&hv, &name), Some(DomainState::Paused));
    hv.suspend(&name).expect("suspend is idempotent");
    hv.resume(&name).expect("resume");
    assert_eq!(state_of(&hv, &name), Some(DomainState::Running));
    hv.resume(&name).expect("resume is idempotent");
    hv.shutdown(&name)
        .expect("ACPI shutdown request is accepted (no OS answers it here)");
    hv.reboot(&name).expect("ACPI reboot request is accepted");

    hv.destroy(&name).expect("destroy");
    assert_eq!(state_of(&hv, &name), Some(DomainState::ShutOff));
    hv.destroy(&name).expect("destroy is idempotent");
    hv.shutdown(&name)
        .expect("shutdown of a stopped domain is fine");
    assert!(matches!(hv.suspend(&name), Err(HostError::BadState { .. })));

    // Redefining updates the definition in place (same UUID).
    spec.memory_mib = 160;
    hv.define(&spec).expect("redefine");
    assert_eq!(
        hv.list()
            .expect("list")
            .iter()
            .filter(|d| d.name == name)
            .count(),
        1
    );
    let (ok, xml) = common::sh("virsh", &["-c", URI, "dumpxml", &name]);
    assert!(
        ok && xml.contains("<memory unit='KiB'>163840</memory>"),
        "new memory size applied"
    );

    // Another cloud on the same libvirtd does not see it and cannot remove it.
    let other = Libvirt::connect(URI, &common::cloud_id()).expect("connect as another cloud");
    assert!(other.list().expect("list").iter().all(|d| d.name != name));
    assert!(matches!(
        other.undefine(&name),
        Err(HostError::ForeignDomain { .. })
    ));
    assert!(matches!(
        other.start(&name),
        Err(HostError::ForeignDomain { .. })
    ));

    hv.undefine(&name).expect("undefine");
    assert_eq!(state_of(&hv, &name), None);
    hv.undefine(&name).expect("undefine is idempotent");
    assert!(matches!(hv.start(&name), Err(HostError::NoDomain { .. })));

    dp.remove_network(&net.name).expect("remove network");
}

#[test]
fn undefine_stops_a_running_domain_and_hostile_names_work() {
    require();
    let scratch = Scratch::new();
    let u = common::unique();
    let cloud = common::cloud_id();
    let vm_id = format!("tkt-vm-{u}");
    let name = format!("tkt-{u}-'<&\"");
    let _dom = DomainGuard(name.clone());
    let (st, root, seed) = prepare(&scratch, &vm_id);
    let hv = Libvirt::connect(URI, &cloud).expect("connect");
    let spec = DomainSpec {
        name: name.clone(),
        vm_id: vm_id.clone(),
        cloud_id: cloud.clone(),
        accel: Accel::Tcg,
        vcpus: 1,
        max_vcpus: 1,
        volumes: vec![],
        memory_mib: 128,
        root_disk: root,
        seed_iso: seed,
        console_log: st.console_log_path(&vm_id),
        nics: vec![],
    };
    hv.define(&spec)
        .expect("define a domain whose name needs escaping");
    hv.start(&name).expect("start");
    let listed = hv.list().expect("list");
    assert!(
        listed
            .iter()
            .any(|d| d.name == name && d.vm_id == vm_id && d.state == DomainState::Running),
        "{listed:?}"
    );
    hv.undefine(&name).expect("undefine a running domain");
    assert!(hv.list().expect("list").iter().all(|d| d.name != name));
}

#[test]
fn unreachable_libvirt_is_a_clear_error() {
    let err = Libvirt::connect("qemu+unix:///system?socket=/nonexistent/tkt-sock", "c")
        .expect_err("no daemon there");
    assert!(matches!(err, HostError::Connect { .. }));
    assert!(err.to_string().contains("start-libvirt"), "{err}");
}
