//! Bad input is refused with a clear message and changes nothing: images that are not images,
//! names with quotes or `<`, impossible sizes, unknown objects, overlapping networks, a group
//! larger than the host, and a group whose image arrives corrupted on the host (rolled back
//! after it started).

mod common;

use std::process::Command;

use common::{domains_with_prefix, Cloud};
use serde_json::json;

fn files_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn cidr(third: u32) -> String {
    let p = std::process::id();
    format!("10.{}.{}.0/24", 150 + p % 50, (p / 50 + third) % 256)
}

#[test]
fn bad_images_are_refused_and_leave_nothing() {
    let image = common::test_image();
    let c = Cloud::start("img");
    let d = c.dir.join("inputs");
    std::fs::create_dir_all(&d).expect("dir");

    let text = d.join("notes.txt");
    std::fs::write(&text, "this is not a disk image\n").expect("write");
    let random = d.join("random.bin");
    let mut bytes = vec![0u8; 1 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(13) as u8;
    }
    std::fs::write(&random, &bytes).expect("write");
    let truncated = d.join("truncated.qcow2");
    let full = std::fs::read(&image).expect("read image");
    std::fs::write(&truncated, &full[..full.len() / 2]).expect("write");
    let base = d.join("base.qcow2");
    let overlay = d.join("overlay.qcow2");
    let qi = |args: &[&str]| {
        assert!(Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img")
            .success())
    };
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().expect("p"),
        "16M",
    ]);
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().expect("p"),
        "-F",
        "qcow2",
        overlay.to_str().expect("p"),
    ]);

    let cases = [
        (&text, "neither qcow2 nor a raw disk image"),
        (&random, "neither qcow2 nor a raw disk image"),
        (&truncated, "truncated"),
        (&overlay, "backing file"),
    ];
    for (file, why) in cases {
        let err = c.fails(&[
            "image",
            "upload",
            file.to_str().expect("p"),
            "--name",
            "bad",
        ]);
        assert!(
            err.contains(why),
            "{}: expected {why:?} in: {err}",
            file.display()
        );
        assert!(err.contains("\"bad\""), "the error names the image: {err}");
    }
    for name in ["Bad", "it's", "a<b", "x\"y", ""] {
        let err = c.fails(&[
            "image",
            "upload",
            image.to_str().expect("p"),
            "--name",
            name,
        ]);
        assert!(err.contains("invalid image name"), "{name:?}: {err}");
    }
    assert_eq!(c.ok(&["image", "list", "-o", "json"]).json(), json!([]));
    assert!(
        files_in(&c.dir.join("images")).is_empty(),
        "nothing stored: {:?}",
        files_in(&c.dir.join("images"))
    );
    assert!(
        files_in(&c.dir.join("images/tmp")).is_empty(),
        "no temp files: {:?}",
        files_in(&c.dir.join("images/tmp"))
    );

    // A good raw image is accepted and stored as qcow2.
    let raw = d.join("disk.raw");
    qi(&[
        "convert",
        "-q",
        "-O",
        "raw",
        image.to_str().expect("p"),
        raw.to_str().expect("p"),
    ]);
    let img = c
        .ok(&[
            "image",
            "upload",
            raw.to_str().expect("p"),
            "--name",
            "rawdisk",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(img["source_format"], "raw");
    let stored = c
        .dir
        .join("images")
        .join(format!("{}.qcow2", img["sha256"].as_str().expect("sha")));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&stored)
        .output()
        .expect("info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["format"], "qcow2");
    let err = c.fails(&[
        "image",
        "upload",
        raw.to_str().expect("p"),
        "--name",
        "rawdisk",
    ]);
    assert!(err.contains("already exists"), "{err}");
    c.ok(&["image", "rm", "rawdisk"]);
    assert!(files_in(&c.dir.join("images")).is_empty());
}

#[test]
fn bad_networks_groups_and_vms_are_refused_and_change_nothing() {
    let image = common::test_image();
    let c = Cloud::start("bad");
    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("p"),
        "--name",
        "tiny",
    ]);
    let lan = cidr(0);
    c.ok(&["net", "create", "lan", "--cidr", &lan, "--wait"]);
    c.track_network("lan");

    for (cidr, why) in [
        ("10.1.2.3", "invalid CIDR"),
        ("10.1.2.0/30", "too small"),
        ("10.1.2.0/8", "too large"),
        ("10.1.2.7/24", "not a network address"),
        (lan.as_str(), "overlaps network \"lan\""),
    ] {
        let err = c.fails(&["net", "create", "other", "--cidr", cidr]);
        assert!(err.contains(why), "{cidr}: expected {why:?} in {err}");
    }
    let err = c.fails(&["net", "create", "lan", "--cidr", &cidr(1)]);
    assert!(err.contains("already exists"), "{err}");
    let err = c.fails(&[
        "net",
        "create",
        "gw",
        "--cidr",
        &cidr(2),
        "--gateway",
        "192.0.2.1",
    ]);
    assert!(
        err.contains("gateway 192.0.2.1 is outside network"),
        "{err}"
    );

    // Rules and forwards: bad specs, port ranges, unknown groups are refused and nothing is added.
    for (args, why) in [
        (vec!["--allow", "tcp:0"], "invalid port range"),
        (
            vec!["--allow", "tcp:90-80", "--from", "0.0.0.0/0"],
            "invalid port range",
        ),
        (
            vec!["--allow", "tcp:70000", "--from", "0.0.0.0/0"],
            "invalid port range",
        ),
        (
            vec!["--allow", "http", "--from", "0.0.0.0/0"],
            "invalid rule",
        ),
        (
            vec!["--allow", "tcp:80", "--from-group", "nope"],
            "group \"nope\" does not exist",
        ),
        (
            vec![
                "--allow",
                "icmp",
                "--from",
                "0.0.0.0/0",
                "--to-group",
                "nope",
            ],
            "group \"nope\" does not exist",
        ),
        (vec!["--allow", "tcp:80"], "exactly one source"),
        (
            vec!["--allow", "tcp:80", "--from", "10.0.0.5/8"],
            "not a network address",
        ),
    ] {
        let mut a = vec!["net", "rule", "add", "lan"];
        a.extend_from_slice(&args);
        let err = c.fails(&a);
        assert!(err.contains(why), "{args:?}: expected {why:?} in: {err}");
    }
    let err = c.fails(&[
        "net",
        "rule",
        "add",
        "nope",
        "--allow",
        "tcp:80",
        "--from",
        "0.0.0.0/0",
    ]);
    assert!(err.contains("network \"nope\" not found"), "{err}");
    let err = c.fails(&[
        "net",
        "forward",
        "add",
        "lan",
        "--host-port",
        "53",
        "--to",
        "web-0:80",
    ]);
    assert!(err.contains("reserved"), "{err}");
    let err = c.fails(&[
        "net",
        "forward",
        "add",
        "lan",
        "--host-port",
        "8080",
        "--to",
        "web-0",
    ]);
    assert!(err.contains("VM:PORT"), "{err}");
    let err = c.fails(&[
        "net",
        "forward",
        "add",
        "lan",
        "--host-port",
        "8080",
        "--to",
        "web-0:80",
    ]);
    assert!(err.contains("vm \"web-0\" not found"), "{err}");
    assert_eq!(
        c.ok(&["net", "rule", "list", "lan", "-o", "json"]).json(),
        json!([])
    );
    assert_eq!(
        c.ok(&["net", "forward", "list", "lan", "-o", "json"])
            .json(),
        json!([])
    );
    let err = c.fails(&["net", "create", "x<y", "--cidr", &cidr(1)]);
    assert!(err.contains("invalid network name"), "{err}");
    assert_eq!(
        c.ok(&["net", "list", "-o", "json"])
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // `group create NAME …` with --image tiny and --net lan unless the case names its own.
    let group = |extra: &[&str]| -> String {
        let mut args: Vec<&str> = vec!["group", "create"];
        args.extend_from_slice(extra);
        if !extra.contains(&"--image") {
            args.extend(["--image", "tiny"]);
        }
        if !extra.contains(&"--net") {
            args.extend(["--net", "lan"]);
        }
        c.fails(&args)
    };
    for (extra, why) in [
        (vec!["we'b", "--count", "1"], "invalid group name"),
        (vec!["W", "--count", "1"], "invalid group name"),
        (vec!["a<b>", "--count", "1"], "invalid group name"),
        (vec!["web", "--count", "0"], "count 0"),
        (
            vec!["web", "--count", "1", "--memory", "12X"],
            "invalid size",
        ),
        (vec!["web", "--count", "1", "--memory", "0"], "invalid size"),
        (
            vec!["web", "--count", "1", "--memory", "16M"],
            "out of range",
        ),
        (
            vec!["web", "--count", "1", "--disk", "8M"],
            "smaller than image",
        ),
        (
            vec!["web", "--count", "1", "--image", "nope"],
            "image \"nope\" not found",
        ),
        (
            vec!["web", "--count", "1", "--net", "nope"],
            "network \"nope\" not found",
        ),
        (
            vec!["web", "--count", "1", "--memory", "900G"],
            "cannot be placed",
        ),
        (
            vec!["web", "--count", "1", "--cpus", "64", "--memory", "128M"],
            "cannot be placed",
        ),
    ] {
        let err = group(&extra);
        assert!(err.contains(why), "{extra:?}: expected {why:?} in: {err}");
    }
    let err = group(&["web", "--count", "1", "--memory", "900G"]);
    assert!(
        err.contains(&c.host) && err.contains("memory"),
        "the error says which resource was short on which host: {err}"
    );
    let err = c.fails(&["vm", "stop", "web-7"]);
    assert!(err.contains("vm \"web-7\" not found"), "{err}");
    let err = c.fails(&["group", "scale", "nope", "--count", "2"]);
    assert!(err.contains("group \"nope\" not found"), "{err}");

    assert_eq!(c.ok(&["group", "list", "-o", "json"]).json(), json!([]));
    assert_eq!(c.ok(&["vm", "list", "-o", "json"]).json(), json!([]));
    assert_eq!(
        c.ok(&["net", "show", "lan", "-o", "json"]).json()["addresses"],
        json!([])
    );
    assert!(
        std::fs::read_dir(c.dir.join("pool/vms"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );

    // A group that starts and then fails on its host (the image arrives corrupted, twice) is
    // rolled back as a whole, and the error says why.
    let img = c.ok(&["image", "show", "tiny", "-o", "json"]).json();
    let stored = c
        .dir
        .join("images")
        .join(format!("{}.qcow2", img["sha256"].as_str().expect("sha")));
    let original = std::fs::read(&stored).expect("read stored image");
    let mut broken = original.clone();
    let mid = broken.len() / 2;
    broken[mid] ^= 0xff;
    std::fs::write(&stored, &broken).expect("corrupt stored image");
    let op = c
        .ok(&[
            "group", "create", "doomed", "--image", "tiny", "--count", "2", "--net", "lan", "-o",
            "json",
        ])
        .json();
    let op_id = op["id"].as_str().expect("operation id").to_string();
    let domain = c.vm("doomed-0")["domain"]
        .as_str()
        .expect("domain")
        .to_string();
    let r = c.tk(&["op", "wait", &op_id]);
    assert_ne!(r.code, 0, "the group must fail: {}", r.out);
    let failed = c.ok(&["op", "show", &op_id, "-o", "json"]).json();
    assert_eq!(failed["state"], "failed");
    let why = failed["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("sha256") || why.contains("corrupt"),
        "the error says why: {why}"
    );
    assert_eq!(c.ok(&["group", "list", "-o", "json"]).json(), json!([]));
    assert_eq!(c.ok(&["vm", "list", "-o", "json"]).json(), json!([]));
    assert_eq!(
        c.ok(&["net", "show", "lan", "-o", "json"]).json()["addresses"],
        json!([]),
        "addresses released"
    );
    let cached: Vec<String> = files_in(&c.dir.join("pool/images"));
    assert!(
        cached.is_empty(),
        "no partial or bad image left in the host cache: {cached:?}"
    );
    assert!(
        std::fs::read_dir(c.dir.join("pool/vms"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "no VM directories left"
    );
    assert!(domains_with_prefix(&domain).is_empty(), "no domains left");
    std::fs::write(&stored, &original).expect("restore stored image");
}

#[test]
fn accel_auto_does_not_pick_a_kvm_that_cannot_run_guests() {
    let mut c = Cloud::start("accel");
    c.stop_serve();
    c.spawn_serve(&["--accel", "auto"]);
    let h = c.ok(&["host", "show", &c.host, "-o", "json"]).json();
    let accel = h["accel"].as_str().expect("accel").to_string();
    let reason = h["accel_reason"].as_str().expect("reason").to_string();
    assert!(!reason.is_empty(), "the choice is explained");
    // Decided by a real test guest. On these machines /dev/kvm exists but KVM guests hang, so
    // auto must fall back to tcg; on hardware where KVM works, set TUCHKA_EXPECT_KVM=1.
    let expected = if std::env::var_os("TUCHKA_EXPECT_KVM").is_some() {
        "kvm"
    } else {
        "tcg"
    };
    assert_eq!(accel, expected, "accel reason: {reason}");
}
