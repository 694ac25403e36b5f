//! What happens to a world besides its faults drawn from rates: the client's calls and what must come of them,
//! how each operation must end, and faults scheduled at named moments. Generated worlds plan one restore at time
//! zero; scenario files plan anything.

use std::fmt;

use lockstep::coordinator::{LifecycleError, RestoreError, SegmentError, StartError};
use lockstep::model::{IncrementIndex, TabletId};
use lockstep::protocol::{ClientAnswer, ClientCall, OperationId, ShardFailure};

/// One call the client makes at `at_ms`, retried until answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedCall {
    /// When the call is made: this long after the run began, or, with `after_end_of`, after that ended.
    pub at_ms: u64,
    /// The call waits for this operation to end (durably, Done or Failed), as an operator's script that polls
    /// its status would, and is made `at_ms` later.
    pub after_end_of: Option<OperationId>,
    /// The call waits for this operation to end this segment of a restore in segments (or to end, whichever
    /// comes first), and is made `at_ms` later.
    pub after_segment: Option<(OperationId, u32)>,
    /// The call is made only if the client's cancel of this operation was answered cancelled, as an operator's
    /// script that restores again once its cancel took (a cancel that came too late leaves the restore done).
    pub if_cancelled: Option<OperationId>,
    pub call: ClientCall,
    pub expect: CallExpect,
}

impl PlannedCall {
    /// `call` at `at_ms` after the run began, expecting `expect`.
    pub fn at(at_ms: u64, call: ClientCall, expect: CallExpect) -> Self {
        Self { at_ms, after_end_of: None, after_segment: None, if_cancelled: None, call, expect }
    }
}

/// The answer a call must get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallExpect {
    /// Any answer will do.
    Answered,
    Started,
    /// Refused, with the refusal of this name (see [`refusal_name`]).
    StartRefused(String),
    Forgotten,
    Continued,
    Cancelled,
    /// A cancel racing the operation's end: cancelled, or refused because the operation had already ended. Which
    /// one decides how the operation must end ([`OpExpect::CancelRace`]).
    CancelledOrEnded,
    /// Cancel refused, with the error of this name (see [`lifecycle_error_name`]).
    CancelRefused(String),
    /// Continue refused, with the refusal of this name (see [`segment_error_name`]).
    ContinueRefused(String),
    /// Forget refused, with the error of this name (see [`lifecycle_error_name`]).
    ForgetRefused(String),
    /// Status refused, with the error of this name (see [`lifecycle_error_name`]).
    StatusRefused(String),
}

impl CallExpect {
    /// Whether `answer` is what this expectation asks for.
    pub fn accepts(&self, answer: &ClientAnswer) -> bool {
        match (self, answer) {
            (CallExpect::Answered, _) => true,
            (CallExpect::Started, ClientAnswer::Started { .. }) => true,
            (CallExpect::StartRefused(name), ClientAnswer::StartRefused(error)) => refusal_name(error) == name,
            (CallExpect::Forgotten, ClientAnswer::Forgotten { .. }) => true,
            (CallExpect::Continued, ClientAnswer::Continued { .. }) => true,
            (CallExpect::Cancelled | CallExpect::CancelledOrEnded, ClientAnswer::Cancelled { .. }) => true,
            (CallExpect::CancelledOrEnded, ClientAnswer::CancelRefused(LifecycleError::AlreadyEnded { .. })) => true,
            (CallExpect::CancelRefused(name), ClientAnswer::CancelRefused(error)) => {
                lifecycle_error_name(error) == name
            }
            (CallExpect::ContinueRefused(name), ClientAnswer::ContinueRefused(error)) => {
                segment_error_name(error) == name
            }
            (CallExpect::ForgetRefused(name), ClientAnswer::ForgetRefused(error)) => {
                lifecycle_error_name(error) == name
            }
            (CallExpect::StatusRefused(name), ClientAnswer::Status(Err(error))) => lifecycle_error_name(error) == name,
            _ => false,
        }
    }
}

impl fmt::Display for CallExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallExpect::Answered => f.write_str("any answer"),
            CallExpect::Started => f.write_str("started"),
            CallExpect::StartRefused(name) => write!(f, "start refused ({name})"),
            CallExpect::Forgotten => f.write_str("forgotten"),
            CallExpect::Continued => f.write_str("continued"),
            CallExpect::Cancelled => f.write_str("cancelled"),
            CallExpect::CancelledOrEnded => f.write_str("cancelled, or refused as already ended"),
            CallExpect::CancelRefused(name) => write!(f, "cancel refused ({name})"),
            CallExpect::ContinueRefused(name) => write!(f, "continue refused ({name})"),
            CallExpect::ForgetRefused(name) => write!(f, "forget refused ({name})"),
            CallExpect::StatusRefused(name) => write!(f, "status refused ({name})"),
        }
    }
}

/// The names scenario files use for start refusals.
pub const REFUSAL_NAMES: [&str; 10] = [
    "operation-id-taken",
    "operation-id-not-new",
    "collection-busy",
    "target-busy",
    "target-not-empty",
    "chain",
    "no-tables",
    "no-shards",
    "duplicate-table",
    "index-without-table",
];

pub fn refusal_name(error: &StartError) -> &'static str {
    match error {
        StartError::OperationIdTaken { .. } => "operation-id-taken",
        StartError::OperationIdNotNew { .. } => "operation-id-not-new",
        StartError::CollectionBusy { .. } => "collection-busy",
        StartError::TargetBusy { .. } => "target-busy",
        StartError::TargetNotEmpty { .. } => "target-not-empty",
        StartError::Chain(_) => "chain",
        StartError::NoTables => "no-tables",
        StartError::NoShards { .. } => "no-shards",
        StartError::DuplicateTable { .. } => "duplicate-table",
        StartError::IndexWithoutTable { .. } => "index-without-table",
    }
}

/// The names scenario files use for lifecycle refusals.
pub const LIFECYCLE_ERROR_NAMES: [&str; 3] = ["not-found", "still-running", "already-ended"];

pub fn lifecycle_error_name(error: &LifecycleError) -> &'static str {
    match error {
        LifecycleError::NotFound { .. } => "not-found",
        LifecycleError::StillRunning { .. } => "still-running",
        LifecycleError::AlreadyEnded { .. } => "already-ended",
    }
}

/// The names of segment refusals.
pub fn segment_error_name(error: &SegmentError) -> &'static str {
    match error {
        SegmentError::NotFound { .. } => "not-found",
        SegmentError::Ended { .. } => "ended",
        SegmentError::SegmentRunning { .. } => "segment-running",
        SegmentError::OutOfOrder { .. } => "out-of-order",
        SegmentError::SegmentTaken { .. } => "segment-taken",
        SegmentError::PointBeforePrevious { .. } => "point-before-previous",
        SegmentError::Chain(_) => "chain",
    }
}

/// How an operation must end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpExpect {
    /// Done, with every table equal to the source at the last backup.
    Done,
    /// Failed with this cause.
    Failed(FailureExpect),
    /// The client cancels the operation while it runs, racing its end: Failed (cancelled) if the cancel was
    /// answered so; if it was refused as already ended, the operation ended first, and as the inner expectation
    /// says (never cancelled).
    CancelRace(Box<OpExpect>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureExpect {
    /// A bundle object is missing for good: the error names its increment and tablet.
    ObjectMissing { increment: IncrementIndex, tablet: TabletId },
    /// A deadline passed (the operation's or an increment's).
    Timeout,
    /// The client cancelled it.
    Cancelled,
}

impl OpExpect {
    /// The expectation once the answer to the client's cancel of the operation is known (`None`: no answer came,
    /// or no cancel was made): a cancel race is decided by that answer, every other expectation stays.
    pub fn decided(&self, cancel_answer: Option<&ClientAnswer>) -> OpExpect {
        match (self, cancel_answer) {
            (OpExpect::CancelRace(_), Some(ClientAnswer::Cancelled { .. })) => {
                OpExpect::Failed(FailureExpect::Cancelled)
            }
            (OpExpect::CancelRace(otherwise), Some(ClientAnswer::CancelRefused(_))) => otherwise.decided(None),
            (other, _) => other.clone(),
        }
    }

    /// Whether the operation may end Done.
    pub fn accepts_done(&self) -> bool {
        match self {
            OpExpect::Done => true,
            OpExpect::Failed(_) => false,
            OpExpect::CancelRace(otherwise) => otherwise.accepts_done(),
        }
    }

    /// Whether `error` is the failure this expectation asks for.
    pub fn accepts_failure(&self, error: &RestoreError) -> bool {
        match self {
            OpExpect::Done => false,
            OpExpect::CancelRace(otherwise) => {
                matches!(error, RestoreError::Cancelled { .. }) || otherwise.accepts_failure(error)
            }
            OpExpect::Failed(FailureExpect::ObjectMissing { increment, tablet }) => matches!(
                error,
                RestoreError::Shard { increment: i, tablet: t, cause: ShardFailure::ObjectMissing { .. }, .. }
                    if i == increment && t == tablet
            ),
            OpExpect::Failed(FailureExpect::Timeout) => {
                matches!(error, RestoreError::DeadlineExceeded { .. } | RestoreError::IncrementDeadlineExceeded { .. })
            }
            OpExpect::Failed(FailureExpect::Cancelled) => matches!(error, RestoreError::Cancelled { .. }),
        }
    }
}

impl fmt::Display for OpExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpExpect::Done => f.write_str("Done"),
            OpExpect::Failed(FailureExpect::ObjectMissing { increment, tablet }) => {
                write!(f, "Failed: object of increment {increment} on {tablet} missing")
            }
            OpExpect::Failed(FailureExpect::Timeout) => f.write_str("Failed: timeout"),
            OpExpect::Failed(FailureExpect::Cancelled) => f.write_str("Failed: cancelled"),
            OpExpect::CancelRace(otherwise) => write!(f, "Failed: cancelled, or {otherwise} if it ended first"),
        }
    }
}

/// A fault injected when a moment comes, whatever the fault rates say (and after healing too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledFault {
    pub moment: Moment,
    pub action: Action,
}

/// A named moment of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// At this simulated time.
    AtMs(u64),
    /// Operation `op` is durably started.
    Started { op: OperationId },
    /// `tablet` durably applied `increment`.
    Applied { tablet: TabletId, increment: IncrementIndex },
    /// The coordinator received `tablet`'s report that it applied `increment`.
    Reported { tablet: TabletId, increment: IncrementIndex },
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Moment::AtMs(at) => write!(f, "at {at} ms"),
            Moment::Started { op } => write!(f, "once operation {op} started"),
            Moment::Applied { tablet, increment } => write!(f, "once {tablet} applied increment {increment}"),
            Moment::Reported { tablet, increment } => {
                write!(f, "once the coordinator got {tablet}'s report of increment {increment}")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    RebootCoordinator,
    RebootShard(TabletId),
    /// Every report `tablet` sends to the coordinator from then on is lost.
    DropReports(TabletId),
    /// The next `times` downloads of `tablet`'s bundle of `increment` are cut off.
    TruncateDownload {
        tablet: TabletId,
        increment: IncrementIndex,
        times: u32,
    },
    /// The next `times` downloads of `tablet`'s bundle of `increment` have a byte flipped.
    CorruptDownload {
        tablet: TabletId,
        increment: IncrementIndex,
        times: u32,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::RebootCoordinator => f.write_str("reboot the coordinator"),
            Action::RebootShard(tablet) => write!(f, "reboot {tablet}"),
            Action::DropReports(tablet) => write!(f, "drop every report of {tablet}"),
            Action::TruncateDownload { tablet, increment, times } => {
                write!(f, "truncate {times} download(s) of increment {increment} on {tablet}")
            }
            Action::CorruptDownload { tablet, increment, times } => {
                write!(f, "corrupt {times} download(s) of increment {increment} on {tablet}")
            }
        }
    }
}
