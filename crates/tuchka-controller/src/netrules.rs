//! Access rules and port forwards of networks: validation, storage, views, and their resolution
//! into the addresses hosts filter on (`tuchka_api::agent::{IngressRule, EgressRule,
//! ForwardDesired}`).
//!
//! Semantics (docs/networking.md): VMs of one network reach each other; traffic into a network
//! from anywhere else is dropped unless an `in` rule of that network allows it; `out` rules
//! restrict what leaves; `--nat` is the only route to the outside world.

use std::collections::HashMap;

use rusqlite::Connection;
use tuchka_api::agent::{EgressRule, ForwardDesired, IngressRule};
use tuchka_api::{Direction, Forward, ForwardCreate, Protocol, Rule, RuleAction, RuleCreate};
use tuchka_core::ipam::Cidr;
use tuchka_core::rules::{format_spec, parse_spec, parse_target, reserved_port};
use tuchka_store::{self as db, ForwardRow, RuleRow};

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::state::Controller;

fn not_found(kind: &'static str, cli: &'static str, name: &str) -> Error {
    Error::not_found(kind, cli, name)
}

fn rule_view(r: RuleRow) -> Rule {
    Rule {
        id: r.id,
        network: r.network,
        direction: r.direction,
        action: r.action,
        spec: r.spec,
        from: r.from_cidr,
        from_group: r.from_group,
        from_network: r.from_network,
        to_group: r.to_group,
        to: r.to_cidr,
        created_at: r.created_at,
    }
}

/// Rules and forwards of a network as the API shows them.
pub fn views(
    c: &Connection,
    s: &Snapshot,
    network: &str,
    gateway_host: Option<&str>,
) -> Result<(Vec<Rule>, Vec<Forward>)> {
    let rules = db::rules(c)?
        .into_iter()
        .filter(|r| r.network == network)
        .map(rule_view)
        .collect();
    let nics = &s.nics;
    let vms: HashMap<&str, &str> = s
        .vms
        .iter()
        .map(|v| (v.id.as_str(), v.name.as_str()))
        .collect();
    let host = gateway_host.map(|id| s.host_name(id));
    let forwards = db::forwards(c)?
        .into_iter()
        .filter(|f| f.network == network)
        .map(|f| Forward {
            vm_ip: nics
                .iter()
                .find(|n| n.vm_id == f.vm_id && n.network == f.network)
                .map(|n| n.ip.clone())
                .unwrap_or_default(),
            vm: vms
                .get(f.vm_id.as_str())
                .map(|v| v.to_string())
                .unwrap_or_else(|| f.vm_id.clone()),
            id: f.id,
            network: f.network,
            proto: f.proto,
            host_port: f.host_port,
            vm_port: f.vm_port,
            host: host.clone(),
            created_at: f.created_at,
        })
        .collect();
    Ok((rules, forwards))
}

fn live_network(c: &Connection, name: &str) -> Result<db::NetworkRow> {
    let n = db::network(c, name)?.ok_or_else(|| not_found("network", "net", name))?;
    if n.deleting {
        return Err(Error::conflict(
            "NetworkDeleting",
            format!("network {name:?} is being removed"),
        ));
    }
    Ok(n)
}

fn cidr_arg(what: &str, s: &str) -> Result<String> {
    Cidr::parse_any(s)
        .map(|c| c.to_string())
        .map_err(|e| Error::invalid("InvalidCidr", format!("{what}: {e}")))
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

fn changed(ctl: &Controller, network: &str, what: String) {
    ctl.bump();
    ctl.emit("network.changed", &format!("network/{network}"), what);
}

/// `net rule add`.
pub fn add_rule(ctl: &Controller, network: &str, req: RuleCreate) -> Result<Rule> {
    let direction = req.direction.unwrap_or(Direction::In);
    let action = req.action.unwrap_or(RuleAction::Allow);
    let m = parse_spec(&req.spec).map_err(|e| Error::invalid("InvalidRule", e.to_string()))?;
    let row = ctl.db().atomic(|c| {
        live_network(c, network)?;
        let mut row = RuleRow {
            id: short_id(),
            network: network.into(),
            direction,
            action,
            spec: format_spec(&m),
            from_cidr: None,
            from_group: None,
            from_network: None,
            to_group: None,
            to_cidr: None,
            created_at: db::now(),
        };
        match (direction, action) {
            (Direction::In, RuleAction::Allow) => {
                let sources = [&req.from, &req.from_group, &req.from_network].iter().filter(|s| s.is_some()).count();
                if sources != 1 {
                    return Err(Error::invalid(
                        "InvalidRule",
                        "an inbound rule needs exactly one source: --from CIDR, --from-group GROUP or --from-net NETWORK",
                    ));
                }
                if req.to.is_some() {
                    return Err(Error::invalid("InvalidRule", "--to CIDR is for outbound rules; use --to-group for inbound ones"));
                }
                row.from_cidr = req.from.as_deref().map(|s| cidr_arg("--from", s)).transpose()?;
                if let Some(g) = &req.from_group {
                    db::group(c, g)?.ok_or_else(|| unknown_group(g))?;
                    row.from_group = Some(g.clone());
                }
                if let Some(n) = &req.from_network {
                    db::network(c, n)?.ok_or_else(|| not_found("network", "net", n))?;
                    row.from_network = Some(n.clone());
                }
                if let Some(g) = &req.to_group {
                    db::group(c, g)?.ok_or_else(|| unknown_group(g))?;
                    row.to_group = Some(g.clone());
                }
            }
            (Direction::In, RuleAction::Deny) => {
                return Err(Error::invalid(
                    "InvalidRule",
                    "inbound rules can only allow: everything not allowed is already denied",
                ))
            }
            (Direction::Out, _) => {
                if req.from.is_some() || req.from_group.is_some() || req.from_network.is_some() || req.to_group.is_some() {
                    return Err(Error::invalid("InvalidRule", "outbound rules take only a destination: --to CIDR"));
                }
                row.to_cidr = Some(cidr_arg("--to", req.to.as_deref().unwrap_or("0.0.0.0/0"))?);
            }
        }
        db::insert_rule(c, &row)?;
        Ok::<_, Error>(row)
    })?;
    changed(
        ctl,
        network,
        format!(
            "rule {} added to network {network}: {} {} {}",
            row.id, row.direction, row.action, row.spec
        ),
    );
    Ok(rule_view(row))
}

fn unknown_group(g: &str) -> Error {
    Error::invalid(
        "UnknownGroup",
        format!("group {g:?} does not exist (see: tuchka group list)"),
    )
}

/// `net rule rm`.
pub fn delete_rule(ctl: &Controller, network: &str, id: &str) -> Result<()> {
    remove_entry(ctl, network, id, ("rule", "net rule"), db::delete_rule)
}

/// Remove rule or forward `id` of `network` with `delete`; `kind` names it in messages.
fn remove_entry(
    ctl: &Controller,
    network: &str,
    id: &str,
    (kind, cli): (&'static str, &'static str),
    delete: fn(&rusqlite::Connection, &str, &str) -> tuchka_store::Result<bool>,
) -> Result<()> {
    let removed = ctl.db().atomic(|c| {
        db::network(c, network)?.ok_or_else(|| not_found("network", "net", network))?;
        Ok::<_, Error>(delete(c, network, id)?)
    })?;
    if !removed {
        return Err(Error::NotFound {
            kind,
            cli,
            name: id.to_string(),
        });
    }
    changed(
        ctl,
        network,
        format!("{kind} {id} removed from network {network}"),
    );
    Ok(())
}

/// `net rule list`.
pub fn list_rules(ctl: &Controller, network: &str) -> Result<Vec<Rule>> {
    let db = ctl.db();
    let c = db.conn();
    db::network(c, network)?.ok_or_else(|| not_found("network", "net", network))?;
    Ok(db::rules(c)?
        .into_iter()
        .filter(|r| r.network == network)
        .map(rule_view)
        .collect())
}

/// `net forward add`.
pub fn add_forward(ctl: &Controller, network: &str, req: ForwardCreate) -> Result<Forward> {
    let proto = req.proto.unwrap_or(Protocol::Tcp);
    if !matches!(proto, Protocol::Tcp | Protocol::Udp) {
        return Err(Error::invalid(
            "InvalidForward",
            format!("protocol {proto:?}: use tcp or udp"),
        ));
    }
    if req.host_port == 0 {
        return Err(Error::invalid(
            "InvalidForward",
            "host port 0: use a port from 1 to 65535",
        ));
    }
    if let Some(what) = reserved_port(req.host_port) {
        return Err(Error::conflict(
            "PortReserved",
            format!(
                "host port {} is reserved for {what}: pick another one",
                req.host_port
            ),
        ));
    }
    let (vm_name, vm_port) =
        parse_target(&req.to).map_err(|e| Error::invalid("InvalidForward", e.to_string()))?;
    let row = ctl.db().atomic(|c| {
        let net = live_network(c, network)?;
        let vm = db::vm(c, &vm_name)?.ok_or_else(|| not_found("vm", "vm", &vm_name))?;
        if !db::vm_nics(c, &vm.id)?.iter().any(|n| n.network == network) {
            return Err(Error::invalid("InvalidForward", format!("vm {vm_name:?} has no address on network {network:?}")));
        }
        let gw_host = net.gateway_host.clone().unwrap_or_default();
        let nets: HashMap<String, db::NetworkRow> = db::networks(c)?.into_iter().map(|n| (n.name.clone(), n)).collect();
        for f in db::forwards(c)? {
            let same_host = nets.get(&f.network).and_then(|n| n.gateway_host.clone()).unwrap_or_default() == gw_host;
            if same_host && f.host_port == req.host_port && f.proto == proto {
                return Err(Error::conflict(
                    "PortTaken",
                    format!("host port {proto}/{} is already forwarded (forward {} on network {}): pick another one", req.host_port, f.id, f.network),
                ));
            }
        }
        if let Some(h) = db::host(c, &gw_host)? {
            if h.facts.listening_ports.contains(&req.host_port) {
                return Err(Error::conflict(
                    "PortTaken",
                    format!("host port {} is in use on host {} (a service listens on it): pick another one", req.host_port, h.name),
                ));
            }
        }
        let row = ForwardRow {
            id: short_id(),
            network: network.into(),
            proto,
            host_port: req.host_port,
            vm_id: vm.id.clone(),
            vm_port,
            created_at: db::now(),
        };
        db::insert_forward(c, &row)?;
        Ok::<_, Error>(row)
    })?;
    changed(
        ctl,
        network,
        format!(
            "forward {} added: host {proto}/{} → {}",
            row.id, row.host_port, req.to
        ),
    );
    list_forwards(ctl, network)?
        .into_iter()
        .find(|f| f.id == row.id)
        .ok_or_else(|| Error::Internal {
            message: "forward vanished".into(),
            chain: vec![],
        })
}

/// `net forward rm`.
pub fn delete_forward(ctl: &Controller, network: &str, id: &str) -> Result<()> {
    remove_entry(
        ctl,
        network,
        id,
        ("forward", "net forward"),
        db::delete_forward,
    )
}

/// `net forward list`.
pub fn list_forwards(ctl: &Controller, network: &str) -> Result<Vec<Forward>> {
    let db = ctl.db();
    let c = db.conn();
    let n = db::network(c, network)?.ok_or_else(|| not_found("network", "net", network))?;
    let s = ctl.snapshot(c)?;
    Ok(views(c, &s, network, n.gateway_host.as_deref())?.1)
}

/// What hosts filter on for network `network`, from the stored rules and forwards.
pub struct Resolved {
    /// Inbound allow rules.
    pub ingress: Vec<IngressRule>,
    /// Outbound rules.
    pub egress: Vec<EgressRule>,
    /// Forwards.
    pub forwards: Vec<ForwardDesired>,
}

/// Resolve groups and networks named by rules into addresses. Pure over the rows given.
pub fn resolve(
    network: &str,
    rules: &[RuleRow],
    forwards: &[ForwardRow],
    nics: &[db::NicRow],
    vms: &[db::VmRow],
    networks: &[db::NetworkRow],
) -> Resolved {
    let live: HashMap<&str, &db::VmRow> = vms
        .iter()
        .filter(|v| !v.deleting)
        .map(|v| (v.id.as_str(), v))
        .collect();
    let group_ips = |group: &str, on: Option<&str>| -> Vec<String> {
        let mut ips: Vec<String> = nics
            .iter()
            .filter(|n| live.get(n.vm_id.as_str()).is_some_and(|v| v.group == group))
            .filter(|n| on.is_none_or(|net| n.network == net))
            .map(|n| format!("{}/32", n.ip))
            .collect();
        ips.sort();
        ips
    };
    let mut ingress = vec![];
    let mut egress = vec![];
    for r in rules.iter().filter(|r| r.network == network) {
        let Ok(matches) = parse_spec(&r.spec) else {
            continue;
        };
        if r.direction == Direction::Out {
            egress.push(EgressRule {
                id: r.id.clone(),
                action: r.action,
                matches,
                destinations: vec![r.to_cidr.clone().unwrap_or_else(|| "0.0.0.0/0".into())],
            });
            continue;
        }
        let sources = if let Some(c) = &r.from_cidr {
            vec![c.clone()]
        } else if let Some(g) = &r.from_group {
            group_ips(g, None)
        } else if let Some(n) = &r.from_network {
            networks
                .iter()
                .filter(|x| &x.name == n)
                .map(|x| x.cidr.clone())
                .collect()
        } else {
            vec![]
        };
        let targets = match &r.to_group {
            Some(g) => {
                let t = group_ips(g, Some(network));
                if t.is_empty() {
                    continue; // the group has no VM here: the rule opens nothing
                }
                t
            }
            None => vec![],
        };
        if sources.is_empty() {
            continue;
        }
        ingress.push(IngressRule {
            id: r.id.clone(),
            matches,
            sources,
            targets,
        });
    }
    let forwards = forwards
        .iter()
        .filter(|f| f.network == network && live.contains_key(f.vm_id.as_str()))
        .filter_map(|f| {
            let ip = nics
                .iter()
                .find(|n| n.vm_id == f.vm_id && n.network == network)?
                .ip
                .clone();
            Some(ForwardDesired {
                id: f.id.clone(),
                proto: f.proto,
                host_port: f.host_port,
                vm_ip: ip,
                vm_port: f.vm_port,
            })
        })
        .collect();
    Resolved {
        ingress,
        egress,
        forwards,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::{PowerState, VmState};

    fn vm(id: &str, group: &str) -> db::VmRow {
        db::VmRow {
            id: id.into(),
            name: format!("{group}-{id}"),
            group: group.into(),
            idx: 0,
            host_id: "h".into(),
            placement_reason: String::new(),
            desired: PowerState::Running,
            observed: VmState::Running,
            error: None,
            error_chain: vec![],
            cpu_usage: 0.0,
            reboot_seq: 0,
            reboot_done: 0,
            force_stop: false,
            stop_timeout_s: 60,
            deleting: false,
            created_at: String::new(),
            extra: Default::default(),
        }
    }

    fn nic(vm: &str, net: &str, ip: &str) -> db::NicRow {
        db::NicRow {
            vm_id: vm.into(),
            idx: 0,
            network: net.into(),
            mac: format!("52:54:00:00:00:{vm}"),
            ip: ip.into(),
        }
    }

    fn rule(id: &str, net: &str) -> RuleRow {
        RuleRow {
            id: id.into(),
            network: net.into(),
            direction: Direction::In,
            action: RuleAction::Allow,
            spec: "tcp:80".into(),
            from_cidr: None,
            from_group: None,
            from_network: None,
            to_group: None,
            to_cidr: None,
            created_at: String::new(),
        }
    }

    #[test]
    fn groups_resolve_to_their_addresses() {
        let vms = [vm("1", "web"), vm("2", "web"), vm("3", "pg")];
        let nics = [
            nic("1", "app", "10.81.0.2"),
            nic("2", "app", "10.81.0.3"),
            nic("3", "app", "10.81.0.4"),
            nic("3", "db", "10.82.0.2"),
        ];
        let mut r = rule("r1", "db");
        r.from_group = Some("web".into());
        r.to_group = Some("pg".into());
        let mut cidr = rule("r2", "app");
        cidr.from_cidr = Some("203.0.113.0/24".into());
        let out = resolve("db", &[r.clone(), cidr.clone()], &[], &nics, &vms, &[]);
        assert_eq!(out.ingress.len(), 1);
        assert_eq!(out.ingress[0].sources, vec!["10.81.0.2/32", "10.81.0.3/32"]);
        assert_eq!(out.ingress[0].targets, vec!["10.82.0.2/32"]);
        let out = resolve("app", &[r, cidr], &[], &nics, &vms, &[]);
        assert_eq!(out.ingress.len(), 1);
        assert_eq!(out.ingress[0].sources, vec!["203.0.113.0/24"]);
        assert!(out.ingress[0].targets.is_empty());
    }

    #[test]
    fn a_target_group_without_vms_here_opens_nothing() {
        let vms = [vm("1", "web")];
        let nics = [nic("1", "app", "10.81.0.2")];
        let mut r = rule("r1", "db");
        r.from_cidr = Some("0.0.0.0/0".into());
        r.to_group = Some("web".into());
        assert!(resolve("db", &[r], &[], &nics, &vms, &[])
            .ingress
            .is_empty());
    }

    #[test]
    fn deleted_vms_drop_out_of_rules_and_forwards() {
        let mut gone = vm("1", "web");
        gone.deleting = true;
        let nics = [nic("1", "app", "10.81.0.2")];
        let mut r = rule("r1", "db");
        r.from_group = Some("web".into());
        let f = ForwardRow {
            id: "f".into(),
            network: "app".into(),
            proto: Protocol::Tcp,
            host_port: 8080,
            vm_id: "1".into(),
            vm_port: 80,
            created_at: String::new(),
        };
        assert!(resolve("db", &[r], &[], &nics, &[gone.clone()], &[])
            .ingress
            .is_empty());
        assert!(resolve("app", &[], &[f], &nics, &[gone], &[])
            .forwards
            .is_empty());
    }
}
