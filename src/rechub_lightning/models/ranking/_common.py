"""Helpers shared by ranking models."""

from __future__ import annotations

from typing import Any

DEFAULT_MLP = {"dims": [256, 128], "dropout": 0.2, "activation": "relu"}


def mlp_kwargs(mlp_params: dict[str, Any] | None, arg: str = "mlp_params") -> dict[str, Any]:
    params = dict(DEFAULT_MLP if mlp_params is None else mlp_params)
    allowed = {"dims", "dropout", "activation", "output_layer", "batch_norm"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{arg} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return params


def total_dim(features) -> int:
    return sum(f.embed_dim for f in features)
