//! The host agent: pull the desired state of this host from the controller, converge libvirt,
//! storage and networks to it, report what is observed. Level-triggered: every pass starts from
//! what the host really has, so a crash, a restart or a hand-deleted domain is healed by the
//! next pass; the agent removes only what the controller names for removal.
//!
//! The agent speaks only HTTP to the controller (the same endpoints for the local agent on the
//! unix socket and for remote agents over TCP); the controller never connects to it.

pub mod capture;
pub mod channel;
pub mod console;
pub mod identity;
pub mod mover;
pub mod plan;
pub mod reconcile;
pub mod run;

pub use run::{run, AgentConfig, LoadSource};
