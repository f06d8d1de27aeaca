"""``samlm study``'s flags are settings groups (one ``setting(...)`` field each: flag, default,
help and check generated), and ``study.json`` records the time of every call."""

from __future__ import annotations

import dataclasses
import json

import pytest

from samlm.cli import main
from samlm.harness import settings
from samlm.studies import finetune_study as fs
from samlm.studies import grid
from samlm.studies import pretrain_study as ps

STUDY_FLAGS = ("--preset", "--out", "--seeds", "--jobs", "--steps", "--overwrite", "--dry-run")


@pytest.mark.parametrize(
    "cls, extra",
    [
        (ps.PretrainStudySettings, ("--optimizers", "--sweep-seeds")),
        (fs.FinetuneStudySettings, ("--model", "--model-label", "--data-dir")),
    ],
)
def test_every_study_flag_is_a_setting_field(cls, extra):
    """Each flag comes from one field of the study's settings group (no hand-written argparse)."""
    flags = {settings.flag_of(f) for f in settings.fields(cls)}
    assert set(STUDY_FLAGS) | set(extra) <= flags
    assert (
        settings.flag(cls, "preset") == "--preset"
        and cls().preset in cls.__dataclass_fields__["preset"].metadata["choices"]
    )


def test_flags_parse_into_the_study(monkeypatch):
    """The CLI builds the study from the settings: the seeds, sweep seeds, jobs, steps and --out given."""
    seen = {}
    monkeypatch.setattr(
        ps, "run_study", lambda study: seen.setdefault("study", study) and (_ for _ in ()).throw(SystemExit(0))
    )
    with pytest.raises(SystemExit):
        main(
            [
                "study",
                "pretrain",
                "--seeds",
                "3,4",
                "--sweep-seeds",
                "7",
                "--jobs",
                "2",
                "--steps",
                "5",
                "--out",
                "/tmp/x-study",
                "--optimizers",
                "adamw,fsam",
            ]
        )
    study = seen["study"]
    assert (list(study.seeds), list(study.sweep_seeds), study.jobs, study.steps, study.out) == (
        [3, 4],
        [7],
        2,
        5,
        "/tmp/x-study",
    )
    assert list(study.optimizers) == ["adamw", "fsam"] and study.preset is ps.PRESETS["cpu"]
    config = fs.FinetuneStudySettings(model_label="tiny", seeds="1", data_dir="d")
    assert (config.study().model_label, list(config.study().seeds), config.study().data_dir) == ("tiny", [1], "d")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "pretrain", "--seeds", "a"], "--seeds must be comma-separated integers"),
        (["study", "pretrain", "--sweep-seeds", "-1"], "--sweep-seeds must be integers >= 0"),
        (["study", "pretrain", "--jobs", "0"], "--jobs must be a positive integer"),
        (["study", "finetune", "--steps", "0"], "--steps must be a positive integer"),
        (["study", "pretrain", "--optimizers", "adamw,nope"], "unknown optimizer"),
    ],
)
def test_bad_study_flags_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_study_time_adds_up_over_calls(tmp_path):
    """``seconds`` is the total of every call (each call's own time kept); --overwrite starts over."""
    record = tmp_path / "study.json"
    first = grid.study_seconds(record, 10.04)
    record.write_text(json.dumps({"format": "x", **first}))
    second = grid.study_seconds(record, 2.5)
    assert second == {"seconds": 12.5, "calls_seconds": [10.0, 2.5]}
    assert grid.study_seconds(record, 1.0, restart=True) == {"seconds": 1.0, "calls_seconds": [1.0]}
    assert "12 s in all over 2 calls (this call 2 s)" in grid.study_time_text(second, 2.5)


def test_pretrain_study_json_records_the_total_over_calls(tmp_path):
    """Two calls of a (tiny) study: the second finds every run finished, and study.json's
    ``seconds`` is the sum of both calls' times."""
    base = dataclasses.replace(
        ps.PRESETS["cpu"].base,
        steps=2,
        tokens_per_param=None,
        eval_every=2,
        val_batches=1,
        batch=2,
        context=8,
        max_chars=5_000,
        sharpness=False,
    )
    preset = dataclasses.replace(
        ps.PRESETS["cpu"],
        sizes=(ps.ModelSize("1x8", 1, 8, 2),),
        base=base,
        lr="adamw=1e-2",
        rho="sam=0.05",
        seeds=(0,),
        jobs=1,
    )
    study = ps.PretrainStudy(out=str(tmp_path / "s"), preset=preset, optimizers=["adamw", "sam"])
    one = ps.run_study(study)
    two = ps.run_study(study)
    record = json.loads((tmp_path / "s" / "study.json").read_text())
    assert record["calls_seconds"] == [round(one.seconds, 1), round(two.seconds, 1)]
    assert record["seconds"] == pytest.approx(round(one.seconds, 1) + round(two.seconds, 1))
    assert "over 2 calls" in (tmp_path / "s" / "report.md").read_text()


def test_tracker_flags_reach_every_run_of_a_study():
    """--report-to, --run-name, --log-every of a study are the runs' own settings (one definition)."""
    config = ps.PretrainStudySettings(report_to="tensorboard", run_name="study-x", log_every=5)
    base = config.study().base_config()
    assert (base.report_to, base.run_name, base.log_every) == ("tensorboard", "study-x", 5)
    assert ps.PretrainStudySettings().study().base_config().report_to == "none"
    ft = fs.FinetuneStudySettings(model="some/dir", report_to="mlflow").study().base
    assert ft.report_to == "mlflow" and ft.log_every == 10
    assert settings.flag(ps.PretrainStudySettings, "report_to") == "--report-to"


def test_sharpness_settings_leave_the_resume_identity_when_sharpness_is_off():
    """With --no-sharpness (in the run or in its resume) the sharpness settings do not act, so a
    resume may change them; with sharpness on in both they must match."""
    from samlm.harness.pretrain import PretrainConfig
    from samlm.harness.pretrain.config import identity

    def ident(**kw):
        return identity({"config": PretrainConfig(**kw).as_dict(), "resolved": {}})

    off = ident(sharpness=False, sharpness_iters=20)
    assert settings.differences(off, ident(sharpness=False, sharpness_iters=5, sharpness_batch_size=2)) == []
    assert settings.differences(ident(sharpness_iters=20), ident(sharpness=False, sharpness_iters=5)) == []
    assert settings.differences(ident(sharpness_iters=20), ident(sharpness_iters=5)) == ["sharpness_iters"]
    assert settings.differences(off, ident(sharpness=False, lr=1e-2)) == ["lr"]
