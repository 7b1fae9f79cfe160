"""FAT-DeepFFM (Zhang et al., 2019, https://arxiv.org/abs/1905.06336)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema
from ...layers import CEN, MLP
from ._common import mlp_kwargs
from .deepffm import DeepFFM

__all__ = ["FatDeepFFM"]


class FatDeepFFM(DeepFFM):
    """DeepFFM whose field-aware crossings are rescaled by a compose-excitation network
    (field attention, :class:`~rechub_lightning.layers.CEN`) before the MLP.

    Args:
        linear_features: first-order features (see :class:`DeepFFM`).
        cross_features: field-aware sparse features (see :class:`DeepFFM`).
        embed_dim: width of the field-aware embeddings (``None``: the features' width).
        reduction_ratio: CEN bottleneck reduction factor.
        mlp_params: MLP arguments; the MLP ends in a logit.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        linear_features: Sequence[Feature] | Sequence[str] | str | None = None,
        cross_features: Sequence[Feature] | Sequence[str] | str | None = None,
        embed_dim: int | None = None,
        reduction_ratio: int = 1,
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super(DeepFFM, self).__init__()
        self._build_ffm(linear_features, cross_features, embed_dim, schema)
        self.cen = CEN(self.embed_dim, self.num_field_cross, reduction_ratio)
        self.mlp_out = MLP(self.num_field_cross * self.embed_dim, **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.linear_logit(x) + self.mlp_out(self.cen(self.ffm_crossings(x)))
        return y.squeeze(1) + self.b
