//! IPv4 address management: CIDRs, gateways, address and MAC allocation, VNIs.
//!
//! [`Cidr`] is the one IPv4 prefix type of tuchka: the controller validates user networks and
//! rule sources with it, the host renders firewall address lists from it. A `Cidr` never has
//! host bits set (every constructor refuses them, suggesting the network).
//!
//! A network `a.b.c.0/p` has its network address, the gateway (first usable address), the
//! broadcast address, and VM addresses from the second usable address up. Allocation takes the
//! lowest free address so that reservations are predictable and dense.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use rand::Rng;
use thiserror::Error;

/// Smallest prefix length accepted (a /16 has 65,534 addresses).
pub const MIN_PREFIX: u8 = 16;
/// Largest prefix length accepted (a /29 has 5 usable VM addresses).
pub const MAX_PREFIX: u8 = 29;

/// What is wrong with a CIDR or an allocation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IpamError {
    /// Not of the form `a.b.c.d/p`.
    #[error("invalid CIDR {0:?}: use an IPv4 network like 10.80.0.0/24")]
    Syntax(String),
    /// Prefix outside MIN_PREFIX..=MAX_PREFIX.
    #[error("CIDR {cidr} is {why}: use a prefix length between /{MIN_PREFIX} and /{MAX_PREFIX}")]
    Size {
        /// The CIDR.
        cidr: String,
        /// "too small" / "too large".
        why: &'static str,
    },
    /// Host bits set.
    #[error("{given} is not a network address: did you mean {suggested}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        suggested: String,
    },
    /// Overlaps an existing network.
    #[error(
        "CIDR {cidr} overlaps network {other:?} ({other_cidr}): pick a range that does not overlap"
    )]
    Overlap {
        /// The new CIDR.
        cidr: String,
        /// Name of the network it overlaps.
        other: String,
        /// CIDR of that network.
        other_cidr: String,
    },
    /// No free address left.
    #[error("network {network:?} ({cidr}) has no free address left")]
    Exhausted {
        /// Network name.
        network: String,
        /// Its CIDR.
        cidr: String,
    },
}

/// An IPv4 network: a network address (no host bits set) and a prefix length 0–32. Ordered by
/// address, then prefix length (a wider network first among equal addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// Parse and validate a user network's CIDR: `a.b.c.d/p`, no host bits, prefix in
    /// [`MIN_PREFIX`]..=[`MAX_PREFIX`]. For any prefix length use [`str::parse`].
    pub fn parse_network(s: &str) -> Result<Cidr, IpamError> {
        let c = Cidr::parse_raw(s)?;
        if c.prefix < MIN_PREFIX {
            return Err(IpamError::Size {
                cidr: s.into(),
                why: "too large",
            });
        }
        if c.prefix > MAX_PREFIX {
            return Err(IpamError::Size {
                cidr: s.into(),
                why: "too small",
            });
        }
        c.without_host_bits(s)
    }

    /// Parse a CIDR of any size (`0.0.0.0/0` … `/32`) or a bare address (taken as `/32`), as
    /// used in access rules; host bits must be zero.
    pub fn parse_any(s: &str) -> Result<Cidr, IpamError> {
        if s.contains('/') {
            return s.parse();
        }
        let addr: Ipv4Addr = s.parse().map_err(|_| IpamError::Syntax(s.to_string()))?;
        Ok(Cidr::host(addr))
    }

    /// The `/32` of one address.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr { addr, prefix: 32 }
    }

    /// `a.b.c.d/p` with `p` 0–32; host bits are not checked.
    fn parse_raw(s: &str) -> Result<Cidr, IpamError> {
        let bad = || IpamError::Syntax(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 2 {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// `self` if no host bits are set, else the error suggesting the network (`given` is the
    /// text the user typed).
    fn without_host_bits(self, given: &str) -> Result<Cidr, IpamError> {
        let net = Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        };
        if net.addr != self.addr {
            return Err(IpamError::HostBits {
                given: given.into(),
                suggested: net.to_string(),
            });
        }
        Ok(net)
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Network address.
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    fn first(&self) -> u32 {
        u32::from(self.addr)
    }

    fn last(&self) -> u32 {
        self.first() | !self.mask()
    }

    /// Broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.last())
    }

    /// Gateway: the first usable address (meaningful for user networks, /30 and larger).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.first().saturating_add(1))
    }

    /// Netmask in dotted form.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.first()
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }

    /// Whether every address of `other` is inside this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// Addresses VMs may get: after the gateway, before the broadcast.
    pub fn vm_range(&self) -> impl Iterator<Item = Ipv4Addr> {
        (self.first().saturating_add(2)..self.last()).map(Ipv4Addr::from)
    }
}

/// `a.b.c.d/p` with any prefix length 0–32; host bits must be zero.
impl FromStr for Cidr {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse_raw(s)?.without_host_bits(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Sort `nets`, drop duplicates and every network covered by another one of the list. The
/// result matches exactly the same addresses and never holds overlapping entries (which
/// nftables interval sets refuse).
pub fn normalize(nets: &[Cidr]) -> Vec<Cidr> {
    let mut sorted = nets.to_vec();
    // Wider networks first among equal addresses, so a covering one precedes what it covers.
    sorted.sort();
    let mut out: Vec<Cidr> = Vec::with_capacity(sorted.len());
    for n in sorted {
        // In address order, a covering network of `n` can only be the last one kept.
        if out.last().is_some_and(|last| last.covers(&n)) {
            continue;
        }
        out.push(n);
    }
    out
}

/// Refuse `cidr` if it overlaps one of `existing` (name, cidr).
pub fn check_overlap<'a>(
    cidr: &Cidr,
    existing: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), IpamError> {
    for (name, other) in existing {
        if let Ok(o) = other.parse::<Cidr>() {
            if cidr.overlaps(&o) {
                return Err(IpamError::Overlap {
                    cidr: cidr.to_string(),
                    other: name.to_string(),
                    other_cidr: other.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The lowest VM address of `cidr` not in `used`.
pub fn allocate_ip(
    network: &str,
    cidr: &Cidr,
    used: &HashSet<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    cidr.vm_range()
        .find(|ip| !used.contains(ip))
        .ok_or_else(|| IpamError::Exhausted {
            network: network.into(),
            cidr: cidr.to_string(),
        })
}

/// A locally administered, unicast MAC in QEMU's `52:54:00` range that is not in `used`.
pub fn allocate_mac(rng: &mut impl Rng, used: &HashSet<String>) -> String {
    loop {
        let b: [u8; 3] = rng.gen();
        let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]);
        if !used.contains(&mac) {
            return mac;
        }
    }
}

/// A VXLAN network identifier not in `used`, in 4096..2^24 (random, so that two clouds sharing a
/// machine in tests do not pick the same bridge name).
pub fn allocate_vni(rng: &mut impl Rng, used: &HashSet<u32>) -> u32 {
    loop {
        let v = rng.gen_range(4096..(1 << 24));
        if !used.contains(&v) {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn parses_and_derives_addresses() {
        let c = Cidr::parse_network("10.80.0.0/24").expect("valid");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 80, 0, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 80, 0, 255));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.vm_range().next(), Some(Ipv4Addr::new(10, 80, 0, 2)));
        assert_eq!(c.vm_range().count(), 253);
        assert!(c.contains(Ipv4Addr::new(10, 80, 0, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 81, 0, 1)));
    }

    #[test]
    fn refuses_bad_cidrs_with_a_hint() {
        for bad in [
            "",
            "10.80.0.0",
            "10.80.0/24",
            "10.80.0.0/",
            "10.80.0.0/33",
            "x/24",
            "10.80.0.0/+4",
            "10.80.0.0/024",
        ] {
            let e = Cidr::parse_network(bad).expect_err(bad);
            assert!(matches!(e, IpamError::Syntax(_)), "{bad}: {e:?}");
        }
        let e = Cidr::parse_network("10.80.0.0/30").expect_err("too small");
        assert!(e.to_string().contains("too small"));
        let e = Cidr::parse_network("10.0.0.0/8").expect_err("too large");
        assert!(e.to_string().contains("too large"));
        let e = Cidr::parse_network("10.80.0.5/24").expect_err("host bits");
        assert!(e.to_string().contains("did you mean 10.80.0.0/24"), "{e}");
    }

    #[test]
    fn parses_rule_cidrs() {
        assert_eq!(
            Cidr::parse_any("0.0.0.0/0").expect("ok").to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            Cidr::parse_any("203.0.113.7").expect("ok").to_string(),
            "203.0.113.7/32"
        );
        assert!(Cidr::parse_any("203.0.113.7/24").is_err());
        assert!(Cidr::parse_any("nope").is_err());
    }

    #[test]
    fn parses_any_prefix_length_without_host_bits() {
        let n: Cidr = "10.7.0.0/24".parse().expect("valid");
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(n.contains(Ipv4Addr::new(10, 7, 0, 9)));
        assert!(!n.contains(Ipv4Addr::new(10, 7, 1, 9)));
        let e = "10.7.0.1/24".parse::<Cidr>().expect_err("host bits");
        assert!(e.to_string().contains("did you mean 10.7.0.0/24"), "{e}");
        assert!("10.7.0.0/33".parse::<Cidr>().is_err());
        assert!(
            "10.7.0.0".parse::<Cidr>().is_err(),
            "a network needs a prefix"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().map(|n| n.netmask()),
            Ok(Ipv4Addr::new(0, 0, 0, 0))
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().map(|n| n.broadcast()),
            Ok(Ipv4Addr::BROADCAST)
        );
        assert_eq!(
            "10.7.0.9/32".parse::<Cidr>(),
            Ok(Cidr::host(Ipv4Addr::new(10, 7, 0, 9)))
        );
    }

    #[test]
    fn covers_and_normalize() {
        let p = |s: &str| Cidr::parse_any(s).expect("valid");
        assert!(p("10.0.0.0/8").covers(&p("10.1.0.0/16")));
        assert!(p("10.1.0.0/16").covers(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").covers(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").covers(&p("10.2.0.1")));
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

    #[test]
    fn detects_overlaps() {
        let a = Cidr::parse_network("10.80.0.0/24").expect("valid");
        assert!(check_overlap(&a, [("x", "10.81.0.0/24")]).is_ok());
        let e = check_overlap(&a, [("x", "10.81.0.0/24"), ("big", "10.80.0.0/16")])
            .expect_err("overlap");
        assert!(e.to_string().contains("\"big\""), "{e}");
        let small = Cidr::parse_network("10.80.0.128/25").expect("valid");
        assert!(a.overlaps(&small) && small.overlaps(&a));
    }

    #[test]
    fn allocates_lowest_free_and_reports_exhaustion() {
        let c = Cidr::parse_network("10.80.0.0/29").expect("valid");
        let mut used = HashSet::new();
        for want in 2..=6 {
            let ip = allocate_ip("n", &c, &used).expect("free");
            assert_eq!(ip, Ipv4Addr::new(10, 80, 0, want));
            used.insert(ip);
        }
        let e = allocate_ip("n", &c, &used).expect_err("full");
        assert!(e.to_string().contains("no free address"));
        used.remove(&Ipv4Addr::new(10, 80, 0, 3));
        assert_eq!(allocate_ip("n", &c, &used), Ok(Ipv4Addr::new(10, 80, 0, 3)));
    }

    #[test]
    fn macs_and_vnis_are_unique() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut used = HashSet::new();
        for _ in 0..1000 {
            let m = allocate_mac(&mut rng, &used);
            assert!(m.starts_with("52:54:00:") && m.len() == 17);
            assert!(used.insert(m));
        }
        let mut vnis = HashSet::new();
        for _ in 0..1000 {
            let v = allocate_vni(&mut rng, &vnis);
            assert!((4096..1 << 24).contains(&v));
            assert!(vnis.insert(v));
        }
    }
}
