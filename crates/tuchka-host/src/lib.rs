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
//! - [`probe_accel`], [`run_checks`], [`host_facts`]: what this host can do.
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
pub mod channel;
pub mod checks;
pub mod cmd;
pub mod domain_xml;
mod error;
pub mod fake;
pub mod libvirt;
pub mod migrate;
pub mod net;
pub mod qcow2;
pub mod seed;
pub mod storage;

pub use accel::{probe_accel, Accel, AccelChoice};
pub use checks::{host_facts, run_checks};
pub use domain_xml::{render_domain_xml, DomainSpec, NicSpec};
pub use error::HostError;
pub use libvirt::{DomainInfo, DomainState, Hypervisor, Libvirt};
pub use migrate::{
    migrate_through, retarget_domain_xml, LiveMigration, MigrationFailed, MigrationOutcome,
    MigrationProgress,
};
pub use net::{Dataplane, LinuxDataplane};
pub use storage::{DirStorage, Storage};

/// The short cloud id used in host resource names: the first 8 hex digits of `cloud_id`
/// (lowercased), or — for ids that do not start with 8 hex digits — the first 8 hex digits of
/// its sha256.
pub fn cloud8(cloud_id: &str) -> String {
    let head: String = cloud_id.chars().take(8).collect();
    if head.len() == 8 && head.chars().all(|c| c.is_ascii_hexdigit()) {
        head.to_ascii_lowercase()
    } else {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(cloud_id.as_bytes()))[..8].to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cloud8_takes_the_uuid_prefix() {
        assert_eq!(
            super::cloud8("0F2A6C1E-0000-4000-8000-000000000001"),
            "0f2a6c1e"
        );
        let odd = super::cloud8("not-hex-at-all");
        assert_eq!(odd.len(), 8);
        assert!(odd.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
