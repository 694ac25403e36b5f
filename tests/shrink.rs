//! Decision tapes and shrinking: a run replayed from the faults its dice decided is the same run; a failing
//! seed of a deliberate bug shrinks to a scenario file of a few events that still breaks the same invariant,
//! and passes without the bug. Needs the madsim build (`cargo sim-test`).
#![cfg(madsim)]

use std::sync::Arc;

use lockstep_sim::catalog;
use lockstep_sim::checkers::Invariant;
use lockstep_sim::events::EventKind;
use lockstep_sim::runner::{Keep, run_seed};
use lockstep_sim::scenario::Scenario;
use lockstep_sim::shrink::shrink;
use lockstep_sim::sweep::first_detection;
use lockstep_sim::tape::Tape;
use lockstep_sim::world::{World, WorldParams};

#[test]
fn a_run_replayed_from_its_own_decisions_is_the_same_run() {
    let mut decisions = 0;
    for seed in 0..150 {
        let world = World::generate(seed, &WorldParams::sweep_default());
        let first = run_seed(&world, Keep::Hash);
        decisions += first.decisions.len();
        let replayed = World { decisions: Some(Arc::new(first.decisions.clone())), ..world };
        let again = run_seed(&replayed, Keep::Hash);
        assert!(first.log_hash.is_some(), "seed {seed}: the run was asked for its hash");
        assert_eq!(again.log_hash, first.log_hash, "seed {seed}: the replay is another run");
        assert_eq!(again.decisions, first.decisions, "seed {seed}");
        assert_eq!(again.faults, first.faults, "seed {seed}");
    }
    assert!(decisions > 300, "the dice decided only {decisions} faults in 150 seeds");
}

#[test]
fn an_empty_tape_rolls_no_dice_and_injects_nothing() {
    for seed in 0..20 {
        let world = World::generate(seed, &WorldParams::sweep_default());
        let quiet = World { decisions: Some(Arc::new(Tape::default())), ..world.clone() };
        let outcome = run_seed(&quiet, Keep::Log);
        let faults = outcome.log.iter().flatten().filter(|e| matches!(e.kind, EventKind::Fault { .. })).count();
        assert_eq!(faults, 0, "seed {seed}: a fault fired with no decision for it");
        assert!(outcome.decisions.is_empty(), "seed {seed}");
        let expected_failure = !world.lost_objects.is_empty() || world.cancels();
        assert!(outcome.violations.is_empty(), "seed {seed}: {:?}", outcome.violations);
        let done = outcome.end == lockstep_sim::runner::RunEnd::Done;
        if world.cancels_mid_run() {
            // A cancel racing the end decides it (the checkers hold the end to the cancel's answer).
            let cancelled = matches!(
                outcome.end,
                lockstep_sim::runner::RunEnd::Failed(lockstep::coordinator::RestoreError::Cancelled { .. })
            );
            assert!(cancelled || done != expected_failure, "seed {seed}: {:?}", outcome.end);
        } else {
            assert_eq!(done, !expected_failure, "seed {seed}");
        }
    }
}

/// The deliberate bugs whose first failing seed needs a fault, and one that needs none.
#[test]
fn a_deliberate_bug_found_by_a_sweep_shrinks_to_a_scenario_of_a_few_events() {
    for name in ["skip-checksum", "reply-before-persist", "tables-run-ahead"] {
        let known = catalog::by_name(name).expect("catalogued");
        let (seed, invariants) =
            first_detection(known.bugs, known.budget_seeds().expect("a sweep budget"), 2).expect("the sweep finds it");
        let params = WorldParams { bugs: known.bugs, ..WorldParams::sweep_default() };
        let world = World::generate(seed, &params);
        let shrunk = shrink(&world, None, "test", 2_000, Box::new(|_, _| {})).expect("the seed shrinks");
        assert_eq!(shrunk.invariant, invariants[0], "{name}");
        let (before, after) = (shrunk.before, shrunk.after);
        assert!(after.events <= 60, "{name}: {after}");
        assert!(after.events < before.events && after.tablets <= before.tablets, "{name}: {before} -> {after}");
        assert!(after.rows_and_changes < before.rows_and_changes, "{name}: {before} -> {after}");
        assert!(after.decisions <= 1, "{name}: {after}");

        // The file it writes loads, breaks the same invariant at the same seed, and passes without the bug.
        let scenario = Scenario::parse(name, "shrunk.toml", &shrunk.scenario).expect("the shrunk file loads");
        assert_eq!(scenario.seeds, vec![seed]);
        assert_eq!(scenario.expect_violation, Some(shrunk.invariant));
        let outcome = run_seed(&scenario.world(seed), Keep::Verdict);
        assert!(outcome.violations.iter().any(|v| v.invariant == shrunk.invariant), "{name}: {:?}", outcome.violations);
        assert_eq!(outcome.events, after.events, "{name}: the file is the case last seen failing");
        let fixed = run_seed(&scenario.without_bugs().world(seed), Keep::Verdict);
        assert!(fixed.violations.is_empty(), "{name} without the bug: {:?}", fixed.violations);
    }
}

/// A world that restores again after its lost object is back shrinks too: the file keeps the second restore
/// waiting for the first to end and the object lost until then, which is what lets a late request of the failed
/// restore meet the newer one's rows. Seed 1916 is the first of the default sweep to catch apply-older-operations.
#[test]
fn a_world_that_restores_again_after_a_failure_shrinks_to_a_scenario_that_restores_again() {
    let known = catalog::by_name("apply-older-operations").expect("catalogued");
    let params = WorldParams { bugs: known.bugs, ..WorldParams::sweep_default() };
    let world = World::generate(1916, &params);
    assert!(world.lost_objects.iter().all(|lost| lost.until_end_of == Some(1)), "a world that restores again");
    let shrunk = shrink(&world, None, "test", 2_000, Box::new(|_, _| {})).expect("the seed shrinks");
    // The late request's apply over the newer restore's rows is the first offending event.
    assert_eq!(shrunk.invariant, Invariant::NoLostIncrement);
    assert!(shrunk.after.events < shrunk.before.events && shrunk.after.tablets <= 2, "{}", shrunk.after);
    for line in
        ["after_ended = 1", "until_ended = 1", "outcome = \"failed:object-missing\"", "fault = \"message-delay\""]
    {
        assert!(shrunk.scenario.contains(line), "{line} missing from:\n{}", shrunk.scenario);
    }
    let scenario = Scenario::parse("again", "shrunk.toml", &shrunk.scenario).expect("the shrunk file loads");
    let outcome = run_seed(&scenario.world(1916), Keep::Verdict);
    assert!(outcome.violations.iter().any(|v| v.invariant == Invariant::NoLostIncrement), "{:?}", outcome.violations);
    let fixed = run_seed(&scenario.without_bugs().world(1916), Keep::Verdict);
    assert!(fixed.violations.is_empty(), "without the bug: {:?}", fixed.violations);
}

/// A restore to a point in time in segments shrinks too: the file keeps the point and the segments (the bugs of
/// segments need at least two), loads, breaks the same invariant at the same seed, and passes without the bug.
#[test]
fn a_failing_restore_in_segments_shrinks_to_a_scenario_that_restores_in_segments() {
    for name in ["segment-end-is-done", "final-work-every-segment", "segment-restarts-chain"] {
        let known = catalog::by_name(name).expect("catalogued");
        let (seed, invariants) =
            first_detection(known.bugs, known.budget_seeds().expect("a sweep budget"), 2).expect("the sweep finds it");
        let params = WorldParams { bugs: known.bugs, ..WorldParams::sweep_default() };
        let world = World::generate(seed, &params);
        assert!(world.segments() > 1, "{name}: seed {seed} restores in one go");
        let shrunk = shrink(&world, None, "test", 2_000, Box::new(|_, _| {})).expect("the seed shrinks");
        assert_eq!(shrunk.invariant, invariants[0], "{name}");
        let (before, after) = (shrunk.before, shrunk.after);
        assert!(after.events < before.events && after.tablets <= before.tablets, "{name}: {before} -> {after}");
        assert!(shrunk.scenario.contains("\nsegments = ["), "{name}: no segments in:\n{}", shrunk.scenario);

        let scenario = Scenario::parse(name, "shrunk.toml", &shrunk.scenario).expect("the shrunk file loads");
        assert_eq!(scenario.expect_violation, Some(shrunk.invariant));
        let written = scenario.world(seed);
        assert!(written.segments() > 1, "{name}: the file restores in one go");
        let outcome = run_seed(&written, Keep::Verdict);
        assert!(outcome.violations.iter().any(|v| v.invariant == shrunk.invariant), "{name}: {:?}", outcome.violations);
        assert_eq!(outcome.events, after.events, "{name}: the file is the case last seen failing");
        let fixed = run_seed(&scenario.without_bugs().world(seed), Keep::Verdict);
        assert!(fixed.violations.is_empty(), "{name} without the bug: {:?}", fixed.violations);
    }
}

#[test]
fn a_passing_seed_has_nothing_to_shrink() {
    let world = World::generate(3, &WorldParams::sweep_default());
    let error = shrink(&world, None, "test", 100, Box::new(|_, _| {})).expect_err("nothing to shrink");
    assert!(error.to_string().contains("breaks no invariant"), "{error}");
}
