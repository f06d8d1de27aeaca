"""Fine-tuning task registry: GLUE, SuperGLUE, closed-book QA and TyDiQA-GoldP.

A task name is ``benchmark/task`` in lower case (``glue/rte``, ``superglue/boolq``,
``cbqa/nq``, ``tydiqa/goldp``). Each :class:`Task` knows its kind, label words, official
metrics and splits, how to format a raw record in T5's text-to-text convention and as an
encoder-classifier text (pair), and where the data lives on the Hugging Face hub.

- :func:`load_task` reads a split from local files in the official formats
  (:mod:`samlm.data.official`) or from the hub.
- Subsampling and mixing tasks: :mod:`samlm.data.mixtures`.

The T5 formatting follows ``t5.data.preprocessors`` (``glue``, ``stsb``, ``wsc``,
``record``), the T5 closed-book-QA preprocessors and mT5's TyDiQA preprocessing; see
``docs/data.md`` for every task's input and target with an example.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import samlm.data.official as official
from samlm.data.formats import Example, LabelParser, Row, class_label_parser, score_label_parser
from samlm.errors import UserError

CLASSIFICATION = "classification"
REGRESSION = "regression"
GENERATION = "generation"

_STANDARD_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Task:
    """One fine-tuning task.

    ``labels`` are the T5 target words in class-index order (the same order as the label
    ids of the Hugging Face datasets). ``metrics`` are the official metric names that
    :func:`samlm.data.metrics.compute_metrics` returns for it. ``eval_splits`` are the
    labelled splits to evaluate on.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    splits: tuple[str, ...]
    eval_splits: tuple[str, ...]
    fields: tuple[str, ...]  # raw text fields, named as in the HF dataset
    hub_path: str | None
    hub_config: str | None
    format_inputs: Callable[[Mapping[str, Any]], str] = field(repr=False, compare=False)
    encoder_pair: Callable[[Mapping[str, Any]], tuple[str, str | None]] = field(repr=False, compare=False)

    @property
    def benchmark(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[-1]

    @property
    def num_labels(self) -> int:
        """Classifier output size: the number of classes, 1 for regression, 0 for generation."""
        return len(self.labels) if self.kind == CLASSIFICATION else int(self.kind == REGRESSION)


# --------------------------------------------------------------------------------------
# T5 text-to-text formatting
# --------------------------------------------------------------------------------------


def _t5_glue_inputs(prefix: str, keys: Sequence[str]) -> Callable[[Mapping[str, Any]], str]:
    """T5's ``preprocessors.glue``: ``"<prefix> key1: value1 key2: value2"``.

    Without explicit feature names T5 sorts the keys, which is why MNLI reads
    ``"mnli hypothesis: ... premise: ..."``; the key orders below are spelled out.
    """

    def format_inputs(fields: Mapping[str, Any]) -> str:
        parts = [prefix]
        for key in keys:
            parts += [f"{key}:", str(fields[key])]
        return " ".join(parts)

    return format_inputs


def _multirc_inputs(fields: Mapping[str, Any]) -> str:
    joined = _t5_glue_inputs("multirc", ("question", "answer", "paragraph"))(fields)
    return _strip_multirc_html(joined)


def _strip_multirc_html(text: str) -> str:
    # MultiRC paragraphs carry <br> and <b>...</b> markup; T5 removes it.
    return re.sub(r"</?b>", "", text.replace("<br>", " "))


def mark_wsc_spans(fields: Mapping[str, Any]) -> str:
    """WSC text with ``* noun *`` and ``# pronoun #`` marked at their word indices (T5's ``wsc``).

    A span that is not at its word index is left unmarked, as in T5.
    """

    def mark(text: str, span: str, index: int, symbol: str) -> str:
        pattern = rf"^((?:\S+\s){{{index}}})({re.escape(span)})"
        return re.sub(pattern, lambda m: f"{m.group(1)}{symbol} {m.group(2)} {symbol}", text)

    text = mark(fields["text"], fields["span1_text"], fields["span1_index"], "*")
    # Marking span 1 adds two words ("*" twice) before span 2 when span 2 comes later.
    shift = 2 if fields["span1_index"] < fields["span2_index"] else 0
    span2_index = fields["span2_index"] + shift
    return mark(text, fields["span2_text"], span2_index, "#")


def _wsc_inputs(fields: Mapping[str, Any]) -> str:
    return f"wsc text: {mark_wsc_spans(fields)}"


def _record_passage(passage: str) -> str:
    # CNN/DailyMail highlights are separated by "\n@highlight\n"; T5 turns them into sentences.
    passage = re.sub(r"(\.|\?|!|\"|')\n@highlight\n", r"\1 ", passage)
    return re.sub(r"\n@highlight\n", ". ", passage)


def _record_inputs(fields: Mapping[str, Any]) -> str:
    return (
        f"record query: {fields['query']} entities: {', '.join(fields['entities'])} "
        f"passage: {_record_passage(fields['passage'])}"
    )


def pad_punctuation(text: str) -> str:
    """mT5's TyDiQA preprocessing: spaces around every character that is not a letter,
    number, mark, underscore or space; whitespace collapsed."""
    padded = "".join(
        f" {ch} " if not (ch == "_" or ch.isspace() or unicodedata.category(ch)[0] in "LNM") else ch for ch in text
    )
    return re.sub(r"\s+", " ", padded)


def _tydiqa_inputs(fields: Mapping[str, Any]) -> str:
    question, context = pad_punctuation(fields["question"]), pad_punctuation(fields["context"])
    text = f"question: {question} context: {context}"
    return re.sub(r"\s+", " ", text).strip()


def _question_inputs(prefix: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda fields: f"{prefix} {fields['question']}"


def stsb_target(score: float) -> str:
    """T5's STS-B target: the score rounded to the nearest 0.2, one decimal (``"3.8"``).

    Python's ``round`` rounds halves to even, like ``tf.round`` (12.5 -> 12, so 2.5 -> "2.4").
    """
    return f"{round(score * 5) / 5:.1f}"


# --------------------------------------------------------------------------------------
# Encoder-classifier views: (text_a, text_b)
# --------------------------------------------------------------------------------------


def _pair(a: str, b: str | None = None) -> Callable[[Mapping[str, Any]], tuple[str, str | None]]:
    return lambda fields: (fields[a], fields[b] if b else None)


def _copa_pair(fields: Mapping[str, Any]) -> tuple[str, str | None]:
    # A simple pair view; a multiple-choice head would score each choice separately.
    return (
        f"{fields['premise']} What was the {fields['question']}?",
        f"choice1: {fields['choice1']} choice2: {fields['choice2']}",
    )


def _multirc_pair(fields: Mapping[str, Any]) -> tuple[str, str | None]:
    return _strip_multirc_html(fields["paragraph"]), f"{fields['question']} {fields['answer']}"


def _wic_pair(fields: Mapping[str, Any]) -> tuple[str, str | None]:
    return f"{fields['word']}: {fields['sentence1']}", fields["sentence2"]


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

_ENTAILMENT = ("entailment", "not_entailment")
_FALSE_TRUE = ("False", "True")


def _classification(
    name, labels, metrics, fields, keys, pair, hub_config, *, splits=_STANDARD_SPLITS, eval_splits=("validation",)
) -> Task:
    benchmark, short = name.split("/")
    hub_path = "nyu-mll/glue" if benchmark == "glue" else "aps/super_glue"
    return Task(
        name,
        CLASSIFICATION,
        labels,
        metrics,
        splits,
        eval_splits,
        fields,
        hub_path,
        hub_config,
        _t5_glue_inputs(short, keys),
        pair,
    )


def _build_registry() -> dict[str, Task]:
    acc = ("accuracy",)
    tasks = [
        # ---- GLUE (label order = HF glue label ids = TFDS label_classes) ----
        _classification(
            "glue/cola",
            ("unacceptable", "acceptable"),
            ("mcc",),
            ("sentence",),
            ("sentence",),
            _pair("sentence"),
            "cola",
        ),
        _classification(
            "glue/sst2", ("negative", "positive"), acc, ("sentence",), ("sentence",), _pair("sentence"), "sst2"
        ),
        _classification(
            "glue/mrpc",
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            _pair("sentence1", "sentence2"),
            "mrpc",
        ),
        Task(
            "glue/stsb",
            REGRESSION,
            (),
            ("pearson", "spearman"),
            _STANDARD_SPLITS,
            ("validation",),
            ("sentence1", "sentence2"),
            "nyu-mll/glue",
            "stsb",
            _t5_glue_inputs("stsb", ("sentence1", "sentence2")),
            _pair("sentence1", "sentence2"),
        ),
        _classification(
            "glue/qqp",
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
            ("question1", "question2"),
            ("question1", "question2"),
            _pair("question1", "question2"),
            "qqp",
        ),
        _classification(
            "glue/mnli",
            ("entailment", "neutral", "contradiction"),
            acc,
            ("premise", "hypothesis"),
            ("hypothesis", "premise"),
            _pair("premise", "hypothesis"),
            "mnli",
            splits=("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        _classification(
            "glue/qnli",
            _ENTAILMENT,
            acc,
            ("question", "sentence"),
            ("question", "sentence"),
            _pair("question", "sentence"),
            "qnli",
        ),
        _classification(
            "glue/rte",
            _ENTAILMENT,
            acc,
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            _pair("sentence1", "sentence2"),
            "rte",
        ),
        _classification(
            "glue/wnli",
            ("not_entailment", "entailment"),
            acc,
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            _pair("sentence1", "sentence2"),
            "wnli",
        ),
        # ---- SuperGLUE (label order = HF super_glue label ids) ----
        _classification(
            "superglue/boolq",
            _FALSE_TRUE,
            acc,
            ("question", "passage"),
            ("passage", "question"),
            _pair("question", "passage"),
            "boolq",
        ),
        _classification(
            "superglue/cb",
            ("entailment", "contradiction", "neutral"),
            ("macro_f1", "accuracy"),
            ("premise", "hypothesis"),
            ("hypothesis", "premise"),
            _pair("premise", "hypothesis"),
            "cb",
        ),
        _classification(
            "superglue/copa",
            ("choice1", "choice2"),
            acc,
            ("premise", "choice1", "choice2", "question"),
            ("choice1", "choice2", "premise", "question"),
            _copa_pair,
            "copa",
        ),
        replace(
            _classification(
                "superglue/multirc",
                _FALSE_TRUE,
                ("f1a", "em"),
                ("paragraph", "question", "answer"),
                (),
                _multirc_pair,
                "multirc",
            ),
            format_inputs=_multirc_inputs,
        ),
        Task(
            "superglue/record",
            GENERATION,
            (),
            ("f1", "em"),
            _STANDARD_SPLITS,
            ("validation",),
            ("passage", "query", "entities"),
            "aps/super_glue",
            "record",
            _record_inputs,
            lambda f: (f["query"], _record_passage(f["passage"])),
        ),
        _classification(
            "superglue/rte",
            _ENTAILMENT,
            acc,
            ("premise", "hypothesis"),
            ("hypothesis", "premise"),
            _pair("premise", "hypothesis"),
            "rte",
        ),
        _classification(
            "superglue/wic",
            _FALSE_TRUE,
            acc,
            ("word", "sentence1", "sentence2"),
            ("sentence1", "sentence2", "word"),
            _wic_pair,
            "wic",
        ),
        replace(
            _classification(
                "superglue/wsc",
                _FALSE_TRUE,
                acc,
                ("text", "span1_text", "span1_index", "span2_text", "span2_index"),
                (),
                lambda f: (mark_wsc_spans(f), None),
                "wsc.fixed",
            ),
            format_inputs=_wsc_inputs,
        ),
        # ---- closed-book QA (T5 CBQA prefixes) and TyDiQA-GoldP (mT5) ----
        Task(
            "cbqa/nq",
            GENERATION,
            (),
            ("f1", "em"),
            ("train", "validation"),
            ("validation",),
            ("question",),
            "google-research-datasets/nq_open",
            "nq_open",
            _question_inputs("nq question:"),
            _pair("question"),
        ),
        Task(
            "cbqa/webquestions",
            GENERATION,
            (),
            ("f1", "em"),
            ("train", "test"),
            ("test",),
            ("question",),
            "Stanford/web_questions",
            None,
            _question_inputs("wq question:"),
            _pair("question"),
        ),
        Task(
            "cbqa/triviaqa",
            GENERATION,
            (),
            ("f1", "em"),
            _STANDARD_SPLITS,
            ("validation",),
            ("question",),
            "mandarjoshi/trivia_qa",
            "rc.nocontext",
            _question_inputs("trivia_qa question:"),
            _pair("question"),
        ),
        Task(
            "tydiqa/goldp",
            GENERATION,
            (),
            ("f1", "em"),
            ("train", "validation"),
            ("validation",),
            ("question", "context"),
            "google-research-datasets/tydiqa",
            "secondary_task",
            _tydiqa_inputs,
            _pair("question", "context"),
        ),
    ]
    return {task.name: task for task in tasks}


TASKS: dict[str, Task] = _build_registry()

# Named mixtures. As in T5, the GLUE mixture leaves out WNLI (its dev set is adversarial).
MIXTURES: dict[str, tuple[str, ...]] = {
    "glue": tuple(n for n in TASKS if n.startswith("glue/") and n != "glue/wnli"),
    "superglue": tuple(n for n in TASKS if n.startswith("superglue/")),
}


def task_names() -> list[str]:
    """Every registered task name, in registry order."""
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (case-insensitive); UserError with a suggestion if unknown."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, TASKS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown task {name!r}; {hint}known tasks: {', '.join(TASKS)}")


def generic_task(kind: str, labels: Sequence[str] | None = None, name: str = "generic") -> Task:
    """A task for :func:`samlm.data.formats.load_generic` data, so metrics can be computed.

    Metrics: accuracy + macro-F1 (classification), Pearson + Spearman (regression),
    SQuAD F1 + EM (generation).
    """
    metrics = {CLASSIFICATION: ("accuracy", "macro_f1"), REGRESSION: ("pearson", "spearman"), GENERATION: ("f1", "em")}
    if kind not in metrics:
        raise UserError(f"unknown kind {kind!r}; use {', '.join(metrics)}")
    if kind == CLASSIFICATION and not labels:
        raise UserError("a generic classification task needs its label words")
    return Task(
        name,
        kind,
        tuple(labels or ()),
        metrics[kind],
        _STANDARD_SPLITS,
        ("validation",),
        ("input",),
        None,
        None,
        lambda f: str(f.get("input", "")),
        lambda f: (str(f.get("input", "")), None),
    )


def demo_data_dir() -> Path:
    """The built-in GLUE-format demo data (``RTE/`` and ``SST-2/``, a few dozen hand-written
    rows) shipped in ``samlm/resources/finetune/glue``."""
    return Path(str(resources.files("samlm") / "resources" / "finetune" / "glue"))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_task(name: str | Task, data_dir: str | Path | None = None, split: str = "train") -> list[Example]:
    """The examples of one split of a task.

    With ``data_dir``, reads the official local files (see ``docs/data.md``); without it,
    downloads through ``datasets.load_dataset`` from the Hugging Face hub. Unlabelled rows
    (test splits) get ``label=None`` and ``target=""``. The ReCoRD training split has one
    example per gold answer, as T5 trains it (:func:`one_example_per_answer`).
    """
    task = get_task(name)
    _check_split(task, split)
    if data_dir is not None:
        rows = _read_local_rows(task, Path(data_dir), split)
    else:
        rows = _read_hub_rows(task, split)
    examples = [_example_from_row(task, row, split) for row in rows]
    if not examples:
        raise UserError(f"{task.name} {split}: no examples")
    if task.name == "superglue/record" and split == "train":
        examples = one_example_per_answer(examples)
    return examples


def _check_split(task: Task, split: str) -> None:
    if split in task.splits:
        return
    close = difflib.get_close_matches(split, task.splits, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"{task.name} has no split {split!r} (splits: {', '.join(task.splits)}){hint}")


def _label_parser(task: Task) -> LabelParser:
    if task.kind == REGRESSION:
        return score_label_parser(0.0, 5.0)  # STS-B similarity scores
    return class_label_parser(task.labels)


def _read_local_rows(task: Task, data_dir: Path, split: str) -> list[Row]:
    if task.benchmark == "glue":
        return official.load_glue_rows(task.short_name, data_dir, split, _label_parser(task))
    if task.benchmark == "superglue":
        return official.load_superglue_rows(task.short_name, data_dir, split, _label_parser(task))
    readers = {
        "cbqa/nq": official.load_nq_open_rows,
        "cbqa/webquestions": official.load_webquestions_rows,
        "cbqa/triviaqa": official.load_triviaqa_rows,
        "tydiqa/goldp": official.load_tydiqa_rows,
    }
    return readers[task.name](data_dir, split)


def _example_from_row(task: Task, row: Row, split: str) -> Example:
    fields = row.fields
    answers = row.answers
    inputs = task.format_inputs(fields)
    if task.name == "tydiqa/goldp":
        # mT5 pads punctuation in the answers as in the inputs, so targets match the text.
        answers = tuple(dict.fromkeys(pad_punctuation(a).strip() for a in answers))
    text_a, text_b = task.encoder_pair(fields)
    prefix = f"{task.name}:{split}:"
    return Example(
        uid=prefix + row.uid,
        task=task.name,
        inputs=inputs,
        target=_target_text(task, row.label, answers),
        label=row.label,
        answers=answers,
        group=prefix + row.group if row.group is not None else None,
        text_a=text_a,
        text_b=text_b,
        fields=dict(fields),
    )


def _target_text(task: Task, label: int | float | None, answers: Sequence[str]) -> str:
    if task.kind == GENERATION:
        return answers[0] if answers else ""
    if label is None:
        return ""
    if task.kind == REGRESSION:
        return stsb_target(float(label))
    return task.labels[int(label)]


def one_example_per_answer(examples: Sequence[Example]) -> list[Example]:
    """One copy of each example per gold answer, each with that answer as its target.

    T5 trains ReCoRD this way (``preprocessors.record``). The copies share the example's
    ``group`` so that :func:`subsample` keeps them together and metrics count them once.
    """
    expanded = []
    for example in examples:
        if not example.answers:
            expanded.append(example)
            continue
        for i, answer in enumerate(example.answers):
            expanded.append(
                replace(example, uid=f"{example.uid}#{i}", target=answer, group=example.group or example.uid)
            )
    return expanded


# ---- the hub --------------------------------------------------------------------------

# Columns each hub dataset must have (beyond the task's text fields).
_HUB_EXTRA_COLUMNS = {
    "superglue/multirc": ("idx", "label"),
    "superglue/record": ("idx", "answers"),
    "cbqa/nq": ("answer",),
    "cbqa/webquestions": ("answers",),
    "cbqa/triviaqa": ("answer",),
    "tydiqa/goldp": ("id", "answers"),
}


def _read_hub_rows(task: Task, split: str) -> list[Row]:
    import datasets  # heavy, and only this path needs it

    where = f"{task.hub_path}" + (f" ({task.hub_config})" if task.hub_config else "")
    try:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as err:  # offline, unknown dataset, hub errors: all the user's to fix
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"could not load {task.name} {split} from the Hugging Face hub {where}: "
            f"{type(err).__name__}: {detail}; pass a data directory with the files instead"
        ) from None
    extra = _HUB_EXTRA_COLUMNS.get(task.name, ("label",) if task.kind != GENERATION else ())
    required = [c for c in (*task.fields, *extra) if c != "language"]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"hub dataset {where} {split} lacks column {missing[0]!r} (has: {', '.join(dataset.column_names)})"
        )
    return [_hub_row(task, record, n, f"{where} {split} row {n}") for n, record in enumerate(dataset)]


def _hub_row(task: Task, record: Mapping[str, Any], n: int, where: str) -> Row:
    """A hub record as a Row. Hub labels are class ids, with -1 for unlabelled test rows."""
    name = task.name
    if name == "cbqa/nq":
        return Row(str(n), {"question": record["question"]}, answers=tuple(record["answer"]), where=where)
    if name == "cbqa/webquestions":
        return Row(
            str(n),
            {"question": record["question"], "url": record.get("url", "")},
            answers=tuple(record["answers"]),
            where=where,
        )
    if name == "cbqa/triviaqa":
        answer = record["answer"] or {}
        values = [answer.get("value") or "", *(answer.get("aliases") or [])]
        # Unanswered (test) rows hold the placeholder value "<unk>".
        answers = tuple(dict.fromkeys(v for v in values if v and v != "<unk>"))
        return Row(str(record.get("question_id", n)), {"question": record["question"]}, answers=answers, where=where)
    if name == "tydiqa/goldp":
        return official.tydiqa_row(
            record["id"], record["question"], record["context"], list(record["answers"]["text"]), where
        )

    fields = {key: record[key] for key in task.fields}
    idx = record.get("idx", n)
    if name == "superglue/record":
        uid = f"{idx['passage']}-{idx['query']}"
        fields["entities"] = sorted(set(fields["entities"]))
        return Row(uid, fields, answers=tuple(sorted(set(record["answers"]))), group=uid, where=where)
    label = _hub_label(task, record.get("label"), where)
    if name == "superglue/multirc":
        group = f"{idx['paragraph']}-{idx['question']}"
        return Row(f"{group}-{idx['answer']}", fields, label, group=group, where=where)
    return Row(str(idx), fields, label, where=where)


def _hub_label(task: Task, raw: Any, where: str) -> int | float | None:
    if raw is None or raw == -1:
        return None
    return _label_parser(task)(raw, where)
