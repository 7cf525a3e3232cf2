//! The real [`Mover`]: migrations through the host-to-host channel (`tuchka_host::channel`).
//!
//! - Outgoing live: open a [`Tunnel`] to the target's channel, read the domain's migratable XML,
//!   move its pool paths to the target's pool, and run libvirt's peer-to-peer migration through
//!   the tunnel on a blocking thread, recording libvirt's progress as it goes. Aborting cuts the
//!   tunnel: libvirt fails the job and the VM stays here.
//! - Outgoing cold: send the stopped VM's overlay and then its data volumes through the
//!   channel, one file at a time; the target verifies each one's size and sha256 before
//!   keeping it.
//! - Incoming: admit, through [`MigrationAdmission`], only the migrations the controller told this
//!   host to expect, only from their source host.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tuchka_api::agent::{MigrationObserved, MigrationStatus};
use tuchka_api::MigrationMode;
use tuchka_host::channel::{
    self, Incoming, IncomingGuard, MigrationAdmission, MigrationPaths, Peer, Tunnel, TunnelConfig,
    TunnelHandle,
};
use tuchka_host::migrate::{migrate_through, retarget_domain_xml, LiveMigration};
use tuchka_host::{Hypervisor, Storage};

use crate::mover::{cold_files, failed, IncomingJob, Mover, OutgoingJob};
use crate::reconcile::Failure;

struct Job {
    status: MigrationObserved,
    cut: Option<TunnelHandle>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Migrations through the channel.
pub struct ChannelMover {
    rt: tokio::runtime::Handle,
    tls: Arc<rustls::ClientConfig>,
    hypervisor: Arc<dyn Hypervisor>,
    storage: Arc<dyn Storage>,
    pool: PathBuf,
    run_dir: PathBuf,
    cloud_id: String,
    admission: MigrationAdmission,
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    incoming: Mutex<HashMap<String, IncomingGuard>>,
}

/// What a [`ChannelMover`] works with.
pub struct ChannelMoverConfig {
    /// The agent's runtime (tunnels and transfers run there).
    pub rt: tokio::runtime::Handle,
    /// The channel's client TLS ([`channel::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// libvirt.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The pool.
    pub storage: Arc<dyn Storage>,
    /// The pool directory (the disk paths in domain XML start there).
    pub pool: PathBuf,
    /// Where the migration sockets live (the same path on every host).
    pub run_dir: PathBuf,
    /// The cloud.
    pub cloud_id: String,
    /// What the channel server admits.
    pub admission: MigrationAdmission,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn running(id: &str) -> MigrationObserved {
    MigrationObserved::new(id, MigrationStatus::Running)
}

fn failure(id: &str, f: Failure) -> MigrationObserved {
    let mut o = failed(id, &f.message);
    o.error_chain = f.chain;
    o
}

impl ChannelMover {
    /// A mover for this host.
    pub fn new(c: ChannelMoverConfig) -> Self {
        ChannelMover {
            rt: c.rt,
            tls: c.tls,
            hypervisor: c.hypervisor,
            storage: c.storage,
            pool: c.pool,
            run_dir: c.run_dir,
            cloud_id: c.cloud_id,
            admission: c.admission,
            jobs: Arc::new(Mutex::new(HashMap::new())),
            incoming: Mutex::new(HashMap::new()),
        }
    }

    fn set(jobs: &Mutex<HashMap<String, Job>>, id: &str, status: MigrationObserved) {
        if let Some(j) = lock(jobs).get_mut(id) {
            j.status = status;
        }
    }
}

fn peer(job: &OutgoingJob) -> Result<Peer, Failure> {
    let ip = job.target.address.parse().map_err(|_| {
        Failure::of(&std::io::Error::other(format!(
            "host {} has no usable underlay address ({:?})",
            job.target.name, job.target.address
        )))
    })?;
    if job.target.channel_port == 0 {
        return Err(Failure::of(&std::io::Error::other(format!(
            "host {} has no migration channel",
            job.target.name
        ))));
    }
    Ok(Peer {
        host_id: job.target.host_id.clone(),
        addr: SocketAddr::new(ip, job.target.channel_port),
    })
}

impl Mover for ChannelMover {
    fn expect_incoming(&self, job: &IncomingJob) -> Result<(), String> {
        let mut incoming = lock(&self.incoming);
        if incoming.contains_key(&job.id) {
            return Ok(());
        }
        let guard = self
            .admission
            .expect(Incoming {
                migration_id: job.id.clone(),
                source_host_id: job.source_host_id.clone(),
                vm_id: job.vm_id.clone(),
                live: job.mode == MigrationMode::Live,
                files: job.files.clone(),
            })
            .map_err(|e| e.chain())?;
        incoming.insert(job.id.clone(), guard);
        Ok(())
    }

    fn keep_incoming(&self, ids: &[String]) {
        lock(&self.incoming).retain(|id, _| ids.contains(id));
    }

    fn begin(&self, job: &OutgoingJob) -> Result<(), String> {
        let id = job.id.clone();
        let peer = match peer(job) {
            Ok(p) => p,
            Err(f) => {
                let message = f.message.clone();
                lock(&self.jobs).insert(
                    id.clone(),
                    Job {
                        status: failure(&id, f),
                        cut: None,
                        task: None,
                    },
                );
                return Err(message);
            }
        };
        lock(&self.jobs).insert(
            id.clone(),
            Job {
                status: running(&id),
                cut: None,
                task: None,
            },
        );
        let jobs = self.jobs.clone();
        let tls = self.tls.clone();
        let task = match job.mode {
            MigrationMode::Live => {
                let paths = MigrationPaths::new(&self.run_dir, &self.cloud_id, &id)
                    .map_err(|e| e.chain())?;
                let hv = self.hypervisor.clone();
                let (pool, target_pool) = (self.pool.clone(), PathBuf::from(&job.target_pool));
                let domain = job.vm.domain.clone();
                self.rt.spawn(async move {
                    let config = TunnelConfig {
                        paths: paths.clone(),
                        migration_id: id.clone(),
                        target: peer,
                        qemu_gid: channel::qemu_gid(),
                    };
                    let tunnel = match Tunnel::open(config, tls).await {
                        Ok(t) => t,
                        Err(e) => {
                            ChannelMover::set(&jobs, &id, failure(&id, Failure::of(&e)));
                            return;
                        }
                    };
                    if let Some(j) = lock(&jobs).get_mut(&id) {
                        j.cut = Some(tunnel.handle());
                    }
                    let (jobs2, id2) = (jobs.clone(), id.clone());
                    let outcome = tokio::task::spawn_blocking(move || {
                        let started = Instant::now();
                        let xml = hv.migratable_xml(&domain).map_err(|e| Failure::of(&e))?;
                        let dest = retarget_domain_xml(&xml, &pool, &target_pool)
                            .map_err(|e| Failure::of(&e))?;
                        let mut lm = LiveMigration::through(&paths, &domain, dest);
                        // Its data volumes go with it (the target made them, empty).
                        let volumes = hv.volumes(&domain).map_err(|e| Failure::of(&e))?;
                        lm.disks.extend(volumes.into_iter().map(|v| v.target));
                        let mut progress = |p: &tuchka_host::migrate::MigrationProgress| {
                            let secs = started.elapsed().as_secs_f64().max(0.001);
                            if let Some(j) = lock(&jobs2).get_mut(&id2) {
                                j.status.copied_bytes = p.data_processed;
                                j.status.remaining_bytes = p.data_remaining;
                                j.status.mib_per_s =
                                    p.data_processed as f64 / secs / (1024.0 * 1024.0);
                            }
                        };
                        let r = migrate_through(&*hv, &tunnel, &lm, &mut progress)
                            .map_err(|e| Failure::of(&e));
                        drop(tunnel);
                        r
                    })
                    .await;
                    let status = match outcome {
                        Ok(Ok(o)) => {
                            tracing::info!(migration = %id, total_ms = o.total.as_millis() as u64, downtime_ms = ?o.downtime.map(|d| d.as_millis()), bytes = o.bytes, "live migration done");
                            let mut s = running(&id);
                            s.status = MigrationStatus::Completed;
                            s.copied_bytes = o.bytes;
                            s.total_ms = Some(o.total.as_millis() as u64);
                            s.downtime_ms = o.downtime.map(|d| d.as_millis() as u64);
                            s.bytes = Some(o.bytes);
                            s.mib_per_s = o.mib_per_s;
                            s
                        }
                        Ok(Err(f)) => {
                            tracing::warn!(migration = %id, error = %f.message, chain = ?f.chain, "live migration failed");
                            failure(&id, f)
                        }
                        Err(e) => failure(&id, Failure::of(&e)),
                    };
                    ChannelMover::set(&jobs, &id, status);
                })
            }
            MigrationMode::Cold => {
                // The root disk, then each data volume, one file at a time.
                let files = cold_files(&*self.storage, &job.vm);
                self.rt.spawn(async move {
                    let started = Instant::now();
                    let mut bytes = 0u64;
                    let mut sent_all = Ok(());
                    for (disk, path) in &files {
                        match channel::send_file(&tls, &peer, &id, disk, path).await {
                            Ok(sent) => {
                                tracing::info!(migration = %id, disk = %disk, bytes = sent.bytes, sha256 = %sent.sha256, "cold migration: disk sent and verified");
                                bytes += sent.bytes;
                                if let Some(j) = lock(&jobs).get_mut(&id) {
                                    j.status.copied_bytes = bytes;
                                }
                            }
                            Err(e) => {
                                sent_all = Err(e);
                                break;
                            }
                        }
                    }
                    let status = match sent_all {
                        Ok(()) => {
                            let mut s = running(&id);
                            s.status = MigrationStatus::Completed;
                            s.copied_bytes = bytes;
                            s.bytes = Some(bytes);
                            let ms = started.elapsed().as_millis() as u64;
                            s.total_ms = Some(ms);
                            s.mib_per_s =
                                bytes as f64 / (ms.max(1) as f64 / 1000.0) / (1024.0 * 1024.0);
                            s
                        }
                        Err(e) => failure(&id, Failure::of(&e)),
                    };
                    ChannelMover::set(&jobs, &id, status);
                })
            }
        };
        if let Some(j) = lock(&self.jobs).get_mut(&job.id) {
            j.task = Some(task);
        }
        Ok(())
    }

    fn status(&self, id: &str) -> Option<MigrationObserved> {
        lock(&self.jobs).get(id).map(|j| j.status.clone())
    }

    fn abort(&self, id: &str) {
        let mut jobs = lock(&self.jobs);
        let Some(j) = jobs.get_mut(id) else {
            return;
        };
        if j.status.status != MigrationStatus::Running {
            return;
        }
        match &j.cut {
            // libvirt fails the job once its streams are cut; the task records that.
            Some(cut) => cut.cut("aborted: the controller called the migration off"),
            None => {
                if let Some(t) = j.task.take() {
                    t.abort();
                }
                j.status = failed(id, "aborted before the copy started");
            }
        }
    }

    fn forget(&self, id: &str) {
        if let Some(j) = lock(&self.jobs).remove(id) {
            if let Some(cut) = j.cut {
                cut.cut("the migration is over");
            }
            if let Some(t) = j.task {
                if !t.is_finished() {
                    t.abort();
                }
            }
        }
    }

    fn known(&self) -> Vec<String> {
        lock(&self.jobs).keys().cloned().collect()
    }
}
