"""Datamodules, the batched tensor data path, preprocessing and synthetic data."""

from .base import TabularDataModule, as_frame, read_table
from .ctr import CTRDataModule
from ..features import get_auto_embedding_dim
from .datasets import PredictDataset, ShuffledBatchSampler, TensorDictDataset, TorchDataset, UnrepeatedBatchSampler, make_dataloader
from .generator import DataGenerator, MatchDataGenerator
from .match import MatchDataModule
from .mtl import MTLDataModule
from .preprocessing import CategoryEncoder, DenseScaler, Preprocessor
from .streaming import ParquetSource, ParquetStreamDataset, StreamDataLoader
from .sequence import (
    array_replace_with_dict,
    create_seq_features,
    df_to_dict,
    gen_model_input,
    generate_seq_feature,
    generate_seq_feature_match,
    neg_sample,
    negative_sample,
    pad_sequences,
)
from .synthetic import make_criteo_like
from .synthetic_seq import make_amazon_like, make_census_like, make_movielens_like

__all__ = [
    "CTRDataModule",
    "MTLDataModule",
    "MatchDataModule",
    "TabularDataModule",
    "DataGenerator",
    "MatchDataGenerator",
    "TensorDictDataset",
    "TorchDataset",
    "PredictDataset",
    "get_auto_embedding_dim",
    "ShuffledBatchSampler",
    "UnrepeatedBatchSampler",
    "make_dataloader",
    "ParquetSource",
    "ParquetStreamDataset",
    "StreamDataLoader",
    "CategoryEncoder",
    "DenseScaler",
    "Preprocessor",
    "make_criteo_like",
    "make_amazon_like",
    "make_movielens_like",
    "make_census_like",
    "pad_sequences",
    "generate_seq_feature",
    "create_seq_features",
    "generate_seq_feature_match",
    "gen_model_input",
    "df_to_dict",
    "array_replace_with_dict",
    "neg_sample",
    "negative_sample",
    "read_table",
    "as_frame",
]
