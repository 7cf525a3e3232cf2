//! Shared controller state: the database, the desired-state generation and the event stream.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tuchka_api::Event;
use tuchka_core::placement::Ratios;
use tuchka_store::Store;

use crate::error::{Error, Result};

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Data directory: `state.db`, `images/`, `token`, `tuchka.sock`.
    pub data_dir: PathBuf,
    /// A host silent this long is `down`.
    pub down_after: Duration,
    /// Overcommit ratios of the scheduler.
    pub ratios: Ratios,
    /// Pool directory of the local agent, if there is one (serves `vm console`).
    pub local_pool: Option<PathBuf>,
    /// Longest a long-poll for desired state waits.
    pub long_poll: Duration,
}

impl ControllerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ControllerConfig {
            data_dir,
            down_after: Duration::from_secs(15),
            ratios: Ratios::default(),
            local_pool: None,
            long_poll: Duration::from_secs(10),
        }
    }
}

/// The controller, cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    config: ControllerConfig,
    db: Mutex<Store>,
    cloud_id: String,
    api_token: String,
    generation: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    event_seq: AtomicU64,
}

impl Controller {
    /// Open the data directory (creating it), the database and the API token.
    pub fn open(config: ControllerConfig) -> Result<Controller> {
        let dir = &config.data_dir;
        for d in [dir.clone(), dir.join("images"), dir.join("images/tmp")] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::internal(format!("cannot create {}", d.display()), &e))?;
        }
        let mut store = Store::open(&dir.join("state.db"))?;
        let cloud_id = store.cloud_id()?;
        let api_token = load_or_create_token(&dir.join("token"))?;
        // Generations only grow, across restarts too: agents long-poll with the last one they saw.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let (generation, _) = watch::channel(start);
        let (events, _) = broadcast::channel(1024);
        Ok(Controller {
            inner: Arc::new(Inner {
                config,
                db: Mutex::new(store),
                cloud_id,
                api_token,
                generation,
                events,
                event_seq: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// Id of this cloud.
    pub fn cloud_id(&self) -> &str {
        &self.inner.cloud_id
    }

    /// Bearer token required on TCP.
    pub fn api_token(&self) -> &str {
        &self.inner.api_token
    }

    /// The database (held briefly; never across an await).
    pub fn db(&self) -> MutexGuard<'_, Store> {
        match self.inner.db.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Current desired-state generation.
    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// Wake agents: the desired state changed.
    pub fn bump(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Wait until the generation is above `after`, or `timeout` passed.
    pub async fn wait_generation(&self, after: u64, timeout: Duration) -> u64 {
        let mut rx = self.inner.generation.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|g| *g > after)).await;
        self.generation()
    }

    /// Publish an event.
    pub fn emit(&self, kind: &str, object: &str, message: impl Into<String>) {
        let seq = self.inner.event_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let ev = Event {
            seq,
            time: tuchka_store::now(),
            kind: kind.into(),
            object: object.into(),
            message: message.into(),
        };
        tracing::info!(kind = %ev.kind, object = %ev.object, "{}", ev.message);
        let _ = self.inner.events.send(ev);
    }

    /// Subscribe to events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }
}

fn load_or_create_token(path: &std::path::Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    let token = hex::encode(bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::internal(format!("cannot write {}", path.display()), &e))?;
    f.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| Error::internal(format!("cannot write {}", path.display()), &e))?;
    Ok(token)
}
