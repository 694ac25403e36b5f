//! One seed -> one world: topology (tables, index tables, shards), each table's history, the backup chain of the
//! collection taken from it, the fault plan.
//!
//! Everything is drawn with ChaCha from the seed, so the same seed always builds the same world. The oracle
//! (the rows a correct restore must end with) is each source table at the time of the last backup restored (the
//! last one, or for a point-in-time restore the last one taken by that point), taken straight from the workload
//! history; it never looks at bundles or at how the protocol plans its chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep::bundle::Bundle;
use lockstep::coordinator::{CoordinatorBug, CoordinatorConfig, RestoreRequest, SegmentRequest};
use lockstep::host::HostBug;
use lockstep::model::{
    BackupKind, BackupManifest, Change, IncrementIndex, Key, Rows, RowsIn, ShardMap, SortedRows, TableId, TableSpec,
    TabletId, Value,
};
use lockstep::shard::{ShardBug, ShardConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use lockstep::protocol::{ClientCall, NodeAddr, OperationId};

use crate::faults::FaultPlan;
use crate::plan::{CallExpect, FailureExpect, OpExpect, PlannedCall, ScheduledFault};
use crate::tape::Tape;

/// The operation id every simulated restore uses.
pub const OPERATION_ID: u64 = 1;
/// The operation that restores the tables again after the first failed ([`World::restore_again`]).
pub const RESTORED_AGAIN_ID: u64 = 2;
/// The backup collection every simulated restore reads.
pub const COLLECTION: &str = "main";
/// The least liveness bound of a world: time after healing for reboots to end, backoffs to run out and every
/// tablet to catch up.
pub const BASE_LIVENESS_BOUND_MS: u64 = 120_000;
/// Liveness bound per apply of the whole restore (one tablet, one increment): about three times what one apply
/// takes when the coordinator sends one request at a time (34 ms measured, 704 applies in 23.8 s), so a large
/// world gets the time its work needs. A world of the default sizes (at most 18 tablets, 7 increments) stays
/// at [`BASE_LIVENESS_BOUND_MS`].
pub const LIVENESS_BOUND_PER_APPLY_MS: u64 = 100;
/// The most tables a world may hold, index tables included: every table gets a subnet of the simulated network.
pub const MAX_TABLES: usize = 64;
/// The most shards a table (or an index table) of a world may have: every shard gets an address in its table's subnet.
pub const MAX_SHARDS_PER_TABLE: u32 = 64;

/// Knobs of world generation. `None` means "draw from the seed".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorldParams {
    /// Tables (not counting index tables) in the collection (1-3 when drawn).
    pub tables: Option<u32>,
    /// Shards of every table (1-8 for a single table, 1-4 for several, when drawn).
    pub shard_count: Option<u32>,
    /// Whether tables carry an index table (each one with probability 1/3 when drawn).
    pub indexes: Option<bool>,
    /// Incrementals after the newest full backup (2-6 when drawn).
    pub incrementals: Option<u32>,
    /// Rows in each source table at the first backup, roughly (40-400 when drawn).
    pub initial_rows: Option<u32>,
    /// Fault mix; drawn per seed (swarm) when `None`.
    pub faults: Option<FaultPlan>,
    /// Probability that a world loses one bundle object for good (then it must end in a clean Failed).
    pub lost_object_probability: f64,
    /// Probability that a world which loses an object gets it back once its restore has failed, and restores
    /// the same tables again (which must end Done): see [`World::restore_again`].
    pub restore_again_probability: f64,
    /// Probability that a world restores to a point in time drawn from its history, in one to three segments,
    /// instead of to the newest backup in one go (drawn from a stream of its own, so the rest of a seed's world
    /// is the same either way).
    pub point_in_time_probability: f64,
    /// Probability that the client cancels a world's restore in one go at a moment drawn from the run, racing its
    /// end: it must then end cancelled, or, if the cancel is refused as too late, as it would have (drawn from a
    /// stream of its own, so the rest of a seed's world is the same either way).
    pub cancel_probability: f64,
    /// Deliberate bugs to run with.
    pub bugs: Bugs,
}

/// Deliberately broken protocol variants, to show that the checkers catch them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    pub coordinator: Option<CoordinatorBug>,
    pub shard: Option<ShardBug>,
    pub host: Option<HostBug>,
}

impl WorldParams {
    /// The default world of `cargo sim run`: everything drawn from the seed, 5% of worlds lose an object.
    pub fn sweep_default() -> Self {
        Self {
            lost_object_probability: 0.05,
            restore_again_probability: 0.5,
            point_in_time_probability: 0.25,
            cancel_probability: 0.1,
            ..Self::default()
        }
    }
}

/// A bundle object made missing: for good, or until an operation has ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostObject {
    pub increment: IncrementIndex,
    pub tablet: TabletId,
    pub object: String,
    /// The object is back once this operation has durably ended (the restore that met its loss failed, and an
    /// operator put it back), else it is lost for good.
    pub until_end_of: Option<OperationId>,
}

/// One table of the world: what the restore is told about it, how its keys are cut, and its oracle.
#[derive(Clone, Debug)]
pub struct WorldTable {
    pub spec: TableSpec,
    pub shard_map: ShardMap,
    /// The oracle: the source table when the last backup was taken, as sorted pairs (a tablet's rows are one
    /// run of them, compared with what the tablet holds as one block of memory).
    pub expected_rows: Arc<SortedRows>,
}

#[derive(Clone, Debug)]
pub struct World {
    pub seed: u64,
    /// Tables and index tables, in table-id order.
    pub tables: Vec<WorldTable>,
    /// Every backup of the collection in the store, the ignored older ones included.
    pub catalog: Arc<[BackupManifest]>,
    /// Every object in the store, intact. Shared: every run of the world reads the same bytes.
    pub objects: Arc<BTreeMap<String, bytes::Bytes>>,
    /// The point in time restored to (`None`: the newest backup).
    pub until_ms: Option<u64>,
    /// Increments in the restore chain (the newest full taken by the point restored to, plus the incrementals
    /// after it up to that point), from the workload.
    pub chain_len: u32,
    /// Backup id of each increment of the restore chain, from the workload.
    pub chain_backup_ids: Vec<u64>,
    /// Bundle objects missing for good.
    pub lost_objects: Vec<LostObject>,
    pub faults: FaultPlan,
    /// What the client asks, when, and what it must be answered.
    pub calls: Vec<PlannedCall>,
    /// How each operation the client starts must end.
    pub expected_ops: BTreeMap<OperationId, OpExpect>,
    /// Faults injected at named moments.
    pub scheduled: Vec<ScheduledFault>,
    /// When set, faults fire exactly at these decisions and no dice are rolled (see [`crate::tape`]).
    pub decisions: Option<Arc<Tape>>,
    /// After healing, the restore must end within this much simulated time.
    pub liveness_bound_ms: u64,
    pub coordinator: CoordinatorConfig,
    pub shard: ShardConfig,
    /// A deliberate bug of the hosts, if any.
    pub host_bug: Option<HostBug>,
    /// How long a shard waits for one ranged read.
    pub download_timeout_ms: u64,
}

impl World {
    pub fn generate(seed: u64, params: &WorldParams) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let table_count = params.tables.unwrap_or_else(|| rng.gen_range(1..=3));
        let max_shards = if table_count == 1 { 8 } else { 4 };
        let incrementals = params.incrementals.unwrap_or_else(|| rng.gen_range(2..=6));
        let mut sources = Vec::new();
        for base in 0..table_count {
            let shard_count = params.shard_count.unwrap_or_else(|| rng.gen_range(1..=max_shards));
            let initial_rows = params.initial_rows.unwrap_or_else(|| rng.gen_range(40..=400));
            let indexed = params.indexes.unwrap_or_else(|| rng.gen_ratio(1, 3));
            sources.push(SourceTable { base, shard_count, initial_rows, indexed, index_shards: rng.gen_range(1..=2) });
        }
        // Each table with how its keys are cut, the source table it comes from, and whether it is that table's index.
        let mut specs: Vec<(TableSpec, ShardMap, usize, bool)> = Vec::new();
        for (i, source) in sources.iter().enumerate() {
            let key_space = u64::from(source.initial_rows) * 4;
            let id = TableId(u32::try_from(specs.len()).expect("few tables"));
            let spec = TableSpec {
                id,
                name: format!("table{}", source.base),
                shard_count: source.shard_count,
                index_of: None,
            };
            specs.push((spec, ShardMap::even(source.shard_count, key_space), i, false));
            if source.indexed {
                let index_id = TableId(u32::try_from(specs.len()).expect("few tables"));
                let spec = TableSpec {
                    id: index_id,
                    name: format!("table{}/by_value", source.base),
                    shard_count: source.index_shards,
                    index_of: Some(id),
                };
                specs.push((spec, ShardMap::even(source.index_shards, Key::MAX), i, true));
            }
        }

        let history = Workload::run(&mut rng, &sources, incrementals);
        let mut catalog = Vec::new();
        let mut objects = BTreeMap::new();
        for (b, backup) in history.backups.iter().enumerate() {
            let mut tables = BTreeMap::new();
            for (spec, shard_map, source, is_index) in &specs {
                let changes = history.changes_of(b, *source, *is_index);
                let mut names = Vec::new();
                // The changes are in key order and a shard holds one range of keys: each shard's are one run.
                let mut rest = changes.as_slice();
                for shard in shard_map.shards() {
                    let tablet = TabletId { table: spec.id, shard };
                    let object = BackupManifest::object_name(backup.backup_id, tablet);
                    let end = rest.partition_point(|c| shard_map.shard_for(c.key()) == shard);
                    let (mine, others) = rest.split_at(end);
                    rest = others;
                    let changes = mine.to_vec();
                    let bundle = Bundle { backup_id: backup.backup_id, tablet, kind: backup.kind, changes };
                    objects.insert(object.clone(), bundle.encode().into());
                    names.push(object);
                }
                tables.insert(spec.id, names);
            }
            catalog.push(BackupManifest {
                backup_id: backup.backup_id,
                kind: backup.kind,
                taken_at_ms: backup.taken_at_ms,
                tables,
            });
        }
        // The store lists backups in no particular time order.
        shuffle(&mut rng, &mut catalog);

        let point_in_time = PointInTime::draw(seed, params.point_in_time_probability, &history.backups);
        let target = point_in_time.as_ref().map_or(history.backups.len() - 1, |p| p.target);
        let newest_full =
            history.backups[..=target].iter().rposition(|b| b.kind == BackupKind::Full).expect("history has a full");
        let chain_backup_ids: Vec<u64> = history.backups[newest_full..=target].iter().map(|b| b.backup_id).collect();
        let chain_len = u32::try_from(chain_backup_ids.len()).expect("short chain");
        let tables: Vec<WorldTable> = specs
            .into_iter()
            .map(|(spec, shard_map, source, is_index)| {
                // The workload's flat copy of the table at the last backup restored, already in key order.
                let rows = &history.snapshots[target][source];
                let rows: SortedRows =
                    if is_index { index_pairs(rows).into_iter().collect() } else { rows.iter().copied().collect() };
                WorldTable { spec, shard_map, expected_rows: Arc::new(rows) }
            })
            .collect();
        assert!(tables.len() <= MAX_TABLES, "{} tables, index tables included, past MAX_TABLES", tables.len());
        assert!(
            tables.iter().all(|t| t.spec.shard_count <= MAX_SHARDS_PER_TABLE),
            "a table with more than MAX_SHARDS_PER_TABLE shards"
        );
        let tablets: Vec<TabletId> = tables.iter().flat_map(|t| t.spec.tablets()).collect();
        let lost_object: Option<LostObject> = rng.gen_bool(params.lost_object_probability).then(|| {
            let increment = rng.gen_range(0..chain_len);
            let tablet = tablets[rng.gen_range(0..tablets.len())];
            let object = BackupManifest::object_name(chain_backup_ids[increment as usize], tablet);
            LostObject { increment, tablet, object, until_end_of: None }
        });
        let faults = params.faults.clone().unwrap_or_else(|| {
            let heal_at_ms = rng.gen_range(2_000..20_000);
            FaultPlan::swarm(&mut rng, heal_at_ms)
        });
        let tablet_count = u32::try_from(tablets.len()).expect("few tablets");
        let coordinator = CoordinatorConfig {
            max_in_flight_shards: rng.gen_range(1..=tablet_count.max(1)),
            max_in_flight_tables: rng.gen_range(1..=table_count),
            bug: params.bugs.coordinator,
            ..CoordinatorConfig::default()
        };
        let shard = ShardConfig {
            download_chunk_bytes: rng.gen_range(256..=2048),
            bug: params.bugs.shard,
            ..ShardConfig::default()
        };
        let expect = match &lost_object {
            None => OpExpect::Done,
            Some(lost) => {
                OpExpect::Failed(FailureExpect::ObjectMissing { increment: lost.increment, tablet: lost.tablet })
            }
        };
        let mut world = Self {
            seed,
            tables,
            catalog: catalog.into(),
            objects: Arc::new(objects),
            until_ms: point_in_time.as_ref().and_then(|p| *p.points.last().expect("a segment at least")),
            chain_len,
            chain_backup_ids,
            lost_objects: lost_object.into_iter().collect(),
            faults,
            calls: Vec::new(),
            expected_ops: BTreeMap::from([(OPERATION_ID, expect)]),
            scheduled: Vec::new(),
            decisions: None,
            liveness_bound_ms: BASE_LIVENESS_BOUND_MS,
            coordinator,
            shard,
            host_bug: params.bugs.host,
            download_timeout_ms: 1_000,
        };
        world.liveness_bound_ms = world.work_liveness_bound_ms();
        match &point_in_time {
            None => {
                let call = ClientCall::Start(world.restore_request());
                world.calls.push(PlannedCall::at(0, call, CallExpect::Started));
            }
            Some(point_in_time) => {
                world.plan_segments(&point_in_time.points, &history.backups[newest_full..=target], point_in_time.cancel)
            }
        }
        if world.segments() == 1
            && let Some((at_ms, again_after_ms)) = draw_cancel(seed, params.cancel_probability, world.faults.heal_at_ms)
        {
            world.cancel_at(at_ms);
            // A world that loses an object restores again whichever way its restore ends (below).
            if let Some(delay_ms) = again_after_ms.filter(|_| world.lost_objects.is_empty()) {
                world.restore_again_once_cancelled(delay_ms);
            }
        }
        // Drawn last, so that every other world of a seed is the one it was before restores were retried.
        if !world.lost_objects.is_empty() && rng.gen_bool(params.restore_again_probability) {
            world.restore_again(rng.gen_range(0..100));
        }
        world
    }

    /// Plans the client's calls of a restore in segments to `points` (one per segment, in order, the last the
    /// point restored to): a start to the first, then for every further segment a continue once the one before
    /// has ended, or with `cancel` a cancel instead of the last one. `chain` holds the backups restored, in order.
    /// A call that comes after the segment in which the world loses an object for good finds the operation failed,
    /// and must be refused as ended.
    fn plan_segments(&mut self, points: &[Option<u64>], chain: &[TakenBackup], cancel: bool) {
        let first = RestoreRequest { until_ms: points[0], last_segment: points.len() == 1, ..self.restore_request() };
        self.calls.push(PlannedCall::at(0, ClientCall::Start(first), CallExpect::Started));
        let taken_at_ms: Vec<u64> = chain.iter().map(|b| b.taken_at_ms).collect();
        let fails_at = self.lost_objects.iter().filter(|l| l.until_end_of.is_none()).map(|l| l.increment).min();
        let continues = continue_calls(OPERATION_ID, &self.catalog, points, &taken_at_ms, fails_at, 0, cancel);
        self.calls.extend(continues);
        if cancel && cancelled_before_failing(points, &taken_at_ms, fails_at) {
            self.expected_ops.insert(OPERATION_ID, OpExpect::Failed(FailureExpect::Cancelled));
        }
    }

    /// Makes the client cancel the world's first restore `at_ms` into the run, racing its end: the cancel must be
    /// answered cancelled, and the restore then end so, or be refused because the restore had already ended, as
    /// planned before.
    pub fn cancel_at(&mut self, at_ms: u64) {
        let call = ClientCall::Cancel { op: OPERATION_ID };
        self.calls.push(PlannedCall::at(at_ms, call, CallExpect::CancelledOrEnded));
        if let Some(expect) = self.expected_ops.get_mut(&OPERATION_ID) {
            *expect = OpExpect::CancelRace(Box::new(expect.clone()));
        }
    }

    /// Makes the client restore the same tables again `delay_ms` after the world's first restore ended, if its
    /// cancel of that restore was answered cancelled (expecting Done), as an operator who gave a slow restore up
    /// and starts it over; requests of the cancelled restore may still be on their way to the shards.
    pub fn restore_again_once_cancelled(&mut self, delay_ms: u64) {
        let request = RestoreRequest { op: RESTORED_AGAIN_ID, ..self.restore_request() };
        let mut call = PlannedCall::at(delay_ms, ClientCall::Start(request), CallExpect::Started);
        call.after_end_of = Some(OPERATION_ID);
        call.if_cancelled = Some(OPERATION_ID);
        self.calls.push(call);
        self.expected_ops.insert(RESTORED_AGAIN_ID, OpExpect::Done);
    }

    /// Makes this world's lost object come back once the restore that met its loss has failed, and the client
    /// restore the same tables again `delay_ms` after that failure, as an operator would, expecting Done. Requests
    /// of the failed restore may still be on their way to the shards (held back, duplicated, or answered late by
    /// the store), so this is where a shard must refuse an older operation's request.
    pub fn restore_again(&mut self, delay_ms: u64) {
        for lost in &mut self.lost_objects {
            lost.until_end_of = Some(OPERATION_ID);
        }
        // In one go, to the point the first restore was going to.
        let request = RestoreRequest { op: RESTORED_AGAIN_ID, ..self.restore_request() };
        let mut call = PlannedCall::at(delay_ms, ClientCall::Start(request), CallExpect::Started);
        call.after_end_of = Some(OPERATION_ID);
        self.calls.push(call);
        self.expected_ops.insert(RESTORED_AGAIN_ID, OpExpect::Done);
    }

    /// When a run stops waiting: the liveness bound after healing, or after the client's last planned call when
    /// that comes later (an operation a late call starts gets the whole bound too, and a call near the end is
    /// answered rather than cut off).
    pub fn gives_up_at_ms(&self) -> u64 {
        let last_call = self.calls.iter().map(|call| call.at_ms).max().unwrap_or(0);
        // A call that waits for an operation to end may come as late as that operation's own bound, and what it
        // starts gets the whole bound too.
        let waits =
            self.calls.iter().filter(|call| call.after_end_of.is_some() || call.after_segment.is_some()).count() as u64;
        let bound = self.liveness_bound_ms.saturating_mul(1 + waits);
        self.faults.heal_at_ms.max(last_call).saturating_add(bound)
    }

    /// The liveness bound this world's work needs: [`BASE_LIVENESS_BOUND_MS`], or [`LIVENESS_BOUND_PER_APPLY_MS`]
    /// for every apply of a restore of every table (every tablet, every increment of the chain) when that is more.
    pub fn work_liveness_bound_ms(&self) -> u64 {
        let tablets: u64 = self.tables.iter().map(|table| u64::from(table.spec.shard_count)).sum();
        let applies = tablets * u64::from(self.chain_len);
        BASE_LIVENESS_BOUND_MS.max(applies * LIVENESS_BOUND_PER_APPLY_MS)
    }

    /// The segments planned for the world's first restore: one, unless the client continues it (or cancels it
    /// instead of asking for its last).
    pub fn segments(&self) -> u32 {
        let planned = |call: &&PlannedCall| match &call.call {
            ClientCall::Continue(request) => request.op == OPERATION_ID,
            // A cancel in place of the last segment.
            ClientCall::Cancel { op } => call.after_segment.is_some() && *op == OPERATION_ID,
            _ => false,
        };
        1 + self.calls.iter().filter(planned).count() as u32
    }

    /// Whether the client cancels the world's first restore instead of asking for its last segment.
    pub fn cancels(&self) -> bool {
        self.calls
            .iter()
            .any(|call| call.call == ClientCall::Cancel { op: OPERATION_ID } && call.after_segment.is_some())
    }

    /// Whether the client cancels the world's first restore at a moment of the run, racing its end.
    pub fn cancels_mid_run(&self) -> bool {
        self.calls
            .iter()
            .any(|call| call.call == ClientCall::Cancel { op: OPERATION_ID } && call.after_segment.is_none())
    }

    /// The tables operation `op` restores, from the client's start call for it.
    pub fn tables_of(&self, op: OperationId) -> Vec<TableSpec> {
        self.calls
            .iter()
            .find_map(|c| match &c.call {
                ClientCall::Start(request) if request.op == op => Some(request.tables.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// The tablets operation `op` restores.
    pub fn tablets_of(&self, op: OperationId) -> Vec<TabletId> {
        self.tables_of(op).iter().flat_map(TableSpec::tablets).collect()
    }

    /// Every tablet of every table, in table then shard order.
    pub fn tablets(&self) -> impl Iterator<Item = TabletId> + '_ {
        self.tables.iter().flat_map(|t| t.spec.tablets())
    }

    pub fn tablet_count(&self) -> u32 {
        self.tables.iter().map(|t| t.spec.shard_count).sum()
    }

    pub fn table(&self, id: TableId) -> &WorldTable {
        &self.tables[id.0 as usize]
    }

    /// `node` as scenario files name it: `coordinator`, `client`, or a table's name and a shard (`orders/1`).
    pub fn node_name(&self, node: NodeAddr) -> String {
        match node {
            NodeAddr::Coordinator => "coordinator".to_string(),
            NodeAddr::Client => "client".to_string(),
            NodeAddr::Publisher => "publisher".to_string(),
            NodeAddr::Replica => "replica".to_string(),
            NodeAddr::Shard(tablet) => format!("{}/{}", self.table(tablet.table).spec.name, tablet.shard.0),
        }
    }

    /// The restore of every table of the world to its point in time, in one go.
    pub fn restore_request(&self) -> RestoreRequest {
        RestoreRequest {
            op: OPERATION_ID,
            collection: COLLECTION.to_string(),
            tables: self.tables.iter().map(|t| t.spec.clone()).collect(),
            catalog: self.catalog.clone(),
            until_ms: self.until_ms,
            last_segment: true,
        }
    }

    pub fn expected_rows_of(&self, tablet: TabletId) -> Rows {
        self.expected_rows_in(tablet).to_map()
    }

    /// The oracle's rows of `tablet`, in key order, without copying them.
    pub fn expected_rows_in(&self, tablet: TabletId) -> RowsIn<'_> {
        let table = self.table(tablet.table);
        table.expected_rows.in_range(table.shard_map.range(tablet.shard))
    }

    /// The payload checksum of the intact bundle `object`, as its header records it: every object of a world is a
    /// bundle [`Bundle::encode`] made, so the header holds the checksum of the intact payload.
    pub fn intact_payload_crc32(&self, object: &str) -> Option<u32> {
        self.objects.get(object).and_then(|bytes| Bundle::recorded_payload_crc(bytes))
    }

    pub fn total_rows(&self) -> usize {
        self.tables.iter().map(|t| t.expected_rows.len()).sum()
    }

    /// A few lines saying what this world is: topology, chain, fault mix, lost object, bugs.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "seed {}: {} table(s), {} tablet(s), {} rows at the last backup, chain of {} increments (backups {:?}), heal at {} ms\n",
            self.seed,
            self.tables.len(),
            self.tablet_count(),
            self.total_rows(),
            self.chain_len,
            self.chain_backup_ids,
            self.faults.heal_at_ms
        );
        for table in &self.tables {
            let spec = &table.spec;
            let index = spec.index_of.map(|base| format!(", index of {base}")).unwrap_or_default();
            text.push_str(&format!(
                "table {} = {}: {} shard(s), {} rows{index}\n",
                spec.id,
                spec.name,
                spec.shard_count,
                table.expected_rows.len()
            ));
        }
        let enabled: Vec<String> =
            self.faults.enabled().map(|k| format!("{}={:.2}", k.name(), self.faults.rate(k))).collect();
        let enabled = if enabled.is_empty() { "none".to_string() } else { enabled.join(" ") };
        text.push_str(&format!("faults on: {enabled}\n"));
        if let Some(tape) = &self.decisions {
            text.push_str(&format!("faults pinned (no dice): {}\n", tape.len()));
            for decision in tape.decisions() {
                text.push_str(&format!("  {decision}\n"));
            }
        }
        for lost in &self.lost_objects {
            let how_long = match lost.until_end_of {
                None => "for good".to_string(),
                Some(op) => format!("until operation {op} has ended"),
            };
            text.push_str(&format!(
                "object lost {how_long}: {} (increment {}, {})\n",
                lost.object, lost.increment, lost.tablet
            ));
        }
        for call in &self.calls {
            let when = match call.after_end_of {
                None => format!("at {} ms", call.at_ms),
                Some(op) => format!("{} ms after operation {op} ended", call.at_ms),
            };
            let when = match call.after_segment {
                None => when,
                Some((op, segment)) => format!("{} ms after segment {segment} of operation {op} ended", call.at_ms),
            };
            let when = match call.if_cancelled {
                None => when,
                Some(op) => format!("{when}, only if its cancel of operation {op} took"),
            };
            text.push_str(&format!("client {when}: {} (expect {})\n", describe_call(&call.call), call.expect));
        }
        for (op, expect) in &self.expected_ops {
            text.push_str(&format!("operation {op} must end {expect}\n"));
        }
        for fault in &self.scheduled {
            text.push_str(&format!("scheduled fault: {} {}\n", fault.action, fault.moment));
        }
        if let Some(bug) = self.coordinator.bug {
            text.push_str(&format!("deliberate coordinator bug: {bug:?}\n"));
        }
        if let Some(bug) = self.shard.bug {
            text.push_str(&format!("deliberate shard bug: {bug:?}\n"));
        }
        text
    }
}

fn describe_call(call: &ClientCall) -> String {
    match call {
        ClientCall::Start(request) => {
            let tables: Vec<&str> = request.tables.iter().map(|t| t.name.as_str()).collect();
            let until = request.until_ms.map(|ms| format!(" to {ms} ms")).unwrap_or_default();
            let segments = if request.last_segment { "" } else { ", the first of several segments" };
            format!(
                "start operation {} of collection {} onto {}{until}{segments}",
                request.op,
                request.collection,
                tables.join(", ")
            )
        }
        ClientCall::Continue(request) => {
            let last = if request.last_segment { ", the last" } else { "" };
            format!(
                "continue operation {} with segment {} to {}{last}",
                request.op,
                request.segment,
                point(request.until_ms)
            )
        }
        ClientCall::Status { op } => format!("status of operation {op}"),
        ClientCall::List => "list operations".to_string(),
        ClientCall::Forget { op } => format!("forget operation {op}"),
        ClientCall::Cancel { op } => format!("cancel operation {op}"),
    }
}

/// The segment, counted from 1, of a restore in segments to `points` (one per segment, in order) that applies
/// `increment` of its chain, whose backups were taken at `chain_taken_at_ms`: the first segment whose point is at
/// or after the backup (the last, for an increment past the chain).
fn segment_of(points: &[Option<u64>], chain_taken_at_ms: &[u64], increment: IncrementIndex) -> u32 {
    let taken_at = chain_taken_at_ms.get(increment as usize).copied().unwrap_or(u64::MAX);
    let before_last = &points[..points.len().saturating_sub(1)];
    1 + before_last.iter().filter(|p| p.is_some_and(|p| p < taken_at)).count() as u32
}

/// The continue calls of operation `op`, a restore in segments to `points` (one per segment, in order, the last
/// the point of the whole restore) of a chain whose backups were taken at `chain_taken_at_ms`: for every segment
/// after the first, a continue `after_ms` after the segment before it has ended; with `cancel`, the last segment's
/// continue is a cancel instead (the operator gives the restore up before its last segment). When the operation
/// fails for good at increment `fails_at` (a lost object), every call after the segment of that increment finds it
/// ended, and must be refused so.
pub(crate) fn continue_calls(
    op: OperationId,
    catalog: &Arc<[BackupManifest]>,
    points: &[Option<u64>],
    chain_taken_at_ms: &[u64],
    fails_at: Option<IncrementIndex>,
    after_ms: u64,
    cancel: bool,
) -> Vec<PlannedCall> {
    let last = points.len().saturating_sub(1);
    let failed_in = fails_at.map(|increment| segment_of(points, chain_taken_at_ms, increment));
    let mut calls = Vec::new();
    for (at, point) in points.iter().enumerate().skip(1) {
        let segment = u32::try_from(at + 1).expect("few segments");
        let ended = failed_in.is_some_and(|failed| failed < segment);
        let (call, expect) = if cancel && at == last {
            let expect =
                if ended { CallExpect::CancelRefused("already-ended".to_string()) } else { CallExpect::Cancelled };
            (ClientCall::Cancel { op }, expect)
        } else {
            let request =
                SegmentRequest { op, segment, until_ms: *point, last_segment: at == last, catalog: catalog.clone() };
            let expect = if ended { CallExpect::ContinueRefused("ended".to_string()) } else { CallExpect::Continued };
            (ClientCall::Continue(request), expect)
        };
        let mut call = PlannedCall::at(after_ms, call, expect);
        call.after_segment = Some((op, segment - 1));
        calls.push(call);
    }
    calls
}

/// Whether a restore in segments to `points` that the client cancels before its last segment is cancelled: it has
/// not failed for good before (at increment `fails_at`, a lost object) in one of the segments it ran.
pub(crate) fn cancelled_before_failing(
    points: &[Option<u64>],
    chain_taken_at_ms: &[u64],
    fails_at: Option<IncrementIndex>,
) -> bool {
    let last = u32::try_from(points.len()).expect("few segments");
    fails_at.is_none_or(|increment| segment_of(points, chain_taken_at_ms, increment) >= last)
}

/// Whether, with `probability`, the client cancels a world's restore in one go, and when: a moment up to a little
/// after healing, so that most cancels land while the restore runs and some after it ended; and, one time in two,
/// how long after the cancelled restore has ended the client restores again. From a generator of its own, seeded
/// from `seed`.
fn draw_cancel(seed: u64, probability: f64, heal_at_ms: u64) -> Option<(u64, Option<u64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x3c41_5ca7_0b0e_d1e5);
    if !rng.gen_bool(probability) {
        return None;
    }
    let at_ms = rng.gen_range(0..=heal_at_ms.saturating_add(heal_at_ms / 4));
    // Drawn after the moment, so that a seed cancels when it did before restores again were drawn.
    let again_after_ms = rng.gen_bool(0.5).then(|| rng.gen_range(0..100));
    Some((at_ms, again_after_ms))
}

/// A point in time as a description says it.
fn point(until_ms: Option<u64>) -> String {
    until_ms.map_or_else(|| "the newest backup".to_string(), |ms| format!("{ms} ms"))
}

/// A restore to a point in time, in segments, as drawn for a world.
struct PointInTime {
    /// The backup of the history the point falls after: the last one restored.
    target: usize,
    /// The point each segment restores to, in order; the last is the point of the whole restore (`None`: the
    /// newest backup, when that is the target).
    points: Vec<Option<u64>>,
    /// The client cancels the restore instead of asking for its last segment.
    cancel: bool,
}

impl PointInTime {
    /// Draws, with `probability`, a point somewhere in the history of `backups` (before the newest full backup
    /// too, where the restore starts from the full before it) and one to three segments up to it, each ending at
    /// a point drawn between two backups of the chain (two may end at the same backup, leaving one empty). From a
    /// generator of its own, seeded from `seed`.
    fn draw(seed: u64, probability: f64, backups: &[TakenBackup]) -> Option<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e9a_11d3_c0de_5e65);
        if !rng.gen_bool(probability) {
            return None;
        }
        let target = rng.gen_range(0..backups.len());
        let full = backups[..=target].iter().rposition(|b| b.kind == BackupKind::Full).expect("history starts full");
        // A point at or after a backup and before the next one.
        let after = |at: usize, rng: &mut ChaCha8Rng| {
            let gap = backups.get(at + 1).map_or(10_000, |next| next.taken_at_ms - backups[at].taken_at_ms);
            backups[at].taken_at_ms + rng.gen_range(0..gap)
        };
        let until = if target + 1 == backups.len() && rng.gen_bool(0.5) { None } else { Some(after(target, &mut rng)) };
        let segments = rng.gen_range(1..=3);
        let mut points: Vec<Option<u64>> = (1..segments)
            .map(|_| Some(after(rng.gen_range(full..=target), &mut rng).min(until.unwrap_or(u64::MAX))))
            .collect();
        points.sort_unstable();
        points.push(until);
        // Drawn last, so that the points of a seed are the ones they were before cancels were drawn.
        let cancel = segments > 1 && rng.gen_bool(0.2);
        Some(Self { target, points, cancel })
    }
}

/// A source table as drawn: its shape and whether it carries an index.
struct SourceTable {
    /// Position among the base tables.
    base: u32,
    shard_count: u32,
    initial_rows: u32,
    indexed: bool,
    index_shards: u32,
}

/// The rows of the index on a table's values: key `value << 32 | key`, value the table key. Values are 32-bit
/// and keys stay below 2^32, so every row of the table has its own index row.
pub fn index_rows(rows: &Rows) -> Rows {
    rows.iter().map(|(&key, &value)| ((value << 32) | (key & 0xffff_ffff), key)).collect()
}

/// One backup as the workload took it.
struct TakenBackup {
    backup_id: u64,
    kind: BackupKind,
    taken_at_ms: u64,
}

/// Each source table's history and the backups taken of the collection.
struct Workload {
    backups: Vec<TakenBackup>,
    /// For every backup, the rows of every base table when it was taken, in key order.
    snapshots: Vec<Vec<Vec<(Key, Value)>>>,
}

impl Workload {
    /// Older full, 1-2 incrementals (to be ignored), newer full, then `incrementals` incrementals, with a batch of
    /// mutations of every table before every backup (sometimes none, so some incrementals are empty for some
    /// tables).
    fn run(rng: &mut ChaCha8Rng, tables: &[SourceTable], incrementals: u32) -> Self {
        let mut kinds = vec![BackupKind::Full];
        kinds.extend((0..rng.gen_range(1..=2)).map(|_| BackupKind::Incremental));
        kinds.push(BackupKind::Full);
        kinds.extend((0..incrementals).map(|_| BackupKind::Incremental));

        let mut sources: Vec<Rows> = vec![Rows::new(); tables.len()];
        let mut deleted: Vec<Vec<Key>> = vec![Vec::new(); tables.len()];
        let mut backups = Vec::new();
        let mut snapshots = Vec::new();
        let mut now_ms = 1_000;
        for (i, kind) in kinds.into_iter().enumerate() {
            for (t, table) in tables.iter().enumerate() {
                let key_space = u64::from(table.initial_rows) * 4;
                let batch = if i == 0 { table.initial_rows } else { rng.gen_range(0..=table.initial_rows / 4) };
                for _ in 0..batch {
                    mutate(rng, key_space, &mut sources[t], &mut deleted[t]);
                }
            }
            now_ms += rng.gen_range(1_000..60_000);
            backups.push(TakenBackup { backup_id: 100 + i as u64, kind, taken_at_ms: now_ms });
            // Flat copies: cheaper to take, walk and free than copies of the maps.
            snapshots.push(sources.iter().map(|rows| rows.iter().map(|(&k, &v)| (k, v)).collect()).collect());
        }
        Self { backups, snapshots }
    }

    /// The changes backup `b` carries for a table of source `source` (or its index), in key order: every row for
    /// a full backup, the difference from the backup before it for an incremental.
    fn changes_of(&self, b: usize, source: usize, is_index: bool) -> Vec<Change> {
        let rows_at = |b: usize| -> std::borrow::Cow<'_, [(Key, Value)]> {
            let rows = &self.snapshots[b][source];
            if is_index { std::borrow::Cow::Owned(index_pairs(rows)) } else { std::borrow::Cow::Borrowed(rows) }
        };
        let now = rows_at(b);
        match self.backups[b].kind {
            BackupKind::Full => now.iter().map(|&(key, value)| Change::Upsert { key, value }).collect(),
            BackupKind::Incremental => diff(&rows_at(b - 1), &now),
        }
    }
}

/// [`index_rows`] of rows held as pairs in key order; the index rows come back in key order too.
fn index_pairs(rows: &[(Key, Value)]) -> Vec<(Key, Value)> {
    let mut index: Vec<(Key, Value)> =
        rows.iter().map(|&(key, value)| ((value << 32) | (key & 0xffff_ffff), key)).collect();
    // Every row has its own index key, so the order is total.
    index.sort_unstable_by_key(|&(key, _)| key);
    index
}

/// One source-table mutation: insert, update, delete, or re-insert a key deleted earlier.
fn mutate(rng: &mut ChaCha8Rng, key_space: Key, source: &mut Rows, deleted: &mut Vec<Key>) {
    let value = rng.r#gen::<u32>() as u64;
    match rng.gen_range(0..10) {
        0..=4 => {
            source.insert(rng.gen_range(0..key_space), value);
        }
        5..=6 if !source.is_empty() => {
            let key = existing_key(rng, key_space, source);
            source.insert(key, value);
        }
        7..=8 if !source.is_empty() => {
            let key = existing_key(rng, key_space, source);
            source.remove(&key);
            deleted.push(key);
        }
        _ if !deleted.is_empty() => {
            let key = deleted.swap_remove(rng.gen_range(0..deleted.len()));
            source.insert(key, value);
        }
        _ => {
            source.insert(rng.gen_range(0..key_space), value);
        }
    }
}

/// An existing key: the first at or after a random point of the key space, wrapping around.
fn existing_key(rng: &mut ChaCha8Rng, key_space: Key, rows: &Rows) -> Key {
    let from = rng.gen_range(0..key_space);
    let key = rows.range(from..).next().or_else(|| rows.iter().next()).map(|(k, _)| *k);
    key.expect("rows is not empty")
}

/// The incremental changes that turn `before` into `after` (both in key order): deletes and upserts in key order.
fn diff(before: &[(Key, Value)], after: &[(Key, Value)]) -> Vec<Change> {
    let mut changes = Vec::new();
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(&&(key, _)), None) => {
                changes.push(Change::Delete { key });
                old.next();
            }
            (None, Some(&&(key, value))) => {
                changes.push(Change::Upsert { key, value });
                new.next();
            }
            (Some(&&(old_key, old_value)), Some(&&(key, value))) => {
                if old_key < key {
                    changes.push(Change::Delete { key: old_key });
                    old.next();
                } else if key < old_key {
                    changes.push(Change::Upsert { key, value });
                    new.next();
                } else {
                    if value != old_value {
                        changes.push(Change::Upsert { key, value });
                    }
                    old.next();
                    new.next();
                }
            }
        }
    }
    changes
}

fn shuffle<T>(rng: &mut ChaCha8Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.gen_range(0..=i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep::model::{RestoreChain, apply_changes};

    #[test]
    fn the_liveness_bound_grows_with_the_work_and_stays_at_its_base_for_default_worlds() {
        for seed in 0..300 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            assert_eq!(world.liveness_bound_ms, BASE_LIVENESS_BOUND_MS, "seed {seed}");
        }
        let params = WorldParams {
            tables: Some(4),
            shard_count: Some(64),
            incrementals: Some(50),
            indexes: Some(false),
            ..WorldParams::default()
        };
        let world = World::generate(0, &params);
        assert_eq!(world.chain_len, 51);
        assert_eq!(world.liveness_bound_ms, 4 * 64 * 51 * LIVENESS_BOUND_PER_APPLY_MS);
    }

    #[test]
    fn same_seed_builds_the_same_world() {
        let a = World::generate(42, &WorldParams::sweep_default());
        let b = World::generate(42, &WorldParams::sweep_default());
        assert_eq!(a.objects, b.objects);
        assert_eq!(a.catalog, b.catalog);
        assert_eq!(a.faults, b.faults);
    }

    #[test]
    fn replaying_the_planned_chain_gives_the_oracle() {
        let params = WorldParams { point_in_time_probability: 0.5, ..WorldParams::sweep_default() };
        for seed in 0..60 {
            let world = World::generate(seed, &params);
            let request = world.restore_request();
            let chain = RestoreChain::plan_until(&world.catalog, &request.tables, world.until_ms).unwrap();
            assert_eq!(chain.len(), world.chain_len, "seed {seed}");
            // The segments the client asks for, one after another, plan the same chain.
            let mut segments = Vec::new();
            for call in &world.calls {
                match &call.call {
                    ClientCall::Start(start) if start.op == OPERATION_ID => {
                        let first = RestoreChain::plan_until(&world.catalog, &start.tables, start.until_ms).unwrap();
                        segments.extend(first.backups().iter().cloned());
                    }
                    ClientCall::Continue(next) => {
                        let last = segments.last().map(|m: &BackupManifest| (m.taken_at_ms, m.backup_id)).unwrap();
                        let more = RestoreChain::plan_segment(&next.catalog, &request.tables, last, next.until_ms);
                        segments.extend(more.unwrap().backups().iter().cloned());
                    }
                    // Cancelled before the last segment, which would have gone to the point of the whole restore.
                    ClientCall::Cancel { .. } => {
                        let last = segments.last().map(|m: &BackupManifest| (m.taken_at_ms, m.backup_id)).unwrap();
                        let more = RestoreChain::plan_segment(&world.catalog, &request.tables, last, world.until_ms);
                        segments.extend(more.unwrap().backups().iter().cloned());
                    }
                    _ => {}
                }
            }
            assert_eq!(segments, chain.backups(), "seed {seed}");
            for tablet in world.tablets() {
                let mut rows = Rows::new();
                for manifest in chain.backups() {
                    let object = manifest.object(tablet).unwrap();
                    let bundle = Bundle::decode(object, &world.objects[object]).unwrap();
                    apply_changes(&mut rows, &bundle.changes);
                }
                assert_eq!(rows, world.expected_rows_of(tablet), "seed {seed} {tablet}");
            }
        }
    }

    #[test]
    fn worlds_contain_keys_deleted_then_reinserted_and_an_ignored_older_chain() {
        let mut reinserted = false;
        for seed in 0..20 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            let fulls = world.catalog.iter().filter(|m| m.kind == BackupKind::Full).count();
            assert_eq!(fulls, 2, "seed {seed}: an older full and a newer one");
            let mut deleted = std::collections::BTreeSet::new();
            for backup_id in &world.chain_backup_ids[1..] {
                for tablet in world.tablets().filter(|t| t.table.0 == 0) {
                    let object = BackupManifest::object_name(*backup_id, tablet);
                    for change in Bundle::decode(&object, &world.objects[&object]).unwrap().changes {
                        match change {
                            Change::Delete { key } => {
                                deleted.insert(key);
                            }
                            Change::Upsert { key, .. } => reinserted |= deleted.contains(&key),
                        }
                    }
                }
            }
        }
        assert!(reinserted, "some world deletes a key in one incremental and re-inserts it in a later one");
    }

    #[test]
    fn worlds_have_several_tables_indexes_and_incrementals_empty_for_some_table() {
        let (mut several, mut indexed, mut empty_for_one) = (false, false, false);
        for seed in 0..60 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            several |= world.tables.iter().filter(|t| t.spec.index_of.is_none()).count() > 1;
            indexed |= world.tables.iter().any(|t| t.spec.index_of.is_some());
            for backup_id in &world.chain_backup_ids[1..] {
                let sizes: Vec<usize> = world
                    .tables
                    .iter()
                    .map(|t| {
                        t.spec
                            .tablets()
                            .map(|tablet| {
                                let object = BackupManifest::object_name(*backup_id, tablet);
                                Bundle::decode(&object, &world.objects[&object]).unwrap().changes.len()
                            })
                            .sum()
                    })
                    .collect();
                empty_for_one |= sizes.contains(&0) && sizes.iter().any(|n| *n > 0);
            }
        }
        assert!(several && indexed && empty_for_one, "several {several}, indexed {indexed}, empty {empty_for_one}");
    }

    /// The incremental changes by their definition: a delete for every key gone, an upsert for every key new
    /// or changed, in key order.
    fn diff_by_lookups(before: &Rows, after: &Rows) -> Vec<Change> {
        let mut changes: Vec<Change> = before
            .keys()
            .filter(|key| !after.contains_key(key))
            .map(|&key| Change::Delete { key })
            .chain(
                after
                    .iter()
                    .filter(|(key, value)| before.get(key) != Some(value))
                    .map(|(&key, &value)| Change::Upsert { key, value }),
            )
            .collect();
        changes.sort_by_key(Change::key);
        changes
    }

    fn pairs(rows: &Rows) -> Vec<(Key, Value)> {
        rows.iter().map(|(&k, &v)| (k, v)).collect()
    }

    proptest::proptest! {
        // Cases drawn from a fixed seed: the same on every run.
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0xd1ff),
            ..Default::default()
        })]

        #[test]
        fn the_side_by_side_diff_is_the_diff(
            before in proptest::collection::btree_map(0u64..64, 0u64..4, 0..40),
            after in proptest::collection::btree_map(0u64..64, 0u64..4, 0..40),
        ) {
            proptest::prop_assert_eq!(diff(&pairs(&before), &pairs(&after)), diff_by_lookups(&before, &after));
            proptest::prop_assert_eq!(index_pairs(&pairs(&after)), pairs(&index_rows(&after)));
        }
    }

    #[test]
    fn each_shard_bundle_holds_exactly_the_changes_in_its_range() {
        for seed in 0..20 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            for table in &world.tables {
                for manifest in world.catalog.iter() {
                    for (shard, object) in world_names(manifest, table.spec.id).iter().enumerate() {
                        let bundle = Bundle::decode(object, &world.objects[object]).expect("generated bundles decode");
                        for change in &bundle.changes {
                            let owner = table.shard_map.shard_for(change.key());
                            assert_eq!(owner.0 as usize, shard, "seed {seed}: {object} holds {change:?}");
                        }
                    }
                }
            }
        }
    }

    fn world_names(manifest: &BackupManifest, table: TableId) -> Vec<String> {
        manifest.tables.get(&table).cloned().unwrap_or_default()
    }

    #[test]
    fn index_rows_follow_the_table() {
        let rows: Rows = [(1, 7), (2, 7), (3, 9)].into_iter().collect();
        let index = index_rows(&rows);
        assert_eq!(index.len(), 3, "two rows with one value still have an index row each");
        assert_eq!(index.get(&((7 << 32) | 2)), Some(&2));
    }
}
