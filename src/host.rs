//! Hosts: thin async drivers that feed inputs to a state machine and carry out its outputs in order.
//!
//! A host holds no protocol rule. It loads durable state at boot, turns network frames, timer expiries and
//! finished downloads into inputs, and executes outputs one after the other: a `Persist` is written and synced
//! before the next output runs, so a crash may land between any two outputs but never lets a reply overtake
//! the write it depends on. Everything it does is told to an [`Observer`].

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::coordinator::{Coordinator, CoordinatorConfig, CoordinatorDurable, CoordinatorTimer, RestoreRequest};
use crate::io::{Disk, RemoteStore, StateFile, Transport};
use crate::model::is_chain_file_name;
use crate::protocol::{
    DownloadRequest, DownloadResult, Message, NodeAddr, Output, PersistNote, RangeRead, StoreError, decode_frame,
    encode_frame,
};
use crate::replication::{PublisherDurable, ReplicaDurable, Version};
use crate::shard::{Shard, ShardConfig, ShardDurable, ShardTimer};

mod replication;
pub use replication::CommitFeed;

/// Deliberately broken host variants, to show that the checkers catch them. They take effect only in builds with
/// the `mutants` feature (the simulator's); production builds ignore them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostBug {
    /// Never removes the working files of ended operations: a restore chain stays on disk for good.
    KeepEndedChains,
}

/// A machine's durable state as a host keeps it: a state file, and files the state refers to instead of holding
/// what they hold (a restore chain, which never changes, written once rather than at every step).
pub trait DurableState: Serialize + DeserializeOwned + Clone + fmt::Debug {
    /// Files the state holds in full until a durable copy of each exists: name and content. The host writes them
    /// beside the state, and the state's own sync makes them durable.
    fn unstored_files(&self) -> Vec<(String, &[u8])> {
        Vec::new()
    }

    /// Called once the files [`DurableState::unstored_files`] gave are durable: later states refer to them.
    fn mark_stored(&self) {}

    /// Fills in what a state read back refers to, from the files `read` reads; an error names the file missing
    /// or damaged (no crash loses a synced file, so either is damage from outside).
    fn attach(&mut self, _read: &mut dyn FnMut(&str) -> std::io::Result<Option<Vec<u8>>>) -> Result<(), String> {
        Ok(())
    }

    /// Whether states of this kind write files beside the state file (then a host looks for ones left over at
    /// boot).
    const WRITES_FILES: bool = false;

    /// How many files beside the state file the state refers to. When a durable state refers to fewer than the
    /// one before, the host looks for files to remove ([`DurableState::is_stale_file`]).
    fn referenced_files(&self) -> usize {
        0
    }

    /// Whether `name`, a file beside the state file, is one that states of this kind write and `state` (the
    /// durable state, `None` if there is none) does not refer to: working state of an operation that has ended,
    /// which the host removes.
    fn is_stale_file(_state: Option<&Self>, _name: &str) -> bool {
        false
    }
}

impl DurableState for ShardDurable {}
impl DurableState for PublisherDurable {}
impl DurableState for ReplicaDurable {}

impl DurableState for CoordinatorDurable {
    fn unstored_files(&self) -> Vec<(String, &[u8])> {
        let unstored = self.chains().filter(|(_, chain)| !chain.is_stored());
        unstored.map(|(op, chain)| (chain.file_name(op), chain.encoded())).collect()
    }

    fn mark_stored(&self) {
        self.chains().for_each(|(_, chain)| chain.mark_stored());
    }

    fn attach(&mut self, read: &mut dyn FnMut(&str) -> std::io::Result<Option<Vec<u8>>>) -> Result<(), String> {
        self.attach_chains(|name| match read(name) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(format!("{name} is missing")),
            Err(error) => Err(format!("reading {name}: {error}")),
        })
    }

    const WRITES_FILES: bool = true;

    fn referenced_files(&self) -> usize {
        self.chains().count()
    }

    fn is_stale_file(state: Option<&Self>, name: &str) -> bool {
        is_chain_file_name(name)
            && !state.is_some_and(|state| state.chains().any(|(op, chain)| chain.file_name(op) == name))
    }
}

/// Loads the durable state of a node from `disk`: the newest intact copy of its state file, and the files that
/// state refers to. `None` when nothing was ever synced; an error says what is wrong (the node must not boot).
pub fn load_state<D: Disk, Dur: DurableState>(disk: &D) -> Result<(StateFile, Option<Dur>), String> {
    let (file, bytes) = StateFile::load(disk, STATE_FILE).map_err(|error| error.to_string())?;
    let Some(bytes) = bytes else { return Ok((file, None)) };
    let mut state = decode_frame::<Dur>(&bytes)
        .map_err(|error| format!("state file {STATE_FILE} holds an intact but undecodable state: {error}"))?;
    state
        .attach(&mut |name| disk.read(name))
        .map_err(|error| format!("state file {STATE_FILE} refers to a file that cannot be read back: {error}"))?;
    Ok((file, Some(state)))
}

/// A protocol state machine as a host sees it.
pub trait Machine {
    type Durable: DurableState;
    type Timer: Clone + fmt::Debug + 'static;
    fn handle_message(&mut self, now_ms: u64, from: NodeAddr, msg: Message) -> Vec<Output<Self::Durable, Self::Timer>>;
    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<Output<Self::Durable, Self::Timer>>;
    fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<Output<Self::Durable, Self::Timer>>;
}

impl Machine for Coordinator {
    type Durable = CoordinatorDurable;
    type Timer = CoordinatorTimer;
    fn handle_message(&mut self, now_ms: u64, from: NodeAddr, msg: Message) -> Vec<Output<Self::Durable, Self::Timer>> {
        Coordinator::handle_message(self, now_ms, from, msg)
    }
    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<Output<Self::Durable, Self::Timer>> {
        Coordinator::handle_timer(self, now_ms, timer)
    }
    fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<Output<Self::Durable, Self::Timer>> {
        Coordinator::handle_download(self, now_ms, result)
    }
}

impl Machine for Shard {
    type Durable = ShardDurable;
    type Timer = ShardTimer;
    fn handle_message(&mut self, now_ms: u64, from: NodeAddr, msg: Message) -> Vec<Output<Self::Durable, Self::Timer>> {
        Shard::handle_message(self, now_ms, from, msg)
    }
    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<Output<Self::Durable, Self::Timer>> {
        Shard::handle_timer(self, now_ms, timer)
    }
    fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<Output<Self::Durable, Self::Timer>> {
        Shard::handle_download(self, now_ms, result)
    }
}

/// Moments at which a host asks its observer whether the node crashes right there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// State was written but not yet synced.
    BeforeSync,
    /// State is durable; the outputs after it (usually the reply) have not run.
    AfterPersist,
}

/// What a host did, as told to its observer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostEvent {
    /// The node booted with this durable state (`None`: nothing was ever synced).
    CoordinatorBooted {
        generation: u64,
        loaded: Option<CoordinatorDurable>,
    },
    ShardBooted {
        loaded: Option<ShardDurable>,
    },
    /// A persist is durable (written and synced).
    Persisted(PersistNote),
    Sent {
        to: NodeAddr,
        msg: Message,
    },
    Received {
        from: NodeAddr,
        msg: Message,
    },
    /// A frame that did not decode; dropped.
    BadFrame {
        from: NodeAddr,
        error: String,
    },
    Download {
        request: DownloadRequest,
        outcome: Result<(usize, u64), StoreError>,
    },
    Report(String),
    /// The restore request given at boot was refused.
    StartRefused(String),
    /// A disk or state error the host cannot carry on after; the node stops.
    Fatal(String),
    /// Files the durable state no longer refers to (working files of ended operations) are about to be removed.
    Removing(Vec<String>),
    /// Their removal is durable.
    Removed(Vec<String>),
    /// A publisher booted with this durable state.
    PublisherBooted {
        loaded: Option<PublisherDurable>,
    },
    /// A replica booted with this durable state.
    ReplicaBooted {
        loaded: Option<ReplicaDurable>,
    },
    /// The database handed a publisher a committed version.
    Committed {
        version: Version,
    },
    /// A put was answered (or given up on).
    Put {
        object: String,
        outcome: Result<(), StoreError>,
    },
    /// A listing was answered with these names (or failed).
    Listed {
        prefix: String,
        outcome: Result<Vec<String>, StoreError>,
    },
}

/// Sees everything hosts do; decides nothing about the protocol.
pub trait Observer {
    fn record(&self, node: NodeAddr, event: HostEvent);
    /// Whether the node crashes at this point (fault injection). Real hosts never crash on purpose.
    fn crash_point(&self, _node: NodeAddr, _point: CrashPoint) -> bool {
        false
    }
}

/// The IO a host carries outputs out with.
pub struct HostIo<D, S, T, O> {
    pub disk: Rc<D>,
    pub store: Rc<S>,
    pub transport: Rc<T>,
    pub observer: Rc<O>,
    /// An instant of this process's clock, at which the machines' time is `epoch_ms`.
    pub epoch: Instant,
    /// The machines' time (`now_ms`) at `epoch`. The machines persist times (deadlines, when to retry), so their
    /// clock must not start over when a node does: the simulator keeps one epoch for the whole run and passes 0;
    /// a real host passes the wall clock (see [`wall_clock_epoch`]), so a restarted process goes on from where the
    /// persisted times expect.
    pub epoch_ms: u64,
    /// How long a ranged read may take before it counts as failed.
    pub download_timeout_ms: u64,
    /// The machines' time, read from this instead of from the process's clock when given: a simulator's own
    /// clock, which must read what `epoch` and `epoch_ms` give (it reads the same time, for less).
    pub clock: Option<Rc<dyn Fn() -> u64>>,
    /// A deliberate bug to run with (see [`HostBug`]); `None` in production.
    pub bug: Option<HostBug>,
}

impl<D, S, T, O> Clone for HostIo<D, S, T, O> {
    fn clone(&self) -> Self {
        Self {
            disk: self.disk.clone(),
            store: self.store.clone(),
            transport: self.transport.clone(),
            observer: self.observer.clone(),
            epoch: self.epoch,
            epoch_ms: self.epoch_ms,
            download_timeout_ms: self.download_timeout_ms,
            clock: self.clock.clone(),
            bug: self.bug,
        }
    }
}

/// `epoch` and `epoch_ms` for a real host: now, and the wall clock's milliseconds since 1970 now. A node that
/// restarts goes on with the time its persisted deadlines were set in (as long as the wall clock is not set back).
pub fn wall_clock_epoch() -> (Instant, u64) {
    let since_1970 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (Instant::now(), u64::try_from(since_1970.as_millis()).unwrap_or(u64::MAX))
}

/// The instant machine time `at_ms` falls on, given that `epoch` is machine time `epoch_ms`: at once for a time
/// already past, `None` for one beyond what this platform's clock can hold.
fn timer_deadline(epoch: Instant, epoch_ms: u64, at_ms: u64) -> Option<Instant> {
    epoch.checked_add(Duration::from_millis(at_ms.saturating_sub(epoch_ms)))
}

/// Name of the durable state file of every node.
pub const STATE_FILE: &str = "node.state";

/// The next frame off the transport, as one future that owns its handle on the transport.
async fn next_frame<T: Transport>(transport: Rc<T>) -> std::io::Result<(NodeAddr, Vec<u8>)> {
    transport.recv().await
}

/// One ranged read, given up as failed once `timeout_ms` has passed.
async fn download<S: RemoteStore>(
    store: Rc<S>,
    request: DownloadRequest,
    timeout_ms: u64,
) -> (DownloadRequest, Result<RangeRead, StoreError>) {
    let read = store.get_range(&request.object, request.offset, request.len);
    let outcome = within(Duration::from_millis(timeout_ms), read).await;
    (request, outcome.unwrap_or(Err(StoreError::Timeout { timeout_ms })))
}

/// What the loop does after an output.
enum Step {
    Next,
    Download(DownloadRequest),
    /// The node crashed on purpose or cannot go on.
    Stop,
}

enum Input<T> {
    Message(NodeAddr, Message),
    Timer(T),
    Download(DownloadResult),
}

impl<D: Disk + 'static, S: RemoteStore + 'static, T: Transport + 'static, O: Observer + 'static> HostIo<D, S, T, O> {
    fn now_ms(&self) -> u64 {
        if let Some(clock) = &self.clock {
            return clock();
        }
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.epoch_ms.saturating_add(elapsed)
    }

    /// Loads the node's durable state, and removes what ended operations left beside it (a crash can strike
    /// between a state's sync and the removals that follow it).
    async fn load<Dur: DurableState>(&self, node: NodeAddr) -> Option<(Durability, Option<Dur>)> {
        let (file, loaded) = match load_state(&*self.disk) {
            Ok(loaded) => loaded,
            Err(error) => {
                self.observer.record(node, HostEvent::Fatal(error));
                return None;
            }
        };
        if Dur::WRITES_FILES && !self.remove_stale_files(node, loaded.as_ref()).await {
            return None;
        }
        let referenced_files = loaded.as_ref().map_or(0, Dur::referenced_files);
        Some((Durability { file, referenced_files }, loaded))
    }

    /// Removes the files `state` (durable) no longer refers to, and makes the removal durable; false after a disk
    /// error (recorded as fatal).
    async fn remove_stale_files<Dur: DurableState>(&self, node: NodeAddr, state: Option<&Dur>) -> bool {
        if cfg!(feature = "mutants") && self.bug == Some(HostBug::KeepEndedChains) {
            return true;
        }
        let fatal = |what: String| {
            self.observer.record(node, HostEvent::Fatal(what));
            false
        };
        let stale: Vec<String> = match self.disk.list() {
            Ok(names) => names.into_iter().filter(|name| Dur::is_stale_file(state, name)).collect(),
            Err(error) => return fatal(format!("listing files: {error}")),
        };
        if stale.is_empty() {
            return true;
        }
        self.observer.record(node, HostEvent::Removing(stale.clone()));
        for name in &stale {
            if let Err(error) = self.disk.remove(name).await {
                return fatal(format!("removing {name}: {error}"));
            }
        }
        if let Err(error) = self.disk.sync().await {
            return fatal(format!("syncing the removal of {}: {error}", stale.join(", ")));
        }
        self.observer.record(node, HostEvent::Removed(stale));
        true
    }

    /// Boots and runs the coordinator until the node is killed. `request` is started at boot (idempotently).
    pub async fn run_coordinator(self, config: CoordinatorConfig, seed: u64, request: Option<RestoreRequest>) {
        let node = NodeAddr::Coordinator;
        let Some((file, loaded)) = self.load::<CoordinatorDurable>(node).await else { return };
        let (mut machine, mut outputs) = Coordinator::boot(config, loaded.clone(), seed, self.now_ms());
        let generation = machine.generation();
        self.observer.record(node, HostEvent::CoordinatorBooted { generation, loaded });
        if let Some(request) = request {
            match machine.start(self.now_ms(), request) {
                Ok(more) => outputs.extend(more),
                Err(error) => self.observer.record(node, HostEvent::StartRefused(error.to_string())),
            }
        }
        self.run(node, machine, file, outputs).await;
    }

    /// Boots and runs a shard until the node is killed.
    pub async fn run_shard(self, shard: crate::model::TabletId, config: ShardConfig) {
        let node = NodeAddr::Shard(shard);
        let Some((file, loaded)) = self.load::<ShardDurable>(node).await else { return };
        self.observer.record(node, HostEvent::ShardBooted { loaded: loaded.clone() });
        let machine = Shard::boot(shard, config, loaded);
        self.run(node, machine, file, Vec::new()).await;
    }

    async fn run<M: Machine>(
        self,
        node: NodeAddr,
        mut machine: M,
        mut durable: Durability,
        first: Vec<Output<M::Durable, M::Timer>>,
    ) {
        // Timers wait in a queue of this loop, behind one sleep for the earliest. Frames are read by one receive
        // kept alive across iterations (a receive is not cancel-safe: dropping it could lose a frame already taken
        // off the wire), and downloads run inside this loop rather than as tasks of their own.
        let mut timers = Timers::new();
        let mut receive = Woken::new(Box::pin(next_frame(self.transport.clone())));
        let mut downloads = Vec::new();
        let mut outputs = first;
        loop {
            for output in outputs {
                match self.execute(node, &mut durable, output, &mut timers).await {
                    Step::Next => {}
                    Step::Download(request) => {
                        let read = download(self.store.clone(), request, self.download_timeout_ms);
                        downloads.push(Woken::new(Box::pin(read)));
                    }
                    Step::Stop => {
                        // Crashed on purpose or hit a fatal disk error: do nothing more until the node is restarted.
                        std::future::pending::<()>().await;
                    }
                }
            }
            let input = tokio::select! {
                biased;
                frame = std::future::poll_fn(|cx| Pin::new(&mut receive).poll(cx)) => {
                    receive.replace(next_frame(self.transport.clone()));
                    let Ok((from, frame)) = frame else { return };
                    match decode_frame::<Message>(&frame) {
                        Ok(msg) => Input::Message(from, msg),
                        Err(error) => {
                            self.observer.record(node, HostEvent::BadFrame { from, error: error.to_string() });
                            outputs = Vec::new();
                            continue;
                        }
                    }
                }
                timer = std::future::poll_fn(|cx| timers.poll_expired(cx)) => Input::Timer(timer),
                (request, outcome) = std::future::poll_fn(|cx| first_ready(&mut downloads, cx)), if !downloads.is_empty() => {
                    Input::Download(self.read_done(node, request, outcome))
                }
            };
            let now_ms = self.now_ms();
            outputs = match input {
                Input::Message(from, msg) => {
                    self.observer.record(node, HostEvent::Received { from, msg: msg.clone() });
                    machine.handle_message(now_ms, from, msg)
                }
                Input::Timer(timer) => machine.handle_timer(now_ms, timer),
                Input::Download(result) => machine.handle_download(now_ms, result),
            };
        }
    }

    /// Tells the observer that a ranged read came back, and gives the machine's input for it.
    fn read_done(
        &self,
        node: NodeAddr,
        request: DownloadRequest,
        outcome: Result<RangeRead, StoreError>,
    ) -> DownloadResult {
        let summary = outcome.as_ref().map(|r| (r.bytes.len(), r.total_len)).map_err(Clone::clone);
        let result = DownloadResult {
            download_id: request.download_id,
            object: request.object.clone(),
            offset: request.offset,
            outcome,
        };
        self.observer.record(node, HostEvent::Download { request, outcome: summary });
        result
    }

    /// Carries out one output, except a download, which it hands back for the loop to run.
    async fn execute<Dur: DurableState, Tm: Clone + 'static>(
        &self,
        node: NodeAddr,
        durable: &mut Durability,
        output: Output<Dur, Tm>,
        timers: &mut Timers<Tm>,
    ) -> Step {
        match output {
            Output::Persist { state, note } => {
                if !self.persist(node, durable, &state, note).await {
                    return Step::Stop;
                }
            }
            Output::Send { to, msg } => {
                let frame = encode_frame(&msg);
                self.observer.record(node, HostEvent::Sent { to, msg });
                self.transport.send(to, frame).await;
            }
            Output::SetTimer { at_ms, timer } => {
                // A time past what the clock can hold never comes: no timer.
                if let Some(deadline) = timer_deadline(self.epoch, self.epoch_ms, at_ms) {
                    timers.set(deadline, timer);
                }
            }
            Output::Download(request) => return Step::Download(request),
            Output::Report(text) => self.observer.record(node, HostEvent::Report(text)),
        }
        Step::Next
    }

    async fn persist<Dur: DurableState>(
        &self,
        node: NodeAddr,
        durable: &mut Durability,
        state: &Dur,
        note: PersistNote,
    ) -> bool {
        let file = &mut durable.file;
        // Files the state holds in full this once, written beside it and made durable by its sync.
        for (name, bytes) in state.unstored_files() {
            if let Err(error) = self.disk.write(&name, bytes).await {
                self.observer.record(node, HostEvent::Fatal(format!("writing {name}: {error}")));
                return false;
            }
        }
        let written = file.write_state(&*self.disk, state).await;
        if let Err(error) = written {
            self.observer.record(node, HostEvent::Fatal(format!("writing state: {error}")));
            return false;
        }
        if self.observer.crash_point(node, CrashPoint::BeforeSync) {
            return false;
        }
        if let Err(error) = file.sync(&*self.disk).await {
            self.observer.record(node, HostEvent::Fatal(format!("syncing state: {error}")));
            return false;
        }
        state.mark_stored();
        self.observer.record(node, HostEvent::Persisted(note));
        if self.observer.crash_point(node, CrashPoint::AfterPersist) {
            return false;
        }
        // Working files of operations that ended with this state go once it is durable, not before: a crash
        // until then boots from the state before, which still refers to them. A crash from here on leaves them
        // for the next boot to remove.
        let referenced_files = state.referenced_files();
        if referenced_files < durable.referenced_files && !self.remove_stale_files(node, Some(state)).await {
            return false;
        }
        durable.referenced_files = referenced_files;
        true
    }
}

/// What a host keeps of its node's durable state between persists.
struct Durability {
    file: StateFile,
    /// Files beside the state file that the last durable state refers to.
    referenced_files: usize,
}

/// `future`'s output, or `None` once `timeout` has passed first.
///
/// Unlike `tokio::time::timeout` it polls its timer once and afterwards only asks whether it has elapsed: under
/// madsim every poll of a pending `Sleep` registers another timer, and a download is woken several times.
fn within<F: Future>(timeout: Duration, future: F) -> Within<F> {
    Within { future: Box::pin(future), sleep: Box::pin(tokio::time::sleep(timeout)), armed: false }
}

struct Within<F> {
    future: Pin<Box<F>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The timer is registered with this task's waker.
    armed: bool,
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if self.armed {
            return if self.sleep.is_elapsed() { Poll::Ready(None) } else { Poll::Pending };
        }
        self.armed = true;
        self.sleep.as_mut().poll(cx).map(|()| None)
    }
}

/// `future`, polled only on its first poll and after its own waker was woken.
///
/// A host's loop waits on several things at once (the frame receive, each download, the timer queue), and its
/// task wakes for any of them. Re-polling a part that has not moved costs a poll for nothing and, under madsim,
/// may register one more timer (every poll of a pending `Sleep` does), which later wakes the task again. The
/// frame receive and each download are wrapped in one of these, so each is polled only when what it waits for
/// has moved; the timer queue polls its sleep once per deadline.
struct Woken<F> {
    future: F,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

/// Whether a [`Woken`] future's waker was woken since it was last polled, and the task to wake.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Woken<F> {
    fn new(future: F) -> Self {
        let flag = Arc::new(WakeFlag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        let waker = Waker::from(flag.clone());
        Self { future, flag, waker }
    }
}

impl<F: Future> Woken<Pin<Box<F>>> {
    /// Waits on `future` instead, in the same allocation; its first poll comes with the next poll of this.
    fn replace(&mut self, future: F) {
        self.future.set(future);
        self.flag.woken.store(true, Ordering::Release);
    }
}

impl<F> Drop for Woken<F> {
    /// A waker the future handed out (a download's timeout timer, say) wakes nobody once it is gone.
    fn drop(&mut self) {
        self.flag.task.take();
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&this.waker))
    }
}

/// The output of the first of `futures` that is ready, which leaves the list; the others stay.
///
/// Unlike `FuturesUnordered`, which wakes its task again after polling every future it holds (to yield to other
/// tasks), this wakes nobody: under madsim that extra wake-up was a second poll of the whole loop for nearly
/// every step of every download.
fn first_ready<F: Future + Unpin>(futures: &mut Vec<Woken<F>>, cx: &mut Context<'_>) -> Poll<F::Output> {
    for at in 0..futures.len() {
        if let Poll::Ready(output) = Pin::new(&mut futures[at]).poll(cx) {
            futures.remove(at);
            return Poll::Ready(output);
        }
    }
    Poll::Pending
}

/// A host's pending timers, fired in deadline order (in the order they were set, for equal deadlines).
///
/// One sleep stands for the earliest deadline and is registered with the runtime once per deadline, so a timer
/// costs no task of its own (under madsim every poll of a pending `Sleep` would register another timer).
struct Timers<T> {
    /// By deadline, then by the order they were set.
    queue: BTreeMap<(Instant, u64), T>,
    /// Timers set so far.
    set: u64,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The deadline `sleep` is registered for, with this task's waker.
    armed: Option<Instant>,
}

impl<T> Timers<T> {
    fn new() -> Self {
        Self { queue: BTreeMap::new(), set: 0, sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: None }
    }

    /// Fires `timer` at `deadline`, or a millisecond from now if that is later, as a sleep until it would.
    fn set(&mut self, deadline: Instant, timer: T) {
        let deadline = deadline.max(Instant::now() + Duration::from_millis(1));
        self.set += 1;
        self.queue.insert((deadline, self.set), timer);
    }

    /// The earliest timer whose deadline has passed; otherwise has the task woken at the earliest deadline.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        let Some(entry) = self.queue.first_entry() else { return Poll::Pending };
        let deadline = entry.key().0;
        // Registered for this very deadline and not gone off yet: nothing is due (asking the sleep is cheaper than
        // reading the clock, and the loop asks at every poll).
        if self.armed == Some(deadline) && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        if Instant::now() >= deadline {
            self.armed = None;
            return Poll::Ready(entry.remove());
        }
        if self.armed != Some(deadline) {
            self.armed = Some(deadline);
            self.sleep.as_mut().reset(deadline);
            if self.sleep.as_mut().poll(cx).is_ready() {
                // Not reached: the deadline is later than now. Should it be, fire at once.
                self.armed = None;
                return Poll::Ready(self.queue.pop_first().expect("the queue has an earliest timer").1);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn machine_times_map_onto_the_clock_from_the_epoch_and_the_unreachable_never_fires() {
        let epoch = Instant::now();
        let day_ms = 86_400_000;
        // A real host restarted a day into the machines' time: a deadline persisted an hour ahead is an hour away.
        assert_eq!(timer_deadline(epoch, day_ms, day_ms + 3_600_000), Some(epoch + Duration::from_secs(3_600)));
        assert_eq!(timer_deadline(epoch, day_ms, day_ms - 5), Some(epoch), "a time already past fires at once");
        // A deadline of u64::MAX ms is no timer, or one half a billion years away: it does not panic either way.
        let far = timer_deadline(epoch, 0, u64::MAX);
        assert!(far.is_none_or(|at| at > epoch + Duration::from_secs(1 << 40)), "{far:?}");
        let (_, wall_ms) = wall_clock_epoch();
        assert!(wall_ms > 1_700_000_000_000, "milliseconds since 1970: {wall_ms}");
    }

    use super::*;
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::AtomicUsize;

    /// Pending until opened; counts its polls and keeps the last waker it was given.
    #[derive(Default)]
    struct Probe {
        open: Cell<bool>,
        polls: Cell<u32>,
        waker: RefCell<Option<Waker>>,
    }

    struct ProbeFuture(Rc<Probe>, u32);

    impl Future for ProbeFuture {
        type Output = u32;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            self.0.polls.set(self.0.polls.get() + 1);
            if self.0.open.get() {
                return Poll::Ready(self.1);
            }
            *self.0.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Counts the wake-ups of the task.
    struct TaskWakes(AtomicUsize);

    impl Wake for TaskWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn only_woken_downloads_are_polled_and_a_finished_one_wakes_nobody() {
        let task = Arc::new(TaskWakes(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let (a, b) = (Rc::new(Probe::default()), Rc::new(Probe::default()));
        let mut futures = vec![Woken::new(ProbeFuture(a.clone(), 1)), Woken::new(ProbeFuture(b.clone(), 2))];

        assert!(first_ready(&mut futures, &mut cx).is_pending());
        assert_eq!((a.polls.get(), b.polls.get()), (1, 1), "a first poll reaches every future");
        assert!(first_ready(&mut futures, &mut cx).is_pending());
        assert_eq!((a.polls.get(), b.polls.get()), (1, 1), "nothing was woken, nothing is polled");
        assert_eq!(task.0.load(Ordering::Relaxed), 0, "polling pending futures wakes nobody");

        b.open.set(true);
        b.waker.borrow_mut().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "a future's wake-up wakes the task");
        assert_eq!(first_ready(&mut futures, &mut cx), Poll::Ready(2));
        assert_eq!((a.polls.get(), b.polls.get()), (1, 2), "only the woken future was polled");
        assert_eq!(futures.len(), 1, "the ready future left the list");

        let stale = a.waker.borrow_mut().take().unwrap();
        futures.clear();
        stale.wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "a dropped future's waker wakes nobody");
    }
}
