//! Shared controller state: the database, the desired-state generation, the event stream, the
//! in-memory observations (metrics, console logs, load history) and the secrets: the API token
//! (`<data-dir>/token`) and the join tokens.
//!
//! Join tokens admit new hosts over TCP. Each expires (default [`JOIN_TOKEN_TTL`]) and may be
//! single-use or bound to one existing host; only their sha256 is stored (table `join_tokens`,
//! checked by [`crate::agents::register`]). `serve` makes one at start (or keeps the one it made
//! before while it is valid), keeps it in `<data-dir>/join-token` (mode 0600) and, with
//! `--listen`, writes the whole join command to `<data-dir>/join.txt` (mode 0600);
//! [`Controller::create_join_token`] makes more (`tuchka host join-token`), and with `rotate`
//! refuses every other one and replaces the one of `join.txt`. Hosts that joined keep their
//! credentials.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tuchka_api::{Event, JoinToken, JoinTokenCreate};
use tuchka_core::digest::sha256_hex;
use tuchka_core::placement::Ratios;
use tuchka_store::Store;

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Data directory: `state.db`, `images/`, `token`, `tuchka.sock`.
    pub data_dir: PathBuf,
    /// A host silent this long is `down`.
    pub down_after: Duration,
    /// Overcommit ratios of the scheduler.
    pub ratios: Ratios,
    /// Pool directory of the local agent, if there is one.
    pub local_pool: Option<PathBuf>,
    /// Longest a long-poll for desired state waits.
    pub long_poll: Duration,
    /// Where agents join over TCP (set with `--listen`).
    pub join: Option<JoinEndpoint>,
    /// Time limits of migration phases.
    pub migration_limits: tuchka_core::migration::Limits,
    /// Whether the controller balances load by itself, and how often.
    pub balance: BalanceConfig,
    /// A cached image nothing on a host uses is removed there after this long
    /// (`serve --image-cache-ttl`).
    pub image_cache_ttl: Duration,
    /// Share of each host's pool (0..1) never placed on (`serve --disk-reserve`).
    pub disk_reserve: f64,
    /// What an incoming image (an upload, a capture) may be (`serve --max-upload-size`,
    /// `--max-image-virtual-size`, `--idle-timeout`).
    pub uploads: UploadLimits,
}

/// Bounds on incoming images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest file received, bytes: larger ones are refused before a byte is stored when the
    /// sender says its length, else as soon as the limit is passed.
    pub max_size: u64,
    /// Largest virtual disk size an image may have, bytes.
    pub max_virtual_size: u64,
    /// Longest an upload's body may send nothing before it is abandoned.
    pub stall_timeout: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_size: 64 << 30,
            max_virtual_size: 2 << 40,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// How the balancer runs (`serve --balance`, `--balance-interval`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceConfig {
    /// `off`: only `balance apply`; `auto`: every `interval`.
    pub mode: tuchka_api::BalanceMode,
    /// Time between rounds.
    pub interval: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            mode: tuchka_api::BalanceMode::Off,
            interval: Duration::from_secs(30),
        }
    }
}

/// The TCP endpoint agents join at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinEndpoint {
    /// `https://ADDR:PORT`.
    pub url: String,
    /// sha256 (hex) of the controller's CA certificate.
    pub fingerprint: String,
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
            join: None,
            migration_limits: Default::default(),
            balance: BalanceConfig::default(),
            image_cache_ttl: Duration::from_secs(24 * 3600),
            disk_reserve: 0.10,
            uploads: UploadLimits::default(),
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
    readers: tuchka_store::Readers,
    cloud_id: String,
    api_token: String,
    join_token: Mutex<MadeToken>,
    generation: watch::Sender<u64>,
    /// Bumped after every committed write transaction (operation long polls wait on it).
    commits: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    event_seq: AtomicU64,
    metrics: crate::metrics::Metrics,
    consoles: crate::console_log::ConsoleLogs,
    history: crate::history::LoadHistory,
}

impl Controller {
    /// Open the data directory (creating it), the database and the API token.
    pub fn open(config: ControllerConfig) -> Result<Controller> {
        let dir = &config.data_dir;
        for d in [dir.clone(), dir.join("images"), dir.join("images/tmp")] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::internal(format!("cannot create {}", d.display()), &e))?;
        }
        // The image store is served to agents over the API; nobody else reads it.
        for d in [dir.join("images"), dir.join("images/tmp")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                Error::internal(format!("cannot set permissions of {}", d.display()), &e)
            })?;
        }
        let mut store = Store::open(&dir.join("state.db"))?;
        let readers = tuchka_store::Readers::new(&dir.join("state.db"));
        let cloud_id = store.cloud_id()?;
        let api_token = load_or_create_token(&dir.join("token"))?;
        let join_token = load_or_create_join_token(dir, &mut store)?;
        // Generations only grow, across restarts too: agents long-poll with the last one they saw.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let (generation, _) = watch::channel(start);
        let (events, _) = broadcast::channel(1024);
        let (commits, _) = watch::channel(0u64);
        let notify = commits.clone();
        store.set_on_commit(move || notify.send_modify(|n| *n = n.wrapping_add(1)));
        let ctl = Controller {
            inner: Arc::new(Inner {
                config,
                db: Mutex::new(store),
                readers,
                cloud_id,
                api_token,
                join_token: Mutex::new(join_token),
                generation,
                commits,
                events,
                event_seq: AtomicU64::new(0),
                metrics: Default::default(),
                consoles: Default::default(),
                history: Default::default(),
            }),
        };
        ctl.write_join_file()?;
        Ok(ctl)
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

    /// The join token of `join.txt` (made at start or by the last rotation), the URL and
    /// fingerprint agents need, and the command that joins a host.
    pub fn join_info(&self) -> JoinToken {
        let t = lock(&self.inner.join_token).clone();
        join_info(self.inner.config.join.as_ref(), &t)
    }

    /// Make a join token (`tuchka host join-token`). It is shown once: only its sha256 is kept.
    /// With `rotate`, every other join token is refused from now on and this one becomes the
    /// token of `join.txt`.
    pub fn create_join_token(&self, req: &JoinTokenCreate) -> Result<JoinToken> {
        let ttl = req.ttl_s.unwrap_or(JOIN_TOKEN_TTL.as_secs());
        if ttl == 0 || ttl > MAX_JOIN_TOKEN_TTL.as_secs() {
            return Err(Error::invalid(
                "InvalidTtl",
                format!("a join token lives 1 s to 30 days (--ttl), not {ttl} s: e.g. --ttl 1h"),
            ));
        }
        if req.rotate && req.host.is_some() {
            return Err(Error::invalid(
                "InvalidJoinToken",
                "--rotate makes the token of join.txt for any new host; a token for one host (--host) cannot be it",
            ));
        }
        let token = random_hex();
        let made = self.db().atomic(|c| {
            let host = match &req.host {
                Some(name) => Some(crate::hosts::find(c, name)?),
                None => None,
            };
            if req.rotate {
                let n = tuchka_store::delete_join_tokens(c)?;
                tracing::info!(
                    refused = n,
                    "join tokens rotated: every earlier one is refused"
                );
            }
            let row = new_token_row(
                &token,
                ttl,
                req.single_use || host.is_some(),
                host.as_ref().map(|h| h.id.clone()),
            );
            tuchka_store::insert_join_token(c, &row)?;
            Ok::<_, Error>((row, host.map(|h| h.name)))
        })?;
        let (row, host) = made;
        let made = MadeToken {
            token,
            expires_unix: row.expires_unix,
            single_use: row.single_use,
            host,
        };
        if req.rotate {
            let dir = &self.inner.config.data_dir;
            write_secret(&dir.join(JOIN_TOKEN_FILE), &format!("{}\n", made.token))?;
            *lock(&self.inner.join_token) = made.clone();
            self.write_join_file()?;
        }
        Ok(join_info(self.inner.config.join.as_ref(), &made))
    }

    /// Write `<data-dir>/join.txt` (the join command) when agents can join over TCP.
    fn write_join_file(&self) -> Result<()> {
        if let Some(command) = self.join_info().command {
            let path = self.inner.config.data_dir.join(JOIN_COMMAND_FILE);
            write_secret(&path, &format!("{command}\n"))?;
        }
        Ok(())
    }

    /// A consistent read of the whole state (see [`Snapshot`]).
    pub fn snapshot(&self, c: &rusqlite::Connection) -> Result<Snapshot> {
        Snapshot::load(c, self.inner.config.down_after.as_secs() as i64)
    }

    /// The database (held briefly; never across an await).
    pub fn db(&self) -> MutexGuard<'_, Store> {
        match self.inner.db.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Run the reads of `f` on a read connection, in one read transaction: beside writes (the
    /// writer's lock is not taken) and beside other reads. For views; never for a
    /// read-modify-write (that is [`Store::atomic`]).
    pub fn read<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T> {
        self.inner.readers.read(f)
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

    /// Something that changes after every committed write: a receiver's `changed()` wakes on
    /// the next commit (long polls re-read what they watch then).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.subscribe()
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

    /// The event metrics (`/metrics`).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// The VMs' console logs as their agents shipped them.
    pub fn consoles(&self) -> &crate::console_log::ConsoleLogs {
        &self.inner.consoles
    }

    /// The hosts' load over the last hour.
    pub fn history(&self) -> &crate::history::LoadHistory {
        &self.inner.history
    }
}

/// How long a join token admits hosts unless told otherwise (`host join-token --ttl`).
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// File (in the data directory) holding the join token of `join.txt`.
const JOIN_TOKEN_FILE: &str = "join-token";
/// File (in the data directory) holding the join command.
pub const JOIN_COMMAND_FILE: &str = "join.txt";

/// A join token as it was made (the secret is only ever in memory and in `join-token`).
#[derive(Debug, Clone)]
struct MadeToken {
    token: String,
    expires_unix: i64,
    single_use: bool,
    host: Option<String>,
}

fn new_token_row(
    token: &str,
    ttl_s: u64,
    single_use: bool,
    host_id: Option<String>,
) -> tuchka_store::JoinTokenRow {
    tuchka_store::JoinTokenRow {
        id: uuid::Uuid::new_v4().to_string(),
        sha256: sha256_hex(token.as_bytes()),
        created_at: tuchka_store::now(),
        expires_unix: tuchka_store::now_unix() + ttl_s as i64,
        single_use,
        host_id,
        used_unix: None,
        used_by: None,
    }
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The command that joins a host to the controller at `url`.
pub fn join_command(url: &str, token: &str, fingerprint: &str) -> String {
    format!("tuchka agent --controller {url} --join-token {token} --fingerprint {fingerprint}")
}

fn join_info(endpoint: Option<&JoinEndpoint>, t: &MadeToken) -> JoinToken {
    JoinToken {
        url: endpoint.map(|e| e.url.clone()),
        fingerprint: endpoint.map(|e| e.fingerprint.clone()),
        command: endpoint.map(|e| join_command(&e.url, &t.token, &e.fingerprint)),
        token: t.token.clone(),
        expires_at: rfc3339(t.expires_unix),
        single_use: t.single_use,
        host: t.host.clone(),
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    hex::encode(bytes)
}

/// Write `text` to `path`, readable by its owner only.
fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| Error::internal(format!("cannot write {}", path.display()), &e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // An existing file keeps its mode on open: make sure it is private.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)
}

fn read_trimmed(path: &std::path::Path) -> Option<String> {
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn load_or_create_token(path: &std::path::Path) -> Result<String> {
    if let Some(t) = read_trimmed(path) {
        return Ok(t);
    }
    let token = random_hex();
    write_secret(path, &format!("{token}\n"))?;
    Ok(token)
}

/// The join token of `join.txt`: the one in `<dir>/join-token` while the database still admits
/// hosts with it (not expired, not used up), else a new one ([`JOIN_TOKEN_TTL`], written to
/// both). Tokens expired long ago are dropped.
fn load_or_create_join_token(dir: &std::path::Path, store: &mut Store) -> Result<MadeToken> {
    let path = dir.join(JOIN_TOKEN_FILE);
    let now = tuchka_store::now_unix();
    store.atomic(|c| tuchka_store::prune_join_tokens(c, now))?;
    if let Some(t) = read_trimmed(&path) {
        let row = tuchka_store::join_token_by_sha(store.conn(), &sha256_hex(t.as_bytes()))?;
        match row {
            Some(r) if r.expires_unix > now && r.used_unix.is_none() && r.host_id.is_none() => {
                return Ok(MadeToken {
                    token: t,
                    expires_unix: r.expires_unix,
                    single_use: r.single_use,
                    host: None,
                });
            }
            _ => tracing::info!(
                file = %path.display(),
                "the join token of the last start expired, was used or rotated away: a new one was made"
            ),
        }
    }
    let token = random_hex();
    let row = new_token_row(&token, JOIN_TOKEN_TTL.as_secs(), false, None);
    store.atomic(|c| tuchka_store::insert_join_token(c, &row))?;
    write_secret(&path, &format!("{token}\n"))?;
    Ok(MadeToken {
        token,
        expires_unix: row.expires_unix,
        single_use: false,
        host: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, join: Option<JoinEndpoint>) -> Controller {
        let mut config = ControllerConfig::new(dir.to_path_buf());
        config.join = join;
        Controller::open(config).expect("open")
    }

    /// Whether `token` admits a new host now (or at `now`).
    fn admits_at(ctl: &Controller, token: &str, now: i64) -> bool {
        crate::agents::check_join_token(ctl.db().conn(), token, "edge", now, None).is_ok()
    }

    fn admits(ctl: &Controller, token: &str) -> bool {
        admits_at(ctl, token, tuchka_store::now_unix())
    }

    #[test]
    fn the_join_token_of_join_txt_is_kept_while_valid_checked_by_hash_and_rotated() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let endpoint = JoinEndpoint {
            url: "https://10.0.0.1:7480".into(),
            fingerprint: "ab".repeat(32),
        };
        let ctl = open(tmp.path(), Some(endpoint.clone()));
        let info = ctl.join_info();
        assert_eq!(info.token.len(), 64);
        assert!(admits(&ctl, &info.token));
        assert!(!admits(&ctl, "wrong"));
        assert!(!admits(&ctl, ""));
        assert!(!info.single_use);
        // It expires in an hour.
        let now = tuchka_store::now_unix();
        assert!(admits_at(&ctl, &info.token, now + 3590));
        assert!(!admits_at(&ctl, &info.token, now + 3601));
        let command = info.command.clone().expect("command");
        assert_eq!(
            command,
            format!(
                "tuchka agent --controller https://10.0.0.1:7480 --join-token {} --fingerprint {}",
                info.token,
                "ab".repeat(32)
            )
        );
        let file = tmp.path().join(JOIN_COMMAND_FILE);
        assert_eq!(
            std::fs::read_to_string(&file).expect("join.txt"),
            format!("{command}\n")
        );
        for f in [JOIN_COMMAND_FILE, JOIN_TOKEN_FILE, "token"] {
            let mode = std::fs::metadata(tmp.path().join(f))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // The database holds only the hash.
        let row =
            tuchka_store::join_token_by_sha(ctl.db().conn(), &sha256_hex(info.token.as_bytes()))
                .expect("read")
                .expect("row");
        assert_ne!(row.sha256, info.token);
        drop(ctl);

        // A restart keeps it while it is valid.
        let ctl = open(tmp.path(), Some(endpoint.clone()));
        assert_eq!(ctl.join_info(), info);

        // More tokens: each its own, with its own lifetime; bad lifetimes are refused.
        let short = ctl
            .create_join_token(&JoinTokenCreate {
                ttl_s: Some(60),
                ..Default::default()
            })
            .expect("token");
        assert_ne!(short.token, info.token);
        assert!(admits(&ctl, &short.token) && admits(&ctl, &info.token));
        assert!(!admits_at(
            &ctl,
            &short.token,
            tuchka_store::now_unix() + 61
        ));
        for ttl in [0, 31 * 24 * 3600] {
            let e = ctl
                .create_join_token(&JoinTokenCreate {
                    ttl_s: Some(ttl),
                    ..Default::default()
                })
                .expect_err("bad ttl");
            assert_eq!(e.code(), "InvalidTtl", "{e}");
        }
        // join.txt still has the first one.
        assert_eq!(ctl.join_info(), info);

        // Rotation: every other token stops working, join.txt has the new one.
        let new = ctl
            .create_join_token(&JoinTokenCreate {
                rotate: true,
                ..Default::default()
            })
            .expect("rotate");
        assert_ne!(new.token, info.token);
        assert!(admits(&ctl, &new.token));
        assert!(!admits(&ctl, &info.token) && !admits(&ctl, &short.token));
        assert!(std::fs::read_to_string(&file)
            .expect("join.txt")
            .contains(&new.token));
        assert_eq!(ctl.join_info().token, new.token);
        drop(ctl);

        // An expired join.txt token is replaced at start.
        let ctl = open(tmp.path(), Some(endpoint.clone()));
        assert_eq!(ctl.join_info().token, new.token);
        ctl.db()
            .conn()
            .execute("UPDATE join_tokens SET expires_unix = 1", [])
            .expect("expire");
        drop(ctl);
        let ctl = open(tmp.path(), Some(endpoint));
        let fresh = ctl.join_info();
        assert_ne!(fresh.token, new.token);
        assert!(admits(&ctl, &fresh.token) && !admits(&ctl, &new.token));
        assert!(std::fs::read_to_string(&file)
            .expect("join.txt")
            .contains(&fresh.token));
    }

    #[test]
    fn without_listen_there_is_a_token_but_no_command() {
        let tmp = tempfile::tempdir().expect("tmp");
        let info = open(tmp.path(), None).join_info();
        assert_eq!(info.token.len(), 64);
        assert_eq!((info.url, info.command), (None, None));
        assert!(!tmp.path().join(JOIN_COMMAND_FILE).exists());
    }
}
