//! The controller: the REST API, the state database, operations, scheduling, IPAM and the image
//! store. It never connects to hosts: agents pull their desired state from it and push reports
//! (see `tuchka_api::agent`), over the same HTTP API whether they run in this process (the local
//! agent, over the unix socket) or on another machine.

pub mod api;
pub mod desired;
pub mod error;
pub mod images;
pub mod netrules;
pub mod openapi;
pub mod ops;
pub mod service;
pub mod state;
pub mod tls;

pub use error::{Error, Result};
pub use state::{Controller, ControllerConfig};
