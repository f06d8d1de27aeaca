"""samlm.studies.finetune_compare: paper-style tables of baseline vs SAM x data fraction x seed."""

import csv
import io as stdio
import json
from pathlib import Path

import pytest
import torch

from samlm.cli import OneLineParser
from samlm.errors import UserError
from samlm.studies import finetune_compare as compare
from samlm.studies.finetune_runs import find_run_dirs

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"


def write_run(
    root,
    name,
    *,
    optimizer,
    subsample,
    seed,
    best,
    final=None,
    rho=None,
    base=None,
    score_name="mean task score",
    model="t5-small",
    extra_metrics=None,
):
    """A summary.json like harness.build_summary writes (only the fields compare reads)."""
    final = best if final is None else final
    metrics = {
        "glue/rte/accuracy": {"best": best, "best_step": 10, "mode": "max", "final": final, "final_step": 20},
        "glue/rte/loss": {"best": 0.5, "best_step": 20, "mode": "min", "final": 0.5, "final_step": 20},
    }
    metrics.update(extra_metrics or {})
    summary = {
        "format": "samlm-finetune-summary",
        "version": 1,
        "completed": True,
        "step": 20,
        "steps": 20,
        "metrics": metrics,
        "score": {"name": score_name, "best": best, "final": final},
        "config": {
            "model": model,
            "optimizer": optimizer,
            "base": base,
            "rho": rho,
            "subsample": subsample,
            "seed": seed,
        },
    }
    path = Path(root) / name
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def grid(tmp_path):
    runs = tmp_path / "runs"
    base = {0.05: [50.0, 52.0, 54.0], 1.0: [70.0, 71.0, 72.0]}
    sam = {0.05: [53.0, 56.0, 56.0], 1.0: [71.0, 71.0, 73.0]}
    for rate in base:
        for seed in range(3):
            write_run(
                runs,
                f"adafactor-{rate}-{seed}",
                optimizer="adafactor",
                subsample=rate,
                seed=seed,
                best=base[rate][seed],
                final=base[rate][seed] - 1,
            )
            write_run(
                runs,
                f"sam-{rate}-{seed}",
                optimizer="sam",
                base="adafactor",
                rho=0.05,
                subsample=rate,
                seed=seed,
                best=sam[rate][seed],
                final=sam[rate][seed] - 2,
            )
    return runs


def test_tables_gains_csv_and_plot(grid, tmp_path):
    out = tmp_path / "report"
    report = compare.compare_runs(find_run_dirs([grid]), out)
    md = (out / "results.md").read_text()
    assert "| t5-small | 5% | adafactor | 3 | 52.0 ± 2.0 | 52.0 ± 2.0 |" in md
    assert "| t5-small | 5% | sam rho=0.05 | 3 | 55.0 ± 1.7 | 55.0 ± 1.7 |" in md
    assert "| t5-small | 100% | adafactor | 3 | 71.0 ± 1.0 |" in md
    assert md.index("## Best checkpoint") < md.index("## Final checkpoint")
    assert "| t5-small | 5% | adafactor | 3 | 51.0 ± 2.0 |" in md  # final = best - 1
    assert "rte/loss" not in md  # losses are not reported
    # Paired by seed: differences 3, 4, 2 -> +3.0 ± 1.0, +5.8% of 52.
    assert "| t5-small | 5% | sam rho=0.05 | +3.0 ± 1.0 | +5.8% | +3.0 ± 1.0 |" in md

    gains = {(g.selection, g.subsample, g.metric): g for g in report.gains}
    g = gains[("best", 0.05, "score")]
    assert g.paired and g.mean == pytest.approx(3.0) and g.std == pytest.approx(1.0)
    assert g.relative == pytest.approx(300 / 52)
    assert gains[("final", 0.05, "score")].mean == pytest.approx(2.0)

    rows = list(csv.DictReader(stdio.StringIO((out / "results.csv").read_text())))
    row = next(
        r
        for r in rows
        if r["selection"] == "best"
        and r["method"] == "sam rho=0.05"
        and r["subsample"] == "0.05"
        and r["metric"] == "glue/rte/accuracy"
    )
    assert (row["n"], float(row["mean"]), row["values"], row["seeds"]) == ("3", 55.0, "53 56 56", "0 1 2")
    gain_rows = list(csv.DictReader(stdio.StringIO((out / "gains.csv").read_text())))
    assert any(
        r["metric"] == "mean task score" and r["subsample"] == "1.0" and float(r["gain"]) == pytest.approx(2 / 3)
        for r in gain_rows
    )
    assert (out / "gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("5% data: sam rho=0.05 +3.00" in line for line in report.headline())


def test_unpaired_seeds_compare_means(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a0", optimizer="adafactor", subsample=0.2, seed=0, best=40.0)
    write_run(runs, "a1", optimizer="adafactor", subsample=0.2, seed=1, best=44.0)
    write_run(runs, "s5", optimizer="sam", rho=0.15, subsample=0.2, seed=5, best=45.0)
    report = compare.compare_runs(find_run_dirs([runs]), tmp_path / "r")
    g = next(g for g in report.gains if g.selection == "best" and g.metric == "score")
    assert not g.paired and g.mean == pytest.approx(3.0) and g.std is None


def test_benchmark_score_and_several_baselines(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ada", optimizer="adafactor", subsample=1.0, seed=0, best=60.0, score_name="superglue average")
    write_run(runs, "adamw", optimizer="adamw", subsample=1.0, seed=0, best=58.0, score_name="superglue average")
    write_run(
        runs,
        "sam",
        optimizer="sam",
        base="adafactor",
        rho=0.15,
        subsample=1.0,
        seed=0,
        best=62.0,
        score_name="superglue average",
    )
    dirs = find_run_dirs([runs])
    with pytest.raises(UserError, match="several baselines"):
        compare.compare_runs(dirs, tmp_path / "r")
    report = compare.compare_runs(dirs, tmp_path / "r", baseline="adamw")
    assert report.score_name == "superglue average"
    assert "Δ superglue average" in (tmp_path / "r" / "results.md").read_text()
    # The SAM run's base (adafactor) is not the only baseline: the label names it.
    g = next(g for g in report.gains if g.selection == "best" and g.metric == "score" and g.method.startswith("sam"))
    assert g.method == "sam+adafactor rho=0.15" and g.mean == pytest.approx(4.0)


def test_duplicate_seed_and_missing_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", optimizer="adafactor", subsample=1.0, seed=0, best=1.0)
    write_run(runs, "b", optimizer="adafactor", subsample=1.0, seed=0, best=2.0)
    with pytest.raises(UserError, match="seed 0"):
        compare.compare_runs(find_run_dirs([runs]), tmp_path / "r")
    with pytest.raises(UserError, match="not found"):
        find_run_dirs([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json"):
        find_run_dirs([tmp_path / "empty"])


# --------------------------------------------------------------------------- the grid, end to end


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5ForConditionalGeneration(
            T5Config(
                d_model=32,
                d_ff=64,
                d_kv=16,
                num_layers=2,
                num_heads=2,
                vocab_size=384,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def compare_cli(*argv):
    from samlm.cli import finetune_compare as command

    parser = OneLineParser(prog="samlm finetune-compare")
    command.add_arguments(parser)
    return command.run(parser.parse_args([str(a) for a in argv]))


def test_grid_runs_then_reports_and_skips_done_runs(t5_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--out",
        out,
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--data-dir",
        FIXTURES / "glue",
        "--optimizers",
        "adafactor,sam",
        "--subsample",
        "0.5,1",
        "--seeds",
        "0",
        "--steps",
        2,
        "--batch",
        2,
        "--eval-every",
        1,
    ]
    assert compare_cli(*argv) == 0
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == ["adafactor-sub0.5-seed0", "adafactor-sub1-seed0", "sam-sub0.5-seed0", "sam-sub1-seed0"]
    summary = json.loads((out / "runs" / "sam-sub0.5-seed0" / "summary.json").read_text())
    assert (summary["config"]["optimizer"], summary["config"]["subsample"], summary["config"]["rho"]) == (
        "sam",
        0.5,
        0.05,
    )
    assert summary["data"]["glue/rte"]["train_examples"] == 2  # round(0.5 * 3) = 2
    md = (out / "results.md").read_text()
    # the model column: the model's own name (a local directory without a card or a hub name in its config:
    # its type and full path), never the directory's basename alone
    model = f"t5 ({t5_dir.resolve()})"
    assert f"| {model} | 50% | sam rho=0.05 |" in md and f"| {model} | 100% | adafactor |" in md
    assert (out / "gain.png").is_file()
    capsys.readouterr()
    assert compare_cli(*argv) == 0  # everything done: only the report
    assert capsys.readouterr().err.count("done, skipping") == 4
    assert compare_cli("--out", tmp_path / "again", "--runs", out / "runs") == 0
    assert (tmp_path / "again" / "results.md").read_text() == md


def test_grid_flag_errors(t5_dir, tmp_path):
    with pytest.raises(UserError, match="unknown optimizer.s. samm"):
        compare_cli("--out", tmp_path / "x", "--model", t5_dir, "--task", "glue/rte", "--optimizers", "samm")
    with pytest.raises(UserError, match="nothing to compare"):
        compare_cli("--out", tmp_path / "x")
    with pytest.raises(UserError, match="comma-separated numbers"):
        compare_cli("--out", tmp_path / "x", "--model", t5_dir, "--task", "glue/rte", "--subsample", "a")
