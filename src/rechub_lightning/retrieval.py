"""Exact top-K search over item embeddings, and an optional faiss index with the same API.

:func:`topk_search` scores users against all items chunk by chunk (memory bounded by
``chunk_size x n_items`` scores) and breaks ties deterministically, lower item row first,
so two runs, or a chunked and an unchunked run, return the same lists.

Example:
    >>> import torch
    >>> users, items = torch.randn(4, 8), torch.randn(100, 8)
    >>> scores, ids = topk_search(users, items, k=10)
    >>> scores.shape, ids.shape
    (torch.Size([4, 10]), torch.Size([4, 10]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["topk_search", "ExactIndex", "FaissIndex", "build_index", "ExcludeLike", "Annoy", "Faiss"]

#: Items to exclude per user: CSR ``(indptr (U + 1,), indices)`` tensors, or one sequence
#: of item row indices per user.
ExcludeLike = Union[tuple[Tensor, Tensor], Sequence[Any]]

_ANN_HINT = "pip install rechub-lightning[ann]"


def _exclude_to_csr(exclude: ExcludeLike, n_users: int, n_items: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalise ``exclude`` to CSR ``(indptr, indices)`` int64 tensors on ``device``."""
    if isinstance(exclude, tuple) and len(exclude) == 2 and all(isinstance(t, Tensor) for t in exclude):
        indptr, indices = (t.to(device=device, dtype=torch.long).flatten() for t in exclude)
        if indptr.numel() != n_users + 1:
            raise ValueError(f"exclude indptr must have n_users + 1 = {n_users + 1} entries, got {indptr.numel()}")
        if int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel() or bool((indptr[1:] < indptr[:-1]).any()):
            raise ValueError("exclude indptr must start at 0, be non-decreasing and end at len(indices)")
    else:
        rows = [torch.as_tensor(list(r) if isinstance(r, (set, frozenset)) else r, dtype=torch.long).flatten() for r in exclude]
        if len(rows) != n_users:
            raise ValueError(f"exclude has {len(rows)} rows but there are {n_users} users")
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        indptr = torch.zeros(n_users + 1, dtype=torch.long)
        indptr[1:] = lengths.cumsum(0)
        indices = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        indptr, indices = indptr.to(device), indices.to(device)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
        raise ValueError(f"exclude holds item rows outside [0, {n_items})")
    return indptr, indices


def _stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` per row ordered by (score descending, column ascending).

    ``torch.topk`` may pick any of the columns tied at the k-th score. A row is ambiguous
    exactly when its (k+1)-th best score equals its k-th; only those rows are re-selected
    (lowest column first), a few rows at a time, so no ``scores``-sized temporaries beyond
    a small block are allocated (a full-width count would cost 8 bytes per score).
    """
    n = scores.shape[1]
    extra = 1 if k < n else 0
    vals, idx = torch.topk(scores, k + extra, dim=1)
    if extra:
        ambiguous = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
        if bool(ambiguous.any()):
            kth = vals[:, -1:]
            for rows in ambiguous.nonzero().squeeze(1).split(64):
                s, t = scores[rows], kth[rows]
                above = s > t
                tied = s == t
                room = k - above.sum(1, keepdim=True)
                chosen = above | (tied & (tied.cumsum(1) <= room))
                cols = chosen.nonzero()[:, 1].view(-1, k)
                idx[rows] = cols
                vals[rows] = s.gather(1, cols)
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, perm)


def _select_from_candidates(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best ``k`` distinct item rows among candidates ``(U, C)`` (rows < 0 are empty slots).

    A row listed several times keeps its highest score. Order: score descending, row ascending,
    empty slots last (score ``-inf``, row ``-1``); an item scored ``-inf`` keeps its row.
    """
    # within each item row, best score first; then mark repeats
    order = scores.sort(dim=1, descending=True, stable=True).indices
    rows, scores = rows.gather(1, order), scores.gather(1, order)
    order = rows.sort(dim=1, stable=True).indices
    rows, scores = rows.gather(1, order), scores.gather(1, order)
    dropped = rows < 0
    dropped[:, 1:] |= rows[:, 1:] == rows[:, :-1]
    order = scores.sort(dim=1, descending=True, stable=True).indices
    rows, scores, dropped = rows.gather(1, order), scores.gather(1, order), dropped.gather(1, order)
    order = dropped.to(torch.uint8).sort(dim=1, stable=True).indices[:, :k]
    scores, rows, dropped = scores.gather(1, order), rows.gather(1, order), dropped.gather(1, order)
    return scores.masked_fill(dropped, float("-inf")), rows.masked_fill(dropped, -1)


def _refill_after_exclusion(scores: Tensor, vals: Tensor, rows: Tensor, excluded: tuple[Tensor, Tensor]) -> Tensor:
    """Item rows of a chunk's top-K with excluded items replaced by genuine ``-inf`` items, then ``-1``.

    Excluded items are scored ``-inf`` in ``scores``, so they tie with items whose own score
    is ``-inf`` and may take their places. Only rows whose K-th score is ``-inf`` are affected;
    for those, the ``-inf`` places are refilled with the non-excluded ``-inf`` items, lowest row
    first, and the places left over get ``-1`` ("no item left"). A few rows at a time, as in
    :func:`_stable_topk`.
    """
    k = rows.shape[1]
    user, item = excluded
    has_exclusion = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    has_exclusion[user] = True
    affected = has_exclusion & (vals[:, -1] == float("-inf"))
    if not bool(affected.any()):
        return rows
    rows = rows.clone()
    slot = torch.full((len(rows),), -1, dtype=torch.long, device=rows.device)
    for block in affected.nonzero().squeeze(1).split(64):
        slot[block] = torch.arange(len(block), device=rows.device)
        listed = slot[user] >= 0
        is_excluded = torch.zeros(len(block), scores.shape[1], dtype=torch.bool, device=rows.device)
        is_excluded[slot[user[listed]], item[listed]] = True
        slot[block] = -1
        genuine = (scores[block] == float("-inf")) & ~is_excluded
        n_finite = (vals[block] > float("-inf")).sum(1)
        rank = genuine.cumsum(1, dtype=torch.int32) - 1  # among this row's genuine -inf items
        chosen = genuine & (rank < (k - n_finite).unsqueeze(1))
        at, col = chosen.nonzero().unbind(1)
        filled = torch.full((len(block), k), -1, dtype=torch.long, device=rows.device)
        filled[at, n_finite[at] + rank[at, col].long()] = col
        keep = torch.arange(k, device=rows.device) < n_finite.unsqueeze(1)
        rows[block] = torch.where(keep, rows[block], filled)
    return rows


def _raise_for_nan_scores(user_emb: Tensor, item_emb: Tensor, scores: Tensor, item_ids: Tensor | None) -> None:
    """Raise a ``ValueError`` naming where the NaN scores of :func:`topk_search` come from."""
    bad_items = item_emb.isnan().any(1).nonzero().squeeze(1)
    if bad_items.numel():
        first = int(bad_items[0])
        named = f"row {first}" + (f" (item id {int(item_ids.flatten()[first])})" if item_ids is not None else "")
        raise ValueError(
            f"item_emb has NaN in {bad_items.numel()} of {item_emb.shape[0]} items, the first at {named}: "
            "NaN scores cannot be ranked"
        )
    bad_users = user_emb.reshape(user_emb.shape[0], -1).isnan().any(1).nonzero().squeeze(1)
    if bad_users.numel():
        raise ValueError(
            f"user_emb has NaN in {bad_users.numel()} of {user_emb.shape[0]} users, the first at row "
            f"{int(bad_users[0])}: NaN scores cannot be ranked"
        )
    first_user = int(scores.isnan().any(1).nonzero()[0, 0])
    raise ValueError(
        f"the scores of user row {first_user} hold NaN (inf - inf from infinite embedding values, or "
        f"products overflowing {scores.dtype}): NaN scores cannot be ranked"
    )


@torch.no_grad()
def topk_search(
    user_emb: Tensor,
    item_emb: Tensor,
    k: int,
    *,
    chunk_size: int = 1024,
    exclude: ExcludeLike | None = None,
    item_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-K items for each user.

    Users are scored ``chunk_size`` at a time (``chunk @ item_emb.T``, then
    ``torch.topk``), so memory stays at ``chunk_size x n_items`` scores. A multi-interest
    user ``(I, D)`` scores an item by the best of its interests.

    Ties are broken deterministically: among equal scores the lower item row comes first,
    whatever the chunk size.

    Args:
        user_emb: ``(U, D)`` user embeddings, or ``(U, I, D)`` for ``I`` interests per user.
        item_emb: ``(N, D)`` item embeddings, on the same device.
        k: items per user. If ``k > N``, ``N`` columns are returned.
        chunk_size: users scored at once.
        exclude: item **rows** (positions in ``item_emb``, not ids) never to return per user,
            e.g. the training items: CSR ``(indptr (U + 1,), indices)`` tensors or one
            sequence per user. If fewer than ``k`` items are left for a user, the trailing
            places hold score ``-inf`` and id ``-1``; id ``-1`` means only that (an item that
            is not excluded and scores ``-inf`` is returned with its id).
        item_ids: ``(N,)`` ids returned in place of item rows.

    Returns:
        ``(scores (U, min(k, N)), ids (U, min(k, N)))``, best first; ids are int64.

    Raises:
        ValueError: on bad shapes, devices, ``k`` or ``chunk_size``, or out-of-range exclusions;
            and if a returned score would be NaN (an embedding holding NaN, named by its row,
            or ``inf - inf``): NaN scores would otherwise rank first for every user. The check
            costs nothing until a NaN reaches the top ``k``, so a NaN item that every user
            excludes goes unnoticed.

    Example:
        >>> import torch
        >>> items = torch.eye(3)
        >>> users = torch.tensor([[0.0, 1.0, 0.5]])
        >>> topk_search(users, items, k=2, exclude=[[1]])[1]
        tensor([[2, 0]])
    """
    if user_emb.dim() not in (2, 3):
        raise ValueError(f"user_emb must be (U, D) or (U, I, D), got shape {tuple(user_emb.shape)}")
    if item_emb.dim() != 2 or item_emb.shape[1] != user_emb.shape[-1]:
        raise ValueError(
            f"item_emb must be (N, {user_emb.shape[-1]}) to match user_emb, got shape {tuple(item_emb.shape)}"
        )
    if item_emb.device != user_emb.device:
        raise ValueError(f"user_emb is on {user_emb.device} but item_emb is on {item_emb.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    if item_ids is not None and item_ids.numel() != n_items:
        raise ValueError(f"item_ids has {item_ids.numel()} entries for {n_items} items")
    device = user_emb.device
    dtype = torch.promote_types(user_emb.dtype, item_emb.dtype)
    users, items_t = user_emb.to(dtype), item_emb.to(dtype).T
    kk = min(k, n_items)
    csr = _exclude_to_csr(exclude, n_users, n_items, device) if exclude is not None else None

    out_scores = torch.empty(n_users, kk, dtype=dtype, device=device)
    out_rows = torch.empty(n_users, kk, dtype=torch.long, device=device)
    for start in range(0, n_users, chunk_size):
        stop = min(start + chunk_size, n_users)
        chunk = users[start:stop]
        if chunk.dim() == 2:
            scores = chunk @ items_t
        else:  # max over interests, one (chunk, N) product at a time
            scores = chunk[:, 0] @ items_t
            for i in range(1, chunk.shape[1]):
                torch.maximum(scores, chunk[:, i] @ items_t, out=scores)
        excluded: tuple[Tensor, Tensor] | None = None
        if csr is not None:
            indptr, indices = csr
            lo, hi = int(indptr[start]), int(indptr[stop])
            if hi > lo:
                counts = indptr[start + 1 : stop + 1] - indptr[start:stop]
                row = torch.repeat_interleave(torch.arange(stop - start, device=device), counts)
                excluded = row, indices[lo:hi]
                scores[excluded] = float("-inf")
        if kk:
            vals, rows = _stable_topk(scores, kk)
            if excluded is not None:
                rows = _refill_after_exclusion(scores, vals, rows, excluded)
            out_scores[start:stop], out_rows[start:stop] = vals, rows
        del scores  # free this chunk's scores before the next product is allocated
    if kk and bool(out_scores.isnan().any()):
        _raise_for_nan_scores(user_emb, item_emb, out_scores, item_ids)
    if item_ids is None:
        return out_scores, out_rows
    ids = item_ids.to(device=device, dtype=torch.long)[out_rows.clamp(min=0)]
    return out_scores, ids.masked_fill_(out_rows < 0, -1)


class ExactIndex:
    """Exact inner-product index: :func:`topk_search` behind an ``add``/``search`` API.

    Args:
        chunk_size: users scored at once by :meth:`search`.

    Example:
        >>> import torch
        >>> index = ExactIndex()
        >>> index.add(torch.eye(3), item_ids=torch.tensor([10, 11, 12]))
        >>> index.search(torch.tensor([[0.0, 1.0, 0.5]]), k=2)[1]
        tensor([[11, 12]])
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = chunk_size
        self.item_emb: Tensor | None = None
        self.item_ids: Tensor | None = None

    @property
    def ntotal(self) -> int:
        """Number of items added."""
        return 0 if self.item_emb is None else self.item_emb.shape[0]

    def __len__(self) -> int:
        return self.ntotal

    def add(self, item_emb: Tensor, item_ids: Tensor | None = None) -> None:
        """Append items ``(N, D)``; ``item_ids`` default to their running position (0, 1, ...)."""
        item_emb = item_emb.detach()
        if item_emb.dim() != 2:
            raise ValueError(f"item_emb must be (N, D), got shape {tuple(item_emb.shape)}")
        n = item_emb.shape[0]
        if item_ids is None:
            item_ids = torch.arange(self.ntotal, self.ntotal + n)
        item_ids = item_ids.detach().flatten().long().to(item_emb.device)
        if item_ids.numel() != n:
            raise ValueError(f"item_ids has {item_ids.numel()} entries for {n} items")
        if self.item_emb is None:
            self.item_emb, self.item_ids = item_emb, item_ids
        else:
            assert self.item_ids is not None
            self.item_emb = torch.cat([self.item_emb, item_emb.to(self.item_emb)])
            self.item_ids = torch.cat([self.item_ids, item_ids.to(self.item_ids.device)])

    def search(self, user_emb: Tensor, k: int, exclude: ExcludeLike | None = None) -> tuple[Tensor, Tensor]:
        """``(scores, item ids)`` of the top ``k`` items; see :func:`topk_search`.

        ``exclude`` holds item rows (positions in the order added), not ids.
        """
        if self.item_emb is None:
            raise RuntimeError("search called on an empty index: add items first")
        return topk_search(
            user_emb.detach().to(self.item_emb.device),
            self.item_emb,
            k,
            chunk_size=self.chunk_size,
            exclude=exclude,
            item_ids=self.item_ids,
        )


class FaissIndex:
    """Inner-product faiss index (``IndexFlatIP``, or ``IndexIVFFlat`` with ``nlist``).

    Same API as :class:`ExactIndex`. Embeddings are searched as float32 on the CPU; results
    come back on the device of the user embeddings. With IVF, items are clustered on the
    first ``add`` (which needs at least ``nlist`` items) and the search is approximate: a
    user may get fewer than ``k`` items, the rest padded with score ``-inf`` and id ``-1``.

    Args:
        nlist: number of IVF cells; ``None`` for exact flat search.
        nprobe: IVF cells visited per query.

    Raises:
        ImportError: if faiss is not installed (``pip install rechub-lightning[ann]``).

    Example:
        >>> import torch
        >>> index = FaissIndex()  # doctest: +SKIP
        >>> index.add(torch.randn(1000, 16))  # doctest: +SKIP
        >>> scores, ids = index.search(torch.randn(5, 16), k=10)  # doctest: +SKIP
    """

    def __init__(self, nlist: int | None = None, nprobe: int = 8) -> None:
        try:
            import faiss
        except ImportError as err:
            raise ImportError(f"FaissIndex needs faiss: {_ANN_HINT} (or install faiss-cpu / faiss-gpu)") from err
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be None or >= 1, got {nlist}")
        self._faiss = faiss
        self.nlist = nlist
        self.nprobe = nprobe
        self.index: Any = None
        self.item_ids: Tensor | None = None

    @property
    def ntotal(self) -> int:
        """Number of items added."""
        return 0 if self.index is None else int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def add(self, item_emb: Tensor, item_ids: Tensor | None = None) -> None:
        """Append items ``(N, D)``; ``item_ids`` default to their running position (0, 1, ...)."""
        if item_emb.dim() != 2:
            raise ValueError(f"item_emb must be (N, D), got shape {tuple(item_emb.shape)}")
        x = np.ascontiguousarray(item_emb.detach().cpu().float().numpy())
        n, dim = x.shape
        if item_ids is None:
            item_ids = torch.arange(self.ntotal, self.ntotal + n)
        item_ids = item_ids.detach().flatten().long().cpu()
        if item_ids.numel() != n:
            raise ValueError(f"item_ids has {item_ids.numel()} entries for {n} items")
        faiss = self._faiss
        if self.index is None:
            if self.nlist is None:
                self.index = faiss.IndexFlatIP(dim)
            else:
                if n < self.nlist:
                    raise ValueError(f"IVF needs at least nlist={self.nlist} items on the first add, got {n}")
                quantizer = faiss.IndexFlatIP(dim)
                self.index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
                self.index.train(x)
                self.index.nprobe = self.nprobe
                self._quantizer = quantizer  # faiss does not own it: keep it alive
        self.index.add(x)
        self.item_ids = item_ids if self.item_ids is None else torch.cat([self.item_ids, item_ids])

    def search(self, user_emb: Tensor, k: int, exclude: ExcludeLike | None = None) -> tuple[Tensor, Tensor]:
        """``(scores, item ids)`` of the top ``k`` items, best first (ties: lower row first).

        ``user_emb`` is ``(U, D)`` or ``(U, I, D)`` (an item scores the best of the
        interests). ``exclude`` holds item rows (positions in the order added), not ids.
        """
        if self.index is None or self.item_ids is None:
            raise RuntimeError("search called on an empty index: add items first")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if user_emb.dim() not in (2, 3):
            raise ValueError(f"user_emb must be (U, D) or (U, I, D), got shape {tuple(user_emb.shape)}")
        device = user_emb.device
        n_users, n_items = user_emb.shape[0], self.ntotal
        interests = 1 if user_emb.dim() == 2 else user_emb.shape[1]
        kk = min(k, n_items)
        csr = _exclude_to_csr(exclude, n_users, n_items, torch.device("cpu")) if exclude is not None else None
        extra = int((csr[0][1:] - csr[0][:-1]).max()) if csr is not None and n_users else 0
        k_search = min(n_items, kk + extra)

        queries = np.ascontiguousarray(user_emb.detach().reshape(-1, user_emb.shape[-1]).cpu().float().numpy())
        dist, labels = self.index.search(queries, k_search)
        scores = torch.from_numpy(dist).reshape(n_users, interests * k_search)
        rows = torch.from_numpy(labels).long().reshape(n_users, interests * k_search)
        if csr is not None:
            indptr, indices = csr
            user_of = torch.repeat_interleave(torch.arange(n_users), indptr[1:] - indptr[:-1])
            # (user, row) pairs as one key: excluded candidates are those whose key is listed
            excluded_keys = (user_of * n_items + indices).sort().values
            keys = torch.arange(n_users).unsqueeze(1) * n_items + rows
            at = torch.searchsorted(excluded_keys, keys).clamp(max=max(excluded_keys.numel() - 1, 0))
            hit = (excluded_keys[at] == keys) if excluded_keys.numel() else torch.zeros_like(keys, dtype=torch.bool)
            rows = rows.masked_fill(hit & (rows >= 0), -1)
        scores, rows = _select_from_candidates(scores, rows, kk)
        ids = self.item_ids[rows.clamp(min=0)].masked_fill(rows < 0, -1)
        return scores.to(device), ids.to(device)


def build_index(kind: Literal["exact", "faiss"] = "exact", **kwargs: Any) -> ExactIndex | FaissIndex:
    """Build an item index by name.

    Args:
        kind: ``"exact"`` (:class:`ExactIndex`) or ``"faiss"`` (:class:`FaissIndex`).
        **kwargs: arguments of the chosen class.

    Returns:
        An empty index; fill it with ``add``.

    Raises:
        ValueError: for an unknown ``kind``.
        ImportError: for ``"faiss"`` without faiss installed.

    Example:
        >>> index = build_index("exact", chunk_size=256)
        >>> type(index).__name__
        'ExactIndex'
    """
    if kind == "exact":
        return ExactIndex(**kwargs)
    if kind == "faiss":
        return FaissIndex(**kwargs)
    raise ValueError(f"kind must be 'exact' or 'faiss', got {kind!r}")


# --------------------------------------------------------------------------- Torch-RecHub's engines
class _ReferenceEngine:
    """Torch-RecHub's vector-engine API (``fit(X)``, ``query(v, n)``) computed exactly.

    ``metric`` is a distance (smaller is closer: ``"angular"``, ``"euclidean"``, ``"l2"``) or a
    similarity (larger is closer: ``"dot"``, ``"ip"``). Ties break by the lower item row and no
    package is needed.

    ``"dot"`` and ``"ip"`` are :func:`topk_search` over float32 vectors. Euclidean search ranks
    by ``2 q.x - |x|^2``, which cancels catastrophically in float32 for vectors far from the
    origin compared with their spacing, so it is computed in float64 relative to the corpus mean
    (distances do not change under translation), and the best ``n + 16`` candidates are
    re-ranked by ``|q - x|`` computed directly in float64, which also gives the returned
    distances. Queries are scored ``512`` at a time, so memory stays at ``512 x n_items`` scores.

    ``"angular"`` is that Euclidean search over the vectors normalised in float64, since
    ``|q/|q| - x/|x||`` is exactly Annoy's ``sqrt(2 - 2 cos)``; ranking by a float32 cosine
    instead cannot tell apart directions less than about ``3e-4`` apart. As in Annoy, a zero
    vector has ``cos = 0`` with every vector (distance ``sqrt(2)``): each normalised vector gets
    two more coordinates, 1 in the first for a zero item and in the second for a zero query.
    """

    _METRICS: tuple[str, ...] = ()
    #: queries scored at once by the Euclidean search
    _QUERY_CHUNK = 512
    #: candidates re-ranked beyond the ``n`` asked for, for near-ties at the boundary
    _RERANK_MARGIN = 16
    #: float64 elements of one block of ``q - x`` differences in the re-ranking
    _RERANK_BLOCK = 1 << 22

    def __init__(self, metric: str) -> None:
        metric = str(metric).lower()
        if metric not in self._METRICS:
            raise ValueError(f"metric must be one of {self._METRICS}, got {metric!r}")
        self._metric = metric
        self._items: Tensor | None = None
        #: the points the Euclidean search runs on: the items, or for "angular" their lifted directions
        self._points: Tensor | None = None
        self._center: Tensor | None = None
        self._augmented: Tensor | None = None

    def fit(self, X: Any) -> None:
        """Index the rows of ``X`` ``(n_items, dim)``; a query returns row positions."""
        items = torch.as_tensor(np.asarray(X, dtype=np.float32))
        if items.dim() != 2 or items.shape[0] == 0:
            raise ValueError(f"X must be a non-empty (n_items, dim) array, got shape {tuple(items.shape)}")
        _refuse_nan(items, "X", "items")
        self._items = items
        if self._metric in ("euclidean", "l2", "angular"):
            points = _directions(items, zero_column=0) if self._metric == "angular" else items
            self._points = points
            self._center = points.double().mean(0)
            centered = points.double() - self._center
            # [2q, -1] . [x, |x|^2] = 2 q.x - |x|^2, the ranking score, all relative to the mean
            self._augmented = torch.cat([centered, centered.pow(2).sum(1, keepdim=True)], 1)

    def _search(self, v: Any, n: int) -> tuple[Tensor, Tensor]:
        if self._items is None:
            raise RuntimeError(f"{type(self).__name__}.query called before fit")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        n = int(n)
        q = torch.as_tensor(v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v, dtype=np.float32)).float()
        q = q.reshape(1, -1) if q.dim() == 1 else q
        if q.shape[1] != self._items.shape[1]:
            raise ValueError(f"query vectors have dim {q.shape[1]}, the index {self._items.shape[1]}")
        _refuse_nan(q, "v", "query vectors")
        items, m = self._items, self._metric
        if m == "angular":
            rows, squared = self._nearest_euclidean(_directions(q, zero_column=1), n)
            return rows, squared.sqrt()
        if m in ("euclidean", "l2"):
            rows, squared = self._nearest_euclidean(q, n)
            return rows, (squared.sqrt() if m == "euclidean" else squared)
        return tuple(reversed(topk_search(q, items, n)))  # type: ignore[return-value]

    def _nearest_euclidean(self, q: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Rows of the ``n`` points nearest to each query ``(U, D)`` and their squared distances.

        The points are the items, or for ``"angular"`` their lifted directions (``q`` is then
        lifted too). Order: distance ascending, then row ascending.
        """
        assert self._points is not None and self._center is not None and self._augmented is not None
        items = self._points
        n_cand = min(items.shape[0], n + self._RERANK_MARGIN)
        q64 = q.double()
        q_c = q64 - self._center
        q_aug = torch.cat([2 * q_c, -torch.ones(len(q), 1, dtype=torch.float64)], 1)
        candidates = torch.empty(len(q), n_cand, dtype=torch.long)
        for start in range(0, len(q), self._QUERY_CHUNK):
            chunk = slice(start, start + self._QUERY_CHUNK)
            # 2 q.x - |x|^2 = |q|^2 - |q - x|^2: largest for the nearest items
            scores = q_aug[chunk] @ self._augmented.T
            candidates[chunk] = _stable_topk(scores, n_cand)[1]
            del scores  # free this chunk's scores before the next product is allocated
        squared = torch.empty(candidates.shape, dtype=torch.float64)
        step = max(1, self._RERANK_BLOCK // (n_cand * q.shape[1] or 1))
        for start in range(0, len(q), step):
            chunk = slice(start, start + step)
            squared[chunk] = (items[candidates[chunk]].double() - q64[chunk].unsqueeze(1)).pow(2).sum(-1)
        # (distance, row) order: sort by row, then stably by distance
        order = candidates.sort(dim=1).indices
        candidates, squared = candidates.gather(1, order), squared.gather(1, order)
        order = squared.sort(dim=1, stable=True).indices[:, :n]
        return candidates.gather(1, order), squared.gather(1, order)


def _refuse_nan(x: Tensor, name: str, what: str) -> None:
    """Raise a ``ValueError`` naming the first row of ``x`` ``(n, dim)`` that holds NaN."""
    bad = x.isnan().any(1).nonzero().squeeze(1)
    if bad.numel():
        raise ValueError(f"{name} has NaN in {bad.numel()} of {x.shape[0]} {what}, the first at row {int(bad[0])}")


def _directions(x: Tensor, zero_column: int) -> Tensor:
    """Rows of ``x`` normalised in float64, with two more coordinates for zero rows.

    A zero row becomes the unit vector of the extra coordinate ``zero_column`` (0 for items,
    1 for queries), which is orthogonal to every other normalised row: its distance from any
    row, including a zero row of the other kind, is ``sqrt(2)``, Annoy's distance for ``cos = 0``.
    """
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    zero = norm == 0
    out = torch.zeros(x.shape[0], x.shape[1] + 2, dtype=torch.float64)
    out[:, : x.shape[1]] = torch.where(zero, x, x / torch.where(zero, torch.ones_like(norm), norm))
    out[:, x.shape[1] + zero_column] = zero.squeeze(1).double()
    return out


class Annoy(_ReferenceEngine):
    """Torch-RecHub's ``Annoy`` engine (``torch_rechub.utils.match.Annoy``), exact.

    Same calls and results format as there (``fit(X)``, ``set_query_arguments(search_k)``,
    ``query(v, n) -> (indices, distances)`` as lists), but the neighbours are the exact ones,
    which Annoy's trees approximate, and the ``annoy`` package is not needed. ``n_trees`` and
    ``search_k`` are accepted and have no effect.

    Args:
        metric: ``"angular"`` (``sqrt(2 - 2 cos)``, Annoy's default), ``"euclidean"``
            (``|q - x|``, as Annoy reports it) or ``"dot"``.

    Example:
        >>> engine = Annoy(n_trees=10)
        >>> engine.fit(np.eye(3, dtype=np.float32))
        >>> engine.query(np.array([0.1, 1.0, 0.0]), 2)[0]
        [1, 0]
    """

    _METRICS = ("angular", "euclidean", "dot")

    def __init__(self, metric: str = "angular", n_trees: int = 10, search_k: int = -1) -> None:
        super().__init__(metric)
        self._n_trees, self._search_k = n_trees, search_k

    def set_query_arguments(self, search_k: int) -> None:
        self._search_k = search_k

    def query(self, v: Any, n: int) -> tuple[list[int], list[float]]:
        """The ``n`` nearest rows to the vector ``v`` and their distances (``dot``: products)."""
        rows, dist = self._search(v, n)
        return rows[0].tolist(), dist[0].tolist()

    def __str__(self) -> str:
        return f"Annoy(n_trees={self._n_trees}, search_k={self._search_k})"


class Faiss(_ReferenceEngine):
    """Torch-RecHub's ``Faiss`` engine (``torch_rechub.utils.match.Faiss``), exact.

    Same calls and result format (``query(v, n) -> (indices, distances)`` as 2-D lists, one row
    per query vector); every ``index_type`` computes the exact neighbours a flat index gives,
    without the ``faiss`` package. For a real approximate index see :class:`FaissIndex`.

    Args:
        dim: vector width.
        index_type: ``"flat"``, ``"ivf"`` or ``"hnsw"`` (accepted; the search is exact).
        metric: ``"l2"`` (squared distances, as faiss reports them) or ``"ip"`` (inner products).
    """

    _METRICS = ("l2", "ip")

    def __init__(self, dim: int, index_type: str = "flat", nlist: int = 100, m: int = 32, metric: str = "l2") -> None:
        super().__init__(metric)
        if str(index_type).lower() not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index_type must be 'flat', 'ivf' or 'hnsw', got {index_type!r}")
        self.dim, self.index_type, self.nlist, self.m, self.metric = int(dim), str(index_type).lower(), nlist, m, self._metric

    def fit(self, X: Any) -> None:
        super().fit(X)
        assert self._items is not None
        if self._items.shape[1] != self.dim:
            raise ValueError(f"X has dim {self._items.shape[1]}, the engine was built for dim={self.dim}")

    def set_query_arguments(self, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Accepted for compatibility; the search is exact."""

    def query(self, v: Any, n: int) -> tuple[list[list[int]], list[list[float]]]:
        rows, dist = self._search(v, n)
        return rows.tolist(), dist.tolist()
