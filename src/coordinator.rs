//! The coordinator: a pure state machine that drives every tablet of every table of a backup collection through
//! the restore chain, one increment at a time.
//!
//! Rules it keeps:
//! - increment k+1 of an operation starts only when every tablet of every table and index has reported k durably
//!   done;
//! - at most `max_in_flight_shards` apply requests are outstanding, and at most `max_in_flight_tables` tables (a
//!   table counts together with its indexes) of one operation have work under way;
//! - a transient failure or a missing reply is retried with capped exponential backoff and seeded jitter; a
//!   missing reply is never taken as success;
//! - a permanent failure, a passed operation deadline or a passed increment deadline ends the operation in a
//!   persisted `Failed` naming the cause;
//! - every boot bumps the generation; replies of an older generation, of another attempt or of another
//!   increment are ignored;
//! - after a reboot it reloads its durable state and re-sends only to tablets that have no result;
//! - target tables are `Restoring` from the start of the operation until it ends, and the source collection is
//!   in use; both are released on Done and on Failed. A second restore of a collection in use, or onto a table
//!   being restored, or onto a table that exists with rows, is refused with a typed error;
//! - a restore to a point in time uses the newest full backup taken at or before it and every incremental after
//!   that up to it. It may be done in segments, each to a later point: the operation, its tables and the
//!   shards' rows carry over from one segment to the next, and increments are numbered across segments. A
//!   segment that is not the last ends waiting for the next one, its tables still `Restoring`; the final work
//!   (tables made readable, the collection released, the working state dropped) is done once, when the last
//!   segment's increments are durably applied on every tablet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{BackupManifest, ChainError, IncrementIndex, RestoreChain, TableId, TableSpec, TabletId};
use crate::protocol::{
    ApplyOutcome, ApplyReply, ApplyRequest, ClientAnswer, ClientCall, ClientReply, DownloadResult, Generation, Message,
    NodeAddr, OperationId, Output, PersistNote, ShardFailure, ShardFailureKind,
};
use crate::rng::SplitMix64;

/// Tunables of the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorConfig {
    /// Most apply requests outstanding at once, across all tablets of all operations.
    pub max_in_flight_shards: u32,
    /// Most tables (each with its indexes) of one operation with work under way at once.
    pub max_in_flight_tables: u32,
    /// How long to wait for a reply before the request counts as failed and is retried.
    pub request_timeout_ms: u64,
    /// Backoff before the first retry; doubled on every further failure of the same tablet.
    pub backoff_base_ms: u64,
    /// Longest backoff between two attempts.
    pub backoff_cap_ms: u64,
    /// Time from the start of an operation after which it fails with a timeout.
    pub deadline_ms: u64,
    /// Time from the start of an increment after which the operation fails with a timeout.
    pub increment_deadline_ms: u64,
    /// Tables of the target database that exist and hold rows; a restore onto one of them is refused.
    pub non_empty_tables: BTreeSet<TableId>,
    /// A deliberately broken behaviour, for showing that the checkers catch it. `None` in production.
    pub bug: Option<CoordinatorBug>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            max_in_flight_shards: 4,
            max_in_flight_tables: 2,
            request_timeout_ms: 3_000,
            backoff_base_ms: 100,
            backoff_cap_ms: 5_000,
            deadline_ms: 3_600_000,
            increment_deadline_ms: 1_800_000,
            non_empty_tables: BTreeSet::new(),
            bug: None,
        }
    }
}

/// Known-wrong coordinator behaviours that real restore systems have shipped, for showing that the checkers
/// catch them. Their code exists only with the `mutants` feature (the simulator turns it on); without it a
/// configured bug does nothing and the optimiser removes every trace of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CoordinatorBug {
    /// Advances to the next increment when the first tablet reports, not the last.
    AdvanceOnFirstReport,
    /// Starts increment k+1 of a table as soon as that table is done with k, while other tables still apply k.
    TablesRunAhead,
    /// Takes a request that timed out (its report lost) for success.
    LostReportIsSuccess,
    /// Ends the operation on a transient failure instead of retrying it.
    TransientIsPermanent,
    /// Plans the chain from the oldest full backup, applying incrementals that precede the newest full.
    IncrementalsBeforeNewestFull,
    /// Draws retry jitter from state shared by the whole process instead of its seeded generator, so a seed
    /// does not replay the same: no invariant breaks, only the simulator's determinism check can see it.
    AmbientJitter,
    /// Declares the operation Done when the first tablet reports the last increment, not the last tablet.
    DoneOnFirstFinalReport,
    /// After a reboot, starts every running operation's chain over from the full backup instead of resuming at
    /// the increment it had durably reached. The shards answer what they already applied without applying it
    /// again, so the rows come out right; only the coordinator's progress goes backwards.
    RestartChainOnReboot,
    /// Waits for a reply forever: a request whose reply never comes is neither timed out nor retried.
    LostRequestWaitsForever,
    /// Does the final work at the end of every segment of a segmented restore, not only the last: the tables
    /// become readable (and the collection free) while later segments still have increments to apply.
    FinalWorkEverySegment,
    /// Takes the end of a segment that is not the last for the end of the restore: Done at an earlier point in
    /// time than the one asked for.
    SegmentEndIsDone,
    /// Plans a continued segment from the full backup again, as if nothing carried over from the segments
    /// before: the shards answer what they hold without applying it again, so only progress goes backwards.
    SegmentRestartsChain,
    /// Ends a cancelled operation as Failed but keeps its tables Restoring and its collection in use, so nothing
    /// can restore them again.
    CancelKeepsHold,
    /// Answers a cancel of an operation that already ended Done as cancelled, leaving it Done: the client believes
    /// the restore was given up (and may restore again, or report it so) while the tables hold it whole.
    CancelAnswersEnded,
    /// Cancels an operation that already ended Done: a restore that finished is turned into a failed one, its
    /// tables unreadable, because the cancel came late.
    CancelOverwritesEnd,
}

/// Whether `reply` may count as the word of the tablet it names. It must come from that tablet; the one exception
/// is a shard's refusal of a request addressed to another tablet, which comes from the shard the request reached
/// and names both. Such a request was misrouted (the address book sends one tablet's requests to another's node),
/// and retrying it would reach the same wrong node until a deadline: the refusal ends the operation at once,
/// naming both tablets. A refusal that names the tablet it came from as the wrong one is no refusal and is ignored.
fn speaks_for_its_tablet(from: NodeAddr, reply: &ApplyReply) -> bool {
    if from == NodeAddr::Shard(reply.tablet) {
        return true;
    }
    match &reply.outcome {
        ApplyOutcome::Failed { permanent: true, cause: ShardFailure::WrongShard { requested, actual } } => {
            *requested == reply.tablet && *actual != reply.tablet && from == NodeAddr::Shard(*actual)
        }
        _ => false,
    }
}

/// Whether `bug` is configured and the catalog of bugs is compiled in.
fn has(config: &CoordinatorConfig, bug: CoordinatorBug) -> bool {
    cfg!(feature = "mutants") && config.bug == Some(bug)
}

/// The jitter of [`CoordinatorBug::AmbientJitter`], below `bound`: from a counter every coordinator of the
/// process steps, which outlives the run that stepped it.
fn ambient_jitter(bound: u64) -> u64 {
    static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    DRAWS.fetch_add(7_919, std::sync::atomic::Ordering::Relaxed) % bound
}

/// What starts a restore: the tables of one backup collection, and every backup of it in the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub op: OperationId,
    /// The backup collection restored; its objects are in use while the operation runs.
    pub collection: String,
    /// The tables restored, index tables included, each onto the target table of the same id.
    pub tables: Vec<TableSpec>,
    /// Every backup of the collection in the store, in any order; the coordinator picks the chain. Shared: a
    /// client sends the same request again until it is answered, and each copy logged or retried would otherwise
    /// copy every manifest. Encoded as the list it holds.
    pub catalog: Arc<[BackupManifest]>,
    /// The point in time restored to: the newest full backup taken at or before it, then every incremental after
    /// that full taken at or before it. `None`: the newest backup of the catalog.
    pub until_ms: Option<u64>,
    /// Whether this is the whole restore: once its chain is applied the operation does its final work and ends
    /// Done. A restore done in segments starts with `false` and goes on with [`ClientCall::Continue`]s, the last
    /// of which says `true`.
    pub last_segment: bool,
}

/// Goes on with a restore done in segments ([`ClientCall::Continue`]): the next segment applies every
/// incremental after the last backup applied so far, up to a later point in time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentRequest {
    pub op: OperationId,
    /// The number of the segment this call begins, counted from 1 (the start's): 2 for the first continuation.
    /// A client retries a call until answered; the number makes a retry a no-op and a late copy harmless.
    pub segment: u32,
    /// The point in time this segment restores to, not before the previous segment's (`None`: the newest backup).
    pub until_ms: Option<u64>,
    /// Whether this is the last segment: once it is applied the operation does its final work and ends Done.
    pub last_segment: bool,
    /// Every backup of the collection in the store now (backups may have been taken since the start).
    pub catalog: Arc<[BackupManifest]>,
}

/// Why a segment is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum SegmentError {
    #[error("no operation {op} is known")]
    NotFound { op: OperationId },
    #[error("operation {op} has ended; a segment can only continue a restore that waits for one")]
    Ended { op: OperationId },
    #[error("operation {op} is still applying segment {segment}; the next segment can start once it is done")]
    SegmentRunning { op: OperationId, segment: u32 },
    #[error("operation {op} was asked for segment {requested}, but the next segment is {next}")]
    OutOfOrder { op: OperationId, requested: u32, next: u32 },
    #[error("segment {segment} of operation {op} was already begun with another point in time or another end")]
    SegmentTaken { op: OperationId, segment: u32 },
    #[error(
        "segment {segment} of operation {op} would restore to {} ms, before the previous segment's {} ms",
        until_ms.map_or("the newest backup".to_string(), |ms| ms.to_string()),
        previous_ms.map_or("the newest backup".to_string(), |ms| ms.to_string()),
    )]
    PointBeforePrevious { op: OperationId, segment: u32, until_ms: Option<u64>, previous_ms: Option<u64> },
    #[error("cannot plan segment: {0}")]
    Chain(#[from] ChainError),
}

/// Why a restore is refused before it starts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum StartError {
    #[error("operation id {op} is already taken by another restore")]
    OperationIdTaken { op: OperationId },
    #[error(
        "operation id {op} is not new: operation {newest} was started before, and a new operation needs a higher id \
         (ids are never used again, not even those of forgotten operations)"
    )]
    OperationIdNotNew { op: OperationId, newest: OperationId },
    #[error("collection {collection} is already being restored by operation {running}")]
    CollectionBusy { collection: String, running: OperationId },
    #[error("table {table} is already being restored by operation {running}")]
    TargetBusy { table: TableId, running: OperationId },
    #[error("table {table} exists and is not empty")]
    TargetNotEmpty { table: TableId },
    #[error("cannot plan restore: {0}")]
    Chain(#[from] ChainError),
    #[error("a restore needs at least one table")]
    NoTables,
    #[error("table {table} has no shards")]
    NoShards { table: TableId },
    #[error("table {table} is listed twice")]
    DuplicateTable { table: TableId },
    #[error("index table {index} belongs to table {table}, which is not restored with it")]
    IndexWithoutTable { index: TableId, table: TableId },
}

/// Why a lifecycle call on an existing operation is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum LifecycleError {
    #[error("no operation {op} is known")]
    NotFound { op: OperationId },
    #[error("operation {op} is still running; it can be forgotten only once it is done or failed")]
    StillRunning { op: OperationId },
    #[error("operation {op} has already ended; only an operation under way can be cancelled")]
    AlreadyEnded { op: OperationId },
}

/// The coordinator's durable state: what survives a reboot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CoordinatorDurable {
    pub generation: Generation,
    /// Every operation not forgotten, running or finished. Shared with the persist outputs instead of copied; a
    /// change copies them only while an output still holds them (a host is done with one before the next input).
    /// The maps below are shared the same way; each encodes as the map it holds.
    pub operations: Arc<BTreeMap<OperationId, Operation>>,
    /// The state of every target table a restore has touched.
    pub tables: Arc<BTreeMap<TableId, TableState>>,
    /// Backup collections whose objects a running operation reads.
    pub sources_in_use: Arc<BTreeMap<String, OperationId>>,
    /// The highest operation id ever started. A new operation needs a higher one, so an id is never used twice
    /// (not even a forgotten operation's, which a late duplicate of its start would otherwise start again), and
    /// ids order operations: a shard refuses the requests of an operation older than the one it holds rows of.
    pub newest_op: Option<OperationId>,
}

impl CoordinatorDurable {
    /// The restore chains of the running operations, each with its operation.
    pub fn chains(&self) -> impl Iterator<Item = (OperationId, &Arc<RestoreChain>)> {
        self.operations.values().filter_map(|operation| match &operation.status {
            OperationStatus::Running(running) => Some((operation.op, &running.chain)),
            _ => None,
        })
    }

    /// Fills in every detached chain (as a state read back names it) from the content `read` gives for its file
    /// name; an error names what is wrong.
    pub fn attach_chains(&mut self, mut read: impl FnMut(&str) -> Result<Vec<u8>, String>) -> Result<(), String> {
        if !self.chains().any(|(_, chain)| chain.is_detached()) {
            return Ok(());
        }
        for operation in Arc::make_mut(&mut self.operations).values_mut() {
            let op = operation.op;
            if let OperationStatus::Running(running) = &mut operation.status
                && running.chain.is_detached()
            {
                let bytes = read(&running.chain.file_name(op))?;
                running.chain = Arc::new(running.chain.attach(op, &bytes)?);
            }
        }
        Ok(())
    }
}

/// A target table's state as restores leave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TableState {
    /// Being restored by `op`: not readable, no other restore may touch it.
    Restoring { op: OperationId },
    /// Restored by `op`: readable, holds the restored rows.
    Restored { op: OperationId },
    /// The restore by `op` failed: not readable; a new restore may target it.
    RestoreFailed { op: OperationId },
}

impl TableState {
    /// Whether readers may see the table as restored.
    pub fn readable(self) -> bool {
        matches!(self, TableState::Restored { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    pub op: OperationId,
    pub collection: String,
    pub tables: Vec<TableSpec>,
    /// The backups of the planned chain, in order, every segment's; kept after the operation ends.
    pub backup_ids: Vec<u64>,
    /// The segments begun so far, in order: one for a restore done in one go.
    pub segments: Vec<Segment>,
    pub started_at_ms: u64,
    pub deadline_at_ms: u64,
    pub status: OperationStatus,
}

impl Operation {
    /// Every tablet of the operation, table by table, each table followed by its indexes.
    pub fn tablets(&self) -> Vec<TabletId> {
        self.tablets_with_group().map(|(tablet, _)| tablet).collect()
    }

    /// [`Operation::tablets`] in the same order, each with the table it is restored with (its own table, or the
    /// table its index belongs to).
    fn tablets_with_group(&self) -> impl Iterator<Item = (TabletId, TableId)> + '_ {
        let ordered = self.tables.iter().filter(|t| t.index_of.is_none()).flat_map(move |table| {
            std::iter::once(table).chain(self.tables.iter().filter(move |t| t.index_of == Some(table.id)))
        });
        ordered.flat_map(|table| {
            let group = table.group();
            table.tablets().map(move |tablet| (tablet, group))
        })
    }

    pub fn tablet_count(&self) -> usize {
        self.tables.iter().map(|t| t.shard_count as usize).sum()
    }
}

/// One segment of a restore, as it was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    pub until_ms: Option<u64>,
    pub last: bool,
    /// The increment the segment begins at: its first backup's place in the operation's chain.
    pub first_increment: IncrementIndex,
}

impl Operation {
    /// Whether the segment under way (or last ended) is the restore's last.
    pub fn in_last_segment(&self) -> bool {
        self.segments.last().is_none_or(|segment| segment.last)
    }

    /// The segment under way or last ended, counted from 1.
    pub fn segment(&self) -> u32 {
        u32::try_from(self.segments.len()).expect("few segments")
    }
}

/// One table and the indexes restored with it, as [`Coordinator::dispatch`] sees them.
struct GroupState {
    group: TableId,
    /// Every tablet of the group is done with the current increment.
    all_done: bool,
    /// Work is under way: some tablet done, in flight or backing off, and not every tablet done.
    active: bool,
}

/// The state of `group` among `groups`, added (every tablet done, nothing under way) when it is not there yet.
fn group_state(groups: &mut Vec<GroupState>, group: TableId) -> &mut GroupState {
    let at = match groups.iter().position(|g| g.group == group) {
        Some(at) => at,
        None => {
            groups.push(GroupState { group, all_done: true, active: false });
            groups.len() - 1
        }
    };
    &mut groups[at]
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationStatus {
    Running(RunningState),
    /// A segment that is not the last is durably applied on every tablet; the operation waits for the next one.
    /// Its tables stay `Restoring` and its collection in use; it holds no working state.
    AwaitingSegment {
        /// The time and id of the last backup applied: the next segment begins after it.
        reached: (u64, u64),
        since_ms: u64,
    },
    /// Every increment is durably applied on every tablet. Working state is gone; this stays queryable.
    Done {
        increments: u32,
        finished_at_ms: u64,
    },
    Failed {
        error: RestoreError,
        failed_at_ms: u64,
    },
}

/// Working state of a running operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunningState {
    /// The backups of the segment under way. Shared, not copied: every persist of the running state would
    /// otherwise clone every manifest.
    pub chain: Arc<RestoreChain>,
    /// The increment of the chain's first backup: 0, or where a continued segment begins.
    pub first_increment: IncrementIndex,
    pub increment: IncrementIndex,
    /// When the current increment must be done by.
    pub increment_deadline_at_ms: u64,
    /// How long the current increment was given when it began (the configured limit then, which a reboot with
    /// another configuration does not change): what a failure at its deadline reports.
    pub increment_limit_ms: u64,
    /// Tablets that reported the current increment durably applied.
    pub done: BTreeSet<TabletId>,
    /// Tablets whose last attempt failed: how many attempts failed, why the last did, and when the next may start.
    pub retries: BTreeMap<TabletId, Retry>,
}

impl RunningState {
    /// The backup of `increment`, one of this segment's.
    pub fn backup(&self, increment: IncrementIndex) -> &BackupManifest {
        self.chain.get(increment - self.first_increment)
    }

    /// The segment's last increment.
    pub fn last_increment(&self) -> IncrementIndex {
        self.first_increment + self.chain.last_index()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retry {
    pub failed_attempts: u32,
    pub last_failure: AttemptFailure,
    pub not_before_ms: u64,
}

/// Why an attempt at a tablet failed: no answer came within the request timeout, or the shard reported a
/// transient failure of this kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttemptFailure {
    NoAnswer,
    Reported(ShardFailureKind),
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::NoAnswer => f.write_str("no answer in time"),
            AttemptFailure::Reported(kind) => kind.fmt(f),
        }
    }
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum RestoreError {
    #[error("increment {increment} (backup {backup_id}) on {tablet}: {cause}")]
    Shard { increment: IncrementIndex, backup_id: u64, tablet: TabletId, cause: ShardFailure },
    #[error(
        "timeout: the operation deadline passed at increment {increment} with {} tablet(s) not done: {}",
        not_done.len(),
        NotDone(not_done)
    )]
    DeadlineExceeded { increment: IncrementIndex, not_done: Vec<TabletNotDone> },
    #[error(
        "timeout: increment {increment} took longer than {limit_ms} ms with {} tablet(s) not done: {}",
        not_done.len(),
        NotDone(not_done)
    )]
    IncrementDeadlineExceeded { increment: IncrementIndex, limit_ms: u64, not_done: Vec<TabletNotDone> },
    #[error("cancelled by the operator with {applied} increment(s) applied on every tablet")]
    Cancelled { applied: u32 },
}

/// A tablet that had not reported the current increment done when a deadline passed, how many of its attempts at
/// it had failed (a failed attempt is a transient failure reported or a request that timed out) and why the last
/// one did: the tablet an operator looks at first, whether it was failing or only slow, and at what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TabletNotDone {
    pub tablet: TabletId,
    pub failed_attempts: u32,
    /// `None` when no attempt failed.
    pub last_failure: Option<AttemptFailure>,
}

/// The tablets of a deadline failure, as its message lists them: the first few, then how many more.
struct NotDone<'a>(&'a [TabletNotDone]);

impl fmt::Display for NotDone<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4;
        for (at, TabletNotDone { tablet, failed_attempts, last_failure }) in self.0.iter().take(SHOWN).enumerate() {
            let separator = if at == 0 { "" } else { ", " };
            match (failed_attempts, last_failure) {
                (0, _) | (_, None) => write!(f, "{separator}{tablet} (no failed attempt)")?,
                (1, Some(why)) => write!(f, "{separator}{tablet} (1 failed attempt: {why})")?,
                (n, Some(why)) => write!(f, "{separator}{tablet} ({n} failed attempts, the last: {why})")?,
            }
        }
        if self.0.len() > SHOWN {
            write!(f, " and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// A compact summary of one operation's progress, written to the event log with every persist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgressMark {
    Running {
        op: OperationId,
        increment: IncrementIndex,
        tablets_done: u32,
    },
    /// Segment `segment` ended with `increments` increments applied; `released` says whether the operation's
    /// tables or its collection were let go (the final work, which belongs to the last segment only).
    AwaitingSegment {
        op: OperationId,
        segment: u32,
        increments: u32,
        released: bool,
    },
    Done {
        op: OperationId,
        increments: u32,
    },
    Failed {
        op: OperationId,
    },
}

impl ProgressMark {
    /// Orders the marks of one operation as its progress goes: increments in order, the wait after a segment
    /// after that segment's last increment, then an end. An operation's durable progress never goes down.
    pub fn rank(self) -> (u8, u32, u8) {
        match self {
            ProgressMark::Running { increment, .. } => (1, increment, 0),
            ProgressMark::AwaitingSegment { increments, .. } => (1, increments.saturating_sub(1), 1),
            ProgressMark::Done { .. } | ProgressMark::Failed { .. } => (2, 0, 0),
        }
    }

    /// Whether the mark is an end of the operation (Done or Failed), which is final.
    pub fn is_end(self) -> bool {
        matches!(self, ProgressMark::Done { .. } | ProgressMark::Failed { .. })
    }

    pub fn op(self) -> OperationId {
        match self {
            ProgressMark::Running { op, .. }
            | ProgressMark::AwaitingSegment { op, .. }
            | ProgressMark::Done { op, .. }
            | ProgressMark::Failed { op } => op,
        }
    }
}

impl fmt::Display for ProgressMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgressMark::Running { op, increment, tablets_done } => {
                write!(f, "op {op} running increment {increment}, {tablets_done} tablet(s) done")
            }
            ProgressMark::AwaitingSegment { op, segment, increments, released } => {
                write!(f, "op {op} waiting for segment {} after {increments} increment(s)", segment + 1)?;
                if *released { f.write_str(", its tables released") } else { Ok(()) }
            }
            ProgressMark::Done { op, increments } => write!(f, "op {op} done after {increments} increments"),
            ProgressMark::Failed { op } => write!(f, "op {op} failed"),
        }
    }
}

/// Where an operation stands, as `status` reports it.
#[derive(Clone, Debug, PartialEq, Hash, Eq, Serialize, Deserialize)]
pub struct OperationView {
    pub op: OperationId,
    pub collection: String,
    pub state: OperationState,
    /// The segment under way or last ended, counted from 1 (1 for a restore done in one go).
    pub segment: u32,
    /// The point in time that segment restores to (`None`: the newest backup).
    pub until_ms: Option<u64>,
    /// The increment being applied, while running.
    pub increment: Option<IncrementIndex>,
    /// Increments in the chain.
    pub increments: u32,
    pub tables: Vec<TableProgress>,
    pub error: Option<RestoreError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationState {
    Running,
    /// A segment is done; the restore goes on with the next.
    AwaitingSegment,
    Done,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Hash, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    pub table: TableId,
    pub name: String,
    pub state: Option<TableState>,
    pub tablets: Vec<(TabletId, TabletProgress)>,
}

/// A tablet's standing in the current increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TabletProgress {
    /// The operation is over: every tablet is done (Done) or nothing more happens (Failed).
    Finished,
    Done,
    InFlight,
    Retrying {
        failed_attempts: u32,
    },
    Waiting,
}

/// One line of `list`.
#[derive(Clone, Debug, PartialEq, Hash, Eq, Serialize, Deserialize)]
pub struct OperationSummary {
    pub op: OperationId,
    pub collection: String,
    pub state: OperationState,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CoordinatorTimer {
    /// No reply to `attempt` of `tablet` for `increment` in time.
    RequestTimeout { op: OperationId, tablet: TabletId, increment: IncrementIndex, attempt: u32 },
    /// A backoff has passed; dispatch again.
    RetryDue,
    /// The operation's deadline.
    Deadline { op: OperationId },
    /// The deadline of one increment of the operation.
    IncrementDeadline { op: OperationId, increment: IncrementIndex },
}

pub type CoordinatorOutput = Output<CoordinatorDurable, CoordinatorTimer>;

/// An apply request awaiting its reply; volatile, lost on reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct InFlight {
    op: OperationId,
    attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Coordinator {
    config: CoordinatorConfig,
    durable: CoordinatorDurable,
    in_flight: BTreeMap<TabletId, InFlight>,
    /// Attempts sent in this generation, so every request has a fresh attempt number.
    next_attempt: u32,
    /// `TablesRunAhead` only: tablets already sent the next increment early.
    ran_ahead: BTreeSet<(OperationId, TabletId, IncrementIndex)>,
    rng: SplitMix64,
}

/// Every part of a coordinator, borrowed, for model checkers that relabel states (the explorer's symmetry
/// reduction renames tablets): built by destructuring, so a new field cannot be left out of it.
#[derive(Debug)]
pub struct CoordinatorParts<'a> {
    pub config: &'a CoordinatorConfig,
    pub durable: &'a CoordinatorDurable,
    /// Apply requests awaiting their reply: tablet, operation, attempt.
    pub in_flight: Vec<(TabletId, OperationId, u32)>,
    pub next_attempt: u32,
    pub ran_ahead: &'a BTreeSet<(OperationId, TabletId, IncrementIndex)>,
    pub rng: &'a SplitMix64,
}

impl Coordinator {
    /// Boots from durable state (`None` on first boot): bumps the generation, persists it, and resumes every
    /// running operation by re-arming its timers and re-sending to the tablets that have no result.
    pub fn boot(
        config: CoordinatorConfig,
        loaded: Option<CoordinatorDurable>,
        seed: u64,
        now_ms: u64,
    ) -> (Self, Vec<CoordinatorOutput>) {
        assert!(config.max_in_flight_shards > 0, "at least one request must be allowed in flight");
        assert!(config.max_in_flight_tables > 0, "at least one table must be allowed in flight");
        let mut durable = loaded.unwrap_or_default();
        durable.generation += 1;
        if has(&config, CoordinatorBug::RestartChainOnReboot) {
            for operation in Arc::make_mut(&mut durable.operations).values_mut() {
                if let OperationStatus::Running(running) = &mut operation.status {
                    running.increment = running.first_increment;
                    running.done.clear();
                    running.retries.clear();
                }
            }
        }
        let rng = SplitMix64::new(seed ^ durable.generation.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut machine =
            Self { config, durable, in_flight: BTreeMap::new(), next_attempt: 0, ran_ahead: BTreeSet::new(), rng };
        let mut out = Vec::new();
        machine.persist(&mut out);
        for operation in machine.durable.operations.values() {
            let OperationStatus::Running(running) = &operation.status else { continue };
            let op = operation.op;
            out.push(Output::SetTimer { at_ms: operation.deadline_at_ms, timer: CoordinatorTimer::Deadline { op } });
            out.push(Output::SetTimer {
                at_ms: running.increment_deadline_at_ms,
                timer: CoordinatorTimer::IncrementDeadline { op, increment: running.increment },
            });
            out.push(Output::Report(format!("resuming operation {op} in generation {}", machine.generation())));
        }
        machine.drive(now_ms, &mut out);
        (machine, out)
    }

    /// Starts a restore. Starting an operation that is already known with the same request is a no-op, so a
    /// client may retry.
    pub fn start(&mut self, now_ms: u64, request: RestoreRequest) -> Result<Vec<CoordinatorOutput>, StartError> {
        if let Some(existing) = self.durable.operations.get(&request.op) {
            // The same restore again (a client retrying) is a no-op; anything else under this id is refused.
            let first = existing.segments.first();
            let first_len = existing.segments.get(1).map_or(existing.backup_ids.len(), |s| s.first_increment as usize);
            let same = existing.collection == request.collection
                && sorted_tables(&existing.tables) == sorted_tables(&request.tables)
                && first.is_some_and(|s| s.until_ms == request.until_ms && s.last == request.last_segment)
                && RestoreChain::plan_until(&request.catalog, &request.tables, request.until_ms).is_ok_and(|chain| {
                    chain.backups().iter().map(|m| m.backup_id).eq(existing.backup_ids[..first_len].iter().copied())
                });
            return if same { Ok(Vec::new()) } else { Err(StartError::OperationIdTaken { op: request.op }) };
        }
        if let Some(newest) = self.durable.newest_op
            && request.op <= newest
        {
            return Err(StartError::OperationIdNotNew { op: request.op, newest });
        }
        self.check_start(&request)?;
        let mut chain = RestoreChain::plan_until(&request.catalog, &request.tables, request.until_ms)?;
        if has(&self.config, CoordinatorBug::IncrementalsBeforeNewestFull) {
            chain = RestoreChain::plan_from_oldest_full(&request.catalog, &request.tables, request.until_ms)?;
        }
        let op = request.op;
        let deadline_at_ms = now_ms.saturating_add(self.config.deadline_ms);
        let increment_limit_ms = self.config.increment_deadline_ms;
        let increment_deadline_at_ms = now_ms.saturating_add(increment_limit_ms);
        let tables = Arc::make_mut(&mut self.durable.tables);
        for table in &request.tables {
            tables.insert(table.id, TableState::Restoring { op });
        }
        Arc::make_mut(&mut self.durable.sources_in_use).insert(request.collection.clone(), op);
        self.durable.newest_op = Some(op);
        self.operations_mut().insert(
            op,
            Operation {
                op,
                collection: request.collection,
                tables: request.tables,
                backup_ids: chain.backups().iter().map(|m| m.backup_id).collect(),
                segments: vec![Segment { until_ms: request.until_ms, last: request.last_segment, first_increment: 0 }],
                started_at_ms: now_ms,
                deadline_at_ms,
                status: OperationStatus::Running(RunningState {
                    chain: Arc::new(chain),
                    first_increment: 0,
                    increment: 0,
                    increment_deadline_at_ms,
                    increment_limit_ms,
                    done: BTreeSet::new(),
                    retries: BTreeMap::new(),
                }),
            },
        );
        let mut out = Vec::new();
        self.persist(&mut out);
        out.push(Output::Report(format!("operation {op} started")));
        out.push(Output::SetTimer { at_ms: deadline_at_ms, timer: CoordinatorTimer::Deadline { op } });
        out.push(Output::SetTimer {
            at_ms: increment_deadline_at_ms,
            timer: CoordinatorTimer::IncrementDeadline { op, increment: 0 },
        });
        self.drive(now_ms, &mut out);
        Ok(out)
    }

    fn check_start(&self, request: &RestoreRequest) -> Result<(), StartError> {
        if request.tables.is_empty() {
            return Err(StartError::NoTables);
        }
        let mut seen = BTreeSet::new();
        for table in &request.tables {
            if !seen.insert(table.id) {
                return Err(StartError::DuplicateTable { table: table.id });
            }
            if table.shard_count == 0 {
                return Err(StartError::NoShards { table: table.id });
            }
        }
        for table in &request.tables {
            if let Some(base) = table.index_of
                && !request.tables.iter().any(|t| t.id == base && t.index_of.is_none())
            {
                return Err(StartError::IndexWithoutTable { index: table.id, table: base });
            }
        }
        if let Some(running) = self.durable.sources_in_use.get(&request.collection) {
            return Err(StartError::CollectionBusy { collection: request.collection.clone(), running: *running });
        }
        for table in &request.tables {
            if self.config.non_empty_tables.contains(&table.id) {
                return Err(StartError::TargetNotEmpty { table: table.id });
            }
            match self.durable.tables.get(&table.id) {
                Some(TableState::Restoring { op }) => {
                    return Err(StartError::TargetBusy { table: table.id, running: *op });
                }
                Some(TableState::Restored { .. }) => return Err(StartError::TargetNotEmpty { table: table.id }),
                Some(TableState::RestoreFailed { .. }) | None => {}
            }
        }
        Ok(())
    }

    /// Goes on with a restore done in segments: plans segment `request.segment` (every incremental after the last
    /// backup applied, up to its point in time) and starts it. A call for a segment already begun with the same
    /// point and end is a no-op, so a client may retry. A segment with no backup in it ends at once: as the last,
    /// with the final work.
    pub fn continue_segment(
        &mut self,
        now_ms: u64,
        request: SegmentRequest,
    ) -> Result<Vec<CoordinatorOutput>, SegmentError> {
        let op = request.op;
        let operation = self.durable.operations.get(&op).ok_or(SegmentError::NotFound { op })?;
        let begun = operation.segment();
        if request.segment >= 2
            && let Some(segment) = operation.segments.get(request.segment as usize - 1)
        {
            let same = segment.until_ms == request.until_ms && segment.last == request.last_segment;
            return if same {
                Ok(Vec::new())
            } else {
                Err(SegmentError::SegmentTaken { op, segment: request.segment })
            };
        }
        let reached = match operation.status {
            OperationStatus::AwaitingSegment { reached, .. } => reached,
            OperationStatus::Running(_) => return Err(SegmentError::SegmentRunning { op, segment: begun }),
            OperationStatus::Done { .. } | OperationStatus::Failed { .. } => return Err(SegmentError::Ended { op }),
        };
        if request.segment != begun + 1 {
            return Err(SegmentError::OutOfOrder { op, requested: request.segment, next: begun + 1 });
        }
        let previous_ms = operation.segments.last().and_then(|segment| segment.until_ms);
        if request.until_ms.unwrap_or(u64::MAX) < previous_ms.unwrap_or(u64::MAX) {
            let until_ms = request.until_ms;
            return Err(SegmentError::PointBeforePrevious { op, segment: request.segment, until_ms, previous_ms });
        }
        let restart = has(&self.config, CoordinatorBug::SegmentRestartsChain);
        let chain = if restart {
            RestoreChain::plan_until(&request.catalog, &operation.tables, request.until_ms)?
        } else {
            RestoreChain::plan_segment(&request.catalog, &operation.tables, reached, request.until_ms)?
        };
        let first_increment = if restart { 0 } else { u32::try_from(operation.backup_ids.len()).expect("short chain") };
        let deadline_at_ms = now_ms.saturating_add(self.config.deadline_ms);
        let increment_limit_ms = self.config.increment_deadline_ms;
        let increment_deadline_at_ms = now_ms.saturating_add(increment_limit_ms);
        let planned = chain.len();
        let operation = self.operations_mut().get_mut(&op).expect("looked up above");
        operation.segments.push(Segment { until_ms: request.until_ms, last: request.last_segment, first_increment });
        operation.backup_ids.truncate(first_increment as usize);
        operation.backup_ids.extend(chain.backups().iter().map(|m| m.backup_id));
        let mut out = Vec::new();
        if chain.is_empty() {
            if request.last_segment {
                self.finish(now_ms, op, &mut out);
            } else {
                self.persist(&mut out);
                out.push(Output::Report(format!(
                    "operation {op}: segment {} holds no backup; waiting for segment {}",
                    request.segment,
                    request.segment + 1
                )));
            }
            return Ok(out);
        }
        operation.deadline_at_ms = deadline_at_ms;
        operation.status = OperationStatus::Running(RunningState {
            chain: Arc::new(chain),
            first_increment,
            increment: first_increment,
            increment_deadline_at_ms,
            increment_limit_ms,
            done: BTreeSet::new(),
            retries: BTreeMap::new(),
        });
        self.persist(&mut out);
        out.push(Output::Report(format!(
            "operation {op}: segment {} started, {planned} increment(s) from increment {first_increment}",
            request.segment
        )));
        out.push(Output::SetTimer { at_ms: deadline_at_ms, timer: CoordinatorTimer::Deadline { op } });
        out.push(Output::SetTimer {
            at_ms: increment_deadline_at_ms,
            timer: CoordinatorTimer::IncrementDeadline { op, increment: first_increment },
        });
        self.drive(now_ms, &mut out);
        Ok(out)
    }

    /// Where operation `op` stands.
    pub fn status(&self, op: OperationId) -> Result<OperationView, LifecycleError> {
        let operation = self.durable.operations.get(&op).ok_or(LifecycleError::NotFound { op })?;
        let increments = u32::try_from(operation.backup_ids.len()).expect("short chain");
        let (state, increment, error) = match &operation.status {
            OperationStatus::Running(running) => (OperationState::Running, Some(running.increment), None),
            OperationStatus::AwaitingSegment { .. } => (OperationState::AwaitingSegment, None, None),
            OperationStatus::Done { .. } => (OperationState::Done, None, None),
            OperationStatus::Failed { error, .. } => (OperationState::Failed, None, Some(error.clone())),
        };
        // An operation that ended reports the state it left its tables in, whatever later restores did.
        let table_state = |table: TableId| match &operation.status {
            OperationStatus::Running(_) | OperationStatus::AwaitingSegment { .. } => {
                self.durable.tables.get(&table).copied()
            }
            OperationStatus::Done { .. } => Some(TableState::Restored { op }),
            OperationStatus::Failed { .. } => Some(TableState::RestoreFailed { op }),
        };
        let tables = operation
            .tables
            .iter()
            .map(|table| TableProgress {
                table: table.id,
                name: table.name.clone(),
                state: table_state(table.id),
                tablets: table.tablets().map(|tablet| (tablet, self.tablet_progress(operation, tablet))).collect(),
            })
            .collect();
        Ok(OperationView {
            op,
            collection: operation.collection.clone(),
            state,
            segment: operation.segment(),
            until_ms: operation.segments.last().and_then(|segment| segment.until_ms),
            increment,
            increments,
            tables,
            error,
        })
    }

    fn tablet_progress(&self, operation: &Operation, tablet: TabletId) -> TabletProgress {
        let running = match &operation.status {
            OperationStatus::Running(running) => running,
            // Every tablet is done with the segment that ended.
            OperationStatus::AwaitingSegment { .. } => return TabletProgress::Done,
            OperationStatus::Done { .. } | OperationStatus::Failed { .. } => return TabletProgress::Finished,
        };
        if running.done.contains(&tablet) {
            TabletProgress::Done
        } else if self.in_flight.get(&tablet).is_some_and(|f| f.op == operation.op) {
            TabletProgress::InFlight
        } else if let Some(retry) = running.retries.get(&tablet) {
            TabletProgress::Retrying { failed_attempts: retry.failed_attempts }
        } else {
            TabletProgress::Waiting
        }
    }

    /// Every operation not forgotten, in id order.
    pub fn list(&self) -> Vec<OperationSummary> {
        self.durable
            .operations
            .values()
            .map(|operation| OperationSummary {
                op: operation.op,
                collection: operation.collection.clone(),
                state: match operation.status {
                    OperationStatus::Running(_) => OperationState::Running,
                    OperationStatus::AwaitingSegment { .. } => OperationState::AwaitingSegment,
                    OperationStatus::Done { .. } => OperationState::Done,
                    OperationStatus::Failed { .. } => OperationState::Failed,
                },
            })
            .collect()
    }

    /// Cancels an operation under way (running a segment or waiting for the next): it ends Failed with
    /// [`RestoreError::Cancelled`], its tables left not readable and free for a new restore, its collection
    /// released, its working state dropped. Requests still on their way to the shards may yet be applied there;
    /// a new restore of the tables has a higher operation id, and a shard refuses an older operation's requests
    /// once it holds the newer one's rows. Cancelling a cancelled operation again is a no-op, so a client may
    /// retry; an operation that ended otherwise is refused.
    pub fn cancel(&mut self, now_ms: u64, op: OperationId) -> Result<Vec<CoordinatorOutput>, LifecycleError> {
        let operation = self.durable.operations.get(&op).ok_or(LifecycleError::NotFound { op })?;
        let applied = match &operation.status {
            OperationStatus::Running(running) => running.increment,
            OperationStatus::AwaitingSegment { .. } => u32::try_from(operation.backup_ids.len()).expect("short chain"),
            OperationStatus::Failed { error: RestoreError::Cancelled { .. }, .. } => return Ok(Vec::new()),
            OperationStatus::Done { .. } if has(&self.config, CoordinatorBug::CancelAnswersEnded) => {
                return Ok(Vec::new());
            }
            OperationStatus::Done { increments, .. } if has(&self.config, CoordinatorBug::CancelOverwritesEnd) => {
                let (applied, mut out) = (*increments, Vec::new());
                let operation = self.operations_mut().get_mut(&op).expect("the operation was just found");
                operation.status =
                    OperationStatus::Failed { error: RestoreError::Cancelled { applied }, failed_at_ms: now_ms };
                let tables: Vec<TableId> = operation.tables.iter().map(|t| t.id).collect();
                let held = Arc::make_mut(&mut self.durable.tables);
                for table in tables {
                    held.insert(table, TableState::RestoreFailed { op });
                }
                self.persist(&mut out);
                return Ok(out);
            }
            OperationStatus::Done { .. } | OperationStatus::Failed { .. } => {
                return Err(LifecycleError::AlreadyEnded { op });
            }
        };
        let mut out = Vec::new();
        self.fail(now_ms, op, RestoreError::Cancelled { applied }, &mut out);
        if has(&self.config, CoordinatorBug::CancelKeepsHold) {
            let operation = &self.durable.operations[&op];
            let (tables, collection) = (operation.tables.clone(), operation.collection.clone());
            let held = Arc::make_mut(&mut self.durable.tables);
            for table in &tables {
                held.insert(table.id, TableState::Restoring { op });
            }
            Arc::make_mut(&mut self.durable.sources_in_use).insert(collection, op);
            self.persist(&mut out);
        }
        Ok(out)
    }

    /// Forgets a finished operation: it is gone from status and list. Refused while it runs.
    pub fn forget(&mut self, op: OperationId) -> Result<Vec<CoordinatorOutput>, LifecycleError> {
        let operation = self.durable.operations.get(&op).ok_or(LifecycleError::NotFound { op })?;
        if matches!(operation.status, OperationStatus::Running(_) | OperationStatus::AwaitingSegment { .. }) {
            return Err(LifecycleError::StillRunning { op });
        }
        self.operations_mut().remove(&op);
        let mut out = Vec::new();
        self.persist(&mut out);
        out.push(Output::Report(format!("operation {op} forgotten")));
        Ok(out)
    }

    pub fn handle_message(&mut self, now_ms: u64, from: NodeAddr, msg: Message) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        match msg {
            Message::Reply(reply) if speaks_for_its_tablet(from, &reply) => self.on_reply(now_ms, reply, &mut out),
            Message::Client(request) if from == NodeAddr::Client => {
                let answer = self.on_client_call(now_ms, request.call, &mut out);
                // After the outputs of the call: a start or forget is answered once its state is durable.
                let reply = ClientReply { call_id: request.call_id, answer };
                out.push(Output::Send { to: NodeAddr::Client, msg: Message::ClientReply(Box::new(reply)) });
            }
            // Apply requests and client answers are not for the coordinator, and a reply must come from the
            // tablet it speaks for (or be the refusal of a misrouted request, see `speaks_for_its_tablet`).
            Message::Reply(_) | Message::Apply(_) | Message::Client(_) | Message::ClientReply(_) => {}
        }
        out
    }

    fn on_client_call(&mut self, now_ms: u64, call: ClientCall, out: &mut Vec<CoordinatorOutput>) -> ClientAnswer {
        match call {
            ClientCall::Start(request) => {
                let op = request.op;
                match self.start(now_ms, request) {
                    Ok(more) => {
                        out.extend(more);
                        ClientAnswer::Started { op }
                    }
                    Err(error) => {
                        out.push(Output::Report(format!("start of operation {op} refused: {error}")));
                        ClientAnswer::StartRefused(error)
                    }
                }
            }
            ClientCall::Continue(request) => {
                let (op, segment) = (request.op, request.segment);
                match self.continue_segment(now_ms, request) {
                    Ok(more) => {
                        out.extend(more);
                        ClientAnswer::Continued { op, segment }
                    }
                    Err(error) => {
                        out.push(Output::Report(format!("segment {segment} of operation {op} refused: {error}")));
                        ClientAnswer::ContinueRefused(error)
                    }
                }
            }
            ClientCall::Cancel { op } => match self.cancel(now_ms, op) {
                Ok(more) => {
                    out.extend(more);
                    ClientAnswer::Cancelled { op }
                }
                Err(error) => ClientAnswer::CancelRefused(error),
            },
            ClientCall::Status { op } => ClientAnswer::Status(self.status(op)),
            ClientCall::List => ClientAnswer::List(self.list()),
            ClientCall::Forget { op } => match self.forget(op) {
                Ok(more) => {
                    out.extend(more);
                    ClientAnswer::Forgotten { op }
                }
                Err(error) => ClientAnswer::ForgetRefused(error),
            },
        }
    }

    pub fn handle_timer(&mut self, now_ms: u64, timer: CoordinatorTimer) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        match timer {
            CoordinatorTimer::RequestTimeout { op, tablet, increment, attempt } => {
                let current = self.running(op).map(|r| r.increment);
                let pending = self.in_flight.get(&tablet).is_some_and(|f| f.op == op && f.attempt == attempt);
                if current == Some(increment) && pending {
                    if has(&self.config, CoordinatorBug::LostRequestWaitsForever) {
                        return out;
                    }
                    self.in_flight.remove(&tablet);
                    if has(&self.config, CoordinatorBug::LostReportIsSuccess) {
                        self.on_tablet_done(now_ms, op, tablet, &mut out);
                        return out;
                    }
                    self.schedule_retry(now_ms, op, tablet, AttemptFailure::NoAnswer, &mut out);
                    self.drive(now_ms, &mut out);
                }
            }
            CoordinatorTimer::RetryDue => self.drive(now_ms, &mut out),
            CoordinatorTimer::Deadline { op } => self.on_deadline(now_ms, op, &mut out),
            CoordinatorTimer::IncrementDeadline { op, increment } => {
                self.on_increment_deadline(now_ms, op, increment, &mut out);
            }
        }
        out
    }

    /// The coordinator downloads nothing; a stray download result is ignored.
    pub fn handle_download(&mut self, _now_ms: u64, _result: DownloadResult) -> Vec<CoordinatorOutput> {
        Vec::new()
    }

    pub fn generation(&self) -> Generation {
        self.durable.generation
    }

    pub fn durable(&self) -> &CoordinatorDurable {
        &self.durable
    }

    /// Every part of the machine, for model checkers; see [`CoordinatorParts`].
    pub fn parts(&self) -> CoordinatorParts<'_> {
        let Self { config, durable, in_flight, next_attempt, ran_ahead, rng } = self;
        let in_flight = in_flight
            .iter()
            .map(|(tablet, flight)| {
                let InFlight { op, attempt } = *flight;
                (*tablet, op, attempt)
            })
            .collect();
        CoordinatorParts { config, durable, in_flight, next_attempt: *next_attempt, ran_ahead, rng }
    }

    pub fn operation(&self, op: OperationId) -> Option<&Operation> {
        self.durable.operations.get(&op)
    }

    pub fn progress(&self) -> Vec<ProgressMark> {
        progress_of(&self.durable)
    }

    fn on_reply(&mut self, now_ms: u64, reply: ApplyReply, out: &mut Vec<CoordinatorOutput>) {
        let Some(running) = self.running(reply.op) else { return };
        let known = reply.generation == self.durable.generation
            && reply.increment == running.increment
            && self.in_flight.get(&reply.tablet).is_some_and(|f| f.op == reply.op && f.attempt == reply.attempt);
        if !known {
            return;
        }
        let backup_id = running.backup(running.increment).backup_id;
        let increment = running.increment;
        self.in_flight.remove(&reply.tablet);
        match reply.outcome {
            ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied => {
                self.on_tablet_done(now_ms, reply.op, reply.tablet, out);
            }
            ApplyOutcome::Failed { permanent: false, cause }
                if has(&self.config, CoordinatorBug::TransientIsPermanent) =>
            {
                let error = RestoreError::Shard { increment, backup_id, tablet: reply.tablet, cause };
                self.fail(now_ms, reply.op, error, out);
            }
            ApplyOutcome::Failed { permanent: false, cause } => {
                let why = AttemptFailure::Reported(cause.kind());
                self.schedule_retry(now_ms, reply.op, reply.tablet, why, out);
                self.drive(now_ms, out);
            }
            ApplyOutcome::Failed { permanent: true, cause } => {
                let error = RestoreError::Shard { increment, backup_id, tablet: reply.tablet, cause };
                self.fail(now_ms, reply.op, error, out);
            }
        }
    }

    fn on_tablet_done(&mut self, now_ms: u64, op: OperationId, tablet: TabletId, out: &mut Vec<CoordinatorOutput>) {
        let advance_on_first = has(&self.config, CoordinatorBug::AdvanceOnFirstReport);
        let done_on_first = has(&self.config, CoordinatorBug::DoneOnFirstFinalReport);
        let operation = self.operations_mut().get_mut(&op).expect("replies need an operation");
        let tablet_count = operation.tablet_count();
        let tablets = (advance_on_first || done_on_first).then(|| operation.tablets());
        let OperationStatus::Running(running) = &mut operation.status else { panic!("only a running operation") };
        let final_increment = running.increment == running.last_increment();
        let all = tablets.filter(|_| advance_on_first || final_increment);
        running.done.insert(tablet);
        running.retries.remove(&tablet);
        if let Some(all) = all {
            running.done.extend(all);
        }
        if running.done.len() != tablet_count {
            // The result is durable before anything else happens, so a reboot re-sends only to tablets without one.
            self.persist(out);
        }
        self.drive(now_ms, out);
    }

    /// Advances every running operation through its completed increments and dispatches requests up to the
    /// caps. Persists before any send that depends on a state change.
    fn drive(&mut self, now_ms: u64, out: &mut Vec<CoordinatorOutput>) {
        let running: Vec<OperationId> = self
            .durable
            .operations
            .values()
            .filter(|o| matches!(o.status, OperationStatus::Running(_)))
            .map(|o| o.op)
            .collect();
        for op in running {
            self.advance(now_ms, op, out);
        }
        let mut earliest_retry: Option<u64> = None;
        let ops: Vec<OperationId> = self.durable.operations.keys().copied().collect();
        for op in ops {
            if let Some(at) = self.dispatch(now_ms, op, out) {
                earliest_retry = Some(earliest_retry.map_or(at, |t: u64| t.min(at)));
            }
        }
        if let Some(at_ms) = earliest_retry {
            out.push(Output::SetTimer { at_ms, timer: CoordinatorTimer::RetryDue });
        }
    }

    fn advance(&mut self, now_ms: u64, op: OperationId, out: &mut Vec<CoordinatorOutput>) {
        let increment_deadline_ms = self.config.increment_deadline_ms;
        // Looked at before it is changed: a persist output may still share the operations, and only a change
        // copies them.
        let operation = self.durable.operations.get(&op).expect("advance needs an operation");
        let OperationStatus::Running(running) = &operation.status else { return };
        if running.done.len() != operation.tablet_count() {
            return;
        }
        if running.increment == running.last_increment() {
            let last = operation.in_last_segment();
            if last || has(&self.config, CoordinatorBug::SegmentEndIsDone) {
                self.finish(now_ms, op, out);
            } else {
                self.pause(now_ms, op, out);
            }
            return;
        }
        let operation = self.operations_mut().get_mut(&op).expect("advance needs an operation");
        let OperationStatus::Running(running) = &mut operation.status else { return };
        running.increment += 1;
        running.increment_deadline_at_ms = now_ms.saturating_add(increment_deadline_ms);
        running.increment_limit_ms = increment_deadline_ms;
        running.done.clear();
        running.retries.clear();
        let increment = running.increment;
        let at_ms = running.increment_deadline_at_ms;
        self.in_flight.retain(|_, f| f.op != op);
        self.persist(out);
        out.push(Output::SetTimer { at_ms, timer: CoordinatorTimer::IncrementDeadline { op, increment } });
    }

    /// Sends requests of `op` up to the caps; returns the earliest time a backed-off tablet may go again.
    fn dispatch(&mut self, now_ms: u64, op: OperationId, out: &mut Vec<CoordinatorOutput>) -> Option<u64> {
        let generation = self.durable.generation;
        let operation = self.durable.operations.get(&op)?;
        let OperationStatus::Running(running) = &operation.status else { return None };
        let mut earliest_retry: Option<u64> = None;
        let mut to_send = Vec::new();
        let mut free = (self.config.max_in_flight_shards as usize).saturating_sub(self.in_flight.len());
        // A few tables per operation: a list searched by id beats a map here.
        let mut groups: Vec<GroupState> = Vec::with_capacity(operation.tables.len());
        for (tablet, group) in operation.tablets_with_group() {
            let done = running.done.contains(&tablet);
            let started = done
                || self.in_flight.get(&tablet).is_some_and(|f| f.op == op)
                || running.retries.contains_key(&tablet);
            let state = group_state(&mut groups, group);
            state.all_done &= done;
            // Some tablet started, for now; a group with every tablet done is not under way (next loop).
            state.active |= started;
        }
        for state in &mut groups {
            state.active &= !state.all_done;
        }
        let mut active = groups.iter().filter(|g| g.active).count();
        for (tablet, group) in operation.tablets_with_group() {
            if running.done.contains(&tablet) || self.in_flight.contains_key(&tablet) {
                continue;
            }
            if let Some(retry) = running.retries.get(&tablet)
                && retry.not_before_ms > now_ms
            {
                earliest_retry = Some(earliest_retry.map_or(retry.not_before_ms, |t| t.min(retry.not_before_ms)));
                continue;
            }
            let state = group_state(&mut groups, group);
            if !state.active {
                if active >= self.config.max_in_flight_tables as usize {
                    continue;
                }
                state.active = true;
                active += 1;
            }
            if free == 0 {
                break;
            }
            free -= 1;
            to_send.push((tablet, running.increment));
        }
        if has(&self.config, CoordinatorBug::TablesRunAhead) && running.increment < running.last_increment() {
            // The bug: a table whose tablets are all done with k moves on to k+1 at once.
            let mut complete: Vec<TableId> = groups.iter().filter(|g| g.all_done).map(|g| g.group).collect();
            complete.sort_unstable();
            for group in complete {
                for (tablet, _) in operation.tablets_with_group().filter(|(_, g)| *g == group) {
                    if self.ran_ahead.insert((op, tablet, running.increment + 1)) {
                        to_send.push((tablet, running.increment + 1));
                    }
                }
            }
        }
        for (tablet, increment) in to_send {
            let attempt = self.next_attempt;
            self.next_attempt += 1;
            let running = self.running(op).expect("still running");
            let manifest = running.backup(increment);
            let object = manifest.object(tablet).expect("a planned chain has an object for every tablet").to_string();
            let request = ApplyRequest {
                op,
                generation,
                attempt,
                increment,
                backup_id: manifest.backup_id,
                kind: manifest.kind,
                tablet,
                object,
            };
            out.push(Output::Send { to: NodeAddr::Shard(tablet), msg: Message::Apply(request) });
            if increment != running.increment {
                continue;
            }
            self.in_flight.insert(tablet, InFlight { op, attempt });
            let timeout_at = now_ms.saturating_add(self.config.request_timeout_ms);
            out.push(Output::SetTimer {
                at_ms: timeout_at,
                timer: CoordinatorTimer::RequestTimeout { op, tablet, increment, attempt },
            });
        }
        earliest_retry
    }

    fn schedule_retry(
        &mut self,
        now_ms: u64,
        op: OperationId,
        tablet: TabletId,
        last_failure: AttemptFailure,
        out: &mut Vec<CoordinatorOutput>,
    ) {
        let base = self.config.backoff_base_ms;
        let cap = self.config.backoff_cap_ms;
        let running = self.running(op).expect("retries need a running operation");
        let failed_attempts = running.retries.get(&tablet).map_or(0, |r| r.failed_attempts) + 1;
        let backoff = backoff_ms(base, cap, failed_attempts);
        // Full jitter over the upper half keeps retries of many tablets from marching in step.
        let jitter = if has(&self.config, CoordinatorBug::AmbientJitter) {
            ambient_jitter(backoff / 2 + 1)
        } else {
            self.rng.below(backoff / 2 + 1)
        };
        let not_before_ms = now_ms + backoff / 2 + jitter;
        let running = self.running_mut(op).expect("still running");
        running.retries.insert(tablet, Retry { failed_attempts, last_failure, not_before_ms });
        self.persist(out);
        out.push(Output::SetTimer { at_ms: not_before_ms, timer: CoordinatorTimer::RetryDue });
    }

    /// The tablets of running `op` not done with the current increment, in the operation's order, with their
    /// failed attempts at it.
    fn not_done(&self, op: OperationId) -> Vec<TabletNotDone> {
        let (Some(operation), Some(running)) = (self.durable.operations.get(&op), self.running(op)) else {
            return Vec::new();
        };
        operation
            .tablets()
            .into_iter()
            .filter(|tablet| !running.done.contains(tablet))
            .map(|tablet| {
                let retry = running.retries.get(&tablet);
                TabletNotDone {
                    tablet,
                    failed_attempts: retry.map_or(0, |retry| retry.failed_attempts),
                    last_failure: retry.map(|retry| retry.last_failure),
                }
            })
            .collect()
    }

    fn on_deadline(&mut self, now_ms: u64, op: OperationId, out: &mut Vec<CoordinatorOutput>) {
        let Some(operation) = self.durable.operations.get(&op) else { return };
        if now_ms < operation.deadline_at_ms {
            return;
        }
        let Some(running) = self.running(op) else { return };
        let not_done = self.not_done(op);
        let error = RestoreError::DeadlineExceeded { increment: running.increment, not_done };
        self.fail(now_ms, op, error, out);
    }

    fn on_increment_deadline(
        &mut self,
        now_ms: u64,
        op: OperationId,
        increment: IncrementIndex,
        out: &mut Vec<CoordinatorOutput>,
    ) {
        let Some(running) = self.running(op) else { return };
        if running.increment != increment || now_ms < running.increment_deadline_at_ms {
            return;
        }
        let limit_ms = running.increment_limit_ms;
        let not_done = self.not_done(op);
        let error = RestoreError::IncrementDeadlineExceeded { increment, limit_ms, not_done };
        self.fail(now_ms, op, error, out);
    }

    /// Ends `op` as Done or Failed: releases its tables and its source collection, drops its working state.
    fn end(&mut self, op: OperationId, status: OperationStatus, table_state: TableState) {
        let operation =
            Arc::make_mut(&mut self.durable.operations).get_mut(&op).expect("an operation ends only once it exists");
        assert!(
            matches!(operation.status, OperationStatus::Running(_) | OperationStatus::AwaitingSegment { .. }),
            "only an operation under way ends"
        );
        operation.status = status;
        let tables = Arc::make_mut(&mut self.durable.tables);
        for table in &operation.tables {
            tables.insert(table.id, table_state);
        }
        if self.durable.sources_in_use.get(&operation.collection) == Some(&op) {
            Arc::make_mut(&mut self.durable.sources_in_use).remove(&operation.collection);
        }
        self.in_flight.retain(|_, f| f.op != op);
    }

    fn finish(&mut self, now_ms: u64, op: OperationId, out: &mut Vec<CoordinatorOutput>) {
        let operation = self.durable.operations.get(&op).expect("finish needs an operation");
        let increments = u32::try_from(operation.backup_ids.len()).expect("short chain");
        self.end(op, OperationStatus::Done { increments, finished_at_ms: now_ms }, TableState::Restored { op });
        self.persist(out);
        out.push(Output::Report(format!("operation {op} done: {increments} increments applied on every tablet")));
    }

    /// Ends a segment that is not the last: the operation waits for the next one, its tables still restoring and
    /// its collection still in use; the working state goes.
    fn pause(&mut self, now_ms: u64, op: OperationId, out: &mut Vec<CoordinatorOutput>) {
        let early_final_work = has(&self.config, CoordinatorBug::FinalWorkEverySegment);
        let operation = Arc::make_mut(&mut self.durable.operations).get_mut(&op).expect("pause needs an operation");
        let OperationStatus::Running(running) = &operation.status else { panic!("only a running segment ends") };
        let last = running.backup(running.last_increment());
        let reached = (last.taken_at_ms, last.backup_id);
        operation.status = OperationStatus::AwaitingSegment { reached, since_ms: now_ms };
        let (segment, increments) = (operation.segment(), operation.backup_ids.len());
        if early_final_work {
            let tables = Arc::make_mut(&mut self.durable.tables);
            for table in &operation.tables {
                tables.insert(table.id, TableState::Restored { op });
            }
            Arc::make_mut(&mut self.durable.sources_in_use).remove(&operation.collection);
        }
        self.in_flight.retain(|_, f| f.op != op);
        self.persist(out);
        out.push(Output::Report(format!(
            "operation {op}: segment {segment} done, {increments} increment(s) applied on every tablet; waiting for \
             segment {}",
            segment + 1
        )));
    }

    fn fail(&mut self, now_ms: u64, op: OperationId, error: RestoreError, out: &mut Vec<CoordinatorOutput>) {
        let message = format!("operation {op} failed: {error}");
        self.end(op, OperationStatus::Failed { error, failed_at_ms: now_ms }, TableState::RestoreFailed { op });
        self.persist(out);
        out.push(Output::Report(message));
    }

    fn persist(&self, out: &mut Vec<CoordinatorOutput>) {
        out.push(Output::Persist { state: self.durable.clone(), note: PersistNote::Coordinator(self.progress()) });
    }

    fn running(&self, op: OperationId) -> Option<&RunningState> {
        match &self.durable.operations.get(&op)?.status {
            OperationStatus::Running(running) => Some(running),
            _ => None,
        }
    }

    /// The operations, to change: copied only while a persist output still holds them.
    fn operations_mut(&mut self) -> &mut BTreeMap<OperationId, Operation> {
        Arc::make_mut(&mut self.durable.operations)
    }

    fn running_mut(&mut self, op: OperationId) -> Option<&mut RunningState> {
        match &mut self.operations_mut().get_mut(&op)?.status {
            OperationStatus::Running(running) => Some(running),
            _ => None,
        }
    }
}

/// Tables in id order, so the same tables listed in another order compare equal.
fn sorted_tables(tables: &[TableSpec]) -> Vec<&TableSpec> {
    let mut sorted: Vec<&TableSpec> = tables.iter().collect();
    sorted.sort_by_key(|t| t.id);
    sorted
}

/// Capped exponential backoff before retry number `failed_attempts` (1-based).
pub fn backoff_ms(base_ms: u64, cap_ms: u64, failed_attempts: u32) -> u64 {
    assert!(failed_attempts >= 1, "backoff follows at least one failure");
    let shift = (failed_attempts - 1).min(32);
    base_ms.saturating_mul(1u64 << shift).min(cap_ms)
}

/// The progress of every operation of a durable coordinator state, in operation order.
pub fn progress_of(durable: &CoordinatorDurable) -> Vec<ProgressMark> {
    durable
        .operations
        .values()
        .map(|operation| match &operation.status {
            OperationStatus::Running(running) => ProgressMark::Running {
                op: operation.op,
                increment: running.increment,
                tablets_done: u32::try_from(running.done.len()).expect("fits"),
            },
            OperationStatus::AwaitingSegment { .. } => {
                let op = operation.op;
                let restoring = operation
                    .tables
                    .iter()
                    .all(|table| durable.tables.get(&table.id) == Some(&TableState::Restoring { op }));
                let in_use = durable.sources_in_use.get(&operation.collection) == Some(&op);
                ProgressMark::AwaitingSegment {
                    op,
                    segment: operation.segment(),
                    increments: u32::try_from(operation.backup_ids.len()).expect("short chain"),
                    released: !(restoring && in_use),
                }
            }
            OperationStatus::Done { increments, .. } => {
                ProgressMark::Done { op: operation.op, increments: *increments }
            }
            OperationStatus::Failed { .. } => ProgressMark::Failed { op: operation.op },
        })
        .collect()
}
