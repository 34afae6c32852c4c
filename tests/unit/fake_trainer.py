"""A stand-in for `python -m retrain.trainer --job ID`, for the job runner's tests.

Launched as `python fake_trainer.py -m retrain.trainer --job ID` (the runner's launcher is
`python fake_trainer.py`), it reads the job's spec from the store as the real trainer does,
without importing torch (seconds per child), and behaves as FAKE_TRAINER says: `succeed`
writes a PEFT-shaped adapter and a result, `fail` a failure result with a reason, `crash`
exits 3 with no result, `slow` sleeps a second (or $FAKE_TRAINER_SLEEP_S) before succeeding.
"""

import json
import os
import sys
import time
from pathlib import Path

from store import Store
from store.jobs import TrainingJob


def write_result(output_dir: Path, result: dict) -> None:
    """Where and how retrain.trainer writes it: beside the adapter directory."""
    (output_dir.parent / f"{output_dir.name}.result.json").write_text(json.dumps(result))


def main() -> int:
    job_id = int(sys.argv[sys.argv.index("--job") + 1])
    with Store(os.environ["TUNEWATCH_DATABASE_URL"]).session() as session:
        spec = session.get(TrainingJob, job_id).spec
    out = Path(spec["output_dir"])
    print("fake trainer: spec read", flush=True)  # from here on it needs no database
    mode = os.environ.get("FAKE_TRAINER", "succeed")
    if mode == "crash":
        return 3
    if mode == "slow":
        time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP_S", "1")))
    if mode == "fail":
        write_result(out, {"status": "failed", "reason": "loss is nan"})
        return 1
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (out / "adapter_model.safetensors").write_bytes(f"weights of job {job_id}".encode())
    evaluation = {"n": 2, "exact_match": 0.5, "chrf": 60.0, "rouge_l": 0.5}
    write_result(
        out,
        {
            "status": "succeeded", "adapter_dir": str(out), "config": spec["config"],
            "train_examples": 8, "steps": 4, "train_seconds": 1.0, "best_val_loss": 0.7,
            "before": {"model": "base", **evaluation, "exact_match": 0.0},
            "after": {"model": "candidate", **evaluation},
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
