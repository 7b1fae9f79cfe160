"""MTLModule, MTLDataModule, MTLTrainer: every model x weighting trains, ESMM's CVR metric,
early-stopping direction, manual optimisation (schedulers, clipping, checkpoints) and DDP."""

from __future__ import annotations

import itertools
import math
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import Callback, Trainer
from sklearn.metrics import roc_auc_score

from conftest import quiet_trainer_kwargs
from rechub_lightning._mtl_trainer import MTLTrainer
from rechub_lightning.data.mtl import MTLDataModule
from rechub_lightning.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
from rechub_lightning.modules.mtl import MTLModule

METHODS = [None, "uwl", "dwa", "gradnorm", "metabalance", "pcgrad"]
SMALL = {"dims": [8]}
TOWERS = [{"dims": [4]}] * 2


@pytest.fixture(scope="module")
def dm():
    return MTLDataModule(synthetic_rows=1500, batch_size=128, seed=1)


@pytest.fixture(scope="module")
def esmm_dm():
    return MTLDataModule(
        synthetic_rows=1500, batch_size=128, seed=1,
        labels=["income", "marital status", "ctcvr"], derived_labels={"ctcvr": ["income", "marital status"]},
    )


class _Recorder(Callback):
    def __init__(self):
        self.weight_sums, self.grad_norms, self.lrs = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weight_sums.append(float(pl_module.weighting.weights().sum()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


# --------------------------------------------------------------------------- every model x weighting
ROOT = Path(__file__).resolve().parents[1]
MODELS = ["shared_bottom", "mmoe", "ple", "aitm", "esmm"]


def _cli(configs, tmp_path, *extra):
    import lightning as L

    from rechub_lightning.cli import RecHubCLI
    from rechub_lightning.modules.base import RecModule

    args = [a for c in configs for a in ("--config", str(ROOT / "configs" / "mtl" / f"{c}.yaml"))]
    args += ["--data.synthetic_rows=1500", "--data.batch_size=128", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}", *extra]
    return RecHubCLI(RecModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: str(m))
@pytest.mark.parametrize("name", MODELS)
def test_every_model_x_weighting_trains_from_its_config(name, method, tmp_path):
    cli = _cli([name] + ([f"weighting_{method}"] if method else []), tmp_path, "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    module, model = cli.model, cli.model.model
    assert isinstance(module, MTLModule)
    assert module.automatic_optimization is (method not in ("gradnorm", "metabalance", "pcgrad"))
    assert type(module.weighting).__name__ == {
        None: "EqualWeighting", "uwl": "UncertaintyWeighting", "dwa": "DynamicWeightAverage", "gradnorm": "GradNorm",
        "metabalance": "MetaBalance", "pcgrad": "PCGrad",
    }[method]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = _Recorder()
    cli.trainer.callbacks.append(rec)
    cli.trainer.fit(module, cli.datamodule)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    metrics = cli.trainer.callback_metrics
    n = model.n_task
    assert all(math.isfinite(float(metrics[f"train/task_{i}_loss"])) for i in range(n))
    assert all(f"val/task_{i}_auc" in metrics for i in range(n))
    trained = model.trained_tasks or range(n)
    assert all(f"loss_weight/task_{i}" in metrics for i in trained)
    assert "learning_rate" in metrics
    assert cli.trainer.checkpoint_callback.best_model_path  # the config's ModelCheckpoint watched val/task_0_auc
    if method == "gradnorm":
        assert rec.weight_sums == pytest.approx([len(trained)] * 2, abs=1e-5)


def test_predict_returns_probabilities_and_values():
    dm = MTLDataModule(synthetic_rows=800, synthetic_regression=True, batch_size=200)
    model = SharedBottom(schema=dm.schema, task_types=dm.task_types, bottom_params=SMALL, tower_params_list=[{"dims": [4]}] * 3)
    module = MTLModule(model)
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False))
    preds = torch.cat(trainer.predict(module, datamodule=dm))
    assert preds.shape == (len(dm.dataset("test")), 3)
    assert ((preds[:, :2] > 0) & (preds[:, :2] < 1)).all()
    assert preds[:, 2].min() < 0 or preds[:, 2].max() > 1  # raw regression values, not squashed


def test_unknown_or_mismatched_task_types_are_named(dm):
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    with pytest.raises(ValueError, match=r"task_types\[1\]='classfication'"):
        MTLModule(model, task_types=["classification", "classfication"])
    with pytest.raises(ValueError, match="does not match the model"):
        MTLModule(model, task_types=["classification", "regression"])
    with pytest.raises(ValueError, match="earlystop_taskid=2"):
        MTLModule(model, earlystop_taskid=2)
    with pytest.raises(ValueError, match="unknown adaptive method 'gradnrom'"):
        MTLModule(model, adaptive_params={"method": "gradnrom"})
    with pytest.raises(ValueError, match=r"task_types\[0\]='ranking'"):
        MTLDataModule(synthetic_rows=300, task_types=["ranking", "classification"])


def test_monitor_direction_follows_the_task():
    dm = MTLDataModule(synthetic_rows=300, synthetic_regression=True)
    model = MMOE(schema=dm.schema, task_types=dm.task_types, n_expert=2, expert_params=SMALL, tower_params_list=[{"dims": [4]}] * 3)
    assert (MTLModule(model).monitor, MTLModule(model).monitor_mode) == ("val/task_0_auc", "max")
    m = MTLModule(model, earlystop_taskid=2)
    assert (m.monitor, m.monitor_mode) == ("val/task_2_mse", "min")


def test_uwl_log_variances_have_their_own_group_without_weight_decay(dm):
    module = MTLModule(MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS), adaptive_params={"method": "uwl"})
    opt = module.build_optimizer()
    assert opt.param_groups[-1]["params"] == [module.weighting.log_vars]
    assert opt.param_groups[-1]["weight_decay"] == 0.0
    assert all(module.weighting.log_vars is not p for p in opt.param_groups[0]["params"])


def test_manual_gradients_include_auxiliary_and_regularisation(dm):
    """GradNorm's first step uses weights 1: .grad must equal the gradient of sum(L_i) + calibrator + L2."""
    torch.manual_seed(0)
    model = AITM(schema=dm.schema, n_task=2, bottom_params=SMALL, tower_params_list=TOWERS, calibrator_weight=5.0)
    module = MTLModule(model, adaptive_params={"method": "gradnorm"}, regularization_params={"dense_l2": 0.1})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model.eval()  # same forward twice
    out, losses, extra = module.compute_losses(batch)
    expected = torch.autograd.grad(sum(losses) + extra, list(model.parameters()), allow_unused=True)
    out, losses, extra = module.compute_losses(batch)
    module.manual_gradients(module.trained_losses(losses), extra)
    for (name, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g, msg=name, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- ESMM
def _funnel_frame(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 8, n), rng.integers(0, 6, n)
    click = (rng.random(n) < 0.2 + 0.08 * a).astype(int)
    buy = (click * (rng.random(n) < 0.1 + 0.12 * b)).astype(int)
    return pd.DataFrame({"a": a, "b": b, "click": click, "purchase": buy})


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "DataParallel"])
def test_esmm_cvr_auc_is_computed_on_clicked_rows(wrap):
    dm = MTLDataModule(
        data=_funnel_frame(), labels=["purchase", "click", "ctcvr"], derived_labels={"ctcvr": ["click", "purchase"]},
        sparse_features=["a", "b"], split_ratio=(0.5, 0.5), batch_size=128,
    )
    esmm = ESMM(schema=dm.schema, cvr_params=SMALL, ctr_params=SMALL)
    module = MTLModule(torch.nn.DataParallel(esmm) if wrap else esmm, task_types=["classification"] * 3)
    trainer = Trainer(max_epochs=2, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    logged = trainer.validate(module, dm, verbose=False)[0]
    esmm.eval()
    with torch.no_grad():
        p, y = zip(*[(torch.sigmoid(esmm(x)), yy) for x, yy in dm.val_dataloader()])
    p, y = torch.cat(p).numpy(), torch.cat(y).numpy()
    clicked = y[:, 1] == 1
    on_clicks = roc_auc_score(y[clicked, 0], p[clicked, 0])
    on_all = roc_auc_score(y[:, 0], p[:, 0])
    assert abs(on_clicks - on_all) > 0.01  # the batch is one where the choice matters
    assert logged["val/task_0_auc"] == pytest.approx(on_clicks, abs=1e-6)
    assert logged["val/task_1_auc"] == pytest.approx(roc_auc_score(y[:, 1], p[:, 1]), abs=1e-6)
    facade = MTLTrainer(esmm, ["classification"] * 3, n_epoch=1)
    assert facade.evaluate(esmm, dm.val_dataloader())[0] == pytest.approx(on_clicks, abs=1e-6)


def test_esmm_trains_ctr_and_ctcvr_losses_only(esmm_dm):
    esmm = ESMM(schema=esmm_dm.schema, cvr_params=SMALL, ctr_params=SMALL)
    module = MTLModule(esmm)
    assert module.trained_tasks == (1, 2) and module.weighting.n_tasks == 2
    esmm_dm.setup("fit")
    batch = next(iter(esmm_dm.train_dataloader()))
    out, losses, _ = module.compute_losses(batch)
    torch.testing.assert_close(module.weighting(module.trained_losses(losses)), (losses[1] + losses[2]) / 2)


# --------------------------------------------------------------------------- early stopping and the facade
def test_regression_earlystop_keeps_lowest_mse_and_fit_returns_epoch_log(tmp_path):
    dm = MTLDataModule(synthetic_rows=1200, synthetic_regression=True, batch_size=128, seed=3)
    dm.setup("fit")
    torch.manual_seed(0)
    model = SharedBottom(schema=dm.schema, task_types=dm.task_types, bottom_params=SMALL, tower_params_list=[{"dims": [4]}] * 3)
    trainer = MTLTrainer(
        model, dm.task_types, optimizer_params={"lr": 0.02}, n_epoch=3, earlystop_taskid=2, earlystop_patience=3,
        model_path=str(tmp_path), trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False},
    )
    log = trainer.fit(dm.train_dataloader(), dm.val_dataloader(), mode="reg", seed=7)
    assert len(log) == 3 and all(len(row) == 6 and all(math.isfinite(v) for v in row) for row in log)
    mses = [row[5] for row in log]
    assert min(mses) < max(mses)
    assert trainer.module.monitor_mode == "min"
    scores = trainer.evaluate(trainer.model, dm.val_dataloader())
    assert scores[2] == pytest.approx(min(mses), rel=1e-4)
    assert scores[0] == pytest.approx(log[int(np.argmin(mses))][3], abs=1e-5)
    saved = torch.load(tmp_path / "model_reg_7.pth", weights_only=True)
    assert all(torch.equal(saved[k], v.cpu()) for k, v in trainer.model.state_dict().items())
    preds = trainer.predict(trainer.model, dm.val_dataloader())
    assert len(preds) == len(dm.dataset("val")) and len(preds[0]) == 3


def test_facade_train_one_epoch_with_manual_weighting(dm):
    dm.setup("fit")
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    trainer = MTLTrainer(model, ["classification"] * 2, adaptive_params={"method": "metabalance"}, trainer_kwargs={"gradient_clip_val": 1.0})
    assert trainer.module.gradient_clip_val == 1.0 and "gradient_clip_val" not in trainer.trainer_kwargs
    batches = list(itertools.islice(iter(dm.train_dataloader()), 4))
    first = trainer.train_one_epoch(batches, log_interval=0)
    second = trainer.train_one_epoch(batches, log_interval=0)
    assert len(first) == 2 and sum(second) < sum(first)


# --------------------------------------------------------------------------- manual optimisation
def test_reduce_lr_on_plateau_and_clipping_with_manual_optimisation(dm):
    model = PLE(schema=dm.schema, n_expert_specific=1, n_expert_shared=1, expert_params=SMALL, tower_params_list=TOWERS)
    module = MTLModule(
        model, adaptive_params={"method": "pcgrad"}, optimizer_params={"lr": 0.01},
        scheduler_fn="torch.optim.lr_scheduler.ReduceLROnPlateau",
        scheduler_params={"mode": "max", "factor": 0.5, "patience": 0, "threshold": 10.0, "threshold_mode": "abs"},
        gradient_clip_val=1e-3,
    )
    rec = _Recorder()
    trainer = Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=2, callbacks=[rec], **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    # never "improves" by 10 AUC points: halved after epochs 2 and 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)
    assert rec.grad_norms and max(rec.grad_norms) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("method,algorithm", [(None, "norm"), ("uwl", "value"), ("gradnorm", "norm")])
def test_clipping_with_sparse_embedding_gradients_equals_dense(dm, method, algorithm):
    """Clipping (the module's ``gradient_clip_val``) covers row-wise embedding gradients: sparse and
    dense SGD (equal updates) give the same weights, with the clip engaged (it failed on sparse
    gradients). GradNorm trains dense embeddings, where the same clipping runs."""

    def run(sparse):
        torch.manual_seed(0)
        model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
        module = MTLModule(
            model, adaptive_params={"method": method} if method else None, optimizer_fn="torch.optim.SGD",
            optimizer_params={"lr": 0.5}, sparse_embeddings=sparse and method != "gradnorm", embedding_optimizer="sgd",
            gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm,
        )
        Trainer(max_steps=3, limit_val_batches=0, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)
        return model.state_dict()

    sparse, dense = run(True), run(False)
    assert sparse.keys() == dense.keys()
    for k in sparse:
        torch.testing.assert_close(sparse[k], dense[k], rtol=1e-5, atol=1e-7, msg=k)
    torch.manual_seed(0)
    unclipped = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    Trainer(max_steps=3, limit_val_batches=0, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(
        MTLModule(unclipped, adaptive_params={"method": method} if method else None, optimizer_fn="torch.optim.SGD",
                  optimizer_params={"lr": 0.5}, sparse_embeddings=False), dm)
    assert any(not torch.allclose(unclipped.state_dict()[k], dense[k]) for k in dense)  # the clip did something


def test_mtl_trainer_epoch_loop_clips_sparse_gradients(dm):
    """``MTLTrainer.train_one_epoch`` clips sparse embedding gradients too (torch's clip_grad_* cannot)."""
    weights = []
    for sparse in (True, False):
        torch.manual_seed(0)
        model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
        trainer = MTLTrainer(model, ["classification"] * 2, optimizer_fn=torch.optim.SGD, optimizer_params={"lr": 0.5},
                             sparse_embeddings=sparse, embedding_optimizer="sgd", trainer_kwargs={"gradient_clip_val": 1e-3})
        trainer.train_one_epoch(dm.train_dataloader())
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("method", [None, "pcgrad"])
def test_reduce_lr_on_plateau_with_validation_every_other_epoch(dm, method):
    """check_val_every_n_epoch=2: the plateau steps after the validated epochs only (it failed after
    the first epoch, automatic and manual optimisation alike, asking for a scheduler_monitor)."""
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    module = MTLModule(
        model, adaptive_params={"method": method} if method else None, optimizer_params={"lr": 0.01},
        scheduler_fn="torch.optim.lr_scheduler.ReduceLROnPlateau",
        scheduler_params={"mode": "max", "factor": 0.5, "patience": 0, "threshold": 10.0, "threshold_mode": "abs"},
    )
    trainer = Trainer(max_epochs=4, check_val_every_n_epoch=2, limit_train_batches=2, limit_val_batches=2,
                      **quiet_trainer_kwargs(enable_checkpointing=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ReduceLROnPlateau conditioned on metric.*")
        trainer.fit(module, dm)
    # two plateau steps (after epochs 2 and 4): the first sets the best value, the second never beats it by 10
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)
    # a monitor that is never logged is still an error when every epoch validates
    module = MTLModule(MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS),
                       adaptive_params={"method": method} if method else None,
                       scheduler_fn="torch.optim.lr_scheduler.ReduceLROnPlateau", scheduler_monitor="val/typo")
    with pytest.raises(Exception, match="val/typo"):
        Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)


def test_step_scheduler_is_stepped_by_the_module(dm):
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    module = MTLModule(
        model, adaptive_params={"method": "gradnorm"}, optimizer_params={"lr": 0.01},
        scheduler_fn="torch.optim.lr_scheduler.StepLR", scheduler_params={"step_size": 2, "gamma": 0.1}, scheduler_interval="step",
    )
    trainer = Trainer(max_steps=5, limit_val_batches=0, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.1**2)


def test_metabalance_state_is_checkpointed(dm, tmp_path):
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    module = MTLModule(model, adaptive_params={"method": "metabalance", "target_task": 1})
    trainer = Trainer(max_steps=4, limit_val_batches=1, default_root_dir=str(tmp_path), **quiet_trainer_kwargs())
    trainer.fit(module, dm)
    ema = module.weighting.norm_ema
    assert ema.shape == (len(model.shared_parameters()), 2) and bool((ema > 0).any())
    path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["weighting.norm_ema"], ema)
    restored = MTLModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert torch.equal(restored.weighting.norm_ema, ema) and restored.weighting.target_task == 1
    assert type(restored.model) is MMOE


def test_fp16_is_refused_with_manual_weighting(dm):
    module = MTLModule(MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS), adaptive_params={"method": "pcgrad"})
    module.trainer = type("T", (), {"precision": "16-mixed", "datamodule": None})()  # the check only reads these
    with pytest.raises(ValueError, match="fp16"):
        module.on_fit_start()


# --------------------------------------------------------------------------- data
def test_synthetic_default_and_regression_option():
    dm = MTLDataModule(synthetic_rows=600, batch_size=100)
    assert dm.labels == ["income", "marital status"] and dm.task_types == ["classification"] * 2
    assert "marital status" not in dm.schema and "income" not in dm.schema  # labels never leak into features
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert y.shape == (100, 2) and y.dtype == torch.float32
    reg = MTLDataModule(synthetic_rows=600, synthetic_regression=True)
    assert reg.labels[-1] == "log income" and reg.task_types == ["classification", "classification", "regression"]


@pytest.mark.parametrize(
    "folder,train,val,labels,kw,n_sparse,n_dense",
    [
        ("census-income", "census_income_train_sample.csv", "census_income_val_sample.csv", ["income", "marital status"], {}, 32, 7),
        ("ali-ccp", "ali_ccp_train_sample.csv", "ali_ccp_val_sample.csv", ["purchase", "click", "ctcvr"],
         {"derived_labels": {"ctcvr": ["click", "purchase"]}}, 23, 8),
        ("aliexpress", "aliexpress_train_sample.csv", None, ["click", "conversion"], {"ignore_columns": ["search_id"]}, 19, 60),
    ],
)
def test_reference_samples_parse_and_train(samples, folder, train, val, labels, kw, n_sparse, n_dense):
    d = samples / folder
    dm = MTLDataModule(
        path=str(d / train), val_path=str(d / val) if val else None, labels=labels, batch_size=32,
        split_ratio=(0.8, 0.2), **kw,
    )
    assert (len(dm.schema.sparse), len(dm.schema.dense)) == (n_sparse, n_dense)
    assert dm.task_types == ["classification"] * len(labels)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert y.shape[1] == len(labels)
    model = ESMM(schema=dm.schema, cvr_params=SMALL, ctr_params=SMALL) if len(labels) == 3 else MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(MTLModule(model), dm)


def test_labels_required_for_files_and_derived_sources_checked(tmp_path):
    path = tmp_path / "t.csv"
    _funnel_frame(50).to_csv(path, index=False)
    with pytest.raises(ValueError, match="labels is required"):
        MTLDataModule(path=str(path))
    with pytest.raises(KeyError, match="needs column"):
        MTLDataModule(path=str(path), labels=["click", "x"], derived_labels={"x": ["click", "nope"]})
    with pytest.raises(ValueError, match="task_types has 1 entries for 2 labels"):
        MTLDataModule(path=str(path), labels=["click", "purchase"], task_types=["classification"])


# --------------------------------------------------------------------------- CLI
def test_cli_smoke_run(tmp_path):
    from rechub_lightning.cli import main

    main([
        "fit", "--config", str(ROOT / "configs/mtl/mmoe.yaml"), "--config", str(ROOT / "configs/mtl/weighting_gradnorm.yaml"),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--data.synthetic_rows=1500", "--data.batch_size=128", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
    ])
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    module = MTLModule.load_from_checkpoint(str(ckpts[0]), map_location="cpu", weights_only=True)
    assert module.weighting.requires_manual and type(module.model) is MMOE


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DumpState(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        torch.save({"params": params, "weighting": pl_module.weighting.state_dict(), "weights": pl_module.weighting.weights(),
                    "steps": trainer.global_step}, self.path / f"{trainer.global_rank}.pt")


def _ddp_worker(rank: int, out: str, port: int, methods: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    dm = MTLDataModule(synthetic_rows=3000, batch_size=48, seed=5)
    for method in methods:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
        module = MTLModule(model, adaptive_params={"method": method})
        path = Path(out) / method
        path.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=20, limit_val_batches=0, callbacks=[_DumpState(path)],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, dm)


@pytest.mark.slow
def test_ddp_two_processes_stay_bitwise_identical(tmp_path):
    """Parameters and weighting state equal bit for bit on both ranks after 20 steps.

    One pair of processes runs every method (Lightning's ``ddp`` strategy inside processes we
    launch, as under torchrun), which is the ``ddp_spawn`` set-up without a spawn per method.
    """
    methods = ["gradnorm", "metabalance", "pcgrad", "uwl"]
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), _free_port(), methods), nprocs=2, join=True)
    for method in methods:
        r0 = torch.load(tmp_path / method / "0.pt", weights_only=True)
        r1 = torch.load(tmp_path / method / "1.pt", weights_only=True)
        assert r0["steps"] == r1["steps"] == 20
        for name, p in r0["params"].items():
            assert torch.equal(p, r1["params"][name]), f"{method}: {name} differs across ranks"
        for name, t in r0["weighting"].items():
            assert torch.equal(t, r1["weighting"][name]), f"{method}: weighting {name} differs across ranks"
        assert torch.equal(r0["weights"], r1["weights"])
        if method == "gradnorm":
            assert r0["weights"].sum() == pytest.approx(2.0, abs=1e-5) and not torch.equal(r0["weights"], torch.ones(2))
        if method == "uwl":
            assert not torch.equal(r0["weighting"]["log_vars"], torch.zeros(2))


# --------------------------------------------------------------------------- foreign models
def test_reference_model_object_trains_with_probabilities(dm):
    """A Torch-RecHub model (probabilities out, no parameter split) trains with the plain and
    automatic weightings; manual ones are refused with a message naming what is missing."""
    rf = pytest.importorskip("torch_rechub.basic.features")
    from torch_rechub.models.multi_task import MMOE as RefMMOE

    feats = [rf.SparseFeature(f.name, f.vocab_size, embed_dim=f.embed_dim) for f in dm.schema.sparse]
    feats += [rf.DenseFeature(f.name) for f in dm.schema.dense]
    ref = RefMMOE(feats, ["classification", "classification"], 2, SMALL, TOWERS)
    with pytest.raises(ValueError, match="lacks.*shared_parameters"):
        MTLModule(ref, adaptive_params={"method": "gradnorm"})
    module = MTLModule(ref, adaptive_params={"method": "uwl"})
    assert not module.logits_out
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    assert 0.0 <= float(trainer.callback_metrics["val/task_1_auc"]) <= 1.0
    preds = module.predict_step(next(iter(dm.val_dataloader()))[0], 0)
    assert ((preds >= 0) & (preds <= 1)).all()


@pytest.mark.parametrize("method", [None, "gradnorm"])
def test_training_throughput_is_logged(dm, method):
    """``train/rows_per_sec`` as for the other modules (MTL's epoch-end hook skipped the base one)."""
    model = MMOE(schema=dm.schema, n_expert=2, expert_params=SMALL, tower_params_list=TOWERS)
    module = MTLModule(model, adaptive_params={"method": method} if method else None)
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    assert module._epoch_clock[1] == 3 * dm.batch_size  # the rows of the three batches
    assert float(trainer.callback_metrics["train/rows_per_sec"]) > 0


def test_a_monitor_naming_a_score_the_task_does_not_have_fails_before_training():
    """configs/mtl/*.yaml watch val/task_0_auc; with task 0 a regression task (val/task_0_mse) the
    run failed after its first epoch. Now before the first step, naming the metrics there are."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from rechub_lightning import MTLModule
    from rechub_lightning.data import MTLDataModule
    from rechub_lightning.models.multi_task import SharedBottom

    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"u": [f"u{i}" for i in rng.integers(0, 20, n)], "dwell": rng.random(n) * 30,
                       "click": rng.integers(0, 2, n)})
    dm = MTLDataModule(data=df, labels=["dwell", "click"], batch_size=64)
    module = MTLModule(SharedBottom(schema=dm.schema, task_types=["regression", "classification"],
                                    bottom_params={"dims": [8]}, tower_params_list=[{"dims": [4]}] * 2))
    trained = []
    module.on_train_batch_start = lambda *a: trained.append(1)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[EarlyStopping(monitor="val/task_0_auc", mode="max")])
    with pytest.raises(ValueError, match=r"monitors 'val/task_0_auc'.*regression task, scored as 'val/task_0_mse'"):
        trainer.fit(module, dm)
    assert not trained
