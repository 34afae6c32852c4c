"""Child processes that must stay up: the vLLM engine and the monitor sidecar under `tunewatch up`.

Each runs in its own session, so its workers die with it and not with our terminal, and
a crash in it never takes the gateway down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from serving import metrics

log = logging.getLogger(__name__)


class ProcessStartError(RuntimeError):
    """The child exited, or did not become healthy in time, during start-up."""


class SupervisedProcess:
    """A child process in its own session: started, awaited until healthy, restarted with
    backoff whenever it dies, stopped with its whole process group."""

    def __init__(
        self,
        name: str,
        command: list[str],
        environment: dict[str, str],
        log_file: Path,
        healthy: Callable[[], Awaitable[bool]],
        on_restart: Callable[[str], Awaitable[None]] | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.name, self.command, self.environment = name, command, environment
        self.log_file, self.healthy, self.on_restart = log_file, healthy, on_restart
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self.started_at = 0.0  # time.time() of the latest spawn: what it wrote since is its own

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        with self.log_file.open("ab") as sink:
            self._process = subprocess.Popen(
                self.command,
                env=self.environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info(
            "child process started",
            extra={"child": self.name, "pid": self._process.pid, "log": str(self.log_file)},
        )

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ProcessStartError(
                    f"{self.name} exited with code {self._process.returncode} during start-up; "
                    f"see {self.log_file}"
                )
            if await self.healthy():
                metrics.PROCESS_UP.labels(self.name).set(1)
                return
            await asyncio.sleep(1.0)
        raise ProcessStartError(
            f"{self.name} not healthy after {self.startup_timeout_s:.0f} s; see {self.log_file}"
        )

    async def start(self) -> None:
        self._stopping = False
        self.spawn()
        await self.wait_healthy()

    async def supervise(self, max_backoff_s: float = 60.0) -> None:
        """Restart the process whenever it dies, waiting 1, 2, 4 ... s between failed tries."""
        backoff = 1.0
        while not self._stopping:
            assert self._process is not None
            code = await asyncio.to_thread(self._process.wait)
            if self._stopping:
                return
            metrics.PROCESS_UP.labels(self.name).set(0)
            metrics.PROCESS_RESTARTS.labels(self.name).inc()
            reason = f"{self.name} exited with code {code}; restarting in {backoff:.0f} s"
            log.warning(reason, extra={"child": self.name})
            await asyncio.sleep(backoff)
            try:
                await self.start()
            except ProcessStartError as exc:
                log.error("restart failed: %s", exc, extra={"child": self.name})
                backoff = min(backoff * 2, max_backoff_s)
                continue
            backoff = 1.0
            if self.on_restart is not None:
                await self.on_restart(reason)

    async def stop(self, grace_s: float = 20.0) -> None:
        self._stopping = True
        metrics.PROCESS_UP.labels(self.name).set(0)
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
