//! The agent protocol: what a host pulls (desired state) and pushes (observed state).
//!
//! Agents always connect to the controller; the controller never reaches an agent. The local
//! agent of `tuchka serve` uses exactly the same endpoints over the unix socket.
//!
//! - `POST /v1/agent/register` with [`HostRegister`] → [`HostRegistered`]
//! - `GET  /v1/agent/hosts/{id}/desired?after=GEN` → [`HostDesired`] (long poll: answers when
//!   the generation is newer than `after`, or after a few seconds anyway)
//! - `POST /v1/agent/hosts/{id}/report` with [`HostReport`]
//! - `GET  /v1/agent/images/{sha256}` → the stored qcow2 bytes
//! - `POST /v1/agent/hosts/{id}/consoles` with [`ConsoleUpload`] → [`ConsoleUploaded`]: what is
//!   new in the VMs' serial console logs (see [`ConsoleData`] for the offsets)

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{MigrationMode, PowerState, Protocol, RuleAction};

/// First contact of an agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostRegister {
    /// Host name (unique in the cloud).
    pub name: String,
    /// Join token (empty for the local agent on the unix socket).
    #[serde(default)]
    pub join_token: String,
    /// Capacity and accelerator of the host.
    pub facts: HostFacts,
    /// The identity this host got at its first join (kept in its data directory): with it the
    /// host registers again as the same host (even under a new name) without a join token.
    #[serde(default)]
    pub identity: Option<HostIdentity>,
    /// A PKCS#10 request (PEM) for the certificate of the host's migration channel.
    #[serde(default)]
    pub csr_pem: Option<String>,
}

/// Who a host is, as it proves it when registering again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostIdentity {
    /// The host id it was given.
    pub host_id: String,
    /// Its credential.
    pub credential: String,
}

/// Answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostRegistered {
    /// Id to use in the other agent endpoints.
    pub host_id: String,
    /// Per-host bearer credential.
    pub credential: String,
    /// Id of this cloud; host resources carry it so two clouds never touch each other's.
    pub cloud_id: String,
    /// The host's certificate (PEM) for its migration channel, signed by the cloud's CA for
    /// this host id (present when the request carried a CSR).
    #[serde(default)]
    pub certificate_pem: Option<String>,
    /// The cloud's CA certificate (PEM): the channel accepts only peers it signed.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// What a host is and has.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostFacts {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage pool size in MiB.
    pub disk_mib: u64,
    /// Storage pool free space in MiB.
    pub disk_free_mib: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Why this accelerator (e.g. "KVM test guest did not run within 5 s").
    pub accel_reason: String,
    /// TCP and UDP ports something listens on (on any address) of this host: forwards refuse them.
    #[serde(default)]
    pub listening_ports: Vec<u16>,
    /// Underlay address other hosts reach this one on (VXLAN, migration); empty if unknown.
    #[serde(default)]
    pub address: String,
    /// 1-minute load average.
    #[serde(default)]
    pub load_1m: f64,
    /// MemAvailable, MiB.
    #[serde(default)]
    pub memory_available_mib: u64,
    /// CPU in use lately (from /proc/stat), 0..1 of all CPUs.
    #[serde(default)]
    pub cpu_usage: f64,
    /// Memory in use (MemTotal - MemAvailable), MiB.
    #[serde(default)]
    pub memory_in_use_mib: u64,
    /// TCP port of this host's migration channel (on `address`); 0: none.
    #[serde(default)]
    pub channel_port: u16,
    /// The storage pool directory (a migration target's disks live under it).
    #[serde(default)]
    pub pool: String,
    /// Space VM overlays and volumes take in the pool, MiB.
    #[serde(default)]
    pub disk_allocated_mib: u64,
    /// Their virtual sizes, MiB.
    #[serde(default)]
    pub disk_provisioned_mib: u64,
    /// The image cache, MiB.
    #[serde(default)]
    pub image_cache_mib: u64,
    /// How long the agent's last pass took (image fetches and reconcile), ms.
    #[serde(default)]
    pub pass_ms: u64,
}

/// Response header of the desired-state long poll: the generation it stands for (on a `304` as
/// well, when the host's desired state is unchanged but the cloud's generation moved on).
pub const GENERATION_HEADER: &str = "tuchka-generation";

/// Everything one host must converge to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostDesired {
    /// Increases with every change relevant to any host.
    pub generation: u64,
    /// Id of the cloud (prefix of every host resource name).
    pub cloud_id: String,
    /// VMs that must exist on this host.
    pub vms: Vec<VmDesired>,
    /// Networks that must exist on this host.
    pub networks: Vec<NetworkDesired>,
    /// Cached images to keep (sha256): those used here and those used lately (within the image
    /// cache TTL). A cached image not listed is removed unless a disk here still uses it.
    pub images: Vec<String>,
    /// VMs this host must remove (domain and directory). A host removes a VM only when it is
    /// named here; anything of the cloud it finds and does not know it reports as an orphan.
    #[serde(default)]
    pub removals: Vec<VmRemoval>,
    /// The cloud's other hosts: their migration channels, and the only addresses this host's
    /// firewall admits to its channel port and to VXLAN.
    #[serde(default)]
    pub peers: Vec<PeerHost>,
    /// Every volume this host must keep (attached or not).
    #[serde(default)]
    pub volumes: Vec<VolumeDesired>,
    /// Volumes this host must remove (by id). Nothing else is removed.
    #[serde(default)]
    pub volume_removals: Vec<String>,
    /// Captures to make of VMs on this host.
    #[serde(default)]
    pub captures: Vec<CaptureDesired>,
}

/// A VM a host must remove.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VmRemoval {
    /// VM id (its directory in the pool).
    pub id: String,
    /// VM name (for messages).
    pub name: String,
    /// Its libvirt domain name on this host.
    pub domain: String,
}

/// Another host of the cloud.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PeerHost {
    /// Host id (its certificate names it).
    pub host_id: String,
    /// Host name.
    pub name: String,
    /// Underlay address.
    pub address: String,
    /// Port of its migration channel.
    pub channel_port: u16,
}

/// A VM's part in a migration, as one of its two hosts must play it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum VmMigrationDesired {
    /// This host is the target: prepare (image cached, the disk overlay — live only —, the
    /// seed, the networks), admit the source's streams, never define or start the VM itself.
    Incoming {
        /// Migration id.
        id: String,
        /// Live or cold.
        mode: MigrationMode,
        /// The source host.
        source: PeerHost,
    },
    /// This host is the source: once told the target is ready, move the VM there.
    Outgoing {
        /// Migration id.
        id: String,
        /// Live or cold.
        mode: MigrationMode,
        /// The target host.
        target: PeerHost,
        /// The target's storage pool directory (the disk paths there).
        target_pool: String,
        /// The target reported ready: start copying.
        go: bool,
        /// Stop: abort a running copy and keep the VM here.
        abort: bool,
    },
}

/// One VM as its host must run it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmDesired {
    /// VM id (NoCloud instance-id, storage directory name).
    pub id: String,
    /// VM name (hostname).
    pub name: String,
    /// libvirt domain name.
    pub domain: String,
    /// Power state to reach.
    pub power: PowerState,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Root disk size in MiB.
    pub disk_mib: u64,
    /// Image identity (sha256 of the upload).
    pub image_sha256: String,
    /// sha256 of the stored qcow2 served by `/v1/agent/images/{image_sha256}`.
    pub image_file_sha256: String,
    /// NICs in order.
    pub nics: Vec<NicDesired>,
    /// NoCloud user-data.
    pub user_data: Option<String>,
    /// SSH public keys for the NoCloud meta-data.
    pub ssh_keys: Vec<String>,
    /// Reboot requests: reboot when this is above the last reboot the host did.
    pub reboot_seq: u64,
    /// Stop: power off at once.
    pub force_stop: bool,
    /// Stop: seconds to wait for ACPI shutdown before powering off.
    pub stop_timeout_s: u32,
    /// Its part in a migration under way, if any.
    #[serde(default)]
    pub migration: Option<VmMigrationDesired>,
    /// Most vCPUs it may be given while it runs (hot-plug up to this; at least `cpus`).
    #[serde(default)]
    pub max_cpus: u32,
    /// Data volumes attached to it, in order (its disks after the root disk).
    #[serde(default)]
    pub volumes: Vec<VolumeDesired>,
    /// Resume requests: resume a VM that its host paused (a full pool) when this is above the
    /// last resume the host did.
    #[serde(default)]
    pub resume_seq: u64,
    /// Power on once only: a guest that powered itself off stays off (an image builder).
    #[serde(default)]
    pub run_once: bool,
}

/// A volume as a host must keep it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeDesired {
    /// Volume id (its file `volumes/<id>.qcow2`, the disk's serial).
    pub id: String,
    /// Volume name (for messages).
    pub name: String,
    /// Size (virtual), MiB; a volume only grows.
    pub size_mib: u64,
}

/// A capture of a VM's root disk as an image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct CaptureDesired {
    /// Capture id (its operation's id).
    pub id: String,
    /// Name of the image to make.
    pub image: String,
    /// The VM.
    pub vm_id: String,
    /// Its domain on this host.
    pub domain: String,
}

/// One NIC of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct NicDesired {
    /// Network name.
    pub network: String,
    /// Bridge to plug the tap into.
    pub bridge: String,
    /// MAC address.
    pub mac: String,
    /// IPv4 address (reserved by the DHCP server).
    pub ip: String,
    /// Tap device name (≤ 15 chars).
    pub tap: String,
}

/// One network as a host must provide it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct NetworkDesired {
    /// Network name (also its DNS domain).
    pub name: String,
    /// VXLAN id.
    pub vni: u32,
    /// Bridge device name.
    pub bridge: String,
    /// IPv4 CIDR.
    pub cidr: String,
    /// Gateway address.
    pub gateway: String,
    /// Whether this host is the network's gateway (address on the bridge, DHCP, DNS).
    pub gateway_here: bool,
    /// MTU of the bridge and the guests' NICs.
    pub mtu: u32,
    /// DHCP reservations and DNS names, one per VM NIC — for the gateway host's dnsmasq; empty
    /// on the network's other hosts.
    pub hosts: Vec<DhcpHost>,
    /// Outbound NAT: VMs reach the outside through the host (masquerade). Without it nothing
    /// from this network is routed out (except replies and traffic to networks whose rules allow it).
    #[serde(default)]
    pub nat: bool,
    /// Inbound allow rules for traffic entering this network from anywhere else (outside the
    /// cloud, or other networks). Same-network traffic is always allowed.
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
    /// Outbound rules, evaluated in order before the NAT default (first match wins).
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    /// Port forwards from this host's addresses to VMs of this network (gateway host only).
    #[serde(default)]
    pub forwards: Vec<ForwardDesired>,
    /// The network's VXLAN segment between hosts (None: this host is the only one on it).
    #[serde(default)]
    pub vxlan: Option<VxlanDesired>,
}

/// VXLAN of a network on one host: head-end replication to every other host of the network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VxlanDesired {
    /// This host's underlay (fabric) address: the VXLAN source.
    pub local: String,
    /// UDP port (4789).
    pub port: u16,
    /// Underlay addresses of the other hosts of the network (one all-zero FDB entry each).
    pub peers: Vec<String>,
}

/// Protocol and destination ports a rule matches.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMatch {
    /// `tcp`, `udp`, `icmp` or `any`.
    pub proto: Protocol,
    /// First destination port (tcp/udp; None = every port).
    pub port_from: Option<u16>,
    /// Last destination port (inclusive).
    pub port_to: Option<u16>,
}

/// An inbound allow rule, resolved to addresses by the controller.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct IngressRule {
    /// Rule id (for counters and messages).
    pub id: String,
    /// What it matches.
    pub matches: PortMatch,
    /// Source CIDRs (a group resolves to its VMs' /32s; empty = nothing matches).
    pub sources: Vec<String>,
    /// Destination addresses in this network (/32s of a group), empty = the whole network.
    pub targets: Vec<String>,
}

/// An outbound rule.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct EgressRule {
    /// Rule id.
    pub id: String,
    /// `allow` or `deny`.
    pub action: RuleAction,
    /// What it matches.
    pub matches: PortMatch,
    /// Destination CIDRs.
    pub destinations: Vec<String>,
}

/// One port forward.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ForwardDesired {
    /// Forward id.
    pub id: String,
    /// `tcp` or `udp`.
    pub proto: Protocol,
    /// Port on the host's addresses.
    pub host_port: u16,
    /// VM address.
    pub vm_ip: String,
    /// Port on the VM.
    pub vm_port: u16,
}

/// One DHCP reservation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhcpHost {
    /// MAC address.
    pub mac: String,
    /// Reserved address.
    pub ip: String,
    /// Host name (the VM name).
    pub name: String,
}

/// What a host observed; sent every few seconds and after each change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostReport {
    /// Generation of the desired state this report answers.
    pub generation: u64,
    /// Current capacity figures.
    pub facts: HostFacts,
    /// Every VM of this cloud present on the host (including ones being removed).
    pub vms: Vec<VmObserved>,
    /// Every network of this cloud present on the host.
    pub networks: Vec<NetworkObserved>,
    /// sha256 (identities) of the images in the host's cache.
    pub cached_images: Vec<String>,
    /// What the host has of this cloud and was not told about (left alone).
    #[serde(default)]
    pub orphans: Vec<Orphan>,
    /// Every volume of this cloud on the host.
    #[serde(default)]
    pub volumes: Vec<VolumeObserved>,
    /// The captures it was asked for.
    #[serde(default)]
    pub captures: Vec<CaptureObserved>,
}

/// A volume as its host sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VolumeObserved {
    /// Volume id.
    pub id: String,
    /// Size (virtual), MiB.
    pub size_mib: u64,
    /// Space it takes, MiB.
    pub allocated_mib: u64,
    /// The VM it is plugged into now (its id), if any.
    #[serde(default)]
    pub attached_to: Option<String>,
    /// Why it could not be made, changed or removed.
    #[serde(default)]
    pub error: Option<String>,
}

crate::wire_enum! {
    /// Where a capture is on its host.
    pub enum CaptureStatus {
        /// Copying the disk (a backup job of the running VM, or a copy of a stopped one).
        Copying = "copying",
        /// Sending it to the controller.
        Uploading = "uploading",
        /// The controller has the image.
        Done = "done",
        /// It failed; see `error`.
        Failed = "failed",
    }
}

/// A capture as its host sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CaptureObserved {
    /// Capture id.
    pub id: String,
    /// Where it is.
    pub status: CaptureStatus,
    /// Bytes copied or sent so far.
    #[serde(default)]
    pub bytes: u64,
    /// How long the guest was paused for it, ms (0: not at all).
    #[serde(default)]
    pub paused_ms: u64,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The causes.
    #[serde(default)]
    pub error_chain: Vec<String>,
}

crate::wire_enum! {
    /// What kind of thing an orphan is.
    pub enum OrphanKind {
        /// A libvirt domain with this cloud's metadata.
        Domain = "domain",
        /// A VM directory (disk, seed, console log) in the pool.
        Disk = "disk",
    }
}

/// Something of this cloud on a host that the controller neither wants there nor named for
/// removal (a restored database, a VM moved by hand): reported, never removed implicitly.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Orphan {
    /// Domain or VM directory.
    pub kind: OrphanKind,
    /// The domain name, or the directory.
    pub name: String,
    /// The VM id it belongs to.
    pub vm_id: String,
}

/// Observed state of one VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmObserved {
    /// VM id.
    pub id: String,
    /// Observed state.
    pub state: crate::VmState,
    /// Why it could not converge.
    pub error: Option<String>,
    /// The causes of `error`, outermost first.
    #[serde(default)]
    pub error_chain: Vec<String>,
    /// Highest reboot request carried out.
    pub reboot_seq: u64,
    /// A libvirt domain of it exists on this host.
    #[serde(default)]
    pub domain: bool,
    /// Its migration as this host sees it.
    #[serde(default)]
    pub migration: Option<MigrationObserved>,
    /// CPU it used lately, in cores.
    #[serde(default)]
    pub cpu_usage: f64,
    /// Why its host paused it (a full pool), when it did.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Highest resume request carried out.
    #[serde(default)]
    pub resume_seq: u64,
    /// What it runs with now (vCPUs, memory MiB, root disk MiB), when its domain exists.
    #[serde(default)]
    pub running_with: Option<(u32, u64, u64)>,
    /// It powered itself off after running (a `run_once` VM).
    #[serde(default)]
    pub powered_off: bool,
    /// The end of its serial console (`run_once` VMs only: an image builder's failure shows it).
    #[serde(default)]
    pub console_tail: Option<String>,
    /// Why its new size could not be applied.
    #[serde(default)]
    pub resize_error: Option<String>,
}

crate::wire_enum! {
    /// A migration as one of its hosts sees it.
    pub enum MigrationStatus {
        /// Target: preparing image, disk, seed, networks.
        Preparing = "preparing",
        /// Target: ready to receive.
        Prepared = "prepared",
        /// Source: copying.
        Running = "running",
        /// Source: the copy finished; the VM runs on the target (live) or its disk is there (cold).
        Completed = "completed",
        /// Either side: it failed (see `error`); on the source the VM is still here.
        Failed = "failed",
        /// Source: no copy under way (not told to go, or aborted, or the agent restarted).
        Idle = "idle",
    }
}

/// A host's view of one migration.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct MigrationObserved {
    /// Migration id.
    pub id: String,
    /// Where it is.
    pub status: MigrationStatus,
    /// Bytes copied so far.
    #[serde(default)]
    pub copied_bytes: u64,
    /// Bytes libvirt still has to copy.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Copy rate, MiB/s.
    #[serde(default)]
    pub mib_per_s: f64,
    /// Total time of the copy, ms (completed).
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Downtime of the switch, ms (completed, live).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Bytes moved in all (completed).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The causes, outermost first.
    #[serde(default)]
    pub error_chain: Vec<String>,
}

impl MigrationObserved {
    /// Migration `id` in `status`, with no figures yet.
    pub fn new(id: &str, status: MigrationStatus) -> Self {
        MigrationObserved {
            id: id.to_string(),
            status,
            copied_bytes: 0,
            remaining_bytes: 0,
            mib_per_s: 0.0,
            total_ms: None,
            downtime_ms: None,
            bytes: None,
            error: None,
            error_chain: vec![],
        }
    }
}

/// Observed state of one network on a host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NetworkObserved {
    /// Network name.
    pub name: String,
    /// Bridge (and, on the gateway host, DHCP/DNS) are in place.
    pub ready: bool,
    /// Why it is not ready.
    pub error: Option<String>,
    /// The causes, outermost first.
    #[serde(default)]
    pub error_chain: Vec<String>,
}

/// Bytes of each VM's console log the controller keeps: an agent that does not know where the
/// controller stands sends a log from this far before its end.
pub const CONSOLE_KEPT_BYTES: u64 = 1 << 20;

/// What is new in the serial console logs of a host's VMs (`POST /v1/agent/hosts/{id}/consoles`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUpload {
    /// One entry per VM whose log has news (or whose offset the agent does not know yet).
    pub logs: Vec<ConsoleData>,
}

/// A piece of one VM's console log file on this host.
///
/// Offsets are byte offsets in the host's file, which only grows (qemu appends). The
/// controller keeps, per VM and host, the file it is reading and the offset it expects next:
/// it takes `data` when `offset` is that one, or — for a file it does not know yet — when
/// `offset` is at most `size` minus the controller's limit (so it gets the log's whole tail);
/// otherwise it takes nothing and answers the offset it wants.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleData {
    /// VM id.
    pub vm_id: String,
    /// Identity of the file (device and inode): a new file means the log starts over.
    pub file: String,
    /// Size of the file now, bytes.
    pub size: u64,
    /// Offset of the first byte of `data` in the file.
    pub offset: u64,
    /// Offset just past the last byte of `data` (a trailing incomplete UTF-8 character waits
    /// for the next piece; invalid bytes are replaced by U+FFFD).
    pub end: u64,
    /// The text.
    pub data: String,
}

/// Answer to a [`ConsoleUpload`]: where to go on from, per VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ConsoleUploaded {
    /// One entry per uploaded log.
    pub next: Vec<ConsoleNext>,
}

/// The offset the controller wants next of one VM's log file.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ConsoleNext {
    /// VM id.
    pub vm_id: String,
    /// The file this offset is in.
    pub file: String,
    /// Send from this offset next.
    pub offset: u64,
}
