"""samlm.io: atomic writes, JSON lines, checkpoints, RNG state."""

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from samlm import io
from samlm.errors import UserError


def files_in(directory):
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "out.json"
    io.atomic_write_json(target, {"a": 1, "nan": float("nan"), "t": torch.tensor(2.5)})
    io.atomic_write_json(target, {"a": 2, "nan": float("nan"), "t": torch.tensor(2.5)})
    assert json.loads(target.read_text()) == {"a": 2, "nan": "nan", "t": 2.5}
    assert files_in(target.parent) == ["out.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_mid_write_keeps_old_content(tmp_path, monkeypatch, failing):
    target = tmp_path / "out.txt"
    io.atomic_write_text(target, "old content")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="simulated crash"):
        io.atomic_write_text(target, "new content that never lands")
    monkeypatch.undo()
    assert target.read_text() == "old content"
    assert files_in(tmp_path) == ["out.txt"]


# --------------------------------------------------------------------------- JSON lines


def test_jsonl_append_and_read(tmp_path):
    path = tmp_path / "m.jsonl"
    assert io.read_jsonl(path) == []
    for step in range(3):
        io.append_jsonl(path, {"step": step, "loss": 1.0 / (step + 1)})
    assert [r["step"] for r in io.read_jsonl(path)] == [0, 1, 2]


def test_jsonl_torn_last_line_is_dropped_and_repaired(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    io.append_jsonl(path, {"step": 1})
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"step": 2, "lo')
    with caplog.at_level(logging.WARNING, logger="samlm"):
        assert io.read_jsonl(path) == [{"step": 1}]
    assert "torn" in caplog.text
    io.append_jsonl(path, {"step": 3})
    assert io.read_jsonl(path) == [{"step": 1}, {"step": 3}]
    assert path.read_text().count("\n") == 2


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2"):
        io.read_jsonl(path)


def test_write_jsonl_truncates(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in range(5):
        io.append_jsonl(path, {"step": step})
    io.write_jsonl(path, io.read_jsonl(path)[:2])
    assert io.read_jsonl(path) == [{"step": 0}, {"step": 1}]


# --------------------------------------------------------------------------- checkpoints


def tied_state(seed=0):
    torch.manual_seed(seed)
    embedding = torch.randn(10, 4)
    return {"wte.weight": embedding, "lm_head.weight": embedding, "bias": torch.randn(4), "step": torch.tensor(3)}


def extra_state():
    return {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "lr": 1e-3}, "names": ["a", "b"], "none": None}


def test_checkpoint_round_trip_keeps_tied_tensors(tmp_path):
    state = tied_state()
    path = io.save_checkpoint(tmp_path, 7, state, extra_state())
    assert path.name == "checkpoint-7"
    assert files_in(path) == ["manifest.json", "model.safetensors", "state.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and set(manifest["files"]) == {"model.safetensors", "state.pt"}

    loaded = io.load_latest_checkpoint(tmp_path)
    assert loaded.step == 7 and loaded.skipped == []
    assert set(loaded.model_state) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded.model_state[name], tensor)
    assert loaded.model_state["lm_head.weight"] is loaded.model_state["wte.weight"]  # stored once
    assert torch.equal(loaded.extra_state["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert loaded.extra_state["names"] == ["a", "b"]


def test_keep_last_k_and_no_temp_dirs(tmp_path):
    for step in (1, 2, 3, 4):
        io.save_checkpoint(tmp_path, step, tied_state(step), {}, keep=2)
    assert files_in(tmp_path) == ["checkpoint-3", "checkpoint-4"]
    assert io.load_latest_checkpoint(tmp_path).step == 4


def corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_manifest(checkpoint):
    (checkpoint / "manifest.json").unlink()  # what a crash before the final rename looks like


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: corrupt_byte(c / "model.safetensors"), "sha256 mismatch"),
        (lambda c: truncate(c / "state.pt"), "truncated"),
        (remove_manifest, "no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("{not json"), "unreadable"),
    ],
)
def test_bad_newest_checkpoint_falls_back_to_previous(tmp_path, caplog, damage, reason):
    io.save_checkpoint(tmp_path, 10, tied_state(1), {"which": "old"}, keep=3)
    newest = io.save_checkpoint(tmp_path, 20, tied_state(2), {"which": "new"}, keep=3)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="samlm"):
        loaded = io.load_latest_checkpoint(tmp_path)
    assert loaded.step == 10 and loaded.extra_state["which"] == "old"
    assert [p.name for p, _ in loaded.skipped] == ["checkpoint-20"]
    assert reason in loaded.skipped[0][1]
    assert "checkpoint-20" in caplog.text and reason in caplog.text


def test_no_good_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        io.load_latest_checkpoint(tmp_path)
    only = io.save_checkpoint(tmp_path, 5, tied_state(), {})
    corrupt_byte(only / "model.safetensors")
    with pytest.raises(UserError, match="checkpoint-5: model.safetensors is corrupted"):
        io.load_latest_checkpoint(tmp_path)


def test_crash_mid_save_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    io.save_checkpoint(tmp_path, 1, tied_state(), {})

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing state.pt")

    monkeypatch.setattr(io.torch, "save", crash)
    with pytest.raises(RuntimeError):
        io.save_checkpoint(tmp_path, 2, tied_state(), {})
    monkeypatch.undo()
    assert files_in(tmp_path) == ["checkpoint-1"]
    # A temp dir left by a hard kill is ignored by the loader and removed by the next save.
    (tmp_path / ".tmp-checkpoint-3-999").mkdir()
    assert io.load_latest_checkpoint(tmp_path).step == 1
    io.save_checkpoint(tmp_path, 4, tied_state(), {})
    assert files_in(tmp_path) == ["checkpoint-1", "checkpoint-4"]


def test_resaving_a_step_replaces_it(tmp_path):
    io.save_checkpoint(tmp_path, 3, tied_state(), {"v": 1})
    io.save_checkpoint(tmp_path, 3, tied_state(), {"v": 2})
    assert files_in(tmp_path) == ["checkpoint-3"]
    assert io.load_latest_checkpoint(tmp_path).extra_state["v"] == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_saved(tmp_path, bad):
    state = tied_state()
    state["bias"][1] = bad
    with pytest.raises(io.NonFiniteWeightsError, match="bias"):
        io.save_checkpoint(tmp_path, 1, state, {})
    assert isinstance(io.NonFiniteWeightsError("x"), UserError)
    assert files_in(tmp_path) == []


def test_unpicklable_extra_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"extra_state\['rng'\] is a RandomState"):
        io.save_checkpoint(tmp_path, 1, tied_state(), {"rng": np.random.RandomState(0)})
    assert files_in(tmp_path) == []


def test_state_file_is_loaded_weights_only(tmp_path, monkeypatch):
    path = io.save_checkpoint(tmp_path, 1, tied_state(), {})
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(io.torch, "load", spy)
    io.load_checkpoint(path)
    assert calls == [True]


# --------------------------------------------------------------------------- RNG


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    saved = io.capture_rng_state()
    expected = draw()
    path = io.save_checkpoint(tmp_path, 1, tied_state(), {"rng": saved})
    draw(), draw()
    io.restore_rng_state(io.load_checkpoint(path).extra_state["rng"])
    assert draw() == expected
