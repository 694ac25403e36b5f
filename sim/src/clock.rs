//! The simulated clock of one seed's run, as the simulator's own code reads it.
//!
//! Every event, fault and message asks for the time, so it is read straight from madsim's clock: one lock, no
//! trip through the intercepted `clock_gettime` that `Instant::now` takes. It counts from the moment the run
//! began, like the hosts' `epoch`, so both give the same milliseconds.

use std::time::Duration;

use madsim::time::TimeHandle;
use tokio::time::Instant;

#[derive(Clone)]
pub struct SimClock {
    /// The moment the run began, for sleeping until a simulated time.
    pub epoch: Instant,
    time: TimeHandle,
    /// madsim's elapsed time at `epoch`.
    start: Duration,
}

impl SimClock {
    /// A clock that starts now. Must be called inside the run's madsim runtime.
    pub fn start() -> Self {
        let time = TimeHandle::current();
        Self { epoch: Instant::now(), start: time.elapsed(), time }
    }

    /// Simulated milliseconds since the run began.
    pub fn now_ms(&self) -> u64 {
        let elapsed = self.time.elapsed().saturating_sub(self.start);
        u64::try_from(elapsed.as_millis()).expect("simulated time fits in u64 ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulator's events and the hosts' machines must agree on the time: both count from the same moment.
    #[test]
    fn the_clock_reads_what_the_hosts_epoch_reads() {
        let runtime = madsim::runtime::Runtime::with_seed_and_config(7, madsim::Config::default());
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_millis(1_234)).await;
            let clock = SimClock::start();
            assert_eq!(clock.now_ms(), 0);
            for wait_ms in [1, 999, 1_000, 61_500] {
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                let hosts = u64::try_from(clock.epoch.elapsed().as_millis()).expect("fits");
                assert_eq!(clock.now_ms(), hosts, "after waiting {wait_ms} ms more");
            }
            assert!(clock.now_ms() >= 63_500);
        });
    }
}
