//! `guard deps`, the deploy-time dependency map, from records and reports
//! of real guarded runs, against a real SQLite file and a real PostgreSQL
//! server (a private cluster, see guard_testkit::postgres), with the same
//! assertions on both.
mod common;

use std::{fs, path::Path, process::Command};

use common::{dns_query, Sandbox, GUARD};
use guard_testkit::postgres::Cluster;
use serde_json::Value;

/// The example catalog: frontend, db, cache and batch.
const CATALOG: &str = include_str!("../../examples/catalog.yaml");

fn guard_deps(db: &str, args: &[&str]) -> std::process::Output {
    Command::new(GUARD)
        .arg("deps")
        .args(args)
        .args(["--db", db])
        .output()
        .expect("running guard deps")
}

/// `guard deps ARGS... --db DB`: stdout, failing the test on failure.
fn deps(db: &str, args: &[&str]) -> String {
    let output = guard_deps(db, args);
    assert!(
        output.status.success(),
        "guard deps {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `guard deps ARGS... --db DB`, which must fail: its stderr.
fn deps_failing(db: &str, args: &[&str]) -> String {
    let output = guard_deps(db, args);
    assert_eq!(output.status.code(), Some(1), "guard deps {args:?}");
    String::from_utf8(output.stderr).unwrap()
}

fn deps_json(db: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = deps(db, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The deploys of four services, each a real guarded run whose script
/// resolves other services' names: db → frontend → cache → db is a cycle,
/// batch depends on db (and is refused it), and db also resolves a name no
/// service serves.
struct Deploys {
    sandbox: Sandbox,
    /// (service, file) to ingest.
    files: Vec<(&'static str, String)>,
    /// The SQLite store frontend's run wrote itself (`--deps-db`).
    direct_db: String,
}

/// A guarded deploy whose script runs the test client once per entry of
/// `asks` (its arguments after the server, e.g. `--repeat 2 NAME`).
fn deploy(sandbox: &Sandbox, file: &str, asks: &[&str], options: &[&str]) -> (i32, String) {
    let client = dns_query();
    let script: Vec<String> = asks
        .iter()
        .map(|ask| format!("{client} 127.0.0.1:53 {ask} >/dev/null"))
        .collect();
    let script = script.join("; ") + "; true";
    let path = sandbox.path(file).display().to_string();
    let mut args = vec!["run", "-q"];
    args.extend_from_slice(options);
    let kind = if file.contains("report") {
        "--report"
    } else {
        "--record"
    };
    args.extend([kind, path.as_str(), "--", "sh", "-c", &script]);
    let run = sandbox.run(&args);
    (run.code, path)
}

impl Deploys {
    fn run() -> Deploys {
        let sandbox = Sandbox::new();
        let direct_db = sandbox.path("direct.db").display().to_string();
        let (code, db) = deploy(
            &sandbox,
            "db-record.json",
            &[
                "api.frontend.internal",
                "--repeat 2 db.internal",
                "metrics.example.net",
            ],
            &[],
        );
        assert_eq!(code, 0);
        let (code, frontend) = deploy(
            &sandbox,
            "frontend-record.json",
            &["cache.internal"],
            &["--service", "frontend", "--deps-db", &direct_db],
        );
        assert_eq!(code, 0);
        // A store that cannot be written fails the run (74: the command
        // ran), as any output does.
        let (code, _) = deploy(
            &sandbox,
            "unstored-record.json",
            &["cache.internal"],
            &[
                "--service",
                "frontend",
                "--deps-db",
                "/proc/no-such-dir/deps.db",
            ],
        );
        assert_eq!(code, 74);
        let (code, cache) = deploy(&sandbox, "cache-record.json", &["primary.db.internal"], &[]);
        assert_eq!(code, 0);
        // batch's deploy is refused db.internal, and the answer for
        // db-lb.internal (a CNAME to frontend.internal): its report has
        // both lookups, the second as an answer event.
        let (code, batch) = deploy(
            &sandbox,
            "batch-report.json",
            &["db.internal", "db-lb.internal"],
            &["--deny", "db.internal", "--deny", "frontend.internal"],
        );
        assert_eq!(code, 77);
        Deploys {
            sandbox,
            files: vec![
                ("db", db),
                ("frontend", frontend),
                ("cache", cache),
                ("batch", batch),
            ],
            direct_db,
        }
    }

    fn ingest(&self, db: &str) {
        for (service, file) in &self.files {
            let out = deps(db, &["ingest", "--service", service, file]);
            assert!(out.contains(&format!("of service {service}")), "{out}");
        }
    }
}

fn names_of(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|entry| entry[key].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Everything `guard deps` answers, on one store. The text answers are
/// printed (`--nocapture` shows a whole session).
fn check_store(deploys: &Deploys, db: &str) {
    deploys.ingest(db);
    let before = deps_json(db, &["of", "db"]);
    // Ingesting the same files again changes nothing.
    deploys.ingest(db);
    assert_eq!(deps_json(db, &["of", "db"]), before, "idempotent ingest");

    // Bad input is refused, naming the file, and changes nothing.
    let bad = deploys.sandbox.path("not-a-record.json");
    fs::write(&bad, r#"{"schema": "guard.other/1"}"#).unwrap();
    let refused = deps_failing(db, &["ingest", "--service", "db", bad.to_str().unwrap()]);
    assert!(
        refused.contains("not-a-record.json") && refused.contains("guard.other/1"),
        "{refused}"
    );
    assert_eq!(deps_json(db, &["of", "db"]), before);

    let catalog = deploys.sandbox.path("catalog.yaml");
    fs::write(&catalog, CATALOG).unwrap();
    let out = deps(db, &["catalog", catalog.to_str().unwrap()]);
    assert!(out.contains("4 services serving 7 names"), "{out}");
    let broken = deploys.sandbox.path("broken.yaml");
    fs::write(&broken, CATALOG.replace("tier: 2", "tier: two")).unwrap();
    let refused = deps_failing(db, &["catalog", broken.to_str().unwrap()]);
    assert!(refused.contains("broken.yaml:17: "), "{refused}");

    // Which services are affected if frontend is down: db's deploys, and
    // batch's, whose answer for db-lb.internal led to frontend.internal.
    let affected = deps_json(db, &["affected", "frontend"]);
    assert_eq!(
        names_of(&affected, "service"),
        ["db", "batch"],
        "{affected:#}"
    );
    assert_eq!(
        affected[1]["names"],
        serde_json::json!(["frontend.internal"])
    );
    assert_eq!(affected[1]["verdict"], "blocked");
    let of_batch = deps_json(db, &["of", "batch"]);
    let through_answer = of_batch
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "frontend.internal")
        .unwrap_or_else(|| panic!("{of_batch:#}"));
    assert_eq!(through_answer["via"], "db-lb.internal", "{of_batch:#}");
    assert_eq!(through_answer["service"], "frontend");
    let entry = &affected[0];
    assert_eq!(entry["owner"], "data-team");
    assert_eq!(entry["tier"], 1);
    assert_eq!(entry["names"], serde_json::json!(["api.frontend.internal"]));
    assert_eq!(entry["queries"], 1);
    assert!(
        entry["example_chain"]
            .as_str()
            .unwrap()
            .contains("guard-dns-query 127.0.0.1:53 api.frontend.internal"),
        "{entry:#}"
    );
    // By name and by pattern, too.
    for target in ["api.frontend.internal", "*.frontend.internal"] {
        let affected = deps_json(db, &["affected", target]);
        assert_eq!(names_of(&affected, "service"), ["db"], "{target}");
    }
    // If db is down: cache (tier 2) before batch (tier 3); batch was refused.
    let affected = deps_json(db, &["affected", "db"]);
    assert_eq!(
        names_of(&affected, "service"),
        ["cache", "batch"],
        "{affected:#}"
    );
    assert_eq!(affected[1]["verdict"], "blocked");
    assert_eq!(affected[1]["names"], serde_json::json!(["db.internal"]));
    let text = deps(db, &["affected", "db"]);
    println!("$ guard deps affected db\n{text}");
    assert!(
        text.contains("infra-team") && text.contains("analytics"),
        "{text}"
    );

    // What db's deploys depend on, unclaimed names included.
    let of = deps_json(db, &["of", "db"]);
    let by_name = |name: &str| -> Value {
        of.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {of:#}"))
            .clone()
    };
    assert_eq!(by_name("api.frontend.internal")["service"], "frontend");
    assert_eq!(by_name("db.internal")["queries"], 2);
    assert_eq!(by_name("metrics.example.net")["service"], Value::Null);
    let text = deps(db, &["of", "db"]);
    println!("$ guard deps of db\n{text}");
    assert!(
        text.contains("metrics.example.net") && text.contains("(unclaimed)"),
        "{text}"
    );

    // The cycle, with one witness lookup per edge.
    let cycles = deps_json(db, &["cycles"]);
    assert_eq!(cycles.as_array().unwrap().len(), 1, "{cycles:#}");
    let cycle = &cycles[0];
    assert_eq!(
        cycle["services"],
        serde_json::json!(["cache", "db", "frontend"])
    );
    assert_eq!(
        cycle["path"],
        serde_json::json!(["cache", "db", "frontend", "cache"])
    );
    let edges = cycle["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 3, "{cycle:#}");
    for (from, to, name) in [
        ("db", "frontend", "api.frontend.internal"),
        ("frontend", "cache", "cache.internal"),
        ("cache", "db", "primary.db.internal"),
    ] {
        let edge = edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)
            .unwrap_or_else(|| panic!("{from} → {to}: {cycle:#}"));
        let witness = &edge["witness"];
        assert_eq!(witness["name"], name);
        assert!(!witness["host"].as_str().unwrap().is_empty());
        assert!(witness["run_id"].as_str().unwrap().starts_with("20"));
        assert!(
            witness["process_chain"].as_str().unwrap().contains(name),
            "{witness:#}"
        );
    }
    let text = deps(db, &["cycles"]);
    println!("$ guard deps cycles\n{text}");
    assert!(text.contains("cache → db → frontend → cache"), "{text}");

    // db's deploys must not need the services that depend on db.
    let yaml = deps(db, &["policy", "db"]);
    println!("$ guard deps policy db\n{yaml}");
    let policy = guard_daemon::policy::Policy::parse(&yaml, Path::new("db-deploy.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let denied: Vec<String> = policy.rules.iter().map(|r| r.pattern.to_string()).collect();
    assert_eq!(
        denied,
        ["cache.internal", "*.cache.internal", "batch.internal"],
        "{yaml}"
    );
    assert_eq!(policy.name, "db-deploy");

    let dot = deps(db, &["graph", "--format", "dot"]);
    println!("$ guard deps graph\n{dot}");
    assert!(
        dot.contains("\"db\" -> \"frontend\" [label=\"api.frontend.internal\", color=red"),
        "{dot}"
    );
    assert!(
        dot.contains("\"batch\" -> \"db\" [label=\"db.internal\"];"),
        "{dot}"
    );
    assert!(dot.contains("metrics.example.net\\n(unclaimed)"), "{dot}");
    let svg = deps(db, &["graph", "--format", "svg"]);
    assert!(
        svg.contains("<svg") && svg.contains(">frontend</text>"),
        "{svg}"
    );

    // Owners and tiers from a dependency-management-data database (made
    // here with Python's sqlite3, as dmd's tables are laid out).
    let dmd = deploys.sandbox.path("dmd.db");
    let _ = fs::remove_file(&dmd);
    let script = "import sqlite3, sys\n\
        db = sqlite3.connect(sys.argv[1])\n\
        db.execute('CREATE TABLE owners (platform TEXT, organisation TEXT, repo TEXT, owner TEXT, notes TEXT, updated_at TEXT)')\n\
        db.execute('CREATE TABLE repository_metadata (platform TEXT, organisation TEXT, repo TEXT, additional_metadata TEXT)')\n\
        db.execute(\"INSERT INTO owners VALUES ('github', 'acme', 'batch', 'data-science', '', '')\")\n\
        db.execute(\"INSERT INTO repository_metadata VALUES ('github', 'acme', 'batch', '{\\\"tier\\\": \\\"tier-2\\\"}')\")\n\
        db.commit()\n";
    let made = Command::new("python3")
        .args(["-c", script])
        .arg(&dmd)
        .status()
        .unwrap();
    assert!(made.success());
    let out = deps(db, &["import-owners", dmd.to_str().unwrap()]);
    assert!(out.contains("owners of 1 services"), "{out}");
    let affected = deps_json(db, &["affected", "db"]);
    assert_eq!(
        names_of(&affected, "service"),
        ["batch", "cache"],
        "{affected:#}"
    );
    assert_eq!(affected[0]["owner"], "data-science");
    assert_eq!(affected[0]["tier"], 2);

    // Loading a catalog again replaces it: without frontend, its names are
    // unclaimed and the cycle is gone.
    fs::write(
        &catalog,
        CATALOG.replace("  - name: frontend\n    owner: web-team\n    tier: 1\n    names: [frontend.internal, \"*.frontend.internal\"]\n", ""),
    )
    .unwrap();
    deps(db, &["catalog", catalog.to_str().unwrap()]);
    let of = deps_json(db, &["of", "db"]);
    let api = of
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "api.frontend.internal")
        .unwrap();
    assert_eq!(api["service"], Value::Null, "{of:#}");
    assert_eq!(deps_json(db, &["cycles"]), serde_json::json!([]));
}

#[test]
fn dependency_map_from_real_runs_on_sqlite_and_postgres() {
    let deploys = Deploys::run();
    // frontend's run wrote its own lookups at its end.
    let of = deps_json(&deploys.direct_db, &["of", "frontend"]);
    assert_eq!(names_of(&of, "name"), ["cache.internal"], "{of:#}");

    check_store(
        &deploys,
        &deploys.sandbox.path("deps.db").display().to_string(),
    );
    let cluster = Cluster::start().expect("a private PostgreSQL server");
    check_store(&deploys, &cluster.url);
}

/// A record of `names` names for concurrent writers (no guarded run needed
/// to test the store's locking).
fn synthetic_record(path: &Path, prefix: &str, names: usize) {
    let names: Vec<Value> = (0..names)
        .map(|i| {
            serde_json::json!({
                "name": format!("n{i}.{prefix}.internal"),
                "verdict": "allowed",
                "query_types": {"A": 1},
                "queries": 1,
                "rule": null,
                "process_chain": [{"pid": 1, "argv": ["deploy.sh"]}],
                "first_seen": "2026-12-02T10:00:00.000Z"
            })
        })
        .collect();
    let record = serde_json::json!({
        "schema": "guard.record/1",
        "command": ["deploy.sh"],
        "started_at": "2026-12-02T10:00:00.000Z",
        "names": names,
    });
    fs::write(path, record.to_string()).unwrap();
}

fn concurrent_ingests(db: &str, dir: &Path) {
    const WRITERS: usize = 8;
    const NAMES: usize = 300;
    for writer in 0..WRITERS {
        let file = dir.join(format!("record-{writer}.json"));
        synthetic_record(&file, &format!("s{writer}"), NAMES);
    }
    // Two writers per file, all at once, on a store none of them found
    // (so they also race to create the schema).
    let children: Vec<std::process::Child> = (0..2 * WRITERS)
        .map(|writer| {
            Command::new(GUARD)
                .args(["deps", "ingest", "--db", db, "--service"])
                .arg(format!("service-{writer}"))
                .arg(dir.join(format!("record-{}.json", writer % WRITERS)))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("guard deps ingest")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for writer in 0..2 * WRITERS {
        let service = format!("service-{writer}");
        let of = deps_json(db, &["of", &service]);
        assert_eq!(of.as_array().unwrap().len(), NAMES, "{service}");
    }
}

#[test]
fn concurrent_writers_lose_nothing_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_ingests(
        &dir.path().join("deps.db").display().to_string(),
        dir.path(),
    );
    let cluster = Cluster::start().expect("a private PostgreSQL server");
    concurrent_ingests(&cluster.url, dir.path());
}
