//! A small in-memory history of each host's load, for the dashboard's charts: one sample per
//! [`INTERVAL`] per host (CPU and memory in use, load average), the last [`KEPT`] of them.
//! Nothing is stored on disk: after a restart the charts start empty again. The sampler that
//! feeds it runs in [`crate::monitoring`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tuchka_api::LoadPoint;

/// Time between two samples of a host.
pub const INTERVAL: Duration = Duration::from_secs(20);

/// Samples kept per host: one hour.
pub const KEPT: usize = 180;

/// The load samples of every host, by host id.
#[derive(Debug, Default)]
pub struct LoadHistory {
    hosts: Mutex<HashMap<String, VecDeque<LoadPoint>>>,
}

impl LoadHistory {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, VecDeque<LoadPoint>>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a sample of host `host_id`, dropping the oldest beyond [`KEPT`].
    pub fn record(&self, host_id: &str, point: LoadPoint) {
        let mut hosts = self.lock();
        let q = hosts.entry(host_id.to_string()).or_default();
        q.push_back(point);
        while q.len() > KEPT {
            q.pop_front();
        }
    }

    /// The samples of host `host_id`, oldest first.
    pub fn points(&self, host_id: &str) -> Vec<LoadPoint> {
        self.lock()
            .get(host_id)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forget hosts for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: i64) -> LoadPoint {
        LoadPoint {
            t,
            cpu: 0.5,
            memory: 0.25,
            load_1m: 1.0,
        }
    }

    #[test]
    fn keeps_the_last_hour_per_host() {
        let h = LoadHistory::default();
        for t in 0..(KEPT as i64 + 5) {
            h.record("a", p(t));
        }
        h.record("b", p(7));
        let a = h.points("a");
        assert_eq!(a.len(), KEPT);
        assert_eq!(a[0].t, 5);
        assert_eq!(h.points("b").len(), 1);
        h.retain(|id| id == "b");
        assert!(h.points("a").is_empty());
        assert!(h.points("nobody").is_empty());
    }
}
