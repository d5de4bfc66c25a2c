//! Lookups through local resolver daemons go back on the wire: with nscd
//! or systemd-resolved's varlink service answering on the host, a guarded
//! command's connection to them is refused, glibc falls back to its own
//! DNS query, and guard judges that: denied names are refused and
//! reported, allowed names resolve. Each daemon runs in a private mount
//! namespace with its own /run (a tmpfs), so the host is untouched.
mod common;

use std::{fs, path::Path};

use common::{report, validate_report, Run, Sandbox, GUARD};

/// `sh -c SCRIPT` in a private mount namespace: the sandbox's resolv.conf,
/// a fresh /run, and `nsswitch` as /etc/nsswitch.conf.
fn private_run(sandbox: &Sandbox, nsswitch: &str, script: &str) -> Run {
    let nsswitch_path = sandbox.path("nsswitch.conf");
    fs::write(&nsswitch_path, nsswitch).unwrap();
    let output = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/nsswitch.conf && mount -t tmpfs tmpfs /run && {script}",
            sandbox.path("resolv.conf").display(),
            nsswitch_path.display(),
        ))
        .output()
        .unwrap();
    Run::from(output)
}

fn guard_run(sandbox: &Sandbox, report: &Path, command: &str) -> String {
    format!(
        "{GUARD} run --deny frontend.internal --report {} -- sh -c '{command}'",
        report.display(),
    ) + &format!(
        "; echo guard-exit=$? > {}",
        sandbox.path("guard-exit").display()
    )
}

fn guard_exit(sandbox: &Sandbox) -> i32 {
    fs::read_to_string(sandbox.path("guard-exit"))
        .unwrap()
        .trim()
        .strip_prefix("guard-exit=")
        .unwrap()
        .parse()
        .unwrap()
}

const LOOKUPS: &str =
    "getent hosts db.internal; echo db=$?; getent hosts frontend.internal; echo frontend=$?";

fn assert_went_back_on_the_wire(sandbox: &Sandbox, run: &Run, report_path: &Path, socket: &str) {
    assert_eq!(guard_exit(sandbox), 77, "{run:?}");
    // The allowed name resolved through glibc's own DNS query.
    assert!(run.stdout.contains("db.internal"), "{run:?}");
    assert!(run.stdout.contains("db=0"), "{run:?}");
    // The denied one was refused, not answered by the daemon.
    assert!(run.stdout.contains("frontend=2"), "{run:?}");
    let report = report(report_path);
    validate_report(&report);
    assert_eq!(report["resolver_socket_hooks"], "active");
    let blocked = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "frontend.internal")
        .expect("the denied lookup is reported");
    assert_eq!(blocked["verdict"], "blocked");
    let chain = blocked["process_chain"].as_array().unwrap();
    assert_eq!(chain.last().unwrap()["argv"][0], "getent", "{blocked:#}");
    let refused = report["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "resolver-socket" && e["destination"] == socket)
        .unwrap_or_else(|| {
            panic!("the refused connection to {socket} is in the report: {report:#}")
        });
    assert_eq!(refused["action"], "refused");
    assert_eq!(refused["verdict"], "noted");
}

#[test]
fn lookups_through_nscd_go_back_on_the_wire() {
    let sandbox = Sandbox::new();
    let conf = sandbox.path("nscd.conf");
    fs::write(
        &conf,
        "paranoia no\nenable-cache hosts yes\npersistent hosts no\nshared hosts yes\n\
         positive-time-to-live hosts 600\nnegative-time-to-live hosts 5\ncheck-files hosts yes\n\
         enable-cache passwd no\nenable-cache group no\nenable-cache services no\nenable-cache netgroup no\n",
    )
    .unwrap();
    let report_path = sandbox.path("report.json");
    // Unguarded first: nscd answers the frontend (the bypass this closes).
    let script = format!(
        "mkdir -p /run/nscd && (nscd -F -f {conf} & echo $! > /run/nscd.pid) && \
         i=0; while [ ! -S /run/nscd/socket ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; \
         getent hosts frontend.internal && echo unguarded-answered; \
         {guarded}; \
         python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/nscd/socket'); print('outside-connects')\"; \
         kill $(cat /run/nscd.pid)",
        conf = conf.display(),
        guarded = guard_run(&sandbox, &report_path, &format!("{LOOKUPS}; {UNIX_ECHO}")),
    );
    let run = private_run(&sandbox, "hosts: files dns\n", &script);
    assert!(
        run.stdout.contains("unguarded-answered"),
        "nscd works: {run:?}"
    );
    assert!(run.stdout.contains("outside-connects"), "{run:?}");
    assert!(
        run.stdout.contains("unix-echo-ok"),
        "other Unix sockets untouched: {run:?}"
    );
    assert_went_back_on_the_wire(&sandbox, &run, &report_path, "/var/run/nscd/socket");
    // The only frontend query the server saw is nscd's, from before.
    let frontend = sandbox
        .v4
        .seen()
        .iter()
        .filter(|q| q.name == "frontend.internal")
        .count();
    assert!(
        frontend <= 2,
        "A and AAAA of the unguarded lookup only: {frontend}"
    );
}

/// A Unix-socket conversation inside the run: not a resolver, so untouched.
const UNIX_ECHO: &str = "python3 -c \"import socket, os; p = \\\"/tmp/guard-echo-%d.sock\\\" % os.getpid(); s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(1); c = socket.socket(socket.AF_UNIX); c.connect(p); a, _ = s.accept(); c.send(b\\\"x\\\"); assert a.recv(1) == b\\\"x\\\"; os.unlink(p); print(\\\"unix-echo-ok\\\")\"";

#[test]
fn lookups_through_systemd_resolved_go_back_on_the_wire() {
    let sandbox = Sandbox::new();
    let library = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-deps/nss-resolve/usr/lib/x86_64-linux-gnu");
    assert!(
        library.join("libnss_resolve.so.2").exists(),
        "{} is missing: cargo xtask setup unpacks it",
        library.display()
    );
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/varlink_resolve.py");
    let asked = sandbox.path("asked");
    let report_path = sandbox.path("report.json");
    let socket = "/run/systemd/resolve/io.systemd.Resolve";
    let script = format!(
        "export LD_LIBRARY_PATH={library}; \
         python3 {server} {socket} {asked} > /run/server.out & server=$!; \
         i=0; while [ ! -S {socket} ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; \
         getent hosts frontend.internal; \
         {guarded}; kill $server",
        library = library.display(),
        asked = asked.display(),
        guarded = guard_run(&sandbox, &report_path, LOOKUPS),
    );
    let run = private_run(&sandbox, "hosts: resolve [!UNAVAIL=return] dns\n", &script);
    // Unguarded, resolved answers (the bypass this closes).
    assert!(
        run.stdout.contains("2001:db8::99    frontend.internal"),
        "the test server answers nss-resolve: {run:?}"
    );
    assert_went_back_on_the_wire(&sandbox, &run, &report_path, socket);
    let names = fs::read_to_string(&asked).unwrap();
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["frontend.internal"],
        "the guarded lookups never reached the resolved stand-in"
    );
}
