//! Name patterns as users write them in policies and on the command line.
//!
//! `frontend.internal` (exact) or `*.frontend.internal` (every name below,
//! at any depth). Letters, digits, `-` and `_`; labels of 1..=63 bytes; at
//! most 253 bytes without the optional trailing dot; case is folded.
use std::{fmt, string::String};

use crate::matching::{fold_case, name_hash};

pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatternKind {
    Exact,
    /// `*.base`: names strictly below `base`.
    Subdomains,
}

/// A validated, normalised pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    kind: PatternKind,
    /// Lower case, no trailing dot, no `*.`.
    base: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatternError {
    Empty,
    NameTooLong { len: usize },
    EmptyLabel,
    LabelTooLong { label: String, len: usize },
    BadCharacter { ch: char },
    MisplacedWildcard,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::Empty => write!(f, "empty name"),
            PatternError::NameTooLong { len } => {
                write!(f, "name is {len} bytes long, the limit is {MAX_NAME_LEN}")
            }
            PatternError::EmptyLabel => {
                write!(f, "empty label (two dots in a row, or a leading dot)")
            }
            PatternError::LabelTooLong { label, len } => write!(
                f,
                "label {label:?} is {len} bytes long, the limit is {MAX_LABEL_LEN}"
            ),
            PatternError::BadCharacter { ch } => write!(
                f,
                "character {ch:?} is not allowed (letters, digits, '-' and '_' only)"
            ),
            PatternError::MisplacedWildcard => {
                write!(
                    f,
                    "'*' is only allowed as a whole leading label, as in '*.example.com'"
                )
            }
        }
    }
}

impl std::error::Error for PatternError {}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let (kind, rest) = match text.strip_prefix("*.") {
            Some(rest) => (PatternKind::Subdomains, rest),
            None => (PatternKind::Exact, text),
        };
        // One trailing dot means "fully qualified" and is ignored.
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        if rest.is_empty() {
            return Err(if text.contains('*') {
                PatternError::MisplacedWildcard
            } else {
                PatternError::Empty
            });
        }
        if rest.len() > MAX_NAME_LEN {
            return Err(PatternError::NameTooLong { len: rest.len() });
        }
        for label in rest.split('.') {
            if label.is_empty() {
                return Err(PatternError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(PatternError::LabelTooLong {
                    label: label.into(),
                    len: label.len(),
                });
            }
            if let Some(ch) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            {
                return Err(if ch == '*' {
                    PatternError::MisplacedWildcard
                } else {
                    PatternError::BadCharacter { ch }
                });
            }
        }
        let base = rest.bytes().map(|b| fold_case(b) as char).collect();
        Ok(Pattern { kind, base })
    }

    pub fn kind(&self) -> PatternKind {
        self.kind
    }

    /// The name the pattern is anchored at (`frontend.internal` for both
    /// `frontend.internal` and `*.frontend.internal`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The key hash the kernel looks this pattern up by.
    pub fn hash(&self) -> u64 {
        name_hash(&self.base)
    }

    /// Does this pattern, taken alone, match `name` (dotted, any case, an
    /// optional trailing dot)? Used to double-check kernel verdicts.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self.kind {
            PatternKind::Exact => name.eq_ignore_ascii_case(&self.base),
            PatternKind::Subdomains => {
                name.len() > self.base.len() + 1
                    && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
                    && name[name.len() - self.base.len()..].eq_ignore_ascii_case(&self.base)
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PatternKind::Exact => f.write_str(&self.base),
            PatternKind::Subdomains => write!(f, "*.{}", self.base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{format, string::ToString};

    #[test]
    fn normalises_case_and_trailing_dot() {
        let p = Pattern::parse("FrontEnd.Internal.").unwrap();
        assert_eq!(p.to_string(), "frontend.internal");
        assert_eq!(p.kind(), PatternKind::Exact);
        let p = Pattern::parse("*.FrontEnd.Internal").unwrap();
        assert_eq!(p.to_string(), "*.frontend.internal");
        assert_eq!(p.base(), "frontend.internal");
        assert_eq!(p.hash(), name_hash("frontend.internal"));
    }

    #[test]
    fn accepts_underscore_and_hyphen_and_max_sizes() {
        assert!(Pattern::parse("_dns-sd._udp.local").is_ok());
        let label63 = "a".repeat(63);
        assert!(Pattern::parse(&format!("{label63}.x")).is_ok());
        // 4 labels of 63 = 252 + 3 dots = 255 > 253; 63+63+63+61 = 250 + 3 = 253.
        let name253 = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(name253.len(), 253);
        assert!(Pattern::parse(&name253).is_ok());
    }

    #[test]
    fn rejects_every_bad_input() {
        use PatternError::*;
        assert_eq!(Pattern::parse(""), Err(Empty));
        assert_eq!(Pattern::parse("."), Err(Empty));
        assert_eq!(Pattern::parse("a..b"), Err(EmptyLabel));
        assert_eq!(Pattern::parse(".a.b"), Err(EmptyLabel));
        assert_eq!(Pattern::parse("a.b.."), Err(EmptyLabel));
        let long = "a".repeat(64);
        assert_eq!(
            Pattern::parse(&format!("{long}.com")),
            Err(LabelTooLong {
                label: long,
                len: 64
            })
        );
        let name254 = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert_eq!(Pattern::parse(&name254), Err(NameTooLong { len: 254 }));
        assert_eq!(Pattern::parse("fr ontend"), Err(BadCharacter { ch: ' ' }));
        assert_eq!(Pattern::parse("front/end"), Err(BadCharacter { ch: '/' }));
        assert_eq!(Pattern::parse("frönt.end"), Err(BadCharacter { ch: 'ö' }));
        assert_eq!(Pattern::parse("*"), Err(MisplacedWildcard));
        assert_eq!(Pattern::parse("*."), Err(MisplacedWildcard));
        assert_eq!(Pattern::parse("a.*.b"), Err(MisplacedWildcard));
        assert_eq!(Pattern::parse("*a.b"), Err(MisplacedWildcard));
        assert_eq!(Pattern::parse("**.b"), Err(MisplacedWildcard));
        assert_eq!(Pattern::parse("*.*.b"), Err(MisplacedWildcard));
    }

    #[test]
    fn matches_agrees_with_label_semantics() {
        let exact = Pattern::parse("frontend.internal").unwrap();
        assert!(exact.matches("FRONTEND.internal."));
        assert!(!exact.matches("a.frontend.internal"));
        let sub = Pattern::parse("*.frontend.internal").unwrap();
        assert!(sub.matches("a.b.Frontend.Internal"));
        assert!(!sub.matches("frontend.internal"));
        assert!(!sub.matches("notfrontend.internal"));
    }
}
