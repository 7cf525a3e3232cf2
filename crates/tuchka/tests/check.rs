//! `tuchka check` tells the truth about this machine and says how to fix what is missing.

mod common;

use std::process::Command;

#[test]
fn check_reports_this_machine() {
    common::require_host();
    let out = Command::new(common::bin())
        .args(["check", "-o", "json"])
        .output()
        .expect("tuchka check");
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("json list of checks");
    let find = |prefix: &str| {
        items
            .iter()
            .find(|i| i["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .cloned()
            .unwrap_or_else(|| panic!("no check {prefix:?} in {items:?}"))
    };

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let flags: Vec<&str> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .collect();
    let virt = flags.iter().any(|f| *f == "vmx" || *f == "svm");
    assert_eq!(find("cpu virtualization")["ok"], virt, "{items:?}");
    if !virt {
        assert!(
            find("cpu virtualization")["hint"]
                .as_str()
                .is_some_and(|h| !h.is_empty()),
            "a failed check says how to fix it"
        );
    }
    assert_eq!(find("libvirt")["ok"], true, "libvirtd runs for the tests");
    assert_eq!(find("tool qemu-img")["ok"], true);
    let all_ok = items.iter().all(|i| i["ok"] == true);
    assert_eq!(
        out.status.success(),
        all_ok,
        "exit code 1 exactly when something is missing"
    );
}
