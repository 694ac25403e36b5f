//! The simulated S3-like object store: a madsim node that serves put, ranged get and list over the simulated
//! network, and the client shards use to reach it.
//!
//! Fault model (on reads, each rolled per request with the seed's rate, none after healing; puts and listings,
//! which only replication worlds make, roll `store-unavailable` and `store-slow` the same way, and a put that
//! fails stores nothing, while a slow put is stored at once and only its answer is late):
//! - `store-unavailable`: a transient error instead of data;
//! - `store-throttled`: "slow down, retry after 50-500 ms";
//! - `store-slow`: the answer comes 100-2500 ms late, sometimes past the reader's timeout;
//! - `download-partial`: fewer bytes than asked (the reader must resume at the right offset);
//! - `download-truncated`: the object is reported to end where this read ends, as a cut-off transfer does;
//! - `download-corrupt`: one byte of the answer is flipped.
//!
//! Listings are eventually consistent where the world says so (`listing_lag_ms`, which only replication worlds
//! set): an object put is readable at once but shows in listings only after a delay of its own, up to the lag,
//! so a listing can show a later object without an earlier one, as S3's listings could before they became
//! strongly consistent and some S3-compatible stores' still can. It is the store's model, not a fault: it does
//! not stop at the heal.
//!
//! A lost object (only where the world says so) answers "not found" for good, or until the operation the world
//! names has ended (an operator putting the object back after the restore that met its loss failed), and no
//! listing shows it meanwhile.
//!
//! Fault atlas: the stored bytes are never changed, damage is done only to the copy sent, and after
//! `MAX_DAMAGED_STREAK` faulty answers in a row for one object the next answer for it is intact. So at least one
//! intact copy of every bundle is always reachable, and a restore that fails under faults is a real bug.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use lockstep::io::{RemoteStore, range_of};
use lockstep::protocol::{NodeAddr, OperationId, RangeRead, StoreError};
use madsim::net::Endpoint;
use rand::Rng;

use crate::clock::SimClock;
use crate::events::{EventKind, SimNode};
use crate::faults::FaultKind;
use crate::state::Shared;

/// Tag the store listens on.
pub const STORE_TAG: u64 = 1;
/// Replies come back on tags from here up, one per request, clear of the protocol's tag on the same endpoint.
const FIRST_REPLY_TAG: u64 = 1 << 32;
/// Faulty answers in a row for one object after which the next answer is intact.
pub const MAX_DAMAGED_STREAK: u32 = 3;

#[derive(Clone, Debug)]
pub enum StoreRequest {
    Put { object: String, bytes: Vec<u8> },
    GetRange { object: String, offset: u64, len: u64 },
    List { prefix: String },
}

#[derive(Clone, Debug)]
pub enum StoreResponse {
    Put(Result<(), StoreError>),
    GetRange(Result<RangeRead, StoreError>),
    List(Result<Vec<String>, StoreError>),
}

struct Envelope {
    reply_tag: u64,
    request: StoreRequest,
}

/// Creates the store node of a run at [`crate::runner::STORE_ADDR`], holding `objects`, with `lost` lost.
pub fn create_node(
    handle: &madsim::runtime::Handle,
    state: Shared,
    clock: SimClock,
    objects: Arc<BTreeMap<String, bytes::Bytes>>,
    lost: BTreeMap<String, Option<OperationId>>,
    listing_lag_ms: u64,
) -> madsim::task::NodeId {
    handle
        .create_node()
        .name("store")
        .ip(crate::runner::STORE_ADDR.ip())
        .init(move || serve(state.clone(), clock.clone(), objects.clone(), lost.clone(), listing_lag_ms))
        .build()
        .id()
}

/// The store node's main loop. Never returns.
pub async fn serve(
    state: Shared,
    clock: SimClock,
    objects: Arc<BTreeMap<String, bytes::Bytes>>,
    lost: BTreeMap<String, Option<OperationId>>,
    listing_lag_ms: u64,
) {
    let endpoint = Rc::new(Endpoint::bind(crate::runner::STORE_ADDR).await.expect("the store address is free"));
    let written = Default::default();
    let streaks = Default::default();
    let server = Rc::new(StoreServer { state, clock, objects, written, lost, streaks, listing_lag_ms });
    loop {
        let Ok((payload, from)) = endpoint.recv_from_raw(STORE_TAG).await else { continue };
        let Ok(envelope) = payload.downcast::<Envelope>() else { continue };
        // Requests and answers are counted as taken in (see `SimState::messages`).
        server.state.lock().messages += 1;
        let Envelope { reply_tag, request } = *envelope;
        let reader = crate::runner::node_at_ip(from.ip());
        let (response, delay) = server.answer(request, reader);
        let reply = Box::new(response);
        match delay {
            // A slow answer waits in its own task, so later requests overtake it.
            Some(delay) => {
                let endpoint = endpoint.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(delay).await;
                    let _ = endpoint.send_to_raw(from, reply_tag, reply).await;
                });
            }
            None => {
                let _ = endpoint.send_to_raw(from, reply_tag, reply).await;
            }
        }
    }
}

struct StoreServer {
    state: Shared,
    clock: SimClock,
    /// The objects the world put in the store before the run.
    objects: Arc<BTreeMap<String, bytes::Bytes>>,
    /// Objects put during the run, each with the time from which listings show it; they shadow `objects`.
    written: std::cell::RefCell<BTreeMap<String, (bytes::Bytes, u64)>>,
    /// Lost objects, each with the operation whose end brings it back, if any.
    lost: BTreeMap<String, Option<OperationId>>,
    /// Faulty answers in a row, per object.
    streaks: std::cell::RefCell<BTreeMap<String, u32>>,
    /// Longest delay before an object put shows in listings (0: at once).
    listing_lag_ms: u64,
}

impl StoreServer {
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Answers `reader`'s request (a node the simulated network knows; faults are its chances).
    fn answer(&self, request: StoreRequest, reader: Option<NodeAddr>) -> (StoreResponse, Option<Duration>) {
        match request {
            StoreRequest::Put { object, bytes } => {
                if self.fails(reader, || format!("put {object}")) {
                    return (StoreResponse::Put(Err(injected_unavailable())), None);
                }
                let now = self.now_ms();
                let listed_from = {
                    let mut state = self.state.lock();
                    state.record(now, SimNode::Store, EventKind::Stored { object: object.clone() });
                    let lag = self.listing_lag_ms;
                    now + if lag > 0 { state.rng.gen_range(0..=lag) } else { 0 }
                };
                // A put again of an object listed already keeps it listed.
                let mut written = self.written.borrow_mut();
                let listed_from = written.get(&object).map_or(listed_from, |(_, at)| listed_from.min(*at));
                written.insert(object.clone(), (bytes.into(), listed_from));
                (StoreResponse::Put(Ok(())), self.slow(reader, || format!("put {object}")))
            }
            StoreRequest::List { prefix } => {
                if self.fails(reader, || format!("list {prefix}")) {
                    return (StoreResponse::List(Err(injected_unavailable())), None);
                }
                let written = self.written.borrow();
                let now = self.now_ms();
                let listed = written.iter().filter(|(_, (_, listed_from))| *listed_from <= now).map(|(name, _)| name);
                let all: BTreeSet<&String> = self.objects.keys().chain(listed).collect();
                let names = all.into_iter().filter(|k| k.starts_with(&prefix) && !self.is_lost(k)).cloned().collect();
                (StoreResponse::List(Ok(names)), self.slow(reader, || format!("list {prefix}")))
            }
            StoreRequest::GetRange { object, offset, len } => {
                let (result, delay) = self.get_range(&object, offset, len, reader);
                (StoreResponse::GetRange(result), delay)
            }
        }
    }

    /// Whether `object` is lost now.
    fn is_lost(&self, object: &str) -> bool {
        let back = |op: &OperationId| self.state.lock().ended_ops.contains(op);
        self.lost.get(object).is_some_and(|until| !until.as_ref().is_some_and(back))
    }

    fn get_range(
        &self,
        object: &str,
        offset: u64,
        len: u64,
        reader: Option<NodeAddr>,
    ) -> (Result<RangeRead, StoreError>, Option<Duration>) {
        if self.is_lost(object) {
            return (Err(StoreError::NotFound { object: object.to_string() }), None);
        }
        let written = self.written.borrow();
        let Some(bytes) = written.get(object).map(|(bytes, _)| bytes).or_else(|| self.objects.get(object)) else {
            return (Err(StoreError::NotFound { object: object.to_string() }), None);
        };
        let mut read = match range_of(object, bytes, offset, len) {
            Ok(read) => read,
            Err(error) => return (Err(error), None),
        };
        if self.scheduled_damage(object, offset, &mut read) {
            return (Ok(read), None);
        }
        let Some(reader) = reader else { return (Ok(read), None) };
        let streak = self.streaks.borrow().get(object).copied().unwrap_or(0);
        if streak >= MAX_DAMAGED_STREAK {
            self.set_streak(object, 0);
            return (Ok(read), None);
        }
        let now = self.now_ms();
        let mut state = self.state.lock();
        let at = || format!("{object} @{offset}+{len}");
        let node = SimNode::Store;
        let mut damaged = true;
        let result = if state.fault_at(now, node, reader, FaultKind::StoreUnavailable, at) {
            Err(injected_unavailable())
        } else if state.fault_at(now, node, reader, FaultKind::StoreThrottled, at) {
            Err(StoreError::Throttled { retry_after_ms: state.rng.gen_range(50..500) })
        } else {
            damaged = false;
            if read.bytes.len() > 1 && state.fault_at(now, node, reader, FaultKind::DownloadPartial, at) {
                let keep = state.rng.gen_range(1..read.bytes.len());
                read.bytes.truncate(keep);
            }
            let end = offset + read.bytes.len() as u64;
            if end < read.total_len && state.fault_at(now, node, reader, FaultKind::DownloadTruncated, at) {
                read.total_len = end;
                damaged = true;
            }
            if !read.bytes.is_empty() && state.fault_at(now, node, reader, FaultKind::DownloadCorrupt, at) {
                let at = state.rng.gen_range(0..read.bytes.len());
                crate::faults::flip(&mut read.bytes, at, 1 << state.rng.gen_range(0..8));
                damaged = true;
            }
            Ok(read)
        };
        let delay = state
            .fault_at(now, node, reader, FaultKind::StoreSlow, at)
            .then(|| Duration::from_millis(state.rng.gen_range(100..2_500)));
        drop(state);
        self.set_streak(object, if damaged { streak + 1 } else { 0 });
        (result, delay)
    }

    /// Whether a put or listing of `reader`'s fails with a transient error (never one of an unknown reader).
    fn fails(&self, reader: Option<NodeAddr>, what: impl FnOnce() -> String) -> bool {
        let Some(reader) = reader else { return false };
        let now = self.now_ms();
        self.state.lock().fault_at(now, SimNode::Store, reader, FaultKind::StoreUnavailable, what)
    }

    /// How late the answer to a put or listing of `reader`'s comes, if it is slow.
    fn slow(&self, reader: Option<NodeAddr>, what: impl FnOnce() -> String) -> Option<Duration> {
        let reader = reader?;
        let now = self.now_ms();
        let mut state = self.state.lock();
        state
            .fault_at(now, SimNode::Store, reader, FaultKind::StoreSlow, what)
            .then(|| Duration::from_millis(state.rng.gen_range(100..2_500)))
    }

    /// Records `object`'s streak of faulty answers; an object without an entry has a streak of 0.
    fn set_streak(&self, object: &str, streak: u32) {
        let mut streaks = self.streaks.borrow_mut();
        match streaks.get_mut(object) {
            Some(entry) => *entry = streak,
            None if streak > 0 => {
                streaks.insert(object.to_string(), streak);
            }
            None => {}
        }
    }
}

impl StoreServer {
    /// Damage a scenario scheduled for this object's next downloads, if any is left: a truncation ends the
    /// object halfway through this read; a corruption flips a byte.
    fn scheduled_damage(&self, object: &str, offset: u64, read: &mut RangeRead) -> bool {
        let mut state = self.state.lock();
        if state.scheduled_damage.is_empty() {
            return false;
        }
        let now = self.now_ms();
        for truncate in [true, false] {
            let key = (object.to_string(), truncate);
            let Some(left) = state.scheduled_damage.get_mut(&key).filter(|left| **left > 0) else { continue };
            *left -= 1;
            if truncate {
                let keep = read.bytes.len() / 2;
                read.bytes.truncate(keep);
                read.total_len = offset + keep as u64;
                let detail = format!("{object} @{offset} cut off after {keep} bytes");
                state.scheduled_fault(now, SimNode::Store, FaultKind::DownloadTruncated, detail);
            } else if !read.bytes.is_empty() {
                // The last byte: inside the last change's value, so a reader that skips the checksum decodes it.
                let at = read.bytes.len() - 1;
                crate::faults::flip(&mut read.bytes, at, 0x40);
                let detail = format!("{object} @{offset} byte {at} flipped");
                state.scheduled_fault(now, SimNode::Store, FaultKind::DownloadCorrupt, detail);
            }
            return true;
        }
        false
    }
}

/// A node's client of the simulated store, on the endpoint its protocol frames use. Each request waits on its
/// own reply tag, unique across the whole run: a late answer to a request sent before a restart must never be
/// taken for the answer to a new one.
pub struct SimStoreClient {
    endpoint: Rc<Endpoint>,
    state: Shared,
}

impl SimStoreClient {
    pub fn new(endpoint: Rc<Endpoint>, state: Shared) -> Self {
        Self { endpoint, state }
    }

    async fn call(&self, request: StoreRequest) -> Result<StoreResponse, StoreError> {
        let reply_tag = {
            let mut state = self.state.lock();
            state.next_store_tag += 1;
            FIRST_REPLY_TAG + state.next_store_tag
        };
        let envelope = Envelope { reply_tag, request };
        let unavailable = |error: std::io::Error| StoreError::Unavailable { detail: error.to_string() };
        self.endpoint
            .send_to_raw(crate::runner::STORE_ADDR, STORE_TAG, Box::new(envelope))
            .await
            .map_err(unavailable)?;
        let (payload, _) = self.endpoint.recv_from_raw(reply_tag).await.map_err(unavailable)?;
        self.state.lock().messages += 1;
        payload
            .downcast::<StoreResponse>()
            .map(|response| *response)
            .map_err(|_| StoreError::Unavailable { detail: "garbled store response".to_string() })
    }
}

fn injected_unavailable() -> StoreError {
    StoreError::Unavailable { detail: "injected 503".to_string() }
}

fn mismatched() -> StoreError {
    StoreError::Unavailable { detail: "store answered a different kind of request".to_string() }
}

impl RemoteStore for SimStoreClient {
    async fn put(&self, object: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self.call(StoreRequest::Put { object: object.to_string(), bytes }).await? {
            StoreResponse::Put(result) => result,
            _ => Err(mismatched()),
        }
    }

    async fn get_range(&self, object: &str, offset: u64, len: u64) -> Result<RangeRead, StoreError> {
        match self.call(StoreRequest::GetRange { object: object.to_string(), offset, len }).await? {
            StoreResponse::GetRange(result) => result,
            _ => Err(mismatched()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match self.call(StoreRequest::List { prefix: prefix.to_string() }).await? {
            StoreResponse::List(result) => result,
            _ => Err(mismatched()),
        }
    }
}
