//! Disk space as users see it (`tuchka storage`), and the image caches of the hosts
//! (`image cache list|prune`). A cached image nothing uses is kept for `--image-cache-ttl`
//! after its last use, then dropped (see [`crate::desired::keep_images`]); a prune drops it now.

use std::collections::BTreeSet;

use tuchka_api::{CachePrune, CachedImage, HostStorage, Storage, StoreStorage};
use tuchka_store as db;

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::state::Controller;

const MIB: u64 = 1 << 20;

/// Every host's pool and the controller's image store.
pub fn view(ctl: &Controller) -> Result<Storage> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    let ratio = ctl.config().ratios.disk;
    let hosts = s
        .hosts
        .iter()
        .filter(|h| !h.revoked)
        .map(|h| {
            let f = &h.facts;
            HostStorage {
                host: h.name.clone(),
                pool_mib: f.disk_mib,
                used_mib: f.disk_mib.saturating_sub(f.disk_free_mib),
                free_mib: f.disk_free_mib,
                reserve_mib: crate::scheduler::reserve_mib(f.disk_mib, ctl.config().disk_reserve),
                allocated_mib: f.disk_allocated_mib,
                provisioned_mib: f.disk_provisioned_mib,
                provision_limit_mib: (f.disk_mib as f64 * ratio) as u64,
                image_cache_mib: f.image_cache_mib,
                cached_images: h.cached_images.len() as u32,
            }
        })
        .collect();
    let (size, free) = crate::images::store_space(ctl)?;
    let store = StoreStorage {
        path: ctl.config().data_dir.join("images").display().to_string(),
        size_mib: size / MIB,
        free_mib: free / MIB,
        images_mib: unique_stored(&s) / MIB,
        images: s.images.len() as u32,
    };
    Ok(Storage { hosts, store })
}

/// Bytes the store's files take (images sharing content share a file).
fn unique_stored(s: &Snapshot) -> u64 {
    let mut seen = BTreeSet::new();
    s.images
        .iter()
        .filter(|i| seen.insert(i.sha256.as_str()))
        .map(|i| i.stored_size)
        .sum()
}

/// What uses image `sha` on host `host_id`: its VMs, VMs migrating to it, captures there.
fn users(s: &Snapshot, host_id: &str, sha: &str) -> Vec<String> {
    let of_image = |vm_id: &str| {
        s.vms.iter().find(|v| v.id == vm_id).filter(|v| {
            s.groups
                .get(&v.group)
                .is_some_and(|g| g.image_sha256 == sha)
        })
    };
    let mut out: Vec<String> = s
        .vms
        .iter()
        .filter(|v| v.host_id == host_id && of_image(&v.id).is_some())
        .map(|v| format!("vm {}", v.name))
        .collect();
    for m in s.migrations.iter().filter(|m| m.target_host == host_id) {
        if let Some(v) = of_image(&m.vm_id) {
            out.push(format!("migration of {}", v.name));
        }
    }
    for c in s.captures.iter().filter(|c| c.host_id == host_id) {
        if of_image(&c.vm_id).is_some() {
            out.push(format!("capture of {}", c.vm_name));
        }
    }
    out
}

/// `image cache list`: every cached image on every host, with its names and users.
pub fn cache_list(ctl: &Controller) -> Result<Vec<CachedImage>> {
    let db = ctl.db();
    let s = ctl.snapshot(db.conn())?;
    let mut out = vec![];
    for h in s.hosts.iter().filter(|h| !h.revoked) {
        for sha in &h.cached_images {
            out.push(CachedImage {
                host: h.name.clone(),
                sha256: sha.clone(),
                images: s
                    .images
                    .iter()
                    .filter(|i| &i.sha256 == sha)
                    .map(|i| i.name.clone())
                    .collect(),
                used_by: users(&s, &h.id, sha),
            });
        }
    }
    Ok(out)
}

/// `image cache prune`: every cached image nothing uses is dropped now.
pub fn cache_prune(ctl: &Controller) -> Result<CachePrune> {
    let pruned = ctl.db().atomic(|c| {
        let s = ctl.snapshot(c)?;
        let mut pruned = vec![];
        for h in s.hosts.iter().filter(|h| !h.revoked) {
            for sha in &h.cached_images {
                if users(&s, &h.id, sha).is_empty() {
                    db::expire_cached_image(c, &h.id, sha)?;
                    pruned.push(format!("{}: {sha}", h.name));
                }
            }
        }
        Ok::<_, Error>(pruned)
    })?;
    ctl.bump();
    Ok(CachePrune { pruned })
}
