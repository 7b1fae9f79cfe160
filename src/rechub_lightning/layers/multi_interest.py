"""Multi-interest extraction: capsule dynamic routing, self-attentive extraction, label-aware readout.

The layers behind MIND (Li et al., CIKM'19, https://arxiv.org/abs/1904.08030) and
ComiRec (Cen et al., KDD'20, https://arxiv.org/abs/2005.09347). They turn a user's
behaviour sequence ``(B, L, D)`` with its validity mask ``(B, L)`` into ``K`` interest
vectors ``(B, K, D)``, and read one interest out for a target item during training.

Padded behaviours never influence the result: they get zero routing/attention weight,
and position-dependent parameters are indexed after the valid behaviours have been moved
to the front, so pre- and post-padded histories (and extra padding) give the same output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sequence import left_align

__all__ = ["squash", "CapsuleNetwork", "MultiInterestSA", "LabelAwareAttention"]


def squash(x: torch.Tensor, dim: int = -1, eps: float = 1e-9) -> torch.Tensor:
    """Capsule non-linearity ``|s|^2 / (1 + |s|^2) * s / |s|`` (Sabour et al., NeurIPS'17, Eq. 1).

    Example:
        >>> round(squash(torch.tensor([[3.0, 4.0]])).norm().item(), 4)  # 25 / 26
        0.9615
    """
    sq_norm = x.pow(2).sum(dim=dim, keepdim=True)
    return sq_norm / (1.0 + sq_norm) / torch.sqrt(sq_norm + eps) * x


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Accept ``(B, L)`` or the reference's ``(B, L, 1)``, bool or 0/1 numbers."""
    if mask.dim() == 3:
        mask = mask.squeeze(-1)
    return mask.bool()


class CapsuleNetwork(nn.Module):
    """Dynamic routing from behaviour capsules to interest capsules.

    ``bilinear_type=0`` is MIND's behaviour-to-interest (B2I) routing: one bilinear map
    ``S`` shared by all interests, with routing logits initialised at random to break the
    symmetry between interests (MIND, Algorithm 1). ``bilinear_type=2`` is ComiRec-DR: a
    map ``W_ij`` per (position, interest) pair (ComiRec, Sec. 3.2.1) and zero initial
    logits. ``bilinear_type=1`` uses one map per interest, shared across positions.

    Coupling coefficients are a softmax over the *interests* for each behaviour
    (``w_ij = softmax_j(b_ij)``, as in both papers and the authors' code), and padded
    behaviours get coefficient 0. Torch-RecHub 0.9.0 takes the softmax over the
    sequence axis instead, so padding steals weight from real behaviours and the
    interests change with the amount of padding.

    MIND's random initial logits are drawn once at construction and stored as the
    buffer ``routing_logits`` (so evaluation is deterministic and checkpoints reproduce
    it) rather than re-drawn at every call as in the reference.

    Args:
        embedding_dim: behaviour embedding width ``D``.
        seq_len: longest history accepted (size of the position-dependent parameters).
        bilinear_type: 0 (MIND), 1 (per-interest map) or 2 (ComiRec-DR).
        interest_num: number of interest capsules ``K``.
        routing_times: routing iterations (3 in both papers).
        relu_layer: apply ``ReLU(Linear(D, D))`` to the capsules.

    Shape:
        ``item_eb (B, L, D)``, ``mask (B, L)`` (True/1 = real behaviour), optional
        ``interest_mask (B, K)`` (False = inactive interest, gets no behaviour)
        -> ``(B, K, D)``; inactive interests and users without behaviours give zero rows.

    Example:
        >>> caps = CapsuleNetwork(8, seq_len=5, bilinear_type=2, interest_num=3)
        >>> caps(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        embedding_dim: int,
        seq_len: int,
        bilinear_type: int = 2,
        interest_num: int = 4,
        routing_times: int = 3,
        relu_layer: bool = False,
    ) -> None:
        super().__init__()
        if bilinear_type not in (0, 1, 2):
            raise ValueError(f"bilinear_type must be 0 (MIND), 1 or 2 (ComiRec-DR), got {bilinear_type!r}")
        if routing_times < 1:
            raise ValueError(f"routing_times must be >= 1, got {routing_times}")
        if interest_num < 1 or seq_len < 1:
            raise ValueError(f"interest_num and seq_len must be >= 1, got {interest_num} and {seq_len}")
        self.embedding_dim = embedding_dim
        self.seq_len = seq_len
        self.bilinear_type = bilinear_type
        self.interest_num = interest_num
        self.routing_times = routing_times
        self.relu_layer = relu_layer
        # Routing iterations see the predictions through a stop-gradient, as in the
        # authors' code: only the final aggregation is differentiated.
        self.stop_grad = True
        if bilinear_type == 0:
            self.linear = nn.Linear(embedding_dim, embedding_dim, bias=False)
            logits = torch.empty(interest_num, seq_len)
            nn.init.trunc_normal_(logits, std=1.0, a=-2.0, b=2.0)
            self.register_buffer("routing_logits", logits)
        elif bilinear_type == 1:
            self.linear = nn.Linear(embedding_dim, embedding_dim * interest_num, bias=False)
        else:
            # The reference allocates this with torch.Tensor(...) and never initialises it.
            self.w = nn.Parameter(torch.empty(seq_len, interest_num * embedding_dim, embedding_dim))
            nn.init.normal_(self.w, std=1.0 / math.sqrt(embedding_dim))
        if relu_layer:
            self.relu = nn.Sequential(nn.Linear(embedding_dim, embedding_dim, bias=False), nn.ReLU())

    def forward(
        self, item_eb: torch.Tensor, mask: torch.Tensor, interest_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, length, dim = item_eb.shape
        if length > self.seq_len:
            raise ValueError(
                f"history of length {length} is longer than the capsule network's seq_len={self.seq_len} "
                f"(the model's max_length)"
            )
        k = self.interest_num
        item_eb, valid, _ = left_align(item_eb, _as_bool_mask(mask))
        shared = self.bilinear_type == 0
        if shared:
            hat = self.linear(item_eb)  # (B, L, D), the same prediction for every interest
            logits = self.routing_logits[:, :length].to(item_eb.dtype).unsqueeze(0).expand(batch, k, length)
        else:
            if self.bilinear_type == 1:
                hat = self.linear(item_eb)
            else:
                hat = torch.einsum("lod,bld->blo", self.w[:length], item_eb)
            hat = hat.view(batch, length, k, dim).transpose(1, 2)  # (B, K, L, D)
            logits = item_eb.new_zeros(batch, k, length)
        if interest_mask is not None:
            logits = logits.masked_fill(~interest_mask.bool().unsqueeze(-1), float("-inf"))
        hat_iter = hat.detach() if self.stop_grad else hat
        aggregate = "bkl,bld->bkd" if shared else "bkl,bkld->bkd"
        agreement = "bld,bkd->bkl" if shared else "bkld,bkd->bkl"
        padding = ~valid.unsqueeze(1)  # (B, 1, L)
        for i in range(self.routing_times):
            coupling = torch.softmax(logits, dim=1).masked_fill(padding, 0.0)  # softmax over interests
            if i < self.routing_times - 1:
                capsules = squash(torch.einsum(aggregate, coupling, hat_iter))
                logits = logits + torch.einsum(agreement, hat_iter, capsules)
            else:
                capsules = squash(torch.einsum(aggregate, coupling, hat))
        if self.relu_layer:
            capsules = self.relu(capsules)
        return capsules


class MultiInterestSA(nn.Module):
    """Self-attentive multi-interest extraction of ComiRec-SA (Cen et al., KDD'20, Eq. 5-6).

    ``A = softmax_L(tanh(H W1) W2)`` over the valid behaviours, ``V = A^T H``.

    Differences from Torch-RecHub 0.9.0: ``hidden_dim`` given explicitly works (the
    reference then never sets it and fails); the unused ``W3`` parameter is gone; weights
    start from Glorot-uniform (the dense layers of the authors' code) instead of
    ``U(0, 1)``; a user without any behaviour gets zero interests instead of the mean of
    padding embeddings.

    Args:
        embedding_dim: behaviour embedding width ``D``.
        interest_num: number of interests ``K`` (attention heads).
        hidden_dim: attention hidden width (default ``4 * D``).

    Shape:
        ``seq_emb (B, L, D)``, ``mask (B, L)`` or ``(B, L, 1)`` -> ``(B, K, D)``.

    Example:
        >>> sa = MultiInterestSA(8, interest_num=3)
        >>> sa(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, embedding_dim: int, interest_num: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.interest_num = interest_num
        self.hidden_dim = 4 * embedding_dim if hidden_dim is None else int(hidden_dim)
        self.W1 = nn.Parameter(torch.empty(embedding_dim, self.hidden_dim))
        self.W2 = nn.Parameter(torch.empty(self.hidden_dim, interest_num))
        nn.init.xavier_uniform_(self.W1)
        nn.init.xavier_uniform_(self.W2)

    def forward(self, seq_emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = torch.tanh(seq_emb @ self.W1) @ self.W2  # (B, L, K)
        if mask is None:
            attention = torch.softmax(scores, dim=1)
        else:
            padding = ~_as_bool_mask(mask).unsqueeze(-1)
            scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
            attention = torch.softmax(scores, dim=1).masked_fill(padding, 0.0)
        return attention.transpose(1, 2) @ seq_emb


class LabelAwareAttention(nn.Module):
    """Reads one user vector out of ``K`` interests, attending with the target item (MIND, Eq. 8).

    MIND writes ``v = V softmax(pow(V^T e, p))``: ``p = 0`` averages the interests and
    ``p -> inf`` selects the interest closest to the target (hard attention, also
    ComiRec's training readout). Interest scores here are cosine similarities that can be
    negative, where ``pow`` is ill-defined (``p = 2`` would favour the *least* similar
    interest), so the power is applied to the positive similarity ``exp(score)``:
    ``weights = softmax(p * score)``. It keeps both limits and sharpens monotonically in
    ``p``. ``power = inf`` is computed as an exact argmax.

    Args:
        power: the paper's ``p`` (``float("inf")`` = hard attention).

    Shape:
        ``interests (B, K, D)``, ``target (B, D)``, optional ``interest_mask (B, K)``
        (False = never attend) -> ``(B, D)``.

    Example:
        >>> att = LabelAwareAttention()
        >>> interests = torch.eye(3).unsqueeze(0)
        >>> att(interests, torch.tensor([[0.1, 0.9, 0.0]]))
        tensor([[0., 1., 0.]])
    """

    def __init__(self, power: float = float("inf")) -> None:
        super().__init__()
        power = float(power)
        if math.isnan(power) or power < 0:
            raise ValueError(f"label-aware attention power must be >= 0 (or inf), got {power}")
        self.power = power

    def forward(
        self,
        interests: torch.Tensor,
        target: torch.Tensor,
        interest_mask: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        scores = torch.einsum("bkd,bd->bk", interests, target)
        if math.isinf(self.power):
            if interest_mask is not None:
                scores = scores.masked_fill(~interest_mask.bool(), float("-inf"))
            index = scores.argmax(dim=1)
            return interests[torch.arange(interests.shape[0], device=interests.device), index]
        logits = scores * (self.power * scale)
        if interest_mask is not None:
            logits = logits.masked_fill(~interest_mask.bool(), float("-inf"))
        return torch.einsum("bk,bkd->bd", torch.softmax(logits, dim=1), interests)

    def extra_repr(self) -> str:
        return f"power={self.power}"

