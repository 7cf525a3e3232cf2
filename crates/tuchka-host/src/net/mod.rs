//! The dataplane of one host: per network a bridge `tk<vni>`, when the network spans hosts a
//! VXLAN port `vx<vni>` on it with one flood FDB entry per other host ([`vxlan`]), on the
//! network's gateway host the gateway address and a dnsmasq, and the cloud's firewall, NAT and
//! port forwards (one nftables table per cloud, see [`nft`]), plus `net.ipv4.ip_forward`
//! ([`forwarding`]). The same table admits the ports between hosts (migration channel, VXLAN)
//! only from the cloud's other hosts ([`underlay`]).
//!
//! State lives in `<pool>/net/<network>/`: `network.json` (the last desired state applied — it
//! is also how [`Dataplane::networks`] and the firewall know which networks are ours) and the
//! dnsmasq files; and in `<pool>/net/underlay.json` (the last [`Underlay`] applied, part of
//! every later firewall apply). [`Dataplane::ensure_network`] converges in this order —
//! validate (rules included: a bad rule changes nothing), state dir, firewall (rendered from
//! every network of the cloud on this host with the new desired state in place of the stored
//! one; so a bridge never exists unprotected — nft matches interface names, present or not),
//! `network.json`, `ip_forward`, bridge, address, VXLAN device and FDB, dnsmasq — and rolls
//! back what it created itself when a later step fails. [`Dataplane::ensure_underlay`] renders
//! the firewall with the new underlay, then records it. The firewall is applied only when the
//! rendered script or the kernel's table differs from what the last apply left; an unchanged
//! pass costs a netlink round trip (one `nft list table` when something else was committed
//! meanwhile), see [`nft::ensure`].

pub mod dnsmasq;
pub mod forwarding;
pub mod guard;
pub mod links;
pub mod listening;
pub mod nfgen;
pub mod nft;
pub mod ports;
pub mod rules;
pub mod underlay;
pub mod vxlan;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tuchka_api::agent::NetworkDesired;
use tuchka_core::ipam::Cidr;
use tuchka_core::names::cloud8;

use self::dnsmasq::{DnsmasqConfig, DnsmasqFiles, DnsmasqUser};
use self::forwarding::IpForward;
use self::nft::{Applied, Firewall, FirewallError, FirewallModel, NftFirewall};
use self::rules::NetRules;
pub use self::underlay::Underlay;
use self::vxlan::VxlanPlan;
use crate::domain_xml::is_ifname;
use crate::storage::write_atomic;
use crate::HostError;

/// Networks of one cloud on one host. Synchronous: call from a blocking thread.
pub trait Dataplane: Send + Sync {
    /// Idempotently make the network exist on this host (bridge with STP off, forward delay 0
    /// and the MTU; a VXLAN port `vx<vni>` with one flood FDB entry per peer when `vxlan` has
    /// peers, none otherwise; on the gateway host also the gateway address and a dnsmasq with
    /// the reservations), and re-apply the cloud's firewall. Rolls back what this call created
    /// when a later step fails.
    fn ensure_network(&self, net: &NetworkDesired) -> Result<(), HostError>;
    /// Stop the network's dnsmasq, delete its VXLAN device, bridge and state directory,
    /// re-apply the firewall. Ok if absent.
    fn remove_network(&self, name: &str) -> Result<(), HostError>;
    /// Names of this cloud's networks present on this host.
    fn networks(&self) -> Result<Vec<String>, HostError>;
    /// Plug a running VM's tap back into its bridge if it is not on it (after the bridge was
    /// deleted and recreated). Returns whether it had to. Ok(false) when the tap does not exist.
    fn ensure_port(&self, bridge: &str, tap: &str) -> Result<bool, HostError>;
    /// Admit the ports between hosts — the migration channel (TCP) and VXLAN (UDP) — only from
    /// `underlay.peers` (the cloud's other hosts' underlay addresses; the channel also from
    /// loopback) and drop them from anyone else; nothing else on the host is filtered. The
    /// underlay is recorded, so every later firewall apply (and a restarted agent) keeps it,
    /// and the firewall is applied now when that changes it. Idempotent. Refused, with nothing
    /// changed, when it is invalid or a network's forward uses one of its ports.
    fn ensure_underlay(&self, underlay: &Underlay) -> Result<(), HostError>;
}

/// A network's validated, parsed desired state (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Network name.
    pub name: String,
    /// Bridge name.
    pub bridge: String,
    /// The network.
    pub net: Cidr,
    /// Gateway address.
    pub gateway: Ipv4Addr,
    /// MTU.
    pub mtu: u32,
    /// Access rules, NAT and forwards.
    pub rules: NetRules,
    /// The VXLAN port to other hosts (`None`: no other host, no device).
    pub vxlan: Option<VxlanPlan>,
}

impl NetPlan {
    /// Validate `d` (names, CIDR, gateway inside it, MTU, reservations, rules and forwards,
    /// VXLAN addresses).
    pub fn from_desired(d: &NetworkDesired) -> Result<Self, String> {
        if !dnsmasq::is_hostname(&d.name) {
            return Err(
                "name must be 1-63 of [A-Za-z0-9-] (it is also the DNS domain)".to_string(),
            );
        }
        if !is_ifname(&d.bridge) || d.bridge.contains(['"', '\\', '*']) {
            return Err(format!(
                "bridge name {:?} is not a valid interface name (1-15 chars, no quotes, \\ or *)",
                d.bridge
            ));
        }
        let net: Cidr = d.cidr.parse().map_err(|e| format!("cidr: {e}"))?;
        let gw_text = d.gateway.split('/').next().unwrap_or_default();
        let gateway: Ipv4Addr = gw_text
            .parse()
            .map_err(|_| format!("gateway {:?} is not an IPv4 address", d.gateway))?;
        if !net.contains(gateway) || gateway == net.network() {
            return Err(format!("gateway {gateway} is not a host address of {net}"));
        }
        if !(68..=65535).contains(&d.mtu) {
            return Err(format!("MTU {} is out of range 68..65535", d.mtu));
        }
        dnsmasq::validate_hosts(&net, &d.hosts)?;
        let rules = NetRules::from_desired(d, net)?;
        let vxlan =
            VxlanPlan::from_desired(d.vni, d.vxlan.as_ref()).map_err(|m| format!("vxlan: {m}"))?;
        Ok(NetPlan {
            name: d.name.clone(),
            bridge: d.bridge.clone(),
            net,
            gateway,
            mtu: d.mtu,
            rules,
            vxlan,
        })
    }
}

/// [`Dataplane`] on the Linux host (rtnetlink, dnsmasq, nftables).
#[derive(Debug)]
pub struct LinuxDataplane {
    net_root: PathBuf,
    cloud_id: String,
    cloud8: String,
    firewall: Box<dyn Firewall>,
    ip_forward: IpForward,
    /// Who dnsmasq runs as.
    dnsmasq_user: DnsmasqUser,
    /// Bound of each dnsmasq log, bytes (see [`dnsmasq`]).
    log_limit: u64,
    /// Serialises changes (the firewall is rendered from all networks' state) and remembers
    /// what the last firewall apply left in the kernel.
    lock: Mutex<Option<Applied>>,
}

/// What one `ensure_network` call created, for rollback.
#[derive(Debug, Default)]
struct Created {
    dir: bool,
    bridge: bool,
    vxlan: bool,
    dnsmasq: bool,
}

impl LinuxDataplane {
    /// The dataplane of cloud `cloud_id`, keeping its state in `<pool>/net/`.
    pub fn new(pool: &Path, cloud_id: &str) -> Self {
        Self::with_firewall(pool, cloud_id, Box::new(NftFirewall::new()))
    }

    /// Like [`LinuxDataplane::new`], applying the ruleset through `firewall`.
    pub fn with_firewall(pool: &Path, cloud_id: &str, firewall: Box<dyn Firewall>) -> Self {
        let net_root = pool.join("net");
        LinuxDataplane {
            ip_forward: IpForward::new(&net_root),
            net_root,
            cloud_id: cloud_id.to_string(),
            cloud8: cloud8(cloud_id),
            firewall,
            dnsmasq_user: DnsmasqUser::detect(),
            log_limit: dnsmasq::DEFAULT_LOG_LIMIT,
            lock: Mutex::new(None),
        }
    }

    /// Bound each network's dnsmasq log to `bytes` instead of [`dnsmasq::DEFAULT_LOG_LIMIT`]
    /// (it applies to a dnsmasq started from now on; the rotation at once).
    pub fn with_dnsmasq_log_limit(mut self, bytes: u64) -> Self {
        self.log_limit = bytes;
        self
    }

    /// Name of this cloud's nft table (`tk_<cloud8>`).
    pub fn table_name(&self) -> String {
        nft::table_name(&self.cloud8)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.net_root.join(name)
    }

    /// The alias marking the bridge of network `name` as ours.
    fn owner(&self, name: &str) -> String {
        links::owner_alias(&self.cloud_id, name)
    }

    fn underlay_path(&self) -> PathBuf {
        self.net_root.join("underlay.json")
    }

    /// The underlay recorded by the last [`Dataplane::ensure_underlay`]; `None` when there is
    /// none (or it no longer validates: warned).
    fn read_underlay(&self) -> Option<Underlay> {
        let text = std::fs::read_to_string(self.underlay_path()).ok()?;
        let parsed = serde_json::from_str::<Underlay>(&text)
            .map_err(|e| e.to_string())
            .and_then(|u| u.normalized());
        match parsed {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(path = %self.underlay_path().display(), error = %e, "stored underlay left out of the firewall");
                None
            }
        }
    }

    fn read_state(&self, name: &str) -> Option<NetworkDesired> {
        let text = std::fs::read_to_string(self.dir(name).join("network.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn list_dirs(&self) -> Result<Vec<String>, HostError> {
        let obj = format!("networks in {}", self.net_root.display());
        let entries = match std::fs::read_dir(&self.net_root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io(obj, "list", &self.net_root, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| HostError::io(&obj, "list", &self.net_root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) && dnsmasq::is_hostname(&name)
            {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The firewall model: the underlay (`underlay` if given, else the stored one), every
    /// stored network except `skip`, then `desired` (if any) in place of its stored state. A
    /// stored network that no longer validates or clashes is left out with a warning — except
    /// that a clash with a given `underlay` is an error, as is a clash of `desired`.
    fn model(
        &self,
        skip: Option<&str>,
        desired: Option<&NetPlan>,
        underlay: Option<&Underlay>,
    ) -> Result<FirewallModel, HostError> {
        let mut model = FirewallModel::new(&self.cloud8);
        let stored_underlay = match underlay {
            Some(_) => None,
            None => self.read_underlay(),
        };
        if let Some(u) = underlay.or(stored_underlay.as_ref()) {
            model
                .set_underlay(u)
                .map_err(|m| HostError::invalid(UNDERLAY, m))?;
        }
        for name in self.list_dirs()? {
            if Some(name.as_str()) == skip || desired.is_some_and(|d| d.name == name) {
                continue;
            }
            let Some(stored) = self.read_state(&name) else {
                continue;
            };
            let plan = match NetPlan::from_desired(&stored) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "stored network left out of the firewall");
                    continue;
                }
            };
            // A new underlay must not silently knock a network out of the firewall.
            if let Some(clash) = underlay.and_then(|u| nft::forward_on_underlay(u, &plan.rules)) {
                return Err(HostError::invalid(UNDERLAY, clash));
            }
            if let Err(e) = model.add(plan.rules) {
                tracing::warn!(network = %name, error = %e, "stored network left out of the firewall");
            }
        }
        if let Some(d) = desired {
            model
                .add(d.rules.clone())
                .map_err(|m| HostError::invalid(format!("network {}", d.name), m))?;
        }
        Ok(model)
    }

    /// Render `model`, apply it if the kernel does not already hold it, then converge
    /// `ip_forward`. `object` names what the caller is changing (`network blue`, `underlay`).
    fn apply_firewall(
        &self,
        last: &mut Option<Applied>,
        model: &FirewallModel,
        object: &str,
    ) -> Result<(), HostError> {
        let script = nft::render_firewall(model);
        let object = object.to_string();
        match nft::ensure(self.firewall.as_ref(), &self.table_name(), &script, last) {
            Ok(applied) => {
                if applied {
                    tracing::debug!(%object, "firewall applied");
                }
            }
            Err(FirewallError::List(source)) => {
                return Err(HostError::Tool {
                    object,
                    action: "read the firewall (nft list table)",
                    source,
                })
            }
            Err(FirewallError::Apply(source)) => {
                return Err(HostError::Tool {
                    object,
                    action: "apply the firewall (nft -f; the previous ruleset stays in place)",
                    source,
                })
            }
        }
        let ours = self.table_name();
        let others_need = || match self.firewall.tables_with_chain(nft::FORWARDING_MARKER) {
            Ok(tables) => tables.iter().any(|t| *t != ours),
            // Unknown: keep routing rather than cut another cloud off.
            Err(e) => {
                tracing::warn!(error = %e, "cannot list other clouds' firewalls");
                true
            }
        };
        self.ip_forward
            .ensure(model.needs_forwarding(), others_need)
            .map_err(|e| match e {
                forwarding::ForwardingError::Io {
                    action,
                    path,
                    source,
                } => HostError::io(object, action, path, source),
            })?;
        Ok(())
    }

    fn link_err(
        name: &str,
        action: impl Into<String>,
    ) -> impl FnOnce(links::LinkError) -> HostError {
        let name = name.to_string();
        let action = action.into();
        move |source| HostError::Link {
            name,
            action,
            source,
        }
    }

    fn converge(
        &self,
        last: &mut Option<Applied>,
        d: &NetworkDesired,
        plan: &NetPlan,
        created: &mut Created,
    ) -> Result<(), HostError> {
        let obj = format!("network {}", d.name);
        let dir = self.dir(&d.name);
        std::fs::create_dir_all(&self.net_root)
            .map_err(|e| HostError::io(&obj, "create", &self.net_root, e))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => created.dir = true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(HostError::io(&obj, "create", &dir, e)),
        }
        let files = DnsmasqFiles::in_dir(&dir);

        // A renamed bridge: retire the old one first.
        let previous = self.read_state(&d.name);
        let adopt_unmarked = previous.as_ref().is_some_and(|p| p.bridge == d.bridge);
        if let Some(old) = &previous {
            if old.bridge != d.bridge {
                dnsmasq::stop(&files).map_err(|e| dhcp_err(&obj, e))?;
                links::delete_link(&old.bridge, &self.owner(&d.name)).map_err(Self::link_err(
                    &d.name,
                    format!("delete old bridge {}", old.bridge),
                ))?;
            }
        }
        // The firewall first, from the new desired state; only once the kernel took it is
        // the state recorded (a refused ruleset leaves the previous state and ruleset).
        let model = self.model(None, Some(plan), None)?;
        self.apply_firewall(last, &model, &obj)?;
        let json = serde_json::to_string_pretty(d)
            .map_err(|e| HostError::invalid(&obj, format!("cannot serialise: {e}")))?;
        write_if_changed(&dir.join("network.json"), &json, &obj)?;

        created.bridge =
            links::ensure_bridge(&plan.bridge, plan.mtu, &self.owner(&d.name), adopt_unmarked)
                .map_err(Self::link_err(
                    &d.name,
                    format!("create bridge {}", plan.bridge),
                ))?;
        let role = if d.gateway_here {
            "gateway".to_string()
        } else {
            format!("host {}", host_name())
        };
        links::set_mac(&plan.bridge, links::bridge_mac(&self.owner(&d.name), &role)).map_err(
            Self::link_err(&d.name, format!("set the MAC of bridge {}", plan.bridge)),
        )?;
        let addr = d.gateway_here.then_some((plan.gateway, plan.net.prefix()));
        links::set_ipv4(&plan.bridge, addr).map_err(Self::link_err(
            &d.name,
            format!("set the address of bridge {}", plan.bridge),
        ))?;
        self.converge_vxlan(d, plan, previous.as_ref(), created)?;

        if !d.gateway_here {
            dnsmasq::stop(&files).map_err(|e| dhcp_err(&obj, e))?;
            return Ok(());
        }
        let hosts_changed = write_if_changed(
            &files.dhcp_hosts,
            &dnsmasq::render_dhcp_hosts(&d.hosts),
            &obj,
        )?;
        let addn_changed = write_if_changed(
            &files.addn_hosts,
            &dnsmasq::render_addn_hosts(&d.hosts, &d.name),
            &obj,
        )?;
        let cfg = DnsmasqConfig {
            domain: d.name.clone(),
            bridge: plan.bridge.clone(),
            net: plan.net,
            gateway: plan.gateway,
            files: files.clone(),
            user: self.dnsmasq_user.clone(),
        };
        let args = dnsmasq::dnsmasq_args(&cfg);
        let file_limit = dnsmasq::file_limit(self.log_limit, &plan.net);
        match dnsmasq::running(&files) {
            Some((_, running_args)) if running_args != args => {
                tracing::info!(network = %d.name, "dnsmasq arguments changed; restarting it");
                dnsmasq::stop(&files).map_err(|e| dhcp_err(&obj, e))?;
                dnsmasq::start(&files, &args, file_limit).map_err(|e| dhcp_err(&obj, e))?;
            }
            Some((pid, _)) => {
                let leases = std::fs::read_to_string(&files.leases).unwrap_or_default();
                let (_, stale) = dnsmasq::without_stale_leases(&leases, &d.hosts);
                if hosts_changed && stale > 0 {
                    // dnsmasq keeps its leases in memory: restart it on the cleaned file.
                    tracing::info!(network = %d.name, stale, "dropping leases of removed VMs; restarting dnsmasq");
                    dnsmasq::stop(&files).map_err(|e| dhcp_err(&obj, e))?;
                    let leases = std::fs::read_to_string(&files.leases).unwrap_or_default();
                    let (kept, _) = dnsmasq::without_stale_leases(&leases, &d.hosts);
                    std::fs::write(&files.leases, kept).map_err(|e| {
                        dhcp_err(
                            &obj,
                            dnsmasq::DnsmasqError::Io {
                                path: files.leases.clone(),
                                source: e,
                            },
                        )
                    })?;
                    dnsmasq::start(&files, &args, file_limit).map_err(|e| dhcp_err(&obj, e))?;
                } else {
                    if hosts_changed || addn_changed {
                        dnsmasq::reload(pid).map_err(|e| dhcp_err(&obj, e))?;
                    }
                    if dnsmasq::rotate_log(&files, pid, self.log_limit / 2)
                        .map_err(|e| dhcp_err(&obj, e))?
                    {
                        tracing::info!(network = %d.name, "dnsmasq log rotated");
                    }
                }
            }
            None => {
                dnsmasq::start(&files, &args, file_limit).map_err(|e| dhcp_err(&obj, e))?;
                created.dnsmasq = true;
            }
        }
        Ok(())
    }

    /// The VXLAN step of [`Self::converge`]: retire the device of a previous VNI, then make
    /// `vx<vni>` match the plan (or not exist when the plan has none). `previous` is the state
    /// stored before this call: an unmarked device is adopted only when it says we made one.
    fn converge_vxlan(
        &self,
        d: &NetworkDesired,
        plan: &NetPlan,
        previous: Option<&NetworkDesired>,
        created: &mut Created,
    ) -> Result<(), HostError> {
        let owner = self.owner(&d.name);
        let had_device = |p: &NetworkDesired| vxlan::has_device(p.vxlan.as_ref());
        if let Some(old) = previous.filter(|p| p.vni != d.vni) {
            let name = vxlan::device_name(old.vni);
            vxlan::delete_vxlan(&name, &owner, had_device(old)).map_err(vxlan_err(
                &d.name,
                format!("delete old VXLAN device {name}"),
            ))?;
        }
        let adopt_unmarked = previous.is_some_and(|p| p.vni == d.vni && had_device(p));
        match &plan.vxlan {
            Some(v) => {
                let outcome =
                    vxlan::ensure_vxlan(v, &plan.bridge, plan.mtu, &owner, adopt_unmarked)
                        .map_err(vxlan_err(
                            &d.name,
                            format!("set up VXLAN device {} on bridge {}", v.device, plan.bridge),
                        ))?;
                created.vxlan = outcome.created;
            }
            None => {
                let name = vxlan::device_name(d.vni);
                vxlan::delete_vxlan(&name, &owner, adopt_unmarked)
                    .map_err(vxlan_err(&d.name, format!("delete VXLAN device {name}")))?;
            }
        }
        Ok(())
    }

    /// Undo what `created` says this call made; best effort, errors are logged.
    fn rollback(&self, last: &mut Option<Applied>, d: &NetworkDesired, created: &Created) {
        let dir = self.dir(&d.name);
        if created.dnsmasq {
            if let Err(e) = dnsmasq::stop(&DnsmasqFiles::in_dir(&dir)) {
                tracing::warn!(network = %d.name, error = %e, "rollback: cannot stop dnsmasq");
            }
        }
        if created.vxlan {
            let name = vxlan::device_name(d.vni);
            if let Err(e) = vxlan::delete_vxlan(&name, &self.owner(&d.name), true) {
                tracing::warn!(network = %d.name, error = %e, "rollback: cannot delete VXLAN device");
            }
        }
        if created.bridge {
            if let Err(e) = links::delete_link(&d.bridge, &self.owner(&d.name)) {
                tracing::warn!(network = %d.name, error = %e, "rollback: cannot delete bridge");
            }
        }
        if created.dir {
            let _ = std::fs::remove_dir_all(&dir);
            let reapplied = self
                .model(Some(&d.name), None, None)
                .and_then(|m| self.apply_firewall(last, &m, &object_for(&d.name)));
            if let Err(e) = reapplied {
                tracing::warn!(network = %d.name, error = %e.chain(), "rollback: cannot re-apply firewall");
            }
        }
    }
}

/// The object of messages about the ports between hosts.
const UNDERLAY: &str = "underlay (migration channel and VXLAN ports)";

/// `network <name>`, the object of messages about a network.
fn object_for(name: &str) -> String {
    format!("network {name}")
}

/// Map a [`vxlan::VxlanError`] of network `name` while doing `action`.
fn vxlan_err(name: &str, action: String) -> impl FnOnce(vxlan::VxlanError) -> HostError {
    let network = name.to_string();
    move |source| HostError::Vxlan {
        network,
        action,
        source: Box::new(source),
    }
}

fn dhcp_err(obj: &str, source: dnsmasq::DnsmasqError) -> HostError {
    let network = obj.strip_prefix("network ").unwrap_or(obj).to_string();
    HostError::Dhcp { network, source }
}

/// Write `content` to `path` unless it already holds exactly that; returns whether it wrote.
fn write_if_changed(path: &Path, content: &str, obj: &str) -> Result<bool, HostError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(false);
    }
    write_atomic(path, content.as_bytes(), 0o644, obj)?;
    Ok(true)
}

impl Dataplane for LinuxDataplane {
    fn ensure_network(&self, net: &NetworkDesired) -> Result<(), HostError> {
        let plan = NetPlan::from_desired(net)
            .map_err(|m| HostError::invalid(format!("network {:?}", net.name), m))?;
        let mut last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut created = Created::default();
        let result = self.converge(&mut last, net, &plan, &mut created);
        if result.is_err() {
            self.rollback(&mut last, net, &created);
        }
        result
    }

    fn remove_network(&self, name: &str) -> Result<(), HostError> {
        if !dnsmasq::is_hostname(name) {
            return Err(HostError::invalid(
                format!("network {name:?}"),
                "not a valid network name",
            ));
        }
        let mut last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let obj = format!("network {name}");
        let dir = self.dir(name);
        if !dir.exists() {
            return Ok(());
        }
        dnsmasq::stop(&DnsmasqFiles::in_dir(&dir)).map_err(|e| dhcp_err(&obj, e))?;
        if let Some(state) = self.read_state(name) {
            let device = vxlan::device_name(state.vni);
            let had_device = vxlan::has_device(state.vxlan.as_ref());
            vxlan::delete_vxlan(&device, &self.owner(name), had_device)
                .map_err(vxlan_err(name, format!("delete VXLAN device {device}")))?;
            links::delete_link(&state.bridge, &self.owner(name)).map_err(Self::link_err(
                name,
                format!("delete bridge {}", state.bridge),
            ))?;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| HostError::io(&obj, "remove", &dir, e))?;
        let model = self.model(Some(name), None, None)?;
        self.apply_firewall(&mut last, &model, &obj)
    }

    fn networks(&self) -> Result<Vec<String>, HostError> {
        self.list_dirs()
    }

    fn ensure_port(&self, bridge: &str, tap: &str) -> Result<bool, HostError> {
        ports::ensure_port(bridge, tap)
    }

    fn ensure_underlay(&self, underlay: &Underlay) -> Result<(), HostError> {
        let underlay = underlay
            .normalized()
            .map_err(|m| HostError::invalid(UNDERLAY, m))?;
        let mut last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // The firewall first; only once the kernel took it is the underlay recorded.
        let model = self.model(None, None, Some(&underlay))?;
        self.apply_firewall(&mut last, &model, UNDERLAY)?;
        std::fs::create_dir_all(&self.net_root)
            .map_err(|e| HostError::io(UNDERLAY, "create", &self.net_root, e))?;
        let json = serde_json::to_string_pretty(&underlay)
            .map_err(|e| HostError::invalid(UNDERLAY, format!("cannot serialise: {e}")))?;
        write_if_changed(&self.underlay_path(), &json, UNDERLAY)?;
        Ok(())
    }
}

/// This machine's host name (of its UTS namespace), for the MAC of bridges it is not the
/// gateway of ([`links::bridge_mac`]); empty if unreadable.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::agent::DhcpHost;

    fn desired() -> NetworkDesired {
        NetworkDesired {
            name: "blue".into(),
            vni: 100,
            bridge: "tk100".into(),
            cidr: "10.10.0.0/24".into(),
            gateway: "10.10.0.1".into(),
            gateway_here: true,
            mtu: 1450,
            hosts: vec![DhcpHost {
                mac: "52:54:00:00:00:01".into(),
                ip: "10.10.0.5".into(),
                name: "web-0".into(),
            }],
            nat: false,
            ingress: vec![],
            egress: vec![],
            forwards: vec![],
            vxlan: None,
        }
    }

    #[test]
    fn plan_accepts_a_good_network() {
        let p = NetPlan::from_desired(&desired()).expect("valid");
        assert_eq!(p.gateway, Ipv4Addr::new(10, 10, 0, 1));
        assert_eq!(p.net.prefix(), 24);
    }

    #[test]
    fn a_cloud_id_that_is_not_a_uuid_names_domains_and_the_table_alike() {
        let dir = std::env::temp_dir().join("tuchka-no-such-pool");
        for cloud in ["e2e-cloud", "x", "0f2a6c1e-0000-4000-8000-000000000001"] {
            let table = LinuxDataplane::new(&dir, cloud).table_name();
            let domain = tuchka_core::names::domain_name(cloud, "web-0");
            let from_table = table.strip_prefix("tk_").expect("tk_ prefix");
            let from_domain = domain
                .strip_prefix("tk-")
                .and_then(|d| d.strip_suffix("-web-0"))
                .expect("tk-<cloud8>-<vm>");
            assert_eq!(from_table, from_domain, "cloud id {cloud:?}");
            assert_eq!(from_table.len(), 8, "cloud id {cloud:?}");
            assert_eq!(
                crate::cloud8(cloud),
                from_table,
                "the re-export is the same"
            );
        }
    }

    #[test]
    fn plan_refuses_bad_input() {
        let bad = |f: fn(&mut NetworkDesired)| {
            let mut d = desired();
            f(&mut d);
            NetPlan::from_desired(&d).is_err()
        };
        assert!(bad(|d| d.name = "../x".into()));
        assert!(bad(|d| d.bridge = "a-bridge-name-too-long".into()));
        assert!(bad(|d| d.gateway = "10.11.0.1".into()));
        assert!(bad(|d| d.gateway = "10.10.0.0".into()));
        assert!(bad(|d| d.cidr = "10.10.0.0".into()));
        assert!(bad(|d| d.mtu = 10));
        assert!(bad(|d| d.bridge = "tk\"1".into()));
        assert!(bad(|d| d.bridge = "tk*".into()));
        assert!(bad(|d| d.forwards.push(
            tuchka_api::agent::ForwardDesired {
                id: "f".into(),
                proto: "tcp".parse().expect("proto"),
                host_port: 8080,
                vm_ip: "10.99.0.5".into(),
                vm_port: 80,
            }
        )));
    }
}
