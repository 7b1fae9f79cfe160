"""Training steps do not read device values on the host (each read is a synchronisation that
stalls an asynchronous GPU pipeline). Counted on the CPU: ``Tensor.item``/``tolist``/``bool``/
``int``/``float`` called by rechub_lightning code between a step's start and its end. (PCGrad
reads its step counter once per step to seed its task order; not tested here.)"""

import traceback

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule, MatchModule, MTLModule
from rechub_lightning.data import CTRDataModule, MatchDataModule, MTLDataModule
from rechub_lightning.models.matching import DSSM, YoutubeDNN
from rechub_lightning.models.multi_task import MMOE
from rechub_lightning.models.ranking import DeepFM

_READS = ("item", "tolist", "__bool__", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    reads, active = [], [False]

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if active[0]:
                caller = traceback.extract_stack(limit=2)[0]  # who read the value (torch's own
                # optimizers read their CPU step counters: not a device read)
                if "/rechub_lightning/" in caller.filename:
                    reads.append(f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}")
            return orig(self, *args, **kwargs)

        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))

    class Steps(Callback):
        def on_train_batch_start(self, *args):
            active[0] = True

        def on_train_batch_end(self, *args):
            active[0] = False

    return reads, Steps()


def _fit(module, dm, steps_cb):
    Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[steps_cb],
            **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)


def test_ctr_and_matching_steps(host_reads):
    reads, steps = host_reads
    ctr = CTRDataModule(synthetic_rows=2000, synthetic_max_vocab=200, batch_size=256)
    _fit(CTRModule(DeepFM(schema=ctr.schema, mlp_params={"dims": [8]})), ctr, steps)
    small = dict(synthetic_users=80, synthetic_items=150, synthetic_interactions=(8, 16), batch_size=64, embed_dim=8)
    in_batch = MatchDataModule(neg_ratio=0, **small)
    _fit(MatchModule(DSSM(user_params={"dims": [8]}, item_params={"dims": [8]}, temperature=0.1, schema=in_batch.schema),
                     in_batch_neg=True, logq_correction=True, mask_accidental_hits=True), in_batch, steps)
    list_wise = MatchDataModule(mode=2, neg_ratio=3, **small)
    _fit(MatchModule(YoutubeDNN(user_params={"dims": [8]}, schema=list_wise.schema), mode=2), list_wise, steps)
    assert not reads, reads


@pytest.mark.parametrize("method", [None, "uwl", "dwa", "gradnorm", "metabalance"])
def test_multi_task_steps(host_reads, method):
    reads, steps = host_reads
    dm = MTLDataModule(synthetic_rows=1500, batch_size=256)
    _fit(MTLModule(MMOE(schema=dm.schema), adaptive_params={"method": method} if method else None), dm, steps)
    assert not reads, reads
