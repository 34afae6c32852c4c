"""Feedback becomes training data: who may post it, what it may hold, and how much of it."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from sqlalchemy import func, select

from serving.auth import key_id
from serving.gateway import EXCHANGE_HEADER, GatewayConfig
from store.exchanges import Feedback, FeedbackLimitError
from tests.unit.test_gateway import assert_openai_error

KEY_A, KEY_B, LABELLER = "sk-team-a", "sk-team-b", "fk-labelling-team"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_as(gw, key: str | None) -> str:
    """An answered chat made with `key`; its exchange id."""
    body = {"model": gw.served_model_name, "messages": [{"role": "user", "content": "hi"}]}
    response = gw.client.post("/v1/chat/completions", json=body, headers=bearer(key) if key else {})
    assert response.status_code == 200, response.text
    return response.headers[EXCHANGE_HEADER]


def post(gw, exchange_id: str, key: str | None = None, **fields: Any):
    body = {"exchange_id": exchange_id, **({"rating": 1.0} if not fields else fields)}
    return gw.client.post("/v1/feedback", json=body, headers=bearer(key) if key else {})


def feedback_rows(gw, exchange_id: str) -> int:
    with gw.gateway.store.session() as session:
        query = select(func.count()).where(Feedback.exchange_id == exchange_id)
        return session.scalar(query) or 0


@pytest.fixture
def keyed(make_harness):
    return make_harness(api_keys=[KEY_A, KEY_B], feedback_keys=[LABELLER])


# who may post it


def test_an_exchange_is_recorded_with_the_id_of_the_key_that_made_it_not_the_key(keyed) -> None:
    exchange = keyed.exchange(chat_as(keyed, KEY_A))
    assert exchange.api_key_id == key_id(KEY_A)
    assert len(exchange.api_key_id) == 16 and KEY_A not in exchange.api_key_id


def test_without_api_keys_an_exchange_has_no_key_id(gw) -> None:
    assert gw.exchange(chat_as(gw, None)).api_key_id is None


def test_the_key_that_made_an_exchange_may_post_its_feedback(keyed) -> None:
    exchange_id = chat_as(keyed, KEY_A)
    assert post(keyed, exchange_id, KEY_A).status_code == 200


def test_another_api_key_may_not_post_feedback_for_an_exchange_it_did_not_make(keyed) -> None:
    exchange_id = chat_as(keyed, KEY_A)
    error = assert_openai_error(post(keyed, exchange_id, KEY_B), 403, "feedback_not_allowed")
    assert error["param"] == "exchange_id"
    assert feedback_rows(keyed, exchange_id) == 0


def test_a_feedback_key_may_post_feedback_for_any_exchange(keyed) -> None:
    exchange_id = chat_as(keyed, KEY_A)
    assert post(keyed, exchange_id, LABELLER).status_code == 200


def test_a_feedback_key_opens_feedback_only_not_inference(keyed) -> None:
    assert_openai_error(keyed.chat(), 401, "invalid_api_key")
    response = keyed.client.post(
        "/v1/chat/completions",
        json={"model": keyed.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer(LABELLER),
    )
    assert_openai_error(response, 401, "invalid_api_key")


def test_with_api_keys_feedback_without_a_credential_is_401(keyed) -> None:
    exchange_id = chat_as(keyed, KEY_A)
    assert_openai_error(post(keyed, exchange_id), 401, "invalid_api_key")
    assert_openai_error(post(keyed, exchange_id, "sk-wrong"), 401, "invalid_api_key")


def test_feedback_keys_alone_close_feedback_but_not_inference(make_harness) -> None:
    gw = make_harness(feedback_keys=[LABELLER])
    exchange_id = chat_as(gw, None)
    assert_openai_error(post(gw, exchange_id), 401, "invalid_api_key")
    assert post(gw, exchange_id, LABELLER).status_code == 200


def test_an_exchange_made_without_a_key_is_labelled_only_with_a_feedback_key(make_harness) -> None:
    before = make_harness()
    exchange_id = chat_as(before, None)
    before.drain()
    before.client.__exit__(None, None, None)
    after = make_harness(api_keys=[KEY_A], feedback_keys=[LABELLER])  # same store
    assert_openai_error(post(after, exchange_id, KEY_A), 403, "feedback_not_allowed")
    assert post(after, exchange_id, LABELLER).status_code == 200


def test_an_empty_feedback_key_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        GatewayConfig("m", "t", tmp_path / "spill.jsonl", feedback_keys=[""])


# what it may hold


def post_raw(gw, exchange_id: str, rating: str):
    """A rating as written in the body: JSON's 1e999 reads as infinity, and Python's reader
    takes NaN, which JSON has not."""
    return gw.client.post(
        "/v1/feedback",
        content=f'{{"exchange_id": "{exchange_id}", "rating": {rating}}}'.encode(),
        headers={"content-type": "application/json"},
    )


@pytest.mark.parametrize("rating", ["-0.1", "1.5", "1e999", "-1e999"])
def test_a_rating_outside_zero_to_one_or_infinite_is_400_naming_it(gw, rating: str) -> None:
    exchange_id = chat_as(gw, None)
    error = assert_openai_error(post_raw(gw, exchange_id, rating), 400)
    assert error["param"] == "rating"
    assert feedback_rows(gw, exchange_id) == 0


def test_a_rating_of_nan_is_400(gw) -> None:
    exchange_id = chat_as(gw, None)
    assert_openai_error(post_raw(gw, exchange_id, "NaN"), 400)
    assert feedback_rows(gw, exchange_id) == 0


@pytest.mark.parametrize("rating", [0, 0.5, 1])
def test_a_rating_from_zero_to_one_is_taken(gw, rating: float) -> None:
    assert post(gw, chat_as(gw, None), rating=rating).status_code == 200


def test_a_reference_longer_than_the_setting_is_400_naming_it(make_harness) -> None:
    gw = make_harness(feedback_reference_max_chars=100)
    exchange_id = chat_as(gw, None)
    assert post(gw, exchange_id, reference="x" * 100).status_code == 200
    error = assert_openai_error(post(gw, exchange_id, reference="x" * 101), 400)
    assert error["param"] == "reference"
    assert "100" in error["message"]


def test_the_reference_bound_is_8192_characters_by_default(gw) -> None:
    exchange_id = chat_as(gw, None)
    assert post(gw, exchange_id, reference="x" * 8192).status_code == 200
    assert_openai_error(post(gw, exchange_id, reference="x" * 8193), 400)


# how much of it


def test_feedback_beyond_the_cap_per_exchange_is_409(make_harness) -> None:
    gw = make_harness(feedback_max_per_exchange=2)
    exchange_id = chat_as(gw, None)
    assert [post(gw, exchange_id).status_code for _ in range(2)] == [200, 200]
    error = assert_openai_error(post(gw, exchange_id), 409, "feedback_limit_reached")
    assert error["param"] == "exchange_id"
    assert feedback_rows(gw, exchange_id) == 2


def test_the_cap_per_exchange_is_five_by_default(gw) -> None:
    exchange_id = chat_as(gw, None)
    assert [post(gw, exchange_id).status_code for _ in range(6)] == [200] * 5 + [409]


def test_the_cap_holds_under_concurrent_posts(gw) -> None:
    exchange_id = chat_as(gw, None)
    gw.drain()
    store = gw.gateway.store

    def add(_: int) -> bool:
        try:
            store.add_feedback(exchange_id, None, 1.0, max_per_exchange=3)
        except FeedbackLimitError:
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(add, range(24)))
    assert (sum(taken), feedback_rows(gw, exchange_id)) == (3, 3)


def test_feedback_beyond_the_rate_per_key_is_429_with_retry_after(make_harness) -> None:
    gw = make_harness(api_keys=[KEY_A, KEY_B], feedback_per_minute=6)  # a burst of one
    first, second = chat_as(gw, KEY_A), chat_as(gw, KEY_A)
    assert post(gw, first, KEY_A).status_code == 200
    response = post(gw, second, KEY_A)
    assert_openai_error(response, 429, "rate_limit_exceeded")
    assert 1 <= int(response.headers["retry-after"]) <= 10
    assert feedback_rows(gw, second) == 0
    assert post(gw, chat_as(gw, KEY_B), KEY_B).status_code == 200  # its own bucket
