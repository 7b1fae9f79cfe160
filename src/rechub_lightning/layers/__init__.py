"""Building blocks shared by the model zoo."""

from .activation import Dice, activation_layer
from .attention import ActivationUnit, AttentionPoolingLayer, InteractingLayer, TransformerBlock
from .embedding import EmbeddingLayer, InputMask, masked_pool
from .interaction import CEN, CIN, FFM, FM, BiLinearInteractionLayer, CrossNetMix, CrossNetV2, CrossNetwork, SENETLayer
from .mlp import LR, MLP, PredictionLayer
from .sequence import AUGRU, AUGRUCell, InterestEvolving, InterestExtractor, auxiliary_loss, left_align

__all__ = [
    "Dice",
    "activation_layer",
    "EmbeddingLayer",
    "InputMask",
    "masked_pool",
    "FM",
    "FFM",
    "CrossNetwork",
    "CrossNetV2",
    "CrossNetMix",
    "CIN",
    "CEN",
    "SENETLayer",
    "BiLinearInteractionLayer",
    "ActivationUnit",
    "InteractingLayer",
    "TransformerBlock",
    "AttentionPoolingLayer",
    "AUGRUCell",
    "AUGRU",
    "InterestExtractor",
    "InterestEvolving",
    "auxiliary_loss",
    "left_align",
    "LR",
    "MLP",
    "PredictionLayer",
]
