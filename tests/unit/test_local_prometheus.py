"""The Prometheus `tunewatch up` runs: the shipped rules and deploy's scrape jobs, on this
machine's ports."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunewatch import prometheus
from tunewatch.settings import Settings

DEPLOYED = Path(__file__).parents[2] / "deploy" / "prometheus" / "prometheus.yml"


def settings(tmp_path: Path, **prometheus_options: object) -> Settings:
    return Settings(state_dir=tmp_path, prometheus=prometheus_options)


def test_it_scrapes_the_jobs_deploy_ships_under_the_same_names(tmp_path: Path) -> None:
    local = prometheus.config(settings(tmp_path))
    deployed = yaml.safe_load(DEPLOYED.read_text())
    jobs = {job["job_name"]: job.get("metrics_path", "/metrics") for job in local["scrape_configs"]}
    assert jobs == {
        job["job_name"]: job.get("metrics_path", "/metrics") for job in deployed["scrape_configs"]
    }


def test_it_loads_every_shipped_rule_file(tmp_path: Path) -> None:
    loaded = prometheus.config(settings(tmp_path))["rule_files"]
    names = {Path(path).name for path in loaded}
    assert {"tunewatch.rules.yml", "recording.rules.yml"} <= names
    assert all(Path(path).is_file() for path in loaded)


def test_its_targets_are_the_stacks_own_ports(tmp_path: Path) -> None:
    options = Settings(state_dir=tmp_path, gateway={"port": 9100}, engine={"port": 9200})
    targets = prometheus.scrape_targets(options)
    assert (targets["tunewatch-gateway"], targets["vllm"]) == ("127.0.0.1:9100", "127.0.0.1:9200")


def test_turned_off_or_not_installed_it_is_not_run(tmp_path: Path) -> None:
    assert prometheus.command(settings(tmp_path, enabled=False)) is None
    assert prometheus.command(settings(tmp_path, binary="no-such-prometheus")) is None
