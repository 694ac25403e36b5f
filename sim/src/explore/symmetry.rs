//! Symmetry reduction: states that differ only by which of several interchangeable shards did what are one
//! state to the search.
//!
//! # When shards are interchangeable
//!
//! A renaming `r` is a permutation of the tablets that keeps every tablet in its table, together with what it
//! takes to carry a shard's data over to the tablet it is renamed to: per tablet, a map of row keys (shard `s`
//! of the default world holds keys `10s` and `10s + 1`); a map of strings (object names, and the error text a
//! shard makes of a damaged download, which names the object and quotes checksums); and a map of checksums (the
//! checksum of the bytes an apply read, in a pending persist). `r` acts on a whole state: it moves shard nodes
//! to their new places and renames every tablet, key, string and checksum in the coordinator (volatile and
//! durable), in every shard (volatile and durable), in every output not yet carried out, pending timer and
//! download, and in every message in flight.
//!
//! [`Symmetry::of`] keeps a candidate renaming only if it maps the world onto itself, checked rather than
//! assumed:
//! - the coordinator's caps do not bind (`max_in_flight_shards` covers every tablet, `max_in_flight_tables`
//!   every table), so it sends to every waiting tablet at once and never prefers a lower tablet id;
//! - every object fits in one ranged read, so a download is one read at offset 0 and no partial bytes are ever
//!   held in a state;
//! - the catalog names object `r(o)` for `r(t)` wherever it names `o` for `t`;
//! - for every object `o` and every fate of a download (whole, truncated, corrupted, failed), what the store
//!   gives back for `r(o)` is what it gives back for `o`, renamed: the same lengths; the bundle decoded from it
//!   (checked or not) with tablet and keys renamed and equal values; or the same error, text renamed; and the
//!   checksum of the bytes renamed;
//! - the rows a restore must end with on `r(t)` are those of `t`, keys renamed;
//! - every map is a bijection (the string and checksum maps permute the strings and checksums they touch), and
//!   leaves the collection and table names alone.
//!
//! Then `r` commutes with every step: the coordinator and the shards treat tablets, keys, strings and checksums
//! alike up to equality, so renaming the input renames the output, with two exceptions the encoding absorbs.
//! Attempt numbers: the coordinator numbers the requests of one dispatch in tablet order, so the renamed state
//! numbers them the other way round. Attempts are only ever compared for equality, within one tablet and one
//! generation, and new ones come from a counter above every one in use; so within each (generation, tablet) an
//! attempt is replaced by its rank among that tablet's attempts present in the state, which changes no future.
//! Output order: a node's outputs between two persists are carried out in one step, and their effects (a message
//! put in flight in canonical order, a timer added to a sorted set, a download added) commute; so those runs are
//! encoded as multisets, and so are the sets the explorer keeps in vectors (timers, downloads, messages in
//! flight). The text of a pending `Report` output is never read (carrying it out does nothing), so it is left out.
//! The invariants and "sometimes" properties the explorer checks depend on tablets only through the checked world
//! data (an object's checksum, a tablet's expected rows), so a renamed transition breaks the same invariants.
//!
//! Each kept renaming therefore maps the transition system onto itself, fixes the initial state up to attempt
//! ranks, and preserves every checked property: states in one orbit have the same futures up to renaming, so
//! exploring one of them finds every violation (with a path of the same length) and the same liveness verdict.
//!
//! # Canonical form
//!
//! A state's key is the smallest, over the kept renamings, of the 64-bit hash of its renamed encoding. The
//! encoding is injective on states up to the absorbed exceptions: every struct is destructured and every enum
//! matched without a catch-all, down to the machines' private parts ([`Coordinator::parts`],
//! [`Shard::parts`]), so a new field or variant does not compile until it is encoded. Equal keys (barring a
//! 64-bit collision, as for plain fingerprints) mean states related by a renaming, hence with equal futures.
//! Renamings that fail a check are dropped; the kept ones need not form a group for this to hold, but they do
//! whenever the data are symmetric, and then every orbit collapses to one key.
//!
//! [`Coordinator::parts`]: lockstep::coordinator::Coordinator::parts
//! [`Shard::parts`]: lockstep::shard::Shard::parts

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use lockstep::bundle::Bundle;
use lockstep::coordinator::{
    CoordinatorDurable, CoordinatorOutput, CoordinatorParts, CoordinatorTimer, Operation, OperationStatus,
    RestoreError, RunningState, TabletNotDone,
};
use lockstep::model::{BackupManifest, Change, RestoreChain, Rows, TableSpec, TabletId};
use lockstep::protocol::{
    ApplyOutcome, ApplyReply, ApplyRequest, BundleOf, DownloadRequest, Message, NodeAddr, Output, PersistNote,
    ShardFailure,
};
use lockstep::shard::{ShardDurable, ShardOutput, ShardParts};

use super::{CoordinatorNode, ExploreWorld, Fate, InFlight, OP, ShardNode, State, index_of};
use crate::events::StableHasher;

/// Candidate renamings tried at most; larger worlds are explored without reduction.
const MAX_CANDIDATES: usize = 5_040;

/// The renamings a world is invariant under; the identity is always the first.
#[derive(Clone, Debug)]
pub struct Symmetry {
    renamings: Vec<Renaming>,
    /// The explored restore's whole chain: every state's running operation carries it, or in a restore done in
    /// segments the stretch of it its segment holds (told apart by where the stretch begins). Renamed onto itself
    /// (its objects map to each other).
    chain: Arc<RestoreChain>,
}

/// One renaming of the world onto itself.
#[derive(Clone, Debug)]
struct Renaming {
    /// Per shard node (explorer position), the position of the node it is renamed to.
    nodes: Vec<usize>,
    tablets: BTreeMap<TabletId, TabletId>,
    /// Per shard node, row key -> key of the renamed node.
    keys: Vec<BTreeMap<u64, u64>>,
    strings: BTreeMap<String, String>,
    crcs: BTreeMap<u32, u32>,
}

impl Symmetry {
    /// The renamings of shards, within each table, under which `world` is invariant (see the module docs).
    pub fn of(world: &ExploreWorld) -> Self {
        let tablets: Vec<TabletId> = world.tables.iter().flat_map(TableSpec::tablets).collect();
        let chain = match &world.initial().coordinator.machine.durable().operations[&OP].status {
            OperationStatus::Running(running) if world.config.segments == 1 => running.chain.clone(),
            OperationStatus::Running(_) => {
                Arc::new(RestoreChain::plan(&world.catalog, &world.tables).expect("the explored chain plans"))
            }
            other => panic!("the explored restore starts running, not {other:?}"),
        };
        let identity: Vec<usize> = (0..tablets.len()).collect();
        let mut renamings =
            vec![Renaming::check(world, &tablets, &identity).expect("the identity maps every world onto itself")];
        if eligible(world) {
            let candidates = permutations_within_tables(world);
            if candidates.len() <= MAX_CANDIDATES {
                renamings.extend(
                    candidates
                        .iter()
                        .filter(|nodes| **nodes != identity)
                        .filter_map(|nodes| Renaming::check(world, &tablets, nodes)),
                );
            }
        }
        Self { renamings, chain }
    }

    /// Renamings kept, the identity included.
    pub fn len(&self) -> usize {
        self.renamings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.renamings.is_empty()
    }

    /// The key a state is deduplicated by: the smallest fingerprint of its encoding under every renaming.
    pub fn canonical_fingerprint(&self, state: &State) -> u64 {
        let ranks = Ranks::of(state);
        (0..self.renamings.len()).map(|i| self.encode(state, &ranks, i)).min().expect("the identity is kept")
    }

    /// The fingerprint of `state`'s encoding under renaming number `renaming` (0: the identity).
    pub fn renamed_fingerprint(&self, state: &State, renaming: usize) -> u64 {
        self.encode(state, &Ranks::of(state), renaming)
    }

    /// Renaming number `renaming` as shard node positions: position `i` is renamed to `result[i]`.
    pub fn node_permutation(&self, renaming: usize) -> &[usize] {
        &self.renamings[renaming].nodes
    }

    fn encode(&self, state: &State, ranks: &Ranks, renaming: usize) -> u64 {
        let mut encoder =
            Encoder { chain: &self.chain, renaming: &self.renamings[renaming], ranks, hasher: StableHasher::new() };
        encoder.state(state);
        encoder.hasher.finish()
    }
}

/// Whether the machines treat the world's tablets alike at all: caps that do not bind, one read per download.
fn eligible(world: &ExploreWorld) -> bool {
    let tablets: u32 = world.tables.iter().map(|t| t.shard_count).sum();
    let one_read = world.objects.values().all(|bytes| bytes.len() as u64 <= world.shard_config.download_chunk_bytes);
    world.coordinator_config.max_in_flight_shards >= tablets
        && world.coordinator_config.max_in_flight_tables as usize >= world.tables.len()
        && one_read
}

/// Every permutation of shard node positions that keeps each tablet in its table.
fn permutations_within_tables(world: &ExploreWorld) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    let mut offset = 0;
    for table in &world.tables {
        let count = table.shard_count as usize;
        let mut next = Vec::new();
        for prefix in &all {
            for within in permutations(count) {
                let mut nodes: Vec<usize> = prefix.clone();
                nodes.extend(within.iter().map(|i| offset + i));
                next.push(nodes);
            }
            if next.len() > MAX_CANDIDATES {
                return next;
            }
        }
        all = next;
        offset += count;
    }
    all
}

fn permutations(count: usize) -> Vec<Vec<usize>> {
    if count == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for rest in permutations(count - 1) {
        for at in 0..=rest.len() {
            let mut one = rest.clone();
            one.insert(at, count - 1);
            all.push(one);
        }
    }
    all.sort();
    all
}

/// Inserts `from -> to` into a map that must stay a function.
fn extend<K: Ord + Clone, V: PartialEq + Clone>(map: &mut BTreeMap<K, V>, from: &K, to: &V) -> Option<()> {
    match map.get(from) {
        Some(known) => (known == to).then_some(()),
        None => {
            map.insert(from.clone(), to.clone());
            Some(())
        }
    }
}

/// Whether a map is injective and maps its domain onto itself.
fn permutes<K: Ord>(map: &BTreeMap<K, K>) -> bool {
    let images: BTreeSet<&K> = map.values().collect();
    images.len() == map.len() && images.iter().all(|k| map.contains_key(*k))
}

impl Renaming {
    /// The renaming moving shard node `i` to `nodes[i]`, if the world is invariant under it.
    fn check(world: &ExploreWorld, tablets: &[TabletId], nodes: &[usize]) -> Option<Self> {
        let mut renaming = Renaming {
            nodes: nodes.to_vec(),
            tablets: tablets.iter().enumerate().map(|(i, t)| (*t, tablets[nodes[i]])).collect(),
            keys: vec![BTreeMap::new(); tablets.len()],
            strings: BTreeMap::new(),
            crcs: BTreeMap::new(),
        };
        for manifest in world.catalog.iter() {
            for (i, tablet) in tablets.iter().enumerate() {
                renaming.check_object(world, manifest, i, *tablet)?;
            }
        }
        for (i, tablet) in tablets.iter().enumerate() {
            let keys = &renaming.keys[i];
            let renamed: Option<Rows> =
                world.expected[i].iter().map(|(key, value)| Some((*keys.get(key)?, *value))).collect();
            (renamed.as_ref() == Some(&world.expected[nodes[i]])).then_some(())?;
            let injective = keys.values().collect::<BTreeSet<_>>().len() == keys.len();
            injective.then_some(())?;
            assert_eq!(index_of(&world.config, *tablet), i, "shard nodes are in tablet order");
        }
        let collection = world.request().collection;
        let mut names = world.tables.iter().map(|t| t.name.as_str()).chain([collection.as_str()]);
        let names_kept = names.all(|name| renaming.string(name) == name);
        (permutes(&renaming.strings) && permutes(&renaming.crcs) && names_kept).then_some(renaming)
    }

    /// Checks tablet `tablet`'s object of `manifest` against its image, extending the maps.
    fn check_object(
        &mut self,
        world: &ExploreWorld,
        manifest: &BackupManifest,
        i: usize,
        tablet: TabletId,
    ) -> Option<()> {
        let image = self.tablets[&tablet];
        let object = manifest.object(tablet)?.to_string();
        let renamed = manifest.object(image)?.to_string();
        extend(&mut self.strings, &object, &renamed)?;
        // The explorer's own check of an apply names the object by convention.
        let conventional = BackupManifest::object_name(manifest.backup_id, tablet);
        (conventional == object && BackupManifest::object_name(manifest.backup_id, image) == renamed).then_some(())?;
        for fate in [Fate::Whole, Fate::Truncated, Fate::Corrupted, Fate::Failed] {
            let request = |object: &String| DownloadRequest {
                download_id: 0,
                object: object.clone(),
                offset: 0,
                len: world.shard_config.download_chunk_bytes,
            };
            match (world.read(&request(&object), fate), world.read(&request(&renamed), fate)) {
                (Ok(read), Ok(read_renamed)) => {
                    (read.total_len == read_renamed.total_len && read.bytes.len() == read_renamed.bytes.len())
                        .then_some(())?;
                    let payload_crc = |bytes: &[u8]| lockstep::bundle::payload_crc32(bytes);
                    extend(&mut self.crcs, &payload_crc(&read.bytes), &payload_crc(&read_renamed.bytes))?;
                    let decoded =
                        [Bundle::decode(&object, &read.bytes), Bundle::decode_unverified(&object, &read.bytes)];
                    let decoded_renamed = [
                        Bundle::decode(&renamed, &read_renamed.bytes),
                        Bundle::decode_unverified(&renamed, &read_renamed.bytes),
                    ];
                    for (one, other) in decoded.into_iter().zip(decoded_renamed) {
                        match (one, other) {
                            (Ok(bundle), Ok(bundle_renamed)) => self.check_bundle(i, &bundle, &bundle_renamed)?,
                            (Err(error), Err(error_renamed)) => {
                                extend(&mut self.strings, &error.to_string(), &error_renamed.to_string())?;
                            }
                            _ => return None,
                        }
                    }
                }
                (Err(error), Err(error_renamed)) => {
                    extend(&mut self.strings, &error.to_string(), &error_renamed.to_string())?;
                }
                _ => return None,
            }
        }
        Some(())
    }

    /// A bundle of node `i` and the bundle of its image: equal but for the tablet and the keys.
    fn check_bundle(&mut self, i: usize, bundle: &Bundle, renamed: &Bundle) -> Option<()> {
        let Bundle { backup_id, tablet, kind, changes } = bundle;
        let same = *backup_id == renamed.backup_id
            && self.tablets.get(tablet) == Some(&renamed.tablet)
            && *kind == renamed.kind
            && changes.len() == renamed.changes.len();
        same.then_some(())?;
        for (change, change_renamed) in changes.iter().zip(&renamed.changes) {
            match (*change, *change_renamed) {
                (Change::Upsert { key, value }, Change::Upsert { key: key_renamed, value: value_renamed }) => {
                    (value == value_renamed).then_some(())?;
                    extend(&mut self.keys[i], &key, &key_renamed)?;
                }
                (Change::Delete { key }, Change::Delete { key: key_renamed }) => {
                    extend(&mut self.keys[i], &key, &key_renamed)?;
                }
                _ => return None,
            }
        }
        Some(())
    }

    fn tablet(&self, tablet: TabletId) -> TabletId {
        *self.tablets.get(&tablet).unwrap_or_else(|| panic!("{tablet} is not a tablet of the explored world"))
    }

    fn string<'a>(&'a self, text: &'a str) -> &'a str {
        self.strings.get(text).map_or(text, String::as_str)
    }
}

/// Per (generation, tablet), the attempt numbers present in a state, sorted: an attempt is encoded as its rank.
struct Ranks(BTreeMap<(u64, TabletId), Vec<u32>>);

impl Ranks {
    fn of(state: &State) -> Self {
        let mut ranks = Ranks(BTreeMap::new());
        let coordinator = &state.coordinator;
        let generation = coordinator.machine.generation();
        for (tablet, _, attempt) in coordinator.machine.parts().in_flight {
            ranks.add(generation, tablet, attempt);
        }
        for (_, timer) in &coordinator.timers {
            ranks.timer(generation, timer);
        }
        for output in &coordinator.outbox {
            match output {
                Output::Send { msg, .. } => ranks.message(msg),
                Output::SetTimer { timer, .. } => ranks.timer(generation, timer),
                Output::Persist { .. } | Output::Download(_) | Output::Report(_) => {}
            }
        }
        for message in &state.network {
            ranks.message(&message.msg);
        }
        for shard in &state.shards {
            if let Some((request, ..)) = shard.machine.parts().work {
                ranks.add(request.generation, request.tablet, request.attempt);
            }
            for output in &shard.outbox {
                if let Output::Send { msg, .. } = output {
                    ranks.message(msg);
                }
            }
        }
        for attempts in ranks.0.values_mut() {
            attempts.sort_unstable();
            attempts.dedup();
        }
        ranks
    }

    fn add(&mut self, generation: u64, tablet: TabletId, attempt: u32) {
        self.0.entry((generation, tablet)).or_default().push(attempt);
    }

    fn timer(&mut self, generation: u64, timer: &CoordinatorTimer) {
        if let CoordinatorTimer::RequestTimeout { tablet, attempt, .. } = timer {
            self.add(generation, *tablet, *attempt);
        }
    }

    fn message(&mut self, message: &Message) {
        match message {
            Message::Apply(request) => self.add(request.generation, request.tablet, request.attempt),
            Message::Reply(reply) => self.add(reply.generation, reply.tablet, reply.attempt),
            Message::Client(_) | Message::ClientReply(_) => {}
        }
    }

    fn rank(&self, generation: u64, tablet: TabletId, attempt: u32) -> u64 {
        let attempts = &self.0[&(generation, tablet)];
        attempts.binary_search(&attempt).expect("every attempt of the state is ranked") as u64
    }
}

/// Hashes a state renamed: see the module docs. Every tag and length is written, so the encoding is prefix-free.
struct Encoder<'a> {
    chain: &'a Arc<RestoreChain>,
    renaming: &'a Renaming,
    ranks: &'a Ranks,
    hasher: StableHasher,
}

impl<'a> Encoder<'a> {
    fn word(&mut self, value: u64) {
        self.hasher.write_u64(value);
    }

    fn raw<T: Hash + ?Sized>(&mut self, value: &T) {
        value.hash(&mut self.hasher);
    }

    /// A multiset: each item encoded on its own, the item hashes sorted.
    fn multiset<I: IntoIterator>(&mut self, items: I, mut encode: impl FnMut(&mut Encoder<'a>, I::Item)) {
        let mut hashes: Vec<u64> = items
            .into_iter()
            .map(|item| {
                let mut item_encoder = Encoder {
                    chain: self.chain,
                    renaming: self.renaming,
                    ranks: self.ranks,
                    hasher: StableHasher::new(),
                };
                encode(&mut item_encoder, item);
                item_encoder.hasher.finish()
            })
            .collect();
        hashes.sort_unstable();
        self.word(hashes.len() as u64);
        for hash in hashes {
            self.word(hash);
        }
    }

    fn tablet(&mut self, tablet: TabletId) {
        let renamed = self.renaming.tablet(tablet);
        self.raw(&renamed);
    }

    fn string(&mut self, text: &str) {
        let renamed = self.renaming.string(text);
        self.raw(renamed);
    }

    fn attempt(&mut self, generation: u64, tablet: TabletId, attempt: u32) {
        let rank = self.ranks.rank(generation, tablet, attempt);
        self.word(rank);
    }

    fn state(&mut self, state: &State) {
        let State { now_ms, coordinator, shards, network, used, ghost, cancel, again } = state;
        self.word(*now_ms);
        self.coordinator_node(coordinator);
        let mut placed: Vec<(usize, usize)> = (0..shards.len()).map(|i| (self.renaming.nodes[i], i)).collect();
        placed.sort_unstable();
        self.word(shards.len() as u64);
        for (_, i) in placed {
            self.shard_node(i, &shards[i]);
        }
        self.multiset(network, |e, message| {
            let InFlight { from, to, fingerprint: _, msg } = message;
            e.addr(*from);
            e.addr(*to);
            e.message(msg);
        });
        self.raw(used);
        self.raw(ghost);
        self.raw(cancel);
        self.raw(again);
    }

    fn coordinator_node(&mut self, node: &CoordinatorNode) {
        let CoordinatorNode { machine, durable, outbox, timers } = node;
        let generation = machine.generation();
        let CoordinatorParts { config, durable: live, in_flight, next_attempt, ran_ahead, rng } = machine.parts();
        self.raw(config);
        self.coordinator_durable(live);
        self.multiset(in_flight, |e, (tablet, op, attempt)| {
            e.tablet(tablet);
            e.word(op);
            e.attempt(generation, tablet, attempt);
        });
        self.word(u64::from(next_attempt));
        self.multiset(ran_ahead, |e, (op, tablet, increment)| {
            e.word(*op);
            e.tablet(*tablet);
            e.word(u64::from(*increment));
        });
        self.raw(rng);
        match durable {
            None => self.word(0),
            Some(durable) => {
                self.word(1);
                self.coordinator_durable(durable);
            }
        }
        self.outbox(outbox, |e, output| e.coordinator_output(generation, output));
        self.multiset(timers, |e, (at_ms, timer)| {
            e.word(*at_ms);
            e.coordinator_timer(generation, timer);
        });
    }

    fn coordinator_durable(&mut self, durable: &CoordinatorDurable) {
        let CoordinatorDurable { generation, operations, tables, sources_in_use, newest_op } = durable;
        self.word(*generation);
        self.raw(newest_op);
        self.word(operations.len() as u64);
        for (op, operation) in operations.iter() {
            self.word(*op);
            self.operation(operation);
        }
        self.raw(tables);
        self.multiset(sources_in_use.iter(), |e, (collection, op)| {
            e.string(collection);
            e.word(*op);
        });
    }

    fn operation(&mut self, operation: &Operation) {
        let Operation { op, collection, tables, backup_ids, segments, started_at_ms, deadline_at_ms, status } =
            operation;
        self.word(*op);
        self.string(collection);
        // Table specs and segments hold no tablet, and no renaming touches a table name.
        self.raw(tables);
        self.raw(backup_ids);
        self.raw(segments);
        self.word(*started_at_ms);
        self.word(*deadline_at_ms);
        match status {
            OperationStatus::Running(running) => {
                self.word(0);
                let RunningState {
                    chain,
                    first_increment,
                    increment,
                    increment_deadline_at_ms,
                    increment_limit_ms,
                    done,
                    retries,
                } = running;
                self.word(u64::from(*first_increment));
                let first = *first_increment as usize;
                assert!(
                    Arc::ptr_eq(chain, self.chain)
                        || self.chain.backups().get(first..first + chain.len() as usize) == Some(chain.backups()),
                    "the explored restore plans one chain, which every kept renaming maps onto itself"
                );
                self.word(u64::from(*increment));
                self.word(*increment_deadline_at_ms);
                self.word(*increment_limit_ms);
                self.multiset(done, |e, tablet| e.tablet(*tablet));
                self.multiset(retries, |e, (tablet, retry)| {
                    e.tablet(*tablet);
                    e.raw(retry);
                });
            }
            OperationStatus::Done { increments, finished_at_ms } => {
                self.word(1);
                self.word(u64::from(*increments));
                self.word(*finished_at_ms);
            }
            OperationStatus::Failed { error, failed_at_ms } => {
                self.word(2);
                self.restore_error(error);
                self.word(*failed_at_ms);
            }
            OperationStatus::AwaitingSegment { reached, since_ms } => {
                self.word(3);
                self.word(reached.0);
                self.word(reached.1);
                self.word(*since_ms);
            }
        }
    }

    fn restore_error(&mut self, error: &RestoreError) {
        match error {
            RestoreError::Shard { increment, backup_id, tablet, cause } => {
                self.word(0);
                self.word(u64::from(*increment));
                self.word(*backup_id);
                self.tablet(*tablet);
                self.shard_failure(cause);
            }
            RestoreError::DeadlineExceeded { increment, not_done } => {
                self.word(1);
                self.raw(increment);
                self.not_done(not_done);
            }
            RestoreError::IncrementDeadlineExceeded { increment, limit_ms, not_done } => {
                self.word(2);
                self.raw(&(increment, limit_ms));
                self.not_done(not_done);
            }
            RestoreError::Cancelled { applied } => {
                self.word(3);
                self.word(u64::from(*applied));
            }
        }
    }

    /// The tablets of a deadline failure: listed in the operation's order, which a renaming of tablets changes,
    /// so as a multiset (the renamed operation lists the renamed tablets in its own order).
    fn not_done(&mut self, not_done: &[TabletNotDone]) {
        self.multiset(not_done, |e, TabletNotDone { tablet, failed_attempts, last_failure }| {
            e.tablet(*tablet);
            e.word(u64::from(*failed_attempts));
            // A failure kind names no tablet.
            e.raw(last_failure);
        });
    }

    fn shard_failure(&mut self, failure: &ShardFailure) {
        match failure {
            ShardFailure::ObjectMissing { object } => {
                self.word(0);
                self.string(object);
            }
            ShardFailure::DownloadFailed { object, attempts, detail } => {
                self.word(1);
                self.string(object);
                self.word(u64::from(*attempts));
                self.string(detail);
            }
            ShardFailure::BadBundle { detail } => {
                self.word(2);
                self.string(detail);
            }
            ShardFailure::WrongBundle { object, expected, found } => {
                self.word(3);
                self.string(object);
                for BundleOf { backup_id, kind, tablet } in [expected, found] {
                    self.word(*backup_id);
                    self.raw(kind);
                    self.tablet(*tablet);
                }
            }
            ShardFailure::OutOfOrder { expected, requested } => {
                self.word(4);
                self.raw(&(expected, requested));
            }
            ShardFailure::WrongShard { requested, actual } => {
                self.word(5);
                self.tablet(*requested);
                self.tablet(*actual);
            }
            ShardFailure::Superseded { requested, held } => {
                self.word(6);
                self.raw(&(requested, held));
            }
        }
    }

    fn coordinator_timer(&mut self, generation: u64, timer: &CoordinatorTimer) {
        match timer {
            CoordinatorTimer::RequestTimeout { op, tablet, increment, attempt } => {
                self.word(0);
                self.word(*op);
                self.tablet(*tablet);
                self.word(u64::from(*increment));
                self.attempt(generation, *tablet, *attempt);
            }
            CoordinatorTimer::RetryDue => self.word(1),
            CoordinatorTimer::Deadline { op } => {
                self.word(2);
                self.word(*op);
            }
            CoordinatorTimer::IncrementDeadline { op, increment } => {
                self.word(3);
                self.word(*op);
                self.word(u64::from(*increment));
            }
        }
    }

    fn addr(&mut self, addr: NodeAddr) {
        match addr {
            NodeAddr::Coordinator => self.word(0),
            NodeAddr::Shard(tablet) => {
                self.word(1);
                self.tablet(tablet);
            }
            NodeAddr::Client => self.word(2),
            NodeAddr::Publisher => self.word(3),
            NodeAddr::Replica => self.word(4),
        }
    }

    fn message(&mut self, message: &Message) {
        match message {
            Message::Apply(request) => {
                self.word(0);
                self.apply_request(request);
            }
            Message::Reply(reply) => {
                self.word(1);
                let ApplyReply { op, generation, attempt, increment, tablet, outcome } = reply;
                self.word(*op);
                self.word(*generation);
                self.attempt(*generation, *tablet, *attempt);
                self.word(u64::from(*increment));
                self.tablet(*tablet);
                match outcome {
                    ApplyOutcome::Applied => self.word(0),
                    ApplyOutcome::AlreadyApplied => self.word(1),
                    ApplyOutcome::Failed { permanent, cause } => {
                        self.word(2);
                        self.raw(permanent);
                        self.shard_failure(cause);
                    }
                }
            }
            Message::Client(_) | Message::ClientReply(_) => panic!("the explorer has no client"),
        }
    }

    fn apply_request(&mut self, request: &ApplyRequest) {
        let ApplyRequest { op, generation, attempt, increment, backup_id, kind, tablet, object } = request;
        self.word(*op);
        self.word(*generation);
        self.attempt(*generation, *tablet, *attempt);
        self.word(u64::from(*increment));
        self.word(*backup_id);
        self.raw(kind);
        self.tablet(*tablet);
        self.string(object);
    }

    fn download_request(&mut self, request: &DownloadRequest) {
        let DownloadRequest { download_id, object, offset, len } = request;
        self.word(*download_id);
        self.string(object);
        self.word(*offset);
        self.word(*len);
    }

    /// A node's outputs: persists in place, the outputs between two persists as a multiset.
    fn outbox<D, T>(&mut self, outbox: &[Output<D, T>], mut encode: impl FnMut(&mut Encoder<'a>, &Output<D, T>)) {
        self.word(outbox.len() as u64);
        let mut run: Vec<&Output<D, T>> = Vec::new();
        for output in outbox {
            if matches!(output, Output::Persist { .. }) {
                if !run.is_empty() {
                    self.word(1);
                    self.multiset(run.drain(..), &mut encode);
                }
                self.word(0);
                encode(self, output);
            } else {
                run.push(output);
            }
        }
        if !run.is_empty() {
            self.word(1);
            self.multiset(run, &mut encode);
        }
    }

    fn coordinator_output(&mut self, generation: u64, output: &CoordinatorOutput) {
        self.output(
            output,
            |e, durable| e.coordinator_durable(durable),
            |e, timer| e.coordinator_timer(generation, timer),
        );
    }

    fn output<D, T>(
        &mut self,
        output: &Output<D, T>,
        durable: impl FnOnce(&mut Self, &D),
        timer: impl FnOnce(&mut Self, &T),
    ) {
        match output {
            Output::Persist { state, note } => {
                self.word(0);
                durable(self, state);
                match note {
                    PersistNote::Coordinator(marks) => {
                        self.word(0);
                        self.raw(marks);
                    }
                    PersistNote::ShardApplied { op, increment, backup_id, payload_crc32 } => {
                        self.word(1);
                        self.word(*op);
                        self.word(u64::from(*increment));
                        self.word(*backup_id);
                        let crc = self.renaming.crcs.get(payload_crc32).unwrap_or(payload_crc32);
                        self.word(u64::from(*crc));
                    }
                    // Replication roles take no part in the explorer's worlds.
                    PersistNote::Published { .. } | PersistNote::Replicated { .. } => {
                        unreachable!("the explorer runs no replication role")
                    }
                }
            }
            Output::Send { to, msg } => {
                self.word(1);
                self.addr(*to);
                self.message(msg);
            }
            Output::SetTimer { at_ms, timer: t } => {
                self.word(2);
                self.word(*at_ms);
                timer(self, t);
            }
            Output::Download(request) => {
                self.word(3);
                self.download_request(request);
            }
            // Carrying out a report does nothing; its text is never read.
            Output::Report(_) => self.word(4),
        }
    }

    fn shard_node(&mut self, i: usize, node: &ShardNode) {
        let ShardNode { machine, durable, outbox, timers, downloads } = node;
        let ShardParts { id, config, durable: live, work, next_download_id } = machine.parts();
        self.tablet(id);
        self.raw(config);
        self.shard_durable(i, live);
        match work {
            None => self.word(0),
            Some((request, download_id, buffer, failures)) => {
                self.word(1);
                self.apply_request(request);
                self.word(download_id);
                assert!(buffer.is_empty(), "every download of a symmetric world is one read");
                self.word(u64::from(failures));
            }
        }
        self.word(next_download_id);
        match durable {
            None => self.word(0),
            Some(durable) => {
                self.word(1);
                self.shard_durable(i, durable);
            }
        }
        self.outbox(outbox, |e, output: &ShardOutput| e.output(output, |e, d| e.shard_durable(i, d), |e, t| e.raw(t)));
        self.multiset(timers, |e, timer| e.raw(timer));
        self.multiset(downloads, |e, request| e.download_request(request));
    }

    fn shard_durable(&mut self, i: usize, durable: &ShardDurable) {
        let ShardDurable { op, applied_through, rows } = durable;
        self.raw(op);
        self.raw(applied_through);
        let keys = &self.renaming.keys[i];
        let mut renamed: Vec<(u64, u64)> = rows
            .iter()
            .map(|(key, value)| {
                let key = keys.get(key).unwrap_or_else(|| panic!("key {key} of shard node {i} is in no bundle"));
                (*key, *value)
            })
            .collect();
        renamed.sort_unstable();
        self.raw(&renamed);
    }
}
