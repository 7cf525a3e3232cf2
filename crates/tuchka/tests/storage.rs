//! Images and disks that change, and disk space, the way a user runs them on one host whose
//! pool is a small file system (a 448 MiB tmpfs) and whose image store is smaller still:
//!
//! - volumes: made near a VM, hot-plugged (the guest sees `/dev/disk/by-id/virtio-<serial>`
//!   without a reboot), written, grown online, refused removal while attached, moved to
//!   another VM with their data, and one per VM with `group create --volume-size`;
//! - `vm resize`: the running guest sees its larger disk; vCPUs now, memory at the next start;
//! - an image captured from a running VM that keeps answering HTTP throughout; VMs launched
//!   from it have what its user-data wrote; the stored image has no backing file;
//! - `image build`: a script that writes a marker and powers off makes an image that has it;
//!   one that never powers off fails at its timeout with the console's end, leaving nothing;
//! - `image cache prune` drops only what nothing uses;
//! - disk space: placement refused with the figures when the pool is nearly full; a guest
//!   writing into a full pool is paused with the reason, and resumed once space is freed, its
//!   data intact; an upload larger than the store is refused and leaves nothing.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{domains_with_prefix, http_path, Cloud, Tmpfs};
use serde_json::Value;

const POOL_MIB: u64 = 448;
const STORE_MIB: u64 = 96;

fn get(ip: Ipv4Addr, path: &str) -> Option<String> {
    match http_path(ip, path, Duration::from_secs(60)) {
        Some((200, body)) => Some(body),
        _ => None,
    }
}

/// GET that must answer 200 within a minute.
fn must(c: &Cloud, ip: Ipv4Addr, path: &str) -> String {
    let start = Instant::now();
    loop {
        match http_path(ip, path, Duration::from_secs(60)) {
            Some((200, body)) => return body,
            other if start.elapsed() > Duration::from_secs(60) => {
                panic!("GET {ip}{path}: {other:?}\n{}", c.log_tail())
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn answers(c: &Cloud, vm: &str) -> Ipv4Addr {
    let ip = c.ip(vm);
    let start = Instant::now();
    while get(ip, "/").as_deref().map(str::trim) != Some(vm) {
        if start.elapsed() > Duration::from_secs(180) {
            let console = c.tk(&["vm", "console", vm]).out;
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!(
                "{vm} ({ip}) did not answer HTTP in 180 s; its console ends:\n{tail}\n{}",
                c.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    ip
}

/// The guest's view of its disks: name → (MiB, serial).
fn disks(ip: Ipv4Addr) -> Vec<(String, u64, String)> {
    get(ip, "/cgi-bin/disks")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.parse().ok()?,
                f.get(2)?.to_string(),
            ))
        })
        .collect()
}

fn volume(c: &Cloud, name: &str) -> Value {
    c.ok(&["volume", "show", name, "-o", "json"]).json()
}

fn storage(c: &Cloud) -> Value {
    c.ok(&["storage", "-o", "json"]).json()["hosts"][0].clone()
}

fn write_script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("script");
    p.display().to_string()
}

/// Fill the pool with a file until `leave_mib` MiB are free there.
fn fill_pool(pool: &Path, leave_mib: u64) -> std::path::PathBuf {
    let st = rustix::fs::statvfs(pool).expect("statvfs");
    let free = (st.f_bavail * st.f_frsize) >> 20;
    let take = free.saturating_sub(leave_mib);
    let f = pool.join("filler");
    let ok = std::process::Command::new("fallocate")
        .args(["-l", &format!("{take}M")])
        .arg(&f)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "fallocate {take}M in {}", pool.display());
    f
}

#[test]
fn disks_volumes_and_images_change_and_space_is_managed() {
    let image = common::test_image();
    let mut mounts: Vec<Tmpfs> = vec![];
    let c = Cloud::start_prepared("disk", &["--accel", "tcg"], |d| {
        mounts.push(Tmpfs::mount(&d.join("pool"), POOL_MIB));
        mounts.push(Tmpfs::mount(&d.join("images"), STORE_MIB));
    });
    let pool = c.dir.join("pool");
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 150 + p % 40, (p / 40) % 256);
    c.ok(&["net", "create", "lan", "--cidr", &cidr, "--wait"]);
    c.track_network("lan");
    let ud = write_script(
        &c.dir,
        "web.sh",
        "#!/bin/sh\nmkdir -p /var/lib/testdata\necho \"from $(hostname)\" > /var/lib/testdata/marker\nsync\n",
    );
    c.ok(&[
        "group",
        "create",
        "web",
        "--image",
        "tiny",
        "--count",
        "2",
        "--memory",
        "128M",
        "--net",
        "lan",
        "--user-data",
        &ud,
        "--wait",
    ]);
    let web0 = answers(&c, "web-0");
    let web1 = answers(&c, "web-1");

    // ---- volumes: hot-plug, write, grow online, move with the data
    let v = c
        .ok(&[
            "volume", "create", "data1", "--size", "64M", "--near", "web-0", "-o", "json",
        ])
        .json();
    assert_eq!(v["host"], c.host.as_str(), "{v}");
    let sn = common::volume_serial(v["id"].as_str().expect("id"));
    let t = Instant::now();
    c.ok(&["volume", "attach", "data1", "web-0", "--wait"]);
    c.wait_for(
        "the guest to see the volume",
        Duration::from_secs(60),
        || disks(web0).iter().any(|d| d.2 == sn && d.1 == 64),
    );
    eprintln!("volume attach -> visible in the guest: {:?}", t.elapsed());
    assert_eq!(volume(&c, "data1")["state"], "attached");
    assert_eq!(
        must(
            &c,
            web0,
            &format!("/cgi-bin/disk?id={sn}&op=write&mib=4&seed=7")
        )
        .trim(),
        "written 4"
    );
    c.ok(&["volume", "resize", "data1", "--size", "96M", "--wait"]);
    c.wait_for("the guest to see 96 MiB", Duration::from_secs(30), || {
        get(web0, &format!("/cgi-bin/disk?id={sn}&op=size"))
            .as_deref()
            .map(str::trim)
            == Some("96")
    });
    let shrink = c.fails(&["volume", "resize", "data1", "--size", "32M"]);
    assert!(shrink.contains("only grows"), "{shrink}");
    let rm = c.fails(&["volume", "rm", "data1"]);
    assert!(
        rm.contains("attached to vm \"web-0\": detach it first"),
        "{rm}"
    );
    c.ok(&["volume", "detach", "data1", "--wait"]);
    c.wait_for(
        "the volume gone from web-0",
        Duration::from_secs(30),
        || !disks(web0).iter().any(|d| d.2 == sn),
    );
    c.ok(&["volume", "attach", "data1", "web-1", "--wait"]);
    c.wait_for("web-1 to see the volume", Duration::from_secs(60), || {
        disks(web1).iter().any(|d| d.2 == sn && d.1 == 96)
    });
    assert_eq!(
        must(
            &c,
            web1,
            &format!("/cgi-bin/disk?id={sn}&op=check&mib=4&seed=7")
        )
        .lines()
        .next(),
        Some("ok"),
        "the data written from web-0 reads back on web-1"
    );
    let list = c.ok(&["volume", "list", "-o", "json"]).json();
    let row = &list.as_array().expect("list")[0];
    assert_eq!(
        (row["vm"].as_str(), row["size_mib"].as_u64()),
        (Some("web-1"), Some(96))
    );
    assert!(row["allocated_mib"].as_u64().unwrap_or(0) >= 4, "{row}");
    let text = c.ok(&["volume", "list"]).out;
    assert!(
        text.contains("data1") && text.contains("web-1") && text.contains("attached"),
        "{text}"
    );
    c.ok(&["volume", "detach", "data1", "--wait"]);
    c.ok(&["volume", "rm", "data1"]);
    c.wait_for("the volume removed", Duration::from_secs(30), || {
        c.ok(&["volume", "list", "-o", "json"]).json() == serde_json::json!([])
    });
    let left: Vec<_> = std::fs::read_dir(pool.join("volumes"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "volume files left: {left:?}");

    // ---- a volume per VM, removed with it
    c.ok(&[
        "group",
        "create",
        "db",
        "--image",
        "tiny",
        "--memory",
        "128M",
        "--net",
        "lan",
        "--volume-size",
        "32M",
        "--wait",
    ]);
    let db0 = answers(&c, "db-0");
    let dv = volume(&c, "db-0-data");
    assert_eq!(
        (dv["vm"].as_str(), dv["state"].as_str()),
        (Some("db-0"), Some("attached")),
        "{dv}"
    );
    let dsn = common::volume_serial(dv["id"].as_str().expect("id"));
    assert!(
        disks(db0).iter().any(|d| d.2 == dsn && d.1 == 32),
        "{:?}",
        disks(db0)
    );
    assert_eq!(c.vm("db-0")["volumes"], serde_json::json!(["db-0-data"]));
    c.ok(&["group", "rm", "db", "--wait"]);
    c.wait_for(
        "db-0-data removed with its VM",
        Duration::from_secs(30),
        || c.ok(&["volume", "list", "-o", "json"]).json() == serde_json::json!([]),
    );

    // ---- resize: the disk and vCPUs now, memory at the next start
    let r = c.ok(&[
        "vm", "resize", "web-0", "--disk", "256M", "--cpus", "2", "--memory", "192M", "--wait",
    ]);
    let said = format!("{}{}", r.out, r.err);
    assert!(said.contains("now: disk 256 MiB, cpus 2"), "{said}");
    assert!(said.contains("at the next start: memory 192 MiB"), "{said}");
    c.wait_for(
        "the guest to see a 256 MiB disk",
        Duration::from_secs(30),
        || disks(web0).iter().any(|d| d.0 == "vda" && d.1 == 256),
    );
    let vm = c.vm("web-0");
    assert_eq!(
        (vm["cpus"].as_u64(), vm["disk_mib"].as_u64()),
        (Some(2), Some(256)),
        "{vm}"
    );
    assert_eq!(vm["pending_resize"], "memory 192 MiB", "{vm}");
    let shrink = c.fails(&["vm", "resize", "web-0", "--disk", "128M"]);
    assert!(shrink.contains("only grows"), "{shrink}");

    // ---- an image of the running VM; it keeps answering
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let poller = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_path(web0, "/", Duration::from_secs(5)) {
                    Some((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let t = Instant::now();
    let cap = c.ok(&[
        "image",
        "create",
        "web-snap",
        "--from-vm",
        "web-0",
        "--wait",
    ]);
    eprintln!(
        "capture of the running web-0: {:?} ({})",
        t.elapsed(),
        cap.out.trim()
    );
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(
        ok > 0 && failed == 0,
        "web-0 during the capture: {ok} answers, {failed} misses"
    );
    assert_eq!(c.vm("web-0")["state"], "running");
    let snap = c.ok(&["image", "show", "web-snap", "-o", "json"]).json();
    assert_eq!(snap["made_from"], "vm web-0", "{snap}");
    let stored = c
        .dir
        .join("images")
        .join(format!("{}.qcow2", snap["sha256"].as_str().expect("sha")));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&stored)
        .output()
        .expect("qemu-img");
    let info: Value = serde_json::from_slice(&info.stdout).expect("info");
    assert_eq!(info["format"], "qcow2", "{info}");
    assert!(
        info.get("backing-filename").is_none(),
        "no backing file: {info}"
    );
    assert!(c
        .ok(&["image", "show", "web-snap"])
        .out
        .contains("vm web-0"));
    c.ok(&[
        "group", "create", "snap", "--image", "web-snap", "--memory", "128M", "--net", "lan",
        "--wait",
    ]);
    let snap0 = answers(&c, "snap-0");
    assert_eq!(
        must(
            &c,
            snap0,
            "/cgi-bin/file?path=/var/lib/testdata/marker&op=read"
        )
        .trim(),
        "from web-0",
        "what web-0's user-data wrote is in the image"
    );

    // ---- image build: a marker and a power-off; and one that never powers off
    let prov = write_script(
        &c.dir,
        "provision.sh",
        "#!/bin/sh\nmkdir -p /var/lib/testdata\necho built-by-script > /var/lib/testdata/built\nsync\npoweroff\n",
    );
    let b = c.ok(&[
        "image",
        "build",
        "base2",
        "--from",
        "tiny",
        "--user-data",
        &prov,
        "--wait",
    ]);
    eprintln!("image build: {}", b.out.trim());
    let base2 = c.ok(&["image", "show", "base2", "-o", "json"]).json();
    assert_eq!(base2["made_from"], "build from tiny", "{base2}");
    c.ok(&[
        "group", "create", "b2", "--image", "base2", "--memory", "128M", "--net", "lan", "--wait",
    ]);
    let b20 = answers(&c, "b2-0");
    assert_eq!(
        must(
            &c,
            b20,
            "/cgi-bin/file?path=/var/lib/testdata/built&op=read"
        )
        .trim(),
        "built-by-script"
    );
    let never = write_script(&c.dir, "never.sh", "#!/bin/sh\necho NEVER-POWERS-OFF\n");
    let err = c.fails(&[
        "image",
        "build",
        "bad",
        "--from",
        "tiny",
        "--user-data",
        &never,
        "--timeout",
        "40s",
        "--wait",
    ]);
    assert!(err.contains("did not power off in time"), "{err}");
    assert!(
        err.contains("NEVER-POWERS-OFF"),
        "the console tail is in the error: {err}"
    );
    assert!(c.fails(&["image", "show", "bad"]).contains("not found"));
    let groups = c.ok(&["group", "list", "-o", "json"]).json();
    assert!(
        !groups
            .as_array()
            .expect("groups")
            .iter()
            .any(|g| g["name"].as_str().unwrap_or_default().starts_with("build-")),
        "builders left: {groups}"
    );
    let nets = c.ok(&["net", "list", "-o", "json"]).json();
    assert_eq!(
        nets.as_array().map(Vec::len),
        Some(1),
        "only lan is left: {nets}"
    );
    assert!(domains_with_prefix("tk-")
        .iter()
        .all(|d| !d.contains("build-")));

    // ---- image cache: prune drops what nothing uses, never a base in use
    c.ok(&["group", "rm", "snap", "--wait"]);
    c.ok(&["group", "rm", "b2", "--wait"]);
    let tiny_sha = c.ok(&["image", "show", "tiny", "-o", "json"]).json()["sha256"]
        .as_str()
        .expect("sha")
        .to_string();
    let snap_sha = snap["sha256"].as_str().expect("sha").to_string();
    c.wait_for(
        "web-snap cached and unused",
        Duration::from_secs(30),
        || {
            let l = c.ok(&["image", "cache", "list", "-o", "json"]).json();
            l.as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["sha256"] == snap_sha.as_str() && x["used_by"] == serde_json::json!([])
                })
            })
        },
    );
    let pruned = c.ok(&["image", "cache", "prune", "-o", "json"]).json();
    let pruned: Vec<String> = pruned["pruned"]
        .as_array()
        .expect("pruned")
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    assert!(pruned.iter().any(|x| x.ends_with(&snap_sha)), "{pruned:?}");
    assert!(
        !pruned.iter().any(|x| x.ends_with(&tiny_sha)),
        "tiny is in use: {pruned:?}"
    );
    c.wait_for("the host to drop web-snap", Duration::from_secs(30), || {
        let l = c.ok(&["image", "cache", "list", "-o", "json"]).json();
        let a = l.as_array().cloned().unwrap_or_default();
        !a.iter().any(|x| x["sha256"] == snap_sha.as_str())
            && a.iter().any(|x| x["sha256"] == tiny_sha.as_str())
    });

    // ---- disk space: placement refused with the figures
    let st = storage(&c);
    assert_eq!(st["pool_mib"].as_u64(), Some(POOL_MIB), "{st}");
    assert_eq!(
        st["reserve_mib"].as_u64(),
        Some(POOL_MIB.div_ceil(10)),
        "{st}"
    );
    let filler = fill_pool(&pool, 20);
    c.wait_for(
        "the host to report its pool nearly full",
        Duration::from_secs(30),
        || storage(&c)["free_mib"].as_u64().unwrap_or(u64::MAX) <= 24,
    );
    let refused = c.fails(&[
        "group", "create", "late", "--image", "tiny", "--memory", "128M", "--net", "lan",
    ]);
    assert!(
        refused.contains("disk space: ")
            && refused.contains(&format!("free of {POOL_MIB} MiB, 45 MiB kept in reserve")),
        "{refused}"
    );
    assert!(c.fails(&["group", "show", "late"]).contains("not found"));
    std::fs::remove_file(&filler).expect("free the pool");

    // ---- a guest writing into a full pool is paused, and resumed with its data intact
    let filler = fill_pool(&pool, 24);
    assert_eq!(
        must(&c, web0, "/cgi-bin/fill?mib=64&seed=5&target=tail").trim(),
        "started"
    );
    c.wait_for("web-0 paused by its host", Duration::from_secs(120), || {
        let v = c.vm("web-0");
        v["state"] == "paused"
            && v["pause_reason"]
                .as_str()
                .is_some_and(|r| r.contains("disk full on host"))
    });
    let shown = c.ok(&["vm", "show", "web-0"]).out;
    assert!(
        shown.contains("paused because") && shown.contains("pool 100 % used"),
        "{shown}"
    );
    std::fs::remove_file(&filler).expect("free the pool");
    c.ok(&["vm", "resume", "web-0", "--wait"]);
    c.wait_for("the fill to finish", Duration::from_secs(180), || {
        get(web0, "/cgi-bin/fill?op=status").is_some_and(|s| s.contains("state done"))
    });
    let check = must(&c, web0, "/cgi-bin/fill?op=check");
    assert_eq!(check.lines().next(), Some("ok"), "{check}");

    // ---- an upload larger than the store is refused and leaves nothing
    let big = c.dir.join("big.raw");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(2 << 30))
        .expect("sparse file");
    let err = c.fails(&[
        "image",
        "upload",
        big.to_str().expect("path"),
        "--name",
        "big",
    ]);
    assert!(
        err.contains("image store has") && err.contains("MiB free"),
        "{err}"
    );
    std::fs::remove_file(&big).expect("rm");
    assert!(c.fails(&["image", "show", "big"]).contains("not found"));
    let tmp: Vec<_> = std::fs::read_dir(c.dir.join("images/tmp"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "nothing left in the store's tmp: {tmp:?}");

    c.ok(&["group", "rm", "web", "--wait"]);
    let left: Vec<_> = std::fs::read_dir(pool.join("captures"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "capture files left: {left:?}");
}
