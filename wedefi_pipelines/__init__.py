"""wedefi-pipelines: the Dagster code location that keeps WeDefiDaily's PostgreSQL fast."""

import warnings

# BackfillPolicy is marked beta in Dagster 1.13 but is what makes a UI range backfill one
# run; the warning would otherwise print on every import of the code location.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset` is currently in beta")
