"""Registers the synthetic market's chains, tokens, wallets and protocols on first use.

Ids are deterministic (uuid5), so registering twice, from two processes, or after a
restore inserts nothing new: every insert is `ON CONFLICT DO NOTHING`, and a bulk
COPY into a temporary table keeps 100,000 wallets to one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from wedefi_pipelines.ingest.pgcopy import copy_table
from wedefi_pipelines.sources.synthetic import SyntheticMarket


@dataclass
class Registered:
    chains: int
    tokens: int
    wallets: int
    protocols: int


def _bulk_insert(conn: psycopg.Connection, table: str, rows: pa.Table, extra: dict[str, sql.Composable]) -> int:
    stage = f"wedefi_register_{table.lower()}"
    conn.execute(sql.SQL("CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {cols} FROM {table} WITH NO DATA").format(
        stage=sql.Identifier(stage), table=sql.Identifier(table),
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in rows.column_names)))
    copy_table(conn, stage, rows)
    columns = list(rows.column_names) + list(extra)
    values = [sql.Identifier(c) for c in rows.column_names] + list(extra.values())
    return conn.execute(sql.SQL(
        "INSERT INTO {table} ({cols}) SELECT {vals} FROM {stage} ORDER BY id ON CONFLICT DO NOTHING").format(
        table=sql.Identifier(table), cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        vals=sql.SQL(", ").join(values), stage=sql.Identifier(stage))).rowcount


def register_market(conn: psycopg.Connection, market: SyntheticMarket) -> Registered:
    """Insert what is missing of the market's reference rows, in one transaction."""
    with conn.transaction():
        chains = 0
        for chain in market.chain_rows():
            chains += conn.execute(
                'INSERT INTO "Chain" (id, name, "shortName", "nativeCurrencySymbol", "explorerUrl", metadata, '
                '"updatedAt") VALUES (%s, %s, %s, %s, %s, %s, CURRENT_TIMESTAMP) ON CONFLICT DO NOTHING',
                (chain["id"], chain["name"], chain["shortName"], chain["nativeCurrencySymbol"], chain["explorerUrl"],
                 Jsonb({"synthetic": True})),
            ).rowcount
        protocols = 0
        for protocol in market.protocol_rows():
            protocols += conn.execute(
                'INSERT INTO "Protocol" (id, slug, name, "chainId", metadata, "updatedAt") '
                'VALUES (%s, %s, %s, %s, %s, CURRENT_TIMESTAMP) ON CONFLICT DO NOTHING',
                (protocol["id"], protocol["slug"], protocol["name"], protocol["chainId"], Jsonb({"synthetic": True})),
            ).rowcount
        now = sql.SQL("CURRENT_TIMESTAMP")
        synthetic = sql.SQL("jsonb_build_object('synthetic', true)")
        tokens = _bulk_insert(conn, "Token", market.token_rows(), {"metadata": synthetic, "updatedAt": now})
        wallets = _bulk_insert(conn, "Wallet", market.wallet_rows(), {"metadata": synthetic, "updatedAt": now})
    return Registered(chains, tokens, wallets, protocols)
