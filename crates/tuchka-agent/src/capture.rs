//! Captures of VM disks the controller asks for (`image create --from-vm`, `image build`).
//!
//! Each runs in the background, beside the reconcile passes: a point-in-time copy of the disk
//! into `<pool>/captures/<id>/` ([`tuchka_host::Hypervisor::capture_disk`]: the guest keeps
//! running), then the compressed image is sent to the controller, which stores it through the
//! checks of an upload. The files are removed whatever happens. Every report says how each one
//! stands; one the controller no longer names is forgotten.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tuchka_api::agent::{CaptureObserved, CaptureStatus, HostDesired};
use tuchka_api::Image;
use tuchka_client::Client;

use crate::reconcile::{Failure, HostParts};

/// The captures of this host.
#[derive(Clone)]
pub struct Captures {
    dir: PathBuf,
    state: Arc<Mutex<HashMap<String, CaptureObserved>>>,
}

fn set(
    state: &Mutex<HashMap<String, CaptureObserved>>,
    id: &str,
    f: impl FnOnce(&mut CaptureObserved),
) {
    let mut m = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(o) = m.get_mut(id) {
        f(o);
    }
}

impl Captures {
    /// Captures working under `<pool>/captures`.
    pub fn new(pool: &std::path::Path) -> Self {
        Captures {
            dir: pool.join("captures"),
            state: Arc::default(),
        }
    }

    /// Start the captures `desired` names that are not under way; forget those it does not
    /// name any more.
    pub fn sync(
        &self,
        desired: &HostDesired,
        parts: &Arc<HostParts>,
        client: &Client,
        host_id: &str,
    ) {
        let mut m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|id, _| desired.captures.iter().any(|c| &c.id == id));
        for c in &desired.captures {
            if m.contains_key(&c.id) {
                continue;
            }
            m.insert(
                c.id.clone(),
                CaptureObserved {
                    id: c.id.clone(),
                    status: CaptureStatus::Copying,
                    bytes: 0,
                    paused_ms: 0,
                    error: None,
                    error_chain: vec![],
                },
            );
            tracing::info!(capture = %c.id, image = %c.image, domain = %c.domain, "capturing a disk");
            let job = Job {
                id: c.id.clone(),
                domain: c.domain.clone(),
                dir: self.dir.join(&c.id),
                url: format!("/v1/agent/hosts/{host_id}/captures/{}", c.id),
                state: self.state.clone(),
            };
            tokio::spawn(job.run(parts.clone(), client.clone()));
        }
    }

    /// How each capture stands.
    pub fn observed(&self) -> Vec<CaptureObserved> {
        let m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CaptureObserved> = m.values().cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

struct Job {
    id: String,
    domain: String,
    dir: PathBuf,
    url: String,
    state: Arc<Mutex<HashMap<String, CaptureObserved>>>,
}

impl Job {
    async fn run(self, parts: Arc<HostParts>, client: Client) {
        let result = self.capture_and_send(&parts, &client).await;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the capture's files");
            }
        }
        match result {
            Ok(img) => {
                tracing::info!(capture = %self.id, image = %img.name, bytes = img.stored_size, "capture stored by the controller");
                set(&self.state, &self.id, |o| o.status = CaptureStatus::Done);
            }
            Err(f) => {
                tracing::warn!(capture = %self.id, error = %f.message, chain = ?f.chain, "capture failed");
                set(&self.state, &self.id, |o| {
                    o.status = CaptureStatus::Failed;
                    o.error = Some(f.message);
                    o.error_chain = f.chain;
                });
            }
        }
    }

    async fn capture_and_send(
        &self,
        parts: &Arc<HostParts>,
        client: &Client,
    ) -> Result<Image, Failure> {
        let work = self.dir.join("work");
        let out = self.dir.join("image.qcow2");
        std::fs::create_dir_all(&work).map_err(|e| Failure {
            message: format!("cannot make {}", work.display()),
            chain: vec![e.to_string()],
        })?;
        let (p, domain, w, o, state, id) = (
            parts.clone(),
            self.domain.clone(),
            work.clone(),
            out.clone(),
            self.state.clone(),
            self.id.clone(),
        );
        let outcome = tokio::task::spawn_blocking(move || {
            p.hypervisor.capture_disk(&domain, "vda", &w, &o, &|pr| {
                set(&state, &id, |x| x.bytes = pr.done);
            })
        })
        .await
        .map_err(|e| Failure {
            message: "the capture task failed".into(),
            chain: vec![e.to_string()],
        })?
        .map_err(Failure::from)?;
        set(&self.state, &self.id, |x| {
            x.status = CaptureStatus::Uploading;
            x.bytes = outcome.bytes;
            x.paused_ms = outcome.paused_ms;
        });
        tracing::info!(
            capture = %self.id, bytes = outcome.bytes, paused_ms = outcome.paused_ms,
            copy_ms = outcome.copy_ms, convert_ms = outcome.convert_ms, "disk captured; sending it"
        );
        client
            .put_file::<Image>(&self.url, &out, |_| {})
            .await
            .map_err(|e| Failure::of(&e))
    }
}
