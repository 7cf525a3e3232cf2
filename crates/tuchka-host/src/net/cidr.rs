//! IPv4 prefixes (pure).

use std::net::Ipv4Addr;

/// An IPv4 network: address with host bits cleared, and prefix length. Ordered by address,
/// then prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length 0–32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parse `a.b.c.d/n`; host bits must be zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not of the form a.b.c.d/n"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix {len:?} is not 0-32"))?;
        let net = Ipv4Net {
            addr: Ipv4Addr::from(u32::from(ip) & mask(prefix)),
            prefix,
        };
        if net.addr != ip {
            return Err(format!(
                "{s:?} has host bits set (network is {}/{prefix})",
                net.addr
            ));
        }
        Ok(net)
    }

    /// Parse `a.b.c.d/n` or a bare address (a /32); host bits must be zero.
    pub fn parse_addr_or_net(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return Self::parse(s);
        }
        let ip: Ipv4Addr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or a.b.c.d/n"))?;
        Ok(Ipv4Net {
            addr: ip,
            prefix: 32,
        })
    }

    /// Whether every address of `other` is inside this network.
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Sort `nets`, drop duplicates and every network covered by another one of the list (pure).
/// The result matches exactly the same addresses and never holds overlapping entries, which
/// nftables interval sets refuse.
pub fn normalize(nets: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut sorted = nets.to_vec();
    // Wider networks first among equal addresses, so a covering one precedes what it covers.
    sorted.sort_by_key(|n| (n.addr, n.prefix));
    let mut out: Vec<Ipv4Net> = Vec::with_capacity(sorted.len());
    for n in sorted {
        // In address order, a covering network of `n` can only be the last one kept.
        if out.last().is_some_and(|last| last.covers(&n)) {
            continue;
        }
        out.push(n);
    }
    out
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let n = Ipv4Net::parse("10.7.0.0/24").expect("valid");
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(n.contains(Ipv4Addr::new(10, 7, 0, 9)));
        assert!(!n.contains(Ipv4Addr::new(10, 7, 1, 9)));
        assert!(Ipv4Net::parse("10.7.0.1/24").is_err());
        assert!(Ipv4Net::parse("10.7.0.0/33").is_err());
        assert!(Ipv4Net::parse("10.7.0.0").is_err());
        assert_eq!(
            Ipv4Net::parse("0.0.0.0/0").map(|n| n.netmask()),
            Ok(Ipv4Addr::new(0, 0, 0, 0))
        );
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        let n = Ipv4Net::parse_addr_or_net("10.7.0.9").expect("valid");
        assert_eq!(n.to_string(), "10.7.0.9/32");
        assert!(Ipv4Net::parse_addr_or_net("10.7.0.0/16").is_ok());
        assert!(Ipv4Net::parse_addr_or_net("10.7.0.1/16").is_err());
        assert!(Ipv4Net::parse_addr_or_net("host").is_err());
    }

    #[test]
    fn normalize_drops_duplicates_and_covered_networks() {
        let p = |s: &str| Ipv4Net::parse_addr_or_net(s).expect("valid");
        let nets = [
            p("10.1.2.3"),
            p("10.0.0.0/8"),
            p("192.168.1.0/24"),
            p("10.1.0.0/16"),
            p("192.168.1.7"),
            p("172.16.0.1"),
            p("172.16.0.1"),
            p("192.168.2.0/24"),
        ];
        let out: Vec<String> = normalize(&nets).iter().map(|n| n.to_string()).collect();
        assert_eq!(
            out,
            [
                "10.0.0.0/8",
                "172.16.0.1/32",
                "192.168.1.0/24",
                "192.168.2.0/24"
            ]
        );
        assert_eq!(
            normalize(&[p("0.0.0.0/0"), p("10.0.0.1")]),
            vec![p("0.0.0.0/0")]
        );
    }
}
