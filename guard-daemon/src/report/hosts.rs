//! Hosts-file entries for denied names: a lookup answered from such an
//! entry never becomes a DNS query, so guard names them at the start of a
//! run (and `guard doctor` lists them).
use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

use super::RuleRef;
use guard_common::matching::Action;

use crate::policy::RuleSet;

/// The hosts file glibc's `files` source reads.
pub const HOSTS_FILE: &str = "/etc/hosts";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostsEntry {
    pub file: String,
    pub line: usize,
    pub address: String,
    pub name: String,
    pub rule: RuleRef,
    /// `fails-run` when the rule blocks, `reported` when it audits.
    pub verdict: String,
}

impl HostsEntry {
    pub fn line_text(&self) -> String {
        format!(
            "guard: {}:{}: {} → {} matches {}: lookups of it are answered from the file, not DNS",
            self.file, self.line, self.name, self.address, self.rule
        )
    }
}

/// Whether glibc consults the hosts file, by the `hosts:` line of
/// nsswitch.conf (absent file or line: glibc's default, which includes it).
pub fn files_source_used(nsswitch: Option<&str>) -> bool {
    let Some(text) = nsswitch else {
        return true;
    };
    match hosts_sources(text) {
        Some(sources) => sources.iter().any(|s| s == "files"),
        None => true,
    }
}

/// The sources of the `hosts:` line, without `[...]` actions.
pub fn hosts_sources(nsswitch: &str) -> Option<Vec<String>> {
    nsswitch.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("hosts:")?;
        let mut sources = Vec::new();
        let mut in_action = false;
        for word in rest.split_whitespace() {
            if word.starts_with('[') {
                in_action = !word.ends_with(']');
                continue;
            }
            if in_action {
                in_action = !word.ends_with(']');
                continue;
            }
            sources.push(word.to_string());
        }
        Some(sources)
    })
}

/// Entries of a hosts file whose name (or alias) a deny rule decides.
pub fn denied_entries(path: &Path, text: &str, rules: &RuleSet) -> Vec<HostsEntry> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(address) = words.next() else {
            continue;
        };
        for name in words {
            let verdict = match rules.decide(&name.to_ascii_lowercase()) {
                Some((rule, Action::Block)) => (rule, "fails-run"),
                Some((rule, Action::Audit)) => (rule, "reported"),
                _ => continue,
            };
            found.push(HostsEntry {
                file: path.display().to_string(),
                line: index + 1,
                address: address.to_string(),
                name: name.to_string(),
                rule: RuleRef::new(verdict.0),
                verdict: verdict.1.into(),
            });
        }
    }
    found
}

/// The hosts entries for denied names on this host, if glibc reads the
/// hosts file here.
pub fn check_host(rules: &RuleSet) -> Vec<HostsEntry> {
    let nsswitch = fs::read_to_string("/etc/nsswitch.conf").ok();
    if !files_source_used(nsswitch.as_deref()) {
        return Vec::new();
    }
    let path = Path::new(HOSTS_FILE);
    match fs::read_to_string(path) {
        Ok(text) => denied_entries(path, &text, rules),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hosts_line_of_nsswitch() {
        let text = "passwd: files\nhosts:  files resolve [!UNAVAIL=return] dns # x\n";
        assert_eq!(
            hosts_sources(text).unwrap(),
            ["files", "resolve", "dns"].map(String::from)
        );
        assert!(files_source_used(Some(text)));
        assert!(!files_source_used(Some("hosts: dns\n")));
        assert!(files_source_used(None));
        assert!(files_source_used(Some("passwd: files\n")));
    }
}
