//! Layer 1 benchmarks on workload W (`BENCH-WORKLOADS.md`, `BEHAVIORS.md` §7): bulk load,
//! single upserts, writes with a listener, filters, ordering, lookups and memory per
//! entity — each beside a bare-map baseline doing the same work, in the same run.
//!
//! Run with `cargo bench -p kalphite --bench store`. Criterion reports each benchmark; at
//! the end a summary re-times every kalphite/baseline pair interleaved (best of several
//! runs) and prints the ratios against the targets. Memory is measured in a child process
//! (this binary re-run with `KALPHITE_MEM_PROBE`) as the RSS growth from `/proc/self/statm`.

use std::collections::HashMap;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group};
use indexmap::IndexMap;
use kalphite::{Collection, Entity, EntityKind, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The typed form of workload W's entity.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Comment {
    message: String,
    line_number: u64,
}

impl EntityKind for Comment {
    const KIND: &'static str = "comment";
}

const UPDATED_AT: u64 = 1_700_000_000_000;

type BareTyped = IndexMap<String, Arc<Comment>>;
type BareDyn = HashMap<String, Arc<Entity<Value>>>;

fn typed(i: u64) -> Entity<Comment> {
    Entity::of(
        format!("c{i}"),
        Comment {
            message: format!("Message {i}"),
            line_number: i,
        },
    )
    .at(UPDATED_AT)
}

fn dynamic(i: u64) -> Entity<Value> {
    Entity::new(
        format!("c{i}"),
        "comment",
        json!({"message": format!("Message {i}"), "lineNumber": i}),
    )
    .at(UPDATED_AT)
}

fn typed_input(n: u64) -> Vec<Entity<Comment>> {
    (0..n).map(typed).collect()
}

fn bare_input(n: u64) -> Vec<(String, Comment)> {
    (0..n).map(|i| (format!("c{i}"), typed(i).data)).collect()
}

fn dyn_input(n: u64) -> Vec<Entity<Value>> {
    (0..n).map(dynamic).collect()
}

fn updated(e: &Entity<Comment>, i: u64) -> Entity<Comment> {
    let mut e = e.clone();
    e.data.message = format!("Updated {i}");
    e.updated_at += 1;
    e
}

fn lookup_ids() -> Vec<String> {
    (0..10_000u64)
        .map(|i| format!("c{}", (i * 7919) % 100_000))
        .collect()
}

// ---- the operations, shared by criterion and the summary ----

fn store_typed() -> (Store, Collection<Comment>) {
    let store = Store::new();
    let col = store.collection::<Comment>().unwrap();
    (store, col)
}

fn bulk_typed(input: Vec<Entity<Comment>>) -> Store {
    let (store, col) = store_typed();
    col.bulk_upsert(input).unwrap();
    store
}

fn bulk_bare(input: Vec<(String, Comment)>) -> BareTyped {
    let mut map = IndexMap::new();
    for (id, c) in input {
        map.insert(id, Arc::new(c));
    }
    map
}

fn bulk_dyn(input: Vec<Entity<Value>>) -> Store {
    let store = Store::new();
    store.load_entities(input).unwrap();
    store
}

fn bulk_bare_dyn(input: Vec<Entity<Value>>) -> BareDyn {
    let mut map = HashMap::new();
    for e in input {
        map.insert(e.id.to_string(), Arc::new(e));
    }
    map
}

fn singles_typed((store, col, input): (Store, Collection<Comment>, Vec<Entity<Comment>>)) -> Store {
    for e in input {
        black_box(col.upsert(e).unwrap());
    }
    store
}

fn singles_bare((mut map, input): (BareTyped, Vec<(String, Comment)>)) -> BareTyped {
    for (id, c) in input {
        black_box(map.insert(id, Arc::new(c)));
    }
    map
}

fn singles_dyn((store, input): (Store, Vec<Entity<Value>>)) -> Store {
    let col = store.dynamic("comment");
    for e in input {
        black_box(col.upsert(e).unwrap());
    }
    store
}

fn singles_bare_dyn((mut map, input): (BareDyn, Vec<Entity<Value>>)) -> BareDyn {
    for e in input {
        black_box(map.insert(e.id.to_string(), Arc::new(e)));
    }
    map
}

fn overwrite_setup_typed() -> (Store, Collection<Comment>, Vec<Entity<Comment>>) {
    let input = typed_input(10_000);
    let replacements = input.iter().zip(0..).map(|(e, i)| updated(e, i)).collect();
    let (store, col) = store_typed();
    col.bulk_upsert(input).unwrap();
    (store, col, replacements)
}

fn overwrite_setup_bare() -> (BareTyped, Vec<(String, Comment)>) {
    let map = bulk_bare(bare_input(10_000));
    let replacements = (0..10_000u64)
        .map(|i| {
            let mut c = typed(i).data;
            c.message = format!("Updated {i}");
            (format!("c{i}"), c)
        })
        .collect();
    (map, replacements)
}

/// A store with one subscriber counting notifications, and 10k new entities to write.
type ListenerSetup = (
    Store,
    Collection<Comment>,
    Vec<Entity<Comment>>,
    Arc<AtomicUsize>,
    kalphite::Subscription,
);

fn listener_setup() -> ListenerSetup {
    let (store, col) = store_typed();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let sub = store.subscribe(move |_| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    (store, col, typed_input(10_000), count, sub)
}

fn listener_typed(
    (store, col, input, count, sub): ListenerSetup,
) -> (Store, kalphite::Subscription) {
    for e in input {
        black_box(col.upsert(e).unwrap());
    }
    assert_eq!(count.load(Ordering::Relaxed), 10_000);
    (store, sub)
}

fn listener_bare((mut map, input): (BareTyped, Vec<(String, Comment)>)) -> BareTyped {
    let count = AtomicUsize::new(0);
    let listener: &dyn Fn() = &|| {
        count.fetch_add(1, Ordering::Relaxed);
    };
    for (id, c) in input {
        black_box(map.insert(id, Arc::new(c)));
        listener();
    }
    assert_eq!(count.load(Ordering::Relaxed), 10_000);
    map
}

fn div10(n: u64) -> bool {
    n.is_multiple_of(10)
}

fn has99(s: &str) -> bool {
    s.contains("99")
}

// ---- criterion ----

fn configure<M: criterion::measurement::Measurement>(g: &mut criterion::BenchmarkGroup<'_, M>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
}

fn bench_bulk(c: &mut Criterion) {
    for n in [10_000u64, 100_000] {
        let mut g = c.benchmark_group(format!("bulk_load/{n}"));
        configure(&mut g);
        g.sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(n));
        let ti = typed_input(n);
        let bi = bare_input(n);
        let di = dyn_input(n);
        g.bench_function("kalphite_typed", |b| {
            b.iter_batched(|| ti.clone(), bulk_typed, BatchSize::LargeInput);
        });
        g.bench_function("bare_indexmap", |b| {
            b.iter_batched(|| bi.clone(), bulk_bare, BatchSize::LargeInput);
        });
        g.bench_function("kalphite_dynamic", |b| {
            b.iter_batched(|| di.clone(), bulk_dyn, BatchSize::LargeInput);
        });
        g.bench_function("bare_hashmap_value", |b| {
            b.iter_batched(|| di.clone(), bulk_bare_dyn, BatchSize::LargeInput);
        });
        g.finish();
    }
}

fn bench_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("writes_10k");
    configure(&mut g);
    g.sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(10_000));
    let ti = typed_input(10_000);
    let bi = bare_input(10_000);
    let di = dyn_input(10_000);
    g.bench_function("upsert_new/kalphite_typed", |b| {
        b.iter_batched(
            || {
                let (s, col) = store_typed();
                (s, col, ti.clone())
            },
            singles_typed,
            BatchSize::LargeInput,
        );
    });
    g.bench_function("upsert_new/bare_indexmap", |b| {
        b.iter_batched(
            || (IndexMap::new(), bi.clone()),
            singles_bare,
            BatchSize::LargeInput,
        );
    });
    g.bench_function("upsert_new/kalphite_dynamic", |b| {
        b.iter_batched(
            || (Store::new(), di.clone()),
            singles_dyn,
            BatchSize::LargeInput,
        );
    });
    g.bench_function("upsert_new/bare_hashmap_value", |b| {
        b.iter_batched(
            || (HashMap::new(), di.clone()),
            singles_bare_dyn,
            BatchSize::LargeInput,
        );
    });
    g.bench_function("overwrite/kalphite_typed", |b| {
        b.iter_batched(overwrite_setup_typed, singles_typed, BatchSize::LargeInput);
    });
    g.bench_function("overwrite/bare_indexmap", |b| {
        b.iter_batched(overwrite_setup_bare, singles_bare, BatchSize::LargeInput);
    });
    g.bench_function("with_listener/kalphite_typed", |b| {
        b.iter_batched(listener_setup, listener_typed, BatchSize::LargeInput);
    });
    g.bench_function("with_listener/bare_indexmap", |b| {
        b.iter_batched(
            || (IndexMap::new(), bi.clone()),
            listener_bare,
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

fn bench_reads(c: &mut Criterion) {
    let store = bulk_typed(typed_input(100_000));
    let col = store.collection::<Comment>().unwrap();
    let bare = bulk_bare(bare_input(100_000));
    let dstore = bulk_dyn(dyn_input(100_000));
    let dcol = dstore.dynamic("comment");
    let dbare = bulk_bare_dyn(dyn_input(100_000));
    let ids = lookup_ids();

    let mut g = c.benchmark_group("read_100k");
    configure(&mut g);
    g.bench_function("filter_mod10/kalphite_typed", |b| {
        b.iter(|| col.filter(|e| div10(e.data.line_number)));
    });
    g.bench_function("filter_mod10/bare_indexmap", |b| {
        b.iter(|| {
            bare.values()
                .filter(|c| div10(c.line_number))
                .cloned()
                .collect::<Vec<_>>()
        });
    });
    g.bench_function("filter_99/kalphite_typed", |b| {
        b.iter(|| col.filter(|e| has99(&e.data.message)));
    });
    g.bench_function("filter_99/bare_indexmap", |b| {
        b.iter(|| {
            bare.values()
                .filter(|c| has99(&c.message))
                .cloned()
                .collect::<Vec<_>>()
        });
    });
    g.bench_function("filter_mod10/kalphite_dynamic", |b| {
        b.iter(|| dcol.filter(|e| e.data["lineNumber"].as_u64().is_some_and(div10)));
    });
    g.bench_function("filter_mod10/bare_hashmap_value", |b| {
        b.iter(|| {
            dbare
                .values()
                .filter(|e| e.data["lineNumber"].as_u64().is_some_and(div10))
                .cloned()
                .collect::<Vec<_>>()
        });
    });
    g.bench_function("order_by_desc/kalphite_typed", |b| {
        b.iter(|| col.order_by(|e| std::cmp::Reverse(e.data.line_number)));
    });
    g.bench_function("order_by_desc/bare_indexmap", |b| {
        b.iter(|| {
            let mut v: Vec<_> = bare.values().cloned().collect();
            v.sort_by_key(|c| std::cmp::Reverse(c.line_number));
            v
        });
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("lookup_10k/kalphite_typed", |b| {
        b.iter(|| ids.iter().filter_map(|id| col.find_by_id(id)).count());
    });
    g.bench_function("lookup_10k/bare_indexmap", |b| {
        b.iter(|| {
            ids.iter()
                .filter_map(|id| bare.get(id.as_str()).cloned())
                .count()
        });
    });
    g.bench_function("lookup_10k/kalphite_dynamic", |b| {
        b.iter(|| ids.iter().filter_map(|id| dcol.find_by_id(id)).count());
    });
    g.bench_function("lookup_10k/bare_hashmap_value", |b| {
        b.iter(|| {
            ids.iter()
                .filter_map(|id| dbare.get(id.as_str()).cloned())
                .count()
        });
    });
    g.finish();
}

criterion_group!(benches, bench_bulk, bench_writes, bench_reads);

// ---- the summary: interleaved pairs, medians, ratios ----

/// Times `routine` on a fresh `setup()`, excluding setup and dropping the output.
fn time_once<S, O>(setup: &impl Fn() -> S, routine: &impl Fn(S) -> O) -> Duration {
    let input = setup();
    let start = Instant::now();
    let out = routine(input);
    let elapsed = start.elapsed();
    drop(black_box(out));
    elapsed
}

/// The fastest run: on a shared 2-core machine other processes only ever add time, so the
/// minimum is the least noisy estimate of what the code itself costs.
fn best(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

struct Row {
    name: String,
    ours: Duration,
    base: Duration,
    target: f64,
}

#[allow(clippy::too_many_arguments)]
fn pair<SA, OA, SB, OB>(
    rows: &mut Vec<Row>,
    name: &str,
    runs: usize,
    target: f64,
    setup_a: impl Fn() -> SA,
    run_a: impl Fn(SA) -> OA,
    setup_b: impl Fn() -> SB,
    run_b: impl Fn(SB) -> OB,
) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // One warm-up of each, then interleaved runs.
    time_once(&setup_a, &run_a);
    time_once(&setup_b, &run_b);
    for _ in 0..runs {
        a.push(time_once(&setup_a, &run_a));
        b.push(time_once(&setup_b, &run_b));
    }
    let row = Row {
        name: name.to_string(),
        ours: best(a),
        base: best(b),
        target,
    };
    print_row(&row);
    rows.push(row);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_row(r: &Row) {
    let ratio = r.ours.as_secs_f64() / r.base.as_secs_f64();
    println!(
        "| {} | {:.2} ms | {:.2} ms | {:.2}x | <= {}x | {} |",
        r.name,
        ms(r.ours),
        ms(r.base),
        ratio,
        r.target,
        if ratio <= r.target { "met" } else { "MISSED" }
    );
}

fn summary() {
    println!("\n## Summary: kalphite vs baseline (best of interleaved runs)\n");
    println!("| operation | kalphite | baseline | ratio | target | |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    for (n, runs) in [(10_000u64, 31), (100_000, 9), (1_000_000, 3)] {
        let (ti, bi) = (typed_input(n), bare_input(n));
        pair(
            &mut rows,
            &format!("bulk load {n}, typed vs IndexMap"),
            runs,
            3.0,
            || ti.clone(),
            bulk_typed,
            || bi.clone(),
            bulk_bare,
        );
        drop((ti, bi));
        if n <= 100_000 {
            let di = dyn_input(n);
            pair(
                &mut rows,
                &format!("load_entities {n}, dynamic vs HashMap<Value>"),
                runs,
                2.0,
                || di.clone(),
                bulk_dyn,
                || di.clone(),
                bulk_bare_dyn,
            );
        }
    }
    let (ti, bi, di) = (typed_input(10_000), bare_input(10_000), dyn_input(10_000));
    pair(
        &mut rows,
        "10k upserts, new ids, typed",
        31,
        3.0,
        || {
            let (s, c) = store_typed();
            (s, c, ti.clone())
        },
        singles_typed,
        || (IndexMap::new(), bi.clone()),
        singles_bare,
    );
    pair(
        &mut rows,
        "10k upserts, new ids, dynamic",
        31,
        3.0,
        || (Store::new(), di.clone()),
        singles_dyn,
        || (HashMap::new(), di.clone()),
        singles_bare_dyn,
    );
    pair(
        &mut rows,
        "10k overwrites, typed",
        31,
        3.0,
        overwrite_setup_typed,
        singles_typed,
        overwrite_setup_bare,
        singles_bare,
    );
    pair(
        &mut rows,
        "10k writes + 1 counting subscriber, typed",
        31,
        3.0,
        listener_setup,
        listener_typed,
        || (IndexMap::new(), bi.clone()),
        listener_bare,
    );

    let store = bulk_typed(typed_input(100_000));
    let col = store.collection::<Comment>().unwrap();
    let bare = bulk_bare(bare_input(100_000));
    let dstore = bulk_dyn(dyn_input(100_000));
    let dcol = dstore.dynamic("comment");
    let dbare = bulk_bare_dyn(dyn_input(100_000));
    let ids = lookup_ids();
    let unit = || ();
    let hits = col.filter(|e| div10(e.data.line_number)).len();
    let hits99 = col.filter(|e| has99(&e.data.message)).len();
    assert_eq!((hits, hits99), (10_000, 3_691), "workload W's hit counts");
    pair(
        &mut rows,
        "filter 100k lineNumber%10==0, typed",
        21,
        2.0,
        unit,
        |()| col.filter(|e| div10(e.data.line_number)),
        unit,
        |()| {
            bare.values()
                .filter(|c| div10(c.line_number))
                .cloned()
                .collect::<Vec<_>>()
        },
    );
    pair(
        &mut rows,
        "filter 100k message contains \"99\", typed",
        21,
        2.0,
        unit,
        |()| col.filter(|e| has99(&e.data.message)),
        unit,
        |()| {
            bare.values()
                .filter(|c| has99(&c.message))
                .cloned()
                .collect::<Vec<_>>()
        },
    );
    pair(
        &mut rows,
        "filter 100k lineNumber%10==0, dynamic",
        21,
        2.0,
        unit,
        |()| dcol.filter(|e| e.data["lineNumber"].as_u64().is_some_and(div10)),
        unit,
        |()| {
            dbare
                .values()
                .filter(|e| e.data["lineNumber"].as_u64().is_some_and(div10))
                .cloned()
                .collect::<Vec<_>>()
        },
    );
    pair(
        &mut rows,
        "order_by lineNumber desc 100k, typed",
        11,
        2.0,
        unit,
        |()| col.order_by(|e| std::cmp::Reverse(e.data.line_number)),
        unit,
        |()| {
            let mut v: Vec<_> = bare.values().cloned().collect();
            v.sort_by_key(|c| std::cmp::Reverse(c.line_number));
            v
        },
    );
    pair(
        &mut rows,
        "lookup 10k ids on 100k, typed",
        21,
        2.0,
        unit,
        |()| ids.iter().filter_map(|id| col.find_by_id(id)).count(),
        unit,
        |()| {
            ids.iter()
                .filter_map(|id| bare.get(id.as_str()).cloned())
                .count()
        },
    );
    pair(
        &mut rows,
        "lookup 10k ids on 100k, dynamic",
        21,
        2.0,
        unit,
        |()| ids.iter().filter_map(|id| dcol.find_by_id(id)).count(),
        unit,
        |()| {
            ids.iter()
                .filter_map(|id| dbare.get(id.as_str()).cloned())
                .count()
        },
    );
    drop((store, col, bare, dstore, dcol, dbare));
    memory_summary();
    let missed = rows
        .iter()
        .filter(|r| r.ours.as_secs_f64() / r.base.as_secs_f64() > r.target)
        .count();
    println!(
        "\n{} of {} timing targets met",
        rows.len() - missed,
        rows.len()
    );
}

// ---- memory: RSS growth in a fresh child process ----

const MEM_N: u64 = 100_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Builds one structure entity by entity (no input vector held) and prints its RSS growth.
fn memory_probe(which: &str) {
    let before = rss_bytes();
    let keep: Box<dyn std::any::Any> = match which {
        "kalphite_typed" => {
            let (store, col) = store_typed();
            for i in 0..MEM_N {
                col.upsert(typed(i)).unwrap();
            }
            Box::new(store)
        }
        "bare_indexmap" => {
            let mut map: BareTyped = IndexMap::new();
            for i in 0..MEM_N {
                let e = typed(i);
                map.insert(e.id.to_string(), Arc::new(e.data));
            }
            Box::new(map)
        }
        "kalphite_dynamic" => {
            let store = Store::new();
            let col = store.dynamic("comment");
            for i in 0..MEM_N {
                col.upsert(dynamic(i)).unwrap();
            }
            Box::new(store)
        }
        "bare_hashmap_value" => {
            let mut map: BareDyn = HashMap::new();
            for i in 0..MEM_N {
                let e = dynamic(i);
                map.insert(e.id.to_string(), Arc::new(e));
            }
            Box::new(map)
        }
        other => panic!("unknown memory probe {other}"),
    };
    let after = rss_bytes();
    black_box(&keep);
    println!("{}", after.saturating_sub(before) / MEM_N);
}

fn probe_in_child(which: &str) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe)
        .env("KALPHITE_MEM_PROBE", which)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn memory_summary() {
    println!(
        "\n| memory per entity, 100k entities (RSS growth) | kalphite | baseline | ratio | target | |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    for (name, ours, base) in [
        (
            "typed vs IndexMap<String, Arc<Comment>>",
            "kalphite_typed",
            "bare_indexmap",
        ),
        (
            "dynamic vs HashMap<String, Arc<Entity<Value>>>",
            "kalphite_dynamic",
            "bare_hashmap_value",
        ),
    ] {
        let (Some(a), Some(b)) = (probe_in_child(ours), probe_in_child(base)) else {
            println!("| {name} | probe failed | | | | |");
            continue;
        };
        #[allow(clippy::cast_precision_loss)]
        let ratio = a as f64 / b.max(1) as f64;
        println!(
            "| {name} | {a} B | {b} B | {ratio:.2}x | <= 2x | {} |",
            if ratio <= 2.0 { "met" } else { "MISSED" }
        );
    }
}

fn main() {
    if let Ok(which) = std::env::var("KALPHITE_MEM_PROBE") {
        memory_probe(&which);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo test --benches` runs this binary in test mode: skip the long summary there.
    if !std::env::args().any(|a| a == "--test" || a == "--list") {
        summary();
    }
}
