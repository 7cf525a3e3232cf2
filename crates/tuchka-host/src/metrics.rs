//! Load measurements for the balancer: the host's CPU usage (from `/proc/stat`), its memory in
//! use (from `/proc/meminfo`) and each VM's CPU usage (from the domain's cumulative CPU time,
//! libvirt's `virDomainGetInfo` `cpuTime`).
//!
//! CPU counters are cumulative, so a usage is the change between two samples. [`LoadSampler`]
//! keeps the previous sample and follows these rules:
//!
//! - The first sample of the host, or of a VM, gives no usage (`None` / absent), only a
//!   baseline: the balancer leaves such a host out rather than take it for idle.
//! - A counter that goes backwards (a VM restarted, a domain defined anew; the kernel's `iowait`
//!   can also dip) makes the sample the new baseline and gives no usage this time.
//! - No elapsed time (two samples at the same instant, or no jiffy ticked) gives no usage and
//!   keeps the older baseline, so the next sample measures across both.
//! - VMs absent from a sample are forgotten; new ones start with a baseline.
//!
//! Units: `/proc/stat` counts jiffies (`USER_HZ` ticks; only ratios are used, so `USER_HZ`
//! does not matter); libvirt counts nanoseconds of CPU time; the sample's time is a monotonic
//! [`Duration`] (e.g. `Instant::elapsed` of a fixed start); memory is in MiB; a host's usage is
//! a fraction 0..=1 of all its CPUs; a VM's usage is in cores (1.0 = one core busy all the
//! time; it can exceed the vCPU count slightly, as the domain's time includes QEMU's own
//! threads).
//!
//! Everything is pure but [`read_host_counters`], which only reads the two files.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::checks::meminfo_mib;
use crate::error::HostError;

/// The aggregate `cpu` line of `/proc/stat`, in jiffies since boot. `guest` and `guest_nice`
/// are not kept: the kernel already counts them in `user` and `nice`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Normal processes in user mode.
    pub user: u64,
    /// Niced processes in user mode.
    pub nice: u64,
    /// Kernel mode.
    pub system: u64,
    /// Idle.
    pub idle: u64,
    /// Idle while waiting for I/O.
    pub iowait: u64,
    /// Servicing interrupts.
    pub irq: u64,
    /// Servicing softirqs.
    pub softirq: u64,
    /// Taken by the hypervisor when this host is itself a VM: not available to this host's
    /// guests, so it counts as busy.
    pub steal: u64,
}

impl CpuTimes {
    /// All time, jiffies.
    pub fn total(&self) -> u64 {
        self.user
            .saturating_add(self.nice)
            .saturating_add(self.system)
            .saturating_add(self.idle)
            .saturating_add(self.iowait)
            .saturating_add(self.irq)
            .saturating_add(self.softirq)
            .saturating_add(self.steal)
    }

    /// Idle time (`idle + iowait`), jiffies.
    pub fn idle_all(&self) -> u64 {
        self.idle.saturating_add(self.iowait)
    }
}

/// Memory of the host, MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_mib: u64,
    /// `MemAvailable` (or, on kernels before 3.14, `MemFree + Buffers + Cached`).
    pub available_mib: u64,
}

impl MemInfo {
    /// Memory in use: total − available, MiB.
    pub fn in_use_mib(&self) -> u64 {
        self.total_mib.saturating_sub(self.available_mib)
    }
}

/// The host's counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// From `/proc/stat`.
    pub cpu: CpuTimes,
    /// From `/proc/meminfo`.
    pub memory: MemInfo,
}

/// One VM's cumulative CPU time, as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCpuTime {
    /// VM id (from the domain's metadata).
    pub vm_id: String,
    /// CPU time used since the domain started, nanoseconds (`virDomainGetInfo` `cpuTime`).
    pub cpu_time_ns: u64,
}

/// What an agent reports for the balancer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSample {
    /// Busy fraction of all the host's CPUs since the previous sample, 0..=1; `None` on the
    /// first sample or after a counter reset.
    pub cpu_usage: Option<f64>,
    /// Memory, MiB.
    pub memory_total_mib: u64,
    /// Memory in use (total − available), MiB.
    pub memory_in_use_mib: u64,
    /// Cores used by each VM since the previous sample, by VM id; VMs seen for the first time
    /// (or reset) are absent.
    pub vm_cores: BTreeMap<String, f64>,
}

/// Pure: the aggregate `cpu` line of a `/proc/stat` text. Needs at least `user nice system
/// idle`; later fields default to 0 (old kernels have fewer).
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, HostError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or_else(|| HostError::invalid("/proc/stat", "no aggregate \"cpu\" line"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            HostError::invalid(
                "/proc/stat",
                format!("\"cpu\" line {line:?} has a field that is not a number: {e}"),
            )
        })?;
    if fields.len() < 4 {
        return Err(HostError::invalid(
            "/proc/stat",
            format!("\"cpu\" line {line:?} has fewer than 4 fields"),
        ));
    }
    let f = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(CpuTimes {
        user: f(0),
        nice: f(1),
        system: f(2),
        idle: f(3),
        iowait: f(4),
        irq: f(5),
        softirq: f(6),
        steal: f(7),
    })
}

/// Pure: total and available memory from a `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, HostError> {
    let total_mib = meminfo_mib(text, "MemTotal:")
        .ok_or_else(|| HostError::invalid("/proc/meminfo", "no MemTotal line"))?;
    let available_mib = match meminfo_mib(text, "MemAvailable:") {
        Some(a) => a,
        None => ["MemFree:", "Buffers:", "Cached:"]
            .iter()
            .map(|k| meminfo_mib(text, k))
            .sum::<Option<u64>>()
            .ok_or_else(|| {
                HostError::invalid(
                    "/proc/meminfo",
                    "neither MemAvailable nor MemFree, Buffers and Cached",
                )
            })?,
    };
    Ok(MemInfo {
        total_mib,
        available_mib: available_mib.min(total_mib),
    })
}

/// Pure: both host counters from the texts of `/proc/stat` and `/proc/meminfo`.
pub fn parse_host_counters(stat: &str, meminfo: &str) -> Result<HostCounters, HostError> {
    Ok(HostCounters {
        cpu: parse_proc_stat(stat)?,
        memory: parse_meminfo(meminfo)?,
    })
}

/// The host's counters now: reads `/proc/stat` and `/proc/meminfo`.
pub fn read_host_counters() -> Result<HostCounters, HostError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|e| HostError::io("host", "read", path, e))
    };
    parse_host_counters(&read("/proc/stat")?, &read("/proc/meminfo")?)
}

/// Why two samples give no usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoUsage {
    /// A counter went backwards: start over from the newer sample.
    Reset,
    /// Nothing elapsed: keep the older sample.
    NoTime,
}

/// Pure: the busy fraction of the host's CPUs between two samples, 0..=1:
/// `(Δtotal − Δidle) / Δtotal`.
pub fn cpu_usage(prev: &CpuTimes, cur: &CpuTimes) -> Option<f64> {
    host_usage(prev, cur).ok()
}

fn host_usage(prev: &CpuTimes, cur: &CpuTimes) -> Result<f64, NoUsage> {
    let (t0, t1) = (prev.total(), cur.total());
    if t1 < t0 || cur.user < prev.user || cur.system < prev.system {
        return Err(NoUsage::Reset);
    }
    let dt = t1 - t0;
    if dt == 0 {
        return Err(NoUsage::NoTime);
    }
    // iowait may dip a little; count each idle counter's growth on its own.
    let didle = cur.idle.saturating_sub(prev.idle) + cur.iowait.saturating_sub(prev.iowait);
    Ok((1.0 - didle as f64 / dt as f64).clamp(0.0, 1.0))
}

/// Pure: cores a VM used between two samples `(time, cpu_time_ns)`: `Δcpu_ns / Δtime_ns`.
pub fn vm_cores(prev: (Duration, u64), cur: (Duration, u64)) -> Option<f64> {
    vm_usage(prev, cur).ok()
}

fn vm_usage(prev: (Duration, u64), cur: (Duration, u64)) -> Result<f64, NoUsage> {
    if cur.0 < prev.0 || cur.1 < prev.1 {
        return Err(NoUsage::Reset);
    }
    let wall = (cur.0 - prev.0).as_nanos();
    if wall == 0 {
        return Err(NoUsage::NoTime);
    }
    Ok((cur.1 - prev.1) as f64 / wall as f64)
}

/// Turns successive samples into usages (see the module docs for the rules).
#[derive(Debug, Clone, Default)]
pub struct LoadSampler {
    host: Option<CpuTimes>,
    vms: BTreeMap<String, (Duration, u64)>,
}

impl LoadSampler {
    /// A sampler with no baseline yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take one sample: `at` is the monotonic time it was taken, `host` the host's counters,
    /// `vms` the CPU time of every VM running on the host (all of them: one left out is
    /// forgotten and starts again from a baseline).
    pub fn sample(&mut self, at: Duration, host: &HostCounters, vms: &[VmCpuTime]) -> LoadSample {
        let cpu_usage = match self.host.as_ref().map(|p| host_usage(p, &host.cpu)) {
            Some(Ok(u)) => {
                self.host = Some(host.cpu);
                Some(u)
            }
            Some(Err(NoUsage::NoTime)) => None,
            Some(Err(NoUsage::Reset)) | None => {
                self.host = Some(host.cpu);
                None
            }
        };
        let mut vm_cores = BTreeMap::new();
        let mut next = BTreeMap::new();
        for v in vms {
            let cur = (at, v.cpu_time_ns);
            let keep = match self.vms.get(&v.vm_id).map(|&p| (p, vm_usage(p, cur))) {
                Some((_, Ok(c))) => {
                    vm_cores.insert(v.vm_id.clone(), c);
                    cur
                }
                Some((p, Err(NoUsage::NoTime))) => p,
                Some((_, Err(NoUsage::Reset))) | None => cur,
            };
            next.insert(v.vm_id.clone(), keep);
        }
        self.vms = next;
        LoadSample {
            cpu_usage,
            memory_total_mib: host.memory.total_mib,
            memory_in_use_mib: host.memory.in_use_mib(),
            vm_cores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on the 2-vCPU test machine (kernel 6.18), one second apart.
    const STAT_1: &str = "cpu  148368 30457 20036 46350 1691 0 303 3332 0 0
cpu0 74289 14637 9582 24960 238 0 27 1541 0 0
cpu1 74078 15819 10453 21390 1453 0 276 1790 0 0
intr 9718923 0 9 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 15837481
btime 1764614751
processes 40120
procs_running 3
procs_blocked 0
softirq 4455210 0 1088826 3 41187 0 0 5367 1606372 0 1713455
";
    const STAT_2: &str = "cpu  148556 30457 20045 46353 1691 0 303 3332 0 0
cpu0 74384 14637 9586 24961 238 0 27 1541 0 0
cpu1 74172 15819 10459 21392 1453 0 276 1790 0 0
";
    const MEMINFO: &str = "MemTotal:       24683584 kB
MemFree:        20731072 kB
MemAvailable:   23945548 kB
Buffers:           12472 kB
Cached:          3328044 kB
SwapCached:            0 kB
";

    fn counters(stat: &str) -> HostCounters {
        parse_host_counters(stat, MEMINFO).expect("recorded text parses")
    }

    fn vm(id: &str, ns: u64) -> VmCpuTime {
        VmCpuTime {
            vm_id: id.into(),
            cpu_time_ns: ns,
        }
    }

    #[test]
    fn parses_the_aggregate_cpu_line() {
        let c = parse_proc_stat(STAT_1).expect("parses");
        assert_eq!(
            c,
            CpuTimes {
                user: 148_368,
                nice: 30_457,
                system: 20_036,
                idle: 46_350,
                iowait: 1_691,
                irq: 0,
                softirq: 303,
                steal: 3_332,
            }
        );
        assert_eq!(c.total(), 250_537);
        assert_eq!(c.idle_all(), 48_041);
        // Old kernels: 4 fields.
        let old = parse_proc_stat("cpu 10 0 5 85\n").expect("4 fields");
        assert_eq!((old.total(), old.idle_all()), (100, 85));
    }

    #[test]
    fn refuses_bad_stat_text() {
        for (text, says) in [
            ("cpu0 1 2 3 4\n", "no aggregate \"cpu\" line"),
            ("", "no aggregate \"cpu\" line"),
            ("cpu 1 2 3\n", "fewer than 4 fields"),
            ("cpu 1 x 3 4\n", "not a number"),
        ] {
            let e = parse_proc_stat(text).expect_err(text).to_string();
            assert!(e.starts_with("/proc/stat: ") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo(MEMINFO).expect("parses");
        assert_eq!(
            m,
            MemInfo {
                total_mib: 24_105,
                available_mib: 23_384
            }
        );
        assert_eq!(m.in_use_mib(), 721);
        // Before MemAvailable (kernel < 3.14).
        let old =
            "MemTotal: 2048000 kB\nMemFree: 1024000 kB\nBuffers: 10240 kB\nCached: 102400 kB\n";
        assert_eq!(
            parse_meminfo(old).expect("old kernel").available_mib,
            1000 + 10 + 100
        );
        let e = parse_meminfo("MemFree: 1 kB\n").expect_err("no total");
        assert_eq!(e.to_string(), "/proc/meminfo: no MemTotal line");
        assert!(parse_meminfo("MemTotal: 100 kB\n").is_err());
    }

    #[test]
    fn host_usage_from_two_recorded_samples() {
        // Δtotal = 250737 − 250537 = 200 jiffies (2 CPUs × 1 s × USER_HZ 100); Δidle = 3 + 0.
        let u = cpu_usage(&counters(STAT_1).cpu, &counters(STAT_2).cpu).expect("usage");
        assert!((u - 197.0 / 200.0).abs() < 1e-12, "{u}");
    }

    #[test]
    fn sampler_first_sample_reset_and_no_time() {
        let mut s = LoadSampler::new();
        let c1 = counters(STAT_1);
        let c2 = counters(STAT_2);
        let first = s.sample(Duration::from_secs(10), &c1, &[]);
        assert_eq!(first.cpu_usage, None, "first sample: baseline only");
        assert_eq!(
            (first.memory_total_mib, first.memory_in_use_mib),
            (24_105, 721)
        );
        // Same counters again (no jiffy ticked): no usage, the baseline stays c1.
        assert_eq!(s.sample(Duration::from_secs(10), &c1, &[]).cpu_usage, None);
        let u = s.sample(Duration::from_secs(11), &c2, &[]).cpu_usage;
        assert!((u.expect("usage") - 0.985).abs() < 1e-12);
        // Counters went backwards (reset): no usage, c1 is the new baseline...
        assert_eq!(s.sample(Duration::from_secs(12), &c1, &[]).cpu_usage, None);
        // ...and the next sample measures from it.
        assert!(s
            .sample(Duration::from_secs(13), &c2, &[])
            .cpu_usage
            .is_some());
    }

    #[test]
    fn iowait_dipping_does_not_make_usage_negative_or_a_reset() {
        let a = CpuTimes {
            user: 100,
            idle: 1000,
            iowait: 50,
            ..CpuTimes::default()
        };
        let b = CpuTimes {
            user: 150,
            idle: 1100,
            iowait: 48,
            ..CpuTimes::default()
        };
        // Δtotal = 148, Δidle counted as 100 + 0.
        let u = cpu_usage(&a, &b).expect("usage");
        assert!((u - 48.0 / 148.0).abs() < 1e-12, "{u}");
        let idle_only = CpuTimes { idle: 1200, ..a };
        assert_eq!(cpu_usage(&a, &idle_only), Some(0.0));
    }

    #[test]
    fn vm_cores_from_cpu_time() {
        let t = Duration::from_secs;
        // 3 s of CPU time in 2 s of wall time: 1.5 cores.
        assert_eq!(
            vm_cores((t(10), 5_000_000_000), (t(12), 8_000_000_000)),
            Some(1.5)
        );
        assert_eq!(vm_cores((t(10), 5), (t(10), 9)), None, "no wall time");
        assert_eq!(vm_cores((t(10), 9), (t(12), 5)), None, "restarted");
        assert_eq!(vm_cores((t(12), 5), (t(10), 9)), None, "clock went back");
        assert_eq!(vm_cores((t(10), 7), (t(11), 7)), Some(0.0), "idle");
    }

    #[test]
    fn sampler_follows_vms_that_come_go_and_restart() {
        let mut s = LoadSampler::new();
        let h = counters(STAT_1);
        let at = |ms: u64| Duration::from_millis(ms);
        let r = s.sample(at(0), &h, &[vm("a", 0), vm("b", 1_000_000_000)]);
        assert!(r.vm_cores.is_empty(), "first sample of each VM: no usage");
        // 2 s later: a used 1 s of CPU (0.5 cores), b 4 s (2 cores); c is new.
        let r = s.sample(
            at(2_000),
            &h,
            &[vm("a", 1_000_000_000), vm("b", 5_000_000_000), vm("c", 7)],
        );
        assert_eq!(
            r.vm_cores,
            BTreeMap::from([("a".into(), 0.5), ("b".into(), 2.0)])
        );
        // b disappears; a restarts (its counter is lower); c has been seen once.
        let r = s.sample(at(4_000), &h, &[vm("a", 100), vm("c", 2_000_000_007)]);
        assert_eq!(r.vm_cores, BTreeMap::from([("c".into(), 1.0)]));
        // b comes back: a fresh baseline, no usage; a measures from its restart.
        let r = s.sample(
            at(5_000),
            &h,
            &[vm("a", 500_000_100), vm("b", 9_000_000_000)],
        );
        assert_eq!(r.vm_cores, BTreeMap::from([("a".into(), 0.5)]));
        // Two samples at the same instant: no usage, the older baseline is kept.
        let r = s.sample(at(5_000), &h, &[vm("a", 600_000_100)]);
        assert!(r.vm_cores.is_empty());
        let r = s.sample(at(6_000), &h, &[vm("a", 1_500_000_100)]);
        assert_eq!(r.vm_cores, BTreeMap::from([("a".into(), 1.0)]));
    }

    #[test]
    fn reads_this_hosts_counters() {
        let c = read_host_counters().expect("/proc is mounted");
        assert!(c.cpu.total() > 0 && c.memory.total_mib > 0);
        assert!(c.memory.available_mib <= c.memory.total_mib);
    }
}
