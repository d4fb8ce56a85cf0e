"""Adoption of a live, Prisma-built WeDefiDaily database (issue 13): the `adopt_database` job."""

import dagster as dg

from wedefi_pipelines.defs.adoption.jobs import adopt_database

defs = dg.Definitions(jobs=[adopt_database])
