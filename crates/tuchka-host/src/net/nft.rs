//! The cloud's isolation firewall: render (pure) then apply (`nft -f -`, one transaction).
//!
//! One table per cloud, `table inet tk_<cloud8>`. The script declares the table, deletes it and
//! re-adds it in full, so applying it is atomic and idempotent and removes stale rules. For each
//! bridge of this cloud on this host:
//!
//! - forward: traffic routed from the bridge to any other interface, or from any other interface
//!   to the bridge, is dropped — networks cannot reach each other and nothing is routed out.
//!   Bridged traffic between ports of the same bridge (`iifname == oifname == bridge` when
//!   br_netfilter is active) is left alone.
//! - input: from the bridge the host accepts replies to its own connections, DHCP (udp 67),
//!   DNS (udp/tcp 53) and ping; everything else from the bridge to the host is dropped.
//!
//! With no bridges the script only deletes the table.

use crate::cmd;

/// What the firewall is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallModel {
    /// First 8 hex chars of the cloud id.
    pub cloud8: String,
    /// Bridges of this cloud on this host (validated interface names).
    pub bridges: Vec<String>,
}

/// `tk_<cloud8>`.
pub fn table_name(cloud8: &str) -> String {
    format!("tk_{cloud8}")
}

/// Quote an interface name for nft (names are validated; quotes and backslashes are dropped
/// defensively).
fn q(name: &str) -> String {
    let clean: String = name.chars().filter(|c| *c != '"' && *c != '\\').collect();
    format!("\"{clean}\"")
}

/// Render the complete nft script for `model` (pure).
pub fn render_firewall(model: &FirewallModel) -> String {
    let table = table_name(&model.cloud8);
    let mut bridges = model.bridges.clone();
    bridges.sort();
    bridges.dedup();
    let mut s = format!("table inet {table}\ndelete table inet {table}\n");
    if bridges.is_empty() {
        return s;
    }
    s.push_str(&format!("table inet {table} {{\n"));
    s.push_str("\tchain forward {\n");
    s.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    for b in &bridges {
        let b = q(b);
        s.push_str(&format!("\t\tiifname {b} oifname != {b} drop\n"));
        s.push_str(&format!("\t\toifname {b} iifname != {b} drop\n"));
    }
    s.push_str("\t}\n");
    s.push_str("\tchain input {\n");
    s.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
    for b in &bridges {
        let b = q(b);
        s.push_str(&format!(
            "\t\tiifname {b} ct state established,related accept\n"
        ));
        s.push_str(&format!("\t\tiifname {b} udp dport 67 accept\n"));
        s.push_str(&format!("\t\tiifname {b} udp dport 53 accept\n"));
        s.push_str(&format!("\t\tiifname {b} tcp dport 53 accept\n"));
        s.push_str(&format!("\t\tiifname {b} icmp type echo-request accept\n"));
        s.push_str(&format!("\t\tiifname {b} drop\n"));
    }
    s.push_str("\t}\n");
    s.push_str("}\n");
    s
}

/// Apply a rendered script in one `nft -f -` transaction.
pub fn apply(script: &str) -> Result<(), cmd::CommandError> {
    cmd::run("nft", &["-f", "-"], Some(script.as_bytes())).map(drop)
}
