//! Choosing the accelerator by a real boot test.
//!
//! libvirt's capabilities say "kvm" whenever `/dev/kvm` opens, but on nested hosts a KVM guest
//! may hang as soon as it leaves real mode. So [`probe_accel`] boots a 64 KiB firmware of our own
//! ([`probe_firmware`]) under `qemu-system-x86_64 -accel kvm`: it prints `R` on COM1 in real mode,
//! `P` after entering protected mode and `L` after enabling paging and long mode — the same
//! transitions a Linux kernel makes in its first milliseconds. KVM is used only when the whole
//! marker `RPL` shows up within [`PROBE_TIMEOUT`]; the qemu process is killed afterwards.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rustix::process::{kill_process_group, Pid, Signal};
use std::time::{Duration, Instant};

use crate::cmd;

/// How long the probe guest gets to print its marker.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the probe guest prints on COM1 when it reached long mode.
pub const PROBE_MARKER: &str = "RPL";

/// The accelerator a domain runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualization: domain type `kvm`.
    Kvm,
    /// Software emulation (slow, always works): domain type `qemu`.
    Tcg,
}

impl Accel {
    /// The libvirt domain type (`<domain type=…>`).
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }

    /// The name used in host facts and reports: `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AccelChoice {
    /// Probe, use KVM only if a KVM guest really runs.
    #[default]
    Auto,
    /// Use KVM (still probed, the result goes into the reason).
    Kvm,
    /// Use TCG without probing.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" | "qemu" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?} (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// Decide the accelerator. `Tcg` is taken as is; `Kvm` is honoured but probed so the reason says
/// whether it works; `Auto` picks KVM only when the probe guest reached long mode under KVM.
/// Returns the accelerator and a one-line human reason. Takes up to [`PROBE_TIMEOUT`].
pub fn probe_accel(choice: AccelChoice) -> (Accel, String) {
    match choice {
        AccelChoice::Tcg => (Accel::Tcg, "TCG chosen by configuration".to_string()),
        AccelChoice::Kvm => match kvm_verdict() {
            Ok(why) => (Accel::Kvm, format!("KVM chosen by configuration; {why}")),
            Err(why) => (
                Accel::Kvm,
                format!("KVM forced by configuration although {why}"),
            ),
        },
        AccelChoice::Auto => match kvm_verdict() {
            Ok(why) => (Accel::Kvm, why),
            Err(why) => (Accel::Tcg, format!("using TCG (slow): {why}")),
        },
    }
}

/// `Ok(reason)` when KVM guests run here, `Err(reason)` when they do not.
fn kvm_verdict() -> Result<String, String> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Err("/dev/kvm does not exist".to_string());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return Err(format!("/dev/kvm cannot be opened ({e})"));
    }
    let started = Instant::now();
    match run_probe("kvm", PROBE_TIMEOUT) {
        Ok(out) if out.contains(PROBE_MARKER) => Ok(format!(
            "KVM test guest reached long mode in {} ms",
            started.elapsed().as_millis()
        )),
        Ok(out) => Err(describe_stall(&out, PROBE_TIMEOUT)),
        Err(e) => Err(format!("KVM test guest could not run: {e}")),
    }
}

/// Pure: explain how far the probe guest got, from what it printed.
pub fn describe_stall(serial: &str, timeout: Duration) -> String {
    let secs = timeout.as_secs_f32();
    let serial: String = serial.chars().take(16).collect();
    if serial.contains("RP") {
        format!("KVM test guest hung when enabling paging/long mode (printed {serial:?} within {secs} s, expected {PROBE_MARKER:?})")
    } else if serial.contains('R') {
        format!("KVM test guest hung when entering protected mode (printed {serial:?} within {secs} s, expected {PROBE_MARKER:?}); nested KVM is not usable")
    } else {
        format!("KVM test guest printed nothing within {secs} s")
    }
}

/// Why the probe guest could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Scratch files could not be written.
    #[error("cannot write probe files in {path}")]
    Scratch {
        /// The scratch path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// qemu could not be started.
    #[error(
        "cannot start timeout + qemu-system-x86_64 (are coreutils and qemu-system-x86 installed?)"
    )]
    Spawn(#[source] std::io::Error),
    /// qemu exited before the timeout without printing the marker.
    #[error("qemu exited early: {0}")]
    Exited(String),
}

/// The 64 KiB probe firmware, loaded with `-bios` (mapped at 0xF0000 and below 4 GiB).
///
/// Layout: code at offset 0 (linear 0xF0000), GDT at 0x98, GDT descriptor at 0xB8, and at the
/// reset vector (offset 0xFFF0) a far jump to F000:0000. Everything else is `hlt`.
pub fn probe_firmware() -> Vec<u8> {
    #[rustfmt::skip]
    const CODE: &[u8] = &[
        // .code16 (real mode, CS base 0xF0000)
        0xfa,                                     // cli
        0xba, 0xf8, 0x03,                         // mov $0x3f8, %dx       COM1
        0xb0, b'R',                               // mov $'R', %al
        0xee,                                     // out %al, (%dx)
        0x2e, 0x66, 0x0f, 0x01, 0x16, 0xb8, 0x00, // lgdtl %cs:0xb8
        0x0f, 0x20, 0xc0,                         // mov %cr0, %eax
        0x0c, 0x01,                               // or $1, %al            PE
        0x0f, 0x22, 0xc0,                         // mov %eax, %cr0
        0x66, 0xea, 0x1e, 0x00, 0x0f, 0x00, 0x08, 0x00, // ljmpl $0x08, $0xf001e
        // .code32 (protected mode) at 0x1e
        0x66, 0xb8, 0x10, 0x00,                   // mov $0x10, %ax        data selector
        0x8e, 0xd8,                               // mov %ax, %ds
        0x8e, 0xc0,                               // mov %ax, %es
        0x8e, 0xd0,                               // mov %ax, %ss
        0xb0, b'P',                               // mov $'P', %al
        0xee,                                     // out %al, (%dx)
        0xbf, 0x00, 0x10, 0x00, 0x00,             // mov $0x1000, %edi     page tables in RAM
        0x31, 0xc0,                               // xor %eax, %eax
        0xb9, 0x00, 0x0c, 0x00, 0x00,             // mov $0xc00, %ecx
        0xf3, 0xab,                               // rep stosl             clear 0x1000..0x4000
        0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, // movl $0x2003, 0x1000  PML4[0]
        0xc7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03, 0x30, 0x00, 0x00, // movl $0x3003, 0x2000  PDPT[0]
        0xc7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00, // movl $0x83, 0x3000    PD[0]: 2 MiB
        0x0f, 0x20, 0xe0,                         // mov %cr4, %eax
        0x83, 0xc8, 0x20,                         // or $0x20, %eax        PAE
        0x0f, 0x22, 0xe0,                         // mov %eax, %cr4
        0xb8, 0x00, 0x10, 0x00, 0x00,             // mov $0x1000, %eax
        0x0f, 0x22, 0xd8,                         // mov %eax, %cr3
        0xb9, 0x80, 0x00, 0x00, 0xc0,             // mov $0xc0000080, %ecx EFER
        0x0f, 0x32,                               // rdmsr                 (clobbers %edx)
        0x0d, 0x00, 0x01, 0x00, 0x00,             // or $0x100, %eax       LME
        0x0f, 0x30,                               // wrmsr
        0x0f, 0x20, 0xc0,                         // mov %cr0, %eax
        0x0d, 0x00, 0x00, 0x00, 0x80,             // or $0x80000000, %eax  PG
        0x0f, 0x22, 0xc0,                         // mov %eax, %cr0
        0xea, 0x88, 0x00, 0x0f, 0x00, 0x18, 0x00, // ljmp $0x18, $0xf0088
        // .code64 (long mode) at 0x88
        0x66, 0xba, 0xf8, 0x03,                   // mov $0x3f8, %dx
        0xb0, b'L',                               // mov $'L', %al
        0xee,                                     // out %al, (%dx)
        0xb0, b'\n',                              // mov $'\n', %al
        0xee,                                     // out %al, (%dx)
        0xf4,                                     // 1: hlt
        0xeb, 0xfd,                               // jmp 1b
    ];
    #[rustfmt::skip]
    const GDT: &[u8] = &[
        0, 0, 0, 0, 0, 0, 0, 0,                           // null
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,   // 0x08: 32-bit code, flat
        0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,   // 0x10: data, flat
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00,   // 0x18: 64-bit code
    ];
    // limit 31, base 0xF0098
    const GDT_DESC: &[u8] = &[0x1f, 0x00, 0x98, 0x00, 0x0f, 0x00];
    // jmp far F000:0000
    const RESET: &[u8] = &[0xea, 0x00, 0x00, 0x00, 0xf0];

    let mut rom = vec![0xf4u8; 64 * 1024];
    rom[..CODE.len()].copy_from_slice(CODE);
    rom[0x98..0x98 + GDT.len()].copy_from_slice(GDT);
    rom[0xb8..0xb8 + GDT_DESC.len()].copy_from_slice(GDT_DESC);
    rom[0xfff0..0xfff0 + RESET.len()].copy_from_slice(RESET);
    rom
}

/// Removes the scratch directory and kills qemu, whatever happens.
///
/// qemu runs under `timeout -s KILL` in a process group of its own: dropping the guard kills the
/// whole group, and if this process dies first (killed mid-probe), `timeout` still kills the
/// hung guest shortly after the deadline instead of leaving it spinning forever.
struct ProbeGuard {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let group = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
            match group {
                Some(g) => {
                    let _ = kill_process_group(g, Signal::KILL);
                }
                None => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PROBE_DIR_PREFIX: &str = "tuchka-probe-";

/// Pure: the pid in a probe scratch directory name (`tuchka-probe-<pid>-<nonce>`).
pub fn probe_dir_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PROBE_DIR_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Remove scratch directories left by probes whose process no longer exists.
fn remove_stale_probe_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = probe_dir_pid(&name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Boot [`probe_firmware`] with `-accel <accel>` and return what it printed on COM1 within
/// `timeout` (or as soon as the marker appears). The qemu process is always killed.
pub fn run_probe(accel: &str, timeout: Duration) -> Result<String, ProbeError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = std::env::temp_dir();
    remove_stale_probe_dirs(&tmp);
    let dir = tmp.join(format!(
        "{PROBE_DIR_PREFIX}{}-{nanos:08x}",
        std::process::id()
    ));
    let scratch = |source| ProbeError::Scratch {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir(&dir).map_err(scratch)?;
    let mut guard = ProbeGuard {
        dir: dir.clone(),
        child: None,
    };
    let bios = dir.join("probe.bin");
    let serial = dir.join("serial.out");
    std::fs::write(&bios, probe_firmware()).map_err(scratch)?;

    // Upper bound on the guest's life even if nobody is left to kill it.
    let kill_after = format!("{}", timeout.as_secs() + 3);
    let child = Command::new(cmd::tool("timeout"))
        .args(["-s", "KILL", &kill_after])
        .arg(cmd::tool("qemu-system-x86_64"))
        .args([
            "-accel",
            accel,
            "-machine",
            "pc",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "16",
        ])
        .arg("-bios")
        .arg(&bios)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(ProbeError::Spawn)?;
    let child = guard.child.insert(child);

    let deadline = Instant::now() + timeout;
    loop {
        let out = std::fs::read_to_string(&serial).unwrap_or_default();
        if out.contains(PROBE_MARKER) {
            return Ok(out);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut err);
            }
            let last = err
                .lines()
                .rev()
                .find(|l| !l.contains("warning:"))
                .unwrap_or("")
                .trim();
            return Err(ProbeError::Exited(format!("{status}: {last}")));
        }
        if Instant::now() >= deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_has_reset_vector_and_fits_64k() {
        let rom = probe_firmware();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[0xfff0..0xfff5], &[0xea, 0x00, 0x00, 0x00, 0xf0]);
        assert_eq!(rom[0], 0xfa);
        // The GDT (4 entries) must end where its descriptor starts, and the descriptor's base
        // must point at it.
        assert_eq!(&rom[0x98..0xa0], &[0u8; 8]);
        assert_eq!(&rom[0xb8..0xbe], &[0x1f, 0x00, 0x98, 0x00, 0x0f, 0x00]);
    }

    #[test]
    fn stall_reasons_say_how_far_it_got() {
        let t = Duration::from_secs(3);
        assert!(describe_stall("R", t).contains("protected mode"));
        assert!(describe_stall("RP", t).contains("long mode"));
        assert!(describe_stall("", t).contains("nothing"));
    }

    #[test]
    fn probe_dirs_name_their_process() {
        assert_eq!(probe_dir_pid("tuchka-probe-4628-28c067fe"), Some(4628));
        assert_eq!(probe_dir_pid("tuchka-probe-x-1"), None);
        assert_eq!(probe_dir_pid("other-4628-1"), None);
    }

    #[test]
    fn choice_parses() {
        assert_eq!("AUTO".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn forced_tcg_needs_no_probe() {
        assert_eq!(probe_accel(AccelChoice::Tcg).0, Accel::Tcg);
    }
}
