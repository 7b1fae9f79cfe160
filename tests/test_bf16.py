"""bf16 mixed precision on CPU trains every family: matching (in-batch two-tower and a sequence
model), multi-task (automatic and manual weighting). Losses and weights stay finite."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import MatchModule, MTLModule
from rechub_lightning.data import MatchDataModule, MTLDataModule
from rechub_lightning.models.matching import DSSM, GRU4Rec, SASRec
from rechub_lightning.models.multi_task import MMOE

MATCH_DATA = dict(synthetic_users=60, synthetic_items=120, synthetic_interactions=(8, 16), seq_max_len=10,
                  batch_size=32, embed_dim=8)


def _fit_bf16(module, dm, steps=6):
    trainer = Trainer(
        max_steps=steps,
        precision="bf16-mixed",
        **quiet_trainer_kwargs(enable_checkpointing=False),
    )
    trainer.fit(module, dm)
    assert trainer.global_step == steps
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), f"train/loss = {loss}"
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite parameters after bf16 training: {bad}"
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32
    val = trainer.validate(module, dm, verbose=False)[0]  # evaluation under bf16 autocast too
    assert val and all(torch.isfinite(torch.tensor(v)) for v in val.values()), val
    return val


@pytest.fixture(scope="module")
def match_dm():
    return MatchDataModule(mode=2, neg_ratio=3, **MATCH_DATA)


@pytest.mark.parametrize("logq", [False, True])
def test_bf16_dssm_in_batch(match_dm, logq):
    torch.manual_seed(0)
    model = DSSM(user_params={"dims": [16, 8]}, item_params={"dims": [16, 8]}, temperature=0.1, schema=match_dm.schema)
    module = MatchModule(model, mode=2, in_batch_neg=True, logq_correction=logq, mask_accidental_hits=logq, topk=(5,))
    val = _fit_bf16(module, match_dm)
    assert any(k.startswith("val/recall@") for k in val)


@pytest.mark.parametrize("name", ["SASRec", "GRU4Rec"])
def test_bf16_sequence_model(match_dm, name):
    torch.manual_seed(0)
    model = (
        SASRec(max_len=10, num_blocks=1, dropout_rate=0.1, schema=match_dm.schema)
        if name == "SASRec"
        else GRU4Rec(user_params={"dims": [16, 8], "num_layers": 1}, schema=match_dm.schema)
    )
    _fit_bf16(MatchModule(model, mode=2, topk=(5,)), match_dm)


@pytest.fixture(scope="module")
def mtl_dm():
    return MTLDataModule(synthetic_rows=1500, batch_size=128, embed_dim=8, seed=1)


@pytest.mark.parametrize("method", [None, "uwl", "gradnorm", "metabalance", "pcgrad"])
def test_bf16_mmoe(mtl_dm, method):
    torch.manual_seed(0)
    model = MMOE(schema=mtl_dm.schema, n_expert=2, expert_params={"dims": [16]},
                 tower_params_list=[{"dims": [8]}] * len(mtl_dm.task_types))
    module = MTLModule(model, adaptive_params=None if method is None else {"method": method}, gradient_clip_val=5.0)
    val = _fit_bf16(module, mtl_dm)
    weights = module.weighting.weights()
    assert torch.isfinite(weights).all()
    assert all(torch.isfinite(b).all() for b in module.weighting.buffers() if b.is_floating_point())
    assert f"val/task_0_{module.score_names[0]}" in val


@pytest.mark.parametrize("name", ["DeepFM", "AutoInt"])
def test_bf16_true_trains_models_with_dense_features(name):
    """``precision="bf16-true"`` (weights and inputs in bf16): dense inputs follow the weights' dtype
    (a hard-coded float32 cast made every model with dense features fail on its first matmul)."""
    from rechub_lightning import CTRModule
    from rechub_lightning.data import CTRDataModule
    from rechub_lightning.models import ranking

    torch.manual_seed(0)
    dm = CTRDataModule(synthetic_rows=600, synthetic_max_vocab=50, batch_size=64, embed_dim=8)
    assert dm.schema.dense
    kw = {"num_layers": 1} if name == "AutoInt" else {}
    module = CTRModule(getattr(ranking, name)(schema=dm.schema, mlp_params={"dims": [8]}, **kw))
    trainer = Trainer(max_steps=4, precision="bf16-true", **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    assert trainer.global_step == 4
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert all(torch.isfinite(p.float()).all() for p in module.parameters())
    val = trainer.validate(module, dm, verbose=False)[0]
    assert 0.0 <= val["val/auc"] <= 1.0
