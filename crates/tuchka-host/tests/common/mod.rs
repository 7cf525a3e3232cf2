//! Helpers shared by the integration tests: prerequisites that fail loudly, unique `tkt…`
//! names, and Drop guards that clean up domains, bridges, dnsmasq, nft tables and pools even
//! when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const URI: &str = "qemu:///system";

/// Fail (never skip) when not root.
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "this integration test needs root (bridges, nftables, dnsmasq, libvirt)"
    );
}

/// Fail with a clear message when a tool is missing.
pub fn require_tool(name: &str, package: &str) {
    assert!(
        tuchka_host::cmd::find_tool(name).is_some(),
        "tool `{name}` is missing: apt-get install {package} (or ./scripts/install-deps)"
    );
}

/// Fail with a clear message when libvirtd is not reachable.
pub fn require_libvirt() {
    virt::error::clear_error_callback();
    match virt::connect::Connect::open(Some(URI)) {
        Ok(mut c) => {
            let _ = c.close();
        }
        Err(e) => panic!(
            "libvirtd is not reachable at {URI} ({}): start it with ./scripts/start-libvirt",
            e.message()
        ),
    }
}

/// 6 hex chars, unique per process and call.
pub fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mix = (nanos as u64)
        ^ (u64::from(std::process::id()) << 20)
        ^ (u64::from(n) << 44)
        ^ u64::from(n);
    format!("{:06x}", (mix ^ (mix >> 24)) & 0xff_ffff)
}

/// A random-looking cloud id whose first 8 hex chars are unique.
pub fn cloud_id() -> String {
    format!(
        "{}{:02x}-0000-4000-8000-{}{}",
        unique(),
        std::process::id() & 0xff,
        unique(),
        unique()
    )
}

/// Run a command, return (success, stdout).
pub fn sh(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(tuchka_host::cmd::tool(program))
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}

/// A scratch directory `/var/tmp/tkt-<unique>` (mode 0755, so libvirt-qemu can reach the pool
/// inside it), removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = PathBuf::from(format!("/var/tmp/tkt-{}", unique()));
        std::fs::create_dir(&dir).expect("create scratch dir under /var/tmp");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod scratch");
        Scratch { dir }
    }

    pub fn pool(&self) -> PathBuf {
        self.dir.join("pool")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Destroys and undefines a libvirt domain by name on drop.
pub struct DomainGuard(pub String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let _ = sh("virsh", &["-q", "-c", URI, "destroy", &self.0]);
        let _ = sh("virsh", &["-q", "-c", URI, "undefine", "--nvram", &self.0]);
    }
}

/// Removes a network's traces on drop: its dnsmasq (by pid file, checked), bridge/links and
/// the cloud's nft table.
pub struct NetGuard {
    pub links: Vec<String>,
    pub pid_files: Vec<PathBuf>,
    pub table: Option<String>,
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        for pid_file in &self.pid_files {
            kill_dnsmasq(pid_file);
        }
        for link in &self.links {
            let _ = sh("ip", &["link", "del", link]);
        }
        if let Some(t) = &self.table {
            let _ = sh("nft", &["delete", "table", "inet", t]);
        }
    }
}

/// Kill the dnsmasq named by `pid_file` if it really is one using that pid file.
pub fn kill_dnsmasq(pid_file: &Path) {
    if let Some(pid) = dnsmasq_pid(pid_file) {
        let _ = sh("kill", &[&pid.to_string()]);
    }
}

/// The pid of the live dnsmasq using `pid_file`, if any.
pub fn dnsmasq_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    tuchka_host::net::dnsmasq::cmdline_matches(&cmdline, pid_file).then_some(pid)
}

/// Whether a network device exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// `ip -j -d link show dev NAME` as JSON.
pub fn ip_link(name: &str) -> Option<serde_json::Value> {
    let (ok, out) = sh("ip", &["-j", "-d", "link", "show", "dev", name]);
    if !ok {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()?
        .get(0)
        .cloned()
}

/// IPv4 addresses of a device as "a.b.c.d/n".
pub fn ipv4_addrs(name: &str) -> Vec<String> {
    let (ok, out) = sh("ip", &["-j", "-4", "addr", "show", "dev", name]);
    if !ok {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.get(0)
        .and_then(|d| d.get("addr_info"))
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some(format!(
                        "{}/{}",
                        x.get("local")?.as_str()?,
                        x.get("prefixlen")?.as_u64()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Make a qcow2 of `mib` MiB with qemu-img (no OS in it).
pub fn make_qcow2(path: &Path, mib: u64) {
    let (ok, _) = sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &path.to_string_lossy(),
            &format!("{mib}M"),
        ],
    );
    assert!(ok, "qemu-img create {} failed", path.display());
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        std::fs::read(path).expect("read file to hash"),
    ))
}

/// Whether the console log contains `needle`.
pub fn console_has(log: &Path, needle: &str) -> bool {
    console(log).contains(needle)
}

/// `GET /` on port 80 of `ip` (the test image answers with its hostname).
pub fn http_get(ip: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = format!("{ip}:80").parse().ok()?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Poll `f` every 100 ms until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Ask the DNS server at `server` for the A record of `name`; returns the addresses.
pub fn dns_a(server: &str, name: &str) -> Vec<String> {
    use std::net::UdpSocket;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return Vec::new();
    };
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if sock.send_to(&q, (server, 53)).is_err() {
        return Vec::new();
    }
    let mut buf = [0u8; 512];
    let Ok(n) = sock.recv(&mut buf) else {
        return Vec::new();
    };
    let r = &buf[..n];
    if r.len() < 12 {
        return Vec::new();
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    let mut i = q.len(); // the question is echoed back verbatim
    let mut out = Vec::new();
    for _ in 0..answers {
        if i + 12 > r.len() {
            break;
        }
        // name: a pointer (2 bytes) in dnsmasq's answers
        i += if r[i] & 0xc0 == 0xc0 { 2 } else { break };
        let typ = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = usize::from(u16::from_be_bytes([r[i + 8], r[i + 9]]));
        i += 10;
        if typ == 1 && len == 4 && i + 4 <= r.len() {
            out.push(format!("{}.{}.{}.{}", r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    out
}

/// The project's test image, built once when missing.
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("target/testimg/tiny.qcow2");
    if !path.is_file() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir target/testimg");
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let out = std::process::Command::new(root.join("scripts/build-test-image"))
            .arg(&tmp)
            .output()
            .expect("run scripts/build-test-image");
        assert!(
            out.status.success(),
            "scripts/build-test-image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &path).expect("move the test image into place");
    }
    path
}

/// The serial console log so far (lossy UTF-8).
pub fn console(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
}

/// The `TICK <n>` counters a ticking guest printed, in order.
pub fn ticks(log: &Path) -> Vec<u64> {
    console(log)
        .lines()
        .filter_map(|l| {
            let i = l.find("TICK ")?;
            l[i + 5..].trim().parse().ok()
        })
        .collect()
}

/// The last `TICK <n>` counter.
pub fn last_tick(log: &Path) -> Option<u64> {
    ticks(log).last().copied()
}
