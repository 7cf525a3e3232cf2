//! DHCP and DNS of one network on its gateway host: a dnsmasq per network.
//!
//! Render (pure): [`dnsmasq_args`], [`render_dhcp_hosts`], [`render_addn_hosts`]. Apply: the
//! files are written atomically into `<pool>/net/<name>/`, dnsmasq is started daemonized (it
//! outlives the agent), reloaded with SIGHUP when the reservations change, and restarted when
//! its arguments change. A pid from the pid file is trusted only if `/proc/<pid>/cmdline` is a
//! dnsmasq with our `--pid-file=` argument, so a recycled pid is never signalled.
//!
//! Guests talk to dnsmasq, so it runs **unprivileged**: it starts as root (to bind ports 53
//! and 67, and to open its files), then becomes [`DnsmasqUser`] — `tuchka-dnsmasq` where
//! `scripts/install` made that user, else `nobody` — keeping only the network capabilities
//! DHCP needs. What it opens as root stays usable: the lease file (rewritten through the open
//! descriptor; the agent rewrites it itself only with dnsmasq stopped), the pid file and the
//! log (chowned to the user). On SIGHUP it re-reads the hosts files as the user: they are
//! world-readable in a traversable directory (the pool must be traversable for qemu anyway).
//!
//! Its **log is bounded**, because guests can make it write (a DHCP request from an unknown
//! MAC is one line, and a guest can send thousands a second): dnsmasq runs under
//! `RLIMIT_FSIZE` = [`file_limit`] (with `SIGXFSZ` ignored, so a write past it fails instead of
//! killing dnsmasq), so `dnsmasq.log` can never grow beyond it, whatever the guests do and even
//! with the agent stopped; and on every pass the agent rotates a log that reached half its
//! limit ([`rotate_log`]: `dnsmasq.log` → `dnsmasq.log.1`, a fresh file owned by the user,
//! SIGUSR2 to reopen). So a network's dnsmasq logs take at most twice the limit on disk, and
//! the newest lines are kept unless a flood outruns a pass.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, test_kill_process, Pid, Signal};
use tuchka_api::agent::DhcpHost;

use crate::cmd;
use crate::domain_xml::is_mac;
use tuchka_core::ipam::Cidr;

/// Lease time handed out (reservations are static, so this only paces renewals).
pub const LEASE_TIME: &str = "1h";

/// Default bound of a network's dnsmasq log, bytes.
pub const DEFAULT_LOG_LIMIT: u64 = 1024 * 1024;

/// Bytes a lease file line can take, at most, for one address (`expiry mac ip name
/// client-id`, the name up to 63 bytes, a long client-id).
const LEASE_LINE_MAX: u64 = 512;

/// The dedicated user dnsmasq runs as when it exists (`scripts/install` creates it).
pub const DEDICATED_USER: &str = "tuchka-dnsmasq";

/// Pure: the file size limit dnsmasq runs under for network `net` with a log bound of
/// `log_limit`: the bound, or more when the lease file of a large network could need more.
pub fn file_limit(log_limit: u64, net: &Cidr) -> u64 {
    let addresses = 1u64 << (32 - u32::from(net.prefix()));
    log_limit.max(addresses * LEASE_LINE_MAX)
}

/// Who dnsmasq runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqUser {
    /// `--user`.
    pub user: String,
    /// `--group`.
    pub group: String,
}

impl DnsmasqUser {
    /// Pure: [`DEDICATED_USER`] (with its group) if `passwd` lists it, else `nobody` with
    /// `nogroup` (Debian) or `nobody`; `passwd` and `group` as in `/etc/passwd`, `/etc/group`.
    pub fn pick(passwd: &str, group: &str) -> Self {
        let has = |file: &str, name: &str| {
            file.lines()
                .any(|l| l.split(':').next().is_some_and(|n| n == name))
        };
        if has(passwd, DEDICATED_USER) {
            let group = if has(group, DEDICATED_USER) {
                DEDICATED_USER
            } else if has(group, "nogroup") {
                "nogroup"
            } else {
                "nobody"
            };
            return DnsmasqUser {
                user: DEDICATED_USER.to_string(),
                group: group.to_string(),
            };
        }
        let group = if has(group, "nogroup") {
            "nogroup"
        } else {
            "nobody"
        };
        DnsmasqUser {
            user: "nobody".to_string(),
            group: group.to_string(),
        }
    }

    /// The user of this system (from `/etc/passwd` and `/etc/group`).
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self::pick(&read("/etc/passwd"), &read("/etc/group"))
    }
}

/// The files of one network's dnsmasq, all inside its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqFiles {
    /// `<dir>/dnsmasq.pid`
    pub pid: PathBuf,
    /// `<dir>/leases`
    pub leases: PathBuf,
    /// `<dir>/dhcp-hosts` (`--dhcp-hostsfile`)
    pub dhcp_hosts: PathBuf,
    /// `<dir>/hosts` (`--addn-hosts`)
    pub addn_hosts: PathBuf,
    /// `<dir>/dnsmasq.log` (`--log-facility`)
    pub log: PathBuf,
    /// `<dir>/dnsmasq.stderr` (startup errors)
    pub stderr: PathBuf,
}

impl DnsmasqFiles {
    /// The files under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        DnsmasqFiles {
            pid: dir.join("dnsmasq.pid"),
            leases: dir.join("leases"),
            dhcp_hosts: dir.join("dhcp-hosts"),
            addn_hosts: dir.join("hosts"),
            log: dir.join("dnsmasq.log"),
            stderr: dir.join("dnsmasq.stderr"),
        }
    }
}

/// Everything the arguments are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqConfig {
    /// Network name; also the DNS domain.
    pub domain: String,
    /// Bridge to serve on.
    pub bridge: String,
    /// The network.
    pub net: Cidr,
    /// Gateway address (on the bridge): DNS server, router and listen address.
    pub gateway: Ipv4Addr,
    /// Where the files live.
    pub files: DnsmasqFiles,
    /// Who it runs as.
    pub user: DnsmasqUser,
}

/// The dnsmasq command line (without the program name), pure.
pub fn dnsmasq_args(c: &DnsmasqConfig) -> Vec<String> {
    let p = |path: &PathBuf| path.to_string_lossy().into_owned();
    vec![
        "--conf-file=/dev/null".to_string(),
        "--bind-interfaces".to_string(),
        format!("--interface={}", c.bridge),
        "--except-interface=lo".to_string(),
        format!("--listen-address={}", c.gateway),
        format!(
            "--dhcp-range={},static,{},{LEASE_TIME}",
            c.net.network(),
            c.net.netmask()
        ),
        "--dhcp-authoritative".to_string(),
        format!("--dhcp-hostsfile={}", p(&c.files.dhcp_hosts)),
        format!("--dhcp-leasefile={}", p(&c.files.leases)),
        format!("--dhcp-option=option:router,{}", c.gateway),
        format!("--dhcp-option=option:dns-server,{}", c.gateway),
        "--no-hosts".to_string(),
        format!("--addn-hosts={}", p(&c.files.addn_hosts)),
        format!("--domain={}", c.domain),
        format!("--local=/{}/", c.domain),
        "--no-resolv".to_string(),
        format!("--pid-file={}", p(&c.files.pid)),
        format!("--log-facility={}", p(&c.files.log)),
        format!("--user={}", c.user.user),
        format!("--group={}", c.user.group),
    ]
}

/// Pure: a DNS label / host name we accept: 1–63 of `[A-Za-z0-9-]`, not starting or ending
/// with `-`.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Check every reservation (a bad line would break the whole file for dnsmasq).
pub fn validate_hosts(net: &Cidr, hosts: &[DhcpHost]) -> Result<(), String> {
    for h in hosts {
        if !is_mac(&h.mac) {
            return Err(format!(
                "reservation {:?}: MAC {:?} is not of the form 52:54:00:12:34:56",
                h.name, h.mac
            ));
        }
        let ip: Ipv4Addr = h.ip.parse().map_err(|_| {
            format!(
                "reservation {:?}: {:?} is not an IPv4 address",
                h.name, h.ip
            )
        })?;
        if !net.contains(ip) {
            return Err(format!("reservation {:?}: {ip} is outside {net}", h.name));
        }
        if !is_hostname(&h.name) {
            return Err(format!(
                "reservation {:?}: not a valid host name (letters, digits, '-')",
                h.name
            ));
        }
    }
    Ok(())
}

/// Reservations in address order (unparsable addresses last; they are refused by
/// [`validate_hosts`] anyway), so the files only change when the reservations do.
fn sorted(hosts: &[DhcpHost]) -> Vec<&DhcpHost> {
    let mut v: Vec<&DhcpHost> = hosts.iter().collect();
    v.sort_by_key(|h| {
        (
            h.ip.parse::<Ipv4Addr>().map_or(u32::MAX, u32::from),
            h.mac.to_ascii_lowercase(),
            h.name.clone(),
        )
    });
    v
}

/// `--dhcp-hostsfile` contents: `mac,ip,name` per line, sorted (pure).
pub fn render_dhcp_hosts(hosts: &[DhcpHost]) -> String {
    sorted(hosts)
        .into_iter()
        .map(|h| format!("{},{},{}\n", h.mac.to_ascii_lowercase(), h.ip, h.name))
        .collect()
}

/// Pure: the lease file without the leases that no reservation backs any more (a removed VM's
/// address, now reserved for another MAC or for nobody), and how many were dropped. dnsmasq
/// will not hand a reserved address to a new MAC while another MAC holds a lease on it, so an
/// address freed by one VM and given to the next would otherwise get no answer until the old
/// lease expired. Lines: `expiry mac ip name client-id`.
pub fn without_stale_leases(leases: &str, hosts: &[DhcpHost]) -> (String, usize) {
    let mut kept = String::new();
    let mut dropped = 0;
    for line in leases.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let backed = match (f.get(1), f.get(2)) {
            (Some(mac), Some(ip)) => hosts
                .iter()
                .any(|h| h.mac.eq_ignore_ascii_case(mac) && h.ip == *ip),
            _ => true,
        };
        if backed {
            kept.push_str(line);
            kept.push('\n');
        } else {
            dropped += 1;
        }
    }
    (kept, dropped)
}

/// `--addn-hosts` contents: `ip name.domain name` per line, sorted (pure).
pub fn render_addn_hosts(hosts: &[DhcpHost], domain: &str) -> String {
    sorted(hosts)
        .into_iter()
        .map(|h| format!("{} {}.{domain} {}\n", h.ip, h.name, h.name))
        .collect()
}

/// Pure: whether a `/proc/<pid>/cmdline` (NUL-separated) is a dnsmasq using `pid_file`.
pub fn cmdline_matches(cmdline: &[u8], pid_file: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let want = format!("--pid-file={}", pid_file.to_string_lossy());
    args.first().is_some_and(|a0| a0.ends_with(b"dnsmasq")) && args.contains(&want.as_bytes())
}

/// Pure: the arguments (after argv\[0\]) of a cmdline.
pub fn cmdline_args(cmdline: &[u8]) -> Vec<String> {
    cmdline
        .split(|b| *b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Why dnsmasq could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum DnsmasqError {
    /// It did not start.
    #[error("dnsmasq did not start")]
    Start(#[source] cmd::CommandError),
    /// It started but wrote no live pid.
    #[error("dnsmasq started but {0} names no running dnsmasq")]
    NoPid(PathBuf),
    /// A signal could not be sent.
    #[error("cannot signal dnsmasq pid {pid}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The stderr file could not be created.
    #[error("cannot create {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The running dnsmasq of these files: `(pid, its arguments)`.
pub fn running(files: &DnsmasqFiles) -> Option<(i32, Vec<String>)> {
    let pid: i32 = std::fs::read_to_string(&files.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !cmdline_matches(&cmdline, &files.pid) {
        return None;
    }
    // A zombie still has a cmdline file, but an empty one; cmdline_matches already failed then.
    Some((pid, cmdline_args(&cmdline)))
}

fn signal(pid: i32, sig: Signal) -> Result<(), DnsmasqError> {
    let p = Pid::from_raw(pid).ok_or(DnsmasqError::Signal {
        pid,
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    match kill_process(p, sig) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(DnsmasqError::Signal {
            pid,
            source: e.into(),
        }),
    }
}

/// Ask dnsmasq to re-read its hosts files.
pub fn reload(pid: i32) -> Result<(), DnsmasqError> {
    signal(pid, Signal::HUP)
}

/// Start dnsmasq with `args` under a file size limit of `file_limit` bytes (see the module
/// docs); returns its pid. dnsmasq forks into the background (and calls setsid) once it is
/// ready; the foreground process's exit status reports startup errors.
pub fn start(files: &DnsmasqFiles, args: &[String], file_limit: u64) -> Result<i32, DnsmasqError> {
    let stderr = std::fs::File::create(&files.stderr).map_err(|source| DnsmasqError::Io {
        path: files.stderr.clone(),
        source,
    })?;
    // `trap '' XFSZ` makes the signal ignored, and an ignored signal stays ignored across
    // exec; prlimit sets the limit and execs dnsmasq (so its cmdline is dnsmasq's own).
    let status = Command::new(cmd::tool("sh"))
        .args(["-c", "trap '' XFSZ && exec \"$@\"", "sh"])
        .arg(cmd::tool("prlimit"))
        .arg(format!("--fsize={file_limit}"))
        .arg("--")
        .arg(cmd::tool("dnsmasq"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .map_err(|source| {
            DnsmasqError::Start(cmd::CommandError::Spawn {
                program: "dnsmasq".into(),
                source,
            })
        })?;
    if !status.success() {
        let err = std::fs::read_to_string(&files.stderr).unwrap_or_default();
        return Err(DnsmasqError::Start(cmd::CommandError::Failed {
            command: cmd::display("dnsmasq", args),
            status: status.to_string(),
            stderr: err.trim().to_string(),
        }));
    }
    // The pid file is written before the parent exits; allow a moment anyway.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some((pid, _)) = running(files) {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            return Err(DnsmasqError::NoPid(files.pid.clone()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rotate the log of the dnsmasq `pid` (running with `files`) if it holds `at` bytes or more:
/// `dnsmasq.log` becomes `dnsmasq.log.1` (replacing the previous one), a new empty log owned
/// by dnsmasq's user is put in its place and dnsmasq is told to reopen it (SIGUSR2). Returns
/// whether it rotated.
pub fn rotate_log(files: &DnsmasqFiles, pid: i32, at: u64) -> Result<bool, DnsmasqError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DnsmasqError::Io { path, source }
    };
    let size = match std::fs::metadata(&files.log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&files.log)(e)),
    };
    if size < at {
        return Ok(false);
    }
    // The owner of /proc/<pid> is the user dnsmasq runs as now.
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let uid = std::fs::metadata(&proc_dir).map_err(io(&proc_dir))?.uid();
    let old = rotated(files);
    std::fs::rename(&files.log, &old).map_err(io(&files.log))?;
    let fresh = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&files.log)
        .map_err(io(&files.log))?;
    std::os::unix::fs::fchown(&fresh, Some(uid), None).map_err(io(&files.log))?;
    signal(pid, Signal::USR2)?;
    Ok(true)
}

/// `dnsmasq.log.1`: the previous log.
pub fn rotated(files: &DnsmasqFiles) -> PathBuf {
    let mut name = files.log.clone().into_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// Stop the dnsmasq of these files if it runs (SIGTERM, then SIGKILL after 2 s); remove the
/// pid file. Returns whether one was running.
pub fn stop(files: &DnsmasqFiles) -> Result<bool, DnsmasqError> {
    let Some((pid, _)) = running(files) else {
        let _ = std::fs::remove_file(&files.pid);
        return Ok(false);
    };
    signal(pid, Signal::TERM)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        signal(pid, Signal::KILL)?;
    }
    let _ = std::fs::remove_file(&files.pid);
    Ok(true)
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Some(p) = Pid::from_raw(pid) else {
        return false;
    };
    if test_kill_process(p).is_err() {
        return false;
    }
    // "pid (comm) S ..." — state Z means it is gone but not reaped (our child only if we
    // spawned it directly, which we never do: dnsmasq daemonizes).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_must_name_our_pid_file() {
        let pid = Path::new("/p/net/blue/dnsmasq.pid");
        let ours =
            b"/usr/sbin/dnsmasq\0--conf-file=/dev/null\0--pid-file=/p/net/blue/dnsmasq.pid\0";
        let other = b"/usr/sbin/dnsmasq\0--pid-file=/p/net/red/dnsmasq.pid\0";
        let not_dnsmasq = b"/bin/sleep\0--pid-file=/p/net/blue/dnsmasq.pid\0";
        assert!(cmdline_matches(ours, pid));
        assert!(!cmdline_matches(other, pid));
        assert!(!cmdline_matches(not_dnsmasq, pid));
        assert!(!cmdline_matches(b"", pid));
        assert_eq!(
            cmdline_args(ours),
            vec![
                "--conf-file=/dev/null",
                "--pid-file=/p/net/blue/dnsmasq.pid"
            ]
        );
    }

    #[test]
    fn dnsmasq_runs_as_the_dedicated_user_or_nobody() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/usr/sbin/nologin\n";
        let group = "root:x:0:\nnogroup:x:65534:\n";
        let nobody = DnsmasqUser::pick(passwd, group);
        assert_eq!(
            (nobody.user.as_str(), nobody.group.as_str()),
            ("nobody", "nogroup")
        );
        let fedora = DnsmasqUser::pick(passwd, "root:x:0:\nnobody:x:65534:\n");
        assert_eq!(fedora.group, "nobody");
        let with = format!("{passwd}tuchka-dnsmasq:x:990:990::/nonexistent:/usr/sbin/nologin\n");
        let dedicated = DnsmasqUser::pick(&with, &format!("{group}tuchka-dnsmasq:x:990:\n"));
        assert_eq!(
            (dedicated.user.as_str(), dedicated.group.as_str()),
            ("tuchka-dnsmasq", "tuchka-dnsmasq")
        );
        // A user whose name only starts like it does not count.
        let prefix = DnsmasqUser::pick("tuchka-dnsmasq2:x:1:1::/:/bin/false\n", group);
        assert_eq!(prefix.user, "nobody");
    }

    #[test]
    fn the_file_limit_leaves_room_for_the_lease_file() {
        let small: Cidr = "10.1.0.0/24".parse().expect("cidr");
        let large: Cidr = "10.0.0.0/16".parse().expect("cidr");
        assert_eq!(file_limit(DEFAULT_LOG_LIMIT, &small), DEFAULT_LOG_LIMIT);
        assert_eq!(file_limit(DEFAULT_LOG_LIMIT, &large), 65536 * 512);
        assert_eq!(
            file_limit(1000, &"10.1.0.0/29".parse().expect("cidr")),
            8 * 512
        );
    }

    #[test]
    fn hosts_are_validated() {
        let net: Cidr = "10.1.0.0/24".parse().expect("cidr");
        let ok = DhcpHost {
            mac: "52:54:00:00:00:01".into(),
            ip: "10.1.0.5".into(),
            name: "web-0".into(),
        };
        assert!(validate_hosts(&net, std::slice::from_ref(&ok)).is_ok());
        let outside = DhcpHost {
            ip: "10.2.0.5".into(),
            ..ok.clone()
        };
        assert!(validate_hosts(&net, &[outside]).is_err());
        let bad_name = DhcpHost {
            name: "web,0\n".into(),
            ..ok.clone()
        };
        assert!(validate_hosts(&net, &[bad_name]).is_err());
        let bad_mac = DhcpHost {
            mac: "52:54:00".into(),
            ..ok
        };
        assert!(validate_hosts(&net, &[bad_mac]).is_err());
    }

    #[test]
    fn leases_no_reservation_backs_are_dropped() {
        let hosts = [DhcpHost {
            mac: "52:54:00:AA:00:01".into(),
            ip: "10.0.0.2".into(),
            name: "web-0".into(),
        }];
        let leases = "1700000000 52:54:00:aa:00:01 10.0.0.2 web-0 01:52:54:00:aa:00:01\n\
                      1700000000 52:54:00:aa:00:09 10.0.0.3 db-0 *\n\
                      1700000000 52:54:00:aa:00:07 10.0.0.2 old *\n";
        let (kept, dropped) = without_stale_leases(leases, &hosts);
        assert_eq!(dropped, 2);
        assert_eq!(
            kept,
            "1700000000 52:54:00:aa:00:01 10.0.0.2 web-0 01:52:54:00:aa:00:01\n"
        );
    }
}
