"""The lock registry: every advisory key keeps the value it had before the registry, so an
old and a new process (a rolling deploy) still exclude each other."""

import random
import string
import threading

import pytest

from wedefi_pipelines import locks
from wedefi_pipelines.pghash import hashtextextended

# Values computed by the code before the registry existed (sha256/crc32/hashtextextended forms).
PINNED = {
    ("migrations",): (5155552788575344538,),
    ("provisioning.run",): (-1986044321864314005,),
    ("provisioning.table", "PriceSnapshot"): (8725556397710758697,),
    ("provisioning.table", "PortfolioSnapshot"): (-37084341460106518,),
    ("provisioning.table", "PositionSnapshot"): (-1687938929422827780,),
    ("tiering.month", "PriceSnapshot", "2025-01"): (1465141573, -1731446631),
    ("tiering.month", "PortfolioSnapshot", "2024-12"): (1465141573, -295344180),
    ("ingest.price_day", 20000): (-1845351269, 20000),
    ("ingest.portfolio_tick", 29000000): (-750486826, 29000000),
    ("ingest.balances",): (791104951,),
    ("ingest.governance",): (-1196303425,),
    ("alerting.incident", "wedefi-pipelines:replication_lag:wedefi_read"): (-6178005058087222807,),
}


@pytest.mark.parametrize("args, expected", PINNED.items(), ids=[" ".join(map(str, a)) for a in PINNED])
def test_advisory_keys_keep_their_values(args, expected):
    assert locks.advisory_key(*args) == expected


def test_keys_are_distinct_and_the_registry_is_documented():
    keys = [locks.advisory_key(*args) for args in PINNED]
    assert len(set(keys)) == len(keys)
    for lock in locks.LOCKS.values():
        assert lock.guards and lock.taken_by and lock.scope in ("session", "transaction")
    with pytest.raises(ValueError, match="unknown advisory lock 'nope'"):
        locks.advisory_key("nope")


def test_hashtextextended_port_matches_postgresql(db):
    rnd = random.Random(7)
    texts = ["", "a", "abcdefghijkl", "abcdefghijklm", "é漢字 wallet"] + [
        "".join(rnd.choice(string.printable) for _ in range(rnd.randint(0, 40))) for _ in range(60)]
    with db.connect() as conn:
        for text in texts:
            for seed in (0, 3, 2**40 + 9):
                server = conn.execute("SELECT hashtextextended(%s, %s)", (text, seed)).fetchone()[0]
                assert hashtextextended(text, seed) == server, (text, seed)


def test_a_session_lock_excludes_the_same_key_taken_the_old_way(db):
    """An old process locks with the raw SQL it always used; a new one must wait for it."""
    with db.connect() as old, db.connect() as new:
        old.execute("SELECT pg_advisory_lock(%s, %s)", (0x57544945, locks.advisory_key("tiering.month", "PriceSnapshot", "2025-01")[1]))
        with pytest.raises(locks.LockBusy, match=f"pid {old.info.backend_pid}"):
            with locks.session_lock(new, "tiering.month", "PriceSnapshot", "2025-01", wait_s=0.3):
                pass
        old.execute("SELECT pg_advisory_unlock_all()")
        with locks.session_lock(new, "tiering.month", "PriceSnapshot", "2025-01", wait_s=0.3):
            assert not locks.try_session_lock(old, "tiering.month", "PriceSnapshot", "2025-01")


def test_xact_lock_serialises_and_lock_retries_name_the_holder(db):
    with db.connect() as holder, db.connect(autocommit=False) as waiter:
        holder.execute('CREATE TABLE busy (x int)')
        holder.execute("BEGIN")
        holder.execute('LOCK TABLE busy IN ACCESS EXCLUSIVE MODE')
        policy = locks.LockPolicy(lock_timeout_ms=50, retries=1, backoff_s=0.01)
        calls = []

        def attempt(n):
            calls.append(n)
            with waiter.transaction():
                locks.set_timeout(waiter, "lock_timeout", policy.lock_timeout_ms)
                waiter.execute("LOCK TABLE busy IN SHARE MODE")

        with pytest.raises(locks.LockContention, match="no lock after 2 attempts of 50 ms") as raised:
            locks.with_lock_retries(policy, "locking busy", attempt,
                                    held_by=lambda: locks.blockers(waiter, ["busy"]))
        assert calls == [1, 2] and f"pid {holder.info.backend_pid}" in raised.value.held_by
        holder.execute("ROLLBACK")
        released = threading.Event()
        locks.with_lock_retries(policy, "locking busy", lambda n: (attempt(n), released.set()))
        assert released.is_set()


def test_timeouts_are_transaction_local_unless_asked(db):
    with db.connect(autocommit=False) as conn:
        with conn.transaction():
            locks.set_timeout(conn, "statement_timeout", 1234)
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
        locks.set_timeout(conn, "lock_timeout", 2000, local=False)
        conn.commit()
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "2s"


def test_month_keys_differ_by_month():
    assert locks.advisory_key("tiering.month", "PriceSnapshot", "2025-01") != \
        locks.advisory_key("tiering.month", "PriceSnapshot", "2025-02")
    assert all(-2**31 <= v < 2**31 for v in locks.advisory_key("tiering.month", "PortfolioSnapshot", "2025-01"))
