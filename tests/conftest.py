"""Shared fixtures: CPU only, small data, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
# Under pytest-xdist (`make test` runs two workers) each worker gets one thread: two workers x two
# threads on a 2-core machine spend more time contending than computing.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "torch-rechub-samples"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.exists():
        pytest.skip(f"sample data folder {SAMPLES} is absent")
    return SAMPLES


def quiet_trainer_kwargs(**over):
    """Lightning Trainer arguments for fast, silent test runs."""
    kw = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kw.update(over)
    return kw
