"""The cache's pure parts: key/value contract, compare decision, cursors, outage logging,
single flight, and the cache settings (no database, no Redis)."""

import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.manager import Outage, _SingleFlight
from wedefi_pipelines.cache.store import TOUCH_COST_BYTES, worth_comparing
from wedefi_pipelines.settings import Settings, SettingsError, parse_settings


def test_key_names_and_ttls_follow_the_seed():
    cfg = Settings().cache
    assert c.PRICE.key("tok-1") == "price:latest:tok-1"
    assert c.PORTFOLIO.key("w-1") == "portfolio:w-1"
    assert c.GOVERNANCE.key("w-1") == "governance:w-1"
    assert (c.PRICE.ttl(cfg), c.PORTFOLIO.ttl(cfg), c.GOVERNANCE.ttl(cfg)) == (60, 300, 1800)
    assert c.PORTFOLIO.entity_id("portfolio:w:1") == "w:1"
    assert c.lock_key("portfolio:w-1") == "wedefi:lock:portfolio:w-1"
    assert not c.lock_key("portfolio:w-1").startswith(tuple(f.prefix for f in c.FAMILIES.values()))
    with pytest.raises(ValueError, match="empty id"):
        c.PORTFOLIO.key("")
    with pytest.raises(ValueError, match="not a price key"):
        c.PRICE.entity_id("portfolio:w-1")


def test_families_are_validated_by_name():
    assert c.families(["governance", "portfolio", "governance"]) == (c.GOVERNANCE, c.PORTFOLIO)
    assert c.families("price") == (c.PRICE,)
    with pytest.raises(ValueError, match="unknown cache family 'balances'"):
        c.families(["balances"])


@pytest.mark.parametrize(
    "moment, expected",
    [
        (datetime(2025, 1, 31, 12, 0, 0), "2025-01-31T12:00:00.000Z"),
        (datetime(2025, 1, 31, 12, 0, 0, 999_999), "2025-01-31T12:00:00.999Z"),  # truncated, never later
        (datetime(2025, 2, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "2025-01-31T23:30:00.000Z"),
    ],
)
def test_times_are_utc_milliseconds_like_javascripts_date_tojson(moment, expected):
    assert c.iso_utc(moment) == expected
    assert c.parse_iso_utc(expected) <= moment.replace(tzinfo=moment.tzinfo or timezone.utc)
    assert c.from_epoch_ms(c.epoch_ms(moment)) == c.parse_iso_utc(expected)


# What Prisma.Decimal's JSON.stringify printed for these values (decimal.js 10, Prisma 7.10,
# run by hand in Node): exponent notation below 1e-6 and from 1e21 on.
@pytest.mark.parametrize(
    "text, js",
    [
        ("0", "0"), ("1.5", "1.5"), ("-3", "-3"), ("0.000001", "0.000001"), ("0.0000009", "9e-7"),
        ("0.0000001", "1e-7"), ("-0.0000001", "-1e-7"), ("0.00000012345", "1.2345e-7"),
        ("0.000000000000000001", "1e-18"), ("999999999999999999999.5", "999999999999999999999.5"),
        ("100000000000000000000", "100000000000000000000"), ("1000000000000000000000", "1e+21"),
        ("1000000000000000000000.5", "1.0000000000000000000005e+21"),
        ("99999999999999999999999999999999999.000000000000000000000000000001",
         "9.9999999999999999999999999999999999000000000000000000000000000001e+34"),
        ("12345678901234567890.123456789012345678901234567891", "12345678901234567890.123456789012345678901234567891"),
    ],
)
def test_decimals_are_written_as_decimal_js_prints_them(text, js):
    assert c.js_decimal(text) == js
    assert Decimal(js) == Decimal(text)  # the same number, exactly


def test_a_price_is_its_plain_decimal_text_and_nothing_else():
    encoded = c.encode(c.PRICE, "tok-1", "1234567890.123456789012345678", datetime(2025, 1, 31, 12, 0, 1, 500_000))
    assert encoded.key == "price:latest:tok-1" and encoded.value == b"1234567890.123456789012345678"
    assert encoded.computed_ms == c.epoch_ms(datetime(2025, 1, 31, 12, 0, 1, 500_000)) == 1738324801500
    assert encoded.sha1 == hashlib.sha1(encoded.value).hexdigest()  # what Lua's redis.sha1hex computes
    assert c.decode(c.PRICE, encoded.value) == "1234567890.123456789012345678"
    assert float(encoded.value) == 1234567890.1234567  # the app's parseFloat
    for bad in ("1e-18", "3.10", "NaN", " 1", '{"priceUsd":"1"}'):
        with pytest.raises(c.ContractError, match="plain decimal"):
            c.encode(c.PRICE, "tok-1", bad, 0)


def test_a_wallet_value_is_the_compact_json_of_the_prisma_result():
    value = [c.lock_value({"id": "g1", "protocolId": "p", "walletId": "w", "lockAmount": "0.0000005",
                           "votingPower": "4999.9", "boostMultiplier": None, "lockEndsAt": None,
                           "lastRefreshedAt": "2025-01-31T11:00:00.000Z", "metadata": {"n": 2 ** 70},
                           "createdAt": "2025-01-01T00:00:00.000Z", "updatedAt": "2025-01-02T00:00:00.000Z"})]
    encoded = c.encode(c.GOVERNANCE, "w", value, 0)
    assert encoded.value == (
        b'[{"id":"g1","protocolId":"p","walletId":"w","lockAmount":"5e-7","votingPower":"4999.9",'
        b'"boostMultiplier":null,"lockEndsAt":null,"lastRefreshedAt":"2025-01-31T11:00:00.000Z",'
        b'"metadata":{"n":1180591620717411303424},"createdAt":"2025-01-01T00:00:00.000Z",'
        b'"updatedAt":"2025-01-02T00:00:00.000Z"}]')
    assert c.decode(c.GOVERNANCE, encoded.value) == json.loads(encoded.value)
    assert c.encode(c.GOVERNANCE, "w", [], 0).value == b"[]"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json", "not JSON"),
        (b'{"schemaVersion":1,"computedAt":"2025-01-01T00:00:00.000Z","fingerprint":"x","data":{}}', "v1 envelope"),
        (b'"a string"', "JSON array"),
    ],
)
def test_values_outside_the_contract_are_rejected_with_the_reason(raw, message):
    with pytest.raises(c.ContractError, match=message):
        c.decode(c.PORTFOLIO, raw)


def test_comparing_first_pays_off_only_for_values_larger_than_the_question():
    assert worth_comparing(4000, 1.0)  # a portfolio summary, unchanged last time
    assert worth_comparing(4000, 0.0)  # one batch of changed neighbours does not stop large values
    assert worth_comparing(200, 0.9)  # a price, mostly unchanged: 180 bytes saved per key
    assert not worth_comparing(200, 0.3)  # a price, mostly changed: write directly
    assert not worth_comparing(TOUCH_COST_BYTES, 1.0)  # a small value costs what asking costs


def test_keyset_cursors_round_trip_and_reject_garbage():
    created = datetime(2025, 1, 31, 12, 0, 0, 123_000)
    cursor = q.encode_cursor(created, "w-9")
    assert q.decode_cursor(cursor) == (created, "w-9")
    with pytest.raises(ValueError, match="not one this API returned"):
        q.decode_cursor("bm9wZQ")


def test_the_lookback_window_is_naive_utc():
    now = datetime(2025, 3, 1, 2, 0, tzinfo=timezone(timedelta(hours=3)))
    assert q.window_start(7, now) == datetime(2025, 2, 21, 23, 0)


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    clock = [100.0]
    outage = Outage("Redis", retry_s=2.0, logger=logging.getLogger("test.outage"), clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        for _ in range(5):
            outage.failed(ConnectionError("refused"), "serving from the database")
        assert not outage.should_try()
        clock[0] += 2.0
        assert outage.should_try()  # re-probed after retry_s
        outage.failed(ConnectionError("refused"), "serving from the database")
        assert not outage.should_try()
        clock[0] += 3.0
        outage.succeeded()
        outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "Redis unavailable (ConnectionError: refused); serving from the database" in messages[0]
    assert messages[1] == "Redis is back after 5.0s"
    assert outage.episodes == 1 and not outage.down


def test_single_flight_runs_one_call_for_concurrent_callers_and_shares_its_error():
    flights = _SingleFlight()
    release, calls = threading.Event(), []

    def slow():
        calls.append(1)
        release.wait(10)
        return {"answer": 42}

    results = []
    threads = [threading.Thread(target=lambda: results.append(flights.do("k", slow))) for _ in range(20)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while flights.joined < 19 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert flights.joined == 19 and len(calls) == 1
    assert len(results) == 20 and all(r == {"answer": 42} for r in results)

    def boom():
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        flights.do("k", boom)
    assert flights.do("k", lambda: "recovered") == "recovered"  # a failure is not remembered


@pytest.mark.parametrize(
    "cache, key",
    [
        ({"top_holdings": 0}, "cache.top_holdings"),
        ({"lookback_days": 0}, "cache.lookback_days"),
        ({"socket_timeout_s": 0}, "cache.socket_timeout_s"),
        ({"lock_timeout_s": -1}, "cache.lock_timeout_s"),
        ({"portfolio_ttl_s": "soon"}, "cache.portfolio_ttl_s"),
        ({"pipeline_batchh": 10}, "cache.pipeline_batchh"),
    ],
)
def test_bad_cache_settings_fail_naming_the_key(cache, key):
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        parse_settings({"cache": cache})
