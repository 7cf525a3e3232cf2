//! IPv4 prefixes (pure).

use std::net::Ipv4Addr;

/// An IPv4 network: address with host bits cleared, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}
