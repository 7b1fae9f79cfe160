"""FiBiNET (Huang et al., RecSys'19, https://arxiv.org/abs/1905.09433)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import DenseFeature, Feature, FeatureSchema, resolve_features
from ...layers import MLP, BiLinearInteractionLayer, EmbeddingLayer, SENETLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["FiBiNet"]


class FiBiNet(RecModel):
    """SENET field re-weighting and bilinear interactions, fed to an MLP.

    The bilinear interactions of the raw embeddings and of the SENET-weighted ones are
    concatenated; dense features join them at the MLP input. (The reference silently drops
    dense features, and miscounts fields when a sparse feature shares a table.)

    Args:
        features: model inputs (default: all features of ``schema``). Sparse and sequence
            features, all of one embedding width, are the interacting fields; dense features
            go straight to the MLP.
        mlp_params: MLP arguments (``dims``, ``dropout``, ``activation``, ``batch_norm``);
            the MLP always ends in a logit.
        reduction_ratio: SENET bottleneck reduction factor.
        bilinear_type: ``"field_all"``, ``"field_each"`` or ``"field_interaction"``
            (see :class:`~rechub_lightning.layers.BiLinearInteractionLayer`).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp_params: dict[str, Any] | None = None,
        reduction_ratio: int = 3,
        bilinear_type: str = "field_interaction",
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.features = resolve_features(features, schema, "all", "features")
        self.dense_features = [f for f in self.features if isinstance(f, DenseFeature)]
        self.field_features = [f for f in self.features if not isinstance(f, DenseFeature)]
        if len(self.field_features) < 2:
            raise ValueError("FiBiNet: needs at least two sparse/sequence features to form interactions")
        widths = {f.embed_dim for f in self.field_features}
        if len(widths) != 1:
            raise ValueError(f"FiBiNet: sparse/sequence features must share one embed_dim, got {sorted(widths)}")
        embed_dim = widths.pop()
        num_fields = len(self.field_features)
        self.embedding = EmbeddingLayer(self.features)
        self.senet_layer = SENETLayer(num_fields, reduction_ratio)
        self.bilinear_interaction = BiLinearInteractionLayer(embed_dim, num_fields, bilinear_type)
        self.dims = num_fields * (num_fields - 1) * embed_dim + total_dim(self.dense_features)
        self.mlp = MLP(self.dims, **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.field_features, squeeze_dim=False)  # (B, F, D)
        bilinear = self.bilinear_interaction(embed_x)
        bilinear_senet = self.bilinear_interaction(self.senet_layer(embed_x))
        parts = [bilinear.flatten(start_dim=1), bilinear_senet.flatten(start_dim=1)]
        if self.dense_features:
            parts.append(self.embedding(x, self.dense_features, squeeze_dim=True))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
