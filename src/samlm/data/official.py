"""Readers of the fine-tuning benchmarks' official files: GLUE (``download_glue_data.py``'s
layout), SuperGLUE, closed-book QA (NQ-open, WebQuestions, TriviaQA) and TyDiQA GoldP. Each
turns one split file into :class:`~samlm.data.formats.Row` records; errors name the file and line
or JSON path (:mod:`samlm.data.formats`). See ``docs/data.md`` for each layout with an example.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samlm.data.formats import (
    LabelParser,
    Row,
    dedupe,
    json_type,
    read_json,
    read_jsonl,
    read_tsv,
    require,
    string_list,
)
from samlm.errors import UserError

# --------------------------------------------------------------------------------------
# Locating split files
# --------------------------------------------------------------------------------------


def find_split_file(
    data_dir: str | Path,
    directories: Sequence[str],
    candidates: Sequence[str],
    task_name: str,
    split: str,
) -> Path:
    """First existing ``data_dir/<directory>/<candidate>``, then ``data_dir/<candidate>``.

    So both a benchmark root (``glue_data/`` holding ``RTE/``) and the task directory itself
    work. Raises UserError naming every path that was tried.
    """
    root = Path(data_dir)
    if not root.exists():
        raise UserError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the directory holding {task_name}")
    tried = []
    for base in [root / d for d in directories] + [root]:
        for name in candidates:
            path = base / name
            if path.is_file():
                return path
            tried.append(str(path))
    raise UserError(f"no {split} file for {task_name}: expected {' or '.join(tried)}")


# --------------------------------------------------------------------------------------
# GLUE (download_glue_data.py layout)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task's files live and which columns hold what."""

    directories: tuple[str, ...]
    text_columns: Mapping[str, str]  # field name (as in HF datasets) -> TSV column
    label_column: str
    files: Mapping[str, tuple[str, ...]]  # split -> candidate file names, first found wins
    headerless_columns: tuple[str, ...] = ()  # for files without a header line
    headerless_splits: tuple[str, ...] = ()


_GLUE_FILES = {"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)}
_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}

GLUE_LAYOUTS: dict[str, GlueLayout] = {
    # CoLA's train/dev files are the only GLUE files without a header.
    "cola": GlueLayout(
        ("CoLA", "cola"),
        {"sentence": "sentence"},
        "label",
        _GLUE_FILES,
        headerless_columns=("source", "label", "original_label", "sentence"),
        headerless_splits=("train", "validation"),
    ),
    "sst2": GlueLayout(("SST-2", "sst2"), {"sentence": "sentence"}, "label", _GLUE_FILES),
    # MRPC: download_glue_data.py copies msr_paraphrase_train.txt (BOM included) into
    # train.tsv/dev.tsv; the raw Microsoft files are accepted too (train = all of it).
    "mrpc": GlueLayout(
        ("MRPC", "mrpc"),
        {"sentence1": "#1 String", "sentence2": "#2 String"},
        "Quality",
        {
            "train": ("train.tsv", "msr_paraphrase_train.txt"),
            "validation": ("dev.tsv",),
            "test": ("test.tsv", "msr_paraphrase_test.txt"),
        },
    ),
    "stsb": GlueLayout(("STS-B", "stsb"), _PAIR, "score", _GLUE_FILES),
    "qqp": GlueLayout(
        ("QQP", "qqp"),
        {"question1": "question1", "question2": "question2"},
        "is_duplicate",
        _GLUE_FILES,
    ),
    "mnli": GlueLayout(
        ("MNLI", "mnli"),
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        {
            "train": ("train.tsv",),
            "validation_matched": ("dev_matched.tsv",),
            "validation_mismatched": ("dev_mismatched.tsv",),
            "test_matched": ("test_matched.tsv",),
            "test_mismatched": ("test_mismatched.tsv",),
        },
    ),
    "qnli": GlueLayout(
        ("QNLI", "qnli"),
        {"question": "question", "sentence": "sentence"},
        "label",
        _GLUE_FILES,
    ),
    "rte": GlueLayout(("RTE", "rte"), _PAIR, "label", _GLUE_FILES),
    "wnli": GlueLayout(("WNLI", "wnli"), _PAIR, "label", _GLUE_FILES),
}


def load_glue_rows(task: str, data_dir: str | Path, split: str, parse_label: LabelParser) -> list[Row]:
    """Rows of GLUE task ``task`` (``"rte"``) for ``split`` from a GLUE directory."""
    layout = GLUE_LAYOUTS[task]
    path = find_split_file(data_dir, layout.directories, layout.files[split], f"glue/{task}", split)
    headerless = split in layout.headerless_splits
    table = read_tsv(path, layout.headerless_columns if headerless else None)
    text_index = {name: table.column_index(col) for name, col in layout.text_columns.items()}
    # Test files have no label column; in any other split a missing label column is an error.
    labelled = not split.startswith("test") or table.has_column(layout.label_column)
    label_index = table.column_index(layout.label_column) if labelled else None

    rows = []
    for n, (number, cells) in enumerate(table.rows):
        where = f"{path}:{number}"
        fields = {name: cells[i] for name, i in text_index.items()}
        label = None if label_index is None else parse_label(cells[label_index], where)
        rows.append(Row(uid=str(n), fields=fields, label=label, where=where))
    return rows


# --------------------------------------------------------------------------------------
# SuperGLUE (train.jsonl / val.jsonl / test.jsonl)
# --------------------------------------------------------------------------------------

SUPERGLUE_DIRECTORIES = {
    "boolq": ("BoolQ", "boolq"),
    "cb": ("CB", "cb"),
    "copa": ("COPA", "copa"),
    "multirc": ("MultiRC", "multirc"),
    "record": ("ReCoRD", "record"),
    "rte": ("RTE", "rte"),
    "wic": ("WiC", "wic"),
    "wsc": ("WSC", "wsc"),
}
SUPERGLUE_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl",), "test": ("test.jsonl",)}

# Text fields of the flat SuperGLUE tasks (names as in the files and in HF super_glue).
_SUPERGLUE_TEXT_FIELDS = {
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2"),
}


def load_superglue_rows(task: str, data_dir: str | Path, split: str, parse_label: LabelParser) -> list[Row]:
    """Rows of SuperGLUE task ``task`` (``"boolq"``) for ``split`` from a SuperGLUE directory."""
    path = find_split_file(data_dir, SUPERGLUE_DIRECTORIES[task], SUPERGLUE_FILES[split], f"superglue/{task}", split)
    labelled = split != "test"
    rows: list[Row] = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        uid = str(obj.get("idx", number - 1))
        if task == "multirc":
            rows.extend(_multirc_rows(obj, where, parse_label, labelled))
        elif task == "record":
            rows.extend(_record_rows(obj, where, labelled))
        elif task == "wsc":
            rows.append(_wsc_row(obj, uid, where, parse_label, labelled))
        else:
            fields = {name: require(obj, name, "a string", where) for name in _SUPERGLUE_TEXT_FIELDS[task]}
            if task == "copa" and fields["question"] not in ("cause", "effect"):
                raise UserError(f"{where}: key 'question' should be 'cause' or 'effect', found {fields['question']!r}")
            label = _optional_label(obj, where, parse_label, labelled)
            rows.append(Row(uid=uid, fields=fields, label=label, where=where))
    return rows


def _optional_label(
    obj: Mapping[str, Any], where: str, parse_label: LabelParser, labelled: bool, path: str = ""
) -> int | float | None:
    """The parsed ``label``; required in labelled splits, optional in test files."""
    if not labelled and "label" not in obj:
        return None
    return parse_label(require(obj, "label", "a label", where, path), where)


def _wsc_row(obj: Mapping[str, Any], uid: str, where: str, parse_label: LabelParser, labelled: bool) -> Row:
    target = require(obj, "target", "an object", where)
    fields = {
        "text": require(obj, "text", "a string", where),
        "span1_text": require(target, "span1_text", "a string", where, "target"),
        "span1_index": require(target, "span1_index", "an integer", where, "target"),
        "span2_text": require(target, "span2_text", "a string", where, "target"),
        "span2_index": require(target, "span2_index", "an integer", where, "target"),
    }
    label = _optional_label(obj, where, parse_label, labelled)
    return Row(uid=uid, fields=fields, label=label, where=where)


def _multirc_rows(obj: Mapping[str, Any], where: str, parse_label: LabelParser, labelled: bool) -> list[Row]:
    """One row per answer option; the options of one question share a group."""
    p_idx = obj.get("idx", 0)
    passage = require(obj, "passage", "an object", where)
    paragraph = require(passage, "text", "a string", where, "passage")
    rows = []
    questions = require(passage, "questions", "an array", where, "passage")
    for qi, question in enumerate(questions):
        q_path = f"passage.questions[{qi}]"
        question_text = require(question, "question", "a string", where, q_path)
        q_idx = question.get("idx", qi)
        for ai, answer in enumerate(require(question, "answers", "an array", where, q_path)):
            a_path = f"{q_path}.answers[{ai}]"
            answer_text = require(answer, "text", "a string", where, a_path)
            label = _optional_label(answer, where, parse_label, labelled, a_path)
            a_idx = answer.get("idx", ai)
            rows.append(
                Row(
                    uid=f"{p_idx}-{q_idx}-{a_idx}",
                    fields={"paragraph": paragraph, "question": question_text, "answer": answer_text},
                    label=label,
                    group=f"{p_idx}-{q_idx}",
                    where=where,
                )
            )
    return rows


def _record_rows(obj: Mapping[str, Any], where: str, labelled: bool) -> list[Row]:
    """One row per query, with the passage's entity strings and every gold answer."""
    p_idx = obj.get("idx", 0)
    passage = require(obj, "passage", "an object", where)
    text = require(passage, "text", "a string", where, "passage")
    entities = set()
    for ei, entity in enumerate(require(passage, "entities", "an array", where, "passage")):
        e_path = f"passage.entities[{ei}]"
        start = require(entity, "start", "an integer", where, e_path)
        end = require(entity, "end", "an integer", where, e_path)
        if not 0 <= start <= end < len(text):
            raise UserError(f"{where}: {e_path} span {start}-{end} is outside the passage")
        entities.add(text[start : end + 1])  # ReCoRD's entity ends are inclusive
    rows = []
    for qi, qa in enumerate(require(obj, "qas", "an array", where)):
        q_path = f"qas[{qi}]"
        query = require(qa, "query", "a string", where, q_path)
        answers: set[str] = set()
        if labelled or "answers" in qa:
            for ai, answer in enumerate(require(qa, "answers", "an array", where, q_path)):
                answers.add(require(answer, "text", "a string", where, f"{q_path}.answers[{ai}]"))
        q_idx = qa.get("idx", qi)
        # Sorted sets, as TFDS and HF super_glue store them.
        rows.append(
            Row(
                uid=f"{p_idx}-{q_idx}",
                fields={"passage": text, "query": query, "entities": sorted(entities)},
                answers=tuple(sorted(answers)),
                group=f"{p_idx}-{q_idx}",
                where=where,
            )
        )
    return rows


# --------------------------------------------------------------------------------------
# Closed-book QA and TyDiQA
# --------------------------------------------------------------------------------------

NQ_OPEN_FILES = {
    "train": ("NQ-open.train.jsonl", "train.jsonl"),
    "validation": ("NQ-open.dev.jsonl", "dev.jsonl"),
}
WEBQUESTIONS_FILES = {
    "train": ("webquestions.examples.train.json", "train.json"),
    "test": ("webquestions.examples.test.json", "test.json"),
}
# The first file found wins: the unfiltered web split (what T5's closed-book QA used),
# then the RC web and Wikipedia splits.
TRIVIAQA_FILES = {
    "train": ("unfiltered-web-train.json", "web-train.json", "wikipedia-train.json", "train.json"),
    "validation": (
        "unfiltered-web-dev.json",
        "web-dev.json",
        "verified-web-dev.json",
        "wikipedia-dev.json",
        "verified-wikipedia-dev.json",
        "dev.json",
    ),
    "test": (
        "unfiltered-web-test-without-answers.json",
        "web-test-without-answers.json",
        "wikipedia-test-without-answers.json",
        "test.json",
    ),
}
TYDIQA_FILES = {
    "train": ("tydiqa-goldp-v1.1-train.json", "train.json"),
    "validation": ("tydiqa-goldp-v1.1-dev.json", "dev.json"),
}


def load_nq_open_rows(data_dir: str | Path, split: str) -> list[Row]:
    """NQ-open JSONL: ``{"question": str, "answer": [str, ...]}`` per line."""
    path = find_split_file(data_dir, ("NQ-open", "nq_open", "nq"), NQ_OPEN_FILES[split], "cbqa/nq", split)
    rows = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        question = require(obj, "question", "a string", where)
        answers = _nonempty_answers(obj.get("answer"), where, "answer")
        rows.append(Row(uid=str(number - 1), fields={"question": question}, answers=answers, where=where))
    return rows


def _nonempty_answers(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        raise UserError(f"{where}: missing key {name!r}")
    answers = string_list(value, where, name)
    if not answers:
        raise UserError(f"{where}: key {name!r} has no answers")
    return answers


_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()"]*?))\s*\)')


def parse_webquestions_target(target_value: str) -> tuple[str, ...]:
    """Answers out of a WebQuestions ``targetValue``.

    ``'(list (description "Jazmyn Bieber") (description Jaxon))'`` ->
    ``("Jazmyn Bieber", "Jaxon")``. Descriptions may be quoted (with ``\\"`` escapes) or bare.
    """
    answers = []
    for quoted, bare in _DESCRIPTION.findall(target_value):
        text = re.sub(r"\\(.)", r"\1", quoted) if quoted else bare
        answers.append(text.strip())
    return tuple(a for a in answers if a)


def load_webquestions_rows(data_dir: str | Path, split: str) -> list[Row]:
    """WebQuestions JSON: a list of ``{"url", "targetValue", "utterance"}`` objects."""
    path = find_split_file(
        data_dir, ("webquestions", "WebQuestions"), WEBQUESTIONS_FILES[split], "cbqa/webquestions", split
    )
    data = read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of questions, found {json_type(data)}")
    rows = []
    for i, item in enumerate(data):
        where = f"{path}: [{i}]"
        question = require(item, "utterance", "a string", where)
        target_value = require(item, "targetValue", "a string", where)
        answers = parse_webquestions_target(target_value)
        if not answers:
            raise UserError(f"{where}: targetValue {target_value!r} has no (description ...) answer")
        rows.append(
            Row(uid=str(i), fields={"question": question, "url": item.get("url", "")}, answers=answers, where=where)
        )
    return rows


def load_triviaqa_rows(data_dir: str | Path, split: str) -> list[Row]:
    """TriviaQA JSON: ``{"Data": [{"Question", "QuestionId", "Answer": {...}}]}``.

    Answers are the answer's ``Value`` followed by its ``Aliases`` (T5 scores against the
    aliases; the value is normally one of them). Test files have no ``Answer``.
    """
    path = find_split_file(
        data_dir, ("qa", "triviaqa-unfiltered", "triviaqa"), TRIVIAQA_FILES[split], "cbqa/triviaqa", split
    )
    document = read_json(path)
    items = require(document, "Data", "an array", str(path))
    rows = []
    for i, item in enumerate(items):
        where = f"{path}: Data[{i}]"
        question = require(item, "Question", "a string", where)
        answers: tuple[str, ...] = ()
        if split != "test" or "Answer" in item:
            answer = require(item, "Answer", "an object", where)
            value = require(answer, "Value", "a string", where, "Answer")
            aliases = string_list(answer.get("Aliases", []), where, "Answer.Aliases")
            answers = dedupe((value, *aliases))
        uid = str(item.get("QuestionId", i))
        rows.append(Row(uid=uid, fields={"question": question}, answers=answers, where=where))
    return rows


def load_tydiqa_rows(data_dir: str | Path, split: str) -> list[Row]:
    """TyDiQA-GoldP SQuAD-style JSON: ``data[].paragraphs[].{context, qas[]}``."""
    path = find_split_file(data_dir, ("tydiqa", "TyDiQA", "tydiqa-goldp"), TYDIQA_FILES[split], "tydiqa/goldp", split)
    document = read_json(path)
    rows = []
    for di, article in enumerate(require(document, "data", "an array", str(path))):
        a_where = f"{path}: data[{di}]"
        for pi, paragraph in enumerate(require(article, "paragraphs", "an array", a_where)):
            p_where = f"{a_where}.paragraphs[{pi}]"
            context = require(paragraph, "context", "a string", p_where)
            for qi, qa in enumerate(require(paragraph, "qas", "an array", p_where)):
                where = f"{p_where}.qas[{qi}]"
                qid = require(qa, "id", "a string", where)
                question = require(qa, "question", "a string", where)
                texts = [
                    require(a, "text", "a string", f"{where}.answers[{ai}]")
                    for ai, a in enumerate(require(qa, "answers", "an array", where))
                ]
                if not texts:
                    raise UserError(f"{where}: key 'answers' has no answers")
                rows.append(tydiqa_row(qid, question, context, texts, where))
    return rows


def tydiqa_row(qid: str, question: str, context: str, answers: Sequence[str], where: str) -> Row:
    """A TyDiQA row; the language is the id's prefix (``"english-123..."`` -> ``english``)."""
    language = qid.split("-", 1)[0] if "-" in qid else ""
    return Row(
        uid=qid,
        fields={"question": question, "context": context, "language": language},
        answers=dedupe(answers),
        where=where,
    )
