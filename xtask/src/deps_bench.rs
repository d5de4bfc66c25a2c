//! `cargo xtask deps-bench`: how long `guard deps ingest` takes to store
//! 100,000 lookups (100 deploys of 1,000 names each, one command) in a
//! fresh SQLite file and in a private PostgreSQL server. The bench can
//! call [`ingest_rows`] for its table.
use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use guard_testkit::postgres::Cluster;

use crate::{require_root, setup};

const DEPLOYS: usize = 100;
const NAMES_PER_DEPLOY: usize = 1_000;

pub fn main(args: &[String]) -> Result<()> {
    require_root("deps-bench")?;
    let smoke = args.iter().any(|a| a == "--smoke");
    setup::setup()?;
    let (root, bin) = crate::release_binaries()?;
    let dir = root.join("target/deps-bench");
    let (deploys, names) = if smoke {
        (2, 10)
    } else {
        (DEPLOYS, NAMES_PER_DEPLOY)
    };
    for (backend, elapsed, lookups) in ingest_rows(&bin.join("guard"), &dir, deploys, names)? {
        println!(
            "guard deps ingest, {lookups} lookups ({deploys} deploys × {names} names), {backend}: {:.2} s ({:.0} lookups/s)",
            elapsed.as_secs_f64(),
            lookups as f64 / elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// (backend, time, lookups) for ingesting `deploys` records of `names`
/// names each with one `guard deps ingest`, into a fresh store of each
/// kind. Files go under `dir`.
pub fn ingest_rows(
    guard: &Path,
    dir: &Path,
    deploys: usize,
    names: usize,
) -> Result<Vec<(&'static str, Duration, usize)>> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for deploy in 0..deploys {
        let path = dir.join(format!("record-{deploy}.json"));
        fs::write(&path, record(deploy, names).to_string())?;
        files.push(path);
    }
    let sqlite = dir.join("deps.db");
    let cluster = Cluster::start().map_err(anyhow::Error::msg)?;
    let mut rows = Vec::new();
    for (backend, location) in [
        ("SQLite", sqlite.display().to_string()),
        ("PostgreSQL", cluster.url.clone()),
    ] {
        let started = Instant::now();
        let output = Command::new(guard)
            .args(["deps", "ingest", "--service", "bench", "--db", &location])
            .args(&files)
            .output()
            .context("running guard deps ingest")?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "guard deps ingest ({backend}): {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        rows.push((backend, elapsed, deploys * names));
    }
    Ok(rows)
}

/// A `guard run --record` file: one deploy (its own start time, so its
/// own run) that resolved `names` names, as a real deploy's record has
/// them.
fn record(deploy: usize, names: usize) -> serde_json::Value {
    let started_at = format!("2026-12-02T{:02}:{:02}:00.000Z", deploy / 60, deploy % 60);
    let names: Vec<serde_json::Value> = (0..names)
        .map(|i| {
            serde_json::json!({
                "name": format!("host{i}.svc{}.internal", i % 20),
                "verdict": "allowed",
                "query_types": {"A": 2, "AAAA": 1},
                "queries": 3,
                "rule": null,
                "process_chain": [
                    {"pid": 100, "argv": ["/bin/sh", "deploy.sh"]},
                    {"pid": 101 + i, "argv": ["curl", format!("https://host{i}.internal/")]}
                ],
                "first_seen": started_at,
            })
        })
        .collect();
    serde_json::json!({
        "schema": "guard.record/1",
        "command": ["deploy.sh"],
        "started_at": started_at,
        "names": names,
    })
}
