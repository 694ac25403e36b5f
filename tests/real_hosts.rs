//! The production hosts outside the simulator: a coordinator and three shards on a real tokio runtime, with
//! state on real files (fsync), bundles in a directory store or an object store (local files, or S3 over HTTP
//! from a local S3 server), and messages over TCP on loopback; and a publisher and a replica replicating a
//! tablet through an object store on local files. Shows that nothing in the hosts depends on madsim, and that a
//! restore, and a replica, end with the right rows on disk, and a cancel with the restore's table free.
#![cfg(not(madsim))]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use lockstep::bundle::Bundle;
use lockstep::coordinator::{
    CoordinatorConfig, CoordinatorDurable, OperationStatus, ProgressMark, RestoreError, RestoreRequest, SegmentRequest,
};
use lockstep::host::{HostEvent, HostIo, Observer, STATE_FILE};
use lockstep::io::Transport;
use lockstep::io::{DirStore, Disk, FileDisk, ObjectStoreRemote, RemoteStore, StateFile};
use lockstep::model::{
    BackupKind, BackupManifest, CHAIN_FILE_PREFIX, Change, Rows, ShardMap, TableId, TableSpec, TabletId, apply_changes,
};
use lockstep::protocol::{
    ClientAnswer, ClientCall, ClientRequest, Message, NodeAddr, PersistNote, decode_frame, encode_frame,
};
use lockstep::shard::{ShardConfig, ShardDurable};
use lockstep::tcp::TcpTransport;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[path = "support/s3.rs"]
mod s3;

/// Keeps what the hosts report and signals when the operation ends, and when a segment of it ends.
struct Recorder {
    events: RefCell<Vec<(NodeAddr, HostEvent)>>,
    finished: mpsc::UnboundedSender<()>,
    segment_ended: Option<mpsc::UnboundedSender<()>>,
}

impl Recorder {
    fn new(finished: mpsc::UnboundedSender<()>) -> Self {
        Self { events: RefCell::new(Vec::new()), finished, segment_ended: None }
    }
}

impl Observer for Recorder {
    fn record(&self, node: NodeAddr, event: HostEvent) {
        if let HostEvent::Persisted(PersistNote::Coordinator(marks)) = &event {
            if marks.iter().any(|m| matches!(m, ProgressMark::Done { .. } | ProgressMark::Failed { .. })) {
                let _ = self.finished.send(());
            }
            if let Some(segment_ended) = &self.segment_ended
                && marks.iter().any(|m| matches!(m, ProgressMark::AwaitingSegment { .. }))
            {
                let _ = segment_ended.send(());
            }
        }
        self.events.borrow_mut().push((node, event));
    }
}

const SHARDS: u32 = 3;
const TABLE: TableId = TableId(0);

/// The node's directory under the test directory.
fn node_dir(node: NodeAddr) -> String {
    node.to_string().replace('/', "-")
}

/// Writes a full backup and two incrementals into the store; returns the catalog and the expected rows.
async fn write_backups(store: &impl RemoteStore, map: &ShardMap) -> (Vec<BackupManifest>, Rows) {
    let backups: Vec<(u64, BackupKind, Vec<Change>)> = vec![
        (1, BackupKind::Full, (0..30).map(|key| Change::Upsert { key, value: key * 10 }).collect()),
        (2, BackupKind::Incremental, vec![Change::Delete { key: 3 }, Change::Upsert { key: 25, value: 1 }]),
        (3, BackupKind::Incremental, vec![Change::Upsert { key: 3, value: 33 }, Change::Delete { key: 29 }]),
    ];
    let mut expected = Rows::new();
    let mut catalog = Vec::new();
    for (backup_id, kind, changes) in backups {
        apply_changes(&mut expected, &changes);
        let mut shard_objects = Vec::new();
        for shard in map.shards() {
            let tablet = TabletId { table: TABLE, shard };
            let object = BackupManifest::object_name(backup_id, tablet);
            let mine = changes.iter().filter(|c| map.shard_for(c.key()) == shard).copied().collect();
            let bundle = Bundle { backup_id, tablet, kind, changes: mine };
            store.put(&object, bundle.encode()).await.expect("the store takes the bundle");
            shard_objects.push(object);
        }
        let tables = [(TABLE, shard_objects)].into_iter().collect();
        catalog.push(BackupManifest { backup_id, kind, taken_at_ms: backup_id * 1_000, tables });
    }
    (catalog, expected)
}

fn tablets(map: &ShardMap) -> impl Iterator<Item = TabletId> + use<> {
    map.shards().map(|shard| TabletId { table: TABLE, shard })
}

#[test]
fn real_hosts_restore_every_increment_onto_files() {
    restore_onto_files(|dir| DirStore::open(dir).expect("store directory"), InSegments::No);
}

/// The same restore in two segments: to the full backup's time first, then, once the coordinator has durably
/// ended that segment, on to the newest backup at a client's call over TCP.
#[test]
fn real_hosts_restore_in_two_segments_at_a_clients_call() {
    restore_onto_files(|dir| DirStore::open(dir).expect("store directory"), InSegments::Two);
}

/// Whether [`restore_onto_files`] restores in one go or in two segments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InSegments {
    No,
    Two,
}

/// The same restore with its bundles in an object store (the `object_store` crate's local files here; S3, GCS
/// or Azure the same way with that crate's features).
#[test]
fn real_hosts_restore_every_increment_from_an_object_store() {
    restore_onto_files(
        |dir| {
            std::fs::create_dir_all(dir).expect("store directory");
            let local = object_store::local::LocalFileSystem::new_with_prefix(dir).expect("a local object store");
            ObjectStoreRemote::new(std::sync::Arc::new(local))
        },
        InSegments::No,
    );
}

/// The same restore with its bundles in S3: a local S3 server (s3s) reached over HTTP by `object_store`'s S3
/// client, as a restore from AWS would be.
#[test]
fn real_hosts_restore_every_increment_from_s3() {
    restore_onto_files(|dir| ObjectStoreRemote::new(std::sync::Arc::new(s3::client(&s3::serve(dir)))), InSegments::No);
}

/// Starts a coordinator (given `request` to start at boot) and a shard per tablet of `map` on a tokio runtime,
/// each with its state in its own directory under `dir`, the bundles in `store`, and TCP on loopback between them
/// and a client; returns the client's transport.
async fn start_hosts<S: RemoteStore + 'static>(
    dir: &std::path::Path,
    store: Rc<S>,
    recorder: Rc<Recorder>,
    map: &ShardMap,
    request: RestoreRequest,
) -> TcpTransport {
    let nodes: Vec<NodeAddr> = std::iter::once(NodeAddr::Coordinator)
        .chain(tablets(map).map(NodeAddr::Shard))
        .chain([NodeAddr::Client])
        .collect();
    let mut listeners = BTreeMap::new();
    for node in &nodes {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        listeners.insert(*node, listener);
    }
    let peers: BTreeMap<NodeAddr, SocketAddr> =
        listeners.iter().map(|(node, l)| (*node, l.local_addr().expect("bound"))).collect();
    let client =
        TcpTransport::start(NodeAddr::Client, listeners.remove(&NodeAddr::Client).expect("bound"), peers.clone());
    let (epoch, epoch_ms) = lockstep::host::wall_clock_epoch();
    let mut request = Some(request);
    for (node, listener) in listeners {
        let io = HostIo {
            disk: Rc::new(FileDisk::open(dir.join(node_dir(node))).expect("node directory")),
            store: store.clone(),
            transport: Rc::new(TcpTransport::start(node, listener, peers.clone())),
            observer: recorder.clone(),
            epoch,
            epoch_ms,
            download_timeout_ms: 1_000,
            clock: None,
            bug: None,
        };
        match node {
            NodeAddr::Coordinator => {
                let config = CoordinatorConfig { max_in_flight_shards: 2, ..CoordinatorConfig::default() };
                tokio::task::spawn_local(io.run_coordinator(config, 1, request.take()));
            }
            NodeAddr::Shard(shard) => {
                let config = ShardConfig { download_chunk_bytes: 64, ..ShardConfig::default() };
                tokio::task::spawn_local(io.run_shard(shard, config));
            }
            other => unreachable!("{other} runs no host here"),
        }
    }
    client
}

/// The client's call over `client`, retried every 200 ms until the coordinator answers it; returns the answer.
async fn call(client: &TcpTransport, call_id: u64, call: ClientCall) -> ClientAnswer {
    let frame = encode_frame(&Message::Client(ClientRequest { call_id, call }));
    loop {
        client.send(NodeAddr::Coordinator, frame.clone()).await;
        let answer = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                let (from, frame) = client.recv().await.expect("the client's transport is open");
                match decode_frame::<Message>(&frame).expect("a message") {
                    Message::ClientReply(reply) if from == NodeAddr::Coordinator && reply.call_id == call_id => {
                        return reply.answer;
                    }
                    _ => {}
                }
            }
        });
        if let Ok(answer) = answer.await {
            return answer;
        }
    }
}

/// The restore request of the tests: the table `orders` of `map`'s shards from `catalog`, as operation `op` of
/// collection `nightly`, to the newest backup in one go.
fn request_of(op: u64, catalog: &[BackupManifest]) -> RestoreRequest {
    RestoreRequest {
        op,
        collection: "nightly".to_string(),
        tables: vec![TableSpec { id: TABLE, name: "orders".to_string(), shard_count: SHARDS, index_of: None }],
        catalog: catalog.to_vec().into(),
        until_ms: None,
        last_segment: true,
    }
}

/// Restores a full backup and two incrementals with the bundles in the store `open_store` opens on a directory,
/// in one go or in two segments.
fn restore_onto_files<S: RemoteStore + 'static>(open_store: impl FnOnce(&std::path::Path) -> S, segments: InSegments) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let map = ShardMap::even(SHARDS, 30);
    let (recorder, expected) = local.block_on(&runtime, async {
        let store = Rc::new(open_store(&dir.path().join("store")));
        let (catalog, expected) = write_backups(&*store, &map).await;
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let (segment_tx, mut segment_rx) = mpsc::unbounded_channel();
        let recorder = Rc::new(Recorder {
            segment_ended: (segments == InSegments::Two).then_some(segment_tx),
            ..Recorder::new(finished_tx)
        });
        let request = RestoreRequest {
            // In two segments: to the full backup's time first.
            until_ms: (segments == InSegments::Two).then_some(catalog[0].taken_at_ms),
            last_segment: segments == InSegments::No,
            ..request_of(7, &catalog)
        };
        let client = start_hosts(dir.path(), store, recorder.clone(), &map, request).await;
        if segments == InSegments::Two {
            // Once the first segment has durably ended, the last one, to the newest backup.
            segment_rx.recv().await.expect("the recorder is alive");
            let next =
                SegmentRequest { op: 7, segment: 2, until_ms: None, last_segment: true, catalog: catalog.into() };
            let answer = call(&client, 1, ClientCall::Continue(next)).await;
            assert_eq!(answer, ClientAnswer::Continued { op: 7, segment: 2 });
        }
        tokio::time::timeout(Duration::from_secs(20), finished_rx.recv())
            .await
            .expect("the restore ends within 20 s")
            .expect("the recorder is alive");
        (recorder, expected)
    });

    // The durable state on the files, read back as a restarted node would.
    let load = |node: NodeAddr| -> Option<Vec<u8>> {
        let disk = FileDisk::open(dir.path().join(node_dir(node))).expect("node directory");
        StateFile::load(&disk, STATE_FILE).expect("readable state").1
    };
    let coordinator: CoordinatorDurable =
        decode_frame(&load(NodeAddr::Coordinator).expect("coordinator state")).expect("decodable");
    let status = &coordinator.operations.get(&7).expect("an operation").status;
    assert!(matches!(status, OperationStatus::Done { increments: 3, .. }), "{status:?}");
    // The operation's working file (its restore chain) went with its end: only the state file's copies are left.
    let files = FileDisk::open(dir.path().join(node_dir(NodeAddr::Coordinator))).expect("node directory").list();
    let files = files.expect("the directory lists");
    assert!(!files.is_empty() && files.iter().all(|name| name.starts_with(STATE_FILE)), "{files:?}");
    let removed = recorder.events.borrow().iter().any(|(node, event)| {
        *node == NodeAddr::Coordinator
            && matches!(event, HostEvent::Removed(names) if names.len() == 1 && names[0].starts_with(CHAIN_FILE_PREFIX))
    });
    assert!(removed, "the coordinator removed the chain file of the ended operation");

    for tablet in tablets(&map) {
        let state: ShardDurable =
            decode_frame(&load(NodeAddr::Shard(tablet)).expect("shard state")).expect("decodable");
        assert_eq!(state.applied_through, Some(2), "{tablet}");
        assert_eq!(*state.rows, map.rows_of(&expected, tablet.shard), "{tablet}");
    }
    let applied = recorder
        .events
        .borrow()
        .iter()
        .filter(|(_, e)| matches!(e, HostEvent::Persisted(PersistNote::ShardApplied { .. })))
        .count();
    assert_eq!(applied, 3 * SHARDS as usize, "each shard applies each increment exactly once");
    // In two segments the operation waited after the first, its table still restoring (nothing released).
    let waited = recorder.events.borrow().iter().any(|(_, event)| {
        let HostEvent::Persisted(PersistNote::Coordinator(marks)) = event else { return false };
        marks.contains(&ProgressMark::AwaitingSegment { op: 7, segment: 1, increments: 1, released: false })
    });
    assert_eq!(waited, segments == InSegments::Two);
}

/// A store whose reads of one backup's bundles wait until the gate opens: a restore held in the middle of its
/// chain, as a slow store would hold it, for as long as a test needs.
struct Gated<S> {
    inner: S,
    /// Object names with this prefix wait.
    held: String,
    open: tokio::sync::watch::Receiver<bool>,
}

impl<S: RemoteStore> RemoteStore for Gated<S> {
    async fn put(&self, object: &str, bytes: Vec<u8>) -> Result<(), lockstep::protocol::StoreError> {
        self.inner.put(object, bytes).await
    }

    async fn get_range(
        &self,
        object: &str,
        offset: u64,
        len: u64,
    ) -> Result<lockstep::protocol::RangeRead, lockstep::protocol::StoreError> {
        if object.starts_with(&self.held) {
            let mut open = self.open.clone();
            open.wait_for(|open| *open).await.expect("the gate's sender lives as long as the test");
        }
        self.inner.get_range(object, offset, len).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, lockstep::protocol::StoreError> {
        self.inner.list(prefix).await
    }
}

/// An operator cancels a restore over TCP while it runs (held at its last increment by a store that does not
/// answer reads of that backup yet): the cancel is answered, the restore ends Failed (cancelled) on disk with its
/// table free and its collection released, and no shard applies the held increment. A second restore of the same
/// table, once the store answers again, ends Done with the rows of the last backup on every shard.
#[test]
fn real_hosts_cancel_a_running_restore_then_restore_again() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let map = ShardMap::even(SHARDS, 30);
    let load = |node: NodeAddr| -> Vec<u8> {
        let disk = FileDisk::open(dir.path().join(node_dir(node))).expect("node directory");
        StateFile::load(&disk, STATE_FILE).expect("readable state").1.expect("a state")
    };
    let coordinator = || -> CoordinatorDurable { decode_frame(&load(NodeAddr::Coordinator)).expect("decodable") };
    let (recorder, expected) = local.block_on(&runtime, async {
        let (open_tx, open_rx) = tokio::sync::watch::channel(false);
        let inner = DirStore::open(dir.path().join("store")).expect("store directory");
        let held = "backups/000003/".to_string();
        let store = Rc::new(Gated { inner, held, open: open_rx });
        let (catalog, expected) = write_backups(&*store, &map).await;
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let recorder = Rc::new(Recorder::new(finished_tx));
        let client = start_hosts(dir.path(), store, recorder.clone(), &map, request_of(7, &catalog)).await;
        // Once the restore is durably at its last increment, whose reads the store holds, the operator cancels it.
        let at_last = |recorder: &Recorder| {
            recorder.events.borrow().iter().any(|(_, event)| {
                let HostEvent::Persisted(PersistNote::Coordinator(marks)) = event else { return false };
                marks.iter().any(|m| matches!(m, ProgressMark::Running { op: 7, increment: 2, .. }))
            })
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            while !at_last(&recorder) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the restore reaches its last increment within 20 s");
        assert_eq!(call(&client, 1, ClientCall::Cancel { op: 7 }).await, ClientAnswer::Cancelled { op: 7 });
        finished_rx.recv().await.expect("the recorder is alive");
        let durable = coordinator();
        let status = &durable.operations.get(&7).expect("the operation").status;
        assert!(
            matches!(status, OperationStatus::Failed { error: RestoreError::Cancelled { applied: 2 }, .. }),
            "{status:?}"
        );
        assert_eq!(durable.tables.get(&TABLE), Some(&lockstep::coordinator::TableState::RestoreFailed { op: 7 }));
        assert!(durable.sources_in_use.is_empty(), "{:?}", durable.sources_in_use);
        for tablet in tablets(&map) {
            let state: ShardDurable = decode_frame(&load(NodeAddr::Shard(tablet))).expect("decodable");
            assert_eq!(state.applied_through, Some(1), "{tablet} applied the held increment");
        }
        // The table is free: restore it again, the store answering again.
        open_tx.send(true).expect("the store holds the gate");
        assert_eq!(call(&client, 2, ClientCall::Start(request_of(8, &catalog))).await, ClientAnswer::Started { op: 8 });
        tokio::time::timeout(Duration::from_secs(20), async {
            while !matches!(coordinator().operations.get(&8).map(|o| &o.status), Some(OperationStatus::Done { .. })) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the second restore ends Done within 20 s");
        (recorder, expected)
    });
    for tablet in tablets(&map) {
        let state: ShardDurable = decode_frame(&load(NodeAddr::Shard(tablet))).expect("decodable");
        assert_eq!((state.op, state.applied_through), (Some(8), Some(2)), "{tablet}");
        assert_eq!(*state.rows, map.rows_of(&expected, tablet.shard), "{tablet}");
    }
    let cancelled = recorder.events.borrow().iter().any(|(_, event)| {
        matches!(event, HostEvent::Persisted(PersistNote::Coordinator(marks)) if marks.contains(&ProgressMark::Failed { op: 7 }))
    });
    assert!(cancelled, "the cancel was persisted as the operation's end");
}

/// Writes two synced states of a shard into `dir` and returns the paths of the two copies.
fn two_synced_states(dir: &std::path::Path) -> [std::path::PathBuf; 2] {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let disk = FileDisk::open(dir).expect("node directory");
    let (mut file, _) = StateFile::load(&disk, STATE_FILE).expect("an empty directory loads");
    runtime.block_on(async {
        for text in [&b"older"[..], b"newer"] {
            file.write(&disk, text).await.expect("written");
            file.sync(&disk).await.expect("synced");
        }
    });
    [0, 1].map(|slot| dir.join(format!("{STATE_FILE}.{slot}")))
}

/// The host of `node` on the node directory `dir`, with a store beside its files and no peers.
async fn lone_host(
    node: NodeAddr,
    dir: &std::path::Path,
    recorder: Rc<Recorder>,
) -> HostIo<FileDisk, DirStore, TcpTransport, Recorder> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    HostIo {
        disk: Rc::new(FileDisk::open(dir).expect("node directory")),
        store: Rc::new(DirStore::open(dir.join("store")).expect("a store")),
        transport: Rc::new(TcpTransport::start(node, listener, BTreeMap::new())),
        observer: recorder,
        epoch: tokio::time::Instant::now(),
        epoch_ms: 0,
        download_timeout_ms: 1_000,
        clock: None,
        bug: None,
    }
}

/// Boots a shard on the node directory `dir`; it must stop at once with one fatal event, whose text is returned.
fn fatal_of_a_shard_booting_from(dir: &std::path::Path) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let shard = TabletId { table: TABLE, shard: lockstep::model::ShardId(0) };
    let node = NodeAddr::Shard(shard);
    let (finished, _) = mpsc::unbounded_channel();
    let recorder = Rc::new(Recorder::new(finished));
    local.block_on(&runtime, async {
        let io = lone_host(node, dir, recorder.clone()).await;
        tokio::time::timeout(Duration::from_secs(5), io.run_shard(shard, ShardConfig::default()))
            .await
            .expect("the host stops at once");
    });
    let events = recorder.events.borrow();
    let [(who, HostEvent::Fatal(why))] = events.as_slice() else { panic!("one fatal event, got {events:?}") };
    assert_eq!(*who, node);
    why.clone()
}

#[test]
fn a_coordinator_removes_at_boot_the_chain_files_no_operation_refers_to() {
    // What a crash between the persist that ended an operation and the removal of its chain file leaves behind:
    // the file, and a state (here: none) that no longer refers to it. A file the host does not own stays.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let left = format!("{CHAIN_FILE_PREFIX}9-00000000000000aa");
    let disk = FileDisk::open(dir.path()).expect("node directory");
    runtime.block_on(async {
        disk.write(&left, b"a chain").await.expect("written");
        disk.write("notes.txt", b"an operator's").await.expect("written");
        disk.write("chain-notes", b"an operator's too").await.expect("written");
        disk.sync().await.expect("synced");
    });
    let local = tokio::task::LocalSet::new();
    let (finished, _) = mpsc::unbounded_channel();
    let recorder = Rc::new(Recorder::new(finished));
    local.block_on(&runtime, async {
        let io = lone_host(NodeAddr::Coordinator, dir.path(), recorder.clone()).await;
        let run = io.run_coordinator(CoordinatorConfig::default(), 1, None);
        // The coordinator serves until it is stopped; it boots at once.
        let _ = tokio::time::timeout(Duration::from_millis(200), run).await;
    });
    let files = disk.list().expect("the directory lists");
    let kept = ["chain-notes", "notes.txt"].map(String::from);
    assert!(!files.contains(&left) && kept.iter().all(|name| files.contains(name)), "{files:?}");
    let events = recorder.events.borrow();
    let kinds: Vec<&HostEvent> = events.iter().map(|(_, event)| event).take(3).collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [HostEvent::Removing(a), HostEvent::Removed(b), HostEvent::CoordinatorBooted { loaded: None, .. }]
                if *a == vec![left.clone()] && *b == vec![left.clone()]
        ),
        "{events:?}"
    );
}

/// Writes two synced states, changes both copies with `change`, boots a shard on them and returns why it refused
/// to boot, having checked that it left the files as they were (for whoever can read or repair them).
fn refusal_after_changing_both_copies(change: impl Fn(&mut Vec<u8>)) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let slots = two_synced_states(dir.path());
    for path in &slots {
        let mut bytes = std::fs::read(path).expect("a slot");
        change(&mut bytes);
        std::fs::write(path, bytes).expect("changed");
    }
    let before = slots.clone().map(|path| std::fs::read(path).expect("a slot"));
    let why = fatal_of_a_shard_booting_from(dir.path());
    let after = slots.map(|path| std::fs::read(path).expect("a slot"));
    assert_eq!(after, before, "the files are left as they were");
    why
}

/// A shard whose state file is damaged in both copies (no crash does that) refuses to boot and says why: booting
/// empty would restore over a table as if it had never held anything.
#[test]
fn a_host_refuses_to_boot_from_a_state_file_damaged_in_every_copy() {
    let why = refusal_after_changing_both_copies(|bytes| *bytes.last_mut().expect("a payload") ^= 0x01);
    assert!(why.contains("node.state: no intact copy (node.state.0 and node.state.1 present"), "{why}");
}

/// A shard whose state file another build wrote, in another state format, refuses to boot and names both formats.
#[test]
fn a_host_refuses_to_boot_from_a_state_file_of_another_format() {
    // What format 1 wrote after the magic.
    let why = refusal_after_changing_both_copies(|bytes| bytes[3] = b'T');
    let expected = format!("was written in state format 1 and this build reads format {}", lockstep::io::STATE_FORMAT);
    assert!(why.contains(&expected), "{why}");
}

/// A coordinator restarted in the middle of an increment keeps the deadline it persisted: machine time is the wall
/// clock's (`wall_clock_epoch`), so the increment fails when its deadline comes, counted from when it began in the
/// first process. A host that started its machines' clock at 0 on every start (the second run below) moves every
/// persisted deadline later by the time the first process ran. Time is tokio's paused clock, which the hosts'
/// timers follow, so minutes of deadlines pass in an instant and to the millisecond; no shard runs, so the
/// increment cannot finish.
#[test]
fn a_restarted_coordinator_fails_at_the_deadline_it_persisted_not_later() {
    const LIMIT_MS: u64 = 60_000;
    const RESTART_AFTER_MS: u64 = 20_000;
    /// The wall clock at the first start, in ms since 1970, as `wall_clock_epoch` would give it.
    const WALL_AT_START_MS: u64 = 1_700_000_000_000;

    /// Runs the coordinator, kills it after `RESTART_AFTER_MS`, starts it again on the same files, and returns
    /// the time from the first start to the failure, and the failure. `epoch_ms(t)` is the machines' time a
    /// process started `t` ms after the first one begins at.
    fn run(epoch_ms: impl Fn(u64) -> u64) -> (Duration, RestoreError) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
        let local = tokio::task::LocalSet::new();
        let map = ShardMap::even(SHARDS, 30);
        let node = NodeAddr::Coordinator;
        local.block_on(&runtime, async {
            let store = Rc::new(DirStore::open(dir.path().join("store")).expect("a store"));
            let (catalog, _) = write_backups(&*store, &map).await;
            let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
            let recorder = Rc::new(Recorder::new(finished_tx));
            let config = CoordinatorConfig { increment_deadline_ms: LIMIT_MS, ..CoordinatorConfig::default() };
            let began = tokio::time::Instant::now();
            let process = |started_after_ms: u64, listener: TcpListener| HostIo {
                disk: Rc::new(FileDisk::open(dir.path().join(node_dir(node))).expect("node directory")),
                store: store.clone(),
                // No shard has an address: every request is lost, and the increment cannot finish.
                transport: Rc::new(TcpTransport::start(node, listener, BTreeMap::new())),
                observer: recorder.clone(),
                epoch: tokio::time::Instant::now(),
                epoch_ms: epoch_ms(started_after_ms),
                download_timeout_ms: 1_000,
                clock: None,
                bug: None,
            };
            let table = TableSpec { id: TABLE, name: "orders".to_string(), shard_count: SHARDS, index_of: None };
            let request = RestoreRequest {
                op: 7,
                collection: "nightly".to_string(),
                tables: vec![table],
                catalog: catalog.into(),
                until_ms: None,
                last_segment: true,
            };
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
            let first = process(0, listener).run_coordinator(config.clone(), 1, Some(request));
            let killed = tokio::time::timeout(Duration::from_millis(RESTART_AFTER_MS), first).await;
            assert!(killed.is_err(), "the first process runs until it is killed");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
            let second = process(RESTART_AFTER_MS, listener).run_coordinator(config, 1, None);
            tokio::task::spawn_local(second);
            tokio::time::timeout(Duration::from_secs(600), finished_rx.recv())
                .await
                .expect("the operation ends within ten minutes")
                .expect("the recorder is alive");
            let failed_after = began.elapsed();
            let state = FileDisk::open(dir.path().join(node_dir(node))).expect("node directory");
            let bytes = StateFile::load(&state, STATE_FILE).expect("readable state").1.expect("a state");
            let durable: CoordinatorDurable = decode_frame(&bytes).expect("decodable");
            let OperationStatus::Failed { error, .. } = &durable.operations[&7].status else {
                panic!("the operation failed: {:?}", durable.operations[&7].status)
            };
            (failed_after, error.clone())
        })
    }

    let (failed_after, error) = run(|started_after_ms| WALL_AT_START_MS + started_after_ms);
    assert!(
        matches!(error, RestoreError::IncrementDeadlineExceeded { increment: 0, limit_ms: LIMIT_MS, .. }),
        "{error}"
    );
    let deadline = Duration::from_millis(LIMIT_MS);
    assert!(
        failed_after >= deadline && failed_after < deadline + Duration::from_secs(1),
        "the increment fails at its deadline, {deadline:?} after it began, not {failed_after:?}"
    );

    // A machine clock that starts over at 0 with each process waits the whole limit again from the restart.
    let (failed_after, _) = run(|_| 0);
    let late = Duration::from_millis(RESTART_AFTER_MS + LIMIT_MS);
    assert!(failed_after >= late, "a clock that starts over fails late: {failed_after:?}");
}

/// A coordinator's state names its running operation's chain file once that file is durable. Read back from a
/// node's directory, such a state needs the file: without it, or with another chain in it, loading is refused
/// naming the file (no crash loses a synced file); with it, the state comes back whole.
#[test]
fn a_state_that_names_its_chain_file_is_read_back_whole_only_with_that_file() {
    use lockstep::coordinator::Coordinator;
    use lockstep::host::{DurableState, load_state};

    let table = TableSpec { id: TABLE, name: "orders".to_string(), shard_count: SHARDS, index_of: None };
    let manifest = |backup_id: u64, kind| {
        let objects = table.tablets().map(|tablet| BackupManifest::object_name(backup_id, tablet)).collect();
        BackupManifest { backup_id, kind, taken_at_ms: backup_id * 1_000, tables: BTreeMap::from([(TABLE, objects)]) }
    };
    let catalog = vec![manifest(1, BackupKind::Full), manifest(2, BackupKind::Incremental)];
    let request = RestoreRequest {
        op: 7,
        collection: "nightly".to_string(),
        tables: vec![table.clone()],
        catalog: catalog.into(),
        until_ms: None,
        last_segment: true,
    };
    let (mut coordinator, _) = Coordinator::boot(CoordinatorConfig::default(), None, 1, 0);
    coordinator.start(0, request).expect("the restore starts");
    let durable = coordinator.durable().clone();
    let files: Vec<(String, Vec<u8>)> = durable.unstored_files().into_iter().map(|(n, b)| (n, b.to_vec())).collect();
    let [(name, chain)] = files.as_slice() else { panic!("one chain file, got {files:?}") };
    durable.mark_stored();

    let dir = tempfile::tempdir().expect("a temporary directory");
    let disk = FileDisk::open(dir.path()).expect("node directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let (mut file, _) = StateFile::load(&disk, STATE_FILE).expect("an empty directory loads");
        file.write_state(&disk, &durable).await.expect("written");
        file.sync(&disk).await.expect("synced");
    });
    let load = || load_state::<_, CoordinatorDurable>(&disk).map(|(_, state)| state);
    let missing = load().expect_err("the chain file is missing");
    assert!(missing.ends_with(&format!("refers to a file that cannot be read back: {name} is missing")), "{missing}");
    std::fs::write(dir.path().join(name), &chain[..chain.len() / 2]).expect("written");
    let damaged = load().expect_err("the chain file is damaged");
    assert!(damaged.contains(&format!("{name}: restore chain of")), "{damaged}");
    std::fs::write(dir.path().join(name), chain).expect("written");
    assert_eq!(load().expect("loads"), Some(durable));
}

/// Keeps what the replication hosts report and signals once the replica has made `last` durable.
struct ReplicationRecorder {
    events: RefCell<Vec<(NodeAddr, HostEvent)>>,
    last: lockstep::replication::Version,
    finished: mpsc::UnboundedSender<()>,
}

impl Observer for ReplicationRecorder {
    fn record(&self, node: NodeAddr, event: HostEvent) {
        if let HostEvent::Persisted(PersistNote::Replicated { applied_through, .. }) = &event
            && *applied_through == self.last
        {
            let _ = self.finished.send(());
        }
        self.events.borrow_mut().push((node, event));
    }
}

/// A database's commits, all committed already.
struct Committed(Vec<Vec<Change>>);

impl lockstep::host::CommitFeed for Committed {
    async fn next(&self, after: u64) -> Option<(u64, Vec<Change>)> {
        let changes = self.0.get(usize::try_from(after).ok()?)?.clone();
        Some((after + 1, changes))
    }
}

/// Replication for real: a publisher on its own files pushes three committed versions to an object store on
/// local files, and a replica on its own files initializes from them; both durable states read back as
/// restarted nodes would read them.
#[test]
fn real_hosts_replicate_through_an_object_store() {
    use lockstep::replication::{PublisherConfig, PublisherDurable, ReplicaConfig, ReplicaDurable};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let versions: Vec<Vec<Change>> = vec![
        (0..40).map(|key| Change::Upsert { key, value: key * 10 }).collect(),
        vec![Change::Delete { key: 3 }, Change::Upsert { key: 25, value: 1 }],
        vec![Change::Upsert { key: 3, value: 33 }, Change::Delete { key: 39 }],
    ];
    let mut expected = Rows::new();
    versions.iter().for_each(|changes| apply_changes(&mut expected, changes));
    let tablet = TabletId { table: TABLE, shard: lockstep::model::ShardId(0) };
    let recorder = local.block_on(&runtime, async {
        std::fs::create_dir_all(dir.path().join("store")).expect("store directory");
        let objects = object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("store"));
        let store = Rc::new(ObjectStoreRemote::new(std::sync::Arc::new(objects.expect("a local object store"))));
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let recorder =
            Rc::new(ReplicationRecorder { events: RefCell::new(Vec::new()), last: 3, finished: finished_tx });
        let (epoch, epoch_ms) = lockstep::host::wall_clock_epoch();
        for node in [NodeAddr::Publisher, NodeAddr::Replica] {
            let io = HostIo {
                disk: Rc::new(FileDisk::open(dir.path().join(node_dir(node))).expect("node directory")),
                store: store.clone(),
                // The replication roles talk to the store only.
                transport: Rc::new(lockstep::io::NoPeers),
                observer: recorder.clone(),
                epoch,
                epoch_ms,
                download_timeout_ms: 1_000,
                clock: None,
                bug: None,
            };
            let stream = "orders".to_string();
            if node == NodeAddr::Publisher {
                let feed = Rc::new(Committed(versions.clone()));
                tokio::task::spawn_local(io.run_publisher(stream, tablet, PublisherConfig::default(), 1, feed));
            } else {
                let config =
                    ReplicaConfig { download_chunk_bytes: 64, pull_interval_ms: 20, ..ReplicaConfig::default() };
                tokio::task::spawn_local(io.run_replica(stream, tablet, config));
            }
        }
        tokio::time::timeout(Duration::from_secs(20), finished_rx.recv())
            .await
            .expect("the replica catches up within 20 s")
            .expect("the recorder is alive");
        // The publisher's last acknowledgement may still be on its way to its disk.
        for _ in 0..200 {
            let pushed =
                recorder.events.borrow().iter().any(|(_, event)| {
                    matches!(event, HostEvent::Persisted(PersistNote::Published { pushed_through: 3 }))
                });
            if pushed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        recorder
    });

    let disk = |node: NodeAddr| FileDisk::open(dir.path().join(node_dir(node))).expect("node directory");
    let (_, publisher) = lockstep::host::load_state::<_, PublisherDurable>(&disk(NodeAddr::Publisher)).unwrap();
    assert_eq!(publisher, Some(PublisherDurable { pushed_through: 3 }));
    let (_, replica) = lockstep::host::load_state::<_, ReplicaDurable>(&disk(NodeAddr::Replica)).unwrap();
    let replica = replica.expect("the replica's state");
    assert_eq!(replica.applied_through, 3);
    assert_eq!(*replica.rows, expected);
    let applied: Vec<u64> = recorder
        .events
        .borrow()
        .iter()
        .filter_map(|(_, event)| match event {
            HostEvent::Persisted(PersistNote::Replicated { applied_through, .. }) => Some(*applied_through),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![1, 2, 3], "each version applied once, in order");
    let stored: Vec<String> = std::fs::read_dir(dir.path().join("store/replication/orders"))
        .expect("the stream's directory")
        .map(|entry| entry.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(stored.len(), 3, "{stored:?}");
}

/// A feed that skips version 2.
struct Skipping;

impl lockstep::host::CommitFeed for Skipping {
    async fn next(&self, after: u64) -> Option<(u64, Vec<Change>)> {
        let version = if after == 1 { 3 } else { after + 1 };
        (version <= 3).then(|| (version, vec![Change::Upsert { key: version, value: 1 }]))
    }
}

/// A commit feed that hands a version out of order stops the publisher with a fatal event naming both
/// versions; nothing panics, and nothing past the gap is pushed.
#[test]
fn a_commit_feed_that_skips_a_version_stops_the_publisher() {
    use lockstep::replication::PublisherConfig;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let events = local.block_on(&runtime, async {
        let (finished_tx, _finished_rx) = mpsc::unbounded_channel();
        let recorder =
            Rc::new(ReplicationRecorder { events: RefCell::new(Vec::new()), last: 3, finished: finished_tx });
        let io = HostIo {
            disk: Rc::new(FileDisk::open(dir.path().join("publisher")).expect("node directory")),
            store: Rc::new(DirStore::open(dir.path().join("store")).expect("a store")),
            transport: Rc::new(lockstep::io::NoPeers),
            observer: recorder.clone(),
            epoch: tokio::time::Instant::now(),
            epoch_ms: 0,
            download_timeout_ms: 1_000,
            clock: None,
            bug: None,
        };
        let tablet = TabletId { table: TABLE, shard: lockstep::model::ShardId(0) };
        let publisher =
            io.run_publisher("orders".to_string(), tablet, PublisherConfig::default(), 1, Rc::new(Skipping));
        tokio::task::spawn_local(publisher);
        for _ in 0..500 {
            if recorder.events.borrow().iter().any(|(_, event)| matches!(event, HostEvent::Fatal(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        recorder.events.take()
    });
    let fatal: Vec<&String> = events
        .iter()
        .filter_map(|(_, event)| match event {
            HostEvent::Fatal(text) => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(fatal, vec!["the commit feed handed over version 3 after version 1"], "{events:?}");
    let committed: Vec<u64> = events
        .iter()
        .filter_map(|(_, event)| match event {
            HostEvent::Committed { version } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(committed, vec![1]);
}
