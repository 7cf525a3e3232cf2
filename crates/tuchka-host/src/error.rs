//! The one error type of the host layer.
//!
//! Every variant names the object it is about (`domain tk-1a2b3c4d-web-0`, `image 3f…`,
//! `network blue`) and keeps the underlying cause in `#[source]`, so a caller can print the
//! whole chain with [`HostError::chain`].

use std::path::PathBuf;

use crate::cmd::CommandError;
use crate::net::links::LinkError;

/// Anything that can go wrong while changing or observing a host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// libvirt could not be reached.
    #[error("libvirt at {uri}: cannot connect (is libvirtd running? try ./scripts/start-libvirt)")]
    Connect {
        /// The connection URI.
        uri: String,
        /// What libvirt said.
        #[source]
        source: virt::error::Error,
    },
    /// A libvirt call about one domain failed.
    #[error("domain {name}: {action} failed")]
    Domain {
        /// Domain name.
        name: String,
        /// What was attempted ("define", "start", …).
        action: &'static str,
        /// What libvirt said.
        #[source]
        source: virt::error::Error,
    },
    /// A libvirt call not tied to one domain failed.
    #[error("libvirt: {action} failed")]
    Libvirt {
        /// What was attempted.
        action: &'static str,
        /// What libvirt said.
        #[source]
        source: virt::error::Error,
    },
    /// The domain does not exist (or is not visible to this cloud).
    #[error("domain {name}: not defined on this host")]
    NoDomain {
        /// Domain name.
        name: String,
    },
    /// A domain with this name exists but belongs to another cloud (or to nobody we know).
    #[error("domain {name}: belongs to {owner}, not to this cloud {cloud}; refusing to touch it")]
    ForeignDomain {
        /// Domain name.
        name: String,
        /// Who owns it, as found in its metadata ("no tuchka metadata" when absent).
        owner: String,
        /// Our cloud id.
        cloud: String,
    },
    /// The domain is in a state that does not allow the operation.
    #[error("domain {name}: cannot {action} while {state}")]
    BadState {
        /// Domain name.
        name: String,
        /// What was attempted.
        action: &'static str,
        /// The state it is in.
        state: String,
    },
    /// A libvirt job (a backup, …) ended without success; `message` is libvirt's.
    #[error("domain {name}: {job} job failed: {message}")]
    JobFailed {
        /// Domain name.
        name: String,
        /// The job ("backup", …).
        job: &'static str,
        /// Why, as libvirt reported it.
        message: String,
    },
    /// Capturing a disk of a domain into an image failed; nothing of it was left behind (no
    /// copy in the work directory, no output file).
    #[error("domain {name}: cannot capture disk {disk} into {}", out.display())]
    Capture {
        /// Domain name.
        name: String,
        /// The disk as the caller named it (target or source file).
        disk: String,
        /// The image file that was to be written.
        out: PathBuf,
        /// Why.
        #[source]
        source: Box<HostError>,
    },
    /// A file system operation failed.
    #[error("{object}: cannot {action} {path}")]
    Io {
        /// The object the file belongs to ("pool /var/lib/tuchka", "vm 42…").
        object: String,
        /// What was attempted ("create", "read", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An input was refused before anything was changed.
    #[error("{object}: {message}")]
    Invalid {
        /// The object ("vm id \"../x\"", "network blue", …).
        object: String,
        /// Why, and what to do.
        message: String,
    },
    /// A downloaded image did not have the expected digest; the partial file was deleted.
    #[error("image {sha256}: download is corrupt: expected sha256 {expected}, got {actual} (partial file deleted)")]
    Corrupt {
        /// Image identity.
        sha256: String,
        /// The digest the controller announced.
        expected: String,
        /// The digest of the bytes we have.
        actual: String,
    },
    /// A cached image cannot be removed because a VM disk uses it as its backing file.
    #[error("image {sha256}: still the backing file of vm {vm_id}; remove the vm first")]
    ImageInUse {
        /// Image identity.
        sha256: String,
        /// A VM whose root disk uses it.
        vm_id: String,
    },
    /// An external tool failed.
    #[error("{object}: {action} failed")]
    Tool {
        /// The object ("vm 42… seed", "network blue firewall", …).
        object: String,
        /// What was attempted.
        action: &'static str,
        /// The command and its output.
        #[source]
        source: CommandError,
    },
    /// A netlink request failed.
    #[error("network {name}: {action} failed")]
    Link {
        /// Network (or device) name.
        name: String,
        /// What was attempted.
        action: String,
        /// The netlink failure.
        #[source]
        source: LinkError,
    },
    /// A network's VXLAN device or its forwarding entries could not be managed.
    #[error("network {network}: {action} failed")]
    Vxlan {
        /// Network name.
        network: String,
        /// What was attempted.
        action: String,
        /// The failure.
        #[source]
        source: Box<crate::net::vxlan::VxlanError>,
    },
    /// The DHCP/DNS server of a network could not be managed.
    #[error("network {network}: DHCP/DNS server (dnsmasq)")]
    Dhcp {
        /// Network name.
        network: String,
        /// What went wrong.
        #[source]
        source: crate::net::dnsmasq::DnsmasqError,
    },
    /// A failure injected into a fake (see [`crate::fake`]).
    #[error("{op} {arg}: injected failure")]
    Injected {
        /// Operation name (`start`, `ensure_network`, …).
        op: String,
        /// Its main argument (domain name, vm id, network name, …).
        arg: String,
    },
}

impl HostError {
    /// The message and every cause, joined by ": " — what a user should see.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    /// Shorthand for [`HostError::Io`].
    pub(crate) fn io(
        object: impl Into<String>,
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        HostError::Io {
            object: object.into(),
            action,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`HostError::Invalid`].
    pub(crate) fn invalid(object: impl Into<String>, message: impl Into<String>) -> Self {
        HostError::Invalid {
            object: object.into(),
            message: message.into(),
        }
    }
}
