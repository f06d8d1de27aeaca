"""The package's form, read from the source so a new import or file that breaks it fails here
(docs/design.md, "Layers"):

- a module never imports from a layer above its own, not even lazily inside a function;
- no two modules import each other, directly or through others, counting imports inside functions;
- no module uses another module's private (underscore) name;
- no source file is over 700 lines."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

import samlm

ROOT = Path(samlm.__file__).parent
MAX_LINES = 700

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    ("optim",),  # the optimizer core (torch only)
    ("diagnostics",),  # sharpness, robustness measures (torch only)
    ("errors", "io", "progress"),  # plumbing
    ("data",),
    ("models",),
    ("integrations", "hf"),  # torch.distributed / accelerate, Hugging Face Trainer (samlm.hf: its alias)
    ("harness",),  # settings, run directory, loop, pretrain, finetune
    ("studies",),  # compare, finetune_compare, report, demo, bench
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ("samlm", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(path: Path, parsed: ast.Module | None = None) -> list[tuple[int, str]]:
    """(line, samlm module) for every import in the file, inside functions too, relative ones resolved.
    ``from samlm.x import y`` names the module ``samlm.x.y`` when y is a module, else ``samlm.x``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    found = []
    for node in ast.walk(parsed or tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "samlm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "samlm":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else source))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "samlm" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for _, target in imports(path) if target in known and target != name}
        for name, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert tops <= set(RANK), f"modules outside the layer table: {sorted(tops - set(RANK))}"


def test_imports_flow_one_way():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel == Path("__init__.py"):
            own = RANK["optim"]  # the package root re-exports the core only
        else:
            own = RANK[rel.parts[0].removesuffix(".py")]
        for line, module in imports(path):
            layer = layer_of(module)
            if layer is not None and layer in RANK and RANK[layer] > own:
                wrong.append(f"{rel}:{line} imports {module}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    graph = import_graph()
    lines = []
    for component in found:
        members = set(component)
        lines.append(" <-> ".join(component))
        lines += [f"    {a} imports {b}" for a in component for b in sorted(graph[a] & members)]
    assert not found, "import cycles:\n" + "\n".join(lines)


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import():
    graph = {"samlm.a": {"samlm.b"}, "samlm.b": {"samlm.c"}, "samlm.c": {"samlm.a"}, "samlm.d": {"samlm.a"}}
    assert cycles(graph) == [["samlm.a", "samlm.b", "samlm.c"]]
    lazy = ast.parse("def late():\n    from samlm.optim import sam\n")
    assert imports(ROOT / "data" / "probe.py", lazy) == [(2, "samlm.optim.sam")]


def private_uses(path: Path, parsed: ast.Module | None = None) -> list[str]:
    """Underscore names this module takes from another samlm module: imported by name, or read as an
    attribute of an imported samlm module."""
    parsed = parsed or tree(path)
    known = modules()
    targets_at: dict[int, list[str]] = {}
    for line, target in imports(path, parsed):
        targets_at.setdefault(line, []).append(target)
    aliases: set[str] = set()  # local names bound to samlm modules
    found = []
    for node in ast.walk(parsed):
        if isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names if alias.asname and alias.name.startswith("samlm.")}
        elif isinstance(node, ast.ImportFrom) and node.lineno in targets_at:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.lineno}: imports {alias.name}")
                elif any(t.endswith(f".{alias.name}") and t in known for t in targets_at[node.lineno]):
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(parsed):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    wrong = [f"{path.relative_to(ROOT)}:{use}" for path in modules().values() for use in private_uses(path)]
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_no_source_file_is_over_the_line_limit():
    sizes = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in modules().values()}
    over = [f"{rel}: {n} lines" for rel, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not over, f"files over {MAX_LINES} lines:\n" + "\n".join(over)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from samlm.studies.report import _colors\n", ["1: imports _colors"]),
        ("from samlm.studies import report\nreport._colors()\n", ["2: uses report._colors"]),
        ("import samlm.studies.report as report\nreport._colors()\n", ["2: uses report._colors"]),
        ("from . import report\nreport._colors()\n", ["2: uses report._colors"]),
        ("from samlm.studies.report import colors\nself._x = 1\n", []),
    ],
)
def test_the_private_name_check_sees_imports_and_attributes(source, expected):
    probe = ROOT / "studies" / "probe.py"  # never written: the check reads the parsed source given
    assert private_uses(probe, ast.parse(source)) == expected


def test_the_core_and_diagnostics_import_nothing_outside_torch_and_the_core():
    allowed = {"torch", "numpy", "samlm", "__future__"}
    # build_base_optimizer("adafactor") imports Hugging Face's Adafactor when asked for by name.
    asked_for = {("optim/__init__.py", "transformers.optimization")}
    stdlib_like = set(sys.stdlib_module_names)
    wrong = []
    for folder in ("optim", "diagnostics"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if (str(path.relative_to(ROOT)), name) in asked_for:
                        continue
                    if top not in allowed and top not in stdlib_like:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
                    if top == "samlm" and layer_of(name) not in ("optim", "diagnostics", None):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)
