"""STAMP: short-term attention/memory priority model (Liu et al., KDD'18,
https://dl.acm.org/doi/10.1145/3219819.3219950)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...features import Feature, FeatureSchema, SequenceFeature
from ._match_common import (
    SessionModel,
    dot_logits,
    init_rows_,
    last_valid,
    resolve_optional,
    resolve_single,
    schema_history,
    schema_item_id,
    sequence_mask,
)

__all__ = ["STAMP"]


class STAMP(SessionModel):
    """Attention over the session with priority to the last click.

    ``m_s`` is the mean of the session's item embeddings, ``x_t`` the last one;
    ``a_i = w_0^T sigmoid(W_1 x_i + W_2 x_t + W_3 m_s + b_a)`` gives
    ``m_a = sum_i a_i x_i + m_s``; the user embedding is ``MLP_s(m_a) * MLP_t(x_t)`` and an
    item is its embedding in the history's table. The last click is found whatever the
    padding side (the reference assumed post-padding) and an empty session does not divide
    by zero.

    With ``item_feature`` (default with a schema: the item id) ``forward`` scores the
    batch's target, ``(B,)`` or ``(B, 1 + N)`` with negatives; without it, all items,
    ``(B, vocab_size)`` (the reference's full softmax).

    Args:
        item_history_feature: the session / history sequence (default: the schema's
            history feature).
        weight_std: standard deviation of the attention weights' initialisation.
        emb_std: standard deviation of the item embeddings' and linear layers' initialisation.
        item_feature: the target item id, looked up in the history's table.
        neg_item_feature: negative items (default: from the ``"neg_items"`` group).
        schema: the datamodule's feature schema.
    """

    def __init__(
        self,
        item_history_feature: SequenceFeature | str | None = None,
        weight_std: float = 0.05,
        emb_std: float = 0.002,
        item_feature: Feature | str | None = None,
        *,
        neg_item_feature: Any = None,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self._setup_items(
            resolve_single(item_history_feature, schema, schema_history(schema, "item_history_feature"), "item_history_feature"),
            resolve_single(item_feature, schema, schema_item_id(schema, "item_feature"), "item_feature"),
            resolve_optional(neg_item_feature, schema, "neg_items", "neg_item_feature"),
            schema,
            strict=neg_item_feature is not None,
        )
        dim = self.item_history_feature.embed_dim
        self.w_0 = nn.Parameter(torch.empty(dim, 1))
        self.w_1_t = nn.Parameter(torch.empty(dim, dim))
        self.w_2_t = nn.Parameter(torch.empty(dim, dim))
        self.w_3_t = nn.Parameter(torch.empty(dim, dim))
        self.b_a = nn.Parameter(torch.zeros(dim))
        for w in (self.w_0, self.w_1_t, self.w_2_t, self.w_3_t):
            nn.init.normal_(w, std=weight_std)
        self.f_s = nn.Sequential(nn.Tanh(), nn.Linear(dim, dim))
        self.f_t = nn.Sequential(nn.Tanh(), nn.Linear(dim, dim))
        for lin in (self.f_s[1], self.f_t[1]):
            nn.init.normal_(lin.weight, std=emb_std)
            nn.init.zeros_(lin.bias)
        init_rows_(self.embedding.rows(self.item_history_feature), emb_std, self.item_history_feature.padding_idx)

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """User (session) embedding ``h_s * h_t``, ``(B, D)``."""
        ids = x[self.item_history_feature.name]
        mask = sequence_mask(self.item_history_feature, ids)
        keep = mask.unsqueeze(-1).to(torch.get_default_dtype())
        emb = self.item_embedding(ids)
        emb = emb * keep.to(emb.dtype)
        x_t = last_valid(emb, mask).unsqueeze(1)  # (B, 1, D)
        m_s = (emb.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(emb.dtype)).unsqueeze(1)
        att = torch.sigmoid(emb @ self.w_1_t + x_t @ self.w_2_t + m_s @ self.w_3_t + self.b_a) @ self.w_0
        a = F.normalize(torch.exp(att) * keep.to(emb.dtype), p=1, dim=1)  # (B, L, 1)
        m_a = (a * emb).sum(dim=1) + m_s.squeeze(1)
        return self.f_s(m_a) * self.f_t(x_t).squeeze(1)

    def score(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` / ``(B, 1 + N)`` with an item feature, else ``(B, vocab_size)``."""
        user = self.user_tower(x)
        if self.item_feature is None:
            return user @ self.all_item_embeddings().T
        return dot_logits(user, self.item_tower(x), self.negative_embeddings(x))
