"""ComiRec-SA and ComiRec-DR (Cen et al., "Controllable Multi-Interest Framework for
Recommendation", KDD'20, https://arxiv.org/abs/2005.09347).

Also home of what the multi-interest retrieval models (MIND, ComiRec, SINE) share: the
default feature selection from a match schema and the two-tower scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...features import DenseFeature, Feature, FeatureSchema, SequenceFeature, SparseFeature, resolve_features
from ...layers.embedding import EmbeddingLayer
from ...layers.multi_interest import CapsuleNetwork, LabelAwareAttention, MultiInterestSA
from ..base import RecModel

__all__ = ["ComirecSA", "ComirecDR", "MultiInterestMatchModel", "resolve_multi_interest_features"]

FeatureArg = Sequence[Feature] | str | Sequence[str] | None


def _schema(schema: FeatureSchema | dict | None) -> FeatureSchema | None:
    return FeatureSchema.from_dict(schema) if isinstance(schema, dict) else schema


def resolve_multi_interest_features(
    user_features: FeatureArg,
    history_features: FeatureArg,
    item_features: FeatureArg,
    neg_item_feature: FeatureArg,
    schema: FeatureSchema | dict | None,
    neg_arg: str = "neg_item_feature",
) -> tuple[list[Feature], SequenceFeature, SparseFeature, SparseFeature | None]:
    """Resolve and check the features of a multi-interest model.

    Explicit lists, selectors or names are used as given. Defaults, from a match ``schema``:

    * ``item_features``: the first sparse feature of group ``"item"`` (the target item id);
    * ``history_features``: the sequence features of group ``"user"`` that read the item
      id's embedding rows (``shared_with``), e.g. ``hist_item_id``;
    * ``user_features``: the rest of group ``"user"`` (the user profile);
    * ``neg_item_feature``: group ``"neg_items"`` when the schema has it, else none
      (point-wise data).

    Returns:
        ``(user features, history feature, item id feature, negatives feature or None)``.

    Raises:
        ValueError: a feature list has the wrong number or kind of features, the history
            width differs from the item's, or the negatives do not share the item's rows.
    """
    schema = _schema(schema)
    if item_features is None and schema is not None:
        ids = [f for f in schema.group("item") if type(f) is SparseFeature]
        if not ids:
            raise ValueError("item_features=None: the schema's 'item' group has no sparse item id feature")
        item_features = [ids[0].name]
    items = resolve_features(item_features, schema, "item", "item_features")
    if len(items) != 1 or type(items[0]) is not SparseFeature:
        raise ValueError(
            f"item_features must be exactly one sparse item id feature (its embedding is the item's "
            f"representation, shared with the history and the negatives), got {[f.name for f in items]}"
        )
    item = items[0]

    if history_features is None and schema is not None:
        seqs = [f for f in schema.group("user") if isinstance(f, SequenceFeature)]
        history_features = [f.name for f in seqs if f.table_name == item.table_name] or [f.name for f in seqs]
    histories = resolve_features(history_features, schema, "user", "history_features")
    if len(histories) != 1 or not isinstance(histories[0], SequenceFeature):
        raise ValueError(
            f"history_features must be exactly one behaviour sequence feature, got {[f.name for f in histories]}"
        )
    history = histories[0]
    if history.embed_dim != item.embed_dim:
        raise ValueError(
            f"history feature {history.name!r} (embed_dim={history.embed_dim}) and item feature "
            f"{item.name!r} (embed_dim={item.embed_dim}) must have the same width"
        )

    if user_features is None and schema is not None:
        user_features = [f.name for f in schema.group("user") if f.name != history.name]
    users = [] if user_features is None else resolve_features(user_features, schema, "user", "user_features")
    users = [f for f in users if f.name != history.name]
    for f in users:
        if isinstance(f, SequenceFeature) and f.pooling == "concat":
            raise ValueError(f"user feature {f.name!r} has pooling='concat'; user features must be pooled")

    if neg_item_feature is None and schema is not None and "neg_items" in schema.groups:
        neg_item_feature = "neg_items"
    negs = [] if neg_item_feature is None else resolve_features(neg_item_feature, schema, "neg_items", neg_arg)
    if len(negs) > 1 or any(isinstance(f, DenseFeature) or f.table_name != item.table_name for f in negs):
        raise ValueError(
            f"{neg_arg} must be one feature of negative item ids that shares the rows of {item.name!r} "
            f"(shared_with={item.table_name!r}), got {negs}"
        )
    return users, history, item, (negs[0] if negs else None)


class MultiInterestMatchModel(RecModel):
    """Two towers of a multi-interest retrieval model: ``K`` user interests, one item vector.

    Subclasses implement :meth:`user_interests`. ``forward`` follows ``mode``:

    * ``"user"``: :meth:`user_tower` ``(B, K, D)``; ``"item"``: :meth:`item_tower` ``(B, D)``;
    * ``None`` (training): the interest read out for the target item (:attr:`readout`)
      scored against the target, logits ``(B,)``, or against the target and the batch's
      negatives when it carries them, logits ``(B, 1 + N)`` with the positive first.
    """

    #: L2-normalise interests and items (scores are cosines divided by the temperature).
    normalize: bool = True

    def _setup_features(
        self,
        user_features: FeatureArg,
        history_features: FeatureArg,
        item_features: FeatureArg,
        neg_item_feature: FeatureArg,
        schema: FeatureSchema | dict | None,
        neg_arg: str = "neg_item_feature",
    ) -> None:
        users, history, item, neg = resolve_multi_interest_features(
            user_features, history_features, item_features, neg_item_feature, schema, neg_arg
        )
        self.user_features: list[Feature] = users
        self.history_features: list[SequenceFeature] = [history]
        self.item_features: list[SparseFeature] = [item]
        self.neg_item_feature: list[SparseFeature] = [] if neg is None else [neg]
        self.embedding = EmbeddingLayer(users + [item, history] + self.neg_item_feature)
        self.embed_dim = item.embed_dim
        self.user_dims = sum(f.embed_dim for f in users)
        # Padding id of the history (the datamodules reserve 0, like the reference's `> 0`).
        self.history_padding = 0 if history.padding_idx is None else history.padding_idx
        self.mode: str | None = None

    # ------------------------------------------------------------------ pieces
    def history_mask(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Validity mask ``(B, L)`` (bool) of the behaviour sequence."""
        return x[self.history_features[0].name] != self.history_padding

    def history_embedding(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Behaviour embeddings ``(B, L, D)`` and their validity mask ``(B, L)`` (bool)."""
        emb, _ = self.embedding.embed_sequence(x, self.history_features[0])
        return emb, self.history_mask(x)

    def user_interests(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(interests (B, K, D), active-interest mask (B, K) or None)``."""
        raise NotImplementedError

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """User interests ``(B, K, D)`` (inactive interests, if any, are zero rows)."""
        return self.user_interests(x)[0]

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Target item embedding ``(B, D)``."""
        emb = self.embedding(x, self.item_features, squeeze_dim=False).squeeze(1)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb

    def negative_items(self, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Embeddings ``(B, N, D)`` of the batch's negative items, or None if it has none."""
        if not self.neg_item_feature or self.neg_item_feature[0].name not in x:
            return None
        feature = self.neg_item_feature[0]
        ids = x[feature.name]
        if ids.dim() == 1:  # one negative per row (pair-wise data)
            ids = ids.unsqueeze(1)
        emb, _ = self.embedding.embed_sequence({feature.name: ids}, feature)  # type: ignore[arg-type]
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb

    def project_interests(self, interests: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """``normalize([user profile, interest_k] @ convert_user_weight)`` for every interest."""
        weight = self.convert_user_weight
        out = interests @ weight[self.user_dims :]
        if self.user_features:
            # Same as concatenating the profile to every interest, without materialising K copies.
            profile = self.embedding(x, self.user_features, squeeze_dim=True)
            out = out + (profile @ weight[: self.user_dims]).unsqueeze(1)
        return F.normalize(out, p=2, dim=-1)

    def _init_projection(self) -> None:
        # Glorot-uniform instead of the reference's U(0, 1): the output is L2-normalised, so
        # an all-positive matrix maps every input close to the same direction at start.
        self.convert_user_weight = nn.Parameter(torch.empty(self.user_dims + self.embed_dim, self.embed_dim))
        nn.init.xavier_uniform_(self.convert_user_weight)

    def score(self, user: torch.Tensor, target: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the target ``(B,)``, or of ``[target, negatives]`` ``(B, 1 + N)``."""
        negatives = self.negative_items(x)
        if negatives is None:
            logits = (user * target).sum(dim=-1)
        else:
            candidates = torch.cat([target.unsqueeze(1), negatives], dim=1)
            logits = torch.einsum("bd,bnd->bn", user, candidates)
        return logits / self.logit_temperature

    @property
    def logit_temperature(self) -> float:
        """What the logits are divided by (``temperature`` unless a model says otherwise)."""
        return self.temperature

    # ------------------------------------------------------------------ forward
    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode == "item":
            return self.item_tower(x)
        interests, interest_mask = self.user_interests(x)
        if self.mode == "user":
            return interests
        if self.mode is not None:
            raise ValueError(f"mode must be None, 'user' or 'item', got {self.mode!r}")
        target = self.item_tower(x)
        user = self.readout(interests, target, interest_mask, 1.0 / self.logit_temperature)
        return self.score(user, target, x)


class ComirecSA(MultiInterestMatchModel):
    """ComiRec-SA: self-attentive multi-interest extraction (Cen et al., KDD'20, Sec. 3.2.2).

    ``K`` attention heads over the behaviour sequence give ``K`` interests; each is
    concatenated with the user profile (if any), projected to the item space and
    L2-normalised. Training reads out the interest with the largest inner product with
    the target item (hard attention, Sec. 3.3) and scores it against the target (and the
    batch's negatives) with cosine similarity divided by ``temperature``.

    Differences from Torch-RecHub 0.9.0 (each fixes a defect): ``temperature`` divides the
    logits (the reference stores it and never uses it); the self-attention layer has no
    unused parameter and honours ``hidden_dim`` (see :class:`MultiInterestSA`); the profile
    part is optional (ComiRec itself has no user profile; the reference fails without
    one); point-wise batches (no negatives) are supported; ``item_features`` must be the one
    item id feature (the reference's item tower breaks with more).

    Args:
        user_features: user profile features (default: group ``"user"`` minus the history).
        history_features: the behaviour sequence, sharing the item id's rows (default: from
            group ``"user"``).
        item_features: the target item id feature (default: first sparse of group ``"item"``).
        neg_item_feature: the negative item ids feature, list-wise training (default: group
            ``"neg_items"`` if the schema has it).
        temperature: logits are ``cos / temperature``.
        interest_num: number of interests ``K``.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``mode=None``: logits ``(B,)`` or ``(B, 1 + N)``; ``"user"``: ``(B, K, D)``;
        ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: FeatureArg = None,
        history_features: FeatureArg = None,
        item_features: FeatureArg = None,
        neg_item_feature: FeatureArg = None,
        temperature: float = 1.0,
        interest_num: int = 4,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self._setup_features(user_features, history_features, item_features, neg_item_feature, schema)
        self.temperature = float(temperature)
        self.interest_num = int(interest_num)
        self.multi_interest_sa = MultiInterestSA(self.embed_dim, self.interest_num)
        self._init_projection()
        self.readout = LabelAwareAttention(float("inf"))

    def user_interests(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        emb, mask = self.history_embedding(x)
        return self.project_interests(self.multi_interest_sa(emb, mask), x), None


class ComirecDR(MultiInterestMatchModel):
    """ComiRec-DR: dynamic-routing multi-interest extraction (Cen et al., KDD'20, Sec. 3.2.1).

    A capsule network with a bilinear map per (position, interest) routes the behaviours
    into ``K`` interest capsules (3 iterations); the rest is as in :class:`ComirecSA`.

    Differences from Torch-RecHub 0.9.0 (each fixes a defect): the routing softmax runs
    over the interests, as in the paper and the authors' code, not over the sequence (which
    let padding take weight from real behaviours); the bilinear weights are initialised
    (the reference leaves them uninitialised memory); histories shorter than
    ``max_length`` and pre-padded histories work (positions are counted from the first
    real behaviour); ``temperature`` divides the logits; plus the tower and feature fixes
    listed in :class:`ComirecSA`.

    Args:
        user_features: user profile features (default: group ``"user"`` minus the history).
        history_features: the behaviour sequence (default: from group ``"user"``).
        item_features: the target item id feature (default: first sparse of group ``"item"``).
        neg_item_feature: negative item ids (default: group ``"neg_items"`` if present).
        max_length: longest history (size of the position-dependent routing maps).
        temperature: logits are ``cos / temperature``.
        interest_num: number of interests ``K``.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``mode=None``: logits ``(B,)`` or ``(B, 1 + N)``; ``"user"``: ``(B, K, D)``;
        ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: FeatureArg = None,
        history_features: FeatureArg = None,
        item_features: FeatureArg = None,
        neg_item_feature: FeatureArg = None,
        max_length: int = 50,
        temperature: float = 1.0,
        interest_num: int = 4,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self._setup_features(user_features, history_features, item_features, neg_item_feature, schema)
        self.max_length = int(max_length)
        self.temperature = float(temperature)
        self.interest_num = int(interest_num)
        self.capsule = CapsuleNetwork(self.embed_dim, self.max_length, bilinear_type=2, interest_num=self.interest_num)
        self._init_projection()
        self.readout = LabelAwareAttention(float("inf"))

    def user_interests(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        emb, mask = self.history_embedding(x)
        return self.project_interests(self.capsule(emb, mask), x), None
