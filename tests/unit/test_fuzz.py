"""Fuzz: schemathesis over the gateway's OpenAPI schema, every operation (inference, feedback,
admin, rollouts), bodies that fit the schema and bodies that do not, with no credential, an API
key and the admin token. No answer is a 5xx, and every error is in OpenAI's shape.

The gateway runs against the fake engine (tests/unit/conftest.py), so a 5xx here is the
gateway's own. The cases it found are kept as plain tests in tests/unit/test_fuzz_found.py.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from rollout.api import rollout_router
from tests.unit.conftest import ADMIN_TOKEN

API_KEY = "fuzz-api-key"
FEEDBACK_KEY = "fuzz-feedback-key"
CREDENTIALS = {"none": {}, "api key": {"authorization": f"Bearer {API_KEY}"}}
CREDENTIALS["admin token"] = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# Per operation, mode and credential: 19 x 2 x 3 x 12 cases at most, about a minute here; a
# longer hunt: TUNEWATCH_FUZZ_EXAMPLES=200.
EXAMPLES = int(os.environ.get("TUNEWATCH_FUZZ_EXAMPLES", "12"))


def assert_answered_well(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, f"{what}: {body}"
        assert set(body["error"]) == {"message", "type", "param", "code"}, f"{what}: {body}"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], what


def aimed(case: Any, at: dict[str, str], aim: bool) -> Any:
    """Half the cases name what exists (the served model, an exchange it answered), so that
    they reach past the 404s into the gateway's handling; the rest stay as generated."""
    if aim and isinstance(case.body, dict):
        if case.path in ("/v1/chat/completions", "/v1/completions"):
            case.body["model"] = at["model"]
        elif case.path == "/v1/feedback":
            case.body["exchange_id"] = at["exchange_id"]
    return case


def send(client: Any, case: Any, headers: dict[str, str]) -> Any:
    """Send a schemathesis case through the gateway's TestClient (its lifespan is running)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    content = kwargs.get("data")
    if content is not None and not isinstance(content, bytes):
        content = str(content).encode()
    return client.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs["headers"],
        params=kwargs.get("params") or None,
        json=kwargs.get("json"),
        content=content,
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_a_5xx_or_an_error_outside_openai_s_shape(make_harness, mode) -> None:
    gw = make_harness(
        routers=lambda store: [rollout_router(store)],
        api_keys=[API_KEY],
        feedback_keys=[FEEDBACK_KEY],
    )
    schema = schemathesis.openapi.from_dict(gw.client.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    answer = gw.client.post(
        "/v1/chat/completions",
        json={"model": gw.served_model_name, "messages": [{"role": "user", "content": "Hi"}]},
        headers=CREDENTIALS["api key"],
    )
    at = {"model": gw.served_model_name, "exchange_id": answer.headers["x-tunewatch-exchange-id"]}
    assert len(operations) >= 15  # inference, feedback, admin and rollouts all in the schema
    answered: Counter[int] = Counter()
    failures: list[str] = []

    for operation in operations:
        for credential, headers in CREDENTIALS.items():
            what = f"{operation.method.upper()} {operation.path} ({mode.value}, {credential})"

            cases = st.tuples(operation.as_strategy(generation_mode=mode), st.booleans())

            @given(case=cases.map(lambda pair: aimed(pair[0], at, pair[1])))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: Any) -> None:
                try:
                    response = send(gw.client, case, headers)  # noqa: B023
                except Exception as exc:  # the TestClient raises what the app did not handle
                    raise AssertionError(f"{what}: raised {exc!r}") from exc  # noqa: B023
                answered[response.status_code] += 1
                assert_answered_well(response, what)  # noqa: B023

            try:
                fuzz()
            except Unsatisfiable:  # nothing invalid to send (a GET without parameters)
                continue
            except AssertionError as failure:  # the shrunk case; the other operations go on
                failures.append(str(failure).splitlines()[0])

    print(f"fuzz, {mode.value}: {sum(answered.values())} cases, by status {dict(answered)}")
    assert not failures, "\n".join(failures)
    assert sum(answered.values()) > len(operations) * EXAMPLES
