//! Replication worlds: one seed builds a replicated tablet's history of commits, a publisher that pushes each
//! committed version through the simulated store, and a replica that initializes from the stream and then
//! pulls new versions ([`lockstep::replication`]), all under faults; after the run, checkers read the event log
//! and the final durable states.
//!
//! Fault model (each kind on or off per seed, with its own rate; none after the heal time):
//! - the store's, as `sim/src/store.rs` documents it: transient errors and slow answers on puts, listings and
//!   reads; partial, truncated and corrupted reads, with the fault atlas keeping an intact answer reachable;
//! - crash points in every persist (before the sync, and after it before the next output);
//! - publisher and replica reboots at random moments;
//! - and, as a model of the store rather than a fault (so on after the heal too), listings that show an object
//!   only some time after it is stored, each object after a delay of its own, in half the worlds.
//! - a crash loses the disk's unsynced writes and may tear the last one.
//!
//! After healing, the replica must hold every committed version, and the publisher must have pushed every one,
//! within the liveness bound. The invariants are [`ReplicationInvariant`]'s.

use std::collections::BTreeSet;
use std::fmt;
use std::fmt::Write as _;

use lockstep::host::HostEvent;
use lockstep::model::{Change, Rows, ShardId, SortedRows, TableId, TabletId, apply_changes};
use lockstep::protocol::{NodeAddr, PersistNote};
use lockstep::replication::{
    PublisherBug, PublisherConfig, PublisherDurable, ReplicaBug, ReplicaConfig, ReplicaDurable, Version, version_of,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::events::{Event, EventKind, SimNode};
use crate::faults::{FaultKind, FaultPlan};

#[cfg(madsim)]
mod run;
#[cfg(madsim)]
pub use run::{
    ReplicationOutcome, ReplicationSummary, catalogued_detection, run_replication, sweep_replication, transcript,
};

/// The fault kinds a replication world can inject; the others belong to restore worlds (protocol messages,
/// coordinator and shard reboots).
pub const FAULT_KINDS: [FaultKind; 10] = [
    FaultKind::CrashBeforeSync,
    FaultKind::CrashAfterPersist,
    FaultKind::DownloadPartial,
    FaultKind::DownloadTruncated,
    FaultKind::DownloadCorrupt,
    FaultKind::StoreUnavailable,
    FaultKind::StoreThrottled,
    FaultKind::StoreSlow,
    FaultKind::DiskLostWrite,
    FaultKind::DiskTornWrite,
];

/// Keys of the replicated tablet are drawn below this.
const KEY_SPACE: u64 = 2_000;
/// How long after healing the replica and the publisher have to catch up.
pub const LIVENESS_BOUND_MS: u64 = 30_000;

/// Deliberate bugs to run a replication world with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicationBugs {
    pub publisher: Option<PublisherBug>,
    pub replica: Option<ReplicaBug>,
}

/// A catalogued replication bug: what `cargo sim mutants` runs replication worlds against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownReplicationBug {
    /// The name `--bug` takes.
    pub name: &'static str,
    /// What goes wrong, in a line.
    pub summary: &'static str,
    /// The replication sweep must catch it within this many seeds (from seed 0).
    pub budget_seeds: u64,
    /// The invariant that exists to catch it.
    pub caught_by: ReplicationInvariant,
}

/// The catalog of replication bugs.
pub const REPLICATION_CATALOG: [KnownReplicationBug; 3] = [
    KnownReplicationBug {
        name: "puts-ahead",
        summary: "the publisher puts every commit at once, not waiting for the store to take the one before",
        budget_seeds: 50,
        caught_by: ReplicationInvariant::PushOrder,
    },
    KnownReplicationBug {
        name: "replica-skips-checksum",
        summary: "the replica applies a downloaded bundle without verifying its checksum",
        budget_seeds: 50,
        caught_by: ReplicationInvariant::ReplicaRows,
    },
    KnownReplicationBug {
        name: "replica-skips-missing-version",
        summary: "the replica goes on past a version a listing does not show yet",
        budget_seeds: 50,
        caught_by: ReplicationInvariant::ReplicaInOrder,
    },
];

impl ReplicationBugs {
    /// The bugs' names, as `--bug` takes them.
    pub const NAMES: [&'static str; 3] =
        [REPLICATION_CATALOG[0].name, REPLICATION_CATALOG[1].name, REPLICATION_CATALOG[2].name];

    /// Adds the bug named `name`; an unknown name is an error listing the known ones.
    pub fn add(&mut self, name: &str) -> Result<(), String> {
        match name {
            "puts-ahead" => self.publisher = Some(PublisherBug::PutsAhead),
            "replica-skips-checksum" => self.replica = Some(ReplicaBug::SkipChecksum),
            "replica-skips-missing-version" => self.replica = Some(ReplicaBug::SkipMissingVersion),
            _ => return Err(format!("unknown replication bug {name:?}; known: {}", Self::NAMES.join(", "))),
        }
        Ok(())
    }

    /// The `--bug` arguments that give these bugs, for a repro line.
    pub fn args(&self) -> String {
        let mut args = String::new();
        if self.publisher == Some(PublisherBug::PutsAhead) {
            args.push_str(" --bug puts-ahead");
        }
        match self.replica {
            Some(ReplicaBug::SkipChecksum) => args.push_str(" --bug replica-skips-checksum"),
            Some(ReplicaBug::SkipMissingVersion) => args.push_str(" --bug replica-skips-missing-version"),
            None => {}
        }
        args
    }
}

/// Everything one seed's replication run is made of.
#[derive(Clone, Debug)]
pub struct ReplicationWorld {
    pub seed: u64,
    pub stream: String,
    pub tablet: TabletId,
    /// The changes of each version, version 1 first (the tablet's first rows, as upserts in key order).
    pub versions: Vec<Vec<Change>>,
    /// When each version is committed, in simulated ms, in version order.
    pub commit_at_ms: Vec<u64>,
    /// Store, crash-point and disk faults, and the heal time.
    pub faults: FaultPlan,
    /// Publisher reboots per second of the fault phase (0: none).
    pub publisher_reboots_per_s: f64,
    /// Replica reboots per second of the fault phase (0: none).
    pub replica_reboots_per_s: f64,
    pub publisher: PublisherConfig,
    pub replica: ReplicaConfig,
    /// How long a host waits for a store call before it counts as failed.
    pub store_timeout_ms: u64,
    /// The store's listings show an object put up to this long after it is stored, each object after a delay
    /// of its own (0: at once, as S3's strongly consistent listings do).
    pub listing_lag_ms: u64,
    /// A version the store loses for good once stored: no read finds it and no listing shows it. The replica
    /// must stop just before it, and wait there, never skipping it.
    pub lost_version: Option<Version>,
}

impl ReplicationWorld {
    /// The world of `seed`, drawn with its own generator; `bugs` do not change what is drawn.
    pub fn generate(seed: u64, bugs: ReplicationBugs) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e91_1ca7_10f5_eed5);
        let versions = workload(&mut rng);
        let mut commit_at_ms = Vec::with_capacity(versions.len());
        let mut at = rng.gen_range(10..300);
        for _ in &versions {
            commit_at_ms.push(at);
            at += rng.gen_range(20..1_500);
        }
        let heal_at_ms = commit_at_ms.last().copied().unwrap_or(0) + rng.gen_range(0..3_000);
        let mut faults = FaultPlan::swarm(&mut rng, heal_at_ms);
        for kind in FaultKind::ALL {
            if !FAULT_KINDS.contains(&kind) {
                faults.set_rate(kind, 0.0);
            }
        }
        let mut reboots = || if rng.gen_bool(0.5) { rng.gen_range(0.05..0.6) } else { 0.0 };
        let (publisher_reboots_per_s, replica_reboots_per_s) = (reboots(), reboots());
        let publisher = PublisherConfig {
            put_retry_base_ms: rng.gen_range(20..200),
            put_retry_cap_ms: rng.gen_range(500..5_000),
            bug: bugs.publisher,
        };
        let replica = ReplicaConfig {
            download_chunk_bytes: rng.gen_range(64..=1_024),
            pull_interval_ms: rng.gen_range(50..1_000),
            retry_base_ms: rng.gen_range(10..100),
            retry_cap_ms: rng.gen_range(200..2_000),
            max_retry_after_ms: 10_000,
            bug: bugs.replica,
        };
        let listing_lag_ms = if rng.gen_bool(0.5) { rng.gen_range(50..=1_500) } else { 0 };
        let lost_version = rng.gen_bool(0.1).then(|| rng.gen_range(1..=versions.len() as Version));
        Self {
            seed,
            stream: "orders".to_string(),
            tablet: TabletId { table: TableId(1), shard: ShardId(0) },
            versions,
            commit_at_ms,
            faults,
            publisher_reboots_per_s,
            replica_reboots_per_s,
            publisher,
            replica,
            store_timeout_ms: 1_000,
            listing_lag_ms,
            lost_version,
        }
    }

    /// The newest version the world commits.
    pub fn last_version(&self) -> Version {
        self.versions.len() as Version
    }

    /// The tablet's rows after each version (index `v - 1` for version `v`), computed straight from the workload
    /// with a plain map, not by the code under test.
    pub fn oracle(&self) -> Vec<SortedRows> {
        let mut rows = Rows::new();
        self.versions
            .iter()
            .map(|changes| {
                apply_changes(&mut rows, changes);
                SortedRows::from(&rows)
            })
            .collect()
    }

    /// The version the replica must end at: the last, or the one before the version the store loses.
    pub fn expected_replica_version(&self) -> Version {
        self.lost_version.map_or(self.last_version(), |lost| lost - 1)
    }

    /// When the run gives up waiting for the replica to catch up.
    pub fn gives_up_at_ms(&self) -> u64 {
        self.faults.heal_at_ms + LIVENESS_BOUND_MS
    }

    /// The world in a few readable lines, the head of a trace.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let changes: usize = self.versions.iter().map(Vec::len).sum();
        let commits: Vec<String> = self.commit_at_ms.iter().map(|at| format!("{:.3}s", *at as f64 / 1000.0)).collect();
        let _ = writeln!(
            text,
            "replication world of seed {}: stream {}, {} version(s), {changes} change(s), committed at {}",
            self.seed,
            self.stream,
            self.versions.len(),
            commits.join(" ")
        );
        let faults: Vec<String> =
            self.faults.enabled().map(|kind| format!("{kind} {:.2}", self.faults.rate(kind))).collect();
        let _ = writeln!(
            text,
            "faults until {:.3}s: {}; publisher reboots {:.2}/s, replica reboots {:.2}/s",
            self.faults.heal_at_ms as f64 / 1000.0,
            if faults.is_empty() { "none".to_string() } else { faults.join(", ") },
            self.publisher_reboots_per_s,
            self.replica_reboots_per_s
        );
        if let Some(lost) = self.lost_version {
            let _ = writeln!(
                text,
                "the store loses version {lost} for good: the replica must stop at version {}",
                lost - 1
            );
        }
        let _ = match self.listing_lag_ms {
            0 => writeln!(text, "listings strongly consistent"),
            lag => writeln!(text, "listings show an object up to {lag} ms after it is stored"),
        };
        let _ = writeln!(text, "publisher {:?}", self.publisher);
        let _ = writeln!(text, "replica {:?}", self.replica);
        text
    }
}

/// Versions of one tablet: version 1 inserts the first rows; each later one upserts and deletes, some of its
/// keys new, some deleted before and inserted again. Every version's changes are in strictly increasing key
/// order, as a bundle holds them.
fn workload(rng: &mut ChaCha8Rng) -> Vec<Vec<Change>> {
    let count = rng.gen_range(3..=12);
    let mut rows = Rows::new();
    let mut deleted: BTreeSet<u64> = BTreeSet::new();
    let mut versions = Vec::with_capacity(count);
    let first: BTreeSet<u64> = (0..rng.gen_range(20..300)).map(|_| rng.gen_range(0..KEY_SPACE)).collect();
    let first: Vec<Change> = first.into_iter().map(|key| Change::Upsert { key, value: rng.r#gen() }).collect();
    apply_changes(&mut rows, &first);
    versions.push(first);
    for _ in 1..count {
        let mut keys: BTreeSet<u64> = (0..rng.gen_range(1..40)).map(|_| rng.gen_range(0..KEY_SPACE)).collect();
        if let Some(&again) = deleted.iter().nth(rng.gen_range(0..deleted.len().max(1))) {
            keys.insert(again);
        }
        let changes: Vec<Change> = keys
            .into_iter()
            .map(|key| {
                if rows.contains_key(&key) && rng.gen_bool(0.4) {
                    deleted.insert(key);
                    Change::Delete { key }
                } else {
                    deleted.remove(&key);
                    Change::Upsert { key, value: rng.r#gen() }
                }
            })
            .collect();
        apply_changes(&mut rows, &changes);
        versions.push(changes);
    }
    versions
}

/// What replication must keep, checked after every seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicationInvariant {
    /// The store holds versions 1 to k of the stream for some k, never a version without every earlier one.
    PushOrder,
    /// A publisher's durable "pushed through v" is claimed only once the store holds every version up to v, and
    /// never goes back, across reboots included.
    PublisherProgress,
    /// The replica's durable versions go 1, 2, 3, ... with no gap, and never back across reboots.
    ReplicaInOrder,
    /// At every durable version v, the replica's rows equal the source's rows after version v.
    ReplicaRows,
    /// After healing, within the bound, the replica holds the last version with the source's rows (or, where
    /// the store loses a version, the version before it, and no later one), and the publisher has pushed the last.
    Liveness,
}

impl ReplicationInvariant {
    pub const ALL: [ReplicationInvariant; 5] = [
        ReplicationInvariant::PushOrder,
        ReplicationInvariant::PublisherProgress,
        ReplicationInvariant::ReplicaInOrder,
        ReplicationInvariant::ReplicaRows,
        ReplicationInvariant::Liveness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReplicationInvariant::PushOrder => "push-order",
            ReplicationInvariant::PublisherProgress => "publisher-progress",
            ReplicationInvariant::ReplicaInOrder => "replica-in-order",
            ReplicationInvariant::ReplicaRows => "replica-rows",
            ReplicationInvariant::Liveness => "liveness",
        }
    }
}

impl fmt::Display for ReplicationInvariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken invariant: which, the first event that broke it (when one event is to blame), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationViolation {
    pub invariant: ReplicationInvariant,
    pub event_index: Option<usize>,
    pub event_text: Option<String>,
    pub detail: String,
}

impl fmt::Display for ReplicationViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VIOLATION {}: {}", self.invariant, self.detail)?;
        if let (Some(index), Some(text)) = (self.event_index, &self.event_text) {
            write!(f, "\n  first offending event #{index}: {text}")?;
        }
        Ok(())
    }
}

/// The durable states at the end of a run, as restarted nodes would read them back.
#[derive(Clone, Debug, Default)]
pub struct ReplicationFinal {
    pub publisher: Option<PublisherDurable>,
    pub replica: Option<ReplicaDurable>,
    /// The run gave up at the liveness bound.
    pub timed_out: bool,
}

/// Checks every invariant over the run's event log and final states; one violation per invariant at most, the
/// first.
pub fn check(world: &ReplicationWorld, log: &[Event], end: &ReplicationFinal) -> Vec<ReplicationViolation> {
    let oracle = world.oracle();
    let mut violations: Vec<ReplicationViolation> = Vec::new();
    let mut broke = |invariant: ReplicationInvariant, at: usize, detail: String| {
        if violations.iter().all(|v| v.invariant != invariant) {
            let event_text = Some(log[at].to_string());
            violations.push(ReplicationViolation { invariant, event_index: Some(at), event_text, detail });
        }
    };
    let mut stored: BTreeSet<Version> = BTreeSet::new();
    // The durable progress of each node as its last synced persist left it.
    let (mut pushed, mut applied) = (0, 0);
    for (at, event) in log.iter().enumerate() {
        match (&event.node, &event.kind) {
            (SimNode::Store, EventKind::Stored { object }) => {
                let Some(version) = version_of(&world.stream, object) else { continue };
                stored.insert(version);
                let through = stored.len() as Version;
                if stored.last() != Some(&through) {
                    let missing = (1..through).find(|v| !stored.contains(v)).unwrap_or(through);
                    let detail = format!("the store holds version {version} but not version {missing}");
                    broke(ReplicationInvariant::PushOrder, at, detail);
                }
            }
            (SimNode::Protocol(NodeAddr::Publisher), EventKind::Host(host)) => match host {
                HostEvent::PublisherBooted { loaded } => {
                    let loaded = loaded.as_ref().map_or(0, |state| state.pushed_through);
                    if loaded < pushed {
                        let detail = format!("booted with pushed through {loaded}, after pushed through {pushed}");
                        broke(ReplicationInvariant::PublisherProgress, at, detail);
                    }
                    pushed = loaded;
                }
                HostEvent::Persisted(PersistNote::Published { pushed_through }) => {
                    if *pushed_through < pushed {
                        let detail = format!("pushed through {pushed_through} after pushed through {pushed}");
                        broke(ReplicationInvariant::PublisherProgress, at, detail);
                    }
                    if let Some(missing) = (1..=*pushed_through).find(|v| !stored.contains(v)) {
                        let detail =
                            format!("claims pushed through {pushed_through}; the store lacks version {missing}");
                        broke(ReplicationInvariant::PublisherProgress, at, detail);
                    }
                    pushed = *pushed_through;
                }
                _ => {}
            },
            (SimNode::Protocol(NodeAddr::Replica), EventKind::Host(host)) => match host {
                HostEvent::ReplicaBooted { loaded } => {
                    let loaded = loaded.as_ref().map_or(0, |state| state.applied_through);
                    if loaded != applied {
                        let detail = format!("booted with version {loaded}, after version {applied} was durable");
                        broke(ReplicationInvariant::ReplicaInOrder, at, detail);
                    }
                    applied = loaded;
                }
                HostEvent::Persisted(PersistNote::Replicated { applied_through, rows }) => {
                    if *applied_through != applied + 1 {
                        let detail = format!("applied version {applied_through} onto version {applied}");
                        broke(ReplicationInvariant::ReplicaInOrder, at, detail);
                    }
                    let expected = usize::try_from(*applied_through).ok().and_then(|v| oracle.get(v.checked_sub(1)?));
                    match expected {
                        Some(expected) if **rows == *expected => {}
                        Some(expected) => {
                            let detail = format!(
                                "rows at version {applied_through} differ from the source's ({} rows, {} expected{})",
                                rows.len(),
                                expected.len(),
                                first_difference(rows, expected)
                            );
                            broke(ReplicationInvariant::ReplicaRows, at, detail);
                        }
                        None => {
                            let detail = format!("applied version {applied_through}, which the source never committed");
                            broke(ReplicationInvariant::ReplicaRows, at, detail);
                        }
                    }
                    applied = *applied_through;
                }
                _ => {}
            },
            _ => {}
        }
    }
    let last = world.last_version();
    let expected = world.expected_replica_version();
    let replica = end.replica.as_ref().map_or(0, |state| state.applied_through);
    let publisher = end.publisher.as_ref().map_or(0, |state| state.pushed_through);
    let expected_rows = usize::try_from(expected).ok().and_then(|v| oracle.get(v.checked_sub(1)?));
    let rows_right = match &end.replica {
        Some(state) => Some(&*state.rows) == expected_rows,
        None => expected == 0,
    };
    let caught_up = replica == expected && publisher == last && rows_right;
    // A world that loses a version runs to its bound by design; the others must end before it.
    let timed_out = end.timed_out && world.lost_version.is_none();
    if timed_out || !caught_up {
        let detail = format!(
            "{:.3}s after healing: replica holds version {replica} (expected {expected}), publisher pushed through \
             {publisher}, of {last}",
            LIVENESS_BOUND_MS as f64 / 1000.0
        );
        violations.push(ReplicationViolation {
            invariant: ReplicationInvariant::Liveness,
            event_index: None,
            event_text: None,
            detail,
        });
    }
    violations.sort_by_key(|violation| (violation.event_index.is_none(), violation.event_index, violation.invariant));
    violations
}

/// Where two row sets first differ, for a violation's detail.
fn first_difference(rows: &SortedRows, expected: &SortedRows) -> String {
    let mut got = rows.iter();
    let mut want = expected.iter();
    loop {
        match (got.next(), want.next()) {
            (Some(a), Some(b)) if a == b => continue,
            (Some((key, value)), Some((want_key, want_value))) => {
                return if key == want_key {
                    format!("; key {key} is {value}, not {want_value}")
                } else {
                    format!("; first differing key {}", key.min(want_key))
                };
            }
            (Some((key, _)), None) => return format!("; key {key} should not be there"),
            (None, Some((key, _))) => return format!("; key {key} is missing"),
            (None, None) => return String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worlds_are_drawn_from_their_seed_and_bugs_do_not_change_the_draw() {
        let world = ReplicationWorld::generate(7, ReplicationBugs::default());
        let again = ReplicationWorld::generate(7, ReplicationBugs::default());
        assert_eq!(world.describe(), again.describe());
        assert_eq!(world.versions, again.versions);
        let mut bugs = ReplicationBugs::default();
        bugs.add("puts-ahead").unwrap();
        let buggy = ReplicationWorld::generate(7, bugs);
        assert_eq!(buggy.versions, world.versions);
        assert_eq!(buggy.commit_at_ms, world.commit_at_ms);
        assert_ne!(ReplicationWorld::generate(8, ReplicationBugs::default()).versions, world.versions);
    }

    #[test]
    fn workloads_keep_key_order_delete_and_insert_again() {
        let mut reinserted = 0;
        for seed in 0..200 {
            let world = ReplicationWorld::generate(seed, ReplicationBugs::default());
            assert!((3..=12).contains(&world.versions.len()));
            assert!(world.commit_at_ms.windows(2).all(|pair| pair[0] < pair[1]));
            assert!(world.faults.heal_at_ms >= *world.commit_at_ms.last().unwrap());
            for kind in FaultKind::ALL.into_iter().filter(|kind| !FAULT_KINDS.contains(kind)) {
                assert_eq!(world.faults.rate(kind), 0.0, "{kind} is not a replication fault");
            }
            let mut gone = BTreeSet::new();
            for changes in &world.versions {
                assert!(changes.windows(2).all(|pair| pair[0].key() < pair[1].key()));
                for change in changes {
                    match change {
                        Change::Delete { key } => {
                            gone.insert(*key);
                        }
                        Change::Upsert { key, .. } => reinserted += usize::from(gone.remove(key)),
                    }
                }
            }
            assert!(world.versions[0].iter().all(|change| matches!(change, Change::Upsert { .. })));
        }
        assert!(reinserted > 50, "keys deleted and inserted again: {reinserted}");
    }

    #[test]
    fn bug_names_are_known_and_round_trip_to_repro_arguments() {
        let mut bugs = ReplicationBugs::default();
        for name in ReplicationBugs::NAMES {
            let mut one = ReplicationBugs::default();
            one.add(name).unwrap();
            assert_eq!(one.args(), format!(" --bug {name}"));
        }
        let error = bugs.add("skip-everything").unwrap_err();
        assert!(error.contains("skip-everything") && error.contains("puts-ahead"), "{error}");
    }

    fn event(at_ms: u64, node: SimNode, kind: EventKind) -> Event {
        Event { at_ms, node, kind }
    }

    fn stored(world: &ReplicationWorld, version: Version) -> Event {
        let object = lockstep::replication::version_object(&world.stream, version);
        event(version, SimNode::Store, EventKind::Stored { object })
    }

    fn replicated(version: Version, rows: SortedRows) -> Event {
        let note = PersistNote::Replicated { applied_through: version, rows: std::sync::Arc::new(rows) };
        event(version, SimNode::Protocol(NodeAddr::Replica), EventKind::Host(HostEvent::Persisted(note)))
    }

    fn published(version: Version) -> Event {
        let note = PersistNote::Published { pushed_through: version };
        event(version, SimNode::Protocol(NodeAddr::Publisher), EventKind::Host(HostEvent::Persisted(note)))
    }

    /// A log in which every version is stored, pushed and replicated in order, and the final states that go
    /// with it.
    fn good_run(world: &ReplicationWorld) -> (Vec<Event>, ReplicationFinal) {
        let oracle = world.oracle();
        let mut log = Vec::new();
        for version in 1..=world.last_version() {
            log.push(stored(world, version));
            log.push(published(version));
            log.push(replicated(version, oracle[version as usize - 1].clone()));
        }
        let last = world.last_version();
        let end = ReplicationFinal {
            publisher: Some(PublisherDurable { pushed_through: last }),
            replica: Some(ReplicaDurable {
                applied_through: last,
                rows: std::sync::Arc::new(oracle.last().unwrap().clone()),
            }),
            timed_out: false,
        };
        (log, end)
    }

    fn broken(world: &ReplicationWorld, log: &[Event], end: &ReplicationFinal) -> Vec<ReplicationInvariant> {
        check(world, log, end).into_iter().map(|violation| violation.invariant).collect()
    }

    #[test]
    fn a_good_run_breaks_nothing() {
        let world = ReplicationWorld::generate(3, ReplicationBugs::default());
        let (log, end) = good_run(&world);
        assert_eq!(check(&world, &log, &end), Vec::new());
    }

    #[test]
    fn each_checker_catches_what_it_exists_for() {
        let world = ReplicationWorld::generate(3, ReplicationBugs::default());
        let (log, end) = good_run(&world);
        // Version 2 stored before version 1.
        let mut swapped = log.clone();
        swapped.swap(0, 3);
        assert!(broken(&world, &swapped, &end).contains(&ReplicationInvariant::PushOrder));
        // Pushed through 2 with only version 1 stored.
        let mut early = log.clone();
        early.insert(1, published(2));
        assert!(broken(&world, &early, &end).contains(&ReplicationInvariant::PublisherProgress));
        // The publisher boots with less than it had made durable.
        let mut regressed = log.clone();
        let booted = HostEvent::PublisherBooted { loaded: None };
        regressed.insert(4, event(4, SimNode::Protocol(NodeAddr::Publisher), EventKind::Host(booted)));
        assert!(broken(&world, &regressed, &end).contains(&ReplicationInvariant::PublisherProgress));
        // The replica skips version 2.
        let oracle = world.oracle();
        let skipped: Vec<Event> = log.iter().filter(|e| !is_replicated(e, 2)).cloned().collect();
        assert!(broken(&world, &skipped, &end).contains(&ReplicationInvariant::ReplicaInOrder));
        // The replica boots with less than it had made durable.
        let mut forgot = log.clone();
        let booted = HostEvent::ReplicaBooted { loaded: None };
        forgot.insert(3, event(3, SimNode::Protocol(NodeAddr::Replica), EventKind::Host(booted)));
        assert!(broken(&world, &forgot, &end).contains(&ReplicationInvariant::ReplicaInOrder));
        // Rows that differ from the source's at their version.
        let mut wrong = log.clone();
        wrong[2] = replicated(1, oracle[1].clone());
        let violations = check(&world, &wrong, &end);
        let rows = violations.iter().find(|v| v.invariant == ReplicationInvariant::ReplicaRows).expect("caught");
        assert_eq!(rows.event_index, Some(2));
        // Not caught up at the end.
        let behind = ReplicationFinal { timed_out: true, ..end.clone() };
        assert_eq!(broken(&world, &log, &behind), vec![ReplicationInvariant::Liveness]);
        let stale = ReplicationFinal {
            replica: Some(ReplicaDurable { applied_through: 1, rows: std::sync::Arc::new(oracle[0].clone()) }),
            ..end
        };
        assert_eq!(broken(&world, &log, &stale), vec![ReplicationInvariant::Liveness]);
    }

    #[test]
    fn where_the_store_loses_a_version_the_replica_must_stop_just_before_it() {
        let mut world = ReplicationWorld::generate(3, ReplicationBugs::default());
        world.lost_version = Some(2);
        let oracle = world.oracle();
        let (log, end) = good_run(&world);
        // The log up to version 1, and a run that waited at its bound: what a correct replica does.
        let stopped: Vec<Event> = log.iter().take_while(|e| !is_replicated(e, 2)).cloned().collect();
        let waited = ReplicationFinal {
            replica: Some(ReplicaDurable { applied_through: 1, rows: std::sync::Arc::new(oracle[0].clone()) }),
            timed_out: true,
            ..end.clone()
        };
        let broken_here = broken(&world, &stopped, &waited);
        assert!(!broken_here.contains(&ReplicationInvariant::Liveness), "{broken_here:?}");
        // A replica that holds the last version got past the lost one.
        assert!(broken(&world, &log, &end).contains(&ReplicationInvariant::Liveness));
    }

    fn is_replicated(event: &Event, version: Version) -> bool {
        matches!(
            &event.kind,
            EventKind::Host(HostEvent::Persisted(PersistNote::Replicated { applied_through, .. }))
                if *applied_through == version
        )
    }
}
