"""Assembles `defs` from the domain packages; nothing else.

Loads with no environment set (`dagster definitions validate` runs anywhere): resources
read the configuration contract's variables when a run starts, and a missing one fails
that run naming it. Bad settings ($WEDEFI_SETTINGS) fail here, at load time.
"""

import dagster as dg

from wedefi_pipelines.defs import (adoption, cache, health, ingestion, maintenance, provisioning, rollups, schema,
                                   tiering)
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings

current_settings()  # a bad $WEDEFI_SETTINGS fails here, when the code location loads

defs = dg.Definitions.merge(
    schema.defs,
    provisioning.defs,
    ingestion.defs,
    tiering.defs,
    rollups.defs,
    cache.defs,
    health.defs,
    maintenance.defs,
    adoption.defs,
    dg.Definitions(resources={"database": DatabaseResource()}),
)
