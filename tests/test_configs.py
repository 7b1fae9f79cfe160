"""Every YAML under configs/ parses with --print_config and trains one epoch on a small default."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from rechub_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "trainer" and not p.name.startswith("weighting_"))
OVERLAYS = sorted((ROOT / "configs" / "mtl").glob("weighting_*.yaml"))
TRAINER_OVERLAYS = [ROOT / "configs" / "trainer" / "cpu.yaml"]

SMALL = {
    "CTRDataModule": ["--data.init_args.synthetic_rows=3000", "--data.init_args.synthetic_max_vocab=300", "--data.init_args.batch_size=256"],
    "MTLDataModule": ["--data.init_args.synthetic_rows=2000", "--data.init_args.batch_size=256"],
    "MatchDataModule": ["--data.init_args.synthetic_users=120", "--data.init_args.synthetic_items=300",
                        "--data.init_args.synthetic_interactions=[10, 20]", "--data.init_args.batch_size=128"],
}


def _small_args(config: Path) -> list[str]:
    cls = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[1]
    args = list(SMALL[cls])
    if cls == "CTRDataModule" and "amazon" in config.read_text():
        args[0] = "--data.init_args.synthetic_rows=2000"
    return args


def _fit(configs: list[Path], tmp_path: Path) -> None:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    args += _small_args(configs[0]) + [
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(args)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_print_config(config):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(buf.getvalue())
    assert printed["model"]["init_args"]["model"]["class_path"] == yaml.safe_load(config.read_text())["model"]["init_args"]["model"]["class_path"]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_one_epoch_fit(config, tmp_path):
    _fit([config, *TRAINER_OVERLAYS], tmp_path)
    assert list(tmp_path.rglob("*.ckpt"))  # the config's ModelCheckpoint wrote something


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.stem for p in OVERLAYS])
def test_weighting_overlays(overlay, tmp_path):
    _fit([ROOT / "configs" / "mtl" / "mmoe.yaml", overlay], tmp_path)
    assert list(tmp_path.rglob("*.ckpt"))
