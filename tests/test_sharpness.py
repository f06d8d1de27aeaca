"""samlm.diagnostics.sharpness against closed forms: explicit Hessians, Gauss-Newton matrices and spectra (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian

from samlm.diagnostics.sharpness import (
    functional_hessian_top_eigenvalue,
    functional_hessian_vector_product,
    gauss_newton_vector_product,
    hessian_vector_product,
    measure_sharpness,
    sam_path_norms,
    sam_path_split,
    top_eigenvalue,
)

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster and does not fight parallel test workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- helpers


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(vector, params):
    return [c.view(p.shape) for c, p in zip(vector.split([p.numel() for p in params]), params)]


def leaves(*shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(*s, generator=g, dtype=DT)).requires_grad_(True) for s in shapes]


def matvec_matrix(matvec, params):
    """The explicit matrix of a matvec, column by column."""
    n = sum(p.numel() for p in params)
    return torch.stack([flat(matvec(split_like(e, params))) for e in torch.eye(n, dtype=DT)], 1)


def spectrum_matrix(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T


def ce(z, batch):
    return F.cross_entropy(z, batch[1])


def mse(z, batch):
    return 0.5 * ((z - F.one_hot(batch[1], z.shape[1]).to(z.dtype)) ** 2).sum(1).mean()


def classification_batch(n, d=3, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g)


def linear(ws, x):  # z = W x + b: linear in the weights
    return x @ ws[0].T + ws[1]


def mlp(ws, x):  # z = W2 tanh(W1 x + b1): nonlinear in the weights
    return torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T


LINEAR_SHAPES = [(3, 3), (3,)]
MLP_SHAPES = [(4, 3), (4,), (3, 4)]


def explicit(model, params, batches, loss):
    """H, H_O = JᵀH_zJ and H_F = H − H_O, each averaged over the batches, by autograd.functional."""
    w0 = flat(params).detach()
    hs, gs = [], []
    for batch in batches:
        x = batch[0]
        hs.append(hessian(lambda w: loss(model(split_like(w, params), x), batch), w0))
        z0 = model(split_like(w0, params), x).detach()
        j = jacobian(lambda w: model(split_like(w, params), x).reshape(-1), w0)
        hz = hessian(lambda z: loss(z.view(z0.shape), batch), z0.reshape(-1))
        gs.append(j.T @ hz @ j)
    h, g = torch.stack(hs).mean(0), torch.stack(gs).mean(0)
    return h, g, h - g


def problem(model, shapes, loss, sizes=(5, 3)):
    params = leaves(*shapes)
    batches = [classification_batch(n, seed=i + 1) for i, n in enumerate(sizes)]
    return params, batches, (lambda batch: model(params, batch[0])), loss


# ---------------------------------------------------------------------------------------------- quadratic ½ wᵀAw


def quadratic(a, shapes=((3,), (2, 2))):
    params = leaves(*shapes, seed=3)
    return params, (lambda batch: flat(params)), (lambda z, batch: 0.5 * z @ a @ z)


def test_hvp_of_quadratic_is_a_times_v():
    a = spectrum_matrix([3.0, -2.0, 1.0, 0.5, 0.1, -0.7, 2.2])
    params, forward, loss = quadratic(a)
    v = split_like(torch.randn(7, dtype=DT), params)
    hv = hessian_vector_product(params, None, forward, loss)(v)
    assert [t.shape for t in hv] == [p.shape for p in params]
    torch.testing.assert_close(flat(hv), a @ flat(v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize(
    "eigenvalues",
    [
        [9.0, 6.0, 3.0, 1.0, 0.5, -1.0, -4.0],  # dominant positive
        [-8.0, 6.0, 3.0, 1.0, 0.5, -1.0, 0.2],
    ],
)  # dominant negative
def test_top_eigenvalue_of_quadratic(method, eigenvalues):
    a = spectrum_matrix(eigenvalues)
    params, forward, loss = quadratic(a)
    result = top_eigenvalue(
        hessian_vector_product(params, None, forward, loss), params, iters=500, tol=1e-9, seed=1, method=method
    )
    assert abs(result.value - max(eigenvalues)) < 1e-6
    assert result.converged and result.method == method


def test_lanczos_top_k_matches_eigvalsh_with_multiplicity():
    eigenvalues = [5.0, 5.0, 3.0, 2.0, -1.0, -6.0, 0.5]  # a repeated top eigenvalue needs a restart
    a = spectrum_matrix(eigenvalues, seed=2)
    params, forward, loss = quadratic(a)
    result = top_eigenvalue(hessian_vector_product(params, None, forward, loss), params, iters=20, tol=1e-10, k=4)
    expected = torch.linalg.eigvalsh(a).flip(0)
    torch.testing.assert_close(torch.tensor(result.top_k, dtype=DT), expected[:4], rtol=0, atol=1e-8)
    assert result.smallest == pytest.approx(-6.0, abs=1e-8)
    assert result.iters == 7  # the Krylov space is the whole space after n steps


def test_lanczos_stops_on_convergence_before_spanning_the_space():
    eigenvalues = [10.0, 7.0, 6.5] + torch.linspace(-2, 2, 197).tolist()
    a = spectrum_matrix(eigenvalues, seed=4)
    params, forward, loss = quadratic(a, shapes=((10, 10), (100,)))
    result = top_eigenvalue(hessian_vector_product(params, None, forward, loss), params, iters=150, tol=1e-8, k=2)
    assert result.converged and result.iters < 150
    assert result.value == pytest.approx(10.0, abs=1e-6)
    assert result.top_k[1] == pytest.approx(7.0, abs=1e-6)


def test_top_eigenvalue_is_deterministic_and_leaves_the_global_rng_alone():
    a = spectrum_matrix([4.0, 3.9, 3.8, 1.0, 0.0, -1.0, -2.0])
    params, forward, loss = quadratic(a)
    hvp = hessian_vector_product(params, None, forward, loss)
    state = torch.get_rng_state()
    runs = [top_eigenvalue(hvp, params, iters=3, seed=seed) for seed in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0] == runs[1]
    assert runs[0].value != runs[2].value  # 3 iterations are not converged: the start vector shows
    with pytest.raises(ValueError):
        top_eigenvalue(hvp, params, method="power", k=2)


# ---------------------------------------------------------------------------------------------- softmax models


def test_linear_softmax_hessian_equals_gauss_newton():
    params, batches, forward, loss = problem(linear, LINEAR_SHAPES, ce)
    h, g, _ = explicit(linear, params, batches, ce)
    torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12)  # H_F = 0: z is linear in W
    torch.testing.assert_close(
        matvec_matrix(gauss_newton_vector_product(params, batches, forward, loss), params), g, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        matvec_matrix(hessian_vector_product(params, batches, forward, loss), params), h, rtol=1e-10, atol=1e-12
    )
    hf = matvec_matrix(functional_hessian_vector_product(params, batches, forward, loss), params)
    assert hf.abs().max() < 1e-12
    result = top_eigenvalue(hessian_vector_product(params, batches, forward, loss), params, iters=50, tol=1e-10)
    assert result.value == pytest.approx(torch.linalg.eigvalsh(h)[-1].item(), abs=1e-8)


def test_operators_average_per_batch_means():
    params, batches, forward, loss = problem(linear, LINEAR_SHAPES, ce, sizes=(6, 2))
    hvp = hessian_vector_product(params, batches, forward, loss)
    each = [hessian_vector_product(params, [b], forward, loss) for b in batches]
    v = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(flat(hvp(v)), 0.5 * (flat(each[0](v)) + flat(each[1](v))))
    # a single batch may be passed bare (a tuple is one batch, a list is several)
    torch.testing.assert_close(flat(hessian_vector_product(params, batches[0], forward, loss)(v)), flat(each[0](v)))


@pytest.mark.parametrize("loss", [ce, mse], ids=["cross_entropy", "mse"])
def test_mlp_hessian_gauss_newton_and_functional_parts(loss):
    params, batches, forward, _ = problem(mlp, MLP_SHAPES, loss)
    h, g, hf = explicit(mlp, params, batches, loss)
    assert hf.abs().max() > 1e-3  # the tanh model has a functional Hessian
    got_h = matvec_matrix(hessian_vector_product(params, batches, forward, loss), params)
    got_g = matvec_matrix(gauss_newton_vector_product(params, batches, forward, loss), params)
    got_f = matvec_matrix(functional_hessian_vector_product(params, batches, forward, loss), params)
    for got, want in ((got_h, h), (got_g, g), (got_f, hf), (got_h - got_g, hf)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(got_g)[0] > -1e-12  # H_O = JᵀH_zJ is PSD for a convex loss


def test_mlp_spectra_match_eigvalsh():
    params, batches, forward, loss = problem(mlp, MLP_SHAPES, ce)
    h, g, hf = explicit(mlp, params, batches, ce)
    n = h.shape[0]
    kw = dict(iters=n, tol=1e-12)
    result_h = top_eigenvalue(hessian_vector_product(params, batches, forward, loss), params, k=3, **kw)
    result_g = top_eigenvalue(gauss_newton_vector_product(params, batches, forward, loss), params, **kw)
    result_f = functional_hessian_top_eigenvalue(params, batches, forward, loss, **kw)
    torch.testing.assert_close(
        torch.tensor(result_h.top_k, dtype=DT), torch.linalg.eigvalsh(h).flip(0)[:3], rtol=0, atol=1e-8
    )
    assert result_g.value == pytest.approx(torch.linalg.eigvalsh(g)[-1].item(), abs=1e-8)
    assert result_f.value == pytest.approx(torch.linalg.eigvalsh(hf)[-1].item(), abs=1e-8)
    assert result_f.smallest == pytest.approx(torch.linalg.eigvalsh(hf)[0].item(), abs=1e-8)
    assert result_f.smallest < 0 < result_f.value  # H_F is indefinite


# ---------------------------------------------------------------------------------------------- SAM path split


def gradient_at(params, point, forward, loss, batches, cotangent=None):
    """∇L at `point` (or J(point)ᵀ cotangent per batch), averaged, with fresh leaves: an independent reference."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, x in zip(params, point):
            p.copy_(x)
    parts = []
    for i, batch in enumerate(batches):
        z = forward(batch)
        if cotangent is None:
            parts.append(torch.autograd.grad(loss(z, batch), params))
        else:
            parts.append(torch.autograd.grad(z, params, cotangent[i]))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return flat([sum(ps) / len(ps) for ps in zip(*parts)])


def test_sam_split_is_exact_and_matches_independent_gradients():
    params, batches, forward, loss = problem(mlp, MLP_SHAPES, ce)
    before = [p.detach().clone() for p in params]
    split = sam_path_split(params, batches, forward, loss, rho=0.3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored bitwise

    g = gradient_at(params, before, forward, loss, batches)
    torch.testing.assert_close(flat(split.g), g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(split.eps), 0.3 * g / g.norm(), rtol=1e-12, atol=1e-14)
    w_eps = [b + e for b, e in zip(before, split.eps)]
    g_sam = gradient_at(params, w_eps, forward, loss, batches)
    r = [torch.autograd.grad(loss(z := forward(b).detach().requires_grad_(), b), z)[0] for b in batches]
    g_func = gradient_at(params, w_eps, forward, loss, batches, cotangent=r)
    torch.testing.assert_close(flat(split.g_sam), g_sam, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(split.g_func), g_func, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(split.delta_logit) + flat(split.delta_func), g_sam - g, rtol=1e-12, atol=1e-14)


def test_sam_split_first_order_is_rho_times_h_o_and_h_f_on_g_hat():
    params, batches, forward, loss = problem(mlp, MLP_SHAPES, ce)
    _, g_matrix, f_matrix = explicit(mlp, params, batches, ce)
    rho = 1e-4
    split = sam_path_split(params, batches, forward, loss, rho=rho)
    g_hat = flat(split.g) / flat(split.g).norm()
    for delta, matrix in ((split.delta_logit, g_matrix), (split.delta_func, f_matrix)):
        first_order = rho * matrix @ g_hat
        assert (flat(delta) - first_order).norm() < 1e-2 * first_order.norm()  # O(ρ²) remainder


def test_loss_linear_in_outputs_has_no_logit_path():
    params, batches, forward, _ = problem(mlp, MLP_SHAPES, ce)
    c = torch.randn(3, dtype=DT)

    def linear_loss(z, batch):
        return (z * c).sum(1).mean()

    out = sam_path_norms(params, batches, forward, linear_loss, rho=0.1)
    assert out["logit_path_norm"] == 0.0
    assert out["functional_path_norm"] > 1e-4
    assert out["logit_functional_ratio"] == 0.0
    assert out["functional_path_cosine"] == pytest.approx(1.0)


def test_model_linear_in_weights_has_no_functional_path():
    params, batches, forward, loss = problem(linear, LINEAR_SHAPES, ce)
    out = sam_path_norms(params, batches, forward, loss, rho=0.1)
    assert out["functional_path_norm"] < 1e-15
    assert out["logit_path_norm"] > 1e-4
    assert out["logit_path_cosine"] == pytest.approx(1.0)
    assert out["loss_perturbed"] > out["loss"]


def test_weights_are_restored_bitwise_even_when_eps_dominates():
    params = leaves(*MLP_SHAPES, scale=1e-3)  # |ε| ≫ |w|: (w + ε) − ε would lose w's low bits
    batches = [classification_batch(5)]
    before = [p.detach().clone() for p in params]
    sam_path_norms(params, batches, lambda b: mlp(params, b[0]), ce, rho=3.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_weights_are_restored_when_the_perturbed_pass_fails():
    params, batches, forward, loss = problem(mlp, MLP_SHAPES, ce, sizes=(4,))
    before = [p.detach().clone() for p in params]
    calls = []

    def failing_forward(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return forward(batch)

    with pytest.raises(RuntimeError, match="boom"):
        sam_path_norms(params, batches, failing_forward, loss, rho=0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ---------------------------------------------------------------------------------------------- measure_sharpness


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(3, 4)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.hidden(x))))


def test_measure_sharpness_matches_explicit_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = MLP().to(DT).train()  # dropout on: the explicit values below hold only in eval mode
    model.hidden.eval()  # a submodule in its own mode must keep it
    model.hidden.bias.requires_grad_(False)  # excluded from the measurement
    batches = [classification_batch(6, seed=5), classification_batch(4, seed=6)]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    out = measure_sharpness(model, batches, lambda b: model(b[0]), ce, iters=24, seed=0, rho=0.05, tol=1e-12)

    assert model.training and model.drop.training and not model.hidden.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.hidden.bias.requires_grad

    expected_keys = {
        "hessian_lambda_max",
        "hessian_top_k",
        "gauss_newton_lambda_max",
        "functional_lambda",
        "functional_lambda_min",
        "hessian_iters",
        "gauss_newton_iters",
        "functional_iters",
        "iters",
        "converged",
        "logit_path_norm",
        "functional_path_norm",
        "logit_functional_ratio",
        "logit_path_cosine",
        "functional_path_cosine",
        "sam_shift_norm",
        "grad_norm",
        "sam_grad_norm",
        "loss",
        "loss_perturbed",
        "rho",
    }
    assert set(out) == expected_keys
    assert out["iters"] <= 24 and out["converged"]  # 12 + 12 trainable weights

    # the explicit Hessian over the trainable weights only (dropout off, hidden bias fixed)
    w1, b1, w2 = model.hidden.weight, model.hidden.bias.detach(), model.out.weight
    params = [w1, b1, w2]

    def net(ws, x):
        return torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T

    h, g, hf = explicit(net, params, batches, ce)
    keep = torch.cat([torch.arange(12), torch.arange(16, 28)])
    h, g, hf = (m[keep][:, keep] for m in (h, g, hf))
    assert out["hessian_lambda_max"] == pytest.approx(torch.linalg.eigvalsh(h)[-1].item(), abs=1e-8)
    assert out["gauss_newton_lambda_max"] == pytest.approx(torch.linalg.eigvalsh(g)[-1].item(), abs=1e-8)
    assert out["functional_lambda"] == pytest.approx(torch.linalg.eigvalsh(hf)[-1].item(), abs=1e-8)
    assert out["functional_lambda_min"] == pytest.approx(torch.linalg.eigvalsh(hf)[0].item(), abs=1e-8)
    assert out["logit_functional_ratio"] == pytest.approx(out["logit_path_norm"] / out["functional_path_norm"])


def test_measure_sharpness_runs_half_precision_models_in_float32_and_restores_them():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def loss(z, batch):
        seen.append(z.dtype)
        return F.cross_entropy(z, batch[1])

    batch = (torch.randn(8, 3), torch.randint(0, 3, (8,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = measure_sharpness(model, batch, lambda b: model(b[0]), loss, iters=4)
    assert set(seen) == {torch.float32}
    assert not model.training
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(math.isfinite(out[k]) for k in ("hessian_lambda_max", "gauss_newton_lambda_max", "functional_lambda"))
    assert out["gauss_newton_lambda_max"] > 0


def test_measure_sharpness_on_a_tiny_transformer_lm():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forward(batch):
        return model(input_ids=batch).logits[:, :-1]

    def loss(logits, batch):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # the bare operators also double-backward through attention
    hv = hessian_vector_product(params, ids, forward, loss)([torch.ones_like(p) for p in params])
    assert all(torch.isfinite(t).all() for t in hv)
    model.train()

    out = measure_sharpness(model, [ids], forward, loss, iters=5, rho=0.05)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out["gauss_newton_lambda_max"] > 0
    assert out["logit_path_norm"] > 0 and out["functional_path_norm"] > 0
    assert all(math.isfinite(out[k]) for k in ("logit_path_norm", "functional_path_norm", "logit_functional_ratio"))
