//! Who is named, and failing fast wherever the asker is: a refused lookup
//! from a process that entered another network namespace inside the run
//! has its socket ended in that namespace; a lookup relayed by a forwarder
//! inside the run is attributed as the README says.
mod common;

use std::path::Path;

use common::{dns_query, guarded, Sandbox, GUARD};

fn stub() -> String {
    Path::new(GUARD)
        .with_file_name("guard-dns-stub")
        .display()
        .to_string()
}

/// Shell: wait up to 10 s for `condition`, else fail the script (the test
/// then fails on the exit status, not by hanging).
fn wait_for(condition: &str) -> String {
    format!(
        "for i in $(seq 200); do {condition} 2>/dev/null && break; sleep 0.05; done; \
         {condition} || {{ echo 'never ready: {condition}'; exit 3; }};"
    )
}

#[test]
fn refused_answers_end_the_socket_in_the_askers_namespace() {
    let sandbox = Sandbox::new();
    let log = sandbox.path("stub.log");
    // Inside the run: a new network namespace with its own server, and a
    // client that would wait 8 s for an answer that is refused.
    let script = format!(
        "ip link set lo up && {stub} 127.0.0.1:53 30 2>{log} & \
         {wait_for_log} \
         {client} --timeout 8 127.0.0.1:53 db-lb.internal; status=$?; kill $!; exit $status",
        stub = stub(),
        log = log.display(),
        client = dns_query(),
        wait_for_log = wait_for(&format!("grep -q serving {}", log.display())),
    );
    let (run, report) = guarded(&sandbox, &["unshare", "--net", "sh", "-c", &script]);
    assert_eq!(run.code, 77, "{run:?}");
    // Ended, not timed out: the socket was found in the asker's namespace.
    assert!(
        run.stdout.contains("error recv: ConnectionAborted"),
        "{run:?}"
    );
    let event = &report["events"][0];
    assert_eq!(event["direction"], "answer", "{report:#}");
    assert_eq!(event["socket_ended"], true, "{report:#}");
    // Nothing of this reached the test's own servers.
    assert!(!sandbox.v4.saw("db-lb.internal"), "{run:?}");
}

/// A UDP forwarder on 127.0.0.53:53 relaying to the test server, started
/// inside the run; it touches the file named by its argument once bound.
const FORWARDER: &str = r#"
import socket, sys, pathlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
pathlib.Path(sys.argv[1]).touch()
while True:
    data, peer = s.recvfrom(4096)
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.settimeout(2)
    try:
        up.sendto(data, ("127.0.0.1", 53))
        s.sendto(up.recv(4096), peer)
    except OSError:
        pass
"#;

#[test]
fn lookups_through_a_forwarder_in_the_run_are_attributed() {
    let sandbox = Sandbox::new();
    let ready = sandbox.path("forwarder.ready");
    let script = format!(
        "/usr/bin/python3 -c \"$FORWARDER\" {ready} & \
         {wait_for_ready} \
         {client} --timeout 2 127.0.0.53:53 frontend.internal; \
         {client} --timeout 2 127.0.0.53:53 db-lb.internal; kill $!; true",
        ready = ready.display(),
        client = dns_query(),
        wait_for_ready = wait_for(&format!("[ -e {} ]", ready.display())),
    );
    let (run, report) = {
        std::env::set_var("FORWARDER", FORWARDER);
        guarded(&sandbox, &["sh", "-c", &script])
    };
    assert_eq!(run.code, 77, "{run:?}");
    let events = report["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{report:#}");
    // A denied question is refused on its first hop, from the client to
    // the forwarder: the client is named.
    let question = events.iter().find(|e| e["direction"] == "query").unwrap();
    assert_eq!(question["name"], "frontend.internal", "{report:#}");
    assert_eq!(question["comm"], "guard-dns-query", "{report:#}");
    // An answer is refused where it first arrives: at the forwarder, which
    // asked upstream for it. The forwarder is named, and its chain.
    let answer = events.iter().find(|e| e["direction"] == "answer").unwrap();
    assert_eq!(answer["name"], "db-lb.internal", "{report:#}");
    assert_eq!(answer["comm"], "python3", "{report:#}");
    assert!(!sandbox.v4.saw("frontend.internal"), "{run:?}");
}
