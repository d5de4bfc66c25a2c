//! Bad input, given to the real `guard` binary: special files and huge
//! files as policies, wrong YAML types, a byte-order mark, invalid UTF-8,
//! deep nesting, output paths that cannot be written, bad `--dns-port`s.
//! Each must end with a clear error naming the file, line or option and the
//! value, in bounded time, before the command runs: every guarded command
//! here would create a marker file, and the marker must not exist.
mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use common::{bounded, Run, Sandbox, GUARD};

/// `guard run ARGS -- touch MARKER` in the sandbox, bounded; returns the run
/// and whether the command ran.
fn guard_run(sandbox: &Sandbox, args: &[&str]) -> (Run, bool) {
    let marker = sandbox.path("the-command-ran");
    let _ = fs::remove_file(&marker);
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "touch", marker.to_str().unwrap()]);
    let run = bounded(sandbox.guard(&all), sandbox.dir.path());
    (run, marker.exists())
}

/// `guard policy check FILES`, bounded.
fn policy_check(dir: &Path, files: &[&Path]) -> Run {
    let mut command = Command::new(GUARD);
    command.args(["policy", "check"]).args(files);
    bounded(command, dir)
}

/// Asserts that `guard run --policy PATH` and `guard policy check PATH` both
/// refuse `path` with `message` (the same validation), and that the
/// command did not run.
fn refused_everywhere(sandbox: &Sandbox, path: &Path, message: &str) {
    let (run, ran) = guard_run(sandbox, &["--policy", path.to_str().unwrap()]);
    assert_eq!(run.code, 125, "{}: {run:?}", path.display());
    assert!(
        run.stderr.contains(message),
        "expected {message:?}: {run:?}"
    );
    assert!(run.stderr.contains("the command was not run"), "{run:?}");
    assert!(!ran, "the command ran despite {}: {run:?}", path.display());
    let check = policy_check(sandbox.dir.path(), &[path]);
    assert_eq!(check.code, 1, "{check:?}");
    assert!(
        check.stderr.contains(message),
        "expected {message:?}: {check:?}"
    );
}

fn write(sandbox: &Sandbox, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = sandbox.path(name);
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn special_files_are_refused_at_once_by_name() {
    let sandbox = Sandbox::new();
    // A FIFO with no writer: reading it would wait forever.
    let fifo = sandbox.path("policy.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    refused_everywhere(
        &sandbox,
        &fifo,
        &format!(
            "{}: cannot read: it is a FIFO, not a regular file",
            fifo.display()
        ),
    );
    // Endless devices: reading them would grow without bound.
    for device in ["/dev/zero", "/dev/urandom"] {
        refused_everywhere(
            &sandbox,
            Path::new(device),
            &format!("{device}: cannot read: it is a character device, not a regular file"),
        );
    }
    // A symbolic link is followed, and what it names is judged.
    let link = sandbox.path("zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    refused_everywhere(
        &sandbox,
        &link,
        &format!("{}: cannot read: it is a character device", link.display()),
    );
    let dir = sandbox.path("policies.yaml");
    fs::create_dir(&dir).unwrap();
    refused_everywhere(
        &sandbox,
        &dir,
        &format!(
            "{}: cannot read: it is a directory, not a regular file",
            dir.display()
        ),
    );
}

#[test]
fn a_huge_file_is_refused_without_being_read() {
    let sandbox = Sandbox::new();
    // 1 GiB, sparse: only its size is real, and the size is what is judged.
    let huge = sandbox.path("huge.yaml");
    fs::File::create(&huge).unwrap().set_len(1 << 30).unwrap();
    refused_everywhere(
        &sandbox,
        &huge,
        &format!(
            "{}: cannot read: larger than 32 MiB, the limit for guard's input files",
            huge.display()
        ),
    );
}

#[test]
fn deep_nesting_is_refused_with_its_line() {
    let sandbox = Sandbox::new();
    let deep = write(
        &sandbox,
        "deep.yaml",
        format!("name: deep\ndeny: {}", "[".repeat(16 << 20)),
    );
    refused_everywhere(
        &sandbox,
        &deep,
        &format!("{}:2: nested more than 32 levels deep", deep.display()),
    );
}

#[test]
fn wrong_types_are_errors_with_file_line_and_value() {
    let sandbox = Sandbox::new();
    let number = write(&sandbox, "number.yaml", "name: 123\ndeny: [a.internal]\n");
    refused_everywhere(
        &sandbox,
        &number,
        &format!(
            "{}:1: name: invalid type: integer `123`, expected a string",
            number.display()
        ),
    );
    let boolean = write(
        &sandbox,
        "boolean.yaml",
        "name: db\ndeny:\n  - a.internal\n  - true\n",
    );
    refused_everywhere(
        &sandbox,
        &boolean,
        &format!(
            "{}:4: deny[1]: invalid type: boolean `true`, expected a string",
            boolean.display()
        ),
    );
    let null = write(&sandbox, "null.yaml", "name: db\nallow: [~]\n");
    refused_everywhere(
        &sandbox,
        &null,
        &format!("{}:2: allow[0]: invalid type: unit value", null.display()),
    );
}

#[test]
fn a_byte_order_mark_is_accepted_and_invalid_utf8_names_its_line() {
    let sandbox = Sandbox::new();
    let bom = write(
        &sandbox,
        "bom.yaml",
        "\u{feff}name: db\ndeny:\n  - frontend.internal\n",
    );
    let check = policy_check(sandbox.dir.path(), &[&bom]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(
        check.stdout.contains("ok: policy db (enforce, 1 rules)"),
        "{check:?}"
    );
    let (run, ran) = guard_run(&sandbox, &["--policy", bom.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(ran, "{run:?}");

    let latin1 = write(
        &sandbox,
        "latin1.yaml",
        b"name: db\ndeny:\n  - caf\xe9.internal\n".as_slice(),
    );
    refused_everywhere(
        &sandbox,
        &latin1,
        &format!(
            "{}:3: invalid UTF-8 (byte 0xe9 at column 8)",
            latin1.display()
        ),
    );
}

#[test]
fn policies_that_conflict_across_files_are_refused_by_check_and_run_alike() {
    let sandbox = Sandbox::new();
    let deny = write(&sandbox, "deny.yaml", "name: a\ndeny: [x.internal]\n");
    let allow = write(&sandbox, "allow.yaml", "name: b\nallow: [x.internal]\n");
    let check = policy_check(sandbox.dir.path(), &[&deny, &allow]);
    assert_eq!(check.code, 1, "{check:?}");
    let message = format!(
        "conflicting rules for x.internal: deny in policy a ({}:2), and allow in policy b ({}:2)",
        deny.display(),
        allow.display()
    );
    assert!(check.stderr.contains(&message), "{check:?}");
    let (run, ran) = guard_run(
        &sandbox,
        &["-p", deny.to_str().unwrap(), "-p", allow.to_str().unwrap()],
    );
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains(&message), "{run:?}");
    assert!(!ran, "{run:?}");

    // One name in two files: the daemon refuses it in its policies
    // directory, so check and run do too.
    let again = write(&sandbox, "again.yaml", "name: a\ndeny: [y.internal]\n");
    let message = format!(
        "{}: policy name \"a\" is also used by {}",
        again.display(),
        deny.display()
    );
    let check = policy_check(sandbox.dir.path(), &[&deny, &again]);
    assert_eq!(check.code, 1, "{check:?}");
    assert!(check.stderr.contains(&message), "{check:?}");
    let (run, ran) = guard_run(
        &sandbox,
        &["-p", deny.to_str().unwrap(), "-p", again.to_str().unwrap()],
    );
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains(&message), "{run:?}");
    assert!(!ran, "{run:?}");
}

#[test]
fn outputs_that_cannot_be_written_stop_the_run_before_the_command() {
    let sandbox = Sandbox::new();
    let missing_dir = sandbox.path("no-such-dir/out");
    let a_directory = sandbox.dir.path().to_owned();
    let fifo = sandbox.path("out.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for option in ["--report", "--junit", "--summary-markdown", "--record"] {
        for (path, why) in [
            (&missing_dir, "No such file or directory"),
            (&a_directory, "Is a directory"),
            (&fifo, "a FIFO with no reader"),
        ] {
            let (run, ran) = guard_run(
                &sandbox,
                &[
                    "--deny",
                    "frontend.internal",
                    option,
                    path.to_str().unwrap(),
                ],
            );
            assert_eq!(run.code, 125, "{option} {}: {run:?}", path.display());
            let message = format!("guard: {option} {}: cannot write: {why}", path.display());
            assert!(
                run.stderr.contains(&message),
                "expected {message:?}: {run:?}"
            );
            assert!(run.stderr.contains("the command was not run"), "{run:?}");
            assert!(!ran, "the command ran: {run:?}");
        }
    }
    assert!(!missing_dir.parent().unwrap().exists());

    // A writable path is created, and written when the run ends; one a run
    // that never started created is removed again.
    let report = sandbox.path("report.json");
    let (run, ran) = guard_run(
        &sandbox,
        &[
            "--deny",
            "frontend.internal",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(ran);
    assert_eq!(common::report(&report)["exit_code"], 0);
    let unused = sandbox.path("unused.json");
    let (run, ran) = guard_run(
        &sandbox,
        &[
            "--report",
            unused.to_str().unwrap(),
            "--junit",
            missing_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 125, "{run:?}");
    assert!(!ran);
    assert!(
        !unused.exists(),
        "a run that never started left {}",
        unused.display()
    );
}

#[test]
fn dns_ports_are_checked_as_usage_errors() {
    let sandbox = Sandbox::new();
    let (run, ran) = guard_run(&sandbox, &["--deny", "a.internal", "--dns-port", "0"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("'--dns-port <PORT>'"), "{run:?}");
    assert!(run.stderr.contains("0 is not in 1..=65535"), "{run:?}");
    assert!(!ran);

    let (run, ran) = guard_run(&sandbox, &["--deny", "a.internal", "--dns-port", "65536"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("'--dns-port <PORT>'"), "{run:?}");
    assert!(!ran);

    let five: Vec<&str> = ["53", "5353", "5354", "5355", "5356"]
        .iter()
        .flat_map(|port| ["--dns-port", port])
        .collect();
    let mut args = vec!["--deny", "a.internal"];
    args.extend(&five);
    let (run, ran) = guard_run(&sandbox, &args);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("--dns-port given 5 times (53, 5353, 5354, 5355, 5356); at most 4 ports"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("tracefs"), "{run:?}");
    assert!(!ran);

    // Four are fine.
    let mut args = vec!["--deny", "a.internal"];
    args.extend(&five[..8]);
    let (run, ran) = guard_run(&sandbox, &args);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(ran);
}
