"""Fuzzing every command's flags with hypothesis.

Random argument lists (valid flags with random or invalid values, unknown flags, garbage
strings, negative / huge / NaN numbers, flags missing their value) must end in exit 0, or in
exit 2 with exactly one stderr line ``samlm: error: ...``: never a traceback, never exit 1.

The flags of each command are read from its argparse parser, so new flags are fuzzed too. To
stay fast, each command stops after its validation layer:

* finetune: its real ``--dry-run`` (flags, model config, data files, run directory);
* pretrain / compare: flags -> ``PretrainConfig`` -> ``validate`` (and compare's plan), with the
  training replaced by a stub (pretrain has no dry-run path yet);
* sharpness: everything real (the run or model is loaded, the data read) except the eigensolver;
* bench: flag checks real, the timing and memory measurements stubbed.

Path-valued flags take values from a fixed list of paths inside the test's directory, so no
example can touch a file elsewhere. ``SAMLM_FUZZ_EXAMPLES=N`` and ``SAMLM_FUZZ_RANDOM=1`` explore
more (the default is a small, derandomized run).
"""

from __future__ import annotations

import argparse
import contextlib
import io as stdio
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from samlm import cli
from samlm.errors import UserError
from tinymodels import save_gpt2, save_t5

GLUE = Path(__file__).parent / "fixtures" / "finetune" / "glue"
EXAMPLES = int(os.environ.get("SAMLM_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("SAMLM_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- the world the fuzz runs in


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model directories, data files and a finished pretrain run, all under one directory."""
    root = tmp_path_factory.mktemp("fuzz")
    save_t5(root / "t5")
    save_gpt2(root / "gpt2")
    (root / "file.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    (root / "latin1.txt").write_bytes(b"caf\xe9\n" * 50)
    (root / "corpus.jsonl").write_text('{"text": "hello there"}\n' * 40 + "{oops\n")
    (root / "empty.txt").write_text("")
    generic = root / "generic"
    generic.mkdir()
    (generic / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (generic / "validation.jsonl").write_text('{"text": "fine", "label": "pos"}\n{"text": "awful", "label": "maybe"}\n')
    run = root / "run"
    with contextlib.redirect_stdout(stdio.StringIO()), contextlib.redirect_stderr(stdio.StringIO()):
        assert (
            cli.main(
                [
                    "pretrain",
                    "--layers",
                    "1",
                    "--width",
                    "16",
                    "--heads",
                    "2",
                    "--context",
                    "8",
                    "--batch",
                    "2",
                    "--steps",
                    "1",
                    "--max-chars",
                    "4000",
                    "--val-batches",
                    "1",
                    "--no-sharpness",
                    "--no-progress",
                    "--out",
                    str(run),
                ]
            )
            == 0
        )
    return root


# Values of path-like flags: relative to the fuzz directory (the working directory of the test).
SAFE_PATHS = {
    "--out": ["out", "run", "file.txt", "file.txt/sub", "new/deeper/out", "."],
    "--model": ["t5", "gpt2", "missing-model", "file.txt", "generic", "."],
    "--data": ["tinyshakespeare", "file.txt", "latin1.txt", "corpus.jsonl", "empty.txt", "missing.txt", "generic"],
    "--data-dir": [str(GLUE), "generic", "missing-dir", "file.txt"],
    "--run": ["run", "missing-run", "file.txt", "gpt2", "."],
    "--json": ["result.json", "new/result.json", "file.txt/result.json", "."],
    "--tokenizer": ["bytes", "utf8", "t5", "gpt2", "missing-tokenizer", "file.txt"],
    "--runs": ["run", "missing-run"],
}
WORDS = [
    "glue/rte",
    "glue/sst2",
    "cbqa/nq",
    "superglue/cb",
    "glue",
    "adamw",
    "sam",
    "fsam",
    "pfsam",
    "asam",
    "psam",
    "sgd",
    "adafactor",
    "input=text,target=label",
    "pos,neg",
    "0.9,0.98",
    "1,2",
    "sam=0.1,fsam=x",
    "cpu",
    "cuda",
    "cuda:3",
    "auto",
    "linear",
    "constant",
    "train",
    "validation",
    "test",
    "lanczos",
    "power",
]


def _safe_text(text: str) -> bool:
    # Never an absolute or parent path, whatever flag the value reaches.
    return not text.startswith(("/", "~")) and ".." not in text and "\x00" not in text


GARBAGE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "-",
            "--",
            "-1",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e999",
            "0x10",
            "1_000",
            "１",
            "2**70",
            "None",
            "true",
            "\n",
            "a\nb",
            "💥",
        ]
    ),
).filter(_safe_text)
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([0, -1, 2**31, 2**63, 2**70, -(2**63)]), st.integers()).map(str)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0.0", "1", "0.5", "1.5", "-1", "1e-300", "1e39", "3e38", "nan", "inf", "-inf", "1e999"]),
)


def subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def flag_strategy(command: str):
    """One fuzzed argument: a flag of the command with a value drawn by its type, or garbage."""
    options = []
    for action in subparser(command)._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true and friends
            options.append(st.just([flag]))
            continue
        if flag in SAFE_PATHS:
            values = st.sampled_from(SAFE_PATHS[flag])
        elif action.choices:
            values = st.one_of(st.sampled_from([str(c) for c in action.choices]), GARBAGE)
        elif action.type is int:
            values = st.one_of(INTS, GARBAGE)
        elif action.type is float:
            values = st.one_of(FLOATS, GARBAGE)
        else:
            values = st.one_of(st.sampled_from(WORDS), GARBAGE)
        options.append(values.map(lambda v, flag=flag: [flag, v]))
        options.append(values.map(lambda v, flag=flag: [f"{flag}={v}"]))
    options.append(st.sampled_from(["--steps", "--out", "--lr"]).map(lambda f: [f]))  # value missing
    options.append(st.tuples(st.sampled_from(["--bogus", "--stpes", "-x", "--rho-"]), GARBAGE).map(list))
    options.append(GARBAGE.map(lambda g: [g]))  # a stray token
    return st.one_of(*options)


def fuzzed_argv(command: str, base: list[str], tail: list[str] = ()):
    """``base`` (a valid command line), then up to 6 fuzzed arguments (later flags win), then ``tail``."""
    return st.lists(flag_strategy(command), max_size=6).map(
        lambda extra: [command, *base, *[token for arg in extra for token in arg], *tail]
    )


def check_cli(argv: list[str]) -> None:
    """The property: exit 0, or exit 2 with exactly one ``samlm: error:`` line; nothing else."""
    out, err = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    text = err.getvalue()
    event(f"exit {code}" + (" (argparse)" if "(see 'samlm" in text else ""))
    assert code in (0, 2), f"exit {code} for {argv!r}:\n{text}"
    assert "Traceback" not in text
    if code == 2:
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("samlm: error: "), f"{argv!r}:\n{text}"


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.chdir(world)
    return world


# --------------------------------------------------------------------------- one property per command


FINETUNE_BASE = [
    "--model",
    "t5",
    "--task",
    "glue/rte",
    "--data-dir",
    str(GLUE),
    "--steps",
    "1",
    "--batch",
    "2",
    "--out",
    "out",
]


@FUZZ
@given(argv=fuzzed_argv("finetune", FINETUNE_BASE, ["--dry-run"]))
def test_fuzz_finetune(in_world, monkeypatch, argv):
    from samlm.cli import finetune as command

    def no_training(plan):  # a guard: --dry-run must stop before this
        raise AssertionError("finetune --dry-run started training")

    monkeypatch.setattr(command, "execute", no_training)
    check_cli(argv)


PRETRAIN_BASE = [
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
    "--steps",
    "2",
    "--out",
    "out",
]


def _validate_pretrain(args):
    from samlm.harness import pretrain
    from samlm.harness.rundir import RunDir

    config = pretrain.config_from_args(args)
    pretrain.validate(config)
    RunDir(config.out).check_start(resume=config.resume, overwrite=config.overwrite)
    return 0


@FUZZ
@given(argv=fuzzed_argv("pretrain", PRETRAIN_BASE))
def test_fuzz_pretrain(in_world, monkeypatch, argv):
    from samlm.cli import pretrain as command

    monkeypatch.setattr(command, "run", _validate_pretrain)
    check_cli(argv)


def _validate_compare(args):
    from samlm.cli import compare
    from samlm.harness.pretrain import validate

    config = compare.config_from_cli(args)
    for _, run_config in config.plan():
        validate(run_config)
    if not isinstance(config.jobs, int) or config.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {config.jobs!r}")
    return 0


@FUZZ
@given(argv=fuzzed_argv("compare", PRETRAIN_BASE))
def test_fuzz_compare(in_world, monkeypatch, argv):
    from samlm.cli import compare as command

    monkeypatch.setattr(command, "run", _validate_compare)
    check_cli(argv)


@FUZZ
@given(
    argv=st.one_of(
        fuzzed_argv("sharpness", ["--run", "run"]),
        fuzzed_argv("sharpness", ["--model", "gpt2", "--tokenizer", "bytes", "--context", "8", "--max-chars", "4000"]),
    )
)
def test_fuzz_sharpness(in_world, monkeypatch, argv):
    from samlm.harness.pretrain import measure as sharpness_measure

    def cheap_probe(batches, **kwargs):  # the eigensolver is the only thing stubbed
        return lambda model: {
            "hessian_lambda_max": 1.0,
            "iters": 1,
            "converged": True,
            "seconds": 0.0,
            "rho": kwargs.get("rho"),
        }

    monkeypatch.setattr(sharpness_measure, "sharpness_probe", cheap_probe)
    check_cli(argv)


@FUZZ
@given(
    argv=fuzzed_argv(
        "bench",
        [
            "--layers",
            "1",
            "--width",
            "8",
            "--heads",
            "1",
            "--batch",
            "2",
            "--context",
            "4",
            "--steps",
            "1",
            "--no-memory",
        ],
    )
)
def test_fuzz_bench(in_world, monkeypatch, argv):
    import torch

    from samlm.studies import bench

    passes = [f"pass:{kind}" for kind in ("ascent", "clean_forward", "full")]
    monkeypatch.setattr(bench, "time_methods", lambda args, methods: {m: [0.01] for m in [*methods, *passes]})
    monkeypatch.setattr(bench, "peak_memory_mb", lambda args, name: 1.0)
    monkeypatch.setattr(bench, "build_model", lambda args: torch.nn.Linear(1, 1))
    check_cli(argv)


@FUZZ
@given(argv=fuzzed_argv("robustness", ["--run", "run", "--forget-steps", "1"]))
def test_fuzz_robustness(in_world, monkeypatch, argv):
    """Everything real (the run read, its data and model, the flags checked, quantization) but the
    weight-noise draws, capped at one per σ and two σ, and the forgetting fine-tunes, stubbed."""
    from samlm.diagnostics import robustness as measures
    from samlm.harness.pretrain import robustness as harness

    real_noise = measures.weight_noise

    def few_draws(model, evaluate, *, sigmas, draws, seed):
        return real_noise(model, evaluate, sigmas=list(sigmas)[:2], draws=min(draws, 1), seed=seed)

    monkeypatch.setattr(measures, "weight_noise", few_draws)
    monkeypatch.setattr(harness, "forgetting", lambda *args, **kwargs: None)
    check_cli(argv)
