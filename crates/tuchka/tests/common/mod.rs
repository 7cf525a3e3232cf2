//! Test harness: a real `tuchka serve` (real libvirt, TCG guests, real bridges and dnsmasq) in
//! its own data directory, driven through the `tuchka` CLI the way a user would.
//!
//! Every cloud started here gets a unique host name and data directory; its networks get random
//! VNIs (so unique bridges) and the CIDRs tests pick are unique per test. On drop the harness
//! removes, through the product first and then by name, every domain, bridge, dnsmasq and file
//! it made, even when the test failed.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `tuchka` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tuchka"))
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn must_have(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    assert!(found, "`{tool}` is missing (Debian package {package}); ./scripts/install-deps installs it, ./scripts/test runs it");
}

/// Fail loudly unless libvirt and the tools the tests use are here.
pub fn require_host() {
    for (tool, pkg) in [
        ("virsh", "libvirt-clients"),
        ("qemu-img", "qemu-utils"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("genisoimage", "genisoimage"),
    ] {
        must_have(tool, pkg);
    }
    let ok = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "libvirtd is not reachable at qemu:///system: run ./scripts/start-libvirt (./scripts/test does)");
}

/// The project's test image, built once (scripts/build-test-image) and reused.
pub fn test_image() -> PathBuf {
    if let Some(p) = std::env::var_os("TUCHKA_TEST_IMAGE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TUCHKA_TEST_IMAGE={} does not exist",
            p.display()
        );
        return p;
    }
    let path = root().join("target/testimg/tiny.qcow2");
    if !path.is_file() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir target/testimg");
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let out = Command::new(root().join("scripts/build-test-image"))
            .arg(&tmp)
            .output()
            .expect("run scripts/build-test-image");
        assert!(
            out.status.success(),
            "scripts/build-test-image failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &path).expect("move test image into place");
    }
    path
}

/// A running cloud.
pub struct Cloud {
    /// Data directory.
    pub dir: PathBuf,
    /// Host name of the local agent.
    pub host: String,
    serve: Option<Child>,
    /// Names of domains seen (for forced cleanup).
    pub domains: std::cell::RefCell<Vec<String>>,
    /// Bridges seen (for forced cleanup).
    pub bridges: std::cell::RefCell<Vec<String>>,
}

/// Result of a CLI call.
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// stdout.
    pub out: String,
    /// stderr.
    pub err: String,
}

impl Run {
    /// The stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }
}

impl Cloud {
    /// Start `tuchka serve` in a fresh data directory with TCG guests.
    pub fn start(tag: &str) -> Cloud {
        Self::start_with(tag, &["--accel", "tcg"])
    }

    /// Start `tuchka serve` with these arguments (after `--data-dir` and `--host-name`).
    pub fn start_with(tag: &str, serve_args: &[&str]) -> Cloud {
        Self::start_prepared(tag, serve_args, |_| {})
    }

    /// The data directory a cloud of `tag` gets.
    pub fn dir_of(tag: &str) -> PathBuf {
        PathBuf::from(format!("/var/tmp/tuchka-test-{tag}-{}", std::process::id()))
    }

    /// [`Cloud::start_with`], calling `prepare` on the fresh data directory before `serve`
    /// starts (e.g. to mount small file systems into it).
    pub fn start_prepared(tag: &str, serve_args: &[&str], prepare: impl FnOnce(&Path)) -> Cloud {
        require_host();
        let dir = Self::dir_of(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        prepare(&dir);
        let host = format!("t{tag}{}", std::process::id());
        let mut c = Cloud {
            dir,
            host,
            serve: None,
            domains: Default::default(),
            bridges: Default::default(),
        };
        c.spawn_serve(serve_args);
        c
    }

    /// PID of the running `tuchka serve`.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(Child::id)
    }

    /// The unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("tuchka.sock")
    }

    /// (Re)start `tuchka serve` with extra arguments and wait until its host is up.
    pub fn spawn_serve(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("log");
        let child = Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--host-name", &self.host])
            .args(extra)
            .env("TUCHKA_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tuchka serve");
        self.serve = Some(child);
        self.wait_for("host up", Duration::from_secs(60), || {
            let r = self.tk(&["host", "list", "-o", "json"]);
            r.code == 0
                && r.json().as_array().is_some_and(|a| {
                    a.iter()
                        .any(|h| h["name"] == self.host.as_str() && h["state"] == "up")
                })
        });
    }

    /// Stop `tuchka serve` (SIGTERM) and wait for it to exit.
    pub fn stop_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
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
    }

    /// Run the CLI against this cloud.
    pub fn tk(&self, args: &[&str]) -> Run {
        let out: Output = Command::new(bin())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run tuchka");
        Run {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run the CLI and require success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.tk(args);
        assert_eq!(
            r.code,
            0,
            "tuchka {} failed:\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            r.out,
            r.err,
            self.log_tail()
        );
        r
    }

    /// Run the CLI and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.tk(args);
        assert_ne!(
            r.code,
            0,
            "tuchka {} should have failed:\nstdout: {}",
            args.join(" "),
            r.out
        );
        r.err
    }

    /// The last lines of the serve log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- serve.log (tail) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// `vm show -o json`.
    pub fn vm(&self, name: &str) -> Value {
        let v = self.ok(&["vm", "show", name, "-o", "json"]).json();
        if let Some(d) = v["domain"].as_str() {
            let mut ds = self.domains.borrow_mut();
            if !ds.iter().any(|x| x == d) {
                ds.push(d.to_string());
            }
        }
        v
    }

    /// First IP of a VM.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.vm(name)["addresses"][0]["ip"]
            .as_str()
            .expect("ip")
            .parse()
            .expect("ipv4")
    }

    /// Remember a network's bridge for cleanup.
    pub fn track_network(&self, name: &str) {
        let n = self.ok(&["net", "show", name, "-o", "json"]).json();
        if let Some(b) = n["bridge"].as_str() {
            self.bridges.borrow_mut().push(b.to_string());
        }
    }

    /// Poll `f` until true or panic after `limit` with `what`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "timed out after {limit:?} waiting for {what}\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // Through the product first: that is what a user does, and it must leave nothing.
        if self.serve.is_some() {
            let groups = self.tk(&["group", "list", "-o", "json"]);
            if groups.code == 0 {
                for g in groups.json().as_array().cloned().unwrap_or_default() {
                    if let Some(n) = g["name"].as_str() {
                        let _ = self.tk(&["group", "rm", n, "--wait"]);
                    }
                }
            }
            let nets = self.tk(&["net", "list", "-o", "json"]);
            if nets.code == 0 {
                for n in nets.json().as_array().cloned().unwrap_or_default() {
                    if let Some(b) = n["bridge"].as_str() {
                        self.bridges.borrow_mut().push(b.to_string());
                    }
                    if let Some(name) = n["name"].as_str() {
                        let _ = self.tk(&["net", "rm", name, "--wait"]);
                    }
                }
            }
        }
        self.stop_serve();
        // Then by name, whatever is left.
        for d in self.domains.borrow().iter() {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", d])
                .output();
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "undefine", d])
                .output();
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("pool/net")) {
            for e in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("dnsmasq.pid")) {
                    let pid = pid.trim();
                    let cmdline =
                        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if cmdline.contains("dnsmasq") && cmdline.contains(&*self.dir.to_string_lossy())
                    {
                        let _ = Command::new("kill").arg(pid).status();
                    }
                }
            }
        }
        for b in self.bridges.borrow().iter() {
            let _ = Command::new("ip").args(["link", "del", b]).output();
        }
        // The cloud's firewall table (inet tk_<cloud8>): ours by the cloud id in our database
        // (it also holds the host's underlay chain, with or without networks), or because it
        // still names one of our bridges.
        remove_cloud_table(&self.dir);
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for t in tables
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .filter(|t| t.starts_with("tk_"))
        {
            let body = Command::new("nft")
                .args(["list", "table", "inet", t])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if self
                .bridges
                .borrow()
                .iter()
                .any(|b| body.contains(&format!("\"{b}\"")))
            {
                let _ = Command::new("nft")
                    .args(["delete", "table", "inet", t])
                    .output();
            }
        }
        if std::env::var_os("TUCHKA_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// GET http://ip:80{path} with short timeouts: the status and body, or None if it did not
/// answer.
pub fn http_path(ip: Ipv4Addr, path: &str, read_timeout: Duration) -> Option<(u16, String)> {
    let addr = SocketAddr::from((ip, 80));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A size-limited file system (tmpfs) mounted at a directory until dropped.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size_mib` at `path` (made if missing).
    pub fn mount(path: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a tmpfs at {} (run as root)",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if std::env::var_os("TUCHKA_KEEP_TEST_DIR").is_some() {
            eprintln!(
                "kept: tmpfs at {} (umount it when done)",
                self.path.display()
            );
            return;
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        // The mount point, and the cloud's data directory it is in (which the cloud could not
        // remove while something was mounted in it).
        let _ = std::fs::remove_dir(&self.path);
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// GET http://ip:port/ with short timeouts; the body, or None if it did not answer.
/// The serial the guest sees on volume `id`'s disk (`/dev/disk/by-id/virtio-<serial>`): the
/// id without dashes, its first 20 characters (docs/storage.md).
pub fn volume_serial(id: &str) -> String {
    id.chars().filter(|c| *c != '-').take(20).collect()
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn http_get(ip: Ipv4Addr, port: u16) -> Option<String> {
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.trim().to_string())
}

/// Names of libvirt domains whose name starts with `prefix`.
pub fn domains_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .expect("virsh list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// Whether a network device exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Ask the DNS server at `server` for the A record of `name` (one UDP query, 2 s timeout).
pub fn dns_a(server: Ipv4Addr, name: &str) -> Option<Ipv4Addr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, (server, 53)).ok()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    let r = &buf[..n];
    let answers = u16::from_be_bytes([*r.get(6)?, *r.get(7)?]);
    if r.get(3)? & 0x0f != 0 || answers == 0 {
        return None;
    }
    // Skip the question, then walk the answers for the first A record.
    let mut i = q.len();
    for _ in 0..answers {
        if r.get(i)? & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while *r.get(i)? != 0 {
                i += 1 + *r.get(i)? as usize;
            }
            i += 1;
        }
        let rtype = u16::from_be_bytes([*r.get(i)?, *r.get(i + 1)?]);
        let len = u16::from_be_bytes([*r.get(i + 8)?, *r.get(i + 9)?]) as usize;
        i += 10;
        if rtype == 1 && len == 4 {
            return Some(Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    None
}

/// The outside world: a namespace with a web server, reachable from the host only.
pub struct Outside {
    /// Namespace name.
    pub ns: String,
    host_if: String,
    server: Option<Child>,
    dir: std::path::PathBuf,
}

pub const HOST_ADDR: &str = "198.51.100.1";
pub const OUTSIDE_ADDR: &str = "198.51.100.2";

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Outside {
    pub fn start(routes: &[&str]) -> Outside {
        let p = std::process::id() % 100_000;
        let mut o = Outside {
            ns: format!("tkto{p}"),
            host_if: format!("tkth{p}"),
            server: None,
            dir: std::path::PathBuf::from(format!("/var/tmp/tuchka-outside-{p}")),
        };
        let _ = Command::new("ip").args(["netns", "del", &o.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &o.host_if])
            .output();
        sh(&["ip", "netns", "add", &o.ns]);
        sh(&[
            "ip", "link", "add", &o.host_if, "type", "veth", "peer", "name", "eth0", "netns", &o.ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_ADDR}/24"),
            "dev",
            &o.host_if,
        ]);
        sh(&["ip", "link", "set", &o.host_if, "up"]);
        sh(&[
            "ip",
            "-n",
            &o.ns,
            "addr",
            "add",
            &format!("{OUTSIDE_ADDR}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &o.ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &o.ns, "link", "set", "lo", "up"]);
        for r in routes {
            sh(&["ip", "-n", &o.ns, "route", "add", r, "via", HOST_ADDR]);
        }
        std::fs::create_dir_all(&o.dir).expect("dir");
        std::fs::write(o.dir.join("index.html"), "outside\n").expect("index");
        let server = Command::new("ip")
            .args([
                "netns", "exec", &o.ns, "busybox", "httpd", "-f", "-p", "8000", "-h",
            ])
            .arg(&o.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox httpd in the outside namespace");
        o.server = Some(server);
        o
    }

    /// GET http://addr/ from the outside namespace; the first line of the body if it answered.
    pub fn get(&self, url: &str) -> Option<String> {
        self.get_within(url, "3")
    }

    /// [`Outside::get`] giving up after `max_time` seconds (e.g. "0.2"): a fresh connection per
    /// try, so a dropped SYN is not waited out by TCP retransmission.
    pub fn get_within(&self, url: &str, max_time: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-s",
                "--max-time",
                max_time,
                url,
            ])
            .output()
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !body.is_empty()).then_some(body)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// user-data: every 2 s, probe each target (`tcp:ADDR[:PORT]` → HTTP GET, `icmp:ADDR` → ping)
/// and print the results on the serial console.
/// Delete the firewall table (`inet tk_<cloud8>`) of the cloud whose controller data directory
/// is `data_dir`, if it exists in this network namespace.
pub fn remove_cloud_table(data_dir: &Path) {
    let Ok(id) =
        tuchka_store::Store::open(&data_dir.join("state.db")).and_then(|mut s| s.cloud_id())
    else {
        return;
    };
    let table = format!("tk_{}", tuchka_core::names::cloud8(&id));
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .output();
}

pub fn probe_script(targets: &[String]) -> String {
    format!(
        r#"#!/bin/sh
exec >/dev/ttyS0 2>&1
(
n=0
while true; do
  n=$((n+1))
  for t in {}; do
    case $t in
      tcp:*) a=${{t#tcp:}}; body=$(timeout 3 wget -q -O - "http://$a/" 2>/dev/null | head -n1)
        if [ -n "$body" ]; then echo "PROBE $n tcp $a ok $body"; else echo "PROBE $n tcp $a fail"; fi ;;
      icmp:*) a=${{t#icmp:}}
        if ping -c1 -W2 "$a" >/dev/null 2>&1; then echo "PROBE $n icmp $a ok"; else echo "PROBE $n icmp $a fail"; fi ;;
    esac
  done
  echo "PROBE-DONE $n"
  sleep 2
done
) &
"#,
        targets.join(" ")
    )
}
