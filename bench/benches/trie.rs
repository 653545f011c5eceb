//! Topic trie benchmark: 1,000,000 filters, 10% of them with wildcards; time per match and
//! bytes per filter (heap measured with a counting allocator).
//!
//! Run: `cargo bench -p shardmq-bench --bench trie`.
//!
//! Filters look like `tenant/{t}/device/{d}/{metric}`, 1,000 tenants with 1,000 devices each;
//! one in ten puts `+` in the device level or ends in `#`. Topics are drawn from the same
//! shape, so a match finds the device's own filters and the wildcards above it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use shardmq_shards::trie::Trie;

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is only
// bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FILTERS: u32 = 1_000_000;
const METRICS: [&str; 4] = ["temperature", "humidity", "pressure", "battery"];

fn filter(index: u32) -> String {
    let tenant = index % 1000;
    let device = (index / 1000) % 1000;
    let metric = METRICS[(index / 250) as usize % METRICS.len()];
    match index % 10 {
        0 if index % 20 == 0 => format!("tenant/{tenant}/device/+/{metric}"),
        0 => format!("tenant/{tenant}/device/{device}/#"),
        _ => format!("tenant/{tenant}/device/{device}/{metric}"),
    }
}

fn topic(index: u32) -> String {
    let tenant = index % 1000;
    let device = (index / 7) % 1000;
    let metric = METRICS[index as usize % METRICS.len()];
    format!("tenant/{tenant}/device/{device}/{metric}")
}

fn trie(c: &mut Criterion) {
    let filters: Vec<String> = (0..FILTERS).map(filter).collect();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut trie = Trie::new();
    for (index, filter) in filters.iter().enumerate() {
        trie.insert(filter, index as u32);
    }
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    let wildcards = filters.iter().filter(|f| f.contains(['+', '#'])).count();
    println!(
        "trie: {} distinct filters ({} inserted, {:.1}% wildcards), {} nodes, {} bytes of heap, \
         {:.1} bytes per distinct filter",
        trie.filter_count(),
        filters.len(),
        100.0 * wildcards as f64 / filters.len() as f64,
        trie.node_count(),
        bytes,
        bytes as f64 / trie.filter_count() as f64
    );
    drop(filters);

    let topics: Vec<String> = (0..4096).map(topic).collect();
    let mut next = 0usize;
    let mut matched = 0usize;
    c.bench_function("trie_match_1M_filters", |b| {
        b.iter(|| {
            let topic = &topics[next % topics.len()];
            next += 1;
            trie.for_each_match(black_box(topic), |subscribers| matched += subscribers.len());
        })
    });
    black_box(matched);

    let mut index = FILTERS;
    c.bench_function("trie_insert_remove_1M_filters", |b| {
        b.iter(|| {
            let filter = filter(index);
            index += 1;
            trie.insert(&filter, index);
            trie.remove(&filter, |&value| value == index);
        })
    });
}

/// The admin API's route listing (`GET /api/v1/routes`): the first 100 filters of 1M, of all
/// and under one tenant's prefix. It sorts every edge of the trie, whatever the prefix.
fn listing(c: &mut Criterion) {
    let mut trie = Trie::new();
    for index in 0..FILTERS {
        trie.insert(&filter(index), index);
    }
    for (name, prefix) in [
        ("trie_list_100_of_1M_filters", ""),
        ("trie_list_100_of_1M_filters_by_prefix", "tenant/7/"),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut listed = 0usize;
                trie.for_each_filter(black_box(prefix), |_, _| {
                    listed += 1;
                    listed < 100
                });
                black_box(listed)
            })
        });
    }
}

criterion_group!(benches, trie, listing);
criterion_main!(benches);
