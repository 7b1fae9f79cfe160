"""Deep & Cross Network (Wang et al., ADKDD'17, https://arxiv.org/abs/1708.05123)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, MLP, CrossNetwork, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["DCN"]


class DCN(RecModel):
    """Cross network and MLP in parallel on the same embedded input, concatenated into a logit.

    Args:
        features: model inputs (default: all features of ``schema``).
        n_cross_layers: number of cross layers.
        mlp_params: MLP arguments; ``dims`` must be non-empty.
        schema: the datamodule's feature schema (filled in by the CLI).
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        n_cross_layers: int = 3,
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.features = resolve_features(features, schema, "all", "features")
        self.dims = total_dim(self.features)
        params = mlp_kwargs(mlp_params)
        if not params.get("dims"):
            raise ValueError("DCN: mlp_params['dims'] must list at least one hidden layer")
        self.embedding = EmbeddingLayer(self.features)
        self.cn = CrossNetwork(self.dims, n_cross_layers)
        self.mlp = MLP(self.dims, **{**params, "output_layer": False})
        self.linear = LR(self.dims + params["dims"][-1])

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        stacked = torch.cat([self.cn(embed_x), self.mlp(embed_x)], dim=1)
        return self.linear(stacked).squeeze(1)
