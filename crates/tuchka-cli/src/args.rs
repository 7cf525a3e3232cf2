//! The command line grammar (clap derive): global options and every subcommand.
//!
//! The lead's binary embeds [`Command`] and [`GlobalOpts`] in its own top-level parser (which
//! adds `serve` and `agent`); [`Cli`] is the same grammar on its own, for tests and reuse.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tuchka_api::PlacementPolicy;

use crate::size::{parse_duration_arg, parse_size_arg};

/// Help heading of the options every subcommand accepts.
const GLOBAL: &str = "Global options";

/// The tuchka command line (everything except `serve` and `agent`).
#[derive(Debug, Clone, Parser)]
#[command(name = "tuchka", version, about = "A small cloud on libvirt.")]
pub struct Cli {
    /// Where and how to talk to the controller.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every client subcommand understands.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalOpts {
    /// Controller unix socket [default: $TUCHKA_DATA_DIR/tuchka.sock if TUCHKA_DATA_DIR is set,
    /// else /var/lib/tuchka/tuchka.sock].
    #[arg(
        long,
        env = "TUCHKA_SOCKET",
        global = true,
        value_name = "PATH",
        help_heading = GLOBAL
    )]
    pub socket: Option<PathBuf>,
    /// Controller URL (https://HOST:PORT); used instead of the socket when set.
    #[arg(
        long,
        env = "TUCHKA_URL",
        global = true,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub url: Option<String>,
    /// Bearer token for --url.
    #[arg(
        long,
        env = "TUCHKA_TOKEN",
        global = true,
        value_name = "T",
        hide_env_values = true,
        help_heading = GLOBAL
    )]
    pub token: Option<String>,
    /// sha256 of the controller's CA certificate, to trust --url by (printed by
    /// `tuchka host join-token`).
    #[arg(
        long,
        env = "TUCHKA_FINGERPRINT",
        global = true,
        value_name = "SHA256",
        help_heading = GLOBAL
    )]
    pub fingerprint: Option<String>,
    /// Output format: aligned tables for people, or the raw API JSON.
    #[arg(
        short = 'o',
        long,
        value_enum,
        global = true,
        default_value_t = Output::Table,
        help_heading = GLOBAL
    )]
    pub output: Output,
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns and `key: value` lines.
    #[default]
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// The client subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Upload, list and remove disk images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Create, list and remove virtual networks.
    #[command(subcommand, visible_alias = "network")]
    Net(NetCmd),
    /// Launch, scale and remove groups of VMs.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Inspect VMs and change their power state.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Inspect hypervisor hosts.
    #[command(subcommand)]
    Host(HostCmd),
    /// Inspect and follow operations.
    #[command(subcommand, visible_alias = "operation")]
    Op(OpCmd),
    /// Even out the load across hosts: see the plan, carry it out, see what the balancer did.
    #[command(subcommand)]
    Balance(BalanceCmd),
    /// Data volumes: thin disks on one host, attached to a VM there.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Disk space: every host's pool and the controller's image store.
    Storage,
    /// Print a link that opens the web dashboard logged in (the token rides in the URL's
    /// fragment, which browsers never send to a server).
    Ui,
    /// Check that this machine can run tuchka (CPU flags, /dev/kvm, libvirt, tools).
    Check,
}

/// `tuchka image …`
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCmd {
    /// Upload a qcow2 or raw disk image (streamed; progress on stderr).
    Upload {
        /// The image file.
        file: PathBuf,
        /// Image name [default: the file name up to its first dot].
        #[arg(long, short = 'n')]
        name: Option<String>,
    },
    /// List images.
    #[command(visible_alias = "ls")]
    List,
    /// Show one image.
    Show {
        /// Image name.
        name: String,
    },
    /// Remove an image (refused while VMs use it).
    #[command(visible_alias = "delete")]
    Rm {
        /// Image name.
        name: String,
    },
    /// Make an image of a VM's root disk; a running VM keeps running (a point-in-time copy).
    Create {
        /// Name of the new image.
        name: String,
        /// The VM whose disk becomes the image.
        #[arg(long, value_name = "VM")]
        from_vm: String,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Build an image: a builder VM from --from runs the script, powers itself off, and its
    /// disk becomes the image; the builder and its network are removed whatever happens.
    Build {
        /// Name of the new image.
        name: String,
        /// The image to start from.
        #[arg(long, value_name = "IMAGE")]
        from: String,
        /// The script (NoCloud user-data) the builder runs; it must end by powering off.
        #[arg(long, value_name = "FILE")]
        user_data: PathBuf,
        /// How long the builder may take, e.g. 90s, 10m [default: 10m].
        #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
        timeout: Option<u32>,
        /// Memory of the builder [default: 256M].
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        memory: Option<u64>,
        /// Root disk of the builder, and so the image's size [default: the image's].
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        disk: Option<u64>,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// The images cached on hosts.
    #[command(subcommand)]
    Cache(ImageCacheCmd),
}

/// `tuchka image cache …`
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCacheCmd {
    /// What is cached where, and what uses it.
    #[command(visible_alias = "ls")]
    List,
    /// Drop every cached image nothing uses now (the hosts remove them on their next pass).
    Prune,
}

/// `tuchka volume …`
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCmd {
    /// Make a thin data volume on one host.
    Create {
        /// Volume name.
        name: String,
        /// Size, e.g. 10G.
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        size: u64,
        /// On the host of this VM.
        #[arg(long, value_name = "VM")]
        near: Option<String>,
        /// On this host [default: the one with the most free space].
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
    },
    /// Attach a volume to a VM on its host (hot-plugged when the VM runs).
    Attach {
        /// Volume name.
        name: String,
        /// VM name.
        vm: String,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Detach a volume from its VM.
    Detach {
        /// Volume name.
        name: String,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Grow a volume (online when attached).
    Resize {
        /// Volume name.
        name: String,
        /// New size, e.g. 20G.
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        size: u64,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// List volumes: host, size, allocated, attached to.
    #[command(visible_alias = "ls")]
    List,
    /// Show one volume.
    Show {
        /// Volume name.
        name: String,
    },
    /// Remove a volume (refused while attached).
    #[command(visible_alias = "delete")]
    Rm {
        /// Volume name.
        name: String,
    },
}

/// `tuchka net …`
#[derive(Debug, Clone, Subcommand)]
pub enum NetCmd {
    /// Create a network.
    Create {
        /// Network name.
        name: String,
        /// IPv4 CIDR, e.g. 10.80.0.0/24 (prefix 16..=29).
        #[arg(long)]
        cidr: String,
        /// Gateway address inside the CIDR [default: its first usable address].
        #[arg(long)]
        gateway: Option<String>,
        /// Outbound NAT: VMs reach the outside through the host (without it: no route out).
        #[arg(long)]
        nat: bool,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Access rules: what may enter or leave the network.
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Port forwards: host address:port → VM:port.
    #[command(subcommand)]
    Forward(ForwardCmd),
    /// List networks.
    #[command(visible_alias = "ls")]
    List,
    /// Show one network and its addresses.
    Show {
        /// Network name.
        name: String,
    },
    /// Remove a network (refused while VMs use it).
    #[command(visible_alias = "delete")]
    Rm {
        /// Network name.
        name: String,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
}

/// `net rule …`
#[derive(Debug, Clone, Subcommand)]
pub enum RuleCmd {
    /// Add a rule: --allow SPEC with one source (inbound), or --allow-out / --deny-out SPEC.
    Add {
        /// Network name.
        network: String,
        /// Allow inbound traffic: tcp:80, tcp:8000-8100, udp:53, icmp or any.
        #[arg(long, value_name = "SPEC")]
        allow: Option<String>,
        /// Allow outbound traffic (first matching outbound rule wins). The cloud's hosts are
        /// reached only with --to naming the address itself, control ports (libvirt, migration,
        /// the API, VXLAN) only with a SPEC naming the port.
        #[arg(long, value_name = "SPEC")]
        allow_out: Option<String>,
        /// Deny outbound traffic.
        #[arg(long, value_name = "SPEC")]
        deny_out: Option<String>,
        /// Inbound source CIDR or address, e.g. 0.0.0.0/0 or 203.0.113.0/24.
        #[arg(long, value_name = "CIDR")]
        from: Option<String>,
        /// Inbound source: the VMs of this group (on any network).
        #[arg(long, value_name = "GROUP")]
        from_group: Option<String>,
        /// Inbound source: every address of this network.
        #[arg(long, value_name = "NETWORK")]
        from_net: Option<String>,
        /// Inbound: only to the VMs of this group [default: every VM of the network].
        #[arg(long, value_name = "GROUP")]
        to_group: Option<String>,
        /// Outbound destination CIDR [default: 0.0.0.0/0].
        #[arg(long, value_name = "CIDR")]
        to: Option<String>,
    },
    /// List the rules of a network.
    #[command(visible_alias = "ls")]
    List {
        /// Network name.
        network: String,
    },
    /// Remove a rule.
    #[command(visible_alias = "delete")]
    Rm {
        /// Network name.
        network: String,
        /// Rule id (see: net rule list).
        id: String,
    },
}

/// `net forward …`
#[derive(Debug, Clone, Subcommand)]
pub enum ForwardCmd {
    /// Forward a port of the network's gateway host to a VM.
    Add {
        /// Network name.
        network: String,
        /// Port on the host.
        #[arg(long)]
        host_port: u16,
        /// Target VM:PORT, e.g. web-0:80.
        #[arg(long, value_name = "VM:PORT")]
        to: String,
        /// Forward UDP instead of TCP.
        #[arg(long)]
        udp: bool,
    },
    /// List the forwards of a network.
    #[command(visible_alias = "ls")]
    List {
        /// Network name.
        network: String,
    },
    /// Remove a forward.
    #[command(visible_alias = "delete")]
    Rm {
        /// Network name.
        network: String,
        /// Forward id (see: net forward list).
        id: String,
    },
}

/// A wire name (`spread`, `live`, …) parsed into its API enum, for clap.
pub fn wire<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| e.to_string())
}

/// Arguments of `tuchka group create`.
#[derive(Debug, Clone, Args)]
pub struct GroupCreateArgs {
    /// Group name; its VMs are NAME-0 … NAME-{count-1}.
    pub name: String,
    /// Image name.
    #[arg(long)]
    pub image: String,
    /// Number of VMs (1..=100).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory per VM, e.g. 256M, 1G, 1.5G (a bare number is MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size_arg, value_name = "SIZE")]
    pub memory: u64,
    /// Root disk per VM [default: the image's virtual size].
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    pub disk: Option<u64>,
    /// Network to attach (one NIC each, in order); may repeat.
    #[arg(long = "net", value_name = "NETWORK")]
    pub nets: Vec<String>,
    /// NoCloud user-data file given to every VM.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// SSH public key file (.pub or authorized_keys); may repeat.
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// How to place the VMs on hosts: spread (on the hosts with the most free memory) or pack
    /// (on as few hosts as possible).
    #[arg(long, default_value = "spread", value_parser = wire::<PlacementPolicy>, value_name = "POLICY")]
    pub placement: PlacementPolicy,
    /// Never put two VMs of the group on one host.
    #[arg(long)]
    pub anti_affinity: bool,
    /// Give every VM a data volume of this size (its second disk, named VM-data).
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    pub volume_size: Option<u64>,
    /// Keep those volumes when their VMs are removed.
    #[arg(long, requires = "volume_size")]
    pub keep_volumes: bool,
    /// Most vCPUs a VM may be given while it runs (vm resize --cpus) [default: max(cpus, 4)].
    #[arg(long, value_name = "N")]
    pub max_cpus: Option<u32>,
    /// Follow the operation until it finishes.
    #[arg(long)]
    pub wait: bool,
}

/// `tuchka group …`
#[derive(Debug, Clone, Subcommand)]
pub enum GroupCmd {
    /// Launch a group of identical VMs (all or nothing).
    Create(GroupCreateArgs),
    /// List groups.
    #[command(visible_alias = "ls")]
    List,
    /// Show one group.
    Show {
        /// Group name.
        name: String,
    },
    /// Change the number of VMs (scaling down removes the highest indexes).
    Scale {
        /// Group name.
        name: String,
        /// New number of VMs (0..=100).
        #[arg(long)]
        count: u32,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a group and all its VMs.
    #[command(visible_alias = "delete")]
    Rm {
        /// Group name.
        name: String,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
}

/// A VM name plus `--wait`.
#[derive(Debug, Clone, Args)]
pub struct VmAction {
    /// VM name (GROUP-INDEX).
    pub name: String,
    /// Follow the operation until it finishes.
    #[arg(long)]
    pub wait: bool,
}

/// `tuchka vm …`
#[derive(Debug, Clone, Subcommand)]
pub enum VmCmd {
    /// List VMs.
    #[command(visible_alias = "ls")]
    List,
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
    },
    /// Start a stopped VM.
    Start(VmAction),
    /// Stop a VM (ACPI shutdown, forced after --timeout).
    Stop {
        /// VM name.
        name: String,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the ACPI shutdown before powering off [server default: 60].
        #[arg(long, value_name = "S")]
        timeout: Option<u32>,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Pause a running VM (vCPUs stop, memory kept).
    Pause(VmAction),
    /// Resume a paused VM.
    Resume(VmAction),
    /// Reboot a running VM.
    Reboot(VmAction),
    /// Remove a VM (its group's count goes down by one).
    #[command(visible_alias = "delete")]
    Rm(VmAction),
    /// Move a VM to another host: live if it runs or is paused (it keeps running and keeps
    /// its connections), cold if it is stopped (its disk moves, it stays stopped).
    Migrate {
        /// VM name.
        name: String,
        /// Target host [default: the scheduler picks one: the same filters as placement, the
        /// group's anti-affinity kept].
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
        /// Follow the migration until it finishes; prints total time, downtime and bytes moved.
        #[arg(long)]
        wait: bool,
    },
    /// Change a VM's size: the disk grows at once, vCPUs go up at once up to the VM's
    /// maximum; the rest applies at its next start (the output says which).
    Resize {
        /// VM name.
        name: String,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 512M.
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        memory: Option<u64>,
        /// Root disk, e.g. 4G (grow only).
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        disk: Option<u64>,
        /// Follow the operation until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Print the VM's serial console log (the last MiB; a VM on any host).
    Console {
        /// VM name.
        name: String,
        /// Keep printing new lines as they come (Ctrl-C to stop).
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// `tuchka host …`
#[derive(Debug, Clone, Subcommand)]
pub enum HostCmd {
    /// List hosts.
    #[command(visible_alias = "ls")]
    List,
    /// Show one host.
    Show {
        /// Host name.
        name: String,
    },
    /// Make a join token and print the command that joins a new host (agent) with it. Only its
    /// sha256 is kept: it is shown this once. It expires; registering under the name of an
    /// existing host is refused with any token.
    JoinToken {
        /// How long it admits hosts, e.g. 10m, 1h, 24h (at most 30 days) [default: 1h].
        #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
        ttl: Option<u32>,
        /// It admits one host only: the first registration uses it up.
        #[arg(long)]
        single_use: bool,
        /// Refuse every other join token from now on (the one in <data-dir>/join.txt too);
        /// this one replaces it there.
        #[arg(long)]
        rotate: bool,
        /// For the existing host NAME that lost its identity (a reinstalled machine): it joins
        /// again as that host, with its VMs. Single-use.
        #[arg(long, value_name = "NAME", conflicts_with = "rotate")]
        host: Option<String>,
    },
    /// Revoke a host: its agent's credential is refused from now on (it may join again only
    /// with a valid join token; rotate them with `host join-token --rotate` to keep it out).
    Revoke {
        /// Host name.
        name: String,
    },
    /// Remove a host from the cloud: refused while it is up with VMs (drain it first). Its
    /// identity is refused from then on: the machine joins again only as a new host.
    #[command(visible_alias = "remove")]
    Rm {
        /// Host name.
        name: String,
        /// For a host that is gone (down) with VMs: they become `lost`, their addresses are
        /// freed, and the deletions they hold up (group rm, net rm, image rm) complete.
        #[arg(long)]
        force: bool,
    },
    /// Drain a host: no new VMs are placed on it, and every VM on it moves off (live if it
    /// runs or is paused, cold if stopped), spread over the other hosts.
    Drain {
        /// Host name.
        name: String,
        /// Most migrations at once from the host [server default: 2].
        #[arg(long, value_name = "N")]
        parallel: Option<u32>,
        /// Follow the drain until every VM moved (exit 1 listing those that could not).
        #[arg(long)]
        wait: bool,
    },
    /// Undrain a host: it accepts new VMs again.
    Undrain {
        /// Host name.
        name: String,
    },
}

/// `tuchka balance …`
#[derive(Debug, Clone, Subcommand)]
pub enum BalanceCmd {
    /// The moves that would even out the load now: each with its reason, the imbalance before
    /// and after, and its cost. Changes nothing.
    Plan,
    /// Carry out the plan now (one operation, one migration per move).
    Apply {
        /// Follow it until every move finished.
        #[arg(long)]
        wait: bool,
    },
    /// The current imbalance, the balancer's mode and its last decisions (and why nothing moved).
    Status,
}

/// `tuchka op …`
#[derive(Debug, Clone, Subcommand)]
pub enum OpCmd {
    /// List operations.
    #[command(visible_alias = "ls")]
    List,
    /// Show one operation.
    Show {
        /// Operation id.
        id: String,
    },
    /// Follow an operation until it finishes (exit 1 if it failed).
    Wait {
        /// Operation id.
        id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tuchka").chain(args.iter().copied()))
    }

    #[test]
    fn grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn group_create_parses_every_option() {
        let cli = parse(&[
            "group",
            "create",
            "web",
            "--image",
            "base",
            "--count",
            "3",
            "--cpus",
            "2",
            "--memory",
            "1.5G",
            "--disk",
            "2G",
            "--net",
            "a",
            "--net",
            "b",
            "--ssh-key",
            "k1.pub",
            "--ssh-key",
            "k2.pub",
            "--user-data",
            "ud.yaml",
            "--placement",
            "pack",
            "--wait",
            "-o",
            "json",
        ])
        .expect("parse");
        assert_eq!(cli.global.output, Output::Json);
        let Command::Group(GroupCmd::Create(a)) = cli.command else {
            panic!("wrong command {:?}", cli.command);
        };
        assert_eq!(a.name, "web");
        assert_eq!(a.count, 3);
        assert_eq!(a.cpus, 2);
        assert_eq!(a.memory, 1536);
        assert_eq!(a.disk, Some(2048));
        assert_eq!(a.nets, vec!["a", "b"]);
        assert_eq!(a.ssh_keys.len(), 2);
        assert_eq!(a.placement, PlacementPolicy::Pack);
        assert!(a.wait);
    }

    #[test]
    fn group_create_defaults() {
        let cli = parse(&["group", "create", "web", "--image", "base"]).expect("parse");
        let Command::Group(GroupCmd::Create(a)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!((a.count, a.cpus, a.memory, a.disk), (1, 1, 256, None));
        assert_eq!(a.placement, PlacementPolicy::Spread);
        assert!(!a.wait);
    }

    #[test]
    fn bad_sizes_are_rejected_with_the_hint() {
        let err =
            parse(&["group", "create", "w", "--image", "i", "--memory", "12X"]).expect_err("12X");
        let text = err.to_string();
        assert!(
            text.contains("invalid size \"12X\": use a number with M or G, e.g. 256M"),
            "{text}"
        );
    }

    #[test]
    fn vm_stop_options() {
        let cli =
            parse(&["vm", "stop", "web-0", "--force", "--timeout", "5", "--wait"]).expect("parse");
        match cli.command {
            Command::Vm(VmCmd::Stop {
                name,
                force,
                timeout,
                wait,
            }) => {
                assert_eq!(name, "web-0");
                assert!(force && wait);
                assert_eq!(timeout, Some(5));
            }
            other => panic!("wrong command {other:?}"),
        }
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&["vm", "list", "--socket", "/tmp/x.sock", "-o", "json"]).expect("parse");
        assert_eq!(cli.global.socket, Some(PathBuf::from("/tmp/x.sock")));
        assert_eq!(cli.global.output, Output::Json);
        let cli = parse(&["--url", "http://h:1", "--token", "t", "host", "ls"]).expect("parse");
        assert_eq!(cli.global.url.as_deref(), Some("http://h:1"));
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        assert!(matches!(cli.command, Command::Host(HostCmd::List)));
    }

    #[test]
    fn host_rm_and_join_token_options() {
        let cli = parse(&["host", "rm", "h2", "--force"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Host(HostCmd::Rm { ref name, force: true }) if name == "h2"
        ));
        let cli = parse(&["host", "join-token", "--ttl", "24h", "--single-use"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Host(HostCmd::JoinToken {
                ttl: Some(86400),
                single_use: true,
                rotate: false,
                host: None
            })
        ));
        assert!(parse(&["host", "join-token", "--ttl", "soon"]).is_err());
        assert!(parse(&["host", "join-token", "--rotate", "--host", "h2"]).is_err());
    }

    #[test]
    fn unknown_output_format_is_refused() {
        assert!(parse(&["vm", "list", "-o", "yaml"]).is_err());
    }
}
