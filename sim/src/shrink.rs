//! Shrinking a failing seed to a small scenario file.
//!
//! A failing seed of a generated world is first written down as a scenario: its tables and key ranges, the
//! source rows and every backup's changes (read back from the bundles), its knobs, and every fault its dice
//! decided, pinned as decisions (see [`crate::tape`]). That scenario, run with the same seed, is the same run,
//! and must break the same invariant; then the shrinker takes things away as long as it still does:
//! - fault decisions (every decision the run never used, then chunks of the rest, down to single ones);
//! - whole tables, index tables, shards (the last shard of a table merges into the one before), backups;
//! - source rows and the changes of each backup, in chunks down to single ones;
//! - a lost object (when the failure does not need it);
//! - segments of a restore in segments (its point in time stays: points are times, so backups can go around
//!   them; a candidate whose first segment no longer reaches a full backup does not load, and is not kept).
//!
//! Every candidate is checked by writing it as a scenario file, loading that file as the loader does, and
//! running it; so the file the shrinker writes is exactly what was last seen failing. Passes repeat until
//! none takes anything away, or the run budget is spent.

use std::collections::BTreeSet;
use std::fmt::{self, Write};

use lockstep::bundle::Bundle;
use lockstep::model::{BackupKind, BackupManifest, Change, Key, Rows, Value, apply_changes};
use lockstep::protocol::{ClientCall, NodeAddr};

use crate::checkers::Invariant;
use crate::faults::FaultKind;
use crate::plan::{CallExpect, PlannedCall};
use crate::runner::{Keep, run_seed};
use crate::scenario::Scenario;
use crate::tape::Decision;
use crate::world::{OPERATION_ID, RESTORED_AGAIN_ID, World};

/// How big a case is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub tables: usize,
    pub tablets: usize,
    pub backups: usize,
    /// Source rows plus every change of every backup.
    pub rows_and_changes: usize,
    pub decisions: usize,
    /// Events in the log of the failing run.
    pub events: usize,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} table(s), {} tablet(s), {} backup(s), {} source row(s) and change(s), {} fault decision(s); {} events",
            self.tables, self.tablets, self.backups, self.rows_and_changes, self.decisions, self.events
        )
    }
}

/// What shrinking a seed produced.
#[derive(Clone, Debug)]
pub struct Shrunk {
    pub seed: u64,
    pub invariant: Invariant,
    pub before: Size,
    pub after: Size,
    /// Candidate runs made.
    pub runs: usize,
    /// The minimal case as a scenario file.
    pub scenario: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShrinkError {
    #[error("seed {0} breaks no invariant: nothing to shrink")]
    Passes(u64),
    #[error("seed {seed} panicked: {message}")]
    Panicked { seed: u64, message: String },
    #[error("seed {seed} breaks {broke}, not {wanted}")]
    OtherInvariant { seed: u64, broke: String, wanted: Invariant },
    #[error("cannot write this world as a scenario: {0}")]
    NotWritable(String),
    #[error(
        "written down as a scenario with its decisions, seed {seed} no longer breaks {invariant}; this is a bug of \
         the shrinker, please report it"
    )]
    NotReproduced { seed: u64, invariant: Invariant },
}

/// One base table of a case, with its index tables.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaseTable {
    name: String,
    /// First key of each shard.
    ranges: Vec<Key>,
    /// Index name (after the table's name and `/`) and shard count.
    indexes: Vec<(String, u32)>,
    rows: Vec<(Key, Value)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CaseChange {
    table: String,
    upsert: Vec<(Key, Value)>,
    delete: Vec<Key>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CaseBackup {
    id: u64,
    full: bool,
    at_ms: u64,
    changes: Vec<CaseChange>,
}

/// A decision with its node named as the scenario names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct CaseDecision {
    kind: FaultKind,
    node: String,
    nth: Option<u32>,
    at_ms: Option<u64>,
}

/// A world written out so that it can be edited: everything a scenario file says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Case {
    seed: u64,
    bugs: Vec<&'static str>,
    tables: Vec<CaseTable>,
    backups: Vec<CaseBackup>,
    /// Tablet (`<table>/<shard>`) and increment of the bundle lost (for good, unless `again_after_ms`).
    lost: Option<(String, u32)>,
    /// The lost bundle is back once the restore has failed, and the client restores again this long after.
    again_after_ms: Option<u64>,
    /// The point in time restored to (`None`: the newest backup).
    until_ms: Option<u64>,
    /// The points of the segments before the last, in order, for a restore in segments (else empty).
    segments: Vec<u64>,
    /// The client cancels the restore in segments instead of asking for its last one.
    cancel: bool,
    /// The client cancels the restore in one go at this time, racing its end.
    cancel_at_ms: Option<u64>,
    max_in_flight_shards: u32,
    max_in_flight_tables: u32,
    download_chunk_bytes: u64,
    heal_at_ms: u64,
    liveness_bound_ms: u64,
    decisions: Vec<CaseDecision>,
}

/// The restore of a generated world, as a case writes it ([`Case::restore_of`]).
struct CaseRestore {
    until_ms: Option<u64>,
    segments: Vec<u64>,
    cancel: bool,
    cancel_at_ms: Option<u64>,
    again_after_ms: Option<u64>,
}

impl Case {
    /// Writes down a generated world with the decisions its run made.
    fn of(world: &World, decisions: &[Decision]) -> Result<Self, ShrinkError> {
        let not_writable = |why: &str| ShrinkError::NotWritable(why.to_string());
        let CaseRestore { until_ms, segments, cancel, cancel_at_ms, again_after_ms } = Case::restore_of(world)
            .ok_or_else(|| {
                not_writable("only generated worlds (one restore of every table, no scheduled faults) shrink")
            })?;
        if !world.scheduled.is_empty() || world.decisions.is_some() {
            return Err(not_writable("only generated worlds (one restore of every table, no scheduled faults) shrink"));
        }
        let mut tables: Vec<CaseTable> = Vec::new();
        for table in &world.tables {
            let spec = &table.spec;
            match spec.index_of {
                None => tables.push(CaseTable {
                    name: spec.name.clone(),
                    ranges: table.shard_map.shards().map(|s| table.shard_map.range(s).start).collect(),
                    indexes: Vec::new(),
                    rows: Vec::new(),
                }),
                Some(base) => {
                    let base_name = &world.table(base).spec.name;
                    let suffix = spec.name.strip_prefix(&format!("{base_name}/")).ok_or_else(|| {
                        not_writable("an index table's name does not start with its table's name and `/`")
                    })?;
                    let owner = tables
                        .iter_mut()
                        .find(|t| t.name == *base_name)
                        .ok_or_else(|| not_writable("an index table comes before its table"))?;
                    owner.indexes.push((suffix.to_string(), spec.shard_count));
                }
            }
        }
        // Every backup in time order, with each base table's content read back from its bundles.
        let mut catalog: Vec<&BackupManifest> = world.catalog.iter().collect();
        catalog.sort_by_key(|m| m.taken_at_ms);
        let mut sources: Vec<Option<Rows>> = vec![None; tables.len()];
        let mut backups = Vec::new();
        for manifest in catalog {
            let full = manifest.kind == BackupKind::Full;
            let mut changes = Vec::new();
            for t in 0..tables.len() {
                let name = tables[t].name.clone();
                let table = world
                    .tables
                    .iter()
                    .find(|w| w.spec.name == name)
                    .ok_or_else(|| not_writable("a table vanished"))?;
                let mut all: Vec<Change> = Vec::new();
                for object in manifest.tables.get(&table.spec.id).into_iter().flatten() {
                    let bytes =
                        world.objects.get(object).ok_or_else(|| not_writable("a catalogued object is not stored"))?;
                    let bundle = Bundle::decode(object, bytes).map_err(|e| ShrinkError::NotWritable(e.to_string()))?;
                    all.extend(bundle.changes);
                }
                let source = &mut sources[t];
                let (upsert, delete) = match (full, source.as_ref()) {
                    (true, None) => {
                        // The first backup: its rows are the source rows before it.
                        let rows: Rows = all.iter().filter_map(upserted).collect();
                        tables[t].rows = rows.iter().map(|(k, v)| (*k, *v)).collect();
                        *source = Some(rows);
                        continue;
                    }
                    (false, None) => return Err(not_writable("the oldest backup is not full")),
                    (true, Some(before)) => {
                        let after: Rows = all.iter().filter_map(upserted).collect();
                        let delete = before.keys().filter(|k| !after.contains_key(k)).copied().collect();
                        let upsert = after.iter().filter(|(k, v)| before.get(k) != Some(v)).map(|(k, v)| (*k, *v));
                        (upsert.collect(), delete)
                    }
                    (false, Some(_)) => {
                        let upsert = all.iter().filter_map(upserted).collect();
                        let delete = all
                            .iter()
                            .filter_map(|c| match c {
                                Change::Delete { key } => Some(*key),
                                Change::Upsert { .. } => None,
                            })
                            .collect();
                        (upsert, delete)
                    }
                };
                let change = CaseChange { table: name, upsert, delete };
                let rows = source.as_mut().expect("set by the oldest backup");
                apply_changes(rows, &change.as_changes());
                if !change.upsert.is_empty() || !change.delete.is_empty() {
                    changes.push(change);
                }
            }
            backups.push(CaseBackup { id: manifest.backup_id, full, at_ms: manifest.taken_at_ms, changes });
        }
        let lost = match world.lost_objects.as_slice() {
            [] => None,
            [lost] => Some((world.node_name(NodeAddr::Shard(lost.tablet)), lost.increment)),
            _ => return Err(not_writable("more than one lost object")),
        };
        let case_decisions = Case::of_decisions(world, decisions);
        let bugs = crate::catalog::names_of(crate::world::Bugs {
            coordinator: world.coordinator.bug,
            shard: world.shard.bug,
            host: world.host_bug,
        });
        Ok(Case {
            seed: world.seed,
            bugs,
            tables,
            backups,
            lost,
            again_after_ms,
            until_ms,
            segments,
            cancel,
            cancel_at_ms,
            max_in_flight_shards: world.coordinator.max_in_flight_shards,
            max_in_flight_tables: world.coordinator.max_in_flight_tables,
            download_chunk_bytes: world.shard.download_chunk_bytes,
            heal_at_ms: world.faults.heal_at_ms,
            liveness_bound_ms: world.liveness_bound_ms,
            decisions: case_decisions,
        })
    }

    /// The restore of a generated world, as a case writes it: the point restored to, the points of the segments
    /// before the last, whether the client cancels it instead of asking for the last, and when the client
    /// restores again after the lost object is back. `None` when the world's calls are not those of a generated
    /// world: a start of operation 1 at 0 ms of every table, to the first point, a continue of it for every
    /// further segment once the one before has ended (or a cancel instead of the last), then perhaps a start of
    /// operation 2 (to the same point, in one go) once operation 1 has ended.
    fn restore_of(world: &World) -> Option<CaseRestore> {
        let mut calls = world.calls.iter().peekable();
        let start = calls.next()?;
        let ClientCall::Start(first) = &start.call else { return None };
        let one_start = first.op == OPERATION_ID
            && start.expect == CallExpect::Started
            && start.at_ms == 0
            && start.after_end_of.is_none()
            && start.after_segment.is_none();
        if !one_start {
            return None;
        }
        let mut points = vec![first.until_ms];
        let mut last_segment = first.last_segment;
        while let Some(call) = calls.next_if(|call| matches!(call.call, ClientCall::Continue(_))) {
            let ClientCall::Continue(next) = &call.call else { return None };
            let segment = u32::try_from(points.len() + 1).ok()?;
            let in_order = next.op == OPERATION_ID
                && next.segment == segment
                && !last_segment
                && call.at_ms == 0
                && call.after_segment == Some((OPERATION_ID, segment - 1));
            if !in_order {
                return None;
            }
            points.push(next.until_ms);
            last_segment = next.last_segment;
        }
        let cancelled = |call: &&PlannedCall| {
            call.call == ClientCall::Cancel { op: OPERATION_ID }
                && call.at_ms == 0
                && call.after_segment == u32::try_from(points.len()).ok().map(|segment| (OPERATION_ID, segment))
        };
        let cancel = !last_segment && calls.next_if(cancelled).is_some();
        if cancel {
            // The last segment, never asked for, went to the point of the whole restore.
            points.push(world.until_ms);
        } else if !last_segment {
            return None;
        }
        // Or in one go, cancelled at a time.
        let cancelled_at = |call: &&PlannedCall| {
            call.call == ClientCall::Cancel { op: OPERATION_ID }
                && call.expect == CallExpect::CancelledOrEnded
                && call.after_end_of.is_none()
                && call.after_segment.is_none()
        };
        let cancel_at_ms = if points.len() == 1 { calls.next_if(cancelled_at).map(|call| call.at_ms) } else { None };
        // Or the same, then a restore again once the first has ended: the lost object back once it failed, or
        // (with no lost object) only if the cancel took.
        let again_after_ms = match calls.next() {
            None => None,
            Some(again)
                if again.after_end_of == Some(OPERATION_ID)
                    && matches!(&again.call, ClientCall::Start(r) if r.op == RESTORED_AGAIN_ID
                        && r.until_ms == world.until_ms && r.last_segment)
                    && again.expect == CallExpect::Started
                    && match again.if_cancelled {
                        None => {
                            !world.lost_objects.is_empty()
                                && world.lost_objects.iter().all(|lost| lost.until_end_of == Some(OPERATION_ID))
                        }
                        Some(op) => op == OPERATION_ID && world.lost_objects.is_empty() && cancel_at_ms.is_some(),
                    } =>
            {
                Some(again.at_ms)
            }
            Some(_) => return None,
        };
        if calls.next().is_some() {
            return None;
        }
        let ops: &[u64] = if again_after_ms.is_some() { &[OPERATION_ID, RESTORED_AGAIN_ID] } else { &[OPERATION_ID] };
        if !world.expected_ops.keys().eq(ops.iter()) {
            return None;
        }
        // A scenario names a point for every segment but the last: the newest backup is a point only at the end.
        let until_ms = points.pop().flatten();
        if until_ms != world.until_ms {
            return None;
        }
        let segments: Option<Vec<u64>> = points.into_iter().collect();
        Some(CaseRestore { until_ms, segments: segments?, cancel, cancel_at_ms, again_after_ms })
    }

    fn size(&self, events: usize) -> Size {
        Size {
            tables: self.tables.iter().map(|t| 1 + t.indexes.len()).sum(),
            tablets: self
                .tables
                .iter()
                .map(|t| t.ranges.len() + t.indexes.iter().map(|i| i.1 as usize).sum::<usize>())
                .sum(),
            backups: self.backups.len(),
            rows_and_changes: self.tables.iter().map(|t| t.rows.len()).sum::<usize>()
                + self.backups.iter().flat_map(|b| &b.changes).map(|c| c.upsert.len() + c.delete.len()).sum::<usize>(),
            decisions: self.decisions.len(),
            events,
        }
    }

    /// The case as a scenario file; `header` lines become comments at the top.
    fn to_toml(&self, header: &[String], description: &str, expect: Option<Invariant>) -> String {
        let mut text = String::new();
        for line in header {
            let _ = writeln!(text, "# {line}");
        }
        let _ = writeln!(text, "description = {}", quote(description));
        let _ = writeln!(text, "seeds = [{}]", self.seed);
        if !self.bugs.is_empty() {
            let bugs: Vec<String> = self.bugs.iter().map(|b| quote(b)).collect();
            let _ = writeln!(text, "bugs = [{}]", bugs.join(", "));
        }
        if let Some(invariant) = expect {
            let _ = writeln!(text, "expect_violation = {}", quote(invariant.name()));
        }
        let _ = writeln!(text, "liveness_bound_ms = {}", self.liveness_bound_ms);
        let _ = writeln!(text, "\n[coordinator]");
        let _ = writeln!(text, "max_in_flight_shards = {}", self.max_in_flight_shards);
        let _ = writeln!(text, "max_in_flight_tables = {}", self.max_in_flight_tables);
        let _ = writeln!(text, "\n[shard]\ndownload_chunk_bytes = {}", self.download_chunk_bytes);
        let _ = writeln!(text, "\n[faults]\nheal_at_ms = {}", self.heal_at_ms);
        for table in &self.tables {
            let _ = writeln!(text, "\n[[table]]\nname = {}", quote(&table.name));
            let ranges: Vec<String> = table.ranges.iter().map(u64::to_string).collect();
            let _ = writeln!(text, "ranges = [{}]", ranges.join(", "));
            if !table.indexes.is_empty() {
                let indexes: Vec<String> = table
                    .indexes
                    .iter()
                    .map(|(name, shards)| format!("{{ name = {}, shards = {shards} }}", quote(name)))
                    .collect();
                let _ = writeln!(text, "indexes = [{}]", indexes.join(", "));
            }
            let _ = writeln!(text, "rows = {}", pairs(&table.rows));
        }
        for backup in &self.backups {
            let kind = if backup.full { "full" } else { "incremental" };
            let _ = writeln!(text, "\n[[backup]]\nid = {}\nkind = \"{kind}\"\nat_ms = {}", backup.id, backup.at_ms);
            for change in &backup.changes {
                let _ = writeln!(text, "[[backup.change]]\ntable = {}", quote(&change.table));
                if !change.upsert.is_empty() {
                    let _ = writeln!(text, "upsert = {}", pairs(&change.upsert));
                }
                if !change.delete.is_empty() {
                    let keys: Vec<String> = change.delete.iter().map(u64::to_string).collect();
                    let _ = writeln!(text, "delete = [{}]", keys.join(", "));
                }
            }
        }
        // Every restore goes to the point; the first in its segments.
        let until = self.until_ms.map(|ms| format!("until_ms = {ms}\n")).unwrap_or_default();
        let segments = if self.segments.is_empty() {
            String::new()
        } else {
            let points: Vec<String> = self.segments.iter().map(u64::to_string).collect();
            let cancel = if self.cancel { "cancel = true\n" } else { "" };
            format!("segments = [{}]\n{cancel}", points.join(", "))
        };
        let segments = match self.cancel_at_ms {
            Some(at_ms) => format!("{segments}cancel_at_ms = {at_ms}\n"),
            None => segments,
        };
        let declared = self.until_ms.is_some() || !self.segments.is_empty() || self.cancel_at_ms.is_some();
        if self.lost.is_none() && declared {
            let _ = write!(text, "\n[[restore]]\nop = {OPERATION_ID}\n{until}{segments}");
            if self.cancel {
                let _ = writeln!(text, "outcome = \"failed:cancelled\"");
            }
            // Without a lost object, a restore again follows a cancel that took.
            if let Some(at_ms) = self.again_after_ms {
                let _ = writeln!(
                    text,
                    "\n[[restore]]\nop = {RESTORED_AGAIN_ID}\nafter_ended = {OPERATION_ID}\nif_cancelled = {OPERATION_ID}\nat_ms = {at_ms}\n{until}outcome = \"done\""
                );
            }
        }
        if let Some((tablet, increment)) = &self.lost {
            let _ = write!(text, "\n[[restore]]\nop = {OPERATION_ID}\n{until}{segments}");
            let _ = writeln!(text, "outcome = \"failed:object-missing\"");
            if let Some(at_ms) = self.again_after_ms {
                let _ = writeln!(
                    text,
                    "\n[[restore]]\nop = {RESTORED_AGAIN_ID}\nafter_ended = {OPERATION_ID}\nat_ms = {at_ms}\n{until}outcome = \"done\""
                );
            }
            let _ = writeln!(
                text,
                "\n[[fault]]\ndo = \"lose-object\"\ntablet = {}\nincrement = {increment}",
                quote(tablet)
            );
            if self.again_after_ms.is_some() {
                let _ = writeln!(text, "until_ended = {OPERATION_ID}");
            }
        }
        for decision in &self.decisions {
            let _ = writeln!(text, "\n[[decision]]\nfault = \"{}\"\nnode = {}", decision.kind, quote(&decision.node));
            if let Some(nth) = decision.nth {
                let _ = writeln!(text, "nth = {nth}");
            }
            if let Some(at_ms) = decision.at_ms {
                let _ = writeln!(text, "at_ms = {at_ms}");
            }
        }
        text
    }

    fn without_table(&self, index: usize) -> Option<Case> {
        if self.tables.len() < 2 {
            return None;
        }
        let mut case = self.clone();
        let table = case.tables.remove(index);
        let mut names: BTreeSet<String> = table.indexes.iter().map(|(i, _)| format!("{}/{i}", table.name)).collect();
        names.insert(table.name.clone());
        let of_table = |node: &str| node.rsplit_once('/').is_some_and(|(t, _)| names.contains(t));
        if case.lost.as_ref().is_some_and(|(tablet, _)| of_table(tablet)) {
            return None;
        }
        for backup in &mut case.backups {
            backup.changes.retain(|c| c.table != table.name);
        }
        case.decisions.retain(|d| !of_table(&d.node));
        Some(case)
    }

    fn without_index(&self, table: usize, index: usize) -> Case {
        let mut case = self.clone();
        let (name, _) = case.tables[table].indexes.remove(index);
        let full = format!("{}/{name}", case.tables[table].name);
        case.decisions.retain(|d| d.node.rsplit_once('/').is_none_or(|(t, _)| t != full));
        case
    }

    /// Shards `gone` and `gone - 1` of `table` merged into one (shard `gone - 1`): the faults of shard `keep`
    /// (one of the two) stay, renamed to the merged shard, those of the other go; later shards move down by one.
    fn with_shards_merged(&self, table: usize, gone: usize, keep: usize) -> Option<Case> {
        let mut case = self.clone();
        let t = &mut case.tables[table];
        if gone == 0 || gone >= t.ranges.len() {
            return None;
        }
        t.ranges.remove(gone);
        let name = t.name.clone();
        // The new name of a shard of this table, `None` when its faults go.
        let renamed = |shard: usize| -> Option<usize> {
            match shard {
                s if s == gone || s == gone - 1 => (s == keep).then_some(gone - 1),
                s if s > gone => Some(s - 1),
                s => Some(s),
            }
        };
        let rename = |node: &str| -> Option<Option<String>> {
            let (table, shard) = node.rsplit_once('/')?;
            if table != name {
                return None;
            }
            let shard: usize = shard.parse().ok()?;
            Some(renamed(shard).map(|s| format!("{name}/{s}")))
        };
        if let Some((tablet, _)) = &mut case.lost
            && let Some(new) = rename(tablet)
        {
            *tablet = new?;
        }
        let mut decisions = Vec::new();
        for mut decision in std::mem::take(&mut case.decisions) {
            match rename(&decision.node) {
                None => decisions.push(decision),
                Some(None) => {}
                Some(Some(new)) => {
                    decision.node = new;
                    decisions.push(decision);
                }
            }
        }
        case.decisions = decisions;
        Some(case)
    }
}

impl CaseChange {
    fn as_changes(&self) -> Vec<Change> {
        let deletes = self.delete.iter().map(|&key| Change::Delete { key });
        deletes.chain(self.upsert.iter().map(|&(key, value)| Change::Upsert { key, value })).collect()
    }
}

fn upserted(change: &Change) -> Option<(Key, Value)> {
    match change {
        Change::Upsert { key, value } => Some((*key, *value)),
        Change::Delete { .. } => None,
    }
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn pairs(rows: &[(Key, Value)]) -> String {
    let items: Vec<String> = rows.iter().map(|(k, v)| format!("[{k}, {v}]")).collect();
    format!("[{}]", items.join(", "))
}

/// One entry of a backup's changes, for shrinking them one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Upsert(String, Key, Value),
    Delete(String, Key),
}

fn entries_of(changes: &[CaseChange]) -> Vec<Entry> {
    let mut entries = Vec::new();
    for change in changes {
        entries.extend(change.delete.iter().map(|k| Entry::Delete(change.table.clone(), *k)));
        entries.extend(change.upsert.iter().map(|(k, v)| Entry::Upsert(change.table.clone(), *k, *v)));
    }
    entries
}

fn changes_of(entries: &[Entry]) -> Vec<CaseChange> {
    let mut changes: Vec<CaseChange> = Vec::new();
    for entry in entries {
        let table = match entry {
            Entry::Upsert(table, ..) | Entry::Delete(table, _) => table,
        };
        let position = match changes.iter().position(|c| c.table == *table) {
            Some(position) => position,
            None => {
                changes.push(CaseChange { table: table.clone(), upsert: Vec::new(), delete: Vec::new() });
                changes.len() - 1
            }
        };
        match entry {
            Entry::Upsert(_, k, v) => changes[position].upsert.push((*k, *v)),
            Entry::Delete(_, k) => changes[position].delete.push(*k),
        }
    }
    changes
}

/// Takes away chunks of `items` (halves, then quarters, ... then single items) for as long as `still_fails`
/// says the rest still fails.
fn shrink_list<T: Clone>(items: Vec<T>, mut still_fails: impl FnMut(&[T]) -> bool) -> Vec<T> {
    let mut items = items;
    let mut chunk = items.len().div_ceil(2);
    while chunk >= 1 && !items.is_empty() {
        let mut start = 0;
        while start < items.len() {
            let end = (start + chunk).min(items.len());
            let candidate: Vec<T> = items[..start].iter().chain(&items[end..]).cloned().collect();
            if still_fails(&candidate) {
                items = candidate;
            } else {
                start = end;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    items
}

struct Shrinker {
    seed: u64,
    invariant: Invariant,
    best: Case,
    best_events: usize,
    /// Decisions the best case's run actually used.
    best_used: Vec<CaseDecision>,
    runs: usize,
    max_runs: usize,
    progress: Box<dyn FnMut(usize, Size)>,
}

impl Shrinker {
    /// Runs `candidate`; keeps it as the best case when it still breaks the invariant.
    fn accept(&mut self, candidate: Case) -> bool {
        if self.runs >= self.max_runs || candidate == self.best {
            return false;
        }
        self.runs += 1;
        let Some((events, used)) = run_case(&candidate, self.invariant) else { return false };
        self.best = candidate;
        self.best_events = events;
        self.best_used = used;
        (self.progress)(self.runs, self.best.size(self.best_events));
        true
    }

    fn pass_unused_decisions(&mut self) -> bool {
        let mut case = self.best.clone();
        case.decisions.retain(|d| self.best_used.contains(d));
        self.accept(case)
    }

    fn pass_decisions(&mut self) -> bool {
        let before = self.best.decisions.len();
        let items = self.best.decisions.clone();
        shrink_list(items, |list| {
            let mut case = self.best.clone();
            case.decisions = list.to_vec();
            self.accept(case)
        });
        self.best.decisions.len() < before
    }

    /// Each decision at an earlier chance (0, half, one less), so that a shorter run can still reach it.
    fn pass_earlier_chances(&mut self) -> bool {
        let mut changed = false;
        for d in 0..self.best.decisions.len() {
            let Some(nth) = self.best.decisions.get(d).and_then(|d| d.nth) else { continue };
            for earlier in [0, nth / 2, nth.saturating_sub(1)] {
                if earlier >= nth {
                    continue;
                }
                let mut case = self.best.clone();
                case.decisions[d].nth = Some(earlier);
                if self.accept(case) {
                    changed = true;
                    break;
                }
            }
        }
        changed
    }

    fn pass_tables(&mut self) -> bool {
        let mut changed = false;
        let mut t = 0;
        while t < self.best.tables.len() {
            let accepted = self.best.without_table(t).is_some_and(|case| self.accept(case));
            if accepted {
                changed = true;
            } else {
                t += 1;
            }
        }
        for t in 0..self.best.tables.len() {
            let mut i = 0;
            while i < self.best.tables[t].indexes.len() {
                if self.accept(self.best.without_index(t, i)) {
                    changed = true;
                } else {
                    i += 1;
                }
            }
        }
        changed
    }

    fn pass_shards(&mut self) -> bool {
        let mut changed = false;
        for t in 0..self.best.tables.len() {
            // From the last shard down, each merged with the one before, keeping either one's faults.
            let mut gone = self.best.tables[t].ranges.len().saturating_sub(1);
            while gone >= 1 {
                let merged = [gone, gone - 1]
                    .into_iter()
                    .any(|keep| self.best.with_shards_merged(t, gone, keep).is_some_and(|case| self.accept(case)));
                changed |= merged;
                gone = gone.min(self.best.tables[t].ranges.len()) - 1;
            }
            for i in 0..self.best.tables[t].indexes.len() {
                while self.best.tables[t].indexes[i].1 > 1 {
                    let mut case = self.best.clone();
                    let (name, shards) = &mut case.tables[t].indexes[i];
                    *shards -= 1;
                    let gone = format!("{}/{name}/{shards}", self.best.tables[t].name);
                    if case.lost.as_ref().is_some_and(|(tablet, _)| *tablet == gone) {
                        break;
                    }
                    case.decisions.retain(|d| d.node != gone);
                    if !self.accept(case) {
                        break;
                    }
                    changed = true;
                }
            }
        }
        changed
    }

    fn pass_backups(&mut self) -> bool {
        let before = self.best.backups.len();
        let items = self.best.backups.clone();
        shrink_list(items, |list| {
            let mut case = self.best.clone();
            case.backups = list.to_vec();
            self.accept(case)
        });
        self.best.backups.len() < before
    }

    /// Fewer segments: points taken away (each joins its segment to the next), for as long as it still fails.
    fn pass_segments(&mut self) -> bool {
        let before = self.best.segments.len();
        let items = self.best.segments.clone();
        shrink_list(items, |list| {
            let mut case = self.best.clone();
            case.segments = list.to_vec();
            self.accept(case)
        });
        self.best.segments.len() < before
    }

    /// Knobs down to the smallest that still fail: one request and one table in flight at a time.
    fn pass_knobs(&mut self) -> bool {
        let mut changed = false;
        for knob in [0, 1] {
            let mut case = self.best.clone();
            let value = if knob == 0 { &mut case.max_in_flight_shards } else { &mut case.max_in_flight_tables };
            if *value > 1 {
                *value = 1;
                changed |= self.accept(case);
            }
        }
        changed
    }

    /// Values (not keys: they decide shards) renumbered small, all at once: 1, 2, 3, ... in order of appearance.
    fn pass_values(&mut self) -> bool {
        let mut case = self.best.clone();
        let mut next = 0;
        let mut small = |_: Value| {
            next += 1;
            next
        };
        for table in &mut case.tables {
            table.rows.iter_mut().for_each(|(_, v)| *v = small(*v));
        }
        for change in case.backups.iter_mut().flat_map(|b| &mut b.changes) {
            change.upsert.iter_mut().for_each(|(_, v)| *v = small(*v));
        }
        self.accept(case)
    }

    /// No cancel: the restore runs to its end (or, in segments, the client asks for the last one).
    fn pass_cancel(&mut self) -> bool {
        if self.best.cancel_at_ms.is_none() && !self.best.cancel {
            return false;
        }
        // Without a lost object, a restore again follows the cancel: first without it, then without both.
        if self.best.lost.is_none() && self.best.again_after_ms.is_some() {
            let mut case = self.best.clone();
            case.again_after_ms = None;
            if self.accept(case) {
                return true;
            }
        }
        let mut case = self.best.clone();
        (case.cancel_at_ms, case.cancel) = (None, false);
        if case.lost.is_none() {
            case.again_after_ms = None;
        }
        self.accept(case)
    }

    fn pass_lost_object(&mut self) -> bool {
        if self.best.lost.is_none() {
            return false;
        }
        // Restoring again without a lost object first is a different world: it goes with the object.
        if self.best.again_after_ms.is_some() {
            let mut case = self.best.clone();
            case.again_after_ms = None;
            if self.accept(case) {
                return true;
            }
        }
        let mut case = self.best.clone();
        (case.lost, case.again_after_ms) = (None, None);
        self.accept(case)
    }

    fn pass_rows(&mut self) -> bool {
        let before = self.best.size(0).rows_and_changes;
        for t in 0..self.best.tables.len() {
            let items = self.best.tables[t].rows.clone();
            shrink_list(items, |list| {
                let mut case = self.best.clone();
                case.tables[t].rows = list.to_vec();
                self.accept(case)
            });
        }
        for b in 0..self.best.backups.len() {
            let items = entries_of(&self.best.backups[b].changes);
            shrink_list(items, |list| {
                let mut case = self.best.clone();
                case.backups[b].changes = changes_of(list);
                self.accept(case)
            });
        }
        self.best.size(0).rows_and_changes < before
    }
}

/// Runs a candidate as the scenario file it would be written as. `Some((events, decisions used))` when it
/// breaks `invariant`.
fn run_case(case: &Case, invariant: Invariant) -> Option<(usize, Vec<CaseDecision>)> {
    let text = case.to_toml(&[], "a candidate of the shrinker", None);
    let scenario = Scenario::parse("candidate", "candidate", &text).ok()?;
    let world = scenario.world(case.seed);
    let outcome = run_seed(&world, Keep::Verdict);
    if outcome.panic.is_some() || !outcome.violations.iter().any(|v| v.invariant == invariant && !v.of_the_scenario) {
        return None;
    }
    let used = Case::of_decisions(&world, &outcome.decisions.decisions());
    Some((outcome.events, used))
}

/// A node as scenario files name it.
impl Case {
    fn of_decisions(world: &World, decisions: &[Decision]) -> Vec<CaseDecision> {
        let name = |node: NodeAddr| world.node_name(node);
        decisions
            .iter()
            .map(|d| match d {
                Decision::Chance(c) => CaseDecision { kind: c.kind, node: name(c.node), nth: Some(c.nth), at_ms: None },
                Decision::Reboot(r) => {
                    CaseDecision { kind: r.kind(), node: name(r.node), nth: None, at_ms: Some(r.at_ms) }
                }
            })
            .collect()
    }
}

/// Shrinks a failing seed of a generated world. `invariant` picks which broken invariant to keep breaking
/// (default: the first the seed broke); `command` is the command line that made the seed fail, for the file's
/// header; `progress` hears of every smaller case found.
pub fn shrink(
    world: &World,
    invariant: Option<Invariant>,
    command: &str,
    max_runs: usize,
    progress: Box<dyn FnMut(usize, Size)>,
) -> Result<Shrunk, ShrinkError> {
    let seed = world.seed;
    let outcome = run_seed(world, Keep::Verdict);
    if let Some(message) = outcome.panic {
        return Err(ShrinkError::Panicked { seed, message });
    }
    let first = outcome.violations.first().ok_or(ShrinkError::Passes(seed))?.invariant;
    let invariant = invariant.unwrap_or(first);
    if !outcome.violations.iter().any(|v| v.invariant == invariant) {
        let broke: Vec<&str> = outcome.violations.iter().map(|v| v.invariant.name()).collect();
        return Err(ShrinkError::OtherInvariant { seed, broke: broke.join(", "), wanted: invariant });
    }
    let case = Case::of(world, &outcome.decisions.decisions())?;
    let before = case.size(outcome.events);
    // The case as written must be the same failure before anything is taken away.
    let (events, used) = run_case(&case, invariant).ok_or(ShrinkError::NotReproduced { seed, invariant })?;
    let mut shrinker =
        Shrinker { seed, invariant, best: case, best_events: events, best_used: used, runs: 1, max_runs, progress };
    loop {
        let mut changed = shrinker.pass_unused_decisions();
        changed |= shrinker.pass_lost_object();
        changed |= shrinker.pass_cancel();
        changed |= shrinker.pass_tables();
        changed |= shrinker.pass_decisions();
        changed |= shrinker.pass_earlier_chances();
        changed |= shrinker.pass_backups();
        changed |= shrinker.pass_segments();
        changed |= shrinker.pass_shards();
        changed |= shrinker.pass_rows();
        changed |= shrinker.pass_knobs();
        if !changed || shrinker.runs >= shrinker.max_runs {
            break;
        }
    }
    // Readability last: it may not keep the failure (a value can matter), and then nothing changes.
    shrinker.pass_values();
    let after = shrinker.best.size(shrinker.best_events);
    let bugs =
        if shrinker.best.bugs.is_empty() { String::new() } else { format!(" with {}", shrinker.best.bugs.join(", ")) };
    let description = format!(
        "Seed {} of a generated world{bugs} breaks {invariant}; shrunk by `cargo sim shrink` to the smallest world \
         and fewest faults that still break it.",
        shrinker.seed
    );
    let header = vec![format!("Shrunk from: {command}"), format!("before: {before}"), format!("after:  {after}")];
    let scenario = shrinker.best.to_toml(&header, &description, Some(invariant));
    Ok(Shrunk { seed, invariant, before, after, runs: shrinker.runs, scenario })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultPlan;
    use crate::world::WorldParams;

    /// What a planned call asks and expects, without the catalog it carries (the written file lists backups in
    /// time order, a generated store in none).
    fn asked(call: &PlannedCall) -> String {
        let what = match &call.call {
            ClientCall::Start(r) => {
                let tables: Vec<&str> = r.tables.iter().map(|t| t.name.as_str()).collect();
                format!("start {} of {tables:?} to {:?}, last {}", r.op, r.until_ms, r.last_segment)
            }
            ClientCall::Continue(r) => {
                format!("continue {} segment {} to {:?}, last {}", r.op, r.segment, r.until_ms, r.last_segment)
            }
            other => format!("{other:?}"),
        };
        format!(
            "{what} at {} after {:?}/{:?} if cancelled {:?}: {}",
            call.at_ms, call.after_end_of, call.after_segment, call.if_cancelled, call.expect
        )
    }

    /// A generated world that restores to a point in time, in segments (cancelled before the last, or not) or in
    /// one go (cancelled at a time, or not), with or without a lost object and a restore again, written down as a
    /// case and loaded back is the same restore: the same calls, expectations, chain, point and oracle.
    #[test]
    fn a_world_restored_to_a_point_in_segments_is_written_down_as_the_same_restore() {
        let params = WorldParams {
            faults: Some(FaultPlan::none()),
            lost_object_probability: 0.5,
            restore_again_probability: 0.5,
            point_in_time_probability: 1.0,
            cancel_probability: 0.5,
            ..WorldParams::default()
        };
        let (mut segmented, mut lost_in_segments, mut again, mut cancelled) = (0, 0, 0, 0);
        let (mut cancelled_mid_run, mut again_once_cancelled) = (0, 0);
        for seed in 0..60 {
            let world = World::generate(seed, &params);
            let case = Case::of(&world, &[]).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let text = case.to_toml(&[], "round trip", None);
            let scenario =
                Scenario::parse("case", "case.toml", &text).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
            let written = scenario.world(seed);
            let calls = |w: &World| w.calls.iter().map(asked).collect::<Vec<_>>();
            assert_eq!(calls(&written), calls(&world), "seed {seed}:\n{text}");
            assert_eq!(written.expected_ops, world.expected_ops, "seed {seed}");
            assert_eq!(written.until_ms, world.until_ms, "seed {seed}");
            assert_eq!(written.chain_backup_ids, world.chain_backup_ids, "seed {seed}");
            assert_eq!(written.lost_objects, world.lost_objects, "seed {seed}");
            for (a, b) in written.tables.iter().zip(&world.tables) {
                assert_eq!((&a.spec.name, &a.expected_rows), (&b.spec.name, &b.expected_rows), "seed {seed}");
            }
            segmented += usize::from(world.segments() > 1);
            lost_in_segments += usize::from(world.segments() > 1 && !world.lost_objects.is_empty());
            again += usize::from(world.expected_ops.len() > 1);
            cancelled += usize::from(world.cancels());
            cancelled_mid_run += usize::from(world.cancels_mid_run());
            again_once_cancelled += usize::from(world.calls.iter().any(|c| c.if_cancelled.is_some()));
        }
        assert!(
            segmented > 20
                && lost_in_segments > 5
                && again > 5
                && cancelled > 2
                && cancelled_mid_run > 5
                && again_once_cancelled > 2,
            "{segmented} {lost_in_segments} {again} {cancelled} {cancelled_mid_run} {again_once_cancelled}"
        );
    }
}
