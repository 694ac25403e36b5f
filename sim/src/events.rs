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
    /// The store took a put: from here on it holds `object` (replication worlds; restore worlds put nothing).
    Stored {
        object: String,
    },
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
            EventKind::Stored { object } => write!(f, "stored {object}"),
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
        HostEvent::Persisted(PersistNote::ShardApplied { op, increment, backup_id, payload_crc32 }) => {
            write!(
                f,
                "APPLIED op {op} increment {increment} (backup {backup_id}, payload crc {payload_crc32:08x}), durable"
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
        HostEvent::Removing(files) => {
            let them = if files.len() == 1 { "it" } else { "them" };
            write!(f, "removing {} (no running operation refers to {them})", files.join(", "))
        }
        HostEvent::Removed(files) => write!(f, "removed {}, durable", files.join(", ")),
        HostEvent::Persisted(PersistNote::Published { pushed_through }) => {
            write!(f, "PUSHED through version {pushed_through}, durable")
        }
        HostEvent::Persisted(PersistNote::Replicated { applied_through, rows }) => {
            write!(f, "REPLICATED through version {applied_through} ({} rows), durable", rows.len())
        }
        HostEvent::PublisherBooted { loaded } => match loaded {
            Some(state) => write!(f, "booted, loaded pushed through version {}", state.pushed_through),
            None => f.write_str("booted, empty disk"),
        },
        HostEvent::ReplicaBooted { loaded } => match loaded {
            Some(state) => {
                write!(
                    f,
                    "booted, loaded applied through version {} ({} rows)",
                    state.applied_through,
                    state.rows.len()
                )
            }
            None => f.write_str("booted, empty disk"),
        },
        HostEvent::Committed { version } => write!(f, "committed version {version}"),
        HostEvent::Put { object, outcome } => match outcome {
            Ok(()) => write!(f, "put {object}: stored"),
            Err(error) => write!(f, "put {object}: error: {error}"),
        },
        HostEvent::Listed { prefix, outcome } => match outcome {
            Ok(names) => {
                // A replication stream's names as its versions, when they all are; the names otherwise.
                let stream = prefix.strip_prefix(lockstep::replication::STREAM_ROOT).and_then(|s| s.strip_suffix('/'));
                let versions: Option<Vec<String>> = names
                    .iter()
                    .map(|name| stream.and_then(|stream| lockstep::replication::version_of(stream, name)))
                    .map(|version| version.map(|v| v.to_string()))
                    .collect();
                match versions {
                    Some(versions) if versions.is_empty() => write!(f, "list {prefix}: nothing"),
                    Some(versions) => write!(f, "list {prefix}: versions {}", versions.join(", ")),
                    None => write!(f, "list {prefix}: {}", names.join(", ")),
                }
            }
            Err(error) => write!(f, "list {prefix}: error: {error}"),
        },
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

/// Where two logs of one seed part, for a determinism failure: the first event that differs, as each run
/// logged it, or where the shorter log ends. `None` when the logs are equal.
pub fn first_difference(first: &[Event], second: &[Event]) -> Option<String> {
    let at = first.iter().zip(second).position(|(a, b)| a != b).unwrap_or(first.len().min(second.len()));
    let text = |event: &Event| event.to_string().trim_start().to_string();
    match (first.get(at).map(text), second.get(at).map(text)) {
        (None, None) => None,
        (Some(a), Some(b)) if a == b => {
            // The trace does not show the field that differs (a loaded state's retry times, say): show where the
            // full forms part.
            let (a_full, b_full) = (format!("{:?}", first[at]), format!("{:?}", second[at]));
            let (a_part, b_part) = parting(&a_full, &b_full);
            Some(format!(
                "first difference at event {}: `{a}` in both traces; in full they part at `{a_part}` against `{b_part}`",
                at + 1
            ))
        }
        (Some(a), Some(b)) => Some(format!("first difference at event {}: first run `{a}`, second run `{b}`", at + 1)),
        (Some(a), None) => Some(format!("the second run's log ends after {at} event(s); the first goes on with `{a}`")),
        (None, Some(b)) => Some(format!("the first run's log ends after {at} event(s); the second goes on with `{b}`")),
    }
}

/// Up to 40 characters either side of where `a` and `b` first differ, from each.
fn parting(a: &str, b: &str) -> (String, String) {
    let at = a.chars().zip(b.chars()).position(|(x, y)| x != y).unwrap_or(a.chars().count().min(b.chars().count()));
    let window = |text: &str| {
        let start = at.saturating_sub(40);
        let shown: String = text.chars().skip(start).take(at - start + 40).collect();
        format!("{}{shown}{}", if start > 0 { "…" } else { "" }, if text.chars().count() > at + 40 { "…" } else { "" })
    };
    (window(a), window(b))
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
    fn first_difference_names_the_first_event_that_differs_or_where_a_log_ends() {
        let log = vec![event(1000), event(2000), event(3000)];
        assert_eq!(first_difference(&log, &log.clone()), None);
        let other = vec![event(1000), event(2500), event(3000)];
        assert_eq!(
            first_difference(&log, &other).unwrap(),
            "first difference at event 2: first run `2.000s world        HEALED: faults stop`, \
             second run `2.500s world        HEALED: faults stop`"
        );
        assert_eq!(
            first_difference(&log[..1], &log).unwrap(),
            "the first run's log ends after 1 event(s); the second goes on with `2.000s world        HEALED: faults stop`"
        );
        assert!(first_difference(&log, &[]).unwrap().starts_with("the second run's log ends after 0 event(s)"));
        // Events that read the same in the trace but differ in a field it does not show: a loaded shard's rows.
        let booted = |value: u64| {
            let rows = std::sync::Arc::new([(1, value)].into_iter().collect());
            let loaded = lockstep::shard::ShardDurable { op: Some(1), applied_through: None, rows };
            let node = SimNode::Protocol(NodeAddr::Coordinator);
            Event { at_ms: 1000, node, kind: EventKind::Host(HostEvent::ShardBooted { loaded: Some(loaded) }) }
        };
        let (a, b) = (booted(7), booted(8));
        assert_eq!(a.to_string(), b.to_string());
        let line = first_difference(&[a], &[b]).unwrap();
        assert!(line.starts_with("first difference at event 1: `1.000s coordinator  booted, loaded op"), "{line}");
        assert!(
            line.ends_with("in full they part at `…me(1), applied_through: None, rows: {1: 7} }) }) }` against `…me(1), applied_through: None, rows: {1: 8} }) }) }`"),
            "{line}"
        );
        assert_eq!(parting("abcdefgh", "abcdXfgh"), ("abcdefgh".to_string(), "abcdXfgh".to_string()));
        let long_a = format!("{}A{}", "-".repeat(100), "+".repeat(100));
        let long_b = format!("{}B{}", "-".repeat(100), "+".repeat(100));
        let (a_part, b_part) = parting(&long_a, &long_b);
        assert_eq!(a_part, format!("…{}A{}…", "-".repeat(40), "+".repeat(39)));
        assert_eq!(b_part, format!("…{}B{}…", "-".repeat(40), "+".repeat(39)));
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
