//! The host's two ports between hosts: the migration channel (TCP, mutual TLS, default
//! [`DEFAULT_CHANNEL_PORT`]) and VXLAN (UDP [`DEFAULT_VXLAN_PORT`]). Both must be reachable from
//! the cloud's other hosts — by their underlay addresses — and from no one else.
//!
//! The agent hands the dataplane an [`Underlay`] (the ports and the other hosts' underlay
//! addresses, from the desired state); [`Underlay::normalized`] validates it (pure). The
//! firewall ([`super::nft`]) then holds, in the cloud's table, an input-hook chain `underlay`
//! with the peers in the named sets `peers4` / `peers6`:
//!
//! 1. the channel port from loopback (the host itself): accept;
//! 2. the channel port or VXLAN from a peer: accept;
//! 3. the channel port or VXLAN from anyone else: drop (silently: a client sees a timeout).
//!
//! Nothing else is filtered there (policy accept), so the rest of the host is undisturbed; a
//! drop is final across nftables tables, an accept only ends this chain. With no peers (a
//! single-host cloud) the channel port is open to loopback only and VXLAN to no one.
//! Addresses are what is checked: VXLAN carries no authentication, the channel has mutual TLS
//! on top. That is why guests must never reach these ports with a host's address as their
//! source (NAT would give them one): the same [`Underlay`] — with this host's own and the
//! controller's address in `guarded` and the other control ports in `control_ports` — makes
//! the guest guard of [`super::guard`].

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use tuchka_api::Protocol;

/// The migration channel's TCP port unless configured otherwise.
pub const DEFAULT_CHANNEL_PORT: u16 = 7481;

/// The IANA VXLAN port, the one tuchka's VXLAN devices use.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// Who may reach this host's ports between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Underlay {
    /// TCP port the migration channel listens on; `None`: no channel on this host (only VXLAN
    /// is filtered).
    pub channel_port: Option<u16>,
    /// UDP port of VXLAN.
    pub vxlan_port: u16,
    /// Underlay addresses of the cloud's other hosts (IPv4 or IPv6).
    pub peers: Vec<IpAddr>,
    /// More addresses guests must not reach (besides `peers`): this host's own underlay
    /// address, the controller's (see [`super::guard`]).
    #[serde(default)]
    pub guarded: Vec<IpAddr>,
    /// More TCP ports of the cloud's control plane guests must not reach on any address
    /// (besides `channel_port` and libvirt's): the other hosts' channel ports, the
    /// controller's API port.
    #[serde(default)]
    pub control_ports: Vec<u16>,
}

impl Underlay {
    /// The default ports with `peers`.
    pub fn new(peers: Vec<IpAddr>) -> Self {
        Underlay {
            channel_port: Some(DEFAULT_CHANNEL_PORT),
            vxlan_port: DEFAULT_VXLAN_PORT,
            peers,
            guarded: Vec::new(),
            control_ports: Vec::new(),
        }
    }

    /// Validate (ports 1–65535, peers unicast and not loopback) and return the same underlay
    /// with its peers sorted and deduplicated (pure). The message says what is wrong.
    pub fn normalized(&self) -> Result<Underlay, String> {
        if self.vxlan_port == 0 {
            return Err("VXLAN port 0 is not a valid port (use 4789)".to_string());
        }
        if self.channel_port == Some(0) {
            return Err(format!(
                "channel port 0 is not a valid port (the default is {DEFAULT_CHANNEL_PORT})"
            ));
        }
        let peers = host_addresses(&self.peers, "peer")?;
        let guarded = host_addresses(&self.guarded, "guarded address")?;
        if self.control_ports.contains(&0) {
            return Err("control port 0 is not a valid port".to_string());
        }
        let control_ports: BTreeSet<u16> = self.control_ports.iter().copied().collect();
        Ok(Underlay {
            channel_port: self.channel_port,
            vxlan_port: self.vxlan_port,
            peers,
            guarded,
            control_ports: control_ports.into_iter().collect(),
        })
    }

    /// Whether a forward of `proto` port `port` would take one of these ports (its DNAT would
    /// send the traffic to a VM instead of the host); the message names the port.
    pub fn taken_by(&self, proto: Protocol, port: u16) -> Option<String> {
        match proto {
            Protocol::Tcp if self.channel_port == Some(port) => Some(format!(
                "tcp port {port} is the host-to-host migration channel"
            )),
            Protocol::Udp if self.vxlan_port == port => {
                Some(format!("udp port {port} is VXLAN between hosts"))
            }
            _ => None,
        }
    }
}

/// Validate host addresses (unicast, not loopback), sorted and deduplicated; `what` names
/// them in the message.
fn host_addresses(given: &[IpAddr], what: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = BTreeSet::new();
    for &given in given {
        // An IPv4-mapped IPv6 address would sit in the IPv6 set and never match.
        let ip = match given {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(given, IpAddr::V4),
            v4 => v4,
        };
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast || ip.is_loopback() {
            return Err(format!(
                "{what} {given} is not a host's underlay address (it must be a unicast, \
                 non-loopback address)"
            ));
        }
        out.insert(ip);
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn peers_are_sorted_deduplicated_and_unmapped() {
        let u = Underlay::new(vec![
            ip("10.0.0.3"),
            ip("fd00::2"),
            ip("10.0.0.2"),
            ip("10.0.0.3"),
            ip("::ffff:10.0.0.4"),
        ]);
        let n = u.normalized().expect("valid");
        assert_eq!(
            n.peers,
            vec![
                ip("10.0.0.2"),
                ip("10.0.0.3"),
                ip("10.0.0.4"),
                ip("fd00::2")
            ]
        );
        assert_eq!(n.channel_port, Some(DEFAULT_CHANNEL_PORT));
        assert_eq!(n.normalized().as_ref(), Ok(&n), "normalizing is idempotent");
        assert_eq!(
            Underlay::new(vec![]).normalized().map(|u| u.peers),
            Ok(vec![])
        );
    }

    #[test]
    fn bad_underlays_are_refused() {
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "127.0.0.1",
            "::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            let err = Underlay::new(vec![ip(bad)]).normalized().expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
        let mut u = Underlay::new(vec![]);
        u.vxlan_port = 0;
        assert!(u.normalized().is_err());
        let mut u = Underlay::new(vec![]);
        u.channel_port = Some(0);
        assert!(u.normalized().is_err());
        u.channel_port = None;
        assert!(u.normalized().is_ok(), "no channel is fine");
    }

    #[test]
    fn forwards_on_the_ports_are_named() {
        let u = Underlay::new(vec![]);
        assert!(u.taken_by(Protocol::Tcp, 7481).is_some());
        assert!(u.taken_by(Protocol::Udp, 4789).is_some());
        assert_eq!(u.taken_by(Protocol::Udp, 7481), None);
        assert_eq!(u.taken_by(Protocol::Tcp, 4789), None);
        let none = Underlay {
            channel_port: None,
            ..u
        };
        assert_eq!(none.taken_by(Protocol::Tcp, 7481), None);
    }
}
