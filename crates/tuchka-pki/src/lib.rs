//! Host identities of a tuchka cloud: certificates issued by the cloud's CA to each host.
//!
//! The controller keeps a CA (`<data-dir>/tls/ca.{crt,key}`, made by the controller's TLS
//! module). When a host joins, its agent makes a key and a certificate signing request
//! ([`create_host_key`]); the controller signs it ([`sign_host_csr`]) with a certificate that
//! names **only** the host id it registered, whatever the request asked for: one DNS name
//! `h-<host-id>.tuchka` ([`host_dns_name`]), usable for TLS client and server authentication.
//! Hosts then authenticate each other with it (the migration channel of `tuchka-host`): a TLS
//! peer whose chain verifies against the CA is a host of this cloud, and [`peer_host_id`] says
//! which one.
//!
//! Everything here is pure: PEM strings in, PEM strings out, the current time passed in. No
//! file, clock or random source is touched (serial numbers are derived from the request's key,
//! the host id and the time).

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The DNS suffix of host names in host certificates.
pub const HOST_DNS_SUFFIX: &str = ".tuchka";
/// The DNS prefix of host names in host certificates.
pub const HOST_DNS_PREFIX: &str = "h-";
/// How long a host certificate is valid.
pub const HOST_CERT_DAYS: i64 = 5 * 365;
/// How long a CA made by [`create_ca`] is valid.
pub const CA_DAYS: i64 = 20 * 365;
/// Organisation in the subjects of the certificates made here.
const ORGANIZATION: &str = "tuchka";
/// Longest host id: `h-` + id must fit in one 63-byte DNS label.
const MAX_HOST_ID: usize = 61;

/// What can go wrong while making or signing a host identity.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A host id that cannot be put into a certificate.
    #[error("host id {0:?} is not valid: use 1-61 characters of a-z, 0-9 and '-', not starting or ending with '-'")]
    BadHostId(String),
    /// rcgen could not make a key.
    #[error("cannot generate the key of {what}")]
    Key {
        /// Whose key ("host 1a2b…", "the CA").
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The certificate signing request could not be made.
    #[error("cannot make the certificate signing request of host {host_id}")]
    Csr {
        /// The host id.
        host_id: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The request is not PEM, does not parse, or its signature does not verify.
    #[error("the certificate signing request of host {host_id} is not valid (not a PEM CSR, or its signature does not verify)")]
    BadCsr {
        /// The host id it was sent for.
        host_id: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate does not parse.
    #[error("the CA certificate is not a valid PEM certificate")]
    BadCaCert(#[source] rcgen::Error),
    /// The CA key does not parse.
    #[error("the CA private key is not a valid PEM key")]
    BadCaKey(#[source] rcgen::Error),
    /// The CA key is not the key of the CA certificate.
    #[error("the CA private key does not belong to the CA certificate (check <data-dir>/tls/ca.crt and ca.key)")]
    CaKeyMismatch,
    /// Signing failed.
    #[error("cannot sign the certificate of {what}")]
    Sign {
        /// What was signed ("host 1a2b…", "the CA").
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
}

/// A certificate's sha256 (of its DER), lowercase hex: what `--fingerprint` pins.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Whether `host_id` can name a host in a certificate: 1–61 characters of `a-z`, `0-9` and
/// `-`, not starting or ending with `-` (a lowercase UUID is one).
pub fn is_host_id(host_id: &str) -> bool {
    !host_id.is_empty()
        && host_id.len() <= MAX_HOST_ID
        && !host_id.starts_with('-')
        && !host_id.ends_with('-')
        && host_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_host_id(host_id: &str) -> Result<(), PkiError> {
    if is_host_id(host_id) {
        Ok(())
    } else {
        Err(PkiError::BadHostId(host_id.to_string()))
    }
}

/// The DNS name that identifies host `host_id` in its certificate: `h-<host-id>.tuchka`.
/// Precondition: [`is_host_id`] (otherwise the name is not one a certificate can carry).
pub fn host_dns_name(host_id: &str) -> String {
    format!("{HOST_DNS_PREFIX}{host_id}{HOST_DNS_SUFFIX}")
}

/// The host id in a DNS name made by [`host_dns_name`], if it is one.
pub fn host_id_of_dns_name(name: &str) -> Option<&str> {
    let id = name
        .strip_prefix(HOST_DNS_PREFIX)?
        .strip_suffix(HOST_DNS_SUFFIX)?;
    is_host_id(id).then_some(id)
}

/// A host's new private key and its certificate signing request, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The private key (PKCS#8 PEM, ECDSA P-256). Keep it on the host, mode 0600.
    pub key_pem: String,
    /// The request to send to the controller.
    pub csr_pem: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("key_pem", &"<secret>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Make the key of host `host_id` and a request for its certificate (the agent, at join).
pub fn create_host_key(host_id: &str) -> Result<HostKey, PkiError> {
    check_host_id(host_id)?;
    let key = KeyPair::generate().map_err(|source| PkiError::Key {
        what: format!("host {host_id}"),
        source,
    })?;
    let csr_error = |source| PkiError::Csr {
        host_id: host_id.to_string(),
        source,
    };
    let mut params = CertificateParams::new(vec![host_dns_name(host_id)]).map_err(csr_error)?;
    params.distinguished_name = subject(&format!("tuchka host {host_id}"));
    let csr = params.serialize_request(&key).map_err(csr_error)?;
    Ok(HostKey {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(csr_error)?,
    })
}

/// A certificate issued by [`sign_host_csr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

/// Sign the request `csr_pem` of host `host_id` with the CA (`ca_cert_pem`, `ca_key_pem`: the
/// controller's `ca.crt` and `ca.key`), valid from a day before `now` for [`HOST_CERT_DAYS`].
///
/// Only the request's public key is used, and only after its signature is verified (the host
/// holds the key). Everything else the request asks for — names, key usages, CA status, subject
/// — is ignored: the certificate is an end-entity certificate for TLS client and server
/// authentication naming exactly [`host_dns_name`]`(host_id)`.
pub fn sign_host_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    host_id: &str,
    csr_pem: &str,
    now: SystemTime,
) -> Result<HostCert, PkiError> {
    check_host_id(host_id)?;
    let request =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(|source| PkiError::BadCsr {
            host_id: host_id.to_string(),
            source,
        })?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(PkiError::BadCaKey)?;
    check_ca_key(ca_cert_pem, &ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(PkiError::BadCaCert)?;

    let sign_error = |source| PkiError::Sign {
        what: format!("host {host_id}"),
        source,
    };
    let now = OffsetDateTime::from(now);
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(
        host_dns_name(host_id).try_into().map_err(sign_error)?,
    )];
    params.distinguished_name = subject(&format!("tuchka host {host_id}"));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(HOST_CERT_DAYS);
    params.serial_number = Some(serial(&[
        rcgen::PublicKeyData::der_bytes(&request.public_key),
        host_id.as_bytes(),
        &now.unix_timestamp_nanos().to_be_bytes(),
    ]));
    let signed = CertificateSigningRequestParams {
        params,
        public_key: request.public_key,
    };
    let cert = signed.signed_by(&issuer).map_err(sign_error)?;
    Ok(HostCert {
        cert_pem: cert.pem(),
        not_after_unix: signed.params.not_after.unix_timestamp(),
    })
}

/// A CA made by [`create_ca`], PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    /// The CA certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<secret>")
            .finish()
    }
}

/// A new self-signed CA shaped like the controller's (path length 0, key usages keyCertSign,
/// cRLSign and digitalSignature), for tests and tools; the controller keeps its own.
pub fn create_ca(common_name: &str, now: SystemTime) -> Result<CaPem, PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Key {
        what: "the CA".to_string(),
        source,
    })?;
    let now = OffsetDateTime::from(now);
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_DAYS);
    params.serial_number = Some(serial(&[
        key.public_key_raw(),
        common_name.as_bytes(),
        &now.unix_timestamp_nanos().to_be_bytes(),
    ]));
    let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
        what: "the CA".to_string(),
        source,
    })?;
    Ok(CaPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The host id named by a host certificate (DER): the one DNS name of the form
/// `h-<host-id>.tuchka` among its subject alternative names. `None` when it has none, more
/// than one, or does not parse.
///
/// This reads names only: call it on a certificate whose chain has been verified against the
/// cloud's CA (rustls does that during the handshake), never on an unverified one.
pub fn peer_host_id(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(name) => host_id_of_dns_name(name),
        _ => None,
    });
    let id = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    Some(id.to_string())
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn
}

/// A positive 16-byte serial number from sha256 of `parts`.
fn serial(parts: &[&[u8]]) -> SerialNumber {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

/// Refuse a CA key that is not the CA certificate's: certificates signed with it would never
/// verify, and the mistake would only show at the first handshake.
fn check_ca_key(ca_cert_pem: &str, ca_key: &KeyPair) -> Result<(), PkiError> {
    let bad = || PkiError::BadCaCert(rcgen::Error::CouldNotParseCertificate);
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes()).map_err(|_| bad())?;
    let cert = pem.parse_x509().map_err(|_| bad())?;
    if cert.public_key().subject_public_key.data.as_ref() == ca_key.public_key_raw() {
        Ok(())
    } else {
        Err(PkiError::CaKeyMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;
    use x509_parser::extensions::GeneralName;

    const HOST: &str = "0f2a6c1e-0000-4000-8000-000000000001";

    fn der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }

    fn issue(ca: &CaPem, host_id: &str) -> Vec<u8> {
        let key = create_host_key(host_id).expect("host key");
        let cert = sign_host_csr(
            &ca.cert_pem,
            &ca.key_pem,
            host_id,
            &key.csr_pem,
            SystemTime::now(),
        )
        .expect("signed");
        der(&cert.cert_pem)
    }

    fn roots(ca: &CaPem) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(der(&ca.cert_pem)))
            .expect("root");
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn verify_as_client(ca: &CaPem, leaf: &[u8]) -> Result<(), rustls::Error> {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .expect("verifier");
        v.verify_client_cert(&CertificateDer::from(leaf.to_vec()), &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_as_server(ca: &CaPem, leaf: &[u8], name: &str) -> Result<(), rustls::Error> {
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .expect("verifier");
        let name = ServerName::try_from(name.to_string()).expect("name");
        v.verify_server_cert(
            &CertificateDer::from(leaf.to_vec()),
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn fingerprint_is_the_sha256_of_the_der() {
        assert_eq!(
            fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn host_ids_and_names() {
        assert!(is_host_id(HOST));
        for bad in ["", "-a", "a-", "A", "a b", "a.b", "a/b", &"x".repeat(62)] {
            assert!(!is_host_id(bad), "{bad:?}");
            assert!(matches!(create_host_key(bad), Err(PkiError::BadHostId(_))));
        }
        assert_eq!(host_dns_name("h7"), "h-h7.tuchka");
        assert_eq!(host_id_of_dns_name("h-h7.tuchka"), Some("h7"));
        assert_eq!(host_id_of_dns_name("h-.tuchka"), None);
        assert_eq!(host_id_of_dns_name("x-h7.tuchka"), None);
        assert_eq!(host_id_of_dns_name("h-h7.tuchka.example"), None);
    }

    #[test]
    fn a_signed_host_certificate_names_its_host_and_verifies_both_ways() {
        let ca = create_ca("tuchka CA", SystemTime::now()).expect("ca");
        let leaf = issue(&ca, HOST);
        assert_eq!(peer_host_id(&leaf).as_deref(), Some(HOST));
        verify_as_client(&ca, &leaf).expect("client auth");
        verify_as_server(&ca, &leaf, &host_dns_name(HOST)).expect("server auth");
        assert!(verify_as_server(&ca, &leaf, &host_dns_name("other")).is_err());

        let other_ca = create_ca("tuchka CA", SystemTime::now()).expect("ca");
        assert!(verify_as_client(&other_ca, &leaf).is_err(), "another CA");
    }

    #[test]
    fn a_csr_cannot_pick_its_own_names_or_become_a_ca() {
        let ca = create_ca("tuchka CA", SystemTime::now()).expect("ca");
        // A request made by hand: another host's name, localhost, an IP, CA status.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![
            host_dns_name("someone-else"),
            "localhost".to_string(),
            "10.0.0.1".to_string(),
        ])
        .expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = subject("tuchka controller");
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");

        let cert = sign_host_csr(&ca.cert_pem, &ca.key_pem, HOST, &csr, SystemTime::now())
            .expect("signed");
        let leaf = der(&cert.cert_pem);
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("parse");
        let names: Vec<String> = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, vec![host_dns_name(HOST)]);
        assert!(!parsed.is_ca());
        let eku = parsed
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && eku.server_auth && !eku.any);
        assert_eq!(peer_host_id(&leaf).as_deref(), Some(HOST));
        // The key in the certificate is the requester's.
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn broken_requests_and_mismatched_ca_keys_are_refused() {
        let ca = create_ca("tuchka CA", SystemTime::now()).expect("ca");
        let host = create_host_key(HOST).expect("host key");
        let now = SystemTime::now();
        assert!(matches!(
            sign_host_csr(&ca.cert_pem, &ca.key_pem, HOST, "not a csr", now),
            Err(PkiError::BadCsr { .. })
        ));
        // A request whose signature no longer matches: one base64 digit of its last line (the
        // end of the signature) changed.
        let mut lines: Vec<String> = host.csr_pem.lines().map(str::to_string).collect();
        let sig = lines.len() - 2;
        let mut chars: Vec<char> = lines[sig].chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        lines[sig] = chars.into_iter().collect();
        let tampered = lines.join("\n");
        assert!(matches!(
            sign_host_csr(&ca.cert_pem, &ca.key_pem, HOST, &tampered, now),
            Err(PkiError::BadCsr { .. })
        ));
        let other = create_ca("tuchka CA", now).expect("ca");
        assert!(matches!(
            sign_host_csr(&ca.cert_pem, &other.key_pem, HOST, &host.csr_pem, now),
            Err(PkiError::CaKeyMismatch)
        ));
        assert!(matches!(
            sign_host_csr(&ca.cert_pem, &ca.key_pem, "Bad Id", &host.csr_pem, now),
            Err(PkiError::BadHostId(_))
        ));
        assert!(format!("{host:?}").contains("<secret>"));
    }

    #[test]
    fn certificates_without_exactly_one_host_name_name_no_host() {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("leaf")
                .der()
                .to_vec()
        };
        assert_eq!(peer_host_id(&leaf(vec!["localhost".into()])), None);
        assert_eq!(
            peer_host_id(&leaf(vec![host_dns_name("a"), host_dns_name("b")])),
            None
        );
        assert_eq!(
            peer_host_id(&leaf(vec!["localhost".into(), host_dns_name("a")])).as_deref(),
            Some("a")
        );
        assert_eq!(peer_host_id(b"garbage"), None);
    }
}
