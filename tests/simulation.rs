//! Simulation tests: fixed seed ranges under faults, determinism, and deliberate bugs that the checkers must
//! catch. They need the madsim build: `cargo sim-test` (or `scripts/test-all`).
#![cfg(madsim)]

use lockstep::coordinator::{CoordinatorBug, RestoreError};
use lockstep::protocol::{NodeAddr, ShardFailure};
use lockstep::shard::ShardBug;
use lockstep_sim::checkers::Invariant;
use lockstep_sim::faults::{FaultKind, FaultPlan};
use lockstep_sim::runner::{Keep, RunEnd, SeedOutcome, run_seed};
use lockstep_sim::sweep::{FailureClass, SweepConfig, WorldSource, run_sweep};
use lockstep_sim::world::{Bugs, World, WorldParams};

fn sweep(start: u64, seeds: u64, params: WorldParams) -> lockstep_sim::sweep::SweepSummary {
    let source = WorldSource::Generated(params);
    let config = SweepConfig {
        start,
        seeds,
        pinned: None,
        first: Vec::new(),
        jobs: 2,
        source,
        determinism_every: 10,
        stop: Default::default(),
    };
    run_sweep(&config, &|_| {})
}

fn describe(summary: &lockstep_sim::sweep::SweepSummary) -> String {
    summary.failures.iter().take(5).map(|f| format!("seed {}: {}\n", f.seed, f.lines.join("; "))).collect()
}

#[test]
fn a_fixed_seed_range_with_every_fault_kind_enabled_passes_and_fires_every_fault() {
    let params = WorldParams { faults: Some(FaultPlan::all(8_000)), ..WorldParams::sweep_default() };
    let summary = sweep(0, 200, params);
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    assert_eq!(summary.seeds_run, 200);
    assert!(summary.determinism_checked >= 20);
    for kind in FaultKind::ALL {
        assert!(summary.faults.get(kind) > 0, "fault kind {kind} never fired");
    }
}

#[test]
fn a_swarm_sweep_of_the_default_world_passes() {
    let summary = sweep(10_000, 400, WorldParams::sweep_default());
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    let missed: Vec<&str> = summary.probes_missed().iter().map(|p| p.name()).collect();
    assert!(missed.is_empty(), "coverage probes never hit in seeds 10000..10400: {missed:?}");
    assert!(summary.lost_object_worlds > 0, "some worlds lose an object and must still end cleanly");
}

#[test]
fn the_same_seed_gives_the_same_event_log_byte_for_byte() {
    for seed in [3, 77, 1_234] {
        let world = World::generate(seed, &WorldParams::sweep_default());
        let first = run_seed(&world, Keep::Log);
        let second = run_seed(&world, Keep::Log);
        let text = |o: &SeedOutcome| o.log.iter().flatten().map(|e| format!("{e}\n")).collect::<String>();
        assert!(first.events > 50, "seed {seed}: a real run has a real log");
        assert_eq!(text(&first), text(&second), "seed {seed}");
        assert!(first.log_hash.is_some(), "seed {seed}: a run that keeps its log hashes it");
        assert_eq!(first.log_hash, second.log_hash);
    }
}

#[test]
fn a_coordinator_whose_jitter_outlives_its_run_fails_the_determinism_check_naming_where_the_logs_part() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::AmbientJitter), shard: None, host: None };
    let summary = sweep(0, 200, WorldParams { bugs, ..WorldParams::sweep_default() });
    let (mismatches, others): (Vec<_>, Vec<_>) =
        summary.failures.iter().partition(|f| f.class == FailureClass::Determinism);
    assert!(others.is_empty(), "the bug breaks no invariant: {}", describe(&summary));
    assert!(mismatches.len() >= 5, "of {} seeds rerun: {}", summary.determinism_checked, describe(&summary));
    for failure in mismatches {
        assert!(failure.lines[0].starts_with("event log hash "), "{:?}", failure.lines);
        assert!(failure.lines[1].starts_with("first difference at event "), "{:?}", failure.lines);
    }
}

#[test]
fn a_passing_run_hashes_its_log_only_when_asked() {
    let world = World::generate(3, &WorldParams::sweep_default());
    let verdict = run_seed(&world, Keep::Verdict);
    assert!(verdict.violations.is_empty(), "seed 3 passes");
    assert_eq!((verdict.log_hash, verdict.log.is_some()), (None, false), "a sweep's passing seed keeps no hash");
    let hashed = run_seed(&world, Keep::Hash);
    assert!(hashed.log_hash.is_some() && hashed.log.is_none());
    assert_eq!(run_seed(&world, Keep::Log).log_hash, hashed.log_hash);
}

#[test]
fn a_world_with_an_object_lost_for_good_ends_in_a_clean_failed_naming_increment_and_tablet() {
    // No cancel: a cancel racing the failure could end the restore first.
    let params = WorldParams { lost_object_probability: 1.0, cancel_probability: 0.0, ..WorldParams::sweep_default() };
    for seed in 0..60 {
        let world = World::generate(seed, &params);
        let lost = world.lost_objects.first().cloned().expect("every world loses an object");
        let outcome = run_seed(&world, Keep::Verdict);
        assert!(outcome.violations.is_empty(), "seed {seed}: {:?}", outcome.violations);
        match outcome.end {
            RunEnd::Failed(RestoreError::Shard {
                increment,
                tablet,
                cause: ShardFailure::ObjectMissing { object },
                ..
            }) => {
                assert_eq!((increment, tablet, object), (lost.increment, lost.tablet, lost.object), "seed {seed}");
            }
            other => panic!("seed {seed}: expected a clean Failed, got {other:?}"),
        }
    }
}

#[test]
fn restores_to_a_point_in_time_in_segments_pass_under_every_fault_and_end_at_the_point() {
    let params = WorldParams {
        point_in_time_probability: 1.0,
        faults: Some(FaultPlan::all(8_000)),
        ..WorldParams::sweep_default()
    };
    let summary = sweep(0, 150, params.clone());
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    assert!(summary.point_in_time_worlds >= 120, "{} worlds to a point in time", summary.point_in_time_worlds);
    assert!(summary.segmented_worlds >= 60, "{} segmented worlds", summary.segmented_worlds);
    // Some points fall before the newest full backup (the chain then starts from the full before it), and some
    // before the last backup: the oracle is the source at the point, not at the end of the history.
    let worlds: Vec<World> = (0..150).map(|seed| World::generate(seed, &params)).collect();
    let newest_full = |world: &World| {
        let fulls = world.catalog.iter().filter(|m| m.kind == lockstep::model::BackupKind::Full);
        fulls.map(|m| m.backup_id).max().expect("a full backup")
    };
    assert!(worlds.iter().any(|w| w.chain_backup_ids[0] != newest_full(w)), "no point before the newest full");
    let last_backup = |world: &World| world.catalog.iter().map(|m| m.backup_id).max().expect("backups");
    assert!(worlds.iter().any(|w| w.chain_backup_ids.last() != Some(&last_backup(w))), "no point before the end");
}

#[test]
fn the_segment_bugs_are_caught_by_the_invariant_each_breaks_and_reproduced() {
    let coordinator = |bug| Bugs { coordinator: Some(bug), shard: None, host: None };
    assert_caught_and_reproducible(coordinator(CoordinatorBug::FinalWorkEverySegment), &[Invariant::FinalWorkAtTheEnd]);
    assert_caught_and_reproducible(
        coordinator(CoordinatorBug::SegmentEndIsDone),
        &[Invariant::NoFalseSuccess, Invariant::NoLostIncrement, Invariant::ExpectedOutcome],
    );
    assert_caught_and_reproducible(
        coordinator(CoordinatorBug::SegmentRestartsChain),
        &[Invariant::ProgressNeverBackwards],
    );
    // Restores in one go never end a segment early: the bugs cannot show there.
    for bug in
        [CoordinatorBug::FinalWorkEverySegment, CoordinatorBug::SegmentEndIsDone, CoordinatorBug::SegmentRestartsChain]
    {
        let params =
            WorldParams { bugs: coordinator(bug), point_in_time_probability: 0.0, ..WorldParams::sweep_default() };
        assert!(first_failure(&params, 60).is_none(), "{bug:?} caught in a world without segments");
    }
}

#[test]
fn cancels_racing_the_end_of_a_restore_pass_under_every_fault_and_end_as_their_answer_says() {
    let params =
        WorldParams { cancel_probability: 1.0, faults: Some(FaultPlan::all(8_000)), ..WorldParams::sweep_default() };
    let summary = sweep(0, 150, params);
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    // Every world restored in one go races a cancel; some cancels come first, some too late.
    assert!(summary.cancel_race_worlds >= 80, "{} worlds cancelled mid-run", summary.cancel_race_worlds);
    let too_late = summary.cancel_race_worlds - summary.cancel_race_won;
    assert!(summary.cancel_race_won >= 20 && too_late >= 10, "{} won, {too_late} too late", summary.cancel_race_won);
}

#[test]
fn the_bugs_of_a_late_cancel_are_caught_by_the_invariant_each_breaks_and_reproduced() {
    let coordinator = |bug| Bugs { coordinator: Some(bug), shard: None, host: None };
    assert_caught_and_reproducible(coordinator(CoordinatorBug::CancelAnswersEnded), &[Invariant::ExpectedOutcome]);
    assert_caught_and_reproducible(
        coordinator(CoordinatorBug::CancelOverwritesEnd),
        &[Invariant::ProgressNeverBackwards],
    );
    // Without a cancel at a moment of the run, no cancel comes after the end: the bugs cannot show.
    for bug in [CoordinatorBug::CancelAnswersEnded, CoordinatorBug::CancelOverwritesEnd] {
        let params = WorldParams { bugs: coordinator(bug), cancel_probability: 0.0, ..WorldParams::sweep_default() };
        assert!(first_failure(&params, 60).is_none(), "{bug:?} caught in a world without a cancel mid-run");
    }
}

/// Sweeps seeds until one fails; returns it with its outcome.
fn first_failure(params: &WorldParams, budget: u64) -> Option<(World, SeedOutcome)> {
    (0..budget).find_map(|seed| {
        let world = World::generate(seed, params);
        let outcome = run_seed(&world, Keep::Verdict);
        (!outcome.violations.is_empty()).then_some((world, outcome))
    })
}

fn assert_caught_and_reproducible(bugs: Bugs, expected: &[Invariant]) {
    let params = WorldParams { bugs, ..WorldParams::sweep_default() };
    let (world, outcome) = first_failure(&params, 300).expect("the bug is caught within 300 seeds");
    let invariants: Vec<Invariant> = outcome.violations.iter().map(|v| v.invariant).collect();
    assert!(
        invariants.iter().any(|i| expected.contains(i)),
        "seed {}: caught by {invariants:?}, expected one of {expected:?}",
        world.seed
    );
    // The repro path (rebuild the world from the seed alone, run with the full log) sees the same run.
    let rebuilt = World::generate(world.seed, &params);
    let repro = run_seed(&rebuilt, Keep::Log);
    assert!(outcome.log_hash.is_some(), "seed {}: a failing run hashes its log", world.seed);
    assert_eq!(repro.log_hash, outcome.log_hash, "seed {}: repro gives another trace", world.seed);
    assert_eq!(repro.violations, outcome.violations);
}

#[test]
fn a_coordinator_that_advances_after_the_first_report_is_caught_and_reproduced() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::AdvanceOnFirstReport), shard: None, host: None };
    // Either a shard applies out of order, or the shards' own guard refuses the skipped increment and the
    // restore fails although every object is intact.
    let expected = [Invariant::InOrderApply, Invariant::NoFalseSuccess, Invariant::ExpectedOutcome];
    assert_caught_and_reproducible(bugs, &expected);
}

#[test]
fn a_shard_that_skips_checksum_verification_is_caught_and_reproduced() {
    let bugs = Bugs { coordinator: None, shard: Some(ShardBug::SkipChecksum), host: None };
    assert_caught_and_reproducible(bugs, &[Invariant::CorruptNeverApplied]);
}

#[test]
fn a_table_that_runs_ahead_of_the_others_is_caught_and_reproduced() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::TablesRunAhead), shard: None, host: None };
    assert_caught_and_reproducible(bugs, &[Invariant::InOrderApply]);
}

#[test]
fn with_a_single_table_running_ahead_cannot_happen_and_nothing_is_caught() {
    // The bug only differs from the protocol when several tables share an increment; with one table and no
    // index it must pass, which shows the checker blames the cross-table rule and nothing else.
    let bugs = Bugs { coordinator: Some(CoordinatorBug::TablesRunAhead), shard: None, host: None };
    let params = WorldParams { bugs, tables: Some(1), indexes: Some(false), ..WorldParams::sweep_default() };
    assert!(first_failure(&params, 100).is_none());
}

#[test]
fn worlds_at_the_limits_of_the_cli_restore_under_faults() {
    // Sixteen tables with their indexes are 32 tables: the store's address once sat in the subnet of the ninth,
    // and every such seed crashed. The largest world (over 1,000 tablets, 51 increments) needs more than the
    // base liveness bound: its bound grows with its work.
    let many_tables = WorldParams { tables: Some(16), indexes: Some(true), ..WorldParams::sweep_default() };
    let summary = sweep(0, 20, many_tables);
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    let largest = WorldParams {
        tables: Some(16),
        indexes: Some(true),
        shard_count: Some(64),
        incrementals: Some(50),
        ..WorldParams::sweep_default()
    };
    assert!(World::generate(0, &largest).liveness_bound_ms > lockstep_sim::world::BASE_LIVENESS_BOUND_MS);
    let summary = sweep(0, 2, largest);
    assert!(summary.failures.is_empty(), "{}", describe(&summary));
    assert!(FaultKind::ALL.iter().any(|kind| summary.faults.get(*kind) > 0), "no fault fired in the largest world");
}

#[test]
fn a_sweep_without_faults_finishes_every_restore() {
    let params = WorldParams { faults: Some(FaultPlan::none()), ..WorldParams::default() };
    for seed in 0..30 {
        let outcome = run_seed(&World::generate(seed, &params), Keep::Verdict);
        assert!(outcome.violations.is_empty(), "seed {seed}: {:?}", outcome.violations);
        assert_eq!(outcome.end, RunEnd::Done, "seed {seed}");
        assert_eq!(outcome.faults, Default::default(), "seed {seed}: no fault may fire");
    }
}

/// The messages a run's log shows its nodes took in: every frame a host or the client logged as received (or
/// as undecodable), and for every ranged read a shard logged, its request (which the store took in) and its
/// answer, unless the read timed out waiting for it.
fn messages_taken_in_per_log(log: &[lockstep_sim::events::Event]) -> u64 {
    use lockstep::host::HostEvent;
    use lockstep::protocol::StoreError;
    use lockstep_sim::events::EventKind;
    log.iter()
        .map(|event| match &event.kind {
            EventKind::Host(HostEvent::Received { .. } | HostEvent::BadFrame { .. }) => 1,
            EventKind::Host(HostEvent::Download { outcome: Err(StoreError::Timeout { .. }), .. }) => 1,
            EventKind::Host(HostEvent::Download { .. }) => 2,
            _ => 0,
        })
        .sum()
}

#[test]
fn messages_are_counted_as_the_receiving_node_takes_them_in() {
    use lockstep::host::HostEvent;
    use lockstep_sim::events::{EventKind, SimNode};
    // Without faults nothing is lost on the way, and at Done (no read is left half-way, its request taken in by
    // the store and its answer not yet by the shard) the count is exactly what the log shows taken in.
    let calm = WorldParams { faults: Some(FaultPlan::none()), ..WorldParams::sweep_default() };
    let mut done = 0;
    for seed in 0..20 {
        let outcome = run_seed(&World::generate(seed, &calm), Keep::Log);
        let log = outcome.log.as_deref().expect("the log is kept");
        if outcome.end == RunEnd::Done {
            done += 1;
            assert!(outcome.messages > 0, "seed {seed}");
            assert_eq!(outcome.messages, messages_taken_in_per_log(log), "seed {seed}");
        }
    }
    assert!(done >= 10, "only {done} of 20 calm worlds ended Done");
    // Under faults, messages dropped, sent to a node that is down or answered after their reader gave up are not
    // counted; what the log shows taken in always is (a client's answer to a call it has had answered already is
    // taken in but not logged, so the log gives a floor).
    let stormy = WorldParams { faults: Some(FaultPlan::all(8_000)), ..WorldParams::sweep_default() };
    for seed in 0..20 {
        let outcome = run_seed(&World::generate(seed, &stormy), Keep::Log);
        let log = outcome.log.as_deref().expect("the log is kept");
        assert!(outcome.messages >= messages_taken_in_per_log(log), "seed {seed}");
    }
    // With shards rebooting and nothing else going wrong, a message sent to a shard that is down, or a store answer
    // to a read its shard did not live to take in, is not counted. At Done, beyond the log, the count holds at
    // most the one read request per shard killed that the store took in before the kill cut the read off.
    let mut plan = FaultPlan::none();
    plan.heal_at_ms = 8_000;
    plan.set_rate(FaultKind::ShardReboot, 2.0);
    let reboots = WorldParams { faults: Some(plan), ..WorldParams::sweep_default() };
    let (mut kills, mut counted, mut put_on_the_wire, mut rebooted_done) = (0, 0, 0, 0);
    for seed in 0..40 {
        let outcome = run_seed(&World::generate(seed, &reboots), Keep::Log);
        let log = outcome.log.as_deref().expect("the log is kept");
        // Every frame a node logged as sent (nothing drops or copies one here), and every read's request and
        // answer: what a count at the sender would give, at the least.
        counted += outcome.messages;
        put_on_the_wire += log
            .iter()
            .map(|event| match &event.kind {
                EventKind::Host(HostEvent::Sent { .. }) => 1,
                EventKind::Host(HostEvent::Download { .. }) => 2,
                _ => 0,
            })
            .sum::<u64>();
        if outcome.end != RunEnd::Done {
            continue;
        }
        rebooted_done += 1;
        let shard_kills = log
            .iter()
            .filter(|event| {
                matches!(event.kind, EventKind::Killed { .. })
                    && matches!(event.node, SimNode::Protocol(NodeAddr::Shard(_)))
            })
            .count() as u64;
        kills += shard_kills;
        let floor = messages_taken_in_per_log(log);
        assert!(
            (floor..=floor + shard_kills).contains(&outcome.messages),
            "seed {seed}: {} not in {floor}..={}",
            outcome.messages,
            floor + shard_kills
        );
    }
    assert!(kills > 0 && rebooted_done >= 10, "{kills} shard kills, {rebooted_done} of 40 worlds ended Done");
    assert!(
        counted < put_on_the_wire,
        "frames sent to shards that were down are not counted: {counted} of {put_on_the_wire}"
    );
}

#[test]
fn every_catalogued_bug_is_caught_within_its_seed_budget() {
    let mut survivors = Vec::new();
    for known in &lockstep_sim::catalog::CATALOG {
        match lockstep_sim::sweep::catalogued_detection(known, 2) {
            Ok(Some(_)) => {}
            Ok(None) => survivors.push(known.name),
            Err(error) => panic!("the scenario of {} does not load: {error}", known.name),
        }
    }
    assert!(survivors.is_empty(), "bugs that survived their budget: {survivors:?}");
}

#[test]
fn a_sweep_writes_junit_with_a_failing_case_per_broken_invariant_and_seed() {
    let bugs = Bugs { coordinator: None, shard: Some(ShardBug::SkipChecksum), host: None };
    let summary = sweep(0, 20, WorldParams { bugs, ..WorldParams::sweep_default() });
    assert!(!summary.failures.is_empty(), "the bug is caught in 20 seeds");
    let xml = lockstep_sim::sweep::junit_xml(&summary, " --bug skip-checksum");
    let failing_seeds = summary.failures.iter().map(|f| f.seed).collect::<std::collections::BTreeSet<_>>().len();
    let broken_invariants = summary.by_invariant.len();
    assert_eq!(xml.matches("<failure ").count(), failing_seeds + broken_invariants, "{xml}");
    assert!(
        xml.contains(r#"name="invariant corrupt-never-applied"><"#)
            || xml.contains("invariant corrupt-never-applied\">")
    );
    let first = summary.failures[0].seed;
    assert!(xml.contains(&format!("reproduce: cargo sim repro --seed {first} --bug skip-checksum")), "{xml}");
    assert!(!xml.contains("<failure message=\"\""), "every failure has a message");
}

/// `cargo sim run` with these arguments: its exit code and its output without the two lines that name the jobs
/// and the wall time.
fn cli_sweep(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
        .arg("run")
        .args(args)
        .output()
        .expect("the simulator runs");
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("utf-8 output");
    let kept: String = text
        .lines()
        .filter(|line| !line.starts_with("lockstep sweep:") && !line.starts_with("time "))
        .map(|line| format!("{line}\n"))
        .collect();
    (output.status.code(), kept)
}

#[test]
fn a_sweep_over_worker_processes_prints_what_one_job_prints() {
    for bug in [None, Some("skip-checksum")] {
        let mut args = vec!["--seeds", "40", "--determinism-every", "10"];
        args.extend(bug.map(|bug| ["--bug", bug]).into_iter().flatten());
        let (one_code, one) = cli_sweep(&[args.as_slice(), &["--jobs", "1"]].concat());
        let (three_code, three) = cli_sweep(&[args.as_slice(), &["--jobs", "3"]].concat());
        assert_eq!(three, one);
        assert_eq!(three_code, one_code);
        assert_eq!(one_code, Some(if bug.is_some() { 1 } else { 0 }), "{one}");
        // The first seed run (regression seed 0), and one in each block of 10 of 0..40.
        assert!(one.contains("determinism      5 seed(s) rerun, 0 mismatch(es)"), "{one}");
    }
}

#[test]
fn a_sweep_stops_early_at_its_first_failure_or_its_time_limit_and_says_so() {
    let (code, out) = cli_sweep(&["--seeds", "2000", "--fail-fast", "--bug", "skip-checksum", "--jobs", "2"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("stopped early    at the first failure (--fail-fast)"), "{out}");
    assert!(out.contains("reproduce: cargo sim repro --seed "), "{out}");
    let run: u64 = out
        .lines()
        .find_map(|line| line.strip_prefix("seeds run        "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("a seeds-run line");
    // Well before the end of the range, however slowly the sweep reads its workers' reports on a busy machine.
    assert!(run < 1_000, "stopped soon after the first failure: {run} of 2,004 seeds run");

    let (code, out) = cli_sweep(&["--time-limit", "1s", "--jobs", "2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("stopped early    at the time limit of 1s"), "{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn a_sweep_written_to_a_log_prints_a_progress_line_every_interval() {
    // Standard error is a pipe here, as in a CI job: no bar, plain lines.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
        .args(["run", "--time-limit", "2s", "--progress-every", "1s", "--jobs", "2"])
        .output()
        .expect("the simulator runs");
    assert_eq!(output.status.code(), Some(0));
    let lines = String::from_utf8(output.stderr).expect("utf-8 output");
    // Seeds finish after the first second, since they start until the second.
    assert!(!lines.is_empty(), "no progress line");
    for line in lines.lines() {
        assert!(line.starts_with("progress: ") && line.contains(" seeds, 0 failed, "), "{line}");
        assert!(line.contains(" elapsed of 2s, ") && line.ends_with(" seeds/s"), "{line}");
    }
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
        .args(["run", "--seeds", "5", "--progress-every", "0s"])
        .output()
        .expect("the simulator runs");
    assert_eq!(refused.status.code(), Some(2));
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("'--progress-every <PROGRESS_EVERY>': `0s`: a duration must be more than zero"), "{error}");
    assert!(refused.stdout.is_empty(), "no seed runs");
}

#[cfg(unix)]
#[test]
fn output_read_only_in_part_ends_the_program_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    // Each writes well after the first line: the trace (every event, more than a pipe holds) and the summary
    // (after a second of seeds).
    for args in [&["repro", "--seed", "3"][..], &["run", "--seeds", "1000"]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
            .args(args)
            .env("RUST_LOG", "trace")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the simulator runs");
        // As `head -1` does: read a line, then close the pipe.
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first).expect("a first line");
        let output = child.wait_with_output().expect("the simulator ends");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{args:?}: {}", output.status);
    }
}

#[test]
fn a_junit_file_goes_where_asked_and_a_path_that_cannot_be_written_is_refused_before_any_seed_runs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let report = dir.path().join("reports/sim/junit.xml");
    let (code, out) = cli_sweep(&["--seeds", "5", "--junit", report.to_str().expect("a utf-8 path")]);
    assert_eq!(code, Some(0), "{out}");
    let xml = std::fs::read_to_string(&report).expect("the report, in directories made for it");
    assert!(xml.contains("<testsuite ") && xml.contains("failures=\"0\""), "{xml}");

    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, "not a directory").expect("writes");
    let under_a_file = blocked.join("junit.xml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
        .args(["run", "--seeds", "5", "--junit", under_a_file.to_str().expect("a utf-8 path")])
        .output()
        .expect("the simulator runs");
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.starts_with(&format!("error: cannot write {}: ", under_a_file.display())), "{error}");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(!out.contains("lockstep sweep:") && !out.contains("seeds run"), "no seed runs: {out}");
}

#[cfg(unix)]
#[test]
fn an_interrupted_sweep_stops_its_workers_and_prints_the_summary_of_what_it_ran() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (jobs, signal) in [("2", libc::SIGINT), ("2", libc::SIGTERM), ("1", libc::SIGINT)] {
        let junit = dir.path().join(format!("sweep-{jobs}-{signal}.xml"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-sim"))
            .args(["run", "--seeds", "1000000", "--jobs", jobs, "--junit", junit.to_str().expect("a utf-8 path")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the simulator runs");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        // Past any note, to the line that says the sweep began.
        let mut first = String::new();
        while !first.starts_with("lockstep sweep: ") {
            first.clear();
            assert_ne!(stdout.read_line(&mut first).expect("the sweep's first lines"), 0, "no sweep began");
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let pid = i32::try_from(child.id()).expect("a pid");
        // SAFETY: signals the child started above, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("the summary");
        let output = child.wait_with_output().expect("the sweep ends");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "jobs {jobs}, signal {signal}: {rest}{stderr}");
        assert!(stderr.contains("interrupted: stopping the sweep"), "{stderr}");
        assert!(rest.contains("stopped early    interrupted (Ctrl-C or a termination signal)"), "{rest}");
        // Workers stopped by the sweep are not crashes, and their seeds in progress are not counted.
        assert!(rest.contains("failed seeds     0 (safety 0, liveness 0, crash 0, determinism 0)"), "{rest}");
        let xml = std::fs::read_to_string(&junit).expect("the JUnit file, written after the interruption");
        assert!(xml.contains(r#"<property name="stopped" value="interrupted"#), "{xml}");
    }
}
