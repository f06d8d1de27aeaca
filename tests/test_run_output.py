"""What a run says and records about itself: progress lines in a log, the bar's validation loss,
the default evaluation cadence, the median step time, notes on its data, renamed flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from samlm import io, progress
from samlm.cli import main
from samlm.harness import settings
from samlm.harness.loop import timing_warmup
from samlm.harness.pretrain import PretrainConfig, config_from_args, pretrain
from samlm.harness.pretrain.config import identity

TINY = dict(
    layers=1,
    width=16,
    heads=2,
    context=16,
    batch=4,
    max_chars=20_000,
    val_batches=2,
    sharpness=False,
    threads=1,
    progress=False,
)
TINY_FLAGS = "--layers 1 --width 16 --heads 2 --context 16 --batch 4 --max-chars 20000 --val-batches 2 --no-sharpness --threads 1".split()


def final_weights(run_dir):
    ((_, path),) = io.checkpoint_dirs(run_dir / "checkpoints")[-1:]
    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------- the evaluation cadence


def test_eval_every_defaults_to_about_twenty_evaluations_per_run():
    assert settings.resolve_eval_every(None, 60) == 3
    assert settings.resolve_eval_every(None, 2000) == 100
    assert settings.resolve_eval_every(None, 5) == 1
    assert settings.resolve_eval_every(7, 60) == 7 and settings.resolve_eval_every(0, 60) == 0
    assert PretrainConfig().eval_every is None


def test_the_default_cadence_changes_when_runs_evaluate_not_what_they_train(tmp_path):
    """Evaluation touches neither the weights nor the RNG: the same final weights and val loss
    with --eval-every 100 and with the default (here every 2 of 40 steps)."""
    every_100 = pretrain(PretrainConfig(out=str(tmp_path / "a"), steps=40, eval_every=100, dropout=0.1, **TINY))
    default = pretrain(PretrainConfig(out=str(tmp_path / "b"), steps=40, dropout=0.1, **TINY))
    assert default["val_loss"] == every_100["val_loss"]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    lines = io.read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(2, 41, 2))  # 20 evaluations
    assert len(io.read_jsonl(tmp_path / "a" / "metrics.jsonl")) == 1
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    assert record["config"]["eval_every"] is None and record["resolved"]["eval_every"] == 2
    assert default["loop"]["loop_config"]["eval_every"] == 2

    # The median step time after a warm-up, beside the mean.
    assert default["step_time_warmup_steps"] == timing_warmup(40) == 8
    assert default["step_time_median_ms"] > 0 and default["loop"]["step_time_median_ms"] > 0


def test_a_resume_keeps_the_step_times_and_warms_up_again(tmp_path):
    config = PretrainConfig(out=str(tmp_path / "r"), steps=20, save_every=10, **TINY)
    stop = {}

    def fail_after_10(step, stats):
        if step == 11 and not stop:
            stop["at"] = step
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, on_step=fail_after_10)
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "r"), steps=20, save_every=10, resume=True, **TINY))
    # steps 1-4 (the first start's warm-up), 5-10 timed, then 11-14 (the resume's), 15-20 timed
    assert resumed["step_time_warmup_steps"] == 8 and resumed["step_time_median_ms"] > 0
    assert timing_warmup(1) == 1 and timing_warmup(1000) == 10


# --------------------------------------------------------------------------- progress in a log and on a terminal


def run_piped(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "samlm", "pretrain", *TINY_FLAGS, *args, "--out", str(tmp_path / "run")],
        capture_output=True,  # pipes, not a terminal
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
    )


def test_a_piped_run_prints_a_line_per_evaluation_and_one_at_the_end(tmp_path):
    done = run_piped(["--steps", "12", "--eval-every", "4"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("samlm: step ")]
    assert [line.split(",")[0] for line in lines] == ["samlm: step 4/12", "samlm: step 8/12", "samlm: step 12/12"]
    assert all("train loss " in line and "val loss " in line and "tokens/s" in line for line in lines)
    assert "ETA " in lines[0] and "ETA" not in lines[-1]
    assert "samlm: trained to step 12/12 in " in done.stderr

    quiet = run_piped(["--steps", "12", "--eval-every", "4", "--no-progress", "--overwrite"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "step 4/12" not in quiet.stderr and "trained to step" not in quiet.stderr
    assert "cache" not in quiet.stderr


def test_the_bar_on_a_terminal_shows_the_last_validation_loss(monkeypatch):
    monkeypatch.setattr(progress, "progress_enabled", lambda requested=True: bool(requested))
    said = []
    monkeypatch.setattr(progress, "say", said.append)
    shown = progress.RunProgress(10, enabled=True)
    shown.step({"loss": "3.0000"})
    assert "val" not in shown.bar.postfix
    shown.evaluated(1, 3.0, ("val_loss", 2.5), 1000.0)
    shown.step({"loss": "2.9000"})
    assert "val=2.5000" in shown.bar.postfix and said == []  # on a terminal: the bar, no lines
    shown.finished(2)
    shown.close()
    assert said == []


def test_only_the_main_process_prints(monkeypatch):
    said = []
    monkeypatch.setattr(progress, "say", said.append)
    monkeypatch.setenv("RANK", "1")
    other = progress.RunProgress(10, enabled=True)
    other.evaluated(5, 3.0, ("val_loss", 2.5), 1000.0)
    other.finished(10)
    assert said == []
    monkeypatch.setenv("RANK", "0")
    main_process = progress.RunProgress(10, enabled=True)
    main_process.evaluated(5, 3.0, ("glue/rte/loss", 0.69), None)
    assert said and said[0].startswith("step 5/10, train loss 3.0000, glue/rte/loss 0.6900, ETA ")
    assert progress.duration(42) == "42 s" and progress.duration(185) == "3 min 05 s"
    assert progress.duration(7620) == "2 h 07 min"


# --------------------------------------------------------------------------- notes on the data


def test_a_raw_data_file_says_where_the_cache_keeps_it(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus for a short run.\n" for i in range(600)))
    argv = ["pretrain", *TINY_FLAGS, "--steps", "2", "--data", str(corpus)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    first = [line for line in capsys.readouterr().err.splitlines() if "the cache" in line]
    assert len(first) == 1 and first[0].startswith(f"samlm: data {corpus}: prepared into the cache, ")
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    second = [line for line in capsys.readouterr().err.splitlines() if "the cache" in line]
    assert second == [first[0].replace("prepared into", "read from")]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "c")]) == 0
    assert "the cache" not in capsys.readouterr().err


def test_an_empty_report_slice_is_a_warning(tmp_path, capsys):
    # 1,000 characters: 100 validation bytes, one batch of windows of 64: the tuning slice only
    argv = "pretrain --layers 1 --width 16 --heads 2 --context 64 --batch 2 --max-chars 1000 --no-sharpness"
    assert main([*argv.split(), "--val-batches", "1", "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "no report slice" in line]
    assert len(warnings) == 1 and warnings[0].startswith("samlm: warning: "), err
    resolved = json.loads((tmp_path / "r" / "config.json").read_text())["resolved"]
    assert resolved["report_batches"] == 0


# --------------------------------------------------------------------------- renamed flags


def test_path_norms_is_the_flag_and_split_a_deprecated_alias(tmp_path, capsys):
    argv = ["pretrain", *TINY_FLAGS, "--optimizer", "sam", "--steps", "2", "--save-every", "1"]
    assert main([*argv, "--split", "--out", str(tmp_path / "old")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "deprecated" in line]
    assert notes == ["samlm: --split is deprecated and goes in the next release: use --path-norms (same effect)"]
    record = json.loads((tmp_path / "old" / "config.json").read_text())
    assert record["config"]["path_norms"] is True and "split" not in record["config"]
    assert "train_logit_path_norm" in io.read_jsonl(tmp_path / "old" / "metrics.jsonl")[-1]

    # A run whose config.json predates the rename resumes (and is recorded under the new name).
    record["config"]["split"] = record["config"].pop("path_norms")
    (tmp_path / "old" / "config.json").write_text(json.dumps(record))
    assert identity(record) == identity({**record, "config": PretrainConfig.from_mapping(record["config"]).as_dict()})
    assert main([*argv, "--path-norms", "--resume", "--out", str(tmp_path / "old")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "old" / "config.json").read_text())["config"]["path_norms"] is True
    assert PretrainConfig.from_mapping({"split": True}).path_norms is True


def test_m_sharpness_is_a_longer_name_of_m():
    from samlm.cli import build_parser

    parser = build_parser()
    assert config_from_args(parser.parse_args(["pretrain", "--m-sharpness", "2"])).m == 2
    assert config_from_args(parser.parse_args(["pretrain", "--m", "2"])).m == 2


def test_prepare_counts_one_document_in_the_singular(tmp_path, capsys):
    corpus = tmp_path / "one.txt"
    corpus.write_text("one document, no blank line in it.\n" * 100)
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert " from 1 document of " in capsys.readouterr().out


def test_a_finetune_run_evaluates_by_default_and_records_its_step_times(tmp_path, capsys):
    """The shared flag, the same default: 20 steps evaluate every step; a line per evaluation."""
    import re
    from pathlib import Path

    from tinymodels import save_bert

    glue = Path(__file__).parent / "fixtures" / "finetune" / "glue"
    text = " ".join((glue / "SST-2" / name).read_text(encoding="utf-8") for name in ("train.tsv", "dev.tsv"))
    words = sorted(set(re.findall(r"[a-z]+", text.lower())))
    model = save_bert(tmp_path / "bert", words)
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(model), "--task", "glue/sst2", "--data-dir", str(glue), "--batch", "2"]
    assert main([*argv, "--steps", "20", "--eval-examples", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"]["eval_every"] == 1 and summary["config"]["save_every"] == 1
    assert len(io.read_jsonl(out / "metrics.jsonl")) == 20
    assert summary["step_time_warmup_steps"] == 4 and summary["step_time_median_ms"] > 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("samlm: step ")]
    assert len(lines) == 20 and "glue/sst2/loss " in lines[0]
