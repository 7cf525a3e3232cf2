//! The controller: the REST API, the state database, operations, scheduling, IPAM, migrations,
//! the balancer and the image store. It never connects to hosts: agents pull their desired
//! state from it and push reports (see `tuchka_api::agent`), over the same HTTP API whether they
//! run in this process (the local agent, over the unix socket) or on another machine.
//!
//! Modules, from the bottom up (none imports one above it): `error`; the in-memory stores
//! `metrics`, `console_log`, `history`; `state`, `snapshot`, `operations`, `scheduler`,
//! `consoles`; one per resource — `images`, `networks`, `netrules`, `groups`, `vms`, `hosts`,
//! `migrations`, `drain`, `balance`; the agent-facing `agents` and `desired`; `monitoring`
//! (scrapes, load history, counting finished operations); the engine `progress`; the web
//! `dashboard`; then `handlers`, `observe` (metrics, history and console handlers), `openapi`
//! and the routing table `api`; `listen` serves it (the unix socket and the HTTPS port, with
//! their connection caps and timeouts).

pub mod agents;
pub mod api;
pub mod balance;
pub mod builds;
pub mod captures;
pub mod console_log;
pub mod consoles;
pub mod dashboard;
pub mod desired;
pub mod drain;
pub mod error;
pub mod groups;
pub mod handlers;
pub mod history;
pub mod hosts;
pub mod images;
pub mod listen;
pub mod metrics;
pub mod migrations;
pub mod monitoring;
pub mod netrules;
pub mod networks;
pub mod observe;
pub mod openapi;
pub mod operations;
pub mod progress;
pub mod scheduler;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod tls;
pub mod vms;
pub mod volumes;

pub use error::{Error, Result};
pub use state::{Controller, ControllerConfig};
