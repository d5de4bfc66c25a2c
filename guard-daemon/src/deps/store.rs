//! The dependency map's store: SQLite (a file, the default) or PostgreSQL
//! (a `postgres://` URL), through sqlx's `Any` driver so that both run the
//! same migrations and the same statements.
use std::{collections::BTreeMap, path::Path};

use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, AssertSqlSafe, Row as _,
};

/// Where the store lives unless `--db` or `GUARD_DEPS_DB` say otherwise.
pub const DEFAULT_DB: &str = "/var/lib/guard/deps.db";

/// How long an SQLite writer waits for another one to finish (60 s).
/// Ingests are short transactions; a generous wait means concurrent
/// deploys queue rather than fail.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 60000";
/// In WAL mode, NORMAL syncs at checkpoints rather than at every commit:
/// a committed ingest survives guard or the host's processes dying, and
/// only a power cut may lose the last ones (which ingesting again repairs).
const SQLITE_SYNCHRONOUS: &str = "PRAGMA synchronous = NORMAL";

/// Rows per INSERT statement: few round trips, well under both backends'
/// limits on bound parameters (SQLite 32766, PostgreSQL 65535). SQLite's
/// statements are smaller: sqlx looks each parameter's name up, and that
/// lookup walks every parameter (quadratic: 500 rows a statement made an
/// ingest of 100,000 lookups take 10 s of CPU, 20 rows under 2 s).
const fn rows_per_statement(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 20,
        Backend::Postgres => 500,
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("dependency store {url}: {source}")]
    Database {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("dependency store {url}: schema migration failed: {source}")]
    Migration {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("dependency store {url}: {message}")]
    Invalid { url: String, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One deploy's lookups, ready to be stored.
#[derive(Clone, Debug)]
pub struct DeployRun {
    pub service: String,
    pub host: String,
    pub run_id: String,
    pub started_at: String,
    pub command: String,
    pub lookups: Vec<Lookup>,
}

/// One name a deploy resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub name: String,
    pub first_seen: String,
    pub query_types: BTreeMap<String, u64>,
    pub queries: u64,
    pub verdict: String,
    pub process_chain: String,
    pub via: String,
}

/// A service of the catalog, with the names it serves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub owner: Option<String>,
    pub tier: Option<i64>,
    pub names: Vec<String>,
}

/// A lookup with the service that serves its name (`None`: unclaimed).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resolution {
    pub service: String,
    pub host: String,
    pub run_id: String,
    pub name: String,
    pub first_seen: String,
    pub queries: i64,
    pub verdict: String,
    pub process_chain: String,
    pub via: String,
    pub serving_service: Option<String>,
}

/// Which resolutions to read.
#[derive(Clone, Copy, Debug)]
pub enum Filter<'a> {
    /// Lookups made by this service's deploys.
    MadeBy(&'a str),
    /// Lookups of names this service serves.
    ServedBy(&'a str),
    /// Lookups of this exact name.
    Name(&'a str),
    /// Lookups of names below this domain.
    Below(&'a str),
    /// Lookups of a name some other service serves (the graph's edges).
    Edges,
    /// Every lookup.
    All,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: String,
}

impl Store {
    /// Opens (creating if needed) the store at `location`: a
    /// `postgres://`/`postgresql://` URL, an `sqlite:` URL, or a file path.
    /// The schema is brought up to date.
    pub async fn open(location: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = connection_url(location)?;
        let shown = location.to_owned();
        let mut options = AnyPoolOptions::new().max_connections(4);
        if backend == Backend::Sqlite {
            options = options.after_connect(|connection, _| {
                Box::pin(async move {
                    for pragma in [SQLITE_BUSY_TIMEOUT, SQLITE_SYNCHRONOUS] {
                        sqlx::query(pragma).execute(&mut *connection).await?;
                    }
                    Ok(())
                })
            });
        }
        let pool = options
            .connect(&url)
            .await
            .map_err(|source| StoreError::Database {
                url: shown.clone(),
                source,
            })?;
        // Several first deploys may find no store and create it at once.
        // PostgreSQL's migrator takes a lock; on SQLite the losers of that
        // race fail (switching to WAL needs a lock the busy timeout does
        // not wait for, and the tables they meant to create now exist),
        // and on a second look find the schema in place.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match prepare(&pool, backend, &shown).await {
                Err(_) if backend == Backend::Sqlite && attempts < 5 => {
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempts)).await;
                }
                result => break result?,
            }
        }
        Ok(Store {
            pool,
            backend,
            url: shown,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn error(&self, source: sqlx::Error) -> StoreError {
        StoreError::Database {
            url: self.url.clone(),
            source,
        }
    }

    /// Stores one deploy's lookups in one transaction. Idempotent: each
    /// lookup is keyed by (service, host, run id, name), and merging a row
    /// into itself changes nothing (the larger count, the strictest
    /// verdict, the earliest time win), so ingesting the same file twice, or
    /// a run's report after its record, adds nothing twice.
    pub async fn ingest(&self, run: &DeployRun) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        // The first statement writes, so an SQLite transaction takes the
        // write lock at once (waiting on the busy timeout) instead of
        // failing to upgrade a read snapshot later.
        sqlx::query(
            "INSERT INTO deploy_runs (service, host, run_id, started_at, command) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (service, host, run_id) DO UPDATE SET \
             started_at = CASE WHEN excluded.started_at < deploy_runs.started_at \
                 THEN excluded.started_at ELSE deploy_runs.started_at END",
        )
        .bind(&run.service)
        .bind(&run.host)
        .bind(&run.run_id)
        .bind(&run.started_at)
        .bind(&run.command)
        .execute(&mut *transaction)
        .await
        .map_err(|e| self.error(e))?;
        // One row per name in a statement: PostgreSQL refuses to update the
        // same row twice in one INSERT ... ON CONFLICT.
        let mut merged: BTreeMap<&str, Lookup> = BTreeMap::new();
        for lookup in &run.lookups {
            match merged.get_mut(lookup.name.as_str()) {
                Some(existing) => merge(existing, lookup),
                None => {
                    merged.insert(&lookup.name, lookup.clone());
                }
            }
        }
        let rows: Vec<Lookup> = merged.into_values().collect();
        for chunk in rows.chunks(rows_per_statement(self.backend)) {
            // Built from numbered placeholders only; every value is bound.
            let mut query = sqlx::query(AssertSqlSafe(upsert_statement(chunk.len())));
            for lookup in chunk {
                query = query
                    .bind(&run.service)
                    .bind(&run.host)
                    .bind(&run.run_id)
                    .bind(&lookup.name)
                    .bind(&lookup.first_seen)
                    .bind(query_types_text(&lookup.query_types))
                    .bind(lookup.queries as i64)
                    .bind(&lookup.verdict)
                    .bind(severity(&lookup.verdict))
                    .bind(&lookup.process_chain)
                    .bind(&lookup.via);
            }
            query
                .execute(&mut *transaction)
                .await
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// Replaces the whole catalog (services and their names) in one
    /// transaction: loading a catalog again leaves exactly that catalog.
    pub async fn replace_catalog(
        &self,
        services: &[Service],
        source: &str,
    ) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        for statement in ["DELETE FROM service_names", "DELETE FROM services"] {
            sqlx::query(statement)
                .execute(&mut *transaction)
                .await
                .map_err(|e| self.error(e))?;
        }
        for service in services {
            sqlx::query("INSERT INTO services (name, owner, tier, source) VALUES ($1, $2, $3, $4)")
                .bind(&service.name)
                .bind(&service.owner)
                .bind(service.tier)
                .bind(source)
                .execute(&mut *transaction)
                .await
                .map_err(|e| self.error(e))?;
            for pattern in &service.names {
                let (exact, suffix) = match pattern.strip_prefix('*') {
                    Some(suffix) => (0i64, suffix.to_owned()),
                    None => (1i64, pattern.clone()),
                };
                sqlx::query(
                    "INSERT INTO service_names (service, pattern, exact, suffix) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&service.name)
                .bind(pattern)
                .bind(exact)
                .bind(suffix)
                .execute(&mut *transaction)
                .await
                .map_err(|e| self.error(e))?;
            }
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// Sets owners and tiers of services (adding services not yet in the
    /// catalog, with no names), leaving their names alone.
    pub async fn set_owners(
        &self,
        owners: &[(String, Option<String>, Option<i64>)],
        source: &str,
    ) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        for (service, owner, tier) in owners {
            sqlx::query(
                "INSERT INTO services (name, owner, tier, source) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, \
                 tier = COALESCE(excluded.tier, services.tier), source = excluded.source",
            )
            .bind(service)
            .bind(owner)
            .bind(*tier)
            .bind(source)
            .execute(&mut *transaction)
            .await
            .map_err(|e| self.error(e))?;
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// The catalog, services by name, each with its names.
    pub async fn services(&self) -> Result<Vec<Service>, StoreError> {
        let rows = sqlx::query("SELECT name, owner, tier FROM services ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        for row in rows {
            let service = Service {
                name: row.try_get("name").map_err(|e| self.error(e))?,
                owner: row.try_get("owner").map_err(|e| self.error(e))?,
                tier: row.try_get("tier").map_err(|e| self.error(e))?,
                names: Vec::new(),
            };
            services.insert(service.name.clone(), service);
        }
        let rows =
            sqlx::query("SELECT service, pattern FROM service_names ORDER BY exact DESC, pattern")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        for row in rows {
            let service: String = row.try_get("service").map_err(|e| self.error(e))?;
            let pattern: String = row.try_get("pattern").map_err(|e| self.error(e))?;
            if let Some(entry) = services.get_mut(&service) {
                entry.names.push(pattern);
            }
        }
        Ok(services.into_values().collect())
    }

    /// Lookups with the service serving each name, oldest first.
    pub async fn resolutions(&self, filter: Filter<'_>) -> Result<Vec<Resolution>, StoreError> {
        let (condition, argument) = match filter {
            Filter::MadeBy(service) => ("service = $1", Some(service.to_owned())),
            Filter::ServedBy(service) => ("serving_service = $1", Some(service.to_owned())),
            Filter::Name(name) => ("name = $1", Some(name.to_owned())),
            Filter::Below(base) => (
                "LENGTH(name) > LENGTH($1) AND SUBSTR(name, LENGTH(name) - LENGTH($1) + 1) = $1",
                Some(format!(".{base}")),
            ),
            Filter::Edges => (
                "serving_service IS NOT NULL AND serving_service <> service",
                None,
            ),
            Filter::All => ("1 = 1", None),
        };
        let sql = format!(
            "SELECT service, host, run_id, name, first_seen, queries, verdict, process_chain, \
             via, serving_service FROM resolutions WHERE {condition} \
             ORDER BY first_seen, service, host, run_id, name"
        );
        // The condition is one of the fixed texts above; values are bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(argument) = argument {
            query = query.bind(argument);
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| resolution(row).map_err(|e| self.error(e)))
            .collect()
    }

    /// How many lookup rows the store holds.
    pub async fn lookup_count(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT COUNT(*) AS n FROM lookups")
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get("n"))
            .map_err(|e| self.error(e))
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Puts SQLite in WAL mode (readers never wait for a writer; writers queue
/// on the busy timeout; the mode is kept in the file) and brings the
/// schema up to date.
async fn prepare(pool: &AnyPool, backend: Backend, url: &str) -> Result<(), StoreError> {
    if backend == Backend::Sqlite {
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(pool)
            .await
            .map_err(|source| StoreError::Database {
                url: url.to_owned(),
                source,
            })?;
    }
    MIGRATOR
        .run(pool)
        .await
        .map_err(|source| StoreError::Migration {
            url: url.to_owned(),
            source,
        })
}

fn resolution(row: &AnyRow) -> Result<Resolution, sqlx::Error> {
    Ok(Resolution {
        service: row.try_get("service")?,
        host: row.try_get("host")?,
        run_id: row.try_get("run_id")?,
        name: row.try_get("name")?,
        first_seen: row.try_get("first_seen")?,
        queries: row.try_get("queries")?,
        verdict: row.try_get("verdict")?,
        process_chain: row.try_get("process_chain")?,
        via: row.try_get("via")?,
        serving_service: row.try_get("serving_service")?,
    })
}

/// The sqlx URL and backend for a `--db` value.
fn connection_url(location: &str) -> Result<(String, Backend), StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        return Ok((location.to_owned(), Backend::Postgres));
    }
    if location.starts_with("sqlite:") {
        return Ok((location.to_owned(), Backend::Sqlite));
    }
    if location.contains("://") {
        return Err(StoreError::Invalid {
            url: location.to_owned(),
            message: "not a postgres:// URL nor an SQLite file path".into(),
        });
    }
    let path = Path::new(location);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::Invalid {
            url: location.to_owned(),
            message: format!("cannot create {}: {e}", parent.display()),
        })?;
    }
    // `mode=rwc`: create the file on first use. The path is percent-encoded
    // by the URL parser sqlx uses, so any file name works.
    let mut url = url_for_path(path);
    url.push_str("?mode=rwc");
    Ok((url, Backend::Sqlite))
}

fn url_for_path(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut url = String::from("sqlite://");
    for byte in absolute.as_os_str().as_encoded_bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(*byte as char)
            }
            other => url.push_str(&format!("%{other:02X}")),
        }
    }
    url
}

/// The statement that upserts `rows` lookups; merging keeps the larger
/// count (and its query types), the strictest verdict and the earliest
/// time, so it is idempotent and order-independent.
fn upsert_statement(rows: usize) -> String {
    const COLUMNS: usize = 11;
    let mut sql = String::from(
        "INSERT INTO lookups (service, host, run_id, name, first_seen, query_types, queries, \
         verdict, severity, process_chain, via) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * COLUMNS + column + 1));
        }
        sql.push(')');
    }
    sql.push_str(
        " ON CONFLICT (service, host, run_id, name) DO UPDATE SET \
         queries = CASE WHEN excluded.queries > lookups.queries \
             THEN excluded.queries ELSE lookups.queries END, \
         query_types = CASE WHEN excluded.queries > lookups.queries \
             THEN excluded.query_types ELSE lookups.query_types END, \
         verdict = CASE WHEN excluded.severity > lookups.severity \
             THEN excluded.verdict ELSE lookups.verdict END, \
         severity = CASE WHEN excluded.severity > lookups.severity \
             THEN excluded.severity ELSE lookups.severity END, \
         first_seen = CASE WHEN excluded.first_seen < lookups.first_seen \
             THEN excluded.first_seen ELSE lookups.first_seen END",
    );
    sql
}

/// Merges a second sighting of a name within one deploy, as the store
/// merges rows.
fn merge(existing: &mut Lookup, other: &Lookup) {
    if other.queries > existing.queries {
        existing.queries = other.queries;
        existing.query_types = other.query_types.clone();
    }
    if severity(&other.verdict) > severity(&existing.verdict) {
        existing.verdict = other.verdict.clone();
    }
    if other.first_seen < existing.first_seen {
        existing.first_seen = other.first_seen.clone();
    }
}

pub fn severity(verdict: &str) -> i64 {
    match verdict {
        "blocked" | "unreadable-blocked" => 2,
        "audited" | "unreadable-audited" => 1,
        _ => 0,
    }
}

/// "A=2 AAAA=1".
pub fn query_types_text(types: &BTreeMap<String, u64>) -> String {
    types
        .iter()
        .map(|(kind, count)| format!("{kind}={count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_select_the_backend() {
        assert_eq!(
            connection_url("postgres://u@localhost/db").unwrap().1,
            Backend::Postgres
        );
        let (url, backend) = connection_url("/tmp/guard deps.db").unwrap();
        assert_eq!(backend, Backend::Sqlite);
        assert_eq!(url, "sqlite:///tmp/guard%20deps.db?mode=rwc");
        assert!(connection_url("mysql://x/y").is_err());
    }

    #[test]
    fn upsert_numbers_every_parameter() {
        let sql = upsert_statement(2);
        assert!(sql.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11), ($12,"));
        assert!(sql.contains("$22)"));
        assert!(!sql.contains("$23"));
    }
}
