//! The image store: uploads are streamed to disk while hashed, checked with `qemu-img`, stored
//! as qcow2 under `images/<sha256>.qcow2` (content-addressed by the upload's sha256) and served
//! to agents.
//!
//! What is accepted: a standalone qcow2 (no backing file, no external data file, `qemu-img
//! check` clean, every allocated cluster inside the file) or a raw disk image (a multiple of 512
//! bytes that starts with an MBR/GPT boot signature or a known filesystem superblock), no
//! larger than [`UploadLimits::max_size`] and with a virtual size of at most
//! [`UploadLimits::max_virtual_size`]. Anything else is refused and leaves nothing behind: no
//! temporary file, no row.
//!
//! The format is decided here from the file's first bytes ([`sniff_format`]), never by
//! qemu-img's probing: every `qemu-img` run names its format with `-f`, and runs under
//! `prlimit` (CPU seconds, address space) and a wall-clock limit ([`ToolLimits`]), killed
//! past it — an image crafted to make qemu-img spin or swell fails instead of taking the
//! controller down. Free space is checked before the upload (from its announced length) and
//! every [`SPACE_CHECK_EVERY`] bytes while it is written.

use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use rusqlite::Connection;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tuchka_api::Image;
use tuchka_core::limits::ToolLimits;
use tuchka_store::{self as db, ImageRow};

use crate::error::{Error, Result};
use crate::state::{Controller, UploadLimits};

/// Where the stored qcow2 of an image lives.
pub fn stored_path(ctl: &Controller, sha256: &str) -> PathBuf {
    ctl.config()
        .data_dir
        .join("images")
        .join(format!("{sha256}.qcow2"))
}

/// Removes a temporary file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bad(message: String) -> Error {
    Error::invalid("InvalidImage", message)
}

/// Where an image comes from, and how big the sender says it is.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// The new image's name.
    pub name: &'a str,
    /// `upload`, `vm web-0`, `build from tiny`.
    pub made_from: &'a str,
    /// The body's length, when the sender said it (Content-Length).
    pub size: Option<u64>,
}

/// Store an incoming image (an upload, or a capture an agent sends). `body` is the raw file.
pub async fn upload<S, E>(ctl: &Controller, inc: Incoming<'_>, body: S) -> Result<Image>
where
    S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let Incoming {
        name,
        made_from,
        size: announced,
    } = inc;
    let limits = ctl.config().uploads;
    let checked = precheck(ctl, name)
        .and_then(|()| check_announced_size(name, announced, &limits))
        .and_then(|()| check_store_space(ctl, name, announced));
    if let Err(e) = checked {
        // A body small enough is read before answering: a client still sending would otherwise
        // see a broken pipe instead of this error. A larger one is answered at once, before a
        // byte of it is read, which an HTTP/1 client takes as the answer to the request it is
        // still sending (reading 256 MiB of it first and then closing resets the connection
        // under the client's feet instead).
        if announced.is_none_or(|n| n <= DRAIN_AT_MOST) {
            drain(body, DRAIN_AT_MOST, &limits).await;
        }
        return Err(e);
    }
    let tmp_dir = ctl.config().data_dir.join("images/tmp");
    let upload = TempFile(Some(
        tmp_dir.join(format!("upload-{}", uuid::Uuid::new_v4())),
    ));
    let path = upload.0.clone().unwrap_or_default();
    let (sha256, size) = receive(ctl, name, &path, body, &limits).await?;
    if size == 0 {
        return Err(bad(format!("image {name:?}: the file is empty")));
    }
    let head = read_head(&path).await?;
    let format = sniff_format(&head).map_err(|why| bad(format!("image {name:?}: {why}")))?;
    if format == "raw" {
        check_raw(&head, size).map_err(|why| bad(format!("image {name:?}: {why}")))?;
    }
    let info = qemu_img_info(&path, format).await.map_err(|e| match e {
        Error::Invalid { code, message } => Error::Invalid {
            code,
            message: format!("image {name:?}: {message}"),
        },
        other => other,
    })?;
    check_virtual_size(name, info.virtual_size, &limits)?;
    let (stored, source_format) = match format {
        "qcow2" => {
            check_qcow2(&path, &info, size)
                .await
                .map_err(|why| bad(format!("image {name:?}: {why}")))?;
            (upload, "qcow2")
        }
        _ => {
            let out = TempFile(Some(
                tmp_dir.join(format!("convert-{}", uuid::Uuid::new_v4())),
            ));
            let target = out.0.clone().unwrap_or_default();
            // The copy needs up to the raw size again.
            check_store_space(ctl, name, Some(size))?;
            let mut args: Vec<std::ffi::OsString> = ["convert", "-q", "-f", "raw", "-O", "qcow2"]
                .map(Into::into)
                .into();
            args.push(path.clone().into_os_string());
            args.push(target.into_os_string());
            let converted = run_qemu_img(&args, &ToolLimits::QEMU_IMG_CONVERT).await?;
            if !converted.status.success() {
                return Err(Error::Internal {
                    message: format!("image {name:?}: qemu-img convert failed"),
                    chain: vec![String::from_utf8_lossy(&converted.stderr)
                        .trim()
                        .to_string()],
                });
            }
            (out, "raw")
        }
    };
    let stored_tmp = stored.0.clone().unwrap_or_default();
    let final_path = stored_path(ctl, &sha256);
    let file_sha256 = if final_path.exists() {
        sha256_file(&final_path).await?
    } else {
        let digest = if source_format == "qcow2" {
            sha256.clone()
        } else {
            sha256_file(&stored_tmp).await?
        };
        set_readonly(&stored_tmp)?;
        std::fs::rename(&stored_tmp, &final_path)
            .map_err(|e| Error::internal(format!("cannot store image {name:?}"), &e))?;
        digest
    };
    let stored_size = std::fs::metadata(&final_path).map(|m| m.len()).unwrap_or(0);
    let row = ImageRow {
        name: name.to_string(),
        sha256: sha256.clone(),
        file_sha256,
        source_format: source_format.into(),
        virtual_size: info.virtual_size,
        stored_size,
        created_at: db::now(),
        made_from: made_from.to_string(),
    };
    let inserted = ctl.db().atomic(|c| {
        if db::image(c, name)?.is_some() {
            return Err(Error::conflict(
                "ImageExists",
                format!("image {name:?} already exists"),
            ));
        }
        db::insert_image(c, &row)?;
        Ok(())
    });
    if let Err(e) = inserted {
        if db::image_by_sha(ctl.db().conn(), &sha256)?.is_none() {
            let _ = std::fs::remove_file(&final_path);
        }
        return Err(e);
    }
    ctl.bump();
    ctl.emit(
        "image.uploaded",
        &format!("image/{name}"),
        format!("image {name} stored ({source_format}, sha256 {sha256})"),
    );
    get(ctl, name)
}

/// Refuse a bad or taken image name before anything is received.
pub fn precheck(ctl: &Controller, name: &str) -> Result<()> {
    tuchka_core::names::validate_name("image", name).map_err(|_| Error::bad_name("image", name))?;
    if db::image(ctl.db().conn(), name)?.is_some() {
        return Err(Error::conflict(
            "ImageExists",
            format!("image {name:?} already exists (remove it first: tuchka image rm {name})"),
        ));
    }
    Ok(())
}

/// Size and free space of the controller's image store, bytes.
pub fn store_space(ctl: &Controller) -> Result<(u64, u64)> {
    let dir = ctl.config().data_dir.join("images");
    let st = rustix::fs::statvfs(&dir).map_err(|e| {
        Error::internal(
            format!("cannot read the free space of {}", dir.display()),
            &std::io::Error::from(e),
        )
    })?;
    Ok((
        st.f_blocks.saturating_mul(st.f_frsize),
        st.f_bavail.saturating_mul(st.f_frsize),
    ))
}

/// Refuse up front an image the store has no room for: the upload itself, and (for raw files)
/// its qcow2 conversion beside it.
fn check_store_space(ctl: &Controller, name: &str, size: Option<u64>) -> Result<()> {
    let Some(size) = size else { return Ok(()) };
    let (_, free) = store_space(ctl)?;
    let need = size.saturating_add(MARGIN);
    if need > free {
        return Err(Error::conflict(
            "StoreFull",
            format!(
                "image {name:?} needs {} MiB but the controller's image store has {} MiB free (free space there, or remove unused images: tuchka image list)",
                need.div_ceil(MIB),
                free / MIB
            ),
        ));
    }
    Ok(())
}

const MIB: u64 = 1 << 20;
/// Kept free in the store beyond an incoming image: its database and logs live there too.
const MARGIN: u64 = 16 * MIB;
/// Most of a refused upload's body read (and dropped) before answering.
const DRAIN_AT_MOST: u64 = 256 * MIB;
/// While an upload is written, the store's free space is checked again after this many bytes.
pub const SPACE_CHECK_EVERY: u64 = 64 * MIB;

/// Refuse an upload whose announced length is above the limit (nothing is received).
fn check_announced_size(name: &str, size: Option<u64>, limits: &UploadLimits) -> Result<()> {
    match size {
        Some(n) if n > limits.max_size => Err(too_big(name, limits)),
        _ => Ok(()),
    }
}

fn too_big(name: &str, limits: &UploadLimits) -> Error {
    Error::invalid(
        "UploadTooLarge",
        format!(
            "image {name:?} is larger than this controller accepts ({} MiB, serve --max-upload-size); nothing was stored",
            limits.max_size / MIB
        ),
    )
}

/// Refuse an image whose virtual disk is larger than the limit.
fn check_virtual_size(name: &str, virtual_size: u64, limits: &UploadLimits) -> Result<()> {
    if virtual_size > limits.max_virtual_size {
        return Err(Error::invalid(
            "ImageTooLarge",
            format!(
                "image {name:?} has a virtual size of {} MiB, above the {} MiB this controller accepts (serve --max-image-virtual-size); nothing was stored",
                virtual_size.div_ceil(MIB),
                limits.max_virtual_size / MIB
            ),
        ));
    }
    Ok(())
}

/// Read and drop up to `at_most` bytes of a body nobody will store, within the stall timeout.
async fn drain<S, E>(mut body: S, at_most: u64, limits: &UploadLimits)
where
    S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Unpin,
{
    let mut seen = 0u64;
    while seen <= at_most {
        match tokio::time::timeout(limits.stall_timeout, body.next()).await {
            Ok(Some(Ok(chunk))) => seen += chunk.len() as u64,
            _ => return,
        }
    }
}

fn store_full(e: &std::io::Error) -> Error {
    if e.raw_os_error() == Some(28) {
        Error::conflict(
            "StoreFull",
            "the controller's image store ran out of space while receiving the image; nothing was kept (free space there and send it again)",
        )
    } else {
        Error::internal("cannot write the incoming image", e)
    }
}

async fn receive<S, E>(
    ctl: &Controller,
    name: &str,
    path: &Path,
    mut body: S,
    limits: &UploadLimits,
) -> Result<(String, u64)>
where
    S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::internal(format!("cannot create {}", path.display()), &e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut next_space_check = SPACE_CHECK_EVERY;
    loop {
        let next = tokio::time::timeout(limits.stall_timeout, body.next())
            .await
            .map_err(|_| {
                Error::invalid(
                    "UploadFailed",
                    format!(
                        "upload of image {name:?} stalled: nothing received for {} s; nothing was kept",
                        limits.stall_timeout.as_secs()
                    ),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk
            .map_err(|e| Error::invalid("UploadFailed", format!("upload interrupted: {e}")))?;
        size += chunk.len() as u64;
        if size > limits.max_size {
            drain(body, DRAIN_AT_MOST, limits).await;
            return Err(too_big(name, limits));
        }
        hasher.update(&chunk);
        f.write_all(&chunk).await.map_err(|e| store_full(&e))?;
        if size >= next_space_check {
            next_space_check = size + SPACE_CHECK_EVERY;
            let (_, free) = store_space(ctl)?;
            if free < MARGIN {
                return Err(Error::conflict(
                    "StoreFull",
                    format!(
                        "the controller's image store fell below {} MiB free while receiving image {name:?}; nothing was kept (free space there and send it again)",
                        MARGIN / MIB
                    ),
                ));
            }
        }
    }
    f.flush().await.map_err(|e| store_full(&e))?;
    f.sync_all().await.map_err(|e| store_full(&e))?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// The format of a file from its first bytes: `qcow2`, or `raw` for anything that is not a
/// known image format. Other formats qemu-img knows are refused by name.
pub fn sniff_format(head: &[u8]) -> std::result::Result<&'static str, String> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        return Ok("qcow2");
    }
    let other = [
        (0, &b"KDMV"[..], "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (64, b"\x7f\x10\xda\xbe", "vdi"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"QED\x00", "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
    ];
    if let Some((_, _, f)) = other.iter().find(|(off, magic, _)| at(*off, magic)) {
        return Err(format!(
            "format {f:?} is not supported; upload qcow2 or raw (convert with: qemu-img convert -f {f} -O qcow2 IN OUT.qcow2)"
        ));
    }
    if at(0, b"QFI") {
        return Err(
            "it starts like a qcow image of an unknown version; upload qcow2 or raw".into(),
        );
    }
    Ok("raw")
}

/// Run `qemu-img args…` under `limits` (prlimit for CPU and memory, killed past the wall-clock
/// limit). A run killed by a limit is an `InvalidImage` refusal: only a hostile or broken image
/// makes qemu-img need that much.
async fn run_qemu_img(
    args: &[std::ffi::OsString],
    limits: &ToolLimits,
) -> Result<std::process::Output> {
    let mut cmd = Command::new("prlimit");
    cmd.args(limits.prlimit_args("qemu-img", args))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let what = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `timeout` kills it at the wall clock; this is the backstop should that fail.
    let backstop = limits.wall + std::time::Duration::from_secs(10);
    let out = match tokio::time::timeout(backstop, cmd.output()).await {
        Err(_) => {
            return Err(bad(format!(
                "qemu-img {what} took longer than {} s on it (a damaged or hostile image?)",
                limits.wall.as_secs()
            )))
        }
        Ok(r) => r.map_err(|e| {
            Error::internal(
                "cannot run qemu-img under prlimit (install qemu-utils and util-linux: ./scripts/install-deps)",
                &e,
            )
        })?,
    };
    if out.status.code() == Some(tuchka_core::limits::TIMED_OUT) {
        return Err(bad(format!(
            "qemu-img {what} took longer than {} s on it (a damaged or hostile image?)",
            limits.wall.as_secs()
        )));
    }
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = out.status.signal() {
            // SIGXCPU or SIGKILL: the CPU limit; SIGSEGV/SIGABRT: allocation failed under the
            // address-space limit.
            return Err(bad(format!(
                "qemu-img {what} was stopped by signal {sig} (over its CPU or memory limit: a damaged or hostile image?)"
            )));
        }
    }
    Ok(out)
}

/// What `qemu-img info --output=json` says.
#[derive(Debug, Deserialize)]
pub struct ImgInfo {
    /// Detected format.
    pub format: String,
    /// Virtual size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Backing file, if any.
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    /// Format-specific details.
    #[serde(rename = "format-specific")]
    pub format_specific: Option<serde_json::Value>,
}

/// Parse `qemu-img info --output=json`.
pub fn parse_img_info(json: &[u8]) -> std::result::Result<ImgInfo, serde_json::Error> {
    serde_json::from_slice(json)
}

async fn qemu_img_info(path: &Path, format: &str) -> Result<ImgInfo> {
    let mut args: Vec<std::ffi::OsString> = ["info", "--output=json", "-U", "-f", format]
        .map(Into::into)
        .into();
    args.push(path.as_os_str().to_owned());
    let out = run_qemu_img(&args, &ToolLimits::QEMU_IMG_META).await?;
    if !out.status.success() {
        return Err(bad(format!(
            "not a {format} image qemu-img can read: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info = parse_img_info(&out.stdout)
        .map_err(|e| Error::internal("cannot parse qemu-img info output", &e))?;
    if info.format != format {
        return Err(bad(format!(
            "qemu-img read it as {:?}, not {format:?}",
            info.format
        )));
    }
    Ok(info)
}

async fn check_qcow2(
    path: &Path,
    info: &ImgInfo,
    file_size: u64,
) -> std::result::Result<(), String> {
    if let Some(b) = &info.backing_filename {
        return Err(format!(
            "it has a backing file ({b:?}) outside the upload; upload a standalone image (qemu-img convert -O qcow2 IN OUT.qcow2)"
        ));
    }
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|f| f.pointer("/data/data-file"))
        .and_then(|v| v.as_str());
    if let Some(d) = data_file {
        return Err(format!(
            "it uses an external data file ({d:?}); upload a standalone image"
        ));
    }
    if info
        .format_specific
        .as_ref()
        .and_then(|f| f.pointer("/data/corrupt"))
        .and_then(|v| v.as_bool())
        == Some(true)
    {
        return Err("qemu-img marks it corrupt".into());
    }
    let with_path = |args: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        v.push(path.as_os_str().to_owned());
        v
    };
    let out = run_qemu_img(
        &with_path(&["check", "-q", "-f", "qcow2", "-U"]),
        &ToolLimits::QEMU_IMG_CHECK,
    )
    .await
    .map_err(|e| e.to_string())?;
    // 0: clean; 3: only leaked clusters (harmless). Anything else is damage.
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        return Err(format!(
            "the qcow2 is corrupt or truncated (qemu-img check: {})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("failed")
                .trim()
        ));
    }
    let map = run_qemu_img(
        &with_path(&["map", "--output=json", "-f", "qcow2", "-U"]),
        &ToolLimits::QEMU_IMG_CHECK,
    )
    .await
    .map_err(|e| e.to_string())?;
    if !map.status.success() {
        return Err(format!(
            "the qcow2 is corrupt or truncated (qemu-img map: {})",
            String::from_utf8_lossy(&map.stderr).trim()
        ));
    }
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout)
        .map_err(|e| format!("cannot parse qemu-img map: {e}"))?;
    if let Some(end) = extents_beyond(&extents, file_size) {
        return Err(format!(
            "the qcow2 is truncated: data at byte {end} but the file has {file_size} bytes"
        ));
    }
    Ok(())
}

/// The first host offset end past `file_size` among `qemu-img map` extents.
pub fn extents_beyond(extents: &[serde_json::Value], file_size: u64) -> Option<u64> {
    extents.iter().find_map(|e| {
        let off = e.get("offset")?.as_u64()?;
        let len = e.get("length")?.as_u64()?;
        let compressed = e
            .get("compressed")
            .and_then(|c| c.as_bool())
            .unwrap_or(false);
        let end = if compressed { off + 1 } else { off + len };
        (end > file_size).then_some(end)
    })
}

async fn read_head(path: &Path) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::internal("cannot read the upload", &e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < buf.len() {
        let r = f
            .read(&mut buf[n..])
            .await
            .map_err(|e| Error::internal("cannot read the upload", &e))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    buf.truncate(n);
    Ok(buf)
}

/// Whether `head` (the first bytes) of a file of `size` bytes looks like a raw disk.
pub fn check_raw(head: &[u8], size: u64) -> std::result::Result<(), String> {
    if !size.is_multiple_of(512) {
        return Err(format!(
            "it is neither qcow2 nor a raw disk image: {size} bytes is not a whole number of 512-byte sectors (a text file or random data?)"
        ));
    }
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let known = at(510, &[0x55, 0xaa]) // MBR / boot sector
        || at(512, b"EFI PART") // GPT
        || at(1080, &[0x53, 0xef]) // ext2/3/4
        || at(0, b"XFSB")
        || at(32769, b"CD001") // ISO 9660
        || at(65600, b"_BHRfS_M");
    if !known {
        return Err("it is neither qcow2 nor a raw disk image: no partition table or filesystem found (a text file or random data?)".into());
    }
    Ok(())
}

fn set_readonly(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| Error::internal(format!("cannot set permissions of {}", path.display()), &e))
}

/// sha256 hex of a file (read off the async threads).
pub async fn sha256_file(path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || tuchka_core::digest::sha256_file(&p))
        .await
        .map_err(|e| Error::internal("hashing failed", &e))?
        .map_err(|e| Error::internal(format!("cannot read {}", path.display()), &e))
}

// ------------------------------------------------------------------ leftovers

/// What [`sweep_leftovers`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Temporary files of interrupted uploads, captures and conversions, removed.
    pub temp_files: Vec<PathBuf>,
    /// Stored image files no image row names (an upload interrupted between the file's
    /// rename and its row, or a removal between the row and the file), removed.
    pub orphan_files: Vec<PathBuf>,
    /// Images whose file is gone and that no group uses: their rows were removed.
    pub rows_removed: Vec<String>,
    /// Images whose file is gone but that groups still use: kept (hosts that cached the image
    /// keep running its VMs), logged as errors.
    pub rows_missing_file: Vec<String>,
}

/// At start (nothing is being received yet): remove what interrupted uploads, captures and
/// removals left in the image store, and reconcile image rows with files. Each thing done is
/// logged; the result says what.
pub fn sweep_leftovers(ctl: &Controller) -> Result<Sweep> {
    let mut sweep = Sweep::default();
    let images = ctl.config().data_dir.join("images");
    let tmp = images.join("tmp");
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        match std::fs::read_dir(dir) {
            Ok(rd) => Ok(rd.flatten().map(|e| e.path()).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(Error::internal(
                format!("cannot list {}", dir.display()),
                &e,
            )),
        }
    };
    for p in list(&tmp)? {
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match removed {
            Ok(()) => {
                tracing::warn!(file = %p.display(), "removed the temporary file of an interrupted upload or capture");
                sweep.temp_files.push(p);
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a leftover temporary file")
            }
        }
    }
    let rows = db::images(ctl.db().conn())?;
    let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.sha256.as_str()).collect();
    for p in list(&images)? {
        let Some(sha) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".qcow2"))
        else {
            continue;
        };
        let is_sha = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_sha || known.contains(sha) || !p.is_file() {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::warn!(file = %p.display(), "removed an image file no image names (an interrupted upload or removal)");
                sweep.orphan_files.push(p);
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove an orphaned image file")
            }
        }
    }
    for row in rows {
        if stored_path(ctl, &row.sha256).is_file() {
            continue;
        }
        let name = row.name.clone();
        let removed = ctl.db().atomic(|c| {
            let used = db::groups(c)?.iter().any(|g| g.image == name);
            if !used {
                db::delete_image(c, &name)?;
            }
            Ok::<bool, Error>(!used)
        })?;
        if removed {
            tracing::warn!(image = %name, "image's file is missing and no group uses it: removed its row (upload it again)");
            ctl.emit(
                "image.deleted",
                &format!("image/{name}"),
                format!("image {name} removed: its file was missing at start"),
            );
            sweep.rows_removed.push(name);
        } else {
            tracing::error!(image = %name, file = %stored_path(ctl, &row.sha256).display(), "image's file is missing but groups use it: kept (hosts that cached it keep running; new hosts cannot fetch it; restore the file, or remove the groups and the image)");
            sweep.rows_missing_file.push(name);
        }
    }
    if sweep != Sweep::default() {
        ctl.bump();
    }
    Ok(sweep)
}

// ------------------------------------------------------------------ views and removal

fn view(c: &Connection, i: ImageRow) -> Result<Image> {
    let groups: Vec<String> = db::groups(c)?
        .into_iter()
        .filter(|g| g.image == i.name)
        .map(|g| g.name)
        .collect();
    let used_by = db::vms(c)?
        .into_iter()
        .filter(|v| groups.contains(&v.group))
        .map(|v| v.name)
        .collect();
    Ok(Image {
        name: i.name,
        sha256: i.sha256,
        source_format: i.source_format,
        virtual_size: i.virtual_size,
        stored_size: i.stored_size,
        created_at: i.created_at,
        used_by,
        made_from: i.made_from,
    })
}

/// All images.
pub fn list(ctl: &Controller) -> Result<Vec<Image>> {
    let db = ctl.db();
    let c = db.conn();
    db::images(c)?.into_iter().map(|i| view(c, i)).collect()
}

/// One image.
pub fn get(ctl: &Controller, name: &str) -> Result<Image> {
    let db = ctl.db();
    let c = db.conn();
    let i = db::image(c, name)?.ok_or_else(|| Error::not_found("image", "image", name))?;
    view(c, i)
}

/// `image rm`: refused while a group uses it.
pub fn delete(ctl: &Controller, name: &str) -> Result<()> {
    let file = ctl.db().atomic(|c| {
        let img = db::image(c, name)?.ok_or_else(|| Error::not_found("image", "image", name))?;
        let users: Vec<String> = db::groups(c)?
            .into_iter()
            .filter(|g| g.image == name)
            .map(|g| g.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::conflict(
                "ImageInUse",
                format!(
                    "image {name:?} is used by group(s) {}: remove them first (tuchka group rm …)",
                    users.join(", ")
                ),
            ));
        }
        db::delete_image(c, name)?;
        let still_used = db::image_by_sha(c, &img.sha256)?.is_some();
        Ok((!still_used).then_some(img.sha256))
    })?;
    if let Some(sha) = file {
        let path = stored_path(ctl, &sha);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove image file");
        }
    }
    ctl.bump();
    ctl.emit(
        "image.deleted",
        &format!("image/{name}"),
        format!("image {name} removed"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_sniffing() {
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert!(check_raw(&mbr, 1 << 20).is_ok());
        let text = b"hello world\n".repeat(100);
        assert!(check_raw(&text, text.len() as u64)
            .unwrap_err()
            .contains("512-byte sectors"));
        let zeros = vec![0u8; 4096];
        assert!(check_raw(&zeros, 4096)
            .unwrap_err()
            .contains("no partition table"));
    }

    #[test]
    fn detects_extents_past_the_end() {
        let ext: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"start":0,"length":65536,"data":true,"offset":327680},{"start":65536,"length":65536,"data":false}]"#,
        )
        .expect("json");
        assert_eq!(extents_beyond(&ext, 400_000), None);
        assert_eq!(extents_beyond(&ext, 300_000), Some(393_216));
    }
}
