//! The [`Client`]: one HTTP/1.1 connection pool to the controller over a unix socket or HTTPS.
//!
//! HTTPS trusts the controller by a pinned certificate sha256 ([`Client::with_fingerprint`],
//! see [`crate::tls`]) or, without a pin, by the system's trusted CAs. Plain `http://` URLs are
//! refused: a tuchka controller never serves plain HTTP on TCP.
//!
//! Every request goes through [`Client::request`] (URI + auth headers) and [`Client::execute`]
//! (send, classify transport errors); non-2xx answers are turned into [`ClientError::Api`] by
//! [`Client::ensure_success`]. Bodies are JSON except image uploads (a file streamed from disk,
//! `Content-Length` set) and downloads (written to disk frame by frame).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Builder;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyperlocal::UnixConnector;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tuchka_api::{Image, Operation};

use crate::encode::{hex, segment};
use crate::error::{api_error_from_body, innermost_message, BoxError, ClientError};
use crate::tls::{describe, find_rustls_error, normalize_fingerprint};

/// Default path of the controller's unix socket.
pub const DEFAULT_SOCKET: &str = "/var/lib/tuchka/tuchka.sock";

/// How long one long poll of [`Client::wait_operation`] asks the controller to hold.
const OPERATION_WAIT_SECS: u64 = 20;

/// The pause between polls when the controller answers at once with an unchanged operation (a
/// controller that does not hold long polls).
const OPERATION_POLL: Duration = Duration::from_millis(250);

/// How long a TCP connect may take before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An idle pooled connection is dropped after this: before the controller's own idle timeout
/// (`serve --idle-timeout`, 60 s by default) closes it, so a request never races that close.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The connection pool's settings, the same for both transports.
fn pooled() -> hyper_util::client::legacy::Builder {
    let mut b = LegacyClient::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE).pool_timer(TokioTimer::new());
    b
}

/// Read size of upload streaming.
const UPLOAD_CHUNK: usize = 256 * 1024;

type ReqBody = BoxBody<Bytes, BoxError>;

/// Where the controller listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The controller's unix socket (no auth).
    Unix(PathBuf),
    /// `https://host:port` (optionally with a path prefix), with a bearer token.
    Http {
        /// Base URL, e.g. `https://10.0.0.1:7480`.
        url: String,
        /// Bearer token sent with every request.
        token: Option<String>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Http { url, .. } => f.write_str(url),
        }
    }
}

type HttpsClient = LegacyClient<HttpsConnector<HttpConnector>, ReqBody>;

#[derive(Clone)]
enum Transport {
    Unix {
        socket: PathBuf,
        http: LegacyClient<UnixConnector, ReqBody>,
    },
    Http {
        base: String,
        /// Normalized certificate pin, or why the one given is invalid.
        pin: Option<Result<String, String>>,
        /// Built on first use (loading the system's CAs is not free); shared by clones.
        http: Arc<OnceLock<Result<HttpsClient, String>>>,
    },
}

/// An HTTPS client that trusts `pin` (or the system's CAs).
fn https_client(pin: Option<&str>) -> Result<HttpsClient, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    http.enforce_http(false);
    let tls = crate::tls::client_config(pin).map_err(|e| format!("cannot set up TLS: {e}"))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(pooled().build(connector))
}

/// A client of the tuchka API. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Client {
    /// A client of the controller at `endpoint`. Does not connect yet; a bad URL is reported by
    /// the first request.
    pub fn new(endpoint: Endpoint) -> Self {
        match endpoint {
            Endpoint::Unix(socket) => Client {
                transport: Transport::Unix {
                    socket,
                    http: pooled().build(UnixConnector),
                },
                token: None,
            },
            Endpoint::Http { url, token } => Client {
                transport: Transport::Http {
                    base: url.trim_end_matches('/').to_string(),
                    pin: None,
                    http: Arc::new(OnceLock::new()),
                },
                token,
            },
        }
    }

    /// Trust the controller by the sha256 (hex) of its CA or server certificate instead of
    /// the system's CAs (what `tuchka host join-token` prints). HTTPS only: ignored on the unix
    /// socket. An invalid fingerprint is reported by the first request.
    pub fn with_fingerprint(mut self, sha256: &str) -> Self {
        if let Transport::Http { pin, http, .. } = &mut self.transport {
            *pin = Some(normalize_fingerprint(sha256));
            *http = Arc::new(OnceLock::new());
        }
        self
    }

    /// Use `token` as the bearer on every request, whatever the transport (agent credential).
    /// `None` removes it.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The socket path or base URL, for messages.
    pub fn endpoint(&self) -> String {
        match &self.transport {
            Transport::Unix { socket, .. } => socket.display().to_string(),
            Transport::Http { base, .. } => base.clone(),
        }
    }

    /// `GET path` → JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.request(Method::GET, path)?;
        let resp = self.execute(req, empty_body(), path).await?;
        self.read_json(resp, path).await
    }

    /// `GET path` with `If-None-Match: etag` (when given): the answer and its `ETag`, or
    /// [`Conditional::NotModified`] when the server answered `304` (what it has is still `etag`).
    pub async fn get_if_changed<T: DeserializeOwned>(
        &self,
        path: &str,
        etag: Option<&str>,
    ) -> Result<Conditional<T>, ClientError> {
        let mut req = self.request(Method::GET, path)?;
        if let Some(tag) = etag {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let resp = self.execute(req, empty_body(), path).await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(Conditional::NotModified(resp.headers().clone()));
        }
        let tag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Conditional::Fresh(self.read_json(resp, path).await?, tag))
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self.send_json(Method::POST, path, body).await?;
        self.read_json(resp, path).await
    }

    /// `POST path` with a JSON body, expecting no answer body (e.g. `204`).
    pub async fn post_empty<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        let resp = self.send_json(Method::POST, path, body).await?;
        self.discard(resp, path).await
    }

    /// `POST path` without a body (actions such as `/v1/vms/{name}/start`) → JSON.
    pub async fn post_no_body<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.request(Method::POST, path)?;
        let resp = self.execute(req, empty_body(), path).await?;
        self.read_json(resp, path).await
    }

    /// `DELETE path` → JSON (e.g. a `202` operation).
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.request(Method::DELETE, path)?;
        let resp = self.execute(req, empty_body(), path).await?;
        self.read_json(resp, path).await
    }

    /// `DELETE path`, expecting no answer body (`204`).
    pub async fn delete_empty(&self, path: &str) -> Result<(), ClientError> {
        let req = self.request(Method::DELETE, path)?;
        let resp = self.execute(req, empty_body(), path).await?;
        self.discard(resp, path).await
    }

    /// `GET path` → the body as text (e.g. a console log). Invalid UTF-8 is replaced.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let req = self
            .request(Method::GET, path)?
            .header(header::ACCEPT, "text/plain");
        let resp = self.execute(req, empty_body(), path).await?;
        let resp = self.ensure_success(resp, path).await?;
        let bytes = self.collect(resp, "GET", path).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Upload the image file `file` as image `name` (`POST /v1/images`), calling `progress`
    /// with the bytes sent so far.
    pub async fn upload_image(
        &self,
        name: &str,
        file: &Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Image, ClientError> {
        let path = format!("/v1/images?name={}", segment(name));
        self.send_file(Method::POST, &path, file, progress).await
    }

    /// Send file `file` as the body of `PUT path` (with its length), calling `progress` with
    /// the bytes sent so far; the JSON answer is returned.
    pub async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<T, ClientError> {
        self.send_file(Method::PUT, path, file, progress).await
    }

    async fn send_file<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        file: &Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<T, ClientError> {
        let handle = tokio::fs::File::open(file)
            .await
            .map_err(|source| ClientError::Io {
                action: "cannot open",
                path: file.to_path_buf(),
                source,
            })?;
        let meta = handle.metadata().await.map_err(|source| ClientError::Io {
            action: "cannot read the size of",
            path: file.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(ClientError::Io {
                action: "not a regular file:",
                path: file.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file"),
            });
        }
        let mut sent = 0u64;
        let stream = ReaderStream::with_capacity(handle, UPLOAD_CHUNK).map(move |chunk| {
            chunk
                .map(|data| {
                    sent += data.len() as u64;
                    progress(sent);
                    Frame::data(data)
                })
                .map_err(|e| Box::new(e) as BoxError)
        });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let req = self
            .request(method, path)?
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, meta.len());
        let resp = self.execute(req, body, path).await?;
        self.read_json(resp, path).await
    }

    /// Download `GET path` into `dest`. When `dest` exists and is not empty, asks for the rest
    /// only (`Range: bytes=<len>-`) and appends; a server that ignores the range (`200`) gets the
    /// file rewritten from the start. Returns the bytes written by this call (0 when `dest` was
    /// already complete). The caller verifies the content (e.g. its sha256).
    pub async fn download(&self, path: &str, dest: &Path) -> Result<u64, ClientError> {
        let have = match tokio::fs::metadata(dest).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(ClientError::Io {
                    action: "cannot inspect",
                    path: dest.to_path_buf(),
                    source,
                })
            }
        };
        let mut req = self.request(Method::GET, path)?;
        if have > 0 {
            req = req.header(header::RANGE, format!("bytes={have}-"));
        }
        let resp = self.execute(req, empty_body(), path).await?;
        let append = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .map(|r| r.start);
                if start != Some(have) {
                    return Err(ClientError::Protocol {
                        path: path.to_string(),
                        detail: format!(
                            "asked for bytes {have}- but the answer's Content-Range is {:?}",
                            resp.headers().get(header::CONTENT_RANGE)
                        ),
                    });
                }
                true
            }
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                let total = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_unsatisfied_range);
                return if total == Some(have) {
                    Ok(0)
                } else {
                    Err(ClientError::Protocol {
                        path: path.to_string(),
                        detail: format!(
                            "{} has {have} bytes, more than the source ({}); remove it and retry",
                            dest.display(),
                            total.map_or("unknown size".to_string(), |t| format!("{t} bytes"))
                        ),
                    })
                };
            }
            _ => false,
        };
        let resp = self.ensure_success(resp, path).await?;
        let mut options = tokio::fs::OpenOptions::new();
        // A new file is private (an image is guest data); an existing one keeps its mode.
        options.create(true).mode(0o600);
        if append {
            options.append(true);
        } else {
            options.write(true).truncate(true);
        }
        let io_err = |action: &'static str| {
            let dest = dest.to_path_buf();
            move |source| ClientError::Io {
                action,
                path: dest,
                source,
            }
        };
        let mut out = options.open(dest).await.map_err(io_err("cannot open"))?;
        let mut body = resp.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport_error("GET", path, Box::new(e)))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(io_err("cannot write"))?;
                written += data.len() as u64;
            }
        }
        out.flush().await.map_err(io_err("cannot write"))?;
        out.sync_data().await.map_err(io_err("cannot sync"))?;
        Ok(written)
    }

    /// Follow `GET /v1/operations/{id}` until it is finished, by long polls (`?wait=` with
    /// `If-None-Match`: the controller answers as soon as the operation changes); `on_update` is
    /// called with the first answer and on each change. Returns the finished operation,
    /// succeeded or failed (check `state`).
    pub async fn wait_operation(
        &self,
        id: &str,
        mut on_update: impl FnMut(&Operation),
    ) -> Result<Operation, ClientError> {
        let first = format!("/v1/operations/{}", segment(id));
        let poll = format!("{first}?wait={OPERATION_WAIT_SECS}");
        let mut last: Option<(Operation, Option<HeaderValue>)> = None;
        loop {
            let path = if last.is_some() { &poll } else { &first };
            let mut req = self.request(Method::GET, path)?;
            if let Some(etag) = last.as_ref().and_then(|(_, e)| e.clone()) {
                req = req.header(header::IF_NONE_MATCH, etag);
            }
            let resp = self.execute(req, empty_body(), path).await?;
            if resp.status() == StatusCode::NOT_MODIFIED {
                continue;
            }
            let etag = resp.headers().get(header::ETAG).cloned();
            let op: Operation = self.read_json(resp, path).await?;
            let unchanged = last.as_ref().map(|(o, _)| o) == Some(&op);
            if !unchanged {
                on_update(&op);
            }
            if op.is_finished() {
                return Ok(op);
            }
            if unchanged || etag.is_none() {
                tokio::time::sleep(OPERATION_POLL).await;
            }
            last = Some((op, etag));
        }
    }

    /// A request builder for `method path` with the URI and auth set.
    fn request(&self, method: Method, path: &str) -> Result<Builder, ClientError> {
        let uri = self.uri(path)?;
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::InvalidUrl {
                    url: self.endpoint(),
                    reason: "the token contains characters not allowed in a header".to_string(),
                }
            })?;
            builder = builder.header(header::AUTHORIZATION, value);
        }
        Ok(builder)
    }

    fn uri(&self, path: &str) -> Result<Uri, ClientError> {
        let invalid = |url: String, reason: String| ClientError::InvalidUrl { url, reason };
        if !path.starts_with('/') {
            return Err(invalid(
                path.to_string(),
                "API paths must start with /".to_string(),
            ));
        }
        match &self.transport {
            Transport::Unix { socket, .. } => {
                let host = hex(socket.as_os_str().as_encoded_bytes());
                format!("unix://{host}:0{path}")
                    .parse::<Uri>()
                    .map_err(|e| invalid(path.to_string(), e.to_string()))
            }
            Transport::Http { base, .. } => {
                if base.starts_with("http://") {
                    return Err(invalid(
                        base.clone(),
                        "tuchka serves TCP over HTTPS only: use https://HOST:PORT with \
                         --fingerprint (on the controller, `tuchka host join-token` prints both)"
                            .to_string(),
                    ));
                }
                if !base.starts_with("https://") {
                    return Err(invalid(base.clone(), "use https://HOST:PORT".to_string()));
                }
                let full = format!("{base}{path}");
                let uri = full
                    .parse::<Uri>()
                    .map_err(|e| invalid(full.clone(), e.to_string()))?;
                if uri.host().is_none_or(str::is_empty) {
                    return Err(invalid(base.clone(), "it has no host".to_string()));
                }
                Ok(uri)
            }
        }
    }

    async fn send_json<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<Response<Incoming>, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Encode {
            path: path.to_string(),
            source,
        })?;
        let req = self
            .request(method, path)?
            .header(header::CONTENT_TYPE, "application/json");
        self.execute(req, full_body(bytes), path).await
    }

    /// Send the request; connection failures become [`ClientError::Connect`].
    async fn execute(
        &self,
        builder: Builder,
        body: ReqBody,
        path: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let req = builder.body(body).map_err(|e| ClientError::InvalidUrl {
            url: path.to_string(),
            reason: e.to_string(),
        })?;
        let method = req.method().to_string();
        // A bodiless read can be sent again: the controller may have closed the pooled
        // connection it went out on (idle, or evicted at a connection cap) just as it was
        // reused; then it is retried once on a fresh connection.
        let again = matches!(*req.method(), Method::GET | Method::HEAD).then(|| {
            let mut r = Request::new(empty_body());
            *r.method_mut() = req.method().clone();
            *r.uri_mut() = req.uri().clone();
            *r.headers_mut() = req.headers().clone();
            r
        });
        let result = match self.send(req).await {
            Err(SendError::Http(e)) if closed_unanswered(&e) => match again {
                Some(req) => self.send(req).await,
                None => Err(SendError::Http(e)),
            },
            other => other,
        };
        let result = match result {
            Ok(r) => Ok(r),
            Err(SendError::Api(e)) => return Err(e),
            Err(SendError::Http(e)) => Err(e),
        };
        result.map_err(|e| {
            if let Some(tls) = find_rustls_error(&e) {
                let pinned = matches!(&self.transport, Transport::Http { pin: Some(_), .. });
                ClientError::Tls {
                    endpoint: self.endpoint(),
                    reason: describe(tls, pinned),
                }
            } else if e.is_connect() {
                ClientError::Connect {
                    endpoint: self.endpoint(),
                    reason: innermost_message(&e),
                    source: Box::new(e),
                }
            } else {
                self.transport_error(&method, path, Box::new(e))
            }
        })
    }

    /// One try of [`Self::execute`].
    async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        match &self.transport {
            Transport::Unix { http, .. } => http.request(req).await.map_err(SendError::Http),
            Transport::Http { pin, http, .. } => {
                let pin = match pin {
                    Some(Err(reason)) => {
                        return Err(SendError::Api(ClientError::InvalidFingerprint {
                            reason: reason.clone(),
                        }))
                    }
                    Some(Ok(p)) => Some(p.as_str()),
                    None => None,
                };
                let client = http
                    .get_or_init(|| https_client(pin))
                    .as_ref()
                    .map_err(|reason| {
                        SendError::Api(ClientError::Tls {
                            endpoint: self.endpoint(),
                            reason: reason.clone(),
                        })
                    })?;
                client.request(req).await.map_err(SendError::Http)
            }
        }
    }

    fn transport_error(&self, method: &str, path: &str, source: BoxError) -> ClientError {
        ClientError::Transport {
            method: method.to_string(),
            path: path.to_string(),
            endpoint: self.endpoint(),
            reason: innermost_message(source.as_ref()),
            source,
        }
    }

    /// Pass 2xx answers through; turn others into [`ClientError::Api`].
    async fn ensure_success(
        &self,
        resp: Response<Incoming>,
        path: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = self.collect(resp, "", path).await.unwrap_or_default();
        Err(ClientError::Api {
            status: status.as_u16(),
            error: api_error_from_body(status.as_u16(), path, &body),
        })
    }

    async fn collect(
        &self,
        resp: Response<Incoming>,
        method: &str,
        path: &str,
    ) -> Result<Bytes, ClientError> {
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| self.transport_error(method, path, Box::new(e)))
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        resp: Response<Incoming>,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.ensure_success(resp, path).await?;
        let bytes = self.collect(resp, "", path).await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            path: path.to_string(),
            source,
        })
    }

    async fn discard(&self, resp: Response<Incoming>, path: &str) -> Result<(), ClientError> {
        let resp = self.ensure_success(resp, path).await?;
        self.collect(resp, "", path).await.map(|_| ())
    }
}

/// The answer of a conditional read ([`Client::get_if_changed`]).
#[derive(Debug)]
pub enum Conditional<T> {
    /// Something new, with its `ETag` if the server sent one.
    Fresh(T, Option<String>),
    /// `304 Not Modified`: what the caller has is current; the answer's headers.
    NotModified(header::HeaderMap),
}

/// Why one try of a request failed: before it was sent ([`ClientError`]), or in hyper.
enum SendError {
    Api(ClientError),
    Http(hyper_util::client::legacy::Error),
}

/// Whether `e` is a connection that closed (or reset) before any answer came: a pooled
/// connection the server had just closed.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

fn empty_body() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full_body(bytes: Vec<u8>) -> ReqBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// A parsed `Content-Range: bytes START-END/TOTAL` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    end: u64,
    total: Option<u64>,
}

/// Parse `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some(ContentRange { start, end, total })
}

/// Parse the `bytes */TOTAL` of a `416` answer.
fn parse_unsatisfied_range(value: &str) -> Option<u64> {
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some(ContentRange {
                start: 100,
                end: 199,
                total: Some(200)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*").map(|r| (r.start, r.end, r.total)),
            Some((0, 0, None))
        );
        assert_eq!(parse_content_range("bytes 5-1/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
        assert_eq!(parse_unsatisfied_range("bytes */4096"), Some(4096));
        assert_eq!(parse_unsatisfied_range("bytes 0-1/2"), None);
    }

    #[test]
    fn unix_uris_carry_the_socket_and_path() {
        let c = Client::new(Endpoint::Unix(PathBuf::from("/run/t.sock")));
        let uri = c.uri("/v1/vms?x=1").expect("uri");
        assert_eq!(uri.scheme_str(), Some("unix"));
        assert_eq!(uri.path(), "/v1/vms");
        assert_eq!(uri.query(), Some("x=1"));
        assert!(c.uri("v1/vms").is_err());
    }

    #[test]
    fn http_uris_join_base_and_path() {
        let c = Client::new(Endpoint::Http {
            url: "https://127.0.0.1:7070/".to_string(),
            token: None,
        });
        let uri = c.uri("/v1/vms").expect("uri");
        assert_eq!(uri.to_string(), "https://127.0.0.1:7070/v1/vms");
        let plain = Client::new(Endpoint::Http {
            url: "http://x:1".to_string(),
            token: None,
        });
        let err = plain.uri("/v1/vms").expect_err("plain http refused");
        assert!(err.to_string().contains("HTTPS only"), "{err}");
        let garbage = Client::new(Endpoint::Http {
            url: "https://a b".to_string(),
            token: None,
        });
        assert!(garbage.uri("/v1/vms").is_err());
    }
}
