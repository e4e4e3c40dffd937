//! Schema validation on write (BEHAVIORS.md §2.5, §8.5): JSON Schema as a discriminated
//! set of kinds, serde-typed kinds with their defaults applied, closures; a rejection lists
//! every issue with its path, says "Validation failed", and writes nothing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Comment, comment, comment_json, counter, get};
use kalphite::{
    Entity, EntityKind, Error, FnSchema, Issue, JsonSchema, Kind, Origin, Schema, Store,
    TypedSchema,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

fn user_admin_schema() -> JsonSchema {
    JsonSchema::from_document(&json!({
        "user": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "profile": {
                    "type": "object",
                    "properties": {"nested": {"type": "object", "properties": {"age": {"type": "integer"}}}}
                }
            }
        },
        "admin": {
            "type": "object",
            "required": ["name", "level"],
            "properties": {"name": {"type": "string"}, "level": {"type": "integer", "minimum": 1}}
        }
    }))
    .unwrap()
}

fn store_with(schema: impl Schema) -> Store {
    Store::builder().schema(Arc::new(schema)).build()
}

#[test]
fn a_valid_value_passes_and_normalizes_to_itself() {
    let schema = user_admin_schema();
    let data = json!({"name": "Ann", "profile": {"nested": {"age": 3}}});
    assert!(schema.validate(&Kind::from("user"), &data).is_ok());
    assert_eq!(
        schema.normalize(&Kind::from("user"), data.clone()).unwrap(),
        data
    );
}

#[test]
fn a_validated_entity_keeps_its_id_type_and_nested_fields() {
    let store = store_with(user_admin_schema());
    let input = Entity::new(
        "u1",
        "user",
        json!({"name": "Ann", "profile": {"nested": {"age": 3}}}),
    )
    .at(9);
    let stored = store.dynamic("user").upsert(input.clone()).unwrap();
    assert_eq!(*stored, input);
    assert_eq!(*store.dynamic("user").find_by_id("u1").unwrap(), input);
}

#[test]
fn validation_runs_synchronously_inside_the_write() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let store = store_with(FnSchema(move |_: &Kind, _: &Value| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }));
    store.dynamic("comment").upsert(comment_json(1)).unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "validated before upsert returned"
    );
}

#[test]
fn stores_build_with_json_typed_and_closure_schemas() {
    let stores = [
        store_with(user_admin_schema()),
        store_with(TypedSchema::new().kind::<Comment>()),
        store_with(FnSchema(|_: &Kind, _: &Value| Ok(()))),
    ];
    for store in &stores {
        assert!(store.is_empty());
    }
    stores[1]
        .dynamic("comment")
        .upsert(comment_json(1))
        .unwrap();
    stores[2]
        .dynamic("comment")
        .upsert(comment_json(1))
        .unwrap();
    assert_eq!(stores[1].len() + stores[2].len(), 2);
}

#[test]
fn a_missing_required_field_is_refused_with_validation_failed() {
    let store = store_with(user_admin_schema());
    let err = store
        .dynamic("user")
        .put("u1", json!({"profile": {}}))
        .unwrap_err();
    assert!(err.to_string().contains("Validation failed"), "{err}");
    assert!(matches!(err, Error::Validation { ref issues, .. } if issues.len() == 1));
    assert!(store.is_empty());
}

#[test]
fn the_error_message_lists_every_issue_with_its_path() {
    let store = store_with(user_admin_schema());
    let err = store
        .dynamic("user")
        .put(
            "u1",
            json!({"name": "", "profile": {"nested": {"age": "old"}}}),
        )
        .unwrap_err();
    let Error::Validation { kind, id, issues } = &err else {
        panic!("expected a validation error, got {err:?}")
    };
    assert_eq!((kind.as_str(), id.as_str()), ("user", "u1"));
    let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert!(
        paths.contains(&"/name") && paths.contains(&"/profile/nested/age"),
        "{paths:?}"
    );
    let message = err.to_string();
    assert!(message.contains("Validation failed"), "{message}");
    assert!(
        message.contains("nested") && message.contains("/name"),
        "{message}"
    );
}

#[test]
fn an_invalid_entity_inserts_nothing_and_notifies_nobody() {
    let store = store_with(user_admin_schema());
    store
        .dynamic("user")
        .put("u0", json!({"name": "ok"}))
        .unwrap();
    let (count, _sub) = counter(&store);
    assert!(store.dynamic("user").put("u1", json!({"name": 5})).is_err());
    assert!(
        store
            .dynamic("user")
            .put("u0", json!({"name": ""}))
            .is_err()
    );
    assert_eq!(store.dynamic("user").len(), 1);
    assert_eq!(
        store.dynamic("user").find_by_id("u0").unwrap().data["name"],
        "ok"
    );
    assert_eq!(get(&count), 0);
}

#[test]
fn a_discriminated_set_of_kinds_accepts_each_kind_and_refuses_unknown_ones() {
    let store = store_with(user_admin_schema());
    store
        .dynamic("user")
        .put("u1", json!({"name": "Ann"}))
        .unwrap();
    store
        .dynamic("admin")
        .put("a1", json!({"name": "Bob", "level": 2}))
        .unwrap();
    assert_eq!(
        store.dynamic("user").find_by_id("u1").unwrap().data["name"],
        "Ann"
    );
    assert_eq!(
        store.dynamic("admin").find_by_id("a1").unwrap().data["level"],
        2
    );
    // Admin rules apply to admins only.
    assert!(
        store
            .dynamic("admin")
            .put("a2", json!({"name": "C", "level": 0}))
            .is_err()
    );
    let err = store.dynamic("guest").put("g1", json!({})).unwrap_err();
    let Error::Validation { issues, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(issues[0].path, "/type");
    assert!(issues[0].message.contains("unknown kind 'guest'"));
}

#[test]
fn a_thousand_validated_writes_are_all_stored() {
    let store = store_with(FnSchema(|_: &Kind, data: &Value| {
        if data.get("message").is_some() {
            Ok(())
        } else {
            Err(vec![Issue::new("/message", "required")])
        }
    }));
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..1000 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    assert_eq!(comments.len(), 1000);
}

#[test]
fn an_object_with_no_fields_passes_a_permissive_schema() {
    let store = store_with(FnSchema(|_: &Kind, data: &Value| {
        if data.is_object() {
            Ok(())
        } else {
            Err(vec![Issue::new("", "Expected object")])
        }
    }));
    store.dynamic("thing").put("t1", json!({})).unwrap();
    assert_eq!(store.dynamic("thing").len(), 1);
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Task {
    title: String,
    #[serde(default)]
    done: bool,
    #[serde(default = "default_priority")]
    priority: u8,
}

fn default_priority() -> u8 {
    3
}

impl EntityKind for Task {
    const KIND: &'static str = "task";
}

#[test]
fn a_typed_schema_stores_data_with_serde_defaults_applied() {
    let store = store_with(TypedSchema::new().kind::<Task>());
    let stored = store
        .dynamic("task")
        .put("t1", json!({"title": "write"}))
        .unwrap();
    let expected = json!({"title": "write", "done": false, "priority": 3});
    assert_eq!(stored.data, expected);
    assert_eq!(
        store.dynamic("task").find_by_id("t1").unwrap().data,
        expected
    );
    store
        .load_entities([Entity::new("t2", "task", json!({"title": "bulk"}))])
        .unwrap();
    assert_eq!(
        store.dynamic("task").find_by_id("t2").unwrap().data["priority"],
        3
    );
    let typed = store.collection::<Task>().unwrap();
    assert_eq!(typed.find_by_id("t2").unwrap().data.priority, 3);
}

#[test]
fn a_typed_schema_refuses_data_that_does_not_fit_and_passes_other_kinds_unless_strict() {
    let lax = store_with(TypedSchema::new().kind::<Task>());
    let err = lax
        .dynamic("task")
        .put("t1", json!({"done": true}))
        .unwrap_err();
    assert!(err.to_string().contains("Validation failed") && err.to_string().contains("title"));
    lax.dynamic("other")
        .put("o1", json!({"anything": 1}))
        .unwrap();
    assert_eq!(lax.len(), 1);

    let strict = store_with(TypedSchema::new().kind::<Task>().strict());
    assert!(matches!(
        strict.dynamic("other").put("o1", json!({})),
        Err(Error::Validation { .. })
    ));
    assert!(strict.is_empty());
}

#[test]
fn a_closure_schema_gets_kind_and_data_and_every_issue_is_reported() {
    let store = store_with(FnSchema(|kind: &Kind, data: &Value| {
        let mut issues = Vec::new();
        if kind == "comment" && !data["message"].is_string() {
            issues.push(Issue::new("/message", "must be a string"));
        }
        if kind == "comment" && !data["lineNumber"].is_u64() {
            issues.push(Issue::new("/lineNumber", "must be a number"));
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }));
    let err = store.dynamic("comment").put("c1", json!({})).unwrap_err();
    assert!(matches!(&err, Error::Validation { issues, .. } if issues.len() == 2));
    let message = err.to_string();
    assert!(message.contains("/message: must be a string"), "{message}");
    assert!(
        message.contains("/lineNumber: must be a number"),
        "{message}"
    );
    store.dynamic("review").put("r1", json!({})).unwrap();
    assert_eq!(store.len(), 1);
}

#[test]
fn typed_collection_writes_are_validated_too() {
    let schema = JsonSchema::from_kinds([(
        "comment",
        json!({"type": "object", "properties": {"message": {"type": "string", "minLength": 1}}}),
    )])
    .unwrap();
    let store = store_with(schema);
    let comments = store.collection::<Comment>().unwrap();
    let err = comments.put("c1", comment("", 1)).unwrap_err();
    assert!(matches!(&err, Error::Validation { issues, .. } if issues[0].path == "/message"));
    comments.put("c1", comment("fine", 1)).unwrap();
    assert_eq!(comments.len(), 1);
}

#[test]
fn every_write_path_is_validated_bulk_hydrate_remote_and_transactions() {
    let store = store_with(user_admin_schema());
    let bad = || Entity::new("u9", "user", json!({"name": 1}));
    assert!(store.load_entities([bad()]).is_err());
    assert!(store.hydrate([bad()]).is_err());
    assert!(store.dynamic("user").bulk_upsert([bad()]).is_err());
    assert!(
        store
            .transaction_from(Origin::Remote, |tx| tx.upsert_json(bad()).map(drop))
            .is_err()
    );
    assert!(store.is_empty());
}

#[test]
fn a_registered_type_checks_json_arriving_for_its_kind() {
    let store = Store::builder().register::<Task>().build();
    let err = store
        .load_entities([Entity::new("t1", "task", json!({"done": true}))])
        .unwrap_err();
    assert!(matches!(err, Error::Conversion { ref id, .. } if id == "t1"));
    store
        .load_entities([Entity::new("t1", "task", json!({"title": "x"}))])
        .unwrap();
    assert_eq!(
        store
            .collection::<Task>()
            .unwrap()
            .find_by_id("t1")
            .unwrap()
            .data
            .priority,
        3
    );
}

#[test]
fn an_invalid_schema_document_is_a_typed_error() {
    assert!(JsonSchema::from_document(&json!(["not", "an", "object"])).is_err());
    assert!(JsonSchema::from_kinds([("x", json!({"type": "no-such-type"}))]).is_err());
}
