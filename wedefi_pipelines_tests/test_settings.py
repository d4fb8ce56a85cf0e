"""Settings: defaults in code, YAML overrides shaped like the seed's, errors that name the key."""

import textwrap

import pytest

from wedefi_pipelines.settings import SettingsError, Settings, load_settings, parse_settings


def test_defaults_match_the_seed():
    s = Settings()
    assert s.database.read_replica.lag_threshold == 50
    assert s.routing.portfolio_queries == "read_replicas"
    assert s.routing.balance_sync == "primary"
    assert s.routing.risk_analytics == "analytics_replica"
    assert s.alert_threshold("SlowQueryDetected") == 5000
    assert s.alert_threshold("HighConnectionCount") == 80
    assert s.alert_threshold("IndexScanEfficiency") == 95
    assert s.alert_threshold("ReplicationLag") == 1000
    assert s.monitoring.slow_query_report_mean_ms == 100
    assert (s.tiers.PriceSnapshot.hot_days, s.tiers.PriceSnapshot.cold_days) == (30, 365)
    assert s.partitions.horizon_months == 6
    assert s.sources.price == "synthetic"


def test_the_seeds_alerting_yaml_loads_as_is(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(textwrap.dedent("""
        database:
          read_replica: {lag_threshold: 20ms, max_connections: 30}
        alerts:
          - name: SlowQueryDetected
            condition: query_duration > 2s
            action: log_and_alert
          - name: ReplicationLag
            condition: replica_lag > 500ms
            action: investigate_replication
    """))
    s = load_settings(path)
    assert s.database.read_replica.lag_threshold == 20
    assert s.alert_threshold("SlowQueryDetected") == 2000
    assert s.alert_threshold("ReplicationLag") == 500
    assert s.alert_threshold("HighConnectionCount") == 80  # not listed: default kept


@pytest.mark.parametrize(
    "data, key",
    [
        ({"partitions": {"horizon_months": 61}}, "partitions.horizon_months"),
        ({"partitions": {"start": "2024-01-15"}}, "partitions.start"),
        ({"database": {"read_replica": {"lag_threshold": "soon"}}}, "database.read_replica.lag_threshold"),
        ({"alerts": [{"name": "ReplicationLag", "condition": "query_duration > 5ms"}]}, "alerts.0"),
        ({"alerts": [{"name": "IndexScanEfficiency", "condition": "index_hit_ratio < 120%"}]}, "alerts.0"),
        ({"tiers": {"PriceSnapshot": {"hot_days": 400, "cold_days": 365}}}, "tiers.PriceSnapshot"),
        ({"tiers": {"PortfolioSnapshot": {"cold_days": 400}}}, "tiers"),
        ({"routing": {"balance_sync": "somewhere"}}, "routing.balance_sync"),
        ({"sources": {"price": "oracle"}}, "sources.price"),
        ({"typo_section": {}}, "typo_section"),
    ],
)
def test_bad_values_fail_naming_the_key(data, key):
    with pytest.raises(SettingsError) as err:
        parse_settings(data, source="wedefi.yaml")
    assert "wedefi.yaml" in str(err.value)
    assert f"  {key}:" in str(err.value)


def test_missing_or_malformed_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WEDEFI_SETTINGS", str(tmp_path / "absent.yaml"))
    with pytest.raises(SettingsError, match="WEDEFI_SETTINGS=.*absent.yaml: no such file"):
        load_settings()
    bad = tmp_path / "bad.yaml"
    bad.write_text("alerts: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="top level must be a mapping"):
        load_settings(listy)
