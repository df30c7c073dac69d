"""The MoE layer against a dense per-expert reference; masking, capacity, training on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedmoe.models import INPUT_SHAPES, MoEClassifier, MoELayer, grouped_mm_available

COMPUTE = [
    "loop",
    pytest.param(
        "grouped_mm",
        marks=pytest.mark.skipif(
            not grouped_mm_available("cpu", torch.float32),
            reason="torch.nn.functional.grouped_mm unusable in this build",
        ),
    ),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(layer: MoELayer, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor):
    """Every expert on every token, then per token the weighted sum over its kept slots."""
    w1, b1, w2, b2 = layer.expert_weights()
    every = torch.stack(
        [layer.activation(x @ w1[e] + b1[e]) @ w2[e] + b2[e] for e in range(layer.num_experts)]
    )
    picked = every[expert_idx.clamp(min=0), torch.arange(x.shape[0])[:, None]]  # [T, k, d_model]
    return (picked * (weights * (expert_idx >= 0))[..., None]).sum(1)


def router_top_k(layer: MoELayer, x: torch.Tensor):
    probs = layer.router(x).float().softmax(-1)
    top_p, top_i = probs.topk(layer.top_k, dim=-1)
    return top_i, top_p / top_p.sum(-1, keepdim=True)


@pytest.mark.parametrize("expert_compute", COMPUTE)
@pytest.mark.parametrize(
    ("d_model", "d_hidden", "num_experts", "top_k", "tokens"),
    [(16, 32, 8, 2, 50), (8, 16, 64, 4, 20), (4, 8, 1, 1, 7), (16, 8, 3, 3, 1)],
)
def test_layer_matches_dense_reference(expert_compute, d_model, d_hidden, num_experts, top_k, tokens):
    torch.manual_seed(0)
    layer = MoELayer(d_model, d_hidden, num_experts, top_k, expert_compute=expert_compute)
    x = torch.randn(tokens, d_model, requires_grad=True)
    out, stats = layer(x)
    top_i, weights = router_top_k(layer, x)
    assert torch.equal(stats.expert_idx, top_i)
    torch.testing.assert_close(stats.weights, weights)
    assert torch.equal(stats.counts, torch.bincount(top_i.flatten(), minlength=num_experts))
    ref = dense_reference(layer, x, top_i, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = (x, layer.expert_bank, layer.router.weight)
    grad_out = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, params, grad_out), torch.autograd.grad(ref, params, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expert_compute_paths_agree_and_auto_falls_back():
    torch.manual_seed(1)
    layer = MoELayer(16, 32, 8, 2, expert_compute="loop")
    x = torch.randn(40, 16)
    want, _ = layer(x)
    layer.expert_compute = "auto"
    got, _ = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # float64 (no grouped_mm) and odd widths (unaligned strides) take the loop under "auto"
    assert not grouped_mm_available("cpu", torch.float64)
    odd = MoELayer(5, 7, 4, 2).double()
    x64 = torch.randn(9, 5, dtype=torch.float64)
    out, stats = odd(x64)
    torch.testing.assert_close(out, dense_reference(odd, x64, stats.expert_idx, stats.weights))
    odd.expert_compute = "grouped_mm"
    with pytest.raises(RuntimeError, match="grouped_mm"):
        odd(x64)


def test_layer_backends_agree():
    """The Triton kernels (interpreted on CPU here) and the torch path give the same layer and gradients."""
    torch.manual_seed(2)
    layer = MoELayer(16, 16, 8, 2, capacity_factor=1.0, expert_compute="loop")
    x = torch.randn(33, 16)
    results = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        out, stats = layer(x)
        results.append([out, stats.expert_idx, *torch.autograd.grad(out.square().sum(), layer.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 100.0])
def test_capacity_keeps_slot_major_first_come_slots(capacity_factor):
    torch.manual_seed(3)
    t, k, e = 64, 2, 8
    layer = MoELayer(8, 8, e, k, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # make expert 0 popular, so that it overflows
    x = torch.randn(t, 8)
    out, stats = layer(x)
    top_i, weights = router_top_k(layer, x)
    capacity = math.ceil(capacity_factor * t * k / e)
    want, fill = top_i.clone(), [0] * e
    for slot in range(k):
        for token in range(t):
            expert = int(top_i[token, slot])
            if fill[expert] >= capacity:
                want[token, slot] = -1
            fill[expert] += 1
    assert torch.equal(stats.expert_idx, want)
    assert int(stats.dropped) == int((want < 0).sum())
    assert int(stats.counts.max()) <= capacity
    if capacity_factor < 1:
        assert int(stats.dropped) > 0
    torch.testing.assert_close(out, dense_reference(layer, x, want, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_compute", COMPUTE)
def test_masked_experts_are_never_touched(expert_compute):
    torch.manual_seed(4)
    e = 16
    layer = MoELayer(16, 16, e, 4, expert_compute=expert_compute)
    head = torch.nn.Linear(16, 10)
    allowed = torch.zeros(e, dtype=torch.bool)
    allowed[[1, 5, 6, 11, 12]] = True
    layer.set_expert_mask(allowed)
    before = layer.expert_bank.detach().clone()
    opt = torch.optim.SGD([*layer.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    for _ in range(5):
        x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
        out, stats = layer(x)
        loss = F.cross_entropy(head(out), y) + 0.1 * stats.aux_loss
        opt.zero_grad()
        loss.backward()
        assert bool(allowed[stats.expert_idx[stats.expert_idx >= 0]].all())
        assert int(stats.counts[~allowed].sum()) == 0
        assert torch.count_nonzero(layer.expert_bank.grad[~allowed]) == 0
        assert torch.count_nonzero(layer.expert_bank.grad[allowed]) > 0
        opt.step()
    assert torch.equal(layer.expert_bank[~allowed], before[~allowed])
    assert not torch.equal(layer.expert_bank[allowed], before[allowed])


def test_routing_loss_trains_the_full_router_towards_the_allowed_experts():
    """``route_loss`` is minus the log of the full router's mass on the allowed experts (0 without a mask);
    ``gate_mass`` is the full router's distribution whatever the mask; the routing loss reaches the router
    rows of masked experts (pushing their probability down) but never their expert weights."""
    torch.manual_seed(6)
    layer = MoELayer(8, 8, 6, 2)
    x = torch.randn(40, 8)
    full = layer.router(x).softmax(-1)
    free = layer(x)[1]
    assert free.route_loss.item() == 0.0
    torch.testing.assert_close(free.gate_mass, full.detach().sum(0).double())
    allowed = torch.tensor([False, True, False, True, True, False])
    layer.set_expert_mask(allowed)
    stats = layer(x)[1]
    torch.testing.assert_close(stats.route_loss, -full[:, allowed].sum(1).log().mean())
    torch.testing.assert_close(stats.gate_mass, free.gate_mass)  # the mask routes, it does not hide
    router_grad, bank_grad = torch.autograd.grad(stats.route_loss, [layer.router.weight, layer.expert_bank],
                                                 allow_unused=True)
    assert torch.count_nonzero(router_grad[~allowed].abs().sum(1)) == int((~allowed).sum())
    assert bank_grad is None  # the routing loss trains the router only
    opt = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    for _ in range(50):
        loss = layer(x)[1].route_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer(x)[1].route_loss.item() < 0.5 * stats.route_loss.item()
    # in a model, only the router's weights learn from it: the backbone's representation is left alone
    model = MoEClassifier((1, 8, 8), 10, d_model=8, d_hidden=8, num_experts=6, channels=(4,))
    model.set_expert_mask(allowed)
    loss = model(torch.randn(16, 1, 8, 8))[1].route_loss
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    learning = {name for (name, _), g in zip(params.items(), grads, strict=True) if g is not None and g.any()}
    assert learning == {"moe.router.weight"}


def test_mask_with_fewer_experts_than_k_drops_the_extra_slots():
    torch.manual_seed(5)
    layer = MoELayer(8, 8, 6, 4)
    allowed = torch.tensor([False, True, False, False, True, False])
    layer.set_expert_mask(allowed)
    x = torch.randn(10, 8)
    out, stats = layer(x)
    assert torch.equal((stats.expert_idx >= 0).sum(1), torch.full((10,), 2))
    assert set(stats.expert_idx[stats.expert_idx >= 0].tolist()) <= {1, 4}
    torch.testing.assert_close(stats.weights.sum(1), torch.ones(10))
    torch.testing.assert_close(
        out, dense_reference(layer, x, stats.expert_idx, stats.weights), rtol=1e-5, atol=1e-5
    )
    layer.set_expert_mask(None)
    assert int((layer(x)[1].expert_idx >= 0).sum()) == 40


def test_aux_loss_is_one_when_balanced_and_larger_when_not():
    layer = MoELayer(8, 8, 8, 2)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform router probabilities
    x = torch.randn(32, 8)
    torch.testing.assert_close(layer(x)[1].aux_loss, torch.tensor(1.0))
    with torch.no_grad():
        layer.router.weight[3, 0] = 5.0
    x[:, 0] = 1.0  # every token prefers expert 3
    _, stats = layer(x)
    assert stats.aux_loss.item() > 1.5
    (grad,) = torch.autograd.grad(stats.aux_loss, layer.router.weight)
    assert grad.abs().sum() > 0


def test_expert_bank_rows_are_the_experts():
    layer = MoELayer(4, 6, 5, 2)
    assert layer.expert_bank.shape == (5, layer.expert_size) and layer.expert_size == 4 * 6 + 6 + 6 * 4 + 4
    w1, _, _, b2 = layer.expert_weights()
    with torch.no_grad():
        layer.expert_bank[3] = torch.arange(layer.expert_size, dtype=torch.float32)
    assert torch.equal(w1[3].flatten(), torch.arange(24.0))
    assert torch.equal(b2[3], torch.arange(layer.expert_size - 4, layer.expert_size, dtype=torch.float32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 9, "num_experts": 16}, "top_k"),
        ({"top_k": 3, "num_experts": 2}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"expert_compute": "fast"}, "expert_compute"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_layer_rejects_bad_arguments(kwargs, match):
    args = {"d_model": 8, "d_hidden": 8, "num_experts": 4, "top_k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MoELayer(**args)


def test_layer_rejects_bad_mask_and_input():
    layer = MoELayer(8, 8, 4, 2)
    for mask in (torch.ones(4), torch.ones(5, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="mask"):
            layer.set_expert_mask(mask)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, 7))


def digits_split():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[order[:1400]], y[order[:1400]]), (x[order[1400:]], y[order[1400:]])


def train(model_forward, params, train_set, test_set, epochs: int):
    """Adam on cross entropy + 0.01 aux loss; returns (losses per epoch, test accuracy before and after)."""
    (x, y), (xt, yt) = train_set, test_set
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def accuracy():
        with torch.no_grad():
            return (model_forward(xt)[0].argmax(1) == yt).float().mean().item()

    start, losses = accuracy(), []
    for _ in range(epochs):
        order, total = torch.randperm(len(y), generator=gen), 0.0
        for i in range(0, len(y), 64):
            batch = order[i : i + 64]
            logits, stats = model_forward(x[batch])
            loss = F.cross_entropy(logits, y[batch]) + 0.01 * stats.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        losses.append(total / len(y))
    return losses, start, accuracy()


def test_layer_trains_on_digits():
    torch.manual_seed(6)
    layer, head = MoELayer(64, 64, 8, 2, capacity_factor=1.5), torch.nn.Linear(64, 10)

    def forward(x):
        out, stats = layer(x)
        return head(out), stats

    losses, start, end = train(forward, [*layer.parameters(), *head.parameters()], *digits_split(), epochs=6)
    assert losses[-1] < 0.3 * losses[0]
    assert start < 0.3 and end > 0.9


@pytest.mark.parametrize("expert_compute", COMPUTE)
def test_classifier_trains_on_digits(expert_compute):
    torch.manual_seed(7)
    model = MoEClassifier(
        INPUT_SHAPES["digits"],
        10,
        d_model=32,
        d_hidden=64,
        num_experts=8,
        channels=(16, 32),
        top_k=2,
        expert_compute=expert_compute,
    )
    losses, start, end = train(model, model.parameters(), *digits_split(), epochs=4)
    assert losses[-1] < 0.3 * losses[0]
    assert start < 0.3 and end > 0.9


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_classifier_shapes(dataset):
    torch.manual_seed(8)
    shape = INPUT_SHAPES[dataset]
    model = MoEClassifier(shape, 10, num_experts=4, top_k=2)
    images = torch.randn(5, *shape)
    logits, stats = model(images)
    assert logits.shape == (5, 10) and stats.expert_idx.shape == (5, 2)
    logits.sum().backward()
    assert all(p.grad is not None for _, p in model.named_shared_parameters())
    assert model.expert_bank.grad is not None
    assert all(p is not model.expert_bank for _, p in model.named_shared_parameters())
    torch.testing.assert_close(model(images.flatten(1))[0], logits)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(5, 3, 8, 8))


def test_grouped_mm_check_is_the_same_under_no_grad():
    """The capability check is cached per process; its first call may come from evaluation code."""
    grouped_mm_available.cache_clear()
    with torch.no_grad():
        first = grouped_mm_available("cpu", torch.float32)
    grouped_mm_available.cache_clear()
    assert grouped_mm_available("cpu", torch.float32) == first
