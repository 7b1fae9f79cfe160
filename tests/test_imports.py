"""Scoring code (features, models, metrics, export, retrieval) imports without Lightning and
torchmetrics; the trainers, modules and Metric classes still load by their public names."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_scoring_imports_leave_lightning_and_torchmetrics_unloaded():
    loaded = _run(
        """
        import sys
        import rechub_lightning
        from rechub_lightning import SparseFeature, DenseFeature, SequenceFeature
        from rechub_lightning.metrics import auc_score, gauc_score, topk_metrics, diversity_score
        from rechub_lightning.models.ranking import DeepFM
        from rechub_lightning.models.matching import DSSM
        from rechub_lightning.models.multi_task import MMOE
        from rechub_lightning.export import export_onnx
        from rechub_lightning.retrieval import topk_search
        print(sorted(m for m in ("lightning", "torchmetrics", "pytorch_lightning") if m in sys.modules))
        """
    )
    assert loaded == "[]"


def test_lazy_public_names_resolve_to_the_defining_modules():
    out = _run(
        """
        import rechub_lightning as rl
        from rechub_lightning import CTRTrainer, MTLModule
        from rechub_lightning.metrics import BinaryAUC, RetrievalTopK
        import rechub_lightning.metrics as m
        from rechub_lightning.trainers import CTRTrainer as T
        from rechub_lightning.modules.mtl import MTLModule as M
        from rechub_lightning._metric_states import BinaryAUC as B
        assert CTRTrainer is T and MTLModule is M and BinaryAUC is B and m.RetrievalTopK is RetrievalTopK
        assert {"CTRTrainer", "MatchModule"} <= set(dir(rl)) and set(rl.__all__) <= set(dir(rl))
        for bad in (lambda: rl.NoSuchThing, lambda: m.NoSuchMetric):
            try:
                bad()
            except AttributeError as e:
                print(e)
        """
    )
    assert "NoSuchThing" in out and "NoSuchMetric" in out


def test_every_module_imports_first_without_an_import_cycle():
    """Each module imported first in a fresh interpreter (forked after the third-party imports)."""
    out = _run(
        """
        import importlib, os, pathlib, sys, traceback
        import lightning, numpy, pandas, sklearn, torch, torchmetrics  # noqa: F401  (shared, not ours)
        import rechub_lightning
        root = pathlib.Path(rechub_lightning.__file__).parent
        names = sorted(
            "rechub_lightning." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for p in root.rglob("*.py")
        )
        for m in [m for m in sys.modules if m.startswith("rechub_lightning")]:
            del sys.modules[m]
        failed, running = [], {}
        for name in names + [None, None]:  # two children at a time (two cores)
            if len(running) == 2 or (name is None and running):
                pid, status = os.wait()
                if status != 0:
                    failed.append(running[pid])
                del running[pid]
            if name is None:
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            running[pid] = name
        failed.sort()
        print(len(names), failed)
        """
    )
    count, failed = out.splitlines()[-1].split(" ", 1)
    assert int(count) > 40 and failed == "[]", out
