"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR'18, https://arxiv.org/abs/1804.07931)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..ranking._common import total_dim
from ._base import MultiTaskModel, last_linear, tower_kwargs

__all__ = ["ESMM", "ctcvr_logit"]


def ctcvr_logit(cvr_logit: torch.Tensor, ctr_logit: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(cvr_logit) * sigmoid(ctr_logit))``, computed without cancellation.

    With ``p = s(a) s(b)``: ``log p = log s(a) + log s(b)`` and
    ``1 - p = s(-a) + s(a) s(-b)``, so both logs come from ``logsigmoid`` and ``logaddexp``
    and BCE-with-logits on the result equals BCE on the product, also when it saturates.
    """
    log_p = F.logsigmoid(cvr_logit) + F.logsigmoid(ctr_logit)
    log_1mp = _logaddexp(F.logsigmoid(-ctr_logit), F.logsigmoid(ctr_logit) + F.logsigmoid(-cvr_logit))
    return log_p - log_1mp


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.logaddexp`` written with ONNX-exportable operators (ONNX has no LogAddExp)."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


class ESMM(MultiTaskModel):
    """CVR and CTR towers over shared embeddings; trained on the entire impression space
    through ``pCTCVR = pCTR x pCVR``.

    Output columns, as in the reference: ``[CVR, CTR, CTCVR]``, all logits (the CTCVR column
    is ``logit(pCTR x pCVR)``, see :func:`ctcvr_logit`), so ``sigmoid`` of the output equals
    Torch-RecHub's ``[pCVR, pCTR, pCTCVR]``. Labels are ``[conversion, click, click x
    conversion]``.

    How the module trains and evaluates it (read from attributes, so it holds however the
    model is wrapped): ``trained_tasks = (1, 2)`` - only the CTR and CTCVR losses are
    trained (the paper's ``L = L_ctr + L_ctcvr``; the CVR tower learns through the
    product); ``conditional_tasks = {0: 1}`` - the CVR metric is computed on clicked rows
    only (CVR is ``p(conversion | click)``). ``esmm = True`` marks the model.

    Args:
        user_features: user-side sparse features (list, or a selector resolved against
            ``schema``; default: every sparse feature).
        item_features: item-side sparse features (default: none). The towers read the
            concatenation of user and item embeddings, so the split is for readability.
        cvr_params: MLP arguments of the CVR tower (``{"dims", "activation", "dropout"}``).
        ctr_params: MLP arguments of the CTR tower.
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B, 3)``.

    Parameter split relative to the trained losses: the CTR tower feeds both the CTR and
    the CTCVR loss and is shared with the embeddings; the CVR tower belongs to the CTCVR
    task (column 2). GradNorm measures gradient norms on the CTR tower's output layer.
    """

    esmm = True
    trained_tasks = (1, 2)
    conditional_tasks = {0: 1}

    def __init__(
        self,
        user_features: Sequence[Feature] | Sequence[str] | str | None = None,
        item_features: Sequence[Feature] | Sequence[str] | str | None = None,
        cvr_params: dict[str, Any] | None = None,
        ctr_params: dict[str, Any] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.user_features = resolve_features(user_features, schema, "sparse", "user_features")
        self.item_features = [] if item_features is None else resolve_features(item_features, schema, "sparse", "item_features")
        self.task_types = ["classification"] * 3
        features = self.user_features + [f for f in self.item_features if f not in self.user_features]
        if not features:
            raise ValueError("ESMM needs at least one feature in user_features or item_features")
        self.embedding = EmbeddingLayer(features)
        self.tower_dims = total_dim(self.user_features) + total_dim(self.item_features)
        default = {"dims": [16, 8]}
        self.tower_cvr = MLP(self.tower_dims, **{**tower_kwargs(cvr_params, "cvr_params", default), "output_layer": True})
        self.tower_ctr = MLP(self.tower_dims, **{**tower_kwargs(ctr_params, "ctr_params", default), "output_layer": True})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.embedding(x, fs, squeeze_dim=True) for fs in (self.user_features, self.item_features) if fs]
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        cvr = self.tower_cvr(h)
        ctr = self.tower_ctr(h)
        return torch.cat([cvr, ctr, ctcvr_logit(cvr, ctr)], dim=1)

    def task_modules(self) -> list[list[nn.Module]]:
        return [[], [], [self.tower_cvr]]

    def last_shared_layer(self) -> nn.Module:
        return last_linear(self.tower_ctr)
