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
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from lightning.pytorch.loggers import CSVLogger
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
        # CSV logs always (what `rechub report` reads), next to TensorBoard when it is installed.
        if trainer.loggers and not any(isinstance(lg, CSVLogger) for lg in trainer.loggers):
            first = trainer.loggers[0]
            trainer.loggers = [*trainer.loggers, CSVLogger(save_dir=trainer.default_root_dir, name=first.name or "lightning_logs", version=first.version)]
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                # Create the run's folder now (rank 0): LightningCLI writes config.yaml into it before
                # the first metric, and a CSV writer created after that warns that the new folder
                # "exists and is not empty" (it still does for a folder an earlier run filled).
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
        if ckpt == "last":
            # Lightning looks for last.ckpt only in this run's (new) version folder; a user who
            # says "last" means the newest last.ckpt of earlier runs under default_root_dir.
            root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
            found = sorted(glob.glob(os.path.join(str(root), "**", "last*.ckpt"), recursive=True), key=os.path.getmtime)
            if found:
                ckpt = cfg["ckpt_path"] = found[-1]
                log.info(f"Resuming from {ckpt}")
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
        if any(isinstance(a, str) and a.split("=")[0] in ("--data.label", "--data.labels", "--data.init_args.label", "--data.init_args.labels")
               for a in given):
            return
        from .data.base import load_preprocessing_state

        try:
            trained = list((load_preprocessing_state(ckpt).get("schema") or {}).get("labels") or [])
        except (ValueError, OSError):
            return  # not our checkpoint: the datamodule reports it
        if not trained:
            return
        if "label" in init_args and len(trained) == 1 and init_args.get("label") != trained[0]:
            log.info(f"Label column {trained[0]!r} from the checkpoint (configured: {init_args.get('label')!r})")
            init_args["label"] = trained[0]
        elif "labels" in init_args and (init_args.get("labels") is None or list(init_args.get("labels")) != trained):
            log.info(f"Label columns {trained} from the checkpoint (configured: {init_args.get('labels')})")
            init_args["labels"] = trained

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
