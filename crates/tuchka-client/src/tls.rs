//! TLS towards the controller's TCP listener.
//!
//! A tuchka controller signs its server certificate with its own CA, so there is no web PKI to
//! trust: the client pins the sha256 of a certificate in the chain the server presents
//! ([`PinnedVerifier`], `--fingerprint`). Pinning the CA (what `tuchka host join-token` prints)
//! still checks the chain, the validity period and that the certificate covers the address
//! connected to; pinning the server certificate itself accepts exactly that certificate. The
//! handshake signatures are checked either way. Without a pin the system's trusted CAs are
//! used (a controller behind a proxy with a public certificate), and a tuchka controller's own
//! certificate fails with a hint to pass `--fingerprint` ([`describe`]).

use std::error::Error as StdError;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// What to tell a user whose `--fingerprint` does not match.
const PIN_HINT: &str =
    "check --fingerprint: on the controller, `tuchka host join-token` prints the right one";

/// The server's certificates do not include the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate fingerprint mismatch: expected {expected}, got {got}")]
pub struct FingerprintMismatch {
    /// The pinned sha256.
    pub expected: String,
    /// sha256 of the root-most certificate the server presented (its CA for a tuchka controller).
    pub got: String,
}

/// A certificate's sha256, lowercase hex (one definition for the whole workspace).
pub use tuchka_pki::fingerprint;

/// `sha` as 64 lowercase hex digits. Accepts upper case, `:` separators (as `openssl x509
/// -fingerprint` prints them) and a `sha256:` prefix.
pub fn normalize_fingerprint(sha: &str) -> Result<String, String> {
    let s = sha.trim();
    let s = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .unwrap_or(s);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{sha:?} is not a sha256 fingerprint (64 hex digits, e.g. from `tuchka host join-token`)"
        ));
    }
    Ok(hex)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a server by a pinned certificate sha256 instead of the web PKI.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// A verifier for `pin` (normalized, see [`normalize_fingerprint`]).
    pub fn new(pin: String) -> Self {
        PinnedVerifier {
            pin,
            provider: provider(),
        }
    }

    fn mismatch(
        &self,
        end_entity: &CertificateDer<'_>,
        others: &[CertificateDer<'_>],
    ) -> rustls::Error {
        let got = others.last().unwrap_or(end_entity);
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            FingerprintMismatch {
                expected: self.pin.clone(),
                got: fingerprint(got),
            },
        ))))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(pos) = intermediates
            .iter()
            .position(|c| fingerprint(c) == self.pin)
        else {
            return Err(self.mismatch(end_entity, intermediates));
        };
        // The pinned certificate is the trust anchor; the rest is checked as usual.
        let mut roots = RootCertStore::empty();
        roots.add(intermediates[pos].clone().into_owned())?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, c)| c.clone())
            .collect();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client's TLS configuration: pinned when `pin` is given (normalized), else the system's
/// trusted CAs (none when they cannot be loaded: every certificate then fails with a hint).
pub fn client_config(pin: Option<&str>) -> Result<ClientConfig, rustls::Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match pin {
        Some(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(pin.to_string())))
            .with_no_client_auth(),
        None => {
            use hyper_rustls::ConfigBuilderExt;
            let builder = builder.clone();
            match builder.with_native_roots() {
                Ok(b) => b.with_no_client_auth(),
                Err(_) => ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            }
        }
    };
    // ALPN is set by the connector (hyper-rustls refuses a preset one).
    Ok(config)
}

/// The rustls error somewhere in `err`'s chain (also inside `io::Error`s, whose `source()`
/// skips the error they wrap).
pub fn find_rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &'a (dyn StdError + 'static) = inner;
            if let Some(r) = find_rustls_error(inner) {
                return Some(r);
            }
        }
        current = e.source();
    }
    None
}

/// A TLS failure in words, with what to do about it. `pinned`: a fingerprint was given.
pub fn describe(err: &rustls::Error, pinned: bool) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<FingerprintMismatch>() {
                Some(m) => format!("{m} ({PIN_HINT})"),
                None => format!("{err}"),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) if !pinned => {
            "the server's certificate is not signed by a CA this machine trusts; a tuchka \
             controller uses its own CA: pass --fingerprint SHA256 (or TUCHKA_FINGERPRINT; on the \
             controller, `tuchka host join-token` prints it)"
                .to_string()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "{err}: connect to an address the controller's certificate covers (its IPv4 \
             addresses, its host name or localhost; it adds new addresses when restarted)"
        ),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized() {
        let hex = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&hex), Ok(hex.clone()));
        assert_eq!(normalize_fingerprint(&hex.to_uppercase()), Ok(hex.clone()));
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")), Ok(hex.clone()));
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{hex}")),
            Ok(hex.clone())
        );
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_mismatch_is_found_inside_io_errors_and_explained() {
        let mismatch = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(FingerprintMismatch {
                expected: "aa".into(),
                got: "bb".into(),
            })),
        ));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, mismatch);
        let wrapped = std::io::Error::other(io);
        let found = find_rustls_error(&wrapped).expect("found");
        let text = describe(found, true);
        assert!(
            text.starts_with("certificate fingerprint mismatch: expected aa, got bb"),
            "{text}"
        );
        assert!(text.contains("tuchka host join-token"), "{text}");
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(describe(&unknown, false).contains("--fingerprint"));
        assert!(find_rustls_error(&std::io::Error::other("plain")).is_none());
    }
}

/// The client against a real TLS server with a CA-signed certificate, the way a controller
/// serves one.
#[cfg(test)]
mod handshake_tests {
    use super::*;
    use crate::{Client, ClientError, Endpoint};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    }

    fn pki(names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        }
    }

    /// Serve `[]` to every request on 127.0.0.1 until the test ends; returns the port.
    async fn serve(p: &Pki) -> u16 {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![p.leaf.clone(), p.ca.clone()], p.key.clone_key())
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        port
    }

    fn client(port: u16, host: &str) -> Client {
        Client::new(Endpoint::Http {
            url: format!("https://{host}:{port}"),
            token: None,
        })
    }

    async fn list(c: &Client) -> Result<Vec<String>, ClientError> {
        c.get::<Vec<String>>("/v1/x").await
    }

    #[tokio::test]
    async fn a_pinned_ca_or_leaf_is_trusted_and_anything_else_is_refused_clearly() {
        let p = pki(&["127.0.0.1", "localhost"]);
        let port = serve(&p).await;
        let ca_sha = fingerprint(&p.ca);

        let ok = client(port, "127.0.0.1").with_fingerprint(&ca_sha);
        assert_eq!(list(&ok).await.expect("pinned CA"), Vec::<String>::new());
        let ok = client(port, "localhost").with_fingerprint(&ca_sha.to_uppercase());
        list(&ok).await.expect("pinned CA, by name");
        let ok = client(port, "127.0.0.1").with_fingerprint(&fingerprint(&p.leaf));
        list(&ok).await.expect("pinned leaf");

        let wrong = "0".repeat(64);
        let err = list(&client(port, "127.0.0.1").with_fingerprint(&wrong))
            .await
            .expect_err("wrong pin");
        let text = err.to_string();
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
        assert!(
            text.contains(&format!(
                "certificate fingerprint mismatch: expected {wrong}, got {ca_sha}"
            )),
            "{text}"
        );

        let err = list(&client(port, "127.0.0.1")).await.expect_err("no pin");
        assert!(err.to_string().contains("pass --fingerprint"), "{err}");

        let err = list(&client(port, "127.0.0.1").with_fingerprint("nope"))
            .await
            .expect_err("bad pin");
        assert!(
            matches!(err, ClientError::InvalidFingerprint { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_pinned_ca_still_checks_the_address() {
        let p = pki(&["10.9.9.9"]);
        let port = serve(&p).await;
        let err = list(&client(port, "127.0.0.1").with_fingerprint(&fingerprint(&p.ca)))
            .await
            .expect_err("name not covered");
        assert!(err.to_string().contains("certificate covers"), "{err}");
    }
}
