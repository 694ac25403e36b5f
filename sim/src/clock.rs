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
