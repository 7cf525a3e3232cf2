//! The CLI end to end against a fake controller (axum on a unix socket in a tempdir): what a
//! user types, what they see on stdout/stderr, and the exit code.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use tuchka_api::{
    ApiError, GroupCreate, Image, Operation, OperationState, PowerState, Vm, VmAddress, VmState,
    VmStop,
};
use tuchka_cli::{run_command_with, Cli};

#[derive(Clone, Default)]
struct Fake {
    group_create: Arc<Mutex<Option<GroupCreate>>>,
    vm_stop: Arc<Mutex<Option<VmStop>>>,
    uploaded: Arc<Mutex<Vec<u8>>>,
    polls: Arc<AtomicU32>,
}

fn vms() -> Vec<Vm> {
    (0..2)
        .map(|i| Vm {
            name: format!("web-{i}"),
            id: format!("id-{i}"),
            group: "web".into(),
            index: i,
            state: VmState::Running,
            desired: PowerState::Running,
            host: "h1".into(),
            placement_reason: "spread".into(),
            image: "base".into(),
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            addresses: vec![VmAddress {
                network: "lan".into(),
                mac: format!("52:54:00:00:00:0{i}"),
                ip: format!("10.80.0.{}", i + 2),
                vm: None,
            }],
            domain: format!("tk-1-web-{i}"),
            error: None,
            error_chain: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
            migration: None,
            last_migration: None,
            cpu_usage: 0.0,
            volumes: vec![],
            pending_resize: None,
            pause_reason: None,
        })
        .collect()
}

fn operation(id: &str, kind: &str, target: &str, state: &str) -> Operation {
    Operation {
        id: id.into(),
        kind: kind.parse().expect("kind"),
        target: target.into(),
        state: state.parse().expect("state"),
        done: 0,
        total: 2,
        message: "placing".into(),
        error: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        finished_at: None,
        phases: vec![],
        parent: None,
        children: vec![],
        migration: None,
    }
}

fn not_found(what: &str, name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ApiError {
            code: "NotFound".into(),
            message: format!("{what} {name:?} not found (see: tuchka {what} list)"),
            chain: vec!["no such row".into()],
        }),
    )
        .into_response()
}

async fn list_vms() -> Json<Vec<Vm>> {
    Json(vms())
}

async fn show_vm(Path(name): Path<String>) -> Response {
    match vms().into_iter().find(|v| v.name == name) {
        Some(vm) => Json(vm).into_response(),
        None => not_found("vm", &name),
    }
}

async fn start_vm(Path(name): Path<String>, body: Body) -> Response {
    let bytes = to_bytes(body, 1024).await.expect("body");
    assert!(bytes.is_empty(), "start sends no body");
    (
        StatusCode::ACCEPTED,
        Json(operation(
            "op-start",
            "vm.start",
            &format!("vm/{name}"),
            "running",
        )),
    )
        .into_response()
}

async fn stop_vm(
    State(f): State<Fake>,
    Path(name): Path<String>,
    Json(stop): Json<VmStop>,
) -> Response {
    *f.vm_stop.lock().expect("lock") = Some(stop);
    (
        StatusCode::ACCEPTED,
        Json(operation(
            "op-ok",
            "vm.stop",
            &format!("vm/{name}"),
            "running",
        )),
    )
        .into_response()
}

async fn console(Path(name): Path<String>) -> Json<tuchka_api::ConsoleLog> {
    let text = "tuchka-test-image ready\nlogin: ".to_string();
    Json(tuchka_api::ConsoleLog {
        vm: name,
        start: 0,
        end: text.len() as u64,
        text,
        missed: 0,
    })
}

async fn create_group(State(f): State<Fake>, Json(body): Json<GroupCreate>) -> Response {
    let target = format!("group/{}", body.name);
    *f.group_create.lock().expect("lock") = Some(body);
    (
        StatusCode::ACCEPTED,
        Json(operation("op-fail", "group.create", &target, "running")),
    )
        .into_response()
}

async fn get_op(State(f): State<Fake>, Path(id): Path<String>) -> Response {
    let n = f.polls.fetch_add(1, Ordering::SeqCst);
    let mut op = match id.as_str() {
        "op-ok" => operation("op-ok", "vm.stop", "vm/web-0", "running"),
        "op-fail" => operation("op-fail", "group.create", "group/web", "running"),
        other => return not_found("operation", other),
    };
    if n >= 1 {
        op.done = 2;
        op.finished_at = Some("2026-01-01T00:00:05Z".into());
        if id == "op-ok" {
            op.state = OperationState::Succeeded;
        } else {
            op.state = OperationState::Failed;
            op.error = Some(ApiError {
                code: "NoCapacity".into(),
                message: "no host can take web-2".into(),
                chain: vec!["h1: 256 MiB free, 512 MiB needed".into()],
            });
        }
    }
    Json(op).into_response()
}

#[derive(serde::Deserialize)]
struct NameQuery {
    name: String,
}

async fn upload(State(f): State<Fake>, Query(q): Query<NameQuery>, body: Body) -> Response {
    let bytes = to_bytes(body, 16 << 20).await.expect("body");
    *f.uploaded.lock().expect("lock") = bytes.to_vec();
    let img = Image {
        name: q.name,
        sha256: "c0ffee".repeat(10) + "abcd",
        source_format: "raw".into(),
        virtual_size: bytes.len() as u64,
        stored_size: 196_608,
        created_at: "2026-01-01T00:00:00Z".into(),
        used_by: vec![],
        made_from: "upload".into(),
    };
    (StatusCode::CREATED, Json(img)).into_response()
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

async fn start() -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("tuchka.sock");
    let fake = Fake::default();
    let app = Router::new()
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}", get(show_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/console/log", get(console))
        .route("/v1/groups", post(create_group))
        .route("/v1/operations/{id}", get(get_op))
        .route("/v1/images", post(upload))
        .with_state(fake.clone());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
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

struct Outcome {
    code: i32,
    out: String,
    err: String,
}

async fn tuchka(socket: &std::path::Path, args: &[&str]) -> Outcome {
    let socket = socket.display().to_string();
    let argv = ["tuchka", "--socket", socket.as_str()]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = run_command_with(cli.global, cli.command, &mut out, &mut err).await;
    Outcome {
        code,
        out: String::from_utf8(out).expect("utf-8 stdout"),
        err: String::from_utf8(err).expect("utf-8 stderr"),
    }
}

#[tokio::test]
async fn vm_list_prints_a_table_and_json_prints_the_api_objects() {
    let s = start().await;
    let r = tuchka(&s.socket, &["vm", "list"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        r.out,
        "NAME   GROUP  STATE    HOST  IP(S)      CPUS  MEMORY\n\
         web-0  web    running  h1    10.80.0.2  1     256M\n\
         web-1  web    running  h1    10.80.0.3  1     256M\n"
    );

    let r = tuchka(&s.socket, &["vm", "list", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let parsed: Vec<Vm> = serde_json::from_str(&r.out).expect("json list of Vm");
    assert_eq!(parsed, vms());

    let r = tuchka(&s.socket, &["-o", "json", "vm", "show", "web-1"]).await;
    let one: Vm = serde_json::from_str(&r.out).expect("one Vm");
    assert_eq!(one.name, "web-1");
}

#[tokio::test]
async fn not_found_prints_the_server_message_and_chain() {
    let s = start().await;
    let r = tuchka(&s.socket, &["vm", "show", "nope"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "error: vm \"nope\" not found (see: tuchka vm list)\n  caused by: no such row\n"
    );
}

#[tokio::test]
async fn actions_without_wait_print_the_operation() {
    let s = start().await;
    let r = tuchka(&s.socket, &["vm", "start", "web-0"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        r.out,
        "operation op-start started: vm.start vm/web-0\nfollow it with: tuchka op wait op-start\n"
    );
}

#[tokio::test]
async fn stop_with_wait_follows_the_operation_to_success() {
    let s = start().await;
    let r = tuchka(
        &s.socket,
        &["vm", "stop", "web-0", "--force", "--timeout", "5", "--wait"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "vm.stop vm/web-0: succeeded (placing)\n");
    assert_eq!(
        *s.fake.vm_stop.lock().expect("lock"),
        Some(VmStop {
            force: true,
            timeout_s: Some(5)
        })
    );
}

#[tokio::test]
async fn group_create_sends_files_and_a_failed_operation_exits_1() {
    let s = start().await;
    let ud = s.dir.join("user-data.yaml");
    std::fs::write(&ud, "#cloud-config\nhostname: x\n").expect("write");
    let key = s.dir.join("id.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3 me@laptop\n").expect("write");
    let (ud, key) = (ud.display().to_string(), key.display().to_string());
    let r = tuchka(
        &s.socket,
        &[
            "group",
            "create",
            "web",
            "--image",
            "base",
            "--count",
            "3",
            "--memory",
            "512M",
            "--disk",
            "1G",
            "--net",
            "lan",
            "--user-data",
            &ud,
            "--ssh-key",
            &key,
            "--wait",
        ],
    )
    .await;
    assert_eq!(r.code, 1, "out: {} err: {}", r.out, r.err);
    assert_eq!(
        r.err,
        "error: no host can take web-2\n  caused by: h1: 256 MiB free, 512 MiB needed\n"
    );
    let sent = s.fake.group_create.lock().expect("lock").clone();
    let sent = sent.expect("server got the group");
    assert_eq!(sent.count, 3);
    assert_eq!(sent.memory_mib, 512);
    assert_eq!(sent.disk_mib, 1024);
    assert_eq!(sent.networks, vec!["lan"]);
    assert_eq!(
        sent.user_data.as_deref(),
        Some("#cloud-config\nhostname: x\n")
    );
    assert_eq!(sent.ssh_keys, vec!["ssh-ed25519 AAAAC3 me@laptop"]);
    assert_eq!(sent.placement, Some(tuchka_api::PlacementPolicy::Spread));
}

#[tokio::test]
async fn group_create_with_a_missing_file_fails_before_calling_the_server() {
    let s = start().await;
    let r = tuchka(
        &s.socket,
        &[
            "group",
            "create",
            "web",
            "--image",
            "base",
            "--ssh-key",
            "/nonexistent/key.pub",
        ],
    )
    .await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "error: cannot read --ssh-key file \"/nonexistent/key.pub\"\n  caused by: No such file or directory (os error 2)\n"
    );
    assert!(s.fake.group_create.lock().expect("lock").is_none());
}

#[tokio::test]
async fn op_wait_on_a_failed_operation_prints_json_and_exits_1() {
    let s = start().await;
    let r = tuchka(&s.socket, &["op", "wait", "op-fail", "-o", "json"]).await;
    assert_eq!(r.code, 1);
    let op: Operation = serde_json::from_str(&r.out).expect("operation json");
    assert_eq!(op.state, OperationState::Failed);
    assert!(
        r.err.starts_with("error: no host can take web-2\n"),
        "{}",
        r.err
    );
}

#[tokio::test]
async fn console_prints_the_log() {
    let s = start().await;
    let r = tuchka(&s.socket, &["vm", "console", "web-0"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "tuchka-test-image ready\nlogin: \n");
}

#[tokio::test]
async fn image_upload_streams_the_file_and_prints_the_image() {
    let s = start().await;
    let file = s.dir.join("tiny.raw");
    let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &content).expect("write");
    let r = tuchka(&s.socket, &["image", "upload", &file.display().to_string()]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        *s.fake.uploaded.lock().expect("lock") == content,
        "server got other bytes"
    );
    assert!(r.out.starts_with("name:         tiny\n"), "{}", r.out);
    assert!(r.out.contains("format:       raw\n"), "{}", r.out);
    assert!(r.out.contains("sha256:       c0ffee"), "{}", r.out);
    assert!(
        r.out.contains("virtual size: 976.6K (1000000 bytes)\n"),
        "{}",
        r.out
    );
}

#[tokio::test]
async fn nothing_listening_says_where_and_what_to_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("tuchka.sock");
    let r = tuchka(&socket, &["host", "list"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        format!(
            "error: cannot reach tuchka at {}: No such file or directory (os error 2) \
             (is `tuchka serve` running? see ./scripts/quickstart)\n",
            socket.display()
        )
    );
}
