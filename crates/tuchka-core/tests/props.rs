//! Property tests of the parsers of outside input in `tuchka-core`: names, CIDRs, rule specs
//! and forward targets. Whatever the input, they never panic; what they accept satisfies the
//! rule they document, and round-trips. Short by default (proptest's 256 cases per property);
//! `PROPTEST_CASES=100000 cargo test -p tuchka-core --test props` runs a long one.

use proptest::prelude::*;
use tuchka_core::ipam::Cidr;
use tuchka_core::names::{validate_name, MAX_NAME_LEN};
use tuchka_core::rules::{format_spec, parse_spec, parse_target};

/// Text as users and attackers type it: anything printable, a near miss of the grammar, or
/// quotes, `<`, control characters and very long runs.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        "[a-z0-9:/.\"'<>&; -]{0,40}",
        "[a-z]{1,3}[0-9-]{0,70}",
        Just("a".repeat(10_000)),
        "[0-9]{1,30}(\\.[0-9]{1,30}){0,5}(/[0-9]{0,12})?",
        "(tcp|udp|icmp|any|TCP)(:[0-9]{0,7}(-[0-9]{0,7})?)?",
    ]
}

proptest! {
    #[test]
    fn names_follow_the_rule(s in hostile()) {
        if validate_name("group", &s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN);
            prop_assert!(s.starts_with(|c: char| c.is_ascii_lowercase()));
            prop_assert!(s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
    }

    #[test]
    fn cidrs_never_panic_and_round_trip(s in hostile()) {
        if let Ok(c) = Cidr::parse_any(&s) {
            prop_assert!(c.prefix() <= 32);
            prop_assert_eq!(Cidr::parse_any(&c.to_string()).ok(), Some(c));
        }
        if let Ok(c) = Cidr::parse_network(&s) {
            prop_assert_eq!(c.network(), c.network());
            prop_assert!(c.contains(c.network()));
            prop_assert_eq!(Cidr::parse_network(&c.to_string()).ok(), Some(c));
        }
    }

    #[test]
    fn rule_specs_never_panic_and_round_trip(s in hostile()) {
        if let Ok(m) = parse_spec(&s) {
            prop_assert_eq!(parse_spec(&format_spec(&m)).ok(), Some(m));
        }
    }

    #[test]
    fn forward_targets_name_a_vm_and_a_real_port(s in hostile()) {
        if let Ok((vm, port)) = parse_target(&s) {
            prop_assert!(port >= 1);
            prop_assert!(!vm.is_empty());
        }
    }
}
