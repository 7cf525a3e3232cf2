//! Remote hosts join over TCP the way a user sets them up: a dedicated controller
//! (`serve --listen … --no-local-agent`) serves HTTPS only and prints a join command; the CLI
//! reaches it with `--url https://… --token … --fingerprint …`; `tuchka agent` joins with the
//! join token and the pinned fingerprint, and stops for good when refused or revoked.
//!
//! No VMs: the agent only registers and reports (it does connect to the system libvirtd).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kill `child` (SIGTERM, then SIGKILL) and reap it.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// What a finished CLI run printed.
struct Run {
    code: i32,
    out: String,
    err: String,
}

/// A dedicated controller on 127.0.0.1 in its own data directory, and the agents started
/// against it; everything is killed (by PID) and removed on drop.
struct Site {
    dir: PathBuf,
    port: u16,
    serve: Option<Child>,
    agents: Vec<Child>,
}

impl Site {
    fn start() -> Site {
        common::require_host();
        let dir = PathBuf::from(format!("/var/tmp/tkt-join-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut site = Site {
            dir,
            port: common::free_port(),
            serve: None,
            agents: vec![],
        };
        site.spawn_serve();
        site
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// (Re)start `tuchka serve --listen` and wait until it answers over TCP.
    fn spawn_serve(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("log");
        let child = Command::new(common::bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--no-local-agent", "--down-after", "6"])
            .env("TUCHKA_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tuchka serve");
        self.serve = Some(child);
        wait_for("the controller on TCP", Duration::from_secs(30), || {
            self.dir.join("join.txt").exists()
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn stop_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            stop(&mut child);
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .to_string()
    }

    /// The join command's parts: (URL, join token, fingerprint).
    fn join_parts(&self) -> (String, String, String) {
        let join = self.read("join.txt");
        let words: Vec<&str> = join.split_whitespace().collect();
        assert_eq!(
            (words.len(), &words[..2], words[2], words[4], words[6]),
            (
                8,
                &["tuchka", "agent"][..],
                "--controller",
                "--join-token",
                "--fingerprint"
            ),
            "join.txt: {join}"
        );
        (words[3].into(), words[5].into(), words[7].into())
    }

    /// The CLI over HTTPS with the API token and `fingerprint` (none when `None`).
    fn tk(&self, fingerprint: Option<&str>, args: &[&str]) -> Run {
        let mut cmd = Command::new(common::bin());
        cmd.args(["--url", &self.url(), "--token", &self.read("token")]);
        if let Some(f) = fingerprint {
            cmd.args(["--fingerprint", f]);
        }
        let out = cmd
            .args(args)
            .env_remove("TUCHKA_FINGERPRINT")
            .env_remove("TUCHKA_SOCKET")
            .output()
            .expect("run tuchka");
        Run {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn hosts(&self, fingerprint: &str) -> Vec<Value> {
        let r = self.tk(Some(fingerprint), &["host", "list", "-o", "json"]);
        assert_eq!(r.code, 0, "host list over HTTPS failed: {}", r.err);
        serde_json::from_str::<Value>(&r.out)
            .expect("JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn host(&self, fingerprint: &str, name: &str) -> Option<Value> {
        self.hosts(fingerprint)
            .into_iter()
            .find(|h| h["name"] == name)
    }

    /// Start `tuchka agent` with these credentials; its output goes to `agent-<n>.log`.
    /// Returns its index in `agents`.
    fn spawn_agent(&mut self, name: &str, token: &str, fingerprint: &str) -> usize {
        let n = self.agents.len();
        let log = std::fs::File::create(self.dir.join(format!("agent-{n}.log"))).expect("log");
        let pool = self.dir.join("pool");
        let child = Command::new(common::bin())
            .args(["agent", "--controller", &self.url()])
            .args(["--join-token", token, "--fingerprint", fingerprint])
            .arg("--pool")
            .arg(&pool)
            .args(["--host-name", name, "--accel", "tcg"])
            .env("TUCHKA_LOG", "info")
            .env_remove("TUCHKA_JOIN_TOKEN")
            .env_remove("TUCHKA_FINGERPRINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tuchka agent");
        self.agents.push(child);
        n
    }

    fn agent_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("agent-{n}.log"))).unwrap_or_default()
    }

    /// Wait until agent `n` exits; its status.
    fn agent_exit(&mut self, n: usize, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.agents[n].try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "agent {n} still runs after {limit:?}; its log:\n{}",
            self.agent_log(n)
        );
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for a in &mut self.agents {
            stop(a);
        }
        self.stop_serve();
        // The agent ran on this machine's namespace: its host firewall table goes too.
        common::remove_cloud_table(&self.dir);
        if std::env::var_os("TUCHKA_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Send a plain-HTTP request to the port; whatever comes back before it closes.
fn plain_http(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"GET /v1/hosts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn hosts_join_over_tls_with_a_join_token_and_a_pinned_fingerprint() {
    let mut site = Site::start();
    let (url, token, fingerprint) = site.join_parts();
    assert_eq!(url, site.url());
    assert_eq!(token.len(), 64, "{token}");
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let log = site.read("serve.log");
    assert!(
        log.contains(&format!(
            "join a host with: tuchka agent --controller {url} --join-token {token} --fingerprint {fingerprint}"
        )),
        "the log prints the join command:\n{log}"
    );
    // Secrets are private, and the database holds the join token only hashed.
    for f in [
        "join.txt",
        "join-token",
        "token",
        "tls/ca.key",
        "tls/server.key",
    ] {
        assert_eq!(mode(&site.dir.join(f)), 0o600, "{f}");
    }
    for db in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(site.dir.join(db)).unwrap_or_default();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "the join token is stored in clear in {db}"
        );
    }

    // No plaintext on TCP, ever.
    let answer = plain_http(site.port);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {}",
        String::from_utf8_lossy(&answer)
    );

    // Standard tools trust it by its CA file; users still need the API token.
    let curl = |token: Option<String>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
            .arg(site.dir.join("tls/ca.crt"));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd
            .arg(format!("{url}/v1/hosts"))
            .output()
            .expect("curl (Debian package curl)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = curl(None);
    assert!(
        answer.ends_with("\n401") && answer.contains("\"code\":\"Unauthorized\""),
        "{answer}"
    );
    assert_eq!(curl(Some(site.read("token"))), "[]\n200");

    // The CLI: pinned, it works; a wrong pin and no pin fail and say why.
    assert!(site.hosts(&fingerprint).is_empty());
    let wrong = "0".repeat(64);
    let r = site.tk(Some(&wrong), &["host", "list"]);
    assert_ne!(r.code, 0);
    assert!(
        r.err.contains(&format!(
            "certificate fingerprint mismatch: expected {wrong}, got {fingerprint}"
        )),
        "{}",
        r.err
    );
    let r = site.tk(None, &["host", "list"]);
    assert_ne!(r.code, 0);
    assert!(r.err.contains("--fingerprint"), "{}", r.err);
    let r = site.tk(Some(&fingerprint), &["host", "join-token"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out.trim(), site.read("join.txt"));

    // A wrong join token: the agent says so and exits instead of retrying forever.
    let name = format!("tkt-join-{}", std::process::id());
    let bad = site.spawn_agent(&name, &"f".repeat(64), &fingerprint);
    let status = site.agent_exit(bad, Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        site.agent_log(bad).contains("join token refused"),
        "{}",
        site.agent_log(bad)
    );
    assert!(site.host(&fingerprint, &name).is_none());

    // The right token: the host is up with its capacity.
    let good = site.spawn_agent(&name, &token, &fingerprint);
    wait_for("the joined host up", Duration::from_secs(60), || {
        site.host(&fingerprint, &name)
            .is_some_and(|h| h["state"] == "up")
    });
    let h = site.host(&fingerprint, &name).expect("host");
    assert_eq!(h["accel"], "tcg");
    for figure in ["cpus", "memory_mib", "disk_mib"] {
        assert!(h[figure].as_u64().unwrap_or(0) > 0, "{figure}: {h}");
    }

    // The controller restarts with the same CA and token; the agent carries on.
    site.stop_serve();
    site.spawn_serve();
    assert_eq!(
        site.join_parts(),
        (url.clone(), token.clone(), fingerprint.clone())
    );
    let before = site.host(&fingerprint, &name).expect("host")["last_seen"].clone();
    wait_for(
        "a report after the restart",
        Duration::from_secs(60),
        || {
            site.host(&fingerprint, &name)
                .is_some_and(|h| h["state"] == "up" && h["last_seen"] != before)
        },
    );
    assert!(site.agents[good].try_wait().expect("agent").is_none());

    // Revoked: the agent's next call is refused, it stops, and the host is no longer up.
    let r = site.tk(Some(&fingerprint), &["host", "revoke", &name]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("revoked"), "{}", r.out);
    let status = site.agent_exit(good, Duration::from_secs(60));
    assert!(!status.success());
    let log = site.agent_log(good);
    assert!(log.contains("was revoked"), "{log}");
    assert_eq!(
        site.host(&fingerprint, &name).expect("host")["state"],
        "revoked"
    );

    // It may join again with the join token; once rotated, the old token admits nobody.
    let again = site.spawn_agent(&name, &token, &fingerprint);
    wait_for("the host up again", Duration::from_secs(60), || {
        site.host(&fingerprint, &name)
            .is_some_and(|h| h["state"] == "up")
    });
    stop(&mut site.agents[again]);
    let r = site.tk(
        Some(&fingerprint),
        &["host", "join-token", "--rotate", "-o", "json"],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    let rotated: Value = serde_json::from_str(&r.out).expect("JSON");
    assert_ne!(rotated["token"], token.as_str());
    assert_eq!(rotated["fingerprint"], fingerprint.as_str());
    assert_eq!(
        site.join_parts().1,
        rotated["token"].as_str().expect("token")
    );
    // A host with its identity needs no token; a new machine with the old token is refused.
    std::fs::remove_dir_all(site.dir.join("pool/identity")).expect("a new machine");
    let old = site.spawn_agent(&name, &token, &fingerprint);
    assert!(!site.agent_exit(old, Duration::from_secs(60)).success());
    assert!(
        site.agent_log(old).contains("join token refused"),
        "{}",
        site.agent_log(old)
    );
}
