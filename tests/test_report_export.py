"""`rechub report` plots from a real run's logs; ONNX export round trip (skipped without onnx)."""

import glob

import numpy as np
import pandas as pd
import pytest
import torch

from rechub_lightning.cli import main

TINY = [
    "--data.init_args.synthetic_rows=4000",
    "--data.init_args.synthetic_max_vocab=400",
    "--data.init_args.batch_size=512",
    "--trainer.max_epochs=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    main(["fit", "--config", "configs/ctr/widedeep.yaml", *TINY, f"--trainer.default_root_dir={root}"])
    best = glob.glob(str(root / "**" / "best-*.ckpt"), recursive=True)[0]
    preds = root / "preds.csv"
    main(["predict", "--config", "configs/ctr/widedeep.yaml", *TINY, f"--trainer.default_root_dir={root}",
          f"--ckpt_path={best}", f"--predict_output={preds}"])
    return root, best, preds


def test_report_pngs_plot_the_logged_values(run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    root, _, preds = run
    plotted = {}
    orig = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if "label" in kwargs and len(args) >= 2:
            plotted[kwargs["label"]] = np.asarray(args[1], dtype=float)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = tmp_path / "plots"
    main(["report", str(root), "--predictions", str(preds), "--output_dir", str(out)])
    for name in ("learning_curves.png", "roc.png", "calibration.png"):
        f = out / name
        assert f.exists() and f.stat().st_size > 10_000
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = pd.read_csv(glob.glob(str(root / "**" / "metrics.csv"), recursive=True)[0])
    logged = metrics.groupby("epoch")["val/auc"].last().dropna().to_numpy()
    assert np.allclose(plotted["val/auc"], logged)
    assert len(logged) == 3


def test_predictions_carry_labels(run):
    _, _, preds = run
    df = pd.read_csv(preds)
    assert {"row", "pred_label", "label_label"} <= set(df.columns)
    assert df["pred_label"].between(0, 1).all()


def test_onnx_roundtrip_from_cli(run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from rechub_lightning.cli import load_model_from_checkpoint
    from rechub_lightning.export import dummy_inputs, model_features

    _, best, _ = run
    out = tmp_path / "m.onnx"
    main(["export", "--ckpt_path", best, "--output", str(out)])
    model = load_model_from_checkpoint(best)
    for batch in (1, 37):  # dynamic batch dimension
        x = dummy_inputs(model_features(model), batch_size=batch)
        got = ort.InferenceSession(str(out)).run(None, {k: v.numpy() for k, v in x.items()})[0]
        with torch.no_grad():
            expect = torch.sigmoid(model(x)).numpy()
        assert got.shape == (batch,)
        assert np.abs(got - expect).max() < 1e-5


def test_quantized_export_from_cli(run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from rechub_lightning.cli import load_model_from_checkpoint
    from rechub_lightning.export import dummy_inputs, model_features

    _, best, _ = run
    out = tmp_path / "q" / "m.int8.onnx"
    main(["export", "--ckpt_path", best, "--output", str(out), "--quantize", "int8"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.int8.onnx"]  # the float32 graph was temporary
    model = load_model_from_checkpoint(best)
    x = dummy_inputs(model_features(model), batch_size=64)
    got = ort.InferenceSession(str(out)).run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        expect = torch.sigmoid(model(x)).numpy()
    assert np.abs(got - expect).max() < 0.05


def test_report_reads_the_training_log_not_a_later_validate_run(tmp_path):
    """`rechub validate`/`test` after training write their own, newer metrics.csv (one row, no
    train/ columns); the learning curves must come from the training run's log."""
    import os

    from rechub_lightning.report import find_metrics_csv

    train = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    later = tmp_path / "lightning_logs" / "version_1" / "metrics.csv"
    for path, text in ((train, "epoch,step,train/loss_epoch,val/auc\n0,9,0.5,0.7\n"), (later, "epoch,step,val/auc\n0,0,0.7\n")):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    os.utime(train, (1_000_000, 1_000_000))  # older than the validate run's file
    assert find_metrics_csv(str(tmp_path)) == str(train)
    train.unlink()
    assert find_metrics_csv(str(tmp_path)) == str(later)  # no training log: the newest one
    assert find_metrics_csv(str(later)) == str(later)  # a file is taken as given


def test_a_new_run_does_not_warn_that_its_log_folder_is_reused(tmp_path):
    """LightningCLI writes config.yaml into the run's folder before the first metric; the CSV
    writer must not then warn that the (new) folder "exists and is not empty"."""
    import warnings

    args = ["fit", "--config", "configs/ctr/widedeep.yaml", *TINY, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"]
    for _ in range(2):  # a second run gets version_1, also new
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(args)
        assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert len(glob.glob(str(tmp_path / "**" / "version_*" / "config.yaml"), recursive=True)) == 2


def test_cli_export_of_bst_takes_histories_of_the_trained_length(tmp_path):
    """BST's attention traces the history length as a constant: ``rechub export`` exports at the
    checkpoint's ``max_len`` (it used 10, and the graph refused the trained length)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from rechub_lightning.cli import load_model_from_checkpoint
    from rechub_lightning.data.base import load_preprocessing_state
    from rechub_lightning.export import dummy_inputs, model_features

    main(["fit", "--config", "configs/ctr/bst.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          f"--trainer.default_root_dir={tmp_path}"])
    best = glob.glob(str(tmp_path / "**" / "best*.ckpt"), recursive=True)[0]
    out = tmp_path / "bst.onnx"
    main(["export", "--ckpt_path", best, "--output", str(out)])
    max_len = load_preprocessing_state(best)["preprocessor"]["max_len"]
    model = load_model_from_checkpoint(best)
    x = dummy_inputs(model_features(model), batch_size=37, seq_length=max_len)
    assert any(v.dim() == 2 and v.shape[1] == max_len != 10 for v in x.values())
    got = ort.InferenceSession(str(out)).run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        expect = torch.sigmoid(model(x)).numpy()
    assert np.abs(got - expect).max() < 1e-5
