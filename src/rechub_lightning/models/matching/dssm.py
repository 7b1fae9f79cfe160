"""DSSM: the deep structured semantic two-tower model (Huang et al., CIKM'13,
https://posenhuang.github.io/papers/cikm2013_DSSM_fullversion.pdf)."""

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
    total_dim,
    tower_params,
)

__all__ = ["DSSM"]


class DSSM(MatchModel):
    """Two MLP towers over user and item features, scored by the cosine of their outputs.

    Both towers end with an L2 normalisation, so ``<user, item>`` is a cosine and the
    exported embeddings are searched by inner product. Training logits are
    ``cosine / temperature`` (the reference computed the temperature and ignored it).

    Args:
        user_features: features of the user tower (feature objects or a selector resolved
            against ``schema``; default: the schema's ``"user"`` group).
        item_features: features of the item tower (default: the ``"item"`` group).
        user_params: user MLP ``{"dims", "dropout", "activation", "batch_norm"}``
            (default ``{"dims": [256, 128, 64]}``).
        item_params: item MLP, same keys; its last width must equal the user tower's.
        temperature: logits are ``cosine / temperature``.
        neg_item_features: features of the offline negatives (``neg_items`` ``(B, N)``
            and their attributes), each standing for an item feature (``shared_with`` it,
            or one per item feature in order); default: the schema's ``"neg_items"``
            group when it exists. Negatives go through the item tower.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``mode=None``: logits ``(B,)`` (point-wise), or ``(B, 1 + N)`` with the positive in
        column 0 when the batch carries negatives (list-/pair-wise).
        ``mode="user"`` / ``"item"``: ``(B, D)`` embeddings.

    Example:
        >>> from rechub_lightning import SparseFeature
        >>> user, item = [SparseFeature("user_id", 10, 8)], [SparseFeature("item_id", 20, 8)]
        >>> model = DSSM(user, item, {"dims": [16, 8]}, {"dims": [16, 8]}, temperature=0.1)
        >>> x = {"user_id": torch.tensor([1, 2]), "item_id": torch.tensor([3, 4])}
        >>> model(x).shape
        torch.Size([2])
    """

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        user_params: dict[str, Any] | None = None,
        item_params: dict[str, Any] | None = None,
        temperature: float = 1.0,
        *,
        neg_item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.user_features = resolve_group(user_features, schema, "user", "user_features")
        self.item_features = resolve_group(item_features, schema, "item", "item_features")
        self.neg_item_features = resolve_optional(neg_item_features, schema, "neg_items", "neg_item_features")
        self.temperature = check_temperature(temperature)
        self._build(user_params, item_params, strict=neg_item_features is not None)

    def _build(self, user_params: dict[str, Any] | None, item_params: dict[str, Any] | None, strict: bool) -> None:
        self.neg_pairs = pair_negatives(self.item_features, self.neg_item_features, "neg_item_features", strict=strict)
        self.embedding = EmbeddingLayer(self.user_features + self.item_features)
        self.user_mlp = MLP(total_dim(self.user_features), output_layer=False, **tower_params(user_params, "user_params", [256, 128, 64]))
        self.item_mlp = MLP(total_dim(self.item_features), output_layer=False, **tower_params(item_params, "item_params", [256, 128, 64]))
        if self.user_mlp.output_dim != self.item_mlp.output_dim:
            raise ValueError(
                f"the towers must end with the same width: user_params dims end with {self.user_mlp.output_dim}, "
                f"item_params dims with {self.item_mlp.output_dim}"
            )

    # ------------------------------------------------------------------ towers
    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user embedding ``(B, D)``."""
        user = self.user_mlp(self.embedding(x, self.user_features, squeeze_dim=True))
        return F.normalize(user, p=2, dim=1)

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised embedding ``(B, D)`` of the batch's (target) items."""
        item = self.item_mlp(self.embedding(x, self.item_features, squeeze_dim=True))
        return F.normalize(item, p=2, dim=1)

    def negative_embeddings(self, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Item-tower embeddings ``(B, N, D)`` of the batch's negatives, or ``None`` without any."""
        neg = negative_inputs(x, self.neg_pairs)
        if neg is None:
            return None
        inputs, batch, n_neg = neg
        return self.item_tower(inputs).view(batch, n_neg, -1)

    def score(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training logits: ``(B,)``, or ``(B, 1 + N)`` (positive first) with negatives."""
        logits = dot_logits(self.user_tower(x), self.item_tower(x), self.negative_embeddings(x))
        return logits / self.temperature
