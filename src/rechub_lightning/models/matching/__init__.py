"""Retrieval (matching) models: two-tower, sequential and multi-interest.

Every model has ``user_tower(x)`` and ``item_tower(x)`` and a ``mode`` attribute
(``None`` for training logits, ``"user"`` / ``"item"`` for embedding export);
multi-interest models (MIND, ComirecSA, ComirecDR, SINE) return ``(B, K, D)`` user
embeddings. Constructors take Torch-RecHub's arguments plus a keyword-only ``schema``
from which the feature arguments default (groups ``"user"``, ``"item"``, ``"neg_items"``).
"""

from .comirec import ComirecDR, ComirecSA
from .dssm import DSSM
from .dssm_senet import DSSMSENet
from .dssm_facebook import FaceBookDSSM
from .gru4rec import GRU4Rec
from .mind import MIND
from .narm import NARM
from .sasrec import SASRec
from .sine import SINE
from .stamp import STAMP
from .youtube_dnn import YoutubeDNN
from .youtube_sbc import YoutubeSBC

__all__ = [
    "DSSM",
    "DSSMSENet",
    "FaceBookDSSM",
    "YoutubeDNN",
    "YoutubeSBC",
    "MIND",
    "ComirecSA",
    "ComirecDR",
    "GRU4Rec",
    "NARM",
    "STAMP",
    "SASRec",
    "SINE",
]
