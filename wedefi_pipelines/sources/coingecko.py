"""A CoinGecko-style `/simple/price` source: current prices only.

`GET {base_url}/simple/price?ids=a,b&vs_currencies=usd&include_last_updated_at=true`
answers `{"a": {"usd": 67187.33, "last_updated_at": 1711356300}, ...}`. Ids go in
batches; the API key goes in a header; each request has a timeout. Connection errors,
timeouts, 5xx and 429 are retried with exponential backoff, and a 429's `Retry-After`
(seconds or an HTTP date) is honoured as given, up to `max_wait_s` (past it the run fails
rather than stalling). Other 4xx fail at once, naming the status and the body. A body that
is not the documented shape fails with what was wrong; one coin's bad value is not the
body's fault, so it becomes a row that validation rejects with its reason.

Numbers are parsed as Decimal, so a price keeps exactly the digits the API sent.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable, Mapping, Sequence

import pyarrow as pa
import requests

log = logging.getLogger(__name__)


class PriceSourceError(RuntimeError):
    """The price API could not be read; the message says what happened and what to check."""


@dataclass(frozen=True)
class Quote:
    coin_id: str
    price: str | None  # the text of the JSON value, None if absent
    last_updated_at: str | None  # ISO-8601 UTC, or the raw value if it is not epoch seconds


def _retry_after_seconds(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # JSON true/false: not a number, keep it visible in the rejects
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _updated_at(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, Decimal) and value == value.to_integral_value():
        try:
            return datetime.fromtimestamp(int(value), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):
            pass
    return _as_text(value)


def parse_simple_price(body: str, currency: str = "usd") -> dict[str, Quote]:
    """Quotes from a `/simple/price` body; PriceSourceError if the body is not that shape."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    except json.JSONDecodeError as exc:
        raise PriceSourceError(f"malformed /simple/price response: not JSON ({exc.msg} at char {exc.pos}): "
                               f"{_excerpt(body)!r}") from None
    if not isinstance(data, dict):
        raise PriceSourceError(f"malformed /simple/price response: expected an object keyed by coin id, "
                               f"got {type(data).__name__}: {_excerpt(body)!r}")
    status = data.get("status")
    if isinstance(status, dict) and "error_code" in status:
        raise PriceSourceError(f"/simple/price answered an error: {status.get('error_code')} "
                               f"{status.get('error_message', '')}".strip())
    if isinstance(data.get("error"), str):
        raise PriceSourceError(f"/simple/price answered an error: {data['error']}")
    quotes = {}
    for coin_id, entry in data.items():
        if not isinstance(entry, dict):
            raise PriceSourceError(f"malformed /simple/price response: the value for {coin_id!r} is "
                                   f"{type(entry).__name__}, expected an object like {{\"{currency}\": 1.0}}")
        quotes[coin_id] = Quote(coin_id, _as_text(entry.get(currency)), _updated_at(entry.get("last_updated_at")))
    return quotes


@dataclass
class CoinGeckoSource:
    """Reads current USD prices for CoinGecko coin ids. Plain Python: usable without Dagster."""

    base_url: str
    api_key: str | None = None
    api_key_header: str = "x-cg-demo-api-key"
    batch_size: int = 100
    timeout_s: float = 10.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_wait_s: float = 120.0
    source_name: str = "coingecko"
    api_key_env: str = "COINGECKO_API_KEY"
    session: requests.Session = field(default_factory=requests.Session)
    sleep: Callable[[float], None] = time.sleep
    logger: logging.Logger | None = None
    requests_made: int = 0

    @property
    def origin(self) -> str:
        return f"http:{self.base_url.rstrip('/')}/simple/price"

    def _get(self, ids: Sequence[str]) -> str:
        url = self.base_url.rstrip("/") + "/simple/price"
        params = {"ids": ",".join(ids), "vs_currencies": "usd", "include_last_updated_at": "true"}
        headers = {"accept": "application/json"}
        if self.api_key:
            headers[self.api_key_header] = self.api_key
        logger = self.logger or log
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                self.requests_made += 1
                response = self.session.get(url, params=params, headers=headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response.text
                last_problem = f"HTTP {response.status_code}: {_excerpt(response.text)!r}"
                if response.status_code == 429:
                    asked = _retry_after_seconds(response.headers.get("Retry-After"), time.time())
                    if asked is not None:
                        if asked > self.max_wait_s:
                            raise PriceSourceError(
                                f"{url} is rate limited (429) and asks to retry after {asked:.0f} s, more than "
                                f"max_wait_s={self.max_wait_s:.0f} (settings sources.http.max_wait_s)")
                        retry_after = asked
                elif response.status_code in (401, 403):
                    raise PriceSourceError(
                        f"{url} refused the request ({last_problem}); check the API key in ${self.api_key_env} "
                        f"and the header name (settings sources.http.api_key_header = {self.api_key_header!r})")
                elif response.status_code < 500:
                    raise PriceSourceError(f"{url} answered {last_problem}")
            if attempt == self.max_retries:
                break
            wait = retry_after if retry_after is not None else min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
            logger.warning("%s: %s; retry %d/%d in %.1f s", url, last_problem, attempt + 1, self.max_retries, wait)
            self.sleep(wait)
        raise PriceSourceError(f"{url} failed after {self.max_retries + 1} attempts; last: {last_problem}")

    def fetch(self, coin_ids: Sequence[str]) -> dict[str, Quote]:
        """Quotes for every id the API knows (unknown ids are simply absent from the answer)."""
        ids = sorted(set(coin_ids))
        quotes: dict[str, Quote] = {}
        for i in range(0, len(ids), self.batch_size):
            quotes.update(parse_simple_price(self._get(ids[i:i + self.batch_size])))
        return quotes

    def price_rows(self, tokens_by_coin: Mapping[str, Sequence[str]], fetched_at: datetime) -> tuple[pa.Table, list[str]]:
        """Raw price rows for our tokens (several tokens may share a coin id) and the coin
        ids the API did not return. recordedAt is the API's last_updated_at, else `fetched_at`."""
        quotes = self.fetch(list(tokens_by_coin))
        fallback = fetched_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if fetched_at.tzinfo \
            else fetched_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows: dict[str, list] = {"tokenId": [], "priceUsd": [], "source": [], "recordedAt": []}
        missing = []
        for coin_id in sorted(tokens_by_coin):
            quote = quotes.get(coin_id)
            if quote is None:
                missing.append(coin_id)
                continue
            for token_id in tokens_by_coin[coin_id]:
                rows["tokenId"].append(token_id)
                rows["priceUsd"].append(quote.price)
                rows["source"].append(self.source_name)
                rows["recordedAt"].append(quote.last_updated_at or fallback)
        return pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()}), missing
