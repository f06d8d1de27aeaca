"""samlm.studies.report on hand-made run files, samlm compare end to end, and the demo's configuration."""

import argparse
import csv
import dataclasses
import io as stdio
import json

import pytest

from samlm import io
from samlm.cli import main
from samlm.errors import UserError
from samlm.harness.pretrain import PretrainConfig, pretrain
from samlm.studies import plots, report, stats
from samlm.studies.compare import CompareConfig, compare, parse_rho, run_name
from samlm.studies.runs import COLUMNS
from tinymodels import Crash, crash_at

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, *, optimizer, seed, rho=None, val_loss=None, curve=(), sharpness=(), **extra):
    """A run directory with a summary.json and a metrics.jsonl, as pretrain writes them."""
    path = root / name
    summary = {
        "optimizer": optimizer,
        "rho": rho,
        "seed": seed,
        "completed": True,
        "step": 10,
        "steps": 10,
        "val_loss": val_loss,
        "config": {
            "arch": "gpt2",
            "layers": 2,
            "width": 8,
            "heads": 2,
            "context": 4,
            "data": "tinyshakespeare",
            "lr": 0.003,
            "batch": 2,
            "grad_accum": 1,
        },
        "resolved": {"params": 1234, "total_steps": 10},
        **extra,
    }
    io.atomic_write_json(path / "summary.json", summary)
    lines = [{"step": s, "val_loss": v} for s, v in curve]
    lines += [
        {
            "step": s,
            "sharpness": {"hessian_lambda_max": h, "gauss_newton_lambda_max": h / 2, "logit_functional_ratio": 3.0},
        }
        for s, h in sharpness
    ]
    io.write_jsonl(path / "metrics.jsonl", lines)
    return path


@pytest.fixture
def runs(tmp_path):
    write_run(
        tmp_path,
        "adamw-seed0",
        optimizer="adamw",
        seed=0,
        val_loss=2.0,
        step_s=0.010,
        hessian_lambda_max=10.0,
        curve=[(5, 3.0), (10, 2.0)],
        sharpness=[(10, 10.0)],
    )
    write_run(
        tmp_path,
        "adamw-seed1",
        optimizer="adamw",
        seed=1,
        val_loss=2.2,
        step_s=0.012,
        hessian_lambda_max=None,
        curve=[(5, 3.2), (10, 2.2)],
        sharpness=[(10, 12.0)],
    )
    write_run(
        tmp_path,
        "sam-rho0.05-seed0",
        optimizer="sam",
        rho=0.05,
        seed=0,
        val_loss=1.95,
        step_s=0.0125,
        curve=[(5, 2.9), (10, 1.95)],
    )
    return [report.load_run(tmp_path / n) for n in ("adamw-seed0", "adamw-seed1", "sam-rho0.05-seed0")]


# --------------------------------------------------------------------------- report: pure functions


def test_mean_std_and_formatting_are_pinned():
    assert stats.mean_std([2.0, 2.2]) == (pytest.approx(2.1), pytest.approx(0.1414213562), 2)  # sample std (n-1)
    assert stats.mean_std([1.5, None, "nan", float("inf"), True]) == (1.5, None, 1)
    assert stats.mean_std([]) == (None, None, 0)
    assert stats.format_mean_std(2.1, 0.1414213562) == "2.1000 ± 0.1414"
    assert stats.format_mean_std(2.1, None) == "2.1000"
    assert stats.format_mean_std(None, None) == "n/a"
    assert stats.format_mean_std(12345.678, 98.7, ".3g") == "1.23e+04 ± 98.7"


def test_aggregate_groups_by_optimizer_and_rho(runs):
    rows = report.aggregate(runs)
    assert [(r.optimizer, r.rho, r.n) for r in rows] == [("adamw", None, 2), ("sam", 0.05, 1)]
    columns = {c.key: c for c in COLUMNS}
    adamw, sam = rows
    assert adamw.cell(columns["val_loss"]) == "2.1000 ± 0.1414"
    assert adamw.cell(columns["step_s"]) == "11.0 (10.0–12.0)"  # milliseconds: median (min–max) over seeds
    assert adamw.cell(columns["hessian_lambda_max"]) == "10 (n=1)"  # one of the two runs has it
    assert adamw.cell(columns["val_ppl"]) == "n/a"
    assert sam.cell(columns["val_loss"]) == "1.9500"  # one seed: no ±
    assert adamw.delta_cell() == "(reference)"
    assert sam.delta_cell() == "-0.0500"  # paired with adamw seed 0


def test_paired_delta_uses_matching_seeds(tmp_path):
    made = [
        write_run(tmp_path, f"{o}-{s}", optimizer=o, seed=s, val_loss=v)
        for o, s, v in [("adamw", 0, 2.0), ("adamw", 1, 2.5), ("fsam", 0, 1.9), ("fsam", 1, 2.45)]
    ]
    rows = report.aggregate([report.load_run(p) for p in made])
    assert rows[0].stats["val_loss"][1] == pytest.approx(0.3535533906)  # unpaired: seeds dominate
    mean, std, n = rows[1].delta
    assert (mean, std, n) == (pytest.approx(-0.075), pytest.approx(0.0353553391), 2)
    assert rows[1].delta_cell() == "-0.0750 ± 0.0354"


def test_tables_and_csv(runs):
    rows = report.aggregate(runs)
    table = report.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith(
        "| optimizer | ρ | seeds | val loss | Δ val loss vs adamw (paired) | 95% CI | verdict | val ppl |"
    )
    assert lines[2].startswith("| adamw | – | 2 | 2.1000 ± 0.1414 | (reference) |")
    assert lines[3].startswith("| sam | 0.05 | 1 | 1.9500 | -0.0500 | no interval (n=1) | undecided (n=1) |")
    assert "2.1000 ± 0.1414" in report.text_table(rows)

    parsed = list(csv.DictReader(stdio.StringIO(report.results_csv(runs))))
    assert [r["run"] for r in parsed] == ["adamw-seed0", "adamw-seed1", "sam-rho0.05-seed0"]
    assert parsed[0]["val_loss"] == "2.0" and parsed[2]["rho"] == "0.05" and parsed[1]["hessian_lambda_max"] == ""


def test_curves_average_over_seeds(runs):
    steps, means, stds = plots.mean_curve(runs[:2], "val_loss")
    assert steps == [5, 10] and means == pytest.approx([3.1, 2.1]) and stds == pytest.approx([0.1414213562] * 2)
    assert plots.metric_series(runs[1], "sharpness.hessian_lambda_max") == [(10, 12.0)]
    assert plots.mean_curve(runs[2:], "sharpness.hessian_lambda_max") == ([], [], [])


def test_write_report(tmp_path, runs):
    files = report.write_report(tmp_path / "out", runs, title="hand-made", notes="A note.", unfinished=["x-seed2"])
    assert set(files) == {"report", "csv", "val_loss", "sharpness"}
    for key in ("val_loss", "sharpness"):
        assert files[key].read_bytes().startswith(PNG_MAGIC)
    text = files["report"].read_text()
    assert text.startswith("# hand-made") and "A note." in text and "x-seed2" in text
    assert "2.1000 ± 0.1414" in text and "![val_loss](val_loss.png)" in text
    assert "gpt2 2 layers × 8 wide" in text
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files


def test_load_run_needs_a_summary(tmp_path):
    with pytest.raises(UserError, match="no summary.json"):
        report.load_run(tmp_path)


# --------------------------------------------------------------------------- compare


def test_parse_rho():
    opts = ["adamw", "sam", "fsam", "pfsam"]
    assert parse_rho("0.03", opts) == {"adamw": [None], "sam": [0.03], "fsam": [0.03], "pfsam": [0.03]}
    assert parse_rho("sam=0.02,fsam=0.1,pfsam=0.1", opts) == {
        "adamw": [None],
        "sam": [0.02],
        "fsam": [0.1],
        "pfsam": [0.1],
    }
    assert parse_rho("sam=0.01,sam=0.02,0.2", opts)["sam"] == [0.01, 0.02]
    assert parse_rho("sam=0.01,sam=0.02,0.2", opts)["fsam"] == [0.2]
    assert parse_rho("0.02,0.05", ["sam"]) == {"sam": [0.02, 0.05]}
    assert parse_rho(None, ["asam"]) == {"asam": [0.5]}
    for bad, message in [
        ("adamw=0.1", "adamw has no"),
        ("foo=1", "unknown optimizer 'foo'"),
        ("sam=x", "'x' is not a number"),
        ("-1", ">= 0"),
        ("psam=0.1", "not in --optimizers"),
        ("sam=0.1,", "comma-separated"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_rho(bad, opts)
    assert run_name("adamw", None, 1) == "adamw-seed1" and run_name("sam", 0.05, 0) == "sam-rho0.05-seed0"


TINY = PretrainConfig(
    layers=2,
    width=32,
    heads=2,
    context=16,
    batch=4,
    max_chars=20_000,
    val_batches=2,
    steps=4,
    eval_every=2,
    sharpness_iters=3,
    sharpness_batch_size=4,
    progress=False,
)


def test_compare_end_to_end_then_skips_finished_runs(tmp_path):
    config = CompareConfig(
        out=str(tmp_path / "cmp"), optimizers=["adamw", "sam"], seeds=[0, 1], rho="sam=0.05", base=TINY
    )
    ran = []
    result = compare(config, on_run=lambda name, summary: ran.append(name))
    assert ran == ["adamw-seed0", "sam-rho0.05-seed0", "adamw-seed1", "sam-rho0.05-seed1"]
    assert result.completed and not result.interrupted
    out = tmp_path / "cmp"
    for name in ran:
        assert json.loads((out / name / "summary.json").read_text())["completed"]
    text = (out / "report.md").read_text()
    assert "| adamw | – | 2 |" in text and "| sam | 0.05 | 2 |" in text and " ± " in text
    assert len((out / "results.csv").read_text().splitlines()) == 5
    assert (out / "val_loss.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "sharpness.png").read_bytes().startswith(PNG_MAGIC)
    assert "adamw" in result.table and "±" in result.table

    again = compare(config, on_run=lambda name, summary: ran.append(name))
    assert len(ran) == 4 and again.skipped == ["adamw-seed0", "sam-rho0.05-seed0", "adamw-seed1", "sam-rho0.05-seed1"]
    assert (out / "report.md").read_text() == text


def test_compare_resumes_an_interrupted_run(tmp_path):
    straight = compare(CompareConfig(out=str(tmp_path / "ref"), optimizers=["fsam"], seeds=[0], rho=0.1, base=TINY))
    # A run killed after step 3: its step-2 checkpoint and metrics survive, no summary.
    run_dir = tmp_path / "cmp" / "fsam-rho0.1-seed0"
    with pytest.raises(Crash):
        pretrain(
            dataclasses.replace(TINY, optimizer="fsam", rho=0.1, out=str(run_dir), save_every=2), on_step=crash_at(3)
        )
    assert [s for s, _ in io.checkpoint_dirs(run_dir / "checkpoints")] == [2]
    ran = []
    resumed = compare(
        CompareConfig(out=str(tmp_path / "cmp"), optimizers=["fsam"], seeds=[0], rho=0.1, base=TINY),
        on_run=lambda name, summary: ran.append(summary),
    )
    assert resumed.completed and ran[0]["loop"]["checkpoint"].endswith("checkpoint-4")
    a, b = straight.summaries["fsam-rho0.1-seed0"], resumed.summaries["fsam-rho0.1-seed0"]
    assert a["val_loss"] == b["val_loss"] and a["hessian_lambda_max"] == b["hessian_lambda_max"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "adamw,foo"], "unknown optimizer(s) foo"),
        (["--seeds", "a"], "--seeds must be comma-separated integers"),
        (["--rho", "sam=-0.1"], "--rho must be finite and >= 0"),
        (["--jobs", "0"], "--jobs must be a positive integer"),
        (["--width", "100", "--heads", "3"], "--width 100 is not divisible by --heads 3"),
    ],
)
def test_compare_cli_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--steps", "2"] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


# --------------------------------------------------------------------------- demo


def test_demo_plan():
    """The demo is a fair comparison: 20 tokens/param, 3 seeds, each method at its swept (lr, ρ),
    at equal steps and at equal compute; --sweep is the committed grid those came from."""
    from samlm.cli.demo import add_arguments
    from samlm.studies.demo import DEMO_BASE, demo_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def from_flags(argv):
        args = parser.parse_args(argv)
        return demo_config(
            out=args.out,
            seeds=args.seeds,
            steps=args.steps,
            jobs=args.jobs,
            threads=args.threads,
            resume=args.resume,
            sweep=args.sweep,
        )

    config = from_flags([])
    plan = config.plan()
    names = [name for name, _ in plan]
    assert len(names) == 18 and names[:6] == [
        "adamw-seed0",
        "adamw-seed0-equal-compute",
        "sam-rho0.1-seed0",
        "sam-rho0.1-seed0-equal-compute",
        "fsam-rho0.1-seed0",
        "pfsam-rho0.1-seed0",
    ]
    assert config.jobs == 2 and config.overwrite and config.out == "runs/demo" and config.budget == "steps,compute"
    budgets = {name: c.tokens_per_param for name, c in plan}
    assert budgets["adamw-seed0"] == 20 and budgets["fsam-rho0.1-seed0"] == 20
    assert budgets["adamw-seed0-equal-compute"] == 30 and budgets["sam-rho0.1-seed0-equal-compute"] == 24
    assert DEMO_BASE.tokens_per_param == 20 and DEMO_BASE.steps is None
    quick = from_flags(["--steps", "3", "--seeds", "0", "--resume"])
    assert not quick.overwrite and {c.steps for _, c in quick.plan()} >= {3}
    sweep = from_flags(["--sweep"])
    assert sweep.out == "runs/demo-sweep" and list(sweep.seeds) == [0] and list(config.seeds) == [0, 1, 2]
    swept = {(c.optimizer, c.lr, c.rho) for _, c in sweep.plan()}
    assert len(swept) == 4 + 3 * 4 * 2 and sweep.budget == "steps" and not sweep.base.sharpness
    # the demo's points are in the grid
    assert {(c.optimizer, c.lr, c.rho) for _, c in plan} <= swept


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """The demo command's whole path (parallel workers included), on a tiny model."""
    import samlm.studies.demo as demo

    monkeypatch.setattr(demo, "DEMO_BASE", dataclasses.replace(TINY, sharpness_every=2, threads=1))
    monkeypatch.setattr(demo, "DEMO_OPTIMIZERS", ("adamw", "fsam"))
    monkeypatch.setattr(demo, "DEMO_RHO", "fsam=0.1")
    monkeypatch.setattr(demo, "DEMO_LR", "adamw=3e-3,fsam=3e-3")
    code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--seeds", "0", "--jobs", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "adamw" in out and "fsam" in out and "report" in out and "demo took" in out
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "val_loss.png").is_file()
