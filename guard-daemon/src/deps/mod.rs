//! `guard deps`: the fleet's deploy-time dependency map. Every guarded
//! deploy's lookups (from `--record` and `--report` files, or written by
//! `guard run --deps-db` at the end of a run) go into one store; a service
//! catalog says which service serves which names; the questions are then
//! which services a service affects, what it depends on, and every cycle.
pub mod analysis;
pub mod catalog;
pub mod render;
pub mod sources;
pub mod store;

use std::{collections::BTreeSet, path::PathBuf};

use clap::{Args, Subcommand};
use guard_common::pattern::{Pattern, PatternKind};
use serde::Serialize;

use self::store::{DeployRun, Filter, Store};

#[derive(Debug, Args)]
pub struct DepsArgs {
    /// The store: an SQLite file, or a postgres:// URL for PostgreSQL.
    #[arg(
        long,
        global = true,
        env = "GUARD_DEPS_DB",
        default_value = store::DEFAULT_DB,
        value_name = "PATH|URL"
    )]
    db: String,
    #[command(subcommand)]
    command: DepsCommand,
}

#[derive(Debug, Subcommand)]
enum DepsCommand {
    /// Store the lookups of guarded deploys from their `guard run --record`
    /// or `--report` files. Ingesting a file again changes nothing.
    Ingest {
        /// The service whose deploy the files describe.
        #[arg(long, value_name = "NAME")]
        service: String,
        /// The host the deploy ran on (default: this host).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// Identifies the deploy (default: its start time from the file).
        #[arg(long, value_name = "ID")]
        run_id: Option<String>,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Load the service catalog (YAML: services with name, owner, tier and
    /// the names they serve), replacing the one stored.
    Catalog {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Set owners and tiers from a dependency-management-data database
    /// (SQLite): `owners.owner`, and the `tier` key of
    /// `repository_metadata.additional_metadata`, by repository name.
    ImportOwners {
        #[arg(value_name = "DMD_DB")]
        file: PathBuf,
    },
    /// Every service whose deploys resolved SERVICE's names (or NAME, or
    /// names below `*.DOMAIN`), most business-critical tier first.
    Affected {
        #[arg(value_name = "SERVICE|NAME")]
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// What SERVICE's deploys resolved, by the service serving each name.
    Of {
        #[arg(value_name = "SERVICE")]
        service: String,
        #[arg(long)]
        json: bool,
    },
    /// Every cycle of the service graph, with one witness lookup per edge.
    Cycles {
        #[arg(long)]
        json: bool,
    },
    /// A starting policy denying, during SERVICE's deploys, the names of
    /// the services that depend on SERVICE.
    Policy {
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Name of the policy (default: SERVICE-deploy).
        #[arg(long)]
        name: Option<String>,
    },
    /// The service graph, cycles in red (svg needs Graphviz's `dot`).
    Graph {
        #[arg(long, value_enum, default_value = "dot")]
        format: GraphFormat,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Dot,
    Svg,
}

pub fn main(args: DepsArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("guard: starting the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(output) => {
            print!("{output}");
            0
        }
        Err(message) => {
            eprintln!("guard: {message}");
            1
        }
    }
}

async fn execute(args: DepsArgs) -> Result<String, String> {
    // Read input files before touching the store, so bad input changes
    // nothing.
    let (runs, catalog) = match &args.command {
        DepsCommand::Ingest {
            service,
            host,
            run_id,
            files,
        } => {
            let origin = sources::Origin {
                service: service.clone(),
                host: host.clone().unwrap_or_else(this_host),
                run_id: run_id.clone(),
            };
            let runs = files
                .iter()
                .map(|file| sources::load(file, &origin))
                .collect::<Result<Vec<_>, _>>()?;
            (runs, None)
        }
        DepsCommand::Catalog { file } => (Vec::new(), Some(catalog::load(file)?)),
        _ => (Vec::new(), None),
    };
    let store = Store::open(&args.db).await.map_err(|e| e.to_string())?;
    let output = answer(&store, &args, runs, catalog).await;
    store.close().await;
    output
}

async fn answer(
    store: &Store,
    args: &DepsArgs,
    runs: Vec<DeployRun>,
    catalog: Option<Vec<store::Service>>,
) -> Result<String, String> {
    let fail = |e: store::StoreError| e.to_string();
    match &args.command {
        DepsCommand::Ingest { files, .. } => {
            let mut out = String::new();
            // One transaction per file: a failure leaves the files before
            // it stored, and nothing of it.
            for (index, (run, file)) in runs.iter().zip(files).enumerate() {
                store.ingest(run).await.map_err(|e| {
                    format!(
                        "{}: {e} (nothing of it was stored; {index} file(s) before it were)",
                        file.display()
                    )
                })?;
                out.push_str(&format!(
                    "{}: {} lookups of service {} (host {}, run {})\n",
                    file.display(),
                    run.lookups.len(),
                    run.service,
                    run.host,
                    run.run_id
                ));
            }
            Ok(out)
        }
        DepsCommand::Catalog { file } => {
            let services = catalog.unwrap_or_default();
            store
                .replace_catalog(&services, &file.display().to_string())
                .await
                .map_err(fail)?;
            let names: usize = services.iter().map(|s| s.names.len()).sum();
            let mut out = format!(
                "{}: {} services serving {} names (the previous catalog is replaced)\n",
                file.display(),
                services.len(),
                names
            );
            let unclaimed =
                analysis::unclaimed(&store.resolutions(Filter::All).await.map_err(fail)?).len();
            if unclaimed > 0 {
                out.push_str(&format!(
                    "{unclaimed} resolved names are served by no service of the catalog (shown as {})\n",
                    render::UNCLAIMED
                ));
            }
            Ok(out)
        }
        DepsCommand::ImportOwners { file } => {
            let owners = import_owners(file).await?;
            store
                .set_owners(&owners, &file.display().to_string())
                .await
                .map_err(fail)?;
            Ok(format!(
                "{}: owners of {} services imported\n",
                file.display(),
                owners.len()
            ))
        }
        DepsCommand::Affected { target, json } => {
            let services = store.services().await.map_err(fail)?;
            let pattern;
            let filter = if services.iter().any(|s| &s.name == target) {
                Filter::ServedBy(target)
            } else {
                pattern = Pattern::parse(target).map_err(|reason| {
                    format!("{target:?} is neither a service of the catalog nor a name: {reason}")
                })?;
                match pattern.kind() {
                    PatternKind::Exact => Filter::Name(pattern.base()),
                    PatternKind::Subdomains => Filter::Below(pattern.base()),
                }
            };
            let rows = store.resolutions(filter).await.map_err(fail)?;
            let affected = analysis::affected(target, &rows, &services);
            Ok(if *json {
                json_text(&affected)
            } else {
                render::affected(target, &affected)
            })
        }
        DepsCommand::Of { service, json } => {
            let services = store.services().await.map_err(fail)?;
            let rows = store
                .resolutions(Filter::MadeBy(service))
                .await
                .map_err(fail)?;
            let dependencies = analysis::dependencies(&rows, &services);
            Ok(if *json {
                json_text(&dependencies)
            } else {
                render::dependencies(service, &dependencies)
            })
        }
        DepsCommand::Cycles { json } => {
            let edges = analysis::edges(&store.resolutions(Filter::Edges).await.map_err(fail)?);
            let cycles = analysis::cycles(&edges);
            Ok(if *json {
                json_text(&cycles)
            } else {
                render::cycles(&cycles)
            })
        }
        DepsCommand::Policy { service, name } => {
            let services = store.services().await.map_err(fail)?;
            let dependents = analysis::affected(
                service,
                &store
                    .resolutions(Filter::ServedBy(service))
                    .await
                    .map_err(fail)?,
                &services,
            );
            let depends_on: BTreeSet<String> = store
                .resolutions(Filter::MadeBy(service))
                .await
                .map_err(fail)?
                .into_iter()
                .filter_map(|r| r.serving_service)
                .collect();
            let policy_name = name.clone().unwrap_or_else(|| format!("{service}-deploy"));
            Ok(render::policy(
                service,
                &policy_name,
                &shown_location(&args.db),
                &dependents,
                &services,
                &depends_on,
            ))
        }
        DepsCommand::Graph { format } => {
            let services = store.services().await.map_err(fail)?;
            let all = store.resolutions(Filter::All).await.map_err(fail)?;
            let edges = analysis::edges(&all);
            let cycles = analysis::cycles(&edges);
            let dot = render::dot(&services, &edges, &cycles, &analysis::unclaimed(&all));
            match format {
                GraphFormat::Dot => Ok(dot),
                GraphFormat::Svg => svg(&dot),
            }
        }
    }
}

/// Writes one deploy's lookups at the end of `guard run --deps-db`. The run
/// is in an async runtime already, so the store gets its own on a thread.
pub fn ingest_blocking(location: &str, run: DeployRun) -> Result<usize, String> {
    let location = location.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the async runtime: {e}"))?;
        runtime.block_on(async {
            let store = Store::open(&location).await.map_err(|e| e.to_string())?;
            let result = store.ingest(&run).await.map_err(|e| e.to_string());
            store.close().await;
            result.map(|()| run.lookups.len())
        })
    })
    .join()
    .map_err(|_| "the dependency store's writer panicked".to_owned())?
}

/// This host's name, for lookups ingested without `--host`.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The store's location without a password (`postgres://u:***@host/db`).
fn shown_location(location: &str) -> String {
    let Some((scheme, rest)) = location.split_once("://") else {
        return location.to_owned();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority.len()..])
        }
        _ => location.to_owned(),
    }
}

fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("answers serialise") + "\n"
}

/// Renders DOT as SVG with Graphviz's `dot`, which lays graphs out far
/// better than anything small enough to embed.
fn svg(dot: &str) -> Result<String, String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "--format svg runs Graphviz's `dot`: {e} (install the graphviz package, or use --format dot)"
            )
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let text = dot.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let output = child
        .wait_with_output()
        .map_err(|e| format!("dot -Tsvg: {e}"))?;
    let _ = writer.join();
    if !output.status.success() {
        return Err(format!("dot -Tsvg failed: {}", output.status));
    }
    String::from_utf8(output.stdout).map_err(|e| format!("dot -Tsvg: {e}"))
}

/// Owners and tiers from a dependency-management-data database: the
/// repository's name is the service's.
async fn import_owners(
    file: &std::path::Path,
) -> Result<Vec<(String, Option<String>, Option<i64>)>, String> {
    use sqlx::{ConnectOptions as _, Row as _};
    let what = |e: sqlx::Error| format!("{}: {e}", file.display());
    if !file.is_file() {
        return Err(format!("{}: no such database file", file.display()));
    }
    let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(file)
        .read_only(true)
        .connect()
        .await
        .map_err(what)?;
    let mut owners: std::collections::BTreeMap<String, (Option<String>, Option<i64>)> =
        Default::default();
    for row in sqlx::query("SELECT repo, owner FROM owners")
        .fetch_all(&mut connection)
        .await
        .map_err(what)?
    {
        let repo: String = row.try_get("repo").map_err(what)?;
        let owner: Option<String> = row.try_get("owner").map_err(what)?;
        owners.entry(repo).or_default().0 = owner;
    }
    // Not every dependency-management-data database has metadata.
    if let Ok(rows) = sqlx::query("SELECT repo, additional_metadata FROM repository_metadata")
        .fetch_all(&mut connection)
        .await
    {
        for row in rows {
            let repo: String = row.try_get("repo").map_err(what)?;
            let metadata: Option<String> = row.try_get("additional_metadata").map_err(what)?;
            let tier = match metadata
                .as_deref()
                .map(serde_json::from_str::<serde_json::Value>)
            {
                Some(Ok(value)) => tier_of(&value["tier"]).map_err(|message| {
                    format!(
                        "{}: repository_metadata of {repo:?}: tier {}: {message}",
                        file.display(),
                        value["tier"]
                    )
                })?,
                Some(Err(e)) => {
                    return Err(format!(
                        "{}: repository_metadata of {repo:?}: additional_metadata is not JSON: {e}",
                        file.display()
                    ))
                }
                None => None,
            };
            owners.entry(repo).or_default().1 = tier;
        }
    }
    Ok(owners
        .into_iter()
        .map(|(service, (owner, tier))| (service, owner, tier))
        .collect())
}

/// A tier as dependency-management-data users write it: 1, "1" or "tier-1".
fn tier_of(value: &serde_json::Value) -> Result<Option<i64>, String> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| "not a whole number".into()),
        serde_json::Value::String(text) => text
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .map(Some)
            .map_err(|_| "has no number".into()),
        _ => Err("neither a number nor a string".into()),
    }
}
