"""The method registry is the one home of method facts: every registered method runs through
every command that takes an optimizer, and a method added to the registry (one entry) is at once
a choice of all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from samlm import cli
from samlm.optim import registry
from samlm.optim.registry import METHODS, SAM_FAMILY, Method
from samlm.optim.sam import SAM
from tinymodels import save_t5

GLUE = Path(__file__).parent / "fixtures" / "finetune" / "glue"
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


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.mark.parametrize("name", list(METHODS))
def test_pretrain_runs_every_registered_method(name, tmp_path):
    out = tmp_path / name
    assert run_cli("pretrain", *TINY_PRETRAIN, "--optimizer", name, "--steps", 2, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == name and summary["completed"]
    assert summary["rho"] == METHODS[name].default_rho  # the registry's default, or None for a plain optimizer


def needs_momentum(name: str) -> bool:
    """Momentum-SAM perturbs along the base's momentum: T5's default base, Adafactor, keeps none."""
    rule = getattr(METHODS[name].cls, "perturbation_rule", None)
    return not getattr(rule, "needs_ascent_gradient", True)


@pytest.mark.parametrize("name", list(METHODS))
def test_finetune_runs_every_registered_method(name, t5_dir, tmp_path):
    out = tmp_path / name
    assert (
        run_cli(
            "finetune",
            *(["--base", "adamw"] if needs_momentum(name) else []),
            "--model",
            t5_dir,
            "--task",
            "glue/rte",
            "--data-dir",
            GLUE,
            "--optimizer",
            name,
            "--steps",
            1,
            "--batch",
            4,
            "--eval-examples",
            2,
            "--max-target-length",
            4,
            "--out",
            out,
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["optimizer"] == name and (config["rho"] is not None) == METHODS[name].is_sam


def test_compare_runs_every_registered_method(tmp_path):
    out = tmp_path / "cmp"
    assert run_cli("compare", *TINY_PRETRAIN, "--optimizers", ",".join(METHODS), "--steps", 1, "--out", out) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    expected = sorted(
        f"{n}-seed0" if not METHODS[n].is_sam else f"{n}-rho{METHODS[n].default_rho:g}-seed0" for n in METHODS
    )
    assert names == expected
    assert all(f"| {n} |" in (out / "report.md").read_text() for n in METHODS)


def test_finetune_compare_runs_every_registered_method(t5_dir, tmp_path):
    out = tmp_path / "grid"
    assert (
        run_cli(
            "finetune-compare",
            "--out",
            out,
            "--model",
            t5_dir,
            "--task",
            "glue/rte",
            "--data-dir",
            GLUE,
            "--optimizers",
            ",".join(METHODS),
            "--steps",
            1,
            "--batch",
            4,
            "--eval-examples",
            2,
            "--max-target-length",
            4,
            "--baseline",
            "adafactor",
            "--base",
            "adamw",  # every method runs on it (Momentum-SAM needs a base with momentum)
        )
        == 0
    )
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{n}-sub1-seed0" for n in METHODS)


def test_bench_times_every_registered_sam_method(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        run_cli(
            "bench",
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
    result = json.loads(out.read_text())
    rows = result.get("methods", result)
    for name in SAM_FAMILY:
        assert name in json.dumps(rows)


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_hf_trainer_builds_every_registered_sam_method(name, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from samlm.integrations.hf import SAMTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 32, (8, 8))]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, sam_method=name)
    trainer.train()
    assert type(trainer.sam_optimizer) is METHODS[name].cls and trainer.sam_optimizer.rho == METHODS[name].default_rho


class LookaheadSAM(SAM):
    """A stand-in for a user's new method: a class and one registry entry."""


@pytest.fixture
def one_more_method(monkeypatch):
    entry = Method("lsam", "a test method", LookaheadSAM, 0.07)
    monkeypatch.setitem(METHODS, "lsam", entry)
    monkeypatch.setattr(registry, "SAM_FAMILY", (*SAM_FAMILY, "lsam"))
    LookaheadSAM.default_rho = 0.07
    return entry


def test_a_new_registry_entry_is_a_choice_of_every_command(one_more_method, tmp_path, t5_dir):
    out = tmp_path / "pretrain"
    assert run_cli("pretrain", *TINY_PRETRAIN, "--optimizer", "lsam", "--steps", 1, "--out", out) == 0
    assert json.loads((out / "summary.json").read_text())["rho"] == 0.07
    out = tmp_path / "compare"
    assert run_cli("compare", *TINY_PRETRAIN, "--optimizers", "adamw,lsam", "--steps", 1, "--out", out) == 0
    assert (out / "lsam-rho0.07-seed0" / "summary.json").is_file()
    out = tmp_path / "finetune"
    assert (
        run_cli(
            "finetune",
            "--model",
            t5_dir,
            "--task",
            "glue/rte",
            "--data-dir",
            GLUE,
            "--optimizer",
            "lsam",
            "--steps",
            1,
            "--batch",
            4,
            "--eval-examples",
            2,
            "--max-target-length",
            4,
            "--out",
            out,
        )
        == 0
    )
    from samlm.optim import build_optimizer

    opt = build_optimizer("lsam", torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert isinstance(opt, LookaheadSAM) and opt.rho == 0.07


def test_method_costs_follow_their_passes():
    assert METHODS["adamw"].step_cost() == 1.0
    for name in ("sam", "asam", "psam"):
        assert METHODS[name].extra_passes == (registry.ASCENT,) and METHODS[name].step_cost(0.25) == 1.25
    for name in ("fsam", "pfsam"):
        assert METHODS[name].functional and METHODS[name].step_cost(0.25) == pytest.approx(1.5)
    assert METHODS["sam"].step_cost(1.0) == 2.0  # classic SAM: a second full pass
