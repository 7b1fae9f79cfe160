"""MIND: Multi-Interest Network with Dynamic routing (Li et al., CIKM'19,
https://arxiv.org/abs/1904.08030)."""

from __future__ import annotations

import torch

from ...features import FeatureSchema
from ...layers.multi_interest import CapsuleNetwork, LabelAwareAttention
from .comirec import FeatureArg, MultiInterestMatchModel

__all__ = ["MIND", "dynamic_interest_mask"]


def dynamic_interest_mask(mask: torch.Tensor, interest_num: int) -> torch.Tensor:
    """Active interests per user, ``K'_u = max(1, min(K, floor(log2 |I_u|)))`` (MIND, Eq. 6).

    Args:
        mask: ``(B, L)`` validity mask of the history (True/1 = real behaviour).
        interest_num: the upper bound ``K``.

    Returns:
        Bool ``(B, K)``, True for the first ``K'_u`` interests of each user.

    Example:
        >>> dynamic_interest_mask(torch.tensor([[1] * 5 + [0] * 3, [1] + [0] * 7]), 4)
        tensor([[ True,  True, False, False],
                [ True, False, False, False]])
    """
    count = mask.sum(dim=1).float().clamp(min=1.0)
    active = torch.floor(torch.log2(count)).clamp(min=1, max=interest_num)
    return torch.arange(interest_num, device=mask.device).unsqueeze(0) < active.unsqueeze(1)


class MIND(MultiInterestMatchModel):
    """MIND: behaviour-to-interest dynamic routing plus label-aware attention (Li et al., CIKM'19).

    The multi-interest extractor routes the behaviour sequence into ``K`` interest capsules
    with one bilinear map shared by all interests and random (fixed) initial routing
    logits (B2I routing, Algorithm 1). Each capsule is concatenated with the user
    profile, projected to the item space and L2-normalised. During training the
    label-aware attention (Eq. 8) reads one user vector out of the interests with the
    target item, ``softmax(p * cos / temperature)`` weights (``p = inf``: the closest
    interest, the paper's best setting and the reference's behaviour), which is scored
    against the target (and the batch's negatives) as ``cos / temperature``.

    With ``dynamic_interest=True`` a user gets ``K'_u = max(1, min(K, floor(log2 |I_u|)))``
    interests (Eq. 6): the inactive interests take no part in the routing, are never
    attended to, and are zero rows of the user tower (skip them when indexing).

    Differences from Torch-RecHub 0.9.0 (each fixes a defect): the routing softmax runs
    over the interests, as in the paper, not over the sequence (padding took weight from
    real behaviours); the initial routing logits are drawn once and kept as a buffer
    instead of at every call (the user tower was random at inference); inactive interests
    are removed from the routing itself (with a softmax over interests, zeroing them
    afterwards would change the active ones); ``temperature`` divides the logits (the
    reference ignores it); histories shorter than ``max_length`` and pre-padded histories
    work; the projection is Glorot- instead of ``U(0, 1)``-initialised; point-wise
    batches and a missing user profile are supported.

    Args:
        user_features: user profile features (default: group ``"user"`` minus the history).
        history_features: the behaviour sequence, sharing the item id's rows (default: from
            group ``"user"``).
        item_features: the target item id feature (default: first sparse of group ``"item"``).
        neg_item_feature: negative item ids, list-wise training (default: group
            ``"neg_items"`` if the schema has it).
        max_length: longest history (size of the initial routing logits).
        temperature: logits are ``cos / temperature``.
        interest_num: number of interests ``K`` (upper bound with ``dynamic_interest``).
        dynamic_interest: size each user's interests by the history length (Eq. 6).
        label_attention_power: the ``p`` of the label-aware attention; ``inf`` = hard.
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
        dynamic_interest: bool = False,
        *,
        label_attention_power: float = float("inf"),
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self._setup_features(user_features, history_features, item_features, neg_item_feature, schema)
        self.max_length = int(max_length)
        self.temperature = float(temperature)
        self.interest_num = int(interest_num)
        self.dynamic_interest = bool(dynamic_interest)
        self.capsule = CapsuleNetwork(self.embed_dim, self.max_length, bilinear_type=0, interest_num=self.interest_num)
        self._init_projection()
        self.readout = LabelAwareAttention(label_attention_power)

    def active_interest_mask(self, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Bool ``(B, K)`` of each user's active interests, or None without ``dynamic_interest``."""
        if not self.dynamic_interest:
            return None
        return dynamic_interest_mask(self.history_mask(x), self.interest_num)

    def user_interests(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb, mask = self.history_embedding(x)
        interest_mask = dynamic_interest_mask(mask, self.interest_num) if self.dynamic_interest else None
        interests = self.project_interests(self.capsule(emb, mask, interest_mask), x)
        if interest_mask is not None:
            interests = interests * interest_mask.unsqueeze(-1).to(interests.dtype)
        return interests, interest_mask
