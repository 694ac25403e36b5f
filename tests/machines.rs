//! Unit tests of the two pure state machines, driven by hand: every input is a method call with the time as an
//! argument, every assertion is on the returned outputs or on the machine's durable state.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use lockstep::bundle::Bundle;
use lockstep::coordinator::{
    AttemptFailure, Coordinator, CoordinatorBug, CoordinatorConfig, CoordinatorDurable, CoordinatorOutput,
    CoordinatorTimer, OperationStatus, ProgressMark, RestoreError, RestoreRequest, Retry, RunningState, SegmentRequest,
    StartError, TabletNotDone, backoff_ms,
};
use lockstep::io::range_of;
use lockstep::model::{BackupKind, BackupManifest, ChainError, Change, SortedRows, TableId, TableSpec, TabletId};
use lockstep::protocol::{
    ApplyOutcome, ApplyReply, ApplyRequest, BundleOf, DownloadRequest, DownloadResult, Message, NodeAddr, OperationId,
    Output, PersistNote, RangeRead, ShardFailure, ShardFailureKind, StoreError,
};
use lockstep::shard::{Shard, ShardBug, ShardConfig, ShardDurable, ShardOutput, ShardTimer};

// ---------------------------------------------------------------------------------------------------------------
// Coordinator helpers
// ---------------------------------------------------------------------------------------------------------------

const OP: OperationId = 7;
const SEED: u64 = 42;

fn coordinator_config() -> CoordinatorConfig {
    CoordinatorConfig {
        max_in_flight_shards: 8,
        request_timeout_ms: 1_000,
        backoff_base_ms: 100,
        backoff_cap_ms: 800,
        deadline_ms: 60_000,
        ..CoordinatorConfig::default()
    }
}

/// Shard `shard` of the one table these tests restore.
fn tablet(shard: u32) -> TabletId {
    TabletId::new(0, shard)
}

fn table_spec(shard_count: u32) -> TableSpec {
    TableSpec { id: TableId(0), name: "orders".to_string(), shard_count, index_of: None }
}

fn manifest(backup_id: u64, kind: BackupKind, shard_count: u32) -> BackupManifest {
    BackupManifest {
        backup_id,
        kind,
        taken_at_ms: backup_id * 10,
        tables: [(TableId(0), (0..shard_count).map(|s| BackupManifest::object_name(backup_id, tablet(s))).collect())]
            .into_iter()
            .collect(),
    }
}

/// A catalog whose restore chain is backup 1 (full), then backups 2..=increments (incrementals).
fn restore_request(op: OperationId, shard_count: u32, increments: u32) -> RestoreRequest {
    let catalog = (1..=u64::from(increments))
        .map(|id| manifest(id, if id == 1 { BackupKind::Full } else { BackupKind::Incremental }, shard_count))
        .collect();
    RestoreRequest {
        op,
        collection: "backups".to_string(),
        tables: vec![table_spec(shard_count)],
        catalog,
        until_ms: None,
        last_segment: true,
    }
}

fn booted(config: CoordinatorConfig) -> Coordinator {
    Coordinator::boot(config, None, SEED, 0).0
}

/// A coordinator that has started `OP` at `now_ms`, and the requests the start sent.
fn started(
    config: CoordinatorConfig,
    shard_count: u32,
    increments: u32,
    now_ms: u64,
) -> (Coordinator, Vec<ApplyRequest>) {
    let mut coordinator = booted(config);
    let out = coordinator.start(now_ms, restore_request(OP, shard_count, increments)).expect("start succeeds");
    (coordinator, apply_requests(&out))
}

/// The apply requests among `out`, in order; each one is addressed to the shard it names.
fn apply_requests(out: &[CoordinatorOutput]) -> Vec<ApplyRequest> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { to, msg: Message::Apply(request) } => {
                assert_eq!(*to, NodeAddr::Shard(request.tablet), "request sent to the shard it names");
                Some(request.clone())
            }
            _ => None,
        })
        .collect()
}

fn shards_of(requests: &[ApplyRequest]) -> Vec<u32> {
    requests.iter().map(|r| r.tablet.shard.0).collect()
}

fn persisted(out: &[CoordinatorOutput]) -> Vec<CoordinatorDurable> {
    out.iter()
        .filter_map(|o| match o {
            Output::Persist { state, .. } => Some(state.clone()),
            _ => None,
        })
        .collect()
}

fn last_persisted(out: &[CoordinatorOutput]) -> CoordinatorDurable {
    persisted(out).pop().expect("the outputs hold a persist")
}

fn timers(out: &[CoordinatorOutput]) -> Vec<(u64, CoordinatorTimer)> {
    out.iter()
        .filter_map(|o| match o {
            Output::SetTimer { at_ms, timer } => Some((*at_ms, timer.clone())),
            _ => None,
        })
        .collect()
}

fn retry_due_at(out: &[CoordinatorOutput]) -> Vec<u64> {
    timers(out).into_iter().filter(|(_, t)| *t == CoordinatorTimer::RetryDue).map(|(at, _)| at).collect()
}

fn first_persist_index(out: &[CoordinatorOutput]) -> Option<usize> {
    out.iter().position(|o| matches!(o, Output::Persist { .. }))
}

fn first_send_index(out: &[CoordinatorOutput]) -> Option<usize> {
    out.iter().position(|o| matches!(o, Output::Send { .. }))
}

fn answer(request: &ApplyRequest, outcome: ApplyOutcome) -> ApplyReply {
    request.reply(outcome)
}

/// Delivers the shard's reply to `request`, from that shard.
fn reply(
    coordinator: &mut Coordinator,
    now_ms: u64,
    request: &ApplyRequest,
    outcome: ApplyOutcome,
) -> Vec<CoordinatorOutput> {
    coordinator.handle_message(now_ms, NodeAddr::Shard(request.tablet), Message::Reply(answer(request, outcome)))
}

fn transient() -> ApplyOutcome {
    ApplyOutcome::Failed { permanent: false, cause: ShardFailure::BadBundle { detail: "checksum mismatch".into() } }
}

fn running(coordinator: &Coordinator) -> &RunningState {
    match &coordinator.operation(OP).expect("an operation").status {
        OperationStatus::Running(running) => running,
        other => panic!("expected a running operation, got {other:?}"),
    }
}

fn running_of(durable: &CoordinatorDurable) -> &RunningState {
    match &durable.operations.get(&OP).expect("an operation").status {
        OperationStatus::Running(running) => running,
        other => panic!("expected a running operation, got {other:?}"),
    }
}

fn done_set(shards: &[u32]) -> BTreeSet<TabletId> {
    shards.iter().copied().map(tablet).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: start, boot, in-flight cap
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_boot_bumps_the_generation_and_persists_it_before_anything_else() {
    let (coordinator, out) = Coordinator::boot(coordinator_config(), None, SEED, 0);
    assert_eq!(coordinator.generation(), 1);
    assert_eq!(out.len(), 1, "an idle first boot only persists: {out:?}");
    assert_eq!(last_persisted(&out), CoordinatorDurable { generation: 1, ..CoordinatorDurable::default() });
    assert_eq!(coordinator.progress(), Vec::<ProgressMark>::new());

    let (again, out) = Coordinator::boot(coordinator_config(), Some(coordinator.durable().clone()), SEED, 0);
    assert_eq!(again.generation(), 2);
    assert_eq!(last_persisted(&out).generation, 2);
}

#[test]
fn coordinator_start_persists_the_operation_before_it_sends_any_request() {
    let mut coordinator = booted(coordinator_config());
    let out = coordinator.start(1_000, restore_request(OP, 3, 2)).unwrap();

    let persist_at = first_persist_index(&out).expect("start persists");
    let send_at = first_send_index(&out).expect("start sends");
    assert!(persist_at < send_at, "persist at {persist_at} must precede the first send at {send_at}: {out:?}");

    let state = &persisted(&out)[0];
    let operation = state.operations.get(&OP).expect("the persisted state holds the operation");
    assert_eq!(operation.op, OP);
    assert_eq!(operation.tables, vec![table_spec(3)]);
    assert_eq!(operation.started_at_ms, 1_000);
    assert_eq!(operation.deadline_at_ms, 61_000);
    let running = running_of(state);
    assert_eq!(running.increment, 0);
    assert!(running.done.is_empty());
    assert_eq!(running.chain.len(), 2);
    assert!(out.contains(&Output::SetTimer { at_ms: 61_000, timer: CoordinatorTimer::Deadline { op: OP } }));

    let requests = apply_requests(&out);
    assert_eq!(shards_of(&requests), vec![0, 1, 2]);
    for request in &requests {
        assert_eq!(request.op, OP);
        assert_eq!(request.generation, 1);
        assert_eq!(request.increment, 0);
        assert_eq!(request.backup_id, 1);
        assert_eq!(request.kind, BackupKind::Full);
        assert_eq!(request.object, BackupManifest::object_name(1, request.tablet));
        let timeout =
            CoordinatorTimer::RequestTimeout { op: OP, tablet: request.tablet, increment: 0, attempt: request.attempt };
        assert!(out.contains(&Output::SetTimer { at_ms: 2_000, timer: timeout }), "each request has a timeout");
    }
    let attempts: BTreeSet<u32> = requests.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts.len(), requests.len(), "every request has its own attempt number");
}

#[test]
fn coordinator_refuses_a_restore_without_shards_or_without_a_full_backup() {
    let mut coordinator = booted(coordinator_config());
    assert_eq!(coordinator.start(0, restore_request(OP, 0, 1)), Err(StartError::NoShards { table: TableId(0) }));
    let only_incremental = RestoreRequest {
        op: OP,
        collection: "backups".to_string(),
        tables: vec![table_spec(1)],
        catalog: vec![manifest(2, BackupKind::Incremental, 1)].into(),
        until_ms: None,
        last_segment: true,
    };
    assert_eq!(coordinator.start(0, only_incremental), Err(StartError::Chain(ChainError::NoFullBackup)));
    assert_eq!(coordinator.durable(), &CoordinatorDurable { generation: 1, ..CoordinatorDurable::default() });
}

#[test]
fn coordinator_keeps_at_most_max_in_flight_shards_requests_outstanding() {
    let config = CoordinatorConfig { max_in_flight_shards: 2, ..coordinator_config() };
    let (mut coordinator, first) = started(config, 5, 2, 0);
    assert_eq!(shards_of(&first), vec![0, 1], "only two of five shards get a request");

    // Answer the oldest outstanding request each step; the cap must hold and be used fully while work remains.
    let mut outstanding: Vec<ApplyRequest> = first;
    let mut sent_per_increment = [0u32; 2];
    for request in &outstanding {
        sent_per_increment[request.increment as usize] += 1;
    }
    let mut now = 0;
    while !outstanding.is_empty() {
        now += 10;
        let request = outstanding.remove(0);
        let out = reply(&mut coordinator, now, &request, ApplyOutcome::Applied);
        let sent = apply_requests(&out);
        for request in &sent {
            sent_per_increment[request.increment as usize] += 1;
        }
        outstanding.extend(sent);
        assert!(outstanding.len() <= 2, "{} requests outstanding, cap is 2", outstanding.len());
        let pending_in_increment = match coordinator.operation(OP).unwrap().status {
            OperationStatus::Running(ref r) => 5 - r.done.len(),
            _ => 0,
        };
        assert_eq!(outstanding.len(), pending_in_increment.min(2), "the cap is used fully while shards are pending");
    }
    assert_eq!(sent_per_increment, [5, 5], "every shard got exactly one request per increment");
    assert!(matches!(coordinator.operation(OP).unwrap().status, OperationStatus::Done { .. }));
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: increments in lockstep, done
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_does_not_advance_until_every_shard_reported_the_increment() {
    let (mut coordinator, requests) = started(coordinator_config(), 3, 2, 0);

    let out = reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    assert!(apply_requests(&out).is_empty(), "no increment 1 after one of three reports: {out:?}");
    assert_eq!(running_of(&last_persisted(&out)).done, done_set(&[0]), "the result is persisted");
    let out = reply(&mut coordinator, 20, &requests[2], ApplyOutcome::AlreadyApplied);
    assert!(apply_requests(&out).is_empty(), "no increment 1 after two of three reports: {out:?}");
    assert_eq!(running(&coordinator).increment, 0);
    assert_eq!(running(&coordinator).done, done_set(&[0, 2]));
    assert_eq!(coordinator.progress(), vec![ProgressMark::Running { op: OP, increment: 0, tablets_done: 2 }]);

    let out = reply(&mut coordinator, 30, &requests[1], ApplyOutcome::Applied);
    let next = apply_requests(&out);
    assert_eq!(shards_of(&next), vec![0, 1, 2], "the last report starts increment 1 on every shard");
    for request in &next {
        assert_eq!(request.increment, 1);
        assert_eq!(request.backup_id, 2);
        assert_eq!(request.kind, BackupKind::Incremental);
        assert_eq!(request.object, BackupManifest::object_name(2, request.tablet));
    }
    let persist_at = first_persist_index(&out).expect("advancing persists");
    assert!(persist_at < first_send_index(&out).unwrap(), "the advance is durable before increment 1 is sent");
    let advanced = running_of(&persisted(&out)[0]).clone();
    assert_eq!(advanced.increment, 1);
    assert!(advanced.done.is_empty());
}

#[test]
fn coordinator_is_done_after_the_last_increment_with_working_state_gone_and_status_queryable() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 2, 0);
    reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    let out = reply(&mut coordinator, 20, &requests[1], ApplyOutcome::Applied);
    let last_increment = apply_requests(&out);
    assert_eq!(shards_of(&last_increment), vec![0, 1]);

    let out = reply(&mut coordinator, 30, &last_increment[0], ApplyOutcome::Applied);
    assert!(matches!(coordinator.operation(OP).unwrap().status, OperationStatus::Running(_)), "one shard still owes");
    assert!(apply_requests(&out).is_empty());
    let out = reply(&mut coordinator, 40, &last_increment[1], ApplyOutcome::Applied);
    assert!(apply_requests(&out).is_empty(), "nothing is sent after the last increment: {out:?}");

    let done = OperationStatus::Done { increments: 2, finished_at_ms: 40 };
    let state = last_persisted(&out);
    assert_eq!(state.operations[&OP].status, done, "Done replaces the working state and is persisted");
    assert_eq!(coordinator.operation(OP).unwrap().status, done);
    assert_eq!(coordinator.operation(OP).unwrap().op, OP);
    assert_eq!(coordinator.progress(), vec![ProgressMark::Done { op: OP, increments: 2 }]);
    assert!(out.iter().any(|o| matches!(o, Output::Report(text) if text.contains("done"))));

    // Late replies, timers and a reboot leave a finished operation alone.
    assert!(reply(&mut coordinator, 50, &last_increment[1], ApplyOutcome::Applied).is_empty());
    assert!(coordinator.handle_timer(60_000, CoordinatorTimer::Deadline { op: OP }).is_empty());
    let (rebooted, out) = Coordinator::boot(coordinator_config(), Some(state), SEED, 100);
    assert!(apply_requests(&out).is_empty(), "a done operation is not resumed: {out:?}");
    assert_eq!(rebooted.operation(OP).unwrap().status, done, "the status survives a reboot");
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: retries, backoff, timeouts
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_retries_a_transient_failure_after_a_backoff_between_half_and_full() {
    let mut jitters = BTreeSet::new();
    for seed in 0..64 {
        let mut coordinator = Coordinator::boot(coordinator_config(), None, seed, 0).0;
        let requests = apply_requests(&coordinator.start(0, restore_request(OP, 2, 1)).unwrap());
        let now = 1_000;
        let out = reply(&mut coordinator, now, &requests[0], transient());
        assert!(apply_requests(&out).is_empty(), "a failed shard is not re-sent at once: {out:?}");

        let retry = running_of(&last_persisted(&out)).retries[&tablet(0)];
        assert_eq!(retry.failed_attempts, 1);
        let delay = retry.not_before_ms - now;
        assert!((50..=100).contains(&delay), "seed {seed}: backoff {delay} ms outside [50, 100]");
        assert!(retry_due_at(&out).contains(&retry.not_before_ms), "a RetryDue timer at the backoff's end");
        jitters.insert(delay);

        if retry.not_before_ms > now + 1 {
            let early = coordinator.handle_timer(retry.not_before_ms - 1, CoordinatorTimer::RetryDue);
            assert!(apply_requests(&early).is_empty(), "seed {seed}: re-sent before the backoff ended");
        }
        let out = coordinator.handle_timer(retry.not_before_ms, CoordinatorTimer::RetryDue);
        let resent = apply_requests(&out);
        assert_eq!(shards_of(&resent), vec![0], "seed {seed}: the failed shard is re-sent when its backoff ends");
        assert_eq!(resent[0].increment, 0);
        assert_ne!(resent[0].attempt, requests[0].attempt, "a retry has a fresh attempt number");
        assert_ne!(resent[0].attempt, requests[1].attempt, "a retry has a fresh attempt number");
    }
    assert!(jitters.len() > 1, "the backoff is jittered by the seed, got only {jitters:?}");
}

#[test]
fn coordinator_backoff_is_capped_exponential() {
    assert_eq!((1..=6).map(|n| backoff_ms(100, 800, n)).collect::<Vec<_>>(), vec![100, 200, 400, 800, 800, 800]);
    assert_eq!(backoff_ms(100, 5_000, 40), 5_000, "a long failure streak stays at the cap");
    assert_eq!(backoff_ms(u64::MAX / 2, u64::MAX, 3), u64::MAX, "no overflow");
    assert_eq!(backoff_ms(100, 5_000, u32::MAX), 5_000);
}

#[test]
fn coordinator_backs_off_longer_on_every_failure_of_the_same_shard_up_to_the_cap() {
    let (mut coordinator, requests) = started(coordinator_config(), 1, 1, 0);
    let mut request = requests[0].clone();
    let mut now = 0;
    for (failure, expected) in [100u64, 200, 400, 800, 800, 800].into_iter().enumerate() {
        now += 10;
        let out = reply(&mut coordinator, now, &request, transient());
        let retry = running_of(&last_persisted(&out)).retries[&tablet(0)];
        assert_eq!(retry.failed_attempts, failure as u32 + 1);
        let delay = retry.not_before_ms - now;
        assert!(
            (expected / 2..=expected).contains(&delay),
            "failure {}: delay {delay} outside [{}, {expected}]",
            failure + 1,
            expected / 2
        );
        now = retry.not_before_ms;
        let resent = apply_requests(&coordinator.handle_timer(now, CoordinatorTimer::RetryDue));
        assert_eq!(resent.len(), 1);
        request = resent[0].clone();
    }
    let out = reply(&mut coordinator, now + 1, &request, ApplyOutcome::Applied);
    assert!(matches!(last_persisted(&out).operations[&OP].status, OperationStatus::Done { .. }));
}

#[test]
fn coordinator_retries_a_timed_out_request_and_never_counts_it_as_success() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 1, 0);
    let timed_out = &requests[0];
    let timer =
        CoordinatorTimer::RequestTimeout { op: OP, tablet: tablet(0), increment: 0, attempt: timed_out.attempt };

    let out = coordinator.handle_timer(1_000, timer.clone());
    let state = last_persisted(&out);
    let running = running_of(&state);
    assert!(!running.done.contains(&tablet(0)), "a missing reply is not success");
    assert_eq!(running.retries[&tablet(0)].failed_attempts, 1);
    let not_before = running.retries[&tablet(0)].not_before_ms;
    assert!((1_050..=1_100).contains(&not_before), "timeout retried after a backoff, got {not_before}");
    assert!(retry_due_at(&out).contains(&not_before));
    assert!(apply_requests(&out).is_empty());

    // The same timer again, or a late reply to the abandoned attempt, changes nothing.
    assert!(coordinator.handle_timer(1_001, timer).is_empty());
    assert!(reply(&mut coordinator, 1_002, timed_out, ApplyOutcome::Applied).is_empty());
    assert!(!running_of(coordinator.durable()).done.contains(&tablet(0)));

    let resent = apply_requests(&coordinator.handle_timer(not_before, CoordinatorTimer::RetryDue));
    assert_eq!(shards_of(&resent), vec![0]);
    reply(&mut coordinator, not_before + 1, &requests[1], ApplyOutcome::Applied);
    let out = reply(&mut coordinator, not_before + 2, &resent[0], ApplyOutcome::AlreadyApplied);
    assert!(matches!(last_persisted(&out).operations[&OP].status, OperationStatus::Done { .. }));
}

#[test]
fn coordinator_ignores_a_request_timeout_once_the_request_was_answered() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 2, 0);
    reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    let before = coordinator.durable().clone();
    let timer =
        CoordinatorTimer::RequestTimeout { op: OP, tablet: tablet(0), increment: 0, attempt: requests[0].attempt };
    assert!(coordinator.handle_timer(1_000, timer).is_empty());
    assert_eq!(coordinator.durable(), &before);

    // A timeout of increment 0 that fires after the advance is ignored too.
    let next = apply_requests(&reply(&mut coordinator, 20, &requests[1], ApplyOutcome::Applied));
    let before = coordinator.durable().clone();
    let stale =
        CoordinatorTimer::RequestTimeout { op: OP, tablet: tablet(1), increment: 0, attempt: requests[1].attempt };
    assert!(coordinator.handle_timer(1_000, stale).is_empty());
    assert_eq!(coordinator.durable(), &before);
    assert!(running(&coordinator).retries.is_empty());
    assert_eq!(next.len(), 2);
}

#[test]
fn coordinator_fails_on_a_permanent_failure_naming_increment_backup_and_shard() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 3, 0);
    reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    let second = apply_requests(&reply(&mut coordinator, 20, &requests[1], ApplyOutcome::Applied));
    assert_eq!(second[1].increment, 1);

    let cause = ShardFailure::ObjectMissing { object: second[1].object.clone() };
    let out = reply(&mut coordinator, 30, &second[1], ApplyOutcome::Failed { permanent: true, cause: cause.clone() });
    let expected = RestoreError::Shard { increment: 1, backup_id: 2, tablet: tablet(1), cause };
    let failed = OperationStatus::Failed { error: expected.clone(), failed_at_ms: 30 };
    assert_eq!(last_persisted(&out).operations[&OP].status, failed, "the failure is persisted");
    assert_eq!(coordinator.operation(OP).unwrap().status, failed);
    assert_eq!(coordinator.progress(), vec![ProgressMark::Failed { op: OP }]);
    assert!(apply_requests(&out).is_empty());
    let text = expected.to_string();
    assert!(text.contains("increment 1") && text.contains("backup 2") && text.contains("shard-1"), "{text}");
    assert!(out.iter().any(|o| matches!(o, Output::Report(r) if r.contains(&text))), "the failure is reported");

    // Nothing moves a failed operation any more.
    assert!(reply(&mut coordinator, 40, &second[0], ApplyOutcome::Applied).is_empty());
    assert!(coordinator.handle_timer(50, CoordinatorTimer::RetryDue).is_empty());
    assert_eq!(coordinator.operation(OP).unwrap().status, failed);
}

#[test]
fn coordinator_fails_with_deadline_exceeded_when_the_deadline_passes() {
    let (mut coordinator, requests) = started(coordinator_config(), 3, 2, 1_000);
    reply(&mut coordinator, 10, &requests[2], ApplyOutcome::Applied);

    assert!(
        coordinator.handle_timer(60_999, CoordinatorTimer::Deadline { op: OP }).is_empty(),
        "an early deadline timer is ignored"
    );
    assert!(matches!(coordinator.operation(OP).unwrap().status, OperationStatus::Running(_)));

    let out = coordinator.handle_timer(61_000, CoordinatorTimer::Deadline { op: OP });
    let not_done = vec![
        TabletNotDone { tablet: tablet(0), failed_attempts: 0, last_failure: None },
        TabletNotDone { tablet: tablet(1), failed_attempts: 0, last_failure: None },
    ];
    let error = RestoreError::DeadlineExceeded { increment: 0, not_done };
    let text = error.to_string();
    assert!(text.ends_with("not done: t0/shard-0 (no failed attempt), t0/shard-1 (no failed attempt)"), "{text}");
    let failed = OperationStatus::Failed { error, failed_at_ms: 61_000 };
    assert_eq!(last_persisted(&out).operations[&OP].status, failed);
    assert!(apply_requests(&out).is_empty());
    assert!(reply(&mut coordinator, 61_001, &requests[0], ApplyOutcome::Applied).is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: stale and misdirected replies
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_ignores_replies_of_an_older_generation() {
    let (coordinator, old_requests) = started(coordinator_config(), 2, 1, 0);
    let (mut rebooted, out) = Coordinator::boot(coordinator_config(), Some(coordinator.durable().clone()), SEED, 500);
    let new_requests = apply_requests(&out);
    assert_eq!(new_requests[0].generation, 2);
    // Attempt numbers restart with the generation, so only the generation tells these two replies apart.
    assert_eq!(new_requests[0].attempt, old_requests[0].attempt);

    let before = rebooted.durable().clone();
    assert!(reply(&mut rebooted, 600, &old_requests[0], ApplyOutcome::Applied).is_empty());
    let old_failure = ApplyOutcome::Failed { permanent: true, cause: ShardFailure::BadBundle { detail: "x".into() } };
    assert!(reply(&mut rebooted, 600, &old_requests[1], old_failure).is_empty(), "an old permanent failure too");
    assert_eq!(rebooted.durable(), &before);

    let out = reply(&mut rebooted, 700, &new_requests[0], ApplyOutcome::Applied);
    assert_eq!(running_of(&last_persisted(&out)).done, done_set(&[0]), "the current generation's reply counts");
}

#[test]
fn coordinator_ignores_replies_with_a_wrong_attempt_increment_op_or_sender() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 2, 0);
    let request = &requests[0];
    let before = coordinator.durable().clone();
    let from = NodeAddr::Shard(tablet(0));

    let wrong_attempt = ApplyReply { attempt: requests[1].attempt, ..answer(request, ApplyOutcome::Applied) };
    assert!(coordinator.handle_message(10, from, Message::Reply(wrong_attempt)).is_empty());
    let wrong_increment = ApplyReply { increment: 1, ..answer(request, ApplyOutcome::Applied) };
    assert!(coordinator.handle_message(10, from, Message::Reply(wrong_increment)).is_empty());
    let wrong_op = ApplyReply { op: OP + 1, ..answer(request, ApplyOutcome::Applied) };
    assert!(coordinator.handle_message(10, from, Message::Reply(wrong_op)).is_empty());
    let impostor = NodeAddr::Shard(tablet(1));
    assert!(
        coordinator.handle_message(10, impostor, Message::Reply(answer(request, ApplyOutcome::Applied))).is_empty()
    );
    let from_coordinator = Message::Reply(answer(request, ApplyOutcome::Applied));
    assert!(coordinator.handle_message(10, NodeAddr::Coordinator, from_coordinator).is_empty());
    assert!(coordinator.handle_message(10, from, Message::Apply(request.clone())).is_empty(), "apply is not for it");
    let stray = DownloadResult {
        download_id: 1,
        object: request.object.clone(),
        offset: 0,
        outcome: Err(StoreError::Unavailable { detail: "x".into() }),
    };
    assert!(coordinator.handle_download(10, stray).is_empty());
    assert_eq!(coordinator.durable(), &before, "none of those replies changed anything");

    let out = reply(&mut coordinator, 20, request, ApplyOutcome::Applied);
    assert_eq!(running_of(&last_persisted(&out)).done, done_set(&[0]), "the genuine reply still counts");
}

#[test]
fn coordinator_fails_at_once_when_a_shard_refuses_a_request_meant_for_another_tablet() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 2, 0);
    let request = &requests[0];
    // The address book sends tablet 0's requests to tablet 1's node, which refuses them. Retrying would reach the
    // same node again until a deadline; the refusal, from the node it reached, ends the operation at once.
    let wrong_node = NodeAddr::Shard(tablet(1));
    let cause = ShardFailure::WrongShard { requested: tablet(0), actual: tablet(1) };
    let refusal = answer(request, ApplyOutcome::Failed { permanent: true, cause: cause.clone() });

    let before = coordinator.durable().clone();
    let claims_success = Message::Reply(answer(request, ApplyOutcome::Applied));
    assert!(coordinator.handle_message(10, wrong_node, claims_success).is_empty(), "only the refusal counts");
    let misnamed = ShardFailure::WrongShard { requested: tablet(0), actual: tablet(0) };
    let no_refusal = answer(request, ApplyOutcome::Failed { permanent: true, cause: misnamed });
    assert!(coordinator.handle_message(10, wrong_node, Message::Reply(no_refusal)).is_empty());
    let third = NodeAddr::Shard(tablet(5));
    assert!(coordinator.handle_message(10, third, Message::Reply(refusal.clone())).is_empty(), "not from tablet 1");
    assert_eq!(coordinator.durable(), &before, "none of those replies changed anything");

    let out = coordinator.handle_message(20, wrong_node, Message::Reply(refusal));
    let error = RestoreError::Shard { increment: 0, backup_id: 1, tablet: tablet(0), cause };
    let failed = OperationStatus::Failed { error: error.clone(), failed_at_ms: 20 };
    assert_eq!(last_persisted(&out).operations[&OP].status, failed, "the failure is persisted");
    let text = error.to_string();
    assert!(text.contains("addressed to t0/shard-0 reached t0/shard-1"), "{text}");
}

#[test]
fn coordinator_deadline_failures_name_the_tablets_not_done_why_they_failed_and_the_limit_they_were_given() {
    let config = CoordinatorConfig { increment_deadline_ms: 5_000, request_timeout_ms: 1_000, ..coordinator_config() };
    let (mut coordinator, requests) = started(config.clone(), 4, 2, 0);
    reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    reply(&mut coordinator, 20, &requests[2], transient());
    let timeout = |r: &ApplyRequest| CoordinatorTimer::RequestTimeout {
        op: OP,
        tablet: r.tablet,
        increment: r.increment,
        attempt: r.attempt,
    };
    coordinator.handle_timer(1_000, timeout(&requests[3]));
    // A reboot with a longer limit: the increment under way keeps the deadline, and the limit, it began with.
    let longer = CoordinatorConfig { increment_deadline_ms: 9_000, ..config };
    let (mut rebooted, _) = Coordinator::boot(longer, Some(coordinator.durable().clone()), SEED, 100);
    assert!(rebooted.handle_timer(4_999, CoordinatorTimer::IncrementDeadline { op: OP, increment: 0 }).is_empty());
    let out = rebooted.handle_timer(5_000, CoordinatorTimer::IncrementDeadline { op: OP, increment: 0 });
    let not_done = vec![
        TabletNotDone { tablet: tablet(1), failed_attempts: 0, last_failure: None },
        TabletNotDone {
            tablet: tablet(2),
            failed_attempts: 1,
            last_failure: Some(AttemptFailure::Reported(ShardFailureKind::BadBundle)),
        },
        TabletNotDone { tablet: tablet(3), failed_attempts: 1, last_failure: Some(AttemptFailure::NoAnswer) },
    ];
    let error = RestoreError::IncrementDeadlineExceeded { increment: 0, limit_ms: 5_000, not_done };
    let failed = OperationStatus::Failed { error: error.clone(), failed_at_ms: 5_000 };
    assert_eq!(last_persisted(&out).operations[&OP].status, failed);
    assert_eq!(
        error.to_string(),
        "timeout: increment 0 took longer than 5000 ms with 3 tablet(s) not done: t0/shard-1 (no failed attempt), \
         t0/shard-2 (1 failed attempt: bundle rejected), t0/shard-3 (1 failed attempt: no answer in time)"
    );

    // Past four tablets the message says how many more there are.
    let last_failure = Some(AttemptFailure::Reported(ShardFailureKind::DownloadFailed));
    let many: Vec<TabletNotDone> =
        (0..6).map(|s| TabletNotDone { tablet: tablet(s), failed_attempts: 3, last_failure }).collect();
    let text = RestoreError::DeadlineExceeded { increment: 1, not_done: many }.to_string();
    assert!(text.ends_with("t0/shard-3 (3 failed attempts, the last: download failed) and 2 more"), "{text}");
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: reboot
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_resends_only_to_shards_without_a_result_after_reboot() {
    let (mut coordinator, requests) = started(coordinator_config(), 4, 2, 0);
    let mut last = None;
    for shard in [0, 2] {
        last = Some(last_persisted(&reply(&mut coordinator, 10, &requests[shard], ApplyOutcome::Applied)));
    }
    let durable = last.expect("replies persisted");
    assert_eq!(running_of(&durable).done, done_set(&[0, 2]));

    let (rebooted, out) = Coordinator::boot(coordinator_config(), Some(durable.clone()), SEED, 5_000);
    assert_eq!(rebooted.generation(), 2);
    let persist_at = first_persist_index(&out).expect("boot persists");
    assert_eq!(persist_at, 0, "the bumped generation is persisted before anything else: {out:?}");
    let bumped = &persisted(&out)[0];
    assert_eq!(bumped.generation, 2);
    assert_eq!(bumped.operations, durable.operations, "only the generation changed");

    let resent = apply_requests(&out);
    assert_eq!(shards_of(&resent), vec![1, 3], "shards 0 and 2 already have a result");
    assert!(resent.iter().all(|r| r.generation == 2 && r.increment == 0));
    assert!(
        out.contains(&Output::SetTimer { at_ms: 60_000, timer: CoordinatorTimer::Deadline { op: OP } }),
        "deadline re-armed"
    );
    for request in &resent {
        let timeout =
            CoordinatorTimer::RequestTimeout { op: OP, tablet: request.tablet, increment: 0, attempt: request.attempt };
        assert!(out.contains(&Output::SetTimer { at_ms: 6_000, timer: timeout }));
    }
}

#[test]
fn coordinator_keeps_a_persisted_backoff_across_a_reboot() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 1, 0);
    let out = reply(&mut coordinator, 100, &requests[0], transient());
    let durable = last_persisted(&out);
    let Retry { failed_attempts, last_failure, not_before_ms } = running_of(&durable).retries[&tablet(0)];
    assert_eq!(failed_attempts, 1);
    assert_eq!(last_failure, AttemptFailure::Reported(ShardFailureKind::BadBundle));

    // Rebooted before the backoff ended: shard 1 (still unanswered) is re-sent, shard 0 waits for its timer.
    let (mut rebooted, out) = Coordinator::boot(coordinator_config(), Some(durable), SEED, not_before_ms - 1);
    assert_eq!(shards_of(&apply_requests(&out)), vec![1]);
    assert!(retry_due_at(&out).contains(&not_before_ms));
    let resent = apply_requests(&rebooted.handle_timer(not_before_ms, CoordinatorTimer::RetryDue));
    assert_eq!(shards_of(&resent), vec![0]);
    let out = reply(&mut rebooted, not_before_ms + 1, &resent[0], transient());
    let retry = running_of(&last_persisted(&out)).retries[&tablet(0)];
    assert_eq!(retry.failed_attempts, 2, "the failure count survives the reboot, so the backoff keeps growing");
    assert!((100..=200).contains(&(retry.not_before_ms - (not_before_ms + 1))));
}

#[test]
fn coordinator_persists_every_change_of_its_durable_state_before_the_next_output() {
    let config = CoordinatorConfig { max_in_flight_shards: 2, ..coordinator_config() };
    let mut coordinator = booted(config);
    let mut last_durable = coordinator.durable().clone();
    let mut check = |coordinator: &Coordinator, out: &[CoordinatorOutput]| {
        if coordinator.durable() != &last_durable {
            assert_eq!(&last_persisted(out), coordinator.durable(), "a durable change was not persisted: {out:?}");
            last_durable = coordinator.durable().clone();
        }
    };
    let out = coordinator.start(0, restore_request(OP, 3, 2)).unwrap();
    check(&coordinator, &out);
    let mut outstanding = apply_requests(&out);
    let mut now = 0;
    let mut step = 0;
    while let Some(request) = outstanding.first().cloned() {
        now += 100;
        step += 1;
        let out = if step % 3 == 0 {
            // Every third request times out instead of being answered.
            outstanding.remove(0);
            let timer = CoordinatorTimer::RequestTimeout {
                op: OP,
                tablet: request.tablet,
                increment: request.increment,
                attempt: request.attempt,
            };
            let mut out = coordinator.handle_timer(now, timer);
            check(&coordinator, &out);
            now += 1_000;
            out.extend(coordinator.handle_timer(now, CoordinatorTimer::RetryDue));
            out
        } else {
            outstanding.remove(0);
            reply(&mut coordinator, now, &request, ApplyOutcome::Applied)
        };
        check(&coordinator, &out);
        outstanding.extend(apply_requests(&out));
        assert!(step < 100, "the restore does not finish");
    }
    assert_eq!(coordinator.progress(), vec![ProgressMark::Done { op: OP, increments: 2 }]);
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator: start idempotence, one operation at a time, the known bug
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_refuses_to_start_a_different_operation_while_one_runs() {
    let (mut coordinator, requests) = started(coordinator_config(), 1, 1, 0);
    let before = coordinator.durable().clone();
    assert_eq!(
        coordinator.start(10, restore_request(OP + 1, 1, 1)),
        Err(StartError::CollectionBusy { collection: "backups".to_string(), running: OP })
    );
    assert_eq!(coordinator.durable(), &before);

    // Once the running operation is done, its table holds rows: restoring onto it again is refused too.
    reply(&mut coordinator, 20, &requests[0], ApplyOutcome::Applied);
    assert_eq!(
        coordinator.start(30, restore_request(OP + 1, 1, 1)),
        Err(StartError::TargetNotEmpty { table: TableId(0) })
    );
}

#[test]
fn coordinator_treats_starting_the_same_operation_again_as_a_no_op() {
    let (mut coordinator, requests) = started(coordinator_config(), 2, 1, 0);
    reply(&mut coordinator, 5, &requests[0], ApplyOutcome::Applied);
    let before = coordinator.durable().clone();
    assert_eq!(coordinator.start(10, restore_request(OP, 2, 1)), Ok(Vec::new()));
    assert_eq!(coordinator.durable(), &before, "progress is kept");
    // The original in-flight request is still the one awaited.
    let out = reply(&mut coordinator, 20, &requests[1], ApplyOutcome::Applied);
    assert!(matches!(last_persisted(&out).operations[&OP].status, OperationStatus::Done { .. }));
    assert_eq!(coordinator.start(30, restore_request(OP, 2, 1)), Ok(Vec::new()), "also after it is done");
    assert!(matches!(coordinator.operation(OP).unwrap().status, OperationStatus::Done { .. }));
}

#[test]
fn coordinator_with_advance_on_first_report_bug_advances_after_the_first_report() {
    let (mut correct, requests) = started(coordinator_config(), 3, 2, 0);
    let out = reply(&mut correct, 10, &requests[0], ApplyOutcome::Applied);
    assert!(apply_requests(&out).is_empty());
    assert_eq!(running(&correct).increment, 0);

    let buggy_config = CoordinatorConfig { bug: Some(CoordinatorBug::AdvanceOnFirstReport), ..coordinator_config() };
    let (mut buggy, requests) = started(buggy_config, 3, 2, 0);
    let out = reply(&mut buggy, 10, &requests[0], ApplyOutcome::Applied);
    let next = apply_requests(&out);
    assert_eq!(shards_of(&next), vec![0, 1, 2], "the bug sends increment 1 although shards 1 and 2 never reported");
    assert!(next.iter().all(|r| r.increment == 1));
    assert_eq!(running_of(&last_persisted(&out)).increment, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Shard helpers
// ---------------------------------------------------------------------------------------------------------------

const SHARD: TabletId = TabletId::new(0, 3);

fn shard_config() -> ShardConfig {
    ShardConfig {
        download_chunk_bytes: 16,
        download_retry_ms: 50,
        max_download_failures: 3,
        max_retry_after_ms: 1_000,
        bug: None,
    }
}

fn fresh_shard(config: ShardConfig) -> Shard {
    Shard::boot(SHARD, config, None)
}

/// Increment `increment` of operation `op` is backup `increment + 1` in these tests.
fn apply_request(op: OperationId, increment: u32, attempt: u32) -> ApplyRequest {
    let backup_id = u64::from(increment) + 1;
    ApplyRequest {
        op,
        generation: 1,
        attempt,
        increment,
        backup_id,
        kind: if increment == 0 { BackupKind::Full } else { BackupKind::Incremental },
        tablet: SHARD,
        object: BackupManifest::object_name(backup_id, SHARD),
    }
}

fn bundle_for(request: &ApplyRequest, changes: Vec<Change>) -> Vec<u8> {
    Bundle { backup_id: request.backup_id, tablet: request.tablet, kind: request.kind, changes }.encode()
}

fn full_changes() -> Vec<Change> {
    vec![
        Change::Upsert { key: 10, value: 100 },
        Change::Upsert { key: 20, value: 200 },
        Change::Upsert { key: 30, value: 300 },
    ]
}

fn rows(pairs: &[(u64, u64)]) -> Arc<SortedRows> {
    Arc::new(pairs.iter().copied().collect())
}

fn send_apply(shard: &mut Shard, request: &ApplyRequest) -> Vec<ShardOutput> {
    shard.handle_message(0, NodeAddr::Coordinator, Message::Apply(request.clone()))
}

fn downloads(out: &[ShardOutput]) -> Vec<DownloadRequest> {
    out.iter()
        .filter_map(|o| match o {
            Output::Download(request) => Some(request.clone()),
            _ => None,
        })
        .collect()
}

fn only_download(out: &[ShardOutput]) -> DownloadRequest {
    assert_eq!(out.len(), 1, "expected exactly one output, a download: {out:?}");
    downloads(out).pop().expect("a download")
}

fn only_reply(out: &[ShardOutput]) -> ApplyReply {
    assert_eq!(out.len(), 1, "expected exactly one output, a reply: {out:?}");
    match &out[0] {
        Output::Send { to: NodeAddr::Coordinator, msg: Message::Reply(reply) } => reply.clone(),
        other => panic!("expected a reply to the coordinator, got {other:?}"),
    }
}

fn served(request: &DownloadRequest, bytes: &[u8]) -> DownloadResult {
    DownloadResult {
        download_id: request.download_id,
        object: request.object.clone(),
        offset: request.offset,
        outcome: range_of(&request.object, &Bytes::copy_from_slice(bytes), request.offset, request.len),
    }
}

fn failed_read(request: &DownloadRequest, error: StoreError) -> DownloadResult {
    DownloadResult {
        download_id: request.download_id,
        object: request.object.clone(),
        offset: request.offset,
        outcome: Err(error),
    }
}

/// Serves every ranged read from `bytes` until the shard asks for no more; returns the reads asked for and the
/// outputs that ended the download.
fn download_all(shard: &mut Shard, out: Vec<ShardOutput>, bytes: &[u8]) -> (Vec<DownloadRequest>, Vec<ShardOutput>) {
    let mut asked = Vec::new();
    let mut out = out;
    loop {
        let reads = downloads(&out);
        if reads.is_empty() {
            return (asked, out);
        }
        assert_eq!(out.len(), 1, "a download step asks for one range and nothing else: {out:?}");
        let read = reads[0].clone();
        out = shard.handle_download(0, served(&read, bytes));
        asked.push(read);
        assert!(asked.len() < 1_000, "the download does not end");
    }
}

/// Sends `request` and serves its download from `bytes`.
fn serve_request(shard: &mut Shard, request: &ApplyRequest, bytes: &[u8]) -> (Vec<DownloadRequest>, Vec<ShardOutput>) {
    let out = send_apply(shard, request);
    download_all(shard, out, bytes)
}

/// Applies `request` with a bundle of `changes`, served intact; returns the outputs that ended it.
fn apply_with(shard: &mut Shard, request: &ApplyRequest, changes: Vec<Change>) -> Vec<ShardOutput> {
    serve_request(shard, request, &bundle_for(request, changes)).1
}

/// The outputs of a successful apply: one Persist, then the Applied reply.
fn persisted_then_applied(out: &[ShardOutput], request: &ApplyRequest) -> ShardDurable {
    assert_eq!(out.len(), 2, "an apply ends in a persist and a reply: {out:?}");
    let Output::Persist { state, note } = &out[0] else { panic!("the persist comes first: {out:?}") };
    let PersistNote::ShardApplied { increment, backup_id, .. } = note else { panic!("a shard note: {note:?}") };
    assert_eq!((*increment, *backup_id), (request.increment, request.backup_id));
    let Output::Send { to: NodeAddr::Coordinator, msg: Message::Reply(reply) } = &out[1] else {
        panic!("the reply comes second: {out:?}")
    };
    assert_eq!(reply, &answer(request, ApplyOutcome::Applied));
    state.clone()
}

fn has_persist(out: &[ShardOutput]) -> bool {
    out.iter().any(|o| matches!(o, Output::Persist { .. }))
}

// ---------------------------------------------------------------------------------------------------------------
// Shard: downloading
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn shard_downloads_its_bundle_in_ranges_of_the_chunk_size() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    assert!(bytes.len() > 64, "the bundle spans several chunks");
    let (asked, out) = serve_request(&mut shard, &request, &bytes);

    let offsets: Vec<u64> = asked.iter().map(|r| r.offset).collect();
    let expected: Vec<u64> = (0..bytes.len() as u64).step_by(16).collect();
    assert_eq!(offsets, expected, "consecutive 16-byte ranges");
    assert!(asked.iter().all(|r| r.len == 16 && r.object == request.object));
    assert!(asked.iter().all(|r| r.download_id == asked[0].download_id), "one download, one id");
    persisted_then_applied(&out, &request);
}

#[test]
fn shard_resumes_after_a_short_read_at_the_offset_it_reached() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());

    let first = only_download(&send_apply(&mut shard, &request));
    assert_eq!((first.offset, first.len), (0, 16));
    let short = DownloadResult {
        outcome: Ok(RangeRead { bytes: Bytes::copy_from_slice(&bytes[..5]), total_len: bytes.len() as u64 }),
        ..served(&first, &bytes)
    };
    let second = only_download(&shard.handle_download(10, short));
    assert_eq!((second.offset, second.len), (5, 16), "resumes at byte 5 after a 5-byte read");
    assert_eq!(second.download_id, first.download_id);
    let third = only_download(&shard.handle_download(20, served(&second, &bytes)));
    assert_eq!(third.offset, 21);

    let (_, out) = download_all(&mut shard, vec![Output::Download(third)], &bytes);
    let state = persisted_then_applied(&out, &request);
    assert_eq!(state.rows, rows(&[(10, 100), (20, 200), (30, 300)]), "the resumed bytes decode to the intact bundle");
}

#[test]
fn shard_counts_an_empty_read_before_the_end_as_a_failed_read() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    let first = only_download(&send_apply(&mut shard, &request));
    let empty = DownloadResult {
        outcome: Ok(RangeRead { bytes: Bytes::new(), total_len: bytes.len() as u64 }),
        ..served(&first, &bytes)
    };
    let out = shard.handle_download(1_000, empty);
    assert_eq!(
        out,
        vec![Output::SetTimer { at_ms: 1_050, timer: ShardTimer::DownloadRetry { download_id: first.download_id } }]
    );
    let again = only_download(&shard.handle_timer(1_050, ShardTimer::DownloadRetry { download_id: first.download_id }));
    assert_eq!(again.offset, 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Shard: applying
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn shard_applies_a_full_bundle_replacing_its_rows_and_persists_before_replying() {
    let old = ShardDurable { op: Some(1), applied_through: Some(4), rows: rows(&[(1, 1), (20, 999), (500, 5)]) };
    let mut shard = Shard::boot(SHARD, shard_config(), Some(old));
    let request = apply_request(2, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    let (_, out) = serve_request(&mut shard, &request, &bytes);

    let state = persisted_then_applied(&out, &request);
    let expected =
        ShardDurable { op: Some(2), applied_through: Some(0), rows: rows(&[(10, 100), (20, 200), (30, 300)]) };
    assert_eq!(state, expected, "a full bundle replaces every row, and rows and marker are one write");
    assert_eq!(shard.durable(), &expected);
    let Output::Persist { note, .. } = &out[0] else { unreachable!() };
    let payload_crc32 = lockstep::bundle::payload_crc32(&bytes);
    assert_eq!(note, &PersistNote::ShardApplied { op: 2, increment: 0, backup_id: 1, payload_crc32 });
}

#[test]
fn shard_applies_an_incremental_with_upserts_and_deletes_in_one_persist() {
    let mut shard = fresh_shard(shard_config());
    let full = apply_request(1, 0, 0);
    persisted_then_applied(&apply_with(&mut shard, &full, full_changes()), &full);

    let incremental = apply_request(1, 1, 1);
    // Key 10 is untouched, 20 deleted, 30 overwritten, 40 new, 99 never existed; 50 is upserted, then deleted.
    let changes = vec![
        Change::Delete { key: 20 },
        Change::Upsert { key: 30, value: 333 },
        Change::Upsert { key: 40, value: 400 },
        Change::Delete { key: 99 },
        Change::Upsert { key: 50, value: 1 },
        Change::Delete { key: 50 },
    ];
    let state = persisted_then_applied(&apply_with(&mut shard, &incremental, changes), &incremental);
    let expected =
        ShardDurable { op: Some(1), applied_through: Some(1), rows: rows(&[(10, 100), (30, 333), (40, 400)]) };
    assert_eq!(state, expected, "upserts and deletes applied in order on top of the full, marker in the same state");
    assert_eq!(shard.durable(), &expected);
}

#[test]
fn shard_answers_a_duplicate_request_for_an_applied_increment_without_persisting() {
    let mut shard = fresh_shard(shard_config());
    let full = apply_request(1, 0, 0);
    apply_with(&mut shard, &full, full_changes());
    let incremental = apply_request(1, 1, 1);
    apply_with(&mut shard, &incremental, vec![Change::Delete { key: 10 }]);
    let before = shard.durable().clone();

    for duplicate in [ApplyRequest { attempt: 9, generation: 2, ..full }, ApplyRequest { attempt: 10, ..incremental }] {
        let out = send_apply(&mut shard, &duplicate);
        assert_eq!(only_reply(&out), answer(&duplicate, ApplyOutcome::AlreadyApplied), "no download, no persist");
        assert_eq!(shard.durable(), &before);
    }
}

#[test]
fn shard_refuses_a_request_that_skips_an_increment() {
    let mut fresh = fresh_shard(shard_config());
    let skip_full = apply_request(1, 1, 0);
    let reply = only_reply(&send_apply(&mut fresh, &skip_full));
    let cause = ShardFailure::OutOfOrder { expected: 0, requested: 1 };
    assert_eq!(reply, answer(&skip_full, ApplyOutcome::Failed { permanent: true, cause }));

    let mut shard = fresh_shard(shard_config());
    apply_with(&mut shard, &apply_request(1, 0, 0), full_changes());
    let before = shard.durable().clone();
    let skip = apply_request(1, 2, 1);
    let reply = only_reply(&send_apply(&mut shard, &skip));
    let cause = ShardFailure::OutOfOrder { expected: 1, requested: 2 };
    assert_eq!(reply, answer(&skip, ApplyOutcome::Failed { permanent: true, cause }));
    assert_eq!(shard.durable(), &before);
}

#[test]
fn shard_refuses_a_late_request_of_an_older_operation_and_keeps_the_newer_rows() {
    // Operation 3 ended (failed, say) while its request for increment 0 was held up in the network; operation 4
    // restored the table since. The late request must not put operation 3's full backup over the restored rows.
    let mut shard = fresh_shard(shard_config());
    apply_with(&mut shard, &apply_request(4, 0, 0), full_changes());
    apply_with(&mut shard, &apply_request(4, 1, 1), vec![Change::Delete { key: 10 }]);
    let before = shard.durable().clone();
    let late = ApplyRequest { generation: 1, ..apply_request(3, 0, 0) };
    let reply = only_reply(&send_apply(&mut shard, &late));
    let cause = ShardFailure::Superseded { requested: 3, held: 4 };
    assert_eq!(reply, answer(&late, ApplyOutcome::Failed { permanent: true, cause: cause.clone() }));
    assert_eq!(shard.durable(), &before, "no download, no persist");
    assert!(cause.to_string().contains("operation 3, older than operation 4"), "{cause}");

    // The deliberate bug takes the late request as the start of a restore, and its full backup replaces the rows.
    let mut buggy = fresh_shard(ShardConfig { bug: Some(ShardBug::ApplyOlderOperations), ..shard_config() });
    apply_with(&mut buggy, &apply_request(4, 0, 0), full_changes());
    apply_with(&mut buggy, &apply_request(4, 1, 1), vec![Change::Delete { key: 10 }]);
    assert_eq!(buggy.durable(), &before);
    let out = apply_with(&mut buggy, &late, full_changes());
    assert_eq!(only_reply(&out[1..]), answer(&late, ApplyOutcome::Applied));
    assert_eq!(buggy.durable().op, Some(3), "the older operation's rows are back");
    assert_ne!(buggy.durable().rows, before.rows);

    // The same while operation 4's first increment is still downloading: the download goes on, and ends in its
    // own reply.
    let mut shard = fresh_shard(shard_config());
    let newer = apply_request(4, 0, 0);
    let first_read = only_download(&send_apply(&mut shard, &newer));
    let reply = only_reply(&send_apply(&mut shard, &late));
    assert_eq!(
        reply.outcome,
        ApplyOutcome::Failed { permanent: true, cause: ShardFailure::Superseded { requested: 3, held: 4 } }
    );
    let bytes = bundle_for(&newer, full_changes());
    let next = shard.handle_download(0, served(&first_read, &bytes));
    let (_, out) = download_all(&mut shard, next, &bytes);
    assert_eq!(only_reply(&out[1..]), answer(&newer, ApplyOutcome::Applied));
    assert_eq!(shard.durable().op, Some(4));

    // A newer operation is taken as a new restore from its full backup.
    let newest = apply_request(5, 0, 0);
    let out = apply_with(&mut shard, &newest, vec![Change::Upsert { key: 1, value: 1 }]);
    assert_eq!(only_reply(&out[1..]), answer(&newest, ApplyOutcome::Applied));
    assert_eq!(shard.durable().rows, rows(&[(1, 1)]));
}

#[test]
fn shard_answers_the_newest_attempt_when_an_older_duplicate_arrives_during_the_download() {
    let mut shard = fresh_shard(shard_config());
    let first = apply_request(1, 0, 0);
    let first_read = only_download(&send_apply(&mut shard, &first));
    // The coordinator rebooted (generation 2) and asked again; then a duplicate of the first request arrives late.
    let newer = ApplyRequest { generation: 2, attempt: 0, ..first.clone() };
    assert!(send_apply(&mut shard, &newer).is_empty(), "merged into the download in progress");
    assert!(send_apply(&mut shard, &first).is_empty(), "merged, and does not displace the newer request");
    let retry = ApplyRequest { attempt: 5, ..first.clone() };
    assert!(send_apply(&mut shard, &retry).is_empty(), "a later attempt of the older generation is older still");
    let bytes = bundle_for(&first, full_changes());
    let next = shard.handle_download(0, served(&first_read, &bytes));
    let (_, out) = download_all(&mut shard, next, &bytes);
    assert_eq!(only_reply(&out[1..]), answer(&newer, ApplyOutcome::Applied), "the coordinator takes only this");
}

#[test]
fn shard_rejects_a_corrupted_bundle_as_transient_without_persisting() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let intact = bundle_for(&request, full_changes());
    let mut corrupt = intact.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x01;

    let (_, out) = serve_request(&mut shard, &request, &corrupt);
    let reply = only_reply(&out);
    match &reply.outcome {
        ApplyOutcome::Failed { permanent: false, cause: ShardFailure::BadBundle { detail } } => {
            assert!(detail.contains("checksum") && detail.contains(&request.object), "{detail}");
        }
        other => panic!("expected a transient BadBundle, got {other:?}"),
    }
    assert_eq!(shard.durable(), &ShardDurable::default(), "nothing of the corrupt bundle is applied");

    // The retry downloads again from the start and applies the intact copy.
    let retry = ApplyRequest { attempt: 1, ..request.clone() };
    let (asked, out) = serve_request(&mut shard, &retry, &intact);
    assert_eq!(asked[0].offset, 0);
    persisted_then_applied(&out, &retry);
}

#[test]
fn shard_with_skip_checksum_bug_applies_a_corrupted_payload() {
    let request = apply_request(1, 0, 0);
    let mut corrupt = bundle_for(&request, full_changes());
    // The last byte belongs to the value of key 30.
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x01;

    let mut correct = fresh_shard(shard_config());
    let (_, out) = serve_request(&mut correct, &request, &corrupt);
    assert!(!has_persist(&out), "a verifying shard rejects it");

    let mut buggy = fresh_shard(ShardConfig { bug: Some(ShardBug::SkipChecksum), ..shard_config() });
    let (_, out) = serve_request(&mut buggy, &request, &corrupt);
    let state = persisted_then_applied(&out, &request);
    assert_eq!(state.rows.get(30), Some(300 ^ (1 << 56)), "the bug persists the corrupted value");
    assert_ne!(state.rows, rows(&[(10, 100), (20, 200), (30, 300)]));
}

#[test]
fn shard_rejects_a_bundle_of_another_backup_as_permanent() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let wrong = Bundle { backup_id: 77, tablet: SHARD, kind: BackupKind::Full, changes: full_changes() }.encode();
    let (_, out) = serve_request(&mut shard, &request, &wrong);
    let expected = BundleOf { backup_id: request.backup_id, kind: BackupKind::Full, tablet: SHARD };
    let found = BundleOf { backup_id: 77, ..expected };
    let cause = ShardFailure::WrongBundle { object: request.object.clone(), expected, found };
    assert_eq!(only_reply(&out), answer(&request, ApplyOutcome::Failed { permanent: true, cause }));
    assert_eq!(shard.durable(), &ShardDurable::default());
}

#[test]
fn shard_rejects_a_bundle_of_the_wrong_kind_and_says_so() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    // The right backup and tablet, but an incremental where the first increment must be a full backup.
    let incremental =
        Bundle { backup_id: request.backup_id, tablet: SHARD, kind: BackupKind::Incremental, changes: full_changes() };
    let (_, out) = serve_request(&mut shard, &request, &incremental.encode());
    let ApplyOutcome::Failed { permanent: true, cause } = only_reply(&out).outcome else {
        panic!("a bundle of the wrong kind is a permanent failure")
    };
    let text = cause.to_string();
    let backup = request.backup_id;
    assert!(
        text.contains(&format!("holds the incremental backup {backup} of {SHARD}, not the full backup {backup}")),
        "the message names the kind found and the kind requested: {text}"
    );
    assert_eq!(shard.durable(), &ShardDurable::default());
}

#[test]
fn shard_refuses_a_request_addressed_to_another_shard_and_ignores_requests_not_from_the_coordinator() {
    let mut shard = fresh_shard(shard_config());
    let misaddressed = ApplyRequest { tablet: tablet(4), ..apply_request(1, 0, 0) };
    let cause = ShardFailure::WrongShard { requested: tablet(4), actual: SHARD };
    assert_eq!(
        only_reply(&send_apply(&mut shard, &misaddressed)),
        answer(&misaddressed, ApplyOutcome::Failed { permanent: true, cause })
    );
    let request = Message::Apply(apply_request(1, 0, 0));
    assert!(shard.handle_message(0, NodeAddr::Shard(tablet(0)), request).is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Shard: store failures and stale results
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn shard_reports_a_missing_object_as_a_permanent_failure() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let read = only_download(&send_apply(&mut shard, &request));
    let out = shard.handle_download(5, failed_read(&read, StoreError::NotFound { object: request.object.clone() }));
    let cause = ShardFailure::ObjectMissing { object: request.object.clone() };
    assert_eq!(only_reply(&out), answer(&request, ApplyOutcome::Failed { permanent: true, cause }), "no retry timer");
    assert!(shard.handle_timer(100, ShardTimer::DownloadRetry { download_id: read.download_id }).is_empty());
}

#[test]
fn shard_retries_throttled_and_unavailable_reads_then_fails_transiently() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    let first = only_download(&send_apply(&mut shard, &request));
    let partial = only_download(&shard.handle_download(0, served(&first, &bytes)));
    assert_eq!(partial.offset, 16);
    let retry = ShardTimer::DownloadRetry { download_id: first.download_id };

    // Failure 1: throttled, waits as long as the store says.
    let out = shard.handle_download(1_000, failed_read(&partial, StoreError::Throttled { retry_after_ms: 700 }));
    assert_eq!(out, vec![Output::SetTimer { at_ms: 1_700, timer: retry.clone() }]);
    let again = only_download(&shard.handle_timer(1_700, retry.clone()));
    assert_eq!(again, partial, "the same range is asked for again, progress kept");

    // Failure 2: unavailable, waits download_retry_ms times the failures so far.
    let out = shard.handle_download(2_000, failed_read(&again, StoreError::Unavailable { detail: "503".into() }));
    assert_eq!(out, vec![Output::SetTimer { at_ms: 2_100, timer: retry.clone() }]);
    let again = only_download(&shard.handle_timer(2_100, retry));

    // Failure 3 reaches max_download_failures: a transient failure goes to the coordinator.
    let out = shard.handle_download(3_000, failed_read(&again, StoreError::Unavailable { detail: "503".into() }));
    let reply = only_reply(&out);
    match &reply.outcome {
        ApplyOutcome::Failed { permanent: false, cause: ShardFailure::DownloadFailed { object, attempts, detail } } => {
            assert_eq!(object, &request.object);
            assert_eq!(*attempts, 3);
            assert!(detail.contains("503"), "{detail}");
        }
        other => panic!("expected a transient DownloadFailed, got {other:?}"),
    }
    assert_eq!(shard.durable(), &ShardDurable::default());

    // The coordinator's retry starts a fresh download.
    let fresh = only_download(&send_apply(&mut shard, &ApplyRequest { attempt: 1, ..request }));
    assert_eq!(fresh.offset, 0);
    assert_ne!(fresh.download_id, first.download_id);
}

#[test]
fn shard_waits_out_a_throttling_store_no_longer_than_its_cap() {
    let mut shard = fresh_shard(shard_config());
    let first = only_download(&send_apply(&mut shard, &apply_request(1, 0, 0)));
    let retry = ShardTimer::DownloadRetry { download_id: first.download_id };
    for retry_after_ms in [5_000, u64::MAX] {
        let out = shard.handle_download(2_000, failed_read(&first, StoreError::Throttled { retry_after_ms }));
        assert_eq!(out, vec![Output::SetTimer { at_ms: 3_000, timer: retry.clone() }], "retry after {retry_after_ms}");
    }
}

#[test]
fn shard_ignores_stale_download_results_and_timers() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    let first = only_download(&send_apply(&mut shard, &request));
    let second = only_download(&shard.handle_download(0, served(&first, &bytes)));

    let wrong_id = DownloadResult { download_id: first.download_id + 1, ..served(&second, &bytes) };
    assert!(shard.handle_download(1, wrong_id).is_empty());
    let replayed = served(&first, &bytes);
    assert!(shard.handle_download(1, replayed).is_empty(), "a result for offset 0 is stale at offset 16");
    let ahead = served(&DownloadRequest { offset: 32, ..second.clone() }, &bytes);
    assert!(shard.handle_download(1, ahead).is_empty(), "a result past the current offset is stale too");
    let stale_failure = failed_read(&first, StoreError::NotFound { object: request.object.clone() });
    assert!(shard.handle_download(1, stale_failure).is_empty(), "a stale failure does not end the download");
    let stale_timer = ShardTimer::DownloadRetry { download_id: first.download_id + 1 };
    assert!(shard.handle_timer(1, stale_timer).is_empty());

    let (asked, out) = download_all(&mut shard, vec![Output::Download(second)], &bytes);
    assert_eq!(asked[0].offset, 16, "the download went on from where it was");
    let state = persisted_then_applied(&out, &request);
    assert_eq!(state.rows, rows(&[(10, 100), (20, 200), (30, 300)]));

    // With no download running, results are ignored.
    assert!(shard.handle_download(2, served(&first, &bytes)).is_empty());
}

#[test]
fn shard_answers_a_retried_request_during_its_download_once_with_the_newest_attempt() {
    let mut shard = fresh_shard(shard_config());
    let request = apply_request(1, 0, 0);
    let bytes = bundle_for(&request, full_changes());
    let first = only_download(&send_apply(&mut shard, &request));

    let retried = ApplyRequest { attempt: 5, generation: 2, ..request.clone() };
    assert!(send_apply(&mut shard, &retried).is_empty(), "no second download for the same increment");
    let (_, out) = download_all(&mut shard, vec![Output::Download(first)], &bytes);
    persisted_then_applied(&out, &retried);
}

#[test]
fn shard_starts_over_for_a_new_operation_at_increment_zero() {
    let mut shard = fresh_shard(shard_config());
    apply_with(&mut shard, &apply_request(1, 0, 0), full_changes());
    apply_with(&mut shard, &apply_request(1, 1, 1), vec![Change::Upsert { key: 50, value: 500 }]);
    assert_eq!(shard.durable().applied_through, Some(1));

    // A new operation may not begin past its full backup, even though op 1 is at increment 1.
    let skip = apply_request(2, 1, 0);
    let cause = ShardFailure::OutOfOrder { expected: 0, requested: 1 };
    assert_eq!(
        only_reply(&send_apply(&mut shard, &skip)),
        answer(&skip, ApplyOutcome::Failed { permanent: true, cause })
    );

    // Increment 0 of a new operation is not "already applied": it downloads and replaces everything.
    let restart = apply_request(2, 0, 0);
    let state =
        persisted_then_applied(&apply_with(&mut shard, &restart, vec![Change::Upsert { key: 7, value: 70 }]), &restart);
    assert_eq!(state, ShardDurable { op: Some(2), applied_through: Some(0), rows: rows(&[(7, 70)]) });
}

#[test]
fn shard_abandons_a_download_of_an_old_operation_when_a_new_operation_starts() {
    let mut shard = fresh_shard(shard_config());
    let old = apply_request(1, 0, 0);
    let old_bytes = bundle_for(&old, full_changes());
    let old_read = only_download(&send_apply(&mut shard, &old));

    let new = apply_request(2, 0, 0);
    let new_read = only_download(&send_apply(&mut shard, &new));
    assert_ne!(new_read.download_id, old_read.download_id);
    assert!(shard.handle_download(0, served(&old_read, &old_bytes)).is_empty(), "the old download is abandoned");

    let new_bytes = bundle_for(&new, vec![Change::Upsert { key: 1, value: 2 }]);
    let (_, out) = download_all(&mut shard, vec![Output::Download(new_read)], &new_bytes);
    let state = persisted_then_applied(&out, &new);
    assert_eq!(state.op, Some(2));
    assert_eq!(state.rows, rows(&[(1, 2)]));
}

// ---------------------------------------------------------------------------------------------------------------
// Both machines together
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn coordinator_and_shards_restore_every_increment_in_order() {
    let shard_count = 3;
    let increments = 3;
    let config = CoordinatorConfig { max_in_flight_shards: 2, ..coordinator_config() };
    let mut coordinator = booted(config);
    let mut shards: Vec<Shard> = (0..shard_count).map(|s| Shard::boot(tablet(s), shard_config(), None)).collect();
    // Shard s in backup b upserts key s*100+b with value b, and the incrementals delete the previous backup's key.
    let bundle = |backup_id: u64, shard: TabletId| {
        let base = u64::from(shard.shard.0) * 100;
        let mut changes = vec![Change::Upsert { key: base + backup_id, value: backup_id }];
        let kind = if backup_id == 1 { BackupKind::Full } else { BackupKind::Incremental };
        if backup_id > 1 {
            changes.push(Change::Delete { key: base + backup_id - 1 });
        }
        Bundle { backup_id, tablet: shard, kind, changes }.encode()
    };

    let mut queue: Vec<ApplyRequest> =
        apply_requests(&coordinator.start(0, restore_request(OP, shard_count, increments)).unwrap());
    let mut now = 0;
    while !queue.is_empty() {
        let request = queue.remove(0);
        now += 1;
        let shard = &mut shards[request.tablet.shard.0 as usize];
        let bytes = bundle(request.backup_id, request.tablet);
        let (_, out) = serve_request(shard, &request, &bytes);
        let state = persisted_then_applied(&out, &request);
        assert_eq!(state.applied_through, Some(request.increment));
        let out = reply(&mut coordinator, now, &request, ApplyOutcome::Applied);
        queue.extend(apply_requests(&out));
        assert!(now < 100, "the restore does not finish");
    }
    assert_eq!(coordinator.progress(), vec![ProgressMark::Done { op: OP, increments }]);
    for shard in &shards {
        let key = u64::from(shard.id().shard.0) * 100 + u64::from(increments);
        assert_eq!(shard.durable().rows, rows(&[(key, u64::from(increments))]));
        assert_eq!(shard.durable().applied_through, Some(increments - 1));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Hostile inputs: whatever the network, the store or a stale timer hands a machine, it neither panics nor breaks
// a rule of the protocol. Each property is also run against a deliberately broken machine and must fail there.
// ---------------------------------------------------------------------------------------------------------------

mod hostile {
    use super::*;
    use lockstep::protocol::{ClientAnswer, ClientCall, ClientReply, ClientRequest, decode_frame, encode_frame};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
    use std::collections::BTreeMap;

    /// Steps of one run.
    const MAX_STEPS: usize = 60;

    /// The properties' cases, drawn from a fixed seed as every property of the project is: the same cases on
    /// every run.
    fn fixed(cases: u32) -> Config {
        Config { cases, rng_seed: RngSeed::Fixed(0x4057_11e5), ..Config::default() }
    }

    /// A runner for showing that a property fails on a broken machine: up to 1,000 cases, nothing saved.
    fn runner() -> TestRunner {
        TestRunner::new(Config { failure_persistence: None, ..fixed(1_000) })
    }

    /// `result` is a failure of the property (not a panic) whose message names `broken`.
    fn assert_fails_with<T: std::fmt::Debug>(
        result: Result<(), TestError<T>>,
        broken: &str,
        bug: impl std::fmt::Debug,
    ) {
        match result {
            Err(TestError::Fail(reason, _)) => {
                let reason = reason.to_string();
                assert!(reason.contains(broken), "{bug:?} was caught, but not as {broken:?}: {reason}");
            }
            other => panic!("the property did not catch {bug:?}: {other:?}"),
        }
    }

    // -- the shard ------------------------------------------------------------------------------------------

    /// The store's intact copy of `SHARD`'s part of backups 1 (full) to 4 (incrementals), by object name.
    fn library() -> BTreeMap<String, Vec<u8>> {
        (1..=4u64)
            .map(|backup_id| {
                let kind = if backup_id == 1 { BackupKind::Full } else { BackupKind::Incremental };
                let changes = if backup_id == 1 {
                    (1..=6).map(|key| Change::Upsert { key, value: key * 10 }).collect()
                } else {
                    vec![
                        Change::Upsert { key: backup_id, value: backup_id * 100 },
                        Change::Delete { key: backup_id + 1 },
                    ]
                };
                let bytes = Bundle { backup_id, tablet: SHARD, kind, changes }.encode();
                (BackupManifest::object_name(backup_id, SHARD), bytes)
            })
            .collect()
    }

    /// How the store damages the answer to a ranged read.
    #[derive(Clone, Debug)]
    enum Damage {
        None,
        FlipByte(usize),
        ShortRead(usize),
        EmptyRead,
        WrongTotal(u64),
        /// An error instead of bytes.
        Error(StoreError),
    }

    #[derive(Clone, Debug)]
    enum ShardInput {
        Message(NodeAddr, Message),
        /// The answer to the shard's newest ranged read, from the store's copy of its object, maybe damaged.
        Serve(Damage),
        /// A read result made up from scratch: any download id, offset, bytes, length or error.
        Forged(DownloadResult),
        Timer(ShardTimer),
        /// One of the requests delivered so far, again (picked by index): a duplicate or a late copy.
        Resend(usize),
    }

    fn any_tablet() -> impl Strategy<Value = TabletId> {
        prop_oneof![4 => Just(SHARD), 1 => (0u32..2, 0u32..5).prop_map(|(table, shard)| TabletId::new(table, shard))]
    }

    /// Mostly well-formed requests for `SHARD`, with any field now and then wrong.
    fn any_apply_request() -> impl Strategy<Value = ApplyRequest> {
        let identity = (1u64..3, 0u64..3, 0u32..3, 0u32..5, any_tablet());
        let content = (
            prop::option::weighted(0.15, 0u64..6),
            prop::bool::weighted(0.1),
            prop::option::weighted(0.1, "[a-z0-9/-]{0,12}"),
        );
        (identity, content).prop_map(|((op, generation, attempt, increment, tablet), (backup, wrong_kind, object))| {
            let backup_id = backup.unwrap_or(u64::from(increment) + 1);
            let full = (increment == 0) != wrong_kind;
            ApplyRequest {
                op,
                generation,
                attempt,
                increment,
                backup_id,
                kind: if full { BackupKind::Full } else { BackupKind::Incremental },
                tablet,
                object: object.unwrap_or_else(|| BackupManifest::object_name(backup_id, SHARD)),
            }
        })
    }

    /// A number from a store or a peer: small, at the very top of the range, or anything.
    fn any_number(small: u64) -> impl Strategy<Value = u64> {
        prop_oneof![0..small, Just(u64::MAX), any::<u64>()]
    }

    fn any_store_error() -> impl Strategy<Value = StoreError> {
        prop_oneof![
            Just(StoreError::NotFound { object: "x".into() }),
            Just(StoreError::Unavailable { detail: "503".into() }),
            any_number(1_000).prop_map(|retry_after_ms| StoreError::Throttled { retry_after_ms }),
            any_number(1_000).prop_map(|timeout_ms| StoreError::Timeout { timeout_ms }),
            (any_number(300), any_number(300)).prop_map(|(offset, len)| StoreError::BadRange {
                object: "x".into(),
                offset,
                len
            }),
        ]
    }

    fn any_outcome() -> impl Strategy<Value = ApplyOutcome> {
        prop_oneof![
            5 => Just(ApplyOutcome::Applied),
            2 => Just(ApplyOutcome::AlreadyApplied),
            2 => Just(transient()),
            1 => (0u32..4, 0u32..4).prop_map(|(expected, requested)| ApplyOutcome::Failed {
                permanent: true,
                cause: ShardFailure::OutOfOrder { expected, requested },
            }),
        ]
    }

    fn any_shard_input() -> impl Strategy<Value = ShardInput> {
        let from = prop_oneof![
            8 => Just(NodeAddr::Coordinator),
            1 => Just(NodeAddr::Client),
            1 => any_tablet().prop_map(NodeAddr::Shard),
        ];
        let message = prop_oneof![
            8 => any_apply_request().prop_map(Message::Apply),
            1 => (any_apply_request(), any_outcome()).prop_map(|(request, outcome)| Message::Reply(request.reply(outcome))),
            1 => Just(Message::Client(ClientRequest { call_id: 1, call: ClientCall::List })),
        ];
        let damage = prop_oneof![
            6 => Just(Damage::None),
            1 => any::<usize>().prop_map(Damage::FlipByte),
            1 => (0usize..16).prop_map(Damage::ShortRead),
            1 => Just(Damage::EmptyRead),
            1 => any_number(300).prop_map(Damage::WrongTotal),
            2 => any_store_error().prop_map(Damage::Error),
        ];
        let read = (prop::collection::vec(any::<u8>(), 0..40), any_number(300))
            .prop_map(|(bytes, total_len)| RangeRead { bytes: bytes.into(), total_len });
        let forged = (0u64..4, any_number(200), prop_oneof![read.prop_map(Ok), any_store_error().prop_map(Err)])
            .prop_map(|(download_id, offset, outcome)| DownloadResult {
                download_id,
                object: "forged".into(),
                offset,
                outcome,
            });
        prop_oneof![
            4 => (from, message).prop_map(|(from, msg)| ShardInput::Message(from, msg)),
            8 => damage.prop_map(ShardInput::Serve),
            1 => forged.prop_map(ShardInput::Forged),
            1 => (0u64..4).prop_map(|download_id| ShardInput::Timer(ShardTimer::DownloadRetry { download_id })),
            2 => any::<usize>().prop_map(ShardInput::Resend),
        ]
    }

    /// Drives a shard through `inputs`, `delays[i]` ms apart, and checks every step:
    /// - a persist applies exactly the intact bundle of its backup, to the rows of the increment before it (or
    ///   replaces them for increment 0), and moves "applied through" one increment on;
    /// - an Applied reply comes after the persist that makes it true;
    /// - a request for an increment already applied is answered AlreadyApplied, with nothing else done;
    /// - nothing changes the durable state without a persist of it, and no timer is set in the past.
    fn run_shard(config: ShardConfig, inputs: &[(u64, ShardInput)]) -> Result<(), TestCaseError> {
        let library = library();
        let by_backup: BTreeMap<u64, Bundle> = library
            .iter()
            .map(|(object, bytes)| {
                let bundle = Bundle::decode(object, bytes).expect("the library is intact");
                (bundle.backup_id, bundle)
            })
            .collect();
        let mut shard = Shard::boot(SHARD, config, None);
        let mut now_ms = 0u64;
        let mut last_read: Option<DownloadRequest> = None;
        let mut delivered: Vec<(NodeAddr, Message)> = Vec::new();
        for (step, (delay_ms, input)) in inputs.iter().enumerate() {
            now_ms += delay_ms;
            let before = shard.durable().clone();
            // The message this step delivers: a new one, or one delivered before, again.
            let message = match input {
                ShardInput::Message(from, msg) => Some((*from, msg.clone())),
                ShardInput::Resend(pick) => delivered.get(pick % delivered.len().max(1)).cloned(),
                _ => None,
            };
            let out = match input.clone() {
                ShardInput::Message(from, msg) => {
                    delivered.push((from, msg.clone()));
                    shard.handle_message(now_ms, from, msg)
                }
                ShardInput::Resend(_) => {
                    let Some((from, msg)) = message.clone() else { continue };
                    shard.handle_message(now_ms, from, msg)
                }
                ShardInput::Serve(damage) => {
                    let Some(read) = &last_read else { continue };
                    let outcome = match (library.get(&read.object), damage) {
                        (_, Damage::Error(error)) => Err(error),
                        (None, _) => Err(StoreError::NotFound { object: read.object.clone() }),
                        (Some(bytes), damage) => {
                            range_of(&read.object, &Bytes::copy_from_slice(bytes), read.offset, read.len).map(
                                |mut answer| {
                                    match damage {
                                        Damage::None | Damage::Error(_) => {}
                                        Damage::FlipByte(at) if !answer.bytes.is_empty() => {
                                            let mut bytes = answer.bytes.to_vec();
                                            let at = at % bytes.len();
                                            bytes[at] ^= 0x5a;
                                            answer.bytes = bytes.into();
                                        }
                                        Damage::FlipByte(_) => {}
                                        Damage::ShortRead(keep) => answer.bytes.truncate(keep),
                                        Damage::EmptyRead => answer.bytes.clear(),
                                        Damage::WrongTotal(total_len) => answer.total_len = total_len,
                                    }
                                    answer
                                },
                            )
                        }
                    };
                    let result = DownloadResult {
                        download_id: read.download_id,
                        object: read.object.clone(),
                        offset: read.offset,
                        outcome,
                    };
                    shard.handle_download(now_ms, result)
                }
                ShardInput::Forged(result) => shard.handle_download(now_ms, result),
                ShardInput::Timer(timer) => shard.handle_timer(now_ms, timer),
            };
            let context = || format!("step {step}, {input:?}, outputs {out:?}");
            // A request for an increment already applied is answered from the marker, with nothing else done.
            let request = match &message {
                Some((NodeAddr::Coordinator, Message::Apply(request))) => Some(request),
                _ => None,
            };
            if let Some(request) = request
                && request.tablet == SHARD
                && before.op == Some(request.op)
                && before.applied_through.is_some_and(|through| request.increment <= through)
            {
                let answered = matches!(
                    out.as_slice(),
                    [Output::Send {
                        msg: Message::Reply(ApplyReply { outcome: ApplyOutcome::AlreadyApplied, .. }),
                        ..
                    }]
                );
                prop_assert!(answered, "an increment already applied not answered from the marker: {}", context());
            }
            let mut durable = before.clone();
            let mut persisted = false;
            for output in &out {
                match output {
                    Output::Download(read) => last_read = Some(read.clone()),
                    Output::SetTimer { at_ms, .. } => {
                        prop_assert!(*at_ms >= now_ms, "a timer set in the past: {}", context());
                    }
                    Output::Persist { state, note } => {
                        let PersistNote::ShardApplied { op, increment, backup_id, payload_crc32 } = note else {
                            return Err(TestCaseError::fail(format!("not a shard note: {}", context())));
                        };
                        let Some(bundle) = by_backup.get(backup_id) else {
                            return Err(TestCaseError::fail(format!("no such backup was applied: {}", context())));
                        };
                        let intact = &library[&BackupManifest::object_name(*backup_id, SHARD)];
                        prop_assert_eq!(
                            *payload_crc32,
                            lockstep::bundle::payload_crc32(intact),
                            "a damaged bundle: {}",
                            context()
                        );
                        prop_assert!(
                            durable.op.is_none_or(|held| held <= *op),
                            "applied an operation older than the one held, over its rows: {}",
                            context()
                        );
                        let rows = if *increment == 0 {
                            SortedRows::from_changes(&bundle.changes)
                        } else {
                            prop_assert_eq!(durable.op, Some(*op), "applied onto another operation: {}", context());
                            prop_assert_eq!(
                                durable.applied_through,
                                Some(increment - 1),
                                "an increment skipped or repeated: {}",
                                context()
                            );
                            durable.rows.with_changes(&bundle.changes)
                        };
                        prop_assert_eq!(&*state.rows, &rows, "rows other than the bundle's: {}", context());
                        prop_assert_eq!((state.op, state.applied_through), (Some(*op), Some(*increment)));
                        durable = state.clone();
                        persisted = true;
                    }
                    Output::Send { to, msg } => {
                        prop_assert_eq!(*to, NodeAddr::Coordinator, "{}", context());
                        if let Message::Reply(ApplyReply { outcome: ApplyOutcome::Applied, .. }) = msg {
                            prop_assert!(persisted, "Applied before the persist: {}", context());
                        }
                    }
                    Output::Report(_) => {}
                }
            }
            prop_assert_eq!(shard.durable(), &durable, "durable state changed without a persist: {}", context());
        }
        Ok(())
    }

    fn shard_inputs() -> impl Strategy<Value = Vec<(u64, ShardInput)>> {
        prop::collection::vec((prop_oneof![0u64..200, 0u64..100_000], any_shard_input()), 1..MAX_STEPS)
    }

    proptest! {
        #![proptest_config(fixed(256))]

        #[test]
        fn a_shard_survives_any_requests_reads_and_timers(inputs in shard_inputs()) {
            run_shard(shard_config(), &inputs)?;
        }
    }

    #[test]
    fn the_shard_property_fails_for_each_shard_bug() {
        for (bug, broken) in [
            (ShardBug::SkipChecksum, "a damaged bundle"),
            (ShardBug::ReplyBeforePersist, "Applied before the persist"),
            (ShardBug::MarkerBeforeRows, "rows other than the bundle's"),
            (ShardBug::ReapplyOldIncrements, "not answered from the marker"),
        ] {
            let config = ShardConfig { bug: Some(bug), ..shard_config() };
            let result = runner().run(&shard_inputs(), |inputs| run_shard(config.clone(), &inputs));
            assert_fails_with(result, broken, bug);
        }
    }

    // -- the coordinator ------------------------------------------------------------------------------------

    /// A field of an answer changed on its way.
    #[derive(Clone, Debug)]
    enum Tamper {
        None,
        Op,
        Generation,
        Attempt,
        Increment,
        /// Speaks for another tablet, and comes from it.
        Tablet,
        /// Comes from a node other than the tablet it speaks for.
        Sender(NodeAddr),
    }

    #[derive(Clone, Debug)]
    enum CoordinatorInput {
        /// An answer to one of the apply requests sent so far, chosen by `pick`, maybe tampered with.
        Answer {
            pick: usize,
            outcome: ApplyOutcome,
            tamper: Tamper,
        },
        /// A reply made up from scratch.
        Forged(NodeAddr, ApplyReply),
        /// A message no coordinator expects.
        Stray(NodeAddr, Message),
        Client(NodeAddr, ClientCall),
        /// One of the timers set so far, chosen by `pick`, at its time or later (again, maybe).
        Timer(usize),
        /// A timer the coordinator never set.
        ForgedTimer(CoordinatorTimer),
        /// A crash, and a boot from the last state it persisted.
        Reboot,
    }

    fn any_node() -> impl Strategy<Value = NodeAddr> {
        prop_oneof![
            Just(NodeAddr::Coordinator),
            Just(NodeAddr::Client),
            (0u32..2, 0u32..4).prop_map(|(table, shard)| NodeAddr::Shard(TabletId::new(table, shard))),
        ]
    }

    /// Two tables restored together: `orders` (table 0) over 2 shards and `lines` (table 1) over 1, backup 1 full
    /// and backups 2 and 3 incremental.
    fn two_table_request(op: OperationId) -> RestoreRequest {
        let table =
            |id, name: &str, shard_count| TableSpec { id: TableId(id), name: name.into(), shard_count, index_of: None };
        let tables = vec![table(0, "orders", 2), table(1, "lines", 1)];
        let catalog = (1..=3u64)
            .map(|backup_id| BackupManifest {
                backup_id,
                kind: if backup_id == 1 { BackupKind::Full } else { BackupKind::Incremental },
                taken_at_ms: backup_id * 10,
                tables: tables
                    .iter()
                    .map(|t| (t.id, t.tablets().map(|tablet| BackupManifest::object_name(backup_id, tablet)).collect()))
                    .collect(),
            })
            .collect();
        RestoreRequest { op, collection: "backups".to_string(), tables, catalog, until_ms: None, last_segment: true }
    }

    /// A tablet of the restore above, or one beside it.
    fn any_op_tablet() -> impl Strategy<Value = TabletId> {
        (0u32..3, 0u32..3).prop_map(|(table, shard)| TabletId::new(table, shard))
    }

    fn any_coordinator_input() -> impl Strategy<Value = CoordinatorInput> {
        let ops = OP - 1..OP + 2;
        let tamper = prop_oneof![
            12 => Just(Tamper::None),
            1 => Just(Tamper::Op),
            1 => Just(Tamper::Generation),
            1 => Just(Tamper::Attempt),
            1 => Just(Tamper::Increment),
            1 => Just(Tamper::Tablet),
            1 => any_node().prop_map(Tamper::Sender),
        ];
        // Answers fail for good now and then, not so often that no restore ever gets far.
        let outcome = prop_oneof![
            12 => Just(ApplyOutcome::Applied),
            3 => Just(ApplyOutcome::AlreadyApplied),
            3 => Just(transient()),
            1 => any_outcome(),
        ];
        let answer = (any::<usize>(), outcome, tamper).prop_map(|(pick, outcome, tamper)| CoordinatorInput::Answer {
            pick,
            outcome,
            tamper,
        });
        let reply = (ops.clone(), 0u64..4, 0u32..4, 0u32..4, any_op_tablet(), any_outcome()).prop_map(
            |(op, generation, attempt, increment, tablet, outcome)| ApplyReply {
                op,
                generation,
                attempt,
                increment,
                tablet,
                outcome,
            },
        );
        let forged = (any_node(), reply).prop_map(|(from, reply)| CoordinatorInput::Forged(from, reply));
        let stray = (any_node(), any_apply_request())
            .prop_map(|(from, request)| CoordinatorInput::Stray(from, Message::Apply(request)));
        // Points in time around the backups of `restore_request` (taken every 10 ms from 10 ms), and none.
        let point = prop_oneof![1 => Just(None), 3 => (0u64..50).prop_map(Some)];
        let call = prop_oneof![
            ops.clone().prop_map(|op| ClientCall::Status { op }),
            Just(ClientCall::List),
            ops.clone().prop_map(|op| ClientCall::Forget { op }),
            ops.clone().prop_map(|op| ClientCall::Cancel { op }),
            (ops.clone(), 0u32..4, 0u32..4)
                .prop_map(|(op, shards, increments)| ClientCall::Start(restore_request(op, shards, increments))),
            (ops.clone(), 0u32..4, 0u32..4, point.clone(), any::<bool>()).prop_map(
                |(op, shards, increments, until_ms, last_segment)| {
                    ClientCall::Start(RestoreRequest {
                        until_ms,
                        last_segment,
                        ..restore_request(op, shards, increments)
                    })
                }
            ),
            (ops.clone(), 0u32..4, point, any::<bool>()).prop_map(|(op, segment, until_ms, last_segment)| {
                let catalog = restore_request(op, 2, 4).catalog;
                ClientCall::Continue(SegmentRequest { op, segment, until_ms, last_segment, catalog })
            }),
        ];
        let caller = prop_oneof![9 => Just(NodeAddr::Client), 1 => any_node()];
        let client = (caller, call).prop_map(|(from, call)| CoordinatorInput::Client(from, call));
        let timer = prop_oneof![
            (ops.clone(), any_op_tablet(), 0u32..4, 0u32..4).prop_map(|(op, tablet, increment, attempt)| {
                CoordinatorTimer::RequestTimeout { op, tablet, increment, attempt }
            }),
            Just(CoordinatorTimer::RetryDue),
            ops.clone().prop_map(|op| CoordinatorTimer::Deadline { op }),
            (ops, 0u32..4).prop_map(|(op, increment)| CoordinatorTimer::IncrementDeadline { op, increment }),
        ];
        prop_oneof![
            10 => answer,
            1 => forged,
            1 => stray,
            2 => client,
            4 => any::<usize>().prop_map(CoordinatorInput::Timer),
            1 => timer.prop_map(CoordinatorInput::ForgedTimer),
            1 => Just(CoordinatorInput::Reboot),
        ]
    }

    fn running_increment(durable: &CoordinatorDurable, op: OperationId) -> Option<u32> {
        match &durable.operations.get(&op)?.status {
            OperationStatus::Running(running) => Some(running.increment),
            _ => None,
        }
    }

    /// Drives a coordinator that has started `OP` ([`two_table_request`]) through `inputs`, `delays[i]` ms
    /// apart, and checks every step:
    /// - an operation moves past increment k only once every tablet of it has answered k with success, from
    ///   itself and in the current generation, and never moves back; an ended operation stays as it ended;
    /// - an apply request goes to the tablet it names, in the current generation, for the increment the
    ///   operation has durably reached; a start is answered only once the operation is durable;
    /// - nothing changes the durable state without a persist of it; a reboot bumps the generation, nothing else.
    fn run_coordinator(config: CoordinatorConfig, inputs: &[(u64, CoordinatorInput)]) -> Result<(), TestCaseError> {
        let (mut coordinator, mut out) = Coordinator::boot(config.clone(), None, SEED, 0);
        out.extend(coordinator.start(0, two_table_request(OP)).expect("the start succeeds"));
        let mut now_ms = 0u64;
        let mut sent: Vec<ApplyRequest> = Vec::new();
        let mut timers: Vec<(u64, CoordinatorTimer)> = Vec::new();
        let mut last_persisted = CoordinatorDurable::default();
        // (op, tablet, increment) answered with success by that tablet in the generation of the time.
        let mut successes: BTreeSet<(OperationId, TabletId, u32)> = BTreeSet::new();
        let mut before = CoordinatorDurable::default();
        let mut generation_before = 0;
        let mut input: Option<&CoordinatorInput> = None;
        for step in 0..=inputs.len() {
            let context = |out: &[CoordinatorOutput]| format!("step {step}, {input:?}, outputs {out:?}");
            for output in &out {
                match output {
                    Output::Persist { state, .. } => last_persisted = state.clone(),
                    Output::SetTimer { at_ms, timer } => timers.push((*at_ms, timer.clone())),
                    Output::Send { to, msg: Message::Apply(request) } => {
                        prop_assert_eq!(*to, NodeAddr::Shard(request.tablet), "{}", context(&out));
                        prop_assert_eq!(request.generation, coordinator.generation(), "{}", context(&out));
                        prop_assert_eq!(
                            running_increment(&last_persisted, request.op),
                            Some(request.increment),
                            "asked for an increment not durably reached: {}",
                            context(&out)
                        );
                        sent.push(request.clone());
                    }
                    Output::Send { to, msg: Message::ClientReply(reply) } => {
                        prop_assert_eq!(*to, NodeAddr::Client, "{}", context(&out));
                        if let ClientAnswer::Started { op } = reply.answer {
                            prop_assert!(last_persisted.operations.contains_key(&op), "{}", context(&out));
                        }
                    }
                    Output::Send { .. } => return Err(TestCaseError::fail(format!("odd send: {}", context(&out)))),
                    Output::Download(_) | Output::Report(_) => {}
                }
            }
            let after = coordinator.durable();
            prop_assert_eq!(after, &last_persisted, "durable state changed without a persist: {}", context(&out));
            let rebooted = matches!(input, Some(CoordinatorInput::Reboot));
            let expected_generation = generation_before + u64::from(rebooted || step == 0);
            prop_assert_eq!(coordinator.generation(), expected_generation, "{}", context(&out));
            for (op, was) in before.operations.iter() {
                let Some(now) = after.operations.get(op) else {
                    prop_assert!(!matches!(was.status, OperationStatus::Running(_)), "a running op forgotten");
                    continue;
                };
                let reached = match (&was.status, &now.status) {
                    (OperationStatus::Running(was), OperationStatus::Running(now)) => {
                        prop_assert!(now.increment >= was.increment, "went back: {}", context(&out));
                        if now.increment == was.increment {
                            prop_assert!(was.done.is_subset(&now.done), "lost a result: {}", context(&out));
                        }
                        was.increment..now.increment
                    }
                    (OperationStatus::Running(was), OperationStatus::Done { increments, .. }) => {
                        was.increment..*increments
                    }
                    (OperationStatus::Running(_), OperationStatus::Failed { .. }) => 0..0,
                    (ended, now) => {
                        prop_assert_eq!(ended, now, "an ended operation changed: {}", context(&out));
                        0..0
                    }
                };
                for increment in reached {
                    for tablet in now.tablets() {
                        prop_assert!(
                            successes.contains(&(*op, tablet, increment)),
                            "{op} passed increment {increment} without a success from {tablet}: {}",
                            context(&out)
                        );
                    }
                }
            }
            let Some((delay_ms, next)) = inputs.get(step) else { break };
            input = Some(next);
            before = after.clone();
            generation_before = coordinator.generation();
            now_ms += delay_ms;
            out = match next.clone() {
                CoordinatorInput::Answer { pick, outcome, tamper } => {
                    if sent.is_empty() {
                        Vec::new()
                    } else {
                        // Mostly one of the newest requests; now and then a much older one.
                        let back = if pick % 8 == 0 { pick / 8 % sent.len() } else { pick % sent.len().min(4) };
                        let mut reply = sent[sent.len() - 1 - back].reply(outcome);
                        let mut from = NodeAddr::Shard(reply.tablet);
                        match tamper {
                            Tamper::None => {}
                            Tamper::Op => reply.op += 1,
                            Tamper::Generation => reply.generation = reply.generation.saturating_sub(1),
                            Tamper::Attempt => reply.attempt += 1,
                            Tamper::Increment => reply.increment += 1,
                            Tamper::Tablet => {
                                // The next tablet of the operation: orders/0, orders/1, lines/0, round again.
                                let tablets = [TabletId::new(0, 0), TabletId::new(0, 1), TabletId::new(1, 0)];
                                let at = tablets.iter().position(|t| *t == reply.tablet).unwrap_or(0);
                                reply.tablet = tablets[(at + 1) % tablets.len()];
                                from = NodeAddr::Shard(reply.tablet);
                            }
                            Tamper::Sender(node) => from = node,
                        }
                        deliver(&mut coordinator, &mut successes, now_ms, from, reply)
                    }
                }
                CoordinatorInput::Forged(from, reply) => deliver(&mut coordinator, &mut successes, now_ms, from, reply),
                CoordinatorInput::Stray(from, msg) => coordinator.handle_message(now_ms, from, msg),
                CoordinatorInput::Client(from, call) => {
                    coordinator.handle_message(now_ms, from, Message::Client(ClientRequest { call_id: 1, call }))
                }
                CoordinatorInput::Timer(pick) => {
                    // Mostly a timer due within seconds; now and then any, a deadline an hour off included.
                    let soon: Vec<&(u64, CoordinatorTimer)> =
                        timers.iter().filter(|(at_ms, _)| pick % 16 == 0 || *at_ms <= now_ms + 5_000).collect();
                    match soon.get(pick % soon.len().max(1)).map(|timer| (*timer).clone()) {
                        Some((at_ms, timer)) => {
                            now_ms = now_ms.max(at_ms);
                            coordinator.handle_timer(now_ms, timer)
                        }
                        None => Vec::new(),
                    }
                }
                CoordinatorInput::ForgedTimer(timer) => coordinator.handle_timer(now_ms, timer),
                CoordinatorInput::Reboot => {
                    let (rebooted, out) = Coordinator::boot(config.clone(), Some(last_persisted.clone()), SEED, now_ms);
                    coordinator = rebooted;
                    out
                }
            };
        }
        Ok(())
    }

    /// Hands `reply` to the coordinator from `from`, noting a success the coordinator may count.
    fn deliver(
        coordinator: &mut Coordinator,
        successes: &mut BTreeSet<(OperationId, TabletId, u32)>,
        now_ms: u64,
        from: NodeAddr,
        reply: ApplyReply,
    ) -> Vec<CoordinatorOutput> {
        let success = matches!(reply.outcome, ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied);
        if success && from == NodeAddr::Shard(reply.tablet) && reply.generation == coordinator.generation() {
            successes.insert((reply.op, reply.tablet, reply.increment));
        }
        coordinator.handle_message(now_ms, from, Message::Reply(reply))
    }

    /// Deadlines long enough for most runs to end by their answers; a long pause still reaches them now and then.
    fn hostile_coordinator_config() -> CoordinatorConfig {
        CoordinatorConfig { deadline_ms: 600_000, increment_deadline_ms: 300_000, ..coordinator_config() }
    }

    fn coordinator_inputs() -> impl Strategy<Value = Vec<(u64, CoordinatorInput)>> {
        let delay = prop_oneof![30 => 0u64..2_000, 1 => 0u64..100_000];
        prop::collection::vec((delay, any_coordinator_input()), 1..2 * MAX_STEPS)
    }

    proptest! {
        #![proptest_config(fixed(256))]

        #[test]
        fn a_coordinator_survives_any_replies_calls_timers_and_reboots(inputs in coordinator_inputs()) {
            run_coordinator(hostile_coordinator_config(), &inputs)?;
        }
    }

    #[test]
    fn the_coordinator_property_fails_for_a_coordinator_that_advances_too_soon_goes_back_or_lets_a_table_run_ahead() {
        for (bug, broken) in [
            (CoordinatorBug::AdvanceOnFirstReport, "without a success from"),
            (CoordinatorBug::LostReportIsSuccess, "without a success from"),
            (CoordinatorBug::DoneOnFirstFinalReport, "without a success from"),
            (CoordinatorBug::RestartChainOnReboot, "lost a result"),
            (CoordinatorBug::TablesRunAhead, "asked for an increment not durably reached"),
        ] {
            let config = CoordinatorConfig { bug: Some(bug), ..hostile_coordinator_config() };
            let result = runner().run(&coordinator_inputs(), |inputs| run_coordinator(config.clone(), &inputs));
            assert_fails_with(result, broken, bug);
        }
    }

    // -- frames ---------------------------------------------------------------------------------------------

    /// Frames of every kind a node reads: messages off the network, and the durable states it loads at boot.
    fn sample_frames() -> Vec<Vec<u8>> {
        let (coordinator, requests) = started(coordinator_config(), 3, 3, 0);
        let request = requests[0].clone();
        let mut shard = fresh_shard(shard_config());
        let applied = apply_with(&mut shard, &apply_request(1, 0, 0), full_changes());
        let start = ClientRequest { call_id: 9, call: ClientCall::Start(restore_request(OP, 2, 3)) };
        let status = ClientReply { call_id: 9, answer: ClientAnswer::Status(coordinator.status(OP)) };
        vec![
            encode_frame(&Message::Apply(request.clone())),
            encode_frame(&Message::Reply(request.reply(transient()))),
            encode_frame(&Message::Client(start)),
            encode_frame(&Message::ClientReply(Box::new(status))),
            encode_frame(coordinator.durable()),
            encode_frame(&persisted_then_applied(&applied, &apply_request(1, 0, 0))),
        ]
    }

    /// `bytes` decodes as a `T` that encodes and decodes to itself, or is an error; never a panic.
    fn decodes_stably<T>(bytes: &[u8]) -> Result<(), TestCaseError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        if let Ok(value) = decode_frame::<T>(bytes) {
            prop_assert_eq!(decode_frame::<T>(&encode_frame(&value)).ok(), Some(value));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(fixed(256))]

        /// A frame damaged on the wire or on disk (bytes changed, its end cut) decodes to an error or to a value,
        /// as any of the types a node reads: never a panic, never a value that does not survive its own round trip.
        #[test]
        fn a_damaged_frame_is_an_error_or_a_value_never_a_panic(
            pick in any::<usize>(),
            flips in prop::collection::vec((any::<usize>(), 1u8..), 0..4),
            keep in any::<usize>(),
        ) {
            let frames = sample_frames();
            let mut bytes = frames[pick % frames.len()].clone();
            for (at, mask) in flips {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            bytes.truncate(keep % (bytes.len() + 1));
            decodes_stably::<Message>(&bytes)?;
            decodes_stably::<CoordinatorDurable>(&bytes)?;
            decodes_stably::<ShardDurable>(&bytes)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Persisted formats
// ---------------------------------------------------------------------------------------------------------------

/// A state file holds a machine's durable state as a frame. A build that encodes durable states otherwise must
/// raise `lockstep::io::STATE_FORMAT`, so that a node refuses the state files of another build with a message
/// saying so instead of misreading them. These pins fail on any change of the encoding: raise the format, then
/// update them.
#[test]
fn durable_encodings_are_pinned_to_the_state_format() {
    use lockstep::io::STATE_FORMAT;
    use lockstep::protocol::encode_frame;

    let config = CoordinatorConfig { increment_deadline_ms: 5_000, ..coordinator_config() };
    // Mid-restore: a tablet done, a tablet that failed once and waits for its retry, a tablet not yet answered.
    let (mut coordinator, requests) = started(config, 3, 2, 0);
    reply(&mut coordinator, 10, &requests[0], ApplyOutcome::Applied);
    reply(&mut coordinator, 20, &requests[2], transient());
    let running = encode_frame(coordinator.durable());
    // Once the chain's own file is durable, a state names the file instead of holding the chain.
    lockstep::host::DurableState::mark_stored(coordinator.durable());
    let stored = encode_frame(coordinator.durable());
    assert!(stored.len() + 200 < running.len(), "{} against {}", stored.len(), running.len());
    // Then failed at the increment's deadline, the error listing the tablets not done.
    let out = coordinator.handle_timer(5_000, CoordinatorTimer::IncrementDeadline { op: OP, increment: 0 });
    let failed = encode_frame(&last_persisted(&out));
    let rows = SortedRows::from_iter([(1, 10), (600, 60), (u64::MAX, 0)]);
    let shard = encode_frame(&ShardDurable { op: Some(OP), applied_through: Some(1), rows: Arc::new(rows) });

    let pin = |bytes: &[u8]| (bytes.len(), format!("{:08x}", crc32fast::hash(bytes)));
    let found = [pin(&running), pin(&stored), pin(&failed), pin(&shard)];
    let pinned = [
        (281, "8eb0c69c".to_string()),
        (74, "01d546c6".to_string()),
        (59, "c92b0dbf".to_string()),
        (53, "64db6c42".to_string()),
    ];
    assert_eq!(
        (STATE_FORMAT, found.clone()),
        (5, pinned),
        "the encoding of durable states changed (or STATE_FORMAT did): raise STATE_FORMAT in src/io.rs, then pin \
         the new format and encodings here: {found:?}"
    );
}

/// Frames between nodes are messages encoded. A build that encodes them otherwise must raise
/// `lockstep::protocol::PROTOCOL_VERSION`, which the real transport says in every hello, so that nodes of two
/// builds refuse each other by name instead of misreading each other's frames. These pins fail on any change of
/// the encoding: raise the version, then update them.
#[test]
fn message_encodings_are_pinned_to_the_protocol_version() {
    use lockstep::protocol::{ClientCall, ClientRequest, PROTOCOL_VERSION, encode_frame};

    let (mut coordinator, requests) = started(coordinator_config(), 2, 3, 0);
    let start = Message::Client(ClientRequest { call_id: 1, call: ClientCall::Start(restore_request(OP, 2, 3)) });
    let apply = Message::Apply(requests[0].clone());
    let applied = Message::Reply(answer(&requests[0], ApplyOutcome::Applied));
    let expected = BundleOf { backup_id: 1, kind: BackupKind::Full, tablet: tablet(1) };
    let found = BundleOf { backup_id: 2, kind: BackupKind::Incremental, tablet: tablet(0) };
    let cause = ShardFailure::WrongBundle { object: requests[1].object.clone(), expected, found };
    let refused = Message::Reply(answer(&requests[1], ApplyOutcome::Failed { permanent: true, cause }));
    let status = Message::Client(ClientRequest { call_id: 2, call: ClientCall::Status { op: OP } });
    let out = coordinator.handle_message(5, NodeAddr::Client, status.clone());
    let [Output::Send { msg: view, .. }] = out.as_slice() else { panic!("one answer, got {out:?}") };
    // The view of an operation failed at its deadline, which lists the tablets not done and why.
    reply(&mut coordinator, 6, &requests[0], transient());
    coordinator.handle_timer(1_000_000, CoordinatorTimer::Deadline { op: OP });
    let out = coordinator.handle_message(1_000_001, NodeAddr::Client, status.clone());
    let [Output::Send { msg: failed, .. }] = out.as_slice() else { panic!("one answer, got {out:?}") };
    assert!(failed.to_string().contains("1 failed attempt: bundle rejected"), "{failed}");

    let catalog = restore_request(OP, 2, 3).catalog;
    let segment = lockstep::coordinator::SegmentRequest {
        op: OP,
        segment: 2,
        until_ms: Some(9_000),
        last_segment: true,
        catalog,
    };
    let next = Message::Client(ClientRequest { call_id: 3, call: ClientCall::Continue(segment) });

    let pin = |bytes: &[u8]| (bytes.len(), format!("{:08x}", crc32fast::hash(bytes)));
    let messages = [&start, &apply, &applied, &refused, &status, view, failed, &next];
    let mut found: Vec<(usize, String)> = messages.iter().map(|m| pin(&encode_frame(*m))).collect();
    found.push(pin(&encode_frame(&NodeAddr::Shard(tablet(1)))));
    let pinned: Vec<(usize, String)> = [
        (242, "9a596e21"),
        (42, "f38a77fb"),
        (8, "a77332dc"),
        (51, "c3ae460e"),
        (4, "249b34d8"),
        (39, "70081289"),
        (51, "4af11423"),
        (226, "bf0ff970"),
        (3, "898483b3"),
    ]
    .map(|(len, crc)| (len, crc.to_string()))
    .to_vec();
    assert_eq!(
        (PROTOCOL_VERSION, found.clone()),
        (4, pinned),
        "the encoding of messages changed (or PROTOCOL_VERSION did): raise PROTOCOL_VERSION in src/protocol.rs, then \
         pin the new version and encodings here: {found:?}"
    );
}

/// A running operation's state holds its chain in full until the chain's own file is durable, then names the file
/// by the chain's digest; read back, a state that names the file needs it, and refuses one missing or damaged.
#[test]
fn a_running_state_names_its_chain_file_once_that_is_durable_and_is_read_back_whole_from_it() {
    use lockstep::host::DurableState;
    use lockstep::protocol::{decode_frame, encode_frame};

    let (coordinator, _) = started(coordinator_config(), 3, 4, 0);
    let durable = coordinator.durable().clone();
    let files: Vec<(String, Vec<u8>)> = durable.unstored_files().into_iter().map(|(n, b)| (n, b.to_vec())).collect();
    let [(name, bytes)] = files.as_slice() else { panic!("one chain file, got {files:?}") };
    assert!(name.starts_with("chain-"), "{name}");
    let inline = encode_frame(&durable);
    durable.mark_stored();
    assert!(durable.unstored_files().is_empty(), "written once");
    let stored = encode_frame(&durable);
    assert!(
        stored.len() + bytes.len() <= inline.len() + 16,
        "{} + {} against {}",
        stored.len(),
        bytes.len(),
        inline.len()
    );

    let read_back: CoordinatorDurable = decode_frame(&stored).expect("decodes");
    let missing = read_back.clone().attach(&mut |_| Ok(None)).expect_err("the file is needed");
    assert_eq!(missing, format!("{name} is missing"));
    let cut = bytes[..bytes.len() - 1].to_vec();
    let damaged = read_back.clone().attach(&mut |_| Ok(Some(cut.clone()))).expect_err("a damaged file is refused");
    assert!(damaged.starts_with(&format!("{name}: restore chain of")), "{damaged}");
    let mut whole = read_back.clone();
    whole.attach(&mut |n| Ok((n == name.as_str()).then(|| bytes.clone()))).expect("attaches");
    assert_eq!(whole, durable);
    assert!(whole.unstored_files().is_empty(), "a chain read from its file is stored: the next state names it");

    // A state that holds its chain in full needs no file.
    let mut held: CoordinatorDurable = decode_frame(&inline).expect("decodes");
    held.attach(&mut |n| panic!("no file is read, asked for {n}")).expect("nothing to attach");
    assert_eq!(held, durable);
}
