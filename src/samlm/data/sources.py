"""Corpora: a ``--data`` spec, parsed once, and the stream of documents it names.

A spec is a built-in corpus (``tinyshakespeare``, ``python-stdlib``), a UTF-8 text file (one
document, read in newline-aligned blocks), a ``.jsonl`` file (one document per line, its
``"text"`` field), a directory of ``*.txt`` files (one document per file, sorted by path), or a
Hugging Face dataset ``[hf:]NAME[:CONFIG][:SPLIT]`` (its ``text`` column, streamed). Everything
that reads a corpus (``samlm prepare``, the cache, :func:`load_corpus`) reads it through
:func:`open_source`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samlm.data.readers import jsonl_records, read_utf8, utf8_blocks
from samlm.errors import UserError, first_line

# Built-in corpora (shipped in samlm/resources; provenance in docs/pretraining.md):
# Tiny Shakespeare (public domain), and a second domain for forgetting studies: 48 modules of
# CPython 3.11.7's standard library source, one document per module (PSF license, beside it).
BUILTIN_CORPORA = {"tinyshakespeare": "tinyshakespeare.txt", "python-stdlib": "python_stdlib.jsonl"}
DEFAULT_CORPUS = "tinyshakespeare"
DOCUMENT_SEPARATOR = "\n\n"  # between the documents of a corpus read as one text, and of a split's tokens
JSONL_TEXT_FIELD = "text"
# Hub datasets too large to download whole: load_corpus streams them and cuts them at max_chars.
STREAMING_DATASETS = {"c4", "allenai/c4", "HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu", "openwebtext"}
DEFAULT_STREAMING_MAX_CHARS = 50_000_000
PATH_SUFFIXES = {".txt", ".text", ".md", ".raw", ".jsonl", ".json", ".csv", ".tsv", ".gz"}


def looks_like_path(spec: str) -> bool:
    """Whether a spec that names no existing file is meant as a path (so: "not found", not a hub id)."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or Path(spec).suffix.lower() in PATH_SUFFIXES
        or (os.sep in spec and Path(spec.split(os.sep)[0]).exists())
    )


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``"NAME[:CONFIG][:SPLIT]"`` -> (name, config or None, split defaulting to "train")."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"dataset spec '{spec}' is not NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


@dataclass
class Source:
    """A corpus as a stream of documents (see :func:`open_source`)."""

    spec: str
    kind: str  # builtin | text-file | jsonl-file | directory | hub
    single_document: bool  # one document, read in pieces: split by the tail rule
    identity: dict  # what the cache key and a resume compare
    has_validation_split: bool | None = False  # None: a hub dataset not asked yet (resolve_splits)
    max_chars: int | None = None
    hub: tuple | None = None  # (name, config, split) of a hub dataset
    path: Path | None = None  # a local file or directory
    resource: Any = None  # a built-in corpus
    streaming: bool = True  # a hub dataset is streamed, not downloaded whole

    def hub_dataset(self) -> tuple:
        """(name, config, split) of a hub source."""
        assert self.hub is not None, f"{self.spec} is not a hub dataset"
        return self.hub

    def local_path(self) -> Path:
        """The file or directory of a local source."""
        assert self.path is not None, f"{self.spec} is not a local file or directory"
        return self.path

    def resolve_splits(self) -> None:
        """For a hub dataset whose split was not named: does it have a ``validation`` split?"""
        if self.has_validation_split is None:
            name, config, _ = self.hub_dataset()
            self.has_validation_split = "validation" in hub_split_names(self.spec, name, config)

    def documents(self, split: str = "train") -> Iterator[str]:
        """The documents of the source (of its own ``split`` for a hub dataset with one), in order,
        cut at ``max_chars`` characters in all; empty documents are skipped."""
        stream = self._stream(split)
        if self.max_chars is None:
            yield from stream
            return
        left = self.max_chars
        for document in stream:
            if left <= 0:
                return
            yield document[:left]
            left -= len(document)

    def _stream(self, split: str) -> Iterator[str]:
        if self.kind == "builtin":
            with importlib.resources.as_file(self.resource) as path:
                read = jsonl_documents if path.suffix == ".jsonl" else utf8_blocks
                yield from read(path)
        elif self.kind == "text-file":
            yield from utf8_blocks(self.local_path())
        elif self.kind == "jsonl-file":
            yield from jsonl_documents(self.local_path())
        elif self.kind == "directory":
            for path in directory_files(self.local_path()):
                text = read_utf8(path)
                if text:
                    yield text
        else:
            name, config, own_split = self.hub_dataset()
            split = own_split if split == "train" else "validation"
            yield from hub_documents(self.spec, name, config, split, streaming=self.streaming)


def open_source(spec: str | os.PathLike, *, max_chars: int | None = None) -> Source:
    """The documents of a ``--data`` spec: a built-in corpus, a text file (one document), a
    ``.jsonl`` file (one document per line), a directory of ``.txt`` files (one document per
    file), or a Hugging Face dataset ``[hf:]NAME[:CONFIG][:SPLIT]`` (streamed; its ``validation``
    split is used for validation when it has one and no split is named)."""
    spec = os.fspath(spec)
    if spec in BUILTIN_CORPORA:
        resource = importlib.resources.files("samlm.resources").joinpath(BUILTIN_CORPORA[spec])
        digest = hashlib.sha256(resource.read_bytes()).hexdigest()
        identity = {"builtin": spec, "sha256": digest, "max_chars": max_chars}
        single = not resource.name.endswith(".jsonl")
        return Source(spec, "builtin", single, identity, max_chars=max_chars, resource=resource)
    if not spec.startswith("hf:"):
        path = Path(spec).expanduser()
        if path.is_file():
            stat = path.stat()
            identity = {
                "path": str(path.resolve()),
                "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "max_chars": max_chars,
            }
            jsonl = path.suffix.lower() == ".jsonl"
            kind = "jsonl-file" if jsonl else "text-file"
            return Source(spec, kind, not jsonl, identity, max_chars=max_chars, path=path)
        if path.is_dir():
            listing = [
                (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in directory_files(path)
            ]
            files = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
            identity = {"path": str(path.resolve()), "files": files, "max_chars": max_chars}
            return Source(spec, "directory", False, identity, max_chars=max_chars, path=path)
        if looks_like_path(spec):
            raise UserError(f"corpus file {spec} not found")
    hub = spec.removeprefix("hf:")
    name, config, split = parse_hub_spec(hub)
    split_named = len(hub.split(":")) > 2 and bool(hub.split(":")[2])
    identity = {"hub": name, "config": config, "split": split, "max_chars": max_chars}
    # Whether it has a validation split is asked of the hub only when preparing (resolve_splits):
    # a cached entry is found offline.
    return Source(
        spec,
        "hub",
        False,
        identity,
        has_validation_split=False if split_named else None,
        max_chars=max_chars,
        hub=(name, config, split),
    )


def load_corpus(
    spec: str | os.PathLike = DEFAULT_CORPUS,
    *,
    max_chars: int | None = None,
    streaming: bool | None = None,
) -> str:
    """The text of a corpus (:func:`open_source`), its documents joined with a blank line.

    ``max_chars`` truncates any corpus. A hub dataset is downloaded whole, except the very large
    corpora in ``STREAMING_DATASETS`` (C4, FineWeb, ...), which are streamed (``streaming``
    overrides) and cut at ``max_chars`` (default 50M characters). Raises ``UserError`` for a
    missing file, invalid UTF-8 (naming the file, byte offset and line), a ``.jsonl`` line that is
    not JSON or has no ``"text"`` string (naming the file and line), an empty corpus, or a dataset
    that fails to load.
    """
    source = open_source(spec, max_chars=max_chars)
    if source.kind == "hub":
        source.streaming = source.hub_dataset()[0] in STREAMING_DATASETS if streaming is None else streaming
        if source.streaming and max_chars is None:
            source.max_chars = max_chars = DEFAULT_STREAMING_MAX_CHARS
    text = ("" if source.single_document else DOCUMENT_SEPARATOR).join(source.documents())
    if max_chars is not None:  # the separators count too
        text = text[:max_chars]
    if not text.strip():
        origin = source.path or f"'{source.spec}'"
        raise UserError(f"corpus {origin} is empty")
    return text


def directory_files(directory: Path) -> list[Path]:
    """The ``*.txt`` files under ``directory``, sorted by path: its documents."""
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"corpus directory {directory} has no .txt files and is not a prepared dataset (no meta.json)")
    return files


def jsonl_documents(path: Path) -> Iterator[str]:
    """The non-empty ``"text"`` fields of a JSON-lines file, read line by line (a file of any
    size); a bad line is a ``UserError`` naming the file and line."""
    for number, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise UserError(
                f"{path}:{number}: expected a JSON object with a '{JSONL_TEXT_FIELD}' field, "
                f"found {type(record).__name__}"
            )
        if JSONL_TEXT_FIELD not in record:
            fields = ", ".join(map(str, list(record)[:8])) or "none"
            raise UserError(f"{path}:{number}: no '{JSONL_TEXT_FIELD}' field (fields: {fields})")
        text = record[JSONL_TEXT_FIELD]
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: '{JSONL_TEXT_FIELD}' should be a string, found {type(text).__name__}")
        if text:
            yield text


def hub_documents(spec: str, name: str, config: str | None, split: str, *, streaming: bool) -> Iterator[str]:
    """The non-empty documents of a Hugging Face dataset's split (its ``text`` column, or its only
    one); a failed load, a missing column or a stream lost part way is a one-line ``UserError``."""
    import datasets  # slow import: only when a hub dataset is asked for

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # network, unknown name, bad config: one clear line
        raise UserError(
            f"corpus '{spec}' is not a local file or directory, and loading its split '{split}' as a "
            f"Hugging Face dataset failed: {first_line(exc)}"
        ) from None
    column = _text_column(dataset, spec)
    try:
        for example in dataset:
            document = example[column]
            if document:
                yield document
    except UserError:
        raise
    except Exception as exc:  # a stream lost in the middle: prepare resumes from its last chunk
        raise UserError(
            f"corpus '{spec}': the stream of split '{split}' failed part way: {first_line(exc)}; "
            "rerun the same command to resume from the last complete chunk"
        ) from None


def _text_column(dataset, spec: str) -> str:
    names = list(getattr(dataset, "column_names", None) or [])
    if not names:  # some streaming datasets do not know their columns up front
        first = next(iter(dataset), None)
        names = list(first) if isinstance(first, Mapping) else []
    if "text" in names:
        return "text"
    if len(names) == 1:
        return names[0]
    raise UserError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(names) or 'none'})")


def hub_split_names(spec: str, name: str, config: str | None) -> list[str]:
    """The split names of a Hugging Face dataset; a failure is one line."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as exc:
        raise UserError(
            f"corpus '{spec}' is not a local file, directory or prepared dataset, and reading it as a "
            f"Hugging Face dataset failed: {first_line(exc)}"
        ) from None
