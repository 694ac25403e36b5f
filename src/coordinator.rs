//! The coordinator: a pure state machine that drives every shard through the restore chain, one increment at a
//! time.
//!
//! Rules it keeps:
//! - increment k+1 starts only when every shard has reported k durably done;
//! - at most `max_in_flight_shards` apply requests are outstanding;
//! - a transient failure or a missing reply is retried with capped exponential backoff and seeded jitter; a
//!   missing reply is never taken as success;
//! - a permanent failure or a passed deadline ends the operation in a persisted `Failed` naming the cause;
//! - every boot bumps the generation; replies of an older generation, of another attempt or of another
//!   increment are ignored;
//! - after a reboot it reloads its durable state and re-sends only to shards that have no result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{BackupManifest, ChainError, IncrementIndex, RestoreChain, ShardId};
use crate::protocol::{
    ApplyOutcome, ApplyReply, ApplyRequest, DownloadResult, Generation, Message, NodeAddr, OperationId, Output,
    PersistNote, ShardFailure,
};
use crate::rng::SplitMix64;

/// Tunables of the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorConfig {
    /// Most apply requests outstanding at once, across all shards.
    pub max_in_flight_shards: u32,
    /// How long to wait for a reply before the request counts as failed and is retried.
    pub request_timeout_ms: u64,
    /// Backoff before the first retry; doubled on every further failure of the same shard.
    pub backoff_base_ms: u64,
    /// Longest backoff between two attempts.
    pub backoff_cap_ms: u64,
    /// Time from the start of an operation after which it fails with a timeout.
    pub deadline_ms: u64,
    /// A deliberately broken behaviour, for showing that the checkers catch it. `None` in production.
    pub bug: Option<CoordinatorBug>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            max_in_flight_shards: 4,
            request_timeout_ms: 3_000,
            backoff_base_ms: 100,
            backoff_cap_ms: 5_000,
            deadline_ms: 3_600_000,
            bug: None,
        }
    }
}

/// Known-wrong coordinator behaviours that real restore systems have shipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CoordinatorBug {
    /// Advances to the next increment when the first shard reports, not the last.
    AdvanceOnFirstReport,
}

/// What starts a restore.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub op: OperationId,
    pub shard_count: u32,
    /// Every backup in the store, in any order; the coordinator picks the chain.
    pub catalog: Vec<BackupManifest>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("operation {running} is still running; operation {requested} is refused")]
    AnotherOperationRunning { running: OperationId, requested: OperationId },
    #[error("cannot plan restore: {0}")]
    Chain(#[from] ChainError),
    #[error("a restore needs at least one shard")]
    NoShards,
}

/// The coordinator's durable state: what survives a reboot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CoordinatorDurable {
    pub generation: Generation,
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    pub op: OperationId,
    pub shard_count: u32,
    pub started_at_ms: u64,
    pub deadline_at_ms: u64,
    pub status: OperationStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationStatus {
    Running(RunningState),
    /// Every increment is durably applied on every shard. Working state is gone; this stays queryable.
    Done {
        increments: u32,
        finished_at_ms: u64,
    },
    Failed {
        error: RestoreError,
        failed_at_ms: u64,
    },
}

/// Working state of a running operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunningState {
    /// Shared, not copied: every persist of the running state would otherwise clone every manifest.
    pub chain: Arc<RestoreChain>,
    pub increment: IncrementIndex,
    /// Shards that reported the current increment durably applied.
    pub done: BTreeSet<ShardId>,
    /// Shards whose last attempt failed: how many attempts failed and when the next may start.
    pub retries: BTreeMap<ShardId, Retry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retry {
    pub failed_attempts: u32,
    pub not_before_ms: u64,
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum RestoreError {
    #[error("increment {increment} (backup {backup_id}) on {shard}: {cause}")]
    Shard { increment: IncrementIndex, backup_id: u64, shard: ShardId, cause: ShardFailure },
    #[error("deadline passed at increment {increment} with {pending} shard(s) not done")]
    DeadlineExceeded { increment: IncrementIndex, pending: u32 },
}

/// A compact summary of progress, written to the event log with every persist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgressMark {
    Idle,
    Running { op: OperationId, increment: IncrementIndex, shards_done: u32 },
    Done { op: OperationId, increments: u32 },
    Failed { op: OperationId },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CoordinatorTimer {
    /// No reply to `attempt` of `shard` for `increment` in time.
    RequestTimeout { shard: ShardId, increment: IncrementIndex, attempt: u32 },
    /// A backoff has passed; dispatch again.
    RetryDue,
    /// The operation's deadline.
    Deadline,
}

pub type CoordinatorOutput = Output<CoordinatorDurable, CoordinatorTimer>;

/// An apply request awaiting its reply; volatile, lost on reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct InFlight {
    attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Coordinator {
    config: CoordinatorConfig,
    durable: CoordinatorDurable,
    in_flight: BTreeMap<ShardId, InFlight>,
    /// Attempts sent in this generation, so every request has a fresh attempt number.
    next_attempt: u32,
    rng: SplitMix64,
}

impl Coordinator {
    /// Boots from durable state (`None` on first boot): bumps the generation, persists it, and resumes a running
    /// operation by re-arming its timers and re-sending to the shards that have no result.
    pub fn boot(
        config: CoordinatorConfig,
        loaded: Option<CoordinatorDurable>,
        seed: u64,
        now_ms: u64,
    ) -> (Self, Vec<CoordinatorOutput>) {
        assert!(config.max_in_flight_shards > 0, "at least one request must be allowed in flight");
        let mut durable = loaded.unwrap_or_default();
        durable.generation += 1;
        let rng = SplitMix64::new(seed ^ durable.generation.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut machine = Self { config, durable, in_flight: BTreeMap::new(), next_attempt: 0, rng };
        let mut out = Vec::new();
        machine.persist(&mut out);
        if let Some(operation) = &machine.durable.operation
            && matches!(operation.status, OperationStatus::Running(_))
        {
            out.push(Output::SetTimer { at_ms: operation.deadline_at_ms, timer: CoordinatorTimer::Deadline });
            out.push(Output::Report(format!(
                "resuming operation {} in generation {}",
                operation.op,
                machine.generation()
            )));
            machine.drive(now_ms, &mut out);
        }
        (machine, out)
    }

    /// Starts a restore. Starting the operation that is already known is a no-op, so a client may retry.
    pub fn start(&mut self, now_ms: u64, request: RestoreRequest) -> Result<Vec<CoordinatorOutput>, StartError> {
        if let Some(existing) = &self.durable.operation {
            if existing.op == request.op {
                return Ok(Vec::new());
            }
            if matches!(existing.status, OperationStatus::Running(_)) {
                return Err(StartError::AnotherOperationRunning { running: existing.op, requested: request.op });
            }
        }
        if request.shard_count == 0 {
            return Err(StartError::NoShards);
        }
        let chain = RestoreChain::plan(&request.catalog, request.shard_count)?;
        let deadline_at_ms = now_ms.saturating_add(self.config.deadline_ms);
        self.durable.operation = Some(Operation {
            op: request.op,
            shard_count: request.shard_count,
            started_at_ms: now_ms,
            deadline_at_ms,
            status: OperationStatus::Running(RunningState {
                chain: Arc::new(chain),
                increment: 0,
                done: BTreeSet::new(),
                retries: BTreeMap::new(),
            }),
        });
        self.in_flight.clear();
        let mut out = Vec::new();
        self.persist(&mut out);
        out.push(Output::Report(format!("operation {} started", request.op)));
        out.push(Output::SetTimer { at_ms: deadline_at_ms, timer: CoordinatorTimer::Deadline });
        self.drive(now_ms, &mut out);
        Ok(out)
    }

    pub fn handle_message(&mut self, now_ms: u64, from: NodeAddr, msg: Message) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        match msg {
            Message::Reply(reply) if from == NodeAddr::Shard(reply.shard) => self.on_reply(now_ms, reply, &mut out),
            // Apply requests are not for the coordinator, and a reply must come from the shard it speaks for.
            Message::Reply(_) | Message::Apply(_) => {}
        }
        out
    }

    pub fn handle_timer(&mut self, now_ms: u64, timer: CoordinatorTimer) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        match timer {
            CoordinatorTimer::RequestTimeout { shard, increment, attempt } => {
                let current = self.running().map(|r| r.increment);
                let pending = self.in_flight.get(&shard).is_some_and(|f| f.attempt == attempt);
                if current == Some(increment) && pending {
                    self.in_flight.remove(&shard);
                    self.schedule_retry(now_ms, shard, &mut out);
                    self.drive(now_ms, &mut out);
                }
            }
            CoordinatorTimer::RetryDue => self.drive(now_ms, &mut out),
            CoordinatorTimer::Deadline => self.on_deadline(now_ms, &mut out),
        }
        out
    }

    /// The coordinator downloads nothing; a stray download result is ignored.
    pub fn handle_download(&mut self, _now_ms: u64, _result: DownloadResult) -> Vec<CoordinatorOutput> {
        Vec::new()
    }

    pub fn generation(&self) -> Generation {
        self.durable.generation
    }

    pub fn durable(&self) -> &CoordinatorDurable {
        &self.durable
    }

    pub fn operation(&self) -> Option<&Operation> {
        self.durable.operation.as_ref()
    }

    pub fn progress(&self) -> ProgressMark {
        progress_of(&self.durable)
    }

    fn on_reply(&mut self, now_ms: u64, reply: ApplyReply, out: &mut Vec<CoordinatorOutput>) {
        let Some(operation) = &self.durable.operation else { return };
        let OperationStatus::Running(running) = &operation.status else { return };
        let known = reply.op == operation.op
            && reply.generation == self.durable.generation
            && reply.increment == running.increment
            && self.in_flight.get(&reply.shard).is_some_and(|f| f.attempt == reply.attempt);
        if !known {
            return;
        }
        self.in_flight.remove(&reply.shard);
        match reply.outcome {
            ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied => self.on_shard_done(now_ms, reply.shard, out),
            ApplyOutcome::Failed { permanent: false, .. } => {
                self.schedule_retry(now_ms, reply.shard, out);
                self.drive(now_ms, out);
            }
            ApplyOutcome::Failed { permanent: true, cause } => {
                let backup_id = running.chain.get(running.increment).backup_id;
                let error = RestoreError::Shard { increment: running.increment, backup_id, shard: reply.shard, cause };
                self.fail(now_ms, error, out);
            }
        }
    }

    fn on_shard_done(&mut self, now_ms: u64, shard: ShardId, out: &mut Vec<CoordinatorOutput>) {
        let bug = self.config.bug;
        let shard_count = self.durable.operation.as_ref().expect("replies need an operation").shard_count;
        let running = self.running_mut().expect("only a running operation takes replies");
        running.done.insert(shard);
        running.retries.remove(&shard);
        if bug == Some(CoordinatorBug::AdvanceOnFirstReport) {
            running.done.extend((0..shard_count).map(ShardId));
        }
        let increment_done = running.done.len() == shard_count as usize;
        if !increment_done {
            // The result is durable before anything else happens, so a reboot re-sends only to shards without one.
            self.persist(out);
        }
        self.drive(now_ms, out);
    }

    /// Advances through completed increments and dispatches requests up to the cap. Persists before any send
    /// that depends on a state change.
    fn drive(&mut self, now_ms: u64, out: &mut Vec<CoordinatorOutput>) {
        let shard_count = match &self.durable.operation {
            Some(op) => op.shard_count,
            None => return,
        };
        let Some(running) = self.running_mut() else { return };
        if running.done.len() == shard_count as usize {
            if running.increment == running.chain.last_index() {
                self.finish(now_ms, out);
                return;
            }
            running.increment += 1;
            running.done.clear();
            running.retries.clear();
            self.in_flight.clear();
            self.persist(out);
        }
        self.dispatch(now_ms, shard_count, out);
    }

    fn dispatch(&mut self, now_ms: u64, shard_count: u32, out: &mut Vec<CoordinatorOutput>) {
        let op = self.durable.operation.as_ref().expect("dispatch needs an operation").op;
        let generation = self.durable.generation;
        let mut earliest_retry: Option<u64> = None;
        let mut to_send = Vec::new();
        {
            let running = self.running().expect("dispatch needs a running operation");
            let mut free = (self.config.max_in_flight_shards as usize).saturating_sub(self.in_flight.len());
            for shard in (0..shard_count).map(ShardId) {
                if running.done.contains(&shard) || self.in_flight.contains_key(&shard) {
                    continue;
                }
                if let Some(retry) = running.retries.get(&shard)
                    && retry.not_before_ms > now_ms
                {
                    earliest_retry = Some(earliest_retry.map_or(retry.not_before_ms, |t| t.min(retry.not_before_ms)));
                    continue;
                }
                if free == 0 {
                    break;
                }
                free -= 1;
                to_send.push(shard);
            }
        }
        for shard in to_send {
            let attempt = self.next_attempt;
            self.next_attempt += 1;
            self.in_flight.insert(shard, InFlight { attempt });
            let running = self.running().expect("still running");
            let manifest = running.chain.get(running.increment);
            let request = ApplyRequest {
                op,
                generation,
                attempt,
                increment: running.increment,
                backup_id: manifest.backup_id,
                kind: manifest.kind,
                shard,
                object: manifest.shard_objects[shard.0 as usize].clone(),
            };
            let timeout_at = now_ms.saturating_add(self.config.request_timeout_ms);
            let increment = running.increment;
            out.push(Output::Send { to: NodeAddr::Shard(shard), msg: Message::Apply(request) });
            out.push(Output::SetTimer {
                at_ms: timeout_at,
                timer: CoordinatorTimer::RequestTimeout { shard, increment, attempt },
            });
        }
        if let Some(at_ms) = earliest_retry {
            out.push(Output::SetTimer { at_ms, timer: CoordinatorTimer::RetryDue });
        }
    }

    fn schedule_retry(&mut self, now_ms: u64, shard: ShardId, out: &mut Vec<CoordinatorOutput>) {
        let base = self.config.backoff_base_ms;
        let cap = self.config.backoff_cap_ms;
        let running = self.running().expect("retries need a running operation");
        let failed_attempts = running.retries.get(&shard).map_or(0, |r| r.failed_attempts) + 1;
        let backoff = backoff_ms(base, cap, failed_attempts);
        // Full jitter over the upper half keeps retries of many shards from marching in step.
        let jitter = self.rng.below(backoff / 2 + 1);
        let not_before_ms = now_ms + backoff / 2 + jitter;
        let running = self.running_mut().expect("still running");
        running.retries.insert(shard, Retry { failed_attempts, not_before_ms });
        self.persist(out);
        out.push(Output::SetTimer { at_ms: not_before_ms, timer: CoordinatorTimer::RetryDue });
    }

    fn on_deadline(&mut self, now_ms: u64, out: &mut Vec<CoordinatorOutput>) {
        let Some(operation) = &self.durable.operation else { return };
        if now_ms < operation.deadline_at_ms {
            return;
        }
        let Some(running) = self.running() else { return };
        let pending = operation.shard_count - u32::try_from(running.done.len()).expect("fits");
        let error = RestoreError::DeadlineExceeded { increment: running.increment, pending };
        self.fail(now_ms, error, out);
    }

    fn finish(&mut self, now_ms: u64, out: &mut Vec<CoordinatorOutput>) {
        let operation = self.durable.operation.as_mut().expect("finish needs an operation");
        let OperationStatus::Running(running) = &operation.status else { panic!("finish needs a running operation") };
        let increments = running.chain.len();
        operation.status = OperationStatus::Done { increments, finished_at_ms: now_ms };
        self.in_flight.clear();
        let op = operation.op;
        self.persist(out);
        out.push(Output::Report(format!("operation {op} done: {increments} increments applied on every shard")));
    }

    fn fail(&mut self, now_ms: u64, error: RestoreError, out: &mut Vec<CoordinatorOutput>) {
        let operation = self.durable.operation.as_mut().expect("fail needs an operation");
        let op = operation.op;
        let message = format!("operation {op} failed: {error}");
        operation.status = OperationStatus::Failed { error, failed_at_ms: now_ms };
        self.in_flight.clear();
        self.persist(out);
        out.push(Output::Report(message));
    }

    fn persist(&self, out: &mut Vec<CoordinatorOutput>) {
        out.push(self.persist_output());
    }

    fn persist_output(&self) -> CoordinatorOutput {
        Output::Persist { state: self.durable.clone(), note: PersistNote::Coordinator(self.progress()) }
    }

    fn running(&self) -> Option<&RunningState> {
        match &self.durable.operation.as_ref()?.status {
            OperationStatus::Running(running) => Some(running),
            _ => None,
        }
    }

    fn running_mut(&mut self) -> Option<&mut RunningState> {
        match &mut self.durable.operation.as_mut()?.status {
            OperationStatus::Running(running) => Some(running),
            _ => None,
        }
    }
}

/// Capped exponential backoff before retry number `failed_attempts` (1-based).
pub fn backoff_ms(base_ms: u64, cap_ms: u64, failed_attempts: u32) -> u64 {
    assert!(failed_attempts >= 1, "backoff follows at least one failure");
    let shift = (failed_attempts - 1).min(32);
    base_ms.saturating_mul(1u64 << shift).min(cap_ms)
}

/// The progress summary of a durable coordinator state.
pub fn progress_of(durable: &CoordinatorDurable) -> ProgressMark {
    match &durable.operation {
        None => ProgressMark::Idle,
        Some(operation) => match &operation.status {
            OperationStatus::Running(running) => ProgressMark::Running {
                op: operation.op,
                increment: running.increment,
                shards_done: u32::try_from(running.done.len()).expect("fits"),
            },
            OperationStatus::Done { increments, .. } => {
                ProgressMark::Done { op: operation.op, increments: *increments }
            }
            OperationStatus::Failed { .. } => ProgressMark::Failed { op: operation.op },
        },
    }
}
