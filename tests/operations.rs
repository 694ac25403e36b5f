//! The restore-operation surface of the coordinator, driven by hand as a pure state machine: the lifecycle of an
//! operation (start, status, list, forget, idempotent start), the typed refusals of a start, the operation and
//! per-increment deadlines, the barrier that holds every table and index at the same increment, the cap on
//! tables in flight, the `TablesRunAhead` bug that breaks the barrier, and resuming from durable state after a
//! reboot. Every input is a method call with the time as an argument; every assertion is on the returned outputs,
//! on `status`/`list`, or on the durable state.

use std::collections::{BTreeSet, VecDeque};

use lockstep::coordinator::{
    AttemptFailure, Coordinator, CoordinatorBug, CoordinatorConfig, CoordinatorDurable, CoordinatorOutput,
    CoordinatorTimer, LifecycleError, OperationState, OperationSummary, ProgressMark, RestoreError, RestoreRequest,
    SegmentError, SegmentRequest, StartError, TableState, TabletNotDone, TabletProgress,
};
use lockstep::model::{BackupKind, BackupManifest, ChainError, IncrementIndex, TableId, TableSpec, TabletId};
use lockstep::protocol::{
    ApplyOutcome, ApplyRequest, Message, NodeAddr, OperationId, Output, ShardFailure, ShardFailureKind,
};

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

const SEED: u64 = 7;
const COLLECTION: &str = "sales-backups";
const DEADLINE_MS: u64 = 60_000;
const INCREMENT_DEADLINE_MS: u64 = 20_000;

/// Caps high enough that every tablet of a small restore is sent its request at once.
fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        max_in_flight_shards: 64,
        max_in_flight_tables: 8,
        request_timeout_ms: 1_000,
        backoff_base_ms: 100,
        backoff_cap_ms: 800,
        deadline_ms: DEADLINE_MS,
        increment_deadline_ms: INCREMENT_DEADLINE_MS,
        non_empty_tables: BTreeSet::new(),
        bug: None,
    }
}

fn table(id: u32, shard_count: u32) -> TableSpec {
    TableSpec { id: TableId(id), name: format!("table{id}"), shard_count, index_of: None }
}

fn index(id: u32, base: u32, shard_count: u32) -> TableSpec {
    TableSpec { id: TableId(id), name: format!("index{id}"), shard_count, index_of: Some(TableId(base)) }
}

/// `backups` backups of `tables`: backup 1 full, the others incremental, taken in id order, one object per shard.
fn catalog(tables: &[TableSpec], backups: u64) -> Vec<BackupManifest> {
    (1..=backups)
        .map(|backup_id| BackupManifest {
            backup_id,
            kind: if backup_id == 1 { BackupKind::Full } else { BackupKind::Incremental },
            taken_at_ms: backup_id * 1_000,
            tables: tables
                .iter()
                .map(|t| (t.id, t.tablets().map(|tablet| BackupManifest::object_name(backup_id, tablet)).collect()))
                .collect(),
        })
        .collect()
}

fn request(op: OperationId, collection: &str, tables: Vec<TableSpec>, backups: u64) -> RestoreRequest {
    let catalog = catalog(&tables, backups);
    RestoreRequest {
        op,
        collection: collection.to_string(),
        tables,
        catalog: catalog.into(),
        until_ms: None,
        last_segment: true,
    }
}

fn boot(config: CoordinatorConfig) -> Coordinator {
    Coordinator::boot(config, None, SEED, 0).0
}

/// Starts `request`, which must be accepted, and returns the apply requests the start sent.
fn start(coordinator: &mut Coordinator, now_ms: u64, request: RestoreRequest) -> Vec<ApplyRequest> {
    applies(&coordinator.start(now_ms, request).expect("the start is accepted"))
}

/// Starts `request`, which must be refused without a trace, and returns the refusal.
fn refused(coordinator: &mut Coordinator, request: RestoreRequest) -> StartError {
    let before = coordinator.durable().clone();
    let error = coordinator.start(5, request).expect_err("the start is refused");
    assert_eq!(coordinator.durable(), &before, "a refused start changes no durable state");
    error
}

/// The apply requests among `out`, each checked to be addressed to the tablet it names.
fn applies(out: &[CoordinatorOutput]) -> Vec<ApplyRequest> {
    out.iter()
        .filter_map(|output| match output {
            Output::Send { to, msg: Message::Apply(request) } => {
                assert_eq!(*to, NodeAddr::Shard(request.tablet), "an apply request goes to its tablet");
                Some(request.clone())
            }
            _ => None,
        })
        .collect()
}

fn timers(out: &[CoordinatorOutput]) -> Vec<(u64, CoordinatorTimer)> {
    out.iter()
        .filter_map(|output| match output {
            Output::SetTimer { at_ms, timer } => Some((*at_ms, timer.clone())),
            _ => None,
        })
        .collect()
}

fn last_persisted(out: &[CoordinatorOutput]) -> Option<CoordinatorDurable> {
    out.iter().rev().find_map(|output| match output {
        Output::Persist { state, .. } => Some(state.clone()),
        _ => None,
    })
}

fn reports(out: &[CoordinatorOutput]) -> Vec<&str> {
    out.iter()
        .filter_map(|output| match output {
            Output::Report(text) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn tablets(requests: &[ApplyRequest]) -> BTreeSet<TabletId> {
    requests.iter().map(|r| r.tablet).collect()
}

/// Every tablet of the tables with these ids, as `TableSpec::tablets` names them.
fn tablets_of(tables: &[TableSpec], ids: &[u32]) -> BTreeSet<TabletId> {
    tables.iter().filter(|t| ids.contains(&t.id.0)).flat_map(TableSpec::tablets).collect()
}

/// The answer of `request`'s tablet, delivered to the coordinator.
fn reply(
    coordinator: &mut Coordinator,
    now_ms: u64,
    request: &ApplyRequest,
    outcome: ApplyOutcome,
) -> Vec<CoordinatorOutput> {
    coordinator.handle_message(now_ms, NodeAddr::Shard(request.tablet), Message::Reply(request.reply(outcome)))
}

fn applied(coordinator: &mut Coordinator, now_ms: u64, request: &ApplyRequest) -> Vec<CoordinatorOutput> {
    reply(coordinator, now_ms, request, ApplyOutcome::Applied)
}

fn transient() -> ApplyOutcome {
    ApplyOutcome::Failed {
        permanent: false,
        cause: ShardFailure::DownloadFailed { object: "o".to_string(), attempts: 3, detail: "503".to_string() },
    }
}

/// Answers Applied to `pending` and to every request that follows, first come first served, until none is left.
/// Returns every output.
fn apply_everything(coordinator: &mut Coordinator, now_ms: u64, pending: Vec<ApplyRequest>) -> Vec<CoordinatorOutput> {
    let mut pending: VecDeque<ApplyRequest> = pending.into();
    let mut all = Vec::new();
    while let Some(request) = pending.pop_front() {
        let out = applied(coordinator, now_ms, &request);
        pending.extend(applies(&out));
        all.extend(out);
        assert!(all.len() < 10_000, "the restore terminates");
    }
    all
}

fn state(coordinator: &Coordinator, op: OperationId) -> OperationState {
    coordinator.status(op).expect("the operation is known").state
}

fn table_state(coordinator: &Coordinator, id: u32) -> Option<TableState> {
    coordinator.durable().tables.get(&TableId(id)).copied()
}

fn error_of(coordinator: &Coordinator, op: OperationId) -> RestoreError {
    coordinator.status(op).expect("the operation is known").error.expect("the operation failed")
}

// ---------------------------------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_started_restore_shows_every_tablet_and_marks_its_tables_restoring() {
    let tables = vec![table(1, 2), table(2, 1)];
    // Two requests at a time: table 1's tablets go out, table 2's waits.
    let mut coordinator = boot(CoordinatorConfig { max_in_flight_shards: 2, ..config() });
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, tables.clone(), 3));
    assert_eq!(tablets(&sent), tablets_of(&tables, &[1]));
    assert!(sent.iter().all(|r| r.increment == 0 && r.backup_id == 1 && r.kind == BackupKind::Full));

    let view = coordinator.status(1).unwrap();
    assert_eq!(view.state, OperationState::Running);
    assert_eq!(view.collection, COLLECTION);
    assert_eq!(view.increment, Some(0));
    assert_eq!(view.increments, 3);
    assert_eq!(view.error, None);
    let ids: Vec<TableId> = view.tables.iter().map(|t| t.table).collect();
    assert_eq!(ids, vec![TableId(1), TableId(2)]);
    for table in &view.tables {
        assert_eq!(table.state, Some(TableState::Restoring { op: 1 }), "{}", table.name);
    }
    assert_eq!(
        view.tables[0].tablets,
        vec![(TabletId::new(1, 0), TabletProgress::InFlight), (TabletId::new(1, 1), TabletProgress::InFlight)]
    );
    assert_eq!(view.tables[1].tablets, vec![(TabletId::new(2, 0), TabletProgress::Waiting)]);
    assert_eq!(coordinator.durable().sources_in_use.get(COLLECTION), Some(&1));
    assert_eq!(
        coordinator.list(),
        vec![OperationSummary { op: 1, collection: COLLECTION.to_string(), state: OperationState::Running }]
    );
}

#[test]
fn a_restore_is_done_once_every_tablet_applied_every_increment() {
    let tables = vec![table(1, 2), table(2, 1)];
    let mut coordinator = boot(CoordinatorConfig { max_in_flight_shards: 2, ..config() });
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, tables.clone(), 3));
    let out = apply_everything(&mut coordinator, 20, sent);

    // Every tablet was asked for every increment, in order.
    let asked: Vec<(TabletId, IncrementIndex, u64)> =
        applies(&out).iter().map(|r| (r.tablet, r.increment, r.backup_id)).collect();
    for tablet in tablets_of(&tables, &[1, 2]) {
        let increments: Vec<(IncrementIndex, u64)> =
            asked.iter().filter(|(t, ..)| *t == tablet).map(|(_, i, b)| (*i, *b)).collect();
        let expected = if tablet.table == TableId(1) { vec![(1, 2), (2, 3)] } else { vec![(0, 1), (1, 2), (2, 3)] };
        assert_eq!(increments, expected, "requests to {tablet}");
    }

    let view = coordinator.status(1).unwrap();
    assert_eq!(view.state, OperationState::Done);
    assert_eq!(view.increment, None);
    assert_eq!(view.increments, 3);
    for table in &view.tables {
        assert_eq!(table.state, Some(TableState::Restored { op: 1 }), "{}", table.name);
        assert!(table.tablets.iter().all(|(_, p)| *p == TabletProgress::Finished), "{}", table.name);
    }
    assert!(!coordinator.durable().sources_in_use.contains_key(COLLECTION), "the collection is released");
    assert_eq!(last_persisted(&out).as_ref(), Some(coordinator.durable()), "the end is persisted");
    assert!(reports(&out).iter().any(|r| r.contains("done")), "{:?}", reports(&out));
    assert_eq!(coordinator.list()[0].state, OperationState::Done);
}

#[test]
fn a_running_operation_cannot_be_forgotten() {
    let mut coordinator = boot(config());
    start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 1));
    let error = coordinator.forget(1).unwrap_err();
    assert_eq!(error, LifecycleError::StillRunning { op: 1 });
    assert!(error.to_string().contains("still running"), "{error}");
    assert_eq!(state(&coordinator, 1), OperationState::Running);
}

#[test]
fn a_finished_operation_is_forgotten_durably_and_is_gone_from_status_and_list() {
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 2)], 2));
    apply_everything(&mut coordinator, 20, sent);
    assert_eq!(state(&coordinator, 1), OperationState::Done);

    let out = coordinator.forget(1).expect("a done operation can be forgotten");
    let persisted = last_persisted(&out).expect("forgetting is persisted");
    assert!(!persisted.operations.contains_key(&1));
    assert_eq!(coordinator.status(1), Err(LifecycleError::NotFound { op: 1 }));
    assert!(coordinator.list().is_empty());
    assert_eq!(coordinator.forget(1), Err(LifecycleError::NotFound { op: 1 }), "forgetting twice");
    // The table still holds the restored rows: forgetting the operation does not make it a target again.
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restored { op: 1 }));
}

#[test]
fn forgetting_or_asking_for_an_unknown_operation_is_not_found() {
    let mut coordinator = boot(config());
    assert_eq!(coordinator.forget(9), Err(LifecycleError::NotFound { op: 9 }));
    assert_eq!(coordinator.status(9), Err(LifecycleError::NotFound { op: 9 }));
    assert!(LifecycleError::NotFound { op: 9 }.to_string().contains('9'));
}

#[test]
fn starting_the_same_operation_again_is_a_no_op() {
    let mut coordinator = boot(config());
    let first = request(1, COLLECTION, vec![table(1, 2)], 2);
    let sent = start(&mut coordinator, 10, first.clone());
    let before = coordinator.durable().clone();
    assert_eq!(coordinator.start(20, first.clone()), Ok(Vec::new()), "a retried start while running");
    assert_eq!(coordinator.durable(), &before);

    apply_everything(&mut coordinator, 30, sent);
    assert_eq!(coordinator.start(40, first), Ok(Vec::new()), "a retried start after the operation is done");
    assert_eq!(state(&coordinator, 1), OperationState::Done, "the retry does not restart it");
}

#[test]
fn reusing_an_operation_id_for_another_request_is_refused() {
    let mut coordinator = boot(config());
    start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 2)], 2));
    let other_tables = refused(&mut coordinator, request(1, COLLECTION, vec![table(2, 2)], 2));
    assert_eq!(other_tables, StartError::OperationIdTaken { op: 1 });
    let other_collection = refused(&mut coordinator, request(1, "other", vec![table(1, 2)], 2));
    assert_eq!(other_collection, StartError::OperationIdTaken { op: 1 });
    assert!(other_collection.to_string().contains("operation id 1"), "{other_collection}");
}

#[test]
fn an_operation_id_is_never_used_again_not_even_after_its_operation_is_forgotten() {
    let mut coordinator = boot(config());
    let first = request(7, COLLECTION, vec![table(1, 1)], 1);
    let sent = start(&mut coordinator, 10, first.clone());
    let missing = ShardFailure::ObjectMissing { object: sent[0].object.clone() };
    reply(&mut coordinator, 20, &sent[0], ApplyOutcome::Failed { permanent: true, cause: missing });
    assert_eq!(state(&coordinator, 7), OperationState::Failed);
    coordinator.forget(7).expect("a failed operation can be forgotten");
    assert_eq!(coordinator.durable().newest_op, Some(7), "the newest id outlives the forgotten operation");

    // A late duplicate of the first start, or a new restore under the same id: either would start over a table
    // whose shards still hold rows of operation 7, and they would answer its increments as applied.
    assert_eq!(refused(&mut coordinator, first), StartError::OperationIdNotNew { op: 7, newest: 7 });
    let lower = refused(&mut coordinator, request(3, COLLECTION, vec![table(1, 1)], 2));
    assert_eq!(lower, StartError::OperationIdNotNew { op: 3, newest: 7 });
    assert!(lower.to_string().contains("operation id 3 is not new: operation 7 was started before"), "{lower}");
    start(&mut coordinator, 30, request(8, COLLECTION, vec![table(1, 1)], 2));
    assert_eq!(coordinator.durable().newest_op, Some(8));
    // The rule survives a reboot.
    let durable = coordinator.durable().clone();
    let (mut rebooted, _) = Coordinator::boot(config(), Some(durable), SEED, 40);
    let error = rebooted.start(50, request(8, "other", vec![table(2, 1)], 1)).expect_err("taken");
    assert_eq!(error, StartError::OperationIdTaken { op: 8 });
    let error = rebooted.start(50, request(4, "other", vec![table(2, 1)], 1)).expect_err("not new");
    assert_eq!(error, StartError::OperationIdNotNew { op: 4, newest: 8 });
}

// ---------------------------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_second_restore_of_a_collection_in_use_is_refused() {
    let mut coordinator = boot(config());
    start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 1));
    let error = refused(&mut coordinator, request(2, COLLECTION, vec![table(2, 1)], 1));
    assert_eq!(error, StartError::CollectionBusy { collection: COLLECTION.to_string(), running: 1 });
    let message = error.to_string();
    assert!(message.contains(COLLECTION) && message.contains("already being restored"), "{message}");
}

#[test]
fn a_restore_onto_a_table_being_restored_is_refused() {
    let mut coordinator = boot(config());
    start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1), table(2, 1)], 1));
    let error = refused(&mut coordinator, request(2, "other", vec![table(3, 1), table(2, 1)], 1));
    assert_eq!(error, StartError::TargetBusy { table: TableId(2), running: 1 });
    let message = error.to_string();
    assert!(message.contains("t2") && message.contains("operation 1"), "{message}");
}

#[test]
fn a_restore_onto_a_table_that_holds_rows_is_refused() {
    let mut coordinator = boot(CoordinatorConfig { non_empty_tables: BTreeSet::from([TableId(2)]), ..config() });
    let error = refused(&mut coordinator, request(1, COLLECTION, vec![table(1, 1), table(2, 1)], 1));
    assert_eq!(error, StartError::TargetNotEmpty { table: TableId(2) });
    let message = error.to_string();
    assert!(message.contains("t2") && message.contains("not empty"), "{message}");
}

#[test]
fn a_restore_onto_a_table_restored_earlier_is_refused() {
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 1));
    apply_everything(&mut coordinator, 20, sent);
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restored { op: 1 }));
    let error = refused(&mut coordinator, request(2, "other", vec![table(1, 1)], 1));
    assert_eq!(error, StartError::TargetNotEmpty { table: TableId(1) });
    assert!(error.to_string().contains("t1"), "{error}");
}

#[test]
fn a_restore_onto_a_table_whose_restore_failed_is_allowed() {
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 1));
    let missing = ShardFailure::ObjectMissing { object: sent[0].object.clone() };
    reply(&mut coordinator, 20, &sent[0], ApplyOutcome::Failed { permanent: true, cause: missing });
    assert_eq!(state(&coordinator, 1), OperationState::Failed);
    assert_eq!(table_state(&coordinator, 1), Some(TableState::RestoreFailed { op: 1 }));

    let again = start(&mut coordinator, 30, request(2, COLLECTION, vec![table(1, 1)], 1));
    assert_eq!(tablets(&again), BTreeSet::from([TabletId::new(1, 0)]));
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restoring { op: 2 }));
}

#[test]
fn a_collection_is_free_again_once_its_restore_is_done() {
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 2));
    apply_everything(&mut coordinator, 20, sent);
    let again = start(&mut coordinator, 30, request(2, COLLECTION, vec![table(2, 1)], 2));
    assert_eq!(tablets(&again), BTreeSet::from([TabletId::new(2, 0)]));
    assert_eq!(coordinator.durable().sources_in_use.get(COLLECTION), Some(&2));
}

#[test]
fn a_restore_without_tables_is_refused() {
    let mut coordinator = boot(config());
    let error = refused(&mut coordinator, request(1, COLLECTION, Vec::new(), 1));
    assert_eq!(error, StartError::NoTables);
    assert!(error.to_string().contains("at least one table"), "{error}");
}

#[test]
fn a_table_without_shards_is_refused() {
    let mut coordinator = boot(config());
    let error = refused(&mut coordinator, request(1, COLLECTION, vec![table(1, 1), table(2, 0)], 1));
    assert_eq!(error, StartError::NoShards { table: TableId(2) });
    assert!(error.to_string().contains("t2"), "{error}");
}

#[test]
fn a_table_listed_twice_is_refused() {
    let mut coordinator = boot(config());
    let error = refused(&mut coordinator, request(1, COLLECTION, vec![table(1, 1), table(1, 1)], 1));
    assert_eq!(error, StartError::DuplicateTable { table: TableId(1) });
    assert!(error.to_string().contains("t1") && error.to_string().contains("twice"), "{error}");
}

#[test]
fn an_index_restored_without_its_table_is_refused() {
    let mut coordinator = boot(config());
    let error = refused(&mut coordinator, request(1, COLLECTION, vec![table(1, 1), index(3, 2, 1)], 1));
    assert_eq!(error, StartError::IndexWithoutTable { index: TableId(3), table: TableId(2) });
    let message = error.to_string();
    assert!(message.contains("t3") && message.contains("t2"), "{message}");
}

#[test]
fn a_catalog_that_makes_no_chain_is_refused() {
    let mut coordinator = boot(config());
    let tables = vec![table(1, 1)];
    let mut only_incrementals = request(1, COLLECTION, tables.clone(), 2);
    only_incrementals.catalog = only_incrementals.catalog[1..].into();
    let error = refused(&mut coordinator, only_incrementals);
    assert_eq!(error, StartError::Chain(ChainError::NoFullBackup));
    assert!(error.to_string().contains("no full backup"), "{error}");

    // Backup 2 was taken before table 2 existed.
    let mut missing_table = request(1, COLLECTION, vec![table(1, 1), table(2, 1)], 2);
    let mut catalog = missing_table.catalog.to_vec();
    catalog[1].tables.remove(&TableId(2));
    missing_table.catalog = catalog.into();
    let error = refused(&mut coordinator, missing_table);
    assert_eq!(error, StartError::Chain(ChainError::TableMissing { backup_id: 2, table: TableId(2) }));
    assert!(error.to_string().contains("t2"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn an_operation_past_its_deadline_fails_with_a_timeout_and_releases_its_tables() {
    let tables = vec![table(1, 2), table(2, 1)];
    let mut coordinator = boot(CoordinatorConfig { increment_deadline_ms: DEADLINE_MS, ..config() });
    let out = coordinator.start(1_000, request(1, COLLECTION, tables, 2)).unwrap();
    let deadline_at = 1_000 + DEADLINE_MS;
    assert!(timers(&out).contains(&(deadline_at, CoordinatorTimer::Deadline { op: 1 })), "{:?}", timers(&out));
    let sent = applies(&out);
    applied(&mut coordinator, 2_000, &sent[0]);

    let out = coordinator.handle_timer(deadline_at, CoordinatorTimer::Deadline { op: 1 });
    let error = error_of(&coordinator, 1);
    let not_done: Vec<TabletNotDone> = [TabletId::new(1, 0), TabletId::new(1, 1), TabletId::new(2, 0)]
        .into_iter()
        .filter(|tablet| *tablet != sent[0].tablet)
        .map(|tablet| TabletNotDone { tablet, failed_attempts: 0, last_failure: None })
        .collect();
    assert_eq!(error, RestoreError::DeadlineExceeded { increment: 0, not_done });
    assert!(error.to_string().starts_with("timeout"), "{error}");
    assert_eq!(last_persisted(&out).as_ref(), Some(coordinator.durable()), "the failure is persisted");
    assert!(reports(&out).iter().any(|r| r.contains("failed") && r.contains("timeout")), "{:?}", reports(&out));
    assert_eq!(table_state(&coordinator, 1), Some(TableState::RestoreFailed { op: 1 }));
    assert_eq!(table_state(&coordinator, 2), Some(TableState::RestoreFailed { op: 1 }));
    assert!(coordinator.durable().sources_in_use.is_empty(), "the collection is released");
    // A late answer changes nothing.
    assert!(applied(&mut coordinator, deadline_at + 1, &sent[1]).is_empty());
    assert_eq!(state(&coordinator, 1), OperationState::Failed);
}

#[test]
fn a_deadline_timer_delivered_early_changes_nothing() {
    let mut coordinator = boot(config());
    start(&mut coordinator, 1_000, request(1, COLLECTION, vec![table(1, 1)], 1));
    let before = coordinator.durable().clone();
    let out = coordinator.handle_timer(1_000 + DEADLINE_MS - 1, CoordinatorTimer::Deadline { op: 1 });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(coordinator.durable(), &before);
    assert_eq!(state(&coordinator, 1), OperationState::Running);
}

#[test]
fn an_increment_that_takes_too_long_fails_the_operation() {
    let mut coordinator = boot(config());
    let out = coordinator.start(0, request(1, COLLECTION, vec![table(1, 2)], 2)).unwrap();
    let timer = CoordinatorTimer::IncrementDeadline { op: 1, increment: 0 };
    assert!(timers(&out).contains(&(INCREMENT_DEADLINE_MS, timer.clone())), "{:?}", timers(&out));

    assert!(coordinator.handle_timer(INCREMENT_DEADLINE_MS - 1, timer.clone()).is_empty(), "early");
    coordinator.handle_timer(INCREMENT_DEADLINE_MS, timer);
    let error = error_of(&coordinator, 1);
    assert_eq!(
        error,
        RestoreError::IncrementDeadlineExceeded {
            increment: 0,
            limit_ms: INCREMENT_DEADLINE_MS,
            not_done: (0..2)
                .map(|shard| TabletNotDone { tablet: TabletId::new(1, shard), failed_attempts: 0, last_failure: None })
                .collect(),
        }
    );
    assert!(error.to_string().starts_with("timeout"), "{error}");
    assert_eq!(table_state(&coordinator, 1), Some(TableState::RestoreFailed { op: 1 }));
    assert!(coordinator.durable().sources_in_use.is_empty(), "the collection is released");
}

#[test]
fn each_increment_gets_a_fresh_deadline_and_a_stale_one_is_ignored() {
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 0, request(1, COLLECTION, vec![table(1, 2)], 3));
    applied(&mut coordinator, 1_000, &sent[0]);
    let out = applied(&mut coordinator, 5_000, &sent[1]);
    assert!(applies(&out).iter().all(|r| r.increment == 1));
    let fresh_at = 5_000 + INCREMENT_DEADLINE_MS;
    let fresh = CoordinatorTimer::IncrementDeadline { op: 1, increment: 1 };
    assert!(timers(&out).contains(&(fresh_at, fresh.clone())), "{:?}", timers(&out));

    // Increment 0's deadline passes while increment 1 runs, well inside its own deadline.
    let stale = CoordinatorTimer::IncrementDeadline { op: 1, increment: 0 };
    assert!(coordinator.handle_timer(INCREMENT_DEADLINE_MS, stale.clone()).is_empty());
    assert!(coordinator.handle_timer(fresh_at - 1, fresh.clone()).is_empty(), "increment 1 still has time");
    assert_eq!(state(&coordinator, 1), OperationState::Running);
    // Even once increment 1's deadline has passed, the stale timer does not speak for it.
    assert!(coordinator.handle_timer(fresh_at, stale).is_empty());
    assert_eq!(state(&coordinator, 1), OperationState::Running);

    coordinator.handle_timer(fresh_at, fresh);
    assert!(matches!(
        error_of(&coordinator, 1),
        RestoreError::IncrementDeadlineExceeded { increment: 1, ref not_done, .. } if not_done.len() == 2
    ));
}

#[test]
fn transient_failures_are_retried_until_the_deadline_without_failing_the_operation() {
    let mut coordinator = boot(CoordinatorConfig { increment_deadline_ms: DEADLINE_MS, ..config() });
    let mut sent = start(&mut coordinator, 0, request(1, COLLECTION, vec![table(1, 1)], 1));
    let mut now = 0;
    let mut attempts = BTreeSet::new();
    for round in 1..=30 {
        let request = sent.pop().expect("one request out");
        attempts.insert(request.attempt);
        let out = reply(&mut coordinator, now, &request, transient());
        assert!(applies(&out).is_empty(), "the retry waits for its backoff");
        let tablet = &coordinator.status(1).unwrap().tables[0].tablets[0];
        assert_eq!(tablet.1, TabletProgress::Retrying { failed_attempts: round });
        let (due, _) =
            timers(&out).into_iter().find(|(_, t)| *t == CoordinatorTimer::RetryDue).expect("a retry is scheduled");
        assert!(due > now && due <= now + 800, "backoff capped at 800 ms: {now} -> {due}");
        now = due;
        sent = applies(&coordinator.handle_timer(now, CoordinatorTimer::RetryDue));
        assert_eq!(sent.len(), 1, "round {round}");
        assert_eq!(sent[0].increment, 0);
    }
    assert!(now < DEADLINE_MS);
    assert_eq!(attempts.len(), 30, "every retry is a new attempt");
    assert_eq!(state(&coordinator, 1), OperationState::Running);

    // The deadline still ends it.
    coordinator.handle_timer(DEADLINE_MS, CoordinatorTimer::Deadline { op: 1 });
    let last_failure = Some(AttemptFailure::Reported(ShardFailureKind::DownloadFailed));
    let not_done = vec![TabletNotDone { tablet: TabletId::new(1, 0), failed_attempts: 30, last_failure }];
    let error = error_of(&coordinator, 1);
    assert_eq!(error, RestoreError::DeadlineExceeded { increment: 0, not_done });
    let tail = "1 tablet(s) not done: t1/shard-0 (30 failed attempts, the last: download failed)";
    assert!(error.to_string().ends_with(tail), "{error}");
}

#[test]
fn a_tablet_that_keeps_failing_transiently_can_still_succeed() {
    let mut coordinator = boot(config());
    let mut sent = start(&mut coordinator, 0, request(1, COLLECTION, vec![table(1, 1)], 1));
    let mut now = 0;
    for _ in 0..10 {
        let out = reply(&mut coordinator, now, &sent[0], transient());
        now = timers(&out).iter().find(|(_, t)| *t == CoordinatorTimer::RetryDue).expect("retry scheduled").0;
        sent = applies(&coordinator.handle_timer(now, CoordinatorTimer::RetryDue));
    }
    applied(&mut coordinator, now, &sent[0]);
    assert_eq!(state(&coordinator, 1), OperationState::Done);
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restored { op: 1 }));
}

// ---------------------------------------------------------------------------------------------------------------
// The barrier between increments
// ---------------------------------------------------------------------------------------------------------------

/// Table 1 (two shards) with its index 3 (one shard), and table 2 (two shards).
fn barrier_tables() -> Vec<TableSpec> {
    vec![table(1, 2), table(2, 2), index(3, 1, 1)]
}

/// Starts a two-increment restore of [`barrier_tables`] and answers Applied to every increment-0 request, table
/// by table in `order`. Returns the apply requests sent before the last answer, and those sent on the last one.
fn answer_increment_zero_in_order(
    bug: Option<CoordinatorBug>,
    order: &[u32],
) -> (Vec<ApplyRequest>, Vec<ApplyRequest>) {
    let mut coordinator = boot(CoordinatorConfig { bug, ..config() });
    let mut sent = start(&mut coordinator, 0, request(1, COLLECTION, barrier_tables(), 2));
    assert_eq!(tablets(&sent), tablets_of(&barrier_tables(), &[1, 2, 3]), "everything starts at once");
    sent.sort_by_key(|r| order.iter().position(|t| r.tablet.table == TableId(*t)));
    let last = sent.pop().expect("requests were sent");
    let mut before = Vec::new();
    for request in &sent {
        before.extend(applies(&applied(&mut coordinator, 10, request)));
    }
    let on_last = applies(&applied(&mut coordinator, 20, &last));
    (before, on_last)
}

#[test]
fn no_tablet_gets_the_next_increment_until_every_table_is_done_with_this_one() {
    // Table 1 and its index are done long before table 2.
    let (before, on_last) = answer_increment_zero_in_order(None, &[1, 3, 2]);
    let early: Vec<&ApplyRequest> = before.iter().filter(|r| r.increment > 0).collect();
    assert!(early.is_empty(), "increment 1 sent before table 2 finished increment 0: {early:?}");
    assert!(on_last.iter().all(|r| r.increment == 1 && r.backup_id == 2));
    assert_eq!(tablets(&on_last), tablets_of(&barrier_tables(), &[1, 2, 3]));
}

#[test]
fn an_index_table_is_part_of_the_barrier() {
    // Both tables are done; only the index of table 1 is not.
    let (before, on_last) = answer_increment_zero_in_order(None, &[1, 2, 3]);
    let early: Vec<&ApplyRequest> = before.iter().filter(|r| r.increment > 0).collect();
    assert!(early.is_empty(), "increment 1 sent before the index finished increment 0: {early:?}");
    assert_eq!(tablets(&on_last), tablets_of(&barrier_tables(), &[1, 2, 3]));
}

#[test]
fn the_tables_run_ahead_bug_breaks_the_barrier_and_the_barrier_check_catches_it() {
    let (before, _) = answer_increment_zero_in_order(Some(CoordinatorBug::TablesRunAhead), &[1, 3, 2]);
    let early: Vec<&ApplyRequest> = before.iter().filter(|r| r.increment > 0).collect();
    assert!(!early.is_empty(), "the buggy coordinator keeps the barrier");
    let early_tablets: BTreeSet<TabletId> = early.iter().map(|r| r.tablet).collect();
    assert_eq!(early_tablets, tablets_of(&barrier_tables(), &[1, 3]), "table 1 and its index run ahead");
}

// ---------------------------------------------------------------------------------------------------------------
// The cap on tables in flight
// ---------------------------------------------------------------------------------------------------------------

/// Tables 1, 2 and 3 (two shards each), and index 4 of table 1 (one shard).
fn capped_tables() -> Vec<TableSpec> {
    vec![table(1, 2), table(2, 2), table(3, 2), index(4, 1, 1)]
}

fn capped(max_in_flight_tables: u32) -> (Coordinator, Vec<ApplyRequest>) {
    let mut coordinator = boot(CoordinatorConfig { max_in_flight_tables, ..config() });
    let sent = start(&mut coordinator, 0, request(1, COLLECTION, capped_tables(), 2));
    (coordinator, sent)
}

/// Answers Applied to `requests`, returning what the coordinator sent in response.
fn answer_all(coordinator: &mut Coordinator, requests: &[ApplyRequest]) -> Vec<ApplyRequest> {
    requests.iter().flat_map(|r| applies(&applied(coordinator, 10, r))).collect()
}

#[test]
fn with_one_table_in_flight_tables_are_restored_one_after_another() {
    let (mut coordinator, sent) = capped(1);
    assert_eq!(tablets(&sent), tablets_of(&capped_tables(), &[1, 4]), "table 1 with its index");

    let (index, base): (Vec<ApplyRequest>, Vec<ApplyRequest>) =
        sent.into_iter().partition(|r| r.tablet.table == TableId(4));
    assert!(answer_all(&mut coordinator, &base).is_empty(), "table 1 is not done while its index applies");
    let next = answer_all(&mut coordinator, &index);
    assert_eq!(tablets(&next), tablets_of(&capped_tables(), &[2]));
    let next = answer_all(&mut coordinator, &next);
    assert_eq!(tablets(&next), tablets_of(&capped_tables(), &[3]));
    let next = answer_all(&mut coordinator, &next);
    assert!(next.iter().all(|r| r.increment == 1));
    assert_eq!(tablets(&next), tablets_of(&capped_tables(), &[1, 4]), "increment 1 starts over with table 1");
}

#[test]
fn with_two_tables_in_flight_a_third_starts_when_one_is_done() {
    let (mut coordinator, sent) = capped(2);
    assert_eq!(tablets(&sent), tablets_of(&capped_tables(), &[1, 2, 4]));
    let (table_2, table_1): (Vec<ApplyRequest>, Vec<ApplyRequest>) =
        sent.into_iter().partition(|r| r.tablet.table == TableId(2));
    let next = answer_all(&mut coordinator, &table_2);
    assert_eq!(tablets(&next), tablets_of(&capped_tables(), &[3]), "table 3 takes table 2's place");
    assert!(answer_all(&mut coordinator, &table_1).is_empty(), "table 3 is still applying increment 0");
    let next = answer_all(&mut coordinator, &next);
    assert!(next.iter().all(|r| r.increment == 1));
    assert_eq!(tablets(&next), tablets_of(&capped_tables(), &[1, 2, 4]));
}

// ---------------------------------------------------------------------------------------------------------------
// Reboot
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_rebooted_coordinator_resumes_and_resends_only_to_tablets_without_a_result() {
    let tables = vec![table(1, 2), table(2, 2)];
    let mut coordinator = boot(config());
    let out = coordinator.start(1_000, request(1, COLLECTION, tables.clone(), 2)).unwrap();
    let sent = applies(&out);
    let mut outputs = out;
    let (answered, unanswered): (Vec<ApplyRequest>, Vec<ApplyRequest>) =
        sent.into_iter().partition(|r| r.tablet == TabletId::new(1, 1) || r.tablet == TabletId::new(2, 1));
    for request in &answered {
        outputs.extend(applied(&mut coordinator, 2_000, request));
    }
    let saved = last_persisted(&outputs).expect("the coordinator persisted");
    assert_eq!(&saved, coordinator.durable(), "every result is durable");
    let old_generation = saved.generation;

    let (mut rebooted, out) = Coordinator::boot(config(), Some(saved), SEED, 3_000);
    assert_eq!(rebooted.generation(), old_generation + 1);
    assert_eq!(last_persisted(&out).map(|d| d.generation), Some(old_generation + 1), "the new generation is durable");
    assert_eq!(table_state(&rebooted, 1), Some(TableState::Restoring { op: 1 }));
    assert_eq!(table_state(&rebooted, 2), Some(TableState::Restoring { op: 1 }));
    assert_eq!(rebooted.durable().sources_in_use.get(COLLECTION), Some(&1));
    let view = rebooted.status(1).unwrap();
    assert_eq!((view.state, view.increment), (OperationState::Running, Some(0)));
    assert!(timers(&out).contains(&(1_000 + DEADLINE_MS, CoordinatorTimer::Deadline { op: 1 })));
    let increment_deadline = CoordinatorTimer::IncrementDeadline { op: 1, increment: 0 };
    assert!(timers(&out).contains(&(1_000 + INCREMENT_DEADLINE_MS, increment_deadline)));

    let resent = applies(&out);
    assert_eq!(tablets(&resent), tablets(&unanswered), "only tablets without a result are asked again");
    assert!(resent.iter().all(|r| r.increment == 0 && r.generation == old_generation + 1));

    // An answer to a request of the previous generation does not count, even one whose attempt number is that of
    // the request re-sent in this generation (attempt numbers start over on every boot).
    let old = unanswered.iter().find(|o| resent.iter().any(|r| r.tablet == o.tablet && r.attempt == o.attempt));
    let old = old.expect("an old request shares its tablet and attempt number with a new one");
    assert!(applied(&mut rebooted, 4_000, old).is_empty());
    assert_eq!(rebooted.status(1).unwrap().tables[0].tablets[0].1, TabletProgress::InFlight);
    let next = answer_all(&mut rebooted, &resent);
    assert!(next.iter().all(|r| r.increment == 1));
    assert_eq!(tablets(&next), tablets_of(&tables, &[1, 2]));
}

#[test]
fn a_reboot_in_a_later_increment_resumes_that_increment() {
    let mut coordinator = boot(config());
    let out = coordinator.start(0, request(1, COLLECTION, vec![table(1, 2), table(2, 1)], 3)).unwrap();
    let mut outputs = out.clone();
    let mut sent = applies(&out);
    // Increment 0 everywhere, then increment 1 on table 1 only.
    for request in &sent {
        outputs.extend(applied(&mut coordinator, 5_000, request));
    }
    sent = applies(&outputs[out.len()..]);
    for request in sent.iter().filter(|r| r.tablet.table == TableId(1)) {
        outputs.extend(applied(&mut coordinator, 6_000, request));
    }

    let saved = last_persisted(&outputs).expect("persisted");
    let (rebooted, out) = Coordinator::boot(config(), Some(saved), SEED, 7_000);
    assert_eq!(rebooted.status(1).unwrap().increment, Some(1));
    let resent = applies(&out);
    assert_eq!(tablets(&resent), BTreeSet::from([TabletId::new(2, 0)]));
    assert!(resent.iter().all(|r| r.increment == 1 && r.backup_id == 2));
    let increment_deadline = CoordinatorTimer::IncrementDeadline { op: 1, increment: 1 };
    assert!(timers(&out).contains(&(5_000 + INCREMENT_DEADLINE_MS, increment_deadline)), "{:?}", timers(&out));
}

// ---------------------------------------------------------------------------------------------------------------
// What a start compares, and what an ended operation reports
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn the_same_operation_id_with_another_chain_is_refused_but_the_same_tables_in_another_order_are_not() {
    let tables = vec![table(1, 1), table(2, 1)];
    let mut coordinator = boot(config());
    start(&mut coordinator, 0, request(1, COLLECTION, tables.clone(), 2));
    // One more backup in the catalog plans another chain: not a retry of the same restore.
    let longer = request(1, COLLECTION, tables.clone(), 3);
    assert_eq!(refused(&mut coordinator, longer), StartError::OperationIdTaken { op: 1 });
    // The same tables listed the other way round are the same restore.
    let mut reordered = request(1, COLLECTION, tables.clone(), 2);
    reordered.tables.reverse();
    assert_eq!(coordinator.start(10, reordered), Ok(Vec::new()));
}

#[test]
fn a_failed_operation_still_reports_its_chain_length_and_the_state_it_left_its_tables_in() {
    let tables = vec![table(1, 1)];
    let mut coordinator = boot(config());
    start(&mut coordinator, 0, request(1, COLLECTION, tables.clone(), 3));
    coordinator.handle_timer(DEADLINE_MS, CoordinatorTimer::Deadline { op: 1 });
    let view = coordinator.status(1).unwrap();
    assert_eq!((view.state, view.increments), (OperationState::Failed, 3));

    // Another restore onto the same table: the first operation's view still shows what it left behind.
    start(&mut coordinator, DEADLINE_MS + 1, request(2, COLLECTION, tables, 3));
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restoring { op: 2 }));
    assert_eq!(coordinator.status(1).unwrap().tables[0].state, Some(TableState::RestoreFailed { op: 1 }));
}

#[test]
fn a_table_known_to_hold_rows_is_refused_even_after_a_failed_restore_of_it() {
    let tables = vec![table(1, 1)];
    let mut coordinator = boot(config());
    start(&mut coordinator, 0, request(1, COLLECTION, tables.clone(), 1));
    let out = coordinator.handle_timer(DEADLINE_MS, CoordinatorTimer::Deadline { op: 1 });
    let durable = last_persisted(&out).expect("the failure is persisted");
    let config = CoordinatorConfig { non_empty_tables: BTreeSet::from([TableId(1)]), ..config() };
    let mut rebooted = Coordinator::boot(config, Some(durable), SEED, DEADLINE_MS + 1).0;
    assert_eq!(
        refused(&mut rebooted, request(2, COLLECTION, tables, 1)),
        StartError::TargetNotEmpty { table: TableId(1) }
    );
}

#[test]
fn a_table_is_readable_as_restored_only_after_its_operation_is_done() {
    let tables = [table(1, 1), table(2, 1)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 0, request(1, COLLECTION, vec![tables[0].clone()], 2));
    let readable = |c: &Coordinator, id: u32| table_state(c, id).is_some_and(TableState::readable);
    assert!(!readable(&coordinator, 1), "restoring is not readable");
    apply_everything(&mut coordinator, 10, sent);
    assert!(readable(&coordinator, 1), "restored is readable");

    start(&mut coordinator, 20, request(2, COLLECTION, vec![tables[1].clone()], 2));
    coordinator.handle_timer(20 + DEADLINE_MS, CoordinatorTimer::Deadline { op: 2 });
    assert!(!readable(&coordinator, 2), "a failed restore leaves the table unreadable");
}

// ---------------------------------------------------------------------------------------------------------------
// Point-in-time restore, in segments
// ---------------------------------------------------------------------------------------------------------------

/// A restore of `tables` from `catalog(tables, 5)` (backups 1..5 taken at 1,000..5,000 ms) to `until_ms`, the first
/// of several segments unless `last`.
fn to_point(op: OperationId, tables: Vec<TableSpec>, until_ms: Option<u64>, last: bool) -> RestoreRequest {
    RestoreRequest { until_ms, last_segment: last, ..request(op, COLLECTION, tables, 5) }
}

fn segment(op: OperationId, segment: u32, until_ms: Option<u64>, last: bool, tables: &[TableSpec]) -> SegmentRequest {
    SegmentRequest { op, segment, until_ms, last_segment: last, catalog: catalog(tables, 5).into() }
}

/// Continues `op` with `request`, which must be accepted, answers every request that follows, and returns the
/// (increment, backup) pairs asked of the first tablet.
fn run_segment(coordinator: &mut Coordinator, now_ms: u64, request: SegmentRequest) -> Vec<(IncrementIndex, u64)> {
    let out = coordinator.continue_segment(now_ms, request).expect("the segment is accepted");
    let sent = applies(&out);
    let first = sent.first().map(|r| r.tablet);
    let mut asked: Vec<ApplyRequest> = sent.clone();
    asked.extend(applies(&apply_everything(coordinator, now_ms + 1, sent)));
    asked.iter().filter(|r| Some(r.tablet) == first).map(|r| (r.increment, r.backup_id)).collect()
}

#[test]
fn a_restore_to_a_point_in_time_applies_only_the_backups_taken_by_then() {
    let tables = vec![table(1, 2)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, to_point(1, tables.clone(), Some(3_500), true));
    let out = apply_everything(&mut coordinator, 20, sent.clone());
    let backups: BTreeSet<u64> = sent.iter().chain(&applies(&out)).map(|r| r.backup_id).collect();
    assert_eq!(backups, BTreeSet::from([1, 2, 3]), "backups 4 and 5 were taken after the point");
    let view = coordinator.status(1).unwrap();
    assert_eq!((view.state, view.increments, view.segment, view.until_ms), (OperationState::Done, 3, 1, Some(3_500)));
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restored { op: 1 }));
}

#[test]
fn a_segmented_restore_carries_its_tables_and_increments_from_segment_to_segment_and_ends_once() {
    let tables = vec![table(1, 2), table(2, 1)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, to_point(1, tables.clone(), Some(2_000), false));
    let out = apply_everything(&mut coordinator, 20, sent);

    // Segment 1 (backups 1 and 2) is applied: the operation waits, its tables still restoring.
    assert!(reports(&out).iter().any(|r| r.contains("segment 1 done")), "{:?}", reports(&out));
    let view = coordinator.status(1).unwrap();
    assert_eq!(
        (view.state, view.segment, view.increments, view.increment),
        (OperationState::AwaitingSegment, 1, 2, None)
    );
    assert!(view.tables.iter().all(|t| t.tablets.iter().all(|(_, p)| *p == TabletProgress::Done)));
    assert_eq!(table_state(&coordinator, 1), Some(TableState::Restoring { op: 1 }), "no final work yet");
    assert_eq!(coordinator.durable().sources_in_use.get(COLLECTION), Some(&1));
    assert_eq!(coordinator.durable().chains().count(), 0, "no working state while waiting");
    assert_eq!(
        coordinator.progress(),
        vec![ProgressMark::AwaitingSegment { op: 1, segment: 1, increments: 2, released: false }]
    );
    assert_eq!(last_persisted(&out).as_ref(), Some(coordinator.durable()), "the wait is durable");
    assert_eq!(coordinator.forget(1), Err(LifecycleError::StillRunning { op: 1 }));
    assert!(matches!(
        refused(&mut coordinator, request(2, COLLECTION, vec![table(3, 1)], 2)),
        StartError::CollectionBusy { running: 1, .. }
    ));

    // Segment 2 continues at increment 2 with backups 3 and 4, and waits again.
    let asked = run_segment(&mut coordinator, 100, segment(1, 2, Some(4_000), false, &tables));
    assert_eq!(asked, vec![(2, 3), (3, 4)]);
    assert_eq!(state(&coordinator, 1), OperationState::AwaitingSegment);
    assert_eq!(table_state(&coordinator, 2), Some(TableState::Restoring { op: 1 }));

    // The last segment goes to the newest backup, then does the final work.
    let asked = run_segment(&mut coordinator, 200, segment(1, 3, None, true, &tables));
    assert_eq!(asked, vec![(4, 5)]);
    let view = coordinator.status(1).unwrap();
    assert_eq!((view.state, view.segment, view.increments), (OperationState::Done, 3, 5));
    assert_eq!(coordinator.operation(1).unwrap().backup_ids, vec![1, 2, 3, 4, 5]);
    for id in [1, 2] {
        assert_eq!(table_state(&coordinator, id), Some(TableState::Restored { op: 1 }));
    }
    assert!(!coordinator.durable().sources_in_use.contains_key(COLLECTION));
}

#[test]
fn a_segment_is_refused_unless_it_continues_a_waiting_restore_in_order_and_forward_in_time() {
    let tables = vec![table(1, 1)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, to_point(1, tables.clone(), Some(2_000), false));
    let refuse = |coordinator: &mut Coordinator, request: SegmentRequest| {
        let before = coordinator.durable().clone();
        let error = coordinator.continue_segment(50, request).expect_err("the segment is refused");
        assert_eq!(coordinator.durable(), &before, "a refused segment changes no durable state");
        error
    };
    assert_eq!(refuse(&mut coordinator, segment(9, 2, None, true, &tables)), SegmentError::NotFound { op: 9 });
    assert_eq!(
        refuse(&mut coordinator, segment(1, 2, None, true, &tables)),
        SegmentError::SegmentRunning { op: 1, segment: 1 }
    );
    apply_everything(&mut coordinator, 20, sent);
    assert_eq!(
        refuse(&mut coordinator, segment(1, 3, None, true, &tables)),
        SegmentError::OutOfOrder { op: 1, requested: 3, next: 2 }
    );
    assert_eq!(
        refuse(&mut coordinator, segment(1, 1, None, true, &tables)),
        SegmentError::OutOfOrder { op: 1, requested: 1, next: 2 }
    );
    assert_eq!(
        refuse(&mut coordinator, segment(1, 2, Some(1_500), true, &tables)),
        SegmentError::PointBeforePrevious { op: 1, segment: 2, until_ms: Some(1_500), previous_ms: Some(2_000) }
    );
    // A full backup after the point reached: the chain so far does not lead past it.
    let mut with_full = catalog(&tables, 5);
    with_full[3].kind = BackupKind::Full;
    let request = SegmentRequest { catalog: with_full.into(), ..segment(1, 2, None, true, &tables) };
    assert_eq!(
        refuse(&mut coordinator, request),
        SegmentError::Chain(ChainError::FullBackupInSegment { backup_id: 4, taken_at_ms: 4_000 })
    );

    // Accepted once; the same call again is a no-op, and another call for the same segment is refused.
    let out = coordinator.continue_segment(60, segment(1, 2, Some(3_000), false, &tables)).unwrap();
    let again = coordinator.continue_segment(61, segment(1, 2, Some(3_000), false, &tables)).unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(
        refuse(&mut coordinator, segment(1, 2, Some(3_000), true, &tables)),
        SegmentError::SegmentTaken { op: 1, segment: 2 }
    );
    apply_everything(&mut coordinator, 70, applies(&out));
    let done = coordinator.continue_segment(80, segment(1, 3, Some(3_000), true, &tables)).unwrap();
    assert_eq!(state(&coordinator, 1), OperationState::Done, "an empty last segment ends at once: {done:?}");
    assert_eq!(refuse(&mut coordinator, segment(1, 4, None, true, &tables)), SegmentError::Ended { op: 1 });
    // A late copy of the last call is still answered as before.
    assert_eq!(coordinator.continue_segment(90, segment(1, 3, Some(3_000), true, &tables)), Ok(Vec::new()));
}

#[test]
fn a_coordinator_rebooted_between_segments_still_waits_and_then_continues() {
    let tables = vec![table(1, 2)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, to_point(1, tables.clone(), Some(1_000), false));
    apply_everything(&mut coordinator, 20, sent);
    let (mut rebooted, out) = Coordinator::boot(config(), Some(coordinator.durable().clone()), SEED, 30);
    assert!(applies(&out).is_empty(), "nothing to send while waiting: {out:?}");
    assert_eq!(state(&rebooted, 1), OperationState::AwaitingSegment);
    let out = rebooted.continue_segment(40, segment(1, 2, None, true, &tables)).unwrap();
    let sent = applies(&out);
    assert!(sent.iter().all(|r| r.increment == 1 && r.backup_id == 2 && r.generation == 2), "{sent:?}");
    apply_everything(&mut rebooted, 50, sent);
    assert_eq!(rebooted.status(1).unwrap().increments, 5);
    assert_eq!(state(&rebooted, 1), OperationState::Done);
}

/// A coordinator under `bug` that has applied segment 1 (backups 1, 2) of a restore to 2,000 ms.
fn first_segment_with(bug: CoordinatorBug) -> Coordinator {
    let mut coordinator = boot(CoordinatorConfig { bug: Some(bug), ..config() });
    let sent = start(&mut coordinator, 10, to_point(1, vec![table(1, 1)], Some(2_000), false));
    apply_everything(&mut coordinator, 20, sent);
    coordinator
}

#[test]
fn the_segment_bugs_do_what_they_say() {
    if !cfg!(feature = "mutants") {
        return; // The bugs exist only in builds with the `mutants` feature (the simulator's test runs turn it on).
    }
    let next =
        |coordinator: &mut Coordinator| coordinator.continue_segment(30, segment(1, 2, None, true, &[table(1, 1)]));
    let coordinator = first_segment_with(CoordinatorBug::FinalWorkEverySegment);
    assert_eq!(
        coordinator.progress(),
        vec![ProgressMark::AwaitingSegment { op: 1, segment: 1, increments: 2, released: true }]
    );
    let mut coordinator = first_segment_with(CoordinatorBug::SegmentEndIsDone);
    assert_eq!(state(&coordinator, 1), OperationState::Done);
    assert_eq!(next(&mut coordinator), Err(SegmentError::Ended { op: 1 }));
    let mut coordinator = first_segment_with(CoordinatorBug::SegmentRestartsChain);
    let first: Vec<IncrementIndex> = applies(&next(&mut coordinator).unwrap()).iter().map(|r| r.increment).collect();
    assert_eq!(first, vec![0], "the chain starts over from the full backup");
}

// ---------------------------------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_cancelled_restore_ends_failed_frees_its_tables_and_ignores_the_replies_still_coming() {
    let tables = vec![table(1, 2)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, tables.clone(), 3));
    let out = applied(&mut coordinator, 20, &sent[0]);
    assert!(applies(&out).is_empty(), "the other tablet is still at increment 0");
    let out = coordinator.cancel(30, 1).expect("a running operation is cancelled");
    assert_eq!(last_persisted(&out).as_ref(), Some(coordinator.durable()), "the cancel is durable");
    assert_eq!(error_of(&coordinator, 1), RestoreError::Cancelled { applied: 0 });
    assert_eq!(table_state(&coordinator, 1), Some(TableState::RestoreFailed { op: 1 }));
    assert!(!coordinator.durable().sources_in_use.contains_key(COLLECTION), "the collection is released");
    assert_eq!(coordinator.durable().chains().count(), 0, "no working state is left");
    // The reply of the request still on its way changes nothing and asks for nothing.
    let late = applied(&mut coordinator, 40, &sent[1]);
    assert!(applies(&late).is_empty() && last_persisted(&late).is_none(), "{late:?}");
    // Cancelling again is answered the same; the tables take a new restore.
    assert_eq!(coordinator.cancel(50, 1), Ok(Vec::new()));
    start(&mut coordinator, 60, request(2, COLLECTION, tables, 3));
    assert_eq!(state(&coordinator, 2), OperationState::Running);
}

#[test]
fn a_restore_waiting_for_its_next_segment_can_be_cancelled_and_then_not_continued() {
    let tables = vec![table(1, 1)];
    let mut coordinator = boot(config());
    let sent = start(&mut coordinator, 10, to_point(1, tables.clone(), Some(2_000), false));
    apply_everything(&mut coordinator, 20, sent);
    coordinator.cancel(30, 1).expect("a waiting operation is cancelled");
    assert_eq!(error_of(&coordinator, 1), RestoreError::Cancelled { applied: 2 });
    assert_eq!(table_state(&coordinator, 1), Some(TableState::RestoreFailed { op: 1 }));
    let next = coordinator.continue_segment(40, segment(1, 2, None, true, &tables));
    assert_eq!(next, Err(SegmentError::Ended { op: 1 }));
    assert!(coordinator.forget(1).is_ok(), "a cancelled operation is over and can be forgotten");
}

#[test]
fn only_an_operation_under_way_can_be_cancelled() {
    let mut coordinator = boot(config());
    assert_eq!(coordinator.cancel(5, 9), Err(LifecycleError::NotFound { op: 9 }));
    let sent = start(&mut coordinator, 10, request(1, COLLECTION, vec![table(1, 1)], 1));
    apply_everything(&mut coordinator, 20, sent);
    assert_eq!(state(&coordinator, 1), OperationState::Done);
    let before = coordinator.durable().clone();
    assert_eq!(coordinator.cancel(30, 1), Err(LifecycleError::AlreadyEnded { op: 1 }));
    assert_eq!(coordinator.durable(), &before, "a refused cancel changes nothing");
    assert!(LifecycleError::AlreadyEnded { op: 1 }.to_string().contains("already ended"));
}
