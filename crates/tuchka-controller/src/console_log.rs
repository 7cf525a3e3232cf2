//! The serial console logs of the cloud's VMs as their agents ship them, kept in memory: the
//! last [`LIMIT`] bytes per VM, whichever host it runs on, so `vm console` and the dashboard
//! read every VM's log from the controller.
//!
//! Protocol (see [`tuchka_api::agent::ConsoleData`]): per VM and host the store remembers the
//! file it reads (device and inode) and the offset it expects next. A piece at that offset is
//! appended; a piece of a file it does not know yet (a new host after a migration, an agent or
//! controller restart) is taken only if it starts at or before the file's last [`LIMIT`] bytes,
//! so the kept tail has no hole. Anything else is not taken, and every answer is the offset the
//! store wants next, so an agent that lost track resends from there. Pieces from several hosts
//! (the source and target of a migration) are appended in the order they arrive.
//!
//! Readers use offsets into the VM's log as kept here ([`ConsoleLogs::read`]); they grow for as
//! long as the controller runs, and [`ConsoleLogs::changed`] wakes followers on every append.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tuchka_api::agent::{ConsoleData, ConsoleNext};

/// Bytes of console log kept per VM.
pub const LIMIT: usize = tuchka_api::agent::CONSOLE_KEPT_BYTES as usize;

/// Whole lines are dropped from the front when one ends within this many bytes of the cut.
const LINE_SLACK: usize = 4096;

/// The console logs of every VM (see the module docs).
#[derive(Debug)]
pub struct ConsoleLogs {
    vms: Mutex<HashMap<String, VmLog>>,
    changed: watch::Sender<u64>,
    limit: usize,
    pruned: Mutex<Instant>,
}

#[derive(Debug, Default)]
struct VmLog {
    /// Offset of `text`'s first byte in the log.
    start: u64,
    /// The kept tail of the log.
    text: String,
    /// Per host id: the file read there and the offset expected next.
    files: HashMap<String, (String, u64)>,
}

/// What a reader gets: the text from `start` to `end`, and how much before `start` it missed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the first byte of `text`.
    pub start: u64,
    /// Offset after the last byte of `text`.
    pub end: u64,
    /// The text.
    pub text: String,
    /// Bytes asked for that are no longer kept.
    pub missed: u64,
}

impl Default for ConsoleLogs {
    fn default() -> Self {
        Self::with_limit(LIMIT)
    }
}

impl ConsoleLogs {
    /// A store keeping `limit` bytes per VM.
    pub fn with_limit(limit: usize) -> Self {
        ConsoleLogs {
            vms: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            limit: limit.max(1),
            pruned: Mutex::new(Instant::now()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, VmLog>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take what `data` brings from host `host_id` if it fits (see the module docs); returns the
    /// offset wanted next from that host's file.
    pub fn accept(&self, host_id: &str, data: &ConsoleData) -> ConsoleNext {
        let limit = self.limit as u64;
        let tail = data.size.saturating_sub(limit);
        let mut appended = false;
        let next = {
            let mut vms = self.lock();
            let log = vms.entry(data.vm_id.clone()).or_default();
            let known = log
                .files
                .get(host_id)
                .filter(|(file, next)| *file == data.file && *next <= data.size)
                .map(|(_, next)| *next);
            let fits = data.end >= data.offset && data.end <= data.size;
            let take = fits
                && match known {
                    Some(next) => data.offset == next,
                    None => data.offset <= tail,
                };
            if take {
                if !data.data.is_empty() {
                    log.append(&data.data, self.limit);
                    appended = true;
                }
                log.files
                    .insert(host_id.to_string(), (data.file.clone(), data.end));
                data.end
            } else {
                // Nothing is remembered of a file until a piece of it fits.
                known.unwrap_or(tail)
            }
        };
        if appended {
            self.changed.send_modify(|n| *n += 1);
        }
        ConsoleNext {
            vm_id: data.vm_id.clone(),
            file: data.file.clone(),
            offset: next,
        }
    }

    /// VM `vm_id`'s log from offset `from` (everything kept when None, or when `from` is past
    /// the end: the log started over since, e.g. the controller restarted).
    pub fn read(&self, vm_id: &str, from: Option<u64>) -> Piece {
        let vms = self.lock();
        let Some(log) = vms.get(vm_id) else {
            return Piece::default();
        };
        let end = log.start + log.text.len() as u64;
        let from = match from {
            Some(f) if f <= end => f,
            _ => log.start,
        };
        let missed = log.start.saturating_sub(from);
        let mut at = (from.max(log.start) - log.start) as usize;
        while !log.text.is_char_boundary(at) {
            at += 1;
        }
        Piece {
            start: log.start + at as u64,
            end,
            text: log.text[at..].to_string(),
            missed,
        }
    }

    /// A receiver that changes whenever any log grows.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Forget the logs of VMs for which `keep` is false (removed VMs).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    /// True at most once per `every`: time to [`ConsoleLogs::retain`] the VMs that still exist.
    pub fn prune_due(&self, every: Duration) -> bool {
        let mut last = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= every {
            *last = Instant::now();
            true
        } else {
            false
        }
    }

    /// Ids of the VMs with a log.
    pub fn vm_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

impl VmLog {
    fn append(&mut self, text: &str, limit: usize) {
        self.text.push_str(text);
        if self.text.len() <= limit {
            return;
        }
        let mut cut = self.text.len() - limit;
        while !self.text.is_char_boundary(cut) {
            cut += 1;
        }
        let window = &self.text.as_bytes()[cut..self.text.len().min(cut + LINE_SLACK)];
        if let Some(nl) = window.iter().position(|b| *b == b'\n') {
            if cut + nl + 1 < self.text.len() {
                cut += nl + 1;
            }
        }
        self.text.drain(..cut);
        self.start += cut as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(vm: &str, file: &str, size: u64, offset: u64, data: &str) -> ConsoleData {
        ConsoleData {
            vm_id: vm.into(),
            file: file.into(),
            size,
            offset,
            end: offset + data.len() as u64,
            data: data.into(),
        }
    }

    #[test]
    fn pieces_in_order_are_appended_and_gaps_are_refused() {
        let logs = ConsoleLogs::with_limit(100);
        let n = logs.accept("h1", &piece("vm", "1:2", 6, 0, "hello\n"));
        assert_eq!(n.offset, 6);
        // A piece that skips bytes is not taken; the answer says where to resume.
        let n = logs.accept("h1", &piece("vm", "1:2", 20, 10, "later"));
        assert_eq!(n.offset, 6);
        let n = logs.accept("h1", &piece("vm", "1:2", 12, 6, "world\n"));
        assert_eq!(n.offset, 12);
        assert_eq!(logs.read("vm", None).text, "hello\nworld\n");
        // Followers read from an offset.
        let p = logs.read("vm", Some(6));
        assert_eq!((p.start, p.end, p.text.as_str()), (6, 12, "world\n"));
        assert_eq!(logs.read("vm", Some(12)).text, "");
        assert_eq!(logs.read("unknown", None), Piece::default());
    }

    #[test]
    fn an_unknown_file_must_bring_its_whole_tail() {
        let logs = ConsoleLogs::with_limit(10);
        // The controller restarted: the agent's offset 500 is refused, the tail is asked for.
        let n = logs.accept("h1", &piece("vm", "f", 600, 595, "x"));
        assert_eq!(n.offset, 590);
        assert_eq!(logs.read("vm", None).text, "");
        let n = logs.accept("h1", &piece("vm", "f", 600, 590, "0123456789"));
        assert_eq!(n.offset, 600);
        assert_eq!(logs.read("vm", None).text, "0123456789");
        // A probe with nothing new answers the offset expected.
        let n = logs.accept("h1", &piece("vm", "f", 600, 600, ""));
        assert_eq!(n.offset, 600);
    }

    #[test]
    fn a_vm_moving_to_another_host_keeps_its_log() {
        let logs = ConsoleLogs::with_limit(1000);
        logs.accept("h1", &piece("vm", "a", 4, 0, "one\n"));
        // The target's new file starts at 0; the source still sends its last line.
        logs.accept("h2", &piece("vm", "b", 4, 0, "two\n"));
        logs.accept("h1", &piece("vm", "a", 10, 4, "three\n"));
        assert_eq!(logs.read("vm", None).text, "one\ntwo\nthree\n");
        // The VM comes back to h1 later: a new file (the old directory was removed).
        let n = logs.accept("h1", &piece("vm", "c", 5, 0, "four\n"));
        assert_eq!(n.offset, 5);
        assert_eq!(logs.read("vm", None).text, "one\ntwo\nthree\nfour\n");
    }

    #[test]
    fn only_the_last_limit_bytes_are_kept_in_whole_lines() {
        let logs = ConsoleLogs::with_limit(10);
        logs.accept("h", &piece("vm", "f", 8, 0, "aaa\nbbb\n"));
        logs.accept("h", &piece("vm", "f", 16, 8, "ccc\nddd\n"));
        let p = logs.read("vm", None);
        assert_eq!(p.text, "ccc\nddd\n");
        assert_eq!((p.start, p.end), (8, 16));
        // A reader that fell behind learns how much it missed.
        let p = logs.read("vm", Some(2));
        assert_eq!((p.missed, p.start), (6, 8));
        // Multi-byte characters are never split (this line is longer than the limit).
        logs.accept("h", &piece("vm", "f", 16 + 11, 16, "ééééé\n"));
        let p = logs.read("vm", None);
        assert_eq!(p.text, "éééé\n");
        assert_eq!(p.end, 27);
        logs.retain(|_| false);
        assert!(logs.vm_ids().is_empty());
    }

    #[test]
    fn a_reader_past_the_end_gets_everything_kept() {
        let logs = ConsoleLogs::with_limit(100);
        logs.accept("h", &piece("vm", "f", 3, 0, "ab\n"));
        assert_eq!(logs.read("vm", Some(1000)).text, "ab\n");
    }

    #[tokio::test]
    async fn followers_are_woken_by_appends() {
        let logs = ConsoleLogs::with_limit(100);
        let mut rx = logs.changed();
        logs.accept("h", &piece("vm", "f", 3, 0, "ab\n"));
        rx.changed().await.expect("woken");
    }
}
