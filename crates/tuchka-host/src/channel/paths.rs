//! Where a migration's unix sockets live, and who may use them.
//!
//! UNIX-socket migration uses the **same path on both hosts**: on the destination qemu listens
//! on `memory.sock` (`-incoming unix:…`) and `disk.sock` (the NBD server), on the source qemu
//! connects to the same paths — where the [`super::Tunnel`] listens and forwards. `libvirt.sock`
//! is the source libvirtd's way to the destination libvirtd (the tunnel again). So the paths
//! are derived from what both agents know (run dir, cloud id, migration id):
//!
//! ```text
//! <run-dir>/                                  0755 root        (default /run/tuchka)
//! <run-dir>/migrate/                          0711 root        (nobody lists migrations)
//! <run-dir>/migrate/<cloud8>-<migration8>/    source: 0710 root:<qemu group>
//!                                             target: 0730 root:<qemu group>
//!     libvirt.sock memory.sock disk.sock      source: 0660 root:<qemu group> (the tunnel's)
//!                                             target: made by qemu (memory, disk)
//! ```
//!
//! qemu runs as `libvirt-qemu` (its group: [`qemu_gid`]). On the source it must traverse the
//! directory and connect to the tunnel's sockets (libvirt also relabels `disk.sock` to the qemu
//! user before qemu connects); on the target it must create and remove its listening sockets,
//! hence write + search but no read. Both were measured with libvirt 9.0 / QEMU 7.2: anything
//! less fails (`nbd-server-start: Failed to bind socket … Permission denied`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::proto::{is_channel_id, StreamKind};
use super::ChannelError;

/// The agent's default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/tuchka";
/// Longest path a unix socket address can hold (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Users qemu runs as, in the order they are looked for (Debian, Fedora).
const QEMU_USERS: [&str; 2] = ["libvirt-qemu", "qemu"];

/// The sockets of one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPaths {
    /// `<run-dir>/migrate/<cloud8>-<migration8>`.
    pub dir: PathBuf,
    /// The tunnel to the destination libvirtd (source side only).
    pub libvirt: PathBuf,
    /// qemu's migration stream.
    pub memory: PathBuf,
    /// The NBD disk stream.
    pub disk: PathBuf,
}

impl MigrationPaths {
    /// The paths of migration `migration_id` of cloud `cloud_id` under `run_dir` (pure). The
    /// directory takes the first 8 characters of the migration id, so concurrent migrations of
    /// one cloud must differ there (UUIDs do).
    pub fn new(run_dir: &Path, cloud_id: &str, migration_id: &str) -> Result<Self, ChannelError> {
        if !is_channel_id(migration_id) {
            return Err(ChannelError::invalid(
                format!("migration {migration_id:?}"),
                "a migration id is 1-64 characters of A-Za-z0-9._- not starting with '.'",
            ));
        }
        if !run_dir.is_absolute() {
            return Err(ChannelError::invalid(
                format!("run dir {}", run_dir.display()),
                "must be an absolute path",
            ));
        }
        let short: String = migration_id.chars().take(8).collect();
        let dir = run_dir
            .join("migrate")
            .join(format!("{}-{short}", crate::cloud8(cloud_id)));
        let paths = MigrationPaths {
            libvirt: dir.join("libvirt.sock"),
            memory: dir.join("memory.sock"),
            disk: dir.join("disk.sock"),
            dir,
        };
        let longest = paths
            .memory
            .as_os_str()
            .len()
            .max(paths.libvirt.as_os_str().len());
        if longest > MAX_SOCKET_PATH {
            return Err(ChannelError::invalid(
                format!("run dir {}", run_dir.display()),
                format!(
                    "socket paths under it would be {longest} bytes, more than the {MAX_SOCKET_PATH} a unix socket address holds; use a shorter --run-dir"
                ),
            ));
        }
        Ok(paths)
    }

    /// The socket of stream `kind` (`None` for [`StreamKind::DiskFile`], which has none).
    pub fn socket(&self, kind: StreamKind) -> Option<&Path> {
        match kind {
            StreamKind::Libvirt => Some(&self.libvirt),
            StreamKind::Memory => Some(&self.memory),
            StreamKind::Disk => Some(&self.disk),
            StreamKind::DiskFile => None,
        }
    }

    /// The destination libvirt URI for peer-to-peer migration through the tunnel.
    pub fn dest_uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.libvirt.display())
    }

    /// The migration URI (qemu's memory stream).
    pub fn memory_uri(&self) -> String {
        format!("unix://{}", self.memory.display())
    }

    /// The disks URI (NBD).
    pub fn disks_uri(&self) -> String {
        format!("unix://{}", self.disk.display())
    }
}

/// Which end of a migration a directory is prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The tunnel listens; qemu connects.
    Source,
    /// qemu listens; the channel server connects.
    Target,
}

impl Side {
    fn dir_mode(self) -> u32 {
        match self {
            Side::Source => 0o710,
            Side::Target => 0o730,
        }
    }
}

/// Create (or reset) the migration directory for `side`: the parents with their modes, the
/// directory itself owned by root and group `qemu_gid` (or the caller's group when `None`),
/// and no stale sockets left from an earlier, interrupted attempt.
pub fn prepare_dir(
    paths: &MigrationPaths,
    side: Side,
    qemu_gid: Option<u32>,
) -> Result<(), ChannelError> {
    let migrate = paths
        .dir
        .parent()
        .ok_or_else(|| ChannelError::invalid("migration dir", "has no parent"))?;
    let run = migrate
        .parent()
        .ok_or_else(|| ChannelError::invalid("migration dir", "has no run dir"))?;
    make_dir(run, 0o755, None)?;
    make_dir(migrate, 0o711, None)?;
    make_dir(&paths.dir, side.dir_mode(), qemu_gid)?;
    for sock in [&paths.libvirt, &paths.memory, &paths.disk] {
        remove_file(sock)?;
    }
    Ok(())
}

/// Remove the migration directory and what is in it (sockets only). Absent is fine.
pub fn remove_dir(paths: &MigrationPaths) -> Result<(), ChannelError> {
    for sock in [&paths.libvirt, &paths.memory, &paths.disk] {
        remove_file(sock)?;
    }
    match std::fs::remove_dir(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ChannelError::Io {
            action: "remove",
            path: paths.dir.clone(),
            source,
        }),
    }
}

/// Give a socket the tunnel made the modes qemu needs: 0660, group `qemu_gid`.
pub(crate) fn share_socket(path: &Path, qemu_gid: Option<u32>) -> Result<(), ChannelError> {
    set_owner_mode(path, 0o660, qemu_gid)
}

fn make_dir(dir: &Path, mode: u32, gid: Option<u32>) -> Result<(), ChannelError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ChannelError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    set_owner_mode(dir, mode, gid)
}

fn set_owner_mode(path: &Path, mode: u32, gid: Option<u32>) -> Result<(), ChannelError> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ChannelError::Io {
            action: "set the group of",
            path: path.to_path_buf(),
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ChannelError::Io {
            action: "set the mode of",
            path: path.to_path_buf(),
            source,
        }
    })
}

fn remove_file(path: &Path) -> Result<(), ChannelError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ChannelError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The primary group of the user qemu runs as (`libvirt-qemu`, else `qemu`), from
/// `/etc/passwd`; `None` when neither exists (then the directories keep root's group and qemu
/// can only use them if it runs as root).
pub fn qemu_gid() -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    QEMU_USERS.iter().find_map(|u| primary_gid(&passwd, u))
}

/// The primary gid of `user` in the text of an `/etc/passwd` file (pure).
pub fn primary_gid(passwd: &str, user: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != user {
            return None;
        }
        f.nth(2)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";

    #[test]
    fn paths_are_the_same_for_both_ends_and_fit_a_socket_address() {
        let p = MigrationPaths::new(
            Path::new(DEFAULT_RUN_DIR),
            CLOUD,
            "3c9d2b7a-1111-4222-8333-444455556666",
        )
        .expect("paths");
        assert_eq!(p.dir, Path::new("/run/tuchka/migrate/0f2a6c1e-3c9d2b7a"));
        assert_eq!(
            p.memory,
            Path::new("/run/tuchka/migrate/0f2a6c1e-3c9d2b7a/memory.sock")
        );
        assert_eq!(
            p.dest_uri(),
            "qemu+unix:///system?socket=/run/tuchka/migrate/0f2a6c1e-3c9d2b7a/libvirt.sock"
        );
        assert_eq!(
            p.memory_uri(),
            "unix:///run/tuchka/migrate/0f2a6c1e-3c9d2b7a/memory.sock"
        );
        assert_eq!(
            p.disks_uri(),
            "unix:///run/tuchka/migrate/0f2a6c1e-3c9d2b7a/disk.sock"
        );
        assert_eq!(p.socket(StreamKind::Disk), Some(p.disk.as_path()));
        assert_eq!(p.socket(StreamKind::DiskFile), None);
        let short = MigrationPaths::new(Path::new("/run/t"), CLOUD, "m1").expect("short id");
        assert_eq!(short.dir, Path::new("/run/t/migrate/0f2a6c1e-m1"));
    }

    #[test]
    fn bad_ids_and_run_dirs_are_refused() {
        let run = Path::new(DEFAULT_RUN_DIR);
        assert!(MigrationPaths::new(run, CLOUD, "../x").is_err());
        assert!(MigrationPaths::new(run, CLOUD, "").is_err());
        assert!(MigrationPaths::new(Path::new("run"), CLOUD, "m").is_err());
        let deep = PathBuf::from(format!("/{}", "d".repeat(80)));
        let err = MigrationPaths::new(&deep, CLOUD, "m").expect_err("too long");
        assert!(err.to_string().contains("unix socket address"), "{err}");
    }

    #[test]
    fn qemu_group_comes_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      libvirt-qemu:x:64055:64055:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n\
                      broken\n";
        assert_eq!(primary_gid(passwd, "libvirt-qemu"), Some(64055));
        assert_eq!(primary_gid(passwd, "qemu"), None);
        assert_eq!(primary_gid(passwd, "broken"), None);
        assert_eq!(primary_gid("qemu:x:107:abc:::\n", "qemu"), None);
    }

    #[test]
    fn directories_get_their_modes_and_lose_stale_sockets() {
        let tmp = tempfile::tempdir().expect("tmp");
        let run = tmp.path().join("run");
        let p = MigrationPaths::new(&run, CLOUD, "m1").expect("paths");
        prepare_dir(&p, Side::Target, None).expect("target dir");
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&run), 0o755);
        assert_eq!(mode(&run.join("migrate")), 0o711);
        assert_eq!(mode(&p.dir), 0o730);
        std::fs::write(&p.memory, b"stale").expect("stale");
        prepare_dir(&p, Side::Source, None).expect("source dir");
        assert_eq!(mode(&p.dir), 0o710);
        assert!(!p.memory.exists(), "stale socket removed");
        remove_dir(&p).expect("remove");
        assert!(!p.dir.exists());
        remove_dir(&p).expect("absent is fine");
    }
}
