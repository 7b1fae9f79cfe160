"""What every model of the zoo shares: the logits marker and a serialisable constructor spec."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from torch import nn

from ..features import FeatureSchema, feature_from_dict, is_feature

__all__ = ["RecModel", "model_spec", "build_model", "returns_logits", "to_plain", "from_plain", "unwrap_model"]


class RecModel(nn.Module):
    """Base class of rechub-lightning models.

    * ``returns_logits = True`` tells the LightningModules that ``forward`` returns logits
      (DESIGN decision 2); foreign models without the attribute are treated as returning
      probabilities, like Torch-RecHub's.
    * The constructor arguments are recorded so that a checkpoint can rebuild the model
      without pickling it (:func:`model_spec`, :func:`build_model`).
    """

    returns_logits = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self: nn.Module, *args: Any, **kw: Any) -> None:
            if "_rechub_init" not in self.__dict__:  # the most derived constructor records first
                object.__setattr__(self, "_rechub_init", (args, kw))
            init(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[method-assign]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``DataParallel``/``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, in any nesting."""
    inner = model
    for _ in range(4):
        nxt = getattr(inner, "module", None)
        nxt = nxt if isinstance(nxt, nn.Module) else getattr(inner, "_orig_mod", None)
        if not isinstance(nxt, nn.Module):
            break
        inner = nxt
    return inner


def returns_logits(model: nn.Module) -> bool:
    """Whether ``model(x)`` returns logits (our models) or probabilities (e.g. Torch-RecHub's)."""
    inner = getattr(model, "module", model)  # DDP / DataParallel wrappers
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return bool(getattr(inner, "returns_logits", False))


def to_plain(obj: Any) -> Any:
    """Convert constructor arguments to plain Python (features and schemas become tagged dicts)."""
    if is_feature(obj):
        return {"__feature__": obj.to_dict()}
    if isinstance(obj, FeatureSchema):
        return {"__schema__": obj.to_dict()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise constructor argument of type {type(obj).__name__}")


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__feature__" in obj:
            return feature_from_dict(obj["__feature__"])
        if "__schema__" in obj:
            return FeatureSchema.from_dict(obj["__schema__"])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(o) for o in obj]
    return obj


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` in plain Python, or ``None`` when the model cannot be
    described that way (a foreign model, or arguments that are not plain data)."""
    rec = model.__dict__.get("_rechub_init")
    if rec is None:
        return None
    args, kwargs = rec
    cls = type(model)
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
        # **kwargs parameters are stored flattened
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in init_args:
                init_args.update(init_args.pop(name))
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": to_plain(init_args)}
    except TypeError:
        return None


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from :func:`model_spec`'s output."""
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**from_plain(spec.get("init_args", {})))
