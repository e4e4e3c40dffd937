//! What `serve --conflict` and `serve --schema` turn into: the room's [`ConflictPolicy`]
//! and the [`JsonSchema`] incoming entities are checked against, each refused with a
//! message naming the bad value before the server opens anything.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kalphite::{JsonSchema, SharedSchema};
use kalphite_sync::{ConflictPolicy, Strategy};

/// The strategies `--conflict` takes, by their wire names (`docs/protocol.md`).
const STRATEGIES: &str = "last-write-wins, field-merge or manual";

/// One `--conflict` value: a strategy for every kind, or for one kind (`KIND=STRATEGY`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConflictRule {
    /// `None`: the default for every kind without a rule of its own.
    pub kind: Option<String>,
    /// The strategy's wire name.
    pub strategy: &'static str,
}

/// Parses `last-write-wins`, `field-merge`, `manual` or `KIND=` one of them (a clap value
/// parser: the message is shown after "invalid value … for '--conflict'").
pub(crate) fn parse_conflict(value: &str) -> Result<ConflictRule, String> {
    let (kind, name) = match value.split_once('=') {
        Some((kind, name)) => {
            let kind = kind.trim();
            if kind.is_empty() {
                return Err(format!("'{value}' names no kind: use KIND=STRATEGY"));
            }
            (Some(kind.to_owned()), name.trim())
        }
        None => (None, value.trim()),
    };
    let strategy = match name {
        "last-write-wins" | "lww" => "last-write-wins",
        "field-merge" => "field-merge",
        "manual" => "manual",
        other => {
            return Err(format!(
                "unknown conflict strategy '{other}': expected {STRATEGIES}, for every kind \
                 or per kind (todo=field-merge)"
            ));
        }
    };
    Ok(ConflictRule { kind, strategy })
}

fn strategy(name: &str) -> Strategy {
    match name {
        "field-merge" => Strategy::FieldMerge,
        "manual" => Strategy::Manual,
        _ => Strategy::LastWriteWins,
    }
}

/// The policy of a list of rules: at most one default (last-write-wins without one) and
/// at most one rule per kind.
pub(crate) fn conflict_policy(rules: &[ConflictRule]) -> Result<ConflictPolicy> {
    let mut default: Option<&str> = None;
    let mut seen: Vec<&str> = Vec::new();
    for rule in rules {
        match &rule.kind {
            None if default.is_some_and(|d| d != rule.strategy) => bail!(
                "--conflict gives two strategies for every kind ({} and {}): give one, and \
                 KIND=STRATEGY for the kinds that differ",
                default.unwrap_or_default(),
                rule.strategy
            ),
            None => default = Some(rule.strategy),
            Some(kind) if seen.contains(&kind.as_str()) => {
                bail!("--conflict gives kind '{kind}' more than one strategy")
            }
            Some(kind) => seen.push(kind),
        }
    }
    let mut policy = ConflictPolicy::new(strategy(default.unwrap_or("last-write-wins")));
    for rule in rules {
        if let Some(kind) = &rule.kind {
            policy = policy.with_kind(kind.as_str(), strategy(rule.strategy));
        }
    }
    Ok(policy)
}

/// How the rules read in the server's start-up lines: `field-merge (todo: manual)`.
pub(crate) fn describe(rules: &[ConflictRule]) -> String {
    let default = rules
        .iter()
        .find(|r| r.kind.is_none())
        .map_or("last-write-wins", |r| r.strategy);
    let kinds: Vec<String> = rules
        .iter()
        .filter_map(|r| Some(format!("{}: {}", r.kind.as_ref()?, r.strategy)))
        .collect();
    if kinds.is_empty() {
        default.to_owned()
    } else {
        format!("{default} ({})", kinds.join(", "))
    }
}

/// Reads a `--schema` file: a JSON object mapping each kind to its JSON Schema,
/// `{"todo": {"type": "object", …}, "project": {…}}`. Entities of a kind it does not
/// name are refused.
pub(crate) fn load_schema(path: &Path) -> Result<(SharedSchema, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the schema file {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the schema file {} is not JSON", path.display()))?;
    let schema = JsonSchema::from_document(&doc).with_context(|| {
        format!(
            "the schema file {} is not usable (expected {{\"KIND\": {{JSON Schema}}, …}})",
            path.display()
        )
    })?;
    let mut kinds: Vec<String> = schema.kinds().map(ToString::to_string).collect();
    if kinds.is_empty() {
        bail!(
            "the schema file {} names no kind: every entity would be refused",
            path.display()
        );
    }
    kinds.sort_unstable();
    Ok((Arc::new(schema), kinds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_values_parse() {
        assert_eq!(
            parse_conflict("field-merge").unwrap(),
            ConflictRule {
                kind: None,
                strategy: "field-merge"
            }
        );
        assert_eq!(
            parse_conflict("todo=manual").unwrap(),
            ConflictRule {
                kind: Some("todo".into()),
                strategy: "manual"
            }
        );
        assert!(
            parse_conflict("newest")
                .unwrap_err()
                .contains("field-merge")
        );
        assert!(parse_conflict("=manual").unwrap_err().contains("no kind"));
        assert!(parse_conflict("todo=").is_err());
    }

    #[test]
    fn one_default_and_one_rule_per_kind() {
        let rules = |v: &[&str]| -> Vec<ConflictRule> {
            v.iter().map(|s| parse_conflict(s).unwrap()).collect()
        };
        let policy = conflict_policy(&rules(&["manual", "todo=field-merge"])).unwrap();
        assert!(matches!(
            policy.strategy_for(&"todo".into()),
            Strategy::FieldMerge
        ));
        assert!(matches!(
            policy.strategy_for(&"note".into()),
            Strategy::Manual
        ));
        assert!(conflict_policy(&rules(&["manual", "field-merge"])).is_err());
        assert!(conflict_policy(&rules(&["todo=manual", "todo=field-merge"])).is_err());
        assert_eq!(
            describe(&rules(&["todo=field-merge"])),
            "last-write-wins (todo: field-merge)"
        );
    }
}
