//! Every scenario in `scenarios/` runs with its pinned seeds and must pass every invariant; the transcript of
//! its first pinned seed is a snapshot (`tests/snapshots/scenarios__<name>.snap`), reviewed like code with
//! `cargo insta review`. Every kept bug in `scenarios/regressions/` (written by `cargo sim shrink`) must still
//! break its invariant with its bug, and pass every invariant without it. Needs the madsim build
//! (`cargo sim-test`).
#![cfg(madsim)]

use std::path::Path;

use lockstep_sim::checkers::Invariant;
use lockstep_sim::runner::{Keep, run_seed, transcript};
use lockstep_sim::scenario::{Scenario, scenario_files};
use lockstep_sim::sweep::SeedFailure;

fn scenarios() -> Vec<Scenario> {
    load_dir("../scenarios")
}

fn load_dir(dir: &str) -> Vec<Scenario> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let files = scenario_files(&dir).expect("the scenarios directory is readable");
    files.iter().map(|path| Scenario::load(path).unwrap_or_else(|error| panic!("{error}"))).collect()
}

#[test]
fn there_are_at_least_a_dozen_scenarios() {
    assert!(scenarios().len() >= 12, "found {}", scenarios().len());
}

#[test]
fn every_scenario_passes_its_pinned_seeds_and_its_transcript_is_reviewed() {
    let mut failures = Vec::new();
    for scenario in scenarios() {
        for (i, seed) in scenario.seeds.iter().enumerate() {
            let world = scenario.world(*seed);
            let outcome = run_seed(&world, if i == 0 { Keep::Log } else { Keep::Verdict });
            if let Some(panic) = &outcome.panic {
                failures.push(format!("{} seed {seed}: panicked: {panic}", scenario.name));
            }
            for violation in &outcome.violations {
                failures.push(format!("{} seed {seed}: {violation}", scenario.name));
            }
            if i == 0 {
                let text = format!("{}\n{}", scenario.description, transcript(&world, &outcome));
                insta::assert_snapshot!(scenario.name.clone(), text);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_kept_bug_still_breaks_its_invariant_and_the_production_protocol_passes_its_world() {
    let regressions = load_dir("../scenarios/regressions");
    assert!(regressions.len() >= 3, "found {}", regressions.len());
    let mut failures = Vec::new();
    for scenario in regressions {
        let expected = scenario.expect_violation;
        assert!(expected.is_some(), "{}: a kept bug names the invariant it breaks", scenario.name);
        let fixed = scenario.without_bugs();
        for (i, seed) in scenario.seeds.iter().enumerate() {
            let world = scenario.world(*seed);
            let outcome = run_seed(&world, if i == 0 { Keep::Log } else { Keep::Verdict });
            if !outcome.violations.iter().any(|v| Some(v.invariant) == expected && !v.of_the_scenario) {
                failures.push(format!("{} seed {seed}: {expected:?} did not break", scenario.name));
            }
            if i == 0 {
                let text = format!("{}\n{}", scenario.description, transcript(&world, &outcome));
                insta::assert_snapshot!(format!("regression-{}", scenario.name), text);
            }
            let outcome = run_seed(&fixed.world(*seed), Keep::Verdict);
            for violation in &outcome.violations {
                failures.push(format!("{} seed {seed} without its bug: {violation}", scenario.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_malformed_scenario_file_is_refused_naming_file_line_and_problem() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("broken.toml");
    let text = "description = \"x\"\n\n[[table]]\nname = \"orders\"\nshards = 2\nshard_cuont = 3\n";
    std::fs::write(&path, text).expect("the file is written");
    let error = Scenario::load(&path).expect_err("the file is refused");
    assert_eq!(error.file, path.display().to_string());
    assert_eq!(error.line, 6);
    assert!(error.message.contains("shard_cuont"), "{error}");
    assert!(error.to_string().starts_with(&format!("{}:6:", path.display())), "{error}");
}

#[test]
fn a_pinned_decision_the_run_never_comes_to_fails_the_seed_naming_it() {
    // The coordinator sends a handful of messages in this restore, and its first one leaves after healing at 1 ms.
    let text = |decisions: &str| {
        format!(
            "description = \"x\"\nseeds = [0]\n[[table]]\nname = \"orders\"\nshards = 2\nrows = [[1, 10], [600, 60]]\n\
             [[backup]]\nid = 1\nkind = \"full\"\nat_ms = 1000\n[faults]\nheal_at_ms = {{HEAL}}\n{decisions}"
        )
    };
    let run = |heal_at_ms: u64, decisions: &str| {
        let source = text(decisions).replace("{HEAL}", &heal_at_ms.to_string());
        let scenario = Scenario::parse("unfired", "unfired.toml", &source).unwrap_or_else(|error| panic!("{error}"));
        run_seed(&scenario.world(0), Keep::Verdict).violations
    };
    let drop = |nth: u32| format!("[[decision]]\nfault = \"message-drop\"\nnode = \"coordinator\"\nnth = {nth}\n");

    // Fired: the coordinator's first message is dropped during the fault phase, and the restore still ends Done.
    assert_eq!(run(60_000, &drop(0)), Vec::new());

    let never = run(60_000, &drop(1_000));
    assert_eq!(never.len(), 1, "{never:?}");
    assert_eq!(never[0].invariant, Invariant::ExpectedOutcome);
    assert!(never[0].of_the_scenario);
    let detail = &never[0].detail;
    assert!(
        detail.starts_with(
            "the scenario's decision(s) never fired: `message-drop` at chance 1000 of coordinator (coordinator had "
        ),
        "{detail}"
    );

    let late = run(1, &drop(0));
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(
        late[0]
            .detail
            .ends_with("`message-drop` at chance 0 of coordinator (it came after healing, when no fault fires)"),
        "{}",
        late[0].detail
    );
}

/// A kept bug's scenario that expects `expected-outcome` to break is not satisfied by a decision that never fired
/// (which is reported as `expected-outcome` too): the run was not the scenario's, so it found no bug.
#[test]
fn a_decision_that_never_fired_does_not_count_as_the_kept_bug_found() {
    let text = "description = \"x\"\nseeds = [0]\nexpect_violation = \"expected-outcome\"\n[[table]]\nname = \"orders\"\n\
                shards = 2\nrows = [[1, 10], [600, 60]]\n[[backup]]\nid = 1\nkind = \"full\"\nat_ms = 1000\n\
                [faults]\nheal_at_ms = 60000\n[[decision]]\nfault = \"message-drop\"\nnode = \"coordinator\"\nnth = 1000\n";
    let scenario = Scenario::parse("kept", "kept.toml", text).unwrap_or_else(|error| panic!("{error}"));
    let outcome = run_seed(&scenario.world(0), Keep::Verdict);
    assert!(outcome.violations.iter().all(|v| v.invariant == Invariant::ExpectedOutcome && v.of_the_scenario));
    assert_eq!(outcome.violations.len(), 1, "{:?}", outcome.violations);
    let failure = SeedFailure::of(&outcome, scenario.expect_violation).expect("the kept bug was not found");
    let lines = failure.lines.join("\n");
    assert!(lines.starts_with("expected invariant expected-outcome to break (a kept bug), but it held"), "{lines}");
    assert!(lines.contains("never fired"), "{lines}");
}
