//! Test support for tuchka's integration tests.
//!
//! [`MultiHost`] starts several simulated hypervisor hosts on this one machine (each a network +
//! mount + UTS namespace with its own `libvirtd`, wired to a fabric bridge) by driving
//! `scripts/multihost`, and removes everything again on drop. See `docs/multihost-harness.md`.

pub mod multihost;

pub use multihost::{Fabric, MultiHost, MultiHostError, SimHost};
