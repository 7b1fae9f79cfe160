"""Multi-task loss weighting: formulas, convergence, checkpoints and DDP agreement."""

from __future__ import annotations

import math
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rechub_lightning.weighting import (
    DynamicWeightAverage,
    EqualWeighting,
    GradNorm,
    LossWeighting,
    MetaBalance,
    PCGrad,
    UncertaintyWeighting,
    all_reduce_mean,
    build_weighting,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- factory
@pytest.mark.parametrize(
    ("params", "cls", "manual"),
    [
        (None, EqualWeighting, False),
        ({"method": None}, EqualWeighting, False),
        ({"method": "equal"}, EqualWeighting, False),
        ({"method": "uwl"}, UncertaintyWeighting, False),
        ({"method": "DWA", "temperature": 3.0}, DynamicWeightAverage, False),
        ({"method": "gradnorm", "alpha": 0.5}, GradNorm, True),
        ({"method": "metabalance", "relax_factor": 0.3, "target_task": 1}, MetaBalance, True),
        ({"method": "pcgrad", "seed": 3}, PCGrad, True),
    ],
)
def test_build_weighting(params: dict | None, cls: type[LossWeighting], manual: bool) -> None:
    weighting = build_weighting(params, 2)
    assert type(weighting) is cls
    assert weighting.requires_manual is manual
    assert weighting.weights().shape == (2,)


def test_build_weighting_rejects_unknown_method_and_arguments() -> None:
    with pytest.raises(ValueError, match="gradnorm.*metabalance"):
        build_weighting({"method": "nash"}, 2)
    with pytest.raises(ValueError, match="alpha"):
        build_weighting({"method": "uwl", "alpha": 0.1}, 2)
    with pytest.raises(ValueError):
        build_weighting({"method": "metabalance", "target_task": 2}, 2)


def test_automatic_weightings_refuse_step() -> None:
    with pytest.raises(RuntimeError):
        EqualWeighting(2).step(torch.ones(2), [nn.Parameter(torch.ones(1))])


def test_equal_weighting_is_mean() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0])
    assert EqualWeighting(3)(losses).item() == pytest.approx(3.0)
    assert EqualWeighting(3)([losses[0], losses[1], losses[2]]).item() == pytest.approx(3.0)
    torch.testing.assert_close(EqualWeighting(3).weights(), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError):
        EqualWeighting(3)(torch.ones(2))


# --------------------------------------------------------------------------- UWL
def test_uwl_formula_and_unclamped_gradient() -> None:
    uwl = UncertaintyWeighting(2)
    with torch.no_grad():
        uwl.log_vars.copy_(torch.tensor([-1.0, 0.5]))
    losses = torch.tensor([0.2, 3.0])
    expected = math.exp(1.0) * 0.2 - 1.0 + math.exp(-0.5) * 3.0 + 0.5
    total = uwl(losses)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/ds (L e^-s + s) = 1 - L e^-s: non-zero for negative s (the reference clamps it to 0).
    torch.testing.assert_close(uwl.log_vars.grad, torch.tensor([1 - 0.2 * math.exp(1.0), 1 - 3.0 * math.exp(-0.5)]))
    torch.testing.assert_close(uwl.weights(), torch.exp(-torch.tensor([-1.0, 0.5])))


def test_uwl_learns_each_tasks_noise_variance() -> None:
    torch.manual_seed(0)
    n = 2000
    x = torch.randn(n, 4)
    f = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])
    y1 = f + torch.randn(n, 1)  # noise variance 1
    y2 = f + 2.0 * torch.randn(n, 1)  # noise variance 4
    shared = nn.Linear(4, 8)
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
    uwl = UncertaintyWeighting(2)
    opt = torch.optim.Adam([*shared.parameters(), *heads.parameters(), *uwl.parameters()], lr=0.05)
    for _ in range(400):
        h = shared(x)
        losses = torch.stack([((heads[0](h) - y1) ** 2).mean(), ((heads[1](h) - y2) ** 2).mean()])
        opt.zero_grad()
        uwl(losses).backward()
        opt.step()
    with torch.no_grad():
        h = shared(x)
        mse = torch.stack([((heads[0](h) - y1) ** 2).mean(), ((heads[1](h) - y2) ** 2).mean()])
    variances = torch.exp(uwl.log_vars.detach())
    # Optimum of L e^-s + s is e^s = L: the learnt variance is each task's MSE.
    assert torch.allclose(variances, mse, rtol=0.15), (variances, mse)
    assert 3.0 < float(mse[1] / mse[0]) < 5.0


# --------------------------------------------------------------------------- DWA
def test_dwa_weights_follow_formula() -> None:
    dwa = DynamicWeightAverage(3, temperature=2.0)
    losses = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.8, 1.0, 2.9]), torch.tensor([0.4, 0.9, 2.9])]
    torch.testing.assert_close(dwa.weights(), torch.ones(3))
    dwa.on_epoch_end(losses[0])
    torch.testing.assert_close(dwa.weights(), torch.ones(3))  # equal for the first two epochs
    dwa.on_epoch_end(losses[1])
    r = losses[1] / losses[0]
    torch.testing.assert_close(dwa.weights(), 3 * torch.exp(r / 2) / torch.exp(r / 2).sum())
    dwa.on_epoch_end(losses[2].tolist())
    r = losses[2] / losses[1]
    expected = 3 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    torch.testing.assert_close(dwa.weights(), expected)
    task_losses = torch.tensor([0.3, 0.6, 0.9])
    torch.testing.assert_close(dwa(task_losses), (expected * task_losses).sum())
    fresh = DynamicWeightAverage(3)
    fresh.load_state_dict(dwa.state_dict())
    torch.testing.assert_close(fresh.weights(), expected)
    assert int(fresh.epochs_seen) == 3


# --------------------------------------------------------------------------- GradNorm
def test_gradnorm_first_step_matches_hand_computation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def losses() -> torch.Tensor:
        out = net(x)
        return torch.stack([((out[:, 0] - y[:, 0]) ** 2).mean(), 5.0 * ((out[:, 1] - y[:, 1]) ** 2).mean()])

    last = list(net[2].parameters())
    params = list(net.parameters())
    gn = GradNorm(2, alpha=0.5, lr=0.1)
    gn.task_weights.copy_(torch.tensor([1.2, 0.8]))  # start off-balance to make the check non-trivial
    total = gn.step(losses(), params[:2], params[2:], last)

    task_losses = losses()
    assert not total.requires_grad
    expected_grads = torch.autograd.grad(1.2 * task_losses[0] + 0.8 * task_losses[1], params, retain_graph=True)
    for p, g in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, g)
    assert total.item() == pytest.approx((1.2 * task_losses[0] + 0.8 * task_losses[1]).item(), rel=1e-6)
    torch.testing.assert_close(gn.initial_losses, task_losses.detach())

    norms = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(task_losses[i], last, retain_graph=True)]).norm() for i in range(2)]
    )
    weighted = torch.tensor([1.2, 0.8]) * norms
    target = weighted.mean() * torch.ones(2)  # r_i = 1 on the first step
    grad_w = torch.sign(weighted - target) * norms
    # First Adam step moves by lr * g / (|g| + eps), then renormalise to sum 2.
    new = torch.tensor([1.2, 0.8]) - 0.1 * grad_w / (grad_w.abs() + 1e-8)
    torch.testing.assert_close(gn.weights(), new * 2 / new.sum())


def test_gradnorm_balances_gradient_norms_of_differently_scaled_tasks() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    last = list(net[2].parameters())
    gn = GradNorm(2, alpha=0.16, lr=0.005)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(600):
        idx = torch.randint(0, 256, (64,))
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        gn.step([loss, 100.0 * loss], list(net.parameters()), None, last)
        opt.step()
        assert gn.weights().sum().item() == pytest.approx(2.0, abs=1e-5)
    loss = ((net(x) - y) ** 2).mean()
    w = gn.weights()
    norms = [
        w[i] * torch.cat([g.reshape(-1) for g in torch.autograd.grad(scale * loss, last, retain_graph=True)]).norm()
        for i, scale in enumerate((1.0, 100.0))
    ]
    assert float(norms[0] / norms[1]) == pytest.approx(1.0, rel=0.10), (w, norms)
    fresh = GradNorm(2)
    fresh.load_state_dict(gn.state_dict())
    torch.testing.assert_close(fresh.weights(), w)
    assert bool(fresh.initialized) and int(fresh.adam_steps) == 600


def test_gradnorm_needs_last_shared_layer() -> None:
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="last_shared_layer"):
        GradNorm(2).step([p.sum(), p.sum()], [p])


# --------------------------------------------------------------------------- MetaBalance
class _TwoTask(nn.Module):
    """Shared ``a`` (both tasks), ``b`` (task 0 only), ``c`` (both tasks); one head each."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Parameter(torch.randn(4))
        self.c = nn.Linear(4, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    def shared(self) -> list[nn.Parameter]:
        return [*self.a.parameters(), self.b, *self.c.parameters()]

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.c(torch.tanh(self.a(x))))
        l0 = ((self.heads[0](h * self.b).squeeze(1) - y[:, 0]) ** 2).mean()
        l1 = 30.0 * ((self.heads[1](h).squeeze(1) - y[:, 1]) ** 2).mean()
        return [l0, l1]  # a list: autograd reports None for (task 1, b); a stacked tensor gives zeros


def _expected_metabalance(model: _TwoTask, batches, relax: float, beta: float, target: int):
    """Hand-written Algorithm 1 of He et al. (WWW 2022), with explicit per-task autograd."""
    shared = model.shared()
    heads = list(model.heads.parameters())
    ema = [[0.0, 0.0] for _ in shared]
    results = []
    for x, y in batches:
        losses = model.losses(x, y)
        per_task = [torch.autograd.grad(losses[i], shared, retain_graph=True, allow_unused=True) for i in range(2)]
        expected = []
        for k in range(len(shared)):
            for i in range(2):
                if per_task[i][k] is not None:
                    ema[k][i] = beta * ema[k][i] + (1 - beta) * per_task[i][k].norm().item()
            total = torch.zeros_like(shared[k])
            for i in range(2):
                g = per_task[i][k]
                if g is None:
                    continue
                if i != target and per_task[target][k] is not None and ema[k][i] > 0 and ema[k][target] > 0:
                    g = g * (ema[k][target] / ema[k][i]) * relax + g * (1 - relax)
                total = total + g
            expected.append(total)
        head_grads = torch.autograd.grad(sum(losses), heads)
        results.append((expected, head_grads))
    return results


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("target", [0, 1])
def test_metabalance_matches_paper_formula(target: int, stacked: bool) -> None:
    torch.manual_seed(0)
    model = _TwoTask()
    batches = [(torch.randn(12, 3), torch.randn(12, 2)) for _ in range(2)]
    expected = _expected_metabalance(model, batches, relax=0.7, beta=0.9, target=target)
    mb = MetaBalance(2, relax_factor=0.7, beta=0.9, target_task=target)
    shared, heads = model.shared(), list(model.heads.parameters())
    for (x, y), (exp_shared, exp_heads) in zip(batches, expected):
        losses = model.losses(x, y)
        total = mb.step(torch.stack(losses) if stacked else losses, shared, heads)
        for p, g in zip(shared, exp_shared):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-6)
        for p, g in zip(heads, exp_heads):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-6)
        assert total.item() == pytest.approx(sum(model.losses(x, y)).item(), rel=1e-6)
    # "continue", not "break": parameters after `b` (which task 1 does not reach) are still balanced.
    assert mb.norm_ema.shape == (len(shared), 2)
    assert mb.norm_ema[2, 1].item() == 0.0 and mb.norm_ema[3:, 1].gt(0).all()
    fresh = MetaBalance(2, target_task=target)
    fresh.load_state_dict(mb.state_dict())
    torch.testing.assert_close(fresh.norm_ema, mb.norm_ema)


# --------------------------------------------------------------------------- PCGrad
def test_pcgrad_projects_conflicting_gradients() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1 < 0
    projected = PCGrad.project(g, torch.Generator().manual_seed(0))
    g1 = g[0] - (-1.0) / 2.0 * g[1]
    g2 = g[1] - (-1.0) / 1.0 * g[0]
    torch.testing.assert_close(projected, torch.stack([g1, g2]))
    assert torch.dot(projected[0], g[1]).item() == pytest.approx(0.0)
    agreeing = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    torch.testing.assert_close(PCGrad.project(agreeing), agreeing)


def test_pcgrad_step_writes_sum_of_projections() -> None:
    theta = nn.Parameter(torch.zeros(3))
    head = nn.Parameter(torch.ones(1))
    dirs = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.5, -2.0, 1.0]])
    losses = [theta @ dirs[i] * head[0] for i in range(3)]
    pc = PCGrad(3, seed=7)
    pc.step(losses, [theta], [head])
    # Same order as the implementation: a CPU generator seeded with seed + steps, one permutation per task.
    gen = torch.Generator().manual_seed(7)
    expected = torch.zeros(3)
    for i in range(3):
        gi = dirs[i].clone()
        for j in torch.randperm(3, generator=gen).tolist():
            if j != i and torch.dot(gi, dirs[j]) < 0:
                gi = gi - torch.dot(gi, dirs[j]) / dirs[j].square().sum() * dirs[j]
        expected += gi
    torch.testing.assert_close(theta.grad, expected)
    torch.testing.assert_close(head.grad, torch.zeros(1))  # d/dhead sum_i theta . d_i * head = 0 at theta = 0
    assert int(pc.steps) == 1


# --------------------------------------------------------------------------- DDP agreement
_START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict[str, dict[str, torch.Tensor]] = {}
        for method in ("gradnorm", "metabalance", "pcgrad", "gradnorm_unreduced"):
            torch.manual_seed(0)  # identical initial parameters on every rank
            shared = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
            name = method.split("_")[0]
            weighting = build_weighting({"method": name}, 2)
            reduce_fn = None if method.endswith("unreduced") else all_reduce_mean
            params = [*shared.parameters(), *heads.parameters()]
            opt = torch.optim.Adam(params, lr=1e-2)
            gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            for _ in range(20):
                x = torch.randn(16, 4, generator=gen)
                y = torch.randn(16, 2, generator=gen)
                h = shared(x)
                losses = torch.stack(
                    [((heads[0](h).squeeze(1) - y[:, 0]) ** 2).mean(), 10 * ((heads[1](h).squeeze(1) - y[:, 1]) ** 2).mean()]
                )
                opt.zero_grad()
                weighting.step(losses, list(shared.parameters()), list(heads.parameters()), list(shared[2].parameters()), reduce_fn)
                opt.step()
            state = {f"param.{k}": v.detach().clone() for k, v in {**dict(shared.named_parameters()), **{f"h{k}": v for k, v in heads.named_parameters()}}.items()}
            state.update({f"weighting.{k}": v.clone() for k, v in weighting.state_dict().items()})
            state["weights"] = weighting.weights()
            state["last_losses"] = losses.detach()
            results[method] = state
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_manual_weightings_agree_bitwise_across_ddp_ranks() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children inherit the imported modules (a spawned child re-imports lightning, ~4 s).
        mp.start_processes(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method=_START)
        r0 = torch.load(Path(out_dir) / "rank0.pt")
        r1 = torch.load(Path(out_dir) / "rank1.pt")
    for method in ("gradnorm", "metabalance", "pcgrad"):
        a, b = r0[method], r1[method]
        assert not torch.equal(a["last_losses"], b["last_losses"]), "ranks must see different data"
        assert a.keys() == b.keys()
        for key in a:
            if key != "last_losses":
                assert torch.equal(a[key], b[key]), (method, key)
    assert not torch.equal(r0["gradnorm"]["weights"], torch.ones(2))
    # Without the reduction the ranks drift apart: the test can fail.
    assert not torch.equal(r0["gradnorm_unreduced"]["weights"], r1["gradnorm_unreduced"]["weights"])


def test_all_reduce_mean_is_identity_without_process_group() -> None:
    t = torch.randn(3)
    assert all_reduce_mean(t) is t


@pytest.mark.parametrize("method", ["gradnorm", "metabalance", "pcgrad"])
def test_manual_step_sets_independent_contiguous_grads(method: str) -> None:
    # (a + b).sum() hands the *same* expanded gradient tensor to a and b.
    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), 100.0)  # stale gradients are replaced, not accumulated
    weighting = build_weighting({"method": method}, 2)
    weighting.step([(a + b).sum() + c.sum(), 2 * (a + b).sum()], [a], [b, c], [a])
    for p in (a, b, c):
        assert p.grad.is_contiguous()
    torch.testing.assert_close(b.grad, torch.full((3,), 3.0))
    before = a.grad.clone()
    b.grad.mul_(0.5)
    torch.testing.assert_close(a.grad, before)
    assert a.grad.abs().max() < 10
