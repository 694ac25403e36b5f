//! Scenario files: a world described in TOML instead of drawn from a seed.
//!
//! A scenario declares the tables (shards or key ranges, index tables), the source rows, the backups with the
//! exact changes each carries, the restores a client asks for and what must come of them, other lifecycle
//! calls, fault rates for a seeded mix and faults scheduled at named moments. Or it declares a generated world
//! by parameters and adds calls and faults to it. The format is documented in `scenarios/README.md`.
//!
//! Loading checks everything a run relies on and refuses a bad file with an error naming the file, the line
//! and the problem: unknown keys, wrong types, changes for tables that do not exist, key ranges that overlap
//! or leave a gap, expected rows the backups contradict, and so on.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use lockstep::bundle::Bundle;
use lockstep::coordinator::{CoordinatorConfig, RestoreRequest};
use lockstep::model::{
    BackupKind, BackupManifest, Change, IncrementIndex, Key, KeyRange, Rows, ShardId, ShardMap, SortedRows, TableId,
    TableSpec, TabletId, apply_changes,
};
use lockstep::protocol::{ClientCall, NodeAddr, OperationId};
use lockstep::shard::ShardConfig;
use serde::Deserialize;
use toml::Spanned;

use crate::checkers::Invariant;
use crate::faults::{FaultKind, FaultPlan};
use crate::plan::{Action, CallExpect, FailureExpect, Moment, OpExpect, PlannedCall, REFUSAL_NAMES, ScheduledFault};
use crate::tape::{Chance, Decision, Reboot, Tape};
use crate::world::{
    Bugs, COLLECTION, LostObject, MAX_SHARDS_PER_TABLE, MAX_TABLES, OPERATION_ID, World, WorldParams, WorldTable,
    cancelled_before_failing, continue_calls, index_rows,
};

/// A scenario file that did not load: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.located())]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ScenarioError {
    /// `file:line:column: message`, or `file: message` when the problem has no place in the file.
    fn located(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!("{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        }
    }
}

/// A loaded scenario: a world to build for any seed, and the seeds the test suite pins.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The file's name without its extension.
    pub name: String,
    pub description: String,
    pub seeds: Vec<u64>,
    /// The invariant each pinned seed must break (a kept bug: a regression file of a deliberate bug); `None`
    /// means every invariant must hold.
    pub expect_violation: Option<Invariant>,
    source: Source,
    plan: Plan,
}

#[derive(Clone, Debug)]
enum Source {
    /// Tables and backups spelled out; the same for every seed.
    Explicit(Box<ExplicitWorld>),
    /// Drawn from the seed with these parameters.
    Generated(WorldParams),
}

#[derive(Clone, Debug)]
struct ExplicitWorld {
    tables: Vec<WorldTable>,
    catalog: Arc<[BackupManifest]>,
    objects: Arc<BTreeMap<String, bytes::Bytes>>,
    /// The point in time every restore the scenario starts goes to (`None`: the newest backup).
    until_ms: Option<u64>,
    chain_backup_ids: Vec<u64>,
}

/// Everything a scenario adds to its world, with table names still to resolve for generated worlds.
#[derive(Clone, Debug)]
struct Plan {
    restores: Vec<Spanned<RestoreDecl>>,
    calls: Vec<Spanned<CallDecl>>,
    faults: Option<FaultsDecl>,
    scheduled: Vec<Spanned<FaultDecl>>,
    decisions: Vec<Spanned<DecisionDecl>>,
    coordinator: CoordinatorKnobs,
    shard: ShardKnobs,
    existing_tables: Vec<Spanned<String>>,
    liveness_bound_ms: Option<u64>,
    bugs: Bugs,
    /// The generated world loses an object of its restore chain for good.
    lose_object: bool,
}

// ---------------------------------------------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDecl {
    description: String,
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    /// The invariant every pinned seed must break.
    expect_violation: Option<Spanned<String>>,
    #[serde(default)]
    coordinator: CoordinatorKnobs,
    #[serde(default)]
    shard: ShardKnobs,
    liveness_bound_ms: Option<u64>,
    /// Deliberately broken variants to run with (as `--bug` does).
    #[serde(default)]
    bugs: Vec<Spanned<String>>,
    generate: Option<Spanned<GenerateDecl>>,
    #[serde(default, rename = "table")]
    tables: Vec<Spanned<TableDecl>>,
    /// Tables of the target database that already hold rows.
    #[serde(default)]
    existing_tables: Vec<Spanned<String>>,
    #[serde(default, rename = "backup")]
    backups: Vec<Spanned<BackupDecl>>,
    #[serde(default, rename = "restore")]
    restores: Vec<Spanned<RestoreDecl>>,
    #[serde(default, rename = "call")]
    calls: Vec<Spanned<CallDecl>>,
    faults: Option<FaultsDecl>,
    #[serde(default, rename = "fault")]
    scheduled: Vec<Spanned<FaultDecl>>,
    #[serde(default, rename = "decision")]
    decisions: Vec<Spanned<DecisionDecl>>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorKnobs {
    max_in_flight_shards: Option<u32>,
    max_in_flight_tables: Option<u32>,
    request_timeout_ms: Option<u64>,
    backoff_base_ms: Option<u64>,
    backoff_cap_ms: Option<u64>,
    deadline_ms: Option<u64>,
    increment_deadline_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardKnobs {
    download_chunk_bytes: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateDecl {
    tables: Option<u32>,
    shards: Option<u32>,
    indexes: Option<bool>,
    incrementals: Option<u32>,
    initial_rows: Option<u32>,
    #[serde(default)]
    lose_object: bool,
    /// The world restores to a point in time drawn from the seed, in one to three segments.
    #[serde(default)]
    point_in_time: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableDecl {
    name: Spanned<String>,
    /// Shards cut evenly over `[0, key_space)`; or `ranges`.
    shards: Option<u32>,
    key_space: Option<u64>,
    /// The first key of every shard: starts at 0, strictly increasing; the last shard runs to the end.
    ranges: Option<Spanned<Vec<u64>>>,
    #[serde(default)]
    indexes: Vec<IndexDecl>,
    /// Source rows before the first backup.
    #[serde(default)]
    rows: Vec<(u64, u64)>,
    /// The rows the restore must end with; checked against what the backups say.
    expect_rows: Option<Spanned<Vec<(u64, u64)>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexDecl {
    name: String,
    #[serde(default = "one")]
    shards: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindDecl {
    Full,
    Incremental,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupDecl {
    id: u64,
    kind: KindDecl,
    at_ms: u64,
    /// Changes to the source since the backup before; an incremental carries exactly these.
    #[serde(default, rename = "change")]
    changes: Vec<Spanned<ChangeDecl>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeDecl {
    table: Spanned<String>,
    #[serde(default)]
    upsert: Vec<(u64, u64)>,
    #[serde(default)]
    delete: Vec<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreDecl {
    op: u64,
    /// When the client starts it: this long after the run began, or, with `after_ended`, after that ended.
    #[serde(default)]
    at_ms: u64,
    /// The client waits for this operation to end (durably, Done or Failed) before it starts this one.
    after_ended: Option<Spanned<u64>>,
    collection: Option<String>,
    /// Table names; every table when absent. A table's index tables always come with it.
    tables: Option<Vec<Spanned<String>>>,
    /// The point in time to restore to: the newest full backup taken at or before it, then the incrementals
    /// after that full up to it. The newest backup when absent.
    until_ms: Option<Spanned<u64>>,
    /// A restore in segments: the first restores to the first point, the next to the next, and a last one to
    /// `until_ms` (or the newest backup).
    segments: Option<Spanned<Vec<u64>>>,
    /// How long after a segment has ended the client continues with the next one (default 0).
    continue_after_ms: Option<Spanned<u64>>,
    /// With `segments`: the client cancels the restore instead of asking for its last segment (to `until_ms`).
    cancel: Option<Spanned<bool>>,
    /// For a restore in one go: the client cancels it at this time, racing its end.
    cancel_at_ms: Option<Spanned<u64>>,
    /// With `after_ended` naming the same operation: the client makes this restore only if its cancel of that
    /// operation was answered cancelled.
    if_cancelled: Option<Spanned<u64>>,
    /// `started` or `refused:<refusal>`.
    #[serde(default = "started")]
    expect: Spanned<String>,
    /// For a started restore: `done`, `failed:timeout`, `failed:object-missing` or (with `cancel` or
    /// `cancel_at_ms`) `failed:cancelled`. With `cancel_at_ms` any other outcome is the one the restore must end
    /// with if it ends before the cancel comes.
    #[serde(default = "done")]
    outcome: Spanned<String>,
}

fn started() -> Spanned<String> {
    Spanned::new(0..0, "started".to_string())
}

fn done() -> Spanned<String> {
    Spanned::new(0..0, "done".to_string())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallDecl {
    #[serde(default)]
    at_ms: u64,
    status: Option<u64>,
    forget: Option<u64>,
    cancel: Option<u64>,
    #[serde(default)]
    list: bool,
    /// `answered`, `forgotten`, `cancelled` or `refused:<error>`.
    #[serde(default = "answered")]
    expect: Spanned<String>,
}

fn answered() -> Spanned<String> {
    Spanned::new(0..0, "answered".to_string())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsDecl {
    #[serde(default)]
    heal_at_ms: u64,
    /// Fault kind name -> rate, for the seeded mix.
    #[serde(default)]
    rates: BTreeMap<Spanned<String>, f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultDecl {
    after: Option<AfterDecl>,
    #[serde(rename = "do")]
    action: Spanned<String>,
    tablet: Option<Spanned<String>>,
    increment: Option<u32>,
    /// For truncate-download and corrupt-download: how many downloads (default 1).
    times: Option<u32>,
    /// For lose-object: the object is back once this operation has ended (else it is lost for good).
    until_ended: Option<Spanned<u64>>,
}

/// A fault pinned at a chance of a node (see [`crate::tape`]), or a reboot pinned at a time.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionDecl {
    fault: Spanned<String>,
    node: Spanned<String>,
    nth: Option<u32>,
    at_ms: Option<u64>,
    /// For `message-delay`: how long the message is held (otherwise drawn from the seed).
    delay_ms: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AfterDecl {
    at_ms: Option<u64>,
    started: Option<u64>,
    applied: Option<Spanned<String>>,
    reported: Option<Spanned<String>>,
    increment: Option<u32>,
}

// ---------------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------------

/// Errors before the file name and line are known: a message and the byte range it is about (`None` when the
/// problem has no one place in the file, as a missing section or a limit over the whole world).
#[derive(Debug)]
struct Problem {
    span: Option<Range<usize>>,
    message: String,
}

/// The latest a scenario's faults may heal: faults for longer than this (at a rate of 1.0, say) only fill memory
/// with retries.
pub const MAX_HEAL_AT_MS: u64 = 3_600_000;
/// The longest liveness bound a scenario may set.
pub const MAX_LIVENESS_BOUND_MS: u64 = 86_400_000;

/// The longest delay a `message-delay` decision may pin: ten minutes.
pub const MAX_PINNED_DELAY_MS: u64 = 600_000;

/// The latest a scenario's client may make a call: one day.
pub const MAX_CALL_AT_MS: u64 = 86_400_000;
/// The highest reboot rate a scenario may set, per second: one a millisecond, the closest two random reboots of
/// one kind come (a higher rate would reboot no more often).
pub const MAX_REBOOT_RATE_PER_S: f64 = 1000.0;

fn problem(span: Range<usize>, message: impl Into<String>) -> Problem {
    Problem { span: Some(span), message: message.into() }
}

/// A problem with no one place in the file: reported as `file: message`, with no line or column.
fn unplaced(message: impl Into<String>) -> Problem {
    Problem { span: None, message: message.into() }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::parse(&name, &file, &text)
    }

    /// Checks a scenario given as text; `file` names it in errors.
    pub fn parse(name: &str, file: &str, text: &str) -> Result<Self, ScenarioError> {
        let locate = |p: Problem| {
            let (line, column) = p.span.map_or((0, 0), |span| line_and_column(text, span.start));
            ScenarioError { file: file.to_string(), line, column, message: p.message }
        };
        let decl: FileDecl = toml::from_str(text)
            .map_err(|e| locate(Problem { span: e.span(), message: e.message().trim_end().replace('\n', " ") }))?;
        Self::check(name, decl).map_err(locate)
    }

    fn check(name: &str, decl: FileDecl) -> Result<Self, Problem> {
        if decl.seeds.is_empty() {
            return Err(unplaced("`seeds` must list at least one seed"));
        }
        for fault in &decl.scheduled {
            check_fault_keys(fault)?;
        }
        let source = match &decl.generate {
            Some(generate) => {
                if let Some(table) = decl.tables.first() {
                    return Err(problem(table.span(), "a scenario with [generate] cannot also declare tables"));
                }
                if let Some(backup) = decl.backups.first() {
                    return Err(problem(backup.span(), "a scenario with [generate] cannot also declare backups"));
                }
                let g = generate.get_ref();
                for (name, value, range) in [
                    ("tables", g.tables, 1..=16),
                    ("shards", g.shards, 1..=MAX_SHARDS_PER_TABLE),
                    ("incrementals", g.incrementals, 1..=50),
                    ("initial_rows", g.initial_rows, 1..=100_000),
                ] {
                    if let Some(value) = value
                        && !range.contains(&value)
                    {
                        let (low, high) = range.into_inner();
                        let message = format!("[generate] `{name} = {value}` is out of range: {low} to {high}");
                        return Err(problem(generate.span(), message));
                    }
                }
                // The plan must mean the same thing for every seed: whatever it names must not be drawn.
                let names_tablets = decl
                    .decisions
                    .iter()
                    .any(|d| !matches!(d.get_ref().node.get_ref().as_str(), "coordinator" | "client"));
                let names_tables = names_tablets
                    || decl.scheduled.iter().any(|f| {
                        f.get_ref().tablet.is_some()
                            || f.get_ref().after.as_ref().is_some_and(|a| a.applied.is_some() || a.reported.is_some())
                    })
                    || decl.restores.iter().any(|r| r.get_ref().tables.is_some())
                    || !decl.existing_tables.is_empty();
                if names_tables && (g.tables.is_none() || g.shards.is_none() || g.indexes.is_none()) {
                    return Err(problem(
                        generate.span(),
                        "this scenario names tables or tablets, so [generate] must fix `tables`, `shards` and `indexes` (drawn, they change with the seed)",
                    ));
                }
                if g.lose_object && decl.restores.iter().any(|r| r.get_ref().tables.is_some()) {
                    return Err(problem(
                        generate.span(),
                        "with `lose_object` the lost bundle may belong to any table, so restores must restore every table",
                    ));
                }
                // A generated world draws when its backups are taken: a point in time, and the segments up to it,
                // are drawn too.
                for restore in &decl.restores {
                    let r = restore.get_ref();
                    let key = [
                        ("until_ms", r.until_ms.as_ref().map(Spanned::span)),
                        ("segments", r.segments.as_ref().map(Spanned::span)),
                        ("continue_after_ms", r.continue_after_ms.as_ref().map(Spanned::span)),
                    ]
                    .into_iter()
                    .find_map(|(key, span)| span.map(|span| (key, span)));
                    if let Some((key, span)) = key {
                        return Err(problem(
                            span,
                            format!(
                                "a generated world draws when its backups are taken, so a `[[restore]]` of it takes \
                                 no `{key}`; `[generate] point_in_time = true` restores it to a point drawn from the \
                                 seed, in one to three segments"
                            ),
                        ));
                    }
                    if g.point_in_time {
                        return Err(problem(
                            restore.span(),
                            "with `point_in_time` the generated world plans its own restore (to a point, in segments, \
                             drawn from the seed); leave out `[[restore]]`",
                        ));
                    }
                }
                let names_increments = decl.scheduled.iter().any(|f| {
                    let f = f.get_ref();
                    f.increment.is_some() || f.after.as_ref().is_some_and(|a| a.increment.is_some())
                });
                if names_increments && g.point_in_time {
                    return Err(problem(
                        generate.span(),
                        "with `point_in_time` the chain restored is drawn from the seed, so faults cannot name increments",
                    ));
                }
                if names_increments && g.incrementals.is_none() {
                    return Err(problem(
                        generate.span(),
                        "this scenario names increments, so [generate] must fix `incrementals` (drawn, it changes with the seed)",
                    ));
                }
                Source::Generated(WorldParams {
                    tables: g.tables,
                    shard_count: g.shards,
                    indexes: g.indexes,
                    incrementals: g.incrementals,
                    initial_rows: g.initial_rows,
                    faults: Some(FaultPlan::none()),
                    lost_object_probability: if g.lose_object { 1.0 } else { 0.0 },
                    point_in_time_probability: if g.point_in_time { 1.0 } else { 0.0 },
                    ..WorldParams::default()
                })
            }
            None => Source::Explicit(Box::new(explicit_world(&decl)?)),
        };
        if let (Some(decision), Some(faults)) = (decl.decisions.first(), &decl.faults)
            && !faults.rates.is_empty()
        {
            return Err(problem(
                decision.span(),
                "a scenario with [[decision]] rolls no dice: faults fire only where decisions say, so leave out [faults] rates",
            ));
        }
        if let Some(decision) = decl.decisions.first()
            && decl.faults.as_ref().is_none_or(|faults| faults.heal_at_ms == 0)
        {
            return Err(problem(
                decision.span(),
                "[[decision]] faults fire only before the world heals: set [faults] heal_at_ms past the decisions",
            ));
        }
        if let Some(faults) = &decl.faults
            && faults.heal_at_ms == 0
            && let Some((name, _)) = faults.rates.iter().find(|(name, rate)| {
                // An unknown name, or a rate out of range, is refused as such later. Lost writes are no draw: they
                // follow every crash, healed or not.
                **rate != 0.0
                    && (0.0..=MAX_REBOOT_RATE_PER_S).contains(*rate)
                    && FaultKind::ALL
                        .iter()
                        .any(|kind| kind.name() == name.get_ref() && *kind != FaultKind::DiskLostWrite)
            })
        {
            return Err(problem(
                name.span(),
                format!(
                    "rate of `{}` fires only before the world heals, and it heals at 0 ms: set [faults] heal_at_ms",
                    name.get_ref()
                ),
            ));
        }
        if let Some(faults) = &decl.faults
            && faults.heal_at_ms > MAX_HEAL_AT_MS
        {
            return Err(unplaced(format!(
                "[faults] heal_at_ms {} is more than the most, {MAX_HEAL_AT_MS} (one hour)",
                faults.heal_at_ms
            )));
        }
        if let Some(bound) = decl.liveness_bound_ms
            && bound > MAX_LIVENESS_BOUND_MS
        {
            return Err(unplaced(format!(
                "liveness_bound_ms {bound} is more than the most, {MAX_LIVENESS_BOUND_MS} (one day)"
            )));
        }
        let expect_violation = match &decl.expect_violation {
            None => None,
            Some(name) => Some(Invariant::ALL.into_iter().find(|i| i.name() == name.get_ref()).ok_or_else(|| {
                let known: Vec<&str> = Invariant::ALL.iter().map(|i| i.name()).collect();
                problem(name.span(), format!("unknown invariant `{}`; known: {}", name.get_ref(), known.join(", ")))
            })?),
        };
        let plan = Plan {
            restores: decl.restores,
            calls: decl.calls,
            faults: decl.faults,
            scheduled: decl.scheduled,
            decisions: decl.decisions,
            shard: decl.shard,
            coordinator: decl.coordinator,
            existing_tables: decl.existing_tables,
            liveness_bound_ms: decl.liveness_bound_ms,
            bugs: bugs_of(&decl.bugs)?,
            lose_object: decl.generate.as_ref().is_some_and(|g| g.get_ref().lose_object),
        };
        let scenario = Self {
            name: name.to_string(),
            description: decl.description,
            seeds: decl.seeds,
            expect_violation,
            source,
            plan,
        };
        // Resolve the plan for every pinned seed now, so a bad reference fails at load and not at run time (a
        // `[generate]` world draws its shape from the seed, so a tablet one seed has another may lack).
        for seed in &scenario.seeds {
            scenario
                .try_world(*seed)
                .map_err(|p| Problem { span: p.span, message: format!("with seed {seed}: {}", p.message) })?;
        }
        Ok(scenario)
    }

    /// Whether this scenario builds a world for `seed`, which need not be one it pins (`cargo sim run --scenario F
    /// --seeds N`); the error names what the seed's world lacks.
    pub fn check_seed(&self, seed: u64) -> Result<(), String> {
        self.checked_world(seed).map(drop)
    }

    /// The world of this scenario for `seed`, or what the seed's world lacks, as [`Scenario::check_seed`] says it.
    pub fn checked_world(&self, seed: u64) -> Result<World, String> {
        self.try_world(seed).map_err(|p| format!("scenario {}: with seed {seed}: {}", self.name, p.message))
    }

    /// The deliberate bugs this scenario runs (a kept bug's).
    pub fn bugs(&self) -> Bugs {
        self.plan.bugs
    }

    /// The same scenario with its deliberate bugs taken out and no violation expected: what a kept bug's
    /// world must do under the production protocol.
    pub fn without_bugs(&self) -> Scenario {
        let mut scenario = self.clone();
        scenario.plan.bugs = Bugs::default();
        scenario.expect_violation = None;
        scenario
    }

    /// The world of this scenario for `seed`.
    pub fn world(&self, seed: u64) -> World {
        self.try_world(seed).expect("the plan was checked when the scenario loaded")
    }

    fn try_world(&self, seed: u64) -> Result<World, Problem> {
        let mut world = match &self.source {
            Source::Generated(params) => World::generate(seed, params),
            Source::Explicit(explicit) => {
                let mut world =
                    World::generate(seed, &WorldParams { faults: Some(FaultPlan::none()), ..WorldParams::default() });
                world.tables = explicit.tables.clone();
                world.catalog = explicit.catalog.clone();
                world.objects = explicit.objects.clone();
                world.until_ms = explicit.until_ms;
                world.chain_backup_ids = explicit.chain_backup_ids.clone();
                world.chain_len = u32::try_from(explicit.chain_backup_ids.len()).expect("short chain");
                world.lost_objects.clear();
                world.liveness_bound_ms = world.work_liveness_bound_ms();
                world
            }
        };
        world.seed = seed;
        world.shard = ShardConfig { bug: self.plan.bugs.shard, ..ShardConfig::default() };
        if let Some(bytes) = self.plan.shard.download_chunk_bytes {
            if bytes == 0 {
                return Err(unplaced("[shard] download_chunk_bytes must be at least 1"));
            }
            world.shard.download_chunk_bytes = bytes;
        }
        world.coordinator = self.coordinator_config(&world)?;
        world.coordinator.bug = self.plan.bugs.coordinator;
        world.host_bug = self.plan.bugs.host;
        if let Some(bound) = self.plan.liveness_bound_ms {
            world.liveness_bound_ms = bound;
        }
        world.faults = self.fault_plan()?;
        let generated_loss = world.lost_objects.clone();
        world.lost_objects = if self.plan.lose_object { generated_loss } else { Vec::new() };
        world.scheduled = Vec::new();
        for fault in &self.plan.scheduled {
            self.add_fault(&mut world, fault)?;
        }
        if !self.plan.decisions.is_empty() {
            let decisions: Result<Vec<Decision>, Problem> =
                self.plan.decisions.iter().map(|d| decision_of(&world, d)).collect();
            let decisions = decisions?;
            let mut tape = Tape::from_decisions(decisions.iter().copied());
            for (decl, decision) in self.plan.decisions.iter().zip(&decisions) {
                let Some(delay_ms) = decl.get_ref().delay_ms else { continue };
                match decision {
                    Decision::Chance(chance) if chance.kind == FaultKind::MessageDelay => {
                        if !(1..=MAX_PINNED_DELAY_MS).contains(&delay_ms) {
                            return Err(problem(
                                decl.span(),
                                format!("`delay_ms = {delay_ms}`: a delay is 1 to {MAX_PINNED_DELAY_MS} ms"),
                            ));
                        }
                        tape.delays.insert(*chance, delay_ms);
                    }
                    _ => {
                        return Err(problem(
                            decl.span(),
                            "`delay_ms` pins how long a `message-delay` holds its message; no other decision takes it",
                        ));
                    }
                }
            }
            world.decisions = Some(Arc::new(tape));
        }
        self.add_calls(&mut world)?;
        // The run waits the liveness bound after the last call, so a call must come within a day, like the bound.
        if let Some(late) = world.calls.iter().find(|call| call.at_ms > MAX_CALL_AT_MS) {
            return Err(unplaced(format!(
                "a client call at {} ms is later than the latest, {MAX_CALL_AT_MS} (one day)",
                late.at_ms
            )));
        }
        // A fault that acts on a tablet's downloads or reports, or waits for one to apply or report, never fires
        // on a tablet of a table no restore touches (a reboot of one does fire: its node runs all the same).
        let touched: BTreeSet<TableId> = world
            .calls
            .iter()
            .filter_map(|call| match &call.call {
                ClientCall::Start(request) => Some(request.tables.iter().map(|table| table.id)),
                _ => None,
            })
            .flatten()
            .collect();
        for fault in &self.plan.scheduled {
            let decl = fault.get_ref();
            let acts_on_a_restore = !matches!(decl.action.get_ref().as_str(), "reboot-coordinator" | "reboot-shard");
            let acted_on = decl.tablet.iter().filter(|_| acts_on_a_restore);
            let awaited = decl.after.iter().flat_map(|after| after.applied.iter().chain(after.reported.iter()));
            for name in acted_on.chain(awaited) {
                if !touched.contains(&tablet_named(&world, name)?.table) {
                    return Err(problem(
                        name.span(),
                        format!(
                            "`{}` is a tablet of a table no restore touches: the fault would never fire",
                            name.get_ref()
                        ),
                    ));
                }
            }
        }
        // A fault after the start of an operation no call starts would never fire.
        for fault in &self.plan.scheduled {
            if let Some(op) = fault.get_ref().after.as_ref().and_then(|after| after.started)
                && !world.expected_ops.contains_key(&op)
            {
                let started: Vec<String> = world.expected_ops.keys().map(u64::to_string).collect();
                let started = if started.is_empty() { "none".to_string() } else { started.join(", ") };
                return Err(problem(
                    fault.span(),
                    format!(
                        "`after = {{ started = {op} }}`, but no restore of this scenario starts operation {op} \
                         (started: {started}); the fault would never fire"
                    ),
                ));
            }
        }
        Ok(world)
    }

    fn coordinator_config(&self, world: &World) -> Result<CoordinatorConfig, Problem> {
        let knobs = &self.plan.coordinator;
        let defaults = CoordinatorConfig::default();
        let mut non_empty_tables = BTreeSet::new();
        for name in &self.plan.existing_tables {
            non_empty_tables.insert(table_named(world, name)?.spec.id);
        }
        let config = CoordinatorConfig {
            max_in_flight_shards: knobs.max_in_flight_shards.unwrap_or(defaults.max_in_flight_shards),
            max_in_flight_tables: knobs.max_in_flight_tables.unwrap_or(defaults.max_in_flight_tables),
            request_timeout_ms: knobs.request_timeout_ms.unwrap_or(defaults.request_timeout_ms),
            backoff_base_ms: knobs.backoff_base_ms.unwrap_or(defaults.backoff_base_ms),
            backoff_cap_ms: knobs.backoff_cap_ms.unwrap_or(defaults.backoff_cap_ms),
            deadline_ms: knobs.deadline_ms.unwrap_or(defaults.deadline_ms),
            increment_deadline_ms: knobs.increment_deadline_ms.unwrap_or(defaults.increment_deadline_ms),
            non_empty_tables,
            bug: None,
        };
        if config.max_in_flight_shards == 0 || config.max_in_flight_tables == 0 {
            return Err(unplaced("[coordinator] caps on requests and tables in flight must be at least 1"));
        }
        Ok(config)
    }

    fn fault_plan(&self) -> Result<FaultPlan, Problem> {
        let mut plan = FaultPlan::none();
        let Some(faults) = &self.plan.faults else { return Ok(plan) };
        plan.heal_at_ms = faults.heal_at_ms;
        for (name, rate) in &faults.rates {
            let kind = FaultKind::ALL.iter().find(|k| k.name() == name.get_ref()).ok_or_else(|| {
                let known: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                problem(name.span(), format!("unknown fault kind `{}`; known: {}", name.get_ref(), known.join(", ")))
            })?;
            // Reboots come at a rate per second of simulated time, every other kind with a chance per opportunity.
            let (valid, what) = match kind {
                FaultKind::CoordinatorReboot | FaultKind::ShardReboot => {
                    (0.0..=MAX_REBOOT_RATE_PER_S, "reboots per second from 0 to 1000")
                }
                _ => (0.0..=1.0, "a probability in [0, 1]"),
            };
            // NaN is in no range, and the ranges hold no infinity.
            if !valid.contains(rate) {
                return Err(problem(name.span(), format!("rate {rate} of `{}` is not {what}", kind.name())));
            }
            // Lost writes are not drawn: every crash loses what was not synced. Only 1 says what happens.
            if *kind == FaultKind::DiskLostWrite && *rate != 1.0 {
                return Err(problem(
                    name.span(),
                    format!(
                        "rate {rate} of `disk-lost-write`: a crash always loses the writes not yet synced, so its \
                         rate is 1 or left out (crash-before-sync, the reboots and disk-torn-write decide the rest)"
                    ),
                ));
            }
            plan.set_rate(*kind, *rate);
        }
        Ok(plan)
    }

    fn add_fault(&self, world: &mut World, fault: &Spanned<FaultDecl>) -> Result<(), Problem> {
        let decl = fault.get_ref();
        let span = fault.span();
        let tablet = || -> Result<TabletId, Problem> {
            let name = decl
                .tablet
                .as_ref()
                .ok_or_else(|| problem(span.clone(), format!("`{}` needs a `tablet`", decl.action.get_ref())))?;
            tablet_named(world, name)
        };
        let increment = || -> Result<IncrementIndex, Problem> {
            let increment = decl
                .increment
                .ok_or_else(|| problem(span.clone(), format!("`{}` needs an `increment`", decl.action.get_ref())))?;
            if increment >= world.chain_len {
                return Err(problem(
                    span.clone(),
                    format!("increment {increment} is past the chain of {} increments", world.chain_len),
                ));
            }
            Ok(increment)
        };
        let times = decl.times.unwrap_or(1);
        let action = match decl.action.get_ref().as_str() {
            "reboot-coordinator" => Action::RebootCoordinator,
            "reboot-shard" => Action::RebootShard(tablet()?),
            "drop-reports" => Action::DropReports(tablet()?),
            "truncate-download" => Action::TruncateDownload { tablet: tablet()?, increment: increment()?, times },
            "corrupt-download" => Action::CorruptDownload { tablet: tablet()?, increment: increment()?, times },
            "lose-object" => {
                if decl.after.is_some() {
                    return Err(problem(
                        span,
                        "an object is lost from the start (for good, or `until_ended`); `lose-object` takes no `after`",
                    ));
                }
                let until_end_of = match &decl.until_ended {
                    None => None,
                    Some(op) => Some(self.started_op(op, "`until_ended`")?),
                };
                let (tablet, increment) = (tablet()?, increment()?);
                let object = BackupManifest::object_name(world.chain_backup_ids[increment as usize], tablet);
                world.lost_objects.push(LostObject { increment, tablet, object, until_end_of });
                return Ok(());
            }
            other => return Err(unknown_action(&decl.action, other)),
        };
        let moment = match &decl.after {
            None => Moment::AtMs(0),
            Some(after) => moment_of(world, after, span.clone())?,
        };
        world.scheduled.push(ScheduledFault { moment, action });
        Ok(())
    }

    /// The operation `op` names, which a `[[restore]]` of the file must start.
    fn started_op(&self, op: &Spanned<u64>, key: &str) -> Result<OperationId, Problem> {
        let started = self
            .plan
            .restores
            .iter()
            .any(|r| r.get_ref().op == *op.get_ref() && r.get_ref().expect.get_ref() == "started");
        if !started {
            return Err(problem(
                op.span(),
                format!("{key} names operation {}, which no `[[restore]]` starts", op.get_ref()),
            ));
        }
        Ok(*op.get_ref())
    }

    /// The operation whose cancel `decl`'s restore waits on (its `if_cancelled`): the one it waits to end, which
    /// the file cancels.
    fn if_cancelled(&self, decl: &RestoreDecl) -> Result<Option<OperationId>, Problem> {
        let Some(op) = &decl.if_cancelled else { return Ok(None) };
        if decl.after_ended.as_ref().map(|a| *a.get_ref()) != Some(*op.get_ref()) {
            return Err(problem(
                op.span(),
                format!(
                    "`if_cancelled = {0}` restores again once operation {0}, cancelled, has ended: add `after_ended = {0}`",
                    op.get_ref()
                ),
            ));
        }
        let cancelled_by_restore = self.plan.restores.iter().any(|r| {
            let r = r.get_ref();
            r.op == *op.get_ref() && (r.cancel_at_ms.is_some() || r.cancel.as_ref().is_some_and(|c| *c.get_ref()))
        });
        let cancelled_by_call = self.plan.calls.iter().any(|c| c.get_ref().cancel == Some(*op.get_ref()));
        if !cancelled_by_restore && !cancelled_by_call {
            return Err(problem(
                op.span(),
                format!(
                    "nothing in the file cancels operation {}: give it `cancel_at_ms` or `cancel = true`",
                    op.get_ref()
                ),
            ));
        }
        Ok(Some(*op.get_ref()))
    }

    fn add_calls(&self, world: &mut World) -> Result<(), Problem> {
        let mut calls: Vec<PlannedCall> = Vec::new();
        let mut expected_ops = BTreeMap::new();
        let restores: Vec<&Spanned<RestoreDecl>> = self.plan.restores.iter().collect();
        if restores.is_empty() {
            // No restore declared: restore every table once, at time zero (a generated world drawn to restore to a
            // point in time does so in the segments it drew).
            let request = world.restore_request();
            let expect = match world.lost_objects.first() {
                Some(lost) => {
                    OpExpect::Failed(FailureExpect::ObjectMissing { increment: lost.increment, tablet: lost.tablet })
                }
                None => OpExpect::Done,
            };
            let (points, cancel) = match &self.source {
                Source::Generated(_) => drawn_plan(world),
                Source::Explicit(_) => (vec![world.until_ms], false),
            };
            let start = PlannedCall::at(0, ClientCall::Start(request), CallExpect::Started);
            let (planned, expect) = in_segments(world, start, &points, &expect, 0, cancel);
            calls.extend(planned);
            expected_ops.insert(OPERATION_ID, expect);
        }
        let mut ops = BTreeSet::new();
        for restore in restores {
            let decl = restore.get_ref();
            let tables = match &decl.tables {
                None => world.tables.iter().map(|t| t.spec.clone()).collect(),
                Some(names) => {
                    let mut specs: Vec<TableSpec> = Vec::new();
                    for name in names {
                        let table = table_named(world, name)?;
                        if table.spec.index_of.is_some() {
                            return Err(problem(
                                name.span(),
                                format!("`{}` is an index table; restore its table", name.get_ref()),
                            ));
                        }
                        specs.push(table.spec.clone());
                        specs.extend(
                            world
                                .tables
                                .iter()
                                .filter(|t| t.spec.index_of == Some(table.spec.id))
                                .map(|t| t.spec.clone()),
                        );
                    }
                    specs
                }
            };
            let request = RestoreRequest {
                op: decl.op,
                collection: decl.collection.clone().unwrap_or_else(|| COLLECTION.to_string()),
                tables,
                catalog: world.catalog.clone(),
                until_ms: decl.until_ms.as_ref().map(|u| *u.get_ref()),
                last_segment: true,
            };
            let expect =
                call_expect(&decl.expect, "started", &REFUSAL_NAMES, CallExpect::Started, CallExpect::StartRefused)?;
            let mut op_expect = OpExpect::Done;
            if expect == CallExpect::Started {
                if !ops.insert(decl.op) {
                    return Err(problem(restore.span(), format!("operation {} is started twice", decl.op)));
                }
                op_expect = outcome(world, &request, &decl.outcome)?;
            }
            let points = segment_points(world, decl, &expect)?;
            let cancel = decl.cancel.as_ref().is_some_and(|c| *c.get_ref());
            match (&decl.cancel, decl.segments.is_some(), &op_expect) {
                (Some(flag), false, _) => {
                    return Err(problem(
                        flag.span(),
                        "`cancel` gives up a restore in `segments` before its last one; add `segments` or remove it",
                    ));
                }
                (_, _, OpExpect::Failed(FailureExpect::Cancelled)) if !cancel && decl.cancel_at_ms.is_none() => {
                    return Err(problem(
                        decl.outcome.span(),
                        "outcome `failed:cancelled` needs `cancel = true` (the client cancels before the last segment) \
                         or `cancel_at_ms` (the client cancels at that time)",
                    ));
                }
                (Some(flag), true, OpExpect::Done) if cancel => {
                    return Err(problem(
                        flag.span(),
                        "a restore the client cancels cannot end done; set `outcome = \"failed:cancelled\"`",
                    ));
                }
                _ => {}
            }
            let after_end_of = match &decl.after_ended {
                Some(op) if *op.get_ref() == decl.op => {
                    return Err(problem(op.span(), format!("operation {} cannot wait for its own end", decl.op)));
                }
                Some(op) => Some(self.started_op(op, "`after_ended`")?),
                None => None,
            };
            let if_cancelled = self.if_cancelled(decl)?;
            let call = ClientCall::Start(request);
            let started = expect == CallExpect::Started;
            let start =
                PlannedCall { at_ms: decl.at_ms, after_end_of, after_segment: None, if_cancelled, call, expect };
            let continue_after_ms = decl.continue_after_ms.as_ref().map_or(0, |ms| *ms.get_ref());
            let (planned, mut op_expect) = in_segments(world, start, &points, &op_expect, continue_after_ms, cancel);
            calls.extend(planned);
            if let Some(cancel_at) = &decl.cancel_at_ms {
                let (call, expect) = cancel_at_a_time(decl, cancel_at, started, op_expect)?;
                calls.push(call);
                op_expect = expect;
            }
            if started {
                expected_ops.insert(decl.op, op_expect);
            }
        }
        for call in &self.plan.calls {
            let decl = call.get_ref();
            let client_call = match (decl.status, decl.forget, decl.cancel, decl.list) {
                (Some(op), None, None, false) => ClientCall::Status { op },
                (None, Some(op), None, false) => ClientCall::Forget { op },
                (None, None, Some(op), false) => ClientCall::Cancel { op },
                (None, None, None, true) => ClientCall::List,
                _ => {
                    return Err(problem(
                        call.span(),
                        "a call is exactly one of `status = <op>`, `forget = <op>`, `cancel = <op>`, `list = true`",
                    ));
                }
            };
            let expect = match (&client_call, decl.expect.get_ref().as_str()) {
                (_, "answered") => CallExpect::Answered,
                (ClientCall::Forget { .. }, _) => call_expect(
                    &decl.expect,
                    "forgotten",
                    &["not-found", "still-running"],
                    CallExpect::Forgotten,
                    CallExpect::ForgetRefused,
                )?,
                (ClientCall::Cancel { .. }, _) => call_expect(
                    &decl.expect,
                    "cancelled",
                    &["not-found", "already-ended"],
                    CallExpect::Cancelled,
                    CallExpect::CancelRefused,
                )?,
                // A status is refused only for an operation it does not know.
                (ClientCall::Status { .. }, _) => call_expect(
                    &decl.expect,
                    "answered",
                    &["not-found"],
                    CallExpect::Answered,
                    CallExpect::StatusRefused,
                )?,
                (_, other) => {
                    return Err(problem(
                        decl.expect.span(),
                        format!("a `list` call is always answered: expected `answered`, found `{other}`"),
                    ));
                }
            };
            calls.push(PlannedCall::at(decl.at_ms, client_call, expect));
        }
        world.calls = client_order(calls)?;
        world.expected_ops = expected_ops;
        Ok(())
    }
}

/// The point each segment of a `[[restore]]` goes to, in order: its `segments`, then its `until_ms` (`None`: the
/// newest backup); one point for a restore in one go. Refuses points that decrease, go past `until_ms`, or do not
/// reach the full backup the restore starts from (a later segment cannot pass a full backup: its start would be
/// refused, or a continue), and what a restore in segments cannot expect.
fn segment_points(world: &World, decl: &RestoreDecl, expect: &CallExpect) -> Result<Vec<Option<u64>>, Problem> {
    let until_ms = decl.until_ms.as_ref().map(|u| *u.get_ref());
    let Some(segments) = &decl.segments else {
        if let Some(after) = &decl.continue_after_ms {
            return Err(problem(
                after.span(),
                "`continue_after_ms` is for a restore in `segments`; remove it (it would be ignored)",
            ));
        }
        return Ok(vec![until_ms]);
    };
    let span = segments.span();
    let points = segments.get_ref();
    if *expect != CallExpect::Started {
        return Err(problem(span, "a restore expected refused never starts, so it has no segments; remove `segments`"));
    }
    let Some(&first) = points.first() else {
        return Err(problem(span, "`segments = []` lists no point; leave it out for a restore in one go"));
    };
    if let Some(pair) = points.windows(2).find(|pair| pair[1] < pair[0]) {
        return Err(problem(
            span,
            format!("segment points must not decrease: {} ms comes after {} ms", pair[1], pair[0]),
        ));
    }
    if let Some(until_ms) = until_ms
        && let Some(point) = points.iter().find(|&&point| point > until_ms)
    {
        return Err(problem(
            span,
            format!(
                "segment point {point} ms is after `until_ms = {until_ms}`: a segment cannot go past the point of \
                 the whole restore"
            ),
        ));
    }
    let full = world.chain_backup_ids.first().and_then(|id| world.catalog.iter().find(|m| m.backup_id == *id));
    if let Some(full) = full
        && first < full.taken_at_ms
    {
        let to = until_ms.map_or_else(|| "the newest backup".to_string(), |ms| format!("{ms} ms"));
        return Err(problem(
            span,
            format!(
                "the first segment restores to {first} ms, before full backup {} (at {} ms), which a restore to \
                 {to} starts from: a later segment cannot pass a full backup, so the first must reach it",
                full.backup_id, full.taken_at_ms
            ),
        ));
    }
    if decl.outcome.get_ref() == "failed:timeout" {
        return Err(problem(
            decl.outcome.span(),
            "which segment a timeout ends is up to the run, so a restore in `segments` cannot expect `failed:timeout`",
        ));
    }
    Ok(points.iter().map(|&point| Some(point)).chain([until_ms]).collect())
}

/// The points of the segments a generated world drew for its own restore (operation 1), in order, and whether
/// the client cancels it instead of asking for the last one.
fn drawn_plan(world: &World) -> (Vec<Option<u64>>, bool) {
    let mut points: Vec<Option<u64>> = world
        .calls
        .iter()
        .filter_map(|call| match &call.call {
            ClientCall::Start(request) if request.op == OPERATION_ID => Some(request.until_ms),
            ClientCall::Continue(request) if request.op == OPERATION_ID => Some(request.until_ms),
            _ => None,
        })
        .collect();
    let cancel = world.cancels();
    if cancel {
        points.push(world.until_ms);
    }
    if points.is_empty() { (vec![world.until_ms], false) } else { (points, cancel) }
}

/// `start`, a start call, made a restore in segments to `points` (one per segment): its request goes to the
/// first, and a continue follows for every further one. An operation that must fail at a lost object finds every
/// continue after that object's segment refused, as it has ended.
fn in_segments(
    world: &World,
    mut start: PlannedCall,
    points: &[Option<u64>],
    op_expect: &OpExpect,
    continue_after_ms: u64,
    cancel: bool,
) -> (Vec<PlannedCall>, OpExpect) {
    let ClientCall::Start(request) = &mut start.call else { return (vec![start], op_expect.clone()) };
    request.until_ms = points.first().copied().flatten();
    request.last_segment = points.len() <= 1;
    let (op, catalog) = (request.op, request.catalog.clone());
    let taken_at_ms: Vec<u64> = world
        .chain_backup_ids
        .iter()
        .map(|id| world.catalog.iter().find(|m| m.backup_id == *id).map_or(0, |m| m.taken_at_ms))
        .collect();
    let fails_at = match op_expect {
        OpExpect::Failed(FailureExpect::ObjectMissing { increment, .. }) => Some(*increment),
        _ => None,
    };
    let mut calls = vec![start];
    calls.extend(continue_calls(op, &catalog, points, &taken_at_ms, fails_at, continue_after_ms, cancel));
    let op_expect = if cancel && cancelled_before_failing(points, &taken_at_ms, fails_at) {
        OpExpect::Failed(FailureExpect::Cancelled)
    } else {
        op_expect.clone()
    };
    (calls, op_expect)
}

/// The cancel of `decl`'s restore in one go at `cancel_at` (its `cancel_at_ms`), and how the restore must then end
/// given `op_expect`, how it must end otherwise: cancelled when the file says `failed:cancelled` (the cancel must
/// then come first), else cancelled or, if it ended before the cancel came, as the file says.
fn cancel_at_a_time(
    decl: &RestoreDecl,
    cancel_at: &Spanned<u64>,
    started: bool,
    op_expect: OpExpect,
) -> Result<(PlannedCall, OpExpect), Problem> {
    let why = if decl.segments.is_some() {
        Some("`cancel_at_ms` cancels a restore in one go; a restore in `segments` is cancelled with `cancel = true`")
    } else if decl.after_ended.is_some() {
        Some(
            "`cancel_at_ms` is a time from the run's start, and a restore with `after_ended` starts at a time not known in advance",
        )
    } else if !started {
        Some("a refused restore has nothing to cancel: remove `cancel_at_ms`")
    } else if *cancel_at.get_ref() < decl.at_ms {
        Some("`cancel_at_ms` comes before the restore starts (`at_ms`)")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(problem(cancel_at.span(), why));
    }
    let call = ClientCall::Cancel { op: decl.op };
    Ok(if op_expect == OpExpect::Failed(FailureExpect::Cancelled) {
        (PlannedCall::at(*cancel_at.get_ref(), call, CallExpect::Cancelled), op_expect)
    } else {
        (
            PlannedCall::at(*cancel_at.get_ref(), call, CallExpect::CancelledOrEnded),
            OpExpect::CancelRace(Box::new(op_expect)),
        )
    })
}

/// The order the client makes its calls in, one after another: those at a time in time order, then those that
/// wait (for an operation, or a segment of one, to end) in the order of their delays, the file's order breaking
/// ties, each once what it waits for has been asked: the start of that operation, and its continues up to that
/// segment (every one, for its end).
fn client_order(mut calls: Vec<PlannedCall>) -> Result<Vec<PlannedCall>, Problem> {
    let waits = |call: &PlannedCall| call.after_end_of.is_some() || call.after_segment.is_some();
    calls.sort_by_key(|call| (waits(call), call.at_ms));
    // The operation and segment a call asks to run: 1 for a start, the segment of a continue (or of a cancel in
    // its place).
    let asks = |call: &PlannedCall| match (&call.call, call.after_segment) {
        (ClientCall::Start(request), _) if call.expect == CallExpect::Started => Some((request.op, 1)),
        (ClientCall::Continue(request), _) => Some((request.op, request.segment)),
        // A cancel in place of a segment ends the operation there: what waits for its end comes after it.
        (ClientCall::Cancel { op }, Some((_, segment))) => Some((*op, segment + 1)),
        _ => None,
    };
    let every: BTreeSet<(OperationId, u32)> = calls.iter().filter_map(asks).collect();
    let (mut ordered, mut waiting): (Vec<PlannedCall>, Vec<PlannedCall>) = calls.into_iter().partition(|c| !waits(c));
    let mut asked: BTreeSet<(OperationId, u32)> = ordered.iter().filter_map(asks).collect();
    while !waiting.is_empty() {
        let ready = |call: &PlannedCall| match (call.after_segment, call.after_end_of) {
            (Some(segment), _) => asked.contains(&segment),
            (None, Some(op)) => every.iter().filter(|(o, _)| *o == op).all(|asks| asked.contains(asks)),
            (None, None) => true,
        };
        let Some(next) = waiting.iter().position(ready) else {
            let ops: BTreeSet<String> =
                waiting.iter().filter_map(|c| c.after_end_of).map(|op| op.to_string()).collect();
            return Err(unplaced(format!(
                "the client would wait forever: each restore left waits for another to end (operations {})",
                ops.into_iter().collect::<Vec<_>>().join(", ")
            )));
        };
        let call = waiting.remove(next);
        asked.extend(asks(&call));
        ordered.push(call);
    }
    Ok(ordered)
}

/// The actions a `[[fault]]` may take.
const ACTIONS: &str =
    "reboot-coordinator, reboot-shard, drop-reports, truncate-download, corrupt-download, lose-object";

fn unknown_action(action: &Spanned<String>, name: &str) -> Problem {
    problem(action.span(), format!("unknown action `{name}`; known: {ACTIONS}"))
}

/// Refuses a `[[fault]]` key its action does not use (it would be ignored) and a fault that could never fire.
fn check_fault_keys(fault: &Spanned<FaultDecl>) -> Result<(), Problem> {
    let decl = fault.get_ref();
    let action = decl.action.get_ref().as_str();
    // Which of `tablet`, `increment`, `times` the action takes.
    let (tablet, increment, times) = match action {
        "reboot-coordinator" => (false, false, false),
        "reboot-shard" | "drop-reports" => (true, false, false),
        "truncate-download" | "corrupt-download" => (true, true, true),
        "lose-object" => (true, true, false),
        other => return Err(unknown_action(&decl.action, other)),
    };
    let not_taken = |key: &str| format!("`{action}` takes no `{key}`; remove it (it would be ignored)");
    if let Some(name) = decl.tablet.as_ref().filter(|_| !tablet) {
        return Err(problem(name.span(), not_taken("tablet")));
    }
    if decl.increment.is_some() && !increment {
        return Err(problem(fault.span(), not_taken("increment")));
    }
    if decl.times.is_some() && !times {
        return Err(problem(fault.span(), not_taken("times")));
    }
    if let Some(op) = decl.until_ended.as_ref().filter(|_| action != "lose-object") {
        return Err(problem(op.span(), not_taken("until_ended")));
    }
    if decl.times == Some(0) {
        return Err(problem(
            fault.span(),
            format!("`times = 0`: this `{action}` would never fire; give how many downloads it hits, 1 or more"),
        ));
    }
    Ok(())
}

/// The kinds of fault a decision may pin, with what they need.
const DECIDED_KINDS: &str = "coordinator-reboot, shard-reboot (with `at_ms`); message-drop, message-duplicate, \
     message-delay, crash-before-sync, crash-after-persist, disk-torn-write, download-partial, download-truncated, \
     download-corrupt, store-unavailable, store-throttled, store-slow (with `nth`)";

fn decision_of(world: &World, decl: &Spanned<DecisionDecl>) -> Result<Decision, Problem> {
    let d = decl.get_ref();
    let span = decl.span();
    let kind = FaultKind::ALL.iter().copied().find(|k| k.name() == d.fault.get_ref()).ok_or_else(|| {
        problem(
            d.fault.span(),
            format!("unknown fault `{}`; a decision pins one of: {DECIDED_KINDS}", d.fault.get_ref()),
        )
    })?;
    let node = match d.node.get_ref().as_str() {
        "coordinator" => NodeAddr::Coordinator,
        "client" => NodeAddr::Client,
        _ => NodeAddr::Shard(tablet_named(world, &d.node)?),
    };
    let on_shard = matches!(node, NodeAddr::Shard(_));
    let fits = match kind {
        FaultKind::CoordinatorReboot => node == NodeAddr::Coordinator,
        FaultKind::ShardReboot => on_shard,
        FaultKind::MessageDrop | FaultKind::MessageDuplicate | FaultKind::MessageDelay => true,
        FaultKind::CrashBeforeSync | FaultKind::CrashAfterPersist | FaultKind::DiskTornWrite => {
            node != NodeAddr::Client
        }
        FaultKind::DownloadPartial
        | FaultKind::DownloadTruncated
        | FaultKind::DownloadCorrupt
        | FaultKind::StoreUnavailable
        | FaultKind::StoreThrottled
        | FaultKind::StoreSlow => on_shard,
        FaultKind::DiskLostWrite => {
            return Err(problem(
                d.fault.span(),
                "`disk-lost-write` follows from a crash and is not decided on its own; pin the crash instead",
            ));
        }
    };
    if !fits {
        return Err(problem(d.node.span(), format!("`{kind}` cannot happen at `{}`", d.node.get_ref())));
    }
    let reboot = matches!(kind, FaultKind::CoordinatorReboot | FaultKind::ShardReboot);
    match (reboot, d.nth, d.at_ms) {
        (true, None, Some(at_ms)) if at_ms >= world.faults.heal_at_ms => Err(problem(
            span,
            format!(
                "a `{kind}` decision at {at_ms} ms would never fire: the world heals at {} ms ([faults] heal_at_ms)",
                world.faults.heal_at_ms
            ),
        )),
        (true, None, Some(at_ms)) => Ok(Decision::Reboot(Reboot { at_ms, node })),
        (false, Some(nth), None) => Ok(Decision::Chance(Chance { node, kind, nth })),
        (true, _, _) => Err(problem(span, format!("a `{kind}` decision gives `at_ms` (when), and no `nth`"))),
        (false, _, _) => Err(problem(span, format!("a `{kind}` decision gives `nth` (which chance), and no `at_ms`"))),
    }
}

fn bugs_of(names: &[Spanned<String>]) -> Result<Bugs, Problem> {
    let mut bugs = Bugs::default();
    for name in names {
        let one = crate::catalog::parse(&[name.get_ref().as_str()]).map_err(|e| problem(name.span(), e))?;
        bugs.coordinator = one.coordinator.or(bugs.coordinator);
        bugs.shard = one.shard.or(bugs.shard);
    }
    Ok(bugs)
}

/// Parses `success` or `refused:<name>` with `name` one of `names`.
fn call_expect(
    text: &Spanned<String>,
    success_word: &str,
    names: &[&str],
    success: CallExpect,
    refused: impl Fn(String) -> CallExpect,
) -> Result<CallExpect, Problem> {
    let value = text.get_ref();
    if value == success_word {
        return Ok(success);
    }
    match value.strip_prefix("refused:") {
        Some(name) if names.contains(&name) => Ok(refused(name.to_string())),
        _ => Err(problem(
            text.span(),
            format!("expected `{success_word}` or `refused:<{}>`, found `{value}`", names.join("|")),
        )),
    }
}

fn outcome(world: &World, request: &RestoreRequest, text: &Spanned<String>) -> Result<OpExpect, Problem> {
    match text.get_ref().as_str() {
        "done" => Ok(OpExpect::Done),
        "failed:timeout" => Ok(OpExpect::Failed(FailureExpect::Timeout)),
        "failed:cancelled" => Ok(OpExpect::Failed(FailureExpect::Cancelled)),
        "failed:object-missing" => {
            let tablets: Vec<TabletId> = request.tables.iter().flat_map(TableSpec::tablets).collect();
            let lost = world.lost_objects.iter().filter(|l| tablets.contains(&l.tablet)).min_by_key(|l| l.increment);
            let lost = lost.ok_or_else(|| {
                problem(text.span(), "outcome `failed:object-missing`, but no object this restore reads is lost (add a `lose-object` fault)")
            })?;
            Ok(OpExpect::Failed(FailureExpect::ObjectMissing { increment: lost.increment, tablet: lost.tablet }))
        }
        other => Err(problem(
            text.span(),
            format!(
                "unknown outcome `{other}`; expected done, failed:timeout, failed:object-missing or failed:cancelled"
            ),
        )),
    }
}

fn moment_of(world: &World, after: &AfterDecl, span: Range<usize>) -> Result<Moment, Problem> {
    let reported_or_applied = |name: &Spanned<String>| -> Result<(TabletId, IncrementIndex), Problem> {
        let tablet = tablet_named(world, name)?;
        let increment =
            after.increment.ok_or_else(|| problem(span.clone(), "`after` names a tablet but no `increment`"))?;
        if increment >= world.chain_len {
            return Err(problem(
                span.clone(),
                format!(
                    "`after` names increment {increment}, past the chain of {} increments: the fault would never fire",
                    world.chain_len
                ),
            ));
        }
        Ok((tablet, increment))
    };
    if after.increment.is_some() && after.applied.is_none() && after.reported.is_none() {
        return Err(problem(
            span,
            "`after` takes `increment` only with `applied` or `reported`; remove it (it would be ignored)",
        ));
    }
    match (after.at_ms, after.started, &after.applied, &after.reported) {
        (Some(at), None, None, None) => Ok(Moment::AtMs(at)),
        (None, Some(op), None, None) => Ok(Moment::Started { op }),
        (None, None, Some(name), None) => {
            let (tablet, increment) = reported_or_applied(name)?;
            Ok(Moment::Applied { tablet, increment })
        }
        (None, None, None, Some(name)) => {
            let (tablet, increment) = reported_or_applied(name)?;
            Ok(Moment::Reported { tablet, increment })
        }
        _ => Err(problem(
            span,
            "`after` is exactly one of `at_ms = <ms>`, `started = <op>`, `applied = \"<table>/<shard>\"`, `reported = \"<table>/<shard>\"`",
        )),
    }
}

fn table_named<'w>(world: &'w World, name: &Spanned<String>) -> Result<&'w WorldTable, Problem> {
    world.tables.iter().find(|t| t.spec.name == *name.get_ref()).ok_or_else(|| {
        let known: Vec<&str> = world.tables.iter().map(|t| t.spec.name.as_str()).collect();
        problem(name.span(), format!("no table named `{}`; tables: {}", name.get_ref(), known.join(", ")))
    })
}

/// Resolves `<table>/<shard>` (the table name may itself hold a `/`, as index tables' names do).
fn tablet_named(world: &World, name: &Spanned<String>) -> Result<TabletId, Problem> {
    let text = name.get_ref();
    let Some((table, shard)) = text.rsplit_once('/') else {
        return Err(problem(name.span(), format!("`{text}` is not `<table>/<shard>`")));
    };
    let table = table_named(world, &Spanned::new(name.span(), table.to_string()))?;
    let shard: u32 =
        shard.parse().map_err(|_| problem(name.span(), format!("`{shard}` in `{text}` is not a shard number")))?;
    if shard >= table.spec.shard_count {
        return Err(problem(
            name.span(),
            format!("table `{}` has {} shard(s), no shard {shard}", table.spec.name, table.spec.shard_count),
        ));
    }
    Ok(TabletId { table: table.spec.id, shard: ShardId(shard) })
}

/// Builds the tables, the backups and their bundles of a scenario that spells them out.
fn explicit_world(decl: &FileDecl) -> Result<ExplicitWorld, Problem> {
    if decl.tables.is_empty() {
        return Err(unplaced("a scenario declares at least one [[table]] (or a [generate] section)"));
    }
    // Tables, each followed by its index tables.
    let mut tables: Vec<(TableSpec, ShardMap)> = Vec::new();
    let mut base_of: BTreeMap<TableId, usize> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (base, table) in decl.tables.iter().enumerate() {
        let t = table.get_ref();
        let id = TableId(u32::try_from(tables.len()).expect("few tables"));
        let shard_map = shard_map_of(table)?;
        if !names.insert(t.name.get_ref().clone()) {
            return Err(problem(t.name.span(), format!("table `{}` is declared twice", t.name.get_ref())));
        }
        tables.push((
            TableSpec { id, name: t.name.get_ref().clone(), shard_count: shard_map.shard_count(), index_of: None },
            shard_map,
        ));
        base_of.insert(id, base);
        if tables.len() + t.indexes.len() > MAX_TABLES {
            let message = format!(
                "at most {MAX_TABLES} tables are allowed, index tables included; with `{}` there are {}",
                t.name.get_ref(),
                tables.len() + t.indexes.len()
            );
            return Err(problem(table.span(), message));
        }
        for index in &t.indexes {
            let index_id = TableId(u32::try_from(tables.len()).expect("few tables"));
            let name = format!("{}/{}", t.name.get_ref(), index.name);
            if !names.insert(name.clone()) {
                return Err(problem(table.span(), format!("index `{name}` is declared twice")));
            }
            if index.shards == 0 || index.shards > MAX_SHARDS_PER_TABLE {
                let message =
                    format!("index `{name}` has {} shards; 1 to {MAX_SHARDS_PER_TABLE} are allowed", index.shards);
                return Err(problem(table.span(), message));
            }
            let spec = TableSpec { id: index_id, name, shard_count: index.shards, index_of: Some(id) };
            tables.push((spec, ShardMap::even(index.shards, Key::MAX)));
            base_of.insert(index_id, base);
        }
    }
    // The source of every base table through the backups.
    let mut sources: Vec<Rows> = Vec::new();
    for table in &decl.tables {
        let t = table.get_ref();
        let mut rows = Rows::new();
        for (key, value) in &t.rows {
            if rows.insert(*key, *value).is_some() {
                return Err(problem(
                    table.span(),
                    format!("table `{}` lists key {key} twice in `rows`", t.name.get_ref()),
                ));
            }
        }
        if !t.indexes.is_empty() {
            check_indexable(&rows, table.span(), t.name.get_ref())?;
        }
        sources.push(rows);
    }
    if decl.backups.is_empty() {
        return Err(unplaced("a scenario declares at least one [[backup]]"));
    }
    let until = point_of(&decl.restores)?;
    let until_ms = until.as_ref().map(|u| *u.get_ref());
    // The last backup restored: the newest taken at or before the point (the file's order is time order, as the
    // loop below checks).
    let target = decl.backups.iter().rposition(|b| until_ms.is_none_or(|u| b.get_ref().at_ms <= u));
    let Some(target) = target else {
        let until = until.expect("every backup is at or before no point");
        return Err(problem(
            until.span(),
            format!("`until_ms = {}` is before every backup: there is nothing to restore to", until.get_ref()),
        ));
    };
    // Each base table's source when the last backup restored was taken.
    let mut at_point: Vec<Rows> = Vec::new();
    let mut ids = BTreeSet::new();
    let mut last_at: Option<u64> = None;
    let mut catalog = Vec::new();
    let mut objects = BTreeMap::new();
    let mut previous: Option<Vec<Rows>> = None;
    for backup in &decl.backups {
        let b = backup.get_ref();
        if !ids.insert(b.id) {
            return Err(problem(backup.span(), format!("backup id {} is used twice", b.id)));
        }
        if last_at.is_some_and(|at| b.at_ms <= at) {
            return Err(problem(
                backup.span(),
                format!("backup {} is not later than the backup before it (at_ms must increase)", b.id),
            ));
        }
        last_at = Some(b.at_ms);
        // Changes per base table, in the order the file gives them.
        let mut changes: BTreeMap<usize, Vec<Change>> = BTreeMap::new();
        // The keys each base table's changes name in this backup, and in which list.
        let mut touched: BTreeMap<usize, BTreeMap<u64, &str>> = BTreeMap::new();
        for change in &b.changes {
            let c = change.get_ref();
            let position = tables.iter().position(|(spec, _)| spec.name == *c.table.get_ref()).ok_or_else(|| {
                problem(
                    c.table.span(),
                    format!("backup {} changes table `{}`, which is not declared", b.id, c.table.get_ref()),
                )
            })?;
            let (spec, _) = &tables[position];
            if spec.index_of.is_some() {
                return Err(problem(
                    c.table.span(),
                    format!("`{}` is an index table: it follows its table, change that instead", spec.name),
                ));
            }
            let base = base_of[&spec.id];
            // Each key changes at most once per backup and table: a second change of it would silently win.
            let touched = touched.entry(base).or_default();
            let deletes = c.delete.iter().map(|&key| (key, "delete"));
            for (key, field) in deletes.chain(c.upsert.iter().map(|&(key, _)| (key, "upsert"))) {
                match touched.insert(key, field) {
                    None => {}
                    Some(before) if before == field => {
                        return Err(problem(
                            change.span(),
                            format!("backup {} lists key {key} of `{}` twice in `{field}`", b.id, spec.name),
                        ));
                    }
                    Some(_) => {
                        return Err(problem(
                            change.span(),
                            format!("backup {} both upserts and deletes key {key} of `{}`", b.id, spec.name),
                        ));
                    }
                }
            }
            let list = changes.entry(base).or_default();
            list.extend(c.delete.iter().map(|&key| Change::Delete { key }));
            list.extend(c.upsert.iter().map(|&(key, value)| Change::Upsert { key, value }));
        }
        for (base, list) in &changes {
            apply_changes(&mut sources[*base], list);
            if !decl.tables[*base].get_ref().indexes.is_empty() {
                check_indexable(&sources[*base], backup.span(), decl.tables[*base].get_ref().name.get_ref())?;
            }
        }
        let kind = match b.kind {
            KindDecl::Full => BackupKind::Full,
            KindDecl::Incremental => BackupKind::Incremental,
        };
        let mut manifest_tables = BTreeMap::new();
        for (spec, shard_map) in &tables {
            let base = base_of[&spec.id];
            let table_changes: Vec<Change> = match (kind, spec.index_of.is_some()) {
                (BackupKind::Full, false) => {
                    sources[base].iter().map(|(&key, &value)| Change::Upsert { key, value }).collect()
                }
                (BackupKind::Full, true) => {
                    index_rows(&sources[base]).into_iter().map(|(key, value)| Change::Upsert { key, value }).collect()
                }
                (BackupKind::Incremental, false) => changes.get(&base).cloned().unwrap_or_default(),
                (BackupKind::Incremental, true) => {
                    let before = previous.as_ref().map(|p| index_rows(&p[base])).unwrap_or_default();
                    index_diff(&before, &index_rows(&sources[base]))
                }
            };
            // In key order, as a backup tool writes them (and as generated worlds do).
            let mut table_changes = table_changes;
            table_changes.sort_by_key(Change::key);
            let mut names = Vec::new();
            for shard in shard_map.shards() {
                let tablet = TabletId { table: spec.id, shard };
                let object = BackupManifest::object_name(b.id, tablet);
                let mine = table_changes.iter().filter(|c| shard_map.shard_for(c.key()) == shard).copied().collect();
                objects.insert(object.clone(), Bundle { backup_id: b.id, tablet, kind, changes: mine }.encode().into());
                names.push(object);
            }
            manifest_tables.insert(spec.id, names);
        }
        catalog.push(BackupManifest { backup_id: b.id, kind, taken_at_ms: b.at_ms, tables: manifest_tables });
        previous = Some(sources.clone());
        if catalog.len() == target + 1 {
            at_point = sources.clone();
        }
    }
    let newest_full = decl.backups[..=target].iter().rposition(|b| b.get_ref().kind == KindDecl::Full).ok_or_else(
        || match &until {
            Some(until) if decl.backups.iter().any(|b| b.get_ref().kind == KindDecl::Full) => problem(
                until.span(),
                format!(
                    "no full backup is taken at or before `until_ms = {}`: a restore to that point has none to \
                     start from",
                    until.get_ref()
                ),
            ),
            _ => problem(decl.backups[0].span(), "no full backup: a restore starts from the newest full backup"),
        },
    )?;
    let chain_backup_ids: Vec<u64> = decl.backups[newest_full..=target].iter().map(|b| b.get_ref().id).collect();
    // What the restore must end with is the source at the last backup restored, which `expect_rows` must match.
    let at = match until_ms {
        Some(until_ms) => format!(" up to `until_ms = {until_ms}`"),
        None => String::new(),
    };
    let mut world_tables = Vec::new();
    for (spec, shard_map) in tables {
        let base = base_of[&spec.id];
        let rows = if spec.index_of.is_some() { index_rows(&at_point[base]) } else { at_point[base].clone() };
        if spec.index_of.is_none()
            && let Some(expect) = &decl.tables[base].get_ref().expect_rows
        {
            let mut declared = Rows::new();
            for &(key, value) in expect.get_ref() {
                if declared.insert(key, value).is_some() {
                    return Err(problem(
                        expect.span(),
                        format!("`expect_rows` of `{}` lists key {key} twice", spec.name),
                    ));
                }
            }
            if declared != rows {
                let detail = first_mismatch(&declared, &rows);
                return Err(problem(
                    expect.span(),
                    format!("`expect_rows` of `{}` contradicts the backups{at}: {detail}", spec.name),
                ));
            }
        }
        world_tables.push(WorldTable { spec, shard_map, expected_rows: Arc::new(SortedRows::from(&rows)) });
    }
    Ok(ExplicitWorld {
        tables: world_tables,
        catalog: catalog.into(),
        objects: Arc::new(objects),
        until_ms,
        chain_backup_ids,
    })
}

/// The point in time every restore the scenario starts goes to (`None`: the newest backup), as the first of them
/// gives it. It is one for the whole file: the rows there are what each restore must end with. A restore the file
/// expects refused may give any point.
fn point_of(restores: &[Spanned<RestoreDecl>]) -> Result<Option<Spanned<u64>>, Problem> {
    let mut started = restores.iter().map(Spanned::get_ref).filter(|r| r.expect.get_ref() == "started");
    let Some(first) = started.next() else { return Ok(None) };
    let point = |r: &RestoreDecl| r.until_ms.as_ref().map(|u| *u.get_ref());
    let said = |point: Option<u64>| point.map_or_else(|| "the newest backup".to_string(), |ms| format!("{ms} ms"));
    for other in started {
        if point(other) != point(first) {
            let span = other.until_ms.as_ref().or(first.until_ms.as_ref()).map(Spanned::span).unwrap_or_default();
            return Err(problem(
                span,
                format!(
                    "operation {} restores to {}, operation {} to {}: every restore a scenario starts goes to the \
                     same point in time (the rows there are what each must end with)",
                    other.op,
                    said(point(other)),
                    first.op,
                    said(point(first))
                ),
            ));
        }
    }
    Ok(first.until_ms.clone())
}

fn shard_map_of(table: &Spanned<TableDecl>) -> Result<ShardMap, Problem> {
    let t = table.get_ref();
    match (&t.shards, &t.ranges) {
        (Some(shards), None) => {
            if *shards == 0 || *shards > MAX_SHARDS_PER_TABLE {
                return Err(problem(
                    table.span(),
                    format!(
                        "table `{}` has {shards} shards; 1 to {MAX_SHARDS_PER_TABLE} are allowed",
                        t.name.get_ref()
                    ),
                ));
            }
            Ok(ShardMap::even(*shards, t.key_space.unwrap_or(1_000)))
        }
        (None, Some(ranges)) => {
            if t.key_space.is_some() {
                return Err(problem(
                    table.span(),
                    format!(
                        "table `{}` gives `ranges`, so `key_space` does not apply (the last range runs to the end \
                         of the keys); remove it",
                        t.name.get_ref()
                    ),
                ));
            }
            let starts = ranges.get_ref();
            if starts.len() > MAX_SHARDS_PER_TABLE as usize {
                return Err(problem(
                    ranges.span(),
                    format!(
                        "table `{}` has {} key ranges, one per shard; 1 to {MAX_SHARDS_PER_TABLE} are allowed",
                        t.name.get_ref(),
                        starts.len()
                    ),
                ));
            }
            if starts.first() != Some(&0) {
                return Err(problem(ranges.span(), "key ranges must start at key 0, so every key has a shard"));
            }
            if let Some(pair) = starts.windows(2).find(|w| w[1] <= w[0]) {
                return Err(problem(
                    ranges.span(),
                    format!("key ranges overlap: a range starts at {} after one at {}", pair[1], pair[0]),
                ));
            }
            let ranges: Vec<KeyRange> = starts
                .iter()
                .enumerate()
                .map(|(i, start)| KeyRange { start: *start, end: starts.get(i + 1).copied() })
                .collect();
            Ok(ShardMap::from_ranges(ranges))
        }
        _ => Err(problem(
            table.span(),
            format!("table `{}` needs exactly one of `shards` or `ranges`", t.name.get_ref()),
        )),
    }
}

/// Index rows are `value << 32 | key`: both must fit in 32 bits.
fn check_indexable(rows: &Rows, span: Range<usize>, table: &str) -> Result<(), Problem> {
    match rows.iter().find(|(k, v)| **k > u64::from(u32::MAX) || **v > u64::from(u32::MAX)) {
        Some((key, value)) => Err(problem(
            span,
            format!(
                "table `{table}` has an index, so its keys and values must fit in 32 bits; row {key} = {value} does not"
            ),
        )),
        None => Ok(()),
    }
}

fn index_diff(before: &Rows, after: &Rows) -> Vec<Change> {
    let mut changes: Vec<Change> =
        before.keys().filter(|k| !after.contains_key(k)).map(|&key| Change::Delete { key }).collect();
    changes.extend(
        after.iter().filter(|(k, v)| before.get(k) != Some(v)).map(|(&key, &value)| Change::Upsert { key, value }),
    );
    changes
}

fn first_mismatch(declared: &Rows, actual: &Rows) -> String {
    for key in declared.keys().chain(actual.keys()).collect::<BTreeSet<_>>() {
        match (declared.get(key), actual.get(key)) {
            (Some(d), Some(a)) if d != a => return format!("key {key} is declared {d} but the backups leave {a}"),
            (Some(d), None) => return format!("key {key} is declared {d} but the backups leave no such row"),
            (None, Some(a)) => return format!("key {key} ({a}) is left by the backups but not declared"),
            _ => {}
        }
    }
    "no difference".to_string()
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Every scenario file in `dir`, in name order.
pub fn scenario_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse("t", "t.toml", text)
    }

    const MINIMAL: &str = r#"
description = "one table, one full backup"
[[table]]
name = "orders"
shards = 2
rows = [[1, 10], [600, 60]]
[[backup]]
id = 1
kind = "full"
at_ms = 1000
"#;

    #[test]
    fn a_minimal_scenario_loads_and_restores_every_table() {
        let scenario = parse(MINIMAL).unwrap();
        let world = scenario.world(0);
        assert_eq!(world.tables.len(), 1);
        assert_eq!(world.chain_backup_ids, vec![1]);
        assert_eq!(world.calls.len(), 1, "one restore of every table at time zero");
        assert_eq!(world.expected_ops.get(&1), Some(&OpExpect::Done));
        assert_eq!(world.expected_rows_of(TabletId::new(0, 1)), Rows::from([(600, 60)]));
    }

    fn error_of(text: &str) -> ScenarioError {
        parse(text).expect_err("the scenario is refused")
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line() {
        let text = MINIMAL.replace("shards = 2", "shards = 2\nshard_count = 3");
        let error = error_of(&text);
        assert_eq!((error.file.as_str(), error.line), ("t.toml", 6), "{error}");
        assert!(error.message.contains("shard_count"), "{error}");
    }

    #[test]
    fn a_wrong_type_is_refused_with_its_line() {
        let error = error_of(&MINIMAL.replace("at_ms = 1000", "at_ms = \"soon\""));
        assert_eq!(error.line, 10, "{error}");
        assert!(error.message.contains("invalid type: string \"soon\", expected u64"), "{error}");
    }

    #[test]
    fn a_change_for_a_table_that_does_not_exist_is_refused() {
        let text = format!(
            "{MINIMAL}[[backup]]\nid = 2\nkind = \"incremental\"\nat_ms = 2000\n[[backup.change]]\ntable = \"ordres\"\nupsert = [[5, 5]]\n"
        );
        let error = error_of(&text);
        assert_eq!(error.line, 16, "{error}");
        assert!(error.message.contains("`ordres`, which is not declared"), "{error}");
    }

    #[test]
    fn overlapping_key_ranges_are_refused() {
        let error = error_of(&MINIMAL.replace("shards = 2", "ranges = [0, 500, 400]"));
        assert_eq!(error.line, 5, "{error}");
        assert!(error.message.contains("overlap"), "{error}");
        let error = error_of(&MINIMAL.replace("shards = 2", "ranges = [10, 500]"));
        assert!(error.message.contains("start at key 0"), "{error}");
    }

    #[test]
    fn more_shards_or_tables_than_the_simulated_network_has_addresses_for_are_refused() {
        let too_many = MAX_SHARDS_PER_TABLE + 1;
        let error = error_of(&MINIMAL.replace("shards = 2", &format!("shards = {too_many}")));
        assert!(error.message.contains(&format!("has {too_many} shards; 1 to 64 are allowed")), "{error}");
        let starts: Vec<String> = (0..too_many).map(|shard| (shard * 10).to_string()).collect();
        let error = error_of(&MINIMAL.replace("shards = 2", &format!("ranges = [{}]", starts.join(", "))));
        assert!(error.message.contains(&format!("has {too_many} key ranges")), "{error}");
        let index = format!("shards = 2\nindexes = [{{ name = \"by_value\", shards = {too_many} }}]");
        let error = error_of(&MINIMAL.replace("shards = 2", &index));
        assert!(error.message.contains(&format!("index `orders/by_value` has {too_many} shards")), "{error}");

        let backup = "[[backup]]\nid = 1\nkind = \"full\"\nat_ms = 1000\n";
        let tables = |count: usize, indexed: bool| {
            let index = if indexed { "[[table.indexes]]\nname = \"ix\"\n" } else { "" };
            let tables: String =
                (0..count).map(|t| format!("[[table]]\nname = \"t{t}\"\nshards = 1\n{index}")).collect();
            format!("description = \"x\"\n{tables}{backup}")
        };
        assert!(parse(&tables(MAX_TABLES, false)).is_ok());
        assert!(parse(&tables(MAX_TABLES / 2, true)).is_ok());
        let error = error_of(&tables(MAX_TABLES + 1, false));
        assert!(
            error.message.contains("at most 64 tables are allowed, index tables included; with `t64` there are 65"),
            "{error}"
        );
        let error = error_of(&tables(MAX_TABLES / 2 + 1, true));
        assert!(error.message.contains("with `t32` there are 66"), "{error}");
    }

    #[test]
    fn expected_rows_the_backups_contradict_are_refused() {
        let error =
            error_of(&MINIMAL.replace("rows = [[1, 10], [600, 60]]", "rows = [[1, 10]]\nexpect_rows = [[1, 11]]"));
        assert!(error.message.contains("key 1 is declared 11 but the backups leave 10"), "{error}");
    }

    #[test]
    fn bad_references_in_restores_and_faults_are_refused() {
        let error = error_of(&format!("{MINIMAL}[[restore]]\nop = 1\ntables = [\"nope\"]\n"));
        assert!(error.message.contains("no table named `nope`"), "{error}");
        let error = error_of(&format!("{MINIMAL}[[fault]]\ndo = \"drop-reports\"\ntablet = \"orders/7\"\n"));
        assert!(error.message.contains("no shard 7"), "{error}");
        let error = error_of(&format!("{MINIMAL}[[fault]]\ndo = \"explode\"\n"));
        assert!(error.message.contains("unknown action `explode`"), "{error}");
        let error = error_of(&format!("{MINIMAL}[[restore]]\nop = 1\nexpect = \"refused:because\"\n"));
        assert!(error.message.contains("refused:<operation-id-taken"), "{error}");
        let error = error_of(&format!("{MINIMAL}[faults]\nrates = {{ message-lost = 0.5 }}\n"));
        assert!(error.message.contains("unknown fault kind `message-lost`"), "{error}");
    }

    #[test]
    fn a_cancel_at_a_time_races_the_end_unless_the_outcome_says_cancelled_and_is_refused_where_it_cannot_be() {
        let restore = |keys: &str| format!("{MINIMAL}[[restore]]\nop = 1\n{keys}\n");
        let world = parse(&restore("cancel_at_ms = 40")).unwrap().world(0);
        let cancel = world.calls.iter().find(|c| c.call == ClientCall::Cancel { op: 1 }).expect("a cancel");
        assert_eq!((cancel.at_ms, &cancel.expect), (40, &CallExpect::CancelledOrEnded));
        assert_eq!(world.expected_ops.get(&1), Some(&OpExpect::CancelRace(Box::new(OpExpect::Done))));
        assert!(world.cancels_mid_run() && !world.cancels());
        let world = parse(&restore("cancel_at_ms = 40\noutcome = \"failed:cancelled\"")).unwrap().world(0);
        let cancel = world.calls.iter().find(|c| c.call == ClientCall::Cancel { op: 1 }).expect("a cancel");
        assert_eq!(cancel.expect, CallExpect::Cancelled);
        assert_eq!(world.expected_ops.get(&1), Some(&OpExpect::Failed(FailureExpect::Cancelled)));

        let error = error_of(&restore("cancel_at_ms = 40\nuntil_ms = 1000\nsegments = [1000]"));
        assert!(error.message.contains("a restore in `segments` is cancelled with `cancel = true`"), "{error}");
        let error = error_of(&format!("{}[[restore]]\nop = 2\nafter_ended = 1\ncancel_at_ms = 40\n", restore("")));
        assert!(error.message.contains("a restore with `after_ended` starts at a time not known"), "{error}");
        let error = error_of(&restore("at_ms = 100\ncancel_at_ms = 40"));
        assert!(error.message.contains("comes before the restore starts"), "{error}");
        let error = error_of(&format!(
            "{}[[restore]]\nop = 2\nexpect = \"refused:target-busy\"\ncancel_at_ms = 40\n",
            restore("")
        ));
        assert!(error.message.contains("a refused restore has nothing to cancel"), "{error}");
        let error = error_of(&restore("outcome = \"failed:cancelled\""));
        assert!(
            error.message.contains("needs `cancel = true`") && error.message.contains("or `cancel_at_ms`"),
            "{error}"
        );
        let error = error_of(&restore("cancel_at_ms = -1"));
        assert!(error.message.contains("invalid value"), "{error}");
    }

    #[test]
    fn a_restore_again_if_a_cancel_took_needs_that_cancel_and_waits_for_that_end() {
        let first = format!("{MINIMAL}[[restore]]\nop = 1\ncancel_at_ms = 40\n");
        let world =
            parse(&format!("{first}[[restore]]\nop = 2\nafter_ended = 1\nif_cancelled = 1\n")).unwrap().world(0);
        let again = world.calls.iter().find(|c| matches!(&c.call, ClientCall::Start(r) if r.op == 2)).expect("a start");
        assert_eq!((again.after_end_of, again.if_cancelled), (Some(1), Some(1)));
        assert_eq!(world.expected_ops.get(&2), Some(&OpExpect::Done));
        let error = error_of(&format!("{first}[[restore]]\nop = 2\nif_cancelled = 1\n"));
        assert!(error.message.contains("add `after_ended = 1`"), "{error}");
        let uncancelled =
            format!("{MINIMAL}[[restore]]\nop = 1\n[[restore]]\nop = 2\nafter_ended = 1\nif_cancelled = 1\n");
        let error = error_of(&uncancelled);
        assert!(error.message.contains("nothing in the file cancels operation 1"), "{error}");
        let called = format!("{uncancelled}[[call]]\nat_ms = 10\ncancel = 1\nexpect = \"answered\"\n");
        assert!(parse(&called).is_ok(), "a [[call]] that cancels the operation will do");
    }

    #[test]
    fn a_scenario_without_a_full_backup_is_refused() {
        let error = error_of(&MINIMAL.replace("kind = \"full\"", "kind = \"incremental\""));
        assert!(error.message.contains("no full backup"), "{error}");
    }

    /// A full, two incrementals, and a newer full: points in time fall between them.
    const HISTORY: &str = r#"
description = "a history"
[[table]]
name = "orders"
shards = 2
rows = [[1, 10], [600, 60]]
[[backup]]
id = 1
kind = "full"
at_ms = 1000
[[backup]]
id = 2
kind = "incremental"
at_ms = 2000
[[backup.change]]
table = "orders"
upsert = [[2, 20]]
[[backup]]
id = 3
kind = "incremental"
at_ms = 3000
[[backup.change]]
table = "orders"
upsert = [[3, 30]]
[[backup]]
id = 4
kind = "full"
at_ms = 4000
[[backup.change]]
table = "orders"
upsert = [[4, 40]]
"#;

    /// A call as `(what, at_ms, after_segment, expect)`.
    type Step = (String, u64, Option<(OperationId, u32)>, String);

    /// Calls as steps, for comparing plans.
    fn plan_of(world: &World) -> Vec<Step> {
        world
            .calls
            .iter()
            .map(|call| {
                let what = match &call.call {
                    ClientCall::Start(r) => format!("start {} to {:?} last {}", r.op, r.until_ms, r.last_segment),
                    ClientCall::Continue(r) => {
                        format!("continue {} segment {} to {:?} last {}", r.op, r.segment, r.until_ms, r.last_segment)
                    }
                    other => format!("{other:?}"),
                };
                (what, call.at_ms, call.after_segment, call.expect.to_string())
            })
            .collect()
    }

    #[test]
    fn a_restore_to_a_point_in_segments_plans_a_start_and_a_continue_per_segment_with_the_rows_at_the_point() {
        let text =
            format!("{HISTORY}[[restore]]\nop = 1\nuntil_ms = 2500\nsegments = [1500, 2000]\ncontinue_after_ms = 40\n");
        let world = parse(&text).unwrap().world(0);
        assert_eq!(world.until_ms, Some(2500));
        assert_eq!(world.chain_backup_ids, vec![1, 2], "the newest full by the point, then incrementals up to it");
        assert_eq!(world.chain_len, 2);
        assert_eq!(world.expected_rows_of(TabletId::new(0, 0)), Rows::from([(1, 10), (2, 20)]));
        assert_eq!(world.segments(), 3);
        let plan = plan_of(&world);
        let expected = [
            ("start 1 to Some(1500) last false", 0, None, "started"),
            ("continue 1 segment 2 to Some(2000) last false", 40, Some((1, 1)), "continued"),
            ("continue 1 segment 3 to Some(2500) last true", 40, Some((1, 2)), "continued"),
        ];
        let expected: Vec<_> =
            expected.into_iter().map(|(w, at, after, e)| (w.to_string(), at, after, e.to_string())).collect();
        assert_eq!(plan, expected);
        // Waiting for two segments adds the bound twice.
        assert_eq!(world.gives_up_at_ms(), 40 + 3 * world.liveness_bound_ms);

        // `expect_rows` is checked against the rows at the point, not at the newest backup.
        let rows = |expect: &str| {
            text.replace("rows = [[1, 10], [600, 60]]", &format!("rows = [[1, 10], [600, 60]]\nexpect_rows = {expect}"))
        };
        assert!(parse(&rows("[[1, 10], [2, 20], [600, 60]]")).is_ok());
        let error = error_of(&rows("[[1, 10], [2, 20], [3, 30], [600, 60]]"));
        assert!(error.message.contains("contradicts the backups up to `until_ms = 2500`: key 3"), "{error}");

        // Without segments, one start to the point; without a point, the newest backup: the newer full on.
        let world = parse(&format!("{HISTORY}[[restore]]\nop = 1\nuntil_ms = 3000\n")).unwrap().world(0);
        assert_eq!((world.chain_backup_ids.clone(), world.segments()), (vec![1, 2, 3], 1));
        assert_eq!(plan_of(&world)[0].0, "start 1 to Some(3000) last true");
        let world = parse(HISTORY).unwrap().world(0);
        assert_eq!((world.until_ms, world.chain_backup_ids.clone()), (None, vec![4]));
        // A segment may end where the one before did (it is empty), and at the point itself.
        let world = parse(&format!("{HISTORY}[[restore]]\nop = 1\nsegments = [4000, 4000, 5000]\n")).unwrap().world(0);
        assert_eq!(world.segments(), 4);
        assert_eq!(plan_of(&world)[3].0, "continue 1 segment 4 to None last true");
    }

    #[test]
    fn a_continue_after_the_segment_that_meets_a_lost_object_is_expected_refused_as_ended() {
        let text = |increment: u32| {
            format!(
                "{HISTORY}[[restore]]\nop = 1\nuntil_ms = 3500\nsegments = [1500, 2500]\noutcome = \"failed:object-missing\"\n\
                 [[fault]]\ndo = \"lose-object\"\ntablet = \"orders/1\"\nincrement = {increment}\n"
            )
        };
        let expects = |increment: u32| -> Vec<String> {
            plan_of(&parse(&text(increment)).unwrap().world(0)).into_iter().map(|(.., e)| e).collect()
        };
        let refused = "continue refused (ended)";
        assert_eq!(expects(0), ["started", refused, refused]);
        assert_eq!(expects(1), ["started", "continued", refused]);
        assert_eq!(expects(2), ["started", "continued", "continued"]);
        let error = error_of(&text(3));
        assert!(error.message.contains("increment 3 is past the chain of 3 increments"), "{error}");
    }

    #[test]
    fn bad_points_in_time_and_segments_are_refused_naming_the_place() {
        let restore = |keys: &str| format!("{HISTORY}[[restore]]\nop = 1\n{keys}\n");
        let cases = [
            (
                "until_ms = 2500\nsegments = [2000, 1500]",
                "segment points must not decrease: 1500 ms comes after 2000 ms",
            ),
            ("until_ms = 2500\nsegments = [3000]", "segment point 3000 ms is after `until_ms = 2500`"),
            ("segments = []", "`segments = []` lists no point; leave it out"),
            ("segments = [3000]", "the first segment restores to 3000 ms, before full backup 4 (at 4000 ms)"),
            ("until_ms = 500", "`until_ms = 500` is before every backup"),
            ("continue_after_ms = 10", "`continue_after_ms` is for a restore in `segments`"),
            ("until_ms = 2500\nsegments = [1500]\noutcome = \"failed:timeout\"", "cannot expect `failed:timeout`"),
            ("segments = [1500]\nexpect = \"refused:chain\"", "a restore expected refused never starts"),
            ("until_ms = -1", "invalid value"),
        ];
        for (keys, message) in cases {
            let error = error_of(&restore(keys));
            assert!(error.message.contains(message), "{keys}: {error}");
            assert!(error.line > 30, "{keys}: the error points at the restore: {error}");
        }
        // No full backup by the point, while there is one later.
        let early = HISTORY.replacen("kind = \"full\"", "kind = \"incremental\"", 1);
        let error = error_of(&format!("{early}[[restore]]\nop = 1\nuntil_ms = 3500\n"));
        assert!(error.message.contains("no full backup is taken at or before `until_ms = 3500`"), "{error}");
        assert!(parse(&format!("{early}[[restore]]\nop = 1\nuntil_ms = 3500\nexpect = \"refused:chain\"\n")).is_ok());
        // Every restore started goes to one point: its rows are the oracle.
        let two = format!(
            "{HISTORY}[[restore]]\nop = 1\nuntil_ms = 2500\n[[restore]]\nop = 2\nafter_ended = 1\nuntil_ms = 3500\n"
        );
        let error = error_of(&two);
        assert!(error.message.contains("operation 2 restores to 3500 ms, operation 1 to 2500 ms"), "{error}");
        assert!(parse(&two.replace("until_ms = 3500", "until_ms = 2500")).is_ok());
    }

    #[test]
    fn a_call_that_waits_comes_once_what_it_waits_for_was_asked() {
        // Operation 2 waits for operation 1's end, a shorter delay than operation 1's continue: the continue still
        // comes first, or the client would wait for an end that never comes.
        let text = format!(
            "{HISTORY}[[restore]]\nop = 2\nafter_ended = 1\nat_ms = 30\nuntil_ms = 2500\n\
             [[restore]]\nop = 1\nuntil_ms = 2500\nsegments = [1500]\ncontinue_after_ms = 100\n"
        );
        let world = parse(&text).unwrap().world(0);
        let order: Vec<String> = plan_of(&world).into_iter().map(|(what, ..)| what).collect();
        assert_eq!(
            order,
            [
                "start 1 to Some(1500) last false",
                "continue 1 segment 2 to Some(2500) last true",
                "start 2 to Some(2500) last true"
            ]
        );
        // Two restores that each wait for the other to end would never start.
        let circle = format!("{HISTORY}[[restore]]\nop = 1\nafter_ended = 2\n[[restore]]\nop = 2\nafter_ended = 1\n");
        let error = error_of(&circle);
        assert!(error.message.contains("the client would wait forever"), "{error}");
    }

    #[test]
    fn a_generated_world_restores_to_a_point_in_segments_when_asked_and_draws_the_point_itself() {
        let text = "description = \"x\"\nseeds = [0, 1, 2, 3]\n[generate]\ntables = 1\npoint_in_time = true\n";
        let scenario = parse(text).unwrap();
        let mut segmented = 0;
        for seed in 0..20 {
            let world = scenario.world(seed);
            let drawn = World::generate(
                seed,
                &WorldParams { point_in_time_probability: 1.0, tables: Some(1), ..WorldParams::default() },
            );
            assert_eq!(plan_of(&world), plan_of(&drawn), "seed {seed}");
            assert_eq!((world.until_ms, &world.chain_backup_ids), (drawn.until_ms, &drawn.chain_backup_ids));
            segmented += usize::from(world.segments() > 1);
        }
        assert!(segmented >= 5, "{segmented} of 20 seeds restore in segments");
        assert_eq!(parse(&text.replace("true", "false")).unwrap().world(0).segments(), 1);
        let cases = [
            (format!("{text}[[restore]]\nop = 1\n"), "with `point_in_time` the generated world plans its own restore"),
            (
                "description = \"x\"\n[generate]\n[[restore]]\nop = 1\nuntil_ms = 5\n".to_string(),
                "a `[[restore]]` of it takes no `until_ms`",
            ),
            (
                format!(
                    "{text}incrementals = 3\nshards = 1\nindexes = false\n[[fault]]\ndo = \"corrupt-download\"\ntablet = \"table0/0\"\nincrement = 1\n"
                ),
                "with `point_in_time` the chain restored is drawn from the seed",
            ),
        ];
        for (text, message) in cases {
            let error = error_of(&text);
            assert!(error.message.contains(message), "{error}");
            assert!(error.line > 0, "{error}");
        }
    }

    #[test]
    fn a_generated_world_that_draws_its_tables_cannot_name_them() {
        let text =
            "description = \"x\"\n[generate]\nshards = 2\n[[fault]]\ndo = \"drop-reports\"\ntablet = \"table0/1\"\n";
        let error = error_of(text);
        assert_eq!(error.line, 2, "{error}");
        assert!(error.message.contains("must fix `tables`, `shards` and `indexes`"), "{error}");
        let fixed = text.replace("shards = 2", "shards = 2\ntables = 1\nindexes = false");
        assert!(parse(&fixed).is_ok());
    }

    #[test]
    fn generated_worlds_out_of_range_are_refused_not_built() {
        for (key, value) in [("shards", 0), ("tables", 0), ("tables", 17), ("incrementals", 0), ("initial_rows", 0)] {
            let error = error_of(&format!("description = \"x\"\n[generate]\n{key} = {value}\n"));
            assert_eq!(error.line, 2, "{error}");
            assert!(error.message.contains(&format!("`{key} = {value}` is out of range")), "{error}");
        }
    }

    #[test]
    fn decisions_pin_faults_and_replace_the_dice() {
        let text = format!(
            "{MINIMAL}[faults]\nheal_at_ms = 10000\n[[decision]]\nfault = \"download-corrupt\"\nnode = \"orders/1\"\nnth = 2\n\
             [[decision]]\nfault = \"coordinator-reboot\"\nnode = \"coordinator\"\nat_ms = 40\n"
        );
        let world = parse(&text).unwrap().world(0);
        let tape = world.decisions.expect("a scenario with decisions replays them");
        let corrupt = Chance { node: NodeAddr::Shard(TabletId::new(0, 1)), kind: FaultKind::DownloadCorrupt, nth: 2 };
        assert!(tape.chances.contains(&corrupt));
        assert_eq!(tape.reboots, vec![Reboot { at_ms: 40, node: NodeAddr::Coordinator }]);
        assert!(parse(MINIMAL).unwrap().world(0).decisions.is_none(), "no decisions: the dice roll");
    }

    #[test]
    fn bad_decisions_are_refused_naming_what_is_wrong() {
        let decision = |body: &str| error_of(&format!("{MINIMAL}[faults]\nheal_at_ms = 10000\n[[decision]]\n{body}\n"));
        let cases = [
            ("fault = \"message-lost\"\nnode = \"coordinator\"\nnth = 0", "unknown fault `message-lost`"),
            ("fault = \"message-drop\"\nnode = \"orders/7\"\nnth = 0", "no shard 7"),
            ("fault = \"download-partial\"\nnode = \"coordinator\"\nnth = 0", "cannot happen at `coordinator`"),
            ("fault = \"shard-reboot\"\nnode = \"orders/0\"\nnth = 0", "gives `at_ms` (when), and no `nth`"),
            ("fault = \"message-drop\"\nnode = \"orders/0\"", "gives `nth` (which chance)"),
            ("fault = \"disk-lost-write\"\nnode = \"orders/0\"\nnth = 0", "follows from a crash"),
            ("fault = \"message-drop\"\nnode = \"orders/0\"\nnth = 0\ndelay_ms = 10", "no other decision takes it"),
            ("fault = \"message-delay\"\nnode = \"orders/0\"\nnth = 0\ndelay_ms = 0", "a delay is 1 to 600000 ms"),
        ];
        for (body, message) in cases {
            let error = decision(body);
            assert!(error.message.contains(message), "{body}: {error}");
            assert!((13..=16).contains(&error.line), "the decision's lines: {body}: {error}");
        }
        let with_rates = format!(
            "{MINIMAL}[faults]\nrates = {{ message-drop = 0.1 }}\n[[decision]]\nfault = \"message-drop\"\nnode = \"coordinator\"\nnth = 0\n"
        );
        assert!(error_of(&with_rates).message.contains("rolls no dice"), "{}", error_of(&with_rates));
        // Without a heal time the world is healed from the start, and no decision would ever fire.
        let never_fires = format!("{MINIMAL}[[decision]]\nfault = \"message-drop\"\nnode = \"coordinator\"\nnth = 0\n");
        let error = error_of(&never_fires);
        assert!(error.message.contains("set [faults] heal_at_ms past the decisions"), "{error}");
    }

    #[test]
    fn heal_times_and_liveness_bounds_past_their_limits_are_refused() {
        let heal = |ms: u64| format!("{MINIMAL}[faults]\nheal_at_ms = {ms}\nrates = {{ message-drop = 1.0 }}\n");
        assert!(parse(&heal(MAX_HEAL_AT_MS)).is_ok());
        let error = error_of(&heal(MAX_HEAL_AT_MS + 1));
        assert!(error.message.contains("heal_at_ms 3600001 is more than the most"), "{error}");
        let bound = |ms: u64| MINIMAL.replace("[[table]]", &format!("liveness_bound_ms = {ms}\n[[table]]"));
        assert!(parse(&bound(MAX_LIVENESS_BOUND_MS)).is_ok());
        let error = error_of(&bound(u64::MAX));
        assert!(error.message.contains("liveness_bound_ms 18446744073709551615 is more than the most"), "{error}");
    }

    #[test]
    fn every_pinned_seed_must_build_its_world_and_any_other_seed_is_checked_on_request() {
        // A generated world draws its index table's shards from the seed: seed 3 has one, so no `by_value/1`.
        let text = |seeds: &str| {
            format!(
                "description = \"x\"\nseeds = {seeds}\n[generate]\ntables = 1\nshards = 2\nindexes = true\n\
                 [[fault]]\ndo = \"reboot-shard\"\ntablet = \"table0/by_value/1\"\n"
            )
        };
        let scenario = parse(&text("[0]")).expect("seed 0 has the tablet");
        let error = error_of(&text("[0, 3]"));
        assert!(error.message.contains("with seed 3: table `table0/by_value` has 1 shard(s), no shard 1"), "{error}");
        assert_eq!(scenario.check_seed(0), Ok(()));
        let error = scenario.check_seed(3).expect_err("seed 3 lacks the tablet");
        assert!(error.starts_with("scenario t: with seed 3: table `table0/by_value`"), "{error}");
    }

    #[test]
    fn an_expected_violation_must_name_an_invariant() {
        let scenario =
            parse(&MINIMAL.replace("[[table]]", "expect_violation = \"in-order-apply\"\n[[table]]")).unwrap();
        assert_eq!(scenario.expect_violation, Some(Invariant::InOrderApply));
        assert_eq!(scenario.without_bugs().expect_violation, None);
        let error = error_of(&MINIMAL.replace("[[table]]", "expect_violation = \"in-order\"\n[[table]]"));
        assert!(error.message.contains("unknown invariant `in-order`"), "{error}");
        let error = error_of(&MINIMAL.replace("[[table]]", "[shard]\ndownload_chunk_bytes = 0\n[[table]]"));
        assert!(error.message.contains("download_chunk_bytes must be at least 1"), "{error}");
    }

    #[test]
    fn faults_and_decisions_that_could_never_fire_are_refused() {
        let fault = |body: &str| format!("{MINIMAL}[[fault]]\n{body}\n");
        let error = error_of(&fault("do = \"corrupt-download\"\ntablet = \"orders/0\"\nincrement = 0\ntimes = 0"));
        assert_eq!(error.line, 11, "{error}");
        assert!(error.message.contains("`times = 0`: this `corrupt-download` would never fire"), "{error}");
        assert!(parse(&fault("do = \"corrupt-download\"\ntablet = \"orders/0\"\nincrement = 0\ntimes = 2")).is_ok());
        // No restore declared: operation 1 alone is started.
        let error = error_of(&fault("after = { started = 7 }\ndo = \"reboot-coordinator\""));
        assert_eq!(error.line, 11, "{error}");
        assert!(
            error
                .message
                .contains("no restore of this scenario starts operation 7 (started: 1); the fault would never"),
            "{error}"
        );
        assert!(parse(&fault("after = { started = 1 }\ndo = \"reboot-coordinator\"")).is_ok());
        // A restore that is refused starts nothing.
        let refused = format!(
            "{MINIMAL}[[restore]]\nop = 1\n[[restore]]\nop = 2\nexpect = \"refused:collection-busy\"\n\
             [[fault]]\nafter = {{ started = 2 }}\ndo = \"reboot-coordinator\"\n"
        );
        assert!(error_of(&refused).message.contains("starts operation 2 (started: 1)"), "{}", error_of(&refused));
        let error = error_of(&fault("after = { applied = \"orders/0\", increment = 1 }\ndo = \"reboot-coordinator\""));
        assert!(error.message.contains("increment 1, past the chain of 1 increments"), "{error}");
        let reboot = |at_ms: u64| {
            format!(
                "{MINIMAL}[faults]\nheal_at_ms = 5000\n[[decision]]\nfault = \"shard-reboot\"\nnode = \"orders/0\"\n\
                 at_ms = {at_ms}\n"
            )
        };
        assert!(parse(&reboot(4999)).is_ok());
        let error = error_of(&reboot(5000));
        assert_eq!(error.line, 13, "{error}");
        assert!(error.message.contains("decision at 5000 ms would never fire: the world heals at 5000 ms"), "{error}");
    }

    #[test]
    fn keys_a_fault_or_a_table_does_not_use_are_refused_not_ignored() {
        let fault = |body: &str| error_of(&format!("{MINIMAL}[[fault]]\n{body}\n"));
        let cases = [
            ("do = \"reboot-coordinator\"\ntablet = \"orders/0\"", 13, "`reboot-coordinator` takes no `tablet`"),
            ("do = \"reboot-shard\"\ntablet = \"orders/0\"\nincrement = 0", 11, "`reboot-shard` takes no `increment`"),
            ("do = \"drop-reports\"\ntablet = \"orders/0\"\ntimes = 2", 11, "`drop-reports` takes no `times`"),
            (
                "do = \"lose-object\"\ntablet = \"orders/0\"\nincrement = 0\ntimes = 1",
                11,
                "`lose-object` takes no `times`",
            ),
            (
                "after = { at_ms = 5, increment = 0 }\ndo = \"reboot-coordinator\"",
                11,
                "`after` takes `increment` only with `applied` or `reported`",
            ),
        ];
        for (body, line, message) in cases {
            let error = fault(body);
            assert_eq!(error.line, line, "{body}: {error}");
            assert!(error.message.contains(message), "{body}: {error}");
        }
        let error = error_of(&MINIMAL.replace("shards = 2", "ranges = [0, 500]\nkey_space = 600"));
        assert_eq!(error.line, 3, "{error}");
        assert!(error.message.contains("table `orders` gives `ranges`, so `key_space` does not apply"), "{error}");
        assert!(parse(&MINIMAL.replace("shards = 2", "shards = 2\nkey_space = 600")).is_ok());
    }

    #[test]
    fn restoring_again_after_an_end_names_an_operation_a_restore_starts() {
        let lost =
            |until: &str| format!("[[fault]]\ndo = \"lose-object\"\ntablet = \"orders/0\"\nincrement = 0\n{until}\n");
        let first = "[[restore]]\nop = 1\noutcome = \"failed:object-missing\"\n";
        let again = |after: u64| format!("[[restore]]\nop = 2\nafter_ended = {after}\nat_ms = 30\n");
        let text = format!("{MINIMAL}{first}{}{}", again(1), lost("until_ended = 1"));
        let world = parse(&text).expect("a restore again loads").world(0);
        assert_eq!(world.lost_objects[0].until_end_of, Some(1));
        let waits: Vec<(u64, Option<u64>)> = world.calls.iter().map(|c| (c.at_ms, c.after_end_of)).collect();
        assert_eq!(waits, vec![(0, None), (30, Some(1))]);
        assert_eq!(world.expected_ops.get(&2), Some(&OpExpect::Done));
        // Waiting adds the bound once more: what the wait starts gets the whole bound too.
        assert_eq!(world.gives_up_at_ms(), 30 + 2 * world.liveness_bound_ms);

        let cases = [
            (format!("{MINIMAL}{first}{}{}", again(2), lost("")), "operation 2 cannot wait for its own end"),
            (
                format!("{MINIMAL}{first}{}{}", again(3), lost("")),
                "`after_ended` names operation 3, which no `[[restore]]` starts",
            ),
            (
                format!("{MINIMAL}{first}{}", lost("until_ended = 4")),
                "`until_ended` names operation 4, which no `[[restore]]` starts",
            ),
            (
                format!("{MINIMAL}[[fault]]\ndo = \"reboot-coordinator\"\nuntil_ended = 1\n"),
                "`reboot-coordinator` takes no `until_ended`",
            ),
        ];
        for (text, message) in cases {
            let error = error_of(&text);
            assert!(error.message.contains(message), "{error}");
            assert!(error.line > 10, "the error points into the file: {error}");
        }
    }

    #[test]
    fn a_late_call_is_answered_since_the_run_waits_the_bound_after_it_and_a_call_past_a_day_is_refused() {
        // No faults: the world heals at 0 ms. The run waits the liveness bound after the last call, so a call just
        // before the bound after healing is answered (it used to be cut off and fail as a liveness violation).
        let late = |at_ms: u64| {
            let body = MINIMAL.replacen("description", "liveness_bound_ms = 5000\ndescription", 1);
            format!("{body}[[call]]\nat_ms = {at_ms}\nlist = true\n")
        };
        let scenario = parse(&late(4_999)).expect("a late call loads");
        let world = scenario.world(0);
        assert_eq!(world.gives_up_at_ms(), 4_999 + 5_000);
        #[cfg(madsim)]
        for seed in 0..3 {
            let outcome = crate::runner::run_seed(&scenario.world(seed), crate::runner::Keep::Verdict);
            assert!(outcome.violations.is_empty(), "seed {seed}: {:?}", outcome.violations);
        }
        let error = error_of(&late(MAX_CALL_AT_MS + 1));
        assert!(error.message.contains("a client call at 86400001 ms is later than the latest"), "{error}");
    }

    #[test]
    fn a_fault_on_a_tablet_of_a_table_no_restore_touches_is_refused_unless_it_is_a_reboot() {
        let two_tables = format!(
            "{MINIMAL}[[table]]\nname = \"items\"\nshards = 1\nrows = [[5, 5]]\n\
             [[restore]]\nop = 1\ntables = [\"orders\"]\n"
        );
        let error = error_of(&format!(
            "{two_tables}[[fault]]\ndo = \"corrupt-download\"\ntablet = \"items/0\"\nincrement = 0\n"
        ));
        assert!(error.message.contains("`items/0` is a tablet of a table no restore touches"), "{error}");
        let error = error_of(&format!(
            "{two_tables}[[fault]]\nafter = {{ reported = \"items/0\", increment = 0 }}\ndo = \"reboot-coordinator\"\n"
        ));
        assert!(error.message.contains("`items/0` is a tablet of a table no restore touches"), "{error}");
        assert!(parse(&format!("{two_tables}[[fault]]\ndo = \"reboot-shard\"\ntablet = \"items/0\"\n")).is_ok());
        assert!(parse(&format!("{two_tables}[[fault]]\ndo = \"drop-reports\"\ntablet = \"orders/1\"\n")).is_ok());
    }

    #[test]
    fn rates_in_a_world_that_heals_at_once_are_refused() {
        let error = error_of(&format!("{MINIMAL}[faults]\nrates = {{ message-drop = 0.2 }}\n"));
        assert!(error.message.contains("rate of `message-drop` fires only before the world heals"), "{error}");
        assert!(parse(&format!("{MINIMAL}[faults]\nrates = {{ message-drop = 0.0 }}\n")).is_ok());
        assert!(parse(&format!("{MINIMAL}[faults]\nheal_at_ms = 1\nrates = {{ message-drop = 0.2 }}\n")).is_ok());
        // Lost writes follow every crash, a scheduled reboot's too, healed or not.
        let reboot = "[[fault]]\ndo = \"reboot-shard\"\ntablet = \"orders/0\"\n";
        assert!(parse(&format!("{MINIMAL}[faults]\nrates = {{ disk-lost-write = 1.0 }}\n{reboot}")).is_ok());
        let error = error_of(&format!("{MINIMAL}[faults]\nrates = {{ message-drop = nan }}\n"));
        assert!(error.message.contains("rate NaN of `message-drop` is not a probability"), "{error}");
    }

    #[test]
    fn a_rate_of_lost_writes_other_than_one_is_refused_since_every_crash_loses_them() {
        let with_rates = |rates: &str| format!("{MINIMAL}[faults]\nheal_at_ms = 1000\nrates = {{ {rates} }}\n");
        let error = error_of(&with_rates("disk-lost-write = 0.5"));
        assert!(error.message.contains("rate 0.5 of `disk-lost-write`: a crash always loses"), "{error}");
        assert!(parse(&with_rates("disk-lost-write = 1.0, shard-reboot = 0.2")).is_ok());
    }

    #[test]
    fn rates_that_are_not_finite_or_out_of_their_range_are_refused_naming_the_key() {
        let rates = |rates: &str| format!("{MINIMAL}[faults]\nheal_at_ms = 5000\nrates = {{ {rates} }}\n");
        assert!(parse(&rates("shard-reboot = 1000.0, message-drop = 1.0, store-slow = 0.0")).is_ok());
        let cases = [
            ("shard-reboot = nan", "rate NaN of `shard-reboot` is not reboots per second from 0 to 1000"),
            ("coordinator-reboot = inf", "rate inf of `coordinator-reboot` is not reboots per second"),
            ("shard-reboot = -inf", "rate -inf of `shard-reboot` is not reboots per second"),
            ("shard-reboot = -0.5", "rate -0.5 of `shard-reboot` is not reboots per second"),
            ("shard-reboot = 1000.5", "rate 1000.5 of `shard-reboot` is not reboots per second"),
            ("message-drop = nan", "rate NaN of `message-drop` is not a probability in [0, 1]"),
            ("message-drop = inf", "rate inf of `message-drop` is not a probability in [0, 1]"),
            ("message-drop = -0.1", "rate -0.1 of `message-drop` is not a probability in [0, 1]"),
            ("message-drop = 1.5", "rate 1.5 of `message-drop` is not a probability in [0, 1]"),
        ];
        for (rate, message) in cases {
            let error = error_of(&rates(rate));
            assert_eq!((error.line, error.column), (13, 11), "{rate}: {error}");
            assert!(error.message.contains(message), "{rate}: {error}");
        }
    }

    #[test]
    fn a_key_listed_twice_in_expect_rows_or_in_one_backups_changes_is_refused() {
        let error = error_of(&MINIMAL.replace("[[backup]]", "expect_rows = [[1, 10], [600, 60], [1, 10]]\n[[backup]]"));
        assert_eq!(error.line, 7, "{error}");
        assert!(error.message.contains("`expect_rows` of `orders` lists key 1 twice"), "{error}");
        let change = |body: &str| {
            format!(
                "{MINIMAL}[[backup]]\nid = 2\nkind = \"incremental\"\nat_ms = 2000\n\
                 [[backup.change]]\ntable = \"orders\"\n{body}\n"
            )
        };
        assert!(parse(&change("upsert = [[5, 5], [6, 6]]\ndelete = [1]")).is_ok());
        let cases = [
            ("upsert = [[5, 5], [5, 6]]", "backup 2 lists key 5 of `orders` twice in `upsert`"),
            ("delete = [1, 1]", "backup 2 lists key 1 of `orders` twice in `delete`"),
            ("upsert = [[1, 5]]\ndelete = [1]", "backup 2 both upserts and deletes key 1 of `orders`"),
            // Two changes of one table in one backup are one list.
            (
                "upsert = [[5, 5]]\n[[backup.change]]\ntable = \"orders\"\nupsert = [[5, 6]]",
                "lists key 5 of `orders` twice",
            ),
        ];
        for (body, message) in cases {
            let error = error_of(&change(body));
            assert!(error.message.contains(message), "{body}: {error}");
        }
    }

    #[test]
    fn a_status_call_expects_a_status_refusal_and_says_so() {
        use lockstep::coordinator::LifecycleError;
        use lockstep::protocol::ClientAnswer;
        let call =
            |kind: &str, expect: &str| format!("{MINIMAL}[[call]]\nat_ms = 500\n{kind}\nexpect = \"{expect}\"\n");
        let world = parse(&call("status = 9", "refused:not-found")).unwrap().world(0);
        let planned = world.calls.iter().find(|c| c.call == ClientCall::Status { op: 9 }).expect("the status call");
        assert_eq!(planned.expect.to_string(), "status refused (not-found)");
        assert!(planned.expect.accepts(&ClientAnswer::Status(Err(LifecycleError::NotFound { op: 9 }))));
        assert!(!planned.expect.accepts(&ClientAnswer::ForgetRefused(LifecycleError::NotFound { op: 9 })));
        // What a status or a list call can never get is refused.
        for (kind, expect, message) in [
            ("status = 1", "forgotten", "expected `answered` or `refused:<not-found>`, found `forgotten`"),
            ("status = 1", "refused:still-running", "found `refused:still-running`"),
            ("list = true", "refused:not-found", "a `list` call is always answered"),
        ] {
            let error = error_of(&call(kind, expect));
            assert_eq!(error.line, 14, "{kind}: {error}");
            assert!(error.message.contains(message), "{kind} {expect}: {error}");
        }
        let forget = parse(&call("forget = 1", "refused:still-running")).unwrap().world(0);
        let planned = forget.calls.iter().find(|c| c.call == ClientCall::Forget { op: 1 }).expect("the forget call");
        assert_eq!(planned.expect.to_string(), "forget refused (still-running)");
    }

    #[test]
    fn a_problem_with_no_place_in_the_file_names_the_file_alone() {
        let error = error_of(&MINIMAL.replace("[[table]]", "[shard]\ndownload_chunk_bytes = 0\n[[table]]"));
        assert_eq!((error.line, error.column), (0, 0), "{error}");
        assert_eq!(error.to_string(), "t.toml: with seed 0: [shard] download_chunk_bytes must be at least 1");
        let error = error_of("description = \"x\"\n[[backup]]\nid = 1\nkind = \"full\"\nat_ms = 1\n");
        assert_eq!(error.to_string(), "t.toml: a scenario declares at least one [[table]] (or a [generate] section)");
        // A problem at a place still names it.
        let error = error_of(&MINIMAL.replace("at_ms = 1000", "at_ms = \"soon\""));
        assert!(error.to_string().starts_with("t.toml:10:9: "), "{error}");
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }

    /// Every scenario file of the repository (regressions included), as text.
    fn repository_scenarios() -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let files =
            scenario_files(&root).unwrap().into_iter().chain(scenario_files(&root.join("regressions")).unwrap());
        files.map(|path| std::fs::read_to_string(path).unwrap()).collect()
    }

    /// Numbers and words a hand edit may leave where another was.
    const NUMBERS: [&str; 7] = ["0", "1", "-1", "3", "4294967296", "18446744073709551615", "99999999999999999999"];
    const WORDS: [&str; 7] = ["", "orders/9", "x", "full", "incremental", "coordinator", "table0/by_value/7"];

    /// `text` with one edit: a line dropped or repeated, a number or a quoted word on it replaced, or the text cut.
    fn edited(text: &str, at: usize, kind: u8, with: usize) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.is_empty() {
            return text.to_string();
        }
        let line = at % lines.len();
        match kind {
            0 => {
                lines.remove(line);
            }
            1 => lines.insert(line, lines[line].clone()),
            2 => {
                let old = &lines[line];
                if let Some(start) = old.find(|c: char| c.is_ascii_digit()) {
                    let end = old[start..].find(|c: char| !c.is_ascii_digit()).map_or(old.len(), |e| start + e);
                    lines[line] = format!("{}{}{}", &old[..start], NUMBERS[with % NUMBERS.len()], &old[end..]);
                }
            }
            3 => {
                let old = &lines[line];
                if let Some(start) = old.find('"')
                    && let Some(len) = old[start + 1..].find('"')
                {
                    let end = start + 1 + len;
                    lines[line] = format!("{}{}{}", &old[..=start], WORDS[with % WORDS.len()], &old[end..]);
                }
            }
            _ => {
                let joined = lines.join("\n");
                let mut cut = with % (joined.len() + 1);
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                return joined[..cut].to_string();
            }
        }
        lines.join("\n")
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 300,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5ce_7a21),
            ..Default::default()
        })]

        /// A scenario file edited wrongly is refused naming the file, or loads and builds its world for a seed
        /// (and in the madsim build runs it); it never panics.
        #[test]
        fn an_edited_scenario_is_refused_naming_the_file_or_builds_its_world(
            pick in proptest::prelude::any::<usize>(),
            edits in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), 0u8..5, proptest::prelude::any::<usize>()),
                1..4,
            ),
        ) {
            let scenarios = repository_scenarios();
            let mut text = scenarios[pick % scenarios.len()].clone();
            for (at, kind, with) in edits {
                text = edited(&text, at, kind, with);
            }
            match Scenario::parse("edited", "edited.toml", &text) {
                Ok(scenario) => {
                    let seed = scenario.seeds.first().copied().unwrap_or(0);
                    let world = scenario.world(seed);
                    proptest::prop_assert_eq!(world.seed, seed);
                    // A file that loads must also run: its world may break an invariant (the edit may make it
                    // wrong on purpose), but the simulator must not crash on it.
                    #[cfg(madsim)]
                    {
                        let outcome = crate::runner::run_seed(&world, crate::runner::Keep::Verdict);
                        proptest::prop_assert!(outcome.panic.is_none(), "{:?}\n{text}", outcome.panic);
                    }
                }
                Err(error) => proptest::prop_assert!(error.to_string().starts_with("edited.toml"), "{error}"),
            }
        }
    }
}
