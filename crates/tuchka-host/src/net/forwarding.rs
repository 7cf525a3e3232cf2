//! `net.ipv4.ip_forward` of the host's network namespace: on while any network of this cloud on
//! this host needs the host to route (NAT, forwards, ingress or egress-allow rules on its
//! gateway host), and back to what it was once none does.
//!
//! Protocol: when we turn it on, the value it had before (`0`) is recorded in
//! `<pool>/net/ip_forward.saved`; only then do we ever turn it off again, and only once no
//! network of ours needs it. A host that routed before tuchka came keeps routing. Several
//! clouds can share a host: before turning it off we look for another cloud's table carrying
//! the [`super::nft::FORWARDING_MARKER`] chain and, if there is one, leave forwarding on (and
//! forget our record; that cloud did not see it off, so it will not turn it off either).

use std::path::{Path, PathBuf};

/// The kernel switch.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What to do about `ip_forward` (pure decision, see [`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Keep,
    /// Record the original value `0`, then turn forwarding on.
    Enable {
        /// Whether the original value still has to be recorded (no record yet).
        record: bool,
    },
    /// Turn it back off (if no other cloud needs it) and drop the record.
    Restore,
    /// Drop the record without touching the switch (it is already what it was).
    Forget,
}

/// Decide from whether forwarding is `needed`, whether it is `on`, and whether we `recorded`
/// turning it on (pure).
pub fn plan(needed: bool, on: bool, recorded: bool) -> Step {
    match (needed, on, recorded) {
        (true, false, r) => Step::Enable { record: !r },
        (true, true, _) => Step::Keep,
        (false, true, true) => Step::Restore,
        (false, false, true) => Step::Forget,
        (false, _, false) => Step::Keep,
    }
}

/// Why the switch could not be read or set.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    /// A file could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The switch and our record of it.
#[derive(Debug, Clone)]
pub struct IpForward {
    switch: PathBuf,
    record: PathBuf,
}

impl IpForward {
    /// The host's switch, with the record kept in `net_root` (`<pool>/net`).
    pub fn new(net_root: &Path) -> Self {
        IpForward {
            switch: PathBuf::from(IP_FORWARD),
            record: net_root.join("ip_forward.saved"),
        }
    }

    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ForwardingError {
        let path = path.to_path_buf();
        move |source| ForwardingError::Io {
            action,
            path,
            source,
        }
    }

    /// Whether forwarding is on.
    pub fn is_on(&self) -> Result<bool, ForwardingError> {
        let v = std::fs::read_to_string(&self.switch).map_err(Self::io("read", &self.switch))?;
        Ok(v.trim() != "0")
    }

    fn set(&self, on: bool) -> Result<(), ForwardingError> {
        std::fs::write(&self.switch, if on { "1\n" } else { "0\n" })
            .map_err(Self::io("write", &self.switch))
    }

    /// Converge the switch to `needed`. `others_need` is asked only before turning it off.
    /// Returns the step taken.
    pub fn ensure(
        &self,
        needed: bool,
        others_need: impl FnOnce() -> bool,
    ) -> Result<Step, ForwardingError> {
        let recorded = self.record.exists();
        let step = plan(needed, self.is_on()?, recorded);
        match step {
            Step::Keep => {}
            Step::Enable { record } => {
                if record {
                    if let Some(dir) = self.record.parent() {
                        std::fs::create_dir_all(dir).map_err(Self::io("create", dir))?;
                    }
                    std::fs::write(&self.record, "0\n").map_err(Self::io("write", &self.record))?;
                }
                self.set(true)?;
                tracing::info!("turned on net.ipv4.ip_forward (it was off; will turn it off again when no network needs it)");
            }
            Step::Restore => {
                if others_need() {
                    tracing::info!(
                        "leaving net.ipv4.ip_forward on: another cloud on this host needs it"
                    );
                } else {
                    self.set(false)?;
                    tracing::info!("turned net.ipv4.ip_forward back off");
                }
                std::fs::remove_file(&self.record).map_err(Self::io("remove", &self.record))?;
            }
            Step::Forget => {
                std::fs::remove_file(&self.record).map_err(Self::io("remove", &self.record))?;
            }
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_we_turned_on_is_turned_off() {
        assert_eq!(plan(true, false, false), Step::Enable { record: true });
        assert_eq!(plan(true, false, true), Step::Enable { record: false });
        assert_eq!(plan(true, true, false), Step::Keep, "already on: not ours");
        assert_eq!(plan(true, true, true), Step::Keep);
        assert_eq!(plan(false, true, true), Step::Restore);
        assert_eq!(plan(false, true, false), Step::Keep, "was on before us");
        assert_eq!(plan(false, false, true), Step::Forget);
        assert_eq!(plan(false, false, false), Step::Keep);
    }

    #[test]
    fn ensure_records_and_restores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fwd = IpForward {
            switch: dir.path().join("ip_forward"),
            record: dir.path().join("net/ip_forward.saved"),
        };
        std::fs::write(&fwd.switch, "0\n").expect("write");
        assert_eq!(
            fwd.ensure(true, || false).expect("on"),
            Step::Enable { record: true }
        );
        assert!(fwd.is_on().expect("read"));
        assert_eq!(fwd.ensure(true, || false).expect("steady"), Step::Keep);
        // Another cloud still needs it: left on, record dropped.
        assert_eq!(fwd.ensure(false, || true).expect("off?"), Step::Restore);
        assert!(fwd.is_on().expect("read"));
        assert!(!fwd.record.exists());
        assert_eq!(fwd.ensure(false, || false).expect("not ours"), Step::Keep);
        assert!(
            fwd.is_on().expect("read"),
            "on before (as far as we know): stays on"
        );

        std::fs::write(&fwd.switch, "0\n").expect("write");
        fwd.ensure(true, || false).expect("on");
        assert_eq!(fwd.ensure(false, || false).expect("off"), Step::Restore);
        assert!(!fwd.is_on().expect("read"));
        assert!(!fwd.record.exists());
    }
}
