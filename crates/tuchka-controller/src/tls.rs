//! TLS of the controller's TCP listener (`tuchka serve --listen`): HTTPS only, never plain HTTP.
//!
//! On first start [`ensure_tls`] creates a private CA and a server certificate signed by it in
//! `<data-dir>/tls/` (`ca.crt`, `ca.key`, `server.crt`, `server.key`, keys mode 0600, plus
//! `server.json`: the names the server certificate covers and when it ends); later starts
//! reuse them. Agents and the CLI trust the controller by pinning the sha256 of the CA
//! certificate ([`fingerprint`]), so the CA is never replaced; the server certificate is
//! re-issued by the same CA when the names it must cover change (a new address, another
//! `--listen`) or when it nears its end, and the pin stays valid.
//!
//! The server certificate covers `localhost`, the host name, 127.0.0.1, every non-loopback IPv4
//! address of the host ([`local_ipv4s`], read from `/proc/net/fib_trie`) and the `--listen`
//! address ([`server_names`]). [`crate::listen::serve_tls`] serves with it: each handshake in
//! its connection's own task, within the header timeout, so a slow or plain-HTTP client never
//! holds up the others (plain HTTP gets no answer but a closed connection).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;

/// Common name of the controller's CA (fixed: re-issuing server certificates relies on it).
const CA_COMMON_NAME: &str = "tuchka CA";
/// Organisation in the subjects of the CA and the server certificate.
const ORGANIZATION: &str = "tuchka";
/// How long the CA is valid.
const CA_DAYS: i64 = 20 * 365;
/// How long a server certificate is valid.
const SERVER_DAYS: i64 = 5 * 365;
/// A server certificate this close to its end is re-issued at start.
const RENEW_BEFORE_DAYS: i64 = 30;

/// A failure to set up TLS.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored certificate or key does not parse.
    #[error("{} is not a valid {what} (to start over remove {}; agents then need the new fingerprint)", path.display(), dir.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TLS directory.
        dir: PathBuf,
        /// "certificate", "private key".
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Only part of the CA is there: replacing it would break every agent's pin.
    #[error("{} exists but {} is missing (restore it, or remove {} to start over; agents then need the new fingerprint)", have.display(), missing.display(), dir.display())]
    IncompleteCa {
        /// The file that exists.
        have: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
        /// The TLS directory.
        dir: PathBuf,
    },
    /// rcgen could not make a key or a certificate.
    #[error("cannot generate the {what}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the certificate and key.
    #[error("the TLS server configuration was refused")]
    Config(#[source] rustls::Error),
}

type Result<T> = std::result::Result<T, TlsError>;

/// The TLS set-up of the TCP listener.
pub struct ServerTls {
    /// rustls configuration of the listener.
    pub config: Arc<ServerConfig>,
    /// sha256 (hex) of the CA certificate's DER: what agents pass as `--fingerprint`.
    pub ca_fingerprint: String,
    /// Names the server certificate covers.
    pub names: Vec<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("names", &self.names)
            .finish()
    }
}

/// What `server.json` records about `server.crt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServerMeta {
    /// Names (DNS names and IP addresses) in the certificate.
    names: Vec<String>,
    /// End of validity, Unix seconds.
    not_after_unix: i64,
}

/// sha256 of a certificate's DER, lowercase hex (one definition for the whole workspace).
pub use tuchka_pki::fingerprint;

/// The local IPv4 addresses in the text of `/proc/net/fib_trie` (entries marked `host LOCAL`),
/// without loopback ones, in order of appearance, each once.
pub fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("|-- ") {
            last = rest.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = last.take() {
                if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

/// The non-loopback IPv4 addresses of this host (in its network namespace); empty, with a
/// warning, when the kernel's table cannot be read.
pub fn local_ipv4s() -> Vec<Ipv4Addr> {
    match std::fs::read_to_string("/proc/net/fib_trie") {
        Ok(text) => parse_fib_trie(&text),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/net/fib_trie: the server certificate covers only localhost, the host name and the --listen address");
            Vec::new()
        }
    }
}

/// True when `name` can be a DNS name in a certificate.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The names the server certificate must cover: `localhost`, `host_name` (when it is a valid
/// DNS name), 127.0.0.1, `local_ips` and the `--listen` address (unless it is 0.0.0.0 / ::).
/// Each once, in that order.
pub fn server_names(listen: SocketAddr, host_name: &str, local_ips: &[Ipv4Addr]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into()];
    let host_name = host_name.trim().to_ascii_lowercase();
    if is_dns_name(&host_name) {
        names.push(host_name);
    }
    names.push(Ipv4Addr::LOCALHOST.to_string());
    names.extend(local_ips.iter().map(|ip| ip.to_string()));
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut seen = BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The URL agents should use: `https://ADDR:PORT` with the `--listen` address, or, when that
/// is 0.0.0.0 / ::, the first non-loopback IPv4 of the host (127.0.0.1 if there is none).
pub fn advertised_url(listen: SocketAddr, local_ips: &[Ipv4Addr]) -> String {
    let ip = if listen.ip().is_unspecified() {
        local_ips
            .first()
            .map(|ip| IpAddr::V4(*ip))
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        listen.ip()
    };
    format!("https://{}", SocketAddr::new(ip, listen.port()))
}

/// True when a server certificate described by `meta` can be kept: it covers every name in
/// `wanted` and does not end within [`RENEW_BEFORE_DAYS`] of `now_unix`.
fn server_cert_fits(meta: &ServerMeta, wanted: &[String], now_unix: i64) -> bool {
    let have: BTreeSet<&str> = meta.names.iter().map(String::as_str).collect();
    wanted.iter().all(|n| have.contains(n.as_str()))
        && meta.not_after_unix - now_unix > RENEW_BEFORE_DAYS * 86_400
}

/// The parameters of the CA. Only the subject, key usages and key-id method matter to sign
/// with it later, so they must stay the same across versions.
fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(CA_DAYS);
    p.serial_number = Some(random_serial());
    p
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn gen_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |source| TlsError::Generate { what, source }
}

/// A server certificate for `names`, signed by the CA key. Returns (cert PEM, key PEM, meta).
fn issue_server_cert(
    ca_key: &KeyPair,
    names: &[String],
    now: OffsetDateTime,
) -> Result<(String, String, ServerMeta)> {
    let key = KeyPair::generate().map_err(gen_error("server key"))?;
    let mut p = CertificateParams::new(names.to_vec()).map_err(gen_error("server certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tuchka controller");
    dn.push(DnType::OrganizationName, ORGANIZATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(SERVER_DAYS);
    p.serial_number = Some(random_serial());
    let issuer = Issuer::new(ca_params(now), ca_key);
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(gen_error("server certificate"))?;
    let meta = ServerMeta {
        names: names.to_vec(),
        not_after_unix: p.not_after.unix_timestamp(),
    };
    Ok((cert.pem(), key.serialize_pem(), meta))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io {
        action,
        path,
        source,
    }
}

/// Write `bytes` to `path` with `mode`, atomically (temporary file + rename).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error("write", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_error("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("write", path))
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

/// Make sure `dir` holds a CA and a server certificate covering `names`, then build the
/// listener's configuration. Creates what is missing (the CA only when neither its
/// certificate nor its key exists), re-issues the server certificate when it does not fit.
pub fn ensure_tls(dir: &Path, names: &[String]) -> Result<ServerTls> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("set permissions of", dir))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (srv_crt, srv_key, srv_meta) = (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("server.json"),
    );
    let parse = |path: &Path, what: &'static str| {
        let (path, dir) = (path.to_path_buf(), dir.to_path_buf());
        move |e: Box<dyn std::error::Error + Send + Sync>| TlsError::Parse {
            path,
            dir,
            what,
            source: e,
        }
    };
    let now = OffsetDateTime::now_utc();

    let (ca_pem, ca_key_pem) = match (read_text(&ca_crt)?, read_text(&ca_key)?) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            let key = KeyPair::generate().map_err(gen_error("CA key"))?;
            let cert = ca_params(now)
                .self_signed(&key)
                .map_err(gen_error("CA certificate"))?;
            write_file(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&ca_crt, cert.pem().as_bytes(), 0o644)?;
            // A new CA makes any old server certificate useless.
            let _ = std::fs::remove_file(&srv_meta);
            tracing::info!(dir = %dir.display(), "created the controller's TLS CA");
            (cert.pem(), key.serialize_pem())
        }
        (Some(_), None) => {
            return Err(TlsError::IncompleteCa {
                have: ca_crt,
                missing: ca_key,
                dir: dir.to_path_buf(),
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::IncompleteCa {
                have: ca_key,
                missing: ca_crt,
                dir: dir.to_path_buf(),
            })
        }
    };
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| parse(&ca_crt, "certificate")(Box::new(e)))?;

    let meta: Option<ServerMeta> = read_text(&srv_meta)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|_| srv_crt.exists() && srv_key.exists());
    let keep = meta
        .as_ref()
        .is_some_and(|m| server_cert_fits(m, names, now.unix_timestamp()));
    if !keep {
        let ca_signing_key = KeyPair::from_pem(&ca_key_pem)
            .map_err(|e| parse(&ca_key, "private key")(Box::new(e)))?;
        let (crt, key, meta) = issue_server_cert(&ca_signing_key, names, now)?;
        write_file(&srv_key, key.as_bytes(), 0o600)?;
        write_file(&srv_crt, crt.as_bytes(), 0o644)?;
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        write_file(&srv_meta, &json, 0o644)?;
        tracing::info!(names = ?names, "issued the controller's TLS server certificate");
    }
    let server_der = CertificateDer::from_pem_file(&srv_crt)
        .map_err(|e| parse(&srv_crt, "certificate")(Box::new(e)))?;
    let key_der = PrivateKeyDer::from_pem_file(&srv_key)
        .map_err(|e| parse(&srv_key, "private key")(Box::new(e)))?;
    let ca_fingerprint = fingerprint(&ca_der);
    let config = server_config(vec![server_der, ca_der], key_der)?;
    Ok(ServerTls {
        config,
        ca_fingerprint,
        names: names.to_vec(),
    })
}

/// The rustls server configuration: TLS 1.2/1.3 with the ring provider, HTTP/1.1, the chain
/// `[server, CA]` so clients can pin the CA.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sign host `host_id`'s certificate request for its migration channel with the cloud's CA.
/// `Ok(None)` when this controller has no CA (it was started without `--listen`: a single-host
/// cloud has no peers). Returns (certificate PEM, CA certificate PEM).
pub fn sign_host_csr(
    ctl: &crate::Controller,
    host_id: &str,
    csr_pem: &str,
) -> std::result::Result<Option<(String, String)>, String> {
    let dir = ctl.config().data_dir.join("tls");
    let read = |f: &str| read_text(&dir.join(f)).map_err(|e| e.to_string());
    let (Some(ca), Some(key)) = (read("ca.crt")?, read("ca.key")?) else {
        return Ok(None);
    };
    let cert = tuchka_pki::sign_host_csr(&ca, &key, host_id, csr_pem, std::time::SystemTime::now())
        .map_err(|e| {
            let mut text = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                text += &format!(": {c}");
                cur = c.source();
            }
            text
        })?;
    Ok(Some((cert.cert_pem, ca)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
     |-- 10.9.0.1
        /32 host LOCAL
Local:
     |-- 192.0.2.2
        /32 host LOCAL
";

    #[test]
    fn fib_trie_yields_local_non_loopback_addresses_once() {
        assert_eq!(
            parse_fib_trie(FIB_TRIE),
            vec![Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(10, 9, 0, 1)]
        );
        assert!(parse_fib_trie("").is_empty());
    }

    #[test]
    fn names_cover_localhost_the_host_its_addresses_and_the_listen_address() {
        let ips = [Ipv4Addr::new(192, 0, 2, 2)];
        let listen: SocketAddr = "10.0.0.1:7480".parse().expect("addr");
        assert_eq!(
            server_names(listen, "Node-1\n", &ips),
            ["localhost", "node-1", "127.0.0.1", "192.0.2.2", "10.0.0.1"]
        );
        let any: SocketAddr = "0.0.0.0:7480".parse().expect("addr");
        assert_eq!(
            server_names(any, "bad name!", &[Ipv4Addr::new(192, 0, 2, 2)]),
            ["localhost", "127.0.0.1", "192.0.2.2"]
        );
        let dup: SocketAddr = "192.0.2.2:1".parse().expect("addr");
        assert_eq!(server_names(dup, "", &ips).len(), 3);
    }

    #[test]
    fn the_advertised_url_names_a_reachable_address() {
        let ips = [Ipv4Addr::new(192, 0, 2, 2)];
        let listen: SocketAddr = "10.0.0.1:7480".parse().expect("addr");
        assert_eq!(advertised_url(listen, &ips), "https://10.0.0.1:7480");
        let any: SocketAddr = "0.0.0.0:7480".parse().expect("addr");
        assert_eq!(advertised_url(any, &ips), "https://192.0.2.2:7480");
        assert_eq!(advertised_url(any, &[]), "https://127.0.0.1:7480");
    }

    #[test]
    fn a_server_certificate_is_kept_while_it_covers_the_names_and_is_not_ending() {
        let meta = ServerMeta {
            names: vec!["localhost".into(), "10.0.0.1".into()],
            not_after_unix: 1_000 * 86_400,
        };
        let now = 10 * 86_400;
        assert!(server_cert_fits(&meta, &["10.0.0.1".into()], now));
        assert!(!server_cert_fits(&meta, &["10.0.0.2".into()], now));
        assert!(!server_cert_fits(
            &meta,
            &["localhost".into()],
            990 * 86_400
        ));
    }

    fn verify(
        ca: &CertificateDer<'static>,
        leaf: &CertificateDer<'static>,
        name: &str,
    ) -> std::result::Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            v.as_ref(),
            leaf,
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn files_are_created_once_and_the_server_certificate_follows_the_names() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("tls");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let first = ensure_tls(&dir, &names).expect("first");
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let ca = CertificateDer::from_pem_file(dir.join("ca.crt")).expect("ca");
        assert_eq!(first.ca_fingerprint, fingerprint(&ca));
        let leaf1 = CertificateDer::from_pem_file(dir.join("server.crt")).expect("leaf");
        verify(&ca, &leaf1, "127.0.0.1").expect("the CA signed the server certificate");
        verify(&ca, &leaf1, "localhost").expect("localhost");
        assert!(verify(&ca, &leaf1, "10.1.2.3").is_err(), "not covered");

        // Same names: everything is reused.
        let again = ensure_tls(&dir, &names).expect("again");
        assert_eq!(again.ca_fingerprint, first.ca_fingerprint);
        let leaf2 = CertificateDer::from_pem_file(dir.join("server.crt")).expect("leaf");
        assert_eq!(leaf1, leaf2);

        // A new address: same CA (the pin holds), a new server certificate that covers it.
        let more = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "10.1.2.3".to_string(),
        ];
        let third = ensure_tls(&dir, &more).expect("third");
        assert_eq!(third.ca_fingerprint, first.ca_fingerprint);
        let leaf3 = CertificateDer::from_pem_file(dir.join("server.crt")).expect("leaf");
        assert_ne!(leaf1, leaf3);
        verify(&ca, &leaf3, "10.1.2.3").expect("re-issued by the same CA");

        // The CA signs host certificates (tuchka-pki) that verify against it.
        let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).expect("ca.crt");
        let ca_key = std::fs::read_to_string(dir.join("ca.key")).expect("ca.key");
        let host = tuchka_pki::create_host_key("h1").expect("host key");
        let cert = tuchka_pki::sign_host_csr(
            &ca_pem,
            &ca_key,
            "h1",
            &host.csr_pem,
            std::time::SystemTime::now(),
        )
        .expect("the controller's CA signs a host CSR");
        let leaf = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).expect("leaf");
        verify(&ca, &leaf, &tuchka_pki::host_dns_name("h1")).expect("host cert verifies");
        assert_eq!(tuchka_pki::peer_host_id(&leaf).as_deref(), Some("h1"));

        // Half a CA is an error, not a silent new CA.
        std::fs::remove_file(dir.join("ca.key")).expect("rm");
        let err = ensure_tls(&dir, &names).expect_err("incomplete CA");
        assert!(err.to_string().contains("ca.key is missing"), "{err}");
    }
}
