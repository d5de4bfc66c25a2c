//! The service catalog (`guard deps catalog FILE`): which service serves
//! which names, who owns it and how critical it is. Every problem is
//! reported with the file, the line and the offending value.
use std::{collections::BTreeMap, path::Path};

use guard_common::pattern::Pattern;
use serde::Deserialize;

use super::store::Service;

/// The file format. Unknown keys are errors, as in policy files: a typo
/// such as `nmes:` must not silently leave a service without names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    services: Vec<CatalogEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogEntry {
    name: String,
    #[serde(default)]
    owner: Option<String>,
    /// 1 is the most business-critical.
    #[serde(default)]
    tier: Option<u32>,
    /// Names the service serves: `frontend.internal`, `*.frontend.internal`.
    #[serde(default)]
    names: Vec<String>,
    /// Free text for people; not stored.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

pub fn load(path: &Path) -> Result<Vec<Service>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Vec<Service>, String> {
    let file: CatalogFile = serde_yaml::from_str(text).map_err(|e| match e.location() {
        Some(at) => format!(
            "{}:{}: {}",
            path.display(),
            at.line(),
            strip_location(&e.to_string())
        ),
        None => format!("{}: {e}", path.display()),
    })?;
    let lines = Lines::new(text);
    let mut services: Vec<Service> = Vec::new();
    // Which service claimed each pattern, to refuse a name claimed twice.
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    for entry in file.services {
        let at = lines.of_service(&entry.name);
        let fail = |line: usize, message: String| format!("{}:{line}: {message}", path.display());
        let name = entry.name.trim();
        if name.is_empty() {
            return Err(fail(at, "a service's `name` must not be empty".into()));
        }
        if services.iter().any(|s| s.name == name) {
            return Err(fail(at, format!("service {name:?} is listed twice")));
        }
        let mut names = Vec::new();
        for text in &entry.names {
            let line = lines.of_value_after(text, at);
            let pattern = Pattern::parse(text).map_err(|reason| {
                fail(line, format!("service {name:?}: name {text:?}: {reason}"))
            })?;
            let normalised = pattern.to_string();
            if let Some(other) = claimed.insert(normalised.clone(), name.to_owned()) {
                return Err(fail(
                    line,
                    format!("name {text:?} of service {name:?} is already served by {other:?}"),
                ));
            }
            names.push(normalised);
        }
        services.push(Service {
            name: name.to_owned(),
            owner: entry.owner.filter(|o| !o.trim().is_empty()),
            tier: entry.tier.map(i64::from),
            names,
        });
    }
    Ok(services)
}

/// serde_yaml appends " at line L column C"; the line is printed first.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// Line numbers for values that deserialised fine but are invalid (serde
/// gives positions only for values of the wrong type): found by their text,
/// which is exact for the usual one-item-a-line layout.
struct Lines<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        Lines {
            lines: text.lines().collect(),
        }
    }

    /// The line of `name: SERVICE` (1 when not found).
    fn of_service(&self, service: &str) -> usize {
        self.lines
            .iter()
            .position(|line| {
                let line = line.trim_start().trim_start_matches("- ").trim_start();
                line.strip_prefix("name:").is_some_and(|value| {
                    value.trim().trim_matches(|c| c == '"' || c == '\'') == service
                })
            })
            .map_or(1, |index| index + 1)
    }

    /// The first line at or after `from` holding `value`.
    fn of_value_after(&self, value: &str, from: usize) -> usize {
        self.lines
            .iter()
            .enumerate()
            .skip(from.saturating_sub(1))
            .find(|(_, line)| line.contains(value))
            .map_or(from, |(index, _)| index + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example catalog shipped with guard.
    const CATALOG: &str = include_str!("../../../examples/catalog.yaml");

    #[test]
    fn reads_the_documented_shape() {
        let services = parse(CATALOG, Path::new("c.yaml")).unwrap();
        assert_eq!(services.len(), 4);
        assert_eq!(services[0].owner.as_deref(), Some("web-team"));
        assert_eq!(services[0].tier, Some(1));
        assert_eq!(services[1].names, ["db.internal", "*.db.internal"]);
        let services = parse(
            "services:\n  - name: x\n    names: [X.Internal., \"*.X.internal\"]\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(services[0].names, ["x.internal", "*.x.internal"]);
        assert_eq!((services[0].owner.clone(), services[0].tier), (None, None));
    }

    #[test]
    fn errors_name_the_file_line_and_value() {
        let bad_name = CATALOG.replace("\"*.db.internal\"", "\"db..internal\"");
        let error = parse(&bad_name, Path::new("c.yaml")).unwrap_err();
        assert!(error.starts_with("c.yaml:14: "), "{error}");
        assert!(error.contains("\"db..internal\""), "{error}");

        let twice = CATALOG.replace("      - db.internal", "      - frontend.internal");
        let error = parse(&twice, Path::new("c.yaml")).unwrap_err();
        assert!(error.starts_with("c.yaml:13: "), "{error}");
        assert!(error.contains("already served by \"frontend\""), "{error}");

        let tier = CATALOG.replace("tier: 2", "tier: high");
        let error = parse(&tier, Path::new("c.yaml")).unwrap_err();
        assert!(error.starts_with("c.yaml:17: "), "{error}");
        assert!(error.contains("high"), "{error}");

        let typo = CATALOG.replace("owner: web-team", "ownr: web-team");
        let error = parse(&typo, Path::new("c.yaml")).unwrap_err();
        assert!(error.contains("ownr"), "{error}");
    }
}
