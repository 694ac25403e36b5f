//! `cargo sim …`: the simulator's command line.
//!
//! Exit codes: 0 all seeds passed; 1 a safety invariant broke; 3 liveness; 4 the simulation crashed;
//! 5 determinism mismatch; 2 bad command line; 130 interrupted before any seed failed.

#[cfg(not(madsim))]
fn main() {
    eprintln!("lockstep-sim must be built with --cfg madsim: run it as `cargo sim run` (see README.md)");
    std::process::exit(2);
}

#[cfg(madsim)]
fn main() {
    end_quietly_on_a_closed_pipe();
    std::process::exit(cli::main());
}

/// Output piped into `head`, `grep -m1` or a pager that is closed before the end ends the program quietly, as it
/// ends `cat`. Rust programs ignore SIGPIPE, so each print after the reader went away would panic (and tracing
/// would complain about every event of a trace).
#[cfg(madsim)]
fn end_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Seeds allocate heavily and in parallel; mimalloc is faster than the system allocator at both.
#[cfg(madsim)]
#[global_allocator]
static ALLOCATOR: lockstep_sim::alloc::Allocator = lockstep_sim::alloc::Allocator;

#[cfg(madsim)]
mod cli {
    use clap::{Args, Parser, Subcommand};
    use indicatif::{ProgressBar, ProgressStyle};
    use lockstep_sim::events::{Event, EventKind};
    use lockstep_sim::faults::FaultKind;
    use lockstep_sim::runner::{Keep, run_seed};
    use lockstep_sim::scenario::Scenario;
    use lockstep_sim::sweep::{
        SeedFailure, StopWhen, SweepConfig, SweepSummary, WorldSource, last_seed, run_sweep, shell_quote,
    };
    use lockstep_sim::world::WorldParams;
    use std::io::IsTerminal;
    use std::sync::Arc;

    /// The committed file of regression seeds, at the top of the workspace.
    const DEFAULT_REGRESSIONS: &str = "regression-seeds.txt";
    /// Seeds a time-limited sweep without `--seeds` plans: about 17 years at 2,000 seeds a second.
    const UNTIL_THE_TIME_LIMIT: u64 = 1 << 40;

    #[derive(Parser)]
    #[command(
        name = "cargo sim",
        about = "Deterministic simulation of lockstep's sharded incremental restore, and of replication through the store"
    )]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Sweep a range of seeds and summarise.
        Run(RunArgs),
        /// Rerun one seed with its full trace and the invariant that broke.
        Repro(ReproArgs),
        /// Model-check a small world exhaustively: every interleaving, within fault bounds.
        Check(CheckArgs),
        /// Run the default sweep against every catalogued bug and report the seeds to its detection.
        Mutants(MutantsArgs),
        /// Shrink a failing seed to the smallest world and fewest faults that still fail the same way, and
        /// write it as a scenario file to keep as a regression test.
        Shrink(ShrinkArgs),
        /// Sweep seeds of replication worlds (a publisher pushing committed versions through the store, a
        /// replica initializing from them and pulling), or trace one seed with --seed.
        Replicate(ReplicateArgs),
        /// Model-check replication exhaustively for a small stream: every interleaving, within fault bounds.
        CheckReplication(CheckReplicationArgs),
    }

    #[derive(Args)]
    struct CheckReplicationArgs {
        /// Versions the database commits.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=6))]
        versions: u32,
        /// Node crashes (each one reboots from durable state).
        #[arg(long, default_value_t = 1)]
        crashes: u32,
        /// Store calls that fail, or puts stored whose answer is lost.
        #[arg(long, default_value_t = 1)]
        store_faults: u32,
        /// Reads answered truncated or corrupted.
        #[arg(long, default_value_t = 1)]
        download_faults: u32,
        /// Longest path explored.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        depth: u32,
        /// Stop after this many unique states (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_states: u64,
        /// Check a deliberate bug (repeatable), as `cargo sim replicate --bug` takes them.
        #[arg(long = "bug", value_name = "NAME", value_parser = replication_bug)]
        bugs: Vec<String>,
    }

    #[derive(Args)]
    struct ReplicateArgs {
        /// Seeds to run.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
        /// First seed of the sweep.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Run only this seed and print its whole trace (`RUST_LOG` filters it, as for `repro`).
        #[arg(long, conflicts_with_all = ["seeds", "start", "jobs", "determinism_every"])]
        seed: Option<u64>,
        /// Run with a deliberate bug, to see the checkers catch it (repeatable): puts-ahead,
        /// replica-skips-checksum, replica-skips-missing-version.
        #[arg(long = "bug", value_name = "NAME", value_parser = replication_bug)]
        bugs: Vec<String>,
        /// Parallel workers (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
        jobs: Option<u64>,
        /// Rerun the first seed and one in this many, and compare event logs (0: no check).
        #[arg(long, default_value_t = 50)]
        determinism_every: u64,
    }

    fn replication_bug(name: &str) -> Result<String, String> {
        lockstep_sim::replication::ReplicationBugs::default().add(name).map(|()| name.to_string())
    }

    #[derive(Args)]
    struct ShrinkArgs {
        /// The failing seed.
        #[arg(long)]
        seed: u64,
        /// Keep breaking this invariant [default: the first the seed breaks].
        #[arg(long, value_parser = invariant_name)]
        invariant: Option<lockstep_sim::checkers::Invariant>,
        /// Candidate runs at most.
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
        max_runs: u64,
        /// Directory to write the scenario file to.
        #[arg(long, default_value = "scenarios/regressions")]
        out: std::path::PathBuf,
        #[command(flatten)]
        world: WorldArgs,
    }

    fn invariant_name(name: &str) -> Result<lockstep_sim::checkers::Invariant, String> {
        use lockstep_sim::checkers::Invariant;
        Invariant::ALL.into_iter().find(|i| i.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Invariant::ALL.iter().map(|i| i.name()).collect();
            format!("unknown invariant `{name}`; known: {}", known.join(", "))
        })
    }

    #[derive(Args)]
    struct MutantsArgs {
        /// Only list the catalogued bugs.
        #[arg(long)]
        list: bool,
        /// Parallel workers (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
        jobs: Option<u64>,
    }

    #[derive(Args)]
    struct CheckArgs {
        /// Tables restored together.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
        tables: u32,
        /// Shards of every table.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4))]
        shards: u32,
        /// Increments in the chain: a full backup and the incrementals after it.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=6))]
        increments: u32,
        /// Restore in this many segments (1 to --increments), the chain split evenly; the client asks for each
        /// next segment once the coordinator waits for it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=6))]
        segments: u32,
        /// The client may cancel the restore once, at any moment after it durably started (after it ended too, when
        /// the cancel must be refused): the restore must then end cancelled if the cancel was answered so.
        #[arg(long)]
        cancel: bool,
        /// With --cancel, once the cancel is answered cancelled the client restores the same tables again (a second
        /// operation), while requests of the first may still be in flight.
        #[arg(long, requires = "cancel")]
        restore_again: bool,
        /// Node crashes (each one reboots from durable state).
        #[arg(long, default_value_t = 1)]
        crashes: u32,
        /// Dropped messages.
        #[arg(long, default_value_t = 1)]
        drops: u32,
        /// Duplicated messages.
        #[arg(long, default_value_t = 1)]
        duplicates: u32,
        /// Downloads that come back truncated, corrupted or failed.
        #[arg(long, default_value_t = 1)]
        download_faults: u32,
        /// Longest path explored (at least 1: a search of depth 0 explores nothing).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        depth: u32,
        /// Stop after this many unique states (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_states: u64,
        /// Depth-first instead of breadth-first (counterexamples are then not the shortest).
        #[arg(long)]
        dfs: bool,
        /// Deduplicate states up to renaming interchangeable shards (sound: see sim/src/explore/symmetry.rs).
        #[arg(long)]
        symmetry: bool,
        /// Also search the world the other way (with symmetry reduction if it was off, without if on) and print
        /// both state counts.
        #[arg(long)]
        compare: bool,
        /// Check a catalogued bug (repeatable; `cargo sim mutants --list` lists them).
        #[arg(long = "bug", value_parser = bug_name)]
        bugs: Vec<String>,
        /// Where to write a counterexample as a scenario file the simulation replays.
        #[arg(long, default_value = "target/counterexample.toml")]
        emit: std::path::PathBuf,
    }

    #[derive(Args)]
    struct RunArgs {
        /// Number of seeds to run [default: 1000, or a scenario's pinned seeds; with --time-limit, as many as
        /// the time allows].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: Option<u64>,
        /// Stop at the first failing seed (worker processes are stopped at once; their seeds in progress are
        /// not counted).
        #[arg(long)]
        fail_fast: bool,
        /// Start no seed after this much wall-clock time, e.g. `90s`, `10m`, `2h`: a CI job of fixed length.
        #[arg(long, value_parser = lockstep_sim::sweep::parse_duration)]
        time_limit: Option<std::time::Duration>,
        /// First seed [default: 0]. With --scenario only together with --seeds (a scenario runs its pinned seeds
        /// otherwise).
        #[arg(long)]
        start: Option<u64>,
        /// When standard error is not a terminal (a CI log), print a progress line this often, e.g. `30s`,
        /// `5m` (a terminal gets a progress bar instead).
        #[arg(long, default_value = "30s", value_parser = lockstep_sim::sweep::parse_duration)]
        progress_every: std::time::Duration,
        /// Parallel workers (default: one per core): worker processes, each running every N-th seed.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
        jobs: Option<u64>,
        /// Run the first seed and one seed in every this-many twice and compare event logs (0: off).
        #[arg(long, default_value_t = 50)]
        determinism_every: u64,
        /// Failing seeds printed in full (the rest are counted).
        #[arg(long, default_value_t = 20)]
        show_failures: usize,
        /// Run only part K of N of the seed range (K from 1), so N machines share one sweep: `--shard 3/8`.
        #[arg(long, value_parser = shard_of)]
        shard: Option<(u64, u64)>,
        /// Also write the result as JUnit XML to this file, for CI dashboards.
        #[arg(long)]
        junit: Option<std::path::PathBuf>,
        /// Seeds replayed before the sweep (generated worlds only; with --shard, on part 1 only). A missing
        /// file at the default path is skipped with a note.
        #[arg(long, default_value = DEFAULT_REGRESSIONS)]
        regressions: std::path::PathBuf,
        /// Worker process of a sweep with several jobs: run part K of N of the seeds and report each seed on
        /// standard output (see `lockstep_sim::sweep::serve_part`). Set by the sweep, not by hand.
        #[arg(long, value_parser = shard_of, hide = true)]
        worker: Option<(u64, u64)>,
        /// With --worker: the part's first seeds already run by a worker that died.
        #[arg(long, default_value_t = 0, hide = true, requires = "worker")]
        skip: u64,
        #[command(flatten)]
        world: WorldArgs,
    }

    #[derive(Args)]
    struct ReproArgs {
        /// The seed to rerun.
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        world: WorldArgs,
    }

    /// What shapes the world besides the seed; a repro line repeats these.
    #[derive(Args, Clone, Default)]
    struct WorldArgs {
        /// Run the world of this scenario file instead of drawing one per seed.
        #[arg(
            long,
            conflicts_with_all = ["tables", "shards", "indexes", "incrementals", "lost_object", "point_in_time", "cancel"]
        )]
        scenario: Option<std::path::PathBuf>,
        /// Run with a catalogued bug (repeatable; `cargo sim mutants --list` lists them).
        #[arg(long = "bug", value_parser = bug_name)]
        bugs: Vec<String>,
        /// Fix the number of tables, index tables not counted, instead of drawing it (1-16).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
        tables: Option<u32>,
        /// Fix the shard count of every table instead of drawing it (1-64).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        shards: Option<u32>,
        /// Give every table an index table (`true`) or none (`false`) instead of drawing it.
        #[arg(long)]
        indexes: Option<bool>,
        /// Fix the number of incrementals after the newest full backup (1-50).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
        incrementals: Option<u32>,
        /// Fix whether every world loses a bundle, instead of drawing it (5% of worlds, half of them getting it
        /// back and restoring again): `never`, `for-good` (the restore must fail cleanly) or `restore-again` (the
        /// object is back once the restore failed, and a second restore of the same tables must end Done).
        #[arg(long, value_enum)]
        lost_object: Option<LostObjectArg>,
        /// Fix whether every world restores to a point in time drawn from its history, in one to three segments,
        /// instead of drawing it (a quarter of worlds): `never` or `always`.
        #[arg(long, value_enum)]
        point_in_time: Option<NeverOrAlways>,
        /// Fix whether the client cancels every restore in one go at a moment drawn from the run, racing its
        /// end, instead of drawing it (a tenth of worlds): `never` or `always`.
        #[arg(long, value_enum)]
        cancel: Option<NeverOrAlways>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
    enum NeverOrAlways {
        Never,
        Always,
    }

    impl NeverOrAlways {
        /// The probability this choice fixes, or `drawn` when none is made.
        fn probability(choice: Option<Self>, drawn: f64) -> f64 {
            match choice {
                None => drawn,
                Some(NeverOrAlways::Never) => 0.0,
                Some(NeverOrAlways::Always) => 1.0,
            }
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
    enum LostObjectArg {
        Never,
        ForGood,
        RestoreAgain,
    }

    /// Parses `K/N` with 1 <= K <= N.
    fn shard_of(text: &str) -> Result<(u64, u64), String> {
        let parsed = text.split_once('/').and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((k, n)) if k >= 1 && k <= n => Ok((k, n)),
            _ => Err(format!("`{text}` is not K/N with 1 <= K <= N, e.g. 3/8")),
        }
    }

    /// Accepts the name of a catalogued bug.
    fn bug_name(name: &str) -> Result<String, String> {
        lockstep_sim::catalog::parse(&[name]).map(|_| name.to_string())
    }

    impl WorldArgs {
        /// The world parameters of these flags; two bugs of the same machine (which would leave only one of them
        /// running) are refused.
        fn params(&self) -> Result<WorldParams, String> {
            let names: Vec<&str> = self.bugs.iter().map(String::as_str).collect();
            let bugs = lockstep_sim::catalog::parse(&names).map_err(|e| format!("--bug: {e}"))?;
            let drawn = WorldParams::sweep_default();
            let (lost_object_probability, restore_again_probability) = match self.lost_object {
                None => (drawn.lost_object_probability, drawn.restore_again_probability),
                Some(LostObjectArg::Never) => (0.0, 0.0),
                Some(LostObjectArg::ForGood) => (1.0, 0.0),
                Some(LostObjectArg::RestoreAgain) => (1.0, 1.0),
            };
            let point_in_time_probability =
                NeverOrAlways::probability(self.point_in_time, drawn.point_in_time_probability);
            let cancel_probability = NeverOrAlways::probability(self.cancel, drawn.cancel_probability);
            Ok(WorldParams {
                tables: self.tables,
                shard_count: self.shards,
                indexes: self.indexes,
                incrementals: self.incrementals,
                lost_object_probability,
                restore_again_probability,
                point_in_time_probability,
                cancel_probability,
                bugs,
                ..drawn
            })
        }

        fn as_flags(&self) -> String {
            let mut flags = String::new();
            if let Some(path) = &self.scenario {
                flags.push_str(&format!(" --scenario {}", shell_quote(&path.display().to_string())));
            }
            for bug in &self.bugs {
                flags.push_str(&format!(" --bug {bug}"));
            }
            if let Some(tables) = self.tables {
                flags.push_str(&format!(" --tables {tables}"));
            }
            if let Some(indexes) = self.indexes {
                flags.push_str(&format!(" --indexes {indexes}"));
            }
            if let Some(shards) = self.shards {
                flags.push_str(&format!(" --shards {shards}"));
            }
            if let Some(incrementals) = self.incrementals {
                flags.push_str(&format!(" --incrementals {incrementals}"));
            }
            if let Some(lost) = self.lost_object {
                let name = clap::ValueEnum::to_possible_value(&lost).expect("no variant is skipped");
                flags.push_str(&format!(" --lost-object {}", name.get_name()));
            }
            if let Some(point_in_time) = self.point_in_time {
                let name = clap::ValueEnum::to_possible_value(&point_in_time).expect("no variant is skipped");
                flags.push_str(&format!(" --point-in-time {}", name.get_name()));
            }
            if let Some(cancel) = self.cancel {
                let name = clap::ValueEnum::to_possible_value(&cancel).expect("no variant is skipped");
                flags.push_str(&format!(" --cancel {}", name.get_name()));
            }
            flags
        }
    }

    impl WorldArgs {
        /// The worlds to run, and the scenario's pinned seeds if there is one; a scenario that does not load is
        /// an error message.
        fn source(&self) -> Result<(WorldSource, Option<Vec<u64>>), String> {
            let params = self.params()?;
            match &self.scenario {
                None => Ok((WorldSource::Generated(params), None)),
                Some(path) => {
                    let scenario = Scenario::load(path).map_err(|e| e.to_string())?;
                    // A bug on the command line of the same machine as the scenario's kept bug would replace it.
                    let kept = scenario.bugs();
                    let flags = params.bugs;
                    let coordinator_clash = flags.coordinator.zip(kept.coordinator).is_some_and(|(f, k)| f != k);
                    let shard_clash = flags.shard.zip(kept.shard).is_some_and(|(f, k)| f != k);
                    if coordinator_clash || shard_clash {
                        let names = |bugs| lockstep_sim::catalog::names_of(bugs).join(", ");
                        return Err(format!(
                            "--bug {} would replace the bug {} keeps ({}); run one bug of a machine at a time",
                            names(flags),
                            path.display(),
                            names(kept)
                        ));
                    }
                    let seeds = scenario.seeds.clone();
                    Ok((WorldSource::Scenario(Arc::new(scenario), params.bugs), Some(seeds)))
                }
            }
        }
    }

    pub fn main() -> i32 {
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            Err(error) => {
                let _ = error.print();
                return if error.use_stderr() { 2 } else { 0 };
            }
        };
        match cli.command {
            Command::Run(args) => run(args),
            Command::Repro(args) => repro(args),
            Command::Check(args) => check(args),
            Command::Mutants(args) => mutants(args),
            Command::Shrink(args) => shrink(args),
            Command::Replicate(args) => replicate(args),
            Command::CheckReplication(args) => check_replication(args),
        }
    }

    fn check_replication(args: CheckReplicationArgs) -> i32 {
        use lockstep_sim::explore::replication::{ReplicationExploreConfig, explore_replication};
        let mut bugs = lockstep_sim::replication::ReplicationBugs::default();
        for name in &args.bugs {
            bugs.add(name).expect("checked by the argument parser");
        }
        let config = ReplicationExploreConfig {
            versions: args.versions,
            max_crashes: args.crashes,
            max_store_faults: args.store_faults,
            max_download_faults: args.download_faults,
            max_depth: args.depth,
            max_states: args.max_states,
            bugs,
        };
        println!(
            "lockstep check-replication: {} version(s); at most {} crash(es), {} store fault(s), {} download fault(s); depth {}{}",
            config.versions,
            config.max_crashes,
            config.max_store_faults,
            config.max_download_faults,
            config.max_depth,
            bugs.args()
        );
        let bar = ProgressBar::new_spinner();
        let report = explore_replication(config, &mut |r| {
            bar.set_message(format!(
                "{} unique states, {} generated, depth {}",
                r.unique_states, r.states, r.max_depth
            ));
            bar.tick();
        });
        bar.finish_and_clear();
        println!(
            "{} unique states ({} generated), depth {}, {:.2} s{}",
            report.unique_states,
            report.states,
            report.max_depth,
            report.elapsed.as_secs_f64(),
            if report.violation.is_some() {
                "; stopped at the first violation"
            } else if report.bounded {
                "; stopped at the depth or state bound"
            } else {
                "; every state explored"
            }
        );
        match report.violation {
            None => {
                println!("every invariant held in every state explored");
                0
            }
            Some(violation) => {
                println!("VIOLATION {}: {}", violation.invariant, violation.detail);
                for (at, step) in violation.steps.iter().enumerate() {
                    println!("  {:>3}. {step}", at + 1);
                }
                if violation.invariant == lockstep_sim::replication::ReplicationInvariant::Liveness { 3 } else { 1 }
            }
        }
    }

    fn replicate(args: ReplicateArgs) -> i32 {
        use lockstep_sim::replication::{
            FAULT_KINDS, ReplicationBugs, ReplicationInvariant, ReplicationWorld, run_replication, sweep_replication,
            transcript,
        };
        let mut bugs = ReplicationBugs::default();
        for name in &args.bugs {
            bugs.add(name).expect("checked by the argument parser");
        }
        let exit_code = |violations: &[lockstep_sim::replication::ReplicationViolation], panicked: bool| {
            if panicked {
                4
            } else if violations.iter().any(|v| v.invariant != ReplicationInvariant::Liveness) {
                1
            } else if violations.is_empty() {
                0
            } else {
                3
            }
        };
        if let Some(seed) = args.seed {
            init_tracing();
            let world = ReplicationWorld::generate(seed, bugs);
            let outcome = run_replication(world.clone(), true);
            print!("{}", world.describe());
            for (index, event) in outcome.log.iter().flatten().enumerate() {
                emit(event, &event);
                for violation in outcome.violations.iter().filter(|v| v.event_index == Some(index)) {
                    let mark =
                        format!("          ^^^ event #{index}: first offending event of {}", violation.invariant);
                    emit(event, &mark);
                }
            }
            let verdict = lockstep_sim::replication::ReplicationOutcome { log: None, ..outcome.clone() };
            let text = transcript(&world, &verdict);
            // The verdict: the transcript's lines after the world and the events.
            print!("{}", text.strip_prefix(world.describe().as_str()).unwrap_or(&text));
            println!("event log: {} events", outcome.events);
            return exit_code(&outcome.violations, outcome.panic.is_some());
        }
        let Some(last) = args.start.checked_add(args.seeds - 1) else {
            eprintln!(
                "error: --start {} with --seeds {} runs past the last seed, {}",
                args.start,
                args.seeds,
                u64::MAX
            );
            return 2;
        };
        let jobs =
            args.jobs.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |j| j as usize);
        let bar = ProgressBar::new(args.seeds);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} seeds  {msg}  {per_sec}  eta {eta}")
                .expect("the template is valid"),
        );
        let began = std::time::Instant::now();
        let progress = |done: u64, failed: u64| {
            bar.set_position(done);
            if failed > 0 {
                bar.set_message(format!("{failed} failed"));
            }
        };
        let summary = sweep_replication(args.start, args.seeds, bugs, jobs, args.determinism_every, &progress);
        bar.finish_and_clear();
        let wall_s = began.elapsed().as_secs_f64();
        println!("replication sweep of seeds {} to {last}{}", args.start, bugs.args());
        let failed = summary.failures.len() as u64;
        println!("seeds       {} run, {} passed, {failed} failed", summary.seeds_run, summary.seeds_run - failed);
        if summary.by_invariant.is_empty() {
            println!("invariants  every one held");
        } else {
            let broken: Vec<String> = summary.by_invariant.iter().map(|(i, n)| format!("{i} {n}")).collect();
            println!("invariants  broken: {}", broken.join(", "));
        }
        let mut fired: Vec<String> = FAULT_KINDS.iter().map(|k| format!("{k} {}", summary.faults.get(*k))).collect();
        fired.push(format!("publisher-reboot {}", summary.reboots[0]));
        fired.push(format!("replica-reboot {}", summary.reboots[1]));
        println!("faults      {}", fired.join(", "));
        println!(
            "determinism {} seed(s) rerun, {} mismatch(es)",
            summary.determinism_checked,
            summary.determinism_mismatches.len()
        );
        println!(
            "time        simulated {} s, wall {wall_s:.2} s, {:.1} seeds/s",
            summary.sim_ms / 1000,
            summary.seeds_run as f64 / wall_s.max(1e-9)
        );
        let mut code = 0;
        for outcome in &summary.failures {
            let what: Vec<String> = outcome.violations.iter().map(|v| v.invariant.to_string()).collect();
            let what = outcome.panic.as_ref().map_or_else(|| what.join(", "), |panic| format!("panic: {panic}"));
            println!("FAILED seed {}: {what}", outcome.seed);
            println!("  repro: cargo sim replicate --seed {}{}", outcome.seed, bugs.args());
            let this = exit_code(&outcome.violations, outcome.panic.is_some());
            code = if code == 0 || this == 1 { this } else { code };
        }
        for seed in &summary.determinism_mismatches {
            println!("FAILED seed {seed}: determinism: two runs logged different events");
            println!("  repro: cargo sim replicate --seed {seed}{}", bugs.args());
        }
        if code == 0 && !summary.determinism_mismatches.is_empty() {
            code = 5;
        }
        code
    }

    fn mutants(args: MutantsArgs) -> i32 {
        use lockstep_sim::catalog::{CATALOG, CaughtIn};
        use lockstep_sim::replication::REPLICATION_CATALOG;
        if args.list {
            for known in &CATALOG {
                println!("{:<32} {}", known.name, known.summary);
            }
            for known in &REPLICATION_CATALOG {
                println!("{:<32} (replication) {}", known.name, known.summary);
            }
            return 0;
        }
        let jobs =
            args.jobs.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |j| j as usize);
        println!("{:<32} {:>8} {:>8}  caught by", "bug", "budget", "seeds");
        let mut survivors = 0;
        for known in &CATALOG {
            // A bug its scenario catches has no budget of sweep seeds: the columns name the scenario instead.
            let (budget, seeds_of) = match known.caught_in {
                CaughtIn::Sweep { budget_seeds } => (budget_seeds.to_string(), None),
                CaughtIn::Scenario { file, .. } => ("scenario".to_string(), Some(file)),
            };
            match lockstep_sim::sweep::catalogued_detection(known, jobs) {
                Ok(Some((seed, invariants))) => {
                    let mut names: Vec<&str> = invariants.iter().map(|i| i.name()).collect();
                    names.dedup();
                    let caught_by = if names.is_empty() { "a crash".to_string() } else { names.join(", ") };
                    match seeds_of {
                        None => println!("{:<32} {budget:>8} {:>8}  {caught_by} (seed {seed})", known.name, seed + 1),
                        Some(file) => println!(
                            "{:<32} {budget:>8} {:>8}  {caught_by} (every pinned seed of scenarios/{file})",
                            known.name, "all"
                        ),
                    }
                }
                Ok(None) => {
                    survivors += 1;
                    println!("{:<32} {budget:>8} {:>8}  SURVIVED", known.name, "-");
                }
                Err(error) => {
                    eprintln!("error: the scenario of {} does not load: {error}", known.name);
                    return 2;
                }
            }
        }
        println!("{} of {} catalogued bugs caught", CATALOG.len() - survivors, CATALOG.len());
        // Replication's bugs, against replication worlds (`cargo sim replicate`).
        println!("\n{:<32} {:>8} {:>8}  caught by", "replication bug", "budget", "seeds");
        let mut replication_survivors = 0;
        for known in &REPLICATION_CATALOG {
            match lockstep_sim::replication::catalogued_detection(known) {
                Some((seed, broken)) => {
                    let names: Vec<&str> = broken.iter().map(|i| i.name()).collect();
                    let caught_by = if names.is_empty() { "a crash".to_string() } else { names.join(", ") };
                    println!("{:<32} {:>8} {:>8}  {caught_by} (seed {seed})", known.name, known.budget_seeds, seed + 1);
                }
                None => {
                    replication_survivors += 1;
                    println!("{:<32} {:>8} {:>8}  SURVIVED", known.name, known.budget_seeds, "-");
                }
            }
        }
        let all = REPLICATION_CATALOG.len();
        println!("{} of {all} catalogued replication bugs caught", all - replication_survivors);
        if survivors + replication_survivors > 0 { 1 } else { 0 }
    }

    fn check(args: CheckArgs) -> i32 {
        use lockstep_sim::explore::{
            ExploreConfig, ExploreWorld, SearchOrder, Sometimes, counterexample_scenario, explore, replay,
        };
        let bugs = match (WorldArgs { bugs: args.bugs.clone(), ..WorldArgs::default() }).params() {
            Ok(params) => params.bugs,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        if bugs.host.is_some() {
            let names =
                lockstep_sim::catalog::names_of(lockstep_sim::world::Bugs { host: bugs.host, ..Default::default() });
            eprintln!(
                "error: `{}` is a bug of the host, and the explorer drives the machines without one; run it in the \
                 simulator: cargo sim run --bug {}",
                names.join(", "),
                names.join(" --bug ")
            );
            return 2;
        }
        if args.restore_again && args.segments > 1 {
            eprintln!("error: --restore-again follows a cancel of a restore in one go; leave out --segments");
            return 2;
        }
        if args.segments > args.increments {
            eprintln!(
                "error: --segments {} is more than --increments {}: every segment ends at a backup of the chain",
                args.segments, args.increments
            );
            return 2;
        }
        let config = ExploreConfig {
            tables: args.tables,
            shards: args.shards,
            increments: args.increments,
            segments: args.segments,
            max_crashes: args.crashes,
            max_drops: args.drops,
            max_duplicates: args.duplicates,
            max_download_faults: args.download_faults,
            max_depth: args.depth,
            max_states: args.max_states,
            order: if args.dfs { SearchOrder::DepthFirst } else { SearchOrder::BreadthFirst },
            bugs,
            symmetry: args.symmetry,
            cancel: args.cancel,
            restore_again: args.restore_again,
        };
        println!(
            "lockstep check: {} table(s) x {} shard(s), {} increment(s){}{}; at most {} crash(es), {} drop(s), {} duplicate(s), {} download fault(s); {}",
            config.tables,
            config.shards,
            config.increments,
            if config.segments > 1 { format!(" in {} segments", config.segments) } else { String::new() },
            match (config.cancel, config.restore_again) {
                (true, true) => ", the client may cancel and then restores again",
                (true, false) => ", the client may cancel",
                _ => "",
            },
            config.max_crashes,
            config.max_drops,
            config.max_duplicates,
            config.max_download_faults,
            if args.dfs { "depth-first" } else { "breadth-first" }
        );
        let other = ExploreConfig { symmetry: !config.symmetry, ..config.clone() };
        let world = ExploreWorld::new(config);
        let bar = ProgressBar::new_spinner();
        let report = explore(&world, &mut |r| {
            bar.set_message(format!(
                "{} unique states, {} generated, depth {}, {:.0} states/s",
                r.unique_states,
                r.states,
                r.max_depth,
                r.states_per_second()
            ));
            bar.tick();
        });
        bar.finish_and_clear();
        if world.config.symmetry {
            println!(
                "symmetry         {} renaming(s) of shards keep the world (the identity included)",
                report.symmetries
            );
        }
        println!("unique states    {}", report.unique_states);
        println!("states generated {}", report.states);
        println!("max depth        {}", report.max_depth);
        println!(
            "time             {:.2} s, {:.0} unique states/s",
            report.elapsed.as_secs_f64(),
            report.states_per_second()
        );
        for property in Sometimes::ALL {
            let reached = report.sometimes_seen.contains(&property);
            println!("sometimes        {property:?}: {}", if reached { "reached" } else { "NOT reached" });
        }
        if report.truncated {
            println!("search stopped at {}: the world was not fully explored", bounds_reached(&report, &args));
        }
        if args.compare {
            let other_world = ExploreWorld::new(other);
            let other_report = explore(&other_world, &mut |_| {});
            let (with, without) =
                if world.config.symmetry { (&report, &other_report) } else { (&other_report, &report) };
            println!(
                "compare          {} unique states with symmetry reduction ({:.2} s), {} without ({:.2} s): {:.2}x fewer",
                with.unique_states,
                with.elapsed.as_secs_f64(),
                without.unique_states,
                without.elapsed.as_secs_f64(),
                without.unique_states as f64 / with.unique_states.max(1) as f64
            );
            let verdict = |r: &lockstep_sim::explore::Report| {
                (r.counterexample.as_ref().map(|c| c.broken.invariant), r.stuck.is_some(), r.sometimes_seen.clone())
            };
            if verdict(with) != verdict(without) || with.truncated || without.truncated {
                println!("compare          the two searches disagree or stopped at a bound");
            }
        }
        let (cex, code) = match (&report.counterexample, &report.stuck) {
            (Some(cex), _) => (cex, 1),
            (None, Some(stuck)) => (stuck, 3),
            (None, None) => {
                println!("{}", no_violation(&report, &args));
                return 0;
            }
        };
        println!("VIOLATION {}: {}", cex.broken.invariant, cex.broken.detail);
        println!("shortest path ({} steps):", cex.path.len());
        for line in replay(&world, &cex.path) {
            println!("{line}");
        }
        let scenario = counterexample_scenario(&world, cex);
        // Directories that are missing are made (a parent that is a file is left for the write to name).
        let written = match args.emit.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            Some(dir) => std::fs::create_dir_all(dir),
            None => Ok(()),
        };
        match written.and_then(|()| std::fs::write(&args.emit, scenario)) {
            Ok(()) => {
                println!(
                    "scenario written to {}; replay it: cargo sim run --scenario {}",
                    args.emit.display(),
                    shell_quote(&args.emit.display().to_string())
                );
                code
            }
            // A bad output path, as with `run --junit` and `shrink --out`: the violation is printed above.
            Err(error) => {
                eprintln!("error: cannot write {}: {error}", args.emit.display());
                2
            }
        }
    }

    /// The bounds a search that stopped early reached: `--max-states N`, `--depth N`, or both.
    fn bounds_reached(report: &lockstep_sim::explore::Report, args: &CheckArgs) -> String {
        let states = args.max_states > 0 && report.unique_states >= args.max_states;
        let depth = report.max_depth >= args.depth;
        let mut bounds = Vec::new();
        if states {
            bounds.push(format!("--max-states {}", args.max_states));
        }
        if depth || !states {
            bounds.push(format!("--depth {}", args.depth));
        }
        bounds.join(" and ")
    }

    /// The verdict of a search that found no violation: a full pass only when it explored every state. A search
    /// cut short checked no liveness (that needs every state), so it says what it did and did not check.
    fn no_violation(report: &lockstep_sim::explore::Report, args: &CheckArgs) -> String {
        if !report.truncated {
            return "no violation".to_string();
        }
        format!(
            "no violation in the {} states explored; stopped at {}, the space is not exhausted (liveness not checked)",
            report.unique_states,
            bounds_reached(report, args)
        )
    }

    fn run(args: RunArgs) -> i32 {
        let jobs =
            args.jobs.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |j| j as usize);
        let (source, pinned) = match args.world.source() {
            Ok(loaded) => loaded,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        let (start, seeds, pinned) = match plan_seeds(&args, pinned) {
            Ok(planned) => planned,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        if seeds == 0 {
            if args.worker.is_none() {
                println!("lockstep sweep: this shard has no seeds");
            }
            return 0;
        }
        let first = match regression_seeds(&args, &source) {
            Ok(first) => first,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        let config = SweepConfig {
            start,
            seeds,
            pinned: pinned.clone(),
            first,
            jobs,
            source,
            determinism_every: args.determinism_every,
            stop: StopWhen { first_failure: args.fail_fast, time_limit: args.time_limit },
        };
        // Past the last seed, `u64::MAX`, when the range ends there.
        let end = u128::from(start) + u128::from(seeds);
        if let Err(error) = check_scenario_seeds(&config) {
            eprintln!("error: {error}");
            return 2;
        }
        if let Some((k, n)) = args.worker {
            // Ctrl-C reaches every process of the terminal's group: the sweep that started this worker stops it.
            ignore_interruptions();
            let part = lockstep_sim::sweep::Part { part: k - 1, parts: n, skip: args.skip };
            return match lockstep_sim::sweep::serve_part(&config, part, &mut std::io::stdout().lock()) {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("error: sweep worker {k}/{n} cannot report: {error}");
                    2
                }
            };
        }
        // The JUnit file must not be one of the sweep's inputs, which writing it would destroy.
        if let Some(junit) = &args.junit {
            let same = |input: &std::path::Path| {
                input.exists() && std::fs::canonicalize(input).ok() == std::fs::canonicalize(junit).ok()
            };
            let inputs = [Some(args.regressions.as_path()), args.world.scenario.as_deref()];
            if let Some(input) = inputs.into_iter().flatten().find(|input| same(input)) {
                eprintln!(
                    "error: --junit {} is an input of this sweep ({}); pick another file",
                    junit.display(),
                    input.display()
                );
                return 2;
            }
        }
        // A JUnit file that cannot be written is found now, once every argument is known good, not after the sweep.
        if let Some(path) = &args.junit
            && let Err(error) = open_with_parents(path)
        {
            eprintln!("error: cannot write {}: {error}", path.display());
            return 2;
        }
        stop_on_interruption();
        let flags = args.world.as_flags();
        match &pinned {
            Some(pinned) => println!("lockstep sweep: pinned seeds {pinned:?}, {jobs} job(s){flags}"),
            None if args.seeds.is_none() && args.time_limit.is_some() => println!(
                "lockstep sweep: seeds from {start} until the time limit of {}, {jobs} job(s){flags}",
                lockstep_sim::sweep::duration_text(args.time_limit.expect("checked above"))
            ),
            None => println!("lockstep sweep: seeds {start}..{end} ({seeds} seeds), {jobs} job(s){flags}"),
        }
        if !config.first.is_empty() {
            println!("regression seeds from {} first: {:?}", args.regressions.display(), config.first);
        }
        let bar = match args.time_limit {
            Some(limit) => {
                let template = format!(
                    "{{pos}} seeds  {{msg}}  {{per_sec}}  {{elapsed}} of {}",
                    lockstep_sim::sweep::duration_text(limit)
                );
                let bar = ProgressBar::no_length();
                bar.set_style(ProgressStyle::with_template(&template).expect("the template is valid"));
                bar
            }
            None => {
                let bar = ProgressBar::new(config.total_seeds());
                bar.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} seeds  {msg}  {per_sec}  eta {eta}")
                        .expect("the template is valid"),
                );
                bar
            }
        };
        // A terminal shows the bar; a log gets a plain line now and then.
        let lines = (!std::io::stderr().is_terminal()).then(|| {
            let total = (args.seeds.is_some() || args.time_limit.is_none()).then(|| config.total_seeds());
            lockstep_sim::sweep::ProgressLines::new(args.progress_every, total, args.time_limit)
        });
        bar.set_message("0 failed");
        let progress = |progress: lockstep_sim::sweep::Progress| {
            if progress.failed > 0 {
                bar.set_message(format!("{} failed", progress.failed));
            }
            bar.set_position(progress.done);
            if let Some(line) = lines.as_ref().and_then(|lines| lines.due(progress)) {
                eprintln!("{line}");
            }
        };
        let summary = match worker_command() {
            Some(command) if jobs > 1 => {
                match lockstep_sim::sweep::run_sweep_in_processes(&config, &command, &progress) {
                    Ok(summary) => summary,
                    Err(error) => {
                        bar.finish_and_clear();
                        eprintln!("error: {error}");
                        return 2;
                    }
                }
            }
            _ => run_sweep(&config, &progress),
        };
        bar.finish_and_clear();
        print_summary(&summary, &args);
        if let Some(path) = &args.junit {
            let xml = lockstep_sim::sweep::junit_xml(&summary, &args.world.as_flags());
            if let Err(error) = std::fs::write(path, xml) {
                eprintln!("error: cannot write {}: {error}", path.display());
                return 2;
            }
        }
        let interrupted = summary.stopped == Some(lockstep_sim::sweep::Stopped::Interrupted);
        summary.worst_class().map_or(if interrupted { EXIT_INTERRUPTED } else { 0 }, |class| class.exit_code())
    }

    /// The seeds a sweep runs: `start` and `seeds` of its range, or the pinned seeds (a scenario's) with their
    /// count; with `--shard`, only its part (no seeds at all for a part that gets none). A range past the last seed,
    /// or a `--start` the pinned seeds would ignore, is an error.
    fn plan_seeds(args: &RunArgs, pinned: Option<Vec<u64>>) -> Result<(u64, u64, Option<Vec<u64>>), String> {
        // A scenario runs its pinned seeds unless --seeds asks for a range.
        let pinned = if args.seeds.is_some() { None } else { pinned };
        if let (Some(start), Some(pinned), Some(path)) = (args.start, &pinned, &args.world.scenario) {
            return Err(format!(
                "--start {start} does not apply to the pinned seeds of {} ({pinned:?}); add --seeds N to run seeds \
                 {start}.. of the scenario, or drop --start",
                path.display()
            ));
        }
        let mut start = args.start.unwrap_or(0);
        // Without --seeds, a time-limited sweep plans more seeds than any run gets through (and none past the last).
        let default_seeds = match args.time_limit {
            Some(_) => (u64::MAX - start).saturating_add(1).min(UNTIL_THE_TIME_LIMIT),
            None => 1000,
        };
        let mut seeds = pinned.as_ref().map_or(args.seeds.unwrap_or(default_seeds), |p| p.len() as u64);
        if pinned.is_none() {
            last_seed(start, seeds)?;
        }
        let pinned = match (args.shard, pinned) {
            // Part K of N: the K-th of N contiguous slices of the range (or of the pinned seeds).
            (Some((k, n)), pinned) => {
                let chunk = seeds.div_ceil(n);
                let from = ((k - 1).saturating_mul(chunk)).min(seeds);
                let to = k.saturating_mul(chunk).min(seeds);
                match pinned {
                    Some(pinned) => Some(pinned[from as usize..to as usize].to_vec()),
                    None => {
                        // A part with seeds starts within the range; one without keeps the start it had.
                        if from < to {
                            start += from;
                        }
                        seeds = to - from;
                        None
                    }
                }
            }
            (None, pinned) => pinned,
        };
        if let Some(pinned) = &pinned {
            seeds = pinned.len() as u64;
        }
        Ok((start, seeds, pinned))
    }

    /// Exit code of a sweep interrupted before it found anything (128 + SIGINT, as shells report it).
    const EXIT_INTERRUPTED: i32 = 130;

    /// On Ctrl-C or a termination signal the sweep stops starting seeds and stops its workers, then prints the
    /// summary of what it ran (and writes its JUnit file); a second one ends the program at once.
    fn stop_on_interruption() {
        static SIGNALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let installed = ctrlc::set_handler(|| {
            if SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                eprintln!("interrupted: stopping the sweep (again to quit at once)");
                lockstep_sim::sweep::interrupt();
            } else {
                std::process::exit(EXIT_INTERRUPTED);
            }
        });
        if let Err(error) = installed {
            eprintln!("note: Ctrl-C will end the sweep without a summary ({error})");
        }
    }

    /// A worker process leaves interruptions to the sweep that started it, which kills it.
    fn ignore_interruptions() {
        #[cfg(unix)]
        // SAFETY: before this process starts any thread; SIG_IGN is a valid disposition for both signals.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }

    /// Opens the file at `path` for writing, creating it and the directories it is in if need be; what it holds
    /// stays until the sweep writes it over.
    fn open_with_parents(path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).map(drop)
    }

    fn print_summary(summary: &SweepSummary, args: &RunArgs) {
        let failed = summary.failures.iter().map(|f| f.seed).collect::<std::collections::BTreeSet<_>>().len() as u64;
        for failure in summary.failures.iter().take(args.show_failures) {
            print_failure(failure, &args.world);
        }
        if summary.failures.len() > args.show_failures {
            println!("... and {} more failing seed(s)", summary.failures.len() - args.show_failures);
        }
        let count = |class: &str| summary.failures.iter().filter(|f| f.class.name() == class).count();
        println!();
        println!("seeds run        {} ({} regression seed(s) first)", summary.seeds_run, summary.regression_seeds);
        if let Some(why) = summary.stopped {
            println!("stopped early    {why}, with seeds of the range left to run");
        }
        println!(
            "failed seeds     {failed} (safety {}, liveness {}, crash {}, determinism {})",
            count("safety"),
            count("liveness"),
            count("crash"),
            count("determinism")
        );
        println!("violations by invariant:");
        for invariant in lockstep_sim::checkers::Invariant::ALL {
            println!("  {:<26} {}", invariant.name(), summary.by_invariant.get(&invariant).copied().unwrap_or(0));
        }
        println!(
            "determinism      {} seed(s) rerun, {} mismatch(es)",
            summary.determinism_checked,
            count("determinism")
        );
        println!(
            "outcomes         done {}, failed {} ({} at a lost object, {} cancelled, {} otherwise), unfinished {}; \
             worlds that lost an object: {}, of which {} got it back and restored again",
            summary.ended_done,
            summary.ended_failed,
            summary.failed_object_missing,
            summary.failed_cancelled,
            summary.ended_failed - summary.failed_object_missing - summary.failed_cancelled,
            summary.ended_unfinished,
            summary.lost_object_worlds,
            summary.restored_again_worlds
        );
        println!(
            "point in time    {} world(s) restored to a point in time, {} of them in two or three segments, of \
             which {} cancelled before the last",
            summary.point_in_time_worlds, summary.segmented_worlds, summary.cancelled_worlds
        );
        println!(
            "cancel mid-run   {} world(s) cancelled their restore at a moment of the run: {} before it ended ({} \
             then restored again), {} too late (refused, the restore had ended)",
            summary.cancel_race_worlds,
            summary.cancel_race_won,
            summary.cancel_restarted,
            summary.cancel_race_worlds - summary.cancel_race_won
        );
        println!("faults fired     {:<22} {:>10} {:>8}", "kind", "times", "seeds");
        let mut never = Vec::new();
        for kind in FaultKind::ALL {
            let times = summary.faults.get(kind);
            if times == 0 {
                never.push(kind.name());
            }
            println!("                 {:<22} {:>10} {:>8}", kind.name(), times, summary.seeds_with_fault.get(kind));
        }
        if !never.is_empty() {
            println!("fault kinds that never fired: {}", never.join(", "));
        }
        println!("probes hit       {:<32} {:>8}", "probe", "seeds");
        for probe in lockstep_sim::probes::Probe::ALL {
            println!("                 {:<32} {:>8}", probe.name(), summary.probes.get(&probe).copied().unwrap_or(0));
        }
        let missed: Vec<&str> = summary.probes_missed().iter().map(|p| p.name()).collect();
        if !missed.is_empty() {
            println!("probes never hit: {}", missed.join(", "));
        }
        let wall = summary.wall.as_secs_f64();
        let sim = summary.sim_ms as f64 / 1000.0;
        println!(
            "time             simulated {sim:.0} s, wall {wall:.2} s ({:.0}x), {:.1} seeds/s, {:.0} messages/s",
            sim / wall.max(1e-9),
            summary.seeds_per_second(),
            summary.messages as f64 / wall.max(1e-9)
        );
        println!("{} passed, {} failed", summary.seeds_run - failed, failed);
    }

    /// This program with the arguments it was started with: a worker of a sweep takes the same arguments, so
    /// it builds the very same sweep and runs its part of it. `None` (threads instead) when the program cannot
    /// name its own file.
    fn worker_command() -> Option<lockstep_sim::sweep::WorkerCommand> {
        let program = std::env::current_exe().ok()?;
        Some(lockstep_sim::sweep::WorkerCommand { program, args: std::env::args_os().skip(1).collect() })
    }

    /// Seeds of a scenario sweep checked before it starts, at most: a `[generate]` scenario's world takes its
    /// shape from the seed, and a seed that lacks a tablet the scenario names is an error in the file, not a crash.
    const SCENARIO_SEEDS_CHECKED: u64 = 100_000;

    fn check_scenario_seeds(config: &lockstep_sim::sweep::SweepConfig) -> Result<(), String> {
        let WorldSource::Scenario(scenario, _) = &config.source else { return Ok(()) };
        let seeds: Box<dyn Iterator<Item = u64>> = match &config.pinned {
            Some(pinned) => Box::new(pinned.iter().copied()),
            None => Box::new(config.range_seeds()),
        };
        seeds.take(SCENARIO_SEEDS_CHECKED as usize).try_for_each(|seed| scenario.check_seed(seed))
    }

    /// The regression seeds to replay first: from the file for generated worlds, on part 1 of a split sweep.
    fn regression_seeds(args: &RunArgs, source: &WorldSource) -> Result<Vec<u64>, String> {
        let generated = matches!(source, WorldSource::Generated(_));
        let first_part = args.shard.is_none_or(|(k, _)| k == 1);
        if !generated || !first_part {
            return Ok(Vec::new());
        }
        let path = &args.regressions;
        match std::fs::read_to_string(path) {
            Ok(text) => lockstep_sim::sweep::parse_regression_seeds(&path.display().to_string(), &text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && path.as_os_str() == DEFAULT_REGRESSIONS => {
                // A worker's standard output carries its reports; its parent has said this already.
                if args.worker.is_none() {
                    println!("note: no {DEFAULT_REGRESSIONS} here (run from the top of the workspace to replay it)");
                }
                Ok(Vec::new())
            }
            Err(error) => Err(format!("cannot read {}: {error}", path.display())),
        }
    }

    fn shrink(args: ShrinkArgs) -> i32 {
        if args.world.scenario.is_some() {
            eprintln!("error: shrink works on generated worlds; a scenario is already written down (drop --scenario)");
            return 2;
        }
        let params = match args.world.params() {
            Ok(params) => params,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        // What would stop the file being written is found now, not after the shrink.
        if args.out.exists() && !args.out.is_dir() {
            eprintln!("error: --out {} is not a directory", args.out.display());
            return 2;
        }
        let kept = |stem: &str| args.out.join(format!("{stem}-seed-{}.toml", args.seed));
        if let Some(path) = args.world.bugs.first().map(|bug| kept(bug))
            && path.exists()
        {
            eprintln!(
                "error: {} exists; remove it or pick another --out (a kept case is not replaced)",
                path.display()
            );
            return 2;
        }
        let world = lockstep_sim::world::World::generate(args.seed, &params);
        let command = format!("cargo sim run --start {} --seeds 1{}", args.seed, args.world.as_flags());
        println!("shrinking seed {}{} ...", args.seed, args.world.as_flags());
        let progress = Box::new(|runs: usize, size: lockstep_sim::shrink::Size| {
            println!("  run {runs:>5}: {size}");
        });
        let max_runs = usize::try_from(args.max_runs).unwrap_or(usize::MAX);
        let shrunk = match lockstep_sim::shrink::shrink(&world, args.invariant, &command, max_runs, progress) {
            Ok(shrunk) => shrunk,
            Err(error) => {
                eprintln!("error: {error}");
                return 1;
            }
        };
        println!("invariant {} still breaks after {} runs", shrunk.invariant, shrunk.runs);
        println!("before: {}", shrunk.before);
        println!("after:  {}", shrunk.after);
        let stem = args.world.bugs.first().map_or_else(|| shrunk.invariant.name().to_string(), Clone::clone);
        let path = kept(&stem);
        let written = std::fs::create_dir_all(&args.out).and_then(|()| {
            use std::io::Write;
            std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?.write_all(shrunk.scenario.as_bytes())
        });
        if let Err(error) = written {
            let why = if error.kind() == std::io::ErrorKind::AlreadyExists {
                "it exists, and a kept case is not replaced; remove it or pick another --out".to_string()
            } else {
                error.to_string()
            };
            eprintln!("error: cannot write {}: {why}", path.display());
            return 2;
        }
        println!("written to {}; it runs as a test from there, and by hand:", path.display());
        println!("  cargo sim repro --scenario {} --seed {}", shell_quote(&path.display().to_string()), args.seed);
        0
    }

    fn print_failure(failure: &SeedFailure, world: &WorldArgs) {
        match failure.log_hash {
            Some(hash) => println!("FAIL seed {} [{}] event log hash {hash:016x}", failure.seed, failure.class.name()),
            None => println!("FAIL seed {} [{}]", failure.seed, failure.class.name()),
        }
        for line in &failure.lines {
            println!("  {line}");
        }
        println!("  reproduce: cargo sim repro --seed {}{}", failure.seed, world.as_flags());
    }

    fn repro(args: ReproArgs) -> i32 {
        let source = match args.world.source() {
            Ok((source, _)) => source,
            Err(error) => {
                eprintln!("error: {error}");
                return 2;
            }
        };
        if let WorldSource::Scenario(scenario, _) = &source
            && let Err(error) = scenario.check_seed(args.seed)
        {
            eprintln!("error: {error}");
            return 2;
        }
        init_tracing();
        let world = source.world(args.seed);
        print!("{}", world.describe());
        let outcome = run_seed(&world, Keep::Log);
        let marks = lockstep_sim::checkers::offending_events(&outcome.violations);
        for (index, event) in outcome.log.iter().flatten().enumerate() {
            emit(event, &event);
            if let Some(invariants) = marks.get(&index) {
                // Under the same target as the event: a filter that shows the event shows its mark.
                emit(event, &lockstep_sim::checkers::offending_mark(index, invariants));
            }
        }
        match outcome.log_hash {
            Some(hash) => println!("event log: {} events, hash {hash:016x}", outcome.events),
            // The seed's thread panicked: the log went with it.
            None => println!("event log: lost with the run"),
        }
        let expected = source.expect_violation();
        match SeedFailure::of(&outcome, expected) {
            None if expected.is_some() => {
                for violation in &outcome.violations {
                    println!("  {violation}");
                }
                let expected = expected.expect("checked");
                println!("seed {} broke {expected}, as the scenario expects: the kept bug is still found", args.seed);
                0
            }
            None => {
                println!("seed {} passed every invariant", args.seed);
                0
            }
            Some(failure) => {
                print_failure(&failure, &args.world);
                failure.class.exit_code()
            }
        }
    }

    fn init_tracing() {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lockstep=debug"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_writer(std::io::stdout)
            .init();
    }

    /// Sends one trace line through tracing, under a target per kind of event so `RUST_LOG` can filter:
    /// `lockstep::fault`, `lockstep::apply`, `lockstep::state`, `lockstep::net`, `lockstep::store`.
    /// `line` is the event's own text or a line about it.
    fn emit(event: &Event, line: &dyn std::fmt::Display) {
        use lockstep::host::HostEvent;
        match &event.kind {
            EventKind::Stored { .. } => tracing::info!(target: "lockstep::store", "{line}"),
            EventKind::Fault { .. } | EventKind::Killed { .. } | EventKind::Restarted | EventKind::Healed => {
                tracing::warn!(target: "lockstep::fault", "{line}")
            }
            EventKind::Host(HostEvent::Persisted(lockstep::protocol::PersistNote::ShardApplied { .. })) => {
                tracing::info!(target: "lockstep::apply", "{line}")
            }
            EventKind::Host(HostEvent::Sent { .. } | HostEvent::Received { .. } | HostEvent::BadFrame { .. }) => {
                tracing::debug!(target: "lockstep::net", "{line}")
            }
            EventKind::Host(HostEvent::Download { .. }) => tracing::debug!(target: "lockstep::store", "{line}"),
            EventKind::Host(_) => tracing::info!(target: "lockstep::state", "{line}"),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn command(args: &[&str]) -> Command {
            let words = ["cargo sim"].iter().chain(args);
            Cli::try_parse_from(words).unwrap_or_else(|e| panic!("{args:?} parses: {e}")).command
        }

        fn run_args(args: &[&str]) -> RunArgs {
            match command(&[&["run"], args].concat()) {
                Command::Run(args) => args,
                _ => panic!("a run command"),
            }
        }

        fn check_args(args: &[&str]) -> CheckArgs {
            match command(&[&["check"], args].concat()) {
                Command::Check(args) => args,
                _ => panic!("a check command"),
            }
        }

        const SCENARIO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/second-restore-refused.toml");

        #[test]
        fn more_segments_than_increments_are_refused_and_segments_find_their_bugs() {
            assert_eq!(check(check_args(&["--segments", "3"])), 2);
            let dir = tempfile::tempdir().expect("a temporary directory");
            let emit = dir.path().join("cex.toml");
            let emit = emit.to_str().expect("a utf-8 path");
            let args = ["--segments", "2", "--bug", "final-work-every-segment", "--emit", emit];
            assert_eq!(check(check_args(&args)), 1);
            let written = std::fs::read_to_string(emit).expect("the counterexample is written");
            assert!(written.contains("until_ms = 2000\nsegments = [1000]"), "{written}");
        }

        #[test]
        fn cancel_fixes_whether_worlds_cancel_their_restore_mid_run_and_a_reproduce_line_repeats_it() {
            let params = |flag: &str| run_args(&["--cancel", flag]).world.params().expect("valid flags");
            assert_eq!(params("never").cancel_probability, 0.0);
            assert_eq!(params("always").cancel_probability, 1.0);
            let default = run_args(&[]).world.params().expect("valid flags");
            assert_eq!(default.cancel_probability, WorldParams::sweep_default().cancel_probability);
            let worlds = |flag: &str| {
                let params = params(flag);
                (0..20).map(|seed| lockstep_sim::world::World::generate(seed, &params)).collect::<Vec<_>>()
            };
            // Every world restored in one go cancels mid-run; none in segments does (they cancel between segments).
            assert!(worlds("always").iter().all(|world| world.cancels_mid_run() == (world.segments() == 1)));
            assert!(worlds("never").iter().all(|world| !world.cancels_mid_run()));
            assert_eq!(run_args(&["--cancel", "always"]).world.as_flags(), " --cancel always");
            assert!(Cli::try_parse_from(["lockstep-sim", "run", "--cancel", "sometimes"]).is_err());
        }

        #[test]
        fn a_client_that_may_cancel_finds_the_cancel_bugs_and_the_scenario_cancels_when_the_path_did() {
            let dir = tempfile::tempdir().expect("a temporary directory");
            for (bug, moment) in [("cancel-keeps-hold", 0), ("cancel-overwrites-end", 60_000)] {
                let emit = dir.path().join(format!("{bug}.toml"));
                let emit = emit.to_str().expect("a utf-8 path");
                let args = ["--cancel", "--crashes", "0", "--drops", "0", "--bug", bug, "--emit", emit];
                assert_eq!(check(check_args(&args)), 1, "{bug}");
                let written = std::fs::read_to_string(emit).expect("the counterexample is written");
                assert!(written.contains(&format!("[[restore]]\nop = 1\ncancel_at_ms = {moment}\n")), "{written}");
            }
            // Without --cancel the explored client never cancels, and the bug cannot show.
            assert_eq!(check(check_args(&["--crashes", "0", "--drops", "0", "--bug", "cancel-keeps-hold"])), 0);
            // A restore again follows a cancel that took, of a restore in one go.
            let emit = dir.path().join("again.toml");
            let emit = emit.to_str().expect("a utf-8 path");
            let args =
                ["--cancel", "--restore-again", "--shards", "1", "--bug", "apply-older-operations", "--emit", emit];
            assert_eq!(check(check_args(&args)), 1);
            let written = std::fs::read_to_string(emit).expect("the counterexample is written");
            assert!(written.contains("[[restore]]\nop = 2\nafter_ended = 1\nif_cancelled = 1\n"), "{written}");
            assert!(Cli::try_parse_from(["lockstep-sim", "check", "--restore-again"]).is_err(), "needs --cancel");
            assert_eq!(check(check_args(&["--cancel", "--restore-again", "--segments", "2"])), 2);
        }

        #[test]
        fn a_start_the_pinned_seeds_of_a_scenario_would_ignore_is_refused() {
            let pinned = Some(vec![1, 2, 3]);
            let error = plan_seeds(&run_args(&["--scenario", SCENARIO, "--start", "5"]), pinned.clone())
                .expect_err("--start is refused beside pinned seeds");
            assert!(
                error.starts_with("--start 5 does not apply to the pinned seeds of ")
                    && error.contains("second-restore-refused.toml ([1, 2, 3]); add --seeds N to run seeds 5.."),
                "{error}"
            );
            // With --seeds the scenario runs a range, and --start is where it begins.
            let args = run_args(&["--scenario", SCENARIO, "--start", "5", "--seeds", "3"]);
            assert_eq!(plan_seeds(&args, pinned.clone()), Ok((5, 3, None)));
            assert_eq!(plan_seeds(&run_args(&["--scenario", SCENARIO]), pinned.clone()), Ok((0, 3, pinned)));
        }

        #[test]
        fn a_range_ending_at_the_last_seed_is_run_and_only_one_past_it_is_refused() {
            let max = u64::MAX.to_string();
            let below = (u64::MAX - 1).to_string();
            assert_eq!(plan_seeds(&run_args(&["--start", &max, "--seeds", "1"]), None), Ok((u64::MAX, 1, None)));
            let error = plan_seeds(&run_args(&["--start", &max, "--seeds", "2"]), None).expect_err("past the end");
            assert!(error.contains("runs past the last seed, 18446744073709551615"), "{error}");
            let error = plan_seeds(&run_args(&["--start", "2", "--seeds", &max]), None).expect_err("past the end");
            assert!(error.contains("--start 2 plus --seeds 18446744073709551615 runs past"), "{error}");
            // A time-limited sweep plans the seeds there are; parts of a range at its end start within it.
            let args = run_args(&["--start", &max, "--time-limit", "1s"]);
            assert_eq!(plan_seeds(&args, None), Ok((u64::MAX, 1, None)));
            let args = run_args(&["--start", &below, "--seeds", "2", "--shard", "2/2"]);
            assert_eq!(plan_seeds(&args, None), Ok((u64::MAX, 1, None)));
            let args = run_args(&["--start", &max, "--seeds", "1", "--shard", "2/2"]);
            assert_eq!(plan_seeds(&args, None), Ok((u64::MAX, 0, None)), "part 2 of one seed has none");
        }

        #[test]
        fn a_search_cut_short_by_its_state_limit_does_not_say_it_found_no_violation_outright() {
            use lockstep_sim::explore::{ExploreConfig, ExploreWorld, explore};
            let args = check_args(&["--max-states", "1"]);
            let world = ExploreWorld::new(ExploreConfig { max_states: 1, ..ExploreConfig::default() });
            let report = explore(&world, &mut |_| {});
            assert!(report.truncated && report.counterexample.is_none());
            assert_eq!(
                no_violation(&report, &args),
                format!(
                    "no violation in the {} states explored; stopped at --max-states 1, the space is not exhausted \
                     (liveness not checked)",
                    report.unique_states
                )
            );
            let args = check_args(&["--depth", "2"]);
            let world = ExploreWorld::new(ExploreConfig { max_depth: 2, ..ExploreConfig::default() });
            let report = explore(&world, &mut |_| {});
            assert!(no_violation(&report, &args).contains("; stopped at --depth 2, the space is not exhausted"));
            // Nothing found is still exit code 0: the output says how far the search went.
            assert_eq!(check(check_args(&["--max-states", "1"])), 0);
        }

        #[test]
        fn a_counterexample_that_cannot_be_written_is_a_bad_output_path() {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let blocked = dir.path().join("a-file");
            std::fs::write(&blocked, "not a directory").expect("writes");
            let under_a_file = blocked.join("counterexample.toml");
            let emit = under_a_file.to_str().expect("a utf-8 path");
            assert_eq!(check(check_args(&["--bug", "advance-on-first-report", "--emit", emit])), 2);
            let written = dir.path().join("cex.toml");
            let emit = written.to_str().expect("a utf-8 path");
            assert_eq!(check(check_args(&["--bug", "advance-on-first-report", "--emit", emit])), 1);
            assert!(written.exists());
        }

        #[test]
        fn lost_object_fixes_whether_worlds_lose_an_object_and_a_reproduce_line_repeats_it() {
            let params = |flag: &str| run_args(&["--lost-object", flag]).world.params().expect("valid flags");
            let probabilities = |p: WorldParams| (p.lost_object_probability, p.restore_again_probability);
            assert_eq!(probabilities(params("never")), (0.0, 0.0));
            assert_eq!(probabilities(params("for-good")), (1.0, 0.0));
            assert_eq!(probabilities(params("restore-again")), (1.0, 1.0));
            let drawn = WorldParams::sweep_default();
            let default = run_args(&[]).world.params().expect("valid flags");
            assert_eq!(probabilities(default), probabilities(drawn));
            let world = lockstep_sim::world::World::generate(7, &params("restore-again"));
            assert!(world.lost_objects.iter().all(|lost| lost.until_end_of.is_some()) && world.calls.len() == 2);
            assert_eq!(run_args(&["--lost-object", "restore-again"]).world.as_flags(), " --lost-object restore-again");
            let refused = Cli::try_parse_from(["lockstep-sim", "run", "--lost-object", "sometimes"]);
            assert!(refused.is_err_and(|e| e.to_string().contains("possible values: never, for-good, restore-again")));
        }

        #[test]
        fn point_in_time_fixes_whether_worlds_restore_to_a_point_and_a_reproduce_line_repeats_it() {
            let params = |flag: &str| run_args(&["--point-in-time", flag]).world.params().expect("valid flags");
            assert_eq!(params("never").point_in_time_probability, 0.0);
            assert_eq!(params("always").point_in_time_probability, 1.0);
            let default = run_args(&[]).world.params().expect("valid flags");
            assert_eq!(default.point_in_time_probability, WorldParams::sweep_default().point_in_time_probability);
            let segmented = (0..20).map(|seed| lockstep_sim::world::World::generate(seed, &params("always")));
            assert!(segmented.clone().all(|world| world.until_ms.is_some() || world.segments() > 1));
            assert!(segmented.clone().any(|world| world.segments() > 1));
            assert!((0..20).all(|seed| {
                let world = lockstep_sim::world::World::generate(seed, &params("never"));
                world.until_ms.is_none() && world.segments() == 1
            }));
            assert_eq!(run_args(&["--point-in-time", "always"]).world.as_flags(), " --point-in-time always");
            let refused = Cli::try_parse_from(["lockstep-sim", "run", "--point-in-time", "sometimes"]);
            assert!(refused.is_err_and(|e| e.to_string().contains("possible values: never, always")));
        }

        #[test]
        fn a_reproduce_line_quotes_a_scenario_path_a_shell_would_split_or_expand() {
            let flags = |path: &str| {
                let world = WorldArgs {
                    scenario: Some(path.into()),
                    bugs: vec!["skip-checksum".to_string()],
                    ..WorldArgs::default()
                };
                world.as_flags()
            };
            assert_eq!(flags("scenarios/a.toml"), " --scenario scenarios/a.toml --bug skip-checksum");
            assert_eq!(flags("my dir/it's.toml"), r" --scenario 'my dir/it'\''s.toml' --bug skip-checksum");
            assert_eq!(flags("x;$(reboot).toml"), " --scenario 'x;$(reboot).toml' --bug skip-checksum");
        }
    }
}
