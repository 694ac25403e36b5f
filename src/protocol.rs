//! The protocol vocabulary shared by every state machine and host: node addresses, messages, the outputs a
//! machine asks its host to carry out, and the frame codec for the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::coordinator::{
    LifecycleError, OperationSummary, OperationView, RestoreRequest, SegmentError, SegmentRequest, StartError,
};
use crate::model::{BackupKind, IncrementIndex, TabletId};

/// Identifies one restore operation.
pub type OperationId = u64;
/// Bumped on every coordinator boot; replies carry the generation of the request they answer.
pub type Generation = u64;

/// Where a message goes or comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeAddr {
    Coordinator,
    /// The node serving one tablet (one shard of one table).
    Shard(TabletId),
    /// An operator's client: starts restores, asks for status, lists and forgets operations.
    Client,
    /// The node that pushes a replicated tablet's committed versions to the store ([`crate::replication`]).
    Publisher,
    /// The node that pulls them from the store into its copy of the tablet.
    Replica,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeAddr::Coordinator => f.write_str("coordinator"),
            NodeAddr::Shard(tablet) => write!(f, "{tablet}"),
            NodeAddr::Client => f.write_str("client"),
            NodeAddr::Publisher => f.write_str("publisher"),
            NodeAddr::Replica => f.write_str("replica"),
        }
    }
}

/// A protocol message: between the coordinator and a shard, or between a client and the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Message {
    Apply(ApplyRequest),
    Reply(ApplyReply),
    Client(ClientRequest),
    /// Boxed: rare, and by far the largest, it would set the size of every message (and of every event the
    /// simulator logs) otherwise.
    ClientReply(Box<ClientReply>),
}

/// A lifecycle call from a client. Clients retry until answered: a start is idempotent by operation id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientRequest {
    /// Chosen by the client; the answer echoes it.
    pub call_id: u64,
    pub call: ClientCall,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientCall {
    Start(RestoreRequest),
    /// Goes on with a restore done in segments: the next segment, to a later point in time.
    Continue(SegmentRequest),
    Status {
        op: OperationId,
    },
    List,
    Forget {
        op: OperationId,
    },
    /// Ends an operation under way as Failed (cancelled), freeing its tables for a new restore.
    Cancel {
        op: OperationId,
    },
}

/// The coordinator's answer to one [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientReply {
    pub call_id: u64,
    pub answer: ClientAnswer,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientAnswer {
    /// The operation is durably started (or was already).
    Started {
        op: OperationId,
    },
    StartRefused(StartError),
    /// Segment `segment` of the operation is durably planned (or was already).
    Continued {
        op: OperationId,
        segment: u32,
    },
    ContinueRefused(SegmentError),
    Status(Result<OperationView, LifecycleError>),
    List(Vec<OperationSummary>),
    Forgotten {
        op: OperationId,
    },
    ForgetRefused(LifecycleError),
    /// The operation is durably cancelled (or was already).
    Cancelled {
        op: OperationId,
    },
    CancelRefused(LifecycleError),
}

/// "Apply increment `increment` of operation `op` to your rows."
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub op: OperationId,
    pub generation: Generation,
    /// Distinguishes retries of the same increment, so a late reply to an old attempt is not mistaken.
    pub attempt: u32,
    pub increment: IncrementIndex,
    pub backup_id: u64,
    pub kind: BackupKind,
    pub tablet: TabletId,
    pub object: String,
}

impl ApplyRequest {
    /// The answer to this request: its identity echoed, with `outcome`.
    pub fn reply(&self, outcome: ApplyOutcome) -> ApplyReply {
        ApplyReply {
            op: self.op,
            generation: self.generation,
            attempt: self.attempt,
            increment: self.increment,
            tablet: self.tablet,
            outcome,
        }
    }
}

/// A shard's answer to one [`ApplyRequest`], echoing its identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApplyReply {
    pub op: OperationId,
    pub generation: Generation,
    pub attempt: u32,
    pub increment: IncrementIndex,
    pub tablet: TabletId,
    pub outcome: ApplyOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// The increment is now durably applied.
    Applied,
    /// The increment was durably applied before; nothing was re-applied.
    AlreadyApplied,
    /// The shard could not apply the increment. Transient failures are retried; permanent ones end the operation.
    Failed { permanent: bool, cause: ShardFailure },
}

/// Why a shard could not apply an increment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum ShardFailure {
    #[error("object {object} is missing from the store")]
    ObjectMissing { object: String },
    #[error("download of {object} failed {attempts} times, last: {detail}")]
    DownloadFailed { object: String, attempts: u32, detail: String },
    #[error("bundle rejected: {detail}")]
    BadBundle { detail: String },
    #[error("bundle {object} holds the {found}, not the {expected} requested")]
    WrongBundle { object: String, expected: BundleOf, found: BundleOf },
    #[error("asked for increment {requested} but the next increment to apply is {expected}")]
    OutOfOrder { expected: IncrementIndex, requested: IncrementIndex },
    #[error("request addressed to {requested} reached {actual}")]
    WrongShard { requested: TabletId, actual: TabletId },
    /// A request of an operation older than the one the shard holds rows of (or is applying): a late or
    /// duplicated request of an operation that ended, which must not overwrite a newer restore.
    #[error("request of operation {requested}, older than operation {held} whose rows this shard holds")]
    Superseded { requested: OperationId, held: OperationId },
}

impl ShardFailure {
    /// What kind of failure it is, without its details.
    pub fn kind(&self) -> ShardFailureKind {
        match self {
            ShardFailure::ObjectMissing { .. } => ShardFailureKind::ObjectMissing,
            ShardFailure::DownloadFailed { .. } => ShardFailureKind::DownloadFailed,
            ShardFailure::BadBundle { .. } => ShardFailureKind::BadBundle,
            ShardFailure::WrongBundle { .. } => ShardFailureKind::WrongBundle,
            ShardFailure::OutOfOrder { .. } => ShardFailureKind::OutOfOrder,
            ShardFailure::WrongShard { .. } => ShardFailureKind::WrongShard,
            ShardFailure::Superseded { .. } => ShardFailureKind::Superseded,
        }
    }
}

/// A [`ShardFailure`] without its details: what a coordinator keeps of a transient failure, to say at a deadline
/// why a tablet was not done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ShardFailureKind {
    ObjectMissing,
    DownloadFailed,
    BadBundle,
    WrongBundle,
    OutOfOrder,
    WrongShard,
    Superseded,
}

impl fmt::Display for ShardFailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardFailureKind::ObjectMissing => "object missing",
            ShardFailureKind::DownloadFailed => "download failed",
            ShardFailureKind::BadBundle => "bundle rejected",
            ShardFailureKind::WrongBundle => "wrong bundle",
            ShardFailureKind::OutOfOrder => "out of order",
            ShardFailureKind::WrongShard => "wrong shard",
            ShardFailureKind::Superseded => "superseded by a newer operation",
        })
    }
}

/// Whose bundle a bundle is: the backup, its kind and the tablet, as its header says or a request expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BundleOf {
    pub backup_id: u64,
    pub kind: BackupKind,
    pub tablet: TabletId,
}

impl fmt::Display for BundleOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} backup {} of {}", self.kind, self.backup_id, self.tablet)
    }
}

/// A byte range of an object, requested from the remote store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DownloadRequest {
    /// Ties the result to the download that asked for it; results of abandoned downloads are ignored.
    pub download_id: u64,
    pub object: String,
    pub offset: u64,
    pub len: u64,
}

/// What the store gave back for a [`DownloadRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DownloadResult {
    pub download_id: u64,
    pub object: String,
    pub offset: u64,
    pub outcome: Result<RangeRead, StoreError>,
}

/// Bytes read from an object starting at the requested offset; may be shorter than asked (a partial read).
/// The bytes are shared, not owned: a store's buffer (or a slice of an object it holds) passes to the shard as is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeRead {
    pub bytes: bytes::Bytes,
    /// The object's total length as the store reports it.
    pub total_len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    #[error("object {object} not found")]
    NotFound { object: String },
    #[error("store unavailable: {detail}")]
    Unavailable { detail: String },
    #[error("throttled, retry after {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
    #[error("request timed out after {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("range starts at {offset} past the end of {object} ({len} bytes)")]
    BadRange { object: String, offset: u64, len: u64 },
}

/// What a host writes down about a persist, for observers; the machine knows why it persists, the host does not.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PersistNote {
    /// Coordinator state: the progress of every operation it knows, in operation order.
    Coordinator(Vec<crate::coordinator::ProgressMark>),
    /// A shard applied an increment of operation `op`: rows and marker in this one write. `payload_crc32` is the
    /// CRC-32 of the bundle payload the rows came from, as the shard computed it over the bytes it downloaded, so
    /// an observer can tell whether they were the intact bundle's.
    ShardApplied { op: OperationId, increment: IncrementIndex, backup_id: u64, payload_crc32: u32 },
    /// A publisher's store acknowledged every version up to `pushed_through`.
    Published { pushed_through: crate::replication::Version },
    /// A replica applied every version up to `applied_through`; `rows` are its rows now (shared, not copied).
    Replicated { applied_through: crate::replication::Version, rows: std::sync::Arc<crate::model::SortedRows> },
}

/// An effect a state machine asks its host to carry out, in order. A host finishes a `Persist` (write and sync)
/// before it carries out the next output.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output<D, T> {
    Persist {
        state: D,
        note: PersistNote,
    },
    Send {
        to: NodeAddr,
        msg: Message,
    },
    SetTimer {
        at_ms: u64,
        timer: T,
    },
    Download(DownloadRequest),
    /// A status change worth telling an operator about.
    Report(String),
}

/// The encoding of the frames nodes exchange ([`Message`], and the node names of the real transport's hello).
/// Raised whenever a message type changes how it encodes. The real transport (`lockstep::tcp`, outside the
/// madsim build) says it in every connection's hello and refuses a peer that speaks another; the tests pin the
/// encoding of sample messages (`message_encodings_are_pinned_to_the_protocol_version`), so a change cannot land
/// without raising it.
pub const PROTOCOL_VERSION: u16 = 4;

#[derive(Debug, thiserror::Error)]
#[error("cannot decode frame of {len} bytes: {source}")]
pub struct FrameError {
    pub len: usize,
    #[source]
    pub source: postcard::Error,
}

/// Encodes a value as one wire frame.
pub fn encode_frame<T: Serialize>(value: &T) -> Vec<u8> {
    // Sized first: growing the buffer while encoding a whole table copies it over and over.
    let size = postcard::experimental::serialized_size(value).expect("protocol values always serialize");
    postcard::to_extend(value, Vec::with_capacity(size)).expect("protocol values always serialize")
}

/// Appends the frame of `value` to `buffer`; a buffer that already has the room allocates nothing.
pub fn encode_frame_after<T: Serialize>(value: &T, buffer: Vec<u8>) -> Vec<u8> {
    postcard::to_extend(value, buffer).expect("protocol values always serialize")
}

/// Decodes one wire frame; garbage is an error, never a panic.
pub fn decode_frame<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(bytes).map_err(|source| FrameError { len: bytes.len(), source })
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Client(ClientRequest { call_id, call }) => {
                write!(f, "call {call_id}: ")?;
                match call {
                    ClientCall::Start(request) => {
                        let tables: Vec<String> = request.tables.iter().map(|t| t.name.clone()).collect();
                        write!(
                            f,
                            "start op={} collection={} tables={}",
                            request.op,
                            request.collection,
                            tables.join(",")
                        )?;
                        write_segment(f, request.until_ms, request.last_segment)
                    }
                    ClientCall::Continue(request) => {
                        write!(f, "continue op={} segment={}", request.op, request.segment)?;
                        write_segment(f, request.until_ms, request.last_segment)
                    }
                    ClientCall::Status { op } => write!(f, "status op={op}"),
                    ClientCall::List => f.write_str("list"),
                    ClientCall::Forget { op } => write!(f, "forget op={op}"),
                    ClientCall::Cancel { op } => write!(f, "cancel op={op}"),
                }
            }
            Message::ClientReply(reply) => {
                let ClientReply { call_id, answer } = &**reply;
                write!(f, "answer {call_id}: ")?;
                match answer {
                    ClientAnswer::Started { op } => write!(f, "started op={op}"),
                    ClientAnswer::StartRefused(error) => write!(f, "start refused: {error}"),
                    ClientAnswer::Continued { op, segment } => write!(f, "continued op={op} segment={segment}"),
                    ClientAnswer::ContinueRefused(error) => write!(f, "continue refused: {error}"),
                    ClientAnswer::Status(Ok(view)) => {
                        write!(f, "status op={} {:?}", view.op, view.state)?;
                        if let Some(increment) = view.increment {
                            write!(f, " at increment {increment} of {}", view.increments)?;
                        }
                        if let Some(error) = &view.error {
                            write!(f, ": {error}")?;
                        }
                        Ok(())
                    }
                    ClientAnswer::Status(Err(error)) => write!(f, "status refused: {error}"),
                    ClientAnswer::List(ops) => {
                        let ops: Vec<String> = ops.iter().map(|o| format!("{}:{:?}", o.op, o.state)).collect();
                        write!(f, "list [{}]", ops.join(", "))
                    }
                    ClientAnswer::Forgotten { op } => write!(f, "forgot op={op}"),
                    ClientAnswer::ForgetRefused(error) => write!(f, "forget refused: {error}"),
                    ClientAnswer::Cancelled { op } => write!(f, "cancelled op={op}"),
                    ClientAnswer::CancelRefused(error) => write!(f, "cancel refused: {error}"),
                }
            }
            Message::Apply(r) => write!(
                f,
                "apply op={} gen={} attempt={} inc={} backup={} {} {}",
                r.op, r.generation, r.attempt, r.increment, r.backup_id, r.tablet, r.object
            ),
            Message::Reply(r) => {
                write!(
                    f,
                    "reply op={} gen={} attempt={} inc={} {} ",
                    r.op, r.generation, r.attempt, r.increment, r.tablet
                )?;
                match &r.outcome {
                    ApplyOutcome::Applied => f.write_str("applied"),
                    ApplyOutcome::AlreadyApplied => f.write_str("already-applied"),
                    ApplyOutcome::Failed { permanent, cause } => {
                        let kind = if *permanent { "permanent" } else { "transient" };
                        write!(f, "failed {kind}: {cause}")
                    }
                }
            }
        }
    }
}

/// The point in time and the segment's place of a start or continue call, as a trace shows them: nothing for a
/// plain restore of the newest backup in one go.
fn write_segment(f: &mut fmt::Formatter<'_>, until_ms: Option<u64>, last_segment: bool) -> fmt::Result {
    if let Some(until_ms) = until_ms {
        write!(f, " until={until_ms}ms")?;
    }
    if !last_segment { f.write_str(" (more segments follow)") } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_a_frame() {
        let msg = Message::Reply(ApplyReply {
            op: 1,
            generation: 2,
            attempt: 3,
            increment: 4,
            tablet: TabletId::new(5, 6),
            outcome: ApplyOutcome::Failed {
                permanent: true,
                cause: ShardFailure::OutOfOrder { expected: 1, requested: 3 },
            },
        });
        let frame = encode_frame(&msg);
        assert_eq!(decode_frame::<Message>(&frame).unwrap(), msg);
    }

    #[test]
    fn a_ranged_read_round_trips_through_a_frame() {
        let read = DownloadResult {
            download_id: 7,
            object: "backups/3/t0/shard-1.bundle".into(),
            offset: 1024,
            outcome: Ok(RangeRead { bytes: bytes::Bytes::from_static(b"\x00\xffrows"), total_len: 2048 }),
        };
        assert_eq!(decode_frame::<DownloadResult>(&encode_frame(&read)).unwrap(), read);
    }

    #[test]
    fn garbage_frames_are_errors() {
        for garbage in [&[][..], &[0xff; 3][..], &[9, 9, 9, 9, 9][..]] {
            assert!(decode_frame::<Message>(garbage).is_err());
        }
    }
}
