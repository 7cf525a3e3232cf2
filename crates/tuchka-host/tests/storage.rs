//! The storage pool against the real tools (qemu-img, genisoimage, isoinfo), in a unique
//! directory under /var/tmp that is removed afterwards.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{make_qcow2, sh, sha256_file, Scratch};
use tuchka_host::{DirStorage, HostError, Storage};

fn require_tools() {
    common::require_tool("qemu-img", "qemu-utils");
    common::require_tool("genisoimage", "genisoimage");
    common::require_tool("isoinfo", "genisoimage");
}

/// Put a qcow2 of `mib` MiB into the cache the way the agent does: write the partial file,
/// then commit it with its digest. Returns the identity used.
fn cache_image(st: &DirStorage, scratch: &Scratch, mib: u64, identity: &str) -> String {
    let src = scratch.dir.join(format!("src-{identity}.qcow2"));
    make_qcow2(&src, mib);
    std::fs::copy(&src, st.image_partial_path(identity)).expect("write partial download");
    st.commit_image(identity, &sha256_file(&src))
        .expect("commit image");
    identity.to_string()
}

#[test]
fn pool_in_a_private_dir_is_refused_with_the_reason() {
    let scratch = Scratch::new();
    let private = scratch.dir.join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let err = DirStorage::open(&private.join("pool")).expect_err("0700 parent must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&private.display().to_string()) && msg.contains("libvirt-qemu"),
        "{msg}"
    );
}

#[test]
fn open_creates_a_traversable_layout() {
    let scratch = Scratch::new();
    let st = DirStorage::open(&scratch.pool()).expect("open pool");
    // Traversable for qemu, not listable by other users (net/ is dnsmasq's too).
    for (sub, want) in [
        ("", 0o711),
        ("images", 0o711),
        ("vms", 0o711),
        ("net", 0o755),
    ] {
        let mode = std::fs::metadata(scratch.pool().join(sub))
            .expect("dir exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, want, "pool/{sub}");
    }
    let (total, free) = st.capacity().expect("capacity");
    assert!(
        total > 0 && free > 0 && free <= total,
        "capacity ({total}, {free})"
    );
    assert!(st.cached_images().expect("list").is_empty());
    // Opening again is harmless.
    DirStorage::open(&scratch.pool()).expect("reopen");
}

#[test]
fn corrupt_download_is_deleted_and_named() {
    require_tools();
    let scratch = Scratch::new();
    let st = DirStorage::open(&scratch.pool()).expect("open pool");
    let id = "c".repeat(64);
    std::fs::write(st.image_partial_path(&id), b"truncated download").expect("write partial");
    let wrong = "0".repeat(64);
    match st.commit_image(&id, &wrong) {
        Err(HostError::Corrupt {
            expected, actual, ..
        }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual.len(), 64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !st.image_partial_path(&id).exists(),
        "partial file must be deleted"
    );
    assert!(!st.image_path(&id).exists());
    assert!(
        st.commit_image("../../etc", &wrong).is_err(),
        "identities that are not sha256 are refused"
    );
}

#[test]
fn image_overlay_and_seed() {
    require_tools();
    let scratch = Scratch::new();
    let st = DirStorage::open(&scratch.pool()).expect("open pool");
    let id = cache_image(&st, &scratch, 32, &"a".repeat(64));

    // The committed image: in place, read-only, listed.
    let image = st.image_path(&id);
    assert_eq!(
        std::fs::metadata(&image)
            .expect("image")
            .permissions()
            .mode()
            & 0o777,
        0o400,
        "read-only, root's (libvirt hands it to qemu)"
    );
    assert!(!st.image_partial_path(&id).exists());
    assert_eq!(st.cached_images().expect("list"), vec![id.clone()]);

    // Root disk smaller than the image is refused, with the sizes.
    let err = st.ensure_root_disk("vm-1", &id, 16).expect_err("too small");
    assert!(err.to_string().contains("32 MiB"), "{err}");
    // Missing image is refused.
    assert!(st.ensure_root_disk("vm-1", &"e".repeat(64), 64).is_err());

    let root = st.ensure_root_disk("vm-1", &id, 64).expect("root disk");
    assert_eq!(
        root,
        scratch
            .pool()
            .canonicalize()
            .expect("canon")
            .join("vms/vm-1/root.qcow2")
    );
    let (ok, info) = sh(
        "qemu-img",
        &["info", "-U", "--output=json", &root.to_string_lossy()],
    );
    assert!(ok, "qemu-img info");
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * 1024 * 1024);
    assert_eq!(
        info["backing-filename"],
        image.to_string_lossy().as_ref(),
        "absolute backing path, no copy"
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    let ino = std::fs::metadata(&root).expect("root").ino();
    st.ensure_root_disk("vm-1", &id, 64).expect("idempotent");
    assert_eq!(
        std::fs::metadata(&root).expect("root").ino(),
        ino,
        "an existing root disk is kept"
    );
    let vm_dir_mode = std::fs::metadata(root.parent().expect("parent"))
        .expect("vm dir")
        .permissions()
        .mode();
    assert_eq!(vm_dir_mode & 0o777, 0o711);

    // The image cannot be removed while the overlay uses it.
    assert!(matches!(
        st.remove_image(&id),
        Err(HostError::ImageInUse { .. })
    ));

    // Seed: label cidata, meta-data and user-data as rendered.
    let keys = vec!["ssh-ed25519 AAAA test@tuchka".to_string()];
    let iso = st
        .ensure_seed("vm-1", "web-0", Some("#!/bin/sh\necho hi\n"), &keys)
        .expect("seed");
    let (ok, desc) = sh("isoinfo", &["-d", "-i", &iso.to_string_lossy()]);
    assert!(ok && desc.contains("Volume id: cidata"), "{desc}");
    let read = |name: &str| {
        sh(
            "isoinfo",
            &[
                "-J",
                "-i",
                &iso.to_string_lossy(),
                "-x",
                &format!("/{name}"),
            ],
        )
        .1
    };
    assert_eq!(
        read("meta-data"),
        "instance-id: \"vm-1\"\nlocal-hostname: \"web-0\"\npublic-keys:\n  - \"ssh-ed25519 AAAA test@tuchka\"\n"
    );
    assert_eq!(read("user-data"), "#!/bin/sh\necho hi\n");

    // Unchanged inputs: not rebuilt. Changed inputs: rebuilt.
    let ino = std::fs::metadata(&iso).expect("iso").ino();
    st.ensure_seed("vm-1", "web-0", Some("#!/bin/sh\necho hi\n"), &keys)
        .expect("seed again");
    assert_eq!(
        std::fs::metadata(&iso).expect("iso").ino(),
        ino,
        "same inputs must not rebuild the ISO"
    );
    st.ensure_seed("vm-1", "web-0", None, &[])
        .expect("seed changed");
    assert_ne!(
        std::fs::metadata(&iso).expect("iso").ino(),
        ino,
        "new inputs must rebuild the ISO"
    );
    assert_eq!(read("user-data"), "#cloud-config\n");

    assert_eq!(
        st.console_log_path("vm-1"),
        root.parent().expect("parent").join("console.log")
    );
    assert_eq!(st.vm_dirs().expect("vm dirs"), vec!["vm-1"]);
    st.remove_vm("vm-1").expect("remove vm");
    st.remove_vm("vm-1").expect("remove vm again");
    assert!(st.vm_dirs().expect("vm dirs").is_empty());
    assert!(
        st.remove_vm("../images").is_err(),
        "ids that are paths are refused"
    );

    st.remove_image(&id).expect("remove image");
    st.remove_image(&id).expect("remove image again");
    assert!(st.cached_images().expect("list").is_empty());
}
