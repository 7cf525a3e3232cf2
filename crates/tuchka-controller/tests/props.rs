//! Property tests of what the controller parses from outside: every API request body type
//! (from any text and from any JSON value), the output of `qemu-img` (a hostile image can
//! steer it), the first bytes of an upload, `/proc/net/fib_trie`. Whatever the input, no
//! panic; bad input is an `Err`. Short by default (proptest's 256 cases per property);
//! `PROPTEST_CASES=100000 cargo test -p tuchka-controller --test props` runs a long one.

use proptest::prelude::*;
use serde_json::Value;
use tuchka_controller::images::{check_raw, extents_beyond, parse_img_info, sniff_format};
use tuchka_controller::tls::parse_fib_trie;

/// Any JSON value, nested a few levels, with hostile strings and extreme numbers.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[a-z0-9\"'<>/:.-]{0,20}".prop_map(Value::from),
        Just(Value::from("x".repeat(5000))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,12}",
                    Just("name".to_string()),
                    Just("count".to_string()),
                    Just("cidr".to_string()),
                    Just("image".to_string()),
                    Just("size_mib".to_string()),
                    Just("networks".to_string()),
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Decode `text` and `value` as every request body type: must never panic.
fn decode_all(text: &str, value: &Value) {
    macro_rules! each {
        ($($t:ty),+ $(,)?) => {$(
            let _ = serde_json::from_str::<$t>(text);
            let _ = serde_json::from_value::<$t>(value.clone());
        )+};
    }
    each!(
        tuchka_api::NetworkCreate,
        tuchka_api::RuleCreate,
        tuchka_api::ForwardCreate,
        tuchka_api::GroupCreate,
        tuchka_api::GroupScale,
        tuchka_api::VmStop,
        tuchka_api::VmMigrate,
        tuchka_api::VmResize,
        tuchka_api::HostDrain,
        tuchka_api::ImageCapture,
        tuchka_api::ImageBuild,
        tuchka_api::VolumeCreate,
        tuchka_api::VolumeAttach,
        tuchka_api::VolumeResize,
        tuchka_api::agent::HostRegister,
        tuchka_api::agent::HostReport,
    );
}

proptest! {
    #[test]
    fn request_bodies_never_panic(text in "\\PC{0,200}", value in json()) {
        decode_all(&text, &value);
        decode_all(&value.to_string(), &value);
    }

    #[test]
    fn unknown_fields_are_refused(value in json(), extra in "[a-z]{1,8}_x") {
        // Every request type rejects unknown fields: adding one to any object never makes
        // a body decode.
        if let Value::Object(mut m) = value {
            m.insert(extra, Value::Null);
            let v = Value::Object(m);
            prop_assert!(serde_json::from_value::<tuchka_api::NetworkCreate>(v.clone()).is_err());
            prop_assert!(serde_json::from_value::<tuchka_api::GroupCreate>(v.clone()).is_err());
            prop_assert!(serde_json::from_value::<tuchka_api::RuleCreate>(v).is_err());
        }
    }

    #[test]
    fn qemu_img_output_never_panics(text in "\\PC{0,300}", value in json(), size in any::<u64>()) {
        let _ = parse_img_info(text.as_bytes());
        let _ = parse_img_info(value.to_string().as_bytes());
        if let Value::Array(extents) = &value {
            let _ = extents_beyond(extents, size);
        }
    }

    #[test]
    fn upload_heads_never_panic(head in prop::collection::vec(any::<u8>(), 0..70_000), size in any::<u64>()) {
        match sniff_format(&head) {
            Ok(f) => prop_assert!(f == "qcow2" || f == "raw"),
            Err(why) => prop_assert!(why.contains("upload qcow2 or raw")),
        }
        let _ = check_raw(&head, size);
    }

    #[test]
    fn fib_trie_never_panics(text in "(\\PC{0,30}\n){0,20}") {
        for ip in parse_fib_trie(&text) {
            prop_assert!(!ip.is_loopback());
        }
    }
}

#[test]
fn img_info_parses_what_qemu_img_prints_and_refuses_the_rest() {
    let good = br#"{"virtual-size": 67108864, "filename": "x", "format": "qcow2", "actual-size": 200704, "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}, "dirty-flag": false}"#;
    let info = parse_img_info(good).expect("qemu-img info JSON");
    assert_eq!(
        (info.format.as_str(), info.virtual_size),
        ("qcow2", 64 << 20)
    );
    for bad in [
        &b""[..],
        b"{}",
        b"[]",
        br#"{"format":"qcow2","virtual-size":-1}"#,
        br#"{"format":1}"#,
    ] {
        assert!(
            parse_img_info(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}
