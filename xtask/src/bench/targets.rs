//! The headline: every figure issue 14 sets a target for, measured, beside
//! its target, with a pass or fail mark.
use serde_json::{json, Value};

use super::stats::Spread;

/// The figures of the issue's table, in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    StandaloneStartup,
    DaemonStartup,
    DnsQueryKernelTime,
    OtherPacketKernelTime,
    LargePolicyStartup,
    ExecOutside,
}

/// A figure's target: it passes when its median is at most `limit`.
struct Target {
    limit: f64,
    text: &'static str,
    unit: &'static str,
    decimals: usize,
}

impl Figure {
    fn target(self) -> Target {
        let (limit, text, unit, decimals) = match self {
            Figure::StandaloneStartup => (50.0, "≤ 50 ms (stretch 20)", "ms", 1),
            Figure::DaemonStartup => (2.0, "≤ 2 ms", "ms", 2),
            Figure::DnsQueryKernelTime => (250.0, "≤ 250 ns", "ns", 0),
            Figure::OtherPacketKernelTime => (100.0, "≤ 100 ns", "ns", 0),
            Figure::LargePolicyStartup => (200.0, "≤ 200 ms", "ms", 1),
            Figure::ExecOutside => (1.03, "≤ 1.03×", "×", 3),
        };
        Target {
            limit,
            text,
            unit,
            decimals,
        }
    }
}

/// One measured figure; `label` says what exactly was measured.
pub struct Row {
    pub figure: Figure,
    pub label: String,
    pub measured: Spread,
}

impl Row {
    pub fn passes(&self) -> bool {
        self.measured.median <= self.figure.target().limit
    }
}

/// The rows in the issue's order (they are measured in another).
fn in_order(rows: &[Row]) -> Vec<&Row> {
    let mut ordered: Vec<&Row> = rows.iter().collect();
    ordered.sort_by_key(|row| row.figure);
    ordered
}

pub fn markdown(rows: &[Row]) -> String {
    let mut md = String::from(
        "| figure | measured: median (p10–p90) | target | |\n| --- | --- | --- | --- |\n",
    );
    for row in in_order(rows) {
        let target = row.figure.target();
        md += &format!(
            "| {} | {} {} | {} | {} |\n",
            row.label,
            row.measured.text(target.decimals),
            target.unit,
            target.text,
            if row.passes() { "pass" } else { "**FAIL**" }
        );
    }
    md
}

pub fn json(rows: &[Row]) -> Value {
    in_order(rows)
        .iter()
        .map(|row| {
            let target = row.figure.target();
            json!({
                "figure": row.label,
                "unit": target.unit,
                "measured": row.measured.json(),
                "limit": target.limit,
                "target": target.text,
                "pass": row.passes(),
            })
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_issue_and_mark_each_target() {
        let rows = [
            Row {
                figure: Figure::ExecOutside,
                label: "exec".into(),
                measured: Spread::of(&[1.01]),
            },
            Row {
                figure: Figure::StandaloneStartup,
                label: "standalone".into(),
                measured: Spread::of(&[300.0]),
            },
        ];
        let md = markdown(&rows);
        let standalone =
            md.find("| standalone | 300.0 (300.0–300.0) ms | ≤ 50 ms (stretch 20) | **FAIL** |");
        let exec = md.find("| exec | 1.010 (1.010–1.010) × | ≤ 1.03× | pass |");
        assert!(standalone.is_some() && exec.is_some(), "{md}");
        assert!(standalone < exec, "{md}");
        assert_eq!(json(&rows)[1]["pass"], true);
    }
}
