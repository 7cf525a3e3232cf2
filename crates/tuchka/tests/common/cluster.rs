//! A cloud of N simulated hosts for tests and benchmarks: the multi-host harness
//! (`tuchka-testkit`), the controller in the fabric namespace serving HTTPS, and one agent per
//! host joined with the join token and the pinned fingerprint.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use tuchka_testkit::MultiHost;

use super::common;

/// A running multi-host cloud.
pub struct Cluster {
    /// The controller's data directory.
    pub dir: PathBuf,
    mh: Option<MultiHost>,
    serve: Option<Child>,
    serve_args: Vec<String>,
    agents: HashMap<String, Child>,
    join: (String, String, String),
}

impl Cluster {
    /// See the module docs.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// [`Cluster::start`] with extra `tuchka serve` arguments.
    pub fn start_with(n: usize, serve_args: &[&str]) -> Cluster {
        common::require_host();
        let mh = MultiHost::up(n).expect("multi-host harness up");
        let dir = mh.dir().join("controller");
        std::fs::create_dir_all(&dir).expect("controller dir");
        let serve_args: Vec<String> = serve_args.iter().map(|a| a.to_string()).collect();
        let serve = spawn_serve(&mh, &dir, &serve_args);
        let join_file = dir.join("join.txt");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !join_file.exists() {
            assert!(
                Instant::now() < deadline,
                "the controller wrote no join.txt"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&join_file).expect("join.txt");
        let arg = |flag: &str| -> String {
            let words: Vec<&str> = text.split_whitespace().collect();
            let i = words
                .iter()
                .position(|w| *w == flag)
                .unwrap_or_else(|| panic!("{flag} not in join.txt: {text}"));
            words[i + 1].to_string()
        };
        let join = (
            arg("--controller"),
            arg("--join-token"),
            arg("--fingerprint"),
        );
        let mut c = Cluster {
            mh: Some(mh),
            dir,
            serve: Some(serve),
            serve_args,
            agents: HashMap::new(),
            join,
        };
        let names: Vec<String> = c.mh().hosts().iter().map(|h| h.name.clone()).collect();
        for h in &names {
            c.start_agent(h);
        }
        c
    }

    /// See the module docs.
    pub fn mh(&self) -> &MultiHost {
        self.mh.as_ref().expect("harness")
    }

    /// See the module docs.
    pub fn start_agent(&mut self, host: &str) {
        self.start_agent_named(host, host);
    }

    /// Start the agent of simulated host `host` under the cloud name `name`.
    pub fn start_agent_named(&mut self, host: &str, name: &str) {
        let token = self.join.1.clone();
        self.start_agent_with(host, name, &token);
    }

    /// Start the agent of simulated host `host` under the cloud name `name` with join token
    /// `token` (e.g. one made for that host by `host join-token --host`).
    pub fn start_agent_with(&mut self, host: &str, name: &str, token: &str) {
        let mh = self.mh.as_ref().expect("harness");
        let h = mh.host(host).expect("host");
        let pool = self.pool(host);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(mh.dir().join(format!("agent-{host}.log")))
            .expect("log");
        let mut cmd = mh.command(host, common::bin()).expect("command");
        cmd.args([
            "agent",
            "--controller",
            &self.join.0,
            "--join-token",
            token,
            "--fingerprint",
            &self.join.2,
        ])
        .args([
            "--host-name",
            name,
            "--accel",
            "tcg",
            // The simulated hosts share one kernel: their /proc shows the whole machine.
            "--load-source",
            "vms",
            "--address",
            &h.fabric_ip.to_string(),
            "--pool",
        ])
        .arg(&pool)
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        let child = mh.spawn_command(&mut cmd).expect("start agent");
        self.agents.insert(host.to_string(), child);
    }

    /// PID of the agent of `host`.
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        self.agents.get(host).map(Child::id)
    }

    /// See the module docs.
    pub fn kill_agent(&mut self, host: &str) {
        if let Some(mut a) = self.agents.remove(host) {
            let _ = Command::new("kill").arg(a.id().to_string()).status();
            let _ = a.wait();
        }
    }

    /// Crash the agent of `host` (SIGKILL) and start it again at once.
    pub fn crash_agent(&mut self, host: &str) {
        if let Some(mut a) = self.agents.remove(host) {
            let _ = Command::new("kill")
                .args(["-KILL", &a.id().to_string()])
                .status();
            let _ = a.wait();
        }
        self.start_agent(host);
    }

    /// Crash the controller (SIGKILL); [`Cluster::start_controller`] starts it again.
    pub fn kill_controller(&mut self) {
        if let Some(mut s) = self.serve.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &s.id().to_string()])
                .status();
            let _ = s.wait();
        }
    }

    /// Start the controller again on its data directory (same CA, token and state) and wait
    /// until it answers.
    pub fn start_controller(&mut self) {
        assert!(self.serve.is_none(), "the controller runs already");
        self.serve = Some(spawn_serve(self.mh(), &self.dir, &self.serve_args));
        self.wait_for(
            "the controller to answer again",
            Duration::from_secs(60),
            || self.tk(&["host", "list"]).code == 0,
        );
    }

    /// See the module docs.
    pub fn tk(&self, args: &[&str]) -> common::Run {
        let out = Command::new(common::bin())
            .arg("--socket")
            .arg(self.dir.join("tuchka.sock"))
            .args(args)
            .output()
            .expect("tuchka");
        common::Run {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// See the module docs.
    pub fn ok(&self, args: &[&str]) -> common::Run {
        let r = self.tk(args);
        assert_eq!(
            r.code,
            0,
            "tuchka {} failed: {}{}\n{}",
            args.join(" "),
            r.out,
            r.err,
            self.logs()
        );
        r
    }

    /// See the module docs.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in [
            "controller/serve.log",
            "agent-h1.log",
            "agent-h2.log",
            "agent-h3.log",
        ] {
            let lines_wanted = std::env::var("TUCHKA_LOG_LINES")
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(15);
            let text = std::fs::read_to_string(self.mh().dir().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!(
                "--- {f} (tail) ---\n{}\n",
                lines[lines.len().saturating_sub(lines_wanted)..].join("\n")
            );
        }
        s
    }

    /// See the module docs.
    pub fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("timed out waiting for {what}\n{}", self.logs());
    }

    /// The pool directory of the agent of simulated host `host`.
    pub fn pool(&self, host: &str) -> PathBuf {
        self.mh().dir().join(host).join("tuchka-pool")
    }

    /// The console log of VM `id` on `host`, as its host has it (empty if there is none yet).
    pub fn console(&self, host: &str, id: &str) -> String {
        std::fs::read_to_string(self.pool(host).join("vms").join(id).join("console.log"))
            .unwrap_or_default()
    }

    /// Wait until all `n` hosts are up.
    pub fn wait_hosts_up(&self, n: usize) {
        self.wait_for(&format!("{n} hosts up"), Duration::from_secs(60), || {
            let hs = self.hosts();
            hs.len() == n && hs.iter().all(|h| h["state"] == "up")
        });
    }

    /// See the module docs.
    pub fn hosts(&self) -> Vec<Value> {
        self.ok(&["host", "list", "-o", "json"])
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// See the module docs.
    pub fn vms(&self) -> Vec<Value> {
        self.ok(&["vm", "list", "-o", "json"])
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// See the module docs.
    pub fn per_host(&self, group: &str) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for v in self.vms().iter().filter(|v| v["group"] == group) {
            *m.entry(v["host"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        m
    }
}

/// `tuchka serve` of the cluster in the fabric namespace (its log appended to
/// `controller/serve.log`).
fn spawn_serve(mh: &MultiHost, dir: &std::path::Path, serve_args: &[String]) -> Child {
    let listen = format!("{}:7480", mh.controller_ip());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .expect("log");
    let mut cmd = mh.fabric_command(common::bin());
    cmd.args([
        "serve",
        "--no-local-agent",
        "--down-after",
        "6",
        "--listen",
        &listen,
        "--data-dir",
    ])
    .arg(dir)
    .args(serve_args)
    .stdout(log.try_clone().expect("log"))
    .stderr(log);
    mh.spawn_command(&mut cmd).expect("start the controller")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.serve.is_some() {
            let _ = self.tk(&["group", "list"]); // keep the log readable; teardown destroys everything
        }
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for h in names {
            self.kill_agent(&h);
        }
        if let Some(mut s) = self.serve.take() {
            let _ = Command::new("kill").arg(s.id().to_string()).status();
            let _ = s.wait();
        }
        if let Some(mh) = self.mh.take() {
            if let Err(e) = mh.down() {
                eprintln!("multi-host teardown: {e}");
            }
        }
    }
}
