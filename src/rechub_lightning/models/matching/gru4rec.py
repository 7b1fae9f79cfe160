"""GRU4Rec: session-based recommendation with recurrent networks (Hidasi et al., ICLR'16,
http://arxiv.org/abs/1511.06939), as a two-tower retrieval model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import rnn as rnn_utils

from ...features import Feature, FeatureSchema, SequenceFeature
from ...layers import MLP, EmbeddingLayer
from ...layers.sequence import _exporting, left_align
from ._match_common import (
    MatchModel,
    check_temperature,
    dot_logits,
    negative_inputs,
    pair_negatives,
    resolve_group,
    resolve_optional,
    schema_item_id,
    sequence_mask,
    total_dim,
    tower_params,
)

__all__ = ["GRU4Rec"]


class GRU4Rec(MatchModel):
    """A GRU over the behaviour history, concatenated with the user profile, then an MLP.

    The GRU reads only the real history items (packed, whatever the padding side) and its
    last layer's final state joins the user profile embeddings in the user MLP. Items are
    their L2-normalised id embeddings. Differences from the reference, each a fix: logits
    are ``(B, 1 + N)`` (the reference summed over the wrong axis and returned ``(B, D)``),
    divided by ``temperature`` (ignored there), and ``user_params["num_layers"]`` (GRU
    depth, default 2) no longer reaches the MLP, where it raised a TypeError.

    Args:
        user_features: user profile features (default: the non-sequence features of the
            schema's ``"user"`` group).
        history_features: behaviour sequences read by the GRU, all of one length (default:
            the sequence features of the ``"user"`` group).
        item_features: the item id feature (default: first of the ``"item"`` group).
        neg_item_feature: negative items sharing the item table (default: from the
            ``"neg_items"`` group when it exists).
        user_params: ``{"dims", "dropout", "activation", "batch_norm", "num_layers"}``; the
            last width must equal the item embedding width.
        temperature: logits are ``cosine / temperature``.
        schema: the datamodule's feature schema.

    Shape:
        ``mode=None``: ``(B, 1 + N)`` with the positive first when the batch carries
        negatives, else ``(B,)``. ``mode="user"`` / ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        history_features: Sequence[Feature] | Sequence[str] | str | None = None,
        item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        neg_item_feature: Sequence[Feature] | Sequence[str] | str | None = None,
        user_params: dict[str, Any] | None = None,
        temperature: float = 1.0,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if user_features is None and schema is not None:
            self.user_features = [f for f in resolve_group(None, schema, "user", "user_features") if not isinstance(f, SequenceFeature)]
        else:
            self.user_features = resolve_group(user_features, schema, "user", "user_features")
        if history_features is None and schema is not None:
            self.history_features = [f for f in resolve_group(None, schema, "user", "history_features") if isinstance(f, SequenceFeature)]
        else:
            self.history_features = resolve_group(history_features, schema, "user", "history_features")
        if not self.history_features:
            raise ValueError("GRU4Rec needs at least one history (sequence) feature")
        if item_features is None and schema is not None:
            self.item_features = [schema_item_id(schema, "item_features")]
        else:
            self.item_features = resolve_group(item_features, schema, "item", "item_features")
        self.neg_item_feature = resolve_optional(neg_item_feature, schema, "neg_items", "neg_item_feature")
        self.neg_pairs = pair_negatives(
            self.item_features, self.neg_item_feature, "neg_item_feature", strict=neg_item_feature is not None
        )
        self.temperature = check_temperature(temperature)

        params = dict(user_params) if user_params is not None else None
        num_layers = int(params.pop("num_layers", 2)) if params is not None else 2
        item_dim = total_dim(self.item_features)
        params = tower_params(params, "user_params", [128, item_dim])
        hidden = total_dim(self.history_features)
        self.embedding = EmbeddingLayer(self.user_features + self.history_features + self.item_features)
        self.gru = nn.GRU(input_size=hidden, hidden_size=hidden, num_layers=num_layers, batch_first=True, bias=False)
        self.user_mlp = MLP(total_dim(self.user_features) + hidden, output_layer=False, **params)
        if self.user_mlp.output_dim != item_dim:
            raise ValueError(
                f"user_params dims must end with the item embedding width {item_dim}, got {self.user_mlp.output_dim}"
            )

    def history_state(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The GRU's final state ``(B, H)`` after the real history items."""
        first = self.history_features[0]
        mask = sequence_mask(first, x[first.name])
        seq = torch.cat([self.embedding.embed_sequence(x, f)[0] for f in self.history_features], dim=-1)  # type: ignore[arg-type]
        seq = seq * mask.unsqueeze(-1).to(seq.dtype)
        seq, mask, _ = left_align(seq, mask)
        lengths = mask.sum(dim=1).clamp(min=1)  # an empty history reads one zero vector
        if _exporting():
            # graph export: the left-aligned padded run; the last layer's output after the last
            # real item is the packed run's final state
            out, _ = self.gru(seq)
            return out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)
        packed = rnn_utils.pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.gru(packed)
        return state[-1]

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user embedding ``(B, D)``."""
        parts = [self.history_state(x)]
        if self.user_features:
            parts.insert(0, self.embedding(x, self.user_features, squeeze_dim=True))
        return F.normalize(self.user_mlp(torch.cat(parts, dim=-1)), p=2, dim=1)

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised item id embedding ``(B, D)``."""
        return F.normalize(self.embedding(x, self.item_features, squeeze_dim=True), p=2, dim=1)

    def negative_embeddings(self, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(B, N, D)`` embeddings of the batch's negative items, or ``None``."""
        neg = negative_inputs(x, self.neg_pairs)
        if neg is None:
            return None
        inputs, batch, n_neg = neg
        return self.item_tower(inputs).view(batch, n_neg, -1)

    def score(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training logits ``(B, 1 + N)`` (positive first), or ``(B,)`` without negatives."""
        logits = dot_logits(self.user_tower(x), self.item_tower(x), self.negative_embeddings(x))
        return logits / self.temperature
