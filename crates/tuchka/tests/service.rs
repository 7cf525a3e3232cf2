//! Running as a service: the systemd units pass `systemd-analyze verify`, `scripts/install`
//! into a staging root installs and enables them and changes nothing when run again, and the
//! completions and the man page the binary generates are what the shells and `man` read.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: [&str; 2] = ["tuchka-serve.service", "tuchka-agent.service"];

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tuchka"))
}

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Run `cmd`, failing with what is missing when its program is not installed.
fn run(cmd: &mut Command, package: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {program}: {e} (install the Debian package '{package}': ./scripts/install-deps)"
        )
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `systemd-analyze verify` of the unit files in `dir` whose ExecStart is `/usr/local/bin/tuchka`,
/// rendered with the built binary instead (verify checks that the binary exists) and with the
/// man page the binary generates on MANPATH (verify checks `Documentation=man:tuchka(1)`).
fn verify_units(dir: &Path, units: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let man1 = tmp.path().join("man/man1");
    std::fs::create_dir_all(&man1).expect("man dir");
    let page = run(Command::new(bin()).arg("man"), "tuchka");
    assert!(page.status.success(), "tuchka man: {}", text(&page.stderr));
    std::fs::write(man1.join("tuchka.1"), &page.stdout).expect("man page");
    for unit in units {
        let source = std::fs::read_to_string(dir.join(unit))
            .unwrap_or_else(|e| panic!("unit {} missing: {e}", dir.join(unit).display()));
        assert!(
            source.contains("ExecStart=/usr/local/bin/tuchka "),
            "{unit}: ExecStart runs /usr/local/bin/tuchka:\n{source}"
        );
        let rendered = source.replace("/usr/local/bin/tuchka", &bin().to_string_lossy());
        let path = tmp.path().join(unit);
        std::fs::write(&path, rendered).expect("rendered unit");
        let out = run(
            Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path)
                .env("MANPATH", tmp.path().join("man")),
            "systemd",
        );
        assert!(
            out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
            "systemd-analyze verify {unit}: exit {:?}\n{}{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let dir = source_root().join("packaging/systemd");
    verify_units(&dir, &UNITS);
    for unit in UNITS {
        let source = std::fs::read_to_string(dir.join(unit)).expect("unit");
        for line in [
            "Restart=on-failure",
            "After=network-online.target libvirtd.service",
            "Wants=network-online.target libvirtd.service",
            "WantedBy=multi-user.target",
        ] {
            assert!(source.lines().any(|l| l == line), "{unit} lacks `{line}`");
        }
        // The agent needs bridges, nftables, /dev/kvm and libvirt's sockets: none of these.
        for forbidden in [
            "PrivateDevices=",
            "PrivateNetwork=",
            "PrivateTmp=",
            "DeviceAllow=",
            "CapabilityBoundingSet=",
            "User=",
        ] {
            assert!(
                !source.lines().any(|l| l.starts_with(forbidden)),
                "{unit} sets {forbidden}: that breaks libvirt, nftables or bridges"
            );
        }
    }
}

/// What `scripts/install` leaves in a root: per path its kind, mode, mtime, and a hash of the
/// contents or the link target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let mtime = (meta.mtime(), meta.mtime_nsec());
            let what = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                format!("link -> {}", target.display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o} {mtime:?}")
            } else {
                let bytes = std::fs::read(&path).expect("read");
                let mut hash = std::hash::DefaultHasher::new();
                std::hash::Hasher::write(&mut hash, &bytes);
                let hash = std::hash::Hasher::finish(&hash);
                format!(
                    "file {mode:o} {mtime:?} {} bytes, hash {hash:x}",
                    bytes.len()
                )
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn install(root: &Path, extra: &[&str]) -> Output {
    run(
        Command::new(source_root().join("scripts/install"))
            .arg("--root")
            .arg(root)
            .arg("--binary")
            .arg(bin())
            .args(extra),
        "bash",
    )
}

fn assert_installed_twice(root: &Path, extra: &[&str], enabled: &str) -> BTreeMap<PathBuf, String> {
    let first = install(root, extra);
    assert!(
        first.status.success(),
        "scripts/install {extra:?} failed:\n{}",
        text(&first.stderr)
    );
    let before = snapshot(root);
    let second = install(root, extra);
    assert!(
        second.status.success(),
        "scripts/install {extra:?}, second run, failed:\n{}",
        text(&second.stderr)
    );
    let after = snapshot(root);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "the second run changed {changed:?}\n{}",
        text(&second.stderr)
    );
    assert!(
        text(&second.stderr).contains("nothing changed"),
        "the second run says nothing changed:\n{}",
        text(&second.stderr)
    );

    let link = root
        .join("etc/systemd/system/multi-user.target.wants")
        .join(enabled);
    let target = std::fs::read_link(&link)
        .unwrap_or_else(|e| panic!("{enabled} not enabled ({} : {e})", link.display()));
    assert_eq!(target, Path::new("/etc/systemd/system").join(enabled));
    let bin_meta = std::fs::metadata(root.join("usr/local/bin/tuchka")).expect("installed binary");
    assert_eq!(bin_meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/tuchka")).expect("installed binary"),
        std::fs::read(bin()).expect("built binary"),
        "/usr/local/bin/tuchka is the given binary"
    );
    for file in [
        "usr/share/bash-completion/completions/tuchka",
        "usr/share/zsh/vendor-completions/_tuchka",
        "usr/local/share/man/man1/tuchka.1",
    ] {
        let meta = std::fs::metadata(root.join(file))
            .unwrap_or_else(|e| panic!("{file} not installed: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
    }
    after
}

#[test]
fn install_into_a_root_is_idempotent_and_enables_the_units() {
    // A controller host: tuchka-serve enabled, tuchka-agent installed (not enabled: serve runs
    // this host's agent).
    let controller = tempfile::tempdir().expect("tempdir");
    let root = controller.path();
    assert_installed_twice(root, &[], "tuchka-serve.service");
    verify_units(&root.join("etc/systemd/system"), &UNITS);
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/tuchka-agent.service")
            .exists(),
        "tuchka-agent is not enabled next to tuchka-serve"
    );
    let serve_env =
        std::fs::read_to_string(root.join("etc/tuchka/serve.env")).expect("serve.env written");
    assert!(
        serve_env.contains("TUCHKA_DATA_DIR=/var/lib/tuchka"),
        "{serve_env}"
    );
    assert!(!root.join("etc/tuchka/agent.env").exists());

    // An edited env file survives a new install.
    std::fs::write(
        root.join("etc/tuchka/serve.env"),
        "TUCHKA_SERVE_ARGS=\"--listen 10.9.9.9:7480\"\n",
    )
    .expect("edit serve.env");
    let again = install(root, &["--listen", "127.0.0.1:1"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/tuchka/serve.env")).expect("serve.env"),
        "TUCHKA_SERVE_ARGS=\"--listen 10.9.9.9:7480\"\n"
    );

    // Another host: the agent only, with the join command's options.
    let host = tempfile::tempdir().expect("tempdir");
    let root = host.path();
    let refused = install(root, &["--agent-only"]);
    assert!(
        !refused.status.success(),
        "an agent without a controller is refused"
    );
    assert!(
        text(&refused.stderr).contains("--controller"),
        "the refusal says what to give:\n{}",
        text(&refused.stderr)
    );
    assert!(
        snapshot(root).is_empty(),
        "a refused install writes nothing: {:?}",
        snapshot(root)
    );
    let join = [
        "--agent-only",
        "--controller",
        "https://10.0.0.1:7480",
        "--join-token",
        "tok3n",
        "--fingerprint",
        "ab12",
        "--host-name",
        "h2",
        "--address",
        "10.0.0.2",
    ];
    assert_installed_twice(root, &join, "tuchka-agent.service");
    verify_units(&root.join("etc/systemd/system"), &["tuchka-agent.service"]);
    assert!(!root
        .join("etc/systemd/system/tuchka-serve.service")
        .exists());
    let env_path = root.join("etc/tuchka/agent.env");
    let meta = std::fs::metadata(&env_path).expect("agent.env written");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "agent.env holds the join token"
    );
    let env = std::fs::read_to_string(&env_path).expect("agent.env");
    for line in [
        "TUCHKA_CONTROLLER=https://10.0.0.1:7480",
        "TUCHKA_JOIN_TOKEN=tok3n",
        "TUCHKA_FINGERPRINT=ab12",
        "TUCHKA_HOST_NAME=h2",
        "TUCHKA_AGENT_ARGS=\"--address 10.0.0.2\"",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "agent.env lacks {line}:\n{env}"
        );
    }
}

#[test]
fn completions_are_valid_shell_and_name_the_commands() {
    let bash = run(Command::new(bin()).args(["completions", "bash"]), "tuchka");
    assert!(bash.status.success(), "{}", text(&bash.stderr));
    let script = text(&bash.stdout);
    for word in ["group", "vm", "net", "serve", "agent", "completions", "man"] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("tuchka.bash");
    std::fs::write(&file, &bash.stdout).expect("write");
    let check = run(Command::new("bash").arg("-n").arg(&file), "bash");
    assert!(check.status.success(), "bash -n: {}", text(&check.stderr));
    // Sourced, it registers a completion for `tuchka`.
    let registered = run(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p tuchka", file.display())),
        "bash",
    );
    assert!(
        registered.status.success() && text(&registered.stdout).contains("tuchka"),
        "complete -p tuchka: {}{}",
        text(&registered.stdout),
        text(&registered.stderr)
    );

    let zsh = run(Command::new(bin()).args(["completions", "zsh"]), "tuchka");
    assert!(zsh.status.success());
    assert!(
        text(&zsh.stdout).starts_with("#compdef tuchka"),
        "zsh completion header"
    );
    let fish = run(Command::new(bin()).args(["completions", "fish"]), "tuchka");
    assert!(fish.status.success());
    assert!(
        text(&fish.stdout).contains("complete -c tuchka"),
        "fish completion"
    );
}

#[test]
fn man_prints_roff_and_writes_one_page_per_command() {
    let out = run(Command::new(bin()).arg("man"), "tuchka");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(
        page.lines().any(|l| l.starts_with(".TH tuchka 1")),
        "roff title line .TH:\n{}",
        &page[..page.len().min(400)]
    );
    assert!(
        page.contains(".SH NAME") && page.contains("group"),
        "{page}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pages");
    let out = run(
        Command::new(bin()).arg("man").arg("--dir").arg(&dir),
        "tuchka",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in [
        "tuchka.1",
        "tuchka-vm.1",
        "tuchka-vm-list.1",
        "tuchka-group-create.1",
    ] {
        let body = std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("man --dir wrote no {name}: {e}"));
        assert!(body.contains(".TH"), "{name} is roff");
    }
}
