"""DeepFM (Guo et al., IJCAI'17, https://arxiv.org/abs/1703.04247)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import FM, LR, MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["DeepFM"]


class DeepFM(RecModel):
    """Linear + factorisation machine + MLP, summed into one logit.

    Args:
        deep_features: features of the MLP part (list of features, or a selector such as
            ``"dense+sparse"`` resolved against ``schema``; default: all).
        fm_features: features of the FM and linear parts (sparse/sequence of one width;
            default: ``"sparse+sequence"``).
        mlp_params: ``{"dims", "dropout", "activation", "batch_norm"}`` of the MLP.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        deep_features: Sequence[Feature] | Sequence[str] | str | None = None,
        fm_features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.deep_features = resolve_features(deep_features, schema, "all", "deep_features")
        self.fm_features = resolve_features(fm_features, schema, "sparse+sequence", "fm_features")
        self.embedding = EmbeddingLayer(self.deep_features + self.fm_features)
        self.linear = LR(total_dim(self.fm_features))
        self.fm = FM(reduce_sum=True)
        self.mlp = MLP(total_dim(self.deep_features), **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        input_deep = self.embedding(x, self.deep_features, squeeze_dim=True)
        input_fm = self.embedding(x, self.fm_features, squeeze_dim=False)
        y = self.linear(input_fm.flatten(start_dim=1)) + self.fm(input_fm) + self.mlp(input_deep)
        return y.squeeze(1)
