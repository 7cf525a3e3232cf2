//! Errors of the tuchka client.
//!
//! Every variant says what failed and where, so the CLI can print it as is: a server error
//! shows the server's message (its cause chain is in [`ApiError::chain`]); a connection error
//! names the socket or URL it tried and hints how to start the server.

use std::error::Error as StdError;
use std::path::PathBuf;

use tuchka_api::ApiError;

/// A boxed error cause (transport and body errors of hyper).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong talking to the tuchka API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-2xx status and an error body.
    #[error("{}", error.message)]
    Api {
        /// HTTP status code.
        status: u16,
        /// The error body (or one made up from the status when the body was not an `ApiError`).
        error: ApiError,
    },
    /// Could not connect to the server at all.
    #[error(
        "cannot reach tuchka at {endpoint}: {reason} (is `tuchka serve` running? see ./scripts/quickstart)"
    )]
    Connect {
        /// The socket path or URL that was tried.
        endpoint: String,
        /// The innermost cause, in words (e.g. "No such file or directory (os error 2)").
        reason: String,
        /// The transport error.
        #[source]
        source: BoxError,
    },
    /// The connection failed after it was made (reset, closed early, …).
    #[error("{method} {path} at {endpoint} failed: {reason}")]
    Transport {
        /// HTTP method.
        method: String,
        /// Request path.
        path: String,
        /// The socket path or URL.
        endpoint: String,
        /// The innermost cause, in words.
        reason: String,
        /// The transport error.
        #[source]
        source: BoxError,
    },
    /// The answer was not the JSON expected.
    #[error("cannot decode the answer to {path}")]
    Decode {
        /// Request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be encoded as JSON.
    #[error("cannot encode the request body of {path}")]
    Encode {
        /// Request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The server answered in a way the protocol does not allow.
    #[error("unexpected answer to {path}: {detail}")]
    Protocol {
        /// Request path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A local file could not be read or written.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done, e.g. "cannot open".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with the controller failed: a certificate pin that does not match, a
    /// certificate no trusted CA signed, an address the certificate does not cover.
    /// (No `#[source]`: `reason` is already the innermost cause, with what to do.)
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls {
        /// The URL.
        endpoint: String,
        /// What failed and what to do.
        reason: String,
    },
    /// The certificate fingerprint given to [`crate::Client::with_fingerprint`] is not a sha256.
    #[error("invalid certificate fingerprint: {reason}")]
    InvalidFingerprint {
        /// Why.
        reason: String,
    },
    /// The endpoint URL or a request path is not a valid URI.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it is invalid.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's error body, if this is an API error.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The message of the innermost cause of `err` (the most specific words, e.g. the `io::Error`).
pub(crate) fn innermost_message(err: &(dyn StdError + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Make up an [`ApiError`] for a non-2xx answer whose body is not an `ApiError`.
pub(crate) fn api_error_from_body(status: u16, path: &str, body: &[u8]) -> ApiError {
    if let Ok(error) = serde_json::from_slice::<ApiError>(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let snippet: String = text.chars().take(200).collect();
    let message = if snippet.is_empty() {
        format!("{path}: HTTP {status}")
    } else {
        format!("{path}: HTTP {status}: {snippet}")
    };
    ApiError {
        code: format!("Http{status}"),
        message,
        chain: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_body_is_used_when_it_parses() {
        let body = br#"{"code":"VmNotFound","message":"vm \"x\" not found","chain":["a"]}"#;
        let e = api_error_from_body(404, "/v1/vms/x", body);
        assert_eq!(e.code, "VmNotFound");
        assert_eq!(e.message, "vm \"x\" not found");
        assert_eq!(e.chain, vec!["a".to_string()]);
    }

    #[test]
    fn api_error_is_made_up_from_plain_bodies() {
        let e = api_error_from_body(502, "/v1/vms", b"bad gateway\n");
        assert_eq!(e.code, "Http502");
        assert_eq!(e.message, "/v1/vms: HTTP 502: bad gateway");
        let e = api_error_from_body(500, "/v1/vms", b"");
        assert_eq!(e.message, "/v1/vms: HTTP 500");
    }

    #[test]
    fn innermost_message_walks_the_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such socket");
        let outer = ClientError::Io {
            action: "cannot open",
            path: PathBuf::from("/x"),
            source: io,
        };
        assert_eq!(innermost_message(&outer), "no such socket");
    }
}
