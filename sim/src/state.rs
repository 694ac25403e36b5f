//! World-wide simulation state shared by every node of one seed: the event log, the fault dice, the fault
//! counters and the disks (which outlive node restarts). Only one seed ever touches one `SimState`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use lockstep::protocol::NodeAddr;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::DiskState;
use crate::events::{Event, EventKind, SimNode};
use crate::faults::{FaultCounts, FaultKind, FaultPlan};

pub struct SimState {
    pub log: Vec<Event>,
    /// Every fault decision is drawn from here, in simulation order.
    pub rng: ChaCha8Rng,
    pub plan: FaultPlan,
    pub healed: bool,
    pub counts: FaultCounts,
    pub disks: BTreeMap<NodeAddr, DiskState>,
    /// Messages put on the simulated network: protocol frames (each copy of a duplicate counts), store
    /// requests and store answers.
    pub messages: u64,
    /// Simulated time of the last event.
    pub now_ms: u64,
    /// Reply tags handed out to store clients so far.
    pub next_store_tag: u64,
}

impl SimState {
    pub fn new(seed: u64, plan: FaultPlan) -> Self {
        Self {
            log: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0000),
            plan,
            healed: false,
            counts: FaultCounts::default(),
            disks: BTreeMap::new(),
            messages: 0,
            now_ms: 0,
            next_store_tag: 0,
        }
    }

    pub fn record(&mut self, at_ms: u64, node: SimNode, kind: EventKind) {
        self.now_ms = at_ms;
        self.log.push(Event { at_ms, node, kind });
    }

    /// Rolls the dice for `kind`; on a hit counts it and logs it with `detail`.
    pub fn fault(&mut self, at_ms: u64, node: SimNode, kind: FaultKind, detail: impl FnOnce() -> String) -> bool {
        let rate = self.plan.rate(kind);
        if self.healed || rate <= 0.0 || !self.rng.gen_bool(rate.min(1.0)) {
            return false;
        }
        self.counts.add(kind);
        self.record(at_ms, node, EventKind::Fault { kind, detail: detail() });
        true
    }
}

/// A handle on the state of one seed.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<SimState>>);

impl Shared {
    pub fn new(state: SimState) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        // A poisoned lock means a node panicked; the panic is reported by the runner, so keep going.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
