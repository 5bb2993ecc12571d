//! jemalloc's own account of the heap, read at each scrape: what the program holds, what the
//! allocator keeps around it, and what of that is resident. The `liverec` binary allocates
//! through jemalloc (`src/main.rs`); a process that does not (the test binaries) reads the few
//! bytes jemalloc holds for itself.
//!
//! Together with the process's resident size they tell apart the ways memory can stay after a
//! wave of users: a live heap that grew (`allocated`), freed memory on pages still in use
//! (`active` - `allocated`: fragmentation), pages freed but not yet handed back (`resident` -
//! `active` - `metadata`: dirty pages waiting for decay) and the allocator's bookkeeping
//! (`metadata`, which jemalloc never returns).

use tikv_jemalloc_ctl::{epoch, stats};

/// One reading of jemalloc's statistics, in bytes (see the `stats.*` entries of jemalloc's
/// manual).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes allocated by the program and not yet freed.
    pub allocated: u64,
    /// Bytes in the pages that hold allocations (`allocated` plus the free space in them).
    pub active: u64,
    /// Bytes of jemalloc's own bookkeeping (extent descriptors, radix tree, thread caches' bins).
    pub metadata: u64,
    /// Bytes of jemalloc's physically resident pages: active, metadata, and freed pages not yet
    /// purged.
    pub resident: u64,
    /// Bytes in the extents jemalloc has mapped and in use (active and dirty).
    pub mapped: u64,
    /// Bytes of virtual memory kept mapped but purged (not resident): reused before new mappings.
    pub retained: u64,
}

/// jemalloc's figures now, or `None` if it cannot report them. Statistics are cached per epoch:
/// advancing the epoch refreshes them (it merges the arenas' counters, microseconds).
pub fn read() -> Option<AllocatorStats> {
    epoch::advance().ok()?;
    Some(AllocatorStats {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        metadata: stats::metadata::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        mapped: stats::mapped::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_reports_a_consistent_heap() {
        let stats = read().expect("jemalloc is built with statistics");
        // Every active page holds allocations, every resident byte is mapped or bookkeeping.
        assert!(stats.allocated <= stats.active, "{stats:?}");
        assert!(stats.active <= stats.resident, "{stats:?}");
        assert!(stats.metadata > 0, "{stats:?}");
        assert!(stats.mapped >= stats.active, "{stats:?}");
    }

    #[test]
    fn an_allocation_through_jemalloc_shows_in_allocated() {
        let before = read().expect("statistics").allocated;
        let layout = std::alloc::Layout::from_size_align(8 << 20, 8).expect("a valid layout");
        // SAFETY: an allocation through jemalloc's Rust allocator (the test binary's global
        // allocator is the system's), freed below with the same layout.
        let allocator = tikv_jemallocator::Jemalloc;
        let block = unsafe { std::alloc::GlobalAlloc::alloc(&allocator, layout) };
        assert!(!block.is_null());
        let during = read().expect("statistics").allocated;
        // SAFETY: `block` came from `allocator.alloc(layout)` just above.
        unsafe { std::alloc::GlobalAlloc::dealloc(&allocator, block, layout) };
        let after = read().expect("statistics").allocated;
        // Other tests of this binary may free jemalloc memory meanwhile, so the block shows as
        // at least its size while held, not as an exact step over `before`.
        assert!(during >= 8 << 20 && during > before, "{before} -> {during}");
        assert!(after < during, "{during} -> {after}");
    }
}
