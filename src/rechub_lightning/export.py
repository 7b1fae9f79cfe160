"""ONNX export of ranking and multi-task models and of matching towers (extra ``onnx``).

A model takes a dict of feature tensors; ONNX graphs take positional inputs. :func:`export_onnx`
wraps the model so every feature becomes a named graph input with a dynamic batch dimension,
and the output is what ``predict`` returns (probabilities for our logit models; multi-task
models: probabilities for classification tasks, values for regression tasks) or an
embedding (``tower="user"``/``"item"`` for matching models).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .features import DenseFeature, Feature, SequenceFeature, SparseFeature
from .models.base import returns_logits

__all__ = ["export_onnx", "dummy_inputs", "model_features"]


#: Feature attributes a matching tower reads, in input order: the user tower reads the user
#: profile and the behaviour history (sequence and multi-interest models), the item tower the
#: item features (session models: the one target item id feature).
_TOWER_ATTRS = {
    "user": ("user_features", "history_features", "item_history_feature"),
    "item": ("item_features", "item_feature"),
}


def _tower_features(model: nn.Module, tower: str) -> list[Feature]:
    found: dict[str, Feature] = {}
    for attr in _TOWER_ATTRS[tower]:
        value = getattr(model, attr, None)
        values = [value] if isinstance(value, Feature) else value if isinstance(value, (list, tuple)) else []
        for f in values:
            if isinstance(f, Feature):
                found.setdefault(f.name, f)
    return list(found.values())


def model_features(model: nn.Module, tower: str | None = None) -> list[Feature]:
    """The features a model (or one of its towers) reads, from its feature attributes.

    ``tower="user"`` collects ``user_features``, ``history_features`` and
    ``item_history_feature``; ``tower="item"`` ``item_features`` and ``item_feature``.
    """
    if tower is not None:
        if tower not in _TOWER_ATTRS:
            raise ValueError(f"tower must be None, 'user' or 'item', got {tower!r}")
        feats = _tower_features(model, tower)
        if feats:
            return feats
    seen: dict[str, Feature] = {}
    for name, value in vars(model).items():
        if name.endswith("features") and isinstance(value, (list, tuple)):
            for f in value:
                if isinstance(f, (SparseFeature, DenseFeature)):
                    seen.setdefault(f.name, f)
    emb = getattr(model, "embedding", None)
    for f in getattr(emb, "features", []) if tower is None else []:
        seen.setdefault(f.name, f)
    if not seen:
        raise ValueError(f"cannot tell which features {type(model).__name__} reads; pass `features=`")
    return list(seen.values())


def dummy_inputs(features: Sequence[Feature], batch_size: int = 2, seq_length: int = 10) -> dict[str, torch.Tensor]:
    """Valid random inputs for the features (ids within range, dense values as floats)."""
    g = torch.Generator().manual_seed(0)
    x: dict[str, torch.Tensor] = {}
    for f in features:
        if isinstance(f, SequenceFeature):
            x[f.name] = torch.randint(0, f.vocab_size, (batch_size, seq_length), generator=g)
        elif isinstance(f, SparseFeature):
            x[f.name] = torch.randint(0, f.vocab_size, (batch_size,), generator=g)
        else:
            shape = (batch_size,) if f.embed_dim == 1 else (batch_size, f.embed_dim)
            x[f.name] = torch.randn(shape, generator=g)
    return x


def _model_max_length(model: nn.Module) -> int | None:
    """The longest history a sequence model accepts, when it declares one."""
    for attr in ("max_length", "seq_max_len", "max_len"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Positional(nn.Module):
    def __init__(self, model: nn.Module, names: list[str], tower: str | None, probabilities: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.tower = tower
        self.probabilities = probabilities
        # Multi-task models: the sigmoid applies to classification tasks only (regression
        # outputs are values), as in MTLModule.predict.
        types = getattr(model, "task_types", None)
        self.classification: torch.Tensor | None = None
        if probabilities and tower is None and types is not None:
            self.classification = torch.tensor([t == "classification" for t in types], dtype=torch.bool)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        x = dict(zip(self.names, tensors))
        if self.tower is not None:
            out = getattr(self.model, f"{self.tower}_tower")(x)
        else:
            out = self.model(x)
            if isinstance(out, (tuple, list)):  # (scores, aux_loss) models
                out = out[0]
            if self.probabilities:
                if self.classification is not None and out.dim() == 2 and out.shape[1] == self.classification.numel():
                    out = torch.where(self.classification.to(out.device), torch.sigmoid(out), out)
                else:
                    out = torch.sigmoid(out)
        return out


def export_onnx(
    model: nn.Module,
    path: str,
    *,
    tower: str | None = None,
    features: Sequence[Feature] | None = None,
    dummy_input: dict[str, torch.Tensor] | None = None,
    probabilities: bool | None = None,
    seq_length: int | None = None,
    opset_version: int = 17,
) -> str:
    """Export ``model`` (or its ``user``/``item`` tower) to an ONNX file.

    Args:
        model: a ranking, multi-task or matching model.
        path: output ``.onnx`` file.
        tower: ``"user"`` or ``"item"`` to export one tower of a matching model.
        features: graph inputs (default: the features the model/tower reads).
        dummy_input: example inputs (default: random valid ids/values).
        probabilities: apply the sigmoid (default: yes for our logit models, not for towers;
            multi-task models with ``task_types``: to the classification tasks only).
        seq_length: sequence length of generated dummy inputs (default: the model's
            ``max_length`` / ``seq_max_len`` / ``max_len`` when it has one, else 10); the
            exported graph accepts any length the model does.
        opset_version: ONNX opset.

    Returns:
        The path written. Inputs are named after the features, the output ``output``; the
        batch dimension (and sequence length) are dynamic, except SASRec's sequence length,
        which its attention traces as a constant (feed histories padded to ``max_len``).

    Raises:
        ImportError: when ``onnx`` is not installed (``pip install 'rechub-lightning[onnx]'``).
    """
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install 'rechub-lightning[onnx]'") from e
    if tower not in (None, "user", "item"):
        raise ValueError(f"tower must be None, 'user' or 'item', got {tower!r}")
    feats = list(features) if features is not None else model_features(model, tower)
    if seq_length is None:
        seq_length = _model_max_length(model) or 10
    x = dummy_input or dummy_inputs(feats, batch_size=2, seq_length=seq_length)
    names = [f.name for f in feats]
    if probabilities is None:
        probabilities = tower is None and returns_logits(model)
    was_training = model.training
    model.eval()
    old_mode = getattr(model, "mode", None)
    wrapper = _Positional(model, names, tower, probabilities).eval()
    dynamic = {}
    for f in feats:
        dynamic[f.name] = {0: "batch", 1: "seq_len"} if isinstance(f, SequenceFeature) else {0: "batch"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                tuple(x[n] for n in names),
                path,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**dynamic, "output": {0: "batch"}},
                opset_version=opset_version,
                dynamo=False,
            )
    finally:
        model.train(was_training)
        if hasattr(model, "mode"):
            model.mode = old_mode
    return path
