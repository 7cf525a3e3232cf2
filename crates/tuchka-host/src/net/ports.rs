//! VM ports on bridges. libvirt plugs a VM's tap into its bridge when the domain starts; if the
//! bridge is deleted and recreated under a running VM, the tap is left unplugged. The agent calls
//! [`ensure_port`] for every NIC of a running VM on each pass to plug it back.

use std::path::Path;

use crate::cmd;
use crate::HostError;

/// The bridge a link is enslaved to, from sysfs (`None`: not enslaved or no such link).
pub fn master_of(link: &str) -> Option<String> {
    let target = std::fs::read_link(Path::new("/sys/class/net").join(link).join("master")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Plug `tap` into `bridge` if it exists and is elsewhere or nowhere. Returns whether it had to.
pub fn ensure_port(bridge: &str, tap: &str) -> Result<bool, HostError> {
    if !Path::new("/sys/class/net").join(tap).exists()
        || !Path::new("/sys/class/net").join(bridge).exists()
    {
        return Ok(false);
    }
    if master_of(tap).as_deref() == Some(bridge) {
        return Ok(false);
    }
    let err = |e: crate::cmd::CommandError| {
        HostError::invalid(format!("tap {tap} on bridge {bridge}"), e.to_string())
    };
    cmd::run("ip", &["link", "set", "dev", tap, "master", bridge], None).map_err(err)?;
    cmd::run("ip", &["link", "set", "dev", tap, "up"], None).map_err(err)?;
    tracing::info!(tap, bridge, "plugged a VM tap back into its bridge");
    Ok(true)
}
