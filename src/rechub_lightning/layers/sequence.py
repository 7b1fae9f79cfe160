"""Recurrent layers of DIEN (Zhou et al., AAAI'19): the interest extractor GRU with its
auxiliary loss, and the interest-evolving GRU with an attentional update gate (AUGRU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "left_align",
    "AUGRUCell",
    "AUGRU",
    "InterestExtractor",
    "InterestEvolving",
    "auxiliary_loss",
]


def _exporting() -> bool:
    """True while a model is being traced for ONNX/TorchScript (packed sequences do not export)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def left_align(seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the valid positions of each row to the front, keeping their order.

    Recurrent layers then read every behaviour before any padding, whether the data was
    pre- or post-padded (the reference assumes post-padding).

    Args:
        seq: ``(B, L, ...)``.
        mask: ``(B, L)`` bool, True at valid positions.

    Returns:
        ``(aligned seq, aligned mask, index)``; ``index[b, k]`` is the original position of
        the ``k``-th aligned element, so ``other.gather(1, index)`` aligns another tensor the
        same way.
    """
    # Sorting the unique keys "is padding" * L + position keeps valid positions first, in their
    # original order (a stable partition; unique keys need no stable sort, which ONNX lacks).
    length = mask.shape[1]
    key = (~mask).to(torch.long) * length + torch.arange(length, device=mask.device)
    index = torch.sort(key, dim=1).indices
    gather_index = index.view(*index.shape, *([1] * (seq.dim() - 2))).expand_as(seq)
    return seq.gather(1, gather_index), mask.gather(1, index), index


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by an attention score (DIEN, Eq. 16).

    ``u = sigmoid(x W_u + h U_u + b_u)``, ``r = sigmoid(x W_r + h U_r + b_r)``,
    ``h~ = tanh(x W_h + r * (h U_h) + b_h)``, ``u' = a * u``, ``h' = (1 - u') h + u' h~``.
    The three gates' matrices are stored side by side (``[W_u | W_r | W_h]``).

    Args:
        input_dim: width of ``x``.
        hidden_dim: width of ``h``.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.weight_ih = nn.Parameter(torch.empty(input_dim, 3 * hidden_dim))
        self.weight_hh = nn.Parameter(torch.empty(hidden_dim, 3 * hidden_dim))
        self.bias = nn.Parameter(torch.zeros(3 * hidden_dim))
        for w in (self.weight_ih, self.weight_hh):
            for chunk in w.chunk(3, dim=1):
                nn.init.xavier_uniform_(chunk)

    def input_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``x W + b`` for every step at once, ``(..., 3 * hidden_dim)``."""
        return x @ self.weight_ih + self.bias

    def step(self, gates_x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """One step from precomputed input gates ``(B, 3H)``, state ``(B, H)``, attention ``(B, 1)``."""
        xu, xr, xh = gates_x.chunk(3, dim=-1)
        hu, hr, hh = (h @ self.weight_hh).chunk(3, dim=-1)
        u = torch.sigmoid(xu + hu)
        r = torch.sigmoid(xr + hr)
        h_hat = torch.tanh(xh + r * hh)
        u = a * u
        return (1 - u) * h + u * h_hat

    def forward(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.step(self.input_gates(x), h, a)


class AUGRU(nn.Module):
    """Runs :class:`AUGRUCell` over a sequence; padding steps leave the state unchanged.

    Args:
        input_dim: width of the inputs.
        hidden_dim: width of the state.

    Shape:
        ``x (B, L, input_dim), attention (B, L), mask (B, L) or None ->
        (outputs (B, L, hidden_dim), last state (B, hidden_dim))``.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.cell = AUGRUCell(input_dim, hidden_dim)

    def forward(
        self, x: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is not None:
            # A zero update gate keeps h: padding steps are skipped wherever they are.
            attention = attention * mask.to(attention.dtype)
        gates_x = self.cell.input_gates(x)
        h = x.new_zeros(x.shape[0], self.cell.hidden_dim)
        outputs = []
        for t in range(x.shape[1]):
            h = self.cell.step(gates_x[:, t], h, attention[:, t : t + 1])
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class InterestExtractor(nn.Module):
    """DIEN's interest extractor layer: a GRU over the (left-aligned) behaviour sequence.

    Args:
        embed_dim: width of behaviours and interest states.

    Shape:
        ``seq (B, L, D), mask (B, L) or None -> states (B, L, D)``, zero at padding. The valid
        positions of each row must come first (see :func:`left_align`): the GRU is causal, so
        the states of a valid prefix do not depend on the padding after it.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(embed_dim, embed_dim, batch_first=True)

    def forward(self, seq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        states, _ = self.gru(seq)
        if mask is not None:
            states = states * mask.unsqueeze(-1).to(states.dtype)
        return states


class InterestEvolving(nn.Module):
    """DIEN's interest evolving layer: attention of the target on the interest states
    (``a_t = softmax_t(h_t W_a e_target)``, Eq. 15) driving an :class:`AUGRU`.

    Args:
        embed_dim: width of interest states and of the target embedding.

    Shape:
        ``states (B, L, D), target (B, D), mask (B, L) or None -> (final interest (B, D),
        attention (B, L))``. A row without history keeps the zero state.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.attention_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(embed_dim, embed_dim)))
        self.augru = AUGRU(embed_dim, embed_dim)

    def forward(
        self, states: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = ((states @ self.attention_weight) * target.unsqueeze(1)).sum(dim=-1)  # (B, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)
        _, h = self.augru(states, attention, mask)
        return h, attention


def auxiliary_loss(
    states: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    mask: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DIEN's auxiliary loss (Eq. 7): the interest state ``h_t`` must tell the next clicked
    behaviour ``e_{t+1}`` from a sampled negative ``e^-_{t+1}``.

    ``BCE(sigmoid(h_t . e_{t+1}), 1) + BCE(sigmoid(h_t . e^-_{t+1}), 0)``, each averaged over the
    steps where ``t`` and ``t + 1`` are both valid (and the negative is valid).

    Args:
        states: interest states ``(B, L, D)``.
        positives: behaviour embeddings ``(B, L, D)``, aligned with ``states``.
        negatives: negative behaviour embeddings ``(B, L, D)``, aligned with ``states``.
        mask: ``(B, L)`` validity of the behaviours.
        negative_mask: ``(B, L)`` validity of the negatives (default: all valid).

    Returns:
        A scalar; 0 when no step has a successor.
    """
    valid = mask[:, :-1] & mask[:, 1:]
    if negative_mask is not None:
        valid = valid & negative_mask[:, 1:]
    h = states[:, :-1][valid]
    if h.shape[0] == 0:
        return states.sum() * 0.0
    pos_logit = (h * positives[:, 1:][valid]).sum(dim=-1)
    neg_logit = (h * negatives[:, 1:][valid]).sum(dim=-1)
    pos_loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
    neg_loss = F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
    return pos_loss + neg_loss
