//! A run's report as people and CI systems read it: the terminal summary,
//! markdown (GitHub step summaries, other CIs), JUnit XML, and GitHub Actions
//! annotations. All are rendered from the JSON report, so `guard report`
//! renders a saved report exactly as the run did.
use std::fmt::Write as _;

use quick_xml::escape::escape;

use crate::{
    kernel::records::Direction,
    policy::Mode,
    report::{chains::ChainLink, EventRecord, Report, RuleRef},
};

/// Every event of one (verdict, name), in arrival order.
#[derive(Debug)]
pub struct Group<'a> {
    pub verdict: &'a str,
    pub name: &'a str,
    /// Refused answers: the refused name the answer led to.
    pub matched: Option<&'a str>,
    pub events: Vec<&'a EventRecord>,
}

impl<'a> Group<'a> {
    pub fn first(&self) -> &'a EventRecord {
        self.events[0]
    }

    pub fn rule(&self) -> Option<&'a RuleRef> {
        self.first().rule.as_ref()
    }

    pub fn types(&self) -> String {
        let mut types: Vec<&str> = self.events.iter().map(|e| e.query_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        types.join(", ")
    }

    /// Distinct process chains, in the order they were first seen.
    pub fn chains(&self) -> Vec<String> {
        let mut chains: Vec<String> = Vec::new();
        for event in &self.events {
            let chain = event.chain_text();
            if !chains.contains(&chain) {
                chains.push(chain);
            }
        }
        chains
    }

    /// The group's name for people: the question, or for a refused answer
    /// the alias chain from the question to the refused name.
    pub fn display_name(&self) -> String {
        let first = self.first();
        if !first.alias_chain.is_empty() {
            return format!("{} (answer)", first.alias_chain.join(" → "));
        }
        if self.name.is_empty() {
            return match first.direction {
                Direction::Query => "(unreadable query)".into(),
                Direction::Answer => "(unreadable answer)".into(),
            };
        }
        self.name.to_owned()
    }

    /// Refused (as opposed to only reported).
    pub fn blocked(&self) -> bool {
        is_blocked(self.verdict)
    }

    fn label(&self) -> &'static str {
        match self.verdict {
            "blocked" => "BLOCKED",
            "audited" => "WOULD BLOCK",
            v if is_blocked(v) => "BLOCKED (unreadable)",
            _ => "UNREADABLE",
        }
    }
}

/// A verdict that refused the message (`malformed-blocked` is schema 1's
/// word for `unreadable-blocked`).
pub fn is_blocked(verdict: &str) -> bool {
    matches!(
        verdict,
        "blocked" | "unreadable-blocked" | "malformed-blocked"
    )
}

pub fn groups(report: &Report) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    for event in report.events.iter().filter(|e| e.verdict != "allowed") {
        let matched = event.matched_name.as_deref();
        match groups
            .iter_mut()
            .find(|g| g.verdict == event.verdict && g.name == event.name && g.matched == matched)
        {
            Some(group) => group.events.push(event),
            None => groups.push(Group {
                verdict: &event.verdict,
                name: &event.name,
                matched,
                events: vec![event],
            }),
        }
    }
    groups
}

fn command_line(report: &Report) -> String {
    report.command.join(" ")
}

fn headline(report: &Report) -> String {
    let c = &report.counters;
    let received = report.events.len() as u64 + report.events_omitted;
    format!(
        "{} DNS queries inspected, {} blocked, {} audited, {} unreadable; events: {received} received, {} lost",
        c.inspected, c.blocked, c.audited, c.unreadable, report.events_lost
    )
}

/// The end-of-run summary for a terminal (stderr).
pub fn text(report: &Report, color: bool) -> String {
    let paint = |code: &str, text: &str| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "guard: {}", headline(report));
    for group in groups(report) {
        let label = paint(if group.blocked() { "1;31" } else { "1;33" }, group.label());
        let _ = writeln!(
            out,
            "  {label} {}  ×{}  [{}]",
            group.display_name(),
            group.events.len(),
            group.types()
        );
        if let Some(rule) = group.rule() {
            let _ = writeln!(out, "      rule: {rule}");
        }
        let chains = group.chains();
        for chain in chains.iter().take(3) {
            let _ = writeln!(out, "      from: {chain}");
        }
        if chains.len() > 3 {
            let _ = writeln!(out, "      … and {} other process chains", chains.len() - 3);
        }
        let _ = writeln!(out, "      first at {}", group.first().time);
    }
    for item in evidence_lines(report) {
        let label = if item.fails {
            paint("1;31", item.label)
        } else {
            paint("1;33", item.label)
        };
        let _ = writeln!(out, "  {label} {}", item.text);
        if let Some(chain) = &item.chain {
            let _ = writeln!(out, "      from: {chain}");
        }
    }
    out
}

/// One line of evidence (or a hosts entry) in a rendering.
pub struct EvidenceLine<'a> {
    pub label: &'static str,
    pub text: String,
    pub chain: Option<String>,
    pub fails: bool,
    pub kind: &'a str,
}

/// The report's evidence and hosts entries as lines, failing ones first.
pub fn evidence_lines(report: &Report) -> Vec<EvidenceLine<'_>> {
    let mut lines = Vec::new();
    for entry in &report.evidence {
        let fails = entry.fails(report.fail_on_block);
        let label = match (entry.kind.as_str(), fails) {
            ("left-cgroup", true) => "ESCAPED",
            ("left-cgroup", false) => "WOULD FAIL: ESCAPED",
            ("detached", _) => "TAMPERED",
            ("bpf", true) => "TAMPERING",
            ("packet-socket" | "raw-socket", true) => "RAW SOCKET",
            ("untracked", _) => "UNTRACKED",
            _ if fails => "EVIDENCE",
            _ => "NOTE",
        };
        let count = if entry.count > 1 {
            format!(" ×{}", entry.count)
        } else {
            String::new()
        };
        let who = if entry.pid == 0 {
            String::new()
        } else {
            format!(" [{} {}]", entry.comm, entry.pid)
        };
        let chain = (!entry.process_chain.is_empty()).then(|| {
            entry
                .process_chain
                .iter()
                .map(ChainLink::short)
                .collect::<Vec<_>>()
                .join(" → ")
        });
        lines.push(EvidenceLine {
            label,
            text: format!(
                "{}: {}{count}{who} ({}, {})",
                entry.kind, entry.detail, entry.action, entry.verdict
            ),
            chain,
            fails,
            kind: &entry.kind,
        });
    }
    if report.evidence_lost > 0 {
        lines.push(EvidenceLine {
            label: "EVIDENCE LOST",
            text: format!(
                "{} evidence record(s) the kernel counted never arrived (ring buffer full); the run fails",
                report.evidence_lost
            ),
            chain: None,
            fails: report.mode == Mode::Enforce || report.fail_on_block,
            kind: "lost",
        });
    }
    for entry in &report.hosts_entries {
        let fails = entry.verdict == "fails-run" || report.fail_on_block;
        lines.push(EvidenceLine {
            label: "HOSTS FILE",
            text: format!(
                "{}:{}: {} → {} matches {}: answered from the file, never a DNS query ({})",
                entry.file, entry.line, entry.name, entry.address, entry.rule, entry.verdict
            ),
            chain: None,
            fails,
            kind: "hosts-entry",
        });
    }
    lines.sort_by_key(|l| !l.fails);
    lines
}

/// Failing evidence and hosts entries.
pub fn failing_evidence(report: &Report) -> usize {
    evidence_lines(report).iter().filter(|l| l.fails).count()
}

fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A markdown summary (GitHub's `$GITHUB_STEP_SUMMARY`, `--summary-markdown`).
pub fn markdown(report: &Report) -> String {
    let groups = groups(report);
    let blocked: usize = groups
        .iter()
        .filter(|g| g.blocked())
        .map(|g| g.events.len())
        .sum();
    let audited: usize = groups
        .iter()
        .filter(|g| !g.blocked())
        .map(|g| g.events.len())
        .sum();
    let mut out = String::new();
    let title = match (blocked, audited) {
        (0, 0) => "guard: no DNS lookup blocked".to_owned(),
        (0, n) => format!("guard: {n} DNS lookup(s) would be blocked (audit)"),
        (n, _) => format!("guard: {n} DNS lookup(s) blocked"),
    };
    let _ = writeln!(out, "### {title}\n");
    let _ = writeln!(
        out,
        "`{}` — guard exited **{}** (the command: {}), mode {}.\n",
        markdown_cell(&command_line(report)),
        report.exit_code,
        match (report.command_exit.code, report.command_exit.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => "unknown".into(),
        },
        report.mode
    );
    if !groups.is_empty() {
        let _ = writeln!(
            out,
            "| verdict | name | types | count | rule | process chain | first |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
        for group in &groups {
            let rule = group
                .rule()
                .map(|r| format!("`{} {}` ({}, {})", r.kind, r.pattern, r.policy, r.origin));
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {} | {} | {} |",
                group.label(),
                markdown_cell(&group.display_name()),
                group.types(),
                group.events.len(),
                markdown_cell(&rule.unwrap_or_default()),
                markdown_cell(&group.chains().join("<br>")),
                group.first().time
            );
        }
        out.push('\n');
    }
    let lines = evidence_lines(report);
    if !lines.is_empty() {
        let _ = writeln!(out, "| evidence | detail | process chain |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for line in &lines {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                line.label,
                markdown_cell(&line.text),
                markdown_cell(line.chain.as_deref().unwrap_or(""))
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{}.", headline(report));
    out
}

/// JUnit XML: one suite per policy, one failing case per distinct blocked
/// name (audited names fail too with `--fail-on-block`), one passing case
/// when nothing was blocked.
pub fn junit(report: &Report) -> String {
    let groups = groups(report);
    let failing = |g: &Group<'_>| g.blocked() || report.fail_on_block;
    let mut suites: Vec<(String, Vec<&Group<'_>>)> = Vec::new();
    for group in &groups {
        let suite = group
            .rule()
            .map(|r| r.policy.clone())
            .unwrap_or_else(|| "guard".into());
        match suites.iter_mut().find(|(name, _)| *name == suite) {
            Some((_, members)) => members.push(group),
            None => suites.push((suite, vec![group])),
        }
    }
    let evidence: Vec<EvidenceLine<'_>> = evidence_lines(report)
        .into_iter()
        .filter(|l| l.fails)
        .collect();
    let total_failures = groups.iter().filter(|g| failing(g)).count() + evidence.len();
    let total_tests = (groups.len() + evidence.len()).max(1);
    let seconds = report.duration_ms as f64 / 1000.0;
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"guard\" tests=\"{total_tests}\" failures=\"{total_failures}\" errors=\"0\" time=\"{seconds:.3}\">"
    );
    if !evidence.is_empty() {
        let _ = writeln!(
            out,
            "  <testsuite name=\"guard-evidence\" tests=\"{n}\" failures=\"{n}\" errors=\"0\" skipped=\"0\" time=\"{seconds:.3}\" timestamp=\"{}\">",
            escape(report.started_at.trim_end_matches('Z')),
            n = evidence.len()
        );
        for line in &evidence {
            let _ = writeln!(
                out,
                "    <testcase classname=\"guard.evidence\" name=\"{}\" time=\"0\">",
                escape(line.kind)
            );
            let _ = writeln!(
                out,
                "      <failure message=\"{}\" type=\"{}\">{}</failure>",
                escape(line.text.as_str()),
                escape(line.kind),
                escape(line.chain.as_deref().unwrap_or(""))
            );
            let _ = writeln!(out, "    </testcase>");
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    if suites.is_empty() && evidence.is_empty() {
        let _ = writeln!(
            out,
            "  <testsuite name=\"guard\" tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"0\" time=\"{seconds:.3}\" timestamp=\"{}\">",
            escape(report.started_at.trim_end_matches('Z'))
        );
        let _ = writeln!(
            out,
            "    <testcase classname=\"guard\" name=\"no DNS lookup blocked\" time=\"{seconds:.3}\"/>"
        );
        let _ = writeln!(out, "  </testsuite>");
    }
    for (suite, members) in &suites {
        let failures = members.iter().filter(|g| failing(g)).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{seconds:.3}\" timestamp=\"{}\">",
            escape(suite.as_str()),
            members.len(),
            escape(report.started_at.trim_end_matches('Z'))
        );
        for group in members {
            let name = escape(group.display_name()).into_owned();
            let classname = escape(format!("guard.{suite}")).into_owned();
            let rule = group
                .rule()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unreadable DNS query".into());
            let message = format!(
                "DNS lookup of {} {} ×{} ({}) by rule {rule}; first at {}",
                group.display_name(),
                if group.blocked() {
                    "blocked"
                } else {
                    "would be blocked"
                },
                group.events.len(),
                group.types(),
                group.first().time
            );
            let mut details = format!("command: {}\n", command_line(report));
            for chain in group.chains() {
                let _ = writeln!(details, "process chain: {chain}");
            }
            if failing(group) {
                let _ = writeln!(
                    out,
                    "    <testcase classname=\"{classname}\" name=\"{name}\" time=\"0\">"
                );
                let _ = writeln!(
                    out,
                    "      <failure message=\"{}\" type=\"{}\">{}</failure>",
                    escape(message.as_str()),
                    escape(group.verdict),
                    escape(details.as_str())
                );
                let _ = writeln!(out, "    </testcase>");
            } else {
                let _ = writeln!(
                    out,
                    "    <testcase classname=\"{classname}\" name=\"{name}\" time=\"0\">"
                );
                let _ = writeln!(
                    out,
                    "      <system-out>{}</system-out>",
                    escape(format!("{message}\n{details}"))
                );
                let _ = writeln!(out, "    </testcase>");
            }
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

/// GitHub Actions workflow commands: an `::error` per distinct blocked name
/// (a `::warning` per name that would be blocked in audit mode).
pub fn github_annotations(report: &Report) -> Vec<String> {
    groups(report)
        .iter()
        .map(|group| {
            let level = if group.blocked() || report.fail_on_block {
                "error"
            } else {
                "warning"
            };
            let title = format!(
                "guard: DNS lookup of {} {}",
                group.display_name(),
                if group.blocked() {
                    "blocked"
                } else {
                    "would be blocked"
                }
            );
            let mut message = format!(
                "{} ×{} ({})",
                group.display_name(),
                group.events.len(),
                group.types()
            );
            if let Some(rule) = group.rule() {
                let _ = write!(message, " by rule {rule}");
            }
            for chain in group.chains().iter().take(3) {
                let _ = write!(message, "\nfrom: {chain}");
            }
            let _ = write!(message, "\nfirst at {}", group.first().time);
            format!(
                "::{level} title={}::{}",
                escape_property(&title),
                escape_data(&message)
            )
        })
        .chain(evidence_lines(report).into_iter().map(|line| {
            let level = if line.fails { "error" } else { "notice" };
            let mut message = line.text.clone();
            if let Some(chain) = &line.chain {
                message.push_str(&format!("\nprocess chain: {chain}"));
            }
            format!(
                "::{level} title={}::{}",
                escape_property(&format!("guard: {}", line.label.to_lowercase())),
                escape_data(&message)
            )
        }))
        .collect()
}

/// Workflow-command escaping (from the actions/toolkit command format).
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

pub fn mode_word(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CommandExit, Counters};

    fn event(name: &str, verdict: &str, qtype: &str, chain: &[&str]) -> EventRecord {
        EventRecord {
            pid: 7,
            comm: "curl".into(),
            process_chain: chain
                .iter()
                .enumerate()
                .map(|(i, a)| crate::report::chains::ChainLink {
                    pid: i as u32 + 1,
                    argv: a.split(' ').map(String::from).collect(),
                    executable: None,
                })
                .collect(),
            rule: Some(RuleRef {
                kind: "deny".into(),
                pattern: "*.frontend.internal".into(),
                policy: "db <deploy>".into(),
                origin: "p.yaml:3".into(),
            }),
            ..EventRecord::for_test(name, verdict, qtype)
        }
    }

    fn report(events: Vec<EventRecord>) -> Report {
        Report {
            schema: crate::report::SCHEMA.into(),
            guard_version: "0".into(),
            command: vec!["deploy.sh".into()],
            command_exit: CommandExit {
                code: Some(0),
                signal: None,
            },
            exit_code: 77,
            mode: Mode::Enforce,
            fail_on_block: false,
            policies: vec![],
            started_at: "2026-11-22T02:00:00.000Z".into(),
            duration_ms: 1500,
            cgroup: "/x".into(),
            events,
            events_lost: 0,
            events_omitted: 0,
            counters: Counters::default(),
            program_stats: None,
            evidence: vec![],
            evidence_lost: 0,
            hosts_entries: vec![],
            resolver_socket_hooks: "active".into(),
            fault: None,
        }
    }

    #[test]
    fn groups_by_name_and_keeps_distinct_chains() {
        let r = report(vec![
            event(
                "a.frontend.internal",
                "blocked",
                "A",
                &["deploy.sh", "curl a"],
            ),
            event(
                "a.frontend.internal",
                "blocked",
                "AAAA",
                &["deploy.sh", "curl a"],
            ),
            event(
                "b.frontend.internal",
                "blocked",
                "A",
                &["deploy.sh", "wget b"],
            ),
            event(
                "a.frontend.internal",
                "blocked",
                "A",
                &["deploy.sh", "dig a"],
            ),
        ]);
        let g = groups(&r);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].events.len(), 3);
        assert_eq!(g[0].types(), "A, AAAA");
        assert_eq!(g[0].chains(), ["deploy.sh → curl a", "deploy.sh → dig a"]);
    }

    #[test]
    fn junit_escapes_and_counts() {
        let r = report(vec![event(
            "a.frontend.internal",
            "blocked",
            "A",
            &["deploy.sh", "curl <x>&"],
        )]);
        let xml = junit(&r);
        assert!(
            xml.contains("<testsuite name=\"db &lt;deploy&gt;\" tests=\"1\" failures=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("name=\"a.frontend.internal\""), "{xml}");
        assert!(xml.contains("curl &lt;x&gt;&amp;"), "{xml}");
        let empty = junit(&report(vec![]));
        assert!(
            empty.contains("failures=\"0\"") && empty.contains("no DNS lookup blocked"),
            "{empty}"
        );
    }

    #[test]
    fn github_annotations_escape_newlines_and_separators() {
        let r = report(vec![event(
            "a.frontend.internal",
            "blocked",
            "A",
            &["deploy.sh", "curl a"],
        )]);
        let lines = github_annotations(&r);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0]
                .starts_with("::error title=guard%3A DNS lookup of a.frontend.internal blocked::"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("%0Afrom: deploy.sh → curl a"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains('\n'));
    }

    #[test]
    fn markdown_table_escapes_pipes() {
        let r = report(vec![event(
            "a.frontend.internal",
            "blocked",
            "A",
            &["sh -c a|b"],
        )]);
        let md = markdown(&r);
        assert!(md.starts_with("### guard: 1 DNS lookup(s) blocked"), "{md}");
        assert!(md.contains("a\\|b"), "{md}");
    }
}
