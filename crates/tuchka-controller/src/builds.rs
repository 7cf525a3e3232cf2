//! Image builds (`image build NAME --from IMAGE --user-data SCRIPT`).
//!
//! One operation carries it all: a builder group of one run-once VM (`build-<id>`) on a network
//! of its own with the same name, started from `--from` with the script as user-data. When its
//! guest powers itself off, its disk is captured ([`crate::captures`]) into the new image. The
//! builder and its network are then removed, whatever happened: success, a failed capture, a
//! builder that broke, or the deadline passing (the error then carries the console's end).

use tuchka_api::{GroupCreate, ImageBuild, Operation, PowerState, VmState};
use tuchka_core::ops::OpKind;
use tuchka_store::{self as db, OpRow};

use crate::error::{Error, Result};
use crate::operations::{self, new_op, Step};
use crate::state::Controller;

/// Default time the builder has to power off, seconds.
pub const DEFAULT_TIMEOUT_S: u32 = 600;
/// Most time a builder may be given, seconds.
pub const MAX_TIMEOUT_S: u32 = 24 * 3600;
/// Default memory of a builder, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// `image build`.
pub fn start(ctl: &Controller, req: ImageBuild) -> Result<Operation> {
    crate::images::precheck(ctl, &req.name)?;
    let timeout = req.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout) {
        return Err(Error::invalid(
            "InvalidTimeout",
            format!("timeout {timeout} s is out of range: use 1 s to 24 h"),
        ));
    }
    operations::start(ctl, |c| {
        if db::captures(c)?.iter().any(|x| x.image == req.name) {
            return Err(Error::conflict(
                "ImageExists",
                format!("image {:?} is already being made", req.name),
            ));
        }
        let builder = format!("build-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        crate::networks::insert_private(ctl, c, &builder)?;
        crate::groups::insert(
            ctl,
            c,
            &GroupCreate {
                name: builder.clone(),
                image: req.from.clone(),
                count: 1,
                cpus: 1,
                memory_mib: req.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
                disk_mib: req.disk_mib.unwrap_or(0),
                networks: vec![builder.clone()],
                user_data: Some(req.user_data.clone()),
                ssh_keys: vec![],
                placement: None,
                anti_affinity: false,
                volume_size_mib: None,
                keep_volumes: false,
                max_cpus: None,
            },
            true,
        )?;
        Ok(new_op(
            OpKind::ImageBuild {
                image: req.name.clone(),
                from: req.from.clone(),
                builder: builder.clone(),
                deadline_unix: db::now_unix() + i64::from(timeout),
            },
            &format!("image/{}", req.name),
            1,
            &format!("builder vm {builder}-0 is running the script (up to {timeout} s)"),
        ))
    })
}

/// Ask for the builder and its network to go; true once both are gone.
fn clean_up(c: &rusqlite::Connection, builder: &str) -> Result<bool> {
    if let Some(g) = db::group(c, builder)? {
        if !g.deleting {
            crate::groups::mark_deleting(c, builder)?;
        }
        return Ok(false);
    }
    if db::network(c, builder)?.is_some() {
        crate::networks::mark_deleting(c, builder)?;
        return Ok(false);
    }
    Ok(true)
}

/// The end of the builder's console, as its host last sent it, for an error message.
fn console_tail(v: Option<&tuchka_store::VmRow>) -> Vec<String> {
    let Some(tail) = v.and_then(|v| v.extra.console_tail.as_deref()) else {
        return vec!["(no console output was received from the builder)".into()];
    };
    let mut lines: Vec<String> = vec!["console tail of the builder:".into()];
    lines.extend(tail.lines().map(|l| format!("| {l}")));
    lines
}

/// How a build stands.
pub fn evaluate(ctl: &Controller, c: &rusqlite::Connection, o: &OpRow) -> Result<Step> {
    let OpKind::ImageBuild {
        image,
        from,
        builder,
        deadline_unix,
    } = &o.record.kind
    else {
        return Ok(Step::Failed {
            error: "not a build".into(),
            chain: vec![],
        });
    };
    // Failed earlier: finish removing the builder, then fail.
    if let Some(error) = &o.record.rollback_error {
        if clean_up(c, builder)? {
            return Ok(Step::Failed {
                error: error.clone(),
                chain: o.record.rollback_chain.clone(),
            });
        }
        return Ok(Step::Running {
            done: 0,
            message: format!("rolling back: {error} (removing the builder)"),
        });
    }
    let fail = |error: String, chain: Vec<String>| -> Result<Step> {
        clean_up(c, builder)?;
        db::delete_capture(c, &o.op.id)?;
        Ok(Step::RollingBack { error, chain })
    };
    let vm = db::group_vms(c, builder)?.into_iter().next();
    // The capture, once asked for, decides.
    if db::capture(c, &o.op.id)?.is_some() {
        return match crate::captures::step(c, &o.op.id)? {
            Step::Succeeded { message } => {
                if clean_up(c, builder)? {
                    db::delete_capture(c, &o.op.id)?;
                    Ok(Step::Succeeded { message })
                } else {
                    Ok(Step::Running {
                        done: 0,
                        message: format!("image {image} stored; removing the builder"),
                    })
                }
            }
            Step::Failed { error, chain } => fail(
                format!("capturing the builder's disk failed: {error}"),
                chain,
            ),
            running => Ok(running),
        };
    }
    let Some(v) = vm else {
        return fail(format!("the builder {builder}-0 was removed"), vec![]);
    };
    if v.observed == VmState::Error {
        let mut chain = v.error_chain.clone();
        chain.extend(console_tail(Some(&v)));
        return fail(
            format!(
                "the builder failed: {}",
                v.error.clone().unwrap_or_else(|| "error".into())
            ),
            chain,
        );
    }
    if v.extra.powered_off && v.observed == VmState::Stopped {
        crate::captures::record(c, &o.op.id, image, &v, &format!("build from {from}"))?;
        ctl.bump();
        return Ok(Step::Running {
            done: 0,
            message: format!("builder powered off; capturing its disk into image {image}"),
        });
    }
    if db::now_unix() > *deadline_unix {
        let mut v2 = v.clone();
        v2.desired = PowerState::Stopped;
        v2.force_stop = true;
        db::update_vm(c, &v2)?;
        return fail(
            "the builder did not power off in time: the script must end by powering the guest off (e.g. poweroff), and may have failed before".to_string(),
            console_tail(Some(&v)),
        );
    }
    Ok(Step::Running {
        done: 0,
        message: format!(
            "builder vm {} is {}; waiting for it to power off",
            v.name, v.observed
        ),
    })
}
