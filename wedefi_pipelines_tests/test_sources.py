"""Sources without a database: the synthetic market, price validation, the CoinGecko-style
HTTP source against a loopback server playing the documented responses, and files."""

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wedefi_pipelines.ingest import validation as v
from wedefi_pipelines.ingest.portfolio import resolve_tick, truncate_to_tick
from wedefi_pipelines.ingest.prices import day_numbers
from wedefi_pipelines.sources.coingecko import CoinGeckoSource, PriceSourceError, parse_simple_price
from wedefi_pipelines.sources.files import FileSourceError, read_price_file
from wedefi_pipelines.sources.synthetic import SyntheticMarket, round_significant

DAY = datetime(2025, 3, 10)
WINDOW = (DAY, DAY + timedelta(days=1))
NOW = datetime(2026, 1, 1)


# -- synthetic market ------------------------------------------------------------------------

def test_synthetic_prices_are_deterministic_and_on_the_tick_grid():
    market = SyntheticMarket(tokens=20, wallets=5, tick_minutes=15)
    first = market.prices(*WINDOW)
    again = SyntheticMarket(tokens=20, wallets=5, tick_minutes=15).prices(*WINDOW)
    assert first.equals(again)
    assert first.num_rows == 20 * 96
    minutes = {t.minute for t in first["recordedAt"].to_pylist()}
    assert minutes == {0, 15, 30, 45}
    assert min(first["priceUsd"].to_pylist()) > 0


def test_a_smaller_market_is_a_prefix_of_a_larger_one():
    small = SyntheticMarket(tokens=5, wallets=3, tick_minutes=60).prices(*WINDOW).to_pandas()
    large = SyntheticMarket(tokens=40, wallets=3, tick_minutes=60).prices(*WINDOW).to_pandas()
    shared = large[large.tokenId.isin(set(small.tokenId))].reset_index(drop=True)
    assert shared.equals(small)


def test_prices_have_at_most_ten_significant_digits():
    prices = SyntheticMarket(tokens=50, wallets=1, tick_minutes=60).prices(*WINDOW)["priceUsd"].to_numpy()
    for price in prices:
        digits = Decimal(repr(float(price))).normalize().as_tuple().digits
        assert len(digits) <= 10, price
    assert np.array_equal(round_significant(prices), prices)


def test_days_join_up_continuously_and_windows_split_anywhere():
    market = SyntheticMarket(tokens=3, wallets=1, tick_minutes=60)
    whole = market.prices(DAY, DAY + timedelta(days=2))
    parts = pa.concat_tables([market.prices(DAY, DAY + timedelta(hours=30)),
                              market.prices(DAY + timedelta(hours=30), DAY + timedelta(days=2))])
    assert whole.equals(parts)
    until = market.prices(DAY, DAY + timedelta(days=1), until=DAY + timedelta(hours=5, minutes=30))
    assert until.num_rows == 3 * 6


def test_balances_change_for_a_few_wallets_at_a_time():
    market = SyntheticMarket(tokens=30, wallets=2000, max_tokens_per_wallet=10)
    before = market.balances(DAY)
    after = market.balances(DAY + timedelta(hours=1))
    assert before.num_rows == after.num_rows
    assert before["walletId"].equals(after["walletId"]) and before["tokenId"].equals(after["tokenId"])
    changed = {w for w, a, b in zip(before["walletId"].to_pylist(), before["quantity"].to_pylist(),
                                    after["quantity"].to_pylist()) if a != b}
    assert 0 < len(changed) < 200  # each wallet changes every 6 h to 7 d
    keys = list(zip(before["walletId"].to_pylist(), before["tokenId"].to_pylist()))
    assert len(keys) == len(set(keys))
    decimals = dict(zip(market.token_ids, market.token_decimals))
    for row in before.to_pylist()[:200]:
        assert Decimal(row["rawBalance"]) == Decimal(row["quantity"]) * 10 ** int(decimals[row["tokenId"]])


def test_governance_locks_are_unique_per_protocol_and_wallet_and_decay():
    market = SyntheticMarket(tokens=5, wallets=2000)
    now, later = market.governance_locks(DAY), market.governance_locks(DAY + timedelta(days=30))
    keys = list(zip(now["protocolId"].to_pylist(), now["walletId"].to_pylist()))
    assert len(keys) == len(set(keys)) > 0
    power_now = sum(Decimal(x) for x in now["votingPower"].to_pylist())
    power_later = sum(Decimal(x) for x in later["votingPower"].to_pylist())
    assert power_later < power_now


# -- validation --------------------------------------------------------------------------------

TOKEN = "tok-a"


def _rows(**columns):
    n = max(len(c) for c in columns.values())
    base = {"tokenId": [TOKEN] * n, "priceUsd": ["1.5"] * n, "source": ["file"] * n,
            "recordedAt": ["2025-03-10T12:00:00Z"] * n}
    base.update(columns)
    return pa.table(base)


@pytest.mark.parametrize("column, value, reason", [
    ("priceUsd", "NaN", v.PRICE_NAN),
    ("priceUsd", "-2.5", v.PRICE_NOT_POSITIVE),
    ("priceUsd", "0", v.PRICE_NOT_POSITIVE),
    ("priceUsd", "1e18", v.PRICE_TOO_LARGE),
    ("priceUsd", "Infinity", v.PRICE_INFINITE),
    ("priceUsd", "1,5", v.PRICE_NOT_A_NUMBER),
    ("priceUsd", "", v.PRICE_MISSING),
    ("tokenId", "tok-unknown", v.UNKNOWN_TOKEN),
    ("tokenId", "", v.MISSING_TOKEN),
    ("source", "x" * 33, v.SOURCE_TOO_LONG),
    ("source", "", v.SOURCE_MISSING),
    ("recordedAt", "2031-01-01T00:00:00Z", v.TIME_IN_FUTURE),
    ("recordedAt", "2025-03-11T00:00:00Z", v.outside_window_reason(*WINDOW)),
    ("recordedAt", "2025-03-09T23:59:59.999Z", v.outside_window_reason(*WINDOW)),
    ("recordedAt", "10/03/2025 12:00", v.TIME_NOT_ISO),
    ("recordedAt", "2025-02-30T00:00:00Z", v.TIME_NOT_ISO),
])
def test_each_bad_value_is_rejected_with_its_reason_and_raw_value(column, value, reason):
    table = _rows(**{column: ["1.5" if column == "priceUsd" else {"tokenId": TOKEN, "source": "file",
                                                                    "recordedAt": "2025-03-10T01:00:00Z"}[column],
                              value]})
    checked = v.validate_prices(table, [TOKEN], WINDOW, NOW)
    assert checked.valid.num_rows == 1
    assert checked.rejects.to_pylist() == [{**table.slice(1).to_pylist()[0], "reason": reason}]


def test_valid_rows_keep_their_digits_and_are_converted_to_utc_milliseconds():
    table = _rows(priceUsd=[" 0.000000123456789012 ", "65000"],
                  recordedAt=["2025-03-10T13:30:00.123456+01:00", "2025-03-10 23:59:59"])
    checked = v.validate_prices(table, [TOKEN], WINDOW, NOW)
    assert checked.rejects.num_rows == 0
    assert checked.valid["priceUsd"].to_pylist() == ["0.000000123456789012", "65000"]
    assert checked.valid["recordedAt"].to_pylist() == [datetime(2025, 3, 10, 12, 30, 0, 123000),
                                                       datetime(2025, 3, 10, 23, 59, 59)]


def test_typed_columns_are_validated_too():
    table = pa.table({"tokenId": [TOKEN] * 3, "priceUsd": [1.25, float("nan"), -1.0], "source": ["pq"] * 3,
                      "recordedAt": pa.array([datetime(2025, 3, 10, 9, tzinfo=timezone(timedelta(hours=2)))] * 3,
                                             pa.timestamp("us", tz="+02:00"))})
    checked = v.validate_prices(table, [TOKEN], WINDOW, NOW)
    assert checked.valid["recordedAt"].to_pylist() == [datetime(2025, 3, 10, 7)]
    assert v.count_reasons(checked.rejects) == {v.PRICE_NAN: 1, v.PRICE_NOT_POSITIVE: 1}


def test_a_missing_column_fails_before_any_row():
    with pytest.raises(v.InputShapeError, match="missing \\['source'\\]"):
        v.validate_prices(pa.table({"tokenId": [TOKEN], "priceUsd": ["1"], "recordedAt": ["2025-03-10"]}),
                          [TOKEN], WINDOW, NOW)


def test_random_uuids_are_version_4_and_distinct():
    ids = v.random_uuids(10_000).to_pylist()
    assert len(set(ids)) == 10_000
    assert all(uuid.UUID(i).version == 4 for i in ids[:100])


def test_ticks_and_day_locks():
    assert truncate_to_tick(datetime(2025, 3, 10, 12, 7, 59), 5) == datetime(2025, 3, 10, 12, 5)
    assert resolve_tick("2025-03-10T12:07:00+02:00", NOW, 5) == datetime(2025, 3, 10, 10, 5)
    with pytest.raises(ValueError, match="not an ISO-8601 time"):
        resolve_tick("noon", NOW, 5)
    with pytest.raises(ValueError, match="divide a day"):
        truncate_to_tick(NOW, 7)
    assert day_numbers(datetime(1970, 1, 2), datetime(1970, 1, 4)) == [1, 2]
    assert day_numbers(datetime(1970, 1, 2, 5), datetime(1970, 1, 2, 6)) == [1]


# -- HTTP source -----------------------------------------------------------------------------------

class PriceApi:
    """A loopback /simple/price server: plays queued responses, then a default one."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple] = []  # (status, body, headers, delay_s)
        self.prices = {"bitcoin": 67187.33, "ethereum": 3456.789, "usd-coin": 1.0001}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlparse(self.path)
                api.requests.append({"path": url.path, "query": parse_qs(url.query), "headers": dict(self.headers)})
                if api.script:
                    status, body, headers, delay = api.script.pop(0)
                else:
                    ids = parse_qs(url.query)["ids"][0].split(",")
                    status, headers, delay = 200, {}, 0
                    body = json.dumps({i: {"usd": api.prices[i], "last_updated_at": 1741608000}
                                       for i in ids if i in api.prices})
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v3"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def price_api():
    api = PriceApi()
    yield api
    api.close()


def _source(api, **kwargs):
    defaults = dict(base_url=api.base_url, api_key="secret", batch_size=2, timeout_s=2, max_retries=3, backoff_s=0.01)
    return CoinGeckoSource(**{**defaults, **kwargs})


def test_http_source_batches_ids_and_sends_the_api_key(price_api):
    source = _source(price_api)
    rows, missing = source.price_rows({"bitcoin": ["t-btc"], "ethereum": ["t-eth-1", "t-eth-2"], "nope": ["t-x"]},
                                      datetime(2025, 3, 10, 12, 1))
    assert missing == ["nope"]
    assert len(price_api.requests) == 2  # 3 ids in batches of 2
    assert all(r["headers"]["x-cg-demo-api-key"] == "secret" for r in price_api.requests)
    assert all(r["path"] == "/api/v3/simple/price" and r["query"]["vs_currencies"] == ["usd"]
               for r in price_api.requests)
    assert rows.to_pylist() == [
        {"tokenId": "t-btc", "priceUsd": "67187.33", "source": "coingecko", "recordedAt": "2025-03-10T12:00:00Z"},
        {"tokenId": "t-eth-1", "priceUsd": "3456.789", "source": "coingecko", "recordedAt": "2025-03-10T12:00:00Z"},
        {"tokenId": "t-eth-2", "priceUsd": "3456.789", "source": "coingecko", "recordedAt": "2025-03-10T12:00:00Z"},
    ]


def test_http_source_honours_429_retry_after_and_retries_5xx(price_api):
    price_api.script = [(429, '{"status": {"error_code": 429}}', {"Retry-After": "1"}, 0),
                        (503, "upstream down", {}, 0)]
    waits = []
    source = _source(price_api, batch_size=10, sleep=lambda s: (waits.append(s), time.sleep(s)))
    quotes = source.fetch(["bitcoin"])
    assert quotes["bitcoin"].price == "67187.33"
    assert len(price_api.requests) == 3
    assert waits[0] == 1.0  # Retry-After, as given
    assert waits[1] == pytest.approx(0.02)  # exponential backoff for the 503


def test_http_source_retries_a_timeout(price_api):
    price_api.script = [(200, "{}", {}, 1.5)]
    quotes = _source(price_api, timeout_s=0.5).fetch(["ethereum"])
    assert quotes["ethereum"].price == "3456.789"
    assert len(price_api.requests) == 2


def test_http_source_gives_up_after_its_retries(price_api):
    price_api.script = [(500, "boom", {}, 0)] * 4
    with pytest.raises(PriceSourceError, match="failed after 4 attempts; last: HTTP 500"):
        _source(price_api, max_retries=3).fetch(["bitcoin"])


def test_http_source_refuses_a_retry_after_beyond_its_limit(price_api):
    price_api.script = [(429, "slow down", {"Retry-After": "3600"}, 0)]
    with pytest.raises(PriceSourceError, match="retry after 3600 s, more than max_wait_s=120"):
        _source(price_api).fetch(["bitcoin"])
    assert len(price_api.requests) == 1


def test_http_source_names_the_api_key_on_401(price_api):
    price_api.script = [(401, '{"error": "invalid key"}', {}, 0)]
    with pytest.raises(PriceSourceError, match="COINGECKO_API_KEY"):
        _source(price_api).fetch(["bitcoin"])


@pytest.mark.parametrize("body, message", [
    ("<html>gateway</html>", "not JSON"),
    ('["bitcoin"]', "expected an object keyed by coin id, got list"),
    ('{"bitcoin": 67000}', "the value for 'bitcoin' is Decimal"),
    ('{"status": {"error_code": 10002, "error_message": "API Key Missing"}}', "API Key Missing"),
])
def test_http_source_fails_clearly_on_a_malformed_body(price_api, body, message):
    price_api.script = [(200, body, {}, 0)]
    with pytest.raises(PriceSourceError, match=message):
        _source(price_api).fetch(["bitcoin"])


def test_one_bad_quote_is_a_row_for_validation_not_a_failure():
    quotes = parse_simple_price('{"a": {"usd": "n/a"}, "b": {}, "c": {"usd": 1.5e-7, "last_updated_at": "soon"}}')
    assert (quotes["a"].price, quotes["b"].price, quotes["c"].price) == ("n/a", None, "1.5E-7")
    assert quotes["c"].last_updated_at == "soon"
    table = pa.table({"tokenId": [TOKEN] * 3, "priceUsd": [q.price for q in quotes.values()],
                      "source": ["coingecko"] * 3, "recordedAt": ["2025-03-10T10:00:00Z"] * 2 + ["soon"]})
    reasons = v.validate_prices(table, [TOKEN], WINDOW, NOW).rejects["reason"].to_pylist()
    assert reasons == [v.PRICE_NOT_A_NUMBER, v.PRICE_MISSING, v.TIME_NOT_ISO]


# -- files -------------------------------------------------------------------------------------------

def test_csv_and_parquet_files_read_as_raw_rows(tmp_path):
    csv = tmp_path / "prices.csv"
    csv.write_text("recordedAt,tokenId,priceUsd,source,extra\n2025-03-10T01:00:00Z,tok-a,1.50,import,x\n"
                   "2025-03-10T02:00:00Z,tok-a,,import,y\n")
    rows = pa.concat_tables(read_price_file(csv))
    assert rows.column_names == ["tokenId", "priceUsd", "source", "recordedAt"]
    assert rows["priceUsd"].to_pylist() == ["1.50", ""]
    parquet = tmp_path / "prices.parquet"
    pq.write_table(pa.table({"tokenId": ["tok-a"], "priceUsd": [2.5], "source": ["import"],
                             "recordedAt": pa.array([datetime(2025, 3, 10, 3)], pa.timestamp("ms"))}), parquet)
    assert pa.concat_tables(read_price_file(parquet)).to_pylist()[0]["priceUsd"] == 2.5


def test_a_bad_file_fails_naming_the_problem(tmp_path):
    with pytest.raises(FileSourceError, match="no such file"):
        read_price_file(tmp_path / "absent.csv")
    (tmp_path / "prices.txt").write_text("x")
    with pytest.raises(FileSourceError, match="unknown format"):
        read_price_file(tmp_path / "prices.txt")
    (tmp_path / "short.csv").write_text("tokenId,priceUsd\nx,1\n")
    with pytest.raises(FileSourceError, match=r"missing column\(s\) \['source', 'recordedAt'\]"):
        read_price_file(tmp_path / "short.csv")
