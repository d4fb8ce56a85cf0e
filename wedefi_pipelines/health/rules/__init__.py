"""Pure health logic: thresholds applied to probe figures, deltas of cumulative counters,
breach episodes and the sensor cursor that carries them between ticks. No I/O.

A *finding* is one subject's verdict (a replica, a server). Its *incident* key names what
an alert is about ("health.replication_lag.wedefi_read"). An *episode* is one continuous
breach of an incident: it opens on the first breached evaluation, lasts while evaluations
stay breached, and closes on the first passing one. Each episode gets its own run key,
so a lasting breach requests one check run, not one per tick.

    findings.py     Finding, Evaluation, incident keys, conditions, figures in words
    seed.py         the seed's four alerts
    maintenance.py  the seven probes of issue 15
    platform.py     the platform's own health, from the month catalog
    episodes.py     breach episodes and the sensor cursor
"""

from wedefi_pipelines.health.rules.findings import (  # noqa: F401
    CONDITIONS, Evaluation, Finding, INCIDENT_PREFIX, RUNBOOK, bytes_text, condition_of, count_text,
    duration_text, incident_key, ms_text, safe_name, server_label,
)
from wedefi_pipelines.health.rules.seed import (  # noqa: F401
    ExpectedReplica, connection_finding, grown_statements, hit_percent, index_hit_finding, index_io_baseline,
    replication_findings, slow_query_finding, slow_statement_report, statement_baseline, statement_deltas,
    unused_indexes,
)
from wedefi_pipelines.health.rules.maintenance import (  # noqa: F401
    Threshold, autovacuum_threshold, conflict_finding, counter_baseline, deadlock_finding,
    invalid_index_finding, pipeline_limit, slot_findings, transaction_findings, vacuum_finding,
    wraparound_findings,
)
from wedefi_pipelines.health.rules.episodes import (  # noqa: F401
    CURSOR_VERSION, CursorState, Episode, EpisodeChanges, dump_cursor, episode_id, parse_cursor, track_episodes,
)
from wedefi_pipelines.health.rules.platform import (  # noqa: F401
    default_rows_finding, due_since, horizon_finding, overdue_finding, unfinished_finding,
)
