//! The desired state of one host, built from a [`Snapshot`]: the VMs it must run (with their
//! part in a migration, if any), the networks they need, the images the cloud still has, what
//! it must remove — by name, never "whatever is not listed" — and the cloud's other hosts.
//! Pure over the snapshot, linear in its size.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tuchka_api::agent::{
    CaptureDesired, CaptureStatus, DhcpHost, HostDesired, NetworkDesired, NicDesired, PeerHost,
    VmDesired, VmRemoval, VolumeDesired, VxlanDesired,
};
use tuchka_core::names;
use tuchka_store::{NetworkRow, VmRow};

use crate::error::{Error, Result};
use crate::snapshot::{size_of, Snapshot};
use crate::state::Controller;

/// MTU of tenant bridges and guest NICs (leaves room for VXLAN on a 1500 fabric).
pub const TENANT_MTU: u32 = 1450;

/// UDP port of VXLAN between hosts.
pub const VXLAN_PORT: u16 = 4789;

/// Everything host `host_id` must converge to, read from the database now.
pub fn desired_for(ctl: &Controller, host_id: &str, generation: u64) -> Result<HostDesired> {
    let basis = Basis::load(ctl, generation)?;
    basis.desired(ctl, host_id, generation)
}

/// How long a [`Basis`] serves long polls of its generation: changes that bump the generation
/// replace it at once; the rest (a host's facts, a VM's observed state) at most this late.
const BASIS_MAX_AGE: Duration = Duration::from_secs(1);

/// What every host's desired state is built from — the snapshot, the rule, forward and image
/// cache rows, and the indexes over them — read once per generation and shared by all hosts'
/// long polls: a change that wakes 1,000 hosts reads the state once, not 1,000 times.
pub struct Basis {
    generation: u64,
    taken: Instant,
    snapshot: Snapshot,
    shared: Shared,
    image_cache: HashMap<(String, String), i64>,
}

impl Basis {
    /// Read it now, labelled with `generation` (read before the rows, so the rows are at least
    /// as new as the label).
    fn load(ctl: &Controller, generation: u64) -> Result<Basis> {
        ctl.read(|c| {
            let snapshot = ctl.snapshot(c)?;
            let rules = tuchka_store::rules(c)?;
            let forwards = tuchka_store::forwards(c)?;
            let shared = Shared::new(&snapshot, &rules, &forwards);
            Ok(Basis {
                generation,
                taken: Instant::now(),
                snapshot,
                shared,
                image_cache: tuchka_store::image_cache(c)?,
            })
        })
    }

    /// The desired state of `host_id` from it.
    fn desired(&self, ctl: &Controller, host_id: &str, generation: u64) -> Result<HostDesired> {
        let s = &self.snapshot;
        if s.host(host_id).is_none() {
            return Err(Error::not_found("host", "host", host_id));
        }
        let mut d = build_shared(s, &self.shared, ctl.cloud_id(), host_id, generation);
        d.images = keep_images(
            s,
            host_id,
            &d,
            &self.image_cache,
            ctl.config().image_cache_ttl.as_secs() as i64,
        );
        Ok(d)
    }
}

/// How often a basis is read at most while the generation keeps moving (a stream of writes):
/// the long polls woken in between wait for one read instead of each generation having its
/// own.
const BASIS_MIN_AGE: Duration = Duration::from_millis(250);

/// The [`Basis`] of the current generation, kept between long polls (one per controller).
#[derive(Default)]
pub struct Cache {
    slot: Mutex<Option<Arc<Basis>>>,
}

impl Cache {
    /// How long a long poll should wait before [`Cache::desired_for`]: while the basis is of
    /// an older generation but younger than [`BASIS_MIN_AGE`], until it is that old.
    pub fn reload_wait(&self, ctl: &Controller) -> Option<Duration> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let b = slot.as_ref()?;
        (b.generation != ctl.generation())
            .then(|| BASIS_MIN_AGE.checked_sub(b.taken.elapsed()))
            .flatten()
    }

    /// The desired state of `host_id`, from the cached basis when it is of the current
    /// generation and young enough; labelled with the basis' generation (the rows are at
    /// least as new).
    pub fn desired_for(&self, ctl: &Controller, host_id: &str) -> Result<HostDesired> {
        let current = ctl.generation();
        let basis = {
            // Held while loading: the other hosts woken by the same change wait for this read
            // instead of each making its own.
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                // A host that joined after it was read (joining wakes nobody) needs a new one.
                Some(b)
                    if b.generation == current
                        && b.taken.elapsed() < BASIS_MAX_AGE
                        && b.snapshot.host(host_id).is_some() =>
                {
                    b.clone()
                }
                _ => {
                    let b = Arc::new(Basis::load(ctl, current)?);
                    *slot = Some(b.clone());
                    b
                }
            }
        };
        basis.desired(ctl, host_id, basis.generation)
    }
}

/// The cached images host `host_id` keeps: those its VMs use, and those of the cloud used there
/// within the last `ttl_s` seconds or not recorded yet (an expired or pruned entry has time 0).
pub fn keep_images(
    s: &Snapshot,
    host_id: &str,
    d: &HostDesired,
    cache: &HashMap<(String, String), i64>,
    ttl_s: i64,
) -> Vec<String> {
    let mut keep: Vec<String> = d.vms.iter().map(|v| v.image_sha256.clone()).collect();
    for i in &s.images {
        // Not recorded yet (the host's first reports): kept, its time starts when recorded.
        // Expired or pruned entries have time 0.
        let keep_it = match cache.get(&(host_id.to_string(), i.sha256.clone())) {
            None => true,
            Some(&last) => last > 0 && s.now_unix - last < ttl_s,
        };
        if keep_it {
            keep.push(i.sha256.clone());
        }
    }
    keep.sort();
    keep.dedup();
    keep
}

fn vm_desired(
    s: &Snapshot,
    cloud_id: &str,
    v: &VmRow,
    host_id: &str,
    networks: &HashMap<&str, &NetworkRow>,
) -> Option<VmDesired> {
    let g = s.groups.get(&v.group)?;
    let img = s.images.iter().find(|i| i.sha256 == g.image_sha256)?;
    let nics = s
        .vm_nics(&v.id)
        .filter_map(|n| {
            let net = networks.get(n.network.as_str())?;
            Some(NicDesired {
                network: net.name.clone(),
                bridge: names::bridge_name(net.vni),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
                tap: names::tap_name(&n.mac),
            })
        })
        .collect();
    let size = size_of(v, g);
    Some(VmDesired {
        id: v.id.clone(),
        name: v.name.clone(),
        domain: names::domain_name(cloud_id, &v.name),
        power: v.desired,
        cpus: size.cpus,
        memory_mib: size.memory_mib,
        disk_mib: size.disk_mib,
        max_cpus: v.extra.max_cpus.max(size.cpus),
        volumes: s
            .vm_volumes(&v.id)
            .into_iter()
            .map(volume_desired)
            .collect(),
        resume_seq: v.extra.resume_seq,
        run_once: v.extra.run_once,
        image_sha256: img.sha256.clone(),
        image_file_sha256: img.file_sha256.clone(),
        nics,
        user_data: g.user_data.clone(),
        ssh_keys: g.ssh_keys.clone(),
        // Only a pending request: an agent that restarted must not reboot again.
        reboot_seq: if v.reboot_seq > v.reboot_done {
            v.reboot_seq
        } else {
            0
        },
        force_stop: v.force_stop,
        stop_timeout_s: v.stop_timeout_s,
        migration: crate::migrations::desired_role(s, v, host_id),
    })
}

fn volume_desired(x: &tuchka_store::VolumeRow) -> VolumeDesired {
    VolumeDesired {
        id: x.id.clone(),
        name: x.name.clone(),
        size_mib: x.size_mib,
    }
}

/// The desired state of `host_id` (pure over the snapshot and the rule rows).
pub fn build(
    s: &Snapshot,
    cloud_id: &str,
    host_id: &str,
    generation: u64,
    rules: &[tuchka_store::RuleRow],
    forwards: &[tuchka_store::ForwardRow],
) -> HostDesired {
    build_shared(
        s,
        &Shared::new(s, rules, forwards),
        cloud_id,
        host_id,
        generation,
    )
}

/// What the desired states of all hosts share, computed once per snapshot: who runs what,
/// which hosts each network spans, its DHCP reservations and resolved rules. With it one host's
/// desired state costs time in its own VMs and networks, not in the whole cloud.
pub struct Shared {
    /// Live VMs (indexes into the snapshot's VMs) by the host that runs them or receives them.
    vms_of: HashMap<String, Vec<usize>>,
    /// VMs being deleted by host.
    deleting_of: HashMap<String, Vec<usize>>,
    /// Hosts with a NIC (a VM, or one arriving) on each network.
    net_hosts: HashMap<String, HashSet<String>>,
    /// DHCP reservations of each network, sorted.
    dhcp: HashMap<String, Vec<DhcpHost>>,
    /// Rules and forwards of each live network.
    resolved: HashMap<String, crate::netrules::Resolved>,
    /// Underlay address of each host.
    addresses: HashMap<String, String>,
    /// The cloud's images, sorted.
    images: Vec<String>,
}

impl Shared {
    /// Index `s` (linear in its size).
    pub fn new(
        s: &Snapshot,
        rules: &[tuchka_store::RuleRow],
        forwards: &[tuchka_store::ForwardRow],
    ) -> Shared {
        let mut vms_of: HashMap<String, Vec<usize>> = HashMap::new();
        let mut deleting_of: HashMap<String, Vec<usize>> = HashMap::new();
        // Which hosts each live VM is on: where it is, and where it is going.
        let mut hosts_of: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut names_by_id: HashMap<&str, &str> = HashMap::new();
        for (i, v) in s.vms.iter().enumerate() {
            if v.deleting {
                deleting_of.entry(v.host_id.clone()).or_default().push(i);
                continue;
            }
            let mut hs = vec![v.host_id.as_str()];
            vms_of.entry(v.host_id.clone()).or_default().push(i);
            if let Some(m) = s.migration_of(&v.id) {
                if m.target_host != v.host_id {
                    vms_of.entry(m.target_host.clone()).or_default().push(i);
                    hs.push(m.target_host.as_str());
                }
            }
            hosts_of.insert(v.id.as_str(), hs);
            names_by_id.insert(v.id.as_str(), v.name.as_str());
        }
        let mut net_hosts: HashMap<String, HashSet<String>> = HashMap::new();
        let mut dhcp: HashMap<String, Vec<DhcpHost>> = HashMap::new();
        for n in &s.nics {
            for h in hosts_of.get(n.vm_id.as_str()).into_iter().flatten() {
                net_hosts
                    .entry(n.network.clone())
                    .or_default()
                    .insert(h.to_string());
            }
            if let Some(vm) = names_by_id.get(n.vm_id.as_str()) {
                dhcp.entry(n.network.clone()).or_default().push(DhcpHost {
                    mac: n.mac.clone(),
                    ip: n.ip.clone(),
                    name: vm.to_string(),
                });
            }
        }
        for hosts in dhcp.values_mut() {
            hosts.sort();
        }
        let resolved = s
            .networks
            .iter()
            .filter(|n| !n.deleting)
            .map(|n| {
                let r = crate::netrules::resolve(
                    &n.name,
                    rules,
                    forwards,
                    &s.nics,
                    &s.vms,
                    &s.networks,
                );
                (n.name.clone(), r)
            })
            .collect();
        let mut images: Vec<String> = s.images.iter().map(|i| i.sha256.clone()).collect();
        images.sort();
        images.dedup();
        Shared {
            vms_of,
            deleting_of,
            net_hosts,
            dhcp,
            resolved,
            addresses: s
                .hosts
                .iter()
                .map(|h| (h.id.clone(), h.facts.address.clone()))
                .collect(),
            images,
        }
    }
}

/// The desired state of `host_id` from the snapshot and its [`Shared`] index (pure).
pub fn build_shared(
    s: &Snapshot,
    sh: &Shared,
    cloud_id: &str,
    host_id: &str,
    generation: u64,
) -> HostDesired {
    let networks: HashMap<&str, &NetworkRow> = s
        .networks
        .iter()
        .filter(|n| !n.deleting)
        .map(|n| (n.name.as_str(), n))
        .collect();
    // The VMs this host runs, and those migrating onto it.
    let mut vms = vec![];
    for v in sh
        .vms_of
        .get(host_id)
        .into_iter()
        .flatten()
        .map(|&i| &s.vms[i])
    {
        let Some(d) = vm_desired(s, cloud_id, v, host_id, &networks) else {
            continue;
        };
        // A target whose copy was named for removal plays no part any more.
        if v.host_id != host_id && d.migration.is_none() {
            continue;
        }
        vms.push(d);
    }
    let mut nets_here: HashSet<&str> = networks
        .values()
        .filter(|n| n.gateway_host.as_deref() == Some(host_id))
        .map(|n| n.name.as_str())
        .collect();
    for d in &vms {
        for n in &d.nics {
            nets_here.insert(networks[n.network.as_str()].name.as_str());
        }
    }

    let mut removals: Vec<VmRemoval> = sh
        .deleting_of
        .get(host_id)
        .into_iter()
        .flatten()
        .map(|&i| &s.vms[i])
        .map(|v| VmRemoval {
            id: v.id.clone(),
            name: v.name.clone(),
            domain: names::domain_name(cloud_id, &v.name),
        })
        .collect();
    removals.extend(
        s.removals
            .iter()
            .filter(|r| r.host_id == host_id)
            .map(|r| VmRemoval {
                id: r.vm_id.clone(),
                name: r.name.clone(),
                domain: r.domain.clone(),
            }),
    );

    let empty = HashSet::new();
    let mut out_nets: Vec<NetworkDesired> = nets_here
        .iter()
        .filter_map(|name| networks.get(name))
        .map(|n| {
            let gateway_here = n.gateway_host.as_deref() == Some(host_id);
            let r = sh.resolved.get(&n.name);
            NetworkDesired {
                name: n.name.clone(),
                vni: n.vni,
                bridge: names::bridge_name(n.vni),
                cidr: n.cidr.clone(),
                gateway: crate::networks::gateway_of(n),
                gateway_here,
                mtu: TENANT_MTU,
                // Only the gateway's dnsmasq hands them out: the other hosts are not sent
                // the network's every reservation.
                hosts: match sh.dhcp.get(&n.name) {
                    Some(hosts) if gateway_here => hosts.clone(),
                    _ => vec![],
                },
                nat: n.nat,
                ingress: r.map(|r| r.ingress.clone()).unwrap_or_default(),
                egress: r.map(|r| r.egress.clone()).unwrap_or_default(),
                forwards: match r {
                    Some(r) if gateway_here => r.forwards.clone(),
                    _ => vec![],
                },
                vxlan: vxlan_for(
                    host_id,
                    n,
                    sh.net_hosts.get(n.name.as_str()).unwrap_or(&empty),
                    &sh.addresses,
                ),
            }
        })
        .collect();
    out_nets.sort_by(|a, b| a.name.cmp(&b.name));
    let peers = s
        .hosts
        .iter()
        .filter(|h| h.id != host_id && !h.revoked && !h.facts.address.is_empty())
        .map(|h| PeerHost {
            host_id: h.id.clone(),
            name: h.name.clone(),
            address: h.facts.address.clone(),
            channel_port: h.facts.channel_port,
        })
        .collect();
    let volumes = s
        .volumes
        .iter()
        .filter(|x| x.host_id == host_id && !x.deleting)
        .map(volume_desired)
        .collect();
    // Removed here: volumes being deleted, and this host's copies of the volumes of a VM it
    // must remove that now live on another host (it moved away, or a copy here failed).
    let leaving: Vec<&str> = s
        .removals
        .iter()
        .filter(|r| r.host_id == host_id)
        .map(|r| r.vm_id.as_str())
        .collect();
    let volume_removals = s
        .volumes
        .iter()
        .filter(|x| {
            (x.host_id == host_id && x.deleting)
                || (x.host_id != host_id
                    && x.vm_id.as_deref().is_some_and(|id| leaving.contains(&id)))
        })
        .map(|x| x.id.clone())
        .collect();
    let captures = s
        .captures
        .iter()
        .filter(|x| {
            x.host_id == host_id
                && matches!(x.status, CaptureStatus::Copying | CaptureStatus::Uploading)
        })
        .map(|x| CaptureDesired {
            id: x.id.clone(),
            image: x.image.clone(),
            vm_id: x.vm_id.clone(),
            domain: names::domain_name(cloud_id, &x.vm_name),
        })
        .collect();
    HostDesired {
        generation,
        cloud_id: cloud_id.to_string(),
        vms,
        networks: out_nets,
        images: sh.images.clone(),
        removals,
        peers,
        volumes,
        volume_removals,
        captures,
    }
}

/// The VXLAN segment of network `n` seen from `host_id`: every other host that has a VM on it
/// (or one arriving) or is its gateway is a peer. None when this host has no underlay address
/// or no peer.
fn vxlan_for(
    host_id: &str,
    n: &NetworkRow,
    hosts_with_nics: &HashSet<String>,
    addresses: &HashMap<String, String>,
) -> Option<VxlanDesired> {
    let local = addresses
        .get(host_id)
        .filter(|a| !a.is_empty())?
        .to_string();
    let mut hosts: HashSet<&str> = hosts_with_nics.iter().map(String::as_str).collect();
    if let Some(g) = &n.gateway_host {
        hosts.insert(g);
    }
    let mut peers: Vec<String> = hosts
        .into_iter()
        .filter(|h| *h != host_id)
        .filter_map(|h| {
            addresses
                .get(h)
                .filter(|a| !a.is_empty())
                .map(|a| a.to_string())
        })
        .collect();
    peers.sort();
    peers.dedup();
    (!peers.is_empty()).then_some(VxlanDesired {
        local,
        port: VXLAN_PORT,
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::NetworkState;

    fn net(gateway: &str) -> NetworkRow {
        NetworkRow {
            name: "app".into(),
            cidr: "10.91.0.0/24".into(),
            vni: 5000,
            gateway_host: Some(gateway.into()),
            state: NetworkState::Ready,
            error: None,
            deleting: false,
            created_at: String::new(),
            nat: false,
            gateway: None,
            gateway_moved_from: None,
            gateway_moved_at: None,
        }
    }

    #[test]
    fn vxlan_peers_are_the_other_hosts_of_the_network() {
        let addrs: HashMap<String, String> = [
            ("h1", "10.250.0.11"),
            ("h2", "10.250.0.12"),
            ("h3", "10.250.0.13"),
        ]
        .into_iter()
        .map(|(h, a)| (h.to_string(), a.to_string()))
        .collect();
        let on_app: HashSet<String> = ["h2".to_string()].into_iter().collect();
        let v =
            vxlan_for("h2", &net("h1"), &on_app, &addrs).expect("h2 has a peer: the gateway h1");
        assert_eq!(v.local, "10.250.0.12");
        assert_eq!(v.peers, vec!["10.250.0.11"]);
        assert_eq!(v.port, 4789);
        let v = vxlan_for("h1", &net("h1"), &on_app, &addrs).expect("h1 sees h2");
        assert_eq!(v.peers, vec!["10.250.0.12"]);
        assert_eq!(
            vxlan_for("h3", &net("h3"), &HashSet::new(), &addrs),
            None,
            "alone on the network: no VXLAN"
        );
        let mut no_addr = addrs.clone();
        no_addr.insert("h2".into(), String::new());
        assert_eq!(
            vxlan_for("h2", &net("h1"), &on_app, &no_addr),
            None,
            "a single-host cloud has no underlay address"
        );
    }
}
