//! World-wide simulation state shared by every node of one seed: the event log, the fault dice, the fault
//! counters and the disks (which outlive node restarts). Only one seed ever touches one `SimState`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use lockstep::model::TabletId;
use lockstep::protocol::{NodeAddr, OperationId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::DiskState;
use crate::events::{Event, EventKind, SimNode};
use crate::faults::{FaultCounts, FaultKind, FaultPlan};
use crate::tape::{Chance, Tape};

pub struct SimState {
    pub log: Vec<Event>,
    /// Whether a fault fires at a chance, and when random reboots come, is drawn from here (see [`crate::tape`]).
    pub dice: ChaCha8Rng,
    /// What a fault that fires needs (delays, cut points, flipped bytes, downtimes), in simulation order.
    pub rng: ChaCha8Rng,
    /// When set, no dice are rolled: faults fire exactly at these decisions.
    pub replay: Option<Arc<Tape>>,
    /// Chances seen so far, per node (a handful of nodes, searched in order) and kind (by position in
    /// [`FaultKind::ALL`]). Rolled for every message and read, so kept cheaper than a hashed map.
    chances: Vec<(NodeAddr, [u32; FaultKind::ALL.len()])>,
    /// Where in `chances` the last chance's node is.
    last_chances: usize,
    /// The decisions this run made (or replayed).
    pub tape: Tape,
    pub plan: FaultPlan,
    pub healed: bool,
    pub counts: FaultCounts,
    pub disks: BTreeMap<NodeAddr, DiskState>,
    /// Messages the simulated network delivered, counted as the receiving node takes each in: protocol frames
    /// (each copy of a duplicate counts), store requests and store answers. A message dropped, sent to a node
    /// that is down, lost with a node killed before it read it, or an answer that came after its reader gave up,
    /// does not count: the figure is what the network carried through, as in the bare exchange it is compared
    /// with, where every message is received.
    pub messages: u64,
    /// Simulated time of the last event.
    pub now_ms: u64,
    /// Reply tags handed out to store clients so far.
    pub next_store_tag: u64,
    /// Tablets whose reports to the coordinator are dropped (a scheduled fault).
    pub dropped_reports: BTreeSet<TabletId>,
    /// Damage scheduled for the next downloads of an object: (object, truncate rather than corrupt) -> times left.
    pub scheduled_damage: BTreeMap<(String, bool), u32>,
    /// Scheduled faults not yet fired, by index in the world's list.
    pub pending_scheduled: BTreeSet<usize>,
    /// The client got an answer to every call it planned.
    pub client_done: bool,
    /// The last persisted coordinator state has a running operation.
    pub ops_running: bool,
    /// A node has begun removing files and not yet made the removal durable.
    pub removing: bool,
    /// Nodes a crash point has asked to crash, until the supervisor has crashed them.
    pub crash_requested: BTreeSet<NodeAddr>,
    /// Operations the coordinator has durably ended (Done or Failed), forgotten ones included.
    pub ended_ops: BTreeSet<OperationId>,
    /// The last segment each operation restored in segments has durably ended.
    pub segments_ended: BTreeMap<OperationId, u32>,
}

impl SimState {
    pub fn new(seed: u64, plan: FaultPlan, replay: Option<Arc<Tape>>) -> Self {
        Self {
            // A standard world logs a few hundred events; growing from empty would copy the log several times.
            log: Vec::with_capacity(512),
            dice: ChaCha8Rng::seed_from_u64(seed ^ 0xd1ce_0000_0000_0000),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0000),
            replay,
            chances: Vec::new(),
            last_chances: 0,
            tape: Tape::default(),
            plan,
            healed: false,
            counts: FaultCounts::default(),
            disks: BTreeMap::new(),
            messages: 0,
            now_ms: 0,
            next_store_tag: 0,
            dropped_reports: BTreeSet::new(),
            scheduled_damage: BTreeMap::new(),
            pending_scheduled: BTreeSet::new(),
            client_done: false,
            ops_running: false,
            removing: false,
            crash_requested: BTreeSet::new(),
            ended_ops: BTreeSet::new(),
            segments_ended: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, at_ms: u64, node: SimNode, kind: EventKind) {
        self.now_ms = at_ms;
        self.log.push(Event { at_ms, node, kind });
    }

    /// Logs and counts a scheduled fault of `kind`: no dice, healed or not.
    pub fn scheduled_fault(&mut self, at_ms: u64, node: SimNode, kind: FaultKind, detail: String) {
        self.counts.add(kind);
        self.record(at_ms, node, EventKind::Fault { kind, detail: format!("scheduled: {detail}") });
    }

    /// Whether the run is over: the client has every answer, no operation runs and no removal is under way.
    pub fn is_over(&self) -> bool {
        self.client_done && !self.ops_running && !self.removing
    }

    /// Rolls the dice for `kind` at `node`; on a hit counts it and logs it with `detail`.
    pub fn fault(&mut self, at_ms: u64, node: SimNode, kind: FaultKind, detail: impl FnOnce() -> String) -> bool {
        let SimNode::Protocol(addr) = node else { panic!("fault chances belong to protocol nodes, not {node}") };
        self.fault_at(at_ms, node, addr, kind, detail)
    }

    /// Like [`SimState::fault`] for a chance of `chance_node` that `log_node` carries out (the store damaging
    /// a shard's read).
    pub fn fault_at(
        &mut self,
        at_ms: u64,
        log_node: SimNode,
        chance_node: NodeAddr,
        kind: FaultKind,
        detail: impl FnOnce() -> String,
    ) -> bool {
        if !self.roll(chance_node, kind) {
            return false;
        }
        self.counts.add(kind);
        self.record(at_ms, log_node, EventKind::Fault { kind, detail: detail() });
        true
    }

    /// The delay a replayed tape pins for the chance of `kind` at `node` just rolled, if it pins one.
    pub fn pinned_delay(&self, node: NodeAddr, kind: FaultKind) -> Option<u64> {
        let tape = self.replay.as_ref()?;
        let (_, counters) = self.chances.iter().find(|(n, _)| *n == node)?;
        let nth = counters[kind.index()].checked_sub(1)?;
        tape.delays.get(&Chance { node, kind, nth }).copied()
    }

    /// The chances of the replayed tape that never fired, each with how many chances of its kind its node had in
    /// the whole run (one below that count came after healing; one at or past it never came).
    pub fn unfired_chances(&self) -> Vec<(Chance, u32)> {
        let Some(replay) = &self.replay else { return Vec::new() };
        let had = |chance: &Chance| {
            self.chances
                .iter()
                .find(|(node, _)| *node == chance.node)
                .map_or(0, |(_, counts)| counts[chance.kind.index()])
        };
        replay.chances.iter().filter(|chance| !self.tape.chances.contains(chance)).map(|c| (*c, had(c))).collect()
    }

    /// Decides the next chance of `kind` at `node`: from the tape when replaying, else with the dice at the
    /// seed's rate. Never a hit after healing. Hits are written to [`SimState::tape`].
    pub fn roll(&mut self, node: NodeAddr, kind: FaultKind) -> bool {
        // Chances come in runs of one node's (a store answer rolls five for its reader): the last node first.
        let at = match self.chances.get(self.last_chances) {
            Some((n, _)) if *n == node => self.last_chances,
            _ => match self.chances.iter().position(|(n, _)| *n == node) {
                Some(at) => at,
                None => {
                    self.chances.push((node, [0; FaultKind::ALL.len()]));
                    self.chances.len() - 1
                }
            },
        };
        self.last_chances = at;
        let counter = &mut self.chances[at].1[kind.index()];
        let nth = *counter;
        *counter += 1;
        if self.healed {
            return false;
        }
        let chance = Chance { node, kind, nth };
        let hit = match &self.replay {
            Some(tape) => tape.chances.contains(&chance),
            None => {
                let rate = self.plan.rate(kind);
                rate > 0.0 && self.dice.gen_bool(rate.min(1.0))
            }
        };
        if hit {
            self.tape.chances.insert(chance);
        }
        hit
    }
}

/// A handle on the state of one seed.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<SimState>>);

impl Shared {
    pub fn new(state: SimState) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        // A poisoned lock means a node panicked; the panic is reported by the runner, so keep going.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
