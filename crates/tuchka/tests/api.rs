//! The API as a script or another program sees it: TCP (HTTPS only) needs the bearer token,
//! the OpenAPI document served is the committed one, errors have the documented shape, and the
//! CLI works over TCP with `--url`/`--token`/`--fingerprint`.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::Cloud;

/// `curl` over HTTPS, trusting the controller's CA in `dir`: (status, body).
fn request(dir: &Path, port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(dir.join("tls/ca.crt"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("curl output");
    (status.trim().parse().expect("status"), body.to_string())
}

#[test]
fn tcp_needs_the_token_and_serves_the_committed_openapi() {
    let mut c = Cloud::start("api");
    let port = common::free_port();
    c.stop_serve();
    c.spawn_serve(&["--accel", "tcg", "--listen", &format!("127.0.0.1:{port}")]);
    let token = std::fs::read_to_string(c.dir.join("token"))
        .expect("token file")
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.dir.join("token"))
        .expect("token")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the token is readable by root only");
    let sock_mode = std::fs::metadata(c.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock_mode, 0o660);

    let (status, body) = request(&c.dir, port, "GET", "/v1/hosts", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":\"Unauthorized\""), "{body}");
    let (status, _) = request(&c.dir, port, "GET", "/v1/hosts", Some("wrong"));
    assert_eq!(status, 401);
    let (status, body) = request(&c.dir, port, "GET", "/v1/hosts", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains(&c.host), "{body}");
    let (status, body) = request(&c.dir, port, "GET", "/v1/vms/nope", Some(&token));
    assert_eq!(status, 404);
    assert!(
        body.contains("\"code\":\"VmNotFound\"") && body.contains("\"chain\""),
        "{body}"
    );

    // The CLI over TCP.
    let url = format!("https://127.0.0.1:{port}");
    let join = std::fs::read_to_string(c.dir.join("join.txt")).expect("join.txt");
    let fingerprint = join
        .split_whitespace()
        .last()
        .expect("fingerprint")
        .to_string();
    let out = std::process::Command::new(common::bin())
        .args([
            "--url",
            &url,
            "--token",
            &token,
            "--fingerprint",
            &fingerprint,
            "host",
            "list",
            "-o",
            "json",
        ])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(common::bin())
        .args(["--url", &url, "--fingerprint", &fingerprint, "host", "list"])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The served document is the committed one.
    let served = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(c.socket())
        .arg("http://localhost/v1/openapi.json")
        .output()
        .expect("curl");
    let committed = std::fs::read_to_string(common::root().join("docs/openapi.json"))
        .expect("docs/openapi.json");
    assert_eq!(String::from_utf8_lossy(&served.stdout), committed);
}

#[test]
fn the_events_stream_reports_changes() {
    let c = Cloud::start("events");
    let mut child = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "20", "--unix-socket"])
        .arg(c.socket())
        .arg("http://localhost/v1/events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(500));
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 100 + p % 50, (p / 50 + 7) % 256);
    c.ok(&["net", "create", "evnet", "--cidr", &cidr, "--wait"]);
    c.track_network("evnet");
    c.ok(&["net", "rm", "evnet", "--wait"]);
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let _ = child.wait();
    assert!(out.contains("event: operation.started"), "{out}");
    assert!(
        out.contains("event: operation.finished") && out.contains("network/evnet"),
        "{out}"
    );
}

/// `curl` on the unix socket with extra headers: (status, headers, body).
fn unix_get(c: &Cloud, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-m", "30", "-D", "-", "--unix-socket"])
        .arg(c.socket());
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn etag_of(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("etag").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no ETag in {head}"))
}

#[test]
fn an_operation_long_poll_answers_on_change_and_304_when_nothing_changed() {
    let c = Cloud::start("oppoll");
    let p = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 100 + p % 50, (p / 50 + 11) % 256);
    let run = c.ok(&[
        "net", "create", "pollnet", "--cidr", &cidr, "--wait", "-o", "json",
    ]);
    c.track_network("pollnet");
    let op = run.json();
    assert_eq!(op["state"], "succeeded", "{op}");
    let path = format!("/v1/operations/{}", op["id"].as_str().expect("id"));
    let (status, head, body) = unix_get(&c, &path, &[]);
    assert_eq!(status, 200, "{head}{body}");
    let etag = etag_of(&head);
    // A client that has seen this version waits; nothing changes, so it is told so.
    let (status, head2, body) = unix_get(
        &c,
        &format!("{path}?wait=1"),
        &[&format!("If-None-Match: {etag}")],
    );
    assert_eq!(status, 304, "{head2}{body}");
    assert_eq!(etag_of(&head2), etag);
    // A client with another version gets the operation at once.
    let (status, _, body) = unix_get(
        &c,
        &format!("{path}?wait=20"),
        &["If-None-Match: \"something-else\""],
    );
    assert_eq!(status, 200);
    let again: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(again["id"], op["id"]);
    c.ok(&["net", "rm", "pollnet", "--wait"]);
}
