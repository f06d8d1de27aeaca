"""SAM at (about) the base optimizer's price: Momentum-SAM (msam, pmsam) and LookSAM.

Each is pinned against a float64 reference of its paper's update, equals its base at ρ = 0, round
trips its state through ``state_dict``, and refuses what it cannot do with a clear message."""

import copy
import math

import pytest
import torch

import samlm
from samlm.optim import METHODS, build_optimizer
from samlm.optim.looksam import LookSAM
from samlm.optim.sam import MomentumSAM, PreconditionedMomentumSAM

DT = torch.float64


def problem(seed=0, rows=12, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    batches = [
        (torch.randn(rows, 5, generator=g, dtype=dtype), torch.randint(0, 3, (rows,), generator=g)) for _ in range(8)
    ]
    return model, batches


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def fwd(model):
    return lambda b: model(b[0])


def grads_at(model, weights, batch):
    """∇L at ``weights`` (a list shaped like the parameters), without touching the model."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: w.clone().requires_grad_() for k, w in zip(names, weights)}
    value = ce(torch.func.functional_call(model, params, (batch[0],)), batch)
    return list(torch.autograd.grad(value, list(params.values())))


def norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def max_error(model, weights):
    return max(float((p.detach() - w).abs().max()) for p, w in zip(model.parameters(), weights))


# -- Momentum-SAM -------------------------------------------------------------------------------


def test_msam_with_sgd_momentum_is_the_papers_update_in_float64():
    """Becker et al.'s Algorithm 1: w̃ = w − ρ v/‖v‖, v ← μv + ∇L(w̃), w ← w − η v."""
    model, batches = problem()
    lr, mu, rho = 0.2, 0.9, 0.15
    w = [p.detach().clone() for p in model.parameters()]
    v = [torch.zeros_like(t) for t in w]
    for batch in batches:
        n = norm(v)
        tilde = [a - rho * b / (n + 1e-12) for a, b in zip(w, v)] if n > 0 else w
        g = grads_at(model, tilde, batch)
        v = [mu * b + c for b, c in zip(v, g)]
        w = [a - lr * b for a, b in zip(w, v)]
    opt = MomentumSAM(torch.optim.SGD(model.parameters(), lr=lr, momentum=mu), rho=rho)
    for batch in batches:
        stats = opt.train_step(batch, fwd(model), ce)
        assert stats.ascent_loss is None and stats.sam_step
    assert max_error(model, w) < 1e-13


@pytest.mark.parametrize("preconditioned", [False, True])
def test_msam_and_pmsam_with_adamw_are_their_updates_in_float64(preconditioned):
    """AdamW's m̂ (msam) or its update direction m̂/(√v̂+eps) (pmsam), normalized, against the step."""
    model, batches = problem(1)
    lr, (b1, b2), eps, wd, rho = 0.05, (0.9, 0.99), 1e-8, 0.1, 0.2
    w = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    for k, batch in enumerate(batches):
        if k == 0:
            tilde = w  # no momentum yet: a plain first step
        else:
            m_hat = [a / (1 - b1**k) for a in m]
            u = [a / ((b / (1 - b2**k)).sqrt() + eps) for a, b in zip(m_hat, v)] if preconditioned else m_hat
            n = norm(u)
            tilde = [a - rho * b / (n + 1e-12) for a, b in zip(w, u)]
        g = grads_at(model, tilde, batch)
        t = k + 1
        m = [b1 * a + (1 - b1) * c for a, c in zip(m, g)]
        v = [b2 * a + (1 - b2) * c * c for a, c in zip(v, g)]
        w = [
            a * (1 - lr * wd) - lr * (mm / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)
            for a, mm, vv in zip(w, m, v)
        ]
    cls = PreconditionedMomentumSAM if preconditioned else MomentumSAM
    opt = cls(torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), rho=rho)
    for batch in batches:
        opt.train_step(batch, fwd(model), ce)
    assert max_error(model, w) < 1e-12


@pytest.mark.parametrize("name,ascent_fraction", [("msam", 0.25), ("pmsam", 0.25), ("looksam", 1.0), ("looksam", 0.25)])
def test_rho_zero_is_the_base_optimizer(name, ascent_fraction):
    """Bitwise, but for LookSAM's full steps with an ascent fraction: their descent runs the ascent
    rows and the others in two pieces, which sums the same gradient in another order."""
    model_a, batches = problem(2, dtype=torch.float32)
    model_b = copy.deepcopy(model_a)
    opt = build_optimizer(name, model_a.parameters(), lr=1e-2, rho=0.0, ascent_fraction=ascent_fraction)
    base = build_optimizer("adamw", model_b.parameters(), lr=1e-2)
    for batch in batches:
        opt.train_step(batch, fwd(model_a), ce)
        samlm.optim.train_step(base, batch, fwd(model_b), ce)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        if name == "looksam" and ascent_fraction < 1:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, q)


def test_the_first_momentum_sam_step_is_a_plain_step():
    """No momentum before the base's first step: ε = 0 (no division by ‖m‖ = 0), the base's step."""
    model_a, batches = problem(3, dtype=torch.float32)
    model_b = copy.deepcopy(model_a)
    opt = MomentumSAM(torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    stats = opt.train_step(batches[0], fwd(model_a), ce)
    samlm.optim.train_step(torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9), batches[0], fwd(model_b), ce)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert stats.eps_norm == 0.0 and stats.grad_norm == 0.0 and not stats.skipped
    assert opt.counters["zero_grad_norm"] == 1
    stats = opt.train_step(batches[1], fwd(model_a), ce)
    assert stats.eps_norm == pytest.approx(0.5) and stats.grad_norm > 0


def test_momentum_sam_refuses_a_base_without_momentum_and_what_needs_an_ascent():
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="momentum=0"):
        MomentumSAM(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="Adafactor keeps none"):
        MomentumSAM(torch.optim.Adafactor(params, lr=0.1))
    with pytest.raises(ValueError, match="m-sharpness"):
        MomentumSAM(torch.optim.AdamW(params), m=2)
    with pytest.raises(ValueError, match="functional descent"):
        MomentumSAM(torch.optim.AdamW(params), descent="functional")
    with pytest.raises(ValueError, match="second moments"):  # pmsam reads the base's geometry, as psam
        PreconditionedMomentumSAM(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def recording_closure(opt, model, batch, calls):
    """A step(closure) closure that records, at each call, whether the weights are perturbed."""

    def closure():
        calls.append(opt.perturbed)
        opt.zero_grad()
        value = ce(model(batch[0]), batch)
        value.backward()
        return value

    return closure


def test_msam_closure_surface_runs_once_at_w_plus_eps():
    model_a, batches = problem(4)
    model_b = copy.deepcopy(model_a)
    a = MomentumSAM(torch.optim.AdamW(model_a.parameters(), lr=1e-2), rho=0.2)
    b = MomentumSAM(torch.optim.AdamW(model_b.parameters(), lr=1e-2), rho=0.2)
    calls = []
    for batch in batches[:4]:
        a.step(recording_closure(a, model_a, batch, calls))
        b.train_step(batch, fwd(model_b), ce)
    assert calls == [True] * 4  # one forward+backward per step, at w+ε
    assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(model_a.parameters(), model_b.parameters()))


# -- LookSAM ------------------------------------------------------------------------------------


def looksam_reference(model, batches, *, lr, mu, rho, k, alpha, ascent_rows):
    """Liu et al.'s Algorithm 1 (global vectors) on SGD with momentum, in float64; with an ascent
    fraction, g_v is formed on the ascent rows and the full step descends with all rows' g_s."""
    w = [p.detach().clone() for p in model.parameters()]
    buf = None
    g_v = None
    for t, batch in enumerate(batches):
        if t % k == 0:
            rows = (batch[0][:ascent_rows], batch[1][:ascent_rows])
            g = grads_at(model, w, rows)
            n = norm(g)
            perturbed = [a + rho * b / (n + 1e-12) for a, b in zip(w, g)]
            g_s = grads_at(model, perturbed, rows)
            coef = sum(float((a * b).sum()) for a, b in zip(g_s, g)) / n**2
            g_v = [a - coef * b for a, b in zip(g_s, g)]
            d = grads_at(model, perturbed, batch)
        else:
            g = grads_at(model, w, batch)
            d = [a + alpha * norm(g) / norm(g_v) * b for a, b in zip(g, g_v)]
        buf = d if buf is None else [mu * a + b for a, b in zip(buf, d)]
        w = [a - lr * b for a, b in zip(w, buf)]
    return w


@pytest.mark.parametrize("ascent_fraction,ascent_rows", [(1.0, 12), (0.25, 3)])
def test_looksam_is_the_papers_update_in_float64(ascent_fraction, ascent_rows):
    model, batches = problem(5)
    hp = dict(lr=0.1, mu=0.9, rho=0.2, k=3, alpha=0.7)
    expected = looksam_reference(model, batches, ascent_rows=ascent_rows, **hp)
    opt = LookSAM(
        torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["mu"]),
        rho=hp["rho"],
        look_every=hp["k"],
        alpha=hp["alpha"],
        ascent_fraction=ascent_fraction,
    )
    perturbed = [opt.train_step(batch, fwd(model), ce).eps_norm > 0 for batch in batches]
    assert perturbed == [t % 3 == 0 for t in range(len(batches))]
    assert opt.counters["sam_steps"] == len(batches)  # the cheap steps are LookSAM's too
    assert max_error(model, expected) < 1e-12


def test_looksam_equals_pytorch_optimizer_looksam_on_one_parameter_tensor():
    """pytorch_optimizer's LookSAM projects per tensor, the paper globally: on a model with one
    parameter tensor they coincide. Its reuse divides by ‖g_v‖ + 1e-8 (3e-7 here; 4e-10 without
    it, from its float32 norm of ε), hence the tolerance."""
    po = pytest.importorskip("pytorch_optimizer")
    g = torch.Generator().manual_seed(6)
    ours = torch.nn.Linear(5, 3, bias=False).to(DT)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(3, 5, generator=g, dtype=DT))
    theirs = copy.deepcopy(ours)
    batches = [(torch.randn(10, 5, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)) for _ in range(7)]
    opt = LookSAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), rho=0.1, look_every=3, ascent_fraction=1.0)
    peer = po.LookSAM(theirs.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    for batch in batches:
        opt.train_step(batch, fwd(ours), ce)

        def closure():
            peer.zero_grad()
            value = ce(theirs(batch[0]), batch)
            value.backward()
            return value

        closure()
        peer.step(closure)
    error = float((ours.weight - theirs.weight).detach().abs().max())
    assert error < 1e-6, error


@pytest.mark.parametrize("given", [False, True])
def test_looksam_closure_surface_takes_the_drivers_steps(given):
    """step(closure), as Lightning calls it (no gradient yet) or as davda54/sam's users do (the
    gradient at w already computed): the driver's update, with two passes on the full SAM steps
    and one on the cheap ones."""
    model_a, batches = problem(7)
    model_b = copy.deepcopy(model_a)
    a = LookSAM(torch.optim.AdamW(model_a.parameters(), lr=1e-2), rho=0.2, look_every=3, ascent_fraction=1.0)
    b = LookSAM(torch.optim.AdamW(model_b.parameters(), lr=1e-2), rho=0.2, look_every=3, ascent_fraction=1.0)
    passes = []
    for batch in batches:
        closure = recording_closure(a, model_a, batch, passes)
        if given:
            closure()
        a.step(closure)
        b.train_step(batch, fwd(model_b), ce)
    full, cheap = [False, True], [False]
    assert passes == (full + cheap + cheap) * 2 + full + cheap
    assert a.counters["sam_steps"] == b.counters["sam_steps"] == len(batches)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert all(p.grad is None for p in model_a.parameters()) != given


def test_looksam_refuses_what_it_cannot_do():
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="look_every must be an integer >= 1"):
        LookSAM(torch.optim.AdamW(params), look_every=0)
    with pytest.raises(ValueError, match="functional descent"):
        LookSAM(torch.optim.AdamW(params), descent="functional")
    with pytest.raises(ValueError, match="m-sharpness"):
        LookSAM(torch.optim.AdamW(params), m=2)
    with pytest.raises(ValueError, match="alpha"):
        LookSAM(torch.optim.AdamW(params), alpha=-1.0)
    with pytest.raises(RuntimeError, match=r"use opt.step\(closure\)"):
        LookSAM(torch.optim.AdamW(params)).first_step()
    with pytest.raises(ValueError, match="needs a closure"):
        LookSAM(torch.optim.AdamW(params)).step()


# -- both: checkpoints, costs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["msam", "pmsam", "looksam"])
def test_state_dict_round_trip_continues_bitwise(name):
    model_a, batches = problem(8, dtype=torch.float32)
    opt_a = build_optimizer(name, model_a.parameters(), lr=1e-2)
    for batch in batches[:4]:  # looksam: SAM steps 0 (and the next at 5), so g_v is live at the save
        opt_a.train_step(batch, fwd(model_a), ce)
    model_b = copy.deepcopy(model_a)
    opt_b = build_optimizer(name, model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    if name == "looksam":
        assert len(opt_b.look_direction) == len(list(model_b.parameters()))
    for batch in batches[4:]:
        a = opt_a.train_step(batch, fwd(model_a), ce)
        b = opt_b.train_step(batch, fwd(model_b), ce)
        assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert opt_a.counters == opt_b.counters


def test_costs_in_the_registry():
    assert METHODS["msam"].extra_passes == () and METHODS["msam"].step_cost(0.25) == 1.0
    assert METHODS["pmsam"].step_cost(0.25) == 1.0
    assert METHODS["looksam"].step_cost(0.25) == pytest.approx(1 + 0.25 / LookSAM.default_look_every)
    assert METHODS["looksam"].step_cost(1.0, sam_every=2) == pytest.approx(1 + 1 / 10)


def test_looksam_composes_with_the_schedule():
    """sam_every=2, sam_start=1, look_every=2: steps 1, 5 full SAM, 3, 7 cheap, the others plain."""
    model, batches = problem(9, dtype=torch.float32)
    opt = LookSAM(torch.optim.AdamW(model.parameters(), lr=1e-2), look_every=2, sam_every=2, sam_start=1)
    stats = [opt.train_step(batch, fwd(model), ce) for batch in batches]
    assert [s.sam_step for s in stats] == [t % 2 == 1 for t in range(8)]
    assert [s.eps_norm > 0 for s in stats] == [t in (1, 5) for t in range(8)]


def test_looksam_names_fsdp1_when_a_gradient_changes_shape_within_a_step():
    """FSDP1's flat parameters show a sharded gradient at the ascent and a whole one at the
    descent: one clear error instead of a broadcasting failure deep in the projection."""
    param = torch.nn.Parameter(torch.ones(12, 6))
    opt = LookSAM(torch.optim.AdamW([param]))
    opt._ascent, opt._ascent_descent = {param: torch.ones(6)}, {param: torch.ones(12, 6)}
    with pytest.raises(RuntimeError, match="use FSDP2"):
        opt.adjust_descent_gradient(sam_step=True)
