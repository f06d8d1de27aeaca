"""Equal compute by the clock (``--budget time``): the steps that equalise the measured step times,
the calibration stored and reused on resume, its errors; method variants (``sam@every5``); and
``samlm study cheap``, which runs all three budgets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from samlm.cli import main
from samlm.errors import UserError
from samlm.harness.pretrain import PretrainConfig
from samlm.studies import cheap_study, clock, report
from samlm.studies.compare import COMPUTE_SUFFIX, CompareConfig, compare
from samlm.studies.grid import budget_headers, compute_factors, parse_method, parse_optimizers
from samlm.studies.runs import Run

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


def _calibration(config: CompareConfig, ratios: dict[str, float]) -> dict:
    """A calibration as :func:`clock.measure` writes it, with the given measured ratios."""
    return {
        "format": clock.FORMAT,
        "identity": clock.identity(config.method_configs()),
        "reference": next(iter(ratios)),
        "methods": {m: {"step_s": 0.01 * r, "ratio": r, "model": 1.0} for m, r in ratios.items()},
        "rounds": 2,
        "untimed_rounds": 1,
        "steps_per_round": 1,
        "machine": "test",
        "threads": 1,
        "torch": "test",
        "seconds": 0.0,
    }


def test_the_clock_budget_gives_the_steps_that_equalise_measured_time():
    config = CompareConfig(
        out="o",
        optimizers=["adamw", "sam", "fsam"],
        seeds=[0],
        rho=0.1,
        base=dataclasses.replace(TINY, steps=400, warmup=20, eval_every=80),
        budget="steps,compute,time",
    )
    # measured: SAM 1.5x AdamW's step time, F-SAM 1.8x (the model says 1.25x and 1.5x)
    ratios = {"adamw": 1.0, "sam": 1.5, "fsam": 1.8}
    runs = {r.name: r for r in config.runs(_calibration(config, ratios))}
    clocked = {r.method: r for r in runs.values() if "time" in r.budgets}
    assert {m: r.config.steps for m, r in clocked.items()} == {"adamw": 720, "sam": 480, "fsam": 400}
    for method, run in clocked.items():  # steps x measured step time = F-SAM's 400 x 1.8
        assert run.config.steps * ratios[method] == pytest.approx(720, abs=1)
    assert runs["adamw-seed0" + clock.CLOCK_SUFFIX].config.warmup == 36  # the schedule stretched too
    # F-SAM is the costliest by both: one run serves every budget; AdamW has one run per budget
    assert runs["fsam-rho0.1-seed0"].budgets == ("steps", "compute", "time")
    assert runs["adamw-seed0" + COMPUTE_SUFFIX].config.steps == 600 and not any(r.estimated for r in runs.values())
    assert clock.time_factors(_calibration(config, ratios)) == pytest.approx({"adamw": 1.8, "sam": 1.2, "fsam": 1.0})
    # before a calibration the clock's runs are planned apart, at the model's steps, marked estimated
    estimated = [r for r in config.runs() if r.estimated]
    assert {r.name for r in estimated} == {"adamw-seed0" + clock.CLOCK_SUFFIX, "sam-rho0.1-seed0" + clock.CLOCK_SUFFIX}


def test_a_clock_budget_needs_two_methods_and_whole_sam_cycles(capsys):
    with pytest.raises(UserError, match="two or more optimizers"):
        CompareConfig(out="o", optimizers=["sam"], base=TINY, budget="steps,time").runs()
    with pytest.raises(UserError, match="--sam-start"):
        CompareConfig(
            out="o", optimizers=["adamw", "sam"], base=dataclasses.replace(TINY, sam_start=0.5), budget="time"
        ).runs()
    assert main(["compare", "--optimizers", "adamw", "--budget", "time", "--steps", "4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samlm: error: --budget time") and "\n" not in err


def test_the_calibration_is_stored_and_reused_on_resume(tmp_path, monkeypatch):
    calls = []

    def fake_measure(configs, **kw):
        calls.append(list(configs))
        record = _calibration(config, {"adamw": 1.0, "sam": 2.0})
        record["identity"] = clock.identity(configs)
        return record

    monkeypatch.setattr(clock, "measure", fake_measure)
    config = CompareConfig(
        out=str(tmp_path / "cmp"), optimizers=["adamw", "sam"], seeds=[0], base=TINY, budget="steps,time"
    )
    first = compare(config)
    assert first.completed and calls == [["adamw", "sam"]]
    stored = json.loads((tmp_path / "cmp" / clock.CALIBRATION_FILE).read_text())
    assert stored["methods"]["sam"]["ratio"] == 2.0
    assert first.summaries["adamw-seed0" + clock.CLOCK_SUFFIX]["steps"] == 16  # 2x AdamW's steps
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Equal compute by the clock: the calibration" in text and "| equal compute (clock) |" in text
    assert "| sam | 20.00 | 2.00x |" in text
    # resumed: the stored calibration, not a new measurement; every run finished already
    again = compare(config)
    assert calls == [["adamw", "sam"]] and len(again.skipped) == len(again.summaries) == 3
    # other settings: the stored calibration does not apply
    assert clock.stored(config.out, config.method_configs()) is not None
    other = dataclasses.replace(config, base=dataclasses.replace(TINY, width=32))
    assert clock.stored(other.out, other.method_configs()) is None
    # continued with other --threads/--jobs: the same calibration, so the runs keep their steps
    threads = dataclasses.replace(config, jobs=2, base=dataclasses.replace(TINY, threads=2))
    assert clock.stored(threads.out, threads.method_configs()) is not None
    compare(dataclasses.replace(config, overwrite=True))  # --overwrite measures again
    assert len(calls) == 2


def test_the_calibration_times_every_method_side_by_side():
    configs = CompareConfig(out="o", optimizers=["adamw", "sam", "looksam"], base=TINY).method_configs()
    record = clock.measure(configs, rounds=2, untimed=1)
    assert record["reference"] == "adamw" and record["methods"]["adamw"]["ratio"] == 1.0
    assert record["steps_per_round"] == 5  # LookSAM's whole cycle
    assert all(row["step_s"] > 0 for row in record["methods"].values())
    assert record["methods"]["sam"]["model"] == 1.25 and record["identity"] == clock.identity(configs)
    assert "| looksam |" in clock.calibration_table(record)


def test_method_variants_have_their_own_sam_schedule():
    assert parse_method("sam@every5") == ("sam", 5) and parse_method("fsam") == ("fsam", None)
    for bad in ("adamw@every5", "sam@every0", "sam@everyx"):
        with pytest.raises(UserError):
            parse_method(bad)
    assert parse_optimizers("adamw,sam,sam@every5") == ["adamw", "sam", "sam@every5"]
    assert compute_factors(["adamw", "sam@every5", "sam"], 0.25) == pytest.approx(
        {"adamw": 1.25, "sam@every5": 1.25 / 1.05, "sam": 1.0}
    )
    config = CompareConfig(
        out="o", optimizers=["sam", "sam@every5"], rho="sam=0.05,sam@every5=0.1", base=TINY, budget="steps"
    )
    runs = {r.name: r.config for r in config.runs()}
    assert runs["sam@every5-rho0.1-seed0"].sam_every == 5 and runs["sam-rho0.05-seed0"].sam_every == 1
    summary = {"optimizer": "sam", "rho": 0.1, "lr": 0.01}
    assert Run("sam@every5-rho0.1-seed0", None, summary).group == ("sam@every5", 0.1, 0.01)
    assert Run("sam-rho0.1-seed0", None, summary).group == ("sam", 0.1, 0.01)


def test_the_report_names_both_equal_compute_budgets():
    assert budget_headers(["steps", "compute"])["compute"] == "equal compute"
    names = budget_headers(["steps", "compute", "time"])
    assert names["compute"] == "equal compute (model)" and names["time"] == "equal compute (clock)"

    def run(name, optimizer, seed, loss, steps):
        summary = {
            "optimizer": optimizer,
            "rho": None if optimizer == "adamw" else 0.1,
            "seed": seed,
            "val_loss": loss,
            "steps": steps,
            "step_s": 0.01,
            "config": {"ascent_fraction": 0.25},
        }
        return Run(name, None, summary)

    steps = [run(f"a{s}", "adamw", s, 2.0, 10) for s in (0, 1)] + [run(f"s{s}", "sam", s, 1.9, 10) for s in (0, 1)]
    clocked = [run(f"A{s}", "adamw", s, 1.9 + s / 100, 15) for s in (0, 1)] + steps[2:]
    table = report.budget_table({"steps": steps, "compute": steps, "time": clocked})
    header = table.splitlines()[0]
    assert "| equal compute (model) |" in header and "| steps (equal compute (clock)) |" in header


def test_cheap_study_dry_run_lists_every_run(capsys):
    assert main(["study", "cheap", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("shakespeare ", "python-bpe512 "))]
    # per corpus: sweep = (AdamW's 3 lrs + 6 methods x 3 lrs x 2 ρ) x 2 seeds; final = 5 seeds x
    # (7 methods at equal steps + 6 at equal compute (model) + 6 at equal compute (clock); F-SAM is the costliest)
    assert len(lines) == 2 * ((3 + 6 * 6) * 2 + 5 * (7 + 6 + 6))
    for method in cheap_study.CHEAP_OPTIMIZERS:
        assert any(f"final: {method}-" in line and "seed4" in line for line in lines), method
    assert "shakespeare sweep: sam@every5-rho0.1-lr0.048-seed1 (steps; 1x the steps)" in out
    assert "python-bpe512 final: looksam-rho0.05-lr0.012-seed4-equal-clock (time;" in out
    assert "estimated time" in out and "min in all" in out
    assert main(["study", "cheap", "--preset", "gpu-24m", "--dry-run"]) == 0
    assert "c4 final: adamw-lr0.0005-seed4" in capsys.readouterr().out


def test_seed_defaults():
    settings = cheap_study.CheapStudySettings()
    study = settings.study()
    assert study.preset.seeds == (0, 1, 2, 3, 4) and study.preset.sweep_seeds == (0, 1)
    sweep = study.sweep(study.preset.corpora[0])
    assert list(sweep.seeds) == [0, 1] and sweep.budget == "steps"
    final = study.final(study.preset.corpora[0], {"adamw": (None, 0.01), "sam": (0.1, 0.01)})
    assert list(final.seeds) == [0, 1, 2, 3, 4] and final.budget == "steps,compute,time" and final.base.robustness
    # the other studies: 5 seeds and a 2-seed sweep where the budget allows; the CPU presets keep their
    # documented times (3 seeds, a 1-seed sweep)
    from samlm.studies import pretrain_study, robustness_study

    for name, preset in pretrain_study.PRESETS.items():
        powered = not name.startswith("cpu")
        assert preset.seeds == ((0, 1, 2, 3, 4) if powered else (0, 1, 2)), name
        assert preset.sweep_seeds == ((0, 1) if powered else (0,)), name
    assert robustness_study.presets()["gpu-24m"].seeds == (0, 1, 2, 3, 4)
    assert robustness_study.presets()["cpu"].seeds == (0, 1, 2)
    # the second corpus: BPE-512 on Python source, forgetting measured on the other corpus
    second = study.corpus_study(study.preset.corpora[1]).base_config()
    assert (second.data, second.tokenizer, second.forget_data) == ("python-stdlib", "bpe:512", "tinyshakespeare")


def test_cheap_study_end_to_end_and_resumed(tmp_path, monkeypatch):
    """Sweep on two seeds, each method's choice, the final runs under three budgets; the report has the
    chosen points, a row per method and the calibration; a second call reruns nothing."""
    monkeypatch.setattr(
        clock,
        "measure",
        lambda configs, **kw: {
            **_calibration(CompareConfig(out="o", optimizers=list(configs), base=TINY), {m: 1.0 for m in configs}),
            "identity": clock.identity(configs),
            "methods": {m: {"step_s": 0.01, "ratio": 1.0 + 0.1 * i, "model": 1.0} for i, m in enumerate(configs)},
        },
    )
    base = dataclasses.replace(TINY, steps=4, eval_every=2, val_batches=1, max_chars=200_000)
    preset = cheap_study.CheapPreset(
        "tiny",
        cheap_study.ModelSize("1x16", 1, 16, 2),
        base,
        (
            cheap_study.Corpus("shakespeare", "tinyshakespeare", "bytes", "python-stdlib", 4, 0.001),
            cheap_study.Corpus("python", "python-stdlib", "bytes", "tinyshakespeare", 4, 0.001),
        ),
        "adamw=1e-2,adamw=3e-2,sam=1e-2,sam@every5=1e-2",
        "sam=0.05,sam@every5=0.1",
        seeds=(0, 1),
        jobs=1,
    )
    study = cheap_study.CheapStudy(
        out=str(tmp_path / "cheap"), preset=preset, optimizers=["adamw", "sam", "sam@every5"], robustness=False
    )
    result = cheap_study.run_study(study)
    assert result.interrupted is None and set(result.chosen) == {"shakespeare", "python"}
    final = result.stages["python/final"]
    # measured (the fake calibration): sam@every5 the slowest, so SAM and AdamW get clock runs of their own
    assert any(n.startswith("sam-") and n.endswith(clock.CLOCK_SUFFIX) for n in final.summaries)
    assert not any(n.startswith("sam@every5-") and n.endswith(clock.CLOCK_SUFFIX) for n in final.summaries)
    import csv

    rows = list(csv.DictReader((tmp_path / "cheap" / "python" / "1x16" / "final" / "results.csv").open()))
    assert {(r["optimizer"], r["method"]) for r in rows} == {("adamw", "adamw"), ("sam", "sam"), ("sam", "sam@every5")}
    text = (tmp_path / "cheap" / "report.md").read_text()
    assert text.count("### Equal compute by the clock: the calibration") == 2
    assert "| sam@every5 | 0.01 | 0.1 |" in text and "equal compute (model)" in text
    again = cheap_study.run_study(study)
    assert all(len(stage.skipped) == len(stage.summaries) for stage in again.stages.values())


def test_a_tuned_choice_on_the_edge_of_its_grid_is_marked():
    def run(lr, seed, loss):
        summary = {"optimizer": "adamw", "rho": None, "lr": lr, "seed": seed, "val_loss": loss, "report_loss": loss}
        return Run(f"adamw-lr{lr:g}-seed{seed}", None, summary)

    runs = [run(lr, s, loss) for s in (0, 1) for lr, loss in ((1e-3, 2.0), (3e-3, 2.1), (1e-2, 2.2))]
    assert "| 0.001 (edge) |" in report.tuned_table(runs)
    runs = [run(lr, s, loss) for s in (0, 1) for lr, loss in ((1e-3, 2.1), (3e-3, 2.0), (1e-2, 2.2))]
    assert "(edge)" not in report.tuned_table(runs).split("\n", 2)[2]


def test_compare_dry_run_marks_the_clock_runs_planned_by_the_model(capsys):
    args = ["compare", "--optimizers", "adamw,sam", "--budget", "steps,time", "--steps", "40", "--dry-run"]
    assert main([*args, "--out", "/nonexistent/cmp"]) == 0
    out = capsys.readouterr().out
    assert "adamw-seed0-equal-clock" in out and "(time; 50 steps (the FLOP model's, until the calibration))" in out


def test_finetune_compare_refuses_the_clock_budget_and_method_variants(tmp_path):
    from pathlib import Path

    from samlm.harness.finetune.config import FinetuneConfig
    from samlm.studies.finetune_grid import FinetuneGrid
    from tinymodels import save_t5

    glue = Path(__file__).parent / "fixtures" / "glue"
    base = FinetuneConfig(model=str(save_t5(tmp_path / "t5")), task="glue/rte", data_dir=str(glue), steps=2)
    with pytest.raises(UserError, match="--budget time .* is samlm compare's"):
        FinetuneGrid(out=str(tmp_path / "o"), base=base, optimizers="adafactor,sam", budget="steps,time").runs()
    with pytest.raises(UserError, match="sam@every5: method variants"):
        FinetuneGrid(out=str(tmp_path / "o"), base=base, optimizers="adafactor,sam@every5").runs()
