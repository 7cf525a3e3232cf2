//! Limits on what clients can send, tried the way an attacker or a careless client would, on a
//! real `tuchka serve` (a dedicated controller: no VMs) with small caps and short timeouts:
//! - idle TCP connections beyond the per-client cap and beyond the total cap are closed, and
//!   a real `tuchka` CLI call over HTTPS still answers while they are held;
//! - connections that never finish their TLS handshake, or send a request head a byte at a
//!   time (slowloris), are closed after the header timeout;
//! - a keep-alive connection may stay silent for the idle timeout, not longer;
//! - a flood on the unix socket leaves the CLI working there too;
//! - an event stream silent for longer than the idle timeout is not cut;
//! - uploads: one larger than `--max-upload-size` is refused before anything is stored, a
//!   qcow2 with a huge virtual size and a file that is no image are refused, one of unknown
//!   length is stopped when the image store runs low, and nothing is left behind (no
//!   temporary file, no stored file, no row).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HEADER_TIMEOUT_S: u64 = 5;
const IDLE_TIMEOUT_S: u64 = 10;
const MAX_CONNECTIONS: usize = 16;
const PER_CLIENT: usize = 4;

struct Serve {
    dir: PathBuf,
    port: u16,
    child: Child,
    /// Remove the data directory on drop.
    owns_dir: bool,
}

impl Serve {
    fn start(tag: &str, extra: &[&str]) -> Serve {
        let dir = PathBuf::from(format!(
            "/var/tmp/tuchka-limits-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        Self::start_in(dir, extra)
    }

    /// Start on the data directory `dir`, which exists.
    fn start_in(dir: PathBuf, extra: &[&str]) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.join("serve.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_tuchka"))
            .args(["serve", "--no-local-agent", "--data-dir"])
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--header-timeout",
                &format!("{HEADER_TIMEOUT_S}s"),
                "--idle-timeout",
                &format!("{IDLE_TIMEOUT_S}s"),
                "--max-connections",
                &MAX_CONNECTIONS.to_string(),
                "--max-connections-per-client",
                &PER_CLIENT.to_string(),
            ])
            .args(extra)
            .env("TUCHKA_LOG", "info,tuchka_controller::listen=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start tuchka serve");
        let s = Serve {
            dir,
            port,
            child,
            owns_dir: true,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if s.cli(&["host", "list"]).status.success() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tuchka serve did not answer:\n{}", s.log());
    }

    /// Stop (SIGTERM) and start again on the same data directory, without extra options.
    fn restart(mut self) -> Serve {
        self.owns_dir = false;
        let dir = self.dir.clone();
        drop(self);
        Serve::start_in(dir, &[])
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("tuchka.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// The CLI on the unix socket.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tuchka"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run tuchka")
    }

    /// The CLI over HTTPS with the API token and the CA pin.
    fn cli_tcp(&self, args: &[&str]) -> Output {
        let join = self.cli(&["host", "join-token", "-o", "json"]);
        let join: serde_json::Value = serde_json::from_slice(&join.stdout).expect("join json");
        let token = std::fs::read_to_string(self.dir.join("token")).expect("token");
        Command::new(env!("CARGO_BIN_EXE_tuchka"))
            .args(["--url", &format!("https://127.0.0.1:{}", self.port)])
            .args(["--token", token.trim()])
            .args([
                "--fingerprint",
                join["fingerprint"].as_str().expect("fingerprint"),
            ])
            .args(args)
            .output()
            .expect("run tuchka")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A TCP connection to the controller from the loopback address `src` (each is its own client).
fn connect_from(src: Ipv4Addr, port: u16) -> TcpStream {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &SocketAddrV4::new(src, 0)).expect("bind source address");
    connect(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).expect("connect");
    TcpStream::from(fd)
}

/// Whether the server closed `s` (a read sees EOF or a reset instead of waiting).
fn closed(s: &mut impl Read, set_timeout: impl Fn(Duration)) -> bool {
    set_timeout(Duration::from_millis(30));
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn tcp_closed(s: &mut TcpStream) -> bool {
    let c = s.try_clone().expect("clone");
    closed(s, move |d| {
        let _ = c.set_read_timeout(Some(d));
    })
}

fn unix_closed(s: &mut UnixStream) -> bool {
    let c = s.try_clone().expect("clone");
    closed(s, move |d| {
        let _ = c.set_read_timeout(Some(d));
    })
}

fn open_count(conns: &mut [TcpStream]) -> usize {
    conns
        .iter_mut()
        .filter(|s| !tcp_closed(&mut s.try_clone().expect("clone")))
        .count()
}

/// Whether `f` holds within 2 s (the server closes connections asynchronously).
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn floods_of_idle_and_slow_clients_are_closed_and_the_api_still_answers() {
    let s = Serve::start("conn", &[]);
    let t0 = Instant::now();

    // One client (127.0.0.2) opens far more than its cap: only PER_CLIENT stay open.
    let mut one: Vec<TcpStream> = (0..3 * PER_CLIENT)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 2), s.port))
        .collect();
    assert!(
        eventually(|| open_count(&mut one) == PER_CLIENT),
        "one client keeps at most --max-connections-per-client ({PER_CLIENT}) connections: {} open",
        open_count(&mut one)
    );
    // Many clients, one connection each, past the total cap: at most MAX_CONNECTIONS stay.
    let mut many: Vec<TcpStream> = (0..MAX_CONNECTIONS + 8)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 1, 1 + i as u8), s.port))
        .collect();
    assert!(
        eventually(|| open_count(&mut one) + open_count(&mut many) <= MAX_CONNECTIONS),
        "{} connections held, over --max-connections {MAX_CONNECTIONS}",
        open_count(&mut one) + open_count(&mut many)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(HEADER_TIMEOUT_S),
        "the flood is still being held"
    );
    // The API answers a real CLI call meanwhile (its connection evicts an idle one).
    ok(
        &s.cli_tcp(&["host", "list"]),
        "tuchka host list over HTTPS during the flood",
    );

    // Connections that never send a request are closed after the header timeout.
    std::thread::sleep(Duration::from_secs(HEADER_TIMEOUT_S + 2));
    assert_eq!(
        open_count(&mut one) + open_count(&mut many),
        0,
        "silent connections outlived --header-timeout"
    );

    // A TLS handshake sent a byte at a time (slowloris on the handshake) is closed too.
    let mut slow = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let start = Instant::now();
    let mut cut = None;
    for b in hello.iter().cycle().take(40) {
        if slow.write_all(&[*b]).is_err() || tcp_closed(&mut slow) {
            cut = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut = cut.expect("a byte-at-a-time handshake was never closed");
    assert!(
        cut < Duration::from_secs(HEADER_TIMEOUT_S + 2),
        "closed after {cut:?}"
    );

    // On the unix socket: a request head a header at a time (slowloris) is closed after the
    // header timeout although bytes keep coming.
    let mut loris = UnixStream::connect(s.socket()).expect("connect");
    loris
        .write_all(b"GET /v1/hosts HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let start = Instant::now();
    let mut cut = None;
    for i in 0..40 {
        if loris.write_all(format!("X-{i}: y\r\n").as_bytes()).is_err() || unix_closed(&mut loris) {
            cut = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut = cut.expect("a slow request head was never closed");
    assert!(
        cut < Duration::from_secs(HEADER_TIMEOUT_S + 2),
        "closed after {cut:?}"
    );

    // A keep-alive connection may rest between requests for the idle timeout (longer than
    // the header timeout), then it is closed.
    let mut keep = UnixStream::connect(s.socket()).expect("connect");
    keep.write_all(b"GET /v1/hosts HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut r = BufReader::new(keep.try_clone().expect("clone"));
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("head");
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).expect("body");
    std::thread::sleep(Duration::from_secs(HEADER_TIMEOUT_S + 1));
    assert!(
        !unix_closed(&mut keep),
        "an idle keep-alive connection was cut before --idle-timeout"
    );
    std::thread::sleep(Duration::from_secs(IDLE_TIMEOUT_S));
    assert!(
        unix_closed(&mut keep),
        "an idle keep-alive connection outlived --idle-timeout"
    );

    // A flood on the unix socket (one user): the CLI there still works.
    let flood: Vec<UnixStream> = (0..3 * MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(s.socket()).expect("connect"))
        .collect();
    ok(
        &s.cli(&["host", "list"]),
        "tuchka host list on the unix socket during a flood",
    );
    drop(flood);

    let log = s.log();
    assert!(
        log.contains("connection refused") || log.contains("cap reached"),
        "the caps are logged:\n{log}"
    );
}

#[test]
fn an_event_stream_outlives_the_idle_timeout() {
    let s = Serve::start("sse", &[]);
    let mut sse = UnixStream::connect(s.socket()).expect("connect");
    sse.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // Silent (no event, keep-alives every 15 s) for longer than the idle timeout.
    std::thread::sleep(Duration::from_secs(IDLE_TIMEOUT_S + 3));
    let raw = s.dir.join("disk.raw");
    let mut disk = vec![0u8; 1 << 20];
    disk[510] = 0x55;
    disk[511] = 0xaa;
    std::fs::write(&raw, &disk).expect("write raw disk");
    ok(
        &s.cli(&[
            "image",
            "upload",
            raw.to_str().expect("path"),
            "--name",
            "mbr",
        ]),
        "image upload",
    );
    sse.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("image.uploaded") && Instant::now() < deadline {
        match sse.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(
        seen.contains("image.uploaded"),
        "the event stream was cut or got nothing: {seen:?}\n{}",
        s.log()
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn uploads_over_the_limits_are_refused_and_leave_nothing() {
    let s = Serve::start(
        "upl",
        &["--max-upload-size", "8M", "--max-image-virtual-size", "1G"],
    );
    let d = s.dir.join("inputs");
    std::fs::create_dir_all(&d).expect("dir");
    let qi = |args: &[&str]| {
        let st = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
    };
    // Too big: 16 MiB, over the 8 MiB limit.
    let big = d.join("big.raw");
    let mut bytes = vec![0u8; 16 << 20];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    std::fs::write(&big, &bytes).expect("write");
    // A qcow2 of 64 TiB virtual size (about 1 MiB of file).
    let huge = d.join("huge.qcow2");
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        huge.to_str().expect("p"),
        "64T",
    ]);
    // Over this controller's 1 GiB virtual-size limit, but a fine image otherwise.
    let two_g = d.join("2g.qcow2");
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        two_g.to_str().expect("p"),
        "2G",
    ]);
    // No image at all, and an image format that is not accepted.
    let text = d.join("notes.txt");
    std::fs::write(&text, "just some text, not a disk\n".repeat(1000)).expect("write");
    let vmdk = d.join("disk.vmdk");
    qi(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        vmdk.to_str().expect("p"),
        "16M",
    ]);

    for (file, code, why) in [
        (
            &big,
            "UploadTooLarge",
            "larger than this controller accepts",
        ),
        (&huge, "ImageTooLarge", "virtual size"),
        (&two_g, "ImageTooLarge", "--max-image-virtual-size"),
        (&text, "InvalidImage", "neither qcow2 nor a raw disk image"),
        (&vmdk, "InvalidImage", "\"vmdk\" is not supported"),
    ] {
        let o = s.cli(&[
            "image",
            "upload",
            file.to_str().expect("p"),
            "--name",
            "bad",
            "-o",
            "json",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: accepted", file.display());
        assert!(
            err.contains(why),
            "{}: expected {why:?} in: {err}",
            file.display()
        );
        assert!(err.contains("\"bad\""), "the error names the image: {err}");
        let _ = code;
    }
    // The API's codes, for clients that branch on them.
    for (file, code) in [(&big, "UploadTooLarge"), (&huge, "ImageTooLarge")] {
        let bytes = std::fs::read(file).expect("read");
        let mut sock = UnixStream::connect(s.socket()).expect("connect");
        sock.write_all(
            format!(
                "POST /v1/images?name=bad HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            )
            .as_bytes(),
        )
        .expect("head");
        let _ = sock.write_all(&bytes);
        let mut answer = String::new();
        let _ = sock.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(&format!("\"code\":\"{code}\"")), "{answer}");
    }

    let list = s.cli(&["image", "list", "-o", "json"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "[]",
        "no rows"
    );
    assert!(
        files_in(&s.dir.join("images")).is_empty(),
        "nothing stored: {:?}",
        files_in(&s.dir.join("images"))
    );
    assert!(
        files_in(&s.dir.join("images/tmp")).is_empty(),
        "no temporary files: {:?}",
        files_in(&s.dir.join("images/tmp"))
    );
    // Under the limits, the same controller takes an image.
    let small = d.join("small.qcow2");
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        small.to_str().expect("p"),
        "512M",
    ]);
    ok(
        &s.cli(&[
            "image",
            "upload",
            small.to_str().expect("p"),
            "--name",
            "small",
        ]),
        "upload within the limits",
    );
}

/// A tmpfs mounted over `dir` for the test's life.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_upload_of_unknown_length_stops_when_the_store_runs_low() {
    // The image store on a 72 MiB file system: after the first 64 MiB the free space (8 MiB)
    // is under the 16 MiB kept free, and the upload (no Content-Length, so nothing could be
    // checked before) is stopped there.
    let dir = PathBuf::from(format!(
        "/var/tmp/tuchka-limits-full-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("dir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=72M", "tuchka-test"])
        .arg(&images)
        .status()
        .expect("mount");
    assert!(st.success(), "mount a tmpfs");
    let mount = Tmpfs(images.clone());
    let s = Serve::start_in(dir.clone(), &[]);
    let mut sock = UnixStream::connect(s.socket()).expect("connect");
    sock.write_all(
        b"POST /v1/images?name=big HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .expect("head");
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..100 {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(&chunk);
        piece.extend_from_slice(b"\r\n");
        if sock.write_all(&piece).is_err() {
            break;
        }
    }
    let _ = sock.write_all(b"0\r\n\r\n");
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(answer.contains("\"code\":\"StoreFull\""), "{answer}");
    assert!(
        answer.contains("fell below 16 MiB free"),
        "stopped by the check while writing: {answer}"
    );
    assert!(
        files_in(&images.join("tmp")).is_empty(),
        "the partial upload is gone: {:?}",
        files_in(&images.join("tmp"))
    );
    assert!(files_in(&images).is_empty(), "nothing stored");
    drop(s);
    drop(mount);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leftovers_of_interrupted_uploads_and_removals_are_swept_at_start() {
    let s = Serve::start("sweep", &[]);
    let d = s.dir.join("inputs");
    std::fs::create_dir_all(&d).expect("dir");
    let mut sha = std::collections::BTreeMap::new();
    for (name, size) in [("kept", "16M"), ("lost", "32M")] {
        let f = d.join(format!("{name}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&f)
            .arg(size)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let o = s.cli(&[
            "image",
            "upload",
            f.to_str().expect("p"),
            "--name",
            name,
            "-o",
            "json",
        ]);
        ok(&o, "upload");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        sha.insert(name, v["sha256"].as_str().expect("sha").to_string());
    }
    let images = s.dir.join("images");
    // A crash mid-upload (its temporary file), between an upload's file and its row (a file no
    // row names), and mid-removal (a row whose file is gone).
    std::fs::write(images.join("tmp/upload-4f1c"), b"half an upload").expect("plant");
    std::fs::write(images.join("tmp/convert-77aa"), b"half a conversion").expect("plant");
    let orphan = images.join(format!("{}.qcow2", "ab".repeat(32)));
    std::fs::write(&orphan, b"no row names me").expect("plant");
    std::fs::remove_file(images.join(format!("{}.qcow2", sha["lost"]))).expect("remove");
    let unrelated = images.join("README.txt");
    std::fs::write(&unrelated, b"not ours to judge").expect("plant");

    let s = s.restart();
    assert!(
        files_in(&images.join("tmp")).is_empty(),
        "temporary files swept: {:?}",
        files_in(&images.join("tmp"))
    );
    assert!(!orphan.exists(), "an image file no row names is removed");
    assert!(
        unrelated.exists(),
        "files that are not the store's are left alone"
    );
    let list = s.cli(&["image", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["kept"],
        "the row whose file is gone is removed, the other kept"
    );
    assert!(
        images.join(format!("{}.qcow2", sha["kept"])).exists(),
        "the kept image's file stays"
    );
    let log = s.log();
    for line in [
        "removed the temporary file of an interrupted upload",
        "removed an image file no image names",
        "image's file is missing and no group uses it: removed its row",
    ] {
        assert!(log.contains(line), "logged: {line:?}\n{log}");
    }
}

#[test]
fn a_stalled_upload_is_abandoned_after_the_idle_timeout_and_leaves_nothing() {
    let s = Serve::start("stall", &[]);
    let mut sock = UnixStream::connect(s.socket()).expect("connect");
    sock.write_all(
        b"POST /v1/images?name=slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 10485760\r\nConnection: close\r\n\r\n",
    )
    .expect("head");
    sock.write_all(&vec![0u8; 1 << 20]).expect("first MiB");
    // Then nothing: a request in service, its body stalled.
    let started = Instant::now();
    sock.set_read_timeout(Some(Duration::from_secs(3 * IDLE_TIMEOUT_S)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("stalled"), "{answer}");
    assert!(
        took >= Duration::from_secs(IDLE_TIMEOUT_S - 1)
            && took < Duration::from_secs(IDLE_TIMEOUT_S + 4),
        "abandoned after {took:?}"
    );
    assert!(
        files_in(&s.dir.join("images/tmp")).is_empty(),
        "the partial upload is gone"
    );
    assert_eq!(
        String::from_utf8_lossy(&s.cli(&["image", "list", "-o", "json"]).stdout).trim(),
        "[]"
    );
}
