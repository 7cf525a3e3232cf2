//! The image store: uploads are streamed to disk while hashed, checked with `qemu-img`, stored
//! as qcow2 under `images/<sha256>.qcow2` (content-addressed by the upload's sha256) and served
//! to agents.
//!
//! What is accepted: a standalone qcow2 (no backing file, no external data file, `qemu-img
//! check` clean, every allocated cluster inside the file) or a raw disk image (a multiple of 512
//! bytes that starts with an MBR/GPT boot signature or a known filesystem superblock). Anything
//! else is refused and leaves nothing behind.

use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use rusqlite::Connection;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tuchka_api::Image;
use tuchka_store::{self as db, ImageRow};

use crate::error::{Error, Result};
use crate::state::Controller;

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
    if let Err(e) = precheck(ctl, name).and_then(|()| check_store_space(ctl, name, announced)) {
        // Read the body before answering: a client still sending would otherwise see a broken
        // pipe instead of this error.
        let mut body = body;
        while body.next().await.is_some() {}
        return Err(e);
    }
    let tmp_dir = ctl.config().data_dir.join("images/tmp");
    let upload = TempFile(Some(
        tmp_dir.join(format!("upload-{}", uuid::Uuid::new_v4())),
    ));
    let path = upload.0.clone().unwrap_or_default();
    let (sha256, size) = receive(&path, body).await?;
    if size == 0 {
        return Err(bad(format!("image {name:?}: the file is empty")));
    }
    let info = qemu_img_info(&path, None).await?;
    let (stored, source_format) = match info.format.as_str() {
        "qcow2" => {
            check_qcow2(&path, &info, size).await.map_err(|why| bad(format!("image {name:?}: {why}")))?;
            (upload, "qcow2")
        }
        "raw" => {
            let head = read_head(&path).await?;
            check_raw(&head, size).map_err(|why| bad(format!("image {name:?}: {why}")))?;
            let out = TempFile(Some(tmp_dir.join(format!("convert-{}", uuid::Uuid::new_v4()))));
            let target = out.0.clone().unwrap_or_default();
            run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&path).arg(&target)).await?;
            (out, "raw")
        }
        other => {
            return Err(bad(format!(
                "image {name:?}: format {other:?} is not supported; upload qcow2 or raw (convert with: qemu-img convert -O qcow2 IN OUT.qcow2)"
            )))
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

async fn receive<S, E>(path: &Path, mut body: S) -> Result<(String, u64)>
where
    S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::internal(format!("cannot create {}", path.display()), &e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| Error::invalid("UploadFailed", format!("upload interrupted: {e}")))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(|e| store_full(&e))?;
    }
    f.flush().await.map_err(|e| store_full(&e))?;
    f.sync_all().await.map_err(|e| store_full(&e))?;
    Ok((hex::encode(hasher.finalize()), size))
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

async fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().await.map_err(|e| {
        Error::internal(
            "cannot run qemu-img (install qemu-utils: ./scripts/install-deps)",
            &e,
        )
    })?;
    if !out.status.success() {
        return Err(Error::Internal {
            message: "qemu-img failed".into(),
            chain: vec![String::from_utf8_lossy(&out.stderr).trim().to_string()],
        });
    }
    Ok(out)
}

async fn qemu_img_info(path: &Path, format: Option<&str>) -> Result<ImgInfo> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json", "-U"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    cmd.arg(path);
    let out = cmd.output().await.map_err(|e| {
        Error::internal(
            "cannot run qemu-img (install qemu-utils: ./scripts/install-deps)",
            &e,
        )
    })?;
    if !out.status.success() {
        return Err(bad(format!(
            "not a disk image qemu-img can read: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::internal("cannot parse qemu-img info output", &e))
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
    let out = Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2", "-U"])
        .arg(path)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img check: {e}"))?;
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
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2", "-U"])
        .arg(path)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img map: {e}"))?;
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
fn extents_beyond(extents: &[serde_json::Value], file_size: u64) -> Option<u64> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
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
