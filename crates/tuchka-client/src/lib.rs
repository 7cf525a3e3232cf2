//! Typed HTTP client of the tuchka API, used by the CLI and by the agents.
//!
//! Protocol: HTTP/1.1 with JSON bodies (types in `tuchka_api`), either over the controller's
//! unix socket (no auth; default `/var/lib/tuchka/tuchka.sock`) or over HTTPS with
//! `Authorization: Bearer <token>`, trusting the controller by a pinned certificate sha256
//! ([`Client::with_fingerprint`]). Non-2xx answers carry an [`tuchka_api::ApiError`] body and
//! become [`ClientError::Api`]. Long actions answer `202` with an operation which
//! [`Client::wait_operation`] follows. Image uploads stream the file from disk; image downloads
//! resume with `Range: bytes=N-`.
//!
//! Paths given to the generic methods are absolute API paths (`/v1/vms`); build the segments
//! that come from user input with [`segment`].

mod client;
mod encode;
mod error;
pub mod tls;

pub use client::{Client, Conditional, Endpoint, DEFAULT_SOCKET};
pub use encode::segment;
pub use error::{BoxError, ClientError};
/// The headers of an answer ([`Conditional::NotModified`]).
pub use hyper::header::HeaderMap;
