//! Hosts as users see them: views, undrain, revoke. Draining (which moves VMs off) is
//! [`crate::drain`]; what agents do is [`crate::agents`].

use tuchka_api::Host;
use tuchka_store::{self as db, HostRow};

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::state::Controller;

/// The view of host `h`.
pub fn view(s: &Snapshot, h: &HostRow) -> Host {
    let u = s.usage(&h.id);
    Host {
        name: h.name.clone(),
        id: h.id.clone(),
        state: s.host_state(h),
        address: h.facts.address.clone(),
        load_1m: h.facts.load_1m,
        memory_available_mib: h.facts.memory_available_mib,
        accel: h.facts.accel.clone(),
        accel_reason: h.facts.accel_reason.clone(),
        cpus: h.facts.cpus,
        cpus_used: u.cpus,
        memory_mib: h.facts.memory_mib,
        memory_used_mib: u.memory_mib,
        disk_mib: h.facts.disk_mib,
        disk_free_mib: h.facts.disk_free_mib,
        disk_provisioned_mib: u.disk_mib,
        vms: s.vms_on(&h.id).map(|v| v.name.clone()).collect(),
        cached_images: h.cached_images.clone(),
        last_seen: h.last_seen.clone(),
        cpu_usage: h.facts.cpu_usage,
        memory_in_use_mib: h.facts.memory_in_use_mib,
        orphans: h.orphans.clone(),
        channel_port: h.facts.channel_port,
    }
}

/// All hosts.
pub fn list(ctl: &Controller) -> Result<Vec<Host>> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    Ok(s.hosts.iter().map(|h| view(&s, h)).collect())
}

/// One host, by name or id.
pub fn get(ctl: &Controller, name: &str) -> Result<Host> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    let h = s
        .hosts
        .iter()
        .find(|h| h.name == name || h.id == name)
        .ok_or_else(|| Error::not_found("host", "host", name))?;
    Ok(view(&s, h))
}

/// Look a host up by name or id inside a transaction.
pub fn find(c: &rusqlite::Connection, name: &str) -> Result<HostRow> {
    db::host(c, name)?.ok_or_else(|| Error::not_found("host", "host", name))
}

/// Undrain host `name`: it accepts new VMs again. A drain still moving VMs off is not stopped
/// (its remaining moves are not started).
pub fn undrain(ctl: &Controller, name: &str) -> Result<Host> {
    let h = ctl.db().atomic(|c| {
        let h = find(c, name)?;
        db::set_draining(c, &h.id, false)?;
        Ok::<_, Error>(h)
    })?;
    ctl.emit(
        "host.draining",
        &format!("host/{}", h.name),
        format!("host {} accepts placements again", h.name),
    );
    ctl.bump();
    get(ctl, &h.id)
}

/// Revoke host `name` (or id): its agent's credential is refused from now on and the host is
/// shown `revoked`. Its VMs stay where they are.
pub fn revoke(ctl: &Controller, name: &str) -> Result<Host> {
    let h = ctl.db().atomic(|c| {
        let h = find(c, name)?;
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
    get(ctl, &h.id)
}
