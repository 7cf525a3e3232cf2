//! VM console logs as agents ship them and users read them: [`ship`] takes what is new from a
//! host, [`read`] and [`follow`] give a VM's log (the whole kept tail, or what comes after an
//! offset, waiting for it). The same for every VM, whichever host it runs on; the store and its
//! offset rules are [`crate::console_log`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tuchka_api::agent::{ConsoleNext, ConsoleUpload, ConsoleUploaded};
use tuchka_api::ConsoleLog;
use tuchka_store as db;

use crate::console_log::Piece;
use crate::error::{Error, Result};
use crate::state::Controller;

/// Longest a follower waits for new text before answering with none.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// How often the logs of removed VMs are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// Take the console news of host `host_id`. Logs of VMs the cloud does not have, or that are
/// neither on this host nor migrating to or from it, are not kept (the answer asks for nothing
/// before the file's end).
pub fn ship(ctl: &Controller, host_id: &str, upload: ConsoleUpload) -> Result<ConsoleUploaded> {
    let ours: HashSet<String> = {
        let db = ctl.db();
        let c = db.conn();
        let mut ids: HashSet<String> = db::vms(c)?
            .into_iter()
            .filter(|v| v.host_id == host_id)
            .map(|v| v.id)
            .collect();
        for m in db::active_migrations(c)? {
            if m.source_host == host_id || m.target_host == host_id {
                ids.insert(m.vm_id);
            }
        }
        ids
    };
    let logs = ctl.consoles();
    let next = upload
        .logs
        .iter()
        .map(|d| {
            if ours.contains(&d.vm_id) {
                logs.accept(host_id, d)
            } else {
                ConsoleNext {
                    vm_id: d.vm_id.clone(),
                    file: d.file.clone(),
                    offset: d.size,
                }
            }
        })
        .collect();
    if logs.prune_due(PRUNE_EVERY) {
        let all: HashSet<String> = db::vms(ctl.db().conn())?
            .into_iter()
            .map(|v| v.id)
            .collect();
        logs.retain(|id| all.contains(id));
    }
    Ok(ConsoleUploaded { next })
}

fn vm_id(ctl: &Controller, name: &str) -> Result<String> {
    db::vm(ctl.db().conn(), name)?
        .map(|v| v.id)
        .ok_or_else(|| Error::not_found("vm", "vm", name))
}

fn view(name: &str, p: Piece) -> ConsoleLog {
    ConsoleLog {
        vm: name.to_string(),
        start: p.start,
        end: p.end,
        text: p.text,
        missed: p.missed,
    }
}

/// VM `name`'s console log from offset `from` (all that is kept when None).
pub fn read(ctl: &Controller, name: &str, from: Option<u64>) -> Result<ConsoleLog> {
    let id = vm_id(ctl, name)?;
    Ok(view(name, ctl.consoles().read(&id, from)))
}

/// Like [`read`], but when nothing follows `from` yet, wait up to `wait` (at most
/// [`MAX_WAIT`]) for it: a long poll, the way `vm console --follow` and the dashboard follow
/// a console.
pub async fn follow(
    ctl: &Controller,
    name: &str,
    from: Option<u64>,
    wait: Duration,
) -> Result<ConsoleLog> {
    let id = {
        let (ctl, name) = (ctl.clone(), name.to_string());
        tokio::task::spawn_blocking(move || vm_id(&ctl, &name))
            .await
            .map_err(|e| Error::Internal {
                message: "worker failed".into(),
                chain: vec![e.to_string()],
            })??
    };
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    let mut changed = ctl.consoles().changed();
    loop {
        changed.borrow_and_update();
        let p = ctl.consoles().read(&id, from);
        let left = deadline.saturating_duration_since(Instant::now());
        if from.is_none() || !p.text.is_empty() || p.missed > 0 || left.is_zero() {
            return Ok(view(name, p));
        }
        match tokio::time::timeout(left, changed.changed()).await {
            Ok(Ok(())) => {}
            // Timed out (or the store is gone): answer with what there is.
            _ => return Ok(view(name, ctl.consoles().read(&id, from))),
        }
    }
}
