"""Every Python code block of README.md and docs/*.md runs.

The blocks of a page run in order in one namespace (a later block may use an earlier one's
names), in a temporary directory, with tiny settings where the page gives them. A page may give
a block hidden setup that readers do not see (what the block takes as given, e.g. a tiny
``model`` and ``batch`` for a fragment)::

    <!-- test-setup
    model = ...
    -->

and a block that cannot run here says why, right before it::

    <!-- test: skip (needs a GPU) -->

A skip needs its reason; a page whose blocks all skip still fails if a block has none."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SETUP = re.compile(r"<!--\s*test-setup\n(.*?)-->", re.S)
SKIP = re.compile(r"<!--\s*test:\s*skip\s*\((.+?)\)\s*-->")


def blocks(page: Path) -> list[tuple[int, str, str | None, str]]:
    """(line, code, skip reason or None, hidden setup) of each Python block of ``page``."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        tail = before[max(before.rfind("```"), 0) :]  # between the previous fence and this block
        skip = SKIP.findall(tail)
        setup = "\n".join(SETUP.findall(tail))
        found.append((before.count("\n") + 1, match.group(1), skip[-1] if skip else None, setup))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAMLM_DOCS_TEST", "1")
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for line, code, skip, setup in blocks(page):
        if skip is not None:
            assert skip.strip(), f"{page.name}:{line}: a skipped block needs its reason"
            continue
        try:
            if setup:
                exec(compile(setup, f"{page.name}:{line} (setup)", "exec"), namespace)
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as exc:  # name the block
            raise AssertionError(f"{page.name}, the block at line {line}: {type(exc).__name__}: {exc}") from exc
        ran += 1
    capsys.readouterr()
    assert ran or all(b[2] for b in blocks(page))


def test_the_rules_hold_on_a_made_up_page(tmp_path):
    page = tmp_path / "x.md"
    page.write_text(
        "text\n<!-- test: skip (needs a GPU) -->\n```python\n1/0\n```\n"
        "<!-- test-setup\ny = 2\n-->\n```python\nx = y\n```\n"
    )
    (first, second) = blocks(page)
    assert first[2] == "needs a GPU" and second[2] is None and second[3].strip() == "y = 2"
    assert os.path.basename(str(page)) == "x.md"


def test_every_relative_link_of_the_readme_and_docs_resolves():
    """The README is a landing page of links: each points at a file that exists."""
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                missing.append(f"{page.name} -> {target}")
    assert not missing, missing


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (outside code fences), duplicates numbered."""
    found: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6} (.+)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in found:
            n += 1
            unique = f"{slug}-{n}"
        found.add(unique)
    return found


def test_every_anchor_link_of_the_readme_and_docs_names_a_heading():
    """A link into a section (``page.md#anchor`` or ``#anchor``) points at a heading that exists."""
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)#([^)\s]+)\)", page.read_text()):
            linked = (page.parent / target) if target else page
            if linked.exists() and anchor not in anchors(linked.read_text()):
                broken.append(f"{page.name} -> {target}#{anchor}")
    assert not broken, broken


def test_anchors_are_githubs():
    page_text = "# A `b` c: d\n```bash\n# not a heading\n```\n## What `--data` reads\n## Result\n## Result\n"
    assert anchors(page_text) == {"a-b-c-d", "what---data-reads", "result", "result-1"}
