"""Pieces every benchmark shares: the machine line, peak RSS, the split, the step timer and
running one variant in a fresh subprocess."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident set size (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{dev}"


def split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """80 / 10 / 10 random split of ``n`` rows."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.8 * n), int(0.9 * n)
    return perm[:a], perm[a:b], perm[b:]


def epoch_timer() -> Any:
    """A Lightning callback timing one training epoch from its first step to its end.

    ``elapsed`` excludes the first step's start-up; :func:`epoch_seconds` scales it to the
    whole epoch.
    """
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.elapsed = time.perf_counter() - self.t0
            self.steps = trainer.num_training_batches

    return EpochTimer()


def epoch_seconds(elapsed: float, steps: int) -> tuple[float, float]:
    """``(seconds for the whole epoch, ms per step)`` from the time of steps 2..N."""
    return elapsed * steps / max(steps - 1, 1), 1000 * elapsed / max(steps - 1, 1)


def run_child(module: str, *args: Any) -> dict[str, Any] | None:
    """Run ``python -m module --_child args...`` in a fresh process; its ``RESULT {...}`` line."""
    cmd = [sys.executable, "-m", module, "--_child", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{module} {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def child_result(result: dict[str, Any]) -> None:
    """Print a variant's result for :func:`run_child` to read."""
    print("RESULT " + json.dumps(result), flush=True)


def write_json(path: str | None, results: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)
