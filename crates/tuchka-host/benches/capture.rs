//! Capturing the disk of a running TCG guest into a new image (`Hypervisor::capture_disk`): the
//! project's test image with about 1 GiB of data written into its disk, captured while the
//! guest runs and writes (a counter, synced, every 0.2 s).
//!
//! The data is written with qemu-io before the guest boots, outside its partitions (which end
//! at 64 MiB), in 64 MiB chunks of one pattern that is half random bytes, half text-like
//! bytes, so the compression has real work (about what a used root disk holds). Each run
//! captures the disk into a fresh file and prints the outcome: bytes of the image, how long
//! the guest was seen paused, the backup copy's and the conversion's wall times, the total, and
//! MiB/s of guest data (the written data plus the test image's) per second of the total.
//! Numbers are printed, never asserted; the machine's load average is printed with them.
//!
//! Run as root after ./scripts/start-libvirt: `cargo bench -p tuchka-host --bench capture`
//! (environment: BENCH_RUNS, default 3; BENCH_DATA_MIB, default 1024; TUCHKA_TEST_IMAGE).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Instant;

use common::{console, last_tick, sh, sha256_file, wait_for, DomainGuard, Scratch, URI};
use tuchka_host::{Accel, CaptureOutcome, DirStorage, DomainSpec, Hypervisor, Libvirt, Storage};

const WRITER: &str = "#!/bin/sh\n( i=0; while true; do i=$((i+1)); echo $i > /var/tick.new; mv /var/tick.new /var/tick; sync; echo \"TICK $i\"; usleep 200000; done ) </dev/null >/dev/console 2>&1 &\n";
const CHUNK_MIB: u64 = 64;
const DATA_OFFSET_MIB: u64 = 64;

/// 64 MiB: the first half from /dev/urandom, the second half lines of words (compressible).
fn write_pattern(path: &Path) {
    use std::io::{Read, Write};
    let half = usize::try_from(CHUNK_MIB << 19).expect("size");
    let mut buf = vec![0u8; half];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    let words = [
        "tuchka",
        "disk",
        "image",
        "capture",
        "backup",
        "qcow2",
        "cluster",
        "guest",
        "libvirt",
        "point-in-time",
        "consistent",
        "running",
        "bytes",
        "compress",
    ];
    let mut text = String::with_capacity(half + 64);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while text.len() < half {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(words[(x % words.len() as u64) as usize]);
        text.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    let mut f = std::fs::File::create(path).expect("create the pattern");
    f.write_all(&buf).expect("write the pattern");
    f.write_all(&text.as_bytes()[..half])
        .expect("write the pattern");
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    common::require_root();
    common::require_libvirt();
    common::require_tool("qemu-img", "qemu-utils");
    common::require_tool("qemu-io", "qemu-utils");
    common::require_tool("virsh", "libvirt-clients");
    common::require_tool("genisoimage", "genisoimage");
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let data_mib: u64 = std::env::var("BENCH_DATA_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        .div_ceil(CHUNK_MIB)
        * CHUNK_MIB;
    let disk_mib = DATA_OFFSET_MIB + data_mib + 64;
    let image = common::test_image();
    let scratch = Scratch::new();
    let u = common::unique();
    let cloud = common::cloud_id();
    let vm = format!("tkt-vm-{u}-bench");
    let domain = format!("tkt-{u}-capbench");
    let _dom = DomainGuard(domain.clone());

    let st = DirStorage::open(&scratch.pool()).expect("pool");
    let sha = sha256_file(&image);
    std::fs::copy(&image, st.image_partial_path(&sha)).expect("copy the test image");
    st.commit_image(&sha, &sha).expect("commit");
    let root = st.ensure_root_disk(&vm, &sha, disk_mib).expect("root disk");
    let pattern = scratch.dir.join("pattern");
    write_pattern(&pattern);
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for i in 0..data_mib / CHUNK_MIB {
        args.push("-c".into());
        args.push(format!(
            "write -q -s {} {}M {CHUNK_MIB}M",
            pattern.display(),
            DATA_OFFSET_MIB + i * CHUNK_MIB
        ));
    }
    args.push(root.to_string_lossy().into_owned());
    let started = Instant::now();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _) = sh("qemu-io", &args);
    assert!(
        ok,
        "qemu-io could not write the data into {}",
        root.display()
    );
    let _ = std::fs::remove_file(&pattern);
    let (_, info) = sh("qemu-img", &["info", "-U", &root.to_string_lossy()]);
    eprintln!(
        "wrote {data_mib} MiB into the overlay in {} ms:\n{info}",
        started.elapsed().as_millis()
    );

    let seed = st.ensure_seed(&vm, &vm, Some(WRITER), &[]).expect("seed");
    let hv = Libvirt::connect(URI, &cloud).expect("libvirt");
    let log = st.console_log_path(&vm);
    hv.define(&DomainSpec {
        name: domain.clone(),
        vm_id: vm.clone(),
        cloud_id: cloud.clone(),
        accel: Accel::Tcg,
        vcpus: 1,
        max_vcpus: 1,
        volumes: vec![],
        memory_mib: 256,
        root_disk: root,
        seed_iso: seed,
        console_log: log.clone(),
        nics: vec![],
    })
    .expect("define");
    hv.start(&domain).expect("start");
    assert!(
        wait_for(180, || (last_tick(&log) >= Some(3)).then_some(())).is_some(),
        "the guest did not boot and write within 180 s; console:\n{}",
        console(&log)
    );

    // Guest data: what was written plus the test image's allocated clusters.
    let image_mib = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let guest_mib = data_mib as f64 + image_mib;
    let work = scratch.dir.join("work");
    let mut samples: Vec<(CaptureOutcome, u64)> = Vec::new();
    let load_before = load_average();
    for run in 0..runs {
        let out = scratch.dir.join(format!("captured-{run}.qcow2"));
        let t0 = Instant::now();
        let before = last_tick(&log).unwrap_or(0);
        let o = hv
            .capture_disk(&domain, "vda", &work, &out, &|_| {})
            .unwrap_or_else(|e| panic!("capture {run} failed: {}", e.chain()));
        let total = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let after = last_tick(&log).unwrap_or(0);
        eprintln!(
            "run {run}: {o:?}, total {total} ms; the guest wrote counters {before}..{after} meanwhile"
        );
        let _ = std::fs::remove_file(&out);
        samples.push((o, total));
    }
    let _ = hv.undefine(&domain);

    println!(
        "capture of a running 1-vCPU TCG guest: disk {disk_mib} MiB virtual, {guest_mib:.0} MiB of \
         guest data ({data_mib} MiB written: half random, half text), {runs} runs"
    );
    println!(
        "load average before / after: {load_before} / {} (2 shared cores)",
        load_average()
    );
    println!(
        "{:>4} {:>12} {:>10} {:>9} {:>11} {:>10} {:>8}",
        "run", "image bytes", "paused ms", "copy ms", "convert ms", "total ms", "MiB/s"
    );
    let rate = |total: u64| guest_mib / (total.max(1) as f64 / 1000.0);
    for (i, (o, total)) in samples.iter().enumerate() {
        println!(
            "{i:>4} {:>12} {:>10} {:>9} {:>11} {:>10} {:>8.1}",
            o.bytes,
            o.paused_ms,
            o.copy_ms,
            o.convert_ms,
            total,
            rate(*total)
        );
    }
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let total = median(samples.iter().map(|s| s.1).collect());
    println!(
        "{:>4} {:>12} {:>10} {:>9} {:>11} {:>10} {:>8.1}",
        "p50",
        median(samples.iter().map(|s| s.0.bytes).collect()),
        median(samples.iter().map(|s| s.0.paused_ms).collect()),
        median(samples.iter().map(|s| s.0.copy_ms).collect()),
        median(samples.iter().map(|s| s.0.convert_ms).collect()),
        total,
        rate(total)
    );
    println!(
        "copy rate p50: {:.1} MiB/s of guest data (backup job into the work directory)",
        guest_mib / (median(samples.iter().map(|s| s.0.copy_ms).collect()).max(1) as f64 / 1000.0)
    );
}
