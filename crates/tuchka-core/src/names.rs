//! Names of user objects (images, networks, groups, VMs) and the device names derived from them.
//!
//! A name is `^[a-z][a-z0-9-]{0,62}$`: it is safe in a DNS label, a file name, a libvirt domain
//! name and a URL path segment, so nothing downstream has to quote it.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Longest name accepted (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// A name that does not follow the rule.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: {why} (names are 1-63 characters: a lowercase letter, then lowercase letters, digits or '-')")]
pub struct NameError {
    /// What kind of object was being named.
    pub kind: &'static str,
    /// The name as given (Debug-printed, so quotes and control characters show escaped).
    pub name: String,
    /// The first thing wrong with it.
    pub why: String,
}

/// Check `name` for an object of `kind` (`"group"`, `"network"`, …).
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let err = |why: String| NameError {
        kind,
        name: name.to_string(),
        why,
    };
    let Some(first) = name.chars().next() else {
        return Err(err("it is empty".into()));
    };
    if name.len() > MAX_NAME_LEN {
        return Err(err(format!("it is {} characters long", name.len())));
    }
    if !first.is_ascii_lowercase() {
        return Err(err(format!("it starts with {first:?}")));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(err(format!("it contains {bad:?}")));
    }
    Ok(())
}

/// Name of VM `index` of group `group`.
pub fn vm_name(group: &str, index: u32) -> String {
    format!("{group}-{index}")
}

/// libvirt domain name of a VM: `tk-<cloud8>-<vm>`, unique per cloud and readable in `virsh list`.
pub fn domain_name(cloud_id: &str, vm: &str) -> String {
    format!("tk-{}-{vm}", cloud8(cloud_id))
}

/// The short cloud id that scopes host-global names (domains `tk-<cloud8>-<vm>`, the nftables
/// table `tk_<cloud8>`): always 8 lowercase hex digits — the first 8 characters of `cloud_id`
/// when they are hex digits (a UUID), else the first 8 hex digits of its sha256.
pub fn cloud8(cloud_id: &str) -> String {
    let head: String = cloud_id.chars().take(8).collect();
    if head.len() == 8 && head.chars().all(|c| c.is_ascii_hexdigit()) {
        head.to_ascii_lowercase()
    } else {
        Sha256::digest(cloud_id.as_bytes())
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Bridge of a network on every host: `tk<vni>` (at most 10 characters).
pub fn bridge_name(vni: u32) -> String {
    format!("tk{vni}")
}

/// Tap device of a NIC, from its MAC: `tkv` + the last three octets (9 characters).
pub fn tap_name(mac: &str) -> String {
    let tail: String = mac.split(':').skip(3).collect();
    format!("tkv{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in ["a", "web", "web-1", "a0-b1", &"x".repeat(63)] {
            assert_eq!(validate_name("group", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_bad_names_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("Web", "starts with 'W'"),
            ("1web", "starts with '1'"),
            ("-web", "starts with '-'"),
            ("we'b", "contains '\\''"),
            ("we<b", "contains '<'"),
            ("we b", "contains ' '"),
            ("wé", "contains 'é'"),
            ("web_1", "contains '_'"),
        ];
        for (name, why) in cases {
            let e = validate_name("group", name).expect_err(name);
            assert!(e.to_string().contains(why), "{name}: {e}");
            assert!(e.to_string().starts_with("invalid group name"), "{e}");
        }
        let long = "a".repeat(64);
        assert!(validate_name("vm", &long).is_err());
    }

    #[test]
    fn derived_names_fit_linux_limits() {
        assert_eq!(tap_name("52:54:00:ab:cd:ef"), "tkvabcdef");
        assert!(bridge_name(16_777_215).len() <= 15);
        assert_eq!(
            domain_name("3fa2b4c1-0000-4000-8000-000000000000", "web-0"),
            "tk-3fa2b4c1-web-0"
        );
    }

    #[test]
    fn cloud8_is_always_eight_hex_digits() {
        assert_eq!(cloud8("0F2A6C1E-0000-4000-8000-000000000001"), "0f2a6c1e");
        for odd in ["not-hex-at-all", "", "abc", "abcdefg-1", "日本語のクラウド"] {
            let c = cloud8(odd);
            assert_eq!(c.len(), 8, "{odd:?} -> {c:?}");
            assert!(
                c.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{odd:?} -> {c:?}"
            );
        }
        assert_ne!(cloud8("cloud-a"), cloud8("cloud-b"));
        assert_eq!(cloud8("e2e-cloud"), cloud8("e2e-cloud"), "deterministic");
    }
}
