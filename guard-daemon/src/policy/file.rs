//! Policy files (YAML) and command-line rules, validated: every problem is
//! reported with the file, the line and the offending value.
use std::path::Path;

use guard_common::pattern::Pattern;
use serde::Deserialize;
use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

use super::{yaml, yaml::Text, Mode, Origin, Policy, Rule, RuleKind};
use crate::{error::PolicyError, input};

/// The file format. Unknown keys are errors: a typo such as `denny:` must
/// not silently produce a policy that blocks nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: Text,
    #[serde(default)]
    description: Option<Text>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    deny: Vec<Text>,
    #[serde(default)]
    allow: Vec<Text>,
    /// Packet and raw sockets are expected (a tool that needs them): they
    /// are still reported, but neither killed nor failing the run.
    #[serde(default)]
    allow_raw_sockets: bool,
}

impl Policy {
    /// Reads and validates a policy file. Every problem is reported with the
    /// file, the line and the offending value.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Policy::read(path).map(|(_, policy)| policy)
    }

    /// [`Policy::load`], also returning the file's text (a run sends it to
    /// the daemon, which parses it again).
    pub fn read(path: &Path) -> Result<(String, Policy), PolicyError> {
        let text = input::read_text(path)?;
        let policy = Policy::parse(&text, path)?;
        Ok((text, policy))
    }

    /// Validates a policy's text: the one check `guard policy check`,
    /// `guard run` and the daemon all make.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let file: PolicyFile = yaml::from_str(text, path)?;
        // yaml::from_str ignored a byte-order mark; so must the line finder.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let name = String::from(file.name);
        if name.trim().is_empty() {
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
            for (index, Text(text)) in entries.iter().enumerate() {
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
                    policy: name.clone(),
                    origin: Origin {
                        file: Some(path.to_owned()),
                        line,
                    },
                });
            }
        }
        Ok(Policy {
            name,
            description: file.description.map(String::from),
            mode: file.mode,
            source: Some(path.to_owned()),
            rules,
            allow_raw_sockets: file.allow_raw_sockets,
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
            allow_raw_sockets: false,
        })
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
        assert_eq!(error("name: db\ndenny:\n  - a\n"), "p.yaml:2: unknown field `denny`, expected one of `name`, `description`, `mode`, `deny`, `allow`, `allow_raw_sockets`");
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
    fn wrong_types_bom_and_bad_bytes_are_errors_with_lines() {
        let e = error("name: 123\n");
        assert!(
            e.starts_with("p.yaml:1: name: invalid type: integer `123`"),
            "{e}"
        );
        let e = error("name: db\ndeny:\n  - a.internal\n  - true\n");
        assert!(
            e.starts_with("p.yaml:4: deny[1]: invalid type: boolean `true`"),
            "{e}"
        );
        let e = error("name: db\ndescription: 5\n");
        assert!(
            e.starts_with("p.yaml:2: description: invalid type: integer"),
            "{e}"
        );
        let p = parse("\u{feff}name: db\ndeny:\n  - a.internal\n").unwrap();
        assert_eq!(p.rules[0].origin.line, Some(3));
    }

    #[test]
    fn shipped_policies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
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
