//! Exhaustive exploration of replication through the store: the very publisher and replica machines the
//! simulator and the real hosts run, for a small stream, with every choice of what happens next enumerated.
//!
//! A state is both machines, what each last made durable, each one's outputs not yet carried out and pending
//! timers, the versions the database has committed, the store's objects, the store calls on their way to the
//! store and the answers on their way back, and the faults used so far. The choices:
//! - the database commits its next version (the publisher's host hands it over);
//! - carry out a node's next outputs, up to and including its next persist, so a crash can land between a
//!   durable write and what follows it;
//! - the store serves any call on its way (so calls overtake one another, and a call sent before a crash still
//!   lands after it): whole, or (bounded) failing with a transient error, a put stored but its answer lost, or a
//!   read answered truncated or corrupted;
//! - deliver any answer to its node, once the node has carried out every output it had;
//! - crash a node (bounded): it reboots from what it made durable, and answers to its earlier life are dropped;
//! - fire a node's earliest timer, only when nothing else is under way anywhere (timeouts are long next to the
//!   store's latency).
//!
//! Time is kept out of the states: the machines hold none, and pending timers are kept as offsets from now. The
//! replica's request ids are taken from the lowest in use when a state is fingerprinted ([`Replica::shift_ids`]),
//! so a replica polling an unchanged stream comes back to a state already seen, and a small stream's states are
//! finite: the search runs out of new ones. States are deduplicated by a 64-bit fingerprint; breadth-first search gives the shortest path to a violation. The
//! safety invariants are the simulator's ([`ReplicationInvariant`]), checked at every step. Liveness: from every
//! state explored, a fault-free run that takes the first choice of each kind in a fixed order must bring the
//! replica to the last version, and the publisher's pushes to it, within a bound of steps.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use lockstep::io::range_of;
use lockstep::model::{Change, Rows, ShardId, SortedRows, TableId, TabletId, apply_changes};
use lockstep::protocol::{DownloadRequest, DownloadResult, NodeAddr, StoreError};
use lockstep::replication::{
    Publisher, PublisherConfig, PublisherDurable, PublisherTimer, Replica, ReplicaConfig, ReplicaDurable, ReplicaTimer,
    ReplicationOutput, Version, version_object, version_of,
};

use crate::events::StableHasher;
use crate::replication::{ReplicationBugs, ReplicationInvariant};

const STREAM: &str = "orders";
const TABLET: TabletId = TabletId { table: TableId(1), shard: ShardId(0) };
/// Steps a fault-free completion may take before it counts as stuck.
const COMPLETION_STEPS: u32 = 2_000;

/// The small stream to explore and the bounds of the search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationExploreConfig {
    /// Versions the database commits.
    pub versions: u32,
    /// Node crashes (each followed by a reboot from durable state).
    pub max_crashes: u32,
    /// Store calls that fail with a transient error, or puts stored whose answer is lost.
    pub max_store_faults: u32,
    /// Reads answered truncated or corrupted.
    pub max_download_faults: u32,
    /// Longest path explored.
    pub max_depth: u32,
    /// Stop after this many unique states (0: no limit).
    pub max_states: u64,
    pub bugs: ReplicationBugs,
}

impl Default for ReplicationExploreConfig {
    fn default() -> Self {
        Self {
            versions: 2,
            max_crashes: 1,
            max_store_faults: 1,
            max_download_faults: 1,
            max_depth: 200,
            max_states: 0,
            bugs: ReplicationBugs::default(),
        }
    }
}

/// What a search found.
#[derive(Clone, Debug, Default)]
pub struct ReplicationExploreReport {
    pub unique_states: u64,
    /// States generated, duplicates included.
    pub states: u64,
    pub max_depth: u32,
    /// The search stopped at the depth or state bound before it ran out of new states.
    pub bounded: bool,
    /// The first (shortest) violation found, with the steps that lead to it.
    pub violation: Option<Counterexample>,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counterexample {
    pub invariant: ReplicationInvariant,
    pub detail: String,
    pub steps: Vec<String>,
}

/// A machine with what its host holds for it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Node<M, D, T> {
    machine: M,
    durable: Option<D>,
    /// Outputs not yet carried out; a timer's time is an offset from when it was set.
    outbox: VecDeque<ReplicationOutput<D, T>>,
    /// Pending timers, as offsets from now, in the order they were set.
    timers: Vec<(u64, T)>,
    /// Bumped at every crash: answers to an earlier life are dropped.
    life: u32,
}

type PublisherNode = Node<Publisher, PublisherDurable, PublisherTimer>;
type ReplicaNode = Node<Replica, ReplicaDurable, ReplicaTimer>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Call {
    Put { put_id: u64, object: String, bytes: bytes::Bytes },
    List { list_id: u64, prefix: String },
    Read(DownloadRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Answer {
    Put { put_id: u64, result: Result<(), StoreError> },
    List { list_id: u64, result: Result<Vec<String>, StoreError> },
    Read(DownloadResult),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct State {
    publisher: PublisherNode,
    replica: ReplicaNode,
    committed: Version,
    store: BTreeMap<String, bytes::Bytes>,
    /// On their way to the store: the node and life that sent each.
    calls: Vec<(NodeAddr, u32, Call)>,
    /// On their way back.
    answers: Vec<(NodeAddr, u32, Answer)>,
    crashes: u32,
    store_faults: u32,
    download_faults: u32,
}

/// The world: config, workload and oracle.
struct World {
    config: ReplicationExploreConfig,
    versions: Vec<Vec<Change>>,
    oracle: Vec<SortedRows>,
    publisher: PublisherConfig,
    replica: ReplicaConfig,
}

/// What one step did: its label, and a broken invariant if any.
type Outcome = Result<(), (ReplicationInvariant, String)>;

impl World {
    fn new(config: ReplicationExploreConfig) -> Self {
        // Small versions: a first one of three rows, then one change each, a delete and an insert in turn.
        let mut versions = vec![(1..=3).map(|key| Change::Upsert { key, value: key * 10 }).collect::<Vec<_>>()];
        for version in 2..=u64::from(config.versions.max(1)) {
            versions.push(vec![if version % 2 == 0 {
                Change::Delete { key: 2 }
            } else {
                Change::Upsert { key: 2, value: version }
            }]);
        }
        let mut rows = Rows::new();
        let oracle = versions
            .iter()
            .map(|changes| {
                apply_changes(&mut rows, changes);
                SortedRows::from(&rows)
            })
            .collect();
        let publisher = PublisherConfig { put_retry_base_ms: 100, put_retry_cap_ms: 400, bug: config.bugs.publisher };
        // Whole bundles in one read, or two: enough to resume after a partial read without a state per byte.
        let replica = ReplicaConfig {
            download_chunk_bytes: 40,
            pull_interval_ms: 100,
            retry_base_ms: 50,
            retry_cap_ms: 200,
            max_retry_after_ms: 1_000,
            bug: config.bugs.replica,
        };
        Self { config, versions, oracle, publisher, replica }
    }

    fn last(&self) -> Version {
        self.versions.len() as Version
    }

    fn initial(&self) -> State {
        let publisher = Publisher::boot(STREAM, TABLET, self.publisher.clone(), None, 1);
        let mut replica = Replica::boot(STREAM, TABLET, self.replica.clone(), None);
        let first = replica.start(0);
        State {
            publisher: Node { machine: publisher, durable: None, outbox: VecDeque::new(), timers: Vec::new(), life: 0 },
            replica: Node { machine: replica, durable: None, outbox: queued(first), timers: Vec::new(), life: 0 },
            committed: 0,
            store: BTreeMap::new(),
            calls: Vec::new(),
            answers: Vec::new(),
            crashes: 0,
            store_faults: 0,
            download_faults: 0,
        }
    }

    fn is_goal(&self, state: &State) -> bool {
        state.replica.durable.as_ref().is_some_and(|d| d.applied_through == self.last())
            && state.publisher.durable.as_ref().is_some_and(|d| d.pushed_through == self.last())
    }

    /// Every choice from `state`: the label of each step, the state after it, its outcome, and whether it is a
    /// fault.
    fn successors(&self, state: &State) -> Vec<(String, State, Outcome, bool)> {
        self.choices(state, false)
    }

    /// The choices from `state`, or with `first_fault_free` only the first that is not a fault (the order of
    /// this function is the fault-free completion's order of preference).
    fn choices(&self, state: &State, first_fault_free: bool) -> Vec<(String, State, Outcome, bool)> {
        let mut next = Vec::new();
        macro_rules! push {
            ($label:expr, $after:expr, $outcome:expr, $fault:expr) => {
                let fault = $fault;
                if !(first_fault_free && fault) {
                    next.push(($label, $after, $outcome, fault));
                    if first_fault_free {
                        return next;
                    }
                }
            };
        }
        // Outputs first: the order of this list is the fault-free completion's order of preference.
        for node in [NodeAddr::Publisher, NodeAddr::Replica] {
            if !outbox_empty(state, node) {
                let mut after = state.clone();
                let outcome = self.carry_out(&mut after, node);
                push!(format!("{node} carries out its outputs"), after, outcome, false);
            }
        }
        for at in 0..state.answers.len() {
            let node = state.answers[at].0;
            if outbox_empty(state, node) {
                let mut after = state.clone();
                let (node, _, answer) = after.answers.remove(at);
                let label = format!("{node} takes {}", describe_answer(&answer));
                self.deliver(&mut after, node, answer);
                push!(label, after, Ok(()), false);
            }
        }
        for at in 0..state.calls.len() {
            for fault in self.call_faults(state, &state.calls[at].2) {
                let mut after = state.clone();
                let (node, life, call) = after.calls.remove(at);
                let label = format!("store serves {node}'s {}{}", describe_call(&call), fault.label());
                let outcome = self.serve(&mut after, node, life, call, fault);
                push!(label, after, outcome, fault != Fault::None);
            }
        }
        if state.committed < self.last() && outbox_empty(state, NodeAddr::Publisher) {
            let mut after = state.clone();
            after.committed += 1;
            let version = after.committed;
            let outputs = after.publisher.machine.handle_commit(0, version, &self.versions[version as usize - 1]);
            after.publisher.outbox.extend(queued(outputs));
            push!(format!("the database commits version {version}"), after, Ok(()), false);
        }
        if state.crashes < self.config.max_crashes && !first_fault_free {
            for node in [NodeAddr::Publisher, NodeAddr::Replica] {
                let mut after = state.clone();
                self.crash(&mut after, node);
                push!(format!("{node} crashes and reboots"), after, Ok(()), true);
            }
        }
        let quiet = state.calls.is_empty()
            && state.answers.is_empty()
            && outbox_empty(state, NodeAddr::Publisher)
            && outbox_empty(state, NodeAddr::Replica);
        if quiet {
            for node in [NodeAddr::Publisher, NodeAddr::Replica] {
                let mut after = state.clone();
                if let Some(label) = self.fire_timer(&mut after, node) {
                    push!(label, after, Ok(()), false);
                }
            }
        }
        next
    }

    fn call_faults(&self, state: &State, call: &Call) -> Vec<Fault> {
        let mut faults = vec![Fault::None];
        if state.store_faults < self.config.max_store_faults {
            faults.push(Fault::Unavailable);
            if matches!(call, Call::Put { .. }) {
                faults.push(Fault::AnswerLost);
            }
        }
        if state.download_faults < self.config.max_download_faults && matches!(call, Call::Read(_)) {
            faults.extend([Fault::Truncated, Fault::Corrupted]);
        }
        faults
    }

    /// Carries out `node`'s outputs up to and including its next persist.
    fn carry_out(&self, state: &mut State, node: NodeAddr) -> Outcome {
        loop {
            let output = match node {
                NodeAddr::Publisher => state.publisher.outbox.pop_front().map(Output::Publisher),
                _ => state.replica.outbox.pop_front().map(Output::Replica),
            };
            let Some(output) = output else { return Ok(()) };
            match output {
                Output::Publisher(ReplicationOutput::Persist(durable)) => {
                    let outcome = self.check_publisher_persist(state, &durable);
                    state.publisher.durable = Some(durable);
                    return outcome;
                }
                Output::Replica(ReplicationOutput::Persist(durable)) => {
                    let outcome = self.check_replica_persist(state, &durable);
                    state.replica.durable = Some(durable);
                    return outcome;
                }
                Output::Publisher(ReplicationOutput::SetTimer { at_ms, timer }) => {
                    state.publisher.timers.push((at_ms, timer));
                }
                Output::Replica(ReplicationOutput::SetTimer { at_ms, timer }) => {
                    state.replica.timers.push((at_ms, timer));
                }
                Output::Publisher(other) => push_call(state, NodeAddr::Publisher, state.publisher.life, other),
                Output::Replica(other) => push_call(state, NodeAddr::Replica, state.replica.life, other),
            }
        }
    }

    fn check_publisher_persist(&self, state: &State, durable: &PublisherDurable) -> Outcome {
        let before = state.publisher.durable.as_ref().map_or(0, |d| d.pushed_through);
        if durable.pushed_through < before {
            let detail = format!("pushed through {} after pushed through {before}", durable.pushed_through);
            return Err((ReplicationInvariant::PublisherProgress, detail));
        }
        if let Some(missing) =
            (1..=durable.pushed_through).find(|v| !state.store.contains_key(&version_object(STREAM, *v)))
        {
            let detail = format!("claims pushed through {}; the store lacks version {missing}", durable.pushed_through);
            return Err((ReplicationInvariant::PublisherProgress, detail));
        }
        Ok(())
    }

    fn check_replica_persist(&self, state: &State, durable: &ReplicaDurable) -> Outcome {
        let before = state.replica.durable.as_ref().map_or(0, |d| d.applied_through);
        let version = durable.applied_through;
        if version != before + 1 {
            return Err((
                ReplicationInvariant::ReplicaInOrder,
                format!("applied version {version} onto version {before}"),
            ));
        }
        let expected = usize::try_from(version).ok().and_then(|v| self.oracle.get(v.checked_sub(1)?));
        if expected != Some(&*durable.rows) {
            let detail = format!("rows at version {version} differ from the source's: {:?}", durable.rows);
            return Err((ReplicationInvariant::ReplicaRows, detail));
        }
        Ok(())
    }

    fn serve(&self, state: &mut State, node: NodeAddr, life: u32, call: Call, fault: Fault) -> Outcome {
        match fault {
            Fault::None => {}
            Fault::Unavailable | Fault::AnswerLost => state.store_faults += 1,
            Fault::Truncated | Fault::Corrupted => state.download_faults += 1,
        }
        let unavailable = || StoreError::Unavailable { detail: "injected".to_string() };
        let mut outcome = Ok(());
        let answer = match call {
            Call::Put { put_id, .. } if fault == Fault::Unavailable => {
                Answer::Put { put_id, result: Err(unavailable()) }
            }
            Call::Put { put_id, object, bytes } => {
                state.store.insert(object, bytes);
                outcome = push_order(state);
                let result =
                    if fault == Fault::AnswerLost { Err(StoreError::Timeout { timeout_ms: 1_000 }) } else { Ok(()) };
                Answer::Put { put_id, result }
            }
            Call::List { list_id, .. } if fault == Fault::Unavailable => {
                Answer::List { list_id, result: Err(unavailable()) }
            }
            Call::List { list_id, prefix } => {
                let names = state.store.keys().filter(|name| name.starts_with(&prefix)).cloned().collect();
                Answer::List { list_id, result: Ok(names) }
            }
            Call::Read(request) => {
                let read = match state.store.get(&request.object) {
                    None => Err(StoreError::NotFound { object: request.object.clone() }),
                    Some(_) if fault == Fault::Unavailable => Err(unavailable()),
                    Some(bytes) => range_of(&request.object, bytes, request.offset, request.len),
                };
                let read = read.map(|mut read| {
                    let end = request.offset + read.bytes.len() as u64;
                    match fault {
                        Fault::Truncated => read.total_len = end.min(read.total_len),
                        Fault::Corrupted if !read.bytes.is_empty() => crate::faults::flip(&mut read.bytes, 0, 0x40),
                        _ => {}
                    }
                    read
                });
                let DownloadRequest { download_id, object, offset, .. } = request;
                Answer::Read(DownloadResult { download_id, object, offset, outcome: read })
            }
        };
        let current = match node {
            NodeAddr::Publisher => state.publisher.life,
            _ => state.replica.life,
        };
        if life == current {
            state.answers.push((node, life, answer));
        }
        outcome
    }

    fn deliver(&self, state: &mut State, node: NodeAddr, answer: Answer) {
        match (node, answer) {
            (NodeAddr::Publisher, Answer::Put { put_id, result }) => {
                let outputs = state.publisher.machine.handle_put(0, put_id, result);
                state.publisher.outbox.extend(queued(outputs));
            }
            (_, Answer::List { list_id, result }) => {
                let outputs = state.replica.machine.handle_list(0, list_id, result);
                state.replica.outbox.extend(queued(outputs));
            }
            (_, Answer::Read(result)) => {
                let outputs = state.replica.machine.handle_download(0, result);
                state.replica.outbox.extend(queued(outputs));
            }
            (_, Answer::Put { .. }) => unreachable!("only the publisher puts"),
        }
    }

    fn crash(&self, state: &mut State, node: NodeAddr) {
        state.crashes += 1;
        state.answers.retain(|(to, _, _)| *to != node);
        match node {
            NodeAddr::Publisher => {
                let durable = state.publisher.durable.clone();
                let mut machine = Publisher::boot(STREAM, TABLET, self.publisher.clone(), durable, 1);
                let mut outputs = Vec::new();
                for version in 1..=state.committed {
                    outputs.extend(machine.handle_commit(0, version, &self.versions[version as usize - 1]));
                }
                let publisher = &mut state.publisher;
                (publisher.machine, publisher.outbox, publisher.timers) = (machine, queued(outputs), Vec::new());
                publisher.life += 1;
            }
            _ => {
                let durable = state.replica.durable.clone();
                let mut machine = Replica::boot(STREAM, TABLET, self.replica.clone(), durable);
                let outputs = machine.start(0);
                let replica = &mut state.replica;
                (replica.machine, replica.outbox, replica.timers) = (machine, queued(outputs), Vec::new());
                replica.life += 1;
            }
        }
    }

    /// Fires `node`'s earliest timer, moving every pending timer's offset on by its wait.
    fn fire_timer(&self, state: &mut State, node: NodeAddr) -> Option<String> {
        match node {
            NodeAddr::Publisher => {
                let at = earliest(&state.publisher.timers)?;
                let (wait, timer) = state.publisher.timers.remove(at);
                advance(state, wait);
                let outputs = state.publisher.machine.handle_timer(0, timer.clone());
                state.publisher.outbox.extend(queued(outputs));
                Some(format!("{wait} ms later, publisher's timer {timer:?} fires"))
            }
            _ => {
                let at = earliest(&state.replica.timers)?;
                let (wait, timer) = state.replica.timers.remove(at);
                advance(state, wait);
                let outputs = state.replica.machine.handle_timer(0, timer.clone());
                state.replica.outbox.extend(queued(outputs));
                Some(format!("{wait} ms later, replica's timer {timer:?} fires"))
            }
        }
    }

    /// Whether a fault-free run from `state`, taking the first choice each time, reaches the goal.
    fn completes(&self, state: &State) -> bool {
        let mut state = state.clone();
        for _ in 0..COMPLETION_STEPS {
            if self.is_goal(&state) {
                return true;
            }
            let Some((_, after, _, _)) = self.choices(&state, true).pop() else { return false };
            state = after;
        }
        self.is_goal(&state)
    }
}

enum Output {
    Publisher(ReplicationOutput<PublisherDurable, PublisherTimer>),
    Replica(ReplicationOutput<ReplicaDurable, ReplicaTimer>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Unavailable,
    AnswerLost,
    Truncated,
    Corrupted,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::None => "",
            Fault::Unavailable => ", failing it (store unavailable)",
            Fault::AnswerLost => ", storing it but losing the answer",
            Fault::Truncated => ", answering it truncated",
            Fault::Corrupted => ", answering it with a flipped bit",
        }
    }
}

fn outbox_empty(state: &State, node: NodeAddr) -> bool {
    match node {
        NodeAddr::Publisher => state.publisher.outbox.is_empty(),
        _ => state.replica.outbox.is_empty(),
    }
}

/// A machine's outputs to carry out. Every input comes at machine time 0 (the machines keep no time of their
/// own), so a timer's time is its offset from the moment it was set.
fn queued<D, T>(outputs: Vec<ReplicationOutput<D, T>>) -> VecDeque<ReplicationOutput<D, T>> {
    outputs.into()
}

fn push_call<D, T>(state: &mut State, node: NodeAddr, life: u32, output: ReplicationOutput<D, T>) {
    let call = match output {
        ReplicationOutput::Put { put_id, object, bytes } => Call::Put { put_id, object, bytes },
        ReplicationOutput::List { list_id, prefix } => Call::List { list_id, prefix },
        ReplicationOutput::Download(request) => Call::Read(request),
        // Reports change nothing; persists and timers are carried out by the caller.
        _ => return,
    };
    state.calls.push((node, life, call));
}

/// Where in `timers` the earliest one is (the first set, of equal ones).
fn earliest<T>(timers: &[(u64, T)]) -> Option<usize> {
    (0..timers.len()).min_by_key(|at| timers[*at].0)
}

/// Moves time on by `wait` ms: every pending timer comes that much nearer.
fn advance(state: &mut State, wait: u64) {
    for (offset, _) in state.publisher.timers.iter_mut() {
        *offset = offset.saturating_sub(wait);
    }
    for (offset, _) in state.replica.timers.iter_mut() {
        *offset = offset.saturating_sub(wait);
    }
}

fn push_order(state: &State) -> Outcome {
    let versions: Vec<Version> = state.store.keys().filter_map(|name| version_of(STREAM, name)).collect();
    match versions.iter().enumerate().find(|(at, version)| **version != *at as u64 + 1) {
        None => Ok(()),
        Some((at, version)) => {
            let detail = format!("the store holds version {version} but not version {}", at + 1);
            Err((ReplicationInvariant::PushOrder, detail))
        }
    }
}

fn describe_call(call: &Call) -> String {
    match call {
        Call::Put { object, .. } => format!("put of {}", short(object)),
        Call::List { .. } => "listing".to_string(),
        Call::Read(request) => format!("read of {} @{}", short(&request.object), request.offset),
    }
}

fn describe_answer(answer: &Answer) -> String {
    match answer {
        Answer::Put { result: Ok(()), .. } => "its put's answer: stored".to_string(),
        Answer::Put { result: Err(error), .. } => format!("its put's answer: {error}"),
        Answer::List { result: Ok(names), .. } => {
            let versions: Vec<String> =
                names.iter().filter_map(|n| version_of(STREAM, n)).map(|v| v.to_string()).collect();
            format!("its listing: versions [{}]", versions.join(", "))
        }
        Answer::List { result: Err(error), .. } => format!("its listing: {error}"),
        Answer::Read(result) => match &result.outcome {
            Ok(read) => format!("{} bytes of {} of {}", read.bytes.len(), read.total_len, short(&result.object)),
            Err(error) => format!("a read of {}: {error}", short(&result.object)),
        },
    }
}

/// An object's name without the stream's prefix.
fn short(object: &str) -> String {
    version_of(STREAM, object).map_or_else(|| object.to_string(), |version| format!("v{version}"))
}

/// The state's fingerprint, taken over a copy whose replica request ids start from 0: two states that differ
/// only in how many listings and reads the replica made before are one state (see [`Replica::shift_ids`]).
fn fingerprint(state: &State) -> u64 {
    let mut hasher = StableHasher::new();
    normalized(state).hash(&mut hasher);
    hasher.finish()
}

/// `state` with the replica's request ids lowered by the lowest one in use, everywhere they appear; the ids of
/// calls and answers of an earlier life of the replica, which nothing will take, set to 0.
fn normalized(state: &State) -> State {
    let mut state = state.clone();
    let life = state.replica.life;
    let (last, waiting) = state.replica.machine.ids();
    let mut lowest = waiting.unwrap_or(last).min(last);
    let mut note = |id: u64| lowest = lowest.min(id);
    for output in &state.replica.outbox {
        replica_output_ids(output, &mut note);
    }
    for (_, timer) in &state.replica.timers {
        if let ReplicaTimer::RetryRead { download_id } = timer {
            note(*download_id);
        }
    }
    for (node, at, call) in &state.calls {
        if *node == NodeAddr::Replica && *at == life {
            call_ids(call, &mut note);
        }
    }
    for (node, at, answer) in &state.answers {
        if *node == NodeAddr::Replica && *at == life {
            answer_ids(answer, &mut note);
        }
    }
    let by = lowest;
    state.replica.machine.shift_ids(by);
    for output in state.replica.outbox.iter_mut() {
        match output {
            ReplicationOutput::List { list_id, .. } => *list_id -= by,
            ReplicationOutput::Download(request) => request.download_id -= by,
            ReplicationOutput::SetTimer { timer: ReplicaTimer::RetryRead { download_id }, .. } => *download_id -= by,
            _ => {}
        }
    }
    for (_, timer) in state.replica.timers.iter_mut() {
        if let ReplicaTimer::RetryRead { download_id } = timer {
            *download_id -= by;
        }
    }
    for (node, at, call) in state.calls.iter_mut() {
        if *node == NodeAddr::Replica {
            let shift = |id: &mut u64| *id = if *at == life { *id - by } else { 0 };
            match call {
                Call::List { list_id, .. } => shift(list_id),
                Call::Read(request) => shift(&mut request.download_id),
                Call::Put { .. } => {}
            }
        }
    }
    for (node, at, answer) in state.answers.iter_mut() {
        if *node == NodeAddr::Replica {
            let shift = |id: &mut u64| *id = if *at == life { *id - by } else { 0 };
            match answer {
                Answer::List { list_id, .. } => shift(list_id),
                Answer::Read(result) => shift(&mut result.download_id),
                Answer::Put { .. } => {}
            }
        }
    }
    state
}

fn replica_output_ids(output: &ReplicationOutput<ReplicaDurable, ReplicaTimer>, note: &mut impl FnMut(u64)) {
    match output {
        ReplicationOutput::List { list_id, .. } => note(*list_id),
        ReplicationOutput::Download(request) => note(request.download_id),
        ReplicationOutput::SetTimer { timer: ReplicaTimer::RetryRead { download_id }, .. } => note(*download_id),
        _ => {}
    }
}

fn call_ids(call: &Call, note: &mut impl FnMut(u64)) {
    match call {
        Call::List { list_id, .. } => note(*list_id),
        Call::Read(request) => note(request.download_id),
        Call::Put { .. } => {}
    }
}

fn answer_ids(answer: &Answer, note: &mut impl FnMut(u64)) {
    match answer {
        Answer::List { list_id, .. } => note(*list_id),
        Answer::Read(result) => note(result.download_id),
        Answer::Put { .. } => {}
    }
}

/// The steps of a path, newest last, shared between the paths that start with them.
struct Path {
    step: String,
    before: Option<Rc<Path>>,
}

fn steps_of(path: &Option<Rc<Path>>) -> Vec<String> {
    let mut steps = Vec::new();
    let mut at = path.clone();
    while let Some(node) = at {
        steps.push(node.step.clone());
        at = node.before.clone();
    }
    steps.reverse();
    steps
}

/// Explores every state of the configured stream, breadth first; stops at the first violation.
pub fn explore_replication(
    config: ReplicationExploreConfig,
    progress: &mut dyn FnMut(&ReplicationExploreReport),
) -> ReplicationExploreReport {
    let began = Instant::now();
    let world = World::new(config);
    let mut report = ReplicationExploreReport::default();
    let initial = world.initial();
    let mut seen: HashSet<u64> = HashSet::new();
    seen.insert(fingerprint(&initial));
    let mut frontier: VecDeque<(State, u32, Option<Rc<Path>>)> = VecDeque::from([(initial, 0, None)]);
    report.unique_states = 1;
    report.states = 1;
    while let Some((state, depth, path)) = frontier.pop_front() {
        report.max_depth = report.max_depth.max(depth);
        if !world.is_goal(&state) && !world.completes(&state) {
            let detail = "a fault-free run from here does not bring the replica and the publisher to the last version"
                .to_string();
            report.violation =
                Some(Counterexample { invariant: ReplicationInvariant::Liveness, detail, steps: steps_of(&path) });
            break;
        }
        if depth >= world.config.max_depth {
            report.bounded = true;
            continue;
        }
        for (label, after, outcome, _) in world.successors(&state) {
            report.states += 1;
            let path = Some(Rc::new(Path { step: label, before: path.clone() }));
            if let Err((invariant, detail)) = outcome {
                report.violation = Some(Counterexample { invariant, detail, steps: steps_of(&path) });
                report.elapsed = began.elapsed();
                return report;
            }
            if !seen.insert(fingerprint(&after)) {
                continue;
            }
            report.unique_states += 1;
            if world.config.max_states > 0 && report.unique_states >= world.config.max_states {
                report.bounded = true;
                frontier.clear();
                break;
            }
            frontier.push_back((after, depth + 1, path));
        }
        if report.unique_states % 4_096 == 0 {
            report.elapsed = began.elapsed();
            progress(&report);
        }
    }
    report.elapsed = began.elapsed();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explore(config: ReplicationExploreConfig) -> ReplicationExploreReport {
        explore_replication(config, &mut |_| {})
    }

    #[test]
    fn the_correct_machines_keep_every_invariant_in_a_small_stream() {
        let report = explore(ReplicationExploreConfig::default());
        assert!(report.violation.is_none(), "{:?}", report.violation);
        assert!(!report.bounded, "every state explored, at depth {}", report.max_depth);
        assert!(report.unique_states > 10_000, "{} states", report.unique_states);
    }

    #[test]
    fn the_liveness_check_fails_a_state_the_replica_cannot_finish_from() {
        let world = World::new(ReplicationExploreConfig::default());
        let mut state = world.initial();
        assert!(world.completes(&state), "from the start, a fault-free run replicates every version");
        // Run fault-free until version 1 is pushed, then take it out of the store for good: the replica, which
        // never skips a version, cannot finish.
        while state.publisher.durable.as_ref().is_none_or(|durable| durable.pushed_through < 1) {
            state = world.choices(&state, true).pop().expect("a fault-free step").1;
        }
        state.store.remove(&version_object(STREAM, 1));
        assert!(!world.completes(&state));
    }

    fn caught(bug: &str, invariant: ReplicationInvariant) -> Counterexample {
        let mut bugs = ReplicationBugs::default();
        bugs.add(bug).unwrap();
        let report = explore(ReplicationExploreConfig { bugs, max_depth: 40, ..ReplicationExploreConfig::default() });
        let violation =
            report.violation.unwrap_or_else(|| panic!("{bug} not caught in {} states", report.unique_states));
        assert_eq!(violation.invariant, invariant, "{violation:?}");
        violation
    }

    #[test]
    fn a_publisher_that_puts_ahead_is_caught_by_push_order() {
        let violation = caught("puts-ahead", ReplicationInvariant::PushOrder);
        // The shortest path: both versions committed and put, the second put served first.
        assert!(violation.steps.iter().any(|step| step.contains("put of v2")), "{:?}", violation.steps);
    }

    #[test]
    fn a_replica_that_skips_its_checksum_is_caught_by_replica_rows() {
        let violation = caught("replica-skips-checksum", ReplicationInvariant::ReplicaRows);
        assert!(violation.steps.iter().any(|step| step.contains("flipped bit")), "{:?}", violation.steps);
    }
}
