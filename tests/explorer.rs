//! The exhaustive explorer on small worlds: the number of unique states of a fixed world is pinned (a change in
//! the protocol or the explorer shows up here), the correct protocol breaks nothing and reaches every
//! "sometimes" property, each deliberate bug yields its shortest counterexample (pinned as a snapshot), and under
//! the madsim build the scenario file emitted for it makes the simulation break the same invariant. Symmetry
//! reduction merges mirrored states (pinned), only ever merges states with the same futures, and loses no bug.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use lockstep::bundle::Bundle;
use lockstep::coordinator::CoordinatorBug;
use lockstep::model::{BackupManifest, Change, TabletId, apply_changes};
use lockstep::shard::ShardBug;
use lockstep_sim::catalog::{CATALOG, KnownBug};
use lockstep_sim::explore::{
    Counterexample, ExploreConfig, ExploreWorld, Fate, Report, SearchOrder, Sometimes, State, Step, explore, replay,
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
const PINNED_STATES: u64 = 14_957;

#[test]
fn a_restore_in_three_segments_is_explored_whole_with_no_violation_and_continues_at_each_segment_end() {
    let config = ExploreConfig { shards: 1, increments: 3, segments: 3, ..ExploreConfig::default() };
    let (world, report) = run(config.clone());
    assert!(!report.truncated);
    assert!(report.counterexample.is_none(), "{:?}", report.counterexample);
    assert!(report.stuck.is_none(), "{:?}", report.stuck);
    assert_eq!(report.unique_states, SEGMENTED_STATES);
    assert_eq!(report.sometimes_seen, Sometimes::ALL.to_vec(), "every sometimes-property is reached");
    // Without faults the one way to Done asks for segments 2 and 3, each once the one before has ended.
    let mut state = world.initial();
    let mut continues = 0;
    while state.outcome().is_none() {
        let steps = state.steps(&world);
        let step = steps.iter().find(|s| !State::is_fault(s)).expect("a fault-free step").clone();
        continues += usize::from(step == Step::Continue);
        let mut broken = Vec::new();
        state = state.next(&world, &step, &mut broken, &mut Vec::new());
        assert!(broken.is_empty(), "{broken:?}");
    }
    assert_eq!(continues, 2);
    assert!(matches!(state.outcome(), Some(lockstep::coordinator::OperationStatus::Done { increments: 3, .. })));
    // In one go the same world has no segment to ask for.
    let world = ExploreWorld::new(ExploreConfig { segments: 1, ..config });
    assert!(!world.initial().steps(&world).contains(&Step::Continue));
}

/// Unique states of the world restored in three segments above.
const SEGMENTED_STATES: u64 = 146_515;

#[test]
fn a_restore_the_client_may_cancel_at_any_moment_is_explored_whole_and_ends_cancelled_or_done() {
    let (world, report) = run(ExploreConfig { cancel: true, ..pinned() });
    assert!(!report.truncated);
    assert!(report.counterexample.is_none(), "{:?}", report.counterexample);
    assert!(report.stuck.is_none(), "{:?}", report.stuck);
    assert_eq!(report.unique_states, CANCEL_STATES);
    assert!(report.unique_states > PINNED_STATES, "a cancel is one more choice at every moment");
    // Without faults: cancelled at once it ends cancelled; left alone it ends Done, and a cancel then is refused.
    let fault_free_end = |cancel_first: bool| {
        let mut state = world.initial();
        let mut cancels = 0;
        while !state.steps(&world).is_empty() {
            let steps = state.steps(&world);
            let step = if cancel_first && steps.contains(&Step::Cancel) {
                Step::Cancel
            } else {
                steps
                    .iter()
                    .find(|s| !State::is_fault(s) && (**s != Step::Cancel || state.outcome().is_some()))
                    .expect("a step")
                    .clone()
            };
            cancels += usize::from(step == Step::Cancel);
            let mut broken = Vec::new();
            state = state.next(&world, &step, &mut broken, &mut Vec::new());
            assert!(broken.is_empty(), "{broken:?}");
        }
        assert_eq!(cancels, 1);
        state.outcome().cloned()
    };
    assert!(matches!(
        fault_free_end(true),
        Some(lockstep::coordinator::OperationStatus::Failed {
            error: lockstep::coordinator::RestoreError::Cancelled { applied: 0 },
            ..
        })
    ));
    assert!(matches!(fault_free_end(false), Some(lockstep::coordinator::OperationStatus::Done { increments: 2, .. })));
}

/// Unique states of [`pinned`] when the client may cancel.
const CANCEL_STATES: u64 = 40_335;

#[test]
fn a_restore_again_after_a_cancel_is_explored_whole_and_ends_done() {
    let (world, report) = run(ExploreConfig { shards: 1, cancel: true, restore_again: true, ..pinned() });
    assert!(!report.truncated);
    assert!(report.counterexample.is_none(), "{:?}", report.counterexample);
    assert!(report.stuck.is_none(), "{:?}", report.stuck);
    assert_eq!(report.unique_states, RESTORE_AGAIN_STATES);
    // Without faults: cancelled at once, then restored again, the second restore ends Done and the first stays
    // cancelled.
    let mut state = world.initial();
    let mut taken = Vec::new();
    while !state.steps(&world).is_empty() {
        let steps = state.steps(&world);
        let step = [Step::Cancel, Step::RestoreAgain]
            .into_iter()
            .find(|s| steps.contains(s))
            .unwrap_or_else(|| steps.iter().find(|s| !State::is_fault(s)).expect("a step").clone());
        taken.push(step.clone());
        let mut broken = Vec::new();
        state = state.next(&world, &step, &mut broken, &mut Vec::new());
        assert!(broken.is_empty(), "{broken:?}");
    }
    assert_eq!(taken.iter().filter(|s| matches!(s, Step::Cancel | Step::RestoreAgain)).count(), 2);
    assert!(matches!(
        state.outcome(),
        Some(lockstep::coordinator::OperationStatus::Failed {
            error: lockstep::coordinator::RestoreError::Cancelled { .. },
            ..
        })
    ));
    assert!(matches!(
        state.outcome_of(lockstep_sim::explore::OP_AGAIN),
        Some(lockstep::coordinator::OperationStatus::Done { increments: 2, .. })
    ));
}

#[test]
fn a_restore_again_refused_because_a_cancel_kept_the_tables_is_a_violation_not_a_panic() {
    let bugs = Bugs { coordinator: Some(CoordinatorBug::CancelKeepsHold), shard: None, host: None };
    let config = ExploreConfig { shards: 1, cancel: true, restore_again: true, bugs, ..pinned() };
    let world = ExploreWorld::new(config);
    let mut state = world.initial();
    loop {
        let steps = state.steps(&world);
        let step = [Step::Cancel, Step::RestoreAgain]
            .into_iter()
            .find(|s| steps.contains(s))
            .unwrap_or_else(|| steps.iter().find(|s| !State::is_fault(s)).expect("a step").clone());
        let mut broken = Vec::new();
        state = state.next(&world, &step, &mut broken, &mut Vec::new());
        if step == Step::RestoreAgain {
            assert!(
                broken.iter().any(|b| b.invariant == "expected-outcome" && b.detail.contains("was refused")),
                "{broken:?}"
            );
            break;
        }
    }
}

/// Unique states of [`pinned`] with one shard, when the client may cancel and then restores again.
const RESTORE_AGAIN_STATES: u64 = 29_677;

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
    // One request lost for good shows with one shard; with two, the liveness check that finds it walks 40 times
    // the states.
    let one_shard = tables == 2 || bugs.coordinator == Some(CoordinatorBug::LostRequestWaitsForever);
    let shards = if one_shard { 1 } else { 2 };
    // The bugs of restores in segments show in a restore of two segments.
    let segmented = bugs.coordinator.is_some_and(|bug| {
        matches!(
            bug,
            CoordinatorBug::FinalWorkEverySegment
                | CoordinatorBug::SegmentEndIsDone
                | CoordinatorBug::SegmentRestartsChain
        )
    });
    let segments = if segmented { 2 } else { 1 };
    // The bugs of cancels show once the client may cancel; a shard that takes an older operation's late request
    // needs a second restore of its table, which follows a cancel.
    let restore_again = bugs.shard == Some(ShardBug::ApplyOlderOperations);
    let cancel = restore_again
        || bugs.coordinator.is_some_and(|bug| {
            matches!(
                bug,
                CoordinatorBug::CancelKeepsHold
                    | CoordinatorBug::CancelAnswersEnded
                    | CoordinatorBug::CancelOverwritesEnd
            )
        });
    let shards = if restore_again { 1 } else { shards };
    ExploreConfig { tables, shards, segments, bugs, cancel, restore_again, ..ExploreConfig::default() }
}

/// The catalogued bugs the explorer's world can show: every one but `incrementals-before-newest-full`, which
/// needs an older full backup than the explored world has, and the host's bugs (the explorer runs no host).
fn explorable() -> impl Iterator<Item = &'static KnownBug> {
    let unreachable = ["incrementals-before-newest-full"];
    CATALOG.iter().filter(move |b| b.bugs.host.is_none() && !unreachable.contains(&b.name))
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
    use lockstep_sim::runner::{Keep, run_seed};
    use lockstep_sim::scenario::Scenario;
    for known in explorable() {
        let (world, cex) = counterexample(known.bugs);
        let text = counterexample_scenario(&world, &cex);
        let scenario =
            Scenario::parse("counterexample", "counterexample.toml", &text).expect("the emitted scenario loads");
        // A lost path to Done shows in the simulation as an operation that ends otherwise than planned, or that
        // has not ended when the run does.
        let expected: &[&str] = if cex.broken.invariant == "liveness" {
            &["expected-outcome", "liveness"]
        } else {
            &[cex.broken.invariant]
        };
        let reproduced = scenario.seeds.iter().any(|seed| {
            let outcome = run_seed(&scenario.world(*seed), Keep::Verdict);
            outcome.violations.iter().any(|v| expected.contains(&v.invariant.name()))
        });
        assert!(reproduced, "{}: no seed of the emitted scenario breaks {expected:?}\n{text}", known.name);
    }
}

fn symmetric(config: ExploreConfig) -> ExploreConfig {
    ExploreConfig { symmetry: true, ..config }
}

#[test]
fn symmetry_reduction_merges_mirrored_states_of_the_pinned_world() {
    let (_, plain) = run(pinned());
    let (world, reduced) = run(symmetric(pinned()));
    assert_eq!(reduced.symmetries, 2, "the two shards of the pinned world are interchangeable");
    assert_eq!(world.symmetry().map(|s| s.node_permutation(1)), Some(&[1, 0][..]));
    assert!(!reduced.truncated);
    assert!(reduced.counterexample.is_none(), "{:?}", reduced.counterexample);
    assert!(reduced.stuck.is_none(), "{:?}", reduced.stuck);
    assert_eq!(reduced.sometimes_seen, Sometimes::ALL.to_vec(), "every sometimes-property is still reached");
    assert_eq!(plain.unique_states, PINNED_STATES);
    assert_eq!(reduced.unique_states, PINNED_SYMMETRIC_STATES);
    assert!(reduced.unique_states < plain.unique_states);
}

/// Unique states of [`pinned`] up to swapping its two shards.
const PINNED_SYMMETRIC_STATES: u64 = 7_578;

/// Unique states of [`pinned`] up to attempt numbering alone (the identity renaming's encoding).
const PINNED_IDENTITY_CLASSES: u64 = 14_941;

#[test]
fn with_symmetry_reduction_every_catalogued_bug_is_caught_by_a_path_as_short() {
    for known in explorable() {
        let (_, plain) = counterexample(known.bugs);
        let (world, report) = run(symmetric(bug_world(known.bugs)));
        let reduced = report.counterexample.or(report.stuck).unwrap_or_else(|| panic!("{} is caught", known.name));
        assert_eq!(reduced.broken.invariant, plain.broken.invariant, "{}", known.name);
        assert_eq!(reduced.path.len(), plain.path.len(), "{}: BFS over the classes is as short", known.name);
        // The path is one of concrete steps: it replays, and a safety violation shows on its last step.
        let trace = replay(&world, &reduced.path);
        if reduced.broken.invariant != "liveness" {
            let violated = format!("invariant {} violated", plain.broken.invariant);
            assert!(trace.iter().any(|line| line.contains(&violated)), "{}: {trace:?}", known.name);
        }
    }
}

/// What a state's future looks like one step ahead, with successors named by their keys: for every step, the
/// successor's key, whether the step is a fault, what it breaks and shows.
type Future = BTreeSet<(u64, bool, Vec<&'static str>, Vec<Sometimes>)>;

fn future(world: &ExploreWorld, state: &State) -> (Future, Vec<State>) {
    let mut future = Future::new();
    let mut successors = Vec::new();
    for step in state.steps(world) {
        let (mut broken, mut seen) = (Vec::new(), Vec::new());
        let next = state.next(world, &step, &mut broken, &mut seen);
        let mut broken: Vec<&'static str> = broken.iter().map(|b| b.invariant).collect();
        broken.sort();
        seen.sort();
        future.insert((world.dedup_key(&next), State::is_fault(&step), broken, seen));
        successors.push(next);
    }
    (future, successors)
}

/// Every state of `world` reachable without symmetry reduction, deduplicated by plain fingerprint.
fn every_state(world: &ExploreWorld) -> Vec<State> {
    let mut seen: HashMap<u64, ()> = HashMap::new();
    let mut states = Vec::new();
    let mut queue = VecDeque::from([world.initial()]);
    seen.insert(queue[0].fingerprint(), ());
    while let Some(state) = queue.pop_front() {
        for step in state.steps(world) {
            let next = state.next(world, &step, &mut Vec::new(), &mut Vec::new());
            if seen.insert(next.fingerprint(), ()).is_none() {
                queue.push_back(next);
            }
        }
        states.push(state);
    }
    states
}

/// Soundness, checked state by state: the relation "same key" over every reachable state of the pinned world is a
/// bisimulation that keeps every checked property (successor keys, faults, broken invariants, "sometimes"
/// properties and how the operation ended agree), and every renaming maps a reachable state to a reachable one.
#[test]
fn states_merged_by_symmetry_have_the_same_futures() {
    let world = ExploreWorld::new(symmetric(pinned()));
    let symmetry = world.symmetry().expect("symmetry is on");
    let states = every_state(&world);
    assert_eq!(states.len() as u64, PINNED_STATES);
    let reachable: BTreeSet<u64> = states.iter().map(|s| symmetry.renamed_fingerprint(s, 0)).collect();
    // Without renaming shards, the encoding merges only states that differ in how attempts are numbered.
    assert_eq!(reachable.len() as u64, PINNED_IDENTITY_CLASSES);
    let mut classes: BTreeMap<u64, (Future, Option<String>, u32)> = BTreeMap::new();
    for state in &states {
        let (future, _) = future(&world, state);
        let outcome = state.outcome().map(|o| format!("{o:?}"));
        let key = world.dedup_key(state);
        let class = classes.entry(key).or_insert_with(|| (future.clone(), outcome.clone(), 0));
        assert_eq!(class.0, future, "merged states differ in their next steps");
        assert_eq!(class.1, outcome, "merged states differ in how the operation ended");
        class.2 += 1;
        for renaming in 0..symmetry.len() {
            assert!(reachable.contains(&symmetry.renamed_fingerprint(state, renaming)), "renaming {renaming}");
        }
    }
    assert_eq!(classes.len() as u64, PINNED_SYMMETRIC_STATES, "the classes are the reduced search's states");
    assert!(classes.values().any(|c| c.2 > 1), "some states are merged");
}

fn walk(world: &ExploreWorld, path: &[Step]) -> State {
    path.iter().fold(world.initial(), |state, step| {
        assert!(state.steps(world).contains(step), "{step} is possible");
        state.next(world, step, &mut Vec::new(), &mut Vec::new())
    })
}

/// Shard 0 applies the full backup while shard 1's request waits, and the mirror image of that.
fn mirrored_paths() -> [Vec<Step>; 2] {
    [0, 1].map(|s| vec![Step::Flush(None), Step::Flush(None), Step::Deliver(s), Step::Download(s, 0, Fate::Whole)])
}

/// A world whose shard 1 holds one row more than shard 0 in its full backup.
fn lopsided(config: ExploreConfig) -> ExploreWorld {
    let mut world = ExploreWorld::new(config);
    let tablet = TabletId::new(0, 1);
    let object = BackupManifest::object_name(1, tablet);
    let mut bundle = Bundle::decode(&object, &world.objects[&object]).expect("intact");
    bundle.changes.push(Change::Upsert { key: 12, value: 0 });
    let bytes = bundle.encode();
    world.crcs.insert(object.clone(), lockstep::bundle::payload_crc32(&bytes));
    world.objects.insert(object, bytes.into());
    apply_changes(&mut world.expected[1], &[Change::Upsert { key: 12, value: 0 }]);
    world.reduce_by_symmetry();
    world
}

#[test]
fn mirrored_states_share_a_key_and_shards_with_different_data_are_never_merged() {
    let world = ExploreWorld::new(symmetric(pinned()));
    let [one, other] = mirrored_paths();
    let trace = replay(&world, &one).join("\n");
    assert!(trace.contains("t0/shard-0 read of backups/000001/t0/shard-0.bundle comes back Whole"), "{trace}");
    let mirror = replay(&world, &other).join("\n");
    assert!(mirror.contains("t0/shard-1 read of backups/000001/t0/shard-1.bundle comes back Whole"), "{mirror}");
    let (a, b) = (walk(&world, &one), walk(&world, &other));
    assert_ne!(a.fingerprint(), b.fingerprint(), "the two states differ");
    assert_eq!(world.dedup_key(&a), world.dedup_key(&b), "and are one up to swapping the shards");
    let symmetry = world.symmetry().expect("on");
    assert_eq!(symmetry.renamed_fingerprint(&a, 1), symmetry.renamed_fingerprint(&b, 0));

    let lopsided = lopsided(symmetric(pinned()));
    assert_eq!(lopsided.symmetry().map(|s| s.len()), Some(1), "only the identity maps the lopsided world onto itself");
    let (a, b) = (walk(&lopsided, &one), walk(&lopsided, &other));
    assert_ne!(lopsided.dedup_key(&a), lopsided.dedup_key(&b));
    // Tablets of different tables are never renamed into each other.
    let tables = ExploreWorld::new(symmetric(ExploreConfig { tables: 2, shards: 1, ..pinned() }));
    assert_eq!(tables.symmetry().map(|s| s.len()), Some(1));
}

#[test]
fn the_lopsided_world_is_explored_whole_and_correct_with_symmetry_on() {
    let lopsided = lopsided(symmetric(pinned()));
    let report = explore(&lopsided, &mut |_| {});
    assert!(report.counterexample.is_none() && report.stuck.is_none());
    assert_eq!(report.symmetries, 1);
}
