//! A real browser for the dashboard's tests: Debian's `chromium`, headless, driven by
//! `chromedriver` over plain W3C WebDriver (JSON over HTTP/1.1 on a loopback port, spoken here
//! with std's `TcpStream` and `serde_json`: no WebDriver crate and no async runtime needed for
//! the dozen commands a test uses).
//!
//! The browser trusts only the controller's own server key (`--ignore-certificate-errors-spki-
//! list` with the sha256 of its SubjectPublicKeyInfo), runs in a fresh profile directory, and
//! is ended — session deleted, chromedriver killed by its PID — when [`Browser`] is dropped.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless chromium under chromedriver, with one session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

fn find_tool(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/lib/chromium".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fail loudly unless chromium and chromedriver are installed; their paths.
pub fn require_browser() -> (std::path::PathBuf, std::path::PathBuf) {
    let chromium = find_tool("chromium");
    let driver = find_tool("chromedriver");
    assert!(
        chromium.is_some() && driver.is_some(),
        "the dashboard test needs a real browser: {}{}missing (Debian packages chromium and \
         chromium-driver; ./scripts/install-deps installs them)",
        if chromium.is_none() {
            "`chromium` "
        } else {
            ""
        },
        if driver.is_none() {
            "`chromedriver` "
        } else {
            ""
        },
    );
    (chromium.expect("chromium"), driver.expect("chromedriver"))
}

/// Standard base64 (with padding).
pub fn base64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard base64 (padding and whitespace ignored).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for c in digits.chunks(4) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        for i in 0..c.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The value chromium's `--ignore-certificate-errors-spki-list` takes for the certificate in
/// PEM file `cert`: base64 of the sha256 of its SubjectPublicKeyInfo.
pub fn spki_pin(cert: &Path) -> String {
    let pem = std::fs::read(cert).expect("read the server certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM certificate");
    let cert = pem.parse_x509().expect("X.509 certificate");
    base64_encode(&Sha256::digest(cert.tbs_certificate.subject_pki.raw))
}

/// One HTTP/1.1 exchange with chromedriver: (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver may keep the connection open: read the header, then exactly the body.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "connection closed before the HTTP header",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let mut rest = raw[split + 4..].to_vec();
    match length {
        Some(len) => {
            while rest.len() < len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&buf[..n]);
            }
            rest.truncate(len);
        }
        None if head.contains("transfer-encoding: chunked") => {
            // Read until the last chunk, then decode.
            while !rest.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&buf[..n]);
            }
            let mut out = Vec::new();
            while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
                let len = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                    .unwrap_or(0);
                if len == 0 || rest.len() < eol + 2 + len {
                    break;
                }
                out.extend_from_slice(&rest[eol + 2..eol + 2 + len]);
                rest.drain(..(eol + 4 + len).min(rest.len()));
            }
            rest = out;
        }
        None => {
            s.read_to_end(&mut rest)?;
        }
    }
    Ok((status, rest))
}

impl Browser {
    /// Start chromedriver on a free loopback port and open a headless chromium session of
    /// `width`×`height` that trusts the server key whose certificate is `server_cert`.
    pub fn start(server_cert: &Path, width: u32, height: u32) -> Browser {
        let (chromium, chromedriver) = require_browser();
        let port = crate::common::free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()));
        let profile = tempfile::Builder::new()
            .prefix("tuchka-chromium-")
            .tempdir_in("/var/tmp")
            .expect("profile dir");
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http(port, "GET", "/status", None)
                .ok()
                .and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-extensions".into(),
            "--disable-background-networking".into(),
            "--hide-scrollbars".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", b._profile.path().display()),
            format!(
                "--ignore-certificate-errors-spki-list={}",
                spki_pin(server_cert)
            ),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "goog:chromeOptions": {"binary": chromium.to_string_lossy(), "args": args},
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    /// A WebDriver command; its `value`. Panics on a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.exchange(method, path, body);
        assert!(status == 200, "chromedriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    /// A WebDriver command: its status and whole answer (errors included).
    fn exchange(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, raw) = http(self.port, method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
        let v: Value = serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "chromedriver {method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&raw)
            )
        });
        (status, v)
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Navigate to `url`.
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    /// Run `script` (a function body; `arguments` are `args`) in the page; what it returns.
    pub fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The WebDriver id of the first element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<String> {
        let v = self.call(
            "POST",
            &self.s("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array()?.first()?[ELEMENT].as_str().map(String::from)
    }

    /// Wait until an element matches `css` (or panic after `limit`, with `why`); its id.
    pub fn wait_for(&self, css: &str, limit: Duration, why: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            if start.elapsed() > limit {
                let body = self.js("return document.body.innerText", json!([]));
                panic!(
                    "timed out after {limit:?} waiting for `{css}` ({why}); the page says:\n{}",
                    body.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Click the element matching `css` the way a user does (WebDriver element click).
    /// The page redraws on every live event, so an element found a moment ago can be gone
    /// (WebDriver's "stale element reference"): it is then found again by `css`.
    pub fn click(&self, css: &str) {
        for _ in 0..10 {
            let e = self.wait_for(css, Duration::from_secs(10), "to click it");
            let path = self.s(&format!("/element/{e}/click"));
            let (status, v) = self.exchange("POST", &path, None);
            if status == 200 {
                return;
            }
            assert!(
                v["value"]["error"] == "stale element reference",
                "chromedriver POST {path}: {status} {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("`{css}` was redrawn under every click");
    }

    /// Type `keys` into the focused element (WebDriver key codes work: `\u{e00c}` is Escape).
    pub fn keys(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                [
                    json!({"type": "keyDown", "value": c.to_string()}),
                    json!({"type": "keyUp", "value": c.to_string()}),
                ]
            })
            .collect();
        self.call(
            "POST",
            &self.s("/actions"),
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
    }

    /// The text (innerText) of the first element matching `css`; empty when none.
    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Resize the window.
    pub fn window(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.s("/window/rect"),
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Save a PNG screenshot of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64_decode(v.as_str().expect("screenshot base64"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = Command::new("kill")
            .arg(self.driver.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.driver.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn base64_round_trips() {
    for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
        let e = base64_encode(s.as_bytes());
        assert_eq!(base64_decode(&e), s.as_bytes(), "{s} → {e}");
    }
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
}
