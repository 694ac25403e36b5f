//! The exhaustive explorer: model-checks the very coordinator and shard state machines the simulator and the
//! real hosts run, for small worlds, by enumerating every choice of what happens next.
//!
//! A state is the machines (volatile and durable parts), each node's outputs not yet carried out, its pending
//! timers and downloads, the messages in flight, the logical clock and the faults used so far. The choices:
//! - deliver, drop or duplicate any message in flight (drops and duplicates bounded);
//! - complete any pending download whole, truncated, corrupted or failed (damage bounded);
//! - carry out a node's next outputs, up to and including its next persist, so a crash can land between a
//!   durable write and the reply that depends on it;
//! - crash a node (bounded): it loses everything not persisted and reboots from its durable state;
//! - fire a pending timer, advancing the clock to it — only when nothing else is in flight, as timeouts are long
//!   next to message and download latency. Deadline timers never fire: the explorer checks the protocol's
//!   safety and progress, not its deadlines;
//! - in a world restored in segments, the client's call for the next segment, once the coordinator waits for it
//!   (again after a crash lost a call whose effect was not yet durable, as a client retries until answered);
//! - with `cancel`, the client's cancel of the restore, once, at any moment after it durably started (after it
//!   ended too, when the cancel must be refused), taken when the coordinator has carried out what it was doing, so
//!   that the answer is given once the cancel is durable;
//! - with `restore_again` too, once the cancel is answered cancelled, the client's start of a second restore of the
//!   same tables (operation 2), while requests of the first may still be in flight.
//!
//! States are deduplicated by a 64-bit fingerprint. Breadth-first search gives the shortest path to a
//! violation. After the search, a liveness check: from every reachable state, with no more faults, the
//! operation can still end as expected (Done, or Failed as cancelled once a cancel was answered so).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep::bundle::Bundle;
use lockstep::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorDurable, CoordinatorOutput, CoordinatorTimer, OperationStatus,
    ProgressMark, RestoreError, RestoreRequest, SegmentRequest, TableState,
};
use lockstep::io::range_of;
use lockstep::model::{BackupKind, BackupManifest, Change, Rows, TableId, TableSpec, TabletId, apply_changes};
use lockstep::protocol::{
    ApplyOutcome, DownloadRequest, DownloadResult, Message, NodeAddr, Output, PersistNote, RangeRead, StoreError,
};
use lockstep::shard::{Shard, ShardConfig, ShardDurable, ShardOutput, ShardTimer};

use crate::events::StableHasher;
use crate::world::Bugs;

pub mod replication;
pub mod symmetry;

pub use symmetry::Symmetry;

/// The operation every explored restore runs.
pub const OP: u64 = 1;
/// The second restore of the same tables, once the first is cancelled (`restore_again`).
pub const OP_AGAIN: u64 = 2;

/// The small world to explore and the bounds of the search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExploreConfig {
    /// Tables restored together (`TablesRunAhead` needs two).
    pub tables: u32,
    /// Shards of every table.
    pub shards: u32,
    /// Increments in the restore chain: the full backup and `increments - 1` incrementals.
    pub increments: u32,
    /// Segments the restore is done in (1 to `increments`), each ending at a backup, the chain split evenly.
    pub segments: u32,
    /// Node crashes (each followed by a reboot from durable state).
    pub max_crashes: u32,
    pub max_drops: u32,
    pub max_duplicates: u32,
    /// Downloads that come back truncated, corrupted or failed.
    pub max_download_faults: u32,
    /// Longest path explored.
    pub max_depth: u32,
    /// Stop after this many unique states (0: no limit).
    pub max_states: u64,
    /// Breadth-first (shortest counterexamples) or depth-first.
    pub order: SearchOrder,
    pub bugs: Bugs,
    /// Deduplicate states up to a renaming of interchangeable shards ([`symmetry`]).
    pub symmetry: bool,
    /// The client may cancel the restore once, at any moment after it durably started.
    pub cancel: bool,
    /// With `cancel`, in one segment: once the cancel is answered cancelled, the client restores the same tables
    /// again, as operation [`OP_AGAIN`].
    pub restore_again: bool,
}

impl Default for ExploreConfig {
    fn default() -> Self {
        Self {
            tables: 1,
            shards: 2,
            increments: 2,
            segments: 1,
            max_crashes: 1,
            max_drops: 1,
            max_duplicates: 1,
            max_download_faults: 1,
            max_depth: 200,
            max_states: 0,
            order: SearchOrder::BreadthFirst,
            bugs: Bugs::default(),
            symmetry: false,
            cancel: false,
            restore_again: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchOrder {
    BreadthFirst,
    DepthFirst,
}

/// The explored world: the backups and their bytes, and the rows a restore must end with.
#[derive(Debug)]
pub struct ExploreWorld {
    pub config: ExploreConfig,
    pub tables: Vec<TableSpec>,
    pub catalog: Arc<[BackupManifest]>,
    pub objects: BTreeObjects,
    /// The intact payload checksum of every object (what a shard that applied it reports).
    pub crcs: HashMap<String, u32>,
    /// Per tablet, the rows at the end of the chain.
    pub expected: Vec<Rows>,
    coordinator_config: CoordinatorConfig,
    shard_config: ShardConfig,
    /// The renamings states are deduplicated under, when `config.symmetry` is on.
    symmetry: Option<Symmetry>,
}

pub type BTreeObjects = std::collections::BTreeMap<String, bytes::Bytes>;

impl ExploreWorld {
    /// Two rows per shard in the full backup; every incremental updates one row and deletes another, then puts
    /// it back, so a lost or reordered increment shows in the final rows.
    pub fn new(config: ExploreConfig) -> Self {
        assert!(
            config.tables > 0 && config.shards > 0 && config.increments > 0,
            "a world has a tablet and a full backup"
        );
        assert!((1..=config.increments).contains(&config.segments), "every segment ends at a backup of the chain");
        assert!(
            !config.restore_again || (config.cancel && config.segments == 1),
            "a restore again follows a cancel of a restore in one go"
        );
        let tables: Vec<TableSpec> = (0..config.tables)
            .map(|t| TableSpec { id: TableId(t), name: format!("t{t}"), shard_count: config.shards, index_of: None })
            .collect();
        let mut catalog = Vec::new();
        let mut objects = BTreeObjects::new();
        let mut expected = vec![Rows::new(); (config.tables * config.shards) as usize];
        for increment in 0..config.increments {
            let backup_id = u64::from(increment) + 1;
            let kind = if increment == 0 { BackupKind::Full } else { BackupKind::Incremental };
            let mut manifest_tables = std::collections::BTreeMap::new();
            for table in &tables {
                let mut names = Vec::new();
                for tablet in table.tablets() {
                    let base = u64::from(tablet.shard.0) * 10;
                    let changes: Vec<Change> = if increment == 0 {
                        vec![Change::Upsert { key: base, value: 0 }, Change::Upsert { key: base + 1, value: 0 }]
                    } else if increment % 2 == 1 {
                        vec![
                            Change::Upsert { key: base, value: u64::from(increment) },
                            Change::Delete { key: base + 1 },
                        ]
                    } else {
                        vec![Change::Upsert { key: base + 1, value: u64::from(increment) }]
                    };
                    apply_changes(&mut expected[index_of(&config, tablet)], &changes);
                    let object = BackupManifest::object_name(backup_id, tablet);
                    objects.insert(object.clone(), Bundle { backup_id, tablet, kind, changes }.encode().into());
                    names.push(object);
                }
                manifest_tables.insert(table.id, names);
            }
            catalog.push(BackupManifest { backup_id, kind, taken_at_ms: backup_id * 1_000, tables: manifest_tables });
        }
        let crcs = objects.iter().map(|(name, bytes)| (name.clone(), lockstep::bundle::payload_crc32(bytes))).collect();
        let coordinator_config = CoordinatorConfig {
            max_in_flight_shards: config.tables * config.shards,
            max_in_flight_tables: config.tables,
            bug: config.bugs.coordinator,
            ..CoordinatorConfig::default()
        };
        // One ranged read per bundle keeps the space small; resuming reads are covered by truncation.
        let shard_config = ShardConfig {
            download_chunk_bytes: 4096,
            max_download_failures: 1,
            bug: config.bugs.shard,
            ..ShardConfig::default()
        };
        let mut world = Self {
            config,
            tables,
            catalog: catalog.into(),
            objects,
            crcs,
            expected,
            coordinator_config,
            shard_config,
            symmetry: None,
        };
        if world.config.symmetry {
            world.reduce_by_symmetry();
        }
        world
    }

    /// Computes, from the world as it now is, the renamings of shards under which it is invariant, and
    /// deduplicates states up to them from now on (for a world whose data was changed after [`Self::new`]).
    pub fn reduce_by_symmetry(&mut self) {
        self.symmetry = None;
        self.symmetry = Some(Symmetry::of(self));
    }

    /// The renamings states are deduplicated under, if symmetry reduction is on.
    pub fn symmetry(&self) -> Option<&Symmetry> {
        self.symmetry.as_ref()
    }

    /// What states are deduplicated by: the fingerprint of the state, or with symmetry reduction, of the
    /// canonical member of its class.
    pub fn dedup_key(&self, state: &State) -> u64 {
        match &self.symmetry {
            Some(symmetry) => symmetry.canonical_fingerprint(state),
            None => state.fingerprint(),
        }
    }

    /// What the store gives back for `request` when the download's fate is `fate`.
    fn read(&self, request: &DownloadRequest, fate: Fate) -> Result<RangeRead, StoreError> {
        let bytes = &self.objects[&request.object];
        match fate {
            Fate::Failed => Err(StoreError::Unavailable { detail: "explored failure".to_string() }),
            _ => range_of(&request.object, bytes, request.offset, request.len).map(|mut read| {
                if fate == Fate::Truncated && !read.bytes.is_empty() {
                    read.bytes.truncate(read.bytes.len() / 2);
                    read.total_len = request.offset + read.bytes.len() as u64;
                }
                if fate == Fate::Corrupted && !read.bytes.is_empty() {
                    let last = read.bytes.len() - 1;
                    crate::faults::flip(&mut read.bytes, last, 1);
                }
                read
            }),
        }
    }

    pub fn request(&self) -> RestoreRequest {
        let segmented = self.config.segments > 1;
        RestoreRequest {
            op: OP,
            collection: "explore".to_string(),
            tables: self.tables.clone(),
            catalog: self.catalog.clone(),
            until_ms: segmented.then(|| self.segment_points()[0]),
            last_segment: !segmented,
        }
    }

    /// The client's second restore of the same tables, once the first is cancelled.
    pub fn request_again(&self) -> RestoreRequest {
        RestoreRequest { op: OP_AGAIN, ..self.request() }
    }

    /// The point each segment restores to: the time of the backup it ends at, the chain split as evenly as it
    /// goes (segment i of n ends at backup `i * increments / n`), the last at the last backup.
    pub fn segment_points(&self) -> Vec<u64> {
        let (n, m) = (self.config.segments, self.config.increments);
        (1..=n).map(|i| self.catalog[(i * m / n - 1) as usize].taken_at_ms).collect()
    }

    /// The client's call for segment `segment` (2 and later).
    fn continuation(&self, segment: u32) -> SegmentRequest {
        SegmentRequest {
            op: OP,
            segment,
            until_ms: Some(self.segment_points()[segment as usize - 1]),
            last_segment: segment == self.config.segments,
            catalog: self.catalog.clone(),
        }
    }

    /// The state every search starts from: the coordinator booted and the restore started, the shards booted
    /// with empty disks.
    pub fn initial(&self) -> State {
        let (mut coordinator, mut outbox) = Coordinator::boot(self.coordinator_config.clone(), None, 1, 0);
        outbox.extend(coordinator.start(0, self.request()).expect("the explored restore starts"));
        let shards = self
            .tables
            .iter()
            .flat_map(TableSpec::tablets)
            .map(|tablet| {
                Arc::new(ShardNode {
                    machine: Shard::boot(tablet, self.shard_config.clone(), None),
                    durable: None,
                    outbox: Vec::new(),
                    timers: Vec::new(),
                    downloads: Vec::new(),
                })
            })
            .collect();
        let mut state = State {
            now_ms: 0,
            coordinator: Arc::new(CoordinatorNode { machine: coordinator, durable: None, outbox, timers: Vec::new() }),
            shards,
            network: Vec::new(),
            used: Budget::default(),
            ghost: Ghost::default(),
            cancel: None,
            again: false,
        };
        let mut sink = Vec::new();
        state.flush_coordinator(self, &mut sink);
        assert!(sink.is_empty(), "booting breaks no invariant");
        state
    }
}

/// Position of `tablet` among the explored shards: table by table, shard by shard.
fn index_of(config: &ExploreConfig, tablet: TabletId) -> usize {
    (tablet.table.0 * config.shards + tablet.shard.0) as usize
}

/// One explored state. `Hash` covers everything, so equal fingerprints mean equal futures.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    now_ms: u64,
    /// Shared with the states it was copied from until a step changes it: a step changes one node or two, so
    /// the states of a search share most of their nodes (a breadth-first frontier holds far fewer copies).
    coordinator: Arc<CoordinatorNode>,
    shards: Vec<Arc<ShardNode>>,
    /// Messages in flight, kept sorted by (sender, receiver, fingerprint): the order they were sent in does not
    /// matter, so two states that differ only in it are one.
    network: Vec<InFlight>,
    used: Budget,
    ghost: Ghost,
    /// The client's cancel: not made (`None`), answered cancelled (`Some(true)`), or refused because the
    /// operation had ended (`Some(false)`).
    cancel: Option<bool>,
    /// The client has started the second restore ([`OP_AGAIN`]).
    again: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct InFlight {
    from: NodeAddr,
    to: NodeAddr,
    fingerprint: u64,
    msg: Message,
}

impl InFlight {
    fn new(from: NodeAddr, to: NodeAddr, msg: Message) -> Self {
        let mut hasher = StableHasher::new();
        msg.hash(&mut hasher);
        Self { from, to, fingerprint: hasher.finish(), msg }
    }

    fn key(&self) -> (NodeAddr, NodeAddr, u64) {
        (self.from, self.to, self.fingerprint)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CoordinatorNode {
    machine: Coordinator,
    /// What the disk holds: the last persisted state.
    durable: Option<CoordinatorDurable>,
    /// Outputs not carried out yet.
    outbox: Vec<CoordinatorOutput>,
    timers: Vec<(u64, CoordinatorTimer)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ShardNode {
    machine: Shard,
    durable: Option<ShardDurable>,
    outbox: Vec<ShardOutput>,
    timers: Vec<(u64, ShardTimer)>,
    downloads: Vec<DownloadRequest>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Budget {
    crashes: u32,
    drops: u32,
    duplicates: u32,
    download_faults: u32,
}

/// What the checkers remember along a path, per operation ([`OP`], then [`OP_AGAIN`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Ghost {
    /// Highest durable progress rank of each operation.
    progress: [(u8, u32, u8); 2],
    /// How each operation durably ended: not yet (0), Done (1) or Failed (2).
    ended: [u8; 2],
}

/// What can happen next.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Deliver(usize),
    Drop(usize),
    Duplicate(usize),
    /// Carry out the next outputs of a node (None: the coordinator).
    Flush(Option<usize>),
    FireCoordinatorTimer(usize),
    FireShardTimer(usize, usize),
    Download(usize, usize, Fate),
    Crash(Option<usize>),
    /// The client asks for the next segment of the restore.
    Continue,
    /// The client cancels the restore.
    Cancel,
    /// The client restores the same tables again.
    RestoreAgain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    Whole,
    Truncated,
    Corrupted,
    Failed,
}

/// A property violated on a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub invariant: &'static str,
    pub detail: String,
}

/// Properties that must be reachable: a search that never sees one did not explore what it claims to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sometimes {
    /// A shard crashed while it was downloading an increment.
    RebootMidApply,
    /// A shard answered a request for an increment it had already applied from its applied marker.
    DuplicateAnsweredFromMarker,
    /// The coordinator received a reply of an older generation (and ignored it).
    StaleGenerationIgnored,
}

impl Sometimes {
    pub const ALL: [Sometimes; 3] =
        [Sometimes::RebootMidApply, Sometimes::DuplicateAnsweredFromMarker, Sometimes::StaleGenerationIgnored];
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = |n: &Option<usize>| n.map_or("coordinator".to_string(), |s| format!("shard node #{s}"));
        match self {
            Step::Deliver(i) => write!(f, "deliver message #{i}"),
            Step::Drop(i) => write!(f, "drop message #{i}"),
            Step::Duplicate(i) => write!(f, "duplicate message #{i}"),
            Step::Flush(n) => write!(f, "{} carries out its next outputs", node(n)),
            Step::FireCoordinatorTimer(i) => write!(f, "coordinator timer #{i} fires"),
            Step::FireShardTimer(s, i) => write!(f, "shard node #{s} timer #{i} fires"),
            Step::Download(s, i, fate) => write!(f, "shard node #{s} download #{i} comes back {fate:?}"),
            Step::Crash(n) => write!(f, "{} crashes and reboots", node(n)),
            Step::Continue => f.write_str("the client asks for the next segment"),
            Step::Cancel => f.write_str("the client cancels the restore"),
            Step::RestoreAgain => f.write_str("the client restores the same tables again"),
        }
    }
}

/// The furthest progress among `marks` ([`ProgressMark::rank`]).
fn rank(marks: &[ProgressMark]) -> (u8, u32, u8) {
    marks.iter().map(|mark| mark.rank()).max().unwrap_or((0, 0, 0))
}

/// A progress rank in words.
fn describe_rank(rank: (u8, u32, u8)) -> String {
    match rank {
        (0, ..) => "no progress".to_string(),
        (1, increment, 0) => format!("running increment {increment}"),
        (1, increment, _) => format!("a segment that ended after increment {increment}"),
        _ => "the end of the operation".to_string(),
    }
}

impl State {
    /// The coordinator, to change: copied first if another state shares it.
    fn coordinator_mut(&mut self) -> &mut CoordinatorNode {
        Arc::make_mut(&mut self.coordinator)
    }

    /// Shard `s`, to change: copied first if another state shares it.
    fn shard_mut(&mut self, s: usize) -> &mut ShardNode {
        Arc::make_mut(&mut self.shards[s])
    }

    /// Every step possible from here.
    pub fn steps(&self, world: &ExploreWorld) -> Vec<Step> {
        let config = &world.config;
        let mut steps = Vec::new();
        if !self.coordinator.outbox.is_empty() {
            steps.push(Step::Flush(None));
        }
        for (s, shard) in self.shards.iter().enumerate() {
            if !shard.outbox.is_empty() {
                steps.push(Step::Flush(Some(s)));
            }
        }
        for (i, message) in self.network.iter().enumerate() {
            // Equal messages are one choice.
            if i > 0 && self.network[i - 1] == *message {
                continue;
            }
            steps.push(Step::Deliver(i));
            if self.used.drops < config.max_drops {
                steps.push(Step::Drop(i));
            }
            if self.used.duplicates < config.max_duplicates {
                steps.push(Step::Duplicate(i));
            }
        }
        for (s, shard) in self.shards.iter().enumerate() {
            for i in 0..shard.downloads.len() {
                steps.push(Step::Download(s, i, Fate::Whole));
                if self.used.download_faults < config.max_download_faults {
                    steps.extend(
                        [Fate::Truncated, Fate::Corrupted, Fate::Failed].map(|fate| Step::Download(s, i, fate)),
                    );
                }
            }
        }
        if self.awaits_next_segment(world).is_some() {
            steps.push(Step::Continue);
        }
        if self.may_cancel(world) {
            steps.push(Step::Cancel);
        }
        if self.may_restore_again(world) {
            steps.push(Step::RestoreAgain);
        }
        if self.operation_running() && self.used.crashes < config.max_crashes {
            steps.push(Step::Crash(None));
            steps.extend((0..self.shards.len()).map(|s| Step::Crash(Some(s))));
        }
        // A cancel may come at any time, timeouts too: it does not hold them back.
        let quiet = steps.iter().all(|s| matches!(s, Step::Crash(_) | Step::Cancel | Step::RestoreAgain));
        if quiet {
            steps.extend((0..self.coordinator.timers.len()).map(Step::FireCoordinatorTimer));
            for (s, shard) in self.shards.iter().enumerate() {
                steps.extend((0..shard.timers.len()).map(|i| Step::FireShardTimer(s, i)));
            }
        }
        steps
    }

    /// Whether the client's latest operation has not ended (it runs, waits for a segment, or is not durably
    /// started yet).
    fn operation_running(&self) -> bool {
        let op = if self.again { OP_AGAIN } else { OP };
        let operation = self.coordinator.durable.as_ref().and_then(|d| d.operations.get(&op));
        operation
            .is_none_or(|o| matches!(o.status, OperationStatus::Running(_) | OperationStatus::AwaitingSegment { .. }))
    }

    /// The segment the client asks for next, if the coordinator waits for one and has carried out what ending
    /// the last one asked (the client learns of the wait from the durable status).
    fn awaits_next_segment(&self, world: &ExploreWorld) -> Option<u32> {
        let operation = self.coordinator.machine.operation(OP)?;
        let waiting = matches!(operation.status, OperationStatus::AwaitingSegment { .. });
        let next = operation.segment() + 1;
        (waiting && self.coordinator.outbox.is_empty() && next <= world.config.segments).then_some(next)
    }

    /// Whether the client may cancel now: it has not, the restore is durably started, and the coordinator has
    /// carried out its outputs (so the cancel's are carried out, its persist first, before the answer counts).
    fn may_cancel(&self, world: &ExploreWorld) -> bool {
        let started = self.coordinator.durable.as_ref().is_some_and(|d| d.operations.contains_key(&OP));
        world.config.cancel && self.cancel.is_none() && self.coordinator.outbox.is_empty() && started
    }

    /// Whether the client restores the tables again now: it may, has not yet, its cancel of the first restore
    /// was answered cancelled (so that restore has durably ended), and the coordinator has carried out its outputs.
    fn may_restore_again(&self, world: &ExploreWorld) -> bool {
        let config = &world.config;
        config.restore_again && !self.again && self.cancel == Some(true) && self.coordinator.outbox.is_empty()
    }

    /// The operations ended as they must: Done, or cancelled once the client's cancel was answered so, and then,
    /// if the client restores again, that restore Done (every increment on every shard is checked when Done is
    /// persisted).
    fn is_good_end(&self, world: &ExploreWorld) -> bool {
        match self.outcome() {
            Some(OperationStatus::Done { .. }) => true,
            Some(OperationStatus::Failed { error: RestoreError::Cancelled { .. }, .. })
                if self.cancel == Some(true) =>
            {
                !world.config.restore_again || matches!(self.outcome_of(OP_AGAIN), Some(OperationStatus::Done { .. }))
            }
            _ => false,
        }
    }

    /// How the (first) operation ended, from the coordinator's disk.
    pub fn outcome(&self) -> Option<&OperationStatus> {
        self.outcome_of(OP)
    }

    /// How operation `op` ended, from the coordinator's disk.
    pub fn outcome_of(&self, op: u64) -> Option<&OperationStatus> {
        let operation = self.coordinator.durable.as_ref().and_then(|d| d.operations.get(&op))?;
        matches!(operation.status, OperationStatus::Done { .. } | OperationStatus::Failed { .. })
            .then_some(&operation.status)
    }

    /// Whether `step` uses a fault.
    pub fn is_fault(step: &Step) -> bool {
        matches!(
            step,
            Step::Drop(_)
                | Step::Duplicate(_)
                | Step::Crash(_)
                | Step::Download(_, _, Fate::Truncated | Fate::Corrupted | Fate::Failed)
        )
    }

    /// The state after `step`; every property it breaks goes to `broken`, every "sometimes" it shows to
    /// `seen`.
    pub fn next(
        &self,
        world: &ExploreWorld,
        step: &Step,
        broken: &mut Vec<Broken>,
        seen: &mut Vec<Sometimes>,
    ) -> State {
        let mut next = self.clone();
        match *step {
            Step::Deliver(i) | Step::Duplicate(i) => {
                let message = if matches!(step, Step::Deliver(_)) {
                    next.network.remove(i)
                } else {
                    next.used.duplicates += 1;
                    next.network[i].clone()
                };
                next.deliver(world, message.from, message.to, message.msg, broken, seen);
            }
            Step::Drop(i) => {
                next.used.drops += 1;
                next.network.remove(i);
            }
            Step::Flush(None) => next.flush_coordinator(world, broken),
            Step::Flush(Some(s)) => next.flush_shard(world, s, broken),
            Step::FireCoordinatorTimer(i) => {
                let now_ms = next.now_ms;
                let coordinator = next.coordinator_mut();
                let (at, timer) = coordinator.timers.remove(i);
                let now_ms = now_ms.max(at);
                let out = coordinator.machine.handle_timer(now_ms, timer);
                coordinator.outbox.extend(out);
                next.now_ms = now_ms;
                next.flush_coordinator(world, broken);
            }
            Step::FireShardTimer(s, i) => {
                let now_ms = next.now_ms;
                let shard = next.shard_mut(s);
                let (at, timer) = shard.timers.remove(i);
                let now_ms = now_ms.max(at);
                let out = shard.machine.handle_timer(now_ms, timer);
                shard.outbox.extend(out);
                next.now_ms = now_ms;
                next.flush_shard(world, s, broken);
            }
            Step::Download(s, i, fate) => {
                if fate != Fate::Whole {
                    next.used.download_faults += 1;
                }
                let request = next.shard_mut(s).downloads.remove(i);
                let outcome = world.read(&request, fate);
                let result = DownloadResult {
                    download_id: request.download_id,
                    object: request.object,
                    offset: request.offset,
                    outcome,
                };
                let now_ms = next.now_ms;
                let shard = next.shard_mut(s);
                let out = shard.machine.handle_download(now_ms, result);
                shard.outbox.extend(out);
                next.flush_shard(world, s, broken);
            }
            Step::Continue => {
                let segment = next.awaits_next_segment(world).expect("a continue is taken only when it is possible");
                let now_ms = next.now_ms;
                let coordinator = next.coordinator_mut();
                let out = coordinator.machine.continue_segment(now_ms, world.continuation(segment));
                coordinator.outbox.extend(out.expect("the explored segments continue"));
                next.flush_coordinator(world, broken);
            }
            Step::Cancel => {
                let now_ms = next.now_ms;
                let answer = next.coordinator_mut().machine.cancel(now_ms, OP);
                next.cancel = Some(answer.is_ok());
                if let Ok(out) = answer {
                    next.coordinator_mut().outbox.extend(out);
                }
                next.flush_coordinator(world, broken);
                next.check_cancel_answer(broken);
            }
            Step::RestoreAgain => {
                next.again = true;
                let now_ms = next.now_ms;
                let coordinator = next.coordinator_mut();
                match coordinator.machine.start(now_ms, world.request_again()) {
                    Ok(out) => coordinator.outbox.extend(out),
                    // A cancel that took frees the tables: a refusal here is a coordinator that kept them.
                    Err(error) => {
                        let detail = format!("the restore again after a cancel that took was refused: {error}");
                        broken.push(Broken { invariant: "expected-outcome", detail });
                    }
                }
                next.flush_coordinator(world, broken);
            }
            Step::Crash(node) => {
                next.used.crashes += 1;
                match node {
                    None => {
                        let (machine, out) = Coordinator::boot(
                            world.coordinator_config.clone(),
                            next.coordinator.durable.clone(),
                            1,
                            next.now_ms,
                        );
                        next.coordinator = Arc::new(CoordinatorNode {
                            machine,
                            durable: next.coordinator.durable.clone(),
                            outbox: out,
                            timers: Vec::new(),
                        });
                        // The client retries its start until it is answered: if the crash came before the start
                        // was durable, the start comes again (and is a no-op if it was).
                        let now_ms = next.now_ms;
                        let coordinator = next.coordinator_mut();
                        let started = coordinator.machine.start(now_ms, world.request());
                        coordinator.outbox.extend(started.expect("the explored restore starts"));
                        next.flush_coordinator(world, broken);
                    }
                    Some(s) => {
                        if next.shards[s].downloads.iter().len() > 0 || !next.shards[s].outbox.is_empty() {
                            seen.push(Sometimes::RebootMidApply);
                        }
                        let tablet = next.shards[s].machine.id();
                        let durable = next.shards[s].durable.clone();
                        next.shards[s] = Arc::new(ShardNode {
                            machine: Shard::boot(tablet, world.shard_config.clone(), durable.clone()),
                            durable,
                            outbox: Vec::new(),
                            timers: Vec::new(),
                            downloads: Vec::new(),
                        });
                    }
                }
            }
        }
        next
    }

    fn deliver(
        &mut self,
        world: &ExploreWorld,
        from: NodeAddr,
        to: NodeAddr,
        msg: Message,
        broken: &mut Vec<Broken>,
        seen: &mut Vec<Sometimes>,
    ) {
        match to {
            NodeAddr::Coordinator => {
                if let Message::Reply(reply) = &msg
                    && reply.generation < self.coordinator.machine.generation()
                {
                    seen.push(Sometimes::StaleGenerationIgnored);
                }
                let now_ms = self.now_ms;
                let coordinator = self.coordinator_mut();
                let out = coordinator.machine.handle_message(now_ms, from, msg);
                coordinator.outbox.extend(out);
                self.flush_coordinator(world, broken);
            }
            NodeAddr::Shard(tablet) => {
                let s = index_of(&world.config, tablet);
                let now_ms = self.now_ms;
                let out = self.shard_mut(s).machine.handle_message(now_ms, from, msg);
                if out.iter().any(|o| {
                    matches!(o, Output::Send { msg: Message::Reply(r), .. } if r.outcome == ApplyOutcome::AlreadyApplied)
                }) {
                    seen.push(Sometimes::DuplicateAnsweredFromMarker);
                }
                self.shard_mut(s).outbox.extend(out);
                self.flush_shard(world, s, broken);
            }
            // The explorer's worlds hold no client and no replication roles.
            NodeAddr::Client | NodeAddr::Publisher | NodeAddr::Replica => {}
        }
    }

    /// Puts a message in flight at its place in the canonical order.
    fn send(&mut self, message: InFlight) {
        let at = self.network.partition_point(|m| m.key() <= message.key());
        self.network.insert(at, message);
    }

    /// Carries out the coordinator's outputs up to and including its next persist, stopping before a persist
    /// that is not the first output of the step: a crash may land on either side of every persist.
    fn flush_coordinator(&mut self, world: &ExploreWorld, broken: &mut Vec<Broken>) {
        let mut first = true;
        while !self.coordinator.outbox.is_empty() {
            if !first && matches!(self.coordinator.outbox[0], Output::Persist { .. }) {
                return;
            }
            first = false;
            let output = self.coordinator_mut().outbox.remove(0);
            match output {
                Output::Persist { state, note } => {
                    check_cleaned_up(&state, broken);
                    self.coordinator_mut().durable = Some(state);
                    if let PersistNote::Coordinator(marks) = &note {
                        self.check_progress(world, marks, broken);
                    }
                    return;
                }
                Output::Send { to, msg } => self.send(InFlight::new(NodeAddr::Coordinator, to, msg)),
                Output::SetTimer { at_ms, timer } => {
                    if !matches!(timer, CoordinatorTimer::Deadline { .. } | CoordinatorTimer::IncrementDeadline { .. })
                        && !self.coordinator.timers.contains(&(at_ms, timer.clone()))
                    {
                        let timers = &mut self.coordinator_mut().timers;
                        timers.push((at_ms, timer));
                        timers.sort();
                    }
                }
                Output::Download(_) | Output::Report(_) => {}
            }
        }
    }

    /// Carries out shard `s`'s outputs like [`Self::flush_coordinator`].
    fn flush_shard(&mut self, world: &ExploreWorld, s: usize, broken: &mut Vec<Broken>) {
        let mut first = true;
        while !self.shards[s].outbox.is_empty() {
            if !first && matches!(self.shards[s].outbox[0], Output::Persist { .. }) {
                return;
            }
            first = false;
            let output = self.shard_mut(s).outbox.remove(0);
            let tablet = self.shards[s].machine.id();
            match output {
                Output::Persist { state, note } => {
                    if let PersistNote::ShardApplied { op, increment, payload_crc32, .. } = note {
                        self.check_apply(world, tablet, op, increment, payload_crc32, broken);
                    }
                    self.shard_mut(s).durable = Some(state);
                    return;
                }
                Output::Send { to, msg } => self.send(InFlight::new(NodeAddr::Shard(tablet), to, msg)),
                Output::SetTimer { at_ms, timer } => {
                    if !self.shards[s].timers.contains(&(at_ms, timer.clone())) {
                        let timers = &mut self.shard_mut(s).timers;
                        timers.push((at_ms, timer));
                        timers.sort();
                    }
                }
                Output::Download(request) => self.shard_mut(s).downloads.push(request),
                Output::Report(_) => {}
            }
        }
    }

    /// Shard `tablet` is about to make durable increment `increment` of operation `op`, applied from a payload
    /// whose checksum is `crc`.
    fn check_apply(
        &self,
        world: &ExploreWorld,
        tablet: TabletId,
        op: u64,
        increment: u32,
        crc: u32,
        broken: &mut Vec<Broken>,
    ) {
        let s = index_of(&world.config, tablet);
        let held = self.shards[s].durable.as_ref().and_then(|d| d.op);
        if let Some(held) = held
            && op < held
        {
            let detail =
                format!("{tablet} applied increment {increment} of operation {op} over the rows of operation {held}");
            broken.push(Broken { invariant: "no-lost-increment", detail });
            return;
        }
        // What the shard holds of this operation: nothing when it held an older one.
        let applied_of =
            |durable: Option<&ShardDurable>| durable.filter(|d| d.op == Some(op)).and_then(|d| d.applied_through);
        let before = applied_of(self.shards[s].durable.as_ref());
        let expected = before.map_or(0, |k| k + 1);
        // Writing the increment it already holds again is no step backwards or forwards.
        if increment != expected && Some(increment) != before {
            let detail = format!("{tablet} applied increment {increment} when the next one was {expected}");
            broken.push(Broken { invariant: "in-order-apply", detail });
        }
        // A shard that has moved on to a newer operation left this one: its order no longer concerns it (a late
        // request of a cancelled restore may reach one shard after another has begun the next restore).
        let moved_on = |durable: Option<&ShardDurable>| durable.and_then(|d| d.op).is_some_and(|held| held > op);
        if increment > 0
            && let Some(behind) = self.shards.iter().position(|other| {
                let durable = other.durable.as_ref();
                !moved_on(durable) && applied_of(durable).is_none_or(|k| k + 1 < increment)
            })
        {
            let behind = self.shards[behind].machine.id();
            let detail = format!("{tablet} applied increment {increment} before {behind} applied {}", increment - 1);
            broken.push(Broken { invariant: "in-order-apply", detail });
        }
        let object = BackupManifest::object_name(increment as u64 + 1, tablet);
        if world.crcs.get(&object) != Some(&crc) {
            let detail = format!("{tablet} applied increment {increment} from a damaged copy of {object}");
            broken.push(Broken { invariant: "corrupt-never-applied", detail });
        }
    }

    /// The client's cancel was just answered, and what answering it asked carried out: answered cancelled, the
    /// operation has durably ended cancelled; refused, it had durably ended before.
    fn check_cancel_answer(&self, broken: &mut Vec<Broken>) {
        let status = self.coordinator.durable.as_ref().and_then(|d| d.operations.get(&OP)).map(|o| &o.status);
        let (answer, fits) = match self.cancel {
            Some(true) => (
                "cancelled",
                matches!(status, Some(OperationStatus::Failed { error: RestoreError::Cancelled { .. }, .. })),
            ),
            _ => ("refused", matches!(status, Some(OperationStatus::Done { .. } | OperationStatus::Failed { .. }))),
        };
        if !fits {
            let detail = format!("the client's cancel was answered {answer} while the operation is durably {status:?}");
            broken.push(Broken { invariant: "expected-outcome", detail });
        }
    }

    fn check_progress(&mut self, world: &ExploreWorld, marks: &[ProgressMark], broken: &mut Vec<Broken>) {
        for (i, op) in [OP, OP_AGAIN].into_iter().enumerate() {
            let of_op: Vec<ProgressMark> = marks.iter().copied().filter(|m| m.op() == op).collect();
            let now = rank(&of_op);
            if now < self.ghost.progress[i] {
                let detail = format!("coordinator persisted {marks:?} after {}", describe_rank(self.ghost.progress[i]));
                broken.push(Broken { invariant: "progress-never-backwards", detail });
            }
            self.ghost.progress[i] = self.ghost.progress[i].max(now);
            for mark in &of_op {
                let ended = match mark {
                    ProgressMark::Done { .. } => 1,
                    ProgressMark::Failed { .. } => 2,
                    _ => continue,
                };
                if self.ghost.ended[i] != 0 && self.ghost.ended[i] != ended {
                    let before = if self.ghost.ended[i] == 1 { "Done" } else { "Failed" };
                    let detail = format!("coordinator persisted {mark:?} after the operation had ended {before}");
                    broken.push(Broken { invariant: "progress-never-backwards", detail });
                }
                self.ghost.ended[i] = ended;
            }
        }
        for mark in marks {
            let ProgressMark::AwaitingSegment { segment, increments, released, .. } = *mark else { continue };
            if released {
                let detail = format!("segment {segment} ended with the operation's tables or collection released");
                broken.push(Broken { invariant: "final-work-at-the-end", detail });
            }
            for shard in &self.shards {
                let holds = shard.durable.as_ref().and_then(|d| d.applied_through);
                if holds.is_none_or(|k| k + 1 < increments) {
                    let tablet = shard.machine.id();
                    let detail =
                        format!("segment {segment} ended at {increments} increment(s) while {tablet} holds {holds:?}");
                    broken.push(Broken { invariant: "no-false-success", detail });
                }
            }
        }
        for done in marks.iter().filter_map(|m| match m {
            ProgressMark::Done { op, .. } => Some(*op),
            _ => None,
        }) {
            let last = world.config.increments - 1;
            for (s, shard) in self.shards.iter().enumerate() {
                let durable = shard.durable.as_ref().filter(|d| d.op == Some(done));
                let tablet = shard.machine.id();
                if durable.and_then(|d| d.applied_through) != Some(last) {
                    let detail = format!("Done while {tablet} holds {:?}", durable.and_then(|d| d.applied_through));
                    broken.push(Broken { invariant: "no-false-success", detail });
                } else if !durable.is_some_and(|d| *d.rows == world.expected[s]) {
                    let detail = format!("Done while {tablet}'s rows differ from the source");
                    broken.push(Broken { invariant: "no-lost-increment", detail });
                }
            }
        }
    }

    /// A 64-bit fingerprint of the whole state.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = StableHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

/// Fingerprints are already well mixed: the map uses them as they are.
#[derive(Clone, Copy, Default)]
struct BuildFingerprint;

impl std::hash::BuildHasher for BuildFingerprint {
    type Hasher = FingerprintHasher;
    fn build_hasher(&self) -> FingerprintHasher {
        FingerprintHasher(0)
    }
}

struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8) | u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// What a search found.
#[derive(Clone, Debug)]
pub struct Report {
    pub unique_states: u64,
    /// States generated, duplicates included.
    pub states: u64,
    pub max_depth: u32,
    pub elapsed: Duration,
    /// The first violation and the shortest path to it (breadth-first), from the initial state.
    pub counterexample: Option<Counterexample>,
    /// Reachable states from which, with no more faults, the operation cannot end as expected.
    pub stuck: Option<Counterexample>,
    pub sometimes_seen: Vec<Sometimes>,
    /// The search stopped at `max_states` or `max_depth` before it was complete.
    pub truncated: bool,
    /// Renamings of shards states were deduplicated under, the identity included (1: no symmetry reduction).
    pub symmetries: usize,
}

impl Report {
    pub fn states_per_second(&self) -> f64 {
        self.unique_states as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Debug)]
pub struct Counterexample {
    pub broken: Broken,
    pub path: Vec<Step>,
}

/// Searches every state of `world`; `progress` is told the counts now and then.
pub fn explore(world: &ExploreWorld, progress: &mut dyn FnMut(&Report)) -> Report {
    let began = Instant::now();
    let initial = world.initial();
    // Per unique state: its parent and the step from it, for paths; and for the liveness check, the states it
    // reaches without a fault.
    let mut ids: HashMap<u64, u32, BuildFingerprint> = HashMap::default();
    // With symmetry reduction, the plain fingerprints already met: a state met again needs no canonical form.
    let mut met: HashMap<u64, u32, BuildFingerprint> = HashMap::default();
    let mut parents: Vec<(u32, Option<Step>)> = Vec::new();
    let mut fault_free = FaultFree::default();
    let mut good_end: Vec<bool> = Vec::new();
    let mut frontier: VecDeque<(State, u32, u32)> = VecDeque::new();
    ids.insert(world.dedup_key(&initial), 0);
    parents.push((0, None));
    good_end.push(false);
    frontier.push_back((initial, 0, 0));
    let mut report = Report {
        unique_states: 1,
        states: 1,
        max_depth: 0,
        elapsed: Duration::ZERO,
        counterexample: None,
        stuck: None,
        sometimes_seen: Vec::new(),
        truncated: false,
        symmetries: world.symmetry.as_ref().map_or(1, Symmetry::len),
    };
    let mut broken = Vec::new();
    let mut seen = Vec::new();
    let mut last_progress = Instant::now();
    while let Some((state, id, depth)) = match world.config.order {
        SearchOrder::BreadthFirst => frontier.pop_front(),
        SearchOrder::DepthFirst => frontier.pop_back(),
    } {
        report.max_depth = report.max_depth.max(depth);
        let steps = state.steps(world);
        if steps.is_empty() {
            good_end[id as usize] = state.is_good_end(world);
        }
        if depth >= world.config.max_depth {
            report.truncated |= !steps.is_empty();
            continue;
        }
        fault_free.begin(id);
        for step in steps {
            broken.clear();
            let next = state.next(world, &step, &mut broken, &mut seen);
            report.states += 1;
            let plain = world.symmetry.is_some().then(|| next.fingerprint());
            let known = plain.and_then(|plain| met.get(&plain).copied());
            let fingerprint = if known.is_some() { 0 } else { world.dedup_key(&next) };
            let next_id = match known.or_else(|| ids.get(&fingerprint).copied()) {
                Some(known) => known,
                None => {
                    let next_id = u32::try_from(parents.len()).expect("fewer than 2^32 states");
                    ids.insert(fingerprint, next_id);
                    parents.push((id, Some(step.clone())));
                    good_end.push(false);
                    report.unique_states += 1;
                    if let Some(first) = broken.first()
                        && report.counterexample.is_none()
                    {
                        report.counterexample =
                            Some(Counterexample { broken: first.clone(), path: path_to(&parents, next_id) });
                    }
                    frontier.push_back((next, next_id, depth + 1));
                    next_id
                }
            };
            if let Some(plain) = plain {
                met.insert(plain, next_id);
            }
            if !State::is_fault(&step) {
                fault_free.edges.push(next_id);
            }
        }
        if report.counterexample.is_some() && world.config.order == SearchOrder::BreadthFirst {
            break;
        }
        if world.config.max_states > 0 && report.unique_states >= world.config.max_states {
            report.truncated = true;
            break;
        }
        if last_progress.elapsed() > Duration::from_millis(500) {
            report.elapsed = began.elapsed();
            progress(&report);
            last_progress = Instant::now();
        }
    }
    seen.sort();
    seen.dedup();
    report.sometimes_seen = seen;
    if report.counterexample.is_none() && !report.truncated {
        report.stuck = liveness(&parents, &fault_free, &good_end);
    }
    report.elapsed = began.elapsed();
    report
}

/// What a persisted coordinator state shows of the operations that have ended: they hold nothing, no table still
/// restoring under one and no collection in use by one.
fn check_cleaned_up(state: &CoordinatorDurable, broken: &mut Vec<Broken>) {
    for (&op, operation) in state.operations.iter() {
        if !matches!(operation.status, OperationStatus::Done { .. } | OperationStatus::Failed { .. }) {
            continue;
        }
        if let Some((table, _)) = state.tables.iter().find(|(_, t)| **t == TableState::Restoring { op }) {
            let detail = format!("operation {op} ended while table {} is still restoring under it", table.0);
            broken.push(Broken { invariant: "cleaned-up", detail });
        }
        if let Some((collection, _)) = state.sources_in_use.iter().find(|(_, user)| **user == op) {
            let detail = format!("operation {op} ended while collection {collection} is still in use by it");
            broken.push(Broken { invariant: "cleaned-up", detail });
        }
    }
}

/// The fault-free transitions of a search, flat: a state's are pushed while it is expanded, each state is
/// expanded once, so they lie side by side (a list per state cost a header and an allocation per state).
#[derive(Default)]
struct FaultFree {
    /// Targets of every state's fault-free transitions, state after state.
    edges: Vec<u32>,
    /// Per expanded state: where its targets start in `edges` (they end where the next expanded state's start).
    starts: Vec<(u32, usize)>,
}

impl FaultFree {
    /// State `id` is expanded next: the transitions pushed from now on are its.
    fn begin(&mut self, id: u32) {
        self.starts.push((id, self.edges.len()));
    }

    /// Every transition `(from, to)`.
    fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.starts.iter().enumerate().flat_map(move |(i, &(from, start))| {
            let end = self.starts.get(i + 1).map_or(self.edges.len(), |next| next.1);
            self.edges[start..end].iter().map(move |&to| (from, to))
        })
    }
}

/// A reachable state from which no fault-free path leads to a good end, if there is one.
fn liveness(parents: &[(u32, Option<Step>)], fault_free: &FaultFree, good_end: &[bool]) -> Option<Counterexample> {
    let count = parents.len();
    // The transitions reversed, flat as well: the sources of the transitions into state `to` are
    // `sources[into[to]..into[to + 1]]`.
    let mut into = vec![0usize; count + 1];
    for (_, to) in fault_free.iter() {
        into[to as usize + 1] += 1;
    }
    for i in 0..count {
        into[i + 1] += into[i];
    }
    let mut filled = into.clone();
    let mut sources = vec![0u32; fault_free.edges.len()];
    for (from, to) in fault_free.iter() {
        sources[filled[to as usize]] = from;
        filled[to as usize] += 1;
    }
    drop(filled);
    let mut can_end = vec![false; count];
    let mut queue: VecDeque<u32> = (0..count as u32).filter(|i| good_end[*i as usize]).collect();
    for i in &queue {
        can_end[*i as usize] = true;
    }
    while let Some(i) = queue.pop_front() {
        for from in &sources[into[i as usize]..into[i as usize + 1]] {
            if !can_end[*from as usize] {
                can_end[*from as usize] = true;
                queue.push_back(*from);
            }
        }
    }
    let stuck = (0..count).find(|i| !can_end[*i])?;
    let broken = Broken {
        invariant: "liveness",
        detail: "from this state no fault-free path ends the operation as it must (Done, or cancelled once a cancel \
                 was answered so)"
            .to_string(),
    };
    Some(Counterexample { broken, path: path_to(parents, stuck as u32) })
}

fn path_to(parents: &[(u32, Option<Step>)], mut id: u32) -> Vec<Step> {
    let mut path = Vec::new();
    while let (parent, Some(step)) = &parents[id as usize] {
        path.push(step.clone());
        id = *parent;
    }
    path.reverse();
    path
}

/// A scenario file for the madsim simulation with the explored world, its bugs and the faults of `cex`'s path:
/// damaged downloads and crashes become scheduled faults (a crash at the moment the last tablet report or apply
/// before it happened). Drops, duplicates and the exact interleaving are left to the simulation's seeds.
pub fn counterexample_scenario(world: &ExploreWorld, cex: &Counterexample) -> String {
    use std::fmt::Write;
    let config = &world.config;
    let mut text = String::new();
    let w = &mut text;
    let _ = writeln!(
        w,
        "description = \"Counterexample from `cargo sim check`: {} ({})\"",
        cex.broken.invariant,
        cex.broken.detail.replace('"', "'")
    );
    // The path's exact interleaving cannot be forced on the simulation; a hundred seeds under message delays and
    // a slow store (and the path's kinds of message faults) give it the chance to find one like it.
    let _ = writeln!(w, "seeds = [{}]", (0..100).map(|s| s.to_string()).collect::<Vec<_>>().join(", "));
    let bugs = crate::catalog::names_of(config.bugs);
    let _ = writeln!(w, "bugs = [{}]", bugs.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", "));
    let _ = writeln!(
        w,
        "\n[coordinator]\nmax_in_flight_shards = {}\nmax_in_flight_tables = {}",
        world.coordinator_config.max_in_flight_shards, world.coordinator_config.max_in_flight_tables
    );
    let ranges: Vec<String> = (0..config.shards).map(|s| (s * 10).to_string()).collect();
    for table in &world.tables {
        let _ = writeln!(w, "\n[[table]]\nname = \"{}\"\nranges = [{}]", table.name, ranges.join(", "));
    }
    for manifest in world.catalog.iter() {
        let kind = if manifest.kind == BackupKind::Full { "full" } else { "incremental" };
        let _ = writeln!(
            w,
            "\n[[backup]]\nid = {}\nkind = \"{kind}\"\nat_ms = {}",
            manifest.backup_id, manifest.taken_at_ms
        );
        for table in &world.tables {
            let mut upserts = Vec::new();
            let mut deletes = Vec::new();
            for object in &manifest.tables[&table.id] {
                let bundle = Bundle::decode(object, &world.objects[object]).expect("explored bundles are intact");
                for change in bundle.changes {
                    match change {
                        Change::Upsert { key, value } => upserts.push(format!("[{key}, {value}]")),
                        Change::Delete { key } => deletes.push(key.to_string()),
                    }
                }
            }
            let _ = writeln!(
                w,
                "[[backup.change]]\ntable = \"{}\"\nupsert = [{}]\ndelete = [{}]",
                table.name,
                upserts.join(", "),
                deletes.join(", ")
            );
        }
    }
    if config.segments > 1 {
        // A scenario file cancels a restore in segments only in place of its last segment, not at a time: a
        // cancel on the path is left out.
        let points = world.segment_points();
        let (last, earlier) = points.split_last().expect("a segment at least");
        let earlier: Vec<String> = earlier.iter().map(u64::to_string).collect();
        let _ = writeln!(w, "\n[[restore]]\nop = {OP}\nuntil_ms = {last}\nsegments = [{}]", earlier.join(", "));
    } else if config.restore_again && cex.path.contains(&Step::RestoreAgain) {
        // Cancelled at once (it races the restore's end: under the file's message delays it may come too late),
        // then, if the cancel took, the same tables restored again once the first restore has ended.
        let _ = writeln!(w, "\n[[restore]]\nop = {OP}\ncancel_at_ms = 0");
        let _ = writeln!(w, "\n[[restore]]\nop = {OP_AGAIN}\nafter_ended = {OP}\nif_cancelled = {OP}");
    } else if let Some(at_ms) = cancel_moment(world, &cex.path) {
        let _ = writeln!(w, "\n[[restore]]\nop = {OP}\ncancel_at_ms = {at_ms}");
    }
    // The path's drops and duplicates become rates: the simulation picks which messages.
    // A crash inside a sync stretches the windows the explorer reached by choosing the order of events.
    let mut rates: Vec<String> =
        ["message-delay = 0.3", "store-slow = 0.3", "crash-before-sync = 0.2", "disk-lost-write = 1.0"]
            .map(String::from)
            .to_vec();
    if cex.path.iter().any(|s| matches!(s, Step::Drop(_))) {
        rates.push("message-drop = 0.2".to_string());
    }
    if cex.path.iter().any(|s| matches!(s, Step::Duplicate(_))) {
        rates.push("message-duplicate = 0.2".to_string());
    }
    let _ = writeln!(w, "\n[faults]\nheal_at_ms = 30000\nrates = {{ {} }}", rates.join(", "));
    // Replay the path to name each fault by what it hit, and the moment before it.
    let mut state = world.initial();
    let mut moment: Option<String> = None;
    for step in &cex.path {
        match step {
            Step::Download(s, i, fate @ (Fate::Truncated | Fate::Corrupted)) => {
                let shard = &state.shards[*s];
                let request = &shard.downloads[*i];
                let backup = world.catalog.iter().find(|m| m.tables.values().any(|o| o.contains(&request.object)));
                let increment = backup.map_or(0, |m| m.backup_id - 1);
                let action = if *fate == Fate::Truncated { "truncate-download" } else { "corrupt-download" };
                let tablet = shard.machine.id();
                let _ = writeln!(
                    w,
                    "\n[[fault]]\ndo = \"{action}\"\ntablet = \"t{}/{}\"\nincrement = {increment}",
                    tablet.table.0, tablet.shard.0
                );
            }
            Step::Crash(node) => {
                let after = moment.clone().map(|m| format!("after = {m}\n")).unwrap_or_default();
                match node {
                    None => {
                        let _ = writeln!(w, "\n[[fault]]\n{after}do = \"reboot-coordinator\"");
                    }
                    Some(s) => {
                        let tablet = state.shards[*s].machine.id();
                        let _ = writeln!(
                            w,
                            "\n[[fault]]\n{after}do = \"reboot-shard\"\ntablet = \"t{}/{}\"",
                            tablet.table.0, tablet.shard.0
                        );
                    }
                }
            }
            Step::Deliver(i) => {
                let message = &state.network[*i];
                if let (NodeAddr::Shard(tablet), NodeAddr::Coordinator, Message::Reply(reply)) =
                    (message.from, message.to, &message.msg)
                    && matches!(reply.outcome, ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied)
                {
                    moment = Some(format!(
                        "{{ reported = \"t{}/{}\", increment = {} }}",
                        tablet.table.0, tablet.shard.0, reply.increment
                    ));
                }
            }
            _ => {}
        }
        let mut broken = Vec::new();
        let mut seen = Vec::new();
        state = state.next(world, step, &mut broken, &mut seen);
    }
    text
}

/// When a scenario's client should cancel to do what `path` does, if it cancels: at once (as soon as the restore
/// has started) when the path cancels a running restore, a minute in (long after the emitted world's restore has
/// ended) when it cancels one that has ended.
fn cancel_moment(world: &ExploreWorld, path: &[Step]) -> Option<u64> {
    let mut state = world.initial();
    for step in path {
        if *step == Step::Cancel {
            return Some(if state.outcome().is_some() { 60_000 } else { 0 });
        }
        state = state.next(world, step, &mut Vec::new(), &mut Vec::new());
    }
    None
}

/// Replays `path` from the initial state, with the text of every step and what it broke.
pub fn replay(world: &ExploreWorld, path: &[Step]) -> Vec<String> {
    let mut state = world.initial();
    let mut lines = Vec::new();
    for (i, step) in path.iter().enumerate() {
        let what = describe_step(&state, step);
        let mut broken = Vec::new();
        let mut seen = Vec::new();
        state = state.next(world, step, &mut broken, &mut seen);
        lines.push(format!("{:>3}. {what}", i + 1));
        for b in broken {
            lines.push(format!("     invariant {} violated: {}", b.invariant, b.detail));
        }
    }
    lines
}

fn describe_step(state: &State, step: &Step) -> String {
    let message = |i: usize| {
        let message = &state.network[i];
        format!("{} -> {}: {}", message.from, message.to, message.msg)
    };
    match step {
        Step::Deliver(i) => format!("deliver {}", message(*i)),
        Step::Drop(i) => format!("DROP {}", message(*i)),
        Step::Duplicate(i) => format!("DUPLICATE {}", message(*i)),
        Step::FireCoordinatorTimer(i) => format!("coordinator timer fires: {:?}", state.coordinator.timers[*i].1),
        Step::FireShardTimer(s, i) => {
            format!("{} timer fires: {:?}", state.shards[*s].machine.id(), state.shards[*s].timers[*i].1)
        }
        Step::Download(s, i, fate) => {
            let shard = &state.shards[*s];
            format!("{} read of {} comes back {fate:?}", shard.machine.id(), shard.downloads[*i].object)
        }
        Step::Flush(Some(s)) => format!("{} carries out its next outputs", state.shards[*s].machine.id()),
        Step::Crash(Some(s)) => format!("CRASH {} (reboots from its durable state)", state.shards[*s].machine.id()),
        Step::Crash(None) => "CRASH coordinator (reboots from its durable state)".to_string(),
        other => other.to_string(),
    }
}
