//! The client against a tiny axum server on a unix socket in a tempdir: JSON calls, API errors,
//! bearer tokens, percent-encoded names, streamed uploads, resumed downloads, operation waits,
//! and what a user sees when nothing listens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tuchka_api::agent::HostReport;
use tuchka_api::{ApiError, Image, Operation};
use tuchka_client::{segment, Client, ClientError, Endpoint};

#[derive(Clone)]
struct Fake {
    dir: PathBuf,
    blob: Arc<Vec<u8>>,
    op_polls: Arc<AtomicU32>,
    seen: Arc<Mutex<Vec<String>>>,
}

fn api_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ApiError {
            code: code.to_string(),
            message,
            chain: vec!["the row is gone".to_string()],
        }),
    )
        .into_response()
}

fn operation(state: &str, done: u32) -> Operation {
    Operation {
        id: "op-1".to_string(),
        kind: tuchka_api::OperationKind::GroupCreate,
        target: "group/web".to_string(),
        state: state.parse().expect("state"),
        done,
        total: 3,
        message: format!("step {done}"),
        error: None,
        created_at: "2026-01-01T00:00:00Z".to_string(),
        finished_at: None,
        phases: vec![],
        parent: None,
        children: vec![],
        migration: None,
    }
}

async fn get_image(UrlPath(name): UrlPath<String>, State(f): State<Fake>) -> Response {
    f.seen.lock().expect("lock").push(name.clone());
    if name == "missing" {
        return api_error(
            StatusCode::NOT_FOUND,
            "ImageNotFound",
            format!("image \"{name}\" not found (see: tuchka image list)"),
        );
    }
    Json(image(&name, 0)).into_response()
}

fn image(name: &str, size: u64) -> Image {
    Image {
        name: name.to_string(),
        sha256: "ab".repeat(32),
        source_format: "raw".to_string(),
        virtual_size: size,
        stored_size: size,
        created_at: "2026-01-01T00:00:00Z".to_string(),
        used_by: vec![],
        made_from: "upload".into(),
    }
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    name: String,
}

async fn upload(
    State(f): State<Fake>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Chunked",
            "expected a Content-Length".into(),
        );
    }
    let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return api_error(
            StatusCode::LENGTH_REQUIRED,
            "NoLength",
            "no Content-Length".into(),
        );
    };
    let mut out = tokio::fs::File::create(f.dir.join("uploaded"))
        .await
        .expect("create");
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        got += chunk.len() as u64;
        out.write_all(&chunk).await.expect("write");
    }
    // tokio's File finishes writes in the background: wait for them before answering.
    out.flush().await.expect("flush");
    assert_eq!(got, len);
    (StatusCode::CREATED, Json(image(&q.name, got))).into_response()
}

async fn serve_blob(State(f): State<Fake>, headers: HeaderMap) -> Response {
    let total = f.blob.len() as u64;
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return (StatusCode::OK, f.blob.to_vec()).into_response();
    };
    let start: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .expect("range bytes=N-");
    if start >= total {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{total}"))],
        )
            .into_response();
    }
    let from = usize::try_from(start).expect("usize");
    (
        StatusCode::PARTIAL_CONTENT,
        [(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1),
        )],
        f.blob[from..].to_vec(),
    )
        .into_response()
}

async fn blob_ignoring_range(State(f): State<Fake>) -> Response {
    (StatusCode::OK, f.blob.to_vec()).into_response()
}

async fn get_operation(State(f): State<Fake>) -> Json<Operation> {
    let n = f.op_polls.fetch_add(1, Ordering::SeqCst);
    // Polls 0 and 1 show the same state (no update expected), then progress, then success.
    Json(match n {
        0 | 1 => operation("running", 0),
        2 => operation("running", 2),
        _ => {
            let mut op = operation("succeeded", 3);
            op.finished_at = Some("2026-01-01T00:00:01Z".to_string());
            op
        }
    })
}

async fn report(
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    Json(report): Json<HostReport>,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some("Bearer cred-1") {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!("bad credential for host {id}"),
        );
    }
    assert_eq!(report.generation, 7);
    StatusCode::NO_CONTENT.into_response()
}

async fn console() -> &'static str {
    "boot ok\nlogin: "
}

struct Server {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    socket: PathBuf,
    fake: Fake,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()))
    }
}

async fn start() -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("tuchka.sock");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let fake = Fake {
        dir: dir.clone(),
        blob: Arc::new(blob),
        op_polls: Arc::new(AtomicU32::new(0)),
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    let app = Router::new()
        .route("/v1/images/{name}", get(get_image))
        .route("/v1/images", post(upload))
        .route("/v1/agent/images/{sha}", get(serve_blob))
        .route("/v1/plain/{sha}", get(blob_ignoring_range))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/agent/hosts/{id}/report", post(report))
        .route("/v1/vms/{name}/console", get(console))
        .with_state(fake.clone());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind unix socket");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    Server {
        _dir: tmp,
        dir,
        socket,
        fake,
        task,
    }
}

#[tokio::test]
async fn get_decodes_json_and_api_errors_carry_the_servers_message() {
    let s = start().await;
    let c = s.client();
    let img: Image = c.get("/v1/images/base").await.expect("get image");
    assert_eq!(img.name, "base");

    let err = c.get::<Image>("/v1/images/missing").await.expect_err("404");
    assert_eq!(
        err.to_string(),
        "image \"missing\" not found (see: tuchka image list)"
    );
    assert_eq!(err.status(), Some(404));
    let api = err.api_error().expect("api error");
    assert_eq!(api.code, "ImageNotFound");
    assert_eq!(api.chain, vec!["the row is gone".to_string()]);

    // An unknown route answers a non-ApiError body; still an Api error with the status.
    let err = c
        .get::<Image>("/v1/nothing-here")
        .await
        .expect_err("404 route");
    assert_eq!(err.status(), Some(404));
    assert!(err.to_string().contains("/v1/nothing-here"), "{err}");
}

#[tokio::test]
async fn names_from_users_are_percent_encoded() {
    let s = start().await;
    let c = s.client();
    let name = "we ird/name?#";
    let img: Image = c
        .get(&format!("/v1/images/{}", segment(name)))
        .await
        .expect("get");
    assert_eq!(img.name, name);
    assert_eq!(s.fake.seen.lock().expect("lock").as_slice(), [name]);
}

#[tokio::test]
async fn post_empty_sends_the_bearer_token() {
    let s = start().await;
    let report = HostReport {
        generation: 7,
        ..HostReport::default()
    };
    let err = s
        .client()
        .post_empty("/v1/agent/hosts/h1/report", &report)
        .await
        .expect_err("no token");
    assert_eq!(err.status(), Some(401));
    s.client()
        .with_token(Some("cred-1".to_string()))
        .post_empty("/v1/agent/hosts/h1/report", &report)
        .await
        .expect("report with credential");
}

#[tokio::test]
async fn get_text_returns_the_console_log() {
    let s = start().await;
    let text = s
        .client()
        .get_text("/v1/vms/web-0/console")
        .await
        .expect("console");
    assert_eq!(text, "boot ok\nlogin: ");
}

#[tokio::test]
async fn upload_streams_the_file_with_content_length_and_reports_progress() {
    let s = start().await;
    let file = s.dir.join("disk.raw");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&file, &content).expect("write file");

    let calls = Arc::new(Mutex::new(Vec::<u64>::new()));
    let seen = calls.clone();
    let img = s
        .client()
        .upload_image("base", &file, move |n| seen.lock().expect("lock").push(n))
        .await
        .expect("upload");
    assert_eq!(img.name, "base");
    assert_eq!(img.stored_size, content.len() as u64);
    let uploaded = std::fs::read(s.dir.join("uploaded")).expect("read uploaded");
    assert!(uploaded == content, "uploaded bytes differ from the file");

    let calls = calls.lock().expect("lock");
    assert!(
        calls.len() > 3,
        "expected progress per chunk, got {calls:?}"
    );
    assert!(calls.windows(2).all(|w| w[0] < w[1]), "{calls:?}");
    assert_eq!(calls.last().copied(), Some(content.len() as u64));
}

#[tokio::test]
async fn upload_of_a_missing_file_names_the_file() {
    let s = start().await;
    let missing = s.dir.join("nope.qcow2");
    let err = s
        .client()
        .upload_image("base", &missing, |_| {})
        .await
        .expect_err("missing file");
    assert!(
        err.to_string().contains("nope.qcow2"),
        "message should name the file: {err}"
    );
}

#[tokio::test]
async fn download_fresh_resumed_complete_and_without_range_support() {
    let s = start().await;
    let c = s.client();
    let blob = s.fake.blob.as_slice();
    let path = "/v1/agent/images/abc";

    // Fresh download.
    let dest = s.dir.join("fresh.qcow2");
    let n = c.download(path, &dest).await.expect("download");
    assert_eq!(n, blob.len() as u64);
    assert_file_is(&dest, blob);

    // Resume after a partial download: only the rest is fetched.
    let dest = s.dir.join("partial.qcow2");
    std::fs::write(&dest, &blob[..123_456]).expect("partial");
    let n = c.download(path, &dest).await.expect("resume");
    assert_eq!(n, (blob.len() - 123_456) as u64);
    assert_file_is(&dest, blob);

    // Already complete: the server answers 416 with the total, nothing is written.
    let n = c.download(path, &dest).await.expect("complete");
    assert_eq!(n, 0);
    assert_file_is(&dest, blob);

    // A server that ignores Range answers 200: the file is rewritten, not appended to.
    let dest = s.dir.join("norange.qcow2");
    std::fs::write(&dest, &blob[..1000]).expect("partial");
    let n = c.download("/v1/plain/abc", &dest).await.expect("rewrite");
    assert_eq!(n, blob.len() as u64);
    assert_file_is(&dest, blob);

    // A partial file longer than the source is an error that says what to do.
    let dest = s.dir.join("toolong.qcow2");
    let mut long = blob.to_vec();
    long.extend_from_slice(b"extra");
    std::fs::write(&dest, &long).expect("long");
    let err = c.download(path, &dest).await.expect_err("too long");
    assert!(err.to_string().contains("remove it"), "{err}");
}

fn assert_file_is(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).expect("read");
    assert_eq!(got.len(), want.len(), "{} size", path.display());
    assert!(got == want, "{} content differs", path.display());
}

#[tokio::test]
async fn wait_operation_reports_each_change_until_finished() {
    let s = start().await;
    let mut updates = Vec::new();
    let op = s
        .client()
        .wait_operation("op-1", |op| updates.push((op.state.to_string(), op.done)))
        .await
        .expect("wait");
    assert_eq!(op.state, tuchka_api::OperationState::Succeeded);
    assert_eq!(
        updates,
        vec![
            ("running".to_string(), 0),
            ("running".to_string(), 2),
            ("succeeded".to_string(), 3)
        ]
    );
}

#[tokio::test]
async fn connect_error_names_the_socket_and_hints_how_to_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("absent.sock");
    let err = Client::new(Endpoint::Unix(socket.clone()))
        .get::<Vec<Image>>("/v1/images")
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot reach tuchka at {}: ", socket.display())),
        "{msg}"
    );
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert!(
        msg.ends_with("(is `tuchka serve` running? see ./scripts/quickstart)"),
        "{msg}"
    );
}

#[tokio::test]
async fn connect_error_over_tcp_names_the_url() {
    // Bind then drop a listener so the port is (almost certainly) closed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let url = format!("https://127.0.0.1:{port}");
    let err = Client::new(Endpoint::Http {
        url: url.clone(),
        token: Some("t".to_string()),
    })
    .get::<Vec<Image>>("/v1/images")
    .await
    .expect_err("closed port");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach tuchka at {url}: ")),
        "{err}"
    );
}

/// Read one request head from `conn` (these requests have no body); false at end of stream.
async fn read_head(conn: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn a_read_is_sent_again_when_the_server_closed_its_pooled_connection_under_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("tuchka.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]";
    let server = tokio::spawn(async move {
        // Connection 1 answers one request, then reads the next one and closes without an
        // answer (what an idle timeout or a connection cap does in the same instant).
        let (mut first, _) = listener.accept().await.expect("accept");
        assert!(read_head(&mut first).await);
        first.write_all(answer).await.expect("answer");
        assert!(
            read_head(&mut first).await,
            "the client reuses the connection"
        );
        drop(first);
        // Connection 2: the retried read, and then the POST that is not retried.
        let (mut second, _) = listener.accept().await.expect("accept the retry");
        assert!(read_head(&mut second).await);
        second.write_all(answer).await.expect("answer");
        let posted = read_head(&mut second).await;
        drop(second);
        posted
    });
    let c = Client::new(Endpoint::Unix(socket));
    let v: serde_json::Value = c.get("/v1/vms").await.expect("first read");
    assert_eq!(v, serde_json::json!([]));
    let v: serde_json::Value = c.get("/v1/vms").await.expect("the read survives the close");
    assert_eq!(v, serde_json::json!([]));
    let err = c
        .post_empty("/v1/vms/web-0/start", &serde_json::json!({}))
        .await
        .expect_err("a write is never sent twice");
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    assert!(server.await.expect("server"), "the POST went out, once");
}
