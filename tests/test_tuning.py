"""Tuned baselines (`samlm compare --lr` as a grid): each method's (lr, ρ) is chosen by its mean val
loss on the tuning slice of the validation split and reported on the disjoint report slice."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from samlm import io
from samlm.cli import main
from samlm.errors import UserError
from samlm.harness import loop
from samlm.harness.pretrain import PretrainConfig, pretrain
from samlm.harness.pretrain.build import validation_slices
from samlm.studies import report
from samlm.studies.compare import CompareConfig, compare
from samlm.studies.grid import parse_lr
from tinymodels import Crash, crash_at

TINY = PretrainConfig(
    layers=1,
    width=16,
    heads=2,
    context=8,
    batch=4,
    max_chars=4000,
    val_batches=2,
    steps=6,
    eval_every=3,
    sharpness=False,
    progress=False,
)
OPTS = ["adamw", "sam", "fsam"]


# --------------------------------------------------------------------------- the --lr grid


def test_lr_grid_global_and_per_optimizer():
    assert parse_lr(None, OPTS, 3e-3) == {"adamw": [3e-3], "sam": [3e-3], "fsam": [3e-3]}
    assert parse_lr("1e-3", OPTS, 3e-3) == {"adamw": [1e-3], "sam": [1e-3], "fsam": [1e-3]}
    assert parse_lr("1e-3,3e-3,1e-3", ["sam"], 0.1) == {"sam": [1e-3, 3e-3]}  # a grid, deduplicated
    assert parse_lr("adamw=1e-3,adamw=3e-3,sam=3e-3,2e-3", OPTS, 0.1) == {
        "adamw": [1e-3, 3e-3],
        "sam": [3e-3],
        "fsam": [2e-3],
    }  # a bare value: the rest
    assert parse_lr("adamw=1e-3", OPTS, 0.1) == {"adamw": [1e-3], "sam": [0.1], "fsam": [0.1]}
    assert parse_lr({"sam": [1e-3, 2e-3]}, ["sam"], 0.1) == {"sam": [1e-3, 2e-3]} and parse_lr(5e-4, ["sam"], 0.1) == {
        "sam": [5e-4]
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0", "--lr must be finite and > 0, got 0"),
        ("adamw=-1e-3", "> 0"),
        ("sam=x", "--lr: 'x' is not a number"),
        ("foo=1e-3", "--lr: unknown optimizer 'foo'"),
        ("psam=1e-3", "--lr gives a value for psam, which is not in"),
        ("1e-3,", "--lr must be a comma-separated list"),
        ("inf", "finite"),
    ],
)
def test_lr_grid_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_lr(spec, OPTS, 3e-3)


def test_compare_cli_lr_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--steps", "2", "--optimizers", "adamw,sam", "--lr", "sam=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr must be finite and > 0" in err, err


def test_run_names_gain_lr_only_for_a_grid(tmp_path, capsys, monkeypatch):
    config = CompareConfig(
        out="o",
        optimizers=["adamw", "sam"],
        seeds=[0],
        lr="adamw=1e-3,adamw=3e-3,sam=2e-3",
        rho="sam=0.05,sam=0.1",
        base=TINY,
    )
    assert {name: (c.lr, c.rho) for name, c in config.plan()} == {
        "adamw-lr0.001-seed0": (1e-3, None),
        "adamw-lr0.003-seed0": (3e-3, None),
        "sam-rho0.05-seed0": (2e-3, 0.05),
        "sam-rho0.1-seed0": (2e-3, 0.1),
    }
    single = CompareConfig(out="o", optimizers=["adamw", "sam"], seeds=[0], lr=1e-3, rho=0.1, base=TINY)
    assert {name: c.lr for name, c in single.plan()} == {"adamw-seed0": 1e-3, "sam-rho0.1-seed0": 1e-3}
    default = CompareConfig(out="o", optimizers=["adamw"], seeds=[0], base=dataclasses.replace(TINY, lr=6e-3))
    assert [(name, c.lr) for name, c in default.plan()] == [("adamw-seed0", 6e-3)]
    # the CLI: --lr is the grid flag (the run's own --lr is not a second flag)
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "compare",
                "--dry-run",
                "--steps",
                "2",
                "--optimizers",
                "adamw,fsam",
                "--lr",
                "adamw=1e-3,adamw=1e-2,3e-3",
                "--out",
                "o",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "adamw-lr0.001-seed0:" in out and "adamw-lr0.01-seed0:" in out and "fsam-rho0.05-seed0:" in out


# --------------------------------------------------------------------------- the two slices


def test_the_slices_are_disjoint_and_the_tuning_slice_is_the_old_validation_set(tmp_path, monkeypatch):
    seen = []
    original = loop.lm_evaluator
    monkeypatch.setattr(
        loop, "lm_evaluator", lambda batches, **kw: seen.append((batches, kw)) or original(batches, **kw)
    )
    from samlm.harness.pretrain.build import load_data

    dataset = load_data(TINY).dataset
    pretrain(dataclasses.replace(TINY, dry_run=True, out=str(tmp_path / "run")))
    (tuning, tuning_kw), (held_out, held_kw) = seen
    assert tuning_kw == {} and held_kw == {"prefix": "report"} and len(tuning) == len(held_out) == 2
    old = dataset.val_batches(TINY.micro_batch, max_batches=TINY.val_batches)  # what val_loss was measured on
    first_four = dataset.val_batches(TINY.micro_batch, max_batches=4)
    for got, want in zip(tuning + held_out, old + first_four[2:]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    windows = lambda batches: {tuple(row.tolist()) for b in batches for row in b["input_ids"]}  # noqa: E731
    assert not windows(tuning) & windows(held_out)

    every = dataset.val_batches(TINY.micro_batch)  # 13 batches
    assert [len(s) for s in validation_slices(every, 0)] == [13, 0]  # 0: all, as before; no report slice
    assert [len(s) for s in validation_slices(every, 10)] == [10, 3]  # the split ends first
    assert [len(s) for s in validation_slices(every, 13)] == [13, 0]  # nothing left: no report slice


# --------------------------------------------------------------------------- selection and the report


def _fake_run(optimizer, seed, lr, rho, val_loss, report_loss, steps=6):
    summary = {
        "optimizer": optimizer,
        "rho": rho,
        "lr": lr,
        "seed": seed,
        "val_loss": val_loss,
        "report_loss": report_loss,
        "steps": steps,
        "config": {"ascent_fraction": 0.25},
        "resolved": {"tuning_batches": 16, "report_batches": 16},
    }
    name = "-".join(map(str, (optimizer, lr, rho, seed)))
    return report.Run(name=name, path=None, summary=summary)


# The best point on the tuning slice is the worst on the report slice, for both methods.
FAKES = [
    _fake_run("adamw", 0, 1e-3, None, 2.0, 2.5),
    _fake_run("adamw", 1, 1e-3, None, 2.1, 2.6),
    _fake_run("adamw", 0, 3e-3, None, 2.2, 2.0),
    _fake_run("adamw", 1, 3e-3, None, 2.3, 2.1),
    _fake_run("sam", 0, 3e-3, 0.05, 1.9, 2.4),
    _fake_run("sam", 1, 3e-3, 0.05, 2.0, 2.5),
    _fake_run("sam", 0, 3e-3, 0.1, 1.95, 1.5),
    _fake_run("sam", 1, 3e-3, 0.1, 2.05, 1.6),
]


def test_the_tuned_table_reports_the_tuning_choice_on_the_report_slice():
    header, _, adamw, sam = report.tuned_table(FAKES).splitlines()
    assert header == (
        "| method | points | chosen lr | chosen ρ | seeds | val loss (tuning slice) | "
        "report loss (report slice) | Δ report loss vs tuned adamw (paired) | 95% CI | verdict |"
    )
    assert adamw == (
        "| adamw | 2 | 0.001 | – | 2 | 2.0500 ± 0.0707 | 2.5500 ± 0.0707 | (reference) | (reference) | (reference) |"
    )
    # sam ρ=0.05 (best on the tuning slice), not ρ=0.1 (best on the report slice): 2.4-2.5, 2.5-2.6; the
    # same difference at both seeds: a zero-width interval, which excludes 0
    assert sam == (
        "| sam | 2 | 0.003 | 0.05 | 2 | 1.9500 ± 0.0707 | 2.4500 ± 0.0707 | -0.1000 ± 0.0000 (n=2) "
        "| [-0.1000, -0.1000] | ahead |"
    )
    assert report.tuned_table([r for r in FAKES if r.summary["lr"] == 1e-3 or r.summary["rho"] == 0.1]) is None

    rows = report.aggregate(FAKES)  # the full table: every point, Δ to the tuned AdamW
    assert [(r.optimizer, r.rho, r.lr) for r in rows] == [
        ("adamw", None, 1e-3),
        ("adamw", None, 3e-3),
        ("sam", 0.05, 3e-3),
        ("sam", 0.1, 3e-3),
    ]
    assert [r.delta_cell() for r in rows] == ["(reference)", "+0.2000 ± 0.0000", "-0.1000 ± 0.0000", "-0.0500 ± 0.0000"]
    assert report.markdown_table(rows).splitlines()[0].startswith("| optimizer | ρ | lr | seeds | val loss |")

    text = report.report_markdown(FAKES)
    assert (
        "## Tuned" in text
        and (
            "chosen by mean val loss (over seeds) on the tuning slice (validation batches "
            "1-16), reported on the report slice (batches 17-32)"
        )
        in text
    )
    assert "At equal steps:" in text


def test_the_choice_is_made_per_budget():
    # at equal compute AdamW runs longer: there its lr 3e-3 is the better one on the tuning slice
    compute = [
        dataclasses.replace(
            r,
            name=r.name + "-c",
            summary={
                **r.summary,
                "steps": 9,
                "val_loss": r.summary["val_loss"] - (0.5 if r.summary["lr"] == 3e-3 else 0),
            },
        )
        if r.summary["optimizer"] == "adamw"
        else r
        for r in FAKES
    ]
    full = report.report_markdown(FAKES, budgets={"steps": FAKES, "compute": compute})
    text = full.split("## Tuned")[1].split("## Equal steps and equal compute")[0]
    assert "separately under each budget" in text and "At equal steps:" in text and "At equal compute:" in text
    steps_table, compute_table = [line for line in text.splitlines() if line.startswith("| adamw |")]
    assert "| 0.001 |" in steps_table and "| 0.003 |" in compute_table
    assert "| sam | 2 | 0.003 | 0.05 | 2 | 1.9500 ± 0.0707 | 2.4500 ± 0.0707 | +0.4000 ± 0.0000 (n=2) | " in text
    # the budget table's Δ (val loss) is to the tuned AdamW of each budget too
    low, high = [
        line for line in full.split("## Equal steps and equal compute")[1].splitlines() if line.startswith("| adamw |")
    ]
    assert low.endswith(
        "| 6 | (reference) | (reference) | (reference) | 9 | +0.3000 ± 0.0000 (n=2) | [+0.3000, +0.3000] | behind |"
    )
    assert high.endswith("| 9 | (reference) | (reference) | (reference) |")


# --------------------------------------------------------------------------- end to end


def test_lr_grid_end_to_end_and_resume_after_an_interruption(tmp_path):
    config = CompareConfig(
        out=str(tmp_path / "cmp"),
        optimizers=["adamw", "sam"],
        seeds=[0, 1],
        lr="adamw=1e-3,adamw=1e-2,3e-3",
        rho="sam=0.05",
        base=TINY,
    )
    straight = compare(dataclasses.replace(config, out=str(tmp_path / "ref")))
    names = [
        "adamw-lr0.001-seed0",
        "adamw-lr0.01-seed0",
        "sam-rho0.05-seed0",
        "adamw-lr0.001-seed1",
        "adamw-lr0.01-seed1",
        "sam-rho0.05-seed1",
    ]
    assert straight.completed and list(straight.summaries) == names
    for name, summary in straight.summaries.items():
        assert summary["lr"] == {"0.001": 1e-3, "0.01": 1e-2}.get(name.split("-lr")[-1].split("-")[0], 3e-3)
        assert summary["report_loss"] is not None and summary["report_loss"] != summary["val_loss"]
        assert summary["resolved"]["tuning_batches"] == 2 and summary["resolved"]["report_batches"] == 2
    lines = io.read_jsonl(tmp_path / "ref" / names[0] / "metrics.jsonl")
    assert all("report_loss" in line for line in lines if "val_loss" in line)
    mean = lambda lr: sum(straight.summaries[f"adamw-lr{lr}-seed{s}"]["val_loss"] for s in (0, 1))  # noqa: E731
    chosen = "0.001" if mean("0.001") <= mean("0.01") else "0.01"
    text = (tmp_path / "ref" / "report.md").read_text()
    assert "## Tuned" in text and f"| adamw | 2 | {chosen} | – | 2 |" in text
    assert "validation batches 1-2), reported on the report slice (batches 3-4)" in text

    # One run is killed after step 4 (its step-3 checkpoint survives); compare again resumes it.
    run_dir = tmp_path / "cmp" / "adamw-lr0.01-seed1"
    killed = next(c for name, c in config.plan() if name == "adamw-lr0.01-seed1")
    with pytest.raises(Crash):
        pretrain(dataclasses.replace(killed, save_every=3), on_step=crash_at(4))
    assert [s for s, _ in io.checkpoint_dirs(run_dir / "checkpoints")] == [3]
    ran = []
    resumed = compare(config, on_run=lambda name, summary: ran.append((name, summary)))
    assert resumed.completed and dict(ran)["adamw-lr0.01-seed1"]["loop"]["checkpoint"].endswith("checkpoint-6")
    for name, summary in straight.summaries.items():
        again = resumed.summaries[name]
        assert (again["val_loss"], again["report_loss"]) == (summary["val_loss"], summary["report_loss"]), name
    # up to the run list, which names the step-time outliers of each (wall-clock) execution
    tables = [(tmp_path / d / "report.md").read_text().split("## Tuned")[1].split("Runs: ")[0] for d in ("ref", "cmp")]
    assert tables[0] == tables[1]
    assert json.loads((run_dir / "summary.json").read_text())["completed"]
