//! Housekeeping on the I/O thread: bounded stores sweep, the event log expires its window, and
//! freed heap goes back to the OS.

use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;

use crate::actors::registry::SessionRegistry;
use crate::config::Config;
use crate::eventlog::EventLog;
use crate::store::ProfileStore;
use crate::telemetry::Metrics;

/// Step 3b, housekeeping on the I/O thread: the store sweeps what outlived its bounds (idle
/// profiles, expired tombstones) and the event log forgets what left its window, then, if
/// sessions or profiles were dropped since the last round, the session registry's hub map gives
/// back its spare capacity and freed heap goes back to the OS. glibc keeps freed memory in its arenas (and
/// `models::keep_freed_memory` raises the trim threshold), so without the trim the resident size
/// stays at its peak after every session and profile of a wave of users is gone.
pub(super) fn start_housekeeping(
    config: &Config,
    store: Arc<dyn ProfileStore>,
    event_log: Arc<EventLog>,
    registry: Arc<SessionRegistry>,
    metrics: Arc<Metrics>,
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
            let _ = tokio::task::spawn_blocking(move || {
                store.sweep();
                // The log drops what left its window as events arrive; this drops it when
                // none arrive (a burst followed by quiet).
                let expired = event_log.expire(crate::event::now_ms());
                if trim || expired > 0 {
                    if trim {
                        registry.shrink();
                    }
                    release_free_heap();
                }
            })
            .await;
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
