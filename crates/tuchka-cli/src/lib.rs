//! The tuchka command line: every subcommand except `serve` and `agent`.
//!
//! The binary parses either [`Cli`] or its own top-level enum embedding [`Command`] and
//! [`GlobalOpts`], then calls [`run`] or [`run_command`] and exits with the returned code.
//! Commands talk to the controller through `tuchka_client` (unix socket by default, or
//! `--url` with a bearer token), print aligned tables or (`-o json`) the raw API JSON on
//! stdout, and progress on stderr. Errors are printed here as `error: …` plus one
//! `  caused by: …` line per cause, with exit code 1.

mod args;
mod commands;
mod render;
mod report;
mod size;

use std::io::Write;

pub use args::{
    wire, Cli, Command, GlobalOpts, GroupCmd, GroupCreateArgs, HostCmd, ImageCmd, NetCmd, OpCmd,
    Output, VmAction, VmCmd,
};
pub use commands::{client_for, resolve_endpoint};
pub use report::{print_error, render_error};
pub use size::{format_bytes, format_mib, parse_size_arg, parse_size_mib, SizeError};

/// Run a parsed command line; returns the process exit code (errors are already printed).
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    run_command(cli.global, cli.command).await
}

/// Run one client subcommand against the controller the options designate, printing to
/// stdout/stderr. Returns the exit code: 0 on success, 1 on any error (already printed on
/// stderr) or failed operation / failed check.
pub async fn run_command(opts: GlobalOpts, cmd: Command) -> anyhow::Result<i32> {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    Ok(run_command_with(opts, cmd, &mut out, &mut err).await)
}

/// [`run_command`] writing to the given stdout/stderr (for tests and embedding).
pub async fn run_command_with(
    opts: GlobalOpts,
    cmd: Command,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> i32 {
    let mut ctx = commands::Ctx {
        client: client_for(&opts),
        output: opts.output,
        out,
        err,
    };
    match commands::execute(&mut ctx, cmd).await {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            let _ = ctx.err.write_all(render_error(&e).as_bytes());
            let _ = ctx.err.flush();
            1
        }
    }
}

/// True when stdout was closed by the reader (`tuchka vm list | head -1`): not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    // A broken pipe while talking to the controller is a real error, not a closed stdout.
    if err
        .chain()
        .any(|c| c.downcast_ref::<tuchka_client::ClientError>().is_some())
    {
        return false;
    }
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
