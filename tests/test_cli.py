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


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(sub, tmp_path):
    """`rechub predict` without --ckpt_path wrote the predictions of an untrained model."""
    with pytest.raises(ValueError, match=rf"rechub {sub} needs --ckpt_path.*untrained"):
        main([sub, "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}"])


def test_lightning_cli_optimizer_options_are_not_offered(tmp_path):
    """LightningCLI's --optimizer replaced the module's optimizers (and failed at the first step on
    sparse gradients); --lr_scheduler was ignored. The module's own arguments say both."""
    for extra in (["--optimizer=torch.optim.Adam"], ["--lr_scheduler=torch.optim.lr_scheduler.StepLR"]):
        with pytest.raises(SystemExit):
            main(["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}", *extra])


def test_ckpt_path_best_in_a_new_process_is_the_runs_best(fitted, tmp_path):
    import rechub_lightning.cli as cli

    root, best = fitted
    seen = {}

    def grab(self):
        seen["ckpt"] = self.config[self.config.subcommand]["ckpt_path"]

    cli.RecHubCLI.after_test = grab
    try:
        main(["test", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={root}", "--ckpt_path=best"])
    finally:
        del cli.RecHubCLI.after_test
    assert seen["ckpt"] == best
    with pytest.raises(FileNotFoundError, match="--ckpt_path best"):
        main(["test", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=best"])


def test_resume_continues_the_run_folder_and_its_best_checkpoint(tmp_path):
    """`fit --ckpt_path last` went to a new version folder: ModelCheckpoint dropped the run's best
    score (a later, worse epoch became "best") and the learning curve started over."""
    args = ["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}"]
    main([*args, "--trainer.max_epochs=1"])
    main([*args, "--trainer.max_epochs=3", "--ckpt_path=last"])
    runs = glob.glob(str(tmp_path / "**" / "version_*"), recursive=True)
    assert len(runs) == 1
    metrics = pd.read_csv(glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)[0])
    val = metrics.dropna(subset=["val/auc"])
    assert sorted(val["epoch"].astype(int)) == [0, 1, 2]  # the whole run's curve
    last = torch.load(glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)[0], weights_only=True)
    state = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert float(state["best_model_score"]) == pytest.approx(val["val/auc"].max(), abs=1e-6)
    best_epoch = int(val.loc[val["val/auc"].idxmax(), "epoch"])
    assert state["best_model_path"].endswith(f"best-epoch{best_epoch:02d}.ckpt")


def test_predict_id_columns_keep_their_text(fitted, tmp_path):
    """Ids like "000123" were read as the number 123 (and "0012" and "012" became one id)."""
    from rechub_lightning.data import CTRDataModule

    root, best = fitted
    raw = CTRDataModule(synthetic_rows=4000, synthetic_max_vocab=500).raw_frame("test").drop(columns=["label"]).head(50)
    ids = [f"{i:06d}" for i in range(48)] + ["0012", "012"]
    raw.insert(0, "order_id", ids)
    csv = tmp_path / "new.csv"
    raw.to_csv(csv, index=False)
    out = tmp_path / "preds.csv"
    main(["predict", "--config", "configs/ctr/deepfm.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={best}", f"--data.init_args.path={csv}", f"--predict_output={out}", "--predict_id_columns=[order_id]"])
    assert list(pd.read_csv(out, dtype={"order_id": str})["order_id"]) == ids


def test_csv_log_follows_the_chosen_loggers_folder(tmp_path):
    """With --trainer.logger TensorBoardLogger --trainer.logger.save_dir X, metrics.csv went under
    default_root_dir, where `rechub report X` did not find it."""
    pytest.importorskip("tensorboardX")
    main(["fit", "--config", "configs/ctr/deepfm.yaml", *TINY, "--trainer.max_epochs=1",
          f"--trainer.default_root_dir={tmp_path / 'root'}", "--trainer.logger=TensorBoardLogger",
          f"--trainer.logger.save_dir={tmp_path / 'tb'}"])
    assert glob.glob(str(tmp_path / "tb" / "**" / "metrics.csv"), recursive=True)
    assert not glob.glob(str(tmp_path / "root" / "**" / "metrics.csv"), recursive=True)


def test_ckpt_path_best_skips_periodic_checkpoints_and_files_without_state(tmp_path):
    """A periodic ModelCheckpoint (no monitor) listed first records its own last file as
    "best_model_path"; a newer checkpoint without callback state hid the run's best."""
    from rechub_lightning.cli import _best_checkpoint_under

    run = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    best, step = run / "best-epoch02.ckpt", run / "step015.ckpt"
    for f in (best, step):
        torch.save({"state_dict": {}}, f)
    states = {
        "ModelCheckpoint{'monitor': None, 'every_n_train_steps': 15}": {"monitor": None, "best_model_path": str(step)},
        "ModelCheckpoint{'monitor': 'val/auc', 'mode': 'max'}": {"monitor": "val/auc", "best_model_path": str(best)},
    }
    torch.save({"state_dict": {}, "callbacks": states}, run / "last.ckpt")
    import os
    import time

    export = tmp_path / "export"
    export.mkdir()
    torch.save({"state_dict": {}}, export / "model.ckpt")  # newest, no callback state
    later = time.time() + 5
    os.utime(export / "model.ckpt", (later, later))
    assert _best_checkpoint_under(str(tmp_path)) == str(best)


def test_resumed_csv_log_keeps_only_the_rows_before_the_checkpoint(tmp_path):
    """The CSV step is the logger's (batches before the current one): a checkpoint at global step
    15 came before the row logged at step 15, which the resumed run logs again."""
    from lightning.pytorch.loggers import CSVLogger

    from rechub_lightning.cli import _keep_csv_history

    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version=0)
    log_dir = tmp_path / "logs" / "version_0"
    log_dir.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [13, 14, 14, 15], "train/loss": [0.7, 0.6, None, 0.5],
                  "val/auc": [None, None, 0.61, None]}).to_csv(log_dir / "metrics.csv", index=False)
    ckpt = tmp_path / "step015.ckpt"
    torch.save({"global_step": 15}, ckpt)
    _keep_csv_history(logger, str(ckpt))
    kept = pd.read_csv(log_dir / "metrics.csv")
    assert list(kept["step"]) == [13, 14, 14]
    logger.log_metrics({"train/loss": 0.4}, step=15)
    logger.save()
    assert list(pd.read_csv(log_dir / "metrics.csv")["step"]) == [13, 14, 14, 15]


def test_multi_task_predict_takes_the_task_types_of_the_checkpoint(tmp_path):
    """Fit said task_types [classification, regression]; `rechub predict --ckpt_path` with the
    config (which says [classification, classification]) squashed the regression output through a
    sigmoid. The checkpoint's task types now win over the config's (an ESMM's derived labels too)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 1200
    frame = pd.DataFrame({"u": [f"u{i}" for i in rng.integers(0, 40, n)], "i": [f"i{i}" for i in rng.integers(0, 60, n)]})
    frame["click"] = (rng.random(n) < 0.4).astype(int)
    frame["dwell"] = rng.random(n) * 50 + 10
    csv = tmp_path / "mtl.csv"
    frame.to_csv(csv, index=False)
    common = ["--config", "configs/mtl/mmoe.yaml", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.path={csv}",
              "--data.init_args.labels=[click, dwell]", "--data.init_args.batch_size=256"]
    main(["fit", *common, "--model.init_args.model.init_args.task_types=[classification, regression]"])
    best = glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)[0]
    out = tmp_path / "preds.csv"
    main(["predict", *common, f"--ckpt_path={best}", f"--predict_output={out}"])
    got = pd.read_csv(out)
    from rechub_lightning import MTLModule
    from rechub_lightning.data import MTLDataModule

    dm = MTLDataModule(path=str(csv), labels=["click", "dwell"], preprocessing_from=best)
    module = MTLModule.load_from_checkpoint(best).eval()
    with torch.no_grad():
        expect = module.predictions(module._outputs(dm.dataset("predict").x)).numpy()
    assert np.abs(got["pred_dwell"].to_numpy() - expect[:, 1]).max() < 1e-5
    assert got["pred_dwell"].max() > 1.0 or expect[:, 1].max() <= 1.0  # a raw value, not a probability


def test_ckpt_path_best_is_the_newest_runs_even_without_a_monitor(tmp_path):
    """A newer run with Lightning's default ModelCheckpoint (no monitor): its checkpoint, not an
    older run's monitored best (which may be another model)."""
    import os
    import time

    from rechub_lightning.cli import _best_checkpoint_under

    old = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    new = tmp_path / "lightning_logs" / "version_1" / "checkpoints"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    old_best, new_last = old / "best-epoch03.ckpt", new / "epoch=0-step=5.ckpt"
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/auc'}": {"monitor": "val/auc", "best_model_path": str(old_best)}}},
               old_best)
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": str(new_last)}}}, new_last)
    later = time.time() + 5
    os.utime(new_last, (later, later))
    assert _best_checkpoint_under(str(tmp_path)) == str(new_last)
