"""The SAM family's guarantees: checkpointing, schedulers, non-finite values, bad arguments, flatness."""

import copy
import io

import pytest
import torch

import samlm

METHODS = [samlm.SAM, samlm.ASAM, samlm.FunctionalSAM, samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM]


def make_problem(seed=0, rows=16):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))
    x = torch.randn(rows, 6)
    y = torch.randint(0, 5, (rows,))
    return model, (x, y)


def forward_of(model):
    return lambda batch: model(batch[0])


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def batches(n, seed=100):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_continues_bitwise_identically(method):
    """state_dict carries the base optimizer's moments; a resumed run equals an uninterrupted one."""
    data = batches(6)
    model, _ = make_problem(1)
    straight = copy.deepcopy(model)
    opt = method(torch.optim.AdamW(straight.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for batch in data:
        opt.train_step(batch, forward_of(straight), ce)
        sched.step()

    first = copy.deepcopy(model)
    opt = method(torch.optim.AdamW(first.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for batch in data[:3]:
        opt.train_step(batch, forward_of(first), ce)
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved["model"])
    opt = method(torch.optim.AdamW(resumed.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert opt.param_groups is opt.base_optimizer.param_groups
    for batch in data[3:]:
        opt.train_step(batch, forward_of(resumed), ce)
        sched.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.counters["steps"] == 6


def test_state_dict_nests_base_moments_and_holds_nothing_transient():
    model, batch = make_problem()
    opt = samlm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.train_step(batch, forward_of(model), ce)
    state = opt.state_dict()
    base_state = state["base_optimizer"]["state"]
    assert set(base_state[0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(state) == {"base_optimizer", "counters", "config"}
    assert state["config"]["rho"] == 0.05 and state["config"]["ascent_fraction"] == 0.25


def test_plain_optimizer_state_dict_loads_into_the_base():
    model, batch = make_problem()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    samlm.train_step(plain, batch, forward_of(model), ce)
    opt = samlm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.load_state_dict(plain.state_dict())
    assert torch.equal(
        opt.base_optimizer.state_dict()["state"][0]["exp_avg_sq"], plain.state_dict()["state"][0]["exp_avg_sq"]
    )


def test_lr_scheduler_acts_on_wrapper_or_base_alike():
    model, batch = make_problem()
    opt = samlm.FunctionalSAM(torch.optim.AdamW(model.parameters(), lr=1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.train_step(batch, forward_of(model), ce)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    base_sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda step: 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    del base_sched


def test_scheduler_does_not_warn_that_step_was_skipped():
    model, batch = make_problem()
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.train_step(batch, forward_of(model), ce)
        sched.step()


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_ascent_gradient_gives_an_unperturbed_step_never_nan_weights(method):
    model, batch = make_problem(2)
    opt = method(torch.optim.AdamW(model.parameters(), lr=1e-2))
    calls = []

    def loss(outputs, b):
        calls.append(1)
        value = ce(outputs, b)
        return value * float("nan") if len(calls) == 1 else value  # only the ascent pass is poisoned

    stats = opt.train_step(batch, forward_of(model), loss)
    assert stats.ascent_nonfinite and stats.eps_norm == 0.0
    # Standard descent: ε = 0, the step proceeds at w. Functional descent: the same clean pass
    # also gave r(w), now non-finite, so its descent is non-finite and the step is skipped.
    assert stats.skipped == opt.descent_rule.needs_clean_cotangent
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.counters["ascent_nonfinite"] == 1


def test_nonfinite_descent_gradient_skips_the_step_and_counts_it():
    model, batch = make_problem(3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = samlm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    stats = opt.train_step(batch, forward_of(model), lambda out, b: ce(out, b) * float("inf"))
    assert stats.skipped
    assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 0
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)


def test_zero_gradient_gives_an_unperturbed_step():
    model, batch = make_problem(4)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    stats = opt.train_step(batch, forward_of(model), lambda out, b: (out * 0).sum())
    assert stats.grad_norm == 0.0 and stats.eps_norm == 0.0 and not stats.skipped
    assert opt.counters["zero_grad_norm"] == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"ascent_fraction": 0.0}, "ascent_fraction"),
        ({"ascent_fraction": 1.5}, "ascent_fraction"),
        ({"m": 0}, "m must"),
        ({"m": 2.5}, "m must"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match):
    model, _ = make_problem()
    with pytest.raises(ValueError, match=match):
        samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_m_not_dividing_the_batch_and_too_small_batches_are_named():
    model, batch = make_problem(rows=10)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), m=4)
    with pytest.raises(ValueError, match="m=4 must divide the batch size 10"):
        opt.train_step(batch, forward_of(model), ce)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), m=2)
    with pytest.raises(ValueError, match="must divide"):
        opt.train_step((batch[0][:1], batch[1][:1]), forward_of(model), ce)


def test_preconditioner_needs_second_moments():
    model, _ = make_problem()
    with pytest.raises(ValueError, match="needs a base optimizer with second moments.*SGD"):
        samlm.PreconditionedSAM(torch.optim.SGD(model.parameters(), lr=0.1))


def test_wrapper_needs_an_optimizer_and_a_batch_it_understands():
    model, batch = make_problem()
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        samlm.SAM(model.parameters())
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="batch must be a tensor"):
        opt.train_step("not a batch", forward_of(model), ce)
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        opt.train_step((batch[0], batch[1][:3]), forward_of(model), ce)


def test_functional_variants_refuse_the_closure_surface():
    model, _ = make_problem()
    opt = samlm.FunctionalSAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="train_step"):
        opt.step(lambda: None)


@pytest.mark.parametrize(
    "base_factory",
    [
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
        lambda ps: __import__("transformers").optimization.Adafactor(
            ps, lr=1e-2, relative_step=False, scale_parameter=False
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ],
    ids=["torch-adafactor", "hf-adafactor", "sgd"],
)
def test_every_method_trains_with_each_base_optimizer(base_factory):
    for method in METHODS:
        model, batch = make_problem(5)
        base = base_factory(list(model.parameters()))
        if method in (samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM) and isinstance(base, torch.optim.SGD):
            continue
        opt = method(base)
        first = opt.train_step(batch, forward_of(model), ce).loss_perturbed
        for _ in range(15):
            last = opt.train_step(batch, forward_of(model), ce).loss_perturbed
        assert last < first, method.__name__


def top_hessian_eigenvalue(model, x, y):
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(vector):
        chunks, i = [], 0
        for p in params:
            chunks.append(vector[i : i + p.numel()].view_as(p))
            i += p.numel()
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, chunks)), (x,))
        return torch.nn.functional.mse_loss(out, y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    return torch.linalg.eigvalsh(hessian).max().item()


def test_sam_converges_to_a_flatter_minimum_than_its_base_optimizer():
    """The point of SAM: a lower top Hessian eigenvalue than the base optimizer, same data and steps."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(64, 1, dtype=torch.float64)
    init = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def train(sam: bool):
        model = copy.deepcopy(init)
        base = torch.optim.SGD(model.parameters(), lr=0.05)
        opt = samlm.SAM(base, rho=0.1, ascent_fraction=1.0) if sam else base
        for _ in range(1500):
            samlm.train_step(opt, (x, y), lambda b: model(b[0]), lambda out, b: torch.nn.functional.mse_loss(out, b[1]))
        return top_hessian_eigenvalue(model, x, y)

    assert train(sam=True) < 0.8 * train(sam=False)


# -- memory: exact tensor-byte peaks from the profiler's allocation events ---------------------------
def _bench_args(**shape):
    import argparse

    return argparse.Namespace(**shape, rho=None, ascent_fraction=0.25, sam_every=1, device="cpu", dtype="fp32")


ACTIVATION_BOUND = dict(layers=2, width=64, heads=2, vocab=64, batch=8, context=32)
OUTPUT_BOUND = dict(layers=1, width=16, heads=2, vocab=512, batch=8, context=32)  # logits ≫ parameters


@pytest.mark.parametrize("name", ["sam", "asam", "fsam", "psam", "pfsam", "sam_full"])
def test_extra_peak_memory_is_one_parameter_copy(name):
    """Beyond AdamW's own step, a SAM step holds the saved weights w and nothing else."""
    from samlm.studies import bench

    args = _bench_args(**ACTIVATION_BOUND)
    param_mb = sum(p.numel() for p in bench.build_model(args).parameters()) * 4 / 2**20
    extra = bench.peak_memory_mb(args, name) - bench.peak_memory_mb(args, "adamw")
    assert extra == pytest.approx(param_mb, rel=0.01)


@pytest.mark.parametrize("name", ["fsam", "pfsam"])
def test_functional_sam_adds_at_most_its_output_cotangent_where_outputs_dominate(name):
    """F-SAM must keep r(w), one output-sized buffer, from the clean pass to its descent; no
    second copy of it, and neither it nor the logits are held through the backward."""
    from samlm.studies import bench

    args = _bench_args(**OUTPUT_BOUND)
    param_mb = sum(p.numel() for p in bench.build_model(args).parameters()) * 4 / 2**20
    output_mb = args.batch * args.context * args.vocab * 4 / 2**20
    extra = bench.peak_memory_mb(args, name) - bench.peak_memory_mb(args, "adamw")
    assert param_mb < extra <= param_mb + output_mb * 1.01


def test_plain_train_step_peaks_no_higher_than_a_hand_written_loop():
    """samlm.optim.train_step with a plain optimizer does not keep the outputs alive through
    the backward (for an LM they are B×T×V)."""
    from samlm.studies import bench

    args = _bench_args(**OUTPUT_BOUND)
    batch = torch.randint(0, args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))

    def hand_written():
        model = bench.build_model(args)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                bench.lm_loss(model(input_ids=batch).logits, batch).backward()
                opt.step()

        return run

    loop_mb = bench._cpu_peak_tensor_mb(hand_written())
    assert bench.peak_memory_mb(args, "adamw") <= loop_mb * 1.001
