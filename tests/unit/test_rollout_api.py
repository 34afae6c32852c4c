"""The admin API of rollouts: the same checks as the CLI, answered in OpenAI's error shape."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from registry.versions import register
from rollout.api import rollout_router
from tests.unit.conftest import Harness, write_adapter


@pytest.fixture
def api(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness(routers=lambda store: [rollout_router(store)])


def candidate(api: Harness, name: str = "support") -> str:
    path = write_adapter(api.adapters_root / name, name.encode())
    return register(api.gateway.store, name, path, reason="trained").name


def test_the_rollout_api_needs_the_admin_token(api: Harness):
    response = api.client.get("/admin/rollouts")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_admin_token"


def test_starting_a_candidate_is_accepted_and_can_be_followed(api: Harness):
    name = candidate(api)
    accepted = api.admin("POST", "/admin/rollouts", json={"adapter": name})
    assert accepted.status_code == 202, accepted.text
    command = accepted.json()
    assert (command["command"], command["status"], command["by"]) == (
        "start",
        "pending",
        "admin api",
    )
    followed = api.admin("GET", f"/admin/rollouts/commands/{command['id']}")
    assert followed.json() == command


def test_an_unknown_adapter_is_refused_with_the_reason(api: Harness):
    response = api.admin("POST", "/admin/rollouts", json={"adapter": "ghost-v1"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "rollout_conflict" and "no adapter named 'ghost-v1'" in error["message"]


def test_a_command_without_a_rollout_in_progress_is_refused(api: Harness):
    response = api.admin("POST", "/admin/rollouts/current/promote")
    assert response.status_code == 409
    assert "no rollout is in progress" in response.json()["error"]["message"]


def test_an_unknown_command_is_a_400_naming_it(api: Harness):
    response = api.admin("POST", "/admin/rollouts/current/restart")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_bad_start_body_is_a_400_naming_the_field(api: Harness):
    response = api.admin("POST", "/admin/rollouts", json={"candidate": "x"})
    assert response.status_code == 400
    assert "adapter" in response.json()["error"]["message"]


def test_no_rollout_in_progress_is_a_404(api: Harness):
    response = api.admin("GET", "/admin/rollouts/current")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_rollout"
    assert api.admin("GET", "/admin/rollouts").json() == []
