//! `tuchka serve` and `tuchka agent`: wire the controller, listeners and agents together.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tuchka_agent::AgentConfig;
use tuchka_client::{Client, Endpoint};
use tuchka_controller::api::{router, Transport};
use tuchka_controller::listen::{self, ListenLimits};
use tuchka_controller::state::JoinEndpoint;
use tuchka_controller::tls;
use tuchka_controller::{Controller, ControllerConfig};

use crate::{AgentArgs, ServeArgs};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TUCHKA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

/// This machine's name as a valid host name (`local` if it has none usable).
fn system_host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name = format!("h{name}");
        name.truncate(63);
    }
    if name.len() < 2 {
        "local".into()
    } else {
        name
    }
}

async fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another tuchka serve is already running on {} (stop it first)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(l)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Run the controller and the local agent until SIGTERM/SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing();
    let data_dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    // qemu (user libvirt-qemu) must reach disks and logs under the data directory.
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot set permissions of {}", data_dir.display()))?;
    let pool = data_dir.join("pool");
    let mut config = ControllerConfig::new(data_dir.clone());
    config.down_after = Duration::from_secs(args.down_after.max(3));
    config.local_pool = (!args.no_local_agent).then(|| pool.clone());
    for (flag, v) in [
        ("--cpu-overcommit", args.cpu_overcommit),
        ("--memory-overcommit", args.memory_overcommit),
        ("--disk-overcommit", args.disk_overcommit),
    ] {
        if !(v > 0.0 && v <= 64.0) {
            bail!("{flag} {v} is out of range: use a ratio above 0 and at most 64, e.g. 4");
        }
    }
    config.ratios.cpu = args.cpu_overcommit;
    config.ratios.memory = args.memory_overcommit;
    config.ratios.disk = args.disk_overcommit;
    config.long_poll = Duration::from_secs((args.down_after / 3).clamp(1, 10));
    if !(1..=86_400).contains(&args.balance_interval) {
        bail!(
            "--balance-interval {} is out of range: use 1 to 86400 seconds",
            args.balance_interval
        );
    }
    if !(0.0..=90.0).contains(&args.disk_reserve) {
        bail!(
            "--disk-reserve {} is out of range: use 0 to 90 (percent of each pool)",
            args.disk_reserve
        );
    }
    config.disk_reserve = args.disk_reserve / 100.0;
    config.image_cache_ttl = args.image_cache_ttl;
    let limits = listen_limits(&args)?;
    config.uploads = tuchka_controller::state::UploadLimits {
        max_size: args.max_upload_size.saturating_mul(1 << 20),
        max_virtual_size: args.max_image_virtual_size.saturating_mul(1 << 20),
        stall_timeout: limits.idle_timeout,
    };
    config.balance = tuchka_controller::state::BalanceConfig {
        mode: args.balance,
        interval: Duration::from_secs(args.balance_interval),
    };
    let mut tcp = None;
    if let Some(addr) = args.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let ips = tls::local_ipv4s();
        let names = tls::server_names(addr, &system_host_name(), &ips);
        let tls_dir = data_dir.join("tls");
        let server_tls = tls::ensure_tls(&tls_dir, &names)
            .with_context(|| format!("cannot set up TLS in {}", tls_dir.display()))?;
        config.join = Some(JoinEndpoint {
            url: tls::advertised_url(addr, &ips),
            fingerprint: server_tls.ca_fingerprint.clone(),
        });
        tcp = Some((addr, listener, server_tls));
    }
    let ctl = Controller::open(config).context("cannot open the controller state")?;
    // Nothing is received yet: what is in the image store's tmp/ is an interrupted upload's.
    let sweep = tuchka_controller::images::sweep_leftovers(&ctl)
        .context("cannot sweep the image store's leftovers")?;
    tracing::info!(
        temp_files = sweep.temp_files.len(),
        orphan_files = sweep.orphan_files.len(),
        rows_removed = sweep.rows_removed.len(),
        rows_missing_file = sweep.rows_missing_file.len(),
        "swept the image store"
    );
    let sock = data_dir.join("tuchka.sock");
    let unix = bind_unix(&sock).await?;
    let sock_inode = inode(&sock);
    tracing::info!(socket = %sock.display(), cloud = %ctl.cloud_id(), "tuchka controller listening");
    let mut servers = tokio::task::JoinSet::new();
    let desired = std::sync::Arc::new(tuchka_controller::desired::Cache::default());
    let app = router(ctl.clone(), Transport::Unix, desired.clone());
    let unix_limits = limits.clone();
    servers.spawn(async move {
        listen::serve_unix(unix, app, unix_limits, shutdown_signal()).await;
        anyhow::Ok(())
    });
    if let Some((addr, listener, server_tls)) = tcp {
        tracing::info!(
            %addr,
            token_file = %data_dir.join("token").display(),
            fingerprint = %server_tls.ca_fingerprint,
            names = ?server_tls.names,
            "API also on TCP, HTTPS only (bearer token required)"
        );
        let join = ctl.join_info();
        if let Some(command) = join.command {
            tracing::info!(
                file = %data_dir.join(tuchka_controller::state::JOIN_COMMAND_FILE).display(),
                expires_at = %join.expires_at,
                "join a host with: {command}"
            );
        }
        let app = router(ctl.clone(), Transport::Tcp, desired.clone());
        let tls_config = server_tls.config.clone();
        let tcp_limits = limits.clone();
        servers.spawn(async move {
            listen::serve_tls(listener, tls_config, app, tcp_limits, shutdown_signal()).await;
            anyhow::Ok(())
        });
    }
    // The hosts' load over the last hour, for the dashboard's charts.
    tuchka_controller::monitoring::spawn_sampler(ctl.clone());
    let ticker = ctl.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            let c = ticker.clone();
            let _ = tokio::task::spawn_blocking(move || tuchka_controller::progress::progress(&c))
                .await;
        }
    });
    if args.balance == tuchka_api::BalanceMode::Auto {
        let balancer = ctl.clone();
        let interval = Duration::from_secs(args.balance_interval);
        tracing::info!(every_s = interval.as_secs(), "automatic balancing is on");
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.tick().await; // the first round one interval after the start
            loop {
                every.tick().await;
                let c = balancer.clone();
                let r =
                    tokio::task::spawn_blocking(move || tuchka_controller::balance::auto_round(&c))
                        .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "balancer round failed");
                }
            }
        });
    }
    if !args.no_local_agent {
        let agent = AgentConfig {
            name: args.host_name.clone().unwrap_or_else(system_host_name),
            pool,
            libvirt_uri: args.libvirt_uri.clone(),
            accel: args.accel.into(),
            join_token: String::new(),
            // With a TCP listener other hosts may join: the listen address is this host's
            // underlay address (unless it is a wildcard).
            address: args
                .listen
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            channel_port: args.channel_port,
            controller: args.listen,
            run_dir: PathBuf::from(tuchka_host::channel::DEFAULT_RUN_DIR),
            load_source: tuchka_agent::LoadSource::Proc,
        };
        let client = Client::new(Endpoint::Unix(sock.clone()));
        tokio::spawn(async move {
            if let Err(e) = tuchka_agent::run(agent, client).await {
                tracing::error!(error = ?anyhow::Error::from(e), "local agent stopped");
            }
        });
    }
    while let Some(r) = servers.join_next().await {
        r.context("server task failed")??;
    }
    // Remove the socket only if it is still ours (a newer serve may have replaced it).
    if sock_inode.is_some() && inode(&sock) == sock_inode {
        let _ = std::fs::remove_file(&sock);
    }
    tracing::info!("tuchka controller stopped");
    Ok(())
}

/// The listeners' connection limits from `serve`'s flags, checked.
fn listen_limits(args: &ServeArgs) -> anyhow::Result<ListenLimits> {
    let limits = ListenLimits {
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        max_per_client: args.max_connections_per_client,
    };
    for (flag, d) in [
        ("--header-timeout", limits.header_timeout),
        ("--idle-timeout", limits.idle_timeout),
    ] {
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
            bail!(
                "{flag} {} is out of range: use 1s to 1h",
                humantime::format_duration(d)
            );
        }
    }
    if limits.max_connections == 0 || limits.max_per_client == 0 {
        bail!("--max-connections and --max-connections-per-client must be at least 1");
    }
    if limits.max_per_client > limits.max_connections {
        bail!(
            "--max-connections-per-client {} is above --max-connections {}",
            limits.max_per_client,
            limits.max_connections
        );
    }
    Ok(limits)
}

/// Run a host agent that joins a remote controller.
pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    init_tracing();
    let config = AgentConfig {
        name: args.host_name.clone().unwrap_or_else(system_host_name),
        pool: absolute(&args.pool)?,
        libvirt_uri: args.libvirt_uri.clone(),
        accel: args.accel.into(),
        join_token: args.join_token.clone(),
        address: match &args.address {
            Some(a) => a.to_string(),
            None => local_address_towards(&args.controller).unwrap_or_default(),
        },
        channel_port: args.channel_port,
        controller: controller_endpoint(&args.controller),
        run_dir: absolute(&args.run_dir)?,
        load_source: args.load_source.into(),
    };
    let client = Client::new(Endpoint::Http {
        url: args.controller.clone(),
        token: None,
    })
    .with_fingerprint(&args.fingerprint);
    tokio::select! {
        r = tuchka_agent::run(config, client) => r.context("agent failed"),
        _ = shutdown_signal() => Ok(()),
    }
}

/// The controller's address and port in `url` (`https://ADDR[:PORT]/…`, 443 by default),
/// resolved: guests may reach neither.
fn controller_endpoint(url: &str) -> Option<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    let hostport = rest.split('/').next()?;
    match hostport.to_socket_addrs() {
        Ok(mut addrs) => addrs.next(),
        Err(_) => (hostport, 443).to_socket_addrs().ok()?.next(),
    }
}

/// The local address this host uses to reach the controller at `url` (the underlay address
/// other hosts will reach it on, in the usual single-subnet cluster).
fn local_address_towards(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    let hostport = rest.split('/').next()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()?
        .find(|a| a.is_ipv4())?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(addr).ok()?; // no packet is sent: this only picks the route
    Some(sock.local_addr().ok()?.ip().to_string())
}

fn inode(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p))
    }
}

#[cfg(test)]
mod tests {
    use super::controller_endpoint;

    #[test]
    fn the_controller_endpoint_comes_from_the_url() {
        let at = |url: &str| controller_endpoint(url).map(|a| a.to_string());
        assert_eq!(
            at("https://10.250.0.1:7480").as_deref(),
            Some("10.250.0.1:7480")
        );
        assert_eq!(
            at("https://10.250.0.1:7480/v1/").as_deref(),
            Some("10.250.0.1:7480")
        );
        assert_eq!(at("https://10.250.0.1").as_deref(), Some("10.250.0.1:443"));
        assert_eq!(
            at("https://[fd00::1]:7480").as_deref(),
            Some("[fd00::1]:7480")
        );
        assert_eq!(at("https://").as_deref(), None);
    }
}
