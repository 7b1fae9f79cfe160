"""EDCN (Chen et al., DLP-KDD'21, https://dlp-kdd.github.io/assets/pdf/DLP-KDD_2021_paper_12.pdf)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import LR, MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["EDCN", "BridgeModule", "RegulationModule", "CrossLayer"]

_BRIDGES = ("hadamard_product", "pointwise_addition", "concatenation", "attention_pooling")


class CrossLayer(nn.Module):
    """One DCN cross term without the residual: ``x_0 (w . x_i) + b``."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(input_dim, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x_0: torch.Tensor, x_i: torch.Tensor) -> torch.Tensor:
        return self.w(x_i) * x_0 + self.b


class BridgeModule(nn.Module):
    """EDCN's bridge: fuses the cross and deep layer outputs of one depth.

    Args:
        input_dim: width of both inputs.
        bridge_type: ``"hadamard_product"``, ``"pointwise_addition"``, ``"concatenation"``
            (``ReLU(Linear([x, h]))``) or ``"attention_pooling"``
            (``softmax-attention(x) * x + softmax-attention(h) * h``).
    """

    def __init__(self, input_dim: int, bridge_type: str) -> None:
        super().__init__()
        if bridge_type not in _BRIDGES:
            raise ValueError(f"bridge_type={bridge_type!r} is not one of {_BRIDGES}")
        self.bridge_type = bridge_type
        if bridge_type == "concatenation":
            self.concat_pooling = nn.Sequential(nn.Linear(input_dim * 2, input_dim), nn.ReLU())
        elif bridge_type == "attention_pooling":
            self.attention_x = self._attention(input_dim)
            self.attention_h = self._attention(input_dim)

    @staticmethod
    def _attention(dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Softmax(dim=-1))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.bridge_type == "hadamard_product":
            return x * h
        if self.bridge_type == "pointwise_addition":
            return x + h
        if self.bridge_type == "concatenation":
            return self.concat_pooling(torch.cat([x, h], dim=-1))
        return self.attention_x(x) * x + self.attention_h(h) * h


class RegulationModule(nn.Module):
    """EDCN's regulation module: field-wise gates ``F * softmax(g / tau)`` over the ``F``
    fields, one for the cross branch and one for the deep branch.

    The softmax runs across fields, as in the paper. The reference applies it to each field's
    scalar separately, which always yields 1: its gates are constant and never learn. The
    paper's bare softmax starts every gate at ``1 / F`` and so shrinks the embeddings F-fold
    (52x on Criteo); the following BatchNorm then works in its ``eps``-dominated range, where
    its running statistics do not reproduce the batch ones and the eval-mode output collapses
    (measured: logit std 0.4 in eval vs 1.9 in training, val logloss 0.61; with 8k rows a
    constant prediction). Scaling by ``F`` keeps the paper's relative field weights with
    gates that start at 1.

    Args:
        field_dims: embedding width of every field (a field's gate scales all its units).
        tau: softmax temperature.
        use_regulation: when False both outputs are the input.
    """

    def __init__(self, field_dims: Sequence[int], tau: float = 1.0, use_regulation: bool = True) -> None:
        super().__init__()
        self.use_regulation = use_regulation
        self.tau = float(tau)
        if use_regulation:
            self.g1 = nn.Parameter(torch.ones(len(field_dims)))
            self.g2 = nn.Parameter(torch.ones(len(field_dims)))
            self.register_buffer("field_dims", torch.tensor(list(field_dims), dtype=torch.long), persistent=False)

    def _gate(self, g: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(torch.softmax(g / self.tau, dim=0) * g.numel(), self.field_dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_regulation:
            return x, x
        return self._gate(self.g1) * x, self._gate(self.g2) * x


class EDCN(RecModel):
    """Enhanced Deep & Cross Network: parallel cross and deep layers that exchange
    information at every depth through bridge and regulation modules.

    Args:
        features: model inputs (default: all features of ``schema``). A dense feature is a
            field of its own width.
        n_cross_layers: depth (cross layers = deep blocks = bridges).
        mlp_params: ``dropout``/``activation``/``batch_norm`` of each deep block. As in the
            reference and the paper, each block is two layers as wide as the input (so a
            bridge can combine it with the cross output); a different ``dims`` is ignored
            with a warning.
        bridge_type: see :class:`BridgeModule`.
        use_regulation_module: field-wise gating of each depth's input (:class:`RegulationModule`).
        temperature: softmax temperature of the gates.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        n_cross_layers: int = 2,
        mlp_params: dict[str, Any] | None = None,
        bridge_type: str = "hadamard_product",
        use_regulation_module: bool = True,
        temperature: float = 1,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if bridge_type not in _BRIDGES:
            raise ValueError(f"bridge_type={bridge_type!r} is not one of {_BRIDGES}")
        if n_cross_layers < 1:
            raise ValueError(f"n_cross_layers must be >= 1, got {n_cross_layers}")
        self.features = resolve_features(features, schema, "all", "features")
        self.n_cross_layers = n_cross_layers
        self.dims = total_dim(self.features)
        params = mlp_kwargs(mlp_params)
        if "dims" in params and mlp_params is not None and list(params["dims"]) != [self.dims, self.dims]:
            warnings.warn(
                f"EDCN: mlp_params['dims']={params['dims']} is ignored; every deep block is "
                f"[{self.dims}, {self.dims}] (the input width)",
                stacklevel=2,
            )
        params.update(dims=[self.dims, self.dims], output_layer=False)
        self.embedding = EmbeddingLayer(self.features)
        self.cross_layers = nn.ModuleList([CrossLayer(self.dims) for _ in range(n_cross_layers)])
        self.bridge_modules = nn.ModuleList([BridgeModule(self.dims, bridge_type) for _ in range(n_cross_layers)])
        field_dims = [f.embed_dim for f in self.features]
        self.regulation_modules = nn.ModuleList(
            [RegulationModule(field_dims, temperature, use_regulation_module) for _ in range(n_cross_layers)]
        )
        self.mlps = nn.ModuleList([MLP(self.dims, **params) for _ in range(n_cross_layers)])
        self.linear = LR(self.dims * 3)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        cross_i, deep_i = self.regulation_modules[0](embed_x)
        cross_0 = cross_i
        bridge_i = embed_x
        for i in range(self.n_cross_layers):
            if i > 0:
                cross_i, deep_i = self.regulation_modules[i](bridge_i)
            cross_i = cross_i + self.cross_layers[i](cross_0, cross_i)
            deep_i = self.mlps[i](deep_i)
            bridge_i = self.bridge_modules[i](cross_i, deep_i)
        return self.linear(torch.cat([cross_i, deep_i, bridge_i], dim=1)).squeeze(1)
