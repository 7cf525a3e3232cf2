//! Ships the serial console logs of this host's VMs to the controller, so `vm console` and
//! the dashboard show every VM's log, whichever host it runs on.
//!
//! Every second the shipper looks at each `vms/<id>/console.log` of the pool and sends what
//! was appended since the offset the controller last asked for (`POST
//! /v1/agent/hosts/{id}/consoles`, [`tuchka_api::agent::ConsoleData`]): incremental, at most
//! [`PER_VM`] bytes per VM and [`PER_UPLOAD`] per request, nothing when nothing changed. For a
//! file it has no offset for (a new VM, a restart of the agent) it starts at the file's last
//! [`CONSOLE_KEPT_BYTES`]; the controller's answer sets the offset either way, so a restarted
//! controller gets the tail again. It runs beside the reconcile loop and never blocks it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tuchka_api::agent::{ConsoleData, ConsoleUpload, ConsoleUploaded, CONSOLE_KEPT_BYTES};
use tuchka_client::Client;
use tuchka_host::Storage;

/// Time between two looks at the logs.
pub const EVERY: Duration = Duration::from_secs(1);

/// Most bytes of one VM's log per upload.
pub const PER_VM: u64 = 512 * 1024;

/// Most bytes of all logs per upload.
pub const PER_UPLOAD: u64 = 1024 * 1024;

/// Where to ship to: the client (with this host's credential) and this host's id. Changes when
/// the agent registers again.
pub type Target = (Client, String);

/// What the shipper knows of one log: its file and the offset the controller wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    file: String,
    offset: u64,
}

/// The shipper's state between rounds (offsets per VM id).
#[derive(Debug, Default)]
pub struct Shipper {
    positions: HashMap<String, Position>,
    last_error: Option<String>,
}

/// Stops the shipper when dropped (the agent's loop ended).
#[derive(Debug)]
pub struct ShipperTask(tokio::task::JoinHandle<()>);

impl Drop for ShipperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ship the logs of `storage`'s VMs to the target `target` names, every [`EVERY`], until the
/// returned task is dropped.
pub fn spawn(storage: Arc<dyn Storage>, target: watch::Receiver<Target>) -> ShipperTask {
    ShipperTask(tokio::spawn(async move {
        let mut shipper = Shipper::default();
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let (client, host_id) = target.borrow().clone();
            let s = storage.clone();
            let positions = shipper.positions.clone();
            let Ok(upload) =
                tokio::task::spawn_blocking(move || collect(s.as_ref(), &positions)).await
            else {
                continue;
            };
            shipper.forget_missing(&upload);
            let pieces: Vec<ConsoleData> = upload
                .logs
                .into_iter()
                .filter(|p| shipper.worth_sending(p))
                .collect();
            if pieces.is_empty() {
                continue;
            }
            let path = format!("/v1/agent/hosts/{host_id}/consoles");
            match client
                .post::<_, ConsoleUploaded>(&path, &ConsoleUpload { logs: pieces })
                .await
            {
                Ok(answer) => {
                    shipper.last_error = None;
                    shipper.apply(&answer);
                }
                Err(e) => {
                    let text = e.to_string();
                    if shipper.last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "cannot ship console logs; retrying");
                        shipper.last_error = Some(text);
                    }
                }
            }
        }
    }))
}

/// What a round sends: the VMs found, each with a piece (possibly empty).
#[derive(Debug, Default)]
pub struct Collected {
    /// One entry per VM with a console log.
    pub logs: Vec<ConsoleData>,
    /// Every VM id that has a VM directory.
    pub seen: Vec<String>,
}

impl Shipper {
    fn forget_missing(&mut self, c: &Collected) {
        self.positions.retain(|id, _| c.seen.contains(id));
    }

    /// A piece is sent when it has text, or when the controller has not told us where it stands
    /// yet (the first look at a log).
    fn worth_sending(&self, p: &ConsoleData) -> bool {
        p.end > p.offset
            || self
                .positions
                .get(&p.vm_id)
                .is_none_or(|pos| pos.file != p.file)
    }

    fn apply(&mut self, answer: &ConsoleUploaded) {
        for n in &answer.next {
            self.positions.insert(
                n.vm_id.clone(),
                Position {
                    file: n.file.clone(),
                    offset: n.offset,
                },
            );
        }
    }
}

/// Read what is new in every VM's console log (blocking file I/O). Unreadable logs are skipped.
fn collect(storage: &dyn Storage, positions: &HashMap<String, Position>) -> Collected {
    let mut out = Collected::default();
    let mut budget = PER_UPLOAD;
    let mut ids = storage.vm_dirs().unwrap_or_default();
    ids.sort();
    for id in ids {
        out.seen.push(id.clone());
        let path = storage.console_log_path(&id);
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(meta) = f.metadata() else {
            continue;
        };
        let file = format!("{}:{}", meta.dev(), meta.ino());
        let size = meta.len();
        let offset = match positions.get(&id) {
            Some(p) if p.file == file && p.offset <= size => p.offset,
            _ => size.saturating_sub(CONSOLE_KEPT_BYTES),
        };
        let want = (size - offset).min(PER_VM).min(budget);
        let mut bytes = Vec::new();
        if want > 0
            && f.seek(SeekFrom::Start(offset)).is_ok()
            && f.by_ref().take(want).read_to_end(&mut bytes).is_err()
        {
            continue;
        }
        let keep = complete_utf8(&bytes);
        budget -= keep as u64;
        out.logs.push(ConsoleData {
            vm_id: id,
            file,
            size,
            offset,
            end: offset + keep as u64,
            data: String::from_utf8_lossy(&bytes[..keep]).into_owned(),
        });
    }
    out
}

/// The length of `b` without a trailing incomplete UTF-8 character (it is sent with the bytes
/// that complete it). Other invalid bytes are left to the lossy conversion.
pub fn complete_utf8(b: &[u8]) -> usize {
    let n = b.len();
    // A character is at most 4 bytes: look at the last 3 for the start of an unfinished one.
    for back in 1..=3.min(n) {
        let byte = b[n - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: keep looking for its lead
        }
        let len = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if len > back { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::agent::ConsoleNext;

    #[test]
    fn an_unfinished_character_waits_for_the_next_round() {
        assert_eq!(complete_utf8(b"abc"), 3);
        let e = "é".as_bytes();
        assert_eq!(complete_utf8(&[b'a', e[0]]), 1);
        assert_eq!(complete_utf8(&[b'a', e[0], e[1]]), 3);
        let euro = "€".as_bytes();
        assert_eq!(complete_utf8(&[b'x', euro[0], euro[1]]), 1);
        assert_eq!(complete_utf8(euro), 3);
        assert_eq!(complete_utf8(&[]), 0);
        // A stray continuation byte is not held back forever.
        assert_eq!(complete_utf8(&[0x80, 0x80, 0x80, 0x80]), 4);
    }

    #[test]
    fn collect_reads_from_the_controller_s_offset_and_starts_new_logs_at_their_tail() {
        let tmp = tempfile::tempdir().expect("tmp");
        let storage = tuchka_host::fake::FakeStorage::new(tmp.path()).expect("pool");
        let dir = storage.ensure_vm_dir("vm-a").expect("dir");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("console.log"), "TESTIMG-READY\nmore\n").expect("write");
        let c = collect(&storage, &HashMap::new());
        assert_eq!(c.seen, vec!["vm-a".to_string()]);
        let p = &c.logs[0];
        assert_eq!((p.offset, p.end, p.size), (0, 19, 19));
        assert_eq!(p.data, "TESTIMG-READY\nmore\n");

        let mut shipper = Shipper::default();
        shipper.apply(&ConsoleUploaded {
            next: vec![ConsoleNext {
                vm_id: "vm-a".into(),
                file: p.file.clone(),
                offset: 14,
            }],
        });
        let c = collect(&storage, &shipper.positions);
        assert_eq!(c.logs[0].data, "more\n");
        // Nothing new: nothing worth sending once the controller stands at the end.
        shipper.apply(&ConsoleUploaded {
            next: vec![ConsoleNext {
                vm_id: "vm-a".into(),
                file: c.logs[0].file.clone(),
                offset: 19,
            }],
        });
        let c = collect(&storage, &shipper.positions);
        assert!(!shipper.worth_sending(&c.logs[0]));
        // The VM is gone: its offset is forgotten.
        storage.remove_vm("vm-a").expect("rm");
        let c = collect(&storage, &shipper.positions);
        shipper.forget_missing(&c);
        assert!(shipper.positions.is_empty());
    }
}
