//! Running subcommands: a thin adapter from [`Command`] to [`Client`] calls and printed views.
//!
//! Each command fetches or changes something through the client, then prints either a view
//! from [`crate::render`] or the raw API JSON (`-o json`). Long actions print the operation
//! (or follow it with `--wait`: a spinner on stderr, then exit 0 on success and 1 with the
//! error on failure). Output goes to the writers in [`Ctx`] so tests can capture it.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tuchka_api::{BalancePlan, BalanceStatus, ConsoleLog, Drain, HostDrain, UiLogin, VmMigrate};
use tuchka_api::{
    CachePrune, CachedImage, ImageBuild, ImageCapture, Storage, VmResize, Volume, VolumeAttach,
    VolumeCreate, VolumeResize,
};
use tuchka_api::{
    CheckItem, Forward, ForwardCreate, Group, GroupCreate, GroupScale, Host, HostRemoved, Image,
    JoinToken, JoinTokenCreate, Network, NetworkCreate, Operation, OperationState, Rule,
    RuleCreate, Vm, VmStop,
};
use tuchka_client::{segment, Client, Endpoint, DEFAULT_SOCKET};

use crate::args::{
    BalanceCmd, Command, ForwardCmd, GlobalOpts, GroupCmd, GroupCreateArgs, HostCmd, ImageCacheCmd,
    ImageCmd, NetCmd, OpCmd, Output, RuleCmd, VmCmd, VolumeCmd,
};
use crate::render;
use crate::report::{format_lines, operation_failure_lines};

/// libvirt URI used by `tuchka check`.
const LIBVIRT_URI: &str = "qemu:///system";

/// Where the command's output goes.
pub struct Ctx<'a> {
    /// The API client.
    pub client: Client,
    /// Table or JSON.
    pub output: Output,
    /// Standard output.
    pub out: &'a mut (dyn Write + Send),
    /// Standard error (messages; progress bars draw on the real stderr when it is a terminal).
    pub err: &'a mut (dyn Write + Send),
}

impl Ctx<'_> {
    fn print(&mut self, text: &str) -> anyhow::Result<()> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .context("cannot write to stdout")
    }

    fn print_json<T: Serialize>(&mut self, value: &T) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(value).context("cannot encode JSON output")?;
        self.print(&format!("{text}\n"))
    }

    /// Print `value` as JSON, or `view(value)` as text.
    fn show<T: Serialize>(&mut self, value: &T, view: impl Fn(&T) -> String) -> anyhow::Result<()> {
        match self.output {
            Output::Json => self.print_json(value),
            Output::Table => self.print(&view(value)),
        }
    }

    fn eprint(&mut self, text: &str) {
        // Nothing sensible to do when stderr is gone.
        let _ = self.err.write_all(text.as_bytes());
        let _ = self.err.flush();
    }
}

/// The endpoint the options designate: `--url` if given, else `--socket`, else
/// `<data_dir>/tuchka.sock` when `TUCHKA_DATA_DIR` is set, else the default socket.
pub fn resolve_endpoint(opts: &GlobalOpts, data_dir: Option<&OsStr>) -> Endpoint {
    if let Some(url) = opts.url.as_deref().filter(|u| !u.trim().is_empty()) {
        return Endpoint::Http {
            url: url.trim().to_string(),
            token: opts.token.clone(),
        };
    }
    let socket = match (&opts.socket, data_dir) {
        (Some(socket), _) if !socket.as_os_str().is_empty() => socket.clone(),
        (_, Some(dir)) if !dir.is_empty() => Path::new(dir).join("tuchka.sock"),
        _ => PathBuf::from(DEFAULT_SOCKET),
    };
    Endpoint::Unix(socket)
}

/// A client for the options (bearer token on any transport when given; the controller's
/// certificate pinned by `--fingerprint` when given).
pub fn client_for(opts: &GlobalOpts) -> Client {
    let data_dir = std::env::var_os("TUCHKA_DATA_DIR");
    let endpoint = resolve_endpoint(opts, data_dir.as_deref());
    let token = opts.token.clone().filter(|t| !t.is_empty());
    let client = Client::new(endpoint).with_token(token);
    match opts.fingerprint.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(sha) => client.with_fingerprint(sha),
        None => client,
    }
}

/// Run one command; returns the exit code. Errors are returned, not printed.
pub async fn execute(ctx: &mut Ctx<'_>, cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Image(c) => image(ctx, c).await,
        Command::Net(c) => net(ctx, c).await,
        Command::Group(c) => group(ctx, c).await,
        Command::Vm(c) => vm(ctx, c).await,
        Command::Host(c) => host(ctx, c).await,
        Command::Op(c) => op(ctx, c).await,
        Command::Balance(c) => balance(ctx, c).await,
        Command::Volume(c) => volume(ctx, c).await,
        Command::Storage => {
            let st: Storage = ctx.client.get("/v1/storage").await?;
            ctx.show(&st, render::storage_view)?;
            Ok(0)
        }
        Command::Check => check(ctx).await,
        Command::Ui => {
            let login: UiLogin = ctx.client.get("/v1/ui").await?;
            ctx.show(&login, render::ui_login)?;
            Ok(if login.link.is_some() { 0 } else { 1 })
        }
    }
}

/// Longest a follower's long poll waits on the controller for new console text.
const CONSOLE_WAIT_S: u64 = 20;

/// Print VM `name`'s console log; with `follow`, keep printing what comes (long polls from
/// the end of what was printed).
async fn console(ctx: &mut Ctx<'_>, name: &str, follow: bool) -> anyhow::Result<()> {
    let path = format!("{}/console/log", object("vms", name));
    let mut log: ConsoleLog = ctx.client.get(&path).await?;
    ctx.print(&log.text)?;
    if !follow {
        if !log.text.is_empty() && !log.text.ends_with('\n') {
            ctx.print("\n")?;
        }
        return Ok(());
    }
    loop {
        let next = format!("{path}?from={}&wait={CONSOLE_WAIT_S}", log.end);
        log = ctx.client.get(&next).await?;
        if log.missed > 0 {
            ctx.eprint(&format!(
                "[{} bytes of console output were not kept]\n",
                log.missed
            ));
        }
        ctx.print(&log.text)?;
    }
}

async fn image(ctx: &mut Ctx<'_>, cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Upload { file, name } => {
            let name = match name {
                Some(n) => n,
                None => default_image_name(&file)?,
            };
            let img = upload(ctx, &name, &file).await?;
            ctx.show(&img, render::image_detail)?;
        }
        ImageCmd::List => {
            let images: Vec<Image> = ctx.client.get("/v1/images").await?;
            ctx.show(&images, |i| render::image_table(i))?;
        }
        ImageCmd::Show { name } => {
            let img: Image = ctx.client.get(&object("images", &name)).await?;
            ctx.show(&img, render::image_detail)?;
        }
        ImageCmd::Rm { name } => {
            ctx.client.delete_empty(&object("images", &name)).await?;
            if ctx.output == Output::Table {
                ctx.print(&format!("image {name:?} removed\n"))?;
            }
        }
        ImageCmd::Create {
            name,
            from_vm,
            wait,
        } => {
            let body = ImageCapture { name, vm: from_vm };
            let op: Operation = ctx.client.post("/v1/images/capture", &body).await?;
            return follow(ctx, op, wait).await;
        }
        ImageCmd::Build {
            name,
            from,
            user_data,
            timeout,
            memory,
            disk,
            wait,
        } => {
            let script = std::fs::read_to_string(&user_data).with_context(|| {
                format!(
                    "cannot read --user-data file {:?}",
                    user_data.display().to_string()
                )
            })?;
            let body = ImageBuild {
                name,
                from,
                user_data: script,
                timeout_s: timeout,
                memory_mib: memory,
                disk_mib: disk,
            };
            let op: Operation = ctx.client.post("/v1/images/build", &body).await?;
            return follow(ctx, op, wait).await;
        }
        ImageCmd::Cache(ImageCacheCmd::List) => {
            let cached: Vec<CachedImage> = ctx.client.get("/v1/images/cache").await?;
            ctx.show(&cached, |c| render::cache_table(c))?;
        }
        ImageCmd::Cache(ImageCacheCmd::Prune) => {
            let pruned: CachePrune = ctx.client.post_no_body("/v1/images/cache/prune").await?;
            ctx.show(&pruned, render::prune_view)?;
        }
    }
    Ok(0)
}

async fn volume(ctx: &mut Ctx<'_>, cmd: VolumeCmd) -> anyhow::Result<i32> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            near,
            host,
        } => {
            let body = VolumeCreate {
                name,
                size_mib: size,
                near,
                host,
            };
            let v: Volume = ctx.client.post("/v1/volumes", &body).await?;
            ctx.show(&v, render::volume_detail)?;
        }
        VolumeCmd::Attach { name, vm, wait } => {
            let path = format!("{}/attach", object("volumes", &name));
            let op: Operation = ctx.client.post(&path, &VolumeAttach { vm }).await?;
            return follow(ctx, op, wait).await;
        }
        VolumeCmd::Detach { name, wait } => {
            let path = format!("{}/detach", object("volumes", &name));
            let op: Operation = ctx.client.post_no_body(&path).await?;
            return follow(ctx, op, wait).await;
        }
        VolumeCmd::Resize { name, size, wait } => {
            let path = format!("{}/resize", object("volumes", &name));
            let body = VolumeResize { size_mib: size };
            let op: Operation = ctx.client.post(&path, &body).await?;
            return follow(ctx, op, wait).await;
        }
        VolumeCmd::List => {
            let v: Vec<Volume> = ctx.client.get("/v1/volumes").await?;
            ctx.show(&v, |v| render::volume_table(v))?;
        }
        VolumeCmd::Show { name } => {
            let v: Volume = ctx.client.get(&object("volumes", &name)).await?;
            ctx.show(&v, render::volume_detail)?;
        }
        VolumeCmd::Rm { name } => {
            ctx.client.delete_empty(&object("volumes", &name)).await?;
            if ctx.output == Output::Table {
                ctx.print(&format!("volume {name:?} removed\n"))?;
            }
        }
    }
    Ok(0)
}

/// The image name implied by a file: its file name up to the first dot.
pub fn default_image_name(file: &Path) -> anyhow::Result<String> {
    let stem = file
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    if stem.is_empty() {
        bail!(
            "cannot derive an image name from {:?}; give one with --name",
            file.display().to_string()
        );
    }
    Ok(stem)
}

async fn upload(ctx: &mut Ctx<'_>, name: &str, file: &Path) -> anyhow::Result<Image> {
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("uploading {name}"));
    let tick = bar.clone();
    let result = ctx
        .client
        .upload_image(name, file, move |sent| tick.set_position(sent))
        .await;
    bar.finish_and_clear();
    result.with_context(|| {
        format!(
            "upload of {:?} as image {name:?} failed",
            file.display().to_string()
        )
    })
}

async fn net(ctx: &mut Ctx<'_>, cmd: NetCmd) -> anyhow::Result<i32> {
    match cmd {
        NetCmd::Create {
            name,
            cidr,
            gateway,
            nat,
            wait,
        } => {
            let body = NetworkCreate {
                name,
                cidr,
                gateway,
                nat,
            };
            let op: Operation = ctx.client.post("/v1/networks", &body).await?;
            follow(ctx, op, wait).await
        }
        NetCmd::Rule(cmd) => rule(ctx, cmd).await,
        NetCmd::Forward(cmd) => forward(ctx, cmd).await,
        NetCmd::List => {
            let nets: Vec<Network> = ctx.client.get("/v1/networks").await?;
            ctx.show(&nets, |n| render::network_table(n))?;
            Ok(0)
        }
        NetCmd::Show { name } => {
            let net: Network = ctx.client.get(&object("networks", &name)).await?;
            ctx.show(&net, render::network_detail)?;
            Ok(0)
        }
        NetCmd::Rm { name, wait } => {
            let op: Operation = ctx.client.delete(&object("networks", &name)).await?;
            follow(ctx, op, wait).await
        }
    }
}

async fn group(ctx: &mut Ctx<'_>, cmd: GroupCmd) -> anyhow::Result<i32> {
    match cmd {
        GroupCmd::Create(args) => {
            let wait = args.wait;
            let body = group_create_body(&args)?;
            let op: Operation = ctx.client.post("/v1/groups", &body).await?;
            follow(ctx, op, wait).await
        }
        GroupCmd::List => {
            let groups: Vec<Group> = ctx.client.get("/v1/groups").await?;
            ctx.show(&groups, |g| render::group_table(g))?;
            Ok(0)
        }
        GroupCmd::Show { name } => {
            let g: Group = ctx.client.get(&object("groups", &name)).await?;
            ctx.show(&g, render::group_detail)?;
            Ok(0)
        }
        GroupCmd::Scale { name, count, wait } => {
            let path = format!("{}/scale", object("groups", &name));
            let op: Operation = ctx.client.post(&path, &GroupScale { count }).await?;
            follow(ctx, op, wait).await
        }
        GroupCmd::Rm { name, wait } => {
            let op: Operation = ctx.client.delete(&object("groups", &name)).await?;
            follow(ctx, op, wait).await
        }
    }
}

/// Build the `GroupCreate` body, reading `--user-data` and `--ssh-key` files.
fn group_create_body(args: &GroupCreateArgs) -> anyhow::Result<GroupCreate> {
    let user_data = match &args.user_data {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read --user-data file {:?}",
                path.display().to_string()
            )
        })?),
        None => None,
    };
    let mut ssh_keys = Vec::new();
    for path in &args.ssh_keys {
        let shown = path.display().to_string();
        let content = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --ssh-key file {shown:?}"))?;
        ssh_keys.extend(parse_ssh_keys(&shown, &content)?);
    }
    Ok(GroupCreate {
        name: args.name.clone(),
        image: args.image.clone(),
        count: args.count,
        cpus: args.cpus,
        memory_mib: args.memory,
        disk_mib: args.disk.unwrap_or(0),
        networks: args.nets.clone(),
        user_data,
        ssh_keys,
        placement: Some(args.placement),
        anti_affinity: args.anti_affinity,
        volume_size_mib: args.volume_size,
        keep_volumes: args.keep_volumes,
        max_cpus: args.max_cpus,
    })
}

/// The public keys in an ssh key file (`.pub` or `authorized_keys`): its non-empty,
/// non-comment lines. A private key or a file without keys is an error naming the file.
pub fn parse_ssh_keys(file: &str, content: &str) -> anyhow::Result<Vec<String>> {
    if content.contains("PRIVATE KEY") {
        bail!("--ssh-key file {file:?} is a private key; pass the public key (the .pub file)");
    }
    let keys: Vec<String> = content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        bail!("--ssh-key file {file:?} holds no public key");
    }
    Ok(keys)
}

async fn vm(ctx: &mut Ctx<'_>, cmd: VmCmd) -> anyhow::Result<i32> {
    let (name, action, wait) = match cmd {
        VmCmd::List => {
            let vms: Vec<Vm> = ctx.client.get("/v1/vms").await?;
            ctx.show(&vms, |v| render::vm_table(v))?;
            return Ok(0);
        }
        VmCmd::Show { name } => {
            let vm: Vm = ctx.client.get(&object("vms", &name)).await?;
            ctx.show(&vm, render::vm_detail)?;
            return Ok(0);
        }
        VmCmd::Console { name, follow } => {
            console(ctx, &name, follow).await?;
            return Ok(0);
        }
        VmCmd::Stop {
            name,
            force,
            timeout,
            wait,
        } => {
            let path = format!("{}/stop", object("vms", &name));
            let body = VmStop {
                force,
                timeout_s: timeout,
            };
            let op: Operation = ctx.client.post(&path, &body).await?;
            return follow(ctx, op, wait).await;
        }
        VmCmd::Rm(a) => {
            let op: Operation = ctx.client.delete(&object("vms", &a.name)).await?;
            return follow(ctx, op, a.wait).await;
        }
        VmCmd::Resize {
            name,
            cpus,
            memory,
            disk,
            wait,
        } => {
            let path = format!("{}/resize", object("vms", &name));
            let body = VmResize {
                cpus,
                memory_mib: memory,
                disk_mib: disk,
            };
            let op: Operation = ctx.client.post(&path, &body).await?;
            return follow(ctx, op, wait).await;
        }
        VmCmd::Migrate { name, to, wait } => {
            let path = format!("{}/migrate", object("vms", &name));
            let op: Operation = ctx.client.post(&path, &VmMigrate { to }).await?;
            return follow(ctx, op, wait).await;
        }
        VmCmd::Start(a) => (a.name, "start", a.wait),
        VmCmd::Pause(a) => (a.name, "pause", a.wait),
        VmCmd::Resume(a) => (a.name, "resume", a.wait),
        VmCmd::Reboot(a) => (a.name, "reboot", a.wait),
    };
    let path = format!("{}/{action}", object("vms", &name));
    let op: Operation = ctx.client.post_no_body(&path).await?;
    follow(ctx, op, wait).await
}

async fn host(ctx: &mut Ctx<'_>, cmd: HostCmd) -> anyhow::Result<i32> {
    match cmd {
        HostCmd::List => {
            let hosts: Vec<Host> = ctx.client.get("/v1/hosts").await?;
            ctx.show(&hosts, |h| render::host_table(h))?;
        }
        HostCmd::Show { name } => {
            let h: Host = ctx.client.get(&object("hosts", &name)).await?;
            ctx.show(&h, render::host_detail)?;
        }
        HostCmd::JoinToken {
            ttl,
            single_use,
            rotate,
            host,
        } => {
            let req = JoinTokenCreate {
                ttl_s: ttl.map(u64::from),
                single_use,
                rotate,
                host,
            };
            let join: JoinToken = ctx.client.post("/v1/join-tokens", &req).await?;
            if ctx.output == Output::Table {
                // The command alone on stdout (for scripts); what it admits on stderr.
                eprint!("{}", render::join_token_note(&join));
            }
            ctx.show(&join, render::join_token)?;
        }
        HostCmd::Rm { name, force } => {
            let path = format!(
                "{}{}",
                object("hosts", &name),
                if force { "?force=true" } else { "" }
            );
            let r: HostRemoved = ctx.client.delete(&path).await?;
            ctx.show(&r, render::host_removed)?;
        }
        HostCmd::Drain {
            name,
            parallel,
            wait,
        } => {
            let d: Drain = ctx
                .client
                .post(
                    &format!("{}/drain", object("hosts", &name)),
                    &HostDrain { parallel },
                )
                .await?;
            if wait {
                if let Some(op) = d.operation {
                    if ctx.output == Output::Table {
                        ctx.print(&format!(
                            "host {} is {}: no new placements; moving its VMs off\n",
                            d.host.name, d.host.state
                        ))?;
                    }
                    return follow(ctx, op, true).await;
                }
            }
            ctx.show(&d, render::drain)?;
        }
        HostCmd::Undrain { name } => {
            let h: Host = ctx
                .client
                .post_no_body(&format!("{}/undrain", object("hosts", &name)))
                .await?;
            ctx.show(&h, render::host_detail)?;
        }
        HostCmd::Revoke { name } => {
            let path = format!("{}/revoke", object("hosts", &name));
            let h: Host = ctx.client.post_no_body(&path).await?;
            ctx.show(&h, render::host_revoked)?;
        }
    }
    Ok(0)
}

async fn balance(ctx: &mut Ctx<'_>, cmd: BalanceCmd) -> anyhow::Result<i32> {
    match cmd {
        BalanceCmd::Plan => {
            let p: BalancePlan = ctx.client.get("/v1/balance/plan").await?;
            ctx.show(&p, render::balance_plan)?;
            Ok(0)
        }
        BalanceCmd::Status => {
            let s: BalanceStatus = ctx.client.get("/v1/balance").await?;
            ctx.show(&s, render::balance_status)?;
            Ok(0)
        }
        BalanceCmd::Apply { wait } => {
            let op: Operation = ctx.client.post_no_body("/v1/balance/apply").await?;
            follow(ctx, op, wait).await
        }
    }
}

async fn op(ctx: &mut Ctx<'_>, cmd: OpCmd) -> anyhow::Result<i32> {
    match cmd {
        OpCmd::List => {
            let ops: Vec<Operation> = ctx.client.get("/v1/operations").await?;
            ctx.show(&ops, |o| render::operation_table(o))?;
            Ok(0)
        }
        OpCmd::Show { id } => {
            let op: Operation = ctx.client.get(&object("operations", &id)).await?;
            ctx.show(&op, render::operation_detail)?;
            Ok(0)
        }
        OpCmd::Wait { id } => {
            let op: Operation = ctx.client.get(&object("operations", &id)).await?;
            follow(ctx, op, true).await
        }
    }
}

async fn check(ctx: &mut Ctx<'_>) -> anyhow::Result<i32> {
    let items: Vec<CheckItem> =
        tokio::task::spawn_blocking(|| tuchka_host::run_checks(LIBVIRT_URI))
            .await
            .context("the host checks crashed")?;
    ctx.show(&items, |i| render::check_report(i))?;
    Ok(if items.iter().all(|i| i.ok) { 0 } else { 1 })
}

/// `/v1/{kind}/{name}` with the name percent-encoded.
async fn rule(ctx: &mut Ctx<'_>, cmd: RuleCmd) -> anyhow::Result<i32> {
    match cmd {
        RuleCmd::Add {
            network,
            allow,
            allow_out,
            deny_out,
            from,
            from_group,
            from_net,
            to_group,
            to,
        } => {
            use tuchka_api::{Direction, RuleAction};
            let (direction, action, spec) = match (allow, allow_out, deny_out) {
                (Some(s), None, None) => (Direction::In, RuleAction::Allow, s),
                (None, Some(s), None) => (Direction::Out, RuleAction::Allow, s),
                (None, None, Some(s)) => (Direction::Out, RuleAction::Deny, s),
                _ => bail!("give exactly one of --allow SPEC, --allow-out SPEC or --deny-out SPEC"),
            };
            let body = RuleCreate {
                direction: Some(direction),
                action: Some(action),
                spec,
                from,
                from_group,
                from_network: from_net,
                to_group,
                to,
            };
            let r: Rule = ctx
                .client
                .post(&format!("{}/rules", object("networks", &network)), &body)
                .await?;
            ctx.show(&r, |r| render::rule_table(std::slice::from_ref(r)))?;
        }
        RuleCmd::List { network } => {
            let rules: Vec<Rule> = ctx
                .client
                .get(&format!("{}/rules", object("networks", &network)))
                .await?;
            ctx.show(&rules, |r| render::rule_table(r))?;
        }
        RuleCmd::Rm { network, id } => {
            ctx.client
                .delete_empty(&format!(
                    "{}/rules/{}",
                    object("networks", &network),
                    segment(&id)
                ))
                .await?;
            if ctx.output == Output::Table {
                ctx.print(&format!("rule {id} removed from network {network}\n"))?;
            }
        }
    }
    Ok(0)
}

async fn forward(ctx: &mut Ctx<'_>, cmd: ForwardCmd) -> anyhow::Result<i32> {
    match cmd {
        ForwardCmd::Add {
            network,
            host_port,
            to,
            udp,
        } => {
            let body = ForwardCreate {
                host_port,
                to,
                proto: Some(if udp {
                    tuchka_api::Protocol::Udp
                } else {
                    tuchka_api::Protocol::Tcp
                }),
            };
            let f: Forward = ctx
                .client
                .post(&format!("{}/forwards", object("networks", &network)), &body)
                .await?;
            ctx.show(&f, |f| render::forward_table(std::slice::from_ref(f)))?;
        }
        ForwardCmd::List { network } => {
            let fs: Vec<Forward> = ctx
                .client
                .get(&format!("{}/forwards", object("networks", &network)))
                .await?;
            ctx.show(&fs, |f| render::forward_table(f))?;
        }
        ForwardCmd::Rm { network, id } => {
            ctx.client
                .delete_empty(&format!(
                    "{}/forwards/{}",
                    object("networks", &network),
                    segment(&id)
                ))
                .await?;
            if ctx.output == Output::Table {
                ctx.print(&format!("forward {id} removed from network {network}\n"))?;
            }
        }
    }
    Ok(0)
}

fn object(kind: &str, name: &str) -> String {
    format!("/v1/{kind}/{}", segment(name))
}

/// After a long action: print the operation, or follow it to the end with `--wait`.
async fn follow(ctx: &mut Ctx<'_>, op: Operation, wait: bool) -> anyhow::Result<i32> {
    if !wait && !op.is_finished() {
        ctx.show(&op, render::operation_started)?;
        return Ok(0);
    }
    let op = if op.is_finished() {
        op
    } else {
        wait_with_spinner(&ctx.client, &op).await?
    };
    finished(ctx, &op)
}

/// Print a finished operation; exit code 0 if it succeeded, 1 (with the error) if not.
fn finished(ctx: &mut Ctx<'_>, op: &Operation) -> anyhow::Result<i32> {
    match ctx.output {
        Output::Json => ctx.print_json(op)?,
        Output::Table if op.state == OperationState::Succeeded => {
            let detail = match &op.migration {
                Some(m) => format!(" ({})", render::migration_line(m)),
                None if op.message.is_empty() => String::new(),
                None => format!(" ({})", op.message),
            };
            ctx.print(&format!("{} {}: succeeded{detail}\n", op.kind, op.target))?;
        }
        Output::Table => {}
    }
    if op.state == OperationState::Succeeded {
        Ok(0)
    } else {
        let lines = operation_failure_lines(op);
        ctx.eprint(&format_lines(&lines));
        Ok(1)
    }
}

/// Follow `op` with a spinner (and a bar once the total is known) on stderr.
async fn wait_with_spinner(client: &Client, op: &Operation) -> anyhow::Result<Operation> {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let spinner = ProgressStyle::with_template("{spinner} {prefix} {msg}").ok();
    let counted = ProgressStyle::with_template("{spinner} {prefix} [{bar:20}] {pos}/{len} {msg}")
        .ok()
        .map(|s| s.progress_chars("=> "));
    if let Some(style) = spinner {
        bar.set_style(style);
    }
    bar.set_prefix(format!("{} {}", op.kind, op.target));
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut counting = false;
    let result = client
        .wait_operation(&op.id, |update| {
            if update.total > 0 {
                if let (false, Some(style)) = (counting, counted.clone()) {
                    bar.set_style(style);
                    counting = true;
                }
                bar.set_length(u64::from(update.total));
                bar.set_position(u64::from(update.done));
            }
            bar.set_message(update.message.clone());
        })
        .await;
    bar.finish_and_clear();
    result.with_context(|| format!("lost track of operation {}", op.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> GlobalOpts {
        GlobalOpts::default()
    }

    #[test]
    fn endpoint_precedence() {
        assert_eq!(
            resolve_endpoint(&opts(), None),
            Endpoint::Unix(PathBuf::from("/var/lib/tuchka/tuchka.sock"))
        );
        assert_eq!(
            resolve_endpoint(&opts(), Some(OsStr::new("/srv/t"))),
            Endpoint::Unix(PathBuf::from("/srv/t/tuchka.sock"))
        );
        let mut o = opts();
        o.socket = Some(PathBuf::from("/tmp/s.sock"));
        assert_eq!(
            resolve_endpoint(&o, Some(OsStr::new("/srv/t"))),
            Endpoint::Unix(PathBuf::from("/tmp/s.sock"))
        );
        o.url = Some("https://10.0.0.1:7070".into());
        o.token = Some("tok".into());
        assert_eq!(
            resolve_endpoint(&o, None),
            Endpoint::Http {
                url: "https://10.0.0.1:7070".into(),
                token: Some("tok".into())
            }
        );
        o.url = Some(String::new());
        assert_eq!(
            resolve_endpoint(&o, None),
            Endpoint::Unix(PathBuf::from("/tmp/s.sock"))
        );
    }

    #[test]
    fn image_names_default_to_the_file_stem() {
        assert_eq!(
            default_image_name(Path::new("/x/tuchka-test.qcow2")).expect("name"),
            "tuchka-test"
        );
        assert_eq!(
            default_image_name(Path::new("disk.img.gz")).expect("name"),
            "disk"
        );
        let err = default_image_name(Path::new("/x/.hidden")).expect_err("no stem");
        assert!(err.to_string().contains("--name"), "{err}");
    }

    #[test]
    fn ssh_key_files() {
        let keys = parse_ssh_keys(
            "k.pub",
            "# mine\nssh-ed25519 AAAA me@x\n\n  ssh-rsa BBBB you@y  \n",
        )
        .expect("keys");
        assert_eq!(keys, vec!["ssh-ed25519 AAAA me@x", "ssh-rsa BBBB you@y"]);
        let err = parse_ssh_keys("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n")
            .expect_err("private");
        assert!(err.to_string().contains("private key"), "{err}");
        let err = parse_ssh_keys("empty.pub", "\n# nothing\n").expect_err("empty");
        assert_eq!(
            err.to_string(),
            "--ssh-key file \"empty.pub\" holds no public key"
        );
    }

    #[test]
    fn missing_user_data_file_is_named() {
        let args = GroupCreateArgs {
            name: "web".into(),
            image: "base".into(),
            count: 1,
            cpus: 1,
            memory: 256,
            disk: None,
            nets: vec![],
            user_data: Some(PathBuf::from("/nonexistent/ud.yaml")),
            ssh_keys: vec![],
            placement: tuchka_api::PlacementPolicy::Spread,
            anti_affinity: false,
            volume_size: None,
            keep_volumes: false,
            max_cpus: None,
            wait: false,
        };
        let err = group_create_body(&args).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "cannot read --user-data file \"/nonexistent/ud.yaml\""
        );
        let args = GroupCreateArgs {
            user_data: None,
            ssh_keys: vec![PathBuf::from("/nonexistent/k.pub")],
            ..args
        };
        let err = group_create_body(&args).expect_err("missing key");
        assert_eq!(
            err.to_string(),
            "cannot read --ssh-key file \"/nonexistent/k.pub\""
        );
    }

    #[test]
    fn group_create_body_carries_every_option() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ud = dir.path().join("ud.yaml");
        std::fs::write(&ud, "#cloud-config\n").expect("write");
        let key = dir.path().join("k.pub");
        std::fs::write(&key, "ssh-ed25519 AAAA me\n").expect("write");
        let args = GroupCreateArgs {
            name: "web".into(),
            image: "base".into(),
            count: 3,
            cpus: 2,
            memory: 512,
            disk: Some(2048),
            nets: vec!["a".into(), "b".into()],
            user_data: Some(ud),
            ssh_keys: vec![key],
            placement: tuchka_api::PlacementPolicy::Pack,
            anti_affinity: false,
            volume_size: None,
            keep_volumes: false,
            max_cpus: None,
            wait: true,
        };
        let body = group_create_body(&args).expect("body");
        assert_eq!(
            body,
            GroupCreate {
                name: "web".into(),
                image: "base".into(),
                count: 3,
                cpus: 2,
                memory_mib: 512,
                disk_mib: 2048,
                networks: vec!["a".into(), "b".into()],
                user_data: Some("#cloud-config\n".into()),
                ssh_keys: vec!["ssh-ed25519 AAAA me".into()],
                placement: Some(tuchka_api::PlacementPolicy::Pack),
                anti_affinity: false,
                volume_size_mib: None,
                keep_volumes: false,
                max_cpus: None,
            }
        );
    }
}
