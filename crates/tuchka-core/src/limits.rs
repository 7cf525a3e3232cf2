//! Bounds on the external tools that read input from outside — `qemu-img` on uploads, on
//! images and on guests' disks: CPU seconds and address space (`RLIMIT_CPU`, `RLIMIT_AS`, set
//! by util-linux's `prlimit`) and a wall clock (coreutils' `timeout`, which kills the tool past
//! it and exits 124). Pure: this builds the argument vector; the callers run it.

use std::ffi::OsString;
use std::time::Duration;

/// Exit status of `timeout` when the wall clock ran out.
pub const TIMED_OUT: i32 = 124;

/// What one run of a tool may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// CPU seconds (RLIMIT_CPU: SIGXCPU, then SIGKILL).
    pub cpu_secs: u64,
    /// Address space, bytes (RLIMIT_AS: allocations fail).
    pub address_space: u64,
    /// Wall-clock time: past it the tool is killed.
    pub wall: Duration,
}

impl ToolLimits {
    /// `qemu-img info`, `create`, `resize`, `rebase -u`, `measure`: metadata only (what
    /// OpenStack allows `info`: 30 CPU s, 1 GiB).
    pub const QEMU_IMG_META: ToolLimits = ToolLimits {
        cpu_secs: 30,
        address_space: 1 << 30,
        wall: Duration::from_secs(60),
    };
    /// `qemu-img check` and `map`: they walk the metadata of the whole image.
    pub const QEMU_IMG_CHECK: ToolLimits = ToolLimits {
        cpu_secs: 300,
        address_space: 2 << 30,
        wall: Duration::from_secs(600),
    };
    /// `qemu-img convert` of an upload or a captured disk: reads and writes it all.
    pub const QEMU_IMG_CONVERT: ToolLimits = ToolLimits {
        cpu_secs: 4 * 3600,
        address_space: 2 << 30,
        wall: Duration::from_secs(8 * 3600),
    };

    /// The arguments of `prlimit` that run `program args…` under these limits.
    pub fn prlimit_args(&self, program: &str, args: &[OsString]) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            format!("--cpu={}", self.cpu_secs).into(),
            format!("--as={}", self.address_space).into(),
            "--".into(),
            "timeout".into(),
            "--kill-after=5s".into(),
            format!("{}s", self.wall.as_secs().max(1)).into(),
            program.into(),
        ];
        out.extend(args.iter().cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_runs_under_prlimit_and_timeout() {
        let args = ToolLimits::QEMU_IMG_META.prlimit_args("qemu-img", &["info".into()]);
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "--cpu=30",
                "--as=1073741824",
                "--",
                "timeout",
                "--kill-after=5s",
                "60s",
                "qemu-img",
                "info"
            ]
        );
    }
}
