"""Snapshot ingestion (issue 4)."""

import dagster as dg

defs = dg.Definitions()
