"""samlm pretrain (library and CLI) and samlm sharpness: run directory, exact resume, one-line errors."""

import json
import math
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file

from samlm import io
from samlm.cli import main
from samlm.harness.pretrain import TIMING_KEYS, PretrainConfig, pretrain
from samlm.harness.pretrain.build import lr_schedule, resolve_steps

TINY = dict(
    layers=2,
    width=32,
    heads=2,
    context=16,
    batch=4,
    max_chars=20_000,
    val_batches=2,
    sharpness_iters=3,
    sharpness_batch_size=4,
    progress=False,
)
TINY_FLAGS = [
    "--layers",
    "2",
    "--width",
    "32",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch",
    "4",
    "--max-chars",
    "20000",
    "--val-batches",
    "2",
    "--sharpness-iters",
    "3",
    "--sharpness-batch-size",
    "4",
    "--no-progress",
]
SUMMARY_KEYS = {
    "optimizer",
    "rho",
    "seed",
    "completed",
    "step",
    "steps",
    "val_loss",
    "val_ppl",
    "best_val_loss",
    "best_val_loss_step",
    "train_loss",
    "hessian_lambda_max",
    "gauss_newton_lambda_max",
    "logit_path_norm",
    "functional_path_norm",
    "logit_functional_ratio",
    "step_s",
    "tokens_per_s",
    "params",
    "non_embedding_params",
    "config",
    "resolved",
    "loop",
    "sharpness",
}


def tiny(tmp_path, name="run", **overrides):
    return PretrainConfig(out=str(tmp_path / name), **(TINY | overrides))


def final_weights(run_dir):
    ((_, path),) = io.checkpoint_dirs(run_dir / "checkpoints")[-1:]
    return load_file(str(path / "model.safetensors"))


def without(summary, keys):
    """A summary without wall-clock timings and paths (which differ between two runs)."""
    drop = set(keys) | TIMING_KEYS
    out = {k: v for k, v in summary.items() if k not in drop}
    out["loop"] = {k: v for k, v in summary["loop"].items() if k not in drop | {"checkpoint", "loop_config"}}
    out["config"] = {k: v for k, v in summary["config"].items() if k not in {"out", "resume", "overwrite"}}
    for record in [out["loop"]["final"], *out["loop"]["best"].values()]:
        for key in ("tokens_per_s", "step_s"):
            record.pop(key, None)
        record.get("sharpness", {}).pop("seconds", None)
    out["sharpness"] = {k: v for k, v in summary["sharpness"].items() if k != "seconds"}
    return out


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- the run directory


def test_pretrain_writes_metrics_summary_and_checkpoint(tmp_path):
    summary = pretrain(tiny(tmp_path, optimizer="sam", steps=6, eval_every=3, sharpness_every=3))
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "checkpoints"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-6"]

    lines = io.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [3, 6]
    for line in lines:
        assert {"train_loss", "train_loss_perturbed", "val_loss", "val_ppl", "lr", "tokens", "step_s"} <= set(line)
        assert {
            "hessian_lambda_max",
            "gauss_newton_lambda_max",
            "logit_path_norm",
            "functional_path_norm",
            "logit_functional_ratio",
        } <= set(line["sharpness"])

    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["completed"] and summary["step"] == summary["steps"] == 6
    assert summary["val_loss"] == lines[-1]["val_loss"]
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["best_val_loss"] == min(r["val_loss"] for r in lines)
    assert summary["hessian_lambda_max"] == lines[-1]["sharpness"]["hessian_lambda_max"] > 0
    assert summary["optimizer"] == "sam" and summary["rho"] == 0.05 and summary["config"]["layers"] == 2
    assert summary["tokens"] == 6 * 4 * 16 and summary["tokens_per_s"] > 0
    assert summary["params"] > summary["non_embedding_params"] > 0


def test_sharpness_is_measured_at_the_end_when_every_does_not_divide(tmp_path):
    summary = pretrain(tiny(tmp_path, steps=5, eval_every=2, sharpness_every=0))
    lines = io.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 4, 5, 5]
    assert "sharpness" not in lines[2] and set(lines[3]) == {"step", "sharpness"}
    assert summary["sharpness_step"] == 5 and summary["hessian_lambda_max"] is not None
    assert summary["rho"] is None  # adamw


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    f = lr_schedule(total_steps=10, warmup_steps=2)
    assert [round(f(s), 6) for s in (0, 1, 2)] == [0.1, 0.55, 1.0]
    assert f(9) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(2, 9))
    assert lr_schedule(1, 0)(0) == 1.0


def test_tokens_per_param_budget():
    config = PretrainConfig(tokens_per_param=20, batch=16, grad_accum=2, context=32)  # 16 sequences per step
    assert resolve_steps(config, params=1000, non_embedding_params=600) == (40, 2)  # ceil(20*1000/512)
    config.param_count = "non-embedding"
    assert resolve_steps(config, params=1000, non_embedding_params=600)[0] == 24
    assert resolve_steps(PretrainConfig(steps=7, warmup=3), 1, 1) == (7, 3)


def test_tokens_per_param_run(tmp_path):
    summary = pretrain(tiny(tmp_path, tokens_per_param=0.01, eval_every=0, sharpness=False))
    assert summary["steps"] == math.ceil(0.01 * summary["params"] / (4 * 16))
    assert summary["hessian_lambda_max"] is None


def test_pretrain_from_a_model_directory(tmp_path, capsys):
    from samlm.models import build_decoder

    build_decoder("llama", layers=1, width=16, heads=2, context=16, vocab_size=257).save_pretrained(tmp_path / "m")
    code, out, err = run_cli(
        [
            "pretrain",
            "--model",
            str(tmp_path / "m"),
            "--tokenizer",
            "bytes",
            "--context",
            "16",
            "--batch",
            "4",
            "--max-chars",
            "20000",
            "--val-batches",
            "1",
            "--steps",
            "2",
            "--no-sharpness",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "val loss" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["model"] == str(tmp_path / "m")


# --------------------------------------------------------------------------- exact resume


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_then_resume_is_bitwise_identical(tmp_path, capsys):
    settings = dict(optimizer="pfsam", steps=8, eval_every=2, sharpness_every=4, dropout=0.1, seed=3)
    straight = pretrain(tiny(tmp_path, "straight", **settings))

    def ctrl_c_after_step_4(step, stats):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = pretrain(tiny(tmp_path, "resumed", **settings), on_step=ctrl_c_after_step_4)
    assert not stopped["completed"] and stopped["interrupted"] == "SIGINT" and stopped["step"] == 4
    run_dir = tmp_path / "resumed"
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 4  # results so far
    assert io.load_latest_checkpoint(run_dir / "checkpoints").step == 4  # a usable checkpoint

    # Resume through the CLI with the same flags.
    flags = TINY_FLAGS + [
        "--optimizer",
        "pfsam",
        "--steps",
        "8",
        "--eval-every",
        "2",
        "--sharpness-every",
        "4",
        "--dropout",
        "0.1",
        "--seed",
        "3",
        "--out",
        str(run_dir),
        "--resume",
    ]
    code, out, err = run_cli(["pretrain"] + flags, capsys)
    assert code == 0, err
    resumed = json.loads((run_dir / "summary.json").read_text())

    a, b = final_weights(tmp_path / "straight"), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without(resumed, ()) == without(straight, ())
    timing = {"tokens_per_s", "step_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing and k != "sharpness"} for r in rows]  # noqa: E731
    assert strip(io.read_jsonl(run_dir / "metrics.jsonl")) == strip(
        io.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    )


def test_resume_with_a_different_config_names_the_keys(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(["pretrain"] + TINY_FLAGS + ["--steps", "2", "--no-sharpness", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(
        ["pretrain"]
        + TINY_FLAGS
        + ["--steps", "2", "--no-sharpness", "--out", out, "--optimizer", "sam", "--width", "64", "--resume"],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "cannot resume" in err and "optimizer ('adamw' in the run, 'sam' now)" in err and "width" in err


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    argv = ["pretrain"] + TINY_FLAGS + ["--steps", "1", "--no-sharpness", "--out", str(tmp_path / "run")]
    assert run_cli(argv, capsys)[0] == 0
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0


# --------------------------------------------------------------------------- one-line errors


BAD_FLAGS = [
    (["--width", "100", "--heads", "3"], "--width 100 is not divisible by --heads 3"),
    (["--optimizer", "sam", "--rho", "-1"], "--rho must be a finite number >= 0"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--optimizer", "adam"], "unknown optimizer 'adam'"),
    (["--model", "./no/such/model"], "model directory ./no/such/model not found"),
    (["--steps", "5", "--tokens-per-param", "20"], "either --steps or --tokens-per-param"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--betas", "0.9"], "argument --betas: must be two numbers"),
    (["--ascent-fraction", "1.5"], "--ascent-fraction must be a finite number in (0.0, 1.0]"),
    (["--steps", "4", "--warmup", "4"], "--warmup 4 must be smaller than the number of steps (4)"),
    (["--resume", "--overwrite"], "contradict"),
    (["--data", "./missing.txt"], "corpus file ./missing.txt not found"),
    (["--model", "gpt2", "--layers", "2"], "--model loads an existing model: --layers"),
    (["--arch", "bert"], "invalid choice"),
    (["--path-norms"], "--path-norms measures SAM's logit/functional paths"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


def exit_code(argv) -> int:
    """``main(argv)``'s exit status, also when argparse exits (bad flag syntax)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_end_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    budget = [] if {"--steps", "--tokens-per-param"} & set(flags) else ["--steps", "3"]
    code = exit_code(["pretrain", "--no-progress", "--out", "run"] + budget + flags)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("samlm: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- samlm sharpness


def test_sharpness_cli_on_a_run(tmp_path, capsys):
    pretrain(tiny(tmp_path, steps=2, sharpness=False))
    report = tmp_path / "sharp.json"
    code, out, err = run_cli(
        ["sharpness", "--run", str(tmp_path / "run"), "--iters", "3", "--batch-size", "2", "--json", str(report)],
        capsys,
    )
    assert code == 0, err
    assert "lambda_max(H)" in out and "lambda_max(GN)" in out and "logit/functional ratio" in out
    result = json.loads(report.read_text())
    assert result["step"] == 2 and result["batches"] == 1 and result["batch_size"] == 2
    assert result["hessian_lambda_max"] > 0 and result["gauss_newton_lambda_max"] > 0
    assert {"logit_path_norm", "functional_path_norm", "logit_functional_ratio"} <= set(result)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "exactly one of --run DIR or --model"),
        (["--run", "nowhere"], "run directory nowhere not found"),
        (["--run", "."], "is not a samlm pretrain run"),
        (["--run", ".", "--iters", "0"], "--iters must be a positive integer"),
    ],
)
def test_sharpness_cli_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["sharpness"] + argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_cpu_runs_keep_freed_memory_and_numbers_do_not_depend_on_it(tmp_path, monkeypatch):
    """parallel.setup asks glibc to keep freed activation buffers on CPU (fewer page faults); the
    allocator never changes a run's numbers: a run with it refused equals one with it applied."""
    import platform

    from samlm.harness import parallel

    calls = []
    real = parallel.keep_freed_memory
    monkeypatch.setattr(parallel, "keep_freed_memory", lambda: calls.append(1) or False)
    settings = dict(
        layers=1,
        width=16,
        heads=2,
        context=16,
        batch=4,
        steps=3,
        eval_every=3,
        val_batches=1,
        sharpness=False,
        progress=False,
        max_chars=20_000,
    )
    without = pretrain(PretrainConfig(out=str(tmp_path / "a"), **settings))
    assert calls == [1]
    monkeypatch.setattr(parallel, "keep_freed_memory", real)
    applied = real()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    with_it = pretrain(PretrainConfig(out=str(tmp_path / "b"), **settings))
    assert with_it["val_loss"] == without["val_loss"] and with_it["train_loss"] == without["train_loss"]
