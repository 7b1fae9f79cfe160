"""YoutubeSBC: sampling-bias-corrected two-tower retrieval (Yi et al., RecSys'19,
https://dl.acm.org/doi/10.1145/3298689.3346996)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...features import Feature, FeatureSchema
from ...layers import MLP, EmbeddingLayer
from ...losses import masked_fill_value
from ._match_common import MatchModel, check_temperature, resolve_group, resolve_optional, total_dim, tower_params

__all__ = ["YoutubeSBC"]


class YoutubeSBC(MatchModel):
    """Two towers trained with an in-batch softmax whose logits are corrected by ``log q``.

    Row ``i`` of a batch scores its own item and the items of the next ``n_neg`` rows
    (cyclically, as in the reference): ``logit = cos(u_i, v_j) / temperature - log q_j``
    with ``q_j`` the item's sampling probability (the ``sample_weight`` feature). Yi et
    al. correct the temperature-scaled logit; the reference divided the correction by the
    temperature too. Columns holding the row's own item again (an *accidental hit*) are
    masked. The index pattern is built for each batch's size, so no ``batch_size`` has to
    match the loader (the argument is kept for the reference's signature) and the last,
    smaller batch is handled; a batch of ``B <= n_neg`` rows scores ``B - 1`` negatives.
    Towers are L2-normalised, so exported embeddings are searched by inner product.

    Args:
        user_features: user tower features (default: the schema's ``"user"`` group).
        item_features: item tower features (default: the ``"item"`` group); the first
            one is the item id used to detect accidental hits.
        sample_weight_feature: a dense feature holding each row's item sampling
            probability ``q`` (default: the schema's ``"sample_weight"`` group).
        user_params: user MLP ``{"dims", "dropout", "activation", "batch_norm"}``.
        item_params: item MLP; same last width as the user MLP.
        batch_size: unused (reference signature).
        n_neg: in-batch negatives per row.
        temperature: cosine temperature.
        schema: the datamodule's feature schema.

    Shape:
        ``mode=None``: ``(B, 1 + min(n_neg, B - 1))`` logits, positive first (train with
        ``MatchModule(mode=2)``). ``mode="user"`` / ``"item"``: ``(B, D)``.
    """

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        sample_weight_feature: Sequence[Feature] | Sequence[str] | str | None = None,
        user_params: dict[str, Any] | None = None,
        item_params: dict[str, Any] | None = None,
        batch_size: int | None = None,
        n_neg: int = 3,
        temperature: float = 1.0,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.user_features = resolve_group(user_features, schema, "user", "user_features")
        self.item_features = resolve_group(item_features, schema, "item", "item_features")
        self.sample_weight_feature = resolve_optional(sample_weight_feature, schema, "sample_weight", "sample_weight_feature")
        if len(self.sample_weight_feature) != 1:
            raise ValueError(
                "YoutubeSBC needs exactly one sample_weight_feature (each row's item sampling probability); "
                f"got {[f.name for f in self.sample_weight_feature]}"
            )
        if int(n_neg) < 1:
            raise ValueError(f"n_neg must be >= 1, got n_neg={n_neg}")
        self.n_neg = int(n_neg)
        self.batch_size = batch_size
        self.temperature = check_temperature(temperature)
        self.embedding = EmbeddingLayer(self.user_features + self.item_features)
        self.user_mlp = MLP(total_dim(self.user_features), output_layer=False, **tower_params(user_params, "user_params", [128, 64, 16]))
        self.item_mlp = MLP(total_dim(self.item_features), output_layer=False, **tower_params(item_params, "item_params", [128, 64, 16]))
        if self.user_mlp.output_dim != self.item_mlp.output_dim:
            raise ValueError(
                f"the towers must end with the same width: user_params dims end with {self.user_mlp.output_dim}, "
                f"item_params dims with {self.item_mlp.output_dim}"
            )

    def user_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user embedding ``(B, D)``."""
        return F.normalize(self.user_mlp(self.embedding(x, self.user_features, squeeze_dim=True)), p=2, dim=1)

    def item_tower(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised item embedding ``(B, D)``."""
        return F.normalize(self.item_mlp(self.embedding(x, self.item_features, squeeze_dim=True)), p=2, dim=1)

    def score(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bias-corrected in-batch logits ``(B, 1 + n_neg)``, the row's own item first."""
        user, item = self.user_tower(x), self.item_tower(x)
        batch = user.shape[0]
        q = x[self.sample_weight_feature[0].name].reshape(-1).to(user.dtype)
        scores = user @ item.T / self.temperature - torch.log(q.clamp_min(torch.finfo(q.dtype).tiny)).unsqueeze(0)
        k = min(self.n_neg, batch - 1)
        cols = (torch.arange(batch, device=user.device).unsqueeze(1) + torch.arange(k + 1, device=user.device)) % batch
        logits = scores.gather(1, cols)
        ids = x[self.item_features[0].name].reshape(-1)
        hits = ids[cols[:, 1:]] == ids.unsqueeze(1)
        return torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hits, masked_fill_value(logits.dtype))], dim=1)
