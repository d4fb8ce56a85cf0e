"""Database health: probes over a connection, the rules that turn their figures into
findings and breach episodes, and alerts into WeDefiDaily's own "Alert" table; the
platform's own healthcheck and its Prometheus metrics. No Dagster definitions here:
wedefi_pipelines.defs.health wires these into sensors, checks and reports (dagster_state.py
only reads the Dagster instance, for the healthcheck and the metrics)."""
