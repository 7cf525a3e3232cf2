//! `tuchka check` items and host facts on this machine.

mod common;

use common::Scratch;
use tuchka_host::{host_facts, run_checks, Accel, DirStorage};

#[test]
fn checks_on_this_host() {
    common::require_libvirt();
    let items = run_checks(common::URI);
    let get = |name: &str| {
        items
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {items:?}"))
    };
    assert!(get("libvirt").ok, "{:?}", get("libvirt"));
    assert!(
        get("/dev/kvm").ok,
        "start-libvirt makes /dev/kvm root:kvm 0660: {:?}",
        get("/dev/kvm")
    );
    for tool in [
        "qemu-img",
        "genisoimage or xorriso",
        "dnsmasq",
        "nft",
        "ip",
        "qemu-system-x86_64",
    ] {
        assert!(get(&format!("tool {tool}")).ok, "{tool}");
    }
    let accel = get("accelerator");
    assert!(accel.ok && accel.detail.starts_with("tcg:"), "{accel:?}");
    for i in &items {
        assert!(
            i.ok || i.hint.is_some(),
            "a failed check says how to fix it: {i:?}"
        );
    }
}

#[test]
fn unreachable_libvirt_check_names_the_fix() {
    let items = run_checks("qemu+unix:///system?socket=/nonexistent/tkt-sock");
    let lv = items
        .iter()
        .find(|i| i.name == "libvirt")
        .expect("libvirt check");
    assert!(!lv.ok);
    assert!(
        lv.hint
            .as_deref()
            .is_some_and(|h| h.contains("./scripts/start-libvirt")),
        "{lv:?}"
    );
}

#[test]
fn facts_describe_this_host() {
    let scratch = Scratch::new();
    let st = DirStorage::open(&scratch.pool()).expect("pool");
    let f = host_facts(&st, Accel::Tcg, "test").expect("facts");
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .expect("cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(f.cpus as usize, cpus);
    assert!(f.memory_mib > 100, "{f:?}");
    assert!(f.disk_mib > 0 && f.disk_free_mib <= f.disk_mib, "{f:?}");
    assert_eq!((f.accel.as_str(), f.accel_reason.as_str()), ("tcg", "test"));
}
