"""Fine-tuning records and the files they come from, whatever the benchmark.

:class:`Example` is one fine-tuning example; :class:`Row` is one record as a reader found it: the
raw text fields under the names the Hugging Face / TFDS datasets use, an already-validated label,
and ``where`` (``file:line``) so that later errors can still point at the source. Here: the label
parsers, the file readers (TSV, JSON lines, JSON, on :mod:`samlm.data.readers`), typed access to
JSON values, and a generic JSONL/CSV/TSV file through a column mapping (:func:`load_generic`).
The benchmarks' official layouts are :mod:`samlm.data.official`; turning a ``Row`` into an
``Example`` is :mod:`samlm.data.tasks`' job.

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
from typing import Any, Literal, cast

from samlm.data.readers import UTF8_BOM, InvalidUtf8, decode_utf8, jsonl_records, numbered_lines, read_bytes
from samlm.errors import UserError

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


def read_text(path: str | Path) -> str:
    """The file's text. Strips a UTF-8 byte-order mark (MRPC's files start with one).

    Raises UserError for a missing or empty file and for bytes that are not UTF-8 (naming
    the line and the byte offset).
    """
    path = Path(path)
    data = read_bytes(path)
    if not data.removeprefix(UTF8_BOM).strip():
        raise UserError(f"{path}: file is empty")
    try:
        return decode_utf8(data, path)
    except InvalidUtf8 as err:  # said the way every error about these files starts: file:line
        raise UserError(
            f"{path}:{err.line}: bytes are not valid UTF-8 (0x{err.value:02x} at byte offset "
            f"{err.byte}); re-encode the file as UTF-8"
        ) from None


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
    lines = [(n, line) for n, line in numbered_lines(read_text(path)) if line != ""]
    has_header = columns is None
    if has_header:
        (_, header_line), lines = lines[0], lines[1:]
        columns = _split_tsv_line(header_line, path, 1)
        if not lines:
            raise UserError(f"{path}: no data rows after the header")
    assert columns is not None
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
    for number, value in jsonl_records(path, numbered_lines(read_text(path))):
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, found {json_type(value)}")
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


def json_type(value: Any) -> str:
    """How an error names the JSON type of ``value`` ("an integer", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for name in ("an integer", "a number", "a string", "an array", "an object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def require(obj: Mapping[str, Any], key: str, expect: str, where: str, path: str = "") -> Any:
    """``obj[key]``, checked to be of JSON type ``expect``; ``path`` locates ``obj``."""
    name = f"{path}.{key}" if path else key
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: {path or 'value'} should be an object, found {json_type(obj)}")
    if key not in obj:
        raise UserError(f"{where}: missing key {name!r}")
    value = obj[key]
    if not _JSON_TYPES[expect](value):
        raise UserError(f"{where}: key {name!r} should be {expect}, found {json_type(value)}")
    return value


def string_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    """A JSON string or array of strings, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: key {name!r} should be a string or an array of strings")


def dedupe(values: Iterable[str]) -> tuple[str, ...]:
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
    quoting: Literal[0, 3] = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
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
            raise UserError(f"{where}: {mapping[key]!r} should be a string, found {json_type(value)}")
        return value

    first = text("input")
    second = text("input2") if "input2" in mapping else None
    inputs = first if second is None else (f"{mapping['input']}: {first} {mapping['input2']}: {second}")

    label: int | float | None = None
    answers: tuple[str, ...] = ()
    target = ""
    if kind == "generation":
        if "answers" in mapping:
            answers = string_list(record[mapping["answers"]], where, mapping["answers"])
        target = text("target") if "target" in mapping else (answers[0] if answers else "")
        answers = dedupe((target, *answers)) if target else answers
    else:
        assert parse_target is not None, "a classification or regression mapping has a label parser"
        label = parse_target(record[mapping["target"]], where)
        target = cast(Sequence[str], labels)[int(label)] if kind == "classification" else format(label, "g")

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
