"""The Prometheus `tunewatch up` runs beside the stack: the shipped rules, the stack's ports.

Its scrape jobs are the ones deploy/prometheus/prometheus.yml ships (same names, so the
alert rules' `job` matchers hold), pointed at this machine's ports instead of the compose
services; a test keeps the two in step.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from tunewatch.settings import Settings

RULES_DIR = Path(str(files("dashboards") / "alerts"))


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.rules.yml"))


def scrape_targets(settings: Settings) -> dict[str, str]:
    """Each scrape job and the address it scrapes on this machine."""
    return {
        "tunewatch-gateway": f"{settings.gateway.host}:{settings.gateway.port}",
        "tunewatch-monitor": f"{settings.monitor.host}:{settings.monitor.port}",
        "vllm": f"127.0.0.1:{settings.engine.port}",
    }


def config(settings: Settings) -> dict[str, Any]:
    interval = f"{settings.prometheus.scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files()],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in scrape_targets(settings).items()
        ],
    }


def command(settings: Settings) -> list[str] | None:
    """The command line that runs it, with its config written into the state dir; None when
    it is turned off or not installed."""
    options = settings.prometheus
    binary = shutil.which(options.binary) if options.enabled else None
    if binary is None:
        return None
    root = settings.state_dir / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config(settings), sort_keys=False))
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address={options.host}:{options.port}",
    ]
