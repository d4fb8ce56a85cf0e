"""Replication lag, measured the one way that stays right on an idle primary.

`now() - pg_last_xact_replay_timestamp()` on a replica grows while the primary is idle,
so lag comes from `pg_stat_replication` on the primary: byte lag
(`pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)`) and `replay_lag`. Byte lag 0 means
lag 0 (after a catch-up, `replay_lag` keeps a stale value for seconds). A replica is
named by the `application_name` it streams under, which it reports itself in
`pg_stat_wal_receiver.conninfo`. Both the read routing and the health sensors use these
functions, so a replica skipped for reads is the one the lag alert names.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

# walreceiver's own fallback_application_name: what pg_basebackup -R gives every replica
DEFAULT_WALRECEIVER_NAME = "walreceiver"


@dataclass(frozen=True)
class ReplicaLag:
    application_name: str
    client_addr: str | None
    state: str
    byte_lag: int
    replay_lag_ms: float | None

    @property
    def lag_ms(self) -> float:
        """Byte lag 0 means caught up, whatever stale value replay_lag still shows."""
        if self.byte_lag <= 0:
            return 0.0
        return self.replay_lag_ms or 0.0

    def as_dict(self) -> dict:
        return {
            "replica": self.application_name,
            "client_addr": self.client_addr,
            "state": self.state,
            "byte_lag": self.byte_lag,
            "replay_lag_ms": self.replay_lag_ms,
            "lag_ms": self.lag_ms,
        }


def replica_name(replica: psycopg.Connection) -> str:
    """The application_name this replica streams under, as it reports it itself.

    Needs pg_read_all_stats (or superuser) to see the conninfo; without it, or when the
    server is not a streaming standby, raises a ValueError saying so.
    """
    row = replica.execute(
        "SELECT pg_is_in_recovery(), (SELECT conninfo FROM pg_stat_wal_receiver LIMIT 1)"
    ).fetchone()
    in_recovery, conninfo = row
    if not in_recovery:
        raise ValueError("this server is not a replica (pg_is_in_recovery() is false)")
    if not conninfo:
        raise ValueError(
            "pg_stat_wal_receiver shows no conninfo: the replica is not streaming, or this role "
            "lacks pg_read_all_stats"
        )
    params = conninfo_to_dict(conninfo)
    return params.get("application_name") or params.get("fallback_application_name") or DEFAULT_WALRECEIVER_NAME


def replication_lag(primary: psycopg.Connection) -> dict[str, ReplicaLag]:
    """Every streaming standby the primary sees, by application_name."""
    rows = primary.execute(
        """
        SELECT application_name,
               client_addr::text,
               state,
               COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint,
               EXTRACT(EPOCH FROM replay_lag) * 1000.0
          FROM pg_stat_replication
        """
    ).fetchall()
    return {
        name: ReplicaLag(
            application_name=name,
            client_addr=addr,
            state=state,
            byte_lag=int(byte_lag),
            replay_lag_ms=float(replay) if replay is not None else None,
        )
        for name, addr, state, byte_lag, replay in rows
    }
