"""Attentional Factorization Machines (Xiao et al., IJCAI'17, https://arxiv.org/abs/1708.04617)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, AttentionPoolingLayer, EmbeddingLayer
from ..base import RecModel
from ._common import total_dim

__all__ = ["AFM"]


class AFM(RecModel):
    """Linear term plus an attention-weighted sum of the pairwise interactions ``v_i * v_j``.

    ``y = w_0 + sum_i w_i x_i + p^T sum_{i<j} a_ij (v_i * v_j)`` with
    ``a_ij = softmax_{(i,j)}(h^T ReLU(W (v_i * v_j) + b))``.

    The reference takes the softmax of one logit per row (after summing the pairs as in FM),
    so its "attention" is always 1 and the model reduces to a weighted FM; here the softmax
    runs over the ``F(F-1)/2`` interactions, as in the paper. The weights of the last forward
    pass are kept in :attr:`last_attention` ``(B, F(F-1)/2)``, pairs in
    ``itertools.combinations`` order (see :meth:`attention_weights`).

    Args:
        fm_features: sparse/sequence features of one embedding width (default
            ``"sparse+sequence"`` of ``schema``).
        embed_dim: their embedding width (``None``: taken from the features; if given it must match).
        t: hidden width of the attention network.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        fm_features: Sequence[Feature] | Sequence[str] | str | None = None,
        embed_dim: int | None = None,
        t: int = 64,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.fm_features = resolve_features(fm_features, schema, "sparse+sequence", "fm_features")
        widths = {f.embed_dim for f in self.fm_features}
        if len(widths) != 1:
            raise ValueError(f"AFM: fm_features must share one embed_dim, got widths {sorted(widths)}")
        if len(self.fm_features) < 2:
            raise ValueError("AFM: needs at least two fm_features to form interactions")
        width = widths.pop()
        if embed_dim is not None and embed_dim != width:
            raise ValueError(f"AFM: embed_dim={embed_dim} but the fm_features have embed_dim={width}")
        self.embed_dim = width
        self.embedding = EmbeddingLayer(self.fm_features)
        self.linear = LR(total_dim(self.fm_features))
        self.attention = AttentionPoolingLayer(width, t)
        self.p = nn.Linear(width, 1, bias=False)
        rows, cols = torch.triu_indices(len(self.fm_features), len(self.fm_features), offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.last_attention: torch.Tensor | None = None

    def _interactions(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embedding(x, self.fm_features, squeeze_dim=False)  # (B, F, D)
        return emb, emb[:, self.rows] * emb[:, self.cols]  # (B, P, D)

    def attention_weights(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention weights ``(B, F(F-1)/2)`` of the pairwise interactions for a batch."""
        _, pairs = self._interactions(x)
        return self.attention(pairs)[1]

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, pairs = self._interactions(x)
        pooled, weights = self.attention(pairs)
        self.last_attention = weights.detach()
        return (self.linear(emb.flatten(start_dim=1)) + self.p(pooled)).squeeze(1)
