"""Preconditioned sharpness λ_max(P^{-1/2} H P^{-1/2}) against dense closed forms (float64):
a quadratic with a given diagonal P, and a tiny MLP with P read from real AdamW / Adafactor states."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian
from torch.func import functional_call

from samlm.diagnostics.sharpness import (
    hessian_vector_product,
    measure_sharpness,
    preconditioned_vector_product,
    preconditioner_tensors,
    top_eigenvalue,
)
from samlm.optim import SAM

DT = torch.float64


def dense_top(h, p_diag):
    """λ_max(diag(P)^{-1/2} H diag(P)^{-1/2}) by eigvalsh."""
    s = p_diag.rsqrt()
    return torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1].item()


# ---------------------------------------------------------------------------------------------- quadratic ½ wᵀAw


class Quadratic(torch.nn.Module):
    """L(w) = ½ wᵀAw over two parameter tensors (6 weights in all); the "outputs" are w itself."""

    def __init__(self, a):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.u = torch.nn.Parameter(torch.randn(2, generator=g, dtype=DT))
        self.v = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=DT))
        self.a = a

    def forward(self, batch):
        return torch.cat([self.u.reshape(-1), self.v.reshape(-1)])

    def loss(self, z, batch):
        return 0.5 * z @ self.a @ z


def psd_matrix(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=DT)
    return b @ b.T / n


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_quadratic_matches_the_closed_form(method):
    a = psd_matrix()
    p_flat = torch.tensor([0.3, 2.0, 0.05, 1.0, 4.0, 0.7], dtype=DT)
    model = Quadratic(a)
    params = [model.u, model.v]
    p_of = {id(model.u): p_flat[:2], id(model.v): p_flat[2:].view(2, 2)}
    expected = dense_top(a, p_flat)

    out = measure_sharpness(
        model,
        None,
        model,
        model.loss,
        iters=200 if method == "power" else 6,
        tol=1e-12,
        method=method,
        preconditioner=lambda param: p_of[id(param)],
    )
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-5)
    assert out["hessian_lambda_max"] == pytest.approx(torch.linalg.eigvalsh(a)[-1].item(), rel=1e-5)
    assert out["converged"] and out["iters"] >= out["preconditioned_iters"]

    # the operator itself is P^{-1/2} A P^{-1/2}, column by column
    matvec = preconditioned_vector_product(
        hessian_vector_product(params, None, model, model.loss), [p_of[id(p)] for p in params]
    )
    columns = [torch.cat([t.reshape(-1) for t in matvec([e[:2], e[2:].view(2, 2)])]) for e in torch.eye(6, dtype=DT)]
    s = p_flat.rsqrt()
    assert torch.allclose(torch.stack(columns, 1), s[:, None] * a * s[None, :], atol=1e-12)


def test_identity_preconditioner_gives_the_hessian_and_bad_ones_are_refused():
    a = psd_matrix(seed=1)
    model = Quadratic(a)
    out = measure_sharpness(
        model, None, model, model.loss, iters=6, tol=1e-12, preconditioner=lambda p: torch.ones_like(p)
    )
    assert out["preconditioned_lambda_max"] == pytest.approx(out["hessian_lambda_max"], rel=1e-10)
    with pytest.raises(ValueError, match="positive and finite"):
        measure_sharpness(model, None, model, model.loss, iters=2, preconditioner=lambda p: torch.zeros_like(p))
    with pytest.raises(ValueError, match="shape"):
        measure_sharpness(model, None, model, model.loss, iters=2, preconditioner=lambda p: torch.ones(3, dtype=DT))
    params = [model.u, model.v]
    assert preconditioner_tensors(lambda p: None, params) is None


# ---------------------------------------------------------------------------------------------- real optimizer states


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = MLP().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    return model, batch, (lambda b: model(b[0])), (lambda z, b: F.cross_entropy(z, b[1]))


def dense_hessian(model, batch, loss):
    """H over all parameters, flattened in model.parameters() order, by autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(w):
        tensors = [c.view(s) for c, s in zip(w.split([s.numel() for s in shapes]), shapes)]
        return loss(functional_call(model, dict(zip(names, tensors)), (batch[0],)), batch)

    return hessian(flat_loss, w0)


def train_a_few_steps(model, optimizer, batch, forward, loss, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        loss(forward(batch), batch).backward()
        optimizer.step()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def adam_p(optimizer):
    """P = √(v / (1 − β₂ᵏ)) + eps, written out from AdamW's state (independent of samlm's reader)."""
    group = optimizer.param_groups[0]
    out = []
    for p in group["params"]:
        state = optimizer.state[p]
        k = float(state["step"])
        out.append((state["exp_avg_sq"] / (1 - group["betas"][1] ** k)).sqrt() + group["eps"])
    return flat(out)


def test_adamw_state_matches_a_dense_computation():
    model, batch, forward, loss = mlp_problem()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3)

    before = measure_sharpness(model, batch, forward, loss, iters=3, preconditioner=optimizer)
    assert "preconditioned_lambda_max" not in before and "preconditioned_iters" not in before  # no moments yet

    train_a_few_steps(model, optimizer, batch, forward, loss)
    out = measure_sharpness(model, batch, forward, loss, iters=31, tol=1e-12, preconditioner=optimizer)
    expected = dense_top(dense_hessian(model, batch, loss), adam_p(optimizer))
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)
    assert out["preconditioned_lambda_max"] != pytest.approx(out["hessian_lambda_max"], rel=1e-2)  # P matters

    # a SAM wrapper is read through its base optimizer
    wrapped = measure_sharpness(model, batch, forward, loss, iters=31, tol=1e-12, preconditioner=SAM(optimizer))
    assert wrapped["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)


def test_sgd_has_no_preconditioner():
    model, batch, forward, loss = mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_a_few_steps(model, optimizer, batch, forward, loss, steps=1)
    assert "preconditioned_lambda_max" not in measure_sharpness(
        model, batch, forward, loss, iters=2, preconditioner=optimizer
    )


def test_half_precision_state_is_measured_in_float32_and_the_model_restored():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    batch = (torch.randn(8, 3), torch.randint(0, 3, (8,)))

    def forward(b):  # the weights are float32 while measured
        return model(b[0].to(model.out.weight.dtype))

    def loss(z, b):
        return F.cross_entropy(z.float(), b[1])

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, eps=1e-3)
    train_a_few_steps(model, optimizer, batch, forward, loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_sharpness(model, batch, forward, loss, iters=4, preconditioner=optimizer)
    assert out["preconditioned_lambda_max"] > 0
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def torch_adafactor_p(optimizer):
    """torch.optim.Adafactor: v̂ = row ⊗ col / mean(row) for matrices, the full variance for vectors."""
    eps1 = torch.finfo(DT).eps
    out = []
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        if p.dim() >= 2:
            v = state["row_var"] @ state["col_var"] / state["row_var"].mean().clamp(min=eps1)
        else:
            v = state["variance"]
        out.append(v.clamp(min=eps1 * eps1).sqrt())
    return flat(out)


def hf_adafactor_p(optimizer):
    """transformers.Adafactor: v̂ = (row / mean(row)) ⊗ col for matrices, exp_avg_sq for vectors."""
    out = []
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        if p.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            v = torch.outer(row / row.mean(), col)
        else:
            v = state["exp_avg_sq"]
        out.append(v.sqrt())
    return flat(out)


def build_hf_adafactor(params):
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(
        params, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False
    )


@pytest.mark.parametrize(
    "build, reference",
    [
        pytest.param(
            lambda params: torch.optim.Adafactor(params, lr=1e-2),
            torch_adafactor_p,
            id="torch",
            marks=pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch without Adafactor"),
        ),
        pytest.param(build_hf_adafactor, hf_adafactor_p, id="transformers"),
    ],
)
def test_factored_adafactor_moments_match_a_dense_computation(build, reference):
    model, batch, forward, loss = mlp_problem(seed=4)
    optimizer = build(model.parameters())
    train_a_few_steps(model, optimizer, batch, forward, loss)
    out = measure_sharpness(model, batch, forward, loss, iters=31, tol=1e-12, preconditioner=optimizer)
    expected = dense_top(dense_hessian(model, batch, loss), reference(optimizer))
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)


def test_the_operator_from_an_optimizer_state_matches_a_dense_computation():
    model, batch, forward, loss = mlp_problem(seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3)
    train_a_few_steps(model, optimizer, batch, forward, loss)
    params = list(model.parameters())
    matvec = preconditioned_vector_product(
        hessian_vector_product(params, batch, forward, loss), preconditioner_tensors(optimizer, params)
    )
    lanczos = top_eigenvalue(matvec, params, iters=31, tol=1e-12)
    expected = dense_top(dense_hessian(model, batch, loss), adam_p(optimizer))
    assert lanczos.value == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------------------------------------- harness and CLI


TINY = dict(
    layers=1,
    width=16,
    heads=2,
    context=8,
    batch=4,
    max_chars=4000,
    val_batches=1,
    sharpness_iters=3,
    sharpness_batch_size=2,
    progress=False,
)


def tiny_run(tmp_path, **overrides):
    from samlm.harness.pretrain import PretrainConfig, pretrain

    out = tmp_path / "run"
    pretrain(PretrainConfig(**dict(TINY, out=str(out), **overrides)))
    return out


def sharpness_cli(argv, capsys):
    from samlm.cli import main

    code = main(["sharpness", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_sharpness_probe_passes_the_run_optimizer(monkeypatch):
    import samlm.diagnostics
    from samlm.harness.pretrain.build import SHARPNESS_KEYS, sharpness_probe

    assert "preconditioned_lambda_max" in SHARPNESS_KEYS
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    seen = {}

    def fake_measure(model_, batches, forward, loss, **kwargs):
        seen.update(kwargs)
        return {"preconditioned_lambda_max": 1.0, "preconditioned_iters": 3}

    monkeypatch.setattr(samlm.diagnostics, "measure_sharpness", fake_measure)
    out = sharpness_probe([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], optimizer=optimizer)(model)
    assert seen["preconditioner"] is optimizer
    assert out["preconditioned_lambda_max"] == 1.0 and "preconditioned_iters" not in out


@pytest.mark.parametrize("optimizer", ["adamw", "psam"])
def test_sharpness_cli_reports_the_preconditioned_value_from_the_checkpoint(tmp_path, capsys, optimizer):
    from samlm import io
    from samlm.harness.pretrain.measure import load_run as _load_run

    run = tiny_run(tmp_path, optimizer=optimizer, steps=2, sharpness=False, adam_eps=1e-6)
    report = tmp_path / "sharp.json"
    out = sharpness_cli(["--run", str(run), "--iters", "4", "--batch-size", "2", "--json", str(report)], capsys)
    assert "lambda_max(P^-1/2 H P^-1/2) preconditioned" in out
    result = json.loads(report.read_text())
    assert result["preconditioned_lambda_max"] > 0

    # the state loaded is the checkpoint's: P equals the saved base optimizer's √v̂ + eps
    _, _, loaded, _, _ = _load_run(run)
    saved = io.load_latest_checkpoint(run / "checkpoints").extra_state["optimizer"]
    saved = saved.get("base_optimizer", saved)
    base = getattr(loaded, "base_optimizer", loaded)
    for index, p in enumerate(base.param_groups[0]["params"]):
        assert torch.equal(base.state[p]["exp_avg_sq"], saved["state"][index]["exp_avg_sq"])


def test_sharpness_cli_leaves_the_row_out_without_moments(tmp_path, capsys):
    from samlm.cli.sharpness import format_measurement

    run = tiny_run(tmp_path, optimizer="sgd", steps=1, sharpness=False)
    out = sharpness_cli(["--run", str(run), "--iters", "2", "--batch-size", "2"], capsys)
    assert "lambda_max(H)" in out and "preconditioned" not in out
    text = format_measurement(
        {
            "model": "m",
            "step": None,
            "batches": 1,
            "batch_size": 2,
            "context": 8,
            "method": "lanczos",
            "hessian_lambda_max": 1.0,
        }
    )
    assert "preconditioned" not in text


# ---------------------------------------------------------------------------------------------- Muon's geometry


def muon_gain_matrix(momentum, scale):
    """Q with Q·M = scale·NS(M) on the wide side, from Newton–Schulz itself (float64):
    Q = scale·NS(M)·Mᵀ(MMᵀ)⁻¹ for a full-row-rank wide M (independent of samlm's eigen-route)."""
    from samlm.optim.preconditioners import newton_schulz

    m = momentum.T if momentum.size(0) > momentum.size(1) else momentum
    ns = newton_schulz(m, dtype=DT)
    return scale * torch.linalg.solve(m @ m.T, m @ ns.T).T


def test_muon_frozen_geometry_maps_the_momentum_to_muons_step():
    """P⁻¹M = scale·NS(M) for a wide and a tall matrix, with NS run in float64 by samlm.newton_schulz."""
    from samlm.optim.preconditioners import Orthogonalized, newton_schulz

    geometry = Orthogonalized(scale=0.7)
    for shape in ((3, 5), (6, 2)):
        m = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=DT)
        frozen = geometry.frozen(m)
        p_inv_m = frozen.apply_inverse_sqrt(frozen.apply_inverse_sqrt(m))
        expected = 0.7 * newton_schulz(m, geometry.coefficients, geometry.steps, dtype=DT)
        torch.testing.assert_close(p_inv_m, expected, rtol=1e-9, atol=1e-12)
        side = frozen.inverse_sqrt
        torch.testing.assert_close(side, side.T)  # symmetric
        assert bool((torch.linalg.eigvalsh(side) > 0).all())  # positive definite
    # rank-deficient (a head's gradient: rows summing to zero): still finite and positive definite,
    # NS's own small-σ gain a^steps along the null direction
    m = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    m = m - m.mean(dim=0, keepdim=True)
    frozen = geometry.frozen(m)
    p_inv = frozen.inverse_sqrt @ frozen.inverse_sqrt
    torch.testing.assert_close(p_inv @ m, 0.7 * newton_schulz(m, dtype=DT), rtol=1e-9, atol=1e-12)
    null = torch.ones(3, dtype=DT) / 3**0.5
    assert float(null @ p_inv @ null) == pytest.approx(0.7 * 3.4445**5 / float(m.norm()), rel=1e-6)


def test_muon_and_adamw_states_match_a_dense_computation():
    """λ_max(P⁻¹H) with Muon on both weight matrices (one tall, one wide) and AdamW on the bias:
    P⁻¹ block-diagonal, Muon's blocks Q ⊗ I (wide) or I ⊗ Q (tall) from the momentum, AdamW's 1/P."""
    from samlm.optim import build_optimizer
    from samlm.optim.preconditioners import muon_lr_ratio

    torch.manual_seed(0)
    # a tall (5x3) and a wide (4x5) hidden matrix for Muon; the classifier (a head) and biases for AdamW.
    # (A head's gradient has rows summing to zero, so its momentum is rank-deficient: Muon's recipe keeps it out.)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh())
    model.add_module("classifier", torch.nn.Linear(4, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    forward, loss = (lambda b: model(b[0])), (lambda z, b: F.cross_entropy(z, b[1]))
    sam = build_optimizer("psam", model, base="muon", lr=0.05, rho=0.05)
    muon, adamw = sam.base_optimizer.optimizers
    before = measure_sharpness(model, batch, forward, loss, iters=3, preconditioner=sam)
    assert "preconditioned_lambda_max" not in before  # no momentum, no moments yet
    for _ in range(3):
        sam.train_step(batch, forward, loss)
    out = measure_sharpness(model, batch, forward, loss, iters=80, tol=1e-12, preconditioner=sam)

    blocks = []
    for name, p in model.named_parameters():
        if p.ndim == 2 and not name.startswith("classifier"):
            group = muon.param_groups[0]
            q = muon_gain_matrix(muon.state[p]["momentum_buffer"], muon_lr_ratio(group["adjust_lr_fn"], p.shape))
            tall = p.size(0) > p.size(1)
            blocks.append(
                torch.kron(torch.eye(p.size(0), dtype=DT), q) if tall else torch.kron(q, torch.eye(p.size(1), dtype=DT))
            )
        else:
            state, group = adamw.state[p], adamw.param_groups[0]
            assert p in adamw.state and not any(p is m for m in muon.param_groups[0]["params"])
            v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
            blocks.append(torch.diag(1 / (v_hat.sqrt() + group["eps"]).reshape(-1)))
    p_inv = torch.block_diag(*blocks)
    values, vectors = torch.linalg.eigh((p_inv + p_inv.T) / 2)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    h = dense_hessian(model, batch, loss)
    expected = torch.linalg.eigvalsh(root @ h @ root)[-1].item()
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)
    assert out["preconditioned_lambda_max"] != pytest.approx(out["hessian_lambda_max"], rel=1e-2)
