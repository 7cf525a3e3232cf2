//! VXLAN: one network's L2 segment stretched across hosts.
//!
//! On every host of a network that has other hosts (the controller sends their underlay
//! addresses as `peers`), the network's bridge gets one more port: a VXLAN device `vx<vni>`
//! (VNI = the network's, `local` = this host's underlay address, UDP `dstport`, `nolearning`,
//! MTU = the network's — 1450, so the 50 bytes of VXLAN/UDP/IP/Ethernet overhead fit a 1500
//! underlay). The device carries the bridge's owner alias (see [`super::links`]).
//!
//! Forwarding is head-end replication: the device's FDB holds exactly one all-zeros entry
//! (`00:00:00:00:00:00 dst <peer>`) per peer, so broadcast, unknown unicast and multicast go to
//! every peer. The device itself does not learn (`nolearning`: the FDB is the controller's
//! static view; a VM that moved never leaves a stale tunnel endpoint behind), while the bridge
//! still learns which VM MAC lives behind its VXLAN port.
//!
//! Render, then apply: [`VxlanPlan::from_desired`] validates, [`plan_fdb`] computes the FDB
//! change (pure, unit-tested); [`ensure_vxlan`] and [`delete_vxlan`] push it over rtnetlink
//! (links with `IFLA_INFO_KIND vxlan`, neighbours of family `AF_BRIDGE` with `NTF_SELF`). A device
//! whose VNI, `local`, port, learning or remote differs from the plan is recreated; its MTU,
//! master, state and alias are set in place. No firewall rule mentions the device: bridged
//! traffic through it is seen (br_netfilter) with the bridge as input and output interface and
//! accepted as same-network traffic, and the encapsulated UDP enters and leaves through the
//! underlay interface, which is not a bridge of the cloud.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use tuchka_api::agent::VxlanDesired;

use super::links::{self, LinkError};

/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The all-zeros MAC of the flood (head-end replication) FDB entries.
const ZERO_MAC: [u8; 6] = [0; 6];

/// A VXLAN failure.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    /// The netlink socket could not be opened.
    #[error(transparent)]
    Link(Box<LinkError>),
    /// The kernel refused a request.
    #[error("netlink request failed")]
    Netlink(#[source] Box<rtnetlink::Error>),
    /// A device of that name exists but is not a VXLAN device.
    #[error("device {0} exists and is not a VXLAN device; refusing to reuse it")]
    NotAVxlan(String),
    /// A VXLAN device of that name exists but belongs to someone else.
    #[error(
        "VXLAN device {name} exists and belongs to {owner:?}, not to {want:?}; refusing to reuse it"
    )]
    NotOurs {
        /// Device name.
        name: String,
        /// Its alias (empty when it has none: not made by tuchka).
        owner: String,
        /// The owner we expected.
        want: String,
    },
    /// The bridge the device must join does not exist.
    #[error("bridge {0} does not exist")]
    NoBridge(String),
    /// The device disappeared while it was being set up.
    #[error("device {0} vanished right after it was created")]
    Vanished(String),
    /// `local` is not an address of this host: the kernel could not send from it.
    #[error(
        "VXLAN source address {0} is not assigned to any interface of this host \
         (the host's configured underlay address must be one of its own)"
    )]
    LocalNotHere(IpAddr),
}

impl From<LinkError> for VxlanError {
    fn from(e: LinkError) -> Self {
        VxlanError::Link(Box::new(e))
    }
}

impl From<rtnetlink::Error> for VxlanError {
    fn from(e: rtnetlink::Error) -> Self {
        VxlanError::Netlink(Box::new(e))
    }
}

/// Name of the VXLAN device of VNI `vni`: `vx<vni>` (at most 10 chars for a 24-bit VNI).
pub fn device_name(vni: u32) -> String {
    format!("vx{vni}")
}

/// Whether a stored or desired network has a VXLAN device on this host (a VXLAN with peers).
pub fn has_device(vxlan: Option<&VxlanDesired>) -> bool {
    vxlan.is_some_and(|v| !v.peers.is_empty())
}

/// A network's validated VXLAN on this host (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPlan {
    /// Device name (`vx<vni>`).
    pub device: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Source address of the encapsulated packets (this host's underlay address).
    pub local: IpAddr,
    /// UDP destination port.
    pub port: u16,
    /// The other hosts' underlay addresses, sorted, without duplicates; never empty.
    pub peers: Vec<IpAddr>,
}

impl VxlanPlan {
    /// Validate the VXLAN part of a network: `None` when there is none or it has no peers
    /// (then no device must exist). Addresses must be unicast, of one family, and no peer may
    /// be `local` itself.
    pub fn from_desired(vni: u32, v: Option<&VxlanDesired>) -> Result<Option<Self>, String> {
        let Some(v) = v.filter(|v| has_device(Some(v))) else {
            return Ok(None);
        };
        if vni > MAX_VNI {
            return Err(format!("VNI {vni} does not fit in 24 bits (max {MAX_VNI})"));
        }
        if v.port == 0 {
            return Err("UDP port 0 is not a valid VXLAN port (use 4789)".to_string());
        }
        let local = unicast(&v.local).map_err(|m| format!("local address: {m}"))?;
        let mut peers = BTreeSet::new();
        for p in &v.peers {
            let ip = unicast(p).map_err(|m| format!("peer: {m}"))?;
            if ip.is_ipv4() != local.is_ipv4() {
                return Err(format!(
                    "peer {ip} and local address {local} are not of the same IP family"
                ));
            }
            if ip == local {
                return Err(format!("peer {ip} is this host's own address"));
            }
            peers.insert(ip);
        }
        Ok(Some(VxlanPlan {
            device: device_name(vni),
            vni,
            local,
            port: v.port,
            peers: peers.into_iter().collect(),
        }))
    }
}

/// Parse a unicast address (not unspecified, not multicast, not broadcast).
fn unicast(text: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(format!("{ip} is not a unicast address"));
    }
    Ok(ip)
}

/// One remote of a VXLAN device's all-zeros (flood) FDB entry, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbRemote {
    /// The remote tunnel endpoint.
    pub dst: IpAddr,
    /// UDP port, when it differs from the device's.
    pub port: Option<u16>,
    /// VNI, when it differs from the device's.
    pub vni: Option<u32>,
    /// Outgoing interface index, when one is pinned.
    pub ifindex: Option<u32>,
}

impl FdbRemote {
    /// A remote with the device's own port and VNI and no pinned interface: what we add.
    pub fn plain(dst: IpAddr) -> Self {
        FdbRemote {
            dst,
            port: None,
            vni: None,
            ifindex: None,
        }
    }

    fn is_plain(&self) -> bool {
        self.port.is_none() && self.vni.is_none() && self.ifindex.is_none()
    }
}

/// The change that makes a device's flood entries exactly one plain remote per peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdbDiff {
    /// Peers to append a remote for (sorted).
    pub add: Vec<IpAddr>,
    /// Remotes to delete: not a peer, not plain, or a duplicate (sorted).
    pub remove: Vec<FdbRemote>,
}

impl FdbDiff {
    /// Whether nothing has to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// The change as the equivalent `bridge fdb` commands on `device` (for logs and humans).
    pub fn commands(&self, device: &str) -> Vec<String> {
        let zero = "00:00:00:00:00:00";
        let mut out: Vec<String> = self
            .remove
            .iter()
            .map(|r| {
                let mut c = format!("bridge fdb del {zero} dev {device} dst {}", r.dst);
                if let Some(p) = r.port {
                    c.push_str(&format!(" port {p}"));
                }
                if let Some(v) = r.vni {
                    c.push_str(&format!(" vni {v}"));
                }
                if let Some(i) = r.ifindex {
                    c.push_str(&format!(" via ifindex {i}"));
                }
                c
            })
            .collect();
        out.extend(
            self.add
                .iter()
                .map(|p| format!("bridge fdb append {zero} dev {device} dst {p}")),
        );
        out
    }
}

/// Plan the FDB change from the device's `current` flood remotes to one plain remote per
/// `peers` entry (pure; order-insensitive, duplicates in `peers` count once).
pub fn plan_fdb(current: &[FdbRemote], peers: &[IpAddr]) -> FdbDiff {
    let want: BTreeSet<IpAddr> = peers.iter().copied().collect();
    let mut kept = BTreeSet::new();
    let mut remove = Vec::new();
    let mut sorted: Vec<&FdbRemote> = current.iter().collect();
    sorted.sort();
    for r in sorted {
        if r.is_plain() && want.contains(&r.dst) && kept.insert(r.dst) {
            continue;
        }
        remove.push(r.clone());
    }
    remove.dedup();
    FdbDiff {
        add: want.difference(&kept).copied().collect(),
        remove,
    }
}

/// What the kernel has for a device called `vx<vni>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanState {
    /// Interface index.
    pub index: u32,
    /// Whether it is a VXLAN device at all.
    pub is_vxlan: bool,
    /// VNI.
    pub vni: Option<u32>,
    /// Source address.
    pub local: Option<IpAddr>,
    /// UDP destination port.
    pub port: Option<u16>,
    /// Whether the device learns remote MACs.
    pub learning: Option<bool>,
    /// Default remote or multicast group (we never set one).
    pub remote: Option<IpAddr>,
    /// Lower device (`dev`; we never set one).
    pub lower: Option<u32>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Index of the bridge it is enslaved to.
    pub master: Option<u32>,
    /// Interface alias (ownership mark), empty when unset.
    pub alias: String,
}

/// Read a link message into a [`VxlanState`].
fn vxlan_state(msg: &LinkMessage) -> VxlanState {
    let mut st = VxlanState {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..VxlanState::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Mtu(m) => st.mtu = Some(*m),
            LinkAttribute::IfAlias(a) => st.alias = a.clone(),
            LinkAttribute::Controller(m) => st.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => st.is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(opts)) => {
                            for o in opts {
                                match o {
                                    InfoVxlan::Id(v) => st.vni = Some(*v),
                                    InfoVxlan::Local(a) => st.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => st.local = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Group(a) => st.remote = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Group6(a) => st.remote = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Port(p) => st.port = Some(*p),
                                    InfoVxlan::Learning(l) => st.learning = Some(*l),
                                    InfoVxlan::Link(l) => st.lower = Some(*l),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    st
}

/// Whether device `st` must be deleted and created again to match `plan`: the VNI, source
/// address, port, learning, remote and lower device cannot all be changed in place (pure).
pub fn needs_recreate(st: &VxlanState, plan: &VxlanPlan) -> bool {
    st.vni != Some(plan.vni)
        || st.local != Some(plan.local)
        || st.port != Some(plan.port)
        || st.learning != Some(false)
        || st.remote.is_some_and(|r| !r.is_unspecified())
        || st.lower.is_some_and(|l| l != 0)
}

/// What [`ensure_vxlan`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanOutcome {
    /// No device existed before the call: it made one (for rollback).
    pub created: bool,
    /// An existing device did not match the plan and was replaced.
    pub recreated: bool,
    /// The FDB change it applied.
    pub fdb: FdbDiff,
}

/// Make `plan.device` exist as planned, enslaved to `bridge`, with `mtu`, up, carrying the
/// alias `owner`, with exactly one flood FDB entry per peer. An existing device is adopted only
/// if it carries `owner` — or no alias at all and `adopt_unmarked` is set (our state says we
/// made it). Precondition: `bridge` exists. A device made by this call is deleted again when a
/// later step of the call fails.
pub fn ensure_vxlan(
    plan: &VxlanPlan,
    bridge: &str,
    mtu: u32,
    owner: &str,
    adopt_unmarked: bool,
) -> Result<VxlanOutcome, VxlanError> {
    links::with_handle(|h| async move {
        if !is_local_address(&h, plan.local).await? {
            return Err(VxlanError::LocalNotHere(plan.local));
        }
        let bridge_index = links::get_link(&h, bridge)
            .await?
            .ok_or_else(|| VxlanError::NoBridge(bridge.to_string()))?
            .header
            .index;
        let mut outcome = VxlanOutcome::default();
        let st = match links::get_link(&h, &plan.device).await? {
            None => {
                outcome.created = true;
                create(&h, plan, bridge_index, mtu).await?
            }
            Some(msg) => {
                let st = vxlan_state(&msg);
                if !st.is_vxlan {
                    return Err(VxlanError::NotAVxlan(plan.device.clone()));
                }
                if st.alias != owner && !(st.alias.is_empty() && adopt_unmarked) {
                    return Err(VxlanError::NotOurs {
                        name: plan.device.clone(),
                        owner: st.alias,
                        want: owner.to_string(),
                    });
                }
                if needs_recreate(&st, plan) {
                    tracing::info!(device = %plan.device, "VXLAN device differs from the plan; recreating it");
                    h.link().del(st.index).execute().await?;
                    outcome.recreated = true;
                    create(&h, plan, bridge_index, mtu).await?
                } else {
                    st
                }
            }
        };
        let made_now = outcome.created || outcome.recreated;
        match finish(&h, &st, plan, bridge_index, mtu, owner).await {
            Ok(fdb) => {
                outcome.fdb = fdb;
                Ok(outcome)
            }
            Err(e) => {
                if made_now {
                    if let Err(del) = h.link().del(st.index).execute().await {
                        tracing::warn!(device = %plan.device, error = %del, "cannot delete the VXLAN device this call made");
                    }
                }
                Err(e)
            }
        }
    })
}

/// Create the device (enslaved, up) and read it back.
async fn create(
    h: &Handle,
    plan: &VxlanPlan,
    bridge_index: u32,
    mtu: u32,
) -> Result<VxlanState, VxlanError> {
    let builder = LinkVxlan::new(&plan.device, plan.vni)
        .port(plan.port)
        .learning(false);
    let builder = match plan.local {
        IpAddr::V4(a) => builder.local(a),
        IpAddr::V6(a) => builder.local6(a),
    };
    let msg = builder.mtu(mtu).controller(bridge_index).up().build();
    h.link().add(msg).execute().await?;
    let msg = links::get_link(h, &plan.device)
        .await?
        .ok_or_else(|| VxlanError::Vanished(plan.device.clone()))?;
    Ok(vxlan_state(&msg))
}

/// Alias, MTU, master and up state in place, then the FDB.
async fn finish(
    h: &Handle,
    st: &VxlanState,
    plan: &VxlanPlan,
    bridge_index: u32,
    mtu: u32,
    owner: &str,
) -> Result<FdbDiff, VxlanError> {
    if st.alias != owner {
        // The kernel ignores IFLA_IFALIAS when creating a link, so the mark is a second step.
        h.link()
            .set(LinkUnspec::new_with_index(st.index).alias(owner).build())
            .execute()
            .await?;
    }
    if st.mtu != Some(mtu) || !st.up || st.master != Some(bridge_index) {
        h.link()
            .set(
                LinkUnspec::new_with_index(st.index)
                    .mtu(mtu)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
    }
    let current = flood_remotes(h, st.index).await?;
    let diff = plan_fdb(&current, &plan.peers);
    if !diff.is_empty() {
        tracing::info!(device = %plan.device, change = ?diff.commands(&plan.device), "VXLAN FDB");
    }
    for r in &diff.remove {
        match h.neighbours().del(fdb_message(st.index, r)).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for p in &diff.add {
        append_remote(h, st.index, *p).await?;
    }
    Ok(diff)
}

/// Whether `ip` is assigned to some interface of this network namespace.
async fn is_local_address(h: &Handle, ip: IpAddr) -> Result<bool, VxlanError> {
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await? {
        let found = msg.attributes.iter().any(
            |a| matches!(a, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == ip),
        );
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `errno` from the kernel.
fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// The flood remotes (all-zeros MAC, `NTF_SELF`) of device `index`.
async fn flood_remotes(h: &Handle, index: u32) -> Result<Vec<FdbRemote>, VxlanError> {
    // The legacy AF_BRIDGE dump does not filter by port: filter here.
    let msgs: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.flags.contains(NeighbourFlags::Own))
        .filter_map(flood_remote)
        .collect())
}

/// The remote of one FDB message if it is a flood entry with a destination.
fn flood_remote(msg: &NeighbourMessage) -> Option<FdbRemote> {
    let mut mac = None;
    let mut remote = FdbRemote::plain(IpAddr::from([0u8; 4]));
    let mut dst = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.as_slice()),
            NeighbourAttribute::Destination(d) => dst = neighbour_ip(d),
            NeighbourAttribute::Port(p) => remote.port = Some(*p),
            NeighbourAttribute::Vni(v) => remote.vni = Some(*v),
            NeighbourAttribute::IfIndex(i) => remote.ifindex = Some(*i),
            _ => {}
        }
    }
    if mac != Some(&ZERO_MAC[..]) {
        return None;
    }
    remote.dst = dst?;
    Some(remote)
}

/// An `NDA_DST` as an IP address (AF_BRIDGE messages carry it as raw bytes).
fn neighbour_ip(d: &NeighbourAddress) -> Option<IpAddr> {
    match d {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// The AF_BRIDGE message naming flood remote `r` of device `index`.
fn fdb_message(index: u32, r: &FdbRemote) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(ZERO_MAC.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            r.dst,
        )));
    if let Some(p) = r.port {
        msg.attributes.push(NeighbourAttribute::Port(p));
    }
    if let Some(v) = r.vni {
        msg.attributes.push(NeighbourAttribute::Vni(v));
    }
    if let Some(i) = r.ifindex {
        msg.attributes.push(NeighbourAttribute::IfIndex(i));
    }
    msg
}

/// `bridge fdb append 00:00:00:00:00:00 dev <index> dst <dst>`: rtnetlink's own add request
/// sends `NLM_F_EXCL` or `NLM_F_REPLACE`, which allow only one remote per MAC; head-end
/// replication needs `NLM_F_APPEND`.
async fn append_remote(h: &Handle, index: u32, dst: IpAddr) -> Result<(), VxlanError> {
    let msg = fdb_message(index, &FdbRemote::plain(dst));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
    let mut handle = h.clone();
    let mut response = handle.request(req)?;
    while let Some(reply) = response.next().await {
        if let NetlinkPayload::Error(err) = reply.payload {
            return Err(rtnetlink::Error::NetlinkError(err).into());
        }
    }
    Ok(())
}

/// Delete VXLAN device `name` if it exists, is a VXLAN device, and carries `owner` — or no
/// alias and `adopt_unmarked` is set (our state says we made it). Returns whether it was
/// deleted; a device that is not ours is left alone with a warning.
pub fn delete_vxlan(name: &str, owner: &str, adopt_unmarked: bool) -> Result<bool, VxlanError> {
    links::with_handle(|h| async move {
        let Some(msg) = links::get_link(&h, name).await? else {
            return Ok(false);
        };
        let st = vxlan_state(&msg);
        let ours = st.alias == owner || (st.alias.is_empty() && adopt_unmarked);
        if !st.is_vxlan || !ours {
            tracing::warn!(device = %name, alias = %st.alias, "not deleting a device that is not our VXLAN device");
            return Ok(false);
        }
        match h.link().del(st.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if links::is_no_device(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn desired(local: &str, peers: &[&str]) -> VxlanDesired {
        VxlanDesired {
            local: local.into(),
            port: 4789,
            peers: peers.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn no_vxlan_or_no_peers_means_no_device() {
        assert_eq!(VxlanPlan::from_desired(100, None), Ok(None));
        let lonely = desired("10.0.0.1", &[]);
        assert_eq!(VxlanPlan::from_desired(100, Some(&lonely)), Ok(None));
        assert!(!has_device(Some(&lonely)));
        assert!(has_device(Some(&desired("10.0.0.1", &["10.0.0.2"]))));
    }

    #[test]
    fn plan_sorts_and_dedups_peers() {
        let d = desired("10.0.0.1", &["10.0.0.3", " 10.0.0.2", "10.0.0.3"]);
        let p = VxlanPlan::from_desired(4242, Some(&d))
            .expect("valid")
            .expect("has peers");
        assert_eq!(p.device, "vx4242");
        assert_eq!(p.local, ip("10.0.0.1"));
        assert_eq!(p.peers, vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        assert!(device_name(MAX_VNI).len() <= 15);
    }

    #[test]
    fn plan_refuses_bad_vxlan() {
        let bad = |vni: u32, d: VxlanDesired| VxlanPlan::from_desired(vni, Some(&d)).unwrap_err();
        assert!(bad(1 << 24, desired("10.0.0.1", &["10.0.0.2"])).contains("24 bits"));
        assert!(bad(1, desired("", &["10.0.0.2"])).contains("local address"));
        assert!(bad(1, desired("0.0.0.0", &["10.0.0.2"])).contains("unicast"));
        assert!(bad(1, desired("10.0.0.1", &["239.1.1.1"])).contains("unicast"));
        assert!(bad(1, desired("10.0.0.1", &["host-b"])).contains("not an IP address"));
        assert!(bad(1, desired("10.0.0.1", &["fd00::2"])).contains("same IP family"));
        assert!(bad(1, desired("10.0.0.1", &["10.0.0.1"])).contains("own address"));
        let mut zero_port = desired("10.0.0.1", &["10.0.0.2"]);
        zero_port.port = 0;
        assert!(bad(1, zero_port).contains("port"));
        assert!(
            VxlanPlan::from_desired(1, Some(&desired("fd00::1", &["fd00::2"])))
                .expect("IPv6 underlay")
                .is_some()
        );
    }

    #[test]
    fn fdb_plan_adds_missing_and_removes_stale() {
        let current = [
            FdbRemote::plain(ip("10.0.0.2")),
            FdbRemote::plain(ip("10.0.0.9")),
        ];
        let diff = plan_fdb(&current, &[ip("10.0.0.3"), ip("10.0.0.2")]);
        assert_eq!(diff.add, vec![ip("10.0.0.3")]);
        assert_eq!(diff.remove, vec![FdbRemote::plain(ip("10.0.0.9"))]);
        assert_eq!(
            diff.commands("vx7"),
            vec![
                "bridge fdb del 00:00:00:00:00:00 dev vx7 dst 10.0.0.9",
                "bridge fdb append 00:00:00:00:00:00 dev vx7 dst 10.0.0.3",
            ]
        );
    }

    #[test]
    fn fdb_plan_is_empty_when_converged_in_any_order() {
        let current = [
            FdbRemote::plain(ip("10.0.0.3")),
            FdbRemote::plain(ip("10.0.0.2")),
        ];
        let diff = plan_fdb(&current, &[ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.2")]);
        assert!(diff.is_empty(), "{diff:?}");
        assert!(diff.commands("vx7").is_empty());
    }

    #[test]
    fn fdb_plan_replaces_remotes_with_other_port_vni_or_interface() {
        let odd = FdbRemote {
            port: Some(8472),
            ..FdbRemote::plain(ip("10.0.0.2"))
        };
        let pinned = FdbRemote {
            ifindex: Some(3),
            vni: Some(9),
            ..FdbRemote::plain(ip("10.0.0.3"))
        };
        let diff = plan_fdb(&[odd.clone(), pinned.clone()], &[ip("10.0.0.2")]);
        assert_eq!(diff.add, vec![ip("10.0.0.2")]);
        assert_eq!(diff.remove, vec![odd, pinned]);
        assert_eq!(
            diff.commands("vx7")[..2],
            [
                "bridge fdb del 00:00:00:00:00:00 dev vx7 dst 10.0.0.2 port 8472",
                "bridge fdb del 00:00:00:00:00:00 dev vx7 dst 10.0.0.3 vni 9 via ifindex 3",
            ]
        );
    }

    #[test]
    fn fdb_plan_without_peers_removes_everything() {
        let current = [FdbRemote::plain(ip("10.0.0.2"))];
        let diff = plan_fdb(&current, &[]);
        assert!(diff.add.is_empty());
        assert_eq!(diff.remove, current.to_vec());
    }

    fn matching_state(plan: &VxlanPlan) -> VxlanState {
        VxlanState {
            index: 7,
            is_vxlan: true,
            vni: Some(plan.vni),
            local: Some(plan.local),
            port: Some(plan.port),
            learning: Some(false),
            remote: None,
            lower: None,
            mtu: Some(1450),
            up: true,
            master: Some(3),
            alias: "tuchka:c:n".into(),
        }
    }

    #[test]
    fn only_tunnel_parameters_force_a_recreate() {
        let plan = VxlanPlan::from_desired(100, Some(&desired("10.0.0.1", &["10.0.0.2"])))
            .expect("valid")
            .expect("device");
        let ok = matching_state(&plan);
        assert!(!needs_recreate(&ok, &plan));
        // Settable in place: MTU, master, state, alias.
        let in_place = VxlanState {
            mtu: Some(1500),
            up: false,
            master: None,
            alias: String::new(),
            ..ok.clone()
        };
        assert!(!needs_recreate(&in_place, &plan));
        let changed: [fn(&mut VxlanState); 6] = [
            |s| s.local = Some(ip("10.0.0.5")),
            |s| s.vni = Some(101),
            |s| s.port = Some(8472),
            |s| s.learning = Some(true),
            |s| s.remote = Some(ip("239.1.1.1")),
            |s| s.lower = Some(2),
        ];
        for f in changed {
            let mut s = ok.clone();
            f(&mut s);
            assert!(needs_recreate(&s, &plan), "{s:?}");
        }
    }

    #[test]
    fn flood_remote_reads_bridge_family_destinations() {
        let mut msg = fdb_message(
            5,
            &FdbRemote {
                port: Some(8472),
                ..FdbRemote::plain(ip("10.0.0.2"))
            },
        );
        // As the kernel lists AF_BRIDGE entries: NDA_DST as raw bytes.
        for a in &mut msg.attributes {
            if let NeighbourAttribute::Destination(d) = a {
                *d = NeighbourAddress::Other(vec![10, 0, 0, 2]);
            }
        }
        assert_eq!(
            flood_remote(&msg),
            Some(FdbRemote {
                port: Some(8472),
                ..FdbRemote::plain(ip("10.0.0.2"))
            })
        );
        let mut learned = fdb_message(5, &FdbRemote::plain(ip("10.0.0.2")));
        learned.attributes[0] = NeighbourAttribute::LinkLayerAddress(vec![0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(
            flood_remote(&learned),
            None,
            "a MAC entry is not a flood entry"
        );
    }
}
