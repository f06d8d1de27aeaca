"""Cheap SAM schedules: ``sam_every`` and ``sam_start`` on every SAM-family method."""

import copy

import pytest
import torch

import samlm
from samlm.optim import METHODS, SamSchedule, build_optimizer, plain_step
from samlm.optim.registry import SAM_FAMILY
from test_optim_math import ce, forward_of, make_problem

CLASSES = [METHODS[name].cls for name in SAM_FAMILY]


def _batch(batch, accumulate):
    return [(batch[0][:6], batch[1][:6]), (batch[0][6:], batch[1][6:])] if accumulate else batch


@pytest.mark.parametrize("cls", CLASSES, ids=SAM_FAMILY)
@pytest.mark.parametrize(
    "accumulate,step_args",
    [
        (False, {}),
        (True, {"max_grad_norm": 0.1}),
        (False, {"autocast_dtype": torch.bfloat16}),
        (True, {"autocast_dtype": torch.float16, "scaler": True}),
    ],
    ids=["one", "accumulated-clipped", "bf16", "fp16-scaler"],
)
def test_the_schedule_is_sam_steps_and_plain_steps_bitwise(cls, accumulate, step_args):
    """sam_every=3, sam_start=2: steps 2, 5, 8 are SAM steps, the others equal plain_step on the
    base optimizer; a SAM wrapper stepping every time, interleaved by hand, is the reference."""
    model, batch = make_problem(3)
    twin = copy.deepcopy(model)
    opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2), sam_every=3, sam_start=2)
    ref = cls(torch.optim.AdamW(twin.parameters(), lr=1e-2))
    batch = _batch(batch, accumulate)
    ours, theirs = dict(step_args), dict(step_args)
    if "scaler" in step_args:  # one GradScaler each, starting alike
        ours["scaler"], theirs["scaler"] = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    kinds = []
    for step in range(9):
        stats = opt.train_step(batch, forward_of(model), ce, **ours)
        kinds.append(stats.sam_step)
        if step in (2, 5, 8):
            expected = ref.train_step(batch, forward_of(twin), ce, **theirs)
        else:
            expected = plain_step(ref.base_optimizer, batch, forward_of(twin), ce, **theirs)
        assert stats == expected
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert kinds == [step in (2, 5, 8) for step in range(9)]
    assert opt.counters["sam_steps"] == 3 and opt.counters["plain_steps"] == 6 and opt.counters["steps"] == 9


@pytest.mark.parametrize("cls", [samlm.SAM, samlm.FunctionalSAM])
def test_a_resume_in_the_middle_of_a_cycle_continues_bitwise(cls):
    model, batch = make_problem(4)
    start = copy.deepcopy(model)
    opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2), sam_every=3)
    for _ in range(7):
        opt.train_step(batch, forward_of(model), ce)

    first = copy.deepcopy(start)
    opt_first = cls(torch.optim.AdamW(first.parameters(), lr=1e-2), sam_every=3)
    for _ in range(4):
        opt_first.train_step(batch, forward_of(first), ce)
    weights, state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_first.state_dict())
    assert state["counters"]["sam_steps"] == 2 and state["counters"]["plain_steps"] == 2

    resumed = copy.deepcopy(start)
    resumed.load_state_dict(weights)
    opt_resumed = cls(torch.optim.AdamW(resumed.parameters(), lr=1e-2), sam_every=3)
    opt_resumed.load_state_dict(state)
    kinds = [opt_resumed.train_step(batch, forward_of(resumed), ce).sam_step for _ in range(3)]
    assert kinds == [False, False, True]  # steps 4, 5, 6 of the cycle 0, 3, 6
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt_resumed.counters == opt.counters


def test_sam_start_as_a_fraction_of_the_run_needs_total_steps():
    model, batch = make_problem()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert samlm.SAM(base, sam_start=0.5, total_steps=10).schedule == SamSchedule(every=1, start=5)
    assert samlm.SAM(base, sam_start=0.3, total_steps=10).schedule.start == 3
    assert samlm.SAM(base, sam_start=0.0).schedule == SamSchedule()
    with pytest.raises(ValueError, match="fraction of the run: pass total_steps="):
        samlm.SAM(base, sam_start=0.5)
    opt = samlm.SAM(base, sam_start=0.25, total_steps=8, sam_every=2)
    kinds = [opt.train_step(batch, forward_of(model), ce).sam_step for _ in range(8)]
    assert kinds == [False, False, True, False, True, False, True, False]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sam_every": 0}, "sam_every must be an integer >= 1"),
        ({"sam_every": 2.0}, "sam_every must be an integer >= 1"),
        ({"sam_every": True}, "sam_every must be an integer >= 1"),
        ({"sam_start": -1}, "sam_start must be a step index"),
        ({"sam_start": 1.5, "total_steps": 10}, "sam_start must be a step index"),
        ({"sam_start": 0.5, "total_steps": 0}, "total_steps must be an integer >= 1"),
    ],
)
def test_bad_schedules_raise_value_error_naming_the_argument(kwargs, match):
    model, _ = make_problem()
    with pytest.raises(ValueError, match=match):
        samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_every_constructor_takes_the_schedule_and_reports_it():
    model, _ = make_problem()
    davda = samlm.SAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_every=4, sam_start=0.5, total_steps=100)
    assert davda.schedule == SamSchedule(every=4, start=50)
    for name in SAM_FAMILY:
        opt = build_optimizer(name, model.parameters(), lr=1e-3, sam_every=2, sam_start=3)
        assert opt.schedule == SamSchedule(every=2, start=3)
        assert {"sam_every": 2, "sam_start": 3, "total_steps": None}.items() <= opt.config().items()
        assert "sam_every=2, sam_start=3" in repr(opt)
    assert isinstance(build_optimizer("adamw", model.parameters(), lr=1e-3, sam_every=2), torch.optim.AdamW)
    assert samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1)).config()["sam_every"] == 1


def test_step_cost_counts_the_extra_passes_on_the_sam_steps_only():
    sam, fsam, adamw = METHODS["sam"], METHODS["fsam"], METHODS["adamw"]
    assert sam.step_cost(0.25) == sam.step_cost(0.25, sam_every=1, sam_start_fraction=0.0) == 1.25
    assert sam.step_cost(0.25, sam_every=5) == pytest.approx(1.05)
    assert sam.step_cost(1.0, sam_every=2, sam_start_fraction=0.5) == pytest.approx(1.25)
    assert fsam.step_cost(0.25, sam_every=2) == pytest.approx(1.25)
    assert adamw.step_cost(0.25, sam_every=3) == 1.0
