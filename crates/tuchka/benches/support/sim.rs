//! A simulated host: registers like `tuchka agent`, long-polls its desired state and reports
//! every VM it is given as converged (running, paused or stopped as asked), every network ready
//! and every image cached — the real agent protocol, no libvirt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tuchka_agent::run::unchanged_or_new;
use tuchka_api::agent::{
    HostDesired, HostFacts, HostRegister, HostRegistered, HostReport, NetworkObserved, VmObserved,
};
use tuchka_api::{PowerState, VmState};
use tuchka_client::Client;

/// The facts of a big simulated host (32 CPUs, 128 GiB, 2 TB of disk).
pub fn facts() -> HostFacts {
    HostFacts {
        cpus: 32,
        memory_mib: 131072,
        disk_mib: 2_000_000,
        disk_free_mib: 1_500_000,
        accel: "kvm".into(),
        accel_reason: "simulated".into(),
        ..Default::default()
    }
}

/// Register host `name` (with `join_token`, empty on the unix socket): (host id, a client
/// carrying its credential).
pub async fn register(client: &Client, name: &str, join_token: &str) -> (String, Client) {
    let reg: HostRegistered = client
        .post(
            "/v1/agent/register",
            &HostRegister {
                name: name.to_string(),
                join_token: join_token.to_string(),
                facts: facts(),
                identity: None,
                csr_pem: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    let client = client.clone().with_token(Some(reg.credential));
    (reg.host_id, client)
}

/// What a simulated host has seen: the highest generation it received and when.
#[derive(Default)]
pub struct Seen {
    /// Highest desired-state generation received.
    pub generation: AtomicU64,
    /// Reports sent.
    pub reports: AtomicU64,
    /// Desired states received.
    pub desired: AtomicU64,
    /// When `generation` was received, as nanoseconds since the `epoch` given to [`run`].
    pub at_ns: AtomicU64,
}

/// The report of a host that converged to `d`.
pub fn converged(d: &HostDesired, facts: &HostFacts) -> HostReport {
    HostReport {
        generation: d.generation,
        facts: facts.clone(),
        vms: d
            .vms
            .iter()
            .map(|v| VmObserved {
                id: v.id.clone(),
                state: match v.power {
                    PowerState::Running => VmState::Running,
                    PowerState::Paused => VmState::Paused,
                    PowerState::Stopped => VmState::Stopped,
                },
                error: None,
                error_chain: vec![],
                reboot_seq: v.reboot_seq,
                domain: true,
                migration: None,
                cpu_usage: 0.0,
                pause_reason: None,
                resume_seq: v.resume_seq,
                running_with: Some((v.cpus, v.memory_mib, v.disk_mib)),
                powered_off: false,
                console_tail: None,
                resize_error: None,
            })
            .collect(),
        networks: d
            .networks
            .iter()
            .map(|n| NetworkObserved {
                name: n.name.clone(),
                ready: true,
                error: None,
                error_chain: vec![],
            })
            .collect(),
        cached_images: d.images.clone(),
        ..Default::default()
    }
}

/// Be host `host_id` until the task is aborted: long-poll the desired state (as the agent does,
/// `?after=` the last generation), report it converged, repeat.
pub async fn run(client: Client, host_id: String, seen: Arc<Seen>, epoch: Instant) {
    let facts = facts();
    let mut after = 0u64;
    let mut current = None;
    loop {
        let answer = client
            .get_if_changed(
                &format!("/v1/agent/hosts/{host_id}/desired?after={after}"),
                current
                    .as_ref()
                    .map(|(_, tag): &(HostDesired, String)| tag.as_str()),
            )
            .await;
        let d: HostDesired = match answer.map(|a| unchanged_or_new(&mut current, a)) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("simulated host {host_id}: desired: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if d.generation > seen.generation.load(Ordering::Relaxed) {
            seen.at_ns
                .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            seen.generation.store(d.generation, Ordering::Relaxed);
        }
        seen.desired.fetch_add(1, Ordering::Relaxed);
        let report = converged(&d, &facts);
        if let Err(e) = client
            .post_empty(&format!("/v1/agent/hosts/{host_id}/report"), &report)
            .await
        {
            eprintln!("simulated host {host_id}: report: {e}");
        }
        seen.reports.fetch_add(1, Ordering::Relaxed);
        after = d.generation;
    }
}
