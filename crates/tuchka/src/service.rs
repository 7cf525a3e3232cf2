//! `tuchka completions` and `tuchka man`: shell completions and manual pages generated from the
//! clap command itself, so they never drift from the real options. `scripts/install` runs both
//! and installs the results; `tuchka man --dir DIR` writes one page per (sub)command.

use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

/// Shells `tuchka completions` can write a script for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShellArg {
    /// bash (install as /usr/share/bash-completion/completions/tuchka).
    Bash,
    /// zsh (install as /usr/share/zsh/vendor-completions/_tuchka).
    Zsh,
    /// fish (install as /usr/share/fish/vendor_completions.d/tuchka.fish).
    Fish,
}

/// Options of `tuchka completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

/// Options of `tuchka man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command (`tuchka.1`, `tuchka-vm.1`, `tuchka-vm-list.1`, …) into DIR
    /// instead of printing the page of `tuchka` on stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Print the completion script of `shell` for `cmd` on stdout.
pub fn completions(mut cmd: clap::Command, args: &CompletionsArgs) -> anyhow::Result<()> {
    let shell = match args.shell {
        ShellArg::Bash => clap_complete::Shell::Bash,
        ShellArg::Zsh => clap_complete::Shell::Zsh,
        ShellArg::Fish => clap_complete::Shell::Fish,
    };
    let name = cmd.get_name().to_string();
    // Into a buffer first: clap_complete panics when its writer fails (e.g. `| head`).
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    print_all(&buf).map_err(|e| anyhow::anyhow!("cannot write the completion script: {e}"))
}

/// Write `bytes` on stdout and flush; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Print the roff page of `cmd` on stdout, or with `--dir` write one page per command there.
pub fn man(cmd: clap::Command, args: &ManArgs) -> anyhow::Result<()> {
    match &args.dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .map_err(|e| anyhow::anyhow!("cannot render the manual page: {e}"))?;
            print_all(&buf).map_err(|e| anyhow::anyhow!("cannot write the manual page: {e}"))
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cannot create the directory {}: {e}", dir.display())
            })?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                anyhow::anyhow!("cannot write the manual pages into {}: {e}", dir.display())
            })
        }
    }
}
