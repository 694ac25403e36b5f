//! A shard: a pure state machine that serves one tablet (one shard of one table) and applies one increment at a
//! time to its rows.
//!
//! On an apply request it downloads its bundle in byte ranges (resuming after a partial read), verifies it, and
//! applies the rows together with "applied through increment k" in one durable write, and only then replies.
//! A request for an increment already applied is answered without re-applying; a request that would skip an
//! increment is refused.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::model::{BackupKind, IncrementIndex, SortedRows, TabletId};
use crate::protocol::{
    ApplyOutcome, ApplyRequest, BundleOf, DownloadRequest, DownloadResult, Message, NodeAddr, OperationId, Output,
    PersistNote, ShardFailure, StoreError,
};

/// The most a download reserves up front for an object, whatever size the store claims for it.
const MAX_BUFFER_RESERVE: usize = 64 << 20;

/// Tunables of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardConfig {
    /// Bytes asked for in one ranged read.
    pub download_chunk_bytes: u64,
    /// Wait before retrying a failed ranged read; multiplied by the number of failures so far.
    pub download_retry_ms: u64,
    /// Failed ranged reads of one download before the shard reports a transient failure to the coordinator.
    pub max_download_failures: u32,
    /// Longest wait a throttling store's "retry after" is honoured for; a longer one (a store may say anything)
    /// is cut to this.
    pub max_retry_after_ms: u64,
    /// A deliberately broken behaviour, for showing that the checkers catch it. `None` in production.
    pub bug: Option<ShardBug>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            download_chunk_bytes: 1024,
            download_retry_ms: 50,
            max_download_failures: 4,
            max_retry_after_ms: 10_000,
            bug: None,
        }
    }
}

/// Known-wrong shard behaviours; like the coordinator's, compiled in only with the `mutants` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShardBug {
    /// Applies a downloaded bundle without verifying its checksum.
    SkipChecksum,
    /// Replies "applied" before the write that makes it true is durable.
    ReplyBeforePersist,
    /// Writes the applied-increment marker and the rows in two separate syncs, the marker first.
    MarkerBeforeRows,
    /// Applies a request for an increment it already applied again (a late or duplicated request), instead of
    /// answering it from the applied marker.
    ReapplyOldIncrements,
    /// Takes a late request of an older operation as the start of a restore, over the rows of the newer
    /// operation it holds, instead of refusing it.
    ApplyOlderOperations,
}

fn has(config: &ShardConfig, bug: ShardBug) -> bool {
    cfg!(feature = "mutants") && config.bug == Some(bug)
}

/// What a shard keeps on disk. Rows and the applied marker always change in the same write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardDurable {
    /// The operation the rows belong to.
    pub op: Option<OperationId>,
    /// The last increment of `op` applied to `rows`.
    pub applied_through: Option<IncrementIndex>,
    /// Shared with the persist output instead of copied; the next apply merges into new rows, so it never copies
    /// them first either, whether or not the host still holds them.
    pub rows: Arc<SortedRows>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShardTimer {
    /// Retry the current ranged read of download `download_id`.
    DownloadRetry { download_id: u64 },
}

pub type ShardOutput = Output<ShardDurable, ShardTimer>;

/// The increment being downloaded; volatile, lost on reboot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Work {
    request: ApplyRequest,
    download_id: u64,
    buffer: Vec<u8>,
    failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    id: TabletId,
    config: ShardConfig,
    durable: ShardDurable,
    work: Option<Work>,
    next_download_id: u64,
}

/// Every part of a shard, borrowed, for model checkers that relabel states (the explorer's symmetry reduction
/// renames tablets): built by destructuring, so a new field cannot be left out of it.
#[derive(Debug)]
pub struct ShardParts<'a> {
    pub id: TabletId,
    pub config: &'a ShardConfig,
    pub durable: &'a ShardDurable,
    /// The download in progress: its request, download id, bytes read so far and failed reads.
    pub work: Option<(&'a ApplyRequest, u64, &'a [u8], u32)>,
    pub next_download_id: u64,
}

impl Shard {
    pub fn boot(id: TabletId, config: ShardConfig, loaded: Option<ShardDurable>) -> Self {
        assert!(config.download_chunk_bytes > 0, "a ranged read asks for at least one byte");
        Self { id, config, durable: loaded.unwrap_or_default(), work: None, next_download_id: 0 }
    }

    pub fn id(&self) -> TabletId {
        self.id
    }

    pub fn durable(&self) -> &ShardDurable {
        &self.durable
    }

    /// Every part of the machine, for model checkers; see [`ShardParts`].
    pub fn parts(&self) -> ShardParts<'_> {
        let Self { id, config, durable, work, next_download_id } = self;
        let work = work.as_ref().map(|work| {
            let Work { request, download_id, buffer, failures } = work;
            (request, *download_id, buffer.as_slice(), *failures)
        });
        ShardParts { id: *id, config, durable, work, next_download_id: *next_download_id }
    }

    pub fn handle_message(&mut self, _now_ms: u64, from: NodeAddr, msg: Message) -> Vec<ShardOutput> {
        match msg {
            Message::Apply(request) if from == NodeAddr::Coordinator => self.on_apply(request),
            _ => Vec::new(),
        }
    }

    pub fn handle_timer(&mut self, _now_ms: u64, timer: ShardTimer) -> Vec<ShardOutput> {
        let ShardTimer::DownloadRetry { download_id } = timer;
        match &self.work {
            Some(work) if work.download_id == download_id => vec![self.next_range()],
            _ => Vec::new(),
        }
    }

    pub fn handle_download(&mut self, now_ms: u64, result: DownloadResult) -> Vec<ShardOutput> {
        let Some(work) = &mut self.work else { return Vec::new() };
        if work.download_id != result.download_id || result.offset != work.buffer.len() as u64 {
            return Vec::new();
        }
        match result.outcome {
            Ok(read) => {
                if work.buffer.is_empty() {
                    // The first read tells the object's size: room for all of it at once, instead of growing (and
                    // copying) the buffer read by read. The store's word is not trusted beyond a bound.
                    let total = usize::try_from(read.total_len).unwrap_or(usize::MAX);
                    work.buffer.reserve_exact(total.min(MAX_BUFFER_RESERVE));
                }
                work.buffer.extend_from_slice(&read.bytes);
                if work.buffer.len() as u64 >= read.total_len {
                    self.finish_download()
                } else if read.bytes.is_empty() {
                    self.on_read_failure(now_ms, "empty read before the end of the object".to_string(), None)
                } else {
                    vec![self.next_range()]
                }
            }
            Err(StoreError::NotFound { object }) => {
                let cause = ShardFailure::ObjectMissing { object };
                self.finish_with(ApplyOutcome::Failed { permanent: true, cause })
            }
            Err(StoreError::Throttled { retry_after_ms }) => {
                self.on_read_failure(now_ms, format!("throttled for {retry_after_ms} ms"), Some(retry_after_ms))
            }
            Err(error) => self.on_read_failure(now_ms, error.to_string(), None),
        }
    }

    fn on_apply(&mut self, request: ApplyRequest) -> Vec<ShardOutput> {
        if request.tablet != self.id {
            let cause = ShardFailure::WrongShard { requested: request.tablet, actual: self.id };
            return vec![reply(&request, ApplyOutcome::Failed { permanent: true, cause })];
        }
        // Operation ids increase (the coordinator starts none below one it started before): a request of an older
        // operation than the one held is a late or duplicated one of an operation that ended, and applying it would
        // overwrite the newer restore's rows.
        let held = self.durable.op.max(self.work.as_ref().map(|work| work.request.op));
        if let Some(held) = held
            && request.op < held
            && !has(&self.config, ShardBug::ApplyOlderOperations)
        {
            let cause = ShardFailure::Superseded { requested: request.op, held };
            return vec![reply(&request, ApplyOutcome::Failed { permanent: true, cause })];
        }
        let applied = if self.durable.op == Some(request.op) { self.durable.applied_through } else { None };
        let old = applied.is_some_and(|through| request.increment <= through);
        let reapply = old && has(&self.config, ShardBug::ReapplyOldIncrements);
        if old && !reapply {
            return vec![reply(&request, ApplyOutcome::AlreadyApplied)];
        }
        let expected = applied.map_or(0, |through| through + 1);
        if request.increment != expected && !reapply {
            let cause = ShardFailure::OutOfOrder { expected, requested: request.increment };
            return vec![reply(&request, ApplyOutcome::Failed { permanent: true, cause })];
        }
        if let Some(work) = &mut self.work
            && work.request.op == request.op
            && work.request.increment == request.increment
        {
            // A retry of the download in progress: download nothing new, and answer the newest request when done
            // (the coordinator takes only a reply to its current generation and attempt). A late duplicate of an
            // older attempt does not displace a newer one.
            if (request.generation, request.attempt) > (work.request.generation, work.request.attempt) {
                work.request = request;
            }
            return Vec::new();
        }
        self.next_download_id += 1;
        self.work = Some(Work { request, download_id: self.next_download_id, buffer: Vec::new(), failures: 0 });
        vec![self.next_range()]
    }

    fn next_range(&self) -> ShardOutput {
        let work = self.work.as_ref().expect("a range is read only during a download");
        Output::Download(DownloadRequest {
            download_id: work.download_id,
            object: work.request.object.clone(),
            offset: work.buffer.len() as u64,
            len: self.config.download_chunk_bytes,
        })
    }

    fn on_read_failure(&mut self, now_ms: u64, detail: String, wait_ms: Option<u64>) -> Vec<ShardOutput> {
        let max_failures = self.config.max_download_failures;
        let retry_ms = self.config.download_retry_ms;
        let work = self.work.as_mut().expect("a read fails only during a download");
        work.failures += 1;
        if work.failures >= max_failures {
            let cause =
                ShardFailure::DownloadFailed { object: work.request.object.clone(), attempts: work.failures, detail };
            return self.finish_with(ApplyOutcome::Failed { permanent: false, cause });
        }
        let wait = match wait_ms {
            Some(retry_after_ms) => retry_after_ms.min(self.config.max_retry_after_ms),
            None => retry_ms.saturating_mul(u64::from(work.failures)),
        };
        vec![Output::SetTimer {
            at_ms: now_ms.saturating_add(wait),
            timer: ShardTimer::DownloadRetry { download_id: work.download_id },
        }]
    }

    fn finish_download(&mut self) -> Vec<ShardOutput> {
        let work = self.work.as_ref().expect("a download finishes only while running");
        let request = &work.request;
        let verify = !has(&self.config, ShardBug::SkipChecksum);
        let (bundle, payload_crc32) = match Bundle::decode_with_payload_crc(&request.object, &work.buffer, verify) {
            Ok(decoded) => decoded,
            Err(error) => {
                // A bad download is transient: the store keeps an intact copy, a later download may get it.
                let cause = ShardFailure::BadBundle { detail: error.to_string() };
                return self.finish_with(ApplyOutcome::Failed { permanent: false, cause });
            }
        };
        let expected_kind = if request.increment == 0 { BackupKind::Full } else { BackupKind::Incremental };
        let expected = BundleOf { backup_id: request.backup_id, kind: expected_kind, tablet: self.id };
        let found = BundleOf { backup_id: bundle.backup_id, kind: bundle.kind, tablet: bundle.tablet };
        if found != expected {
            let cause = ShardFailure::WrongBundle { object: request.object.clone(), expected, found };
            return self.finish_with(ApplyOutcome::Failed { permanent: true, cause });
        }
        let note = PersistNote::ShardApplied {
            op: request.op,
            increment: request.increment,
            backup_id: request.backup_id,
            payload_crc32,
        };
        let work = self.work.take().expect("checked above");
        let request = work.request;
        // Only the bug writes the old rows again. Holding them costs a reference count: the apply below builds new
        // rows and copies none of these.
        let rows_before = has(&self.config, ShardBug::MarkerBeforeRows).then(|| self.durable.rows.clone());
        // Straight into the durable state: if the persist below does not complete, the node crashes and reloads
        // what is durable.
        self.durable.rows = Arc::new(if bundle.kind == BackupKind::Full {
            SortedRows::from_changes(&bundle.changes)
        } else {
            self.durable.rows.with_changes(&bundle.changes)
        });
        self.durable.op = Some(request.op);
        self.durable.applied_through = Some(request.increment);
        let persist = Output::Persist { state: self.durable.clone(), note: note.clone() };
        let answer = reply(&request, ApplyOutcome::Applied);
        if has(&self.config, ShardBug::ReplyBeforePersist) {
            return vec![answer, persist];
        }
        if let Some(rows_before) = rows_before {
            let marker_only = ShardDurable { rows: rows_before, ..self.durable.clone() };
            return vec![Output::Persist { state: marker_only, note }, persist, answer];
        }
        vec![persist, answer]
    }

    fn finish_with(&mut self, outcome: ApplyOutcome) -> Vec<ShardOutput> {
        let work = self.work.take().expect("only a running download finishes");
        vec![reply(&work.request, outcome)]
    }
}

fn reply(request: &ApplyRequest, outcome: ApplyOutcome) -> ShardOutput {
    Output::Send { to: NodeAddr::Coordinator, msg: Message::Reply(request.reply(outcome)) }
}
