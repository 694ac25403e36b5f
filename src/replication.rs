//! Replication through the store: a publisher pushes one bundle per committed version of a tablet to the remote
//! store, in version order; a replica initializes from every bundle of the stream in order, then pulls new
//! versions as they appear, never skipping one.
//!
//! Both roles are pure state machines, like the coordinator and the shard: inputs come in through `handle_*`
//! methods with the time as an argument, outputs go out as [`ReplicationOutput`]s, carried out in order by a
//! host. A host answers every `Put`, `List` and `Download` it carries out, with an error if the store does not
//! answer in time, and finishes a `Persist` (write and sync) before the next output.
//!
//! A stream's objects are named `replication/<stream>/v<version in 20 digits>.bundle`, so a listing in name order
//! is in version order. Each holds one bundle ([`crate::bundle`]) whose backup id is the version: version 1 is a
//! full bundle (the tablet's rows at its first commit), every later version an incremental bundle of that
//! commit's changes.
//!
//! Rules they keep:
//! - push order: the publisher puts version v+1 only once the store has acknowledged version v, so the store
//!   holds versions `1..=k` for some k, and never a version without every earlier one;
//! - durable push progress: after each acknowledgement the publisher persists "pushed through v"; after a reboot
//!   its host hands it the commits again and it pushes from there (a put of the same bytes under the same name is
//!   idempotent);
//! - a failed put is retried with capped exponential backoff and seeded jitter, forever: the publisher has no
//!   one to fail to, and a commit must not be left out of the stream;
//! - in-order apply: the replica applies version v+1 only onto rows that durably hold version v, rows and the
//!   "applied through" marker in one write;
//! - nothing unverified is applied: a bundle's checksum, version, tablet and kind are checked first; a damaged
//!   download is read again;
//! - never skip: a listing that shows later versions but not the next one is a gap; the replica reports it and
//!   lists again later, and applies nothing past it.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::coordinator::backoff_ms;
use crate::model::{BackupKind, Change, SortedRows, TabletId};
use crate::protocol::{DownloadRequest, DownloadResult, StoreError};
use crate::rng::SplitMix64;

/// A committed version of a replicated tablet; the first is 1.
pub type Version = u64;

/// The object-name prefix under which every replication stream lives.
pub const STREAM_ROOT: &str = "replication/";

/// The prefix of every object of `stream`: what a replica lists.
pub fn stream_prefix(stream: &str) -> String {
    format!("{STREAM_ROOT}{stream}/")
}

/// The object that holds `version` of `stream`.
pub fn version_object(stream: &str, version: Version) -> String {
    format!("{STREAM_ROOT}{stream}/v{version:020}.bundle")
}

/// The version an object of `stream` holds, if `object` is named as [`version_object`] names one; anything else
/// under the prefix (or elsewhere) is `None`.
pub fn version_of(stream: &str, object: &str) -> Option<Version> {
    let digits = object.strip_prefix(STREAM_ROOT)?.strip_prefix(stream)?.strip_prefix("/v")?.strip_suffix(".bundle")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|version| *version >= 1)
}

/// The kind of bundle a version is stored as.
pub fn kind_of(version: Version) -> BackupKind {
    if version == 1 { BackupKind::Full } else { BackupKind::Incremental }
}

/// An effect a replication machine asks its host to carry out, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplicationOutput<D, T> {
    /// Write and sync the machine's durable state; done before the next output.
    Persist(D),
    /// Put `bytes` under `object`; the host answers with `handle_put(put_id, ..)`.
    Put {
        put_id: u64,
        object: String,
        bytes: bytes::Bytes,
    },
    /// List the objects under `prefix`; the host answers with `handle_list(list_id, ..)`.
    List {
        list_id: u64,
        prefix: String,
    },
    /// Read a byte range; the host answers with `handle_download(..)`.
    Download(DownloadRequest),
    SetTimer {
        at_ms: u64,
        timer: T,
    },
    /// Something worth telling an operator about.
    Report(String),
}

// ---------------------------------------------------------------------------------------------------------------
// The publisher (push)
// ---------------------------------------------------------------------------------------------------------------

/// Tunables of a publisher.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PublisherConfig {
    /// Wait after the first failed put of a version; doubled with every further failure, up to the cap.
    pub put_retry_base_ms: u64,
    /// Longest wait between two puts of one version.
    pub put_retry_cap_ms: u64,
    /// A deliberately broken behaviour, for showing that the checkers catch it. `None` in production.
    pub bug: Option<PublisherBug>,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self { put_retry_base_ms: 100, put_retry_cap_ms: 5_000, bug: None }
    }
}

/// Known-wrong publisher behaviours, compiled in only with the `mutants` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PublisherBug {
    /// Puts every committed version as soon as it is committed, without waiting for the store to acknowledge
    /// the one before: a later version can land first, and a reader can see it without the earlier one.
    PutsAhead,
}

fn publisher_has(config: &PublisherConfig, bug: PublisherBug) -> bool {
    cfg!(feature = "mutants") && config.bug == Some(bug)
}

/// What a publisher keeps on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublisherDurable {
    /// The store has acknowledged every version up to this one (0: none yet).
    pub pushed_through: Version,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PublisherTimer {
    /// Put the version of put `put_id` again.
    RetryPut { put_id: u64 },
}

pub type PublisherOutput = ReplicationOutput<PublisherDurable, PublisherTimer>;

/// The put under way: of the oldest version not yet acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PutInFlight {
    put_id: u64,
    version: Version,
    /// Failed puts of this version so far.
    failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Publisher {
    stream: String,
    tablet: TabletId,
    config: PublisherConfig,
    durable: PublisherDurable,
    /// Committed versions not yet acknowledged, oldest first, each with its encoded bundle; volatile (after a
    /// reboot the host hands the commits over again).
    pending: VecDeque<(Version, bytes::Bytes)>,
    /// The newest version handed over; every version up to it is pushed or pending.
    committed_through: Version,
    /// `None` while waiting for a retry, or with nothing pending.
    in_flight: Option<PutInFlight>,
    /// Failures of the version waiting for a retry (kept while no put is in flight).
    waiting_failures: u32,
    next_put_id: u64,
    rng: SplitMix64,
}

impl Publisher {
    /// A publisher of `tablet`'s versions to `stream`, with its durable state as loaded (`None`: a first boot).
    /// `seed` seeds its retry jitter.
    pub fn boot(
        stream: impl Into<String>,
        tablet: TabletId,
        config: PublisherConfig,
        loaded: Option<PublisherDurable>,
        seed: u64,
    ) -> Self {
        let durable = loaded.unwrap_or_default();
        let committed_through = durable.pushed_through;
        Self {
            stream: stream.into(),
            tablet,
            config,
            durable,
            pending: VecDeque::new(),
            committed_through,
            in_flight: None,
            waiting_failures: 0,
            next_put_id: 0,
            rng: SplitMix64::new(seed ^ committed_through.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    pub fn durable(&self) -> &PublisherDurable {
        &self.durable
    }

    /// The newest version handed over by [`Publisher::handle_commit`] (or pushed before this boot).
    pub fn committed_through(&self) -> Version {
        self.committed_through
    }

    /// Version `version` of the tablet is committed with `changes` (for version 1, the tablet's rows as upserts).
    /// Commits come in version order; after a reboot the host hands them over again from any version up to
    /// the first not pushed, and those already pushed are ignored.
    pub fn handle_commit(&mut self, _now_ms: u64, version: Version, changes: &[Change]) -> Vec<PublisherOutput> {
        if version <= self.committed_through {
            return Vec::new();
        }
        assert_eq!(version, self.committed_through + 1, "commits are handed over in version order, none left out");
        let bundle =
            Bundle { backup_id: version, tablet: self.tablet, kind: kind_of(version), changes: changes.to_vec() };
        let bytes = bytes::Bytes::from(bundle.encode());
        self.committed_through = version;
        if publisher_has(&self.config, PublisherBug::PutsAhead) {
            self.pending.push_back((version, bytes.clone()));
            return vec![ReplicationOutput::Put {
                put_id: version,
                object: version_object(&self.stream, version),
                bytes,
            }];
        }
        self.pending.push_back((version, bytes));
        if self.in_flight.is_none() && self.pending.len() == 1 { self.put_oldest(0) } else { Vec::new() }
    }

    /// The store answered put `put_id`.
    pub fn handle_put(&mut self, now_ms: u64, put_id: u64, result: Result<(), StoreError>) -> Vec<PublisherOutput> {
        if publisher_has(&self.config, PublisherBug::PutsAhead) {
            return self.on_put_ahead(now_ms, put_id, result);
        }
        let Some(in_flight) = &self.in_flight else { return Vec::new() };
        if in_flight.put_id != put_id {
            return Vec::new();
        }
        let in_flight = self.in_flight.take().expect("checked above");
        match result {
            Ok(()) => {
                let (version, _) = self.pending.pop_front().expect("a put in flight is of the oldest pending version");
                assert_eq!(version, in_flight.version, "the put in flight is of the oldest pending version");
                assert_eq!(version, self.durable.pushed_through + 1, "versions are acknowledged in order");
                self.durable.pushed_through = version;
                let mut outputs = vec![ReplicationOutput::Persist(self.durable.clone())];
                if !self.pending.is_empty() {
                    outputs.extend(self.put_oldest(0));
                }
                outputs
            }
            Err(error) => {
                let failures = in_flight.failures + 1;
                let base = backoff_ms(self.config.put_retry_base_ms, self.config.put_retry_cap_ms, failures);
                let wait = base + self.rng.below(base / 2 + 1);
                self.waiting_failures = failures;
                let object = version_object(&self.stream, in_flight.version);
                vec![
                    ReplicationOutput::Report(format!(
                        "put of {object} failed ({error}), attempt {failures}; again in {wait} ms"
                    )),
                    ReplicationOutput::SetTimer {
                        at_ms: now_ms.saturating_add(wait),
                        timer: PublisherTimer::RetryPut { put_id },
                    },
                ]
            }
        }
    }

    pub fn handle_timer(&mut self, _now_ms: u64, timer: PublisherTimer) -> Vec<PublisherOutput> {
        let PublisherTimer::RetryPut { put_id } = timer;
        if publisher_has(&self.config, PublisherBug::PutsAhead) {
            return self.retry_put_ahead(put_id);
        }
        // Only the retry of the last failed put is wanted: a put in flight (or an older timer) means it is stale.
        if self.in_flight.is_some() || self.pending.is_empty() || put_id + 1 != self.next_put_id {
            return Vec::new();
        }
        let failures = std::mem::take(&mut self.waiting_failures);
        self.put_oldest(failures)
    }

    fn next_id(&mut self) -> u64 {
        self.next_put_id += 1;
        self.next_put_id - 1
    }

    fn put_oldest(&mut self, failures: u32) -> Vec<PublisherOutput> {
        assert!(self.in_flight.is_none(), "one put at a time");
        let (version, bytes) = self.pending.front().cloned().expect("a put needs a pending version");
        let put_id = self.next_id();
        self.in_flight = Some(PutInFlight { put_id, version, failures });
        vec![ReplicationOutput::Put { put_id, object: version_object(&self.stream, version), bytes }]
    }

    /// The bug's bookkeeping: each version is put under the put id of its number, acknowledgements come in any
    /// order, and each moves the marker to the version it was of, whether or not the ones before it landed.
    fn on_put_ahead(&mut self, now_ms: u64, put_id: u64, result: Result<(), StoreError>) -> Vec<PublisherOutput> {
        let version = put_id;
        if !self.pending.iter().any(|(pending, _)| *pending == version) {
            return Vec::new();
        }
        match result {
            Ok(()) => {
                self.pending.retain(|(pending, _)| *pending != version);
                if version <= self.durable.pushed_through {
                    return Vec::new();
                }
                self.durable.pushed_through = version;
                vec![ReplicationOutput::Persist(self.durable.clone())]
            }
            Err(_) => {
                let at_ms = now_ms.saturating_add(self.config.put_retry_base_ms);
                vec![ReplicationOutput::SetTimer { at_ms, timer: PublisherTimer::RetryPut { put_id } }]
            }
        }
    }

    /// The bug's retry: put the version again if it is still not acknowledged.
    fn retry_put_ahead(&mut self, put_id: u64) -> Vec<PublisherOutput> {
        let version = put_id;
        match self.pending.iter().find(|(pending, _)| *pending == version) {
            Some((_, bytes)) => {
                vec![ReplicationOutput::Put {
                    put_id,
                    object: version_object(&self.stream, version),
                    bytes: bytes.clone(),
                }]
            }
            None => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The replica (init, then pull)
// ---------------------------------------------------------------------------------------------------------------

/// Tunables of a replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaConfig {
    /// Bytes asked for in one ranged read.
    pub download_chunk_bytes: u64,
    /// Wait between listings once the replica holds every version listed (or a gap stops it).
    pub pull_interval_ms: u64,
    /// Wait after the first failed read or listing; doubled with every further failure, up to the cap.
    pub retry_base_ms: u64,
    /// Longest wait between two attempts of one read or listing.
    pub retry_cap_ms: u64,
    /// Longest wait a throttling store's "retry after" is honoured for.
    pub max_retry_after_ms: u64,
    /// A deliberately broken behaviour, for showing that the checkers catch it. `None` in production.
    pub bug: Option<ReplicaBug>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            download_chunk_bytes: 1024,
            pull_interval_ms: 500,
            retry_base_ms: 50,
            retry_cap_ms: 2_000,
            max_retry_after_ms: 10_000,
            bug: None,
        }
    }
}

/// Known-wrong replica behaviours, compiled in only with the `mutants` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaBug {
    /// Applies a downloaded bundle without verifying its checksum.
    SkipChecksum,
    /// When the next version is missing from a listing that shows later ones, goes on with the next version
    /// listed instead of waiting for the missing one.
    SkipMissingVersion,
}

fn replica_has(config: &ReplicaConfig, bug: ReplicaBug) -> bool {
    cfg!(feature = "mutants") && config.bug == Some(bug)
}

/// What a replica keeps on disk. Rows and the marker always change in the same write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaDurable {
    /// The last version applied to `rows` (0: none yet).
    pub applied_through: Version,
    pub rows: Arc<SortedRows>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicaTimer {
    /// Time to list the stream again.
    Pull,
    /// Read the next range of download `download_id` again.
    RetryRead { download_id: u64 },
}

pub type ReplicaOutput = ReplicationOutput<ReplicaDurable, ReplicaTimer>;

/// What the replica is doing; volatile, lost on reboot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Not started yet.
    Booted,
    /// Waiting for listing `list_id`.
    Listing { list_id: u64, failures: u32 },
    /// Downloading `version`; `retry_pending` while a failed read waits for its retry timer (another failure
    /// meanwhile, of a duplicated read, is not counted twice; a good answer is still taken).
    Fetching { version: Version, download_id: u64, buffer: Vec<u8>, failures: u32, retry_pending: bool },
    /// Waiting for a timer: the next pull, or a retry after a failure (`failures` > 0).
    Waiting { failures: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Replica {
    stream: String,
    tablet: TabletId,
    config: ReplicaConfig,
    durable: ReplicaDurable,
    phase: Phase,
    /// The newest version the last listing showed.
    listed_through: Version,
    next_id: u64,
}

impl Replica {
    /// A replica of `stream` for `tablet`, with its durable state as loaded (`None`: a first boot, which is the
    /// init: it applies every version of the stream from 1). Call [`Replica::start`] next.
    pub fn boot(
        stream: impl Into<String>,
        tablet: TabletId,
        config: ReplicaConfig,
        loaded: Option<ReplicaDurable>,
    ) -> Self {
        assert!(config.download_chunk_bytes > 0, "a ranged read asks for at least one byte");
        Self {
            stream: stream.into(),
            tablet,
            config,
            durable: loaded.unwrap_or_default(),
            phase: Phase::Booted,
            listed_through: 0,
            next_id: 0,
        }
    }

    pub fn durable(&self) -> &ReplicaDurable {
        &self.durable
    }

    /// The newest version the replica has seen listed.
    pub fn listed_through(&self) -> Version {
        self.listed_through
    }

    /// The request ids the replica holds: the last one it handed out, and the one its listing or download waits
    /// on, if any. For model checkers (see [`Replica::shift_ids`]).
    pub fn ids(&self) -> (u64, Option<u64>) {
        let waiting = match self.phase {
            Phase::Listing { list_id, .. } => Some(list_id),
            Phase::Fetching { download_id, .. } => Some(download_id),
            Phase::Booted | Phase::Waiting { .. } => None,
        };
        (self.next_id, waiting)
    }

    /// Lowers every request id the replica holds by `by`. The replica tells requests apart by their ids alone,
    /// so a model checker that lowers the ids of every request and answer in flight by as much gets a machine
    /// that behaves the same, and can take two states that differ only in how many requests came before as one.
    pub fn shift_ids(&mut self, by: u64) {
        assert!(by <= self.next_id, "ids stay ids: {by} is more than the last id handed out, {}", self.next_id);
        self.next_id -= by;
        match &mut self.phase {
            Phase::Listing { list_id: id, .. } | Phase::Fetching { download_id: id, .. } => *id -= by,
            Phase::Booted | Phase::Waiting { .. } => {}
        }
    }

    /// Starts the first listing.
    pub fn start(&mut self, _now_ms: u64) -> Vec<ReplicaOutput> {
        if self.phase != Phase::Booted {
            return Vec::new();
        }
        self.list(0)
    }

    /// The store answered listing `list_id` with the names of the objects under the stream's prefix.
    pub fn handle_list(
        &mut self,
        now_ms: u64,
        list_id: u64,
        result: Result<Vec<String>, StoreError>,
    ) -> Vec<ReplicaOutput> {
        let Phase::Listing { list_id: waiting_for, failures } = self.phase else { return Vec::new() };
        if waiting_for != list_id {
            return Vec::new();
        }
        let names = match result {
            Ok(names) => names,
            Err(error) => {
                return self.wait_after_failure(
                    now_ms,
                    failures,
                    &error,
                    format!("listing {}", stream_prefix(&self.stream)),
                );
            }
        };
        let mut versions: Vec<Version> = names.iter().filter_map(|name| version_of(&self.stream, name)).collect();
        versions.sort_unstable();
        versions.dedup();
        let newest = versions.last().copied().unwrap_or(0);
        self.listed_through = self.listed_through.max(newest);
        let next = self.durable.applied_through + 1;
        if versions.binary_search(&next).is_ok() {
            return self.fetch(next);
        }
        let mut outputs = Vec::new();
        if let Some(&later) = versions.iter().find(|version| **version > next) {
            if replica_has(&self.config, ReplicaBug::SkipMissingVersion) {
                return self.fetch(later);
            }
            outputs.push(ReplicationOutput::Report(format!(
                "{} is not listed while version {later} is: waiting for it",
                version_object(&self.stream, next)
            )));
        }
        outputs.extend(self.wait(now_ms, 0, self.config.pull_interval_ms));
        outputs
    }

    /// The store answered a ranged read.
    pub fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<ReplicaOutput> {
        let Phase::Fetching { version, download_id, buffer, failures, retry_pending } = &mut self.phase else {
            return Vec::new();
        };
        if *download_id != result.download_id || result.offset != buffer.len() as u64 {
            return Vec::new();
        }
        if *retry_pending && result.outcome.is_err() {
            return Vec::new();
        }
        *retry_pending = false;
        let (version, failures) = (*version, *failures);
        let object = version_object(&self.stream, version);
        match result.outcome {
            Ok(read) => {
                buffer.extend_from_slice(&read.bytes);
                if buffer.len() as u64 >= read.total_len {
                    self.finish_fetch(now_ms)
                } else if read.bytes.is_empty() {
                    let detail = "an empty read before the end of the object";
                    self.retry_read(now_ms, format!("reading {object}: {detail}"), None)
                } else {
                    vec![self.next_range()]
                }
            }
            // Listed, then gone: the listing was of a moment ago. List again rather than skip it.
            Err(StoreError::NotFound { .. }) => {
                let report = ReplicationOutput::Report(format!("{object} was listed but is not found: listing again"));
                let mut outputs = vec![report];
                outputs.extend(self.wait(now_ms, failures + 1, self.config.pull_interval_ms));
                outputs
            }
            Err(StoreError::Throttled { retry_after_ms }) => {
                self.retry_read(now_ms, format!("reading {object}: throttled"), Some(retry_after_ms))
            }
            Err(error) => self.retry_read(now_ms, format!("reading {object}: {error}"), None),
        }
    }

    pub fn handle_timer(&mut self, _now_ms: u64, timer: ReplicaTimer) -> Vec<ReplicaOutput> {
        match (timer, &self.phase) {
            (ReplicaTimer::Pull, Phase::Waiting { failures }) => self.list(*failures),
            (
                ReplicaTimer::RetryRead { download_id },
                Phase::Fetching { download_id: current, retry_pending: true, .. },
            ) if download_id == *current => {
                if let Phase::Fetching { retry_pending, .. } = &mut self.phase {
                    *retry_pending = false;
                }
                vec![self.next_range()]
            }
            _ => Vec::new(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn list(&mut self, failures: u32) -> Vec<ReplicaOutput> {
        let list_id = self.next_id();
        self.phase = Phase::Listing { list_id, failures };
        vec![ReplicationOutput::List { list_id, prefix: stream_prefix(&self.stream) }]
    }

    fn fetch(&mut self, version: Version) -> Vec<ReplicaOutput> {
        let download_id = self.next_id();
        self.phase = Phase::Fetching { version, download_id, buffer: Vec::new(), failures: 0, retry_pending: false };
        vec![self.next_range()]
    }

    fn next_range(&self) -> ReplicaOutput {
        let Phase::Fetching { version, download_id, buffer, .. } = &self.phase else {
            unreachable!("a range is read only while fetching")
        };
        ReplicationOutput::Download(DownloadRequest {
            download_id: *download_id,
            object: version_object(&self.stream, *version),
            offset: buffer.len() as u64,
            len: self.config.download_chunk_bytes,
        })
    }

    /// Waits `wait_ms` (or the backoff for `failures`, if any) in [`Phase::Waiting`], then lists again.
    fn wait(&mut self, now_ms: u64, failures: u32, wait_ms: u64) -> Vec<ReplicaOutput> {
        self.phase = Phase::Waiting { failures };
        vec![ReplicationOutput::SetTimer { at_ms: now_ms.saturating_add(wait_ms), timer: ReplicaTimer::Pull }]
    }

    fn wait_after_failure(
        &mut self,
        now_ms: u64,
        failures: u32,
        error: &StoreError,
        what: String,
    ) -> Vec<ReplicaOutput> {
        let failures = failures + 1;
        let wait = match error {
            StoreError::Throttled { retry_after_ms } => (*retry_after_ms).min(self.config.max_retry_after_ms),
            _ => backoff_ms(self.config.retry_base_ms, self.config.retry_cap_ms, failures),
        };
        let mut outputs = vec![ReplicationOutput::Report(format!("{what} failed ({error}); again in {wait} ms"))];
        outputs.extend(self.wait(now_ms, failures, wait));
        outputs
    }

    /// A read failed: read the same range again after a backoff (a store's "retry after", if it said one).
    fn retry_read(&mut self, now_ms: u64, detail: String, retry_after_ms: Option<u64>) -> Vec<ReplicaOutput> {
        let (base, cap, most) = (self.config.retry_base_ms, self.config.retry_cap_ms, self.config.max_retry_after_ms);
        let Phase::Fetching { download_id, failures, retry_pending, .. } = &mut self.phase else {
            unreachable!("a read fails only while fetching")
        };
        *failures += 1;
        *retry_pending = true;
        let wait = match retry_after_ms {
            Some(retry_after_ms) => retry_after_ms.min(most),
            None => backoff_ms(base, cap, *failures),
        };
        vec![
            ReplicationOutput::Report(format!("{detail}; again in {wait} ms")),
            ReplicationOutput::SetTimer {
                at_ms: now_ms.saturating_add(wait),
                timer: ReplicaTimer::RetryRead { download_id: *download_id },
            },
        ]
    }

    /// The whole object is read: verify it, apply it, persist rows and marker together, and go on.
    fn finish_fetch(&mut self, now_ms: u64) -> Vec<ReplicaOutput> {
        let Phase::Fetching { version, buffer, failures, .. } =
            std::mem::replace(&mut self.phase, Phase::Waiting { failures: 0 })
        else {
            unreachable!("a fetch finishes only while fetching")
        };
        let object = version_object(&self.stream, version);
        let decoded = if replica_has(&self.config, ReplicaBug::SkipChecksum) {
            Bundle::decode_unverified(&object, &buffer)
        } else {
            Bundle::decode(&object, &buffer)
        };
        let bundle = match decoded {
            Ok(bundle) => bundle,
            Err(error) => {
                // A damaged download: the store keeps the intact bytes, so read the object again from the start.
                let mut outputs = vec![ReplicationOutput::Report(format!("{error}: reading it again"))];
                let download_id = self.next_id();
                let failures = failures + 1;
                self.phase =
                    Phase::Fetching { version, download_id, buffer: Vec::new(), failures, retry_pending: true };
                let wait = backoff_ms(self.config.retry_base_ms, self.config.retry_cap_ms, failures);
                let at_ms = now_ms.saturating_add(wait);
                outputs.push(ReplicationOutput::SetTimer { at_ms, timer: ReplicaTimer::RetryRead { download_id } });
                return outputs;
            }
        };
        if bundle.backup_id != version || bundle.tablet != self.tablet || bundle.kind != kind_of(version) {
            let found = format!("{} version {} of {}", bundle.kind, bundle.backup_id, bundle.tablet);
            let report = ReplicationOutput::Report(format!(
                "{object} holds {found}, not {} version {version} of {}: applying nothing, listing again later",
                kind_of(version),
                self.tablet
            ));
            let mut outputs = vec![report];
            outputs.extend(self.wait(now_ms, failures + 1, self.config.pull_interval_ms));
            return outputs;
        }
        self.durable.rows = Arc::new(if bundle.kind == BackupKind::Full {
            SortedRows::from_changes(&bundle.changes)
        } else {
            self.durable.rows.with_changes(&bundle.changes)
        });
        self.durable.applied_through = version;
        let mut outputs = vec![ReplicationOutput::Persist(self.durable.clone())];
        if self.listed_through > version {
            outputs.extend(self.fetch(version + 1));
        } else {
            outputs.extend(self.list(0));
        }
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ShardId, TableId};
    use crate::protocol::RangeRead;

    const STREAM: &str = "orders";

    fn tablet() -> TabletId {
        TabletId { table: TableId(1), shard: ShardId(0) }
    }

    fn upsert(key: u64, value: u64) -> Change {
        Change::Upsert { key, value }
    }

    /// The bytes the publisher puts for `version` with `changes`.
    fn bundle_bytes(version: Version, changes: &[Change]) -> bytes::Bytes {
        Bundle { backup_id: version, tablet: tablet(), kind: kind_of(version), changes: changes.to_vec() }
            .encode()
            .into()
    }

    fn puts(outputs: &[PublisherOutput]) -> Vec<(u64, String)> {
        outputs
            .iter()
            .filter_map(|output| match output {
                ReplicationOutput::Put { put_id, object, .. } => Some((*put_id, object.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn version_objects_sort_by_version_and_parse_back() {
        assert_eq!(version_object(STREAM, 7), "replication/orders/v00000000000000000007.bundle");
        assert!(version_object(STREAM, 9) < version_object(STREAM, 10));
        for version in [1, 9, 10, u64::MAX] {
            assert_eq!(version_of(STREAM, &version_object(STREAM, version)), Some(version));
        }
        for other in [
            "replication/orders/v00000000000000000000.bundle",
            "replication/orders/v0000000000000000007.bundle",
            "replication/orders/v0000000000000000000x.bundle",
            "replication/orders/v00000000000000000007.bundle.tmp",
            "replication/other/v00000000000000000007.bundle",
            "replication/orders/nested/v00000000000000000007.bundle",
            "backups/orders/v00000000000000000007.bundle",
        ] {
            assert_eq!(version_of(STREAM, other), None, "{other}");
        }
    }

    #[test]
    fn the_publisher_puts_one_version_at_a_time_in_order_and_persists_each_acknowledgement() {
        let mut publisher = Publisher::boot(STREAM, tablet(), PublisherConfig::default(), None, 1);
        let first = publisher.handle_commit(0, 1, &[upsert(1, 10)]);
        assert_eq!(puts(&first), vec![(0, version_object(STREAM, 1))]);
        assert_eq!(
            first[0],
            ReplicationOutput::Put {
                put_id: 0,
                object: version_object(STREAM, 1),
                bytes: bundle_bytes(1, &[upsert(1, 10)])
            }
        );
        // Commits made while a put is under way wait for it.
        assert!(publisher.handle_commit(1, 2, &[upsert(2, 20)]).is_empty());
        assert!(publisher.handle_commit(2, 3, &[Change::Delete { key: 1 }]).is_empty());
        let acknowledged = publisher.handle_put(3, 0, Ok(()));
        assert_eq!(acknowledged[0], ReplicationOutput::Persist(PublisherDurable { pushed_through: 1 }));
        assert_eq!(puts(&acknowledged[1..]), vec![(1, version_object(STREAM, 2))]);
        // An answer to no put under way changes nothing.
        assert!(publisher.handle_put(4, 0, Ok(())).is_empty());
        assert!(publisher.handle_put(4, 7, Ok(())).is_empty());
        let acknowledged = publisher.handle_put(5, 1, Ok(()));
        assert_eq!(acknowledged[0], ReplicationOutput::Persist(PublisherDurable { pushed_through: 2 }));
        assert_eq!(puts(&acknowledged[1..]), vec![(2, version_object(STREAM, 3))]);
        let done = publisher.handle_put(6, 2, Ok(()));
        assert_eq!(done, vec![ReplicationOutput::Persist(PublisherDurable { pushed_through: 3 })]);
        assert_eq!(publisher.committed_through(), 3);
    }

    #[test]
    fn a_failed_put_is_retried_with_capped_backoff_and_later_commits_wait_for_it() {
        let config = PublisherConfig { put_retry_base_ms: 100, put_retry_cap_ms: 400, bug: None };
        let mut publisher = Publisher::boot(STREAM, tablet(), config, None, 9);
        publisher.handle_commit(0, 1, &[upsert(1, 10)]);
        let mut put_id = 0;
        let mut now = 0;
        for (failures, base) in [(1u32, 100u64), (2, 200), (3, 400), (4, 400)] {
            let error = StoreError::Unavailable { detail: "down".to_string() };
            let outputs = publisher.handle_put(now, put_id, Err(error));
            assert!(
                matches!(&outputs[0], ReplicationOutput::Report(text) if text.contains(&format!("attempt {failures}")))
            );
            let ReplicationOutput::SetTimer { at_ms, timer } = outputs[1].clone() else { panic!("{outputs:?}") };
            assert!((now + base..=now + base + base / 2).contains(&at_ms), "failure {failures}: {at_ms}");
            // A commit while waiting does not jump the queue.
            if failures == 2 {
                assert!(publisher.handle_commit(now, 2, &[upsert(2, 20)]).is_empty());
            }
            now = at_ms;
            let retried = publisher.handle_timer(now, timer.clone());
            assert_eq!(puts(&retried), vec![(put_id + 1, version_object(STREAM, 1))]);
            // The same timer again, or an older one, puts nothing more.
            assert!(publisher.handle_timer(now, timer).is_empty());
            put_id += 1;
        }
        let acknowledged = publisher.handle_put(now, put_id, Ok(()));
        assert_eq!(acknowledged[0], ReplicationOutput::Persist(PublisherDurable { pushed_through: 1 }));
        assert_eq!(puts(&acknowledged[1..]), vec![(put_id + 1, version_object(STREAM, 2))]);
    }

    #[test]
    fn after_a_reboot_the_publisher_pushes_from_the_first_version_not_acknowledged() {
        let loaded = PublisherDurable { pushed_through: 2 };
        let mut publisher = Publisher::boot(STREAM, tablet(), PublisherConfig::default(), Some(loaded), 3);
        // The host hands every commit over again; those pushed before are ignored.
        assert!(publisher.handle_commit(0, 1, &[upsert(1, 10)]).is_empty());
        assert!(publisher.handle_commit(0, 2, &[upsert(2, 20)]).is_empty());
        let third = publisher.handle_commit(0, 3, &[upsert(3, 30)]);
        assert_eq!(puts(&third), vec![(0, version_object(STREAM, 3))]);
        let acknowledged = publisher.handle_put(1, 0, Ok(()));
        assert_eq!(acknowledged, vec![ReplicationOutput::Persist(PublisherDurable { pushed_through: 3 })]);
    }

    #[test]
    #[should_panic(expected = "commits are handed over in version order")]
    fn a_commit_that_skips_a_version_is_a_host_bug() {
        let mut publisher = Publisher::boot(STREAM, tablet(), PublisherConfig::default(), None, 1);
        publisher.handle_commit(0, 2, &[upsert(1, 10)]);
    }

    #[test]
    fn the_puts_ahead_bug_puts_every_commit_at_once_and_marks_any_acknowledged_version() {
        let config = PublisherConfig { bug: Some(PublisherBug::PutsAhead), ..PublisherConfig::default() };
        let mut publisher = Publisher::boot(STREAM, tablet(), config, None, 1);
        assert_eq!(puts(&publisher.handle_commit(0, 1, &[upsert(1, 10)])), vec![(1, version_object(STREAM, 1))]);
        assert_eq!(puts(&publisher.handle_commit(0, 2, &[upsert(2, 20)])), vec![(2, version_object(STREAM, 2))]);
        let acknowledged = publisher.handle_put(1, 2, Ok(()));
        assert_eq!(acknowledged, vec![ReplicationOutput::Persist(PublisherDurable { pushed_through: 2 })]);
    }

    /// A replica that has listed `versions` and asked for the first range of the next one: its outputs.
    fn listed(replica: &mut Replica, versions: &[Version]) -> Vec<ReplicaOutput> {
        let started = replica.start(0);
        let [ReplicationOutput::List { list_id, prefix }] = started.as_slice() else { panic!("{started:?}") };
        assert_eq!(prefix, "replication/orders/");
        let mut names: Vec<String> = versions.iter().map(|version| version_object(STREAM, *version)).collect();
        names.push("replication/orders/readme.txt".to_string());
        replica.handle_list(1, *list_id, Ok(names))
    }

    fn download(outputs: &[ReplicaOutput]) -> DownloadRequest {
        outputs
            .iter()
            .find_map(|output| match output {
                ReplicationOutput::Download(request) => Some(request.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no download in {outputs:?}"))
    }

    /// Answers `request` with bytes `offset..` of `object`, at most `most` of them.
    fn answer(request: &DownloadRequest, object: &[u8], most: usize) -> DownloadResult {
        let start = (request.offset as usize).min(object.len());
        let end = (start + (request.len as usize).min(most)).min(object.len());
        DownloadResult {
            download_id: request.download_id,
            object: request.object.clone(),
            offset: request.offset,
            outcome: Ok(RangeRead {
                bytes: bytes::Bytes::copy_from_slice(&object[start..end]),
                total_len: object.len() as u64,
            }),
        }
    }

    /// Reads `request`'s object to its end from `object`, `most` bytes per answer; the outputs of the last answer.
    fn read_all(replica: &mut Replica, mut request: DownloadRequest, object: &[u8], most: usize) -> Vec<ReplicaOutput> {
        loop {
            let outputs = replica.handle_download(2, answer(&request, object, most));
            match outputs.as_slice() {
                [ReplicationOutput::Download(next)] if next.object == request.object => request = next.clone(),
                _ => return outputs,
            }
        }
    }

    fn persisted(outputs: &[ReplicaOutput]) -> Option<&ReplicaDurable> {
        outputs.iter().find_map(|output| match output {
            ReplicationOutput::Persist(durable) => Some(durable),
            _ => None,
        })
    }

    fn small_config() -> ReplicaConfig {
        ReplicaConfig { download_chunk_bytes: 16, ..ReplicaConfig::default() }
    }

    #[test]
    fn a_new_replica_applies_every_listed_version_in_order_persisting_each_before_the_next_read() {
        let versions =
            [vec![upsert(1, 10), upsert(2, 20)], vec![Change::Delete { key: 1 }, upsert(3, 30)], vec![upsert(1, 11)]];
        let objects: Vec<bytes::Bytes> =
            versions.iter().enumerate().map(|(at, changes)| bundle_bytes(at as u64 + 1, changes)).collect();
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
        // Listed out of order, and with a stray object under the prefix: versions 1 to 3, in order.
        let mut outputs = listed(&mut replica, &[3, 1, 2]);
        let mut rows = Rows::new();
        for (at, changes) in versions.iter().enumerate() {
            let request = download(&outputs);
            assert_eq!(request.object, version_object(STREAM, at as u64 + 1));
            // Partial reads of 5 bytes where 16 are asked: the replica resumes at the right offset.
            outputs = read_all(&mut replica, request, &objects[at], 5);
            crate::model::apply_changes(&mut rows, changes);
            let durable = persisted(&outputs).expect("each version is persisted");
            assert_eq!(durable.applied_through, at as u64 + 1);
            assert_eq!(*durable.rows, rows);
            assert!(matches!(outputs[0], ReplicationOutput::Persist(_)), "the persist comes first: {outputs:?}");
        }
        // Caught up: it lists again.
        assert!(matches!(outputs.as_slice(), [ReplicationOutput::Persist(_), ReplicationOutput::List { .. }]));
    }

    use crate::model::Rows;

    #[test]
    fn a_gap_in_the_listing_is_reported_and_waited_out_never_skipped() {
        let loaded = ReplicaDurable { applied_through: 1, rows: Arc::new(SortedRows::from_changes(&[upsert(1, 10)])) };
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), Some(loaded.clone()));
        let outputs = listed(&mut replica, &[1, 3, 4]);
        assert!(
            matches!(&outputs[0], ReplicationOutput::Report(text) if text.contains("v00000000000000000002")),
            "{outputs:?}"
        );
        let [_, ReplicationOutput::SetTimer { at_ms, timer: ReplicaTimer::Pull }] = outputs.as_slice() else {
            panic!("{outputs:?}")
        };
        assert_eq!(*at_ms, 1 + ReplicaConfig::default().pull_interval_ms);
        assert_eq!(replica.durable(), &loaded, "nothing applied");
        // At the pull it lists again; version 2 is there now.
        let again = replica.handle_timer(*at_ms, ReplicaTimer::Pull);
        let [ReplicationOutput::List { list_id, .. }] = again.as_slice() else { panic!("{again:?}") };
        let names = (1..=4).map(|version| version_object(STREAM, version)).collect();
        let outputs = replica.handle_list(600, *list_id, Ok(names));
        assert_eq!(download(&outputs).object, version_object(STREAM, 2));
    }

    #[test]
    fn the_skip_missing_version_bug_reads_past_a_gap() {
        let config = ReplicaConfig { bug: Some(ReplicaBug::SkipMissingVersion), ..small_config() };
        let loaded = ReplicaDurable { applied_through: 1, rows: Arc::new(SortedRows::new()) };
        let mut replica = Replica::boot(STREAM, tablet(), config, Some(loaded));
        assert_eq!(download(&listed(&mut replica, &[1, 3])).object, version_object(STREAM, 3));
    }

    #[test]
    fn a_corrupt_download_is_read_again_and_never_applied() {
        let object = bundle_bytes(1, &[upsert(1, 10), upsert(2, 20)]);
        let mut corrupt = object.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
        let request = download(&listed(&mut replica, &[1]));
        let outputs = read_all(&mut replica, request, &corrupt, 64);
        assert!(persisted(&outputs).is_none(), "{outputs:?}");
        assert!(matches!(&outputs[0], ReplicationOutput::Report(text) if text.contains("checksum")), "{outputs:?}");
        let [_, ReplicationOutput::SetTimer { timer, .. }] = outputs.as_slice() else { panic!("{outputs:?}") };
        let again = replica.handle_timer(10, timer.clone());
        let request = download(&again);
        assert_eq!((request.object.as_str(), request.offset), (version_object(STREAM, 1).as_str(), 0));
        let outputs = read_all(&mut replica, request, &object, 64);
        assert_eq!(persisted(&outputs).expect("the intact copy is applied").applied_through, 1);
    }

    #[test]
    fn the_skip_checksum_bug_applies_a_corrupt_download() {
        let object = bundle_bytes(1, &[upsert(1, 10)]);
        let mut corrupt = object.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        let config = ReplicaConfig { bug: Some(ReplicaBug::SkipChecksum), ..small_config() };
        let mut replica = Replica::boot(STREAM, tablet(), config, None);
        let request = download(&listed(&mut replica, &[1]));
        let outputs = read_all(&mut replica, request, &corrupt, 64);
        let durable = persisted(&outputs).expect("the bug applies it");
        assert_ne!(*durable.rows, SortedRows::from_changes(&[upsert(1, 10)]));
    }

    #[test]
    fn a_bundle_of_another_version_or_tablet_is_not_applied() {
        let other_tablet = TabletId { table: TableId(2), shard: ShardId(0) };
        let wrong = [
            bundle_bytes(2, &[upsert(1, 10)]),
            Bundle { backup_id: 1, tablet: other_tablet, kind: BackupKind::Full, changes: vec![] }.encode().into(),
            Bundle { backup_id: 1, tablet: tablet(), kind: BackupKind::Incremental, changes: vec![] }.encode().into(),
        ];
        for object in wrong {
            let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
            let request = download(&listed(&mut replica, &[1]));
            let outputs = read_all(&mut replica, request, &object, 64);
            assert!(persisted(&outputs).is_none(), "{outputs:?}");
            assert!(matches!(&outputs[0], ReplicationOutput::Report(text) if text.contains("applying nothing")));
            assert!(matches!(outputs[1], ReplicationOutput::SetTimer { timer: ReplicaTimer::Pull, .. }));
        }
    }

    #[test]
    fn failed_reads_back_off_honour_a_capped_retry_after_and_resume_where_they_stopped() {
        let object = bundle_bytes(1, &[upsert(1, 10), upsert(2, 20), upsert(3, 30)]);
        let config = ReplicaConfig { max_retry_after_ms: 1_000, ..small_config() };
        let mut replica = Replica::boot(STREAM, tablet(), config, None);
        let request = download(&listed(&mut replica, &[1]));
        let outputs = replica.handle_download(2, answer(&request, &object, 16));
        let request = download(&outputs);
        assert_eq!(request.offset, 16);
        let failure = |outcome| DownloadResult {
            download_id: request.download_id,
            object: request.object.clone(),
            offset: request.offset,
            outcome: Err(outcome),
        };
        let throttled = replica.handle_download(10, failure(StoreError::Throttled { retry_after_ms: 60_000 }));
        let [_, ReplicationOutput::SetTimer { at_ms, timer }] = throttled.as_slice() else { panic!("{throttled:?}") };
        assert_eq!(*at_ms, 1_010, "a store's retry-after is cut to the configured most");
        // Another failure of the same range while the retry waits (a duplicated read) is not counted again.
        assert!(replica.handle_download(20, failure(StoreError::Unavailable { detail: "busy".into() })).is_empty());
        let again = download(&replica.handle_timer(2_000, timer.clone()));
        assert_eq!(again.offset, 16, "the read resumes where it stopped");
        assert!(replica.handle_timer(2_000, timer.clone()).is_empty(), "one read per retry");
        let unavailable = replica.handle_download(2_000, failure(StoreError::Unavailable { detail: "busy".into() }));
        let [_, ReplicationOutput::SetTimer { at_ms, timer }] = unavailable.as_slice() else {
            panic!("{unavailable:?}")
        };
        assert_eq!(*at_ms, 2_000 + backoff_ms(50, 2_000, 2));
        let again = download(&replica.handle_timer(*at_ms, timer.clone()));
        // An answer for another download, or another offset, is ignored.
        let stale = DownloadResult { download_id: again.download_id + 1, ..answer(&again, &object, 16) };
        assert!(replica.handle_download(2_001, stale).is_empty());
        let off = DownloadResult { offset: 0, ..answer(&again, &object, 16) };
        assert!(replica.handle_download(2_001, off).is_empty());
        let outputs = read_all(&mut replica, again, &object, 16);
        assert_eq!(persisted(&outputs).expect("applied").applied_through, 1);
    }

    #[test]
    fn a_listed_object_that_is_not_found_is_listed_again_not_skipped() {
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
        let request = download(&listed(&mut replica, &[1, 2]));
        let gone = DownloadResult {
            download_id: request.download_id,
            object: request.object.clone(),
            offset: 0,
            outcome: Err(StoreError::NotFound { object: request.object.clone() }),
        };
        let outputs = replica.handle_download(5, gone);
        assert!(matches!(&outputs[0], ReplicationOutput::Report(text) if text.contains("not found")));
        assert!(matches!(outputs[1], ReplicationOutput::SetTimer { timer: ReplicaTimer::Pull, .. }));
        assert_eq!(replica.durable().applied_through, 0);
    }

    #[test]
    fn a_replica_with_its_ids_shifted_takes_answers_under_the_shifted_ids() {
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
        replica.start(0);
        let (last, Some(waiting)) = replica.ids() else { panic!("a listing is under way") };
        assert_eq!(last, waiting);
        let mut shifted = replica.clone();
        shifted.shift_ids(waiting);
        assert_eq!(shifted.ids(), (0, Some(0)));
        // The answer under the old id is now unknown; under the shifted one it is the answer waited for.
        let names = || Ok(vec![version_object(STREAM, 1)]);
        assert_ne!(waiting, 0);
        assert!(shifted.clone().handle_list(1, waiting, names()).is_empty());
        let outputs = shifted.handle_list(1, 0, names());
        let request = download(&outputs);
        assert_eq!(request.download_id, 1, "the next id follows the shifted one");
        assert_eq!(download(&replica.handle_list(1, waiting, names())).download_id, waiting + 1);
    }

    #[test]
    fn a_failed_listing_backs_off_and_a_stale_answer_is_ignored() {
        let mut replica = Replica::boot(STREAM, tablet(), small_config(), None);
        let started = replica.start(0);
        let [ReplicationOutput::List { list_id, .. }] = started.as_slice() else { panic!("{started:?}") };
        assert!(replica.start(0).is_empty(), "started once");
        assert!(replica.handle_list(1, list_id + 5, Ok(vec![version_object(STREAM, 1)])).is_empty());
        let mut at = 1;
        for failures in 1..=3 {
            let outputs =
                replica.handle_list(at, *list_id + failures - 1, Err(StoreError::Timeout { timeout_ms: 100 }));
            let [ReplicationOutput::Report(_), ReplicationOutput::SetTimer { at_ms, timer }] = outputs.as_slice()
            else {
                panic!("{outputs:?}")
            };
            assert_eq!(*at_ms, at + backoff_ms(50, 2_000, failures as u32));
            at = *at_ms;
            let again = replica.handle_timer(at, timer.clone());
            assert!(matches!(again.as_slice(), [ReplicationOutput::List { .. }]), "{again:?}");
        }
    }
}
