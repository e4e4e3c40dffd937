//! Threads (issue #2 item 7): the store is `Clone + Send + Sync`; 4 writer threads and 4
//! reader threads run 10,000 operations each. Writers write pairs of entities (same value)
//! in one transaction, and delete pairs; readers must never see half a pair, and the final
//! state must be exactly what the writes imply.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use kalphite::{
    Change, ChangeSink, ChangeStream, Collection, DynCollection, EntityKind, Error, Store,
    Subscription,
};
use serde::{Deserialize, Serialize};

const WRITERS: usize = 4;
const READERS: usize = 4;
const OPS: usize = 10_000;
const PAIRS_PER_WRITER: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Half {
    value: usize,
}

impl EntityKind for Half {
    const KIND: &'static str = "half";
}

fn id(writer: usize, pair: usize, side: char) -> String {
    format!("w{writer}-p{pair}-{side}")
}

fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
fn assert_send<T: Send + 'static>() {}

#[test]
fn store_and_handles_are_clone_send_sync() {
    assert_shareable::<Store>();
    assert_shareable::<Collection<Half>>();
    assert_shareable::<DynCollection>();
    assert_send::<Subscription>();
    assert_send::<ChangeStream>();
    assert_send::<Error>();
}

/// Checks, inside the sink, that every committed batch is one whole pair.
#[derive(Default)]
struct PairSink {
    batches: AtomicUsize,
    broken: AtomicUsize,
}

impl ChangeSink for PairSink {
    fn accept(&self, changes: &[Change]) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        let whole = changes.len() == 2
            && changes[0].op == changes[1].op
            && changes[0].id.trim_end_matches('a') == changes[1].id.trim_end_matches('b');
        if !whole {
            self.broken.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn four_writers_and_four_readers_never_see_half_a_pair_and_end_exact() {
    let sink = Arc::new(PairSink::default());
    let store = Store::builder().sink(sink.clone()).build();
    let halves = store.collection::<Half>().unwrap();
    let notifications = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&notifications);
    let _sub = store.subscribe(move |_| {
        n.fetch_add(1, Ordering::Relaxed);
    });
    let start = Arc::new(Barrier::new(WRITERS + READERS));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, start) = (store.clone(), Arc::clone(&start));
            thread::spawn(move || {
                // pair -> value, for this writer's disjoint id range
                let mut model: BTreeMap<usize, usize> = BTreeMap::new();
                let mut commits = 0;
                start.wait();
                for op in 0..OPS {
                    let pair = (op * 7 + w) % PAIRS_PER_WRITER;
                    if op % 5 == 4 {
                        let existed = store
                            .transaction::<_, Error>(|tx| {
                                let a = tx.delete::<Half>(&id(w, pair, 'a'));
                                let b = tx.delete::<Half>(&id(w, pair, 'b'));
                                assert_eq!(a, b);
                                Ok(a)
                            })
                            .unwrap();
                        assert_eq!(existed, model.remove(&pair).is_some());
                        commits += usize::from(existed);
                    } else {
                        store
                            .transaction::<_, Error>(|tx| {
                                tx.put(id(w, pair, 'a'), Half { value: op })?;
                                tx.put(id(w, pair, 'b'), Half { value: op })?;
                                Ok(())
                            })
                            .unwrap();
                        model.insert(pair, op);
                        commits += 1;
                    }
                }
                (model, commits)
            })
        })
        .collect();

    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (store, start) = (store.clone(), Arc::clone(&start));
            thread::spawn(move || {
                let mut seen_whole = 0usize;
                start.wait();
                for op in 0..OPS {
                    let w = (op + r) % WRITERS;
                    let pair = (op * 13 + r) % PAIRS_PER_WRITER;
                    store.read(|view| {
                        let a = view.get::<Half>(&id(w, pair, 'a'));
                        let b = view.get::<Half>(&id(w, pair, 'b'));
                        match (&a, &b) {
                            (None, None) => {}
                            (Some(a), Some(b)) => {
                                assert_eq!(a.data, b.data, "a pair with two values");
                                seen_whole += 1;
                            }
                            _ => panic!("half-applied pair {w}/{pair}: {a:?} / {b:?}"),
                        }
                        if op.is_multiple_of(500) {
                            let all = view.all::<Half>();
                            assert_eq!(all.len() % 2, 0, "an odd number of halves");
                            assert_eq!(view.len("half"), all.len());
                        }
                    });
                }
                seen_whole
            })
        })
        .collect();

    let mut expected_commits = 0;
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for (w, handle) in writers.into_iter().enumerate() {
        let (model, commits) = handle.join().unwrap();
        expected_commits += commits;
        for (pair, value) in model {
            expected.insert(id(w, pair, 'a'), value);
            expected.insert(id(w, pair, 'b'), value);
        }
    }
    let seen: usize = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(seen > 0, "the readers observed whole pairs");

    let actual: BTreeMap<String, usize> = halves
        .iter()
        .map(|e| (e.id.to_string(), e.data.value))
        .collect();
    assert_eq!(actual, expected);
    assert_eq!(store.len(), expected.len());
    assert_eq!(sink.batches.load(Ordering::Relaxed), expected_commits);
    assert_eq!(sink.broken.load(Ordering::Relaxed), 0);
    assert_eq!(notifications.load(Ordering::Relaxed), expected_commits);
    let deletes = (0..WRITERS * OPS).filter(|op| op % 5 == 4).count();
    assert!(
        expected_commits > WRITERS * OPS - deletes,
        "some deletes removed pairs"
    );
}
