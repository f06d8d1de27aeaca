"""Every command's ``--help`` renders cleanly, and the docs' flag tables agree with it.

A flag table is a markdown table in docs/ whose header's first cell is ``flag`` or ``flags``:
every ``--flag`` a row names must be a flag of the table's command(s), and a default the row
shows as a number in parentheses (``(16)``, ``(1; must divide ...)``, ``(default 10)``) must be
the help's default of one of the row's flags; ``(required)`` must be a required flag.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samlm.cli import COMMANDS, main
from samlm.cli.study import STUDIES

DOCS = Path(__file__).resolve().parents[1] / "docs"

# Every command and study, as typed after ``samlm``.
COMMAND_LINES = [[], *([name] for name in COMMANDS), *(["study", study] for study in STUDIES)]

# The flag tables of each docs page, in order, and the command(s) whose flags each one lists.
FLAG_TABLES = {
    "pretraining.md": [("pretrain",), ("prepare",)],
    "data.md": [("finetune",)],
    "tracking.md": [("pretrain", "finetune")],
}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE]-?\d+)?")


def render_help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one option's help on as few lines as argparse allows
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def options(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help text (one line), from a rendered ``--help``."""
    found: dict[str, str] = {}
    current: list[str] = []
    text: list[str] = []

    def close() -> None:
        for flag in current:
            found[flag] = " ".join(text)

    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            close()
            invocation, _, rest = stripped.partition("  ")
            current = [part.split()[0] for part in invocation.split(", ")]
            text = [rest.strip()] if rest.strip() else []
        elif current and line.startswith("   ") and stripped:
            text.append(stripped)
        else:
            close()
            current, text = [], []
    close()
    return found


def help_default(help_line: str) -> str | None:
    match = re.search(r"\(default (.+)\)$", help_line)
    return match.group(1) if match else None


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda argv: " ".join(argv) or "samlm")
def test_every_help_renders_without_format_slips(argv, capsys, monkeypatch):
    text = render_help(argv, capsys, monkeypatch)
    assert text.startswith("usage: ")
    assert "%%" not in text, "a help string escaped % twice"
    assert "(default required)" not in text, "a required flag shows its absence as a default"
    assert "(default None)" not in text


def test_required_flags_say_so(capsys, monkeypatch):
    assert options(render_help(["prepare"], capsys, monkeypatch))["--out"].endswith("(required)")
    assert options(render_help(["finetune"], capsys, monkeypatch))["--out"].endswith("(required)")


def flag_tables(page: Path) -> list[list[str]]:
    """The rows of each flag table of a markdown page."""
    tables: list[list[str]] = []
    header_seen = False  # inside a table (its header read)
    for line in page.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header_seen = False
            continue
        if not header_seen:
            header_seen = True
            if line.strip("|").split("|")[0].strip() in ("flag", "flags"):
                tables.append([])
            else:
                tables.append(None)  # type: ignore[arg-type]  # another table: its rows are skipped
            continue
        if tables[-1] is not None and not set(line) <= set("|-: "):
            tables[-1].append(line)
    return [rows for rows in tables if rows is not None]


def shown_defaults(row: str) -> list[str]:
    """The defaults a row shows: ``(default X)`` and numbers in parentheses, ``(required)``."""
    shown = []
    for inside in re.findall(r"\(([^()]*)\)", row):
        value = inside.split(";")[0].strip().replace("`", "")
        if value.startswith("default "):
            value = value[len("default ") :].strip()
        elif not (NUMBER.fullmatch(value) or value == "required"):
            continue
        shown.append(value)
    return shown


def same_default(shown: str, default: str | None) -> bool:
    if default is None:
        return False
    if NUMBER.fullmatch(shown) and NUMBER.fullmatch(default):
        return float(shown) == float(default)
    return default == shown or bool(re.match(re.escape(shown) + r"\W", default))


@pytest.mark.parametrize("page", sorted(FLAG_TABLES))
def test_the_docs_flag_tables_agree_with_help(page, capsys, monkeypatch):
    tables = flag_tables(DOCS / page)
    assert len(tables) == len(FLAG_TABLES[page]), f"{page}: flag tables found {len(tables)}; update FLAG_TABLES"
    helps = {}
    for commands in FLAG_TABLES[page]:
        for command in commands:
            helps[command] = options(render_help([command], capsys, monkeypatch))
    problems = []
    for rows, commands in zip(tables, FLAG_TABLES[page]):
        for row in rows:
            flags = FLAG.findall(row)
            for command in commands:
                known = helps[command]
                problems += [f"{command} has no {flag}: {row}" for flag in flags if flag not in known]
                row_flags = [known[f] for f in flags if f in known]
                for shown in shown_defaults(row):
                    if shown == "required":
                        ok = any(text.endswith("(required)") for text in row_flags)
                    else:
                        ok = any(same_default(shown, help_default(text)) for text in row_flags)
                    if not ok:
                        problems.append(f"{command}: ({shown}) is no default of {', '.join(flags)} in --help: {row}")
    assert not problems, "\n".join(problems)


def test_the_table_reader_finds_flags_and_defaults():
    row = "| `--batch --grad-accum` | sequences per step (32), micro-batches (1; must divide `--batch`) |"
    assert FLAG.findall(row) == ["--batch", "--grad-accum", "--batch"]
    assert shown_defaults(row) == ["32", "1"]
    assert shown_defaults("| `--report-to` | trackers (default `none`), (streamed), (a, b) |") == ["none"]
    assert same_default("3e-3", "0.003") and same_default("bytes", "bytes; with --model, the model's")
    assert not same_default("100", "about 20 evaluations per run: steps / 20")
    help_text = (
        "options:\n  --m M, --m-sharpness M\n                        groups (default 1)\n  --out OUT  dir (required)\n"
    )
    assert options(help_text) == {
        "--m": "groups (default 1)",
        "--m-sharpness": "groups (default 1)",
        "--out": "dir (required)",
    }
