"""`adopt`: every step in order, each skipped when a previous run finished it.

    stage      sql/ replayed into wedefi_adopt; model copies of the app's tables dropped
    repoint    the new tables' foreign keys aimed at the app's "Token", "Wallet", "Protocol"
    capture    change-log triggers on the four old tables
    copy       each old table read once, in ctid ranges, into whole months (or TokenBalance's partitions)
    months     keys, indexes, foreign keys, bounds; ATTACH; months up to the horizon
    per group: replay the log, ANALYZE, verify, carry owner/grants/..., swap
    finish     sql/ recorded as applied, ANALYZE, INVALID indexes rebuilt, old tables dropped

A second `adopt` waits for the first (`adoption.run_lock_wait_s`), then refuses, naming it.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterator, Callable

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import copy, model, shadow, shape, state, swap
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.replay import Replayer
from wedefi_pipelines.adoption.session import (
    LOCK_JOURNAL,
    AdoptionError,
    connect,
    ON_POINT,
    crash_point,
    old,
    stage,
    with_lock_retries,
)
from wedefi_pipelines.adoption.verify import VerificationFailed, Verified, verify
from wedefi_pipelines.settings import Settings, current_settings

log = logging.getLogger(__name__)


class AdoptionBusy(AdoptionError):
    """Another `adopt` holds the adoption lock."""


def _holder(conn: psycopg.Connection, key: int) -> str:
    row = conn.execute(
        "SELECT a.pid, coalesce(a.application_name, ''), a.client_addr, a.backend_start, a.state"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 1",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
    if row is None:
        return "another session"
    pid, app, addr, started, status = row
    return (f"pid {pid} ({app or 'no application_name'}, from {addr or 'a local socket'}, "
            f"connected since {started:%Y-%m-%d %H:%M:%S %Z}, {status})")


@contextmanager
def run_lock(conn: psycopg.Connection, wait_s: float, announce=print) -> Iterator[None]:
    key = L.adopt_lock_key()
    deadline = time.monotonic() + wait_s
    announced = False
    while not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        holder = _holder(conn, key)
        if time.monotonic() >= deadline:
            raise AdoptionBusy(f"another `wedefi-pipelines adopt` is running on this database: {holder}; "
                               f"waited {wait_s:g}s (adoption.run_lock_wait_s). Let it finish, or stop it: "
                               "a re-run resumes where it stopped")
        if not announced:
            announce(f"waiting for the adoption already running: {holder}")
            announced = True
        time.sleep(0.5)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


@dataclass
class AdoptionReport:
    outcome: str  # 'adopted' | 'already adopted'
    done_now: list[str] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)
    verified: list[Verified] = field(default_factory=list)
    swaps: dict[str, dict] = field(default_factory=dict)
    unplaced: dict[str, dict[str, int]] = field(default_factory=dict)
    rebuilt_indexes: list[str] = field(default_factory=list)
    locks: list[tuple[str, int, float]] = field(default_factory=list)  # strong-lock steps: what, attempts, ms
    elapsed_s: float = 0.0

    def as_text(self) -> str:
        if self.outcome == "already adopted":
            return "already adopted: the four tables are partitioned and sql/ is recorded; nothing to do"
        lines = [f"adopted in {self.elapsed_s:.1f}s"]
        lines += [f"  verified {v.describe()}" for v in self.verified]
        for group, detail in self.swaps.items():
            lines.append(f"  swapped {group}: lock waited {detail.get('lock_wait_ms')} ms, held "
                         f"{detail.get('held_ms')} ms, {detail.get('replayed_under_lock')} change(s) replayed under it")
        total = sum(n for reasons in self.unplaced.values() for n in reasons.values())
        lines.append(f"  rows set aside (kept in public.{L.UNPLACED}): {total}")
        for table, reasons in self.unplaced.items():
            lines += [f"    {table}: {n} {reason}" for reason, n in reasons.items()]
        if self.rebuilt_indexes:
            lines.append(f"  INVALID indexes rebuilt: {', '.join(self.rebuilt_indexes)}")
        if self.locks:
            longest = max(self.locks, key=lambda x: x[2])
            lines.append(f"  other strong-lock steps: {len(self.locks)}, the longest {longest[2]:.0f} ms in all "
                         f"({longest[0]}, {longest[1]} attempt(s))")
        return "\n".join(lines)


def _step(report: AdoptionReport, name: str, started: float, say) -> None:
    report.done_now.append(name)
    say(f"{name} ({time.monotonic() - started:.1f}s)")


def adopt(url: str, settings: Settings | None = None, say=print, today: date | None = None,
          on_point: Callable[[str], None] | None = None) -> AdoptionReport:
    """Convert the database at `url` (or finish a conversion a previous run began).
    `on_point(name)` is called at each named point of the run (tests crash it there)."""
    if on_point is None:  # a hook set by the caller's context (a test's runner) stays
        return _adopt(url, settings, say, today)
    token = ON_POINT.set(on_point)
    try:
        return _adopt(url, settings, say, today)
    finally:
        ON_POINT.reset(token)


def _adopt(url: str, settings: Settings | None, say, today: date | None) -> AdoptionReport:
    settings = settings or current_settings()
    today = today or datetime.now(timezone.utc).date()
    started = time.monotonic()
    report = AdoptionReport("adopted")
    LOCK_JOURNAL.clear()
    with connect(url) as conn, run_lock(conn, settings.adoption.run_lock_wait_s, say):
        files = model.sql_files()
        if not state.in_progress(conn):
            target = model.read_model(conn)
            found = shape.check(conn, target)
            if found.state == "adopted" and not state.schema_exists(conn, L.OLD):
                report.outcome = "already adopted"
                return report
            if not found.ok:
                raise shape.AdoptionRefused(found.refusal())
            shadow.stage_tables(conn, files)
            _step(report, "staged: sql/ replayed into the staging schema", started, say)
            crash_point("after_stage")
        else:
            staged = {n: c for n, c in (state.detail(conn, "staged") or {}).get("files", [])}
            changed = [m.path.name for m in files if staged.get(m.path.name) != m.checksum]
            if changed:
                raise AdoptionError(f"sql/ changed since this adoption began ({', '.join(changed)}): its shadow tables "
                                    "follow the old files. Run `wedefi-pipelines adopt --abort`, then adopt again")
        if not state.done(conn, "repointed"):
            shadow.repoint(conn, settings.adoption)
            _step(report, "foreign keys of the new tables point at the app's tables", started, say)
            crash_point("after_repoint")
        if not state.done(conn, "captured"):
            shadow.capture(conn, settings.adoption)
            _step(report, "capturing the app's changes", started, say)
            crash_point("after_capture")
        _copy(conn, settings, report, started, say, today)
        for group in L.GROUPS:
            _swap_group(conn, group, settings, report, started, say)
        swap.record_sql(conn, url, settings)
        crash_point("after_migrate")
        swap.analyze(conn)
        report.rebuilt_indexes = swap.rebuild_invalid_indexes(conn)
        swap.drop_old(conn, settings)
        crash_point("after_drop_old")
        report.unplaced = state.unplaced_counts(conn)
        swap.drop_staging(conn)
        _step(report, "finished: sql/ recorded, old tables dropped", started, say)
    report.locks = list(LOCK_JOURNAL)
    report.elapsed_s = time.monotonic() - started
    return report


def _copy(conn: psycopg.Connection, settings: Settings, report: AdoptionReport, started: float, say, today: date) -> None:
    for table in L.CONVERTED:
        if state.done(conn, f"copied:{table.name}"):
            continue
        if table.range is not None and not state.done(conn, f"loader:{table.name}"):
            months = copy.create_loader(conn, table, today)
            say(f"{table.name}: {len(months)} month(s) with rows")
        copied = copy.copy_ranges(conn, table, settings)
        with conn.transaction():
            state.mark(conn, f"copied:{table.name}", {"rows": state.progress(conn, table.name).copied})
        report.copied[table.name] = copied
        _step(report, f"{table.name}: copied", started, say)
    crash_point("after_copy")
    for table in L.CONVERTED:
        if table.range is None or state.done(conn, f"loaded:{table.name}"):
            continue
        months = copy.loader_months(conn, table)
        for month in months:
            copy.finish_keys(conn, table, month)
        crash_point("after_keys")
        for month in months:
            copy.finish_foreign_keys(conn, table, month, settings)
        crash_point("after_fks")
        copy.attach_months(conn, table, months, settings)
        crash_point("after_attach")
        copy.place_loader_default(conn, table)
        _step(report, f"{table.name}: {len(months)} month(s) attached", started, say)
    for table in L.CONVERTED:
        if table.range is not None and not state.done(conn, f"provisioned:{table.name}"):
            copy.provision(conn, table, settings, today)
            with conn.transaction():
                state.mark(conn, f"provisioned:{table.name}")
    crash_point("after_horizon")
    for table in L.CONVERTED:
        swap.move_partitions(conn, table)
    crash_point("after_partitions")


def _swap_group(conn: psycopg.Connection, group: tuple[str, ...], settings: Settings, report: AdoptionReport,
                started: float, say) -> None:
    label = L.group_label(group)
    if state.done(conn, f"swapped:{label}"):
        return
    tables = [L.BY_NAME[n] for n in group]
    replayer = Replayer(conn, tables)
    replayer.drain(settings.adoption.replay_batch, until=settings.adoption.swap_max_pending)
    for name in group:
        conn.execute(sql.SQL("ANALYZE {}").format(stage(name)))
    results = verify(conn, tables)
    if not all(r.ok for r in results):  # a TRUNCATE mid-way, say: replay it, then prove again
        replayer.drain(settings.adoption.replay_batch, until=0)
        results = verify(conn, tables)
    bad = [r for r in results if not r.ok]
    if bad:
        raise VerificationFailed("the new tables do not match the old ones, nothing was swapped: "
                                 + "; ".join(r.describe() for r in bad))
    report.verified += results
    say("verified " + "; ".join(r.describe() for r in results))
    crash_point("after_verify")
    swap.carry_before_swap(conn, group, settings)
    report.swaps[label] = swap.swap_group(conn, group, settings, replayer)
    _step(report, f"swapped {label}", started, say)
    crash_point("after_swap")


def abort(url: str, settings: Settings | None = None, say=print) -> bool:
    """Undo an adoption that has not swapped anything yet: the capture triggers and the
    staging schema go, the app's tables are as they were. Returns False if none was running."""
    settings = settings or current_settings()
    with connect(url) as conn, run_lock(conn, settings.adoption.run_lock_wait_s, say):
        if not state.in_progress(conn):
            return False
        swapped = [s for s, _ in state.steps(conn) if s.startswith("swapped:")]
        if swapped:
            raise AdoptionError(f"{', '.join(s.split(':', 1)[1] for s in swapped)} already swapped: the app is using "
                                "the new tables; finish with `wedefi-pipelines adopt` (see docs/adoption.md, rollback)")
        for table in L.CONVERTED:
            triggers = [r[0] for r in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE %s",
                (old(table.name).as_string(conn), L.CAPTURE_TRIGGER_PREFIX + "%"))]
            if triggers:
                def work(table=table, triggers=triggers) -> None:
                    for trigger in triggers:
                        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), old(table.name)))
                with_lock_retries(conn, settings.adoption, f"removing the capture triggers from {table.name}", work,
                                  [old(table.name).as_string(conn)])
        with conn.transaction():
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(L.STAGE)))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(L.OLD)))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(L.APP_SCHEMA, L.UNPLACED)))
    return True
