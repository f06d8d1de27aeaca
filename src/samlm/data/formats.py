"""Readers for the official on-disk formats of the fine-tuning benchmarks.

Each reader turns one split file into :class:`Row` records: the raw text fields under the
names the Hugging Face / TFDS datasets use, an already-validated label, and ``where``
(``file:line``) so that later errors can still point at the source. Turning a ``Row`` into
an :class:`Example` (T5 text-to-text strings, encoder view) is :mod:`samlm.data.tasks`'
job; this module knows files, not tasks.

Every problem raises :class:`samlm.errors.UserError` with one line that names the file and,
where there is one, the 1-based line (``data/RTE/train.tsv:17: ...``). Files that hold one
JSON document (WebQuestions, TriviaQA, TyDiQA) report syntax errors by line and content
errors by JSON path (``train.json: Data[3]: missing key 'Question'``), because Python's JSON
parser does not keep line numbers for values.

See ``docs/data.md`` for each layout with an example.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samlm.errors import UserError

__all__ = [
    "Example",
    "Row",
    "GENERIC_KEYS",
    "parse_column_mapping",
    "load_generic",
    "class_label_parser",
    "score_label_parser",
    "read_text",
    "read_tsv",
    "read_jsonl",
    "read_json",
    "find_split_file",
    "load_glue_rows",
    "load_superglue_rows",
    "load_nq_open_rows",
    "load_webquestions_rows",
    "load_triviaqa_rows",
    "load_tydiqa_rows",
    "parse_webquestions_target",
]

UTF8_BOM = b"\xef\xbb\xbf"

LabelParser = Callable[[Any, str], "int | float"]


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One fine-tuning example, in both the text-to-text and the encoder-classifier view.

    - ``uid``: unique within a task and split, ``"<task>:<split>:<id>"``.
    - ``inputs`` / ``target``: the T5 text-to-text strings. ``target`` is ``""`` for
      unlabelled (test) rows.
    - ``label``: class index (classification), float score (regression), or ``None``
      (generation tasks and unlabelled rows).
    - ``answers``: every acceptable answer (QA, ReCoRD); metrics take the max over them.
    - ``group``: examples that belong to one question share it (MultiRC answer options,
      ReCoRD per-answer training copies); ``None`` otherwise.
    - ``text_a`` / ``text_b``: the encoder-classifier view (single text or text pair).
    - ``fields``: the raw text fields, named as in the Hugging Face datasets.
    """

    uid: str
    task: str
    inputs: str
    target: str
    label: int | float | None = None
    answers: tuple[str, ...] = ()
    group: str | None = None
    text_a: str = ""
    text_b: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        # The generated hash would fail on the `fields` dict; equal examples share task and uid.
        return hash((self.task, self.uid))


@dataclass(frozen=True)
class Row:
    """One record as read from a file or the hub, before task formatting."""

    uid: str
    fields: dict[str, Any]
    label: int | float | None = None
    answers: tuple[str, ...] = ()
    group: str | None = None
    where: str = ""


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------


def class_label_parser(labels: Sequence[str]) -> LabelParser:
    """Parser mapping a raw label to its index in ``labels``.

    Accepts the label word (``"entailment"``), its index as an int or a digit string
    (GLUE's ``0``/``1`` columns, COPA's ``0``/``1``), and JSON booleans when the labels are
    ``("False", "True")`` (SuperGLUE BoolQ, WiC, WSC, MultiRC).
    """
    labels = tuple(labels)
    boolean_labels = labels == ("False", "True")
    allowed = f"{', '.join(labels)} (or 0-{len(labels) - 1})"

    def parse(raw: Any, where: str) -> int:
        index: int | None = None
        if isinstance(raw, bool):
            index = int(raw) if boolean_labels else None
        elif isinstance(raw, int):
            index = raw
        elif isinstance(raw, str):
            text = raw.strip()
            if text in labels:
                return labels.index(text)
            if re.fullmatch(r"[0-9]+", text):
                index = int(text)
        if index is None or not 0 <= index < len(labels):
            raise UserError(f"{where}: label {raw!r} is not one of {allowed}")
        return index

    return parse


def score_label_parser(low: float, high: float) -> LabelParser:
    """Parser for a float score that must lie in ``[low, high]`` (STS-B: 0-5)."""

    def parse(raw: Any, where: str) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: score {raw!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise UserError(f"{where}: score {raw!r} is outside [{low:g}, {high:g}]")
        return value

    return parse


# --------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def read_text(path: str | Path) -> str:
    """The file's text. Strips a UTF-8 byte-order mark (MRPC's files start with one).

    Raises UserError for a missing or empty file and for bytes that are not UTF-8 (naming
    the line and the byte offset).
    """
    path = Path(path)
    data = _read_bytes(path)
    bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    body = data[bom:]
    if not body.strip():
        raise UserError(f"{path}: file is empty")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        line = body.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path}:{line}: bytes are not valid UTF-8 (0x{body[err.start]:02x} at byte offset "
            f"{err.start + bom}); re-encode the file as UTF-8"
        ) from None


def _numbered_lines(text: str) -> Iterable[tuple[int, str]]:
    # Split on "\n" only: str.splitlines() would also split on \x0b, \x1c, U+2028..., which
    # occur inside real sentences and would shift every later line number.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line[:-1] if line.endswith("\r") else line


@dataclass(frozen=True)
class TsvTable:
    """A tab-separated file: its column names and its data rows with their line numbers."""

    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[int, list[str]]]
    has_header: bool

    def has_column(self, name: str) -> bool:
        return name in self.columns

    def column_index(self, name: str) -> int:
        if name not in self.columns:
            where = f"{self.path}:1" if self.has_header else str(self.path)
            raise UserError(f"{where}: missing column {name!r} (header has: {', '.join(self.columns)})")
        return self.columns.index(name)


def read_tsv(path: str | Path, columns: Sequence[str] | None = None) -> TsvTable:
    """Read a GLUE-style TSV (csv module, tab delimiter, ``QUOTE_NONE`` as GLUE does).

    ``columns=None``: the first line is the header. Otherwise the file has no header and
    ``columns`` names its fixed columns (CoLA's train/dev files). Every data row must have as
    many cells as there are columns; blank lines are skipped.
    """
    path = Path(path)
    lines = [(n, line) for n, line in _numbered_lines(read_text(path)) if line != ""]
    has_header = columns is None
    if has_header:
        (_, header_line), lines = lines[0], lines[1:]
        columns = _split_tsv_line(header_line, path, 1)
        if not lines:
            raise UserError(f"{path}: no data rows after the header")
    expected = len(columns)
    rows = []
    for number, line in lines:
        cells = _split_tsv_line(line, path, number)
        if len(cells) != expected:
            raise UserError(f"{path}:{number}: expected {expected} tab-separated columns, found {len(cells)}")
        rows.append((number, cells))
    return TsvTable(path, tuple(columns), rows, has_header)


def _split_tsv_line(line: str, path: Path, number: int) -> list[str]:
    try:
        return next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
    except csv.Error as err:
        raise UserError(f"{path}:{number}: cannot split the row into columns ({err})") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON-lines file: ``(line number, object)`` per non-blank line."""
    path = Path(path)
    records = []
    for number, line in _numbered_lines(read_text(path)):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, found {_json_type(value)}")
        records.append((number, value))
    return records


def read_json(path: str | Path) -> Any:
    """Read a file holding one JSON document."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


# --------------------------------------------------------------------------------------
# Typed access to JSON values, with errors that name the location
# --------------------------------------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "an array": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
    "a label": lambda v: isinstance(v, (str, int)),  # bool is an int
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for name in ("an integer", "a number", "a string", "an array", "an object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def _require(obj: Mapping[str, Any], key: str, expect: str, where: str, path: str = "") -> Any:
    """``obj[key]``, checked to be of JSON type ``expect``; ``path`` locates ``obj``."""
    name = f"{path}.{key}" if path else key
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: {path or 'value'} should be an object, found {_json_type(obj)}")
    if key not in obj:
        raise UserError(f"{where}: missing key {name!r}")
    value = obj[key]
    if not _JSON_TYPES[expect](value):
        raise UserError(f"{where}: key {name!r} should be {expect}, found {_json_type(value)}")
    return value


def _string_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    """A JSON string or array of strings, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: key {name!r} should be a string or an array of strings")


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
            fields = {name: _require(obj, name, "a string", where) for name in _SUPERGLUE_TEXT_FIELDS[task]}
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
    return parse_label(_require(obj, "label", "a label", where, path), where)


def _wsc_row(obj: Mapping[str, Any], uid: str, where: str, parse_label: LabelParser, labelled: bool) -> Row:
    target = _require(obj, "target", "an object", where)
    fields = {
        "text": _require(obj, "text", "a string", where),
        "span1_text": _require(target, "span1_text", "a string", where, "target"),
        "span1_index": _require(target, "span1_index", "an integer", where, "target"),
        "span2_text": _require(target, "span2_text", "a string", where, "target"),
        "span2_index": _require(target, "span2_index", "an integer", where, "target"),
    }
    label = _optional_label(obj, where, parse_label, labelled)
    return Row(uid=uid, fields=fields, label=label, where=where)


def _multirc_rows(obj: Mapping[str, Any], where: str, parse_label: LabelParser, labelled: bool) -> list[Row]:
    """One row per answer option; the options of one question share a group."""
    p_idx = obj.get("idx", 0)
    passage = _require(obj, "passage", "an object", where)
    paragraph = _require(passage, "text", "a string", where, "passage")
    rows = []
    questions = _require(passage, "questions", "an array", where, "passage")
    for qi, question in enumerate(questions):
        q_path = f"passage.questions[{qi}]"
        question_text = _require(question, "question", "a string", where, q_path)
        q_idx = question.get("idx", qi)
        for ai, answer in enumerate(_require(question, "answers", "an array", where, q_path)):
            a_path = f"{q_path}.answers[{ai}]"
            answer_text = _require(answer, "text", "a string", where, a_path)
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
    passage = _require(obj, "passage", "an object", where)
    text = _require(passage, "text", "a string", where, "passage")
    entities = set()
    for ei, entity in enumerate(_require(passage, "entities", "an array", where, "passage")):
        e_path = f"passage.entities[{ei}]"
        start = _require(entity, "start", "an integer", where, e_path)
        end = _require(entity, "end", "an integer", where, e_path)
        if not 0 <= start <= end < len(text):
            raise UserError(f"{where}: {e_path} span {start}-{end} is outside the passage")
        entities.add(text[start : end + 1])  # ReCoRD's entity ends are inclusive
    rows = []
    for qi, qa in enumerate(_require(obj, "qas", "an array", where)):
        q_path = f"qas[{qi}]"
        query = _require(qa, "query", "a string", where, q_path)
        answers: set[str] = set()
        if labelled or "answers" in qa:
            for ai, answer in enumerate(_require(qa, "answers", "an array", where, q_path)):
                answers.add(_require(answer, "text", "a string", where, f"{q_path}.answers[{ai}]"))
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
        question = _require(obj, "question", "a string", where)
        answers = _nonempty_answers(obj.get("answer"), where, "answer")
        rows.append(Row(uid=str(number - 1), fields={"question": question}, answers=answers, where=where))
    return rows


def _nonempty_answers(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        raise UserError(f"{where}: missing key {name!r}")
    answers = _string_list(value, where, name)
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
        raise UserError(f"{path}: expected a JSON array of questions, found {_json_type(data)}")
    rows = []
    for i, item in enumerate(data):
        where = f"{path}: [{i}]"
        question = _require(item, "utterance", "a string", where)
        target_value = _require(item, "targetValue", "a string", where)
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
    items = _require(document, "Data", "an array", str(path))
    rows = []
    for i, item in enumerate(items):
        where = f"{path}: Data[{i}]"
        question = _require(item, "Question", "a string", where)
        answers: tuple[str, ...] = ()
        if split != "test" or "Answer" in item:
            answer = _require(item, "Answer", "an object", where)
            value = _require(answer, "Value", "a string", where, "Answer")
            aliases = _string_list(answer.get("Aliases", []), where, "Answer.Aliases")
            answers = _dedupe((value, *aliases))
        uid = str(item.get("QuestionId", i))
        rows.append(Row(uid=uid, fields={"question": question}, answers=answers, where=where))
    return rows


def load_tydiqa_rows(data_dir: str | Path, split: str) -> list[Row]:
    """TyDiQA-GoldP SQuAD-style JSON: ``data[].paragraphs[].{context, qas[]}``."""
    path = find_split_file(data_dir, ("tydiqa", "TyDiQA", "tydiqa-goldp"), TYDIQA_FILES[split], "tydiqa/goldp", split)
    document = read_json(path)
    rows = []
    for di, article in enumerate(_require(document, "data", "an array", str(path))):
        a_where = f"{path}: data[{di}]"
        for pi, paragraph in enumerate(_require(article, "paragraphs", "an array", a_where)):
            p_where = f"{a_where}.paragraphs[{pi}]"
            context = _require(paragraph, "context", "a string", p_where)
            for qi, qa in enumerate(_require(paragraph, "qas", "an array", p_where)):
                where = f"{p_where}.qas[{qi}]"
                qid = _require(qa, "id", "a string", where)
                question = _require(qa, "question", "a string", where)
                texts = [
                    _require(a, "text", "a string", f"{where}.answers[{ai}]")
                    for ai, a in enumerate(_require(qa, "answers", "an array", where))
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
        answers=_dedupe(answers),
        where=where,
    )


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    """Drop repeats, keeping first-seen order (so the preferred answer stays first)."""
    return tuple(dict.fromkeys(values))


# --------------------------------------------------------------------------------------
# Generic JSONL / CSV / TSV with a column mapping
# --------------------------------------------------------------------------------------

GENERIC_KEYS = {
    "input": "the input text (required)",
    "input2": "a second input text, for text-pair tasks",
    "target": "the label word/index, score, or answer text",
    "answers": "all acceptable answers (generation); a JSON array or one string",
    "id": "a unique id (default: file name and line)",
    "group": "a group id (e.g. one question's answer options)",
}
KINDS = ("classification", "regression", "generation")


def parse_column_mapping(spec: str) -> dict[str, str]:
    """Parse ``"input=question,target=answer"`` into ``{"input": "question", "target": "answer"}``.

    Keys are those of :data:`GENERIC_KEYS`; ``input`` is required.
    """
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not key or not column:
            raise UserError(f"column mapping {part!r} should look like key=column (in {spec!r})")
        if key not in GENERIC_KEYS:
            raise UserError(f"unknown column-mapping key {key!r}; use {', '.join(GENERIC_KEYS)}")
        if key in mapping:
            raise UserError(f"column mapping names {key!r} twice (in {spec!r})")
        mapping[key] = column
    if "input" not in mapping:
        raise UserError(f"column mapping {spec!r} needs input=<column>")
    return mapping


def load_generic(
    path: str | Path,
    mapping: Mapping[str, str] | str,
    kind: str,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Examples from a ``.jsonl``, ``.csv`` or ``.tsv`` file through a column mapping.

    ``inputs`` is the ``input`` column verbatim, or ``"<input col>: <a> <input2 col>: <b>"``
    for pairs (T5's GLUE style). Classification targets may be label words or indices into
    ``labels``; regression targets are numbers; generation targets are text (``answers``
    defaults to the target). Task name on the examples: ``"generic"``.
    """
    path = Path(path)
    if isinstance(mapping, str):
        mapping = parse_column_mapping(mapping)
    else:
        mapping = dict(mapping)
        unknown = [k for k in mapping if k not in GENERIC_KEYS]
        if unknown or "input" not in mapping:
            raise UserError(f"column mapping needs input=<column> and keys among {', '.join(GENERIC_KEYS)}")
    parse_target = _generic_target_parser(kind, labels)
    if kind != "generation" and "target" not in mapping:
        raise UserError(f"a {kind} file needs target=<column> in the column mapping")

    examples = []
    for where, record in _generic_records(path, mapping):
        examples.append(_generic_example(path, where, record, mapping, kind, labels, parse_target))
    if not examples:
        raise UserError(f"{path}: no examples")
    uids = [e.uid for e in examples]
    if len(set(uids)) != len(uids):
        raise UserError(f"{path}: the id column {mapping['id']!r} has repeated values")
    return examples


def _generic_target_parser(kind: str, labels: Sequence[str] | None) -> LabelParser | None:
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; use {', '.join(KINDS)}")
    if kind == "classification":
        if not labels or len(set(labels)) != len(labels):
            raise UserError("a classification file needs a list of distinct label words")
        return class_label_parser(labels)
    if labels:
        raise UserError(f"labels only apply to classification, not {kind}")
    if kind == "regression":
        return score_label_parser(-math.inf, math.inf)
    return None


def _generic_records(path: Path, mapping: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each row of the file, with mapped columns checked."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]
        for where, obj in records:
            for column in mapping.values():
                if column not in obj:
                    raise UserError(f"{where}: missing key {column!r}")
        return records
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, mapping, delimiter="," if suffix == ".csv" else "\t")
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv")


def _csv_records(path: Path, mapping: Mapping[str, str], delimiter: str) -> list[tuple[str, dict[str, Any]]]:
    # CSV uses standard quoting (a quoted field may span lines), so each record is reported
    # at the line where it starts. TSV follows GLUE: no quoting.
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
        missing = [c for c in mapping.values() if c not in header]
        if missing:
            raise UserError(f"{path}:1: missing column {missing[0]!r} (header has: {', '.join(header)})")
        records = []
        start = reader.line_num + 1
        for cells in reader:
            if cells:
                if len(cells) != len(header):
                    raise UserError(f"{path}:{start}: expected {len(header)} columns, found {len(cells)}")
                records.append((f"{path}:{start}", dict(zip(header, cells))))
            start = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: cannot parse the row ({err})") from None
    return records


def _generic_example(
    path: Path,
    where: str,
    record: Mapping[str, Any],
    mapping: Mapping[str, str],
    kind: str,
    labels: Sequence[str] | None,
    parse_target: LabelParser | None,
) -> Example:
    def text(key: str) -> str:
        value = record[mapping[key]]
        if not isinstance(value, str):
            raise UserError(f"{where}: {mapping[key]!r} should be a string, found {_json_type(value)}")
        return value

    first = text("input")
    second = text("input2") if "input2" in mapping else None
    inputs = first if second is None else (f"{mapping['input']}: {first} {mapping['input2']}: {second}")

    label: int | float | None = None
    answers: tuple[str, ...] = ()
    target = ""
    if kind == "generation":
        if "answers" in mapping:
            answers = _string_list(record[mapping["answers"]], where, mapping["answers"])
        target = text("target") if "target" in mapping else (answers[0] if answers else "")
        answers = _dedupe((target, *answers)) if target else answers
    else:
        label = parse_target(record[mapping["target"]], where)
        target = labels[label] if kind == "classification" else format(label, "g")

    uid = str(record[mapping["id"]]) if "id" in mapping else where.rsplit("/", 1)[-1]
    group = str(record[mapping["group"]]) if "group" in mapping else None
    fields = {mapping[k]: record[mapping[k]] for k in mapping}
    return Example(
        uid=f"generic:{uid}",
        task="generic",
        inputs=inputs,
        target=target,
        label=label,
        answers=answers,
        group=group,
        text_a=first,
        text_b=second,
        fields=fields,
    )
