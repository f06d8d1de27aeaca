"""The optimizer core's one-home facts: the registry, the descent rules, the split, the imports."""

import ast
import copy
from pathlib import Path

import pytest
import torch

import samlm
from samlm.diagnostics import sam_path_norms
from samlm.optim import (
    BASE_OPTIMIZERS,
    METHODS,
    Euclidean,
    Functional,
    Preconditioned,
    SharpnessAware,
    Standard,
    StepStats,
    build_optimizer,
    method,
)
from samlm.optim.registry import SAM_FAMILY, method_of

OPTIM = Path(samlm.__file__).parent / "optim"


def problem(seed=0, rows=8):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    g = torch.Generator().manual_seed(seed)
    return model, (torch.randn(rows, 4, generator=g), torch.randint(0, 3, (rows,), generator=g))


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def test_derived_names_follow_the_registry():
    assert SAM_FAMILY == tuple(name for name, m in METHODS.items() if m.cls is not None)
    assert all(METHODS[name].cls.default_rho == METHODS[name].default_rho for name in SAM_FAMILY)
    assert set(BASE_OPTIMIZERS) <= set(METHODS)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer("lion", problem()[0].parameters(), lr=0.1)


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_default_rho_lives_in_the_registry(name):
    entry = method(name)
    model, _ = problem()
    assert entry.cls(torch.optim.AdamW(model.parameters())).rho == entry.default_rho
    opt = build_optimizer(name, model.parameters(), lr=0.1)
    assert type(opt) is entry.cls and opt.rho == entry.default_rho and method_of(opt) is entry
    assert build_optimizer(name, model.parameters(), lr=0.1, rho=0.2).rho == 0.2
    assert entry.functional == entry.cls.descent_rule.needs_clean_cotangent
    assert opt.config()["descent"] == entry.cls.descent_rule.name


def test_registry_defaults_and_davda54_form():
    model, _ = problem()
    assert samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.1)).rho == 0.05
    assert samlm.ASAM(torch.optim.SGD(model.parameters(), lr=0.1)).rho == 0.5
    davda = samlm.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    assert davda.rho == 0.1 and isinstance(davda.base_optimizer, torch.optim.SGD)
    assert davda.param_groups[0]["lr"] == 0.2
    assert samlm.SAM(model.parameters(), torch.optim.SGD, lr=0.2).rho == 0.05
    with pytest.raises(TypeError):
        Euclidean()  # a rule has no ρ of its own: the registry's is the only default


@pytest.mark.parametrize("descent", [Functional(), "functional"])
def test_a_descent_rule_is_a_pluggable_object(descent):
    """SharpnessAware(base, rule, descent=Functional()) is FunctionalSAM, bitwise."""
    model_a, batch = problem(1)
    model_b = copy.deepcopy(model_a)
    ours = SharpnessAware(torch.optim.AdamW(model_a.parameters(), lr=1e-2), Preconditioned(rho=0.1), descent=descent)
    theirs = samlm.PreconditionedFunctionalSAM(torch.optim.AdamW(model_b.parameters(), lr=1e-2), rho=0.1)
    assert ours.descent_rule == Functional() and ours.descent == "functional"
    for _ in range(2):
        a = ours.train_step(batch, lambda b: model_a(b[0]), ce)
        b = theirs.train_step(batch, lambda b: model_b(b[0]), ce)
        assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert ours.config() == {**theirs.config(), "class": "SharpnessAware"}
    assert SharpnessAware(torch.optim.SGD(model_a.parameters(), lr=0.1), Euclidean(rho=0.1)).descent_rule == Standard()
    with pytest.raises(ValueError, match="descent must be"):
        SharpnessAware(torch.optim.SGD(model_a.parameters(), lr=0.1), Euclidean(rho=0.1), descent="sideways")


def test_step_stats_are_built_by_keyword():
    with pytest.raises(TypeError):
        StepStats(1.0, 1.0, 0.0, 0.0, 0.0, False, False)
    stats = StepStats(
        ascent_loss=1.0,
        loss_perturbed=1.0,
        grad_norm=0.0,
        eps_norm=0.0,
        update_grad_norm=0.0,
        skipped=False,
        ascent_nonfinite=False,
    )
    assert "logit_path_norm" not in stats.as_dict()


@pytest.mark.parametrize("cls", [samlm.SAM, samlm.FunctionalSAM])
@pytest.mark.parametrize("batches", ["one", "accumulated", "m=2"])
def test_split_observes_the_step_without_changing_it(cls, batches):
    model_a, batch = problem(2, rows=12)
    model_b = copy.deepcopy(model_a)
    kwargs = {"m": 2} if batches == "m=2" else {}
    if batches == "accumulated":
        batch = [(batch[0][:5], batch[1][:5]), (batch[0][5:], batch[1][5:])]
    plain = cls(torch.optim.AdamW(model_a.parameters(), lr=1e-2), rho=0.1, ascent_fraction=0.5, **kwargs)
    split = cls(torch.optim.AdamW(model_b.parameters(), lr=1e-2), rho=0.1, ascent_fraction=0.5, **kwargs)
    for _ in range(2):
        a = plain.train_step(batch, lambda b: model_a(b[0]), ce).as_dict()
        b = split.train_step(batch, lambda b: model_b(b[0]), ce, split=True).as_dict()
        assert b.pop("logit_path_norm") > 0 and b.pop("functional_path_norm") > 0
        assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert plain.state_dict()["counters"] == split.state_dict()["counters"]


def test_split_of_a_step_is_the_diagnostics_split():
    """With the ascent on every row, a step's ε is ρ g/‖g‖, so train_step(split=True) and
    samlm.diagnostics.sam_path_norms measure the same split (one implementation, optim/split.py)."""
    model, batch = problem(3)
    expected = sam_path_norms(list(model.parameters()), batch, lambda b: model(b[0]), ce, rho=0.1)
    opt = samlm.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.1, ascent_fraction=1.0)
    stats = opt.train_step(batch, lambda b: model(b[0]), ce, split=True)
    assert stats.logit_path_norm == pytest.approx(expected["logit_path_norm"], rel=1e-5)
    assert stats.functional_path_norm == pytest.approx(expected["functional_path_norm"], rel=1e-5)


def test_the_driver_steps_through_the_wrappers_public_api_only():
    source = (OPTIM / "driver.py").read_text()
    assert "opt._" not in source and ".counters" not in source
    assert 'descent == "functional"' not in source


def _imports(path: Path) -> set[str]:
    """samlm.optim modules ``path`` imports, at any depth (function-level imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names.add(module.split(".")[0] if module else "")
                if not module:
                    names.update(alias.name for alias in node.names)
            elif module.startswith("samlm.optim."):
                names.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names if a.name.startswith("samlm.optim."))
    return names - {"", "__init__"}


def test_optim_imports_flow_one_way():
    modules = {p.stem: _imports(p) for p in OPTIM.glob("*.py") if p.stem != "__init__"}
    order, seen = [], set()

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join([*stack, name])}"
        if name in seen:
            return
        for dep in modules.get(name, ()):
            visit(dep, [*stack, name])
        seen.add(name)
        order.append(name)

    for name in modules:
        visit(name, [])
    assert "sam" not in modules["driver"] and "registry" not in modules["sam"]


@pytest.mark.parametrize("cls", [samlm.SAM, samlm.FunctionalSAM])
def test_train_step_unwraps_accelerates_prepared_optimizer(cls):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    model, batch = problem(3)
    twin = copy.deepcopy(model)
    reference = cls(torch.optim.AdamW(twin.parameters(), lr=1e-2), sam_every=2)
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        prepared_model, prepared = accelerator.prepare(
            model, cls(torch.optim.AdamW(model.parameters(), lr=1e-2), sam_every=2)
        )
        assert not isinstance(prepared, SharpnessAware) and isinstance(prepared.optimizer, cls)
        for _ in range(3):
            stats = samlm.optim.train_step(prepared, batch, lambda b: prepared_model(b[0]), ce, model=prepared_model)
            assert stats == samlm.optim.train_step(reference, batch, lambda b: twin(b[0]), ce)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
        assert prepared.optimizer.counters == reference.counters
    finally:
        AcceleratorState._reset_state(True)
