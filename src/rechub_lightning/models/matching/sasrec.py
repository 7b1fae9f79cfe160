"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM'18,
https://arxiv.org/abs/1808.09781)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, SequenceFeature, resolve_features
from ._match_common import (
    SessionModel,
    dot_logits,
    last_valid,
    resolve_optional,
    resolve_single,
    schema_history,
    schema_item_id,
    sequence_mask,
)

__all__ = ["SASRec", "PointWiseFeedForward"]


class PointWiseFeedForward(nn.Module):
    """``x + Dropout(W_2 Dropout(ReLU(W_1 x)))``, position-wise (the paper's FFN with its residual)."""

    def __init__(self, hidden_units: int, dropout_rate: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_units, hidden_units)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.linear2 = nn.Linear(hidden_units, hidden_units)
        self.dropout2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout2(self.linear2(self.dropout1(torch.relu(self.linear1(x)))))


class SASRec(SessionModel):
    """Causal self-attention over the behaviour sequence; the user is its last position's output.

    Items are rows of the sequence's embedding table (shared input/output embeddings, as
    in the paper). Attention is causal and never attends to padding, whatever the
    padding side. Two ways to train:

    * **next-item retrieval** (default with a schema): ``features = [history]`` and the
      batch's target ``item_feature``; ``forward`` returns ``(B,)`` logits, or
      ``(B, 1 + N)`` with negatives (``MatchModule`` mode 0, 1 or 2, or in-batch).
    * **sequence to sequence** (the reference's design): ``features = [seq, pos, neg]``,
      three aligned ``(B, L)`` sequences (``pos`` = next items, ``neg`` = sampled
      negatives); ``forward`` returns ``(pos_logits, neg_logits)`` at every non-padding
      target position, flattened (``MatchModule(mode=1)``). The reference included the
      padding positions and crashed in its item tower; both are fixed.

    Args:
        features: ``[history]`` or ``[seq, pos, neg]`` (default: the schema's history).
        max_len: longest sequence (positions have learned embeddings).
        dropout_rate: dropout on embeddings, attention and feed-forward layers.
        num_blocks: self-attention blocks.
        num_heads: attention heads (must divide the embedding width).
        item_feature: the target item id, looked up in the sequence's table (default with a
            schema: the item id).
        neg_item_feature: negative items (default: from the ``"neg_items"`` group).
        schema: the datamodule's feature schema.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        max_len: int = 50,
        dropout_rate: float = 0.5,
        num_blocks: int = 2,
        num_heads: int = 1,
        item_feature: Feature | str | None = None,
        *,
        neg_item_feature: Any = None,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if features is None:
            hist = schema_history(schema, "features")
            feats: list[Feature] = [hist] if hist is not None else []
        else:
            feats = resolve_features(features, schema, "", "features")
        if len(feats) not in (1, 3) or not all(isinstance(f, SequenceFeature) for f in feats):
            raise ValueError(
                f"features must be [history] or [seq, pos, neg] sequence features, got {[f.name for f in feats]}"
            )
        self.features = feats
        self._setup_items(
            feats[0],
            resolve_single(item_feature, schema, schema_item_id(schema, "item_feature"), "item_feature"),
            resolve_optional(neg_item_feature, schema, "neg_items", "neg_item_feature"),
            schema,
            strict=neg_item_feature is not None,
        )
        dim = feats[0].embed_dim
        if dim % int(num_heads) != 0:
            raise ValueError(f"num_heads={num_heads} must divide the embedding width {dim}")
        self.max_len = int(max_len)
        self.num_heads = int(num_heads)
        self.embed_dim = dim
        self.position_emb = nn.Embedding(self.max_len, dim)
        self.emb_dropout = nn.Dropout(dropout_rate)
        self.attention_layernorms = nn.ModuleList()
        self.attention_layers = nn.ModuleList()
        self.forward_layernorms = nn.ModuleList()
        self.forward_layers = nn.ModuleList()
        for _ in range(int(num_blocks)):
            self.attention_layernorms.append(nn.LayerNorm(dim, eps=1e-8))
            self.attention_layers.append(nn.MultiheadAttention(dim, self.num_heads, dropout_rate, batch_first=True))
            self.forward_layernorms.append(nn.LayerNorm(dim, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(dim, dropout_rate))
        self.last_layernorm = nn.LayerNorm(dim, eps=1e-8)

    @property
    def item_num(self) -> int:
        """Rows of the item table (the reference's attribute)."""
        return self.item_history_feature.vocab_size

    def seq_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Outputs ``(B, L, D)`` of the attention stack for a ``(B, L)`` id sequence."""
        batch, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"sequence {self.features[0].name!r} has length {length} > max_len={self.max_len}")
        mask = sequence_mask(self.item_history_feature, ids)
        keep = mask.unsqueeze(-1)
        h = self.item_embedding(ids) * self.embed_dim**0.5
        h = h + self.position_emb(torch.arange(length, device=ids.device)).unsqueeze(0)
        h = self.emb_dropout(h) * keep.to(h.dtype)
        # (comparisons of positions rather than eye/tril: they export to every ONNX runtime)
        pos = torch.arange(length, device=ids.device)
        eye = pos.unsqueeze(1) == pos.unsqueeze(0)
        allowed = pos.unsqueeze(1) >= pos.unsqueeze(0)  # query i sees keys j <= i
        # causal, never a padded key; a position may always see itself (no all-masked rows)
        allowed = allowed.unsqueeze(0) & (mask.unsqueeze(1) | eye.unsqueeze(0))
        attn_mask = (~allowed).repeat_interleave(self.num_heads, dim=0)
        for ln_a, attn, ln_f, ffn in zip(
            self.attention_layernorms, self.attention_layers, self.forward_layernorms, self.forward_layers
        ):
            q = ln_a(h)
            out, _ = attn(q, h, h, attn_mask=attn_mask, need_weights=False)
            h = ffn(ln_f(q + out)) * keep.to(h.dtype)
        return self.last_layernorm(h)

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The output ``(B, D)`` at the last real position of the history."""
        ids = x[self.features[0].name]
        return last_valid(self.seq_forward(ids), sequence_mask(self.item_history_feature, ids))

    def score(self, x: dict[str, torch.Tensor]) -> Any:
        """Next-item logits ``(B,)`` / ``(B, 1 + N)``, or ``(pos, neg)`` per target position
        in sequence-to-sequence mode."""
        if len(self.features) == 3 and self.features[1].name in x:
            seq, pos, neg = (x[f.name] for f in self.features)
            out = self.seq_forward(seq)
            valid = sequence_mask(self.features[1], pos)  # type: ignore[arg-type]
            pos_logits = (out * self.item_embedding(pos)).sum(-1)
            neg_logits = (out * self.item_embedding(neg)).sum(-1)
            return pos_logits[valid], neg_logits[valid]
        return dot_logits(self.user_tower(x), self.item_tower(x), self.negative_embeddings(x))
