//! Capturing a VM's disk into a new standalone image while the VM runs (what
//! `tuchka image create --from-vm` needs on the host), for [`crate::Hypervisor::capture_disk`].
//!
//! The protocol:
//!
//! 1. The disk is found in the domain's XML by its target (`vda`) or its source file, as
//!    libvirt's own disk arguments name disks ([`find_disk`]); its format comes from the XML
//!    and is always passed to qemu-img (`-f`), never probed from the guest-written bytes.
//! 2. **Running or paused domain**: a libvirt push-mode backup of that one disk into
//!    `work_dir` ([`render_backup_xml`]; `virDomainBackupBegin` through `virsh backup-begin`,
//!    because the `virt` crate has no safe binding and the workspace forbids `unsafe`). QEMU's
//!    copy-before-write filter makes it a copy of the disk as it was when the job started,
//!    while the guest keeps running and writing; nothing pauses it. The job is polled every
//!    [`POLL_INTERVAL`] (progress, and whether the guest got paused by anything) until it
//!    ends; libvirt's completed-job statistics say whether it succeeded
//!    ([`parse_backup_end`]). A job that makes no progress for [`STALL_TIMEOUT`] is aborted.
//!    Before it starts, the work directory must have room for the copy (`qemu-img measure`:
//!    the disk's data through its backing chain, uncompressed): a copy that runs out of space
//!    fails the guest's writes to blocks not copied yet (QEMU's copy-before-write default), and
//!    QEMU pauses the guest on that ENOSPC. Should it happen anyway (the file system filled up
//!    meanwhile), a failed capture resumes a guest it finds paused by an I/O error that was
//!    running when the capture began; QEMU retries the write on resume, so the guest sees a
//!    delay, not an error, and `paused_ms` would count it.
//!    **Stopped domain**, or no domain at all when the disk is named by its path (a tuchka
//!    root disk, always qcow2): the file itself is the point-in-time copy; qemu-img holds its
//!    write lock while it reads, so a start during the capture fails instead of changing the
//!    disk under it.
//! 3. `qemu-img convert -O qcow2 -c -o compression_type=zstd` of the copy into `<out>.partial`: compressed, the backing
//!    chain flattened. Its header is checked (qcow2, no backing file), then it is linked to
//!    `out` (which must not exist: an existing file is never replaced) and the partial name is
//!    removed.
//!
//! On failure, and on a panic in the caller's progress callback, a guard aborts a running
//! backup job (`virsh domjobabort`), waits for it to end and deletes the copy and the partial
//! output; `out` is only ever created by the last step. The image is crash-consistent: what
//! the disk held at the job's start, as after a power cut (there is no guest agent to freeze
//! the guest's file systems). A capture killed from outside (the agent dies) can leave
//! `*.capture.qcow2` in `work_dir` and `<out>.partial`; both names are the capture's own.
//!
//! `work_dir` must be on a file system qemu sees: qemu runs in its own mount namespace, made
//! when the domain started, so a file system mounted later is invisible to it (libvirt then
//! reports `Could not open …: No such file or directory`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::domain_xml::xml_escape;
use crate::libvirt::DomainState;
use crate::{cmd, qcow2, HostError};

/// Time between two looks at a running backup job.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A backup job whose copied bytes do not grow for this long is aborted.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an aborted backup job may take to end before its files are deleted anyway.
const ABORT_WAIT: Duration = Duration::from_secs(30);
/// libvirt's `VIR_DOMAIN_JOB_OPERATION_BACKUP` (the `operation` of a job's statistics).
const OPERATION_BACKUP: u64 = 9;

/// What a capture is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePhase {
    /// The backup job copies the running guest's disk into the work directory.
    Copying,
    /// qemu-img writes the compressed image.
    Converting,
}

/// A progress report of [`crate::Hypervisor::capture_disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureProgress {
    /// The phase.
    pub phase: CapturePhase,
    /// Bytes of the disk done in this phase (of its virtual size).
    pub done: u64,
    /// The disk's virtual size, bytes.
    pub total: u64,
}

/// What a finished capture did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureOutcome {
    /// Size of the image file written to `out`, bytes.
    pub bytes: u64,
    /// How long the guest was seen paused while its disk was copied, sampled every
    /// [`POLL_INTERVAL`]: 0 when it ran throughout (a capture never pauses it; a guest paused
    /// before the capture counts). 0 for a stopped domain.
    pub paused_ms: u64,
    /// Wall time of the point-in-time copy (the backup job); 0 for a stopped domain.
    pub copy_ms: u64,
    /// Wall time of the conversion into the compressed image.
    pub convert_ms: u64,
}

/// A file-backed disk of a domain, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRef {
    /// Its target (`vda`).
    pub target: String,
    /// Its source file.
    pub file: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
}

/// Pure: the disk (`device='disk'`) of `domain_xml` whose target is `disk` or whose source file
/// is `disk`. The error says why not, for a message about the domain.
pub fn find_disk(domain_xml: &str, disk: &str) -> Result<DiskRef, String> {
    let doc = roxmltree::Document::parse(domain_xml)
        .map_err(|e| format!("its XML does not parse: {e}"))?;
    let mut targets = Vec::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        if d.parent().is_none_or(|p| !p.has_tag_name("devices")) {
            continue;
        }
        let child = |tag: &str| d.children().find(|c| c.has_tag_name(tag));
        let target = child("target").and_then(|t| t.attribute("dev"));
        let source = child("source").and_then(|s| s.attribute("file"));
        if d.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        if let Some(t) = target {
            targets.push(t.to_string());
        }
        if target != Some(disk) && source != Some(disk) {
            continue;
        }
        let target = target.unwrap_or(disk).to_string();
        if d.attribute("type") != Some("file") {
            return Err(format!(
                "disk {target} is of type {:?}, not a file",
                d.attribute("type").unwrap_or("")
            ));
        }
        let Some(file) = source else {
            return Err(format!("disk {target} has no source file"));
        };
        let Some(format) = child("driver").and_then(|x| x.attribute("type")) else {
            return Err(format!(
                "disk {target} names no format (driver type); refusing to guess it"
            ));
        };
        return Ok(DiskRef {
            target,
            file: PathBuf::from(file),
            format: format.to_string(),
        });
    }
    Err(if targets.is_empty() {
        format!("has no disk {disk} (it has no disks)")
    } else {
        format!("has no disk {disk} (its disks: {})", targets.join(", "))
    })
}

/// Pure: the backup XML of a push-mode full backup of disk `target` into the qcow2 file
/// `file`, every value escaped; only that disk takes part.
pub fn render_backup_xml(target: &str, file: &str) -> String {
    format!(
        "<domainbackup mode='push'>\n  <disks>\n    <disk name='{}' backup='yes' type='file'>\n      \
         <driver type='qcow2'/>\n      <target file='{}'/>\n    </disk>\n  </disks>\n</domainbackup>\n",
        xml_escape(target),
        xml_escape(file)
    )
}

/// Pure: whether the finished job `virsh domjobinfo --completed --rawstats` describes is a
/// successful backup; else why not (libvirt's `errmsg` when it gives one).
pub fn parse_backup_end(rawstats: &str) -> Result<(), String> {
    let mut job_type = None;
    let (mut operation, mut success, mut errmsg) = (None, None, None);
    for line in rawstats.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Job type" => job_type = value.parse::<u64>().ok(),
            "operation" => operation = value.parse::<u64>().ok(),
            "success" => success = value.parse::<u64>().ok(),
            "errmsg" => errmsg = Some(value.to_string()),
            _ => {}
        }
    }
    if let Some(op) = operation.filter(|op| *op != OPERATION_BACKUP) {
        return Err(format!(
            "the last finished job of the domain was not the backup (operation {op})"
        ));
    }
    match (job_type, success) {
        // VIR_DOMAIN_JOB_COMPLETED
        (Some(3), Some(1) | None) => Ok(()),
        // VIR_DOMAIN_JOB_FAILED, VIR_DOMAIN_JOB_CANCELLED
        (Some(t @ (3..=5)), _) => {
            Err(errmsg.unwrap_or_else(|| if t == 5 { "cancelled" } else { "failed" }.to_string()))
        }
        (Some(0) | None, _) => Err(
            "libvirt kept no statistics of the finished job, so its result is unknown".to_string(),
        ),
        (Some(t), _) => Err(format!("the job ended in an unknown state (type {t})")),
    }
}

/// Pure: the percentage in a qemu-img progress line (`    (12.34/100%)`).
pub fn parse_percent(line: &str) -> Option<f64> {
    let start = line.find('(')? + 1;
    let end = start + line[start..].find("/100%)")?;
    line[start..end]
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
}

/// Where the conversion writes before the image gets its final name.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".partial");
    PathBuf::from(s)
}

/// A checked request.
#[derive(Debug)]
pub(crate) struct CaptureRequest<'a> {
    pub name: &'a str,
    pub disk: &'a str,
    pub work_dir: &'a Path,
    pub out: &'a Path,
}

impl CaptureRequest<'_> {
    /// Refuse bad inputs before anything is changed.
    pub(crate) fn check(&self) -> Result<(), HostError> {
        if self.name.is_empty() || self.name.contains('\0') {
            return Err(HostError::invalid(
                format!("domain {:?}", self.name),
                "name is empty or contains a NUL byte",
            ));
        }
        if self.disk.is_empty() || self.disk.contains('\0') {
            return Err(HostError::invalid(
                format!("disk {:?}", self.disk),
                "name a disk by its target (vda) or its absolute source path",
            ));
        }
        if self.disk.contains('/') && !Path::new(self.disk).is_absolute() {
            return Err(HostError::invalid(
                format!("disk {}", self.disk),
                "a disk path must be absolute",
            ));
        }
        if !self.work_dir.is_absolute() || self.work_dir.to_str().is_none() {
            return Err(HostError::invalid(
                format!("work directory {}", self.work_dir.display()),
                "must be an absolute UTF-8 path (libvirt writes the copy there)",
            ));
        }
        if !self.out.is_absolute() {
            return Err(HostError::invalid(
                format!("image file {}", self.out.display()),
                "must be an absolute path",
            ));
        }
        if !self.out.parent().is_some_and(Path::is_dir) {
            return Err(HostError::invalid(
                format!("image file {}", self.out.display()),
                "its directory does not exist",
            ));
        }
        if self.out.symlink_metadata().is_ok() {
            return Err(HostError::invalid(
                format!("image file {}", self.out.display()),
                "already exists; refusing to replace it (remove it or choose another name)",
            ));
        }
        Ok(())
    }
}

/// Cleans up after a capture (on failure, on success, on a panic): aborts the backup job while
/// it is armed, then deletes the capture's own files (never `out`).
struct Revert<'a> {
    uri: &'a str,
    name: &'a str,
    job: Option<Domain>,
    /// After aborting the job, resume the guest if the failed copy paused it.
    resume_io_pause: bool,
    files: Vec<PathBuf>,
}

impl Drop for Revert<'_> {
    fn drop(&mut self) {
        if let Some(dom) = self.job.take() {
            tracing::warn!(
                domain = self.name,
                "aborting the backup job of a failed capture"
            );
            if let Err(e) = cmd::run("virsh", &["-c", self.uri, "domjobabort", self.name], None) {
                tracing::warn!(domain = self.name, error = %e, "cannot abort the backup job");
            }
            let deadline = Instant::now() + ABORT_WAIT;
            while job_running(&dom) && Instant::now() < deadline {
                std::thread::sleep(POLL_INTERVAL);
            }
            if self.resume_io_pause {
                resume_after_io_pause(&dom, self.name);
            }
        }
        for f in &self.files {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot remove a capture file")
                }
            }
        }
    }
}

/// Resume `dom` if it is paused because a write failed (QEMU's `werror=enospc` pause: the
/// backup's copy-before-write could not save a block the guest overwrote). QEMU retries the
/// write on resume. Returns whether it resumed the domain.
fn resume_after_io_pause(dom: &Domain, name: &str) -> bool {
    match dom.get_state() {
        Ok((s, reason))
            if s == sys::VIR_DOMAIN_PAUSED && reason == sys::VIR_DOMAIN_PAUSED_IOERROR as i32 =>
        {
            match dom.resume() {
                Ok(_) => {
                    tracing::warn!(
                        domain = name,
                        "resumed the guest paused by a write error during the failed capture"
                    );
                    true
                }
                Err(e) => {
                    tracing::warn!(domain = name, error = %e, "cannot resume the guest paused during the failed capture");
                    false
                }
            }
        }
        _ => false,
    }
}

/// Pure: the bytes `qemu-img measure --output=json` says a copy of the disk's data needs.
pub fn parse_measure(json: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get("required")?
        .as_u64()
}

fn job_running(dom: &Domain) -> bool {
    dom.get_job_info()
        .is_ok_and(|i| i.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A file name for this capture's copy, unique per process and call (two captures never share
/// one), built from the domain and disk names' safe characters.
fn copy_name(name: &str, target: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect()
    };
    format!(
        "{}-{}-{}.{}.capture.qcow2",
        safe(name),
        safe(target),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Capture `req.disk` of `dom` (or, with no domain, the qcow2 file `req.disk` names) into
/// `req.out`, as the module documentation describes. `uri` is the libvirt the domain lives in.
pub(crate) fn capture(
    dom: Option<&Domain>,
    uri: &str,
    req: &CaptureRequest<'_>,
    progress: &dyn Fn(CaptureProgress),
) -> Result<CaptureOutcome, HostError> {
    let mut revert = Revert {
        uri,
        name: req.name,
        job: None,
        resume_io_pause: false,
        files: Vec::new(),
    };
    let mut outcome = CaptureOutcome::default();
    let source = match dom {
        None => {
            if !req.disk.starts_with('/') {
                return Err(HostError::NoDomain {
                    name: req.name.to_string(),
                });
            }
            DiskRef {
                target: req.disk.to_string(),
                file: PathBuf::from(req.disk),
                format: "qcow2".to_string(),
            }
        }
        Some(dom) => {
            let state = dom
                .get_state()
                .map(|(s, _)| DomainState::from_libvirt(s))
                .map_err(|source| domain_err(req.name, "read state of", source))?;
            let flags = if state.is_active() {
                0
            } else {
                sys::VIR_DOMAIN_XML_INACTIVE
            };
            let xml = dom
                .get_xml_desc(flags)
                .map_err(|source| domain_err(req.name, "read the XML of", source))?;
            let disk = find_disk(&xml, req.disk)
                .map_err(|m| HostError::invalid(format!("domain {}", req.name), m))?;
            if state.is_active() {
                let started = Instant::now();
                let was_paused = state == DomainState::Paused;
                let copy = backup(
                    dom,
                    &disk,
                    was_paused,
                    req,
                    &mut revert,
                    progress,
                    &mut outcome,
                )?;
                outcome.copy_ms = ms(started.elapsed());
                copy
            } else {
                disk
            }
        }
    };
    let started = Instant::now();
    convert(&source, req, &mut revert, progress)?;
    outcome.convert_ms = ms(started.elapsed());
    outcome.bytes = std::fs::metadata(req.out)
        .map(|m| m.len())
        .map_err(|e| HostError::io("captured image", "inspect", req.out, e))?;
    Ok(outcome)
}

fn domain_err(name: &str, action: &'static str, source: virt::error::Error) -> HostError {
    HostError::Domain {
        name: name.to_string(),
        action,
        source,
    }
}

/// Refuse when the work directory cannot hold the copy of `disk`. Best effort: when the
/// size cannot be measured the backup goes ahead (and a full directory fails it).
fn check_room(disk: &DiskRef, req: &CaptureRequest<'_>, work_obj: &str) -> Result<(), HostError> {
    let measured = cmd::run_bounded(
        &tuchka_core::limits::ToolLimits::QEMU_IMG_META,
        "qemu-img",
        &[
            "measure".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            disk.format.as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            disk.file.as_os_str(),
        ],
    );
    let need = match measured.as_deref().map(parse_measure) {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::warn!(disk = %disk.file.display(), "qemu-img measure gave no size");
            return Ok(());
        }
        Err(e) => {
            tracing::warn!(disk = %disk.file.display(), error = %e, "cannot measure the disk");
            return Ok(());
        }
    };
    let st = rustix::fs::statvfs(req.work_dir)
        .map_err(|e| HostError::io(work_obj, "statvfs", req.work_dir, e.into()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        return Err(HostError::invalid(
            work_obj,
            format!(
                "has {} MiB free, but the copy of disk {} needs up to {} MiB (free space there, \
                 or choose another work directory)",
                free >> 20,
                disk.target,
                need.div_ceil(1 << 20)
            ),
        ));
    }
    Ok(())
}

/// Run a push-mode backup of `disk` into the work directory; returns the copy.
fn backup(
    dom: &Domain,
    disk: &DiskRef,
    was_paused: bool,
    req: &CaptureRequest<'_>,
    revert: &mut Revert<'_>,
    progress: &dyn Fn(CaptureProgress),
    outcome: &mut CaptureOutcome,
) -> Result<DiskRef, HostError> {
    let work_obj = format!("capture work directory {}", req.work_dir.display());
    std::fs::create_dir_all(req.work_dir)
        .map_err(|e| HostError::io(&work_obj, "create", req.work_dir, e))?;
    check_room(disk, req, &work_obj)?;
    let copy = req.work_dir.join(copy_name(req.name, &disk.target));
    let xml_file = copy.with_extension("backup.xml");
    revert.files.push(copy.clone());
    revert.files.push(xml_file.clone());
    // `check` made sure the work directory is UTF-8.
    let copy_str = copy.to_string_lossy();
    std::fs::write(&xml_file, render_backup_xml(&disk.target, &copy_str))
        .map_err(|e| HostError::io(&work_obj, "write", &xml_file, e))?;
    let xml_arg = xml_file.to_string_lossy();
    cmd::run(
        "virsh",
        &["-c", revert.uri, "backup-begin", req.name, &xml_arg],
        None,
    )
    .map_err(|source| HostError::Tool {
        object: format!("domain {} disk {}", req.name, disk.target),
        action: "start the backup job",
        source,
    })?;
    revert.job = Some(dom.clone());
    revert.resume_io_pause = !was_paused;
    let _ = std::fs::remove_file(&xml_file);
    tracing::info!(domain = req.name, disk = %disk.target, copy = %copy.display(), "backup job started");

    let mut paused = Duration::ZERO;
    let mut last_sample = Instant::now();
    let (mut best, mut best_at) = (0u64, Instant::now());
    let mut errors = 0u32;
    let mut stopped = false;
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let now = Instant::now();
        if matches!(dom.get_state(), Ok((s, _)) if s == sys::VIR_DOMAIN_PAUSED) {
            paused += now - last_sample;
        }
        last_sample = now;
        match dom.get_job_info() {
            Ok(info) if info.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 => break,
            Ok(info) => {
                errors = 0;
                let (done, total) = match info.disk_total.unwrap_or(0) {
                    0 => (
                        info.data_processed.unwrap_or(0),
                        info.data_total.unwrap_or(0),
                    ),
                    t => (info.disk_processed.unwrap_or(0), t),
                };
                progress(CaptureProgress {
                    phase: CapturePhase::Copying,
                    done,
                    total,
                });
                if done > best {
                    (best, best_at) = (done, now);
                } else if now - best_at > STALL_TIMEOUT {
                    return Err(HostError::JobFailed {
                        name: req.name.to_string(),
                        job: "backup",
                        message: format!(
                            "no progress for {} s at {done} of {total} bytes; aborted",
                            STALL_TIMEOUT.as_secs()
                        ),
                    });
                }
            }
            // The domain stopped (the job ended with it) or libvirt hiccuped: the completed
            // statistics below tell which; give a hiccup a few more looks.
            Err(e) => {
                errors += 1;
                let active = dom.is_active().unwrap_or(false);
                stopped = !active;
                if !active || errors >= 20 {
                    tracing::warn!(domain = req.name, error = %e, active, "cannot follow the backup job");
                    break;
                }
            }
        }
    }
    let stats = cmd::run(
        "virsh",
        &[
            "-c",
            revert.uri,
            "domjobinfo",
            "--completed",
            "--rawstats",
            req.name,
        ],
        None,
    );
    let ended = match &stats {
        Ok(text) => parse_backup_end(text),
        Err(e) => Err(format!("cannot read the finished job's result: {e}")),
    }
    .map_err(|m| {
        if stopped {
            format!("the domain stopped during the backup ({m})")
        } else {
            m
        }
    });
    if !job_running(dom) {
        revert.job = None;
    }
    outcome.paused_ms = ms(paused);
    if let Err(mut message) = ended {
        if !was_paused && resume_after_io_pause(dom, req.name) {
            message.push_str(
                "; the guest, paused by a write the failed copy could not save, was resumed",
            );
        }
        return Err(HostError::JobFailed {
            name: req.name.to_string(),
            job: "backup",
            message,
        });
    }
    tracing::info!(domain = req.name, disk = %disk.target, "backup job done");
    Ok(DiskRef {
        target: disk.target.clone(),
        file: copy,
        format: "qcow2".to_string(),
    })
}

/// `qemu-img convert -O qcow2 -c` (zstd) of `src` into `<out>.partial`, checked, then linked to `out`.
fn convert(
    src: &DiskRef,
    req: &CaptureRequest<'_>,
    revert: &mut Revert<'_>,
    progress: &dyn Fn(CaptureProgress),
) -> Result<(), HostError> {
    let src_obj = format!("disk {} of domain {}", src.file.display(), req.name);
    let total = match qcow2::read_header(&src.file) {
        Ok(Some(h)) => h.virtual_size,
        Ok(None) if src.format != "qcow2" => std::fs::metadata(&src.file)
            .map(|m| m.len())
            .map_err(|e| HostError::io(&src_obj, "inspect", &src.file, e))?,
        Ok(None) => {
            return Err(HostError::invalid(
                src_obj,
                "is not a qcow2 file (without a domain to name its format only qcow2 disks, \
                 which tuchka's root disks are, are captured)",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HostError::invalid(
                src_obj,
                "the file does not exist (check the VM's disk, or the path given)",
            ))
        }
        Err(e) => return Err(HostError::io(&src_obj, "read", &src.file, e)),
    };
    let partial = partial_path(req.out);
    let out_obj = format!("captured image {}", req.out.display());
    match std::fs::remove_file(&partial) {
        Ok(()) => tracing::warn!(file = %partial.display(), "removed a stale partial image"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HostError::io(&out_obj, "remove stale", &partial, e)),
    }
    revert.files.push(partial.clone());
    // zstd: as small as zlib here and about 6x faster to write (docs/benchmarks.md); every
    // host runs a QEMU that reads it (5.1 or newer).
    let args: [&std::ffi::OsStr; 11] = [
        "convert".as_ref(),
        "-p".as_ref(),
        "-f".as_ref(),
        src.format.as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-c".as_ref(),
        "-o".as_ref(),
        "compression_type=zstd".as_ref(),
        src.file.as_os_str(),
        partial.as_os_str(),
    ];
    let report = |done| {
        progress(CaptureProgress {
            phase: CapturePhase::Converting,
            done,
            total,
        })
    };
    report(0);
    cmd::run_streaming_bounded(
        &tuchka_core::limits::ToolLimits::QEMU_IMG_CONVERT,
        "qemu-img",
        &args,
        &mut |line| {
            if let Some(p) = parse_percent(line) {
                report((total as f64 * p / 100.0) as u64);
            }
        },
    )
    .map_err(|source| HostError::Tool {
        object: src_obj.clone(),
        action: "convert into a compressed qcow2 image",
        source,
    })?;
    match qcow2::read_header(&partial) {
        Ok(Some(h)) if h.backing_file.is_none() => {}
        Ok(h) => {
            return Err(HostError::invalid(
                out_obj,
                format!("qemu-img wrote no standalone qcow2 (header: {h:?})"),
            ))
        }
        Err(e) => return Err(HostError::io(&out_obj, "read", &partial, e)),
    }
    std::fs::File::open(&partial)
        .and_then(|f| {
            // Guest data: root only (the agent sends it to the controller).
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.sync_all()
        })
        .map_err(|e| HostError::io(&out_obj, "flush", &partial, e))?;
    // A link, not a rename: it fails instead of replacing a file that appeared at `out`.
    std::fs::hard_link(&partial, req.out)
        .map_err(|e| HostError::io(&out_obj, "create", req.out, e))?;
    let _ = std::fs::remove_file(&partial);
    if let Some(dir) = req.out.parent() {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot flush the image directory");
        }
    }
    report(total);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu'><name>tk-1-web</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
        <source file='/p/vms/1/root.qcow2'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
        <source file='/p/vms/1/seed.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>\
        <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
        <source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>\
        </devices></domain>";

    #[test]
    fn disks_are_found_by_target_or_source_file() {
        let want = DiskRef {
            target: "vda".into(),
            file: "/p/vms/1/root.qcow2".into(),
            format: "qcow2".into(),
        };
        assert_eq!(find_disk(XML, "vda"), Ok(want.clone()));
        assert_eq!(find_disk(XML, "/p/vms/1/root.qcow2"), Ok(want));
        let none = find_disk(XML, "vdz").expect_err("no vdz");
        assert!(none.contains("its disks: vda, vdb"), "{none}");
        // The seed CD is not a disk to capture; a block device is refused by name.
        assert!(find_disk(XML, "hdc").is_err());
        let block = find_disk(XML, "vdb").expect_err("block");
        assert!(block.contains("not a file"), "{block}");
        let no_format = XML.replace(" type='qcow2'", "");
        assert!(find_disk(&no_format, "vda")
            .expect_err("no format")
            .contains("refusing to guess"));
        assert!(find_disk("<domain", "vda").is_err());
    }

    #[test]
    fn backup_xml_is_push_mode_for_one_disk_and_escaped() {
        let xml = render_backup_xml("vda", "/w/a'b&c.qcow2");
        let doc = roxmltree::Document::parse(&xml).expect("well-formed");
        let root = doc.root_element();
        assert_eq!(root.attribute("mode"), Some("push"));
        let disks: Vec<_> = root
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].attribute("name"), Some("vda"));
        assert_eq!(disks[0].attribute("backup"), Some("yes"));
        let target = disks[0]
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("file"));
        assert_eq!(target, Some("/w/a'b&c.qcow2"));
    }

    #[test]
    fn backup_results_from_rawstats() {
        // What libvirt 9.0 printed for a finished, a full (ENOSPC) and an aborted backup.
        let done = "Job type: 3\n\noperation: 9\ntime_elapsed: 221\ndisk_total: 134217728\n\
                    disk_processed: 134217728\ndisk_remaining: 0\nsuccess: 1\n";
        assert_eq!(parse_backup_end(done), Ok(()));
        let full = "Job type: 4\n\noperation: 9\ntime_elapsed: 125\nsuccess: 0\n\
                    errmsg: No space left on device\n";
        assert_eq!(
            parse_backup_end(full),
            Err("No space left on device".into())
        );
        let aborted = "Job type: 5\n\noperation: 9\nsuccess: 0\nerrmsg: Operation canceled\n";
        assert_eq!(parse_backup_end(aborted), Err("Operation canceled".into()));
        assert!(parse_backup_end("Job type: 0\n\n")
            .expect_err("no stats")
            .contains("unknown"));
        assert!(
            parse_backup_end("Job type: 3\n\noperation: 4\nsuccess: 1\n")
                .expect_err("a migration")
                .contains("not the backup")
        );
        assert_eq!(
            parse_backup_end("Job type: 3\noperation: 9\nsuccess: 0\n"),
            Err("failed".into())
        );
    }

    #[test]
    fn measured_size_is_the_required_bytes() {
        let out = "{\n    \"bitmaps\": 0,\n    \"required\": 22544384,\n    \"fully-allocated\": 67436544\n}\n";
        assert_eq!(parse_measure(out), Some(22_544_384));
        assert_eq!(parse_measure("required size: 1"), None);
    }

    #[test]
    fn qemu_img_progress_lines() {
        assert_eq!(parse_percent("    (0.00/100%)"), Some(0.0));
        assert_eq!(parse_percent("    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_percent("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent("qemu-img: error"), None);
        assert_eq!(parse_percent("(250.00/100%)"), None);
    }

    #[test]
    fn requests_are_checked_before_anything_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("img.qcow2");
        let ok = CaptureRequest {
            name: "tk-1-web",
            disk: "vda",
            work_dir: dir.path(),
            out: &out,
        };
        assert!(ok.check().is_ok());
        let bad = |r: CaptureRequest<'_>| r.check().expect_err("refused").to_string();
        assert!(bad(CaptureRequest { name: "", ..ok }).contains("empty"));
        assert!(bad(CaptureRequest {
            disk: "rel/root.qcow2",
            ..ok
        })
        .contains("absolute"));
        assert!(bad(CaptureRequest {
            work_dir: Path::new("work"),
            ..ok
        })
        .contains("absolute"));
        let nowhere = dir.path().join("no/such/dir/img.qcow2");
        assert!(bad(CaptureRequest {
            out: &nowhere,
            ..ok
        })
        .contains("directory does not exist"));
        assert!(bad(CaptureRequest {
            out: Path::new("img.qcow2"),
            ..ok
        })
        .contains("absolute"));
        std::fs::write(&out, b"keep").expect("write");
        assert!(bad(CaptureRequest { ..ok }).contains("already exists"));
        assert_eq!(std::fs::read(&out).expect("read"), b"keep");
        assert_eq!(partial_path(&out), dir.path().join("img.qcow2.partial"));
        let a = copy_name("tk-1/../x", "vda");
        assert!(
            a.starts_with("tk-1____x-vda-") && a.ends_with(".capture.qcow2"),
            "{a}"
        );
        assert_ne!(a, copy_name("tk-1/../x", "vda"));
    }
}
