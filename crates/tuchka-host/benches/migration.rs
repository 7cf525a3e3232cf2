//! Live migration of an idle 256 MiB TCG guest between two simulated hosts: through the mTLS
//! channel (peer-to-peer over unix sockets, as the agents do it) next to a direct
//! `virsh migrate --live --p2p --copy-storage-inc` over the harness's `qemu+tcp` (libvirtd
//! listening on TCP, qemu's migration and NBD ports open: what the channel replaces).
//!
//! Each round migrates the guest h1 → h2 through the channel, then h2 → h1 directly, so both
//! methods move the same guest the same number of times; every target gets a fresh overlay
//! first. Prints, per method: the call's wall time, libvirt's job time, the downtime and the
//! bytes (libvirt's completed job statistics), p50 / p95 over the rounds.
//!
//! Run as root after ./scripts/start-libvirt: `cargo bench -p tuchka-host --bench migration`
//! (environment: BENCH_RUNS, default 5; TUCHKA_TEST_IMAGE). The binary runs itself inside the
//! hosts as the agents' migration helper (tests/mighelper).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/mighelper/mod.rs"]
mod mighelper;

use std::time::{Duration, Instant};

use mighelper::rig::{host, pool, Rig, Vm};
use tuchka_host::migrate::parse_completed_stats;
use tuchka_host::{retarget_domain_xml, Hypervisor};

#[derive(Debug, Default)]
struct Sample {
    call: Duration,
    job: Option<Duration>,
    downtime: Option<Duration>,
    bytes: u64,
}

fn main() {
    if mighelper::run_if_asked() {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // No firewall: the direct migration needs libvirtd's TCP port and qemu's ports.
    let mut rig = Rig::up(&[], false);
    rig.serve(1);
    let vm = rig.boot(0, "bench");
    let (mut channel, mut direct) = (Vec::new(), Vec::new());
    for round in 0..runs {
        let id = format!("0e1f2a3b-bench-{round}");
        rig.prepare_target(1, &vm);
        rig.expect_live(1, 0, &id, &vm);
        let r = rig.migrate(0, 1, &id, &vm, None, None);
        assert!(r.ok, "channel migration {round} failed: {r:?}");
        rig.server(1).forget(&id);
        channel.push(Sample {
            call: Duration::from_millis(r.total_ms),
            job: r.job_ms.map(Duration::from_millis),
            downtime: r.downtime_ms.map(Duration::from_millis),
            bytes: r.bytes,
        });
        eprintln!("round {round}: channel {:?}", channel.last());

        rig.prepare_target(0, &vm);
        direct.push(virsh_migrate(&rig, 1, 0, &vm));
        eprintln!("round {round}: direct  {:?}", direct.last());
    }
    let _ = rig.libvirt(0).undefine(&vm.domain);
    println!(
        "live migration of an idle {} MiB TCG guest, {runs} rounds",
        mighelper::rig::GUEST_MIB
    );
    println!(
        "{:<34} {:>22} {:>22}",
        "", "channel (mTLS, unix)", "direct (qemu+tcp)"
    );
    row("call time p50 / p95 (ms)", &channel, &direct, |s| {
        Some(s.call)
    });
    row("libvirt job time p50 / p95 (ms)", &channel, &direct, |s| {
        s.job
    });
    row("downtime p50 / p95 (ms)", &channel, &direct, |s| s.downtime);
    let mib = |v: &[Sample]| {
        let mut b: Vec<u64> = v.iter().map(|s| s.bytes).collect();
        b.sort_unstable();
        b.get(b.len() / 2).map_or(0.0, |x| *x as f64 / 1048576.0)
    };
    println!(
        "{:<34} {:>22.1} {:>22.1}",
        "memory transferred p50 (MiB)",
        mib(&channel),
        mib(&direct)
    );
}

/// `virsh migrate --live --p2p --copy-storage-inc` from host `from` to host `to` over TCP.
fn virsh_migrate(rig: &Rig, from: usize, to: usize, vm: &Vm) -> Sample {
    let xml = rig
        .libvirt(from)
        .migratable_xml(&vm.domain)
        .expect("migratable xml");
    let xml =
        retarget_domain_xml(&xml, &pool(&rig.mh, from), &pool(&rig.mh, to)).expect("retarget");
    let file = rig.mh.dir().join(format!("direct-{}.xml", host(to)));
    std::fs::write(&file, xml).expect("write the destination xml");
    let dest = rig.mh.host(&host(to)).expect("host").tcp_uri.clone();
    let file = file.to_string_lossy().into_owned();
    let args = [
        "virsh",
        "-c",
        "qemu:///system",
        "migrate",
        "--live",
        "--p2p",
        "--copy-storage-inc",
        "--persistent",
        "--undefinesource",
        "--auto-converge",
        "--migrate-disks",
        "vda",
        "--xml",
        &file,
        &vm.domain,
        &dest,
    ];
    let started = Instant::now();
    rig.mh.run(&host(from), &args).expect("virsh migrate");
    let call = started.elapsed();
    let stats = rig
        .mh
        .run(
            &host(to),
            &[
                "virsh",
                "domjobinfo",
                "--completed",
                "--keep-completed",
                "--rawstats",
                &vm.domain,
            ],
        )
        .map(|t| parse_completed_stats(&t))
        .unwrap_or_default();
    Sample {
        call,
        job: stats.time_elapsed,
        downtime: stats.downtime,
        bytes: stats.data_processed.unwrap_or(0),
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_millis();
    format!("{} / {}", at(0.5), at(0.95))
}

fn row(what: &str, a: &[Sample], b: &[Sample], f: impl Fn(&Sample) -> Option<Duration>) {
    let pick = |v: &[Sample]| percentiles(v.iter().filter_map(&f).collect());
    println!("{what:<34} {:>22} {:>22}", pick(a), pick(b));
}
