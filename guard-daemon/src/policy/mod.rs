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
//! allow_raw_sockets: false   # true: packet/raw sockets reported, not failing
//! ```
//!
//! - [`file`]: reading and validating a policy file (and `--deny`/`--allow`);
//! - [`yaml`]: the YAML rules policies and the daemon's configuration
//!   share (depth limit, strict strings, errors with file and line);
//! - [`rules`]: merging policies into a [`RuleSet`], the rule table the
//!   kernel's rule map is written from and userspace re-checks verdicts with.
//!
//! This layer knows nothing of the kernel or of runs: it turns text into
//! rules.
mod file;
mod rules;
pub mod yaml;

use std::{fmt, path::PathBuf};

use guard_common::pattern::Pattern;
use serde::{Deserialize, Serialize};

pub use rules::{check_unique_names, compile, RuleSet};

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
    /// `allow_raw_sockets: true`: packet and raw sockets are expected.
    pub allow_raw_sockets: bool,
}
