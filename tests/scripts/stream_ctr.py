"""Out-of-core training under a memory cap: `python stream_ctr.py prepare|stream|memory OUT`.

prepare: write Criteo-shaped train/val Parquet files with many row groups; the cap on the
training process' RSS growth is a third of the training rows' decoded (pandas/numpy) size.
stream: one epoch of DeepFM streaming from the files; peak RSS (VmHWM) growth over the RSS
measured right after imports must stay under the cap. memory: the same epoch with the files
loaded in memory (the reference validation AUC).
"""

import json
import os
import sys

mode, out = sys.argv[1], sys.argv[2]
ROWS, VAL_ROWS, ROW_GROUP = int(os.environ.get("STREAM_ROWS", 1_200_000)), 50_000, 10_000
SPARSE = [f"C{i}" for i in range(1, 27)]
DENSE = [f"I{i}" for i in range(1, 14)]


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


if mode == "prepare":
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rechub_lightning.data import make_criteo_like

    df = make_criteo_like(n_rows=ROWS + VAL_ROWS, max_vocab=2000, seed=11)
    train, val = df.iloc[:ROWS], df.iloc[ROWS:]
    pq.write_table(pa.Table.from_pandas(train, preserve_index=False), os.path.join(out, "train.parquet"), row_group_size=ROW_GROUP)
    pq.write_table(pa.Table.from_pandas(val, preserve_index=False), os.path.join(out, "val.parquet"), row_group_size=ROW_GROUP)
    decoded = int(train.memory_usage(index=False, deep=True).sum())
    json.dump({"decoded_bytes": decoded, "cap_bytes": decoded // 3, "train_rows": len(train)}, open(os.path.join(out, "prepare.json"), "w"))
    sys.exit(0)

import torch  # noqa: E402
from lightning import Callback, Trainer, seed_everything  # noqa: E402

from rechub_lightning import CTRModule  # noqa: E402
from rechub_lightning.data import CTRDataModule  # noqa: E402
from rechub_lightning.models.ranking import DeepFM  # noqa: E402

torch.set_num_threads(1)
import pyarrow  # noqa: E402  (imports belong to the baseline, not to the data)
import pyarrow.parquet  # noqa: E402,F401

pyarrow.set_memory_pool(pyarrow.system_memory_pool())  # freed Arrow buffers go back to the OS allocator

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False, num_sanity_val_steps=0)
# Warm-up: a 2-step fit on a tiny in-memory data set loads every module Lightning imports lazily
# during fit (code is resident memory too); then the peak is reset and the baseline taken.
tiny = CTRDataModule(synthetic_rows=600, synthetic_max_vocab=50, batch_size=256)
Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, **QUIET).fit(
    CTRModule(DeepFM(schema=tiny.schema, mlp_params={"dims": [8]})), tiny)
del tiny
import gc  # noqa: E402

gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
baseline = status("VmRSS")


class Count(Callback):
    rows = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Count.rows += len(batch[1])


dm = CTRDataModule(
    path=os.path.join(out, "train.parquet"), val_path=os.path.join(out, "val.parquet"), sparse_features=SPARSE,
    dense_features=DENSE, dense_scaling="log", batch_size=2048, eval_batch_size=2048, streaming=mode == "stream",
    shuffle_buffer=2, seed=3,
)
seed_everything(0)
module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [32]}), optimizer_params={"lr": 3e-3})
trainer = Trainer(max_epochs=1, callbacks=[Count()], **QUIET)
trainer.fit(module, dm)
peak = status("VmHWM")
json.dump(
    {
        "val_auc": float(trainer.callback_metrics["val/auc"]),
            "rss_growth_bytes": peak - baseline,
        "baseline_bytes": baseline,
        "rows_trained": Count.rows,
    },
    open(os.path.join(out, f"{mode}.json"), "w"),
)
