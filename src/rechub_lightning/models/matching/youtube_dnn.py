"""YoutubeDNN candidate generation (Covington et al., RecSys'16,
https://dl.acm.org/doi/10.1145/2959100.2959190)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...features import Feature, FeatureSchema
from ...layers import MLP, EmbeddingLayer
from ._match_common import (
    MatchModel,
    check_temperature,
    dot_logits,
    negative_inputs,
    pair_negatives,
    resolve_group,
    resolve_optional,
    schema_item_id,
    total_dim,
    tower_params,
)

__all__ = ["YoutubeDNN"]


class YoutubeDNN(MatchModel):
    """A user MLP against item-id embeddings, trained with a softmax over sampled negatives.

    As in the paper there is no item network: an item is its (L2-normalised) id
    embedding, and the user MLP's last width must equal that embedding width. Logits are
    ``cosine / temperature``.

    Args:
        user_features: user tower features (default: the schema's ``"user"`` group,
            profile plus pooled history).
        item_features: the item id feature (default: the first feature of the ``"item"``
            group).
        neg_item_feature: the negative items, ``neg_items`` ``(B, N)`` sharing the item id's
            table (default: from the schema's ``"neg_items"`` group when it exists).
        user_params: user MLP ``{"dims", "dropout", "activation", "batch_norm"}``
            (default ``{"dims": [128, <item embed_dim>]}``).
        temperature: logits are ``cosine / temperature``.
        schema: the datamodule's feature schema.

    Shape:
        ``mode=None``: ``(B, 1 + N)`` logits with the positive first (list-wise) when the
        batch carries negatives, else ``(B,)``. ``mode="user"`` / ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        neg_item_feature: Sequence[Feature] | Sequence[str] | str | None = None,
        user_params: dict[str, Any] | None = None,
        temperature: float = 1.0,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.user_features = resolve_group(user_features, schema, "user", "user_features")
        if item_features is None and schema is not None:
            self.item_features = [schema_item_id(schema, "item_features")]
        else:
            self.item_features = resolve_group(item_features, schema, "item", "item_features")
        self.neg_item_feature = resolve_optional(neg_item_feature, schema, "neg_items", "neg_item_feature")
        self.neg_pairs = pair_negatives(
            self.item_features, self.neg_item_feature, "neg_item_feature", strict=neg_item_feature is not None
        )
        self.temperature = check_temperature(temperature)
        item_dim = total_dim(self.item_features)
        self.embedding = EmbeddingLayer(self.user_features + self.item_features)
        params = tower_params(user_params, "user_params", [128, item_dim])
        self.user_mlp = MLP(total_dim(self.user_features), output_layer=False, **params)
        if self.user_mlp.output_dim != item_dim:
            raise ValueError(
                f"user_params dims must end with the item embedding width {item_dim} "
                f"(YoutubeDNN has no item network), got {self.user_mlp.output_dim}"
            )

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user embedding ``(B, D)``."""
        user = self.user_mlp(self.embedding(x, self.user_features, squeeze_dim=True))
        return F.normalize(user, p=2, dim=1)

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
