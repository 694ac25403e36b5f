//! The catalog of known bugs: deliberately faulty variants of the production logic, each a class of bug that
//! real restore systems have shipped. The simulator must catch every one (`cargo sim mutants`, and a test): within
//! its seed budget of the default sweep, or, for a bug the default sweep shows too rarely, on every pinned seed of
//! its scenario. The explorer finds each one its world can reach with a shortest counterexample.

use lockstep::coordinator::CoordinatorBug;
use lockstep::host::HostBug;
use lockstep::shard::ShardBug;

use crate::world::Bugs;

/// One catalogued bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownBug {
    /// The name `--bug` and scenario files use.
    pub name: &'static str,
    /// What goes wrong, in a line.
    pub summary: &'static str,
    pub bugs: Bugs,
    /// Where the simulator must catch it.
    pub caught_in: CaughtIn,
}

/// Where the simulator must catch a catalogued bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaughtIn {
    /// Within this many seeds of the default sweep.
    Sweep { budget_seeds: u64 },
    /// On every pinned seed of this scenario (its file name under `scenarios/`, and its text): for a bug the
    /// default sweep's worlds show too rarely for a seed budget (a table restored again, which only a world that
    /// lost an object and got it back does, with a late request of the first restore landing after the second).
    Scenario { file: &'static str, text: &'static str },
}

impl KnownBug {
    /// The seed budget of the default sweep, for a bug the sweep must catch.
    pub fn budget_seeds(&self) -> Option<u64> {
        match self.caught_in {
            CaughtIn::Sweep { budget_seeds } => Some(budget_seeds),
            CaughtIn::Scenario { .. } => None,
        }
    }
}

const fn sweep(budget_seeds: u64) -> CaughtIn {
    CaughtIn::Sweep { budget_seeds }
}

const fn coordinator(bug: CoordinatorBug) -> Bugs {
    Bugs { coordinator: Some(bug), shard: None, host: None }
}

const fn shard(bug: ShardBug) -> Bugs {
    Bugs { coordinator: None, shard: Some(bug), host: None }
}

const fn host(bug: HostBug) -> Bugs {
    Bugs { coordinator: None, shard: None, host: Some(bug) }
}

pub const CATALOG: [KnownBug; 20] = [
    KnownBug {
        name: "advance-on-first-report",
        summary: "the coordinator moves to the next increment when the first tablet reports, not the last",
        bugs: coordinator(CoordinatorBug::AdvanceOnFirstReport),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "tables-run-ahead",
        summary: "a table starts increment k+1 as soon as it is done with k, while other tables still apply k",
        bugs: coordinator(CoordinatorBug::TablesRunAhead),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "lost-report-is-success",
        summary: "a request whose report never came back is taken for success",
        bugs: coordinator(CoordinatorBug::LostReportIsSuccess),
        caught_in: sweep(300),
    },
    KnownBug {
        name: "transient-is-permanent",
        summary: "a transient failure ends the restore instead of being retried",
        bugs: coordinator(CoordinatorBug::TransientIsPermanent),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "incrementals-before-newest-full",
        summary: "the chain starts at the oldest full backup and applies incrementals the newest full replaced",
        bugs: coordinator(CoordinatorBug::IncrementalsBeforeNewestFull),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "done-on-first-final-report",
        summary: "the coordinator declares the restore Done when the first tablet reports the last increment",
        bugs: coordinator(CoordinatorBug::DoneOnFirstFinalReport),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "restart-chain-on-reboot",
        summary: "after a reboot the coordinator starts the chain over from the full backup instead of resuming",
        bugs: coordinator(CoordinatorBug::RestartChainOnReboot),
        caught_in: sweep(100),
    },
    KnownBug {
        name: "lost-request-waits-forever",
        summary: "a request whose reply never comes is waited for forever, neither timed out nor retried",
        bugs: coordinator(CoordinatorBug::LostRequestWaitsForever),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "final-work-every-segment",
        summary: "a restore in segments makes its tables readable at the end of every segment, not only the last",
        bugs: coordinator(CoordinatorBug::FinalWorkEverySegment),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "segment-end-is-done",
        summary: "a restore in segments ends Done when a segment that is not the last ends",
        bugs: coordinator(CoordinatorBug::SegmentEndIsDone),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "segment-restarts-chain",
        summary: "a continued segment starts the chain over from the full backup instead of where the last one ended",
        bugs: coordinator(CoordinatorBug::SegmentRestartsChain),
        caught_in: sweep(50),
    },
    KnownBug {
        name: "cancel-keeps-hold",
        summary: "a cancelled restore ends Failed but keeps its tables restoring and its collection in use",
        bugs: coordinator(CoordinatorBug::CancelKeepsHold),
        caught_in: sweep(100),
    },
    KnownBug {
        name: "cancel-answers-ended",
        summary: "a cancel that comes after the restore ended Done is answered cancelled, and the restore stays Done",
        bugs: coordinator(CoordinatorBug::CancelAnswersEnded),
        caught_in: sweep(100),
    },
    KnownBug {
        name: "cancel-overwrites-end",
        summary: "a cancel that comes after the restore ended Done turns it into a failed one, its tables unreadable",
        bugs: coordinator(CoordinatorBug::CancelOverwritesEnd),
        caught_in: sweep(100),
    },
    KnownBug {
        name: "skip-checksum",
        summary: "a shard applies a downloaded bundle without verifying its checksum",
        bugs: shard(ShardBug::SkipChecksum),
        caught_in: sweep(100),
    },
    KnownBug {
        name: "reply-before-persist",
        summary: "a shard reports an increment applied before the write that makes it true is durable",
        bugs: shard(ShardBug::ReplyBeforePersist),
        caught_in: sweep(300),
    },
    KnownBug {
        name: "marker-before-rows",
        summary: "a shard makes the applied marker and the rows durable in two syncs, the marker first",
        bugs: shard(ShardBug::MarkerBeforeRows),
        caught_in: sweep(300),
    },
    KnownBug {
        name: "reapply-old-increments",
        summary: "a shard applies a late or duplicated request for an increment it already applied, again",
        bugs: shard(ShardBug::ReapplyOldIncrements),
        caught_in: sweep(300),
    },
    KnownBug {
        name: "apply-older-operations",
        summary: "a shard takes a late request of a restore that ended over the rows of a newer restore of the table",
        bugs: shard(ShardBug::ApplyOlderOperations),
        caught_in: CaughtIn::Scenario {
            file: "late-request-of-a-failed-restore.toml",
            text: include_str!("../../scenarios/late-request-of-a-failed-restore.toml"),
        },
    },
    KnownBug {
        name: "keep-ended-chains",
        summary: "the host never removes an ended operation's restore chain from the coordinator's disk",
        bugs: host(HostBug::KeepEndedChains),
        caught_in: sweep(50),
    },
];

/// The catalogued bug called `name`.
pub fn by_name(name: &str) -> Option<&'static KnownBug> {
    CATALOG.iter().find(|b| b.name == name)
}

/// Every catalogued name, for messages.
pub fn names() -> Vec<&'static str> {
    CATALOG.iter().map(|b| b.name).collect()
}

/// The names of the bugs in `bugs`.
pub fn names_of(bugs: Bugs) -> Vec<&'static str> {
    let mut names = Vec::new();
    for known in &CATALOG {
        let coordinator = known.bugs.coordinator.is_some() && known.bugs.coordinator == bugs.coordinator;
        let shard = known.bugs.shard.is_some() && known.bugs.shard == bugs.shard;
        let host = known.bugs.host.is_some() && known.bugs.host == bugs.host;
        if coordinator || shard || host {
            names.push(known.name);
        }
    }
    names
}

/// Parses a list of names into one set of bugs (at most one coordinator bug, one shard bug and one host bug).
pub fn parse(names: &[&str]) -> Result<Bugs, String> {
    let mut bugs = Bugs::default();
    for name in names {
        let known =
            by_name(name).ok_or_else(|| format!("unknown bug `{name}`; known: {}", self::names().join(", ")))?;
        if let Some(bug) = known.bugs.coordinator {
            if bugs.coordinator.is_some_and(|b| b != bug) {
                return Err(format!("`{name}` is a second coordinator bug; run one at a time"));
            }
            bugs.coordinator = Some(bug);
        }
        if let Some(bug) = known.bugs.shard {
            if bugs.shard.is_some_and(|b| b != bug) {
                return Err(format!("`{name}` is a second shard bug; run one at a time"));
            }
            bugs.shard = Some(bug);
        }
        if let Some(bug) = known.bugs.host {
            if bugs.host.is_some_and(|b| b != bug) {
                return Err(format!("`{name}` is a second host bug; run one at a time"));
            }
            bugs.host = Some(bug);
        }
    }
    Ok(bugs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for known in &CATALOG {
            assert_eq!(parse(&[known.name]), Ok(known.bugs));
            assert_eq!(names_of(known.bugs), vec![known.name]);
        }
        assert!(parse(&["nope"]).unwrap_err().contains("unknown bug `nope`"));
        assert!(parse(&["advance-on-first-report", "tables-run-ahead"]).unwrap_err().contains("second coordinator"));
    }
}
