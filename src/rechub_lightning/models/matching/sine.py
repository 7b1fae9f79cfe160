"""SINE: Sparse-Interest Network (Tan et al., "Sparse-Interest Network for Sequential
Recommendation", WSDM'21, https://arxiv.org/abs/2102.09267)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...features import FeatureSchema, SequenceFeature, SparseFeature
from ...layers.multi_interest import LabelAwareAttention
from ...layers.sequence import left_align
from .comirec import FeatureArg, MultiInterestMatchModel

__all__ = ["SINE"]


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``valid`` positions (others get 0)."""
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim).masked_fill(~valid, 0.0)


def _names_only(value: FeatureArg) -> bool:
    return value is not None and not isinstance(value, str) and all(isinstance(v, str) for v in value)


class SINE(MultiInterestMatchModel):
    """SINE: sparse-interest extraction and adaptive interest aggregation (Tan et al., WSDM'21).

    From a large pool of ``num_concept`` conceptual prototypes, each user activates the
    ``num_intention`` closest to a self-attentive summary of the history (Sec. 3.2,
    "sparse-interest extraction"); every behaviour is softly assigned to the activated
    intentions and attention-pooled per intention into ``K`` interest embeddings. The
    adaptive aggregation (Sec. 3.3) predicts the user's next intention from the
    intention-aware behaviours and mixes the interests with ``softmax(c_apt^T phi_k /
    temperature)`` into one user vector ``v_u``, which is scored against the target (and
    the batch's negatives) by inner product. As in the paper and the reference,
    ``temperature`` is the aggregation temperature (Eq. 14) and the logits are raw inner
    products; item embeddings are not normalised.

    The user tower returns ``v_u`` as ``(B, 1, D)`` (so :attr:`interest_num` is 1);
    :meth:`intentions` returns the ``K`` interest embeddings ``(B, K, D)`` and
    :meth:`covariance_loss` the concept covariance regulariser ``L_c`` of the paper (add
    ``lambda * L_c`` to the training loss to use it).

    Differences from Torch-RecHub 0.9.0 (each fixes a defect): histories shorter than
    ``seq_max_len`` and pre-padded histories work (the reference only accepts exactly
    ``seq_max_len`` positions; positions are counted from the first real behaviour);
    ``num_heads > 1`` pools each head over the sequence (the reference reshapes
    ``(B, L, H)`` into ``(B * H, L)`` rows, mixing users and heads); weights start from
    Glorot-uniform instead of ``U(0, 1)``; the item table is the item id feature's rows
    (features or names may be given, as in the reference); point-wise batches are
    supported.

    Args:
        history_features: the behaviour sequence (feature, name, or selector; default: the
            sequence of group ``"user"`` that shares the item id's rows).
        item_features: the target item id (default: first sparse of group ``"item"``).
        neg_item_features: negative item ids (default: group ``"neg_items"`` if present).
        num_items: item vocabulary size (taken from the item feature when omitted; needed
            when features are given by name without a schema).
        embedding_dim: embedding width (taken from the item feature when omitted).
        hidden_dim: hidden width of the attention networks.
        num_concept: size of the conceptual prototype pool ``L``.
        num_intention: number of activated intentions ``K`` per user.
        seq_max_len: longest history (size of the position embedding).
        num_heads: attention heads of the history summary and the next-intention attention.
        temperature: aggregation temperature ``tau`` (Eq. 14).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``mode=None``: logits ``(B,)`` or ``(B, 1 + N)``; ``"user"``: ``(B, 1, D)``;
        ``"item"``: ``(B, D)``.
    """

    normalize = False

    def __init__(
        self,
        history_features: FeatureArg = None,
        item_features: FeatureArg = None,
        neg_item_features: FeatureArg = None,
        num_items: int | None = None,
        embedding_dim: int | None = None,
        hidden_dim: int = 32,
        num_concept: int = 16,
        num_intention: int = 4,
        seq_max_len: int = 50,
        num_heads: int = 1,
        temperature: float = 1.0,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if schema is None and _names_only(item_features):
            # The reference's call style: names plus num_items / embedding_dim.
            if num_items is None or embedding_dim is None:
                raise ValueError("features given by name without a schema need num_items and embedding_dim")
            item_name = item_features[0]  # type: ignore[index]
            item_features = [SparseFeature(item_name, num_items, embedding_dim, padding_idx=0)]
            if _names_only(history_features):
                history_features = [
                    SequenceFeature(n, num_items, embedding_dim, "concat", shared_with=item_name, padding_idx=0)
                    for n in history_features  # type: ignore[union-attr]
                ]
            if _names_only(neg_item_features):
                neg_item_features = [
                    SequenceFeature(n, num_items, embedding_dim, "concat", shared_with=item_name)
                    for n in neg_item_features  # type: ignore[union-attr]
                ]
        self._setup_features([], history_features, item_features, neg_item_features, schema, "neg_item_features")
        item = self.item_features[0]
        if num_items is not None and num_items != item.vocab_size:
            raise ValueError(f"num_items={num_items} differs from {item.name!r}'s vocab_size={item.vocab_size}")
        if embedding_dim is not None and embedding_dim != item.embed_dim:
            raise ValueError(f"embedding_dim={embedding_dim} differs from {item.name!r}'s embed_dim={item.embed_dim}")
        if not 1 <= num_intention <= num_concept:
            raise ValueError(f"need 1 <= num_intention <= num_concept, got {num_intention} and {num_concept}")
        dim = self.embed_dim
        self.num_items = item.vocab_size
        self.num_concept = int(num_concept)
        self.num_intention = int(num_intention)
        self.seq_max_len = int(seq_max_len)
        self.num_heads = int(num_heads)
        self.temperature = float(temperature)
        self.interest_num = 1

        self.concept_embedding = nn.Embedding(self.num_concept, dim)
        self.position_embedding = nn.Embedding(self.seq_max_len, dim)
        nn.init.normal_(self.concept_embedding.weight, 0.0, 1e-4)
        nn.init.normal_(self.position_embedding.weight, 0.0, 1e-4)

        def weight(rows: int, cols: int) -> nn.Parameter:
            w = nn.Parameter(torch.empty(rows, cols))
            nn.init.xavier_uniform_(w)
            return w

        self.w_1, self.w_2 = weight(dim, hidden_dim), weight(hidden_dim, self.num_heads)  # history summary
        self.w_3 = weight(dim, dim)  # intention assignment
        self.w_k1, self.w_k2 = weight(dim, hidden_dim), weight(hidden_dim, self.num_intention)  # per-intention
        self.w_4, self.w_5 = weight(dim, hidden_dim), weight(hidden_dim, self.num_heads)  # next intention
        self.readout = LabelAwareAttention(float("inf"))  # one interest: the readout is the identity

    def encode(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(interest embeddings phi (B, K, D), aggregated user vector v_u (B, D))``."""
        emb, mask = self.history_embedding(x)
        length = emb.shape[1]
        if length > self.seq_max_len:
            raise ValueError(f"history of length {length} is longer than seq_max_len={self.seq_max_len}")
        emb, mask, _ = left_align(emb, mask)
        x_u = emb + self.position_embedding.weight[:length]  # X^u (B, L, D)
        valid = mask.unsqueeze(-1)  # (B, L, 1)

        # Sparse-interest extraction: activate the K prototypes closest to the history summary.
        a_hist = _masked_softmax(torch.tanh(x_u @ self.w_1) @ self.w_2, valid, dim=1)  # (B, L, H)
        z_u = torch.einsum("blh,bld->bd", a_hist, x_u)
        s_u = z_u @ self.concept_embedding.weight.t()  # (B, num_concept)
        top = torch.topk(s_u, self.num_intention, dim=1)
        c_u = torch.sigmoid(top.values).unsqueeze(-1) * self.concept_embedding(top.indices)  # C^u (B, K, D)
        # Intention assignment P(k|t) and per-intention attention P(t|k).
        p_u = torch.softmax(
            torch.einsum("bld,bkd->bkl", F.normalize(x_u @ self.w_3, dim=-1), F.normalize(c_u, dim=-1)), dim=1
        )
        a_k = _masked_softmax(torch.tanh(x_u @ self.w_k1) @ self.w_k2, valid, dim=1)  # (B, L, K)
        phi = torch.einsum("bkl,bld->bkd", p_u * a_k.transpose(1, 2), x_u)  # (B, K, D)

        # Adaptive aggregation: predicted next intention, then a softmax mix of the interests.
        x_hat = torch.einsum("bkl,bkd->bld", p_u, c_u)  # intention-aware behaviours (B, L, D)
        a_apt = _masked_softmax(torch.tanh(x_hat @ self.w_4) @ self.w_5, valid, dim=1).sum(dim=-1)  # (B, L)
        c_apt = F.normalize(torch.einsum("bl,bld->bd", a_apt, x_hat), dim=-1)
        e_u = torch.softmax(torch.einsum("bd,bkd->bk", c_apt, phi) / self.temperature, dim=1)
        return phi, torch.einsum("bk,bkd->bd", e_u, phi)

    def intentions(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``K`` interest embeddings ``phi`` ``(B, num_intention, D)``."""
        return self.encode(x)[0]

    def user_interests(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return self.encode(x)[1].unsqueeze(1), None

    @property
    def logit_temperature(self) -> float:
        # Raw inner products: SINE's temperature belongs to the interest aggregation.
        return 1.0

    def covariance_loss(self) -> torch.Tensor:
        """Concept covariance regulariser ``L_c = (|M|_F^2 - |diag M|^2) / 2`` (Eq. 16),
        ``M`` the covariance of the prototype embeddings; it pushes prototypes apart."""
        cov = torch.cov(self.concept_embedding.weight, correction=0)
        return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / 2
