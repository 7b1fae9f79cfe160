"""Embedding lookup for a list of features, with fused tables.

Torch-RecHub keeps one ``nn.Embedding`` per feature and looks them up in a Python
loop. Here all features with the same embedding width share ONE table (each feature
owns a contiguous block of rows, addressed by an offset), so a whole field list is
looked up with a single gather. Setting ``table.sparse = True`` on these tables (the
``sparse_embeddings`` option of the modules) makes the backward pass produce row-wise
sparse gradients whose cost does not grow with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..features import DenseFeature, Feature, Pretrained, SequenceFeature, SparseFeature

__all__ = ["EmbeddingLayer", "InputMask", "masked_pool"]


def masked_pool(emb: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool ``(B, L, D)`` over ``L`` with a ``(B, L)`` validity mask.

    ``mean`` divides by the number of valid positions (an all-padding row pools to 0),
    ``sum`` adds valid positions, ``concat`` returns the masked sequence unchanged.
    """
    if mask is not None:
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
    if pooling == "concat":
        return emb
    summed = emb.sum(dim=1)
    if pooling == "sum":
        return summed
    if mask is None:
        return summed / emb.shape[1]
    count = mask.sum(dim=1, keepdim=True).to(emb.dtype)
    return summed / count.clamp_min(1.0)


class EmbeddingLayer(nn.Module):
    """Embeds the features of a batch dict.

    Args:
        features: every feature any later ``forward`` call may ask for. Features are
            de-duplicated by name; a feature with ``shared_with`` reads its owner's rows.

    ``forward(x, features, squeeze_dim=False)`` follows the reference:

    * ``squeeze_dim=False``: sparse and pooled sequence features stacked as
      ``(B, num_features, embed_dim)`` (all of one width); dense features are not allowed.
    * ``squeeze_dim=True``: ``(B, sum of widths)`` = flattened embeddings, then dense values.

    Example:
        >>> from rechub_lightning import SparseFeature
        >>> feats = [SparseFeature("a", 10, 4), SparseFeature("b", 20, 4)]
        >>> layer = EmbeddingLayer(feats)
        >>> x = {"a": torch.tensor([1, 2]), "b": torch.tensor([3, 4])}
        >>> layer(x, feats).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, features: Sequence[Feature]) -> None:
        super().__init__()
        unique: dict[str, Feature] = {}
        for f in features:
            if f.name in unique and unique[f.name] != f:
                kinds = {type(unique[f.name]).__name__, type(f).__name__}
                if kinds == {"DenseFeature", "SparseFeature"}:
                    raise ValueError(
                        f"feature {f.name!r} is declared both as a DenseFeature and as a SparseFeature: one column "
                        f"cannot be both a value and an id; embed a discretised copy under its own name "
                        f"(e.g. {f.name + '_cat'!r})"
                    )
                raise ValueError(f"two different features are named {f.name!r}: {unique[f.name]!r} and {f!r}")
            unique.setdefault(f.name, f)
        self.features = list(unique.values())
        self.n_dense = sum(1 for f in self.features if isinstance(f, DenseFeature))

        owners = {f.name: f for f in self.features if isinstance(f, SparseFeature) and f.shared_with is None}
        # width -> list of owner features stored in that table
        by_dim: dict[int, list[SparseFeature]] = {}
        for f in owners.values():
            by_dim.setdefault(f.embed_dim, []).append(f)

        self._offset: dict[str, int] = {}
        self._table_of: dict[str, str] = {}
        self.tables = nn.ModuleDict()
        for dim, feats in by_dim.items():
            key = f"dim{dim}"
            offset = 0
            for f in feats:
                self._offset[f.name] = offset
                self._table_of[f.name] = key
                offset += f.vocab_size
            self.tables[key] = nn.Embedding(offset, dim)
            with torch.no_grad():
                w = self.tables[key].weight
                for f in feats:
                    block = w[self._offset[f.name] : self._offset[f.name] + f.vocab_size]
                    if isinstance(f.initializer, Pretrained) and f.initializer.freeze:
                        raise ValueError(f"feature {f.name!r}: frozen pretrained rows are not supported")
                    f.initializer.init_(block)
                    if f.padding_idx is not None:
                        block[f.padding_idx].zero_()

        for f in self.features:
            if isinstance(f, SparseFeature) and f.shared_with is not None:
                owner = owners.get(f.shared_with)
                if owner is None:
                    raise ValueError(
                        f"feature {f.name!r} has shared_with={f.shared_with!r}, but no feature of that name "
                        f"(owning its own table) was given to the embedding layer"
                    )
                if owner.embed_dim != f.embed_dim:
                    raise ValueError(
                        f"feature {f.name!r} (embed_dim={f.embed_dim}) shares the table of {owner.name!r} "
                        f"(embed_dim={owner.embed_dim}); widths must match"
                    )
                self._offset[f.name] = self._offset[owner.name]
                self._table_of[f.name] = self._table_of[owner.name]
        self._plans: dict[tuple[str, ...], list] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        """The tables' floating dtype (dense inputs are cast to it)."""
        for table in self.tables.values():
            return table.weight.dtype  # type: ignore[return-value]
        return torch.get_default_dtype()

    def table_for(self, feature: Feature | str) -> nn.Embedding:
        """The (fused) ``nn.Embedding`` that holds a feature's rows."""
        name = feature if isinstance(feature, str) else feature.name
        return self.tables[self._table_of[name]]  # type: ignore[return-value]

    def rows(self, feature: Feature | str) -> torch.Tensor:
        """The feature's own block of rows, ``(vocab_size, embed_dim)`` (a view, for inspection/export)."""
        name = feature if isinstance(feature, str) else feature.name
        f = next(f for f in self.features if f.name == name)
        return self.table_for(name).weight[self._offset[name] : self._offset[name] + f.vocab_size]

    def _embed_ids(self, feature: SparseFeature, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        emb = self.table_for(feature)(ids + self._offset[feature.name])
        if feature.padding_idx is not None and type(feature) is SparseFeature:
            # Zero vector and no gradient for the padding id, as nn.Embedding(padding_idx=...) does.
            emb = emb * (ids != feature.padding_idx).unsqueeze(-1).to(emb.dtype)
        return emb

    def embed_sequence(self, x: dict[str, torch.Tensor], feature: SequenceFeature) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unpooled ``(B, L, D)`` embeddings of a sequence feature and its ``(B, L)`` mask (or None)."""
        ids = x[feature.name].long()
        emb = self.table_for(feature)(ids + self._offset[feature.name])
        mask = None if feature.padding_idx is None else ids != feature.padding_idx
        return emb, mask

    def _plan(self, features: Sequence[Feature]) -> list:
        key = tuple(f.name for f in features)
        plan = self._plans.get(key)
        if plan is None:
            plan = []
            # Consecutive plain sparse features of one table are gathered together.
            for f in features:
                if type(f) is SparseFeature:
                    if f.name not in self._offset:
                        raise KeyError(f"feature {f.name!r} was not given to this EmbeddingLayer")
                    if plan and plan[-1][0] == "sparse" and plan[-1][1] == self._table_of[f.name]:
                        plan[-1][2].append(f)
                    else:
                        plan.append(["sparse", self._table_of[f.name], [f]])
                elif isinstance(f, SequenceFeature):
                    if f.name not in self._offset:
                        raise KeyError(f"feature {f.name!r} was not given to this EmbeddingLayer")
                    plan.append(["sequence", None, [f]])
                elif isinstance(f, DenseFeature):
                    plan.append(["dense", None, [f]])
                else:
                    raise TypeError(f"unsupported feature object {f!r}")
            for step in plan:
                if step[0] == "sparse":
                    feats = step[2]
                    step.append(torch.tensor([self._offset[f.name] for f in feats], dtype=torch.long))
                    pads = [(i, f.padding_idx) for i, f in enumerate(feats) if f.padding_idx is not None]
                    step.append(pads)
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ forward
    def forward(self, x: dict[str, torch.Tensor], features: Sequence[Feature] | None = None, squeeze_dim: bool = False) -> torch.Tensor:
        features = self.features if features is None else features
        sparse_parts: list[torch.Tensor] = []  # each (B, n, D) or (B, 1, L, D) for concat pooling
        dense_parts: list[torch.Tensor] = []
        for step in self._plan(features):
            kind, table_key, feats = step[0], step[1], step[2]
            if kind == "sparse":
                offsets, pads = step[3], step[4]
                if len(feats) == 1:
                    ids = x[feats[0].name].long().reshape(-1, 1)
                else:
                    ids = torch.stack([x[f.name].long().reshape(-1) for f in feats], dim=1)
                if offsets.device != ids.device:
                    offsets = step[3] = offsets.to(ids.device)
                emb = self.tables[table_key](ids + offsets)
                if pads:
                    keep = torch.ones_like(ids, dtype=torch.bool)
                    for i, p in pads:
                        keep[:, i] = ids[:, i] != p
                    emb = emb * keep.unsqueeze(-1).to(emb.dtype)
                sparse_parts.append(emb)
            elif kind == "sequence":
                f = feats[0]
                emb, mask = self.embed_sequence(x, f)
                pooled = masked_pool(emb, mask, f.pooling)
                sparse_parts.append(pooled.unsqueeze(1))
            else:
                v = x[feats[0].name].to(self.dtype)  # the tables' dtype: float32, or bf16/fp16 under *-true precision
                dense_parts.append(v.unsqueeze(1) if v.dim() == 1 else v)

        if squeeze_dim:
            flat = [p.flatten(start_dim=1) for p in sparse_parts]
            if not flat and not dense_parts:
                raise ValueError("the input features can not be empty")
            return torch.cat(flat + dense_parts, dim=1) if len(flat) + len(dense_parts) > 1 else (flat + dense_parts)[0]
        if dense_parts:
            raise ValueError(
                "squeeze_dim=False returns (B, num_features, embed_dim) and cannot hold dense features "
                f"({[f.name for f in features if isinstance(f, DenseFeature)]}); use squeeze_dim=True"
            )
        if not sparse_parts:
            raise ValueError(f"expected sparse or sequence features, got {list(features)}")
        widths = {f.embed_dim for f in features}  # static: ONNX tracing turns shapes into tensors
        if len(widths) > 1:
            raise ValueError(
                f"features of different embed_dim {sorted(widths)} cannot be stacked; use squeeze_dim=True"
            )
        return torch.cat(sparse_parts, dim=1) if len(sparse_parts) > 1 else sparse_parts[0]


class InputMask(nn.Module):
    """Validity masks of sparse/sequence features: ``(B, n)`` for sparse, ``(B, n, L)`` for sequences."""

    def forward(self, x: dict[str, torch.Tensor], features: Feature | Sequence[Feature]) -> torch.Tensor:
        if not isinstance(features, (list, tuple)):
            features = [features]
        masks = []
        for f in features:
            if not isinstance(f, SparseFeature):
                raise ValueError("only SparseFeature or SequenceFeature have masks")
            ids = x[f.name].long()
            m = ids != f.padding_idx if f.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
            masks.append(m.unsqueeze(1).float())
        return torch.cat(masks, dim=1)
