//! The storage pool of one host: a directory with
//!
//! ```text
//! <pool>/images/<sha256>.qcow2          cached images, read-only (0444)
//! <pool>/images/<sha256>.qcow2.partial  a download in progress (resumable)
//! <pool>/vms/<id>/root.qcow2            overlay, backing file = the cached image (absolute)
//! <pool>/vms/<id>/seed.iso              NoCloud seed (label cidata)
//! <pool>/vms/<id>/seed/{meta-data,user-data}   the inputs the seed was built from
//! <pool>/vms/<id>/console.log           serial console (written by qemu)
//! <pool>/net/<network>/                 dataplane state (see crate::net)
//! ```
//!
//! qemu runs as `libvirt-qemu`, so every directory from `/` down to the disks must be
//! traversable by other users; [`DirStorage::open`] checks the ancestors and sets the pool's own
//! modes (0755, `vms/<id>` 0711). Files are replaced atomically (write to a temporary name,
//! rename), so a crash never leaves a half-written disk or seed under its final name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cmd;
use crate::qcow2;
use crate::seed::{render_meta_data, render_user_data};
use crate::HostError;
use tuchka_core::limits::ToolLimits;

const MIB: u64 = 1024 * 1024;

/// The pool directory of this host. Synchronous: call from a blocking thread.
pub trait Storage: Send + Sync {
    /// Identities (sha256) of the images present in `images/`.
    fn cached_images(&self) -> Result<Vec<String>, HostError>;
    /// `images/<sha256>.qcow2`.
    fn image_path(&self, sha256: &str) -> PathBuf;
    /// Where a download of the image is written (append to resume).
    fn image_partial_path(&self, sha256: &str) -> PathBuf;
    /// Verify the partial download's sha256 equals `file_sha256`, then atomically move it into
    /// place (0444). On mismatch delete the partial file and return [`HostError::Corrupt`].
    fn commit_image(&self, sha256: &str, file_sha256: &str) -> Result<PathBuf, HostError>;
    /// Delete a cached image (and its partial download); Ok if absent. Refused while a VM disk
    /// uses it as backing file.
    fn remove_image(&self, sha256: &str) -> Result<(), HostError>;
    /// `vms/<id>/root.qcow2`: a qcow2 overlay over the cached image (absolute backing path,
    /// `-F qcow2`), virtual size `disk_mib`. Idempotent (exists → Ok; an overlay that arrived from
    /// another host, whose backing path names that host's pool, is pointed at this host's copy of
    /// the same image). Refused if `disk_mib` is smaller than the image's virtual size or the
    /// image is not cached.
    fn ensure_root_disk(
        &self,
        vm_id: &str,
        image_sha256: &str,
        disk_mib: u64,
    ) -> Result<PathBuf, HostError>;
    /// `vms/<id>/seed.iso`: NoCloud seed (label `cidata`) with meta-data and user-data. Rebuilt
    /// only when its inputs changed.
    fn ensure_seed(
        &self,
        vm_id: &str,
        name: &str,
        user_data: Option<&str>,
        ssh_keys: &[String],
    ) -> Result<PathBuf, HostError>;
    /// `vms/<id>/console.log`.
    fn console_log_path(&self, vm_id: &str) -> PathBuf;
    /// `vms/<id>/root.qcow2` (whether it exists or not).
    fn root_disk_path(&self, vm_id: &str) -> PathBuf;
    /// Make `vms/<id>` exist (with the modes qemu needs) and return it: where a disk arriving
    /// from another host is written.
    fn ensure_vm_dir(&self, vm_id: &str) -> Result<PathBuf, HostError>;
    /// Ids with a `vms/<id>` directory.
    fn vm_dirs(&self) -> Result<Vec<String>, HostError>;
    /// Remove `vms/<id>` and everything in it; Ok if absent.
    fn remove_vm(&self, vm_id: &str) -> Result<(), HostError>;
    /// `(total MiB, free MiB)` of the file system holding the pool (free = available to
    /// unprivileged users).
    fn capacity(&self) -> Result<(u64, u64), HostError>;
    /// What the VMs' disks and the image cache take in the pool.
    fn usage(&self) -> Result<PoolUsage, HostError>;
    /// `volumes/<id>.qcow2`.
    fn volume_path(&self, id: &str) -> PathBuf;
    /// Make volume `id` (an empty thin qcow2 of `size_mib`) if it does not exist; Ok if it does.
    fn ensure_volume(&self, id: &str, size_mib: u64) -> Result<PathBuf, HostError>;
    /// Grow volume `id` to `size_mib` while no VM uses it (`qemu-img resize`); a larger volume is
    /// left as it is.
    fn grow_volume(&self, id: &str, size_mib: u64) -> Result<(), HostError>;
    /// Grow VM `vm_id`'s root disk to `size_mib` while the VM is off; a larger disk is left.
    fn grow_root_disk(&self, vm_id: &str, size_mib: u64) -> Result<(), HostError>;
    /// The virtual size of VM `vm_id`'s root disk, MiB (None: no disk).
    fn root_disk_mib(&self, vm_id: &str) -> Option<u64>;
    /// Volumes present: (id, virtual MiB, allocated MiB).
    fn volumes(&self) -> Result<Vec<(String, u64, u64)>, HostError>;
    /// Remove volume `id`; Ok if absent.
    fn remove_volume(&self, id: &str) -> Result<(), HostError>;
}

/// What the VMs' disks and the image cache take in a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Space the overlays and volumes take, MiB.
    pub allocated_mib: u64,
    /// Their virtual sizes, MiB.
    pub provisioned_mib: u64,
    /// The image cache, MiB.
    pub image_cache_mib: u64,
}

/// Pure: a sha256 in lowercase hex (64 chars). Anything else could escape the pool as a path.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Pure: a VM id usable as one directory name: 1–128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn is_vm_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_sha(sha256: &str) -> Result<(), HostError> {
    if is_sha256(sha256) {
        Ok(())
    } else {
        Err(HostError::invalid(
            format!("image {sha256:?}"),
            "identity is not a lowercase sha256 hex digest",
        ))
    }
}

fn check_vm_id(vm_id: &str) -> Result<(), HostError> {
    if is_vm_id(vm_id) {
        Ok(())
    } else {
        Err(HostError::invalid(
            format!("vm id {vm_id:?}"),
            "must be 1-128 of [A-Za-z0-9._-] and not start with '.'",
        ))
    }
}

/// Pure: the first ancestor (closest to `/`) of a mode list that other users cannot traverse.
/// `dirs` are `(path, mode)` pairs.
pub fn first_untraversable(dirs: &[(PathBuf, u32)]) -> Option<&(PathBuf, u32)> {
    dirs.iter().find(|(_, mode)| mode & 0o001 == 0)
}

/// [`Storage`] on a local directory.
#[derive(Debug, Clone)]
pub struct DirStorage {
    pool: PathBuf,
}

impl DirStorage {
    /// Open (creating if needed) the pool at `pool`. Fails with a clear message when a parent
    /// directory is not traversable by other users: qemu runs as `libvirt-qemu` and must reach
    /// the disks, so e.g. a pool inside a 0700 temporary directory cannot work.
    pub fn open(pool: &Path) -> Result<Self, HostError> {
        let obj = format!("pool {}", pool.display());
        fs::create_dir_all(pool).map_err(|e| HostError::io(&obj, "create", pool, e))?;
        let pool = fs::canonicalize(pool).map_err(|e| HostError::io(&obj, "resolve", pool, e))?;
        let mut ancestors = Vec::new();
        for dir in pool.ancestors().skip(1) {
            let meta = fs::metadata(dir).map_err(|e| HostError::io(&obj, "inspect", dir, e))?;
            ancestors.push((dir.to_path_buf(), meta.permissions().mode()));
        }
        ancestors.reverse();
        if let Some((dir, mode)) = first_untraversable(&ancestors) {
            return Err(HostError::invalid(
                obj,
                format!(
                    "parent directory {} has mode {:04o}, so qemu (user libvirt-qemu) cannot reach the disks; \
                     put the pool under a traversable directory (e.g. /var/lib/tuchka) or `chmod o+x {}`",
                    dir.display(),
                    mode & 0o7777,
                    dir.display()
                ),
            ));
        }
        let storage = DirStorage { pool };
        // Traversable (qemu must reach the disks) but not listable by other users; the files
        // in them are private (see [`PRIVATE`]).
        for (dir, mode) in [
            (storage.pool.clone(), 0o711),
            (storage.images_dir(), 0o711),
            (storage.vms_dir(), 0o711),
            (storage.pool.join("net"), 0o755),
        ] {
            make_dir(&dir, mode, &format!("pool {}", storage.pool.display()))?;
        }
        Ok(storage)
    }

    /// The pool directory (absolute).
    pub fn pool(&self) -> &Path {
        &self.pool
    }

    /// At agent start (nothing of this pool is being written yet): remove what an interrupted
    /// pass left — temporary files of disks, volumes, seeds and network files being written
    /// (`*.tmp<pid>`), seed staging directories (`seed.new`), and the work directories of
    /// captures (`captures/<id>/`; a capture the controller still wants starts again). Partial
    /// image downloads are kept (they resume). VM directories are never touched here: a VM's
    /// removal is the controller's to name. Returns what was removed; each is logged.
    pub fn sweep_leftovers(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = Vec::new();
        let entries = |dir: &Path| -> Vec<PathBuf> {
            fs::read_dir(dir)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let mut dirs = vec![self.images_dir(), self.volumes_dir(), self.pool.join("net")];
        for d in entries(&self.vms_dir()) {
            if d.is_dir() {
                dirs.push(d);
            }
        }
        for d in entries(&self.pool.join("net")) {
            if d.is_dir() {
                dirs.push(d);
            }
        }
        for dir in &dirs {
            for p in entries(dir) {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if is_temp_name(&name) || (name == "seed.new" && p.is_dir()) {
                    found.push(p);
                }
            }
        }
        found.extend(entries(&self.pool.join("captures")));
        let mut removed = Vec::new();
        for p in found {
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            match r {
                Ok(()) => {
                    tracing::warn!(path = %p.display(), "removed a leftover of an interrupted write or capture");
                    removed.push(p);
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove a leftover")
                }
            }
        }
        removed
    }

    fn images_dir(&self) -> PathBuf {
        self.pool.join("images")
    }

    fn volumes_dir(&self) -> PathBuf {
        self.pool.join("volumes")
    }

    fn vms_dir(&self) -> PathBuf {
        self.pool.join("vms")
    }

    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.vms_dir().join(vm_id)
    }

    /// Point an overlay made on another host at this host's copy of its image (the same bytes:
    /// the file name is the image's identity). An unsafe rebase only rewrites the header.
    fn fix_backing(
        &self,
        root: &Path,
        image: &Path,
        sha256: &str,
        obj: &str,
    ) -> Result<(), HostError> {
        let backing = match qcow2::read_header(root) {
            Ok(Some(h)) => h.backing_file,
            Ok(None) => {
                return Err(HostError::invalid(
                    obj,
                    format!("{} is not a qcow2 file", root.display()),
                ))
            }
            Err(e) => return Err(HostError::io(obj, "read", root, e)),
        };
        let Some(backing) = backing else {
            return Ok(());
        };
        if Path::new(&backing) == image {
            return Ok(());
        }
        if Path::new(&backing).file_name() != image.file_name() {
            return Err(HostError::invalid(
                obj,
                format!("its backing file {backing} is not image {sha256}"),
            ));
        }
        if !image.exists() {
            return Err(HostError::invalid(
                obj,
                format!("image {sha256} is not in the cache ({})", image.display()),
            ));
        }
        let args: Vec<std::ffi::OsString> = vec![
            "rebase".into(),
            "-u".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            "-b".into(),
            image.as_os_str().to_owned(),
            root.as_os_str().to_owned(),
        ];
        cmd::run_bounded(&ToolLimits::QEMU_IMG_META, "qemu-img", &args)
            .map(drop)
            .map_err(|source| HostError::Tool {
                object: obj.to_string(),
                action: "qemu-img rebase",
                source,
            })
    }

    /// Which VM disk (if any) uses `image` as its backing file.
    fn image_user(&self, image: &Path) -> Option<String> {
        let ids = self.vm_dirs().ok()?;
        ids.into_iter().find(|id| {
            let root = self.vm_dir(id).join("root.qcow2");
            matches!(qcow2::read_header(&root), Ok(Some(h)) if h.backing_file.as_deref().map(Path::new) == Some(image))
        })
    }
}

/// Bytes a file really takes on disk (its blocks; a thin qcow2 is much smaller than its size).
fn allocated(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

impl DirStorage {
    /// The `*.qcow2` files in `volumes/` (none when the directory does not exist yet).
    fn volume_files(&self) -> Result<Vec<PathBuf>, HostError> {
        let dir = self.volumes_dir();
        match fs::read_dir(&dir) {
            Ok(rd) => Ok(rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(HostError::io(
                format!("pool {}", self.pool.display()),
                "list",
                dir,
                e,
            )),
        }
    }
}

/// Grow the qcow2 file `path` to `size_mib` (`qemu-img resize`); a larger one is left as it is.
fn grow_qcow2(path: &Path, size_mib: u64, obj: &str) -> Result<(), HostError> {
    let have = match qcow2::read_header(path) {
        Ok(Some(h)) => h.virtual_size / MIB,
        Ok(None) => return Err(HostError::invalid(obj, "not a qcow2 file")),
        Err(e) => return Err(HostError::io(obj, "read", path, e)),
    };
    if have >= size_mib {
        return Ok(());
    }
    let args: Vec<std::ffi::OsString> = vec![
        "resize".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        path.as_os_str().to_owned(),
        format!("{size_mib}M").into(),
    ];
    cmd::run_bounded(&ToolLimits::QEMU_IMG_META, "qemu-img", &args)
        .map(drop)
        .map_err(|source| HostError::Tool {
            object: obj.to_string(),
            action: "qemu-img resize",
            source,
        })
}

/// Create `dir` if needed and set its mode.
fn make_dir(dir: &Path, mode: u32, obj: &str) -> Result<(), HostError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(HostError::io(obj, "create", dir, e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| HostError::io(obj, "chmod", dir, e))
}

/// Mode of guest data in the pool — disks, seeds and their inputs, cached images: root only.
/// libvirt's dynamic ownership (`dynamic_ownership = 1`, the default) hands a disk to the qemu
/// user (`libvirt-qemu`) while its domain runs, backing images included, so qemu can open them.
pub const PRIVATE: u32 = 0o600;

/// Write `data` to `path` atomically (temporary file in the same dir, fsync, rename). The file
/// has `mode` from its creation on (never wider for a moment).
pub(crate) fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
    obj: &str,
) -> Result<(), HostError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_name(path);
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HostError::io(obj, "write", path, e)
    })
}

/// Pure: whether a file name is one of [`tmp_name`]'s (`<name>.tmp<digits>`).
pub fn is_temp_name(name: &str) -> bool {
    name.rsplit_once(".tmp").is_some_and(|(stem, pid)| {
        !stem.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
    })
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(s)
}

fn remove_if_exists(path: &Path, obj: &str) -> Result<(), HostError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::io(obj, "remove", path, e)),
    }
}

fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

impl Storage for DirStorage {
    fn cached_images(&self) -> Result<Vec<String>, HostError> {
        let dir = self.images_dir();
        let obj = format!("pool {}", self.pool.display());
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| HostError::io(&obj, "list", &dir, e))? {
            let entry = entry.map_err(|e| HostError::io(&obj, "list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(sha) = name.strip_suffix(".qcow2") {
                if is_sha256(sha) {
                    out.push(sha.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn image_path(&self, sha256: &str) -> PathBuf {
        self.images_dir().join(format!("{sha256}.qcow2"))
    }

    fn image_partial_path(&self, sha256: &str) -> PathBuf {
        self.images_dir().join(format!("{sha256}.qcow2.partial"))
    }

    fn commit_image(&self, sha256: &str, file_sha256: &str) -> Result<PathBuf, HostError> {
        check_sha(sha256)?;
        let obj = format!("image {sha256}");
        let expected = file_sha256.to_ascii_lowercase();
        if !is_sha256(&expected) {
            return Err(HostError::invalid(
                obj,
                format!("file digest {file_sha256:?} is not a sha256 hex digest"),
            ));
        }
        let partial = self.image_partial_path(sha256);
        let actual = tuchka_core::digest::sha256_file(&partial)
            .map_err(|e| HostError::io(&obj, "hash", &partial, e))?;
        if actual != expected {
            remove_if_exists(&partial, &obj)?;
            return Err(HostError::Corrupt {
                sha256: sha256.to_string(),
                expected,
                actual,
            });
        }
        let dest = self.image_path(sha256);
        let res = (|| {
            let f = fs::File::open(&partial)?;
            f.set_permissions(fs::Permissions::from_mode(0o400))?;
            f.sync_all()?;
            fs::rename(&partial, &dest)?;
            fs::File::open(self.images_dir())?.sync_all()
        })();
        res.map_err(|e| HostError::io(&obj, "move into place", &dest, e))?;
        Ok(dest)
    }

    fn remove_image(&self, sha256: &str) -> Result<(), HostError> {
        check_sha(sha256)?;
        let obj = format!("image {sha256}");
        let path = self.image_path(sha256);
        if let Some(vm_id) = self.image_user(&path) {
            return Err(HostError::ImageInUse {
                sha256: sha256.to_string(),
                vm_id,
            });
        }
        remove_if_exists(&path, &obj)?;
        remove_if_exists(&self.image_partial_path(sha256), &obj)
    }

    fn ensure_root_disk(
        &self,
        vm_id: &str,
        image_sha256: &str,
        disk_mib: u64,
    ) -> Result<PathBuf, HostError> {
        check_vm_id(vm_id)?;
        check_sha(image_sha256)?;
        let obj = format!("vm {vm_id} root disk");
        let dir = self.vm_dir(vm_id);
        let root = dir.join("root.qcow2");
        let image = self.image_path(image_sha256);
        if root.exists() {
            self.fix_backing(&root, &image, image_sha256, &obj)?;
            return Ok(root);
        }
        let header = match qcow2::read_header(&image) {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err(HostError::invalid(
                    obj,
                    format!("cached image {} is not a qcow2 file", image.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HostError::invalid(
                    obj,
                    format!(
                        "image {image_sha256} is not in the cache ({})",
                        image.display()
                    ),
                ))
            }
            Err(e) => return Err(HostError::io(obj, "read", &image, e)),
        };
        let size = disk_mib
            .checked_mul(MIB)
            .ok_or_else(|| HostError::invalid(&obj, "disk size overflows"))?;
        if size < header.virtual_size {
            return Err(HostError::invalid(
                obj,
                format!(
                    "disk of {disk_mib} MiB is smaller than the image's virtual size of {} MiB; ask for at least that much",
                    header.virtual_size.div_ceil(MIB)
                ),
            ));
        }
        make_dir(&dir, 0o711, &obj)?;
        let tmp = tmp_name(&root);
        let args: Vec<std::ffi::OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            "-b".into(),
            image.clone().into_os_string(),
            tmp.clone().into_os_string(),
            size.to_string().into(),
        ];
        create_into_place(&obj, &args, &tmp, &root)?;
        Ok(root)
    }

    fn ensure_seed(
        &self,
        vm_id: &str,
        name: &str,
        user_data: Option<&str>,
        ssh_keys: &[String],
    ) -> Result<PathBuf, HostError> {
        check_vm_id(vm_id)?;
        let obj = format!("vm {vm_id} seed");
        let dir = self.vm_dir(vm_id);
        let iso = dir.join("seed.iso");
        let inputs = dir.join("seed");
        let meta = render_meta_data(vm_id, name, ssh_keys);
        let user = render_user_data(user_data);
        let unchanged = iso.exists()
            && read_opt(&inputs.join("meta-data")).as_deref() == Some(meta.as_str())
            && read_opt(&inputs.join("user-data")).as_deref() == Some(user.as_str());
        if unchanged {
            return Ok(iso);
        }
        make_dir(&dir, 0o711, &obj)?;
        // Stage the inputs, build the ISO from them, then move ISO and inputs into place. A crash
        // in between leaves stale inputs, which only causes a rebuild next time.
        let staging = dir.join("seed.new");
        let _ = fs::remove_dir_all(&staging);
        make_dir(&staging, 0o700, &obj)?;
        write_atomic(&staging.join("meta-data"), meta.as_bytes(), PRIVATE, &obj)?;
        write_atomic(&staging.join("user-data"), user.as_bytes(), PRIVATE, &obj)?;
        let tmp_iso = tmp_name(&iso);
        build_iso(&tmp_iso, &staging).map_err(|source| {
            let _ = fs::remove_file(&tmp_iso);
            HostError::Tool {
                object: obj.clone(),
                action: "build NoCloud ISO",
                source,
            }
        })?;
        fs::set_permissions(&tmp_iso, fs::Permissions::from_mode(PRIVATE))
            .map_err(|e| HostError::io(&obj, "chmod", &tmp_iso, e))?;
        fs::rename(&tmp_iso, &iso).map_err(|e| HostError::io(&obj, "move into place", &iso, e))?;
        let _ = fs::remove_dir_all(&inputs);
        fs::rename(&staging, &inputs)
            .map_err(|e| HostError::io(&obj, "move into place", &inputs, e))?;
        Ok(iso)
    }

    fn root_disk_path(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("root.qcow2")
    }

    fn ensure_vm_dir(&self, vm_id: &str) -> Result<PathBuf, HostError> {
        check_vm_id(vm_id)?;
        let dir = self.vm_dir(vm_id);
        make_dir(&dir, 0o711, &format!("vm {vm_id}"))?;
        Ok(dir)
    }

    fn console_log_path(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("console.log")
    }

    fn vm_dirs(&self) -> Result<Vec<String>, HostError> {
        let dir = self.vms_dir();
        let obj = format!("pool {}", self.pool.display());
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| HostError::io(&obj, "list", &dir, e))? {
            let entry = entry.map_err(|e| HostError::io(&obj, "list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) && is_vm_id(&name) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove_vm(&self, vm_id: &str) -> Result<(), HostError> {
        check_vm_id(vm_id)?;
        let dir = self.vm_dir(vm_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HostError::io(format!("vm {vm_id}"), "remove", &dir, e)),
        }
    }

    fn usage(&self) -> Result<PoolUsage, HostError> {
        let obj = format!("pool {}", self.pool.display());
        let mut u = PoolUsage::default();
        let mut disks: Vec<PathBuf> = self
            .vm_dirs()?
            .into_iter()
            .map(|id| self.vm_dir(&id).join("root.qcow2"))
            .collect();
        disks.extend(self.volume_files()?);
        for d in disks {
            let Ok(meta) = fs::metadata(&d) else {
                continue; // a VM directory without a disk yet, or one that just went
            };
            u.allocated_mib += allocated(&meta) / MIB;
            if let Ok(Some(h)) = qcow2::read_header(&d) {
                u.provisioned_mib += h.virtual_size / MIB;
            }
        }
        let images = match fs::read_dir(self.images_dir()) {
            Ok(rd) => rd,
            Err(e) => return Err(HostError::io(&obj, "list", self.images_dir(), e)),
        };
        for e in images.flatten() {
            if let Ok(meta) = e.metadata() {
                u.image_cache_mib += allocated(&meta) / MIB;
            }
        }
        Ok(u)
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes_dir().join(format!("{id}.qcow2"))
    }

    fn ensure_volume(&self, id: &str, size_mib: u64) -> Result<PathBuf, HostError> {
        check_vm_id(id)?;
        let obj = format!("volume {id}");
        let path = self.volume_path(id);
        if path.exists() {
            return Ok(path);
        }
        if size_mib == 0 {
            return Err(HostError::invalid(&obj, "a volume of 0 MiB"));
        }
        make_dir(&self.volumes_dir(), 0o711, &obj)?;
        let tmp = tmp_name(&path);
        let args: Vec<std::ffi::OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            tmp.clone().into_os_string(),
            format!("{size_mib}M").into(),
        ];
        create_into_place(&obj, &args, &tmp, &path)?;
        Ok(path)
    }

    fn grow_volume(&self, id: &str, size_mib: u64) -> Result<(), HostError> {
        check_vm_id(id)?;
        grow_qcow2(&self.volume_path(id), size_mib, &format!("volume {id}"))
    }

    fn grow_root_disk(&self, vm_id: &str, size_mib: u64) -> Result<(), HostError> {
        check_vm_id(vm_id)?;
        grow_qcow2(
            &self.root_disk_path(vm_id),
            size_mib,
            &format!("vm {vm_id} root disk"),
        )
    }

    fn root_disk_mib(&self, vm_id: &str) -> Option<u64> {
        qcow2::read_header(&self.root_disk_path(vm_id))
            .ok()
            .flatten()
            .map(|h| h.virtual_size / MIB)
    }

    fn volumes(&self) -> Result<Vec<(String, u64, u64)>, HostError> {
        let mut out = vec![];
        for path in self.volume_files()? {
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".qcow2"))
                .filter(|id| is_vm_id(id))
                .map(str::to_string)
            else {
                continue;
            };
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let size = match qcow2::read_header(&path) {
                Ok(Some(h)) => h.virtual_size / MIB,
                _ => 0,
            };
            out.push((id, size, allocated(&meta) / MIB));
        }
        out.sort();
        Ok(out)
    }

    fn remove_volume(&self, id: &str) -> Result<(), HostError> {
        check_vm_id(id)?;
        remove_if_exists(&self.volume_path(id), &format!("volume {id}"))
    }

    fn capacity(&self) -> Result<(u64, u64), HostError> {
        let st = rustix::fs::statvfs(&self.pool).map_err(|e| {
            HostError::io(
                format!("pool {}", self.pool.display()),
                "statvfs",
                &self.pool,
                e.into(),
            )
        })?;
        let total = st.f_blocks.saturating_mul(st.f_frsize) / MIB;
        let free = st.f_bavail.saturating_mul(st.f_frsize) / MIB;
        Ok((total, free))
    }
}

/// `qemu-img <args>` writing `tmp`, then `tmp` renamed to `dest` (a failed create leaves
/// nothing).
fn create_into_place(
    obj: &str,
    args: &[std::ffi::OsString],
    tmp: &Path,
    dest: &Path,
) -> Result<(), HostError> {
    if let Err(source) = cmd::run_bounded(&ToolLimits::QEMU_IMG_META, "qemu-img", args) {
        let _ = fs::remove_file(tmp);
        return Err(HostError::Tool {
            object: obj.to_string(),
            action: "qemu-img create",
            source,
        });
    }
    if let Err(e) = fs::set_permissions(tmp, fs::Permissions::from_mode(PRIVATE)) {
        let _ = fs::remove_file(tmp);
        return Err(HostError::io(obj, "chmod", tmp, e));
    }
    fs::rename(tmp, dest).map_err(|e| HostError::io(obj, "move into place", dest, e))
}

/// Build an ISO9660 (Joliet + Rock Ridge) image labelled `cidata` from the files in `dir`, with
/// genisoimage, or xorriso in mkisofs mode when genisoimage is missing.
fn build_iso(out: &Path, dir: &Path) -> Result<(), cmd::CommandError> {
    let args: Vec<std::ffi::OsString> = vec![
        "-quiet".into(),
        "-V".into(),
        "cidata".into(),
        "-J".into(),
        "-r".into(),
        "-o".into(),
        out.as_os_str().to_owned(),
        dir.as_os_str().to_owned(),
    ];
    if cmd::find_tool("genisoimage").is_some() || cmd::find_tool("xorriso").is_none() {
        cmd::run("genisoimage", &args, None).map(drop)
    } else {
        let mut x: Vec<std::ffi::OsString> = vec!["-as".into(), "mkisofs".into()];
        x.extend(args);
        cmd::run("xorriso", &x, None).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_checked() {
        assert!(is_sha256(&"a".repeat(64)));
        assert!(!is_sha256(&"A".repeat(64)));
        assert!(!is_sha256("../../etc/passwd"));
        assert!(is_vm_id("3f2a-uuid_1.x"));
        assert!(!is_vm_id("../x"));
        assert!(!is_vm_id(".hidden"));
        assert!(!is_vm_id("a/b"));
    }

    #[test]
    fn finds_the_topmost_closed_ancestor() {
        let dirs = vec![
            (PathBuf::from("/"), 0o755),
            (PathBuf::from("/tmp/x"), 0o700),
            (PathBuf::from("/tmp/x/y"), 0o700),
        ];
        assert_eq!(
            first_untraversable(&dirs).map(|d| d.0.clone()),
            Some(PathBuf::from("/tmp/x"))
        );
        assert_eq!(first_untraversable(&dirs[..1]), None);
    }
}
