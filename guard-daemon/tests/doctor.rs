//! `guard doctor` on the real host (in a private mount and network
//! namespace, with the nsswitch.conf and hosts file each case needs).
mod common;

use std::fs;

use common::{Run, Sandbox};

fn doctor(
    sandbox: &Sandbox,
    nsswitch: &str,
    hosts: &str,
    args: &[&str],
) -> (Run, serde_json::Value) {
    let nsswitch_path = sandbox.path("nsswitch.conf");
    let hosts_path = sandbox.path("hosts");
    fs::write(&nsswitch_path, nsswitch).unwrap();
    fs::write(&hosts_path, hosts).unwrap();
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let mut command = sandbox.guard_with_files(
        &[
            (nsswitch_path.as_path(), "/etc/nsswitch.conf"),
            (hosts_path.as_path(), "/etc/hosts"),
        ],
        &all,
    );
    command.env("GUARD_SOCKET", sandbox.path("no-daemon.sock"));
    let run = Run::from(command.output().unwrap());
    let json = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    (run, json)
}

fn weakening(json: &serde_json::Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "weakens")
        .map(|f| {
            format!(
                "{}: {}",
                f["check"].as_str().unwrap(),
                f["detail"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn a_host_that_resolves_only_through_files_and_dns_is_clean() {
    let sandbox = Sandbox::new();
    let (run, json) = doctor(
        &sandbox,
        "hosts: files dns\n",
        "127.0.0.1 localhost\n",
        &["--deny", "frontend.internal"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(json["weakened"], false);
    let checks: Vec<&str> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    for check in [
        "kernel",
        "BTF",
        "resolver-socket hooks",
        "tracepoints",
        "BPF_PROG_TEST_RUN",
        "resolv.conf",
        "IPsec",
        "daemon",
    ] {
        assert!(checks.contains(&check), "{check} missing: {json:#}");
    }
    // This kernel runs cgroup_skb programs on test packets (the probe
    // returns 1 through aya's test run).
    let test_run = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "BPF_PROG_TEST_RUN")
        .unwrap();
    assert_eq!(test_run["status"], "ok", "{test_run:#}");
}

#[test]
fn findings_name_what_weakens_the_guard_and_what_to_do() {
    let sandbox = Sandbox::new();
    let (run, json) = doctor(
        &sandbox,
        "hosts: files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns\n",
        "127.0.0.1 localhost\n192.0.2.7 api.frontend.internal\n",
        &["--deny", "*.frontend.internal", "--dns-port", "5353"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    let weak = weakening(&json);
    assert!(
        weak.iter()
            .any(|w| w.starts_with("nsswitch hosts: mdns4_minimal")),
        "{weak:#?}"
    );
    assert!(
        weak.iter()
            .any(|w| w.contains("/etc/hosts:2: api.frontend.internal → 192.0.2.7")),
        "{weak:#?}"
    );
    assert!(
        weak.iter()
            .any(|w| w.starts_with("resolv.conf:") && w.contains("5353")),
        "{weak:#?}"
    );
    // nss-resolve is covered on this kernel: information, not a weakness.
    let resolve = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["detail"].as_str().unwrap().contains("nss-resolve"))
        .expect("a finding about nss-resolve");
    assert_eq!(resolve["status"], "info", "{resolve:#}");
    // The sandbox's own DNS servers listen on port 53.
    assert!(
        json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "local resolvers" && f["status"] == "info"),
        "{json:#}"
    );
    for finding in json["findings"].as_array().unwrap() {
        if finding["status"] == "weakens" {
            assert!(finding["advice"].is_string(), "advice for {finding:#}");
        }
    }
    // Text for people says the same.
    let text = Run::from(
        sandbox
            .guard_with_files(&[], &["doctor", "--dns-port", "5353"])
            .env("GUARD_SOCKET", sandbox.path("no-daemon.sock"))
            .output()
            .unwrap(),
    );
    assert_eq!(text.code, 1, "{text:?}");
    assert!(text.stdout.contains("WEAKENS resolv.conf"), "{text:?}");
}
