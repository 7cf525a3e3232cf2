//! Property tests of the sizes users type (`--memory 1.5G`, `--disk 20G`): never a panic,
//! every accepted size a positive whole number of MiB that reads back the same. Short by
//! default; `PROPTEST_CASES=100000 cargo test -p tuchka-cli --test props` runs a long one.

use proptest::prelude::*;
use tuchka_cli::parse_size_mib;

proptest! {
    #[test]
    fn sizes_never_panic_and_are_positive(s in prop_oneof![
        any::<String>(),
        "[0-9]{0,25}(\\.[0-9]{0,25})?[ ]?[a-zA-Z]{0,4}",
        "[0-9.kKmMgGtTiIbB -]{0,20}",
    ]) {
        if let Ok(mib) = parse_size_mib(&s) {
            prop_assert!(mib > 0);
            prop_assert_eq!(parse_size_mib(&format!("{mib}M")).ok(), Some(mib));
        }
    }

    #[test]
    fn whole_sizes_read_back(mib in 1u64..(1 << 40), unit in prop_oneof![Just(""), Just("M"), Just("MiB"), Just("mb")]) {
        prop_assert_eq!(parse_size_mib(&format!("{mib}{unit}")).ok(), Some(mib));
    }
}
