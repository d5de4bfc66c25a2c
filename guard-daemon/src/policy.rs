//! Policies: YAML files and command-line rules, validated and merged into
//! one rule table that compiles to the kernel's rule map.
//!
//! ```yaml
//! name: db-deploy
//! description: The database deploy must not depend on the frontend.
//! mode: enforce        # or audit
//! deny:
//!   - frontend.internal
//!   - "*.frontend.internal"
//! allow:
//!   - status.frontend.internal
//! ```
use std::{
    collections::{btree_map::Entry, BTreeMap, HashMap},
    fmt, fs,
    path::{Path, PathBuf},
};

use guard_common::{
    matching::{decide_masked, label_bit, Action, RuleEntry, RuleSlot},
    pattern::{Pattern, PatternKind},
};
use serde::{Deserialize, Serialize};
use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

use crate::error::PolicyError;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop matching queries.
    #[default]
    Enforce,
    /// Let matching queries through and report them as "would block".
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

/// The file format. Unknown keys are errors: a typo such as `denny:` must
/// not silently produce a policy that blocks nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Deny,
    Allow,
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleKind::Deny => "deny",
            RuleKind::Allow => "allow",
        })
    }
}

/// Where a rule was written: `policies/frontend.yaml:12` or `--deny`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}", file.display()),
            (Some(file), None) => write!(f, "{}", file.display()),
            (None, _) => f.write_str("command line"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    pub kind: RuleKind,
    #[serde(serialize_with = "serialize_display")]
    pub pattern: Pattern,
    /// Mode of the policy the rule came from (deny rules only matter).
    pub mode: Mode,
    pub policy: String,
    pub origin: Origin,
}

fn serialize_display<T: fmt::Display, S: serde::Serializer>(
    value: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (policy {}, {})",
            self.kind, self.pattern, self.policy, self.origin
        )
    }
}

/// One loaded policy (a file, or the command-line rules).
#[derive(Clone, Debug, Serialize)]
pub struct Policy {
    pub name: String,
    pub description: Option<String>,
    pub mode: Mode,
    pub source: Option<PathBuf>,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Reads and validates a policy file. Every problem is reported with the
    /// file, the line and the offending value.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|error| PolicyError::Syntax {
            path: path.to_owned(),
            line: error.location().map(|l| l.line()),
            message: strip_location(&error.to_string()),
        })?;
        if file.name.trim().is_empty() {
            return Err(PolicyError::Invalid {
                path: path.to_owned(),
                line: entry_lines(text).name,
                message: "`name` must not be empty".into(),
            });
        }
        let lines = entry_lines(text);
        let mut rules = Vec::new();
        for (kind, entries, entry_lines) in [
            (RuleKind::Deny, &file.deny, &lines.deny),
            (RuleKind::Allow, &file.allow, &lines.allow),
        ] {
            for (index, text) in entries.iter().enumerate() {
                let line = entry_lines.get(index).copied();
                let pattern = Pattern::parse(text).map_err(|reason| PolicyError::Invalid {
                    path: path.to_owned(),
                    line,
                    message: format!("{kind} entry {text:?}: {reason}"),
                })?;
                rules.push(Rule {
                    kind,
                    pattern,
                    mode: file.mode,
                    policy: file.name.clone(),
                    origin: Origin {
                        file: Some(path.to_owned()),
                        line,
                    },
                });
            }
        }
        Ok(Policy {
            name: file.name,
            description: file.description,
            mode: file.mode,
            source: Some(path.to_owned()),
            rules,
        })
    }

    /// Rules given with `--deny` and `--allow`.
    pub fn from_command_line(deny: &[String], allow: &[String]) -> Result<Policy, PolicyError> {
        let mut rules = Vec::new();
        for (kind, entries) in [(RuleKind::Deny, deny), (RuleKind::Allow, allow)] {
            for text in entries {
                let pattern = Pattern::parse(text).map_err(|reason| PolicyError::Argument {
                    message: format!("--{kind} {text:?}: {reason}"),
                })?;
                rules.push(Rule {
                    kind,
                    pattern,
                    mode: Mode::Enforce,
                    policy: "command-line".into(),
                    origin: Origin {
                        file: None,
                        line: None,
                    },
                });
            }
        }
        Ok(Policy {
            name: "command-line".into(),
            description: None,
            mode: Mode::Enforce,
            source: None,
            rules,
        })
    }
}

/// serde_yaml appends " at line L column C"; we print the location ourselves.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// Line numbers of the scalars in the top-level `deny` and `allow` lists (and
/// of `name`). serde_yaml gives no positions for values that deserialise
/// fine, so the event parser supplies them.
#[derive(Default)]
struct EntryLines {
    name: Option<usize>,
    deny: Vec<usize>,
    allow: Vec<usize>,
}

fn entry_lines(text: &str) -> EntryLines {
    #[derive(Default)]
    struct Collector {
        depth: usize,
        /// Top-level key awaiting its value.
        key: Option<String>,
        expecting_key: bool,
        /// The list being collected and the depth of its items.
        list: Option<(String, usize)>,
        lines: EntryLines,
    }
    impl MarkedEventReceiver for Collector {
        fn on_event(&mut self, event: Event, mark: Marker) {
            match event {
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    if self.depth == 1 && !self.expecting_key {
                        if let (Some(key), Event::SequenceStart(..)) = (self.key.take(), &event) {
                            self.list = Some((key, self.depth + 1));
                        }
                        self.expecting_key = true;
                    }
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expecting_key = true;
                    }
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.depth -= 1;
                    if matches!(&self.list, Some((_, depth)) if *depth > self.depth) {
                        self.list = None;
                    }
                }
                Event::Scalar(value, ..) => {
                    let line = mark.line();
                    if let Some((key, depth)) = &self.list {
                        if *depth == self.depth {
                            match key.as_str() {
                                "deny" => self.lines.deny.push(line),
                                "allow" => self.lines.allow.push(line),
                                _ => {}
                            }
                        }
                    } else if self.depth == 1 {
                        if self.expecting_key {
                            self.key = Some(value);
                            self.expecting_key = false;
                        } else {
                            if self.key.as_deref() == Some("name") {
                                self.lines.name = Some(line);
                            }
                            self.key = None;
                            self.expecting_key = true;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut collector = Collector::default();
    // Syntax errors were already reported by serde_yaml.
    let _ = Parser::new_from_str(text).load(&mut collector, false);
    collector.lines
}

/// All rules of a run, merged, with the kernel rule map they compile to.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    entries: HashMap<u64, RuleEntry>,
    label_mask: u64,
}

impl RuleSet {
    /// Merges policies. The same pattern in two deny rules is one rule (the
    /// enforce mode wins); the same pattern denied and allowed is an error,
    /// since neither reading is obviously what the author meant.
    /// `force_audit` turns every deny into a report-only rule.
    pub fn compile(policies: &[Policy], force_audit: bool) -> Result<RuleSet, PolicyError> {
        let mut merged: BTreeMap<Pattern, Rule> = BTreeMap::new();
        for rule in policies.iter().flat_map(|p| p.rules.iter()) {
            let mut rule = rule.clone();
            if force_audit {
                rule.mode = Mode::Audit;
            }
            match merged.entry(rule.pattern.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(rule);
                }
                Entry::Occupied(mut existing) => {
                    let existing = existing.get_mut();
                    if existing.kind != rule.kind {
                        return Err(PolicyError::Conflict {
                            pattern: rule.pattern.to_string(),
                            first: format!(
                                "{} in policy {} ({})",
                                existing.kind, existing.policy, existing.origin
                            ),
                            second: format!(
                                "{} in policy {} ({})",
                                rule.kind, rule.policy, rule.origin
                            ),
                        });
                    }
                    if rule.mode == Mode::Enforce {
                        existing.mode = Mode::Enforce;
                    }
                }
            }
        }
        let rules: Vec<Rule> = merged.into_values().collect();
        let mut entries: HashMap<u64, RuleEntry> = HashMap::with_capacity(rules.len());
        for (id, rule) in rules.iter().enumerate() {
            let action = match (rule.kind, rule.mode) {
                (RuleKind::Allow, _) => Action::Allow,
                (RuleKind::Deny, Mode::Enforce) => Action::Block,
                (RuleKind::Deny, Mode::Audit) => Action::Audit,
            };
            let slot = RuleSlot::new(action, id as u32);
            let entry = entries
                .entry(rule.pattern.hash())
                .or_insert(RuleEntry::EMPTY);
            let target = match rule.pattern.kind() {
                PatternKind::Exact => &mut entry.exact,
                PatternKind::Subdomains => &mut entry.wildcard,
            };
            if target.is_set() {
                // Two different names with one 64-bit hash: refuse rather
                // than let one rule silently stand for the other.
                let other = &rules[target.rule_id as usize];
                return Err(PolicyError::Conflict {
                    pattern: rule.pattern.to_string(),
                    first: format!("{other} (same 64-bit hash)"),
                    second: rule.to_string(),
                });
            }
            *target = slot;
        }
        let label_mask = rules.iter().fold(0, |mask, rule| {
            mask | label_bit(rule.pattern.base().split('.').count() as u32)
        });
        Ok(RuleSet {
            rules,
            entries,
            label_mask,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, id: u32) -> Option<&Rule> {
        self.rules.get(id as usize)
    }

    /// The kernel rule map's contents, keyed by name hash.
    pub fn entries(&self) -> &HashMap<u64, RuleEntry> {
        &self.entries
    }

    /// What the kernel should decide for `name`: the same walk it makes.
    pub fn decide(&self, name: &str) -> Option<(&Rule, Action)> {
        let slot = decide_masked(name.as_bytes(), self.label_mask, |hash| {
            self.entries.get(&hash).copied()
        });
        let action = Action::from_u8(slot.action);
        (action != Action::None).then(|| (&self.rules[slot.rule_id as usize], action))
    }

    /// The label counts the rules' names have (see `label_bit`).
    pub fn label_mask(&self) -> u64 {
        self.label_mask
    }

    pub fn deny_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.kind == RuleKind::Deny)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("p.yaml"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_full_policy() {
        let p = parse(
            "name: db\ndescription: d\nmode: audit\ndeny:\n  - Frontend.Internal.\n  - \"*.frontend.internal\"\nallow: [status.frontend.internal]\n",
        )
        .unwrap();
        assert_eq!(p.name, "db");
        assert_eq!(p.mode, Mode::Audit);
        let shown: Vec<String> = p
            .rules
            .iter()
            .map(|r| format!("{} {} {:?}", r.kind, r.pattern, r.origin.line))
            .collect();
        assert_eq!(
            shown,
            [
                "deny frontend.internal Some(5)",
                "deny *.frontend.internal Some(6)",
                "allow status.frontend.internal Some(7)"
            ]
        );
    }

    #[test]
    fn bad_entry_names_file_line_and_value() {
        let e = error("name: db\ndeny:\n  - ok.internal\n  - \"bad name.internal\"\n");
        assert_eq!(
            e,
            "p.yaml:4: deny entry \"bad name.internal\": character ' ' is not allowed (letters, digits, '-' and '_' only)"
        );
    }

    #[test]
    fn every_invalid_pattern_is_reported_with_its_line() {
        let cases = [
            ("a..b", "empty label"),
            ("", "empty name"),
            (&"x".repeat(64), "is 64 bytes long, the limit is 63"),
            (
                &format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62)),
                "is 254 bytes long, the limit is 253",
            ),
            ("a.*.b", "'*' is only allowed"),
            ("*", "'*' is only allowed"),
            ("fr/ont", "character '/'"),
        ];
        for (value, expected) in cases {
            let e = error(&format!(
                "name: db\nallow:\n  - ok\ndeny:\n  - ok2\n  - \"{value}\"\n"
            ));
            assert!(e.starts_with("p.yaml:6: deny entry "), "{value}: {e}");
            assert!(e.contains(expected), "{value}: {e}");
        }
    }

    #[test]
    fn flow_lists_get_lines_too() {
        let e = error("name: db\ndeny: [a.b,\n  \"c d\"]\n");
        assert!(e.starts_with("p.yaml:3: deny entry \"c d\""), "{e}");
    }

    #[test]
    fn unknown_key_and_syntax_errors_have_locations() {
        assert_eq!(error("name: db\ndenny:\n  - a\n"), "p.yaml:2: unknown field `denny`, expected one of `name`, `description`, `mode`, `deny`, `allow`");
        let e = error("name: db\ndeny: [a\n");
        assert!(e.starts_with("p.yaml:3: "), "{e}");
        assert!(error("deny: []\n").contains("missing field `name`"));
        assert!(error("name: x\nmode: strict\n")
            .starts_with("p.yaml:2: mode: unknown variant `strict`"));
        assert!(error("name: \"  \"\n").contains("p.yaml:1: `name` must not be empty"));
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = Policy::load(Path::new("/nonexistent/guard.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/guard.yaml: cannot read:"),
            "{e}"
        );
    }

    #[test]
    fn compile_merges_and_detects_conflicts() {
        let a = parse("name: a\nmode: audit\ndeny: [x.internal, '*.y.internal']\n").unwrap();
        let b = parse("name: b\ndeny: [X.Internal]\nallow: [ok.y.internal]\n").unwrap();
        let set = RuleSet::compile(&[a.clone(), b.clone()], false).unwrap();
        assert_eq!(set.rules().len(), 3);
        let (rule, action) = set.decide("x.internal").unwrap();
        assert_eq!(
            (rule.pattern.to_string(), action),
            ("x.internal".into(), Action::Block)
        );
        assert_eq!(set.decide("a.y.internal").unwrap().1, Action::Audit);
        assert_eq!(set.decide("ok.y.internal").unwrap().1, Action::Allow);
        assert!(set.decide("y.internal").is_none());

        let forced = RuleSet::compile(&[a.clone(), b], true).unwrap();
        assert_eq!(forced.decide("x.internal").unwrap().1, Action::Audit);

        let c = parse("name: c\nallow: ['*.y.internal']\n").unwrap();
        let e = RuleSet::compile(&[a, c], false).unwrap_err().to_string();
        assert!(e.contains("*.y.internal"), "{e}");
        assert!(e.contains("deny in policy a (p.yaml:3)"), "{e}");
        assert!(e.contains("allow in policy c (p.yaml:2)"), "{e}");
    }

    #[test]
    fn command_line_rules_are_validated() {
        let p = Policy::from_command_line(&["frontend.internal".into()], &[]).unwrap();
        assert_eq!(p.rules[0].origin.to_string(), "command line");
        let e = Policy::from_command_line(&["bad..name".into()], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--deny \"bad..name\": empty label (two dots in a row, or a leading dot)"
        );
    }

    #[test]
    fn shipped_policies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut seen = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let policy = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!policy.rules.is_empty(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(
            seen >= 2,
            "expected the example policies in {}",
            dir.display()
        );
    }
}
