//! Moving a VM off this host runs in the background, across many reconcile passes: a [`Mover`]
//! starts a migration job, tells how it stands, and aborts it (by cutting its channel: libvirt
//! then fails the job and the VM stays here). The reconcile pass decides when
//! ([`crate::plan::outgoing_action`]); the real mover ([`crate::channel`]) runs libvirt's
//! migration through the host-to-host channel, the fake here only records and obeys.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use tuchka_api::agent::{MigrationObserved, MigrationStatus, PeerHost, VmDesired};
use tuchka_api::MigrationMode;
use tuchka_host::Storage;

/// What a job needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingJob {
    /// Migration id.
    pub id: String,
    /// Live or cold.
    pub mode: MigrationMode,
    /// Where to.
    pub target: PeerHost,
    /// The target's pool directory.
    pub target_pool: String,
    /// The VM.
    pub vm: VmDesired,
}

/// A VM this host receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingJob {
    /// Migration id.
    pub id: String,
    /// Live or cold.
    pub mode: MigrationMode,
    /// The only host allowed to send it.
    pub source_host_id: String,
    /// The VM.
    pub vm_id: String,
    /// Cold: the disks that arrive, each id (the VM's for its root disk, a volume's) with
    /// where it goes.
    pub files: Vec<(String, PathBuf)>,
}

/// The disks a cold migration of `vm` moves, each id (the VM's for its root disk, a volume's)
/// with its path, the same on every host: the root disk first, then the data volumes.
pub fn cold_files(storage: &dyn Storage, vm: &VmDesired) -> Vec<(String, PathBuf)> {
    std::iter::once((vm.id.clone(), storage.root_disk_path(&vm.id)))
        .chain(
            vm.volumes
                .iter()
                .map(|v| (v.id.clone(), storage.volume_path(&v.id))),
        )
        .collect()
}

/// Moves VMs between this host and the others: off it (jobs), onto it (admission).
pub trait Mover: Send + Sync {
    /// Admit the streams (live) or the disk (cold) of `job` from its source; idempotent.
    fn expect_incoming(&self, job: &IncomingJob) -> Result<(), String>;
    /// Stop admitting every incoming migration but `ids`.
    fn keep_incoming(&self, ids: &[String]);
    /// Start job `job` (once per migration id, until [`Mover::forget`]).
    fn begin(&self, job: &OutgoingJob) -> Result<(), String>;
    /// How migration `id` stands; None when this agent never began it (or forgot it).
    fn status(&self, id: &str) -> Option<MigrationObserved>;
    /// Stop migration `id`: cut its channel; the job then fails and the VM stays here.
    fn abort(&self, id: &str);
    /// Forget migration `id` (it is over, or no longer this host's business).
    fn forget(&self, id: &str);
    /// The migrations it knows.
    fn known(&self) -> Vec<String>;
}

/// A mover for a host without a migration channel: every job fails at once, saying why.
#[derive(Debug, Default)]
pub struct NoMover {
    failed: Mutex<HashMap<String, MigrationObserved>>,
}

impl Mover for NoMover {
    fn expect_incoming(&self, _job: &IncomingJob) -> Result<(), String> {
        Err(NO_CHANNEL.to_string())
    }

    fn keep_incoming(&self, _ids: &[String]) {}

    fn begin(&self, job: &OutgoingJob) -> Result<(), String> {
        let error = NO_CHANNEL.to_string();
        lock(&self.failed).insert(job.id.clone(), failed(&job.id, &error));
        Err(error)
    }

    fn status(&self, id: &str) -> Option<MigrationObserved> {
        lock(&self.failed).get(id).cloned()
    }

    fn abort(&self, _id: &str) {}

    fn forget(&self, id: &str) {
        lock(&self.failed).remove(id);
    }

    fn known(&self) -> Vec<String> {
        lock(&self.failed).keys().cloned().collect()
    }
}

const NO_CHANNEL: &str = "this host has no migration channel (the controller gave it no certificate, or it has no underlay address: is it a single-host cloud without --listen?)";

/// A failed status with `error`.
pub fn failed(id: &str, error: &str) -> MigrationObserved {
    MigrationObserved {
        error: Some(error.to_string()),
        ..MigrationObserved::new(id, MigrationStatus::Failed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A mover for tests: records calls; jobs stay `running` until [`FakeMover::finish`] or
/// [`FakeMover::fail`]; aborting a running job fails it.
#[derive(Debug, Default)]
pub struct FakeMover {
    jobs: Mutex<HashMap<String, (OutgoingJob, MigrationObserved)>>,
    incoming: Mutex<HashMap<String, IncomingJob>>,
    calls: Mutex<Vec<String>>,
    refuse: Mutex<Option<String>>,
}

impl FakeMover {
    /// Every call so far, as `"<op> <id>"`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Make the next `begin` fail with `error`.
    pub fn refuse_next(&self, error: &str) {
        *lock(&self.refuse) = Some(error.to_string());
    }

    /// Finish job `id` well, with these statistics.
    pub fn finish(&self, id: &str, downtime_ms: u64) {
        if let Some((_, o)) = lock(&self.jobs).get_mut(id) {
            o.status = MigrationStatus::Completed;
            o.downtime_ms = Some(downtime_ms);
            o.total_ms = Some(1000);
            o.bytes = Some(1 << 20);
        }
    }

    /// Fail job `id` with `error`.
    pub fn fail(&self, id: &str, error: &str) {
        if let Some((_, o)) = lock(&self.jobs).get_mut(id) {
            *o = failed(id, error);
        }
    }

    /// The job that was begun for migration `id`.
    pub fn job(&self, id: &str) -> Option<OutgoingJob> {
        lock(&self.jobs).get(id).map(|(j, _)| j.clone())
    }
}

impl FakeMover {
    /// The incoming migrations admitted now.
    pub fn incoming(&self) -> Vec<IncomingJob> {
        lock(&self.incoming).values().cloned().collect()
    }
}

impl Mover for FakeMover {
    fn expect_incoming(&self, job: &IncomingJob) -> Result<(), String> {
        let mut m = lock(&self.incoming);
        if !m.contains_key(&job.id) {
            lock(&self.calls).push(format!("expect {}", job.id));
            m.insert(job.id.clone(), job.clone());
        }
        Ok(())
    }

    fn keep_incoming(&self, ids: &[String]) {
        lock(&self.incoming).retain(|id, _| ids.contains(id));
    }

    fn begin(&self, job: &OutgoingJob) -> Result<(), String> {
        lock(&self.calls).push(format!("begin {}", job.id));
        if let Some(e) = lock(&self.refuse).take() {
            lock(&self.jobs).insert(job.id.clone(), (job.clone(), failed(&job.id, &e)));
            return Err(e);
        }
        let o = MigrationObserved::new(&job.id, MigrationStatus::Running);
        lock(&self.jobs).insert(job.id.clone(), (job.clone(), o));
        Ok(())
    }

    fn status(&self, id: &str) -> Option<MigrationObserved> {
        lock(&self.jobs).get(id).map(|(_, o)| o.clone())
    }

    fn abort(&self, id: &str) {
        lock(&self.calls).push(format!("abort {id}"));
        if let Some((_, o)) = lock(&self.jobs).get_mut(id) {
            if o.status == MigrationStatus::Running {
                *o = failed(id, "aborted: the channel was cut");
            }
        }
    }

    fn forget(&self, id: &str) {
        lock(&self.calls).push(format!("forget {id}"));
        lock(&self.jobs).remove(id);
    }

    fn known(&self) -> Vec<String> {
        lock(&self.jobs).keys().cloned().collect()
    }
}
