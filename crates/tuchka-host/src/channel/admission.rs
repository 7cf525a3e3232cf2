//! The destination agent's [`Admission`]: only migrations it was told to expect, only from
//! their source host.
//!
//! The agent calls [`MigrationAdmission::expect`] when the controller names this host the
//! target of a migration; the returned [`IncomingGuard`] keeps it admitted (and, for a live
//! migration, keeps the socket directory qemu listens in) until it is dropped — when the
//! migration has finished or failed. Routes: `libvirt` → the local libvirtd socket, `memory`
//! and `disk` → the migration's sockets ([`MigrationPaths`]), `disk-file` → where that disk
//! of the VM goes (cold migration: its root disk and each data volume). Everything else is refused with a reason naming the migration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::paths::{self, MigrationPaths, Side};
use super::proto::{is_channel_id, ChannelRequest};
use super::server::{Admission, Route};
use super::ChannelError;

/// The local libvirtd's socket (read-write).
pub const LIBVIRT_SOCKET: &str = "/run/libvirt/libvirt-sock";

/// A migration this host expects to receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Migration id.
    pub migration_id: String,
    /// The only host allowed to send it (its id, as in its certificate).
    pub source_host_id: String,
    /// The VM being moved.
    pub vm_id: String,
    /// Live migration: admit the libvirt, memory and disk streams (and prepare the socket
    /// directory qemu listens in).
    pub live: bool,
    /// Cold migration: the disk files it admits, each disk id (the VM's id for its root
    /// disk, a volume's id) with where it goes.
    pub files: Vec<(String, PathBuf)>,
}

#[derive(Debug)]
struct Expected {
    incoming: Incoming,
    paths: MigrationPaths,
}

#[derive(Debug)]
struct Shared {
    run_dir: PathBuf,
    cloud_id: String,
    libvirt_socket: PathBuf,
    qemu_gid: Option<u32>,
    expected: Mutex<HashMap<String, Expected>>,
}

/// An [`Admission`] that admits what [`MigrationAdmission::expect`] registered.
#[derive(Debug, Clone)]
pub struct MigrationAdmission {
    shared: Arc<Shared>,
}

impl MigrationAdmission {
    /// Expect migrations of cloud `cloud_id` with their sockets under `run_dir`; `libvirt`
    /// connections go to `libvirt_socket` ([`LIBVIRT_SOCKET`] on a host). qemu's group is
    /// looked up ([`super::qemu_gid`]); see [`MigrationAdmission::with_qemu_gid`].
    pub fn new(run_dir: &Path, cloud_id: &str, libvirt_socket: &Path) -> Self {
        MigrationAdmission {
            shared: Arc::new(Shared {
                run_dir: run_dir.to_path_buf(),
                cloud_id: cloud_id.to_string(),
                libvirt_socket: libvirt_socket.to_path_buf(),
                qemu_gid: paths::qemu_gid(),
                expected: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The same, with qemu's group given (`None`: leave root's group). Call before sharing.
    pub fn with_qemu_gid(self, qemu_gid: Option<u32>) -> Self {
        let s = &self.shared;
        MigrationAdmission {
            shared: Arc::new(Shared {
                run_dir: s.run_dir.clone(),
                cloud_id: s.cloud_id.clone(),
                libvirt_socket: s.libvirt_socket.clone(),
                qemu_gid,
                expected: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Admit `incoming` until the guard is dropped. For a live migration the socket directory
    /// is prepared for qemu to listen in (removed again with the guard). Refuses an id that is
    /// already expected.
    pub fn expect(&self, incoming: Incoming) -> Result<IncomingGuard, ChannelError> {
        if !is_channel_id(&incoming.vm_id) {
            return Err(ChannelError::invalid(
                format!("vm {:?}", incoming.vm_id),
                "not a valid vm id",
            ));
        }
        let paths = MigrationPaths::new(
            &self.shared.run_dir,
            &self.shared.cloud_id,
            &incoming.migration_id,
        )?;
        let mut expected = self.lock();
        if expected.contains_key(&incoming.migration_id) {
            return Err(ChannelError::invalid(
                format!("migration {}", incoming.migration_id),
                "is already expected on this host",
            ));
        }
        if incoming.live {
            paths::prepare_dir(&paths, Side::Target, self.shared.qemu_gid)?;
        }
        let id = incoming.migration_id.clone();
        tracing::info!(migration = %id, source = %incoming.source_host_id, vm = %incoming.vm_id, live = incoming.live, "expecting a migration");
        expected.insert(
            id.clone(),
            Expected {
                incoming,
                paths: paths.clone(),
            },
        );
        Ok(IncomingGuard {
            shared: self.shared.clone(),
            migration_id: id,
        })
    }

    /// The migrations expected now.
    pub fn expected(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        self.shared
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Admission for MigrationAdmission {
    fn admit(&self, peer_host_id: &str, req: &ChannelRequest) -> Result<Route, String> {
        let expected = self.lock();
        let id = req.migration();
        let Some(e) = expected.get(id) else {
            return Err(format!("migration {id} is not expected on this host"));
        };
        if e.incoming.source_host_id != peer_host_id {
            return Err(format!(
                "host {peer_host_id} is not the source of migration {id}"
            ));
        }
        let not_live = || format!("migration {id} is not a live migration");
        match req {
            ChannelRequest::Libvirt { .. } if e.incoming.live => {
                Ok(Route::Unix(self.shared.libvirt_socket.clone()))
            }
            ChannelRequest::Memory { .. } if e.incoming.live => {
                Ok(Route::Unix(e.paths.memory.clone()))
            }
            ChannelRequest::Disk { .. } if e.incoming.live => Ok(Route::Unix(e.paths.disk.clone())),
            ChannelRequest::Libvirt { .. }
            | ChannelRequest::Memory { .. }
            | ChannelRequest::Disk { .. } => Err(not_live()),
            ChannelRequest::DiskFile { disk, .. } => {
                match e.incoming.files.iter().find(|(d, _)| d == disk) {
                    Some((_, path)) => Ok(Route::ReceiveFile(path.clone())),
                    None if e.incoming.files.is_empty() => {
                        Err(format!("migration {id} expects no disk file"))
                    }
                    None => Err(format!(
                        "migration {id} of vm {} expects no disk {disk}",
                        e.incoming.vm_id
                    )),
                }
            }
        }
    }
}

/// Keeps one expected migration admitted; dropping it stops admitting it and removes its
/// socket directory. Connections already admitted keep running until they end.
#[derive(Debug)]
pub struct IncomingGuard {
    shared: Arc<Shared>,
    migration_id: String,
}

impl IncomingGuard {
    /// The migration id.
    pub fn migration_id(&self) -> &str {
        &self.migration_id
    }
}

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        let removed = self
            .shared
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.migration_id);
        if let Some(e) = removed {
            if e.incoming.live {
                if let Err(err) = paths::remove_dir(&e.paths) {
                    tracing::warn!(migration = %self.migration_id, error = %err, "cannot remove the migration's socket directory");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";
    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn live(id: &str) -> Incoming {
        Incoming {
            migration_id: id.into(),
            source_host_id: "h1".into(),
            vm_id: "vm-1".into(),
            live: true,
            files: vec![],
        }
    }

    #[test]
    fn only_expected_migrations_from_their_source_are_admitted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let adm =
            MigrationAdmission::new(tmp.path(), CLOUD, Path::new("/run/libvirt/libvirt-sock"))
                .with_qemu_gid(None);
        let m = |id: &str| ChannelRequest::Memory {
            migration: id.into(),
        };
        assert!(adm
            .admit("h1", &m("m1"))
            .expect_err("unknown")
            .contains("not expected"));
        let guard = adm.expect(live("m1")).expect("expect");
        let paths = MigrationPaths::new(tmp.path(), CLOUD, "m1").expect("paths");
        assert!(paths.dir.is_dir(), "socket dir prepared");
        assert_eq!(
            adm.admit("h1", &m("m1")),
            Ok(Route::Unix(paths.memory.clone()))
        );
        assert_eq!(
            adm.admit(
                "h1",
                &ChannelRequest::Libvirt {
                    migration: "m1".into()
                }
            ),
            Ok(Route::Unix(PathBuf::from("/run/libvirt/libvirt-sock")))
        );
        assert!(adm
            .admit("h3", &m("m1"))
            .expect_err("other host")
            .contains("not the source"));
        let file = ChannelRequest::DiskFile {
            migration: "m1".into(),
            disk: "vm-1".into(),
            size: 1,
            sha256: SHA.into(),
        };
        assert!(adm
            .admit("h1", &file)
            .expect_err("no file")
            .contains("expects no disk file"));
        assert!(adm.expect(live("m1")).is_err(), "twice");
        assert_eq!(adm.expected(), vec!["m1".to_string()]);
        drop(guard);
        assert!(!paths.dir.exists(), "socket dir removed with the guard");
        assert!(adm.admit("h1", &m("m1")).is_err(), "no longer expected");
    }

    #[test]
    fn cold_migrations_admit_the_files_of_their_vm_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let adm = MigrationAdmission::new(tmp.path(), CLOUD, Path::new("/x")).with_qemu_gid(None);
        let dest = tmp.path().join("root.qcow2");
        let vol = tmp.path().join("vol-1.qcow2");
        let _g = adm
            .expect(Incoming {
                live: false,
                files: vec![("vm-1".into(), dest.clone()), ("vol-1".into(), vol.clone())],
                ..live("m2")
            })
            .expect("expect");
        let file = |disk: &str| ChannelRequest::DiskFile {
            migration: "m2".into(),
            disk: disk.into(),
            size: 1,
            sha256: SHA.into(),
        };
        assert_eq!(adm.admit("h1", &file("vm-1")), Ok(Route::ReceiveFile(dest)));
        assert_eq!(adm.admit("h1", &file("vol-1")), Ok(Route::ReceiveFile(vol)));
        assert!(adm
            .admit("h1", &file("vm-2"))
            .expect_err("other vm")
            .contains("expects no disk vm-2"));
        assert!(adm
            .admit(
                "h1",
                &ChannelRequest::Disk {
                    migration: "m2".into()
                }
            )
            .expect_err("not live")
            .contains("not a live migration"));
    }
}
