//! Pure domain logic of tuchka: names, network addressing, IPAM, placement, balancing.
//!
//! Nothing here does I/O (but [`digest`] reading what it is given); every function is deterministic given its inputs (random choices take
//! the random source as an argument), so the controller's decisions can be unit-tested in full.

pub mod balance;
pub mod digest;
pub mod ipam;
pub mod limits;
pub mod migration;
pub mod names;
pub mod ops;
pub mod placement;
pub mod rules;
