//! The multi-host harness: N simulated hypervisor hosts on this one machine.
//!
//! Protocol: [`MultiHost::up`] runs `scripts/multihost up N DIR` in a fresh DIR under
//! `/var/tmp` and reads the `DIR/hosts.json` the script writes. A command runs inside a host
//! through `scripts/multihost exec DIR hI -- CMD…` (nsenter into the host's network, mount and
//! UTS namespaces), and inside the fabric (where the controller listens) through
//! `scripts/multihost exec DIR fabric -- CMD…`. Dropping the harness, or [`MultiHost::down`],
//! runs `scripts/multihost down DIR`: it destroys the hosts' domains, kills every process in the
//! namespaces by PID (so also what [`MultiHost::spawn`] started), deletes the veths, the
//! namespaces and DIR. Processes spawned here that somehow survive are then killed by PID.
//!
//! Everything needs root, libvirt and iproute2; the script fails with a message naming what is
//! missing. Set `TUCHKA_MULTIHOST_SCRIPT` to use another copy of the script.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process, Pid, Signal};
use serde::Deserialize;

/// Environment variable naming the `multihost` script to run instead of the workspace's.
pub const SCRIPT_ENV: &str = "TUCHKA_MULTIHOST_SCRIPT";
/// Where [`MultiHost::up`] creates the harness directories.
const BASE_DIR: &str = "/var/tmp";
/// Exit status of `multihost up` when DIR or its namespace prefix is taken (nothing was touched).
const TAKEN: i32 = 3;
/// How many fresh directories [`MultiHost::up`] tries when the namespace prefix is taken.
const UP_ATTEMPTS: u32 = 4;

/// Errors of the multi-host harness. Each names the command, host or file that failed.
#[derive(Debug, thiserror::Error)]
pub enum MultiHostError {
    /// The script could not be executed at all.
    #[error("cannot run {} (set {SCRIPT_ENV} to its path?)", script.display())]
    Script {
        /// The script that was run.
        script: PathBuf,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// `multihost up` failed; what it left behind has been cleaned up unless `taken`.
    #[error("`multihost up {n} {}` failed ({status}): {stderr}", dir.display())]
    Up {
        /// Number of hosts asked for.
        n: usize,
        /// The harness directory.
        dir: PathBuf,
        /// Exit status of the script.
        status: ExitStatus,
        /// What the script printed on stderr.
        stderr: String,
    },
    /// `multihost down` failed; namespaces, processes or DIR may be left.
    #[error("`multihost down {}` failed ({status}): {stderr}", dir.display())]
    Down {
        /// The harness directory.
        dir: PathBuf,
        /// Exit status of the script.
        status: ExitStatus,
        /// What the script printed on stderr.
        stderr: String,
    },
    /// `DIR/hosts.json` could not be read.
    #[error("cannot read {}", path.display())]
    ReadLayout {
        /// Path of hosts.json.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `DIR/hosts.json` is not what `multihost up` writes.
    #[error("{} is not the hosts.json of `multihost up`", path.display())]
    ParseLayout {
        /// Path of hosts.json.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A host name that is not part of this harness.
    #[error("no simulated host {name:?} (hosts: {known})")]
    UnknownHost {
        /// The name asked for.
        name: String,
        /// The hosts there are, comma-separated.
        known: String,
    },
    /// An empty command line was given.
    #[error("empty command for {place}")]
    EmptyCommand {
        /// Host name or "fabric".
        place: String,
    },
    /// A command could not be started in a host or the fabric.
    #[error("cannot start `{command}` in {place}")]
    Spawn {
        /// The command line.
        command: String,
        /// Host name or "fabric".
        place: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// A command run with [`MultiHost::run`] exited unsuccessfully.
    #[error("`{command}` in {place} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Host name or "fabric".
        place: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// One simulated hypervisor host, as `multihost up` describes it in `hosts.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SimHost {
    /// Host name, `h1` … `hN` (also its UTS hostname).
    pub name: String,
    /// Name of its network namespace (`tkmXXXX-hI`).
    pub netns: String,
    /// Its address on the fabric (`eth0`): 10.250.X.(10+I).
    pub fabric_ip: Ipv4Addr,
    /// Its libvirtd, usable from the root namespace (a unix socket under DIR).
    pub libvirt_uri: String,
    /// Its libvirtd over the fabric (`qemu+tcp://IP/system`, no authentication).
    pub tcp_uri: String,
    /// PID of the process that holds its namespaces (`exec` enters these).
    pub holder_pid: u32,
    /// PID of its libvirtd.
    pub libvirtd_pid: u32,
    /// PID of its virtlogd.
    pub virtlogd_pid: u32,
}

/// The fabric: the network that joins the hosts, where the controller listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Fabric {
    /// Name of the fabric's network namespace (`tkmXXXX-fab`).
    pub netns: String,
    /// Name of the bridge the hosts' veths are attached to.
    pub bridge: String,
    /// Address of the bridge: the controller's address as the hosts see it.
    pub ip: Ipv4Addr,
    /// The fabric subnet, e.g. `10.250.37.0/24`.
    pub cidr: String,
}

/// What `multihost up` writes to `DIR/hosts.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Layout {
    dir: PathBuf,
    prefix: String,
    fabric: Fabric,
    hosts: Vec<SimHost>,
}

/// A process started by the harness: its PID and start time (so a reused PID is never killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    pid: u32,
    start_time: u64,
}

/// A running multi-host harness. Dropping it tears everything down (see the module docs);
/// call [`MultiHost::down`] to see teardown errors instead of a message on stderr.
#[derive(Debug)]
pub struct MultiHost {
    script: PathBuf,
    layout: Layout,
    spawned: Mutex<Vec<Tracked>>,
    is_down: bool,
}

impl MultiHost {
    /// Starts `n` simulated hosts (`h1` … `hn`) in a fresh directory under `/var/tmp`.
    ///
    /// Needs root. Takes about 1 s for three hosts; libvirt's first QEMU probe adds ~8 s when
    /// the system libvirtd has no valid capabilities cache. On failure, what was created is
    /// removed before the error is returned.
    pub fn up(n: usize) -> Result<Self, MultiHostError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::up_at(n, fresh_dir()) {
                Err(MultiHostError::Up { status, .. })
                    if status.code() == Some(TAKEN) && attempt < UP_ATTEMPTS => {}
                result => return result,
            }
        }
    }

    /// Starts `n` simulated hosts with their state in `dir`, which must not exist or be empty.
    pub fn up_at(n: usize, dir: impl AsRef<Path>) -> Result<Self, MultiHostError> {
        let script = script_path();
        let dir = dir.as_ref().to_path_buf();
        let out = run_script(&script, |c| {
            c.arg("up").arg(n.to_string()).arg(&dir);
        })?;
        if !out.status.success() {
            if out.status.code() != Some(TAKEN) {
                if let Err(e) = script_down(&script, &dir) {
                    eprintln!("tuchka-testkit: cleaning up after a failed up: {e}");
                }
            }
            return Err(MultiHostError::Up {
                n,
                dir,
                status: out.status,
                stderr: lossy(&out.stderr),
            });
        }
        let layout = match read_layout(&dir) {
            Ok(layout) => layout,
            Err(e) => {
                if let Err(down) = script_down(&script, &dir) {
                    eprintln!("tuchka-testkit: cleaning up after a failed up: {down}");
                }
                return Err(e);
            }
        };
        Ok(Self {
            script,
            layout,
            spawned: Mutex::new(Vec::new()),
            is_down: false,
        })
    }

    /// The harness directory (per-host state and logs live in `DIR/hI/`).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The prefix of every namespace of this harness (`tkm` + 4 hex digits); handy for naming
    /// test objects uniquely.
    pub fn prefix(&self) -> &str {
        &self.layout.prefix
    }

    /// The hosts, in order `h1` … `hN`.
    pub fn hosts(&self) -> &[SimHost] {
        &self.layout.hosts
    }

    /// The host called `name` (`h1` … `hN`).
    pub fn host(&self, name: &str) -> Result<&SimHost, MultiHostError> {
        self.layout
            .hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| MultiHostError::UnknownHost {
                name: name.to_string(),
                known: host_names(&self.layout.hosts),
            })
    }

    /// The fabric network that joins the hosts.
    pub fn fabric(&self) -> &Fabric {
        &self.layout.fabric
    }

    /// The address the controller listens on: the fabric bridge's address in the fabric
    /// namespace (start the controller with [`MultiHost::spawn_in_fabric`]).
    pub fn controller_ip(&self) -> Ipv4Addr {
        self.layout.fabric.ip
    }

    /// A [`Command`] that runs `program` inside host `name` (its network, mount and UTS
    /// namespaces). Add arguments, environment and stdio as usual; prefer
    /// [`MultiHost::spawn_command`] to start it so that teardown knows about it.
    pub fn command(
        &self,
        name: &str,
        program: impl AsRef<OsStr>,
    ) -> Result<Command, MultiHostError> {
        self.host(name)?;
        Ok(self.script_exec(name, program.as_ref()))
    }

    /// A [`Command`] that runs `program` in the fabric namespace (where the controller is).
    pub fn fabric_command(&self, program: impl AsRef<OsStr>) -> Command {
        self.script_exec(FABRIC, program.as_ref())
    }

    /// Runs `cmd` (program and arguments) inside host `name` (or `"fabric"`) and waits for it.
    /// The exit status is the caller's to check; see [`MultiHost::run`] for a checked variant.
    pub fn exec<S: AsRef<OsStr>>(&self, name: &str, cmd: &[S]) -> Result<Output, MultiHostError> {
        let mut c = self.place_command(name, cmd)?;
        c.stdin(Stdio::null());
        c.output().map_err(|source| MultiHostError::Spawn {
            command: command_line(cmd),
            place: name.to_string(),
            source,
        })
    }

    /// Runs `cmd` inside host `name` (or `"fabric"`) and returns its stdout; a non-zero exit is
    /// an error carrying its stderr.
    pub fn run<S: AsRef<OsStr>>(&self, name: &str, cmd: &[S]) -> Result<String, MultiHostError> {
        let out = self.exec(name, cmd)?;
        if out.status.success() {
            Ok(lossy(&out.stdout))
        } else {
            Err(MultiHostError::Failed {
                command: command_line(cmd),
                place: name.to_string(),
                status: out.status,
                stderr: lossy(&out.stderr),
            })
        }
    }

    /// Starts a long-running `cmd` inside host `name` (or `"fabric"`), e.g. a `tuchka agent`:
    /// stdin is null, stdout and stderr are inherited. It is killed at teardown at the latest.
    pub fn spawn<S: AsRef<OsStr>>(&self, name: &str, cmd: &[S]) -> Result<Child, MultiHostError> {
        let mut c = self.place_command(name, cmd)?;
        c.stdin(Stdio::null());
        self.spawn_tracked(&mut c, &command_line(cmd), name)
    }

    /// Like [`MultiHost::spawn`], in the fabric namespace (e.g. the controller, listening on
    /// [`MultiHost::controller_ip`]).
    pub fn spawn_in_fabric<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Result<Child, MultiHostError> {
        self.spawn(FABRIC, cmd)
    }

    /// Spawns a command made by [`MultiHost::command`] or [`MultiHost::fabric_command`] and
    /// remembers it, so that teardown kills it if it is still running.
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<Child, MultiHostError> {
        // The arguments are: exec DIR PLACE -- PROGRAM ARGS…
        let args: Vec<&OsStr> = cmd.get_args().collect();
        let place = args
            .get(2)
            .map_or_else(String::new, |p| p.to_string_lossy().into_owned());
        let line = command_line(args.get(4..).unwrap_or_default());
        self.spawn_tracked(cmd, &line, &place)
    }

    /// Takes host `name` away as if its machine died (`scripts/multihost kill-host`): every
    /// process in it (libvirtd, virtlogd, its guests, dnsmasq, an agent) gets SIGKILL and it is
    /// unplugged from the fabric. It stays gone; teardown removes what is left.
    pub fn kill_host(&self, name: &str) -> Result<(), MultiHostError> {
        self.host_script("kill-host", name)
    }

    /// Crashes the libvirtd of host `name` (SIGKILL; its guests keep running) and starts it
    /// again (`scripts/multihost restart-libvirtd`); returns once it answers.
    pub fn restart_libvirtd(&self, name: &str) -> Result<(), MultiHostError> {
        self.host_script("restart-libvirtd", name)
    }

    /// `scripts/multihost SUBCOMMAND DIR NAME`, its failure an error with its stderr.
    fn host_script(&self, subcommand: &str, name: &str) -> Result<(), MultiHostError> {
        self.host(name)?;
        let out = run_script(&self.script, |c| {
            c.arg(subcommand).arg(&self.layout.dir).arg(name);
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(MultiHostError::Failed {
                command: format!("multihost {subcommand} {name}"),
                place: name.to_string(),
                status: out.status,
                stderr: lossy(&out.stderr),
            })
        }
    }

    /// Tears the harness down now: destroys the hosts' domains, kills their processes and
    /// everything spawned here, removes the namespaces and the directory.
    pub fn down(mut self) -> Result<(), MultiHostError> {
        self.is_down = true;
        self.teardown()
    }

    /// A command `cmd` in host `name` or, for `"fabric"`, in the fabric.
    fn place_command<S: AsRef<OsStr>>(
        &self,
        name: &str,
        cmd: &[S],
    ) -> Result<Command, MultiHostError> {
        let (program, args) = cmd
            .split_first()
            .ok_or_else(|| MultiHostError::EmptyCommand {
                place: name.to_string(),
            })?;
        let mut c = if name == FABRIC {
            self.fabric_command(program)
        } else {
            self.command(name, program)?
        };
        c.args(args);
        Ok(c)
    }

    fn script_exec(&self, place: &str, program: &OsStr) -> Command {
        let mut c = Command::new(&self.script);
        c.arg("exec")
            .arg(&self.layout.dir)
            .arg(place)
            .arg("--")
            .arg(program);
        c
    }

    fn spawn_tracked(
        &self,
        cmd: &mut Command,
        line: &str,
        place: &str,
    ) -> Result<Child, MultiHostError> {
        let child = cmd.spawn().map_err(|source| MultiHostError::Spawn {
            command: line.to_string(),
            place: place.to_string(),
            source,
        })?;
        // The script execs into the command, so the child's PID is the command's.
        if let Some(start_time) = start_time(child.id()) {
            self.spawned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(Tracked {
                    pid: child.id(),
                    start_time,
                });
        }
        Ok(child)
    }

    fn teardown(&mut self) -> Result<(), MultiHostError> {
        let result = script_down(&self.script, &self.layout.dir);
        let spawned = std::mem::take(
            &mut *self
                .spawned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for t in spawned {
            if process_is_running(t.pid) && start_time(t.pid) == Some(t.start_time) {
                if let Some(pid) = i32::try_from(t.pid).ok().and_then(Pid::from_raw) {
                    // Already gone is fine; the PID was checked just above.
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        result
    }
}

impl Drop for MultiHost {
    fn drop(&mut self) {
        if self.is_down {
            return;
        }
        self.is_down = true;
        if let Err(e) = self.teardown() {
            eprintln!("tuchka-testkit: tearing down the multi-host harness: {e}");
        }
    }
}

/// Name of the fabric for `scripts/multihost exec`.
const FABRIC: &str = "fabric";

/// Whether process `pid` exists and is not a zombie.
pub fn process_is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|(state, _)| state != 'Z')
}

/// The start time (clock ticks since boot) of process `pid`, if it exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

/// State and start time from the text of `/proc/PID/stat` (fields 3 and 22; the command name
/// in field 2 may contain spaces and parentheses, so parsing starts after its last `)`).
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The workspace's `scripts/multihost`, or `$TUCHKA_MULTIHOST_SCRIPT`.
fn script_path() -> PathBuf {
    std::env::var_os(SCRIPT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/multihost"))
}

/// A harness directory name unique to this process, call and moment.
fn harness_dir(base: &str, pid: u32, seq: u32, nanos: u32) -> PathBuf {
    PathBuf::from(format!("{base}/tkm-{pid}-{seq}-{nanos:08x}"))
}

fn fresh_dir() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    harness_dir(
        BASE_DIR,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos,
    )
}

fn run_script(script: &Path, args: impl FnOnce(&mut Command)) -> Result<Output, MultiHostError> {
    let mut c = Command::new(script);
    args(&mut c);
    c.stdin(Stdio::null())
        .output()
        .map_err(|source| MultiHostError::Script {
            script: script.to_path_buf(),
            source,
        })
}

fn script_down(script: &Path, dir: &Path) -> Result<(), MultiHostError> {
    let out = run_script(script, |c| {
        c.arg("down").arg(dir);
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MultiHostError::Down {
            dir: dir.to_path_buf(),
            status: out.status,
            stderr: lossy(&out.stderr),
        })
    }
}

fn read_layout(dir: &Path) -> Result<Layout, MultiHostError> {
    let path = dir.join("hosts.json");
    let text = std::fs::read_to_string(&path).map_err(|source| MultiHostError::ReadLayout {
        path: path.clone(),
        source,
    })?;
    parse_layout(&text).map_err(|source| MultiHostError::ParseLayout { path, source })
}

fn parse_layout(text: &str) -> Result<Layout, serde_json::Error> {
    serde_json::from_str(text)
}

fn host_names(hosts: &[SimHost]) -> String {
    hosts
        .iter()
        .map(|h| h.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn command_line<S: AsRef<OsStr>>(cmd: &[S]) -> String {
    cmd.iter()
        .map(|a| a.as_ref().to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTS_JSON: &str = r#"{
  "dir": "/var/tmp/tkm-1",
  "prefix": "tkma1de",
  "fabric": {"netns": "tkma1de-fab", "bridge": "fab0", "ip": "10.250.109.1", "cidr": "10.250.109.0/24"},
  "hosts": [
    {"name": "h1", "netns": "tkma1de-h1", "fabric_ip": "10.250.109.11", "libvirt_uri": "qemu+unix:///system?socket=/var/tmp/tkm-1/h1/run/libvirt-sock", "tcp_uri": "qemu+tcp://10.250.109.11/system", "holder_pid": 30633, "libvirtd_pid": 30656, "virtlogd_pid": 30648},
    {"name": "h2", "netns": "tkma1de-h2", "fabric_ip": "10.250.109.12", "libvirt_uri": "qemu+unix:///system?socket=/var/tmp/tkm-1/h2/run/libvirt-sock", "tcp_uri": "qemu+tcp://10.250.109.12/system", "holder_pid": 30684, "libvirtd_pid": 30742, "virtlogd_pid": 30716}
  ]
}"#;

    #[test]
    fn hosts_json_of_the_script_parses() {
        let layout = parse_layout(HOSTS_JSON).expect("parses");
        assert_eq!(layout.prefix, "tkma1de");
        assert_eq!(layout.fabric.ip, Ipv4Addr::new(10, 250, 109, 1));
        assert_eq!(layout.hosts.len(), 2);
        assert_eq!(layout.hosts[1].name, "h2");
        assert_eq!(layout.hosts[1].fabric_ip, Ipv4Addr::new(10, 250, 109, 12));
        assert_eq!(layout.hosts[1].holder_pid, 30684);
        assert_eq!(host_names(&layout.hosts), "h1, h2");
    }

    #[test]
    fn hosts_json_without_hosts_is_refused() {
        assert!(parse_layout(r#"{"dir": "/x", "prefix": "tkm0000"}"#).is_err());
    }

    #[test]
    fn stat_with_odd_command_names_parses() {
        let stat = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("12 (zombie) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_running_and_has_a_start_time() {
        assert!(process_is_running(std::process::id()));
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn harness_dirs_differ_per_process_call_and_moment() {
        let a = harness_dir("/var/tmp", 7, 0, 0xabc);
        assert_eq!(a, PathBuf::from("/var/tmp/tkm-7-0-00000abc"));
        assert_ne!(a, harness_dir("/var/tmp", 7, 1, 0xabc));
        assert_ne!(a, harness_dir("/var/tmp", 8, 0, 0xabc));
    }

    #[test]
    fn commands_are_shown_as_one_line() {
        assert_eq!(
            command_line(&["virsh", "-c", "qemu:///system"]),
            "virsh -c qemu:///system"
        );
        assert_eq!(command_line::<&str>(&[]), "");
    }
}
