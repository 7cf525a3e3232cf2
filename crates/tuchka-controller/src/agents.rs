//! The agent side of the controller: registration, authentication, and applying what a host
//! reports. (What a host must converge to is [`crate::desired`].)
//!
//! Trust: an agent on the unix socket is trusted. Over TCP, a first registration needs the join
//! token; it answers a fresh per-host credential, whose sha256 is stored, and every other agent
//! call must carry it ([`authenticate_host`]). An agent keeps its identity (host id and
//! credential) in its data directory and registers again with it — also under a new name — so a
//! renamed host is the same host with the same VMs. [`crate::hosts::revoke`] makes a host's
//! credential refused for good; only a new registration with a join token admits it again.

use std::collections::HashMap;

use tuchka_api::agent::{HostRegister, HostRegistered, HostReport, MigrationObserved, VmObserved};
use tuchka_api::{NetworkState, VmState};
use tuchka_core::digest::{constant_time_eq, sha256_hex};
use tuchka_core::migration::Side;
use tuchka_store::{self as db, HostNetworkRow, StoreError};

use crate::error::{Error, Result};
use crate::state::Controller;

/// sha256 hex of a credential.
pub fn credential_hash(credential: &str) -> String {
    sha256_hex(credential.as_bytes())
}

fn new_credential() -> String {
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut secret);
    hex::encode(secret)
}

/// Register (or re-register) a host; returns its id and credential. A host that presents the
/// identity it was given registers again as itself (with a new name if it was renamed) and keeps
/// its credential; otherwise untrusted (TCP) callers must present the current join token and get
/// a fresh credential (a name that exists is taken over, as before identities were kept).
pub fn register(ctl: &Controller, req: HostRegister, trusted: bool) -> Result<HostRegistered> {
    tuchka_core::names::validate_name("host", &req.name)
        .map_err(|_| Error::bad_name("host", &req.name))?;
    let known = match &req.identity {
        Some(i) => {
            let h = db::host(ctl.db().conn(), &i.host_id)?;
            h.filter(|h| {
                h.id == i.host_id
                    && !h.revoked
                    && constant_time_eq(
                        credential_hash(&i.credential).as_bytes(),
                        h.credential_sha256.as_bytes(),
                    )
            })
            .map(|h| (h, i.credential.clone()))
        }
        None => None,
    };
    if known.is_none() && !trusted && !ctl.join_token_matches(&req.join_token)? {
        return Err(Error::Unauthorized(format!(
            "join token refused for host {:?}: use the current one (on the controller: tuchka host join-token)",
            req.name
        )));
    }
    let (id, credential, renamed) = ctl.db().atomic(|c| {
        let (id, credential, renamed) = match &known {
            Some((h, credential)) => {
                let mut renamed = None;
                if h.name != req.name {
                    if let Some(other) = db::host(c, &req.name)? {
                        if other.id != h.id {
                            return Err(Error::conflict(
                                "HostNameTaken",
                                format!(
                                    "host {} cannot be renamed to {:?}: another host has that name",
                                    h.name, req.name
                                ),
                            ));
                        }
                    }
                    db::rename_host(c, &h.id, &req.name)?;
                    renamed = Some(h.name.clone());
                }
                (h.id.clone(), credential.clone(), renamed)
            }
            None => {
                let credential = new_credential();
                let id = db::upsert_host(
                    c,
                    &uuid::Uuid::new_v4().to_string(),
                    &req.name,
                    &credential_hash(&credential),
                    &req.facts,
                )?;
                (id, credential, None)
            }
        };
        db::touch_host(c, &id, &req.facts, &[], &[])?;
        Ok::<_, Error>((id, credential, renamed))
    })?;
    let what = match &renamed {
        Some(old) => format!(
            "host {} registered again (was {old}: same host, same VMs)",
            req.name
        ),
        None => format!("host {} registered ({})", req.name, req.facts.accel),
    };
    ctl.emit("host.registered", &format!("host/{}", req.name), what);
    ctl.bump();
    let (certificate_pem, ca_pem) = match &req.csr_pem {
        Some(csr) => match crate::tls::sign_host_csr(ctl, &id, csr) {
            Ok(Some((cert, ca))) => (Some(cert), Some(ca)),
            Ok(None) => (None, None),
            Err(e) => {
                return Err(Error::invalid(
                    "InvalidCsr",
                    format!(
                        "cannot issue the migration channel certificate of host {:?}: {e}",
                        req.name
                    ),
                ))
            }
        },
        None => (None, None),
    };
    Ok(HostRegistered {
        host_id: id,
        credential,
        cloud_id: ctl.cloud_id().to_string(),
        certificate_pem,
        ca_pem,
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
    if !constant_time_eq(
        credential_hash(credential).as_bytes(),
        h.credential_sha256.as_bytes(),
    ) {
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
    match hosts
        .iter()
        .find(|h| constant_time_eq(h.credential_sha256.as_bytes(), given.as_bytes()))
    {
        Some(h) if h.revoked => Err(HostAuthError::Revoked(h.name.clone())),
        Some(_) => Ok(()),
        None => Err(HostAuthError::NoSuchCredential),
    }
}

/// What a host's report says about one VM, for its migration.
fn side_of(seen: Option<&&VmObserved>, migration_id: &str) -> Side {
    Side {
        up: true,
        reported: seen.is_some(),
        domain: seen.is_some_and(|o| o.domain),
        migration: seen
            .and_then(|o| o.migration.clone())
            .filter(|m: &MigrationObserved| m.id == migration_id),
    }
}

/// Record what a host observed. The caller moves operations on afterwards.
pub fn apply_report(ctl: &Controller, host_id: &str, report: HostReport) -> Result<()> {
    let mut changes: Vec<(String, String)> = vec![];
    let mut deleted_any = false;
    ctl.db().atomic(|c| {
        let host_name = db::host(c, host_id)?
            .ok_or_else(|| Error::not_found("host", "host", host_id))?
            .name;
        db::touch_host(
            c,
            host_id,
            &report.facts,
            &report.cached_images,
            &report.orphans,
        )?;
        let seen: HashMap<&str, &VmObserved> =
            report.vms.iter().map(|v| (v.id.as_str(), v)).collect();
        let migrations = db::active_migrations(c)?;
        // The groups of the VMs kept here and of those on their way here: their images are in
        // use on this host (for its image cache).
        let mut here: Vec<String> = vec![];
        for m in migrations.iter().filter(|m| m.target_host == host_id) {
            if let Some(v) = db::vm_by_id(c, &m.vm_id)? {
                here.push(v.group);
            }
        }
        for mut v in db::host_vms(c, host_id)? {
            let migrating = migrations.iter().any(|m| m.vm_id == v.id);
            // (a VM whose removal this report confirms uses nothing here any more)
            if !v.deleting || seen.contains_key(v.id.as_str()) {
                here.push(v.group.clone());
            }
            match seen.get(v.id.as_str()) {
                None if v.deleting => {
                    crate::volumes::release_vm(c, &v.id)?;
                    db::delete_vm(c, &v.id)?;
                    changes.push((v.name.clone(), "removed".into()));
                    deleted_any = true;
                }
                None => {}
                // Its domain has left for the target: the source's view says nothing now.
                Some(o) if migrating && !o.domain => {}
                Some(o) => {
                    let before = (v.observed, v.error.clone());
                    v.observed = o.state;
                    if o.state == VmState::Error {
                        v.error = o.error.clone();
                        v.error_chain = o.error_chain.clone();
                    } else {
                        v.error = None;
                        v.error_chain.clear();
                    }
                    v.reboot_done = v.reboot_done.max(o.reboot_seq);
                    v.cpu_usage = o.cpu_usage;
                    let paused_before = v.extra.pause_reason.clone();
                    let x = &mut v.extra;
                    x.resume_done = x.resume_done.max(o.resume_seq);
                    x.pause_reason = o
                        .pause_reason
                        .as_ref()
                        .map(|why| format!("disk full on host {host_name}: {why}"));
                    x.running_with = o.running_with;
                    x.powered_off |= o.powered_off;
                    if o.console_tail.is_some() {
                        x.console_tail = o.console_tail.clone();
                    }
                    x.resize_error = o.resize_error.clone();
                    if let (None, Some(why)) = (&paused_before, &v.extra.pause_reason) {
                        changes.push((v.name.clone(), format!("paused: {why}")));
                    } else if before != (v.observed, v.error.clone()) {
                        changes.push((v.name.clone(), v.observed.as_str().to_string()));
                    }
                    db::update_vm(c, &v)?;
                }
            }
        }
        for r in db::removals(c)?
            .into_iter()
            .filter(|r| r.host_id == host_id)
        {
            if !seen.contains_key(r.vm_id.as_str()) {
                db::delete_removal(c, &r.vm_id, host_id)?;
                changes.push((
                    r.name.clone(),
                    format!("removed from this host ({})", r.reason),
                ));
                deleted_any = true;
            }
        }
        for mut m in migrations {
            let mut touched = false;
            if m.source_host == host_id {
                m.source_obs = side_of(seen.get(m.vm_id.as_str()), &m.id);
                touched = true;
            }
            if m.target_host == host_id {
                m.target_obs = side_of(seen.get(m.vm_id.as_str()), &m.id);
                touched = true;
            }
            if touched {
                db::save_migration(c, &m)?;
            }
        }
        changes.extend(crate::volumes::apply_observed(c, host_id, &report.volumes)?);
        crate::captures::apply_observed(c, host_id, &report.captures)?;
        let in_use: std::collections::HashSet<String> = db::groups(c)?
            .into_iter()
            .filter(|g| here.contains(&g.name))
            .map(|g| g.image_sha256)
            .collect();
        db::touch_image_cache(c, host_id, &report.cached_images, &in_use, db::now_unix())?;
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
                (Some(e), _) => (NetworkState::Error, Some(e.clone())),
                (None, true) => (NetworkState::Ready, None),
                (None, false) => (NetworkState::Creating, None),
            };
            if row.state != state || row.error != error {
                row.state = state;
                row.error = error;
                db::update_network(c, &row)?;
                changes.push((format!("network {}", row.name), state.to_string()));
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::agent::HostIdentity;

    fn facts() -> tuchka_api::agent::HostFacts {
        tuchka_api::agent::HostFacts::default()
    }

    fn req(name: &str, token: &str, identity: Option<HostIdentity>) -> HostRegister {
        HostRegister {
            name: name.into(),
            join_token: token.into(),
            facts: facts(),
            identity,
            csr_pem: None,
        }
    }

    #[test]
    fn tcp_agents_need_the_join_token_then_their_credential_until_revoked() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl =
            Controller::open(crate::ControllerConfig::new(tmp.path().to_path_buf())).expect("open");
        let err = register(&ctl, req("edge-1", "wrong", None), false).expect_err("wrong token");
        assert_eq!(err.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("join token refused"), "{err}");
        let token = ctl.join_info().token;
        let reg = register(&ctl, req("edge-1", &token, None), false).expect("join");
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

        let host = crate::hosts::revoke(&ctl, "edge-1").expect("revoke");
        assert_eq!(host.state, tuchka_api::HostState::Revoked);
        assert!(matches!(
            authenticate_host(&ctl, &reg.host_id, &reg.credential),
            Err(HostAuthError::Revoked(_))
        ));
        assert!(matches!(
            authenticate_any_host(&ctl, &reg.credential),
            Err(HostAuthError::Revoked(_))
        ));
        assert!(crate::hosts::revoke(&ctl, "nope").is_err());

        // The revoked identity no longer registers without a token.
        let id = HostIdentity {
            host_id: reg.host_id.clone(),
            credential: reg.credential.clone(),
        };
        assert!(register(&ctl, req("edge-1", "", Some(id)), false).is_err());

        // A new join (with the token) admits it again, under the same id, with a new credential.
        let again = register(&ctl, req("edge-1", &token, None), false).expect("rejoin");
        assert_eq!(again.host_id, reg.host_id);
        authenticate_host(&ctl, &again.host_id, &again.credential).expect("new credential");
        assert!(authenticate_host(&ctl, &reg.host_id, &reg.credential).is_err());
        // The unix socket is trusted without a token.
        register(&ctl, req("local-1", "", None), true).expect("trusted");
    }

    #[test]
    fn a_host_with_its_identity_registers_again_as_itself_even_renamed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl =
            Controller::open(crate::ControllerConfig::new(tmp.path().to_path_buf())).expect("open");
        let token = ctl.join_info().token;
        let first = register(&ctl, req("edge-1", &token, None), false).expect("join");
        register(&ctl, req("edge-2", &token, None), false).expect("another host");
        let id = || HostIdentity {
            host_id: first.host_id.clone(),
            credential: first.credential.clone(),
        };
        // Renamed, no token needed: same id, same credential.
        let again = register(&ctl, req("edge-9", "", Some(id())), false).expect("renamed");
        assert_eq!(
            (again.host_id.as_str(), again.credential.as_str()),
            (first.host_id.as_str(), first.credential.as_str())
        );
        assert_eq!(
            crate::hosts::get(&ctl, &first.host_id).expect("host").name,
            "edge-9"
        );
        // A name another host has is refused, and changes nothing.
        let taken = register(&ctl, req("edge-2", "", Some(id())), false).expect_err("taken");
        assert!(
            taken.to_string().contains("another host has that name"),
            "{taken}"
        );
        assert_eq!(
            crate::hosts::get(&ctl, &first.host_id).expect("host").name,
            "edge-9"
        );
        // A wrong credential is no identity: without a token it is refused.
        let forged = HostIdentity {
            host_id: first.host_id.clone(),
            credential: "forged".into(),
        };
        assert!(register(&ctl, req("edge-9", "", Some(forged)), false).is_err());
    }

    #[test]
    fn credential_hash_is_stable_hex() {
        assert_eq!(credential_hash("x").len(), 64);
        assert_eq!(credential_hash("x"), credential_hash("x"));
        assert_ne!(credential_hash("x"), credential_hash("y"));
    }
}
