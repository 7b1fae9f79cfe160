"""Feature-interaction layers: FM, the DCN cross networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FM", "CrossNetwork", "CrossNetV2", "CrossNetMix"]


class FM(nn.Module):
    """Second-order factorisation-machine term (Rendle, ICDM'10):
    ``0.5 * ((sum_i v_i)^2 - sum_i v_i^2)``.

    Args:
        reduce_sum: sum over the embedding axis (a logit) or keep it.

    Shape:
        ``(B, F, D) -> (B, 1)`` or ``(B, D)``.
    """

    def __init__(self, reduce_sum: bool = True) -> None:
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square_of_sum = x.sum(dim=1) ** 2
        sum_of_square = (x * x).sum(dim=1)
        ix = 0.5 * (square_of_sum - sum_of_square)
        return ix.sum(dim=1, keepdim=True) if self.reduce_sum else ix


class CrossNetwork(nn.Module):
    """DCN's cross network (Wang et al., ADKDD'17): ``x_{l+1} = x_0 (w_l . x_l) + b_l + x_l``.

    Shape:
        ``(B, d) -> (B, d)``.
    """

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.w = nn.ModuleList([nn.Linear(input_dim, 1, bias=False) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x
        for w, b in zip(self.w, self.b):
            x = x0 * w(x) + b + x
        return x


class CrossNetV2(nn.Module):
    """DCN-V2's full-rank cross layer (Wang et al., WWW'21): ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``."""

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.w = nn.ModuleList([nn.Linear(input_dim, input_dim, bias=False) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x
        for w, b in zip(self.w, self.b):
            x = x0 * (w(x) + b) + x
        return x


class CrossNetMix(nn.Module):
    """DCN-V2's mixture of low-rank cross experts (Wang et al., WWW'21, Eq. 4).

    Each expert ``E_i(x_l) = x_0 * (U_i tanh(C_i tanh(V_i^T x_l)) + b)``; a softmax gate over
    experts mixes them: ``x_{l+1} = sum_i g_i(x_l) E_i(x_l) + x_l``. All experts are computed
    in one batched einsum (the reference loops over experts in Python).

    Shape:
        ``(B, d) -> (B, d)``.
    """

    def __init__(self, input_dim: int, num_layers: int = 2, low_rank: int = 32, num_experts: int = 4) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_experts = num_experts

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape)))

        self.u_list = nn.ParameterList([param(num_experts, input_dim, low_rank) for _ in range(num_layers)])
        self.v_list = nn.ParameterList([param(num_experts, input_dim, low_rank) for _ in range(num_layers)])
        self.c_list = nn.ParameterList([param(num_experts, low_rank, low_rank) for _ in range(num_layers)])
        self.gating = nn.Linear(input_dim, num_experts, bias=False)
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, xl = x, x
        for i in range(self.num_layers):
            gate = torch.softmax(self.gating(xl), dim=1)  # (B, E)
            v = torch.tanh(torch.einsum("bd,edr->ber", xl, self.v_list[i]))
            v = torch.tanh(torch.einsum("ber,eqr->beq", v, self.c_list[i]))
            uv = torch.einsum("ber,edr->bed", v, self.u_list[i])  # (B, E, d)
            experts = x0.unsqueeze(1) * (uv + self.bias[i])
            xl = torch.einsum("bed,be->bd", experts, gate) + xl
        return xl
