//! Access rules, outbound NAT and port forwards of one network, validated into typed form
//! (pure). The nft renderer ([`super::nft`]) only ever sees these types, so everything a user
//! or the controller can get wrong is refused here, with the rule it concerns, before anything
//! on the host changes.
//!
//! Conventions of the contract (`tuchka_api::agent::NetworkDesired`):
//! - address lists (ingress `sources`/`targets`, egress `destinations`) hold CIDRs or bare
//!   addresses (/32); an empty `sources` or `destinations` list matches nothing, an empty
//!   `targets` list means the whole network;
//! - `PortMatch`: `tcp`/`udp` with an optional port range, `icmp`, or `any` (ports only with
//!   tcp/udp).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use tuchka_api::agent::{EgressRule, ForwardDesired, IngressRule, NetworkDesired, PortMatch};
use tuchka_api::{Protocol, RuleAction};
use tuchka_core::ipam::{normalize, Cidr};

/// What a rule matches besides addresses: a protocol and, for tcp/udp, destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// The protocol.
    pub proto: Protocol,
    /// Inclusive destination port range (tcp/udp only); `None` = every port.
    pub ports: Option<(u16, u16)>,
}

impl PortSpec {
    /// Validate a wire [`PortMatch`].
    pub fn parse(m: &PortMatch) -> Result<Self, String> {
        let proto = m.proto;
        let ports = match (m.port_from, m.port_to) {
            (None, None) => None,
            (None, Some(_)) => return Err("port_to without port_from".to_string()),
            (Some(from), to) => {
                let to = to.unwrap_or(from);
                if to < from {
                    return Err(format!("port range {from}-{to} is empty"));
                }
                Some((from, to))
            }
        };
        if ports.is_some() && !matches!(proto, Protocol::Tcp | Protocol::Udp) {
            return Err(format!(
                "ports can only be given with tcp or udp, not {}",
                proto.as_str()
            ));
        }
        Ok(PortSpec { proto, ports })
    }
}

/// A validated inbound allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    /// Rule id.
    pub id: String,
    /// Protocol and ports.
    pub matches: PortSpec,
    /// Source networks, normalized; empty = the rule matches nothing.
    pub sources: Vec<Cidr>,
    /// Destinations inside the network, normalized; empty = the whole network.
    pub targets: Vec<Cidr>,
}

/// A validated outbound rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// Rule id.
    pub id: String,
    /// Allow or deny.
    pub action: RuleAction,
    /// Protocol and ports.
    pub matches: PortSpec,
    /// Destination networks, normalized; empty = the rule matches nothing.
    pub destinations: Vec<Cidr>,
}

/// A validated port forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Forward id.
    pub id: String,
    /// [`Protocol::Tcp`] or [`Protocol::Udp`].
    pub proto: Protocol,
    /// Port on the host's addresses.
    pub host_port: u16,
    /// VM address (inside the network).
    pub vm_ip: Ipv4Addr,
    /// Port on the VM.
    pub vm_port: u16,
}

/// Everything the firewall needs to know about one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRules {
    /// Network name (`[A-Za-z0-9-]`, also used in chain names).
    pub name: String,
    /// Bridge name.
    pub bridge: String,
    /// The network.
    pub net: Cidr,
    /// Whether this host is the network's gateway (NAT and forwards happen only there).
    pub gateway_here: bool,
    /// Outbound NAT.
    pub nat: bool,
    /// Inbound allow rules.
    pub ingress: Vec<Ingress>,
    /// Outbound rules, in order.
    pub egress: Vec<Egress>,
    /// Port forwards.
    pub forwards: Vec<Forward>,
}

impl NetRules {
    /// Validate the rules of `d`, whose CIDR parsed to `net`.
    pub fn from_desired(d: &NetworkDesired, net: Cidr) -> Result<Self, String> {
        let ingress = d
            .ingress
            .iter()
            .map(|r| ingress(r, &net))
            .collect::<Result<Vec<_>, _>>()?;
        let egress = d.egress.iter().map(egress).collect::<Result<Vec<_>, _>>()?;
        let forwards = d
            .forwards
            .iter()
            .map(|f| forward(f, &net))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for f in &forwards {
            if !seen.insert((f.proto, f.host_port)) {
                return Err(format!(
                    "forward {:?}: {} port {} is forwarded twice",
                    f.id,
                    f.proto.as_str(),
                    f.host_port
                ));
            }
        }
        Ok(NetRules {
            name: d.name.clone(),
            bridge: d.bridge.clone(),
            net,
            gateway_here: d.gateway_here,
            nat: d.nat,
            ingress,
            egress,
            forwards,
        })
    }

    /// Whether the host must route for this network (`net.ipv4.ip_forward=1`): on its gateway
    /// host, when it has NAT, forwards, ingress rules or egress allow rules. Same-network
    /// traffic is bridged and needs no routing.
    pub fn needs_forwarding(&self) -> bool {
        self.gateway_here
            && (self.nat
                || !self.ingress.is_empty()
                || !self.forwards.is_empty()
                || self.egress.iter().any(|e| e.action == RuleAction::Allow))
    }

    /// The forwards in effect on this host (only the gateway host forwards).
    pub fn active_forwards(&self) -> &[Forward] {
        if self.gateway_here {
            &self.forwards
        } else {
            &[]
        }
    }
}

/// Parse and normalize an address list.
fn addr_list(list: &[String]) -> Result<Vec<Cidr>, String> {
    let nets = list
        .iter()
        .map(|s| Cidr::parse_any(s.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(normalize(&nets))
}

fn ingress(r: &IngressRule, net: &Cidr) -> Result<Ingress, String> {
    let ctx = |e: String| format!("ingress rule {:?}: {e}", r.id);
    let matches = PortSpec::parse(&r.matches).map_err(ctx)?;
    let sources = addr_list(&r.sources).map_err(|e| ctx(format!("sources: {e}")))?;
    let targets = addr_list(&r.targets).map_err(|e| ctx(format!("targets: {e}")))?;
    if let Some(t) = targets.iter().find(|t| !net.covers(t)) {
        return Err(ctx(format!("target {t} is outside the network {net}")));
    }
    Ok(Ingress {
        id: r.id.clone(),
        matches,
        sources,
        targets,
    })
}

fn egress(r: &EgressRule) -> Result<Egress, String> {
    let ctx = |e: String| format!("egress rule {:?}: {e}", r.id);
    let action = r.action;
    let matches = PortSpec::parse(&r.matches).map_err(ctx)?;
    let destinations = addr_list(&r.destinations).map_err(|e| ctx(format!("destinations: {e}")))?;
    Ok(Egress {
        id: r.id.clone(),
        action,
        matches,
        destinations,
    })
}

fn forward(f: &ForwardDesired, net: &Cidr) -> Result<Forward, String> {
    let ctx = |e: String| format!("forward {:?}: {e}", f.id);
    let proto = match f.proto {
        p @ (Protocol::Tcp | Protocol::Udp) => p,
        other => {
            return Err(ctx(format!(
                "protocol {} cannot be forwarded (tcp or udp)",
                other.as_str()
            )))
        }
    };
    let vm_ip: Ipv4Addr = f
        .vm_ip
        .parse()
        .map_err(|_| ctx(format!("vm_ip {:?} is not an IPv4 address", f.vm_ip)))?;
    if !net.contains(vm_ip) {
        return Err(ctx(format!("vm_ip {vm_ip} is outside the network {net}")));
    }
    if f.host_port == 0 || f.vm_port == 0 {
        return Err(ctx("ports must be 1-65535".to_string()));
    }
    Ok(Forward {
        id: f.id.clone(),
        proto,
        host_port: f.host_port,
        vm_ip,
        vm_port: f.vm_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(proto: &str, from: Option<u16>, to: Option<u16>) -> PortMatch {
        PortMatch {
            proto: proto.parse().expect("proto"),
            port_from: from,
            port_to: to,
        }
    }

    fn desired() -> NetworkDesired {
        NetworkDesired {
            name: "blue".into(),
            vni: 100,
            bridge: "tk100".into(),
            cidr: "10.10.0.0/24".into(),
            gateway: "10.10.0.1".into(),
            gateway_here: true,
            mtu: 1450,
            hosts: vec![],
            nat: false,
            ingress: vec![],
            egress: vec![],
            forwards: vec![],
            vxlan: None,
        }
    }

    fn rules(d: &NetworkDesired) -> Result<NetRules, String> {
        NetRules::from_desired(d, d.cidr.parse().expect("cidr"))
    }

    #[test]
    fn port_matches() {
        let ok = |m| PortSpec::parse(&m).expect("valid");
        assert_eq!(ok(pm("tcp", Some(80), None)).ports, Some((80, 80)));
        assert_eq!(
            ok(pm("udp", Some(1000), Some(2000))).ports,
            Some((1000, 2000))
        );
        assert_eq!(ok(pm("tcp", None, None)).ports, None);
        assert_eq!(ok(pm("any", None, None)).proto, Protocol::Any);
        assert_eq!(ok(pm("icmp", None, None)).proto, Protocol::Icmp);
        for bad in [
            // An unknown protocol such as "sctp" cannot even be expressed: the wire type refuses it.
            pm("tcp", Some(90), Some(80)),
            pm("tcp", None, Some(80)),
            pm("icmp", Some(8), None),
            pm("any", Some(1), Some(2)),
        ] {
            assert!(PortSpec::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_are_validated_and_named_in_errors() {
        let mut d = desired();
        d.ingress.push(IngressRule {
            id: "web".into(),
            matches: pm("tcp", Some(80), None),
            sources: vec!["0.0.0.0/0".into()],
            targets: vec!["10.10.0.5".into(), "10.10.0.5/32".into()],
        });
        let r = rules(&d).expect("valid");
        assert_eq!(r.ingress[0].targets.len(), 1, "duplicates collapse");

        let bad = |f: &dyn Fn(&mut NetworkDesired), needle: &str| {
            let mut d = desired();
            f(&mut d);
            let err = rules(&d).expect_err("must be refused");
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        bad(
            &|d| {
                d.ingress.push(IngressRule {
                    id: "r1".into(),
                    matches: pm("tcp", Some(80), None),
                    sources: vec!["10.0.0.0/33".into()],
                    targets: vec![],
                })
            },
            "ingress rule \"r1\": sources",
        );
        bad(
            &|d| {
                d.ingress.push(IngressRule {
                    id: "r2".into(),
                    matches: pm("tcp", Some(80), None),
                    sources: vec![],
                    targets: vec!["10.99.0.5".into()],
                })
            },
            "outside the network",
        );
        bad(
            &|d| {
                d.egress.push(EgressRule {
                    id: "e1".into(),
                    action: RuleAction::Deny,
                    matches: pm("any", None, None),
                    destinations: vec!["300.0.0.0/8".into()],
                })
            },
            "egress rule \"e1\"",
        );
        let fwd = |id: &str, port: u16, ip: &str| ForwardDesired {
            id: id.into(),
            proto: "tcp".parse().expect("proto"),
            host_port: port,
            vm_ip: ip.into(),
            vm_port: 80,
        };
        bad(
            &|d| d.forwards.push(fwd("f1", 8080, "10.11.0.5")),
            "outside",
        );
        bad(&|d| d.forwards.push(fwd("f1", 0, "10.10.0.5")), "1-65535");
        bad(
            &|d| {
                d.forwards.push(fwd("f1", 8080, "10.10.0.5"));
                d.forwards.push(fwd("f2", 8080, "10.10.0.6"));
            },
            "forwarded twice",
        );
        bad(
            &|d| {
                d.forwards.push(ForwardDesired {
                    proto: "icmp".parse().expect("proto"),
                    ..fwd("f1", 8080, "10.10.0.5")
                })
            },
            "cannot be forwarded",
        );
    }

    #[test]
    fn forwarding_is_needed_only_on_the_gateway_with_something_to_route() {
        let mut d = desired();
        assert!(!rules(&d).expect("valid").needs_forwarding());
        d.nat = true;
        assert!(rules(&d).expect("valid").needs_forwarding());
        d.gateway_here = false;
        assert!(!rules(&d).expect("valid").needs_forwarding());
        let mut d = desired();
        d.egress.push(EgressRule {
            id: "e".into(),
            action: "deny".parse().expect("action"),
            matches: pm("any", None, None),
            destinations: vec!["0.0.0.0/0".into()],
        });
        assert!(
            !rules(&d).expect("valid").needs_forwarding(),
            "deny only routes nothing"
        );
        d.forwards.push(ForwardDesired {
            id: "f".into(),
            proto: "udp".parse().expect("proto"),
            host_port: 5353,
            vm_ip: "10.10.0.5".into(),
            vm_port: 53,
        });
        assert!(rules(&d).expect("valid").needs_forwarding());
    }
}
