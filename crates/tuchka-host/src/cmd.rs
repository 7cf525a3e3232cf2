//! Running external tools (qemu-img, genisoimage, nft, dnsmasq): always a program plus an
//! argument vector, never a shell string, with stderr kept for the error message.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Directories searched for tools besides `$PATH` (daemons often run without the sbin dirs).
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Why an external command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error("cannot run {program} (is it installed?)")]
    Spawn {
        /// Program name.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and reported failure.
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        /// The command line, for the reader.
        command: String,
        /// Exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

/// Absolute path of `name` in `$PATH` or the usual system directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The path to run for `name`: found in the search path, else the bare name (so the spawn error
/// names it).
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// Human-readable command line (for messages only; never executed by a shell).
pub fn display<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Run `program args…`, optionally feeding `stdin`; return its stdout on success.
pub fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&[u8]>,
) -> Result<String, CommandError> {
    let mut cmd = Command::new(tool(program));
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as a failed exit status below; the pipe is closed on drop.
        let _ = pipe.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| CommandError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            command: display(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
