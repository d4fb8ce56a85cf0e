-- Health monitoring (issue 7). WeDefiDaily's "Alert"/"AlertDelivery" tables (0001) are
-- used as they are; this adds only what the probes and reports need.

-- pg_stat_statements' view lives in each database that creates the extension (the library
-- itself must be in shared_preload_libraries). It is not a trusted extension: where this
-- role may not create it, warn instead of failing, and the slow-query probes name the fix.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
    RAISE WARNING 'pg_stat_statements not created (%): ask a superuser to run CREATE EXTENSION pg_stat_statements', SQLERRM;
END
$$;

-- The slow_query_report's window: pg_stat_statements is cumulative, so each report stores
-- the figures it saw, per server, under its Dagster run id, and the next report subtracts
-- the figures of the previous *materialized* report (a run that crashed after writing
-- here does not shorten the window). Rows of older runs are pruned by the report.
CREATE TABLE IF NOT EXISTS wedefi_health_statement_baseline (
    run_id           TEXT             NOT NULL,
    server           TEXT             NOT NULL,
    queryid          BIGINT           NOT NULL,
    calls            BIGINT           NOT NULL,
    total_exec_ms    DOUBLE PRECISION NOT NULL,
    max_exec_ms      DOUBLE PRECISION NOT NULL,
    rows             BIGINT           NOT NULL,
    shared_blks_hit  BIGINT           NOT NULL,
    shared_blks_read BIGINT           NOT NULL,
    read_time_ms     DOUBLE PRECISION NOT NULL,
    stats_reset      TIMESTAMPTZ,
    captured_at      TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, server, queryid)
);
