"""Database health: probes over a connection, the rules that turn their figures into
findings and breach episodes, and alerts into WeDefiDaily's own "Alert" table. No Dagster
here: wedefi_pipelines.defs.health wires these into sensors, checks and reports."""
