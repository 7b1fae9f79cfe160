"""Distributed exactness on CPU (gloo): validation metrics and predictions under 2-process DDP
equal single-process ones; bf16 mixed precision trains."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning import Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DCNv2, DeepFM

MLP = {"dims": [32], "dropout": 0.0}


SCRIPT = Path(__file__).parent / "scripts" / "ddp_ctr.py"


def _run(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _run("prepare", out)
    _run("ddp", out)
    return out


@pytest.mark.slow
def test_ddp_validation_equals_single_process(ddp_out):
    single = json.load(open(ddp_out / "single.json"))
    ddp = json.load(open(ddp_out / "ddp.json"))
    assert single["n_val"] % 2 == 1  # not divisible by the world size
    assert ddp["val/auc"] == pytest.approx(single["val/auc"], abs=1e-6)
    assert ddp["val/logloss"] == pytest.approx(single["val/logloss"], abs=1e-6)


@pytest.mark.slow
def test_ddp_predictions_written_once_per_row_in_order(ddp_out):
    a, b = pd.read_csv(ddp_out / "single.csv"), pd.read_csv(ddp_out / "ddp.csv")
    assert len(b) == len(a)
    assert list(b["row"]) == list(range(len(b)))
    assert (a["pred"] - b["pred"]).abs().max() < 1e-6


@pytest.mark.slow
def test_ddp_training_batches_disjoint(ddp_out):
    seen = [torch.load(ddp_out / f"rows{r}.pt") for r in range(2)]
    r0, r1 = set(seen[0]["rows"]), set(seen[1]["rows"])
    assert not r0 & r1  # every rank trains on different rows
    assert len(r0) + len(r1) == seen[0]["n_train"]  # and together on all of them


def test_bf16_mixed_trains_without_nan():
    dm = CTRDataModule(synthetic_rows=4000, synthetic_max_vocab=300, batch_size=256)
    module = CTRModule(DCNv2(schema=dm.schema, mlp_params=MLP, n_cross_layers=2, low_rank=8))
    trainer = Trainer(max_epochs=2, precision="bf16-mixed", **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and m["val/auc"] > 0.6
