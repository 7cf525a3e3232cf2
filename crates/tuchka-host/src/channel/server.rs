//! The channel's listening side: one TCP port, mutual TLS, then one admitted stream per
//! connection.
//!
//! Per connection (each in its own task, at most [`MAX_PENDING`] before admission): TLS
//! handshake within [`HANDSHAKE_TIMEOUT`] with a client certificate verified against the CA;
//! the peer's host id from that certificate; one header line within [`HEADER_TIMEOUT`]; the
//! [`Admission`] decides; a refusal is answered `ERR <reason>` and the connection closed. An
//! admitted stream is connected to its unix socket ([`Route::Unix`]) and relayed both ways, or
//! received into a file ([`Route::ReceiveFile`], see [`super::file`]). [`ChannelServer::shutdown`]
//! (or dropping the server) stops accepting and cuts every connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::proto::{Answer, ChannelRequest, MAX_HEADER};
use super::{
    read_line, relay, ChannelError, Counted, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT,
};

/// Most connections between accept and admission at once.
pub const MAX_PENDING: usize = 64;

/// Where an admitted connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Relay the stream to this unix socket (the local libvirtd, or a socket qemu listens on).
    Unix(PathBuf),
    /// Store the file here: written to a temporary file next to it, sha256-verified, renamed
    /// into place (only for [`ChannelRequest::DiskFile`]).
    ReceiveFile(PathBuf),
}

/// The destination agent's decision about each channel connection.
pub trait Admission: Send + Sync {
    /// Where the request `req` of host `peer_host_id` (from its verified certificate) goes, or
    /// why it is refused (sent to the peer; name the migration, not local secrets).
    fn admit(&self, peer_host_id: &str, req: &ChannelRequest) -> Result<Route, String>;
}

/// Counters of a [`ChannelServer`].
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Connections whose TLS handshake failed (wrong CA, no certificate, timeout, not TLS).
    pub handshake_failed: AtomicU64,
    /// Connections refused after the handshake (bad header, admission said no).
    pub refused: AtomicU64,
    /// Streams admitted.
    pub admitted: AtomicU64,
    /// Bytes received from peers on admitted streams.
    pub bytes_in: AtomicU64,
    /// Bytes sent to peers on admitted streams.
    pub bytes_out: AtomicU64,
    /// Files stored.
    pub files_stored: AtomicU64,
}

impl ServerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The channel's listener. Runs on the tokio runtime it was bound on until shut down or dropped.
pub struct ChannelServer {
    local: SocketAddr,
    stats: Arc<ServerStats>,
    stop: CancellationToken,
}

impl std::fmt::Debug for ChannelServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelServer")
            .field("local", &self.local)
            .finish()
    }
}

impl ChannelServer {
    /// Listen on `addr` (the host's underlay address and channel port; port 0 picks one) with
    /// `tls` (see [`super::server_config`]), admitting through `admission`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        admission: Arc<dyn Admission>,
    ) -> Result<ChannelServer, ChannelError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ChannelError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ChannelError::Bind { addr, source })?;
        let stats = Arc::new(ServerStats::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            admission,
            stats.clone(),
            stop.clone(),
        ));
        tracing::info!(%local, "migration channel listening");
        Ok(ChannelServer { local, stats, stop })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Its counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stop accepting and cut every connection (also done on drop).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    admission: Arc<dyn Admission>,
    stats: Arc<ServerStats>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer_addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "channel: cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        ServerStats::bump(&stats.accepted);
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer_addr, "channel: too many connections waiting for admission; dropping one");
            ServerStats::bump(&stats.refused);
            continue;
        };
        let (acceptor, admission, stats, stop) = (
            acceptor.clone(),
            admission.clone(),
            stats.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(tcp, peer_addr, acceptor, admission, stats, permit) => {}
            }
        });
    }
}

/// One connection: handshake, header, admission, then the stream.
async fn serve(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    admission: Arc<dyn Admission>,
    stats: Arc<ServerStats>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ServerStats::bump(&stats.handshake_failed);
            tracing::info!(%peer_addr, error = %e, "channel: TLS handshake refused");
            return;
        }
        Err(_) => {
            ServerStats::bump(&stats.handshake_failed);
            tracing::info!(%peer_addr, "channel: TLS handshake timed out");
            return;
        }
    };
    let peer_host = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| tuchka_pki::peer_host_id(leaf));
    let mut stream = BufReader::new(tls);
    let Some(peer_host) = peer_host else {
        ServerStats::bump(&stats.refused);
        tracing::warn!(%peer_addr, "channel: certificate names no host");
        refuse(&mut stream, "your certificate names no tuchka host").await;
        return;
    };
    let header =
        match tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut stream, MAX_HEADER)).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                ServerStats::bump(&stats.refused);
                refuse(&mut stream, &format!("bad header: {e}")).await;
                return;
            }
            Err(_) => {
                ServerStats::bump(&stats.refused);
                refuse(&mut stream, "no header within the time limit").await;
                return;
            }
        };
    let req = match ChannelRequest::parse(&header) {
        Ok(r) => r,
        Err(e) => {
            ServerStats::bump(&stats.refused);
            tracing::warn!(%peer_addr, peer = %peer_host, error = %e, "channel: bad header");
            refuse(&mut stream, &format!("bad header: {e}")).await;
            return;
        }
    };
    let route = match admission.admit(&peer_host, &req) {
        Ok(r) => r,
        Err(reason) => {
            ServerStats::bump(&stats.refused);
            tracing::warn!(peer = %peer_host, request = %req, %reason, "channel: refused");
            refuse(&mut stream, &reason).await;
            return;
        }
    };
    drop(permit);
    match (route, &req) {
        (Route::Unix(path), ChannelRequest::Libvirt { .. })
        | (Route::Unix(path), ChannelRequest::Memory { .. })
        | (Route::Unix(path), ChannelRequest::Disk { .. }) => {
            relay_to_unix(stream, &path, &peer_host, &req, &stats).await;
        }
        (Route::ReceiveFile(path), ChannelRequest::DiskFile { size, sha256, .. }) => {
            ServerStats::bump(&stats.admitted);
            tracing::info!(peer = %peer_host, request = %req, path = %path.display(), "channel: receiving a file");
            match super::file::receive(&mut stream, &path, *size, sha256, &stats).await {
                Ok(()) => {
                    ServerStats::bump(&stats.files_stored);
                    tracing::info!(peer = %peer_host, path = %path.display(), "channel: file stored");
                }
                Err(reason) => {
                    tracing::warn!(peer = %peer_host, path = %path.display(), %reason, "channel: file refused");
                }
            }
        }
        (route, _) => {
            ServerStats::bump(&stats.refused);
            tracing::error!(?route, request = %req, "channel: the admission routed a request to the wrong kind of place");
            refuse(&mut stream, "this host cannot take that request").await;
        }
    }
}

async fn relay_to_unix(
    mut stream: BufReader<TlsStream<TcpStream>>,
    path: &std::path::Path,
    peer_host: &str,
    req: &ChannelRequest,
    stats: &Arc<ServerStats>,
) {
    let unix = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            ServerStats::bump(&stats.refused);
            tracing::warn!(peer = %peer_host, request = %req, path = %path.display(), error = %e, "channel: cannot reach the local socket");
            refuse(
                &mut stream,
                &format!("{req}: nothing listens on this host yet ({e})"),
            )
            .await;
            return;
        }
        Err(_) => {
            ServerStats::bump(&stats.refused);
            refuse(
                &mut stream,
                &format!("{req}: the local socket does not answer"),
            )
            .await;
            return;
        }
    };
    if stream
        .write_all(Answer::Ok.encode().as_bytes())
        .await
        .is_err()
        || stream.flush().await.is_err()
    {
        return;
    }
    ServerStats::bump(&stats.admitted);
    tracing::debug!(peer = %peer_host, request = %req, "channel: stream admitted");
    // Counted on the peer side: what it reads was sent by the peer.
    let mut peer = Counted::new(
        stream,
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (read, written) = (peer.read.clone(), peer.written.clone());
    let mut unix = unix;
    let result = relay(&mut peer, &mut unix).await;
    stats
        .bytes_in
        .fetch_add(read.load(Ordering::Relaxed), Ordering::Relaxed);
    stats
        .bytes_out
        .fetch_add(written.load(Ordering::Relaxed), Ordering::Relaxed);
    match result {
        Ok((to_local, to_peer)) => {
            tracing::debug!(peer = %peer_host, request = %req, to_local, to_peer, "channel: stream ended")
        }
        Err(e) => {
            tracing::debug!(peer = %peer_host, request = %req, error = %e, "channel: stream broke")
        }
    }
}

/// Answer `ERR reason` and close.
pub(crate) async fn refuse<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, reason: &str) {
    let _ = stream
        .write_all(Answer::Err(reason.to_string()).encode().as_bytes())
        .await;
    let _ = stream.shutdown().await;
}
