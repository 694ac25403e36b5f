//! The decision tape: every fault a run's dice decided, written down so that the run can be replayed without
//! dice, and shrunk by taking decisions away.
//!
//! A fault is decided at a *chance*: a point where a node could be hit by a fault of some kind. Chances are
//! counted per node and kind, so "the 4th chance of `message-drop` at `t0/shard-1`" names the same point of a run
//! however the simulated clock moves: the 4th message that shard sends. The chances of each kind are:
//! - `message-drop`, `message-duplicate`, `message-delay`: each message the node sends (a dropped message is
//!   not rolled for duplication or delay);
//! - `download-partial`, `download-truncated`, `download-corrupt`, `store-unavailable`, `store-throttled`,
//!   `store-slow`: each ranged read the node (a shard) asks of the store, as the store's code rolls them;
//! - `crash-before-sync`, `crash-after-persist`: each persist of the node;
//! - `disk-torn-write`: each crash of the node.
//!
//! Random reboots are decided by time instead: the supervisor kills a node at a moment of simulated time.
//!
//! A run with a tape rolls no dice: a fault fires exactly at the chances the tape lists (and never after
//! healing). Everything else a fault needs (how long a delay is, how much of a read arrives, which byte flips,
//! how long a node stays down) still comes from the seed, from a stream apart from the dice, so a run replayed
//! from its own tape is the same run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use lockstep::protocol::NodeAddr;

use crate::faults::FaultKind;

/// One chance at which a fault fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chance {
    pub node: NodeAddr,
    pub kind: FaultKind,
    /// Counting from 0: the node's chances of this kind before this one.
    pub nth: u32,
}

/// A random reboot: `node` is killed at `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reboot {
    pub at_ms: u64,
    pub node: NodeAddr,
}

impl Reboot {
    pub fn kind(&self) -> FaultKind {
        match self.node {
            NodeAddr::Coordinator => FaultKind::CoordinatorReboot,
            _ => FaultKind::ShardReboot,
        }
    }
}

/// The decisions of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tape {
    pub chances: BTreeSet<Chance>,
    /// In time order.
    pub reboots: Vec<Reboot>,
    /// How long (ms) the message of a `message-delay` chance is held, where a scenario pins it; every other delay
    /// comes from the seed.
    pub delays: BTreeMap<Chance, u64>,
}

impl Tape {
    pub fn len(&self) -> usize {
        self.chances.len() + self.reboots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every decision, reboots first, as one list (the order the shrinker takes them away in).
    pub fn decisions(&self) -> Vec<Decision> {
        let reboots = self.reboots.iter().copied().map(Decision::Reboot);
        reboots.chain(self.chances.iter().copied().map(Decision::Chance)).collect()
    }

    pub fn from_decisions(decisions: impl IntoIterator<Item = Decision>) -> Self {
        let mut tape = Tape::default();
        for decision in decisions {
            match decision {
                Decision::Chance(chance) => {
                    tape.chances.insert(chance);
                }
                Decision::Reboot(reboot) => tape.reboots.push(reboot),
            }
        }
        tape.reboots.sort();
        tape
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decision {
    Chance(Chance),
    Reboot(Reboot),
}

impl Decision {
    /// The node whose chance or reboot the decision is.
    pub fn node(&self) -> NodeAddr {
        match self {
            Decision::Chance(chance) => chance.node,
            Decision::Reboot(reboot) => reboot.node,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Chance(c) => write!(f, "{} at chance {} of {}", c.kind, c.nth, c.node),
            Decision::Reboot(r) => write!(f, "{} of {} at {} ms", r.kind(), r.node, r.at_ms),
        }
    }
}
