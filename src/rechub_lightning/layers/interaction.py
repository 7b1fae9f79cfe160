"""Feature-interaction layers: FM, FFM (+ CEN), the DCN cross networks, CIN, SENET and bilinear interaction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .mlp import MLP

__all__ = [
    "FM",
    "CrossNetwork",
    "CrossNetV2",
    "CrossNetMix",
    "FFM",
    "CIN",
    "SENETLayer",
    "BiLinearInteractionLayer",
    "CEN",
]


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


def _pair_indices(num_fields: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the ``num_fields * (num_fields - 1) / 2`` pairs ``i < j``,
    in ``itertools.combinations`` order."""
    rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
    return rows, cols


class FFM(nn.Module):
    """Field-aware factorisation machine crossings (Juan et al., RecSys'16).

    Feature ``i`` owns one embedding per other field; pair ``(i, j)`` multiplies ``v_{i,j}``
    (feature i's vector for field j) with ``v_{j,i}``. All pairs are gathered at once
    (the reference loops over them in Python).

    Args:
        num_fields: number of fields ``F``.
        reduce_sum: sum over the embedding axis (inner products) or keep the Hadamard products.

    Shape:
        ``(B, F, F, D) -> (B, F(F-1)/2, 1)`` with ``reduce_sum``, else ``(B, F(F-1)/2, D)``.
    """

    def __init__(self, num_fields: int, reduce_sum: bool = True) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.reduce_sum = reduce_sum
        rows, cols = _pair_indices(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crossed = x[:, self.rows, self.cols, :] * x[:, self.cols, self.rows, :]
        return crossed.sum(dim=-1, keepdim=True) if self.reduce_sum else crossed


class CIN(nn.Module):
    """Compressed interaction network of xDeepFM (Lian et al., KDD'18).

    Layer ``k`` forms all products of the input fields with the previous layer's feature
    maps, ``x^0_i * x^{k-1}_j``, and compresses them with a 1x1 convolution; each layer's
    maps are sum-pooled over the embedding axis and a linear layer turns them into a logit.

    Args:
        input_dim: number of input fields ``F``.
        cin_size: feature maps per layer.
        split_half: as in the paper's code, only half of each hidden layer's maps feed the
            next layer, the other half goes to the output (not for the last layer).

    Shape:
        ``(B, F, D) -> (B, 1)``.
    """

    def __init__(self, input_dim: int, cin_size: Sequence[int], split_half: bool = True) -> None:
        super().__init__()
        cin_size = list(cin_size)
        if not cin_size:
            raise ValueError("CIN: cin_size must list at least one layer")
        self.num_layers = len(cin_size)
        self.split_half = split_half
        self.conv_layers = nn.ModuleList()
        prev_dim, fc_input_dim = input_dim, 0
        for i, size in enumerate(cin_size):
            if split_half and i != self.num_layers - 1 and size % 2:
                raise ValueError(f"CIN: with split_half, hidden layer sizes must be even, got {size}")
            self.conv_layers.append(nn.Conv1d(input_dim * prev_dim, size, kernel_size=1))
            if split_half and i != self.num_layers - 1:
                size //= 2
            prev_dim = size
            fc_input_dim += size
        self.fc = nn.Linear(fc_input_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        x0, h = x.unsqueeze(2), x
        for i, conv in enumerate(self.conv_layers):
            z = x0 * h.unsqueeze(1)  # (B, F, H_{k-1}, D)
            z = torch.relu(conv(z.flatten(start_dim=1, end_dim=2)))
            if self.split_half and i != self.num_layers - 1:
                z, h = torch.split(z, z.shape[1] // 2, dim=1)
            else:
                h = z
            outputs.append(z)
        return self.fc(torch.cat(outputs, dim=1).sum(dim=2))


class SENETLayer(nn.Module):
    """Squeeze-excitation re-weighting of fields, from FiBiNET (Huang et al., RecSys'19).

    Squeeze each field's embedding to its mean, pass the ``F`` values through a bottleneck
    ``Linear -> ReLU -> Linear -> ReLU`` and scale every field by its weight.

    Args:
        num_fields: number of fields ``F``.
        reduction_ratio: bottleneck width is ``max(1, F // reduction_ratio)``.
        excitation: the last activation: ``"relu"`` (FiBiNET: weights in ``[0, inf)``; a field
            whose excitation is negative for every input is off for good, with no gradient to
            bring it back) or ``"sigmoid"`` (the original SE block, Hu et al., CVPR'18: weights
            in ``(0, 1)``, never off).

    Shape:
        ``(B, F, D) -> (B, F, D)``.
    """

    def __init__(self, num_fields: int, reduction_ratio: int = 3, excitation: str = "relu") -> None:
        super().__init__()
        if excitation not in ("relu", "sigmoid"):
            raise ValueError(f"excitation must be 'relu' or 'sigmoid', got excitation={excitation!r}")
        reduced = max(1, int(num_fields / reduction_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(num_fields, reduced, bias=False),
            nn.ReLU(),
            nn.Linear(reduced, num_fields, bias=False),
            nn.ReLU() if excitation == "relu" else nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mlp(x.mean(dim=-1)).unsqueeze(-1)


_BILINEAR_TYPES = ("field_all", "field_each", "field_interaction")


class BiLinearInteractionLayer(nn.Module):
    """Bilinear interactions ``(v_i W) * v_j`` of all field pairs, from FiBiNET (Huang et al., RecSys'19).

    Args:
        input_dim: embedding width ``D``.
        num_fields: number of fields ``F``.
        bilinear_type: ``"field_all"`` (one ``W`` shared by all pairs), ``"field_each"`` (one
            ``W_i`` per field) or ``"field_interaction"`` (one ``W_ij`` per pair).

    The matrices are stored stacked, ``weight[k]`` in ``nn.Linear``'s ``(out, in)`` layout,
    and applied with one batched product instead of the reference's loop over pairs.

    Shape:
        ``(B, F, D) -> (B, F(F-1)/2, D)``.
    """

    def __init__(self, input_dim: int, num_fields: int, bilinear_type: str = "field_interaction") -> None:
        super().__init__()
        if bilinear_type not in _BILINEAR_TYPES:
            raise ValueError(f"bilinear_type={bilinear_type!r} is not one of {_BILINEAR_TYPES}")
        self.bilinear_type = bilinear_type
        rows, cols = _pair_indices(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        n = {"field_all": 1, "field_each": num_fields, "field_interaction": len(rows)}[bilinear_type]
        self.weight = nn.Parameter(torch.empty(n, input_dim, input_dim))
        bound = 1.0 / input_dim**0.5  # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x[:, self.rows], x[:, self.cols]  # (B, P, D)
        if self.bilinear_type == "field_all":
            projected = left @ self.weight[0].t()
        elif self.bilinear_type == "field_each":
            projected = torch.einsum("bpi,poi->bpo", left, self.weight[self.rows])
        else:
            projected = torch.einsum("bpi,poi->bpo", left, self.weight)
        return projected * right


class CEN(nn.Module):
    """Compose-excitation network of FAT-DeepFFM (Zhang et al., 2019, https://arxiv.org/abs/1905.06336).

    Each field-pair crossing ``e_k`` is composed into one number ``d_k = ReLU(u_k . e_k)``
    (Eq. 7), an MLP over the ``P`` numbers yields the field attention ``s`` (Eq. 9), and every
    crossing is rescaled by its weight (Eq. 10).

    Args:
        embed_dim: width ``D`` of the crossings.
        num_field_crosses: number of crossings ``P``.
        reduction_ratio: hidden width of the attention MLP is ``max(1, P // reduction_ratio)``.

    Shape:
        ``(B, P, D) -> (B, P * D)``.
    """

    def __init__(self, embed_dim: int, num_field_crosses: int, reduction_ratio: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.rand(num_field_crosses, embed_dim))
        hidden = max(1, num_field_crosses // reduction_ratio)
        self.mlp_att = MLP(num_field_crosses, output_layer=False, dims=[hidden, num_field_crosses], activation="relu")

    def forward(self, em: torch.Tensor) -> torch.Tensor:
        d = torch.relu((self.u * em).sum(dim=-1))
        s = self.mlp_att(d)
        return (s.unsqueeze(-1) * em).flatten(start_dim=1)
