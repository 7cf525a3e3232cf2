//! Migration between two simulated hosts (tuchka-testkit's `MultiHost`) through the mTLS
//! channel, for real: libvirt 9 peer-to-peer UNIX-socket migration of a TCG guest of the
//! project's test image, with the channel as the only way between the hosts.
//!
//! Both ends run as the agents would, inside the hosts' namespaces: this test binary runs
//! itself there as a helper (`tests/mighelper`) — a channel server with a migration admission
//! on each host, a tunnel plus `migrate_through` on the source. Every host also drops all
//! inbound TCP on its fabric link except the channel port, so libvirtd's TCP listener (which
//! the harness opens for the plain-virsh benchmark) and qemu's migration ports cannot be what
//! carries the migration.
//!
//! Needs root, libvirt (./scripts/start-libvirt), qemu-img, genisoimage, nft and the test
//! image (`TUCHKA_TEST_IMAGE`, else target/testimg/tiny.qcow2, built when missing).

mod common;
mod mighelper;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{sha256_file, wait_for};
use mighelper::rig::{console, counter, last_tick, pool, ticks, Rig, Vm};
use mighelper::{Expect, Identity, Role, SendMode, Target};
use tuchka_host::{DomainState, Hypervisor, Storage};

/// The libtest arguments that make this binary run [`helper_process`] only.
const HELPER_ARGS: &[&str] = &[
    "--exact",
    "helper_process",
    "--nocapture",
    "--test-threads=1",
];

/// Not a test: the helper the other tests start inside the hosts (a no-op when run normally).
#[test]
fn helper_process() {
    mighelper::run_if_asked();
}

/// One harness at a time: TCG guests on two shared cores are slow enough.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn live_migration_through_the_channel_keeps_the_guest_running_and_paused_stays_paused() {
    let _serial = serial();
    let mut rig = Rig::up(HELPER_ARGS, true);
    rig.serve(0);
    rig.serve(1);
    let vm = rig.boot(0, "mig");
    let h1_log = rig.storage(0).console_log_path(&vm.vm_id);
    let h2_log = rig.storage(1).console_log_path(&vm.vm_id);

    // h1 -> h2, running.
    rig.prepare_target(1, &vm);
    rig.expect_live(1, 0, "0a1b2c3d-live-1", &vm);
    // At 64 MiB/s the copy lasts several polls, so the limit is seen while the job runs even
    // on a loaded machine (unlimited, it may end before the first poll looks).
    let r = rig.migrate(0, 1, "0a1b2c3d-live-1", &vm, Some(64), None);
    assert!(r.ok, "migration failed: {r:?}");
    assert!(r.progress_reports >= 1, "{r:?}");
    // The limit can only be read while the job runs: with a single progress poll the job may
    // already have ended when it looked (seen on a loaded 2-core machine).
    if r.progress_reports >= 2 || r.downtime_limit_ms.is_some() {
        assert_eq!(
            r.downtime_limit_ms,
            Some(mighelper::rig::DOWNTIME_LIMIT_MS),
            "the downtime limit reached the job: {r:?}"
        );
    }
    assert!(
        r.dir_removed,
        "the tunnel's socket directory is left: {r:?}"
    );
    assert_eq!(rig.state(1, &vm), Some(DomainState::Running), "runs on h2");
    assert_eq!(rig.state(0, &vm), None, "gone from h1 (UNDEFINE_SOURCE)");
    // PERSIST_DEST: defined on h2 with h2's paths, so it also boots there later.
    let inactive = rig
        .mh
        .run("h2", &["virsh", "dumpxml", "--inactive", &vm.domain])
        .expect("persistent definition on h2");
    let (p1, p2) = (pool(&rig.mh, 0), pool(&rig.mh, 1));
    assert!(
        inactive.contains(&p2.display().to_string())
            && !inactive.contains(&p1.display().to_string()),
        "the persistent definition on h2 names the wrong pool:\n{inactive}"
    );
    let downtime = r
        .downtime_ms
        .expect("downtime from the completed job statistics");
    assert!(downtime < 5_000, "downtime {downtime} ms");
    assert!(r.bytes > 32 << 20, "libvirt reports {} bytes", r.bytes);
    // Every byte qemu sent crossed the channel: the tunnel carried at least what libvirt
    // reports as processed, and the disk stream and libvirt's own connection went through too.
    assert!(r.memory_bytes >= r.bytes, "{r:?}");
    assert!(r.disk_bytes > 0 && r.libvirt_bytes > 0, "{r:?}");
    let server = rig.server(1).stats();
    assert!(server.bytes_in >= r.memory_bytes, "{server:?} vs {r:?}");
    let (_, channel_bytes) = counter(&rig.mh, "h2", "\"channel\"");
    assert!(
        channel_bytes >= r.memory_bytes,
        "fabric bytes to the channel port: {channel_bytes}"
    );

    // The guest did not reboot: its console on h2 goes on counting, no boot banner.
    let before = last_tick(&h1_log).expect("ticks on h1");
    let after = wait_for(30, || {
        ticks(&h2_log)
            .first()
            .copied()
            .filter(|_| ticks(&h2_log).len() >= 2)
    })
    .unwrap_or_else(|| panic!("no ticks on h2; console:\n{}", console(&h2_log)));
    let h2_console = console(&h2_log);
    assert!(
        after >= before && after > 2,
        "ticks restarted: h1 ended at {before}, h2 began at {after}"
    );
    assert!(
        !h2_console.contains("TESTIMG-ROOT"),
        "a boot banner on h2:\n{h2_console}"
    );
    eprintln!(
        "live h1->h2: {} ms, downtime {downtime} ms, {} bytes, {:.1} MiB/s; ticks {before} -> {after}",
        r.total_ms, r.bytes, r.mib_per_s
    );

    // h2 -> h1, paused: it arrives paused and stays paused.
    rig.libvirt(1).suspend(&vm.domain).expect("pause on h2");
    rig.prepare_target(0, &vm);
    rig.expect_live(0, 1, "0a1b2c3d-paused", &vm);
    let r = rig.migrate(1, 0, "0a1b2c3d-paused", &vm, None, None);
    assert!(r.ok, "paused migration failed: {r:?}");
    assert_eq!(rig.state(0, &vm), Some(DomainState::Paused), "paused on h1");
    assert_eq!(rig.state(1, &vm), None, "gone from h2");
    std::thread::sleep(Duration::from_secs(2));
    let frozen = last_tick(&h1_log);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(last_tick(&h1_log), frozen, "a paused guest does not tick");
    rig.libvirt(0).resume(&vm.domain).expect("resume on h1");
    let resumed = wait_for(30, || last_tick(&h1_log).filter(|t| Some(*t) > frozen));
    assert!(resumed.is_some(), "no ticks after resuming on h1");
    let last_h2 = last_tick(&h2_log).unwrap_or(0);
    assert!(
        resumed.unwrap_or(0) > last_h2,
        "the counter went back: h2 ended at {last_h2}, h1 resumed at {resumed:?}"
    );
    rig.libvirt(0)
        .undefine(&vm.domain)
        .expect("clean up the domain");
}

#[test]
fn a_refused_or_cut_migration_leaves_the_vm_running_on_the_source_and_nothing_on_the_target() {
    let _serial = serial();
    let mut rig = Rig::up(HELPER_ARGS, true);
    rig.serve(1);
    let vm = rig.boot(0, "abort");
    let h1_log = rig.storage(0).console_log_path(&vm.vm_id);
    rig.prepare_target(1, &vm);
    let h2 = rig.libvirt(1);
    let on_h2 = || {
        h2.list()
            .expect("list h2")
            .into_iter()
            .any(|d| d.name == vm.domain)
    };

    // The target does not expect this migration: it refuses the first stream.
    let r = rig.migrate(0, 1, "0b1c2d3e-unknown", &vm, None, None);
    assert!(!r.ok, "{r:?}");
    let err = r.error.clone().unwrap_or_default();
    eprintln!("refused migration: {err}");
    assert!(
        err.contains("0b1c2d3e-unknown is not expected on this host"),
        "the error names the refusal: {err}"
    );
    assert_eq!(rig.state(0, &vm), Some(DomainState::Running));
    assert!(!on_h2());

    // Cut the channel mid-copy (bandwidth-capped so that the copy lasts).
    rig.expect_live(1, 0, "0b1c2d3e-cut", &vm);
    let before = last_tick(&h1_log).unwrap_or(0);
    let r = rig.migrate(0, 1, "0b1c2d3e-cut", &vm, Some(16), Some(24 << 20));
    assert!(!r.ok, "the cut migration succeeded: {r:?}");
    assert!(r.cut, "{r:?}");
    let err = r.error.clone().unwrap_or_default();
    eprintln!("cut migration: {err}");
    assert!(
        err.contains("channel cut: the test cut the channel mid-copy"),
        "the error names the cause: {err}"
    );
    assert!(r.memory_bytes > 0, "the cut came mid-copy: {r:?}");
    assert!(r.dir_removed, "{r:?}");
    assert_eq!(
        rig.state(0, &vm),
        Some(DomainState::Running),
        "libvirt resumes the VM on the source"
    );
    let ticking = wait_for(20, || last_tick(&h1_log).filter(|t| *t > before + 2));
    assert!(ticking.is_some(), "the VM does not run on h1 after the cut");
    let gone = wait_for(30, || (!on_h2()).then_some(()));
    assert!(gone.is_some(), "the target kept the incoming domain");
    let all = rig
        .mh
        .run("h2", &["virsh", "list", "--all", "--name"])
        .expect("virsh list");
    assert!(!all.contains(&vm.domain), "still defined on h2: {all}");
    let incoming_dir = rig
        .mh
        .dir()
        .join("h2/tuchka-run/migrate")
        .join(format!("{}-0b1c2d3e", tuchka_host::cloud8(&rig.cloud)));
    assert!(
        incoming_dir.is_dir(),
        "the target's socket dir lives while expected"
    );
    rig.server(1).forget("0b1c2d3e-cut");
    assert!(!incoming_dir.exists(), "and goes with the expectation");

    // After the abort the VM still migrates.
    rig.prepare_target(1, &vm);
    rig.expect_live(1, 0, "0b1c2d3e-retry", &vm);
    let r = rig.migrate(0, 1, "0b1c2d3e-retry", &vm, None, None);
    assert!(r.ok, "retry after the abort failed: {r:?}");
    assert_eq!(rig.state(1, &vm), Some(DomainState::Running));
    rig.libvirt(1)
        .undefine(&vm.domain)
        .expect("clean up the domain");
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cold_migration_moves_a_file_intact_and_bad_transfers_leave_nothing() {
    let _serial = serial();
    let mut rig = Rig::up(HELPER_ARGS, true);
    rig.serve(1);
    let src_dir = pool(&rig.mh, 0).join("vms/vm-cold");
    let dst_dir = pool(&rig.mh, 1).join("vms/vm-cold");
    std::fs::create_dir_all(&src_dir).expect("src dir");
    std::fs::create_dir_all(&dst_dir).expect("dst dir");
    let src = src_dir.join("root.qcow2");
    std::fs::write(&src, noise(6 << 20, 42)).expect("write the disk");
    let sha = sha256_file(&src);

    let expect_cold = |rig: &mut Rig, id: &str, name: &str| {
        let e = Expect {
            migration_id: id.to_string(),
            source_host_id: rig.ids[0].host_id.clone(),
            vm_id: "vm-cold".into(),
            live: false,
            disk_file: Some(dst_dir.join(name)),
        };
        rig.server(1).expect(&e);
    };
    let send = |rig: &mut Rig, id: &str, mode: SendMode| {
        let role = Role::Send {
            identity: Some(rig.ids[0].clone()),
            ca_pem: rig.ca.cert_pem.clone(),
            target: rig.target(1),
            migration_id: id.to_string(),
            vm_id: "vm-cold".into(),
            path: src.clone(),
            mode,
        };
        rig.send(0, role)
    };

    expect_cold(&mut rig, "0c1d2e3f-cold", "root.qcow2");
    let r = send(&mut rig, "0c1d2e3f-cold", SendMode::Honest);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(r.bytes, 6 << 20);
    assert_eq!(
        sha256_file(&dst_dir.join("root.qcow2")),
        sha,
        "same bytes on h2"
    );

    expect_cold(&mut rig, "0c1d2e3f-short", "short.qcow2");
    let r = send(&mut rig, "0c1d2e3f-short", SendMode::Short);
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("short transfer"),
        "{r:?}"
    );

    expect_cold(&mut rig, "0c1d2e3f-corrupt", "corrupt.qcow2");
    let r = send(&mut rig, "0c1d2e3f-corrupt", SendMode::Corrupt);
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("corrupt transfer"),
        "{r:?}"
    );
    assert_eq!(
        leftovers(&dst_dir),
        vec!["root.qcow2".to_string()],
        "only the good file; no partial files"
    );
    let stats = rig.server(1).stats();
    assert_eq!(stats.files_stored, 1, "{stats:?}");
}

#[test]
fn the_channel_admits_only_this_clouds_hosts_and_expected_migrations() {
    let _serial = serial();
    let mut rig = Rig::up(HELPER_ARGS, true);
    rig.serve(1);
    let vm = Vm {
        vm_id: "vm-tls".into(),
        domain: "unused".into(),
        name: "tls".into(),
    };
    rig.expect_live(1, 0, "0d1e2f30-known", &vm);
    let other_ca = tuchka_pki::create_ca("tuchka CA", std::time::SystemTime::now()).expect("CA");
    let foreign = Identity::issue(&other_ca, &rig.ids[0].host_id);
    let third = Identity::issue(&rig.ca, "00000003-0000-4000-8000-000000000003");
    let probe = |rig: &mut Rig, identity: Option<Identity>, target: Target, id: &str| {
        let role = Role::Send {
            identity,
            ca_pem: rig.ca.cert_pem.clone(),
            target,
            migration_id: id.to_string(),
            vm_id: vm.vm_id.clone(),
            path: PathBuf::from("/nonexistent"),
            mode: SendMode::MemoryStream,
        };
        let r = rig.send(0, role);
        assert!(!r.ok, "admitted: {r:?}");
        eprintln!("refused as expected: {}", r.error.as_deref().unwrap_or(""));
        r.error.unwrap_or_default()
    };
    let h2 = rig.target(1);
    let me = rig.ids[0].clone();

    let err = probe(&mut rig, Some(foreign), h2.clone(), "0d1e2f30-known");
    assert!(err.contains("TLS handshake failed"), "another CA: {err}");
    let err = probe(&mut rig, None, h2.clone(), "0d1e2f30-known");
    assert!(
        err.contains("TLS handshake failed"),
        "no certificate: {err}"
    );
    let wrong_name = Target {
        host_id: "00000009-0000-4000-8000-000000000009".into(),
        ..h2.clone()
    };
    let err = probe(&mut rig, Some(me.clone()), wrong_name, "0d1e2f30-known");
    assert!(
        err.contains("TLS handshake failed"),
        "a server that is not the host asked for: {err}"
    );
    let err = probe(&mut rig, Some(me.clone()), h2.clone(), "0d1e2f30-unknown");
    assert!(
        err.contains("migration 0d1e2f30-unknown is not expected on this host"),
        "unknown migration: {err}"
    );
    let err = probe(&mut rig, Some(third), h2.clone(), "0d1e2f30-known");
    assert!(
        err.contains("is not the source of migration"),
        "other host: {err}"
    );
    // Admitted by the admission; refused only because no qemu listens for it yet.
    let err = probe(&mut rig, Some(me.clone()), h2, "0d1e2f30-known");
    assert!(err.contains("nothing listens on this host yet"), "{err}");

    let stats = rig.server(1).stats();
    assert!(stats.handshake_failed >= 2, "{stats:?}");
    assert!(stats.refused >= 3, "{stats:?}");
    assert_eq!(stats.admitted, 0, "{stats:?}");
}
