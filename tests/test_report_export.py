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
