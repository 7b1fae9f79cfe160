"""Attention layers of the ranking zoo: DIN's activation unit, AutoInt's interacting layer,
BST's transformer block and AFM's attention pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activation import activation_layer
from .mlp import MLP

__all__ = ["ActivationUnit", "InteractingLayer", "TransformerBlock", "AttentionPoolingLayer"]


class ActivationUnit(nn.Module):
    """DIN's local activation unit (Zhou et al., KDD'18): target attention over a behaviour sequence.

    Each history item ``h_t`` gets the weight ``MLP([e, h_t, e - h_t, e * h_t])`` for the target
    ``e``; the output is the weighted sum of the history. As in the paper the weights are not
    normalised unless ``use_softmax`` is set. Padding positions get weight 0 (with
    ``use_softmax`` they are excluded from the softmax; the reference lets them take mass).

    Args:
        emb_dim: embedding width ``D`` of history and target.
        dims: hidden widths of the attention MLP (default ``[36]``).
        activation: activation of the attention MLP (default Dice).
        use_softmax: normalise the weights over the sequence.

    Shape:
        ``history (B, L, D), target (B, D), mask (B, L) or None -> (B, D)``.
    """

    def __init__(
        self,
        emb_dim: int,
        dims: Sequence[int] | None = None,
        activation: str = "dice",
        use_softmax: bool = False,
    ) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.use_softmax = use_softmax
        self.attention = MLP(4 * emb_dim, dims=list(dims) if dims is not None else [36], activation=activation)

    def scores(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights ``(B, L)`` of the history items (0 at padding)."""
        batch, length, dim = history.shape
        target = target.unsqueeze(1).expand(-1, length, -1)
        att_input = torch.cat([target, history, target - history, target * history], dim=-1)
        weights = self.attention(att_input.reshape(-1, 4 * dim)).view(batch, length)
        if self.use_softmax:
            if mask is not None:
                weights = weights.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(weights, dim=-1)
            # A row of padding only gives NaN; it attends to nothing.
            weights = torch.nan_to_num(weights, nan=0.0)
        elif mask is not None:
            weights = weights * mask.to(weights.dtype)
        return weights

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.scores(history, target, mask)
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1)


class InteractingLayer(nn.Module):
    """AutoInt's interacting layer (Song et al., CIKM'19): multi-head self-attention across
    fields with a projected residual connection and a ReLU.

    Args:
        embed_dim: field embedding width (divisible by ``num_heads``).
        num_heads: attention heads.
        dropout: dropout on the attention weights.
        residual: add ``W_Res x`` before the ReLU.

    Shape:
        ``(B, F, D) -> (B, F, D)``.
    """

    def __init__(self, embed_dim: int, num_heads: int = 2, dropout: float = 0.0, residual: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.W_Q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.W_K = nn.Linear(embed_dim, embed_dim, bias=False)
        self.W_V = nn.Linear(embed_dim, embed_dim, bias=False)
        self.W_Res = nn.Linear(embed_dim, embed_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, fields, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, fields, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.W_Q(x)),
            heads(self.W_K(x)),
            heads(self.W_V(x)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, fields, dim)
        if self.W_Res is not None:
            out = out + self.W_Res(x)
        return torch.relu(out)


class TransformerBlock(nn.Module):
    """Post-norm transformer encoder block used by BST (Chen et al., DLP-KDD'19).

    ``x = LN(x + Dropout(MHA(x))); x = LN(x + Dropout(FFN(x)))`` with a LeakyReLU feed-forward
    network, as in the paper. Sub-module names follow ``nn.TransformerEncoderLayer`` so its
    weights load unchanged.

    Args:
        d_model: token width.
        nhead: attention heads (``d_model`` must be divisible by it).
        dim_feedforward: hidden width of the feed-forward network.
        dropout: dropout on attention weights, the feed-forward hidden layer and both residuals.
        activation: feed-forward activation name (see :func:`activation_layer`).

    Shape:
        ``x (B, L, d_model), key_padding_mask (B, L) with True at padding -> (B, L, d_model)``;
        with ``last_only`` only the last position is computed, ``(B, 1, d_model)`` (the same
        values as the last row of the full output, at ``1/L`` of the attention and FFN cost).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "leakyrelu",
    ) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_layer(activation)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        query = x[:, -1:] if last_only else x
        attn, _ = self.self_attn(query, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(query + self.dropout1(attn))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class AttentionPoolingLayer(nn.Module):
    """AFM's attention network (Xiao et al., IJCAI'17): a softmax over the pairwise interactions.

    ``a'_ij = h^T ReLU(W (v_i * v_j) + b)``, ``a_ij = softmax over all pairs (i, j)``; the output
    is ``sum_ij a_ij (v_i * v_j)``.

    Args:
        embed_dim: width ``D`` of the interaction vectors.
        attention_dim: hidden width ``t`` of the attention network.
        dropout: dropout on the attention weights (the paper's attention dropout).

    Shape:
        ``(B, P, D) -> ((B, D), weights (B, P))``.
    """

    def __init__(self, embed_dim: int, attention_dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = nn.Linear(embed_dim, attention_dim)
        self.h = nn.Linear(attention_dim, 1, bias=False)
        nn.init.xavier_uniform_(self.h.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, interactions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.h(torch.relu(self.attention(interactions))).squeeze(-1)  # (B, P)
        weights = torch.softmax(logits, dim=1)
        pooled = torch.bmm(self.dropout(weights).unsqueeze(1), interactions).squeeze(1)
        return pooled, weights
