//! The data model: rows, tables, shard key ranges and the backup chain.
//!
//! A table maps `Key -> Value`. It is split across shards by contiguous key ranges. Backups are taken in time
//! order: a full backup holds every row of every shard, an incremental holds the changes (upserts and deletes)
//! since the backup before it. A restore uses the newest full backup and every incremental after it, in order;
//! everything before the newest full is ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A row key.
pub type Key = u64;
/// A row value.
pub type Value = u64;
/// The rows of a table, or of one shard of it, in key order.
pub type Rows = BTreeMap<Key, Value>;

/// A shard's rows: `(key, value)` pairs in one vector, keys strictly increasing.
///
/// A shard applies whole increments and writes all its rows after each one, so its rows are read and written in
/// bulk, never looked up one at a time: a sorted vector applies an increment in one merge pass, encodes as one
/// pass over contiguous memory and decodes into a single allocation, where a [`Rows`] map pays a node per row
/// on every one of those. Everything else (the source tables, the oracles, the scenarios) keeps [`Rows`].
///
/// The serde form is one byte string of fixed-width little-endian `(key, value)` pairs in key order: one copy
/// is much cheaper than a varint per field. Decoding rejects a length that is not a whole number of pairs and
/// keys that are not strictly increasing, so a decoded value always keeps the invariant.
///
/// `Hash` feeds the hasher exactly what the [`Rows`] of the same pairs feeds it (the length, then each key and
/// value), and `Debug` prints it the same way too, so fingerprints and printed states do not depend on which of
/// the two holds the rows.
///
/// In memory a pair is `[key, value]`: on a little-endian machine the vector's bytes are then the serde form
/// as they are, and encoding is one copy.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SortedRows(Vec<[u64; 2]>);

impl std::hash::Hash for SortedRows {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.len().hash(state);
        for [key, value] in &self.0 {
            key.hash(state);
            value.hash(state);
        }
    }
}

impl SortedRows {
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// The rows a full backup's changes describe, starting from nothing. A full backup is upserts in key order,
    /// which this builds in one pass; any other list means the same as applying it change by change.
    pub fn from_changes(changes: &[Change]) -> Self {
        Self::new().with_changes(changes)
    }

    /// Applies `changes` in order, as [`apply_changes`] does to a [`Rows`]: a later change of a key wins over an
    /// earlier one, and deleting a missing key does nothing.
    pub fn apply(&mut self, changes: &[Change]) {
        *self = self.with_changes(changes);
    }

    /// These rows with `changes` applied in order, as by [`SortedRows::apply`], leaving `self` as it is.
    ///
    /// The result is merged into a new vector straight from `self`, so rows shared behind an `Arc` with a
    /// persist in flight are read, never cloned first: `Arc::make_mut` would copy every row only for the merge to
    /// copy them again. Changes in strictly increasing key order (what a bundle holds) merge as they are; any
    /// other list is first sorted by key, keeping the last change of each key, which is the one that wins.
    pub fn with_changes(&self, changes: &[Change]) -> Self {
        if changes.windows(2).all(|pair| pair[0].key() < pair[1].key()) {
            return Self(merge(&self.0, changes));
        }
        let mut sorted = changes.to_vec();
        sort_keeping_last(&mut sorted, Change::key);
        Self(merge(&self.0, &sorted))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, found by binary search.
    pub fn get(&self, key: Key) -> Option<Value> {
        self.0.binary_search_by_key(&key, |&[k, _]| k).ok().map(|index| self.0[index][1])
    }

    /// The rows in key order, as references like a [`Rows`] map's iterator yields them, so the two compare
    /// with `Iterator::eq`.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Key, &Value)> + ExactSizeIterator + Clone {
        self.0.iter().map(|[key, value]| (key, value))
    }

    /// The same rows as a map, for comparing with the oracle's [`Rows`] and printing differences.
    pub fn to_map(&self) -> Rows {
        self.0.iter().map(|&[key, value]| (key, value)).collect()
    }

    /// The rows whose keys fall in `range`, in key order: found by two binary searches, copied by none.
    pub fn in_range(&self, range: KeyRange) -> RowsIn<'_> {
        let start = self.0.partition_point(|&[key, _]| key < range.start);
        let end = range.end.map_or(self.0.len(), |end| self.0.partition_point(|&[key, _]| key < end));
        RowsIn(&self.0[start..end.max(start)])
    }

    /// Whether these rows are exactly `rows`: compared as one block of memory, not row by row.
    pub fn same_as(&self, rows: RowsIn<'_>) -> bool {
        self.0 == rows.0
    }
}

/// A run of a [`SortedRows`]' rows in key order (its rows in one key range), borrowed.
#[derive(Clone, Copy)]
pub struct RowsIn<'a>(&'a [[u64; 2]]);

impl RowsIn<'_> {
    pub fn to_map(&self) -> Rows {
        self.0.iter().map(|&[key, value]| (key, value)).collect()
    }
}

/// Merges `changes`, in strictly increasing key order, into `rows`, with one copy of every row that stays.
///
/// Sparse changes (fewer than one per [`DENSE_CHANGES`] rows) gallop: each change's key is found by probing
/// from where the previous one was, and the rows between two changes are copied as one slice, O(m log(n/m))
/// comparisons for m changes to n rows. Dense changes walk both lists side by side, one comparison per row.
fn merge(rows: &[[u64; 2]], changes: &[Change]) -> Vec<[u64; 2]> {
    let upserts = changes.iter().filter(|change| matches!(change, Change::Upsert { .. })).count();
    let mut merged = Vec::with_capacity(rows.len() + upserts);
    if changes.len().saturating_mul(DENSE_CHANGES) >= rows.len() {
        merge_linear(rows, changes, &mut merged);
    } else {
        merge_galloping(rows, changes, &mut merged);
    }
    merged
}

/// `merge` by galloping to each change's key, appending to `merged`.
fn merge_galloping(rows: &[[u64; 2]], changes: &[Change], merged: &mut Vec<[u64; 2]>) {
    let mut rest = rows;
    for change in changes {
        let key = change.key();
        let below = seek(rest, key);
        merged.extend_from_slice(&rest[..below]);
        rest = &rest[below..];
        if rest.first().is_some_and(|&[k, _]| k == key) {
            rest = &rest[1..];
        }
        if let Change::Upsert { key, value } = *change {
            merged.push([key, value]);
        }
    }
    merged.extend_from_slice(rest);
}

/// With at least one change per this many rows, `merge` walks both lists side by side: between changes that
/// close together, galloping and copying runs cost more than looking at each row once.
const DENSE_CHANGES: usize = 8;

/// `merge` by one pass over both lists, appending to `merged`.
fn merge_linear(rows: &[[u64; 2]], changes: &[Change], merged: &mut Vec<[u64; 2]>) {
    let mut at = 0;
    for change in changes {
        let key = change.key();
        while let Some(&row) = rows.get(at)
            && row[0] < key
        {
            merged.push(row);
            at += 1;
        }
        if rows.get(at).is_some_and(|row| row[0] == key) {
            at += 1;
        }
        if let Change::Upsert { key, value } = *change {
            merged.push([key, value]);
        }
    }
    merged.extend_from_slice(&rows[at..]);
}

/// The number of pairs at the front of `rows` whose key is below `key`: probes at 1, 2, 4, ... pairs from the
/// front, then a binary search between the last two probes.
fn seek(rows: &[[u64; 2]], key: Key) -> usize {
    // Every key of `rows[..low]` is below `key`; the probe looks at the last pair of `rows[..high]`.
    let mut low = 0;
    let mut high = 1;
    while high <= rows.len() && rows[high - 1][0] < key {
        low = high;
        high *= 2;
    }
    let high = high.min(rows.len());
    low + rows[low..high].partition_point(|&[k, _]| k < key)
}

/// Sorts `items` by key, keeping only the last item of each key, the one that wins when they are applied in
/// their original order. The sort is stable, so among one key's items the last stays last.
fn sort_keeping_last<T>(items: &mut Vec<T>, key: impl Fn(&T) -> Key) {
    items.sort_by_key(&key);
    // `dedup_by` drops the later of two neighbours; swapping first keeps the later one's content instead.
    items.dedup_by(|later, kept| {
        let same = key(later) == key(kept);
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

/// Rows in any order; a repeated key keeps its last value, as when collecting into a [`Rows`].
impl FromIterator<(Key, Value)> for SortedRows {
    fn from_iter<I: IntoIterator<Item = (Key, Value)>>(iter: I) -> Self {
        let mut pairs: Vec<[u64; 2]> = iter.into_iter().map(|(key, value)| [key, value]).collect();
        if !pairs.windows(2).all(|pair| pair[0][0] < pair[1][0]) {
            sort_keeping_last(&mut pairs, |&[key, _]| key);
        }
        Self(pairs)
    }
}

impl From<&Rows> for SortedRows {
    fn from(rows: &Rows) -> Self {
        Self(rows.iter().map(|(&key, &value)| [key, value]).collect())
    }
}

impl PartialEq<Rows> for SortedRows {
    fn eq(&self, other: &Rows) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl PartialEq<SortedRows> for Rows {
    fn eq(&self, other: &SortedRows) -> bool {
        other == self
    }
}

impl fmt::Debug for SortedRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Bytes of one `(key, value)` pair in the serde form.
const PAIR_LEN: usize = 16;

impl Serialize for SortedRows {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            return serializer.serialize_bytes(zerocopy::IntoBytes::as_bytes(self.0.as_slice()));
        }
        let mut bytes = Vec::with_capacity(self.0.len() * PAIR_LEN);
        bytes.extend(self.0.iter().flat_map(|&[key, value]| pack_pair(key, value)));
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for SortedRows {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(PackedRowsVisitor)
    }
}

/// One `(key, value)` pair of the serde form.
fn pack_pair(key: Key, value: Value) -> [u8; PAIR_LEN] {
    let mut pair = [0; PAIR_LEN];
    pair[..PAIR_LEN / 2].copy_from_slice(&key.to_le_bytes());
    pair[PAIR_LEN / 2..].copy_from_slice(&value.to_le_bytes());
    pair
}

/// The `(key, value)` of one pair of the serde form, `PAIR_LEN` bytes.
fn unpack_pair(pair: &[u8]) -> (Key, Value) {
    let (key, value) = pair.split_at(PAIR_LEN / 2);
    let key = Key::from_le_bytes(key.try_into().expect("half a pair is 8 bytes"));
    let value = Value::from_le_bytes(value.try_into().expect("half a pair is 8 bytes"));
    (key, value)
}

/// Decodes the serde form of [`SortedRows`] into a vector of the right size (one copy on a little-endian
/// machine), then checks that every key is above the one before, naming the first that is not.
fn unpack<E: de::Error>(bytes: &[u8]) -> Result<SortedRows, E> {
    if !bytes.len().is_multiple_of(PAIR_LEN) {
        return Err(E::custom(format_args!("packed rows of {} bytes are not whole pairs", bytes.len())));
    }
    let mut pairs = vec![[0u64; 2]; bytes.len() / PAIR_LEN];
    if cfg!(target_endian = "little") {
        zerocopy::IntoBytes::as_mut_bytes(pairs.as_mut_slice()).copy_from_slice(bytes);
    } else {
        for (pair, packed) in pairs.iter_mut().zip(bytes.chunks_exact(PAIR_LEN)) {
            let (key, value) = unpack_pair(packed);
            *pair = [key, value];
        }
    }
    if let Some(out_of_order) = pairs.windows(2).find(|pair| pair[0][0] >= pair[1][0]) {
        let (previous, key) = (out_of_order[0][0], out_of_order[1][0]);
        return Err(E::custom(format_args!("packed rows out of key order: {key} after {previous}")));
    }
    Ok(SortedRows(pairs))
}

struct PackedRowsVisitor;

impl<'de> Visitor<'de> for PackedRowsVisitor {
    type Value = SortedRows;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rows packed as little-endian (key, value) pairs")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<SortedRows, E> {
        unpack(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SortedRows, A::Error> {
        let mut bytes = Vec::new();
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        unpack(&bytes)
    }
}

/// Index of a shard within a table, `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// A table of the target database (and of the backup collections that hold it). Index tables are tables too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableId(pub u32);

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// One shard of one table: what a shard node serves and what the coordinator drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TabletId {
    pub table: TableId,
    pub shard: ShardId,
}

impl TabletId {
    pub const fn new(table: u32, shard: u32) -> Self {
        Self { table: TableId(table), shard: ShardId(shard) }
    }
}

impl fmt::Display for TabletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.table, self.shard)
    }
}

/// A table a restore brings back: its shard count, and for an index table the table it indexes (restored
/// with it, and counted with it against the cap on tables in flight).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableSpec {
    pub id: TableId,
    pub name: String,
    pub shard_count: u32,
    pub index_of: Option<TableId>,
}

impl TableSpec {
    pub fn tablets(&self) -> impl Iterator<Item = TabletId> + use<> {
        let table = self.id;
        (0..self.shard_count).map(move |shard| TabletId { table, shard: ShardId(shard) })
    }

    /// The table this one is restored with: itself, or the table it indexes.
    pub fn group(&self) -> TableId {
        self.index_of.unwrap_or(self.id)
    }
}

/// Position of a backup in a restore chain: 0 is the full backup, 1.. the incrementals after it.
pub type IncrementIndex = u32;

/// A half-open key range `[start, end)`; `end == None` means "to the end of the key space".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    pub start: Key,
    pub end: Option<Key>,
}

impl KeyRange {
    pub fn contains(&self, key: Key) -> bool {
        key >= self.start && self.end.is_none_or(|end| key < end)
    }
}

/// How a table's key space is cut into shards: contiguous ranges covering every key exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardMap {
    ranges: Vec<KeyRange>,
}

impl ShardMap {
    /// Cuts `[0, key_space)` into `shard_count` equal ranges; the last one runs to the end of the key space.
    pub fn even(shard_count: u32, key_space: Key) -> Self {
        assert!(shard_count > 0, "a table has at least one shard");
        let width = (key_space / u64::from(shard_count)).max(1);
        let ranges = (0..shard_count)
            .map(|i| KeyRange {
                start: u64::from(i) * width,
                end: (i + 1 < shard_count).then(|| u64::from(i + 1) * width),
            })
            .collect();
        Self { ranges }
    }

    /// A shard map from explicit ranges: the first starts at key 0, each ends where the next starts, and the last
    /// runs to the end of the key space.
    pub fn from_ranges(ranges: Vec<KeyRange>) -> Self {
        assert_eq!(ranges.first().map(|r| r.start), Some(0), "the first range starts at key 0");
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, Some(pair[1].start), "ranges are contiguous");
            assert!(pair[0].start < pair[1].start, "ranges are not empty");
        }
        assert_eq!(ranges.last().and_then(|r| r.end), None, "the last range runs to the end");
        Self { ranges }
    }

    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.ranges.len()).expect("shard count fits in u32")
    }

    pub fn shards(&self) -> impl Iterator<Item = ShardId> + use<> {
        (0..self.shard_count()).map(ShardId)
    }

    pub fn range(&self, shard: ShardId) -> KeyRange {
        self.ranges[shard.0 as usize]
    }

    pub fn shard_for(&self, key: Key) -> ShardId {
        let index = self.ranges.partition_point(|range| range.start <= key);
        assert!(index > 0, "the first range starts at key 0");
        ShardId(u32::try_from(index - 1).expect("shard index fits in u32"))
    }

    /// The rows of `rows` that fall in `shard`'s range.
    pub fn rows_of(&self, rows: &Rows, shard: ShardId) -> Rows {
        self.rows_in(rows, shard).map(|(k, v)| (*k, *v)).collect()
    }

    /// The rows of `rows` that fall in `shard`'s range, in key order, without copying them.
    pub fn rows_in<'a>(&self, rows: &'a Rows, shard: ShardId) -> std::collections::btree_map::Range<'a, Key, Value> {
        let range = self.range(shard);
        let upper = range.end.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        rows.range((std::ops::Bound::Included(range.start), upper))
    }
}

/// One change carried by a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    Upsert { key: Key, value: Value },
    Delete { key: Key },
}

impl Change {
    pub fn key(&self) -> Key {
        match *self {
            Change::Upsert { key, .. } | Change::Delete { key } => key,
        }
    }
}

/// Applies `changes` to `rows` in order.
pub fn apply_changes(rows: &mut Rows, changes: &[Change]) {
    for change in changes {
        match *change {
            Change::Upsert { key, value } => {
                rows.insert(key, value);
            }
            Change::Delete { key } => {
                rows.remove(&key);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackupKind {
    Full,
    Incremental,
}

impl fmt::Display for BackupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        })
    }
}

/// The manifest of one backup of a collection: what it is, when it was taken and where each shard's bundle of
/// each table lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackupManifest {
    pub backup_id: u64,
    pub kind: BackupKind,
    /// Source time at which the backup was taken; backups are ordered by it.
    pub taken_at_ms: u64,
    /// For every table of the collection, one bundle object per shard, indexed by shard.
    pub tables: BTreeMap<TableId, Vec<String>>,
}

impl BackupManifest {
    /// This manifest with only the objects of `tables`: what a restore of them keeps of it. A running operation's
    /// state holds its chain and is written at every step, so objects of tables it does not restore would be
    /// written again and again for nothing.
    pub fn of_tables(&self, tables: &[TableSpec]) -> BackupManifest {
        let tables = self
            .tables
            .iter()
            .filter(|(id, _)| tables.iter().any(|table| table.id == **id))
            .map(|(id, objects)| (*id, objects.clone()))
            .collect();
        BackupManifest { backup_id: self.backup_id, kind: self.kind, taken_at_ms: self.taken_at_ms, tables }
    }

    /// The conventional object name of a tablet's bundle in a backup.
    pub fn object_name(backup_id: u64, tablet: TabletId) -> String {
        // `backups/{backup_id:06}/{table}/{shard}.bundle`, built without the formatting machinery: the checkers
        // name every applied bundle this way.
        let mut name = String::with_capacity(48);
        name.push_str("backups/");
        push_decimal(&mut name, backup_id, 6);
        name.push_str("/t");
        push_decimal(&mut name, u64::from(tablet.table.0), 1);
        name.push_str("/shard-");
        push_decimal(&mut name, u64::from(tablet.shard.0), 1);
        name.push_str(".bundle");
        name
    }

    /// The bundle object of `tablet`, if the manifest lists one.
    pub fn object(&self, tablet: TabletId) -> Option<&str> {
        self.tables.get(&tablet.table)?.get(tablet.shard.0 as usize).map(String::as_str)
    }
}

/// Appends `value` in decimal, zero-padded to at least `width` digits.
fn push_decimal(out: &mut String, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while value > 0 || start == digits.len() {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    start = start.min(digits.len() - width.min(digits.len()));
    out.push_str(std::str::from_utf8(&digits[start..]).expect("decimal digits are ASCII"));
}

/// How the names of the files that hold restore chains begin ([`RestoreChain::file_name`]).
pub const CHAIN_FILE_PREFIX: &str = "chain-";

/// Whether `name` is the name of a file that holds a restore chain: `chain-<operation>-<digest>`, as
/// [`RestoreChain::file_name`] makes them (an operation id in decimal, the digest in 16 lowercase hex digits).
pub fn is_chain_file_name(name: &str) -> bool {
    let Some((op, digest)) = name.strip_prefix(CHAIN_FILE_PREFIX).and_then(|rest| rest.split_once('-')) else {
        return false;
    };
    let decimal = !op.is_empty() && op.bytes().all(|b| b.is_ascii_digit());
    let hex = digest.len() == 16 && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    decimal && hex
}

/// The backups a restore applies, in order: the newest full backup, then every later incremental.
///
/// A running operation's state is written at every step of the restore and refers to its chain, which never
/// changes. So the chain is written in full only until a file of its own is durable ([`RestoreChain::file_name`],
/// written by the host beside the first state that holds it, and made durable by that state's sync); from then on
/// a state names the file by the chain's digest. A state read back names the file and holds a *detached* chain,
/// which [`RestoreChain::attach`] fills in before anything uses it. Without this a restore of T tablets and B
/// backups would write the chain T·B times, each time of a size that grows with T·B.
///
/// Its serde form is its own postcard encoding as one byte string, made once and kept, or the digest of that
/// encoding once its file is durable.
#[derive(Clone)]
pub struct RestoreChain {
    backups: Vec<BackupManifest>,
    /// The postcard encoding of `backups`, once made (or as read).
    encoded: std::sync::OnceLock<Box<[u8]>>,
    /// The digest of `encoded`, once taken: every state written while the chain runs names it.
    digest: std::sync::OnceLock<u64>,
    /// Set once a durable file holds the encoding: a state written after that names the file.
    stored: std::sync::OnceLock<()>,
    /// A chain read back as a name only: the digest of the encoding its file must hold.
    detached: Option<u64>,
}

impl PartialEq for RestoreChain {
    fn eq(&self, other: &Self) -> bool {
        self.backups == other.backups
    }
}

impl Eq for RestoreChain {}

impl std::hash::Hash for RestoreChain {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.backups.hash(state);
    }
}

impl fmt::Debug for RestoreChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestoreChain").field("backups", &self.backups).finish()
    }
}

/// The encoded manifests of a chain, as one byte string.
struct EncodedChain<'a>(&'a [u8]);

impl Serialize for EncodedChain<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// A chain decoded from its byte string.
struct DecodedChain(RestoreChain);

impl<'de> Deserialize<'de> for DecodedChain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChainVisitor;

        impl Visitor<'_> for ChainVisitor {
            type Value = DecodedChain;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the encoded manifests of a restore chain")
            }

            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<DecodedChain, E> {
                RestoreChain::decode(bytes).map(DecodedChain).map_err(E::custom)
            }
        }

        deserializer.deserialize_bytes(ChainVisitor)
    }
}

/// How a state holds a chain: in full, or by the digest of its file.
#[derive(Deserialize)]
enum ChainForm {
    Inline(DecodedChain),
    Stored(u64),
}

impl Serialize for RestoreChain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A detached chain holds nothing but the name of its file.
        if self.is_stored() || self.is_detached() {
            serializer.serialize_newtype_variant("ChainForm", 1, "Stored", &self.digest())
        } else {
            serializer.serialize_newtype_variant("ChainForm", 0, "Inline", &EncodedChain(self.encoded()))
        }
    }
}

impl<'de> Deserialize<'de> for RestoreChain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match ChainForm::deserialize(deserializer)? {
            ChainForm::Inline(DecodedChain(chain)) => chain,
            ChainForm::Stored(digest) => RestoreChain { detached: Some(digest), ..RestoreChain::new(Vec::new()) },
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum ChainError {
    #[error("the catalog holds no full backup, so there is nothing to restore from")]
    NoFullBackup,
    #[error("backup {backup_id} has {found} shard objects for table {table} but the table has {expected} shards")]
    ShardCountMismatch { backup_id: u64, table: TableId, found: usize, expected: u32 },
    #[error("backup {backup_id} holds no objects for table {table}")]
    TableMissing { backup_id: u64, table: TableId },
    #[error("the catalog holds no full backup taken at or before {until_ms} ms, the point in time restored to")]
    NoFullBackupUntil { until_ms: u64 },
    #[error(
        "full backup {backup_id} (taken at {taken_at_ms} ms) lies inside the segment: a restore to a point past it \
         starts from it, as a new operation"
    )]
    FullBackupInSegment { backup_id: u64, taken_at_ms: u64 },
}

impl RestoreChain {
    /// Picks the restore chain out of a catalog of backups in any order: the newest full backup and every
    /// incremental taken after it, by time. Incrementals before the newest full are ignored.
    pub fn plan(catalog: &[BackupManifest], tables: &[TableSpec]) -> Result<Self, ChainError> {
        Self::plan_until(catalog, tables, None)
    }

    /// The chain of a restore to the point in time `until_ms` (`None`: the newest backup): the newest full backup
    /// taken at or before it, then every incremental taken after that full and at or before it. Backups taken
    /// later are ignored, as are those before the full.
    pub fn plan_until(
        catalog: &[BackupManifest],
        tables: &[TableSpec],
        until_ms: Option<u64>,
    ) -> Result<Self, ChainError> {
        let mut sorted: Vec<&BackupManifest> =
            catalog.iter().filter(|m| until_ms.is_none_or(|until| m.taken_at_ms <= until)).collect();
        sorted.sort_by_key(|m| (m.taken_at_ms, m.backup_id));
        let no_full = until_ms.map_or(ChainError::NoFullBackup, |until_ms| ChainError::NoFullBackupUntil { until_ms });
        let newest_full = sorted.iter().rposition(|m| m.kind == BackupKind::Full).ok_or(no_full)?;
        let backups: Vec<BackupManifest> = sorted[newest_full..]
            .iter()
            .filter(|m| m.kind == BackupKind::Incremental || m.backup_id == sorted[newest_full].backup_id)
            .map(|m| m.of_tables(tables))
            .collect();
        Self::checked(backups, tables)
    }

    /// The next segment of a segmented restore that has applied every backup up to `reached` (the time and id
    /// of the last one): every incremental taken after it and at or before `until_ms` (`None`: every later one),
    /// in order. It may be empty. A full backup in that span is refused: the chain so far leads up to it, not
    /// past it, and a restore to a later point starts from that full, as a new operation.
    pub fn plan_segment(
        catalog: &[BackupManifest],
        tables: &[TableSpec],
        reached: (u64, u64),
        until_ms: Option<u64>,
    ) -> Result<Self, ChainError> {
        let mut sorted: Vec<&BackupManifest> = catalog
            .iter()
            .filter(|m| (m.taken_at_ms, m.backup_id) > reached && until_ms.is_none_or(|until| m.taken_at_ms <= until))
            .collect();
        sorted.sort_by_key(|m| (m.taken_at_ms, m.backup_id));
        if let Some(full) = sorted.iter().find(|m| m.kind == BackupKind::Full) {
            return Err(ChainError::FullBackupInSegment { backup_id: full.backup_id, taken_at_ms: full.taken_at_ms });
        }
        Self::checked(sorted.iter().map(|m| m.of_tables(tables)).collect(), tables)
    }

    /// `backups` as a chain, once every one of them holds one object per shard of every table.
    fn checked(backups: Vec<BackupManifest>, tables: &[TableSpec]) -> Result<Self, ChainError> {
        for manifest in &backups {
            for table in tables {
                let Some(objects) = manifest.tables.get(&table.id) else {
                    return Err(ChainError::TableMissing { backup_id: manifest.backup_id, table: table.id });
                };
                if objects.len() != table.shard_count as usize {
                    return Err(ChainError::ShardCountMismatch {
                        backup_id: manifest.backup_id,
                        table: table.id,
                        found: objects.len(),
                        expected: table.shard_count,
                    });
                }
            }
        }
        Ok(Self::new(backups))
    }

    /// The wrong plan of [`crate::coordinator::CoordinatorBug::IncrementalsBeforeNewestFull`]: from the oldest
    /// full backup, every backup after it, older incrementals and fulls included.
    pub fn plan_from_oldest_full(
        catalog: &[BackupManifest],
        tables: &[TableSpec],
        until_ms: Option<u64>,
    ) -> Result<Self, ChainError> {
        let planned = Self::plan_until(catalog, tables, until_ms)?;
        let mut sorted: Vec<&BackupManifest> =
            catalog.iter().filter(|m| until_ms.is_none_or(|until| m.taken_at_ms <= until)).collect();
        sorted.sort_by_key(|m| (m.taken_at_ms, m.backup_id));
        let oldest_full = sorted.iter().position(|m| m.kind == BackupKind::Full).ok_or(ChainError::NoFullBackup)?;
        let backups = sorted[oldest_full..].iter().map(|m| m.of_tables(tables)).collect();
        Ok(if planned.backups.is_empty() { planned } else { Self::new(backups) })
    }

    pub fn new(backups: Vec<BackupManifest>) -> Self {
        Self {
            backups,
            encoded: std::sync::OnceLock::new(),
            digest: std::sync::OnceLock::new(),
            stored: std::sync::OnceLock::new(),
            detached: None,
        }
    }

    /// The chain whose postcard encoding `bytes` is.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let backups =
            postcard::from_bytes(bytes).map_err(|error| format!("restore chain of {} bytes: {error}", bytes.len()))?;
        Ok(RestoreChain { encoded: std::sync::OnceLock::from(Box::<[u8]>::from(bytes)), ..RestoreChain::new(backups) })
    }

    /// The postcard encoding of the backups, made once.
    pub fn encoded(&self) -> &[u8] {
        self.encoded.get_or_init(|| {
            postcard::to_allocvec(&self.backups).expect("manifests always serialize").into_boxed_slice()
        })
    }

    /// The digest a state names the chain's file by: the length of the encoding and its CRC-32.
    pub fn digest(&self) -> u64 {
        self.detached.unwrap_or_else(|| {
            *self.digest.get_or_init(|| {
                let encoded = self.encoded();
                (encoded.len() as u64) << 32 | u64::from(crc32fast::hash(encoded))
            })
        })
    }

    /// The name of the file that holds the chain's encoding as the chain of operation `op`. Operation ids are
    /// never used twice, so a file of one operation's chain is never written over with another's, even if the two
    /// chains' digests were to collide.
    pub fn file_name(&self, op: u64) -> String {
        format!("{CHAIN_FILE_PREFIX}{op}-{:016x}", self.digest())
    }

    /// Whether a durable file holds the chain (so a state names it instead of holding it).
    pub fn is_stored(&self) -> bool {
        self.stored.get().is_some()
    }

    /// Records that a durable file now holds the chain.
    pub fn mark_stored(&self) {
        let _ = self.stored.set(());
    }

    /// Whether the chain was read back as a name only, and awaits [`RestoreChain::attach`].
    pub fn is_detached(&self) -> bool {
        self.detached.is_some()
    }

    /// The chain a detached one names, from `bytes`, the content of its file; an error says what is wrong with
    /// them. The result is stored: its file is where it came from.
    pub fn attach(&self, op: u64, bytes: &[u8]) -> Result<Self, String> {
        let name = self.file_name(op);
        let chain = Self::decode(bytes).map_err(|error| format!("{name}: {error}"))?;
        if chain.digest() != self.digest() {
            return Err(format!("{name} holds another chain (digest {:016x})", chain.digest()));
        }
        chain.mark_stored();
        Ok(chain)
    }

    /// The backups, in the order they are applied.
    pub fn backups(&self) -> &[BackupManifest] {
        &self.backups
    }

    /// Number of increments, the full backup included.
    pub fn len(&self) -> u32 {
        u32::try_from(self.backups.len()).expect("chain length fits in u32")
    }

    pub fn is_empty(&self) -> bool {
        self.backups.is_empty()
    }

    pub fn last_index(&self) -> IncrementIndex {
        assert!(!self.is_empty(), "a planned chain starts with a full backup");
        self.len() - 1
    }

    pub fn get(&self, index: IncrementIndex) -> &BackupManifest {
        &self.backups[index as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_the_formatted_convention() {
        for backup_id in [0, 1, 9, 10, 123_456, 999_999, 1_000_000, 987_654_321, u64::MAX] {
            for (table, shard) in [(0, 0), (1, 7), (12, 345), (u32::MAX, u32::MAX)] {
                let tablet = TabletId::new(table, shard);
                let expected = format!("backups/{backup_id:06}/{}/{}.bundle", tablet.table, tablet.shard);
                assert_eq!(BackupManifest::object_name(backup_id, tablet), expected);
            }
        }
    }

    #[test]
    fn a_planned_chain_keeps_only_the_objects_of_the_tables_it_restores() {
        let manifest = |backup_id: u64, kind: BackupKind| BackupManifest {
            backup_id,
            kind,
            taken_at_ms: backup_id,
            tables: (0..3)
                .map(|table| (TableId(table), vec![BackupManifest::object_name(backup_id, TabletId::new(table, 0))]))
                .collect(),
        };
        let catalog = [manifest(1, BackupKind::Full), manifest(2, BackupKind::Incremental)];
        let restored = TableSpec { id: TableId(1), name: "orders".to_string(), shard_count: 1, index_of: None };
        let tables = std::slice::from_ref(&restored);
        for chain in [RestoreChain::plan(&catalog, tables), RestoreChain::plan_from_oldest_full(&catalog, tables, None)]
        {
            let chain = chain.expect("a chain");
            assert_eq!(chain.len(), 2);
            for (planned, full) in chain.backups().iter().zip(&catalog) {
                assert_eq!(planned.tables.keys().copied().collect::<Vec<_>>(), vec![TableId(1)]);
                assert_eq!(planned.tables[&TableId(1)], full.tables[&TableId(1)]);
                assert_eq!(
                    (planned.backup_id, planned.kind, planned.taken_at_ms),
                    (full.backup_id, full.kind, full.taken_at_ms)
                );
            }
        }
    }

    use proptest::prelude::*;

    /// A shard's state as far as its rows go: the rows behind an `Arc`, as a shard holds them.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Packed(std::sync::Arc<SortedRows>);

    /// The encoding a shard's rows had as a [`Rows`] map, spelled out: one byte string of little-endian
    /// `(key, value)` pairs in key order. Durable state files, event-log hashes and transcripts depend on it.
    struct MapEncoding<'a>(&'a Rows);

    impl Serialize for MapEncoding<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut bytes = Vec::new();
            for (key, value) in self.0 {
                bytes.extend_from_slice(&key.to_le_bytes());
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            serializer.serialize_bytes(&bytes)
        }
    }

    fn upsert(key: Key, value: Value) -> Change {
        Change::Upsert { key, value }
    }

    fn delete(key: Key) -> Change {
        Change::Delete { key }
    }

    /// What applying `changes` to `base` must give: the map, change by change.
    fn applied_to_map(base: &Rows, changes: &[Change]) -> Rows {
        let mut rows = base.clone();
        apply_changes(&mut rows, changes);
        rows
    }

    #[test]
    fn packed_rows_round_trip_in_fixed_width_pairs() {
        let rows: Rows = [(0, u64::MAX), (7, 1), (u64::MAX, 0)].into_iter().collect();
        let bytes = postcard::to_allocvec(&Packed(SortedRows::from(&rows).into())).unwrap();
        // One length byte, then three 16-byte pairs.
        assert_eq!(bytes.len(), 1 + 3 * 16);
        assert_eq!(bytes, postcard::to_allocvec(&MapEncoding(&rows)).unwrap());
        assert_eq!(*postcard::from_bytes::<Packed>(&bytes).unwrap().0, rows);
        let empty = postcard::to_allocvec(&Packed(SortedRows::new().into())).unwrap();
        assert_eq!(empty, [0]);
        assert!(postcard::from_bytes::<Packed>(&empty).unwrap().0.is_empty());
    }

    #[test]
    fn packed_rows_reject_a_partial_pair() {
        let mut bytes = postcard::to_allocvec(&Packed(SortedRows::from_iter([(1, 2)]).into())).unwrap();
        bytes.pop();
        bytes[0] = 15;
        let error = postcard::from_bytes::<Packed>(&bytes).unwrap_err();
        assert!(matches!(error, postcard::Error::SerdeDeCustom), "{error:?}");
    }

    #[test]
    fn packed_rows_reject_keys_out_of_order() {
        let mut bytes = vec![32u8];
        for (key, value) in [(5u64, 0u64), (5, 1)] {
            bytes.extend_from_slice(&key.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        assert!(postcard::from_bytes::<Packed>(&bytes).is_err(), "a repeated key is refused");
        let error = unpack::<serde::de::value::Error>(&bytes[1..]).unwrap_err();
        assert_eq!(error.to_string(), "packed rows out of key order: 5 after 5");
        bytes[1] = 9;
        assert!(postcard::from_bytes::<Packed>(&bytes).is_err(), "a falling key is refused");
        let error = unpack::<serde::de::value::Error>(&bytes[1..]).unwrap_err();
        assert_eq!(error.to_string(), "packed rows out of key order: 5 after 9");
    }

    #[test]
    fn sorted_rows_apply_changes_like_a_map() {
        let base: Rows = [(10, 100), (20, 200), (30, 300)].into_iter().collect();
        let cases: [&[Change]; 8] = [
            &[],
            // In key order, as a bundle holds them: update, insert between, delete, insert past the end.
            &[upsert(5, 50), upsert(10, 101), upsert(15, 150), delete(20), upsert(40, 400)],
            // Deleting a key that is not there does nothing.
            &[delete(1), delete(25), delete(99)],
            // Out of order.
            &[upsert(40, 400), delete(10), upsert(1, 1), upsert(25, 250)],
            // A repeated key: the last change wins, whichever it is.
            &[upsert(15, 1), upsert(15, 2), delete(30), upsert(30, 3), delete(20), upsert(20, 4), delete(20)],
            // Delete then re-insert, and insert then delete, of keys old and new.
            &[delete(10), upsert(10, 7), upsert(12, 1), delete(12)],
            // Everything goes.
            &[delete(30), delete(20), delete(10)],
            // Every key is new, before and after the old ones.
            &[upsert(1, 1), upsert(2, 2), upsert(31, 31), upsert(u64::MAX, 0)],
        ];
        for changes in cases {
            let expected = applied_to_map(&base, changes);
            let mut rows = SortedRows::from(&base);
            rows.apply(changes);
            assert_eq!(rows, expected, "{changes:?}");
            assert_eq!(SortedRows::from(&base).with_changes(changes), rows, "{changes:?}");
            assert_eq!(SortedRows::from_changes(changes), applied_to_map(&Rows::new(), changes), "{changes:?}");
        }
    }

    #[test]
    fn sorted_rows_of_a_full_backup_match_applying_its_changes_one_by_one() {
        let cases: [&[Change]; 4] = [
            &[upsert(1, 10), upsert(2, 20)],
            &[upsert(2, 20), upsert(1, 10), upsert(2, 21)],
            &[upsert(1, 10), delete(1), upsert(3, 30)],
            &[],
        ];
        for changes in cases {
            let rows = SortedRows::from_changes(changes);
            assert_eq!(rows, applied_to_map(&Rows::new(), changes), "{changes:?}");
            assert!(rows.0.windows(2).all(|pair| pair[0][0] < pair[1][0]), "{rows:?}");
        }
    }

    #[test]
    fn a_key_range_of_sorted_rows_is_the_map_range_and_compares_as_a_whole() {
        let map: Rows = [(1, 10), (4, 40), (5, 50), (9, 90)].into_iter().collect();
        let rows = SortedRows::from(&map);
        for start in 0..11 {
            for end in [None, Some(0), Some(4), Some(5), Some(6), Some(10)] {
                let range = KeyRange { start, end };
                let expected: Rows =
                    map.iter().filter(|(key, _)| range.contains(**key)).map(|(k, v)| (*k, *v)).collect();
                assert_eq!(rows.in_range(range).to_map(), expected, "{range:?}");
                assert!(SortedRows::from(&expected).same_as(rows.in_range(range)), "{range:?}");
            }
        }
        let range = KeyRange { start: 4, end: Some(6) };
        let other: SortedRows = [(4, 40), (5, 51)].into_iter().collect();
        assert!(!other.same_as(rows.in_range(range)), "one value differs");
        let fewer: SortedRows = [(4, 40)].into_iter().collect();
        assert!(!fewer.same_as(rows.in_range(range)), "a row is missing");
    }

    #[test]
    fn sorted_rows_read_like_a_map() {
        let map: Rows = [(3, 30), (1, 10), (2, 20)].into_iter().collect();
        let rows: SortedRows = [(3, 30), (1, 11), (2, 20), (1, 10)].into_iter().collect();
        assert_eq!(rows, map, "collecting keeps the last value of a repeated key");
        assert_eq!(map, rows);
        assert_eq!(rows.to_map(), map);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.get(1), Some(10));
        assert_eq!(rows.get(4), None);
        assert!(rows.iter().eq(map.iter()));
        assert_eq!(format!("{rows:?}"), format!("{map:?}"));
        assert_ne!(rows, SortedRows::from_iter([(1, 10), (2, 20)]).to_map());
        assert_ne!(SortedRows::from_iter([(1, 10), (2, 20), (3, 31)]), map);
    }

    /// Records what a value feeds a hasher, call by call.
    #[derive(Default)]
    struct Recorder(Vec<u8>);

    impl std::hash::Hasher for Recorder {
        fn finish(&self) -> u64 {
            0
        }

        fn write(&mut self, bytes: &[u8]) {
            self.0.push(u8::try_from(bytes.len()).unwrap());
            self.0.extend_from_slice(bytes);
        }
    }

    #[test]
    fn sorted_rows_hash_like_the_map_of_the_same_rows() {
        use std::hash::Hash;
        for pairs in [&[][..], &[(1, 10)], &[(1, 10), (2, 20), (u64::MAX, 7)]] {
            let map: Rows = pairs.iter().copied().collect();
            let (mut of_rows, mut of_map) = (Recorder::default(), Recorder::default());
            SortedRows::from(&map).hash(&mut of_rows);
            map.hash(&mut of_map);
            assert_eq!(of_rows.0, of_map.0, "{pairs:?}");
        }
    }

    fn change() -> impl Strategy<Value = Change> {
        // A small key space, so changes often hit the same key and the rows already there.
        prop_oneof![
            3 => (0u64..24, any::<u64>()).prop_map(|(key, value)| upsert(key, value)),
            1 => (0u64..24).prop_map(delete),
        ]
    }

    proptest! {
        // Cases drawn from a fixed seed: the same on every run.
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x0de1_5eed),
            ..ProptestConfig::default()
        })]

        #[test]
        fn sorted_rows_apply_random_changes_like_a_map(
            base in prop::collection::btree_map(0u64..24, any::<u64>(), 0..16),
            mut changes in prop::collection::vec(change(), 0..32),
            in_key_order: bool,
        ) {
            if in_key_order {
                // What a bundle holds: one change per key, in key order.
                sort_keeping_last(&mut changes, Change::key);
            }
            let expected = applied_to_map(&base, &changes);
            let rows = SortedRows::from(&base).with_changes(&changes);
            prop_assert_eq!(&rows, &expected);
            prop_assert!(rows.0.windows(2).all(|pair| pair[0][0] < pair[1][0]));
            prop_assert_eq!(SortedRows::from_changes(&changes), applied_to_map(&Rows::new(), &changes));
            let bytes = postcard::to_allocvec(&rows).unwrap();
            prop_assert_eq!(&bytes, &postcard::to_allocvec(&MapEncoding(&expected)).unwrap());
            prop_assert_eq!(postcard::from_bytes::<SortedRows>(&bytes).unwrap(), rows);
        }

        #[test]
        fn the_linear_and_the_galloping_merge_agree(
            keys in prop::collection::btree_set(0u64..400, 0..200),
            mut changes in prop::collection::vec(
                prop_oneof![
                    3 => (0u64..420, any::<u64>()).prop_map(|(key, value)| upsert(key, value)),
                    1 => (0u64..420).prop_map(delete),
                ],
                0..40,
            ),
        ) {
            sort_keeping_last(&mut changes, Change::key);
            let rows: Vec<[u64; 2]> = keys.iter().map(|&k| [k, k + 1]).collect();
            let (mut linear, mut galloping) = (Vec::new(), Vec::new());
            merge_linear(&rows, &changes, &mut linear);
            merge_galloping(&rows, &changes, &mut galloping);
            prop_assert_eq!(linear, galloping);
        }

        #[test]
        fn seek_finds_the_first_key_not_below(
            keys in prop::collection::btree_set(0u64..64, 0..40),
            key in 0u64..70,
        ) {
            let rows: Vec<[u64; 2]> = keys.iter().map(|&k| [k, 0]).collect();
            prop_assert_eq!(seek(&rows, key), keys.range(..key).count());
        }
    }

    #[test]
    fn a_chain_is_written_as_its_own_encoding_and_read_back_whole() {
        let catalog = vec![manifest(1, BackupKind::Full, 10), manifest(2, BackupKind::Incremental, 20)];
        let chain = RestoreChain::plan(&catalog, &[table(0, 1)]).unwrap();
        let bytes = postcard::to_allocvec(&chain).unwrap();
        let inner = postcard::to_allocvec(chain.backups()).unwrap();
        // Held in full: variant 0, then a byte string, its length and the manifests' own encoding.
        assert_eq!(bytes[0], 0);
        assert_eq!(bytes[1] as usize, inner.len());
        assert_eq!(&bytes[2..], &inner[..]);
        assert_eq!(chain.encoded(), &inner[..]);
        let read: RestoreChain = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(read, chain);
        assert!(!read.is_detached() && !read.is_stored());
        assert_eq!(postcard::to_allocvec(&read).unwrap(), bytes, "a chain read back writes the same bytes");
        // Written twice, the second from the kept encoding.
        assert_eq!(postcard::to_allocvec(&chain).unwrap(), bytes);

        // Once its file is durable: variant 1 and the digest, which names the file.
        chain.mark_stored();
        let named = postcard::to_allocvec(&chain).unwrap();
        assert_eq!(named[0], 1);
        assert!(named.len() <= 11, "{named:?}");
        let detached: RestoreChain = postcard::from_bytes(&named).unwrap();
        assert!(detached.is_detached());
        assert_eq!(postcard::to_allocvec(&detached).unwrap(), named, "written again, it still names its file");
        assert_eq!((detached.digest(), detached.file_name(7)), (chain.digest(), chain.file_name(7)));
        assert_eq!(chain.file_name(7), format!("chain-7-{:016x}", chain.digest()));
        assert!(is_chain_file_name(&chain.file_name(7)) && is_chain_file_name(&chain.file_name(u64::MAX)));
        for other in
            ["chain-", "chain-7", "chain-7-", "chain-x-0123456789abcdef", "chain-7-0123456789ABCDEF", "node.state.0"]
        {
            assert!(!is_chain_file_name(other), "{other}");
        }
        assert!(!is_chain_file_name(&format!("{}.tmp", chain.file_name(7))));
        assert_eq!(detached.attach(7, &inner).unwrap(), chain);
        let other = RestoreChain::plan(&catalog[..1], &[table(0, 1)]).unwrap();
        let error = detached.attach(7, other.encoded()).unwrap_err();
        assert!(error.ends_with(&format!("holds another chain (digest {:016x})", other.digest())), "{error}");

        let mut garbage = bytes.clone();
        garbage.truncate(bytes.len() - 3);
        garbage[1] = (garbage.len() - 2) as u8;
        let error = postcard::from_bytes::<RestoreChain>(&garbage).unwrap_err();
        assert!(matches!(error, postcard::Error::SerdeDeCustom), "{error:?}");
    }

    fn manifest(backup_id: u64, kind: BackupKind, taken_at_ms: u64) -> BackupManifest {
        BackupManifest {
            backup_id,
            kind,
            taken_at_ms,
            tables: BTreeMap::from([(TableId(0), vec![BackupManifest::object_name(backup_id, TabletId::new(0, 0))])]),
        }
    }

    fn table(id: u32, shard_count: u32) -> TableSpec {
        TableSpec { id: TableId(id), name: format!("table{id}"), shard_count, index_of: None }
    }

    /// Full 1 and incremental 2, then full 3 and incrementals 4 and 5, taken at ten times their ids, listed out
    /// of order.
    fn two_chains() -> Vec<BackupManifest> {
        vec![
            manifest(4, BackupKind::Incremental, 40),
            manifest(1, BackupKind::Full, 10),
            manifest(2, BackupKind::Incremental, 20),
            manifest(3, BackupKind::Full, 30),
            manifest(5, BackupKind::Incremental, 50),
        ]
    }

    #[test]
    fn chain_starts_at_the_newest_full_and_ignores_older_incrementals() {
        let catalog = two_chains();
        let chain = RestoreChain::plan(&catalog, &[table(0, 1)]).unwrap();
        assert_eq!(ids(&chain), vec![3, 4, 5]);
    }

    fn ids(chain: &RestoreChain) -> Vec<u64> {
        chain.backups.iter().map(|m| m.backup_id).collect()
    }

    #[test]
    fn a_chain_to_a_point_in_time_ends_at_the_last_backup_taken_by_then() {
        let catalog = two_chains();
        let plan = |until| RestoreChain::plan_until(&catalog, &[table(0, 1)], Some(until)).map(|c| ids(&c));
        assert_eq!(plan(45), Ok(vec![3, 4]));
        assert_eq!(plan(40), Ok(vec![3, 4]), "a backup taken at the point itself is in");
        assert_eq!(plan(30), Ok(vec![3]));
        // Before the newest full, the chain starts from the full before it.
        assert_eq!(plan(29), Ok(vec![1, 2]));
        assert_eq!(plan(9), Err(ChainError::NoFullBackupUntil { until_ms: 9 }));
        assert_eq!(RestoreChain::plan_until(&catalog, &[table(0, 1)], None).map(|c| ids(&c)), Ok(vec![3, 4, 5]));
    }

    #[test]
    fn a_segment_holds_the_incrementals_after_the_last_applied_backup_up_to_its_point() {
        let mut catalog = two_chains();
        catalog.push(manifest(6, BackupKind::Incremental, 60));
        let segment = |reached, until| RestoreChain::plan_segment(&catalog, &[table(0, 1)], reached, until);
        assert_eq!(segment((30, 3), Some(55)).map(|c| ids(&c)), Ok(vec![4, 5]));
        assert_eq!(segment((40, 4), None).map(|c| ids(&c)), Ok(vec![5, 6]));
        assert_eq!(segment((60, 6), None).map(|c| ids(&c)), Ok(vec![]), "nothing newer: an empty segment");
        assert_eq!(segment((40, 4), Some(45)).map(|c| ids(&c)), Ok(vec![]));
        // From the older chain, a segment past the newer full is refused rather than applied across it.
        assert_eq!(
            segment((20, 2), Some(45)).map(|c| ids(&c)),
            Err(ChainError::FullBackupInSegment { backup_id: 3, taken_at_ms: 30 })
        );
        assert!(matches!(
            RestoreChain::plan_segment(&catalog, &[table(0, 2)], (40, 4), None),
            Err(ChainError::ShardCountMismatch { backup_id: 5, .. })
        ));
    }

    #[test]
    fn chain_without_a_full_backup_is_an_error() {
        let catalog = vec![manifest(2, BackupKind::Incremental, 20)];
        assert_eq!(RestoreChain::plan(&catalog, &[table(0, 1)]), Err(ChainError::NoFullBackup));
    }

    #[test]
    fn chain_with_the_wrong_number_of_shard_objects_is_an_error() {
        let catalog = vec![manifest(1, BackupKind::Full, 10)];
        assert!(matches!(
            RestoreChain::plan(&catalog, &[table(0, 2)]),
            Err(ChainError::ShardCountMismatch { backup_id: 1, found: 1, expected: 2, .. })
        ));
    }

    #[test]
    fn chain_missing_a_table_is_an_error() {
        let catalog = vec![manifest(1, BackupKind::Full, 10)];
        assert_eq!(
            RestoreChain::plan(&catalog, &[table(0, 1), table(3, 1)]),
            Err(ChainError::TableMissing { backup_id: 1, table: TableId(3) })
        );
    }

    #[test]
    fn even_shard_map_covers_every_key_exactly_once() {
        let map = ShardMap::even(3, 30);
        assert_eq!(map.shard_for(0), ShardId(0));
        assert_eq!(map.shard_for(9), ShardId(0));
        assert_eq!(map.shard_for(10), ShardId(1));
        assert_eq!(map.shard_for(29), ShardId(2));
        assert_eq!(map.shard_for(u64::MAX), ShardId(2));
        let rows: Rows = (0..30).map(|k| (k, k * 10)).collect();
        let total: usize = map.shards().map(|s| map.rows_of(&rows, s).len()).sum();
        assert_eq!(total, 30);
    }
}
