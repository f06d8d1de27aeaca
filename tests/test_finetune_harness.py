"""samlm finetune: tiny T5 / BERT checkpoints saved locally, trained end to end through the CLI.

Models are built from configs and saved with save_pretrained (no downloads): a T5 with a
ByT5 byte tokenizer, a BERT with a WordPiece vocabulary of the fixture words, and a GPT-2
(which finetune must refuse).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from samlm import cli, io
from samlm.data import TASKS, demo_data_dir, load_task
from samlm.harness import finetune as harness
from samlm.harness.finetune import build as finetune_build
from samlm.models import finetune as modeling
from tinymodels import save_bert, save_t5

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"
GLUE = FIXTURES / "glue"
TIMING = {"tokens_per_s", "step_s"}


# --------------------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_t5(tmp_path_factory.mktemp("t5"))


def _fixture_words():
    words = set()
    for name in ("SST-2/train.tsv", "SST-2/dev.tsv", "STS-B/train.tsv"):
        text = (GLUE / name).read_text(encoding="utf-8").lower()
        words.update(re.findall(r"[a-z]+", text))
    return sorted(words)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("bert"), _fixture_words())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32, bos_token_id=None, eos_token_id=None)
    ).save_pretrained(path)
    return path


def finetune(*argv):
    return cli.main(["finetune", *map(str, argv)])


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def weights(checkpoint):
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --------------------------------------------------------------------------- T5, text-to-text


def test_t5_rte_end_to_end_with_paper_defaults(t5_dir, tmp_path):
    out = tmp_path / "run"
    code = finetune(
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--data-dir",
        GLUE,
        "--optimizer",
        "sam",
        "--steps",
        4,
        "--batch",
        4,
        "--eval-every",
        2,
        "--out",
        out,
    )
    assert code == 0
    records = io.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"glue/rte/accuracy", "glue/rte/loss", "train_loss", "train_loss_perturbed"} <= set(r)
        assert r["lr"] == pytest.approx(1e-3)
    summary = read_summary(out)
    assert summary["completed"] and summary["step"] == 4
    config = summary["config"]
    # Bahri et al. defaults for a T5 no wider than Small: Adafactor base, lr 1e-3, rho 0.05, 1/4 ascent.
    assert (config["optimizer"], config["base"], config["lr"], config["rho"], config["ascent_fraction"]) == (
        "sam",
        "adafactor",
        1e-3,
        0.05,
        0.25,
    )
    assert summary["resolved"]["family"] == "seq2seq" and summary["resolved"]["t5_size"] == "small"
    acc = summary["metrics"]["glue/rte/accuracy"]
    assert acc["mode"] == "max" and acc["final_step"] == 4 and acc["best_step"] in (2, 4)
    values = [r["glue/rte/accuracy"] for r in records]
    assert acc["best"] == max(values) and acc["final"] == values[-1]
    assert summary["metrics"]["glue/rte/loss"]["mode"] == "min"
    assert summary["score"]["best"] == acc["best"]
    assert summary["data"]["glue/rte"]["train_examples"] == 3
    assert (out / "checkpoints" / "checkpoint-4" / "manifest.json").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["optimizer"] == "sam"


@pytest.mark.parametrize(
    "d_model,model_type,rho,size",
    [
        (32, "t5", 0.05, "small"),
        (512, "t5", 0.05, "small"),
        (768, "t5", 0.15, "base"),
        (1024, "t5", 0.15, "large"),
        (2048, "t5", 0.15, "xl"),
        (512, "mt5", 0.02, "small"),
    ],
)
def test_t5_family_defaults_follow_the_paper(d_model, model_type, rho, size):
    from transformers import MT5Config, T5Config

    config = (MT5Config if model_type == "mt5" else T5Config)(d_model=d_model)
    info = modeling.ModelInfo("m", "m", modeling.SEQ2SEQ, model_type, config)
    defaults = modeling.paper_defaults(info, "sam")
    assert info.t5_size == size
    assert (defaults["optimizer"], defaults["lr"], defaults["batch"], defaults["ascent_fraction"], defaults["rho"]) == (
        "adafactor",
        1e-3,
        128,
        0.25,
        rho,
    )
    assert modeling.paper_defaults(info, "asam")["rho"] is None  # ASAM keeps its own scale


def test_defaults_resolved_without_flags(t5_dir, bert_dir, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "finetune",
            "--model",
            str(t5_dir),
            "--task",
            "glue/rte",
            "--data-dir",
            str(GLUE),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    s = harness.prepare(harness.config_from_args(args)).config
    assert (s.optimizer, s.base, s.lr, s.batch, s.rho) == ("adafactor", None, 1e-3, 128, None)
    args = parser.parse_args(
        [
            "finetune",
            "--model",
            str(bert_dir),
            "--task",
            "glue/sst2",
            "--data-dir",
            str(GLUE),
            "--optimizer",
            "asam",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    s = harness.prepare(harness.config_from_args(args)).config
    assert (s.optimizer, s.base, s.lr, s.batch, s.rho) == ("asam", "adamw", 2e-5, 32, 0.5)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # prepare writes nothing


def test_seq2seq_batch_forward_and_loss_contract(t5_dir):
    info = modeling.inspect_model(t5_dir)
    examples = load_task("glue/rte", GLUE, "train")
    fm = modeling.load_finetune_model(info, TASKS["glue/rte"], max_input_length=64)
    batch = fm.collate(examples)
    labels = batch["labels"]
    assert batch["input_ids"].shape[0] == labels.shape[0] == 3
    assert (labels == modeling.IGNORE_INDEX).any()  # "entailment" is shorter: padded
    assert torch.equal(batch["decoder_input_ids"][:, 0], torch.zeros(3, dtype=torch.long))
    logits = fm.forward(batch)
    assert logits.dtype == torch.float32 and logits.shape[:2] == labels.shape
    mask = labels != modeling.IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[mask], labels[mask])  # token mean over real targets
    assert torch.allclose(fm.loss(logits, batch), manual)
    fm.model.eval()
    predictions, loss = fm.predict(TASKS["glue/rte"], examples, batch_size=2)
    assert len(predictions) == 3 and all(p in (-1, 0, 1) for p in predictions) and loss > 0


def test_t5_generation_task_and_mixture(t5_dir, tmp_path):
    data = tmp_path / "nq"
    data.mkdir()
    for name in ("NQ-open.train.jsonl", "NQ-open.dev.jsonl"):
        shutil.copy(FIXTURES / "cbqa" / "nq" / "NQ-open.dev.jsonl", data / name)
    out = tmp_path / "nq-run"
    assert (
        finetune(
            "--model",
            t5_dir,
            "--task",
            "cbqa/nq",
            "--data-dir",
            data,
            "--steps",
            2,
            "--batch",
            2,
            "--eval-every",
            0,
            "--max-target-length",
            6,
            "--out",
            out,
        )
        == 0
    )
    summary = read_summary(out)
    assert {"cbqa/nq/f1", "cbqa/nq/em"} <= set(summary["metrics"])
    assert summary["config"]["optimizer"] == "adafactor"

    out = tmp_path / "mix"
    assert (
        finetune(
            "--model",
            t5_dir,
            "--task",
            "glue/rte,glue/sst2",
            "--data-dir",
            demo_data_dir(),
            "--subsample",
            0.5,
            "--steps",
            2,
            "--batch",
            4,
            "--eval-examples",
            4,
            "--out",
            out,
        )
        == 0
    )
    summary = read_summary(out)
    assert {k: v["train_examples"] for k, v in summary["data"].items()} == {"glue/rte": 6, "glue/sst2": 6}
    assert summary["data"]["glue/rte"]["train_examples_before_subsample"] == 12
    assert {"glue/rte/accuracy", "glue/sst2/accuracy"} <= set(summary["metrics"])
    assert summary["score"]["name"] == "mean task score"


def test_generic_columns_data(t5_dir, tmp_path):
    data = tmp_path / "qa"
    data.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copy(FIXTURES / "generic" / "qa.jsonl", data / name)
    out = tmp_path / "run"
    assert (
        finetune(
            "--model",
            t5_dir,
            "--task",
            "trivia",
            "--columns",
            "input=question,target=answer,answers=aliases",
            "--data-dir",
            data,
            "--steps",
            1,
            "--batch",
            2,
            "--max-target-length",
            4,
            "--out",
            out,
        )
        == 0
    )
    assert {"trivia/f1", "trivia/em"} <= set(read_summary(out)["metrics"])


# --------------------------------------------------------------------------- encoder classifiers


def test_bert_sst2_classifier(bert_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        finetune(
            "--model",
            bert_dir,
            "--task",
            "glue/sst2",
            "--data-dir",
            GLUE,
            "--optimizer",
            "fsam",
            "--steps",
            3,
            "--batch",
            2,
            "--eval-every",
            0,
            "--out",
            out,
        )
        == 0
    )
    summary = read_summary(out)
    assert summary["resolved"]["family"] == "classifier"
    assert (summary["config"]["base"], summary["config"]["lr"]) == ("adamw", 2e-5)
    assert set(summary["metrics"]) == {"glue/sst2/accuracy", "glue/sst2/loss"}
    head = weights(out / "checkpoints" / "checkpoint-3")["classifier.weight"]
    assert head.shape == (2, 32)


def test_bert_stsb_regression(bert_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        finetune(
            "--model",
            bert_dir,
            "--task",
            "glue/stsb",
            "--data-dir",
            GLUE,
            "--eval-split",
            "train",
            "--optimizer",
            "sam",
            "--rho",
            0.1,
            "--lr",
            1e-3,
            "--steps",
            3,
            "--batch",
            4,
            "--eval-every",
            1,
            "--out",
            out,
        )
        == 0
    )
    summary = read_summary(out)
    assert {"glue/stsb:train/pearson", "glue/stsb:train/spearman", "glue/stsb:train/loss"} == set(summary["metrics"])
    assert summary["config"]["rho"] == 0.1
    assert weights(out / "checkpoints" / "checkpoint-3")["classifier.weight"].shape == (1, 32)
    losses = [r["glue/stsb:train/loss"] for r in io.read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 3 and all(x > 0 for x in losses)


# --------------------------------------------------------------------------- resume, crash safety


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_resume_is_bitwise(t5_dir, tmp_path):
    common = [
        "--model",
        t5_dir,
        "--task",
        "glue/rte,glue/sst2",
        "--data-dir",
        demo_data_dir(),
        "--optimizer",
        "sam",
        "--batch",
        4,
        "--grad-accum",
        2,
        "--eval-every",
        3,
        "--eval-examples",
        3,
        "--seed",
        3,
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert finetune(*common, "--steps", 6, "--out", full) == 0
    assert finetune(*common, "--steps", 3, "--out", part) == 0
    assert finetune(*common, "--steps", 6, "--out", part, "--resume") == 0
    assert _strip(io.read_jsonl(full / "metrics.jsonl")) == _strip(io.read_jsonl(part / "metrics.jsonl"))
    a, b = weights(full / "checkpoints" / "checkpoint-6"), weights(part / "checkpoints" / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_summary(full)["metrics"] == read_summary(part)["metrics"]


def test_crash_leaves_complete_checkpoints_only_and_resumes(t5_dir, tmp_path, monkeypatch):
    from samlm.errors import UserError

    calls = {"n": 0}
    real = finetune_build.compute_metrics

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise UserError("simulated failure during evaluation")
        return real(*a, **k)

    monkeypatch.setattr(finetune_build, "compute_metrics", failing)
    out = tmp_path / "run"
    argv = [
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--data-dir",
        GLUE,
        "--steps",
        4,
        "--batch",
        2,
        "--eval-every",
        2,
        "--out",
        out,
    ]
    assert finetune(*argv) == 2
    assert not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    io.verify_checkpoint(out / "checkpoints" / "checkpoint-2")
    assert not list(out.rglob(".tmp*")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(finetune_build, "compute_metrics", real)
    assert finetune(*argv, "--resume") == 0
    assert read_summary(out)["completed"]
    # Changing a setting on resume is refused.
    assert finetune(*argv[:-2], "--lr", 3e-4, "--out", out, "--resume") == 2


def test_existing_run_is_not_overwritten(t5_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", t5_dir, "--task", "glue/rte", "--data-dir", GLUE, "--steps", 1, "--batch", 2, "--out", out]
    assert finetune(*argv) == 0
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert finetune(*argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert finetune(*argv, "--overwrite") == 0


# --------------------------------------------------------------------------- one-line errors


def _bad_rte(tmp_path, row):
    data = tmp_path / "bad"
    (data / "RTE").mkdir(parents=True)
    shutil.copy(GLUE / "RTE" / "dev.tsv", data / "RTE" / "dev.tsv")
    (data / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n" + row)
    return data


ERRORS = {
    "unknown task": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rtee", "--data-dir", GLUE],
        "unknown task 'glue/rtee'; did you mean 'glue/rte'?",
    ),
    "missing split file": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/qqp", "--data-dir", GLUE],
        "no validation file for glue/qqp",
    ),
    "malformed row": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rte", "--data-dir", _bad_rte(t, "1\tonly two\n")],
        "RTE/train.tsv:3: expected 4 tab-separated columns, found 2",
    ),
    "label outside the set": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rte", "--data-dir", _bad_rte(t, "1\ta\tb\tmaybe\n")],
        "RTE/train.tsv:3: label 'maybe' is not one of entailment, not_entailment",
    ),
    "encoder on a generation task": (
        lambda d, t: ["--model", d["bert"], "--task", "cbqa/nq", "--data-dir", FIXTURES],
        "is an encoder classifier (bert) and cbqa/nq is a generation task",
    ),
    "causal LM": (
        lambda d, t: ["--model", d["gpt2"], "--task", "glue/rte", "--data-dir", GLUE],
        "a decoder-only causal LM",
    ),
    "missing model dir": (
        lambda d, t: ["--model", t / "nope", "--task", "glue/rte", "--data-dir", GLUE],
        "model directory",
    ),
    "unlabelled eval split": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rte", "--data-dir", GLUE, "--eval-split", "test"],
        "has no label",
    ),
    "subsample as percent": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rte", "--subsample", 5],
        "did you mean 0.05?",
    ),
    "rho without SAM": (
        lambda d, t: ["--model", d["t5"], "--task", "glue/rte", "--optimizer", "adafactor", "--rho", 0.1],
        "--rho applies to SAM-family optimizers",
    ),
    "encoder mixture": (
        lambda d, t: ["--model", d["bert"], "--task", "glue/rte,glue/sst2", "--data-dir", GLUE],
        "one task at a time",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line(case, t5_dir, bert_dir, gpt2_dir, tmp_path, capsys):
    make_argv, expected = ERRORS[case]
    argv = make_argv({"t5": t5_dir, "bert": bert_dir, "gpt2": gpt2_dir}, tmp_path)
    out = tmp_path / "out"
    assert finetune(*argv, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("samlm: error: "), err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written for a run that could not start


def test_score_is_the_glue_average_over_best_values():
    from samlm.data import benchmark_average, get_task
    from samlm.data.metrics import AVERAGED_TASKS

    values, eval_keys, scores = {}, {}, {}
    for i, name in enumerate(AVERAGED_TASKS["glue"]):
        task = get_task(name)
        keys = [name] if len(task.eval_splits) == 1 else [f"{name}:{s}" for s in task.eval_splits]
        eval_keys[name] = keys
        for j, key in enumerate(keys):
            scores[key] = {m: 50.0 + i + j + k for k, m in enumerate(task.metrics)}
            values.update({f"{key}/{m}": v for m, v in scores[key].items()})
    tasks = {n: get_task(n) for n in eval_keys}
    name, value = harness.overall_score(values, eval_keys, tasks)
    assert name == "glue average" and value == pytest.approx(benchmark_average(scores, "glue"))
    name, value = harness.overall_score(values, {"glue/rte": ["glue/rte"]}, tasks)
    assert (name, value) == ("mean task score", values["glue/rte/accuracy"])
    del values["glue/cola/mcc"]
    assert harness.overall_score(values, eval_keys, tasks)[1] is None


def test_unloadable_weights_or_tokenizer_are_one_line_errors(t5_dir, tmp_path):
    """A model directory whose weights or tokenizer files are damaged: one UserError naming the model
    and quoting the first line of the library's error."""
    from samlm.errors import UserError

    broken_weights = shutil.copytree(t5_dir, tmp_path / "weights")
    (broken_weights / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"^could not load model '.*weights': \S") as info:
        modeling.load_finetune_model(modeling.inspect_model(broken_weights), TASKS["glue/rte"])
    assert "\n" not in str(info.value)
    broken_tokenizer = shutil.copytree(t5_dir, tmp_path / "tokenizer")
    (broken_tokenizer / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(UserError, match=r"^could not load the tokenizer of '.*tokenizer': \S") as info:
        modeling.load_finetune_model(modeling.inspect_model(broken_tokenizer), TASKS["glue/rte"])
    assert "\n" not in str(info.value)
