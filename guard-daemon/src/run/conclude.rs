//! The end of a run: the report from what was seen, every output asked for,
//! and guard's exit status.
use std::{
    io::IsTerminal as _,
    os::unix::process::ExitStatusExt as _,
    process::ExitStatus,
    time::{Instant, SystemTime},
};

use super::{
    exit_code_of, outputs::Kind, supervise::RunState, RunOptions, EXIT_BLOCKED, EXIT_GUARD_REMOVED,
    EXIT_OUTPUT_FAILED, EXIT_VERDICT_UNKNOWN,
};
use crate::{
    api::RunTotals,
    policy::{Mode, Policy},
    report::{
        evidence::lost_failing, inventory::Inventory, render, CommandExit, EventRecord, PolicyRef,
        Report, SCHEMA,
    },
};

/// Builds the report from what the run saw and writes every output asked
/// for; returns guard's exit status.
#[allow(clippy::too_many_arguments)]
pub(super) fn conclude(
    options: &RunOptions,
    policies: &[Policy],
    mut state: RunState<'_>,
    status: ExitStatus,
    totals: RunTotals,
    path: &std::path::Path,
    started: Instant,
    started_at: SystemTime,
) -> i32 {
    let RunTotals {
        counters,
        events_lost,
        seen,
        program_stats,
        evidence: counted,
        detached,
        resolver_socket_hooks,
    } = totals;
    state.on_detached(detached);
    let mut counted_by_kind = [0u64; guard_common::evidence::EVIDENCE_SLOTS];
    for (slot, value) in counted_by_kind.iter_mut().zip(counted) {
        *slot = value;
    }
    let evidence_lost = lost_failing(&counted_by_kind, &state.evidence_received);
    let allowed_counts: std::collections::HashMap<(u64, u16), u64> = seen
        .into_iter()
        .map(|(hash, qtype, count)| ((hash, qtype), count))
        .collect();
    let drops = counters.blocked
        + counters.unbound
        + if options.audit {
            0
        } else {
            counters.unreadable
        };
    let reported = counters.audited
        + if options.audit {
            counters.unreadable
        } else {
            0
        };
    let command_code = exit_code_of(status);
    let command: Vec<String> = options
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let started_at = humantime::format_rfc3339_millis(started_at).to_string();
    let (recorded, events): (Vec<EventRecord>, Vec<EventRecord>) = state
        .events
        .into_iter()
        .partition(|e| e.verdict == "allowed");
    let report = Report {
        schema: SCHEMA.into(),
        guard_version: env!("CARGO_PKG_VERSION").into(),
        command: command.clone(),
        command_exit: CommandExit {
            code: status.code(),
            signal: status.signal(),
        },
        exit_code: command_code,
        mode: if options.audit {
            Mode::Audit
        } else {
            Mode::Enforce
        },
        fail_on_block: options.fail_on_block,
        policies: policies
            .iter()
            .map(|p| PolicyRef {
                name: p.name.clone(),
                source: p.source.as_ref().map(|s| s.display().to_string()),
                mode: if options.audit { Mode::Audit } else { p.mode },
            })
            .collect(),
        started_at: started_at.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
        cgroup: path.display().to_string(),
        events,
        events_lost,
        events_omitted: state.omitted,
        counters,
        program_stats,
        evidence: std::mem::take(&mut state.evidence),
        evidence_lost,
        hosts_entries: std::mem::take(&mut state.hosts),
        resolver_socket_hooks,
        fault: state.fault.take(),
    };
    let mut report = report;
    let failing_evidence = render::failing_evidence(&report);
    let blocked = drops > 0 || (options.fail_on_block && reported > 0) || failing_evidence > 0;
    let exit_code = match report.fault.as_ref().map(|f| f.kind.as_str()) {
        // The command was ended by the guard's removal: whatever it saw,
        // the run is not whole.
        Some("guard-removed") => EXIT_GUARD_REMOVED,
        _ if blocked => EXIT_BLOCKED,
        // Nothing known blocked, but nothing known either: never a pass.
        Some("counters-unavailable") => EXIT_VERDICT_UNKNOWN,
        _ => command_code,
    };
    report.exit_code = exit_code;
    let color = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    eprint!("{}", render::text(&report, color));
    if events_lost > 0 {
        eprintln!("guard: warning: {events_lost} events did not fit in the ring buffer and are missing above (counters are exact)");
    }
    if exit_code == EXIT_BLOCKED && (drops > 0 || (options.fail_on_block && reported > 0)) {
        let what = if drops > 0 {
            "blocked"
        } else {
            "would have been blocked (--fail-on-block)"
        };
        eprintln!(
            "guard: exit {EXIT_BLOCKED}: {} DNS lookup(s) {what} (the command itself exited with {command_code})",
            drops.max(reported)
        );
    }
    match exit_code {
        EXIT_GUARD_REMOVED => eprintln!(
            "guard: exit {EXIT_GUARD_REMOVED}: the guard was removed while the command ran, which ended it (it exited with {command_code}); above is what was seen until then"
        ),
        EXIT_VERDICT_UNKNOWN => eprintln!(
            "guard: exit {EXIT_VERDICT_UNKNOWN}: the run's counters could not be read after the daemon went away; no blocked lookup is known, but none can be ruled out"
        ),
        _ => {}
    }
    if failing_evidence > 0 {
        eprintln!(
            "guard: exit {EXIT_BLOCKED}: {failing_evidence} way(s) around the DNS guard (escapes, raw sockets, tampering, hosts entries; listed above) (the command itself exited with {command_code})"
        );
    }
    if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
        for line in render::github_annotations(&report) {
            println!("{line}");
        }
    }
    // The record (for --record and --deps-db) is built once.
    let inventory = options.records_names().then(|| {
        let mut all = recorded;
        all.extend(report.events.iter().cloned());
        Inventory::build(
            command,
            started_at,
            &all,
            &state.qtype_codes,
            &allowed_counts,
        )
    });
    // The files were opened before the command started (run::outputs).
    let written = state.outputs.write_all(|kind| match kind {
        Kind::StepSummary | Kind::SummaryMarkdown => Some(render::markdown(&report)),
        Kind::Junit => Some(render::junit(&report)),
        Kind::Report => {
            Some(serde_json::to_string_pretty(&report).expect("a report serialises") + "\n")
        }
        Kind::Record => inventory.as_ref().map(|inventory| {
            serde_json::to_string_pretty(inventory).expect("a record serialises") + "\n"
        }),
    });
    let mut stored = true;
    if let (Some(inventory), Some((service, location))) = (&inventory, &options.deps) {
        let origin = crate::deps::sources::Origin {
            service: service.clone(),
            host: crate::deps::this_host(),
            run_id: None,
        };
        let run = crate::deps::sources::from_record(inventory, &origin);
        if let Err(e) = crate::deps::ingest_blocking(location, run) {
            eprintln!("guard: storing the run's lookups: {e}");
            stored = false;
        }
    }
    // The command ran: 125 ("not run") would be wrong, and a failing
    // verdict must not turn into another failure.
    if (!written || !stored) && exit_code == command_code {
        eprintln!("guard: exit {EXIT_OUTPUT_FAILED}: an output could not be written (the command itself exited with {command_code})");
        return EXIT_OUTPUT_FAILED;
    }
    exit_code
}
