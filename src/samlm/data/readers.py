"""Reading text files, one way for corpora (:mod:`samlm.data.sources`) and benchmark files
(:mod:`samlm.data.formats`): the UTF-8 decoder whose error names the file, byte, line and column,
and the JSON-lines reader whose error names the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from samlm.errors import UserError

UTF8_BOM = b"\xef\xbb\xbf"
BLOCK_BYTES = 4 << 20  # a one-document file is read in newline-aligned blocks of this size


class InvalidUtf8(UserError):
    """Bytes of ``path`` that are not UTF-8: the first bad one, ``value``, at file offset ``byte``
    (``line`` and ``column`` 1-based)."""

    def __init__(self, path, byte: int, line: int, column: int, value: int):
        super().__init__(f"{path} is not valid UTF-8: byte {byte} (line {line}, column {column}) is {bytes([value])!r}")
        self.byte, self.line, self.column, self.value = byte, line, column, value


def read_bytes(path: Path) -> bytes:
    """A file's bytes; a missing file, a directory or a failed read is one line."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def decode_utf8(data: bytes, path, *, offset: int = 0, lines_before: int = 0) -> str:
    """The text of ``data``, the piece of file ``path`` that starts at byte ``offset`` after
    ``lines_before`` newlines (a byte-order mark that starts the file is dropped); invalid UTF-8
    raises :class:`InvalidUtf8`."""
    if offset == 0 and data.startswith(UTF8_BOM):
        data, offset = data[len(UTF8_BOM) :], len(UTF8_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lines_before + data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidUtf8(path, offset + exc.start, line, column, data[exc.start]) from None


def read_utf8(path: Path) -> str:
    """A whole UTF-8 file's text (see :func:`decode_utf8`)."""
    return decode_utf8(read_bytes(path), path)


def utf8_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """A UTF-8 file's text in newline-aligned blocks of about ``block_bytes`` (a file of any size;
    see :func:`decode_utf8`)."""
    lines_before, offset, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            buffer = carry + data
            if not buffer:
                return
            cut = buffer.rfind(b"\n") + 1 if data else len(buffer)
            if cut == 0:  # no newline in a whole block: cut before a partial UTF-8 character
                cut = len(buffer)
                while cut > len(buffer) - 4 and cut > 0 and (buffer[cut - 1] & 0xC0) == 0x80:
                    cut -= 1
                if cut > 0 and buffer[cut - 1] >= 0xC0:
                    cut -= 1
                cut = cut or len(buffer)
            block, carry = buffer[:cut], buffer[cut:]
            text = decode_utf8(block, path, offset=offset, lines_before=lines_before)
            lines_before += block.count(b"\n")
            offset += len(block)
            if text:
                yield text
            if not data:
                return


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(number, line)`` for each line of ``text``, 1-based, without its ``\\n`` or ``\\r\\n``."""
    # Split on "\n" only: str.splitlines() would also split on \x0b, \x1c, U+2028..., which
    # occur inside real sentences and would shift every later line number.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """:func:`numbered_lines` of a UTF-8 file, read one line at a time (a file of any size)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = decode_utf8(raw, path, offset=offset, lines_before=number - 1)
            offset += len(raw)
            yield number, line.removesuffix("\n").removesuffix("\r")


def jsonl_records(path: Path, lines: Iterable[tuple[int, str]] | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file, streamed from the file
    (or taken from its ``lines``, already read); a line that is not JSON is one error naming the
    file and line."""
    for number, line in utf8_lines(path) if lines is None else lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        yield number, value
