//! Access rules and port forwards: parsing what users type (`tcp:80`, `tcp:8000-8100`, `icmp`,
//! `web-0:80`) and checking it, before anything is stored.

use thiserror::Error;
use tuchka_api::agent::PortMatch;
use tuchka_api::Protocol;

/// A rule or forward that cannot be accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RuleError {
    /// The protocol/port spec is malformed.
    #[error("invalid rule {0:?}: use tcp:PORT, tcp:FROM-TO, udp:PORT, udp:FROM-TO, icmp or any (e.g. tcp:80)")]
    Spec(String),
    /// A port range is empty or out of 1..=65535.
    #[error("invalid port range {0:?}: ports are 1-65535 and the first must not exceed the last")]
    Range(String),
    /// A forward target is not `VM:PORT`.
    #[error("invalid forward target {0:?}: use VM:PORT, e.g. web-0:80")]
    Target(String),
}

fn port(s: &str, whole: &str) -> Result<u16, RuleError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RuleError::Range(whole.to_string()));
    }
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(RuleError::Range(whole.to_string())),
    }
}

/// Parse `tcp:80`, `udp:5000-5100`, `tcp` (every port), `icmp`, `any`.
pub fn parse_spec(spec: &str) -> Result<PortMatch, RuleError> {
    let bad = || RuleError::Spec(spec.to_string());
    let (proto, ports) = match spec.split_once(':') {
        Some((p, ports)) => (p, Some(ports)),
        None => (spec, None),
    };
    let proto: Protocol = proto.parse().map_err(|_| bad())?;
    match (proto, ports) {
        (_, None) => Ok(PortMatch {
            proto,
            port_from: None,
            port_to: None,
        }),
        (Protocol::Tcp | Protocol::Udp, Some(ports)) => {
            let (a, b) = match ports.split_once('-') {
                Some((a, b)) => (port(a, ports)?, port(b, ports)?),
                None => {
                    let p = port(ports, ports)?;
                    (p, p)
                }
            };
            if a > b {
                return Err(RuleError::Range(ports.to_string()));
            }
            Ok(PortMatch {
                proto,
                port_from: Some(a),
                port_to: Some(b),
            })
        }
        _ => Err(bad()),
    }
}

/// The spec in its canonical written form.
pub fn format_spec(m: &PortMatch) -> String {
    match (m.port_from, m.port_to) {
        (Some(a), Some(b)) if a == b => format!("{}:{a}", m.proto),
        (Some(a), Some(b)) => format!("{}:{a}-{b}", m.proto),
        _ => m.proto.to_string(),
    }
}

/// Parse a forward target `VM:PORT`.
pub fn parse_target(s: &str) -> Result<(String, u16), RuleError> {
    let (vm, p) = s
        .rsplit_once(':')
        .ok_or_else(|| RuleError::Target(s.to_string()))?;
    crate::names::validate_name("vm", vm).map_err(|_| RuleError::Target(s.to_string()))?;
    Ok((vm.to_string(), port(p, s)?))
}

/// Host ports a forward may not use: what the cloud itself listens on.
/// SSH 22, DNS 53, DHCP 67/68, libvirt 16509/16514, VXLAN 4789, the host-to-host migration
/// channel 7481 (its default port), libvirt migration 49152-49215.
pub fn reserved_port(p: u16) -> Option<&'static str> {
    match p {
        22 => Some("SSH"),
        53 => Some("DNS of the networks"),
        67 | 68 => Some("DHCP of the networks"),
        4789 => Some("VXLAN between hosts"),
        7481 => Some("the migration channel between hosts"),
        16509 | 16514 => Some("libvirt"),
        49152..=49215 => Some("libvirt live migration"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let m = parse_spec("tcp:80").expect("ok");
        assert_eq!(
            (m.proto.as_str(), m.port_from, m.port_to),
            ("tcp", Some(80), Some(80))
        );
        let m = parse_spec("udp:5000-5100").expect("ok");
        assert_eq!((m.port_from, m.port_to), (Some(5000), Some(5100)));
        assert_eq!(format_spec(&m), "udp:5000-5100");
        assert_eq!(format_spec(&parse_spec("icmp").expect("ok")), "icmp");
        assert_eq!(format_spec(&parse_spec("tcp:22").expect("ok")), "tcp:22");
        assert_eq!(parse_spec("any").expect("ok").proto, Protocol::Any);
    }

    #[test]
    fn refuses_bad_specs_and_ranges() {
        for bad in ["", "http:80", "tcp:", "icmp:8", "tcp:80:90", "TCP:80"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
        for bad in [
            "tcp:0",
            "tcp:65536",
            "tcp:90-80",
            "tcp:-5",
            "tcp:1-",
            "udp:99999",
            "tcp:8a",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(RuleError::Range(_))),
                "{bad}: {:?}",
                parse_spec(bad)
            );
        }
    }

    #[test]
    fn parses_forward_targets() {
        assert_eq!(parse_target("web-0:80"), Ok(("web-0".into(), 80)));
        assert!(parse_target("web-0").is_err());
        assert!(parse_target("Web:80").is_err());
        assert!(parse_target("web-0:0").is_err());
        assert_eq!(reserved_port(53), Some("DNS of the networks"));
        assert_eq!(reserved_port(8080), None);
        assert!(reserved_port(7481).is_some(), "the migration channel");
    }
}
