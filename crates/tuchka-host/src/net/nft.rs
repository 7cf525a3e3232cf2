//! The cloud's firewall, NAT and port forwards on one host: render (pure) then apply
//! (`nft -f -`, one transaction).
//!
//! Everything lives in one table per cloud, `table inet tk_<cloud8>` (filter and nat chains
//! alike; the inet family has nat hooks on this kernel). The script declares the table, deletes
//! it and re-adds it in full, so applying it is atomic (if nft refuses any line, the kernel
//! keeps the previous table untouched) and removes stale rules. No other table is touched.
//!
//! What the rendered table does, for the bridges `B` of this cloud on this host:
//!
//! - **forward** (routed and, through br_netfilter, bridged IPv4):
//!   1. traffic that neither enters nor leaves a bridge of `B` is not ours: accept (other tables
//!      decide);
//!   2. same bridge in and out (VMs of one network talking, bridged): accept;
//!   3. `ct state established,related` accept, `ct state invalid` drop;
//!   4. leaving network N's bridge (`out_<N>`): N's egress rules in order (deny → drop,
//!      allow → `route_named` for the single addresses it lists, else `route_ports` when it
//!      names ports, else `route_out`); then to another bridge of `B` → continue to step 5 (the
//!      destination decides); to anything else → `route_out` if N has NAT, else drop ("no route
//!      out"). Each `route_*` chain sends traffic for a bridge of `B` on to step 5 and holds the
//!      rest to the guest guard ([`super::guard`]): `route_out` drops what goes to a host of the
//!      cloud (sets `hosts4`/`hosts6`) or to a control port, `route_ports` what goes to a host,
//!      `route_named` nothing; then accept;
//!   5. entering network N's bridge (`in_<N>`): DNAT'ed traffic (a forward) accept; N's
//!      ingress rules (source in `sources`, destination in `targets` or N's CIDR, protocol and
//!      ports) accept; anything else drop.
//! - **input** from a bridge of `B` to the host: replies, DHCP, DNS and ping; then, for a
//!   network with an outbound allow naming a single address (`host_<N>`), N's egress rules in
//!   order (deny → drop, allow → accept for the addresses it names); everything else drop.
//! - **prerouting / output** (nat): each forward of a network whose gateway is here:
//!   `<proto> dport <host_port>` to a local address, arriving on anything but a bridge of `B`
//!   (prerouting) or sent by the host itself (output, loopback excluded) → `dnat` to the VM.
//! - **postrouting** (nat): for networks with NAT whose gateway is here, `masquerade` what the
//!   network sends out of anything but a bridge of `B`.
//! - **underlay** (input, once [`FirewallModel::underlay`] is set, with or without networks):
//!   the migration channel's TCP port and VXLAN's UDP port only from the cloud's other hosts
//!   (sets `peers4`/`peers6`; the channel also from loopback), dropped from anyone else; nothing
//!   else is filtered there (see [`super::underlay`]).
//!
//! Address lists of more than one entry become named sets (`addrs<N>`), shared by every rule
//! with the same list, so a thousand rules stay a thousand small rules and a few sets. An empty
//! chain `needs_ip_forward` marks a table whose networks need the host to route; other clouds
//! on the same host look for it before they turn `ip_forward` off.
//!
//! Apply through [`Firewall`]; [`ensure`] skips the transaction when the kernel still holds
//! exactly what the last apply left there, so an unchanged pass is cheap and any drift
//! (`nft flush ruleset`, a deleted table, chain or rule) is repaired on the next call. "Still
//! holds" is decided by the ruleset generation ([`super::nfgen`]: no nftables commit at all
//! since we last saw our table intact — a netlink round trip) or, when something was committed,
//! by comparing `nft list table` with the listing right after our apply.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use tuchka_core::ipam::Cidr;

use super::guard::{self, GuestGuard, Route};
use super::rules::{NetRules, PortSpec};
use super::underlay::Underlay;
use crate::cmd::{self, CommandError};
use tuchka_api::{Protocol, RuleAction};

/// Name of the marker chain of a table whose networks need `net.ipv4.ip_forward=1`.
pub const FORWARDING_MARKER: &str = "needs_ip_forward";

/// Everything the cloud's table on this host is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallModel {
    /// First 8 hex chars of the cloud id.
    pub cloud8: String,
    /// The cloud's networks present on this host (validated).
    pub networks: Vec<NetRules>,
    /// Who may reach the ports between hosts (normalized); `None`: not filtered.
    pub underlay: Option<Underlay>,
}

impl FirewallModel {
    /// An empty model for cloud `cloud8`.
    pub fn new(cloud8: &str) -> Self {
        FirewallModel {
            cloud8: cloud8.to_string(),
            networks: Vec::new(),
            underlay: None,
        }
    }

    /// Filter the ports between hosts as `underlay` says (validated and normalized here),
    /// unless a network already in the model forwards one of them.
    pub fn set_underlay(&mut self, underlay: &Underlay) -> Result<(), String> {
        let underlay = underlay.normalized()?;
        if let Some(clash) = self
            .networks
            .iter()
            .find_map(|n| forward_on_underlay(&underlay, n))
        {
            return Err(clash);
        }
        self.underlay = Some(underlay);
        Ok(())
    }

    /// Add a network unless it clashes with one already in the model: the same name, the same
    /// bridge, or a forward of the same protocol and host port — or a forward of a port between
    /// hosts (see [`Self::set_underlay`]). The message says what clashes.
    pub fn add(&mut self, net: NetRules) -> Result<(), String> {
        if let Some(clash) = self
            .underlay
            .as_ref()
            .and_then(|u| forward_on_underlay(u, &net))
        {
            return Err(clash);
        }
        for other in &self.networks {
            if other.name == net.name {
                return Err(format!("network {} is in the firewall twice", net.name));
            }
            if other.bridge == net.bridge {
                return Err(format!(
                    "bridge {} is already used by network {}",
                    net.bridge, other.name
                ));
            }
            let taken: HashSet<(Protocol, u16)> = other
                .active_forwards()
                .iter()
                .map(|f| (f.proto, f.host_port))
                .collect();
            if let Some(f) = net
                .active_forwards()
                .iter()
                .find(|f| taken.contains(&(f.proto, f.host_port)))
            {
                return Err(format!(
                    "forward {:?}: {} port {} is already forwarded by network {}",
                    f.id,
                    f.proto.as_str(),
                    f.host_port,
                    other.name
                ));
            }
        }
        self.networks.push(net);
        Ok(())
    }

    /// Whether any network needs the host to route (see [`NetRules::needs_forwarding`]).
    pub fn needs_forwarding(&self) -> bool {
        self.networks.iter().any(NetRules::needs_forwarding)
    }
}

/// The message for a forward of `net` that takes one of `underlay`'s ports, if any.
pub(crate) fn forward_on_underlay(underlay: &Underlay, net: &NetRules) -> Option<String> {
    net.active_forwards().iter().find_map(|f| {
        underlay.taken_by(f.proto, f.host_port).map(|why| {
            format!(
                "forward {:?} of network {}: {why}, it cannot be forwarded",
                f.id, net.name
            )
        })
    })
}

/// `tk_<cloud8>`.
pub fn table_name(cloud8: &str) -> String {
    format!("tk_{cloud8}")
}

/// Quote an interface name for nft. Names are validated (no `"`, `\` or `*`); those characters
/// are dropped defensively all the same.
fn q(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '*'))
        .collect();
    format!("\"{clean}\"")
}

/// A rule comment naming what the rule implements (`ingress web`): printable ASCII without
/// quotes, at most 100 bytes (nft allows 128).
fn comment(kind: &str, id: &str) -> String {
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:/@+=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100 - kind.len() - 1)
        .collect();
    format!("comment \"{kind} {id}\"")
}

/// An address for nft: a /32 as the bare address.
fn addr(n: &Cidr) -> String {
    if n.prefix() == 32 {
        n.network().to_string()
    } else {
        n.to_string()
    }
}

/// Address lists of more than one entry, deduplicated into named sets.
#[derive(Default)]
struct SetPool {
    sets: Vec<Vec<Cidr>>,
    index: HashMap<Vec<Cidr>, usize>,
}

impl SetPool {
    /// The nft expression for a non-empty normalized list: the address itself or `@addrs<N>`.
    fn expr(&mut self, nets: &[Cidr]) -> String {
        if let [one] = nets {
            return addr(one);
        }
        let next = self.sets.len();
        let i = *self.index.entry(nets.to_vec()).or_insert(next);
        if i == next {
            self.sets.push(nets.to_vec());
        }
        format!("@addrs{i}")
    }

    fn render(&self, out: &mut String) {
        for (i, nets) in self.sets.iter().enumerate() {
            let elements: Vec<String> = nets.iter().map(addr).collect();
            let _ = write!(
                out,
                "\tset addrs{i} {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
                elements.join(", ")
            );
        }
    }
}

/// The protocol/port part of a rule (`tcp dport 80`, `meta l4proto icmp`; `None` for any).
fn port_expr(p: &PortSpec) -> Option<String> {
    match (p.proto, p.ports) {
        (Protocol::Any, _) => None,
        (proto @ (Protocol::Tcp | Protocol::Udp), Some((from, to))) if from == to => {
            Some(format!("{} dport {from}", proto.as_str()))
        }
        (proto @ (Protocol::Tcp | Protocol::Udp), Some((from, to))) => {
            Some(format!("{} dport {from}-{to}", proto.as_str()))
        }
        (proto, _) => Some(format!("meta l4proto {}", proto.as_str())),
    }
}

/// Join the non-empty parts of a rule with spaces.
fn rule(parts: &[Option<&str>]) -> String {
    parts
        .iter()
        .flatten()
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `out_<N>`: N's egress rules, then the default. An allow goes on to `route_named` for the
/// single addresses it lists, and to `route_ports` (it names ports) or `route_out` for the
/// rest (see [`super::guard`]); `used` records which of those chains are needed.
fn render_egress(n: &NetRules, sets: &mut SetPool, used: &mut RoutesUsed, out: &mut String) {
    let _ = writeln!(out, "\tchain out_{} {{", n.name);
    for e in &n.egress {
        if e.destinations.is_empty() {
            let _ = writeln!(
                out,
                "\t\t# egress {:?}: no destinations, matches nothing",
                e.id
            );
            continue;
        }
        let ports = port_expr(&e.matches);
        let c = comment("egress", &e.id);
        let mut line = |dests: &[Cidr], verdict: &str, sets: &mut SetPool| {
            let daddr = format!("ip daddr {}", sets.expr(dests));
            let line = rule(&[Some(&daddr), ports.as_deref(), Some(verdict), Some(&c)]);
            let _ = writeln!(out, "\t\t{line}");
        };
        match e.action {
            RuleAction::Deny => line(&e.destinations, "drop", sets),
            RuleAction::Allow => {
                let (named, rest) = guard::routes(e);
                if !named.is_empty() {
                    used.named = true;
                    line(&named, "goto route_named", sets);
                }
                if named.len() < e.destinations.len() {
                    let verdict = match rest {
                        Route::Ports => {
                            used.ports = true;
                            "goto route_ports"
                        }
                        Route::Guarded | Route::Named => {
                            used.out = true;
                            "goto route_out"
                        }
                    };
                    line(&e.destinations, verdict, sets);
                }
            }
        }
    }
    if n.nat {
        used.out = true;
        out.push_str("\t\tgoto route_out\n");
    } else {
        out.push_str("\t\toifname @bridges return\n");
        out.push_str("\t\tdrop\n");
    }
    out.push_str("\t}\n");
}

/// `host_<N>` (input hook, from N's bridge to this host): N's egress rules in order, a deny
/// dropping, an allow accepting the single addresses it names; the rest falls back to the
/// input chain (which drops it).
fn render_to_host(n: &NetRules, sets: &mut SetPool, out: &mut String) {
    let _ = writeln!(out, "\tchain host_{} {{", n.name);
    for e in &n.egress {
        let (dests, verdict) = match e.action {
            RuleAction::Deny => (e.destinations.clone(), "drop"),
            RuleAction::Allow => (guard::routes(e).0, "accept"),
        };
        if dests.is_empty() {
            continue;
        }
        let daddr = format!("ip daddr {}", sets.expr(&dests));
        let ports = port_expr(&e.matches);
        let c = comment("egress", &e.id);
        let line = rule(&[Some(&daddr), ports.as_deref(), Some(verdict), Some(&c)]);
        let _ = writeln!(out, "\t\t{line}");
    }
    out.push_str("\t}\n");
}

/// Which of the chains after an allowed egress the networks use.
#[derive(Debug, Default)]
struct RoutesUsed {
    out: bool,
    ports: bool,
    named: bool,
}

/// `tcp dport 80` / `tcp dport { 7481, 16509, 49152-49215 }` for non-empty `ranges`.
fn dports(proto: &str, ranges: &[(u16, u16)]) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    match items.as_slice() {
        [one] => format!("{proto} dport {one}"),
        _ => format!("{proto} dport {{ {} }}", items.join(", ")),
    }
}

/// The chains traffic an egress allow goes on to (those `used`): each returns what is bound
/// for a bridge of the cloud (the destination network decides), drops what the guard
/// forbids on that route and accepts the rest.
fn render_routes(guard: &GuestGuard, used: &RoutesUsed, out: &mut String) {
    let (v4, v6) = guard_sets(guard);
    let hosts = |out: &mut String| {
        if v4 {
            out.push_str("\t\tip daddr @hosts4 drop comment \"guard: a host of the cloud\"\n");
        }
        if v6 {
            out.push_str("\t\tip6 daddr @hosts6 drop comment \"guard: a host of the cloud\"\n");
        }
    };
    if used.out {
        out.push_str("\tchain route_out {\n");
        out.push_str("\t\toifname @bridges return\n");
        hosts(out);
        for (proto, ranges) in [("tcp", &guard.tcp), ("udp", &guard.udp)] {
            if !ranges.is_empty() {
                let _ = writeln!(
                    out,
                    "\t\t{} drop comment \"guard: a control port\"",
                    dports(proto, ranges)
                );
            }
        }
        out.push_str("\t\taccept\n");
        out.push_str("\t}\n");
    }
    if used.ports {
        out.push_str("\tchain route_ports {\n");
        out.push_str("\t\toifname @bridges return\n");
        hosts(out);
        out.push_str("\t\taccept\n");
        out.push_str("\t}\n");
    }
    if used.named {
        out.push_str("\tchain route_named {\n");
        out.push_str("\t\toifname @bridges return\n");
        out.push_str("\t\taccept\n");
        out.push_str("\t}\n");
    }
}

/// Whether the guard has IPv4 / IPv6 host addresses (sets `hosts4` / `hosts6`).
fn guard_sets(guard: &GuestGuard) -> (bool, bool) {
    (
        guard.hosts.iter().any(IpAddr::is_ipv4),
        guard.hosts.iter().any(IpAddr::is_ipv6),
    )
}

/// The sets `hosts4` / `hosts6` of the guard (those with elements).
fn render_guard_sets(guard: &GuestGuard, out: &mut String) {
    for (set, ty, v6) in [
        ("hosts4", "ipv4_addr", false),
        ("hosts6", "ipv6_addr", true),
    ] {
        let elements: Vec<String> = guard
            .hosts
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(|ip| ip.to_string())
            .collect();
        if !elements.is_empty() {
            let _ = write!(
                out,
                "\tset {set} {{\n\t\ttype {ty}\n\t\telements = {{ {} }}\n\t}}\n",
                elements.join(", ")
            );
        }
    }
}

/// `in_<N>`: forwards, N's ingress rules, then drop.
fn render_ingress(n: &NetRules, sets: &mut SetPool, out: &mut String) {
    let _ = writeln!(out, "\tchain in_{} {{", n.name);
    out.push_str("\t\tct status dnat accept\n");
    let whole = [n.net];
    for r in &n.ingress {
        if r.sources.is_empty() {
            let _ = writeln!(out, "\t\t# ingress {:?}: no sources, matches nothing", r.id);
            continue;
        }
        let saddr = format!("ip saddr {}", sets.expr(&r.sources));
        let targets: &[Cidr] = if r.targets.is_empty() {
            &whole
        } else {
            &r.targets
        };
        let daddr = format!("ip daddr {}", sets.expr(targets));
        let ports = port_expr(&r.matches);
        let c = comment("ingress", &r.id);
        let line = rule(&[
            Some(&saddr),
            Some(&daddr),
            ports.as_deref(),
            Some("accept"),
            Some(&c),
        ]);
        let _ = writeln!(out, "\t\t{line}");
    }
    out.push_str("\t\tdrop\n");
    out.push_str("\t}\n");
}

/// The sets `peers4`/`peers6` (those with elements) and the chain `underlay`.
fn render_underlay(u: &Underlay, sets: &mut String, chains: &mut String) {
    let (v4, v6): (Vec<&IpAddr>, Vec<&IpAddr>) = u.peers.iter().partition(|ip| ip.is_ipv4());
    let families = [
        ("peers4", "ip", "ipv4_addr", v4),
        ("peers6", "ip6", "ipv6_addr", v6),
    ];
    let mut from_peers = Vec::new();
    for (set, match_kw, ty, peers) in &families {
        if peers.is_empty() {
            continue;
        }
        let elements: Vec<String> = peers.iter().map(|ip| ip.to_string()).collect();
        let _ = write!(
            sets,
            "\tset {set} {{\n\t\ttype {ty}\n\t\telements = {{ {} }}\n\t}}\n",
            elements.join(", ")
        );
        from_peers.push(format!("{match_kw} saddr @{set}"));
    }
    chains.push_str("\tchain underlay {\n");
    chains.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
    if let Some(port) = u.channel_port {
        let _ = writeln!(chains, "\t\tiifname \"lo\" tcp dport {port} accept");
        for peers in &from_peers {
            let _ = writeln!(chains, "\t\t{peers} tcp dport {port} accept");
        }
        let _ = writeln!(
            chains,
            "\t\ttcp dport {port} drop comment \"channel: not from a host of this cloud\""
        );
    }
    let port = u.vxlan_port;
    for peers in &from_peers {
        let _ = writeln!(chains, "\t\t{peers} udp dport {port} accept");
    }
    let _ = writeln!(
        chains,
        "\t\tudp dport {port} drop comment \"vxlan: not from a host of this cloud\""
    );
    chains.push_str("\t}\n");
}

/// Render the complete nft script for `model` (pure). With no networks and no underlay the
/// script only deletes the table.
pub fn render_firewall(model: &FirewallModel) -> String {
    let table = table_name(&model.cloud8);
    let mut nets: Vec<&NetRules> = model.networks.iter().collect();
    nets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut s = format!("table inet {table}\ndelete table inet {table}\n");
    if nets.is_empty() && model.underlay.is_none() {
        return s;
    }
    let mut sets = SetPool::default();
    let mut chains = String::new();
    let guard = GuestGuard::of(model.underlay.as_ref());
    let guarded = !nets.is_empty() && render_networks(&nets, &guard, &mut sets, &mut chains);
    let mut peer_sets = String::new();
    if let Some(u) = &model.underlay {
        render_underlay(u, &mut peer_sets, &mut chains);
    }

    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(
        s,
        "\tcomment \"tuchka cloud {}: generated, replaced as a whole\"",
        model.cloud8
    );
    if !nets.is_empty() {
        let bridges: Vec<String> = nets.iter().map(|n| q(&n.bridge)).collect();
        let _ = write!(
            s,
            "\tset bridges {{\n\t\ttype ifname\n\t\telements = {{ {} }}\n\t}}\n",
            bridges.join(", ")
        );
    }
    sets.render(&mut s);
    if guarded {
        render_guard_sets(&guard, &mut s);
    }
    s.push_str(&peer_sets);
    if model.needs_forwarding() {
        let _ = write!(s, "\tchain {FORWARDING_MARKER} {{\n\t}}\n");
    }
    s.push_str(&chains);
    s.push_str("}\n");
    s
}

/// The chains of the networks `nets` (non-empty, sorted by name): forward, `route_out`, each
/// network's `out_<N>`/`in_<N>`, input, and the nat chains; address lists go to `sets`.
/// Traffic the networks' egress lets out is held to `guard`; returns whether the chains use
/// its host sets.
fn render_networks(
    nets: &[&NetRules],
    guard: &GuestGuard,
    sets: &mut SetPool,
    chains: &mut String,
) -> bool {
    // forward
    chains.push_str("\tchain forward {\n");
    chains.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    chains.push_str("\t\tiifname != @bridges oifname != @bridges accept\n");
    for n in nets {
        let b = q(&n.bridge);
        let _ = writeln!(chains, "\t\tiifname {b} oifname {b} accept");
    }
    chains.push_str("\t\tct state established,related accept\n");
    chains.push_str("\t\tct state invalid drop\n");
    let vmap = |prefix: &str| {
        nets.iter()
            .map(|n| format!("{} : jump {prefix}_{}", q(&n.bridge), n.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(chains, "\t\tiifname vmap {{ {} }}", vmap("out"));
    let _ = writeln!(chains, "\t\toifname vmap {{ {} }}", vmap("in"));
    chains.push_str("\t\tdrop\n");
    chains.push_str("\t}\n");

    let mut used = RoutesUsed::default();
    let mut per_net = String::new();
    for n in nets {
        render_egress(n, sets, &mut used, &mut per_net);
        render_ingress(n, sets, &mut per_net);
    }
    render_routes(guard, &used, chains);
    chains.push_str(&per_net);
    let to_host: Vec<&&NetRules> = nets
        .iter()
        .filter(|n| guard::opens_the_host(&n.egress))
        .collect();
    for n in &to_host {
        render_to_host(n, sets, chains);
    }

    // input
    chains.push_str("\tchain input {\n");
    chains.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
    chains.push_str("\t\tiifname != @bridges accept\n");
    chains.push_str("\t\tct state established,related accept\n");
    chains.push_str("\t\tudp dport 67 accept\n");
    chains.push_str("\t\tudp dport 53 accept\n");
    chains.push_str("\t\ttcp dport 53 accept\n");
    chains.push_str("\t\ticmp type echo-request accept\n");
    if !to_host.is_empty() {
        let vmap: Vec<String> = to_host
            .iter()
            .map(|n| format!("{} : jump host_{}", q(&n.bridge), n.name))
            .collect();
        let _ = writeln!(chains, "\t\tiifname vmap {{ {} }}", vmap.join(", "));
    }
    chains.push_str("\t\tdrop\n");
    chains.push_str("\t}\n");

    // nat
    let forwards: Vec<_> = nets.iter().flat_map(|n| n.active_forwards()).collect();
    if !forwards.is_empty() {
        let dnat = |f: &super::rules::Forward| {
            format!(
                "fib daddr type local {} dport {} dnat ip to {}:{} {}",
                f.proto.as_str(),
                f.host_port,
                f.vm_ip,
                f.vm_port,
                comment("forward", &f.id)
            )
        };
        chains.push_str("\tchain prerouting {\n");
        chains.push_str("\t\ttype nat hook prerouting priority dstnat; policy accept;\n");
        for f in &forwards {
            let _ = writeln!(chains, "\t\tiifname != @bridges {}", dnat(f));
        }
        chains.push_str("\t}\n");
        chains.push_str("\tchain output {\n");
        // `dstnat` is not accepted as a keyword for the output hook by nft 1.0.6.
        chains.push_str("\t\ttype nat hook output priority -100; policy accept;\n");
        for f in &forwards {
            let _ = writeln!(chains, "\t\tip daddr != 127.0.0.0/8 {}", dnat(f));
        }
        chains.push_str("\t}\n");
    }
    let nat: Vec<_> = nets.iter().filter(|n| n.nat && n.gateway_here).collect();
    if !nat.is_empty() {
        chains.push_str("\tchain postrouting {\n");
        chains.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        for n in nat {
            let _ = writeln!(
                chains,
                "\t\toifname != @bridges ip saddr {} masquerade {}",
                n.net,
                comment("nat", &n.name)
            );
        }
        chains.push_str("\t}\n");
    }
    used.out || used.ports
}

/// Pure: the inet tables that have a chain named `chain`, from `nft -j list chains` output.
pub fn tables_with_chain(json: &str, chain: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out: Vec<String> = v
        .get("nftables")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let c = item.get("chain")?;
            (c.get("family")?.as_str()? == "inet" && c.get("name")?.as_str()? == chain)
                .then(|| c.get("table")?.as_str().map(str::to_string))?
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What the last successful apply left in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The script applied.
    pub script: String,
    /// `nft list table` right after it (`None`: the script only deleted the table).
    pub listing: Option<String>,
    /// A ruleset generation at which the table was seen to list exactly as `listing`.
    pub generation: Option<u32>,
}

/// Pure: whether the kernel still holds what `script` would make — the last apply was this
/// very script and the table lists exactly as it did right after it.
pub fn up_to_date(last: Option<&Applied>, script: &str, listing: Option<&str>) -> bool {
    last.is_some_and(|a| a.script == script && a.listing.as_deref() == listing)
}

/// Pure: whether nothing was committed since the kernel was seen to hold `script`'s table
/// (so there is no need to list it).
pub fn unchanged_since(last: Option<&Applied>, script: &str, generation: Option<u32>) -> bool {
    last.is_some_and(|a| a.script == script && generation.is_some() && a.generation == generation)
}

/// Why the firewall could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// Listing the table failed.
    #[error("cannot read the firewall table")]
    List(#[source] CommandError),
    /// nft refused or failed the transaction (the previous table is still in place).
    #[error("nft refused the ruleset; the previous one is still in place")]
    Apply(#[source] CommandError),
}

/// The kernel's firewall, as far as tuchka touches it. Real: [`NftFirewall`].
pub trait Firewall: Send + Sync + std::fmt::Debug {
    /// Apply a complete script in one transaction: all of it or nothing.
    fn apply(&self, script: &str) -> Result<(), CommandError>;
    /// `nft list table inet <table>`; `None` when the table does not exist.
    fn list_table(&self, table: &str) -> Result<Option<String>, CommandError>;
    /// The inet tables that have a chain named `chain`.
    fn tables_with_chain(&self, chain: &str) -> Result<Vec<String>, CommandError>;
    /// The ruleset generation (bumped by every nftables commit); `None` when unknown, which
    /// makes [`ensure`] list the table every time.
    fn generation(&self) -> Option<u32>;
}

/// [`Firewall`] through the `nft` tool and netlink, in the caller's network namespace.
#[derive(Debug, Clone, Default)]
pub struct NftFirewall;

impl NftFirewall {
    /// nft in the caller's network namespace.
    pub fn new() -> Self {
        NftFirewall
    }

    fn nft(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, CommandError> {
        cmd::run("nft", args, stdin)
    }
}

impl Firewall for NftFirewall {
    fn apply(&self, script: &str) -> Result<(), CommandError> {
        self.nft(&["-f", "-"], Some(script.as_bytes())).map(drop)
    }

    fn list_table(&self, table: &str) -> Result<Option<String>, CommandError> {
        match self.nft(&["list", "table", "inet", table], None) {
            Ok(out) => Ok(Some(out)),
            Err(CommandError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn tables_with_chain(&self, chain: &str) -> Result<Vec<String>, CommandError> {
        let json = self.nft(&["-j", "list", "chains"], None)?;
        Ok(tables_with_chain(&json, chain))
    }

    fn generation(&self) -> Option<u32> {
        match super::nfgen::generation() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::debug!(error = %e, "nftables generation unknown; listing the table instead");
                None
            }
        }
    }
}

/// List `table` between two generation reads: the listing and, if nothing was committed while
/// listing, the generation it belongs to.
fn list_at_generation(
    fw: &dyn Firewall,
    table: &str,
) -> Result<(Option<String>, Option<u32>), FirewallError> {
    let before = fw.generation();
    let listing = fw.list_table(table).map_err(FirewallError::List)?;
    let after = fw.generation();
    Ok((listing, before.filter(|_| before == after)))
}

/// Make the kernel hold `script`'s version of `table`: nothing to do when [`unchanged_since`]
/// or, after listing the table, [`up_to_date`] says it already does; else apply. `last` is
/// updated after a successful apply. Returns whether it applied.
pub fn ensure(
    fw: &dyn Firewall,
    table: &str,
    script: &str,
    last: &mut Option<Applied>,
) -> Result<bool, FirewallError> {
    if unchanged_since(last.as_ref(), script, fw.generation()) {
        return Ok(false);
    }
    let (listing, generation) = list_at_generation(fw, table)?;
    if up_to_date(last.as_ref(), script, listing.as_deref()) {
        if let Some(a) = last.as_mut() {
            // Someone committed something, but not to our table: remember where we are.
            a.generation = generation;
        }
        return Ok(false);
    }
    // Whatever happens next, the kernel no longer matches what we remember.
    *last = None;
    fw.apply(script).map_err(FirewallError::Apply)?;
    let (listing, generation) = list_at_generation(fw, table)?;
    *last = Some(Applied {
        script: script.to_string(),
        listing,
        generation,
    });
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn comments_are_safe() {
        assert_eq!(comment("ingress", "web"), "comment \"ingress web\"");
        assert_eq!(
            comment("ingress", "a\"b c;d\n"),
            "comment \"ingress a_b_c_d_\""
        );
        assert!(comment("egress", &"x".repeat(500)).len() < 128);
    }

    #[test]
    fn chain_marker_is_found_in_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "inet", "table": "tk_aaaa0000", "name": "needs_ip_forward", "handle": 3}},
            {"chain": {"family": "inet", "table": "tk_bbbb0000", "name": "forward", "handle": 1}},
            {"chain": {"family": "ip", "table": "tk_cccc0000", "name": "needs_ip_forward", "handle": 2}}]}"#;
        assert_eq!(
            tables_with_chain(json, FORWARDING_MARKER),
            vec!["tk_aaaa0000"]
        );
        assert!(tables_with_chain("not json", FORWARDING_MARKER).is_empty());
    }

    /// A kernel stand-in: holds one listing and a generation, counts applies and listings, can
    /// refuse applies.
    #[derive(Debug, Default)]
    struct FakeNft {
        table: Mutex<Option<String>>,
        generation: Mutex<u32>,
        applies: Mutex<u32>,
        lists: Mutex<u32>,
        refuse: bool,
        no_generation: bool,
    }

    impl FakeNft {
        /// Someone else commits: to our table (`Some(listing)`/`None` = deleted) or elsewhere.
        fn commit(&self, ours: Option<Option<&str>>) {
            *self.generation.lock().expect("lock") += 1;
            if let Some(t) = ours {
                *self.table.lock().expect("lock") = t.map(str::to_string);
            }
        }
        fn count(&self, m: &Mutex<u32>) -> u32 {
            *m.lock().expect("lock")
        }
    }

    impl Firewall for FakeNft {
        fn apply(&self, script: &str) -> Result<(), CommandError> {
            if self.refuse {
                return Err(CommandError::Failed {
                    command: "nft -f -".into(),
                    status: "exit status: 1".into(),
                    stderr: "Error: syntax error".into(),
                });
            }
            *self.applies.lock().expect("lock") += 1;
            self.commit(Some(Some(&format!("listing of {}", script.len()))));
            Ok(())
        }
        fn list_table(&self, _table: &str) -> Result<Option<String>, CommandError> {
            *self.lists.lock().expect("lock") += 1;
            Ok(self.table.lock().expect("lock").clone())
        }
        fn tables_with_chain(&self, _chain: &str) -> Result<Vec<String>, CommandError> {
            Ok(Vec::new())
        }
        fn generation(&self) -> Option<u32> {
            (!self.no_generation).then(|| *self.generation.lock().expect("lock"))
        }
    }

    #[test]
    fn ensure_applies_only_on_change_or_drift() {
        for no_generation in [false, true] {
            let fw = FakeNft {
                no_generation,
                ..FakeNft::default()
            };
            let mut last = None;
            assert!(ensure(&fw, "t", "script-1", &mut last).expect("apply"));
            assert!(!ensure(&fw, "t", "script-1", &mut last).expect("unchanged"));
            assert!(ensure(&fw, "t", "script-22", &mut last).expect("changed"));
            fw.commit(Some(None)); // nft flush ruleset
            assert!(ensure(&fw, "t", "script-22", &mut last).expect("drift"));
            fw.commit(Some(Some("edited by hand")));
            assert!(ensure(&fw, "t", "script-22", &mut last).expect("drift"));
            fw.commit(None); // another table changed
            assert!(!ensure(&fw, "t", "script-22", &mut last).expect("not ours"));
            assert!(!ensure(&fw, "t", "script-22", &mut last).expect("steady"));
            assert_eq!(fw.count(&fw.applies), 4);
        }
    }

    #[test]
    fn an_unchanged_generation_spares_the_listing() {
        let fw = FakeNft::default();
        let mut last = None;
        ensure(&fw, "t", "s", &mut last).expect("apply");
        let lists = fw.count(&fw.lists);
        for _ in 0..5 {
            assert!(!ensure(&fw, "t", "s", &mut last).expect("steady"));
        }
        assert_eq!(
            fw.count(&fw.lists),
            lists,
            "no listing while nothing is committed"
        );
        fw.commit(None);
        ensure(&fw, "t", "s", &mut last).expect("someone else committed");
        assert_eq!(
            fw.count(&fw.lists),
            lists + 1,
            "one listing to check our table"
        );
        ensure(&fw, "t", "s", &mut last).expect("steady again");
        assert_eq!(fw.count(&fw.lists), lists + 1);
    }

    #[test]
    fn a_refused_apply_is_not_remembered() {
        let refusing = FakeNft {
            refuse: true,
            ..FakeNft::default()
        };
        let mut last = None;
        let err = ensure(&refusing, "t", "bad", &mut last).expect_err("refused");
        assert!(matches!(err, FirewallError::Apply(_)));
        assert!(last.is_none());
    }
}
