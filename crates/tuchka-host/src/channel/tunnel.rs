//! The source side of one live migration: three unix sockets whose connections are carried to
//! the target host through the channel.
//!
//! [`Tunnel::open`] prepares the migration directory ([`super::paths`]) and listens on
//! `libvirt.sock`, `memory.sock` and `disk.sock`. Each connection libvirtd or qemu makes there
//! gets its own channel connection: TCP, mutual TLS (the target must present the certificate
//! of the host id it was opened for), the header naming the stream and the migration, the
//! target's `OK`, then bytes both ways. A refusal or a failed connection closes the local
//! connection and is recorded ([`TunnelStats::problems`]), so the caller can say why libvirt
//! failed. [`Tunnel::cut`] (or dropping the tunnel) stops listening, closes every connection
//! and removes the directory: that is how a migration is aborted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::paths::{self, MigrationPaths, Side};
use super::proto::{Answer, ChannelRequest, StreamKind, MAX_ANSWER};
use super::{
    read_line, relay, tls_error, ChannelError, Counted, Peer, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT,
    HEADER_TIMEOUT,
};

/// Most problems a tunnel remembers.
const MAX_PROBLEMS: usize = 16;

/// What a tunnel needs.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The migration's sockets (same paths as on the target).
    pub paths: MigrationPaths,
    /// The migration id (sent in every header).
    pub migration_id: String,
    /// The target host.
    pub target: Peer,
    /// The group qemu runs with ([`super::qemu_gid`]); `None` leaves root's group.
    pub qemu_gid: Option<u32>,
}

/// Byte counters of one stream kind (live: they grow while the streams run).
#[derive(Debug, Default)]
pub struct StreamStats {
    connections: AtomicU64,
    to_target: Arc<AtomicU64>,
    from_target: Arc<AtomicU64>,
}

impl StreamStats {
    /// Connections carried (or tried).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Bytes from the local end to the target.
    pub fn to_target(&self) -> u64 {
        self.to_target.load(Ordering::Relaxed)
    }

    /// Bytes from the target to the local end.
    pub fn from_target(&self) -> u64 {
        self.from_target.load(Ordering::Relaxed)
    }
}

/// Counters and problems of a tunnel.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// The `libvirt.sock` connections.
    pub libvirt: StreamStats,
    /// The `memory.sock` connections.
    pub memory: StreamStats,
    /// The `disk.sock` connections.
    pub disk: StreamStats,
    problems: Mutex<Vec<String>>,
}

impl TunnelStats {
    /// The counters of `kind` (`None` for a file).
    pub fn of(&self, kind: StreamKind) -> Option<&StreamStats> {
        match kind {
            StreamKind::Libvirt => Some(&self.libvirt),
            StreamKind::Memory => Some(&self.memory),
            StreamKind::Disk => Some(&self.disk),
            StreamKind::DiskFile => None,
        }
    }

    /// Bytes carried to the target, all streams.
    pub fn bytes_to_target(&self) -> u64 {
        [&self.libvirt, &self.memory, &self.disk]
            .iter()
            .map(|s| s.to_target())
            .sum()
    }

    /// What went wrong so far (refusals by the target, failed connections, the cut), oldest
    /// first.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn problem(&self, what: String) {
        let mut p = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < MAX_PROBLEMS {
            p.push(what);
        }
    }
}

/// A cheap handle to cut a tunnel from elsewhere (another task or thread) and read its stats.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    stop: CancellationToken,
    stats: Arc<TunnelStats>,
}

impl TunnelHandle {
    /// Close every connection of the migration now and stop listening; `reason` is recorded
    /// first in [`TunnelStats::problems`]. libvirt then fails the migration job and resumes the
    /// domain on the source. Idempotent.
    pub fn cut(&self, reason: &str) {
        if !self.stop.is_cancelled() {
            self.stats.problem(format!("channel cut: {reason}"));
            tracing::warn!(%reason, "migration channel cut");
        }
        self.stop.cancel();
    }

    /// Whether it was cut.
    pub fn is_cut(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.stats
    }
}

/// The source side of one live migration (see the module docs).
#[derive(Debug)]
pub struct Tunnel {
    config: TunnelConfig,
    handle: TunnelHandle,
}

impl Tunnel {
    /// Prepare the migration directory and listen on its three sockets, forwarding to
    /// `config.target` with the client TLS configuration `tls` ([`super::client_config`]).
    /// Must be called within a tokio runtime; the tunnel's tasks run there.
    pub async fn open(
        config: TunnelConfig,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Tunnel, ChannelError> {
        if !super::proto::is_channel_id(&config.migration_id) {
            return Err(ChannelError::invalid(
                format!("migration {:?}", config.migration_id),
                "not a valid migration id",
            ));
        }
        paths::prepare_dir(&config.paths, Side::Source, config.qemu_gid)?;
        let stop = CancellationToken::new();
        let stats = Arc::new(TunnelStats::default());
        let handle = TunnelHandle {
            stop: stop.clone(),
            stats: stats.clone(),
        };
        let tunnel = Tunnel {
            config: config.clone(),
            handle,
        };
        // From here on, an error drops `tunnel`, which removes what was made.
        for kind in [StreamKind::Libvirt, StreamKind::Memory, StreamKind::Disk] {
            let Some(path) = config.paths.socket(kind) else {
                continue;
            };
            let listener = UnixListener::bind(path).map_err(|source| ChannelError::Io {
                action: "listen on",
                path: path.to_path_buf(),
                source,
            })?;
            paths::share_socket(path, config.qemu_gid)?;
            tokio::spawn(accept_loop(
                listener,
                kind,
                config.clone(),
                tls.clone(),
                stats.clone(),
                stop.clone(),
            ));
        }
        tracing::info!(
            migration = %config.migration_id,
            target = %config.target,
            dir = %config.paths.dir.display(),
            "migration tunnel open"
        );
        Ok(tunnel)
    }

    /// The migration's sockets.
    pub fn paths(&self) -> &MigrationPaths {
        &self.config.paths
    }

    /// The target host.
    pub fn target(&self) -> &Peer {
        &self.config.target
    }

    /// The migration id.
    pub fn migration_id(&self) -> &str {
        &self.config.migration_id
    }

    /// A handle to cut the tunnel or read its counters from elsewhere.
    pub fn handle(&self) -> TunnelHandle {
        self.handle.clone()
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.handle.stats
    }

    /// See [`TunnelHandle::cut`].
    pub fn cut(&self, reason: &str) {
        self.handle.cut(reason);
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.handle.stop.cancel();
        if let Err(e) = paths::remove_dir(&self.config.paths) {
            tracing::warn!(error = %e, "cannot clean up the migration tunnel");
        }
    }
}

async fn accept_loop(
    listener: UnixListener,
    kind: StreamKind,
    config: TunnelConfig,
    tls: Arc<rustls::ClientConfig>,
    stats: Arc<TunnelStats>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let local = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(%kind, error = %e, "migration tunnel: cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (config, tls, stats, stop) = (config.clone(), tls.clone(), stats.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = carry(local, kind, &config, &tls, &stats) => {}
            }
        });
    }
}

/// One local connection: open its channel connection, then relay.
async fn carry(
    local: UnixStream,
    kind: StreamKind,
    config: &TunnelConfig,
    tls: &Arc<rustls::ClientConfig>,
    stats: &TunnelStats,
) {
    let Some(req) = ChannelRequest::stream(kind, &config.migration_id) else {
        return;
    };
    let Some(counters) = stats.of(kind) else {
        return;
    };
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let mut remote = match connect(tls, &config.target, &req).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e.chain(), "migration tunnel: cannot carry a stream");
            stats.problem(e.chain());
            return;
        }
    };
    let mut local = Counted::new(
        local,
        counters.to_target.clone(),
        counters.from_target.clone(),
    );
    if let Err(e) = relay(&mut local, &mut remote).await {
        tracing::debug!(%kind, error = %e, "migration tunnel: stream broke");
    }
}

/// A stream through the channel, after the peer's `OK`.
pub type ChannelStream = BufReader<TlsStream<TcpStream>>;

/// Open a channel connection to `peer` for `req`: TCP, TLS naming the peer's host (its
/// certificate must name `h-<host-id>.tuchka`), the header, and the peer's `OK`. Bytes after
/// that belong to the stream. The [`Tunnel`] and [`super::send_file`] are built on it.
pub async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    peer: &Peer,
    req: &ChannelRequest,
) -> Result<ChannelStream, ChannelError> {
    req.validate()
        .map_err(|e| ChannelError::invalid(req.to_string(), e.to_string()))?;
    if !tuchka_pki::is_host_id(&peer.host_id) {
        return Err(ChannelError::invalid(
            format!("host {:?}", peer.host_id),
            "not a valid host id",
        ));
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer.addr))
        .await
        .map_err(|_| ChannelError::Timeout {
            peer: peer.clone(),
            what: "connect",
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|source| ChannelError::Connect {
            peer: peer.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(tuchka_pki::host_dns_name(&peer.host_id)).map_err(|_| {
        ChannelError::invalid(format!("host {:?}", peer.host_id), "not a valid host id")
    })?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| ChannelError::Timeout {
        peer: peer.clone(),
        what: "TLS handshake",
        after: HANDSHAKE_TIMEOUT,
    })?
    .map_err(|source| ChannelError::Handshake {
        peer: peer.clone(),
        source,
    })?;
    let mut stream = BufReader::new(tls);
    let lost = |what: &'static str, source: std::io::Error| {
        // TLS 1.3 reports a refused client certificate only after the handshake.
        if tls_error(&source).is_some() {
            ChannelError::Handshake {
                peer: peer.clone(),
                source,
            }
        } else {
            ChannelError::Lost {
                peer: peer.clone(),
                what: format!("{what} of {req}"),
                source,
            }
        }
    };
    stream
        .write_all(req.encode().as_bytes())
        .await
        .map_err(|e| lost("the header", e))?;
    stream.flush().await.map_err(|e| lost("the header", e))?;
    let answer = tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut stream, MAX_ANSWER))
        .await
        .map_err(|_| ChannelError::Timeout {
            peer: peer.clone(),
            what: "answer",
            after: HEADER_TIMEOUT,
        })?
        .map_err(|e| lost("the answer", e))?;
    match answer.as_deref().map(Answer::parse) {
        Some(Some(Answer::Ok)) => Ok(stream),
        Some(Some(Answer::Err(reason))) => Err(ChannelError::Refused {
            peer: peer.clone(),
            request: req.to_string(),
            reason,
        }),
        Some(_) => Err(ChannelError::Protocol {
            peer: peer.clone(),
            what: format!("answered {req} with something that is not the channel protocol"),
        }),
        None => Err(ChannelError::Protocol {
            peer: peer.clone(),
            what: format!("closed the connection instead of answering {req}"),
        }),
    }
}
