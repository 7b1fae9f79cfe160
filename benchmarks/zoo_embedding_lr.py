"""Zoo-wide study: the lazy embedding optimizer's learning rate, across every shipped config.

    python -m benchmarks.zoo_embedding_lr                         # every config, scales 1 3, seeds 0 1
    python -m benchmarks.zoo_embedding_lr --configs configs/ctr/deepfm.yaml --scales 1 2 3 --seeds 0
    python -m benchmarks.zoo_embedding_lr --configs configs/match/mind.yaml --temperatures 0.05 0.2 1

``--temperatures`` sweeps a matching model's ``temperature`` instead (tables at scale 1).

Each run is one ``configs/<family>/<model>.yaml`` as a user runs it (``rechub fit``: its data,
early stopping and best-checkpoint callbacks), with sparse embedding gradients (the CPU
default) and the embedding tables' ``SparseAdam`` rate set to ``scale x`` the config's dense
learning rate; then ``test`` on the best checkpoint. Reported: the config's monitored
validation metric at the best epoch and the same metric on the test split, per (config,
scale, seed), and per config the mean change of the test metric over seeds against scale 1.
Each run is its own subprocess (1 torch thread unless ``BENCH_THREADS``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from typing import Any

from ._common import child_result, machine, run_child, write_json


def run_one(config: str, scale: float, seed: int, temperature: float | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    from rechub_lightning.cli import RecHubCLI
    from rechub_lightning.modules.base import RecModule

    import lightning as L

    root = tempfile.mkdtemp(prefix="zoo_lr_")
    args = [
        "--config", config,
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", root,
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.init_args.sparse_embeddings", "true",
    ]
    if temperature is not None:
        args += ["--model.init_args.model.init_args.temperature", str(temperature)]
    t0 = time.perf_counter()
    cli = RecHubCLI(RecModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    # the config's (and its overrides') dense rate, as the module resolved it; read at configure_optimizers
    lr = float(module.optimizer_params.get("lr", 1e-3))
    module.embedding_optimizer_params["lr"] = scale * lr
    trainer.fit(module, datamodule=dm)
    cb = trainer.checkpoint_callback
    monitor = cb.monitor
    best_val = float(cb.best_model_score)
    tested = trainer.test(module, datamodule=dm, ckpt_path="best", verbose=False)[0]
    test_key = "test/" + monitor.split("/", 1)[1]
    out = {
        "config": config,
        "scale": scale,
        "temperature": temperature,
        "lr": lr,
        "seed": seed,
        "monitor": monitor,
        "best_val": best_val,
        "test": float(tested[test_key]),
        "epochs": trainer.current_epoch,
        "best_epoch": int(torch.load(cb.best_model_path, map_location="cpu", weights_only=True)["epoch"]),
        "seconds": time.perf_counter() - t0,
    }
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=None, help="default: every configs/{ctr,mtl,match}/*.yaml")
    p.add_argument("--scales", nargs="*", type=float, default=[1.0, 3.0])
    p.add_argument("--temperatures", nargs="*", type=float, default=None,
                   help="sweep the model's temperature instead of the embedding rate (matching configs)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        t = None if a._child[3] == "none" else float(a._child[3])
        child_result(run_one(a._child[0], float(a._child[1]), int(a._child[2]), t))
        return
    # (embedding-rate scale, temperature) per variant; the first is the baseline
    variants = [(1.0, t) for t in a.temperatures] if a.temperatures else [(s, None) for s in a.scales]
    configs = a.configs or sorted(
        c for fam in ("ctr", "mtl", "match") for c in glob.glob(f"configs/{fam}/*.yaml")
        if not os.path.basename(c).startswith("weighting_")
    )
    print(f"# machine: {machine()}")
    rows = []
    for config in configs:
        by_variant: dict[tuple[float, float | None], list[float]] = {}
        for scale, temperature in variants:
            name = f"scale {scale:<4g}" if temperature is None else f"temperature {temperature:<4g}"
            for seed in a.seeds:
                r = run_child("benchmarks.zoo_embedding_lr", config, scale, seed, "none" if temperature is None else temperature)
                if r is None:
                    continue
                rows.append(r)
                by_variant.setdefault((scale, temperature), []).append(r["test"])
                print(
                    f"{config:34s} {name} seed {seed}  {r['monitor']:>16s} val {r['best_val']:.4f}"
                    f"  test {r['test']:.4f}  epochs {r['epochs']} (best {r.get('best_epoch')})  {r['seconds']:.0f}s",
                    flush=True,
                )
        base = by_variant.get(variants[0])
        for v in variants[1:]:
            if base and by_variant.get(v) and len(by_variant[v]) == len(base):
                d = sum(x - y for x, y in zip(by_variant[v], base)) / len(base)
                print(f"{config:34s} {v} vs {variants[0]}: mean test change {d:+.4f}", flush=True)
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
