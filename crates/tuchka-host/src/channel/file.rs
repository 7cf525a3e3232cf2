//! Cold migration: a whole file through the channel, verified by size and sha256.
//!
//! The sender hashes the file, sends a `disk-file` header with its size and digest, waits for
//! `OK`, streams exactly that many bytes (hashing again) and waits for the verdict. The
//! receiver writes to a temporary file next to the destination (`.<name>.partial-<pid>-<n>`),
//! refuses a short transfer or a wrong digest — deleting the temporary file, so nothing is
//! left — and otherwise syncs it and renames it into place (mode 0644, like the pool's other
//! disks) before answering `DONE <sha256>`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{Answer, ChannelRequest, MAX_ANSWER};
use super::server::{refuse, ServerStats};
use super::tunnel::connect;
use super::{read_line, ChannelError, Peer, FILE_IDLE_TIMEOUT};

const CHUNK: usize = 256 * 1024;

/// What [`send_file`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    /// Bytes sent.
    pub bytes: u64,
    /// Their sha256, as the receiver confirmed it.
    pub sha256: String,
}

/// Send the file at `path` — disk `disk` (a VM's id for its root disk, a volume's id) in
/// migration `migration` — to `peer` through the channel. Returns once the peer has stored it under its final name with the
/// same sha256; on any error the peer has kept nothing. The file must not change meanwhile
/// (the VM is stopped): if it does, the transfer is failed.
pub async fn send_file(
    tls: &Arc<rustls::ClientConfig>,
    peer: &Peer,
    migration: &str,
    disk: &str,
    path: &Path,
) -> Result<SentFile, ChannelError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| ChannelError::Io {
            action,
            path,
            source,
        }
    };
    let (size, sha256) = hash_file(path).await.map_err(io("read"))?;
    let req = ChannelRequest::DiskFile {
        migration: migration.to_string(),
        disk: disk.to_string(),
        size,
        sha256: sha256.clone(),
    };
    let mut stream = connect(tls, peer, &req).await?;
    let lost = |what: &str| {
        let (peer, what) = (peer.clone(), format!("{what} of {req}"));
        move |source| ChannelError::Lost { peer, what, source }
    };

    let mut file = tokio::fs::File::open(path).await.map_err(io("open"))?;
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while sent < size {
        let want = usize::try_from(size - sent).map_or(CHUNK, |left| left.min(CHUNK));
        let n = file.read(&mut buf[..want]).await.map_err(io("read"))?;
        if n == 0 {
            break; // shrank: the digest check below fails the transfer
        }
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .await
            .map_err(lost("the data"))?;
        sent += n as u64;
    }
    stream.flush().await.map_err(lost("the data"))?;
    let sent_sha = hex::encode(hasher.finalize());
    if sent < size || sent_sha != sha256 {
        // Closing without the announced bytes (or with other ones) makes the peer refuse it.
        let _ = stream.shutdown().await;
        return Err(ChannelError::FileChanged {
            path: path.to_path_buf(),
            expected: sha256,
            sent: sent_sha,
        });
    }
    let verdict = tokio::time::timeout(FILE_IDLE_TIMEOUT, read_line(&mut stream, MAX_ANSWER))
        .await
        .map_err(|_| ChannelError::Timeout {
            peer: peer.clone(),
            what: "the verdict on the file",
            after: FILE_IDLE_TIMEOUT,
        })?
        .map_err(lost("the verdict"))?;
    let _ = stream.shutdown().await;
    match verdict.as_deref().and_then(Answer::parse) {
        Some(Answer::Done(got)) if got == sha256 => Ok(SentFile {
            bytes: sent,
            sha256,
        }),
        Some(Answer::Done(got)) => Err(ChannelError::Protocol {
            peer: peer.clone(),
            what: format!("stored {req} with sha256 {got}, not {sha256}"),
        }),
        Some(Answer::Err(reason)) => Err(ChannelError::Refused {
            peer: peer.clone(),
            request: req.to_string(),
            reason,
        }),
        Some(Answer::Ok) | None => Err(ChannelError::Protocol {
            peer: peer.clone(),
            what: format!("no verdict on {req}"),
        }),
    }
}

async fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// A temporary file removed on drop unless kept.
struct Partial {
    path: PathBuf,
    keep: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn partial_path(dest: &Path) -> Option<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name()?.to_string_lossy().into_owned();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    Some(dest.with_file_name(format!(".{name}.partial-{}-{n}", std::process::id())))
}

/// Receive exactly `size` bytes from `stream` into `dest` (server side, after admission).
/// Answers `OK` first, then `DONE <sha256>` or `ERR <reason>`; on error nothing is left.
pub(crate) async fn receive<S>(
    stream: &mut S,
    dest: &Path,
    size: u64,
    sha256: &str,
    stats: &ServerStats,
) -> Result<(), String>
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    let Some(tmp) = partial_path(dest) else {
        let reason = format!("destination {} has no file name", dest.display());
        refuse(stream, &reason).await;
        return Err(reason);
    };
    let file = match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // guest data (a disk, a seed): root only, libvirt hands it to qemu
        .open(&tmp)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            let reason = format!("cannot create {}: {e}", tmp.display());
            refuse(stream, &reason).await;
            return Err(reason);
        }
    };
    let mut partial = Partial {
        path: tmp.clone(),
        keep: false,
    };
    if stream
        .write_all(Answer::Ok.encode().as_bytes())
        .await
        .is_err()
        || stream.flush().await.is_err()
    {
        return Err("the sender went away".to_string());
    }
    let result = copy_exact(stream, file, size, stats).await;
    let outcome = match result {
        Ok((got, actual)) if got == size && actual == sha256 => {
            match tokio::fs::rename(&tmp, dest).await {
                Ok(()) => {
                    partial.keep = true;
                    sync_dir(dest).await;
                    Ok(())
                }
                Err(e) => Err(format!("cannot move the file into place: {e}")),
            }
        }
        Ok((got, _)) if got < size => Err(format!(
            "short transfer: got {got} of {size} bytes; nothing was kept"
        )),
        Ok((_, actual)) => Err(format!(
            "corrupt transfer: sha256 {actual}, expected {sha256}; nothing was kept"
        )),
        Err(e) => Err(format!("transfer failed: {e}; nothing was kept")),
    };
    drop(partial);
    let answer = match &outcome {
        Ok(()) => Answer::Done(sha256.to_string()),
        Err(reason) => Answer::Err(reason.clone()),
    };
    let _ = stream.write_all(answer.encode().as_bytes()).await;
    let _ = stream.shutdown().await;
    outcome
}

/// Copy up to `size` bytes into `file`, each read within [`FILE_IDLE_TIMEOUT`]; returns how
/// many arrived and their sha256. The file is synced when all arrived.
async fn copy_exact<S: AsyncBufRead + Unpin>(
    stream: &mut S,
    mut file: tokio::fs::File,
    size: u64,
    stats: &ServerStats,
) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while got < size {
        let want = usize::try_from(size - got).map_or(CHUNK, |left| left.min(CHUNK));
        let n = match tokio::time::timeout(FILE_IDLE_TIMEOUT, stream.read(&mut buf[..want])).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {} s", FILE_IDLE_TIMEOUT.as_secs()),
                ))
            }
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await?;
        got += n as u64;
        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }
    file.flush().await?;
    if got == size {
        file.sync_all().await?;
    }
    Ok((got, hex::encode(hasher.finalize())))
}

/// fsync the directory of `path`, so the rename survives a crash (best effort).
async fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
    }
}
