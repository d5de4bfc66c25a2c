//! Wall time of short commands, and where a standalone `guard run`'s time
//! goes, read from the steps guard logs at debug level.
//!
//! guard logs a line as each set-up and tear-down step ends
//! (`GUARD_LOG=guard_daemon=debug`); a step's time is the gap between its
//! line's timestamp and the one before. The first step starts when the
//! bench starts guard and the last ends when guard has exited, so the steps
//! add up to the wall time whatever lines guard logs.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::stats::Spread;

/// Wall time of one run of `command`, in milliseconds; it must succeed.
pub fn wall_ms(command: &mut Command) -> Result<f64> {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let start = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(elapsed)
}

/// Wall time and CPU time (user + system, of the command and every
/// process it waited for) of one run of `command`, in milliseconds; it
/// must succeed. CPU time is what work costs even when, on a busy machine,
/// it waits its turn for a CPU.
pub fn wall_and_cpu_ms(command: &mut Command) -> Result<(f64, f64)> {
    let before = children_cpu_ms()?;
    let wall = wall_ms(command)?;
    Ok((wall, children_cpu_ms()? - before))
}

/// CPU time of this process's waited-for descendants so far.
fn children_cpu_ms() -> Result<f64> {
    // SAFETY: getrusage(2) fills the struct we pass; all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let ms = |time: libc::timeval| time.tv_sec as f64 * 1000.0 + time.tv_usec as f64 / 1000.0;
    Ok(ms(usage.ru_utime) + ms(usage.ru_stime))
}

/// One step of a run: what ended it, how long it took, and for a program's
/// verification the instructions the verifier processed.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub ms: f64,
    pub instructions: Option<u64>,
}

/// One timed `guard run`, and its steps in order.
pub struct TimedRun {
    pub wall_ms: f64,
    pub steps: Vec<Step>,
}

/// The first step: from the bench starting guard to guard's first line.
const FIRST_STEP: &str = "until the first logged step (exec, options, policies, reaper)";
/// The last: from guard's last line to its exit as the bench sees it.
const LAST_STEP: &str = "after the last logged step, until guard has exited";

/// Runs `command` (a `guard run`) with its set-up steps logged to `log`,
/// and times each step. The run ends when guard exits (not when every
/// holder of its stderr has let go: clean-up guard leaves to another
/// process is not the user's wait).
pub fn timed_run(command: &mut Command, log: &Path) -> Result<TimedRun> {
    command
        .env("GUARD_LOG", "guard_daemon=debug")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?);
    let started = SystemTime::now();
    let clock = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    let wall = clock.elapsed();
    let log = fs::read_to_string(log)?;
    if !status.success() {
        bail!("{command:?} failed ({status}): {log}");
    }
    Ok(TimedRun {
        wall_ms: wall.as_secs_f64() * 1000.0,
        steps: steps(&log, seconds_of_day(started), wall.as_secs_f64()),
    })
}

/// UTC seconds since midnight, the part of tracing's RFC 3339 timestamps
/// the steps need (a run that spans midnight wraps, see `steps`).
fn seconds_of_day(time: SystemTime) -> f64 {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since_epoch.as_secs() % 86_400) as f64 + f64::from(since_epoch.subsec_nanos()) / 1e9
}

/// A debug line of tracing's default format, such as
/// `2026-12-02T12:15:31.123456Z DEBUG guard_daemon::kernel::hooks: verified program="dns_egress" elapsed=46.5ms instructions=Some(14479)`:
/// its time (seconds of day) and step, named by the message and the
/// values of its quoted fields (`verified dns_egress`).
fn logged_step(line: &str) -> Option<(f64, Step)> {
    let (timestamp, rest) = line.split_once(' ')?;
    let (level, rest) = rest.trim_start().split_once(' ')?;
    if level != "DEBUG" {
        return None;
    }
    let (_target, text) = rest.split_once(": ")?;
    let clock = timestamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (hours, minutes, seconds): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    let mut name: Vec<&str> = Vec::new();
    let mut instructions = None;
    for word in text.split(' ') {
        match word.split_once('=') {
            None => name.push(word),
            Some(("instructions", value)) => {
                let value = value.trim_start_matches("Some(").trim_end_matches(')');
                instructions = value.parse().ok();
            }
            Some((_, value)) if value.len() > 1 && value.starts_with('"') => {
                name.push(value.trim_matches('"'));
            }
            // Timings and counts: not part of what the step is.
            Some(_) => {}
        }
    }
    let step = Step {
        name: name.join(" "),
        ms: 0.0,
        instructions,
    };
    Some((hours * 3600.0 + minutes * 60.0 + seconds, step))
}

/// The steps of a run that started at `start` (seconds of day) and took
/// `wall` seconds, from its log.
fn steps(log: &str, start: f64, wall: f64) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut previous = 0.0;
    for (at, mut step) in log.lines().filter_map(logged_step) {
        let offset = (at - start).rem_euclid(86_400.0).min(wall);
        if steps.is_empty() {
            step.name = format!("{FIRST_STEP}; then {}", step.name);
        }
        step.ms = (offset - previous).max(0.0) * 1000.0;
        steps.push(step);
        previous = offset;
    }
    steps.push(Step {
        name: LAST_STEP.to_string(),
        ms: (wall - previous).max(0.0) * 1000.0,
        instructions: None,
    });
    steps
}

/// A step's spread over many runs.
pub struct StepSpread {
    pub name: String,
    pub ms: Spread,
    pub instructions: Option<u64>,
}

/// Each step's spread over many runs (a step that happens more than once
/// in a run counts as their sum), in the order of the first run.
pub fn breakdown(runs: &[TimedRun]) -> Vec<StepSpread> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    let mut spreads: Vec<StepSpread> = Vec::new();
    for step in &first.steps {
        if spreads.iter().any(|spread| spread.name == step.name) {
            continue;
        }
        let samples: Vec<f64> = runs
            .iter()
            .map(|run| {
                run.steps
                    .iter()
                    .filter(|other| other.name == step.name)
                    .map(|other| other.ms)
                    .sum()
            })
            .collect();
        spreads.push(StepSpread {
            name: step.name.clone(),
            ms: Spread::of(&samples),
            instructions: step.instructions,
        });
    }
    spreads
}

/// A table of steps, one column of spreads per breakdown (a step one of
/// them lacks is shown as "—"), and the verifier's instructions where
/// guard logged them.
pub fn breakdown_markdown(columns: &[(&str, &[StepSpread])]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for (_, steps) in columns {
        for step in steps.iter() {
            if !names.contains(&step.name.as_str()) {
                names.push(&step.name);
            }
        }
    }
    let mut md = String::from("| step (ends at guard's debug line) |");
    for (title, _) in columns {
        md += &format!(" {title}, ms: median (p10–p90) |");
    }
    md += &format!(
        " instructions verified |\n| --- |{} --- |\n",
        " --- |".repeat(columns.len())
    );
    for name in names {
        md += &format!("| {name} |");
        let mut instructions = None;
        for (_, steps) in columns {
            let step = steps.iter().find(|step| step.name == name);
            instructions = instructions.or(step.and_then(|step| step.instructions));
            let cell = step.map_or("—".to_string(), |step| step.ms.text(1));
            md += &format!(" {cell} |");
        }
        let instructions = instructions.map_or(String::new(), |n| n.to_string());
        md += &format!(" {instructions} |\n");
    }
    md
}

pub fn breakdown_json(steps: &[StepSpread]) -> Value {
    steps
        .iter()
        .map(|step| json!({"step": step.name, "ms": step.ms.json(), "instructions": step.instructions}))
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_to_the_wall_time() {
        let log = "\
2026-12-02T12:00:00.010000Z DEBUG guard_daemon::run::standalone: cgroup created elapsed=1ms
2026-12-02T12:00:00.015000Z  WARN guard_daemon::run: something else
2026-12-02T12:00:00.100000Z DEBUG guard_daemon::kernel::hooks: verified program=\"dns_egress\" elapsed=90ms instructions=Some(14479)
2026-12-02T12:00:00.200000Z DEBUG guard_daemon::kernel::programs: Unix-socket hooks verified elapsed=190ms unix_hooks=true
";
        let steps = steps(log, 43_200.0, 0.25);
        let names: Vec<&str> = steps.iter().map(|step| step.name.as_str()).collect();
        assert_eq!(
            names,
            [
                &format!("{FIRST_STEP}; then cgroup created"),
                "verified dns_egress",
                "Unix-socket hooks verified",
                LAST_STEP
            ]
        );
        let total: f64 = steps.iter().map(|step| step.ms).sum();
        assert!((total - 250.0).abs() < 1e-6, "{steps:?}");
        assert!((steps[1].ms - 90.0).abs() < 1e-6, "{steps:?}");
        assert_eq!(steps[1].instructions, Some(14479));
        assert_eq!(steps[2].instructions, None);
    }

    #[test]
    fn breakdowns_side_by_side_mark_missing_steps() {
        let step = |name: &str, ms: f64, instructions: Option<u64>| StepSpread {
            name: name.into(),
            ms: Spread::of(&[ms]),
            instructions,
        };
        let without = [step("cgroup created", 1.0, None)];
        let with = [
            step("cgroup created", 2.0, None),
            step("verified dns_egress", 30.0, Some(14479)),
        ];
        let md = breakdown_markdown(&[("no policy", &without), ("big", &with)]);
        assert!(
            md.contains("| cgroup created | 1.0 (1.0–1.0) | 2.0 (2.0–2.0) |  |"),
            "{md}"
        );
        assert!(
            md.contains("| verified dns_egress | — | 30.0 (30.0–30.0) | 14479 |"),
            "{md}"
        );
    }

    #[test]
    fn a_step_repeated_in_a_run_counts_once_as_the_sum() {
        let run = |ms: [f64; 2]| TimedRun {
            wall_ms: 0.0,
            steps: ms
                .iter()
                .map(|&ms| Step {
                    name: "verified".into(),
                    ms,
                    instructions: None,
                })
                .collect(),
        };
        let spreads = breakdown(&[run([1.0, 2.0]), run([3.0, 4.0])]);
        assert_eq!(spreads.len(), 1);
        assert_eq!(spreads[0].ms.median, 5.0);
    }

    #[test]
    fn a_run_across_midnight_keeps_its_order() {
        let log = "2026-12-03T00:00:00.010000Z DEBUG guard_daemon::run: cgroup created\n";
        let steps = steps(log, 86_399.995, 0.1);
        assert!((steps[0].ms - 15.0).abs() < 1e-6, "{steps:?}");
    }
}
