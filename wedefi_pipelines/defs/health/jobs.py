"""One job per health check, so each sensor's runs (and their failures) read plainly in
the UI, and the daily reports job."""

import dagster as dg

from .assets import index_usage_report, slow_query_report
from .checks import (connection_count_check, deadlocks_check, index_hit_ratio_check, invalid_indexes_check,
                     long_transactions_check, platform_health_check, replication_lag_check, replication_slots_check,
                     slow_queries_check, standby_conflicts_check, vacuum_health_check, wraparound_check)

# A failed health check is the finding itself: retrying it would only raise it twice.
_NO_RETRY = {"dagster/max_retries": "0"}


def _check_job(name: str, check: dg.AssetChecksDefinition, description: str):
    return dg.define_asset_job(name, selection=dg.AssetSelection.checks(check), tags=_NO_RETRY, description=description)


replication_lag_check_job = _check_job(
    "replication_lag_check_job", replication_lag_check, "Requested by replication_lag_sensor on a breach.")
slow_query_check_job = _check_job(
    "slow_query_check_job", slow_queries_check, "Requested by slow_query_sensor on a breach.")
index_hit_ratio_check_job = _check_job(
    "index_hit_ratio_check_job", index_hit_ratio_check, "Requested by index_hit_ratio_sensor on a breach.")
connection_count_check_job = _check_job(
    "connection_count_check_job", connection_count_check, "Requested by connection_count_sensor on a breach.")

wraparound_check_job = _check_job(
    "wraparound_check_job", wraparound_check, "Requested by wraparound_sensor on a breach.")
long_transactions_check_job = _check_job(
    "long_transactions_check_job", long_transactions_check, "Requested by long_transactions_sensor on a breach.")
replication_slots_check_job = _check_job(
    "replication_slots_check_job", replication_slots_check, "Requested by replication_slots_sensor on a breach.")
invalid_indexes_check_job = _check_job(
    "invalid_indexes_check_job", invalid_indexes_check, "Requested by invalid_indexes_sensor on a breach.")
vacuum_health_check_job = _check_job(
    "vacuum_health_check_job", vacuum_health_check, "Requested by vacuum_health_sensor on a breach.")
deadlocks_check_job = _check_job(
    "deadlocks_check_job", deadlocks_check, "Requested by deadlocks_sensor on a breach.")
standby_conflicts_check_job = _check_job(
    "standby_conflicts_check_job", standby_conflicts_check, "Requested by standby_conflicts_sensor on a breach.")

platform_health_check_job = _check_job(
    "platform_health_check_job", platform_health_check, "Requested by platform_health_sensor on a breach.")

CHECK_JOBS = [replication_lag_check_job, slow_query_check_job, index_hit_ratio_check_job, connection_count_check_job,
              wraparound_check_job, long_transactions_check_job, replication_slots_check_job,
              invalid_indexes_check_job, vacuum_health_check_job, deadlocks_check_job, standby_conflicts_check_job,
              platform_health_check_job]

health_reports_job = dg.define_asset_job(
    "health_reports_job", selection=dg.AssetSelection.assets(slow_query_report, index_usage_report),
    description="The daily slow-query and index-usage reports.",
)
