"""The routing table and `choose_route`: who goes to the canary, who is mirrored to the shadow."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from serving.routing import RouteChoice, choose_route, unit_hash
from store.adapters import RoutingTable

USERS = [f"user-{i}" for i in range(4000)]


def canary_users(table: RoutingTable) -> set[str]:
    return {u for u in USERS if choose_route(table, u, random.Random(0)).route == "canary"}


def test_unit_hash_is_stable_across_processes_and_releases() -> None:
    # A changed hash would reshuffle every user in the middle of a rollout.
    assert unit_hash("canary-v2", "alice") == pytest.approx(0.9939722062720338)


def test_unit_hash_lies_in_the_unit_interval() -> None:
    points = [unit_hash("canary", u) for u in USERS]
    assert all(0.0 <= p < 1.0 for p in points)


def test_an_empty_table_sends_everyone_to_the_base_model_without_mirroring() -> None:
    assert choose_route(RoutingTable(), "alice") == RouteChoice("primary", None, None)


def test_a_user_always_lands_on_the_same_side() -> None:
    table = RoutingTable(primary="v1", canary="v2", canary_weight=0.5)
    for user in USERS[:200]:
        routes = {choose_route(table, user, random.Random(seed)).route for seed in range(5)}
        assert len(routes) == 1, user


def test_raising_the_canary_weight_only_adds_users() -> None:
    at_5 = canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=0.05))
    at_25 = canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=0.25))
    assert at_5 and at_5 <= at_25
    assert len(at_25) > len(at_5)


@pytest.mark.parametrize("weight", [0.05, 0.25, 0.5])
def test_the_canary_share_of_users_is_close_to_its_weight(weight: float) -> None:
    share = len(canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=weight))) / len(
        USERS
    )
    assert share == pytest.approx(weight, abs=0.03)


def test_anonymous_requests_go_to_the_canary_at_its_weight() -> None:
    table = RoutingTable(primary="v1", canary="v2", canary_weight=0.3)
    rng = random.Random(1)
    share = sum(choose_route(table, None, rng).route == "canary" for _ in range(4000)) / 4000
    assert share == pytest.approx(0.3, abs=0.03)


def test_weight_zero_keeps_everyone_on_the_primary_and_weight_one_moves_everyone() -> None:
    assert canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=0.0)) == set()
    assert canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=1.0)) == set(USERS)


def test_the_canary_answers_with_its_own_adapter_and_the_primary_with_its() -> None:
    table = RoutingTable(primary="v1", canary="v2", canary_weight=0.5)
    decisions = {choose_route(table, u).route: choose_route(table, u).adapter for u in USERS[:100]}
    assert decisions == {"primary": "v1", "canary": "v2"}


def test_each_canary_samples_its_own_users() -> None:
    v2 = canary_users(RoutingTable(primary="v1", canary="v2", canary_weight=0.25))
    v3 = canary_users(RoutingTable(primary="v1", canary="v3", canary_weight=0.25))
    overlap = len(v2 & v3) / len(v2)
    assert overlap == pytest.approx(0.25, abs=0.06)  # independent draws, not the same users


def test_the_shadow_mirrors_its_fraction_of_requests() -> None:
    table = RoutingTable(primary="v1", shadow="v2", shadow_fraction=0.2)
    rng = random.Random(2)
    mirrored = [choose_route(table, u, rng).mirror_to for u in USERS]
    assert set(mirrored) == {"v2", None}
    assert mirrored.count("v2") / len(USERS) == pytest.approx(0.2, abs=0.03)


def test_a_shadow_at_fraction_one_mirrors_every_request_whichever_side_answers() -> None:
    table = RoutingTable(
        primary="v1", canary="v3", canary_weight=0.5, shadow="v2", shadow_fraction=1.0
    )
    assert {choose_route(table, u).mirror_to for u in USERS[:200]} == {"v2"}


def test_a_candidate_both_canary_and_shadow_mirrors_only_the_primarys_requests() -> None:
    table = RoutingTable(
        primary="v1", canary="v2", canary_weight=0.5, shadow="v2", shadow_fraction=1.0
    )
    decisions = [choose_route(table, f"user-{n}") for n in range(400)]
    assert {(d.route, d.mirror_to) for d in decisions} == {("primary", "v2"), ("canary", None)}


def test_a_shadow_at_fraction_zero_mirrors_nothing() -> None:
    table = RoutingTable(primary="v1", shadow="v2", shadow_fraction=0.0)
    assert {choose_route(table, u).mirror_to for u in USERS[:200]} == {None}


def test_a_canary_weight_without_a_canary_is_refused() -> None:
    with pytest.raises(ValidationError, match="canary_weight > 0 needs a canary adapter"):
        RoutingTable(primary="v1", canary_weight=0.1)


def test_a_shadow_fraction_without_a_shadow_is_refused() -> None:
    with pytest.raises(ValidationError, match="shadow_fraction > 0 needs a shadow adapter"):
        RoutingTable(primary="v1", shadow_fraction=0.1)


def test_a_canary_equal_to_the_primary_is_refused() -> None:
    with pytest.raises(ValidationError, match="the canary must differ from the primary"):
        RoutingTable(primary="v1", canary="v1", canary_weight=0.1)


def test_a_shadow_equal_to_the_primary_is_refused() -> None:
    with pytest.raises(ValidationError, match="the shadow must differ from the primary"):
        RoutingTable(primary="v1", shadow="v1")


@pytest.mark.parametrize("field", ["canary_weight", "shadow_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_weights_outside_the_unit_interval_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        RoutingTable(primary="v1", canary="v2", shadow="v3", **{field: value})


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="canary_wieght"):
        RoutingTable(canary="v2", canary_wieght=0.5)


def test_the_table_names_every_adapter_it_uses() -> None:
    table = RoutingTable(primary="v1", canary="v2", canary_weight=0.1, shadow="v3")
    assert table.adapters() == {"v1", "v2", "v3"}
    assert RoutingTable().adapters() == set()
