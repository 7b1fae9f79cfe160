"""ONNX round trip of a multi-task model and of every matching model's towers: onnxruntime ==
PyTorch at two batch sizes (and two history lengths where the model allows it)."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from rechub_lightning import DenseFeature, SparseFeature  # noqa: E402
from rechub_lightning.data import MatchDataModule  # noqa: E402
from rechub_lightning.export import dummy_inputs, export_onnx, model_features  # noqa: E402
from rechub_lightning.models.matching import (  # noqa: E402
    DSSM,
    DSSMSENet,
    GRU4Rec,
    MIND,
    NARM,
    SASRec,
    SINE,
    STAMP,
    ComirecDR,
    ComirecSA,
    FaceBookDSSM,
    YoutubeDNN,
    YoutubeSBC,
)
from rechub_lightning.models.multi_task import MMOE  # noqa: E402

BATCHES = (3, 29)  # the graph's batch dimension is dynamic


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert set(names) == set(x), (names, sorted(x))
    return sess.run(None, {n: x[n].numpy() for n in names})[0]


@pytest.fixture(scope="module")
def match_schema():
    dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=40, synthetic_items=80, synthetic_interactions=(6, 10),
                         seq_max_len=8, embed_dim=8)
    return dm.schema


def test_mmoe_all_task_outputs(tmp_path):
    torch.manual_seed(0)
    feats = [SparseFeature("a", 20, 4), SparseFeature("b", 7, 4), DenseFeature("d"), DenseFeature("w", embed_dim=3)]
    model = MMOE(feats, task_types=["classification", "regression", "classification"], n_expert=3,
                 expert_params={"dims": [8]}, tower_params_list=[{"dims": [4]}] * 3).eval()
    path = export_onnx(model, str(tmp_path / "mmoe.onnx"))
    for batch in BATCHES:
        x = dummy_inputs(model_features(model), batch_size=batch)
        got = _run(path, x)
        with torch.no_grad():
            logits = model(x)
        # what MTLModule.predict returns: probabilities for classification tasks, raw values for regression
        expect = torch.stack([torch.sigmoid(logits[:, 0]), logits[:, 1], torch.sigmoid(logits[:, 2])], dim=1).numpy()
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


P = {"dims": [16, 8]}
L = 8  # the fixture's seq_max_len
MATCH_MODELS = {
    "DSSM": lambda s: DSSM(user_params=P, item_params=P, temperature=0.1, schema=s),
    "DSSMSENet": lambda s: DSSMSENet(user_params=P, item_params=P, temperature=0.1, schema=s),
    "FaceBookDSSM": lambda s: FaceBookDSSM(user_params=P, item_params=P, schema=s),
    "YoutubeDNN": lambda s: YoutubeDNN(user_params=P, schema=s),
    "YoutubeSBC": lambda s: YoutubeSBC(user_params=P, item_params=P, n_neg=3, schema=s),
    "GRU4Rec": lambda s: GRU4Rec(user_params={**P, "num_layers": 2}, schema=s),
    "NARM": lambda s: NARM(hidden_dim=12, schema=s),
    "STAMP": lambda s: STAMP(schema=s),
    "SASRec": lambda s: SASRec(max_len=L, num_heads=2, schema=s),
    "MIND": lambda s: MIND(max_length=L, interest_num=2, schema=s),
    "ComirecSA": lambda s: ComirecSA(interest_num=2, schema=s),
    "ComirecDR": lambda s: ComirecDR(max_length=L, interest_num=2, schema=s),
    "SINE": lambda s: SINE(hidden_dim=16, num_concept=10, num_intention=2, seq_max_len=L, num_heads=2, schema=s),
}


@pytest.mark.parametrize("name", list(MATCH_MODELS))
@pytest.mark.parametrize("tower", ["user", "item"])
def test_matching_towers(tmp_path, match_schema, name, tower):
    torch.manual_seed(0)
    model = MATCH_MODELS[name](match_schema).eval()
    path = export_onnx(model, str(tmp_path / f"{name}_{tower}.onnx"), tower=tower)
    feats = model_features(model, tower)
    # SASRec's attention (nn.MultiheadAttention) traces its sequence length as a constant: its
    # user tower takes histories padded to max_len (documented in export_onnx)
    lengths = (L, L) if name == "SASRec" else (L, 5)
    for batch, seq_len in zip(BATCHES, lengths):
        x = dummy_inputs(feats, batch_size=batch, seq_length=seq_len)
        if "hist_movie_id" in x:  # real histories: some pre-/post-padded, one empty
            x["hist_movie_id"][0] = 0
            x["hist_movie_id"][1, :2] = 0
            x["hist_movie_id"][2, -2:] = 0
        got = _run(path, x)
        with torch.no_grad():
            expect = getattr(model, f"{tower}_tower")(x).numpy()
        assert got.shape == expect.shape and got.shape[0] == batch
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert getattr(model, "mode", None) is None


# --------------------------------------------------------------------------- quantized ONNX
def _trained_deepfm():
    """A DeepFM fitted a few steps on a learnable rule, so its scores are not all ~0.5."""
    from rechub_lightning.models.ranking import DeepFM

    torch.manual_seed(0)
    sparse = [SparseFeature(f"s{i}", 5000, 16) for i in range(4)]
    model = DeepFM(sparse + [DenseFeature("d")], sparse, {"dims": [32, 16]})
    x = dummy_inputs(model_features(model), batch_size=4096)
    y = ((x["s0"] % 2 == 0) ^ (x["d"] > 0.5)).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_quantized_onnx_models_are_smaller_and_score_alike(tmp_path):
    from sklearn.metrics import roc_auc_score

    from rechub_lightning.export import quantize_model, quantize_onnx

    model, x, y = _trained_deepfm()
    fp32 = export_onnx(model, str(tmp_path / "deepfm.onnx"))
    int8 = quantize_onnx(fp32, str(tmp_path / "q" / "deepfm.int8.onnx"))
    fp16 = quantize_model(fp32, str(tmp_path / "deepfm.fp16.onnx"), mode="fp16")  # the reference's name
    size = {p: __import__("os").path.getsize(p) for p in (fp32, int8, fp16)}
    assert size[int8] < 0.35 * size[fp32]  # 8-bit embedding tables
    assert size[fp16] < 0.55 * size[fp32]
    with torch.no_grad():
        expect = torch.sigmoid(model(x)).numpy()
    auc = roc_auc_score(y.numpy(), expect)
    assert auc > 0.9  # the model learned the rule: quantization error shows in the ranking
    for path, tol, auc_tol in ((int8, 0.01, 0.002), (fp16, 5e-3, 1e-3)):
        got = _run(path, x)
        assert got.dtype == np.float32  # float32 in and out for both
        assert np.abs(got - expect).max() < tol, path
        assert abs(roc_auc_score(y.numpy(), got) - auc) < auc_tol, path
    with pytest.raises(ValueError, match="mode"):
        quantize_onnx(fp32, str(tmp_path / "x.onnx"), mode="int4")
    with pytest.raises(ValueError, match="weight_type"):
        quantize_onnx(fp32, str(tmp_path / "x.onnx"), weight_type="int8")


# --------------------------------------------------------------------------- every ranking model
@__import__("functools").lru_cache(maxsize=1)
def _ranking_models():
    from rechub_lightning.data import CTRDataModule
    from rechub_lightning.models import ranking as R

    criteo = CTRDataModule(synthetic_rows=400, embed_dim=8).schema
    amazon = CTRDataModule(synthetic="amazon", synthetic_rows=400, embed_dim=8).schema
    seq = {"DIN", "DIEN", "BST"}
    return {name: (getattr(R, name), amazon if name in seq else criteo) for name in R.__all__}


@pytest.mark.parametrize("name", sorted(_ranking_models()))
def test_every_ranking_model_exports(tmp_path, name):
    """onnxruntime == PyTorch (eval mode) at two batch sizes; DIN/DIEN's Dice once failed to export."""
    cls, schema = _ranking_models()[name]
    torch.manual_seed(0)

    def predictions(out):
        return torch.sigmoid(out[0] if isinstance(out, tuple) else out)

    _assert_export_round_trip(cls(schema=schema), tmp_path / f"{name}.onnx", predictions)


def _assert_export_round_trip(model, path, predictions):
    """Export ``model`` after one training pass (BatchNorm statistics off their init) and compare
    onnxruntime with ``predictions(model(x))`` in eval mode at two batch sizes."""
    x = dummy_inputs(model_features(model), batch_size=64, seq_length=10)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    export_onnx(model, str(path))
    for batch in BATCHES:
        xb = {k: v[:batch] for k, v in x.items()}
        with torch.no_grad():
            expect = predictions(model(xb)).numpy()
        np.testing.assert_allclose(_run(path, xb).reshape(expect.shape), expect, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- every multi-task model
@pytest.mark.parametrize("name", ["SharedBottom", "MMOE", "PLE", "AITM", "ESMM"])
def test_every_multi_task_model_exports(tmp_path, name):
    """onnxruntime == MTLModule's predictions; ESMM's CTCVR logit once used aten::logaddexp,
    which ONNX cannot express."""
    from rechub_lightning.data import MTLDataModule
    from rechub_lightning.models import multi_task as M

    labels = {"labels": ["income", "marital status", "ctcvr"], "derived_labels": {"ctcvr": ["income", "marital status"]}}
    dm = MTLDataModule(synthetic_rows=300, **(labels if name == "ESMM" else {}))
    torch.manual_seed(0)
    model = getattr(M, name)(schema=dm.schema, **({"user_features": "sparse"} if name == "ESMM" else {}))

    def predictions(logits):
        return torch.stack([torch.sigmoid(logits[:, i]) if t == "classification" else logits[:, i]
                            for i, t in enumerate(model.task_types)], dim=1)

    _assert_export_round_trip(model, tmp_path / f"{name}.onnx", predictions)


def test_int8_quantizes_the_tables_and_keeps_a_trained_ctr_model_scores(tmp_path):
    """Dynamic INT8 of the MLP quantizes its inputs per tensor, which moved a trained DeepFM's
    scores by 0.35 on the default config; the default quantizes the embedding tables only."""
    import lightning as L

    from rechub_lightning import CTRModule
    from rechub_lightning.data import CTRDataModule
    from rechub_lightning.export import quantize_onnx
    from rechub_lightning.models.ranking import DeepFM

    L.seed_everything(0)
    dm = CTRDataModule(synthetic_rows=20000, synthetic_max_vocab=2000, batch_size=512)
    model = DeepFM(schema=dm.schema, mlp_params={"dims": [64, 32]})
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(CTRModule(model), dm)
    model.eval()
    x, _ = next(iter(dm.test_dataloader()))
    fp32 = export_onnx(model, str(tmp_path / "m.onnx"))
    with torch.no_grad():
        expect = torch.sigmoid(model(x)).numpy()
    tables = quantize_onnx(fp32, str(tmp_path / "m.int8.onnx"))
    everything = quantize_onnx(fp32, str(tmp_path / "m.all.onnx"), op_types_to_quantize=["Gather", "MatMul", "Gemm"])
    size = {p: __import__("os").path.getsize(p) for p in (fp32, tables, everything)}
    assert size[everything] < size[tables] < size[fp32]
    assert np.abs(_run(tables, x) - expect).max() < 0.005
    assert np.abs(_run(everything, x) - expect).max() > np.abs(_run(tables, x) - expect).max()
