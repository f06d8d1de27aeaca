"""Security guarantees, checked over the package's own source: nothing is unpickled,
remote code is never trusted by default."""

import ast
import inspect
import pathlib

import pytest

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src" / "samlm"
FILES = sorted(SOURCE.rglob("*.py"))


def calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            dotted = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if dotted == name:
                yield node


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_torch_load_is_always_weights_only(path):
    tree = ast.parse(path.read_text())
    for call in calls(tree, "load"):
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch":
            flags = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in flags and getattr(flags["weights_only"], "value", None) is True, (
                f"{path.name}:{call.lineno}: torch.load without weights_only=True")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_pickle_module_is_used(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not any(n.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib"} for n in names), (
            f"{path.name}:{node.lineno}: imports a pickle module")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_trust_remote_code_is_never_hard_wired_on(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), (
                f"{path.name}:{node.value.lineno}: trust_remote_code=True")


def test_loaders_default_trust_remote_code_to_false():
    from samlm.data.text import load_tokenizer
    from samlm.models import load_causal_lm

    for loader in (load_tokenizer, load_causal_lm):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False
