//! Every query seen: DNS over TCP judged as whole messages whatever the
//! write pattern, every datagram of a UDP GSO send judged, and real clients
//! (dig, kdig, glibc's use-vc, dnspython, Go) refused and answered as they
//! should be, over IPv4 and IPv6. A refused query never reaches the server;
//! an allowed one is never refused.
mod common;

use std::{fs, process::Command};

use common::{assert_answered, assert_refused, dns_query, guarded, report, saw, Sandbox, SERVERS};

#[test]
fn tcp_queries_written_in_any_pieces_are_judged_whole() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    // The framed query is a 2-byte length, a 12-byte header, then the name:
    // the prefix alone, a byte at a time at the start, the header cut, the
    // name cut, and three writes.
    for split in ["2", "1", "1,2", "13", "20", "2,5,20"] {
        for server in SERVERS {
            let (run, report) = guarded(
                &sandbox,
                &[
                    &client,
                    "--tcp",
                    "--split",
                    split,
                    server,
                    "api.frontend.internal",
                ],
            );
            assert_refused(&sandbox, &run, &report, "api.frontend.internal");
            assert_eq!(report["events"][0]["transport"], "tcp");
            assert_eq!(report["counters"]["unreadable"], 0, "{split}: {report:#}");
            let allowed = format!("split-{}.internal", split.replace(',', "-"));
            let (run, report) = guarded(
                &sandbox,
                &[&client, "--tcp", "--split", split, server, &allowed],
            );
            assert_answered(&sandbox, &run, &report, &allowed);
            assert_eq!(report["counters"]["inspected"], 1, "{report:#}");
        }
    }
}

#[test]
fn pipelined_tcp_queries_are_each_judged() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        // Eight allowed queries in one write: none refused.
        let names: Vec<String> = (0..8).map(|i| format!("p{i}.internal")).collect();
        let (run, report) = guarded(&sandbox, &[&client, "--tcp", server, &names.join(",")]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(run.stdout.matches("192.0.2.1").count(), 8, "{run:?}");
        assert_eq!(report["counters"]["inspected"], 8, "{report:#}");
        // A denied one first, in the middle, last, behind an EDNS query.
        for position in [0, 2, 4] {
            let mut names: Vec<String> =
                (0..4).map(|i| format!("q{position}{i}.internal")).collect();
            names.insert(position, "frontend.internal".into());
            let list = names.join(",");
            for edns in [false, true] {
                let mut args = vec![client.as_str(), "--tcp"];
                if edns {
                    args.push("--edns");
                }
                args.extend([server, list.as_str()]);
                let (run, report) = guarded(&sandbox, &args);
                assert_refused(&sandbox, &run, &report, "frontend.internal");
                // The messages before it were judged (whether they reach the
                // server depends on when the refused connection is ended).
                let inspected = report["counters"]["inspected"].as_u64().unwrap();
                assert!(inspected > position as u64, "{report:#}");
            }
        }
    }
}

#[test]
fn urgent_data_cannot_shift_the_stream() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        let (run, report) = guarded(
            &sandbox,
            &[&client, "--tcp", "--oob", server, "frontend.internal"],
        );
        assert_refused(&sandbox, &run, &report, "frontend.internal");
        // The stream programs see the urgent byte in line, as the server
        // reads it: an allowed query still goes through.
        let (run, report) = guarded(
            &sandbox,
            &[&client, "--tcp", "--oob", server, "oob.internal"],
        );
        assert_answered(&sandbox, &run, &report, "oob.internal");
    }
}

#[test]
fn unreadable_tcp_messages_are_refused_and_reported() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    // Flags 0 and two questions; a compression pointer in the question; a
    // header alone.
    let messages = [
        "123400000002000000000000036162630000010001036465660000010001",
        "1234010000010000000000000361626308696e7465726e616cc00c00010001",
        "12340100000100000000",
    ];
    for server in SERVERS {
        for raw in messages {
            let (run, report) = guarded(&sandbox, &[&client, "--tcp", "--raw", raw, server, "raw"]);
            assert_eq!(run.code, 77, "{raw}: {run:?}");
            assert_eq!(report["counters"]["unreadable"], 1, "{raw}: {report:#}");
            let event = &report["events"][0];
            assert_eq!(event["verdict"], "unreadable-blocked", "{report:#}");
            assert!(event["reason"].is_string(), "{report:#}");
        }
    }
}

#[test]
fn every_datagram_of_a_udp_gso_send_is_judged() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for server in SERVERS {
        // Names of one length, so the datagrams are whole.
        let (run, report) = guarded(
            &sandbox,
            &[
                &client,
                "--gso",
                server,
                "gsogso-0.internal,frontend.internal,gsogso-2.internal",
            ],
        );
        assert_eq!(run.code, 77, "{run:?}");
        assert!(!saw(&sandbox, "frontend.internal"), "{run:?}");
        assert_eq!(report["counters"]["blocked"], 1, "{report:#}");
        assert_eq!(report["counters"]["inspected"], 3, "{report:#}");
        let (run, report) = guarded(
            &sandbox,
            &[
                &client,
                "--gso",
                server,
                "gsogso-a.internal,gsogso-b.internal",
            ],
        );
        assert_eq!(run.code, 0, "{run:?}");
        assert!(saw(&sandbox, "gsogso-a.internal") && saw(&sandbox, "gsogso-b.internal"));
        assert_eq!(report["counters"]["inspected"], 2, "{report:#}");
    }
}

#[test]
fn tcp_fast_open_data_is_judged() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    // Client and server Fast Open in this namespace: the first connection
    // gets a cookie, the next ones carry the query in the SYN.
    let status = Command::new("sysctl")
        .args(["-q", "-w", "net.ipv4.tcp_fastopen=3"])
        .status()
        .unwrap();
    assert!(status.success());
    for server in SERVERS {
        for round in 0..3 {
            let allowed = format!("tfo-{round}.internal");
            let (run, report) = guarded(
                &sandbox,
                &[&client, "--tcp", "--fastopen", server, &allowed],
            );
            assert_answered(&sandbox, &run, &report, &allowed);
            let (run, report) = guarded(
                &sandbox,
                &[&client, "--tcp", "--fastopen", server, "frontend.internal"],
            );
            assert_refused(&sandbox, &run, &report, "frontend.internal");
        }
    }
}

#[test]
fn a_dot_inside_a_label_is_not_a_label_boundary() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let report_path = sandbox.path("labels.json");
    // `a.b.frontend.internal` (four labels) is allowed; the three labels
    // `a.b`, `frontend`, `internal` are another name, under the deny.
    let run = sandbox.run(&[
        "run",
        "--deny",
        "*.frontend.internal",
        "--allow",
        "a.b.frontend.internal",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &format!(
            "{client} 127.0.0.1:53 a.b.frontend.internal && ! {client} 127.0.0.1:53 'a\\.b.frontend.internal'"
        ),
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    let report = report(&report_path);
    let events = report["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{report:#}");
    assert_eq!(events[0]["name"], "a\\.b.frontend.internal");
    assert_eq!(events[0]["rule"]["pattern"], "*.frontend.internal");
}

#[test]
fn tcp_refusals_are_one_event_each_and_add_up() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let script = format!(
        "for i in $(seq 1 40); do {client} --tcp --timeout 2 127.0.0.1:53 frontend.internal; \
         {client} --timeout 2 127.0.0.1:53 api.frontend.internal; done; true"
    );
    let (run, report) = guarded(&sandbox, &["sh", "-c", &script]);
    assert_eq!(run.code, 77, "{run:?}");
    let events = report["events"].as_array().unwrap();
    assert_eq!(report["counters"]["blocked"], 80, "{report:#}");
    assert_eq!(
        events.len() as u64 + report["events_lost"].as_u64().unwrap(),
        80
    );
    assert!(!saw(&sandbox, "frontend.internal") && !saw(&sandbox, "api.frontend.internal"));
}

/// Real clients: each asks for a denied name and an allowed one, over TCP
/// (and UDP where the client picks), on IPv4 and IPv6.
#[test]
fn real_clients_over_tcp_are_refused_and_answered() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path("go");
    let go = build_go_client(&dir);
    for (server, address) in [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")] {
        let clients: Vec<(&str, Vec<String>)> = vec![
            (
                "dig",
                vec![
                    "dig".into(),
                    "+tcp".into(),
                    "+tries=1".into(),
                    "+time=5".into(),
                    format!("@{server}"),
                    "NAME".into(),
                ],
            ),
            (
                "kdig",
                vec![
                    "kdig".into(),
                    "+tcp".into(),
                    "+retry=0".into(),
                    "+time=5".into(),
                    format!("@{server}"),
                    "NAME".into(),
                ],
            ),
            (
                "python",
                vec![
                    "/usr/bin/python3".into(),
                    "-c".into(),
                    PYTHON_TCP.into(),
                    server.into(),
                    "NAME".into(),
                ],
            ),
            (
                "go",
                vec![
                    go.clone(),
                    "tcp".into(),
                    format!("{address}:53"),
                    "NAME".into(),
                ],
            ),
            (
                "go-udp",
                vec![
                    go.clone(),
                    "udp".into(),
                    format!("{address}:53"),
                    "NAME".into(),
                ],
            ),
        ];
        for (label, command) in clients {
            let with = |name: &str| -> Vec<String> {
                command
                    .iter()
                    .map(|a| {
                        if a == "NAME" {
                            name.to_owned()
                        } else {
                            a.clone()
                        }
                    })
                    .collect()
            };
            let denied = with("frontend.internal");
            let denied: Vec<&str> = denied.iter().map(String::as_str).collect();
            let (run, report) = guarded(&sandbox, &denied);
            assert_eq!(run.code, 77, "{label} {server}: {run:?}");
            assert!(!saw(&sandbox, "frontend.internal"), "{label}: {run:?}");
            // Some clients ask for A and AAAA: one refusal, one event, each.
            let blocked = report["counters"]["blocked"].as_u64().unwrap();
            assert!(blocked >= 1, "{label}: {report:#}");
            assert_eq!(report["events"].as_array().unwrap().len() as u64, blocked);
            let allowed = format!(
                "{label}-{}.internal",
                if server.contains(':') { "v6" } else { "v4" }
            );
            let ok = with(&allowed);
            let ok: Vec<&str> = ok.iter().map(String::as_str).collect();
            let (run, report) = guarded(&sandbox, &ok);
            assert_eq!(run.code, 0, "{label} {server}: {run:?}");
            assert!(saw(&sandbox, &allowed), "{label}: {run:?}");
            assert_eq!(report["counters"]["blocked"], 0, "{label}: {report:#}");
        }
    }
    // glibc over TCP (`options use-vc`), through the system resolver.
    fs::write(
        sandbox.path("resolv.conf"),
        "nameserver 127.0.0.1\noptions use-vc attempts:1 timeout:3\n",
    )
    .unwrap();
    let (run, report) = guarded(&sandbox, &["getent", "hosts", "api.frontend.internal"]);
    assert_refused(&sandbox, &run, &report, "api.frontend.internal");
    assert_eq!(report["events"][0]["transport"], "tcp");
    let (run, report) = guarded(&sandbox, &["getent", "ahosts", "glibc-vc.internal"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sandbox
        .v4
        .seen()
        .iter()
        .any(|q| q.name == "glibc-vc.internal" && q.tcp));
    assert_eq!(report["counters"]["blocked"], 0, "{report:#}");
}

const PYTHON_TCP: &str = "import sys, dns.message, dns.query\n\
q = dns.message.make_query(sys.argv[2], 'A')\n\
r = dns.query.tcp(q, sys.argv[1], timeout=5)\n\
print(r.answer)\n";

/// A Go program resolving through Go's own resolver over the network given
/// (tcp or udp) to the server given.
fn build_go_client(dir: &std::path::Path) -> String {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("main.go"),
        r#"package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	network, server, name := os.Args[1], os.Args[2], os.Args[3]
	resolver := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			d := net.Dialer{Timeout: 5 * time.Second}
			return d.DialContext(ctx, network, server)
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	addrs, err := resolver.LookupHost(ctx, name)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("answer", name, addrs)
}
"#,
    )
    .unwrap();
    fs::write(dir.join("go.mod"), "module guardtest\n\ngo 1.19\n").unwrap();
    let binary = dir.join("resolve");
    let cache = std::env::temp_dir().join("guard-test-go-cache");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(dir)
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .status()
        .expect("go (golang-go) is installed by cargo xtask setup");
    assert!(status.success(), "go build");
    binary.display().to_string()
}
