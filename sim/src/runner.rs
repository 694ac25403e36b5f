//! Runs one seed: builds the madsim world (store, shards, coordinator), drives the fault schedule, heals,
//! waits for the operation to end or the liveness bound to pass, then hands the event log and the final durable
//! state to the checkers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::{CoordinatorDurable, OperationStatus, ProgressMark, RestoreError};
use lockstep::host::{CrashPoint, HostEvent, HostIo, Observer};
use lockstep::io::Transport;
use lockstep::model::BackupManifest;
use lockstep::model::TabletId;
use lockstep::protocol::{
    ApplyOutcome, ClientAnswer, ClientRequest, Message, NodeAddr, OperationId, PersistNote, decode_frame, encode_frame,
};
use lockstep::shard::ShardDurable;
use madsim::net::Endpoint;
use madsim::runtime::Handle;
use madsim::task::NodeId;
use rand::Rng;
use tokio::sync::mpsc;

use crate::checkers::{FinalState, Violation, check};
use crate::clock::SimClock;
use crate::disk::SimDisk;
use crate::events::{Event, EventKind, SimNode, log_hash};
use crate::faults::{FaultCounts, FaultKind};
use crate::net::{Directory, SimTransport};
use crate::plan::{Action, Moment};
use crate::state::{Shared, SimState};
use crate::store::SimStoreClient;
use crate::tape::{Reboot, Tape};
use crate::world::World;

/// The store's address, in the subnet of the coordinator and the client (`10.0.0.x`); table `t`'s shards live in
/// `10.0.(t + 1).x`, so no table's subnet can reach it.
pub const STORE_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)), 9000);
// Every table's subnet and every shard's address fit in an octet, with room for the offset of one.
const _: () = assert!(crate::world::MAX_TABLES < 255 && crate::world::MAX_SHARDS_PER_TABLE < 255);
const PROTOCOL_PORT: u16 = 7000;
/// How long the client waits for an answer before it sends a call again.
const CLIENT_RETRY_MS: u64 = 1_000;
/// How often the client looks whether the operation a call waits for has ended.
const ENDED_POLL_MS: u64 = 50;

/// What one seed produced.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// Hash of the whole event log, for determinism checks and repro lines: kept when the run was asked to keep
    /// it (see [`Keep`]) or broke an invariant.
    pub log_hash: Option<u64>,
    pub events: usize,
    /// The log itself, when asked for.
    pub log: Option<Vec<Event>>,
    pub sim_ms: u64,
    pub faults: FaultCounts,
    pub messages: u64,
    /// The seed's run panicked with this message.
    pub panic: Option<String>,
    /// How the first operation ended, from the coordinator's final durable state.
    pub end: RunEnd,
    /// How every operation the coordinator still knows ended.
    pub ends: Vec<(lockstep::protocol::OperationId, RunEnd)>,
    /// The coverage probes the run hit.
    pub probes: crate::probes::ProbeSet,
    /// Every fault the run's dice (or its replayed tape) decided.
    pub decisions: Tape,
}

/// The coordinator's durable verdict when the run stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    Done,
    Failed(RestoreError),
    StillRunning,
    /// A segment of a restore in segments ended and no next one came.
    AwaitingSegment,
    NeverStarted,
}

impl RunEnd {
    fn of(final_state: &FinalState) -> Self {
        let operation = final_state.coordinator.as_ref().and_then(|c| c.operations.values().next());
        operation.map_or(RunEnd::NeverStarted, |op| Self::of_status(&op.status))
    }

    fn all(final_state: &FinalState) -> Vec<(lockstep::protocol::OperationId, RunEnd)> {
        let operations = final_state.coordinator.iter().flat_map(|c| c.operations.values());
        operations.map(|op| (op.op, Self::of_status(&op.status))).collect()
    }

    fn of_status(status: &OperationStatus) -> Self {
        match status {
            OperationStatus::Done { .. } => RunEnd::Done,
            OperationStatus::Failed { error, .. } => RunEnd::Failed(error.clone()),
            OperationStatus::Running(_) => RunEnd::StillRunning,
            OperationStatus::AwaitingSegment { .. } => RunEnd::AwaitingSegment,
        }
    }
}

impl std::fmt::Display for RunEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunEnd::Done => f.write_str("Done"),
            RunEnd::Failed(error) => write!(f, "Failed: {error}"),
            RunEnd::StillRunning => f.write_str("still running"),
            RunEnd::AwaitingSegment => f.write_str("waiting for a segment"),
            RunEnd::NeverStarted => f.write_str("never started"),
        }
    }
}

/// What a run keeps of its event log beyond the checkers' verdict, the counts and the decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// The log's hash only when the run broke an invariant (a sweep's seeds: hashing every log costs about as
    /// much as the probes).
    Verdict,
    /// The log's hash always (runs compared with one another).
    Hash,
    /// The whole log, and its hash (a trace to print).
    Log,
}

/// Runs `world` under madsim with the world's seed.
pub fn run_seed(world: &World, keep: Keep) -> SeedOutcome {
    run_world(Arc::new(world.clone()), keep)
}

/// Runs a world the caller has no further use for without copying it, as a sweep does.
pub fn run_world(world: Arc<World>, keep: Keep) -> SeedOutcome {
    let seed = world.seed;
    // A fresh thread per seed: std seeds each thread's hash-map keys once and then steps them, so a second
    // runtime on the same thread would iterate madsim's internal maps in another order. The checkers run on it
    // too, so the event log is freed by the thread that built it (a cheaper free) and only the outcome crosses.
    let run = std::thread::Builder::new()
        .name(format!("seed-{seed}"))
        .spawn(move || {
            let runtime = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
            let (state, final_state) = runtime.block_on(simulate(world.clone()));
            drop(runtime);
            judge(&world, state, &final_state, keep)
        })
        .expect("a seed thread can be spawned")
        .join();
    match run {
        Ok(outcome) => outcome,
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            SeedOutcome {
                seed,
                violations: Vec::new(),
                log_hash: None,
                events: 0,
                log: None,
                sim_ms: 0,
                faults: FaultCounts::default(),
                messages: 0,
                panic: Some(message),
                end: RunEnd::NeverStarted,
                ends: Vec::new(),
                probes: Default::default(),
                decisions: Tape::default(),
            }
        }
    }
}

/// The text a seed's thread panicked with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// The outcome of a run that ended: the checkers' verdict on its log and final state, and its figures.
fn judge(world: &World, mut state: SimState, final_state: &FinalState, keep: Keep) -> SeedOutcome {
    let log = std::mem::take(&mut state.log);
    let mut violations = check(world, &log, final_state);
    violations.extend(crate::checkers::unfired_decisions(world, &state.unfired_chances()));
    let probes = crate::probes::probes_of(&log);
    let log_hash = (keep != Keep::Verdict || !violations.is_empty()).then(|| log_hash(&log));
    SeedOutcome {
        seed: world.seed,
        violations,
        log_hash,
        events: log.len(),
        sim_ms: state.now_ms,
        faults: state.counts.clone(),
        messages: state.messages,
        log: (keep == Keep::Log).then_some(log),
        panic: None,
        end: RunEnd::of(final_state),
        ends: RunEnd::all(final_state),
        probes,
        decisions: std::mem::take(&mut state.tape),
    }
}

struct SimObserver {
    node: NodeAddr,
    state: Shared,
    clock: SimClock,
    world: Arc<World>,
    crash_tx: mpsc::UnboundedSender<NodeAddr>,
    finished_tx: mpsc::UnboundedSender<()>,
}

impl Observer for SimObserver {
    fn record(&self, node: NodeAddr, event: HostEvent) {
        let now = self.clock.now_ms();
        let moment = moment_of(node, &event);
        let mut state = self.state.lock();
        if let HostEvent::Persisted(PersistNote::Coordinator(marks)) = &event {
            state.ops_running = marks.iter().any(|m| matches!(m, ProgressMark::Running { .. }));
            let ended = marks.iter().filter(|m| matches!(m, ProgressMark::Done { .. } | ProgressMark::Failed { .. }));
            let ended: Vec<_> = ended.map(|m| m.op()).collect();
            state.ended_ops.extend(ended);
            for mark in marks {
                if let ProgressMark::AwaitingSegment { op, segment, .. } = *mark {
                    state.segments_ended.insert(op, segment);
                }
            }
        }
        match &event {
            HostEvent::Removing(_) => state.removing = true,
            HostEvent::Removed(_) => state.removing = false,
            _ => {}
        }
        state.record(now, SimNode::Protocol(node), EventKind::Host(event));
        if let Some(moment) = moment {
            fire_scheduled(&mut state, &self.world, now, |m| m == moment, &self.crash_tx);
        }
        // The run is over once the client has every answer, no operation runs and no removal is under way.
        if state.is_over() {
            let _ = self.finished_tx.send(());
        }
    }

    fn crash_point(&self, node: NodeAddr, point: CrashPoint) -> bool {
        let kind = match point {
            CrashPoint::BeforeSync => FaultKind::CrashBeforeSync,
            CrashPoint::AfterPersist => FaultKind::CrashAfterPersist,
        };
        let now = self.clock.now_ms();
        let hit =
            self.state.lock().fault(now, SimNode::Protocol(node), kind, || format!("{node} crashes at {point:?}"));
        if hit {
            self.state.lock().crash_requested.insert(self.node);
            let _ = self.crash_tx.send(self.node);
        }
        hit
    }
}

/// The named moment an event is, if any.
fn moment_of(node: NodeAddr, event: &HostEvent) -> Option<Moment> {
    match (node, event) {
        (NodeAddr::Shard(tablet), HostEvent::Persisted(PersistNote::ShardApplied { increment, .. })) => {
            Some(Moment::Applied { tablet, increment: *increment })
        }
        (NodeAddr::Coordinator, HostEvent::Received { msg: Message::Reply(reply), .. })
            if matches!(reply.outcome, ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied) =>
        {
            Some(Moment::Reported { tablet: reply.tablet, increment: reply.increment })
        }
        (NodeAddr::Coordinator, HostEvent::Persisted(PersistNote::Coordinator(marks))) => {
            // Only the first persist of a running operation counts as its start; later ones match nothing.
            marks.iter().find_map(|m| match m {
                ProgressMark::Running { op, increment: 0, tablets_done: 0 } => Some(Moment::Started { op: *op }),
                _ => None,
            })
        }
        _ => None,
    }
}

/// Fires every pending scheduled fault whose moment `matches`, once.
fn fire_scheduled(
    state: &mut SimState,
    world: &World,
    now: u64,
    matches: impl Fn(Moment) -> bool,
    crash_tx: &mpsc::UnboundedSender<NodeAddr>,
) {
    let due: Vec<usize> =
        state.pending_scheduled.iter().copied().filter(|i| matches(world.scheduled[*i].moment)).collect();
    for index in due {
        state.pending_scheduled.remove(&index);
        let fault = &world.scheduled[index];
        let detail = format!("{} {}", fault.action, fault.moment);
        match fault.action {
            Action::RebootCoordinator => {
                state.scheduled_fault(
                    now,
                    SimNode::Protocol(NodeAddr::Coordinator),
                    FaultKind::CoordinatorReboot,
                    detail,
                );
                let _ = crash_tx.send(NodeAddr::Coordinator);
            }
            Action::RebootShard(tablet) => {
                state.scheduled_fault(now, SimNode::Protocol(NodeAddr::Shard(tablet)), FaultKind::ShardReboot, detail);
                let _ = crash_tx.send(NodeAddr::Shard(tablet));
            }
            Action::DropReports(tablet) => {
                state.scheduled_fault(now, SimNode::World, FaultKind::MessageDrop, detail);
                state.dropped_reports.insert(tablet);
            }
            Action::TruncateDownload { tablet, increment, times }
            | Action::CorruptDownload { tablet, increment, times } => {
                let truncate = matches!(fault.action, Action::TruncateDownload { .. });
                let Some(backup_id) = world.chain_backup_ids.get(increment as usize) else { continue };
                let object = BackupManifest::object_name(*backup_id, tablet);
                let kind = if truncate { FaultKind::DownloadTruncated } else { FaultKind::DownloadCorrupt };
                state.record(now, SimNode::World, EventKind::Fault { kind, detail: format!("scheduled: {detail}") });
                *state.scheduled_damage.entry((object, truncate)).or_default() += times;
            }
        }
    }
}

/// The node at `ip`, if any protocol node lives there.
pub fn node_at_ip(ip: IpAddr) -> Option<NodeAddr> {
    let IpAddr::V4(v4) = ip else { return None };
    match v4.octets() {
        [10, 0, 0, 1] => Some(NodeAddr::Coordinator),
        [10, 0, 0, 2] => Some(NodeAddr::Client),
        [10, 0, 0, 4] => Some(NodeAddr::Publisher),
        [10, 0, 0, 5] => Some(NodeAddr::Replica),
        [10, 0, table @ 1..=254, shard @ 1..=255] => Some(NodeAddr::Shard(TabletId {
            table: lockstep::model::TableId(u32::from(table) - 1),
            shard: lockstep::model::ShardId(u32::from(shard) - 1),
        })),
        _ => None,
    }
}

pub(crate) fn node_ip(node: NodeAddr) -> IpAddr {
    match node {
        NodeAddr::Coordinator => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        NodeAddr::Client => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        NodeAddr::Publisher => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4)),
        NodeAddr::Replica => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
        NodeAddr::Shard(tablet) => {
            let table = u8::try_from(tablet.table.0).expect("a world holds at most MAX_TABLES tables");
            let shard = u8::try_from(tablet.shard.0).expect("a table has at most MAX_SHARDS_PER_TABLE shards");
            IpAddr::V4(Ipv4Addr::new(10, 0, table + 1, shard + 1))
        }
    }
}

/// Everything a node's init closure needs; cheap to clone on every (re)start.
#[derive(Clone)]
struct NodeEnv {
    state: Shared,
    clock: SimClock,
    directory: Arc<Directory>,
    crash_tx: mpsc::UnboundedSender<NodeAddr>,
    finished_tx: mpsc::UnboundedSender<()>,
    world: Arc<World>,
}

impl NodeEnv {
    async fn host_io(&self, node: NodeAddr) -> Option<HostIo<SimDisk, SimStoreClient, SimTransport, SimObserver>> {
        let ip = node_ip(node);
        let endpoint = Rc::new(Endpoint::bind(SocketAddr::new(ip, PROTOCOL_PORT)).await.ok()?);
        let store = SimStoreClient::new(endpoint.clone(), self.state.clone());
        let transport = self.transport(node, endpoint);
        let observer = self.observer(node);
        Some(HostIo {
            disk: Rc::new(SimDisk { node, state: self.state.clone() }),
            store: Rc::new(store),
            transport: Rc::new(transport),
            observer: Rc::new(observer),
            epoch: self.clock.epoch,
            // One epoch for the whole run, across every reboot: the machines' time is the simulated time.
            epoch_ms: 0,
            download_timeout_ms: self.world.download_timeout_ms,
            // The same time as the epoch gives (see `clock::tests`), read without the process clock's shim.
            clock: Some(Rc::new({
                let clock = self.clock.clone();
                move || clock.now_ms()
            })),
            bug: self.world.host_bug,
        })
    }

    fn transport(&self, node: NodeAddr, endpoint: Rc<Endpoint>) -> SimTransport {
        SimTransport {
            node,
            endpoint,
            directory: self.directory.clone(),
            state: self.state.clone(),
            clock: self.clock.clone(),
        }
    }

    fn observer(&self, node: NodeAddr) -> SimObserver {
        SimObserver {
            node,
            state: self.state.clone(),
            clock: self.clock.clone(),
            world: self.world.clone(),
            crash_tx: self.crash_tx.clone(),
            finished_tx: self.finished_tx.clone(),
        }
    }

    async fn run(self, node: NodeAddr) {
        if node == NodeAddr::Client {
            self.run_client().await;
            return;
        }
        let Some(io) = self.host_io(node).await else { return };
        match node {
            NodeAddr::Coordinator => io.run_coordinator(self.world.coordinator.clone(), self.world.seed, None).await,
            NodeAddr::Shard(shard) => io.run_shard(shard, self.world.shard.clone()).await,
            NodeAddr::Client => unreachable!("handled above"),
            NodeAddr::Publisher | NodeAddr::Replica => unreachable!("a restore world runs no replication role"),
        }
    }

    /// The operator's client: makes each planned call at its time and resends it every
    /// `CLIENT_RETRY_MS` until the coordinator answers (calls are idempotent or answered the same way).
    async fn run_client(self) {
        let node = NodeAddr::Client;
        let Ok(endpoint) = Endpoint::bind(SocketAddr::new(node_ip(node), PROTOCOL_PORT)).await else { return };
        let transport = Rc::new(self.transport(node, Rc::new(endpoint)));
        let observer = self.observer(node);
        let (answers_tx, mut answers) = mpsc::unbounded_channel();
        let receiver = transport.clone();
        tokio::task::spawn_local(async move {
            while let Ok((from, frame)) = receiver.recv().await {
                if let Ok(msg @ Message::ClientReply(_)) = decode_frame::<Message>(&frame) {
                    let _ = answers_tx.send((from, msg));
                }
            }
        });
        // Operations whose cancel the coordinator answered cancelled.
        let mut cancelled: Vec<OperationId> = Vec::new();
        for (index, planned) in self.world.calls.iter().enumerate() {
            if planned.if_cancelled.is_some_and(|op| !cancelled.contains(&op)) {
                continue;
            }
            match (planned.after_end_of, planned.after_segment) {
                (_, Some((op, segment))) => {
                    // As an operator's script polling the operation's status would.
                    let ended = |state: &SimState| {
                        state.ended_ops.contains(&op) || state.segments_ended.get(&op).is_some_and(|s| *s >= segment)
                    };
                    while !ended(&self.state.lock()) {
                        tokio::time::sleep(Duration::from_millis(ENDED_POLL_MS)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(planned.at_ms)).await;
                }
                (None, None) => {
                    tokio::time::sleep_until(self.clock.epoch + Duration::from_millis(planned.at_ms)).await;
                }
                (Some(op), None) => {
                    // As an operator's script polling the operation's status would; the harness reads the
                    // coordinator's durable verdict instead of making calls the world did not plan.
                    while !self.state.lock().ended_ops.contains(&op) {
                        tokio::time::sleep(Duration::from_millis(ENDED_POLL_MS)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(planned.at_ms)).await;
                }
            }
            let call_id = index as u64 + 1;
            let msg = Message::Client(ClientRequest { call_id, call: planned.call.clone() });
            'answered: loop {
                observer.record(node, HostEvent::Sent { to: NodeAddr::Coordinator, msg: msg.clone() });
                transport.send(NodeAddr::Coordinator, encode_frame(&msg)).await;
                let give_up = tokio::time::Instant::now() + Duration::from_millis(CLIENT_RETRY_MS);
                loop {
                    let wait = give_up.saturating_duration_since(tokio::time::Instant::now());
                    let Ok(Some((from, answer))) = tokio::time::timeout(wait, answers.recv()).await else { break };
                    let Message::ClientReply(reply) = &answer else { continue };
                    if reply.call_id == call_id {
                        if let ClientAnswer::Cancelled { op } = reply.answer {
                            cancelled.push(op);
                        }
                        observer.record(node, HostEvent::Received { from, msg: answer });
                        break 'answered;
                    }
                }
            }
        }
        let mut state = self.state.lock();
        state.client_done = true;
        if state.is_over() {
            let _ = self.finished_tx.send(());
        }
    }
}

async fn simulate(world: Arc<World>) -> (SimState, FinalState) {
    let clock = SimClock::start();
    let epoch = clock.epoch;
    let state = Shared::new(SimState::new(world.seed, world.faults.clone(), world.decisions.clone()));
    let (crash_tx, mut crash_rx) = mpsc::unbounded_channel();
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
    let nodes: Vec<NodeAddr> =
        world.tablets().map(NodeAddr::Shard).chain([NodeAddr::Coordinator, NodeAddr::Client]).collect();
    state.lock().pending_scheduled = (0..world.scheduled.len()).collect();
    let directory = Arc::new(Directory {
        addrs: nodes.iter().map(|n| (*n, SocketAddr::new(node_ip(*n), PROTOCOL_PORT))).collect(),
    });
    let supervisor_crash_tx = crash_tx.clone();
    let env =
        NodeEnv { state: state.clone(), clock: clock.clone(), directory, crash_tx, finished_tx, world: world.clone() };
    let handle = Handle::current();

    let lost: BTreeMap<String, Option<OperationId>> =
        world.lost_objects.iter().map(|l| (l.object.clone(), l.until_end_of)).collect();
    // Restore worlds put nothing, so the store's listings have no lag to show.
    let store_id = crate::store::create_node(&handle, state.clone(), clock.clone(), world.objects.clone(), lost, 0);

    let mut ids: BTreeMap<NodeAddr, NodeId> = BTreeMap::new();
    for node in &nodes {
        let env = env.clone();
        let node = *node;
        let id = handle
            .create_node()
            .name(node.to_string())
            .ip(node_ip(node))
            // Boxed: the host's future is large, and madsim copies an unboxed init future into every restart.
            .init(move || Box::pin(env.clone().run(node)))
            .build()
            .id();
        ids.insert(node, id);
    }
    drop(env);

    // Faults scheduled at a time fire from the supervisor's side.
    let mut times: Vec<u64> = world
        .scheduled
        .iter()
        .filter_map(|f| match f.moment {
            Moment::AtMs(at) => Some(at),
            _ => None,
        })
        .collect();
    times.sort_unstable();
    times.dedup();
    let timed_state = state.clone();
    let timed_world = world.clone();
    let timed_crash = supervisor_crash_tx.clone();
    tokio::task::spawn_local(async move {
        for at in times {
            tokio::time::sleep_until(epoch + Duration::from_millis(at)).await;
            let mut state = timed_state.lock();
            fire_scheduled(&mut state, &timed_world, at, |m| m == Moment::AtMs(at), &timed_crash);
        }
    });

    let mut supervisor = Supervisor::new(&world, state.clone(), clock, handle, ids);
    let timed_out = loop {
        let wake = supervisor.next_wake();
        // `biased`: tokio's unbiased select draws from a process-wide counter, which breaks determinism.
        tokio::select! {
            biased;
            // Sent when the run looked over; an event since (a removal begun right after the last persist) may
            // have made it not over yet.
            _ = finished_rx.recv() => if state.lock().is_over() { break false },
            Some(node) = crash_rx.recv() => supervisor.crash(node, 100..2_000),
            _ = tokio::time::sleep_until(epoch + Duration::from_millis(wake)) => {
                if supervisor.tick() {
                    break true;
                }
            }
        }
    };
    let final_state = supervisor.final_state(&world, timed_out);
    supervisor.shut_down(store_id).await;
    let state = std::mem::replace(&mut *state.lock(), SimState::new(0, crate::faults::FaultPlan::none(), None));
    (state, final_state)
}

/// The fault schedule: random reboots during the fault phase, crash requests from crash points, restarts,
/// healing, and the liveness bound.
struct Supervisor {
    nodes: Nodes,
    state: Shared,
    clock: SimClock,
    heal_at_ms: u64,
    give_up_at_ms: u64,
    next_coordinator_reboot_ms: Option<u64>,
    next_shard_reboot_ms: Option<u64>,
    /// When replaying a tape: its reboots still to come, latest first.
    replayed_reboots: Vec<Reboot>,
    tablets: Vec<TabletId>,
}

impl Supervisor {
    fn new(world: &World, state: Shared, clock: SimClock, handle: Handle, ids: BTreeMap<NodeAddr, NodeId>) -> Self {
        let heal_at_ms = world.faults.heal_at_ms;
        let mut supervisor = Self {
            nodes: Nodes::new(state.clone(), clock.clone(), handle, ids),
            state,
            clock,
            heal_at_ms,
            give_up_at_ms: world.gives_up_at_ms(),
            next_coordinator_reboot_ms: None,
            next_shard_reboot_ms: None,
            replayed_reboots: Vec::new(),
            tablets: world.tablets().collect(),
        };
        match &world.decisions {
            Some(tape) => supervisor.replayed_reboots = tape.reboots.iter().rev().copied().collect(),
            None => {
                supervisor.next_coordinator_reboot_ms = supervisor.draw_reboot(FaultKind::CoordinatorReboot, 0);
                supervisor.next_shard_reboot_ms = supervisor.draw_reboot(FaultKind::ShardReboot, 0);
            }
        }
        supervisor
    }

    /// The time of the next reboot of this kind, exponentially distributed at the seed's rate per second.
    fn draw_reboot(&self, kind: FaultKind, after_ms: u64) -> Option<u64> {
        let rate_per_s = self.state.lock().plan.rate(kind);
        self.nodes.draw_reboot(rate_per_s, after_ms, self.heal_at_ms)
    }

    fn next_wake(&self) -> u64 {
        let replayed = self.replayed_reboots.last().map(|r| r.at_ms);
        let reboots = [self.next_coordinator_reboot_ms, self.next_shard_reboot_ms, replayed];
        self.nodes.next_wake(self.give_up_at_ms, self.heal_at_ms, reboots.into_iter().flatten())
    }

    /// Handles everything due now; `true` when the liveness bound has passed.
    fn tick(&mut self) -> bool {
        let now = self.clock.now_ms();
        if now >= self.give_up_at_ms {
            return true;
        }
        self.nodes.restart_due(now);
        self.nodes.heal_if_due(now, self.heal_at_ms);
        if self.next_coordinator_reboot_ms.is_some_and(|at| at <= now) {
            self.reboot(now, NodeAddr::Coordinator, FaultKind::CoordinatorReboot);
            self.next_coordinator_reboot_ms = self.draw_reboot(FaultKind::CoordinatorReboot, now);
        }
        if self.next_shard_reboot_ms.is_some_and(|at| at <= now) {
            let tablet = self.tablets[self.state.lock().dice.gen_range(0..self.tablets.len())];
            self.reboot(now, NodeAddr::Shard(tablet), FaultKind::ShardReboot);
            self.next_shard_reboot_ms = self.draw_reboot(FaultKind::ShardReboot, now);
        }
        while let Some(reboot) = self.replayed_reboots.last().copied().filter(|r| r.at_ms <= now) {
            self.replayed_reboots.pop();
            self.reboot(now, reboot.node, reboot.kind());
        }
        false
    }

    fn reboot(&mut self, now: u64, node: NodeAddr, kind: FaultKind) {
        // Every decided reboot goes on the tape, even one that finds its node down: a replay must wake the
        // supervisor at the same moments, or madsim would schedule the rest of the run differently.
        self.state.lock().tape.reboots.push(Reboot { at_ms: now, node });
        if self.nodes.is_down(node) || self.state.lock().healed {
            return;
        }
        {
            let mut state = self.state.lock();
            state.counts.add(kind);
            let detail = format!("kill {node}");
            state.record(now, SimNode::Protocol(node), EventKind::Fault { kind, detail });
        }
        self.crash(node, 10..3_000);
    }

    fn crash(&mut self, node: NodeAddr, downtime_ms: std::ops::Range<u64>) {
        self.nodes.crash(node, downtime_ms);
    }

    async fn shut_down(&self, store: NodeId) {
        self.nodes.shut_down(store).await;
    }

    fn final_state(&self, world: &World, timed_out: bool) -> FinalState {
        let state = self.state.lock();
        let coordinator = durable_state::<CoordinatorDurable>(&state, NodeAddr::Coordinator);
        let shards = world.tablets().map(|s| (s, durable_state::<ShardDurable>(&state, NodeAddr::Shard(s)))).collect();
        // A node a crash point has asked to crash is as good as down: it does nothing more.
        let coordinator_up =
            !self.nodes.is_down(NodeAddr::Coordinator) && !state.crash_requested.contains(&NodeAddr::Coordinator);
        let coordinator_files =
            state.disks.get(&NodeAddr::Coordinator).map(|disk| disk.list_durable()).filter(|_| coordinator_up);
        FinalState { coordinator, shards, timed_out, coordinator_files }
    }
}

/// A node's durable state at the end of a run, as a restarted node would read it back (chain files included).
pub(crate) fn durable_state<Dur: lockstep::host::DurableState>(state: &SimState, node: NodeAddr) -> Option<Dur> {
    let disk = state.disks.get(&node)?;
    lockstep::host::load_state(&disk.durable_view()).ok()?.1
}

/// The nodes of a run as its supervisor keeps them: which is down until when, and how to kill, restart and
/// heal them. Shared by the restore runner and the replication runner.
pub(crate) struct Nodes {
    state: Shared,
    clock: SimClock,
    handle: Handle,
    ids: BTreeMap<NodeAddr, NodeId>,
    /// Nodes that are down, with the time they come back.
    down: BTreeMap<NodeAddr, u64>,
}

impl Nodes {
    pub(crate) fn new(state: Shared, clock: SimClock, handle: Handle, ids: BTreeMap<NodeAddr, NodeId>) -> Self {
        Self { state, clock, handle, ids, down: BTreeMap::new() }
    }

    pub(crate) fn is_down(&self, node: NodeAddr) -> bool {
        self.down.contains_key(&node)
    }

    /// The time of the next reboot at `rate_per_s`, exponentially distributed, if it comes before `heal_at_ms`.
    pub(crate) fn draw_reboot(&self, rate_per_s: f64, after_ms: u64, heal_at_ms: u64) -> Option<u64> {
        if rate_per_s <= 0.0 {
            return None;
        }
        let uniform: f64 = self.state.lock().dice.gen_range(f64::EPSILON..1.0);
        let gap_ms = (-uniform.ln() / rate_per_s * 1000.0) as u64;
        let at = after_ms.saturating_add(gap_ms.max(1));
        (at < heal_at_ms).then_some(at)
    }

    /// When the supervisor must wake next: the liveness bound, the heal (until it has come), a restart, or one
    /// of `also`.
    pub(crate) fn next_wake(&self, give_up_at_ms: u64, heal_at_ms: u64, also: impl Iterator<Item = u64>) -> u64 {
        let mut wake = give_up_at_ms;
        if !self.state.lock().healed {
            wake = wake.min(heal_at_ms);
        }
        let wake = also.fold(wake, u64::min);
        self.down.values().fold(wake, |wake, at| wake.min(*at))
    }

    /// Restarts every node whose downtime has passed.
    pub(crate) fn restart_due(&mut self, now: u64) {
        let due: Vec<NodeAddr> = self.down.iter().filter(|(_, at)| **at <= now).map(|(n, _)| *n).collect();
        for node in due {
            self.down.remove(&node);
            self.handle.restart(self.ids[&node]);
            self.state.lock().record(now, SimNode::Protocol(node), EventKind::Restarted);
        }
    }

    /// Stops the faults once the heal time has come.
    pub(crate) fn heal_if_due(&self, now: u64, heal_at_ms: u64) {
        if now >= heal_at_ms && !self.state.lock().healed {
            let mut state = self.state.lock();
            state.healed = true;
            state.record(now, SimNode::World, EventKind::Healed);
        }
    }

    /// Kills `node` now, damages its disk as a crash does, and schedules its restart.
    pub(crate) fn crash(&mut self, node: NodeAddr, downtime_ms: std::ops::Range<u64>) {
        self.state.lock().crash_requested.remove(&node);
        if self.down.contains_key(&node) {
            return;
        }
        let now = self.clock.now_ms();
        self.handle.kill(self.ids[&node]);
        let mut state = self.state.lock();
        let tear = state.roll(node, FaultKind::DiskTornWrite);
        let mut disk = state.disks.remove(&node).unwrap_or_default();
        let damage = disk.crash(&mut state.rng, tear);
        state.disks.insert(node, disk);
        if damage.lost_writes > 0 {
            state.counts.add(FaultKind::DiskLostWrite);
        }
        if damage.torn {
            state.counts.add(FaultKind::DiskTornWrite);
        }
        let kind = EventKind::Killed { lost_writes: damage.lost_writes, torn: damage.torn };
        state.record(now, SimNode::Protocol(node), kind);
        let back_at = now + state.rng.gen_range(downtime_ms);
        drop(state);
        self.down.insert(node, back_at);
    }

    /// Kills every node and lets the executor drop their tasks. madsim does not drop pending tasks with the
    /// runtime, and a task parked on a timer forms a reference cycle with it, so without this every seed's
    /// world would stay in memory.
    pub(crate) async fn shut_down(&self, store: NodeId) {
        for id in self.ids.values().copied().chain(std::iter::once(store)) {
            self.handle.kill(id);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The readable transcript of a run kept with its log: the world, every event in simulated time, how the
/// operation ended and what broke. Nothing in it changes between runs of the same seed.
pub fn transcript(world: &World, outcome: &SeedOutcome) -> String {
    use std::fmt::Write;
    let mut text = world.describe();
    let marks = crate::checkers::offending_events(&outcome.violations);
    for (index, event) in outcome.log.iter().flatten().enumerate() {
        writeln!(text, "{event}").expect("writing to a String cannot fail");
        if let Some(invariants) = marks.get(&index) {
            writeln!(text, "{}", crate::checkers::offending_mark(index, invariants)).expect("cannot fail");
        }
    }
    for (op, end) in &outcome.ends {
        writeln!(text, "operation {op}: {end}").expect("writing to a String cannot fail");
    }
    for violation in &outcome.violations {
        writeln!(text, "{violation}").expect("writing to a String cannot fail");
    }
    if outcome.violations.is_empty() {
        text.push_str("every invariant held\n");
    }
    text
}
