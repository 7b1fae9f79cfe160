"""FaceBookDSSM: embedding-based retrieval in Facebook search (Huang et al., KDD'20,
https://arxiv.org/abs/2006.11632), a two-tower model trained on (positive, negative) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema
from ._match_common import resolve_group, check_temperature, resolve_optional
from .dssm import DSSM

__all__ = ["FaceBookDSSM"]


class FaceBookDSSM(DSSM):
    """DSSM towers scored pair-wise: ``forward`` returns ``(positive, negative)`` logits.

    Differences from the reference, each a fix: negatives go through the positive item
    tower with its tables (the reference gave ``neg_item_features`` their own, separately
    trained embedding tables); the item embedding is L2-normalised in ``"item"`` mode too
    (the reference exported unnormalised item vectors while training on cosines); logits
    are divided by ``temperature``.

    Args:
        user_features: user tower features (default: the schema's ``"user"`` group).
        pos_item_features: item tower features (default: the ``"item"`` group).
        neg_item_features: the negatives' features, one per item feature (``shared_with``
            it or in the same order); default: the ``"neg_items"`` group.
        user_params: user MLP ``{"dims", "dropout", "activation", "batch_norm"}``.
        item_params: item MLP, same keys.
        temperature: logits are ``cosine / temperature``.
        schema: the datamodule's feature schema.

    Shape:
        ``mode=None``: ``(pos (B,), neg (B,))`` for one negative per row, ``(pos (B,), neg (B, N))``
        for ``N``. ``mode="user"`` / ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        pos_item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        neg_item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        user_params: dict[str, Any] | None = None,
        item_params: dict[str, Any] | None = None,
        temperature: float = 1.0,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super(DSSM, self).__init__()
        self.user_features = resolve_group(user_features, schema, "user", "user_features")
        self.item_features = resolve_group(pos_item_features, schema, "item", "pos_item_features")
        self.neg_item_features = resolve_optional(neg_item_features, schema, "neg_items", "neg_item_features")
        if not self.neg_item_features:
            raise ValueError(
                "FaceBookDSSM trains on (positive, negative) pairs: give neg_item_features, or a schema with a "
                "'neg_items' group (MatchDataModule with mode=1 or 2)"
            )
        self.temperature = check_temperature(temperature)
        self._build(user_params, item_params, strict=neg_item_features is not None)

    @property
    def pos_item_features(self) -> list[Feature]:
        """The reference's name for :attr:`item_features`."""
        return self.item_features

    def score(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """``(positive logits (B,), negative logits (B,) or (B, N))``."""
        neg = self.negative_embeddings(x)
        if neg is None:
            raise KeyError(
                f"FaceBookDSSM needs the negative features {[f.name for f in self.neg_item_features]} in the batch"
            )
        user = self.user_tower(x)
        pos_score = (user * self.item_tower(x)).sum(-1) / self.temperature
        neg_score = torch.einsum("bd,bnd->bn", user, neg) / self.temperature
        return pos_score, neg_score.squeeze(1) if neg_score.shape[1] == 1 else neg_score
