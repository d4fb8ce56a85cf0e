"""The content hash computed by PostgreSQL equals the one numpy computes over the same rows
read back through Arrow, for every column type the archive supports and awkward values."""

import json
import random
from decimal import Context, Decimal

import numpy as np
import pyarrow as pa
import pytest
from psycopg import sql

from wedefi_pipelines.tiering.arrow_io import ROW_HASH, copy_batches, select_sql
from wedefi_pipelines.tiering.columns import archive_columns, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql, row_hashes

WIDE = Context(prec=60)
TABLE = """CREATE TABLE "HashProbe" (k serial, t text, v varchar(32), n numeric(36,18), z numeric(10,0),
           j jsonb, i int4, s int2, b bool, l int8, ts timestamp(3), us timestamp)"""


def _rows(count: int) -> list[tuple]:
    rng = random.Random(7)

    def maybe(value):
        return None if rng.random() < 0.1 else value

    rows = []
    for _ in range(count):
        length = rng.choice([0, 1, 3, 4, 8, 11, 12, 13, 24, 25, 36, 100, 239, 241, 2000])
        text = "".join(rng.choice("abcé€😀xyz\n,\"\\\t ") for _ in range(length))
        scale = rng.choice([-18, -9, -1, 0])
        numeric = Decimal(rng.randint(-10**17, 10**17)).scaleb(scale, WIDE).quantize(Decimal("1e-18"), context=WIDE)
        rows.append((maybe(text), maybe(text[:32]), maybe(numeric), maybe(rng.randint(-10**9, 10**9)),
                     maybe(json.dumps({"a": rng.random(), "s": text[:20], "n": [1, None, True]})),
                     maybe(rng.randint(-2**31, 2**31 - 1)), maybe(rng.randint(-2**15, 2**15 - 1)),
                     maybe(rng.random() < 0.5), maybe(rng.randint(-2**63, 2**63 - 1)),
                     maybe(f"{rng.randint(1, 9999):04d}-0{rng.randint(1, 9)}-2{rng.randint(0, 8)} "
                           f"{rng.randint(10, 23)}:1{rng.randint(0, 9)}:2{rng.randint(0, 9)}.{rng.randint(0, 999):03d}"),
                     maybe(f"19{rng.randint(10, 99)}-1{rng.randint(0, 2)}-0{rng.randint(1, 9)} 03:04:05.{rng.randint(0, 999999):06d}")))
    rows.append((None,) * 11)
    rows.append(("", "", Decimal(0), 0, "{}", 0, 0, False, 0, "2000-01-01 00:00:00", "1970-01-01 00:00:00"))
    return rows


@pytest.mark.parametrize("count", [2000])
def test_postgresql_and_numpy_agree_row_by_row(db, count):
    with db.connect(autocommit=False) as conn:
        conn.execute(TABLE)
        with conn.cursor() as cur:
            cur.executemany('INSERT INTO "HashProbe" (t, v, n, z, j, i, s, b, l, ts, us) '
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", _rows(count))
        columns = [c for c in archive_columns(conn, "HashProbe") if c.name != "k"]
        kinds = hash_kinds(columns)
        query = select_sql("HashProbe", columns, ("k",), row_hash_sql(kinds))
        table = pa.Table.from_batches(list(copy_batches(conn, query, columns, with_row_hash=True)))
        total = conn.execute(sql.SQL('SELECT count(*), sum({}::numeric) FROM "HashProbe"').format(
            row_hash_sql(kinds))).fetchone()
    assert table.num_rows == count + 2
    computed = row_hashes(table, kinds)
    from_pg = table.column(ROW_HASH).to_numpy()
    assert np.array_equal(computed, from_pg), np.flatnonzero(computed != from_pg)[:10]
    assert ContentHash.of(computed) == ContentHash(total[0], int(total[1]))
    # any change to one value of one row changes the sum
    changed = table.set_column(table.schema.get_field_index("i"), "i",
                               pa.array([(v or 0) + (1 if k == 5 else 0) for k, v in
                                         enumerate(table.column("i").to_pylist())], pa.int32()))
    assert ContentHash.of(row_hashes(changed, kinds)) != ContentHash.of(computed)
