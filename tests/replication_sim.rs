//! Replication under the simulator: publisher, replica and store as madsim nodes, under the store's faults,
//! crash points, reboots and lost disk writes; then the replication checkers. They need the madsim build:
//! `cargo sim-test` (or `scripts/test-all`).
#![cfg(madsim)]

use lockstep_sim::faults::FaultKind;
use lockstep_sim::replication::{
    FAULT_KINDS, ReplicationBugs, ReplicationInvariant, ReplicationOutcome, ReplicationWorld, run_replication,
    transcript,
};

fn run(seed: u64, bugs: ReplicationBugs) -> ReplicationOutcome {
    run_replication(ReplicationWorld::generate(seed, bugs), false)
}

fn bugs(name: &str) -> ReplicationBugs {
    let mut bugs = ReplicationBugs::default();
    bugs.add(name).expect("a known bug");
    bugs
}

/// The first seed of `seeds` whose run breaks `invariant`, with its outcome.
fn first_catch(seeds: std::ops::Range<u64>, bugs: ReplicationBugs, invariant: ReplicationInvariant) -> Option<u64> {
    seeds.into_iter().find(|seed| run(*seed, bugs).violations.iter().any(|v| v.invariant == invariant))
}

#[test]
fn a_fixed_seed_range_passes_and_fires_every_replication_fault() {
    let mut faults = lockstep_sim::faults::FaultCounts::default();
    let mut reboots = [0; 2];
    let mut lost_worlds = 0;
    for seed in 0..300 {
        let outcome = run(seed, ReplicationBugs::default());
        assert!(outcome.panic.is_none(), "seed {seed} panicked: {:?}", outcome.panic);
        if !outcome.violations.is_empty() {
            let world = ReplicationWorld::generate(seed, ReplicationBugs::default());
            let traced = run_replication(world.clone(), true);
            panic!("seed {seed} broke an invariant:\n{}", transcript(&world, &traced));
        }
        let world = ReplicationWorld::generate(seed, ReplicationBugs::default());
        assert_eq!(outcome.replica_through, world.expected_replica_version(), "seed {seed}");
        lost_worlds += u64::from(world.lost_version.is_some());
        faults.merge(&outcome.faults);
        reboots[0] += outcome.reboots[0];
        reboots[1] += outcome.reboots[1];
    }
    for kind in FAULT_KINDS {
        assert!(faults.get(kind) > 0, "fault kind {kind} never fired");
    }
    for kind in FaultKind::ALL.into_iter().filter(|kind| !FAULT_KINDS.contains(kind)) {
        assert_eq!(faults.get(kind), 0, "{kind} is not a replication fault");
    }
    assert!(reboots[0] > 0 && reboots[1] > 0, "reboots of publisher and replica: {reboots:?}");
    // Worlds whose store loses a version: their replica stopped just before it, however long it waited.
    assert!(lost_worlds > 10, "{lost_worlds} worlds lost a version");
}

#[test]
fn the_same_seed_gives_the_same_event_log() {
    for seed in [1, 42, 999] {
        let world = ReplicationWorld::generate(seed, ReplicationBugs::default());
        let first = run_replication(world.clone(), true);
        let second = run_replication(world.clone(), true);
        assert_eq!(transcript(&world, &first), transcript(&world, &second), "seed {seed}");
        assert_eq!(first.log_hash, second.log_hash);
    }
}

#[test]
fn a_publisher_that_puts_ahead_is_caught_by_push_order() {
    let seed = first_catch(0..300, bugs("puts-ahead"), ReplicationInvariant::PushOrder);
    assert!(seed.is_some(), "push-order never caught the publisher that puts ahead in seeds 0..300");
}

#[test]
fn a_replica_that_skips_the_checksum_is_caught_by_replica_rows() {
    let seed = first_catch(0..300, bugs("replica-skips-checksum"), ReplicationInvariant::ReplicaRows);
    let seed = seed.expect("replica-rows never caught the replica that skips its checksum in seeds 0..300");
    // The trace marks the offending event and names the invariant.
    let world = ReplicationWorld::generate(seed, bugs("replica-skips-checksum"));
    let text = transcript(&world, &run_replication(world.clone(), true));
    assert!(text.contains("first offending event of replica-rows"), "{text}");
    assert!(text.contains("VIOLATION replica-rows"), "{text}");
}

#[test]
fn a_replica_that_skips_a_missing_version_is_caught_by_replica_in_order() {
    // Only listings that lag behind the store show a gap; half the worlds have them.
    let seed = first_catch(0..300, bugs("replica-skips-missing-version"), ReplicationInvariant::ReplicaInOrder);
    let seed = seed.expect("replica-in-order never caught the replica that skips a missing version in seeds 0..300");
    let world = ReplicationWorld::generate(seed, bugs("replica-skips-missing-version"));
    assert!(world.listing_lag_ms > 0, "a gap needs a listing that lags");
}

#[test]
fn every_catalogued_replication_bug_is_caught_within_its_budget_by_its_invariant() {
    for known in &lockstep_sim::replication::REPLICATION_CATALOG {
        let caught = lockstep_sim::replication::catalogued_detection(known);
        let (seed, broken) = caught.unwrap_or_else(|| panic!("{} survived {} seeds", known.name, known.budget_seeds));
        assert!(broken.contains(&known.caught_by), "{} broke {broken:?} on seed {seed}", known.name);
    }
}
