//! One seed -> one world: topology, source table history, the backup chain taken from it, the fault plan.
//!
//! Everything is drawn with ChaCha from the seed, so the same seed always builds the same world. The oracle
//! (the rows a correct restore must end with) is the source table at the time of the last backup, taken
//! straight from the workload history; it never looks at bundles or at how the protocol plans its chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep::bundle::Bundle;
use lockstep::coordinator::{CoordinatorBug, CoordinatorConfig, RestoreRequest};
use lockstep::model::{BackupKind, BackupManifest, Change, IncrementIndex, Key, Rows, ShardId, ShardMap};
use lockstep::shard::{ShardBug, ShardConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::faults::FaultPlan;

/// The operation id every simulated restore uses.
pub const OPERATION_ID: u64 = 1;

/// Knobs of world generation. `None` means "draw from the seed".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorldParams {
    /// Shards of the table (1-8 when drawn).
    pub shard_count: Option<u32>,
    /// Incrementals after the newest full backup (2-6 when drawn).
    pub incrementals: Option<u32>,
    /// Rows in the source table at the first backup, roughly (40-400 when drawn).
    pub initial_rows: Option<u32>,
    /// Fault mix; drawn per seed (swarm) when `None`.
    pub faults: Option<FaultPlan>,
    /// Probability that a world loses one bundle object for good (then it must end in a clean Failed).
    pub lost_object_probability: f64,
    /// Deliberate bugs to run with.
    pub bugs: Bugs,
}

/// Deliberately broken protocol variants, to show that the checkers catch them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    pub coordinator: Option<CoordinatorBug>,
    pub shard: Option<ShardBug>,
}

impl WorldParams {
    /// The default world of `cargo sim run`: everything drawn from the seed, 5% of worlds lose an object.
    pub fn sweep_default() -> Self {
        Self { lost_object_probability: 0.05, ..Self::default() }
    }
}

/// A bundle object made permanently missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostObject {
    pub increment: IncrementIndex,
    pub shard: ShardId,
    pub object: String,
}

#[derive(Clone, Debug)]
pub struct World {
    pub seed: u64,
    pub shard_map: ShardMap,
    /// Every backup in the store, the ignored older ones included.
    pub catalog: Vec<BackupManifest>,
    /// Every object in the store, intact. Shared: every run of the world reads the same bytes.
    pub objects: Arc<BTreeMap<String, Vec<u8>>>,
    /// Increments in the restore chain (the newest full plus the incrementals after it), from the workload.
    pub chain_len: u32,
    /// Backup id of each increment of the restore chain, from the workload.
    pub chain_backup_ids: Vec<u64>,
    /// The oracle: the source table when the last backup was taken.
    pub expected_rows: Arc<Rows>,
    pub lost_object: Option<LostObject>,
    pub faults: FaultPlan,
    /// After healing, the restore must end within this much simulated time.
    pub liveness_bound_ms: u64,
    pub coordinator: CoordinatorConfig,
    pub shard: ShardConfig,
    /// How long a shard waits for one ranged read.
    pub download_timeout_ms: u64,
}

impl World {
    pub fn generate(seed: u64, params: &WorldParams) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shard_count = params.shard_count.unwrap_or_else(|| rng.gen_range(1..=8));
        let incrementals = params.incrementals.unwrap_or_else(|| rng.gen_range(2..=6));
        let initial_rows = params.initial_rows.unwrap_or_else(|| rng.gen_range(40..=400));
        let key_space = u64::from(initial_rows) * 4;
        let shard_map = ShardMap::even(shard_count, key_space);

        let history = Workload::run(&mut rng, key_space, initial_rows, incrementals);
        let mut catalog = Vec::new();
        let mut objects = BTreeMap::new();
        for backup in &history.backups {
            let manifest = backup.manifest(&shard_map);
            for (shard, object) in shard_map.shards().zip(&manifest.shard_objects) {
                let changes =
                    backup.changes.iter().filter(|c| shard_map.shard_for(c.key()) == shard).copied().collect();
                let bundle = Bundle { backup_id: backup.backup_id, shard, kind: backup.kind, changes };
                objects.insert(object.clone(), bundle.encode());
            }
            catalog.push(manifest);
        }
        // The store lists backups in no particular time order.
        shuffle(&mut rng, &mut catalog);

        let newest_full = history.backups.iter().rposition(|b| b.kind == BackupKind::Full).expect("history has a full");
        let chain_backup_ids: Vec<u64> = history.backups[newest_full..].iter().map(|b| b.backup_id).collect();
        let chain_len = u32::try_from(chain_backup_ids.len()).expect("short chain");
        let lost_object = rng.gen_bool(params.lost_object_probability).then(|| {
            let increment = rng.gen_range(0..chain_len);
            let shard = ShardId(rng.gen_range(0..shard_count));
            let object = BackupManifest::object_name(chain_backup_ids[increment as usize], shard);
            LostObject { increment, shard, object }
        });
        let faults = params.faults.clone().unwrap_or_else(|| {
            let heal_at_ms = rng.gen_range(2_000..20_000);
            FaultPlan::swarm(&mut rng, heal_at_ms)
        });
        let coordinator = CoordinatorConfig {
            max_in_flight_shards: rng.gen_range(1..=shard_count.max(1)),
            bug: params.bugs.coordinator,
            ..CoordinatorConfig::default()
        };
        let shard = ShardConfig {
            download_chunk_bytes: rng.gen_range(256..=2048),
            bug: params.bugs.shard,
            ..ShardConfig::default()
        };
        Self {
            seed,
            shard_map,
            catalog,
            objects: Arc::new(objects),
            chain_len,
            chain_backup_ids,
            expected_rows: Arc::new(history.final_rows),
            lost_object,
            faults,
            liveness_bound_ms: 120_000,
            coordinator,
            shard,
            download_timeout_ms: 1_000,
        }
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_map.shard_count()
    }

    pub fn restore_request(&self) -> RestoreRequest {
        RestoreRequest { op: OPERATION_ID, shard_count: self.shard_count(), catalog: self.catalog.clone() }
    }

    pub fn expected_rows_of(&self, shard: ShardId) -> Rows {
        self.shard_map.rows_of(&self.expected_rows, shard)
    }

    /// The oracle's rows of `shard`, in key order, without copying them.
    pub fn expected_rows_in(&self, shard: ShardId) -> impl Iterator<Item = (&Key, &lockstep::model::Value)> {
        self.shard_map.rows_in(&self.expected_rows, shard)
    }

    /// The checksum of the intact bytes of `object`.
    pub fn intact_crc32(&self, object: &str) -> Option<u32> {
        self.objects.get(object).map(|bytes| crc32fast::hash(bytes))
    }

    pub fn total_rows(&self) -> usize {
        self.expected_rows.len()
    }

    /// A few lines saying what this world is: topology, chain, fault mix, lost object, bugs.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "seed {}: {} shard(s), {} rows at the last backup, chain of {} increments (backups {:?}), heal at {} ms\n",
            self.seed,
            self.shard_count(),
            self.total_rows(),
            self.chain_len,
            self.chain_backup_ids,
            self.faults.heal_at_ms
        );
        let enabled: Vec<String> =
            self.faults.enabled().map(|k| format!("{}={:.2}", k.name(), self.faults.rate(k))).collect();
        let enabled = if enabled.is_empty() { "none".to_string() } else { enabled.join(" ") };
        text.push_str(&format!("faults on: {enabled}\n"));
        if let Some(lost) = &self.lost_object {
            text.push_str(&format!(
                "object lost for good: {} (increment {}, {})\n",
                lost.object, lost.increment, lost.shard
            ));
        }
        if let Some(bug) = self.coordinator.bug {
            text.push_str(&format!("deliberate coordinator bug: {bug:?}\n"));
        }
        if let Some(bug) = self.shard.bug {
            text.push_str(&format!("deliberate shard bug: {bug:?}\n"));
        }
        text
    }
}

/// One backup as the workload took it.
struct TakenBackup {
    backup_id: u64,
    kind: BackupKind,
    taken_at_ms: u64,
    changes: Vec<Change>,
}

impl TakenBackup {
    fn manifest(&self, shard_map: &ShardMap) -> BackupManifest {
        BackupManifest {
            backup_id: self.backup_id,
            kind: self.kind,
            taken_at_ms: self.taken_at_ms,
            shard_objects: shard_map.shards().map(|s| BackupManifest::object_name(self.backup_id, s)).collect(),
        }
    }
}

/// The source table's history and the backups taken of it.
struct Workload {
    backups: Vec<TakenBackup>,
    final_rows: Rows,
}

impl Workload {
    /// Older full, 1-2 incrementals (to be ignored), newer full, then `incrementals` incrementals, with a batch of
    /// mutations before every backup.
    fn run(rng: &mut ChaCha8Rng, key_space: Key, initial_rows: u32, incrementals: u32) -> Self {
        let mut kinds = vec![BackupKind::Full];
        kinds.extend((0..rng.gen_range(1..=2)).map(|_| BackupKind::Incremental));
        kinds.push(BackupKind::Full);
        kinds.extend((0..incrementals).map(|_| BackupKind::Incremental));

        let mut source = Rows::new();
        let mut deleted: Vec<Key> = Vec::new();
        let mut last_backup = Rows::new();
        let mut backups = Vec::new();
        let mut now_ms = 1_000;
        for (i, kind) in kinds.into_iter().enumerate() {
            let batch = if i == 0 { initial_rows } else { rng.gen_range(0..=initial_rows / 4) };
            for _ in 0..batch {
                mutate(rng, key_space, &mut source, &mut deleted);
            }
            now_ms += rng.gen_range(1_000..60_000);
            let changes = match kind {
                BackupKind::Full => source.iter().map(|(&key, &value)| Change::Upsert { key, value }).collect(),
                BackupKind::Incremental => diff(&last_backup, &source),
            };
            last_backup = source.clone();
            backups.push(TakenBackup { backup_id: 100 + i as u64, kind, taken_at_ms: now_ms, changes });
        }
        Self { backups, final_rows: source }
    }
}

/// One source-table mutation: insert, update, delete, or re-insert a key deleted earlier.
fn mutate(rng: &mut ChaCha8Rng, key_space: Key, source: &mut Rows, deleted: &mut Vec<Key>) {
    let value = rng.r#gen::<u32>() as u64;
    match rng.gen_range(0..10) {
        0..=4 => {
            source.insert(rng.gen_range(0..key_space), value);
        }
        5..=6 if !source.is_empty() => {
            let key = existing_key(rng, key_space, source);
            source.insert(key, value);
        }
        7..=8 if !source.is_empty() => {
            let key = existing_key(rng, key_space, source);
            source.remove(&key);
            deleted.push(key);
        }
        _ if !deleted.is_empty() => {
            let key = deleted.swap_remove(rng.gen_range(0..deleted.len()));
            source.insert(key, value);
        }
        _ => {
            source.insert(rng.gen_range(0..key_space), value);
        }
    }
}

/// An existing key: the first at or after a random point of the key space, wrapping around.
fn existing_key(rng: &mut ChaCha8Rng, key_space: Key, rows: &Rows) -> Key {
    let from = rng.gen_range(0..key_space);
    let key = rows.range(from..).next().or_else(|| rows.iter().next()).map(|(k, _)| *k);
    key.expect("rows is not empty")
}

/// The incremental changes that turn `before` into `after`: deletes and upserts in key order.
fn diff(before: &Rows, after: &Rows) -> Vec<Change> {
    let mut changes = Vec::new();
    for key in before.keys() {
        if !after.contains_key(key) {
            changes.push(Change::Delete { key: *key });
        }
    }
    for (key, value) in after {
        if before.get(key) != Some(value) {
            changes.push(Change::Upsert { key: *key, value: *value });
        }
    }
    changes.sort_by_key(Change::key);
    changes
}

fn shuffle<T>(rng: &mut ChaCha8Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.gen_range(0..=i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep::model::{RestoreChain, apply_changes};

    #[test]
    fn same_seed_builds_the_same_world() {
        let a = World::generate(42, &WorldParams::sweep_default());
        let b = World::generate(42, &WorldParams::sweep_default());
        assert_eq!(a.objects, b.objects);
        assert_eq!(a.catalog, b.catalog);
        assert_eq!(a.faults, b.faults);
    }

    #[test]
    fn replaying_the_planned_chain_gives_the_oracle() {
        for seed in 0..50 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            let chain = RestoreChain::plan(&world.catalog, world.shard_count()).unwrap();
            assert_eq!(chain.len(), world.chain_len, "seed {seed}");
            for shard in world.shard_map.shards() {
                let mut rows = Rows::new();
                for manifest in &chain.backups {
                    let object = &manifest.shard_objects[shard.0 as usize];
                    let bundle = Bundle::decode(object, &world.objects[object]).unwrap();
                    apply_changes(&mut rows, &bundle.changes);
                }
                assert_eq!(rows, world.expected_rows_of(shard), "seed {seed} {shard}");
            }
        }
    }

    #[test]
    fn worlds_contain_keys_deleted_then_reinserted_and_an_ignored_older_chain() {
        let mut reinserted = false;
        for seed in 0..20 {
            let world = World::generate(seed, &WorldParams::sweep_default());
            let fulls = world.catalog.iter().filter(|m| m.kind == BackupKind::Full).count();
            assert_eq!(fulls, 2, "seed {seed}: an older full and a newer one");
            let mut deleted = std::collections::BTreeSet::new();
            for backup_id in &world.chain_backup_ids[1..] {
                for shard in world.shard_map.shards() {
                    let object = BackupManifest::object_name(*backup_id, shard);
                    for change in Bundle::decode(&object, &world.objects[&object]).unwrap().changes {
                        match change {
                            Change::Delete { key } => {
                                deleted.insert(key);
                            }
                            Change::Upsert { key, .. } => reinserted |= deleted.contains(&key),
                        }
                    }
                }
            }
        }
        assert!(reinserted, "some world deletes a key in one incremental and re-inserts it in a later one");
    }
}
