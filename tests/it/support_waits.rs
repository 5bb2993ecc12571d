//! The test support's own waits: a stall detector fails on no progress, never on the clock.
//! (Here and not in `support/`: `tests/heap_per_user.rs` includes `support/`, and a test running
//! beside its measurement, a panic's backtrace above all, would count in its heap.)

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::support::*;

/// The old deadline demanded an amount within a time; this one only a sign of life.
#[actix_rt::test]
async fn a_wait_that_keeps_moving_outlasts_its_stall_bound() {
    let stall = Duration::from_secs(1);
    let started = Instant::now();
    let count = Cell::new(0u64);
    let checks = wait_for_progress("a slow counter", stall, || {
        count.set(count.get() + 1);
        let value = count.get();
        async move {
            if started.elapsed() > 4 * stall {
                Progress::Done(value)
            } else {
                Progress::Pending(value)
            }
        }
    })
    .await;
    assert!(checks > 1);
}

#[actix_rt::test]
#[should_panic(expected = "stalled waiting for a stuck counter")]
async fn a_wait_that_stops_moving_fails() {
    wait_for_progress("a stuck counter", Duration::from_millis(100), || async { Progress::<(), u64>::Pending(7) })
        .await;
}
