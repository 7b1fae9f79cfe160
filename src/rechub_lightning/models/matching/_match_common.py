"""What the retrieval models of this package share.

* :class:`MatchModel`: the ``mode`` switch of Torch-RecHub's matching models
  (``None`` = training scores, ``"user"`` / ``"item"`` = that tower's embedding) and the
  dispatch in ``forward``.
* Negatives embedded by the item tower itself: the negative-item features of a batch
  (``neg_items`` ``(B, N)``, ``neg_cate_id`` ...) are fed to the item tower in place of
  the item features they stand for, so a negative goes through exactly the tables and
  layers a positive goes through (the reference's FaceBookDSSM gave its negatives
  separate embedding tables).
* Small helpers for padded behaviour sequences (masks, the last valid position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import DenseFeature, Feature, FeatureSchema, SequenceFeature, SparseFeature, resolve_features
from ...layers import EmbeddingLayer
from ..base import RecModel

__all__ = [
    "MatchModel",
    "SessionModel",
    "TOWER_MODES",
    "tower_params",
    "check_temperature",
    "resolve_group",
    "resolve_optional",
    "resolve_single",
    "schema_history",
    "schema_item_id",
    "pair_negatives",
    "negative_inputs",
    "dot_logits",
    "sequence_mask",
    "last_valid",
    "total_dim",
    "init_rows_",
]

#: Values of a model's ``mode`` attribute.
TOWER_MODES = (None, "user", "item")

_TOWER_KEYS = {"dims", "dropout", "activation", "batch_norm"}


class MatchModel(RecModel):
    """Base of the two-tower retrieval models.

    Subclasses define ``user_tower(x) -> (B, D)``, ``item_tower(x) -> (B, D)`` and
    ``score(x)`` (training logits). ``forward`` returns the tower selected by ``mode``:

    * ``mode = None`` (training): ``score(x)``, logits;
    * ``mode = "user"``: ``user_tower(x)``;
    * ``mode = "item"``: ``item_tower(x)``.
    """

    returns_logits = True

    @property
    def mode(self) -> str | None:
        """``None`` (training scores), ``"user"`` or ``"item"`` (embedding export)."""
        return self.__dict__.get("_tower_mode")

    @mode.setter
    def mode(self, value: str | None) -> None:
        if value not in TOWER_MODES:
            raise ValueError(f"mode must be one of {TOWER_MODES}, got mode={value!r}")
        self.__dict__["_tower_mode"] = value

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, x: dict[str, torch.Tensor]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: dict[str, torch.Tensor]) -> Any:
        mode = self.mode
        if mode == "user":
            return self.user_tower(x)
        if mode == "item":
            return self.item_tower(x)
        return self.score(x)


# --------------------------------------------------------------------------- arguments


def total_dim(features: Sequence[Feature]) -> int:
    """Width of ``EmbeddingLayer(..., squeeze_dim=True)`` for pooled features."""
    return sum(f.embed_dim for f in features)


def tower_params(params: dict[str, Any] | None, arg: str, default_dims: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of a tower MLP (``output_layer`` is always False: a tower outputs a vector)."""
    params = dict(params) if params is not None else {"dims": list(default_dims)}
    unknown = set(params) - _TOWER_KEYS
    if unknown:
        raise ValueError(f"{arg} has unknown keys {sorted(unknown)}; allowed: {sorted(_TOWER_KEYS)}")
    if not params.get("dims"):
        raise ValueError(f"{arg}['dims'] must list at least one layer width, got {params.get('dims')!r}")
    return params


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    return temperature


def _as_schema(schema: Any) -> FeatureSchema | None:
    if isinstance(schema, dict):
        return FeatureSchema.from_dict(schema)
    return schema


def resolve_group(value: Any, schema: FeatureSchema | None, group: str, arg: str) -> list[Feature]:
    """:func:`resolve_features` defaulting to a schema *group* (even when a feature has the
    group's name, as ``neg_items`` does)."""
    schema = _as_schema(schema)
    if value is None and schema is not None and group in schema.groups:
        return schema.group(group)
    return resolve_features(value, schema, group, arg)


def resolve_optional(value: Any, schema: FeatureSchema | None, group: str, arg: str) -> list[Feature]:
    """Like :func:`resolve_group`, but an absent schema group gives ``[]`` instead of an error."""
    schema = _as_schema(schema)
    if value is None and (schema is None or group not in schema.groups):
        return []
    return resolve_group(value, schema, group, arg)


def resolve_single(value: Any, schema: FeatureSchema | None, default: Feature | None, arg: str) -> Feature | None:
    """One feature from a feature object, a one-element list, a name, or ``default``."""
    if value is None:
        return default
    if isinstance(value, (SparseFeature, DenseFeature)):
        return value
    feats = resolve_features([value] if isinstance(value, str) else value, _as_schema(schema), "", arg)
    if len(feats) != 1:
        raise ValueError(f"{arg} must name exactly one feature, got {[f.name for f in feats]}")
    return feats[0]


def schema_item_id(schema: FeatureSchema | None, arg: str) -> Feature | None:
    """The item id feature of a matching schema: the first feature of its ``"item"`` group."""
    schema = _as_schema(schema)
    if schema is None:
        return None
    if "item" not in schema.groups or not schema.groups["item"]:
        raise ValueError(f"{arg}: the schema has no 'item' group to take the item id feature from")
    return schema[schema.groups["item"][0]]


def schema_history(schema: FeatureSchema | None, arg: str) -> SequenceFeature | None:
    """The behaviour history of a matching schema: the first sequence feature of its ``"user"`` group."""
    schema = _as_schema(schema)
    if schema is None:
        return None
    seqs = [f for f in schema.group("user") if isinstance(f, SequenceFeature)] if "user" in schema.groups else []
    if not seqs:
        raise ValueError(f"{arg}: the schema's 'user' group holds no sequence (history) feature")
    return seqs[0]


# --------------------------------------------------------------------------- negatives


def pair_negatives(
    item_features: Sequence[Feature], neg_features: Sequence[Feature], arg: str, strict: bool = True
) -> list[tuple[Feature, Feature]]:
    """Match each item feature with the negative feature that stands for it.

    Negatives sharing an item feature's table (``shared_with``) pair with it; otherwise
    the lists pair by position (the reference's ``pos_item_features`` /
    ``neg_item_features``). With ``strict=False`` (defaults taken from a schema),
    negative features that pair with no item feature are ignored.

    Raises:
        ValueError: when an item feature has no negative counterpart, or (strict) a
            negative feature stands for no item feature.
    """
    if not neg_features:
        return []
    by_table = {f.table_name: f for f in item_features if isinstance(f, SparseFeature)}
    pairs: list[tuple[Feature, Feature]] = []
    if all(isinstance(n, SparseFeature) and n.table_name in by_table for n in neg_features):
        used = {}
        for n in neg_features:
            used.setdefault(by_table[n.table_name].name, n)  # type: ignore[union-attr]
        pairs = [(f, used[f.name]) for f in item_features if f.name in used]
    elif not strict:
        chosen = [n for n in neg_features if isinstance(n, SparseFeature) and n.table_name in by_table]
        pairs = [(by_table[n.table_name], n) for n in chosen]  # type: ignore[union-attr]
    elif len(neg_features) == len(item_features):
        pairs = list(zip(item_features, neg_features))
    else:
        raise ValueError(
            f"{arg}: cannot tell which item feature each negative feature {[n.name for n in neg_features]} "
            f"stands for: give them shared_with=<item feature> or one per item feature "
            f"{[f.name for f in item_features]}, in the same order"
        )
    missing = [f.name for f in item_features if f.name not in {p[0].name for p in pairs}]
    if missing:
        raise ValueError(
            f"{arg}: no negative counterpart for the item feature(s) {missing}; the item tower needs every one "
            f"of them for the negatives (negatives given: {[n.name for n in neg_features]})"
        )
    return pairs


def negative_inputs(x: dict[str, torch.Tensor], pairs: Sequence[tuple[Feature, Feature]]) -> tuple[dict[str, torch.Tensor], int, int] | None:
    """The item tower's input for the batch's negatives, flattened to ``B * N`` rows.

    Returns ``(inputs, B, N)``, or ``None`` when the batch carries no negatives.
    """
    if not pairs or pairs[0][1].name not in x:
        return None
    first = x[pairs[0][1].name]
    batch = first.shape[0]
    n_neg = 1 if first.dim() == 1 else first.shape[1]
    inputs = {}
    for item_f, neg_f in pairs:
        if neg_f.name not in x:
            raise KeyError(f"negative feature {neg_f.name!r} is missing from the batch (have {sorted(x)})")
        v = x[neg_f.name]
        rest = v.shape[2:] if v.dim() > 2 else ()
        inputs[item_f.name] = v.reshape(batch * n_neg, *rest)
    return inputs, batch, n_neg


def dot_logits(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """``<u, v>`` as ``(B,)``, or ``(B, 1 + N)`` with the positive first when negatives ``(B, N, D)`` are given."""
    pos_score = (user * pos).sum(-1)
    if neg is None:
        return pos_score
    neg_score = torch.einsum("bd,bnd->bn", user, neg)
    return torch.cat([pos_score.unsqueeze(1), neg_score], dim=1)


# --------------------------------------------------------------------------- sequences


def sequence_mask(feature: SparseFeature, ids: torch.Tensor) -> torch.Tensor:
    """``True`` at real positions; padding is the feature's ``padding_idx`` (0 when unset,
    the value :func:`~rechub_lightning.data.sequence.gen_model_input` pads with)."""
    pad = feature.padding_idx if feature.padding_idx is not None else 0
    return ids != pad


def last_valid(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, L, D) -> (B, D)``: the output at each row's last real position, for pre- and
    post-padded sequences alike (the last position for an all-padding row)."""
    length = mask.shape[1]
    flipped_first = torch.flip(mask, dims=[1]).int().argmax(dim=1)  # 0 when the last position is real
    index = (length - 1 - flipped_first).where(mask.any(dim=1), torch.full_like(flipped_first, length - 1))
    return seq.gather(1, index.view(-1, 1, 1).expand(-1, 1, seq.shape[-1])).squeeze(1)


def init_rows_(weight_rows: torch.Tensor, std: float, padding_idx: int | None) -> None:
    """Normal(0, std) initialisation of a feature's block of rows, padding row zeroed."""
    with torch.no_grad():
        nn.init.normal_(weight_rows, 0.0, std)
        if padding_idx is not None:
            weight_rows[padding_idx].zero_()


class SessionModel(MatchModel):
    """Base of the sequence models whose items are rows of the history's embedding table
    (NARM, STAMP, SASRec): the item tower looks the target ids up in that table."""

    item_history_feature: SequenceFeature
    item_feature: Feature | None

    def _setup_items(
        self,
        history: Feature | None,
        item_feature: Feature | None,
        neg_features: Sequence[Feature],
        schema: FeatureSchema | None,
        strict: bool,
    ) -> None:
        if history is None:
            raise ValueError("item_history_feature is required (a SequenceFeature, or a schema to take it from)")
        if not isinstance(history, SequenceFeature):
            raise TypeError(f"item_history_feature must be a SequenceFeature, got {history!r}")
        schema = _as_schema(schema)
        self.item_history_feature = history
        self.item_feature = item_feature
        features: list[Feature] = [history]
        if history.shared_with is not None:
            if item_feature is not None and item_feature.name == history.shared_with:
                owner: Feature | None = item_feature
            elif schema is not None and history.shared_with in schema:
                owner = schema[history.shared_with]
            else:
                owner = None
            if owner is None:
                raise ValueError(
                    f"{history.name!r} shares the table of {history.shared_with!r}: pass that feature as item_feature "
                    f"(or a schema holding it)"
                )
            features.append(owner)
        self.embedding = EmbeddingLayer(features)
        self.neg_item_feature = list(neg_features)
        self.neg_pairs = (
            pair_negatives([item_feature], self.neg_item_feature, "neg_item_feature", strict=strict)
            if item_feature is not None and self.neg_item_feature
            else []
        )

    def item_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(*ids.shape, D)`` of item ids, rows of the history's table."""
        return self.embedding.embed_sequence({self.item_history_feature.name: ids}, self.item_history_feature)[0]

    def all_item_embeddings(self) -> torch.Tensor:
        """The whole item table ``(vocab_size, D)`` (row = item id), looked up so that sparse
        embedding gradients stay sparse."""
        table = self.embedding.table_for(self.item_history_feature)
        ids = torch.arange(self.item_history_feature.vocab_size, device=table.weight.device)
        return self.item_embedding(ids)

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embedding ``(B, D)`` of the batch's target items."""
        if self.item_feature is None:
            raise ValueError(
                f"{type(self).__name__} was built without item_feature: it has no item tower (give the target item "
                "id feature, needed for in-batch negatives and embedding export)"
            )
        return self.item_embedding(x[self.item_feature.name])

    def negative_embeddings(self, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(B, N, D)`` embeddings of the batch's negative items, or ``None``."""
        neg = negative_inputs(x, self.neg_pairs)
        if neg is None:
            return None
        inputs, batch, n_neg = neg
        return self.item_tower(inputs).view(batch, n_neg, -1)
