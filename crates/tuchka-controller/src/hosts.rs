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
    let s = ctl.read(|c| ctl.snapshot(c))?;
    Ok(s.hosts.iter().map(|h| view(&s, h)).collect())
}

/// One host, by name or id.
pub fn get(ctl: &Controller, name: &str) -> Result<Host> {
    let s = ctl.read(|c| ctl.snapshot(c))?;
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

/// `host rm NAME [--force]`: forget host `name` (or id). Refused while it is up with VMs (drain
/// it first), and, without `force`, while it is down with VMs. With `force`, in one
/// transaction: its VMs become `lost` and their addresses (and forwards) are freed; those
/// already being removed go at once (so the `group rm` / `vm rm` they held up completes, and
/// with it the `net rm` and `image rm` they blocked); its volumes are gone with it; its
/// migrations fail (a copy on the other host is named for removal there); its drain ends;
/// what only its reports kept (network presence, image cache, pending removals) is dropped;
/// networks whose gateway it was move to an up host. The host is kept only as a tombstone: its
/// name is free and its identity is refused for good (`401 HostRemoved`).
pub fn remove(ctl: &Controller, name: &str, force: bool) -> Result<tuchka_api::HostRemoved> {
    let out = ctl.db().atomic(|c| {
        let s = ctl.snapshot(c)?;
        let h = s
            .hosts
            .iter()
            .find(|h| h.name == name || h.id == name)
            .cloned()
            .ok_or_else(|| Error::not_found("host", "host", name))?;
        let up = s.is_up(&h) && !h.revoked;
        let vms: Vec<&tuchka_store::VmRow> =
            s.vms.iter().filter(|v| v.host_id == h.id).collect();
        let names = || {
            let mut n: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
            n.truncate(10);
            n.join(", ")
        };
        if !vms.is_empty() && up {
            return Err(Error::conflict(
                "HostInUse",
                format!(
                    "host {} is up with {} VMs ({}): drain it first (tuchka host drain {}) and remove it once it is empty; \
                     if the machine is gone, stop its agent and, once the host is down, use tuchka host rm {} --force",
                    h.name,
                    vms.len(),
                    names(),
                    h.name,
                    h.name
                ),
            ));
        }
        if !vms.is_empty() && !force {
            return Err(Error::conflict(
                "HostHasVms",
                format!(
                    "host {} is down with {} VMs ({}): if the machine is gone for good, tuchka host rm {} --force marks \
                     them lost, frees their addresses and lets the deletions they hold up complete; if it comes back, it is refused",
                    h.name,
                    vms.len(),
                    names(),
                    h.name
                ),
            ));
        }
        let mut out = tuchka_api::HostRemoved {
            name: h.name.clone(),
            id: h.id.clone(),
            lost_vms: vec![],
            removed_vms: vec![],
            lost_volumes: vec![],
            freed_addresses: vec![],
            moved_gateways: vec![],
        };
        let why = format!("its host {} was removed (tuchka host rm --force)", h.name);
        // Migrations to or from it fail; a copy the other host holds goes there.
        for m in &s.migrations {
            if m.source_host != h.id && m.target_host != h.id {
                continue;
            }
            let mut m = m.clone();
            let vm_here = vms.iter().any(|v| v.id == m.vm_id);
            let other = if m.source_host == h.id {
                &m.target_host
            } else {
                &m.source_host
            };
            if vm_here && *other != h.id {
                db::insert_removal(
                    c,
                    &db::RemovalRow {
                        vm_id: m.vm_id.clone(),
                        host_id: other.clone(),
                        name: m.vm_name.clone(),
                        domain: tuchka_core::names::domain_name(ctl.cloud_id(), &m.vm_name),
                        reason: why.clone(),
                    },
                )?;
            }
            m.phase = tuchka_api::MigrationPhase::Failed;
            m.error = Some(tuchka_api::ApiError {
                code: "HostRemoved".into(),
                message: format!("migration of vm {}: {why}", m.vm_name),
                chain: vec![],
            });
            m.finished_at = Some(db::now());
            db::save_migration(c, &m)?;
        }
        for v in &vms {
            if v.deleting {
                crate::volumes::release_vm(c, &v.id)?;
                out.freed_addresses.extend(
                    db::free_vm_addresses(c, &v.id)?
                        .into_iter()
                        .map(|(net, ip)| format!("{net}/{ip}")),
                );
                db::delete_vm(c, &v.id)?;
                out.removed_vms.push(v.name.clone());
                continue;
            }
            out.freed_addresses.extend(
                db::free_vm_addresses(c, &v.id)?
                    .into_iter()
                    .map(|(net, ip)| format!("{net}/{ip}")),
            );
            let mut v = (*v).clone();
            v.observed = tuchka_api::VmState::Lost;
            v.error = Some(format!("vm {}: {why}", v.name));
            v.error_chain.clear();
            v.extra.lost_from = Some(h.name.clone());
            db::update_vm(c, &v)?;
            out.lost_vms.push(v.name.clone());
        }
        for x in s.volumes.iter().filter(|x| x.host_id == h.id) {
            db::delete_volume(c, &x.id)?;
            out.lost_volumes.push(x.name.clone());
        }
        for x in s.captures.iter().filter(|x| x.host_id == h.id) {
            let mut x = x.clone();
            if !matches!(
                x.status,
                tuchka_api::agent::CaptureStatus::Done | tuchka_api::agent::CaptureStatus::Failed
            ) {
                x.status = tuchka_api::agent::CaptureStatus::Failed;
                x.error = Some(format!("capture of vm {}: {why}", x.vm_name));
                db::save_capture(c, &x)?;
            }
        }
        for mut o in db::running_operations(c)? {
            if matches!(&o.record.kind, tuchka_core::ops::OpKind::HostDrain { host_id, .. } if *host_id == h.id)
            {
                let msg = format!("drain of {}: the host was removed", h.name);
                let e = crate::operations::failure(&msg, vec![]);
                crate::operations::finish(&mut o, msg, Some(e));
                db::save_operation(c, &o)?;
            }
        }
        db::forget_host_reports(c, &h.id)?;
        db::remove_host(c, &h.id)?;
        if db::meta_get(c, crate::agents::LOCAL_HOST_META)?.as_deref() == Some(h.id.as_str()) {
            c.execute(
                "DELETE FROM meta WHERE key = ?1",
                [crate::agents::LOCAL_HOST_META],
            )
            .map_err(db::StoreError::from)?;
        }
        // Networks whose gateway it was move to another host, as when a gateway host goes down.
        out.moved_gateways = crate::networks::fail_over(ctl, c)?;
        Ok::<_, Error>(out)
    })?;
    ctl.emit(
        "host.removed",
        &format!("host/{}", out.name),
        format!(
            "host {} removed: {} VMs lost, {} removed, {} addresses freed; its identity is refused from now on",
            out.name,
            out.lost_vms.len(),
            out.removed_vms.len(),
            out.freed_addresses.len()
        ),
    );
    ctl.bump();
    crate::progress::progress(ctl);
    Ok(out)
}
