"""Building blocks shared by the model zoo."""

from .activation import Dice, activation_layer
from .embedding import EmbeddingLayer, InputMask, masked_pool
from .interaction import FM, CrossNetMix, CrossNetV2, CrossNetwork
from .mlp import LR, MLP, PredictionLayer

__all__ = [
    "Dice",
    "activation_layer",
    "EmbeddingLayer",
    "InputMask",
    "masked_pool",
    "FM",
    "CrossNetwork",
    "CrossNetV2",
    "CrossNetMix",
    "LR",
    "MLP",
    "PredictionLayer",
]
