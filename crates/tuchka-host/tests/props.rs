//! Property tests of what a host parses from outside its own code: qcow2 headers (an image is
//! user data), the migration channel's header and answer lines (from another host), the
//! output of qemu-img, libvirt and the kernel. Whatever the input, no panic. Short by default
//! (proptest's 256 cases per property); `PROPTEST_CASES=100000 cargo test -p tuchka-host
//! --test props` runs a long one.

use proptest::prelude::*;
use tuchka_host::channel::proto::{Answer, ChannelRequest};
use tuchka_host::net::listening::{parse_proc_net, SocketTable};
use tuchka_host::storage::is_temp_name;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        // A qcow2 magic with random fields: what a crafted image looks like.
        prop::collection::vec(any::<u8>(), 0..600).prop_map(|mut v| {
            v.splice(0..0, *b"QFI\xfb");
            v
        }),
    ]
}

proptest! {
    #[test]
    fn qcow2_headers_never_panic(buf in bytes()) {
        if let Some(h) = tuchka_host::qcow2::parse_header(&buf) {
            if let Some(b) = h.backing_file {
                prop_assert!(b.len() <= buf.len());
            }
        }
    }

    #[test]
    fn channel_lines_never_panic(line in prop_oneof![
        bytes(),
        "tuchka-migrate/[0-9] [a-z-]{0,12} \\PC{0,40}\n?".prop_map(String::into_bytes),
    ]) {
        if let Ok(req) = ChannelRequest::parse(&line) {
            // What parses prints back to a line that parses the same.
            prop_assert_eq!(ChannelRequest::parse(req.to_string().as_bytes()).ok(), Some(req));
        }
        let _ = Answer::parse(&line);
    }

    #[test]
    fn tool_and_kernel_output_never_panics(text in "\\PC{0,200}", raw in bytes()) {
        let _ = tuchka_host::capture::parse_measure(&text);
        let _ = tuchka_host::capture::parse_percent(&text);
        let _ = tuchka_host::capture::parse_backup_end(&text);
        let _ = tuchka_host::migrate::parse_completed_stats(&text);
        let _ = tuchka_host::domain_xml::parse_vm_metadata(&text);
        let _ = tuchka_host::libvirt::parse_volumes(&text);
        let _ = tuchka_host::metrics::parse_proc_stat(&text);
        let _ = tuchka_host::metrics::parse_meminfo(&text);
        let _ = parse_proc_net(&text, SocketTable::Tcp);
        let _ = parse_proc_net(&text, SocketTable::Udp);
        let _ = tuchka_host::net::nfgen::parse_generation(&raw);
        let _ = is_temp_name(&text);
    }
}

#[test]
fn temp_names_are_only_those_the_pool_writes() {
    assert!(is_temp_name("root.qcow2.tmp1234"));
    assert!(is_temp_name("seed.iso.tmp7"));
    for name in ["root.qcow2", "x.tmp", ".tmp12", "a.tmp12b", "console.log"] {
        assert!(!is_temp_name(name), "{name}");
    }
}
