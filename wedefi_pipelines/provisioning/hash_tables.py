"""Hash-partitioned tables ("TokenBalance"): exactly `modulus` partitions, a missing one recreated."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from wedefi_pipelines import catalog, locks, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning.ensure import DEFAULT_POLICY, LockPolicy


@dataclass(frozen=True)
class HashReport:
    table: str
    modulus: int
    present: tuple[int, ...]
    created: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    def summary(self) -> dict:
        return {"modulus": self.modulus, "present": list(self.present), "created": list(self.created),
                "problems": list(self.problems)}


_HASH_BOUND = re.compile(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)", re.IGNORECASE)


def hash_partitions(conn: psycopg.Connection, table: p.HashTable) -> dict[str, tuple[int, int]]:
    """name -> (modulus, remainder) of every partition attached to a hash-partitioned table."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        (psycopg.sql.Identifier(table.name).as_string(conn),),
    )
    found = {}
    for name, bound in rows:
        match = _HASH_BOUND.search(bound or "")
        found[name] = (int(match.group(1)), int(match.group(2))) if match else (0, -1)
    return found


def verify_hash_partitions(
    conn: psycopg.Connection, table: p.HashTable = p.TOKEN_BALANCE, *, policy: LockPolicy = DEFAULT_POLICY,
) -> HashReport:
    """Check the table has exactly its `modulus` hash partitions; recreate a missing one
    (an INSERT whose hash lands in a hole fails, so the app would lose writes), unless its
    name is taken by a detached table or the layout is not ours, which are reported."""
    with conn.transaction():
        found = hash_partitions(conn, table)
    problems = [f"{table.name}: partition {name} has bound modulus {mod} remainder {rem}, expected modulus {table.modulus}"
                for name, (mod, rem) in sorted(found.items()) if mod != table.modulus]
    present = sorted(rem for mod, rem in found.values() if mod == table.modulus)
    missing = [r for r in range(table.modulus) if r not in present]
    created: list[int] = []
    if problems:
        return HashReport(table.name, table.modulus, tuple(present), (), tuple(problems))
    for remainder in missing:
        name = p.hash_partition_name(table, remainder)

        def attempt(_: int) -> None:
            with conn.transaction():
                locks.set_timeout(conn, "lock_timeout", policy.lock_timeout_ms)
                if catalog.relation_exists(conn, name):
                    problems.append(f"{table.name}: no partition for remainder {remainder}, and {name} "
                                    "exists unattached: attach or rename it by hand")
                    return
                month_ops.create_hash_partition(conn, table, remainder)
                created.append(remainder)

        try:
            locks.with_lock_retries(policy, f"creating {name}", attempt)
        except (psycopg.Error, locks.LockContention) as exc:
            problems.append(f"{table.name}: could not create {name}: {str(exc).strip()}")
    return HashReport(table.name, table.modulus, tuple(sorted(present + created)), tuple(created), tuple(problems))
