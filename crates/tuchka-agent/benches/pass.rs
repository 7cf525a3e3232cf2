//! The cost of one agent pass as the work grows: a pass that starts N new VMs, then a steady
//! pass over the same N running VMs, for N = 10, 100 and 1,000. The host's side effects are
//! the fakes of `tuchka-host` (no libvirt, no files beyond a temp dir), so what is measured is
//! the agent's own work — its CPU time and how many hypervisor calls it makes, the figure
//! that grew as N² before (a listing of every domain after each action). The real libvirt
//! costs per call are in the launch benchmark.
//!
//! Run: `cargo bench -p tuchka-agent --bench pass`. Environment: BENCH_SIZES (default
//! "10,100,1000").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tuchka_agent::mover::FakeMover;
use tuchka_agent::reconcile::{reconcile, HostParts, Memory};
use tuchka_api::agent::{HostDesired, NetworkDesired, NicDesired, VmDesired};
use tuchka_api::PowerState;
use tuchka_host::fake::{FakeDataplane, FakeHypervisor, FakeStorage};
use tuchka_host::Accel;

const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";
const IMG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn vm(i: usize) -> VmDesired {
    VmDesired {
        id: format!("3b0e8a52-5a1f-4c55-9a0e-{i:012}"),
        name: format!("web-{i}"),
        domain: format!("tk-0f2a6c1e-web-{i}"),
        power: PowerState::Running,
        cpus: 1,
        memory_mib: 128,
        disk_mib: 1024,
        image_sha256: IMG.into(),
        image_file_sha256: IMG.into(),
        nics: vec![NicDesired {
            network: "lan".into(),
            bridge: "tk5000".into(),
            mac: format!(
                "52:54:00:{:02x}:{:02x}:{:02x}",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            ),
            ip: format!("10.80.{}.{}", i / 250, 2 + i % 250),
            tap: format!("tkv{:02x}{:02x}{:02x}", i >> 16, (i >> 8) & 0xff, i & 0xff),
        }],
        user_data: None,
        ssh_keys: vec![],
        reboot_seq: 0,
        force_stop: false,
        stop_timeout_s: 60,
        migration: None,
        max_cpus: 1,
        volumes: vec![],
        resume_seq: 0,
        run_once: false,
    }
}

fn desired(n: usize) -> HostDesired {
    HostDesired {
        generation: 1,
        cloud_id: CLOUD.into(),
        vms: (0..n).map(vm).collect(),
        networks: vec![NetworkDesired {
            name: "lan".into(),
            vni: 5000,
            bridge: "tk5000".into(),
            cidr: "10.80.0.0/16".into(),
            gateway: "10.80.0.1".into(),
            gateway_here: true,
            mtu: 1450,
            hosts: vec![],
            nat: false,
            ingress: vec![],
            egress: vec![],
            forwards: vec![],
            vxlan: None,
        }],
        images: vec![IMG.into()],
        removals: vec![],
        peers: vec![],
        volumes: vec![],
        volume_removals: vec![],
        captures: vec![],
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10,100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("| VMs | pass | time | hypervisor calls | of which listings | per VM |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let dir = tempfile::tempdir().expect("tmp");
        let hv = Arc::new(FakeHypervisor::new(CLOUD));
        let st = Arc::new(FakeStorage::new(dir.path()).expect("storage"));
        st.add_image(IMG, 64);
        let parts = HostParts {
            hypervisor: hv.clone(),
            storage: st,
            dataplane: Arc::new(FakeDataplane::new()),
            mover: Arc::new(FakeMover::default()),
            accel: Accel::Tcg,
            cloud_id: CLOUD.into(),
            channel_port: None,
            underlay_address: None,
            controller: None,
        };
        let d = desired(n);
        let mut mem = Memory::default();
        for label in ["start all", "steady"] {
            hv.take_calls();
            let t = Instant::now();
            let r = reconcile(&parts, &d, &mut mem, &HashMap::new(), &HashMap::new());
            let took = t.elapsed();
            assert_eq!(r.report.vms.len(), n);
            let calls = hv.calls().len();
            println!(
                "| {n} | {label} | {:.1} ms | {calls} | {} | {:.1} |",
                took.as_secs_f64() * 1000.0,
                hv.count("list"),
                calls as f64 / n as f64
            );
        }
    }
}
