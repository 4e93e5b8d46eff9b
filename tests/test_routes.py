"""The route table as a value: resolution, promotion, rollback, versions."""

from __future__ import annotations

import pytest

from muse._errors import BadRequest, Conflict, NotFound
from muse._routes import Route, RouteTable


def _table() -> RouteTable:
    return RouteTable().with_route("*", "card-fraud", "p@1", ("p@2",))


def test_star_route_serves_tenants_without_their_own() -> None:
    table = _table().with_route("bank-01", "card-fraud", "q@1", ())
    assert table.resolve("bank-07", "card-fraud").live == "p@1"
    assert table.resolve("bank-01", "card-fraud").live == "q@1"


def test_unknown_intent_is_not_found() -> None:
    with pytest.raises(NotFound, match="no route for intent 'aml'"):
        _table().resolve("bank-01", "aml")


def test_every_change_bumps_the_version_and_keeps_the_old_table() -> None:
    first = _table()
    second = first.promoted("*", "card-fraud", None)
    assert (first.version, second.version) == (1, 2)
    assert first.resolve("x", "card-fraud").live == "p@1"
    assert second.resolve("x", "card-fraud") == Route("p@2", (), ("p@1",))


def test_rollback_restores_previous_live_and_keeps_the_other_as_shadow() -> None:
    table = _table().promoted("*", "card-fraud", "p@2").rolled_back("*", "card-fraud")
    assert table.resolve("x", "card-fraud") == Route("p@1", ("p@2",), ())
    again = table.promoted("*", "card-fraud", "p@2")
    assert again.resolve("x", "card-fraud").live == "p@2"


def test_promote_and_rollback_refusals() -> None:
    with pytest.raises(Conflict, match="p@9 is not a shadow"):
        _table().promoted("*", "card-fraud", "p@9")
    with pytest.raises(Conflict, match="no earlier live version"):
        _table().rolled_back("*", "card-fraud")
    with pytest.raises(NotFound, match="no route for tenant 'b'"):
        _table().promoted("b", "card-fraud", None)
    two = _table().with_route("*", "card-fraud", "p@1", ("p@2", "p@3"))
    with pytest.raises(Conflict, match="has 2 shadows"):
        two.promoted("*", "card-fraud", None)
    with pytest.raises(BadRequest, match="both live and a shadow"):
        _table().with_route("*", "card-fraud", "p@1", ("p@1",))


def test_check_version_conflict() -> None:
    table = _table()
    table.check_version(1)
    table.check_version(None)
    with pytest.raises(Conflict, match="at version 1, the request expected 0"):
        table.check_version(0)


def test_mapping_resolution_falls_back_to_predictor_wide() -> None:
    table = (
        _table()
        .with_mapping("p@1", "*", "m-global")
        .with_mapping("p@1", "bank-02", "m-2")
    )
    assert table.mapping_id("p@1", "bank-02") == "m-2"
    assert table.mapping_id("p@1", "bank-03") == "m-global"
    assert table.mapping_id("p@2", "bank-03") is None


def test_round_trip_through_plain_data() -> None:
    table = (
        _table()
        .with_route("bank-01", "card-fraud", "q@1", ())
        .with_mapping("p@1", "*", "m1")
        .promoted("*", "card-fraud", "p@2")
    )
    again = RouteTable.from_dict(table.to_dict())
    assert again.to_dict() == table.to_dict()
    assert again.resolve("zz", "card-fraud") == table.resolve("zz", "card-fraud")
    assert again.predictors() == {"p@1", "p@2", "q@1"}
