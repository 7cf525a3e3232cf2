//! The controller's Prometheus metrics (`GET /metrics`, text format 0.0.4), with
//! `prometheus-client` (the Prometheus project's own Rust client).
//!
//! Two kinds of figures:
//! - **events**, counted as they happen and kept for the life of the process ([`Metrics`]): API
//!   requests by route template, method and status, with their latency; finished operations by
//!   kind and result, with their duration; finished migrations by mode and result, with their
//!   duration and downtime; the scheduler's placements and refusals;
//! - **state**, read from the database at every scrape ([`Scrape`], gathered by
//!   [`crate::monitoring`]): per host its state, capacity, what is promised and what is in use,
//!   load, VMs, cached images and the agent's pass time; VMs by state; running operations; the
//!   number of images, groups and networks.
//!
//! Every name starts with `tuchka_`; sizes are bytes, times seconds, shares 0..1 (Prometheus
//! base units). See docs/monitoring.md for the list, a scrape configuration and alerts.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tuchka_api::{HostState, OperationKind, VmState};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets of the API latency histogram, seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of operation and migration durations, seconds.
const DURATION_BUCKETS: [f64; 13] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Buckets of migration downtime, seconds.
const DOWNTIME_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type GaugeF = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    mode: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurposeLabels {
    purpose: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStateLabels {
    host: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What the scheduler placed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// New VMs of a group (create or scale up).
    Group,
    /// The target of a migration.
    Migration,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Group => "group",
            Purpose::Migration => "migration",
        }
    }
}

/// The event metrics of one controller (see the module docs).
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Histograms<RouteLabels>,
    operations: Family<OpLabels, Counter>,
    op_duration: Histograms<KindLabels>,
    migrations: Family<MigrationLabels, Counter>,
    migration_duration: Histograms<ModeLabels>,
    downtime: Histogram,
    placements: Family<PurposeLabels, Counter>,
    refusals: Family<PurposeLabels, Counter>,
    /// When each running operation started, for a duration finer than its record's seconds.
    started: Mutex<HashMap<String, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            operations: Family::default(),
            op_duration: Family::new_with_constructor(duration_histogram),
            migrations: Family::default(),
            migration_duration: Family::new_with_constructor(duration_histogram),
            downtime: Histogram::new(DOWNTIME_BUCKETS),
            placements: Family::default(),
            refusals: Family::default(),
            started: Mutex::new(HashMap::new()),
        }
    }
}

/// One finished migration, as counted.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationFigures {
    /// `live` or `cold`.
    pub mode: String,
    /// `succeeded` or `failed`.
    pub result: String,
    /// Start to end.
    pub duration: Option<Duration>,
    /// How long the guest was paused (live).
    pub downtime: Option<Duration>,
}

impl Metrics {
    fn started(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one API request: `route` is the matched route template (`/v1/vms/{name}`), not
    /// the path, so names do not make new series.
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Operation `id` started now.
    pub fn operation_started(&self, id: &str) {
        self.started().insert(id.to_string(), Instant::now());
    }

    /// Operation `id` of `kind` finished with `result` (`succeeded`, `failed`); `recorded` is
    /// its duration from its record, used when it started before this process did.
    pub fn operation_finished(
        &self,
        id: &str,
        kind: OperationKind,
        result: &str,
        recorded: Duration,
    ) {
        let took = self
            .started()
            .remove(id)
            .map(|t| t.elapsed())
            .unwrap_or(recorded);
        self.operations
            .get_or_create(&OpLabels {
                kind: kind.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.op_duration
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// A migration finished.
    pub fn migration_finished(&self, m: &MigrationFigures) {
        self.migrations
            .get_or_create(&MigrationLabels {
                mode: m.mode.clone(),
                result: m.result.clone(),
            })
            .inc();
        if let Some(d) = m.duration {
            self.migration_duration
                .get_or_create(&ModeLabels {
                    mode: m.mode.clone(),
                })
                .observe(d.as_secs_f64());
        }
        if let Some(d) = m.downtime {
            self.downtime.observe(d.as_secs_f64());
        }
    }

    /// The scheduler placed `vms` VMs.
    pub fn placed(&self, purpose: Purpose, vms: usize) {
        self.placements
            .get_or_create(&PurposeLabels {
                purpose: purpose.as_str().into(),
            })
            .inc_by(vms as u64);
    }

    /// The scheduler refused a placement.
    pub fn refused(&self, purpose: Purpose) {
        self.refusals
            .get_or_create(&PurposeLabels {
                purpose: purpose.as_str().into(),
            })
            .inc();
    }

    /// The whole text of a scrape: these counters and the state in `s`.
    pub fn render(&self, s: &Scrape) -> Result<String, std::fmt::Error> {
        let mut r = Registry::with_prefix("tuchka");
        let build = Family::<VersionLabels, GaugeF>::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1.0);
        r.register("build_info", "The tuchka version of this controller", build);
        self.register_events(&mut r);
        register_hosts(&mut r, &s.hosts);
        let vms = Family::<StateLabels, GaugeF>::default();
        for state in VmState::ALL {
            let n = s.vms.iter().filter(|v| *v == state).count();
            vms.get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .set(n as f64);
        }
        r.register(
            "vms",
            "VMs by observed state (as `tuchka vm list` shows them)",
            vms,
        );
        let running = Family::<KindLabels, GaugeF>::default();
        for kind in OperationKind::ALL {
            let n = s.running_operations.iter().filter(|k| *k == kind).count();
            running
                .get_or_create(&KindLabels {
                    kind: kind.to_string(),
                })
                .set(n as f64);
        }
        r.register(
            "operations_running",
            "Operations still running, by kind",
            running,
        );
        for (name, help, n) in [
            ("images", "Images in the image store", s.images),
            ("groups", "Groups of VMs", s.groups),
            ("networks", "Virtual networks", s.networks),
        ] {
            let g = GaugeF::default();
            g.set(n as f64);
            r.register(name, help, g);
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
        Ok(out)
    }

    fn register_events(&self, r: &mut Registry) {
        r.register(
            "api_requests",
            "API requests by method, route template and status",
            self.requests.clone(),
        );
        r.register(
            "api_request_duration_seconds",
            "Time to answer an API request (to its headers; long polls and streams included)",
            self.latency.clone(),
        );
        r.register(
            "operations",
            "Finished operations by kind and result",
            self.operations.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Time from an operation's start to its end, by kind",
            self.op_duration.clone(),
        );
        r.register(
            "migrations",
            "Finished migrations by mode and result",
            self.migrations.clone(),
        );
        r.register(
            "migration_duration_seconds",
            "Time from a migration's start to its end, by mode",
            self.migration_duration.clone(),
        );
        r.register(
            "migration_downtime_seconds",
            "How long a live migration paused the guest (libvirt's job statistics)",
            self.downtime.clone(),
        );
        r.register(
            "scheduler_placements",
            "VMs the scheduler placed, for a group or as a migration target",
            self.placements.clone(),
        );
        r.register(
            "scheduler_refusals",
            "Placements the scheduler refused (not enough room, anti-affinity, no host)",
            self.refusals.clone(),
        );
    }
}

/// What a scrape reports of the state (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Every host.
    pub hosts: Vec<HostFigures>,
    /// The observed state of every VM.
    pub vms: Vec<VmState>,
    /// The kind of every running operation.
    pub running_operations: Vec<OperationKind>,
    /// Number of images.
    pub images: usize,
    /// Number of groups.
    pub groups: usize,
    /// Number of networks.
    pub networks: usize,
}

/// One host's figures, as `tuchka host list` shows them (MiB here, bytes in the metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct HostFigures {
    /// Host name.
    pub name: String,
    /// Its state.
    pub state: HostState,
    /// Logical CPUs.
    pub cpus: u32,
    /// vCPUs given to its VMs.
    pub cpus_used: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Memory given to its VMs, MiB.
    pub memory_used_mib: u64,
    /// Memory in use on the host (measured), MiB.
    pub memory_in_use_mib: u64,
    /// Storage pool size, MiB.
    pub disk_mib: u64,
    /// Storage pool free, MiB.
    pub disk_free_mib: u64,
    /// Root disks provisioned to its VMs, MiB.
    pub disk_provisioned_mib: u64,
    /// CPU in use, 0..1 of its CPUs.
    pub cpu_usage: f64,
    /// 1-minute load average.
    pub load_1m: f64,
    /// VMs placed on it.
    pub vms: usize,
    /// Images in its cache.
    pub cached_images: usize,
    /// Duration of its agent's last pass, ms.
    pub pass_ms: u64,
    /// Its last report, Unix seconds (0: never).
    pub last_seen_unix: i64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn register_hosts(r: &mut Registry, hosts: &[HostFigures]) {
    let state = Family::<HostStateLabels, GaugeF>::default();
    for h in hosts {
        for s in HostState::ALL {
            state
                .get_or_create(&HostStateLabels {
                    host: h.name.clone(),
                    state: s.to_string(),
                })
                .set(if h.state == *s { 1.0 } else { 0.0 });
        }
    }
    r.register(
        "host_state",
        "1 for the state each host is in (up, down, draining, revoked), 0 for the others",
        state,
    );
    type Figure = fn(&HostFigures) -> f64;
    let figures: [(&str, &str, Figure); 15] = [
        ("host_cpus", "Logical CPUs of the host", |h| {
            f64::from(h.cpus)
        }),
        (
            "host_cpus_used",
            "vCPUs given to the VMs placed on the host",
            |h| f64::from(h.cpus_used),
        ),
        ("host_memory_bytes", "Memory of the host", |h| {
            h.memory_mib as f64 * MIB
        }),
        (
            "host_memory_used_bytes",
            "Memory given to the VMs placed on the host",
            |h| h.memory_used_mib as f64 * MIB,
        ),
        (
            "host_memory_in_use_bytes",
            "Memory in use on the host, as its agent measures it (total minus available)",
            |h| h.memory_in_use_mib as f64 * MIB,
        ),
        ("host_disk_bytes", "Size of the host's storage pool", |h| {
            h.disk_mib as f64 * MIB
        }),
        (
            "host_disk_free_bytes",
            "Free space of the host's storage pool",
            |h| h.disk_free_mib as f64 * MIB,
        ),
        (
            "host_disk_provisioned_bytes",
            "Root disk sizes provisioned to the VMs placed on the host (thin)",
            |h| h.disk_provisioned_mib as f64 * MIB,
        ),
        (
            "host_cpu_usage_ratio",
            "CPU in use on the host lately, 0..1 of its CPUs",
            |h| h.cpu_usage,
        ),
        ("host_load1", "1-minute load average of the host", |h| {
            h.load_1m
        }),
        ("host_vms", "VMs placed on the host", |h| h.vms as f64),
        ("host_cached_images", "Images in the host's cache", |h| {
            h.cached_images as f64
        }),
        (
            "host_agent_pass_seconds",
            "Duration of the host agent's last pass (image fetches and reconcile)",
            |h| h.pass_ms as f64 / 1000.0,
        ),
        (
            "host_last_report_timestamp_seconds",
            "When the host's agent last reported, Unix time",
            |h| h.last_seen_unix as f64,
        ),
        (
            "host_up",
            "1 while the host reports (up or draining), else 0",
            |h| {
                if matches!(h.state, HostState::Up | HostState::Draining) {
                    1.0
                } else {
                    0.0
                }
            },
        ),
    ];
    for (name, help, f) in figures {
        let fam = Family::<HostLabels, GaugeF>::default();
        for h in hosts {
            fam.get_or_create(&HostLabels {
                host: h.name.clone(),
            })
            .set(f(h));
        }
        r.register(name, help, fam);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, state: HostState) -> HostFigures {
        HostFigures {
            name: name.into(),
            state,
            cpus: 8,
            cpus_used: 3,
            memory_mib: 16384,
            memory_used_mib: 768,
            memory_in_use_mib: 4096,
            disk_mib: 100_000,
            disk_free_mib: 50_000,
            disk_provisioned_mib: 3072,
            cpu_usage: 0.25,
            load_1m: 1.5,
            vms: 3,
            cached_images: 1,
            pass_ms: 42,
            last_seen_unix: 1_700_000_000,
        }
    }

    #[test]
    fn a_scrape_names_every_figure_once_with_base_units() {
        let m = Metrics::default();
        m.request("GET", "/v1/vms/{name}", 200, Duration::from_millis(3));
        m.request("GET", "/v1/vms/{name}", 404, Duration::from_millis(1));
        m.operation_started("op1");
        m.operation_finished(
            "op1",
            OperationKind::VmStart,
            "succeeded",
            Duration::from_secs(9),
        );
        m.migration_finished(&MigrationFigures {
            mode: "live".into(),
            result: "succeeded".into(),
            duration: Some(Duration::from_secs(3)),
            downtime: Some(Duration::from_millis(120)),
        });
        m.placed(Purpose::Group, 3);
        m.refused(Purpose::Migration);
        let text = m
            .render(&Scrape {
                hosts: vec![host("h1", HostState::Up), host("h2", HostState::Down)],
                vms: vec![VmState::Running, VmState::Running, VmState::Stopped],
                running_operations: vec![OperationKind::VmMigrate],
                images: 1,
                groups: 2,
                networks: 3,
            })
            .expect("render");
        let series: HashMap<&str, f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k, v.parse::<f64>().expect("a number")))
            .collect();
        for (name, want) in [
            (
                "tuchka_api_requests_total{method=\"GET\",route=\"/v1/vms/{name}\",status=\"404\"}",
                1.0,
            ),
            (
                "tuchka_operations_total{kind=\"vm.start\",result=\"succeeded\"}",
                1.0,
            ),
            (
                "tuchka_migrations_total{mode=\"live\",result=\"succeeded\"}",
                1.0,
            ),
            ("tuchka_migration_downtime_seconds_bucket{le=\"0.25\"}", 1.0),
            ("tuchka_migration_downtime_seconds_bucket{le=\"0.1\"}", 0.0),
            ("tuchka_scheduler_placements_total{purpose=\"group\"}", 3.0),
            (
                "tuchka_scheduler_refusals_total{purpose=\"migration\"}",
                1.0,
            ),
            ("tuchka_host_state{host=\"h2\",state=\"down\"}", 1.0),
            ("tuchka_host_state{host=\"h2\",state=\"up\"}", 0.0),
            ("tuchka_host_memory_bytes{host=\"h1\"}", 17179869184.0),
            ("tuchka_host_agent_pass_seconds{host=\"h1\"}", 0.042),
            ("tuchka_host_up{host=\"h2\"}", 0.0),
            ("tuchka_vms{state=\"running\"}", 2.0),
            ("tuchka_vms{state=\"paused\"}", 0.0),
            ("tuchka_operations_running{kind=\"vm.migrate\"}", 1.0),
            ("tuchka_networks", 3.0),
            // The operation's own clock was used, not its record's 9 s.
            (
                "tuchka_operation_duration_seconds_bucket{kind=\"vm.start\",le=\"0.25\"}",
                1.0,
            ),
        ] {
            assert_eq!(series.get(name), Some(&want), "{name} in\n{text}");
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), types, "every family is declared once");
    }
}
