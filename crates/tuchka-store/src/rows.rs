//! Typed rows and the queries on them. Every function takes a `&Connection` so it can run
//! inside or outside [`crate::Store::atomic`].

use std::collections::{HashMap, HashSet};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use tuchka_api::agent::{HostFacts, Orphan};
use tuchka_api::{
    ApiError, Direction, MigrationMode, MigrationPhase, NetworkState, OperationKind,
    OperationState, PlacementPolicy, PowerState, Protocol, RuleAction, VmState,
};
use tuchka_core::migration::Side;
use tuchka_core::ops::OpRecord;

use crate::{Result, StoreError};

/// Every row `sql` returns, mapped by `f`.
fn query_all<T, P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    p: P,
    f: impl FnMut(&Row) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut st = c.prepare_cached(sql)?;
    let rows = st.query_map(p, f)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Run one statement through the connection's statement cache: the number of rows changed.
fn execute<P: rusqlite::Params>(c: &Connection, sql: &str, p: P) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

fn json<T: DeserializeOwned>(column: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Json { column, source })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// A column holding one of the API's wire names (a state, a kind, a policy): read with
/// `r.get::<_, Wire<T>>(i)?.0`, written as `t.as_str()`. A value this version does not know is
/// an error naming the column's type and the valid names, never a silent default.
pub struct Wire<T>(pub T);

impl<T> FromSql for Wire<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = v.as_str()?;
        s.parse::<T>()
            .map(Wire)
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

// ---------------------------------------------------------------- hosts

/// A registered host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// sha256 of its bearer credential.
    pub credential_sha256: String,
    /// No new placements.
    pub draining: bool,
    /// Credential revoked.
    pub revoked: bool,
    /// Last reported facts.
    pub facts: HostFacts,
    /// Last reported image cache.
    pub cached_images: Vec<String>,
    /// Last report, RFC 3339.
    pub last_seen: Option<String>,
    /// Last report, Unix seconds (0 = never).
    pub last_seen_unix: i64,
    /// What the host last reported having that the controller does not know.
    pub orphans: Vec<Orphan>,
}

const HOST_COLS: &str = "id, name, credential_sha256, draining, revoked, facts, cached_images, last_seen, last_seen_unix, orphans";

fn host_row(r: &Row) -> rusqlite::Result<(HostRow, String, String, String)> {
    Ok((
        HostRow {
            id: r.get(0)?,
            name: r.get(1)?,
            credential_sha256: r.get(2)?,
            draining: r.get(3)?,
            revoked: r.get(4)?,
            facts: HostFacts::default(),
            cached_images: vec![],
            last_seen: r.get(7)?,
            last_seen_unix: r.get(8)?,
            orphans: vec![],
        },
        r.get(5)?,
        r.get(6)?,
        r.get(9)?,
    ))
}

fn finish_host(
    (mut h, facts, cached, orphans): (HostRow, String, String, String),
) -> Result<HostRow> {
    h.facts = json("hosts.facts", &facts)?;
    h.cached_images = json("hosts.cached_images", &cached)?;
    h.orphans = json("hosts.orphans", &orphans)?;
    Ok(h)
}

/// All hosts by name (not the removed ones).
pub fn hosts(c: &Connection) -> Result<Vec<HostRow>> {
    let rows = query_all(
        c,
        &format!("SELECT {HOST_COLS} FROM hosts WHERE removed_at IS NULL ORDER BY name"),
        [],
        host_row,
    )?;
    rows.into_iter().map(finish_host).collect()
}

/// One host by id or name (not a removed one).
pub fn host(c: &Connection, id_or_name: &str) -> Result<Option<HostRow>> {
    let r = c
        .query_row(
            &format!(
                "SELECT {HOST_COLS} FROM hosts WHERE (id = ?1 OR name = ?1) AND removed_at IS NULL"
            ),
            [id_or_name],
            host_row,
        )
        .optional()?;
    r.map(finish_host).transpose()
}

/// Insert a new host.
pub fn insert_host(
    c: &Connection,
    id: &str,
    name: &str,
    credential_sha256: &str,
    facts: &HostFacts,
) -> Result<()> {
    execute(
        c,
        "INSERT INTO hosts (id, name, credential_sha256, facts, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, name, credential_sha256, to_json(facts), crate::now()],
    )?;
    Ok(())
}

/// Give host `id` a new credential and admit it again (a revoked host joining again, or a
/// host that lost its identity joining with a token bound to it).
pub fn set_host_credential(c: &Connection, id: &str, credential_sha256: &str) -> Result<bool> {
    Ok(execute(
        c,
        "UPDATE hosts SET credential_sha256 = ?2, revoked = 0 WHERE id = ?1 AND removed_at IS NULL",
        params![id, credential_sha256],
    )? > 0)
}

/// Remove host `id`: it is kept as a tombstone (its lost VMs still point at it) with no
/// credential, its name free for a new host. Returns false when there is no such host.
pub fn remove_host(c: &Connection, id: &str) -> Result<bool> {
    Ok(execute(
        c,
        "UPDATE hosts SET removed_at = ?2, removed_name = name, name = '~removed-' || id, \
         credential_sha256 = '', revoked = 1, draining = 0 WHERE id = ?1 AND removed_at IS NULL",
        params![id, crate::now()],
    )? > 0)
}

/// The name host `id` had when it was removed, if it was.
pub fn removed_host(c: &Connection, id: &str) -> Result<Option<String>> {
    Ok(c.query_row(
        "SELECT removed_name FROM hosts WHERE id = ?1 AND removed_at IS NOT NULL",
        [id],
        |r| r.get::<_, Option<String>>(0),
    )
    .optional()?
    .map(|n| n.unwrap_or_else(|| id.to_string())))
}

/// Drop what only a host's reports kept: its networks' presence and its image cache.
pub fn forget_host_reports(c: &Connection, id: &str) -> Result<()> {
    execute(c, "DELETE FROM host_networks WHERE host_id = ?1", [id])?;
    execute(c, "DELETE FROM image_cache WHERE host_id = ?1", [id])?;
    execute(c, "DELETE FROM vm_removals WHERE host_id = ?1", [id])?;
    Ok(())
}

/// Revoke host `id`: its credential is refused from now on, until it registers again (with a
/// join token). Returns false when there is no such host.
pub fn revoke_host(c: &Connection, id: &str) -> Result<bool> {
    let n = execute(c, "UPDATE hosts SET revoked = 1 WHERE id = ?1", [id])?;
    Ok(n > 0)
}

/// Set or clear a host's draining flag; false if there is no such host.
pub fn set_draining(c: &Connection, id: &str, draining: bool) -> Result<bool> {
    Ok(execute(
        c,
        "UPDATE hosts SET draining = ?2 WHERE id = ?1",
        params![id, draining],
    )? > 0)
}

/// Record a report's facts, cache and orphans.
pub fn touch_host(
    c: &Connection,
    id: &str,
    facts: &HostFacts,
    cached: &[String],
    orphans: &[Orphan],
) -> Result<()> {
    execute(
        c,
        "UPDATE hosts SET facts = ?2, cached_images = ?3, last_seen = ?4, last_seen_unix = ?5, orphans = ?6 WHERE id = ?1",
        params![id, to_json(facts), to_json(&cached), crate::now(), crate::now_unix(), to_json(&orphans)],
    )?;
    Ok(())
}

/// Rename host `id`; false if there is no such host.
pub fn rename_host(c: &Connection, id: &str, name: &str) -> Result<bool> {
    Ok(execute(
        c,
        "UPDATE hosts SET name = ?2 WHERE id = ?1",
        params![id, name],
    )? > 0)
}

// ---------------------------------------------------------------- join tokens

/// A join token, by its sha256 (the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    /// Id (for listing and logs; not secret).
    pub id: String,
    /// sha256 (hex) of the token.
    pub sha256: String,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// It admits no one after this, Unix seconds.
    pub expires_unix: i64,
    /// It admits one host only.
    pub single_use: bool,
    /// The existing host it admits again (a host that lost its identity), if any.
    pub host_id: Option<String>,
    /// When a single-use token was used, Unix seconds.
    pub used_unix: Option<i64>,
    /// The host that used it.
    pub used_by: Option<String>,
}

/// How long an expired or used token is kept (so that a refusal says why), seconds.
pub const JOIN_TOKEN_KEEP_S: i64 = 7 * 24 * 3600;

/// Record a new join token.
pub fn insert_join_token(c: &Connection, t: &JoinTokenRow) -> Result<()> {
    execute(
        c,
        "INSERT INTO join_tokens (id, sha256, created_at, expires_unix, single_use, host_id, used_unix, used_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![t.id, t.sha256, t.created_at, t.expires_unix, t.single_use, t.host_id, t.used_unix, t.used_by],
    )?;
    Ok(())
}

/// The join token whose sha256 is `sha256`.
pub fn join_token_by_sha(c: &Connection, sha256: &str) -> Result<Option<JoinTokenRow>> {
    Ok(c.query_row(
        "SELECT id, sha256, created_at, expires_unix, single_use, host_id, used_unix, used_by \
             FROM join_tokens WHERE sha256 = ?1",
        [sha256],
        |r| {
            Ok(JoinTokenRow {
                id: r.get(0)?,
                sha256: r.get(1)?,
                created_at: r.get(2)?,
                expires_unix: r.get(3)?,
                single_use: r.get(4)?,
                host_id: r.get(5)?,
                used_unix: r.get(6)?,
                used_by: r.get(7)?,
            })
        },
    )
    .optional()?)
}

/// Mark single-use token `id` used by `host` at `now`; false when it already was.
pub fn use_join_token(c: &Connection, id: &str, now: i64, host: &str) -> Result<bool> {
    Ok(execute(
        c,
        "UPDATE join_tokens SET used_unix = ?2, used_by = ?3 WHERE id = ?1 AND used_unix IS NULL",
        params![id, now, host],
    )? > 0)
}

/// Drop tokens expired for longer than [`JOIN_TOKEN_KEEP_S`]; how many went.
pub fn prune_join_tokens(c: &Connection, now: i64) -> Result<usize> {
    Ok(execute(
        c,
        "DELETE FROM join_tokens WHERE expires_unix < ?1",
        [now - JOIN_TOKEN_KEEP_S],
    )?)
}

/// Drop every join token (a rotation); how many went.
pub fn delete_join_tokens(c: &Connection) -> Result<usize> {
    Ok(execute(c, "DELETE FROM join_tokens", [])?)
}

// ---------------------------------------------------------------- images

/// A stored image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    /// Unique name.
    pub name: String,
    /// sha256 of the upload.
    pub sha256: String,
    /// sha256 of the stored qcow2.
    pub file_sha256: String,
    /// Detected format.
    pub source_format: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Stored size, bytes.
    pub stored_size: u64,
    /// Upload time.
    pub created_at: String,
    /// Where it came from: `upload`, `vm NAME`, `build from IMAGE`.
    pub made_from: String,
}

fn image_row(r: &Row) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        name: r.get(0)?,
        sha256: r.get(1)?,
        file_sha256: r.get(2)?,
        source_format: r.get(3)?,
        virtual_size: r.get::<_, i64>(4)? as u64,
        stored_size: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
        made_from: r.get(7)?,
    })
}

const IMAGE_COLS: &str =
    "name, sha256, file_sha256, source_format, virtual_size, stored_size, created_at, made_from";

/// All images by name.
pub fn images(c: &Connection) -> Result<Vec<ImageRow>> {
    query_all(
        c,
        &format!("SELECT {IMAGE_COLS} FROM images ORDER BY name"),
        [],
        image_row,
    )
}

/// One image.
pub fn image(c: &Connection, name: &str) -> Result<Option<ImageRow>> {
    Ok(c.query_row(
        &format!("SELECT {IMAGE_COLS} FROM images WHERE name = ?1"),
        [name],
        image_row,
    )
    .optional()?)
}

/// One image by sha256 (any name).
pub fn image_by_sha(c: &Connection, sha: &str) -> Result<Option<ImageRow>> {
    Ok(c.query_row(
        &format!("SELECT {IMAGE_COLS} FROM images WHERE sha256 = ?1 LIMIT 1"),
        [sha],
        image_row,
    )
    .optional()?)
}

/// Insert an image.
pub fn insert_image(c: &Connection, i: &ImageRow) -> Result<()> {
    execute(
        c,
        &format!("INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            i.name,
            i.sha256,
            i.file_sha256,
            i.source_format,
            i.virtual_size as i64,
            i.stored_size as i64,
            i.created_at,
            i.made_from
        ],
    )?;
    Ok(())
}

/// Delete an image row.
pub fn delete_image(c: &Connection, name: &str) -> Result<()> {
    execute(c, "DELETE FROM images WHERE name = ?1", [name])?;
    Ok(())
}

// ---------------------------------------------------------------- networks

/// A network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRow {
    /// Unique name.
    pub name: String,
    /// CIDR.
    pub cidr: String,
    /// VXLAN id.
    pub vni: u32,
    /// Host id of the gateway.
    pub gateway_host: Option<String>,
    /// creating / ready / error.
    pub state: NetworkState,
    /// Last error.
    pub error: Option<String>,
    /// Being removed.
    pub deleting: bool,
    /// Creation time.
    pub created_at: String,
    /// Outbound NAT.
    pub nat: bool,
    /// Gateway address (None: the first usable address).
    pub gateway: Option<String>,
    /// Name of the host the gateway last moved away from (it went down), if it ever moved.
    pub gateway_moved_from: Option<String>,
    /// When the gateway last moved.
    pub gateway_moved_at: Option<String>,
}

const NET_COLS: &str =
    "name, cidr, vni, gateway_host, state, error, deleting, created_at, nat, gateway, gateway_moved_from, gateway_moved_at";

fn net_row(r: &Row) -> rusqlite::Result<NetworkRow> {
    Ok(NetworkRow {
        name: r.get(0)?,
        cidr: r.get(1)?,
        vni: r.get(2)?,
        gateway_host: r.get(3)?,
        state: r.get::<_, Wire<NetworkState>>(4)?.0,
        error: r.get(5)?,
        deleting: r.get(6)?,
        created_at: r.get(7)?,
        nat: r.get(8)?,
        gateway: r.get(9)?,
        gateway_moved_from: r.get(10)?,
        gateway_moved_at: r.get(11)?,
    })
}

/// All networks by name.
pub fn networks(c: &Connection) -> Result<Vec<NetworkRow>> {
    query_all(
        c,
        &format!("SELECT {NET_COLS} FROM networks ORDER BY name"),
        [],
        net_row,
    )
}

/// One network.
pub fn network(c: &Connection, name: &str) -> Result<Option<NetworkRow>> {
    Ok(c.query_row(
        &format!("SELECT {NET_COLS} FROM networks WHERE name = ?1"),
        [name],
        net_row,
    )
    .optional()?)
}

/// Insert a network.
pub fn insert_network(c: &Connection, n: &NetworkRow) -> Result<()> {
    execute(
        c,
        &format!(
            "INSERT INTO networks ({NET_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        ),
        params![
            n.name,
            n.cidr,
            n.vni,
            n.gateway_host,
            n.state.as_str(),
            n.error,
            n.deleting,
            n.created_at,
            n.nat,
            n.gateway,
            n.gateway_moved_from,
            n.gateway_moved_at
        ],
    )?;
    Ok(())
}

/// Update state/error/deleting/gateway host of a network.
pub fn update_network(c: &Connection, n: &NetworkRow) -> Result<()> {
    execute(
        c,
        "UPDATE networks SET state = ?2, error = ?3, deleting = ?4, gateway_host = ?5, \
         gateway_moved_from = ?6, gateway_moved_at = ?7 WHERE name = ?1",
        params![
            n.name,
            n.state.as_str(),
            n.error,
            n.deleting,
            n.gateway_host,
            n.gateway_moved_from,
            n.gateway_moved_at
        ],
    )?;
    Ok(())
}

/// Delete a network row, its rules, forwards and host presence rows.
pub fn delete_network(c: &Connection, name: &str) -> Result<()> {
    execute(c, "DELETE FROM host_networks WHERE network = ?1", [name])?;
    execute(c, "DELETE FROM rules WHERE network = ?1", [name])?;
    execute(c, "DELETE FROM forwards WHERE network = ?1", [name])?;
    execute(c, "DELETE FROM networks WHERE name = ?1", [name])?;
    Ok(())
}

/// Presence of a network on a host, as last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct HostNetworkRow {
    /// Host id.
    pub host_id: String,
    /// Network name.
    pub network: String,
    /// Ready.
    pub ready: bool,
    /// Error.
    pub error: Option<String>,
}

/// Replace what a host reported about networks.
pub fn set_host_networks(c: &Connection, host_id: &str, rows: &[HostNetworkRow]) -> Result<()> {
    execute(c, "DELETE FROM host_networks WHERE host_id = ?1", [host_id])?;
    for r in rows {
        execute(
            c,
            "INSERT INTO host_networks (host_id, network, ready, error) VALUES (?1, ?2, ?3, ?4)",
            params![host_id, r.network, r.ready, r.error],
        )?;
    }
    Ok(())
}

/// What host `host_id` last reported about its networks, by network name.
pub fn host_networks(c: &Connection, host_id: &str) -> Result<Vec<HostNetworkRow>> {
    query_all(
        c,
        "SELECT host_id, network, ready, error FROM host_networks WHERE host_id = ?1 ORDER BY rowid",
        [host_id],
        |r| {
            Ok(HostNetworkRow {
                host_id: r.get(0)?,
                network: r.get(1)?,
                ready: r.get(2)?,
                error: r.get(3)?,
            })
        },
    )
}

/// Every host's reported presence of `network`.
pub fn network_presence(c: &Connection, network: &str) -> Result<Vec<HostNetworkRow>> {
    query_all(
        c,
        "SELECT host_id, network, ready, error FROM host_networks WHERE network = ?1",
        [network],
        |r| {
            Ok(HostNetworkRow {
                host_id: r.get(0)?,
                network: r.get(1)?,
                ready: r.get(2)?,
                error: r.get(3)?,
            })
        },
    )
}

// ---------------------------------------------------------------- groups

/// A group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRow {
    /// Unique name.
    pub name: String,
    /// Image name.
    pub image: String,
    /// Image sha256.
    pub image_sha256: String,
    /// Wanted count.
    pub count: u32,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Memory per VM, MiB.
    pub memory_mib: u64,
    /// Disk per VM, MiB.
    pub disk_mib: u64,
    /// Networks in NIC order.
    pub networks: Vec<String>,
    /// user-data.
    pub user_data: Option<String>,
    /// ssh keys.
    pub ssh_keys: Vec<String>,
    /// spread / pack.
    pub placement: PlacementPolicy,
    /// Anti-affinity.
    pub anti_affinity: bool,
    /// Being removed.
    pub deleting: bool,
    /// Creation time.
    pub created_at: String,
    /// A data volume per VM, MiB.
    pub volume_size_mib: Option<u64>,
    /// Keep those volumes when their VMs go.
    pub keep_volumes: bool,
    /// Most vCPUs its VMs may get while running.
    pub max_cpus: u32,
}

const GROUP_COLS: &str =
    "name, image, image_sha256, count, cpus, memory_mib, disk_mib, networks, user_data, ssh_keys, placement, anti_affinity, deleting, created_at, volume_size_mib, keep_volumes, max_cpus";

fn group_row(r: &Row) -> rusqlite::Result<(GroupRow, String, String)> {
    Ok((
        GroupRow {
            name: r.get(0)?,
            image: r.get(1)?,
            image_sha256: r.get(2)?,
            count: r.get(3)?,
            cpus: r.get(4)?,
            memory_mib: r.get::<_, i64>(5)? as u64,
            disk_mib: r.get::<_, i64>(6)? as u64,
            networks: vec![],
            user_data: r.get(8)?,
            ssh_keys: vec![],
            placement: r.get::<_, Wire<PlacementPolicy>>(10)?.0,
            anti_affinity: r.get(11)?,
            deleting: r.get(12)?,
            created_at: r.get(13)?,
            volume_size_mib: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            keep_volumes: r.get(15)?,
            max_cpus: r.get(16)?,
        },
        r.get(7)?,
        r.get(9)?,
    ))
}

fn finish_group((mut g, nets, keys): (GroupRow, String, String)) -> Result<GroupRow> {
    g.networks = json("groups.networks", &nets)?;
    g.ssh_keys = json("groups.ssh_keys", &keys)?;
    Ok(g)
}

/// All groups by name.
pub fn groups(c: &Connection) -> Result<Vec<GroupRow>> {
    let rows = query_all(
        c,
        &format!("SELECT {GROUP_COLS} FROM groups ORDER BY name"),
        [],
        group_row,
    )?;
    rows.into_iter().map(finish_group).collect()
}

/// One group.
pub fn group(c: &Connection, name: &str) -> Result<Option<GroupRow>> {
    let r = c
        .query_row(
            &format!("SELECT {GROUP_COLS} FROM groups WHERE name = ?1"),
            [name],
            group_row,
        )
        .optional()?;
    r.map(finish_group).transpose()
}

/// Insert a group.
pub fn insert_group(c: &Connection, g: &GroupRow) -> Result<()> {
    execute(
        c,
        &format!("INSERT INTO groups ({GROUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"),
        params![
            g.name,
            g.image,
            g.image_sha256,
            g.count,
            g.cpus,
            g.memory_mib as i64,
            g.disk_mib as i64,
            to_json(&g.networks),
            g.user_data,
            to_json(&g.ssh_keys),
            g.placement.as_str(),
            g.anti_affinity,
            g.deleting,
            g.created_at,
            g.volume_size_mib.map(|v| v as i64),
            g.keep_volumes,
            g.max_cpus
        ],
    )?;
    Ok(())
}

/// Set count / deleting of a group.
pub fn update_group(c: &Connection, name: &str, count: u32, deleting: bool) -> Result<()> {
    execute(
        c,
        "UPDATE groups SET count = ?2, deleting = ?3 WHERE name = ?1",
        params![name, count, deleting],
    )?;
    Ok(())
}

/// Delete a group row (its VMs must be gone).
pub fn delete_group(c: &Connection, name: &str) -> Result<()> {
    execute(c, "DELETE FROM groups WHERE name = ?1", [name])?;
    Ok(())
}

// ---------------------------------------------------------------- vms

/// A VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Group name.
    pub group: String,
    /// Index in group.
    pub idx: u32,
    /// Host id.
    pub host_id: String,
    /// Scheduler's reason.
    pub placement_reason: String,
    /// Wanted power state.
    pub desired: PowerState,
    /// Last observed state.
    pub observed: VmState,
    /// Last error.
    pub error: Option<String>,
    /// Its causes, outermost first.
    pub error_chain: Vec<String>,
    /// CPU the guest used lately, cores.
    pub cpu_usage: f64,
    /// Reboot requests.
    pub reboot_seq: u64,
    /// Reboots carried out.
    pub reboot_done: u64,
    /// Stop without ACPI.
    pub force_stop: bool,
    /// ACPI timeout.
    pub stop_timeout_s: u32,
    /// Being removed.
    pub deleting: bool,
    /// Creation time.
    pub created_at: String,
    /// Its own size (after `vm resize`) and what its host last said of it beyond the state.
    pub extra: VmExtra,
}

/// What a VM has beyond its group's spec and its power state (one JSON column).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VmExtra {
    /// vCPUs, when resized (else the group's).
    pub cpus: Option<u32>,
    /// Memory, MiB, when resized.
    pub memory_mib: Option<u64>,
    /// Root disk, MiB, when resized.
    pub disk_mib: Option<u64>,
    /// Most vCPUs it may get while running (0: its vCPUs at creation).
    pub max_cpus: u32,
    /// Resume requests (after its host paused it on a full pool).
    pub resume_seq: u64,
    /// Resumes carried out.
    pub resume_done: u64,
    /// Why its host paused it.
    pub pause_reason: Option<String>,
    /// (vCPUs, memory MiB, root disk MiB) it runs with now, as its host reports.
    pub running_with: Option<(u32, u64, u64)>,
    /// Power on once only (an image builder).
    pub run_once: bool,
    /// It powered itself off after running.
    pub powered_off: bool,
    /// The end of its console, as its host last sent it (run-once VMs).
    pub console_tail: Option<String>,
    /// Why its new size could not be applied, as its host said.
    pub resize_error: Option<String>,
    /// The name of its host when that host was removed (`host rm --force`): it is lost.
    pub lost_from: Option<String>,
}

const VM_COLS: &str = "id, name, group_name, idx, host_id, placement_reason, desired, observed, error, reboot_seq, reboot_done, force_stop, stop_timeout_s, deleting, created_at, error_chain, cpu_usage, extra";

fn vm_row(r: &Row) -> rusqlite::Result<(VmRow, String, String)> {
    Ok((
        VmRow {
            id: r.get(0)?,
            name: r.get(1)?,
            group: r.get(2)?,
            idx: r.get(3)?,
            host_id: r.get(4)?,
            placement_reason: r.get(5)?,
            desired: r.get::<_, Wire<PowerState>>(6)?.0,
            observed: r.get::<_, Wire<VmState>>(7)?.0,
            error: r.get(8)?,
            reboot_seq: r.get::<_, i64>(9)? as u64,
            reboot_done: r.get::<_, i64>(10)? as u64,
            force_stop: r.get(11)?,
            stop_timeout_s: r.get(12)?,
            deleting: r.get(13)?,
            created_at: r.get(14)?,
            error_chain: vec![],
            cpu_usage: r.get(16)?,
            extra: VmExtra::default(),
        },
        r.get(15)?,
        r.get(17)?,
    ))
}

fn vms_where(c: &Connection, clause: &str, p: impl rusqlite::Params) -> Result<Vec<VmRow>> {
    query_all(c, &format!("SELECT {VM_COLS} FROM vms {clause}"), p, vm_row)?
        .into_iter()
        .map(|(mut v, chain, extra)| {
            v.error_chain = json("vms.error_chain", &chain)?;
            v.extra = json("vms.extra", &extra)?;
            Ok(v)
        })
        .collect()
}

/// All VMs, by group and index.
pub fn vms(c: &Connection) -> Result<Vec<VmRow>> {
    vms_where(c, "ORDER BY group_name, idx", [])
}

/// VMs of a group, by index.
pub fn group_vms(c: &Connection, group: &str) -> Result<Vec<VmRow>> {
    vms_where(c, "WHERE group_name = ?1 ORDER BY idx", [group])
}

/// VMs placed on a host.
pub fn host_vms(c: &Connection, host_id: &str) -> Result<Vec<VmRow>> {
    vms_where(c, "WHERE host_id = ?1 ORDER BY group_name, idx", [host_id])
}

/// Lost VMs (their host was removed) asked to be removed.
pub fn lost_vms_to_remove(c: &Connection) -> Result<Vec<VmRow>> {
    vms_where(c, "WHERE deleting = 1 AND observed = 'lost'", [])
}

/// One VM by name.
pub fn vm(c: &Connection, name: &str) -> Result<Option<VmRow>> {
    Ok(vms_where(c, "WHERE name = ?1", [name])?.into_iter().next())
}

/// One VM by id.
pub fn vm_by_id(c: &Connection, id: &str) -> Result<Option<VmRow>> {
    Ok(vms_where(c, "WHERE id = ?1", [id])?.into_iter().next())
}

/// Insert a VM.
pub fn insert_vm(c: &Connection, v: &VmRow) -> Result<()> {
    execute(
        c,
        &format!("INSERT INTO vms ({VM_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"),
        params![
            v.id,
            v.name,
            v.group,
            v.idx,
            v.host_id,
            v.placement_reason,
            v.desired.as_str(),
            v.observed.as_str(),
            v.error,
            v.reboot_seq as i64,
            v.reboot_done as i64,
            v.force_stop,
            v.stop_timeout_s,
            v.deleting,
            v.created_at,
            to_json(&v.error_chain),
            v.cpu_usage,
            to_json(&v.extra)
        ],
    )?;
    Ok(())
}

/// Write the mutable fields of a VM (its host too: a migration moves it).
pub fn update_vm(c: &Connection, v: &VmRow) -> Result<()> {
    execute(
        c,
        "UPDATE vms SET desired = ?2, observed = ?3, error = ?4, reboot_seq = ?5, reboot_done = ?6, force_stop = ?7, stop_timeout_s = ?8, deleting = ?9, host_id = ?10, error_chain = ?11, cpu_usage = ?12, extra = ?13 WHERE id = ?1",
        params![
            v.id,
            v.desired.as_str(),
            v.observed.as_str(),
            v.error,
            v.reboot_seq as i64,
            v.reboot_done as i64,
            v.force_stop,
            v.stop_timeout_s,
            v.deleting,
            v.host_id,
            to_json(&v.error_chain),
            v.cpu_usage,
            to_json(&v.extra)
        ],
    )?;
    Ok(())
}

/// Free the addresses of VM `id` (its NICs and the forwards to it); returns them as
/// (network, ip).
pub fn free_vm_addresses(c: &Connection, id: &str) -> Result<Vec<(String, String)>> {
    let freed = vm_nics(c, id)?
        .into_iter()
        .map(|n| (n.network, n.ip))
        .collect();
    execute(c, "DELETE FROM forwards WHERE vm_id = ?1", [id])?;
    execute(c, "DELETE FROM nics WHERE vm_id = ?1", [id])?;
    Ok(freed)
}

/// Delete a VM, its NICs (releases its addresses) and the forwards to it.
pub fn delete_vm(c: &Connection, id: &str) -> Result<()> {
    execute(c, "DELETE FROM forwards WHERE vm_id = ?1", [id])?;
    execute(c, "DELETE FROM nics WHERE vm_id = ?1", [id])?;
    execute(c, "DELETE FROM vms WHERE id = ?1", [id])?;
    Ok(())
}

// ---------------------------------------------------------------- nics

/// One NIC with its reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct NicRow {
    /// VM id.
    pub vm_id: String,
    /// Position.
    pub idx: u32,
    /// Network name.
    pub network: String,
    /// MAC.
    pub mac: String,
    /// IPv4.
    pub ip: String,
}

fn nic_row(r: &Row) -> rusqlite::Result<NicRow> {
    Ok(NicRow {
        vm_id: r.get(0)?,
        idx: r.get(1)?,
        network: r.get(2)?,
        mac: r.get(3)?,
        ip: r.get(4)?,
    })
}

/// Every NIC (for IPAM and listings).
pub fn nics(c: &Connection) -> Result<Vec<NicRow>> {
    query_all(
        c,
        "SELECT vm_id, idx, network, mac, ip FROM nics ORDER BY vm_id, idx",
        [],
        nic_row,
    )
}

/// NICs of one VM in order.
pub fn vm_nics(c: &Connection, vm_id: &str) -> Result<Vec<NicRow>> {
    query_all(
        c,
        "SELECT vm_id, idx, network, mac, ip FROM nics WHERE vm_id = ?1 ORDER BY idx",
        [vm_id],
        nic_row,
    )
}

/// Insert a NIC.
pub fn insert_nic(c: &Connection, n: &NicRow) -> Result<()> {
    execute(
        c,
        "INSERT INTO nics (vm_id, idx, network, mac, ip) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![n.vm_id, n.idx, n.network, n.mac, n.ip],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- rules and forwards

/// An access rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRow {
    /// Id.
    pub id: String,
    /// Network.
    pub network: String,
    /// in / out.
    pub direction: Direction,
    /// allow / deny.
    pub action: RuleAction,
    /// Canonical spec (`tcp:80`).
    pub spec: String,
    /// Source CIDR.
    pub from_cidr: Option<String>,
    /// Source group.
    pub from_group: Option<String>,
    /// Source network.
    pub from_network: Option<String>,
    /// Target group.
    pub to_group: Option<String>,
    /// Destination CIDR (out).
    pub to_cidr: Option<String>,
    /// Creation time.
    pub created_at: String,
}

const RULE_COLS: &str = "id, network, direction, action, spec, from_cidr, from_group, from_network, to_group, to_cidr, created_at";

fn rule_row(r: &Row) -> rusqlite::Result<RuleRow> {
    Ok(RuleRow {
        id: r.get(0)?,
        network: r.get(1)?,
        direction: r.get::<_, Wire<Direction>>(2)?.0,
        action: r.get::<_, Wire<RuleAction>>(3)?.0,
        spec: r.get(4)?,
        from_cidr: r.get(5)?,
        from_group: r.get(6)?,
        from_network: r.get(7)?,
        to_group: r.get(8)?,
        to_cidr: r.get(9)?,
        created_at: r.get(10)?,
    })
}

/// Every rule, in the order they were added.
pub fn rules(c: &Connection) -> Result<Vec<RuleRow>> {
    query_all(
        c,
        &format!("SELECT {RULE_COLS} FROM rules ORDER BY created_at, rowid"),
        [],
        rule_row,
    )
}

/// Insert a rule.
pub fn insert_rule(c: &Connection, r: &RuleRow) -> Result<()> {
    execute(
        c,
        &format!(
            "INSERT INTO rules ({RULE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ),
        params![
            r.id,
            r.network,
            r.direction.as_str(),
            r.action.as_str(),
            r.spec,
            r.from_cidr,
            r.from_group,
            r.from_network,
            r.to_group,
            r.to_cidr,
            r.created_at
        ],
    )?;
    Ok(())
}

/// Delete a rule of a network; false if there was none.
pub fn delete_rule(c: &Connection, network: &str, id: &str) -> Result<bool> {
    Ok(execute(
        c,
        "DELETE FROM rules WHERE network = ?1 AND id = ?2",
        [network, id],
    )? > 0)
}

/// A port forward.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardRow {
    /// Id.
    pub id: String,
    /// Network of the VM.
    pub network: String,
    /// tcp / udp.
    pub proto: Protocol,
    /// Host port.
    pub host_port: u16,
    /// Target VM id.
    pub vm_id: String,
    /// Target port.
    pub vm_port: u16,
    /// Creation time.
    pub created_at: String,
}

/// Every forward.
pub fn forwards(c: &Connection) -> Result<Vec<ForwardRow>> {
    query_all(
        c,
        "SELECT id, network, proto, host_port, vm_id, vm_port, created_at FROM forwards ORDER BY created_at, rowid",
        [],
        |r| {
            Ok(ForwardRow {
                id: r.get(0)?,
                network: r.get(1)?,
                proto: r.get::<_, Wire<Protocol>>(2)?.0,
                host_port: r.get(3)?,
                vm_id: r.get(4)?,
                vm_port: r.get(5)?,
                created_at: r.get(6)?,
            })
        },
    )
}

/// Insert a forward.
pub fn insert_forward(c: &Connection, f: &ForwardRow) -> Result<()> {
    execute(
        c,
        "INSERT INTO forwards (id, network, proto, host_port, vm_id, vm_port, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![f.id, f.network, f.proto.as_str(), f.host_port, f.vm_id, f.vm_port, f.created_at],
    )?;
    Ok(())
}

/// Delete a forward of a network; false if there was none.
pub fn delete_forward(c: &Connection, network: &str, id: &str) -> Result<bool> {
    Ok(execute(
        c,
        "DELETE FROM forwards WHERE network = ?1 AND id = ?2",
        [network, id],
    )? > 0)
}

// ---------------------------------------------------------------- volumes

/// A data volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Host it lives on.
    pub host_id: String,
    /// Size wanted (virtual), MiB.
    pub size_mib: u64,
    /// The VM it is (to be) attached to.
    pub vm_id: Option<String>,
    /// Removed with its VM.
    pub with_vm: bool,
    /// Being removed.
    pub deleting: bool,
    /// Its host has it.
    pub present: bool,
    /// Size its host reports, MiB.
    pub observed_size_mib: u64,
    /// Space it takes there, MiB.
    pub allocated_mib: u64,
    /// The VM its host has it plugged into.
    pub attached_to: Option<String>,
    /// The last error its host reported.
    pub error: Option<String>,
    /// Creation time.
    pub created_at: String,
}

const VOLUME_COLS: &str = "id, name, host_id, size_mib, vm_id, with_vm, deleting, present, observed_size_mib, allocated_mib, attached_to, error, created_at";

fn volume_row(r: &Row) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        host_id: r.get(2)?,
        size_mib: r.get::<_, i64>(3)? as u64,
        vm_id: r.get(4)?,
        with_vm: r.get(5)?,
        deleting: r.get(6)?,
        present: r.get(7)?,
        observed_size_mib: r.get::<_, i64>(8)? as u64,
        allocated_mib: r.get::<_, i64>(9)? as u64,
        attached_to: r.get(10)?,
        error: r.get(11)?,
        created_at: r.get(12)?,
    })
}

/// Every volume, by name.
pub fn volumes(c: &Connection) -> Result<Vec<VolumeRow>> {
    query_all(
        c,
        &format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY name"),
        [],
        volume_row,
    )
}

/// The volumes of one VM (attached or to be attached), by name.
pub fn vm_volumes(c: &Connection, vm_id: &str) -> Result<Vec<VolumeRow>> {
    query_all(
        c,
        &format!("SELECT {VOLUME_COLS} FROM volumes WHERE vm_id = ?1 ORDER BY name"),
        [vm_id],
        volume_row,
    )
}

/// One volume by name or id.
pub fn volume(c: &Connection, name: &str) -> Result<Option<VolumeRow>> {
    Ok(c.query_row(
        &format!("SELECT {VOLUME_COLS} FROM volumes WHERE name = ?1 OR id = ?1"),
        [name],
        volume_row,
    )
    .optional()?)
}

/// Insert or update a volume.
pub fn save_volume(c: &Connection, v: &VolumeRow) -> Result<()> {
    execute(
        c,
        &format!(
            "INSERT INTO volumes ({VOLUME_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT(id) DO UPDATE SET host_id = excluded.host_id, size_mib = excluded.size_mib, vm_id = excluded.vm_id,
               with_vm = excluded.with_vm, deleting = excluded.deleting, present = excluded.present,
               observed_size_mib = excluded.observed_size_mib, allocated_mib = excluded.allocated_mib,
               attached_to = excluded.attached_to, error = excluded.error"
        ),
        params![
            v.id,
            v.name,
            v.host_id,
            v.size_mib as i64,
            v.vm_id,
            v.with_vm,
            v.deleting,
            v.present,
            v.observed_size_mib as i64,
            v.allocated_mib as i64,
            v.attached_to,
            v.error,
            v.created_at
        ],
    )?;
    Ok(())
}

/// Delete a volume row.
pub fn delete_volume(c: &Connection, id: &str) -> Result<()> {
    execute(c, "DELETE FROM volumes WHERE id = ?1", [id])?;
    Ok(())
}

// ---------------------------------------------------------------- captures

/// A capture of a VM's root disk as an image, as its host reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureRow {
    /// Id (its operation's, or a build's capture id).
    pub id: String,
    /// Name of the image to make.
    pub image: String,
    /// The VM.
    pub vm_id: String,
    /// Its name.
    pub vm_name: String,
    /// Its host.
    pub host_id: String,
    /// What the image will say it was made from.
    pub made_from: String,
    /// Where it is.
    pub status: tuchka_api::agent::CaptureStatus,
    /// Bytes copied or sent so far.
    pub bytes: u64,
    /// How long the guest was paused for it, ms.
    pub paused_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The causes.
    pub error_chain: Vec<String>,
    /// When it was asked for.
    pub created_at: String,
}

const CAPTURE_COLS: &str = "id, image, vm_id, vm_name, host_id, made_from, status, bytes, paused_ms, error, error_chain, created_at";

fn capture_row(r: &Row) -> rusqlite::Result<(CaptureRow, String)> {
    Ok((
        CaptureRow {
            id: r.get(0)?,
            image: r.get(1)?,
            vm_id: r.get(2)?,
            vm_name: r.get(3)?,
            host_id: r.get(4)?,
            made_from: r.get(5)?,
            status: r.get::<_, Wire<tuchka_api::agent::CaptureStatus>>(6)?.0,
            bytes: r.get::<_, i64>(7)? as u64,
            paused_ms: r.get::<_, i64>(8)? as u64,
            error: r.get(9)?,
            error_chain: vec![],
            created_at: r.get(11)?,
        },
        r.get(10)?,
    ))
}

/// Every capture, oldest first.
pub fn captures(c: &Connection) -> Result<Vec<CaptureRow>> {
    query_all(
        c,
        &format!("SELECT {CAPTURE_COLS} FROM captures ORDER BY created_at"),
        [],
        capture_row,
    )?
    .into_iter()
    .map(|(mut row, chain)| {
        row.error_chain = json("captures.error_chain", &chain)?;
        Ok(row)
    })
    .collect()
}

/// One capture.
pub fn capture(c: &Connection, id: &str) -> Result<Option<CaptureRow>> {
    Ok(captures(c)?.into_iter().find(|x| x.id == id))
}

/// Insert or update a capture.
pub fn save_capture(c: &Connection, x: &CaptureRow) -> Result<()> {
    execute(
        c,
        &format!(
            "INSERT INTO captures ({CAPTURE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, bytes = excluded.bytes,
               paused_ms = excluded.paused_ms, error = excluded.error, error_chain = excluded.error_chain"
        ),
        params![
            x.id,
            x.image,
            x.vm_id,
            x.vm_name,
            x.host_id,
            x.made_from,
            x.status.as_str(),
            x.bytes as i64,
            x.paused_ms as i64,
            x.error,
            to_json(&x.error_chain),
            x.created_at
        ],
    )?;
    Ok(())
}

/// Delete a capture row.
pub fn delete_capture(c: &Connection, id: &str) -> Result<()> {
    execute(c, "DELETE FROM captures WHERE id = ?1", [id])?;
    Ok(())
}

// ---------------------------------------------------------------- image cache

/// When each cached image was last used on each host: (host id, sha256) → Unix seconds.
pub fn image_cache(c: &Connection) -> Result<HashMap<(String, String), i64>> {
    Ok(query_all(
        c,
        "SELECT host_id, sha256, last_used_unix FROM image_cache",
        [],
        |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)),
    )?
    .into_iter()
    .collect())
}

/// Record host `host_id`'s cache: `used` images are used now (a time less than a minute old is
/// not rewritten: heartbeats stay reads); others keep their time (new
/// ones start now); images no longer cached are forgotten.
pub fn touch_image_cache(
    c: &Connection,
    host_id: &str,
    cached: &[String],
    used: &HashSet<String>,
    now_unix: i64,
) -> Result<()> {
    execute(
        c,
        "DELETE FROM image_cache WHERE host_id = ?1 AND sha256 NOT IN (SELECT value FROM json_each(?2))",
        params![host_id, to_json(&cached)],
    )?;
    for sha in cached {
        if used.contains(sha) {
            execute(
                c,
                "INSERT INTO image_cache (host_id, sha256, last_used_unix) VALUES (?1, ?2, ?3)
                 ON CONFLICT(host_id, sha256) DO UPDATE SET last_used_unix = excluded.last_used_unix
                 WHERE last_used_unix < excluded.last_used_unix - 60",
                params![host_id, sha, now_unix],
            )?;
        } else {
            execute(
        c,
                "INSERT OR IGNORE INTO image_cache (host_id, sha256, last_used_unix) VALUES (?1, ?2, ?3)",
                params![host_id, sha, now_unix],
            )?;
        }
    }
    Ok(())
}

/// Mark a cached image as unused for long (`image cache prune`).
pub fn expire_cached_image(c: &Connection, host_id: &str, sha256: &str) -> Result<()> {
    execute(
        c,
        "UPDATE image_cache SET last_used_unix = 0 WHERE host_id = ?1 AND sha256 = ?2",
        params![host_id, sha256],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- operations

/// An operation: its public view and what the controller needs to follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRow {
    /// The public view (phases and the migration are filled in by the controller).
    pub op: tuchka_api::Operation,
    /// Kind, parameters and rollback state.
    pub record: OpRecord,
}

const OP_COLS: &str =
    "id, kind, target, state, done, total, message, error, params, created_at, finished_at, phases, parent, children";

type OpRaw = (OpRow, String, Option<String>, String, String, String);

fn op_row(r: &Row) -> rusqlite::Result<OpRaw> {
    Ok((
        OpRow {
            op: tuchka_api::Operation {
                id: r.get(0)?,
                kind: r.get::<_, Wire<OperationKind>>(1)?.0,
                target: r.get(2)?,
                state: r.get::<_, Wire<OperationState>>(3)?.0,
                done: r.get(4)?,
                total: r.get(5)?,
                message: r.get(6)?,
                error: None,
                created_at: r.get(9)?,
                finished_at: r.get(10)?,
                phases: vec![],
                parent: r.get(12)?,
                children: vec![],
                migration: None,
            },
            record: OpRecord::new(tuchka_core::ops::OpKind::GroupCreate {
                group: String::new(),
            }),
        },
        r.get(1)?,
        r.get(7)?,
        r.get(8)?,
        r.get(11)?,
        r.get(13)?,
    ))
}

fn finish_op((mut o, kind, err, params, phases, children): OpRaw) -> Result<OpRow> {
    o.op.error = err.map(|e| json("operations.error", &e)).transpose()?;
    let params: serde_json::Value = json("operations.params", &params)?;
    o.record = OpRecord::decode(&kind, params).map_err(|source| StoreError::Json {
        column: "operations.params",
        source,
    })?;
    o.op.phases = json("operations.phases", &phases)?;
    o.op.children = json("operations.children", &children)?;
    Ok(o)
}

fn ops_where(c: &Connection, clause: &str, p: impl rusqlite::Params) -> Result<Vec<OpRow>> {
    let rows = query_all(
        c,
        &format!("SELECT {OP_COLS} FROM operations {clause}"),
        p,
        op_row,
    )?;
    rows.into_iter().map(finish_op).collect()
}

/// The latest `limit` operations, newest first.
pub fn operations(c: &Connection, limit: u32) -> Result<Vec<OpRow>> {
    ops_where(c, "ORDER BY created_at DESC, rowid DESC LIMIT ?1", [limit])
}

/// Operations still running, oldest first.
pub fn running_operations(c: &Connection) -> Result<Vec<OpRow>> {
    ops_where(c, "WHERE state = 'running' ORDER BY rowid", [])
}

/// One operation.
pub fn operation(c: &Connection, id: &str) -> Result<Option<OpRow>> {
    Ok(ops_where(c, "WHERE id = ?1", [id])?.into_iter().next())
}

/// Insert or update an operation.
pub fn save_operation(c: &Connection, o: &OpRow) -> Result<()> {
    let op = &o.op;
    execute(
        c,
        &format!(
            "INSERT INTO operations ({OP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, done = excluded.done, total = excluded.total,
               message = excluded.message, error = excluded.error, params = excluded.params, finished_at = excluded.finished_at,
               phases = excluded.phases, children = excluded.children"
        ),
        params![
            op.id,
            o.record.kind.kind().as_str(),
            op.target,
            op.state.as_str(),
            op.done,
            op.total,
            op.message,
            op.error.as_ref().map(to_json),
            to_json(&o.record),
            op.created_at,
            op.finished_at,
            to_json(&op.phases),
            op.parent,
            to_json(&op.children)
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- migrations

/// A migration of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRow {
    /// Id (= its operation's id).
    pub id: String,
    /// VM id.
    pub vm_id: String,
    /// VM name.
    pub vm_name: String,
    /// Source host id.
    pub source_host: String,
    /// Target host id.
    pub target_host: String,
    /// Live or cold.
    pub mode: MigrationMode,
    /// Where it is.
    pub phase: MigrationPhase,
    /// Why this target.
    pub reason: String,
    /// Bytes copied so far.
    pub copied_bytes: u64,
    /// Bytes left.
    pub remaining_bytes: u64,
    /// Copy rate.
    pub mib_per_s: f64,
    /// Total time, ms.
    pub total_ms: Option<u64>,
    /// Downtime, ms.
    pub downtime_ms: Option<u64>,
    /// Bytes moved.
    pub bytes: Option<u64>,
    /// Why it failed.
    pub error: Option<ApiError>,
    /// Start, RFC 3339.
    pub started_at: String,
    /// Start, Unix ms.
    pub started_unix_ms: i64,
    /// When the current phase began, Unix ms.
    pub phase_since_unix_ms: i64,
    /// End, RFC 3339.
    pub finished_at: Option<String>,
    /// What the source host last reported about the VM.
    pub source_obs: Side,
    /// What the target host last reported about the VM.
    pub target_obs: Side,
    /// The target's copy was named for removal (an abort, once the source confirmed it keeps
    /// the VM).
    pub target_cleanup: bool,
}

const MIGRATION_COLS: &str = "id, vm_id, vm_name, source_host, target_host, mode, phase, reason, copied_bytes, remaining_bytes, mib_per_s, total_ms, downtime_ms, bytes, error, started_at, started_unix_ms, phase_since_unix_ms, finished_at, source_obs, target_obs, target_cleanup";

type MigrationRaw = (MigrationRow, Option<String>, String, String);

fn migration_row(r: &Row) -> rusqlite::Result<MigrationRaw> {
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(i)?.map(|v| v as u64))
    };
    Ok((
        MigrationRow {
            id: r.get(0)?,
            vm_id: r.get(1)?,
            vm_name: r.get(2)?,
            source_host: r.get(3)?,
            target_host: r.get(4)?,
            mode: r.get::<_, Wire<MigrationMode>>(5)?.0,
            phase: r.get::<_, Wire<MigrationPhase>>(6)?.0,
            reason: r.get(7)?,
            copied_bytes: r.get::<_, i64>(8)? as u64,
            remaining_bytes: r.get::<_, i64>(9)? as u64,
            mib_per_s: r.get(10)?,
            total_ms: opt_u64(11)?,
            downtime_ms: opt_u64(12)?,
            bytes: opt_u64(13)?,
            error: None,
            started_at: r.get(15)?,
            started_unix_ms: r.get(16)?,
            phase_since_unix_ms: r.get(17)?,
            finished_at: r.get(18)?,
            source_obs: Side::default(),
            target_obs: Side::default(),
            target_cleanup: r.get(21)?,
        },
        r.get(14)?,
        r.get(19)?,
        r.get(20)?,
    ))
}

fn migrations_where(
    c: &Connection,
    clause: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<MigrationRow>> {
    query_all(
        c,
        &format!("SELECT {MIGRATION_COLS} FROM migrations {clause}"),
        p,
        migration_row,
    )?
    .into_iter()
    .map(|(mut m, err, src, tgt)| {
        m.error = err.map(|e| json("migrations.error", &e)).transpose()?;
        m.source_obs = json("migrations.source_obs", &src)?;
        m.target_obs = json("migrations.target_obs", &tgt)?;
        Ok(m)
    })
    .collect()
}

/// Migrations not yet done or failed, oldest first.
pub fn active_migrations(c: &Connection) -> Result<Vec<MigrationRow>> {
    migrations_where(
        c,
        "WHERE phase NOT IN ('done', 'failed') ORDER BY started_unix_ms, rowid",
        [],
    )
}

/// The migration under way of one VM, if any.
pub fn vm_active_migration(c: &Connection, vm_id: &str) -> Result<Option<MigrationRow>> {
    Ok(migrations_where(
        c,
        "WHERE vm_id = ?1 AND phase NOT IN ('done', 'failed')",
        [vm_id],
    )?
    .into_iter()
    .next())
}

/// One migration.
pub fn migration(c: &Connection, id: &str) -> Result<Option<MigrationRow>> {
    Ok(migrations_where(c, "WHERE id = ?1", [id])?
        .into_iter()
        .next())
}

/// The latest finished migration of a VM.
pub fn last_migration(c: &Connection, vm_id: &str) -> Result<Option<MigrationRow>> {
    Ok(migrations_where(
        c,
        "WHERE vm_id = ?1 AND phase IN ('done', 'failed') ORDER BY started_unix_ms DESC, rowid DESC LIMIT 1",
        [vm_id],
    )?
    .into_iter()
    .next())
}

/// The latest finished migration of every VM that has one, by VM id.
pub fn last_migrations(c: &Connection) -> Result<std::collections::HashMap<String, MigrationRow>> {
    let mut out = std::collections::HashMap::new();
    for m in migrations_where(
        c,
        "WHERE phase IN ('done', 'failed') ORDER BY started_unix_ms, rowid",
        [],
    )? {
        out.insert(m.vm_id.clone(), m);
    }
    Ok(out)
}

/// Insert or update a migration. A second active migration of one VM is refused by the schema.
pub fn save_migration(c: &Connection, m: &MigrationRow) -> Result<()> {
    execute(
        c,
        &format!(
            "INSERT INTO migrations ({MIGRATION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)
             ON CONFLICT(id) DO UPDATE SET phase = excluded.phase, target_cleanup = excluded.target_cleanup, copied_bytes = excluded.copied_bytes,
               remaining_bytes = excluded.remaining_bytes, mib_per_s = excluded.mib_per_s, total_ms = excluded.total_ms,
               downtime_ms = excluded.downtime_ms, bytes = excluded.bytes, error = excluded.error,
               phase_since_unix_ms = excluded.phase_since_unix_ms, finished_at = excluded.finished_at,
               source_obs = excluded.source_obs, target_obs = excluded.target_obs"
        ),
        params![
            m.id,
            m.vm_id,
            m.vm_name,
            m.source_host,
            m.target_host,
            m.mode.as_str(),
            m.phase.as_str(),
            m.reason,
            m.copied_bytes as i64,
            m.remaining_bytes as i64,
            m.mib_per_s,
            m.total_ms.map(|v| v as i64),
            m.downtime_ms.map(|v| v as i64),
            m.bytes.map(|v| v as i64),
            m.error.as_ref().map(to_json),
            m.started_at,
            m.started_unix_ms,
            m.phase_since_unix_ms,
            m.finished_at,
            to_json(&m.source_obs),
            to_json(&m.target_obs),
            m.target_cleanup
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- removals

/// A VM a host must remove (besides the VMs being deleted, whose rows say so themselves): the
/// leftovers of a migration on its source or, after a failure, on its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovalRow {
    /// VM id.
    pub vm_id: String,
    /// Host id.
    pub host_id: String,
    /// VM name.
    pub name: String,
    /// Domain name.
    pub domain: String,
    /// Why (e.g. "migrated to h2").
    pub reason: String,
}

/// Every pending removal.
pub fn removals(c: &Connection) -> Result<Vec<RemovalRow>> {
    removals_where(c, "", [])
}

/// The VMs host `host_id` must remove, oldest first.
pub fn host_removals(c: &Connection, host_id: &str) -> Result<Vec<RemovalRow>> {
    removals_where(c, "WHERE host_id = ?1", [host_id])
}

fn removals_where(
    c: &Connection,
    clause: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<RemovalRow>> {
    query_all(
        c,
        &format!(
            "SELECT vm_id, host_id, name, domain, reason FROM vm_removals {clause} ORDER BY created_at, rowid"
        ),
        p,
        |r| {
            Ok(RemovalRow {
                vm_id: r.get(0)?,
                host_id: r.get(1)?,
                name: r.get(2)?,
                domain: r.get(3)?,
                reason: r.get(4)?,
            })
        },
    )
}

/// Name a VM for removal on a host (idempotent).
pub fn insert_removal(c: &Connection, r: &RemovalRow) -> Result<()> {
    execute(
        c,
        "INSERT INTO vm_removals (vm_id, host_id, name, domain, reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(vm_id, host_id) DO UPDATE SET reason = excluded.reason",
        params![r.vm_id, r.host_id, r.name, r.domain, r.reason, crate::now()],
    )?;
    Ok(())
}

/// The host has removed the VM.
pub fn delete_removal(c: &Connection, vm_id: &str, host_id: &str) -> Result<()> {
    execute(
        c,
        "DELETE FROM vm_removals WHERE vm_id = ?1 AND host_id = ?2",
        [vm_id, host_id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[test]
    fn readers_see_every_commit_and_only_announced_commits_wake_the_hook() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.db");
        let mut s = Store::open(&path).expect("open");
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        s.set_on_commit(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let readers = crate::Readers::new(&path);
        let count = || readers.read(|c| Ok::<_, StoreError>(hosts(c)?.len()));
        assert_eq!(count().expect("read"), 0);
        s.atomic(|c| insert_host(c, "h1", "edge", "cred", &HostFacts::default()))
            .expect("insert");
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A reader opened before the commit (now idle in the pool) sees it.
        assert_eq!(count().expect("read"), 1);
        // A heartbeat that is not announced lands but wakes nobody.
        s.atomic_announced(|c| {
            touch_host(c, "h1", &HostFacts::default(), &[], &[])?;
            Ok::<_, StoreError>(((), false))
        })
        .expect("touch");
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        let seen = readers
            .read(|c| Ok::<_, StoreError>(host(c, "h1")?.expect("host").last_seen_unix))
            .expect("read");
        assert!(seen > 0, "the reader sees the heartbeat");
        // Readers cannot write.
        let refused = readers.read(|c| Ok::<_, StoreError>(remove_host(c, "h1")));
        assert!(refused.expect("read").is_err());
        assert_eq!(count().expect("read"), 1);
    }

    #[test]
    fn a_revoked_host_gets_a_new_credential_and_a_removed_one_is_a_tombstone() {
        let mut s = Store::open_in_memory().expect("open");
        s.atomic(|c| {
            insert_host(c, "h1", "edge", "cred1", &HostFacts::default())?;
            assert!(revoke_host(c, "h1")?);
            assert!(host(c, "edge")?.expect("host").revoked);
            assert!(!revoke_host(c, "nope")?);
            // A second host of that name cannot be inserted.
            assert!(insert_host(c, "h2", "edge", "cred2", &HostFacts::default()).is_err());
            assert!(set_host_credential(c, "h1", "cred2")?);
            let h = host(c, "edge")?.expect("host");
            assert!(!h.revoked);
            assert_eq!(
                (h.id.as_str(), h.credential_sha256.as_str()),
                ("h1", "cred2")
            );
            // Removed: gone from every lookup, its name free, its old name remembered.
            assert_eq!(removed_host(c, "h1")?, None);
            assert!(remove_host(c, "h1")?);
            assert!(!remove_host(c, "h1")?);
            assert!(host(c, "edge")?.is_none() && host(c, "h1")?.is_none());
            assert!(hosts(c)?.is_empty());
            assert_eq!(removed_host(c, "h1")?.as_deref(), Some("edge"));
            assert!(!set_host_credential(c, "h1", "cred3")?);
            insert_host(c, "h3", "edge", "cred3", &HostFacts::default())?;
            assert_eq!(host(c, "edge")?.expect("new host").id, "h3");
            Ok::<_, StoreError>(())
        })
        .expect("tx");
    }

    #[test]
    fn join_tokens_expire_and_single_use_ones_are_used_once() {
        let mut s = Store::open_in_memory().expect("open");
        s.atomic(|c| {
            let t = |id: &str, sha: &str, expires: i64, single: bool| JoinTokenRow {
                id: id.into(),
                sha256: sha.into(),
                created_at: crate::now(),
                expires_unix: expires,
                single_use: single,
                host_id: None,
                used_unix: None,
                used_by: None,
            };
            insert_join_token(c, &t("a", "sha-a", 1000, false))?;
            insert_join_token(c, &t("b", "sha-b", 2000, true))?;
            assert_eq!(
                join_token_by_sha(c, "sha-a")?.expect("a").expires_unix,
                1000
            );
            assert!(join_token_by_sha(c, "nope")?.is_none());
            assert!(use_join_token(c, "b", 1500, "edge")?);
            assert!(!use_join_token(c, "b", 1600, "other")?, "used once only");
            let b = join_token_by_sha(c, "sha-b")?.expect("b");
            assert_eq!(
                (b.used_unix, b.used_by.as_deref()),
                (Some(1500), Some("edge"))
            );
            // Expired ones are dropped after a grace period, so a refusal can still say why.
            assert_eq!(prune_join_tokens(c, 1000 + JOIN_TOKEN_KEEP_S + 1)?, 1);
            assert!(join_token_by_sha(c, "sha-a")?.is_none());
            assert_eq!(delete_join_tokens(c)?, 1);
            Ok::<_, StoreError>(())
        })
        .expect("tx");
    }

    #[test]
    fn migrates_and_round_trips_a_group_with_vms() {
        let mut s = Store::open_in_memory().expect("open");
        let cloud = s.cloud_id().expect("id");
        assert_eq!(s.cloud_id().expect("same id"), cloud);
        s.atomic(|c| {
            insert_host(c, "h1", "local", "x", &HostFacts::default())?;
            insert_network(
                c,
                &NetworkRow {
                    name: "lan".into(),
                    cidr: "10.80.0.0/24".into(),
                    vni: 5000,
                    gateway_host: Some("h1".into()),
                    state: NetworkState::Ready,
                    error: None,
                    deleting: false,
                    created_at: crate::now(),
                    nat: false,
                    gateway: None,
                    gateway_moved_from: None,
                    gateway_moved_at: None,
                },
            )?;
            insert_group(
                c,
                &GroupRow {
                    name: "web".into(),
                    image: "tiny".into(),
                    image_sha256: "abc".into(),
                    count: 1,
                    cpus: 1,
                    memory_mib: 256,
                    disk_mib: 1024,
                    networks: vec!["lan".into()],
                    user_data: Some("#!/bin/sh\necho 'hi' \"<x>\"".into()),
                    ssh_keys: vec!["ssh-ed25519 AAA x@y".into()],
                    placement: PlacementPolicy::Spread,
                    anti_affinity: false,
                    deleting: false,
                    created_at: crate::now(),
                    volume_size_mib: Some(512),
                    keep_volumes: true,
                    max_cpus: 4,
                },
            )?;
            let v = VmRow {
                id: "v1".into(),
                name: "web-0".into(),
                group: "web".into(),
                idx: 0,
                host_id: "h1".into(),
                placement_reason: "only host".into(),
                desired: PowerState::Running,
                observed: VmState::Pending,
                error: None,
                error_chain: vec![],
                cpu_usage: 0.0,
                reboot_seq: 0,
                reboot_done: 0,
                force_stop: false,
                stop_timeout_s: 60,
                deleting: false,
                created_at: crate::now(),
                extra: VmExtra {
                    cpus: Some(2),
                    pause_reason: Some("disk full".into()),
                    running_with: Some((1, 256, 1024)),
                    ..VmExtra::default()
                },
            };
            insert_vm(c, &v)?;
            insert_nic(
                c,
                &NicRow {
                    vm_id: "v1".into(),
                    idx: 0,
                    network: "lan".into(),
                    mac: "52:54:00:00:00:01".into(),
                    ip: "10.80.0.2".into(),
                },
            )?;
            Ok::<_, StoreError>(())
        })
        .expect("tx");
        let g = group(s.conn(), "web").expect("q").expect("row");
        assert_eq!(g.user_data.as_deref(), Some("#!/bin/sh\necho 'hi' \"<x>\""));
        assert_eq!(g.networks, vec!["lan".to_string()]);
        assert_eq!(group_vms(s.conn(), "web").expect("q").len(), 1);
        // the same address twice on one network is refused by the schema
        let dup = insert_nic(
            s.conn(),
            &NicRow {
                vm_id: "v1".into(),
                idx: 1,
                network: "lan".into(),
                mac: "52:54:00:00:00:02".into(),
                ip: "10.80.0.2".into(),
            },
        );
        assert!(dup.is_err());
        delete_vm(s.conn(), "v1").expect("delete");
        assert!(nics(s.conn()).expect("q").is_empty());
    }

    fn migration_row(id: &str, phase: MigrationPhase) -> MigrationRow {
        MigrationRow {
            id: id.into(),
            vm_id: "v1".into(),
            vm_name: "web-0".into(),
            source_host: "h1".into(),
            target_host: "h2".into(),
            mode: MigrationMode::Live,
            phase,
            reason: "asked for".into(),
            copied_bytes: 0,
            remaining_bytes: 0,
            mib_per_s: 0.0,
            total_ms: None,
            downtime_ms: None,
            bytes: None,
            error: None,
            started_at: crate::now(),
            started_unix_ms: crate::now_unix_ms(),
            phase_since_unix_ms: crate::now_unix_ms(),
            finished_at: None,
            source_obs: Side::default(),
            target_obs: Side::default(),
            target_cleanup: false,
        }
    }

    #[test]
    fn a_vm_is_in_one_migration_at_a_time_and_removals_are_idempotent() {
        let s = Store::open_in_memory().expect("open");
        let c = s.conn();
        let mut m = migration_row("m1", MigrationPhase::Preparing);
        m.source_obs.domain = true;
        m.downtime_ms = Some(120);
        save_migration(c, &m).expect("save");
        assert!(
            save_migration(c, &migration_row("m2", MigrationPhase::Copying)).is_err(),
            "a second active migration of one VM is refused"
        );
        let back = migration(c, "m1").expect("q").expect("row");
        assert!(back.source_obs.domain);
        assert_eq!(back.downtime_ms, Some(120));
        assert_eq!(active_migrations(c).expect("q").len(), 1);
        m.phase = MigrationPhase::Done;
        save_migration(c, &m).expect("update");
        assert!(active_migrations(c).expect("q").is_empty());
        save_migration(c, &migration_row("m2", MigrationPhase::Preparing)).expect("now allowed");
        assert_eq!(
            last_migration(c, "v1").expect("q").map(|m| m.id),
            Some("m1".into())
        );

        let r = RemovalRow {
            vm_id: "v1".into(),
            host_id: "h1".into(),
            name: "web-0".into(),
            domain: "tk-x-web-0".into(),
            reason: "migrated to h2".into(),
        };
        insert_removal(c, &r).expect("insert");
        insert_removal(c, &r).expect("again");
        assert_eq!(removals(c).expect("q"), vec![r]);
        delete_removal(c, "v1", "h1").expect("delete");
        assert!(removals(c).expect("q").is_empty());
    }

    #[test]
    fn operations_keep_their_typed_kind_and_phases() {
        let s = Store::open_in_memory().expect("open");
        let c = s.conn();
        let op = OpRow {
            op: tuchka_api::Operation {
                id: "o1".into(),
                kind: OperationKind::VmMigrate,
                target: "vm/web-0".into(),
                state: OperationState::Running,
                done: 0,
                total: 4,
                message: "preparing".into(),
                error: None,
                created_at: crate::now(),
                finished_at: None,
                phases: vec![tuchka_api::OperationPhase {
                    name: "prepare target".into(),
                    state: tuchka_api::PhaseState::Running,
                    message: String::new(),
                    started_at: None,
                    finished_at: None,
                }],
                parent: Some("o0".into()),
                children: vec![],
                migration: None,
            },
            record: OpRecord::new(tuchka_core::ops::OpKind::VmMigrate {
                vm: "web-0".into(),
                vm_id: "v1".into(),
                mode: MigrationMode::Live,
            }),
        };
        save_operation(c, &op).expect("save");
        let back = operation(c, "o1").expect("q").expect("row");
        assert_eq!(back, op);
        assert_eq!(running_operations(c).expect("q").len(), 1);
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        let mut s = Store::open_in_memory().expect("open");
        let r: std::result::Result<(), StoreError> = s.atomic(|c| {
            insert_host(c, "h1", "local", "x", &HostFacts::default())?;
            insert_host(c, "h1", "other", "x", &HostFacts::default())?; // duplicate id
            Ok(())
        });
        assert!(r.is_err());
        assert!(hosts(s.conn()).expect("q").is_empty());
    }

    #[test]
    fn reopening_a_file_keeps_data() {
        let dir = std::env::temp_dir().join(format!("tuchka-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.db");
        let id = Store::open(&path).expect("open").cloud_id().expect("id");
        assert_eq!(
            Store::open(&path).expect("reopen").cloud_id().expect("id"),
            id
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
