//! The YAML rules shared by policy files and the daemon's configuration:
//! one parser, one depth limit, strict strings, errors with file and line.
use std::{fmt, path::Path};

use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use yaml_rust2::parser::{Event, Parser};

use crate::error::PolicyError;

/// Deepest nesting of mappings and sequences accepted. Policies and the
/// configuration need three or four levels; serde_yaml stops at 128 only
/// after it has loaded every event of the document into memory, so a file
/// of nothing but `[` would cost gigabytes before that error.
pub const MAX_DEPTH: usize = 32;

/// Deserialises a YAML document, after refusing deep nesting. A leading
/// byte-order mark is ignored. Errors name `path` and the line.
pub fn from_str<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, PolicyError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_depth(text, path)?;
    serde_yaml::from_str(text).map_err(|error| PolicyError::Syntax {
        path: path.to_owned(),
        line: error.location().map(|l| l.line()),
        message: strip_location(&error.to_string()),
    })
}

/// Refuses documents nested deeper than [`MAX_DEPTH`], in time linear in
/// their size. Syntax errors are left to serde_yaml, which reports them.
fn check_depth(text: &str, path: &Path) -> Result<(), PolicyError> {
    let too_deep = |line: usize| PolicyError::Invalid {
        path: path.to_owned(),
        line: Some(line),
        message: format!("nested more than {MAX_DEPTH} levels deep (mappings and lists)"),
    };
    // YAML scanners keep a possible key per open flow collection and check
    // them all at every token: `[[[[...` costs them time quadratic in its
    // depth before the first event. Count brackets first.
    if let Some(line) = flow_too_deep(text) {
        return Err(too_deep(line));
    }
    // Then the events, which see block nesting too (streaming: memory does
    // not grow with the file).
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        match parser.next_token() {
            Ok((Event::MappingStart(..) | Event::SequenceStart(..), mark)) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep(mark.line()));
                }
            }
            Ok((Event::MappingEnd | Event::SequenceEnd, _)) => depth = depth.saturating_sub(1),
            Ok((Event::StreamEnd, _)) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// The line where flow collections (`[`, `{`) first nest deeper than
/// [`MAX_DEPTH`], if they do. Brackets in quoted strings and comments do not
/// count. The count errs only upwards: a quote is taken to open a string
/// only where YAML's would (after a space, `[`, `{` or `,` that follows an
/// indicator or starts the line), and a bracket inside a plain scalar
/// counts (it would take more than 32 unclosed ones in plain text to refuse
/// a file).
fn flow_too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let (mut comment, mut escaped) = (false, false);
    // The character before, and the last one that was not a space.
    let (mut previous, mut significant) = ('\n', '\n');
    for c in text.chars() {
        if c == '\n' {
            line += 1;
            comment = false;
        } else if comment {
        } else if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if q == '"' && c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                '#' if previous.is_whitespace() => comment = true,
                '"' | '\''
                    if (previous.is_whitespace() || "[{,".contains(previous))
                        && "\n:-[{,?".contains(significant) =>
                {
                    quote = Some(c)
                }
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Some(line);
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = c;
        if !c.is_whitespace() || c == '\n' {
            significant = c;
        }
    }
    None
}

/// serde_yaml appends " at line L column C"; the caller prints the
/// location its own way.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// A string that was written as one. serde_yaml would turn `name: 123`,
/// `deny: [true]` or `unit: ~` into the strings "123", "true" and "~";
/// YAML reads them as a number, a boolean and null, and so does every
/// other tool that reads the file, so guard refuses them (quoting makes
/// them strings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string (quote a value that YAML would read as a number, a boolean or null)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Text, E> {
                Ok(Text(value.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Text, E> {
                Ok(Text(value))
            }
        }
        // deserialize_any: serde_yaml then says what the value resolved to
        // (a plain `123` is an integer), where deserialize_string would
        // hand over its text whatever it is.
        deserializer.deserialize_any(Visitor)
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.0
    }
}

impl From<Text> for std::path::PathBuf {
    fn from(text: Text) -> std::path::PathBuf {
        text.0.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: Text,
        #[serde(default)]
        list: Vec<Text>,
    }

    fn error(text: &str) -> String {
        from_str::<Doc>(text, Path::new("d.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn only_strings_are_strings() {
        let doc: Doc = from_str("name: '123'\nlist: [\"true\", a]\n", Path::new("d.yaml")).unwrap();
        assert_eq!(doc.name.0, "123");
        assert_eq!(doc.list, [Text("true".into()), Text("a".into())]);
        for (text, line, found) in [
            ("name: 123\n", 1, "integer `123`"),
            ("name: 1.5\n", 1, "floating point `1.5`"),
            ("name: a\nlist:\n  - b\n  - true\n", 4, "boolean `true`"),
            ("name: ~\n", 1, "unit value"),
            ("name: [a]\n", 1, "sequence"),
        ] {
            let e = error(text);
            assert!(e.starts_with(&format!("d.yaml:{line}: ")), "{text:?}: {e}");
            assert!(
                e.contains(&format!("invalid type: {found}")),
                "{text:?}: {e}"
            );
            assert!(e.contains("expected a string (quote"), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let doc: Doc = from_str("\u{feff}name: x\n", Path::new("d.yaml")).unwrap();
        assert_eq!(doc.name.0, "x");
    }

    #[test]
    fn deep_nesting_is_refused_before_it_is_loaded() {
        let deep = format!("name: x\nlist: {}", "[".repeat(10_000_000));
        assert_eq!(
            error(&deep),
            "d.yaml:2: nested more than 32 levels deep (mappings and lists)"
        );
        let block: String = (0..40).map(|i| format!("{}- \n", "  ".repeat(i))).collect();
        assert!(error(&format!("name: x\nlist:\n{block}")).contains("levels deep"));
        let deep_maps = format!("name: x\nlist:\n  - {}\n", "{a: ".repeat(100));
        assert!(error(&deep_maps).starts_with("d.yaml:3: nested"));
        // At the limit, the document's own errors are what is reported.
        let at_limit = format!("name: x\nlist: {}{}\n", "[".repeat(31), "]".repeat(31));
        assert!(!error(&at_limit).contains("levels deep"));
        // Brackets in quotes and comments are text.
        let quoted = format!(
            "name: \"{0}\" # {0}\nlist: ['{0}', \"\\\"{0}\"]\n",
            "[".repeat(40)
        );
        assert_eq!(
            from_str::<Doc>(&quoted, Path::new("d.yaml")).unwrap().list[0].0,
            "[".repeat(40)
        );
        // A quote inside a plain scalar opens nothing: the brackets after it
        // are counted (they are real), so the scanners never see them.
        let sneaky = format!("name: it's\nlist: {}", "[".repeat(1_000_000));
        assert!(error(&sneaky).starts_with("d.yaml:2: nested"));
        let glued = format!("name: a:'x\nlist: {}", "[".repeat(1_000_000));
        assert!(error(&glued).starts_with("d.yaml:2: nested"));
    }
}
