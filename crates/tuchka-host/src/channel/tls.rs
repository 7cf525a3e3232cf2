//! rustls configurations of the channel, from the cloud's CA and the host's certificate.
//!
//! Both sides trust only the cloud's CA (`ca.crt` of the controller) and present the host's
//! certificate (issued at join by `tuchka_pki::sign_host_csr`). The server requires a client
//! certificate; the client checks that the server's certificate names the host it meant to
//! reach (`h-<host-id>.tuchka`). ALPN [`ALPN`] keeps the port from being mistaken for anything
//! else.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ChannelError;

/// The channel's ALPN protocol name.
pub const ALPN: &[u8] = b"tuchka-channel/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, ChannelError> {
    let mut roots = RootCertStore::empty();
    let mut any = false;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|source| ChannelError::Pem {
            what: "CA certificate",
            source,
        })?;
        roots.add(cert).map_err(|source| ChannelError::Tls {
            what: "the CA certificate",
            source,
        })?;
        any = true;
    }
    if !any {
        return Err(ChannelError::invalid(
            "channel TLS",
            "the CA PEM holds no certificate",
        ));
    }
    Ok(Arc::new(roots))
}

fn identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ChannelError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| ChannelError::Pem {
            what: "host certificate",
            source,
        })?;
    if chain.is_empty() {
        return Err(ChannelError::invalid(
            "channel TLS",
            "the host certificate PEM holds no certificate",
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| ChannelError::Pem {
            what: "host key",
            source,
        })?;
    Ok((chain, key))
}

/// The channel server's configuration: TLS 1.2/1.3, a client certificate signed by the CA is
/// required, the host presents its own certificate.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, ChannelError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(ChannelError::Verifier)?;
    let (chain, key) = identity(cert_pem, key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ChannelError::Tls {
            what: "the protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| ChannelError::Tls {
            what: "the host certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The channel client's configuration: trusts only the CA, authenticates with the host's
/// certificate.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, ChannelError> {
    let (chain, key) = identity(cert_pem, key_pem)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ChannelError::Tls {
            what: "the protocol versions",
            source,
        })?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(|source| ChannelError::Tls {
            what: "the host certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CA but presents no certificate (tests of the
/// server's refusal; a host never uses it).
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, ChannelError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ChannelError::Tls {
            what: "the protocol versions",
            source,
        })?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_pem_is_named() {
        let err = server_config("nope", "nope", "nope").expect_err("no CA");
        assert!(err.to_string().contains("CA"), "{err}");
        let ca = tuchka_pki::create_ca("t", std::time::SystemTime::now()).expect("ca");
        let err = client_config(&ca.cert_pem, "nope", "nope").expect_err("no cert");
        assert!(err.to_string().contains("host certificate"), "{err}");
        let host = tuchka_pki::create_host_key("h1").expect("key");
        let cert = tuchka_pki::sign_host_csr(
            &ca.cert_pem,
            &ca.key_pem,
            "h1",
            &host.csr_pem,
            std::time::SystemTime::now(),
        )
        .expect("cert");
        client_config(&ca.cert_pem, &cert.cert_pem, &host.key_pem).expect("client");
        server_config(&ca.cert_pem, &cert.cert_pem, &host.key_pem).expect("server");
        let err = client_config(&ca.cert_pem, &cert.cert_pem, "junk").expect_err("no key");
        assert!(err.to_string().contains("host key"), "{err}");
    }
}
