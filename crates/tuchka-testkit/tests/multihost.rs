//! Real tests of the multi-host harness: three simulated hosts with their own libvirtd, wired
//! by a fabric, running TCG guests; and nothing left behind afterwards.
//!
//! Needs root, libvirt (libvirtd, virtlogd, virsh), qemu-system-x86, iproute2, util-linux and
//! busybox-static (for `ping`); a missing one fails the test with its name. The tests run one
//! at a time (each starts three libvirtds) and never touch the system libvirtd.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tuchka_testkit::multihost::process_is_running;
use tuchka_testkit::{MultiHost, SimHost};

/// One harness at a time: keeps CPU use modest on a machine shared with other VM tests.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn require_host() {
    assert!(
        is_root(),
        "the multi-host harness needs root (network namespaces, mounts, libvirtd)"
    );
    for (tool, package) in [
        ("virsh", "libvirt-clients"),
        ("libvirtd", "libvirt-daemon-system"),
        ("virtlogd", "libvirt-daemon-system"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("taskset", "util-linux"),
        ("busybox", "busybox-static"),
    ] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        assert!(
            found,
            "`{tool}` is missing: install the Debian package {package} (./scripts/install-deps)"
        );
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn up(n: usize) -> MultiHost {
    let t = Instant::now();
    let mh = MultiHost::up(n).unwrap_or_else(|e| panic!("multihost up {n}: {e}"));
    eprintln!(
        "multihost up {n}: {:.2?} ({})",
        t.elapsed(),
        mh.dir().display()
    );
    mh
}

/// `virsh -c URI ARGS…` from the root namespace; panics with stderr on failure.
fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh -c {uri} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn running_domains(uri: &str) -> Vec<String> {
    virsh(uri, &["list", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// A diskless TCG domain: SeaBIOS finds nothing to boot and idles.
fn tiny_domain_xml(name: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os></domain>"
    )
}

fn create_domain(mh: &MultiHost, host: &SimHost, name: &str) {
    let xml = mh.dir().join(format!("{name}.xml"));
    std::fs::write(&xml, tiny_domain_xml(name)).expect("write domain XML");
    virsh(
        &host.libvirt_uri,
        &["create", xml.to_str().expect("utf-8 path")],
    );
}

fn netns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Whether process `pid` is in the network namespace of `host`.
fn in_host_netns(pid: u32, host: &SimHost) -> bool {
    let want = netns_inode(&format!("/run/netns/{}", host.netns));
    want.is_some() && want == netns_inode(&format!("/proc/{pid}/ns/net"))
}

fn qemu_pid(mh: &MultiHost, host: &SimHost, domain: &str) -> u32 {
    let path = mh
        .dir()
        .join(&host.name)
        .join(format!("run/qemu/{domain}.pid"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

fn system_libvirtd_pid() -> Option<String> {
    std::fs::read_to_string("/run/libvirtd.pid")
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn three_hosts_have_their_own_libvirtd_and_reach_each_other() {
    require_host();
    let _serial = serial();
    let mh = up(3);
    assert_eq!(mh.hosts().len(), 3);

    let mut uuids = Vec::new();
    for host in mh.hosts() {
        // From the root namespace, through the unix socket under DIR.
        let version = virsh(&host.libvirt_uri, &["version"]);
        assert!(version.contains("QEMU"), "{}: {version}", host.name);
        let caps = virsh(&host.libvirt_uri, &["capabilities"]);
        let uuid = caps
            .split("<uuid>")
            .nth(1)
            .and_then(|s| s.split("</uuid>").next())
            .expect("host uuid in capabilities")
            .to_string();
        uuids.push(uuid);
        // From inside the host, the way an agent will see it.
        let hostname = mh.run(&host.name, &["hostname"]).expect("hostname");
        assert_eq!(hostname, host.name);
        let inside = mh
            .run(&host.name, &["virsh", "-c", "qemu:///system", "hostname"])
            .expect("virsh inside the host");
        assert_eq!(inside, host.name);
        // No libvirt network (never the "default" NAT one).
        assert_eq!(
            virsh(&host.libvirt_uri, &["net-list", "--all", "--name"]),
            ""
        );
    }
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 3, "every host has its own host UUID");

    // Every host reaches every other host and the controller address over the fabric: ICMP,
    // and libvirt over TCP (what peer-to-peer migration uses).
    for from in mh.hosts() {
        let ping = |ip: String| {
            mh.run(&from.name, &["busybox", "ping", "-c", "1", "-W", "3", &ip])
                .unwrap_or_else(|e| panic!("{} cannot ping {ip}: {e}", from.name))
        };
        ping(mh.controller_ip().to_string());
        for to in mh.hosts().iter().filter(|h| h.name != from.name) {
            ping(to.fabric_ip.to_string());
            let name = mh
                .run(&from.name, &["virsh", "-c", &to.tcp_uri, "hostname"])
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.name, to.tcp_uri));
            assert_eq!(name, to.name);
        }
    }

    // A process spawned in a host lives in that host's network namespace; one in the fabric
    // sees the controller address on its bridge.
    let mut child = mh.spawn("h2", &["sleep", "300"]).expect("spawn in h2");
    let h2 = mh.host("h2").expect("h2");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_host_netns(child.id(), h2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        in_host_netns(child.id(), h2),
        "spawned process is in h2's netns"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
    let addrs = mh
        .run(
            "fabric",
            &["ip", "-br", "addr", "show", "dev", &mh.fabric().bridge],
        )
        .expect("ip in the fabric");
    assert!(
        addrs.contains(&format!("{}/24", mh.controller_ip())),
        "{addrs}"
    );

    let t = Instant::now();
    mh.down().expect("multihost down");
    eprintln!("multihost down 3: {:.2?}", t.elapsed());
}

#[test]
fn a_tcg_domain_runs_on_host_2_only_and_migrates_live_to_host_3() {
    require_host();
    let _serial = serial();
    let mh = up(3);
    let [h1, h2, h3] = [&mh.hosts()[0], &mh.hosts()[1], &mh.hosts()[2]];
    let name = format!("tkt-{}-vm", mh.prefix());

    create_domain(&mh, h2, &name);
    assert_eq!(running_domains(&h2.libvirt_uri), vec![name.clone()]);
    assert!(running_domains(&h1.libvirt_uri).is_empty());
    assert!(running_domains(&h3.libvirt_uri).is_empty());
    let system = virsh("qemu:///system", &["list", "--all", "--name"]);
    assert!(
        !system.contains(&name),
        "the system libvirtd must not see {name}"
    );
    let state = mh
        .run("h2", &["virsh", "-c", "qemu:///system", "domstate", &name])
        .expect("domstate inside h2");
    assert_eq!(state, "running");
    let qemu = qemu_pid(&mh, h2, &name);
    assert!(in_host_netns(qemu, h2), "QEMU of {name} runs in h2's netns");

    // Peer-to-peer live migration over the fabric (unique host UUIDs, migration_address).
    let t = Instant::now();
    virsh(
        &h2.libvirt_uri,
        &["migrate", "--live", "--p2p", &name, &h3.tcp_uri],
    );
    eprintln!("live migration h2 -> h3: {:.2?}", t.elapsed());
    assert!(running_domains(&h2.libvirt_uri).is_empty());
    assert_eq!(running_domains(&h3.libvirt_uri), vec![name.clone()]);
    let qemu = qemu_pid(&mh, h3, &name);
    assert!(
        in_host_netns(qemu, h3),
        "QEMU of {name} now runs in h3's netns"
    );

    virsh(&h3.libvirt_uri, &["destroy", &name]);
    assert!(running_domains(&h3.libvirt_uri).is_empty());
    mh.down().expect("multihost down");
}

#[test]
fn nothing_is_left_after_drop() {
    require_host();
    let _serial = serial();
    let system_before = system_libvirtd_pid();
    let mh = up(3);
    let dir = mh.dir().to_path_buf();
    let prefix = mh.prefix().to_string();

    // Leave things running: a domain on h3, a process in h1 and one in the fabric.
    let h3 = mh.host("h3").expect("h3").clone();
    let name = format!("tkt-{prefix}-left");
    create_domain(&mh, &h3, &name);
    let mut pids = vec![qemu_pid(&mh, &h3, &name)];
    pids.push(mh.spawn("h1", &["sleep", "600"]).expect("spawn").id());
    pids.push(mh.spawn_in_fabric(&["sleep", "600"]).expect("spawn").id());
    for h in mh.hosts() {
        pids.extend([h.holder_pid, h.libvirtd_pid, h.virtlogd_pid]);
    }
    for &pid in &pids {
        assert!(process_is_running(pid), "process {pid} runs before drop");
    }

    let t = Instant::now();
    drop(mh);
    eprintln!("drop (down with a running domain): {:.2?}", t.elapsed());

    let running: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| process_is_running(p))
        .collect();
    assert!(running.is_empty(), "still running after drop: {running:?}");
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "namespaces {prefix}-* left: {netns}"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        !mounts.contains(dir.to_str().expect("utf-8")),
        "mounts under {} left",
        dir.display()
    );
    assert_eq!(
        system_libvirtd_pid(),
        system_before,
        "the system libvirtd must be left alone"
    );
}
