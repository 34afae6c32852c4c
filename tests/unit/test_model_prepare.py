"""Two processes preparing the model at once (`tunewatch model prepare` while `tunewatch up`
starts): one converts, the other waits and finds it converted. The conversion is a slow fake
that fails if a second one runs meanwhile; the processes are real (spawned, as they would be
separate commands)."""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

from serving import model

FAKE_CONVERSION_S = 2.0


def _slow_conversion(gguf_file: Path, staging: Path) -> str:
    """The conversion, but slow and counted: `running` held while it runs (exclusively: a
    second conversion at once fails), a line in `runs` when it is done."""
    witness = staging.parent
    witness.mkdir(parents=True, exist_ok=True)
    running = os.open(witness / "running", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if held
    try:
        staging.mkdir()
        time.sleep(FAKE_CONVERSION_S)
        (staging / "config.json").write_text("{}")
        with (witness / "runs").open("a") as runs:
            runs.write(f"{os.getpid()}\n")
    finally:
        os.close(running)
        os.unlink(witness / "running")
    return gguf_file.name


def _prepare(cache_dir: Path, together: Barrier, prepared: multiprocessing.Queue) -> None:
    """One process's `prepare_model`, with the slow conversion in place of the real one,
    started when the other process is ready too."""
    model.shipped_gguf = lambda: Path("/nowhere/smollm2.gguf")
    model._convert_gguf = _slow_conversion
    together.wait(60)
    prepared.put(str(model.prepare_model(cache_dir)))


def test_two_processes_preparing_at_once_convert_once_and_get_the_same_directory(
    tmp_path: Path,
) -> None:
    spawn = multiprocessing.get_context("spawn")
    together, prepared = spawn.Barrier(2), spawn.Queue()
    processes = [
        spawn.Process(target=_prepare, args=(tmp_path, together, prepared)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    directories = {prepared.get(timeout=5) for _ in processes}
    assert directories == {str(model.model_dir_of(tmp_path))}
    assert model.is_prepared(model.model_dir_of(tmp_path))
    assert len((tmp_path / "models" / "runs").read_text().splitlines()) == 1
