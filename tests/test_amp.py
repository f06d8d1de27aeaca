"""Mixed precision: fp16 with torch.amp.GradScaler (on CPU), bf16 / fp16 autocast.

The driver unscales the ascent gradient before ε; a non-finite ascent gradient skips the
perturbation and the base step exactly as GradScaler skips a step (the scale backs off once,
the weights and the base optimizer's state are untouched, the counters say why).
"""

import copy

import pytest
import torch

import samlm
from samlm.optim import train_step

METHODS = [samlm.SAM, samlm.ASAM, samlm.FunctionalSAM, samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM]


def make_problem(seed=0, rows=16):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(rows, 6, generator=g)
    y = torch.randint(0, 5, (rows,), generator=g)
    return model, (x, y)


def forward_of(model):
    return lambda batch: model(batch[0])


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.float(), batch[1])


def poisoned(which_call):
    """A loss whose ``which_call``-th evaluation (1 = the step's ascent) has an infinite gradient."""
    calls = {"n": 0}

    def loss(outputs, batch):
        calls["n"] += 1
        value = ce(outputs, batch)
        if calls["n"] == which_call:
            value = value + outputs.float().sum() * float("inf")
        return value

    return loss


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_grad_scaler_works_on_cpu():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**8


@pytest.mark.parametrize("method", METHODS)
def test_scaled_step_equals_the_unscaled_step(method):
    """Scaling by a power of two is exact: with GradScaler the step is the fp32 step."""
    model_a, batch = make_problem(1)
    model_b = copy.deepcopy(model_a)
    opt_a = method(torch.optim.AdamW(model_a.parameters(), lr=1e-2))
    opt_b = method(torch.optim.AdamW(model_b.parameters(), lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for _ in range(3):
        stats_a = opt_a.train_step(batch, forward_of(model_a), ce, scaler=scaler)
        stats_b = opt_b.train_step(batch, forward_of(model_b), ce)
        assert not stats_a.skipped
        assert stats_a.grad_norm == pytest.approx(stats_b.grad_norm, rel=1e-6)  # the *unscaled* ascent gradient
    torch.testing.assert_close(flat(model_a), flat(model_b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_ascent_gradient_skips_the_step_like_grad_scaler(method):
    model, batch = make_problem(2)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    opt.train_step(batch, forward_of(model), ce, scaler=scaler)  # moments exist (psam needs them)
    before, base_state = flat(model), copy.deepcopy(opt.base_optimizer.state_dict())
    counters = dict(opt.counters)

    # what GradScaler itself does with a non-finite gradient
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    reference.load_state_dict(scaler.state_dict())
    reference.scale(torch.ones(()))  # GradScaler initialises its scale lazily, in scale()
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=1.0)
    for p in ref_model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    reference.step(ref_opt)
    reference.update()

    stats = opt.train_step(batch, forward_of(model), poisoned(1), scaler=scaler)
    assert stats.skipped and stats.ascent_nonfinite
    assert scaler.get_scale() == 2.0**9 and scaler.state_dict() == reference.state_dict()
    assert torch.equal(flat(model), before)  # no perturbation left, no step
    assert opt.base_optimizer.state_dict()["state"][0]["step"] == base_state["state"][0]["step"]
    assert all(p.grad is None for p in model.parameters())
    assert opt.counters["skipped_steps"] == counters["skipped_steps"] + 1
    assert opt.counters["ascent_nonfinite"] == counters["ascent_nonfinite"] + 1
    assert opt.counters["steps"] == counters["steps"]

    stats = opt.train_step(batch, forward_of(model), ce, scaler=scaler)  # and training goes on
    assert not stats.skipped and not torch.equal(flat(model), before)
    assert torch.isfinite(flat(model)).all()


@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM])
def test_nonfinite_descent_gradient_skips_the_step_like_grad_scaler(method):
    model, batch = make_problem(3)
    opt = method(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    before = flat(model)
    stats = opt.train_step(batch, forward_of(model), poisoned(2), scaler=scaler)  # 2: the descent
    assert stats.skipped and not stats.ascent_nonfinite
    assert scaler.get_scale() == 2.0**9
    assert torch.equal(flat(model), before)
    assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 0


def test_scale_is_updated_once_per_step_and_grows_on_schedule():
    """One scaler.update() per optimizer step, not one per pass: growth_interval counts steps."""
    model, batch = make_problem(4)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=3)
    scales = []
    for _ in range(6):
        opt.train_step(batch, forward_of(model), ce, scaler=scaler)
        scales.append(scaler.get_scale())
    assert scales == [2.0**6, 2.0**6, 2.0**7, 2.0**7, 2.0**7, 2.0**8]


def test_plain_optimizer_with_scaler_skips_nonfinite_steps_too():
    model, batch = make_problem(5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = flat(model)
    stats = train_step(opt, batch, forward_of(model), poisoned(1), scaler=scaler)
    assert stats.skipped and torch.equal(flat(model), before) and scaler.get_scale() == 2.0**9
    assert not train_step(opt, batch, forward_of(model), ce, scaler=scaler).skipped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM, samlm.PreconditionedSAM])
def test_autocast_steps_run_in_low_precision_and_keep_fp32_weights(dtype, method):
    model, batch = make_problem(6)
    reference = copy.deepcopy(model)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = method(torch.optim.AdamW(reference.parameters(), lr=1e-2))
    seen = []

    def forward(b):
        out = model(b[0])
        seen.append(out.dtype)
        return out

    scaler = torch.amp.GradScaler("cpu") if dtype is torch.float16 else None
    for _ in range(3):
        stats = opt.train_step(batch, forward, ce, autocast_dtype=dtype, scaler=scaler)
        ref_opt.train_step(batch, forward_of(reference), ce)
        assert not stats.skipped and stats.loss_perturbed == stats.loss_perturbed  # finite, not NaN
    assert set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # low precision, same trajectory to a low-precision tolerance
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=3e-2)
    assert not torch.equal(flat(model), flat(make_problem(6)[0]))
