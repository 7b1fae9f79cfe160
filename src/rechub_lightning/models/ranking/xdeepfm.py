"""xDeepFM (Lian et al., KDD'18, https://arxiv.org/abs/1803.05170)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import CIN, LR, MLP, EmbeddingLayer
from ..base import RecModel
from ._common import mlp_kwargs, total_dim

__all__ = ["xDeepFM"]


class xDeepFM(RecModel):  # noqa: N801 - the paper's name
    """Linear term + compressed interaction network (explicit, vector-wise interactions of
    bounded degree) + MLP (implicit interactions), summed into one logit.

    Not in Torch-RecHub (which ships only the CIN layer); the arguments mirror
    :class:`~rechub_lightning.models.ranking.DeepFM`.

    Args:
        deep_features: inputs of the MLP and the linear term (default: all features of ``schema``).
        cin_features: fields of the CIN, sparse/sequence features of one width (default
            ``"sparse+sequence"``).
        cin_size: feature maps per CIN layer (even sizes for hidden layers with ``split_half``).
        mlp_params: MLP arguments; the MLP ends in a logit.
        split_half: feed half of each hidden CIN layer forward and the other half to the output.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B,)``.
    """

    def __init__(
        self,
        deep_features: Sequence[Feature] | Sequence[str] | str | None = None,
        cin_features: Sequence[Feature] | Sequence[str] | str | None = None,
        cin_size: Sequence[int] = (64, 64),
        mlp_params: dict[str, Any] | None = None,
        split_half: bool = True,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.deep_features = resolve_features(deep_features, schema, "all", "deep_features")
        self.cin_features = resolve_features(cin_features, schema, "sparse+sequence", "cin_features")
        widths = {f.embed_dim for f in self.cin_features}
        if len(widths) != 1:
            raise ValueError(f"xDeepFM: cin_features must share one embed_dim, got {sorted(widths)}")
        self.embedding = EmbeddingLayer(self.deep_features + self.cin_features)
        self.linear = LR(total_dim(self.deep_features))
        self.cin = CIN(len(self.cin_features), list(cin_size), split_half=split_half)
        self.mlp = MLP(total_dim(self.deep_features), **{**mlp_kwargs(mlp_params), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        deep_in = self.embedding(x, self.deep_features, squeeze_dim=True)
        cin_in = self.embedding(x, self.cin_features, squeeze_dim=False)
        return (self.linear(deep_in) + self.cin(cin_in) + self.mlp(deep_in)).squeeze(1)
