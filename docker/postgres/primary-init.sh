#!/bin/sh
# Runs once, when the official postgres image initialises the primary's empty data
# directory (/docker-entrypoint-initdb.d): the replication role and its pg_hba line, and
# pg_stat_statements in the app database (the library is preloaded by compose's command).
set -eu
: "${REPLICATION_USER:?set REPLICATION_USER}" "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD in docker/.env}"

psql --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --set repl_user="$REPLICATION_USER" --set repl_password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"repl_user" WITH LOGIN REPLICATION PASSWORD :'repl_password';
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SQL

echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
