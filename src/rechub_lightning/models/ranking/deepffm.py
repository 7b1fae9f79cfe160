"""DeepFFM (Zhang et al., FAT-DeepFFM, 2019, https://arxiv.org/abs/1905.06336, Eq. 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import DenseFeature, Feature, FeatureSchema, Pretrained, SparseFeature, is_feature, resolve_features
from ...layers import FFM, MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["DeepFFM"]


def _explicit(value: Any) -> bool:
    return value is not None and not isinstance(value, str) and all(is_feature(v) for v in value)


def ffm_inputs(
    linear_features: Sequence[Feature] | Sequence[str] | str | None,
    cross_features: Sequence[Feature] | Sequence[str] | str | None,
    embed_dim: int | None,
    schema: FeatureSchema | None,
) -> tuple[list[Feature], list[SparseFeature], int]:
    """Resolve the linear and field-aware features of the FFM models.

    Feature objects are used as given, with the reference's contract: a cross feature of a
    field with ``n`` ids has ``vocab_size = n * num_fields`` (id ``k`` for field ``j`` is row
    ``k * num_fields + j``), and linear features usually have ``embed_dim=1``. Features
    resolved from ``schema`` (``None``, a selector or names) describe the raw columns, so they
    are derived here: cross features get ``vocab_size * num_fields`` rows of width
    ``embed_dim``, sparse linear features width 1.

    Returns:
        ``(linear features, cross features, embed_dim)``.
    """
    linear = resolve_features(linear_features, schema, "dense+sparse", "linear_features")
    if not _explicit(linear_features):
        linear = [
            f if isinstance(f, DenseFeature) else SparseFeature(f.name, f.vocab_size, 1, padding_idx=f.padding_idx)
            for f in linear
        ]
    cross = resolve_features(cross_features, schema, "sparse", "cross_features")
    bad = [f.name for f in cross if type(f) is not SparseFeature]
    if bad:
        raise ValueError(f"cross_features must be sparse features, got dense/sequence features {bad}")
    if len(cross) < 2:
        raise ValueError("cross_features: need at least two fields to cross")
    if not _explicit(cross_features):
        width = embed_dim if embed_dim is not None else cross[0].embed_dim
        cross = [
            SparseFeature(
                f.name,
                f.vocab_size * len(cross),
                width,
                # pretrained rows have the raw column's shape, not the field-aware table's
                initializer=None if isinstance(f.initializer, Pretrained) else f.initializer,
            )
            for f in cross
        ]
    widths = {f.embed_dim for f in cross}
    if len(widths) != 1:
        raise ValueError(f"cross_features must share one embed_dim, got {sorted(widths)}")
    width = widths.pop()
    if embed_dim is not None and embed_dim != width:
        raise ValueError(f"embed_dim={embed_dim} but the cross_features have embed_dim={width}")
    return linear, cross, width  # type: ignore[return-value]


class DeepFFM(RecModel):
    """Field-aware FM crossings fed to an MLP, plus a linear term.

    Every field owns one embedding per other field; the ``F(F-1)/2`` Hadamard crossings
    ``v_{i,j} * v_{j,i}`` are flattened into the MLP: ``y = b + linear(x) + MLP(FFM(x))``.

    Args:
        linear_features: first-order features (default ``"dense+sparse"`` of ``schema``, with
            sparse features re-declared at width 1). Sparse ones contribute the sum of their
            embeddings (the reference's linear term); dense ones a learned weight per value,
            initialised to 0 (the reference adds the raw dense values, a fixed weight of 1).
        cross_features: field-aware sparse features (default ``"sparse"`` of ``schema``); see
            :func:`ffm_inputs` for the vocabulary contract.
        embed_dim: width of the field-aware embeddings (``None``: the features' width).
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
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self._build_ffm(linear_features, cross_features, embed_dim, schema)
        self.mlp_out = MLP(self.num_field_cross * self.embed_dim, **{**mlp_kwargs(mlp_params), "output_layer": True})

    # shared with FatDeepFFM -------------------------------------------------------
    def _build_ffm(
        self,
        linear_features: Sequence[Feature] | Sequence[str] | str | None,
        cross_features: Sequence[Feature] | Sequence[str] | str | None,
        embed_dim: int | None,
        schema: FeatureSchema | None,
    ) -> None:
        self.linear_features, self.cross_features, self.embed_dim = ffm_inputs(
            linear_features, cross_features, embed_dim, schema
        )
        self.linear_sparse = [f for f in self.linear_features if not isinstance(f, DenseFeature)]
        self.linear_dense = [f for f in self.linear_features if isinstance(f, DenseFeature)]
        self.num_fields = len(self.cross_features)
        self.num_field_cross = self.num_fields * (self.num_fields - 1) // 2
        self.ffm = FFM(num_fields=self.num_fields, reduce_sum=False)
        self.linear_embedding = EmbeddingLayer(self.linear_features)
        self.ffm_embedding = EmbeddingLayer(self.cross_features)
        if self.linear_dense:
            # Learned from 0: the reference's fixed weight of 1 lets uninformative (standardised)
            # dense columns add unit-scale noise to every logit.
            self.dense_linear = nn.Linear(total_dim(self.linear_dense), 1, bias=False)
            nn.init.zeros_(self.dense_linear.weight)
        self.b = nn.Parameter(torch.zeros(1))
        self.register_buffer("fields_offset", torch.arange(self.num_fields, dtype=torch.long), persistent=False)

    def linear_logit(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """First-order term ``(B, 1)`` (without the global bias)."""
        y = 0.0
        if self.linear_sparse:
            y = self.linear_embedding(x, self.linear_sparse, squeeze_dim=True).sum(dim=1, keepdim=True)
        if self.linear_dense:
            y = y + self.dense_linear(self.linear_embedding(x, self.linear_dense, squeeze_dim=True))
        return y  # type: ignore[return-value]

    def ffm_crossings(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Field-aware crossings ``(B, F(F-1)/2, D)``."""
        batch = x[self.cross_features[0].name].shape[0]
        # Row ``id * F + j`` holds the feature's vector for field j: look up all F at once by
        # treating the (B, F) ids as a batch of B * F rows.
        x_ffm = {
            f.name: (x[f.name].long().reshape(-1, 1) * self.num_fields + self.fields_offset).reshape(-1)
            for f in self.cross_features
        }
        emb = self.ffm_embedding(x_ffm, self.cross_features, squeeze_dim=False)  # (B*F_field, F_feat, D)
        emb = emb.view(batch, self.num_fields, self.num_fields, self.embed_dim).transpose(1, 2)
        return self.ffm(emb)  # emb[:, i, j] = feature i's vector for field j

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.linear_logit(x) + self.mlp_out(self.ffm_crossings(x).flatten(start_dim=1))
        return y.squeeze(1) + self.b
