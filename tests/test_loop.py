"""samlm.harness.loop: exact resume, signals, non-finite policy, metrics and checkpoints."""

import math
import os
import signal
import threading

import pytest
import torch

from samlm import io
from samlm.data import LMDataset, lm_loss
from samlm.errors import NonFiniteLossError, UserError
from samlm.harness.loop import LoopConfig, lm_evaluator, train
from samlm.models import build_decoder
from samlm.optim import build_optimizer
from tinymodels import Crash, crash_at

CONTEXT = 16
TIMING_FIELDS = {"tokens_per_s", "step_s"}


@pytest.fixture(scope="module")
def dataset():
    return LMDataset.from_corpus("tinyshakespeare", context=CONTEXT, max_chars=20_000)


def make_run(dataset, optimizer="adamw", total_steps=8, dropout=0.1):
    """Model, optimizer, scheduler and data built the same way every time (as a harness does)."""
    model = build_decoder("gpt2", layers=1, width=16, heads=2, context=CONTEXT, vocab_size=257, dropout=dropout, seed=0)
    opt = build_optimizer(
        optimizer,
        model.parameters(),
        lr=3e-3,
        weight_decay=0.1,
        betas=(0.9, 0.98),
        eps=1e-9,
        **({"rho": 0.05} if optimizer != "adamw" else {}),
    )
    warmup = 2

    def schedule(step):  # linear warmup, cosine to 10% of peak
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return dict(
        model=model,
        optimizer=opt,
        train_batches=dataset.train_batches(batch_size=4, seed=0),
        scheduler=scheduler,
        evaluate=lm_evaluator(dataset.val_batches(batch_size=8, max_batches=2)),
    )


def run(dataset, out_dir, steps=8, optimizer="adamw", on_step=None, loss=lm_loss, **config):
    parts = make_run(dataset, optimizer)
    defaults = dict(eval_every=2, save_every=4, progress=False, seed=1234)
    result = train(
        **parts, loss=loss, on_step=on_step, config=LoopConfig(out=out_dir, steps=steps, **(defaults | config))
    )
    return result, parts


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_same_state(a, b):
    for (name, x), y in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(x, y), name
    state_a, state_b = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert torch.equal(
        torch.cat([t.flatten() for s in _state_tensors(state_a) for t in s]),
        torch.cat([t.flatten() for s in _state_tensors(state_b) for t in s]),
    )


def _state_tensors(state_dict):
    state = state_dict.get("base_optimizer", state_dict)["state"]
    return [[v for v in s.values() if isinstance(v, torch.Tensor)] for s in state.values()]


@pytest.mark.parametrize("optimizer, grad_accum", [("adamw", 1), ("sam", 2)])
def test_resume_is_bitwise_identical(dataset, tmp_path, optimizer, grad_accum):
    straight, straight_parts = run(dataset, tmp_path / "straight", optimizer=optimizer, grad_accum=grad_accum)
    assert straight.completed and [r["step"] for r in straight.history] == [2, 4, 6, 8]

    interrupted_dir = tmp_path / "interrupted"
    # Crash after step 6: the metrics line of step 6 is written, the last checkpoint is step 4.
    with pytest.raises(Crash):
        run(dataset, interrupted_dir, optimizer=optimizer, grad_accum=grad_accum, on_step=crash_at(6))
    assert [r["step"] for r in io.read_jsonl(interrupted_dir / "metrics.jsonl")] == [2, 4, 6]

    resumed, resumed_parts = run(dataset, interrupted_dir, optimizer=optimizer, grad_accum=grad_accum, resume=True)
    assert resumed.start_step == 4 and resumed.step == 8
    assert_same_state(straight_parts, resumed_parts)
    lines = io.read_jsonl(interrupted_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 4, 6, 8]  # the stale step-6 line was replaced, not duplicated
    assert without_timing(lines) == without_timing(io.read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    assert without_timing(resumed.history) == without_timing(straight.history)


def test_resume_skips_a_corrupted_newest_checkpoint(dataset, tmp_path, caplog):
    straight, straight_parts = run(dataset, tmp_path / "straight", steps=8)
    out = tmp_path / "run"
    run(dataset, out, steps=6, save_every=2, keep_checkpoints=3)
    newest = out / "checkpoints" / "checkpoint-6"
    (newest / "state.pt").write_bytes(b"garbage")
    resumed, parts = run(dataset, out, steps=8, resume=True)
    assert resumed.start_step == 4
    assert "checkpoint-6 is unusable: state.pt is truncated" in caplog.text
    assert_same_state(straight_parts, parts)


def test_run_directory_layout_and_summary(dataset, tmp_path):
    sharpness_calls = []

    def sharpness(model):
        sharpness_calls.append(model.training)
        return {"lambda_max": 1.5}

    parts = make_run(dataset)
    config = LoopConfig(out=tmp_path, steps=4, eval_every=2, sharpness_every=3, eval_at_start=True, progress=False)
    result = train(**parts, sharpness=sharpness, config=config)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]
    lines = io.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 2, 3, 4]
    assert "train_loss" not in lines[0] and "val_loss" in lines[0]
    assert lines[2]["sharpness"] == {"lambda_max": 1.5} and "val_loss" not in lines[2]
    assert sharpness_calls == [False]  # measured in eval mode...
    assert parts["model"].training  # ...and train mode restored
    assert {"train_loss", "val_loss", "val_ppl", "lr", "tokens", "tokens_per_s", "step_s"} <= set(lines[-1])
    assert lines[-1]["tokens"] == 4 * 4 * CONTEXT

    summary = result.summary()
    assert summary["completed"] and summary["final"]["step"] == 4
    assert summary["best"]["val_loss"]["mode"] == "min"
    assert summary["best"]["val_loss"]["value"] == min(r["val_loss"] for r in lines if "val_loss" in r)


def test_existing_run_is_not_overwritten_by_accident(dataset, tmp_path):
    run(dataset, tmp_path, steps=2)
    with pytest.raises(UserError, match="already holds a run"):
        run(dataset, tmp_path, steps=2)
    run(dataset, tmp_path, steps=2, overwrite=True)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigterm_finishes_the_step_and_saves(dataset, tmp_path):
    def send_sigterm(step, stats):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result, _ = run(dataset, tmp_path, steps=8, on_step=send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert result.interrupted == "SIGTERM" and result.step == 3 and not result.completed
    assert result.checkpoint.name == "checkpoint-3"
    assert io.load_latest_checkpoint(tmp_path / "checkpoints").step == 3
    assert [r["step"] for r in io.read_jsonl(tmp_path / "metrics.jsonl")] == [2]

    resumed, _ = run(dataset, tmp_path, steps=8, resume=True)
    assert resumed.start_step == 3 and resumed.completed
    assert [r["step"] for r in resumed.history] == [2, 4, 6, 8]


def nan_loss_on(steps):
    calls = {"n": 0}

    def loss(logits, batch):
        calls["n"] += 1
        value = lm_loss(logits, batch)
        return value * float("nan") if calls["n"] in steps else value

    return loss


def test_nonfinite_skip_counts_and_continues(dataset, tmp_path):
    result, parts = run(dataset, tmp_path, steps=6, loss=nan_loss_on({2, 3}), nonfinite="skip")
    assert result.completed and result.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in parts["model"].parameters())
    assert io.read_jsonl(tmp_path / "metrics.jsonl")[-1]["nonfinite_steps"] == 2
    assert io.load_latest_checkpoint(tmp_path / "checkpoints").step == 6


def test_nonfinite_policy_reads_the_named_loss_fields_not_the_deprecated_key(dataset, tmp_path, monkeypatch):
    """The loop must keep counting non-finite steps once ``as_dict`` drops the old ``"loss"`` key."""
    from samlm.optim.step_stats import StepStats

    as_dict = StepStats.as_dict

    def without_old_key(self):
        values = as_dict(self)
        del values["loss"]
        return values

    monkeypatch.setattr(StepStats, "as_dict", without_old_key)
    result, _ = run(dataset, tmp_path, steps=6, loss=nan_loss_on({2, 3}), nonfinite="skip")
    assert result.completed and result.nonfinite_steps == 2


def test_nonfinite_stop_after_consecutive_steps(dataset, tmp_path):
    always_nan = nan_loss_on(set(range(100)))
    with pytest.raises(NonFiniteLossError, match="step 3: 3 consecutive steps with a non-finite loss"):
        run(dataset, tmp_path, steps=6, loss=always_nan, nonfinite="stop", max_nonfinite=3)


def test_diverged_weights_are_never_saved(dataset, tmp_path):
    def poison(step, stats):
        if step == 3:
            with torch.no_grad():
                next(parts["model"].parameters())[0] = float("nan")

    parts = make_run(dataset)
    config = LoopConfig(out=tmp_path, steps=6, eval_every=0, save_every=2, progress=False, seed=0)
    with pytest.raises(NonFiniteLossError, match="refusing to save checkpoint at step 4"):
        train(**parts, on_step=poison, config=config)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]


def test_the_median_step_time_counts_a_periodic_schedule_at_its_share():
    """One SAM step (30 ms) every 5th step (10 ms otherwise): a median over single steps would say
    10 ms; over whole cycles it is the mean of a cycle, 14 ms, and a slowed cycle is still left out."""
    from samlm.harness.loop import median_step_ms

    cheap, sam = 0.010, 0.030
    cycle = [sam, cheap, cheap, cheap, cheap]
    times = cycle * 6 + [sam, cheap, 1.0, cheap, cheap]  # one cycle slowed by the machine
    assert median_step_ms(times, 1) == pytest.approx(10.0)
    assert median_step_ms(times, 5) == pytest.approx(14.0)
    assert median_step_ms(times[:3], 5) == pytest.approx(1000 * sum(times[:3]) / 3)
    assert median_step_ms([], 5) is None


def test_the_loop_times_looksam_over_its_whole_cycle(dataset, tmp_path):
    from samlm.optim import build_optimizer as build

    assert build("sam", [torch.nn.Parameter(torch.ones(2))], lr=0.1, rho=0.05, sam_every=3).steps_per_cycle == 3
    result, parts = run(dataset, tmp_path, steps=6, optimizer="looksam")
    assert parts["optimizer"].steps_per_cycle == parts["optimizer"].look_every == 5
    assert result.steps_per_cycle == 5
