"""The SAM family around Muon: several base optimizers under one wrapper, Muon's
geometry for the perturbation (its Newton–Schulz orthogonalization), the spectral-ball rule, the
diagonal-preconditioner readers of torch.optim's adaptive optimizers, and --base muon through
the commands."""

from __future__ import annotations

import json
import math

import pytest
import torch

import samlm
from samlm import cli
from samlm.optim import CombinedOptimizer, build_optimizer, muon_split, newton_schulz, train_step
from samlm.optim.preconditioners import MUON_COEFFICIENTS, Preconditioners, muon_lr_ratio
from samlm.optim.registry import SAM_FAMILY

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon (torch >= 2.9)")

TINY_PRETRAIN = [
    "--layers",
    "1",
    "--width",
    "16",
    "--heads",
    "2",
    "--context",
    "8",
    "--batch",
    "4",
    "--max-chars",
    "4000",
    "--val-batches",
    "1",
    "--no-sharpness",
    "--no-progress",
    "--eval-every",
    "0",
]


def mlp(seed=0):
    """Two hidden matrices (Muon's) between an input and an output layer with biases (AdamW's)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 12, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 8, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 4),
    )


def hidden_and_rest(model):
    hidden = [model[2].weight, model[4].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return hidden, rest


def bases(model, lr=1e-2, adjust="match_rms_adamw"):
    hidden, rest = hidden_and_rest(model)
    return [
        torch.optim.Muon(hidden, lr=lr, weight_decay=0.01, adjust_lr_fn=adjust),
        torch.optim.AdamW(rest, lr=lr, weight_decay=0.01),
    ]


def batches(n=6, rows=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g), torch.randint(0, 4, (rows,), generator=g)) for _ in range(n)]


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def forward_of(model):
    return lambda batch: model(batch[0])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- several base optimizers under one wrapper --------------------------------------------------------
def test_global_perturbation_norm_runs_over_every_base():
    model = mlp()
    opt = samlm.SAM(bases(model), rho=0.07)
    batch = batches(1)[0]
    ce(model(batch[0]), batch).backward()
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    eps = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    for e, gi in zip(eps, g):
        torch.testing.assert_close(e, 0.07 * gi / norm, rtol=1e-5, atol=1e-7)  # (w+ε)−w in float32
    opt.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_param_groups_are_every_bases_groups_and_schedulers_move_them():
    model = mlp()
    muon, adamw = bases(model, lr=0.1)
    opt = samlm.FunctionalSAM([muon, adamw], rho=0.05)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0] is muon.param_groups[0] and opt.param_groups[1] is adamw.param_groups[0]
    assert opt.base_optimizers == (muon, adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.train_step(batches(1)[0], forward_of(model), ce)
    sched.step()
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "method", [samlm.SAM, samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM, samlm.SpectralSAM]
)
def test_state_dict_nests_every_base_and_resume_mid_cycle_is_bitwise(method, tmp_path):
    """sam_every=3: stop after 4 steps (in the middle of a cycle), save, load into a fresh
    optimizer; the next steps equal the uninterrupted run's bitwise."""
    data = batches(7)
    model = mlp()
    kw = dict(rho=0.05, sam_every=3)
    opt = method(bases(model), **kw)
    for batch in data[:4]:
        opt.train_step(batch, forward_of(model), ce)
    state = opt.state_dict()
    assert state["base_optimizer"]["classes"] == ["Muon", "AdamW"]
    muon_state = state["base_optimizer"]["optimizers"][0]["state"]
    assert muon_state and all("momentum_buffer" in s for s in muon_state.values())
    path = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "opt": state}, path)
    for batch in data[4:]:
        opt.train_step(batch, forward_of(model), ce)
    expected = flat(model)

    saved = torch.load(path, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = method(bases(model2), **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.counters == {**opt.counters, "steps": 4, "sam_steps": 2, "plain_steps": 2}
    for batch in data[4:]:
        opt2.train_step(batch, forward_of(model2), ce)
    assert torch.equal(flat(model2), expected)
    assert opt2.counters == opt.counters


@pytest.mark.parametrize(
    "method",
    [samlm.SAM, samlm.PreconditionedSAM, samlm.SpectralSAM, samlm.FunctionalSAM, samlm.PreconditionedFunctionalSAM],
)
def test_rho_zero_equals_the_plain_bases_steps(method):
    data = batches(3)
    a, b = mlp(), mlp()
    sam = method(bases(a), rho=0.0, ascent_fraction=0.5)
    plain = bases(b)
    for batch in data:
        sam.train_step(batch, forward_of(a), ce)
        train_step(plain, batch, forward_of(b), ce)  # a list of plain optimizers steps together
    if method.descent_rule.needs_clean_cotangent:  # J(w)ᵀr(w) by a VJP: equal up to rounding
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(flat(a), flat(b))


def test_every_k_schedule_with_several_bases():
    model = mlp()
    opt = samlm.PreconditionedSAM(bases(model), rho=0.05, sam_every=2, sam_start=1)
    kinds = [opt.train_step(batch, forward_of(model), ce).sam_step for batch in batches(5)]
    assert kinds == [False, True, False, True, False]
    assert opt.counters["sam_steps"] == 2 and opt.counters["plain_steps"] == 3


def test_a_parameter_in_two_bases_is_a_one_line_error():
    model = mlp()
    with pytest.raises(ValueError, match=r"a parameter of shape \(12, 10\) is in two base optimizers") as info:
        samlm.SAM([torch.optim.Muon([model[2].weight]), torch.optim.AdamW(model.parameters())], rho=0.05)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="already a SAM optimizer"):
        samlm.SAM([samlm.SAM(torch.optim.AdamW(model.parameters()), rho=0.1)])


def test_combined_optimizer_refuses_foreign_groups_and_nests_its_state():
    model = mlp()
    combined = CombinedOptimizer(bases(model))
    with pytest.raises(ValueError, match="add the parameter group to one of the base optimizers"):
        combined.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="2 combined base optimizers"):
        combined.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    other = CombinedOptimizer(
        [torch.optim.AdamW(hidden_and_rest(model)[0]), torch.optim.AdamW(hidden_and_rest(model)[1])]
    )
    with pytest.raises(ValueError, match="Muon"):
        combined.load_state_dict(other.state_dict())


# -- the Muon split -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_muon_split_gives_muon_the_hidden_matrices_only(arch, tied):
    from samlm.models import build_decoder

    model = build_decoder(arch, layers=2, width=16, heads=2, context=8, vocab_size=40, tie_embeddings=tied)
    matrices, others = muon_split(model)
    ids = {id(p) for p in matrices}
    assert all(p.ndim == 2 for p in matrices) and matrices
    assert id(model.get_input_embeddings().weight) not in ids
    assert id(model.get_output_embeddings().weight) not in ids
    assert all(id(p) not in ids for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert len({id(p) for p in model.parameters()}) == len(matrices) + len(others)  # each once
    per_layer = 4 if arch == "gpt2" else 7  # gpt2: qkv, proj, fc, proj; llama: q, k, v, o, gate, up, down
    assert len(matrices) == 2 * per_layer


def test_base_muon_with_no_hidden_matrix_is_a_one_line_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="has no hidden 2-D weight matrix for Muon") as info:
        build_optimizer("sam", model, base="muon", lr=1e-3)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs the model"):
        build_optimizer("muon", model.parameters(), lr=1e-3)


def test_build_optimizer_muon_uses_one_lr_for_both():
    model = mlp()
    opt = build_optimizer("pfsam", model, base="muon", lr=3e-3, weight_decay=0.1)
    muon, adamw = opt.base_optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == 3e-3
    plain = build_optimizer("muon", model, lr=3e-3)
    assert isinstance(plain, CombinedOptimizer)


# -- Muon's orthogonalization ----------------------------------------------------------------------------
def polar(g):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_newton_schulz_is_muons_own_and_near_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    x = newton_schulz(g)
    from torch.optim._muon import _zeropower_via_newtonschulz

    assert torch.equal(x, _zeropower_via_newtonschulz(g, MUON_COEFFICIENTS, 5, 1e-7).to(g.dtype))
    # Muon's quintic: X = U S' Vᵀ with S' near 1 (not exactly), the singular vectors of G's
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s_prime = u.T @ x.double() @ vh.T
    diag = torch.diagonal(s_prime)
    assert ((diag > 0.5) & (diag < 1.3)).all()
    torch.testing.assert_close(s_prime, torch.diag(diag), atol=0.03, rtol=0)
    cosine = (x.double() * polar(g)).sum() / (x.double().norm() * polar(g).norm())
    assert cosine > 0.95
    # The convergent cubic iteration X ← 1.5X − 0.5XXᵀX in float64 reaches UVᵀ itself
    exact = newton_schulz(g.double(), (1.5, -0.5, 0.0), steps=60, dtype=torch.float64)
    torch.testing.assert_close(exact, polar(g), atol=1e-8, rtol=0)


def test_preconditioned_eps_with_muon_is_muons_direction_and_adams_in_one_frobenius_ball():
    """u = s·NS(g) on Muon's matrices (s: Muon's lr ratio), g/P on AdamW's; ε = ρ u/‖u‖."""
    model = mlp()
    muon, adamw = bases(model)
    opt = samlm.PreconditionedSAM([muon, adamw], rho=0.06)
    for batch in batches(2):
        opt.train_step(batch, forward_of(model), ce)
    batch = batches(1, seed=9)[0]
    opt.zero_grad()
    ce(model(batch[0]), batch).backward()
    hidden, _ = hidden_and_rest(model)
    u = []
    for p in model.parameters():
        if any(p is h for h in hidden):
            u.append(muon_lr_ratio("match_rms_adamw", p.shape) * newton_schulz(p.grad))
        else:
            state = adamw.state[p]
            k = float(state["step"])
            u.append(p.grad / ((state["exp_avg_sq"] / (1 - 0.999**k)).sqrt() + 1e-8))
    w = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    eps = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    total = torch.sqrt(sum(e.double().square().sum() for e in eps))
    assert float(total) == pytest.approx(0.06, rel=1e-5)
    scale = 0.06 / torch.sqrt(sum(x.square().sum() for x in u))
    for e, x in zip(eps, u):
        torch.testing.assert_close(e, scale * x, rtol=1e-4, atol=1e-7)
    opt.restore()


def test_spectral_eps_is_rho_times_ns_per_matrix_from_the_first_step():
    """ε_i = ρ·NS(G_i) on Muon's matrices (operator norm ≈ ρ, Frobenius ≈ ρ√rank), 0 elsewhere,
    even before AdamW has moments."""
    model = mlp()
    opt = samlm.SpectralSAM(bases(model), rho=0.01)
    batch = batches(1)[0]
    ce(model(batch[0]), batch).backward()
    hidden, _ = hidden_and_rest(model)
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    w = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    for p, w0 in zip(model.parameters(), w):
        e = p.detach() - w0
        if any(p is h for h in hidden):
            torch.testing.assert_close(e, 0.01 * newton_schulz(grads[id(p)]), rtol=1e-5, atol=1e-7)
            spectral = torch.linalg.matrix_norm(e.double(), ord=2)
            assert 0.005 < float(spectral) < 0.013
            rank = min(p.shape)
            assert float(e.norm()) == pytest.approx(0.01 * math.sqrt(rank), rel=0.35)
        else:
            assert not e.any()
    opt.restore()
    with pytest.raises(ValueError, match="needs a Muon base"):
        samlm.SpectralSAM(torch.optim.AdamW(model.parameters()), rho=0.01)


def test_preconditioned_sam_without_a_geometry_reader_is_a_one_line_error():
    model = mlp()
    with pytest.raises(ValueError, match="needs a base optimizer with second moments.*Muon, SGD") as info:
        samlm.PreconditionedSAM([bases(model)[0], torch.optim.SGD(hidden_and_rest(model)[1], lr=0.1)])
    assert "\n" not in str(info.value)


def test_muon_matrices_have_no_diagonal_p_but_a_frozen_operator_for_the_sharpness_diagnostics():
    from samlm.optim.preconditioners import FrozenMuon

    model = mlp()
    opt = samlm.PreconditionedSAM(bases(model), rho=0.05)
    for batch in batches(2):
        opt.train_step(batch, forward_of(model), ce)
    view = Preconditioners(opt.base_optimizer, list(model.parameters()))
    hidden, rest = hidden_and_rest(model)
    assert view.available and all(view(p) is None for p in hidden) and all(view(p) is not None for p in rest)
    assert all(isinstance(view.frozen(p), FrozenMuon) for p in hidden)
    assert all(torch.equal(view.frozen(p), view(p)) for p in rest)


# -- diagonal readers: P is each optimizer's own update denominator ------------------------------------
DIAGONAL = {
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-3),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-3),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-3),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, eps=1e-3),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, eps=1e-3, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, eps=1e-3),
}


@pytest.mark.parametrize("name", list(DIAGONAL))
def test_diagonal_reader_is_the_optimizers_own_denominator(name):
    """With β₁ = 0 (or no momentum) each step is Δw = −c·g/P elementwise: P is what it divides by
    (eps = 1e-3, large enough that a reader leaving it out fails). RAdam is read after its
    rectification switches on (step 7 for β₂ = 0.99)."""
    model = mlp()
    base = DIAGONAL[name](list(model.parameters()))
    for batch in batches(7):
        base.zero_grad()
        ce(model(batch[0]), batch).backward()
        before = [p.detach().clone() for p in model.parameters()]
        base.step()
    view = Preconditioners(base, list(model.parameters()))
    assert view.available
    for p, w0 in zip(model.parameters(), before):
        step, direction = w0 - p.detach(), p.grad / view(p)
        c = (step * direction).sum() / direction.square().sum()
        assert c > 0
        torch.testing.assert_close(step, c * direction, rtol=1e-3, atol=1e-5 * step.abs().max().item())
    opt = samlm.PreconditionedSAM(base, rho=0.05)
    stats = opt.train_step(batches(1)[0], forward_of(model), ce)
    assert stats.eps_norm == pytest.approx(0.05, rel=1e-5)


# -- --base muon through the commands -------------------------------------------------------------------
def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("name", ["muon", *SAM_FAMILY])
def test_pretrain_runs_every_registered_method_with_base_muon(name, tmp_path):
    out = tmp_path / name
    assert (
        run_cli(
            "pretrain",
            *TINY_PRETRAIN,
            "--optimizer",
            name,
            "--base",
            "muon",
            "--steps",
            3,
            "--save-every",
            2,
            "--out",
            out,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == name and summary["completed"]
    assert json.loads((out / "config.json").read_text())["config"]["base"] == "muon"


def test_pretrain_base_muon_ctrl_c_then_resume_is_bitwise(tmp_path):
    """pfsam around Muon+AdamW, every-2 schedule: interrupted after step 3 (mid-cycle), resumed."""
    import os
    import signal

    from safetensors.torch import load_file

    from samlm import io
    from samlm.harness.pretrain.config import PretrainConfig
    from samlm.harness.pretrain.run import pretrain

    settings = dict(
        layers=1,
        width=16,
        heads=2,
        context=8,
        batch=4,
        max_chars=4000,
        val_batches=1,
        sharpness=False,
        progress=False,
        eval_every=0,
        optimizer="pfsam",
        base="muon",
        steps=6,
        save_every=3,
        sam_every=2,
    )
    straight = pretrain(PretrainConfig(out=str(tmp_path / "straight"), **settings))

    def ctrl_c_after_step_3(step, stats):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = pretrain(PretrainConfig(out=str(tmp_path / "resumed"), **settings), on_step=ctrl_c_after_step_3)
    assert not stopped["completed"] and stopped["step"] == 3
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "resumed"), resume=True, **settings))
    assert resumed["completed"] and resumed["val_loss"] == straight["val_loss"]

    def weights(run):
        ((_, path),) = io.checkpoint_dirs(tmp_path / run / "checkpoints")[-1:]
        return load_file(str(path / "model.safetensors"))

    a, b = weights("straight"), weights("resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_runs_every_method_with_base_muon(tmp_path):
    out = tmp_path / "cmp"
    assert (
        run_cli(
            "compare",
            *TINY_PRETRAIN,
            "--optimizers",
            ",".join(["muon", *SAM_FAMILY]),
            "--base",
            "muon",
            "--steps",
            1,
            "--out",
            out,
        )
        == 0
    )
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in ["muon", *SAM_FAMILY])


def test_bench_times_every_method_with_base_muon(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        run_cli(
            "bench",
            "--base",
            "muon",
            "--methods",
            ",".join(SAM_FAMILY),
            "--layers",
            1,
            "--width",
            8,
            "--heads",
            1,
            "--batch",
            4,
            "--context",
            4,
            "--steps",
            1,
            "--untimed-steps",
            0,
            "--no-memory",
            "--json",
            out,
        )
        == 0
    )
    text = out.read_text()
    assert all(name in text for name in SAM_FAMILY) and "muon" in text


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_sam_trainer_takes_a_sam_optimizer_around_muon(name, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from samlm.integrations.hf import SAMTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(name, model, base="muon", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 32, (8, 8))]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    assert trainer.sam_optimizer is opt and opt.counters["steps"] == 2
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "transformer.wte.weight" in moved and "transformer.h.0.attn.c_attn.weight" in moved  # AdamW's, Muon's


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_sam_trainer_builds_each_method_around_muon(name, tmp_path):
    """sam_base="muon": Muon on the hidden matrices, AdamW with Trainer's decay groups on the rest,
    both at args.learning_rate; every method trains both halves."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from samlm.integrations.hf import SAMTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 32, (8, 8))]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=3e-3,
        weight_decay=0.1,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, sam_method=name, sam_base="muon", rho=0.05)
    trainer.train()
    sam = trainer.sam_optimizer
    muon, adamw = sam.base_optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW) and sam.counters["steps"] == 2
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert "transformer.h.0.attn.c_attn.weight" in muon_names and "transformer.wte.weight" not in muon_names
    decayed, undecayed = ({names[id(p)] for p in g["params"]} for g in adamw.param_groups)
    assert "transformer.wte.weight" in decayed and "transformer.ln_f.weight" in undecayed
    assert adamw.param_groups[1]["weight_decay"] == 0.0 and muon.param_groups[0]["weight_decay"] == 0.1
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "transformer.wte.weight" in moved and "transformer.h.0.attn.c_attn.weight" in moved


def test_sam_trainer_refuses_an_unknown_base_and_a_base_beside_its_own_optimizer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from samlm.integrations.hf import SAMTrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="sam_base must be one of"):
        SAMTrainer(model=model, args=args, sam_base="lion")
    opt = build_optimizer("sam", model, base="muon", lr=1e-2)
    with pytest.raises(ValueError, match="not both"):
        SAMTrainer(model=model, args=args, optimizers=(opt, None), sam_base="muon")


def test_base_muon_bad_inputs_are_one_line_errors(capsys, tmp_path):
    from samlm.errors import UserError
    from samlm.harness.pretrain.config import PretrainConfig
    from samlm.harness.settings import build_run_optimizer

    config = PretrainConfig(out=str(tmp_path / "x"), optimizer="psam", base="muon")
    no_matrices = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(UserError, match="no hidden 2-D weight matrix for Muon"):
        build_run_optimizer(config, no_matrices, total_steps=2)
    assert run_cli("bench", "--base", "muon", "--methods", "peer_sam,sam", "--steps", 1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samlm: error:") and "peer_sam" in err and "\n" not in err


# -- the pretraining study around each base ---------------------------------------------------------------
def test_pretrain_study_runs_the_protocol_around_each_base(tmp_path):
    """--bases adamw,muon: the sweep and the final stage around each base, the plain base the
    reference (its lr grid is AdamW's), Muon's under OUT/<size>/muon/; one report table per base."""
    import dataclasses

    from samlm.studies import pretrain_study as ps

    base = dataclasses.replace(
        ps.PRESETS["cpu"].base,
        steps=4,
        tokens_per_param=None,
        eval_every=2,
        val_batches=2,
        batch=4,
        context=16,
        max_chars=20_000,
        sharpness_iters=3,
        sharpness_batch_size=2,
    )
    preset = dataclasses.replace(
        ps.PRESETS["cpu"],
        sizes=(ps.ModelSize("1x16", 1, 16, 2),),
        base=base,
        lr="adamw=1e-2,adamw=3e-2,pfsam=1e-2",
        rho="pfsam=0.05,pfsam=0.1",
        seeds=(0,),
        jobs=1,
    )
    study = ps.PretrainStudy(
        out=str(tmp_path / "study"), preset=preset, optimizers=["adamw", "pfsam"], bases=ps.parse_bases("adamw,muon")
    )
    result = ps.run_study(study)
    assert result.interrupted is None and set(result.chosen) == {"1x16", "1x16/muon"}
    assert set(result.chosen["1x16/muon"]) == {"muon", "pfsam"}
    muon_sweep = result.stages["1x16/muon/sweep"]
    assert len(muon_sweep.summaries) == 4 and sum(n.startswith("muon-") for n in muon_sweep.summaries) == 2
    assert (tmp_path / "study" / "1x16" / "muon" / "final").is_dir()
    for name, summary in result.stages["1x16/muon/final"].summaries.items():
        assert summary["config"]["base"] == "muon"
        if not name.endswith("equal-compute"):
            assert summary["hessian_lambda_max"] is not None and summary["preconditioned_lambda_max"] > 0
    text = (tmp_path / "study" / "report.md").read_text()
    assert "## 1x16: 1 layers × 16 wide, 2 heads\n" in text and "around Muon+AdamW" in text
    assert "Δ vs Muon (equal steps)" in text and "| muon " in text
    with pytest.raises(Exception, match="--bases must be"):
        ps.parse_bases("adamw,lion")
