//! Pure renderers: API objects to aligned tables and `key: value` detail views.
//!
//! Nothing here does I/O; every function returns the text to print (ending in a newline), so
//! the views are unit-tested. Columns are separated by two spaces, padded by character count,
//! with no trailing whitespace.

use tuchka_api::{
    CachePrune, CachedImage, CheckItem, Forward, Group, Host, HostRemoved, Image, JoinToken,
    Network, Operation, Rule, Storage, UiLogin, Vm, VmAddress, Volume,
};

use crate::size::{format_bytes, format_mib};

/// Shown in a cell that has no value.
const NONE: &str = "-";

/// Render `rows` under `headers` as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(width) => *width = (*width).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Render `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let label = if key.is_empty() {
            String::new()
        } else {
            format!("{key}:")
        };
        let line = format!("{label:<width$} {value}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_none(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => NONE.to_string(),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        NONE.to_string()
    } else {
        items.join(",")
    }
}

fn short_sha(sha: &str) -> String {
    sha.chars().take(12).collect()
}

fn ips(addresses: &[VmAddress]) -> String {
    let ips: Vec<String> = addresses.iter().map(|a| a.ip.clone()).collect();
    list_or_none(&ips)
}

/// `image list`.
pub fn image_table(images: &[Image]) -> String {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.source_format.clone(),
                format_bytes(i.virtual_size),
                format_bytes(i.stored_size),
                short_sha(&i.sha256),
                list_or_none(&i.used_by),
                i.created_at.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "FORMAT", "VIRTUAL", "STORED", "SHA256", "USED BY", "CREATED",
        ],
        &rows,
    )
}

/// `image show` and the result of `image upload`.
pub fn image_detail(i: &Image) -> String {
    fields(&[
        ("name", i.name.clone()),
        ("sha256", i.sha256.clone()),
        ("format", i.source_format.clone()),
        (
            "virtual size",
            format!(
                "{} ({} bytes)",
                format_bytes(i.virtual_size),
                i.virtual_size
            ),
        ),
        (
            "stored size",
            format!(
                "{} ({} bytes, qcow2)",
                format_bytes(i.stored_size),
                i.stored_size
            ),
        ),
        ("made from", or_none(Some(&i.made_from))),
        ("created", i.created_at.clone()),
        ("used by", list_or_none(&i.used_by)),
    ])
}

/// `image cache list`: HOST IMAGE SHA256 USED BY.
pub fn cache_table(items: &[CachedImage]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                c.host.clone(),
                list_or_none(&c.images),
                short_sha(&c.sha256),
                if c.used_by.is_empty() {
                    "unused".to_string()
                } else {
                    c.used_by.join(", ")
                },
            ]
        })
        .collect();
    table(&["HOST", "IMAGE", "SHA256", "USED BY"], &rows)
}

/// `image cache prune`.
pub fn prune_view(p: &CachePrune) -> String {
    if p.pruned.is_empty() {
        return "nothing to prune: every cached image is in use\n".into();
    }
    let mut out = format!("pruned {} cached image(s):\n", p.pruned.len());
    for x in &p.pruned {
        out.push_str(&format!("  {x}\n"));
    }
    out
}

/// `volume list`: NAME HOST SIZE ALLOCATED STATE VM.
pub fn volume_table(vols: &[Volume]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.host.clone(),
                format_mib(v.size_mib),
                format_mib(v.allocated_mib),
                v.state.to_string(),
                or_none(v.vm.as_deref()),
            ]
        })
        .collect();
    table(&["NAME", "HOST", "SIZE", "ALLOCATED", "STATE", "VM"], &rows)
}

/// `volume show`.
pub fn volume_detail(v: &Volume) -> String {
    fields(&[
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("host", v.host.clone()),
        ("size", format_mib(v.size_mib)),
        ("allocated", format_mib(v.allocated_mib)),
        ("state", v.state.to_string()),
        ("attached to", or_none(v.vm.as_deref())),
        (
            "guest device",
            format!("/dev/disk/by-id/virtio-{}", volume_serial(&v.id)),
        ),
        (
            "removed with its vm",
            if v.with_vm { "yes" } else { "no" }.to_string(),
        ),
        ("error", or_none(v.error.as_deref())),
        ("created", v.created_at.clone()),
    ])
}

/// The serial a guest sees for volume `id`: the id without dashes, 20 characters.
fn volume_serial(id: &str) -> String {
    id.chars().filter(|c| *c != '-').take(20).collect()
}

/// `storage`: per host, then the controller's store.
/// `tuchka ui`: the login link, or why there is none.
pub fn ui_login(l: &UiLogin) -> String {
    match (&l.link, &l.url) {
        (Some(link), _) => {
            let mut out = format!("{link}\n");
            if let Some(fp) = &l.fingerprint {
                out.push_str(&format!(
                    "  the browser warns about the certificate: check its CA's sha256 is {fp}\n  \
                     (or import <data-dir>/tls/ca.crt); the link carries the API token: keep it private\n"
                ));
            }
            out
        }
        _ => "the dashboard is served on TCP only: start the controller with `tuchka serve --listen ADDR:PORT`\n"
            .to_string(),
    }
}

pub fn storage_view(s: &Storage) -> String {
    let rows: Vec<Vec<String>> = s
        .hosts
        .iter()
        .map(|h| {
            let pct = (h.used_mib * 100).checked_div(h.pool_mib).unwrap_or(0);
            vec![
                h.host.clone(),
                format_mib(h.pool_mib),
                format!("{} ({pct} %)", format_mib(h.used_mib)),
                format_mib(h.free_mib),
                format_mib(h.reserve_mib),
                format!(
                    "{} / {} (limit {})",
                    format_mib(h.allocated_mib),
                    format_mib(h.provisioned_mib),
                    format_mib(h.provision_limit_mib)
                ),
                format!("{} ({})", format_mib(h.image_cache_mib), h.cached_images),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "HOST",
            "POOL",
            "USED",
            "FREE",
            "RESERVE",
            "ALLOCATED / PROVISIONED",
            "IMAGE CACHE",
        ],
        &rows,
    );
    out.push_str(&format!(
        "\nimage store {}: {} free of {}, {} image(s) take {}\n",
        s.store.path,
        format_mib(s.store.free_mib),
        format_mib(s.store.size_mib),
        s.store.images,
        format_mib(s.store.images_mib)
    ));
    out
}

/// `net list`.
pub fn network_table(nets: &[Network]) -> String {
    let rows: Vec<Vec<String>> = nets
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.cidr.clone(),
                n.gateway.clone(),
                n.vni.to_string(),
                n.bridge.clone(),
                n.state.to_string(),
                or_none(n.gateway_host.as_deref()),
                n.addresses.len().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "CIDR",
            "GATEWAY",
            "VNI",
            "BRIDGE",
            "STATE",
            "GW HOST",
            "ADDRESSES",
        ],
        &rows,
    )
}

/// The gateway host, and where the role came from when it moved ("h2 (took over from h1,
/// down, at …)").
fn gateway_host(n: &Network) -> String {
    let host = or_none(n.gateway_host.as_deref());
    match (&n.gateway_moved_from, &n.gateway_moved_at) {
        (Some(from), Some(at)) => format!("{host} (took over from {from}, down, at {at})"),
        _ => host,
    }
}

/// `net show`: fields, then the address reservations.
pub fn network_detail(n: &Network) -> String {
    let mut out = fields(&[
        ("name", n.name.clone()),
        ("cidr", n.cidr.clone()),
        ("gateway", n.gateway.clone()),
        ("vni", n.vni.to_string()),
        ("bridge", n.bridge.clone()),
        ("state", n.state.to_string()),
        ("gateway host", gateway_host(n)),
        (
            "nat",
            if n.nat {
                "yes (outbound through the host)".into()
            } else {
                "no (no route out)".into()
            },
        ),
        ("error", or_none(n.error.as_deref())),
    ]);
    if !n.rules.is_empty() {
        out.push_str("\nrules:\n");
        out.push_str(&rule_table(&n.rules));
    }
    if !n.forwards.is_empty() {
        out.push_str("\nforwards:\n");
        out.push_str(&forward_table(&n.forwards));
    }
    if !n.addresses.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = n
            .addresses
            .iter()
            .map(|a| vec![a.ip.clone(), a.mac.clone(), or_none(a.vm.as_deref())])
            .collect();
        out.push_str(&table(&["IP", "MAC", "VM"], &rows));
    }
    out
}

/// `net rule list`.
pub fn rule_table(rules: &[Rule]) -> String {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            let inbound = r.direction == tuchka_api::Direction::In;
            let peer = if inbound {
                r.from
                    .clone()
                    .or_else(|| r.from_group.as_ref().map(|g| format!("group {g}")))
                    .or_else(|| r.from_network.as_ref().map(|n| format!("network {n}")))
                    .unwrap_or_else(|| "-".into())
            } else {
                r.to.clone().unwrap_or_else(|| "0.0.0.0/0".into())
            };
            let target = match (inbound, &r.to_group) {
                (true, Some(g)) => format!("group {g}"),
                (true, None) => "all VMs".into(),
                _ => "-".into(),
            };
            vec![
                r.id.clone(),
                r.direction.to_string(),
                r.action.to_string(),
                r.spec.clone(),
                peer,
                target,
            ]
        })
        .collect();
    table(
        &["ID", "DIR", "ACTION", "MATCH", "FROM/TO", "TARGET"],
        &rows,
    )
}

/// `net forward list`.
pub fn forward_table(forwards: &[Forward]) -> String {
    let rows: Vec<Vec<String>> = forwards
        .iter()
        .map(|f| {
            vec![
                f.id.clone(),
                f.proto.to_string(),
                format!("{}:{}", or_none(f.host.as_deref()), f.host_port),
                format!("{}:{} ({})", f.vm, f.vm_port, f.vm_ip),
            ]
        })
        .collect();
    table(&["ID", "PROTO", "HOST PORT", "TO"], &rows)
}

/// `group list`.
pub fn group_table(groups: &[Group]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.image.clone(),
                format!("{}/{}", g.vms.len(), g.count),
                g.cpus.to_string(),
                format_mib(g.memory_mib),
                format_mib(g.disk_mib),
                list_or_none(&g.networks),
                g.placement.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "IMAGE",
            "VMS",
            "CPUS",
            "MEMORY",
            "DISK",
            "NETWORKS",
            "PLACEMENT",
        ],
        &rows,
    )
}

/// `group show`.
pub fn group_detail(g: &Group) -> String {
    fields(&[
        ("name", g.name.clone()),
        ("image", g.image.clone()),
        ("count", g.count.to_string()),
        ("cpus", g.cpus.to_string()),
        ("memory", format_mib(g.memory_mib)),
        ("disk", format_mib(g.disk_mib)),
        ("networks", list_or_none(&g.networks)),
        ("placement", g.placement.to_string()),
        ("vms", list_or_none(&g.vms)),
        ("created", g.created_at.clone()),
    ])
}

/// The STATE cell of a VM: the observed state, with the wanted one when they differ.
fn vm_state(vm: &Vm) -> String {
    let observed = vm.state.as_str();
    let desired = vm.desired.as_str();
    if observed == desired {
        observed.to_string()
    } else {
        format!("{observed} (want {desired})")
    }
}

/// `vm list`: NAME GROUP STATE HOST IP(S) CPUS MEMORY.
pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.group.clone(),
                vm_state(vm),
                or_none(Some(&vm.host)),
                ips(&vm.addresses),
                vm.cpus.to_string(),
                format_mib(vm.memory_mib),
            ]
        })
        .collect();
    table(
        &["NAME", "GROUP", "STATE", "HOST", "IP(S)", "CPUS", "MEMORY"],
        &rows,
    )
}

/// `vm show`.
pub fn vm_detail(vm: &Vm) -> String {
    let addresses: Vec<String> = vm
        .addresses
        .iter()
        .map(|a| format!("{} {} ({})", a.network, a.ip, a.mac))
        .collect();
    let mut pairs = vec![
        ("name", vm.name.clone()),
        ("id", vm.id.clone()),
        ("group", format!("{} (index {})", vm.group, vm.index)),
        ("state", vm.state.as_str().to_string()),
        ("desired", vm.desired.as_str().to_string()),
        ("host", or_none(Some(&vm.host))),
        ("placement", or_none(Some(&vm.placement_reason))),
        ("image", vm.image.clone()),
        ("cpus", vm.cpus.to_string()),
        ("memory", format_mib(vm.memory_mib)),
        ("disk", format_mib(vm.disk_mib)),
        ("volumes", list_or_none(&vm.volumes)),
        ("domain", vm.domain.clone()),
        ("error", or_none(vm.error.as_deref())),
        ("created", vm.created_at.clone()),
    ];
    for cause in &vm.error_chain {
        pairs.push(("caused by", cause.clone()));
    }
    if let Some(why) = &vm.pause_reason {
        pairs.push(("paused because", why.clone()));
    }
    if let Some(p) = &vm.pending_resize {
        pairs.push(("at next start", p.clone()));
    }
    if let Some(m) = &vm.migration {
        pairs.push(("migrating", migration_line(m)));
    }
    if let Some(m) = &vm.last_migration {
        pairs.push(("last migration", migration_line(m)));
    }
    if addresses.is_empty() {
        pairs.insert(6, ("addresses", NONE.to_string()));
    } else {
        for (i, a) in addresses.into_iter().enumerate() {
            pairs.insert(6 + i, (if i == 0 { "addresses" } else { "" }, a));
        }
    }
    fields(&pairs)
}

/// `host list`.
pub fn host_table(hosts: &[Host]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                if h.address.is_empty() {
                    NONE.to_string()
                } else {
                    h.address.clone()
                },
                h.state.to_string(),
                h.accel.clone(),
                format!("{:.2}", h.load_1m),
                format!("{}/{}", h.cpus_used, h.cpus),
                format!(
                    "{}/{}",
                    format_mib(h.memory_used_mib),
                    format_mib(h.memory_mib)
                ),
                format!("{}/{}", format_mib(h.disk_free_mib), format_mib(h.disk_mib)),
                h.vms.len().to_string(),
                or_none(h.last_seen.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESS",
            "STATE",
            "ACCEL",
            "LOAD",
            "VCPUS USED",
            "MEMORY USED",
            "DISK FREE",
            "VMS",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// `host join-token`: the command to run on the new host, or the token alone (and why) when
/// the controller does not listen on TCP.
pub fn join_token(j: &JoinToken) -> String {
    match &j.command {
        Some(command) => format!("{command}\n"),
        None => format!(
            "join token: {}\n(this controller does not listen on TCP: restart it with --listen ADDR:PORT so agents can join)\n",
            j.token
        ),
    }
}

/// `host join-token`: what the token admits, and until when.
pub fn join_token_note(j: &JoinToken) -> String {
    let what = match (&j.host, j.single_use) {
        (Some(h), _) => format!("admits host {h} again (with its VMs), once"),
        (None, true) => "admits one new host".to_string(),
        (None, false) => "admits new hosts".to_string(),
    };
    format!("# this join token {what} until {}\n", j.expires_at)
}

/// `host rm`.
pub fn host_removed(r: &HostRemoved) -> String {
    let mut out = format!(
        "host {:?} removed: its identity is refused from now on (the machine joins again only as a new host)\n",
        r.name
    );
    let list = |label: &str, items: &[String]| {
        if items.is_empty() {
            String::new()
        } else {
            format!("  {label}: {}\n", items.join(", "))
        }
    };
    out += &list(
        "lost VMs (remove them: tuchka vm rm / group rm)",
        &r.lost_vms,
    );
    out += &list("removed VMs", &r.removed_vms);
    out += &list("lost volumes", &r.lost_volumes);
    out += &list("freed addresses", &r.freed_addresses);
    out += &list("network gateways moved", &r.moved_gateways);
    out
}

/// `host revoke`.
pub fn host_revoked(h: &Host) -> String {
    format!(
        "host {:?} revoked: its agent's credential is refused from now on (state: {})\n",
        h.name, h.state
    )
}

/// `host show`.
pub fn host_detail(h: &Host) -> String {
    let cached: Vec<String> = h.cached_images.iter().map(|s| short_sha(s)).collect();
    fields(&[
        ("name", h.name.clone()),
        ("id", h.id.clone()),
        ("state", h.state.to_string()),
        (
            "address",
            or_none(
                Some(&h.address)
                    .filter(|a| !a.is_empty())
                    .map(String::as_str),
            ),
        ),
        ("load (1 min)", format!("{:.2}", h.load_1m)),
        ("memory available", format_mib(h.memory_available_mib)),
        ("accel", h.accel.clone()),
        ("accel reason", or_none(Some(&h.accel_reason))),
        ("vcpus", format!("{} used of {}", h.cpus_used, h.cpus)),
        (
            "memory",
            format!(
                "{} used of {}",
                format_mib(h.memory_used_mib),
                format_mib(h.memory_mib)
            ),
        ),
        (
            "disk",
            format!(
                "{} free of {}, {} provisioned",
                format_mib(h.disk_free_mib),
                format_mib(h.disk_mib),
                format_mib(h.disk_provisioned_mib)
            ),
        ),
        ("cpu in use", format!("{:.0} %", h.cpu_usage * 100.0)),
        ("memory in use", format_mib(h.memory_in_use_mib)),
        ("vms", list_or_none(&h.vms)),
        ("cached images", list_or_none(&cached)),
        ("last seen", or_none(h.last_seen.as_deref())),
        (
            "orphans",
            if h.orphans.is_empty() {
                NONE.to_string()
            } else {
                h.orphans
                    .iter()
                    .map(|o| format!("{} {} (vm id {})", o.kind, o.name, o.vm_id))
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " — left alone: not known to the controller"
            },
        ),
    ])
}

/// `host drain`: the host, the operation moving its VMs, and what cannot move.
pub fn drain(d: &tuchka_api::Drain) -> String {
    let mut out = format!(
        "host {} is {}: no new placements\n",
        d.host.name, d.host.state
    );
    match &d.operation {
        Some(op) => out += &operation_started(op),
        None if d.unmovable.is_empty() => out += "it has no VMs\n",
        None => {}
    }
    for u in &d.unmovable {
        out += &format!("cannot move {}: {}\n", u.vm, u.reason);
    }
    out
}

/// `balance plan`.
pub fn balance_plan(p: &tuchka_api::BalancePlan) -> String {
    let mut out = format!(
        "imbalance {:.0} % (acts above {:.0} %)",
        p.imbalance, p.threshold
    );
    if !p.moves.is_empty() {
        out += &format!(" → {:.0} % after the plan", p.imbalance_after);
    }
    out.push('\n');
    if !p.hosts.is_empty() {
        out.push('\n');
        out += &host_loads(&p.hosts);
    }
    if !p.moves.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = p
            .moves
            .iter()
            .map(|m| {
                vec![
                    m.vm.clone(),
                    m.from.clone(),
                    m.to.clone(),
                    format!("{:.0} → {:.0} %", m.imbalance_before, m.imbalance_after),
                    m.cost.clone(),
                    m.reason.clone(),
                ]
            })
            .collect();
        out += &table(&["VM", "FROM", "TO", "IMBALANCE", "COST", "REASON"], &rows);
    }
    for w in &p.why_not {
        out += &format!("no move: {w}\n");
    }
    out
}

fn host_loads(hosts: &[tuchka_api::HostLoad]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                format!("{:.0} %", h.cpu * 100.0),
                format!("{:.0} %", h.memory * 100.0),
                h.vms.to_string(),
                if h.target { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    table(&["HOST", "CPU", "MEMORY", "VMS", "TARGET"], &rows)
}

/// `balance status`.
pub fn balance_status(s: &tuchka_api::BalanceStatus) -> String {
    let mut out = format!(
        "mode {} (every {} s), imbalance {:.0} %, threshold {:.0} %, above it for {} of {} rounds needed\n",
        s.mode, s.interval_s, s.imbalance, s.threshold, s.rounds_above, s.hold_rounds
    );
    if !s.hosts.is_empty() {
        out.push('\n');
        out += &host_loads(&s.hosts);
    }
    if !s.decisions.is_empty() {
        out += "\nlast decisions:\n";
        for d in &s.decisions {
            out += &format!("  {} ({:.0} %): {}\n", d.time, d.imbalance, d.summary);
        }
    }
    out
}

/// `done/total`, or `-` before the total is known.
fn progress(op: &Operation) -> String {
    if op.total == 0 {
        NONE.to_string()
    } else {
        format!("{}/{}", op.done, op.total)
    }
}

/// `op list`.
pub fn operation_table(ops: &[Operation]) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|op| {
            vec![
                op.id.clone(),
                op.kind.to_string(),
                op.target.clone(),
                op.state.to_string(),
                progress(op),
                op.created_at.clone(),
                match &op.error {
                    Some(e) => e.message.clone(),
                    None => op.message.clone(),
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "KIND", "TARGET", "STATE", "PROGRESS", "CREATED", "MESSAGE",
        ],
        &rows,
    )
}

/// `op show`.
pub fn operation_detail(op: &Operation) -> String {
    let mut pairs = vec![
        ("id", op.id.clone()),
        ("kind", op.kind.to_string()),
        ("target", op.target.clone()),
        ("state", op.state.to_string()),
        ("progress", progress(op)),
        ("message", or_none(Some(&op.message))),
        ("created", op.created_at.clone()),
        ("finished", or_none(op.finished_at.as_deref())),
    ];
    if let Some(p) = &op.parent {
        pairs.push(("part of", p.clone()));
    }
    if let Some(m) = &op.migration {
        pairs.push(("migration", migration_line(m)));
    }
    if let Some(e) = &op.error {
        pairs.push(("error", format!("{} ({})", e.message, e.code)));
        for cause in &e.chain {
            pairs.push(("caused by", cause.clone()));
        }
    }
    let mut out = fields(&pairs);
    if !op.phases.is_empty() {
        out.push_str(
            "
phases:
",
        );
        let rows: Vec<Vec<String>> = op
            .phases
            .iter()
            .map(|p| vec![p.name.clone(), p.state.to_string(), p.message.clone()])
            .collect();
        out.push_str(&table(&["PHASE", "STATE", "MESSAGE"], &rows));
    }
    if !op.children.is_empty() {
        out.push_str(
            "
children (tuchka op show ID):
",
        );
        for c in &op.children {
            out.push_str(&format!(
                "  {c}
"
            ));
        }
    }
    out
}

/// A migration in one line: `live h1 → h2, done: 1.9 s, downtime 120 ms, 300 MiB moved`.
pub fn migration_line(m: &tuchka_api::Migration) -> String {
    let mut s = format!("{} {} → {}, {}", m.mode, m.from, m.to, m.phase);
    if m.phase == tuchka_api::MigrationPhase::Copying && m.copied_bytes + m.remaining_bytes > 0 {
        let total = (m.copied_bytes + m.remaining_bytes) as f64;
        s += &format!(
            ": {:.0} % ({} of {} MiB), {:.0} MiB/s",
            100.0 * m.copied_bytes as f64 / total,
            m.copied_bytes >> 20,
            (m.copied_bytes + m.remaining_bytes) >> 20,
            m.mib_per_s
        );
    }
    if let Some(t) = m.total_ms {
        s += &format!(", {:.1} s", t as f64 / 1000.0);
    }
    if let Some(d) = m.downtime_ms {
        s += &format!(", downtime {d} ms");
    }
    if let Some(b) = m.bytes {
        s += &format!(", {} MiB moved", b >> 20);
    }
    if let Some(e) = &m.error {
        s += &format!(" ({})", e.message);
    }
    s
}

/// What `--wait`-less actions print: the operation and how to follow it.
pub fn operation_started(op: &Operation) -> String {
    format!(
        "operation {} started: {} {}\nfollow it with: tuchka op wait {}\n",
        op.id, op.kind, op.target, op.id
    )
}

/// `tuchka check`: one ✓/✗ line per item, hints under the failed ones.
pub fn check_report(items: &[CheckItem]) -> String {
    let mut out = String::new();
    for item in items {
        let mark = if item.ok { "✓" } else { "✗" };
        let line = format!("{mark} {}: {}", item.name, item.detail);
        out.push_str(line.trim_end());
        out.push('\n');
        if let (false, Some(hint)) = (item.ok, &item.hint) {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let failed = items.iter().filter(|i| !i.ok).count();
    if failed == 0 {
        out.push_str("all checks passed\n");
    } else {
        out.push_str(&format!("{failed} of {} checks failed\n", items.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::{ApiError, PowerState, VmState};

    fn vm(name: &str, state: VmState, desired: PowerState, ips: &[&str]) -> Vm {
        Vm {
            name: name.to_string(),
            id: "0b7e".to_string(),
            group: "web".to_string(),
            index: 0,
            state,
            desired,
            host: "h1".to_string(),
            placement_reason: "spread: fewest VMs of the group".to_string(),
            image: "base".to_string(),
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            addresses: ips
                .iter()
                .enumerate()
                .map(|(i, ip)| VmAddress {
                    network: format!("n{i}"),
                    mac: format!("52:54:00:00:00:0{i}"),
                    ip: ip.to_string(),
                    vm: None,
                })
                .collect(),
            domain: "tk-1-web-0".to_string(),
            error: None,
            error_chain: vec![],
            created_at: "2026-01-01T00:00:00Z".to_string(),
            migration: None,
            last_migration: None,
            cpu_usage: 0.0,
            volumes: vec![],
            pending_resize: None,
            pause_reason: None,
        }
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let out = table(
            &["NAME", "IP"],
            &[
                vec!["a-long-name".into(), "10.0.0.1".into()],
                vec!["b".into(), "-".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME         IP\n\
             a-long-name  10.0.0.1\n\
             b            -\n"
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let out = table(&["A", "B"], &[vec!["é".into(), "x".into()]]);
        assert_eq!(out, "A  B\né  x\n");
    }

    #[test]
    fn vm_list_shows_what_a_user_checks() {
        let vms = vec![
            vm(
                "web-0",
                VmState::Running,
                PowerState::Running,
                &["10.80.0.2", "10.81.0.2"],
            ),
            vm("web-1", VmState::Starting, PowerState::Running, &[]),
        ];
        let out = vm_table(&vms);
        assert_eq!(
            out,
            "NAME   GROUP  STATE                    HOST  IP(S)                CPUS  MEMORY\n\
             web-0  web    running                  h1    10.80.0.2,10.81.0.2  1     256M\n\
             web-1  web    starting (want running)  h1    -                    1     256M\n"
        );
    }

    #[test]
    fn vm_detail_lists_addresses_one_per_line() {
        let out = vm_detail(&vm(
            "web-0",
            VmState::Running,
            PowerState::Running,
            &["10.80.0.2", "10.81.0.2"],
        ));
        assert!(
            out.contains("addresses: n0 10.80.0.2 (52:54:00:00:00:00)\n"),
            "{out}"
        );
        assert!(
            out.contains("\n           n1 10.81.0.2 (52:54:00:00:00:01)\n"),
            "{out}"
        );
        assert!(out.contains("memory:    256M\n"), "{out}");
        assert!(out.contains("error:     -\n"), "{out}");
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(
            fields(&[
                ("a", "1".into()),
                ("long key", "2".into()),
                ("e", String::new())
            ]),
            "a:        1\nlong key: 2\ne:\n"
        );
    }

    #[test]
    fn image_views_show_sizes_and_sha() {
        let img = Image {
            name: "base".into(),
            sha256: "0123456789abcdef".repeat(4),
            source_format: "raw".into(),
            virtual_size: 1024 * 1024 * 1024,
            stored_size: 3 * 1024 * 1024 + 512 * 1024,
            created_at: "2026-01-01T00:00:00Z".into(),
            used_by: vec!["web-0".into(), "web-1".into()],
            made_from: "upload".into(),
        };
        let out = image_table(std::slice::from_ref(&img));
        assert_eq!(
            out,
            "NAME  FORMAT  VIRTUAL  STORED  SHA256        USED BY      CREATED\n\
             base  raw     1G       3.5M    0123456789ab  web-0,web-1  2026-01-01T00:00:00Z\n"
        );
        let detail = image_detail(&img);
        assert!(
            detail.contains(&format!("sha256:       {}\n", img.sha256)),
            "{detail}"
        );
        assert!(
            detail.contains("virtual size: 1G (1073741824 bytes)\n"),
            "{detail}"
        );
    }

    fn op(state: &str, error: Option<ApiError>) -> Operation {
        Operation {
            id: "op-1".into(),
            kind: "vm.start".parse().expect("kind"),
            target: "vm/web-0".into(),
            state: state.parse().expect("state"),
            done: 1,
            total: 2,
            message: "starting".into(),
            error,
            created_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
            phases: vec![],
            parent: None,
            children: vec![],
            migration: None,
        }
    }

    #[test]
    fn operation_views() {
        let failed = op(
            "failed",
            Some(ApiError {
                code: "HostDown".into(),
                message: "host h1 is down".into(),
                chain: vec!["no report for 30 s".into()],
            }),
        );
        let out = operation_table(&[op("running", None), failed.clone()]);
        assert_eq!(
            out,
            "ID    KIND      TARGET    STATE    PROGRESS  CREATED               MESSAGE\n\
             op-1  vm.start  vm/web-0  running  1/2       2026-01-01T00:00:00Z  starting\n\
             op-1  vm.start  vm/web-0  failed   1/2       2026-01-01T00:00:00Z  host h1 is down\n"
        );
        let detail = operation_detail(&failed);
        assert!(
            detail.contains("error:     host h1 is down (HostDown)\n"),
            "{detail}"
        );
        assert!(
            detail.contains("caused by: no report for 30 s\n"),
            "{detail}"
        );
        assert_eq!(
            operation_started(&failed),
            "operation op-1 started: vm.start vm/web-0\nfollow it with: tuchka op wait op-1\n"
        );
    }

    #[test]
    fn host_rm_says_what_was_lost_and_freed() {
        let r = HostRemoved {
            name: "h2".into(),
            id: "id".into(),
            lost_vms: vec!["db-0".into()],
            removed_vms: vec!["web-0".into(), "web-1".into()],
            lost_volumes: vec![],
            freed_addresses: vec!["app/10.0.0.2".into()],
            moved_gateways: vec![],
        };
        assert_eq!(
            host_removed(&r),
            "host \"h2\" removed: its identity is refused from now on (the machine joins again only as a new host)\n  \
             lost VMs (remove them: tuchka vm rm / group rm): db-0\n  removed VMs: web-0, web-1\n  \
             freed addresses: app/10.0.0.2\n"
        );
        let j = JoinToken {
            token: "t".into(),
            url: Some("https://x:1".into()),
            fingerprint: Some("f".into()),
            command: Some("tuchka agent …".into()),
            expires_at: "2026-12-02T08:00:00Z".into(),
            single_use: true,
            host: None,
        };
        assert_eq!(join_token(&j), "tuchka agent …\n");
        assert_eq!(
            join_token_note(&j),
            "# this join token admits one new host until 2026-12-02T08:00:00Z\n"
        );
    }

    #[test]
    fn host_table_shows_usage_against_capacity() {
        let h = Host {
            name: "h1".into(),
            id: "1".into(),
            state: tuchka_api::HostState::Up,
            address: String::new(),
            load_1m: 0.25,
            memory_available_mib: 20_000,
            accel: "tcg".into(),
            accel_reason: "nested KVM hangs".into(),
            cpus: 2,
            cpus_used: 3,
            memory_mib: 8000,
            memory_used_mib: 768,
            disk_mib: 20480,
            disk_free_mib: 12800,
            disk_provisioned_mib: 3072,
            vms: vec!["web-0".into()],
            cached_images: vec![],
            last_seen: None,
            cpu_usage: 0.0,
            memory_in_use_mib: 0,
            orphans: vec![],
            channel_port: 0,
        };
        assert_eq!(
            host_table(&[h]),
            "NAME  ADDRESS  STATE  ACCEL  LOAD  VCPUS USED  MEMORY USED  DISK FREE  VMS  LAST SEEN\n\
             h1    -        up     tcg    0.25  3/2         768M/7.8G    12.5G/20G  1    -\n"
        );
    }

    #[test]
    fn check_report_marks_and_hints() {
        let items = vec![
            CheckItem {
                name: "libvirt".into(),
                ok: true,
                detail: "qemu:///system answers".into(),
                hint: None,
            },
            CheckItem {
                name: "/dev/kvm".into(),
                ok: false,
                detail: "mode 0600".into(),
                hint: Some("chmod 0660 /dev/kvm".into()),
            },
        ];
        assert_eq!(
            check_report(&items),
            "✓ libvirt: qemu:///system answers\n\
             ✗ /dev/kvm: mode 0600\n    hint: chmod 0660 /dev/kvm\n\
             1 of 2 checks failed\n"
        );
    }
}
