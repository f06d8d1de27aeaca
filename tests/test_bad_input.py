"""Every bad input is answered clearly: for each case, through the CLI,

* exit code 2 and exactly ONE stderr line, ``samlm: error: <message naming the problem>``;
* no traceback;
* nothing half-written: the output directory is not created (or, for the few mistakes that can
  only show once training starts, holds complete files only), and an existing run is untouched.

Cases: malformed flags and values of every command, bad data files (finetune and pretrain
``--data``), bad model directories, run directories that already hold a run, and ``--resume``
with another configuration.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from samlm import cli, io
from tinymodels import save_gpt2, save_t5

GLUE = Path(__file__).parent / "fixtures" / "finetune" / "glue"
TINY_PRETRAIN = [
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
    "1",
    "--no-sharpness",
    "--no-progress",
    "--steps",
    "2",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    bad_config = root / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    t5 = save_t5(root / "t5")
    return {
        "t5": t5,
        "t5-copy": shutil.copytree(t5, root / "t5-copy"),
        "gpt2": save_gpt2(root / "gpt2"),
        "no-config": no_config,
        "bad-config": bad_config,
        "missing": root / "missing",
    }


def run_cli(argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(code, err, expected):
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("samlm: error: "), f"not one error line:\n{err}"
    assert expected in err, err


def assert_complete_files_only(out: Path) -> None:
    """What a failed start may leave: complete JSON files and verified checkpoints, no temp files."""
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".trash")) or p.name.endswith(".tmp")]
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    for path in out.rglob("*.jsonl"):
        io.read_jsonl(path)
    for _, checkpoint in io.checkpoint_dirs(out / "checkpoints"):
        io.verify_checkpoint(checkpoint)


# --------------------------------------------------------------------------- data files


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


GOOD_JSONL = '{"text": "good movie", "label": "pos"}\n{"text": "bad movie", "label": "neg"}\n'


def generic_dir(tmp: Path, validation: str | bytes, name="validation.jsonl") -> Path:
    data = tmp / "generic"
    write(data / "train.jsonl", GOOD_JSONL)
    write(data / name, validation)
    return data


def rte_dir(tmp: Path, train: str | bytes) -> Path:
    data = tmp / "rte"
    write(data / "RTE" / "train.tsv", train)
    shutil.copy(GLUE / "RTE" / "dev.tsv", data / "RTE" / "dev.tsv")
    return data


GENERIC = ["--columns", "input=text,target=label", "--labels", "pos,neg", "--task", "sentiment"]


def ft(models, *flags):
    """finetune on the tiny T5; the GLUE fixtures unless the flags name other data."""
    data = [] if "--data-dir" in flags or "--columns" in flags else ["--data-dir", GLUE]
    return ["finetune", "--model", models["t5"], "--steps", 1, "--batch", 2, *data, *flags]


# (case id) -> (argv builder(models, tmp), expected message fragment)
CASES = {
    # ---- finetune: flags and values
    "finetune unknown flag": (
        lambda m, t: ft(m, "--task", "glue/rte", "--bogus", 1),
        "unrecognized arguments: --bogus",
    ),
    "finetune wrong type": (
        lambda m, t: ft(m, "--task", "glue/rte", "--steps", "ten"),
        "argument --steps: invalid int value: 'ten'",
    ),
    "finetune --rho -1": (
        lambda m, t: ft(m, "--task", "glue/rte", "--optimizer", "sam", "--rho", -1),
        "--rho must be a finite number >= 0.0, got -1.0",
    ),
    "finetune --ascent-fraction 0": (
        lambda m, t: ft(m, "--task", "glue/rte", "--optimizer", "sam", "--ascent-fraction", 0),
        "--ascent-fraction must be a finite number in (0.0, 1.0]",
    ),
    "finetune --subsample 1.5": (
        lambda m, t: ft(m, "--task", "glue/rte", "--subsample", 1.5),
        "--subsample must be in (0, 1], got 1.5",
    ),
    "finetune --steps 0": (
        lambda m, t: ft(m, "--task", "glue/rte", "--steps", 0),
        "--steps must be a positive integer, got 0",
    ),
    "finetune --m 3 vs batch 4": (
        lambda m, t: ft(m, "--task", "glue/rte", "--optimizer", "sam", "--batch", 4, "--m", 3),
        "--m 3 does not divide --batch 4",
    ),
    "finetune --lr nan": (
        lambda m, t: ft(m, "--task", "glue/rte", "--lr", "nan"),
        "--lr must be a finite number > 0.0, got nan",
    ),
    "finetune --lr 1e39": (lambda m, t: ft(m, "--task", "glue/rte", "--lr", 1e39), "beyond float32's range"),
    "finetune --weight-decay nan": (
        lambda m, t: ft(m, "--task", "glue/rte", "--weight-decay", "nan"),
        "--weight-decay must be a finite number >= 0.0, got nan",
    ),
    "finetune --seed -1": (
        lambda m, t: ft(m, "--task", "glue/rte", "--seed", -1),
        "--seed must be an integer in [0, 2**63)",
    ),
    "finetune --max-nonfinite 0": (
        lambda m, t: ft(m, "--task", "glue/rte", "--max-nonfinite", 0),
        "--max-nonfinite must be a positive integer",
    ),
    "finetune --nonfinite maybe": (
        lambda m, t: ft(m, "--task", "glue/rte", "--nonfinite", "maybe"),
        "argument --nonfinite: invalid choice: 'maybe'",
    ),
    "finetune --resume --overwrite": (
        lambda m, t: ft(m, "--task", "glue/rte", "--resume", "--overwrite"),
        "--resume and --overwrite contradict each other",
    ),
    "finetune --rho without SAM": (
        lambda m, t: ft(m, "--task", "glue/rte", "--optimizer", "adamw", "--rho", 0.1),
        "--rho applies to SAM-family optimizers",
    ),
    "finetune --device": (lambda m, t: ft(m, "--task", "glue/rte", "--device", "tpu9"), "unknown --device 'tpu9'"),
    "finetune --subsample below one batch": (
        lambda m, t: ft(m, "--task", "glue/rte", "--subsample", 0.3),
        "the subsampled training set has 1 example(s) (--subsample 0.3), fewer than one batch of 2",
    ),
    "finetune --resume with nothing to resume": (
        lambda m, t: ft(m, "--task", "glue/rte", "--resume"),
        "nothing to resume in",
    ),
    "pretrain --resume with nothing to resume": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--resume"],
        "nothing to resume in",
    ),
    "finetune unknown task": (
        lambda m, t: ft(m, "--task", "glue/rtee", "--data-dir", GLUE),
        "unknown task 'glue/rtee'",
    ),
    # ---- finetune: data files
    "finetune wrong column": (
        lambda m, t: ft(
            m, *GENERIC, "--data-dir", generic_dir(t, '{"text": "a", "label": "pos"}\n{"txt": "b", "label": "neg"}\n')
        ),
        "validation.jsonl:2: missing key 'text'",
    ),
    "finetune bad JSON at line 3": (
        lambda m, t: ft(m, *GENERIC, "--data-dir", generic_dir(t, GOOD_JSONL + '{"text": "c" "label": "neg"}\n')),
        "validation.jsonl:3: invalid JSON",
    ),
    "finetune empty file": (
        lambda m, t: ft(m, *GENERIC, "--data-dir", generic_dir(t, "")),
        "validation.jsonl: file is empty",
    ),
    "finetune unknown label": (
        lambda m, t: ft(m, *GENERIC, "--data-dir", generic_dir(t, '{"text": "a", "label": "maybe"}\n')),
        "validation.jsonl:1: label 'maybe' is not one of pos, neg",
    ),
    "finetune not UTF-8": (
        lambda m, t: ft(m, *GENERIC, "--data-dir", generic_dir(t, b'{"text": "caf\xe9", "label": "pos"}\n')),
        "validation.jsonl:1: bytes are not valid UTF-8 (0xe9 at byte offset 13)",
    ),
    "finetune CSV wrong columns": (
        lambda m, t: ft(
            m, *GENERIC, "--data-dir", generic_dir(t, "text,label\ngood,pos\nbad\n", name="validation.csv")
        ),
        "validation.csv:3: expected 2 columns, found 1",
    ),
    "finetune TSV unknown label": (
        lambda m, t: ft(
            m, "--task", "glue/rte", "--data-dir", rte_dir(t, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
        ),
        "RTE/train.tsv:2: label 'maybe' is not one of",
    ),
    "finetune TSV missing column": (
        lambda m, t: ft(m, "--task", "glue/rte", "--data-dir", rte_dir(t, "idx\ts1\ts2\tlab\n0\ta\tb\tentailment\n")),
        "RTE/train.tsv:1: missing column 'sentence1'",
    ),
    "finetune TSV not UTF-8": (
        lambda m, t: ft(
            m,
            "--task",
            "glue/rte",
            "--data-dir",
            rte_dir(t, b"index\tsentence1\tsentence2\tlabel\n0\ta\xff\tb\tentailment\n"),
        ),
        "RTE/train.tsv:2: bytes are not valid UTF-8 (0xff at byte offset 35)",
    ),
    "finetune empty TSV": (
        lambda m, t: ft(m, "--task", "glue/rte", "--data-dir", rte_dir(t, "")),
        "RTE/train.tsv: file is empty",
    ),
    "finetune missing data dir": (
        lambda m, t: ft(m, "--task", "glue/rte", "--data-dir", t / "nowhere"),
        "data directory",
    ),
    # ---- finetune: models
    "finetune missing model dir": (
        lambda m, t: ["finetune", "--model", m["missing"], "--task", "glue/rte"],
        "model directory",
    ),
    "finetune dir without config.json": (
        lambda m, t: ["finetune", "--model", m["no-config"], "--task", "glue/rte"],
        "has no config.json",
    ),
    "finetune config.json not JSON": (
        lambda m, t: ["finetune", "--model", m["bad-config"], "--task", "glue/rte"],
        "config.json is not valid JSON",
    ),
    "finetune causal LM": (
        lambda m, t: ["finetune", "--model", m["gpt2"], "--task", "glue/rte", "--data-dir", GLUE],
        "a decoder-only causal LM",
    ),
    # ---- pretrain: flags and values
    "pretrain unknown flag": (lambda m, t: ["pretrain", *TINY_PRETRAIN, "--bogus"], "unrecognized arguments: --bogus"),
    "pretrain wrong type": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--lr", "fast"],
        "argument --lr: invalid float value: 'fast'",
    ),
    "pretrain --rho -1": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--optimizer", "sam", "--rho", -1],
        "--rho must be a finite number >= 0",
    ),
    "pretrain --ascent-fraction 0": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--optimizer", "sam", "--ascent-fraction", 0],
        "--ascent-fraction must be a finite number",
    ),
    "pretrain --steps 0": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--steps", 0],
        "--steps must be a positive integer",
    ),
    "pretrain --seed 2**70": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--seed", 2**70],
        "seed must be an integer in [0, 2**63)",
    ),
    "pretrain --width 10**6": (lambda m, t: ["pretrain", *TINY_PRETRAIN, "--width", 10**6], "more than this machine's"),
    "pretrain --steps and --tokens-per-param": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--tokens-per-param", 5],
        "either --steps or --tokens-per-param",
    ),
    "pretrain --resume --overwrite": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--resume", "--overwrite"],
        "contradict",
    ),
    "pretrain --model with --layers": (
        lambda m, t: ["pretrain", "--model", m["gpt2"], "--layers", 2],
        "--model loads an existing model: --layers",
    ),
    # ---- pretrain: data files (--data)
    "pretrain missing data file": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", t / "corpus.txt"],
        "corpus.txt not found",
    ),
    "pretrain empty file": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", write(t / "empty.txt", "")],
        "empty.txt is empty",
    ),
    "pretrain not UTF-8": (
        lambda m, t: [
            "pretrain",
            *TINY_PRETRAIN,
            "--data",
            write(t / "latin1.txt", b"To be, or not\nto b\xe9, that is"),
        ],
        "latin1.txt is not valid UTF-8: byte 18 (line 2, column 5)",
    ),
    "pretrain JSONL bad JSON at line 2": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", write(t / "c.jsonl", '{"text": "a"}\n{"text": "b",}\n')],
        "c.jsonl:2: invalid JSON",
    ),
    "pretrain JSONL wrong field": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", write(t / "c.jsonl", '{"content": "a"}\n')],
        "c.jsonl:1: no 'text' field (fields: content)",
    ),
    "pretrain JSONL not UTF-8": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", write(t / "c.jsonl", b'{"text": "\xff"}\n')],
        "c.jsonl is not valid UTF-8: byte 10 (line 1, column 11)",
    ),
    "pretrain corpus smaller than a window": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--data", write(t / "tiny.txt", "tiny")],
        "corpus too small",
    ),
    # ---- pretrain: models
    "pretrain missing model dir": (lambda m, t: ["pretrain", "--model", m["missing"], "--steps", 1], "model directory"),
    "pretrain dir without config.json": (
        lambda m, t: ["pretrain", "--model", m["no-config"], "--tokenizer", "bytes", "--steps", 1],
        "has no config.json",
    ),
    "pretrain T5 dir": (
        lambda m, t: ["pretrain", "--model", m["t5"], "--steps", 1],
        "is a 't5' model, not a causal (decoder-only) language model",
    ),
    "pretrain model dir without tokenizer": (
        lambda m, t: ["pretrain", "--model", m["gpt2"], "--steps", 1],
        "has no tokenizer files",
    ),
    # ---- compare
    "compare unknown flag": (lambda m, t: ["compare", "--bogus"], "unrecognized arguments: --bogus"),
    "compare wrong type": (lambda m, t: ["compare", "--jobs", "two"], "argument --jobs: invalid int value"),
    "compare unknown optimizer": (
        lambda m, t: ["compare", *TINY_PRETRAIN, "--optimizers", "adamw,lion"],
        "unknown optimizer(s) lion",
    ),
    "compare --rho -1": (lambda m, t: ["compare", *TINY_PRETRAIN, "--rho", -1], "--rho must be finite and >= 0"),
    "compare --ascent-fraction 0": (
        lambda m, t: ["compare", *TINY_PRETRAIN, "--ascent-fraction", 0],
        "--ascent-fraction must be a finite number",
    ),
    "compare --steps 0": (lambda m, t: ["compare", *TINY_PRETRAIN, "--steps", 0], "--steps must be a positive integer"),
    "compare --seeds": (lambda m, t: ["compare", *TINY_PRETRAIN, "--seeds", "1,x"], "--seeds must be comma-separated"),
    "compare --jobs 0": (lambda m, t: ["compare", *TINY_PRETRAIN, "--jobs", 0], "--jobs must be a positive integer"),
    # ---- sharpness
    "sharpness unknown flag": (lambda m, t: ["sharpness", "--bogus"], "unrecognized arguments: --bogus"),
    "sharpness wrong type": (lambda m, t: ["sharpness", "--iters", "many"], "argument --iters: invalid int value"),
    "sharpness --run and --model": (
        lambda m, t: ["sharpness", "--run", t, "--model", m["gpt2"]],
        "exactly one of --run DIR or --model",
    ),
    "sharpness neither": (lambda m, t: ["sharpness"], "exactly one of --run DIR or --model"),
    "sharpness --rho -1": (
        lambda m, t: ["sharpness", "--model", m["gpt2"], "--rho", -1],
        "--rho must be a finite number > 0",
    ),
    "sharpness --batches 0": (
        lambda m, t: ["sharpness", "--model", m["gpt2"], "--batches", 0],
        "--batches must be a positive integer",
    ),
    "sharpness missing run dir": (lambda m, t: ["sharpness", "--run", t / "nowhere"], "not found"),
    "sharpness not a run dir": (lambda m, t: ["sharpness", "--run", t], "is not a samlm pretrain run"),
    "sharpness T5 dir": (lambda m, t: ["sharpness", "--model", m["t5"]], "not a causal (decoder-only) language model"),
    # ---- bench
    "bench unknown flag": (lambda m, t: ["bench", "--bogus"], "unrecognized arguments: --bogus"),
    "bench wrong type": (lambda m, t: ["bench", "--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    "bench --steps 0": (lambda m, t: ["bench", "--steps", 0], "--steps must be a positive integer"),
    "bench --ascent-fraction 0": (
        lambda m, t: ["bench", "--ascent-fraction", 0],
        "--ascent-fraction must be a finite number in (0.0, 1.0]",
    ),
    "bench --width/--heads": (lambda m, t: ["bench", "--width", 10, "--heads", 3], "divisible by --heads 3"),
    "bench unknown method": (lambda m, t: ["bench", "--methods", "sam,lion"], "unknown method(s) lion"),
    "bench --dtype": (lambda m, t: ["bench", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    # ---- no command / demo
    "no command": (lambda m, t: [], "a command is required"),
    "unknown command": (lambda m, t: ["train"], "invalid choice: 'train'"),
    "demo --steps 0": (lambda m, t: ["demo", "--steps", 0], "--steps must be a positive integer"),
    # ---- formerly late or tracebacks (bench, sharpness, pretrain's step split and float32 range)
    "bench --rho -1": (
        lambda m, t: [
            "bench",
            "--rho",
            -1,
            "--methods",
            "sam",
            "--steps",
            1,
            "--layers",
            1,
            "--width",
            8,
            "--heads",
            1,
            "--batch",
            2,
            "--context",
            4,
            "--no-memory",
        ],
        "--rho",
    ),
    "bench --device": (lambda m, t: ["bench", "--device", "tpu9"], "--device"),
    "bench --untimed-steps -1": (
        lambda m, t: [
            "bench",
            "--untimed-steps",
            -1,
            "--methods",
            "adamw",
            "--steps",
            1,
            "--layers",
            1,
            "--width",
            8,
            "--heads",
            1,
            "--batch",
            2,
            "--context",
            4,
            "--no-memory",
        ],
        "--untimed-steps",
    ),
    "sharpness --seed 2**70": (
        lambda m, t: [
            "sharpness",
            "--model",
            m["gpt2"],
            "--tokenizer",
            "bytes",
            "--context",
            8,
            "--max-chars",
            4000,
            "--iters",
            1,
            "--seed",
            2**70,
        ],
        "--seed must be an integer in [0, 2**63)",
    ),
    "pretrain --m 3 with batch 4": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--optimizer", "sam", "--m", 3],
        "cannot split a step of 4 rows for SAM",
    ),
    "pretrain --lr 1e39": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--lr", 1e39],
        "--lr 1e+39 is beyond float32's range",
    ),
    "pretrain --max-nonfinite 0": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--max-nonfinite", 0],
        "--max-nonfinite must be a positive integer",
    ),
    "pretrain --device": (lambda m, t: ["pretrain", *TINY_PRETRAIN, "--device", "tpu9"], "unknown --device 'tpu9'"),
    "pretrain --mixed-precision fp16 on CPU": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--mixed-precision", "fp16"],
        "fp16 needs a CUDA device",
    ),
    "pretrain --strategy": (
        lambda m, t: ["pretrain", *TINY_PRETRAIN, "--strategy", "zero3"],
        "argument --strategy: invalid choice: 'zero3'",
    ),
}
OUT_COMMANDS = {"finetune", "pretrain", "compare", "demo"}


def _run_case(build, expected, models, tmp_path, capsys):
    argv = [str(a) for a in build(models, tmp_path)]
    out = tmp_path / "out"
    if argv and argv[0] in OUT_COMMANDS and "--out" not in argv:
        argv += ["--out", str(out)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = run_cli(argv)
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.rglob('*'))}"
    assert snapshot(tmp_path) == before  # nothing else written either


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, expected = CASES[case]
    _run_case(build, expected, models, tmp_path, capsys)


def test_pretrain_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["pretrain", *TINY_PRETRAIN, "--optimizer", "sam", "--out", out, "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["resolved"]
    assert resolved["total_steps"] == 2 and resolved["parallel"]["world_size"] == 1
    assert not out.exists()


def test_out_that_is_a_file_is_refused(models, tmp_path, capsys):
    target = write(tmp_path / "file", "x")
    for argv in (["pretrain", *TINY_PRETRAIN], ft(models, "--task", "glue/rte", "--data-dir", GLUE)):
        code = run_cli([*argv, "--out", target])
        assert_one_line_error(code, capsys.readouterr().err, f"--out {target} is a file, not a directory")
    assert target.read_text() == "x"


def test_unwritable_out_is_one_line(tmp_path, capsys):
    code = run_cli(
        ["pretrain", *TINY_PRETRAIN, "--out", tmp_path / "file" / "run"] if write(tmp_path / "file", "x") else []
    )
    assert_one_line_error(code, capsys.readouterr().err, "cannot access the file system: Not a directory")


# --------------------------------------------------------------------------- existing runs


@pytest.fixture(scope="module")
def finished_runs(models, tmp_path_factory):
    """A finished 1-step run of each harness, to try to clobber or resume differently."""
    root = tmp_path_factory.mktemp("finished")
    runs = {
        "pretrain": (["pretrain", *TINY_PRETRAIN[:-2], "--steps", "2"], root / "pretrain"),
        "finetune": (
            ft(models, "--task", "glue/rte", "--eval-examples", 2, "--max-target-length", 4),
            root / "finetune",
        ),
    }
    for argv, out in runs.values():
        assert run_cli([*argv, "--out", out]) == 0
    return runs


@pytest.mark.parametrize("harness", ["pretrain", "finetune"])
def test_existing_run_needs_resume_or_overwrite(harness, finished_runs, capsys):
    argv, out = finished_runs[harness]
    before = snapshot(out)
    capsys.readouterr()
    code = run_cli([*argv, "--out", out])
    assert_one_line_error(code, capsys.readouterr().err, "already holds a run")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "harness, change, expected",
    [
        ("pretrain", ["--lr", "0.01"], "cannot resume"),
        ("pretrain", ["--width", "64"], "width (32 in the run, 64 now)"),
        ("finetune", ["--lr", "0.01"], "different configuration: lr (0.001 in the run, 0.01 now)"),
        ("finetune", ["--batch", "4"], "different configuration: batch (2 in the run, 4 now)"),
        ("finetune", ["--model", "t5-copy"], "different configuration: model ("),
    ],
)
def test_resume_with_another_configuration_is_refused(harness, change, expected, finished_runs, models, capsys):
    argv, out = finished_runs[harness]
    change = [str(models[c]) if c in models else c for c in change]
    before = snapshot(out)
    capsys.readouterr()
    code = run_cli([*argv, *change, "--out", out, "--resume"])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert snapshot(out) == before


def test_finetune_dry_run_checks_everything_and_writes_nothing(models, finished_runs, tmp_path, capsys):
    out = tmp_path / "dry"
    assert run_cli([*ft(models, "--task", "glue/rte", "--data-dir", GLUE), "--out", out, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["resolved"]["tasks"] == ["glue/rte"] and "dry run" in captured.err
    assert not out.exists()
    # The run-directory checks are part of it too.
    argv, existing = finished_runs["finetune"]
    code = run_cli([*argv, "--lr", "0.01", "--out", existing, "--resume", "--dry-run"])
    assert_one_line_error(code, capsys.readouterr().err, "different configuration: lr")


# --------------------------------------------------------------------------- the CLI's last line of defence


@pytest.mark.parametrize(
    "error, expected",
    [
        (MemoryError(), "out of memory; use a smaller model, --batch or --context"),
        ("oom", "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"),
        (
            PermissionError(13, "Permission denied", "/root/run/summary.json"),
            "cannot access the file system: Permission denied '/root/run/summary.json'",
        ),
    ],
)
def test_machine_errors_are_one_line(error, expected, monkeypatch, capsys):
    import torch

    from samlm.cli import pretrain

    if error == "oom":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    def failing_run(args):
        raise error

    monkeypatch.setattr(pretrain, "run", failing_run)
    assert_one_line_error(run_cli(["pretrain"]), capsys.readouterr().err, expected)
    monkeypatch.setenv("SAMLM_DEBUG", "1")  # and the traceback when asked for
    with pytest.raises(type(error)):
        cli.main(["pretrain"])


def test_a_bug_is_still_a_traceback(monkeypatch):
    from samlm.cli import pretrain

    def buggy_run(args):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr(pretrain, "run", buggy_run)
    with pytest.raises(RuntimeError, match="index out of range"):
        cli.main(["pretrain"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["finetune", "--model", "m", "--out", "o", "--steps=--"], "argument --steps: invalid int value: '--'"),
        (["pretrain", "--optimizer", "sam\nadamw"], "unknown optimizer 'sam adamw'"),
        (["pretrain", "--arch", "gpt\n2"], "argument --arch: invalid choice: 'gpt\\n2'"),
    ],
)
def test_odd_values_still_give_one_line(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli(argv), capsys.readouterr().err, expected)
