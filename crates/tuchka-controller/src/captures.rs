//! Images made from VMs' disks (`image create --from-vm`, and the last step of `image build`).
//!
//! The controller records a capture (its id is the id of the operation that wants it) on the
//! VM's host; that host's agent takes a point-in-time copy of the running disk (libvirt's push
//! backup: the guest is not paused), flattens and compresses it, and sends it to
//! `PUT /v1/agent/hosts/{host}/captures/{id}`, which stores it through the same checks as a
//! user's upload ([`crate::images::upload`]). The row goes when its operation ends.

use rusqlite::Connection;
use tuchka_api::agent::{CaptureObserved, CaptureStatus};
use tuchka_api::{ApiError, ImageCapture, Operation, PowerState};
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, CaptureRow, OpRow};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::state::Controller;

/// A new capture of VM `vm` as image `image`, under id `id`.
pub fn record(
    c: &Connection,
    id: &str,
    image: &str,
    vm: &tuchka_store::VmRow,
    made_from: &str,
) -> Result<()> {
    db::save_capture(
        c,
        &CaptureRow {
            id: id.to_string(),
            image: image.to_string(),
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            host_id: vm.host_id.clone(),
            made_from: made_from.to_string(),
            status: CaptureStatus::Copying,
            bytes: 0,
            paused_ms: 0,
            error: None,
            error_chain: vec![],
            created_at: db::now(),
        },
    )?;
    Ok(())
}

/// `image create NAME --from-vm VM`: the VM may run (it keeps running) or be stopped.
pub fn start(ctl: &Controller, req: ImageCapture) -> Result<Operation> {
    crate::images::precheck(ctl, &req.name)?;
    operations::start(ctl, |c| {
        let vm = db::vm(c, &req.vm)?.ok_or_else(|| Error::not_found("vm", "vm", &req.vm))?;
        if vm.deleting {
            return Err(Error::conflict(
                "VmDeleting",
                format!("vm {:?} is being removed", vm.name),
            ));
        }
        crate::vms::refuse_while_migrating(c, std::slice::from_ref(&vm), "capture it")?;
        if db::captures(c)?.iter().any(|x| x.image == req.name) {
            return Err(Error::conflict(
                "ImageExists",
                format!("image {:?} is already being made", req.name),
            ));
        }
        let s = ctl.snapshot(c)?;
        if !s.id_is_up(&vm.host_id) {
            return Err(Error::conflict(
                "HostDown",
                format!(
                    "vm {:?} is on host {}, which is not reporting: its disk cannot be read now",
                    vm.name,
                    s.host_name(&vm.host_id)
                ),
            ));
        }
        let how = if vm.desired == PowerState::Stopped {
            "copying the disk of the stopped VM"
        } else {
            "copying a point in time of the running disk"
        };
        let op = new_op(
            OpKind::ImageCapture {
                image: req.name.clone(),
                vm: vm.name.clone(),
                vm_id: vm.id.clone(),
                host_id: vm.host_id.clone(),
            },
            &format!("image/{}", req.name),
            1,
            how,
        );
        record(c, &op.op.id, &req.name, &vm, &format!("vm {}", vm.name))?;
        Ok(op)
    })
}

/// The capture `id` that host `host_id` may send now, if any.
pub fn expected(ctl: &Controller, host_id: &str, id: &str) -> Result<CaptureRow> {
    let x = db::capture(ctl.db().conn(), id)?
        .filter(|x| x.host_id == host_id)
        .ok_or_else(|| Error::not_found("capture", "op", id))?;
    if x.status == CaptureStatus::Done || x.status == CaptureStatus::Failed {
        return Err(Error::conflict(
            "CaptureFinished",
            format!("capture {id} is already {}", x.status),
        ));
    }
    Ok(x)
}

/// The image a host sent for capture `x` was stored (`Ok`: its size in bytes) or refused
/// (`Err`: the refusal with its causes): record it.
pub fn received(
    ctl: &Controller,
    x: &CaptureRow,
    outcome: std::result::Result<u64, ApiError>,
) -> Result<()> {
    ctl.db().atomic(|c| {
        let Some(mut row) = db::capture(c, &x.id)? else {
            return Ok(());
        };
        match &outcome {
            Ok(bytes) => {
                row.status = CaptureStatus::Done;
                row.bytes = *bytes;
            }
            Err(e) => {
                row.status = CaptureStatus::Failed;
                row.error = Some(format!("the controller refused the image: {}", e.message));
                row.error_chain = e.chain.clone();
            }
        }
        db::save_capture(c, &row)?;
        Ok::<_, Error>(())
    })?;
    ctl.bump();
    Ok(())
}

/// Record what host `host_id` says of its captures (copying, sending, or failed there).
pub fn apply_observed(c: &Connection, host_id: &str, seen: &[CaptureObserved]) -> Result<()> {
    for o in seen {
        let Some(mut x) = db::capture(c, &o.id)?.filter(|x| x.host_id == host_id) else {
            continue;
        };
        if matches!(x.status, CaptureStatus::Done | CaptureStatus::Failed) {
            continue;
        }
        let mut changed = o.bytes != x.bytes || o.paused_ms != x.paused_ms;
        x.bytes = o.bytes;
        x.paused_ms = o.paused_ms;
        // "done" is the controller's to say, once it has stored the image.
        if o.status != CaptureStatus::Done && o.status != x.status {
            x.status = o.status;
            x.error = o.error.clone();
            x.error_chain = o.error_chain.clone();
            changed = true;
        }
        if changed {
            db::save_capture(c, &x)?;
        }
    }
    Ok(())
}

/// How capture `id` stands, as a step of the operation that wants it (the caller removes the
/// row once its operation ends).
pub fn step(c: &Connection, id: &str) -> Result<Step> {
    let Some(x) = db::capture(c, id)? else {
        return Ok(Step::Failed {
            error: "the capture was lost".into(),
            chain: vec![],
        });
    };
    Ok(match x.status {
        CaptureStatus::Done => {
            let img = db::image(c, &x.image)?;
            Step::Succeeded {
                message: format!(
                    "image {} stored ({} MiB, sha256 {}, made from {})",
                    x.image,
                    img.as_ref().map(|i| i.stored_size >> 20).unwrap_or(0),
                    img.as_ref().map(|i| i.sha256.as_str()).unwrap_or("?"),
                    x.made_from
                ),
            }
        }
        CaptureStatus::Failed => Step::Failed {
            error: x
                .error
                .unwrap_or_else(|| "the capture failed on its host".into()),
            chain: x.error_chain,
        },
        CaptureStatus::Copying => Step::Running {
            done: 0,
            message: format!(
                "copying the disk of {} ({} MiB so far)",
                x.vm_name,
                x.bytes >> 20
            ),
        },
        CaptureStatus::Uploading => Step::Running {
            done: 0,
            message: format!(
                "sending the image to the controller (guest paused {} ms)",
                x.paused_ms
            ),
        },
    })
}

/// How an `image create --from-vm` stands.
pub fn evaluate(c: &Connection, o: &OpRow) -> Result<Step> {
    let OpKind::ImageCapture { vm_id, vm, .. } = &o.record.kind else {
        return Ok(Step::Failed {
            error: "not a capture".into(),
            chain: vec![],
        });
    };
    if db::vm_by_id(c, vm_id)?.is_none() {
        db::delete_capture(c, &o.op.id)?;
        return Ok(Step::Failed {
            error: format!("vm {vm:?} was removed during the capture"),
            chain: vec![],
        });
    }
    let step = step(c, &o.op.id)?;
    if matches!(step, Step::Succeeded { .. } | Step::Failed { .. }) {
        db::delete_capture(c, &o.op.id)?;
    }
    Ok(step)
}
