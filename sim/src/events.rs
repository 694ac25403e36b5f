//! The event log: what hosts and fakes did, in simulated-time order. Checkers read only this and the final
//! durable state. Its text form is the readable trace of a seed, and its hash proves determinism.

use std::fmt;

use lockstep::host::HostEvent;
use lockstep::protocol::{NodeAddr, PersistNote};

use crate::faults::FaultKind;

/// A node of the simulated world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimNode {
    Protocol(NodeAddr),
    Store,
    /// The simulator itself (fault schedule, heal).
    World,
}

impl fmt::Display for SimNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimNode::Protocol(addr) => write!(f, "{addr}"),
            SimNode::Store => f.write_str("store"),
            SimNode::World => f.write_str("world"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Host(HostEvent),
    /// A fault was injected.
    Fault {
        kind: FaultKind,
        detail: String,
    },
    /// The node was killed; its disk lost `lost_writes` unsynced writes, one of them torn if `torn`.
    Killed {
        lost_writes: usize,
        torn: bool,
    },
    Restarted,
    /// Faults stop from here on.
    Healed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    pub at_ms: u64,
    pub node: SimNode,
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>9.3}s {:<12} ", self.at_ms as f64 / 1000.0, self.node.to_string())?;
        match &self.kind {
            EventKind::Host(event) => write_host_event(f, event),
            EventKind::Fault { kind, detail } => write!(f, "FAULT {kind}: {detail}"),
            EventKind::Killed { lost_writes, torn } => {
                write!(f, "KILLED (lost {lost_writes} unsynced write(s){})", if *torn { ", last one torn" } else { "" })
            }
            EventKind::Restarted => f.write_str("restarted"),
            EventKind::Healed => f.write_str("HEALED: faults stop"),
        }
    }
}

fn write_host_event(f: &mut fmt::Formatter<'_>, event: &HostEvent) -> fmt::Result {
    match event {
        HostEvent::CoordinatorBooted { generation, loaded } => {
            write!(f, "booted generation {generation}, loaded ")?;
            match loaded {
                None => f.write_str("nothing"),
                Some(state) => write_marks(f, &lockstep::coordinator::progress_of(state)),
            }
        }
        HostEvent::ShardBooted { loaded } => match loaded {
            Some(state) => write!(
                f,
                "booted, loaded op {:?} applied through {:?} ({} rows)",
                state.op,
                state.applied_through,
                state.rows.len()
            ),
            None => f.write_str("booted, empty disk"),
        },
        HostEvent::Persisted(PersistNote::Coordinator(marks)) => {
            f.write_str("persisted ")?;
            write_marks(f, marks)
        }
        HostEvent::Persisted(PersistNote::ShardApplied { op, increment, backup_id, bundle_crc32 }) => {
            write!(
                f,
                "APPLIED op {op} increment {increment} (backup {backup_id}, bundle crc {bundle_crc32:08x}), durable"
            )
        }
        HostEvent::Sent { to, msg } => write!(f, "-> {to}: {msg}"),
        HostEvent::Received { from, msg } => write!(f, "<- {from}: {msg}"),
        HostEvent::BadFrame { from, error } => write!(f, "bad frame from {from}: {error}"),
        HostEvent::Download { request, outcome } => {
            write!(f, "read {} @{}+{}: ", request.object, request.offset, request.len)?;
            match outcome {
                Ok((got, total)) => write!(f, "{got} bytes of {total}"),
                Err(error) => write!(f, "error: {error}"),
            }
        }
        HostEvent::Report(text) => write!(f, "REPORT {text}"),
        HostEvent::StartRefused(text) => write!(f, "start refused: {text}"),
        HostEvent::Fatal(text) => write!(f, "FATAL {text}"),
    }
}

fn write_marks(f: &mut fmt::Formatter<'_>, marks: &[lockstep::coordinator::ProgressMark]) -> fmt::Result {
    if marks.is_empty() {
        return f.write_str("no operation");
    }
    for (i, mark) in marks.iter().enumerate() {
        if i > 0 {
            f.write_str("; ")?;
        }
        write!(f, "{mark}")?;
    }
    Ok(())
}

/// A 64-bit hash of the whole event log, every field of every event: the same for two runs of one seed on one
/// binary, and different as soon as any event differs.
pub fn log_hash(events: &[Event]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = StableHasher::new();
    events.hash(&mut hasher);
    hasher.finish()
}

/// A fixed, seedless hasher (FxHash's mixing step, a word at a time), so hashes compare across runs and
/// processes: event logs here, explored states in [`crate::explore`]. Not for untrusted input; it only
/// fingerprints our own values.
pub struct StableHasher(u64);

impl StableHasher {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::hash::Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.mix(u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56);
    }

    fn write_u8(&mut self, value: u8) {
        self.mix(u64::from(value));
    }

    fn write_u16(&mut self, value: u16) {
        self.mix(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_ms: u64) -> Event {
        Event { at_ms, node: SimNode::World, kind: EventKind::Healed }
    }

    #[test]
    fn log_hash_is_stable_and_sees_every_difference() {
        let log = vec![event(1), event(2)];
        assert_eq!(log_hash(&log), log_hash(&log.clone()));
        assert_ne!(log_hash(&log), log_hash(&[event(1), event(3)]));
        assert_ne!(log_hash(&log), log_hash(&[event(2), event(1)]));
        assert_ne!(log_hash(&log), log_hash(&log[..1]));
    }
}
