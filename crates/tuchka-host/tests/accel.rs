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

/// Not a test on its own: the body of `a_killed_prober_leaves_no_guest_behind`'s child process.
#[test]
fn helper_probe_that_gets_killed() {
    if std::env::var_os("TKT_PROBE_HELPER").is_none() {
        return;
    }
    let _ = run_probe("kvm", Duration::from_secs(2));
}

/// If the process running the probe is killed mid-probe (an agent stopped by its supervisor),
/// the probe guest must not outlive it by more than a few seconds.
#[test]
fn a_killed_prober_leaves_no_guest_behind() {
    common::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "helper_probe_that_gets_killed", "--nocapture"])
        .env("TKT_PROBE_HELPER", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn helper");
    let marker = format!("tuchka-probe-{}-", child.id());
    let guests = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("qemu-system") && c.contains(&marker))
            .collect()
    };
    // Wait until the guest runs, then kill the prober outright (no destructors run).
    let started = common::wait_for(10, || (!guests().is_empty()).then_some(()));
    child.kill().expect("kill helper");
    let _ = child.wait();
    if started.is_none() {
        return; // qemu exited at once (e.g. no /dev/kvm): nothing can be left behind
    }
    let gone = common::wait_for(15, || guests().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "probe guest outlived its killed parent: {:?}",
        guests()
    );
}
