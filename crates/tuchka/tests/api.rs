//! The API as a script or another program sees it: TCP needs the bearer token, the OpenAPI
//! document served is the committed one, errors have the documented shape, and the CLI works
//! over TCP with `--url`/`--token`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Cloud;

fn request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n").expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let (head, body) = buf.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    // Bodies may be chunked; the JSON we check is on one line inside.
    (status, body.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn tcp_needs_the_token_and_serves_the_committed_openapi() {
    let mut c = Cloud::start("api");
    let port = free_port();
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

    let (status, body) = request(port, "GET", "/v1/hosts", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":\"Unauthorized\""), "{body}");
    let (status, _) = request(port, "GET", "/v1/hosts", Some("wrong"));
    assert_eq!(status, 401);
    let (status, body) = request(port, "GET", "/v1/hosts", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains(&c.host), "{body}");
    let (status, body) = request(port, "GET", "/v1/vms/nope", Some(&token));
    assert_eq!(status, 404);
    assert!(
        body.contains("\"code\":\"VmNotFound\"") && body.contains("\"chain\""),
        "{body}"
    );

    // The CLI over TCP.
    let url = format!("http://127.0.0.1:{port}");
    let out = std::process::Command::new(common::bin())
        .args([
            "--url", &url, "--token", &token, "host", "list", "-o", "json",
        ])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(common::bin())
        .args(["--url", &url, "host", "list"])
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
