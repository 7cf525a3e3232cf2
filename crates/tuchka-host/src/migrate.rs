//! Live migration on the host side: what to ask libvirt for, and what it reports back.
//!
//! A live migration of a tuchka VM is peer-to-peer (the source libvirtd talks to the
//! destination libvirtd itself), `NON_SHARED_INC` (only the VM's qcow2 overlay is copied, over
//! NBD; the destination already has the same cached base image and a fresh overlay over it
//! with the same virtual size — libvirt refuses to pre-create disks for incremental copies),
//! with auto-converge, `PERSIST_DEST | UNDEFINE_SOURCE`, and only `vda` copied. All three of
//! its connections are unix sockets carried by the channel ([`crate::channel`]):
//! [`LiveMigration::through`] fills them in from the migration's [`MigrationPaths`].
//!
//! [`crate::Hypervisor::migrate_live`] blocks while libvirt migrates and reports
//! [`MigrationProgress`] from the job every [`LiveMigration::poll_interval`]; its
//! [`MigrationOutcome`] carries the downtime libvirt measured. The domain XML for the
//! destination is the source's migratable XML with its pool paths moved to the destination's
//! pool ([`retarget_domain_xml`]; hosts usually share the pool path, simulated hosts do not).
//!
//! Aborting: the `virt` crate has no safe abort-job call, so a migration is aborted by cutting
//! its channel ([`crate::channel::TunnelHandle::cut`]); libvirt then fails the job, resumes the
//! domain on the source and destroys the incoming domain on the destination.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::channel::{MigrationPaths, Tunnel};
use crate::{HostError, Hypervisor};

/// The disk a tuchka VM's overlay is attached as.
pub const ROOT_DISK_TARGET: &str = "vda";
/// Default time between two progress reports.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(300);

/// One live migration, as [`crate::Hypervisor::migrate_live`] performs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMigration {
    /// The domain on this host.
    pub domain: String,
    /// The destination libvirt (`qemu+unix:///system?socket=<dir>/libvirt.sock`).
    pub dest_uri: String,
    /// qemu's migration stream (`unix://<dir>/memory.sock`).
    pub memory_uri: String,
    /// The NBD disk stream (`unix://<dir>/disk.sock`).
    pub disks_uri: String,
    /// The domain XML for the destination ([`retarget_domain_xml`] of the migratable XML).
    pub dest_xml: String,
    /// The persistent definition the destination keeps (`PERSIST_DEST`); `None`: the same as
    /// `dest_xml`. Without it libvirt would persist the *source's* definition, with the
    /// source's paths (measured), which breaks the next boot wherever the pools differ.
    pub persist_xml: Option<String>,
    /// The disks to copy (their targets, e.g. `vda`).
    pub disks: Vec<String>,
    /// Longest pause allowed at the switch-over (QEMU's default, 300 ms, when `None`).
    pub max_downtime: Option<Duration>,
    /// Throttle the guest's vCPUs when memory does not converge.
    pub auto_converge: bool,
    /// Bandwidth cap in MiB/s (none when `None`).
    pub bandwidth_mib_s: Option<u64>,
    /// Time between two progress reports.
    pub poll_interval: Duration,
}

impl LiveMigration {
    /// A migration of `domain` through the channel sockets `paths`, copying `vda`, with
    /// auto-converge and QEMU's default downtime limit.
    pub fn through(paths: &MigrationPaths, domain: &str, dest_xml: String) -> Self {
        LiveMigration {
            domain: domain.to_string(),
            dest_uri: paths.dest_uri(),
            memory_uri: paths.memory_uri(),
            disks_uri: paths.disks_uri(),
            dest_xml,
            persist_xml: None,
            disks: vec![ROOT_DISK_TARGET.to_string()],
            max_downtime: None,
            auto_converge: true,
            bandwidth_mib_s: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// The `virDomainMigrateFlags` (pure).
    pub fn flags(&self) -> u32 {
        use virt::sys;
        let mut f = sys::VIR_MIGRATE_LIVE
            | sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_NON_SHARED_INC
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        if self.auto_converge {
            f |= sys::VIR_MIGRATE_AUTO_CONVERGE;
        }
        f
    }

    /// Refuse what libvirt (or the `virt` crate, which panics on NUL bytes) cannot take.
    pub fn validate(&self) -> Result<(), String> {
        let fields: [(&str, &str); 5] = [
            ("domain", &self.domain),
            ("destination URI", &self.dest_uri),
            ("migration URI", &self.memory_uri),
            ("disks URI", &self.disks_uri),
            ("destination XML", &self.dest_xml),
        ];
        for (what, v) in fields {
            if v.is_empty() {
                return Err(format!("{what} is empty"));
            }
            if v.contains('\0') {
                return Err(format!("{what} contains a NUL byte"));
            }
        }
        if self
            .persist_xml
            .as_deref()
            .is_some_and(|x| x.is_empty() || x.contains('\0'))
        {
            return Err("persistent XML is empty or contains a NUL byte".to_string());
        }
        if self.disks.is_empty() {
            return Err("no disk to copy (a tuchka VM copies vda)".to_string());
        }
        if self.disks.iter().any(|d| d.is_empty() || d.contains('\0')) {
            return Err("a disk target is empty or contains a NUL byte".to_string());
        }
        if self.poll_interval.is_zero() {
            return Err("the poll interval is zero".to_string());
        }
        Ok(())
    }
}

/// How far a running migration is, from libvirt's job information.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// Time since the job started (libvirt's clock).
    pub elapsed: Duration,
    /// Bytes to transfer in total (memory + disk), as libvirt estimates it now.
    pub data_total: u64,
    /// Bytes transferred.
    pub data_processed: u64,
    /// Bytes left.
    pub data_remaining: u64,
    /// Memory bytes transferred.
    pub mem_processed: u64,
    /// Memory bytes left.
    pub mem_remaining: u64,
    /// Disk bytes transferred.
    pub disk_processed: u64,
    /// Disk bytes left.
    pub disk_remaining: u64,
}

/// What a finished live migration took.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationOutcome {
    /// Wall-clock time of the whole call.
    pub total: Duration,
    /// libvirt's job time on the destination, when known.
    pub job_time: Option<Duration>,
    /// How long the guest was paused at the switch-over, when known (libvirt's completed job
    /// statistics).
    pub downtime: Option<Duration>,
    /// Bytes the job transferred (memory, from the completed statistics; else the last
    /// progress report, memory and disk).
    pub bytes: u64,
    /// `bytes` over `total`, in MiB/s.
    pub mib_per_s: f64,
}

impl MigrationOutcome {
    /// The outcome from the call's duration, the completed statistics (if read) and the last
    /// progress report.
    pub fn new(
        total: Duration,
        completed: Option<&CompletedStats>,
        last: Option<&MigrationProgress>,
    ) -> Self {
        let bytes = completed
            .and_then(|c| c.data_processed)
            .or_else(|| last.map(|p| p.data_processed))
            .unwrap_or(0);
        let secs = total.as_secs_f64();
        MigrationOutcome {
            total,
            job_time: completed.and_then(|c| c.time_elapsed),
            downtime: completed.and_then(|c| c.downtime),
            bytes,
            mib_per_s: if secs > 0.0 {
                bytes as f64 / secs / (1024.0 * 1024.0)
            } else {
                0.0
            },
        }
    }
}

/// A live migration through the channel that failed, with what the channel saw (a cut, a
/// refusal by the target) — libvirt's own message rarely names the cause.
#[derive(Debug, thiserror::Error)]
#[error("migration {migration} of domain {domain} to host {target} failed{}", channel_note(.channel))]
pub struct MigrationFailed {
    /// Migration id.
    pub migration: String,
    /// The domain (still on this host, in the state it had).
    pub domain: String,
    /// The target host id.
    pub target: String,
    /// The channel's problems, oldest first.
    pub channel: Vec<String>,
    /// What libvirt (or the checks before it) said.
    #[source]
    pub source: Box<HostError>,
}

impl MigrationFailed {
    /// The message and every cause, joined by ": ".
    pub fn chain(&self) -> String {
        format!("{self}: {}", self.source.chain())
    }
}

fn channel_note(problems: &[String]) -> String {
    if problems.is_empty() {
        String::new()
    } else {
        format!(" ({})", problems.join("; "))
    }
}

/// Live-migrate through `tunnel` (open, to the target): [`Hypervisor::migrate_live`], with the
/// channel's problems in the error when it fails. Blocks; call it from a blocking thread, not
/// from the runtime the tunnel runs on if that runtime has a single thread.
pub fn migrate_through(
    hv: &dyn Hypervisor,
    tunnel: &Tunnel,
    m: &LiveMigration,
    progress: &mut dyn FnMut(&MigrationProgress),
) -> Result<MigrationOutcome, MigrationFailed> {
    hv.migrate_live(m, progress)
        .map_err(|source| MigrationFailed {
            migration: tunnel.migration_id().to_string(),
            domain: m.domain.clone(),
            target: tunnel.target().host_id.clone(),
            channel: tunnel.stats().problems(),
            source: Box::new(source),
        })
}

/// The completed-job statistics libvirt keeps after a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletedStats {
    /// Total job time.
    pub time_elapsed: Option<Duration>,
    /// Guest pause at the switch-over.
    pub downtime: Option<Duration>,
    /// The same without the network transfer time.
    pub downtime_net: Option<Duration>,
    /// Bytes transferred.
    pub data_processed: Option<u64>,
    /// Memory transfer rate, bytes per second.
    pub memory_bps: Option<u64>,
    /// Memory passes.
    pub memory_iteration: Option<u64>,
}

/// Parse `virsh domjobinfo --completed --rawstats` output (`name: value` lines; pure).
///
/// (The `virt` crate's `get_job_stats` turns libvirt's empty answer — no job, or statistics
/// already consumed — into `Vec::from_raw_parts(NULL, 0, 0)`, which aborts a debug build and
/// is undefined behaviour in a release one, so the completed statistics are read through
/// virsh instead.)
pub fn parse_completed_stats(text: &str) -> CompletedStats {
    let mut s = CompletedStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "time_elapsed" => s.time_elapsed = Some(Duration::from_millis(v)),
            "downtime" => s.downtime = Some(Duration::from_millis(v)),
            "downtime_net" => s.downtime_net = Some(Duration::from_millis(v)),
            "data_processed" => s.data_processed = Some(v),
            "memory_bps" => s.memory_bps = Some(v),
            "memory_iteration" => s.memory_iteration = Some(v),
            _ => {}
        }
    }
    s
}

/// Why a domain XML could not be retargeted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetargetError {
    /// Not XML.
    #[error("domain XML does not parse: {0}")]
    Parse(String),
    /// A pool path is not absolute.
    #[error("pool path {} is not absolute", .0.display())]
    Relative(PathBuf),
}

/// The domain XML `xml` with every file of the pool `from_pool` moved to `to_pool` (pure):
/// the `file`, `path` and `dir` attributes of `<source>` elements — disks, their backing
/// chains, the seed CD-ROM, the serial console — that lie under `from_pool`. Everything else,
/// byte for byte, stays as it was. Paths outside the pool are left alone.
pub fn retarget_domain_xml(
    xml: &str,
    from_pool: &Path,
    to_pool: &Path,
) -> Result<String, RetargetError> {
    for p in [from_pool, to_pool] {
        if !p.is_absolute() {
            return Err(RetargetError::Relative(p.to_path_buf()));
        }
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| RetargetError::Parse(e.to_string()))?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for node in doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "source")
    {
        for attr in node.attributes() {
            if !matches!(attr.name(), "file" | "path" | "dir") || attr.namespace().is_some() {
                continue;
            }
            let Ok(rest) = Path::new(attr.value()).strip_prefix(from_pool) else {
                continue;
            };
            let moved = to_pool.join(rest);
            edits.push((
                attr.range_value(),
                crate::domain_xml::xml_escape(&moved.to_string_lossy()),
            ));
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for (range, text) in edits {
        out.push_str(&xml[at..range.start]);
        out.push_str(&text);
        at = range.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_peer_to_peer_incremental_and_persistent() {
        use virt::sys;
        let paths = MigrationPaths::new(
            Path::new("/run/tuchka"),
            "0f2a6c1e-0000-4000-8000-000000000001",
            "m1",
        )
        .expect("paths");
        let mut m = LiveMigration::through(&paths, "tk-0f2a6c1e-web-0", "<domain/>".into());
        assert_eq!(m.disks, vec!["vda"]);
        assert_eq!(
            m.dest_uri,
            "qemu+unix:///system?socket=/run/tuchka/migrate/0f2a6c1e-m1/libvirt.sock"
        );
        assert_eq!(
            m.memory_uri,
            "unix:///run/tuchka/migrate/0f2a6c1e-m1/memory.sock"
        );
        assert_eq!(
            m.disks_uri,
            "unix:///run/tuchka/migrate/0f2a6c1e-m1/disk.sock"
        );
        let f = m.flags();
        for flag in [
            sys::VIR_MIGRATE_LIVE,
            sys::VIR_MIGRATE_PEER2PEER,
            sys::VIR_MIGRATE_NON_SHARED_INC,
            sys::VIR_MIGRATE_PERSIST_DEST,
            sys::VIR_MIGRATE_UNDEFINE_SOURCE,
            sys::VIR_MIGRATE_AUTO_CONVERGE,
        ] {
            assert_ne!(f & flag, 0, "flag {flag:#x}");
        }
        for flag in [
            sys::VIR_MIGRATE_NON_SHARED_DISK,
            sys::VIR_MIGRATE_TUNNELLED,
            sys::VIR_MIGRATE_POSTCOPY,
        ] {
            assert_eq!(f & flag, 0, "flag {flag:#x}");
        }
        m.auto_converge = false;
        assert_eq!(m.flags() & sys::VIR_MIGRATE_AUTO_CONVERGE, 0);
        assert_eq!(m.validate(), Ok(()));
        m.dest_xml = "a\0b".into();
        assert!(m.validate().is_err());
    }

    #[test]
    fn completed_stats_come_from_virsh_rawstats() {
        let text = "Job type: 3\n\noperation: 4\ntime_elapsed: 2030\ntime_elapsed_net: 2024\n\
                    downtime: 186\ndowntime_net: 180\nsetup_time: 2\ndata_total: 268967936\n\
                    data_processed: 104581669\ndata_remaining: 0\nmemory_bps: 98764454\n\
                    memory_iteration: 3\nbogus line\nx: y\n";
        let s = parse_completed_stats(text);
        assert_eq!(s.downtime, Some(Duration::from_millis(186)));
        assert_eq!(s.downtime_net, Some(Duration::from_millis(180)));
        assert_eq!(s.time_elapsed, Some(Duration::from_millis(2030)));
        assert_eq!(s.data_processed, Some(104_581_669));
        assert_eq!(s.memory_iteration, Some(3));
        assert_eq!(
            parse_completed_stats("Job type: 0\n"),
            CompletedStats::default()
        );

        let o = MigrationOutcome::new(Duration::from_secs(2), Some(&s), None);
        assert_eq!(o.downtime, Some(Duration::from_millis(186)));
        assert_eq!(o.bytes, 104_581_669);
        assert!((o.mib_per_s - 104_581_669.0 / 2.0 / 1_048_576.0).abs() < 1e-9);
        let last = MigrationProgress {
            data_processed: 7,
            ..Default::default()
        };
        let o = MigrationOutcome::new(Duration::ZERO, None, Some(&last));
        assert_eq!((o.bytes, o.downtime, o.mib_per_s), (7, None, 0.0));
    }

    #[test]
    fn retargeting_moves_only_pool_paths() {
        let xml = "<domain type='qemu'><name>a&amp;b</name><devices>\
            <disk type='file'><source file='/p1/pool/vms/v/root.qcow2'/>\
              <backingStore type='file'><source file=\"/p1/pool/images/x.qcow2\"/></backingStore></disk>\
            <disk type='file'><source file='/p1/pool2/other.img'/></disk>\
            <disk type='file'><source file='/data/keep.img'/></disk>\
            <serial type='file'><source path='/p1/pool/vms/v/console.log' append='on'/></serial>\
            <source file='/p1/pool/it&apos;s.iso'/>\
            </devices></domain>";
        let out = retarget_domain_xml(xml, Path::new("/p1/pool"), Path::new("/p2/pool"))
            .expect("retarget");
        assert_eq!(
            out,
            "<domain type='qemu'><name>a&amp;b</name><devices>\
            <disk type='file'><source file='/p2/pool/vms/v/root.qcow2'/>\
              <backingStore type='file'><source file=\"/p2/pool/images/x.qcow2\"/></backingStore></disk>\
            <disk type='file'><source file='/p1/pool2/other.img'/></disk>\
            <disk type='file'><source file='/data/keep.img'/></disk>\
            <serial type='file'><source path='/p2/pool/vms/v/console.log' append='on'/></serial>\
            <source file='/p2/pool/it&apos;s.iso'/>\
            </devices></domain>"
        );
        let same = retarget_domain_xml(xml, Path::new("/p1/pool"), Path::new("/p1/pool"))
            .expect("same pool");
        assert_eq!(same, xml);
        assert!(matches!(
            retarget_domain_xml("<domain>", Path::new("/a"), Path::new("/b")),
            Err(RetargetError::Parse(_))
        ));
        assert!(matches!(
            retarget_domain_xml(xml, Path::new("p1"), Path::new("/b")),
            Err(RetargetError::Relative(_))
        ));
    }
}
