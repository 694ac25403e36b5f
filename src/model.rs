//! The data model: rows, tables, shard key ranges and the backup chain.
//!
//! A table maps `Key -> Value`. It is split across shards by contiguous key ranges. Backups are taken in time
//! order: a full backup holds every row of every shard, an incremental holds the changes (upserts and deletes)
//! since the backup before it. A restore uses the newest full backup and every incremental after it, in order;
//! everything before the newest full is ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A row key.
pub type Key = u64;
/// A row value.
pub type Value = u64;
/// The rows of a table, or of one shard of it, in key order.
pub type Rows = BTreeMap<Key, Value>;

/// Rows serialized as one byte string of fixed-width little-endian `(key, value)` pairs in key order, for
/// `#[serde(with = "packed_rows")]`. A shard writes all its rows on every apply; one copy is much cheaper than a
/// varint per field, and reading back builds the map in one pass from sorted input. Decoding rejects a length
/// that is not a whole number of pairs and keys that are not strictly increasing.
pub mod packed_rows {
    use std::fmt;
    use std::sync::Arc;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::{Key, Rows, Value};

    /// Bytes of one `(key, value)` pair.
    const PAIR_LEN: usize = 16;

    pub fn serialize<S: Serializer>(rows: &Arc<Rows>, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(rows.len() * PAIR_LEN);
        for (key, value) in rows.iter() {
            bytes.extend_from_slice(&key.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<Rows>, D::Error> {
        deserializer.deserialize_bytes(PackedRows).map(Arc::new)
    }

    fn unpack<E: de::Error>(bytes: &[u8]) -> Result<Rows, E> {
        if bytes.len() % PAIR_LEN != 0 {
            return Err(E::custom(format_args!("packed rows of {} bytes are not whole pairs", bytes.len())));
        }
        let mut pairs: Vec<(Key, Value)> = Vec::with_capacity(bytes.len() / PAIR_LEN);
        for pair in bytes.chunks_exact(PAIR_LEN) {
            let (key, value) = pair.split_at(PAIR_LEN / 2);
            let key = Key::from_le_bytes(key.try_into().expect("half a pair is 8 bytes"));
            let value = Value::from_le_bytes(value.try_into().expect("half a pair is 8 bytes"));
            if let Some(&(previous, _)) = pairs.last()
                && previous >= key
            {
                return Err(E::custom(format_args!("packed rows out of key order: {key} after {previous}")));
            }
            pairs.push((key, value));
        }
        Ok(pairs.into_iter().collect())
    }

    struct PackedRows;

    impl<'de> Visitor<'de> for PackedRows {
        type Value = Rows;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("rows packed as little-endian (key, value) pairs")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Rows, E> {
            unpack(bytes)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
            let mut bytes = Vec::new();
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            unpack(&bytes)
        }
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
    /// The conventional object name of a tablet's bundle in a backup.
    pub fn object_name(backup_id: u64, tablet: TabletId) -> String {
        format!("backups/{backup_id:06}/{}/{}.bundle", tablet.table, tablet.shard)
    }

    /// The bundle object of `tablet`, if the manifest lists one.
    pub fn object(&self, tablet: TabletId) -> Option<&str> {
        self.tables.get(&tablet.table)?.get(tablet.shard.0 as usize).map(String::as_str)
    }
}

/// The backups a restore applies, in order: the newest full backup, then every later incremental.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestoreChain {
    pub backups: Vec<BackupManifest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum ChainError {
    #[error("the catalog holds no full backup, so there is nothing to restore from")]
    NoFullBackup,
    #[error("backup {backup_id} has {found} shard objects for table {table} but the table has {expected} shards")]
    ShardCountMismatch { backup_id: u64, table: TableId, found: usize, expected: u32 },
    #[error("backup {backup_id} holds no objects for table {table}")]
    TableMissing { backup_id: u64, table: TableId },
}

impl RestoreChain {
    /// Picks the restore chain out of a catalog of backups in any order: the newest full backup and every
    /// incremental taken after it, by time. Incrementals before the newest full are ignored.
    pub fn plan(catalog: &[BackupManifest], tables: &[TableSpec]) -> Result<Self, ChainError> {
        let mut sorted: Vec<&BackupManifest> = catalog.iter().collect();
        sorted.sort_by_key(|m| (m.taken_at_ms, m.backup_id));
        let newest_full = sorted.iter().rposition(|m| m.kind == BackupKind::Full).ok_or(ChainError::NoFullBackup)?;
        let backups: Vec<BackupManifest> = sorted[newest_full..]
            .iter()
            .filter(|m| m.kind == BackupKind::Incremental || m.backup_id == sorted[newest_full].backup_id)
            .map(|m| (*m).clone())
            .collect();
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
        Ok(Self { backups })
    }

    /// Number of increments, the full backup included.
    /// The wrong plan of [`crate::coordinator::CoordinatorBug::IncrementalsBeforeNewestFull`]: from the oldest
    /// full backup, every backup after it, older incrementals and fulls included.
    pub fn plan_from_oldest_full(catalog: &[BackupManifest], tables: &[TableSpec]) -> Result<Self, ChainError> {
        let planned = Self::plan(catalog, tables)?;
        let mut sorted: Vec<&BackupManifest> = catalog.iter().collect();
        sorted.sort_by_key(|m| (m.taken_at_ms, m.backup_id));
        let oldest_full = sorted.iter().position(|m| m.kind == BackupKind::Full).ok_or(ChainError::NoFullBackup)?;
        let backups = sorted[oldest_full..].iter().map(|m| (*m).clone()).collect();
        Ok(Self { backups: if planned.backups.is_empty() { planned.backups } else { backups } })
    }

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

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Packed(#[serde(with = "packed_rows")] std::sync::Arc<Rows>);

    #[test]
    fn packed_rows_round_trip_in_fixed_width_pairs() {
        let rows: Rows = [(0, u64::MAX), (7, 1), (u64::MAX, 0)].into_iter().collect();
        let bytes = postcard::to_allocvec(&Packed(rows.clone().into())).unwrap();
        // One length byte, then three 16-byte pairs.
        assert_eq!(bytes.len(), 1 + 3 * 16);
        assert_eq!(postcard::from_bytes::<Packed>(&bytes).unwrap().0.as_ref(), &rows);
        let empty = postcard::to_allocvec(&Packed(Rows::new().into())).unwrap();
        assert!(postcard::from_bytes::<Packed>(&empty).unwrap().0.is_empty());
    }

    #[test]
    fn packed_rows_reject_a_partial_pair() {
        let mut bytes = postcard::to_allocvec(&Packed(Rows::from([(1, 2)]).into())).unwrap();
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
        bytes[1] = 9;
        assert!(postcard::from_bytes::<Packed>(&bytes).is_err(), "a falling key is refused");
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

    #[test]
    fn chain_starts_at_the_newest_full_and_ignores_older_incrementals() {
        let catalog = vec![
            manifest(4, BackupKind::Incremental, 40),
            manifest(1, BackupKind::Full, 10),
            manifest(2, BackupKind::Incremental, 20),
            manifest(3, BackupKind::Full, 30),
            manifest(5, BackupKind::Incremental, 50),
        ];
        let chain = RestoreChain::plan(&catalog, &[table(0, 1)]).unwrap();
        let ids: Vec<u64> = chain.backups.iter().map(|m| m.backup_id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
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
