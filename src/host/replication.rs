//! Hosts of the replication roles ([`crate::replication`]): the same thin drivers as the coordinator's and the
//! shards', with the store calls (put, list, ranged read) as their inputs instead of network frames, and for the
//! publisher the database's commits.
//!
//! A store call that does not come back within the host's `download_timeout_ms` is answered with
//! [`StoreError::Timeout`]: the machines rely on every call being answered.

use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use super::{Durability, HostEvent, HostIo, Observer, Timers, Woken, first_ready, timer_deadline, within};
use crate::io::{Disk, RemoteStore, Transport};
use crate::model::{Change, TabletId};
use crate::protocol::{DownloadRequest, DownloadResult, NodeAddr, PersistNote, RangeRead, StoreError};
use crate::replication::{
    Publisher, PublisherConfig, PublisherDurable, PublisherOutput, Replica, ReplicaConfig, ReplicaDurable,
    ReplicaOutput, ReplicationOutput, Version,
};

/// The committed versions of a replicated tablet, as its database hands them to the publisher's host.
pub trait CommitFeed {
    /// Version `after + 1` and its changes (for version 1, the tablet's rows as upserts), once it is committed:
    /// waits until then. `None` when no version will ever follow `after`.
    fn next(&self, after: Version) -> impl Future<Output = Option<(Version, Vec<Change>)>>;
}

/// A replication role as its host sees it: what it takes besides timers.
trait Role {
    type Durable: super::DurableState;
    type Timer: Clone + 'static;

    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<ReplicationOutput<Self::Durable, Self::Timer>>;

    fn handle_commit(
        &mut self,
        _now_ms: u64,
        _version: Version,
        _changes: &[Change],
    ) -> Vec<ReplicationOutput<Self::Durable, Self::Timer>> {
        Vec::new()
    }

    fn handle_put(
        &mut self,
        _now_ms: u64,
        _put_id: u64,
        _result: Result<(), StoreError>,
    ) -> Vec<ReplicationOutput<Self::Durable, Self::Timer>> {
        Vec::new()
    }

    fn handle_list(
        &mut self,
        _now_ms: u64,
        _list_id: u64,
        _result: Result<Vec<String>, StoreError>,
    ) -> Vec<ReplicationOutput<Self::Durable, Self::Timer>> {
        Vec::new()
    }

    fn handle_download(
        &mut self,
        _now_ms: u64,
        _result: DownloadResult,
    ) -> Vec<ReplicationOutput<Self::Durable, Self::Timer>> {
        Vec::new()
    }

    /// What observers are told of a durable state once it is synced.
    fn note(state: &Self::Durable) -> PersistNote;
}

impl Role for Publisher {
    type Durable = PublisherDurable;
    type Timer = crate::replication::PublisherTimer;

    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<PublisherOutput> {
        Publisher::handle_timer(self, now_ms, timer)
    }

    fn handle_commit(&mut self, now_ms: u64, version: Version, changes: &[Change]) -> Vec<PublisherOutput> {
        Publisher::handle_commit(self, now_ms, version, changes)
    }

    fn handle_put(&mut self, now_ms: u64, put_id: u64, result: Result<(), StoreError>) -> Vec<PublisherOutput> {
        Publisher::handle_put(self, now_ms, put_id, result)
    }

    fn note(state: &PublisherDurable) -> PersistNote {
        PersistNote::Published { pushed_through: state.pushed_through }
    }
}

impl Role for Replica {
    type Durable = ReplicaDurable;
    type Timer = crate::replication::ReplicaTimer;

    fn handle_timer(&mut self, now_ms: u64, timer: Self::Timer) -> Vec<ReplicaOutput> {
        Replica::handle_timer(self, now_ms, timer)
    }

    fn handle_list(
        &mut self,
        now_ms: u64,
        list_id: u64,
        result: Result<Vec<String>, StoreError>,
    ) -> Vec<ReplicaOutput> {
        Replica::handle_list(self, now_ms, list_id, result)
    }

    fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<ReplicaOutput> {
        Replica::handle_download(self, now_ms, result)
    }

    fn note(state: &ReplicaDurable) -> PersistNote {
        PersistNote::Replicated { applied_through: state.applied_through, rows: state.rows.clone() }
    }
}

/// A store call that came back (or was given up on).
enum Answer {
    Put { put_id: u64, object: String, outcome: Result<(), StoreError> },
    List { list_id: u64, prefix: String, outcome: Result<Vec<String>, StoreError> },
    Read { request: DownloadRequest, outcome: Result<RangeRead, StoreError> },
}

type Call = Pin<Box<dyn Future<Output = Answer>>>;
type NextCommit = Pin<Box<dyn Future<Output = Option<(Version, Vec<Change>)>>>>;

/// A feed for a role that takes no commits.
struct NoCommits;

impl CommitFeed for NoCommits {
    async fn next(&self, _after: Version) -> Option<(Version, Vec<Change>)> {
        None
    }
}

enum Input<T> {
    Answer(Answer),
    Timer(T),
    Commit(Option<(Version, Vec<Change>)>),
}

impl<D: Disk + 'static, S: RemoteStore + 'static, T: Transport + 'static, O: Observer + 'static> HostIo<D, S, T, O> {
    /// Boots and runs the publisher of `tablet` to `stream` until the node is killed; `feed` hands it the
    /// committed versions from the first one its durable state says is not pushed.
    pub async fn run_publisher<F: CommitFeed + 'static>(
        self,
        stream: String,
        tablet: TabletId,
        config: PublisherConfig,
        seed: u64,
        feed: Rc<F>,
    ) {
        let node = NodeAddr::Publisher;
        let Some((file, loaded)) = self.load::<PublisherDurable>(node).await else { return };
        self.observer.record(node, HostEvent::PublisherBooted { loaded: loaded.clone() });
        let machine = Publisher::boot(stream, tablet, config, loaded, seed);
        let after = machine.committed_through();
        self.run_role(node, machine, file, Vec::new(), Some((feed, after))).await;
    }

    /// Boots and runs the replica of `stream` for `tablet` until the node is killed.
    pub async fn run_replica(self, stream: String, tablet: TabletId, config: ReplicaConfig) {
        let node = NodeAddr::Replica;
        let Some((file, loaded)) = self.load::<ReplicaDurable>(node).await else { return };
        self.observer.record(node, HostEvent::ReplicaBooted { loaded: loaded.clone() });
        let mut machine = Replica::boot(stream, tablet, config, loaded);
        let first = machine.start(self.now_ms());
        self.run_role::<_, NoCommits>(node, machine, file, first, None).await;
    }

    async fn run_role<M: Role, F: CommitFeed + 'static>(
        self,
        node: NodeAddr,
        mut machine: M,
        mut durable: Durability,
        first: Vec<ReplicationOutput<M::Durable, M::Timer>>,
        feed: Option<(Rc<F>, Version)>,
    ) {
        let mut timers = Timers::new();
        let mut calls: Vec<Woken<Call>> = Vec::new();
        let next_commit =
            |feed: Rc<F>, after: Version| -> NextCommit { Box::pin(async move { feed.next(after).await }) };
        // The newest version the feed has handed over.
        let mut committed = feed.as_ref().map_or(0, |(_, after)| *after);
        let mut feed = feed.map(|(feed, after)| (feed.clone(), Woken::new(next_commit(feed, after))));
        let mut outputs = first;
        loop {
            for output in outputs {
                match output {
                    ReplicationOutput::Persist(state) => {
                        let note = M::note(&state);
                        if !self.persist(node, &mut durable, &state, note).await {
                            // Crashed on purpose or hit a fatal disk error: nothing more until a restart.
                            std::future::pending::<()>().await;
                        }
                    }
                    ReplicationOutput::Put { put_id, object, bytes } => {
                        calls.push(Woken::new(self.put(put_id, object, bytes)))
                    }
                    ReplicationOutput::List { list_id, prefix } => calls.push(Woken::new(self.list(list_id, prefix))),
                    ReplicationOutput::Download(request) => calls.push(Woken::new(self.read(request))),
                    ReplicationOutput::SetTimer { at_ms, timer } => {
                        if let Some(deadline) = timer_deadline(self.epoch, self.epoch_ms, at_ms) {
                            timers.set(deadline, timer);
                        }
                    }
                    ReplicationOutput::Report(text) => self.observer.record(node, HostEvent::Report(text)),
                }
            }
            let input = tokio::select! {
                biased;
                answer = std::future::poll_fn(|cx| first_ready(&mut calls, cx)), if !calls.is_empty() => Input::Answer(answer),
                timer = std::future::poll_fn(|cx| timers.poll_expired(cx)) => Input::Timer(timer),
                commit = std::future::poll_fn(|cx| Pin::new(&mut feed.as_mut().expect("checked").1).poll(cx)), if feed.is_some() => {
                    Input::Commit(commit)
                }
            };
            let now_ms = self.now_ms();
            outputs = match input {
                Input::Timer(timer) => machine.handle_timer(now_ms, timer),
                Input::Commit(None) => {
                    feed = None;
                    Vec::new()
                }
                Input::Commit(Some((version, _))) if Some(version) != committed.checked_add(1) => {
                    // The feed broke its word: a machine must not be handed a version out of order.
                    let what = format!("the commit feed handed over version {version} after version {committed}");
                    self.observer.record(node, HostEvent::Fatal(what));
                    std::future::pending::<()>().await;
                    unreachable!("a pending future never completes")
                }
                Input::Commit(Some((version, changes))) => {
                    committed = version;
                    self.observer.record(node, HostEvent::Committed { version });
                    if let Some((source, next)) = &mut feed {
                        *next = Woken::new(next_commit(source.clone(), version));
                    }
                    machine.handle_commit(now_ms, version, &changes)
                }
                Input::Answer(Answer::Put { put_id, object, outcome }) => {
                    self.observer.record(node, HostEvent::Put { object, outcome: outcome.clone() });
                    machine.handle_put(now_ms, put_id, outcome)
                }
                Input::Answer(Answer::List { list_id, prefix, outcome }) => {
                    self.observer.record(node, HostEvent::Listed { prefix, outcome: outcome.clone() });
                    machine.handle_list(now_ms, list_id, outcome)
                }
                Input::Answer(Answer::Read { request, outcome }) => {
                    machine.handle_download(now_ms, self.read_done(node, request, outcome))
                }
            };
        }
    }

    fn timeout(&self) -> (Duration, StoreError) {
        let timeout_ms = self.download_timeout_ms;
        (Duration::from_millis(timeout_ms), StoreError::Timeout { timeout_ms })
    }

    fn put(&self, put_id: u64, object: String, bytes: bytes::Bytes) -> Call {
        let store = self.store.clone();
        let (timeout, timed_out) = self.timeout();
        Box::pin(async move {
            let outcome = within(timeout, store.put(&object, bytes.to_vec())).await.unwrap_or(Err(timed_out));
            Answer::Put { put_id, object, outcome }
        })
    }

    fn list(&self, list_id: u64, prefix: String) -> Call {
        let store = self.store.clone();
        let (timeout, timed_out) = self.timeout();
        Box::pin(async move {
            let outcome = within(timeout, store.list(&prefix)).await.unwrap_or(Err(timed_out));
            Answer::List { list_id, prefix, outcome }
        })
    }

    fn read(&self, request: DownloadRequest) -> Call {
        let store = self.store.clone();
        let (timeout, timed_out) = self.timeout();
        Box::pin(async move {
            let read = store.get_range(&request.object, request.offset, request.len);
            let outcome = within(timeout, read).await.unwrap_or(Err(timed_out));
            Answer::Read { request, outcome }
        })
    }
}
