"""StepStats names each loss by the rows and weights it covers: ``ascent_loss`` at w on the ascent
rows, ``loss_perturbed`` at w+ε on every row; ``loss`` is a deprecated alias of ``ascent_loss``."""

import dataclasses
import warnings

import pytest
import torch

import samlm
from samlm.optim import StepStats

DT = torch.float64


def problem(rows=8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(rows, 4, generator=g, dtype=DT), torch.randint(0, 3, (rows,), generator=g))


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def test_the_losses_are_named_for_what_they_cover():
    fields = {f.name for f in dataclasses.fields(StepStats)}
    assert {"ascent_loss", "loss_perturbed"} <= fields and "loss" not in fields


@pytest.mark.parametrize("ascent_fraction", [0.25, 0.5])
def test_ascent_loss_is_the_ascent_rows_mean_at_w_and_loss_perturbed_the_batch_mean_at_w_plus_eps(ascent_fraction):
    model, batch = problem()
    x, y = batch
    rows = int(ascent_fraction * len(x))
    rho = 0.3
    # the reference: the ascent rows' gradient at w, ε = ρ g/‖g‖, the whole batch at w+ε
    params = list(model.parameters())
    ascent = ce(model(x[:rows]), (x[:rows], y[:rows]))
    grads = torch.autograd.grad(ascent, params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
        perturbed = ce(model(x), batch)
        for p, g in zip(params, grads):
            p.sub_(rho * g / norm)
        whole_at_w = ce(model(x), batch)

    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=rho, ascent_fraction=ascent_fraction)
    stats = opt.train_step(batch, lambda b: model(b[0]), ce)
    assert stats.ascent_loss == pytest.approx(ascent.item(), rel=1e-12)
    assert stats.loss_perturbed == pytest.approx(perturbed.item(), rel=1e-12)
    assert stats.ascent_loss != pytest.approx(whole_at_w.item(), rel=1e-6)  # not the batch's loss at w


def test_a_plain_step_has_one_loss_at_w_over_every_row():
    model, batch = problem()
    with torch.no_grad():
        expected = ce(model(batch[0]), batch).item()
    stats = samlm.optim.train_step(torch.optim.SGD(model.parameters(), lr=0.1), batch, lambda b: model(b[0]), ce)
    assert stats.ascent_loss == stats.loss_perturbed == pytest.approx(expected, rel=1e-12)
    assert not stats.sam_step


def test_loss_is_a_deprecated_alias_of_ascent_loss():
    model, batch = problem()
    stats = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1).train_step(batch, lambda b: model(b[0]), ce)
    with pytest.warns(FutureWarning, match="ascent_loss") as caught:
        value = stats.loss
    assert value == stats.ascent_loss
    assert caught[0].filename == __file__  # the warning points at the caller's line
    # as a plain dict cannot warn, as_dict() keeps the old key beside the new one until it goes
    values = stats.as_dict()
    assert values["loss"] == values["ascent_loss"] == stats.ascent_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats.as_dict()  # reading the new names never warns
        assert stats.ascent_loss == value
