//! The controller's error type and its one mapping to HTTP status codes and [`ApiError`] bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;
use tuchka_api::ApiError;
use tuchka_store::StoreError;

/// Everything a request can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The named object does not exist.
    #[error("{kind} {name:?} not found (see: tuchka {cli} list)")]
    NotFound {
        /// "image", "network", "group", "vm", "host", "operation".
        kind: &'static str,
        /// CLI noun for the hint.
        cli: &'static str,
        /// The name asked for.
        name: String,
    },
    /// The request is wrong; nothing was changed.
    #[error("{message}")]
    Invalid {
        /// Stable code, e.g. `InvalidName`.
        code: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The request conflicts with the current state; nothing was changed.
    #[error("{message}")]
    Conflict {
        /// Stable code, e.g. `ImageInUse`.
        code: &'static str,
        /// What conflicts and what to do.
        message: String,
    },
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials refused for a reason the caller must act on (`401` with its own code, e.g.
    /// `JoinTokenExpired`, `HostRemoved`).
    #[error("{message}")]
    Refused {
        /// Stable code.
        code: &'static str,
        /// What was refused and what to do.
        message: String,
        /// What else was refused on the way, outermost first.
        chain: Vec<String>,
    },
    /// No endpoint at this method and path.
    #[error("no API endpoint {0} (the API is described at /v1/openapi.json)")]
    NoRoute(String),
    /// The state database failed.
    #[error("internal error")]
    Store(#[from] StoreError),
    /// Something on this machine failed (a tool, the disk).
    #[error("{message}")]
    Internal {
        /// What failed.
        message: String,
        /// Cause chain.
        chain: Vec<String>,
    },
}

/// Result of controller calls.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid {
            code,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, cli: &'static str, name: &str) -> Error {
        Error::NotFound {
            kind,
            cli,
            name: name.to_string(),
        }
    }

    /// A name that breaks the naming rule.
    pub fn bad_name(kind: &'static str, name: &str) -> Error {
        match tuchka_core::names::validate_name(kind, name) {
            Err(e) => Error::invalid("InvalidName", e.to_string()),
            Ok(()) => Error::invalid("InvalidName", format!("invalid {kind} name {name:?}")),
        }
    }

    /// Shorthand for [`Error::Conflict`].
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::Conflict {
            code,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Internal`] with a cause.
    pub fn internal(message: impl Into<String>, cause: &dyn std::error::Error) -> Error {
        Error::Internal {
            message: message.into(),
            chain: chain_of(cause),
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> String {
        match self {
            Error::NotFound { kind, .. } => {
                let mut k = String::new();
                for part in kind.split(' ') {
                    let mut cs = part.chars();
                    if let Some(f) = cs.next() {
                        k.push(f.to_ascii_uppercase());
                        k.extend(cs);
                    }
                }
                format!("{k}NotFound")
            }
            Error::Invalid { code, .. }
            | Error::Conflict { code, .. }
            | Error::Refused { code, .. } => (*code).to_string(),
            Error::Unauthorized(_) => "Unauthorized".into(),
            Error::NoRoute(_) => "NoRoute".into(),
            Error::Store(_) | Error::Internal { .. } => "Internal".into(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::Unauthorized(_) | Error::Refused { .. } => StatusCode::UNAUTHORIZED,
            Error::NoRoute(_) => StatusCode::NOT_FOUND,
            Error::Store(_) | Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The wire body.
    pub fn to_api(&self) -> ApiError {
        let chain = match self {
            Error::Internal { chain, .. } | Error::Refused { chain, .. } => chain.clone(),
            Error::Store(e) => chain_of(e),
            _ => vec![],
        };
        ApiError {
            code: self.code(),
            message: self.to_string(),
            chain,
        }
    }
}

/// The messages of an error and its sources, outermost first.
pub fn chain_of(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(error = %self, chain = ?self.to_api().chain, "request failed");
        }
        (self.status(), Json(self.to_api())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let e = Error::NotFound {
            kind: "vm",
            cli: "vm",
            name: "web-9".into(),
        };
        assert_eq!(e.code(), "VmNotFound");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "vm \"web-9\" not found (see: tuchka vm list)"
        );
        let e = Error::conflict("ImageInUse", "image \"tiny\" is used by web-0");
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.to_api().code, "ImageInUse");
        let e = Error::NoRoute("GET /v1/nope".into());
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::NOT_FOUND, "NoRoute".to_string())
        );
        assert!(e.to_string().contains("GET /v1/nope"));
    }
}
