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

__all__ = ["export_onnx", "quantize_onnx", "quantize_model", "dummy_inputs", "model_features"]


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
        # ``*_features`` lists and ``*_feature`` attributes (e.g. YoutubeSBC's sample_weight_feature)
        values = [value] if isinstance(value, Feature) else value if isinstance(value, (list, tuple)) else ()
        if name.endswith(("features", "feature")):
            for f in values:
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
        batch dimension (and sequence length) are dynamic, except SASRec's and BST's sequence
        length, which their attention traces as a constant (export with ``seq_length`` = the
        data's ``max_len`` and feed histories padded to it; ``rechub export`` does so).

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


_QUANT_MODES = {"int8": "int8", "dynamic_int8": "int8", "dynamic": "int8", "fp16": "fp16", "float16": "fp16"}


def quantize_onnx(
    input_path: str,
    output_path: str,
    mode: str = "int8",
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: str = "qint8",
    op_types_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    keep_io_types: bool = True,
) -> str:
    """Shrink an exported ONNX model: INT8 weights (CPU serving) or float16 (GPU serving).

    Args:
        input_path: a float32 ONNX file from :func:`export_onnx`.
        output_path: the file to write.
        mode: ``"int8"`` (ONNX Runtime dynamic quantization of the embedding tables, the
            ``Gather`` weights that hold most of a recommender's size, as 8-bit integers) or
            ``"fp16"`` (every float tensor as float16; needs ``onnxconverter-common``).
        per_channel, reduce_range, weight_type: INT8 options of
            ``onnxruntime.quantization.quantize_dynamic`` (``weight_type`` ``"qint8"`` or ``"quint8"``).
        op_types_to_quantize: INT8 only: the operator types to quantize (default ``["Gather"]``).
            ``["Gather", "MatMul"]`` also stores the MLP weights in 8 bits and quantizes their
            inputs on the fly, per tensor: smaller, but the default DeepFM config's scores then
            moved by up to 0.35 and its test AUC fell from 0.836 to 0.829 (the tables alone: 0.003,
            AUC unchanged).
        nodes_to_exclude: INT8 only: node names kept in float.
        keep_io_types: fp16 only: keep float32 inputs and outputs (casts inside the graph),
            so callers feed the same arrays as for the float32 model.

    Returns:
        ``output_path``.

    Every ranking and matching model of the zoo converts in both modes (their scores stay
    within 0.01 (INT8) and 2e-3 (fp16) of the float32 graph's in our checks). Known issue:
    ONNX Runtime 1.32's CPU ``NchwcTransformer`` (on at the default optimization level)
    crashes on NARM's float16 user tower; load that one with
    ``InferenceSession(path, disabled_optimizers=["NchwcTransformer"])``.

    Raises:
        ValueError: an unknown ``mode`` or ``weight_type``.
        ImportError: ``onnxruntime`` (int8) or ``onnxconverter-common`` (fp16) is missing
            (``pip install 'rechub-lightning[onnx]'``).

    Example (Torch-RecHub's ``utils.quantization.quantize_model`` is the same call)::

        export_onnx(model, "deepfm.onnx")
        quantize_onnx("deepfm.onnx", "deepfm.int8.onnx")           # ~4x smaller tables
        quantize_onnx("deepfm.onnx", "deepfm.fp16.onnx", mode="fp16")
    """
    kind = _QUANT_MODES.get(str(mode).strip().lower())
    if kind is None:
        raise ValueError(f"mode must be one of {sorted(_QUANT_MODES)}, got mode={mode!r}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input_path {input_path!r} does not exist")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    if kind == "int8":
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError as e:
            raise ImportError("INT8 quantization needs onnxruntime: pip install 'rechub-lightning[onnx]'") from e
        types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        if weight_type not in types:
            raise ValueError(f"weight_type must be 'qint8' or 'quint8', got weight_type={weight_type!r}")
        quantize_dynamic(
            input_path,
            output_path,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=types[weight_type],
            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize is not None else ["Gather"],
            nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude is not None else None,
        )
        return output_path
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as e:
        raise ImportError("fp16 conversion needs onnx and onnxconverter-common: pip install 'rechub-lightning[onnx]'") from e
    graph = onnx.load(input_path)
    # The exporter's intermediate type annotations say float32; the converter re-infers them.
    graph.graph.ClearField("value_info")
    # The converter leaves Cast(to=float) nodes as they are (the model's own casts: dense
    # inputs, masks), which then feed float32 into float16 operators: cast to float16 instead.
    for node in graph.graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    converted = float16.convert_float_to_float16(graph, keep_io_types=keep_io_types, check_fp16_ready=False)
    onnx.save(converted, output_path)
    return output_path


def quantize_model(input_path: str, output_path: str, mode: str = "int8", **kwargs: object) -> str:
    """Torch-RecHub's name for :func:`quantize_onnx` (``utils.quantization.quantize_model``)."""
    return quantize_onnx(input_path, output_path, mode, **kwargs)  # type: ignore[arg-type]
