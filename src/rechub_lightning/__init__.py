"""rechub-lightning: Torch-RecHub's recommender models and trainers on PyTorch Lightning.

The LightningModules and trainers (and with them Lightning and torchmetrics) load on first
use, so that scoring code that only needs features, models, metrics or export imports with
torch alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature

if TYPE_CHECKING:
    from .modules import CTRModule, MatchModule, MTLModule, RecModule
    from .trainers import CTRTrainer, MatchTrainer, MTLTrainer

__version__ = "0.1.0"

_LAZY = {
    "RecModule": ".modules",
    "CTRModule": ".modules",
    "MatchModule": ".modules",
    "MTLModule": ".modules",
    "CTRTrainer": ".trainers",
    "MatchTrainer": ".trainers",
    "MTLTrainer": ".trainers",
}

__all__ = [
    "SparseFeature",
    "DenseFeature",
    "SequenceFeature",
    "FeatureSchema",
    "RecModule",
    "CTRModule",
    "MatchModule",
    "MTLModule",
    "CTRTrainer",
    "MatchTrainer",
    "MTLTrainer",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
