"""NARM: neural attentive session-based recommendation (Li et al., CIKM'17,
http://arxiv.org/abs/1711.04725)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import rnn as rnn_utils

from ...features import Feature, FeatureSchema, SequenceFeature
from ...layers.sequence import _exporting, left_align
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

__all__ = ["NARM"]


class NARM(SessionModel):
    """A GRU encoder with a global (last state) and a local (attention) session summary.

    ``c = [h_T ; sum_t alpha_t h_t]`` with ``alpha_t = softmax(v^T sigmoid(A_1 h_T + A_2 h_t))``
    over the real positions; the user embedding is ``B c`` and an item is its embedding in
    the history's table (bi-linear decoder). The GRU reads only the real items, whatever
    the padding side (the reference assumed post-padding).

    With ``item_feature`` (default with a schema: the item id) ``forward`` scores the
    batch's target item, ``(B,)``, or ``(B, 1 + N)`` with negatives; without it, every item
    of the table, ``(B, vocab_size)`` (the reference's full softmax, trained with
    ``MatchModule(mode=2)`` and the target id as label).

    Args:
        item_history_feature: the session / history sequence (default: the schema's
            history feature).
        hidden_dim: GRU width.
        emb_dropout_p: dropout on the item embeddings.
        session_rep_dropout_p: dropout on the session representation.
        item_feature: the target item id, looked up in the history's table.
        neg_item_feature: negative items (default: from the ``"neg_items"`` group).
        schema: the datamodule's feature schema.
    """

    def __init__(
        self,
        item_history_feature: SequenceFeature | str | None = None,
        hidden_dim: int = 100,
        emb_dropout_p: float = 0.25,
        session_rep_dropout_p: float = 0.5,
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
        self.hidden_dim = int(hidden_dim)
        self.emb_dropout = nn.Dropout(emb_dropout_p)
        self.gru = nn.GRU(input_size=dim, hidden_size=self.hidden_dim, batch_first=True)
        self.a_1 = nn.Parameter(torch.randn(self.hidden_dim, self.hidden_dim))
        self.a_2 = nn.Parameter(torch.randn(self.hidden_dim, self.hidden_dim))
        self.v = nn.Parameter(torch.randn(self.hidden_dim, 1))
        self.session_rep_dropout = nn.Dropout(session_rep_dropout_p)
        self.b = nn.Parameter(torch.randn(dim, 2 * self.hidden_dim))

    def session_representation(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[h_T ; c_local]`` ``(B, 2 * hidden_dim)``."""
        ids = x[self.item_history_feature.name]
        mask = sequence_mask(self.item_history_feature, ids)
        emb = self.emb_dropout(self.item_embedding(ids))
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        emb, mask, _ = left_align(emb, mask)
        lengths = mask.sum(dim=1)
        # an empty session reads (and attends to) one zero vector
        mask = torch.cat([mask[:, :1] | (lengths == 0).unsqueeze(1), mask[:, 1:]], dim=1)
        if _exporting():
            # graph export: the left-aligned padded run; the state after the last real item is
            # the packed run's final state, and padded outputs get zero attention below
            h, _ = self.gru(emb)
            h_t = last_valid(h, mask)
        else:
            packed = rnn_utils.pack_padded_sequence(emb, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
            out, state = self.gru(packed)
            h, _ = rnn_utils.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
            h_t = state[-1]  # (B, H)
        q = (torch.sigmoid(h_t.unsqueeze(1) @ self.a_1.T + h @ self.a_2.T) @ self.v).squeeze(-1)  # (B, L)
        alpha = torch.softmax(q.masked_fill(~mask, float("-inf")), dim=1)
        c_local = (alpha.unsqueeze(-1) * h).sum(dim=1)
        return self.session_rep_dropout(torch.cat([h_t, c_local], dim=1))

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """User (session) embedding ``B c``, ``(B, D)``."""
        return self.session_representation(x) @ self.b.T

    def score(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` / ``(B, 1 + N)`` with an item feature, else ``(B, vocab_size)``."""
        user = self.user_tower(x)
        if self.item_feature is None:
            return user @ self.all_item_embeddings().T
        return dot_logits(user, self.item_tower(x), self.negative_embeddings(x))
