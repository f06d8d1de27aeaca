"""``opt.step(closure)`` in torch's convention (Lightning's automatic optimization): the closure
zeroes the gradients, computes the loss and calls backward; the optimizer calls it at w and w+ε."""

import copy

import pytest
import torch

import samlm
from test_optim_math import ce, make_problem


def closure_of(model, opt, batch, calls=None, set_to_none=True):
    """torch's convention: zero the gradients, loss, backward."""

    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad(set_to_none=set_to_none)
        loss = ce(model(batch[0]), batch)
        loss.backward()
        return loss

    return closure


def davda_steps(model, opt, batch, steps):
    """davda54/sam's form: the gradient at w first, then step(closure) for w+ε."""

    def closure():
        loss = ce(model(batch[0]), batch)
        loss.backward()
        return loss

    for _ in range(steps):
        ce(model(batch[0]), batch).backward()
        opt.step(closure)
        opt.zero_grad()


@pytest.mark.parametrize("cls", [samlm.SAM, samlm.ASAM, samlm.PreconditionedSAM])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_closure_form_equals_davda54s_form(cls, set_to_none):
    model, batch = make_problem(7)
    twin = copy.deepcopy(model)
    opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref = cls(torch.optim.AdamW(twin.parameters(), lr=1e-2))
    for _ in range(3):
        calls = []
        with torch.no_grad():
            loss_at_w = ce(model(batch[0]), batch)
        loss = opt.step(closure_of(model, opt, batch, calls, set_to_none))
        assert len(calls) == 2 and torch.equal(loss.detach(), loss_at_w)  # torch's optimizers return the loss at w
        assert all(p.grad is None for p in model.parameters())
    davda_steps(twin, ref, batch, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.counters == ref.counters and opt.counters["steps"] == 3 and opt.counters["sam_steps"] == 3


def test_a_plain_step_of_the_schedule_calls_the_closure_once():
    model, batch = make_problem(8)
    twin = copy.deepcopy(model)
    opt = samlm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2), sam_every=2)
    ref = samlm.SAM(torch.optim.AdamW(twin.parameters(), lr=1e-2))
    counts = []
    for step in range(4):
        calls = []
        opt.step(closure_of(model, opt, batch, calls))
        counts.append(len(calls))
        if step % 2 == 0:
            davda_steps(twin, ref, batch, 1)
        else:
            ce(twin(batch[0]), batch).backward()
            ref.base_optimizer.step()
            ref.base_optimizer.zero_grad()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert counts == [2, 1, 2, 1]
    assert opt.counters["sam_steps"] == 2 and opt.counters["plain_steps"] == 2 and opt.counters["steps"] == 4


def test_a_plain_step_in_davda54s_form_steps_on_the_gradient_given():
    model, batch = make_problem(9)
    twin = copy.deepcopy(model)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), sam_start=1)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    ce(model(batch[0]), batch).backward()
    ce(twin(batch[0]), batch).backward()
    assert opt.step(lambda: pytest.fail("a plain step must not call the closure")) is None
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_functional_variants_refuse_the_closure_form_too():
    model, batch = make_problem()
    for cls in (samlm.FunctionalSAM, samlm.PreconditionedFunctionalSAM):
        opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2))
        with pytest.raises(RuntimeError, match="functional descent needs the clean output cotangent"):
            opt.step(closure_of(model, opt, batch))
