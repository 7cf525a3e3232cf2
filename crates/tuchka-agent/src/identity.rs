//! The host's identity, kept at its first join in `<pool>/identity/`: `host.json` (host id and
//! credential), `host.key` (the migration channel's private key), `host.crt` (its certificate,
//! signed by the cloud's CA) and `ca.crt` (the CA). Secrets are mode 0600 in a 0700 directory;
//! files are replaced atomically. With it the agent registers again as the same host — after a
//! restart, or under a new name — without a join token.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A failure to read or write the identity.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `host.json` is not what this agent writes.
    #[error("{} is not a host identity (remove it to join again with a join token)", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Who this host is in its cloud.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The host id the controller gave it.
    pub host_id: String,
    /// Its credential.
    pub credential: String,
    /// Its channel key (PEM), once it has a certificate.
    #[serde(skip)]
    pub key_pem: Option<String>,
    /// Its channel certificate (PEM).
    #[serde(skip)]
    pub cert_pem: Option<String>,
    /// The cloud's CA certificate (PEM).
    #[serde(skip)]
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &self.host_id)
            .field("credential", &"<secret>")
            .field("has_certificate", &self.cert_pem.is_some())
            .finish()
    }
}

impl Identity {
    /// A new identity without a certificate.
    pub fn new(host_id: &str, credential: &str) -> Self {
        Identity {
            host_id: host_id.to_string(),
            credential: credential.to_string(),
            key_pem: None,
            cert_pem: None,
            ca_pem: None,
        }
    }

    /// The channel's (CA, certificate, key), when it has them.
    pub fn channel(&self) -> Option<(&str, &str, &str)> {
        Some((
            self.ca_pem.as_deref()?,
            self.cert_pem.as_deref()?,
            self.key_pem.as_deref()?,
        ))
    }

    /// Read the identity in `dir`; `Ok(None)` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let path = dir.join("host.json");
        let Some(text) = read(&path)? else {
            return Ok(None);
        };
        let mut id: Identity =
            serde_json::from_str(&text).map_err(|source| IdentityError::Parse { path, source })?;
        id.key_pem = read(&dir.join("host.key"))?;
        id.cert_pem = read(&dir.join("host.crt"))?;
        id.ca_pem = read(&dir.join("ca.crt"))?;
        Ok(Some(id))
    }

    /// Write it to `dir` (created 0700); a missing certificate removes the old channel files.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions of", dir))?;
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        write(&dir.join("host.json"), &json, 0o600)?;
        for (name, value, mode) in [
            ("host.key", &self.key_pem, 0o600),
            ("host.crt", &self.cert_pem, 0o644),
            ("ca.crt", &self.ca_pem, 0o644),
        ] {
            let path = dir.join(name);
            match value {
                Some(v) => write(&path, v, mode)?,
                None => match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", &path)(e)),
                },
            }
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let fail = |action| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail("write"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(fail("write"))?;
    std::fs::rename(&tmp, path).map_err(fail("write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("identity");
        assert_eq!(Identity::load(&dir).expect("load"), None);
        let mut id = Identity::new("h-1", "s3cr3t-value");
        id.save(&dir).expect("save");
        assert_eq!(Identity::load(&dir).expect("load"), Some(id.clone()));
        id.key_pem = Some("KEY".into());
        id.cert_pem = Some("CERT".into());
        id.ca_pem = Some("CA".into());
        id.save(&dir).expect("save");
        let back = Identity::load(&dir).expect("load").expect("there");
        assert_eq!(back.channel(), Some(("CA", "CERT", "KEY")));
        for (f, want) in [
            ("host.json", 0o600),
            ("host.key", 0o600),
            ("host.crt", 0o644),
        ] {
            let mode = std::fs::metadata(dir.join(f))
                .expect("f")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, want, "{f}");
        }
        let mode = std::fs::metadata(&dir).expect("d").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(!format!("{back:?}").contains("s3cr3t"));
        // Without a certificate the old channel files go.
        Identity::new("h-2", "other").save(&dir).expect("save");
        let back = Identity::load(&dir).expect("load").expect("there");
        assert_eq!((back.host_id.as_str(), back.channel()), ("h-2", None));
        std::fs::write(dir.join("host.json"), "{").expect("corrupt");
        assert!(Identity::load(&dir).is_err());
    }
}
