"""The `rechub` CLI: fit on tiny default data, validate/predict from the checkpoint."""

import glob
import os

import pandas as pd
import pytest
import torch

from rechub_lightning.cli import main

TINY = [
    "--data.init_args.synthetic_rows=4000",
    "--data.init_args.synthetic_max_vocab=500",
    "--data.init_args.batch_size=512",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    main(["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={root}"])
    best = glob.glob(str(root / "**" / "best-*.ckpt"), recursive=True)
    assert len(best) == 1
    return root, best[0]


def test_fit_writes_best_checkpoint_with_schema_and_preprocessing(fitted):
    _, best = fitted
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["class_path"].endswith("DeepFM")
    state = ckpt["CTRDataModule"]
    assert len(state["preprocessor"]["encoders"]) == 26
    assert ckpt["callbacks"]  # ModelCheckpoint / EarlyStopping state
    score = [v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert float(score) > 0.6


def test_validate_from_checkpoint_reproduces_best_score(fitted, capsys):
    root, best = fitted
    ckpt = torch.load(best, weights_only=True)
    score = [v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    from lightning.pytorch.cli import LightningCLI  # noqa: F401

    import rechub_lightning.cli as cli

    seen = {}
    orig = cli.RecHubCLI.after_validate if hasattr(cli.RecHubCLI, "after_validate") else None

    def grab(self):
        seen.update({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    cli.RecHubCLI.after_validate = grab
    try:
        main(["validate", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={root}",
              f"--ckpt_path={best}"])
    finally:
        if orig is None:
            del cli.RecHubCLI.after_validate
        else:
            cli.RecHubCLI.after_validate = orig
    assert seen["val/auc"] == pytest.approx(float(score), abs=1e-6)


def test_user_csv_with_label_argument(tmp_path, samples):
    csv = samples / "criteo" / "criteo_sample.csv"
    main(["fit", "--config", "configs/ctr/deepfm.yaml", f"--data.init_args.path={csv}", "--data.init_args.label=label",
          "--data.init_args.batch_size=32", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}"])
    assert glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
