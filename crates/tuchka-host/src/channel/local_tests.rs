//! The channel end to end inside one process, on 127.0.0.1 and temporary directories (no
//! libvirt, no root): a tunnel relays to unix sockets behind the server, refusals and cuts
//! close the local connections, files arrive verified. The same paths cannot be shared by
//! both ends in one mount namespace, so each end has its own run dir here.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const CLOUD: &str = "0f2a6c1e-0000-4000-8000-000000000001";

struct Pki {
    ca: tuchka_pki::CaPem,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            ca: tuchka_pki::create_ca("tuchka CA", SystemTime::now()).expect("ca"),
        }
    }

    fn identity(&self, host: &str) -> (String, String) {
        let key = tuchka_pki::create_host_key(host).expect("key");
        let cert = tuchka_pki::sign_host_csr(
            &self.ca.cert_pem,
            &self.ca.key_pem,
            host,
            &key.csr_pem,
            SystemTime::now(),
        )
        .expect("cert");
        (cert.cert_pem, key.key_pem)
    }

    fn client(&self, host: &str) -> Arc<rustls::ClientConfig> {
        let (cert, key) = self.identity(host);
        client_config(&self.ca.cert_pem, &cert, &key).expect("client")
    }

    fn server(&self, host: &str) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.identity(host);
        server_config(&self.ca.cert_pem, &cert, &key).expect("server")
    }
}

/// A unix echo server at `path` (plays libvirtd or a listening qemu).
fn echo(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind echo");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

async fn round_trip(path: &Path, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_relays_streams_and_a_cut_closes_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new();
    let (src_run, dst_run) = (tmp.path().join("src"), tmp.path().join("dst"));
    let libvirt_sock = tmp.path().join("libvirt-sock");
    echo(&libvirt_sock);
    let admission = MigrationAdmission::new(&dst_run, CLOUD, &libvirt_sock).with_qemu_gid(None);
    let _guard = admission
        .expect(Incoming {
            migration_id: "m1".into(),
            source_host_id: "src".into(),
            vm_id: "vm-1".into(),
            live: true,
            files: vec![],
        })
        .expect("expect");
    let dst_paths = MigrationPaths::new(&dst_run, CLOUD, "m1").expect("paths");
    echo(&dst_paths.memory); // qemu listening on the destination
    let server = ChannelServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        pki.server("dst"),
        Arc::new(admission.clone()),
    )
    .await
    .expect("bind");

    let src_paths = MigrationPaths::new(&src_run, CLOUD, "m1").expect("paths");
    let tunnel = Tunnel::open(
        TunnelConfig {
            paths: src_paths.clone(),
            migration_id: "m1".into(),
            target: Peer {
                host_id: "dst".into(),
                addr: server.local_addr(),
            },
            qemu_gid: None,
        },
        pki.client("src"),
    )
    .await
    .expect("tunnel");

    assert_eq!(
        round_trip(&src_paths.libvirt, b"hello libvirt")
            .await
            .expect("libvirt"),
        b"hello libvirt"
    );
    let big = vec![7u8; 3 << 20];
    assert_eq!(
        round_trip(&src_paths.memory, &big).await.expect("memory"),
        big
    );
    // The relay counts a chunk once it has written it on: the echo can come back a moment
    // before the last counts of either way land.
    let settled = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while (tunnel.stats().memory.to_target() < 3 << 20
        || tunnel.stats().memory.from_target() < 3 << 20)
        && std::time::Instant::now() < settled
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stats = tunnel.stats().clone();
    assert_eq!(stats.libvirt.to_target(), 13);
    assert_eq!(stats.memory.to_target(), 3 << 20);
    assert_eq!(stats.memory.from_target(), 3 << 20);

    // Nothing listens on the destination's disk socket: the stream is refused and closed.
    let mut disk = UnixStream::connect(&src_paths.disk).await.expect("disk");
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), disk.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let problems = stats.problems();
    assert!(
        problems.iter().any(|p| p.contains("nothing listens")),
        "{problems:?}"
    );

    // A cut closes the open connections and the listeners.
    let mut open = UnixStream::connect(&src_paths.libvirt)
        .await
        .expect("libvirt");
    open.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    open.read_exact(&mut one)
        .await
        .expect("echo before the cut");
    tunnel.cut("test");
    let n = tokio::time::timeout(Duration::from_secs(10), open.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the cut closes the connection");
    assert!(tunnel.handle().is_cut());
    assert!(tunnel
        .stats()
        .problems()
        .iter()
        .any(|p| p == "channel cut: test"));
    drop(tunnel);
    assert!(!src_paths.dir.exists(), "the tunnel removes its directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_arrive_verified_and_strangers_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new();
    let admission =
        MigrationAdmission::new(&tmp.path().join("run"), CLOUD, Path::new("/nonexistent"))
            .with_qemu_gid(None);
    let dest = tmp.path().join("root.qcow2");
    let _guard = admission
        .expect(Incoming {
            migration_id: "m2".into(),
            source_host_id: "src".into(),
            vm_id: "vm-2".into(),
            live: false,
            files: vec![("vm-2".into(), dest.clone())],
        })
        .expect("expect");
    let server = ChannelServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        pki.server("dst"),
        Arc::new(admission),
    )
    .await
    .expect("bind");
    let peer = Peer {
        host_id: "dst".into(),
        addr: server.local_addr(),
    };
    let src = tmp.path().join("src.qcow2");
    let data: Vec<u8> = (0..(5 << 20) + 17).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).expect("write");

    let sent = send_file(&pki.client("src"), &peer, "m2", "vm-2", &src)
        .await
        .expect("send");
    assert_eq!(sent.bytes, data.len() as u64);
    assert_eq!(std::fs::read(&dest).expect("arrived"), data);
    assert_eq!(sent.sha256, tuchka_pki::fingerprint(&data));

    // Another host of the cloud, a wrong VM, and a client of another CA get nothing.
    let err = send_file(&pki.client("other"), &peer, "m2", "vm-2", &src)
        .await
        .expect_err("other host");
    assert!(err.to_string().contains("not the source"), "{err}");
    let err = send_file(&pki.client("src"), &peer, "m2", "vm-3", &src)
        .await
        .expect_err("other vm");
    assert!(err.to_string().contains("expects no disk vm-3"), "{err}");
    let stranger = Pki::new().client("src");
    let err = send_file(&stranger, &peer, "m2", "vm-2", &src)
        .await
        .expect_err("other CA");
    assert!(matches!(err, ChannelError::Handshake { .. }), "{err:?}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(server.stats().files_stored.load(Relaxed), 1);
    assert!(server.stats().refused.load(Relaxed) >= 2);
}

#[tokio::test]
async fn garbage_and_silence_get_no_stream() {
    let pki = Pki::new();
    let tmp = tempfile::tempdir().expect("tmp");
    let admission = MigrationAdmission::new(tmp.path(), CLOUD, Path::new("/x")).with_qemu_gid(None);
    let server = ChannelServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        pki.server("dst"),
        Arc::new(admission),
    )
    .await
    .expect("bind");
    // Plain text instead of TLS: the handshake fails and the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("OK"));
    let stats = server.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.handshake_failed.load(Relaxed), 1);
    assert_eq!(stats.admitted.load(Relaxed), 0);
}
