"""Redis cache (issue 6)."""

import dagster as dg

defs = dg.Definitions()
