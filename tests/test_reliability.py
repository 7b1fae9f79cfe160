"""Interrupted runs resume exactly; same seed, same result; checkpoints are atomic."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def _run(script, *args, expect_kill=False):
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ctr_sigkill_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("resume.py", "ctr", full, -1, 0)
    _run("resume.py", "ctr", cut, 11, 0, expect_kill=True)  # killed mid-epoch 2 (9 steps per epoch)
    ckpt = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    assert 0 < ckpt["global_step"] < 27  # a mid-run checkpoint exists
    _run("resume.py", "ctr", cut, -1, 1)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff}"
    # the optimizer (SparseAdam for the tables + Adam for the rest) resumed exactly too
    oa = torch.load(full / "final_opt.pt", weights_only=True)
    ob = torch.load(cut / "final_opt.pt", weights_only=True)
    assert oa["global_step"] == ob["global_step"] and oa["lr"] == ob["lr"]
    ta, tb = _tensors(oa["optimizer"]), _tensors(ob["optimizer"])
    assert len(ta) == len(tb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))


def _tensors(obj):
    """Every tensor of a nested dict/list, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_atomic_checkpoint_never_leaves_a_torn_file(tmp_path, monkeypatch):
    from rechub_lightning.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary left behind


@pytest.mark.slow
def test_same_seed_bitwise_equal_state_dicts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run("resume.py", "ctr", a, -1, 0)
    _run("resume.py", "ctr", b, -1, 0)
    sa, sb = torch.load(a / "final.pt", weights_only=True), torch.load(b / "final.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_mtl_gradnorm_sigkill_resume_equals_uninterrupted(tmp_path):
    """Manual optimization (GradNorm): model, task weights, GradNorm's Adam moments and initial
    losses, the optimizer and the step-interval scheduler all resume exactly."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("resume.py", "mtl", full, -1, 0)
    _run("resume.py", "mtl", cut, 10, 0, expect_kill=True)  # killed mid-epoch 2 (7 steps per epoch)
    ckpt = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    assert 7 < ckpt["global_step"] < 21  # a mid-epoch checkpoint exists
    assert bool(ckpt["state_dict"]["weighting.initialized"])
    _run("resume.py", "mtl", cut, -1, 1)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert {"weighting.task_weights", "weighting.exp_avg", "weighting.initial_losses"} <= set(a)
    assert not torch.equal(a["weighting.task_weights"], torch.ones_like(a["weighting.task_weights"]))  # it did adapt
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert all(d <= 1e-6 for d in diff.values()), f"resumed run differs: {diff}"
    oa = torch.load(full / "final_opt.pt", weights_only=True)
    ob = torch.load(cut / "final_opt.pt", weights_only=True)
    assert oa["global_step"] == ob["global_step"] == 21
    assert oa["lr"] == ob["lr"]
    for pid, state in oa["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.allclose(value.double(), ob["optimizer"]["state"][pid][key].double(), atol=1e-6, rtol=0), (pid, key)


@pytest.mark.slow
def test_streamed_parquet_sigkill_resume_equals_uninterrupted(tmp_path):
    """Out-of-core training resumes mid-epoch too: the epoch's row-group order is regenerated
    and the batches already trained on are dropped, so the weights equal an uninterrupted run's."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("resume.py", "stream", full, -1, 0)
    _run("resume.py", "stream", cut, 18, 0, expect_kill=True)  # 12 batches per epoch: killed in epoch 2
    ckpt = torch.load(cut / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 16
    _run("resume.py", "stream", cut, -1, 1)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff}"
    oa = torch.load(full / "final_opt.pt", weights_only=True)
    ob = torch.load(cut / "final_opt.pt", weights_only=True)
    assert oa["global_step"] == ob["global_step"] == 36


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, ckpt_every, ckpt_step",
    [
        (10, 4, 8),  # killed in the middle of epoch 2, resumed from step 8
        (9, 7, 7),  # checkpoint written at epoch 1's last batch, before its epoch-end hook ran
    ],
)
def test_mtl_dwa_resume_keeps_the_epoch_loss_means(tmp_path, kill_at, ckpt_every, ckpt_step):
    """DWA sets each epoch's weights from the previous epochs' mean task losses: a resumed run
    must continue the interrupted epoch's running sums (and not lose a finished epoch's)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("resume.py", "dwa", full, -1, 0)
    _run("resume.py", "dwa", cut, kill_at, 0, ckpt_every, expect_kill=True)  # 7 steps per epoch
    ckpt = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == ckpt_step
    assert ckpt["rechub_mtl_epoch"]["batches"] == (ckpt_step - 1) % 7 + 1
    _run("resume.py", "dwa", cut, -1, 1, ckpt_every)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    assert not torch.equal(a["weighting.current_weights"], torch.ones_like(a["weighting.current_weights"]))  # it did adapt
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert all(d <= 1e-6 for d in diff.values()), f"resumed run differs: {diff}"


def _train_ctr_with_workers(num_workers, ckpt_dir):
    from lightning import Trainer, seed_everything

    from rechub_lightning import CTRModule
    from rechub_lightning.data import CTRDataModule
    from rechub_lightning.models.ranking import DeepFM

    seed_everything(11)
    dm = CTRDataModule(synthetic_rows=1500, synthetic_max_vocab=200, batch_size=128, seed=3, num_workers=num_workers)
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16], "dropout": 0.3}))
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(ckpt_dir),
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer.fit(module, dm)
    val = trainer.validate(module, dm, verbose=False)[0]
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, val


@pytest.mark.slow
def test_same_seed_same_result_with_or_without_workers(tmp_path):
    """Workers never change batch composition, order, dropout masks or metrics."""
    s0, m0 = _train_ctr_with_workers(0, tmp_path / "w0")
    s2, m2 = _train_ctr_with_workers(2, tmp_path / "w2")
    assert s0.keys() == s2.keys()
    diff = [k for k in s0 if not torch.equal(s0[k], s2[k])]
    assert not diff, f"num_workers=2 differs from num_workers=0 in {diff}"
    assert m0 == m2
    assert "val/auc" in m0


def _fit_limited(tmp_path, max_epochs, ckpt_path=None, every=None):
    from lightning import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rechub_lightning import CTRModule
    from rechub_lightning.data import CTRDataModule
    from rechub_lightning.models.ranking import DeepFM

    class Seen(Callback):
        rows: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            self.rows.append((trainer.current_epoch, next(iter(x.values()))[:4].tolist()))

    seen = Seen()
    seen.rows = []
    callbacks = [seen]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    seed_everything(1)
    dm = CTRDataModule(synthetic_rows=1280, synthetic_max_vocab=100, batch_size=128, seed=3)  # 8 training batches
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [8]}))
    trainer = Trainer(
        max_epochs=max_epochs, limit_train_batches=6, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
        deterministic=True,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer.global_step, seen.rows, module.state_dict()


@pytest.mark.parametrize("ckpt_step, first_epochs", [(6, 1), (4, 1), (12, 2)])
def test_resume_with_limit_train_batches_sees_the_uninterrupted_batches(tmp_path, ckpt_step, first_epochs):
    """limit_train_batches ends each epoch before the loader runs out: a checkpoint written at such
    an epoch's last batch resumes at the next epoch's first batch (it skipped as many batches into
    it: 16 steps instead of 18), and one written mid-epoch continues that epoch."""
    steps, rows, weights = _fit_limited(tmp_path / "full", 3)
    assert steps == 18
    _fit_limited(tmp_path / "cut", first_epochs, every=6 if ckpt_step % 6 == 0 else ckpt_step)
    steps2, rows2, weights2 = _fit_limited(tmp_path / "cut", 3, ckpt_path=tmp_path / "cut" / f"step={ckpt_step}.ckpt")
    assert steps2 == 18
    assert rows2 == rows[ckpt_step:]
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
