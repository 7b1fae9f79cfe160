"""The ``rechub`` command: LightningCLI over our modules and datamodules.

``rechub fit|validate|test|predict --config configs/<family>/<model>.yaml``. The config
names the LightningModule (``CTRModule``, ...), its network and the datamodule; the
datamodule's feature schema is linked into the network's ``schema`` argument, so
configs never repeat vocabulary sizes. For ``validate``/``test``/``predict`` with
``--ckpt_path``, the datamodule reuses the preprocessing fitted at training time.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import sys
import warnings
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint import AtomicCheckpointIO
from .modules.base import RecModule
from .modules.match import MatchModule
from .prediction import MatchPredictionWriter, PredictionWriter

__all__ = ["RecHubCLI", "main"]

log = logging.getLogger("rechub_lightning")


class RecHubCLI(LightningCLI):
    """LightningCLI with the schema link and checkpoint-aware preprocessing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cli_args = kwargs.get("args")  # what this command line says (None: sys.argv)
        # Our modules build their optimizers (sparse embedding groups, schedulers, manual MTL
        # steps): LightningCLI's --optimizer/--lr_scheduler would replace configure_optimizers
        # (and fail on sparse gradients at the first step) or be ignored. The module's
        # optimizer_fn/optimizer_params/scheduler_fn/scheduler_params say it instead.
        kwargs.setdefault("auto_configure_optimizers", False)
        self._resume_from: str | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.schema", "model.init_args.model.init_args.schema", apply_on="instantiate")
        parser.add_argument(
            "--predict_output",
            type=Optional[str],
            default=None,
            help=(
                "predict only: file for the predictions (.csv or .parquet); default <default_root_dir>/predictions.csv. "
                "Matching models write three tables: a file name is a prefix (preds.parquet -> "
                "preds_user_embeddings.parquet, preds_item_embeddings.parquet, preds_topk.parquet), anything else "
                "a directory (out/ -> out/user_embeddings.csv, out/item_embeddings.csv, out/topk.csv)"
            ),
        )
        parser.add_argument(
            "--predict_top_k",
            type=int,
            default=10,
            help="predict only, matching models: items per user in the top-K table",
        )
        parser.add_argument(
            "--predict_id_columns",
            type=list[str],
            default=[],
            help="predict only: raw input columns copied next to the predictions (e.g. [user_id])",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            if "Union subtypes" in str(e):
                self._reraise_data_error()
            raise

    def _reraise_data_error(self) -> None:
        """Re-raise a datamodule's own ``__init__`` error.

        ``data`` is optional, so jsonargparse reports a datamodule that raised (a NaN label,
        an unknown column, ...) as "Does not validate against any of the Union subtypes" with
        the cause as one line among several. Building it again raises the cause itself.
        """
        cfg = self.config.get(self.config.get("subcommand")) if self.config.get("subcommand") else self.config
        data = cfg.get("data") if cfg is not None else None
        class_path = data.get("class_path") if data is not None else None
        if not class_path:
            return
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        init_args = data.get("init_args")
        try:
            cls(**(init_args.as_dict() if init_args is not None else {}))
        except Exception as cause:
            raise cause from None  # the cause alone, without jsonargparse's traceback around it

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Torn checkpoints are impossible with an atomic write (unless the user chose a CheckpointIO).
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self._resume_from:
            _continue_run_folder(trainer, self._resume_from)
        # CSV logs always (what `rechub report` reads), next to TensorBoard when it is installed,
        # in the same run folder as the first logger's.
        if trainer.loggers and not any(isinstance(lg, CSVLogger) for lg in trainer.loggers):
            first = trainer.loggers[0]
            save_dir = getattr(first, "save_dir", None) or trainer.default_root_dir
            trainer.loggers = [*trainer.loggers, CSVLogger(save_dir=save_dir, name=first.name or "lightning_logs", version=first.version)]
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                # Create the run's folder now (rank 0): LightningCLI writes config.yaml into it before
                # the first metric, and a CSV writer created after that warns that the new folder
                # "exists and is not empty" (it still does for a folder an earlier run filled).
                if self._resume_from and rank_zero_only.rank == 0:
                    _keep_csv_history(lg, self._resume_from)
                else:
                    _ = lg.experiment
        return trainer

    def before_predict(self) -> None:
        if any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            return
        cfg = self.config[self.config.subcommand]
        output = cfg.get("predict_output") or os.path.join(self.trainer.default_root_dir, "predictions.csv")
        if isinstance(self.model, MatchModule):
            top_k = cfg.get("predict_top_k")
            top_k = 10 if top_k is None else top_k
            self.trainer.callbacks.append(MatchPredictionWriter(output, top_k, cfg.get("predict_id_columns") or ()))
            return
        labels = list(getattr(getattr(self.datamodule, "schema", None), "labels", []) or [])
        columns = [f"pred_{label}" for label in labels] or None
        self.trainer.callbacks.append(PredictionWriter(output, columns, cfg.get("predict_id_columns") or (), labels))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would merge the checkpoint's hyper-parameters into the config. Ours hold the
        # network as a plain spec (so checkpoints load with weights_only=True) that the config
        # parser cannot read back; the --config given with --ckpt_path already describes the
        # model, and its weights come from the checkpoint.
        return

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config.get(sub) if sub else self.config
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        root = str(((cfg.get("trainer") or {}).get("default_root_dir") if cfg is not None else None) or os.getcwd())
        if ckpt == "last":
            # Lightning looks for last.ckpt only in this run's (new) version folder; a user who
            # says "last" means the newest last.ckpt of earlier runs under default_root_dir.
            found = sorted(glob.glob(os.path.join(root, "**", "last*.ckpt"), recursive=True), key=os.path.getmtime)
            if found:
                ckpt = cfg["ckpt_path"] = found[-1]
                log.info(f"Resuming from {ckpt}" if sub == "fit" else f"Checkpoint: {ckpt}")
        elif ckpt == "best" and sub != "fit":
            # In a new process Lightning knows no best checkpoint; the newest run's does.
            best = _best_checkpoint_under(root)
            if best is None:
                raise FileNotFoundError(
                    f"--ckpt_path best: no checkpoint with a best model under {root!r} (trainer.default_root_dir); "
                    "give the checkpoint's path"
                )
            ckpt = cfg["ckpt_path"] = best
            log.info(f"Best checkpoint: {ckpt}")
        if sub in ("validate", "test", "predict") and not ckpt:
            raise ValueError(
                f"rechub {sub} needs --ckpt_path (a checkpoint written by rechub fit, or 'best'/'last' for the newest "
                f"run under {root!r}): without it the model's weights are untrained"
            )
        if sub == "fit" and ckpt and ckpt not in ("best", "last", "hpc", "registry"):
            self._resume_from = str(ckpt)
        if ckpt and ckpt not in ("best", "last", "hpc", "registry") and cfg.get("data") is not None:
            data = cfg["data"]
            init_args = data.get("init_args") if hasattr(data, "get") else None
            if init_args is not None and "preprocessing_from" in init_args and not init_args.get("preprocessing_from"):
                init_args["preprocessing_from"] = ckpt
                self._labels_from_checkpoint(init_args, ckpt)

    def _labels_from_checkpoint(self, init_args: Any, ckpt: str) -> None:
        """The label column names the checkpoint was trained on (``--data.label click`` at fit time),
        unless this command line names them: predictions are written as ``pred_<label>``."""
        given = getattr(self, "_cli_args", None)
        given = list(sys.argv[1:] if given is None else given) if not isinstance(given, dict) else []
        named = {a.split("=")[0].replace(".init_args.", ".") for a in given if isinstance(a, str)}
        from .data.base import load_preprocessing_state

        try:
            state = load_preprocessing_state(ckpt)
        except (ValueError, OSError):
            return  # not our checkpoint: the datamodule reports it
        self._task_types_from_checkpoint(state, named)
        derived = state.get("derived_labels")
        if derived is not None and "derived_labels" in init_args and "--data.derived_labels" not in named:
            if dict(init_args.get("derived_labels") or {}) != derived:
                log.info(f"Derived labels {derived} from the checkpoint (configured: {init_args.get('derived_labels')})")
                init_args["derived_labels"] = derived
        if named & {"--data.label", "--data.labels"}:
            return
        trained = list((state.get("schema") or {}).get("labels") or [])
        if not trained:
            return
        if "label" in init_args and len(trained) == 1 and init_args.get("label") != trained[0]:
            log.info(f"Label column {trained[0]!r} from the checkpoint (configured: {init_args.get('label')!r})")
            init_args["label"] = trained[0]
        elif "labels" in init_args and (init_args.get("labels") is None or list(init_args.get("labels")) != trained):
            log.info(f"Label columns {trained} from the checkpoint (configured: {init_args.get('labels')})")
            init_args["labels"] = trained

    def _warn_split_of_path(self, stage: str) -> None:
        """``validate``/``test`` of a checkpoint on ``--data.path``: say which rows are scored."""
        dm = self.datamodule
        path_rows = getattr(dm, "_frames", {}).get("all") if dm is not None else None
        split = "val" if stage == "validate" else "test"
        given = getattr(dm, "_split_paths", {}).get(split)
        if path_rows is None or given or getattr(dm, "streaming", False):
            return
        frame = dm._frames.get(split)
        if frame is not None and len(frame) < len(path_rows):
            log.info(
                f"{stage} scores the {split} split of the data: {len(frame)} of its {len(path_rows)} rows "
                f"(split_ratio); to score a whole file, give it as --data.{split}_path"
            )

    def before_validate(self) -> None:
        self._warn_split_of_path("validate")

    def before_test(self) -> None:
        self._warn_split_of_path("test")

    def _task_types_from_checkpoint(self, state: Any, named: set[str]) -> None:
        """The task types the checkpoint was trained with (a multi-task config says
        ``[classification, classification]``; fit may have said ``[classification, regression]``),
        unless this command line names them. They change no parameter, so a mismatch would load
        silently and squash a regression output through a sigmoid."""
        trained = list(state.get("task_types") or [])
        if len(trained) < 2 or any(a.endswith("task_types") for a in named):
            return
        sub = self.config.get("subcommand")
        model = (self.config.get(sub) if sub else self.config).get("model")
        init = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init is None:
            return
        net = init.get("model")
        targets = [init] + ([net.get("init_args")] if net is not None and hasattr(net, "get") and net.get("init_args") is not None else [])
        for args in targets:
            if "task_types" in args and args.get("task_types") is not None and list(args.get("task_types")) != trained:
                log.info(f"Task types {trained} from the checkpoint (configured: {list(args.get('task_types'))})")
                args["task_types"] = trained

    def after_fit(self) -> None:
        trainer = self.trainer
        cb = trainer.checkpoint_callback
        module = self.model
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if trainer.is_global_zero:
            best = getattr(cb, "best_model_path", "") or ""
            score = getattr(cb, "best_model_score", None)
            monitor = getattr(cb, "monitor", None) or getattr(module, "monitor", "val")
            lines = ["", "Training finished."]
            if score is not None:
                lines.append(f"  best {monitor}: {float(score):.4f}")
            if metrics:
                lines.append("  last validation: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
            lines.append(f"  best checkpoint: {best or '(none: no ModelCheckpoint with a monitor)'}")
            log.info("\n".join(lines))


def _checkpoint_states(path: str) -> dict[str, dict[str, Any]]:
    """The ModelCheckpoint states saved in a checkpoint (memory-mapped: large files cost little)."""
    from .checkpoint import read_checkpoint

    try:
        states = read_checkpoint(path, mmap=True).get("callbacks") or {}
    except (ValueError, OSError):  # not a readable checkpoint: it holds no state
        return {}
    return {str(k): v for k, v in states.items() if str(k).startswith("ModelCheckpoint") and isinstance(v, dict)}


def _best_checkpoint_under(root: str) -> str | None:
    """The best checkpoint of the newest run under ``root``.

    The newest run is the ``version_N`` folder of the newest checkpoint that holds ModelCheckpoint
    state (exported or weights-only copies hold none and are passed over). Within it, the
    ``best_model_path`` a *monitoring* ModelCheckpoint recorded wins; a periodic or default one
    (no monitor) records its latest file, taken when the run has no monitor. Without any such
    state: the newest ``best*.ckpt``, else ``None``.
    """
    found = sorted(glob.glob(os.path.join(root, "**", "*.ckpt"), recursive=True), key=os.path.getmtime, reverse=True)
    for i, path in enumerate(found):
        if not _checkpoint_states(path):
            continue
        folder = os.path.dirname(os.path.abspath(path))
        run = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
        unmonitored: str | None = None
        for other in [p for p in found[i:] if os.path.abspath(p).startswith(run + os.sep)]:
            for state in _checkpoint_states(other).values():
                best = state.get("best_model_path")
                if not best or not os.path.exists(best):
                    continue
                if state.get("monitor"):
                    return str(best)
                unmonitored = unmonitored or str(best)
        return unmonitored or path
    best_named = [p for p in found if os.path.basename(p).startswith("best")]
    return best_named[0] if best_named else None


def _continue_run_folder(trainer: L.Trainer, ckpt: str) -> None:
    """Resume in the run folder the checkpoint came from (``<save_dir>/<name>/version_N/checkpoints``).

    A new version folder would give ModelCheckpoint a new ``dirpath``, and Lightning then drops
    its best score and best-k record (early stopping keeps its own): the resumed run would call
    a later, worse epoch its best. Loggers that chose no version continue version ``N``; the
    CSV log appends to the run's ``metrics.csv``.
    """
    ckpt_dir = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(ckpt_dir) != "checkpoints":
        return
    version_dir = os.path.dirname(ckpt_dir)
    name = os.path.basename(version_dir)
    if not name.startswith("version_") or not name[len("version_"):].isdigit():
        return
    for lg in trainer.loggers:
        if getattr(lg, "_version", "set") is not None or not getattr(lg, "save_dir", None):
            continue  # the user chose a version (or the logger has no run folders)
        if os.path.abspath(os.path.join(lg.save_dir, lg.name or "", name)) == version_dir:
            lg._version = int(name[len("version_"):])
            log.info(f"Continuing the run folder {version_dir}")


def _keep_csv_history(logger: CSVLogger, ckpt: str) -> None:
    """Create a resumed run's CSV writer without losing the run's earlier rows.

    Lightning's writer deletes an existing ``metrics.csv``; a run resumed in its own folder keeps
    the rows logged up to the checkpoint's step (later ones were not part of this run's history:
    the training after the checkpoint is redone), so ``rechub report`` draws the whole run.
    """
    import csv

    path = os.path.join(logger.log_dir, "metrics.csv")
    rows: list[dict[str, str]] = []
    header: list[str] = []
    if os.path.isfile(path):
        from .checkpoint import read_checkpoint

        try:
            step = int(read_checkpoint(ckpt, mmap=True).get("global_step", -1))
        except (ValueError, OSError):  # an unreadable checkpoint fails later, with Lightning's message
            step = -1
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            # the logger's step counts the batches before the current one: a checkpoint at global
            # step N was written after the rows logged at steps < N
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < step]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        writer = logger.experiment  # deletes metrics.csv
    if rows:
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = sorted(header)


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def load_model_from_checkpoint(ckpt_path: str) -> Any:
    """The network stored in one of our checkpoints (its spec + weights), in eval mode."""
    from .checkpoint import read_checkpoint
    from .models.base import build_model

    ckpt = read_checkpoint(ckpt_path)
    spec = ckpt.get("hyper_parameters", {}).get("model")
    if spec is None:
        raise ValueError(f"{ckpt_path} holds no model spec (the model was not one of rechub-lightning's)")
    model = build_model(spec)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()


def export_main(argv: list[str]) -> str:
    """``rechub export --ckpt_path X --output model.onnx [--tower user|item] [--quantize int8|fp16]``."""
    import argparse
    import tempfile

    from .export import export_onnx, quantize_onnx

    p = argparse.ArgumentParser(prog="rechub export", description="Export a checkpoint's model (or tower) to ONNX.")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--tower", choices=["user", "item"], default=None, help="matching models: export one tower")
    p.add_argument("--opset_version", type=int, default=17)
    p.add_argument(
        "--quantize", choices=["int8", "fp16"], default=None,
        help="write a quantized model: int8 (8-bit embedding tables, CPU serving) or fp16 (GPU serving)",
    )
    p.add_argument(
        "--seq_length", type=int, default=None,
        help="history length of the example input (default: the checkpoint's max_len, the length histories are "
             "padded to); BST's and SASRec's graphs accept only this length",
    )
    args = p.parse_args(argv)
    model = load_model_from_checkpoint(args.ckpt_path)
    seq_length = args.seq_length
    if seq_length is None:
        from .data.base import load_preprocessing_state

        try:
            seq_length = load_preprocessing_state(args.ckpt_path)["preprocessor"].get("max_len")
        except (ValueError, KeyError, AttributeError):
            seq_length = None  # a checkpoint without our datamodule: the model's own length or 10
    kw = {"tower": args.tower, "opset_version": args.opset_version, "seq_length": seq_length}
    if args.quantize is None:
        path = export_onnx(model, args.output, **kw)
    else:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            fp32 = export_onnx(model, os.path.join(tmp, "float32.onnx"), **kw)
            path = quantize_onnx(fp32, args.output, mode=args.quantize)
    log.info(f"Wrote {path}")
    return path


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rechub`` console script.

    ``fit|validate|test|predict`` go to LightningCLI; ``export`` writes ONNX; ``report`` plots a run.
    """
    _configure_logging()
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "report":
        from .report import main as report_main

        report_main(argv[1:])
        return
    RecHubCLI(
        RecModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
