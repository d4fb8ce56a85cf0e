"""Monthly partition provisioning over a psycopg connection (no Dagster).

    ensure.py       ensure months of one table: its child, indexes, default rows moved in
    horizon.py      the horizon: current + N months for every table, gaps filled, defaults drained
    hash_tables.py  "TokenBalance"'s hash partitions verified, a missing one recreated
    inspection.py   coverage, gaps and default rows for the asset checks
    safety.py       what partition_safety_sensor asks: would a horizon run change anything?

Catalog reads come from `wedefi_pipelines.catalog`, DDL and row moves from `month_ops`,
locks from `locks`; the names below stay importable from here, as docs/partitioning.md
publishes them.
"""

from wedefi_pipelines.catalog import (archived_months, default_rows_by_month, has_default_partition,
                                      months_with_default_rows)
from wedefi_pipelines.provisioning.ensure import (DEFAULT_POLICY, RUN_LOCK_KEY, LockPolicy, MonthOutcome,
                                                  ProvisioningError, ensure_month, ensure_months, run_lock,
                                                  table_lock_key)
from wedefi_pipelines.provisioning.hash_tables import HashReport, hash_partitions, verify_hash_partitions
from wedefi_pipelines.provisioning.horizon import (MAX_MONTHS_AHEAD, MIN_MONTHS_AHEAD, HorizonPlan, HorizonReport,
                                                   TableReport, plan_horizon, provision_months, run_horizon,
                                                   validate_months_ahead)
from wedefi_pipelines.provisioning.inspection import (TableInspection, gap_months, inspect_partitions, inspect_table,
                                                      missing_horizon_months)

__all__ = [
    "DEFAULT_POLICY", "MAX_MONTHS_AHEAD", "MIN_MONTHS_AHEAD", "RUN_LOCK_KEY", "HashReport", "HorizonPlan",
    "HorizonReport", "LockPolicy", "MonthOutcome", "ProvisioningError", "TableInspection", "TableReport",
    "archived_months", "default_rows_by_month", "ensure_month", "ensure_months", "gap_months", "has_default_partition",
    "hash_partitions", "inspect_partitions", "inspect_table", "missing_horizon_months", "months_with_default_rows",
    "plan_horizon", "provision_months", "run_horizon", "run_lock", "table_lock_key", "validate_months_ahead",
    "verify_hash_partitions",
]
