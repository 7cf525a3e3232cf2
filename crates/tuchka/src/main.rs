//! `tuchka`: the one binary. `serve` runs the controller (and the local agent), `agent` runs a
//! host agent, every other subcommand is the CLI client.

mod serve;
mod service;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// tuchka: a small cloud for your own hardware, on libvirt.
#[derive(Debug, Parser)]
#[command(name = "tuchka", version, about, propagate_version = true)]
struct Top {
    #[command(flatten)]
    global: tuchka_cli::GlobalOpts,
    #[command(subcommand)]
    command: TopCmd,
}

#[derive(Debug, Subcommand)]
enum TopCmd {
    /// Run the controller (API, state, scheduler) and, by default, an agent for this host.
    Serve(ServeArgs),
    /// Run a host agent that joins a controller.
    Agent(AgentArgs),
    /// Print the shell completion script (bash, zsh or fish) on stdout.
    Completions(service::CompletionsArgs),
    /// Print the manual page (roff) on stdout, or write one per command with --dir.
    Man(service::ManArgs),
    #[command(flatten)]
    Client(tuchka_cli::Command),
}

/// Accelerator choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccelArg {
    /// KVM if a real test guest runs under it, else TCG.
    Auto,
    /// KVM (fails if it does not work).
    Kvm,
    /// TCG software emulation.
    Tcg,
}

impl From<AccelArg> for tuchka_host::AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => tuchka_host::AccelChoice::Auto,
            AccelArg::Kvm => tuchka_host::AccelChoice::Kvm,
            AccelArg::Tcg => tuchka_host::AccelChoice::Tcg,
        }
    }
}

/// Options of `tuchka serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (state.db, images, token, join-token, join.txt, tls/, tuchka.sock, the
    /// local agent's pool).
    #[arg(long, env = "TUCHKA_DATA_DIR", default_value = "/var/lib/tuchka")]
    pub data_dir: PathBuf,
    /// Also serve the API on TCP, HTTPS only (users: the bearer token in <data-dir>/token;
    /// agents: the join command in <data-dir>/join.txt).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Accelerator for guests.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Do not run an agent for this host (a dedicated controller).
    #[arg(long)]
    pub no_local_agent: bool,
    /// Name of this host in the cloud [default: the system host name].
    #[arg(long)]
    pub host_name: Option<String>,
    /// libvirt connection of the local agent.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Seconds without a report before a host is shown down.
    #[arg(long, default_value_t = 15)]
    pub down_after: u64,
    /// vCPUs the scheduler may promise per logical CPU of a host.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory the scheduler may promise per MiB of host memory (after 512 MiB kept for the host).
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// Root disk size the scheduler may promise per MiB of storage pool (disks are thin overlays).
    #[arg(long, default_value_t = 2.0)]
    pub disk_overcommit: f64,
    /// Balance load by itself: `off` (only `tuchka balance apply`) or `auto` (a round every
    /// --balance-interval; see docs/migration.md for its rules).
    #[arg(long, default_value = "off", value_parser = tuchka_cli::wire::<tuchka_api::BalanceMode>, value_name = "MODE")]
    pub balance: tuchka_api::BalanceMode,
    /// Seconds between two rounds of the automatic balancer.
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub balance_interval: u64,
    /// Share of every host's pool the scheduler never places on, in percent (new VMs, volumes
    /// and grown disks must fit in the real free space above it).
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub disk_reserve: f64,
    /// How long a cached image nothing uses stays on a host, e.g. 24h, 30m, 0s (`image cache
    /// prune` drops them at once).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub image_cache_ttl: Duration,
    /// TCP port of the local agent's migration channel (with --listen: on the listen address).
    #[arg(long, default_value_t = tuchka_host::net::underlay::DEFAULT_CHANNEL_PORT, value_name = "PORT")]
    pub channel_port: u16,
    /// Longest a new connection may take to complete its TLS handshake and send its first
    /// request head, and any request head from its first byte (slow clients are closed).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_timeout: Duration,
    /// A connection silent this long between requests, or that does not read its response, is
    /// closed; an upload that sends nothing for this long is abandoned. Long polls, event
    /// streams and `console --follow` are requests in service, never cut.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,
    /// Most connections at once, on each listener (the unix socket, the HTTPS port); past it a
    /// new connection closes the one idle longest, or is refused when all are busy.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_connections: usize,
    /// Most connections at once from one client: an IP address (IPv6: a /64) on the HTTPS
    /// port, a user on the unix socket.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_connections_per_client: usize,
    /// Largest image file accepted (uploads and captures), e.g. 64G, 512M (parsed to MiB).
    #[arg(long, default_value = "64G", value_parser = tuchka_cli::parse_size_arg, value_name = "SIZE")]
    pub max_upload_size: u64,
    /// Largest virtual disk size an image may declare, e.g. 2T (parsed to MiB).
    #[arg(long, default_value = "2T", value_parser = tuchka_cli::parse_size_arg, value_name = "SIZE")]
    pub max_image_virtual_size: u64,
}

/// Options of `tuchka agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Controller URL, e.g. https://10.0.0.1:7480.
    #[arg(long)]
    pub controller: String,
    /// Join token printed by the controller (`tuchka host join-token`).
    #[arg(long, env = "TUCHKA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    /// sha256 of the controller's CA certificate, printed with the join token.
    #[arg(long, env = "TUCHKA_FINGERPRINT", value_name = "SHA256")]
    pub fingerprint: String,
    /// Storage pool directory of this host.
    #[arg(long, default_value = "/var/lib/tuchka/pool")]
    pub pool: PathBuf,
    /// Accelerator for guests.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Name of this host in the cloud [default: the system host name].
    #[arg(long)]
    pub host_name: Option<String>,
    /// libvirt connection.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Underlay address of this host for VXLAN and migrations between hosts [default: the local
    /// address used to reach the controller].
    #[arg(long)]
    pub address: Option<std::net::Ipv4Addr>,
    /// TCP port of this host's migration channel (mutual TLS, on --address; only the cloud's
    /// other hosts are admitted).
    #[arg(long, default_value_t = tuchka_host::net::underlay::DEFAULT_CHANNEL_PORT, value_name = "PORT")]
    pub channel_port: u16,
    /// Where the migration channel's unix sockets live (must be the same path on every host).
    #[arg(long, default_value = "/run/tuchka", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Where the host load reported for the balancer comes from: `proc` (/proc/stat and
    /// /proc/meminfo) or `vms` (what this host's VMs use: for simulated hosts sharing a kernel).
    #[arg(long, value_enum, default_value_t = LoadSourceArg::Proc)]
    pub load_source: LoadSourceArg,
}

/// `--load-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadSourceArg {
    /// /proc/stat and /proc/meminfo.
    Proc,
    /// This host's VMs (libvirt).
    Vms,
}

impl From<LoadSourceArg> for tuchka_agent::LoadSource {
    fn from(a: LoadSourceArg) -> Self {
        match a {
            LoadSourceArg::Proc => tuchka_agent::LoadSource::Proc,
            LoadSourceArg::Vms => tuchka_agent::LoadSource::Vms,
        }
    }
}

fn main() {
    let top = Top::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        match top.command {
            TopCmd::Serve(args) => report(serve::serve(args).await),
            TopCmd::Agent(args) => report(serve::agent(args).await),
            TopCmd::Completions(args) => report(service::completions(Top::command(), &args)),
            TopCmd::Man(args) => report(service::man(Top::command(), &args)),
            TopCmd::Client(cmd) => match tuchka_cli::run_command(top.global, cmd).await {
                Ok(code) => code,
                Err(e) => {
                    tuchka_cli::print_error(&e);
                    1
                }
            },
        }
    });
    std::process::exit(code);
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            tuchka_cli::print_error(&e);
            1
        }
    }
}
