"""Deep Interest Evolution Network (Zhou et al., AAAI'19, https://arxiv.org/abs/1809.03672)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, SequenceFeature, resolve_features
from ...layers import MLP, EmbeddingLayer, InterestEvolving, InterestExtractor, auxiliary_loss, left_align
from ..base import RecModel
from ._common import mlp_kwargs, total_dim
from .din import history_embedding, resolve_sequence_inputs, target_embeddings

__all__ = ["DIEN"]

NEG_HISTORY_GROUP = "neg_history"


class DIEN(RecModel):
    """Interest extractor GRU with an auxiliary loss, then an attention-gated GRU (AUGRU)
    that evolves the interests relevant to the candidate; an MLP on
    ``[final interests, targets, context]``.

    ``forward`` returns ``(logits (B,), alpha * auxiliary loss)``: train it with
    ``CTRModule(loss_mode=False)``. The auxiliary loss (Eq. 7) asks each interest state ``h_t``
    to score the next behaviour ``e_{t+1}`` above a negative; steps next to padding are
    skipped. Negatives come from ``neg_history_features`` when given (one per history
    feature, aligned with it, e.g. from the data pipeline), otherwise from the next behaviour
    of another row of the batch (in-batch sampling, so item and attribute negatives stay
    consistent; a negative equal to the positive is skipped). The auxiliary loss is only
    computed in training mode; in eval mode the second output is 0.

    Sequences may be pre- or post-padded: valid behaviours are moved to the front before the
    GRUs (the reference assumes post-padding).

    Args:
        features: user-profile/context features (default: ``"dense+sparse"`` of ``schema``
            minus the targets).
        history_features: behaviour sequences (default: the ``"sequence"`` group minus the
            negatives).
        neg_history_features: negative sequences aligned with the histories (default: the
            schema group ``"neg_history"`` if it exists, else in-batch negatives).
        target_features: candidate features, one per history (default: the features the
            histories share tables with). See :func:`~.din.resolve_sequence_inputs`.
        mlp_params: MLP arguments; ``activation`` defaults to ``"dice"``.
        alpha: weight of the auxiliary loss.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> ``(logits (B,), aux_loss ())``.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        history_features: Sequence[Feature] | Sequence[str] | str | None = None,
        neg_history_features: Sequence[Feature] | Sequence[str] | str | None = None,
        target_features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp_params: dict[str, Any] | None = None,
        alpha: float = 0.2,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        if isinstance(schema, dict):
            schema = FeatureSchema.from_dict(schema)
        if neg_history_features is None:
            has_group = schema is not None and NEG_HISTORY_GROUP in schema.groups
            negs = (
                resolve_features(NEG_HISTORY_GROUP, schema, NEG_HISTORY_GROUP, "neg_history_features") if has_group else []
            )
        else:
            negs = resolve_features(neg_history_features, schema, NEG_HISTORY_GROUP, "neg_history_features")
        self.features, self.history_features, self.target_features = resolve_sequence_inputs(
            features, history_features, target_features, schema, exclude=[f.name for f in negs]
        )
        self.neg_history_features: list[SequenceFeature] = negs  # type: ignore[assignment]
        if negs and len(negs) != len(self.history_features):
            raise ValueError(
                f"neg_history_features {[f.name for f in negs]} must pair one to one with history_features "
                f"{[f.name for f in self.history_features]}"
            )
        self.all_dims = total_dim(self.features + self.history_features + self.target_features)
        self.embedding = EmbeddingLayer(self.features + self.history_features + negs + self.target_features)
        self.interest_extractor_layers = nn.ModuleList([InterestExtractor(f.embed_dim) for f in self.history_features])
        self.interest_evolving_layers = nn.ModuleList([InterestEvolving(f.embed_dim) for f in self.history_features])
        params = {**mlp_kwargs(mlp_params), "output_layer": True}
        if mlp_params is None or "activation" not in mlp_params:
            params["activation"] = "dice"
        self.mlp = MLP(self.all_dims, **params)

    def _negatives(
        self, x: dict[str, torch.Tensor], i: int, seq: torch.Tensor, mask: torch.Tensor, order: torch.Tensor,
        perm: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative behaviours ``(B, L, D)`` aligned with the (left-aligned) history ``i``, and their mask."""
        if self.neg_history_features:
            neg, neg_mask = history_embedding(self.embedding, x, self.neg_history_features[i])
            neg = neg.gather(1, order.unsqueeze(-1).expand(-1, -1, neg.shape[-1]))
            return neg, neg_mask.gather(1, order)
        assert perm is not None
        ids = x[self.history_features[i].name].long().gather(1, order)
        return seq[perm], mask[perm] & (ids[perm] != ids)

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        targets = target_embeddings(self.embedding, x, self.target_features)
        with_aux = self.training and self.alpha != 0.0
        perm = None
        if with_aux and not self.neg_history_features:
            batch = targets[0].shape[0]
            perm = torch.randperm(batch, device=targets[0].device)
        aux = targets[0].new_zeros(())
        interests = []
        for i, feature in enumerate(self.history_features):
            seq, mask = history_embedding(self.embedding, x, feature)
            seq, mask, order = left_align(seq, mask)
            # Behaviours now come first: drop the columns that are padding in every row, so the
            # recurrent layers run for the longest history of the batch, not the padded length.
            longest = max(int(mask.sum(dim=1).max()), 1)
            seq, mask, order = seq[:, :longest], mask[:, :longest], order[:, :longest]
            states = self.interest_extractor_layers[i](seq, mask)
            if with_aux:
                neg, neg_mask = self._negatives(x, i, seq, mask, order, perm)
                aux = aux + auxiliary_loss(states, seq, neg, mask, neg_mask)
            interest, _ = self.interest_evolving_layers[i](states, targets[i], mask)
            interests.append(interest)
        parts = interests + targets
        if self.features:
            parts.append(self.embedding(x, self.features, squeeze_dim=True))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1), self.alpha * aux
