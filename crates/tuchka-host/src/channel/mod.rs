//! The host-to-host channel: how agents move VMs between hosts without opening libvirt to the
//! network (KubeVirt's migration proxy is the precedent).
//!
//! Each agent listens on **one TCP port** of its underlay address ([`ChannelServer`]) with
//! **mutual TLS**: both ends present a certificate issued by the cloud's CA at join
//! (`tuchka-pki`), so only hosts of this cloud get in, and each end knows which host the other
//! is ([`tuchka_pki::peer_host_id`]). A connection carries one stream; its first line names it
//! ([`proto`]): the source libvirtd's connection to the destination libvirtd, qemu's memory
//! stream, the NBD disk stream of a live migration, or a whole file (a stopped VM's overlay,
//! cold migration). An [`Admission`] callback of the destination agent decides where each goes
//! ([`Route`]) — [`MigrationAdmission`] admits only migrations the agent was told to expect,
//! only from their source host.
//!
//! On the source, a [`Tunnel`] turns one migration's three unix sockets ([`MigrationPaths`],
//! the same paths on both hosts) into channel connections. libvirt is told to migrate
//! peer-to-peer to `qemu+unix:///system?socket=<dir>/libvirt.sock` with the migration URI
//! `unix://<dir>/memory.sock` and the disks URI `unix://<dir>/disk.sock`; on the destination
//! the channel server connects those streams to the local libvirtd socket and to the sockets
//! qemu listens on. libvirtd keeps only its local socket: no `listen_tcp`, no libvirt PKI.
//! Dropping (or [`Tunnel::cut`]ting) the tunnel closes every connection of the migration, which
//! is how a migration is aborted: libvirt fails the job, resumes the VM on the source and
//! destroys the half-made domain on the destination.
//!
//! Everything here is async (tokio); the tunnel and the server run their tasks on the runtime
//! they were created on.

mod admission;
mod file;
#[cfg(test)]
mod local_tests;
pub mod paths;
pub mod proto;
mod server;
mod tls;
mod tunnel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, ReadBuf};

pub use admission::{Incoming, IncomingGuard, MigrationAdmission, LIBVIRT_SOCKET};
pub use file::{send_file, SentFile};
pub use paths::{qemu_gid, MigrationPaths, Side, DEFAULT_RUN_DIR};
pub use proto::{ChannelRequest, StreamKind};
pub use server::{Admission, ChannelServer, Route, ServerStats};
pub use tls::{anonymous_client_config, client_config, server_config, ALPN};
pub use tunnel::{
    connect, ChannelStream, StreamStats, Tunnel, TunnelConfig, TunnelHandle, TunnelStats,
};

/// Longest time for a TCP connect to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time for a TLS handshake (either side).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time between connecting and the header (server) or the answer (client).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while a file is received or its verdict awaited.
pub const FILE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Buffer size of the relays (each direction).
const RELAY_BUFFER: usize = 256 * 1024;

/// A host at the other end of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its host id (its certificate must name `h-<host-id>.tuchka`).
    pub host_id: String,
    /// Its channel address (underlay IP and channel port).
    pub addr: SocketAddr,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} ({})", self.host_id, self.addr)
    }
}

/// What can go wrong in the channel. Each names the peer, the socket path or the file.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A certificate or key is not valid PEM.
    #[error("channel TLS: the {what} is not valid PEM")]
    Pem {
        /// "CA certificate", "host certificate", "host key".
        what: &'static str,
        /// The parse error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("channel TLS: {what} refused")]
    Tls {
        /// What was being set up.
        what: &'static str,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("channel TLS: cannot verify client certificates against the CA")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The server could not listen.
    #[error("channel: cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An input was refused before anything happened.
    #[error("{object}: {message}")]
    Invalid {
        /// What was refused.
        object: String,
        /// Why.
        message: String,
    },
    /// A file system operation failed.
    #[error("channel: cannot {action} {}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection could not be made.
    #[error("channel to {peer}: cannot connect")]
    Connect {
        /// The peer.
        peer: Peer,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, no or wrong certificate, not a channel).
    #[error("channel to {peer}: TLS handshake failed")]
    Handshake {
        /// The peer.
        peer: Peer,
        /// The TLS error.
        #[source]
        source: std::io::Error,
    },
    /// A step took too long.
    #[error("channel to {peer}: {what} timed out after {} s", after.as_secs())]
    Timeout {
        /// The peer.
        peer: Peer,
        /// The step ("connect", "TLS handshake", "answer").
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The peer refused the request.
    #[error("channel to {peer}: {request} refused: {reason}")]
    Refused {
        /// The peer.
        peer: Peer,
        /// The request, in words.
        request: String,
        /// The peer's reason.
        reason: String,
    },
    /// The peer answered something that is not the protocol.
    #[error("channel to {peer}: {what}")]
    Protocol {
        /// The peer.
        peer: Peer,
        /// What was wrong.
        what: String,
    },
    /// The connection broke.
    #[error("channel to {peer}: connection lost during {what}")]
    Lost {
        /// The peer.
        peer: Peer,
        /// The step.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file to send changed while it was sent.
    #[error("file {}: changed while it was sent (expected sha256 {expected}, sent {sent}); stop the VM and retry", path.display())]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// The digest announced in the header.
        expected: String,
        /// The digest of the bytes sent.
        sent: String,
    },
}

impl ChannelError {
    pub(crate) fn invalid(object: impl Into<String>, message: impl Into<String>) -> Self {
        ChannelError::Invalid {
            object: object.into(),
            message: message.into(),
        }
    }

    /// The message and every cause, joined by ": ".
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }
}

/// Read one line of at most `max` bytes (newline included) from `r`. `Ok(None)` at a clean
/// end of stream before any byte; an error when the line is longer or the stream ends inside
/// it. Bytes after the newline stay in `r`.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stream ended inside a line",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            return Ok(Some(line));
        }
    }
}

/// A stream that counts what is read from it and written to it.
pub(crate) struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, read: Arc<AtomicU64>, written: Arc<AtomicU64>) -> Self {
        Counted {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copy both ways between `a` and `b` until both directions end (or one breaks).
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub(crate) fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_leave_the_rest() {
        let data: &[u8] = b"first\nsecond";
        let mut r = tokio::io::BufReader::with_capacity(4, data);
        assert_eq!(
            read_line(&mut r, 16).await.expect("line"),
            Some(b"first\n".to_vec())
        );
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut rest)
            .await
            .expect("rest");
        assert_eq!(rest, b"second");

        let mut r = tokio::io::BufReader::new(&b"0123456789\n"[..]);
        assert!(read_line(&mut r, 5).await.is_err(), "too long");
        let mut r = tokio::io::BufReader::new(&b"no newline"[..]);
        assert!(read_line(&mut r, 64).await.is_err(), "ends inside");
        let mut r = tokio::io::BufReader::new(&b""[..]);
        assert_eq!(read_line(&mut r, 64).await.expect("eof"), None);
    }
}
