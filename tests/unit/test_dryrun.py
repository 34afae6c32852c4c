"""`tunewatch replay --dry-run`: the drift checks and the trigger over a traffic file, on its
own clock: timing, what each line counts as, a known topic shift, the trigger grid, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor.drift import DriftConfig
from monitor.thresholds import FittingConfig
from retrain.policy import TriggerConfig
from tests.unit.test_monitor_sidecar import embed
from tunewatch import dryrun
from tunewatch.cli import app
from tunewatch.traffic import NumberedLine, TrafficLine

# Vocabularies wide enough for Evidently's text classifier: its TF-IDF prunes common words.
TAX = [
    f"{w}{i}"
    for w in "tax refund form income deadline receipt audit credit".split()
    for i in range(8)
]
WEATHER = [
    f"{w}{i}" for w in "weather rain forecast storm wind sunny cloud snow".split() for i in range(8)
]
CHANGE_AT = 400.0
# 8 columns at 20%: 39 splits, the fewest that state it; the change comes at 400 s.
CONFIG = dryrun.DryRunConfig(
    window_size=100,
    reference_size=200,
    interval_s=25.0,
    drift=DriftConfig(threads=1),
    fitting=FittingConfig(target_false_alarm=0.2, runs=39),
)


def line(number: int, **fields) -> NumberedLine:
    return NumberedLine(number, TrafficLine.model_validate(fields))


def shifting_log(before: int = 400, after: int = 200) -> list[NumberedLine]:
    """One line a second: tax questions, then weather questions from CHANGE_AT on."""
    rng = random.Random(0)
    lines = []
    for n in range(before + after):
        words = TAX if n < before else WEATHER
        prompt = " ".join(rng.choices(words, k=rng.randint(3, 12))) + "?"
        recorded = {
            "answer": " ".join(rng.choices(TAX, k=rng.randint(2, 9))),
            "mean_logprob": -rng.random(),
        }
        lines.append(line(n + 1, prompt=prompt, reference="ok", at=float(n), recorded=recorded))
    return lines


@pytest.fixture(scope="module")
def shift_run() -> dryrun.DriftRun:
    lines = shifting_log()
    return dryrun.run_checks(lines, dryrun.line_times(lines, None), embed, CONFIG)


def test_lines_are_timed_by_the_rate_or_by_their_own_times() -> None:
    lines = [line(1, prompt="a", at=3.0), line(2, prompt="b", at=1.5)]
    assert dryrun.line_times(lines, None) == [3.0, 1.5]
    assert dryrun.line_times(lines, 2.0) == [0.0, 0.5]
    with pytest.raises(ValueError, match=r"lines \[2\] have no `at` time"):
        dryrun.line_times([line(1, prompt="a", at=0.0), line(2, prompt="b")], None)


def test_a_line_is_read_as_the_monitor_reads_its_exchange() -> None:
    chat = line(
        4,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "..."},
            {"role": "user", "content": "last question"},
        ],
        recorded={"answer": "an answer", "mean_logprob": -0.5},
    )
    view = dryrun.exchange_view(chat, 12.0)
    assert view.prompt == "last question"  # the gateway's prompt text: the last user turn
    assert (view.response, view.mean_logprob, view.ok) == ("an answer", -0.5, True)
    failed = dryrun.exchange_view(line(5, prompt="q", recorded={"status": "error"}), 0.0)
    assert failed.response is None and not failed.ok
    generated = dryrun.exchange_view(line(6, prompt="q", reference="r"), 0.0)
    assert generated.ok and generated.response is None and generated.reference == "r"


def test_checks_come_on_the_file_s_clock_and_judge_once_the_reference_suffices(
    shift_run: dryrun.DriftRun,
) -> None:
    assert [c.at_s for c in shift_run.checks] == [25.0 * k for k in range(1, 24)]
    judged = [c.at_s for c in shift_run.checks if c.result.drifted is not None]
    # The reference is full at 200 s, and its exchanges are left out of the current window:
    # the first window of 100 (the default min_current) new exchanges is at 300 s.
    assert judged[0] == 300.0
    assert shift_run.checks[-1].labelled == 576  # lines with a reference up to 575 s


def test_the_full_reference_is_fitted_as_the_monitor_fits_it(shift_run: dryrun.DriftRun) -> None:
    assert shift_run.fit is not None and shift_run.fit_refused is None
    assert shift_run.fit.runs == 39 and shift_run.fit.thresholds
    assert shift_run.fit.dataset_false_alarms_fitted <= 0.2


def test_a_topic_shift_is_flagged_after_the_change_and_quiet_windows_are_counted(
    shift_run: dryrun.DriftRun,
) -> None:
    seen = dryrun.verdicts(shift_run, CHANGE_AT)
    judged = {c.at_s: c.result.drifted for c in shift_run.checks if c.result.drifted is not None}
    quiet = [at for at in judged if at < CHANGE_AT]
    assert quiet == [300.0, 325.0, 350.0, 375.0]  # every window wholly before the change
    assert (seen.quiet_checks, seen.false_alarms) == (4, sum(judged[at] for at in quiet))
    assert seen.first_flag_s is not None and CHANGE_AT <= seen.first_flag_s <= CHANGE_AT + 50
    assert all(judged[at] for at in judged if at >= CHANGE_AT + 50)  # a whole topic changed


def test_the_trigger_decides_a_retrain_after_the_change_and_not_before(
    shift_run: dryrun.DriftRun,
) -> None:
    config = TriggerConfig(
        consecutive_checks=2, min_new_labelled=0, enter_share=0.25, exit_share=0.125
    )
    retrains = dryrun.run_trigger(shift_run.checks, config).retrains_at_s
    assert len(retrains) == 1 and retrains[0] > CHANGE_AT  # the cooldown holds the storm to one
    never = TriggerConfig(
        consecutive_checks=50, min_new_labelled=0, enter_share=0.25, exit_share=0.125
    )
    assert dryrun.run_trigger(shift_run.checks, never).retrains_at_s == ()
    starved = TriggerConfig(
        consecutive_checks=2, min_new_labelled=10_000, enter_share=0.25, exit_share=0.125
    )
    assert dryrun.run_trigger(shift_run.checks, starved).retrains_at_s == ()


def test_the_trigger_grid_is_every_combination_or_the_configured_one() -> None:
    base = TriggerConfig(enter_share=0.25, exit_share=0.125, consecutive_checks=3)
    assert dryrun.trigger_grid(base, [], []) == [base]
    grid = dryrun.trigger_grid(base, [0.1, 0.5], [2, 4])
    assert [(c.enter_share, c.consecutive_checks) for c in grid] == [
        (0.1, 2), (0.1, 4), (0.5, 2), (0.5, 4)
    ]  # fmt: skip
    assert grid[0].exit_share == 0.1  # never above the enter share


def test_a_reference_no_larger_than_the_window_runs_unfitted_and_says_why() -> None:
    lines = shifting_log(before=150, after=0)
    config = dryrun.DryRunConfig(100, 100, 25.0, DriftConfig(), FittingConfig(0.2, 39))
    run = dryrun.run_checks(lines, dryrun.line_times(lines, None), embed, config)
    assert run.fit is None and "cannot be split" in (run.fit_refused or "")


def test_the_cli_dry_run_prints_the_checks_and_the_trigger_for_a_grid(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        "".join(json.dumps(n.line.model_dump(exclude_none=True)) + "\n" for n in shifting_log())
    )
    env = {
        "TUNEWATCH_STATE_DIR": str(tmp_path / "state"),
        "TUNEWATCH_MONITOR__REFERENCE_SIZE": "200",
        "TUNEWATCH_MONITOR__WINDOW_SIZE": "100",
        "TUNEWATCH_MONITOR__DRIFT_INTERVAL_S": "25",
        "TUNEWATCH_MONITOR__FITTING_RUNS": "39",
        "TUNEWATCH_MONITOR__TARGET_FALSE_ALARM": "0.2",
        "TUNEWATCH_RETRAIN__MIN_NEW_LABELLED": "0",
        "COLUMNS": "200",  # the tables' cells on one line each
    }
    args = ["replay", str(path), "--dry-run", "--change-at", "400", "--target", "0.2"]
    result = CliRunner().invoke(
        app, [*args, "--consecutive-checks", "2", "--consecutive-checks", "50"], env=env
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "dry run of 600 lines over 599 s: reference 200, window 100" in said
    assert "fitted at 0.2: 39 A/A splits" in said
    assert "drift checks" in said and "after the change" in said
    assert said.count("fitted at 0.2") >= 3  # the drift row and one trigger row per grid value
    assert not (tmp_path / "state").exists()  # offline: no store, no state
