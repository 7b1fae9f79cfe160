"""Wide & Deep (Cheng et al., DLRS'16, https://arxiv.org/abs/1606.07792)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["WideDeep"]


class WideDeep(RecModel):
    """A linear (wide) part plus an MLP (deep) part, summed into one logit.

    Args:
        wide_features: inputs of the linear part (default ``"dense+sparse"``).
        deep_features: inputs of the MLP (default: all features).
        mlp_params: MLP arguments (``dims``, ``dropout``, ``activation``, ``batch_norm``).
        schema: the datamodule's feature schema (filled in by the CLI).
    """

    def __init__(
        self,
        wide_features: Sequence[Feature] | Sequence[str] | str | None = None,
        deep_features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.wide_features = resolve_features(wide_features, schema, "dense+sparse", "wide_features")
        self.deep_features = resolve_features(deep_features, schema, "all", "deep_features")
        self.embedding = EmbeddingLayer(self.wide_features + self.deep_features)
        self.linear = LR(total_dim(self.wide_features))
        self.mlp = MLP(total_dim(self.deep_features), **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        input_wide = self.embedding(x, self.wide_features, squeeze_dim=True)
        input_deep = self.embedding(x, self.deep_features, squeeze_dim=True)
        return (self.linear(input_wide) + self.mlp(input_deep)).squeeze(1)
