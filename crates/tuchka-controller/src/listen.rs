//! The controller's listeners — the unix socket and the HTTPS port — and what bounds the
//! clients on them, so that a flood of idle or slow clients cannot starve the API or the local
//! agent.
//!
//! Every accepted connection is counted, in total and per client (its IP address, an IPv6
//! client by its /64; on the unix socket its user id), against [`ListenLimits`]. A connection
//! beyond a cap evicts the connection of that client (per-client cap) or of anyone (total cap)
//! that has been idle longest — waiting for a request, or in its TLS handshake — and is closed
//! at once when every counted connection is busy with a request. A request in service is
//! never cut, so long polls, the event stream, `console --follow` and uploads keep working.
//!
//! Each connection has a watchdog:
//! - a new connection must complete its TLS handshake (on the HTTPS port) and send a whole
//!   first request head within `header_timeout`; later requests get `header_timeout` from
//!   their first byte (slowloris);
//! - between requests a connection may stay silent for `idle_timeout`, then it is closed;
//! - while a request is served, a response the client does not read (writes blocked) for
//!   `idle_timeout` closes it, and so does a request body that sends nothing while its handler
//!   waits for it for `idle_timeout + header_timeout` (the image upload stops waiting itself
//!   after `idle_timeout`, with a message).
//!
//! HTTP/1.1 only (the ALPN of [`crate::tls`]); hyper serves each connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long a stopping server waits for its connections' requests to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// At most one warning per this interval when clients hit a cap.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What one listener allows its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenLimits {
    /// A new connection's TLS handshake and first request head, and any later request head
    /// from its first byte, must arrive within this.
    pub header_timeout: Duration,
    /// A connection silent between requests, or whose response is not read, is closed after
    /// this. Also the longest an upload's body may stall.
    pub idle_timeout: Duration,
    /// Most connections at once on the listener.
    pub max_connections: usize,
    /// Most connections at once from one client (IP address, IPv6 /64, or unix user).
    pub max_per_client: usize,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            max_per_client: 64,
        }
    }
}

/// Who a connection is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A TCP client's address (IPv4, or the /64 of an IPv6 address).
    Ip(IpAddr),
    /// A unix-socket client's user id.
    Uid(u32),
    /// A unix-socket client whose credentials could not be read.
    Unknown,
}

impl ClientKey {
    /// The key of a TCP peer: its IPv4 address (an IPv4-mapped IPv6 one as IPv4), or the /64
    /// prefix of an IPv6 address (one site gets many addresses).
    pub fn of_ip(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::Ip(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    ClientKey::Ip(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Ip(ip) => write!(f, "{ip}"),
            ClientKey::Uid(uid) => write!(f, "uid {uid}"),
            ClientKey::Unknown => f.write_str("unknown unix peer"),
        }
    }
}

/// Milliseconds since `opened`, never `NONE`.
const NONE: u64 = u64::MAX;

/// What the watchdog and the caps know of one connection.
#[derive(Debug)]
struct ConnState {
    opened: Instant,
    /// Requests in service: head read, response body not yet finished.
    active: AtomicUsize,
    /// Requests whose head was read so far.
    served: AtomicU64,
    /// When (ms after `opened`) it last became idle (no request in service).
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived while idle, or `NONE`.
    first_byte: AtomicU64,
    /// Since when a write has been blocked, or `NONE`.
    write_blocked: AtomicU64,
    /// Since when a handler has been waiting for request body bytes, or `NONE`.
    body_wait: AtomicU64,
    /// Set when the connection is to be closed now (evicted).
    evicted: AtomicBool,
    kill: Notify,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            opened: Instant::now(),
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NONE),
            write_blocked: AtomicU64::new(NONE),
            body_wait: AtomicU64::new(NONE),
            evicted: AtomicBool::new(false),
            kill: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    fn begin_request(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::AcqRel);
        self.first_byte.store(NONE, Ordering::Release);
        Active(self.clone())
    }

    /// Why the connection must close now, if it must.
    fn verdict(&self, limits: &ListenLimits) -> Option<&'static str> {
        let now = self.now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        let since = |t: u64| now.saturating_sub(t);
        if !self.idle() {
            let blocked = self.write_blocked.load(Ordering::Acquire);
            if blocked != NONE && since(blocked) > ms(limits.idle_timeout) {
                return Some("the client does not read its response");
            }
            // A handler that stops its own wait first (an upload, after the idle timeout)
            // answers with its message; this is the bound for every other body.
            let body = self.body_wait.load(Ordering::Acquire);
            let body_limit = ms(limits.idle_timeout + limits.header_timeout);
            return (body != NONE && since(body) > body_limit)
                .then_some("the request body stalled");
        }
        if self.served.load(Ordering::Acquire) == 0 {
            return (now > ms(limits.header_timeout))
                .then_some("no complete request head within the header timeout");
        }
        let first = self.first_byte.load(Ordering::Acquire);
        if first != NONE {
            return (since(first) > ms(limits.header_timeout))
                .then_some("request head too slow (header timeout)");
        }
        (since(self.idle_since.load(Ordering::Acquire)) > ms(limits.idle_timeout)).then_some("idle")
    }
}

/// One request in service; dropped when its response body ends (or is dropped).
struct Active(Arc<ConnState>);

impl Drop for Active {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now(), Ordering::Release);
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The counted connections of one listener.
#[derive(Debug)]
struct Limiter {
    limits: ListenLimits,
    inner: Mutex<LimiterInner>,
}

#[derive(Debug, Default)]
struct LimiterInner {
    next_id: u64,
    conns: HashMap<u64, (ClientKey, Arc<ConnState>)>,
    per_client: HashMap<ClientKey, usize>,
    last_warning: Option<Instant>,
}

impl LimiterInner {
    fn remove(&mut self, id: u64) -> Option<Arc<ConnState>> {
        let (key, state) = self.conns.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&key);
            }
        }
        Some(state)
    }

    /// Evict the connection idle longest (of `key`, or of anyone): true if one was.
    fn evict_idlest(&mut self, key: Option<ClientKey>) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, (k, s))| key.is_none_or(|key| *k == key) && s.idle())
            .max_by_key(|(_, (_, s))| s.now().saturating_sub(s.idle_since.load(Ordering::Acquire)))
            .map(|(id, _)| *id);
        let Some(id) = victim else { return false };
        if let Some(state) = self.remove(id) {
            state.evicted.store(true, Ordering::Release);
            state.kill.notify_one();
        }
        true
    }

    fn warn(&mut self, key: ClientKey, what: &str) {
        if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warning = Some(Instant::now());
            tracing::warn!(client = %key, "{what} (further ones are logged at debug level for a minute)");
        } else {
            tracing::debug!(client = %key, "{what}");
        }
    }
}

/// A counted connection: uncounted when dropped.
struct Admitted {
    limiter: Arc<Limiter>,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.limiter.inner.lock() {
            inner.remove(self.id);
        }
    }
}

impl Limiter {
    fn new(limits: ListenLimits) -> Arc<Limiter> {
        Arc::new(Limiter {
            limits,
            inner: Mutex::new(LimiterInner::default()),
        })
    }

    /// Count a new connection of `key`, evicting an idle one if a cap is reached; `None` when
    /// it must be refused.
    fn admit(self: &Arc<Self>, key: ClientKey) -> Option<Admitted> {
        let mut inner = self.inner.lock().ok()?;
        let max_per = self.limits.max_per_client.max(1);
        let max_all = self.limits.max_connections.max(1);
        if inner.per_client.get(&key).copied().unwrap_or(0) >= max_per {
            if !inner.evict_idlest(Some(key)) {
                inner.warn(key, "connection refused: the client has --max-connections-per-client connections, all busy");
                return None;
            }
            tracing::debug!(client = %key, "per-client connection cap reached: closed its connection idle longest");
        }
        if inner.conns.len() >= max_all {
            if !inner.evict_idlest(None) {
                inner.warn(
                    key,
                    "connection refused: --max-connections reached, every connection busy",
                );
                return None;
            }
            tracing::debug!(client = %key, "connection cap reached: closed the connection idle longest");
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let state = Arc::new(ConnState::new());
        inner.conns.insert(id, (key, state.clone()));
        *inner.per_client.entry(key).or_insert(0) += 1;
        Some(Admitted {
            limiter: self.clone(),
            id,
            state,
        })
    }

    fn count(&self) -> usize {
        self.inner.lock().map(|i| i.conns.len()).unwrap_or(0)
    }
}

/// The connection's stream, telling its [`ConnState`] when request bytes arrive and when
/// writes block.
struct Watched<I> {
    inner: I,
    state: Arc<ConnState>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let s = &self.state;
            if s.idle() && s.first_byte.load(Ordering::Acquire) == NONE {
                s.first_byte.store(s.now(), Ordering::Release);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    fn note<T>(&self, r: &Poll<T>) {
        let s = &self.state;
        match r {
            Poll::Pending => {
                if s.write_blocked.load(Ordering::Acquire) == NONE {
                    s.write_blocked.store(s.now(), Ordering::Release);
                }
            }
            Poll::Ready(_) => s.write_blocked.store(NONE, Ordering::Release),
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in service until it ends.
struct Tracked {
    inner: Body,
    _active: Active,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that tells its [`ConnState`] while the handler waits for bytes.
struct WatchedBody {
    inner: Incoming,
    state: Arc<ConnState>,
}

impl HttpBody for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let s = &self.state;
        match r {
            Poll::Pending => {
                if s.body_wait.load(Ordering::Acquire) == NONE {
                    s.body_wait.store(s.now(), Ordering::Release);
                }
            }
            Poll::Ready(_) => s.body_wait.store(NONE, Ordering::Release),
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.state.body_wait.store(NONE, Ordering::Release);
    }
}

/// Serve `app` on the unix socket until `shutdown` resolves; clients are counted by user id.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    limits: ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limiter = Limiter::new(limits);
    let listener = Arc::new(listener);
    serve_loop(limiter, shutdown, move || {
        let (listener, app) = (listener.clone(), app.clone());
        async move {
            let (stream, _) = listener.accept().await?;
            let key = match stream.peer_cred() {
                Ok(c) => ClientKey::Uid(c.uid()),
                Err(_) => ClientKey::Unknown,
            };
            let peer = key.to_string();
            let ready = async move { std::io::Result::Ok(stream) };
            std::io::Result::Ok((key, peer, ready, app))
        }
    })
    .await
}

/// Serve `app` over TLS with `tls` on the TCP listener until `shutdown` resolves; clients are
/// counted by address. Failed handshakes (plain HTTP, a client that refused the certificate,
/// port scans) are logged at debug level and closed.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    limits: ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limiter = Limiter::new(limits);
    let acceptor = TlsAcceptor::from(tls);
    let listener = Arc::new(listener);
    serve_loop(limiter, shutdown, move || {
        let (listener, acceptor, app) = (listener.clone(), acceptor.clone(), app.clone());
        async move {
            let (stream, peer): (_, SocketAddr) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let key = ClientKey::of_ip(peer.ip());
            let handshake = async move {
                acceptor.accept(stream).await.map_err(|e| {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed (this port speaks HTTPS only)");
                    e
                })
            };
            std::io::Result::Ok((key, peer.to_string(), handshake, app))
        }
    })
    .await
}

/// The accept loop shared by both listeners: `accept` yields the client's key, a name for the
/// logs, the future that readies its stream (a TLS handshake) and the router.
async fn serve_loop<A, AF, H, I>(
    limiter: Arc<Limiter>,
    shutdown: impl Future<Output = ()> + Send,
    mut accept: A,
) where
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<(ClientKey, String, H, Router)>>,
    H: Future<Output = std::io::Result<I>> + Send + 'static,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let next = tokio::select! {
            r = accept() => r,
            () = &mut shutdown => break,
        };
        let (key, peer, ready, app) = match next {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = limiter.admit(key) else {
            continue; // dropping the stream closes it
        };
        let limits = limiter.limits.clone();
        tokio::spawn(run_conn(
            admitted,
            peer,
            ready,
            app,
            limits,
            stop_rx.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    // Let requests in service finish, within a grace period (an event stream never does).
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while limiter.count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_conn<H, I>(
    admitted: Admitted,
    peer: String,
    ready: H,
    app: Router,
    limits: ListenLimits,
    mut stop: watch::Receiver<bool>,
) where
    H: Future<Output = std::io::Result<I>> + Send + 'static,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = admitted.state.clone();
    let life = async {
        let Ok(io) = ready.await else { return };
        let io = TokioIo::new(Watched {
            inner: io,
            state: state.clone(),
        });
        let svc_state = state.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let active = svc_state.begin_request();
            let app = app.clone();
            let state = svc_state.clone();
            async move {
                let req = req.map(|inner| Body::new(WatchedBody { inner, state }));
                let resp = app
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|never| match never {});
                Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                    Body::new(Tracked {
                        inner,
                        _active: active,
                    })
                }))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.keep_alive(true);
        let mut conn = pin!(builder.serve_connection(io, svc));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(%peer, error = %e, "connection ended with an error");
                }
            }
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    };
    let watchdog = async {
        let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = state.kill.notified() => {}
            }
            if state.evicted.load(Ordering::Acquire) {
                return "evicted: a connection cap was reached and it was idle longest";
            }
            if let Some(why) = state.verdict(&limits) {
                return why;
            }
        }
    };
    tokio::select! {
        () = life => {}
        why = watchdog => tracing::debug!(%peer, why, "closing connection"),
    }
    drop(admitted);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_all: usize, max_per: usize) -> ListenLimits {
        ListenLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: max_all,
            max_per_client: max_per,
        }
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::of_ip(s.parse().expect("ip"))
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2::5"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::5"), ip("2001:db8:1:3::5"));
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
    }

    #[test]
    fn a_cap_evicts_the_idlest_connection_and_refuses_when_all_are_busy() {
        let l = Limiter::new(limits(3, 2));
        let a1 = l.admit(ip("10.0.0.1")).expect("a1");
        std::thread::sleep(Duration::from_millis(5));
        let a2 = l.admit(ip("10.0.0.1")).expect("a2");
        // Per client: a third from 10.0.0.1 evicts a1, the one idle longest.
        let a3 = l.admit(ip("10.0.0.1")).expect("a3");
        assert!(a1.state.evicted.load(Ordering::Acquire));
        assert!(!a2.state.evicted.load(Ordering::Acquire));
        assert_eq!(l.count(), 2);
        // Both busy: the next from 10.0.0.1 is refused.
        let _busy2 = a2.state.begin_request();
        let _busy3 = a3.state.begin_request();
        assert!(l.admit(ip("10.0.0.1")).is_none());
        // Another client still gets in, up to the total; past it, only by evicting an idle one.
        let b1 = l.admit(ip("10.0.0.2")).expect("b1");
        assert_eq!(l.count(), 3);
        let b2 = l.admit(ip("10.0.0.3")).expect("b2 evicts idle b1");
        assert!(b1.state.evicted.load(Ordering::Acquire));
        let _busy = b2.state.begin_request();
        assert!(l.admit(ip("10.0.0.4")).is_none(), "all busy: refused");
        drop(a1);
        drop(b1);
        assert_eq!(
            l.count(),
            3,
            "dropping evicted connections counts nothing twice"
        );
    }

    #[test]
    fn the_watchdog_closes_silent_slow_and_idle_connections_but_not_busy_ones() {
        let l = ListenLimits {
            header_timeout: Duration::from_millis(30),
            idle_timeout: Duration::from_millis(60),
            max_connections: 1,
            max_per_client: 1,
        };
        let s = Arc::new(ConnState::new());
        assert_eq!(s.verdict(&l), None);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s
            .verdict(&l)
            .is_some_and(|w| w.contains("no complete request")));

        // A request in service (a long poll) is never timed out while it can write.
        let busy = s.begin_request();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.verdict(&l), None);
        // After it, silence is fine until the idle timeout.
        drop(busy);
        assert_eq!(s.verdict(&l), None);
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(s.verdict(&l), Some("idle"));

        // The first byte of a head starts the header timeout.
        let s = Arc::new(ConnState::new());
        drop(s.begin_request());
        s.first_byte.store(s.now(), Ordering::Release);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.verdict(&l).is_some_and(|w| w.contains("too slow")));

        // A response the client does not read.
        let s = Arc::new(ConnState::new());
        let _busy = s.begin_request();
        s.write_blocked.store(s.now(), Ordering::Release);
        std::thread::sleep(Duration::from_millis(70));
        assert!(s.verdict(&l).is_some_and(|w| w.contains("does not read")));
    }
}
