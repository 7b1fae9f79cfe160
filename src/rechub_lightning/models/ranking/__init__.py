"""Ranking (CTR) models. Every model returns logits ``(B,)``."""

from .dcn import DCN
from .dcnv2 import DCNv2
from .deepfm import DeepFM
from .widedeep import WideDeep

__all__ = ["WideDeep", "DeepFM", "DCN", "DCNv2"]
