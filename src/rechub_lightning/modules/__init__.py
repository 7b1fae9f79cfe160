"""LightningModules: the shared base and one module per task family."""

from .base import RecModule
from .ctr import CTRModule
from .match import MatchModule
from .mtl import MTLModule
from .optim import HybridOptimizer

__all__ = ["RecModule", "CTRModule", "MatchModule", "MTLModule", "HybridOptimizer"]
