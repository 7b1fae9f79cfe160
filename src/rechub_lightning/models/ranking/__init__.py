"""Ranking (CTR) models. Every model returns logits ``(B,)`` (DIEN: ``(logits, aux_loss)``)."""

from .afm import AFM
from .autoint import AutoInt
from .bst import BST
from .dcn import DCN
from .dcnv2 import DCNv2
from .deepffm import DeepFFM
from .deepfm import DeepFM
from .dien import DIEN
from .din import DIN
from .edcn import EDCN
from .fatdeepffm import FatDeepFFM
from .fibinet import FiBiNet
from .finalmlp import FinalMLP
from .widedeep import WideDeep
from .xdeepfm import xDeepFM

__all__ = [
    "WideDeep",
    "DeepFM",
    "DCN",
    "DCNv2",
    "EDCN",
    "AFM",
    "FiBiNet",
    "DeepFFM",
    "FatDeepFFM",
    "AutoInt",
    "DIN",
    "DIEN",
    "BST",
    "xDeepFM",
    "FinalMLP",
]
