"""Security guarantees, checked over the package's own source: nothing is unpickled,
remote code is never trusted by default."""

import ast
import inspect
import json
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
                f"{path.name}:{call.lineno}: torch.load without weights_only=True"
            )


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
            f"{path.name}:{node.lineno}: imports a pickle module"
        )


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_trust_remote_code_is_never_hard_wired_on(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), (
                f"{path.name}:{node.value.lineno}: trust_remote_code=True"
            )


def test_loaders_default_trust_remote_code_to_false():
    from samlm.data import load_tokenizer
    from samlm.models import load_causal_lm

    for loader in (load_tokenizer, load_causal_lm):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False


# --------------------------------------------------------------------------- bad files and paths


def _keyword_names_in_dicts(tree) -> set[str]:
    """Names assigned a dict literal that has a "trust_remote_code" key (``kwargs = {...}``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            keys = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            if "trust_remote_code" in keys:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_every_from_pretrained_says_whether_remote_code_is_trusted(path):
    """An explicit trust_remote_code (a flag that defaults to False) at every load, never the library default."""
    tree = ast.parse(path.read_text())
    with_flag = _keyword_names_in_dicts(tree)
    for call in calls(tree, "from_pretrained"):
        keywords = {k.arg for k in call.keywords}
        splats = {k.value.id for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)}
        assert "trust_remote_code" in keywords or splats & with_flag, (
            f"{path.name}:{call.lineno}: from_pretrained without an explicit trust_remote_code"
        )


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_unsafe_loading_is_never_switched_on(path):
    """No weights_only=False, use_safetensors=False, allow_pickle=True or pickle-based loaders."""
    tree = ast.parse(path.read_text())
    unsafe = {"weights_only": False, "use_safetensors": False, "allow_pickle": True}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in unsafe and isinstance(node.value, ast.Constant):
            assert node.value.value is not unsafe[node.arg], (
                f"{path.name}:{node.value.lineno}: {node.arg}={node.value.value}"
            )
    for name in ("loads", "Unpickler"):
        for call in calls(tree, name):
            owner = getattr(call.func, "value", None)
            assert getattr(owner, "id", "") not in {"pickle", "cPickle", "dill", "marshal"}, (
                f"{path.name}:{call.lineno}"
            )
    for call in calls(tree, "load"):
        owner = getattr(call.func, "value", None)
        assert getattr(owner, "id", "") not in {"pickle", "dill", "joblib", "marshal", "np", "numpy"} or any(
            k.arg == "allow_pickle" for k in call.keywords
        ), f"{path.name}:{call.lineno}: unsafe load"


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_in_a_model_directory_never_runs(tmp_path, capsys):
    import torch
    from transformers import GPT2Config

    from samlm import cli

    model_dir, marker = tmp_path / "evil-model", tmp_path / "pwned"
    model_dir.mkdir()
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32).save_pretrained(model_dir)
    torch.save({"transformer.wte.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    capsys.readouterr()  # transformers' own warnings while the test wrote the config
    code = cli.main(
        ["pretrain", "--model", str(model_dir), "--tokenizer", "bytes", "--steps", "1", "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("samlm: error: could not load model") and err.count("\n") == 1, err
    assert not marker.exists()


def test_a_malicious_pickle_in_a_checkpoint_never_runs_even_with_a_matching_manifest(tmp_path):
    import torch

    from samlm import io

    root, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    path = io.save_checkpoint(root, 1, {"w": torch.ones(2)}, {"step": 1})
    torch.save({"step": _Payload(marker)}, path / io.STATE_FILE)
    manifest = json.loads((path / io.MANIFEST_FILE).read_text())  # an attacker can fix the hashes too
    manifest["files"][io.STATE_FILE] = io._file_digest(path / io.STATE_FILE)
    (path / io.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(io.CheckpointError, match="state.pt cannot be read"):
        io.load_checkpoint(path)
    assert not marker.exists()


def test_remote_code_in_a_model_directory_is_not_run_unless_asked(tmp_path, capsys):
    from samlm import cli

    model_dir, marker = tmp_path / "custom-model", tmp_path / "pwned"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.Evil",
                },
            }
        )
    )
    (model_dir / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for argv in (
        ["pretrain", "--model", str(model_dir), "--tokenizer", "bytes", "--steps", "1"],
        ["finetune", "--model", str(model_dir), "--task", "glue/rte"],
    ):
        code = cli.main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("samlm: error: ") and err.count("\n") == 1, err
        assert "runs only with --trust-remote-code" in err
        assert not marker.exists()
