//! Bad requests for every route of the committed OpenAPI document (`docs/openapi.json`), sent
//! to a real `tuchka serve` (a dedicated controller: no local agent, no libvirt needed) over
//! its unix socket: wrong JSON types, missing and unknown fields, invalid JSON, huge strings
//! and bodies, quotes and `<`, bad path parameters and queries. Every answer must come (no
//! panic), be no 5xx, and every 4xx must carry the stable error body
//! `{"code","message","chain"}`; bodies that cannot be right (not an object, not JSON, an
//! unknown field) must be refused with a 4xx. A fixed sweep covers every route; proptest then
//! generates more (`PROPTEST_CASES=5000 cargo test -p tuchka --test api_fuzz` for a long run).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// One operation of the OpenAPI document.
#[derive(Debug, Clone)]
struct Route {
    method: String,
    /// The path template, e.g. `/v1/networks/{name}/rules/{id}`.
    template: String,
    /// `application/json`, `application/octet-stream` or none.
    body: Option<String>,
    /// Names of its query parameters.
    query: Vec<String>,
}

fn routes() -> Vec<Route> {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json"),
        )
        .expect("docs/openapi.json"),
    )
    .expect("OpenAPI JSON");
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let body = op["requestBody"]["content"]
                .as_object()
                .and_then(|c| c.keys().next().cloned());
            let query = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "query")
                        .filter_map(|p| p["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Route {
                method: method.to_ascii_uppercase(),
                template: path.clone(),
                body,
                query,
            });
        }
    }
    out
}

/// Path parameter values no object has, and that break naming rules.
fn bad_params() -> Vec<String> {
    vec![
        "nope".into(),
        "x\"y".into(),
        "<script>alert(1)</script>".into(),
        "it's".into(),
        "..".into(),
        "%00".into(),
        "a/b".into(),
        "é-ü".into(),
        "-1".into(),
        "18446744073709551616".into(),
        "A".repeat(3000),
        " ".into(),
    ]
}

/// Percent-encode everything but unreserved characters (so `/` and `%` stay inside a segment).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn fill(template: &str, param: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map_or(rest.len(), |e| start + e + 1);
        out.push_str(&encode(param));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A body, and whether no request can be right with it (so it must be refused).
#[derive(Debug, Clone)]
struct BadBody {
    bytes: Vec<u8>,
    content_type: &'static str,
    must_refuse: bool,
}

fn json_body(v: Value, must_refuse: bool) -> BadBody {
    BadBody {
        bytes: v.to_string().into_bytes(),
        content_type: "application/json",
        must_refuse,
    }
}

fn bad_bodies() -> Vec<BadBody> {
    let huge = "<\"'>".repeat(250_000);
    vec![
        json_body(json!([]), true),
        json_body(json!("a string"), true),
        json_body(json!(12345), true),
        json_body(json!(null), true),
        json_body(json!({}), false),
        json_body(json!({"no_such_field_x": 1}), true),
        json_body(
            json!({"name": 5, "count": "many", "cidr": [], "image": {}, "size_mib": -1, "networks": "lan"}),
            false,
        ),
        json_body(
            json!({"name": "x\"y<z>", "cidr": "10.0.0.0/33", "count": 18446744073709551615u64}),
            false,
        ),
        json_body(json!({"name": huge.clone()}), false),
        BadBody {
            bytes: b"{\"name\": ".to_vec(),
            content_type: "application/json",
            must_refuse: true,
        },
        BadBody {
            bytes: vec![0xff, 0xfe, 0x00, b'{', 0x80],
            content_type: "application/json",
            must_refuse: true,
        },
        BadBody {
            bytes: b"name=x&count=2".to_vec(),
            content_type: "application/x-www-form-urlencoded",
            must_refuse: true,
        },
        BadBody {
            // Over the 2 MiB limit of JSON bodies.
            bytes: format!("{{\"name\": \"{}\"}}", "a".repeat(3 << 20)).into_bytes(),
            content_type: "application/json",
            must_refuse: true,
        },
    ]
}

fn bad_queries(route: &Route) -> Vec<String> {
    let mut out = vec![String::new(), "?after=-1&from=abc&wait=yes".into()];
    for q in &route.query {
        out.push(format!("?{q}="));
        out.push(format!("?{q}={}", encode("x\"<y>")));
        out.push(format!("?{q}=18446744073709551616"));
        out.push(format!("?{q}={}", "9".repeat(500)));
    }
    out
}

/// The answer to one request: status and, for errors, the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Send one HTTP/1.1 request on a new connection and read the answer's head and (for
/// anything but a stream) its body.
fn send(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&BadBody>,
) -> Result<Answer, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n",
            b.content_type,
            b.bytes.len()
        ));
    } else if method != "GET" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    if let Some(b) = body {
        // The server may answer before reading all of a body it refuses.
        let _ = s.write_all(&b.bytes);
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("no answer (did the server panic?): {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line (did the server panic?): {line:?}"))?;
    let (mut length, mut content_type) = (None, String::new());
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| format!("head: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse::<usize>().ok(),
                "content-type" => content_type = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if status >= 400 {
        match length {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
            }
            None => {
                let _ = r.take(1 << 20).read_to_end(&mut body);
            }
        }
    }
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

/// Check one answer; `Err` says what is wrong.
fn judge(what: &str, a: &Answer, must_refuse: bool) -> Result<(), String> {
    if a.status >= 500 {
        return Err(format!(
            "{what}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ));
    }
    if must_refuse && a.status < 400 {
        return Err(format!(
            "{what}: accepted ({}) a body that cannot be right",
            a.status
        ));
    }
    if a.status >= 400 {
        if !a.content_type.starts_with("application/json") {
            return Err(format!(
                "{what}: {} with content type {:?}: {}",
                a.status,
                a.content_type,
                String::from_utf8_lossy(&a.body)
            ));
        }
        let v: Value = serde_json::from_slice(&a.body)
            .map_err(|e| format!("{what}: {} error body is not JSON ({e})", a.status))?;
        let ok = v["code"].as_str().is_some_and(|c| !c.is_empty())
            && v["message"].as_str().is_some_and(|m| !m.is_empty())
            && v["chain"].is_array();
        if !ok {
            return Err(format!(
                "{what}: {} error body is not {{code,message,chain}}: {v}",
                a.status
            ));
        }
    }
    Ok(())
}

/// A dedicated controller in its own data directory, stopped and removed on drop.
struct Controller {
    dir: PathBuf,
    child: Child,
}

impl Controller {
    fn start() -> Controller {
        let dir = PathBuf::from(format!("/var/tmp/tuchka-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let log = std::fs::File::create(dir.join("serve.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_tuchka"))
            .args(["serve", "--no-local-agent", "--data-dir"])
            .arg(&dir)
            .env("TUCHKA_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start tuchka serve");
        let c = Controller { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if send(&c.socket(), "GET", "/v1/hosts", None).is_ok_and(|a| a.status == 200) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tuchka serve did not answer:\n{}", c.log());
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("tuchka.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn every_route_answers_bad_requests_with_a_clear_4xx() {
    let routes = routes();
    assert!(
        routes.len() >= 50,
        "the OpenAPI document lists {} operations",
        routes.len()
    );
    let c = Controller::start();
    let sock = c.socket();
    let mut failures = Vec::new();
    let mut sent = 0usize;

    // The fixed sweep: every route with every bad parameter, every route taking a body with
    // every bad body, every query with bad values.
    for r in &routes {
        let params = if r.template.contains('{') {
            bad_params()
        } else {
            vec![String::new()]
        };
        for p in &params {
            let target = fill(&r.template, p);
            let body = match r.body.as_deref() {
                Some("application/json") => Some(json_body(json!({}), false)),
                Some(_) => Some(BadBody {
                    bytes: b"not an image".to_vec(),
                    content_type: "application/octet-stream",
                    must_refuse: false,
                }),
                None => None,
            };
            let what = format!("{} {target}", r.method);
            sent += 1;
            match send(&sock, &r.method, &target, body.as_ref()) {
                Ok(a) => {
                    if let Err(e) = judge(&what, &a, false) {
                        failures.push(e);
                    }
                    // A name no object has is never found.
                    if r.template.contains('{')
                        && a.status < 400
                        && r.template != "/v1/vms/{name}/{action}"
                    {
                        failures.push(format!(
                            "{what}: {} for an object that does not exist",
                            a.status
                        ));
                    }
                }
                Err(e) => failures.push(format!("{what}: {e}")),
            }
        }
        if r.body.as_deref() == Some("application/json") {
            for b in bad_bodies() {
                let target = fill(&r.template, "nope");
                let what = format!(
                    "{} {target} with {:.60}",
                    r.method,
                    String::from_utf8_lossy(&b.bytes)
                );
                sent += 1;
                match send(&sock, &r.method, &target, Some(&b)) {
                    Ok(a) => {
                        if let Err(e) = judge(&what, &a, b.must_refuse) {
                            failures.push(e);
                        }
                    }
                    Err(e) => failures.push(format!("{what}: {e}")),
                }
            }
        }
        for q in bad_queries(r) {
            let target = format!("{}{q}", fill(&r.template, "nope"));
            if r.template == "/v1/events" {
                continue; // a stream: answers 200 and never ends
            }
            let body = (r.body.is_some()).then(|| BadBody {
                bytes: vec![0u8; 1024],
                content_type: "application/octet-stream",
                must_refuse: false,
            });
            let what = format!("{} {target}", r.method);
            sent += 1;
            match send(&sock, &r.method, &target, body.as_ref()) {
                Ok(a) => {
                    if let Err(e) = judge(&what, &a, false) {
                        failures.push(e);
                    }
                }
                Err(e) => failures.push(format!("{what}: {e}")),
            }
        }
    }

    // Generated requests: any route, any parameter, any JSON value as the body.
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,30}".prop_map(Value::from),
        "[a-z0-9\"'<>/:. -]{0,30}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let strategy = (
        0..routes.len(),
        prop_oneof!["\\PC{0,40}", "[a-z][a-z0-9-]{0,20}", "[\"'<>%/.]{1,10}"],
        value,
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let generated = runner.run(&strategy, |(i, param, body, as_text)| {
        let r = &routes[i];
        if r.template == "/v1/events" {
            return Ok(());
        }
        let target = fill(&r.template, &param);
        let b = r.body.as_ref().map(|_| BadBody {
            bytes: if as_text {
                body.to_string().into_bytes()
            } else {
                format!("{body}}}").into_bytes() // never valid JSON
            },
            content_type: "application/json",
            must_refuse: !as_text && r.body.as_deref() == Some("application/json"),
        });
        let what = format!("{} {target}", r.method);
        let a = send(&sock, &r.method, &target, b.as_ref()).map_err(TestCaseError::fail)?;
        judge(&what, &a, b.as_ref().is_some_and(|b| b.must_refuse)).map_err(TestCaseError::fail)
    });
    if let Err(e) = generated {
        failures.push(format!("generated: {e}"));
    }

    let alive = send(&sock, "GET", "/v1/hosts", None);
    assert!(
        alive.as_ref().is_ok_and(|a| a.status == 200),
        "the controller still answers after {sent} bad requests: {alive:?}"
    );
    let log = c.log();
    assert!(!log.contains("panicked"), "a handler panicked:\n{log}");
    assert!(
        failures.is_empty(),
        "{} of {sent} fixed requests (and the generated ones) were answered badly:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
