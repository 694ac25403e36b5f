//! Coverage probes: named "sometimes" points a sweep must reach, read off a seed's event log. A probe that no
//! seed of a sweep hits means the sweep never exercised that part of the protocol or the fakes, however many
//! seeds passed.

use std::collections::BTreeMap;

use lockstep::coordinator::ProgressMark;
use lockstep::host::HostEvent;
use lockstep::model::TabletId;
use lockstep::protocol::{ApplyOutcome, Message, NodeAddr, PersistNote, ShardFailure};

use crate::events::{Event, EventKind, SimNode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    /// A ranged read started past offset 0: a download resumed after a short read.
    PartialDownloadResumed,
    /// A shard was killed while it had an apply request in hand and had not yet made it durable.
    RebootMidApply,
    /// A shard answered a request for an increment it already held from its applied marker.
    DuplicateAnsweredFromMarker,
    /// The coordinator received a reply of an older generation (and ignored it).
    StaleResponseIgnored,
    /// The coordinator sent a tablet the same increment again in one generation: a backoff retry fired.
    BackoffRetryFired,
    /// The coordinator rebooted into a running operation and resumed it.
    OperationResumed,
    /// A node rebooted after a torn write and still loaded its last synced state.
    TornWriteSurvived,
    /// An operation ended in a persisted Failed.
    CleanFailedReached,
    /// A shard reported an object missing for good.
    ObjectMissingReported,
    /// A tablet applied a newer operation's rows over those of an older one (a restore again after a failure or a
    /// cancel).
    RestoredAgain,
    /// The coordinator took the client's call for the next segment of a restore in segments.
    SegmentContinued,
    /// The coordinator rebooted into an operation waiting for its next segment.
    RebootBetweenSegments,
    /// The coordinator cancelled an operation at the client's call.
    OperationCancelled,
    /// The coordinator refused a cancel because the operation had already ended: a cancel that lost the race.
    CancelTooLate,
}

impl Probe {
    pub const ALL: [Probe; 14] = [
        Probe::PartialDownloadResumed,
        Probe::RebootMidApply,
        Probe::DuplicateAnsweredFromMarker,
        Probe::StaleResponseIgnored,
        Probe::BackoffRetryFired,
        Probe::OperationResumed,
        Probe::TornWriteSurvived,
        Probe::CleanFailedReached,
        Probe::ObjectMissingReported,
        Probe::RestoredAgain,
        Probe::SegmentContinued,
        Probe::RebootBetweenSegments,
        Probe::OperationCancelled,
        Probe::CancelTooLate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Probe::PartialDownloadResumed => "partial-download-resumed",
            Probe::RebootMidApply => "reboot-mid-apply",
            Probe::DuplicateAnsweredFromMarker => "duplicate-answered-from-marker",
            Probe::StaleResponseIgnored => "stale-response-ignored",
            Probe::BackoffRetryFired => "backoff-retry-fired",
            Probe::OperationResumed => "operation-resumed",
            Probe::TornWriteSurvived => "torn-write-survived",
            Probe::CleanFailedReached => "clean-failed-reached",
            Probe::ObjectMissingReported => "object-missing-reported",
            Probe::RestoredAgain => "restored-again",
            Probe::SegmentContinued => "segment-continued",
            Probe::RebootBetweenSegments => "reboot-between-segments",
            Probe::OperationCancelled => "operation-cancelled",
            Probe::CancelTooLate => "cancel-too-late",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The probes one seed hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeSet(u16);

impl ProbeSet {
    pub fn contains(self, probe: Probe) -> bool {
        self.0 & probe.bit() != 0
    }

    fn insert(&mut self, probe: Probe) {
        self.0 |= probe.bit();
    }
}

/// Reads the probes off a seed's event log.
pub fn probes_of(log: &[Event]) -> ProbeSet {
    let mut hit = ProbeSet::default();
    let mut generation = 0;
    // Per tablet: holding an apply request not yet made durable.
    let mut applying: BTreeMap<TabletId, bool> = BTreeMap::new();
    // (tablet, increment) pairs sent in the current generation.
    let mut sent: Vec<(TabletId, u32)> = Vec::new();
    // Per tablet: the operation whose rows it last applied.
    let mut held: BTreeMap<TabletId, lockstep::protocol::OperationId> = BTreeMap::new();
    // Nodes whose last crash tore a write.
    let mut torn: Vec<NodeAddr> = Vec::new();
    for event in log {
        let SimNode::Protocol(node) = event.node else { continue };
        match &event.kind {
            EventKind::Killed { torn: was_torn, .. } => {
                if let NodeAddr::Shard(tablet) = node
                    && applying.get(&tablet).copied().unwrap_or(false)
                {
                    hit.insert(Probe::RebootMidApply);
                }
                if *was_torn {
                    torn.push(node);
                }
            }
            EventKind::Host(host) => match (node, host) {
                (NodeAddr::Coordinator, HostEvent::CoordinatorBooted { generation: g, loaded }) => {
                    generation = *g;
                    sent.clear();
                    let progress = loaded.as_ref().map(lockstep::coordinator::progress_of).unwrap_or_default();
                    if progress.iter().any(|m| matches!(m, ProgressMark::Running { .. })) {
                        hit.insert(Probe::OperationResumed);
                    }
                    if progress.iter().any(|m| matches!(m, ProgressMark::AwaitingSegment { .. })) {
                        hit.insert(Probe::RebootBetweenSegments);
                    }
                    if torn.contains(&node) && loaded.is_some() {
                        hit.insert(Probe::TornWriteSurvived);
                    }
                }
                (NodeAddr::Shard(tablet), HostEvent::ShardBooted { loaded }) => {
                    applying.insert(tablet, false);
                    if torn.contains(&node) && loaded.is_some() {
                        hit.insert(Probe::TornWriteSurvived);
                    }
                }
                (NodeAddr::Shard(_), HostEvent::Download { request, outcome: Ok(_) }) if request.offset > 0 => {
                    hit.insert(Probe::PartialDownloadResumed);
                }
                (NodeAddr::Shard(tablet), HostEvent::Received { msg: Message::Apply(_), .. }) => {
                    applying.insert(tablet, true);
                }
                (NodeAddr::Shard(tablet), HostEvent::Persisted(PersistNote::ShardApplied { op, .. })) => {
                    applying.insert(tablet, false);
                    if held.insert(tablet, *op).is_some_and(|older| older < *op) {
                        hit.insert(Probe::RestoredAgain);
                    }
                }
                (NodeAddr::Shard(tablet), HostEvent::Sent { msg: Message::Reply(reply), .. }) => {
                    applying.insert(tablet, false);
                    match &reply.outcome {
                        ApplyOutcome::AlreadyApplied => hit.insert(Probe::DuplicateAnsweredFromMarker),
                        ApplyOutcome::Failed { cause: ShardFailure::ObjectMissing { .. }, .. } => {
                            hit.insert(Probe::ObjectMissingReported);
                        }
                        _ => {}
                    }
                }
                (NodeAddr::Coordinator, HostEvent::Received { msg: Message::Reply(reply), .. })
                    if reply.generation < generation =>
                {
                    hit.insert(Probe::StaleResponseIgnored);
                }
                (NodeAddr::Coordinator, HostEvent::Sent { msg: Message::ClientReply(reply), .. }) => {
                    match reply.answer {
                        lockstep::protocol::ClientAnswer::Continued { .. } => hit.insert(Probe::SegmentContinued),
                        lockstep::protocol::ClientAnswer::Cancelled { .. } => hit.insert(Probe::OperationCancelled),
                        lockstep::protocol::ClientAnswer::CancelRefused(
                            lockstep::coordinator::LifecycleError::AlreadyEnded { .. },
                        ) => hit.insert(Probe::CancelTooLate),
                        _ => {}
                    }
                }
                (NodeAddr::Coordinator, HostEvent::Sent { msg: Message::Apply(request), .. }) => {
                    let key = (request.tablet, request.increment);
                    if sent.contains(&key) {
                        hit.insert(Probe::BackoffRetryFired);
                    } else {
                        sent.push(key);
                    }
                }
                (NodeAddr::Coordinator, HostEvent::Persisted(PersistNote::Coordinator(marks)))
                    if marks.iter().any(|m| matches!(m, ProgressMark::Failed { .. })) =>
                {
                    hit.insert(Probe::CleanFailedReached);
                }
                _ => {}
            },
            _ => {}
        }
    }
    hit
}
