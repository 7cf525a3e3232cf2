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

/// [`run`] `program args…` under `limits` (through `prlimit` and `timeout`, see
/// [`tuchka_core::limits`]); a run the wall clock stopped says so.
pub fn run_bounded<S: AsRef<OsStr>>(
    limits: &tuchka_core::limits::ToolLimits,
    program: &str,
    args: &[S],
) -> Result<String, CommandError> {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    run("prlimit", &limits.prlimit_args(program, &args), None)
        .map_err(|e| bounded_error(e, limits, program, &args))
}

/// [`run_streaming`] under `limits`, like [`run_bounded`].
pub fn run_streaming_bounded<S: AsRef<OsStr>>(
    limits: &tuchka_core::limits::ToolLimits,
    program: &str,
    args: &[S],
    on_line: &mut dyn FnMut(&str),
) -> Result<(), CommandError> {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    run_streaming("prlimit", &limits.prlimit_args(program, &args), on_line)
        .map_err(|e| bounded_error(e, limits, program, &args))
}

/// The error of a bounded run, naming the tool (not prlimit) and a timeout as such.
fn bounded_error(
    e: CommandError,
    limits: &tuchka_core::limits::ToolLimits,
    program: &str,
    args: &[std::ffi::OsString],
) -> CommandError {
    match e {
        CommandError::Failed { status, stderr, .. } => {
            let timed_out = status.ends_with(&tuchka_core::limits::TIMED_OUT.to_string());
            CommandError::Failed {
                command: display(program, args),
                stderr: if timed_out {
                    format!("killed after {} s (its time limit)", limits.wall.as_secs())
                } else {
                    stderr
                },
                status,
            }
        }
        other => other,
    }
}

/// Run `program args…` like [`run`], handing each piece of its standard output that ends in
/// `\r` or `\n` (a progress line such as qemu-img's `    (12.50/100%)\r`) to `on_line` as it
/// arrives (and what is left when it ends). Standard error is kept for the error message.
pub fn run_streaming<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    on_line: &mut dyn FnMut(&str),
) -> Result<(), CommandError> {
    use std::io::Read;
    let mut child = Command::new(tool(program))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.to_string(),
            source,
        })?;
    // Drain stderr on its own thread so a chatty tool never blocks on a full pipe.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    });
    if let Some(mut pipe) = child.stdout.take() {
        let mut pending = Vec::new();
        let mut chunk = [0u8; 4096];
        // A read error ends the stream; the exit status below tells whether the tool worked.
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\r' || *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]);
                if !line.trim().is_empty() {
                    on_line(&line);
                }
            }
        }
        let rest = String::from_utf8_lossy(&pending);
        if !rest.trim().is_empty() {
            on_line(&rest);
        }
    }
    let status = child.wait().map_err(|source| CommandError::Spawn {
        program: program.to_string(),
        source,
    })?;
    let stderr = stderr
        .and_then(|t| t.join().ok())
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(CommandError::Failed {
            command: display(program, args),
            status: status.to_string(),
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_runs_are_stopped_by_the_wall_clock_the_cpu_and_the_memory_limit() {
        use std::time::{Duration, Instant};
        use tuchka_core::limits::ToolLimits;
        let limits = ToolLimits {
            cpu_secs: 1,
            address_space: 256 << 20,
            wall: Duration::from_secs(1),
        };
        let start = Instant::now();
        let err = run_bounded(&limits, "sleep", &["30"]).expect_err("killed");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert!(err.to_string().contains("killed after 1 s"), "{err}");
        assert!(
            err.to_string().starts_with("`sleep 30`"),
            "names the tool: {err}"
        );
        let spin = ToolLimits {
            wall: Duration::from_secs(30),
            ..limits
        };
        let start = Instant::now();
        let err = run_bounded(&spin, "sh", &["-c", "while :; do :; done"]).expect_err("SIGXCPU");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?} {err}",
            start.elapsed()
        );
        // 512 MiB of memory is refused under a 256 MiB address space.
        let err = run_bounded(
            &spin,
            "sh",
            &[
                "-c",
                "x=$(head -c 536870912 /dev/zero | tr '\\0' a); echo ${#x}",
            ],
        );
        assert!(err.is_err(), "{err:?}");
        assert_eq!(
            run_bounded(&spin, "echo", &["ok"]).expect("runs").trim(),
            "ok"
        );
    }

    #[test]
    fn streaming_splits_at_carriage_returns_and_keeps_stderr() {
        let mut lines = Vec::new();
        run_streaming(
            "sh",
            &[
                "-c",
                "printf '  (0.00/100%%)\\r  (50.00/100%%)\\r\\n'; printf done",
            ],
            &mut |l| lines.push(l.to_string()),
        )
        .expect("sh runs");
        assert_eq!(lines, vec!["  (0.00/100%)", "  (50.00/100%)", "done"]);
        let err =
            run_streaming("sh", &["-c", "echo oops >&2; exit 3"], &mut |_| {}).expect_err("exit 3");
        assert!(err.to_string().contains("oops"), "{err}");
    }
}
