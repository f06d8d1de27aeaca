"""Run settings are defined once (samlm.harness.settings): the flags, the checks, config.json
and the --resume identity all come from the dataclass fields, and the groups both harnesses
share give a flag the same meaning in every command."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from samlm import cli
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune import FinetuneConfig
from samlm.harness.loop import LoopConfig
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.config import identity as pretrain_identity
from samlm.studies.grid import GridSettings

CONFIGS = (PretrainConfig, FinetuneConfig)
SHARED_GROUPS = (
    settings.OptimizerSettings,
    settings.ScheduleSettings,
    settings.BatchSettings,
    settings.LoopSettings,
    settings.ParallelSettings,
)


def parser_for(command: str) -> argparse.ArgumentParser:
    return cli.build_parser()._subparsers._group_actions[0].choices[command]


def flags_of(command: str) -> dict[str, argparse.Action]:
    return {flag: action for action in parser_for(command)._actions for flag in action.option_strings}


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_one_flag_and_no_flag_has_its_own_default(cls):
    command = {PretrainConfig: "pretrain", FinetuneConfig: "finetune"}[cls]
    actions = {a.dest: a for a in parser_for(command)._actions if a.option_strings and a.dest != "help"}
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    assert set(actions) == names
    # The dataclass holds the defaults: a flag not given leaves its field to the dataclass.
    assert all(a.default is argparse.SUPPRESS for a in actions.values())
    assert settings.from_args(cls, parser_for(command).parse_args([])) == cls()


def test_parsed_flags_set_exactly_their_fields():
    args = parser_for("pretrain").parse_args(
        ["--lr", "0.01", "--betas", "0.8,0.9", "--no-sharpness", "--grad-accum", "2", "--clip", "1.5"]
    )
    config = settings.from_args(PretrainConfig, args)
    changed = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
    assert changed == {"lr", "betas", "sharpness", "grad_accum", "clip"}
    assert config.betas == (0.8, 0.9) and config.sharpness is False


@pytest.mark.parametrize("group", SHARED_GROUPS)
def test_shared_groups_are_the_same_flags_in_both_harnesses(group):
    pretrain, finetune = flags_of("pretrain"), flags_of("finetune")
    for field in dataclasses.fields(group):
        if not field.metadata.get("cli", True):  # a library-only setting (run_group: set by the comparisons)
            continue
        flag = settings.flag_of(field)
        if field.type == "bool" and field.default is True:
            flag = "--no-" + flag[2:]
        assert flag in pretrain and flag in finetune, flag
        assert pretrain[flag].type is finetune[flag].type and pretrain[flag].choices == finetune[flag].choices


def test_one_spelling_per_setting_across_commands():
    every = {cmd: set(flags_of(cmd)) for cmd in ("pretrain", "finetune", "compare", "finetune-compare")}
    old_spellings = {"--max-grad-norm", "--warmup-steps", "--bf16", "--seq"}
    assert not set().union(*every.values()) & old_spellings
    for flag in ("--batch", "--grad-accum", "--clip", "--warmup", "--nonfinite", "--max-nonfinite"):
        assert all(flag in flags for flags in every.values()), flag
    for flag in ("--overwrite", "--dry-run"):
        assert all(flag in flags for flags in every.values()), flag
    assert "--jobs" in every["compare"] and "--jobs" in every["finetune-compare"]
    assert "--resume" in every["pretrain"] and "--resume" in every["finetune"]


@pytest.mark.parametrize("cls", CONFIGS)
def test_config_json_round_trips(cls):
    config = cls(lr=0.5, betas=(0.7, 0.8), clip=2.0, out="o", model="m" if cls is FinetuneConfig else None)
    record = json.loads(json.dumps(config.as_dict()))
    assert cls.from_mapping(record) == config
    with pytest.raises(UserError, match="unknown .* setting.*: bogus"):
        cls.from_mapping(dict(record, bogus=1))


def test_checks_name_the_flag_in_one_line():
    for config, message in [
        (PretrainConfig(lr=0.0), "--lr must be a finite number > 0.0"),
        (PretrainConfig(batch=6, grad_accum=4), "--batch 6 is not divisible by --grad-accum 4"),
        (PretrainConfig(grad_accum=0), "--grad-accum must be a positive integer"),
        (PretrainConfig(nonfinite="maybe"), "--nonfinite must be one of skip, stop"),
        (PretrainConfig(optimizer="lion"), "unknown optimizer 'lion'"),
        (PretrainConfig(betas=(0.9, 1.0)), "--betas must be a finite number in [0.0, 1.0)"),
        (FinetuneConfig(model="m", out="o", subsample=1.5), "--subsample must be in (0, 1]"),
        (FinetuneConfig(model="m", out="o", optimizer="adamw", rho=0.1), "--rho applies to SAM-family"),
        (FinetuneConfig(model="m"), "--out is required"),
        (FinetuneConfig(model="m", out="o", steps=None), "--steps is required for fine-tuning"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            settings.validate(config)


def test_resume_identity_ignores_observation_settings_and_sees_the_others():
    base = {"config": PretrainConfig().as_dict(), "resolved": {"total_steps": 10, "rho": None}}
    observed = {
        "config": PretrainConfig(
            eval_every=7, out="elsewhere", threads=3, progress=False, keep_checkpoints=5
        ).as_dict(),
        "resolved": base["resolved"],
    }
    assert pretrain_identity(base) == pretrain_identity(observed)
    for change in ({"lr": 0.1}, {"batch": 64}, {"seed": 3}, {"clip": 1.0}, {"sharpness_rho": 0.1}):
        other = {"config": PretrainConfig(**change).as_dict(), "resolved": base["resolved"]}
        assert settings.differences(pretrain_identity(base), pretrain_identity(other)) == list(change)


def test_the_loop_takes_its_settings_by_name_from_a_harness_config():
    config = PretrainConfig(
        out="o",
        eval_every=7,
        save_every=3,
        clip=1.5,
        grad_accum=2,
        batch=8,
        nonfinite="stop",
        max_nonfinite=4,
        keep_checkpoints=3,
        seed=11,
    )
    loop = LoopConfig.from_settings(config, steps=9)
    assert (
        loop.out,
        loop.steps,
        loop.eval_every,
        loop.save_every,
        loop.clip,
        loop.grad_accum,
        loop.nonfinite,
        loop.max_nonfinite,
        loop.keep_checkpoints,
        loop.seed,
    ) == ("o", 9, 7, 3, 1.5, 2, "stop", 4, 3, 11)
    shared = (
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "grad_accum",
        "clip",
        "nonfinite",
        "max_nonfinite",
        "resume",
        "overwrite",
        "progress",
    )
    for name in shared:  # the same setting: one help text and one check
        a = LoopConfig.__dataclass_fields__[name].metadata
        b = PretrainConfig.__dataclass_fields__[name].metadata
        assert (a["help"], a["check"]) == (b["help"], b["check"]), name


def test_batch_is_examples_per_step_in_both_harnesses(tmp_path, monkeypatch):
    """--batch 8 --grad-accum 2: one optimizer step sees 8 rows, in two micro-batches of 4."""
    from samlm.harness import loop

    seen = []
    real = loop.train_step

    def spy(optimizer, batch, *args, **kwargs):
        micro = batch if isinstance(batch, list) else [batch]
        seen.append([int(next(iter(m.values())).shape[0]) if isinstance(m, dict) else int(m.shape[0]) for m in micro])
        return real(optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    flags = [
        "--layers",
        "1",
        "--width",
        "16",
        "--heads",
        "2",
        "--context",
        "8",
        "--max-chars",
        "4000",
        "--val-batches",
        "1",
        "--no-sharpness",
        "--no-progress",
        "--steps",
        "2",
    ]
    assert cli.main(["pretrain", *flags, "--batch", "8", "--grad-accum", "2", "--out", str(tmp_path / "p")]) == 0
    assert seen == [[4, 4], [4, 4]]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["resolved"]["tokens_per_step"] == 8 * 8
    assert cli.main(["pretrain", *flags, "--batch", "6", "--grad-accum", "4", "--out", str(tmp_path / "q")]) == 2


def test_grid_settings_are_shared_by_both_compares():
    for command in ("compare", "finetune-compare"):
        flags = flags_of(command)
        for field in dataclasses.fields(GridSettings):
            assert settings.flag_of(field) in flags


def test_sam_schedule_flags_reach_the_optimizer_in_both_harnesses(tmp_path):
    from samlm import io
    from tinymodels import save_t5

    flags = [
        "--layers",
        "1",
        "--width",
        "16",
        "--heads",
        "2",
        "--context",
        "8",
        "--max-chars",
        "4000",
        "--batch",
        "4",
        "--val-batches",
        "1",
        "--no-sharpness",
        "--no-progress",
        "--steps",
        "4",
        "--optimizer",
        "sam",
    ]
    # --sam-start 0.5 of 4 steps: plain steps 0-1, then a SAM step every 2nd: step 2 only
    assert cli.main(["pretrain", *flags, "--sam-every", "2", "--sam-start", "0.5", "--out", str(tmp_path / "p")]) == 0
    counters = io.load_latest_checkpoint(tmp_path / "p" / "checkpoints").extra_state["optimizer"]["counters"]
    assert (counters["sam_steps"], counters["plain_steps"]) == (1, 3)
    glue = __import__("pathlib").Path(__file__).parent / "fixtures" / "finetune" / "glue"
    t5 = save_t5(tmp_path / "t5")
    assert (
        cli.main(
            [
                "finetune",
                "--model",
                str(t5),
                "--task",
                "glue/rte",
                "--data-dir",
                str(glue),
                "--optimizer",
                "sam",
                "--steps",
                "3",
                "--batch",
                "4",
                "--eval-examples",
                "2",
                "--max-target-length",
                "4",
                "--sam-every",
                "3",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    counters = io.load_latest_checkpoint(tmp_path / "f" / "checkpoints").extra_state["optimizer"]["counters"]
    assert (counters["sam_steps"], counters["plain_steps"]) == (1, 2)
    assert cli.main(["pretrain", *flags, "--sam-start", "1.5", "--out", str(tmp_path / "q")]) == 2


def test_looksam_flags_reach_the_optimizer_and_are_refused_for_another_method():
    from samlm.harness.settings import build_run_optimizer

    params = list(torch.nn.Linear(3, 2).parameters())
    opt = build_run_optimizer(PretrainConfig(optimizer="looksam", look_every=3, look_alpha=0.2), params, total_steps=9)
    assert (opt.look_every, opt.alpha, opt.steps_per_cycle) == (3, 0.2, 3)
    assert build_run_optimizer(PretrainConfig(optimizer="looksam"), params, total_steps=9).look_every == 5
    for change, name in (({"look_every": 3}, "--look-every"), ({"look_alpha": 0.2}, "--look-alpha")):
        with pytest.raises(UserError, match=f"^{name} applies to --optimizer looksam, not sam$"):
            build_run_optimizer(PretrainConfig(optimizer="sam", **change), params, total_steps=9)
    with pytest.raises(UserError, match="--look-every must be a positive integer"):
        settings.validate(PretrainConfig(optimizer="looksam", look_every=0))
