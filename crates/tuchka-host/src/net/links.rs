//! Bridges and their IPv4 addresses over rtnetlink.
//!
//! The public API of this crate is synchronous, so every call builds a small current-thread
//! tokio runtime, opens a netlink socket in the calling thread's network namespace, does its
//! requests and drops both. That costs well under a millisecond and keeps no state to go stale.
//!
//! Ownership: bridge names (`tk<vni>`) are chosen per cloud, so two clouds sharing a network
//! namespace could pick the same one. Every bridge we create carries an interface alias naming
//! its owner (`tuchka:<cloud id>:<network>`); a bridge with another alias is never adopted and
//! never deleted.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BridgeStpState, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The runtime or the netlink socket could not be set up.
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request.
    #[error("netlink request failed")]
    Netlink(#[source] Box<rtnetlink::Error>),
    /// A device of that name exists but is not a bridge.
    #[error("device {0} exists and is not a bridge; refusing to reuse it")]
    NotABridge(String),
    /// The device disappeared while it was being set up.
    #[error("device {0} vanished right after it was created")]
    Vanished(String),
    /// A bridge of that name exists but belongs to someone else.
    #[error(
        "bridge {name} exists and belongs to {owner:?}, not to {want:?}; refusing to reuse it"
    )]
    NotOurs {
        /// Bridge name.
        name: String,
        /// Its alias (empty when it has none: not made by tuchka).
        owner: String,
        /// The owner we expected.
        want: String,
    },
}

impl From<rtnetlink::Error> for LinkError {
    fn from(e: rtnetlink::Error) -> Self {
        LinkError::Netlink(Box::new(e))
    }
}

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Whether it is a bridge.
    pub is_bridge: bool,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// STP enabled (bridges only; `None` if not reported).
    pub stp: Option<bool>,
    /// Forward delay in centiseconds (bridges only).
    pub forward_delay: Option<u32>,
    /// Interface alias (our ownership mark), empty when unset.
    pub alias: String,
    /// Hardware (MAC) address.
    pub mac: Option<[u8; 6]>,
}

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut st = LinkState {
        index: msg.header.index,
        is_bridge: false,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        stp: None,
        forward_delay: None,
        alias: String::new(),
        mac: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Mtu(m) => st.mtu = Some(*m),
            LinkAttribute::Address(a) => st.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::IfAlias(a) => st.alias = a.clone(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Bridge) => st.is_bridge = true,
                        LinkInfo::Data(InfoData::Bridge(opts)) => {
                            for o in opts {
                                match o {
                                    InfoBridge::StpState(s) => {
                                        st.stp = Some(*s != BridgeStpState::Disabled)
                                    }
                                    InfoBridge::ForwardDelay(d) => st.forward_delay = Some(*d),
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

/// Run `f` with a fresh netlink handle on a private current-thread runtime.
pub(crate) fn with_handle<T, E, F, Fut>(f: F) -> Result<T, E>
where
    E: From<LinkError>,
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(LinkError::Socket)?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

/// `ENODEV` from the kernel: no such device.
pub(crate) fn is_no_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

/// The link called `name`, `None` if absent.
pub(crate) async fn get_link(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, LinkError> {
    let mut stream = handle.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if is_no_device(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The state of device `name`, `None` if absent.
pub fn link(name: &str) -> Result<Option<LinkState>, LinkError> {
    let name = name.to_string();
    with_handle(|h| async move { Ok(get_link(&h, &name).await?.map(|m| link_state(&m))) })
}

/// The ownership mark of a network's bridge.
pub fn owner_alias(cloud_id: &str, network: &str) -> String {
    format!("tuchka:{cloud_id}:{network}")
}

/// Make bridge `name` exist with STP off, forward delay 0, the given MTU, up, and the alias
/// `owner`. An existing bridge is adopted only if it carries `owner` — or carries no alias at
/// all and `adopt_unmarked` is set (our state says we made it, but we crashed between creating
/// it and marking it). Returns whether it was created by this call (for rollback).
pub fn ensure_bridge(
    name: &str,
    mtu: u32,
    owner: &str,
    adopt_unmarked: bool,
) -> Result<bool, LinkError> {
    let name = name.to_string();
    let owner = owner.to_string();
    with_handle(|h| async move {
        let (st, created) = match get_link(&h, &name).await? {
            None => {
                let msg = LinkBridge::new(&name)
                    .stp_state(BridgeStpState::Disabled)
                    .forward_delay(0)
                    .mtu(mtu)
                    .build();
                h.link().add(msg).execute().await?;
                let msg = get_link(&h, &name)
                    .await?
                    .ok_or_else(|| LinkError::Vanished(name.clone()))?;
                (link_state(&msg), true)
            }
            Some(msg) => (link_state(&msg), false),
        };
        if !st.is_bridge {
            return Err(LinkError::NotABridge(name));
        }
        let unmarked_ok = st.alias.is_empty() && (created || adopt_unmarked);
        if st.alias != owner && !unmarked_ok {
            return Err(LinkError::NotOurs {
                name,
                owner: st.alias,
                want: owner,
            });
        }
        if st.alias != owner {
            // The kernel ignores IFLA_IFALIAS when creating a link, so the mark is a second step.
            h.link()
                .set(LinkUnspec::new_with_index(st.index).alias(owner).build())
                .execute()
                .await?;
        }
        if st.stp != Some(false) || st.forward_delay != Some(0) {
            let change = LinkBridge::new(&name)
                .index(st.index)
                .stp_state(BridgeStpState::Disabled)
                .forward_delay(0)
                .build();
            h.link().change(change).execute().await?;
        }
        if st.mtu != Some(mtu) || !st.up {
            h.link()
                .set(LinkUnspec::new_with_index(st.index).mtu(mtu).up().build())
                .execute()
                .await?;
        }
        Ok(created)
    })
}

/// The MAC of a network's bridge (pure): locally administered, unicast, from a digest of the
/// owner alias (cloud and network) and `role`. The gateway host's bridge carries the one of role
/// `"gateway"` — the same on whichever host holds the role, so when the role moves to another
/// host (failover) the guests' ARP entries for the gateway address stay right and nothing has
/// to be re-learnt. Every other host's bridge carries the one of its own host name, so a former
/// gateway host that comes back gives the gateway's MAC up.
pub fn bridge_mac(owner: &str, role: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{owner}\n{role}").as_bytes());
    [0x02, d[0], d[1], d[2], d[3], d[4]]
}

/// Give device `name` the MAC `mac` (nothing when it has it already or is absent).
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), LinkError> {
    let name = name.to_string();
    with_handle(|h| async move {
        let Some(msg) = get_link(&h, &name).await? else {
            return Ok(());
        };
        let st = link_state(&msg);
        if st.mac == Some(mac) {
            return Ok(());
        }
        h.link()
            .set(
                LinkUnspec::new_with_index(st.index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await?;
        Ok(())
    })
}

/// Delete device `name` if it carries the alias `owner` or no alias (callers only pass devices
/// their state says they made; an unmarked one is ours after a crash before marking). Returns
/// whether it was deleted. A device with another alias is left alone (it is not ours).
pub fn delete_link(name: &str, owner: &str) -> Result<bool, LinkError> {
    let name = name.to_string();
    let owner = owner.to_string();
    with_handle(|h| async move {
        let Some(msg) = get_link(&h, &name).await? else {
            return Ok(false);
        };
        let alias = link_state(&msg).alias;
        if alias != owner && !alias.is_empty() {
            tracing::warn!(device = %name, alias = %alias, "not deleting a device that is not ours");
            return Ok(false);
        }
        match h.link().del(msg.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_no_device(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })
}

fn ipv4_of(msg: &AddressMessage) -> Option<(Ipv4Addr, u8)> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some((*ip, msg.header.prefix_len))
        }
        _ => None,
    })
}

/// The IPv4 addresses of device `name` (empty if the device is absent).
pub fn ipv4_addrs(name: &str) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
    let name = name.to_string();
    with_handle(|h| async move {
        let Some(link) = get_link(&h, &name).await? else {
            return Ok(Vec::new());
        };
        let msgs: Vec<AddressMessage> = h
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs.iter().filter_map(ipv4_of).collect())
    })
}

/// Make the IPv4 addresses of device `name` exactly `want` (none when `None`). IPv6 is left alone.
pub fn set_ipv4(name: &str, want: Option<(Ipv4Addr, u8)>) -> Result<(), LinkError> {
    let name = name.to_string();
    with_handle(|h| async move {
        let Some(link) = get_link(&h, &name).await? else {
            return Ok(());
        };
        let index = link.header.index;
        let msgs: Vec<AddressMessage> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        let mut present = false;
        for msg in msgs {
            match ipv4_of(&msg) {
                Some(a) if Some(a) == want => present = true,
                Some(_) => h.address().del(msg).execute().await?,
                None => {}
            }
        }
        if let (Some((ip, prefix)), false) = (want, present) {
            h.address()
                .add(index, IpAddr::V4(ip), prefix)
                .execute()
                .await?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_mac_is_the_same_on_every_host_and_differs_from_each_hosts_own() {
        let owner = owner_alias("c1", "app");
        let gw = bridge_mac(&owner, "gateway");
        assert_eq!(gw, bridge_mac(&owner, "gateway"), "a pure function");
        assert_eq!(
            gw[0] & 0b11,
            0b10,
            "locally administered, unicast: {gw:02x?}"
        );
        assert_ne!(
            gw,
            bridge_mac(&owner_alias("c1", "db"), "gateway"),
            "one per network"
        );
        assert_ne!(
            gw,
            bridge_mac(&owner_alias("c2", "app"), "gateway"),
            "one per cloud"
        );
        let (h1, h2) = (bridge_mac(&owner, "host h1"), bridge_mac(&owner, "host h2"));
        assert!(h1 != h2 && h1 != gw && h2 != gw);
        assert_eq!(h1[0] & 0b11, 0b10);
    }
}
