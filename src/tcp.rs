//! The real transport: length-prefixed frames over TCP.
//!
//! Each connection carries frames one way. Its first frame is a hello: `LSHELLO`, the protocol version the
//! sender speaks ([`PROTOCOL_VERSION`], u16 little-endian) and the sender's node name; every frame is
//! `u32 little-endian length | payload`, written and flushed at once. A peer that speaks another version is
//! refused (protocol version 1 had no version in its hello: the hello was the node name alone). Delivery is best effort, as the protocol
//! expects: a send that fails drops the connection and the frame, and the next send reconnects. Bad input from
//! the network (an unknown hello, another protocol version, an oversized or cut-off frame) closes that connection and is reported as a
//! [`FrameFault`]; it never panics. Not built under madsim, where the simulated network stands in.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

use crate::io::Transport;
use crate::protocol::{NodeAddr, PROTOCOL_VERSION, decode_frame, encode_frame};

/// Largest frame accepted from the network; anything larger is a protocol violation, not an allocation.
pub const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// Why an incoming connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameFault {
    #[error("connection from {peer}: first frame is not a hello naming a known node: {detail}")]
    BadHello { peer: SocketAddr, detail: String },
    #[error(
        "connection from {peer} ({node}): it speaks protocol version {found} and this node speaks version \
         {expected}: run one build of lockstep on every node"
    )]
    Version { peer: SocketAddr, node: NodeAddr, found: u16, expected: u16 },
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
                write_one(&mut stream, &hello(self.me)).await?;
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
    let from = match parse_hello(&hello) {
        Ok((PROTOCOL_VERSION, from)) if known.contains(&from) => from,
        Ok((PROTOCOL_VERSION, from)) => {
            return Err(FrameFault::BadHello { peer, detail: format!("{from} is not a known node") });
        }
        Ok((found, node)) => return Err(FrameFault::Version { peer, node, found, expected: PROTOCOL_VERSION }),
        Err(detail) => return Err(FrameFault::BadHello { peer, detail }),
    };
    while let Some(frame) = read_frame(&mut stream, peer).await? {
        if frames.send((from, frame)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// What a hello starts with.
const HELLO_MAGIC: &[u8; 7] = b"LSHELLO";

/// The hello `me` opens a connection with.
fn hello(me: NodeAddr) -> Vec<u8> {
    let mut frame = HELLO_MAGIC.to_vec();
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&encode_frame(&me));
    frame
}

/// The protocol version and node a hello names. A hello of protocol version 1 was the node name alone (whose
/// frame never starts with the magic).
fn parse_hello(frame: &[u8]) -> Result<(u16, NodeAddr), String> {
    let Some(rest) = frame.strip_prefix(HELLO_MAGIC) else {
        return decode_frame::<NodeAddr>(frame).map(|node| (1, node)).map_err(|error| error.to_string());
    };
    let (version, node) = rest.split_at_checked(2).ok_or("the hello ends inside its protocol version")?;
    let version = u16::from_le_bytes([version[0], version[1]]);
    let node = decode_frame::<NodeAddr>(node).map_err(|error| error.to_string())?;
    Ok((version, node))
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
            write_one(&mut rogue, &hello(NodeAddr::Coordinator)).await.expect("hello");
            rogue.write_all(&(MAX_FRAME_BYTES + 1).to_le_bytes()).await.expect("length");
            assert!(matches!(b.next_fault().await, Some(FrameFault::Oversized { .. })));

            // The node still takes frames from well-behaved peers.
            a.send(NodeAddr::Shard(TabletId::new(0, 0)), vec![9]).await;
            assert_eq!(b.recv().await.expect("a frame"), (NodeAddr::Coordinator, vec![9]));
        });
    }

    #[test]
    fn a_peer_of_another_protocol_version_is_refused_naming_both_versions() {
        run_local(async {
            let (a, b, b_addr) = pair().await;
            let coordinator = encode_frame(&NodeAddr::Coordinator);
            let newer = [&HELLO_MAGIC[..], &(PROTOCOL_VERSION + 1).to_le_bytes(), &coordinator].concat();
            // Protocol version 1 said hello with the node name alone.
            for (hello, found) in [(coordinator.clone(), 1), (newer, PROTOCOL_VERSION + 1)] {
                let mut rogue = TcpStream::connect(b_addr).await.expect("connect");
                write_one(&mut rogue, &hello).await.expect("hello");
                let fault = b.next_fault().await.expect("a fault");
                let FrameFault::Version { node, found: f, expected, .. } = &fault else { panic!("{fault:?}") };
                assert_eq!((*node, *f, *expected), (NodeAddr::Coordinator, found, PROTOCOL_VERSION));
                let text = fault.to_string();
                let says =
                    format!("it speaks protocol version {found} and this node speaks version {PROTOCOL_VERSION}");
                assert!(text.contains(&says), "{text}");
            }
            let mut rogue = TcpStream::connect(b_addr).await.expect("connect");
            write_one(&mut rogue, &HELLO_MAGIC[..]).await.expect("a cut-off hello");
            let fault = b.next_fault().await.expect("a fault");
            assert!(fault.to_string().contains("the hello ends inside its protocol version"), "{fault}");

            // The node still takes frames from peers of its own version.
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
