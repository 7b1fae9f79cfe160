"""Lightning features a user reaches for: torch.compile, the learning-rate finder, plateau
schedules with step-based validation."""

import lightning as L
import numpy as np
import pytest
import torch

from rechub_lightning import CTRModule
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DeepFM


def _trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def _dm(rows=2000, batch_size=256):
    return CTRDataModule(synthetic_rows=rows, synthetic_max_vocab=200, batch_size=batch_size, seed=1)


@pytest.mark.slow
def test_compiled_model_trains_dense_and_its_checkpoint_loads_into_the_plain_model(tmp_path):
    L.seed_everything(0)
    dm = _dm()
    model = DeepFM(schema=dm.schema, mlp_params={"dims": [16]})
    module = CTRModule(torch.compile(model, backend="aot_eager"))  # aot_eager failed on sparse gradients too
    trainer = _trainer(tmp_path, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert not module.sparse_embeddings  # the CPU default (sparse) is not compilable
    ckpt = str(tmp_path / "c.ckpt")
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert not any("_orig_mod" in k for k in state["state_dict"])
    loaded = CTRModule.load_from_checkpoint(ckpt)  # rebuilt from the hyper-parameters: the plain model
    assert type(loaded.model) is DeepFM
    x, _ = next(iter(dm.val_dataloader()))
    loaded.eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    again = CTRModule.load_from_checkpoint(ckpt, model=torch.compile(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}), backend="eager"))
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="torch.compile does not support sparse"):
        CTRModule(torch.compile(model, backend="eager"), sparse_embeddings=True)


def test_lr_find_sets_the_rate_the_optimizer_uses(tmp_path):
    from lightning.pytorch.tuner import Tuner

    L.seed_everything(0)
    dm = _dm(rows=3000, batch_size=128)
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}), optimizer_params={"lr": 1e-3})
    result = Tuner(_trainer(tmp_path)).lr_find(module, datamodule=dm, num_training=20)
    suggestion = result.suggestion()
    assert suggestion is not None and suggestion != 1e-3
    assert module.lr == suggestion and module.optimizer_params["lr"] == suggestion
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, dm)
    assert {g["lr"] for g in trainer.optimizers[0].param_groups} == {suggestion}  # the tables' rate follows
    assert module.hparams["optimizer_params"]["lr"] == suggestion
    ckpt = str(tmp_path / "tuned.ckpt")
    trainer.save_checkpoint(ckpt)
    assert CTRModule.load_from_checkpoint(ckpt).lr == suggestion
    shared = {"lr": 1e-3}
    other = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}), optimizer_params=shared)
    other.lr = 0.5
    assert shared == {"lr": 1e-3}  # the caller's dict is not changed
    assert CTRModule(DeepFM(schema=dm.schema), optimizer_fn=torch.optim.Adagrad, optimizer_params={}).lr == 0.01


@pytest.mark.parametrize("family", ["ctr", "mtl gradnorm (manual optimization)"])
def test_plateau_steps_once_per_validation_with_step_based_validation(tmp_path, family):
    """check_val_every_n_epoch=None validates every val_check_interval batches across epochs (15
    batches here, 10 per epoch): the plateau steps after each validation, on its value."""
    L.seed_everything(0)
    plateau = dict(optimizer_params={"lr": 0.05}, scheduler_fn="ReduceLROnPlateau", scheduler_params={"patience": 0, "factor": 0.5})
    if family == "ctr":
        dm = _dm(rows=3200, batch_size=256)  # 10 training batches
        module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}), **plateau)
        monitor = "val/auc"
    else:
        from rechub_lightning import MTLModule
        from rechub_lightning.data import MTLDataModule
        from rechub_lightning.models.multi_task import MMOE

        dm = MTLDataModule(synthetic_rows=2000, batch_size=160, seed=1)  # 10 training batches
        model = MMOE(schema=dm.schema, n_expert=2, expert_params={"dims": [8]}, tower_params_list=[{"dims": [8]}] * 2)
        module = MTLModule(model, adaptive_params={"method": "gradnorm"}, **plateau)
        monitor = module.monitor
    seen = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics[monitor]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    lrs = []
    trainer = _trainer(tmp_path, max_epochs=4, val_check_interval=15, check_val_every_n_epoch=None,
                       enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(module, dm)
    assert len(seen) == 40 // 15 and len(lrs) == 40
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05), mode=module.metric_mode(monitor), patience=0, factor=0.5)
    expected = []
    for value in seen:
        reference.step(value)
        expected.append(reference.optimizer.param_groups[0]["lr"])
    # the rate after each validation (read at the next batch's end) is the reference's
    after = [lrs[15 * (k + 1)] for k in range(len(seen)) if 15 * (k + 1) < len(lrs)]
    assert after == expected[: len(after)]
    assert np.isclose(trainer.optimizers[0].param_groups[-1]["lr"], expected[-1])


@pytest.mark.slow
@pytest.mark.parametrize("validation", ["every epoch", "every 15 batches"])
def test_resume_from_a_validation_checkpoint_keeps_the_plateau_step(tmp_path, validation):
    """ModelCheckpoint writes at a validation, before the plateau steps on it: the resumed run
    takes that step (it lost it: 3 plateau steps instead of 4, a higher final rate)."""
    import glob

    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt=None):
        L.seed_everything(0)
        dm = _dm(rows=3200, batch_size=256)
        module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}), optimizer_params={"lr": 0.05},
                           scheduler_fn="ReduceLROnPlateau", scheduler_params={"patience": 0, "factor": 0.5})
        kw = dict(check_val_every_n_epoch=1) if validation == "every epoch" else dict(val_check_interval=15, check_val_every_n_epoch=None)
        checkpoints = ModelCheckpoint(dirpath=str(root), filename="{step}", save_top_k=-1, monitor="val/auc", mode="max")
        trainer = _trainer(root, max_epochs=4, num_sanity_val_steps=0, callbacks=[checkpoints], **kw)
        trainer.fit(module, dm, ckpt_path=ckpt)
        plateau = trainer.lr_scheduler_configs[0].scheduler
        return trainer.optimizers[0].param_groups[-1]["lr"], plateau.state_dict(), module.state_dict()

    lr, plateau, weights = run(tmp_path / "full")
    first = sorted(glob.glob(str(tmp_path / "full" / "step=*.ckpt")), key=lambda p: int(p.rsplit("=", 1)[1][:-5]))[0]
    lr2, plateau2, weights2 = run(tmp_path / "cut", first)
    assert lr2 == lr and plateau2 == plateau
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
