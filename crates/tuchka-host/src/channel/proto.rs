//! The channel's wire protocol (pure): one header line from the client, answer lines from the
//! server.
//!
//! ```text
//! client → server   TUCHKA-CHANNEL/1 libvirt <migration>\n
//!                   TUCHKA-CHANNEL/1 memory <migration>\n
//!                   TUCHKA-CHANNEL/1 disk <migration>\n
//!                   TUCHKA-CHANNEL/1 disk-file <migration> <vm-id> <size> <sha256>\n
//! server → client   OK\n                      admitted; raw bytes follow, both ways
//!                   ERR <reason>\n            refused; the server closes the connection
//! after a disk-file's <size> bytes:
//! server → client   DONE <sha256>\n           stored under its final name
//!                   ERR <reason>\n            not stored (short, corrupt, I/O error)
//! ```
//!
//! A header is at most [`MAX_HEADER`] bytes including the newline; ids are 1–64 characters of
//! `A-Za-z0-9._-` not starting with `.` ([`is_channel_id`]), so they are safe in paths and
//! never contain the separator.

/// First token of every header: protocol name and version.
pub const MAGIC: &str = "TUCHKA-CHANNEL/1";
/// Longest header line, newline included.
pub const MAX_HEADER: usize = 512;
/// Longest answer line, newline included.
pub const MAX_ANSWER: usize = 512;
/// Longest reason in an `ERR` line.
const MAX_REASON: usize = 400;
/// Longest id (migration, vm).
const MAX_ID: usize = 64;

/// Which stream of a migration a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    /// The source libvirtd's connection to the destination libvirtd (peer-to-peer control).
    Libvirt,
    /// qemu's migration stream (memory and device state).
    Memory,
    /// The NBD stream of the disk copy.
    Disk,
    /// A whole file (a stopped VM's overlay, cold migration).
    DiskFile,
}

impl StreamKind {
    /// The header token.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Libvirt => "libvirt",
            StreamKind::Memory => "memory",
            StreamKind::Disk => "disk",
            StreamKind::DiskFile => "disk-file",
        }
    }
}

impl std::fmt::Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asks the channel for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelRequest {
    /// A connection to the destination's libvirtd, for migration `migration`.
    Libvirt {
        /// Migration id.
        migration: String,
    },
    /// qemu's migration stream of `migration`.
    Memory {
        /// Migration id.
        migration: String,
    },
    /// The NBD disk stream of `migration`.
    Disk {
        /// Migration id.
        migration: String,
    },
    /// A file of `size` bytes with digest `sha256`: disk `disk` of a stopped VM (cold
    /// migration).
    DiskFile {
        /// Migration id.
        migration: String,
        /// Which disk: the VM's id for its root disk, a volume's id for a data volume.
        disk: String,
        /// Exact size in bytes.
        size: u64,
        /// sha256 of the content, 64 lowercase hex digits.
        sha256: String,
    },
}

impl ChannelRequest {
    /// The migration this belongs to.
    pub fn migration(&self) -> &str {
        match self {
            ChannelRequest::Libvirt { migration }
            | ChannelRequest::Memory { migration }
            | ChannelRequest::Disk { migration }
            | ChannelRequest::DiskFile { migration, .. } => migration,
        }
    }

    /// The kind of stream.
    pub fn kind(&self) -> StreamKind {
        match self {
            ChannelRequest::Libvirt { .. } => StreamKind::Libvirt,
            ChannelRequest::Memory { .. } => StreamKind::Memory,
            ChannelRequest::Disk { .. } => StreamKind::Disk,
            ChannelRequest::DiskFile { .. } => StreamKind::DiskFile,
        }
    }

    /// The request for stream `kind` of `migration` (not for [`StreamKind::DiskFile`], which
    /// needs more fields: `None`).
    pub fn stream(kind: StreamKind, migration: &str) -> Option<Self> {
        let migration = migration.to_string();
        match kind {
            StreamKind::Libvirt => Some(ChannelRequest::Libvirt { migration }),
            StreamKind::Memory => Some(ChannelRequest::Memory { migration }),
            StreamKind::Disk => Some(ChannelRequest::Disk { migration }),
            StreamKind::DiskFile => None,
        }
    }

    /// Check the fields a header can carry (ids, digest).
    pub fn validate(&self) -> Result<(), HeaderError> {
        check_id("migration", self.migration())?;
        if let ChannelRequest::DiskFile { disk, sha256, .. } = self {
            check_id("disk id", disk)?;
            if !is_sha256(sha256) {
                return Err(HeaderError::BadField {
                    field: "sha256",
                    value: shorten(sha256),
                });
            }
        }
        Ok(())
    }

    /// The header line, newline included. Precondition: [`ChannelRequest::validate`] passes.
    pub fn encode(&self) -> String {
        match self {
            ChannelRequest::DiskFile {
                migration,
                disk,
                size,
                sha256,
            } => format!("{MAGIC} disk-file {migration} {disk} {size} {sha256}\n"),
            other => format!("{MAGIC} {} {}\n", other.kind(), other.migration()),
        }
    }

    /// Parse a header line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        if line.len() > MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(|_| HeaderError::NotText)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        if text.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(HeaderError::NotText);
        }
        let mut fields = text.split(' ');
        if fields.next() != Some(MAGIC) {
            return Err(HeaderError::BadMagic);
        }
        let kind = fields.next().ok_or(HeaderError::Missing("kind"))?;
        let migration = fields
            .next()
            .ok_or(HeaderError::Missing("migration"))?
            .to_string();
        let req = match kind {
            "libvirt" => ChannelRequest::Libvirt { migration },
            "memory" => ChannelRequest::Memory { migration },
            "disk" => ChannelRequest::Disk { migration },
            "disk-file" => {
                let disk = fields.next().ok_or(HeaderError::Missing("disk id"))?;
                let size = fields.next().ok_or(HeaderError::Missing("size"))?;
                let sha256 = fields.next().ok_or(HeaderError::Missing("sha256"))?;
                let size = size
                    .parse::<u64>()
                    .ok()
                    .filter(|_| size.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| HeaderError::BadField {
                        field: "size",
                        value: shorten(size),
                    })?;
                ChannelRequest::DiskFile {
                    migration,
                    disk: disk.to_string(),
                    size,
                    sha256: sha256.to_string(),
                }
            }
            other => return Err(HeaderError::UnknownKind(shorten(other))),
        };
        if fields.next().is_some() {
            return Err(HeaderError::Extra);
        }
        req.validate()?;
        Ok(req)
    }
}

impl std::fmt::Display for ChannelRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelRequest::DiskFile {
                migration,
                disk,
                size,
                ..
            } => write!(
                f,
                "disk file {disk} ({size} bytes) for migration {migration}"
            ),
            other => write!(
                f,
                "{} stream of migration {}",
                other.kind(),
                other.migration()
            ),
        }
    }
}

/// Why a header line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Longer than [`MAX_HEADER`] (or no newline within it).
    #[error("header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Not printable ASCII.
    #[error("header is not printable ASCII")]
    NotText,
    /// Does not start with [`MAGIC`].
    #[error("not a {MAGIC} header")]
    BadMagic,
    /// An unknown stream kind.
    #[error("unknown stream kind {0:?}")]
    UnknownKind(String),
    /// A field is missing.
    #[error("header has no {0}")]
    Missing(&'static str),
    /// A field is malformed.
    #[error("bad {field} {value:?}")]
    BadField {
        /// Which field.
        field: &'static str,
        /// Its value (shortened).
        value: String,
    },
    /// More fields than the kind has.
    #[error("header has extra fields")]
    Extra,
}

/// An answer line of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Admitted.
    Ok,
    /// A file was stored; its sha256.
    Done(String),
    /// Refused or failed, with the reason.
    Err(String),
}

impl Answer {
    /// The line, newline included; the reason of [`Answer::Err`] is made printable and shortened.
    pub fn encode(&self) -> String {
        match self {
            Answer::Ok => "OK\n".to_string(),
            Answer::Done(sha) => format!("DONE {sha}\n"),
            Answer::Err(reason) => format!("ERR {}\n", sanitize_reason(reason)),
        }
    }

    /// Parse an answer line (with or without its newline); `None` when it is none of the three.
    pub fn parse(line: &[u8]) -> Option<Self> {
        if line.len() > MAX_ANSWER {
            return None;
        }
        let text = std::str::from_utf8(line).ok()?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        if text == "OK" {
            return Some(Answer::Ok);
        }
        if let Some(sha) = text.strip_prefix("DONE ") {
            return is_sha256(sha).then(|| Answer::Done(sha.to_string()));
        }
        text.strip_prefix("ERR ")
            .map(|r| Answer::Err(sanitize_reason(r)))
    }
}

/// An id that may appear in a header and in a path: 1–64 characters of `A-Za-z0-9._-`, not
/// starting with `.`.
pub fn is_channel_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_id(field: &'static str, value: &str) -> Result<(), HeaderError> {
    if is_channel_id(value) {
        Ok(())
    } else {
        Err(HeaderError::BadField {
            field,
            value: shorten(value),
        })
    }
}

/// 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Printable ASCII only (others become `?`), at most [`MAX_REASON`] characters.
fn sanitize_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_REASON)
        .collect();
    if out.is_empty() {
        out.push_str("refused");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn every_request_round_trips() {
        let reqs = [
            ChannelRequest::Libvirt {
                migration: "0f2a6c1e-aaaa".into(),
            },
            ChannelRequest::Memory {
                migration: "m.1_x".into(),
            },
            ChannelRequest::Disk {
                migration: "m".into(),
            },
            ChannelRequest::DiskFile {
                migration: "m".into(),
                disk: "vm-1".into(),
                size: 0,
                sha256: SHA.into(),
            },
            ChannelRequest::DiskFile {
                migration: "m".into(),
                disk: "vm-1".into(),
                size: u64::MAX,
                sha256: SHA.into(),
            },
        ];
        for r in reqs {
            let line = r.encode();
            assert!(line.len() <= MAX_HEADER);
            assert_eq!(
                ChannelRequest::parse(line.as_bytes()),
                Ok(r.clone()),
                "{line}"
            );
            assert_eq!(
                ChannelRequest::parse(line.trim_end().as_bytes()),
                Ok(r),
                "without newline"
            );
        }
        assert_eq!(
            ChannelRequest::parse(b"TUCHKA-CHANNEL/1 disk m1\n"),
            Ok(ChannelRequest::Disk {
                migration: "m1".into()
            })
        );
    }

    #[test]
    fn hostile_headers_are_refused_without_panicking() {
        use HeaderError::*;
        let long = format!("{MAGIC} libvirt {}\n", "a".repeat(MAX_HEADER));
        let cases: Vec<(Vec<u8>, HeaderError)> = vec![
            (long.into_bytes(), TooLong),
            (b"\xff\xfe".to_vec(), NotText),
            (b"TUCHKA-CHANNEL/1 libvirt m\r\n".to_vec(), NotText),
            (b"TUCHKA-CHANNEL/1 libvirt m\0".to_vec(), NotText),
            (b"GET / HTTP/1.1\n".to_vec(), BadMagic),
            (b"TUCHKA-CHANNEL/2 libvirt m\n".to_vec(), BadMagic),
            (b"".to_vec(), BadMagic),
            (b"TUCHKA-CHANNEL/1\n".to_vec(), Missing("kind")),
            (b"TUCHKA-CHANNEL/1 libvirt\n".to_vec(), Missing("migration")),
            (
                b"TUCHKA-CHANNEL/1 shell m\n".to_vec(),
                UnknownKind("shell".into()),
            ),
            (b"TUCHKA-CHANNEL/1 libvirt m extra\n".to_vec(), Extra),
            (
                b"TUCHKA-CHANNEL/1 libvirt ../etc\n".to_vec(),
                BadField {
                    field: "migration",
                    value: "../etc".into(),
                },
            ),
            (
                b"TUCHKA-CHANNEL/1 memory a/b\n".to_vec(),
                BadField {
                    field: "migration",
                    value: "a/b".into(),
                },
            ),
            (b"TUCHKA-CHANNEL/1 disk  m\n".to_vec(), Extra),
            (
                b"TUCHKA-CHANNEL/1 disk-file m vm 12\n".to_vec(),
                Missing("sha256"),
            ),
            (
                format!("TUCHKA-CHANNEL/1 disk-file m vm -1 {SHA}\n").into_bytes(),
                BadField {
                    field: "size",
                    value: "-1".into(),
                },
            ),
            (
                format!("TUCHKA-CHANNEL/1 disk-file m vm +1 {SHA}\n").into_bytes(),
                BadField {
                    field: "size",
                    value: "+1".into(),
                },
            ),
            (
                format!("TUCHKA-CHANNEL/1 disk-file m vm 99999999999999999999 {SHA}\n")
                    .into_bytes(),
                BadField {
                    field: "size",
                    value: "99999999999999999999".into(),
                },
            ),
            (
                format!("TUCHKA-CHANNEL/1 disk-file m vm 1 {}\n", SHA.to_uppercase()).into_bytes(),
                BadField {
                    field: "sha256",
                    value: SHA.to_uppercase(),
                },
            ),
            (
                format!("TUCHKA-CHANNEL/1 disk-file m .. 1 {SHA}\n").into_bytes(),
                BadField {
                    field: "disk id",
                    value: "..".into(),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                ChannelRequest::parse(&line),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn ids_are_path_safe() {
        assert!(is_channel_id("0f2a6c1e-1111-4222-8333-444455556666"));
        assert!(is_channel_id("a.b_c-D"));
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a\nb",
            &"x".repeat(65),
        ] {
            assert!(!is_channel_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn answers_round_trip_and_reasons_are_tamed() {
        for a in [
            Answer::Ok,
            Answer::Done(SHA.into()),
            Answer::Err("unknown migration m".into()),
        ] {
            assert_eq!(Answer::parse(a.encode().as_bytes()), Some(a));
        }
        let nasty = Answer::Err(format!("a\nb\x1b[31m{}", "x".repeat(1000))).encode();
        assert_eq!(nasty.matches('\n').count(), 1);
        assert!(nasty.len() <= MAX_ANSWER);
        assert!(Answer::parse(nasty.as_bytes()).is_some());
        assert_eq!(Answer::parse(b"DONE nope\n"), None);
        assert_eq!(Answer::parse(b"HTTP/1.1 400\n"), None);
        assert_eq!(Answer::Err(String::new()).encode(), "ERR refused\n");
    }

    #[test]
    fn requests_describe_themselves() {
        let r = ChannelRequest::Memory {
            migration: "m1".into(),
        };
        assert_eq!(r.to_string(), "memory stream of migration m1");
        assert_eq!(
            ChannelRequest::stream(StreamKind::Disk, "m1"),
            Some(ChannelRequest::Disk {
                migration: "m1".into()
            })
        );
        assert_eq!(ChannelRequest::stream(StreamKind::DiskFile, "m1"), None);
    }
}
