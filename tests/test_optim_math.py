"""The SAM family's math, pinned against independent references in float64."""

import copy
import math

import pytest
import torch
from torch.func import functional_call, vjp

import samlm

# These tests compare against references in float64; other test files keep float32.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def make_problem(seed=0, rows=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(rows, 6, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    return model, (x, y)


def forward_of(model):
    return lambda batch: model(batch[0])


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def params_dict(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def loss_at(model, params, batch, loss=ce):
    return loss(functional_call(model, params, (batch[0],)), batch)


def grad_at(model, params, batch, loss=ce):
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    value = loss_at(model, params, batch, loss)
    grads = torch.autograd.grad(value, list(params.values()))
    return dict(zip(params, grads))


def global_norm(tensors):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def reference_sam_gradient(model, batch, rho, ascent_rows, scaling=None, loss=ce):
    """Naive SAM: ε = ρ T²g/‖Tg‖ on the first rows, then ∇L(w+ε) on the whole batch."""
    w = params_dict(model)
    ascent = (batch[0][:ascent_rows], batch[1][:ascent_rows])
    g = grad_at(model, w, ascent, loss)
    t = {k: scaling(w[k]) if scaling else torch.ones_like(w[k]) for k in w}
    norm = global_norm([t[k] * g[k] for k in w])
    perturbed = {k: w[k] + rho * t[k] * t[k] * g[k] / (norm + 1e-12) for k in w}
    return grad_at(model, perturbed, batch, loss), perturbed


def sgd_step_reference(model, grads, lr):
    return {k: v - lr * grads[k] for k, v in params_dict(model).items()}


@pytest.mark.parametrize("ascent_fraction,ascent_rows", [(0.25, 4), (1.0, 16), (0.3, 5)])
def test_sam_step_equals_naive_reference_on_the_first_rows(ascent_fraction, ascent_rows):
    model, batch = make_problem()
    expected = sgd_step_reference(model, reference_sam_gradient(model, batch, 0.1, ascent_rows)[0], lr=0.5)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.1, ascent_fraction=ascent_fraction)
    opt.train_step(batch, forward_of(model), ce)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-12)


def test_asam_step_equals_naive_reference():
    model, batch = make_problem(1)
    eta = 0.01
    grads, _ = reference_sam_gradient(model, batch, 0.5, 4, scaling=lambda w: w.abs() + eta)
    expected = sgd_step_reference(model, grads, lr=0.3)
    opt = samlm.ASAM(torch.optim.SGD(model.parameters(), lr=0.3), rho=0.5, eta=eta)
    opt.train_step(batch, forward_of(model), ce)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_equals_pytorch_optimizer_sam(adaptive):
    """Same settings as the PyPI peer (classic SAM: ascent on the whole batch; ASAM with η=0)."""
    from pytorch_optimizer import SAM as PeerSAM

    ours, batch = make_problem(2)
    theirs = copy.deepcopy(ours)
    peer = PeerSAM(
        theirs.parameters(), base_optimizer=torch.optim.SGD, rho=0.2, adaptive=adaptive, lr=0.1, momentum=0.9
    )
    opt = samlm.SAM(
        torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), rho=0.2, adaptive=adaptive, ascent_fraction=1.0
    )
    for _ in range(3):
        ce(theirs(batch[0]), batch).backward()
        peer.first_step(zero_grad=True)
        ce(theirs(batch[0]), batch).backward()
        peer.second_step(zero_grad=True)
        opt.train_step(batch, forward_of(ours), ce)
    # The peer accumulates ‖g‖ in float32 even for float64 weights, hence float32-level agreement.
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_functional_descent_is_vjp_at_perturbed_point_with_clean_cotangent():
    model, batch = make_problem(3)
    _, perturbed = reference_sam_gradient(model, batch, 0.2, 4)
    # r(w): the clean output cotangent; descent = J(w+ε)ᵀ r(w) via torch.func.vjp
    clean_out = functional_call(model, params_dict(model), (batch[0],)).requires_grad_()
    (r,) = torch.autograd.grad(ce(clean_out, batch), clean_out)
    _, pullback = vjp(lambda p: functional_call(model, p, (batch[0],)), perturbed)
    (expected,) = pullback(r)

    opt = samlm.FunctionalSAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.2)
    opt.train_step(batch, forward_of(model), ce)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=0, atol=1e-12)


def test_functional_sam_equals_sam_when_loss_is_linear_in_outputs():
    """r does not depend on w when the loss is linear in the outputs, so both descents agree."""

    def linear_loss(outputs, batch):
        return (outputs * batch[2]).mean()

    model_a, batch = make_problem(4)
    batch = (*batch, torch.randn(16, 5))  # per-row output weights travel with their rows
    model_b = copy.deepcopy(model_a)
    sam = samlm.SAM(torch.optim.SGD(model_a.parameters(), lr=0.1), rho=0.3)
    fsam = samlm.FunctionalSAM(torch.optim.SGD(model_b.parameters(), lr=0.1), rho=0.3)
    sam.train_step(batch, forward_of(model_a), linear_loss)
    fsam.train_step(batch, forward_of(model_b), linear_loss)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM])
@pytest.mark.parametrize("ascent_fraction", [1.0, 0.25])
def test_split_into_logit_and_functional_paths_matches_reference(method, ascent_fraction):
    model, batch = make_problem(5)
    ascent_rows = math.ceil(ascent_fraction * 16)
    g_sam, perturbed = reference_sam_gradient(model, batch, 0.2, ascent_rows)
    g = grad_at(model, params_dict(model), batch)
    clean_out = functional_call(model, params_dict(model), (batch[0],)).requires_grad_()
    (r,) = torch.autograd.grad(ce(clean_out, batch), clean_out)
    _, pullback = vjp(lambda p: functional_call(model, p, (batch[0],)), perturbed)
    (g_f,) = pullback(r)
    delta_logit = [g_sam[k] - g_f[k] for k in g]
    delta_func = [g_f[k] - g[k] for k in g]
    # the two paths sum to SAM's extra gradient
    for k, dl, df in zip(g, delta_logit, delta_func):
        torch.testing.assert_close(dl + df, g_sam[k] - g[k])

    opt = method(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.2, ascent_fraction=ascent_fraction)
    stats = opt.train_step(batch, forward_of(model), ce, split=True)
    assert stats.logit_path_norm == pytest.approx(global_norm(delta_logit), rel=1e-9)
    assert stats.functional_path_norm == pytest.approx(global_norm(delta_func), rel=1e-9)


def test_preconditioned_eps_has_norm_rho_and_direction_g_over_p():
    model, batch = make_problem(6)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    opt = samlm.PreconditionedSAM(base, rho=0.07)
    for _ in range(3):
        opt.train_step(batch, forward_of(model), ce)
    ce(model(batch[0]), batch).backward()
    w = [p.detach().clone() for p in model.parameters()]
    u = []
    for p in model.parameters():
        state = base.state[p]
        k = float(state["step"])
        p_hat = (state["exp_avg_sq"] / (1 - 0.95**k)).sqrt() + 1e-6
        u.append(p.grad / p_hat)
    opt.perturb()
    eps = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    assert global_norm(eps) == pytest.approx(0.07, rel=1e-9)
    scale = 0.07 / global_norm(u)
    for e, ui in zip(eps, u):
        torch.testing.assert_close(e, scale * ui, rtol=0, atol=1e-12)
    opt.restore()
    for p, w0 in zip(model.parameters(), w):
        assert torch.equal(p, w0)


def perturbed_weights(opt, model, batch, poison=False):
    """ε after one perturb() from the gradient of ``batch`` at w (then restored), and the stats."""
    opt.zero_grad()
    ce(model(batch[0]), batch).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("nan")
    w = [p.detach().clone() for p in model.parameters()]
    norm, eps_norm, ok = opt.perturb()
    eps = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    opt.restore()
    for p, w0 in zip(model.parameters(), w):
        assert torch.equal(p, w0)
    return eps, float(norm), float(eps_norm), bool(ok)


@pytest.mark.parametrize("method", [samlm.SAM, samlm.ASAM, samlm.PreconditionedSAM])
@pytest.mark.parametrize("chunk_elements", [1, 100])
def test_perturbation_in_chunks_equals_one_pass_over_all_tensors(method, chunk_elements, monkeypatch):
    """ε is formed a chunk of tensors at a time (bounded temporaries); chunks change nothing."""
    from samlm.optim import perturbations

    model, batch = make_problem(14)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.train_step(batch, forward_of(model), ce)  # the preconditioned rule needs moments
    whole = perturbed_weights(opt, model, batch)
    monkeypatch.setattr(perturbations, "CHUNK_ELEMENTS", chunk_elements)  # 1: a tensor per chunk
    chunked = perturbed_weights(opt, model, batch)
    assert chunked[1:] == pytest.approx(whole[1:], rel=1e-13)
    for a, b in zip(chunked[0], whole[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nan-gradient"])
@pytest.mark.parametrize("method", [samlm.SAM, samlm.ASAM, samlm.PreconditionedSAM])
def test_device_side_choice_of_eps_equals_the_host_side_one(method, poison, monkeypatch):
    """On an accelerator, ε = 0 for a non-finite gradient is chosen on the device (no host sync);
    on the CPU by reading the flag. Both give the same ε, bitwise."""
    from samlm.optim import perturbations

    model, batch = make_problem(15)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.train_step(batch, forward_of(model), ce)
    host = perturbed_weights(opt, model, batch, poison)
    monkeypatch.setattr(perturbations, "_readable_without_sync", lambda t: False)
    device = perturbed_weights(opt, model, batch, poison)
    assert host[3] == device[3] == (not poison)
    assert host[2] == device[2] and (host[2] == 0.0) == poison  # the same ‖ε‖, 0 for a bad gradient
    for a, b in zip(host[0], device[0]):
        assert torch.equal(a, b)
        assert not poison or not a.any()


def test_sum_of_squares_accumulates_mixed_dtypes_in_at_least_float32():
    from samlm.optim.perturbations import sum_of_squares

    g = torch.Generator().manual_seed(16)
    tensors = [
        torch.randn(5, generator=g, dtype=torch.float32),
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randn(300, generator=g, dtype=torch.float32).to(torch.bfloat16),
    ]
    total = sum_of_squares(tensors)
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(sum(float(t.double().square().sum()) for t in tensors), rel=1e-6)
    assert sum_of_squares(tensors[2:]).dtype == torch.float32  # bf16 accumulates in float32


@pytest.mark.parametrize(
    "pair", [(samlm.PreconditionedSAM, samlm.SAM), (samlm.PreconditionedFunctionalSAM, samlm.FunctionalSAM)]
)
def test_preconditioned_first_step_equals_plain_variant(pair):
    precond_cls, plain_cls = pair
    model_a, batch = make_problem(7)
    model_b = copy.deepcopy(model_a)
    precond_cls(torch.optim.AdamW(model_a.parameters(), lr=1e-2)).train_step(batch, forward_of(model_a), ce)
    plain_cls(torch.optim.AdamW(model_b.parameters(), lr=1e-2)).train_step(batch, forward_of(model_b), ce)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "base_factory",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-5, weight_decay=0.0),
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.0),
        lambda ps: __import__("transformers").optimization.Adafactor(
            ps, lr=1e-2, relative_step=False, scale_parameter=False, clip_threshold=1e9
        ),
    ],
    ids=["adamw", "torch-adafactor", "hf-adafactor"],
)
def test_preconditioner_is_the_base_optimizers_own_denominator(base_factory):
    """After a base step, Δw ∝ g/P elementwise per tensor: P is what the base divides by."""
    from samlm.optim.preconditioners import Preconditioners

    torch.set_default_dtype(torch.float32)
    try:
        model, batch = make_problem(8)
        model = model.float()
        batch = (batch[0].float(), batch[1])
        base = base_factory(list(model.parameters()))
        for _ in range(2):
            base.zero_grad()
            ce(model(batch[0]), batch).backward()
            before = [p.detach().clone() for p in model.parameters()]
            base.step()
        precond = Preconditioners(base, list(model.parameters()))
        assert precond.available
        for p, w0 in zip(model.parameters(), before):
            step, direction = w0 - p.detach(), p.grad / precond(p)
            scale = (step * direction).sum() / direction.square().sum()  # least-squares Δw = c·g/P
            torch.testing.assert_close(step, scale * direction, rtol=1e-3, atol=1e-4 * step.abs().max().item())
    finally:
        torch.set_default_dtype(torch.float64)  # the autouse fixture restores float32 afterwards


def test_ascent_pass_sees_exactly_the_first_rows():
    model, batch = make_problem(9, rows=20)
    seen = []

    def forward(b):
        seen.append(b[0].clone())
        return model(b[0])

    samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), ascent_fraction=0.25).train_step(batch, forward, ce)
    assert torch.equal(seen[0], batch[0][:5])
    assert torch.equal(seen[1], batch[0])


@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM, samlm.PreconditionedSAM])
def test_m_sharpness_equals_average_of_single_group_steps(method):
    model, batch = make_problem(10, rows=16)
    m = 4
    group_grads = []
    for i in range(m):
        copy_model = copy.deepcopy(model)
        rows = (batch[0][4 * i : 4 * i + 4], batch[1][4 * i : 4 * i + 4])
        method(torch.optim.AdamW(copy_model.parameters(), lr=0.0), ascent_fraction=0.5).train_step(
            rows, forward_of(copy_model), ce
        )
        group_grads.append([p.grad for p in copy_model.parameters()])
    opt = method(torch.optim.AdamW(model.parameters(), lr=0.0), ascent_fraction=0.5, m=m)
    opt.train_step(batch, forward_of(model), ce)
    for j, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.grad, sum(g[j] for g in group_grads) / m, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", [samlm.SAM, samlm.FunctionalSAM, samlm.ASAM])
@pytest.mark.parametrize("splits", [[4, 4, 4, 4], [3, 6, 7]])
def test_accumulated_micro_batches_equal_one_step_on_their_concatenation(method, splits):
    model_a, batch = make_problem(11)
    model_b = copy.deepcopy(model_a)
    micro, start = [], 0
    for n in splits:
        micro.append((batch[0][start : start + n], batch[1][start : start + n]))
        start += n
    # SGD with momentum: Adam would amplify 1e-17 roundoff in near-zero gradient entries.
    opt_a = method(torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9), ascent_fraction=0.5)
    opt_b = method(torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9), ascent_fraction=0.5)
    for _ in range(2):
        stats_a = opt_a.train_step(micro, forward_of(model_a), ce)
        stats_b = opt_b.train_step(batch, forward_of(model_b), ce)
    assert stats_a.loss_perturbed == pytest.approx(stats_b.loss_perturbed, rel=1e-12)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [samlm.SAM, samlm.ASAM, samlm.FunctionalSAM, samlm.PreconditionedSAM])
def test_weights_after_step_are_bitwise_the_base_step_from_w(dtype, method):
    """No w+ε−ε drift: the base optimizer steps from exactly w with the descent gradient."""
    model, batch = make_problem(12)
    model = model.to(dtype)
    batch = (batch[0].to(dtype), batch[1])
    twin = copy.deepcopy(model)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    twin_base = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for _ in range(3):
        opt.train_step(batch, forward_of(model), ce)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        twin_base.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)


def test_davda54_surface_matches_train_step_with_full_ascent():
    model_a, batch = make_problem(13)
    model_b = copy.deepcopy(model_a)
    opt_a = samlm.SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    opt_b = samlm.SAM(torch.optim.SGD(model_b.parameters(), lr=0.2, momentum=0.9), rho=0.1, ascent_fraction=1.0)

    def closure():
        loss = ce(model_a(batch[0]), batch)
        loss.backward()
        return loss

    for _ in range(3):
        ce(model_a(batch[0]), batch).backward()
        opt_a.step(closure)
        opt_a.zero_grad()
        opt_b.train_step(batch, forward_of(model_b), ce)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
