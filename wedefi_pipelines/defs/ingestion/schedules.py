"""Ingestion at the seed's cadence: prices every 15 minutes (~100 updates a day), balances,
portfolio and positions every 5 minutes, governance locks every 30 minutes (the cache's
TTL), correlations daily. Each run's tick is its scheduled time, passed in its config, so
a late or retried run captures the tick it was scheduled for.

They default to STOPPED: the balance, position and governance source is the synthetic
market until a real one is configured, and a schedule that starts by itself would write
synthetic wallets into a production database. Turn them on in the UI (or set
default_status) once the sources are real.
"""

import dagster as dg

from wedefi_pipelines.defs.ingestion.assets import PORTFOLIO_OP
from wedefi_pipelines.defs.ingestion.jobs import (
    asset_correlations_job,
    governance_locks_job,
    portfolio_tick_job,
    price_snapshots_job,
)


@dg.schedule(name="price_snapshots_every_15_minutes", cron_schedule="*/15 * * * *", job=price_snapshots_job,
             execution_timezone="UTC", description="Today's price_snapshots partition: adds the new ticks.")
def price_snapshots_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time.date().isoformat()
    return dg.RunRequest(partition_key=day, tags={"wedefi/tick": context.scheduled_execution_time.isoformat()})


def _tick_config(context: dg.ScheduleEvaluationContext, *ops: str) -> dict:
    tick = context.scheduled_execution_time.isoformat()
    return {"ops": {op: {"config": {"tick": tick}} for op in ops}}


@dg.schedule(name="portfolio_tick_every_5_minutes", cron_schedule="*/5 * * * *", job=portfolio_tick_job,
             execution_timezone="UTC", description="Balance sync, portfolio and position rows of the tick.")
def portfolio_tick_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_config=_tick_config(context, "token_balances", PORTFOLIO_OP))


@dg.schedule(name="governance_locks_every_30_minutes", cron_schedule="*/30 * * * *", job=governance_locks_job,
             execution_timezone="UTC")
def governance_locks_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_config=_tick_config(context, "governance_locks"))


@dg.schedule(name="asset_correlations_daily", cron_schedule="30 0 * * *", job=asset_correlations_job,
             execution_timezone="UTC")
def asset_correlations_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    as_of = context.scheduled_execution_time.isoformat()
    return dg.RunRequest(run_config={"ops": {"asset_correlations": {"config": {"as_of": as_of}}}})


schedules = [price_snapshots_schedule, portfolio_tick_schedule, governance_locks_schedule, asset_correlations_schedule]
