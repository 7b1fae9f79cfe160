"""rechub-lightning: Torch-RecHub's recommender models and trainers on PyTorch Lightning."""

from .features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature
from .modules import CTRModule, MTLModule, RecModule
from .trainers import CTRTrainer, MTLTrainer

__version__ = "0.1.0"

__all__ = [
    "SparseFeature",
    "DenseFeature",
    "SequenceFeature",
    "FeatureSchema",
    "RecModule",
    "CTRModule",
    "MTLModule",
    "CTRTrainer",
    "MTLTrainer",
    "__version__",
]
