"""Monthly partition provisioning (issue 3)."""

import dagster as dg

defs = dg.Definitions()
