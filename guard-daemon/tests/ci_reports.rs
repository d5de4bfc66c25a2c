//! What CI systems and people read after a guarded run: JUnit XML (checked
//! against a JUnit XSD with xmllint), GitHub Actions annotations and step
//! summary, the JSON report (checked against its JSON Schema), re-rendering
//! a saved report, process chains, and the `--record` inventory.
mod common;

use std::{fs, path::Path, process::Command};

use common::{dns_query, report, validate_report, Sandbox, GUARD};

fn schema_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas"))
}

fn validate_junit(path: &Path) {
    let output = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(schema_dir().join("junit.xsd"))
        .arg(path)
        .output()
        .expect("xmllint (cargo xtask setup installs libxml2-utils)");
    assert!(
        output.status.success(),
        "{} does not validate: {}\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr),
        fs::read_to_string(path).unwrap_or_default()
    );
}

const POLICY: &str = "name: db-deploy\ndeny:\n  - frontend.internal\n  - \"*.frontend.internal\"\n";

#[test]
fn junit_lists_each_blocked_name_once_and_validates() {
    let sandbox = Sandbox::new();
    let policy = sandbox.path("policy.yaml");
    fs::write(&policy, POLICY).unwrap();
    let client = dns_query();
    let junit = sandbox.path("junit.xml");
    let script = format!(
        "{c} 127.0.0.1:53 frontend.internal; {c} 127.0.0.1:53 frontend.internal AAAA; {c} 127.0.0.1:53 api.frontend.internal; {c} 127.0.0.1:53 db.internal",
        c = client
    );
    let run = sandbox.run(&[
        "run",
        "-q",
        "-p",
        policy.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    validate_junit(&junit);
    let xml = fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<testcase ").count(), 2, "{xml}");
    assert_eq!(xml.matches("<failure ").count(), 2, "{xml}");
    assert!(
        xml.contains("<testsuite name=\"db-deploy\" tests=\"2\" failures=\"2\""),
        "{xml}"
    );
    assert!(xml.contains("name=\"frontend.internal\""), "{xml}");
    assert!(
        xml.contains(
            "DNS lookup of frontend.internal blocked ×2 (A, AAAA) by rule deny frontend.internal"
        ),
        "{xml}"
    );
    assert!(xml.contains("process chain: sh -c"), "{xml}");

    // Nothing blocked: one passing case, still valid.
    let clean = sandbox.path("clean.xml");
    let run = sandbox.run(&[
        "run",
        "-q",
        "-p",
        policy.to_str().unwrap(),
        "--junit",
        clean.to_str().unwrap(),
        "--",
        &client,
        "127.0.0.1:53",
        "db.internal",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    validate_junit(&clean);
    let xml = fs::read_to_string(&clean).unwrap();
    assert!(
        xml.contains("failures=\"0\"") && xml.contains("no DNS lookup blocked"),
        "{xml}"
    );
}

#[test]
fn github_actions_get_annotations_and_a_step_summary() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let summary = sandbox.path("step-summary.md");
    fs::write(&summary, "earlier step output\n").unwrap();
    let script = format!(
        "{c} 127.0.0.1:53 frontend.internal; {c} 127.0.0.1:53 b.frontend.internal",
        c = client
    );
    let output = sandbox
        .guard(&[
            "run",
            "-q",
            "--deny",
            "frontend.internal",
            "--deny",
            "*.frontend.internal",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .output()
        .unwrap();
    let run = common::Run::from(output);
    assert_eq!(run.code, 77, "{run:?}");
    let annotations: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("::error "))
        .collect();
    assert_eq!(annotations.len(), 2, "{run:?}");
    assert!(annotations[0].starts_with("::error title=guard%3A DNS lookup of frontend.internal blocked::frontend.internal ×1 (A) by rule deny frontend.internal"), "{}", annotations[0]);
    assert!(
        annotations[1].contains("b.frontend.internal"),
        "{}",
        annotations[1]
    );
    let markdown = fs::read_to_string(&summary).unwrap();
    assert!(
        markdown.starts_with("earlier step output\n### guard: 2 DNS lookup(s) blocked"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| BLOCKED | `b.frontend.internal` | A | 1 |"),
        "{markdown}"
    );

    // Elsewhere: the same markdown on request, no workflow commands.
    let file = sandbox.path("summary.md");
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--summary-markdown",
        file.to_str().unwrap(),
        "--",
        &client,
        "127.0.0.1:53",
        "frontend.internal",
    ]);
    assert_eq!(run.code, 77);
    assert!(!run.stdout.contains("::error"), "{run:?}");
    assert!(fs::read_to_string(&file)
        .unwrap()
        .contains("| BLOCKED | `frontend.internal` |"));
}

#[test]
fn json_reports_match_the_schema_and_render_again() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let policy = sandbox.path("policy.yaml");
    fs::write(&policy, POLICY).unwrap();
    // Blocked, audited and unreadable queries, over UDP and TCP.
    let script = format!(
        "{c} 127.0.0.1:53 frontend.internal; {c} --tcp 127.0.0.1:53 api.frontend.internal; printf 'not dns' > /dev/udp/127.0.0.1/53; true",
        c = client
    );
    for mode in [&[][..], &["--audit"][..]] {
        let json = sandbox.path("report.json");
        let junit = sandbox.path("junit.xml");
        let markdown = sandbox.path("summary.md");
        let mut args = vec![
            "run",
            "-q",
            "-p",
            policy.to_str().unwrap(),
            "--report",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(&[
            "--junit",
            junit.to_str().unwrap(),
            "--summary-markdown",
            markdown.to_str().unwrap(),
        ]);
        args.extend_from_slice(mode);
        args.extend_from_slice(&["--", "bash", "-c", &script]);
        let run = sandbox.run(&args);
        assert_eq!(run.code, if mode.is_empty() { 77 } else { 0 }, "{run:?}");
        let value = report(&json);
        validate_report(&value);
        let verdicts: Vec<&str> = value["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["verdict"].as_str().unwrap())
            .collect();
        let expected = if mode.is_empty() {
            ["blocked", "blocked", "unreadable-blocked"]
        } else {
            ["audited", "audited", "unreadable-audited"]
        };
        assert_eq!(verdicts, expected, "{value:#}");

        // `guard report` renders the saved report exactly as the run did.
        let render = |format: &str| {
            let output = Command::new(GUARD)
                .args(["report", json.to_str().unwrap(), "--format", format])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        };
        assert_eq!(render("junit"), fs::read_to_string(&junit).unwrap());
        assert_eq!(render("markdown"), fs::read_to_string(&markdown).unwrap());
        let text = render("text");
        assert!(text.contains("frontend.internal"), "{text}");
        assert!(
            run.stderr.contains(text.lines().nth(1).unwrap()),
            "text matches the run's summary"
        );
    }
    let bad = sandbox.path("bad.json");
    fs::write(&bad, "{\"schema\": \"other/9\"}").unwrap();
    let output = Command::new(GUARD)
        .args(["report", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.json: not a guard report"));
}

#[test]
fn chain_three_deep_survives_the_middle_process_exiting_first() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let json = sandbox.path("report.json");
    let marker = sandbox.path("middle-exited");
    // deploy (A) runs drain (B), which starts the lookup in the background
    // (C) and exits at once; C looks up only after B is gone.
    let middle = format!("( while kill -0 $$ 2>/dev/null; do sleep 0.05; done; touch {m}; exec {client} 127.0.0.1:53 frontend.internal ) & exit 0", m = marker.display());
    let script = format!(
        "sh -c '{middle}'; while [ ! -e {m} ]; do sleep 0.05; done; sleep 1",
        m = marker.display()
    );
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--report",
        json.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    let value = report(&json);
    let chain = value["events"][0]["process_chain"].as_array().unwrap();
    // B's background subshell execs the client, so it is the third link.
    assert_eq!(chain.len(), 3, "A, B, the client: {value:#}");
    assert!(
        chain[0]["argv"][2]
            .as_str()
            .unwrap()
            .starts_with("sh -c '("),
        "A: {value:#}"
    );
    assert!(
        chain[1]["argv"][2]
            .as_str()
            .unwrap()
            .starts_with("( while kill"),
        "B, exited before the lookup: {value:#}"
    );
    assert_eq!(chain[2]["argv"][0].as_str().unwrap(), client);
    assert_eq!(chain[2]["argv"][2], "frontend.internal");
    assert!(chain[2]["executable"]
        .as_str()
        .unwrap()
        .ends_with("guard-dns-query"));
    assert!(marker.exists(), "the lookup came after B had exited");
}

#[test]
fn a_resolver_inside_the_cgroup_does_not_take_the_blame() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let stub = Path::new(GUARD).with_file_name("guard-dns-stub");
    let json = sandbox.path("report.json");
    // A local resolver started by the deploy itself, in the same cgroup.
    let script = format!(
        "{stub} 127.0.0.2:53 20 2>/dev/null & sleep 0.5; {client} 127.0.0.2:53 db.internal && {client} 127.0.0.2:53 frontend.internal; kill %1",
        stub = stub.display()
    );
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--report",
        json.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stdout.contains("answer db.internal"), "{run:?}");
    let value = report(&json);
    let events = value["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{value:#}");
    assert_eq!(events[0]["resolver"], "127.0.0.2:53");
    let last = events[0]["process_chain"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["argv"][0].as_str().unwrap(),
        client,
        "attributed to the sender: {value:#}"
    );
}

#[test]
fn record_lists_two_hundred_names_once_each_and_suggests_a_policy() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let record = sandbox.path("record.json");
    // 200 distinct names, one process each; n1 is asked three times.
    let script = format!(
        "for i in $(seq 1 200); do {c} 127.0.0.1:53 n$i.svc.internal >/dev/null || exit 9; done; \
         {c} --repeat 2 127.0.0.1:53 n1.svc.internal >/dev/null; {c} 127.0.0.1:53 frontend.internal; true",
        c = client
    );
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--record",
        record.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    let value: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(value["schema"], "guard.record/1");
    let names = value["names"].as_array().unwrap();
    let svc: Vec<&serde_json::Value> = names
        .iter()
        .filter(|n| n["name"].as_str().unwrap().ends_with(".svc.internal"))
        .collect();
    assert_eq!(svc.len(), 200, "each name once");
    for entry in &svc {
        let name = entry["name"].as_str().unwrap();
        let chain = entry["process_chain"].as_array().unwrap();
        assert_eq!(
            chain.last().unwrap()["argv"][2].as_str().unwrap(),
            name,
            "the asking process: {entry}"
        );
        assert_eq!(chain[0]["argv"][0], "sh");
        assert_eq!(entry["verdict"], "allowed");
        let expected = if name == "n1.svc.internal" { 3 } else { 1 };
        assert_eq!(entry["queries"], expected, "{entry}");
        assert_eq!(entry["query_types"]["A"], expected, "{entry}");
    }
    let blocked = names
        .iter()
        .find(|n| n["name"] == "frontend.internal")
        .expect("blocked names are recorded too");
    assert_eq!(blocked["verdict"], "blocked");

    let output = Command::new(GUARD)
        .args([
            "policy",
            "suggest",
            record.to_str().unwrap(),
            "--name",
            "db-deploy",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let yaml = String::from_utf8(output.stdout).unwrap();
    assert!(yaml.contains("#  - n1.svc.internal"), "{yaml}");
    assert!(
        yaml.contains("#  - \"*.svc.internal\"  # 200 names"),
        "{yaml}"
    );
    assert!(
        yaml.contains("  - \"frontend.internal\"  # matched during the recorded run"),
        "{yaml}"
    );
    let suggested = sandbox.path("suggested.yaml");
    fs::write(&suggested, &yaml).unwrap();
    let check = Command::new(GUARD)
        .args(["policy", "check", suggested.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn fail_on_block_fails_audit_runs_that_would_have_blocked() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let base = ["run", "-q", "--audit", "--deny", "frontend.internal"];
    let run = sandbox.run(
        &[
            &base[..],
            &["--", &client, "127.0.0.1:53", "frontend.internal"],
        ]
        .concat(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let run = sandbox.run(
        &[
            &base[..],
            &[
                "--fail-on-block",
                "--",
                &client,
                "127.0.0.1:53",
                "frontend.internal",
            ],
        ]
        .concat(),
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(
        run.stdout.contains("answer frontend.internal"),
        "audit still resolves: {run:?}"
    );
    assert!(
        run.stderr
            .contains("would have been blocked (--fail-on-block)"),
        "{run:?}"
    );
    let run = sandbox.run(
        &[
            &base[..],
            &[
                "--fail-on-block",
                "--",
                &client,
                "127.0.0.1:53",
                "db.internal",
            ],
        ]
        .concat(),
    );
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let command = |no_color: Option<&str>| {
        // script(1) gives guard a real terminal.
        let inner = format!(
            "{GUARD} run -q --deny frontend.internal -- {client} 127.0.0.1:53 frontend.internal"
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec script -qec \"$1\" /dev/null")
            .arg(sandbox.path("resolv.conf"))
            .arg(inner);
        command.env_remove("NO_COLOR");
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        common::Run::from(command.output().unwrap())
    };
    let on_terminal = command(None);
    assert!(
        on_terminal.stdout.contains("\x1b[1;31mBLOCKED\x1b[0m"),
        "{on_terminal:?}"
    );
    let no_color = command(Some("1"));
    assert!(
        no_color.stdout.contains("BLOCKED") && !no_color.stdout.contains('\x1b'),
        "{no_color:?}"
    );
    let piped = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--",
        &client,
        "127.0.0.1:53",
        "frontend.internal",
    ]);
    assert!(
        piped.stderr.contains("BLOCKED") && !piped.stderr.contains('\x1b'),
        "{piped:?}"
    );
}
