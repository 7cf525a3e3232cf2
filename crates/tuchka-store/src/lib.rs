//! The state database of the controller: one SQLite file in WAL mode.
//!
//! Tables hold desired state (groups, VMs with their wanted power state, networks, images) next
//! to what hosts last observed (VM state, network readiness, host facts), plus operations. Every
//! change a user asks for is written in one transaction ([`Store::atomic`]), so a crash leaves
//! either all of it or none. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`; SQL stays portable (no SQLite-only types) so PostgreSQL can follow.

mod rows;

pub use rows::*;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};
use thiserror::Error;

/// A database failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite refused or failed.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A JSON column did not decode.
    #[error("state database: bad JSON in column {column}")]
    Json {
        /// Column name.
        column: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a newer tuchka.
    #[error("state database schema version {found} is newer than this tuchka knows ({known}); upgrade tuchka")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Latest migration known.
        known: i64,
    },
    /// The database file's mode could not be made private.
    #[error("state database {}: cannot make it private (mode 0600)", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Read connections kept open by [`Readers`] (more readers than cores buy nothing).
const IDLE_READERS: usize = 4;

/// Read-only connections to the store's file, beside the one [`Store`] writes with: in WAL
/// mode a reader sees the last commit and neither waits for the writer nor holds it up, so
/// views (lists, desired states) run in parallel with writes and with each other.
pub struct Readers {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
}

impl Readers {
    /// Readers of the database at `path` (opened by [`Store::open`] first).
    pub fn new(path: &Path) -> Readers {
        Readers {
            path: path.to_path_buf(),
            idle: std::sync::Mutex::new(vec![]),
        }
    }

    /// Run `f` in one read transaction: every query in it sees the same commit.
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let out = {
            let tx = conn.unchecked_transaction().map_err(StoreError::from)?;
            f(&tx)
        };
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Prepared statements kept per connection (the store has fewer distinct queries).
const STATEMENT_CACHE: usize = 512;

const MIGRATIONS: &[&str] = &[
    // 1: the single-host cloud
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE hosts (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, credential_sha256 TEXT NOT NULL,
  draining INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0,
  facts TEXT NOT NULL, cached_images TEXT NOT NULL DEFAULT '[]',
  last_seen TEXT, last_seen_unix INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE images (
  name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, file_sha256 TEXT NOT NULL, source_format TEXT NOT NULL,
  virtual_size INTEGER NOT NULL, stored_size INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE networks (
  name TEXT PRIMARY KEY, cidr TEXT NOT NULL, vni INTEGER NOT NULL UNIQUE, gateway_host TEXT,
  state TEXT NOT NULL, error TEXT, deleting INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE host_networks (
  host_id TEXT NOT NULL, network TEXT NOT NULL, ready INTEGER NOT NULL, error TEXT,
  PRIMARY KEY (host_id, network));
CREATE TABLE groups (
  name TEXT PRIMARY KEY, image TEXT NOT NULL, image_sha256 TEXT NOT NULL, count INTEGER NOT NULL,
  cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, disk_mib INTEGER NOT NULL, networks TEXT NOT NULL,
  user_data TEXT, ssh_keys TEXT NOT NULL, placement TEXT NOT NULL, anti_affinity INTEGER NOT NULL DEFAULT 0,
  deleting INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE vms (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, group_name TEXT NOT NULL REFERENCES groups(name),
  idx INTEGER NOT NULL, host_id TEXT NOT NULL REFERENCES hosts(id), placement_reason TEXT NOT NULL,
  desired TEXT NOT NULL, observed TEXT NOT NULL, error TEXT,
  reboot_seq INTEGER NOT NULL DEFAULT 0, reboot_done INTEGER NOT NULL DEFAULT 0,
  force_stop INTEGER NOT NULL DEFAULT 0, stop_timeout_s INTEGER NOT NULL DEFAULT 60,
  deleting INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE nics (
  vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE, idx INTEGER NOT NULL,
  network TEXT NOT NULL REFERENCES networks(name), mac TEXT NOT NULL UNIQUE, ip TEXT NOT NULL,
  PRIMARY KEY (vm_id, idx), UNIQUE (network, ip));
CREATE TABLE operations (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
  done INTEGER NOT NULL, total INTEGER NOT NULL, message TEXT NOT NULL, error TEXT,
  params TEXT NOT NULL, created_at TEXT NOT NULL, finished_at TEXT);
CREATE INDEX vms_host ON vms(host_id);
CREATE INDEX vms_group ON vms(group_name);
CREATE INDEX operations_state ON operations(state);
"#,
    // 2: networking: NAT, explicit gateways, access rules, port forwards
    r#"
ALTER TABLE networks ADD COLUMN nat INTEGER NOT NULL DEFAULT 0;
ALTER TABLE networks ADD COLUMN gateway TEXT;
CREATE TABLE rules (
  id TEXT PRIMARY KEY, network TEXT NOT NULL REFERENCES networks(name), direction TEXT NOT NULL,
  action TEXT NOT NULL, spec TEXT NOT NULL, from_cidr TEXT, from_group TEXT, from_network TEXT,
  to_group TEXT, to_cidr TEXT, created_at TEXT NOT NULL);
CREATE TABLE forwards (
  id TEXT PRIMARY KEY, network TEXT NOT NULL REFERENCES networks(name), proto TEXT NOT NULL,
  host_port INTEGER NOT NULL, vm_id TEXT NOT NULL REFERENCES vms(id), vm_port INTEGER NOT NULL,
  created_at TEXT NOT NULL);
CREATE INDEX rules_network ON rules(network);
CREATE INDEX forwards_network ON forwards(network);
"#,
    // 3: migrations, explicit removal, cause chains, multi-phase operations, usage
    r#"
ALTER TABLE vms ADD COLUMN error_chain TEXT NOT NULL DEFAULT '[]';
ALTER TABLE vms ADD COLUMN cpu_usage REAL NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN orphans TEXT NOT NULL DEFAULT '[]';
ALTER TABLE operations ADD COLUMN phases TEXT NOT NULL DEFAULT '[]';
ALTER TABLE operations ADD COLUMN parent TEXT;
ALTER TABLE operations ADD COLUMN children TEXT NOT NULL DEFAULT '[]';
CREATE INDEX operations_parent ON operations(parent);
CREATE TABLE migrations (
  id TEXT PRIMARY KEY, vm_id TEXT NOT NULL, vm_name TEXT NOT NULL,
  source_host TEXT NOT NULL, target_host TEXT NOT NULL, mode TEXT NOT NULL, phase TEXT NOT NULL,
  reason TEXT NOT NULL, copied_bytes INTEGER NOT NULL DEFAULT 0, remaining_bytes INTEGER NOT NULL DEFAULT 0,
  mib_per_s REAL NOT NULL DEFAULT 0, total_ms INTEGER, downtime_ms INTEGER, bytes INTEGER, error TEXT,
  started_at TEXT NOT NULL, started_unix_ms INTEGER NOT NULL, phase_since_unix_ms INTEGER NOT NULL,
  finished_at TEXT, source_obs TEXT NOT NULL DEFAULT '{}', target_obs TEXT NOT NULL DEFAULT '{}',
  target_cleanup INTEGER NOT NULL DEFAULT 0);
CREATE INDEX migrations_vm ON migrations(vm_id);
CREATE UNIQUE INDEX migrations_one_active ON migrations(vm_id) WHERE phase NOT IN ('done', 'failed');
CREATE TABLE vm_removals (
  vm_id TEXT NOT NULL, host_id TEXT NOT NULL, name TEXT NOT NULL, domain TEXT NOT NULL,
  reason TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (vm_id, host_id));
"#,
    // 4: changing images, volumes, disk space
    r#"
ALTER TABLE vms ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
ALTER TABLE images ADD COLUMN made_from TEXT NOT NULL DEFAULT 'upload';
ALTER TABLE groups ADD COLUMN volume_size_mib INTEGER;
ALTER TABLE groups ADD COLUMN keep_volumes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN max_cpus INTEGER NOT NULL DEFAULT 4;
CREATE TABLE volumes (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, host_id TEXT NOT NULL REFERENCES hosts(id),
  size_mib INTEGER NOT NULL, vm_id TEXT, with_vm INTEGER NOT NULL DEFAULT 0,
  deleting INTEGER NOT NULL DEFAULT 0, present INTEGER NOT NULL DEFAULT 0,
  observed_size_mib INTEGER NOT NULL DEFAULT 0, allocated_mib INTEGER NOT NULL DEFAULT 0,
  attached_to TEXT, error TEXT, created_at TEXT NOT NULL);
CREATE INDEX volumes_host ON volumes(host_id);
CREATE INDEX volumes_vm ON volumes(vm_id);
CREATE TABLE captures (
  id TEXT PRIMARY KEY, image TEXT NOT NULL, vm_id TEXT NOT NULL, vm_name TEXT NOT NULL,
  host_id TEXT NOT NULL, made_from TEXT NOT NULL, status TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0,
  paused_ms INTEGER NOT NULL DEFAULT 0, error TEXT, error_chain TEXT NOT NULL DEFAULT '[]',
  created_at TEXT NOT NULL);
CREATE TABLE image_cache (
  host_id TEXT NOT NULL, sha256 TEXT NOT NULL, last_used_unix INTEGER NOT NULL,
  PRIMARY KEY (host_id, sha256));
"#,
    // 5: host identity: expiring and single-use join tokens, removed hosts (kept as tombstones
    // so that their VMs, now lost, still name them and their identity is refused)
    r#"
ALTER TABLE hosts ADD COLUMN removed_at TEXT;
ALTER TABLE hosts ADD COLUMN removed_name TEXT;
CREATE TABLE join_tokens (
  id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
  expires_unix INTEGER NOT NULL, single_use INTEGER NOT NULL DEFAULT 0, host_id TEXT,
  used_unix INTEGER, used_by TEXT);
DELETE FROM meta WHERE key = 'join_token_sha256';
"#,
    // 6: a network's gateway moves to another host when its host goes down
    r#"
ALTER TABLE networks ADD COLUMN gateway_moved_from TEXT;
ALTER TABLE networks ADD COLUMN gateway_moved_at TEXT;
"#,
];

/// The open database.
pub struct Store {
    conn: Connection,
    on_commit: Option<Box<dyn Fn() + Send>>,
}

impl Store {
    /// Open (creating if needed) the database at `path` and bring its schema up to date.
    ///
    /// The database holds secrets (hashed credentials, user-data, ssh keys): it is made mode
    /// 0600 before SQLite first opens it, and an existing one (with its `-wal` and `-shm`,
    /// which SQLite creates with the database's mode) is narrowed to 0600.
    pub fn open(path: &Path) -> Result<Store> {
        make_private(path)?;
        let conn = Connection::open(path)?;
        let store = Self::init(conn)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                make_private(&side)?;
            }
        }
        Ok(store)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every query of the store is one of a few hundred fixed texts: each is parsed once.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Store {
            conn,
            on_commit: None,
        })
    }

    /// The connection, for reads.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Call `f` after every transaction [`Store::atomic`] commits (the controller wakes long
    /// polls with it).
    pub fn set_on_commit(&mut self, f: impl Fn() + Send + 'static) {
        self.on_commit = Some(Box::new(f));
    }

    /// Run `f` in one IMMEDIATE transaction: all its writes land, or none.
    pub fn atomic<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.atomic_announced(|c| f(c).map(|out| (out, true)))
    }

    /// [`Store::atomic`] for a transaction that often changes nothing anyone waits for (a
    /// host's heartbeat report): `f` answers `(value, announce)`, and the commit hook runs only
    /// when `announce` is true.
    pub fn atomic_announced<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Connection) -> std::result::Result<(T, bool), E>,
    ) -> std::result::Result<T, E> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let (out, announce) = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        if let (true, Some(notify)) = (announce, &self.on_commit) {
            notify();
        }
        Ok(out)
    }

    /// The cloud id, created on first use.
    pub fn cloud_id(&mut self) -> Result<String> {
        self.atomic(|c| {
            if let Some(v) = meta_get(c, "cloud_id")? {
                return Ok(v);
            }
            let id = uuid::Uuid::new_v4().to_string();
            meta_set(c, "cloud_id", &id)?;
            Ok(id)
        })
    }
}

/// Read a meta value.
pub fn meta_get(c: &Connection, key: &str) -> Result<Option<String>> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?,
    )
}

/// Write a meta value.
pub fn meta_set(c: &Connection, key: &str, value: &str) -> Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// Now as RFC 3339 UTC with seconds.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Now as Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Now as Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Create `path` empty with mode 0600 if it does not exist, else set its mode to 0600.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source: std::io::Error| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)
}
