"""`tunewatch replay` and `tunewatch export`: the traffic file, the official client against the
gateway (with the fake engine), feedback, timing, a dead gateway, and the export round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from store.exchanges import Feedback
from tests.ports import free_port
from tests.unit.conftest import REPLY_TOKENS, TOO_LONG, Harness
from tunewatch.cli import app
from tunewatch.export import export_traffic
from tunewatch.replay import Outcome, Replayer, ReplayOptions, ReplaySummary, send_times
from tunewatch.traffic import GatewayUnreachableError, NumberedLine, TrafficLine, read_traffic

REPLY = "".join(REPLY_TOKENS)


def write_traffic(path: Path, *lines: dict[str, Any] | str) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def said(result: Any) -> str:
    """What the CLI printed, as one line (rich wraps at the terminal's width)."""
    return " ".join(result.output.split())


def numbered(*lines: dict[str, Any]) -> list[NumberedLine]:
    return [NumberedLine(i, TrafficLine.model_validate(line)) for i, line in enumerate(lines, 1)]


def replay(
    gw: Harness, lines: list[NumberedLine], **options: Any
) -> tuple[ReplaySummary, list[Outcome]]:
    """Replay through the gateway's own ASGI app, on its event loop, with the official client."""
    outcomes: list[Outcome] = []

    async def run() -> ReplaySummary:
        transport = httpx.ASGITransport(app=gw.client.app)
        base = "http://gateway.test/v1/"
        async with (
            httpx.AsyncClient(transport=transport) as http,
            httpx.AsyncClient(transport=transport, base_url=base) as feedback,
        ):
            client = openai.AsyncOpenAI(base_url=base, api_key="unused", http_client=http)
            replayer = Replayer(
                client,
                feedback,
                ReplayOptions(model=gw.served_model_name, **options),
                outcomes.append,
            )
            return await replayer.run(lines)

    summary = gw.run(run)
    gw.drain()
    return summary, outcomes


# the traffic file


def test_a_traffic_file_keeps_good_lines_and_names_each_bad_one_by_file_and_line(
    tmp_path: Path,
) -> None:
    path = write_traffic(
        tmp_path / "t.jsonl",
        {"prompt": "one", "reference": "1", "user": "u1", "at": 0.5},
        "",
        "{not json",
        {"prompt": "two", "messages": [{"role": "user", "content": "two"}]},
        {"reference": "no request"},
        {"prompt": "late", "at": -1},
        {"messages": [{"role": "user", "content": "three"}], "max_tokens": 8},
    )
    lines, bad = read_traffic(path)
    assert [n.number for n in lines] == [1, 7]
    assert lines[0].line.user == "u1" and lines[1].line.max_tokens == 8
    assert [b.where for b in bad] == [f"{path}:3", f"{path}:4", f"{path}:5", f"{path}:6"]
    assert "exactly one of `prompt` and `messages`" in bad[1].problem
    assert bad[3].problem.startswith("at:")


def test_a_traffic_file_that_cannot_be_read_is_one_error_naming_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "cannot read" in said(result) and "missing.jsonl" in said(result)


def test_a_file_with_no_good_line_sends_nothing_and_says_why(tmp_path: Path) -> None:
    path = write_traffic(tmp_path / "t.jsonl", {"nothing": 1})
    result = CliRunner().invoke(app, ["replay", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1" in said(result) and "has no line to send" in said(result)


def test_sending_times_follow_the_rate_else_the_lines_times_else_none() -> None:
    timed = numbered({"prompt": "a", "at": 0}, {"prompt": "b"}, {"prompt": "c", "at": 4})
    assert send_times(timed, ReplayOptions(model="m", rate=2)) == [0.0, 0.5, 1.0]
    assert send_times(timed, ReplayOptions(model="m", speed=2)) == [0.0, 0.0, 2.0]
    assert send_times(numbered({"prompt": "a"}), ReplayOptions(model="m")) == [None]


# against the gateway


def test_every_line_is_answered_recorded_and_labelled_with_feedback(gw: Harness) -> None:
    lines = numbered(
        {"prompt": "capital?", "reference": REPLY, "user": "ann", "max_tokens": 9},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "x"},
            ]
        },
        {"prompt": "The capital of France is", "endpoint": "completions", "reference": "Lyon"},
    )
    summary, outcomes = replay(gw, lines, feedback_share=1.0)
    assert (summary.sent, summary.answered, summary.failed) == (3, 3, 0)
    assert summary.feedback_posted == 2 and not summary.stopped_by_time_limit
    by_line = {o.number: o for o in outcomes}
    assert by_line[1].exact_match is True and by_line[3].exact_match is False
    assert by_line[2].exact_match is None and by_line[1].adapter == "base"
    assert by_line[1].route == "primary" and by_line[1].answer == REPLY
    recorded = {e.id: e for e in gw.exchanges()}
    assert set(recorded) == {o.exchange_id for o in outcomes}
    first = recorded[by_line[1].exchange_id]
    assert (first.user, first.request["max_tokens"], first.endpoint) == (
        "ann",
        9,
        "chat.completions",
    )
    assert recorded[by_line[3].exchange_id].endpoint == "completions"
    with gw.gateway.store.session() as session:
        posted = {f.exchange_id: f.reference for f in session.scalars(select(Feedback))}
    assert posted == {by_line[1].exchange_id: REPLY, by_line[3].exchange_id: "Lyon"}


def test_no_feedback_is_posted_at_a_share_of_zero(gw: Harness) -> None:
    summary, _ = replay(gw, numbered({"prompt": "a", "reference": "b"}), feedback_share=0.0)
    assert summary.feedback_posted == 0
    with gw.gateway.store.session() as session:
        assert list(session.scalars(select(Feedback))) == []


def test_a_refused_request_is_counted_with_the_gateway_s_message_and_the_replay_goes_on(
    gw: Harness,
) -> None:
    lines = numbered({"prompt": f"{TOO_LONG} x"}, {"prompt": "fine"})
    summary, outcomes = replay(gw, lines)
    assert (summary.answered, summary.failed) == (1, 1)
    [refused] = [o for o in outcomes if not o.ok]
    assert refused.number == 1 and refused.error.startswith("400: ")
    assert "maximum context length" in refused.error


def test_the_time_limit_stops_the_replay(gw: Harness) -> None:
    lines = numbered(*({"prompt": f"p{i}"} for i in range(20)))
    started = time.monotonic()
    summary, _ = replay(gw, lines, rate=5.0, time_limit_s=1.0)
    assert time.monotonic() - started < 5
    assert summary.stopped_by_time_limit and 3 <= summary.sent < 20


async def test_a_gateway_that_does_not_answer_stops_the_replay() -> None:
    base = f"http://127.0.0.1:{free_port()}/v1/"
    async with httpx.AsyncClient(base_url=base) as feedback:
        client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
        replayer = Replayer(client, feedback, ReplayOptions(model="m"))
        with pytest.raises(GatewayUnreachableError, match="did not answer"):
            await replayer.run(numbered({"prompt": "a"}, {"prompt": "b"}))


def test_the_cli_says_in_one_line_that_the_gateway_is_down(tmp_path: Path) -> None:
    path = write_traffic(tmp_path / "t.jsonl", {"prompt": "a"})
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(app, ["replay", str(path), "--gateway-url", url])
    assert result.exit_code == 1
    assert "error:" in said(result) and "did not answer" in said(result)
    assert "Traceback" not in said(result)


# export


def test_export_gives_back_what_was_replayed_and_replays_again(gw: Harness) -> None:
    lines = numbered(
        {"prompt": "first", "reference": "one", "user": "u1", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "second"}], "temperature": 0.5},
        {"prompt": "third", "endpoint": "completions", "reference": "three"},
    )
    gw.load_adapter("side-v1")
    gw.set_routing(shadow="side-v1")  # shadow replays are not users' traffic
    replay(gw, lines, feedback_share=1.0, concurrency=1)
    exported = list(export_traffic(gw.gateway.store))
    assert len(exported) == 3
    assert [line["at"] for line in exported] == sorted(line["at"] for line in exported)
    assert exported[0]["at"] == 0.0
    recorded = exported[0].pop("recorded")
    assert recorded["status"] == "ok" and recorded["answer"] == REPLY
    assert recorded["adapter"] == "base" and recorded["mean_logprob"] < 0
    assert exported[0] == {
        "messages": [{"role": "user", "content": "first"}],
        "max_tokens": 5,
        "reference": "one",
        "user": "u1",
        "at": 0.0,
    }
    assert exported[1]["temperature"] == 0.5 and "reference" not in exported[1]
    assert exported[2]["endpoint"] == "completions" and exported[2]["prompt"] == "third"
    out = gw.adapters_root.parent / "exported.jsonl"
    result = CliRunner().invoke(
        app,
        ["export", "--output", str(out), "--since", "1h"],
        env={"TUNEWATCH_DATABASE_URL": str(gw.gateway.store.engine.url)},
    )
    assert result.exit_code == 0, result.output
    assert "exported 3 exchanges" in said(result)
    again, bad = read_traffic(out)  # every exported line is a valid traffic line
    assert bad == [] and len(again) == 3
    assert [n.line.model_dump(exclude_unset=True, exclude={"recorded"}) for n in again] == [
        {k: v for k, v in line.items() if k != "recorded"} for line in exported
    ]
    assert replay(gw, again)[0].answered == 3


def test_export_pages_through_more_rows_than_a_page_and_honours_the_limit(gw: Harness) -> None:
    from tunewatch import export

    replay(gw, numbered(*({"prompt": f"p{i}"} for i in range(7))), concurrency=1)
    original, export.PAGE = export.PAGE, 3
    try:
        prompts = [line["messages"][0]["content"] for line in export_traffic(gw.gateway.store)]
        limited = list(export_traffic(gw.gateway.store, limit=4))
    finally:
        export.PAGE = original
    assert prompts == [f"p{i}" for i in range(7)]
    assert len(limited) == 4


def test_export_refuses_a_time_it_cannot_read_naming_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--since", "last tuesday"])
    assert result.exit_code == 2
    assert "'last tuesday'" in said(result) and "--since" in said(result)
