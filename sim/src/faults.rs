//! The fault vocabulary and the per-seed fault mix (swarm testing).
//!
//! Every seed switches each fault kind on or off with probability one half and draws its own rate, so some
//! seeds hammer one fault while others combine many. Faults stop at the heal time; after it the restore must
//! reach its expected outcome within the liveness bound.

use std::fmt;

use rand::Rng;

/// Every kind of fault the simulator injects. The order is the order of the sweep summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The coordinator node is killed at a random moment and restarted.
    CoordinatorReboot,
    /// A shard node is killed at a random moment and restarted.
    ShardReboot,
    /// A node crashes after writing its state and before syncing it (mid-apply for a shard).
    CrashBeforeSync,
    /// A node crashes after its state is durable and before the outputs after it (between write and reply).
    CrashAfterPersist,
    /// A protocol message is lost.
    MessageDrop,
    /// A protocol message is delivered twice.
    MessageDuplicate,
    /// A protocol message is held back, so later ones overtake it.
    MessageDelay,
    /// A ranged read returns fewer bytes than asked; the reader must resume.
    DownloadPartial,
    /// A ranged read reports the object shorter than it is, as a cut-off transfer does.
    DownloadTruncated,
    /// A ranged read returns a flipped byte.
    DownloadCorrupt,
    /// The store answers a read with a transient error.
    StoreUnavailable,
    /// The store answers a read with "slow down, retry after".
    StoreThrottled,
    /// The store answers a read late, sometimes past the reader's timeout.
    StoreSlow,
    /// A crash lost writes that were not synced (a consequence of a crash, counted when it happens).
    DiskLostWrite,
    /// A crash tore the last unsynced write: part of it reached the disk.
    DiskTornWrite,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::CoordinatorReboot,
        FaultKind::ShardReboot,
        FaultKind::CrashBeforeSync,
        FaultKind::CrashAfterPersist,
        FaultKind::MessageDrop,
        FaultKind::MessageDuplicate,
        FaultKind::MessageDelay,
        FaultKind::DownloadPartial,
        FaultKind::DownloadTruncated,
        FaultKind::DownloadCorrupt,
        FaultKind::StoreUnavailable,
        FaultKind::StoreThrottled,
        FaultKind::StoreSlow,
        FaultKind::DiskLostWrite,
        FaultKind::DiskTornWrite,
    ];

    /// Position in [`FaultKind::ALL`], which lists the kinds in declaration order.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::CoordinatorReboot => "coordinator-reboot",
            FaultKind::ShardReboot => "shard-reboot",
            FaultKind::CrashBeforeSync => "crash-before-sync",
            FaultKind::CrashAfterPersist => "crash-after-persist",
            FaultKind::MessageDrop => "message-drop",
            FaultKind::MessageDuplicate => "message-duplicate",
            FaultKind::MessageDelay => "message-delay",
            FaultKind::DownloadPartial => "download-partial",
            FaultKind::DownloadTruncated => "download-truncated",
            FaultKind::DownloadCorrupt => "download-corrupt",
            FaultKind::StoreUnavailable => "store-unavailable",
            FaultKind::StoreThrottled => "store-throttled",
            FaultKind::StoreSlow => "store-slow",
            FaultKind::DiskLostWrite => "disk-lost-write",
            FaultKind::DiskTornWrite => "disk-torn-write",
        }
    }

    /// The range a seed draws this kind's rate from, when the kind is on. Reboots are per second of simulated
    /// time; everything else is a probability per opportunity (per message, per read, per crash, per persist).
    fn rate_range(self) -> (f64, f64) {
        match self {
            FaultKind::CoordinatorReboot | FaultKind::ShardReboot => (0.05, 0.6),
            FaultKind::CrashBeforeSync | FaultKind::CrashAfterPersist => (0.02, 0.15),
            FaultKind::MessageDrop | FaultKind::MessageDuplicate | FaultKind::MessageDelay => (0.02, 0.3),
            FaultKind::DownloadPartial => (0.05, 0.5),
            FaultKind::DownloadTruncated | FaultKind::DownloadCorrupt => (0.02, 0.2),
            FaultKind::StoreUnavailable | FaultKind::StoreThrottled | FaultKind::StoreSlow => (0.02, 0.25),
            // Lost writes are not drawn: they follow from crashes. The rate is the chance a crash tears.
            FaultKind::DiskLostWrite => (1.0, 1.0),
            FaultKind::DiskTornWrite => (0.2, 0.8),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-kind counters, indexed by [`FaultKind`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaultCounts([u64; FaultKind::ALL.len()]);

impl FaultCounts {
    pub fn add(&mut self, kind: FaultKind) {
        self.0[kind.index()] += 1;
    }

    pub fn get(&self, kind: FaultKind) -> u64 {
        self.0[kind.index()]
    }

    pub fn merge(&mut self, other: &FaultCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0.iter()) {
            *mine += theirs;
        }
    }
}

/// The fault mix of one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    /// Rate per kind; 0 means off.
    rates: [f64; FaultKind::ALL.len()],
    /// Simulated time at which faults stop.
    pub heal_at_ms: u64,
}

impl FaultPlan {
    /// No faults at all.
    pub fn none() -> Self {
        Self { rates: [0.0; FaultKind::ALL.len()], heal_at_ms: 0 }
    }

    /// Every kind on, each at the middle of its range.
    pub fn all(heal_at_ms: u64) -> Self {
        let mut plan = Self::none();
        plan.heal_at_ms = heal_at_ms;
        for kind in FaultKind::ALL {
            let (low, high) = kind.rate_range();
            plan.rates[kind.index()] = (low + high) / 2.0;
        }
        plan
    }

    /// The swarm draw: each kind on with probability one half, with a rate from its range.
    pub fn swarm(rng: &mut impl Rng, heal_at_ms: u64) -> Self {
        let mut plan = Self::none();
        plan.heal_at_ms = heal_at_ms;
        for kind in FaultKind::ALL {
            let on = rng.gen_bool(0.5) || kind == FaultKind::DiskLostWrite;
            let (low, high) = kind.rate_range();
            let rate = if high > low { rng.gen_range(low..high) } else { low };
            plan.rates[kind.index()] = if on { rate } else { 0.0 };
        }
        plan
    }

    pub fn rate(&self, kind: FaultKind) -> f64 {
        self.rates[kind.index()]
    }

    pub fn set_rate(&mut self, kind: FaultKind, rate: f64) {
        self.rates[kind.index()] = rate;
    }

    pub fn enabled(&self) -> impl Iterator<Item = FaultKind> + '_ {
        FaultKind::ALL.into_iter().filter(|k| self.rate(*k) > 0.0)
    }
}

/// Flips the bits of `mask` in byte `at` of a read's bytes, which are shared with the stored object: the read
/// gets a damaged copy of its own and the object stays intact.
pub fn flip(bytes: &mut bytes::Bytes, at: usize, mask: u8) {
    let mut damaged = bytes.to_vec();
    damaged[at] ^= mask;
    *bytes = damaged.into();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_sits_at_its_index() {
        for (at, kind) in FaultKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), at, "{kind}");
        }
    }
}
