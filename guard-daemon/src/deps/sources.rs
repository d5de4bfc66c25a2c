//! What `guard deps ingest` reads: a run's `--record` (every name it
//! resolved) or its `--report` (the names it was refused or would have
//! been), turned into one deploy's lookups.
use std::{collections::BTreeMap, path::Path};

use super::store::{DeployRun, Lookup};
use crate::{
    kernel::records::Direction,
    report::{self, chains::ChainLink, inventory, inventory::Inventory, EventRecord, Report},
};

/// Who made the deploy: the service, the host and, unless given, a run id
/// taken from the file (its start time), so the same file always lands on
/// the same rows.
#[derive(Clone, Debug)]
pub struct Origin {
    pub service: String,
    pub host: String,
    pub run_id: Option<String>,
}

/// Reads a report or a record, whichever `path` holds (by its `schema`).
pub fn load(path: &Path, origin: &Origin) -> Result<DeployRun, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let schema = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| {
            format!(
                "{}: not a guard report or record: line {}: {e}",
                path.display(),
                e.line()
            )
        })?
        .get("schema")
        .and_then(|s| s.as_str())
        .map(str::to_owned)
        .unwrap_or_default();
    if schema == inventory::SCHEMA {
        Ok(from_record(&Inventory::load(path)?, origin))
    } else if schema == report::SCHEMA || schema == report::SCHEMA_V1 {
        Ok(from_report(&Report::load(path)?, origin))
    } else {
        Err(format!(
            "{}: schema {schema:?} is neither a report ({:?}) nor a record ({:?})",
            path.display(),
            report::SCHEMA,
            inventory::SCHEMA
        ))
    }
}

/// A `--record`: one lookup per name, plus one per name its answers led
/// to (through `via`).
pub fn from_record(record: &Inventory, origin: &Origin) -> DeployRun {
    let mut lookups = Vec::new();
    for entry in &record.names {
        let chain = chain_text(&entry.process_chain);
        lookups.push(Lookup {
            name: normalise(&entry.name),
            first_seen: entry.first_seen.clone(),
            query_types: entry.query_types.clone(),
            queries: entry.queries,
            verdict: entry.verdict.clone(),
            process_chain: chain.clone(),
            via: String::new(),
        });
        for target in &entry.answer_names {
            lookups.push(Lookup {
                name: normalise(target),
                first_seen: entry.first_seen.clone(),
                query_types: BTreeMap::new(),
                queries: 0,
                verdict: entry.verdict.clone(),
                process_chain: chain.clone(),
                via: normalise(&entry.name),
            });
        }
    }
    deploy(origin, &record.started_at, &record.command, lookups)
}

/// A `--report`: its events (refused or audited lookups, each one query or
/// one answer) grouped by name.
pub fn from_report(report: &Report, origin: &Origin) -> DeployRun {
    let mut lookups: Vec<Lookup> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut add = |name: String, via: String, event: &EventRecord, counts: bool| {
        let at = *index.entry(name.clone()).or_insert_with(|| {
            lookups.push(Lookup {
                name,
                first_seen: event.time.clone(),
                query_types: BTreeMap::new(),
                queries: 0,
                verdict: event.verdict.clone(),
                process_chain: chain_text(&event.process_chain),
                via,
            });
            lookups.len() - 1
        });
        let lookup = &mut lookups[at];
        if counts {
            *lookup
                .query_types
                .entry(event.query_type.clone())
                .or_default() += 1;
            lookup.queries += 1;
        }
        if super::store::severity(&event.verdict) > super::store::severity(&lookup.verdict) {
            lookup.verdict = event.verdict.clone();
        }
    };
    // Unreadable messages have no name to depend on.
    for event in report.events.iter().filter(|e| !e.name.is_empty()) {
        let question = normalise(&event.name);
        match (event.direction, &event.matched_name) {
            (Direction::Answer, Some(target)) => {
                // The question was asked (and let through); its answer led
                // to the refused name, which the deploy depends on too.
                add(question.clone(), String::new(), event, false);
                add(normalise(target), question, event, false);
            }
            _ => add(question, String::new(), event, true),
        }
    }
    for lookup in &mut lookups {
        if lookup.queries == 0 && lookup.via.is_empty() {
            // Known only from an answer: asked at least once.
            lookup.queries = 1;
        }
    }
    deploy(origin, &report.started_at, &report.command, lookups)
}

fn deploy(
    origin: &Origin,
    started_at: &str,
    command: &[String],
    lookups: Vec<Lookup>,
) -> DeployRun {
    DeployRun {
        service: origin.service.clone(),
        host: origin.host.clone(),
        run_id: origin
            .run_id
            .clone()
            .unwrap_or_else(|| started_at.to_owned()),
        started_at: started_at.to_owned(),
        command: command.join(" "),
        lookups,
    }
}

/// Names as the catalog's patterns are: lower case, no trailing dot.
pub fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The whole chain, each process as its program's name, its arguments and
/// its pid: `sh -c deploy.sh[10] → curl https://x[12]`. Not shortened as
/// on a terminal: this is what identifies the asker later.
fn chain_text(chain: &[ChainLink]) -> String {
    chain
        .iter()
        .map(|link| {
            let mut argv = link.argv.iter();
            let program = argv
                .next()
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
                .unwrap_or_default();
            let words: Vec<&str> = std::iter::once(program.as_str())
                .chain(argv.map(String::as_str))
                .collect();
            format!("{}[{}]", words.join(" "), link.pid)
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            service: "db".into(),
            host: "h1".into(),
            run_id: None,
        }
    }

    #[test]
    fn a_report_groups_events_by_name_and_follows_answers() {
        let answer = EventRecord {
            direction: Direction::Answer,
            matched_name: Some("API.frontend.internal.".into()),
            ..EventRecord::for_test("www.example.internal", "blocked", "A")
        };
        let report = Report {
            events: vec![
                EventRecord::for_test("frontend.internal", "blocked", "A"),
                EventRecord::for_test("frontend.internal", "blocked", "AAAA"),
                EventRecord::for_test("frontend.internal", "blocked", "A"),
                answer,
                EventRecord::for_test("", "unreadable-blocked", "?"),
            ],
            ..serde_json::from_value(serde_json::json!({
                "schema": report::SCHEMA, "guard_version": "0", "command": ["deploy.sh", "x"],
                "command_exit": {"code": 0, "signal": null}, "exit_code": 77, "mode": "enforce",
                "policies": [], "started_at": "2026-12-02T10:00:00.000Z", "duration_ms": 1,
                "cgroup": "/x", "events": [], "events_lost": 0, "counters": {
                    "inspected": 0, "blocked": 0, "audited": 0, "unreadable": 0, "unbound": 0}
            }))
            .unwrap()
        };
        let run = from_report(&report, &origin());
        assert_eq!(run.run_id, "2026-12-02T10:00:00.000Z");
        assert_eq!(run.command, "deploy.sh x");
        let names: Vec<(&str, u64, &str)> = run
            .lookups
            .iter()
            .map(|l| (l.name.as_str(), l.queries, l.via.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("frontend.internal", 3, ""),
                ("www.example.internal", 1, ""),
                ("api.frontend.internal", 0, "www.example.internal"),
            ]
        );
        assert_eq!(run.lookups[0].query_types["A"], 2);
    }
}
