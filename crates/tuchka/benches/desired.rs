//! The controller's cost as the state grows: one host's desired state (what its agent
//! long-polls after every change), `vm list` and `host list` for 10, 100 and 1,000 VMs on one
//! network — built from a real SQLite file by the real controller code, called in-process (no
//! HTTP), so the figure is the controller's own work per request. The VMs are made by real
//! `group create`s (of 100); no agent runs (they stay `pending`, which costs the same to show).
//!
//! Run: `cargo bench -p tuchka --bench desired`. Environment: BENCH_SIZES (default
//! "10,100,1000"), BENCH_REPEAT (default 20).

use std::time::{Duration, Instant};

use tuchka_api::agent::{HostFacts, HostRegister};
use tuchka_api::{GroupCreate, NetworkCreate};
use tuchka_controller::{Controller, ControllerConfig};
use tuchka_store::ImageRow;

const IMG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median and worst of `repeat` calls of `f`.
fn time(repeat: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut t: Vec<Duration> = (0..repeat)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    (t[t.len() / 2], t[t.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let sizes: Vec<u32> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10,100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let repeat: usize = env_or("BENCH_REPEAT", 20);
    println!("| VMs | desired state of the host (p50 / max) | vm list | host list |");
    println!("|---|---|---|---|");
    for n in sizes {
        let dir = tempfile::tempdir().expect("tmp");
        let ctl = Controller::open(ControllerConfig::new(dir.path().to_path_buf())).expect("open");
        let reg = tuchka_controller::agents::register(
            &ctl,
            HostRegister {
                name: "h1".into(),
                join_token: String::new(),
                facts: HostFacts {
                    cpus: n,
                    memory_mib: 64 * u64::from(n) + 8192,
                    disk_mib: 2 * 1024 * u64::from(n) + 100_000,
                    disk_free_mib: 2 * 1024 * u64::from(n) + 90_000,
                    accel: "tcg".into(),
                    ..Default::default()
                },
                identity: None,
                csr_pem: None,
            },
            true,
        )
        .expect("register");
        ctl.db()
            .atomic(|c| {
                tuchka_store::insert_image(
                    c,
                    &ImageRow {
                        name: "tiny".into(),
                        sha256: IMG.into(),
                        file_sha256: IMG.into(),
                        source_format: "qcow2".into(),
                        virtual_size: 64 << 20,
                        stored_size: 1 << 20,
                        created_at: tuchka_store::now(),
                        made_from: "upload".into(),
                    },
                )
            })
            .expect("image");
        tuchka_controller::networks::create(
            &ctl,
            NetworkCreate {
                name: "lan".into(),
                cidr: "10.80.0.0/16".into(),
                gateway: None,
                nat: false,
            },
        )
        .expect("network");
        // A group holds at most 100 VMs: groups of 100.
        for k in 0..n.div_ceil(100) {
            tuchka_controller::groups::create(
                &ctl,
                GroupCreate {
                    name: format!("web{k}"),
                    image: "tiny".into(),
                    count: (n - 100 * k).min(100),
                    cpus: 1,
                    memory_mib: 64,
                    disk_mib: 1024,
                    networks: vec!["lan".into()],
                    user_data: None,
                    ssh_keys: vec![],
                    placement: None,
                    anti_affinity: false,
                    volume_size_mib: None,
                    keep_volumes: false,
                    max_cpus: None,
                },
            )
            .expect("group");
        }
        let mut vms = 0;
        let desired = time(repeat, || {
            vms = tuchka_controller::desired::desired_for(&ctl, &reg.host_id, 0)
                .expect("desired")
                .vms
                .len();
        });
        assert_eq!(vms, n as usize);
        let list = time(repeat, || {
            tuchka_controller::vms::list(&ctl).expect("vm list");
        });
        let hosts = time(repeat, || {
            tuchka_controller::hosts::list(&ctl).expect("host list");
        });
        println!(
            "| {n} | {} / {} | {} / {} | {} / {} |",
            ms(desired.0),
            ms(desired.1),
            ms(list.0),
            ms(list.1),
            ms(hosts.0),
            ms(hosts.1)
        );
    }
}
