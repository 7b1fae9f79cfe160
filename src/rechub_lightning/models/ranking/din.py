"""Deep Interest Network (Zhou et al., KDD'18, https://arxiv.org/abs/1706.06978).

Also home of the feature defaults shared by the behaviour-sequence models (DIN, DIEN, BST).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, SequenceFeature, resolve_features
from ...layers import MLP, ActivationUnit, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["DIN", "resolve_sequence_inputs", "history_embedding", "target_embeddings"]


def resolve_sequence_inputs(
    features: Sequence[Feature] | Sequence[str] | str | None,
    history_features: Sequence[Feature] | Sequence[str] | str | None,
    target_features: Sequence[Feature] | Sequence[str] | str | None,
    schema: FeatureSchema | None,
    exclude: Sequence[str] = (),
    extra_targets: bool = False,
) -> tuple[list[Feature], list[SequenceFeature], list[Feature]]:
    """Resolve ``(features, history_features, target_features)`` of a behaviour-sequence model.

    Explicit lists of features, selectors or names are used as given. Defaults, from ``schema``:

    * ``history_features``: the ``"sequence"`` group (minus ``exclude``, e.g. DIEN's negatives);
    * ``target_features``: for each history feature, the feature whose table it shares
      (``shared_with``), e.g. ``hist_item_id -> item_id``, in the same order;
    * ``features`` (user profile and context): ``"dense+sparse"`` minus the targets.

    History ``i`` is paired with target ``i``; their embedding widths must match. With
    ``extra_targets`` (DIN), targets past the last history are allowed: Torch-RecHub's Amazon
    example passes ``user_id`` as a third target, a plain MLP input there as here.

    Raises:
        ValueError: when a default cannot be derived or the pairing does not hold.
    """
    if isinstance(schema, dict):
        schema = FeatureSchema.from_dict(schema)
    if history_features is None and schema is not None:
        names = [f.name for f in schema.sequence if f.name not in exclude]
        if not names:
            raise ValueError("history_features: the schema has no sequence features; pass history_features")
        history = resolve_features(names, schema, "sequence", "history_features")
    else:
        history = resolve_features(history_features, schema, "sequence", "history_features")
    if not history:
        raise ValueError("history_features must name at least one sequence feature")
    bad = [f.name for f in history if not isinstance(f, SequenceFeature)]
    if bad:
        raise ValueError(f"history_features must be sequence features, got {bad}")

    if target_features is None and schema is not None:
        unshared = [h.name for h in history if h.shared_with is None]
        if unshared:
            raise ValueError(
                f"target_features: history features {unshared} share no table (shared_with) with a target "
                f"feature, so no default target exists; pass target_features"
            )
        targets = [schema[h.shared_with] for h in history]  # type: ignore[index]
    else:
        targets = resolve_features(target_features, schema, "sparse", "target_features")
    if len(targets) < len(history) or (len(targets) > len(history) and not extra_targets):
        raise ValueError(
            f"history_features {[h.name for h in history]} and target_features {[t.name for t in targets]} "
            f"must pair up one to one{'' if not extra_targets else ' (extra targets may follow)'}"
        )
    for h, t in zip(history, targets):
        if h.embed_dim != t.embed_dim:
            raise ValueError(f"history feature {h.name!r} (embed_dim={h.embed_dim}) and target {t.name!r} "
                             f"(embed_dim={t.embed_dim}) must have the same width")

    if features is None and schema is not None:
        taken = {f.name for f in [*history, *targets, *(schema[n] for n in exclude if n in schema)]}
        context: list[Feature] = [f for f in schema.select("dense+sparse") if f.name not in taken]
    else:
        context = resolve_features(features, schema, "dense+sparse", "features")
    return context, history, targets  # type: ignore[return-value]


def history_embedding(
    embedding: EmbeddingLayer, x: dict[str, torch.Tensor], feature: SequenceFeature
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, D)`` embeddings of a history feature (zero, without gradient, at padding) and
    its ``(B, L)`` bool mask (all True when the feature has no ``padding_idx``)."""
    seq, mask = embedding.embed_sequence(x, feature)
    if mask is None:
        return seq, torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
    return seq * mask.unsqueeze(-1).to(seq.dtype), mask


def target_embeddings(
    embedding: EmbeddingLayer, x: dict[str, torch.Tensor], targets: list[Feature]
) -> list[torch.Tensor]:
    """One ``(B, D_i)`` embedding per target feature."""
    flat = embedding(x, targets, squeeze_dim=True)
    return list(flat.split([t.embed_dim for t in targets], dim=1))


class DIN(RecModel):
    """Target attention of each candidate feature over its behaviour history, then an MLP.

    ``MLP([sum_t a(h_t, e) h_t for each history, targets e, context])`` with DIN's activation
    unit ``a`` (:class:`~rechub_lightning.layers.ActivationUnit`) and Dice in the MLP.

    Args:
        features: user-profile/context features for the MLP (default: ``"dense+sparse"``
            of ``schema`` minus the targets).
        history_features: behaviour sequences (default: the ``"sequence"`` group).
        target_features: the candidate's features, one per history feature, same width
            (default: the features the histories share tables with, e.g. ``item_id`` for
            ``hist_item_id``); further targets after those join the MLP as in the reference.
            See :func:`resolve_sequence_inputs`.
        mlp_params: MLP arguments; ``activation`` defaults to ``"dice"``.
        attention_mlp_params: :class:`~rechub_lightning.layers.ActivationUnit` arguments
            (``dims``, ``activation``, ``use_softmax``).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        history_features: Sequence[Feature] | Sequence[str] | str | None = None,
        target_features: Sequence[Feature] | Sequence[str] | str | None = None,
        mlp_params: dict[str, Any] | None = None,
        attention_mlp_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.features, self.history_features, self.target_features = resolve_sequence_inputs(
            features, history_features, target_features, schema, extra_targets=True
        )
        self.num_history_features = len(self.history_features)
        self.all_dims = total_dim(self.features + self.history_features + self.target_features)
        self.embedding = EmbeddingLayer(self.features + self.history_features + self.target_features)
        attention = dict(attention_mlp_params or {})
        unknown = set(attention) - {"dims", "activation", "use_softmax"}
        if unknown:
            raise ValueError(
                f"attention_mlp_params has unknown keys {sorted(unknown)}; allowed: dims, activation, use_softmax"
            )
        self.attention_layers = nn.ModuleList([ActivationUnit(f.embed_dim, **attention) for f in self.history_features])
        params = {**mlp_kwargs(mlp_params), "output_layer": True}
        if mlp_params is None or "activation" not in mlp_params:
            params["activation"] = "dice"
        self.mlp = MLP(self.all_dims, **params)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = target_embeddings(self.embedding, x, self.target_features)
        pooled = []
        for feature, target, unit in zip(self.history_features, targets, self.attention_layers):
            seq, mask = history_embedding(self.embedding, x, feature)
            pooled.append(unit(seq, target, mask))
        parts = pooled + targets
        if self.features:
            parts.append(self.embedding(x, self.features, squeeze_dim=True))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
