"""The pretraining study's data: presets with a data budget prepare their corpus once into
``OUT/data`` (exactly the tokens the runs read), and the preset's data, tokenizer, device and
precision settings can be overridden."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from samlm.data import load_prepared, prepare, writer
from samlm.errors import UserError
from samlm.harness.pretrain.build import resolve_steps
from samlm.models import build_decoder, count_parameters
from samlm.studies import pretrain_study as ps
from samlm.studies.grid import compute_factors

GPT2_VOCAB = 50257


@pytest.mark.parametrize("name", ["gpu-24m", "gpu-118m"])
def test_gpu_presets_prepare_exactly_the_tokens_their_longest_run_reads(name):
    preset = ps.PRESETS[name]
    factor = max(compute_factors(ps.STUDY_OPTIMIZERS, preset.base.ascent_fraction).values())
    longest = 0
    for size in preset.sizes:
        with torch.device("meta"):  # the shape only: no memory
            model = build_decoder(
                preset.base.arch,
                layers=size.layers,
                width=size.width,
                heads=size.heads,
                context=preset.base.context,
                vocab_size=GPT2_VOCAB,
            )
        config = dataclasses.replace(
            preset.base,
            layers=size.layers,
            width=size.width,
            heads=size.heads,
            tokens_per_param=preset.base.tokens_per_param * factor,
        )
        steps, _ = resolve_steps(config, count_parameters(model), count_parameters(model, exclude_embeddings=True))
        longest = max(longest, steps * config.batch * config.context + 1)
    val = 2 * preset.base.val_batches * preset.base.micro_batch * preset.base.context + 1
    assert preset.data_tokens == (longest, val)


def _tiny_budget_preset() -> ps.StudyPreset:
    base = dataclasses.replace(
        ps.PRESETS["cpu"].base,
        steps=3,
        tokens_per_param=None,
        eval_every=3,
        val_batches=2,
        batch=4,
        context=16,
        sharpness=False,
    )
    return dataclasses.replace(
        ps.PRESETS["cpu"],
        sizes=(ps.ModelSize("1x8", 1, 8, 2),),
        base=base,
        lr="adamw=1e-2",
        rho="fsam=0.05",
        seeds=(0,),
        jobs=1,
        data_tokens=(6000, 700),
    )


def test_a_preset_with_a_data_budget_prepares_once_into_the_study(tmp_path, monkeypatch):
    calls = []
    real = writer.Preparation.run
    monkeypatch.setattr(writer.Preparation, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    study = ps.PretrainStudy(out=str(tmp_path / "study"), preset=_tiny_budget_preset(), optimizers=["adamw", "fsam"])
    result = ps.run_study(study)
    assert result.interrupted is None
    meta = load_prepared(tmp_path / "study" / "data").meta
    assert meta["tokens"] == {"train": 6000, "val": 700}
    run = next(iter(result.stages["1x8/final"].summaries))
    config = json.loads((tmp_path / "study" / "1x8" / "final" / run / "config.json").read_text())
    assert config["config"]["data"] == str(tmp_path / "study" / "data")
    assert config["resolved"]["train_tokens"] == 6000
    ps.run_study(study)
    assert len(calls) == 1  # the second call reuses OUT/data (and every run)


def test_study_overrides_replace_the_presets_settings(tmp_path):
    other = tmp_path / "prep"
    prepare("python-stdlib", other, max_chars=300_000)
    study = ps.PretrainStudy(
        out=str(tmp_path / "s"),
        preset=ps.PRESETS["gpu-24m"],
        overrides={"data": str(other), "device": "cpu", "mixed_precision": "no", "compile": False, "tokenizer": None},
    )
    base = study.base_config()
    assert (base.data, base.device, base.mixed_precision, base.compile) == (str(other), "cpu", "no", False)
    assert base.tokenizer == "gpt2"  # None: not overridden
    with pytest.raises(UserError, match="cannot override lr"):
        ps.PretrainStudy(out=str(tmp_path / "s"), preset=ps.PRESETS["cpu"], overrides={"lr": 1.0})


def test_a_gpu_preset_dry_runs_on_a_machine_without_cuda(capsys):
    from samlm.cli import main

    assert main(["study", "pretrain", "--preset", "gpu-118m", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "3,706,585,089 training and 8,388,609 validation tokens" in out
    assert "24m:" in out and "118m:" in out
    if not torch.cuda.is_available():
        assert "every setting but the device was checked" in err


def test_study_override_flags_reach_the_runs(tmp_path, capsys):
    from samlm.cli import main

    assert (
        main(
            [
                "study",
                "pretrain",
                "--preset",
                "cpu",
                "--data",
                "python-stdlib",
                "--tokenizer",
                "bpe:512",
                "--device",
                "cpu",
                "--dry-run",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    from samlm.studies.pretrain_study import PRESETS, PretrainStudySettings

    study = PretrainStudySettings(data="python-stdlib", tokenizer="bpe:512").study()
    assert study.sweep(PRESETS["cpu"].sizes[0]).base.data == "python-stdlib"
    assert study.sweep(PRESETS["cpu"].sizes[0]).base.tokenizer == "bpe:512"


def test_the_demo_takes_a_prepared_directory(tmp_path, capsys):
    from samlm.cli import main

    prepared = tmp_path / "prep"
    prepare("python-stdlib", prepared, tokenizer="bpe:300", max_chars=300_000)
    out = tmp_path / "demo"
    assert (
        main(["demo", "--data", str(prepared), "--steps", "2", "--seeds", "0", "--jobs", "1", "--out", str(out)]) == 0
    )
    config = json.loads(next(out.glob("adamw*/config.json")).read_text())
    assert config["config"]["data"] == str(prepared) and config["resolved"]["vocab_size"] == 300
