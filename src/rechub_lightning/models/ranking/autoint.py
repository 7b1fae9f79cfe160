"""AutoInt (Song et al., CIKM'19, https://arxiv.org/abs/1810.11921)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, MLP, EmbeddingLayer, InteractingLayer
from ..base import RecModel
from ._common import mlp_kwargs

__all__ = ["AutoInt"]


class AutoInt(RecModel):
    """Stacked multi-head self-attention over field embeddings, plus a linear term and an
    optional MLP: ``y = w_att . flatten(attention(E)) + linear(E) [+ MLP(E)]``.

    Each dense feature becomes a field by a learned vector scaled by its value (a bias-free
    ``Linear(width, D)``), so attention mixes dense and sparse fields alike.

    Args:
        sparse_features: sparse/sequence fields, all of one embedding width ``D`` (default
            ``"sparse+sequence"`` of ``schema``).
        dense_features: dense fields (default ``"dense"`` of ``schema``; may be empty).
        num_layers: interacting layers.
        num_heads: attention heads (``D`` must be divisible by it).
        dropout: dropout on the attention weights.
        mlp_params: MLP arguments, or ``None`` for no MLP.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        sparse_features: Sequence[Feature] | Sequence[str] | str | None = None,
        dense_features: Sequence[Feature] | Sequence[str] | str | None = None,
        num_layers: int = 3,
        num_heads: int = 2,
        dropout: float = 0.0,
        mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.sparse_features = resolve_features(sparse_features, schema, "sparse+sequence", "sparse_features")
        if dense_features is None and schema is None:
            self.dense_features: list[Feature] = []  # the reference accepts None for "no dense features"
        else:
            self.dense_features = resolve_features(dense_features, schema, "dense", "dense_features")
        if not self.sparse_features:
            raise ValueError("AutoInt requires at least one sparse feature to determine embed_dim")
        widths = {f.embed_dim for f in self.sparse_features}
        if len(widths) != 1:
            raise ValueError(f"AutoInt: sparse_features must share one embed_dim, got {sorted(widths)}")
        self.embed_dim = widths.pop()
        self.num_fields = len(self.sparse_features) + len(self.dense_features)
        self.dims = self.num_fields * self.embed_dim
        self.num_layers = num_layers
        self.sparse_embedding = EmbeddingLayer(self.sparse_features)
        self.dense_embeddings = nn.ModuleDict(
            {f.name: nn.Linear(f.embed_dim, self.embed_dim, bias=False) for f in self.dense_features}
        )
        self.interacting_layers = nn.ModuleList(
            [
                InteractingLayer(self.embed_dim, num_heads=num_heads, dropout=dropout, residual=True)
                for _ in range(num_layers)
            ]
        )
        self.linear = LR(self.dims)
        self.attn_linear = nn.Linear(self.dims, 1)
        self.mlp = None if mlp_params is None else MLP(self.dims, **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        fields = [self.sparse_embedding(x, self.sparse_features, squeeze_dim=False)]
        for f in self.dense_features:
            proj = self.dense_embeddings[f.name]
            v = x[f.name].to(proj.weight.dtype).reshape(-1, f.embed_dim)  # float32, or bf16/fp16 under *-true precision
            fields.append(proj(v).unsqueeze(1))
        embed_x = torch.cat(fields, dim=1) if len(fields) > 1 else fields[0]  # (B, F, D)
        attn_out = embed_x
        for layer in self.interacting_layers:
            attn_out = layer(attn_out)
        flat = embed_x.flatten(start_dim=1)
        y = self.attn_linear(attn_out.flatten(start_dim=1)) + self.linear(flat)
        if self.mlp is not None:
            y = y + self.mlp(flat)
        return y.squeeze(1)
