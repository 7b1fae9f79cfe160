"""DCN-V2 (Wang et al., WWW'21, https://arxiv.org/abs/2008.13535)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, MLP, CrossNetMix, CrossNetV2, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["DCNv2"]

_STRUCTURES = ("crossnet_only", "stacked", "parallel")


class DCNv2(RecModel):
    """Full-rank or mixture-of-low-rank cross network with an MLP, stacked or in parallel.

    Args:
        features: model inputs (default: all features of ``schema``).
        n_cross_layers: number of cross layers.
        mlp_params: MLP arguments (unused for ``crossnet_only``).
        model_structure: ``"parallel"``, ``"stacked"`` or ``"crossnet_only"``.
        use_low_rank_mixture: mixture of low-rank experts (``CrossNetMix``) instead of full rank.
        low_rank: rank of each expert.
        num_experts: number of experts.
        schema: the datamodule's feature schema (filled in by the CLI).
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        n_cross_layers: int = 3,
        mlp_params: dict[str, Any] | None = None,
        model_structure: str = "parallel",
        use_low_rank_mixture: bool = True,
        low_rank: int = 32,
        num_experts: int = 4,
        *,
        schema: FeatureSchema | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if model_structure not in _STRUCTURES:
            raise ValueError(f"model_structure={model_structure!r} is not one of {_STRUCTURES}")
        self.features = resolve_features(features, schema, "all", "features")
        self.dims = total_dim(self.features)
        self.model_structure = model_structure
        self.embedding = EmbeddingLayer(self.features)
        if use_low_rank_mixture:
            self.crossnet = CrossNetMix(self.dims, n_cross_layers, low_rank=low_rank, num_experts=num_experts)
        else:
            self.crossnet = CrossNetV2(self.dims, n_cross_layers)
        params = mlp_kwargs(mlp_params)
        final_dim = self.dims
        if model_structure != "crossnet_only":
            if not params.get("dims"):
                raise ValueError("DCNv2: mlp_params['dims'] must list at least one hidden layer")
            self.dnn = MLP(self.dims, **{**params, "output_layer": False})
            final_dim = params["dims"][-1] + (self.dims if model_structure == "parallel" else 0)
        self.linear = LR(final_dim)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        cross_out = self.crossnet(embed_x)
        if self.model_structure == "stacked":
            out = self.dnn(cross_out)
        elif self.model_structure == "parallel":
            out = torch.cat([cross_out, self.dnn(embed_x)], dim=1)
        else:
            out = cross_out
        return self.linear(out).squeeze(1)
