//! Launch at the machine's floor: in the same run, on the same host, alternating,
//!
//! - **floor**: N bare `virsh create` processes started all at once (transient domains of the
//!   test image, no NICs, no seed; each on an overlay made beforehand, not timed) — time until
//!   every one has returned, i.e. every domain is running;
//! - **tuchka**: `tuchka group create --count N --wait` (with a NIC on a network, DHCP
//!   reservations, seeds, overlays made by the agent) — time from the CLI call to its exit, i.e.
//!   the host reported every domain running.
//!
//! Guest boot is in neither. Each measurement starts on a quiet cloud (the previous guests
//! destroyed, a pause for the machine to settle). Prints every round, the medians and the
//! ratio tuchka / floor; with BENCH_N ≥ 50 also the CPU time and peak RSS of `tuchka serve`
//! (controller and agent in one process) during the launch.
//!
//! Run: `cargo bench -p tuchka --bench floor` (as root, libvirt started). Environment: BENCH_N
//! (VMs, default 10), BENCH_ROUNDS (default 3), BENCH_MEMORY (MiB per VM, default 192),
//! BENCH_SETTLE (seconds between measurements, default 5), TUCHKA_TEST_IMAGE.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Cloud;
use support::{cpu_ticks, env_or, median, ms, status_kib};

/// The floor's domains: the same device model as tuchka's (machine `pc`, virtio qcow2 overlay,
/// serial console to a file, ACPI, TCG) without NIC and seed.
struct Floor {
    dir: PathBuf,
    names: Vec<String>,
    memory_mib: u64,
}

impl Floor {
    fn new(image: &Path, n: usize, memory_mib: u64) -> Floor {
        let dir = PathBuf::from(format!("/var/tmp/tuchka-floor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("floor dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let base = dir.join("base.qcow2");
        std::fs::copy(image, &base).expect("copy image");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let names = (0..n)
            .map(|i| format!("tkfloor-{}-{i}", std::process::id()))
            .collect();
        Floor {
            dir,
            names,
            memory_mib,
        }
    }

    /// Fresh overlays and XML files (not timed).
    fn prepare(&self) {
        for (i, name) in self.names.iter().enumerate() {
            let disk = self.dir.join(format!("{i}.qcow2"));
            let _ = std::fs::remove_file(&disk);
            let ok = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(self.dir.join("base.qcow2"))
                .arg(&disk)
                .arg("1G")
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "qemu-img create {}", disk.display());
            let xml = format!(
                "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>{m}</memory>\n  \
                 <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
                 <features><acpi/><apic/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <devices>\n    \
                 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}'/>\
                 <target dev='vda' bus='virtio'/></disk>\n    <serial type='file'><source path='{c}' append='on'/>\
                 <target port='0'/></serial>\n  </devices>\n</domain>\n",
                m = self.memory_mib,
                d = disk.display(),
                c = self.dir.join(format!("{i}.log")).display(),
            );
            std::fs::write(self.dir.join(format!("{i}.xml")), xml).expect("xml");
        }
    }

    /// All `virsh create` at once; the time until the last one returned.
    fn run(&self) -> Duration {
        let t = Instant::now();
        let children: Vec<_> = (0..self.names.len())
            .map(|i| {
                Command::new("virsh")
                    .args(["-q", "-c", "qemu:///system", "create"])
                    .arg(self.dir.join(format!("{i}.xml")))
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("virsh create")
            })
            .collect();
        for mut c in children {
            assert!(
                c.wait().map(|s| s.success()).unwrap_or(false),
                "virsh create failed"
            );
        }
        t.elapsed()
    }

    fn destroy(&self) {
        for name in &self.names {
            let _ = Command::new("virsh")
                .args(["-q", "-c", "qemu:///system", "destroy", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.destroy();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let n: usize = env_or("BENCH_N", 10);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let memory: u64 = env_or("BENCH_MEMORY", 192);
    let settle = Duration::from_secs(env_or("BENCH_SETTLE", 5));
    let image = common::test_image();
    let floor = Floor::new(&image, n, memory);
    // Overcommit so that N small VMs fit on this 2-core machine.
    let c = Cloud::start_with(
        "floor",
        &[
            "--accel",
            "tcg",
            "--cpu-overcommit",
            "64",
            "--memory-overcommit",
            "4",
        ],
    );
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    let p = std::process::id();
    // A /22 holds 100 VMs and more.
    let cidr = format!("10.{}.{}.0/22", 100 + p % 50, ((p / 50) % 64) * 4);
    c.ok(&["net", "create", "floor", "--cidr", &cidr, "--wait"]);
    c.track_network("floor");
    let mem = format!("{memory}M");
    let count = n.to_string();
    let pid = c.serve_pid().expect("serve pid");
    // Not timed: the first VM brings the image into the host's cache (the floor's base image is
    // already on disk).
    c.ok(&[
        "group", "create", "warm", "--image", "tiny", "--count", "1", "--memory", &mem, "--net",
        "floor", "--wait",
    ]);
    c.ok(&["group", "rm", "warm", "--wait"]);
    let (mut floors, mut tuchkas) = (vec![], vec![]);
    for r in 0..rounds {
        floor.prepare();
        std::thread::sleep(settle);
        let f = floor.run();
        floor.destroy();
        std::thread::sleep(settle);
        let (ticks0, t) = (cpu_ticks(pid), Instant::now());
        let group = format!("f{r}");
        c.ok(&[
            "group", "create", &group, "--image", "tiny", "--count", &count, "--memory", &mem,
            "--net", "floor", "--wait",
        ]);
        let k = t.elapsed();
        let cpu_s = (cpu_ticks(pid) - ticks0) as f64 / 100.0;
        for i in 0..n.min(1) {
            c.vm(&format!("{group}-{i}"));
        }
        println!(
            "round {}: floor {:.0} ms, tuchka {:.0} ms, ratio {:.2}; load {}",
            r + 1,
            ms(f),
            ms(k),
            k.as_secs_f64() / f.as_secs_f64(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        if n >= 50 {
            println!(
                "  tuchka serve (controller + agent) during the launch: CPU {cpu_s:.1} s ({:.0} % of one core), RSS now {:.1} MiB, peak {:.1} MiB",
                100.0 * cpu_s / k.as_secs_f64(),
                status_kib(pid, "VmRSS:") as f64 / 1024.0,
                status_kib(pid, "VmHWM:") as f64 / 1024.0,
            );
        }
        floors.push(f);
        tuchkas.push(k);
        let t = Instant::now();
        c.ok(&["group", "rm", &group, "--wait"]);
        if n >= 50 {
            println!("  group of {n} removed in {:.0} ms", ms(t.elapsed()));
        }
    }
    let (f, k) = (median(&floors), median(&tuchkas));
    println!(
        "{n} VMs, {memory} MiB, {rounds} rounds: floor median {:.0} ms (min {:.0}, max {:.0}); tuchka median {:.0} ms (min {:.0}, max {:.0}); ratio of medians {:.2}",
        ms(f),
        ms(*floors.iter().min().expect("rounds")),
        ms(*floors.iter().max().expect("rounds")),
        ms(k),
        ms(*tuchkas.iter().min().expect("rounds")),
        ms(*tuchkas.iter().max().expect("rounds")),
        k.as_secs_f64() / f.as_secs_f64(),
    );
    c.ok(&["net", "rm", "floor", "--wait"]);
    c.ok(&["image", "rm", "tiny"]);
}
