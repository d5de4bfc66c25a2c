//! Answers judged: an answer that would have the client use a denied name
//! (an alias to it, a DNAME renaming into it, a service, mail or SVCB
//! record naming it, an address record owned by it) is refused and reported
//! with the way there, over UDP and TCP, IPv4 and IPv6; an answer leading
//! only to allowed names goes through; one the kernel cannot read is
//! refused and reported.
mod common;

use std::fs;

use common::{dns_query, guarded, guarded_with, saw, Run, Sandbox, SERVERS};

/// Names of the test zone (guard-testkit's `ALIASES`) whose answers lead to
/// a denied name: (name, type asked, the denied name, the record that names
/// it, the way from the question to it).
const LEADING_TO_DENIED: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "db-lb.internal",
        "A",
        "frontend.internal",
        "CNAME",
        &["db-lb.internal", "frontend.internal"],
    ),
    (
        "chain.internal",
        "A",
        "api.frontend.internal",
        "CNAME",
        &["chain.internal", "hop.internal", "api.frontend.internal"],
    ),
    ("x.legacy.internal", "A", "frontend.internal", "DNAME", &[]),
    ("_db._tcp.internal", "SRV", "frontend.internal", "SRV", &[]),
    ("mail.internal", "MX", "frontend.internal", "MX", &[]),
    ("web.internal", "HTTPS", "frontend.internal", "HTTPS", &[]),
    ("svc.internal", "SVCB", "frontend.internal", "SVCB", &[]),
    ("glue.internal", "A", "frontend.internal", "A", &[]),
];

/// The one event of a refused answer, checked against the table row.
fn assert_answer_refused(
    sandbox: &Sandbox,
    run: &Run,
    report: &serde_json::Value,
    (name, qtype, matched, record, chain): (&str, &str, &str, &str, &[&str]),
    transport: &str,
) {
    let what = format!("{name} {qtype} over {transport}");
    assert_eq!(run.code, 77, "{what}: {run:?}");
    // The question was allowed: the server answered it.
    assert!(saw(sandbox, name), "{what}: {run:?}");
    assert!(
        !run.stdout.contains("answer "),
        "{what}: the client got an answer: {run:?}"
    );
    let events = report["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{what}: {report:#}");
    let event = &events[0];
    assert_eq!(event["verdict"], "blocked", "{what}: {report:#}");
    assert_eq!(event["direction"], "answer", "{what}: {report:#}");
    assert_eq!(event["name"], name, "{what}: {report:#}");
    assert_eq!(event["query_type"], qtype, "{what}: {report:#}");
    assert_eq!(event["matched_name"], matched, "{what}: {report:#}");
    assert_eq!(event["record_type"], record, "{what}: {report:#}");
    assert_eq!(event["transport"], transport, "{what}: {report:#}");
    if !chain.is_empty() {
        assert_eq!(
            event["alias_chain"],
            serde_json::json!(chain),
            "{what}: {report:#}"
        );
    }
    // The asker is known even though the answer came in on no process's
    // behalf.
    assert_eq!(event["comm"], "guard-dns-query", "{what}: {report:#}");
    assert!(event["pid"].as_u64().unwrap() > 0, "{what}: {report:#}");
    assert_eq!(report["counters"]["blocked"], 1, "{what}: {report:#}");
}

#[test]
fn answers_leading_to_a_denied_name_are_refused() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for &row in LEADING_TO_DENIED {
        let (name, qtype, ..) = row;
        for server in SERVERS {
            // A refused UDP answer is dropped (and the socket ended, so the
            // client does not wait out its timeout). Over TCP it gets
            // REFUSED.
            let (run, report) =
                guarded(&sandbox, &[&client, "--timeout", "1", server, name, qtype]);
            assert_answer_refused(&sandbox, &run, &report, row, "udp");
            let (run, report) = guarded(&sandbox, &[&client, "--tcp", server, name, qtype]);
            assert_answer_refused(&sandbox, &run, &report, row, "tcp");
            assert!(
                run.stdout.contains("REFUSED") || run.stdout.contains("Refused"),
                "{run:?}"
            );
        }
    }
}

#[test]
fn answers_in_pieces_are_put_together_and_judged() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        let row = (
            "split-answer-alias.internal",
            "A",
            "frontend.internal",
            "CNAME",
            &["split-answer-alias.internal", "frontend.internal"][..],
        );
        let (run, report) = guarded(&sandbox, &[&client, "--tcp", server, row.0]);
        assert_answer_refused(&sandbox, &run, &report, row, "tcp");
        // Allowed answers in pieces, alone and behind pipelined ones of
        // other lengths.
        let names = "p.internal,split-answer-ok.internal,longer-name-here.internal";
        let (run, report) = guarded(&sandbox, &[&client, "--tcp", server, names]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(run.stdout.matches("192.0.2.1").count(), 3, "{run:?}");
        assert_eq!(report["counters"]["answers_inspected"], 3, "{report:#}");
    }
}

#[test]
fn answers_leading_only_to_allowed_names_go_through() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        for (name, qtype) in [("ok-alias.internal", "A"), ("_ok._tcp.internal", "SRV")] {
            for tcp in [false, true] {
                let mut command = vec![client.as_str()];
                if tcp {
                    command.push("--tcp");
                }
                command.extend([server, name, qtype]);
                let (run, report) = guarded(&sandbox, &command);
                assert_eq!(run.code, 0, "{name}: {run:?}");
                assert!(run.stdout.contains("db.internal") || run.stdout.contains("192.0.2.1"));
                assert_eq!(report["events"].as_array().unwrap().len(), 0, "{report:#}");
                assert!(report["counters"]["answers_inspected"].as_u64().unwrap() >= 1);
            }
        }
    }
    // An allow carves the alias target out of the broader deny; the apex
    // is not under `*.frontend.internal`.
    let policy = [
        "--deny",
        "*.frontend.internal",
        "--allow",
        "api.frontend.internal",
    ];
    for name in ["chain.internal", "db-lb.internal"] {
        let (run, report) = guarded_with(&sandbox, &policy, &[&client, "--tcp", SERVERS[0], name]);
        assert_eq!(run.code, 0, "{name}: {run:?}");
        assert_eq!(report["counters"]["blocked"], 0, "{report:#}");
    }
}

#[test]
fn audit_mode_reports_answers_and_lets_them_through() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let policy = ["--audit", "--deny", "frontend.internal"];
    for tcp in [false, true] {
        let mut command = vec![client.as_str()];
        if tcp {
            command.push("--tcp");
        }
        command.extend([SERVERS[0], "db-lb.internal"]);
        let (run, report) = guarded_with(&sandbox, &policy, &command);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("192.0.2.1"), "{run:?}");
        let event = &report["events"][0];
        assert_eq!(event["verdict"], "audited", "{report:#}");
        assert_eq!(event["direction"], "answer", "{report:#}");
        assert_eq!(event["matched_name"], "frontend.internal", "{report:#}");
    }
}

#[test]
fn unreadable_answers_are_refused_and_reported() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        for tcp in [false, true] {
            let mut command = vec![client.as_str(), "--timeout", "1"];
            if tcp {
                command.push("--tcp");
            }
            command.extend([server, "loop-answer.internal"]);
            let (run, report) = guarded(&sandbox, &command);
            assert_eq!(run.code, 77, "{run:?}");
            assert!(!run.stdout.contains("answer "), "{run:?}");
            assert_eq!(report["counters"]["unreadable"], 1, "{report:#}");
            let event = &report["events"][0];
            assert_eq!(event["verdict"], "unreadable-blocked", "{report:#}");
            assert_eq!(event["direction"], "answer", "{report:#}");
            assert!(event["reason"].is_string(), "{report:#}");
        }
    }
}

/// Real clients meet the refusal as they would a server's: glibc's
/// resolver over UDP and TCP, dig and Python.
#[test]
fn real_clients_get_no_address_through_an_alias() {
    let sandbox = Sandbox::new();
    // glibc over UDP (the refused answer never arrives) and over TCP.
    for options in ["", "use-vc "] {
        fs::write(
            sandbox.path("resolv.conf"),
            format!("nameserver 127.0.0.1\noptions {options}attempts:1 timeout:1\n"),
        )
        .unwrap();
        let (run, report) = guarded(&sandbox, &["getent", "hosts", "db-lb.internal"]);
        assert_eq!(run.code, 77, "{options}: {run:?}");
        assert!(!run.stdout.contains("192.0.2.1"), "{run:?}");
        let event = &report["events"][0];
        assert_eq!(event["direction"], "answer", "{report:#}");
        assert_eq!(event["comm"], "getent", "{report:#}");
        let (run, _) = guarded(&sandbox, &["getent", "hosts", "ok-alias.internal"]);
        assert_eq!(run.code, 0, "{options}: {run:?}");
        assert!(run.stdout.contains("ok-alias.internal"), "{run:?}");
    }
    for server in ["127.0.0.1", "::1"] {
        let at = format!("@{server}");
        let (run, _) = guarded(
            &sandbox,
            &["dig", "+tcp", "+tries=1", "+time=3", &at, "chain.internal"],
        );
        assert_eq!(run.code, 77, "{run:?}");
        assert!(run.stdout.contains("status: REFUSED"), "{run:?}");
        let (run, _) = guarded(
            &sandbox,
            &[
                "/usr/bin/python3",
                "-c",
                PYTHON_UDP,
                server,
                "mail.internal",
            ],
        );
        assert_eq!(run.code, 77, "{run:?}");
        assert!(run.stdout.starts_with("failed"), "{run:?}");
    }
}

/// A dropped answer leaves a UDP client waiting; guard ends the socket of
/// a refused lookup, so the wait ends at once (or times out).
const PYTHON_UDP: &str = "import sys, dns.message, dns.query\n\
q = dns.message.make_query(sys.argv[2], 'MX')\n\
try:\n    print(dns.query.udp(q, sys.argv[1], timeout=1).answer)\n\
except Exception as e:\n    print('failed', repr(e))\n";
