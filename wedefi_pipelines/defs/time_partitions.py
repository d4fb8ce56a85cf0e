"""The partitions every time-based asset shares, so partition mappings line up."""

from __future__ import annotations

import dagster as dg

from wedefi_pipelines.settings import current_settings

_start = current_settings().partitions.start.isoformat()

# Keys like 2025-01-01; end_offset=7 makes the current month and the next six selectable.
monthly_partitions = dg.MonthlyPartitionsDefinition(start_date=_start, end_offset=7)

# Keys like 2025-01-31; end_offset=1 makes today selectable.
daily_partitions = dg.DailyPartitionsDefinition(start_date=_start, end_offset=1)
