//! Remote hosts join over TCP the way a user sets them up: a dedicated controller
//! (`serve --listen … --no-local-agent`) serves HTTPS only and prints a join command; the CLI
//! reaches it with `--url https://… --token … --fingerprint …`; `tuchka agent` joins with the
//! join token and the pinned fingerprint, and stops for good when refused or revoked.
//!
//! Host identity, tried as an attacker and a careless operator would: a second machine with
//! an existing host's name and the join token is refused (and the first one stays up); expired
//! and used-up tokens are refused; a renamed host keeps its VMs; `host rm --force` of a dead
//! host unblocks `group rm`, `net rm` and `image rm` and frees its VMs' addresses, and the
//! removed host's identity is refused afterwards, join token or not.
//!
//! No VMs: the agent only registers and reports (it does connect to the system libvirtd); the
//! dead host is a fake one that speaks the agent protocol from the test (curl), and dies when
//! the test stops its reports.

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
        self.spawn_agent_in("pool", name, token, fingerprint)
    }

    /// [`Site::spawn_agent`] with its own pool (another machine): `<dir>/<pool>`.
    fn spawn_agent_in(&mut self, pool: &str, name: &str, token: &str, fingerprint: &str) -> usize {
        let n = self.agents.len();
        let log = std::fs::File::create(self.dir.join(format!("agent-{n}.log"))).expect("log");
        let pool = self.dir.join(pool);
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
    // `host join-token` makes another token (shown once), for the same controller.
    let r = site.tk(Some(&fingerprint), &["host", "join-token"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let other: Vec<&str> = r.out.split_whitespace().collect();
    assert_eq!(
        (other.len(), other[3], other[7]),
        (8, url.as_str(), fingerprint.as_str()),
        "{}",
        r.out
    );
    assert_ne!(other[5], token, "a new token");
    assert!(
        r.err.contains("admits new hosts until"),
        "what it admits, on stderr: {}",
        r.err
    );

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

/// `curl` against the site's HTTPS API: (status, body).
fn curl(
    site: &Site,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
) -> (u16, String) {
    curl_at(&site.dir, site.port, method, path, bearer, body)
}

/// `curl` against the controller of data directory `dir` on `port`.
fn curl_at(
    dir: &Path,
    port: u16,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "20",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--cacert",
    ])
    .arg(dir.join("tls/ca.crt"));
    if !bearer.is_empty() {
        cmd.args(["-H", &format!("Authorization: Bearer {bearer}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let Ok(out) = cmd.arg(format!("https://127.0.0.1:{port}{path}")).output() else {
        return (0, "curl did not run (Debian package curl)".into());
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `GET` host `h`'s desired state (`?after=0`, answered at once), with `If-None-Match` when
/// given: (status, ETag, generation header, body).
fn desired_headers(
    site: &Site,
    h: &FakeHost,
    etag: Option<&str>,
) -> (u16, Option<String>, Option<u64>, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "20", "-D", "-", "--cacert"])
        .arg(site.dir.join("tls/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", h.credential)]);
    if let Some(tag) = etag {
        cmd.args(["-H", &format!("If-None-Match: {tag}")]);
    }
    let url = format!(
        "https://127.0.0.1:{}/v1/agent/hosts/{}/desired?after=0",
        site.port, h.id
    );
    let out = cmd.arg(url).output().expect("curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let generation = header("tuchka-generation").and_then(|g| g.parse().ok());
    (status, header("etag"), generation, body.to_string())
}

fn fake_facts() -> Value {
    serde_json::to_value(tuchka_api::agent::HostFacts {
        cpus: 8,
        memory_mib: 16384,
        disk_mib: 100_000,
        disk_free_mib: 90_000,
        accel: "tcg".into(),
        accel_reason: "a fake host of the test".into(),
        ..Default::default()
    })
    .expect("facts")
}

/// A host that speaks the agent protocol from the test (curl over HTTPS): it registers, then
/// every second reports the VMs it is asked to run as running (it runs nothing), and dies
/// when told to.
struct FakeHost {
    id: String,
    credential: String,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reporter: Option<std::thread::JoinHandle<()>>,
}

impl FakeHost {
    /// Register as `name` with `token` (and `identity`, when given): (status, body).
    fn register(
        site: &Site,
        name: &str,
        token: &str,
        identity: Option<(&str, &str)>,
    ) -> (u16, String) {
        let body = serde_json::json!({
            "name": name,
            "join_token": token,
            "facts": fake_facts(),
            "identity": identity.map(|(id, cred)| serde_json::json!({"host_id": id, "credential": cred})),
        });
        curl(site, "POST", "/v1/agent/register", "", Some(&body))
    }

    fn join(site: &Site, name: &str, token: &str) -> FakeHost {
        let (code, body) = FakeHost::register(site, name, token, None);
        assert_eq!(code, 200, "{name} joins: {body}");
        let reg: Value = serde_json::from_str(&body).expect("JSON");
        let mut h = FakeHost {
            id: reg["host_id"].as_str().expect("id").to_string(),
            credential: reg["credential"].as_str().expect("credential").to_string(),
            alive: Default::default(),
            reporter: None,
        };
        h.start_reporting(site);
        h
    }

    /// One pass (every second while alive): it runs every VM its desired state names (it
    /// reports them `running`) and has nothing else (removals are done at once).
    fn report_at(dir: &Path, port: u16, id: &str, credential: &str) -> (u16, String) {
        let desired_path = format!("/v1/agent/hosts/{id}/desired?after=0");
        let (_, desired) = curl_at(dir, port, "GET", &desired_path, credential, None);
        let desired: Value = serde_json::from_str(&desired).unwrap_or_default();
        let vms: Vec<Value> = desired["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                serde_json::json!({
                    "id": v["id"], "state": "running", "error": null, "reboot_seq": 0, "domain": true,
                })
            })
            .collect();
        let report = serde_json::json!({
            "generation": desired["generation"].as_u64().unwrap_or(0), "facts": fake_facts(),
            "vms": vms, "networks": [], "cached_images": [],
        });
        curl_at(
            dir,
            port,
            "POST",
            &format!("/v1/agent/hosts/{id}/report"),
            credential,
            Some(&report),
        )
    }

    fn start_reporting(&mut self, site: &Site) {
        use std::sync::atomic::Ordering;
        self.alive.store(true, Ordering::SeqCst);
        let (alive, dir, port) = (self.alive.clone(), site.dir.clone(), site.port);
        let (id, credential) = (self.id.clone(), self.credential.clone());
        self.reporter = Some(std::thread::spawn(move || {
            while alive.load(Ordering::SeqCst) {
                let _ = FakeHost::report_at(&dir, port, &id, &credential);
                std::thread::sleep(Duration::from_millis(1000));
            }
        }));
    }

    /// The machine dies: no more reports.
    fn die(&mut self) {
        self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.reporter.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.die();
    }
}

fn json_of(r: &Run) -> Value {
    assert_eq!(r.code, 0, "{}", r.err);
    serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("{e}: {}", r.out))
}

#[test]
fn a_second_machine_with_a_hosts_name_is_refused_and_tokens_expire_or_are_used_up() {
    let mut site = Site::start();
    let (_, token, fp) = site.join_parts();
    let name = format!("tkt-id-{}", std::process::id());
    let host_up = |site: &Site, n: &str| site.host(&fp, n).is_some_and(|h| h["state"] == "up");

    let first = site.spawn_agent(&name, &token, &fp);
    wait_for("the first machine up", Duration::from_secs(60), || {
        host_up(&site, &name)
    });
    let id = site.host(&fp, &name).expect("host")["id"].clone();

    // A second machine (its own pool, no identity) started with the same --host-name and the
    // join token: refused at once, it says why and exits; nothing changes for the first.
    let second = site.spawn_agent_in("pool-2", &name, &token, &fp);
    assert!(!site.agent_exit(second, Duration::from_secs(60)).success());
    let log = site.agent_log(second);
    assert!(log.contains("is taken by another host"), "{log}");
    let seen = site.host(&fp, &name).expect("host")["last_seen"].clone();
    wait_for(
        "the first machine still reporting",
        Duration::from_secs(30),
        || {
            site.host(&fp, &name)
                .is_some_and(|h| h["state"] == "up" && h["last_seen"] != seen && h["id"] == id)
        },
    );
    assert!(site.agents[first].try_wait().expect("agent").is_none());
    let log = site.agent_log(first);
    assert!(
        !log.contains("credential of host"),
        "the first agent was never refused: {log}"
    );

    // Renamed, it is the same host; it needs no token (a wrong one is never looked at).
    stop(&mut site.agents[first]);
    let renamed = format!("{name}-b");
    let again = site.spawn_agent(&renamed, &"f".repeat(64), &fp);
    wait_for("the renamed host up", Duration::from_secs(60), || {
        host_up(&site, &renamed)
    });
    assert_eq!(site.host(&fp, &renamed).expect("host")["id"], id);
    assert!(site.host(&fp, &name).is_none());
    stop(&mut site.agents[again]);

    // Reinstalled (its identity lost): a fresh join token does not give it its name back; a
    // token made for that host does, as the same host.
    std::fs::remove_dir_all(site.dir.join("pool/identity")).expect("reinstalled");
    let r = site.tk(Some(&fp), &["host", "join-token", "-o", "json"]);
    let fresh = json_of(&r)["token"].as_str().expect("token").to_string();
    let lost = site.spawn_agent(&renamed, &fresh, &fp);
    assert!(!site.agent_exit(lost, Duration::from_secs(60)).success());
    let log = site.agent_log(lost);
    assert!(
        log.contains(&format!("join-token --host {renamed}")),
        "{log}"
    );
    let r = site.tk(Some(&fp), &["host", "join-token", "--host", &renamed]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.err.contains(&format!("admits host {renamed} again")),
        "{}",
        r.err
    );
    let for_it = r.out.split_whitespace().nth(5).expect("token").to_string();
    let back = site.spawn_agent(&renamed, &for_it, &fp);
    wait_for("the reinstalled host up", Duration::from_secs(60), || {
        host_up(&site, &renamed)
    });
    assert_eq!(site.host(&fp, &renamed).expect("host")["id"], id);
    stop(&mut site.agents[back]);

    // An expired token is refused, and says so.
    let r = site.tk(
        Some(&fp),
        &["host", "join-token", "--ttl", "1s", "-o", "json"],
    );
    let short = json_of(&r)["token"].as_str().expect("token").to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let late = site.spawn_agent_in("pool-3", &format!("{name}-c"), &short, &fp);
    assert!(!site.agent_exit(late, Duration::from_secs(60)).success());
    let log = site.agent_log(late);
    assert!(log.contains("expired at"), "{log}");
    assert!(site.host(&fp, &format!("{name}-c")).is_none());

    // A single-use token admits one machine; the next one with it is refused.
    let r = site.tk(Some(&fp), &["host", "join-token", "--single-use"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("admits one new host"), "{}", r.err);
    let once = r.out.split_whitespace().nth(5).expect("token").to_string();
    let d = site.spawn_agent_in("pool-4", &format!("{name}-d"), &once, &fp);
    wait_for("the single-use host up", Duration::from_secs(60), || {
        host_up(&site, &format!("{name}-d"))
    });
    let e = site.spawn_agent_in("pool-5", &format!("{name}-e"), &once, &fp);
    assert!(!site.agent_exit(e, Duration::from_secs(60)).success());
    let log = site.agent_log(e);
    assert!(
        log.contains("single-use") && log.contains("used it"),
        "{log}"
    );
    assert!(site.host(&fp, &format!("{name}-e")).is_none());
    stop(&mut site.agents[d]);
    // Bad lifetimes are refused by the CLI and the API alike.
    assert_ne!(
        site.tk(Some(&fp), &["host", "join-token", "--ttl", "0s"])
            .code,
        0
    );
    let r = site.tk(Some(&fp), &["host", "join-token", "--ttl", "9999h"]);
    assert!(r.err.contains("30 days"), "{}", r.err);
}

#[test]
fn removing_a_dead_host_frees_what_its_vms_held_and_its_identity_is_refused() {
    let mut site = Site::start();
    let (_, token, fp) = site.join_parts();
    let tk = |args: &[&str]| site.tk(Some(&fp), args);
    let ok = |args: &[&str]| {
        let r = tk(args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.err);
        r
    };
    let image = site.dir.join("tiny.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);

    // The host that will die has the network's gateway and every VM.
    let mut ghost = FakeHost::join(&site, "ghost", &token);
    wait_for("ghost up", Duration::from_secs(30), || {
        site.host(&fp, "ghost").is_some_and(|h| h["state"] == "up")
    });
    ok(&["net", "create", "app", "--cidr", "10.77.0.0/24"]);
    ok(&[
        "group", "create", "web", "--image", "tiny", "--count", "2", "--net", "app", "--wait",
    ]);
    ok(&[
        "group", "create", "db", "--image", "tiny", "--net", "app", "--wait",
    ]);
    let ip = |vm: &str| -> String {
        json_of(&tk(&["vm", "show", vm, "-o", "json"]))["addresses"][0]["ip"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let held: Vec<String> = ["web-0", "web-1", "db-0"].iter().map(|v| ip(v)).collect();
    assert!(held.iter().all(|a| a.starts_with("10.77.0.")), "{held:?}");

    // Its desired state, read again with the ETag it came with, is a bodiless 304 (at the
    // cloud's generation); after a change that concerns it, the new content with a new ETag.
    let desired = |etag: Option<&str>| desired_headers(&site, &ghost, etag);
    let (code, etag, gen1, body) = desired(None);
    assert_eq!(code, 200, "{body}");
    let etag = etag.expect("an ETag on the desired state");
    assert!(body.contains("web-0"), "{body}");
    let (code, etag2, gen2, body) = desired(Some(&etag));
    assert_eq!((code, body.as_str()), (304, ""), "unchanged: no body");
    assert_eq!(etag2.as_deref(), Some(etag.as_str()));
    assert!(gen2.is_some() && gen2 >= gen1, "{gen1:?} → {gen2:?}");
    let rule = json_of(&ok(&[
        "net",
        "rule",
        "add",
        "app",
        "--allow",
        "tcp:80",
        "--from",
        "0.0.0.0/0",
        "-o",
        "json",
    ]));
    let (code, etag3, _, body) = desired(Some(&etag));
    assert_eq!(code, 200, "changed: {body}");
    assert!(etag3.is_some_and(|t| t != etag), "a new ETag");
    let d: Value = serde_json::from_str(&body).expect("desired state");
    assert!(
        d["networks"][0]["ingress"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "the rule is in it: {body}"
    );
    ok(&["net", "rule", "rm", "app", rule["id"].as_str().expect("id")]);

    // Renamed (its identity, no token): the same host with the same VMs.
    let (code, body) =
        FakeHost::register(&site, "ghost-2", "", Some((&ghost.id, &ghost.credential)));
    assert_eq!(code, 200, "{body}");
    let h = site.host(&fp, "ghost-2").expect("renamed");
    assert_eq!(h["id"], ghost.id.as_str());
    let mut vms: Vec<String> = h["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    vms.sort();
    assert_eq!(vms, ["db-0", "web-0", "web-1"]);

    // A second host joins; then the first dies.
    let keeper = FakeHost::join(&site, "keeper", &token);
    ghost.die();
    wait_for("ghost-2 down", Duration::from_secs(30), || {
        site.host(&fp, "ghost-2")
            .is_some_and(|h| h["state"] == "down")
    });
    assert!(site.host(&fp, "keeper").is_some_and(|h| h["state"] == "up"));

    // What it holds up: group rm waits (and says on what), image rm and net rm are refused.
    let op = json_of(&tk(&["group", "rm", "web", "-o", "json"]));
    let op_id = op["id"].as_str().expect("op").to_string();
    wait_for(
        "group rm to say what it waits on",
        Duration::from_secs(30),
        || {
            let o = json_of(&tk(&["op", "show", &op_id, "-o", "json"]));
            o["state"] == "running"
                && o["message"].as_str().is_some_and(|m| {
                    m.contains("wait on host ghost-2, which is down") && m.contains("--force")
                })
        },
    );
    let r = tk(&["image", "rm", "tiny"]);
    assert!(
        r.code != 0 && r.err.contains("is used by group(s)"),
        "{}",
        r.err
    );
    let r = tk(&["net", "rm", "app"]);
    assert!(r.code != 0 && r.err.contains("is used by"), "{}", r.err);
    // host rm without --force is refused and says what --force does; the live host keeps it all.
    let r = tk(&["host", "rm", "ghost-2"]);
    assert!(
        r.code != 0 && r.err.contains("--force") && r.err.contains("lost"),
        "{}",
        r.err
    );

    let r = ok(&["host", "rm", "ghost-2", "--force", "-o", "json"]);
    let removed: Value = serde_json::from_str(&r.out).expect("JSON");
    assert_eq!(
        removed["lost_vms"],
        serde_json::json!(["db-0"]),
        "{removed}"
    );
    let mut gone: Vec<String> =
        serde_json::from_value(removed["removed_vms"].clone()).expect("list");
    gone.sort();
    assert_eq!(gone, ["web-0", "web-1"]);
    assert_eq!(
        removed["freed_addresses"].as_array().map(Vec::len),
        Some(3),
        "{removed}"
    );
    assert!(site.host(&fp, "ghost-2").is_none());

    // The group rm it held up completes; the lost VM says so and is removed at once.
    wait_for("group rm to finish", Duration::from_secs(30), || {
        json_of(&tk(&["op", "show", &op_id, "-o", "json"]))["state"] == "succeeded"
    });
    assert_ne!(tk(&["group", "show", "web"]).code, 0);
    let db0 = json_of(&tk(&["vm", "show", "db-0", "-o", "json"]));
    assert_eq!(
        (db0["state"].as_str(), db0["host"].as_str()),
        (Some("lost"), Some("ghost-2")),
        "{db0}"
    );
    assert_eq!(db0["addresses"], serde_json::json!([]));
    let r = tk(&["vm", "start", "db-0"]);
    assert!(r.code != 0 && r.err.contains("is lost"), "{}", r.err);

    // Its addresses are free: a new VM (on the live host) gets one of them.
    ok(&[
        "group", "create", "again", "--image", "tiny", "--net", "app",
    ]);
    let new_ip = ip("again-0");
    assert!(
        held.contains(&new_ip),
        "{new_ip} not one of the freed {held:?}"
    );
    ok(&["group", "rm", "again", "--wait"]);
    ok(&["group", "rm", "db", "--wait"]);
    // And what it blocked goes: the network (its gateway moved to the live host), the image.
    ok(&["net", "rm", "app", "--wait"]);
    ok(&["image", "rm", "tiny"]);

    // The removed machine comes back: its identity is refused, with or without a join token.
    let (code, body) = curl(
        &site,
        "GET",
        &format!("/v1/agent/hosts/{}/desired", ghost.id),
        &ghost.credential,
        None,
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"code\":\"HostRemoved\""), "{body}");
    let (code, body) = FakeHost::register(
        &site,
        "ghost-2",
        &token,
        Some((&ghost.id, &ghost.credential)),
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("HostRemoved"), "{body}");
    // A real agent with that identity in its pool stops and says why.
    let pool = site.dir.join("pool-ghost/identity");
    std::fs::create_dir_all(&pool).expect("pool");
    std::fs::write(
        pool.join("host.json"),
        serde_json::json!({"host_id": ghost.id, "credential": ghost.credential}).to_string(),
    )
    .expect("identity");
    let back = site.spawn_agent_in("pool-ghost", "ghost-2", &token, &fp);
    assert!(!site.agent_exit(back, Duration::from_secs(60)).success());
    let log = site.agent_log(back);
    assert!(log.contains("was removed from this cloud"), "{log}");
    assert!(site.host(&fp, "ghost-2").is_none());
    drop(keeper);
}
