"""Norm layers' running statistics move in exactly the pass the running_stats policy names,
and equal those of an independent reference forward at that pass's weights and rows."""

import copy

import pytest
import torch

import samlm
from samlm.optim import frozen_running_stats, norm_layers

pytestmark = pytest.mark.usefixtures("float64_default")


class Net(torch.nn.Module):
    """Linear → BatchNorm → Tanh → Linear; forward takes the (x, y) batch, so it can serve as
    train_step's ``forward`` itself."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12, momentum=momentum), torch.nn.Tanh(), torch.nn.Linear(12, 5)
        )

    def forward(self, batch):
        return self.body(batch[0])


def make_problem(seed=0, rows=16, momentum=0.1):
    torch.manual_seed(seed)
    model = Net(momentum)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(rows, 6, generator=g), torch.randint(0, 5, (rows,), generator=g))
    return model, batch


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def rows(batch, n):
    return tuple(t[:n] for t in batch)


def buffers(model):
    bn = model.body[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def assert_buffers_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def reference_buffers(model, batch, rho, ascent_rows):
    """Naive SAM on copies: buffers after the ascent forward at w (ascent rows), after the descent
    forward at w+ε (all rows), and after both on one module (what unmanaged code gets)."""
    ascent = copy.deepcopy(model)
    ce(ascent(rows(batch, ascent_rows)), rows(batch, ascent_rows)).backward()
    grads = [p.grad for p in ascent.parameters()]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))

    def perturbed(start):
        with torch.no_grad():
            for p, g in zip(start.parameters(), grads):
                p.add_(rho * g / (norm + 1e-12))
        return start

    descent = perturbed(copy.deepcopy(model))
    descent(batch)
    both = copy.deepcopy(model)
    both(rows(batch, ascent_rows))
    perturbed(both)(batch)
    return buffers(ascent), buffers(descent), buffers(both)


@pytest.mark.parametrize("fraction,ascent_rows", [(0.25, 4), (1.0, 16)])
@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM])
def test_each_policy_leaves_the_statistics_of_its_own_pass(method, fraction, ascent_rows):
    model, batch = make_problem()
    at_ascent, at_descent, at_both = reference_buffers(model, batch, 0.05, ascent_rows)
    for policy, expected in (("ascent", at_ascent), ("descent", at_descent)):
        net = copy.deepcopy(model)
        opt = method(
            torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, ascent_fraction=fraction, running_stats=policy
        )
        opt.train_step(batch, net, ce)
        assert_buffers_close(buffers(net), expected)
    if method is samlm.SAM:  # "all": both passes count, as in naive two-pass code
        net = copy.deepcopy(model)
        opt = method(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, ascent_fraction=fraction, running_stats="all")
        opt.train_step(batch, net, ce)
        assert_buffers_close(buffers(net), at_both)


@pytest.mark.parametrize(
    "method,fraction,passes",
    [
        (samlm.SAM, 0.25, 2),
        (samlm.FunctionalSAM, 0.25, 3),
        (samlm.FunctionalSAM, 1.0, 2),
        (samlm.PreconditionedFunctionalSAM, 0.25, 3),
    ],
)
def test_only_the_all_policy_counts_every_pass(method, fraction, passes):
    """num_batches_tracked: one per step under ascent/descent, one per forward under "all"
    (F-SAM's clean forward at w is a third pass when the ascent uses part of the batch)."""
    model, batch = make_problem()
    for policy, expected in (("ascent", 1), ("descent", 1), ("all", passes)):
        net = copy.deepcopy(model)
        opt = method(torch.optim.AdamW(net.parameters(), lr=1e-2), ascent_fraction=fraction, running_stats=policy)
        opt.train_step(batch, lambda b: net(b), ce, model=net)
        assert int(net.body[1].num_batches_tracked) == expected, policy


def test_descent_policy_counts_micro_batches_and_groups_like_the_base_optimizer():
    """Accumulated micro-batches: one count each, as a plain optimizer's step gives; m groups:
    one count per group's pass."""
    model, batch = make_problem(rows=16)
    halves = [rows(batch, 8), tuple(t[8:] for t in batch)]
    plain = copy.deepcopy(model)
    samlm.train_step(torch.optim.AdamW(plain.parameters()), halves, plain, ce)
    net = copy.deepcopy(model)
    samlm.SAM(torch.optim.AdamW(net.parameters()), running_stats="descent").train_step(halves, net, ce)
    assert int(net.body[1].num_batches_tracked) == int(plain.body[1].num_batches_tracked) == 2
    net = copy.deepcopy(model)
    samlm.SAM(torch.optim.AdamW(net.parameters()), m=2, running_stats="ascent").train_step(batch, net, ce)
    assert int(net.body[1].num_batches_tracked) == 2


def test_policy_does_not_change_the_weights():
    """In train mode BatchNorm normalises with batch statistics, so freezing the running ones
    must not leak into any gradient: weights after several steps are bitwise equal."""
    model, _ = make_problem()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]
    finals = []
    for policy in ("ascent", "descent", "all"):
        net = copy.deepcopy(model)
        opt = samlm.PreconditionedFunctionalSAM(torch.optim.AdamW(net.parameters(), lr=1e-2), running_stats=policy)
        for batch in data:
            opt.train_step(batch, net, ce)
        finals.append([p.detach().clone() for p in net.parameters()])
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other))


def test_cumulative_average_batchnorm_is_frozen_exactly():
    """momentum=None (a cumulative average weighted by num_batches_tracked) is where the usual
    momentum-0 workaround fails; the snapshot restores counter and statistics alike."""
    model, batch = make_problem(momentum=None)
    at_ascent, _, _ = reference_buffers(model, batch, 0.05, 16)
    net = copy.deepcopy(model)
    opt = samlm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), ascent_fraction=1.0)
    opt.train_step(batch, net, ce)
    assert_buffers_close(buffers(net), at_ascent)


def test_frozen_running_stats_serves_the_two_step_surface():
    model, batch = make_problem()
    at_ascent, _, _ = reference_buffers(model, batch, 0.05, 16)
    net = copy.deepcopy(model)
    opt = samlm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
    ce(net(batch), batch).backward()
    opt.first_step(zero_grad=True)
    with frozen_running_stats(net):
        ce(net(batch), batch).backward()
    opt.second_step(zero_grad=True)
    assert_buffers_close(buffers(net), at_ascent)


def test_frozen_running_stats_restores_even_when_the_block_raises():
    model, batch = make_problem()
    before = buffers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_running_stats(model):
            model(batch)
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(buffers(model), before))


def test_norm_layers_finds_tracking_layers_only():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3),
        torch.nn.BatchNorm1d(3, track_running_stats=False),
        torch.nn.InstanceNorm1d(3, track_running_stats=True),
        torch.nn.LayerNorm(3),
    )
    assert norm_layers(model) == [model[0], model[2]]


def test_bad_policy_names_the_argument():
    model, _ = make_problem()
    with pytest.raises(ValueError, match="running_stats must be one of"):
        samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), running_stats="second")
    with pytest.raises(ValueError, match="running_stats must be one of"):
        samlm.SAM(model.parameters(), torch.optim.SGD, running_stats="first", lr=0.1)  # davda54's form
    opt = samlm.FunctionalSAM(torch.optim.AdamW(model.parameters()), running_stats="descent")
    assert opt.state_dict()["config"]["running_stats"] == "descent"
