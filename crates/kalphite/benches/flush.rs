//! Flush engine throughput: 10,000 changes scheduled on an engine writing to a no-op
//! target, beside a baseline that hands the same changes to the target directly in
//! batches of 100. The ratio is the engine's overhead (dedup map, batching, wake-ups).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kalphite::{
    AnyEntity, Change, Entity, FlushConfig, FlushEngine, FlushTarget, Origin, TargetError,
};
use serde_json::json;

const N: usize = 10_000;

struct Counting(AtomicUsize);

#[async_trait]
impl FlushTarget for Counting {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        self.0.fetch_add(batch.len(), Ordering::Relaxed);
        Ok(())
    }
}

fn changes() -> Vec<Change> {
    (0..N)
        .map(|i| {
            let e = Entity::new(
                format!("c{i}"),
                "comment",
                json!({"message": format!("Message {i}"), "lineNumber": i}),
            )
            .at(1_700_000_000_000);
            Change::upsert(
                AnyEntity::new(Arc::new(e)),
                1_700_000_000_000,
                Origin::Local,
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let input = changes();
    let mut group = c.benchmark_group("flush_10k");
    group.throughput(Throughput::Elements(N as u64));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));

    group.bench_function("baseline_direct_batches_of_100", |b| {
        let target = Counting(AtomicUsize::new(0));
        b.iter(|| {
            rt.block_on(async {
                for batch in input.chunks(100) {
                    target.write(batch).await.unwrap();
                }
            });
        });
    });

    group.bench_function("engine_schedule_and_flush_now", |b| {
        let target = Arc::new(Counting(AtomicUsize::new(0)));
        let engine = rt.block_on(async {
            FlushEngine::spawn(target.clone(), FlushConfig::default()).unwrap()
        });
        b.iter(|| {
            rt.block_on(async {
                for change in &input {
                    engine.schedule(change.clone());
                }
                engine.flush_now().await.unwrap();
            });
        });
        assert!(target.0.load(Ordering::Relaxed) >= N);
    });

    group.bench_function("engine_schedule_only", |b| {
        let target = Arc::new(Counting(AtomicUsize::new(0)));
        let engine =
            rt.block_on(async { FlushEngine::spawn(target, FlushConfig::default()).unwrap() });
        b.iter(|| {
            for change in &input {
                engine.schedule(change.clone());
            }
        });
        rt.block_on(engine.flush_now()).unwrap();
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
