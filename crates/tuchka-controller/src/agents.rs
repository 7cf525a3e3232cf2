//! The agent side of the controller: registration, authentication, and applying what a host
//! reports. (What a host must converge to is [`crate::desired`].)
//!
//! Trust: a host is who its **identity** says (host id and credential, kept by the agent in
//! `<pool>/identity/` since its first join). It registers again with it — after a restart, or
//! under a new name (the same host with the same VMs) — and every other agent call carries the
//! credential ([`authenticate_host`]). Without a valid identity:
//! - over TCP, the agent needs a join token ([`check_join_token`]: not expired, not used up if
//!   single-use) and gets a new host, under a name no other host has (`409 HostNameTaken`
//!   otherwise: a name is never taken over). Two ways back for an existing host: a revoked
//!   host that still has its identity joins again with a token; a host that lost its identity
//!   joins with a token bound to it (`host join-token --host NAME`). Both keep the host's id
//!   and VMs and get a new credential.
//! - on the unix socket (the controller's own machine) no token is needed. With a local agent
//!   (`serve` without `--no-local-agent`) the socket is that agent's: it is the controller's
//!   own host (its id in meta row `local_host_id`), which may come back without its identity,
//!   but never another host, and agent calls there are for that host only. Without one, the
//!   socket admits new hosts (tests, benchmarks), but never under a name that exists.
//!
//! A refused registration changes nothing. [`crate::hosts::revoke`] makes a host's credential
//! refused until it joins again with a token; [`crate::hosts::remove`] forgets the host: its
//! identity is refused for good (`401 HostRemoved`), token or not.

use std::collections::HashMap;

use rusqlite::Connection;
use tuchka_api::agent::{
    HostIdentity, HostRegister, HostRegistered, HostReport, MigrationObserved, VmObserved,
};
use tuchka_api::{NetworkState, VmState, CODE_HOST_NAME_TAKEN, CODE_HOST_REMOVED};
use tuchka_core::digest::{constant_time_eq, sha256_hex};
use tuchka_core::migration::Side;
use tuchka_store::{self as db, HostNetworkRow, HostRow, JoinTokenRow, StoreError, VmRow};

use crate::error::{Error, Result};
use crate::state::{rfc3339, Controller};

/// Meta row: the id of the controller's own host (the agent on the unix socket).
pub const LOCAL_HOST_META: &str = "local_host_id";

/// sha256 hex of a credential.
pub fn credential_hash(credential: &str) -> String {
    sha256_hex(credential.as_bytes())
}

fn new_credential() -> String {
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut secret);
    hex::encode(secret)
}

/// What an identity an agent presented is worth.
#[derive(Debug)]
enum Claim {
    /// The host's own, and the host is admitted.
    Valid(HostRow),
    /// The host's own credential, but the host was revoked.
    Revoked(HostRow),
    /// The host was removed (`host rm`): refused for good.
    Removed(String),
    /// No host has this id, or the credential is not its.
    Refused(String),
}

fn claim(c: &Connection, i: &HostIdentity) -> Result<Claim> {
    if let Some(name) = db::removed_host(c, &i.host_id)? {
        return Ok(Claim::Removed(name));
    }
    let Some(h) = db::host(c, &i.host_id)?.filter(|h| h.id == i.host_id) else {
        return Ok(Claim::Refused(format!(
            "the identity of host id {} is unknown here (was the controller's state reset?)",
            i.host_id
        )));
    };
    if !constant_time_eq(
        credential_hash(&i.credential).as_bytes(),
        h.credential_sha256.as_bytes(),
    ) {
        return Ok(Claim::Refused(format!(
            "the credential this agent keeps for host {} is not that host's",
            h.name
        )));
    }
    Ok(if h.revoked {
        Claim::Revoked(h)
    } else {
        Claim::Valid(h)
    })
}

fn name_taken(name: &str, how: &str) -> Error {
    Error::conflict(
        CODE_HOST_NAME_TAKEN,
        format!(
            "host name {name:?} is taken by another host: {how}; start this machine with another --host-name, \
             or, if it is that host and lost its identity (<pool>/identity/), join it with a token for it \
             (on the controller: tuchka host join-token --host {name})"
        ),
    )
}

fn removed_refusal(name: &str) -> Error {
    Error::Refused {
        code: CODE_HOST_REMOVED,
        message: format!(
            "host {name:?} was removed from this cloud (tuchka host rm): its identity is refused, with or without a join token; \
             to join this machine again as a new host, delete <pool>/identity/ on it and start the agent with a new join token"
        ),
        chain: vec![],
    }
}

/// Rename host `h` to `name` unless another host has that name.
fn rename(c: &Connection, h: &HostRow, name: &str) -> Result<Option<String>> {
    if h.name == name {
        return Ok(None);
    }
    if let Some(other) = db::host(c, name)? {
        if other.id != h.id {
            return Err(Error::conflict(
                CODE_HOST_NAME_TAKEN,
                format!(
                    "host {} cannot be renamed to {name:?}: another host has that name",
                    h.name
                ),
            ));
        }
    }
    db::rename_host(c, &h.id, name)?;
    Ok(Some(h.name.clone()))
}

/// Check a join token presented by host `name`: it must exist, not have expired, and not be
/// used up (single-use). `why_no_identity` says why the agent's identity did not do (kept in
/// the refusal's chain).
pub fn check_join_token(
    c: &Connection,
    token: &str,
    name: &str,
    now_unix: i64,
    why_no_identity: Option<&str>,
) -> Result<JoinTokenRow> {
    let chain: Vec<String> = why_no_identity.map(String::from).into_iter().collect();
    let refuse = |code: &'static str, why: String| Error::Refused {
        code,
        message: format!("join token refused for host {name:?}: {why}"),
        chain: chain.clone(),
    };
    let row = if token.is_empty() {
        None
    } else {
        db::join_token_by_sha(c, &sha256_hex(token.as_bytes()))?
    };
    let Some(row) = row else {
        return Err(refuse(
            "Unauthorized",
            "it is not a join token of this cloud (rotated away, or mistyped): make one on the controller: tuchka host join-token".into(),
        ));
    };
    if row.expires_unix <= now_unix {
        return Err(refuse(
            "JoinTokenExpired",
            format!(
                "it expired at {}: make a new one on the controller: tuchka host join-token [--ttl 1h]",
                rfc3339(row.expires_unix)
            ),
        ));
    }
    if let (true, Some(at)) = (row.single_use, row.used_unix) {
        return Err(refuse(
            "JoinTokenUsed",
            format!(
                "it was single-use and host {} used it at {}: make a new one on the controller: tuchka host join-token --single-use",
                row.used_by.as_deref().unwrap_or("?"),
                rfc3339(at)
            ),
        ));
    }
    Ok(row)
}

/// Register (or re-register) a host; returns its id and credential. See the module docs for
/// who is admitted as which host. `trusted`: it came on the unix socket.
pub fn register(ctl: &Controller, req: HostRegister, trusted: bool) -> Result<HostRegistered> {
    tuchka_core::names::validate_name("host", &req.name)
        .map_err(|_| Error::bad_name("host", &req.name))?;
    // With a local agent (`serve` without `--no-local-agent`) the unix socket is that agent's:
    // it admits the controller's own host only.
    let bound = ctl.config().local_pool.is_some();
    let (id, credential, what, others_must_know) = ctl.db().atomic(|c| {
        let presented = match &req.identity {
            Some(i) => Some(claim(c, i)?),
            None => None,
        };
        let local = db::meta_get(c, LOCAL_HOST_META)?
            .map(|id| db::host(c, &id))
            .transpose()?
            .flatten();
        let (h, credential, renamed) = match presented {
            Some(Claim::Removed(name)) => return Err(removed_refusal(&name)),
            Some(Claim::Valid(h)) => {
                if trusted && bound {
                    if let Some(l) = local.as_ref().filter(|l| l.id != h.id) {
                        return Err(Error::conflict(
                            "NotLocalHost",
                            format!(
                                "the unix socket admits only the controller's own host ({}), not host {}: join other hosts over TCP",
                                l.name, h.name
                            ),
                        ));
                    }
                    db::meta_set(c, LOCAL_HOST_META, &h.id)?;
                }
                let renamed = rename(c, &h, &req.name)?;
                let credential = req
                    .identity
                    .as_ref()
                    .map(|i| i.credential.clone())
                    .unwrap_or_default();
                (h, credential, renamed)
            }
            other if trusted => {
                // The controller's own machine: its host, or (the first time) a new one.
                let credential = new_credential();
                match local.filter(|_| bound) {
                    Some(l) => {
                        let renamed = rename(c, &l, &req.name)?;
                        db::set_host_credential(c, &l.id, &credential_hash(&credential))?;
                        (l, credential, renamed)
                    }
                    None => {
                        if db::host(c, &req.name)?.is_some() {
                            let why = match other {
                                Some(Claim::Refused(w)) => w,
                                _ => "it joined over TCP; the unix socket admits only the controller's own host".into(),
                            };
                            return Err(name_taken(&req.name, &why));
                        }
                        let h = new_host(c, &req, &credential)?;
                        if bound {
                            db::meta_set(c, LOCAL_HOST_META, &h.id)?;
                        }
                        (h, credential, None)
                    }
                }
            }
            other => {
                let why = match &other {
                    Some(Claim::Revoked(h)) => Some(format!(
                        "host {} was revoked (tuchka host revoke): it joins again only with a join token",
                        h.name
                    )),
                    Some(Claim::Refused(w)) => Some(w.clone()),
                    _ => None,
                };
                let token =
                    check_join_token(c, &req.join_token, &req.name, db::now_unix(), why.as_deref())?;
                let again = match (&token.host_id, other) {
                    (Some(made_for), _) => Some(db::host(c, made_for)?.ok_or_else(|| {
                        Error::Refused {
                            code: "Unauthorized",
                            message: format!(
                                "join token refused for host {:?}: the host it was made for is gone",
                                req.name
                            ),
                            chain: vec![],
                        }
                    })?),
                    (None, Some(Claim::Revoked(h))) => Some(h),
                    (None, _) => None,
                };
                let credential = new_credential();
                let (h, renamed) = match again {
                    Some(h) => {
                        let renamed = rename(c, &h, &req.name)?;
                        db::set_host_credential(c, &h.id, &credential_hash(&credential))?;
                        (h, renamed)
                    }
                    None => {
                        if db::host(c, &req.name)?.is_some() {
                            return Err(name_taken(
                                &req.name,
                                why.as_deref()
                                    .unwrap_or("this agent has no identity of it (a new machine, or a second agent started with the same --host-name)"),
                            ));
                        }
                        (new_host(c, &req, &credential)?, None)
                    }
                };
                if token.single_use && !db::use_join_token(c, &token.id, db::now_unix(), &req.name)? {
                    return Err(Error::Refused {
                        code: "JoinTokenUsed",
                        message: format!(
                            "join token refused for host {:?}: it was single-use and another host used it just now",
                            req.name
                        ),
                        chain: vec![],
                    });
                }
                (h, credential, renamed)
            }
        };
        // A host never seen before is in nobody's desired state yet but the peer lists, which
        // every agent refreshes at its next long poll: no wake-up of all agents for it (1,000
        // hosts joining would otherwise make 1,000 fan-outs of 1,000 desired states).
        let others_must_know = h.last_seen_unix > 0;
        db::touch_host(c, &h.id, &req.facts, &[], &[])?;
        let what = match &renamed {
            Some(old) => format!(
                "host {} registered again (was {old}: same host, same VMs)",
                req.name
            ),
            None => format!("host {} registered ({})", req.name, req.facts.accel),
        };
        Ok::<_, Error>((h.id, credential, what, others_must_know))
    })?;
    ctl.emit("host.registered", &format!("host/{}", req.name), what);
    if others_must_know {
        ctl.bump();
    }
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

fn new_host(c: &Connection, req: &HostRegister, credential: &str) -> Result<HostRow> {
    let id = uuid::Uuid::new_v4().to_string();
    db::insert_host(c, &id, &req.name, &credential_hash(credential), &req.facts)?;
    db::host(c, &id)?.ok_or_else(|| Error::not_found("host", "host", &id))
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
    /// The host was removed (`host rm`): its identity is refused for good.
    #[error("host {0:?} was removed from this cloud (tuchka host rm): its credential is refused for good; to join this machine again as a new host, delete <pool>/identity/ on it and start the agent with a new join token")]
    Removed(String),
    /// The credential is not the host's.
    #[error(
        "credential of host {0:?} refused: it is not the one the controller has for that host"
    )]
    WrongCredential(String),
    /// On the unix socket, an agent call for a host that is not the controller's own.
    #[error(
        "the unix socket serves only the agent of the controller's own host ({0}), not host id {1}"
    )]
    NotLocal(String, String),
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
    let db = ctl.db();
    if let Some(name) = db::removed_host(db.conn(), host_id)? {
        return Err(HostAuthError::Removed(name));
    }
    let h = db::host(db.conn(), host_id)?
        .ok_or_else(|| HostAuthError::UnknownHost(host_id.to_string()))?;
    drop(db);
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

/// On the unix socket: agent calls are for the controller's own host only (once it has one).
pub fn authenticate_local(
    ctl: &Controller,
    host_id: &str,
) -> std::result::Result<(), HostAuthError> {
    if ctl.config().local_pool.is_none() {
        return Ok(());
    }
    let db = ctl.db();
    match db::meta_get(db.conn(), LOCAL_HOST_META)? {
        Some(local) if local != host_id => {
            let name = db::host(db.conn(), &local)?
                .map(|h| h.name)
                .unwrap_or(local);
            Err(HostAuthError::NotLocal(name, host_id.to_string()))
        }
        _ => Ok(()),
    }
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

/// How far a VM's reported CPU use may drift from the stored figure before it is written
/// (cores): the balancer and the views need no finer figure, and an idle guest's jitter would
/// otherwise make every report a write.
const CPU_USAGE_STEP: f64 = 0.02;

/// Whether the VM row `after` (from a report) differs from the `stored` one enough to write:
/// anything but the CPU use, or the CPU use by a step or more (or to or from zero).
fn worth_writing(stored: &VmRow, after: &VmRow) -> bool {
    let cpu_moved = (stored.cpu_usage - after.cpu_usage).abs() >= CPU_USAGE_STEP
        || ((stored.cpu_usage == 0.0) != (after.cpu_usage == 0.0));
    cpu_moved
        || stored
            != &VmRow {
                cpu_usage: stored.cpu_usage,
                ..after.clone()
            }
}

/// Record what a host observed; true if it changed anything but the host's heartbeat (then
/// the caller moves operations on).
pub fn apply_report(ctl: &Controller, host_id: &str, report: HostReport) -> Result<bool> {
    let mut changes: Vec<(String, String)> = vec![];
    let mut deleted_any = false;
    let changed = ctl.db().atomic_announced(|c| {
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
        // A report that only says "alive, as before" wakes no operation's long poll.
        let heartbeat_only = c.total_changes();
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
                    let stored = v.clone();
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
                    // Most reports confirm what is stored: only a change is written.
                    if worth_writing(&stored, &v) {
                        db::update_vm(c, &v)?;
                    }
                }
            }
        }
        for r in db::host_removals(c, host_id)? {
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
        here.sort();
        here.dedup();
        let mut in_use = std::collections::HashSet::new();
        for name in &here {
            if let Some(g) = db::group(c, name)? {
                in_use.insert(g.image_sha256);
            }
        }
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
        if db::host_networks(c, host_id)? != rows {
            db::set_host_networks(c, host_id, &rows)?;
        }
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
        let changed = c.total_changes() != heartbeat_only;
        Ok::<_, Error>((changed, changed))
    })?;
    for (object, state) in changes {
        ctl.emit("state", &object, format!("{object}: {state}"));
    }
    if deleted_any {
        ctl.bump();
    }
    Ok(changed)
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
        assert!(register(&ctl, req("edge-1", "", Some(id.clone())), false).is_err());
        // Nor does the token alone take the name over.
        let e = register(&ctl, req("edge-1", &token, None), false).expect_err("taken");
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN, "{e}");

        // Its identity and a join token admit it again, under the same id, with a new credential.
        let again = register(&ctl, req("edge-1", &token, Some(id)), false).expect("rejoin");
        assert_eq!(again.host_id, reg.host_id);
        authenticate_host(&ctl, &again.host_id, &again.credential).expect("new credential");
        assert!(authenticate_host(&ctl, &reg.host_id, &reg.credential).is_err());
        // Without a local agent the unix socket admits new hosts without a token.
        register(&ctl, req("local-1", "", None), true).expect("trusted");
        let e =
            register(&ctl, req("edge-1", "", None), true).expect_err("not over the socket either");
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN, "{e}");
    }

    fn ctl(tmp: &tempfile::TempDir) -> Controller {
        Controller::open(crate::ControllerConfig::new(tmp.path().to_path_buf())).expect("open")
    }

    fn token(ctl: &Controller, ttl_s: u64, single_use: bool, host: Option<&str>) -> String {
        ctl.create_join_token(&tuchka_api::JoinTokenCreate {
            ttl_s: Some(ttl_s),
            single_use,
            rotate: false,
            host: host.map(String::from),
        })
        .expect("token")
        .token
    }

    #[test]
    fn a_join_token_never_takes_over_a_name_and_a_refusal_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = ctl(&tmp);
        let t = ctl.join_info().token;
        let first = register(&ctl, req("fx1", &t, None), false).expect("join");
        let before = crate::hosts::get(&ctl, "fx1").expect("host");
        // A second machine (or agent) with the same --host-name and the join token.
        let e = register(&ctl, req("fx1", &t, None), false).expect_err("refused");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN);
        assert!(e.to_string().contains("taken by another host"), "{e}");
        assert!(e.to_string().contains("--host-name"), "{e}");
        // Nothing changed: the first agent's credential still works, the host is the same.
        authenticate_host(&ctl, &first.host_id, &first.credential).expect("still its own");
        let after = crate::hosts::get(&ctl, "fx1").expect("host");
        assert_eq!((after.id, after.last_seen), (before.id, before.last_seen));
        // A forged identity is no better than none.
        let forged = HostIdentity {
            host_id: first.host_id.clone(),
            credential: "forged".into(),
        };
        let e = register(&ctl, req("fx1", &t, Some(forged)), false).expect_err("forged");
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN);
        authenticate_host(&ctl, &first.host_id, &first.credential).expect("still its own");
    }

    #[test]
    fn join_tokens_expire_and_single_use_ones_admit_one_host() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = ctl(&tmp);
        let expired = token(&ctl, 60, false, None);
        ctl.db()
            .conn()
            .execute(
                "UPDATE join_tokens SET expires_unix = 1000 WHERE sha256 = ?1",
                [sha256_hex(expired.as_bytes())],
            )
            .expect("expire it");
        let e = register(&ctl, req("edge-1", &expired, None), false).expect_err("expired");
        assert_eq!(
            (e.status(), e.code().as_str()),
            (axum::http::StatusCode::UNAUTHORIZED, "JoinTokenExpired")
        );
        assert!(e.to_string().contains("expired at"), "{e}");
        assert!(
            crate::hosts::get(&ctl, "edge-1").is_err(),
            "nothing registered"
        );

        let once = token(&ctl, 600, true, None);
        register(&ctl, req("edge-1", &once, None), false).expect("first use");
        let e = register(&ctl, req("edge-2", &once, None), false).expect_err("used");
        assert_eq!(e.code(), "JoinTokenUsed");
        assert!(e.to_string().contains("host edge-1 used it"), "{e}");
        assert!(crate::hosts::get(&ctl, "edge-2").is_err());
        // A multi-use token admits several hosts, each under its own name.
        let many = token(&ctl, 600, false, None);
        register(&ctl, req("edge-2", &many, None), false).expect("2");
        register(&ctl, req("edge-3", &many, None), false).expect("3");
    }

    #[test]
    fn a_host_that_lost_its_identity_joins_again_only_with_a_token_for_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = ctl(&tmp);
        let t = ctl.join_info().token;
        let first = register(&ctl, req("edge-1", &t, None), false).expect("join");
        register(&ctl, req("edge-2", &t, None), false).expect("join");
        let bound = token(&ctl, 600, false, Some("edge-1"));
        // The bound token admits only that host's name.
        let e = register(&ctl, req("edge-2", &bound, None), false).expect_err("other name");
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN, "{e}");
        let again = register(&ctl, req("edge-1", &bound, None), false).expect("again");
        assert_eq!(again.host_id, first.host_id, "the same host");
        assert_ne!(again.credential, first.credential);
        assert!(authenticate_host(&ctl, &first.host_id, &first.credential).is_err());
        // Once.
        let e = register(&ctl, req("edge-1", &bound, None), false).expect_err("once");
        assert_eq!(e.code(), "JoinTokenUsed");
        assert!(ctl
            .create_join_token(&tuchka_api::JoinTokenCreate {
                host: Some("nope".into()),
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn a_removed_hosts_identity_is_refused_for_good_and_its_name_is_free() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ctl = ctl(&tmp);
        let t = ctl.join_info().token;
        let reg = register(&ctl, req("edge-1", &t, None), false).expect("join");
        // Up without VMs: removed without --force.
        let out = crate::hosts::remove(&ctl, "edge-1", false).expect("rm");
        assert_eq!((out.name.as_str(), out.lost_vms.len()), ("edge-1", 0));
        assert!(crate::hosts::get(&ctl, "edge-1").is_err());
        assert!(matches!(
            authenticate_host(&ctl, &reg.host_id, &reg.credential),
            Err(HostAuthError::Removed(ref n)) if n == "edge-1"
        ));
        assert!(authenticate_any_host(&ctl, &reg.credential).is_err());
        let id = HostIdentity {
            host_id: reg.host_id.clone(),
            credential: reg.credential.clone(),
        };
        for token in ["", t.as_str()] {
            let e =
                register(&ctl, req("edge-1", token, Some(id.clone())), false).expect_err("removed");
            assert_eq!(e.code(), tuchka_api::CODE_HOST_REMOVED, "{e}");
            assert!(e.to_string().contains("delete <pool>/identity/"), "{e}");
        }
        // As a new machine (no identity) it is a new host under the free name.
        let new = register(&ctl, req("edge-1", &t, None), false).expect("a new host");
        assert_ne!(new.host_id, reg.host_id);
        assert!(crate::hosts::remove(&ctl, "nope", true).is_err());
    }

    #[test]
    fn with_a_local_agent_the_unix_socket_admits_only_the_controllers_own_host() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut config = crate::ControllerConfig::new(tmp.path().to_path_buf());
        config.local_pool = Some(tmp.path().join("pool"));
        let ctl = Controller::open(config).expect("open");
        let local = register(&ctl, req("ctl-host", "", None), true).expect("local");
        let t = ctl.join_info().token;
        let remote = register(&ctl, req("edge-1", &t, None), false).expect("remote");
        // Not another name, not another host's name, not another host's identity.
        let e = register(&ctl, req("edge-1", "", None), true).expect_err("taken");
        assert_eq!(e.code(), tuchka_api::CODE_HOST_NAME_TAKEN, "{e}");
        let rid = HostIdentity {
            host_id: remote.host_id.clone(),
            credential: remote.credential.clone(),
        };
        let e = register(&ctl, req("edge-1", "", Some(rid)), true).expect_err("not local");
        assert_eq!(e.code(), "NotLocalHost", "{e}");
        assert!(matches!(
            authenticate_local(&ctl, &remote.host_id),
            Err(HostAuthError::NotLocal(..))
        ));
        authenticate_local(&ctl, &local.host_id).expect("its own");
        // The local agent without its identity (its pool wiped) is still the same host.
        let again = register(&ctl, req("ctl-host", "", None), true).expect("again");
        assert_eq!(again.host_id, local.host_id);
        // Renamed on the socket: the same host too.
        let renamed = register(&ctl, req("ctl-2", "", None), true).expect("renamed");
        assert_eq!(renamed.host_id, local.host_id);
        assert_eq!(
            crate::hosts::get(&ctl, &local.host_id).expect("h").name,
            "ctl-2"
        );
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
    fn a_report_is_written_only_when_a_vm_changed_or_its_cpu_moved_a_step() {
        let stored = VmRow {
            id: "v".into(),
            name: "web-0".into(),
            group: "web".into(),
            idx: 0,
            host_id: "h".into(),
            placement_reason: String::new(),
            desired: tuchka_api::PowerState::Running,
            observed: VmState::Running,
            error: None,
            error_chain: vec![],
            cpu_usage: 0.5,
            reboot_seq: 0,
            reboot_done: 0,
            force_stop: false,
            stop_timeout_s: 60,
            deleting: false,
            created_at: String::new(),
            extra: Default::default(),
        };
        let with = |f: &dyn Fn(&mut VmRow)| {
            let mut v = stored.clone();
            f(&mut v);
            v
        };
        assert!(!worth_writing(&stored, &stored));
        assert!(!worth_writing(&stored, &with(&|v| v.cpu_usage = 0.51)));
        assert!(worth_writing(&stored, &with(&|v| v.cpu_usage = 0.53)));
        assert!(worth_writing(&stored, &with(&|v| v.cpu_usage = 0.0)));
        assert!(worth_writing(
            &stored,
            &with(&|v| v.observed = VmState::Paused)
        ));
        assert!(worth_writing(
            &stored,
            &with(&|v| v.extra.powered_off = true)
        ));
    }

    #[test]
    fn credential_hash_is_stable_hex() {
        assert_eq!(credential_hash("x").len(), 64);
        assert_eq!(credential_hash("x"), credential_hash("x"));
        assert_ne!(credential_hash("x"), credential_hash("y"));
    }
}
