-- The deploy-time dependency map (`guard deps`). One schema for SQLite and
-- PostgreSQL: only types and statements both speak (TEXT, BIGINT, composite
-- keys, INSERT ... ON CONFLICT, window functions). Times are RFC 3339 UTC
-- text, which sorts as time does.

-- One row per guarded deploy (a `guard run`) that was ingested.
CREATE TABLE deploy_runs (
    service TEXT NOT NULL,
    host TEXT NOT NULL,
    run_id TEXT NOT NULL,
    started_at TEXT NOT NULL,
    command TEXT NOT NULL,
    PRIMARY KEY (service, host, run_id)
);

-- One row per name a deploy resolved: the unique key makes ingest
-- idempotent (ingesting the same report twice changes nothing).
CREATE TABLE lookups (
    service TEXT NOT NULL,
    host TEXT NOT NULL,
    run_id TEXT NOT NULL,
    -- Lower case, no trailing dot.
    name TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    -- Queries by type, "A=2 AAAA=1".
    query_types TEXT NOT NULL,
    queries BIGINT NOT NULL,
    -- allowed, audited, blocked, unreadable-audited, unreadable-blocked.
    verdict TEXT NOT NULL,
    -- 0 allowed, 1 audited, 2 blocked: the strictest verdict wins a merge.
    severity BIGINT NOT NULL,
    -- The asking process and its ancestors, "sh[10] → deploy.sh[11] → curl[12]".
    process_chain TEXT NOT NULL,
    -- A name reached through an answer (a CNAME, SRV, ... target): the
    -- question that led to it; empty for names asked directly.
    via TEXT NOT NULL,
    PRIMARY KEY (service, host, run_id, name)
);
CREATE INDEX lookups_by_name ON lookups (name);

-- The service catalog (`guard deps catalog`, or owners imported from a
-- dependency-management-data database).
CREATE TABLE services (
    name TEXT PRIMARY KEY,
    owner TEXT,
    -- 1 is the most business-critical.
    tier BIGINT,
    -- Where the entry came from (the catalog file, the imported database).
    source TEXT NOT NULL
);

-- The names each service serves: `frontend.internal` (exact) or
-- `*.frontend.internal` (every name below it).
CREATE TABLE service_names (
    service TEXT NOT NULL,
    pattern TEXT NOT NULL,
    -- 1 for an exact name, 0 for a `*.` pattern.
    exact BIGINT NOT NULL,
    -- What a name must equal (exact) or end with (".frontend.internal").
    suffix TEXT NOT NULL,
    PRIMARY KEY (service, pattern)
);

-- The service that serves each resolved name: an exact name wins over a
-- pattern, a longer pattern over a shorter one.
CREATE VIEW claimed_names AS
SELECT name, service FROM (
    SELECT resolved.name, claims.service,
        ROW_NUMBER() OVER (
            PARTITION BY resolved.name
            ORDER BY claims.exact DESC, LENGTH(claims.suffix) DESC, claims.service
        ) AS claim_rank
    FROM (SELECT DISTINCT name FROM lookups) resolved
    JOIN service_names claims
      ON (claims.exact = 1 AND resolved.name = claims.suffix)
      OR (claims.exact = 0
          AND LENGTH(resolved.name) > LENGTH(claims.suffix)
          AND SUBSTR(resolved.name, LENGTH(resolved.name) - LENGTH(claims.suffix) + 1) = claims.suffix)
) ranked
WHERE claim_rank = 1;

-- Every lookup with the service serving its name (NULL: unclaimed).
CREATE VIEW resolutions AS
SELECT lookups.*, claimed_names.service AS serving_service
FROM lookups LEFT JOIN claimed_names ON claimed_names.name = lookups.name;

-- Owners and tiers, as dependency-management-data's `owners` table names them.
CREATE VIEW owners AS
SELECT name AS service, owner, tier FROM services;

-- The service graph: a deploy of from_service resolved a name to_service
-- serves. One row per lookup, so every edge keeps its witnesses.
CREATE VIEW edges AS
SELECT service AS from_service, serving_service AS to_service, name, host, run_id,
    first_seen, queries, verdict, process_chain
FROM resolutions
WHERE serving_service IS NOT NULL AND serving_service <> service;
