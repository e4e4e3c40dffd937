//! Shadow model: random sequences of upserts, deletes, clears and transactions (that
//! commit, fail with an error, or panic) run against the store and against a plain
//! ordered model side by side; contents, order and notification counts must agree.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kalphite::{EntityKind, Error, Store, Tx};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Item {
    v: u32,
}

impl EntityKind for Item {
    const KIND: &'static str = "item";
}

/// "item" is a typed kind, "note" a JSON one.
const KINDS: [&str; 2] = ["item", "note"];

#[derive(Clone, Debug)]
enum Write {
    Upsert { kind: usize, id: u8, v: u32 },
    Delete { kind: usize, id: u8 },
    Clear,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Commit,
    Fail,
    Panic,
}

#[derive(Clone, Debug)]
enum Step {
    Single(Write),
    ClearKind(usize),
    Tx(Vec<Write>, Outcome),
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        4 => (0..2usize, 0..12u8, any::<u32>()).prop_map(|(kind, id, v)| Write::Upsert { kind, id, v }),
        2 => (0..2usize, 0..12u8).prop_map(|(kind, id)| Write::Delete { kind, id }),
        1 => Just(Write::Clear),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let outcome = prop_oneof![
        3 => Just(Outcome::Commit),
        2 => Just(Outcome::Fail),
        1 => Just(Outcome::Panic),
    ];
    prop_oneof![
        6 => write().prop_map(Step::Single),
        1 => (0..2usize).prop_map(Step::ClearKind),
        3 => (prop::collection::vec(write(), 0..8), outcome).prop_map(|(w, o)| Step::Tx(w, o)),
    ]
}

/// Each kind's rows in collection order.
#[derive(Clone, Default, Debug, PartialEq)]
struct Model([Vec<(String, u32)>; 2]);

impl Model {
    /// Applies a write; returns whether it changed anything.
    fn apply(&mut self, w: &Write) -> bool {
        match w {
            Write::Upsert { kind, id, v } => {
                let rows = &mut self.0[*kind];
                let id = format!("e{id}");
                match rows.iter_mut().find(|(k, _)| *k == id) {
                    Some(row) => row.1 = *v,
                    None => rows.push((id, *v)),
                }
                true
            }
            Write::Delete { kind, id } => {
                let rows = &mut self.0[*kind];
                let id = format!("e{id}");
                let before = rows.len();
                rows.retain(|(k, _)| *k != id);
                rows.len() != before
            }
            Write::Clear => {
                let changed = self.0.iter().any(|r| !r.is_empty());
                self.0.iter_mut().for_each(Vec::clear);
                changed
            }
        }
    }
}

fn apply_tx(tx: &mut Tx<'_>, w: &Write) -> Result<(), Error> {
    match w {
        Write::Upsert { kind: 0, id, v } => tx.put(format!("e{id}"), Item { v: *v }).map(drop),
        Write::Upsert { id, v, .. } => tx
            .upsert_json(kalphite::Entity::new(
                format!("e{id}"),
                "note",
                json!({"v": v}),
            ))
            .map(drop),
        Write::Delete { kind: 0, id } => {
            tx.delete::<Item>(&format!("e{id}"));
            Ok(())
        }
        Write::Delete { id, .. } => {
            tx.delete_json("note", &format!("e{id}"));
            Ok(())
        }
        Write::Clear => {
            tx.clear();
            Ok(())
        }
    }
}

fn observe(store: &Store) -> Model {
    let items = store.collection::<Item>().unwrap();
    let notes = store.dynamic("note");
    Model([
        items.iter().map(|e| (e.id.to_string(), e.data.v)).collect(),
        notes
            .iter()
            .map(|e| {
                let v = u32::try_from(e.data["v"].as_u64().unwrap()).unwrap();
                (e.id.to_string(), v)
            })
            .collect(),
    ])
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let store = Store::new();
    let items = store.collection::<Item>().unwrap();
    let notes = store.dynamic("note");
    let notified = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&notified);
    let _sub = store.subscribe(move |_| {
        n.fetch_add(1, Ordering::SeqCst);
    });
    let mut model = Model::default();
    let mut expected_notifications = 0;

    for step in steps {
        match step {
            Step::Single(w) => {
                let changed = model.apply(w);
                match w {
                    Write::Upsert { kind: 0, id, v } => {
                        items.put(format!("e{id}"), Item { v: *v }).unwrap();
                    }
                    Write::Upsert { id, v, .. } => {
                        notes.put(format!("e{id}"), json!({"v": v})).unwrap();
                    }
                    Write::Delete { kind: 0, id } => {
                        prop_assert_eq!(items.delete(&format!("e{id}")), changed);
                    }
                    Write::Delete { id, .. } => {
                        prop_assert_eq!(notes.delete(&format!("e{id}")), changed);
                    }
                    Write::Clear => store.clear(),
                }
                expected_notifications += usize::from(changed);
            }
            Step::ClearKind(kind) => {
                let changed = !model.0[*kind].is_empty();
                model.0[*kind].clear();
                if *kind == 0 {
                    items.clear();
                } else {
                    store
                        .transaction::<_, Error>(|tx| {
                            for id in 0..12 {
                                tx.delete_json("note", &format!("e{id}"));
                            }
                            Ok(())
                        })
                        .unwrap();
                }
                expected_notifications += usize::from(changed);
            }
            Step::Tx(writes, outcome) => {
                let mut shadow = model.clone();
                let changed = writes.iter().fold(false, |acc, w| shadow.apply(w) | acc);
                let outcome = *outcome;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    store.transaction::<_, Error>(|tx| {
                        for w in writes {
                            apply_tx(tx, w)?;
                        }
                        match outcome {
                            Outcome::Commit => Ok(()),
                            Outcome::Fail => Err(Error::InvalidConfig("injected".into())),
                            Outcome::Panic => panic!("injected panic (expected by this test)"),
                        }
                    })
                }));
                match outcome {
                    Outcome::Commit => {
                        prop_assert!(matches!(result, Ok(Ok(()))));
                        model = shadow;
                        expected_notifications += usize::from(changed);
                    }
                    Outcome::Fail => prop_assert!(matches!(result, Ok(Err(_)))),
                    Outcome::Panic => prop_assert!(result.is_err()),
                }
            }
        }
        prop_assert_eq!(&observe(&store), &model, "after {:?}", step);
        prop_assert_eq!(store.len(), model.0[0].len() + model.0[1].len());
    }
    prop_assert_eq!(notified.load(Ordering::SeqCst), expected_notifications);
    let kinds: Vec<String> = store
        .entity_types()
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected_kinds: Vec<String> = KINDS
        .iter()
        .zip(&model.0)
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(k, _)| (*k).to_string())
        .collect();
    prop_assert_eq!(kinds, expected_kinds);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_an_ordered_shadow_model(steps in prop::collection::vec(step(), 1..40)) {
        run(&steps)?;
    }
}

#[test]
fn shadow_model_sanity_a_failed_transaction_changes_nothing() {
    let steps = [
        Step::Single(Write::Upsert {
            kind: 0,
            id: 1,
            v: 1,
        }),
        Step::Single(Write::Upsert {
            kind: 1,
            id: 2,
            v: 2,
        }),
        Step::Tx(
            vec![
                Write::Delete { kind: 0, id: 1 },
                Write::Clear,
                Write::Upsert {
                    kind: 1,
                    id: 3,
                    v: 3,
                },
            ],
            Outcome::Fail,
        ),
    ];
    run(&steps).unwrap();
}
