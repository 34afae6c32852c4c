"""The one settings model: defaults, then a YAML file, then TUNEWATCH_* environment variables.

Nested fields take a double underscore in the environment:
TUNEWATCH_GATEWAY__PORT=9000 sets gateway.port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """The configuration is invalid; the message names every bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The values vLLM 0.32 takes for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineSettings(_Section):
    model: str | None = Field(
        default=None, description="A Hugging Face model directory; unset: the shipped SmolLM2."
    )
    served_model_name: str = "smollm2-135m-instruct"
    url: str | None = Field(
        default=None, description="A running vLLM server (tunewatch serve); unset: start one."
    )
    port: int = Field(default=8100, ge=1, le=65535)
    device: Literal["cpu", "cuda"] = "cpu"
    max_loras: int = Field(default=4, ge=1)
    serve_base_directly: bool = Field(
        default=True,
        description="Base-model traffic to vLLM's base model where the engine confirms "
        "tunewatch's LoRA fix (serving/vllm_plugin.py), except while a rollout compares a "
        "candidate with it; off: always through the identity adapter.",
    )
    max_lora_rank: int | None = Field(
        default=None,
        description="vLLM's --max-lora-rank; unset: the smallest it takes that holds the "
        "adapters loaded at start and those the trainer makes (docs/design.md, the engine).",
    )
    max_model_len: int = Field(default=2048, ge=64)
    cpu_kv_cache_gib: int = Field(default=2, ge=1)
    cpu_threads: str = "auto"
    extra_args: list[str] = Field(default_factory=list)
    request_timeout_s: float = Field(default=300.0, gt=0)
    startup_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank_vllm_takes(cls, rank: int | None) -> int | None:
        if rank is not None and rank not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM takes one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        return rank


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    admin_token: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="Bearer token of /admin; unset: generated into the state dir.",
    )
    api_keys: list[Annotated[SecretStr, Field(min_length=1)]] = Field(
        default_factory=list, description="If set, /v1 needs one of these as a bearer token."
    )
    feedback_keys: list[Annotated[SecretStr, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Bearer tokens that may post /v1/feedback for any exchange (an API key "
        "may for the exchanges it made); with neither these nor api_keys, feedback is open.",
    )
    feedback_reference_max_chars: int = Field(default=8192, ge=1)
    feedback_max_per_exchange: int = Field(
        default=5, ge=1, description="Feedback rows one exchange may have; more are a 409."
    )
    feedback_per_minute: int = Field(
        default=600, ge=1, description="Feedback posts per key and gateway; more are a 429."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    adapter_roots: list[Path] | None = Field(
        default=None,
        description="Directories the admin API may load adapters from (absolute); unset: the "
        "state dir's adapters and training folders, and the cache dir.",
    )
    max_n: int = Field(default=4, ge=1, description="Choices (n) one request may ask for.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="max_tokens one request may ask for; unset: engine.max_model_len under "
        "`up` (what the engine it starts can hold), 4096 under `serve`.",
    )
    max_messages: int = Field(default=256, ge=1, description="Messages in one chat request.")
    max_concurrency: int = Field(
        default=256,
        ge=1,
        description="Requests in flight (streams until they end); more are a fast 503. 256 is "
        "twice vLLM-CPU's default max_num_seqs; on a GPU, twice the engine's --max-num-seqs.",
    )
    shadow_max_concurrency: int | None = Field(
        default=None, ge=1, description="Shadow replays in flight; unset: max_concurrency / 4."
    )
    engine_deadline_s: float = Field(
        default=600.0, gt=0, description="The longest one engine call takes, streams whole; 504."
    )
    reconcile_interval_s: float = Field(default=5.0, gt=0)
    shutdown_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="The longest a shutdown takes: 3/4 for answers in flight, then the records.",
    )
    recorder_queue_max: int = Field(
        default=10_000, ge=1, description="Exchanges waiting for the store; more are spilled."
    )
    spill_dir: Path | None = Field(
        default=None,
        description="Exchanges the store cannot take now wait here; unset: <state dir>/spill.",
    )

    @field_validator("adapter_roots")
    @classmethod
    def _absolute(cls, roots: list[Path] | None) -> list[Path] | None:
        # A relative root would mean wherever the gateway happens to be started.
        for root in roots or []:
            if not root.is_absolute():
                raise ValueError(f"{str(root)!r} is not an absolute path")
        return roots


class MonitorSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=1, le=65535, description="The sidecar's /metrics.")
    window_size: int = Field(default=200, ge=10, description="Exchanges per current window.")
    quality_interval_s: float = Field(default=30.0, gt=0)
    golden_interval_s: float = Field(default=600.0, gt=0)
    golden_set: Path | None = Field(
        default=None, description="JSONL of {prompt, reference}; unset: the shipped demo set."
    )
    golden_enabled: bool = True
    correct_rouge_l: float = Field(default=0.5, ge=0, le=1)
    drift_interval_s: float = Field(default=60.0, gt=0)
    reference_size: int = Field(
        default=1000, ge=10, description="An adapter's first N exchanges: its drift reference."
    )
    drift_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per drift column: pinned, not fitted (`tunewatch drift calibrate`).",
    )
    fit_thresholds: bool = Field(
        default=True,
        description="Fit the drift thresholds on each adapter's full reference (A/A splits).",
    )
    target_false_alarm: float = Field(
        default=0.01, gt=0, lt=1, description="Of the dataset drift verdict, per check."
    )
    fitting_runs: int = Field(
        default=799, ge=1, description="A/A splits; at least columns / target - 1."
    )
    embedding_threads: int = Field(default=1, ge=1)
    lease_ttl_s: float = Field(
        default=30.0, ge=3, description="The scheduler lease: one daemon per database acts."
    )


class RetrainSettings(_Section):
    """The trigger (retrain/policy.py) and the training jobs (retrain/jobs.py)."""

    enabled: bool = Field(default=True, description="Run the trigger and the training jobs.")
    trigger_interval_s: float = Field(default=30.0, gt=0)
    training_interval_s: float = Field(default=5.0, gt=0, description="Start or follow a job.")
    consecutive_checks: int = Field(default=3, ge=1, description="Drift checks that must agree.")
    min_new_labelled: int = Field(default=200, ge=0)
    cooldown_s: float = Field(default=6 * 3600.0, ge=0)
    daily_budget: int = Field(default=2, ge=0)
    # A topic shift moves about 2 of the 8 drift columns (prompt text and embedding).
    enter_share: float = Field(default=0.25, ge=0, le=1)
    exit_share: float = Field(default=0.125, ge=0, le=1)
    quality_drop: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Also retrain when quality falls this far (relative) below its baseline.",
    )
    quality_metric: Literal["chrf", "exact_match", "rouge_l"] = "chrf"
    family: str | None = Field(
        default=None,
        description="Name of adapters trained from the base model; unset: <served name>-ft.",
    )
    start_from: Literal["serving", "base"] = "serving"
    use_goldens: bool = Field(
        default=False, description="Train on the golden set too (it stops being a fair exam)."
    )
    max_examples: int = Field(default=5000, ge=1)
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    start_delay_s: float = Field(default=0.0, ge=0)
    threads: int = Field(default=1, ge=1, description="Torch threads of the trainer child.")
    hpo_trials: int = Field(
        default=0, ge=0, description="Optuna trials judged at 20% of the budget; 0: no search."
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="retrain.training.spec.TrainingConfig fields: rank, epochs...",
    )
    launcher: list[str] = Field(
        default_factory=list, description="e.g. [torchrun, --nproc_per_node, '2']; unset: python"
    )


class RolloutSettings(_Section):
    """Shadow, canary steps and guards (rollout/machine.py, rollout/guards.py)."""

    enabled: bool = Field(default=True, description="Run the rollout job.")
    auto_start: bool = Field(default=True, description="Roll out every new candidate.")
    interval_s: float = Field(default=5.0, gt=0, description="One look per interval.")
    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0])
    shadow_fraction: float = Field(default=0.5, gt=0, le=1)
    shadow_min_pairs: int = Field(default=20, ge=1)
    step_min_samples: int = Field(default=10, ge=1, description="Canary answers per step.")
    stage_min_s: float = Field(default=30.0, ge=0)
    stage_deadline_s: float = Field(default=900.0, gt=0, description="Then pause for a person.")
    step_target_s: float | None = Field(
        default=120.0,
        gt=0,
        description="Skip canary steps too small to gather step_min_samples in this time at "
        "the live traffic seen; unset: take every step.",
    )
    require_pass: bool = False
    metric: Literal["exact_match", "chrf", "rouge_l"] = "chrf"
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Over the whole rollout.")
    quality_margin: float = Field(default=0.02, ge=0)
    latency_max_ratio: float = Field(default=1.2, ge=1)
    error_margin: float = Field(default=0.01, ge=0)
    min_samples: int = Field(default=30, ge=1, description="Per side, before any verdict.")
    planned_samples: float = Field(default=200.0, gt=0)
    guards: list[Literal["quality", "latency", "errors"]] = Field(
        default_factory=lambda: ["quality", "latency", "errors"]
    )
    drain_s: float = Field(default=15.0, ge=0, description="Before vLLM unloads an adapter.")


class StoreSettings(_Section):
    """Retention (controller/retention.py): both limits unset keep every exchange."""

    retention_days: float | None = Field(
        default=None, gt=0, description="Delete exchanges older than this; unset: no age limit."
    )
    retention_max_exchanges: int | None = Field(
        default=None, ge=1, description="Keep the newest this many exchanges; unset: no cap."
    )
    retention_interval_s: float = Field(default=3600.0, gt=0, description="One prune per interval.")
    retention_batch: int = Field(default=1000, ge=1, description="Exchanges per transaction.")


class PrometheusSettings(_Section):
    """The Prometheus `tunewatch up` runs beside the stack, with the shipped alert rules."""

    enabled: bool = Field(
        default=True, description="Run it where the binary is installed (Debian: prometheus)."
    )
    binary: str = "prometheus"
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=1, le=65535)
    scrape_interval_s: float = Field(default=5.0, gt=0, description="Also the rules' evaluation.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEWATCH_", env_nested_delimiter="__", extra="forbid"
    )

    cache_dir: Path = Path(platformdirs.user_cache_dir("tunewatch"))
    state_dir: Path = Path(platformdirs.user_data_dir("tunewatch"))
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset: a SQLite file in the state dir."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values; the environment overrides it.
        return env_settings, init_settings

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'tunewatch.db'}"

    @property
    def spill_file(self) -> Path:
        return (self.gateway.spill_dir or self.state_dir / "spill") / "exchanges.jsonl"


def _secret_fields() -> set[str]:
    """The names of SecretStr fields (alone, optional or in a list), in every section."""
    sections = [f.annotation for f in Settings.model_fields.values()]
    models = [Settings, *(m for m in sections if isinstance(m, type) and issubclass(m, BaseModel))]
    return {
        name
        for model in models
        for name, info in model.model_fields.items()
        if "SecretStr" in str(info.annotation)
    }


def _describe(error: ValidationError) -> str:
    lines, secrets = [], _secret_fields()
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "settings"
        # A mistyped secret (a numeric token, say) must not be echoed to the terminal or the logs.
        hidden = item["type"] == "missing" or bool(secrets.intersection(map(str, item["loc"])))
        given = "" if hidden else f" (got {item.get('input')!r})"
        lines.append(f"  {where}: {item['msg']}{given}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(config_file: Path | None = None) -> Settings:
    """Read the YAML file (if any) and the environment; raise SettingsError naming bad values."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = yaml.safe_load(config_file.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"config file {config_file} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise SettingsError(f"config file {config_file} must hold a mapping at the top")
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
