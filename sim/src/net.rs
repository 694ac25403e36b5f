//! The simulated network for protocol messages, over madsim endpoints.
//!
//! Fault model (rolled per message with the seed's rate, none after healing):
//! - `message-drop`: the message is lost;
//! - `message-duplicate`: the message is delivered twice (madsim never duplicates on its own);
//! - `message-delay`: the message is held back 50-3000 ms (or as long as a scenario's decision pins), so later
//!   messages overtake it (reordering).
//!
//! On top of these madsim adds 1-10 ms of latency per message, and drops everything sent to a node that is
//! down. A message is never altered: frames are checked by the codec anyway, and the protocol's concern here
//! is loss, repetition and order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use lockstep::io::Transport;
use lockstep::protocol::NodeAddr;
use madsim::net::Endpoint;
use rand::Rng;

use crate::clock::SimClock;
use crate::events::SimNode;
use crate::faults::FaultKind;
use crate::state::Shared;

/// Tag of protocol frames.
pub const PROTOCOL_TAG: u64 = 7;

/// Who is where on the simulated network.
#[derive(Debug, Default)]
pub struct Directory {
    pub addrs: BTreeMap<NodeAddr, SocketAddr>,
}

impl Directory {
    fn node_at(&self, addr: SocketAddr) -> Option<NodeAddr> {
        self.addrs.iter().find(|(_, a)| **a == addr).map(|(node, _)| *node)
    }
}

pub struct SimTransport {
    pub node: NodeAddr,
    pub endpoint: Rc<Endpoint>,
    pub directory: Arc<Directory>,
    pub state: Shared,
    pub clock: SimClock,
}

impl Transport for SimTransport {
    async fn send(&self, to: NodeAddr, frame: Vec<u8>) {
        let Some(&dst) = self.directory.addrs.get(&to) else { return };
        let now = self.clock.now_ms();
        let node = SimNode::Protocol(self.node);
        let (copies, delay) = {
            let mut state = self.state.lock();
            let detail = || format!("frame of {} bytes to {to}", frame.len());
            if let NodeAddr::Shard(tablet) = self.node
                && to == NodeAddr::Coordinator
                && state.dropped_reports.contains(&tablet)
            {
                state.scheduled_fault(now, node, FaultKind::MessageDrop, format!("report of {tablet} dropped"));
                return;
            }
            if state.fault(now, node, FaultKind::MessageDrop, detail) {
                return;
            }
            let copies = if state.fault(now, node, FaultKind::MessageDuplicate, detail) { 2 } else { 1 };
            let delay = state.fault(now, node, FaultKind::MessageDelay, detail).then(|| {
                let pinned = state.pinned_delay(self.node, FaultKind::MessageDelay);
                pinned.unwrap_or_else(|| state.rng.gen_range(50..3_000))
            });
            (copies, delay)
        };
        let mut frame = Some(frame);
        for copy in 0..copies {
            let frame = if copy + 1 == copies { frame.take() } else { frame.clone() };
            let payload = Box::new(frame.expect("the last copy takes the frame"));
            match delay {
                Some(delay_ms) if copy == 0 => {
                    let endpoint = self.endpoint.clone();
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        let _ = endpoint.send_to_raw(dst, PROTOCOL_TAG, payload).await;
                    });
                }
                _ => {
                    let _ = self.endpoint.send_to_raw(dst, PROTOCOL_TAG, payload).await;
                }
            }
        }
    }

    async fn recv(&self) -> std::io::Result<(NodeAddr, Vec<u8>)> {
        loop {
            let (payload, from) = self.endpoint.recv_from_raw(PROTOCOL_TAG).await?;
            let (Some(node), Ok(frame)) = (self.directory.node_at(from), payload.downcast::<Vec<u8>>()) else {
                continue;
            };
            // Counted as taken in (see `SimState::messages`).
            self.state.lock().messages += 1;
            return Ok((node, *frame));
        }
    }
}
