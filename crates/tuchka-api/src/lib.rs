//! Wire types of the tuchka API: what the CLI, the agents and the controller exchange.
//!
//! Every request and response body of `/v1` is defined here and nowhere else, so the server,
//! the agent and the CLI cannot drift apart. Requests reject unknown fields. Sizes are MiB,
//! times are RFC 3339 strings in UTC, ids are UUID strings.
//!
//! Two audiences share the types:
//! - users (CLI, scripts): images, networks, groups, vms, hosts, operations, events;
//! - agents: [`agent`] holds the desired state a host pulls and the report it pushes back.

pub mod agent;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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

/// How a new host joins this cloud (`GET /v1/join-token`, `POST` rotates the token).
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
}

/// Observed power state of a VM, as libvirt reports it on its host.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Recorded, not yet seen on its host.
    Pending,
    /// Being prepared or booted on its host.
    Starting,
    /// The domain runs.
    Running,
    /// The domain is paused (vCPUs stopped, memory kept).
    Paused,
    /// A shutdown was requested and the domain still runs.
    Stopping,
    /// The domain is defined and shut off.
    Stopped,
    /// The host failed to converge it; see `error`.
    Error,
    /// Its host stopped reporting; the last known state is not current.
    Unknown,
}

impl VmState {
    /// The lowercase name used on the wire and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
            VmState::Unknown => "unknown",
        }
    }
}

/// The power state a user asked for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// Defined and running.
    Running,
    /// Defined and paused.
    Paused,
    /// Defined and shut off.
    Stopped,
}

impl PowerState {
    /// The lowercase name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Stopped => "stopped",
        }
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
    /// `creating`, `ready`, `deleting` or `error`.
    pub state: String,
    /// Host that runs the gateway (DHCP, DNS).
    pub gateway_host: Option<String>,
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
    pub direction: String,
    /// `allow` or `deny` (`deny` only for `out`).
    pub action: String,
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
    pub direction: Option<String>,
    /// `allow` (default) or `deny` (`out` only).
    #[serde(default)]
    pub action: Option<String>,
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
    pub proto: String,
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
    pub proto: Option<String>,
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
    /// Placement policy: `spread` or `pack`.
    pub placement: String,
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
    pub placement: Option<String>,
    /// Never place two VMs of the group on one host (refused if there are not enough hosts).
    #[serde(default)]
    pub anti_affinity: bool,
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
    /// When it was created.
    pub created_at: String,
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
    /// `up`, `down`, `draining` or `revoked`.
    pub state: String,
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
}

/// Progress of an operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Operation {
    /// Id.
    pub id: String,
    /// What it does, e.g. `group.create`, `vm.stop`.
    pub kind: String,
    /// The object it acts on, e.g. `group/web`.
    pub target: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// Steps done so far.
    pub done: u32,
    /// Steps in all.
    pub total: u32,
    /// Last progress message.
    pub message: String,
    /// Why it failed.
    pub error: Option<ApiError>,
    /// When it was created.
    pub created_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
}

impl Operation {
    /// True once the operation succeeded or failed.
    pub fn is_finished(&self) -> bool {
        self.state != "running"
    }
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
