//! The simulated disk.
//!
//! Fault model:
//! - a write or a removal lands in a volatile buffer; only `sync` makes it durable (after a short simulated
//!   delay, during which a crash can strike);
//! - a crash loses every unsynced write and removal (`disk-lost-write`), and with the seed's `disk-torn-write`
//!   rate the last unsynced write (when the last change is a write) instead reaches the disk torn: a random
//!   prefix of it replaces the file;
//! - synced data is never lost or damaged. This is stricter than a real disk only in that the tear is always
//!   a prefix; the state file format detects any damage by checksum.
//!
//! madsim's own file system keeps unsynced data across a kill, so it cannot stand in for this.

use std::collections::BTreeMap;
use std::io;

use lockstep::io::Disk;
use rand::Rng;

/// The contents of one node's disk. Lives in the world state, so it survives the node's restarts.
#[derive(Clone, Debug, Default)]
pub struct DiskState {
    durable: BTreeMap<String, Vec<u8>>,
    /// Writes (`Some`) and removals (`None`) since the last sync, oldest first.
    unsynced: Vec<(String, Option<Vec<u8>>)>,
}

/// What a crash did to a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashDamage {
    pub lost_writes: usize,
    pub torn: bool,
}

impl DiskState {
    /// Reads as the node would see it: its own unsynced writes included.
    pub fn read(&self, name: &str) -> Option<Vec<u8>> {
        match self.unsynced.iter().rev().find(|(n, _)| n == name) {
            Some((_, bytes)) => bytes.clone(),
            None => self.durable.get(name).cloned(),
        }
    }

    /// The names of the files as the node would see them, in name order.
    pub fn list(&self) -> Vec<String> {
        let mut names: BTreeMap<&str, bool> = self.durable.keys().map(|name| (name.as_str(), true)).collect();
        for (name, bytes) in &self.unsynced {
            names.insert(name, bytes.is_some());
        }
        names.into_iter().filter(|(_, there)| *there).map(|(name, _)| name.to_string()).collect()
    }

    /// The names of the durable files, in name order.
    pub fn list_durable(&self) -> Vec<String> {
        self.durable.keys().cloned().collect()
    }

    /// Reads only what is durable.
    pub fn read_durable(&self, name: &str) -> Option<Vec<u8>> {
        self.durable.get(name).cloned()
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) {
        self.unsynced.push((name.to_string(), Some(bytes.to_vec())));
    }

    pub fn remove(&mut self, name: &str) {
        self.unsynced.push((name.to_string(), None));
    }

    pub fn sync(&mut self) {
        for (name, bytes) in self.unsynced.drain(..) {
            match bytes {
                Some(bytes) => self.durable.insert(name, bytes),
                None => self.durable.remove(&name),
            };
        }
    }

    /// A crash: unsynced writes are lost, the last one possibly torn onto the disk when `tear` says so.
    pub fn crash(&mut self, rng: &mut impl Rng, tear: bool) -> CrashDamage {
        let lost_writes = self.unsynced.len();
        // A removal does not tear: only a last change that is a write can reach the disk in part.
        let torn = tear && self.unsynced.last().is_some_and(|(_, bytes)| bytes.is_some());
        if torn {
            let (name, bytes) = self.unsynced.pop().expect("there is an unsynced write");
            let bytes = bytes.expect("the last change is a write");
            let keep = rng.gen_range(0..bytes.len().max(1));
            self.durable.insert(name, bytes[..keep.min(bytes.len())].to_vec());
        }
        self.unsynced.clear();
        CrashDamage { lost_writes, torn }
    }

    /// A view of only the durable part, as a [`Disk`] for loading final states.
    pub fn durable_view(&self) -> DurableView<'_> {
        DurableView(self)
    }
}

/// Read-only [`Disk`] over the durable part of a [`DiskState`].
pub struct DurableView<'a>(&'a DiskState);

impl Disk for DurableView<'_> {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.read_durable(name))
    }

    async fn write(&self, _name: &str, _bytes: &[u8]) -> io::Result<()> {
        Err(io::Error::other("a durable view is read-only"))
    }

    async fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.list_durable())
    }

    async fn remove(&self, _name: &str) -> io::Result<()> {
        Err(io::Error::other("a durable view is read-only"))
    }
}

/// A node's handle on its simulated disk.
#[cfg(madsim)]
pub struct SimDisk {
    pub node: lockstep::protocol::NodeAddr,
    pub state: crate::state::Shared,
}

/// How long a sync takes; crashes can land inside it.
#[cfg(madsim)]
const SYNC_LATENCY: std::time::Duration = std::time::Duration::from_millis(2);

#[cfg(madsim)]
impl Disk for SimDisk {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.state.lock().disks.get(&self.node).and_then(|d| d.read(name)))
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.state.lock().disks.entry(self.node).or_default().write(name, bytes);
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        tokio::time::sleep(SYNC_LATENCY).await;
        self.state.lock().disks.entry(self.node).or_default().sync();
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.state.lock().disks.get(&self.node).map(DiskState::list).unwrap_or_default())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.state.lock().disks.entry(self.node).or_default().remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_crash_loses_unsynced_writes_and_keeps_synced_ones() {
        let mut disk = DiskState::default();
        disk.write("a", b"one");
        disk.sync();
        disk.write("a", b"two");
        assert_eq!(disk.read("a").as_deref(), Some(&b"two"[..]));
        let damage = disk.crash(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1), false);
        assert_eq!(damage, CrashDamage { lost_writes: 1, torn: false });
        assert_eq!(disk.read("a").as_deref(), Some(&b"one"[..]));
    }

    #[test]
    fn a_removal_is_seen_at_once_durable_after_a_sync_and_lost_in_a_crash_before_it() {
        let mut disk = DiskState::default();
        disk.write("a", b"one");
        disk.write("b", b"two");
        disk.sync();
        disk.remove("a");
        assert_eq!((disk.read("a"), disk.list()), (None, vec!["b".to_string()]));
        assert_eq!(disk.list_durable(), vec!["a".to_string(), "b".to_string()]);
        // A torn crash tears only a write: a lost removal leaves the file whole.
        let damage = disk.crash(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1), true);
        assert_eq!(damage, CrashDamage { lost_writes: 1, torn: false });
        assert_eq!(disk.read("a").as_deref(), Some(&b"one"[..]));
        disk.remove("a");
        disk.sync();
        assert_eq!((disk.read_durable("a"), disk.list_durable()), (None, vec!["b".to_string()]));
    }

    #[test]
    fn a_torn_crash_leaves_a_prefix_of_the_last_write() {
        let mut disk = DiskState::default();
        disk.write("b", b"0123456789");
        let damage = disk.crash(&mut rand_chacha::ChaCha8Rng::seed_from_u64(3), true);
        assert!(damage.torn);
        let left = disk.read_durable("b").unwrap();
        assert!(left.len() < 10 && b"0123456789".starts_with(&left));
    }

    /// A node's disk for the state file alone: this disk model, without madsim.
    struct ModelDisk(std::cell::RefCell<DiskState>);

    impl Disk for ModelDisk {
        fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
            Ok(self.0.borrow().read(name))
        }

        async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
            self.0.borrow_mut().write(name, bytes);
            Ok(())
        }

        async fn sync(&self) -> io::Result<()> {
            self.0.borrow_mut().sync();
            Ok(())
        }

        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.0.borrow().list())
        }

        async fn remove(&self, name: &str) -> io::Result<()> {
            self.0.borrow_mut().remove(name);
            Ok(())
        }
    }

    /// Polls a future of the model disk, which never waits, to its end.
    fn ready<T>(future: impl Future<Output = T>) -> T {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(future).poll(&mut cx) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("the model disk never waits"),
        }
    }

    /// How a node keeps its state on disk, for the property below.
    trait Persistence {
        fn load(disk: &ModelDisk) -> (Self, Option<Vec<u8>>)
        where
            Self: Sized;
        fn write(&mut self, disk: &ModelDisk, state: &[u8]);
        fn sync(&mut self, disk: &ModelDisk) {
            ready(disk.sync()).unwrap();
        }
    }

    impl Persistence for lockstep::io::StateFile {
        fn load(disk: &ModelDisk) -> (Self, Option<Vec<u8>>) {
            lockstep::io::StateFile::load(disk, "node.state").unwrap()
        }

        fn write(&mut self, disk: &ModelDisk, state: &[u8]) {
            ready(lockstep::io::StateFile::write(self, disk, state)).unwrap();
        }

        fn sync(&mut self, disk: &ModelDisk) {
            ready(lockstep::io::StateFile::sync(self, disk)).unwrap();
        }
    }

    /// A state file whose syncs go around it: it never learns which slot holds the synced state.
    struct SyncedBehindItsBack(lockstep::io::StateFile);

    impl Persistence for SyncedBehindItsBack {
        fn load(disk: &ModelDisk) -> (Self, Option<Vec<u8>>) {
            let (file, loaded) = lockstep::io::StateFile::load(disk, "node.state").unwrap();
            (SyncedBehindItsBack(file), loaded)
        }

        fn write(&mut self, disk: &ModelDisk, state: &[u8]) {
            ready(self.0.write(disk, state)).unwrap();
        }
    }

    /// The state written over the one file in place: what the state file's two checksummed slots are for.
    struct InPlace;

    impl Persistence for InPlace {
        fn load(disk: &ModelDisk) -> (Self, Option<Vec<u8>>) {
            (InPlace, disk.read("node.state").unwrap())
        }

        fn write(&mut self, disk: &ModelDisk, state: &[u8]) {
            ready(disk.write("node.state", state)).unwrap();
        }
    }

    type Steps = Vec<(Vec<u8>, u8, u64)>;

    fn steps() -> impl proptest::strategy::Strategy<Value = Steps> {
        use proptest::prelude::any;
        proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..40), 0u8..5, any::<u64>()), 1..40)
    }

    /// A node persists as the hosts do (writes its state, then syncs it, unless it crashes first), or writes
    /// again before a sync, and crashes at any moment, a crash losing every unsynced write and perhaps tearing the
    /// last: the state it loads after every crash must be the last one it synced, never an older one, a newer
    /// one, a damaged one or none.
    fn loads_the_last_synced_state<P: Persistence>(steps: Steps) -> Result<(), proptest::test_runner::TestCaseError> {
        let disk = ModelDisk(std::cell::RefCell::new(DiskState::default()));
        let (mut file, loaded) = P::load(&disk);
        proptest::prop_assert_eq!(loaded, None);
        let mut synced: Option<Vec<u8>> = None;
        for (state, fate, seed) in steps {
            file.write(&disk, &state);
            // 0: synced; 1: synced, then a crash; 2: a crash before the sync; 3: a torn crash before it; 4: neither
            // a sync nor a crash (the next write comes first).
            if fate <= 1 {
                file.sync(&disk);
                synced = Some(state);
            }
            if (1..=3).contains(&fate) {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                disk.0.borrow_mut().crash(&mut rng, fate == 3);
                let (reloaded, loaded) = P::load(&disk);
                proptest::prop_assert_eq!(&loaded, &synced);
                file = reloaded;
            }
        }
        Ok(())
    }

    /// Cases drawn from a fixed seed: the same on every run.
    fn fixed() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0xd15c_57a7e),
            ..Default::default()
        }
    }

    proptest::proptest! {
        #![proptest_config(fixed())]

        #[test]
        fn a_state_file_loads_the_last_synced_state_after_any_crash(steps in steps()) {
            loads_the_last_synced_state::<lockstep::io::StateFile>(steps)?;
        }
    }

    #[test]
    fn a_state_written_in_place_fails_the_property_a_torn_write_breaks_it() {
        let config = proptest::test_runner::Config { failure_persistence: None, ..fixed() };
        let result =
            proptest::test_runner::TestRunner::new(config).run(&steps(), loads_the_last_synced_state::<InPlace>);
        let Err(proptest::test_runner::TestError::Fail(_, steps)) = result else {
            panic!("writing in place survived every crash: {result:?}")
        };
        assert!(steps.iter().any(|(_, fate, _)| *fate == 3), "only a torn write breaks it: {steps:?}");
    }

    #[test]
    fn a_state_file_not_told_of_its_syncs_fails_the_property_it_overwrites_the_synced_slot() {
        let config = proptest::test_runner::Config { failure_persistence: None, ..fixed() };
        let result = proptest::test_runner::TestRunner::new(config)
            .run(&steps(), loads_the_last_synced_state::<SyncedBehindItsBack>);
        let Err(proptest::test_runner::TestError::Fail(_, steps)) = result else {
            panic!("a state file not told of its syncs survived every crash: {result:?}")
        };
        assert!(steps.iter().any(|(_, fate, _)| *fate == 3), "only a torn write breaks it: {steps:?}");
    }
}
