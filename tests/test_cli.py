"""The `rechub` CLI: fit on tiny default data, validate/predict from the checkpoint."""

import glob

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


def test_predict_raw_csv_matches_module_on_encoded_rows(fitted, tmp_path):
    from rechub_lightning import CTRModule
    from rechub_lightning.data import CTRDataModule, TensorDictDataset
    from rechub_lightning.data.preprocessing import Preprocessor

    root, best = fitted
    raw = CTRDataModule(synthetic_rows=4000, synthetic_max_vocab=500).raw_frame("test").drop(columns=["label"])
    raw.loc[raw.index[:5], "C3"] = 10**9  # categories never seen in training -> unknown id 0
    csv = tmp_path / "new.csv"
    raw.to_csv(csv, index=False)
    out = tmp_path / "preds.csv"
    main(["predict", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={best}", f"--data.init_args.path={csv}", f"--predict_output={out}"])
    got = pd.read_csv(out)
    assert list(got["row"]) == list(range(len(raw)))

    ckpt = torch.load(best, weights_only=True)
    pre = Preprocessor.from_state_dict(ckpt["CTRDataModule"]["preprocessor"])
    x = TensorDictDataset(pre.transform(pd.read_csv(csv))).x
    assert (x["C3"][:5] == 0).all()
    module = CTRModule.load_from_checkpoint(best).eval()
    with torch.no_grad():
        expect = torch.sigmoid(module(x)).numpy()
    assert abs(got["pred_label"].to_numpy() - expect).max() < 1e-6


def test_predict_takes_the_label_name_the_checkpoint_was_trained_on(tmp_path):
    """Trained with ``--data.label click``; ``rechub predict --ckpt_path`` with the same config and
    no ``--data.label`` writes ``pred_click`` and ``label_click`` (it wrote ``pred_label``)."""
    from rechub_lightning.data import CTRDataModule

    frame = CTRDataModule(synthetic_rows=1500, synthetic_max_vocab=50).raw_frame("train").rename(columns={"label": "click"})
    for c in [c for c in frame.columns if c.startswith("C")]:
        frame[c] = "v" + frame[c].astype(str)  # categories as text, as in a raw Criteo file
    csv = tmp_path / "clicks.csv"
    frame.to_csv(csv, index=False)
    main(["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
          f"--data.init_args.path={csv}", "--data.init_args.label=click"])
    best = glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)[0]
    out = tmp_path / "preds.csv"
    main(["predict", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={best}", f"--data.init_args.path={csv}", f"--predict_output={out}"])
    got = pd.read_csv(out)
    assert list(got.columns) == ["row", "pred_click", "label_click"]
    assert (got["label_click"].to_numpy() == frame["click"].to_numpy()).all()


def test_feature_arguments_take_lists_of_column_names(tmp_path):
    """docs/cli.md: a model's feature arguments take a selector or a list of column names, in a
    config or on the command line (the list was refused by the argument's type)."""
    from rechub_lightning.models.base import build_model

    main(["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, "--trainer.max_epochs=1",
          "--model.init_args.model.init_args.fm_features=[C1, C2]",
          "--model.init_args.model.init_args.deep_features=[C1, C2, I1]", f"--trainer.default_root_dir={tmp_path}"])
    best = glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)
    spec = torch.load(best[0], weights_only=True)["hyper_parameters"]["model"]
    assert spec["init_args"]["fm_features"] == ["C1", "C2"]
    model = build_model(spec)
    assert [f.name for f in model.fm_features] == ["C1", "C2"]
    assert [f.name for f in model.deep_features] == ["C1", "C2", "I1"]
