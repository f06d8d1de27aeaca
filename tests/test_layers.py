"""The package's layers import one way (docs/design.md): a module never imports from a layer
above its own, not even lazily inside a function. Read from the source, so a new import that
breaks the order fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import samlm

ROOT = Path(samlm.__file__).parent

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    ("optim",),  # the optimizer core (torch only)
    ("diagnostics",),  # sharpness (torch only)
    ("errors", "io", "progress"),  # plumbing
    ("data",),
    ("models",),
    ("integrations", "hf"),  # torch.distributed / accelerate, Hugging Face Trainer (samlm.hf: its alias)
    ("harness",),  # settings, run directory, loop, pretrain, finetune
    ("studies",),  # compare, finetune_compare, report, demo, bench
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "samlm" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported samlm module) for every import in the file, relative ones resolved."""
    package = ".".join(("samlm", *path.relative_to(ROOT).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("samlm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "samlm":  # from samlm import io, errors
                found += [(node.lineno, f"samlm.{alias.name}") for alias in node.names]
            elif module.startswith("samlm."):
                found.append((node.lineno, module))
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
        for line, module in _imports(path):
            layer = _layer_of(module)
            if layer is not None and layer in RANK and RANK[layer] > own:
                wrong.append(f"{rel}:{line} imports {module}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_core_and_diagnostics_import_nothing_outside_torch_and_the_core():
    allowed = {"torch", "numpy", "samlm", "__future__"}
    # build_base_optimizer("adafactor") imports Hugging Face's Adafactor when asked for by name.
    # The quantization measure imports torchao's affine primitives when it runs (the harness extra).
    asked_for = {
        ("optim/__init__.py", "transformers.optimization"),
        ("diagnostics/robustness.py", "torchao.quantization.quant_primitives"),
    }
    stdlib_like = set(__import__("sys").stdlib_module_names)
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
                    if top == "samlm" and _layer_of(name) not in ("optim", "diagnostics", None):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)
