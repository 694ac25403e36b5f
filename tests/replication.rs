//! A deterministic fault harness for replication through the store: one [`Publisher`] and one [`Replica`] run
//! against an in-memory fake store in a small discrete-event simulator, and checkers outside the machines verify
//! replication's invariants after every step. No madsim, no async: virtual time is a number of milliseconds and
//! the next event is the first entry of a `BTreeMap` keyed by (time, sequence number).
//!
//! # One run
//!
//! Everything in a run is drawn from one `u64` seed through a `ChaCha8Rng`, in a fixed order, so a seed replays
//! exactly (the determinism test compares two event logs):
//! - the workload: versions 1..=N (N from 3 to 12) of the tablet t1/shard-0. Version 1 is the initial rows as
//!   upserts in key order; every later version is a batch of upserts and deletes in strictly increasing key order,
//!   with deletes of existing rows, a delete of a missing key now and then, and one key deleted in version 2 and
//!   inserted again in version 3. The oracle is the rows after each version, computed from the workload alone
//!   with [`apply_changes`], never from the machines;
//! - the commit times (gaps of up to 5, 40, 300 or 1000 ms between versions, one spread per seed), the heal time
//!   (1 to 8 s), the replica's read size (32 to 1024 bytes) and pull interval (50 to 500 ms), and the fault plan
//!   below.
//!
//! The host carries out a machine's outputs in order: a `Persist` is durable the moment it is carried out
//! (crashes fall between outputs), a `Put`, `List` or `Download` travels to the store as an event and its answer
//! travels back as another, and a `SetTimer` schedules a timer event. Every request is answered exactly once:
//! by the store, or by the host with `StoreError::Timeout` [`HOST_TIMEOUT_MS`] after it was sent if no answer
//! came by then (a later answer is dropped, as a real host's cancelled request drops it). Answers and timers
//! addressed to an incarnation of a machine that has since crashed are dropped.
//!
//! # The fault model (swarm testing)
//!
//! Each seed turns every fault kind on or off (even odds) and gives each kind that is on its own rate, from 2% to
//! 30% per chance. All faults stop at the heal time; after it every message takes 1-50 ms and nothing fails.
//!
//! | fault kind                 | chance taken                 | what happens                                   |
//! |----------------------------|------------------------------|------------------------------------------------|
//! | `slow-message`             | every request and answer     | 200-3000 ms in flight instead of 1-50 ms, so   |
//! |                            |                              | answers reorder and some pass the host timeout |
//! | `put-unavailable`          | every put reaching the store | `Unavailable`; nothing is stored               |
//! | `put-ack-lost`             | every put the store stores   | stored, but the answer is lost: `Timeout`      |
//! | `list-unavailable`         | every listing                | `Unavailable`                                  |
//! | `list-stale`               | every object put in the last | left out of the listing (a fake stricter than  |
//! |                            | 200 ms, at every listing     | S3): the replica sees gaps that are not there  |
//! | `read-unavailable`         | every ranged read            | `Unavailable`                                  |
//! | `read-throttled`           | every ranged read            | `Throttled`, retry after 20-500 ms             |
//! | `read-partial`             | every ranged read            | fewer bytes than asked (at least one)          |
//! | `read-truncated`           | every ranged read            | the answer says the object ends where it ends  |
//! | `read-corrupt`             | every ranged read            | one bit of one byte of the answer flipped      |
//! | `publisher-reboot`,        | every second before the heal | the machine crashes between two steps          |
//! | `replica-reboot`           |                              |                                                |
//! | `publisher-crash-mid-step`,| every output after the first | the machine crashes between two outputs of one |
//! | `replica-crash-mid-step`   | of a step                    | step; the rest of the step is never carried out|
//!
//! A crashed machine is down for 1-200 ms, then rebuilt from its last persisted state: `Publisher::boot` with
//! the persisted [`PublisherDurable`], after which the host hands it the commits again, from version 1 or from
//! `pushed_through + 1` (even odds) up to the newest committed; `Replica::boot` with the persisted
//! [`ReplicaDurable`], then `start`.
//!
//! What the fake store guarantees (its fault atlas): the stored bytes never change (damage is done to the copy
//! sent), objects are never deleted, and after [`MAX_DAMAGED_STREAK`] damaged answers in a row for one object
//! (unavailable, throttled, truncated or corrupt) the next read of it is answered intact. A partial answer is
//! short but true, so it does not count as damaged.
//!
//! # The checkers
//!
//! They read only the store, the persisted states and the workload, never a machine's memory:
//! 1. `push-order`: after every put that lands, the stream's versions in the store are exactly 1..=k: no version
//!    is ever readable without every earlier one;
//! 2. `replica-in-order`: the `applied_through` values the replica persists are 1, 2, 3, ... with no gap and never
//!    going back, across reboots too (persisting the same version again is allowed only with the same rows);
//! 3. `replica-rows`: at every replica persist of version v, its rows are the oracle's rows after version v (this
//!    catches applying a damaged bundle, or a version onto the wrong rows);
//! 4. `publisher-progress`: the persisted `pushed_through` never goes backwards, across reboots too, and the store
//!    holds every version up to it;
//! 5. `liveness`: within [`LIVENESS_BOUND_MS`] of the heal (or of the last commit, if later) the replica has
//!    persisted version N with the oracle's rows, and the publisher has persisted `pushed_through` = N. The bound
//!    is generous: the longest wait a machine can be in at the heal is the publisher's 7.5 s (a 5 s backoff cap plus
//!    half of it in jitter), and then at most 12 puts and about 80 reads of at most 100 ms each remain.
//!
//! A failure names the invariant, the seed and the first offending event, with the events before it.
//!
//! # The tests
//!
//! The sweep runs every seed of [`SWEEP_SEEDS`] with the correct machines: every invariant must hold in every
//! seed, and every fault kind must have struck somewhere, so the sweep is not vacuous. Another test replays seeds
//! and compares event logs. Three more run the sweep's seeds with one deliberate bug each and show the checker
//! that exists for it catching it: `push-order` catches `PublisherBug::PutsAhead`, `replica-rows` catches
//! `ReplicaBug::SkipChecksum`, `replica-in-order` catches `ReplicaBug::SkipMissingVersion`. An ignored test prints
//! one seed's event log, for reading a run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use lockstep::io::range_of;
use lockstep::model::{Change, Key, Rows, ShardId, TableId, TabletId, apply_changes};
use lockstep::protocol::{DownloadRequest, DownloadResult, RangeRead, StoreError};
use lockstep::replication::{
    Publisher, PublisherBug, PublisherConfig, PublisherDurable, PublisherTimer, Replica, ReplicaBug, ReplicaConfig,
    ReplicaDurable, ReplicaTimer, ReplicationOutput, Version, stream_prefix, version_object, version_of,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------------------------
// The setting
// ---------------------------------------------------------------------------------------------------------------

/// The seeds every test runs.
const SWEEP_SEEDS: Range<u64> = 0..2000;
/// The replicated stream and the tablet it carries.
const STREAM: &str = "orders";
const TABLET: TabletId = TabletId { table: TableId(1), shard: ShardId(0) };
/// How long the host waits for the store's answer before it answers the machine with a timeout itself.
const HOST_TIMEOUT_MS: u64 = 1_000;
/// How long a request or an answer is in flight, normally and when the `slow-message` fault strikes.
const NORMAL_LATENCY_MS: Range<u64> = 1..51;
const SLOW_LATENCY_MS: Range<u64> = 200..3_001;
/// A stale listing may leave out objects put this recently.
const STALE_WINDOW_MS: u64 = 200;
/// Damaged answers in a row for one object after which the next read of it is intact (the fault atlas).
const MAX_DAMAGED_STREAK: u32 = 3;
/// How long a crashed machine stays down before it is rebuilt.
const DOWNTIME_MS: Range<u64> = 1..201;
/// How long after the heal (or the last commit, if later) the run must have converged.
const LIVENESS_BOUND_MS: u64 = 30_000;
/// Records of the log printed before the first offending event in a failure.
const CONTEXT_RECORDS: usize = 15;

// ---------------------------------------------------------------------------------------------------------------
// The workload and its oracle
// ---------------------------------------------------------------------------------------------------------------

/// The versions the source tablet commits, and the rows after each, computed from the changes alone.
struct Workload {
    /// `changes[v - 1]` is version v's changes, in strictly increasing key order.
    changes: Vec<Vec<Change>>,
    /// `rows_after[v]` is the tablet after version v; `rows_after[0]` is empty.
    rows_after: Vec<Rows>,
}

impl Workload {
    const KEY_SPACE: Key = 40;

    fn generate(rng: &mut ChaCha8Rng) -> Self {
        let newest = rng.gen_range(3..=12);
        let initial_keys = random_keys(rng, 3..16);
        let initial: Vec<Change> =
            initial_keys.iter().map(|&key| Change::Upsert { key, value: rng.gen_range(1..1_000_000) }).collect();
        // One key of the initial rows is deleted by version 2 and inserted again by version 3.
        let reinserted = *initial_keys.iter().nth(rng.gen_range(0..initial_keys.len())).expect("keys are drawn");
        let mut rows = Rows::new();
        apply_changes(&mut rows, &initial);
        let mut workload = Workload { changes: vec![initial], rows_after: vec![Rows::new(), rows.clone()] };
        for version in 2..=newest {
            let mut keys = random_keys(rng, 1..9);
            if version <= 3 {
                keys.insert(reinserted);
            }
            let changes: Vec<Change> = keys
                .into_iter()
                .map(|key| {
                    let present = rows.contains_key(&key);
                    let delete = if key == reinserted && version <= 3 {
                        version == 2
                    } else if present {
                        rng.gen_bool(0.4)
                    } else {
                        // Deleting a key that is not there changes nothing, and must not break anything either.
                        rng.gen_bool(0.1)
                    };
                    if delete {
                        Change::Delete { key }
                    } else {
                        Change::Upsert { key, value: rng.gen_range(1..1_000_000) }
                    }
                })
                .collect();
            apply_changes(&mut rows, &changes);
            workload.changes.push(changes);
            workload.rows_after.push(rows.clone());
        }
        workload
    }

    /// The newest version, N.
    fn newest(&self) -> Version {
        self.changes.len() as Version
    }

    fn changes_of(&self, version: Version) -> &[Change] {
        &self.changes[version as usize - 1]
    }

    fn rows_after(&self, version: Version) -> &Rows {
        &self.rows_after[version as usize]
    }
}

/// Distinct keys of the key space, as many as drawn from `count`, in increasing order.
fn random_keys(rng: &mut ChaCha8Rng, count: Range<usize>) -> BTreeSet<Key> {
    let wanted = rng.gen_range(count);
    let mut keys = BTreeSet::new();
    while keys.len() < wanted {
        keys.insert(rng.gen_range(0..Workload::KEY_SPACE));
    }
    keys
}

// ---------------------------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    SlowMessage,
    PutUnavailable,
    PutAckLost,
    ListUnavailable,
    ListStale,
    ReadUnavailable,
    ReadThrottled,
    ReadPartial,
    ReadTruncated,
    ReadCorrupt,
    PublisherReboot,
    ReplicaReboot,
    PublisherCrashMidStep,
    ReplicaCrashMidStep,
}

impl FaultKind {
    const ALL: [FaultKind; 14] = [
        FaultKind::SlowMessage,
        FaultKind::PutUnavailable,
        FaultKind::PutAckLost,
        FaultKind::ListUnavailable,
        FaultKind::ListStale,
        FaultKind::ReadUnavailable,
        FaultKind::ReadThrottled,
        FaultKind::ReadPartial,
        FaultKind::ReadTruncated,
        FaultKind::ReadCorrupt,
        FaultKind::PublisherReboot,
        FaultKind::ReplicaReboot,
        FaultKind::PublisherCrashMidStep,
        FaultKind::ReplicaCrashMidStep,
    ];

    fn name(self) -> &'static str {
        match self {
            FaultKind::SlowMessage => "slow-message",
            FaultKind::PutUnavailable => "put-unavailable",
            FaultKind::PutAckLost => "put-ack-lost",
            FaultKind::ListUnavailable => "list-unavailable",
            FaultKind::ListStale => "list-stale",
            FaultKind::ReadUnavailable => "read-unavailable",
            FaultKind::ReadThrottled => "read-throttled",
            FaultKind::ReadPartial => "read-partial",
            FaultKind::ReadTruncated => "read-truncated",
            FaultKind::ReadCorrupt => "read-corrupt",
            FaultKind::PublisherReboot => "publisher-reboot",
            FaultKind::ReplicaReboot => "replica-reboot",
            FaultKind::PublisherCrashMidStep => "publisher-crash-mid-step",
            FaultKind::ReplicaCrashMidStep => "replica-crash-mid-step",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Which faults a seed turns on, at which rate, until when.
struct FaultPlan {
    /// The chance each fault kind that is on strikes at each chance it has; a kind not here is off.
    rates: BTreeMap<FaultKind, f64>,
    /// No fault strikes from this time on.
    heal_ms: u64,
}

impl FaultPlan {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let mut rates = BTreeMap::new();
        for kind in FaultKind::ALL {
            if rng.gen_bool(0.5) {
                rates.insert(kind, rng.gen_range(0.02..0.3));
            }
        }
        FaultPlan { rates, heal_ms: rng.gen_range(1_000..=8_000) }
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rates.is_empty() {
            return f.write_str("none");
        }
        let rates: Vec<String> = self.rates.iter().map(|(kind, rate)| format!("{kind} {:.0}%", rate * 100.0)).collect();
        f.write_str(&rates.join(", "))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The event log
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    /// The source tablet, committing versions.
    Source,
    Publisher,
    Replica,
    Store,
    /// The host's own doings: timeouts, dropped answers.
    Host,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Node::Source => "source",
            Node::Publisher => "publisher",
            Node::Replica => "replica",
            Node::Store => "store",
            Node::Host => "host",
        };
        f.pad(name)
    }
}

/// One line of the event log: when, where, what.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LogRecord {
    time_ms: u64,
    node: Node,
    what: String,
}

impl fmt::Display for LogRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:>6} ms] {:<9} {}", self.time_ms, self.node, self.what)
    }
}

/// `v3` for version 3's object, the name itself for anything else: object names are long and alike.
fn short_name(object: &str) -> String {
    version_of(STREAM, object).map_or_else(|| object.to_string(), |version| format!("v{version}"))
}

// ---------------------------------------------------------------------------------------------------------------
// The checkers
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invariant {
    PushOrder,
    ReplicaInOrder,
    ReplicaRows,
    PublisherProgress,
    Liveness,
}

impl Invariant {
    fn name(self) -> &'static str {
        match self {
            Invariant::PushOrder => "push-order",
            Invariant::ReplicaInOrder => "replica-in-order",
            Invariant::ReplicaRows => "replica-rows",
            Invariant::PublisherProgress => "publisher-progress",
            Invariant::Liveness => "liveness",
        }
    }
}

/// A checker's finding: which invariant broke, in which seed, at which event.
#[derive(Clone, Debug)]
struct Violation {
    invariant: Invariant,
    seed: u64,
    detail: String,
    /// The first event at which the invariant no longer held.
    offending_event: LogRecord,
    /// The events logged just before it, oldest first.
    events_before: Vec<LogRecord>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invariant `{}` violated in seed {}: {}", self.invariant.name(), self.seed, self.detail)?;
        writeln!(f, "first offending event: {}", self.offending_event)?;
        writeln!(f, "the events before it:")?;
        for record in &self.events_before {
            writeln!(f, "    {record}")?;
        }
        Ok(())
    }
}

type Store = BTreeMap<String, Bytes>;

/// The versions of the stream the store holds, in order.
fn stored_versions(store: &Store) -> Vec<Version> {
    let prefix = stream_prefix(STREAM);
    store
        .range(prefix.clone()..)
        .take_while(|(name, _)| name.starts_with(&prefix))
        .filter_map(|(name, _)| version_of(STREAM, name))
        .collect()
}

/// `push-order`: the store holds versions 1..=k of the stream for some k, never one without every earlier one.
fn check_push_order(store: &Store) -> Result<(), String> {
    let versions = stored_versions(store);
    match versions.iter().zip(1..).find(|(stored, expected)| **stored != *expected) {
        None => Ok(()),
        Some((_, missing)) => Err(format!("the store holds versions {versions:?} of the stream: {missing} is missing")),
    }
}

/// `replica-in-order`: a replica persist is of the version after the last one persisted (or of the same version
/// with the same rows), reboots or not.
fn check_replica_in_order(previous: Option<&ReplicaDurable>, persisted: &ReplicaDurable) -> Result<(), String> {
    let previous_version = previous.map_or(0, |durable| durable.applied_through);
    let version = persisted.applied_through;
    if version == previous_version + 1 {
        return Ok(());
    }
    if version == previous_version && previous.is_some_and(|durable| durable.rows == persisted.rows) {
        return Ok(());
    }
    let what = if version > previous_version + 1 {
        format!("skipping {}..={}", previous_version + 1, version - 1)
    } else if version == previous_version {
        "again, with different rows".to_string()
    } else {
        "going back".to_string()
    };
    Err(format!("the replica persisted applied_through {version} after {previous_version}: {what}"))
}

/// `replica-rows`: the rows persisted with version v are the oracle's rows after version v.
fn check_replica_rows(workload: &Workload, persisted: &ReplicaDurable) -> Result<(), String> {
    let version = persisted.applied_through;
    if version > workload.newest() {
        return Err(format!("the replica persisted version {version}, but only 1..={} exist", workload.newest()));
    }
    let expected = workload.rows_after(version);
    let actual = persisted.rows.to_map();
    if actual == *expected {
        return Ok(());
    }
    let keys: BTreeSet<Key> = expected.keys().chain(actual.keys()).copied().collect();
    let differences: Vec<String> = keys
        .into_iter()
        .filter(|key| expected.get(key) != actual.get(key))
        .take(5)
        .map(|key| format!("key {key}: oracle {:?}, replica {:?}", expected.get(&key), actual.get(&key)))
        .collect();
    Err(format!("the replica's rows at version {version} are not the oracle's: {}", differences.join("; ")))
}

/// `publisher-progress`: the persisted `pushed_through` never goes backwards, and the store holds every version
/// up to it.
fn check_publisher_progress(
    previous: Option<&PublisherDurable>,
    persisted: &PublisherDurable,
    store: &Store,
) -> Result<(), String> {
    let previous_version = previous.map_or(0, |durable| durable.pushed_through);
    let version = persisted.pushed_through;
    if version < previous_version {
        return Err(format!("the publisher persisted pushed_through {version} after {previous_version}"));
    }
    match (1..=version).find(|v| !store.contains_key(&version_object(STREAM, *v))) {
        None => Ok(()),
        Some(missing) => {
            Err(format!("the publisher persisted pushed_through {version}, but the store lacks version {missing}"))
        }
    }
}

/// `liveness` holds once both machines have persisted the newest version, the replica with the oracle's rows.
fn converged(
    workload: &Workload,
    publisher: Option<&PublisherDurable>,
    replica: Option<&ReplicaDurable>,
) -> Result<(), String> {
    let newest = workload.newest();
    let pushed_through = publisher.map_or(0, |durable| durable.pushed_through);
    let applied_through = replica.map_or(0, |durable| durable.applied_through);
    let rows_match = replica.is_some_and(|durable| durable.rows.to_map() == *workload.rows_after(newest));
    if pushed_through == newest && applied_through == newest && rows_match {
        Ok(())
    } else {
        Err(format!(
            "the publisher pushed through {pushed_through} and the replica applied through {applied_through} \
             (rows {}) of {newest} versions",
            if rows_match { "right" } else { "not yet the oracle's" }
        ))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------------------------

/// The deliberate bugs a run turns on (none for the sweep).
#[derive(Clone, Copy, Debug, Default)]
struct Bugs {
    publisher: Option<PublisherBug>,
    replica: Option<ReplicaBug>,
}

/// A machine's durable state and timers, whichever machine it is, so one host loop carries out both's outputs.
#[derive(Clone, Debug)]
enum Durable {
    Publisher(PublisherDurable),
    Replica(ReplicaDurable),
}

#[derive(Clone, Debug)]
enum NodeTimer {
    Publisher(PublisherTimer),
    Replica(ReplicaTimer),
}

type HostOutput = ReplicationOutput<Durable, NodeTimer>;

fn lift<D, T>(
    outputs: Vec<ReplicationOutput<D, T>>,
    durable: fn(D) -> Durable,
    timer: fn(T) -> NodeTimer,
) -> Vec<HostOutput> {
    outputs
        .into_iter()
        .map(|output| match output {
            ReplicationOutput::Persist(state) => ReplicationOutput::Persist(durable(state)),
            ReplicationOutput::Put { put_id, object, bytes } => ReplicationOutput::Put { put_id, object, bytes },
            ReplicationOutput::List { list_id, prefix } => ReplicationOutput::List { list_id, prefix },
            ReplicationOutput::Download(request) => ReplicationOutput::Download(request),
            ReplicationOutput::SetTimer { at_ms, timer: fired } => {
                ReplicationOutput::SetTimer { at_ms, timer: timer(fired) }
            }
            ReplicationOutput::Report(text) => ReplicationOutput::Report(text),
        })
        .collect()
}

/// A request a machine sent the store.
#[derive(Clone, Debug)]
enum StoreCall {
    Put { put_id: u64, object: String, bytes: Bytes },
    List { list_id: u64, prefix: String },
    Download(DownloadRequest),
}

impl fmt::Display for StoreCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreCall::Put { put_id, object, bytes } => {
                write!(f, "put #{put_id} of {} ({} bytes)", short_name(object), bytes.len())
            }
            StoreCall::List { list_id, .. } => write!(f, "list #{list_id}"),
            StoreCall::Download(request) => write!(
                f,
                "read of download #{} {} @{}+{}",
                request.download_id,
                short_name(&request.object),
                request.offset,
                request.len
            ),
        }
    }
}

#[derive(Clone, Debug)]
enum StoreAnswer {
    Put(Result<(), StoreError>),
    List(Result<Vec<String>, StoreError>),
    Download(DownloadResult),
}

impl fmt::Display for StoreAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreAnswer::Put(Ok(())) => f.write_str("ok"),
            StoreAnswer::List(Ok(names)) => {
                let names: Vec<String> = names.iter().map(|name| short_name(name)).collect();
                write!(f, "[{}]", names.join(", "))
            }
            StoreAnswer::Download(DownloadResult { outcome: Ok(read), .. }) => {
                write!(f, "{} bytes, total_len {}", read.bytes.len(), read.total_len)
            }
            StoreAnswer::Put(Err(error))
            | StoreAnswer::List(Err(error))
            | StoreAnswer::Download(DownloadResult { outcome: Err(error), .. }) => write!(f, "error: {error}"),
        }
    }
}

/// The host's record of one request: who sent it, and whether the sender has had its one answer.
struct HostRequest {
    node: Node,
    incarnation: u64,
    call: StoreCall,
    answered: bool,
}

enum Event {
    /// The source commits `version`; the host hands it to the publisher if it is up.
    Commit {
        version: Version,
    },
    /// Request `request_id` reaches the store.
    RequestArrives {
        request_id: u64,
    },
    /// The store's answer to request `request_id` reaches the host.
    AnswerArrives {
        request_id: u64,
        answer: StoreAnswer,
    },
    /// The host gives up waiting for request `request_id`'s answer.
    HostTimeout {
        request_id: u64,
    },
    TimerFires {
        node: Node,
        incarnation: u64,
        timer: NodeTimer,
    },
    /// A `publisher-reboot` or `replica-reboot` fault: the machine crashes between two steps.
    Reboot {
        node: Node,
    },
    /// A crashed machine comes back.
    Restart {
        node: Node,
    },
}

/// What a run leaves behind.
struct RunReport {
    violation: Option<Violation>,
    fault_counts: BTreeMap<FaultKind, u64>,
    log: Vec<LogRecord>,
}

struct Simulation {
    seed: u64,
    rng: ChaCha8Rng,
    now_ms: u64,
    queue: BTreeMap<(u64, u64), Event>,
    next_event_sequence: u64,
    workload: Workload,
    plan: FaultPlan,
    publisher_config: PublisherConfig,
    replica_config: ReplicaConfig,
    /// The machines; `None` while crashed.
    publisher: Option<Publisher>,
    replica: Option<Replica>,
    /// Bumped at every crash; answers and timers of an older incarnation are dropped.
    publisher_incarnation: u64,
    replica_incarnation: u64,
    /// What each machine last persisted: all that survives a crash.
    publisher_disk: Option<PublisherDurable>,
    replica_disk: Option<ReplicaDurable>,
    /// The newest version the source has committed.
    committed_through: Version,
    store: Store,
    /// When each object first landed in the store, for stale listings.
    landed_at_ms: BTreeMap<String, u64>,
    /// Damaged answers in a row for each object, for the fault atlas.
    damaged_streak: BTreeMap<String, u32>,
    requests: BTreeMap<u64, HostRequest>,
    next_request_id: u64,
    /// When the source commits its newest version.
    last_commit_ms: u64,
    /// The run must have converged by then: [`LIVENESS_BOUND_MS`] after the heal or the last commit, if later.
    deadline_ms: u64,
    log: Vec<LogRecord>,
    fault_counts: BTreeMap<FaultKind, u64>,
    violation: Option<Violation>,
}

fn run(seed: u64, bugs: Bugs) -> RunReport {
    Simulation::new(seed, bugs).run()
}

impl Simulation {
    fn new(seed: u64, bugs: Bugs) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let workload = Workload::generate(&mut rng);
        let plan = FaultPlan::draw(&mut rng);
        let download_chunk_bytes = [32, 64, 128, 1024][rng.gen_range(0..4)];
        let pull_interval_ms = [50, 200, 500][rng.gen_range(0..3)];
        let replica_config =
            ReplicaConfig { download_chunk_bytes, pull_interval_ms, bug: bugs.replica, ..ReplicaConfig::default() };
        let publisher_config = PublisherConfig { bug: bugs.publisher, ..PublisherConfig::default() };
        let mut simulation = Simulation {
            seed,
            rng,
            now_ms: 0,
            queue: BTreeMap::new(),
            next_event_sequence: 0,
            workload,
            plan,
            publisher_config,
            replica_config,
            publisher: None,
            replica: None,
            publisher_incarnation: 0,
            replica_incarnation: 0,
            publisher_disk: None,
            replica_disk: None,
            committed_through: 0,
            store: Store::new(),
            landed_at_ms: BTreeMap::new(),
            damaged_streak: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request_id: 0,
            last_commit_ms: 0,
            deadline_ms: 0,
            log: Vec::new(),
            fault_counts: BTreeMap::new(),
            violation: None,
        };
        let max_commit_gap_ms = [5, 40, 300, 1_000][simulation.rng.gen_range(0..4)];
        for version in 1..=simulation.workload.newest() {
            simulation.last_commit_ms += simulation.rng.gen_range(0..=max_commit_gap_ms);
            simulation.schedule(simulation.last_commit_ms, Event::Commit { version });
        }
        for (kind, node) in [(FaultKind::PublisherReboot, Node::Publisher), (FaultKind::ReplicaReboot, Node::Replica)] {
            for second in 0..simulation.plan.heal_ms.div_ceil(1_000) {
                if simulation.rolls(kind) {
                    let at_ms = (second * 1_000 + simulation.rng.gen_range(0..1_000)).min(simulation.plan.heal_ms - 1);
                    simulation.schedule(at_ms, Event::Reboot { node });
                }
            }
        }
        simulation.deadline_ms = simulation.plan.heal_ms.max(simulation.last_commit_ms) + LIVENESS_BOUND_MS;
        simulation
    }

    fn run(mut self) -> RunReport {
        self.record(
            Node::Host,
            format!(
                "seed {}: {} versions committed by {} ms, heal at {} ms, reads of {} bytes, pulls every {} ms; \
                 faults: {}",
                self.seed,
                self.workload.newest(),
                self.last_commit_ms,
                self.plan.heal_ms,
                self.replica_config.download_chunk_bytes,
                self.replica_config.pull_interval_ms,
                self.plan
            ),
        );
        self.publisher = Some(self.boot_publisher());
        let mut replica = Replica::boot(STREAM, TABLET, self.replica_config.clone(), None);
        let outputs = replica.start(self.now_ms);
        self.replica = Some(replica);
        self.carry_out(Node::Replica, lift(outputs, Durable::Replica, NodeTimer::Replica));
        while self.violation.is_none() {
            let Some(((time_ms, _), event)) = self.queue.pop_first() else {
                self.record(Node::Host, "nothing left to happen".to_string());
                self.liveness_failed();
                break;
            };
            if time_ms > self.deadline_ms {
                self.now_ms = self.deadline_ms;
                let what = format!("the liveness bound passes: {LIVENESS_BOUND_MS} ms after the heal and the commits");
                self.record(Node::Host, what);
                self.liveness_failed();
                break;
            }
            self.now_ms = time_ms;
            self.handle(event);
            if self.violation.is_none()
                && self.committed_through == self.workload.newest()
                && converged(&self.workload, self.publisher_disk.as_ref(), self.replica_disk.as_ref()).is_ok()
            {
                self.record(Node::Host, format!("converged: both machines hold version {}", self.workload.newest()));
                break;
            }
        }
        RunReport { violation: self.violation, fault_counts: self.fault_counts, log: self.log }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Commit { version } => {
                self.committed_through = version;
                let change_count = self.workload.changes_of(version).len();
                self.record(Node::Source, format!("commits version {version} ({change_count} changes)"));
                if self.publisher.is_some() {
                    self.hand_commit(version);
                }
            }
            Event::RequestArrives { request_id } => self.serve(request_id),
            Event::AnswerArrives { request_id, answer } => self.deliver(request_id, answer),
            Event::HostTimeout { request_id } => {
                let request = &self.requests[&request_id];
                if request.answered {
                    return;
                }
                let answer = timeout_answer(&request.call);
                let what = format!("request #{request_id} ({}) got no answer in {HOST_TIMEOUT_MS} ms", request.call);
                self.record(Node::Host, what);
                self.deliver(request_id, answer);
            }
            Event::TimerFires { node, incarnation, timer } => {
                if incarnation != self.incarnation(node) {
                    return;
                }
                self.record(node, format!("timer {timer:?} fires"));
                let outputs = match timer {
                    NodeTimer::Publisher(timer) => {
                        let publisher = self.publisher.as_mut().expect("an incarnation's timer finds it up");
                        lift(publisher.handle_timer(self.now_ms, timer), Durable::Publisher, NodeTimer::Publisher)
                    }
                    NodeTimer::Replica(timer) => {
                        let replica = self.replica.as_mut().expect("an incarnation's timer finds it up");
                        lift(replica.handle_timer(self.now_ms, timer), Durable::Replica, NodeTimer::Replica)
                    }
                };
                self.carry_out(node, outputs);
            }
            Event::Reboot { node } => {
                let (up, kind) = match node {
                    Node::Publisher => (self.publisher.is_some(), FaultKind::PublisherReboot),
                    Node::Replica => (self.replica.is_some(), FaultKind::ReplicaReboot),
                    other => unreachable!("only the machines reboot, not the {other}"),
                };
                if up {
                    self.fired(kind);
                    self.crash(node, "reboots");
                }
            }
            Event::Restart { node } => self.restart(node),
        }
    }

    // --- the host: carrying out outputs ---------------------------------------------------------------------

    /// Carries out one step's outputs in order, unless the machine crashes between two of them.
    fn carry_out(&mut self, node: Node, outputs: Vec<HostOutput>) {
        let output_count = outputs.len();
        for (index, output) in outputs.into_iter().enumerate() {
            if self.violation.is_some() {
                return;
            }
            let crash_kind = match node {
                Node::Publisher => FaultKind::PublisherCrashMidStep,
                _ => FaultKind::ReplicaCrashMidStep,
            };
            if index > 0 && self.strikes(crash_kind) {
                let dropped = output_count - index;
                self.crash(node, &format!("crashes mid-step: the last {dropped} of {output_count} outputs are lost"));
                return;
            }
            match output {
                ReplicationOutput::Persist(Durable::Publisher(state)) => self.persist_publisher(state),
                ReplicationOutput::Persist(Durable::Replica(state)) => self.persist_replica(state),
                ReplicationOutput::Put { put_id, object, bytes } => {
                    self.send(node, StoreCall::Put { put_id, object, bytes })
                }
                ReplicationOutput::List { list_id, prefix } => self.send(node, StoreCall::List { list_id, prefix }),
                ReplicationOutput::Download(request) => self.send(node, StoreCall::Download(request)),
                ReplicationOutput::SetTimer { at_ms, timer } => {
                    self.record(node, format!("sets timer {timer:?} for {at_ms} ms"));
                    let incarnation = self.incarnation(node);
                    self.schedule(at_ms, Event::TimerFires { node, incarnation, timer });
                }
                ReplicationOutput::Report(text) => self.record(node, format!("reports: {text}")),
            }
        }
    }

    fn persist_publisher(&mut self, state: PublisherDurable) {
        self.record(Node::Publisher, format!("persists pushed_through {}", state.pushed_through));
        let previous = self.publisher_disk.replace(state.clone());
        if let Err(detail) = check_publisher_progress(previous.as_ref(), &state, &self.store) {
            self.violated(Invariant::PublisherProgress, detail);
        }
    }

    fn persist_replica(&mut self, state: ReplicaDurable) {
        let what = format!("persists applied_through {} with {} rows", state.applied_through, state.rows.len());
        self.record(Node::Replica, what);
        let previous = self.replica_disk.replace(state.clone());
        if let Err(detail) = check_replica_in_order(previous.as_ref(), &state) {
            self.violated(Invariant::ReplicaInOrder, detail);
        } else if let Err(detail) = check_replica_rows(&self.workload, &state) {
            self.violated(Invariant::ReplicaRows, detail);
        }
    }

    fn send(&mut self, node: Node, call: StoreCall) {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.record(node, format!("sends request #{request_id}: {call}"));
        let incarnation = self.incarnation(node);
        self.requests.insert(request_id, HostRequest { node, incarnation, call, answered: false });
        let latency_ms = self.latency_ms();
        self.schedule(self.now_ms + latency_ms, Event::RequestArrives { request_id });
        self.schedule(self.now_ms + HOST_TIMEOUT_MS, Event::HostTimeout { request_id });
    }

    /// Hands the sender its one answer to `request_id`, unless it already had it or has crashed since.
    fn deliver(&mut self, request_id: u64, answer: StoreAnswer) {
        let request = self.requests.get_mut(&request_id).expect("answers are to requests sent");
        if request.answered {
            self.record(Node::Host, format!("drops the late answer to request #{request_id}: {answer}"));
            return;
        }
        request.answered = true;
        let (node, incarnation) = (request.node, request.incarnation);
        // The machine's own id of the call: a put's `put_id`, a listing's `list_id` (a read carries its own).
        let call_id = match request.call {
            StoreCall::Put { put_id, .. } => put_id,
            StoreCall::List { list_id, .. } => list_id,
            StoreCall::Download(_) => 0,
        };
        if incarnation != self.incarnation(node) {
            let what = format!("drops the answer to request #{request_id} of a crashed {node}: {answer}");
            self.record(Node::Host, what);
            return;
        }
        self.record(node, format!("gets the answer to request #{request_id}: {answer}"));
        let now_ms = self.now_ms;
        let outputs = match answer {
            StoreAnswer::Put(result) => {
                let publisher = self.publisher.as_mut().expect("an incarnation's answer finds it up");
                lift(publisher.handle_put(now_ms, call_id, result), Durable::Publisher, NodeTimer::Publisher)
            }
            StoreAnswer::List(result) => {
                let replica = self.replica.as_mut().expect("an incarnation's answer finds it up");
                lift(replica.handle_list(now_ms, call_id, result), Durable::Replica, NodeTimer::Replica)
            }
            StoreAnswer::Download(result) => {
                let replica = self.replica.as_mut().expect("an incarnation's answer finds it up");
                lift(replica.handle_download(now_ms, result), Durable::Replica, NodeTimer::Replica)
            }
        };
        self.carry_out(node, outputs);
    }

    fn hand_commit(&mut self, version: Version) {
        self.record(Node::Publisher, format!("is handed the commit of version {version}"));
        let publisher = self.publisher.as_mut().expect("commits are handed to a publisher that is up");
        let outputs = publisher.handle_commit(self.now_ms, version, self.workload.changes_of(version));
        self.carry_out(Node::Publisher, lift(outputs, Durable::Publisher, NodeTimer::Publisher));
    }

    // --- crashes ---------------------------------------------------------------------------------------------

    fn crash(&mut self, node: Node, how: &str) {
        match node {
            Node::Publisher => {
                self.publisher = None;
                self.publisher_incarnation += 1;
            }
            Node::Replica => {
                self.replica = None;
                self.replica_incarnation += 1;
            }
            other => unreachable!("only the machines crash, not the {other}"),
        }
        let restart_ms = self.now_ms + self.rng.gen_range(DOWNTIME_MS);
        self.record(node, format!("{how}: volatile state lost, back at {restart_ms} ms"));
        self.schedule(restart_ms, Event::Restart { node });
    }

    fn boot_publisher(&mut self) -> Publisher {
        let jitter_seed = self.rng.next_u64();
        Publisher::boot(STREAM, TABLET, self.publisher_config.clone(), self.publisher_disk.clone(), jitter_seed)
    }

    fn restart(&mut self, node: Node) {
        match node {
            Node::Publisher => {
                self.publisher = Some(self.boot_publisher());
                let pushed_through = self.publisher_disk.as_ref().map_or(0, |durable| durable.pushed_through);
                let first = if self.rng.gen_bool(0.5) { 1 } else { pushed_through + 1 };
                let what = format!(
                    "restarts from pushed_through {pushed_through}; handed commits {first}..={}",
                    self.committed_through
                );
                self.record(node, what);
                for version in first..=self.committed_through {
                    if self.publisher.is_none() || self.violation.is_some() {
                        break;
                    }
                    self.hand_commit(version);
                }
            }
            Node::Replica => {
                let mut replica = Replica::boot(STREAM, TABLET, self.replica_config.clone(), self.replica_disk.clone());
                let applied_through = replica.durable().applied_through;
                self.record(node, format!("restarts from applied_through {applied_through}"));
                let outputs = replica.start(self.now_ms);
                self.replica = Some(replica);
                self.carry_out(node, lift(outputs, Durable::Replica, NodeTimer::Replica));
            }
            other => unreachable!("only the machines restart, not the {other}"),
        }
    }

    fn incarnation(&self, node: Node) -> u64 {
        match node {
            Node::Publisher => self.publisher_incarnation,
            Node::Replica => self.replica_incarnation,
            other => unreachable!("only the machines have incarnations, not the {other}"),
        }
    }

    // --- the store -------------------------------------------------------------------------------------------

    /// Request `request_id` reaches the store: it is carried out, and its answer (if not lost) sent back.
    fn serve(&mut self, request_id: u64) {
        let call = self.requests[&request_id].call.clone();
        let answer = match call {
            StoreCall::Put { object, bytes, .. } => self.serve_put(object, bytes),
            StoreCall::List { prefix, .. } => Some(StoreAnswer::List(self.serve_list(&prefix))),
            StoreCall::Download(request) => Some(StoreAnswer::Download(self.serve_read(request))),
        };
        if let Some(answer) = answer {
            let latency_ms = self.latency_ms();
            self.schedule(self.now_ms + latency_ms, Event::AnswerArrives { request_id, answer });
        }
    }

    fn serve_put(&mut self, object: String, bytes: Bytes) -> Option<StoreAnswer> {
        if self.strikes(FaultKind::PutUnavailable) {
            self.record(Node::Store, format!("fails the put of {} (put-unavailable)", short_name(&object)));
            return Some(StoreAnswer::Put(Err(StoreError::Unavailable { detail: "injected 503".to_string() })));
        }
        let name = short_name(&object);
        self.landed_at_ms.entry(object.clone()).or_insert(self.now_ms);
        self.store.insert(object, bytes);
        let what = format!("stores {name}; the stream now holds versions {:?}", stored_versions(&self.store));
        self.record(Node::Store, what);
        if let Err(detail) = check_push_order(&self.store) {
            self.violated(Invariant::PushOrder, detail);
        }
        if self.strikes(FaultKind::PutAckLost) {
            self.record(Node::Store, format!("loses the answer to the put of {name} (put-ack-lost)"));
            return None;
        }
        Some(StoreAnswer::Put(Ok(())))
    }

    fn serve_list(&mut self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if self.strikes(FaultKind::ListUnavailable) {
            self.record(Node::Store, "fails a listing (list-unavailable)".to_string());
            return Err(StoreError::Unavailable { detail: "injected 503".to_string() });
        }
        let every_name: Vec<String> = self
            .store
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, _)| name.clone())
            .collect();
        let (mut listed, mut left_out) = (Vec::new(), Vec::new());
        for name in every_name {
            let recent = self.landed_at_ms[&name] + STALE_WINDOW_MS > self.now_ms;
            if recent && self.rolls(FaultKind::ListStale) { left_out.push(name) } else { listed.push(name) }
        }
        if !left_out.is_empty() {
            self.fired(FaultKind::ListStale);
            let left_out: Vec<String> = left_out.iter().map(|name| short_name(name)).collect();
            self.record(Node::Store, format!("answers a stale listing without {} (list-stale)", left_out.join(", ")));
        }
        Ok(listed)
    }

    fn serve_read(&mut self, request: DownloadRequest) -> DownloadResult {
        let DownloadRequest { download_id, object, offset, len } = request;
        let outcome = self.read_range(&object, offset, len);
        DownloadResult { download_id, object, offset, outcome }
    }

    /// A ranged read, damaged as the fault plan says, intact after [`MAX_DAMAGED_STREAK`] damaged ones in a row.
    fn read_range(&mut self, object: &str, offset: u64, len: u64) -> Result<RangeRead, StoreError> {
        let Some(bytes) = self.store.get(object).cloned() else {
            return Err(StoreError::NotFound { object: object.to_string() });
        };
        let mut read = range_of(object, &bytes, offset, len)?;
        let name = short_name(object);
        let streak = self.damaged_streak.get(object).copied().unwrap_or(0);
        if streak >= MAX_DAMAGED_STREAK {
            self.damaged_streak.insert(object.to_string(), 0);
            self.record(Node::Store, format!("answers {name} @{offset} intact: {streak} damaged answers in a row"));
            return Ok(read);
        }
        let mut damage = None;
        let outcome = if self.strikes(FaultKind::ReadUnavailable) {
            damage = Some(FaultKind::ReadUnavailable);
            Err(StoreError::Unavailable { detail: "injected 503".to_string() })
        } else if self.strikes(FaultKind::ReadThrottled) {
            damage = Some(FaultKind::ReadThrottled);
            Err(StoreError::Throttled { retry_after_ms: self.rng.gen_range(20..=500) })
        } else {
            if read.bytes.len() > 1 && self.strikes(FaultKind::ReadPartial) {
                let kept = self.rng.gen_range(1..read.bytes.len());
                self.record(Node::Store, format!("answers {name} @{offset} with {kept} bytes only (read-partial)"));
                read.bytes.truncate(kept);
            }
            let end = offset + read.bytes.len() as u64;
            if end < read.total_len && self.strikes(FaultKind::ReadTruncated) {
                damage = Some(FaultKind::ReadTruncated);
                read.total_len = end;
            }
            if !read.bytes.is_empty() && self.strikes(FaultKind::ReadCorrupt) {
                damage = Some(FaultKind::ReadCorrupt);
                let mut copy = read.bytes.to_vec();
                let at = self.rng.gen_range(0..copy.len());
                copy[at] ^= 1 << self.rng.gen_range(0..8);
                read.bytes = Bytes::from(copy);
            }
            Ok(read)
        };
        match damage {
            Some(kind) => {
                self.damaged_streak.insert(object.to_string(), streak + 1);
                let how = if matches!(kind, FaultKind::ReadUnavailable | FaultKind::ReadThrottled) {
                    "fails"
                } else {
                    "damages"
                };
                self.record(Node::Store, format!("{how} the read of {name} @{offset} ({kind})"));
            }
            None => {
                self.damaged_streak.insert(object.to_string(), 0);
            }
        }
        outcome
    }

    // --- faults, time and the log ----------------------------------------------------------------------------

    /// Whether fault `kind` is on and strikes now (before the heal); counts it if it does.
    fn strikes(&mut self, kind: FaultKind) -> bool {
        let strikes = self.rolls(kind);
        if strikes {
            self.fired(kind);
        }
        strikes
    }

    /// Whether fault `kind` is on and its dice say it strikes now (before the heal), without counting it.
    fn rolls(&mut self, kind: FaultKind) -> bool {
        if self.now_ms >= self.plan.heal_ms {
            return false;
        }
        match self.plan.rates.get(&kind) {
            Some(&rate) => self.rng.gen_bool(rate),
            None => false,
        }
    }

    fn fired(&mut self, kind: FaultKind) {
        *self.fault_counts.entry(kind).or_default() += 1;
    }

    /// How long the next request or answer is in flight.
    fn latency_ms(&mut self) -> u64 {
        if self.strikes(FaultKind::SlowMessage) {
            self.rng.gen_range(SLOW_LATENCY_MS)
        } else {
            self.rng.gen_range(NORMAL_LATENCY_MS)
        }
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        let sequence = self.next_event_sequence;
        self.next_event_sequence += 1;
        self.queue.insert((at_ms.max(self.now_ms), sequence), event);
    }

    fn record(&mut self, node: Node, what: String) {
        self.log.push(LogRecord { time_ms: self.now_ms, node, what });
    }

    /// Keeps the first violation, at the event just logged.
    fn violated(&mut self, invariant: Invariant, detail: String) {
        if self.violation.is_some() {
            return;
        }
        let (offending_event, before) = self.log.split_last().expect("an offending event is logged first");
        let events_before = before[before.len().saturating_sub(CONTEXT_RECORDS)..].to_vec();
        self.violation = Some(Violation {
            invariant,
            seed: self.seed,
            detail,
            offending_event: offending_event.clone(),
            events_before,
        });
    }

    fn liveness_failed(&mut self) {
        let detail = match converged(&self.workload, self.publisher_disk.as_ref(), self.replica_disk.as_ref()) {
            Ok(()) => format!("the source committed only {} versions", self.committed_through),
            Err(detail) => detail,
        };
        self.violated(Invariant::Liveness, format!("not converged by {} ms: {detail}", self.now_ms));
    }
}

fn timeout_answer(call: &StoreCall) -> StoreAnswer {
    let error = StoreError::Timeout { timeout_ms: HOST_TIMEOUT_MS };
    match call {
        StoreCall::Put { .. } => StoreAnswer::Put(Err(error)),
        StoreCall::List { .. } => StoreAnswer::List(Err(error)),
        StoreCall::Download(request) => StoreAnswer::Download(DownloadResult {
            download_id: request.download_id,
            object: request.object.clone(),
            offset: request.offset,
            outcome: Err(error),
        }),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn every_seed_keeps_every_invariant_under_faults() {
    let mut fault_counts: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let mut violations = Vec::new();
    for seed in SWEEP_SEEDS {
        let report = run(seed, Bugs::default());
        for (kind, count) in report.fault_counts {
            *fault_counts.entry(kind).or_default() += count;
        }
        violations.extend(report.violation);
    }
    println!("faults fired over seeds {SWEEP_SEEDS:?}:");
    for kind in FaultKind::ALL {
        println!("    {kind:<26} {}", fault_counts.get(&kind).copied().unwrap_or(0));
    }
    if let Some(first) = violations.first() {
        let seeds: Vec<u64> = violations.iter().map(|violation| violation.seed).collect();
        panic!("{} of {} seeds failed (seeds {seeds:?}); the first:\n{first}", violations.len(), SWEEP_SEEDS.end);
    }
    let never: Vec<FaultKind> = FaultKind::ALL.into_iter().filter(|kind| !fault_counts.contains_key(kind)).collect();
    assert!(never.is_empty(), "fault kinds that never fired over the sweep: {never:?}");
}

#[test]
fn a_seed_replays_the_same_event_log() {
    for seed in [0, 1, 42, 499] {
        let first = run(seed, Bugs::default()).log;
        let second = run(seed, Bugs::default()).log;
        assert!(first.len() > 10, "seed {seed} logged only {} events", first.len());
        if let Some(index) = (0..first.len().max(second.len())).find(|&i| first.get(i) != second.get(i)) {
            panic!("seed {seed} diverged at event {index}: {:?} then {:?}", first.get(index), second.get(index));
        }
    }
    assert_ne!(run(0, Bugs::default()).log, run(1, Bugs::default()).log, "two seeds, two different runs");
}

/// The first seed of the sweep in which `invariant` catches `bugs`, with its failure message checked for what a
/// reader needs: the invariant, the seed and the first offending event.
fn first_catch(bugs: Bugs, invariant: Invariant) -> Violation {
    let mut caught_by_others = BTreeMap::new();
    for seed in SWEEP_SEEDS {
        let Some(violation) = run(seed, bugs).violation else { continue };
        if violation.invariant != invariant {
            *caught_by_others.entry(violation.invariant.name()).or_insert(0) += 1;
            continue;
        }
        let message = violation.to_string();
        println!("{bugs:?} is caught:\n{message}");
        assert!(message.contains(&format!("`{}` violated in seed {seed}", invariant.name())), "{message}");
        assert!(message.contains("first offending event"), "{message}");
        return violation;
    }
    panic!(
        "{bugs:?} is never caught by `{}` in seeds {SWEEP_SEEDS:?} (caught by others: {caught_by_others:?})",
        invariant.name()
    );
}

#[test]
fn push_order_catches_a_publisher_that_puts_ahead() {
    let bugs = Bugs { publisher: Some(PublisherBug::PutsAhead), ..Bugs::default() };
    let violation = first_catch(bugs, Invariant::PushOrder);
    assert!(violation.offending_event.node == Node::Store, "a put landing is what breaks push order");
}

#[test]
fn replica_rows_catches_a_replica_that_skips_the_checksum() {
    let bugs = Bugs { replica: Some(ReplicaBug::SkipChecksum), ..Bugs::default() };
    let violation = first_catch(bugs, Invariant::ReplicaRows);
    assert!(violation.offending_event.node == Node::Replica, "a replica persist is what breaks its rows");
}

#[test]
fn replica_in_order_catches_a_replica_that_skips_a_missing_version() {
    let bugs = Bugs { replica: Some(ReplicaBug::SkipMissingVersion), ..Bugs::default() };
    let violation = first_catch(bugs, Invariant::ReplicaInOrder);
    assert!(violation.offending_event.node == Node::Replica, "a replica persist is what breaks its order");
}

/// Prints one seed's event log, with a deliberate bug if `REPLICATION_BUG` names one (`puts-ahead`,
/// `skip-checksum`, `skip-missing-version`):
/// `REPLICATION_SEED=25 REPLICATION_BUG=skip-missing-version cargo test --test replication -- --ignored --nocapture`.
#[test]
#[ignore = "a tool for reading one seed's run, not a check"]
fn print_the_event_log_of_one_seed() {
    let seed = std::env::var("REPLICATION_SEED").map_or(0, |seed| seed.parse().expect("REPLICATION_SEED is a u64"));
    let bugs = match std::env::var("REPLICATION_BUG").as_deref() {
        Err(_) => Bugs::default(),
        Ok("puts-ahead") => Bugs { publisher: Some(PublisherBug::PutsAhead), ..Bugs::default() },
        Ok("skip-checksum") => Bugs { replica: Some(ReplicaBug::SkipChecksum), ..Bugs::default() },
        Ok("skip-missing-version") => Bugs { replica: Some(ReplicaBug::SkipMissingVersion), ..Bugs::default() },
        Ok(other) => panic!("REPLICATION_BUG={other} is none of puts-ahead, skip-checksum, skip-missing-version"),
    };
    let report = run(seed, bugs);
    for record in &report.log {
        println!("{record}");
    }
    if let Some(violation) = report.violation {
        println!("{violation}");
    }
}
