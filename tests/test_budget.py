"""Equal compute (`--budget compute`): every method gets the forward+backward compute of the
costliest one, cheaper methods run proportionally more steps with stretched schedules, and the
report shows each method's Δ to AdamW at equal steps and at equal compute, paired by seed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from samlm import io
from samlm.errors import UserError
from samlm.harness.pretrain import PretrainConfig, pretrain
from samlm.harness.pretrain.build import lr_schedule, resolve_steps
from samlm.optim.registry import METHODS
from samlm.studies import report
from samlm.studies.compare import COMPUTE_SUFFIX, CompareConfig, compare
from samlm.studies.grid import compute_factors, parse_budget, stretched
from tinymodels import Crash, crash_at

TINY = PretrainConfig(
    layers=1,
    width=16,
    heads=2,
    context=8,
    batch=4,
    max_chars=4000,
    val_batches=1,
    steps=8,
    eval_every=4,
    sharpness=False,
    progress=False,
)


def test_compute_factors_give_every_method_the_costliest_methods_compute():
    factors = compute_factors(["adamw", "sam", "fsam"], 0.25)
    # step costs 1, 1.25, 1.5 (a backward = 2 forwards): fsam's 1.5 x N steps for everyone
    assert factors == pytest.approx({"adamw": 1.5, "sam": 1.2, "fsam": 1.0})
    for name, factor in factors.items():
        assert factor * METHODS[name].step_cost(0.25) == pytest.approx(1.5)
    assert compute_factors(["adamw", "sam"], 1.0) == pytest.approx({"adamw": 2.0, "sam": 1.0})  # classic SAM: 2x
    assert compute_factors(["adamw"], 0.25) == {"adamw": 1.0}


def test_steps_each_method_gets_and_the_runs_both_budgets_share():
    config = CompareConfig(
        out="o",
        optimizers=["adamw", "sam", "fsam"],
        seeds=[0],
        rho=0.1,
        base=dataclasses.replace(TINY, steps=400, warmup=20, eval_every=80),
        budget="steps,compute",
    )
    runs = {r.name: r for r in config.runs()}
    assert {name: (r.config.steps, r.budgets) for name, r in runs.items()} == {
        "adamw-seed0": (400, ("steps",)),
        "adamw-seed0" + COMPUTE_SUFFIX: (600, ("compute",)),
        "sam-rho0.1-seed0": (400, ("steps",)),
        "sam-rho0.1-seed0" + COMPUTE_SUFFIX: (480, ("compute",)),
        "fsam-rho0.1-seed0": (400, ("steps", "compute")),  # the costliest: one run serves both
    }
    stretched_adamw = runs["adamw-seed0" + COMPUTE_SUFFIX].config
    assert (stretched_adamw.warmup, stretched_adamw.eval_every) == (30, 120)
    only_compute = CompareConfig(out="o", optimizers=["adamw", "fsam"], seeds=[0], base=TINY, budget="compute")
    assert [r.name for r in only_compute.runs()] == ["adamw-seed0" + COMPUTE_SUFFIX, "fsam-rho0.05-seed0"]


def test_a_tokens_per_param_budget_stretches_too():
    config = CompareConfig(
        out="o",
        optimizers=["adamw", "sam"],
        seeds=[0],
        base=dataclasses.replace(TINY, steps=None, tokens_per_param=10.0),
        budget="compute",
    )
    adamw = config.runs()[0].config
    assert adamw.tokens_per_param == pytest.approx(12.5) and adamw.steps is None
    assert resolve_steps(adamw, 1000, 500)[0] == 391  # ceil(12.5 * 1000 / (4 * 8))


def test_stretched_schedules_keep_their_shape():
    assert stretched(None, 1.5) is None and stretched(0, 1.5) == 0 and stretched(20, 1.5) == 30
    short, long = lr_schedule(400, 20, 0.1), lr_schedule(600, 30, 0.1)
    for fraction in (0.0, 0.02, 0.25, 0.5, 0.9):
        assert short(round(400 * fraction)) == pytest.approx(long(round(600 * fraction)), abs=2e-3)
    assert short(399) == pytest.approx(0.1) and long(599) == pytest.approx(0.1)  # both end at the floor


def test_budget_flag_values():
    assert parse_budget("steps") == ("steps",) and parse_budget("compute,steps") == ("steps", "compute")
    with pytest.raises(UserError, match="--budget must be steps, compute, time or a comma-separated list"):
        parse_budget("flops")


def _fake_run(name, optimizer, seed, val_loss, steps, step_s=0.1):
    summary = {
        "optimizer": optimizer,
        "rho": None if optimizer == "adamw" else 0.1,
        "seed": seed,
        "val_loss": val_loss,
        "steps": steps,
        "step_s": step_s,
        "config": {"ascent_fraction": 0.25},
    }
    return report.Run(name=name, path=None, summary=summary)


def test_the_report_has_both_delta_columns_paired_by_seed():
    steps = [
        _fake_run("a0", "adamw", 0, 2.0, 400),
        _fake_run("a1", "adamw", 1, 2.2, 400),
        _fake_run("s0", "sam", 0, 1.9, 400, 0.125),
        _fake_run("s1", "sam", 1, 2.0, 400, 0.125),
    ]
    compute = [_fake_run("A0", "adamw", 0, 1.7, 500), _fake_run("A1", "adamw", 1, 1.8, 500), steps[2], steps[3]]
    table = report.budget_table({"steps": steps, "compute": compute})
    header, _, adamw, sam = table.splitlines()
    assert "| equal steps |" in header and "| equal compute |" in header
    assert "(reference)" in adamw and "| 400 |" in adamw and "| 500 |" in adamw
    # equal steps: -0.1 and -0.2 -> -0.15 ± 0.0707; equal compute: +0.2 and +0.2 -> +0.2 ± 0
    assert "-0.1500 ± 0.0707 (n=2)" in sam and "+0.2000 ± 0.0000 (n=2)" in sam
    assert "1.25x" in sam  # the cost model and the measured step-time ratio
    assert report.budget_table({"steps": steps[2:]}) is None  # no AdamW: no Δ


def test_budget_compute_end_to_end_and_resume_after_an_interruption(tmp_path):
    config = CompareConfig(
        out=str(tmp_path / "cmp"), optimizers=["adamw", "fsam"], seeds=[0], base=TINY, budget="steps,compute"
    )
    straight = compare(dataclasses.replace(config, out=str(tmp_path / "ref")))
    text = (tmp_path / "ref" / "report.md").read_text()
    assert "## Equal steps and equal compute" in text and "| equal compute |" in text
    assert json.loads((tmp_path / "ref" / ("adamw-seed0" + COMPUTE_SUFFIX) / "summary.json").read_text())["steps"] == 12
    # The stretched AdamW run is killed after step 7 (its step-6 checkpoint survives); the rerun resumes it.
    run_dir = tmp_path / "cmp" / ("adamw-seed0" + COMPUTE_SUFFIX)
    stretched_config = next(r.config for r in config.runs() if r.name.endswith(COMPUTE_SUFFIX))
    with pytest.raises(Crash):
        pretrain(dataclasses.replace(stretched_config, save_every=6, resume=False, overwrite=True), on_step=crash_at(7))
    assert [s for s, _ in io.checkpoint_dirs(run_dir / "checkpoints")] == [6]
    ran = []
    resumed = compare(config, on_run=lambda name, summary: ran.append((name, summary)))
    assert resumed.completed
    resumed_run = dict(ran)["adamw-seed0" + COMPUTE_SUFFIX]
    assert resumed_run["loop"]["checkpoint"].endswith("checkpoint-12")
    for name, summary in straight.summaries.items():
        assert resumed.summaries[name]["val_loss"] == summary["val_loss"], name


def test_finetune_compare_reports_both_budgets(tmp_path):
    from pathlib import Path

    from samlm import cli
    from tinymodels import save_t5

    glue = Path(__file__).parent / "fixtures" / "finetune" / "glue"
    t5 = save_t5(tmp_path / "t5")
    out = tmp_path / "grid"
    argv = [
        "finetune-compare",
        "--out",
        out,
        "--model",
        t5,
        "--task",
        "glue/rte",
        "--data-dir",
        glue,
        "--optimizers",
        "adafactor,fsam",
        "--seeds",
        "0,1",
        "--steps",
        4,
        "--batch",
        4,
        "--eval-every",
        2,
        "--eval-examples",
        2,
        "--max-target-length",
        4,
        "--budget",
        "steps,compute",
    ]
    assert cli.main([str(a) for a in argv]) == 0
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(
        [
            "adafactor-sub1-seed0",
            "adafactor-sub1-seed1",
            "adafactor-sub1-seed0" + COMPUTE_SUFFIX,
            "adafactor-sub1-seed1" + COMPUTE_SUFFIX,
            "fsam-sub1-seed0",
            "fsam-sub1-seed1",
        ]
    )
    longer = json.loads((out / "runs" / ("adafactor-sub1-seed0" + COMPUTE_SUFFIX) / "summary.json").read_text())
    assert longer["config"]["steps"] == 6 and longer["config"]["eval_every"] == 3  # 1.5x the compute per step
    text = (out / "results.md").read_text()
    assert "| equal steps | 95% CI | verdict | equal compute | 95% CI | verdict |" in text and "(n=2)" in text
    assert (out / "equal-compute" / "results.md").is_file()


def test_budget_table_step_cost_follows_the_runs_sam_schedule():
    """The 'step cost (model)' column is the cost of the schedule the runs used: SAM every 5
    steps costs 1 + 0.25/5, F-SAM in the last quarter of the run 1 + 0.5/4."""
    from pathlib import Path

    from samlm.studies import report

    def run(optimizer, seed, **config):
        summary = {
            "optimizer": optimizer,
            "seed": seed,
            "rho": None if optimizer == "adamw" else 0.1,
            "lr": 0.01,
            "steps": 100,
            "val_loss": 2.0,
            "step_s": 0.01,
            "config": {"ascent_fraction": 0.25, "steps": 100, **config},
        }
        return report.Run(f"{optimizer}-{seed}", Path("."), summary)

    for schedule, sam_cost, fsam_cost in (
        ({"sam_every": 5}, "1.05x", "1.1x"),
        ({"sam_start": 0.75}, "1.06x", "1.12x"),
        ({"sam_start": 75}, "1.06x", "1.12x"),
    ):
        runs = [run(m, s, **schedule) for m in ("adamw", "sam", "fsam") for s in (0, 1)]
        table = report.budget_table({"steps": runs, "compute": runs})
        rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
        assert f"| {sam_cost} |" in rows["sam"] and f"| {fsam_cost} |" in rows["fsam"], table
