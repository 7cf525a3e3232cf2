//! `tuchka check` for this host, and the host facts an agent registers with.
//!
//! The checks read `/proc/cpuinfo`, `/dev/kvm`, `/etc/group`, the tool search path and libvirt;
//! the verdicts are made by small pure functions so they can be tested with any input.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use tuchka_api::agent::HostFacts;
use tuchka_api::CheckItem;

use crate::accel::{probe_accel, Accel, AccelChoice};
use crate::cmd;
use crate::storage::Storage;
use crate::HostError;

const START_LIBVIRT: &str = "./scripts/start-libvirt";

fn item(name: &str, ok: bool, detail: impl Into<String>, hint: Option<String>) -> CheckItem {
    CheckItem {
        name: name.to_string(),
        ok,
        detail: detail.into(),
        hint: if ok { None } else { hint },
    }
}

/// The `flags` of the first CPU in a `/proc/cpuinfo` text.
pub fn cpu_flags(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "flags").then(|| v.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// Pure: the two CPU checks (hardware virtualization, second-level address translation).
pub fn check_cpu(flags: &[String]) -> Vec<CheckItem> {
    let has = |f: &str| flags.iter().any(|x| x == f);
    let virt = ["vmx", "svm"].into_iter().find(|f| has(f));
    let slat = ["ept", "npt"].into_iter().find(|f| has(f));
    vec![
        item(
            "cpu virtualization (vmx/svm)",
            virt.is_some(),
            virt.map(|f| format!("{f} present")).unwrap_or_else(|| "neither vmx nor svm in /proc/cpuinfo".into()),
            Some("enable VT-x/AMD-V in the firmware (or nested virtualization for a VM host); without it guests run under TCG, which is slow".into()),
        ),
        item(
            "cpu second-level paging (ept/npt)",
            slat.is_some(),
            slat.map(|f| format!("{f} present")).unwrap_or_else(|| "neither ept nor npt (rvi) in /proc/cpuinfo".into()),
            Some("without EPT/NPT, KVM guests are much slower; check the CPU and firmware settings".into()),
        ),
    ]
}

/// Pure: the `/dev/kvm` check from its owner, group, mode and the `kvm` group's gid.
pub fn check_kvm_node(node: Option<(u32, u32, u32)>, kvm_gid: Option<u32>) -> CheckItem {
    let hint = Some(format!(
        "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (or {START_LIBVIRT})"
    ));
    match node {
        None => item(
            "/dev/kvm",
            false,
            "/dev/kvm does not exist",
            Some("load the kvm module (kvm_intel/kvm_amd); guests will use TCG meanwhile".into()),
        ),
        Some((uid, gid, mode)) => {
            let mode = mode & 0o777;
            let ok = uid == 0 && Some(gid) == kvm_gid && mode == 0o660;
            let group = if Some(gid) == kvm_gid {
                "kvm".to_string()
            } else {
                gid.to_string()
            };
            item(
                "/dev/kvm",
                ok,
                format!("owner uid {uid}, group {group}, mode {mode:04o} (want root:kvm 0660)"),
                hint,
            )
        }
    }
}

/// Pure: the gid of `name` in an `/etc/group` text.
pub fn group_gid(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Pure: a tool check from where each candidate was found.
pub fn check_tool(
    label: &str,
    found: &[(&str, Option<std::path::PathBuf>)],
    package: &str,
) -> CheckItem {
    match found.iter().find_map(|(n, p)| p.as_ref().map(|p| (n, p))) {
        Some((_, path)) => item(
            &format!("tool {label}"),
            true,
            path.display().to_string(),
            None,
        ),
        None => item(
            &format!("tool {label}"),
            false,
            "not found in PATH, /usr/sbin or /sbin",
            Some(format!(
                "apt-get install {package} (or ./scripts/install-deps)"
            )),
        ),
    }
}

/// Reachability of libvirt at `uri`.
fn check_libvirt(uri: &str) -> CheckItem {
    if uri.contains('\0') {
        return item("libvirt", false, "URI contains a NUL byte", None);
    }
    virt::error::clear_error_callback();
    match virt::connect::Connect::open(Some(uri)) {
        Ok(mut c) => {
            let version = c
                .get_lib_version()
                .map(|v| format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000));
            let _ = c.close();
            item(
                "libvirt",
                true,
                format!(
                    "reachable at {uri} (libvirt {})",
                    version.unwrap_or_else(|_| "?".into())
                ),
                None,
            )
        }
        Err(e) => item(
            "libvirt",
            false,
            format!("cannot connect to {uri}: {}", e.message()),
            Some(format!("start libvirtd: {START_LIBVIRT}")),
        ),
    }
}

/// All checks of this host: CPU flags, `/dev/kvm`, libvirt at `libvirt_uri`, the tools, and the
/// accelerator probe (takes up to 3 s).
pub fn run_checks(libvirt_uri: &str) -> Vec<CheckItem> {
    let mut items = check_cpu(&cpu_flags(
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
    ));
    let node = std::fs::metadata("/dev/kvm")
        .ok()
        .map(|m| (m.uid(), m.gid(), m.permissions().mode()));
    let kvm_gid = group_gid(
        &std::fs::read_to_string("/etc/group").unwrap_or_default(),
        "kvm",
    );
    items.push(check_kvm_node(node, kvm_gid));
    items.push(check_libvirt(libvirt_uri));
    let tools: [(&str, &[&str], &str); 6] = [
        ("qemu-img", &["qemu-img"], "qemu-utils"),
        (
            "genisoimage or xorriso",
            &["genisoimage", "xorriso"],
            "genisoimage",
        ),
        ("dnsmasq", &["dnsmasq"], "dnsmasq-base"),
        ("nft", &["nft"], "nftables"),
        ("ip", &["ip"], "iproute2"),
        (
            "qemu-system-x86_64",
            &["qemu-system-x86_64"],
            "qemu-system-x86",
        ),
    ];
    for (label, names, package) in tools {
        let found: Vec<(&str, Option<std::path::PathBuf>)> =
            names.iter().map(|n| (*n, cmd::find_tool(n))).collect();
        items.push(check_tool(label, &found, package));
    }
    let (accel, reason) = probe_accel(AccelChoice::Auto);
    items.push(item(
        "accelerator",
        true,
        format!("{accel}: {reason}"),
        None,
    ));
    items
}

/// Pure: logical CPUs in a `/proc/cpuinfo` text (`processor` lines).
pub fn count_cpus(cpuinfo: &str) -> u32 {
    let n = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Pure: `MemTotal` in MiB from a `/proc/meminfo` text.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo_mib(meminfo, "MemTotal:")
}

/// A `/proc/meminfo` field (`MemTotal:`, `MemAvailable:`, …) in MiB.
pub fn meminfo_mib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024)
    })
}

/// The 1-minute load average from `/proc/loadavg` text.
pub fn load_1m(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// Facts for registration and reports: CPUs and memory of the host, size and free space of the
/// storage pool, the accelerator with its reason, and the ports something listens on.
pub fn host_facts(
    storage: &dyn Storage,
    accel: Accel,
    accel_reason: &str,
) -> Result<HostFacts, HostError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = match count_cpus(&cpuinfo) {
        0 => std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(1))
            .unwrap_or(1),
        n => n,
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| HostError::io("host", "read", "/proc/meminfo", e))?;
    let memory_mib = mem_total_mib(&meminfo)
        .ok_or_else(|| HostError::invalid("host", "/proc/meminfo has no MemTotal line"))?;
    let (disk_mib, disk_free_mib) = storage.capacity()?;
    let usage = storage.usage().unwrap_or_default();
    Ok(HostFacts {
        cpus,
        memory_mib,
        disk_mib,
        disk_free_mib,
        accel: accel.as_str().to_string(),
        accel_reason: accel_reason.to_string(),
        listening_ports: crate::net::listening::listening_ports()
            .map_err(|e| HostError::io("host", "read", "/proc/net/{tcp,udp}", e))?,
        // The agent fills it from its configuration (the address other hosts reach it on).
        address: String::new(),
        load_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .as_deref()
            .and_then(load_1m)
            .unwrap_or(0.0),
        memory_available_mib: meminfo_mib(&meminfo, "MemAvailable:").unwrap_or(0),
        memory_in_use_mib: memory_mib
            .saturating_sub(meminfo_mib(&meminfo, "MemAvailable:").unwrap_or(memory_mib)),
        // The agent fills these: CPU usage needs two samples, the channel and pool are its own.
        cpu_usage: 0.0,
        channel_port: 0,
        pool: String::new(),
        disk_allocated_mib: usage.allocated_mib,
        disk_provisioned_mib: usage.provisioned_mib,
        image_cache_mib: usage.image_cache_mib,
        // The agent fills it: the time of its last pass.
        pass_ms: 0,
    })
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn parses_load_and_available_memory() {
        assert_eq!(load_1m("0.52 0.40 0.33 2/345 6789\n"), Some(0.52));
        assert_eq!(load_1m(""), None);
        let mi = "MemTotal:       24576000 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(meminfo_mib(mi, "MemAvailable:"), Some(20000));
        assert_eq!(mem_total_mib(mi), Some(24000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_checks_read_flags() {
        let info = "processor\t: 0\nflags\t\t: fpu vmx ept lm\nprocessor\t: 1\nflags\t\t: fpu vmx ept lm\n";
        let items = check_cpu(&cpu_flags(info));
        assert!(items.iter().all(|i| i.ok));
        assert_eq!(count_cpus(info), 2);
        let none = check_cpu(&cpu_flags("flags : fpu lm hypervisor\n"));
        assert!(none.iter().all(|i| !i.ok && i.hint.is_some()));
    }

    #[test]
    fn kvm_node_must_be_root_kvm_0660() {
        assert!(check_kvm_node(Some((0, 107, 0o20660)), Some(107)).ok);
        let bad = check_kvm_node(Some((0, 0, 0o20600)), Some(107));
        assert!(!bad.ok);
        assert!(bad
            .hint
            .as_deref()
            .is_some_and(|h| h.contains("chmod 0660")));
        assert!(!check_kvm_node(None, Some(107)).ok);
    }

    #[test]
    fn parses_group_and_meminfo() {
        assert_eq!(
            group_gid("root:x:0:\nkvm:x:107:libvirt-qemu\n", "kvm"),
            Some(107)
        );
        assert_eq!(group_gid("root:x:0:\n", "kvm"), None);
        assert_eq!(
            mem_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24000)
        );
    }

    #[test]
    fn tool_check_names_the_package() {
        let missing = check_tool("nft", &[("nft", None)], "nftables");
        assert!(
            !missing.ok
                && missing
                    .hint
                    .as_deref()
                    .is_some_and(|h| h.contains("nftables"))
        );
        let found = check_tool(
            "x or y",
            &[("x", None), ("y", Some("/usr/bin/y".into()))],
            "x",
        );
        assert!(found.ok && found.detail == "/usr/bin/y");
    }
}
