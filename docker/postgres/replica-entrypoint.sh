#!/bin/sh
# Entrypoint of the streaming replica: on first start, clone the primary with
# `pg_basebackup -R` under this replica's application_name (without it every replica
# streams as "walreceiver", and lag probes and alerts cannot say which one lags), then
# hand over to the official image's entrypoint, which starts it as a hot standby.
set -eu
: "${PGDATA:?}" "${PRIMARY_HOST:?set PRIMARY_HOST}" "${REPLICA_NAME:?set REPLICA_NAME}"
: "${REPLICATION_USER:?set REPLICATION_USER}" "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD in docker/.env}"

case "$REPLICATION_PASSWORD$REPLICA_NAME" in
  *[!A-Za-z0-9_-]*)
    echo "REPLICATION_PASSWORD and REPLICA_NAME may only hold letters, digits, _ and - (e.g. openssl rand -hex 32)" >&2
    exit 64 ;;
esac

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  conninfo="host=$PRIMARY_HOST port=${PRIMARY_PORT:-5432} user=$REPLICATION_USER application_name=$REPLICA_NAME"
  until gosu postgres pg_isready --quiet --dbname "$conninfo"; do
    echo "waiting for $PRIMARY_HOST" >&2
    sleep 2
  done
  # Clone into a fresh folder and move it into place only once complete: a crash midway
  # leaves no half-copied data directory that a restart would mistake for a valid one.
  staging="$PGDATA.basebackup"
  rm -rf "$staging"
  install -d -o postgres -g postgres -m 0700 "$staging"
  PGPASSWORD="$REPLICATION_PASSWORD" gosu postgres pg_basebackup --dbname "$conninfo" --pgdata "$staging" \
    --write-recovery-conf --wal-method=stream --checkpoint=fast
  # -R wrote primary_conninfo from the connection; state it explicitly so the password and
  # application_name survive restarts whatever pg_basebackup chose to keep.
  echo "primary_conninfo = '$conninfo password=$REPLICATION_PASSWORD'" >> "$staging/postgresql.auto.conf"
  rm -rf "$PGDATA"
  mv "$staging" "$PGDATA"
fi

exec docker-entrypoint.sh "$@"
