//! Networks: create (a CIDR, a VNI, a gateway host), remove (refused while VMs use it), show.
//! Rules and forwards of a network are in [`crate::netrules`].

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rusqlite::Connection;
use tuchka_api::{Network, NetworkCreate, NetworkState, Operation, VmAddress};
use tuchka_core::ipam::{self, Cidr};
use tuchka_core::names;
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, NetworkRow};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::snapshot::Snapshot;
use crate::state::Controller;

fn view(s: &Snapshot, c: &Connection, n: &NetworkRow) -> Result<Network> {
    let vm_names: std::collections::HashMap<&str, &str> = s
        .vms
        .iter()
        .map(|v| (v.id.as_str(), v.name.as_str()))
        .collect();
    let addresses = s
        .nics
        .iter()
        .filter(|x| x.network == n.name)
        .map(|x| VmAddress {
            network: x.network.clone(),
            mac: x.mac.clone(),
            ip: x.ip.clone(),
            vm: vm_names.get(x.vm_id.as_str()).map(|v| v.to_string()),
        })
        .collect();
    let (rules, forwards) = crate::netrules::views(c, s, &n.name, n.gateway_host.as_deref())?;
    Ok(Network {
        name: n.name.clone(),
        cidr: n.cidr.clone(),
        gateway: gateway_of(n),
        vni: n.vni,
        bridge: names::bridge_name(n.vni),
        state: if n.deleting {
            NetworkState::Deleting
        } else {
            n.state
        },
        gateway_host: n.gateway_host.as_deref().map(|id| s.host_name(id)),
        addresses,
        error: n.error.clone(),
        nat: n.nat,
        rules,
        forwards,
    })
}

/// All networks.
pub fn list(ctl: &Controller) -> Result<Vec<Network>> {
    let db = ctl.db();
    let c = db.conn();
    let s = ctl.snapshot(c)?;
    s.networks.iter().map(|n| view(&s, c, n)).collect()
}

/// One network.
pub fn get(ctl: &Controller, name: &str) -> Result<Network> {
    let db = ctl.db();
    let c = db.conn();
    let s = ctl.snapshot(c)?;
    let n = s
        .networks
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| Error::not_found("network", "net", name))?;
    view(&s, c, n)
}

/// `net create`.
pub fn create(ctl: &Controller, req: NetworkCreate) -> Result<Operation> {
    names::validate_name("network", &req.name)
        .map_err(|_| Error::bad_name("network", &req.name))?;
    let cidr =
        Cidr::parse_network(&req.cidr).map_err(|e| Error::invalid("InvalidCidr", e.to_string()))?;
    let gateway = req
        .gateway
        .as_deref()
        .map(|g| check_gateway(&cidr, g))
        .transpose()?;
    operations::start(ctl, |c| {
        if db::network(c, &req.name)?.is_some() {
            return Err(Error::conflict(
                "NetworkExists",
                format!(
                    "network {:?} already exists (see: tuchka net show {})",
                    req.name, req.name
                ),
            ));
        }
        insert(ctl, c, &req.name, &cidr, req.nat, gateway.clone())?;
        let op = new_op(
            OpKind::NetCreate {
                network: req.name.clone(),
            },
            &format!("network/{}", req.name),
            1,
            "creating bridge and DHCP",
        );
        Ok(op)
    })
}

/// Record network `name` on `cidr` (refused when it overlaps another), in the caller's
/// transaction; the gateway host's agent builds it.
fn insert(
    ctl: &Controller,
    c: &Connection,
    name: &str,
    cidr: &Cidr,
    nat: bool,
    gateway: Option<String>,
) -> Result<()> {
    let nets = db::networks(c)?;
    ipam::check_overlap(
        cidr,
        nets.iter().map(|n| (n.name.as_str(), n.cidr.as_str())),
    )
    .map_err(|e| Error::invalid("CidrOverlap", e.to_string()))?;
    let s = ctl.snapshot(c)?;
    let gateway_host = pick_gateway_host(&s)?;
    let used: HashSet<u32> = nets.iter().map(|n| n.vni).collect();
    let vni = ipam::allocate_vni(&mut rand::thread_rng(), &used);
    db::insert_network(
        c,
        &NetworkRow {
            name: name.to_string(),
            cidr: cidr.to_string(),
            vni,
            gateway_host: Some(gateway_host),
            state: NetworkState::Creating,
            error: None,
            deleting: false,
            created_at: db::now(),
            nat,
            gateway,
        },
    )?;
    Ok(())
}

/// A network of its own for an image builder: the first free /24 of 10.254.0.0/16, no NAT.
pub fn insert_private(ctl: &Controller, c: &Connection, name: &str) -> Result<String> {
    let nets = db::networks(c)?;
    for i in 0..=255u32 {
        let Ok(cidr) = Cidr::parse_network(&format!("10.254.{i}.0/24")) else {
            continue;
        };
        if ipam::check_overlap(
            &cidr,
            nets.iter().map(|n| (n.name.as_str(), n.cidr.as_str())),
        )
        .is_ok()
        {
            insert(ctl, c, name, &cidr, false, None)?;
            return Ok(cidr.to_string());
        }
    }
    Err(Error::conflict(
        "AddressesExhausted",
        "no free /24 in 10.254.0.0/16 for a builder network",
    ))
}

/// Mark network `name` for removal (its hosts take it down; the row goes when they have).
pub fn mark_deleting(c: &Connection, name: &str) -> Result<()> {
    if let Some(mut n) = db::network(c, name)? {
        if !n.deleting {
            n.deleting = true;
            db::update_network(c, &n)?;
        }
    }
    Ok(())
}

/// A gateway given by the user must be a usable address of the network that VMs do not get.
fn check_gateway(cidr: &Cidr, gateway: &str) -> Result<String> {
    let ip: Ipv4Addr = gateway.parse().map_err(|_| {
        Error::invalid(
            "InvalidGateway",
            format!("gateway {gateway:?} is not an IPv4 address"),
        )
    })?;
    if !cidr.contains(ip) || ip == cidr.network() || ip == cidr.broadcast() {
        return Err(Error::invalid(
            "InvalidGateway",
            format!("gateway {ip} is outside network {cidr} (or its network/broadcast address): use an address inside it, e.g. {}", cidr.gateway()),
        ));
    }
    Ok(ip.to_string())
}

/// The gateway address of a network.
pub fn gateway_of(n: &NetworkRow) -> String {
    n.gateway.clone().unwrap_or_else(|| {
        n.cidr
            .parse::<Cidr>()
            .map(|c| c.gateway().to_string())
            .unwrap_or_default()
    })
}

/// The gateway host of a new network: the first host by name that is up and not draining.
fn pick_gateway_host(s: &Snapshot) -> Result<String> {
    s.hosts
        .iter()
        .filter(|h| s.is_up(h) && !h.draining && !h.revoked)
        .min_by(|a, b| a.name.cmp(&b.name))
        .map(|h| h.id.clone())
        .ok_or_else(|| {
            Error::conflict(
                "NoHost",
                "no host is up to run the network's gateway (see: tuchka host list)",
            )
        })
}

/// `net rm`: refused while VMs use it.
pub fn delete(ctl: &Controller, name: &str) -> Result<Operation> {
    operations::start(ctl, |c| {
        let mut n =
            db::network(c, name)?.ok_or_else(|| Error::not_found("network", "net", name))?;
        let s = ctl.snapshot(c)?;
        let ids: HashSet<&str> = s
            .nics
            .iter()
            .filter(|x| x.network == name)
            .map(|x| x.vm_id.as_str())
            .collect();
        let users: Vec<&str> = s
            .vms
            .iter()
            .filter(|v| ids.contains(v.id.as_str()))
            .map(|v| v.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(Error::conflict(
                "NetworkInUse",
                format!(
                    "network {name:?} is used by {}: remove them first (tuchka group rm …)",
                    users.join(", ")
                ),
            ));
        }
        n.deleting = true;
        db::update_network(c, &n)?;
        let op = new_op(
            OpKind::NetDelete {
                network: name.to_string(),
            },
            &format!("network/{name}"),
            1,
            "removing bridge and DHCP",
        );
        Ok(op)
    })
}

/// How a `net.create` / `net.delete` operation stands.
pub fn evaluate(c: &Connection, kind: &OpKind, rollback: Option<&str>) -> Result<Step> {
    Ok(match kind {
        OpKind::NetCreate { network } => {
            let Some(mut n) = db::network(c, network)? else {
                return Ok(Step::Failed {
                    error: rollback
                        .map(String::from)
                        .unwrap_or_else(|| format!("network {network:?} was removed")),
                    chain: vec![],
                });
            };
            if rollback.is_some() {
                return Ok(Step::Running {
                    done: 0,
                    message: "rolling back".into(),
                });
            }
            match n.state {
                NetworkState::Ready => Step::Succeeded {
                    message: format!(
                        "network {network} ready on bridge {}",
                        names::bridge_name(n.vni)
                    ),
                },
                NetworkState::Error => {
                    let error = format!(
                        "network {network}: {}",
                        n.error
                            .clone()
                            .unwrap_or_else(|| "failed on its host".into())
                    );
                    n.deleting = true;
                    db::update_network(c, &n)?;
                    Step::RollingBack {
                        error,
                        chain: vec![],
                    }
                }
                _ => Step::Running {
                    done: 0,
                    message: "creating bridge and DHCP".into(),
                },
            }
        }
        OpKind::NetDelete { network } => {
            if db::network(c, network)?.is_none() {
                Step::Succeeded {
                    message: format!("network {network} removed"),
                }
            } else {
                Step::Running {
                    done: 0,
                    message: "removing bridge and DHCP".into(),
                }
            }
        }
        _ => Step::Failed {
            error: "not a network operation".into(),
            chain: vec![],
        },
    })
}
