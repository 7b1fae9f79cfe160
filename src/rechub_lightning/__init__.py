"""rechub-lightning: Torch-RecHub's recommender models and trainers on PyTorch Lightning."""

from .features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature
from .modules import CTRModule, MatchModule, MTLModule, RecModule
from .trainers import CTRTrainer, MatchTrainer, MTLTrainer

__version__ = "0.1.0"

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
