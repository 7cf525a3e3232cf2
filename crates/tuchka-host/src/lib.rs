//! tuchka-host: everything a host does to libvirt, disks and the network, behind narrow traits.
//!
//! - [`Hypervisor`] ([`Libvirt`]): domains of one cloud, defined from typed [`DomainSpec`]s
//!   rendered by the pure [`render_domain_xml`].
//! - [`Storage`] ([`DirStorage`]): the pool directory — cached images, per-VM overlays and
//!   NoCloud seeds.
//! - [`Dataplane`] ([`LinuxDataplane`]): bridges, VXLAN ports to the other hosts of a
//!   network, gateway address + dnsmasq, and the cloud's isolation firewall (nftables).
//! - [`channel`] and [`migrate`]: moving VMs between hosts — the mTLS host-to-host channel
//!   that carries libvirt's connection, the memory and the disk streams of a live migration
//!   (and a stopped VM's disk), and [`Hypervisor::migrate_live`] through it.
//! - [`capture`]: [`Hypervisor::capture_disk`], a VM's disk into a new standalone image while
//!   the VM runs (a libvirt backup job, then `qemu-img convert -c`).
//! - [`probe_accel`], [`run_checks`], [`host_facts`]: what this host can do.
//! - [`metrics`]: the load an agent reports for the balancer (host CPU and memory, VM CPU).
//! - [`fake`]: hand-written fakes of the three traits for tests of the code that drives them.
//!
//! The API is synchronous; the agent calls it from `tokio::task::spawn_blocking`. Every
//! resource is scoped by the cloud id (domain metadata, the `tk_<cloud8>` nft table) and by the
//! agent's pool directory, so several clouds and hosts can share one machine and one libvirtd:
//! each only lists and removes its own.
//!
//! Render, then apply: XML, nft scripts, dnsmasq arguments/files and seed meta-data are built by
//! pure functions (golden-tested); the adapters only push the bytes.

pub mod accel;
pub mod capture;
pub mod channel;
pub mod checks;
pub mod cmd;
pub mod domain_xml;
mod error;
pub mod fake;
pub mod libvirt;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod qcow2;
pub mod seed;
pub mod storage;

pub use accel::{probe_accel, Accel, AccelChoice};
pub use capture::{CaptureOutcome, CapturePhase, CaptureProgress};
pub use checks::{host_facts, run_checks};
pub use domain_xml::{
    render_domain_xml, volume_serial, volume_target, DomainSpec, NicSpec, VolumeSpec,
};
pub use error::HostError;
pub use libvirt::{DomainInfo, DomainState, Hypervisor, Libvirt};
pub use migrate::{
    migrate_through, retarget_domain_xml, LiveMigration, MigrationFailed, MigrationOutcome,
    MigrationProgress,
};
pub use net::{Dataplane, LinuxDataplane};
pub use storage::{DirStorage, PoolUsage, Storage};

/// The short cloud id in host resource names (domains, the nft table): re-exported from
/// [`tuchka_core::names`], the one definition the controller's domain names also use.
pub use tuchka_core::names::cloud8;
