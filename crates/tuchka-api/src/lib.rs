//! Wire types of the tuchka API: what the CLI, the agents and the controller exchange.
//!
//! Every request and response body of `/v1` is defined here and nowhere else, so the server,
//! the agent and the CLI cannot drift apart. Requests reject unknown fields. Sizes are MiB,
//! times are RFC 3339 strings in UTC, ids are UUID strings.
//!
//! Two audiences share the types:
//! - users (CLI, scripts): images, networks, groups, vms, hosts, operations, events;
//! - agents: [`agent`] holds the desired state a host pulls and the report it pushes back.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A closed set of names on the wire: a `Copy` enum serialised as its lowercase (or dotted) name,
/// with [`as_str`](VmState::as_str), `Display` and `FromStr` (the error lists the valid names).
macro_rules! wire_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used on the wire, in tables and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::UnknownName;
            fn from_str(s: &str) -> Result<Self, $crate::UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::UnknownName {
                        what: stringify!($name),
                        given: s.to_string(),
                        valid: &[$($text),+],
                    }),
                }
            }
        }
    };
}

pub(crate) use wire_enum;

pub mod agent;

/// A name that is not one of a [`wire_enum!`]'s values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// The type, e.g. `HostState`.
    pub what: &'static str,
    /// What was given.
    pub given: String,
    /// The names that are valid.
    pub valid: &'static [&'static str],
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a valid {}: use {}",
            self.given,
            self.what,
            self.valid.join(", ")
        )
    }
}

impl std::error::Error for UnknownName {}

/// The error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `VmNotFound`, `InvalidName`, `Conflict`.
    pub code: String,
    /// What failed, on which object, and what to do.
    pub message: String,
    /// The cause chain, outermost first (may be empty).
    #[serde(default)]
    pub chain: Vec<String>,
}

/// [`ApiError::code`] of a `401` to an agent whose host was revoked (`tuchka host revoke`):
/// its credential is refused for good; only a new join with a join token admits it again.
pub const CODE_HOST_REVOKED: &str = "HostRevoked";

/// [`ApiError::code`] of a `401` to an agent whose host was removed (`tuchka host rm`): its
/// identity is refused for good, even with a join token; the machine joins again only as a new
/// host (its `<pool>/identity/` deleted, a valid join token given).
pub const CODE_HOST_REMOVED: &str = "HostRemoved";

/// [`ApiError::code`] of a `409` to a registration under the name of another host (without
/// that host's identity).
pub const CODE_HOST_NAME_TAKEN: &str = "HostNameTaken";

/// A new join token (`POST /v1/join-tokens`, `tuchka host join-token`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenCreate {
    /// How long it admits hosts, seconds (1 ..= 30 days); default 3600.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// It admits one host only: the first registration with it uses it up.
    #[serde(default)]
    pub single_use: bool,
    /// Refuse every other join token from now on, and make this one the token of
    /// `<data-dir>/join.txt`.
    #[serde(default)]
    pub rotate: bool,
    /// It admits only the existing host of this name (one that lost its identity, e.g. a
    /// reinstalled machine), which keeps its id and VMs; implies `single_use`.
    #[serde(default)]
    pub host: Option<String>,
}

/// How a new host joins this cloud: a join token, made by `POST /v1/join-tokens` (shown once:
/// the controller keeps only its sha256) or at the start of `serve --listen`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct JoinToken {
    /// The join token an agent presents to `POST /v1/agent/register` over TCP.
    pub token: String,
    /// URL agents reach the controller at (`https://ADDR:PORT`); absent without `--listen`.
    pub url: Option<String>,
    /// sha256 (hex) of the controller's CA certificate (DER), for `--fingerprint`.
    pub fingerprint: Option<String>,
    /// The command to run on the new host; absent without `--listen`.
    pub command: Option<String>,
    /// When it stops admitting hosts (RFC 3339).
    pub expires_at: String,
    /// It admits one host only.
    pub single_use: bool,
    /// The existing host it admits again, if it is bound to one.
    #[serde(default)]
    pub host: Option<String>,
}

/// What `DELETE /v1/hosts/{name}` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostRemoved {
    /// The host's name.
    pub name: String,
    /// Its id (refused from now on).
    pub id: String,
    /// Its VMs that are now `lost` (their addresses freed).
    pub lost_vms: Vec<String>,
    /// Its VMs whose removal waited on it, now removed.
    pub removed_vms: Vec<String>,
    /// Its volumes, gone with it.
    pub lost_volumes: Vec<String>,
    /// Addresses freed.
    pub freed_addresses: Vec<String>,
    /// Networks whose gateway it was, and the host that took the role (or none).
    pub moved_gateways: Vec<String>,
}

/// Query of `DELETE /v1/hosts/{name}`.
#[derive(
    Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, utoipa::IntoParams,
)]
#[serde(deny_unknown_fields)]
pub struct HostRemove {
    /// Remove a host that is down with VMs on it: they become `lost`.
    #[serde(default)]
    pub force: bool,
}

wire_enum! {
    /// Observed power state of a VM, as libvirt reports it on its host.
    pub enum VmState {
        /// Recorded, not yet seen on its host.
        Pending = "pending",
        /// Being prepared or booted on its host.
        Starting = "starting",
        /// The domain runs.
        Running = "running",
        /// The domain is paused (vCPUs stopped, memory kept).
        Paused = "paused",
        /// A shutdown was requested and the domain still runs.
        Stopping = "stopping",
        /// The domain is defined and shut off.
        Stopped = "stopped",
        /// The host failed to converge it; see `error`.
        Error = "error",
        /// Its host stopped reporting; the last known state is not current.
        Unknown = "unknown",
        /// Its host was removed (`host rm --force`): the VM is gone with it and its
        /// addresses are free; `vm rm` or `group rm` removes its record.
        Lost = "lost",
    }
}

wire_enum! {
    /// The power state a user asked for.
    pub enum PowerState {
        /// Defined and running.
        Running = "running",
        /// Defined and paused.
        Paused = "paused",
        /// Defined and shut off.
        Stopped = "stopped",
    }
}

wire_enum! {
    /// State of a host, as the controller sees it.
    pub enum HostState {
        /// Reporting; accepts new VMs.
        Up = "up",
        /// Silent for longer than `--down-after`: its VMs are shown `unknown`.
        Down = "down",
        /// Reporting, but no new placements (`host drain`); its VMs are moved off.
        Draining = "draining",
        /// Its credential is refused (`host revoke`).
        Revoked = "revoked",
    }
}

wire_enum! {
    /// State of a network.
    pub enum NetworkState {
        /// Its gateway host is setting it up.
        Creating = "creating",
        /// Bridge, DHCP and DNS are in place on its gateway host.
        Ready = "ready",
        /// Being removed.
        Deleting = "deleting",
        /// Its gateway host failed to set it up; see `error`.
        Error = "error",
        /// Its gateway host is down and no other host is up to take the role over: VMs on it
        /// have no DHCP, DNS, NAT or forwards, and new VMs on it are refused (see `error`).
        Degraded = "degraded",
    }
}

wire_enum! {
    /// Direction of an access rule.
    pub enum Direction {
        /// Traffic entering the network from outside it.
        In = "in",
        /// Traffic leaving the network.
        Out = "out",
    }
}

wire_enum! {
    /// What an access rule does with what it matches.
    pub enum RuleAction {
        /// Let it through.
        Allow = "allow",
        /// Drop it (`out` rules only).
        Deny = "deny",
    }
}

wire_enum! {
    /// A protocol a rule or a forward names.
    pub enum Protocol {
        /// TCP.
        Tcp = "tcp",
        /// UDP.
        Udp = "udp",
        /// ICMP (IPv4).
        Icmp = "icmp",
        /// Every protocol.
        Any = "any",
    }
}

wire_enum! {
    /// Where the scheduler puts the VMs of a group.
    pub enum PlacementPolicy {
        /// On the hosts with the most free memory, few of the group per host.
        Spread = "spread",
        /// On as few hosts as possible.
        Pack = "pack",
    }
}

wire_enum! {
    /// What an operation does.
    pub enum OperationKind {
        /// `group create`.
        GroupCreate = "group.create",
        /// `group scale`.
        GroupScale = "group.scale",
        /// `group rm`.
        GroupDelete = "group.delete",
        /// `vm start`.
        VmStart = "vm.start",
        /// `vm stop`.
        VmStop = "vm.stop",
        /// `vm pause`.
        VmPause = "vm.pause",
        /// `vm resume`.
        VmResume = "vm.resume",
        /// `vm reboot`.
        VmReboot = "vm.reboot",
        /// `vm rm`.
        VmDelete = "vm.delete",
        /// `vm migrate` (also a child of a drain or a balance apply).
        VmMigrate = "vm.migrate",
        /// `net create`.
        NetCreate = "net.create",
        /// `net rm`.
        NetDelete = "net.delete",
        /// `host drain`: move every VM off a host.
        HostDrain = "host.drain",
        /// `balance apply`: carry out a balance plan.
        BalanceApply = "balance.apply",
        /// `image create --from-vm`: capture a VM's disk as an image.
        ImageCapture = "image.capture",
        /// `image build`: a builder VM runs a script; its disk becomes an image.
        ImageBuild = "image.build",
        /// `vm resize`.
        VmResize = "vm.resize",
        /// `volume attach`.
        VolumeAttach = "volume.attach",
        /// `volume detach`.
        VolumeDetach = "volume.detach",
        /// `volume resize`.
        VolumeResize = "volume.resize",
    }
}

wire_enum! {
    /// Where an operation is.
    pub enum OperationState {
        /// Still going.
        Running = "running",
        /// Finished well.
        Succeeded = "succeeded",
        /// Finished badly; see `error`.
        Failed = "failed",
    }
}

wire_enum! {
    /// Where one phase of an operation is.
    pub enum PhaseState {
        /// Not started.
        Pending = "pending",
        /// Going.
        Running = "running",
        /// Finished well.
        Done = "done",
        /// Finished badly.
        Failed = "failed",
        /// Not needed this time (e.g. undoing what never happened).
        Skipped = "skipped",
    }
}

/// A stored image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Image {
    /// Unique name.
    pub name: String,
    /// sha256 of the uploaded bytes (the image's identity).
    pub sha256: String,
    /// Format detected on upload (`qcow2` or `raw`); always stored as qcow2.
    pub source_format: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Size of the stored qcow2 file in bytes.
    pub stored_size: u64,
    /// When it was uploaded.
    pub created_at: String,
    /// VMs whose root disk is backed by this image.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Where it came from: `upload`, `vm web-0` (captured from a VM), `build from tiny`.
    #[serde(default)]
    pub made_from: String,
}

/// Capture an image from a VM (`POST /v1/images/capture`): running, it keeps running.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageCapture {
    /// Name of the new image.
    pub name: String,
    /// The VM whose root disk becomes the image.
    pub vm: String,
}

/// Build an image (`POST /v1/images/build`): a builder VM from `from` runs `user_data` and
/// powers itself off; its disk becomes the image; the builder and its network are removed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageBuild {
    /// Name of the new image.
    pub name: String,
    /// The image to start from.
    pub from: String,
    /// The script the builder runs (NoCloud user-data); it must power the guest off.
    pub user_data: String,
    /// Seconds the builder may take before the build fails (default 600).
    #[serde(default)]
    pub timeout_s: Option<u32>,
    /// Memory of the builder, MiB (default 256).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Root disk of the builder (and so of the image), MiB (default: the image's size).
    #[serde(default)]
    pub disk_mib: Option<u64>,
}

/// A cached image on a host (`GET /v1/images/cache`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CachedImage {
    /// Host name.
    pub host: String,
    /// Image identity.
    pub sha256: String,
    /// Names of the images with this identity (empty: the cloud no longer has it).
    pub images: Vec<String>,
    /// What keeps it: VMs whose disks it backs, migrations, captures (empty: unused).
    pub used_by: Vec<String>,
}

/// What `POST /v1/images/cache/prune` removed (the hosts drop them on their next pass).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CachePrune {
    /// The cached images dropped, as `host: sha256`.
    pub pruned: Vec<String>,
}

/// Change a VM's size (`POST /v1/vms/{name}/resize`); absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    /// vCPUs.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Root disk, MiB (grow only).
    #[serde(default)]
    pub disk_mib: Option<u64>,
}

wire_enum! {
    /// Where a volume is.
    pub enum VolumeState {
        /// Recorded, not yet made on its host.
        Pending = "pending",
        /// On its host, not attached.
        Available = "available",
        /// Being hot-plugged into its VM.
        Attaching = "attaching",
        /// Attached to its VM.
        Attached = "attached",
        /// Being unplugged.
        Detaching = "detaching",
        /// Being removed.
        Deleting = "deleting",
        /// Its host failed to make or change it; see `error`.
        Error = "error",
    }
}

/// A data volume: a thin qcow2 disk on one host, attachable to a VM there.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Volume {
    /// Unique name.
    pub name: String,
    /// Id (the guest sees the disk as `/dev/disk/by-id/virtio-<first 20 chars of the id>`).
    pub id: String,
    /// Host it lives on.
    pub host: String,
    /// Size (virtual), MiB.
    pub size_mib: u64,
    /// Space it takes on its host, MiB.
    pub allocated_mib: u64,
    /// The VM it is attached to (or being attached to).
    pub vm: Option<String>,
    /// Where it is.
    pub state: VolumeState,
    /// Removed with its VM (made by `group create --volume-size` without `--keep-volumes`).
    #[serde(default)]
    pub with_vm: bool,
    /// The last error its host reported.
    pub error: Option<String>,
    /// When it was made.
    pub created_at: String,
}

/// Make a volume (`POST /v1/volumes`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// Name: `^[a-z][a-z0-9-]{0,62}$`.
    pub name: String,
    /// Size, MiB (1 MiB to 64 TiB).
    pub size_mib: u64,
    /// On the host of this VM.
    #[serde(default)]
    pub near: Option<String>,
    /// On this host (default: the scheduler picks by free space).
    #[serde(default)]
    pub host: Option<String>,
}

/// Attach a volume (`POST /v1/volumes/{name}/attach`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    /// The VM (on the volume's host).
    pub vm: String,
}

/// Grow a volume (`POST /v1/volumes/{name}/resize`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// New size, MiB (grow only).
    pub size_mib: u64,
}

/// Disk space of one host (`GET /v1/storage`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostStorage {
    /// Host name.
    pub host: String,
    /// Pool file system size, MiB.
    pub pool_mib: u64,
    /// Used on it, MiB.
    pub used_mib: u64,
    /// Free on it, MiB.
    pub free_mib: u64,
    /// Kept free (never placed on), MiB (`serve --disk-reserve`).
    pub reserve_mib: u64,
    /// What the VMs' overlays and volumes take on it, MiB.
    pub allocated_mib: u64,
    /// Their virtual sizes, MiB (what they may grow to).
    pub provisioned_mib: u64,
    /// Provisioned allowed by the overcommit ratio, MiB.
    pub provision_limit_mib: u64,
    /// The image cache, MiB.
    pub image_cache_mib: u64,
    /// Cached images.
    pub cached_images: u32,
}

/// The controller's image store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct StoreStorage {
    /// Its directory.
    pub path: String,
    /// File system size, MiB.
    pub size_mib: u64,
    /// Free, MiB.
    pub free_mib: u64,
    /// What the images take, MiB.
    pub images_mib: u64,
    /// Images.
    pub images: u32,
}

/// Disk space of the cloud (`GET /v1/storage`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Storage {
    /// Per host.
    pub hosts: Vec<HostStorage>,
    /// The controller's image store.
    pub store: StoreStorage,
}

/// A virtual network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Network {
    /// Unique name.
    pub name: String,
    /// IPv4 CIDR, e.g. `10.80.0.0/24`.
    pub cidr: String,
    /// Gateway address (first usable address of the CIDR).
    pub gateway: String,
    /// VXLAN network identifier; also names the bridge `tk<vni>` on each host.
    pub vni: u32,
    /// Bridge device on the hosts.
    pub bridge: String,
    /// Its state.
    pub state: NetworkState,
    /// Host that runs the gateway (DHCP, DNS, NAT, forwards).
    pub gateway_host: Option<String>,
    /// The host the gateway last moved away from because it went down, if it ever moved.
    #[serde(default)]
    pub gateway_moved_from: Option<String>,
    /// When the gateway last moved (RFC 3339).
    #[serde(default)]
    pub gateway_moved_at: Option<String>,
    /// Address reservations (one per VM NIC).
    #[serde(default)]
    pub addresses: Vec<VmAddress>,
    /// Last error reported by a host, if any.
    pub error: Option<String>,
    /// Outbound NAT through the host.
    #[serde(default)]
    pub nat: bool,
    /// Access rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Port forwards.
    #[serde(default)]
    pub forwards: Vec<Forward>,
}

/// Create a network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    /// Name: `^[a-z][a-z0-9-]{0,62}$`.
    pub name: String,
    /// IPv4 CIDR, prefix length 16..=29.
    pub cidr: String,
    /// Gateway address inside the CIDR (default: its first usable address).
    #[serde(default)]
    pub gateway: Option<String>,
    /// Outbound NAT: VMs reach the outside through the host. Without it there is no route out.
    #[serde(default)]
    pub nat: bool,
}

/// An access rule of a network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Rule {
    /// Id (use it with `rule rm`).
    pub id: String,
    /// Network it belongs to.
    pub network: String,
    /// `in` (traffic into the network) or `out` (traffic leaving it).
    pub direction: Direction,
    /// `allow` or `deny` (`deny` only for `out`).
    pub action: RuleAction,
    /// Protocol and ports: `tcp:80`, `tcp:8000-8100`, `udp:53`, `icmp`, `any`.
    pub spec: String,
    /// in: source CIDR.
    pub from: Option<String>,
    /// in: source group (its VMs' addresses, on any network).
    pub from_group: Option<String>,
    /// in: source network (its CIDR).
    pub from_network: Option<String>,
    /// in: only the VMs of this group on this network (default: every VM of the network).
    pub to_group: Option<String>,
    /// out: destination CIDR.
    pub to: Option<String>,
    /// When it was added.
    pub created_at: String,
}

/// Add an access rule. Exactly one of `from`, `from_group`, `from_network` for `in` rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleCreate {
    /// `in` (default) or `out`.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// `allow` (default) or `deny` (`out` only).
    #[serde(default)]
    pub action: Option<RuleAction>,
    /// Protocol and ports: `tcp:80`, `tcp:8000-8100`, `udp:53`, `icmp`, `any`.
    pub spec: String,
    /// in: source CIDR, e.g. `0.0.0.0/0`.
    #[serde(default)]
    pub from: Option<String>,
    /// in: source group.
    #[serde(default)]
    pub from_group: Option<String>,
    /// in: source network.
    #[serde(default)]
    pub from_network: Option<String>,
    /// in: restrict to the VMs of this group.
    #[serde(default)]
    pub to_group: Option<String>,
    /// out: destination CIDR (default `0.0.0.0/0`).
    #[serde(default)]
    pub to: Option<String>,
}

/// A port forward: host address:port → VM:port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Forward {
    /// Id (use it with `forward rm`).
    pub id: String,
    /// Network of the VM.
    pub network: String,
    /// `tcp` or `udp`.
    pub proto: Protocol,
    /// Port on the gateway host's addresses.
    pub host_port: u16,
    /// Target VM.
    pub vm: String,
    /// Its address on the network.
    pub vm_ip: String,
    /// Port on the VM.
    pub vm_port: u16,
    /// Host that forwards (the network's gateway host).
    pub host: Option<String>,
    /// When it was added.
    pub created_at: String,
}

/// Add a port forward.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardCreate {
    /// Port on the host, 1..=65535 (reserved and taken ports are refused).
    pub host_port: u16,
    /// Target as `VM:PORT`, e.g. `web-0:80`.
    pub to: String,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub proto: Option<Protocol>,
}

/// One address of a VM on a network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VmAddress {
    /// Network name.
    pub network: String,
    /// MAC address of the NIC.
    pub mac: String,
    /// IPv4 address reserved by IPAM.
    pub ip: String,
    /// The VM this address belongs to (set in network listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// A group of identical VMs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Group {
    /// Unique name; its VMs are `NAME-0 … NAME-{count-1}`.
    pub name: String,
    /// Image name.
    pub image: String,
    /// Number of VMs wanted.
    pub count: u32,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Memory per VM, MiB.
    pub memory_mib: u64,
    /// Root disk size per VM, MiB.
    pub disk_mib: u64,
    /// Networks, in NIC order.
    pub networks: Vec<String>,
    /// Placement policy.
    pub placement: PlacementPolicy,
    /// Names of its VMs.
    #[serde(default)]
    pub vms: Vec<String>,
    /// When it was created.
    pub created_at: String,
}

/// Create a group of VMs. All-or-nothing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupCreate {
    /// Name: `^[a-z][a-z0-9-]{0,62}$` (VM names `NAME-i` must fit too).
    pub name: String,
    /// Image name.
    pub image: String,
    /// Number of VMs, 1..=100.
    pub count: u32,
    /// vCPUs per VM, 1..=64.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory per VM in MiB, 64..=1048576.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Root disk per VM in MiB; at least the image's virtual size (0 = the image's size).
    #[serde(default)]
    pub disk_mib: u64,
    /// Networks to attach, one NIC each, in order.
    #[serde(default)]
    pub networks: Vec<String>,
    /// NoCloud user-data passed to every VM.
    #[serde(default)]
    pub user_data: Option<String>,
    /// SSH public keys put in the NoCloud meta-data.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// `spread` (default) or `pack`.
    #[serde(default)]
    pub placement: Option<PlacementPolicy>,
    /// Never place two VMs of the group on one host (refused if there are not enough hosts).
    #[serde(default)]
    pub anti_affinity: bool,
    /// Give every VM a data volume of this size, MiB (attached as its second disk).
    #[serde(default)]
    pub volume_size_mib: Option<u64>,
    /// Keep those volumes when their VMs are removed.
    #[serde(default)]
    pub keep_volumes: bool,
    /// Most vCPUs a VM may be given while it runs (`vm resize --cpus`); default max(cpus, 4).
    #[serde(default)]
    pub max_cpus: Option<u32>,
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}

/// Change the number of VMs of a group.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupScale {
    /// New number of VMs, 0..=100. Scaling down removes the highest indexes.
    pub count: u32,
}

/// A virtual machine.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Vm {
    /// Unique name, `GROUP-INDEX`.
    pub name: String,
    /// Stable id (also the NoCloud instance-id).
    pub id: String,
    /// Group it belongs to.
    pub group: String,
    /// Index in the group.
    pub index: u32,
    /// Observed state.
    pub state: VmState,
    /// Power state the user asked for.
    pub desired: PowerState,
    /// Host it is placed on.
    pub host: String,
    /// Why the scheduler chose that host.
    pub placement_reason: String,
    /// Image name.
    pub image: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Root disk, MiB.
    pub disk_mib: u64,
    /// One address per NIC.
    pub addresses: Vec<VmAddress>,
    /// libvirt domain name on its host.
    pub domain: String,
    /// Last error reported by its host, if any.
    pub error: Option<String>,
    /// The causes of `error`, outermost first (the libvirt, qemu-img or netlink message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_chain: Vec<String>,
    /// When it was created.
    pub created_at: String,
    /// The migration under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// The last migration that finished (succeeded or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<Migration>,
    /// CPU the guest used lately, in cores (from libvirt's cpu time), as its host reports it.
    #[serde(default)]
    pub cpu_usage: f64,
    /// Volumes attached (or being attached).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Size changes waiting for the next start, in words (e.g. `cpus 2, memory 512 MiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_resize: Option<String>,
    /// Why its host paused it (e.g. `disk full on host h1: pool 100 % used`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
}

/// Options of `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmStop {
    /// Power off at once instead of an ACPI shutdown.
    #[serde(default)]
    pub force: bool,
    /// Seconds to wait for the ACPI shutdown before forcing (default 60).
    #[serde(default)]
    pub timeout_s: Option<u32>,
}

/// A hypervisor host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Host {
    /// Host name (unique).
    pub name: String,
    /// Stable id.
    pub id: String,
    /// Its state.
    pub state: HostState,
    /// Underlay address (VXLAN, migration); empty for a single-host cloud.
    #[serde(default)]
    pub address: String,
    /// 1-minute load average reported by the host.
    #[serde(default)]
    pub load_1m: f64,
    /// Memory available on the host (not promised: what the kernel reports free), MiB.
    #[serde(default)]
    pub memory_available_mib: u64,
    /// Accelerator used for guests: `kvm` or `tcg`, with the reason when it fell back.
    pub accel: String,
    /// Why this accelerator was chosen.
    pub accel_reason: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// vCPUs given to VMs placed here.
    pub cpus_used: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Memory given to VMs placed here, MiB.
    pub memory_used_mib: u64,
    /// Storage pool size in MiB.
    pub disk_mib: u64,
    /// Storage pool free space in MiB.
    pub disk_free_mib: u64,
    /// Root disk sizes provisioned to VMs placed here, MiB.
    pub disk_provisioned_mib: u64,
    /// Names of the VMs placed here.
    pub vms: Vec<String>,
    /// sha256 of the images cached here.
    pub cached_images: Vec<String>,
    /// Last report time.
    pub last_seen: Option<String>,
    /// CPU in use on the host lately (from /proc/stat), 0..1 of all its CPUs.
    #[serde(default)]
    pub cpu_usage: f64,
    /// Memory in use on the host (total minus available), MiB.
    #[serde(default)]
    pub memory_in_use_mib: u64,
    /// Things of this cloud the host has but the controller does not know (a domain or a VM
    /// directory): reported and left alone, never removed implicitly.
    #[serde(default)]
    pub orphans: Vec<agent::Orphan>,
    /// Port of the host's migration channel (mutual TLS; 0: none yet).
    #[serde(default)]
    pub channel_port: u16,
}

/// Progress of an operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Operation {
    /// Id.
    pub id: String,
    /// What it does.
    pub kind: OperationKind,
    /// The object it acts on, e.g. `group/web`.
    pub target: String,
    /// Where it is.
    pub state: OperationState,
    /// Steps done so far.
    pub done: u32,
    /// Steps in all.
    pub total: u32,
    /// Last progress message.
    pub message: String,
    /// Why it failed, with the cause chain (e.g. the libvirt or qemu-img message).
    pub error: Option<ApiError>,
    /// When it was created.
    pub created_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// The phases of a multi-phase operation (a migration: prepare target, copy, switch over,
    /// clean up), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<OperationPhase>,
    /// The operation this one is part of (a migration of a drain or a balance apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Operations this one is made of (one migration per VM of a drain or a balance apply).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// The migration this operation carries out (`vm.migrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

impl Operation {
    /// True once the operation succeeded or failed.
    pub fn is_finished(&self) -> bool {
        self.state != OperationState::Running
    }
}

/// One phase of a multi-phase operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct OperationPhase {
    /// What it does, e.g. `prepare target`, `copy`, `switch over`, `clean up`.
    pub name: String,
    /// Where it is.
    pub state: PhaseState,
    /// What it is doing or did, e.g. `412 of 1024 MiB, 96 MiB/s`.
    #[serde(default)]
    pub message: String,
    /// When it started.
    #[serde(default)]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default)]
    pub finished_at: Option<String>,
}

wire_enum! {
    /// How a VM moves.
    pub enum MigrationMode {
        /// The guest keeps running (memory and the disk overlay are copied while it runs).
        Live = "live",
        /// A stopped VM: its disk overlay is copied and verified; it stays stopped.
        Cold = "cold",
    }
}

wire_enum! {
    /// Where a migration is.
    pub enum MigrationPhase {
        /// The target host prepares: image in its cache, the overlay, the seed, the networks.
        Preparing = "preparing",
        /// The source host copies memory and disk (live) or the disk (cold) to the target.
        Copying = "copying",
        /// The VM now belongs to the target; addresses, DNS, VXLAN peers and rules follow.
        SwitchingOver = "switching-over",
        /// The source host removes what is left of the VM there.
        CleaningUp = "cleaning-up",
        /// Undoing a failed migration: the VM stays on the source, the target's leftovers go.
        Aborting = "aborting",
        /// Finished: the VM runs (or rests) on the target.
        Done = "done",
        /// Failed: the VM is where it was; see `error`.
        Failed = "failed",
    }
}

/// A migration of one VM between two hosts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Migration {
    /// Id (the id of its `vm.migrate` operation).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Source host name.
    pub from: String,
    /// Target host name.
    pub to: String,
    /// Live or cold.
    pub mode: MigrationMode,
    /// Where it is.
    pub phase: MigrationPhase,
    /// Why this target (the scheduler's reason, or "asked for").
    #[serde(default)]
    pub reason: String,
    /// Bytes copied so far (memory and disk).
    #[serde(default)]
    pub copied_bytes: u64,
    /// Bytes still to copy, as libvirt estimates them.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Copy rate, MiB/s.
    #[serde(default)]
    pub mib_per_s: f64,
    /// Time from start to the end, ms (when finished).
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// How long the guest was paused for the switch (live; from libvirt's job statistics), ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Bytes moved in all (when finished).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// When it started.
    pub started_at: String,
    /// When it ended.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Why it failed, with the cause chain.
    #[serde(default)]
    pub error: Option<ApiError>,
}

/// Options of `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmMigrate {
    /// Target host name; absent: the scheduler picks one (same filters as placement,
    /// anti-affinity of the VM's group kept).
    #[serde(default)]
    pub to: Option<String>,
}

/// Options of `POST /v1/hosts/{name}/drain`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostDrain {
    /// Most migrations at once per host (source or target); default 2.
    #[serde(default)]
    pub parallel: Option<u32>,
}

/// The answer of `POST /v1/hosts/{name}/drain`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Drain {
    /// The host, now `draining`.
    pub host: Host,
    /// The operation moving its VMs off (one child per VM); absent when it had none.
    pub operation: Option<Operation>,
    /// VMs that cannot move, each with the reason.
    #[serde(default)]
    pub unmovable: Vec<Unmovable>,
}

/// A VM that cannot move, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Unmovable {
    /// The VM.
    pub vm: String,
    /// Why not.
    pub reason: String,
}

/// One entry of the `/v1/events` stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    /// Increasing sequence number.
    pub seq: u64,
    /// When it happened.
    pub time: String,
    /// e.g. `vm.state`, `operation.finished`.
    pub kind: String,
    /// The object, e.g. `vm/web-1`.
    pub object: String,
    /// Human-readable text.
    pub message: String,
}

/// Answer of `tuchka check` / `GET /v1/hosts/{name}/check` style diagnostics.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (when not ok).
    pub hint: Option<String>,
}

wire_enum! {
    /// Whether the controller balances load by itself.
    pub enum BalanceMode {
        /// Only when asked (`balance apply`).
        Off = "off",
        /// Every `--balance-interval`, the controller plans and carries out the moves.
        Auto = "auto",
    }
}

/// Load of one host, as the balancer sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostLoad {
    /// Host name.
    pub host: String,
    /// CPU load, 0..1 of the host's CPUs (measured).
    pub cpu: f64,
    /// Memory load, 0..1 of the host's memory (given to VMs).
    pub memory: f64,
    /// VMs on it.
    pub vms: u32,
    /// Whether VMs may be moved onto it (up, not draining).
    pub target: bool,
}

/// One move of a balance plan.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BalanceMove {
    /// The VM to move.
    pub vm: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
    /// Why, in words.
    pub reason: String,
    /// Imbalance of the cloud before this move, 0–100 %.
    pub imbalance_before: f64,
    /// Imbalance after it, 0–100 %.
    pub imbalance_after: f64,
    /// What it costs: memory to copy, MiB.
    pub cost_mib: u64,
    /// The cost in words (memory, dirty rate where known).
    pub cost: String,
}

/// What the balancer would do now (`GET /v1/balance/plan`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BalancePlan {
    /// Imbalance of the cloud now, 0–100 %.
    pub imbalance: f64,
    /// Imbalance after every move of the plan, 0–100 %.
    pub imbalance_after: f64,
    /// Above this imbalance the balancer acts (after holding for some rounds), %.
    pub threshold: f64,
    /// The moves, in order.
    pub moves: Vec<BalanceMove>,
    /// Why nothing (more) moves, in words.
    #[serde(default)]
    pub why_not: Vec<String>,
    /// The hosts' loads the plan was made from.
    #[serde(default)]
    pub hosts: Vec<HostLoad>,
}

/// One round of the balancer and what it decided.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BalanceDecision {
    /// When.
    pub time: String,
    /// Imbalance then, %.
    pub imbalance: f64,
    /// What it decided, in words (moves started, or why nothing moved).
    pub summary: String,
    /// The moves it started.
    #[serde(default)]
    pub moves: Vec<BalanceMove>,
    /// The operation that carries them out.
    #[serde(default)]
    pub operation: Option<String>,
}

/// The balancer's state (`GET /v1/balance`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BalanceStatus {
    /// `off` or `auto`.
    pub mode: BalanceMode,
    /// Seconds between rounds in `auto` mode.
    pub interval_s: u64,
    /// Imbalance now, 0–100 %.
    pub imbalance: f64,
    /// Threshold, %.
    pub threshold: f64,
    /// Consecutive rounds the imbalance has been above the threshold.
    pub rounds_above: u32,
    /// Rounds above the threshold needed before moving.
    pub hold_rounds: u32,
    /// The hosts' loads now.
    pub hosts: Vec<HostLoad>,
    /// The latest decisions, newest first.
    pub decisions: Vec<BalanceDecision>,
}

/// A piece of a VM's serial console log (`GET /v1/vms/{name}/console/log`).
///
/// Offsets count bytes of the log since the controller started keeping it; the controller
/// keeps the last MiB per VM, whichever host the VM runs on (agents ship it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ConsoleLog {
    /// The VM.
    pub vm: String,
    /// Offset of the first byte of `text`.
    pub start: u64,
    /// Offset just past `text`: ask for `from=end` to get what comes next.
    pub end: u64,
    /// The log from `start` to `end`.
    pub text: String,
    /// Bytes between the offset asked for and `start` that are no longer kept.
    #[serde(default)]
    pub missed: u64,
}

/// Load of the hosts over the last hour (`GET /v1/history`), sampled by the controller.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LoadHistory {
    /// Seconds between two samples.
    pub interval_s: u64,
    /// One entry per host, in host order.
    pub hosts: Vec<HostHistory>,
}

/// The load samples of one host, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostHistory {
    /// Host name.
    pub host: String,
    /// Samples, oldest first.
    pub points: Vec<LoadPoint>,
}

/// One load sample of a host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LoadPoint {
    /// Unix time, seconds.
    pub t: i64,
    /// CPU in use, 0..1 of the host's CPUs.
    pub cpu: f64,
    /// Memory in use, 0..1 of the host's memory.
    pub memory: f64,
    /// 1-minute load average.
    pub load_1m: f64,
}

/// How to open the dashboard (`GET /v1/ui`, users only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct UiLogin {
    /// The dashboard's address (`https://ADDR:PORT/ui/`); absent without `serve --listen`.
    pub url: Option<String>,
    /// The address with the API token in its fragment (`…/ui/#token=…`): browsers never send
    /// a fragment to the server.
    pub link: Option<String>,
    /// sha256 (hex) of the controller's CA certificate, to check the browser's certificate
    /// warning against (or import `<data-dir>/tls/ca.crt`).
    pub fingerprint: Option<String>,
}
