"""A comparison's report cannot mislead: step times are medians after warm-up with step-time outliers
named and left out of the cost ratio, paired deltas carry a Student-t 95% interval that decides
ahead / behind / within noise, equal-compute runs are listed and drawn, the end-of-run sharpness
is a per-method chart, the val-loss plot has no degenerate zoom, thin or empty slices are warned about."""

import csv
import dataclasses
import io as stdio
import json
import shutil

import pytest

from samlm import io
from samlm.harness.pretrain import PretrainConfig
from samlm.studies import plots, report, report_checks, stats
from samlm.studies.compare import COMPUTE_SUFFIX, CompareConfig, compare
from samlm.studies.runs import COLUMNS, Run, load_run, step_time, step_time_outliers

STEP_COLUMN = next(c for c in COLUMNS if c.key == "step_s")


def fake_run(name, optimizer, seed, *, val_loss=2.0, steps=10, curve=(), windows=(), sharpness=None, **summary):
    """A run in memory: its summary, val-loss curve and timing windows (metrics lines' step_s)."""
    record = {
        "optimizer": optimizer,
        "rho": None if optimizer == "adamw" else 0.1,
        "lr": 0.01,
        "seed": seed,
        "steps": steps,
        "step": steps,
        "tokens": 100 * steps,
        "val_loss": val_loss,
        "config": {"ascent_fraction": 0.25, "steps": steps},
        "resolved": {"tuning_batches": 2, "report_batches": 2},
        **(sharpness or {}),
        **summary,
    }
    metrics = [{"step": s, "val_loss": v} for s, v in curve]
    metrics += [{"step": 100 + i, "step_s": t} for i, t in enumerate(windows)]
    return Run(name=name, path=None, summary=record, metrics=metrics)


# --------------------------------------------------------------------------- intervals and verdicts


def test_the_t_interval_matches_a_hand_worked_example():
    # differences -0.10, -0.20, -0.15: mean -0.15, sample std 0.05, n 3; t(0.975, 2) = 4.302653 (tables: 4.303),
    # half-width 4.302653 · 0.05 / √3 = 0.124207
    delta = stats.paired_delta([(0, 1.90), (1, 1.80), (2, 1.85)], [(0, 2.0), (1, 2.0), (2, 2.0)])
    assert delta == (pytest.approx(-0.15), pytest.approx(0.05), 3)
    low, high = stats.t_interval(delta)
    assert (low, high) == (pytest.approx(-0.15 - 0.124207, abs=1e-6), pytest.approx(-0.15 + 0.124207, abs=1e-6))
    assert stats.format_interval(delta) == "[-0.2742, -0.0258]"
    assert stats.verdict(delta) == "ahead"  # lower loss, interval below 0
    assert stats.verdict(delta, higher_is_better=True) == "behind"  # a score 0.15 lower
    # two pairs -0.1 and -0.2: the same mean, but t(0.975, 1) = 12.706: ±0.6353 crosses 0
    two = stats.mean_std([-0.1, -0.2])
    assert stats.t_interval(two) == (pytest.approx(-0.78531, abs=1e-5), pytest.approx(0.48531, abs=1e-5))
    assert stats.verdict(two) == "within noise"
    # one pair: no interval, no verdict
    assert stats.t_interval((-0.1, None, 1)) is None
    assert stats.format_interval((-0.1, None, 1)) == "no interval (n=1)"
    assert stats.verdict((-0.1, None, 1)) == "undecided (n=1)"
    assert stats.verdict((None, None, 0)) == "n/a" and stats.format_interval((None, None, 0)) == "n/a"
    assert stats.t_interval((0.3, 0.1, 4), confidence=0.9) == pytest.approx((0.3 - 0.117662, 0.3 + 0.117662), abs=1e-5)


def _seeds(optimizer, losses, **extra):
    return [fake_run(f"{optimizer}-{s}", optimizer, s, val_loss=v, **extra) for s, v in enumerate(losses)]


def test_ahead_behind_and_within_noise_in_the_tables():
    adamw = _seeds("adamw", [2.0, 2.2, 2.1])
    sam = _seeds("sam", [1.90, 2.11, 1.99])  # -0.10, -0.09, -0.11: consistently lower
    fsam = _seeds("fsam", [2.10, 2.31, 2.22])  # +0.10, +0.11, +0.12: consistently higher
    pfsam = _seeds("pfsam", [1.90, 2.30, 2.05])  # -0.10, +0.10, -0.05: noise
    rows = {r.optimizer: r for r in report.aggregate(adamw + sam + fsam + pfsam)}
    assert [rows[m].verdict_cell() for m in ("adamw", "sam", "fsam", "pfsam")] == [
        "(reference)",
        "ahead",
        "behind",
        "within noise",
    ]
    low, high = stats.t_interval(rows["sam"].delta)
    assert rows["sam"].interval_cell() == f"[{low:+.4f}, {high:+.4f}]" and high < 0
    table = report.markdown_table(list(rows.values()))
    assert "| Δ val loss vs adamw (paired) | 95% CI | verdict |" in table.splitlines()[0]
    assert "| -0.1000 ± 0.0100 | [-0.1248, -0.0752] | ahead |" in table

    # equal compute: AdamW at 1.5x the steps, 0.12 lower: sam is within noise there, ahead at equal steps
    longer = [
        dataclasses.replace(r, name=r.name + "-c", summary={**r.summary, "val_loss": r.summary["val_loss"] - 0.12})
        for r in adamw
    ]
    budget = report.budget_table({"steps": adamw + sam, "compute": longer + sam})
    sam_line = next(line for line in budget.splitlines() if line.startswith("| sam "))
    cells = [c.strip() for c in sam_line.strip("|").split("|")]
    assert cells[5:8] == ["-0.1000 ± 0.0100 (n=3)", "[-0.1248, -0.0752]", "ahead"]
    assert cells[9:12] == ["+0.0200 ± 0.0100 (n=3)", "[-0.0048, +0.0448]", "within noise"]
    text = report.report_markdown(adamw + sam, budgets={"steps": adamw + sam, "compute": longer + sam})
    assert "Student-t 95% interval" in text and "only when the interval excludes 0" in text


# --------------------------------------------------------------------------- step times


def test_step_time_is_a_median_after_warm_up():
    windows = fake_run("a", "adamw", 0, windows=[0.5, 0.010, 0.014, 0.011], step_s=0.1337)
    assert (step_time(windows).seconds, step_time(windows).source) == (0.011, "windows")  # the first window left out
    one = fake_run("b", "adamw", 0, windows=[0.2], step_s=0.2)
    assert (step_time(one).seconds, step_time(one).source) == (0.2, "mean")
    recorded = fake_run("c", "adamw", 0, windows=[0.5, 0.02], step_s=0.2, step_time_median_ms=9.0)
    assert (step_time(recorded).seconds, step_time(recorded).source) == (0.009, "recorded")
    # tokens/s at the median step time: 100 tokens per step / 0.011 s
    row = report.aggregate([windows])[0]
    assert row.cell(STEP_COLUMN) == "11.0" and row.cell(COLUMNS[-1]) == "9091"
    text = report.report_markdown([windows, one])
    assert "median over its timing windows after the first" in text and "Step time includes start-up" in text


def _tiny_compare(tmp_path):
    """A real two-seed comparison at both budgets (tiny model, 8 steps, evaluated every 2)."""
    base = PretrainConfig(
        layers=1,
        width=16,
        heads=2,
        context=8,
        batch=4,
        max_chars=4000,
        val_batches=1,
        steps=8,
        eval_every=2,
        sharpness=False,
        progress=False,
    )
    config = CompareConfig(
        out=str(tmp_path / "cmp"), optimizers=["adamw", "fsam"], seeds=[0, 1], base=base, budget="steps,compute"
    )
    compare(config)
    return tmp_path / "cmp"


# Per-step seconds each run is given (the first window is start-up): adamw's runs at both budgets
# 10-13 ms, fsam's 15 and 17 ms.
TIMES = {
    "adamw-seed0": 0.010,
    "adamw-seed1": 0.012,
    "adamw-seed0" + COMPUTE_SUFFIX: 0.011,
    "adamw-seed1" + COMPUTE_SUFFIX: 0.013,
    "fsam-rho0.05-seed0": 0.015,
    "fsam-rho0.05-seed1": 0.017,
}


def _set_times(out, times):
    """Rewrite each finished run's recorded step times (metrics.jsonl windows and summary.json)."""
    for name, seconds in times.items():
        lines = io.read_jsonl(out / name / "metrics.jsonl")
        timed = [line for line in lines if "step_s" in line and line.get("step_s") is not None]
        for i, line in enumerate(timed):
            line["step_s"] = 0.2 if i == 0 else seconds
        io.write_jsonl(out / name / "metrics.jsonl", lines)
        summary = json.loads((out / name / "summary.json").read_text())
        summary["step_s"] = seconds * 3
        summary["step_time_median_ms"] = seconds * 1000
        io.atomic_write_json(out / name / "summary.json", summary)


def _reload(out):
    runs = {name: load_run(out / name) for name in TIMES}
    steps = [runs[n] for n in ("adamw-seed0", "fsam-rho0.05-seed0", "adamw-seed1", "fsam-rho0.05-seed1")]
    compute = [runs[n] for n in TIMES if n.endswith(COMPUTE_SUFFIX) or n.startswith("fsam")]
    return steps, {"steps": steps, "compute": compute}


def _ratio(text):
    line = next(
        line for line in text.split("## Equal steps and equal compute")[1].splitlines() if line.startswith("| fsam")
    )
    return line.split("|")[4].strip()


def test_a_slowed_run_is_named_and_left_out_of_the_cost_ratio(tmp_path):
    out = _tiny_compare(tmp_path)
    text = (out / "report.md").read_text()
    # equal-compute runs: in the run list (marked), in the plots
    assert "Equal-compute runs" in text and f"`adamw-seed0{COMPUTE_SUFFIX}` (equal compute (model), 12 steps" in text
    assert "![val_loss](val_loss.png)" in text

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _set_times(copy, TIMES)
    steps, budgets = _reload(copy)
    assert step_time_outliers(steps + budgets["compute"]) == []
    before = report.report_markdown(steps, budgets=budgets)
    assert _ratio(before) == f"{16 / 11.5:.2f}x"  # medians: fsam 16 ms, adamw (4 runs) 11.5 ms
    assert "Step-time outlier" not in before

    _set_times(copy, {"adamw-seed0": 0.1628})  # one run ten times slower: a busy core
    steps, budgets = _reload(copy)
    [outlier] = step_time_outliers(steps + budgets["compute"])
    assert (outlier.run, outlier.seconds, outlier.others) == ("adamw-seed0", 0.1628, 0.012)
    after = report.report_markdown(steps, budgets=budgets)
    assert "**Step-time outlier**: `adamw-seed0` took 162.8 ms/step" in after
    assert "`adamw-seed0` (step-time outlier)" in after  # in the run list
    # the cost ratio is the other runs': adamw's median over its other 3 runs, 12 ms
    assert _ratio(after) == f"{16 / 12:.2f}x"
    adamw_row = next(r for r in report.aggregate(steps) if r.optimizer == "adamw")
    assert adamw_row.cell(STEP_COLUMN) == "12.0 (n=1)" and adamw_row.left_out == ["adamw-seed0"]
    files = report.write_report(tmp_path / "rewritten", steps, budgets=budgets)
    rows = {r["run"]: r for r in csv.DictReader(stdio.StringIO(files["csv"].read_text()))}
    assert rows["adamw-seed0"]["step_time_outlier"] == "True" and rows["adamw-seed1"]["step_time_outlier"] == "False"
    assert float(rows["adamw-seed1"]["step_time_s"]) == 0.012 and rows["adamw-seed1"]["step_time_from"] == "recorded"

    # both kinds of run in the plots, the equal-compute ones dashed and labelled
    fig = plots.val_loss_figure(steps, equal_compute=[r for r in budgets["compute"] if r.name.endswith(COMPUTE_SUFFIX)])
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    dashed = [label for label, line in lines.items() if line.get_linestyle() == "--"]
    assert dashed == ["adamw, equal compute, 12 steps (n=2)"]
    assert "adamw (n=2)" in lines and "fsam ρ=0.05 (n=2)" in lines


# --------------------------------------------------------------------------- plots


SHARP = {"hessian_lambda_max": 10.0, "gauss_newton_lambda_max": 9.0, "logit_functional_ratio": 3.0}


def test_the_sharpness_plot_is_per_method_with_the_legend_off_the_data():
    runs = [
        fake_run(f"{m}-{s}", m, s, sharpness={k: v * (1 + 0.1 * s + (m == "sam")) for k, v in SHARP.items()})
        for m in ("adamw", "sam")
        for s in (0, 1, 2)
    ]
    longer = [dataclasses.replace(r, name=r.name + "-c") for r in runs[:3]]
    fig = plots.sharpness_figure(runs, equal_compute=longer)
    assert len(fig.axes) == 3  # no run measured λ_max(P⁻¹H): no empty panel
    for ax in fig.axes:
        assert ax.get_xlabel() != "step"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["adamw", "sam ρ=0.1", "adamw\n(equal compute)"]
        # each method's seeds and their mean ± std, as points: no line over steps
        assert all(len(line.get_xdata()) <= 1 or line.get_linestyle() == "None" for line in ax.get_lines())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    [legend] = fig.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert plots.sharpness_figure([fake_run("a", "adamw", 0)]) is None


def test_the_val_loss_plot_has_no_degenerate_zoom():
    def runs(curve):
        return [fake_run(f"{m}-{s}", m, s, curve=curve) for m in ("adamw", "sam") for s in (0, 1)]

    many = plots.val_loss_figure(runs([(s, 3.0 - s / 10) for s in range(1, 11)]))
    assert len(many.axes) == 2 and min(many.axes[1].get_lines()[0].get_xdata()) >= 5
    legend = many.axes[1].get_legend()
    many.canvas.draw()
    renderer = many.canvas.get_renderer()
    assert not any(legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in many.axes)
    two = plots.val_loss_figure(runs([(5, 3.0), (10, 2.0)]))  # one point past step 5: no zoom panel
    assert len(two.axes) == 1 and two.axes[0].get_xlabel() == "step"
    one = plots.val_loss_figure(runs([(10, 2.0)]))  # one evaluation per run: per method, not a curve
    assert len(one.axes) == 1 and one.axes[0].get_xlabel() != "step" and "final" in one.axes[0].get_title()
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == ["adamw", "sam ρ=0.1"]
    assert plots.val_loss_figure([fake_run("a", "adamw", 0, val_loss=None)]) is None


def test_few_evaluations_and_an_empty_report_slice_are_warned_about(tmp_path):
    thin = _seeds("adamw", [2.0, 2.1], curve=[(5, 3.0), (10, 2.0)]) + _seeds("sam", [1.9, 2.0], curve=[(10, 2.0)])
    text = report.report_markdown(thin)
    assert (
        "**Few evaluations**: `adamw-0`, `adamw-1`, `sam-0`, `sam-1` measured the validation loss 1/2 time(s)" in text
    )
    assert "Empty report slice" not in text
    empty = [dataclasses.replace(r, summary={**r.summary, "resolved": {"report_batches": 0}}) for r in thin]
    text = report.report_markdown(empty)
    assert "**Empty report slice** in `adamw-0`" in text
    curves = [(s, 3.0) for s in range(1, 6)]
    fine = _seeds("adamw", [2.0, 2.1], curve=curves, windows=[0.1, 0.01, 0.01])
    assert "Warnings:" not in report.report_markdown(fine)
    assert report_checks.evaluations(fine[0]) == 5


def test_a_60_step_compare_with_the_default_cadence_draws_curves_of_at_least_5_points(tmp_path):
    """--eval-every unset: about 20 evaluations per run whatever --steps is, so every run of a short
    comparison (the equal-compute ones too) has a curve, and the report warns of no short curve."""
    base = PretrainConfig(
        layers=1,
        width=16,
        heads=2,
        context=8,
        batch=4,
        max_chars=4000,
        val_batches=1,
        steps=60,
        sharpness=False,
        progress=False,
    )
    out = tmp_path / "cmp"
    compare(CompareConfig(out=str(out), optimizers=["adamw", "sam"], seeds=[0], base=base, budget="steps,compute"))
    runs = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(runs) == 3  # adamw, sam, adamw at equal compute
    for run in runs:
        points = [line for line in io.read_jsonl(run / "metrics.jsonl") if line.get("val_loss") is not None]
        assert len(points) >= 5, (run.name, len(points))
    assert f"fewer than {report_checks.MIN_EVALUATIONS}" not in (out / "report.md").read_text()
    assert (out / "val_loss.png").is_file()


def test_the_run_list_names_the_budget_of_each_equal_compute_run(tmp_path):
    from samlm.studies.runs import Run

    def run(name, steps):
        return Run(name, tmp_path / name, {"steps": steps, "optimizer": name.split("-")[0]})

    at_steps = [run("adamw-seed0", 10), run("sam-seed0", 10)]
    by_model, by_clock = run("adamw-seed0-equal-compute", 12), run("adamw-seed0-equal-clock", 14)
    budgets = {"steps": at_steps, "compute": [by_model, at_steps[1]], "time": [by_clock, at_steps[1]]}
    text = "\n".join(report_checks.run_list(at_steps, budgets, []))
    assert "`adamw-seed0-equal-compute` (equal compute (model), 12 steps)" in text
    assert "`adamw-seed0-equal-clock` (equal compute (clock), 14 steps)" in text
