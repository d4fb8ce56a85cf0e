"""The platform's own health (issue 15, item 2), judged from the month catalog: months
provisioned ahead, rows stuck in default partitions, months past their tier still in
PostgreSQL, archive runs left half-way."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.health.rules.findings import Finding
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.policy import Action, decide, decide_group


def _months(months) -> str:
    names = [p.month_year(m) for m in sorted(months)]
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}..{names[-1]} ({len(names)} months)"


def horizon_finding(table: catalog.TableState, today: date, settings: Settings) -> Finding:
    """The current month and the next partitions.horizon_months must exist (or be archived)."""
    wanted = p.horizon_months(today, settings.partitions.horizon_months)
    missing = [m for m in wanted if m not in table.covered]
    name = table.table.name
    current_missing = p.month_of(today) in missing
    summary = (f"{name}: {_months(missing)} not provisioned (horizon {settings.partitions.horizon_months} months)"
               if missing else f"{name}: provisioned through {p.month_year(wanted[-1])}")
    return Finding("partition_horizon", name, bool(missing), summary,
                   {"missing_months": [p.month_year(m) for m in missing], "current_month_missing": current_missing},
                   severity=None if current_missing or not missing else "warning")


def default_rows_finding(table: catalog.TableState, archived: set[date]) -> Finding:
    """Rows of a month that has (or should have) a child, still in the default partition.
    Rows of archived months (the cold archive takes them) and rows with no partition key
    yet (complete_positions places them) are reported, not judged."""
    name = table.table.name
    stuck = {m: n for m, n in table.default_rows.items() if m not in archived}
    late = {m: n for m, n in table.default_rows.items() if m in archived}
    rows = sum(n or 0 for n in stuck.values())
    summary = (f"{name}: {rows} row(s) of {_months(stuck)} wait in {p.default_name(table.table)}" if stuck
               else f"{name}: no row stuck in the default partition")
    return Finding("default_rows", name, bool(stuck), summary,
                   {"rows": rows, "months": {p.month_year(m): n for m, n in sorted(stuck.items())},
                    "late_rows_of_archived_months": {p.month_year(m): n for m, n in sorted(late.items())},
                    "rows_waiting_for_complete_positions": table.null_key_rows or 0})


def due_since(month: date, action: Action, settings: Settings, table: str) -> datetime:
    """When the action became due at the latest: the month's end plus the tier's age (any
    row of the month is at least that old by then)."""
    ages = settings.tiers.for_table(table)
    days = ages.cold_days if action is Action.ARCHIVE else ages.hot_days
    return p.month_bounds(month)[1] + timedelta(days=days)


def overdue_finding(table: catalog.TableState, group: dict[date, list[catalog.MonthState]], now: datetime,
                    settings: Settings) -> Finding:
    """Months whose scheduled warm conversion or archive has been due longer than the grace."""
    now = p.to_utc_naive(now)
    grace = timedelta(hours=settings.monitoring.platform_overdue_grace_h)
    name = table.table.name
    overdue: dict[str, list[str]] = {"warm": [], "cold": []}
    for month, state in table.months.items():
        warm = decide(state, now, settings)
        cold = decide_group(group.get(month, [state]), now, settings)
        for decision, tier in ((warm, "warm"), (cold, "cold")):
            wanted = Action.WARM if tier == "warm" else Action.ARCHIVE
            if (decision.action is wanted and decision.scheduled and state.attached
                    and now - due_since(month, wanted, settings, name) > grace):
                overdue[tier].append(p.month_year(month))
    found = overdue["warm"] + overdue["cold"]
    summary = (f"{name}: still in PostgreSQL past their tier: warm {overdue['warm'] or 'none'}, cold "
               f"{overdue['cold'] or 'none'}" if found else f"{name}: every month is in its tier")
    return Finding("tier_overdue", name, bool(found), summary,
                   {"warm_overdue": overdue["warm"], "cold_overdue": overdue["cold"],
                    "grace_h": settings.monitoring.platform_overdue_grace_h})


def unfinished_finding(table: catalog.TableState, running: set[tuple[str, date]]) -> Finding:
    """Frozen tables left by an archive run that is not running any more."""
    name = table.table.name
    left = {m: s.frozen_relations for m, s in table.months.items()
            if s.frozen and (table.table.group, m) not in running}
    summary = (f"{name}: an archive run of {_months(left)} stopped half-way" if left
               else f"{name}: no archive run left half-way")
    return Finding("archive_unfinished", name, bool(left), summary,
                   {"frozen": {p.month_year(m): names for m, names in sorted(left.items())}})
