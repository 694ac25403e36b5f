//! Transcripts of pinned seeds, reviewed as snapshots: a change in behaviour shows up as a diff that a
//! reviewer accepts (`cargo insta review`, see README) or rejects. Needs the madsim build (`cargo sim-test`).
#![cfg(madsim)]

use lockstep::coordinator::CoordinatorBug;
use lockstep_sim::faults::{FaultKind, FaultPlan};
use lockstep_sim::runner::{Keep, run_seed, transcript};
use lockstep_sim::world::{Bugs, World, WorldParams};

fn small(faults: FaultPlan) -> WorldParams {
    WorldParams {
        tables: Some(1),
        indexes: Some(false),
        shard_count: Some(2),
        incrementals: Some(2),
        initial_rows: Some(12),
        faults: Some(faults),
        ..WorldParams::default()
    }
}

fn run(seed: u64, params: &WorldParams) -> String {
    let world = World::generate(seed, params);
    transcript(&world, &run_seed(&world, Keep::Log))
}

/// The transcript's verdict lines hold `line`: the snapshot shows the whole run, this holds the test to what its
/// name says whatever the snapshot was last accepted as.
fn assert_ends_with(text: &str, line: &str) {
    assert!(text.lines().any(|l| l.starts_with(line)), "no line starting {line:?} in:\n{text}");
}

#[test]
fn a_restore_without_faults() {
    let text = run(1, &small(FaultPlan::none()));
    assert_ends_with(&text, "operation 1: Done");
    assert_ends_with(&text, "every invariant held");
    insta::assert_snapshot!(text);
}

#[test]
fn a_restore_through_reboots_drops_and_damaged_downloads() {
    let mut faults = FaultPlan::none();
    faults.heal_at_ms = 8_000;
    for kind in
        [FaultKind::CrashAfterPersist, FaultKind::MessageDrop, FaultKind::DownloadCorrupt, FaultKind::DownloadPartial]
    {
        faults.set_rate(kind, 0.3);
    }
    faults.set_rate(FaultKind::CoordinatorReboot, 0.5);
    let text = run(2, &small(faults));
    assert_ends_with(&text, "operation 1: Done");
    assert_ends_with(&text, "every invariant held");
    insta::assert_snapshot!(text);
}

#[test]
fn a_restore_with_an_object_lost_for_good_fails_cleanly() {
    let params = WorldParams { lost_object_probability: 1.0, ..small(FaultPlan::none()) };
    let text = run(3, &params);
    assert_ends_with(&text, "operation 1: Failed: increment 0");
    assert_ends_with(&text, "every invariant held");
    insta::assert_snapshot!(text);
}

#[test]
fn a_coordinator_that_advances_on_the_first_report_breaks_in_order_apply() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::AdvanceOnFirstReport), shard: None, host: None };
    let params = WorldParams { bugs, ..small(FaultPlan::none()) };
    let text = run(4, &params);
    assert_ends_with(&text, "invariant in-order-apply violated");
    insta::assert_snapshot!(text);
}

#[test]
fn a_restore_of_two_tables_and_an_index() {
    let params = WorldParams { tables: Some(2), indexes: Some(true), shard_count: Some(1), ..small(FaultPlan::none()) };
    let text = run(5, &params);
    assert_ends_with(&text, "operation 1: Done");
    assert_ends_with(&text, "every invariant held");
    insta::assert_snapshot!(text);
}

#[test]
fn a_table_that_runs_ahead_of_the_others_breaks_in_order_apply() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::TablesRunAhead), shard: None, host: None };
    let params =
        WorldParams { bugs, tables: Some(2), indexes: Some(false), shard_count: Some(1), ..small(FaultPlan::none()) };
    // Seed 7: under this schedule the run-ahead request reaches its shard before the other table is done.
    let text = run(7, &params);
    assert_ends_with(&text, "invariant in-order-apply violated");
    insta::assert_snapshot!(text);
}

#[test]
fn a_restore_to_a_point_in_time_in_three_segments_through_a_coordinator_reboot() {
    let mut faults = FaultPlan::none();
    faults.heal_at_ms = 8_000;
    faults.set_rate(FaultKind::CoordinatorReboot, 0.3);
    let params = WorldParams { point_in_time_probability: 1.0, incrementals: Some(4), ..small(faults) };
    // The first seed whose world goes in three segments to a point before its last backup.
    let world = (0..)
        .map(|seed| World::generate(seed, &params))
        .find(|world| {
            let last = world.catalog.iter().map(|m| m.backup_id).max();
            world.segments() == 3
                && !world.cancels()
                && world.chain_backup_ids.last().copied() < last
                && world.chain_len >= 3
        })
        .expect("such a world");
    let text = transcript(&world, &run_seed(&world, Keep::Log));
    assert_ends_with(&text, "operation 1: Done");
    assert_ends_with(&text, "every invariant held");
    assert!(text.contains("waiting for segment 3"), "{text}");
    insta::assert_snapshot!(text);
}

#[test]
fn replication_through_failed_puts_slow_answers_and_a_replica_reboot() {
    use lockstep_sim::replication::{ReplicationBugs, ReplicationWorld, run_replication, transcript};
    let world = ReplicationWorld::generate(4, ReplicationBugs::default());
    let text = transcript(&world, &run_replication(world.clone(), true));
    assert_ends_with(&text, "replica holds version 3 of 3");
    assert_ends_with(&text, "every invariant held");
    insta::assert_snapshot!(text);
}
