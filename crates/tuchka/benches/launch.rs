//! Launch benchmark against a real `tuchka serve` (real libvirt, TCG guests):
//!
//! 1. create-VM → domain running: N one-VM groups created one after another; the time from the
//!    API call to the operation succeeding (the host reports the domain running — guest boot is
//!    not included), p50/p95;
//! 2. a group of 10 VMs from one image → all running.
//!
//! Run: `cargo bench -p tuchka --bench launch` (as root, libvirt started; `./scripts/start-libvirt`).
//! Environment: BENCH_N (default 10), TUCHKA_TEST_IMAGE (default target/testimg/tiny.qcow2).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serve {
    child: Child,
    dir: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tk(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .arg("--socket")
        .arg(dir.join("tuchka.sock"))
        .args(args)
        .output()
        .expect("run tuchka");
    assert!(
        out.status.success(),
        "tuchka {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let image = std::env::var_os("TUCHKA_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/testimg/tiny.qcow2"));
    assert!(
        image.is_file(),
        "build the test image first: scripts/build-test-image {}",
        image.display()
    );
    let dir = PathBuf::from(format!("/var/tmp/tuchka-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = std::fs::File::create(dir.join("serve.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .args([
            "serve",
            "--accel",
            "tcg",
            "--host-name",
            "bench",
            "--cpu-overcommit",
            "8",
            "--data-dir",
        ])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("serve");
    let serve = Serve {
        child,
        dir: dir.clone(),
    };
    let start = Instant::now();
    while !tk_ok(&dir) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "serve did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tk(
        &dir,
        &[
            "image",
            "upload",
            image.to_str().expect("path"),
            "--name",
            "tiny",
        ],
    );
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 100 + p % 50, (p / 50) % 256);
    tk(&dir, &["net", "create", "bench", "--cidr", &cidr, "--wait"]);

    let mut times = vec![];
    for i in 0..n {
        let name = format!("one{i}");
        let t = Instant::now();
        tk(
            &dir,
            &[
                "group", "create", &name, "--image", "tiny", "--count", "1", "--memory", "128M",
                "--net", "bench", "--wait",
            ],
        );
        times.push(t.elapsed());
        tk(&dir, &["group", "rm", &name, "--wait"]);
    }
    times.sort();
    println!(
        "create-VM → domain running (n={n}, excludes guest boot): p50 {:.0} ms, p95 {:.0} ms, min {:.0} ms, max {:.0} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );

    let t = Instant::now();
    tk(
        &dir,
        &[
            "group", "create", "ten", "--image", "tiny", "--count", "10", "--memory", "128M",
            "--net", "bench", "--wait",
        ],
    );
    let ten = t.elapsed();
    println!(
        "group of 10 from one image → all running: {:.0} ms",
        ten.as_secs_f64() * 1e3
    );
    let t = Instant::now();
    tk(&dir, &["group", "rm", "ten", "--wait"]);
    println!(
        "group of 10 → removed (domains, disks, seeds, addresses): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    tk(&dir, &["net", "rm", "bench", "--wait"]);
    tk(&dir, &["image", "rm", "tiny"]);
    drop(serve);
}

fn tk_ok(dir: &std::path::Path) -> bool {
    Command::new(env!("CARGO_BIN_EXE_tuchka"))
        .arg("--socket")
        .arg(dir.join("tuchka.sock"))
        .args(["host", "list", "-o", "json"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"up\""))
        .unwrap_or(false)
}
