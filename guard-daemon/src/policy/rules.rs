//! Merging policies into one rule table, compiled to the entries of the
//! kernel's rule map (see `guard_common::matching`).
use std::collections::{btree_map::Entry, BTreeMap, HashMap};

use guard_common::{
    matching::{decide_masked, label_bit, Action, RuleEntry, RuleSlot},
    pattern::{Pattern, PatternKind},
};

use super::{Mode, Policy, Rule, RuleKind};
use crate::error::PolicyError;

/// All rules of a run, merged, with the kernel rule map they compile to.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    entries: HashMap<u64, RuleEntry>,
    label_mask: u64,
    allow_raw_sockets: bool,
}

impl RuleSet {
    /// Merges policies. The same pattern in two deny rules is one rule (the
    /// enforce mode wins); the same pattern denied and allowed is an error,
    /// since neither reading is obviously what the author meant.
    /// `force_audit` turns every deny into a report-only rule.
    pub fn compile(policies: &[Policy], force_audit: bool) -> Result<RuleSet, PolicyError> {
        check_unique_names(policies)?;
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
            // One policy that expects packet or raw sockets is enough: it
            // was written for the tool that opens them.
            allow_raw_sockets: policies.iter().any(|p| p.allow_raw_sockets),
        })
    }

    /// Whether a policy expects packet and raw sockets.
    pub fn allow_raw_sockets(&self) -> bool {
        self.allow_raw_sockets
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

    /// What the kernel should decide for a name given as its labels: the
    /// same walk it makes.
    pub fn decide_labels(&self, labels: &[Vec<u8>]) -> Option<(&Rule, Action)> {
        let labels = labels.iter().map(Vec::as_slice);
        let slot = decide_masked(labels, self.label_mask, |hash| {
            self.entries.get(&hash).copied()
        });
        let action = Action::from_u8(slot.action);
        (action != Action::None).then(|| (&self.rules[slot.rule_id as usize], action))
    }

    /// [`RuleSet::decide_labels`] for a dotted name whose labels hold no dot.
    pub fn decide(&self, name: &str) -> Option<(&Rule, Action)> {
        let labels: Vec<Vec<u8>> = if name.is_empty() {
            Vec::new()
        } else {
            name.split('.').map(|l| l.as_bytes().to_vec()).collect()
        };
        self.decide_labels(&labels)
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

/// Two files that give one policy name: reports, logs and the daemon's
/// bindings name policies, so each name must mean one file. (The same file
/// given twice is one policy.)
pub fn check_unique_names(policies: &[Policy]) -> Result<(), PolicyError> {
    let mut seen: HashMap<&str, &Policy> = HashMap::new();
    for policy in policies {
        match seen.get(policy.name.as_str()) {
            Some(first) if first.source != policy.source => {
                let described = |source: &Option<std::path::PathBuf>| match source {
                    Some(path) => path.display().to_string(),
                    None => "the command line".to_owned(),
                };
                return Err(PolicyError::Invalid {
                    path: policy.source.clone().unwrap_or_default(),
                    line: None,
                    message: format!(
                        "policy name {:?} is also used by {}",
                        policy.name,
                        described(&first.source)
                    ),
                });
            }
            _ => {
                seen.insert(&policy.name, policy);
            }
        }
    }
    Ok(())
}

/// Adds the command-line rules to the policies and compiles them: the one
/// compilation `guard run`, `guard policy check` and the daemon use, so
/// they accept the same policies and rule ids agree.
pub fn compile(
    mut policies: Vec<Policy>,
    deny: &[String],
    allow: &[String],
    audit: bool,
) -> Result<(Vec<Policy>, RuleSet), PolicyError> {
    if !deny.is_empty() || !allow.is_empty() {
        policies.push(Policy::from_command_line(deny, allow)?);
    }
    let rules = RuleSet::compile(&policies, audit)?;
    Ok((policies, rules))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("p.yaml"))
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
    fn one_name_in_two_files_is_an_error() {
        let a = Policy::parse("name: a\n", Path::new("one.yaml")).unwrap();
        let again = Policy::parse("name: a\n", Path::new("two.yaml")).unwrap();
        let e = RuleSet::compile(&[a.clone(), again], false)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "two.yaml: policy name \"a\" is also used by one.yaml");
        // The same file twice is one policy.
        assert!(RuleSet::compile(&[a.clone(), a], false).is_ok());
    }
}
