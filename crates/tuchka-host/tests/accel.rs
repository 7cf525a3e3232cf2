//! The accelerator probe against the real qemu.

mod common;

use std::time::Duration;

use tuchka_host::accel::{run_probe, PROBE_MARKER};
use tuchka_host::{probe_accel, Accel, AccelChoice};

#[test]
fn probe_firmware_reaches_long_mode_under_tcg() {
    common::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let out = run_probe("tcg", Duration::from_secs(10)).expect("qemu runs the probe firmware");
    assert!(
        out.contains(PROBE_MARKER),
        "TCG guest must print {PROBE_MARKER:?}, printed {out:?}"
    );
}

/// On this machine `/dev/kvm` exists but nested KVM guests hang, so Auto must pick TCG and say
/// why. On a host where KVM works, run with TUCHKA_EXPECT_KVM=1.
#[test]
fn auto_picks_tcg_here_with_a_reason() {
    common::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let (accel, reason) = probe_accel(AccelChoice::Auto);
    eprintln!("probe_accel(Auto) = ({accel}, {reason:?})");
    let want = if std::env::var_os("TUCHKA_EXPECT_KVM").is_some() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    assert_eq!(accel, want, "probe_accel(Auto) said: {reason}");
    assert!(
        reason.contains("KVM") || reason.contains("kvm"),
        "the reason names KVM: {reason}"
    );
    if accel == Accel::Tcg {
        assert!(
            reason.contains("TCG"),
            "the reason says TCG is used: {reason}"
        );
    }
}

#[test]
fn forced_choices_are_honoured() {
    let (accel, reason) = probe_accel(AccelChoice::Tcg);
    assert_eq!(accel, Accel::Tcg);
    assert!(reason.contains("configuration"));
    let (accel, reason) = probe_accel(AccelChoice::Kvm);
    assert_eq!(accel, Accel::Kvm);
    assert!(reason.contains("configuration"), "{reason}");
}
