//! The exhaustive explorer on small worlds: the number of unique states of a fixed world is pinned (a change in
//! the protocol or the explorer shows up here), the correct protocol breaks nothing and reaches every
//! "sometimes" property, each deliberate bug yields its shortest counterexample (pinned as a snapshot), and under
//! the madsim build the scenario file emitted for it makes the simulation break the same invariant.

use lockstep::coordinator::CoordinatorBug;
use lockstep_sim::catalog::{CATALOG, KnownBug};
use lockstep_sim::explore::{
    Counterexample, ExploreConfig, ExploreWorld, Report, SearchOrder, Sometimes, explore, replay,
};
use lockstep_sim::world::Bugs;

/// Two shards, a full backup and one incremental, one crash and one dropped message.
fn pinned() -> ExploreConfig {
    ExploreConfig {
        shards: 2,
        increments: 2,
        max_crashes: 1,
        max_drops: 1,
        max_duplicates: 0,
        max_download_faults: 0,
        ..ExploreConfig::default()
    }
}

fn run(config: ExploreConfig) -> (ExploreWorld, Report) {
    let world = ExploreWorld::new(config);
    let report = explore(&world, &mut |_| {});
    (world, report)
}

#[test]
fn the_pinned_world_has_a_known_number_of_states_and_no_violation() {
    let (_, report) = run(pinned());
    assert!(!report.truncated);
    assert!(report.counterexample.is_none(), "{:?}", report.counterexample);
    assert!(report.stuck.is_none(), "{:?}", report.stuck);
    assert_eq!(report.unique_states, PINNED_STATES);
    assert_eq!(report.sometimes_seen, Sometimes::ALL.to_vec(), "every sometimes-property is reached");
}

/// Unique states of [`pinned`]; changes only when the protocol or the explorer's model of faults changes.
const PINNED_STATES: u64 = 22_150;

#[test]
fn depth_first_search_finds_the_same_states() {
    let (_, breadth) = run(pinned());
    let (_, depth) = run(ExploreConfig { order: SearchOrder::DepthFirst, ..pinned() });
    assert_eq!(depth.unique_states, breadth.unique_states);
}

#[test]
fn without_faults_a_restore_has_one_way_to_end_and_no_sometimes() {
    let config = ExploreConfig { max_crashes: 0, max_drops: 0, max_duplicates: 0, max_download_faults: 0, ..pinned() };
    let (_, report) = run(config);
    assert!(report.counterexample.is_none() && report.stuck.is_none());
    assert!(report.sometimes_seen.is_empty(), "faults are needed for {:?}", report.sometimes_seen);
}

fn bug_world(bugs: Bugs) -> ExploreConfig {
    let tables = if bugs.coordinator == Some(CoordinatorBug::TablesRunAhead) { 2 } else { 1 };
    let shards = if tables == 2 { 1 } else { 2 };
    ExploreConfig { tables, shards, bugs, ..ExploreConfig::default() }
}

/// The catalogued bugs the explorer's world can show: every one but `incrementals-before-newest-full`, which
/// needs an older full backup than the explored world has.
fn explorable() -> impl Iterator<Item = &'static KnownBug> {
    CATALOG.iter().filter(|b| b.name != "incrementals-before-newest-full")
}

/// The shortest counterexample of `bugs`: a broken safety invariant, or else a state from which Done is lost.
fn counterexample(bugs: Bugs) -> (ExploreWorld, Counterexample) {
    let (world, report) = run(bug_world(bugs));
    let cex = report.counterexample.or(report.stuck).expect("the bug is caught");
    (world, cex)
}

#[test]
fn each_catalogued_bug_yields_its_shortest_counterexample() {
    for known in explorable() {
        let (world, cex) = counterexample(known.bugs);
        let trace = replay(&world, &cex.path).join("\n");
        let text = format!("{}: {}: {}\n{trace}", known.name, cex.broken.invariant, cex.broken.detail);
        insta::assert_snapshot!(format!("counterexample_{}", known.name.replace('-', "_")), text);
    }
}

#[cfg(madsim)]
#[test]
fn the_emitted_scenario_makes_the_simulation_break_the_same_invariant() {
    use lockstep_sim::explore::counterexample_scenario;
    use lockstep_sim::runner::run_seed;
    use lockstep_sim::scenario::Scenario;
    for known in explorable() {
        let (world, cex) = counterexample(known.bugs);
        let text = counterexample_scenario(&world, &cex);
        let scenario =
            Scenario::parse("counterexample", "counterexample.toml", &text).expect("the emitted scenario loads");
        // A lost path to Done shows in the simulation as an operation that ends otherwise than planned.
        let expected = if cex.broken.invariant == "liveness" { "expected-outcome" } else { cex.broken.invariant };
        let reproduced = scenario.seeds.iter().any(|seed| {
            let outcome = run_seed(&scenario.world(*seed), false);
            outcome.violations.iter().any(|v| v.invariant.name() == expected)
        });
        assert!(reproduced, "{}: no seed of the emitted scenario breaks {expected}\n{text}", known.name);
    }
}
