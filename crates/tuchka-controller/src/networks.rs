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
        gateway_moved_from: n.gateway_moved_from.clone(),
        gateway_moved_at: n.gateway_moved_at.clone(),
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
            gateway_moved_from: None,
            gateway_moved_at: None,
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

/// What happens to a network's gateway role in one tick of [`fail_over`] (pure, from
/// [`gateway_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayChange {
    /// Its gateway host is not up: host `to` (an id) takes the role over.
    Move {
        /// The network.
        network: String,
        /// The host that had it (a name), when there was one.
        from: Option<String>,
        /// The host that takes it (an id).
        to: String,
    },
    /// Its gateway host is not up and no host can take the role over.
    Degrade {
        /// The network.
        network: String,
        /// Why, as the user reads it.
        why: String,
    },
    /// It was degraded and its gateway host is up again.
    Restore {
        /// The network.
        network: String,
    },
}

/// The gateway moves the state asks for (pure). A network whose gateway host is down (or gone,
/// or revoked) moves to the up, schedulable host that carries most of its VMs (so DHCP and NAT
/// stay near them; ties by name), skipping hosts where one of its port forwards would collide
/// with a forward of a network already gatewayed there or with a service listening there. When
/// no host can take it, the network is degraded; a degraded network whose gateway host is up
/// again is restored. Networks being removed are left alone.
pub fn gateway_changes(s: &Snapshot, forwards: &[db::ForwardRow]) -> Vec<GatewayChange> {
    let mut out = vec![];
    // Gateways as they stand after the moves decided so far (a move may make a port taken).
    let mut gateway_of: std::collections::HashMap<&str, String> = s
        .networks
        .iter()
        .filter_map(|n| Some((n.name.as_str(), n.gateway_host.clone()?)))
        .collect();
    for n in s.networks.iter().filter(|n| !n.deleting) {
        let current = n.gateway_host.as_deref().and_then(|id| s.host(id));
        if current.is_some_and(|h| s.is_up(h) && !h.revoked) {
            if n.state == NetworkState::Degraded {
                out.push(GatewayChange::Restore {
                    network: n.name.clone(),
                });
            }
            continue;
        }
        let ports: Vec<(tuchka_api::Protocol, u16)> = forwards
            .iter()
            .filter(|f| f.network == n.name)
            .map(|f| (f.proto, f.host_port))
            .collect();
        let collides = |host: &db::HostRow| -> Option<String> {
            ports.iter().find_map(|&(proto, port)| {
                if host.facts.listening_ports.contains(&port) {
                    return Some(format!("a service listens on port {port} of {}", host.name));
                }
                forwards
                    .iter()
                    .find(|f| {
                        f.network != n.name
                            && (f.proto, f.host_port) == (proto, port)
                            && gateway_of.get(f.network.as_str()) == Some(&host.id)
                    })
                    .map(|f| {
                        format!(
                            "{} already forwards {proto}/{port} for network {}",
                            host.name, f.network
                        )
                    })
            })
        };
        let on_net: HashSet<&str> = s
            .nics
            .iter()
            .filter(|x| x.network == n.name)
            .map(|x| x.vm_id.as_str())
            .collect();
        let mut refused = vec![];
        let best = s
            .hosts
            .iter()
            .filter(|h| s.is_up(h) && !h.revoked && !h.draining)
            .filter(|h| match collides(h) {
                Some(why) => {
                    refused.push(why);
                    false
                }
                None => true,
            })
            .map(|h| {
                let here = s
                    .vms_on(&h.id)
                    .filter(|v| on_net.contains(v.id.as_str()))
                    .count();
                (std::cmp::Reverse(here), h.name.as_str(), h)
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, h)| h);
        let from = n.gateway_host.as_deref().map(|id| s.host_name(id));
        match best {
            Some(h) => {
                gateway_of.insert(n.name.as_str(), h.id.clone());
                out.push(GatewayChange::Move {
                    network: n.name.clone(),
                    from,
                    to: h.id.clone(),
                });
            }
            None => {
                let gone = match &from {
                    Some(h) => format!("its gateway host {h} is down"),
                    None => "it has no gateway host".to_string(),
                };
                let why = if refused.is_empty() {
                    format!("{gone} and no other host is up to take the role over (see: tuchka host list)")
                } else {
                    format!(
                        "{gone} and no up host can take the role over: {}",
                        refused.join("; ")
                    )
                };
                // Degraded once; again only when the reason changed (a host came back but cannot
                // take the role), so `net show` always tells the present reason.
                if n.state != NetworkState::Degraded || n.error.as_deref() != Some(why.as_str()) {
                    out.push(GatewayChange::Degrade {
                        network: n.name.clone(),
                        why,
                    });
                }
            }
        }
    }
    out
}

/// One tick of gateway failover, in the caller's transaction: apply [`gateway_changes`].
/// Whether [`gateway_changes`] could have anything to do: a live network without a gateway
/// host, with one that is down, revoked or gone, or degraded while its gateway is up. Reads
/// the networks and their gateways' rows only.
fn gateway_in_question(ctl: &Controller, c: &Connection) -> Result<bool> {
    let (now, down_after) = (db::now_unix(), ctl.config().down_after.as_secs() as i64);
    for n in db::networks(c)?.iter().filter(|n| !n.deleting) {
        let gateway = match &n.gateway_host {
            Some(id) => db::host(c, id)?,
            None => None,
        };
        match gateway {
            Some(h) if crate::snapshot::is_up(&h, now, down_after) && !h.revoked => {
                if n.state == NetworkState::Degraded {
                    return Ok(true);
                }
            }
            _ => return Ok(true),
        }
    }
    Ok(false)
}

/// Returns what it did, as "network → host" lines for the moves.
pub fn fail_over(ctl: &Controller, c: &Connection) -> Result<Vec<String>> {
    // Called on every tick: the whole state is read only when some gateway is in question.
    if !gateway_in_question(ctl, c)? {
        return Ok(vec![]);
    }
    let s = ctl.snapshot(c)?;
    let changes = gateway_changes(&s, &db::forwards(c)?);
    let mut moved = vec![];
    for change in changes {
        let name = match &change {
            GatewayChange::Move { network, .. }
            | GatewayChange::Degrade { network, .. }
            | GatewayChange::Restore { network } => network.clone(),
        };
        let Some(mut n) = db::network(c, &name)? else {
            continue;
        };
        let object = format!("network/{name}");
        match change {
            GatewayChange::Move { from, to, .. } => {
                let to_name = s.host_name(&to);
                n.gateway_host = Some(to);
                n.gateway_moved_from = from.clone();
                n.gateway_moved_at = Some(db::now());
                // Its new host reports it ready once DHCP, DNS and NAT run there.
                n.state = NetworkState::Creating;
                n.error = None;
                db::update_network(c, &n)?;
                moved.push(format!("{name} → {to_name}"));
                let from = from
                    .map(|h| format!("from {h} (down) "))
                    .unwrap_or_default();
                ctl.emit(
                    "network.gateway_moved",
                    &object,
                    format!("network {name}: gateway moved {from}to {to_name}"),
                );
            }
            GatewayChange::Degrade { why, .. } => {
                n.state = NetworkState::Degraded;
                n.error = Some(why.clone());
                db::update_network(c, &n)?;
                ctl.emit("state", &object, format!("network {name}: degraded: {why}"));
                moved.push(format!("{name} → none ({why})"));
            }
            GatewayChange::Restore { .. } => {
                n.state = NetworkState::Creating;
                n.error = None;
                db::update_network(c, &n)?;
                moved.push(format!(
                    "{name} → {} (up again)",
                    s.host_name(n.gateway_host.as_deref().unwrap_or_default())
                ));
                ctl.emit(
                    "state",
                    &object,
                    format!("network {name}: its gateway host is up again"),
                );
            }
        }
    }
    Ok(moved)
}

/// Refuse new VMs on a degraded network (their NICs would get no DHCP, DNS or NAT).
pub fn check_usable(n: &NetworkRow) -> Result<()> {
    if n.state == NetworkState::Degraded {
        return Err(Error::conflict(
            "NetworkDegraded",
            format!(
                "network {:?} is degraded: {} (see: tuchka net show {})",
                n.name,
                n.error.as_deref().unwrap_or("its gateway host is down"),
                n.name
            ),
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::agent::HostFacts;

    /// A cloud of hosts `h1`…`h3` (ids = names) on a real store; `up` says which are up.
    fn cloud(tmp: &tempfile::TempDir, up: &[&str]) -> Controller {
        let ctl =
            Controller::open(crate::ControllerConfig::new(tmp.path().to_path_buf())).expect("open");
        ctl.db()
            .atomic(|c| {
                for h in ["h1", "h2", "h3"] {
                    db::insert_host(c, h, h, "x", &HostFacts::default())?;
                }
                Ok::<_, db::StoreError>(())
            })
            .expect("hosts");
        set_up(&ctl, up);
        ctl
    }

    fn set_up(ctl: &Controller, up: &[&str]) {
        let db = ctl.db();
        for h in ["h1", "h2", "h3"] {
            let seen = if up.contains(&h) { db::now_unix() } else { 1 };
            db.conn()
                .execute(
                    "UPDATE hosts SET last_seen_unix = ?2 WHERE id = ?1",
                    rusqlite::params![h, seen],
                )
                .expect("last seen");
        }
    }

    fn net(ctl: &Controller, name: &str, cidr: &str, gateway_host: &str) {
        let db = ctl.db();
        db::insert_network(
            db.conn(),
            &NetworkRow {
                name: name.into(),
                cidr: cidr.into(),
                vni: 5000 + db::networks(db.conn()).expect("nets").len() as u32,
                gateway_host: Some(gateway_host.into()),
                state: NetworkState::Ready,
                error: None,
                deleting: false,
                created_at: db::now(),
                nat: true,
                gateway: None,
                gateway_moved_from: None,
                gateway_moved_at: None,
            },
        )
        .expect("network");
    }

    /// VM `vm` on `host` with a NIC on `network`.
    fn vm_on(ctl: &Controller, vm: &str, host: &str, network: &str, ip: &str) {
        let db = ctl.db();
        let c = db.conn();
        c.execute(
            "INSERT OR IGNORE INTO groups (name, image, image_sha256, count, cpus, memory_mib, disk_mib, \
             networks, ssh_keys, placement, created_at) VALUES ('g', 'i', 's', 1, 1, 128, 1, '[]', '[]', 'spread', 'now')",
            [],
        )
        .expect("group");
        c.execute(
            "INSERT INTO vms (id, name, group_name, idx, host_id, placement_reason, desired, observed, created_at) \
             VALUES (?1, ?1, 'g', 0, ?2, '', 'running', 'running', 'now')",
            [vm, host],
        )
        .expect("vm");
        c.execute(
            "INSERT INTO nics (vm_id, idx, network, mac, ip) VALUES (?1, 0, ?2, ?1, ?3)",
            [vm, network, ip],
        )
        .expect("nic");
    }

    fn forward(ctl: &Controller, network: &str, port: u16) {
        db::insert_forward(
            ctl.db().conn(),
            &db::ForwardRow {
                id: format!("{network}-{port}"),
                network: network.into(),
                proto: tuchka_api::Protocol::Tcp,
                host_port: port,
                vm_id: "v".into(),
                vm_port: 80,
                created_at: db::now(),
            },
        )
        .expect("forward");
    }

    fn tick(ctl: &Controller) -> Vec<String> {
        ctl.db().atomic(|c| fail_over(ctl, c)).expect("fail over")
    }

    fn row(ctl: &Controller, name: &str) -> NetworkRow {
        db::network(ctl.db().conn(), name)
            .expect("read")
            .expect("network")
    }

    #[test]
    fn a_gateway_moves_to_the_up_host_with_most_of_its_vms_and_nothing_moves_while_it_is_up() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = cloud(&tmp, &["h1", "h2", "h3"]);
        net(&ctl, "app", "10.91.0.0/24", "h1");
        vm_on(&ctl, "a", "h3", "app", "10.91.0.10");
        assert!(tick(&ctl).is_empty(), "h1 is up: nothing moves");

        set_up(&ctl, &["h2", "h3"]);
        assert_eq!(tick(&ctl), ["app → h3"]);
        let n = row(&ctl, "app");
        assert_eq!(n.gateway_host.as_deref(), Some("h3"), "h3 runs app's VM");
        assert_eq!(n.gateway_moved_from.as_deref(), Some("h1"));
        assert!(n.gateway_moved_at.is_some());
        assert_eq!(n.state, NetworkState::Creating, "until h3 reports it ready");
        // h1 comes back: the role stays where it went (no flapping).
        set_up(&ctl, &["h1", "h2", "h3"]);
        assert!(tick(&ctl).is_empty());
        assert_eq!(row(&ctl, "app").gateway_host.as_deref(), Some("h3"));
    }

    #[test]
    fn a_gateway_never_moves_where_its_forwards_collide_and_without_a_host_the_network_is_degraded()
    {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = cloud(&tmp, &["h2", "h3"]);
        net(&ctl, "app", "10.91.0.0/24", "h1");
        net(&ctl, "db", "10.92.0.0/24", "h2");
        // The forwards' target VM (on the down h1, so it does not pull a gateway anywhere).
        vm_on(&ctl, "v", "h1", "app", "10.91.0.20");
        forward(&ctl, "app", 8080);
        forward(&ctl, "db", 8080);
        assert_eq!(tick(&ctl), ["app → h3"], "h2 already forwards tcp/8080");

        // Now h3 and h2 go down too: db and app have nowhere to go.
        set_up(&ctl, &[]);
        let done = tick(&ctl);
        assert_eq!(done.len(), 2, "{done:?}");
        let n = row(&ctl, "app");
        assert_eq!(n.state, NetworkState::Degraded);
        let why = n.error.clone().unwrap_or_default();
        assert!(
            why.contains("gateway host h3 is down") && why.contains("no other host is up"),
            "{why}"
        );
        let e = check_usable(&n).expect_err("new VMs are refused");
        assert_eq!(e.code(), "NetworkDegraded");
        assert!(e.to_string().contains("degraded"), "{e}");
        assert!(tick(&ctl).is_empty(), "degraded once, not at every tick");

        // h3 is back: app is restored there; db moves to h3 too? No: h3 forwards 8080 for app.
        set_up(&ctl, &["h3"]);
        let done = tick(&ctl);
        assert!(
            done.contains(&"app → h3 (up again)".to_string()),
            "{done:?}"
        );
        let d = row(&ctl, "db");
        assert_eq!(
            d.state,
            NetworkState::Degraded,
            "h3 already forwards tcp/8080 for app"
        );
        assert!(d
            .error
            .unwrap_or_default()
            .contains("h3 already forwards tcp/8080 for network app"),);
        assert!(check_usable(&row(&ctl, "app")).is_ok());
    }
}
