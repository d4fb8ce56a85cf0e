"""Adoption's pure pieces: the shape comparison, foreign-key re-pointing, groups and lock keys."""

import pytest

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.model import Column, Model, Table
from wedefi_pipelines.adoption.shadow import _repointed
from wedefi_pipelines.adoption.shape import compare


def _table(name: str, kind: str = "r", **columns: str) -> Table:
    table = Table(name, kind)
    for column, type_ in columns.items():
        table.columns[column] = Column(column, type_, True, False)
    return table


def _model() -> Model:
    tables = {name: _table(name, "r", id="text") for name in L.MANAGED_TABLES}
    for name in ("PriceSnapshot", "TokenBalance", "PortfolioSnapshot", "PositionSnapshot"):
        tables[name].kind = "p"
    tables["PriceSnapshot"].columns["priceUsd"] = Column("priceUsd", "numeric(36,18)", True, False)
    tables["PriceSnapshot"].columns["recordedAt"] = Column("recordedAt", "timestamp(3) without time zone", True, True)
    tables["PriceSnapshot"].foreign_keys["PriceSnapshot_tokenId_fkey"] = (("tokenId",), "Token")
    tables["PositionSnapshot"].columns["capturedAt"] = Column("capturedAt", "timestamp(3) without time zone", True, False)
    tables["PortfolioSnapshot"].triggers.add("portfolio_deletes_positions")
    return Model(tables, [])


def _app() -> dict[str, Table]:
    app = {name: _table(name, "r", id="text") for name in L.MANAGED_TABLES}
    app["PriceSnapshot"].columns["priceUsd"] = Column("priceUsd", "numeric(36,18)", True, False)
    app["PriceSnapshot"].columns["recordedAt"] = Column("recordedAt", "timestamp(3) without time zone", True, True)
    app["PriceSnapshot"].foreign_keys["PriceSnapshot_tokenId_fkey"] = (("tokenId",), "Token")
    app["PositionSnapshot"].foreign_keys["PositionSnapshot_portfolioSnapshotId_fkey"] = (
        ("portfolioSnapshotId",), "PortfolioSnapshot")
    return app


def test_the_apps_shape_is_accepted_and_the_dropped_foreign_key_named():
    shape = compare(_model(), _app(), [], [], [])
    assert shape.ok and shape.state == "prisma"
    assert shape.notes == ['foreign key "PositionSnapshot_portfolioSnapshotId_fkey" "PositionSnapshot"(portfolioSnapshotId)'
                           ' -> "PortfolioSnapshot" cannot reference a partitioned table by id alone: sql/ defines '
                           'trigger(s) "portfolio_deletes_positions" on "PortfolioSnapshot" in its place']


@pytest.mark.parametrize("damage, expected", [
    (lambda app: app.pop("AlertDelivery"), 'missing table "AlertDelivery"'),
    (lambda app: app["PriceSnapshot"].columns.__setitem__("priceUsd", Column("priceUsd", "double precision", True, False)),
     'column "PriceSnapshot"."priceUsd" is double precision, expected numeric(36,18)'),
    (lambda app: app["PriceSnapshot"].columns.__setitem__("note", Column("note", "text", False, False)),
     'column "PriceSnapshot"."note" (text) is not in the partitioned layout: its values would be lost'),
    (lambda app: app["PriceSnapshot"].foreign_keys.clear(), '"PriceSnapshot" has no foreign key (tokenId) -> "Token"'),
    (lambda app: app["PriceSnapshot"].columns.__setitem__("priceUsd", Column("priceUsd", "numeric(36,18)", False, False)),
     'column "PriceSnapshot"."priceUsd" allows NULL'),
])
def test_each_difference_is_named(damage, expected):
    app = _app()
    damage(app)
    shape = compare(_model(), app, [], [], [])
    assert not shape.ok
    assert any(d.startswith(expected) for d in shape.differences), shape.differences
    assert "nothing was changed" in shape.refusal()


def test_a_nullable_time_column_is_not_a_difference_rows_without_one_are_set_aside():
    app = _app()
    app["PriceSnapshot"].columns["recordedAt"] = Column("recordedAt", "timestamp(3) without time zone", False, True)
    assert compare(_model(), app, [], [], []).ok


def test_states():
    partitioned = _app()
    for name in L.BY_NAME:
        partitioned[name].kind = "p"
    assert compare(_model(), partitioned, [], [], []).state == "adopted"
    mixed = _app()
    mixed["TokenBalance"].kind = "p"
    assert compare(_model(), mixed, [], [], []).state == "mixed"
    empty = compare(_model(), {}, [], [], [])
    assert empty.state == "missing" and "wedefi-pipelines migrate" in empty.refusal()


def test_foreign_keys_are_aimed_at_the_apps_tables():
    assert _repointed('FOREIGN KEY ("tokenId") REFERENCES wedefi_adopt."Token"(id) ON UPDATE CASCADE ON DELETE CASCADE') == (
        'FOREIGN KEY ("tokenId") REFERENCES public."Token"(id) ON UPDATE CASCADE ON DELETE CASCADE')
    with pytest.raises(ValueError):
        _repointed('FOREIGN KEY ("tokenId") REFERENCES other."Token"(id)')


def test_groups_and_lock_key():
    assert L.group_of("PositionSnapshot") == ("PortfolioSnapshot", "PositionSnapshot")
    assert sorted(n for g in L.GROUPS for n in g) == sorted(L.BY_NAME)
    with pytest.raises(ValueError, match="not converted"):
        L.group_of("Token")
    assert L.adopt_lock_key() == L.adopt_lock_key() and -(2**63) <= L.adopt_lock_key() < 2**63
