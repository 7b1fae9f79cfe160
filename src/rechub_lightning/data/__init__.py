"""Datamodules, the batched tensor data path, preprocessing and synthetic data."""

from .base import TabularDataModule, as_frame, read_table
from .ctr import CTRDataModule
from .datasets import ShuffledBatchSampler, TensorDictDataset, UnrepeatedBatchSampler, make_dataloader
from .generator import DataGenerator, MatchDataGenerator
from .preprocessing import CategoryEncoder, DenseScaler, Preprocessor
from .synthetic import make_criteo_like

__all__ = [
    "CTRDataModule",
    "TabularDataModule",
    "DataGenerator",
    "MatchDataGenerator",
    "TensorDictDataset",
    "ShuffledBatchSampler",
    "UnrepeatedBatchSampler",
    "make_dataloader",
    "CategoryEncoder",
    "DenseScaler",
    "Preprocessor",
    "make_criteo_like",
    "read_table",
    "as_frame",
]
