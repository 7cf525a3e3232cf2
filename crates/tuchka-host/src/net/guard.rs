//! What guests may never reach on their own: the cloud's hosts and its control ports (pure).
//!
//! A guest's traffic that leaves its network — routed by the host, NAT'ed or not — must not
//! reach, unless a rule *names* it:
//!
//! - **the cloud's hosts**: every port of the other hosts' underlay addresses, of this host's
//!   own and of the controller's ([`GuestGuard::hosts`]). Through NAT a guest's packet would
//!   leave with the gateway host's underlay address as its source — an address every host
//!   admits to VXLAN and the migration channel — so without this a guest could inject frames
//!   into any network whose VNI it guesses, or talk to libvirt and the channel as a host would;
//! - **the control ports**, on any address ([`GuestGuard::tcp`], [`GuestGuard::udp`]): libvirt
//!   (16509, 16514), libvirt's migration ports (49152–49215), the migration channel (7481 and
//!   every other host's port), the controller's API port, and VXLAN (UDP 4789) — so a host
//!   reachable under another of its addresses is covered too.
//!
//! "Names" is what an outbound rule (`net rule add --allow-out SPEC --to DEST`) says, and it
//! is checked per rule, in the rules' order (first match wins, as always):
//!
//! - a rule whose `--to` lists an address on its own (a /32, `--to 10.0.0.12`) lets the guest
//!   reach that address — a host's included — on the rule's protocol and ports, control ports
//!   included ([`Route::Named`]);
//! - a rule whose SPEC gives ports (`tcp:16514`, `udp:4789`, `tcp:16000-17000`) lets the guest
//!   reach those ports on the rule's other destinations, but never a host of the cloud that it
//!   does not name ([`Route::Ports`]);
//! - any other allow (`--to 0.0.0.0/0`, `tcp` without ports, `any`) and the NAT default never
//!   reach a host or a control port ([`Route::Guarded`]).
//!
//! The same holds for the host a guest runs on: its input from the networks' bridges admits
//! DHCP, DNS, ping and replies, plus what a rule names (an address of this host as a /32).

use std::collections::BTreeSet;
use std::net::IpAddr;

use tuchka_api::{Protocol, RuleAction};

use super::rules::Egress;
use super::underlay::{Underlay, DEFAULT_CHANNEL_PORT, DEFAULT_VXLAN_PORT};

/// libvirt's TCP and TLS ports.
pub const LIBVIRT_PORTS: [u16; 2] = [16509, 16514];
/// libvirt's (direct) migration port range.
pub const LIBVIRT_MIGRATION_PORTS: (u16, u16) = (49152, 49215);

/// Destinations guests may not reach unless a rule names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestGuard {
    /// Addresses of the cloud's hosts and controller: every port (sorted, deduplicated).
    pub hosts: Vec<IpAddr>,
    /// TCP control ports, on any address: inclusive ranges, sorted, merged.
    pub tcp: Vec<(u16, u16)>,
    /// UDP control ports, on any address.
    pub udp: Vec<(u16, u16)>,
}

impl GuestGuard {
    /// The guard of a host whose `underlay` is known (peers, own and controller address, the
    /// channel and the other control ports), or — `None`, a single-host cloud that never
    /// called `ensure_underlay` — only the default control ports and no addresses.
    pub fn of(underlay: Option<&Underlay>) -> Self {
        let mut hosts = BTreeSet::new();
        let mut tcp: Vec<(u16, u16)> = LIBVIRT_PORTS.iter().map(|&p| (p, p)).collect();
        tcp.push(LIBVIRT_MIGRATION_PORTS);
        let mut udp = vec![];
        match underlay {
            Some(u) => {
                hosts.extend(u.peers.iter().copied());
                hosts.extend(u.guarded.iter().copied());
                tcp.extend(u.channel_port.map(|p| (p, p)));
                tcp.extend(u.control_ports.iter().map(|&p| (p, p)));
                udp.push((u.vxlan_port, u.vxlan_port));
            }
            None => {
                tcp.push((DEFAULT_CHANNEL_PORT, DEFAULT_CHANNEL_PORT));
                udp.push((DEFAULT_VXLAN_PORT, DEFAULT_VXLAN_PORT));
            }
        }
        GuestGuard {
            hosts: hosts.into_iter().collect(),
            tcp: merge(tcp),
            udp: merge(udp),
        }
    }
}

/// Sort and merge overlapping or adjacent ranges; port 0 is dropped.
fn merge(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.retain(|&(from, to)| from > 0 && from <= to);
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(from) <= u32::from(last.1) + 1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

/// Where traffic an outbound allow rule matched goes on (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The rule names the destination address: nothing is guarded.
    Named,
    /// The rule names its ports: the cloud's hosts stay guarded, the control ports do not.
    Ports,
    /// Neither: hosts and control ports are guarded.
    Guarded,
}

/// Pure: how an outbound allow rule's traffic is routed — its destinations that are single
/// addresses (routed [`Route::Named`]; empty if none), and the route of the rest.
pub fn routes(rule: &Egress) -> (Vec<tuchka_core::ipam::Cidr>, Route) {
    let named: Vec<_> = rule
        .destinations
        .iter()
        .copied()
        .filter(|d| d.prefix() == 32)
        .collect();
    let names_ports =
        matches!(rule.matches.proto, Protocol::Tcp | Protocol::Udp) && rule.matches.ports.is_some();
    let rest = if names_ports {
        Route::Ports
    } else {
        Route::Guarded
    };
    (named, rest)
}

/// Pure: whether an outbound rule can open a way to this host itself (an allow naming a
/// single address) — only such networks get a chain in the input hook.
pub fn opens_the_host(egress: &[Egress]) -> bool {
    egress
        .iter()
        .any(|e| e.action == RuleAction::Allow && !routes(e).0.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::rules::PortSpec;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn egress(proto: Protocol, ports: Option<(u16, u16)>, to: &[&str]) -> Egress {
        Egress {
            id: "e".into(),
            action: RuleAction::Allow,
            matches: PortSpec { proto, ports },
            destinations: tuchka_core::ipam::normalize(
                &to.iter()
                    .map(|s| tuchka_core::ipam::Cidr::parse_any(s).expect("cidr"))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    #[test]
    fn the_guard_holds_every_host_and_control_port() {
        let mut u = Underlay::new(vec![ip("10.0.0.12"), ip("10.0.0.13")]);
        u.guarded = vec![ip("10.0.0.11"), ip("10.0.0.1"), ip("10.0.0.12")];
        u.control_ports = vec![7480, 7481, 7482];
        let g = GuestGuard::of(Some(&u));
        assert_eq!(
            g.hosts,
            vec![
                ip("10.0.0.1"),
                ip("10.0.0.11"),
                ip("10.0.0.12"),
                ip("10.0.0.13")
            ]
        );
        assert_eq!(
            g.tcp,
            vec![(7480, 7482), (16509, 16509), (16514, 16514), (49152, 49215)],
            "sorted and merged"
        );
        assert_eq!(g.udp, vec![(4789, 4789)]);

        let none = GuestGuard::of(None);
        assert!(none.hosts.is_empty());
        assert!(none.tcp.contains(&(7481, 7481)) && none.tcp.contains(&(16509, 16509)));
        assert_eq!(none.udp, vec![(4789, 4789)]);

        let no_channel = Underlay {
            channel_port: None,
            ..Underlay::new(vec![])
        };
        assert!(!GuestGuard::of(Some(&no_channel))
            .tcp
            .contains(&(7481, 7481)));
    }

    #[test]
    fn merging_ranges() {
        assert_eq!(
            merge(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26), (0, 0)]),
            vec![(1, 9), (20, 30)]
        );
        assert_eq!(
            merge(vec![(65535, 65535), (65534, 65535)]),
            vec![(65534, 65535)]
        );
    }

    #[test]
    fn what_a_rule_names() {
        let (named, rest) = routes(&egress(Protocol::Any, None, &["0.0.0.0/0"]));
        assert!(named.is_empty());
        assert_eq!(rest, Route::Guarded, "everything, naming nothing");
        let (named, rest) = routes(&egress(Protocol::Tcp, None, &["10.0.0.0/8"]));
        assert!(named.is_empty());
        assert_eq!(rest, Route::Guarded, "tcp without ports names no port");
        let (_, rest) = routes(&egress(Protocol::Tcp, Some((16514, 16514)), &["0.0.0.0/0"]));
        assert_eq!(rest, Route::Ports);
        let (named, _) = routes(&egress(
            Protocol::Any,
            None,
            &["10.0.0.12", "192.0.2.0/24", "10.0.0.1/32"],
        ));
        assert_eq!(
            named,
            vec![
                tuchka_core::ipam::Cidr::parse_any("10.0.0.1").expect("cidr"),
                tuchka_core::ipam::Cidr::parse_any("10.0.0.12").expect("cidr")
            ],
            "single addresses only"
        );
        assert!(opens_the_host(&[egress(
            Protocol::Icmp,
            None,
            &["10.0.0.1"]
        )]));
        assert!(!opens_the_host(&[egress(
            Protocol::Any,
            None,
            &["10.0.0.0/24"]
        )]));
        let mut deny = egress(Protocol::Any, None, &["10.0.0.1"]);
        deny.action = RuleAction::Deny;
        assert!(!opens_the_host(&[deny]));
    }
}
