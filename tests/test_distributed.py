"""Distributed exactness on CPU (gloo): validation metrics and predictions under 2-process DDP
equal single-process ones; bf16 mixed precision trains."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DCNv2

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
def test_ddp_predictions_of_a_plain_dataloader_land_on_their_rows(ddp_out):
    """A plain DataLoader (Torch-RecHub's PredictDataset) is re-sampled by Lightning under DDP so
    that rank r reads rows r, r + 2, ...; the writer put rank 0's rows first (row 1 got row 2's
    prediction). It now orders them by the batch indices Lightning records."""
    a, b = pd.read_csv(ddp_out / "single_plain.csv"), pd.read_csv(ddp_out / "ddp_plain.csv")
    assert len(a) == len(b) == 301
    assert list(b["row"]) == list(range(301))
    assert (a["pred"] - b["pred"]).abs().max() < 1e-6


@pytest.mark.slow
def test_ddp_training_batches_disjoint(ddp_out):
    seen = [torch.load(ddp_out / f"rows{r}.pt") for r in range(2)]
    r0, r1 = set(seen[0]["rows"]), set(seen[1]["rows"])
    assert not r0 & r1  # every rank trains on different rows
    assert len(r0) + len(r1) == seen[0]["n_train"]  # and together on all of them


@pytest.fixture(scope="module")
def ddp_mtl_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_mtl")
    _run("prepare", out, "mtl")
    _run("ddp", out, "mtl")
    return out


@pytest.mark.slow
def test_ddp_multi_task_validation_and_predictions_equal_single_process(ddp_mtl_out):
    """MMOE: every task's validation metric and probability under 2-process DDP equals the
    single-process value on the same checkpoint (301 validation rows: odd)."""
    single = json.load(open(ddp_mtl_out / "single.json"))
    ddp = json.load(open(ddp_mtl_out / "ddp.json"))
    assert single["n_val"] % 2 == 1
    task_keys = [k for k in single if k.startswith("val/task_")]
    assert len(task_keys) >= 2 and set(task_keys) <= set(ddp)
    for k in task_keys + ["val/loss"] * ("val/loss" in single):
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), k
    a, b = pd.read_csv(ddp_mtl_out / "single.csv"), pd.read_csv(ddp_mtl_out / "ddp.csv")
    preds = [c for c in a.columns if c.startswith("pred_")]
    assert len(preds) == 2 and len(b) == len(a)
    assert list(b["row"]) == list(range(len(b)))
    assert max((a[c] - b[c]).abs().max() for c in preds) < 1e-6


def test_bf16_mixed_trains_without_nan():
    dm = CTRDataModule(synthetic_rows=4000, synthetic_max_vocab=300, batch_size=256)
    module = CTRModule(DCNv2(schema=dm.schema, mlp_params=MLP, n_cross_layers=2, low_rank=8))
    trainer = Trainer(max_epochs=2, precision="bf16-mixed", **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and m["val/auc"] > 0.6


# --------------------------------------------------------------------------- in-batch negatives across ranks
@pytest.mark.slow
def test_gathered_in_batch_negatives_equal_single_process_on_the_global_batch(tmp_path):
    """2 gloo ranks with gather_negatives=True: each rank's loss equals one process scoring that
    rank's users against the concatenated batch, and the (DDP-averaged) gradients of the item tower
    and embeddings equal the single-process gradient; with gather_negatives=False each rank's loss is
    its local in-batch loss (unchanged behaviour). Subprocess: `ddp_spawn` inside pytest can deadlock."""
    script = Path(__file__).parent / "scripts" / "ddp_gather_neg.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.load(open(tmp_path / "gather_neg.json"))
    assert set(res) == {f"{c}/{g}" for c in ("softmax_logq_hits", "bpr_hard") for g in ("gather", "local")}
    for name, r in res.items():
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5), name
        assert r["ranks_agree_on_grads"], name
    for config in ("softmax_logq_hits", "bpr_hard"):
        g, loc = res[f"{config}/gather"], res[f"{config}/local"]
        assert g["grad_keys"] == g["ref_grad_keys"] and any(k.startswith("item_mlp") for k in g["grad_keys"])
        assert g["max_grad_abs"] > 1e-3  # a real gradient
        assert g["max_grad_diff"] < 1e-5, config
        assert g["max_item_mlp_grad_diff"] < 1e-5, config
        # gathering did change the candidates (BPR at initialisation sits near log 2, hence the small margin)
        assert max(abs(a - b) for a, b in zip(g["losses"], loc["losses"])) > 1e-6, config


def test_gather_negatives_is_a_no_op_in_one_process():
    from rechub_lightning import MatchModule
    from rechub_lightning.data import MatchDataModule
    from rechub_lightning.models.matching import DSSM

    dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=40, synthetic_items=60, synthetic_interactions=(8, 12),
                         seq_max_len=8, batch_size=16, embed_dim=8)
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for gather in (False, True):
        torch.manual_seed(0)
        model = DSSM(user_params={"dims": [8]}, item_params={"dims": [8]}, temperature=0.1, schema=dm.schema)
        module = MatchModule(model, in_batch_neg=True, mask_accidental_hits=True, item_id_feature="movie_id",
                             gather_negatives=gather)
        losses.append(module.compute_loss(batch))
    assert torch.equal(losses[0], losses[1])
    with pytest.raises(ValueError, match="gather_negatives"):
        MatchModule(model, in_batch_neg=True, gather_negatives="yes")


def test_in_batch_logits_with_explicit_positive_columns_matches_square_case():
    from rechub_lightning.modules.match import in_batch_logits

    torch.manual_seed(0)
    full = torch.randn(8, 8)
    ids = torch.tensor([3, 1, 3, 2, 5, 1, 7, 4])
    rows = slice(4, 8)  # the "second rank": its rows against all 8 columns, positives at 4..7
    square = in_batch_logits(full, 3, hard_negative=True, item_ids=ids)[rows]
    rect = in_batch_logits(full[rows], 3, hard_negative=True, item_ids=ids, positive=torch.arange(4, 8))
    assert torch.equal(square, rect)
    with pytest.raises(ValueError, match="positive"):
        in_batch_logits(full[rows], 3)


def test_plain_loader_padded_by_distributed_sampler_is_named():
    """Under DDP Lightning gives a plain validation DataLoader a DistributedSampler, which repeats
    rows to even out the ranks: the metrics then count them twice. The module says how many."""
    from torch.utils.data import DataLoader, DistributedSampler

    from rechub_lightning.data import TorchDataset

    dm = CTRDataModule(synthetic_rows=400, synthetic_max_vocab=50)
    module = CTRModule(DCNv2(schema=dm.schema, n_cross_layers=1, mlp_params=MLP))
    ds = TorchDataset({"C1": torch.zeros(199, dtype=torch.long)}, torch.zeros(199))
    padded = DataLoader(ds, batch_size=37, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False))
    with pytest.warns(UserWarning, match="repeats 1 of its 199 rows.*count those rows twice"):
        module._warn_padded_sampler(padded, "val")
    even = DataLoader(ds, batch_size=37, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._warn_padded_sampler(even, "val")  # nothing repeated: nothing said


def test_gather_predictions_orders_rows_by_lightnings_batch_indices():
    """One process, batches recorded out of order (a plain loader's indices): rows come back in
    dataset order; without indices (our loaders record none) the batches stay as they came."""
    from rechub_lightning.prediction import gather_predictions

    preds = [torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.0])]
    indices = [[[3, 1], [2, 0]]]  # per dataloader, per batch
    assert gather_predictions(preds, indices).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert gather_predictions(preds, [[]]).tolist() == pytest.approx([0.3, 0.1, 0.2, 0.0])
    assert gather_predictions(preds).tolist() == pytest.approx([0.3, 0.1, 0.2, 0.0])


def test_gather_predictions_keeps_each_dataloader_apart():
    """Two predict loaders: each one's rows are ordered on their own, loader after loader (sorting
    their indices together interleaved them)."""
    from rechub_lightning.prediction import gather_predictions

    preds = [[torch.tensor([1.0, 0.0])], [torch.tensor([10.0, 11.0, 12.0])]]
    indices = [[[1, 0]], [[0, 1, 2]]]
    assert gather_predictions(preds, indices).tolist() == pytest.approx([0.0, 1.0, 10.0, 11.0, 12.0])


def test_prediction_writer_puts_a_plain_loaders_rows_in_dataset_order(tmp_path):
    """A plain DataLoader that reads its rows in another order (a sampler): row i of the file is
    dataset row i, as under DDP, where Lightning deals the rows to the ranks in turn."""
    from torch.utils.data import DataLoader

    from conftest import quiet_trainer_kwargs as quiet
    from rechub_lightning.data import PredictDataset
    from rechub_lightning.prediction import PredictionWriter

    dm = CTRDataModule(synthetic_rows=600, synthetic_max_vocab=50)
    module = CTRModule(DCNv2(schema=dm.schema, n_cross_layers=1, mlp_params=MLP)).eval()
    x = {k: v.numpy() for k, v in dm.dataset("val").x.items()}
    order = np.random.default_rng(0).permutation(len(next(iter(x.values())))).tolist()
    out = tmp_path / "p.csv"
    Trainer(callbacks=[PredictionWriter(str(out))], **quiet()).predict(
        module, DataLoader(PredictDataset(x), batch_size=16, sampler=order), return_predictions=False)
    with torch.no_grad():
        expect = torch.sigmoid(module.model({k: torch.as_tensor(v) for k, v in x.items()}).reshape(-1)).numpy()
    got = pd.read_csv(out)
    assert np.abs(got["pred"].to_numpy() - expect).max() < 1e-6


@pytest.mark.slow
def test_ddp_resume_mid_epoch_with_dropout_equals_uninterrupted(tmp_path):
    """Each rank draws its own dropout masks; the checkpoint held rank 0's RNG state only, so rank
    1 of a resumed run drew rank 0's masks and the weights drifted from an uninterrupted run's.
    Every rank's state is now saved and restored to its rank."""
    import shutil

    rechub = shutil.which("rechub", path=str(Path(sys.executable).parent)) or "rechub"
    ck = tmp_path / "ck.yaml"
    ck.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/auc, mode: max, save_top_k: 1, save_last: true, filename: 'best-epoch{epoch:02d}', auto_insert_metric_name: false}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 3, save_top_k: -1, filename: 'step{step:03d}', auto_insert_metric_name: false}\n"
        "    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/auc, mode: max, patience: 5}\n"
    )
    root = Path(__file__).resolve().parents[1]
    args = [rechub, "fit", "--config", str(root / "configs/ctr/deepfm.yaml"), "--config", str(root / "configs/trainer/ddp_cpu.yaml"),
            "--config", str(ck), "--data.synthetic_rows=6000", "--data.synthetic_max_vocab=300", "--data.batch_size=512",
            "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    for extra in ([], [f"--ckpt_path={tmp_path}/lightning_logs/version_0/checkpoints/step006.ckpt"]):
        proc = subprocess.run(args + extra, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        if not extra:
            uninterrupted = state["state_dict"]
            assert len(state["rechub_rng"]["per_rank"]) == 2
    resumed = state["state_dict"]
    assert max(float((resumed[k].float() - v.float()).abs().max()) for k, v in uninterrupted.items()) < 1e-6
