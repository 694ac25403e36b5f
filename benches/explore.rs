//! The explorer against stateright, the Rust anchor for model checking, on the same state machines and the same
//! world: stateright runs `State::steps` and `State::next` through a `Model` adapter, so both search exactly the
//! same graph. Reports unique states (they must be equal) and states per second for each, both single-threaded.
//! Target: the explorer's rate is at least stateright's. Both search without symmetry reduction (the adapter does
//! not give stateright the explorer's canonical forms), so the state counts are comparable.
//!
//! Run with `cargo bench -p lockstep-sim --bench explore` (either build).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use lockstep::coordinator::OperationStatus;
use lockstep_sim::explore::{ExploreConfig, ExploreWorld, State, Step, explore};
use stateright::{Checker, Model, Property};

/// The explored world as a stateright model.
struct Adapter(ExploreWorld);

impl Model for Adapter {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        vec![self.0.initial()]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Step>) {
        actions.extend(state.steps(&self.0));
    }

    fn next_state(&self, state: &State, step: Step) -> Option<State> {
        Some(state.next(&self.0, &step, &mut Vec::new(), &mut Vec::new()))
    }

    fn properties(&self) -> Vec<Property<Self>> {
        // Every explored fault is transient, so a correct restore never fails.
        vec![Property::always("never failed", |_, state: &State| {
            !matches!(state.outcome(), Some(OperationStatus::Failed { .. }))
        })]
    }
}

/// Unique states and seconds of one explorer run.
fn run_explorer(config: &ExploreConfig) -> (u64, f64) {
    let world = ExploreWorld::new(config.clone());
    let began = Instant::now();
    let report = explore(&world, &mut |_| {});
    assert!(report.counterexample.is_none() && report.stuck.is_none(), "the correct protocol breaks nothing");
    (report.unique_states, began.elapsed().as_secs_f64())
}

/// Unique states and seconds of one stateright run.
fn run_stateright(config: &ExploreConfig) -> (u64, f64) {
    let model = Adapter(ExploreWorld::new(config.clone()));
    let began = Instant::now();
    let checker = model.checker().threads(1).spawn_bfs().join();
    checker.assert_properties();
    (checker.unique_state_count() as u64, began.elapsed().as_secs_f64())
}

fn small() -> ExploreConfig {
    ExploreConfig { max_duplicates: 0, max_download_faults: 0, ..ExploreConfig::default() }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let states = run_explorer(&small()).0;
    let mut group = criterion.benchmark_group("explore");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(states));
    group.bench_function("explorer_2_shards_1_crash_1_drop", |b| b.iter(|| run_explorer(&small())));
    group.bench_function("stateright_2_shards_1_crash_1_drop", |b| b.iter(|| run_stateright(&small())));
    group.finish();
    criterion.final_summary();

    let config = ExploreConfig::default();
    println!("\n== target: the `cargo sim check` default world, best of 3, single-threaded");
    let best = |run: fn(&ExploreConfig) -> (u64, f64)| {
        let runs: Vec<(u64, f64)> = (0..3).map(|_| run(&config)).collect();
        let states = runs[0].0;
        assert!(runs.iter().all(|r| r.0 == states), "a search is deterministic");
        (states, runs.iter().map(|r| r.1).fold(f64::INFINITY, f64::min))
    };
    let (ours, our_s) = best(run_explorer);
    let (theirs, their_s) = best(run_stateright);
    let our_rate = ours as f64 / our_s;
    let their_rate = theirs as f64 / their_s;
    println!("explorer    {ours:>9} unique states in {our_s:>6.2} s: {our_rate:>9.0} states/s");
    println!("stateright  {theirs:>9} unique states in {their_s:>6.2} s: {their_rate:>9.0} states/s");
    println!("unique states equal: {}", if ours == theirs { "yes" } else { "NO" });
    let ratio = our_rate / their_rate;
    println!("rate ratio {ratio:.2} (target >= 1.00): {}", if ratio >= 1.0 { "target met" } else { "TARGET MISSED" });
}
