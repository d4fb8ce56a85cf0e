"""Database health sensors and alerting (issue 7)."""

import dagster as dg

defs = dg.Definitions()
