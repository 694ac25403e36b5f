//! The real transport: length-prefixed frames over TCP.
//!
//! Each connection carries frames one way. Its first frame is a hello naming the sender; every frame is
//! `u32 little-endian length | payload`, written and flushed at once. Delivery is best effort, as the protocol
//! expects: a send that fails drops the connection and the frame, and the next send reconnects. Bad input from
//! the network (an unknown hello, an oversized or cut-off frame) closes that connection and is reported as a
//! [`FrameFault`]; it never panics. Not built under madsim, where the simulated network stands in.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

use crate::io::Transport;
use crate::protocol::{NodeAddr, decode_frame, encode_frame};

/// Largest frame accepted from the network; anything larger is a protocol violation, not an allocation.
pub const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// Why an incoming connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameFault {
    #[error("connection from {peer}: first frame is not a hello naming a known node: {detail}")]
    BadHello { peer: SocketAddr, detail: String },
    #[error("connection from {peer}: frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    Oversized { peer: SocketAddr, len: u32 },
    #[error("connection from {peer}: {source}")]
    Io { peer: SocketAddr, source: io::Error },
}

type Frame = (NodeAddr, Vec<u8>);

pub struct TcpTransport {
    me: NodeAddr,
    peers: BTreeMap<NodeAddr, SocketAddr>,
    outgoing: Mutex<BTreeMap<NodeAddr, TcpStream>>,
    incoming: Mutex<mpsc::UnboundedReceiver<Frame>>,
    faults: Mutex<mpsc::UnboundedReceiver<FrameFault>>,
}

impl TcpTransport {
    /// Starts accepting on `listener` (a task on the current `LocalSet`) and returns the transport of `me`.
    pub fn start(me: NodeAddr, listener: TcpListener, peers: BTreeMap<NodeAddr, SocketAddr>) -> Self {
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (faults_tx, faults_rx) = mpsc::unbounded_channel();
        let known: Vec<NodeAddr> = peers.keys().copied().collect();
        tokio::task::spawn_local(accept_loop(listener, known, frames_tx, faults_tx));
        Self {
            me,
            peers,
            outgoing: Mutex::new(BTreeMap::new()),
            incoming: Mutex::new(frames_rx),
            faults: Mutex::new(faults_rx),
        }
    }

    /// The next connection that was closed for bad input, if any.
    pub async fn next_fault(&self) -> Option<FrameFault> {
        self.faults.lock().await.recv().await
    }

    async fn write_frame(&self, to: NodeAddr, frame: &[u8]) -> io::Result<()> {
        let mut outgoing = self.outgoing.lock().await;
        let stream = match outgoing.entry(to) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                let addr = self.peers.get(&to).ok_or_else(|| io::Error::other(format!("no address for {to}")))?;
                let mut stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                write_one(&mut stream, &encode_frame(&self.me)).await?;
                entry.insert(stream)
            }
        };
        let written = write_one(stream, frame).await;
        if written.is_err() {
            outgoing.remove(&to);
        }
        written
    }
}

impl Transport for TcpTransport {
    async fn send(&self, to: NodeAddr, frame: Vec<u8>) {
        // Best effort: a lost frame is the protocol's business (it retries), not the transport's.
        let _ = self.write_frame(to, &frame).await;
    }

    async fn recv(&self) -> io::Result<Frame> {
        self.incoming.lock().await.recv().await.ok_or_else(|| io::Error::other("the listener stopped"))
    }
}

async fn write_one(stream: &mut TcpStream, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| io::Error::other("frame longer than u32::MAX"))?;
    stream.write_all(&len.to_le_bytes()).await?;
    stream.write_all(frame).await?;
    stream.flush().await
}

async fn accept_loop(
    listener: TcpListener,
    known: Vec<NodeAddr>,
    frames: mpsc::UnboundedSender<Frame>,
    faults: mpsc::UnboundedSender<FrameFault>,
) {
    while let Ok((stream, peer)) = listener.accept().await {
        let (frames, faults, known) = (frames.clone(), faults.clone(), known.clone());
        tokio::task::spawn_local(async move {
            if let Err(fault) = read_connection(stream, peer, &known, &frames).await {
                let _ = faults.send(fault);
            }
        });
    }
}

/// Reads one connection to its end; `Ok` when the peer closed it cleanly between frames.
async fn read_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    known: &[NodeAddr],
    frames: &mpsc::UnboundedSender<Frame>,
) -> Result<(), FrameFault> {
    let Some(hello) = read_frame(&mut stream, peer).await? else { return Ok(()) };
    let from = match decode_frame::<NodeAddr>(&hello) {
        Ok(from) if known.contains(&from) => from,
        Ok(from) => return Err(FrameFault::BadHello { peer, detail: format!("{from} is not a known node") }),
        Err(error) => return Err(FrameFault::BadHello { peer, detail: error.to_string() }),
    };
    while let Some(frame) = read_frame(&mut stream, peer).await? {
        if frames.send((from, frame)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// One frame, or `None` at a clean end of stream.
async fn read_frame(stream: &mut TcpStream, peer: SocketAddr) -> Result<Option<Vec<u8>>, FrameFault> {
    let mut len_bytes = [0u8; 4];
    match stream.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(source) => return Err(FrameFault::Io { peer, source }),
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_FRAME_BYTES {
        return Err(FrameFault::Oversized { peer, len });
    }
    let mut frame = vec![0u8; len as usize];
    stream.read_exact(&mut frame).await.map_err(|source| FrameFault::Io { peer, source })?;
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TabletId;

    fn run_local<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        tokio::task::LocalSet::new().block_on(&runtime, future)
    }

    async fn pair() -> (TcpTransport, TcpTransport, SocketAddr) {
        let a_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let b_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (a_addr, b_addr) = (a_listener.local_addr().unwrap(), b_listener.local_addr().unwrap());
        let a = NodeAddr::Coordinator;
        let b = NodeAddr::Shard(TabletId::new(0, 0));
        let peers: BTreeMap<NodeAddr, SocketAddr> = [(a, a_addr), (b, b_addr)].into();
        (TcpTransport::start(a, a_listener, peers.clone()), TcpTransport::start(b, b_listener, peers), b_addr)
    }

    #[test]
    fn frames_arrive_in_order_named_by_their_sender() {
        run_local(async {
            let (a, b, _) = pair().await;
            for i in 0..3u8 {
                a.send(NodeAddr::Shard(TabletId::new(0, 0)), vec![i; usize::from(i) + 1]).await;
            }
            for i in 0..3u8 {
                let (from, frame) = b.recv().await.expect("a frame");
                assert_eq!(from, NodeAddr::Coordinator);
                assert_eq!(frame, vec![i; usize::from(i) + 1]);
            }
        });
    }

    #[test]
    fn garbage_and_oversized_frames_close_the_connection_without_a_panic() {
        run_local(async {
            let (a, b, b_addr) = pair().await;
            let mut rogue = TcpStream::connect(b_addr).await.expect("connect");
            write_one(&mut rogue, b"not a hello").await.expect("write");
            assert!(matches!(b.next_fault().await, Some(FrameFault::BadHello { .. })));

            let mut rogue = TcpStream::connect(b_addr).await.expect("connect");
            write_one(&mut rogue, &encode_frame(&NodeAddr::Coordinator)).await.expect("hello");
            rogue.write_all(&(MAX_FRAME_BYTES + 1).to_le_bytes()).await.expect("length");
            assert!(matches!(b.next_fault().await, Some(FrameFault::Oversized { .. })));

            // The node still takes frames from well-behaved peers.
            a.send(NodeAddr::Shard(TabletId::new(0, 0)), vec![9]).await;
            assert_eq!(b.recv().await.expect("a frame"), (NodeAddr::Coordinator, vec![9]));
        });
    }

    #[test]
    fn a_send_to_a_node_that_is_down_is_lost_not_an_error() {
        run_local(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let dead_addr = dead.local_addr().unwrap();
            drop(dead);
            let me = NodeAddr::Coordinator;
            let peers: BTreeMap<NodeAddr, SocketAddr> =
                [(me, listener.local_addr().unwrap()), (NodeAddr::Shard(TabletId::new(0, 1)), dead_addr)].into();
            let transport = TcpTransport::start(me, listener, peers);
            transport.send(NodeAddr::Shard(TabletId::new(0, 1)), vec![1]).await;
            assert!(transport.write_frame(NodeAddr::Shard(TabletId::new(0, 1)), &[1]).await.is_err());
        });
    }
}
