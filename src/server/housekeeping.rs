//! Housekeeping on the I/O thread: bounded stores sweep, the event log expires its window, and
//! freed heap goes back to the OS.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::ArbiterHandle;
use actix::Arbiter;
use parking_lot::Mutex;

use crate::actors::registry::SessionRegistry;
use crate::config::Config;
use crate::eventlog::EventLog;
use crate::store::ProfileStore;
use crate::telemetry::Metrics;

/// Step 3b, housekeeping on the I/O thread: the store sweeps what outlived its bounds (idle
/// profiles, expired tombstones) and the event log forgets what left its window, then, if
/// sessions or profiles were dropped since the last round, the session registry's hub map gives
/// back its spare capacity and freed heap goes back to the OS: the threads in `threads` empty
/// their allocator caches (jemalloc's background thread returns the emptied pages within
/// seconds), and glibc, which the C libraries still use, is trimmed.
pub(super) fn start_housekeeping(
    config: &Config,
    store: Arc<dyn ProfileStore>,
    event_log: Arc<EventLog>,
    registry: Arc<SessionRegistry>,
    metrics: Arc<Metrics>,
    threads: Threads,
    io: &Arbiter,
) {
    let ttl_ms = |secs: u64| (secs > 0).then(|| secs.saturating_mul(1000));
    let shortest = [
        Some(config.session.idle_ttl_ms),
        ttl_ms(config.store.memory_idle_ttl_secs),
        ttl_ms(config.privacy.tombstone_ttl_secs),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(60_000);
    let period = Duration::from_millis(shortest / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    io.spawn(async move {
        let mut ticks = actix_rt::time::interval(period);
        let mut freed_before = 0;
        loop {
            ticks.tick().await;
            let (store, event_log, registry) = (store.clone(), event_log.clone(), registry.clone());
            let freed = freed_memory(&metrics);
            let trim = std::mem::replace(&mut freed_before, freed) != freed;
            // Both walk large structures; off the I/O thread's event loop.
            let trim = tokio::task::spawn_blocking(move || {
                store.sweep();
                // The log drops what left its window as events arrive; this drops it when
                // none arrive (a burst followed by quiet).
                let expired = event_log.expire(crate::event::now_ms());
                let trim = trim || expired > 0;
                if trim {
                    registry.shrink();
                    release_free_heap();
                    release_thread_cache();
                }
                trim
            })
            .await;
            if trim.unwrap_or(false) {
                threads.release_caches();
            }
        }
    });
}

/// A count that moves whenever sessions or stored profiles were dropped.
fn freed_memory(metrics: &Metrics) -> u64 {
    metrics.sessions_evicted.get() + metrics.sessions_capped.get() + metrics.store_memory_evicted.get()
}

/// Returns the allocator's free pages to the OS (glibc `malloc_trim`; nothing elsewhere).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it takes the
    // arenas' locks like any allocation and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The long-lived threads that allocate per event (session, I/O, monitor and HTTP worker threads):
/// after a drop, housekeeping has each hand its allocator cache back. jemalloc keeps a cache of
/// freed blocks per thread and trims it only as that thread allocates again, so a thread that
/// freed a wave of sessions and went quiet held its share of them (after 50,000 users went idle,
/// 16 MB of anonymous memory against 10 MB with the caches off).
#[derive(Clone, Default)]
pub(super) struct Threads(Arc<Mutex<Vec<ArbiterHandle>>>);

impl Threads {
    pub(super) fn add(&self, thread: ArbiterHandle) {
        self.0.lock().push(thread);
    }

    fn release_caches(&self) {
        for thread in self.0.lock().iter() {
            thread.spawn(async { release_thread_cache() });
        }
    }
}

/// Returns this thread's jemalloc cache to the shared arenas (`thread.idle`), whose background
/// thread then gives the emptied pages back to the OS.
fn release_thread_cache() {
    // SAFETY: "thread.idle" reads and writes nothing (null old/new pointers); it flushes the calling
    // thread's cache, which only that thread uses.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.idle".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}
