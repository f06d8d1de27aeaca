"""`samlm bench`: every method measured side by side, ratios against AdamW, the JSON schema."""

import json

import pytest

from samlm.cli import main
from samlm.optim.registry import SAM_FAMILY

TINY = [
    "bench",
    "--layers",
    "1",
    "--width",
    "16",
    "--heads",
    "2",
    "--vocab",
    "32",
    "--batch",
    "8",
    "--context",
    "8",
    "--steps",
    "1",
    "--untimed-steps",
    "1",
]


def test_bench_reports_every_method_with_ratios_against_adamw(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"adamw", "peer_sam", "sam_full", *SAM_FAMILY}
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


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--methods", "sam,nope"], "unknown method(s) nope"),
        (["--width", "15"], "--width 15 must be divisible by --heads 2"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--ascent-fraction", "2"], "--ascent-fraction must be a finite number in (0.0, 1.0]"),
        (["--untimed-steps", "-1"], "--untimed-steps must be an integer >= 0"),
        (["--context", "0"], "--context must be a positive integer"),
        (["--rho", "-1"], "--rho must be a finite number >= 0"),
        (["--harness"], "--vocab must be 256, got 32"),
    ],
)
def test_bad_bench_flags_end_in_one_line(flags, message, capsys):
    assert main(TINY + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_floors_add_each_methods_extra_passes_to_the_adamw_step_of_the_same_round():
    """sam's floor is AdamW + the ascent pass, fsam's adds the clean forward, sam_full's and the
    peer's a full pass; ratios are per-round pairs, so a slow round moves both sides."""
    from samlm.studies.bench import ratios

    times = {
        "adamw": [1.0, 2.0, 1.0],
        "sam": [1.3, 2.6, 1.3],
        "fsam": [1.6, 3.2, 1.6],
        "sam_full": [2.1, 4.2, 2.1],
        "pass:ascent": [0.25, 0.5, 0.25],
        "pass:clean_forward": [0.25, 0.5, 0.25],
        "pass:full": [1.0, 2.0, 1.0],
    }
    rows = ratios(times, ["adamw", "sam", "fsam", "sam_full"])
    assert rows["adamw"] == {"step_s": 1.0, "ratio": 1.0, "ratio_iqr": [1.0, 1.0], "floor": 1.0, "over_floor": 1.0}
    assert (rows["sam"]["ratio"], rows["sam"]["floor"], rows["sam"]["over_floor"]) == (1.3, 1.25, 1.04)
    assert (rows["fsam"]["ratio"], rows["fsam"]["floor"]) == (1.6, 1.5)
    assert (rows["sam_full"]["ratio"], rows["sam_full"]["floor"]) == (2.1, 2.0)


def test_bench_reports_the_bare_passes_and_floors(tmp_path):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--no-memory", "--methods", "sam,fsam,sam_full", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["passes_s"]) == {"ascent", "clean_forward", "full"}
    methods = report["methods"]
    assert methods["adamw"]["floor"] == 1.0
    assert 1.0 < methods["sam"]["floor"] <= methods["fsam"]["floor"]
    assert all(row["over_floor"] > 0 for row in methods.values())


def test_methods_rho_and_extra_passes_come_from_the_registry(tmp_path):
    from samlm.optim.registry import SAM_FAMILY, method
    from samlm.studies import bench

    assert bench.bench_methods() == ("adamw", "peer_sam", "sam_full", *SAM_FAMILY)
    for name in SAM_FAMILY:
        assert bench.extra_passes(name) == method(name).extra_passes
    assert bench.extra_passes("adamw") == () and bench.extra_passes("peer_sam") == ("full",)
    out = tmp_path / "bench.json"
    assert main(TINY + ["--no-memory", "--methods", "sam,asam,peer_sam", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rhos = {name: row.get("rho") for name, row in report["methods"].items()}
    assert rhos == {"adamw": None, "sam": 0.05, "asam": 0.5, "peer_sam": 0.05}
    assert report["config"]["rho"] is None and report["config"]["context"] == 8
    assert main(TINY + ["--no-memory", "--methods", "asam", "--rho", "0.2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["methods"]["asam"]["rho"] == 0.2


def test_floors_with_sam_every_count_the_extra_passes_once_per_cycle():
    from samlm.studies.bench import ratios

    times = {
        "adamw": [1.0, 2.0],
        "sam": [1.1, 2.2],
        "peer_sam": [2.0, 4.0],
        "pass:ascent": [0.25, 0.5],
        "pass:full": [1.0, 2.0],
    }
    rows = ratios(times, ["adamw", "sam", "peer_sam"], {"adamw": 1, "sam": 5, "peer_sam": 1})
    assert (rows["sam"]["ratio"], rows["sam"]["floor"]) == (1.1, 1.05)
    assert rows["peer_sam"]["floor"] == 2.0  # the peer has no schedule


def test_bench_sam_every_times_whole_cycles(tmp_path, monkeypatch):
    from samlm.studies import bench

    optimizers = {}
    original = bench.make_stepper

    def recording(name, model, args):
        step = original(name, model, args)
        optimizers[name] = step.optimizer
        return step

    monkeypatch.setattr(bench, "make_stepper", recording)
    out = tmp_path / "bench.json"
    assert main(TINY + ["--no-memory", "--methods", "sam,fsam", "--sam-every", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["sam_every"] == 3
    for name in ("sam", "fsam"):  # 2 rounds (1 untimed, 1 timed) of 3 steps: one SAM step each
        assert optimizers[name].counters["sam_steps"] == 2 and optimizers[name].counters["plain_steps"] == 4
    assert optimizers["adamw"].state[next(iter(optimizers["adamw"].state))]["step"] == 6
    assert 1.0 < report["methods"]["sam"]["floor"]
    assert main(TINY + ["--sam-every", "0"]) == 2


def test_bench_harness_times_the_pretrain_loop_at_the_same_shape(tmp_path, monkeypatch):
    """--harness runs samlm pretrain for each registry method at the bench's shape and reports
    its median step over bench's; the pseudo-methods have no harness run; every step of the
    loop is timed once, the untimed ones and the last (evaluation, checkpoint) left out."""
    from samlm.studies import bench

    calls = []
    real = bench.time_harness

    def spy(args, name):
        times = real(args, name)
        calls.append((name, len(times)))
        return times

    monkeypatch.setattr(bench, "time_harness", spy)
    out = tmp_path / "bench.json"
    flags = [f for f in TINY if f not in ("--vocab", "32")] + [
        "--steps",
        "3",
        "--methods",
        "sam_full,fsam",
        "--harness",
        "--no-memory",
        "--json",
        str(out),
    ]
    assert main(flags) == 0
    methods = json.loads(out.read_text())["methods"]
    assert dict(calls) == {"adamw": 3, "sam_full": 0, "fsam": 3}
    assert methods["fsam"]["harness_step_s"] > 0 and methods["fsam"]["harness_over_bench"] > 0
    assert "harness_step_s" not in methods["sam_full"]
