//! The IO interfaces the hosts carry out outputs with, the durable state file format on top of a [`Disk`], and
//! the real adapters (files with fsync, a directory or any `object_store` store as an object store).

use std::future::Future;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

use crate::protocol::{NodeAddr, RangeRead, StoreError, encode_frame_after};

/// A node's local disk: named files, writes that are durable only after `sync`.
pub trait Disk {
    /// The file's content, `None` if there is no such file. A node boots from what it reads and takes it as
    /// durable: where a read can return writes not yet synced (a page cache surviving the node's crash), the
    /// read makes them durable first.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the file's content. Not durable until [`Disk::sync`] returns.
    fn write(&self, name: &str, bytes: &[u8]) -> impl Future<Output = io::Result<()>>;
    /// Makes every earlier write and removal durable.
    fn sync(&self) -> impl Future<Output = io::Result<()>>;
    /// The names of the files there are, in name order, as this node's own writes and removals left them.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Removes the file, if there is one. Not durable until [`Disk::sync`] returns.
    fn remove(&self, name: &str) -> impl Future<Output = io::Result<()>>;
}

/// An S3-like object store.
pub trait RemoteStore {
    fn put(&self, object: &str, bytes: Vec<u8>) -> impl Future<Output = Result<(), StoreError>>;
    /// Reads up to `len` bytes from `offset`; a shorter read is allowed and the caller resumes.
    fn get_range(&self, object: &str, offset: u64, len: u64) -> impl Future<Output = Result<RangeRead, StoreError>>;
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>>;
}

/// Carries serde-encoded frames between nodes. Delivery is best effort: frames may be lost.
pub trait Transport {
    fn send(&self, to: NodeAddr, frame: Vec<u8>) -> impl Future<Output = ()>;
    fn recv(&self) -> impl Future<Output = io::Result<(NodeAddr, Vec<u8>)>>;
}

/// The transport of a node that talks to no peer, only to the store: the replication roles. It sends nothing
/// anywhere and never receives a frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl Transport for NoPeers {
    async fn send(&self, _to: NodeAddr, _frame: Vec<u8>) {}

    async fn recv(&self) -> io::Result<(NodeAddr, Vec<u8>)> {
        std::future::pending().await
    }
}

/// The encoding of the durable states a state file holds (each machine's durable type, as a postcard frame).
/// Raised whenever one of those types changes how it encodes: a node refuses to boot from a state file of
/// another format, saying so, instead of failing to decode it or, worse, decoding it as something else. The
/// tests pin the encoding of sample states (`durable_encodings_are_pinned_to_the_state_format`), so a change
/// cannot land without raising it.
pub const STATE_FORMAT: u8 = 5;
/// A state file's header: `LSS`, the format (a byte; format 1 wrote `T` there), the sequence number, the
/// payload's length and the payload's checksum.
const STATE_MAGIC: &[u8; 3] = b"LSS";
/// What format 1, which carried no number, wrote after the magic.
const FORMAT_1_MARK: u8 = b'T';
// A format numbered like format 1's mark would be read as format 1.
const _: () = assert!(STATE_FORMAT != FORMAT_1_MARK && STATE_FORMAT > 1);
const STATE_HEADER_LEN: usize = 20;

/// Durable state kept in two slots, each with a sequence number and a checksum. A write goes to the slot that does
/// not hold the newest synced state, and [`StateFile::sync`] makes it the newest synced state: a crash that tears
/// the write in progress damages only the slot being written, so a torn write never loses state that was
/// acknowledged as durable, however many writes came between two syncs.
#[derive(Clone, Debug)]
pub struct StateFile {
    name: String,
    /// Sequence number of the last state written or loaded.
    seq: u64,
    /// The slot holding the newest state known to be durable (loaded, or written and then synced through
    /// [`StateFile::sync`]); `None` before any.
    synced_slot: Option<u64>,
    /// The slot the last write went to, durable once synced.
    written_slot: Option<u64>,
    /// The slot last written, kept to encode the next one in place without allocating.
    slot: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state file {name}: {source}")]
    Io { name: String, source: io::Error },
    /// Every copy on disk fails its check, which no crash does (a crash tears only the write in progress, and the
    /// first write goes to slot 1): the state was damaged from outside. Booting empty would forget it.
    #[error(
        "state file {name}: no intact copy ({slots} present, each failing its checksum or header); the node will not \
         boot from nothing over state it once had: restore the files or remove them deliberately"
    )]
    Damaged { name: String, slots: String },
    /// The newest intact copy was written in another state format (by another build of lockstep).
    #[error(
        "state file {name} was written in state format {found} and this build reads format {expected}: boot the \
         node with the build that wrote it (letting its operations finish), or remove the files deliberately"
    )]
    Format { name: String, found: u8, expected: u8 },
}

impl StateFile {
    /// Loads the newest intact slot of state `name`; `None` when nothing intact was ever synced.
    pub fn load<D: Disk>(disk: &D, name: &str) -> Result<(Self, Option<Vec<u8>>), StateError> {
        let read = |slot: u64| {
            let path = slot_name(name, slot);
            disk.read(&path).map_err(|source| StateError::Io { name: path.clone(), source })
        };
        let mut copies = [read(0)?, read(1)?];
        let present = [copies[0].is_some(), copies[1].is_some()];
        // The newest copy by the sequence number its header claims first (slot 0 first on a tie): it is checked
        // against its checksum, and the older one only if it fails, so an intact newest copy is hashed alone.
        let claimed = [0, 1].map(|slot: usize| copies[slot].as_deref().and_then(slot_header).map(|header| header.seq));
        let order = if claimed[1] > claimed[0] { [1, 0] } else { [0, 1] };
        // Slot, format and payload of the newest intact copy.
        let mut best: Option<(u64, u8, Vec<u8>)> = None;
        for slot in order {
            if let Some(bytes) = copies[slot].take()
                && let Some(format) = intact_slot(&bytes)
            {
                let mut payload = bytes;
                payload.drain(..STATE_HEADER_LEN);
                best = Some((slot as u64, format, payload));
                break;
            }
        }
        // Nothing intact, yet something on disk. The one way a crash leaves that is the very first write torn:
        // slot 1 damaged and slot 0 never written. That state was never synced, so booting empty is right.
        let first_write_torn = present == [false, true];
        if best.is_none() && present != [false, false] && !first_write_torn {
            let damaged: Vec<String> =
                (0..2).filter(|&slot| present[slot as usize]).map(|s| slot_name(name, s)).collect();
            return Err(StateError::Damaged { name: name.to_string(), slots: damaged.join(" and ") });
        }
        if let Some((slot, found, _)) = &best
            && *found != STATE_FORMAT
        {
            let name = slot_name(name, *slot);
            return Err(StateError::Format { name, found: *found, expected: STATE_FORMAT });
        }
        let seq = best.as_ref().and_then(|(slot, _, _)| claimed[*slot as usize]).unwrap_or(0);
        let synced_slot = best.as_ref().map(|(slot, _, _)| *slot);
        let file = Self { name: name.to_string(), seq, synced_slot, written_slot: None, slot: Vec::new() };
        Ok((file, best.map(|(_, _, payload)| payload)))
    }

    /// Syncs `disk` and with it the last write, which becomes the newest synced state: the next write goes to the
    /// other slot. Syncing the disk some other way leaves this file writing where it did.
    pub async fn sync<D: Disk>(&mut self, disk: &D) -> io::Result<()> {
        disk.sync().await?;
        if let Some(slot) = self.written_slot.take() {
            self.synced_slot = Some(slot);
        }
        Ok(())
    }

    /// Writes `payload` into the slot not holding the newest synced state. Durable after [`StateFile::sync`].
    pub async fn write<D: Disk>(&mut self, disk: &D, payload: &[u8]) -> io::Result<()> {
        let mut slot = std::mem::take(&mut self.slot);
        slot.clear();
        slot.extend_from_slice(&[0; STATE_HEADER_LEN]);
        slot.extend_from_slice(payload);
        self.write_slot(disk, slot).await
    }

    /// Encodes `state` as a frame ([`crate::protocol::encode_frame`]) straight into the slot not holding the
    /// newest synced state and writes it. Durable after [`StateFile::sync`].
    pub async fn write_state<D: Disk, T: Serialize>(&mut self, disk: &D, state: &T) -> io::Result<()> {
        let mut slot = std::mem::take(&mut self.slot);
        slot.clear();
        slot.extend_from_slice(&[0; STATE_HEADER_LEN]);
        self.write_slot(disk, encode_frame_after(state, slot)).await
    }

    /// Fills in the header of `slot` (header space, then the payload) and writes it.
    async fn write_slot<D: Disk>(&mut self, disk: &D, mut slot: Vec<u8>) -> io::Result<()> {
        self.seq += 1;
        let payload = &slot[STATE_HEADER_LEN..];
        let len = u32::try_from(payload.len()).expect("state fits in u32");
        let crc = crc32fast::hash(payload);
        slot[0..3].copy_from_slice(STATE_MAGIC);
        slot[3] = STATE_FORMAT;
        slot[4..12].copy_from_slice(&self.seq.to_le_bytes());
        slot[12..16].copy_from_slice(&len.to_le_bytes());
        slot[16..20].copy_from_slice(&crc.to_le_bytes());
        let target = self.synced_slot.map_or(1, |synced| 1 - synced);
        let written = disk.write(&slot_name(&self.name, target), &slot).await;
        self.written_slot = Some(target);
        self.slot = slot;
        written
    }
}

fn slot_name(name: &str, slot: u64) -> String {
    let mut path = String::with_capacity(name.len() + 2);
    path.push_str(name);
    path.push_str(if slot == 0 { ".0" } else { ".1" });
    path
}

/// What a copy's header claims; `None` when there is no header at all.
struct SlotHeader {
    seq: u64,
    format: u8,
    len: usize,
    crc: u32,
}

fn slot_header(bytes: &[u8]) -> Option<SlotHeader> {
    if bytes.len() < STATE_HEADER_LEN || &bytes[0..3] != STATE_MAGIC {
        return None;
    }
    Some(SlotHeader {
        format: if bytes[3] == FORMAT_1_MARK { 1 } else { bytes[3] },
        seq: u64::from_le_bytes(bytes[4..12].try_into().ok()?),
        len: u32::from_le_bytes(bytes[12..16].try_into().ok()?) as usize,
        crc: u32::from_le_bytes(bytes[16..20].try_into().ok()?),
    })
}

/// The format of an intact copy (its header whole, its payload of the length and checksum the header gives);
/// `None` for a damaged one.
fn intact_slot(bytes: &[u8]) -> Option<u8> {
    let header = slot_header(bytes)?;
    let payload = &bytes[STATE_HEADER_LEN..];
    (payload.len() == header.len && crc32fast::hash(payload) == header.crc).then_some(header.format)
}

/// A real disk: one directory, files written in place and made durable with fsync (files and directory), on
/// sync and on read.
pub struct FileDisk {
    dir: PathBuf,
    unsynced: std::cell::RefCell<Vec<PathBuf>>,
}

impl FileDisk {
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, unsynced: Default::default() })
    }
}

impl Disk for FileDisk {
    /// Reads a file and makes what it read durable (fsync of the file and the directory) before returning it.
    /// A node that crashed (the process, not the machine) may have left a write unsynced in the page cache; its
    /// state file treats what it loads at boot as synced and writes over the other slot next, so what was loaded
    /// must not be lost to a power cut after that.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut file = match std::fs::File::open(self.dir.join(name)) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes)?;
        file.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(Some(bytes))
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes)?;
        self.unsynced.borrow_mut().push(path);
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        let paths: Vec<PathBuf> = self.unsynced.borrow_mut().drain(..).collect();
        for path in paths {
            std::fs::File::open(&path)?.sync_all()?;
        }
        // The directory's own sync makes removals durable too.
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Files only: a name that is not valid UTF-8 was not written by a node, and is left out.
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Ok(name) = entry.file_name().into_string()
            {
                names.push(name);
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.dir.join(name);
        // A removed file must not be synced by name later.
        self.unsynced.borrow_mut().retain(|unsynced| *unsynced != path);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

/// A real object store on a local directory: object names are relative paths.
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn path_of(&self, object: &str) -> Result<PathBuf, StoreError> {
        let safe = !object.is_empty()
            && std::path::Path::new(object).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if safe { Ok(self.root.join(object)) } else { Err(StoreError::NotFound { object: object.to_string() }) }
    }
}

fn unavailable(error: io::Error) -> StoreError {
    StoreError::Unavailable { detail: error.to_string() }
}

impl RemoteStore for DirStore {
    async fn put(&self, object: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path_of(object)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(unavailable)?;
        }
        std::fs::write(path, bytes).map_err(unavailable)
    }

    /// Reads only the range asked for, as a ranged GET does, not the whole object.
    async fn get_range(&self, object: &str, offset: u64, len: u64) -> Result<RangeRead, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(self.path_of(object)?) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { object: object.to_string() });
            }
            Err(error) => return Err(unavailable(error)),
        };
        let total_len = file.metadata().map_err(unavailable)?.len();
        if offset > total_len {
            return Err(StoreError::BadRange { object: object.to_string(), offset, len: total_len });
        }
        let want = len.min(total_len - offset);
        let mut bytes = Vec::with_capacity(usize::try_from(want).map_err(|_| StoreError::BadRange {
            object: object.to_string(),
            offset,
            len: total_len,
        })?);
        file.seek(SeekFrom::Start(offset)).map_err(unavailable)?;
        file.take(want).read_to_end(&mut bytes).map_err(unavailable)?;
        Ok(RangeRead { bytes: bytes.into(), total_len })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(unavailable)? {
                let path = entry.map_err(unavailable)?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.root) {
                    let name = relative.to_string_lossy().replace('\\', "/");
                    if name.starts_with(prefix) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Any store the `object_store` crate reaches (S3, GCS, Azure with their features; local files; memory) as a
/// [`RemoteStore`]: object names are its paths, a ranged read is one ranged GET, and a listing keeps the names
/// that start with the prefix (the crate lists by whole path segments).
#[cfg(not(madsim))]
pub struct ObjectStoreRemote {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
}

#[cfg(not(madsim))]
impl ObjectStoreRemote {
    pub fn new(inner: std::sync::Arc<dyn object_store::ObjectStore>) -> Self {
        Self { inner }
    }

    /// The store's path for `object`; a name no object can have (empty, `..`, an empty segment) is not found.
    fn path_of(object: &str) -> Result<object_store::path::Path, StoreError> {
        object_store::path::Path::parse(object)
            .ok()
            .filter(|path| !object.is_empty() && path.as_ref() == object)
            .ok_or_else(|| StoreError::NotFound { object: object.to_string() })
    }

    /// The length of `object`, from a HEAD request.
    async fn len_of(&self, object: &str, path: &object_store::path::Path) -> Result<u64, StoreError> {
        let head = object_store::GetOptions { head: true, ..Default::default() };
        let result = self.inner.get_opts(path, head).await.map_err(|e| store_error(object, e))?;
        Ok(result.meta.size)
    }
}

/// The end of the largest range [`ObjectStoreRemote`] asks for as such: 5 TiB, the most an S3 object holds.
#[cfg(not(madsim))]
const MAX_RANGE_END: u64 = 5 << 40;

/// A missing object is [`StoreError::NotFound`]; anything else the store says is transient.
#[cfg(not(madsim))]
fn store_error(object: &str, error: object_store::Error) -> StoreError {
    match error {
        object_store::Error::NotFound { .. } => StoreError::NotFound { object: object.to_string() },
        other => StoreError::Unavailable { detail: other.to_string() },
    }
}

#[cfg(not(madsim))]
impl RemoteStore for ObjectStoreRemote {
    async fn put(&self, object: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let path = Self::path_of(object)?;
        let payload = object_store::PutPayload::from(bytes);
        self.inner.put_opts(&path, payload, Default::default()).await.map_err(|e| store_error(object, e))?;
        Ok(())
    }

    async fn get_range(&self, object: &str, offset: u64, len: u64) -> Result<RangeRead, StoreError> {
        let path = Self::path_of(object)?;
        if len > 0 {
            // A range that ends past what any object holds is asked as "from the offset on": S3 servers refuse
            // a range header with an end near 2^64 ("bytes=0-18446744073709551614" is an invalid argument).
            let range = match offset.checked_add(len).filter(|end| *end <= MAX_RANGE_END) {
                Some(end) => object_store::GetRange::Bounded(offset..end),
                None => object_store::GetRange::Offset(offset),
            };
            let options = object_store::GetOptions { range: Some(range), ..Default::default() };
            match self.inner.get_opts(&path, options).await {
                Ok(result) => {
                    let total_len = result.meta.size;
                    let bytes = result.bytes().await.map_err(|e| store_error(object, e))?;
                    return Ok(RangeRead { bytes, total_len });
                }
                Err(error @ object_store::Error::NotFound { .. }) => return Err(store_error(object, error)),
                // Stores refuse a range that starts at the end or past it: the length below tells which.
                Err(_) => {}
            }
        }
        let total_len = self.len_of(object, &path).await?;
        if offset > total_len {
            return Err(StoreError::BadRange { object: object.to_string(), offset, len: total_len });
        }
        if offset < total_len && len > 0 {
            let detail = format!("the store refused bytes {offset}.. of {object} ({total_len} bytes)");
            return Err(StoreError::Unavailable { detail });
        }
        Ok(RangeRead { bytes: bytes::Bytes::new(), total_len })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures_util::TryStreamExt;
        let dir = prefix.rsplit_once('/').map(|(dir, _)| dir).filter(|dir| !dir.is_empty());
        let dir = match dir.map(object_store::path::Path::parse) {
            None => None,
            Some(Ok(dir)) => Some(dir),
            // No object's name starts with a prefix that is not a path.
            Some(Err(_)) => return Ok(Vec::new()),
        };
        let listed: Vec<object_store::ObjectMeta> =
            self.inner.list(dir.as_ref()).try_collect().await.map_err(|e| store_error(prefix, e))?;
        let mut names: Vec<String> =
            listed.into_iter().map(|meta| meta.location.to_string()).filter(|name| name.starts_with(prefix)).collect();
        names.sort();
        Ok(names)
    }
}

/// The ranged read of `object` = `bytes` that a well-behaved store returns: a slice of `bytes`, not a copy.
pub fn range_of(object: &str, bytes: &bytes::Bytes, offset: u64, len: u64) -> Result<RangeRead, StoreError> {
    let total_len = bytes.len() as u64;
    if offset > total_len {
        return Err(StoreError::BadRange { object: object.to_string(), offset, len: total_len });
    }
    let end = offset.saturating_add(len).min(total_len);
    Ok(RangeRead { bytes: bytes.slice(offset as usize..end as usize), total_len })
}

/// A local S3 server for the tests below.
#[cfg(all(test, not(madsim)))]
#[path = "../tests/support/s3.rs"]
mod test_s3;

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        // The real adapters never await anything that is not ready, so polling once finishes them.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("real adapters complete without waiting"),
        }
    }

    #[test]
    fn state_file_survives_a_torn_write_of_the_newer_slot() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::open(dir.path()).unwrap();
        let (mut file, loaded) = StateFile::load(&disk, "state").unwrap();
        assert_eq!(loaded, None);
        block_on(file.write(&disk, b"first")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        block_on(file.write(&disk, b"second")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        let (_, loaded) = StateFile::load(&disk, "state").unwrap();
        assert_eq!(loaded.as_deref(), Some(&b"second"[..]));
        // Tear the newest slot: keep half of it.
        let newest = dir.path().join("state.0");
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let (mut file, loaded) = StateFile::load(&disk, "state").unwrap();
        assert_eq!(loaded.as_deref(), Some(&b"first"[..]));
        // The next write goes to the torn slot, not over the intact one.
        block_on(file.write(&disk, b"third")).unwrap();
        let (_, loaded) = StateFile::load(&disk, "state").unwrap();
        assert_eq!(loaded.as_deref(), Some(&b"third"[..]));
    }

    #[test]
    fn state_file_damaged_in_every_copy_is_refused_but_a_torn_first_write_boots_empty() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::open(dir.path()).unwrap();
        let (mut file, _) = StateFile::load(&disk, "state").unwrap();
        block_on(file.write(&disk, b"first")).unwrap();
        // The first write torn by a crash, never synced: nothing was durable, the node boots empty.
        let slot1 = dir.path().join("state.1");
        let whole = std::fs::read(&slot1).unwrap();
        std::fs::write(&slot1, &whole[..7]).unwrap();
        assert_eq!(StateFile::load(&disk, "state").unwrap().1, None);
        std::fs::write(&slot1, b"").unwrap();
        assert_eq!(StateFile::load(&disk, "state").unwrap().1, None, "a tear may leave an empty file");
        // Both copies present and both damaged: no crash does that. Refused, naming the file and its copies.
        std::fs::write(&slot1, &whole).unwrap();
        let (mut file, _) = StateFile::load(&disk, "state").unwrap();
        block_on(file.write(&disk, b"second")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        for slot in ["state.0", "state.1"] {
            let path = dir.path().join(slot);
            let mut bytes = std::fs::read(&path).unwrap();
            *bytes.last_mut().unwrap() ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        }
        let error = StateFile::load(&disk, "state").expect_err("no intact copy");
        assert!(matches!(error, StateError::Damaged { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains("state.0 and state.1"), "{text}");
        // Slot 0 alone, damaged: the first write never goes there, so this too is outside damage.
        std::fs::remove_file(&slot1).unwrap();
        let error = StateFile::load(&disk, "state").expect_err("no intact copy");
        assert!(error.to_string().contains("(state.0 present"), "{error}");
    }

    #[test]
    fn a_state_file_of_another_format_is_refused_naming_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::open(dir.path()).unwrap();
        let (mut file, _) = StateFile::load(&disk, "state").unwrap();
        block_on(file.write(&disk, b"current")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        let path = dir.path().join("state.1");
        let written = std::fs::read(&path).unwrap();
        assert_eq!(&written[..4], &[b'L', b'S', b'S', STATE_FORMAT]);
        // Format 1 wrote `LSST`; a later build may write a higher number. Either is intact, and neither is read.
        for (mark, found) in [(b'T', 1), (STATE_FORMAT + 1, STATE_FORMAT + 1)] {
            let mut other = written.clone();
            other[3] = mark;
            std::fs::write(&path, &other).unwrap();
            let error = StateFile::load(&disk, "state").expect_err("another format");
            assert!(
                matches!(&error, StateError::Format { name, found: f, expected } if name == "state.1" && *f == found && *expected == STATE_FORMAT),
                "{error:?}"
            );
            let text = error.to_string();
            assert!(
                text.contains(&format!("state format {found} and this build reads format {STATE_FORMAT}")),
                "{text}"
            );
        }
        // An older copy of another format beside a newer one of this format is no obstacle: the newest is read.
        let mut older = written.clone();
        older[3] = b'T';
        older[4..12].copy_from_slice(&0u64.to_le_bytes());
        std::fs::write(dir.path().join("state.0"), &older).unwrap();
        std::fs::write(&path, &written).unwrap();
        assert_eq!(StateFile::load(&disk, "state").unwrap().1.as_deref(), Some(&b"current"[..]));
    }

    #[test]
    fn writes_without_a_sync_between_them_never_touch_the_slot_of_the_synced_state() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::open(dir.path()).unwrap();
        let (mut file, _) = StateFile::load(&disk, "state").unwrap();
        block_on(file.write(&disk, b"synced")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        let synced_slot = std::fs::read(dir.path().join("state.1")).unwrap();
        for text in [&b"second"[..], b"third", b"fourth"] {
            block_on(file.write(&disk, text)).unwrap();
            assert_eq!(std::fs::read(dir.path().join("state.1")).unwrap(), synced_slot);
        }
        assert_eq!(StateFile::load(&disk, "state").unwrap().1.as_deref(), Some(&b"fourth"[..]));
        // A crash that tears the write in progress leaves the synced state.
        std::fs::write(dir.path().join("state.0"), b"LSST").unwrap();
        assert_eq!(StateFile::load(&disk, "state").unwrap().1.as_deref(), Some(&b"synced"[..]));
        // Once synced, the next write goes to the other slot.
        block_on(file.write(&disk, b"fifth")).unwrap();
        block_on(file.sync(&disk)).unwrap();
        block_on(file.write(&disk, b"sixth")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("state.1")).unwrap()[20..], b"sixth"[..]);
        assert_eq!(std::fs::read(dir.path().join("state.0")).unwrap()[20..], b"fifth"[..]);
    }

    #[test]
    fn dir_store_serves_ranges_lists_and_names_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        block_on(store.put("backups/1/a", b"hello world".to_vec())).unwrap();
        let read = block_on(store.get_range("backups/1/a", 6, 100)).unwrap();
        assert_eq!(read, RangeRead { bytes: bytes::Bytes::from_static(b"world"), total_len: 11 });
        assert_eq!(block_on(store.list("backups/")).unwrap(), vec!["backups/1/a".to_string()]);
        assert_eq!(
            block_on(store.get_range("backups/1/b", 0, 1)),
            Err(StoreError::NotFound { object: "backups/1/b".into() })
        );
        assert!(block_on(store.get_range("../escape", 0, 1)).is_err());
        assert!(matches!(block_on(store.get_range("backups/1/a", 12, 1)), Err(StoreError::BadRange { .. })));
        block_on(reads_like_a_well_behaved_store(&store));
    }

    /// Ranged reads of `backups/1/a` (`hello world`, put by the caller) give what [`range_of`] gives, for every
    /// offset and length.
    async fn reads_like_a_well_behaved_store(store: &impl RemoteStore) {
        for offset in 0..=12 {
            for len in [0, 1, 5, 11, 100, u64::MAX] {
                let expected = range_of("backups/1/a", &bytes::Bytes::from_static(b"hello world"), offset, len);
                assert_eq!(store.get_range("backups/1/a", offset, len).await, expected, "@{offset}+{len}");
            }
        }
    }

    /// The object store adapter over memory, over local files and over S3 (HTTP to a local S3 server): ranged
    /// reads as a well-behaved store, string prefixes in listings, and a missing or impossible name as not found.
    #[cfg(not(madsim))]
    #[test]
    fn an_object_store_serves_ranges_lists_and_names_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("local")).unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("local")).unwrap();
        let s3 = super::test_s3::client(&super::test_s3::serve(&dir.path().join("s3")));
        let stores: [std::sync::Arc<dyn object_store::ObjectStore>; 3] = [
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            std::sync::Arc::new(local),
            std::sync::Arc::new(s3),
        ];
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for inner in stores {
            let store = ObjectStoreRemote::new(inner);
            runtime.block_on(async {
                for object in ["backups/1/a", "backups/10/b", "backups/2/c", "other/d"] {
                    store.put(object, b"hello world".to_vec()).await.unwrap();
                }
                assert_eq!(store.list("backups/1").await.unwrap(), ["backups/1/a", "backups/10/b"]);
                assert_eq!(store.list("backups/1/").await.unwrap(), ["backups/1/a"]);
                assert_eq!(store.list("").await.unwrap().len(), 4);
                assert_eq!(store.list("none/").await.unwrap(), Vec::<String>::new());
                for missing in ["backups/1/z", "../escape", "", "a//b"] {
                    let error = store.get_range(missing, 0, 1).await;
                    assert_eq!(error, Err(StoreError::NotFound { object: missing.into() }), "{missing:?}");
                }
                reads_like_a_well_behaved_store(&store).await;
            });
        }
    }
}
