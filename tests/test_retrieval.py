"""Exact top-K search against full-matrix references; the faiss index against the exact one."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rechub_lightning.retrieval import ExactIndex, FaissIndex, build_index, topk_search


def ref_topk(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row by (score descending, column ascending), with numpy."""
    s = scores.numpy()
    cols = np.arange(s.shape[1])
    rows = [np.lexsort((cols, -row))[:k] for row in s]
    idx = np.stack(rows)
    return np.take_along_axis(s, idx, 1), idx


def tied_embeddings(n_users: int, n_items: int, dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings: exact float scores with many ties."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-2, 3, (n_users, dim), generator=g).float(),
        torch.randint(-2, 3, (n_items, dim), generator=g).float(),
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_topk_search_matches_full_topk(chunk_size: int) -> None:
    users, items = torch.randn(50, 16), torch.randn(300, 16)
    scores, ids = topk_search(users, items, k=20, chunk_size=chunk_size)
    full_vals, full_idx = torch.topk(users @ items.T, 20, dim=1)
    assert ids.dtype == torch.long
    assert torch.equal(ids, full_idx)
    torch.testing.assert_close(scores, full_vals)


@pytest.mark.parametrize("chunk_size", [1, 5, 33, 1000])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_topk_search_ties_lower_index_first(chunk_size: int, k: int) -> None:
    users, items = tied_embeddings(33, 40)
    want_scores, want_idx = ref_topk(users @ items.T, k)
    scores, ids = topk_search(users, items, k=k, chunk_size=chunk_size)
    assert np.array_equal(ids.numpy(), want_idx)
    assert np.array_equal(scores.numpy(), want_scores)


def test_topk_search_many_tied_rows_in_one_chunk() -> None:
    # more ambiguous rows than the re-selection block (64): every row of the chunk is re-selected
    users, items = tied_embeddings(200, 300, dim=2, seed=3)
    users[::3] = 0.0  # every score of these users ties at 0
    want_scores, want_idx = ref_topk(users @ items.T, 7)
    scores, ids = topk_search(users, items, k=7, chunk_size=200)
    assert np.array_equal(ids.numpy(), want_idx)
    assert np.array_equal(scores.numpy(), want_scores)
    assert np.array_equal(ids[::3].numpy(), np.tile(np.arange(7), (len(ids[::3]), 1)))


def test_topk_search_k_larger_than_corpus() -> None:
    users, items = tied_embeddings(6, 5, seed=1)
    scores, ids = topk_search(users, items, k=50, chunk_size=4)
    assert ids.shape == (6, 5) and scores.shape == (6, 5)
    want_scores, want_idx = ref_topk(users @ items.T, 5)
    assert np.array_equal(ids.numpy(), want_idx)
    assert all(sorted(row) == list(range(5)) for row in ids.tolist())


@pytest.mark.parametrize("form", ["lists", "csr"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_topk_search_excludes(form: str, chunk_size: int) -> None:
    users, items = tied_embeddings(10, 25, seed=2)
    rng = np.random.default_rng(0)
    excluded = [sorted(rng.choice(25, size=int(rng.integers(0, 8)), replace=False).tolist()) for _ in range(10)]
    excluded[3] = []
    if form == "lists":
        exclude: object = excluded
    else:
        indptr = torch.tensor([0] + np.cumsum([len(e) for e in excluded]).tolist())
        exclude = (indptr, torch.tensor([i for e in excluded for i in e], dtype=torch.long))
    full = users @ items.T
    for u, e in enumerate(excluded):
        full[u, e] = float("-inf")
    want_scores, want_idx = ref_topk(full, 10)
    scores, ids = topk_search(users, items, k=10, chunk_size=chunk_size, exclude=exclude)  # type: ignore[arg-type]
    assert np.array_equal(ids.numpy(), want_idx)
    assert np.array_equal(scores.numpy(), want_scores)
    for u, e in enumerate(excluded):
        assert not set(e) & set(ids[u].tolist())


def test_topk_search_exclusion_leaves_fewer_than_k() -> None:
    users, items = torch.randn(2, 4), torch.randn(5, 4)
    scores, ids = topk_search(users, items, k=4, exclude=[[0, 1, 2], []], item_ids=torch.arange(100, 105))
    assert sorted(ids[0, :2].tolist()) == [103, 104]
    assert ids[0, 2:].tolist() == [-1, -1]
    assert torch.isinf(scores[0, 2:]).all() and (scores[0, 2:] < 0).all()
    assert (ids[1] >= 100).all()


def ref_topk_excluding(scores: np.ndarray, excluded: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k not-excluded columns per row by (score descending, column ascending), padded with -1."""
    out_scores = np.full((len(scores), k), -np.inf)
    out_rows = np.full((len(scores), k), -1)
    for u, row in enumerate(scores):
        cols = [c for c in np.lexsort((np.arange(len(row)), -row)) if c not in set(excluded[u])][:k]
        out_rows[u, : len(cols)], out_scores[u, : len(cols)] = cols, row[cols]
    return out_scores, out_rows


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("interests", [0, 2])
def test_topk_search_exclusion_keeps_items_scored_minus_inf(chunk_size: int, interests: int) -> None:
    # items with -inf in the first coordinate score -inf for every user: they are real items and
    # come back with their ids when not excluded, after the finite ones; -1 means "no item left"
    users, items = tied_embeddings(12, 10, seed=4)
    items[[1, 4, 5, 8], 0] = float("-inf")
    users[:, 0] = torch.rand(12, generator=torch.Generator().manual_seed(0)) + 0.5  # > 0: no inf * 0
    rng = np.random.default_rng(1)
    excluded = [sorted(rng.choice(10, size=int(rng.integers(0, 9)), replace=False).tolist()) for _ in range(12)]
    excluded[0], excluded[1] = [0, 2, 3, 6, 7, 9], [0, 1, 2, 3, 4, 6, 7, 9]  # only -inf items, only item 5 and 8
    if interests:
        users = torch.stack([users, users + torch.tensor([0.0, 1.0, -1.0])], 1)
    scores = (users @ items.T).amax(1) if interests else users @ items.T
    assert scores.isinf().any() and not scores.isnan().any()
    want_scores, want_rows = ref_topk_excluding(scores.numpy(), excluded, 7)
    got_scores, got_rows = topk_search(users, items, k=7, chunk_size=chunk_size, exclude=excluded)
    assert np.array_equal(got_rows.numpy(), want_rows)
    assert np.array_equal(got_scores.numpy(), want_scores)
    assert got_rows[0].tolist() == [1, 4, 5, 8, -1, -1, -1] and got_rows[1].tolist() == [5, 8, -1, -1, -1, -1, -1]
    item_ids = torch.arange(100, 110)
    _, got_ids = topk_search(users, items, k=7, chunk_size=chunk_size, exclude=excluded, item_ids=item_ids)
    assert torch.equal(got_ids, torch.where(got_rows < 0, -1, got_rows + 100))


def test_select_from_candidates_keeps_items_scored_minus_inf() -> None:
    # FaissIndex's merge of per-interest candidates: empty slots (-1) and repeats last, as -1
    from rechub_lightning.retrieval import _select_from_candidates

    inf = float("inf")
    scores = torch.tensor([[-inf, 1.0, 0.5, 2.0, -inf, 3.0], [-inf, -inf, -inf, -inf, -inf, -inf]])
    rows = torch.tensor([[4, 2, 2, -1, 6, -1], [7, -1, 3, 7, -1, -1]])
    got_scores, got_rows = _select_from_candidates(scores, rows, 5)
    assert got_rows.tolist() == [[2, 4, 6, -1, -1], [3, 7, -1, -1, -1]]
    assert got_scores.tolist() == [[1.0, -inf, -inf, -inf, -inf], [-inf] * 5]


def test_topk_search_refuses_nan_scores() -> None:
    # a NaN score would rank first for every user: refuse it, naming the broken row
    users, items = torch.randn(6, 4), torch.randn(20, 4)
    items[[7, 12], 2] = float("nan")
    with pytest.raises(ValueError, match=r"item_emb has NaN in 2 of 20 items, the first at row 7 \(item id 107\)"):
        topk_search(users, items, k=3, chunk_size=4, item_ids=torch.arange(100, 120))
    with pytest.raises(ValueError, match="item_emb has NaN in 2 of 20 items, the first at row 7:"):
        topk_search(users.unsqueeze(1).expand(6, 3, 4), items, k=20)
    index = ExactIndex()
    index.add(items)
    with pytest.raises(ValueError, match="item_emb has NaN"):
        index.search(users, k=3)
    # a NaN item every user excludes never reaches a list: the search is then sound
    scores, ids = topk_search(users, items, k=3, exclude=[[7, 12]] * 6)
    want = topk_search(users, items[[i for i in range(20) if i not in (7, 12)]], k=3)
    assert torch.equal(scores, want[0])
    users[4, 1] = float("nan")
    with pytest.raises(ValueError, match="user_emb has NaN in 1 of 6 users, the first at row 4"):
        topk_search(users, torch.randn(20, 4), k=3)
    # inf - inf without any NaN in the embeddings
    with pytest.raises(ValueError, match="scores of user row 0 hold NaN"):
        topk_search(torch.ones(1, 2), torch.tensor([[float("inf"), float("-inf")], [1.0, 1.0]]), k=1)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_topk_search_multi_interest_max(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(3)
    users, items = torch.randn(9, 4, 8, generator=g), torch.randn(120, 8, generator=g)
    full = torch.einsum("uid,nd->uin", users, items).amax(1)
    want_vals, want_idx = torch.topk(full, 15, dim=1)
    scores, ids = topk_search(users, items, k=15, chunk_size=chunk_size)
    assert torch.equal(ids, want_idx)
    torch.testing.assert_close(scores, want_vals)


def test_topk_search_item_ids_mapping() -> None:
    users, items = torch.randn(7, 6), torch.randn(40, 6)
    item_ids = torch.randperm(40) * 10 + 3
    _, rows = topk_search(users, items, k=8)
    scores, ids = topk_search(users, items, k=8, item_ids=item_ids)
    assert torch.equal(ids, item_ids[rows])


def test_topk_search_rejects_bad_input() -> None:
    users, items = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must"):
        topk_search(users, items, k=0)
    with pytest.raises(ValueError, match="item_emb"):
        topk_search(users, torch.randn(10, 5), k=2)
    with pytest.raises(ValueError, match="outside"):
        topk_search(users, items, k=2, exclude=[[10], [], []])
    with pytest.raises(ValueError, match="rows"):
        topk_search(users, items, k=2, exclude=[[1]])
    with pytest.raises(ValueError, match="indptr"):
        topk_search(users, items, k=2, exclude=(torch.tensor([0, 1]), torch.tensor([1])))


def test_exact_index_add_and_search() -> None:
    users, items = torch.randn(11, 8), torch.randn(60, 8)
    ids = torch.arange(60) + 1000
    index = build_index("exact", chunk_size=4)
    assert isinstance(index, ExactIndex)
    index.add(items[:25], item_ids=ids[:25])
    index.add(items[25:], item_ids=ids[25:])
    assert len(index) == 60
    want = topk_search(users, items, k=10, item_ids=ids, exclude=[[0, 30]] * 11)
    got = index.search(users, k=10, exclude=[[0, 30]] * 11)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    # default ids are running positions across adds
    plain = ExactIndex()
    plain.add(items[:25])
    plain.add(items[25:])
    assert torch.equal(plain.search(users, k=10)[1], topk_search(users, items, k=10)[1])


def test_build_index_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="kind"):
        build_index("annoy")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="empty"):
        ExactIndex().search(torch.randn(2, 3), k=1)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install rechub-lightning\[ann\]"):
        build_index("faiss")


@pytest.mark.parametrize("nlist", [None, 4])
def test_faiss_index_matches_exact(nlist: int | None) -> None:
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(4)
    users, items = torch.randn(20, 16, generator=g), torch.randn(200, 16, generator=g)
    ids = torch.arange(200) * 3
    # nprobe = nlist: every cell is visited, so IVF is exact too
    index = FaissIndex(nlist=nlist, nprobe=nlist or 1)
    index.add(items[:120], item_ids=ids[:120])
    index.add(items[120:], item_ids=ids[120:])
    assert len(index) == 200
    exclude = [list(range(u, 200, 17)) for u in range(20)]
    for user_emb in (users, torch.randn(20, 3, 16, generator=g)):
        for ex in (None, exclude):
            want_scores, want_ids = topk_search(user_emb, items, k=10, item_ids=ids, exclude=ex)
            got_scores, got_ids = index.search(user_emb, k=10, exclude=ex)
            assert torch.equal(got_ids, want_ids)
            torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-5)
    # k larger than the corpus
    assert index.search(users, k=500)[1].shape == (20, 200)


def brute_force_euclidean(items: np.ndarray, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``n`` nearest items by (float64 distance, row) and their squared distances."""
    sq = ((queries.astype(np.float64)[:, None, :] - items.astype(np.float64)[None]) ** 2).sum(-1)
    rows = np.stack([np.lexsort((np.arange(len(items)), d))[:n] for d in sq])
    return rows, np.take_along_axis(sq, rows, 1)


@pytest.mark.parametrize(("offset", "spread"), [(1000.0, 0.01), (100.0, 0.05), (0.0, 1.0)])
def test_reference_engines_euclidean_exact_far_from_origin(offset: float, spread: float) -> None:
    # 2 q.x - |x|^2 in float32 cancels for |x| ~ 2800 and spacing ~ 0.01: the neighbours must
    # still be those of a float64 brute force, with float64-accurate distances
    from rechub_lightning.retrieval import Annoy, Faiss

    rng = np.random.default_rng(0)
    items = (rng.normal(size=(500, 8)) * spread + offset).astype(np.float32)
    queries = items[:50] + (rng.normal(size=(50, 8)) * spread * 0.1).astype(np.float32)
    want_rows, want_sq = brute_force_euclidean(items, queries, 5)
    annoy = Annoy(metric="euclidean")
    annoy.fit(items)
    for u in range(50):
        rows, dist = annoy.query(queries[u], 5)
        assert rows == want_rows[u].tolist()
        np.testing.assert_allclose(dist, np.sqrt(want_sq[u]), rtol=1e-9, atol=1e-12)
    flat = Faiss(dim=8, metric="l2")
    flat.fit(items)
    rows, dist = flat.query(queries, 5)
    assert rows == want_rows.tolist()
    np.testing.assert_allclose(dist, want_sq, rtol=1e-9, atol=1e-12)


def test_reference_engine_euclidean_indexed_point_comes_first() -> None:
    from rechub_lightning.retrieval import Annoy

    rng = np.random.default_rng(1)
    items = (rng.normal(size=(100, 4)) * 0.01 + 1000).astype(np.float32)
    annoy = Annoy(metric="euclidean")
    annoy.fit(items)
    for row in (0, 7, 99):
        rows, dist = annoy.query(items[row], 3)
        assert rows == brute_force_euclidean(items, items[row : row + 1], 3)[0][0].tolist()
        assert rows[0] == row and dist[0] == 0.0 and dist[1] > 0.0


@pytest.mark.parametrize("offset", [0.0, 10_000.0])
def test_reference_engine_euclidean_ties_lower_row_first(offset: float) -> None:
    # integer points with duplicates: equal distances are exact, the lower row comes first,
    # also after centering on a mean that is not an integer
    from rechub_lightning.retrieval import Faiss

    users, items = tied_embeddings(30, 40, dim=3, seed=5)
    items, users = items.numpy() + offset, users.numpy() + offset
    flat = Faiss(dim=3, metric="l2")
    flat.fit(items)
    want_rows, want_sq = brute_force_euclidean(items, users, 9)
    rows, dist = flat.query(users, 9)
    assert rows == want_rows.tolist()
    assert dist == want_sq.tolist()


def test_reference_engine_euclidean_chunks_and_n(monkeypatch: pytest.MonkeyPatch) -> None:
    from rechub_lightning.retrieval import Annoy, Faiss

    rng = np.random.default_rng(2)
    items = (rng.normal(size=(300, 6)) + 50).astype(np.float32)
    queries = (rng.normal(size=(23, 6)) + 50).astype(np.float32)
    flat = Faiss(dim=6, metric="l2")
    flat.fit(items)
    whole = flat.query(queries, 12)
    # a few queries scored, and a few candidates re-ranked, at a time
    monkeypatch.setattr(flat, "_QUERY_CHUNK", 4)
    monkeypatch.setattr(flat, "_RERANK_BLOCK", 50)
    assert flat.query(queries, 12) == whole
    assert whole[0] == brute_force_euclidean(items, queries, 12)[0].tolist()
    # n beyond the corpus: every row once, nearest first
    rows, dist = flat.query(queries[:2], 1000)
    assert [sorted(r) for r in rows] == [list(range(300))] * 2
    assert all(d == sorted(d) for d in dist)
    annoy = Annoy(metric="euclidean")
    annoy.fit(items)
    assert annoy.query(queries[0], np.int64(3))[0] == whole[0][0][:3]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            annoy.query(queries[0], bad)  # type: ignore[arg-type]


def brute_force_angular(items: np.ndarray, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``n`` nearest items by (float64 |q/|q| - x/|x||, row) and those distances."""
    x = items.astype(np.float64) / np.linalg.norm(items.astype(np.float64), axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    dist = np.sqrt(((q[:, None, :] - x[None]) ** 2).sum(-1))
    rows = np.stack([np.lexsort((np.arange(len(items)), d))[:n] for d in dist])
    return rows, np.take_along_axis(dist, rows, 1)


def test_reference_engine_angular_tells_near_duplicate_directions_apart() -> None:
    # directions 1e-6 .. 1e-4 rad from a base, at norms 0.01 .. 100: a float32 cosine is 1 for
    # all of them (ties, distance 0); the float64 brute force orders them and gives the angles
    from rechub_lightning.retrieval import Annoy

    rng = np.random.default_rng(4)
    base = rng.normal(size=8)
    base /= np.linalg.norm(base)
    angles = 1e-6 * 1.25 ** rng.permutation(21)
    perp = rng.normal(size=(21, 8))
    perp -= (perp @ base)[:, None] * base
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    near = (np.cos(angles)[:, None] * base + np.sin(angles)[:, None] * perp) * 10.0 ** rng.uniform(-2, 2, (21, 1))
    items = np.concatenate([near, rng.normal(size=(100, 8))]).astype(np.float32)
    queries = np.stack([base, -base, near[3] * 3.0, rng.normal(size=8)]).astype(np.float32)
    want_rows, want_dist = brute_force_angular(items, queries, 25)
    annoy = Annoy(metric="angular")
    annoy.fit(items)
    for u in range(len(queries)):
        rows, dist = annoy.query(queries[u], 25)
        assert rows == want_rows[u].tolist()
        np.testing.assert_allclose(dist, want_dist[u], rtol=1e-9, atol=1e-14)
    rows, dist = annoy.query(items[5], 2)
    assert rows[0] == 5 and dist[0] == 0.0 and dist[1] > 1e-7


def test_reference_engine_angular_zero_vectors_and_nan() -> None:
    # as in Annoy, a zero vector has cos = 0 with every vector, itself included: distance sqrt(2)
    from rechub_lightning.retrieval import Annoy, Faiss

    items = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.1], [0.0, 1.0]], dtype=np.float32)
    annoy = Annoy(metric="angular")
    annoy.fit(items)
    rows, dist = annoy.query(np.array([1.0, 0.05]), 4)
    assert rows == [0, 3, 1, 2]
    np.testing.assert_allclose(dist[2], np.sqrt(2.0), rtol=1e-12)
    rows, dist = annoy.query(np.zeros(2), 4)
    assert rows == [0, 1, 2, 3]
    np.testing.assert_allclose(dist, [np.sqrt(2.0)] * 4, rtol=1e-12)
    # NaN vectors are refused, naming the row, rather than ranked first (or last)
    items[2, 1] = np.nan
    for engine in (Annoy(metric="angular"), Annoy(metric="euclidean"), Faiss(dim=2, metric="ip")):
        with pytest.raises(ValueError, match="X has NaN in 1 of 4 items, the first at row 2"):
            engine.fit(items)
        engine.fit(items[[0, 1, 3]])
        with pytest.raises(ValueError, match="v has NaN in 1 of 2 query vectors, the first at row 1"):
            engine._search(np.array([[1.0, 0.0], [np.nan, 0.0]], dtype=np.float32), 2)


@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_reference_engines_other_metrics_unchanged(metric: str) -> None:
    # angular ranks by the cosine (computed exactly), dot by the inner product, as Annoy does
    from rechub_lightning.retrieval import Annoy

    rng = np.random.default_rng(3)
    items = rng.normal(size=(200, 8)).astype(np.float32)
    query = rng.normal(size=8).astype(np.float32)
    engine = Annoy(metric=metric)
    engine.fit(items)
    rows, dist = engine.query(query, 6)
    if metric == "dot":
        want = topk_search(torch.as_tensor(query)[None], torch.as_tensor(items), k=6)
        assert rows == want[1][0].tolist() and dist == want[0][0].tolist()
    else:
        cos = items.astype(np.float64) @ query / np.linalg.norm(items, axis=1) / np.linalg.norm(query)
        assert rows == np.argsort(-cos, kind="stable")[:6].tolist()
        np.testing.assert_allclose(dist, np.sqrt(2 - 2 * cos[rows]), atol=1e-5)
