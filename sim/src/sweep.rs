//! Seed sweeps: many seeds over a pool of workers (one madsim runtime per seed, on a fresh thread), a
//! determinism self-check on a sample of seeds, and a summary. Memory stays flat: only counts and failures are
//! kept.
//!
//! Workers are threads of this process ([`run_sweep`]) or child processes ([`run_sweep_in_processes`], what
//! `cargo sim run --jobs N` uses). Seed threads of one process share its address space, and every thread that
//! ends returns its stack to the kernel, which then interrupts every other core running the process to flush
//! its address translations; with both cores of a 2-core machine busy, two processes ran 1.2 times the seeds per
//! second of two threads. A child process runs part K of N of the run order (every N-th seed from the K-th) and
//! reports each seed's result on its standard output as soon as it has it ([`serve_part`]), so a worker that
//! dies loses nothing but the seed it was running, which is reported as a crash; a new worker takes the rest.
//!
//! A sweep may stop before its last seed ([`StopWhen`]): at its first failure, once a time limit has passed, or
//! when interrupted ([`interrupt`], which the command line calls on Ctrl-C or a termination signal). Over
//! threads, seeds already running finish and count; worker processes are killed, their seeds in progress are not
//! counted, and a killed worker is not a crash.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use lockstep::coordinator::RestoreError;
use lockstep::protocol::ShardFailure;
use serde::{Deserialize, Serialize};

use crate::checkers::Invariant;
use crate::faults::{FaultCounts, FaultKind};
use crate::probes::Probe;
use crate::runner::{Keep, RunEnd, SeedOutcome, run_world};
use crate::scenario::Scenario;
use crate::world::{Bugs, World, WorldParams};

/// Where a sweep's worlds come from.
#[derive(Clone, Debug)]
pub enum WorldSource {
    /// Drawn from each seed.
    Generated(WorldParams),
    /// A scenario file's world, run with each seed, with deliberate bugs on top.
    Scenario(Arc<Scenario>, Bugs),
}

impl WorldSource {
    /// The invariant every seed must break (a scenario that keeps a bug found), if any.
    pub fn expect_violation(&self) -> Option<Invariant> {
        match self {
            WorldSource::Generated(_) => None,
            WorldSource::Scenario(scenario, _) => scenario.expect_violation,
        }
    }

    pub fn world(&self, seed: u64) -> World {
        self.try_world(seed).unwrap_or_else(|error| panic!("{error}"))
    }

    /// The world of `seed`, or why a scenario cannot build it: a generated world's seed may lack a tablet the
    /// scenario names (a sweep checks its first seeds up front, not every one of a long range).
    pub fn try_world(&self, seed: u64) -> Result<World, String> {
        match self {
            WorldSource::Generated(params) => Ok(World::generate(seed, params)),
            WorldSource::Scenario(scenario, bugs) => {
                // Bugs on the command line come on top of any the scenario names.
                let mut world = scenario.checked_world(seed)?;
                world.coordinator.bug = bugs.coordinator.or(world.coordinator.bug);
                world.shard.bug = bugs.shard.or(world.shard.bug);
                world.host_bug = bugs.host.or(world.host_bug);
                Ok(world)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Seeds `start..start + seeds`, unless `pinned` lists them.
    pub start: u64,
    pub seeds: u64,
    /// Exactly these seeds, in this order.
    pub pinned: Option<Vec<u64>>,
    /// Seeds run before the others: the committed regression seeds.
    pub first: Vec<u64>,
    pub jobs: usize,
    pub source: WorldSource,
    /// Every this-many seeds one is run twice and the two event-log hashes compared; 0 turns the check off.
    pub determinism_every: u64,
    /// When to stop before every seed has run.
    pub stop: StopWhen,
}

/// Conditions that end a sweep before its last seed (see the module's documentation for what happens to the
/// seeds in progress).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopWhen {
    /// At the first failing seed.
    pub first_failure: bool,
    /// Once this much wall-clock time has passed since the sweep began: no seed starts after it.
    pub time_limit: Option<Duration>,
}

/// How far a sweep has come, told to its progress callback after every seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Seeds finished.
    pub done: u64,
    /// Of those, seeds that failed.
    pub failed: u64,
}

/// Why a sweep stopped before its last seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stopped {
    FirstFailure,
    TimeLimit(Duration),
    Interrupted,
}

/// Set once the sweep is asked to stop from outside.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops the sweeps of this process as soon as they can: no seed starts after this, and worker processes are
/// killed. Safe to call from any thread, any number of times.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::FirstFailure => f.write_str("at the first failure (--fail-fast)"),
            Stopped::TimeLimit(limit) => write!(f, "at the time limit of {}", duration_text(*limit)),
            Stopped::Interrupted => f.write_str("interrupted (Ctrl-C or a termination signal)"),
        }
    }
}

/// `90s`, `10m`, `2h`: whole hours or minutes where the duration is one, seconds otherwise.
pub fn duration_text(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if duration.subsec_nanos() != 0 {
        format!("{:.3}s", duration.as_secs_f64())
    } else if seconds > 0 && seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds > 0 && seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

/// Parses a duration as [`duration_text`] writes it, whole units only: `90s`, `10m`, `2h`, or a bare number of
/// seconds. It must be more than zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let (number, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed, "s"),
    };
    let per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("`{text}` is not a duration: write a whole number and s, m or h, e.g. 90s, 10m, 2h")),
    };
    let seconds =
        number.parse::<u64>().ok().and_then(|n| n.checked_mul(per_unit)).ok_or_else(|| {
            format!("`{text}` is not a duration: write a whole number and s, m or h, e.g. 90s, 10m, 2h")
        })?;
    if seconds == 0 {
        return Err(format!("`{text}`: a duration must be more than zero"));
    }
    Ok(Duration::from_secs(seconds))
}

/// Progress as plain lines, for a log rather than a terminal (a CI job's output): at most one line per `every`.
pub struct ProgressLines {
    every: Duration,
    /// Seeds the sweep runs, when it has a fixed number of them.
    total: Option<u64>,
    limit: Option<Duration>,
    began: Instant,
    /// Time since `began` at which the next line is due.
    next: Mutex<Duration>,
}

impl ProgressLines {
    /// Lines every `every` for a sweep of `total` seeds (`None`: until `limit`), timed from now.
    pub fn new(every: Duration, total: Option<u64>, limit: Option<Duration>) -> Self {
        let every = every.max(Duration::from_millis(1));
        Self { every, total, limit, began: Instant::now(), next: Mutex::new(every) }
    }

    /// The line to print now that the sweep has come this far, if one is due.
    pub fn due(&self, progress: Progress) -> Option<String> {
        self.due_at(self.began.elapsed(), progress)
    }

    fn due_at(&self, elapsed: Duration, progress: Progress) -> Option<String> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if elapsed < *next {
            return None;
        }
        // One line however long the seed that kept it waiting took.
        while *next <= elapsed {
            *next += self.every;
        }
        Some(progress_line(progress, elapsed, self.total, self.limit))
    }
}

/// `progress: 41200 of 100000 seeds (41%), 0 failed, 30s elapsed, 1373 seeds/s, about 43s left`; with a time
/// limit and no fixed number of seeds, `progress: 41200 seeds, 0 failed, 30s elapsed of 10m, 1373 seeds/s`.
pub fn progress_line(progress: Progress, elapsed: Duration, total: Option<u64>, limit: Option<Duration>) -> String {
    let rate = progress.done as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut line = format!("progress: {} ", progress.done);
    match total {
        Some(total) => line.push_str(&format!("of {total} seeds ({}%)", progress.done * 100 / total.max(1))),
        None => line.push_str("seeds"),
    }
    line.push_str(&format!(", {} failed, {} elapsed", progress.failed, clock_text(elapsed)));
    if let Some(limit) = limit {
        line.push_str(&format!(" of {}", duration_text(limit)));
    }
    line.push_str(&format!(", {rate:.0} seeds/s"));
    let left =
        total.filter(|total| progress.done < *total && rate > 0.0).map(|total| (total - progress.done) as f64 / rate);
    if let Some(left) = left.and_then(|left| Duration::try_from_secs_f64(left.ceil()).ok()) {
        line.push_str(&format!(", about {} left", clock_text(left)));
    }
    line
}

/// `7s`, `1m05s`, `2h03m`: a time of a sweep, to the second.
fn clock_text(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        3600.. => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
        60.. => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{seconds}s"),
    }
}

impl StopWhen {
    /// Why the sweep begun at `began` should stop now that `summary` holds what it has run, if it should.
    fn reason(&self, began: Instant, summary: &SweepSummary) -> Option<Stopped> {
        if interrupted() {
            return Some(Stopped::Interrupted);
        }
        if self.first_failure && !summary.failures.is_empty() {
            return Some(Stopped::FirstFailure);
        }
        self.time_limit.filter(|limit| began.elapsed() >= *limit).map(Stopped::TimeLimit)
    }
}

impl SweepConfig {
    /// The seed at position `index` of the run order, and whether it is a regression seed. A regression seed that
    /// also lies in the range (or the pinned list) runs once, first, and its place in the range is skipped.
    fn seed_at(&self, index: u64) -> Option<(u64, bool)> {
        let first = self.first.len() as u64;
        if index < first {
            return Some((self.first[index as usize], true));
        }
        let index = index - first;
        match &self.pinned {
            Some(pinned) if self.first.is_empty() => pinned.get(index as usize).map(|seed| (*seed, false)),
            Some(pinned) => {
                pinned.iter().filter(|seed| !self.first.contains(seed)).nth(index as usize).map(|seed| (*seed, false))
            }
            None => {
                let run_first = self.regression_seeds_in_range();
                if index >= self.seeds - run_first.len() as u64 {
                    return None;
                }
                // The index-th seed of the range that was not run first: step over each one that was, in order.
                let mut seed = self.start + index;
                for skipped in run_first {
                    if skipped <= seed {
                        seed += 1;
                    }
                }
                Some((seed, false))
            }
        }
    }

    /// Whether `seed` lies in the range `start..start + seeds` (which may end at `u64::MAX` itself).
    fn in_range(&self, seed: u64) -> bool {
        seed.checked_sub(self.start).is_some_and(|offset| offset < self.seeds)
    }

    /// The seeds of the range `start..start + seeds` in order, without overflow: a range that ends at the last
    /// seed, `u64::MAX`, gives it, and nothing past it.
    pub fn range_seeds(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.seeds).map_while(|offset| self.start.checked_add(offset))
    }

    /// The regression seeds that lie in `start..start + seeds`, in ascending order, each once.
    fn regression_seeds_in_range(&self) -> Vec<u64> {
        let mut seeds: Vec<u64> = self.first.iter().copied().filter(|seed| self.in_range(*seed)).collect();
        seeds.sort_unstable();
        seeds.dedup();
        seeds
    }

    /// Seeds this sweep runs, regression seeds included (each seed once).
    pub fn total_seeds(&self) -> u64 {
        let first = self.first.len() as u64;
        match &self.pinned {
            Some(pinned) => first + pinned.iter().filter(|seed| !self.first.contains(seed)).count() as u64,
            // Saturating: a range of every seed but a few, with regression seeds outside it, holds more runs than
            // a u64 counts (and never ends either way).
            None => (self.seeds - self.regression_seeds_in_range().len() as u64).saturating_add(first),
        }
    }
}

/// The last of `seeds` seeds from `start`: any range whose last seed fits in a `u64` is a range, so `--start
/// 18446744073709551615 --seeds 1` runs that seed; a range that would run past it is an error saying so.
pub fn last_seed(start: u64, seeds: u64) -> Result<u64, String> {
    let Some(after_first) = seeds.checked_sub(1) else {
        return Err("--seeds 0: a sweep runs at least one seed".to_string());
    };
    start.checked_add(after_first).ok_or_else(|| {
        // Only a start above 0 can overflow, so the count of seeds left from it fits.
        let left = u64::MAX - start + 1;
        format!(
            "--start {start} plus --seeds {seeds} runs past the last seed, {}: {left} seed(s) are left from --start",
            u64::MAX
        )
    })
}

/// `text` as one word of a POSIX shell command line: as it is when every character is one a shell takes
/// literally, in single quotes otherwise (a `'` in it written `'\''`). A printed command line (a failing seed's
/// `reproduce:` line) then runs as printed, whatever the path of its scenario file holds.
pub fn shell_quote(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:=@%+".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("'{}'", text.replace('\'', "'\\''")))
    }
}

/// Reads a regression-seed file: one seed per line, `#` starts a comment, blank lines are skipped.
pub fn parse_regression_seeds(file: &str, text: &str) -> Result<Vec<u64>, String> {
    let mut seeds = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let seed =
            line.parse().map_err(|_| format!("{file}:{}: `{line}` is not a seed (a whole number)", number + 1))?;
        // A seed listed twice is run once.
        if !seeds.contains(&seed) {
            seeds.push(seed);
        }
    }
    Ok(seeds)
}

/// The kinds of failure, in order of severity; each has its own exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureClass {
    /// A safety invariant broke (wrong data, wrong order, false success, ...).
    Safety,
    /// The restore did not end within the bound after healing.
    Liveness,
    /// The simulation itself panicked.
    Crash,
    /// The same seed gave two different event logs.
    Determinism,
}

impl FailureClass {
    pub fn exit_code(self) -> i32 {
        match self {
            FailureClass::Safety => 1,
            FailureClass::Liveness => 3,
            FailureClass::Crash => 4,
            FailureClass::Determinism => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Safety => "safety",
            FailureClass::Liveness => "liveness",
            FailureClass::Crash => "crash",
            FailureClass::Determinism => "determinism",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedFailure {
    pub seed: u64,
    pub class: FailureClass,
    /// One line per violation (or the panic, or the hash mismatch).
    pub lines: Vec<String>,
    /// Hash of the failing run's event log (`cargo sim repro` prints the same hash); none for a crash.
    pub log_hash: Option<u64>,
}

impl SeedFailure {
    /// Classifies a seed's outcome; `None` when it passed. With `expect_violation` the seed passes only when
    /// that invariant broke (a kept bug must stay found).
    pub fn of(outcome: &SeedOutcome, expect_violation: Option<Invariant>) -> Option<Self> {
        if let Some(message) = &outcome.panic {
            let lines = vec![format!("panicked: {message}")];
            return Some(Self { seed: outcome.seed, class: FailureClass::Crash, lines, log_hash: None });
        }
        if let Some(expected) = expect_violation {
            // A run that did not go as its scenario says (a decision that never fired) proves nothing about the bug.
            if outcome.violations.iter().any(|v| v.invariant == expected && !v.of_the_scenario) {
                return None;
            }
            let mut lines = vec![format!("expected invariant {expected} to break (a kept bug), but it held")];
            lines.extend(outcome.violations.iter().map(|v| v.to_string()));
            return Some(Self { seed: outcome.seed, class: FailureClass::Safety, lines, log_hash: outcome.log_hash });
        }
        if outcome.violations.is_empty() {
            return None;
        }
        let class = if outcome.violations.iter().all(|v| v.invariant.is_liveness()) {
            FailureClass::Liveness
        } else {
            FailureClass::Safety
        };
        let lines = outcome.violations.iter().map(|v| v.to_string()).collect();
        Some(Self { seed: outcome.seed, class, lines, log_hash: outcome.log_hash })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub seeds_run: u64,
    pub failures: Vec<SeedFailure>,
    pub by_invariant: BTreeMap<Invariant, u64>,
    pub faults: FaultCounts,
    /// Seeds in which each fault kind fired at least once.
    pub seeds_with_fault: FaultCounts,
    pub determinism_checked: u64,
    pub sim_ms: u64,
    pub messages: u64,
    pub events: u64,
    pub wall: Duration,
    /// Worlds that lost an object (and so their first restore must end in a clean Failed).
    pub lost_object_worlds: u64,
    /// Of those, worlds that got it back once that restore failed and restored again (which must end Done).
    pub restored_again_worlds: u64,
    /// Worlds that restored to a point in time, and of those the ones that did it in two or three segments.
    pub point_in_time_worlds: u64,
    pub segmented_worlds: u64,
    /// Of those, the worlds whose client cancels the restore instead of asking for its last segment.
    pub cancelled_worlds: u64,
    /// Worlds whose client cancels their restore in one go at a moment of the run, and of those the ones where
    /// the cancel came first (the restore ended cancelled; in the others it had already ended).
    pub cancel_race_worlds: u64,
    pub cancel_race_won: u64,
    /// Of the worlds where the cancel came first, those whose client then restored the same tables again.
    pub cancel_restarted: u64,
    /// How each seed's first operation ended: Done, Failed, still running at the bound, never started.
    pub ended_done: u64,
    pub ended_failed: u64,
    /// Of the Failed: cancelled by the client, and failed at a lost object (the rest failed otherwise: a deadline).
    pub failed_cancelled: u64,
    pub failed_object_missing: u64,
    pub ended_unfinished: u64,
    /// Seeds that hit each coverage probe.
    pub probes: BTreeMap<Probe, u64>,
    /// Regression seeds replayed before the sweep (counted in `seeds_run` too).
    pub regression_seeds: u64,
    /// Set when the sweep stopped before its last seed ([`StopWhen`]).
    pub stopped: Option<Stopped>,
}

impl SweepSummary {
    pub fn worst_class(&self) -> Option<FailureClass> {
        self.failures.iter().map(|f| f.class).min()
    }

    /// Probes no seed of the sweep hit.
    pub fn probes_missed(&self) -> Vec<Probe> {
        Probe::ALL.into_iter().filter(|p| !self.probes.contains_key(p)).collect()
    }

    pub fn seeds_per_second(&self) -> f64 {
        self.seeds_run as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, world: &World, outcome: &SeedOutcome, expect_violation: Option<Invariant>) {
        self.seeds_run += 1;
        self.sim_ms += outcome.sim_ms;
        self.messages += outcome.messages;
        self.events += outcome.events as u64;
        self.faults.merge(&outcome.faults);
        for kind in FaultKind::ALL {
            if outcome.faults.get(kind) > 0 {
                self.seeds_with_fault.add(kind);
            }
        }
        if !world.lost_objects.is_empty() {
            self.lost_object_worlds += 1;
        }
        if world.lost_objects.iter().any(|lost| lost.until_end_of.is_some()) {
            self.restored_again_worlds += 1;
        }
        if world.until_ms.is_some() || world.segments() > 1 {
            self.point_in_time_worlds += 1;
        }
        if world.segments() > 1 {
            self.segmented_worlds += 1;
        }
        if world.cancels() {
            self.cancelled_worlds += 1;
        }
        if world.cancels_mid_run() {
            self.cancel_race_worlds += 1;
            if matches!(outcome.end, RunEnd::Failed(lockstep::coordinator::RestoreError::Cancelled { .. })) {
                self.cancel_race_won += 1;
                if world.calls.iter().any(|call| call.if_cancelled.is_some()) {
                    self.cancel_restarted += 1;
                }
            }
        }
        match &outcome.end {
            RunEnd::Done => self.ended_done += 1,
            RunEnd::Failed(error) => {
                self.ended_failed += 1;
                match error {
                    RestoreError::Cancelled { .. } => self.failed_cancelled += 1,
                    RestoreError::Shard { cause: ShardFailure::ObjectMissing { .. }, .. } => {
                        self.failed_object_missing += 1;
                    }
                    _ => {}
                }
            }
            RunEnd::StillRunning | RunEnd::AwaitingSegment | RunEnd::NeverStarted => self.ended_unfinished += 1,
        }
        // Seeds per invariant: a seed may break one twice (a scenario not followed, and an outcome it expects).
        let broken: std::collections::BTreeSet<Invariant> = outcome.violations.iter().map(|v| v.invariant).collect();
        for invariant in broken {
            *self.by_invariant.entry(invariant).or_default() += 1;
        }
        for probe in Probe::ALL {
            if outcome.probes.contains(probe) {
                *self.probes.entry(probe).or_default() += 1;
            }
        }
        if let Some(failure) = SeedFailure::of(outcome, expect_violation) {
            self.failures.push(failure);
        }
    }

    /// Counts one seed: its outcome, whether it was a regression seed, and its determinism check if it had one.
    fn add_seed(
        &mut self,
        config: &SweepConfig,
        seed: u64,
        first: bool,
        world: &World,
        outcome: &SeedOutcome,
        mismatch: Option<Option<Vec<String>>>,
    ) {
        self.add(world, outcome, config.source.expect_violation());
        self.regression_seeds += u64::from(first);
        if let Some(mismatch) = mismatch {
            self.determinism_checked += 1;
            if let Some(lines) = mismatch {
                let class = FailureClass::Determinism;
                let log_hash = outcome.log_hash;
                self.failures.push(SeedFailure { seed, class, lines, log_hash });
            }
        }
    }

    /// Counts a seed whose worker process died running it, or whose world could not be built: a crash, like a
    /// seed whose thread panicked.
    fn add_lost(&mut self, seed: u64, first: bool, why: String) {
        self.seeds_run += 1;
        self.regression_seeds += u64::from(first);
        self.ended_unfinished += 1;
        self.failures.push(SeedFailure { seed, class: FailureClass::Crash, lines: vec![why], log_hash: None });
    }

    /// Adds up `other`, a summary of other seeds; failures are sorted once the sweep is over.
    fn merge(&mut self, other: SweepSummary) {
        self.seeds_run += other.seeds_run;
        self.failures.extend(other.failures);
        for (invariant, count) in other.by_invariant {
            *self.by_invariant.entry(invariant).or_default() += count;
        }
        self.faults.merge(&other.faults);
        self.seeds_with_fault.merge(&other.seeds_with_fault);
        self.determinism_checked += other.determinism_checked;
        self.sim_ms += other.sim_ms;
        self.messages += other.messages;
        self.events += other.events;
        self.lost_object_worlds += other.lost_object_worlds;
        self.restored_again_worlds += other.restored_again_worlds;
        self.point_in_time_worlds += other.point_in_time_worlds;
        self.segmented_worlds += other.segmented_worlds;
        self.cancelled_worlds += other.cancelled_worlds;
        self.cancel_race_worlds += other.cancel_race_worlds;
        self.cancel_race_won += other.cancel_race_won;
        self.cancel_restarted += other.cancel_restarted;
        self.ended_done += other.ended_done;
        self.ended_failed += other.ended_failed;
        self.failed_cancelled += other.failed_cancelled;
        self.failed_object_missing += other.failed_object_missing;
        self.ended_unfinished += other.ended_unfinished;
        for (probe, count) in other.probes {
            *self.probes.entry(probe).or_default() += count;
        }
        self.regression_seeds += other.regression_seeds;
    }
}

/// Runs the sweep; `progress` is called after every seed with the seeds done and failed so far.
pub fn run_sweep(config: &SweepConfig, progress: &(dyn Fn(Progress) + Sync)) -> SweepSummary {
    let began = Instant::now();
    let next = AtomicU64::new(0);
    let counts = Mutex::new(Progress::default());
    let summary = Mutex::new(SweepSummary::default());
    let jobs = config.jobs.max(1);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((seed, first)) = config.seed_at(index) else { return };
                    {
                        // A seed is left: the sweep stops here if a condition says so.
                        let mut summary = summary.lock().unwrap_or_else(|p| p.into_inner());
                        if summary.stopped.is_none() {
                            summary.stopped = config.stop.reason(began, &summary);
                        }
                        if summary.stopped.is_some() {
                            return;
                        }
                    }
                    let run = run_one(index, seed, config);
                    let mut summary = summary.lock().unwrap_or_else(|p| p.into_inner());
                    let failures = summary.failures.len();
                    match run {
                        Ok((world, outcome, mismatch)) => {
                            summary.add_seed(config, seed, first, &world, &outcome, mismatch);
                        }
                        Err(why) => summary.add_lost(seed, first, why),
                    }
                    let failed = summary.failures.len() > failures;
                    drop(summary);
                    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                    counts.done += 1;
                    counts.failed += u64::from(failed);
                    progress(*counts);
                }
            });
        }
    });
    let mut summary = summary.into_inner().unwrap_or_else(|p| p.into_inner());
    summary.failures.sort_by_key(|f| (f.seed, f.class));
    summary.wall = began.elapsed();
    summary
}

/// Part `part` (from 0) of `parts` of a sweep: every `parts`-th position of the run order from the `part`-th.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub part: u64,
    pub parts: u64,
    /// Seeds of the part already run elsewhere (by a worker that died): the part starts after them.
    pub skip: u64,
}

impl Part {
    /// Positions in the run order of the seeds of this part, skipped ones left out.
    fn positions(self, config: &SweepConfig) -> impl Iterator<Item = u64> {
        (self.part..config.total_seeds()).step_by(self.parts.max(1) as usize).skip(self.skip as usize)
    }

    /// How many positions [`Part::positions`] gives, without walking them (a time-limited sweep may plan
    /// billions).
    fn len(self, config: &SweepConfig) -> u64 {
        let all = config.total_seeds().saturating_sub(self.part).div_ceil(self.parts.max(1));
        all.saturating_sub(self.skip)
    }
}

/// A worker's report of one seed, on its standard output: this tag, the length of the encoded summary of that
/// seed alone (4 bytes, little-endian), then the summary (postcard).
const SEED_REPORT: u8 = b'R';
/// Far more than a seed's report takes (a few hundred bytes, a few thousand with failures); a longer one is
/// garbage, not something to allocate.
const MAX_REPORT_BYTES: u32 = 1 << 24;

/// The worker side of [`run_sweep_in_processes`]: runs `part` of `config`'s seeds one after the other and
/// reports each on `out` as soon as it is done.
pub fn serve_part(config: &SweepConfig, part: Part, out: &mut impl Write) -> io::Result<()> {
    for index in part.positions(config) {
        let (seed, first) = config.seed_at(index).expect("positions stay within the run order");
        let mut summary = SweepSummary::default();
        match run_one(index, seed, config) {
            Ok((world, outcome, mismatch)) => summary.add_seed(config, seed, first, &world, &outcome, mismatch),
            Err(why) => summary.add_lost(seed, first, why),
        }
        let bytes = postcard::to_stdvec(&summary).map_err(io::Error::other)?;
        let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
        out.write_all(&[SEED_REPORT])?;
        out.write_all(&len.to_le_bytes())?;
        out.write_all(&bytes)?;
        out.flush()?;
    }
    Ok(())
}

/// How to start a worker process: `program` with `args`, to which each start adds `--worker K/N --skip M`
/// (part K of N, counted from 1, after its first M seeds).
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// What a worker's reader tells the sweep.
enum Report {
    /// The summary of one or more seeds.
    Seeds(Box<Batch>),
    /// A worker could not be started at all: the sweep cannot go on.
    Broken(String),
}

/// Runs the sweep in `config.jobs` worker processes started with `command`, each running one part of the seeds
/// ([`serve_part`]); `progress` is called after every seed with the seeds done and failed so far. The summary is the one
/// [`run_sweep`] gives for the same seeds. Errs only when a worker cannot be started at all.
pub fn run_sweep_in_processes(
    config: &SweepConfig,
    command: &WorkerCommand,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<SweepSummary, String> {
    let began = Instant::now();
    let parts = (config.jobs.max(1) as u64).min(config.total_seeds()).max(1);
    let (tx, rx) = mpsc::channel();
    let mut summary = SweepSummary::default();
    let mut broken = None;
    let workers: Vec<Worker> = (0..parts).map(|_| Worker::default()).collect();
    std::thread::scope(|scope| {
        for (part, worker) in (0..parts).zip(&workers) {
            let tx = tx.clone();
            scope.spawn(move || run_part(config, command, part, parts, worker, &tx));
        }
        drop(tx);
        let mut counts = Progress::default();
        loop {
            // Woken by a report, at the time limit, or soon after an interruption.
            let limit = config.stop.time_limit.map(|limit| limit.saturating_sub(began.elapsed()));
            let wait = limit.map_or(INTERRUPT_POLL, |limit| limit.min(INTERRUPT_POLL));
            let report = rx.recv_timeout(wait).map_err(|e| e == mpsc::RecvTimeoutError::Disconnected);
            match report {
                Ok(Report::Seeds(batch)) => {
                    counts.failed += batch.failed;
                    counts.done += batch.seeds;
                    summary.merge(batch.summary);
                    progress(counts);
                }
                Ok(Report::Broken(why)) => broken = Some(why),
                // Every worker is done.
                Err(true) => break,
                Err(false) => {}
            }
            if summary.stopped.is_none() && counts.done < config.total_seeds() {
                summary.stopped = config.stop.reason(began, &summary);
                if summary.stopped.is_some() {
                    workers.iter().for_each(Worker::stop);
                }
            }
        }
    });
    if let Some(why) = broken {
        return Err(why);
    }
    summary.failures.sort_by_key(|f| (f.seed, f.class));
    summary.wall = began.elapsed();
    Ok(summary)
}

/// How often a sweep over processes looks for an interruption while no report comes.
const INTERRUPT_POLL: Duration = Duration::from_millis(50);

/// The worker process running one part, for stopping it from the thread that reads every part's reports.
#[derive(Default)]
struct Worker {
    /// Set once the sweep stops: no new process starts, and the one running is killed.
    stopped: std::sync::atomic::AtomicBool,
    child: Mutex<Option<std::process::Child>>,
}

impl Worker {
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = child.kill();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// Runs part `part` of `parts` in a worker process, and in a new one after the seed a worker died on, until the
/// part is done or `worker` is stopped.
fn run_part(
    config: &SweepConfig,
    command: &WorkerCommand,
    part: u64,
    parts: u64,
    worker: &Worker,
    tx: &mpsc::Sender<Report>,
) {
    let total = Part { part, parts, skip: 0 }.len(config);
    let mut skip = 0;
    while skip < total {
        let mut slot = worker.child.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_stopped() {
            return;
        }
        let spawned = Command::new(&command.program)
            .args(&command.args)
            .arg("--worker")
            .arg(format!("{}/{parts}", part + 1))
            .arg("--skip")
            .arg(skip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let why = format!("cannot start a sweep worker ({}): {error}", command.program.display());
                let _ = tx.send(Report::Broken(why));
                return;
            }
        };
        let stdout = child.stdout.take().expect("the worker's output is piped");
        *slot = Some(child);
        drop(slot);
        let (reported, trouble) = read_reports(stdout, total - skip, tx);
        let mut slot = worker.child.lock().unwrap_or_else(|p| p.into_inner());
        let mut child = slot.take().expect("the child stays in its slot while its output is read");
        drop(slot);
        if trouble.is_some() {
            // It may be blocked writing more of what could not be read.
            let _ = child.kill();
        }
        let status = child.wait();
        skip += reported;
        if skip >= total || worker.is_stopped() {
            // Every seed of the part was reported, or the sweep stopped (and killed the worker).
            return;
        }
        // The worker stopped before the end of its part: the seed it was running is lost, and counts as a crash.
        let index = Part { part, parts, skip }.positions(config).next().expect("a seed is left");
        let (seed, first) = config.seed_at(index).expect("positions stay within the run order");
        let exit = match status {
            Ok(status) => status.to_string(),
            Err(error) => format!("unknown exit ({error})"),
        };
        let why = trouble.map_or(String::new(), |t| format!("; {t}"));
        let mut lost = SweepSummary::default();
        lost.add_lost(seed, first, format!("the worker process running this seed died: {exit}{why}"));
        let mut batch = Batch::default();
        batch.add(lost);
        batch.send(tx);
        skip += 1;
    }
}

/// Reads a worker's seed reports until it has sent `expected` or its output ends; returns how many it sent, and
/// what was wrong with the output if anything was. The reading stops at the last report expected rather than
/// at the end of the output, which a paced read would find a pace later.
fn read_reports(stdout: impl Read, expected: u64, tx: &mpsc::Sender<Report>) -> (u64, Option<String>) {
    let mut reader = io::BufReader::with_capacity(1 << 16, Paced::new(stdout, READ_PACE));
    let mut reported = 0;
    // The reports of one read go to the sweep together, so it is woken once per read, not once per seed.
    let mut batch = Batch::default();
    let trouble = loop {
        if reported >= expected {
            break None;
        }
        if reader.buffer().is_empty() {
            // The next read may wait for the worker: what is read so far goes first.
            batch.send(tx);
        }
        let mut tag = [0u8; 1];
        match reader.read(&mut tag) {
            Ok(0) => break None,
            Ok(_) => {}
            Err(error) => break Some(format!("reading its output: {error}")),
        }
        if tag[0] != SEED_REPORT {
            let rest = String::from_utf8_lossy(reader.fill_buf().unwrap_or_default()).into_owned();
            let line = format!("{}{}", tag[0] as char, rest.lines().next().unwrap_or_default());
            let text: String = line.chars().take(80).collect();
            break Some(format!("it wrote {text:?} where a seed report was due"));
        }
        let mut len = [0u8; 4];
        if let Err(error) = reader.read_exact(&mut len) {
            break Some(format!("its output ended inside a seed report: {error}"));
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_REPORT_BYTES {
            break Some(format!("a seed report claimed {len} bytes"));
        }
        let mut bytes = vec![0; len as usize];
        if let Err(error) = reader.read_exact(&mut bytes) {
            break Some(format!("its output ended inside a seed report: {error}"));
        }
        match postcard::from_bytes::<SweepSummary>(&bytes) {
            Ok(summary) => {
                reported += 1;
                batch.add(summary);
            }
            Err(error) => break Some(format!("a seed report did not decode: {error}")),
        }
    };
    batch.send(tx);
    (reported, trouble)
}

/// Seed summaries merged on their way to the sweep, with how many seeds they hold and how many of those failed.
#[derive(Default)]
struct Batch {
    summary: SweepSummary,
    seeds: u64,
    failed: u64,
}

impl Batch {
    /// Adds the summary of one seed.
    fn add(&mut self, seed: SweepSummary) {
        self.seeds += 1;
        self.failed += u64::from(!seed.failures.is_empty());
        self.summary.merge(seed);
    }

    /// Sends what it holds, if anything, and starts empty again.
    fn send(&mut self, tx: &mpsc::Sender<Report>) {
        if self.seeds > 0 {
            let _ = tx.send(Report::Seeds(Box::new(std::mem::take(self))));
        }
    }
}

/// The least time between two reads of a worker's output: a part's last report waits up to this long to be read,
/// which at 20 ms cost a 2,000-seed sweep over two workers a few percent of its speed; at 5 ms a reader still
/// wakes no more than 200 times a second.
const READ_PACE: Duration = Duration::from_millis(5);

/// A reader that reads at most once per `pace`, waiting out the rest of it before a read.
///
/// A worker writes a report the moment a seed is done, a few hundred bytes about a thousand times a second. Read
/// as they come, every report wakes the reading thread, which then takes a core from a worker for a moment: on a
/// 2-core machine that cost a sweep over two workers a tenth of its speed. Paced, the reads take what a pipe
/// holds (64 KiB, far more than a pace's reports), and a worker never waits, as a pipe only blocks its writer
/// when full.
struct Paced<R> {
    inner: R,
    pace: Duration,
    last: Option<Instant>,
}

impl<R> Paced<R> {
    fn new(inner: R, pace: Duration) -> Self {
        Self { inner, pace, last: None }
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(wait) = self.last.and_then(|last| self.pace.checked_sub(last.elapsed())) {
            std::thread::sleep(wait);
        }
        let read = self.inner.read(buf);
        self.last = Some(Instant::now());
        read
    }
}

/// Whether `seed` is run twice for the determinism check when one seed in `every` is (0: none): one seed in each
/// block of `every` consecutive seeds (`k·every .. (k+1)·every`), at an offset that a fixed mix of the block's
/// number decides, so the sample is the same whatever the number of jobs.
///
/// Not simply every `every`-th seed: a sweep over worker processes gives each part every `jobs`-th seed, and with
/// `every` a multiple of `jobs` (50 and 2, the defaults on a 2-core machine) every rerun fell to one part, which
/// then ran about 6% longer than the other in a 2,000-seed sweep, and the sweep with it.
pub fn in_determinism_sample(seed: u64, every: u64) -> bool {
    if every == 0 {
        return false;
    }
    // SplitMix64's output function: a well-spread, fixed function of the block's number.
    let mut mix = (seed / every).wrapping_add(0x9E37_79B9_7F4A_7C15);
    mix = (mix ^ (mix >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mix = (mix ^ (mix >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mix ^= mix >> 31;
    seed % every == mix % every
}

/// What [`run_one`] gives back: the world, its outcome, and its determinism check.
type SeedRun = (Arc<World>, SeedOutcome, Option<Option<Vec<String>>>);

/// Runs one seed, the one at `index` of the run order, and again when it is in the determinism sample: the first
/// seed a sweep runs (so that a short sweep, or a scenario's few pinned seeds, checks one too), and
/// [`in_determinism_sample`]'s. The third value is `None` when not checked, `Some(None)` when the two runs agreed,
/// `Some(Some(lines))` when they did not: the two hashes and the first event where the logs part. A seed whose
/// world the scenario cannot build is an error saying why.
fn run_one(index: u64, seed: u64, config: &SweepConfig) -> Result<SeedRun, String> {
    let world = Arc::new(config.source.try_world(seed)?);
    let every = config.determinism_every;
    let sampled = (index == 0 && every > 0) || in_determinism_sample(seed, every);
    // A sampled seed keeps its log until the second run is compared with it. A seed that must break a kept bug's
    // invariant fails when it holds, and its failure line names the hash.
    let keep = if sampled {
        Keep::Log
    } else if config.source.expect_violation().is_some() {
        Keep::Hash
    } else {
        Keep::Verdict
    };
    let mut outcome = run_world(world.clone(), keep);
    let first_log = outcome.log.take().unwrap_or_default();
    let mismatch = (sampled && outcome.panic.is_none()).then(|| {
        let again = run_world(world.clone(), Keep::Log);
        (again.log_hash != outcome.log_hash).then(|| {
            let hash = |hash: Option<u64>| hash.map_or("none".to_string(), |hash| format!("{hash:016x}"));
            let mut lines = vec![format!(
                "event log hash {} on the first run, {} on the second ({} vs {} events)",
                hash(outcome.log_hash),
                hash(again.log_hash),
                outcome.events,
                again.events
            )];
            lines.extend(crate::events::first_difference(&first_log, again.log.as_deref().unwrap_or_default()));
            lines
        })
    });
    Ok((world, outcome, mismatch))
}

/// Where the simulator catches the catalogued bug `known`, as its catalog entry asks: the first seed of the
/// default sweep within its budget ([`first_detection`]), or, for a bug caught by its scenario, the first pinned
/// seed of the scenario with the bug added, provided every pinned seed catches it. With the invariants broken
/// there (none for a crash); `None` when the bug survived. A catalogued scenario that does not load is an error.
pub fn catalogued_detection(
    known: &crate::catalog::KnownBug,
    jobs: usize,
) -> Result<Option<(u64, Vec<Invariant>)>, String> {
    use crate::catalog::CaughtIn;
    let (file, text) = match known.caught_in {
        CaughtIn::Sweep { budget_seeds } => return Ok(first_detection(known.bugs, budget_seeds, jobs)),
        CaughtIn::Scenario { file, text } => (file, text),
    };
    let scenario = Scenario::parse(file.trim_end_matches(".toml"), file, text).map_err(|e| e.to_string())?;
    let mut first = None;
    for &seed in &scenario.seeds {
        let mut world = scenario.world(seed);
        world.coordinator.bug = known.bugs.coordinator.or(world.coordinator.bug);
        world.shard.bug = known.bugs.shard.or(world.shard.bug);
        world.host_bug = known.bugs.host.or(world.host_bug);
        let outcome = run_world(Arc::new(world), Keep::Verdict);
        // A run that did not go as the scenario says (a decision that never fired) does not catch the bug.
        let invariants: Vec<Invariant> =
            outcome.violations.iter().filter(|v| !v.of_the_scenario).map(|v| v.invariant).collect();
        if invariants.is_empty() && outcome.panic.is_none() {
            return Ok(None);
        }
        first.get_or_insert((seed, invariants));
    }
    Ok(first)
}

/// The first seed of the default sweep, below `budget`, that catches `bugs`, with the invariants it broke.
/// Seeds run `jobs` at a time, in order, so the answer does not depend on the number of jobs.
pub fn first_detection(bugs: Bugs, budget: u64, jobs: usize) -> Option<(u64, Vec<Invariant>)> {
    let params = WorldParams { bugs, ..WorldParams::sweep_default() };
    let jobs = jobs.max(1) as u64;
    let mut start = 0;
    while start < budget {
        let end = (start + jobs).min(budget);
        let caught: Vec<(u64, Vec<Invariant>)> = std::thread::scope(|scope| {
            let runs: Vec<_> = (start..end)
                .map(|seed| {
                    let params = &params;
                    scope.spawn(move || {
                        let outcome = run_world(Arc::new(World::generate(seed, params)), Keep::Verdict);
                        let invariants: Vec<Invariant> = outcome.violations.iter().map(|v| v.invariant).collect();
                        let crashed = outcome.panic.is_some();
                        (seed, invariants, crashed)
                    })
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a seed's thread does not panic"))
                .filter(|(_, invariants, crashed)| !invariants.is_empty() || *crashed)
                .map(|(seed, invariants, _)| (seed, invariants))
                .collect()
        });
        if let Some(first) = caught.into_iter().min_by_key(|(seed, _)| *seed) {
            return Some(first);
        }
        start = end;
    }
    None
}

/// The sweep as JUnit XML: one test case per invariant (failing with the seeds that broke it), one per coverage
/// probe (skipped when no seed hit it: a short sweep may miss a rare one), and one per failing seed with the line
/// that reproduces it.
pub fn junit_xml(summary: &SweepSummary, flags: &str) -> String {
    use std::fmt::Write;
    let escape =
        |text: &str| text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let mut cases = Vec::new();
    for invariant in Invariant::ALL {
        let broken = summary.by_invariant.get(&invariant).copied().unwrap_or(0);
        let failure = (broken > 0).then(|| format!("{broken} seed(s) broke {invariant}"));
        cases.push((format!("invariant {invariant}"), failure));
    }
    for failure in &summary.failures {
        let text = format!("{}\nreproduce: cargo sim repro --seed {}{flags}", failure.lines.join("\n"), failure.seed);
        cases.push((format!("seed {} [{}]", failure.seed, failure.class.name()), Some(text)));
    }
    let failures = cases.iter().filter(|(_, f)| f.is_some()).count();
    let probes: Vec<(Probe, bool)> = Probe::ALL.into_iter().map(|p| (p, summary.probes.contains_key(&p))).collect();
    let mut xml = String::new();
    let _ = writeln!(xml, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        xml,
        r#"<testsuite name="lockstep-sim sweep" tests="{}" failures="{failures}" skipped="{}" time="{:.3}">"#,
        cases.len() + probes.len(),
        probes.iter().filter(|(_, hit)| !hit).count(),
        summary.wall.as_secs_f64()
    );
    let stopped = summary
        .stopped
        .map_or(String::new(), |why| format!(r#"<property name="stopped" value="{}"/>"#, escape(&why.to_string())));
    let _ =
        writeln!(xml, r#"  <properties><property name="seeds" value="{}"/>{stopped}</properties>"#, summary.seeds_run);
    for (name, failure) in cases {
        match failure {
            None => {
                let _ = writeln!(xml, r#"  <testcase classname="lockstep-sim" name="{}"/>"#, escape(&name));
            }
            Some(text) => {
                let _ = writeln!(xml, r#"  <testcase classname="lockstep-sim" name="{}">"#, escape(&name));
                let first = text.lines().next().unwrap_or_default();
                let _ = writeln!(xml, r#"    <failure message="{}">{}</failure>"#, escape(first), escape(&text));
                let _ = writeln!(xml, "  </testcase>");
            }
        }
    }
    for (probe, hit) in probes {
        let name = format!("probe {}", probe.name());
        if hit {
            let _ = writeln!(xml, r#"  <testcase classname="lockstep-sim" name="{name}"/>"#);
        } else {
            let _ = writeln!(
                xml,
                r#"  <testcase classname="lockstep-sim" name="{name}"><skipped message="no seed hit it"/></testcase>"#
            );
        }
    }
    let _ = writeln!(xml, "</testsuite>");
    xml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_seeds_parse_with_comments_and_a_bad_line_is_named() {
        let text = "# kept seeds\n\n17   # caught a bug\n  4\n";
        assert_eq!(parse_regression_seeds("r.txt", text), Ok(vec![17, 4]));
        let error = parse_regression_seeds("r.txt", "17\nseven # no\n").expect_err("refused");
        assert_eq!(error, "r.txt:2: `seven` is not a seed (a whole number)");
    }

    #[test]
    fn regression_seeds_run_first_then_the_range() {
        let config = SweepConfig {
            start: 100,
            seeds: 2,
            pinned: None,
            first: vec![7, 3],
            jobs: 1,
            source: WorldSource::Generated(WorldParams::default()),
            determinism_every: 0,
            stop: StopWhen::default(),
        };
        let order: Vec<_> = (0..5).map(|i| config.seed_at(i)).collect();
        assert_eq!(order, vec![Some((7, true)), Some((3, true)), Some((100, false)), Some((101, false)), None]);
        assert_eq!(config.total_seeds(), 4);
        let summary = run_sweep(&config, &|_| {});
        assert_eq!((summary.seeds_run, summary.regression_seeds), (4, 2));
        assert!(summary.failures.is_empty());
    }

    #[test]
    fn a_regression_seed_in_the_range_runs_once_first_and_the_range_steps_over_it() {
        let config = SweepConfig {
            start: 100,
            seeds: 5,
            pinned: None,
            first: vec![103, 7, 100],
            jobs: 1,
            source: WorldSource::Generated(WorldParams::default()),
            determinism_every: 0,
            stop: StopWhen::default(),
        };
        let order: Vec<_> = (0..7).map(|i| config.seed_at(i)).collect();
        let expected = [(103, true), (7, true), (100, true), (101, false), (102, false), (104, false)];
        assert_eq!(order, expected.iter().copied().map(Some).chain([None]).collect::<Vec<_>>());
        assert_eq!(config.total_seeds(), 6, "5 seeds of the range, one regression seed outside it");
        let summary = run_sweep(&config, &|_| {});
        assert_eq!((summary.seeds_run, summary.regression_seeds), (6, 3));
        // A pinned list steps over its regression seeds the same way.
        let pinned = SweepConfig { pinned: Some(vec![100, 5, 103, 6]), ..config };
        let order: Vec<_> = (0..6).map(|i| pinned.seed_at(i)).collect();
        let expected = [(103, true), (7, true), (100, true), (5, false), (6, false)];
        assert_eq!(order, expected.iter().copied().map(Some).chain([None]).collect::<Vec<_>>());
        assert_eq!(pinned.total_seeds(), 5);
    }

    #[test]
    fn a_range_ending_at_the_last_seed_runs_it_and_only_a_range_past_it_is_refused() {
        assert_eq!(last_seed(u64::MAX, 1), Ok(u64::MAX));
        assert_eq!(last_seed(u64::MAX - 9, 10), Ok(u64::MAX));
        assert_eq!(last_seed(0, u64::MAX), Ok(u64::MAX - 1));
        assert_eq!(last_seed(5, 3), Ok(7));
        assert_eq!(
            last_seed(u64::MAX, 2),
            Err("--start 18446744073709551615 plus --seeds 2 runs past the last seed, 18446744073709551615: \
                 1 seed(s) are left from --start"
                .to_string())
        );
        assert_eq!(last_seed(1, u64::MAX), Ok(u64::MAX));
        assert!(last_seed(2, u64::MAX).is_err());
        assert!(last_seed(3, 0).is_err());
        // The range, its regression seeds and the run order near the end of the seeds, without overflow.
        let config = SweepConfig {
            start: u64::MAX - 2,
            seeds: 3,
            pinned: None,
            first: vec![u64::MAX, 7],
            jobs: 1,
            source: WorldSource::Generated(WorldParams::default()),
            determinism_every: 0,
            stop: StopWhen::default(),
        };
        assert_eq!(config.range_seeds().collect::<Vec<_>>(), vec![u64::MAX - 2, u64::MAX - 1, u64::MAX]);
        assert_eq!(config.regression_seeds_in_range(), vec![u64::MAX], "the last seed is in the range");
        assert_eq!(config.total_seeds(), 4, "the last seed runs once, first");
        let order: Vec<_> = (0..5).map(|i| config.seed_at(i)).collect();
        let expected = [(u64::MAX, true), (7, true), (u64::MAX - 2, false), (u64::MAX - 1, false)];
        assert_eq!(order, expected.iter().copied().map(Some).chain([None]).collect::<Vec<_>>());
        // Every seed from 1, after regression seed 0 outside the range: more runs than a u64 counts.
        let nearly_all = SweepConfig { start: 1, seeds: u64::MAX, first: vec![0], ..config.clone() };
        assert_eq!(nearly_all.total_seeds(), u64::MAX);
        assert_eq!((nearly_all.seed_at(0), nearly_all.seed_at(1)), (Some((0, true)), Some((1, false))));
        let last = SweepConfig { start: u64::MAX, seeds: 1, first: Vec::new(), ..config };
        assert_eq!(last.range_seeds().collect::<Vec<_>>(), vec![u64::MAX]);
        assert_eq!((last.seed_at(0), last.seed_at(1)), (Some((u64::MAX, false)), None));
    }

    #[test]
    fn words_of_a_printed_command_line_are_quoted_for_a_shell_only_when_they_need_it() {
        for plain in ["scenarios/second-restore-refused.toml", "/tmp/a_b-c.toml", "skip-checksum", "3", "x=y,z:1@%+"] {
            assert_eq!(shell_quote(plain), plain);
        }
        assert_eq!(shell_quote("my scenarios/a b.toml"), "'my scenarios/a b.toml'");
        assert_eq!(shell_quote("it's.toml"), r"'it'\''s.toml'");
        assert_eq!(shell_quote("a;rm -rf x"), "'a;rm -rf x'");
        assert_eq!(shell_quote("$HOME/*.toml"), "'$HOME/*.toml'");
        assert_eq!(shell_quote("~/x.toml"), "'~/x.toml'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_seed_whose_world_a_scenario_cannot_build_fails_with_the_reason_instead_of_a_panic() {
        // The index table's shard count is drawn per seed: seeds 1 and 3 have one shard, 0 and 2 have two.
        let text = "description = \"names an index tablet some seeds lack\"\nseeds = [0]\n\
                    [generate]\ntables = 1\nshards = 2\nindexes = true\n\
                    [[fault]]\ndo = \"reboot-shard\"\ntablet = \"table0/by_value/1\"\n";
        let scenario = Scenario::parse("idx", "idx.toml", text).expect("seed 0 has the tablet");
        let config = SweepConfig {
            start: 0,
            seeds: 4,
            pinned: None,
            first: Vec::new(),
            jobs: 2,
            source: WorldSource::Scenario(Arc::new(scenario), Bugs::default()),
            determinism_every: 0,
            stop: StopWhen::default(),
        };
        let summary = run_sweep(&config, &|_| {});
        assert_eq!(summary.seeds_run, 4);
        let failed: Vec<(u64, FailureClass)> = summary.failures.iter().map(|f| (f.seed, f.class)).collect();
        assert_eq!(failed, vec![(1, FailureClass::Crash), (3, FailureClass::Crash)]);
        let why = &summary.failures[0].lines[0];
        assert!(why.contains("with seed 1: table `table0/by_value` has 1 shard(s), no shard 1"), "{why}");
    }

    #[test]
    fn a_seed_listed_twice_in_the_regression_file_runs_once() {
        assert_eq!(parse_regression_seeds("r.txt", "4\n9\n4 # again\n"), Ok(vec![4, 9]));
    }

    fn config(seeds: u64, jobs: usize) -> SweepConfig {
        SweepConfig {
            start: 100,
            seeds,
            pinned: None,
            first: vec![7],
            jobs,
            source: WorldSource::Generated(WorldParams::default()),
            determinism_every: 0,
            stop: StopWhen::default(),
        }
    }

    #[test]
    fn parts_share_out_the_run_order_exactly_and_skip_what_was_run() {
        let config = config(9, 3);
        let mut all: Vec<u64> =
            (0..3).flat_map(|part| Part { part, parts: 3, skip: 0 }.positions(&config).collect::<Vec<_>>()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let part = Part { part: 1, parts: 3, skip: 2 };
        assert_eq!(part.positions(&config).collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn the_reports_of_every_part_add_up_to_the_summary_of_one_sweep() {
        let config = config(5, 2);
        let mut expected = run_sweep(&config, &|_| {});
        let mut merged = SweepSummary::default();
        for part in 0..2 {
            let mut out = Vec::new();
            serve_part(&config, Part { part, parts: 2, skip: 0 }, &mut out).expect("writes to memory");
            let (tx, rx) = mpsc::channel();
            let (reported, trouble) = read_reports(out.as_slice(), u64::MAX, &tx);
            drop(tx);
            assert_eq!(trouble, None);
            assert_eq!(reported, [3, 3][part as usize]);
            for report in rx {
                let Report::Seeds(batch) = report else { panic!("only seed reports") };
                merged.merge(batch.summary);
            }
        }
        merged.failures.sort_by_key(|f| (f.seed, f.class));
        (expected.wall, merged.wall) = (Duration::ZERO, Duration::ZERO);
        assert_eq!(merged, expected);
        assert_eq!(merged.seeds_run, 6);
    }

    /// A worker that prints `output` and exits with status 3, whatever it is asked.
    fn failing_worker(output: &str) -> WorkerCommand {
        let script = format!("printf '{output}'; exit 3");
        WorkerCommand { program: "sh".into(), args: vec!["-c".into(), script.into(), "worker".into()] }
    }

    #[test]
    fn a_worker_that_dies_costs_the_seed_it_was_running_as_a_crash_and_a_new_worker_takes_the_rest() {
        let config = config(3, 2);
        // A worker that writes something else is stopped at once, so its exit status is 3 or the kill's signal.
        let writes_nonsense = "; it wrote \"nonsense\" where a seed report was due";
        for (output, ending) in [("", "exit status: 3"), ("nonsense", writes_nonsense)] {
            let ticks = AtomicU64::new(0);
            let failed = AtomicU64::new(0);
            let summary = run_sweep_in_processes(&config, &failing_worker(output), &|progress| {
                ticks.store(progress.done, Ordering::Relaxed);
                failed.store(progress.failed, Ordering::Relaxed);
            })
            .expect("workers start");
            assert_eq!((summary.seeds_run, summary.regression_seeds, summary.ended_unfinished), (4, 1, 4));
            assert_eq!(ticks.load(Ordering::Relaxed), 4);
            assert_eq!(failed.load(Ordering::Relaxed), 4, "every seed a crash");
            let seeds: Vec<u64> = summary.failures.iter().map(|f| f.seed).collect();
            assert_eq!(seeds, vec![7, 100, 101, 102]);
            for failure in &summary.failures {
                assert_eq!(failure.class, FailureClass::Crash);
                let line = &failure.lines[0];
                assert!(line.starts_with("the worker process running this seed died: "), "{line}");
                assert!(line.ends_with(ending), "{line}");
            }
        }
    }

    #[test]
    fn a_damaged_report_stops_the_reading_with_what_was_wrong() {
        let config = config(1, 1);
        let mut good = Vec::new();
        serve_part(&config, Part { part: 0, parts: 2, skip: 0 }, &mut good).expect("writes to memory");
        let cases: [(Vec<u8>, &str); 4] = [
            (vec![b'R', 0xff, 0xff, 0xff, 0xff], "a seed report claimed 4294967295 bytes"),
            (vec![b'R', 9, 0], "its output ended inside a seed report: failed to fill whole buffer"),
            (vec![b'R', 3, 0, 0, 0, 0xff, 0xff, 0xff], "a seed report did not decode: "),
            ([b"x".repeat(100), b"\nmore".to_vec()].concat(), &format!("it wrote \"{}\"", "x".repeat(80))),
        ];
        for (damaged, trouble) in cases {
            let (tx, rx) = mpsc::channel();
            let (reported, found) = read_reports([good.as_slice(), &damaged].concat().as_slice(), u64::MAX, &tx);
            drop(tx);
            assert_eq!(reported, 1, "the good report before it counts");
            let seeds: u64 = rx.into_iter().map(|r| if let Report::Seeds(batch) = r { batch.seeds } else { 0 }).sum();
            assert_eq!(seeds, 1);
            let found = found.expect("trouble");
            assert!(found.starts_with(trouble), "{found}");
        }
    }

    #[test]
    fn progress_lines_come_once_per_interval_and_say_how_far_the_sweep_is() {
        let lines = ProgressLines::new(Duration::from_secs(30), Some(10_000), None);
        let at = |seconds: u64, done: u64, failed: u64| {
            lines.due_at(Duration::from_secs(seconds), Progress { done, failed })
        };
        assert_eq!(at(29, 100, 0), None, "not yet due");
        assert_eq!(
            at(30, 3_000, 1).as_deref(),
            Some("progress: 3000 of 10000 seeds (30%), 1 failed, 30s elapsed, 100 seeds/s, about 1m10s left")
        );
        assert_eq!(at(31, 3_100, 1), None, "one line per interval");
        // A long seed kept the sweep from telling: one line, and the next is due at the next whole interval.
        assert!(at(95, 9_500, 1).is_some());
        assert_eq!(at(119, 9_900, 1), None);
        assert!(at(120, 9_999, 1).is_some());
        let limited = progress_line(
            Progress { done: 5_469, failed: 0 },
            Duration::from_secs(3_725),
            None,
            Some(Duration::from_secs(7_200)),
        );
        assert_eq!(limited, "progress: 5469 seeds, 0 failed, 1h02m elapsed of 2h, 1 seeds/s");
        let done = progress_line(Progress { done: 10, failed: 10 }, Duration::from_secs(65), Some(10), None);
        assert_eq!(done, "progress: 10 of 10 seeds (100%), 10 failed, 1m05s elapsed, 0 seeds/s");
    }

    #[test]
    fn a_paced_reader_passes_every_byte_on_and_reads_no_sooner_than_its_pace() {
        /// Gives one byte per read, as a pipe written a little at a time does.
        struct Trickle(Vec<u8>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0.remove(0);
                Ok(1)
            }
        }
        let pace = Duration::from_millis(5);
        let mut paced = Paced::new(Trickle(b"report".to_vec()), pace);
        let began = Instant::now();
        let mut read = Vec::new();
        paced.read_to_end(&mut read).expect("reads from memory");
        assert_eq!(read, b"report");
        // Seven reads (the last finds the end), each after the pace since the one before.
        assert!(began.elapsed() >= pace * 6, "read too soon: {:?}", began.elapsed());
    }

    #[test]
    fn a_worker_that_cannot_be_started_is_an_error_naming_the_program() {
        let command = WorkerCommand { program: "/nonexistent/lockstep-sim".into(), args: Vec::new() };
        let error = run_sweep_in_processes(&config(3, 2), &command, &|_| {}).expect_err("no worker");
        assert!(error.starts_with("cannot start a sweep worker (/nonexistent/lockstep-sim): "), "{error}");
    }

    /// A sweep of seeds 0..300 of the default world with the skip-checksum bug (seed 3 is its first failure).
    fn buggy(jobs: usize, stop: StopWhen) -> SweepConfig {
        let bugs = crate::catalog::parse(&["skip-checksum"]).expect("a catalogued bug");
        let source = WorldSource::Generated(WorldParams { bugs, ..WorldParams::sweep_default() });
        SweepConfig { start: 0, seeds: 300, pinned: None, first: Vec::new(), jobs, source, determinism_every: 0, stop }
    }

    #[test]
    fn a_sweep_over_threads_stops_at_its_first_failure_when_asked() {
        let stop = StopWhen { first_failure: true, time_limit: None };
        let last = Mutex::new(Progress::default());
        let summary = run_sweep(&buggy(2, stop), &|progress| *last.lock().unwrap() = progress);
        assert_eq!(summary.stopped, Some(Stopped::FirstFailure));
        let failed = summary.failures.iter().map(|f| f.seed).collect::<std::collections::BTreeSet<_>>().len() as u64;
        assert_eq!(*last.lock().unwrap(), Progress { done: summary.seeds_run, failed }, "the last progress told");
        assert!(summary.failures.iter().any(|f| f.seed == 3), "{:?}", summary.failures);
        assert!(summary.seeds_run < 20, "stopped soon after seed 3: {} seeds run", summary.seeds_run);
        let xml = junit_xml(&summary, "");
        assert!(xml.contains(r#"<property name="stopped" value="at the first failure (--fail-fast)"/>"#), "{xml}");
        let whole = run_sweep(&buggy(2, StopWhen::default()), &|_| {});
        assert_eq!((whole.stopped, whole.seeds_run), (None, 300), "without the flag every seed runs");
    }

    #[test]
    fn a_sweep_over_threads_starts_no_seed_after_its_time_limit() {
        let stop = StopWhen { first_failure: false, time_limit: Some(Duration::from_nanos(1)) };
        let summary = run_sweep(&config(50, 2), &|_| {}).seeds_run;
        assert_eq!(summary, 51, "no limit, every seed");
        let summary = run_sweep(&SweepConfig { stop, ..config(50, 2) }, &|_| {});
        assert_eq!(summary.stopped, Some(Stopped::TimeLimit(Duration::from_nanos(1))));
        assert_eq!(summary.seeds_run, 0, "the limit had passed before the first seed");
    }

    /// A worker that writes `reports` (the bytes of seed reports) and then sleeps for a minute.
    fn slow_worker(reports: &[u8], dir: &tempfile::TempDir) -> WorkerCommand {
        let file = dir.path().join("reports");
        std::fs::write(&file, reports).expect("a temporary file");
        // `exec`: the kill must reach the process holding the output open, not a shell waiting on it.
        let script = format!("cat '{}'; exec sleep 60", file.display());
        WorkerCommand { program: "sh".into(), args: vec!["-c".into(), script.into(), "worker".into()] }
    }

    #[test]
    fn a_sweep_over_processes_stops_at_its_time_limit_or_first_failure_and_kills_its_workers() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut failing = Vec::new();
        let seed_3 = SweepConfig { start: 3, seeds: 1, ..buggy(1, StopWhen::default()) };
        serve_part(&seed_3, Part { part: 0, parts: 1, skip: 0 }, &mut failing).expect("writes to memory");
        let time_limit = Some(Duration::from_millis(300));
        let cases = [
            (StopWhen { first_failure: false, time_limit }, Vec::new(), Stopped::TimeLimit(Duration::from_millis(300))),
            (StopWhen { first_failure: true, time_limit: None }, failing, Stopped::FirstFailure),
        ];
        for (stop, reports, stopped) in cases {
            let began = Instant::now();
            let summary =
                run_sweep_in_processes(&buggy(2, stop), &slow_worker(&reports, &dir), &|_| {}).expect("workers start");
            assert!(began.elapsed() < Duration::from_secs(30), "the sleeping workers were killed, not waited for");
            assert_eq!(summary.stopped, Some(stopped));
            // Each worker writes the reports it was given, unless the first report stopped the sweep before the
            // other wrote it; a killed worker is not a crash.
            let seeds: Vec<(u64, FailureClass)> = summary.failures.iter().map(|f| (f.seed, f.class)).collect();
            if reports.is_empty() {
                assert_eq!((seeds, summary.seeds_run), (vec![], 0));
            } else {
                assert!(seeds == [(3, FailureClass::Safety)] || seeds == [(3, FailureClass::Safety); 2], "{seeds:?}");
                assert_eq!(summary.seeds_run, seeds.len() as u64);
            }
        }
    }

    #[test]
    fn the_determinism_sample_takes_one_seed_a_block_and_spreads_them_over_worker_parts() {
        for every in [1, 2, 10, 50, 97] {
            for block in 0..400u64 {
                let sampled = (block * every..(block + 1) * every).filter(|&s| in_determinism_sample(s, every));
                assert_eq!(sampled.count(), 1, "block {block} of {every}");
            }
        }
        assert!((0..1_000).all(|seed| !in_determinism_sample(seed, 0)));
        // The seeds of 2,000 go to 2 to 5 parts by position; the 40 sampled ones must not crowd into one part.
        let sampled: Vec<u64> = (0..2_000).filter(|&seed| in_determinism_sample(seed, 50)).collect();
        for parts in 2..=5u64 {
            let share = |part: u64| sampled.iter().filter(|&&seed| seed % parts == part).count();
            let fair = sampled.len() / parts as usize;
            for part in 0..parts {
                assert!(share(part).abs_diff(fair) <= fair / 2 + 1, "{parts} parts: part {part} has {}", share(part));
            }
        }
        // The last block of the seeds is cut short (16 seeds of 50): it holds the block's seed or none.
        let last_block = u64::MAX - u64::MAX % 50;
        assert!((last_block..=u64::MAX).filter(|&seed| in_determinism_sample(seed, 50)).count() <= 1);
    }

    #[test]
    fn durations_are_whole_seconds_minutes_or_hours_and_read_back_as_written() {
        for (text, seconds) in [("90s", 90), ("10m", 600), ("2h", 7200), ("45", 45), (" 3m ", 180)] {
            let duration = parse_duration(text).expect(text);
            assert_eq!(duration, Duration::from_secs(seconds), "{text}");
            assert_eq!(parse_duration(&duration_text(duration)), Ok(duration), "{text}");
        }
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
        for (text, problem) in [
            ("0", "must be more than zero"),
            ("0h", "must be more than zero"),
            ("1.5m", "is not a duration"),
            ("m", "is not a duration"),
            ("-1s", "is not a duration"),
            ("10 minutes", "is not a duration"),
            ("99999999999999999999s", "is not a duration"),
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(problem) && error.contains(&format!("`{text}`")), "{text}: {error}");
        }
    }
}
