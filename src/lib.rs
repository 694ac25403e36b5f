//! lockstep: restore sharded tables from a chain of backups in a remote object store.
//!
//! The protocol lives in pure state machines ([`coordinator::Coordinator`], [`shard::Shard`], and for
//! replication through the store [`replication::Publisher`] and [`replication::Replica`]) that take inputs
//! with the time as an argument and return [`protocol::Output`]s as plain data. Hosts ([`host`]) carry those
//! outputs out against the IO interfaces in [`io`]; the simulator in `sim/` runs the same machines under madsim
//! with faulty fakes of every interface.

pub mod bundle;
pub mod coordinator;
pub mod host;
pub mod io;
pub mod model;
pub mod protocol;
pub mod replication;
pub mod rng;
pub mod shard;
#[cfg(not(madsim))]
pub mod tcp;
