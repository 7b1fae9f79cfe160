"""Metrics against sklearn and brute-force references, on one process and on two (gloo)."""

from __future__ import annotations

import math
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from rechub_lightning.metrics import (
    TOPK_METRIC_NAMES,
    BinaryAUC,
    GroupAUC,
    LogLoss,
    RetrievalTopK,
    auc_score,
    gauc_score,
    log_loss,
    topk_metrics,
)


# --------------------------------------------------------------------------- references
def ref_gauc(preds: np.ndarray, target: np.ndarray, groups: np.ndarray, weights: str = "count") -> float:
    num, den = 0.0, 0.0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(target[m])) < 2:
            continue
        w = m.sum() if weights == "count" else 1.0
        num += w * roc_auc_score(target[m], preds[m])
        den += w
    return num / den if den else math.nan


def ref_topk(topk: list[list[int]], relevant: list[list[int]], ks: tuple[int, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    users = [u for u in range(len(topk)) if len(set(relevant[u])) > 0]
    for k in ks:
        acc = {name: 0.0 for name in TOPK_METRIC_NAMES}
        for u in users:
            rel = set(relevant[u])
            ranked = topk[u][:k]
            seen: set[int] = set()
            hits, dcg, rr = 0, 0.0, 0.0
            for j, item in enumerate(ranked):
                if item in rel and item not in seen:
                    hits += 1
                    dcg += 1.0 / math.log2(j + 2)
                    if rr == 0.0:
                        rr = 1.0 / (j + 1)
                seen.add(item)
            idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(rel), k)))
            acc["recall"] += hits / len(rel)
            acc["hitrate"] += float(hits > 0)
            acc["precision"] += hits / k
            acc["ndcg"] += dcg / idcg
            acc["mrr"] += rr
        for name, v in acc.items():
            out[f"{name}@{k}"] = v / len(users) if users else math.nan
    return out


def assert_dicts_close(got: dict[str, float], want: dict[str, float], tol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=tol), key


def random_ctr(n: int, n_groups: int = 12, seed: int = 0, ties: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if ties:
        preds = torch.randint(0, 6, (n,), generator=g).double() / 5
    else:
        preds = torch.rand(n, generator=g, dtype=torch.float64)
    target = (torch.rand(n, generator=g, dtype=torch.float64) < 0.3 + 0.4 * preds).long()
    groups = torch.randint(0, n_groups, (n,), generator=g) * 7 - 20  # arbitrary, negative ids too
    return preds, target, groups


# --------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 17, 1000])
def test_auc_matches_sklearn(n: int, ties: bool) -> None:
    preds, target, _ = random_ctr(n, seed=n, ties=ties)
    target[0], target[1] = 0, 1
    want = roc_auc_score(target.numpy(), preds.numpy())
    assert float(auc_score(preds, target)) == pytest.approx(want, abs=1e-6)


def test_auc_order_only_and_shapes() -> None:
    preds, target, _ = random_ctr(200, seed=3)
    want = roc_auc_score(target.numpy(), preds.numpy())
    # logits give the same AUC as probabilities; 2-d input and bool/float labels are fine
    assert float(auc_score(torch.logit(preds.clamp(1e-6, 1 - 1e-6)), target)) == pytest.approx(want, abs=1e-6)
    assert float(auc_score(preds.view(20, 10), target.bool().view(20, 10))) == pytest.approx(want, abs=1e-6)
    assert float(auc_score(preds, target.float())) == pytest.approx(want, abs=1e-6)


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(float(auc_score(torch.rand(5), torch.ones(5))))
    assert math.isnan(float(auc_score(torch.rand(5), torch.zeros(5))))
    assert math.isnan(float(auc_score(torch.rand(0), torch.zeros(0))))


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="binary"):
        auc_score(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same number"):
        auc_score(torch.rand(3), torch.tensor([0, 1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1)), min_size=1, max_size=30))
def test_auc_property(rows: list[tuple[int, int]]) -> None:
    preds = torch.tensor([float(p) for p, _ in rows], dtype=torch.float64)
    target = torch.tensor([t for _, t in rows])
    got = float(auc_score(preds, target))
    if len(set(target.tolist())) < 2:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(roc_auc_score(target.numpy(), preds.numpy()), abs=1e-6)
        # flipping the scores mirrors the AUC
        assert float(auc_score(-preds, target)) == pytest.approx(1 - got, abs=1e-6)


def test_binary_auc_accumulates_batches() -> None:
    preds, target, _ = random_ctr(500, seed=1, ties=True)
    metric = BinaryAUC()
    for p, t in zip(preds.split(77), target.split(77)):
        metric.update(p, t)
    want = roc_auc_score(target.numpy(), preds.numpy())
    assert float(metric.compute()) == pytest.approx(want, abs=1e-6)
    metric.reset()
    metric.update(preds[:10], target[:10])
    assert float(metric.compute()) == pytest.approx(roc_auc_score(target[:10], preds[:10]), abs=1e-6)


def test_binary_auc_single_class_warns_nan() -> None:
    metric = BinaryAUC(name="val/auc")
    metric.update(torch.rand(8), torch.ones(8))
    with pytest.warns(UserWarning, match="val/auc"):
        assert math.isnan(float(metric.compute()))


def test_binary_auc_binned() -> None:
    preds, target, _ = random_ctr(3000, seed=2)
    preds = preds.float()
    exact = roc_auc_score(target.numpy(), preds.numpy())
    metric = BinaryAUC(thresholds=100)
    for p, t in zip(preds.split(1000), target.split(1000)):
        metric.update(p, t)
    got = float(metric.compute())
    # exactly the AUC of the binned scores, and close to the exact AUC
    binned = np.minimum((preds.double().numpy() * 100).astype(int), 99)
    assert got == pytest.approx(roc_auc_score(target.numpy(), binned), abs=1e-6)
    assert abs(got - exact) < 5e-3
    with pytest.raises(ValueError, match="probabilities"):
        metric.update(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="thresholds"):
        BinaryAUC(thresholds=1)


# --------------------------------------------------------------------------- log loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_loss_matches_sklearn(dtype: torch.dtype) -> None:
    preds, target, _ = random_ctr(1000, seed=4)
    preds = preds.to(dtype)
    preds[:3] = torch.tensor([0.0, 1.0, 1.0], dtype=dtype)  # clipped like sklearn
    target[:3] = torch.tensor([1, 0, 1])
    want = sk_log_loss(target.numpy(), preds.numpy())
    assert float(log_loss(preds, target)) == pytest.approx(want, rel=1e-6)
    metric = LogLoss()
    for p, t in zip(preds.split(300), target.split(300)):
        metric.update(p, t)
    assert float(metric.compute()) == pytest.approx(want, rel=1e-6)


def test_log_loss_from_logits() -> None:
    logits = torch.randn(777, dtype=torch.float64) * 4
    target = (torch.rand(777) < torch.sigmoid(logits)).long()
    want = sk_log_loss(target.numpy(), torch.sigmoid(logits).numpy())
    assert float(log_loss(logits, target, from_logits=True)) == pytest.approx(want, rel=1e-6)
    metric = LogLoss(from_logits=True)
    for lg, t in zip(logits.split(100), target.split(100)):
        metric.update(lg, t)
    assert float(metric.compute()) == pytest.approx(want, rel=1e-6)
    # extreme logits stay finite (no log(0))
    assert math.isfinite(float(log_loss(torch.tensor([-200.0, 200.0]), torch.tensor([1, 0]), from_logits=True)))


def test_log_loss_rejects_logits_as_probabilities() -> None:
    with pytest.raises(ValueError, match="from_logits"):
        log_loss(torch.tensor([-1.0, 2.0]), torch.tensor([0, 1]))
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(LogLoss().compute()))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.999), st.integers(0, 1)), min_size=2, max_size=25))
def test_log_loss_property(rows: list[tuple[float, int]]) -> None:
    preds = torch.tensor([p for p, _ in rows], dtype=torch.float64)
    target = torch.tensor([t for _, t in rows])
    want = sk_log_loss(target.numpy(), preds.numpy(), labels=[0, 1])
    assert float(log_loss(preds, target)) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- GAUC
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weights", ["count", "uniform"])
def test_gauc_matches_per_user_loop(ties: bool, weights: str) -> None:
    preds, target, groups = random_ctr(400, n_groups=40, seed=5, ties=ties)
    # make some users single-class: they must be skipped, not turn the result into NaN
    target[groups == groups[0]] = 1
    target[groups == groups[1]] = 0
    want = ref_gauc(preds.numpy(), target.numpy(), groups.numpy(), weights)
    assert not math.isnan(want)
    assert float(gauc_score(preds, target, groups, weights=weights)) == pytest.approx(want, abs=1e-6)


def test_gauc_weight_mapping_and_errors() -> None:
    preds, target, groups = random_ctr(200, n_groups=6, seed=6)
    uniq = groups.unique().tolist()
    weights = {g: float(i + 1) for i, g in enumerate(uniq)}
    num = den = 0.0
    for g in uniq:
        m = (groups == g).numpy()
        if len(np.unique(target.numpy()[m])) == 2:
            num += weights[g] * roc_auc_score(target.numpy()[m], preds.numpy()[m])
            den += weights[g]
    assert float(gauc_score(preds, target, groups, weights=weights)) == pytest.approx(num / den, abs=1e-6)
    with pytest.raises(KeyError):
        gauc_score(preds, target, groups, weights={uniq[0]: 1.0})
    with pytest.raises(ValueError, match="weights"):
        gauc_score(preds, target, groups, weights="bogus")  # type: ignore[arg-type]


def test_gauc_no_valid_group_is_nan() -> None:
    preds = torch.rand(6)
    target = torch.tensor([1, 1, 0, 0, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert math.isnan(float(gauc_score(preds, target, groups)))
    metric = GroupAUC(name="val/gauc")
    metric.update(preds, target, groups)
    with pytest.warns(UserWarning, match="val/gauc"):
        assert math.isnan(float(metric.compute()))


def test_gauc_one_group_equals_auc() -> None:
    preds, target, _ = random_ctr(300, seed=7, ties=True)
    groups = torch.full_like(target, 5)
    assert float(gauc_score(preds, target, groups)) == pytest.approx(float(auc_score(preds, target)), abs=1e-7)


def test_group_auc_accumulates_batches() -> None:
    # a user's rows are spread over batches
    preds, target, groups = random_ctr(600, n_groups=30, seed=8, ties=True)
    metric = GroupAUC()
    for p, t, g in zip(preds.split(110), target.split(110), groups.split(110)):
        metric.update(p, t, g)
    want = ref_gauc(preds.numpy(), target.numpy(), groups.numpy())
    assert float(metric.compute()) == pytest.approx(want, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=30))
def test_gauc_property(rows: list[tuple[int, int, int]]) -> None:
    preds = np.array([p for p, _, _ in rows], dtype=float)
    target = np.array([t for _, t, _ in rows])
    groups = np.array([g for _, _, g in rows])
    want = ref_gauc(preds, target, groups)
    got = float(gauc_score(torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(groups)))
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- top-K
def random_topk(n_users: int, n_items: int, width: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    rng = np.random.default_rng(seed)
    topk = np.stack([rng.permutation(n_items)[:width] for _ in range(n_users)])
    relevant = [list(rng.choice(n_items, size=rng.integers(0, 6), replace=False)) for _ in range(n_users)]
    return torch.from_numpy(topk), relevant


@pytest.mark.parametrize("ks", [(1, 5, 10), (3,), (20, 50)])
def test_topk_matches_bruteforce(ks: tuple[int, ...]) -> None:
    topk, relevant = random_topk(60, 30, 20, seed=sum(ks))
    assert any(len(r) == 0 for r in relevant)  # users without held-out items are excluded
    want = ref_topk(topk.tolist(), relevant, ks)
    assert_dicts_close(topk_metrics(topk, relevant, ks), want)
    # padded-tensor form of relevant gives the same
    width = max(len(r) for r in relevant)
    padded = torch.tensor([r + [-1] * (width - len(r)) for r in relevant])
    assert_dicts_close(topk_metrics(topk, padded, ks), want)


def test_topk_handcrafted_values() -> None:
    topk = torch.tensor([[5, 1, 7, 2], [3, 4, 0, 8]])
    relevant = [[1, 2, 9], [6]]
    out = topk_metrics(topk, relevant, ks=(2, 4))
    # user 0: hits at ranks 2 and 4; user 1: no hit
    assert out["recall@2"] == pytest.approx((1 / 3) / 2)
    assert out["recall@4"] == pytest.approx((2 / 3) / 2)
    assert out["hitrate@2"] == pytest.approx(0.5)
    assert out["precision@4"] == pytest.approx((2 / 4) / 2)
    assert out["mrr@4"] == pytest.approx(0.5 / 2)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg / 2)
    assert all(isinstance(v, float) for v in out.values())


def test_topk_k_larger_than_corpus_and_padding() -> None:
    # 3 items only: the ranked lists have 3 columns, ks go to 10; -1 marks a missing place
    topk = torch.tensor([[2, 0, 1], [1, -1, -1]])
    relevant = torch.tensor([[0, -1], [0, 1]])
    out = topk_metrics(topk, relevant, ks=(10,))
    want = ref_topk([[2, 0, 1], [1]], [[0], [0, 1]], (10,))
    assert_dicts_close(out, want)
    assert out["precision@10"] == pytest.approx((1 / 10 + 1 / 10) / 2)
    assert out["recall@10"] == pytest.approx((1 + 0.5) / 2)


def test_topk_ties_duplicates_and_empty() -> None:
    # duplicates in relevant count once; a repeated recommendation counts at its first place only
    topk = torch.tensor([[4, 4, 3], [1, 2, 3]])
    out = topk_metrics(topk, [[4, 4], []], ks=(3,))
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["precision@3"] == pytest.approx(1 / 3)
    assert out["ndcg@3"] == pytest.approx(1.0)
    nothing = topk_metrics(topk, [[], []], ks=(3,))
    assert all(math.isnan(v) for v in nothing.values())
    with pytest.raises(ValueError, match="users"):
        topk_metrics(topk, [[1]], ks=(3,))
    with pytest.raises(ValueError, match="ks"):
        topk_metrics(topk, [[1], [2]], ks=(0,))


def test_topk_hitrate_is_not_reference_hit() -> None:
    # the reference's "Hit" = hits / relevant items = 2 / 4 here; hit rate is 1 (one user, hit)
    out = topk_metrics(torch.tensor([[0, 1, 2]]), [[0, 1, 8, 9]], ks=(3,))
    assert out["hitrate@3"] == 1.0
    assert out["recall@3"] == 0.5


def test_topk_refuses_fractional_float_ids() -> None:
    # 3.7 used to become item 3 and count as a hit; whole floats (3.0) still work
    topk, relevant = torch.tensor([[3, 1, 2]]), [[3]]
    want = topk_metrics(topk, relevant, ks=(1, 3))
    assert want["recall@1"] == 1.0
    assert topk_metrics(topk.double(), relevant, ks=(1, 3)) == want
    assert topk_metrics([[3.0, 1.0, 2.0]], torch.tensor([[3.0, -1.0]]), ks=(1, 3)) == want
    for bad_topk, bad_relevant, name, value in [
        (torch.tensor([[3.7, 1.0, 2.0]], dtype=torch.float64), relevant, "topk_items", "3.7"),
        ([[3.7, 1, 2]], relevant, "topk_items", "3.7"),
        (topk, torch.tensor([[3.5]]), "relevant", "3.5"),
        (topk, [[np.float32(2.5), 3]], "relevant", "2.5"),
        (topk, torch.tensor([[float("nan")]]), "relevant", "nan"),
        ([[float("inf")]], relevant, "topk_items", "inf"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must hold integer item ids, got the float {value}"):
            topk_metrics(bad_topk, bad_relevant, ks=(1, 3))
    metric = RetrievalTopK(ks=(1,))
    with pytest.raises(ValueError, match="topk_items .* 3.7"):
        metric.update(torch.tensor([[3.7]], dtype=torch.float64), torch.tensor([[3]]))


def test_retrieval_topk_accumulates_batches() -> None:
    topk, relevant = random_topk(50, 40, 12, seed=9)
    ks = (5, 10, 20)
    metric = RetrievalTopK(ks=ks)
    for start in range(0, 50, 13):
        metric.update(topk[start : start + 13], relevant[start : start + 13])
    assert_dicts_close(metric.compute(), topk_metrics(topk, relevant, ks), tol=1e-12)
    assert_dicts_close(metric.compute(), ref_topk(topk.tolist(), relevant, ks))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.permutations(list(range(8))), st.lists(st.integers(0, 9), max_size=4)),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 9),
    st.integers(1, 12),
)
def test_topk_property(rows: list[tuple[list[int], list[int]]], width: int, k: int) -> None:
    topk = [list(r[:width]) for r, _ in rows]
    relevant = [rel for _, rel in rows]
    assert_dicts_close(topk_metrics(torch.tensor(topk), relevant, ks=(k,)), ref_topk(topk, relevant, (k,)))


# --------------------------------------------------------------------------- DDP (2 processes, gloo)
def _ddp_data() -> dict[str, object]:
    preds, target, groups = random_ctr(101, n_groups=9, seed=11, ties=True)
    topk, relevant = random_topk(23, 30, 10, seed=12)
    return {"preds": preds, "target": target, "groups": groups, "topk": topk, "relevant": relevant}


def _all_metrics() -> dict[str, torch.nn.Module]:
    return {
        "auc": BinaryAUC(),
        "auc_binned": BinaryAUC(thresholds=50),
        "logloss": LogLoss(),
        "gauc": GroupAUC(),
        "topk": RetrievalTopK(ks=(3, 5, 20)),
    }


def _update_shard(metrics: dict[str, torch.nn.Module], d: dict[str, object], rows: slice, users: slice) -> None:
    preds, target, groups = d["preds"][rows], d["target"][rows], d["groups"][rows]  # type: ignore[index]
    half = len(preds) // 2 + 1  # two uneven batches
    for sl in (slice(0, half), slice(half, None)):
        metrics["auc"].update(preds[sl], target[sl])
        metrics["auc_binned"].update(preds[sl], target[sl])
        metrics["logloss"].update(preds[sl].clamp(0.01, 0.99), target[sl])
        metrics["gauc"].update(preds[sl], target[sl], groups[sl])
    metrics["topk"].update(d["topk"][users], d["relevant"][users])  # type: ignore[index]


def _values(metrics: dict[str, torch.nn.Module]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v for k, v in value.items()})
        else:
            out[name] = float(value)
    return out


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        d = _ddp_data()
        # uneven split: rank 0 gets 37 rows / 9 users, rank 1 the other 64 rows / 14 users
        rows, users = (slice(0, 37), slice(0, 9)) if rank == 0 else (slice(37, None), slice(9, None))
        metrics = _all_metrics()
        _update_shard(metrics, d, rows, users)
        uneven = _values(metrics)
        # rank 1 sees no data at all (a tiny validation set on two devices)
        metrics = _all_metrics()
        if rank == 0:
            _update_shard(metrics, d, slice(None), slice(None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "compute called before update" on rank 1
            empty_rank = _values(metrics)
        torch.save({"uneven": uneven, "empty_rank": empty_rank}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_metrics_ddp_equal_single_process(tmp_path: Path) -> None:
    single = _all_metrics()
    _update_shard(single, _ddp_data(), slice(None), slice(None))
    want = _values(single)
    d = _ddp_data()
    assert want["gauc"] == pytest.approx(
        ref_gauc(d["preds"].numpy(), d["target"].numpy(), d["groups"].numpy()), abs=1e-6  # type: ignore[union-attr]
    )

    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for case in ("uneven", "empty_rank"):
            assert got[case].keys() == want.keys()
            for key, value in want.items():
                assert got[case][key] == pytest.approx(value, abs=1e-6), (rank, case, key)


# ----------------------------------------------------------------------------- beyond accuracy
def _brute_diversity(lists, emb, k):
    """Intra-list diversity from its definition: mean of 1 - cos over the pairs of each top-k."""
    per_user = []
    for items in lists:
        items = [i for i in items[:k] if i >= 0]
        if len(items) < 2:
            continue
        d = [1 - float(np.dot(emb[a], emb[b]) / max(np.linalg.norm(emb[a]), 1e-10) / max(np.linalg.norm(emb[b]), 1e-10))
             for x, a in enumerate(items) for b in items[x + 1:]]
        per_user.append(np.mean(d))
    return float(np.mean(per_user))


def test_diversity_coverage_novelty_match_their_definitions():
    from rechub_lightning.metrics import coverage_score, diversity_score, novelty_score

    rng = np.random.default_rng(3)
    n_items, k_max = 40, 8
    emb = rng.normal(size=(n_items, 6))
    emb[5] = 0.0  # a zero vector: distance 1 to everything, as in the reference
    lists = [rng.choice(n_items, size=k_max, replace=False).tolist() for _ in range(30)]
    lists[0][3] = 5
    lists[1] = [7]  # one item: no pair, left out of the average
    padded = torch.full((len(lists), k_max), -1)
    for u, items in enumerate(lists):
        padded[u, : len(items)] = torch.tensor(items)
    pop = rng.dirichlet(np.ones(n_items))
    pop[9] = 0.0  # never interacted with: clamped to 1e-10
    for k in (1, 3, 8):
        div = diversity_score(padded, emb, ks=[k], chunk_size=7)[f"diversity@{k}"]
        if k == 1:
            assert np.isnan(div)
        else:
            assert div == pytest.approx(_brute_diversity(lists, emb, k), rel=1e-9)
        cov = coverage_score(lists, n_items, ks=k)[f"coverage@{k}"]
        assert cov == len({i for items in lists for i in items[:k]}) / n_items
        nov = novelty_score(padded, pop, [k])[f"novelty@{k}"]
        expected = np.mean([np.mean([-np.log2(max(pop[i], 1e-10)) for i in items[:k]]) for items in lists])
        assert nov == pytest.approx(expected, rel=1e-9)


def test_beyond_accuracy_metrics_equal_torch_rechub_on_its_dict_form():
    from rechub_lightning.metrics import coverage_score, diversity_score, novelty_score

    rng = np.random.default_rng(4)
    items = [f"i{j}" for j in range(25)]
    y_pred = {f"u{u}": list(rng.choice(items, size=6, replace=False)) for u in range(12)}
    emb = {i: rng.normal(size=4) for i in items}
    counts = rng.integers(1, 50, len(items))
    popularity = {i: c / counts.sum() for i, c in zip(items, counts)}
    ours = {**diversity_score(y_pred, emb, topKs=[3, 6]), **coverage_score(y_pred, items, topKs=[3, 6]),
            **novelty_score(y_pred, popularity, topKs=[3, 6])}
    assert set(ours) == {f"{m}@{k}" for m in ("diversity", "coverage", "novelty") for k in (3, 6)}
    ref = pytest.importorskip("torch_rechub.basic.metric")
    expected = {**ref.diversity_score(y_pred, emb, [3, 6]), **ref.coverage_score(y_pred, items, [3, 6]),
                **ref.novelty_score(y_pred, popularity, [3, 6])}
    for name, values in expected.items():
        for text in values:  # "Diversity@3: 0.9871"
            key, value = text.split(": ")
            assert ours[key.lower()] == pytest.approx(float(value), abs=5e-5), key


def test_beyond_accuracy_metrics_reject_items_they_cannot_score():
    from rechub_lightning.metrics import coverage_score, diversity_score, novelty_score

    emb = np.eye(4)
    with pytest.raises(ValueError, match="recommended item 4 has no row in item_embeddings"):
        diversity_score([[0, 4]], emb, ks=2)
    with pytest.raises(ValueError, match="'z' has no entry in all_items"):
        coverage_score({"u": ["a", "z"]}, ["a", "b"])
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\].*37.0 for item 2"):
        novelty_score([[0, 2]], np.array([0.1, 0.2, 37.0]), ks=2)
    # an item missing from a popularity dict was never interacted with: maximal self-information
    assert novelty_score({"u": ["a", "new"]}, {"a": 0.5}, topKs=[2])["novelty@2"] == pytest.approx((1 + np.log2(1e10)) / 2)


def test_diversity_is_nan_without_a_pair_of_items():
    # documented nan where Torch-RecHub 0.9.0 returns 0.0; empty lists used to crash in embedding_bag
    from rechub_lightning.metrics import diversity_score

    emb = np.eye(3)
    for y_pred in ({"u0": []}, {"u0": [], "u1": [2]}, [[]], torch.zeros(2, 0, dtype=torch.long), {}):
        assert math.isnan(diversity_score(y_pred, emb, topKs=[5])["diversity@5"])
    # k = 1 leaves single items; the other cut-off still counts the one user with a pair
    out = diversity_score({"u0": [], "u1": [0, 1], "u2": [2]}, emb, topKs=[1, 5])
    assert math.isnan(out["diversity@1"]) and out["diversity@5"] == pytest.approx(1.0)


def test_single_topk_metric_helpers_are_slices_of_topk_metrics():
    from rechub_lightning.metrics import hit_score, mrr_score, ndcg_score, precision_score, recall_score

    y_true = {1: [1, 2], 2: [3], 3: [9]}
    y_pred = {1: [1, 5, 6], 2: [7, 8, 3], 3: [4, 5, 6]}
    full = topk_metrics(y_true, y_pred, [1, 3])
    for fn, name in ((recall_score, "recall"), (precision_score, "precision"), (ndcg_score, "ndcg"),
                     (mrr_score, "mrr"), (hit_score, "hitrate")):
        assert fn(y_true, y_pred, [1, 3]) == {f"{name}@1": full[f"{name}@1"], f"{name}@3": full[f"{name}@3"]}
    assert hit_score(y_true, y_pred, [3])["hitrate@3"] == pytest.approx(2 / 3)  # users with a hit
