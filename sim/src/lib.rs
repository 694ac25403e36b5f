//! lockstep-sim: the deterministic simulation test bed.
//!
//! One seed builds one [`world::World`]; `runner` runs it under madsim with faulty fakes of the disk
//! ([`disk`]), the object store (`store`) and the network (`net`); [`checkers`] judge the event log and the
//! final durable state; `sweep` runs many seeds in parallel and summarises them.
//!
//! Everything that needs the simulator (`runner`, `store`, `net`, `sweep` and the modules they use) is compiled
//! only with `--cfg madsim` (the `cargo sim` aliases set it; `cargo sim-doc` documents that build).

pub mod alloc;
pub mod catalog;
pub mod checkers;
pub mod disk;
pub mod events;
pub mod explore;
pub mod faults;
pub mod plan;
pub mod probes;
pub mod replication;
pub mod scenario;
pub mod tape;
pub mod world;

#[cfg(madsim)]
pub mod clock;
#[cfg(madsim)]
pub mod net;
#[cfg(madsim)]
pub mod runner;
#[cfg(madsim)]
pub mod shrink;
#[cfg(madsim)]
pub mod standard;
#[cfg(madsim)]
pub mod state;
#[cfg(madsim)]
pub mod store;
#[cfg(madsim)]
pub mod sweep;
