//! Invariant checkers. They run after a seed, outside the nodes, and only read: the event log and the final
//! durable state. Each violation names its invariant and the first event that broke it.

use std::collections::BTreeMap;
use std::fmt;

use lockstep::coordinator::{CoordinatorDurable, OperationStatus, ProgressMark, progress_of};
use lockstep::host::HostEvent;
use lockstep::model::{BackupManifest, IncrementIndex, TabletId};
use lockstep::protocol::OperationId;
use lockstep::protocol::{ClientAnswer, ClientCall, ClientReply, Message, NodeAddr, PersistNote};
use lockstep::shard::ShardDurable;

use crate::events::{Event, EventKind, SimNode};
use crate::plan::{OpExpect, PlannedCall};
use crate::tape::Chance;
use crate::world::World;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Invariant {
    /// Every tablet applies full, 1, 2, ... with no gap, no changing repeat, no regression across reboots, and no
    /// tablet of any table applies k+1 before every tablet of every table has durably applied k.
    InOrderApply,
    /// At Done every tablet's rows equal the oracle.
    NoLostIncrement,
    /// Done only when every tablet durably holds every increment.
    NoFalseSuccess,
    /// Only intact bundles are applied: the checksum a shard computes over the payload it applied is the one the
    /// intact bundle's header records.
    CorruptNeverApplied,
    /// Coordinator progress never goes backwards, across reboots included.
    ProgressNeverBackwards,
    /// The operation ends as the world demands: Done, or (object lost for good) a clean Failed naming the
    /// increment and tablet.
    ExpectedOutcome,
    /// After healing, the operation ends within the bound.
    Liveness,
    /// An ended operation leaves nothing held behind: at the end of the run no table is still restoring under it,
    /// no collection is still in use by it, and the coordinator's disk holds no file its durable state no longer
    /// refers to (a restore chain of an operation that has ended).
    CleanedUp,
    /// A restore in segments does its final work (its tables made readable, its collection released) only at the
    /// end of its last segment: never when an earlier segment ends.
    FinalWorkAtTheEnd,
}

impl Invariant {
    pub const ALL: [Invariant; 9] = [
        Invariant::InOrderApply,
        Invariant::NoLostIncrement,
        Invariant::NoFalseSuccess,
        Invariant::CorruptNeverApplied,
        Invariant::ProgressNeverBackwards,
        Invariant::ExpectedOutcome,
        Invariant::Liveness,
        Invariant::CleanedUp,
        Invariant::FinalWorkAtTheEnd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Invariant::InOrderApply => "in-order-apply",
            Invariant::NoLostIncrement => "no-lost-increment",
            Invariant::NoFalseSuccess => "no-false-success",
            Invariant::CorruptNeverApplied => "corrupt-never-applied",
            Invariant::ProgressNeverBackwards => "progress-never-backwards",
            Invariant::ExpectedOutcome => "expected-outcome",
            Invariant::Liveness => "liveness",
            Invariant::CleanedUp => "cleaned-up",
            Invariant::FinalWorkAtTheEnd => "final-work-at-the-end",
        }
    }

    pub fn is_liveness(self) -> bool {
        self == Invariant::Liveness
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    /// Index in the event log of the first offending event, when one event is to blame.
    pub event_index: Option<usize>,
    pub event_text: Option<String>,
    pub detail: String,
    /// The run did not go as its scenario says (see [`unfired_decisions`]): a fault of the scenario's, not of the
    /// protocol. The shrinker does not take it for the failure it keeps.
    pub of_the_scenario: bool,
}

/// The line a trace shows under the first offending event of `invariants` (event `index` of the log).
pub fn offending_mark(index: usize, invariants: &[Invariant]) -> String {
    let names: Vec<&str> = invariants.iter().map(|invariant| invariant.name()).collect();
    format!("          ^^^ event #{index}: first offending event of {}", names.join(", "))
}

/// The events to mark in a trace: each first offending event, with the invariants it broke.
pub fn offending_events(violations: &[Violation]) -> BTreeMap<usize, Vec<Invariant>> {
    let mut marks: BTreeMap<usize, Vec<Invariant>> = BTreeMap::new();
    for violation in violations {
        if let Some(index) = violation.event_index {
            marks.entry(index).or_default().push(violation.invariant);
        }
    }
    marks
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant {} violated: {}", self.invariant, self.detail)?;
        if let (Some(index), Some(text)) = (self.event_index, &self.event_text) {
            write!(f, "\n    first offending event #{index}: {}", text.trim())?;
        }
        Ok(())
    }
}

/// What the world looks like when the run stops.
#[derive(Clone, Debug)]
pub struct FinalState {
    pub coordinator: Option<CoordinatorDurable>,
    pub shards: BTreeMap<TabletId, Option<ShardDurable>>,
    /// The run reached its time bound without the operation ending.
    pub timed_out: bool,
    /// The durable files on the coordinator's disk, in name order, if it was up at the end of the run (a node
    /// that is down may yet have to remove what a crash kept it from removing).
    pub coordinator_files: Option<Vec<String>>,
}

/// Runs every checker; returns violations in event order (final-state violations last).
pub fn check(world: &World, log: &[Event], final_state: &FinalState) -> Vec<Violation> {
    let mut walker = Walker::new(world, log);
    for (index, event) in log.iter().enumerate() {
        walker.step(index, event);
    }
    let mut violations = std::mem::take(&mut walker.violations);
    check_final(world, &walker, final_state, &mut violations);
    violations
}

struct Walker<'a> {
    world: &'a World,
    log: &'a [Event],
    /// Tablets each planned operation restores.
    op_tablets: BTreeMap<OperationId, Vec<TabletId>>,
    /// Highest increment each tablet holds durably, of which operation, with the checksum of the bundle.
    applied: BTreeMap<TabletId, Option<(OperationId, IncrementIndex, u32)>>,
    /// Highest increment of each operation each tablet has ever durably applied (a newer operation may have
    /// restored over it since).
    reached: BTreeMap<(OperationId, TabletId), IncrementIndex>,
    /// The newest operation each tablet has durably applied an increment of.
    newest_op: BTreeMap<TabletId, OperationId>,
    /// Last durable progress of each operation not forgotten.
    progress: BTreeMap<OperationId, ProgressMark>,
    /// Last durable progress of every operation ever seen, forgotten ones included.
    last_seen: BTreeMap<OperationId, ProgressMark>,
    /// The first answer the client got to each call, by call id.
    answers: BTreeMap<u64, ClientAnswer>,
    violations: Vec<Violation>,
}

impl<'a> Walker<'a> {
    fn new(world: &'a World, log: &'a [Event]) -> Self {
        let applied = world.tablets().map(|t| (t, None)).collect();
        let op_tablets = world.expected_ops.keys().map(|op| (*op, world.tablets_of(*op))).collect();
        Self {
            world,
            log,
            op_tablets,
            applied,
            reached: BTreeMap::new(),
            newest_op: BTreeMap::new(),
            progress: BTreeMap::new(),
            last_seen: BTreeMap::new(),
            answers: BTreeMap::new(),
            violations: Vec::new(),
        }
    }

    fn violate(&mut self, invariant: Invariant, index: usize, detail: String) {
        // One violation per invariant is enough to name the first offending event.
        if self.violations.iter().any(|v| v.invariant == invariant) {
            return;
        }
        let event_text = Some(self.log[index].to_string());
        self.violations.push(Violation {
            invariant,
            event_index: Some(index),
            event_text,
            detail,
            of_the_scenario: false,
        });
    }

    fn step(&mut self, index: usize, event: &Event) {
        let EventKind::Host(host) = &event.kind else { return };
        match (event.node, host) {
            (
                SimNode::Protocol(NodeAddr::Shard(tablet)),
                HostEvent::Persisted(PersistNote::ShardApplied { op, increment, backup_id, payload_crc32 }),
            ) => self.on_applied(index, tablet, *op, *increment, *backup_id, *payload_crc32),
            (SimNode::Protocol(NodeAddr::Shard(tablet)), HostEvent::ShardBooted { loaded }) => {
                let loaded = loaded.as_ref().and_then(|s| s.op.zip(s.applied_through));
                let durable = self.applied.get(&tablet).copied().flatten().map(|(op, k, _)| (op, k));
                if loaded != durable {
                    let detail = format!("{tablet} rebooted holding {loaded:?} but had durably applied {durable:?}");
                    self.violate(Invariant::InOrderApply, index, detail);
                }
            }
            (SimNode::Protocol(NodeAddr::Coordinator), HostEvent::Persisted(PersistNote::Coordinator(marks))) => {
                // An operation missing from a persisted state was forgotten.
                self.progress.retain(|op, _| marks.iter().any(|m| m.op() == *op));
                for mark in marks {
                    self.on_progress(index, *mark);
                }
            }
            (SimNode::Protocol(NodeAddr::Coordinator), HostEvent::CoordinatorBooted { loaded, .. }) => {
                let loaded = loaded.as_ref().map(progress_of).unwrap_or_default();
                for (op, durable) in &self.progress {
                    let reloaded = loaded.iter().find(|m| m.op() == *op).copied();
                    if reloaded.is_none_or(|mark| mark.rank() < durable.rank()) {
                        let detail = format!("coordinator rebooted into {reloaded:?} after durable {durable:?}");
                        self.violate(Invariant::ProgressNeverBackwards, index, detail);
                        break;
                    }
                }
            }
            (SimNode::Protocol(NodeAddr::Client), HostEvent::Received { msg: Message::ClientReply(reply), .. }) => {
                self.answers.entry(reply.call_id).or_insert_with(|| reply.answer.clone());
            }
            _ => {}
        }
    }

    fn on_applied(
        &mut self,
        index: usize,
        tablet: TabletId,
        op: OperationId,
        increment: IncrementIndex,
        backup_id: u64,
        crc: u32,
    ) {
        // A shard refuses an older operation's request once it holds a newer one's rows: applying it would put
        // the older restore's rows back over the newer one's.
        if let Some(newer) = self.newest_op.get(&tablet).copied().filter(|newer| *newer > op) {
            let detail =
                format!("{tablet} applied increment {increment} of operation {op} over the rows of operation {newer}");
            self.violate(Invariant::NoLostIncrement, index, detail);
        }
        let newest = self.newest_op.entry(tablet).or_insert(op);
        *newest = (*newest).max(op);
        // A new operation on a tablet starts over from its full backup.
        let previous =
            self.applied.get(&tablet).copied().flatten().filter(|(o, _, _)| *o == op).map(|(_, k, c)| (k, c));
        match previous {
            Some((k, previous_crc)) if k == increment && previous_crc == crc => return,
            Some((k, _)) if k == increment => {
                self.violate(
                    Invariant::InOrderApply,
                    index,
                    format!("{tablet} re-applied increment {k} with other data"),
                );
            }
            _ => {
                let expected = previous.map_or(0, |(k, _)| k + 1);
                if increment != expected {
                    let detail = format!("{tablet} applied increment {increment} when the next one was {expected}");
                    self.violate(Invariant::InOrderApply, index, detail);
                }
            }
        }
        if increment > 0 {
            let tablets = self.op_tablets.get(&op).cloned().unwrap_or_default();
            // What the other tablets durably applied of this operation, even if a newer operation has since
            // restored over it (after this one failed).
            let behind = tablets
                .iter()
                .find(|other| **other != tablet && self.reached.get(&(op, **other)).is_none_or(|k| *k < increment - 1));
            if let Some(first) = behind {
                let detail = format!(
                    "{tablet} applied increment {increment} before {first} durably applied increment {}",
                    increment - 1
                );
                self.violate(Invariant::InOrderApply, index, detail);
            }
        }
        match self.world.chain_backup_ids.get(increment as usize) {
            Some(expected_backup) if *expected_backup == backup_id => {
                let object = BackupManifest::object_name(backup_id, tablet);
                if self.world.intact_payload_crc32(&object) != Some(crc) {
                    let detail = format!("{tablet} applied increment {increment} from a damaged copy of {object}");
                    self.violate(Invariant::CorruptNeverApplied, index, detail);
                }
            }
            expected => {
                let detail =
                    format!("{tablet} applied backup {backup_id} as increment {increment}, expected {expected:?}");
                self.violate(Invariant::InOrderApply, index, detail);
            }
        }
        self.applied.insert(tablet, Some((op, increment, crc)));
        let reached = self.reached.entry((op, tablet)).or_insert(increment);
        *reached = (*reached).max(increment);
    }

    fn on_progress(&mut self, index: usize, mark: ProgressMark) {
        let op = mark.op();
        if let Some(previous) = self.progress.get(&op)
            && mark.rank() < previous.rank()
        {
            let detail = format!("coordinator persisted {mark:?} after {previous:?}");
            self.violate(Invariant::ProgressNeverBackwards, index, detail);
        }
        // An end is final: an operation that ended Done never turns Failed, nor the other way.
        if let Some(previous) = self.progress.get(&op)
            && previous.is_end()
            && mark.is_end()
            && std::mem::discriminant(previous) != std::mem::discriminant(&mark)
        {
            let detail = format!("coordinator persisted {mark:?} after {previous:?}: an ended operation's end changed");
            self.violate(Invariant::ProgressNeverBackwards, index, detail);
        }
        self.progress.insert(op, mark);
        self.last_seen.insert(op, mark);
        match mark {
            ProgressMark::Done { increments, .. } => {
                let missing = self.not_holding(op, self.world.chain_len);
                if !missing.is_empty() || increments != self.world.chain_len {
                    let detail = format!(
                        "operation {op} Done with {increments} of {} increments while {}",
                        self.world.chain_len,
                        if missing.is_empty() { "every tablet is done".to_string() } else { missing.join(", ") }
                    );
                    self.violate(Invariant::NoFalseSuccess, index, detail);
                }
            }
            ProgressMark::AwaitingSegment { segment, increments, released, .. } => {
                let missing = self.not_holding(op, increments);
                if !missing.is_empty() {
                    let detail = format!(
                        "operation {op} ended segment {segment} at {increments} increments while {}",
                        missing.join(", ")
                    );
                    self.violate(Invariant::NoFalseSuccess, index, detail);
                }
                if released {
                    let detail = format!(
                        "operation {op} let go of its tables or its collection when segment {segment} ended, with \
                         segments still to come"
                    );
                    self.violate(Invariant::FinalWorkAtTheEnd, index, detail);
                }
            }
            ProgressMark::Running { .. } | ProgressMark::Failed { .. } => {}
        }
    }

    /// The tablets of `op` that do not durably hold its first `increments` increments, each with what it holds.
    fn not_holding(&self, op: OperationId, increments: u32) -> Vec<String> {
        let tablets = self.op_tablets.get(&op).map(Vec::as_slice).unwrap_or_default();
        tablets
            .iter()
            .map(|t| (t, self.applied.get(t).copied().flatten().filter(|(o, _, _)| *o == op)))
            .filter(|(_, a)| a.is_none_or(|(_, k, _)| k + 1 < increments))
            .map(|(t, a)| format!("{t} holds {:?}", a.map(|(_, k, _)| k)))
            .collect()
    }
}

fn final_violation(invariant: Invariant, detail: String) -> Violation {
    Violation { invariant, event_index: None, event_text: None, detail, of_the_scenario: false }
}

/// The decisions a world pins (a scenario's `[[decision]]`s) that its run never came to, each given with how many
/// chances of its kind its node had in the whole run (`SimState::unfired_chances`). A pinned fault that never
/// fired leaves a run that is not the one the scenario describes, whatever else it shows: an expected outcome
/// reached without it proves nothing. One violation lists them all.
pub fn unfired_decisions(world: &World, unfired: &[(Chance, u32)]) -> Option<Violation> {
    if unfired.is_empty() {
        return None;
    }
    let list: Vec<String> = unfired
        .iter()
        .map(|(chance, had)| {
            let node = world.node_name(chance.node);
            let why = if chance.nth < *had {
                "it came after healing, when no fault fires".to_string()
            } else {
                format!("{node} had {had} such chance(s) in the whole run, counted from 0")
            };
            format!("`{}` at chance {} of {node} ({why})", chance.kind, chance.nth)
        })
        .collect();
    let detail = format!("the scenario's decision(s) never fired: {}", list.join("; "));
    Some(Violation {
        invariant: Invariant::ExpectedOutcome,
        event_index: None,
        event_text: None,
        detail,
        of_the_scenario: true,
    })
}

fn check_final(world: &World, walker: &Walker<'_>, final_state: &FinalState, violations: &mut Vec<Violation>) {
    let push = |violations: &mut Vec<Violation>, invariant: Invariant, detail: String| {
        // One violation per invariant, as for the log.
        if !violations.iter().any(|v| v.invariant == invariant) {
            violations.push(final_violation(invariant, detail));
        }
    };
    // The answer the client's cancel of `op` got, if it made one and was answered.
    let cancel_answer = |op: OperationId| {
        world.calls.iter().enumerate().find_map(|(index, planned)| {
            (planned.call == ClientCall::Cancel { op }).then(|| walker.answers.get(&(index as u64 + 1)))?
        })
    };
    // A call made only once a cancel took is not made when it did not.
    let skipped = |planned: &PlannedCall| {
        planned.if_cancelled.is_some_and(|op| !matches!(cancel_answer(op), Some(ClientAnswer::Cancelled { .. })))
    };
    for (op, expect) in &world.expected_ops {
        let start = world.calls.iter().find(|c| matches!(&c.call, ClientCall::Start(r) if r.op == *op));
        if start.is_some_and(skipped) {
            continue;
        }
        // A cancel that raced the operation's end decides how it must end.
        let expect = &expect.decided(cancel_answer(*op));
        let operation = final_state.coordinator.as_ref().and_then(|c| c.operations.get(op));
        match (operation.map(|o| &o.status), walker.last_seen.get(op)) {
            (Some(OperationStatus::Done { .. }), _) | (None, Some(ProgressMark::Done { .. })) => {
                if !expect.accepts_done() {
                    push(
                        violations,
                        Invariant::ExpectedOutcome,
                        format!("operation {op} ended Done, expected {expect}"),
                    );
                    continue;
                }
                if operation.is_none() {
                    continue; // Forgotten after Done: its tablets may since belong to another operation.
                }
                for tablet in world.tablets_of(*op) {
                    let state = final_state.shards.get(&tablet).and_then(|s| s.as_ref());
                    let rows = state.filter(|s| s.op == Some(*op)).map(|s| &s.rows);
                    if !rows.is_some_and(|rows| rows.same_as(world.expected_rows_in(tablet))) {
                        let detail = match rows {
                            None => format!("at Done of operation {op} {tablet} holds no durable rows of it"),
                            Some(rows) => format!(
                                "at Done of operation {op} {tablet} differs from the source table: {}",
                                first_difference(&rows.to_map(), &world.expected_rows_of(tablet))
                            ),
                        };
                        push(violations, Invariant::NoLostIncrement, detail);
                        break;
                    }
                }
            }
            (Some(OperationStatus::Failed { error, .. }), _) => {
                if !expect.accepts_failure(error) {
                    let detail = format!("operation {op} failed: {error}; expected {expect}");
                    push(violations, Invariant::ExpectedOutcome, detail);
                }
            }
            (None, Some(ProgressMark::Failed { .. })) => {
                if *expect == OpExpect::Done {
                    push(violations, Invariant::ExpectedOutcome, format!("operation {op} failed, expected Done"));
                }
            }
            (Some(OperationStatus::AwaitingSegment { .. }), _) => {
                let segment = operation.map_or(0, lockstep::coordinator::Operation::segment);
                let detail = format!(
                    "operation {op} still waits for segment {} {} ms after healing",
                    segment + 1,
                    world.liveness_bound_ms
                );
                push(violations, Invariant::Liveness, detail);
            }
            (Some(OperationStatus::Running(running)), _) => {
                let detail = format!(
                    "operation {op} still running at increment {} ({} tablet(s) done) {} ms after healing",
                    running.increment,
                    running.done.len(),
                    world.liveness_bound_ms
                );
                push(violations, Invariant::Liveness, detail);
            }
            (None, _) => {
                let detail =
                    format!("operation {op} was never durably started, {} ms after healing", world.liveness_bound_ms);
                push(violations, Invariant::Liveness, detail);
            }
        }
    }
    for (index, planned) in world.calls.iter().enumerate() {
        let call_id = index as u64 + 1;
        if skipped(planned) {
            if walker.answers.contains_key(&call_id) {
                let detail = format!("client call {call_id} was made although the cancel it waits on did not take");
                push(violations, Invariant::ExpectedOutcome, detail);
            }
            continue;
        }
        match walker.answers.get(&call_id) {
            None => push(violations, Invariant::Liveness, format!("client call {call_id} was never answered")),
            Some(answer) if !planned.expect.accepts(answer) => {
                let got = Message::ClientReply(Box::new(ClientReply { call_id, answer: answer.clone() }));
                let detail = format!("client call {call_id} expected {}, got {got}", planned.expect);
                push(violations, Invariant::ExpectedOutcome, detail);
            }
            Some(_) => {}
        }
    }
    if final_state.timed_out && !violations.iter().any(|v| v.invariant.is_liveness()) {
        violations.push(final_violation(Invariant::Liveness, "the run hit its time bound".to_string()));
    }
    // What an ended operation still holds in the coordinator's final durable state.
    if let Some(coordinator) = &final_state.coordinator {
        let ended = |op: &OperationId| {
            coordinator.operations.get(op).is_some_and(|operation| {
                matches!(operation.status, OperationStatus::Done { .. } | OperationStatus::Failed { .. })
            })
        };
        let restoring = coordinator.tables.iter().find_map(|(table, state)| match state {
            lockstep::coordinator::TableState::Restoring { op } if ended(op) => Some(format!("table {table}")),
            _ => None,
        });
        let in_use =
            coordinator.sources_in_use.iter().find(|(_, op)| ended(op)).map(|(c, _)| format!("collection {c}"));
        if let Some(held) = restoring.or(in_use) {
            let detail = format!("{held} is still held by an operation that has ended");
            push(violations, Invariant::CleanedUp, detail);
        }
    }
    // Read off the file names, not asked of the host's own rule for what to remove.
    let running: Vec<OperationId> = final_state.coordinator.iter().flat_map(|c| c.chains().map(|(op, _)| op)).collect();
    let files = final_state.coordinator_files.iter().flatten();
    let stale: Vec<&str> = files
        .filter(|name| chain_file_operation(name).is_some_and(|op| !running.contains(&op)))
        .map(String::as_str)
        .collect();
    if !stale.is_empty() {
        let detail = format!("the coordinator's disk still holds {}, of no running operation", stale.join(", "));
        push(violations, Invariant::CleanedUp, detail);
    }
}

/// The operation whose restore chain a file of this name holds (`chain-<operation>-<digest>`), if it is one.
fn chain_file_operation(name: &str) -> Option<OperationId> {
    let rest = name.strip_prefix(lockstep::model::CHAIN_FILE_PREFIX)?;
    rest.split_once('-')?.0.parse().ok()
}

/// Names the first key at which two row sets differ.
fn first_difference(got: &lockstep::model::Rows, expected: &lockstep::model::Rows) -> String {
    let keys = got.keys().chain(expected.keys()).copied().collect::<std::collections::BTreeSet<_>>();
    for key in keys {
        match (got.get(&key), expected.get(&key)) {
            (Some(g), Some(e)) if g != e => return format!("key {key} holds {g}, source has {e}"),
            (Some(g), None) => return format!("key {key} holds {g}, source has no such row"),
            (None, Some(e)) => return format!("key {key} is missing, source has {e}"),
            _ => {}
        }
    }
    "no differing key".to_string()
}

#[cfg(test)]
mod tests {
    //! Each checker is fed a log that breaks exactly its invariant, to show it can fail, and a clean log.
    use super::*;
    use crate::world::WorldParams;
    use lockstep::coordinator::{Operation, RunningState};
    use lockstep::model::{Change, SortedRows};

    fn world() -> World {
        let params = WorldParams {
            tables: Some(1),
            shard_count: Some(2),
            indexes: Some(false),
            incrementals: Some(2),
            ..WorldParams::default()
        };
        World::generate(5, &params)
    }

    fn event(node: NodeAddr, host: HostEvent) -> Event {
        Event { at_ms: 0, node: SimNode::Protocol(node), kind: EventKind::Host(host) }
    }

    fn applied(world: &World, shard: u32, increment: u32) -> Event {
        applied_on(world, TabletId::new(0, shard), increment)
    }

    fn applied_on(world: &World, tablet: TabletId, increment: u32) -> Event {
        applied_of(world, 1, tablet, increment)
    }

    fn applied_of(world: &World, op: OperationId, tablet: TabletId, increment: u32) -> Event {
        let backup_id = world.chain_backup_ids[increment as usize];
        let object = BackupManifest::object_name(backup_id, tablet);
        let payload_crc32 = world.intact_payload_crc32(&object).expect("object exists");
        let note = PersistNote::ShardApplied { op, increment, backup_id, payload_crc32 };
        event(NodeAddr::Shard(tablet), HostEvent::Persisted(note))
    }

    fn progress(mark: ProgressMark) -> Event {
        event(NodeAddr::Coordinator, HostEvent::Persisted(PersistNote::Coordinator(vec![mark])))
    }

    fn running(increment: u32) -> ProgressMark {
        ProgressMark::Running { op: 1, increment, tablets_done: 0 }
    }

    fn answer(call_id: u64, answer: ClientAnswer) -> Event {
        let msg = Message::ClientReply(Box::new(ClientReply { call_id, answer }));
        event(NodeAddr::Client, HostEvent::Received { from: NodeAddr::Coordinator, msg })
    }

    /// The clean log of a correct restore: the client's start is answered, both shards apply each increment,
    /// then Done.
    fn clean_log(world: &World) -> Vec<Event> {
        let mut log = vec![answer(1, ClientAnswer::Started { op: 1 })];
        for increment in 0..world.chain_len {
            log.push(progress(running(increment)));
            log.push(applied(world, 0, increment));
            log.push(applied(world, 1, increment));
        }
        log.push(progress(ProgressMark::Done { op: 1, increments: world.chain_len }));
        log
    }

    fn done_state(world: &World) -> FinalState {
        let request = world.restore_request();
        let operation = Operation {
            op: 1,
            collection: request.collection,
            tables: request.tables,
            backup_ids: world.chain_backup_ids.clone(),
            segments: vec![lockstep::coordinator::Segment { until_ms: None, last: true, first_increment: 0 }],
            started_at_ms: 0,
            deadline_at_ms: 1,
            status: OperationStatus::Done { increments: world.chain_len, finished_at_ms: 1 },
        };
        let coordinator = CoordinatorDurable {
            generation: 1,
            operations: std::sync::Arc::new([(1, operation)].into_iter().collect()),
            ..Default::default()
        };
        let shards = world
            .tablets()
            .map(|s| {
                let rows = std::sync::Arc::new(SortedRows::from(&world.expected_rows_of(s)));
                (s, Some(ShardDurable { op: Some(1), applied_through: Some(world.chain_len - 1), rows }))
            })
            .collect();
        FinalState { coordinator: Some(coordinator), shards, timed_out: false, coordinator_files: Some(Vec::new()) }
    }

    fn invariants(world: &World, log: &[Event], final_state: &FinalState) -> Vec<Invariant> {
        check(world, log, final_state).into_iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_clean_restore_breaks_no_invariant() {
        let world = world();
        assert_eq!(invariants(&world, &clean_log(&world), &done_state(&world)), vec![]);
    }

    /// The clean log with the operation waiting for a second segment after increment `after`, as `mark` says.
    fn with_a_wait(world: &World, after: u32, released: bool) -> Vec<Event> {
        let mut log = clean_log(world);
        // Right after the two shards' applies of `after`.
        let at = 1 + 3 * (after as usize + 1);
        let mark = ProgressMark::AwaitingSegment { op: 1, segment: 1, increments: after + 1, released };
        log.insert(at, progress(mark));
        log
    }

    #[test]
    fn a_segment_ended_with_every_increment_up_to_it_applied_and_nothing_released_breaks_nothing() {
        let world = world();
        assert_eq!(invariants(&world, &with_a_wait(&world, 1, false), &done_state(&world)), vec![]);
    }

    #[test]
    fn a_segment_that_lets_go_of_its_tables_breaks_final_work_at_the_end() {
        let world = world();
        let log = with_a_wait(&world, 1, true);
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::FinalWorkAtTheEnd]);
    }

    #[test]
    fn a_segment_ended_before_every_tablet_holds_its_increments_breaks_no_false_success() {
        let world = world();
        let mut log = with_a_wait(&world, 1, false);
        // The wait comes before the last shard's apply of increment 1.
        let wait = log.remove(7);
        log.insert(6, wait);
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::NoFalseSuccess]);
    }

    #[test]
    fn an_operation_still_waiting_for_a_segment_at_the_end_breaks_liveness() {
        let world = world();
        let mut final_state = done_state(&world);
        let operation =
            std::sync::Arc::make_mut(&mut final_state.coordinator.as_mut().unwrap().operations).get_mut(&1).unwrap();
        operation.status = OperationStatus::AwaitingSegment { reached: (1, 1), since_ms: 1 };
        let mut log = with_a_wait(&world, world.chain_len - 1, false);
        log.pop(); // No Done.
        let violations = check(&world, &log, &final_state);
        assert_eq!(violations.iter().map(|v| v.invariant).collect::<Vec<_>>(), vec![Invariant::Liveness]);
        assert!(violations[0].detail.contains("still waits for segment 2"), "{}", violations[0].detail);
    }

    #[test]
    fn a_table_or_collection_still_held_by_an_ended_operation_breaks_cleaned_up() {
        let world = world();
        let table = world.tables[0].spec.id;
        let mut held = done_state(&world);
        let coordinator = held.coordinator.as_mut().unwrap();
        std::sync::Arc::make_mut(&mut coordinator.tables)
            .insert(table, lockstep::coordinator::TableState::Restoring { op: 1 });
        assert_eq!(invariants(&world, &clean_log(&world), &held), vec![Invariant::CleanedUp]);
        let mut in_use = done_state(&world);
        let coordinator = in_use.coordinator.as_mut().unwrap();
        std::sync::Arc::make_mut(&mut coordinator.sources_in_use).insert("main".to_string(), 1);
        let violations = check(&world, &clean_log(&world), &in_use);
        assert_eq!(violations.iter().map(|v| v.invariant).collect::<Vec<_>>(), vec![Invariant::CleanedUp]);
        assert!(violations[0].detail.contains("collection main"), "{}", violations[0].detail);
        // Held by an operation still under way is no leftover (the liveness check speaks of that).
        let mut restoring = done_state(&world);
        let coordinator = restoring.coordinator.as_mut().unwrap();
        std::sync::Arc::make_mut(&mut coordinator.tables)
            .insert(table, lockstep::coordinator::TableState::Restoring { op: 7 });
        assert_eq!(invariants(&world, &clean_log(&world), &restoring), vec![]);
    }

    #[test]
    fn a_chain_file_left_behind_by_an_ended_operation_breaks_cleaned_up() {
        let world = world();
        let running = world.restore_request();
        let chain_file = lockstep::model::RestoreChain::plan(&running.catalog, &running.tables)
            .expect("the world's chain")
            .file_name(1);
        let mut left_behind = done_state(&world);
        left_behind.coordinator_files = Some(vec![chain_file.clone(), "node.state.0".to_string()]);
        assert_eq!(invariants(&world, &clean_log(&world), &left_behind), vec![Invariant::CleanedUp]);
        let violation = check(&world, &clean_log(&world), &left_behind).pop().expect("a violation");
        assert!(violation.detail.contains(&chain_file), "{}", violation.detail);
        // A coordinator that is down at the end may yet remove it when it boots.
        left_behind.coordinator_files = None;
        assert_eq!(invariants(&world, &clean_log(&world), &left_behind), vec![]);
    }

    #[test]
    fn applying_k_plus_1_before_another_shard_applied_k_breaks_in_order_apply() {
        let world = world();
        let log = vec![applied(&world, 0, 0), applied(&world, 0, 1), applied(&world, 1, 0)];
        let violations = check(&world, &log, &done_state(&world));
        let violation = violations.iter().find(|v| v.invariant == Invariant::InOrderApply).expect("caught");
        assert_eq!(violation.event_index, Some(1), "the offending event is the early apply");
    }

    #[test]
    fn an_operation_is_judged_by_what_its_tablets_applied_even_where_a_newer_one_restored_over_it() {
        let mut world = world();
        world.restore_again(0);
        let (a, b) = (TabletId::new(0, 0), TabletId::new(0, 1));
        // Operation 1 failed with both tablets past increment 0; operation 2 restored b first, and a request of
        // operation 1 still on its way made a apply increment 1 (a shard may: it holds operation 1's rows).
        let late = vec![applied_of(&world, 1, a, 0), applied_of(&world, 1, b, 0), applied_of(&world, 2, b, 0)];
        let mut log = late.clone();
        log.push(applied_of(&world, 1, a, 1));
        assert!(!invariants(&world, &log, &done_state(&world)).contains(&Invariant::InOrderApply), "{log:?}");
        // Had b never applied operation 1's increment 0, a ran ahead of it.
        let log = vec![applied_of(&world, 1, a, 0), applied_of(&world, 2, b, 0), applied_of(&world, 1, a, 1)];
        let violations = check(&world, &log, &done_state(&world));
        let violation = violations.iter().find(|v| v.invariant == Invariant::InOrderApply).expect("caught");
        assert_eq!(violation.event_index, Some(2));
    }

    #[test]
    fn one_table_applying_k_plus_1_while_another_applies_k_breaks_in_order_apply() {
        let params = WorldParams {
            tables: Some(2),
            shard_count: Some(1),
            indexes: Some(false),
            incrementals: Some(2),
            ..WorldParams::default()
        };
        let world = World::generate(5, &params);
        let (a, b) = (TabletId::new(0, 0), TabletId::new(1, 0));
        let clean = vec![applied_on(&world, a, 0), applied_on(&world, b, 0), applied_on(&world, b, 1)];
        assert!(!invariants(&world, &clean, &done_state(&world)).contains(&Invariant::InOrderApply));
        let early = vec![applied_on(&world, a, 0), applied_on(&world, a, 1), applied_on(&world, b, 0)];
        let violations = check(&world, &early, &done_state(&world));
        let violation = violations.iter().find(|v| v.invariant == Invariant::InOrderApply).expect("caught");
        assert_eq!(violation.event_index, Some(1), "table t0 ran ahead of t1");
    }

    #[test]
    fn skipping_an_increment_breaks_in_order_apply() {
        let world = world();
        let log = vec![applied(&world, 0, 0), applied(&world, 1, 0), applied(&world, 0, 2)];
        assert!(invariants(&world, &log, &done_state(&world)).contains(&Invariant::InOrderApply));
    }

    #[test]
    fn a_shard_that_reboots_without_an_increment_it_applied_breaks_in_order_apply() {
        let world = world();
        let log = vec![
            applied(&world, 0, 0),
            event(NodeAddr::Shard(TabletId::new(0, 0)), HostEvent::ShardBooted { loaded: None }),
        ];
        assert!(invariants(&world, &log, &done_state(&world)).contains(&Invariant::InOrderApply));
    }

    #[test]
    fn applying_a_damaged_bundle_breaks_corrupt_never_applied() {
        let world = world();
        let mut log = clean_log(&world);
        let first_apply = log.iter_mut().find_map(|e| match &mut e.kind {
            EventKind::Host(HostEvent::Persisted(PersistNote::ShardApplied { payload_crc32, .. })) => {
                Some(payload_crc32)
            }
            _ => None,
        });
        *first_apply.expect("the clean log applies something") ^= 1;
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::CorruptNeverApplied]);
    }

    #[test]
    fn done_before_every_shard_holds_every_increment_breaks_no_false_success() {
        let world = world();
        let mut log = clean_log(&world);
        log.remove(log.len() - 2);
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::NoFalseSuccess]);
    }

    #[test]
    fn progress_that_goes_back_breaks_progress_never_backwards() {
        let world = world();
        let log = vec![progress(running(2)), progress(running(1))];
        assert!(invariants(&world, &log, &done_state(&world)).contains(&Invariant::ProgressNeverBackwards));
        let reboot = event(NodeAddr::Coordinator, HostEvent::CoordinatorBooted { generation: 2, loaded: None });
        let log = vec![progress(running(1)), reboot];
        assert!(invariants(&world, &log, &done_state(&world)).contains(&Invariant::ProgressNeverBackwards));
    }

    #[test]
    fn rows_that_differ_from_the_oracle_at_done_break_no_lost_increment() {
        let world = world();
        let mut final_state = done_state(&world);
        let rows = std::sync::Arc::make_mut(
            &mut final_state.shards.get_mut(&TabletId::new(0, 1)).unwrap().as_mut().unwrap().rows,
        );
        let (&key, _) = rows.iter().next().expect("the shard has rows");
        rows.apply(&[Change::Delete { key }]);
        let violations = check(&world, &clean_log(&world), &final_state);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].invariant, Invariant::NoLostIncrement);
        assert!(violations[0].detail.contains(&format!("key {key} is missing")), "{}", violations[0].detail);
    }

    #[test]
    fn an_operation_still_running_at_the_end_breaks_liveness() {
        let world = world();
        let mut final_state = done_state(&world);
        let operation =
            std::sync::Arc::make_mut(&mut final_state.coordinator.as_mut().unwrap().operations).get_mut(&1).unwrap();
        let chain = lockstep::model::RestoreChain::plan(&world.catalog, &operation.tables).unwrap();
        operation.status = OperationStatus::Running(RunningState {
            chain: std::sync::Arc::new(chain),
            first_increment: 0,
            increment: 1,
            increment_deadline_at_ms: 1,
            increment_limit_ms: 1,
            done: Default::default(),
            retries: Default::default(),
        });
        assert_eq!(invariants(&world, &[], &final_state), vec![Invariant::Liveness]);
    }

    #[test]
    fn a_failure_without_a_lost_object_or_done_despite_one_breaks_expected_outcome() {
        let mut world = world();
        let mut final_state = done_state(&world);
        let error = lockstep::coordinator::RestoreError::DeadlineExceeded { increment: 0, not_done: Vec::new() };
        std::sync::Arc::make_mut(&mut final_state.coordinator.as_mut().unwrap().operations)
            .get_mut(&1)
            .unwrap()
            .status = OperationStatus::Failed { error, failed_at_ms: 1 };
        assert_eq!(invariants(&world, &clean_log(&world), &final_state), vec![Invariant::ExpectedOutcome]);

        let tablet = TabletId::new(0, 0);
        let object = BackupManifest::object_name(world.chain_backup_ids[1], tablet);
        world.lost_objects = vec![crate::world::LostObject { increment: 1, tablet, object, until_end_of: None }];
        let missing = crate::plan::FailureExpect::ObjectMissing { increment: 1, tablet };
        world.expected_ops.insert(1, OpExpect::Failed(missing));
        assert_eq!(invariants(&world, &clean_log(&world), &done_state(&world)), vec![Invariant::ExpectedOutcome]);
    }

    #[test]
    fn a_call_answered_otherwise_than_planned_breaks_expected_outcome_and_one_never_answered_liveness() {
        let world = world();
        let mut log = clean_log(&world);
        let refusal = lockstep::coordinator::StartError::NoTables;
        log[0] = answer(1, ClientAnswer::StartRefused(refusal));
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::ExpectedOutcome]);
        log.remove(0);
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::Liveness]);
    }

    #[test]
    fn an_ended_operation_whose_end_changes_breaks_progress_never_backwards() {
        let world = world();
        let mut log = clean_log(&world);
        log.push(progress(ProgressMark::Failed { op: 1 }));
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![Invariant::ProgressNeverBackwards]);
    }

    #[test]
    fn a_cancel_that_races_the_end_decides_how_the_operation_must_end() {
        let mut world = world();
        world.cancel_at(100);
        let cancelled = ClientAnswer::Cancelled { op: 1 };
        let too_late = ClientAnswer::CancelRefused(lockstep::coordinator::LifecycleError::AlreadyEnded { op: 1 });
        let cancelled_state = {
            let mut state = done_state(&world);
            let error = lockstep::coordinator::RestoreError::Cancelled { applied: 1 };
            std::sync::Arc::make_mut(&mut state.coordinator.as_mut().unwrap().operations).get_mut(&1).unwrap().status =
                OperationStatus::Failed { error, failed_at_ms: 1 };
            state
        };
        let with_answer = |reply: &ClientAnswer| {
            let mut log = clean_log(&world);
            log.push(answer(2, reply.clone()));
            log
        };
        // Refused as too late: the restore had ended, and as it would have without the cancel.
        assert_eq!(invariants(&world, &with_answer(&too_late), &done_state(&world)), vec![]);
        assert_eq!(invariants(&world, &with_answer(&too_late), &cancelled_state), vec![Invariant::ExpectedOutcome]);
        // Answered cancelled: the restore must end cancelled, never Done.
        assert_eq!(invariants(&world, &with_answer(&cancelled), &cancelled_state), vec![]);
        assert_eq!(invariants(&world, &with_answer(&cancelled), &done_state(&world)), vec![Invariant::ExpectedOutcome]);
    }

    #[test]
    fn a_restore_again_once_cancelled_is_made_and_judged_only_if_the_cancel_took() {
        let mut world = world();
        world.cancel_at(100);
        world.restore_again_once_cancelled(0);
        let too_late = ClientAnswer::CancelRefused(lockstep::coordinator::LifecycleError::AlreadyEnded { op: 1 });
        let mut log = clean_log(&world);
        log.push(answer(2, too_late));
        // The cancel came too late: no restore again was made, and none is expected.
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![]);
        // Made anyway, it is a call the plan did not ask for.
        let mut made = log.clone();
        made.push(answer(3, ClientAnswer::Started { op: 2 }));
        assert_eq!(invariants(&world, &made, &done_state(&world)), vec![Invariant::ExpectedOutcome]);
        // The cancel took: the restore again must be made, answered, and end Done.
        let mut log = clean_log(&world);
        log.push(answer(2, ClientAnswer::Cancelled { op: 1 }));
        let mut state = done_state(&world);
        let error = lockstep::coordinator::RestoreError::Cancelled { applied: 1 };
        std::sync::Arc::make_mut(&mut state.coordinator.as_mut().unwrap().operations).get_mut(&1).unwrap().status =
            OperationStatus::Failed { error, failed_at_ms: 1 };
        assert_eq!(invariants(&world, &log, &state), vec![Invariant::Liveness]);
    }

    #[test]
    fn only_the_first_answer_to_a_call_counts() {
        let world = world();
        let mut log = clean_log(&world);
        // A retried call may be answered again, and differently (a retried forget finds nothing to forget).
        log.push(answer(1, ClientAnswer::StartRefused(lockstep::coordinator::StartError::NoTables)));
        assert_eq!(invariants(&world, &log, &done_state(&world)), vec![]);
    }
}
