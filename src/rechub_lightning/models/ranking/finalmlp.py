"""FinalMLP (Mao et al., AAAI'23, https://arxiv.org/abs/2304.00902)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["FinalMLP", "FeatureGating", "InteractionAggregation"]


class FeatureGating(nn.Module):
    """Stream-specific feature selection (FinalMLP, Sec. 3.2): ``x * 2 sigmoid(MLP(context))``.

    The gate is computed from the embeddings of some context features, or, with none, from a
    learned vector (initialised small and random, so every weight of the gate learns from the
    first step).

    Args:
        context_dim: width of the flattened context (0: use a learned vector).
        bias_dim: width of the learned vector when ``context_dim`` is 0.
        output_dim: width of the gated input.
        hidden_units: hidden widths of the gate MLP (ReLU, no batch norm).
    """

    def __init__(self, context_dim: int, bias_dim: int, output_dim: int, hidden_units: Sequence[int]) -> None:
        super().__init__()
        in_dim = context_dim or bias_dim
        self.context_bias = None if context_dim else nn.Parameter(torch.randn(bias_dim) * 0.01)
        hidden = MLP(in_dim, output_layer=False, dims=list(hidden_units), activation="relu", batch_norm=False)
        self.gate = nn.Sequential(hidden, nn.Linear(hidden.output_dim, output_dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_bias is not None:
            context = self.context_bias.expand(x.shape[0], -1)
        return x * 2 * self.gate(context)


class InteractionAggregation(nn.Module):
    """FinalMLP's bilinear fusion of the two streams (Sec. 3.3), with ``num_heads`` heads:
    ``w_x . x + w_y . y + sum_h x_h^T W_h y_h``.

    Args:
        x_dim: width of stream 1 (divisible by ``num_heads``).
        y_dim: width of stream 2 (divisible by ``num_heads``).
        num_heads: heads of the bilinear term.

    Shape:
        ``(B, x_dim), (B, y_dim) -> (B, 1)``.
    """

    def __init__(self, x_dim: int, y_dim: int, num_heads: int = 1) -> None:
        super().__init__()
        if x_dim % num_heads or y_dim % num_heads:
            raise ValueError(f"stream widths {x_dim} and {y_dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.w_x = nn.Linear(x_dim, 1)
        self.w_y = nn.Linear(y_dim, 1)
        self.w_xy = nn.Parameter(torch.empty(num_heads, x_dim // num_heads, y_dim // num_heads))
        nn.init.xavier_normal_(self.w_xy)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head_x = x.view(x.shape[0], self.num_heads, -1)
        head_y = y.view(y.shape[0], self.num_heads, -1)
        xy = torch.einsum("bhi,hij,bhj->b", head_x, self.w_xy, head_y).unsqueeze(1)
        return self.w_x(x) + self.w_y(y) + xy


class FinalMLP(RecModel):
    """Two MLP streams over differently gated copies of the input, fused bilinearly.

    Not in Torch-RecHub. ``y = fusion(MLP_1(gate_1 * e), MLP_2(gate_2 * e))`` with ``e`` the
    flattened embeddings (dense values included).

    Args:
        features: model inputs (default: all features of ``schema``).
        mlp1_params: stream 1 MLP (``dims`` must be non-empty; no output layer).
        mlp2_params: stream 2 MLP.
        use_fs: apply the stream-specific feature gating.
        fs_hidden_units: hidden widths of each gate MLP.
        fs1_context: features whose embeddings drive gate 1 (default none: a learned vector).
        fs2_context: features whose embeddings drive gate 2 (default none: a learned vector).
        num_heads: heads of the bilinear fusion.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp1_params: dict[str, Any] | None = None,
        mlp2_params: dict[str, Any] | None = None,
        use_fs: bool = True,
        fs_hidden_units: Sequence[int] = (64,),
        fs1_context: Sequence[Feature] | Sequence[str] | str | None = None,
        fs2_context: Sequence[Feature] | Sequence[str] | str | None = None,
        num_heads: int = 1,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.features = resolve_features(features, schema, "all", "features")
        self.fs1_context = [] if fs1_context is None else resolve_features(fs1_context, schema, "", "fs1_context")
        self.fs2_context = [] if fs2_context is None else resolve_features(fs2_context, schema, "", "fs2_context")
        self.embedding = EmbeddingLayer(self.features + self.fs1_context + self.fs2_context)
        self.dims = total_dim(self.features)
        streams = []
        for arg, params in (("mlp1_params", mlp1_params), ("mlp2_params", mlp2_params)):
            p = {**mlp_kwargs(params, arg), "output_layer": False}
            if not p.get("dims"):
                raise ValueError(f"FinalMLP: {arg}['dims'] must list at least one hidden layer")
            streams.append(MLP(self.dims, **p))
        self.mlp1, self.mlp2 = streams
        self.use_fs = use_fs
        if use_fs:
            bias_dim = max(f.embed_dim for f in self.features)
            self.fs1_gate = FeatureGating(total_dim(self.fs1_context), bias_dim, self.dims, fs_hidden_units)
            self.fs2_gate = FeatureGating(total_dim(self.fs2_context), bias_dim, self.dims, fs_hidden_units)
        self.fusion = InteractionAggregation(self.mlp1.output_dim, self.mlp2.output_dim, num_heads)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = self.embedding(x, self.features, squeeze_dim=True)
        feat1 = feat2 = flat
        if self.use_fs:
            ctx1 = self.embedding(x, self.fs1_context, squeeze_dim=True) if self.fs1_context else None
            ctx2 = self.embedding(x, self.fs2_context, squeeze_dim=True) if self.fs2_context else None
            feat1, feat2 = self.fs1_gate(flat, ctx1), self.fs2_gate(flat, ctx2)
        return self.fusion(self.mlp1(feat1), self.mlp2(feat2)).squeeze(1)
