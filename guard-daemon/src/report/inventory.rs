//! `--record FILE`: every name a run resolved, allowed or not, and
//! `guard policy suggest`, which turns such a record into a starting policy.
//!
//! The kernel reports each distinct (name, type) once and counts the rest
//! in its SEEN map, so recording costs one event per name, not per packet.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::records::Direction,
    report::chains::ChainLink,
    report::{load_versioned, EventRecord, RuleRef},
};

pub const SCHEMA: &str = "guard.record/1";

#[derive(Debug, Serialize, Deserialize)]
pub struct Inventory {
    pub schema: String,
    pub command: Vec<String>,
    pub started_at: String,
    pub names: Vec<RecordedName>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecordedName {
    pub name: String,
    /// `allowed`, `blocked` or `audited` (the strictest seen).
    pub verdict: String,
    /// Query counts by type.
    pub query_types: BTreeMap<String, u64>,
    pub queries: u64,
    /// The rule that decided, if any (an allow rule for allowed names).
    pub rule: Option<RuleRef>,
    /// The chain of the first process that asked.
    pub process_chain: Vec<ChainLink>,
    pub first_seen: String,
    /// Names a rule matched in the answers to it (a CNAME, SRV, ... target
    /// the answer would have had the client use).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answer_names: Vec<String>,
}

impl Inventory {
    /// Builds the inventory from the run's events and the kernel's counts
    /// of allowed queries, keyed by (name hash, query type code).
    pub fn build(
        command: Vec<String>,
        started_at: String,
        events: &[EventRecord],
        qtype_codes: &HashMap<String, u16>,
        allowed_counts: &HashMap<(u64, u16), u64>,
    ) -> Inventory {
        let mut by_name: BTreeMap<&str, RecordedName> = BTreeMap::new();
        // The query type of the first answer event of names no query event
        // counted (see below).
        let mut answered: BTreeMap<&str, &str> = BTreeMap::new();
        for event in events.iter().filter(|e| !e.name.is_empty()) {
            let entry = by_name.entry(&event.name).or_insert_with(|| RecordedName {
                name: event.name.clone(),
                verdict: event.verdict.clone(),
                query_types: BTreeMap::new(),
                queries: 0,
                rule: event.rule.clone(),
                process_chain: event.process_chain.clone(),
                first_seen: event.time.clone(),
                answer_names: Vec::new(),
            });
            if severity(&event.verdict) > severity(&entry.verdict) {
                entry.verdict = event.verdict.clone();
                entry.rule = event.rule.clone();
            }
            if event.direction == Direction::Answer {
                // An answer is not another query: the question it answers
                // was counted by its own event (and, when allowed, in the
                // kernel's count of that name and type).
                if let Some(matched) = &event.matched_name {
                    if !entry.answer_names.contains(matched) {
                        entry.answer_names.push(matched.clone());
                    }
                }
                answered.entry(&event.name).or_insert(&event.query_type);
                continue;
            }
            let count = if event.verdict == "allowed" {
                let code = qtype_codes.get(&event.query_type).copied().unwrap_or(0);
                let hash = crate::kernel::records::parse_display_name(&event.name)
                    .map(|labels| {
                        guard_common::matching::labels_hash(labels.iter().map(Vec::as_slice))
                    })
                    .unwrap_or_default();
                // The kernel reported the first query and counted all of them;
                // an LRU eviction can report a name again, so take the count once.
                if entry.query_types.contains_key(&event.query_type) {
                    0
                } else {
                    allowed_counts.get(&(hash, code)).copied().unwrap_or(1)
                }
            } else {
                1
            };
            *entry
                .query_types
                .entry(event.query_type.clone())
                .or_default() += count;
            entry.queries += count;
        }
        // A name known only from an answer (its query's event was lost) was
        // still asked at least once.
        for (name, query_type) in answered {
            let entry = by_name
                .get_mut(name)
                .expect("every answered name has an entry");
            if entry.queries == 0 {
                entry.query_types.insert(query_type.to_owned(), 1);
                entry.queries = 1;
            }
        }
        Inventory {
            schema: SCHEMA.into(),
            command,
            started_at,
            names: by_name.into_values().collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Inventory, String> {
        load_versioned(path, "guard record", SCHEMA, |i: &Inventory| &i.schema)
    }
}

fn severity(verdict: &str) -> u8 {
    match verdict {
        "blocked" | "unreadable-blocked" | "malformed-blocked" => 2,
        "audited" | "unreadable-audited" | "malformed-audited" => 1,
        _ => 0,
    }
}

fn short_chain(chain: &[ChainLink]) -> String {
    chain
        .iter()
        .map(ChainLink::short)
        .collect::<Vec<_>>()
        .join(" → ")
}

/// A starting policy from a record: names a deny rule already matched stay
/// denied; every other name is listed as a commented-out candidate with how
/// often and by whom it was resolved, and parents under which several names
/// were resolved are offered as `*.` candidates. It starts in audit mode.
pub fn suggest(inventory: &Inventory, name: &str, source: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Starting policy suggested by `guard policy suggest` from {}",
        source.display()
    );
    let _ = writeln!(
        out,
        "# (recorded run: {}; {}).",
        inventory.command.join(" "),
        inventory.started_at
    );
    let _ = writeln!(out, "#");
    let _ = writeln!(
        out,
        "# The deploy resolved every name listed below. Uncomment the ones it must"
    );
    let _ = writeln!(
        out,
        "# NOT depend on (typically: the services it may have to roll back), run it"
    );
    let _ = writeln!(
        out,
        "# in audit mode for a while, then switch `mode` to enforce."
    );
    let _ = writeln!(out, "name: {name}");
    let _ = writeln!(
        out,
        "description: Suggested from a recorded run of {}",
        yaml_comment_safe(&inventory.command.join(" "))
    );
    let _ = writeln!(out, "mode: audit");

    let denied: Vec<&RecordedName> = inventory
        .names
        .iter()
        .filter(|n| n.verdict != "allowed")
        .collect();
    let candidates: Vec<&RecordedName> = inventory
        .names
        .iter()
        .filter(|n| n.verdict == "allowed")
        .collect();
    let mut patterns: Vec<String> = Vec::new();
    for entry in &denied {
        if let Some(rule) = &entry.rule {
            if rule.kind == "deny" && !patterns.contains(&rule.pattern) {
                patterns.push(rule.pattern.clone());
            }
        }
    }
    if patterns.is_empty() {
        let _ = writeln!(out, "deny: []");
    } else {
        let _ = writeln!(out, "deny:");
        for pattern in &patterns {
            let _ = writeln!(out, "  - \"{pattern}\"  # matched during the recorded run");
        }
    }
    if !candidates.is_empty() {
        let _ = writeln!(
            out,
            "# Candidates: names resolved during the run (queries, types; first asker)."
        );
        let width = candidates.iter().map(|c| c.name.len()).max().unwrap_or(0) + 2;
        for candidate in &candidates {
            let types: Vec<&str> = candidate.query_types.keys().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "#  - {:width$}# {} queries ({}); {}",
                candidate.name,
                candidate.queries,
                types.join(", "),
                yaml_comment_safe(&short_chain(&candidate.process_chain)),
            );
        }
        let mut parents: BTreeMap<&str, usize> = BTreeMap::new();
        for candidate in &candidates {
            if let Some((_, parent)) = candidate.name.split_once('.') {
                if parent.contains('.') {
                    *parents.entry(parent).or_default() += 1;
                }
            }
        }
        let shared: Vec<(&str, usize)> = parents.into_iter().filter(|(_, n)| *n >= 2).collect();
        if !shared.is_empty() {
            let _ = writeln!(
                out,
                "# Several names were resolved under these domains; one rule covers them all:"
            );
            for (parent, count) in shared {
                let _ = writeln!(out, "#  - \"*.{parent}\"  # {count} names");
            }
        }
    }
    let allowed: Vec<&str> = inventory
        .names
        .iter()
        .filter_map(|n| n.rule.as_ref())
        .filter(|r| r.kind == "allow")
        .map(|r| r.pattern.as_str())
        .collect();
    if allowed.is_empty() {
        let _ = writeln!(out, "allow: []");
    } else {
        let _ = writeln!(out, "allow:");
        let mut seen = Vec::new();
        for pattern in allowed {
            if !seen.contains(&pattern) {
                let _ = writeln!(out, "  - \"{pattern}\"  # matched during the recorded run");
                seen.push(pattern);
            }
        }
    }
    out
}

fn yaml_comment_safe(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn event(name: &str, verdict: &str, qtype: &str) -> EventRecord {
        EventRecord {
            process_chain: vec![ChainLink {
                pid: 1,
                argv: vec!["deploy.sh".into()],
                executable: None,
            }],
            rule: (verdict == "blocked").then(|| RuleRef {
                kind: "deny".into(),
                pattern: "*.frontend.internal".into(),
                policy: "p".into(),
                origin: "p.yaml:3".into(),
            }),
            ..EventRecord::for_test(name, verdict, qtype)
        }
    }

    #[test]
    fn builds_counts_and_suggests_a_valid_policy() {
        let events = vec![
            event("db.internal", "allowed", "A"),
            event("db.internal", "allowed", "AAAA"),
            event("a.cache.internal", "allowed", "A"),
            event("b.cache.internal", "allowed", "A"),
            event("api.frontend.internal", "blocked", "A"),
            event("api.frontend.internal", "blocked", "A"),
        ];
        let codes = HashMap::from([("A".to_string(), 1u16), ("AAAA".to_string(), 28u16)]);
        let hash = guard_common::matching::name_hash("db.internal");
        let counts = HashMap::from([((hash, 1u16), 5u64), ((hash, 28u16), 2u64)]);
        let inventory = Inventory::build(
            vec!["deploy.sh".into()],
            "t".into(),
            &events,
            &codes,
            &counts,
        );
        let db = inventory
            .names
            .iter()
            .find(|n| n.name == "db.internal")
            .unwrap();
        assert_eq!(db.queries, 7);
        assert_eq!(db.query_types["AAAA"], 2);
        let api = inventory
            .names
            .iter()
            .find(|n| n.name == "api.frontend.internal")
            .unwrap();
        assert_eq!((api.verdict.as_str(), api.queries), ("blocked", 2));

        let yaml = suggest(&inventory, "db-deploy", Path::new("rec.json"));
        assert!(yaml.contains("  - \"*.frontend.internal\""), "{yaml}");
        assert!(yaml.contains("#  - db.internal"), "{yaml}");
        assert!(
            yaml.contains("#  - \"*.cache.internal\"  # 2 names"),
            "{yaml}"
        );
        let policy = Policy::parse(&yaml, Path::new("suggested.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(policy.rules.len(), 1);
    }

    /// A refused answer (`www.example.internal` is a CNAME to a denied
    /// name) answers a question the allowed query's event and the kernel's
    /// count already counted: it must not count it again, in either order.
    #[test]
    fn an_answer_does_not_count_its_question_again() {
        let query = event("www.example.internal", "allowed", "A");
        let answer = EventRecord {
            direction: Direction::Answer,
            matched_name: Some("api.frontend.internal".into()),
            record_type: Some("CNAME".into()),
            ..event("www.example.internal", "blocked", "A")
        };
        let codes = HashMap::from([("A".to_string(), 1u16)]);
        let hash = guard_common::matching::name_hash("www.example.internal");
        let counts = HashMap::from([((hash, 1u16), 3u64)]);
        for events in [
            vec![query.clone(), answer.clone()],
            vec![answer.clone(), query.clone()],
        ] {
            let inventory = Inventory::build(Vec::new(), "t".into(), &events, &codes, &counts);
            let entry = &inventory.names[0];
            assert_eq!(inventory.names.len(), 1);
            assert_eq!(entry.queries, 3, "{entry:?}");
            assert_eq!(entry.query_types["A"], 3, "{entry:?}");
            assert_eq!(entry.verdict, "blocked");
            assert_eq!(entry.answer_names, ["api.frontend.internal"]);
        }
        // Only the answer arrived: the question was still asked once.
        let inventory = Inventory::build(Vec::new(), "t".into(), &[answer], &codes, &counts);
        assert_eq!(inventory.names[0].queries, 1);
    }
}
