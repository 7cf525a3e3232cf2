//! The single-host cloud end to end, the way a user runs it: upload the test image, create a
//! network and a group of 3 VMs, check each answers HTTP on its IPAM address with its own name,
//! then pause/resume, stop/start, reboot, scale 3→5→2, restart `tuchka serve` under running VMs,
//! and remove everything — checking that nothing is left on the host.
//!
//! VMs are TCG guests of the project's own test image (scripts/build-test-image).

mod common;

use std::time::Duration;

use common::{domains_with_prefix, http_get, link_exists, Cloud};

fn cidr() -> String {
    let p = std::process::id();
    format!("10.{}.{}.0/24", 200 + p % 50, (p / 50) % 256)
}

fn state(c: &Cloud, vm: &str) -> String {
    c.vm(vm)["state"].as_str().unwrap_or_default().to_string()
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Secrets and guest data after a real run: readable by root (and the qemu user libvirt hands
/// a running VM's disks to) only.
fn check_private_files(c: &Cloud, vm_id: &str, sha: &str) {
    use std::os::unix::fs::MetadataExt;
    let d = &c.dir;
    let vm = d.join("pool/vms").join(vm_id);
    let expect = [
        (d.join("state.db"), 0o600),
        (d.join("state.db-wal"), 0o600),
        (d.join("state.db-shm"), 0o600),
        (d.join("token"), 0o600),
        (d.join("join-token"), 0o600),
        (d.join("images"), 0o700),
        (d.join("images/tmp"), 0o700),
        (d.join("images").join(format!("{sha}.qcow2")), 0o400),
        (d.join("pool"), 0o711),
        (d.join("pool/vms"), 0o711),
        (d.join("pool/images"), 0o711),
        (d.join("pool/images").join(format!("{sha}.qcow2")), 0o400),
        (vm.clone(), 0o711),
        (vm.join("root.qcow2"), 0o600),
        (vm.join("seed.iso"), 0o600),
        (vm.join("seed"), 0o700),
        (vm.join("seed/user-data"), 0o600),
        (vm.join("seed/meta-data"), 0o600),
    ];
    let wrong: Vec<String> = expect
        .iter()
        .filter(|(p, m)| mode(p) != *m)
        .map(|(p, m)| format!("{} is {:04o}, want {m:04o}", p.display(), mode(p)))
        .collect();
    assert!(wrong.is_empty(), "file modes:\n{}", wrong.join("\n"));
    let log = vm.join("console.log");
    assert_eq!(
        mode(&log) & 0o077,
        0,
        "{} is {:04o}",
        log.display(),
        mode(&log)
    );
    // qemu runs as libvirt-qemu: libvirt handed it the running VM's disk (it answers HTTP, so
    // qemu could open it), not to everyone.
    let qemu_uid = std::process::Command::new("id")
        .args(["-u", "libvirt-qemu"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(uid) = qemu_uid {
        let owner = std::fs::metadata(vm.join("root.qcow2"))
            .expect("disk")
            .uid();
        assert_eq!(owner, uid, "a running VM's disk belongs to libvirt-qemu");
    }
}

fn answers(c: &Cloud, vm: &str, within: Duration) {
    let ip = c.ip(vm);
    c.wait_for(
        &format!("{vm} ({ip}) to answer HTTP with its name"),
        within,
        || http_get(ip, 80).as_deref() == Some(vm),
    );
}

#[test]
fn single_host_cloud_end_to_end() {
    let image = common::test_image();
    let mut c = Cloud::start("life");
    let img = c
        .ok(&[
            "image",
            "upload",
            image.to_str().expect("path"),
            "--name",
            "tiny",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(img["source_format"], "qcow2");
    assert_eq!(img["sha256"].as_str().map(str::len), Some(64));

    let cidr = cidr();
    c.ok(&["net", "create", "lan", "--cidr", &cidr, "--wait"]);
    c.track_network("lan");
    let net = c.ok(&["net", "show", "lan", "-o", "json"]).json();
    let bridge = net["bridge"].as_str().expect("bridge").to_string();
    assert!(link_exists(&bridge), "bridge {bridge} should exist");

    let user_data = c.dir.join("init.sh");
    std::fs::write(&user_data, "#!/bin/sh\necho USERDATA-RAN-$(hostname)\n").expect("user-data");
    let key = c.dir.join("id.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBogusKeyForTests test@tuchka\n",
    )
    .expect("key");
    c.ok(&[
        "group",
        "create",
        "web",
        "--image",
        "tiny",
        "--count",
        "3",
        "--cpus",
        "1",
        "--memory",
        "192M",
        "--disk",
        "1G",
        "--net",
        "lan",
        "--user-data",
        user_data.to_str().expect("p"),
        "--ssh-key",
        key.to_str().expect("p"),
        "--wait",
    ]);
    let vms = c.ok(&["vm", "list", "-o", "json"]).json();
    let vms = vms.as_array().expect("list");
    assert_eq!(vms.len(), 3);
    for (i, v) in vms.iter().enumerate() {
        assert_eq!(v["name"], format!("web-{i}"));
        assert_eq!(v["group"], "web");
        assert_eq!(v["state"], "running");
        assert_eq!(v["host"], c.host.as_str());
        assert_eq!(v["addresses"][0]["network"], "lan");
    }
    for vm in ["web-0", "web-1", "web-2"] {
        answers(&c, vm, Duration::from_secs(120));
        let console = c.ok(&["vm", "console", vm]).out;
        c.wait_for(
            &format!("user-data marker in {vm}'s console"),
            Duration::from_secs(30),
            || {
                c.ok(&["vm", "console", vm])
                    .out
                    .contains(&format!("USERDATA-RAN-{vm}"))
            },
        );
        assert!(
            console.contains("TESTIMG-"),
            "console of {vm} shows the guest's markers"
        );
    }
    // DNS on the gateway: <vm>.<net> and the short name resolve to the reserved addresses.
    let gateway: std::net::Ipv4Addr = net["gateway"]
        .as_str()
        .expect("gateway")
        .parse()
        .expect("ip");
    assert_eq!(common::dns_a(gateway, "web-1.lan"), Some(c.ip("web-1")));
    assert_eq!(common::dns_a(gateway, "web-2"), Some(c.ip("web-2")));
    assert_eq!(common::dns_a(gateway, "nope.lan"), None);

    // Root disks are thin qcow2 overlays on the host's cached image, grown to --disk.
    let id = c.vm("web-0")["id"].as_str().expect("id").to_string();
    let root_disk = c.dir.join("pool/vms").join(&id).join("root.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&root_disk)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    let cached = c
        .dir
        .join("pool/images")
        .join(format!("{}.qcow2", img["sha256"].as_str().expect("sha")));
    assert_eq!(info["backing-filename"].as_str(), cached.to_str(), "{info}");
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert!(
        std::fs::metadata(&root_disk).expect("disk").len() < 8 << 20,
        "an overlay, not a copy"
    );

    // The table view names every VM with its address.
    let table = c.ok(&["vm", "list"]).out;
    assert!(
        table.contains("web-1") && table.contains(&c.ip("web-1").to_string()),
        "{table}"
    );

    // pause → HTTP stops answering; resume → it answers again.
    c.ok(&["vm", "pause", "web-1", "--wait"]);
    assert_eq!(state(&c, "web-1"), "paused");
    assert_eq!(
        http_get(c.ip("web-1"), 80),
        None,
        "a paused VM must not answer"
    );
    c.ok(&["vm", "resume", "web-1", "--wait"]);
    assert_eq!(state(&c, "web-1"), "running");
    answers(&c, "web-1", Duration::from_secs(30));

    // stop (ACPI) → stopped; start → answers again.
    c.ok(&["vm", "stop", "web-2", "--timeout", "60", "--wait"]);
    assert_eq!(state(&c, "web-2"), "stopped");
    let log = std::fs::read_to_string(
        c.dir
            .join("pool/vms")
            .join(c.vm("web-2")["id"].as_str().expect("id"))
            .join("console.log"),
    )
    .unwrap_or_default();
    assert!(
        log.contains("TESTIMG-SHUTDOWN") || log.contains("TESTIMG-POWERBUTTON"),
        "stop must be an ACPI shutdown the guest saw"
    );
    assert_eq!(http_get(c.ip("web-2"), 80), None);
    c.ok(&["vm", "start", "web-2", "--wait"]);
    answers(&c, "web-2", Duration::from_secs(120));

    // reboot → comes back.
    let before = c
        .ok(&["vm", "console", "web-0"])
        .out
        .matches("TESTIMG-READY")
        .count();
    c.ok(&["vm", "reboot", "web-0", "--wait"]);
    c.wait_for("web-0 to boot again", Duration::from_secs(120), || {
        c.ok(&["vm", "console", "web-0"])
            .out
            .matches("TESTIMG-READY")
            .count()
            > before
    });
    answers(&c, "web-0", Duration::from_secs(60));

    // Restart the controller under running VMs: nothing changes for them.
    let states: Vec<String> = ["web-0", "web-1", "web-2"]
        .iter()
        .map(|v| state(&c, v))
        .collect();
    let ip0 = c.ip("web-0");
    c.stop_serve();
    assert_eq!(
        http_get(ip0, 80).as_deref(),
        Some("web-0"),
        "VMs keep running without the controller"
    );
    // Leftovers of a crash mid-write, planted while nothing runs: swept at the next start;
    // what is not a leftover (the disks, a resumable download) stays.
    let vm_dir = c.dir.join("pool/vms").join(&id);
    let planted = [
        vm_dir.join("root.qcow2.tmp999999"),
        vm_dir.join("seed.new/user-data"),
        c.dir.join("pool/captures/c-dead/work/disk.qcow2"),
        c.dir.join("images/tmp/upload-dead"),
    ];
    for p in &planted {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b"leftover").expect("plant");
    }
    let partial = c
        .dir
        .join("pool/images")
        .join(format!("{}.qcow2.partial", "e".repeat(64)));
    std::fs::write(&partial, b"resumable").expect("plant partial");
    let orphan_image = c
        .dir
        .join("images")
        .join(format!("{}.qcow2", "f".repeat(64)));
    std::fs::write(&orphan_image, b"no row names me").expect("plant orphan");
    c.spawn_serve(&["--accel", "tcg"]);
    for p in planted.iter().chain([&orphan_image]) {
        assert!(!p.exists(), "{} was not swept", p.display());
    }
    assert!(!vm_dir.join("seed.new").exists(), "seed staging dir swept");
    assert!(partial.exists(), "a partial download is kept (it resumes)");
    let _ = std::fs::remove_file(&partial);
    assert!(
        root_disk.exists() && vm_dir.join("seed.iso").exists(),
        "the VM's files stay"
    );
    let log = std::fs::read_to_string(c.dir.join("serve.log")).unwrap_or_default();
    assert!(
        log.contains("removed an image file no image names"),
        "the sweep is logged"
    );
    let after: Vec<String> = ["web-0", "web-1", "web-2"]
        .iter()
        .map(|v| state(&c, v))
        .collect();
    assert_eq!(states, after);
    answers(&c, "web-1", Duration::from_secs(10));

    check_private_files(&c, &id, img["sha256"].as_str().expect("sha"));

    // scale 3 → 5 → 2 (the highest indexes go).
    c.ok(&["group", "scale", "web", "--count", "5", "--wait"]);
    for vm in ["web-3", "web-4"] {
        assert_eq!(state(&c, vm), "running");
        answers(&c, vm, Duration::from_secs(120));
    }
    let removed_domains: Vec<String> = ["web-2", "web-3", "web-4"]
        .iter()
        .map(|v| c.vm(v)["domain"].as_str().expect("d").to_string())
        .collect();
    c.ok(&["group", "scale", "web", "--count", "2", "--wait"]);
    let names: Vec<String> = c
        .ok(&["vm", "list", "-o", "json"])
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].as_str().expect("n").to_string())
        .collect();
    assert_eq!(names, vec!["web-0", "web-1"]);
    for d in &removed_domains {
        assert!(
            domains_with_prefix(d).iter().all(|x| x != d),
            "domain {d} should be gone"
        );
    }

    // stop --force powers off at once.
    c.ok(&["vm", "stop", "web-1", "--force", "--wait"]);
    assert_eq!(state(&c, "web-1"), "stopped");
    assert_eq!(http_get(c.ip("web-1"), 80), None);

    // image rm and net rm are refused while in use.
    let err = c.fails(&["image", "rm", "tiny"]);
    assert!(err.contains("used by") && err.contains("web"), "{err}");
    let err = c.fails(&["net", "rm", "lan"]);
    assert!(err.contains("used by") && err.contains("web-0"), "{err}");

    // group rm / net rm / image rm: nothing left.
    let prefix = c.vm("web-0")["domain"]
        .as_str()
        .expect("d")
        .trim_end_matches("web-0")
        .to_string();
    c.ok(&["group", "rm", "web", "--wait"]);
    assert!(
        domains_with_prefix(&prefix).is_empty(),
        "no domain of this cloud is left"
    );
    let vm_dirs = std::fs::read_dir(c.dir.join("pool/vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(vm_dirs, 0, "no VM disks or seeds are left");
    assert_eq!(
        c.ok(&["vm", "list", "-o", "json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(
        c.ok(&["net", "show", "lan", "-o", "json"]).json()["addresses"],
        serde_json::json!([]),
        "addresses released"
    );
    let pidfile = c.dir.join("pool/net/lan/dnsmasq.pid");
    let dnsmasq_pid = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .to_string();
    c.ok(&["net", "rm", "lan", "--wait"]);
    assert!(!link_exists(&bridge), "bridge {bridge} should be gone");
    // A killed daemon may linger as a zombie until PID 1 reaps it; its cmdline is then empty.
    let cmdline =
        std::fs::read_to_string(format!("/proc/{dnsmasq_pid}/cmdline")).unwrap_or_default();
    assert!(
        !dnsmasq_pid.is_empty() && !cmdline.contains("dnsmasq"),
        "dnsmasq should be gone"
    );
    assert!(!c.dir.join("pool/net/lan").exists());
    c.ok(&["image", "rm", "tiny"]);
    assert_eq!(
        c.ok(&["image", "list", "-o", "json"]).json(),
        serde_json::json!([])
    );
    c.wait_for(
        "the host's image cache to be emptied",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(c.dir.join("pool/images"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
                        .count()
                })
                .unwrap_or(0)
                == 0
        },
    );
    let stored = std::fs::read_dir(c.dir.join("images"))
        .expect("images dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .count();
    assert_eq!(stored, 0, "the image store is empty");
}
