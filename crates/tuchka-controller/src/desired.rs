//! The agent side of the controller: registration, the desired state of a host, and applying
//! what a host reports.
//!
//! Trust: an agent on the unix socket is trusted. Over TCP, registering needs the join token
//! ([`register`]); it answers a fresh per-host credential, whose sha256 is stored, and every
//! other agent call must carry it ([`authenticate_host`]). [`revoke_host`] makes a host's
//! credential refused for good; only a new registration with a join token admits it again.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;
use sha2::{Digest, Sha256};
use tuchka_api::agent::{
    DhcpHost, HostDesired, HostRegister, HostRegistered, HostReport, NetworkDesired, NicDesired,
    VmDesired, VxlanDesired,
};
use tuchka_api::VmState;
use tuchka_core::names;
use tuchka_store::{self as db, HostNetworkRow, StoreError};

use crate::error::{Error, Result};
use crate::state::Controller;

/// MTU of tenant bridges and guest NICs (leaves room for VXLAN on a 1500 fabric).
pub const TENANT_MTU: u32 = 1450;

/// sha256 hex of a credential.
pub fn credential_hash(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

/// Register (or re-register) a host; returns its id and a fresh credential. Untrusted
/// (TCP) callers must present the current join token. Re-registering a revoked host admits it
/// again.
pub fn register(ctl: &Controller, req: HostRegister, trusted: bool) -> Result<HostRegistered> {
    if !trusted && !ctl.join_token_matches(&req.join_token)? {
        return Err(Error::Unauthorized(format!(
            "join token refused for host {:?}: use the current one (on the controller: tuchka host join-token)",
            req.name
        )));
    }
    tuchka_core::names::validate_name("host", &req.name)
        .map_err(|e| Error::invalid("InvalidName", e.to_string()))?;
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut secret);
    let credential = hex::encode(secret);
    let id = ctl.db().atomic(|c| {
        let id = db::upsert_host(
            c,
            &uuid::Uuid::new_v4().to_string(),
            &req.name,
            &credential_hash(&credential),
            &req.facts,
        )?;
        db::touch_host(c, &id, &req.facts, &[])?;
        Ok::<_, Error>(id)
    })?;
    ctl.emit(
        "host.registered",
        &format!("host/{}", req.name),
        format!("host {} registered ({})", req.name, req.facts.accel),
    );
    ctl.bump();
    Ok(HostRegistered {
        host_id: id,
        credential,
        cloud_id: ctl.cloud_id().to_string(),
    })
}

/// Why an agent's host credential was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostAuthError {
    /// No host has this id (e.g. the controller's state was reset): register again.
    #[error("unknown host {0:?}: register again")]
    UnknownHost(String),
    /// The host was revoked: its credential is refused for good.
    #[error("host {0:?} was revoked (tuchka host revoke): its credential is refused; it can only join again with a join token")]
    Revoked(String),
    /// The credential is not the host's.
    #[error("credential of host {0:?} refused")]
    WrongCredential(String),
    /// No joined host has this credential (nor is it the API token).
    #[error("missing or wrong bearer token: use a joined host's credential or the API token")]
    NoSuchCredential,
    /// The database failed.
    #[error("cannot check the host credential")]
    Store(#[from] StoreError),
}

/// Check a host credential (TCP agents).
pub fn authenticate_host(
    ctl: &Controller,
    host_id: &str,
    credential: &str,
) -> std::result::Result<(), HostAuthError> {
    let h = db::host(ctl.db().conn(), host_id)?
        .ok_or_else(|| HostAuthError::UnknownHost(host_id.to_string()))?;
    if h.revoked {
        return Err(HostAuthError::Revoked(h.name));
    }
    let given = credential_hash(credential);
    let same = given.len() == h.credential_sha256.len()
        && given
            .bytes()
            .zip(h.credential_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(HostAuthError::WrongCredential(h.name));
    }
    Ok(())
}

/// Check that `credential` belongs to some joined host that is not revoked (endpoints shared
/// by all agents, such as image downloads).
pub fn authenticate_any_host(
    ctl: &Controller,
    credential: &str,
) -> std::result::Result<(), HostAuthError> {
    let given = credential_hash(credential);
    let hosts = db::hosts(ctl.db().conn())?;
    match hosts.iter().find(|h| h.credential_sha256 == given) {
        Some(h) if h.revoked => Err(HostAuthError::Revoked(h.name.clone())),
        Some(_) => Ok(()),
        None => Err(HostAuthError::NoSuchCredential),
    }
}

/// Drain (or undrain) host `name`: no new placements while draining; its VMs stay (evacuation
/// comes with migration). Returns the host.
pub fn set_draining(ctl: &Controller, name: &str, draining: bool) -> Result<tuchka_api::Host> {
    let h = ctl.db().atomic(|c| {
        let h = db::host(c, name)?.ok_or_else(|| Error::NotFound {
            kind: "host",
            cli: "host",
            name: name.to_string(),
        })?;
        db::set_draining(c, &h.id, draining)?;
        Ok::<_, Error>(h)
    })?;
    let what = if draining {
        "draining: no new placements"
    } else {
        "accepting placements again"
    };
    ctl.emit(
        "host.draining",
        &format!("host/{}", h.name),
        format!("host {} {what}", h.name),
    );
    crate::service::get_host(ctl, &h.id)
}

/// Revoke host `name` (or id): its agent's credential is refused from now on and the host is
/// shown `revoked`. Its VMs stay where they are. Returns the host.
pub fn revoke_host(ctl: &Controller, name: &str) -> Result<tuchka_api::Host> {
    let not_found = || Error::NotFound {
        kind: "host",
        cli: "host",
        name: name.to_string(),
    };
    let h = ctl.db().atomic(|c| {
        let h = db::host(c, name)?.ok_or_else(not_found)?;
        db::revoke_host(c, &h.id)?;
        Ok::<_, Error>(h)
    })?;
    ctl.emit(
        "host.revoked",
        &format!("host/{}", h.name),
        format!("host {} revoked: its agent's credential is refused", h.name),
    );
    // Wake its long poll so the agent hears the refusal now.
    ctl.bump();
    crate::service::get_host(ctl, &h.id)
}

/// Everything host `host_id` must converge to.
pub fn desired_for(ctl: &Controller, host_id: &str, generation: u64) -> Result<HostDesired> {
    let db = ctl.db();
    let c = db.conn();
    if db::host(c, host_id)?.is_none() {
        return Err(Error::NotFound {
            kind: "host",
            cli: "host",
            name: host_id.into(),
        });
    }
    build_desired(c, ctl.cloud_id(), host_id, generation)
}

fn build_desired(
    c: &Connection,
    cloud_id: &str,
    host_id: &str,
    generation: u64,
) -> Result<HostDesired> {
    let all_vms = db::vms(c)?;
    let live: Vec<&db::VmRow> = all_vms.iter().filter(|v| !v.deleting).collect();
    let names_by_id: HashMap<&str, &str> = live
        .iter()
        .map(|v| (v.id.as_str(), v.name.as_str()))
        .collect();
    let nics = db::nics(c)?;
    let networks: HashMap<String, db::NetworkRow> = db::networks(c)?
        .into_iter()
        .filter(|n| !n.deleting)
        .map(|n| (n.name.clone(), n))
        .collect();
    let images: HashMap<String, db::ImageRow> = db::images(c)?
        .into_iter()
        .map(|i| (i.sha256.clone(), i))
        .collect();

    let mut vms = vec![];
    let mut nets_here: HashSet<String> = networks
        .values()
        .filter(|n| n.gateway_host.as_deref() == Some(host_id))
        .map(|n| n.name.clone())
        .collect();
    for v in live.iter().filter(|v| v.host_id == host_id) {
        let Some(g) = db::group(c, &v.group)? else {
            continue;
        };
        let Some(img) = images.get(&g.image_sha256) else {
            continue;
        };
        let mut vm_nics = vec![];
        for n in nics.iter().filter(|n| n.vm_id == v.id) {
            let Some(net) = networks.get(&n.network) else {
                continue;
            };
            nets_here.insert(net.name.clone());
            vm_nics.push(NicDesired {
                network: net.name.clone(),
                bridge: names::bridge_name(net.vni),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
                tap: names::tap_name(&n.mac),
            });
        }
        vms.push(VmDesired {
            id: v.id.clone(),
            name: v.name.clone(),
            domain: names::domain_name(cloud_id, &v.name),
            power: v.desired,
            cpus: g.cpus,
            memory_mib: g.memory_mib,
            disk_mib: g.disk_mib,
            image_sha256: img.sha256.clone(),
            image_file_sha256: img.file_sha256.clone(),
            nics: vm_nics,
            user_data: g.user_data.clone(),
            ssh_keys: g.ssh_keys.clone(),
            // Only a pending request: an agent that restarted must not reboot again.
            reboot_seq: if v.reboot_seq > v.reboot_done {
                v.reboot_seq
            } else {
                0
            },
            force_stop: v.force_stop,
            stop_timeout_s: v.stop_timeout_s,
        });
    }
    let rules = db::rules(c)?;
    let forwards = db::forwards(c)?;
    let all_networks = db::networks(c)?;
    let addresses: HashMap<String, String> = db::hosts(c)?
        .into_iter()
        .map(|h| (h.id, h.facts.address))
        .collect();
    let nic_hosts: Vec<(String, String)> = {
        let host_of: HashMap<&str, &str> = live
            .iter()
            .map(|v| (v.id.as_str(), v.host_id.as_str()))
            .collect();
        nics.iter()
            .filter_map(|n| {
                host_of
                    .get(n.vm_id.as_str())
                    .map(|h| (n.network.clone(), h.to_string()))
            })
            .collect()
    };
    let mut out_nets: Vec<NetworkDesired> = nets_here
        .iter()
        .filter_map(|name| networks.get(name))
        .map(|n| {
            let mut hosts: Vec<DhcpHost> = nics
                .iter()
                .filter(|x| x.network == n.name)
                .filter_map(|x| {
                    names_by_id.get(x.vm_id.as_str()).map(|vm| DhcpHost {
                        mac: x.mac.clone(),
                        ip: x.ip.clone(),
                        name: vm.to_string(),
                    })
                })
                .collect();
            hosts.sort();
            let gateway_here = n.gateway_host.as_deref() == Some(host_id);
            let r = crate::netrules::resolve(
                &n.name,
                &rules,
                &forwards,
                &nics,
                &all_vms,
                &all_networks,
            );
            NetworkDesired {
                name: n.name.clone(),
                vni: n.vni,
                bridge: names::bridge_name(n.vni),
                cidr: n.cidr.clone(),
                gateway: crate::service::gateway_of(n),
                gateway_here,
                mtu: TENANT_MTU,
                hosts,
                nat: n.nat,
                ingress: r.ingress,
                egress: r.egress,
                forwards: if gateway_here { r.forwards } else { vec![] },
                vxlan: vxlan_for(host_id, n, &nic_hosts, &addresses),
            }
        })
        .collect();
    out_nets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut image_list: Vec<String> = images.into_keys().collect();
    image_list.sort();
    Ok(HostDesired {
        generation,
        cloud_id: cloud_id.to_string(),
        vms,
        networks: out_nets,
        images: image_list,
    })
}

/// The VXLAN segment of network `n` seen from `host_id`: every other host that has a VM on it or
/// is its gateway is a peer. None when this host has no underlay address or no peer.
fn vxlan_for(
    host_id: &str,
    n: &db::NetworkRow,
    nic_hosts: &[(String, String)],
    addresses: &HashMap<String, String>,
) -> Option<VxlanDesired> {
    let local = addresses.get(host_id).filter(|a| !a.is_empty())?.clone();
    let mut hosts: HashSet<&str> = nic_hosts
        .iter()
        .filter(|(net, _)| *net == n.name)
        .map(|(_, h)| h.as_str())
        .collect();
    if let Some(g) = &n.gateway_host {
        hosts.insert(g);
    }
    let mut peers: Vec<String> = hosts
        .into_iter()
        .filter(|h| *h != host_id)
        .filter_map(|h| addresses.get(h).filter(|a| !a.is_empty()).cloned())
        .collect();
    peers.sort();
    peers.dedup();
    (!peers.is_empty()).then_some(VxlanDesired {
        local,
        port: VXLAN_PORT,
        peers,
    })
}

/// UDP port of VXLAN between hosts.
pub const VXLAN_PORT: u16 = 4789;

/// Record what a host observed, then move operations on.
pub fn apply_report(ctl: &Controller, host_id: &str, report: HostReport) -> Result<()> {
    let mut changes: Vec<(String, String)> = vec![];
    let mut deleted_any = false;
    ctl.db().atomic(|c| {
        db::host(c, host_id)?.ok_or_else(|| Error::NotFound {
            kind: "host",
            cli: "host",
            name: host_id.into(),
        })?;
        db::touch_host(c, host_id, &report.facts, &report.cached_images)?;
        let seen: HashMap<&str, &tuchka_api::agent::VmObserved> =
            report.vms.iter().map(|v| (v.id.as_str(), v)).collect();
        for mut v in db::host_vms(c, host_id)? {
            match seen.get(v.id.as_str()) {
                None if v.deleting => {
                    db::delete_vm(c, &v.id)?;
                    changes.push((v.name.clone(), "removed".into()));
                    deleted_any = true;
                }
                None => {}
                Some(o) => {
                    let before = (v.observed, v.error.clone());
                    v.observed = o.state;
                    v.error = if o.state == VmState::Error {
                        o.error.clone()
                    } else {
                        None
                    };
                    v.reboot_done = v.reboot_done.max(o.reboot_seq);
                    if before != (v.observed, v.error.clone()) {
                        changes.push((v.name.clone(), v.observed.as_str().to_string()));
                    }
                    db::update_vm(c, &v)?;
                }
            }
        }
        let rows: Vec<HostNetworkRow> = report
            .networks
            .iter()
            .map(|n| HostNetworkRow {
                host_id: host_id.into(),
                network: n.name.clone(),
                ready: n.ready,
                error: n.error.clone(),
            })
            .collect();
        db::set_host_networks(c, host_id, &rows)?;
        for n in &report.networks {
            let Some(mut row) = db::network(c, &n.name)? else {
                continue;
            };
            if row.gateway_host.as_deref() != Some(host_id) || row.deleting {
                continue;
            }
            let (state, error) = match (&n.error, n.ready) {
                (Some(e), _) => ("error", Some(e.clone())),
                (None, true) => ("ready", None),
                (None, false) => ("creating", None),
            };
            if row.state != state || row.error != error {
                row.state = state.into();
                row.error = error;
                db::update_network(c, &row)?;
                changes.push((format!("network {}", row.name), state.into()));
            }
        }
        Ok::<_, Error>(())
    })?;
    for (object, state) in changes {
        ctl.emit("state", &object, format!("{object}: {state}"));
    }
    if deleted_any {
        ctl.bump();
    }
    crate::ops::progress(ctl);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(gateway: &str) -> db::NetworkRow {
        db::NetworkRow {
            name: "app".into(),
            cidr: "10.91.0.0/24".into(),
            vni: 5000,
            gateway_host: Some(gateway.into()),
            state: "ready".into(),
            error: None,
            deleting: false,
            created_at: String::new(),
            nat: false,
            gateway: None,
        }
    }

    #[test]
    fn vxlan_peers_are_the_other_hosts_of_the_network() {
        let addrs: HashMap<String, String> = [
            ("h1", "10.250.0.11"),
            ("h2", "10.250.0.12"),
            ("h3", "10.250.0.13"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let nics = vec![
            ("app".to_string(), "h2".to_string()),
            ("app".to_string(), "h2".to_string()),
            ("db".to_string(), "h3".to_string()),
        ];
        let v = vxlan_for("h2", &net("h1"), &nics, &addrs).expect("h2 has a peer: the gateway h1");
        assert_eq!(v.local, "10.250.0.12");
        assert_eq!(v.peers, vec!["10.250.0.11"]);
        assert_eq!(v.port, 4789);
        let v = vxlan_for("h1", &net("h1"), &nics, &addrs).expect("h1 sees h2");
        assert_eq!(v.peers, vec!["10.250.0.12"]);
        assert_eq!(
            vxlan_for("h3", &net("h3"), &[], &addrs),
            None,
            "alone on the network: no VXLAN"
        );
        let mut no_addr = addrs.clone();
        no_addr.insert("h2".into(), String::new());
        assert_eq!(
            vxlan_for("h2", &net("h1"), &nics, &no_addr),
            None,
            "a single-host cloud has no underlay address"
        );
    }

    fn facts() -> tuchka_api::agent::HostFacts {
        tuchka_api::agent::HostFacts::default()
    }

    #[test]
    fn tcp_agents_need_the_join_token_then_their_credential_until_revoked() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl =
            Controller::open(crate::ControllerConfig::new(tmp.path().to_path_buf())).expect("open");
        let req = |token: &str| HostRegister {
            name: "edge-1".into(),
            join_token: token.into(),
            facts: facts(),
        };
        let err = register(&ctl, req("wrong"), false).expect_err("wrong token");
        assert_eq!(err.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("join token refused"), "{err}");
        let token = ctl.join_info().token;
        let reg = register(&ctl, req(&token), false).expect("join");
        authenticate_host(&ctl, &reg.host_id, &reg.credential).expect("own credential");
        authenticate_any_host(&ctl, &reg.credential).expect("images");
        assert!(matches!(
            authenticate_host(&ctl, &reg.host_id, "nope"),
            Err(HostAuthError::WrongCredential(_))
        ));
        assert!(authenticate_any_host(&ctl, "nope").is_err());
        assert!(matches!(
            authenticate_host(&ctl, "no-such-id", &reg.credential),
            Err(HostAuthError::UnknownHost(_))
        ));

        let host = revoke_host(&ctl, "edge-1").expect("revoke");
        assert_eq!(host.state, "revoked");
        assert!(matches!(
            authenticate_host(&ctl, &reg.host_id, &reg.credential),
            Err(HostAuthError::Revoked(_))
        ));
        assert!(matches!(
            authenticate_any_host(&ctl, &reg.credential),
            Err(HostAuthError::Revoked(_))
        ));
        assert!(revoke_host(&ctl, "nope").is_err());

        // A new join (with the token) admits it again, under the same id, with a new credential.
        let again = register(&ctl, req(&token), false).expect("rejoin");
        assert_eq!(again.host_id, reg.host_id);
        authenticate_host(&ctl, &again.host_id, &again.credential).expect("new credential");
        assert!(authenticate_host(&ctl, &reg.host_id, &reg.credential).is_err());
        // The unix socket is trusted without a token.
        let local = HostRegister {
            name: "local-1".into(),
            join_token: String::new(),
            facts: facts(),
        };
        register(&ctl, local, true).expect("trusted");
    }

    #[test]
    fn credential_hash_is_stable_hex() {
        assert_eq!(credential_hash("x").len(), 64);
        assert_eq!(credential_hash("x"), credential_hash("x"));
        assert_ne!(credential_hash("x"), credential_hash("y"));
    }
}
