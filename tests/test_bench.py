"""`samlm bench`: every method measured side by side, ratios against AdamW, the JSON schema."""

import json

import pytest

from samlm.cli import main

TINY = ["bench", "--layers", "1", "--width", "16", "--heads", "2", "--vocab", "32", "--batch", "8",
        "--seq", "8", "--steps", "1", "--warmup", "1"]


def test_bench_reports_every_method_with_ratios_against_adamw(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"adamw", "peer_sam", "sam_full", "sam", "asam", "fsam", "psam", "pfsam"}
    assert report["methods"]["adamw"]["ratio"] == 1.0
    for row in report["methods"].values():
        assert row["step_s"] > 0 and row["ratio"] > 0
    assert report["config"]["layers"] == 1 and "machine" in report["config"]
    table = capsys.readouterr().out
    assert "x AdamW" in table and "pfsam" in table


def test_bench_measures_peak_memory_per_method(tmp_path):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--methods", "sam", "--json", str(out)]) == 0
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"adamw", "sam"}
    assert all(row["peak_mem_mb"] >= 0 for row in methods.values())


@pytest.mark.parametrize("flags,message", [
    (["--methods", "sam,nope"], "unknown method(s) nope"),
    (["--width", "15"], "--width 15 must be divisible by --heads 2"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--ascent-fraction", "2"], "--ascent-fraction must be in (0, 1]"),
])
def test_bad_bench_flags_end_in_one_line(flags, message, capsys):
    assert main(TINY + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
