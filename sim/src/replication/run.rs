//! Runs one replication world under madsim: the store node, the publisher and the replica, the commit schedule,
//! the fault phase and the heal; then the checkers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::host::{CommitFeed, CrashPoint, HostEvent, HostIo, Observer};
use lockstep::model::Change;
use lockstep::protocol::{NodeAddr, PersistNote};
use lockstep::replication::{PublisherDurable, ReplicaDurable, Version, version_object};
use madsim::net::Endpoint;
use madsim::runtime::Handle;
use madsim::task::NodeId;
use tokio::sync::mpsc;

use super::{ReplicationFinal, ReplicationViolation, ReplicationWorld, check};
use crate::clock::SimClock;
use crate::disk::SimDisk;
use crate::events::{Event, EventKind, SimNode, log_hash};
use crate::faults::{FaultCounts, FaultKind};
use crate::runner::{Nodes, durable_state, node_ip, panic_message};
use crate::state::{Shared, SimState};
use crate::store::SimStoreClient;

const PORT: u16 = 7000;
/// The two replication nodes, in the order reboots are drawn for them.
const NODES: [NodeAddr; 2] = [NodeAddr::Publisher, NodeAddr::Replica];

/// What one replication seed produced.
#[derive(Clone, Debug)]
pub struct ReplicationOutcome {
    pub seed: u64,
    pub violations: Vec<ReplicationViolation>,
    /// Hash of the whole event log: the same seed must give the same hash.
    pub log_hash: u64,
    pub events: usize,
    /// The log itself, when asked for.
    pub log: Option<Vec<Event>>,
    pub sim_ms: u64,
    pub faults: FaultCounts,
    /// Random reboots of the publisher and of the replica.
    pub reboots: [u64; 2],
    /// The seed's run panicked with this message.
    pub panic: Option<String>,
    /// The version the replica durably held at the end, and the last one committed.
    pub replica_through: Version,
    pub last_version: Version,
}

/// Runs `world` under madsim with the world's seed, on a thread of its own (as restore worlds run).
pub fn run_replication(world: ReplicationWorld, keep_log: bool) -> ReplicationOutcome {
    let seed = world.seed;
    let last_version = world.last_version();
    let run = std::thread::Builder::new()
        .name(format!("replication-{seed}"))
        .spawn(move || {
            let runtime = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
            let world = Arc::new(world);
            let (state, end, reboots) = runtime.block_on(simulate(world.clone()));
            drop(runtime);
            judge(&world, state, &end, reboots, keep_log)
        })
        .expect("a seed thread can be spawned")
        .join();
    run.unwrap_or_else(|payload| {
        let message = panic_message(payload.as_ref());
        ReplicationOutcome {
            seed,
            violations: Vec::new(),
            log_hash: 0,
            events: 0,
            log: None,
            sim_ms: 0,
            faults: FaultCounts::default(),
            reboots: [0; 2],
            panic: Some(message),
            replica_through: 0,
            last_version,
        }
    })
}

fn judge(
    world: &ReplicationWorld,
    mut state: SimState,
    end: &ReplicationFinal,
    reboots: [u64; 2],
    keep_log: bool,
) -> ReplicationOutcome {
    let log = std::mem::take(&mut state.log);
    ReplicationOutcome {
        seed: world.seed,
        violations: check(world, &log, end),
        log_hash: log_hash(&log),
        events: log.len(),
        sim_ms: state.now_ms,
        faults: state.counts.clone(),
        reboots,
        panic: None,
        replica_through: end.replica.as_ref().map_or(0, |replica| replica.applied_through),
        last_version: world.last_version(),
        log: keep_log.then_some(log),
    }
}

/// The readable trace of a run kept with its log: the world, every event, and the verdict.
pub fn transcript(world: &ReplicationWorld, outcome: &ReplicationOutcome) -> String {
    use std::fmt::Write;
    let mut text = world.describe();
    for (index, event) in outcome.log.iter().flatten().enumerate() {
        let _ = writeln!(text, "{event}");
        for violation in outcome.violations.iter().filter(|v| v.event_index == Some(index)) {
            let _ = writeln!(text, "          ^^^ event #{index}: first offending event of {}", violation.invariant);
        }
    }
    let _ = writeln!(
        text,
        "replica holds version {} of {}; log hash {:016x}",
        outcome.replica_through, outcome.last_version, outcome.log_hash
    );
    for violation in &outcome.violations {
        let _ = writeln!(text, "{violation}");
    }
    if let Some(panic) = &outcome.panic {
        let _ = writeln!(text, "PANIC {panic}");
    }
    if outcome.violations.is_empty() && outcome.panic.is_none() {
        text.push_str("every invariant held\n");
    }
    text
}

/// The durable progress the observers have seen: the run is over once both reach the last version.
#[derive(Default)]
struct Progress {
    pushed: Version,
    applied: Version,
}

struct ReplicationObserver {
    node: NodeAddr,
    state: Shared,
    clock: SimClock,
    progress: Arc<Mutex<Progress>>,
    last_version: Version,
    crash_tx: mpsc::UnboundedSender<NodeAddr>,
    finished_tx: mpsc::UnboundedSender<()>,
}

impl Observer for ReplicationObserver {
    fn record(&self, node: NodeAddr, event: HostEvent) {
        let now = self.clock.now_ms();
        let mut progress = self.progress.lock().expect("only this seed's thread holds it");
        match &event {
            HostEvent::Persisted(PersistNote::Published { pushed_through }) => progress.pushed = *pushed_through,
            HostEvent::Persisted(PersistNote::Replicated { applied_through, .. }) => {
                progress.applied = *applied_through;
            }
            _ => {}
        }
        if progress.pushed == self.last_version && progress.applied == self.last_version {
            let _ = self.finished_tx.send(());
        }
        self.state.lock().record(now, SimNode::Protocol(node), EventKind::Host(event));
    }

    fn crash_point(&self, node: NodeAddr, point: CrashPoint) -> bool {
        let kind = match point {
            CrashPoint::BeforeSync => FaultKind::CrashBeforeSync,
            CrashPoint::AfterPersist => FaultKind::CrashAfterPersist,
        };
        let now = self.clock.now_ms();
        let mut state = self.state.lock();
        let hit = state.fault(now, SimNode::Protocol(node), kind, || format!("{node} crashes at {point:?}"));
        if hit {
            state.crash_requested.insert(self.node);
            let _ = self.crash_tx.send(self.node);
        }
        hit
    }
}

/// The source database's commits, on the world's schedule.
struct ScheduledCommits {
    world: Arc<ReplicationWorld>,
    clock: SimClock,
}

impl CommitFeed for ScheduledCommits {
    async fn next(&self, after: Version) -> Option<(Version, Vec<Change>)> {
        let at = usize::try_from(after).ok()?;
        let changes = self.world.versions.get(at)?.clone();
        let commit_at_ms = self.world.commit_at_ms[at];
        tokio::time::sleep_until(self.clock.epoch + Duration::from_millis(commit_at_ms)).await;
        Some((after + 1, changes))
    }
}

/// Everything a node's init closure needs; cheap to clone on every (re)start.
#[derive(Clone)]
struct NodeEnv {
    world: Arc<ReplicationWorld>,
    state: Shared,
    clock: SimClock,
    progress: Arc<Mutex<Progress>>,
    crash_tx: mpsc::UnboundedSender<NodeAddr>,
    finished_tx: mpsc::UnboundedSender<()>,
}

impl NodeEnv {
    async fn run(self, node: NodeAddr) {
        let Ok(endpoint) = Endpoint::bind(SocketAddr::new(node_ip(node), PORT)).await else { return };
        let endpoint = Rc::new(endpoint);
        let observer = ReplicationObserver {
            node,
            state: self.state.clone(),
            clock: self.clock.clone(),
            progress: self.progress.clone(),
            // A world that loses a version runs to its bound: the replica must not get past the loss, however long.
            last_version: if self.world.lost_version.is_some() { Version::MAX } else { self.world.last_version() },
            crash_tx: self.crash_tx.clone(),
            finished_tx: self.finished_tx.clone(),
        };
        let io = HostIo {
            disk: Rc::new(SimDisk { node, state: self.state.clone() }),
            store: Rc::new(SimStoreClient::new(endpoint, self.state.clone())),
            // The replication roles talk only to the store.
            transport: Rc::new(lockstep::io::NoPeers),
            observer: Rc::new(observer),
            epoch: self.clock.epoch,
            epoch_ms: 0,
            download_timeout_ms: self.world.store_timeout_ms,
            clock: Some(Rc::new({
                let clock = self.clock.clone();
                move || clock.now_ms()
            })),
            bug: None,
        };
        let (stream, tablet) = (self.world.stream.clone(), self.world.tablet);
        match node {
            NodeAddr::Publisher => {
                let feed = Rc::new(ScheduledCommits { world: self.world.clone(), clock: self.clock.clone() });
                io.run_publisher(stream, tablet, self.world.publisher.clone(), self.world.seed, feed).await;
            }
            NodeAddr::Replica => io.run_replica(stream, tablet, self.world.replica.clone()).await,
            _ => unreachable!("a replication world runs a publisher and a replica"),
        }
    }
}

async fn simulate(world: Arc<ReplicationWorld>) -> (SimState, ReplicationFinal, [u64; 2]) {
    let clock = SimClock::start();
    let epoch = clock.epoch;
    let state = Shared::new(SimState::new(world.seed, world.faults.clone(), None));
    let (crash_tx, mut crash_rx) = mpsc::unbounded_channel();
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let handle = Handle::current();

    // The store starts empty: every object of the stream is the publisher's.
    let lag = world.listing_lag_ms;
    let lost: BTreeMap<String, Option<lockstep::protocol::OperationId>> =
        world.lost_version.map(|version| (version_object(&world.stream, version), None)).into_iter().collect();
    let store_id = crate::store::create_node(&handle, state.clone(), clock.clone(), Default::default(), lost, lag);
    let env = NodeEnv {
        world: world.clone(),
        state: state.clone(),
        clock: clock.clone(),
        progress: progress.clone(),
        crash_tx,
        finished_tx,
    };
    let mut ids = BTreeMap::new();
    for node in NODES {
        let env = env.clone();
        let id = handle
            .create_node()
            .name(node.to_string())
            .ip(node_ip(node))
            .init(move || Box::pin(env.clone().run(node)))
            .build()
            .id();
        ids.insert(node, id);
    }
    drop(env);

    let mut supervisor = Supervisor::new(&world, state.clone(), clock, handle, ids);
    let timed_out = loop {
        let wake = supervisor.next_wake();
        tokio::select! {
            biased;
            _ = finished_rx.recv() => break false,
            Some(node) = crash_rx.recv() => supervisor.nodes.crash(node, 100..2_000),
            _ = tokio::time::sleep_until(epoch + Duration::from_millis(wake)) => {
                if supervisor.tick() {
                    break true;
                }
            }
        }
    };
    let end = supervisor.final_state(timed_out);
    supervisor.nodes.shut_down(store_id).await;
    let reboots = supervisor.reboots;
    let state = std::mem::replace(&mut *state.lock(), SimState::new(0, crate::faults::FaultPlan::none(), None));
    (state, end, reboots)
}

/// The fault schedule: random reboots during the fault phase, crashes asked for by crash points, restarts,
/// healing, and the liveness bound.
struct Supervisor {
    nodes: Nodes,
    state: Shared,
    clock: SimClock,
    heal_at_ms: u64,
    give_up_at_ms: u64,
    /// Reboot rate per second and next reboot time, per node of [`NODES`].
    rates: [f64; 2],
    next_reboot_ms: [Option<u64>; 2],
    reboots: [u64; 2],
}

impl Supervisor {
    fn new(
        world: &ReplicationWorld,
        state: Shared,
        clock: SimClock,
        handle: Handle,
        ids: BTreeMap<NodeAddr, NodeId>,
    ) -> Self {
        let mut supervisor = Self {
            nodes: Nodes::new(state.clone(), clock.clone(), handle, ids),
            state,
            clock,
            heal_at_ms: world.faults.heal_at_ms,
            give_up_at_ms: world.gives_up_at_ms(),
            rates: [world.publisher_reboots_per_s, world.replica_reboots_per_s],
            next_reboot_ms: [None; 2],
            reboots: [0; 2],
        };
        for at in 0..NODES.len() {
            supervisor.next_reboot_ms[at] =
                supervisor.nodes.draw_reboot(supervisor.rates[at], 0, supervisor.heal_at_ms);
        }
        supervisor
    }

    fn next_wake(&self) -> u64 {
        self.nodes.next_wake(self.give_up_at_ms, self.heal_at_ms, self.next_reboot_ms.into_iter().flatten())
    }

    /// Handles everything due now; `true` once the liveness bound has passed.
    fn tick(&mut self) -> bool {
        let now = self.clock.now_ms();
        if now >= self.give_up_at_ms {
            return true;
        }
        self.nodes.restart_due(now);
        self.nodes.heal_if_due(now, self.heal_at_ms);
        for (at, node) in NODES.into_iter().enumerate() {
            if self.next_reboot_ms[at].is_some_and(|next| next <= now) {
                if !self.nodes.is_down(node) && !self.state.lock().healed {
                    self.reboots[at] += 1;
                    self.nodes.crash(node, 10..3_000);
                }
                self.next_reboot_ms[at] = self.nodes.draw_reboot(self.rates[at], now, self.heal_at_ms);
            }
        }
        false
    }

    fn final_state(&self, timed_out: bool) -> ReplicationFinal {
        let state = self.state.lock();
        ReplicationFinal {
            publisher: durable_state::<PublisherDurable>(&state, NodeAddr::Publisher),
            replica: durable_state::<ReplicaDurable>(&state, NodeAddr::Replica),
            timed_out,
        }
    }
}

/// What a sweep of replication seeds found.
#[derive(Clone, Debug, Default)]
pub struct ReplicationSummary {
    pub seeds_run: u64,
    /// Seeds that broke an invariant or panicked, in seed order.
    pub failures: Vec<ReplicationOutcome>,
    /// Broken invariants over all seeds.
    pub by_invariant: BTreeMap<super::ReplicationInvariant, u64>,
    pub faults: FaultCounts,
    pub reboots: [u64; 2],
    pub sim_ms: u64,
    /// Seeds run twice for the determinism check, and those whose two logs differed.
    pub determinism_checked: u64,
    pub determinism_mismatches: Vec<u64>,
}

/// Runs seeds `start..start + seeds` of replication worlds with `bugs` on `jobs` threads; reruns one seed in
/// each block of `determinism_every` (and the first), as the restore sweep samples them, and compares the logs'
/// hashes. `progress` hears the seeds done and
/// failed so far after every seed.
pub fn sweep_replication(
    start: u64,
    seeds: u64,
    bugs: super::ReplicationBugs,
    jobs: usize,
    determinism_every: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> ReplicationSummary {
    assert!(start.checked_add(seeds.saturating_sub(1)).is_some(), "the seeds of a sweep fit in u64");
    let jobs = jobs.clamp(1, 64) as u64;
    let (done, failed) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    let (done, failed) = (&done, &failed);
    let mut parts: Vec<Vec<(ReplicationOutcome, Option<u64>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|worker| {
                scope.spawn(move || {
                    let mut outcomes = Vec::new();
                    let mut index = worker;
                    while index < seeds {
                        let seed = start + index;
                        let outcome = run_replication(ReplicationWorld::generate(seed, bugs), false);
                        // The restore sweep's sample: one seed in each block, spread over the workers.
                        let sampled = crate::sweep::in_determinism_sample(seed, determinism_every);
                        let rerun = (index == 0 || sampled)
                            .then(|| run_replication(ReplicationWorld::generate(seed, bugs), false).log_hash);
                        use std::sync::atomic::Ordering::Relaxed;
                        let broke = !outcome.violations.is_empty() || outcome.panic.is_some();
                        let failed = failed.fetch_add(u64::from(broke), Relaxed) + u64::from(broke);
                        progress(done.fetch_add(1, Relaxed) + 1, failed);
                        outcomes.push((outcome, rerun));
                        index += jobs;
                    }
                    outcomes
                })
            })
            .collect();
        workers.into_iter().map(|worker| worker.join().expect("a sweep worker does not panic")).collect()
    });
    let mut all: Vec<(ReplicationOutcome, Option<u64>)> = parts.iter_mut().flat_map(std::mem::take).collect();
    all.sort_by_key(|(outcome, _)| outcome.seed);
    let mut summary = ReplicationSummary { seeds_run: all.len() as u64, ..ReplicationSummary::default() };
    for (outcome, rerun) in all {
        summary.faults.merge(&outcome.faults);
        summary.reboots[0] += outcome.reboots[0];
        summary.reboots[1] += outcome.reboots[1];
        summary.sim_ms += outcome.sim_ms;
        if let Some(hash) = rerun {
            summary.determinism_checked += 1;
            if outcome.panic.is_none() && hash != outcome.log_hash {
                summary.determinism_mismatches.push(outcome.seed);
            }
        }
        for violation in &outcome.violations {
            *summary.by_invariant.entry(violation.invariant).or_default() += 1;
        }
        if !outcome.violations.is_empty() || outcome.panic.is_some() {
            summary.failures.push(outcome);
        }
    }
    summary
}

/// The first seed of `known`'s budget whose run breaks an invariant with the bug on, and the invariants it broke
/// (none: it panicked); `None` when the bug survives its budget.
pub fn catalogued_detection(known: &super::KnownReplicationBug) -> Option<(u64, Vec<super::ReplicationInvariant>)> {
    let mut bugs = super::ReplicationBugs::default();
    bugs.add(known.name).expect("a catalogued bug has a known name");
    (0..known.budget_seeds).find_map(|seed| {
        let outcome = run_replication(ReplicationWorld::generate(seed, bugs), false);
        let broken: Vec<_> = outcome.violations.iter().map(|violation| violation.invariant).collect();
        (!broken.is_empty() || outcome.panic.is_some()).then_some((seed, broken))
    })
}
