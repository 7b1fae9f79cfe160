"""Activation functions by name, including Dice (Zhou et al., DIN, KDD'18)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dice", "activation_layer"]


class Dice(nn.Module):
    """Data-adaptive activation from DIN: ``p * x + (1 - p) * alpha * x`` with
    ``p = sigmoid(standardised x)``.

    The reference standardises over the feature axis of each row; DIN standardises each
    unit with batch statistics. We follow the paper (a BatchNorm without affine
    parameters, so inference uses running statistics).

    Args:
        dim: number of units.
        epsilon: numerical stabiliser of the normalisation.
    """

    def __init__(self, dim: int | None = None, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.bn = nn.BatchNorm1d(dim, eps=epsilon, affine=False) if dim else None
        self.alpha = nn.Parameter(torch.zeros(dim if dim else 1))
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            if self.training:
                z = self.bn(x.reshape(-1, self.dim)).reshape(x.shape)
            else:  # BatchNorm's inference formula, written out: ONNX export of batch_norm needs a
                # channel count its shape inference loses after the reshapes
                z = (x - self.bn.running_mean) / torch.sqrt(self.bn.running_var + self.bn.eps)
        else:  # width unknown at construction: per-row standardisation (reference behaviour)
            avg = x.mean(dim=-1, keepdim=True)
            var = ((x - avg) ** 2).mean(dim=-1, keepdim=True)
            z = (x - avg) / torch.sqrt(var + self.epsilon)
        p = torch.sigmoid(z)
        return p * x + (1 - p) * self.alpha * x


_NAMED = {
    "relu": lambda d: nn.ReLU(),
    "sigmoid": lambda d: nn.Sigmoid(),
    "tanh": lambda d: nn.Tanh(),
    "prelu": lambda d: nn.PReLU(),
    "leakyrelu": lambda d: nn.LeakyReLU(),
    "gelu": lambda d: nn.GELU(),
    "silu": lambda d: nn.SiLU(),
    "softmax": lambda d: nn.Softmax(dim=1),
    "dice": lambda d: Dice(d),
    "linear": lambda d: nn.Identity(),
    "identity": lambda d: nn.Identity(),
}


def activation_layer(act_name: str | type[nn.Module] | nn.Module, dim: int | None = None) -> nn.Module:
    """Build an activation module from its name (case-insensitive) or class.

    Raises:
        ValueError: for an unknown name (the message lists the choices).
    """
    if isinstance(act_name, nn.Module):
        return act_name
    if isinstance(act_name, str):
        key = act_name.lower()
        if key not in _NAMED:
            raise ValueError(f"activation={act_name!r} is not supported; choose one of {sorted(_NAMED)}")
        return _NAMED[key](dim)
    if isinstance(act_name, type) and issubclass(act_name, nn.Module):
        return act_name()
    raise ValueError(f"activation={act_name!r} is not supported")
