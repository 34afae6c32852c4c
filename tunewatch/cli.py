"""The `tunewatch` command line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from serving.model import ModelNotFoundError
from tunewatch import stack
from tunewatch.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="Serve, watch and keep improving a fine-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The model on disk.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="TUNEWATCH_CONFIG", help="YAML settings file.", show_default=False
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    stack.configure_logging(settings.log_level)
    return settings


def _prepare(settings: Settings) -> tuple[Path, Path]:
    try:
        with console.status("Preparing the model (first run converts the GGUF file, ~1 min)..."):
            return stack.prepare(settings)
    except ModelNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@model_app.command("prepare")
def model_prepare(config: ConfigOption = None) -> None:
    """Convert the shipped SmolLM2 to a Hugging Face directory once; create its identity adapter."""
    settings = _settings(config)
    model_dir, identity = _prepare(settings)
    console.print(f"model:            {model_dir}")
    console.print(f"identity adapter: {identity}")


@app.command()
def up(config: ConfigOption = None) -> None:
    """Start vLLM with the model and its adapters, and the gateway in front of it."""
    settings = _settings(config)
    _prepare(settings)
    asyncio.run(stack.up(settings))


@app.command()
def serve(
    engine_url: Annotated[
        str | None,
        typer.Option(help="URL of a running vLLM OpenAI server.", show_default=False),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Start the gateway alone, in front of a vLLM server that is already running."""
    settings = _settings(config)
    url = engine_url or settings.engine.url
    if not url:
        console.print("[red]error:[/red] give --engine-url or set engine.url in the settings")
        raise typer.Exit(2)
    if not url.startswith(("http://", "https://")):
        console.print(f"[red]error:[/red] --engine-url {url!r} is not an http(s) URL")
        raise typer.Exit(2)
    _prepare(settings)
    asyncio.run(stack.serve(settings, url))
