"""partition_safety_sensor: the pure decision (what a horizon run would change, its run
key), and the sensor evaluated in-process against a real database (test_daemon.py runs it
in the daemon)."""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.definitions import defs
from wedefi_pipelines.provisioning import safety
from wedefi_pipelines.defs.maintenance.sensors import HORIZON_JOB, TAG_PENDING, partition_safety_sensor
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import Settings

TODAY = date(2025, 6, 14)
START = date(2024, 1, 1)
HORIZON = p.months_between(date(2025, 6, 1), date(2025, 12, 1))


def _work(attached=(), archived=(), default=(), table="PriceSnapshot") -> safety.TableWork:
    plan = provisioning.plan_horizon(TODAY, 6, attached, archived, default, START)
    return safety.table_work(table, plan, default)


# -- the decision ---------------------------------------------------------------------------


def test_an_empty_table_needs_its_whole_horizon():
    work = _work()
    assert work.create == tuple(HORIZON) and work.drain == () and work.pending
    assert work.describe() == "PriceSnapshot: create 2025-06..2025-12 (7 months)"


def test_a_covered_horizon_with_an_empty_default_needs_nothing():
    assert not _work(attached=HORIZON).pending
    older = p.months_between(date(2025, 1, 1), date(2025, 5, 1))
    assert not _work(attached=[*older, *HORIZON[1:]], archived=[HORIZON[0]]).pending  # archived counts as covered
    gap = _work(attached=[*older[:2], *HORIZON])  # a month missing between children is work
    assert gap.create == (date(2025, 3, 1), date(2025, 4, 1), date(2025, 5, 1))


def test_default_rows_of_a_missing_month_are_drained_filling_the_gap():
    work = _work(attached=HORIZON, default=[date(2025, 3, 1)])
    assert work.create == (date(2025, 3, 1), date(2025, 4, 1), date(2025, 5, 1))
    assert work.drain == (date(2025, 3, 1),)
    assert "drain the default partition of 2025-03" in work.describe()


@pytest.mark.parametrize("month", [date(2024, 3, 1), date(2019, 1, 1), date(2031, 1, 1)],
                         ids=["archived", "before-start-and-every-child", "more-than-60-months-ahead"])
def test_rows_the_horizon_leaves_in_the_default_do_not_trigger_a_run(month):
    attached = p.months_between(date(2024, 4, 1), HORIZON[-1])
    work = _work(attached=attached, archived=[date(2024, 3, 1)], default=[month])
    assert not work.pending, work


def test_the_run_key_names_the_day_and_changes_with_the_work():
    first = [_work(), _work(attached=HORIZON, table="PositionSnapshot")]
    key = safety.run_key(TODAY, first)
    assert key.startswith("partition_safety:2025-06-14:")
    assert safety.run_key(TODAY, list(reversed(first))) == key  # order of tables does not matter
    assert safety.run_key(TODAY + timedelta(days=1), first) != key  # the next day asks again
    assert safety.run_key(TODAY, [_work(attached=HORIZON[:3])]) != key  # other work, its own run
    assert safety.run_key(TODAY, [_work(attached=HORIZON)]) is None
    assert safety.summary([_work(attached=HORIZON)]).startswith("every month of the horizon exists")


# -- the sensor on a real database ----------------------------------------------------------


def _evaluate(instance: dg.DagsterInstance):
    with dg.build_sensor_context(instance=instance, resources={"database": DatabaseResource()}) as context:
        return partition_safety_sensor(context)


def test_the_sensor_requests_the_horizon_job_until_the_horizon_exists(db_env):
    job = defs.resolve_job_def(HORIZON_JOB)
    with dg.DagsterInstance.ephemeral() as instance:
        request = _evaluate(instance)
        assert isinstance(request, dg.RunRequest), request
        today = datetime.now(timezone.utc).date()
        assert request.run_key.startswith(f"partition_safety:{today.isoformat()}:")
        assert "PriceSnapshot: create" in request.tags[TAG_PENDING]
        dg.validate_run_config(job, request.run_config)  # raises on a config the job would reject
        assert request.run_config["execution"] == {"config": {"in_process": {}}}

        # While a horizon run is queued or running, the sensor waits for it.
        instance.add_run(dg.DagsterRun(job_name=HORIZON_JOB, run_id=make_new_run_id(),
                                       status=dg.DagsterRunStatus.STARTED))
        waiting = _evaluate(instance)
        assert isinstance(waiting, dg.SkipReason) and "is not finished yet" in waiting.skip_message

    with db_env.connect() as conn:
        report = provisioning.run_horizon(conn, 6, earliest=Settings().partitions.start)
        assert report.ok, report.problems
    with dg.DagsterInstance.ephemeral() as instance:
        done = _evaluate(instance)
        assert isinstance(done, dg.SkipReason), done
        assert done.skip_message.startswith("every month of the horizon exists")

        # A row that lands in a default partition (its month has no child) triggers a drain.
        oldest = p.add_months(p.month_of(datetime.now(timezone.utc)), -3)
        with db_env.connect() as conn:
            conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
            conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "updatedAt")
                            VALUES ('w-late', '0xlate', 1, now())""")
            conn.execute("""INSERT INTO "PortfolioSnapshot" ("walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                            VALUES ('w-late', 1, 1, %s)""", (p.month_bounds(oldest)[0] + timedelta(hours=1),))
        drain = _evaluate(instance)
        assert isinstance(drain, dg.RunRequest), drain
        assert f"PortfolioSnapshot: create {p.month_year(oldest)}" in drain.tags[TAG_PENDING]
        assert f"drain the default partition of {p.month_year(oldest)}" in drain.tags[TAG_PENDING]
        assert drain.run_key != request.run_key
