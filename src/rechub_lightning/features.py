"""Feature definitions and the feature schema shared by datamodules and models.

The three feature classes keep Torch-RecHub's arguments and meaning, so code
written for ``torch_rechub.basic.features`` runs unchanged. A
:class:`FeatureSchema` is what a datamodule produces (names, vocabulary sizes,
dense widths) and what a model consumes; it serialises to plain Python so it
can live in checkpoints that load with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
from torch import nn

__all__ = [
    "SparseFeature",
    "DenseFeature",
    "SequenceFeature",
    "Feature",
    "FeatureSchema",
    "RandomNormal",
    "RandomUniform",
    "XavierNormal",
    "XavierUniform",
    "Pretrained",
    "get_auto_embedding_dim",
    "resolve_features",
]

_POOLINGS = ("mean", "sum", "concat")


def get_auto_embedding_dim(vocab_size: int) -> int:
    """Embedding width ``floor(6 * vocab_size ** 0.25)`` (Wang et al., DCN, ADKDD'17)."""
    return int(math.floor(6 * vocab_size**0.25))


# --------------------------------------------------------------------------- initializers


class _Initializer:
    """Fills an embedding weight in place; callable like the reference's initializers."""

    def init_(self, weight: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, vocab_size: int, embed_dim: int, padding_idx: int | None = None) -> nn.Embedding:
        # The reference's initializers return a fresh nn.Embedding; keep that contract.
        embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        with torch.no_grad():
            self.init_(embed.weight)
            if padding_idx is not None:
                embed.weight[padding_idx].zero_()
        return embed

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **{k: v for k, v in vars(self).items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class RandomNormal(_Initializer):
    """Normal(mean, std) initialisation (the reference's default is ``RandomNormal(0, 1e-4)``)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = float(mean)
        self.std = float(std)

    def init_(self, weight: torch.Tensor) -> None:
        nn.init.normal_(weight, self.mean, self.std)


class RandomUniform(_Initializer):
    """Uniform(minval, maxval) initialisation."""

    def __init__(self, minval: float = 0.0, maxval: float = 1.0) -> None:
        self.minval = float(minval)
        self.maxval = float(maxval)

    def init_(self, weight: torch.Tensor) -> None:
        nn.init.uniform_(weight, self.minval, self.maxval)


class XavierNormal(_Initializer):
    """Glorot normal initialisation with ``gain``."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = float(gain)

    def init_(self, weight: torch.Tensor) -> None:
        nn.init.xavier_normal_(weight, self.gain)


class XavierUniform(_Initializer):
    """Glorot uniform initialisation with ``gain``."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = float(gain)

    def init_(self, weight: torch.Tensor) -> None:
        nn.init.xavier_uniform_(weight, self.gain)


class Pretrained(_Initializer):
    """Initialise from a pretrained ``(vocab_size, embed_dim)`` matrix.

    ``freeze`` is honoured by models built on :class:`~rechub_lightning.layers.EmbeddingLayer`
    only in the sense that the rows are copied; freezing a slice of a fused table is
    not supported, so ``freeze=True`` raises at layer construction.
    """

    def __init__(self, embedding_weight: Any, freeze: bool = False) -> None:
        self.embedding_weight = torch.as_tensor(embedding_weight, dtype=torch.float32)
        self.freeze = bool(freeze)

    def init_(self, weight: torch.Tensor) -> None:
        if tuple(self.embedding_weight.shape) != tuple(weight.shape):
            raise ValueError(
                f"Pretrained embedding has shape {tuple(self.embedding_weight.shape)}, "
                f"expected {tuple(weight.shape)}"
            )
        weight.copy_(self.embedding_weight)

    def to_dict(self) -> dict[str, Any]:
        # Weights travel in the model's state dict, not in the schema.
        return {"type": "RandomNormal", "mean": 0.0, "std": 1e-4}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pretrained) and torch.equal(self.embedding_weight, other.embedding_weight)


_INITIALIZERS = {c.__name__: c for c in (RandomNormal, RandomUniform, XavierNormal, XavierUniform)}


def _initializer_from_dict(d: dict[str, Any] | None) -> _Initializer:
    if d is None:
        return RandomNormal(0.0, 1e-4)
    d = dict(d)
    kind = d.pop("type")
    return _INITIALIZERS[kind](**d)


# --------------------------------------------------------------------------- features


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"feature name must be a non-empty string, got {name!r}")
    return name


def _check_int(name: str, arg: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; a float, string or bool is an error, not a truncation."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"feature {name!r}: {arg} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"feature {name!r}: {arg} must be >= {minimum}, got {value}")
    return value


def _check_vocab(name: str, vocab_size: Any) -> int:
    return _check_int(name, "vocab_size", vocab_size, 1)


class SparseFeature:
    """A categorical feature: one id per row, looked up in an embedding table.

    Args:
        name: column name in the batch dict.
        vocab_size: number of rows of the embedding table; ids must lie in ``[0, vocab_size)``.
        embed_dim: embedding width; ``None`` picks ``floor(6 * vocab_size ** 0.25)``.
        shared_with: name of another feature whose table this feature reuses.
        padding_idx: an id whose embedding is the zero vector and receives no gradient.
        initializer: how the table is initialised (default ``RandomNormal(0, 1e-4)``).

    Example:
        >>> SparseFeature("city", vocab_size=81).embed_dim
        18
    """

    kind = "sparse"

    def __init__(
        self,
        name: str,
        vocab_size: int,
        embed_dim: int | None = None,
        shared_with: str | None = None,
        padding_idx: int | None = None,
        initializer: _Initializer | None = None,
    ) -> None:
        self.name = _check_name(name)
        self.vocab_size = _check_vocab(self.name, vocab_size)
        self.embed_dim = (
            get_auto_embedding_dim(self.vocab_size) if embed_dim is None else _check_int(self.name, "embed_dim", embed_dim, 1)
        )
        self.shared_with = shared_with
        if padding_idx is not None and not 0 <= _check_int(self.name, "padding_idx", padding_idx, 0) < self.vocab_size:
            raise ValueError(
                f"feature {name!r}: padding_idx={padding_idx} outside [0, {self.vocab_size})"
            )
        self.padding_idx = None if padding_idx is None else int(padding_idx)
        self.initializer = RandomNormal(0.0, 1e-4) if initializer is None else initializer

    @property
    def table_name(self) -> str:
        """Name of the embedding table this feature reads (its own or the shared one)."""
        return self.shared_with or self.name

    def get_embedding_layer(self) -> nn.Embedding:
        """A stand-alone ``nn.Embedding`` for this feature (reference API)."""
        if not hasattr(self, "embed"):
            self.embed = self.initializer(self.vocab_size, self.embed_dim, padding_idx=self.padding_idx)
        return self.embed

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "shared_with": self.shared_with,
            "padding_idx": self.padding_idx,
            "initializer": self.initializer.to_dict(),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} with Embedding shape ({self.vocab_size}, {self.embed_dim})>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


class SequenceFeature(SparseFeature):
    """A variable-length list of ids (behaviour history, multi-hot tags), padded to ``(B, L)``.

    Args:
        name: column name in the batch dict.
        vocab_size: embedding rows; ids in ``[0, vocab_size)``.
        embed_dim: embedding width (``None``: automatic, as for :class:`SparseFeature`).
        pooling: ``"mean"`` or ``"sum"`` (masked by ``padding_idx``) or ``"concat"``
            (keeps ``(B, L, D)``).
        shared_with: feature whose table this sequence reuses (e.g. ``"item_id"``).
        padding_idx: padding id, excluded from pooling and with a zero embedding.
        initializer: table initialisation.
    """

    kind = "sequence"

    def __init__(
        self,
        name: str,
        vocab_size: int,
        embed_dim: int | None = None,
        pooling: str = "mean",
        shared_with: str | None = None,
        padding_idx: int | None = None,
        initializer: _Initializer | None = None,
    ) -> None:
        super().__init__(name, vocab_size, embed_dim, shared_with, padding_idx, initializer)
        if pooling not in _POOLINGS:
            raise ValueError(f"feature {name!r}: pooling must be one of {_POOLINGS}, got {pooling!r}")
        self.pooling = pooling

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "pooling": self.pooling}


class DenseFeature:
    """A numeric feature: a float per row (``embed_dim=1``) or a vector ``(B, embed_dim)``.

    Args:
        name: column name in the batch dict.
        embed_dim: width of the value (1 for a scalar).
    """

    kind = "dense"

    def __init__(self, name: str, embed_dim: int = 1) -> None:
        self.name = _check_name(name)
        self.embed_dim = _check_int(self.name, "embed_dim", embed_dim, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "embed_dim": self.embed_dim}

    def __repr__(self) -> str:
        return f"<DenseFeature {self.name}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(("DenseFeature", self.name))


Feature = Union[SparseFeature, SequenceFeature, DenseFeature]


def feature_from_dict(d: dict[str, Any]) -> Feature:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "dense":
        return DenseFeature(**d)
    d["initializer"] = _initializer_from_dict(d.get("initializer"))
    if kind == "sparse":
        return SparseFeature(**d)
    if kind == "sequence":
        return SequenceFeature(**d)
    raise ValueError(f"unknown feature kind {kind!r}")


def is_feature(obj: Any) -> bool:
    return isinstance(obj, (SparseFeature, DenseFeature))


# --------------------------------------------------------------------------- schema


class FeatureSchema:
    """The features of a data set, grouped by role, plus its label columns.

    A datamodule builds it right after ``__init__`` (so LightningCLI can link it into
    the model) and our models accept it through their ``schema`` argument.

    Args:
        features: every feature, in column order.
        labels: label column names (one per task).
        groups: optional named groups of feature names, e.g. ``{"user": [...], "item": [...]}``.
            The groups ``"dense"``, ``"sparse"``, ``"sequence"`` and ``"all"`` always exist.
    """

    def __init__(
        self,
        features: Sequence[Feature],
        labels: Sequence[str] = (),
        groups: dict[str, list[str]] | None = None,
    ) -> None:
        self.features = list(features)
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate feature names in schema: {sorted(dup)}")
        self.labels = list(labels)
        self.groups = {k: list(v) for k, v in (groups or {}).items()}
        for g, members in self.groups.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"schema group {g!r} names unknown features {unknown}")

    # groups -----------------------------------------------------------------
    @property
    def dense(self) -> list[DenseFeature]:
        return [f for f in self.features if isinstance(f, DenseFeature)]

    @property
    def sparse(self) -> list[SparseFeature]:
        return [f for f in self.features if type(f) is SparseFeature]

    @property
    def sequence(self) -> list[SequenceFeature]:
        return [f for f in self.features if isinstance(f, SequenceFeature)]

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r} in schema (have {[f.name for f in self.features]})")

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self.features)

    def group(self, name: str) -> list[Feature]:
        """Features of a named group: ``dense``, ``sparse``, ``sequence``, ``all`` or a custom one."""
        if name == "all":
            return list(self.features)
        if name in ("dense", "sparse", "sequence"):
            return list(getattr(self, name))
        if name in self.groups:
            return [self[n] for n in self.groups[name]]
        raise KeyError(
            f"unknown feature group {name!r}; available: "
            f"{['all', 'dense', 'sparse', 'sequence', *self.groups]}"
        )

    def select(self, spec: str | Iterable[str]) -> list[Feature]:
        """Resolve a selector: ``"dense+sparse"``, a group name, or a list of names/groups."""
        parts = spec.split("+") if isinstance(spec, str) else list(spec)
        out: list[Feature] = []
        for p in parts:
            p = p.strip()
            chosen = [self[p]] if p in self and p not in ("dense", "sparse", "sequence", "all") else self.group(p)
            out.extend(f for f in chosen if f not in out)
        return out

    # serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"features": [f.to_dict() for f in self.features], "labels": self.labels, "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        return cls([feature_from_dict(f) for f in d["features"]], d.get("labels", ()), d.get("groups"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSchema) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"FeatureSchema(dense={len(self.dense)}, sparse={len(self.sparse)}, "
            f"sequence={len(self.sequence)}, labels={self.labels})"
        )


def resolve_features(
    value: Sequence[Feature] | str | Sequence[str] | None,
    schema: FeatureSchema | None,
    default: str,
    arg: str,
) -> list[Feature]:
    """Turn a model's feature argument into a list of features.

    ``value`` may be a list of feature objects (the reference API), a selector string or a
    list of names (resolved against ``schema``), or ``None`` (``default`` selector).

    Raises:
        ValueError: when a selector is given without a schema, or the result is malformed.
    """
    if value is not None and not isinstance(value, str) and all(is_feature(v) for v in value):
        return list(value)
    spec = default if value is None else value
    if schema is None:
        raise ValueError(
            f"{arg}={value!r}: pass a list of feature objects, or a `schema` to resolve "
            f"feature selectors against"
        )
    if isinstance(schema, dict):
        schema = FeatureSchema.from_dict(schema)
    chosen = schema.select(spec)  # type: ignore[arg-type]
    parts = {p.strip() for p in (spec.split("+") if isinstance(spec, str) else spec)}
    if not chosen and parts & {"sparse", "sequence"} and not (schema.sparse or schema.sequence):
        # e.g. categories stored as integer codes in a file: column inference made them dense
        raise ValueError(
            f"{arg}={spec!r} selects no feature: the data's schema has no categorical (sparse or sequence) feature, "
            f"only {len(schema.dense)} dense one(s) {[f.name for f in schema.dense][:10]}; categorical columns stored "
            f"as numbers are inferred as dense: name them in the datamodule's sparse_features (--data.sparse_features)"
        )
    return chosen
