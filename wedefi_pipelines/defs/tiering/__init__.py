"""Hot/warm/cold tiering (issue 5)."""

import dagster as dg

defs = dg.Definitions()
