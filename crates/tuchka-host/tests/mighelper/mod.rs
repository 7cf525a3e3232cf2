//! A helper process that plays the migration part of an agent inside a simulated host.
//!
//! The unix sockets of a migration must live in the host's own mount namespace, and the
//! channel must be reached over the fabric from the host's own network namespace, so both
//! ends run there: the test (or bench) binary runs itself inside a host (`MultiHost::command`)
//! with `TUCHKA_MIGRATION_HELPER=<file>` naming a JSON [`Role`], and prints `HELPER …` lines:
//!
//! - `serve`: a [`ChannelServer`] with a [`MigrationAdmission`] on the host's fabric address,
//!   as the destination agent runs it. Prints `HELPER READY <addr>`; then reads commands on
//!   stdin — `EXPECT <json Expect>` (answers `HELPER EXPECTED <id>`), `FORGET <id>`
//!   (`HELPER FORGOT <id>`), `STATS` (`HELPER STATS <json>`) — until end of input.
//! - `migrate`: a [`Tunnel`] to the target and [`migrate_through`] of a domain of the host's
//!   libvirtd, as the source agent runs it; `HELPER PROGRESS <bytes>` lines, then
//!   `HELPER RESULT <json MigrateResult>`. Optionally cuts the tunnel mid-copy.
//! - `send`: a file through the channel (honestly with `send_file`, or short or with a wrong
//!   digest by hand), or a stream request that should be refused: `HELPER RESULT <json>`.

#![allow(dead_code)]

pub mod rig;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tuchka_host::channel::{
    self, ChannelRequest, ChannelServer, Incoming, MigrationAdmission, MigrationPaths, Peer,
    Tunnel, TunnelConfig, LIBVIRT_SOCKET,
};
use tuchka_host::{migrate_through, retarget_domain_xml, Hypervisor, Libvirt, LiveMigration};

/// Environment variable naming the helper's JSON role file.
pub const ENV: &str = "TUCHKA_MIGRATION_HELPER";
/// Marker of the helper's output lines.
const MARK: &str = "HELPER ";

/// A host's channel identity, PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub host_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// A new identity for `host_id` signed by `ca`.
    pub fn issue(ca: &tuchka_pki::CaPem, host_id: &str) -> Identity {
        let key = tuchka_pki::create_host_key(host_id).expect("host key");
        let cert = tuchka_pki::sign_host_csr(
            &ca.cert_pem,
            &ca.key_pem,
            host_id,
            &key.csr_pem,
            std::time::SystemTime::now(),
        )
        .expect("host certificate");
        Identity {
            host_id: host_id.to_string(),
            ca_pem: ca.cert_pem.clone(),
            cert_pem: cert.cert_pem,
            key_pem: key.key_pem,
        }
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        channel::client_config(&self.ca_pem, &self.cert_pem, &self.key_pem).expect("client TLS")
    }
}

/// Where to reach a host's channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub host_id: String,
    pub addr: SocketAddr,
}

impl Target {
    fn peer(&self) -> Peer {
        Peer {
            host_id: self.host_id.clone(),
            addr: self.addr,
        }
    }
}

/// A migration the serving helper should expect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expect {
    pub migration_id: String,
    pub source_host_id: String,
    pub vm_id: String,
    pub live: bool,
    pub disk_file: Option<PathBuf>,
}

/// How the `send` role sends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SendMode {
    /// `send_file`.
    Honest,
    /// Announce the file's size, send half of it, close.
    Short,
    /// Announce a wrong sha256, send the whole file.
    Corrupt,
    /// Ask for the memory stream of the migration (no file).
    MemoryStream,
}

/// What a helper process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    Serve {
        identity: Identity,
        listen: SocketAddr,
        run_dir: PathBuf,
        cloud_id: String,
    },
    Migrate {
        identity: Identity,
        target: Target,
        run_dir: PathBuf,
        cloud_id: String,
        migration_id: String,
        domain: String,
        from_pool: PathBuf,
        to_pool: PathBuf,
        bandwidth_mib_s: Option<u64>,
        max_downtime_ms: Option<u64>,
        /// Cut the tunnel once libvirt reports this many bytes processed.
        cut_at_bytes: Option<u64>,
    },
    Send {
        /// `None`: present no client certificate.
        identity: Option<Identity>,
        /// The CA the client trusts (the cloud's).
        ca_pem: String,
        target: Target,
        migration_id: String,
        vm_id: String,
        path: PathBuf,
        mode: SendMode,
    },
}

/// What the `migrate` role reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateResult {
    pub ok: bool,
    pub error: Option<String>,
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub job_ms: Option<u64>,
    pub bytes: u64,
    pub mib_per_s: f64,
    pub progress_reports: u32,
    pub cut: bool,
    /// Bytes the tunnel carried to the target, per stream.
    pub libvirt_bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub problems: Vec<String>,
    /// Whether the tunnel's directory was gone after the tunnel was dropped.
    pub dir_removed: bool,
    /// The downtime limit libvirt reported while the job ran (`virsh migrate-getmaxdowntime`).
    pub downtime_limit_ms: Option<u64>,
}

/// What the `send` role reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SendResult {
    pub ok: bool,
    pub error: Option<String>,
    pub sha256: Option<String>,
    pub bytes: u64,
}

/// What `STATS` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServeStats {
    pub accepted: u64,
    pub handshake_failed: u64,
    pub refused: u64,
    pub admitted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub files_stored: u64,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A newline first: libtest may have printed "test … " without one.
    let _ = writeln!(out, "\n{MARK}{line}");
    let _ = out.flush();
}

/// Run the role named by [`ENV`], if set. Returns whether it ran.
pub fn run_if_asked() -> bool {
    let Some(path) = std::env::var_os(ENV) else {
        return false;
    };
    let text = std::fs::read_to_string(&path).expect("read the helper role");
    let role: Role = serde_json::from_str(&text).expect("parse the helper role");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match role {
        Role::Serve {
            identity,
            listen,
            run_dir,
            cloud_id,
        } => serve(&rt, identity, listen, &run_dir, &cloud_id),
        Role::Migrate { .. } => migrate(&rt, role),
        Role::Send { .. } => send(&rt, role),
    }
    true
}

fn serve(
    rt: &tokio::runtime::Runtime,
    identity: Identity,
    listen: SocketAddr,
    run_dir: &Path,
    cloud_id: &str,
) {
    let tls = channel::server_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
        .expect("server TLS");
    let admission = MigrationAdmission::new(run_dir, cloud_id, Path::new(LIBVIRT_SOCKET));
    let server = rt
        .block_on(ChannelServer::bind(
            listen,
            tls,
            Arc::new(admission.clone()),
        ))
        .expect("bind the channel");
    say(&format!("READY {}", server.local_addr()));
    let mut guards = std::collections::HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "EXPECT" => {
                let e: Expect = serde_json::from_str(arg).expect("EXPECT json");
                let id = e.migration_id.clone();
                match admission.expect(Incoming {
                    migration_id: e.migration_id,
                    source_host_id: e.source_host_id,
                    files: e
                        .disk_file
                        .map(|f| vec![(e.vm_id.clone(), f)])
                        .unwrap_or_default(),
                    vm_id: e.vm_id,
                    live: e.live,
                }) {
                    Ok(g) => {
                        guards.insert(id.clone(), g);
                        say(&format!("EXPECTED {id}"));
                    }
                    Err(err) => say(&format!("EXPECT-FAILED {id} {}", err.chain())),
                }
            }
            "FORGET" => {
                guards.remove(arg);
                say(&format!("FORGOT {arg}"));
            }
            "STATS" => {
                use std::sync::atomic::Ordering::Relaxed;
                let s = server.stats();
                let stats = ServeStats {
                    accepted: s.accepted.load(Relaxed),
                    handshake_failed: s.handshake_failed.load(Relaxed),
                    refused: s.refused.load(Relaxed),
                    admitted: s.admitted.load(Relaxed),
                    bytes_in: s.bytes_in.load(Relaxed),
                    bytes_out: s.bytes_out.load(Relaxed),
                    files_stored: s.files_stored.load(Relaxed),
                };
                say(&format!(
                    "STATS {}",
                    serde_json::to_string(&stats).expect("json")
                ));
            }
            _ => say(&format!("UNKNOWN {cmd}")),
        }
    }
    drop(guards);
    server.shutdown();
}

fn migrate(rt: &tokio::runtime::Runtime, role: Role) {
    let Role::Migrate {
        identity,
        target,
        run_dir,
        cloud_id,
        migration_id,
        domain,
        from_pool,
        to_pool,
        bandwidth_mib_s,
        max_downtime_ms,
        cut_at_bytes,
    } = role
    else {
        return;
    };
    let mut result = MigrateResult::default();
    let paths = MigrationPaths::new(&run_dir, &cloud_id, &migration_id).expect("paths");
    let tunnel = rt
        .block_on(Tunnel::open(
            TunnelConfig {
                paths: paths.clone(),
                migration_id: migration_id.clone(),
                target: target.peer(),
                qemu_gid: channel::qemu_gid(),
            },
            identity.client(),
        ))
        .expect("open the tunnel");
    let hv = Libvirt::connect("qemu:///system", &cloud_id).expect("libvirt of this host");
    let xml = hv.migratable_xml(&domain).expect("migratable xml");
    let dest_xml = retarget_domain_xml(&xml, &from_pool, &to_pool).expect("retarget");
    let mut m = LiveMigration::through(&paths, &domain, dest_xml);
    m.bandwidth_mib_s = bandwidth_mib_s;
    m.max_downtime = max_downtime_ms.map(Duration::from_millis);
    m.poll_interval = Duration::from_millis(250);
    let handle = tunnel.handle();
    let mut reports = 0u32;
    let mut limit = None;
    let outcome = migrate_through(&hv, &tunnel, &m, &mut |p| {
        reports += 1;
        say(&format!("PROGRESS {}", p.data_processed));
        if limit.is_none() {
            limit = tuchka_host::cmd::run(
                "virsh",
                &["-c", "qemu:///system", "migrate-getmaxdowntime", &domain],
                None,
            )
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        }
        if cut_at_bytes.is_some_and(|at| p.data_processed >= at) {
            handle.cut("the test cut the channel mid-copy");
        }
    });
    result.progress_reports = reports;
    result.downtime_limit_ms = limit;
    result.cut = handle.is_cut();
    let stats = tunnel.stats().clone();
    match outcome {
        Ok(o) => {
            result.ok = true;
            result.total_ms = o.total.as_millis() as u64;
            result.downtime_ms = o.downtime.map(|d| d.as_millis() as u64);
            result.job_ms = o.job_time.map(|d| d.as_millis() as u64);
            result.bytes = o.bytes;
            result.mib_per_s = o.mib_per_s;
        }
        Err(e) => result.error = Some(e.chain()),
    }
    result.libvirt_bytes = stats.libvirt.to_target();
    result.memory_bytes = stats.memory.to_target();
    result.disk_bytes = stats.disk.to_target();
    result.problems = stats.problems();
    drop(tunnel);
    result.dir_removed = !paths.dir.exists();
    say(&format!(
        "RESULT {}",
        serde_json::to_string(&result).expect("json")
    ));
}

fn send(rt: &tokio::runtime::Runtime, role: Role) {
    let Role::Send {
        identity,
        ca_pem,
        target,
        migration_id,
        vm_id,
        path,
        mode,
    } = role
    else {
        return;
    };
    let tls = match &identity {
        Some(id) => channel::client_config(&ca_pem, &id.cert_pem, &id.key_pem).expect("client"),
        None => channel::anonymous_client_config(&ca_pem).expect("anonymous client"),
    };
    let peer = target.peer();
    let result = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match mode {
            SendMode::Honest => {
                match channel::send_file(&tls, &peer, &migration_id, &vm_id, &path).await {
                    Ok(sent) => SendResult {
                        ok: true,
                        error: None,
                        sha256: Some(sent.sha256),
                        bytes: sent.bytes,
                    },
                    Err(e) => SendResult {
                        error: Some(e.chain()),
                        ..Default::default()
                    },
                }
            }
            SendMode::Short | SendMode::Corrupt => {
                let data = std::fs::read(&path).expect("read file");
                let real = tuchka_pki::fingerprint(&data);
                let sha256 = if mode == SendMode::Corrupt {
                    "0".repeat(64)
                } else {
                    real
                };
                let req = ChannelRequest::DiskFile {
                    migration: migration_id.clone(),
                    disk: vm_id.clone(),
                    size: data.len() as u64,
                    sha256,
                };
                let mut s = match channel::connect(&tls, &peer, &req).await {
                    Ok(s) => s,
                    Err(e) => {
                        return SendResult {
                            error: Some(e.chain()),
                            ..Default::default()
                        }
                    }
                };
                let n = if mode == SendMode::Short {
                    data.len() / 2
                } else {
                    data.len()
                };
                let _ = s.write_all(&data[..n]).await;
                let _ = s.flush().await;
                if mode == SendMode::Short {
                    // Close our side: the receiver sees the end of the stream early.
                    let _ = s.shutdown().await;
                }
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer).await;
                SendResult {
                    ok: answer.starts_with("DONE"),
                    error: Some(answer.trim().to_string()),
                    sha256: None,
                    bytes: n as u64,
                }
            }
            SendMode::MemoryStream => {
                let req = ChannelRequest::Memory {
                    migration: migration_id.clone(),
                };
                match channel::connect(&tls, &peer, &req).await {
                    Ok(_) => SendResult {
                        ok: true,
                        ..Default::default()
                    },
                    Err(e) => SendResult {
                        error: Some(e.chain()),
                        ..Default::default()
                    },
                }
            }
        }
    });
    say(&format!(
        "RESULT {}",
        serde_json::to_string(&result).expect("json")
    ));
}

// ---- the orchestrating side ---------------------------------------------------------------

/// A running helper: its stdin (commands) and its `HELPER` lines.
pub struct Helper {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub name: String,
}

impl Helper {
    /// Start the current test/bench executable as a helper in host `host`, with `role` written
    /// to `role_file`. `args` are the executable's own arguments that select the helper (for a
    /// libtest binary: the helper test's name).
    pub fn spawn(
        mh: &tuchka_testkit::MultiHost,
        host: &str,
        role: &Role,
        role_file: &Path,
        args: &[&str],
    ) -> Helper {
        std::fs::write(role_file, serde_json::to_vec(role).expect("json")).expect("role file");
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = mh.command(host, &exe).expect("command in host");
        cmd.args(args)
            .env(ENV, role_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = mh.spawn_command(&mut cmd).expect("spawn helper");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let name = format!("{host}:{}", role_name(role));
        let tag = name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(MARK) {
                    let _ = tx.send(line[i + MARK.len()..].to_string());
                } else if std::env::var_os("TUCHKA_HELPER_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
            }
        });
        Helper {
            child,
            stdin,
            lines,
            name,
        }
    }

    /// The rest of the next line starting with `prefix` (other lines are skipped and printed),
    /// within `timeout`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim_start().to_string();
                    }
                    if !line.starts_with("PROGRESS") {
                        eprintln!("[{}] {line}", self.name);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("helper {} said no {prefix:?} within {timeout:?}", self.name)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "helper {} ended ({status:?}) before saying {prefix:?}",
                        self.name
                    )
                }
            }
        }
    }

    /// Send a command line (serving helper).
    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("helper stdin");
        writeln!(stdin, "{line}").expect("write to helper");
        stdin.flush().expect("flush helper stdin");
    }

    /// Tell a serving helper to expect `e`.
    pub fn expect(&mut self, e: &Expect) {
        self.command(&format!(
            "EXPECT {}",
            serde_json::to_string(e).expect("json")
        ));
        let got = self.wait_for("EXPECTED", Duration::from_secs(10));
        assert_eq!(got, e.migration_id);
    }

    /// Stop expecting migration `id`.
    pub fn forget(&mut self, id: &str) {
        self.command(&format!("FORGET {id}"));
        self.wait_for("FORGOT", Duration::from_secs(10));
    }

    /// The serving helper's counters.
    pub fn stats(&mut self) -> ServeStats {
        self.command("STATS");
        serde_json::from_str(&self.wait_for("STATS", Duration::from_secs(10))).expect("stats")
    }

    /// Wait for the helper to exit (after closing its stdin).
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn role_name(role: &Role) -> &'static str {
    match role {
        Role::Serve { .. } => "serve",
        Role::Migrate { .. } => "migrate",
        Role::Send { .. } => "send",
    }
}
