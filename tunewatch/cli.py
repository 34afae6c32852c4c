"""The `tunewatch` command line."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from monitor.goldens import GoldenSetError
from registry.versions import RegistryError, register, versions
from rollout.machine import RolloutRefusal
from rollout.repository import UnknownRolloutError
from serving.engine import InvalidAdapterError
from serving.model import ModelNotFoundError
from serving.supervisor import ProcessStartError
from store import Store, schema
from store.adapters import RoutingTable
from store.schema import DatabaseUnavailableError, SchemaMismatchError
from tunewatch import stack
from tunewatch.settings import Settings, SettingsError, load_settings
from tunewatch.traffic import GatewayUnreachableError, TrafficFileError

# What a command could not do, as people read it: (the message's label, the exit code); 2: fix
# the command or the settings, 1: it cannot be done now. The one place domain errors are met.
FAILURES: dict[type[Exception], tuple[str, int]] = {
    SettingsError: ("error", 2),
    SchemaMismatchError: ("error", 2),
    DatabaseUnavailableError: ("error", 1),
    ModelNotFoundError: ("error", 2),
    InvalidAdapterError: ("error", 2),
    RegistryError: ("error", 2),
    UnknownRolloutError: ("error", 2),
    ProcessStartError: ("error", 1),
    GoldenSetError: ("error", 1),
    TrafficFileError: ("error", 2),
    GatewayUnreachableError: ("error", 1),
    RolloutRefusal: ("refused", 1),
}


class _Commands(TyperGroup):
    """Runs a command; a domain error it raises ends it with one line and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except tuple(FAILURES) as exc:
            label, code = next(v for kind, v in FAILURES.items() if isinstance(exc, kind))
            console.print(f"[red]{label}:[/red] {exc}")
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=_Commands,
    help="Serve, watch and keep improving a fine-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The model on disk.", no_args_is_help=True)
app.add_typer(model_app, name="model")
drift_app = typer.Typer(help="Drift detection.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")
adapters_app = typer.Typer(help="Adapter versions.")
app.add_typer(adapters_app, name="adapters")
rollout_app = typer.Typer(
    help="Rollouts of candidate adapters: shadow, canary steps, promotion.", no_args_is_help=True
)
app.add_typer(rollout_app, name="rollout")
db_app = typer.Typer(help="The database's schema: its revision, the upgrade.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="TUNEWATCH_CONFIG", help="YAML settings file.", show_default=False
    ),
]


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    stack.configure_logging(settings.log_level)
    return settings


def _prepare(settings: Settings) -> tuple[Path, Path]:
    with console.status("Preparing the model (first run converts the GGUF file, ~1 min)..."):
        return stack.prepare(settings)


@model_app.command("prepare")
def model_prepare(config: ConfigOption = None) -> None:
    """Convert the shipped SmolLM2 to a Hugging Face directory once; create its identity adapter."""
    settings = _settings(config)
    model_dir, identity = _prepare(settings)
    console.print(f"model:            {model_dir}")
    console.print(f"identity adapter: {identity}")


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Ctrl-C or SIGTERM cancels the work, so its `finally` blocks stop the child processes."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await main


def _run(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(_until_signalled(main))


def _engine_url(settings: Settings, given: str | None) -> str:
    url = given or settings.engine.url
    if not url:
        console.print("[red]error:[/red] give --engine-url or set engine.url in the settings")
        raise typer.Exit(2)
    if not url.startswith(("http://", "https://")):
        console.print(f"[red]error:[/red] --engine-url {url!r} is not an http(s) URL")
        raise typer.Exit(2)
    return url


EngineUrlOption = Annotated[
    str | None,
    typer.Option(help="URL of a running vLLM OpenAI server.", show_default=False),
]


@app.command()
def up(config: ConfigOption = None) -> None:
    """Start vLLM with the model and its adapters, the gateway in front, and the monitor."""
    settings = _settings(config)
    _prepare(settings)
    _run(stack.up(settings, config))


@app.command()
def serve(engine_url: EngineUrlOption = None, config: ConfigOption = None) -> None:
    """Start the gateway alone, in front of a vLLM server that is already running."""
    settings = _settings(config)
    url = _engine_url(settings, engine_url)
    _prepare(settings)
    _run(stack.serve(settings, url))


@app.command()
def monitor(engine_url: EngineUrlOption = None, config: ConfigOption = None) -> None:
    """Run the monitor sidecar: quality, calibration and drift of the traffic, on /metrics."""
    settings = _settings(config)
    url = _engine_url(settings, engine_url or f"http://127.0.0.1:{settings.engine.port}")
    _prepare(settings)
    from tunewatch import monitoring  # Evidently and friends: only for the commands using them

    _run(monitoring.monitor(settings, url))


@app.command()
def status(config: ConfigOption = None) -> None:
    """Show each adapter's traffic, quality, calibration and last drift verdict."""
    from tunewatch.status import status_table  # the monitor's scorers: not in the gateway's process

    settings = _settings(config)
    options = settings.monitor
    base = stack.prepared_identity_name(settings)
    table = status_table(
        Store(settings.store_url), base, options.window_size, options.correct_rouge_l
    )
    Console().print(table)


@adapters_app.callback(invoke_without_command=True)
def adapters(ctx: typer.Context, config: ConfigOption = None) -> None:
    """List every adapter version: status, parent, training job and metrics."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(config)
    table = Table(title="adapters")
    for column in ("name", "status", "loaded", "parent", "job", "created", "metrics"):
        table.add_column(column)
    for version in versions(Store(settings.store_url)):
        table.add_row(
            version.name,
            version.status,
            "yes" if version.loaded else "no",
            version.parent or "-",
            str(version.job_id or "-"),
            version.created_at.strftime("%Y-%m-%d %H:%M"),
            ", ".join(f"{k}={v:.3g}" for k, v in version.metrics.items()) or "-",
        )
    Console().print(table)


@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory.")],
    family: Annotated[str, typer.Option(help="Versions are named FAMILY-vN.")],
    config: ConfigOption = None,
) -> None:
    """Register an adapter trained elsewhere as a candidate (the rollout picks it up)."""
    settings = _settings(config)
    version = register(Store(settings.store_url), family, path, reason="added by hand")
    console.print(f"{version.name}: registered as a candidate ({version.path})")


def _rollout_request(config: Path | None, command: str, adapter: str | None = None) -> None:
    """One code path with the admin API: check, queue, and follow to the outcome."""
    from rollout import control

    store = Store(_settings(config).store_url)
    queued = control.request(store, command, adapter=adapter, by="cli")
    with console.status(f"{command}: waiting for the controller (tunewatch monitor)..."):
        outcome = control.wait(store, queued.id, timeout_s=60)
    if outcome.status == "pending":
        console.print(
            f"{command} is queued (command {outcome.id}); the controller carries it out on its "
            "next tick: is `tunewatch monitor` (or `tunewatch up`) running?"
        )
    elif outcome.status == "refused":
        console.print(f"[red]refused:[/red] {outcome.result}")
        raise typer.Exit(1)
    else:
        console.print(outcome.result)


@rollout_app.command("status")
def rollout_status(config: ConfigOption = None) -> None:
    """The rollout in progress (stage, weight, what it waits for, the guards) and past ones."""
    from rollout import control

    store = Store(_settings(config).store_url)
    table = Table(title="rollouts")
    for column in ("id", "candidate", "against", "stage", "weight", "started", "latest"):
        table.add_column(column, overflow="fold")
    for view in control.rollouts(store):
        table.add_row(
            str(view.id),
            view.candidate,
            view.baseline or "base",
            view.stage,
            f"{view.weight:.0%}",
            view.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            view.reason,
        )
    Console().print(table)
    active = control.active_rollout(store)
    guards = (active.look.get("guards") or {}) if active else {}
    for name, result in guards.items():
        console.print(f"  {name}: {result['verdict']}: {result['reason']}")


@rollout_app.command("start")
def rollout_start(
    adapter: Annotated[str, typer.Argument(help="The registered candidate.")],
    config: ConfigOption = None,
) -> None:
    """Start rolling a candidate out: shadow first, then the canary steps."""
    _rollout_request(config, "start", adapter)


@rollout_app.command("pause")
def rollout_pause(config: ConfigOption = None) -> None:
    """Hold the rollout where it is (routing unchanged) until resumed."""
    _rollout_request(config, "pause")


@rollout_app.command("resume")
def rollout_resume(config: ConfigOption = None) -> None:
    """Resume a paused rollout where it stood."""
    _rollout_request(config, "resume")


@rollout_app.command("promote")
def rollout_promote(config: ConfigOption = None) -> None:
    """Make the candidate the primary now."""
    _rollout_request(config, "promote")


@rollout_app.command("rollback")
def rollout_rollback(config: ConfigOption = None) -> None:
    """Send every request back to the primary now; the candidate is marked failed."""
    _rollout_request(config, "rollback")


@rollout_app.command("report")
def rollout_report(
    rollout_id: Annotated[int, typer.Argument(help="The rollout's id (tunewatch rollout status).")],
    html: Annotated[
        Path | None, typer.Option(help="Where to write the HTML report.", show_default=False)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """A rollout as a table here and as an HTML page with plots, every decision marked."""
    from rollout.report.build import build_report
    from rollout.report.html import render_html
    from rollout.report.table import render_table

    report = build_report(Store(_settings(config).store_url), rollout_id)
    Console().print(render_table(report))
    written = render_html(report, html or Path(f"rollout-{rollout_id}.html"))
    console.print(f"HTML report: {written}")


@app.command()
def retrain(
    from_feedback: Annotated[
        bool, typer.Option("--from-feedback", help="Train on the labelled exchanges (feedback).")
    ] = False,
    base: Annotated[
        bool, typer.Option("--base", help="Start from the base model, not the serving adapter.")
    ] = False,
    goldens: Annotated[
        bool | None,
        typer.Option(
            "--goldens/--no-goldens",
            help="Train on the golden set too.",
            show_default="retrain.use_goldens",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Train a LoRA adapter now, in the foreground, and register it as a candidate."""
    if not from_feedback:
        console.print("[red]error:[/red] say what to train on: --from-feedback")
        raise typer.Exit(2)
    settings = _settings(config)
    model_dir, _ = _prepare(settings)
    from retrain import jobs  # torch and transformers: only for the commands using them
    from tunewatch.retraining import retrain_config

    retraining = retrain_config(settings, model_dir)
    if goldens is not None:
        retraining = replace(retraining, use_goldens=goldens)
    if base:
        retraining = replace(retraining, start_from="base")
    store = Store(settings.store_url)
    active = jobs.active_job(store)
    if active is not None:
        console.print(
            f"[red]error:[/red] training job {active.id} is {active.status} ({active.reason}); "
            "one job runs at a time"
        )
        raise typer.Exit(1)
    parent = (store.routing_table() or RoutingTable()).primary
    job = jobs.run_in_foreground(store, retraining, "requested by hand (--from-feedback)", parent)
    if job.status != "succeeded":
        console.print(f"[red]training job {job.id} {job.status}:[/red] {job.error}")
        raise typer.Exit(1)
    [version] = [v for v in versions(store) if v.name == job.adapter]
    figures = ", ".join(f"{k}={v:.3g}" for k, v in version.metrics.items())
    console.print(f"job {job.id}: adapter [bold]{version.name}[/bold] registered as a candidate")
    console.print(f"  path:    {version.path}\n  parent:  {version.parent or 'base model'}")
    console.print(f"  metrics: {figures}")


@app.command()
def events(
    kind: Annotated[
        str | None, typer.Option(help="Only events whose kind starts with this, e.g. retrain.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 30,
    config: ConfigOption = None,
) -> None:
    """The audit trail: every automatic or manual decision, newest first, with its reason."""
    settings = _settings(config)
    table = Table(title="events")
    for column in ("time", "kind", "subject", "reason"):
        table.add_column(column, overflow="fold")
    for event in Store(settings.store_url).events(kind_prefix=kind, limit=limit):
        table.add_row(
            event.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            event.kind,
            event.subject or "-",
            event.reason,
        )
    Console().print(table)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Upgrade the database in place to this tunewatch's schema (back it up first)."""
    settings = _settings(config)
    before, after = schema.upgrade(settings.store_url, "tunewatch db upgrade")
    if before is None:
        console.print(f"made the database at revision {after}")
    elif before == after:
        console.print(f"the database is at revision {after} already")
    else:
        console.print(f"upgraded the database from revision {before} to {after}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """The database's schema revision, and this tunewatch's."""
    settings = _settings(config)
    found, newest = schema.current(settings.store_url), schema.head()
    if found.revision is None:
        console.print(f"the database is empty; tunewatch makes it at revision {newest}")
        return
    how = "" if found.stamped else " (made before migrations: told by its columns)"
    console.print(f"the database is at revision {found.revision}{how}; tunewatch's: {newest}")
    if found.revision != newest:
        console.print("run `tunewatch db upgrade` to upgrade it")


@drift_app.command("calibrate")
def drift_calibrate(
    adapter: Annotated[str, typer.Option(help="Whose reference window to split.")] = "base",
    target: Annotated[
        float, typer.Option(help="False-alarm rate per check wanted for each column.")
    ] = 0.01,
    runs: Annotated[int, typer.Option(help="A/A splits (at least 1/target - 1).")] = 200,
    config: ConfigOption = None,
) -> None:
    """Measure each drift column's false-alarm rate on A/A splits of the reference; propose
    thresholds for the target rate."""
    settings = _settings(config)
    from monitor.drift import calibrate
    from monitor.embeddings import PromptEmbedder
    from monitor.traffic import read_window
    from tunewatch import monitoring

    options = settings.monitor
    reference = read_window(
        Store(settings.store_url), adapter, options.reference_size, newest=False
    )
    if len(reference) < 2 * options.window_size:
        console.print(
            f"[red]error:[/red] adapter {adapter!r} has {len(reference)} exchanges; calibration "
            f"splits its reference into windows of {options.window_size} and needs at least "
            f"{2 * options.window_size}"
        )
        raise typer.Exit(2)
    drift = monitoring.drift_config(settings)
    embedder = PromptEmbedder(threads=options.embedding_threads)
    try:
        with console.status(f"{runs} A/A splits of {len(reference)} exchanges..."):
            result = calibrate(
                reference,
                embedder.embed_exchanges,
                drift,
                current_size=options.window_size,
                target_false_alarm=target,
                runs=runs,
            )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    table = Table(title=f"A/A false alarms of {adapter!r}, {result.runs} splits")
    for column in ("column", "method", "threshold", "false alarms", "proposed threshold"):
        table.add_column(column)
    for column in result.columns:
        table.add_row(
            str(column.column),
            column.method,
            f"{column.configured_threshold:.4g}",
            f"{column.false_alarm_rate:.1%}",
            f"{column.proposed_threshold:.4g}",
        )
    Console().print(table)
    console.print(
        f"dataset verdict false alarms: {result.dataset_false_alarm_rate:.1%} now, "
        f"{result.proposed_dataset_false_alarm_rate:.1%} with the proposed thresholds. "
        "To use them, put in the settings:"
    )
    proposed = {str(c.column): float(f"{c.proposed_threshold:.6g}") for c in result.columns}
    print(yaml.safe_dump({"monitor": {"drift_thresholds": proposed}}, sort_keys=False))


def _moment(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time (UTC unless it says otherwise) or an age: 30m, 12h, 7d."""
    if value is None:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO 8601 time nor an age like 30m, 12h or 7d",
            param_hint=option,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command()
def export(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The JSONL file; unset: standard output.", show_default=False
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this time (ISO 8601) or age (7d).", show_default=False)
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="To this time (ISO 8601) or age.", show_default=False)
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="Only what this adapter answered.", show_default=False)
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many, oldest first.", show_default=False)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write the users' recorded exchanges (with their references) as a traffic file for
    `tunewatch replay`."""
    from tunewatch.export import export_traffic, write_jsonl

    start, end = _moment(since, "--since"), _moment(until, "--until")
    store = Store(_settings(config).store_url)
    lines = export_traffic(store, since=start, until=end, adapter=adapter, limit=limit)
    if output is None:
        count = write_jsonl(lines, sys.stdout)
    else:
        with output.open("w", encoding="utf-8") as out:
            count = write_jsonl(lines, out)
    console.print(f"exported {count} exchanges" + (f" to {output}" if output else ""))


@app.command()
def replay(
    traffic: Annotated[Path, typer.Argument(help="JSONL: a prompt or messages a line.")],
    gateway_url: Annotated[
        str | None,
        typer.Option(help="The gateway's OpenAI base URL.", show_default="the settings' gateway"),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="OPENAI_API_KEY",
            help="Bearer key for /v1.",
            show_default="the first of gateway.api_keys",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The model asked for.", show_default="the served model")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = 4,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Requests a second; unset: the lines' `at`, or at once."),
    ] = None,
    speed: Annotated[
        float, typer.Option(min=0.001, help="Play the lines' `at` times this much faster.")
    ] = 1.0,
    feedback_share: Annotated[
        float, typer.Option(min=0, max=1, help="Share of answers whose reference is posted.")
    ] = 0.0,
    feedback_delay: Annotated[
        float, typer.Option(min=0, help="Seconds between an answer and its feedback.")
    ] = 0.0,
    time_limit: Annotated[
        float | None, typer.Option(min=0.001, help="Stop after this many seconds.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="For lines that give no max_tokens.")] = 64,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Send nothing: run the drift checks and the retrain trigger over the file, "
            "on its own clock.",
        ),
    ] = False,
    change_at: Annotated[
        float | None,
        typer.Option(min=0, help="--dry-run: the known change point, in the file's seconds."),
    ] = None,
    target: Annotated[
        list[float] | None,
        typer.Option(help="--dry-run: fit thresholds for this false-alarm rate (repeat: a grid)."),
    ] = None,
    enter_share: Annotated[
        list[float] | None,
        typer.Option(help="--dry-run: the trigger's enter share (repeat: a grid)."),
    ] = None,
    consecutive_checks: Annotated[
        list[int] | None,
        typer.Option(help="--dry-run: the trigger's consecutive checks (repeat: a grid)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Send a traffic file to a running gateway with the official OpenAI client, watching
    what comes back; post references as feedback for a share of the answers. With
    --dry-run, judge it offline instead: when drift would have been flagged and a retrain
    decided."""
    import httpx
    import openai
    from rich.live import Live

    from tunewatch.replay import Replayer, ReplayOptions
    from tunewatch.replay_view import ReplayView
    from tunewatch.traffic import read_traffic

    settings = _settings(config)
    lines, bad = read_traffic(traffic)
    for line in bad:
        console.print(f"[yellow]skipped[/yellow] {line.where}: {line.problem}")
    if not lines:
        console.print(f"[red]error:[/red] {traffic} has no line to send")
        raise typer.Exit(2)
    if dry_run:
        grid = DryRunGrid(target or [], enter_share or [], consecutive_checks or [])
        _dry_run(settings, lines, rate, feedback_share, change_at, grid)
        return
    gateway = settings.gateway
    url = (gateway_url or f"http://{gateway.host}:{gateway.port}/v1").rstrip("/") + "/"
    if not url.startswith(("http://", "https://")):
        console.print(f"[red]error:[/red] --gateway-url {gateway_url!r} is not an http(s) URL")
        raise typer.Exit(2)
    key = api_key or next((k.get_secret_value() for k in gateway.api_keys), "unused")
    options = ReplayOptions(
        model=model or settings.engine.served_model_name,
        concurrency=concurrency,
        rate=rate,
        speed=speed,
        feedback_share=feedback_share,
        feedback_delay_s=feedback_delay,
        time_limit_s=time_limit,
        max_tokens=max_tokens,
    )
    view = ReplayView(total=len(lines))

    async def send() -> None:
        auth = {"authorization": f"Bearer {key}"}
        async with (
            openai.AsyncOpenAI(base_url=url, api_key=key) as client,
            httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as feedback,
        ):
            summary = await Replayer(client, feedback, options, view.add).run(lines)
        console.print(
            f"sent {summary.sent} of {len(lines)}: {summary.answered} answered, "
            f"{summary.failed} failed; feedback posted for {summary.feedback_posted}"
            + (f" ({summary.feedback_failed} refused)" if summary.feedback_failed else "")
            + (" (stopped at the time limit)" if summary.stopped_by_time_limit else "")
        )

    with Live(view, console=console, refresh_per_second=4):
        asyncio.run(send())


@dataclass(frozen=True)
class DryRunGrid:
    """The values to try, each list empty for the configured one."""

    targets: list[float]
    enter_shares: list[float]
    consecutive: list[int]


def _dry_run(
    settings: Settings,
    lines: list[Any],
    rate: float | None,
    feedback_share: float,
    change_at: float | None,
    grid: DryRunGrid,
) -> None:
    """The drift checks and the trigger over the file, for each value of the grid."""
    from monitor.embeddings import PromptEmbedder
    from monitor.thresholds import FittingConfig
    from tunewatch import dryrun, monitoring
    from tunewatch.retraining import trigger_config

    options = settings.monitor
    try:
        times = dryrun.line_times(lines, rate)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    drift = monitoring.drift_config(settings)
    fittings = [monitoring.fitting_config(settings, drift)]
    if grid.targets:
        fitting = fittings[0] or FittingConfig(runs=options.fitting_runs)
        fittings = []
        for wanted in grid.targets:
            runs = max(fitting.runs, math.ceil(len(drift.tests) / wanted) - 1)
            fittings.append(replace(fitting, target_false_alarm=wanted, runs=runs))
    triggers = dryrun.trigger_grid(trigger_config(settings), grid.enter_shares, grid.consecutive)
    console.print(
        f"dry run of {len(lines)} lines over {max(times):.0f} s: reference "
        f"{options.reference_size}, window {options.window_size}, a check every "
        f"{options.drift_interval_s:g} s"
        + (f", change point at {change_at:g} s" if change_at is not None else "")
    )
    embedder = PromptEmbedder(threads=options.embedding_threads)
    drift_table = Table(title="drift checks")
    for column in ("thresholds", "checks", "drifted", "quiet checks alarmed", "first flag"):
        drift_table.add_column(column)
    trigger_table = Table(title="retrain trigger (no rollout, no job pending)")
    for column in ("thresholds", "enter share", "consecutive", "retrains at", "first retrain"):
        trigger_table.add_column(column)
    for fitting in fittings:
        name = "configured" if fitting is None else f"fitted at {fitting.target_false_alarm:g}"
        config = dryrun.DryRunConfig(
            window_size=options.window_size,
            reference_size=options.reference_size,
            interval_s=options.drift_interval_s,
            drift=drift,
            fitting=fitting,
            feedback_share=feedback_share if feedback_share > 0 else 1.0,
        )
        with console.status(f"drift checks, thresholds {name}..."):
            run = dryrun.run_checks(lines, times, embedder.embed_exchanges, config)
        if run.fit is not None:
            console.print(
                f"{name}: {run.fit.runs} A/A splits; dataset false alarms on them "
                f"{run.fit.dataset_false_alarms:.1%} at the configured thresholds, "
                f"{run.fit.dataset_false_alarms_fitted:.1%} at the fitted ones"
            )
        elif run.fit_refused is not None:
            name = "configured (not fittable)"
            console.print(f"[yellow]not fitted:[/yellow] {run.fit_refused}")
        seen = dryrun.verdicts(run, change_at)
        quiet = "-" if seen.quiet_checks is None else f"{seen.false_alarms} of {seen.quiet_checks}"
        drift_table.add_row(
            name, str(seen.checks), str(seen.drifted), quiet, _when(seen.first_flag_s, change_at)
        )
        for trigger in triggers:
            retrains = dryrun.run_trigger(run.checks, trigger).retrains_at_s
            after = [t for t in retrains if change_at is None or t >= change_at]
            trigger_table.add_row(
                name,
                f"{trigger.enter_share:g}",
                str(trigger.consecutive_checks),
                ", ".join(f"{t:.0f} s" for t in retrains) or "none",
                _when(after[0] if after else None, change_at),
            )
    Console().print(drift_table)
    Console().print(trigger_table)


def _when(moment: float | None, change_at: float | None) -> str:
    if moment is None:
        return "never"
    if change_at is None:
        return f"{moment:.0f} s"
    return f"{moment:.0f} s ({moment - change_at:+.0f} s after the change)"


@app.command()
def demo(
    state_dir: Annotated[
        Path, typer.Option(help="Where the stack keeps its state (left for inspection).")
    ] = Path("tunewatch-demo"),
    rate: Annotated[float, typer.Option(min=0.01, help="Requests a second.")] = 1.0,
    time_limit: Annotated[float, typer.Option(min=60, help="Seconds, at most.")] = 2700.0,
) -> None:
    """The whole loop on this machine: task-A traffic, a switch to task B, and the daemon's
    own drift alarm, retrain, shadow, canary and promotion (or rollback), shown live; a
    report (HTML, JSON) at the end."""
    from tunewatch.demo.run import DemoPlan, run_demo, write

    stack.configure_logging("WARNING")
    plan = DemoPlan(rate=rate, time_limit_s=time_limit)
    result = asyncio.run(run_demo(state_dir.resolve(), plan, console))
    json_path, html_path = write(result, state_dir)
    after = f", {result.after.exact_match:.0%} after" if result.after else ""
    console.print(
        f"outcome: [bold]{result.outcome}[/bold]; held-out task B exact match "
        f"{result.before.exact_match:.0%} before{after}"
    )
    console.print(f"report: {html_path} and {json_path}; the stack's state: {state_dir}")
