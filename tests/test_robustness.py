"""Robustness measures: weight noise, RTN quantization, forgetting.

What is pinned down: σ = 0 and on-grid weights leave the loss bitwise unchanged; RTN equals a plain
round-to-nearest reference (and GPT-2's transposed Conv1D is quantized per *output* channel);
every measure restores the model bitwise (also when the loss raises); the frontier and its
interpolation; the forgetting runs resume after an interruption and give the same numbers;
``pretrain --robustness`` writes the three summary keys; each bad input is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from torch import nn

from samlm import cli
from samlm.diagnostics import robustness as R
from samlm.models import build_decoder
from tinymodels import save_t5

TINY = [
    "--layers",
    "2",
    "--width",
    "32",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch",
    "4",
    "--max-chars",
    "20000",
    "--val-batches",
    "2",
    "--no-sharpness",
    "--no-progress",
    "--steps",
    "6",
    "--eval-every",
    "0",
]
FORGET = {"forget_steps": 4, "forget_lrs": "1e-3,1e-2", "noise_draws": 2, "noise_sigmas": "0,0.05"}


def run_cli(argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def tiny_model(width: int = 32):
    return build_decoder("gpt2", layers=2, width=width, heads=2, context=16, vocab_size=64, seed=0)


def tiny_eval():
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))

    def evaluate(model):
        logits = model(input_ids=tokens[:, :-1]).logits
        return float(nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)))

    return evaluate


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def reference_rtn(matrix: torch.Tensor, q_min: int, q_max: int, group: int) -> torch.Tensor:
    """Plain round-to-nearest: per block of ``group`` consecutive weights of a row, the smallest
    scale that clips nothing, s = max(max(w+)/q_max, min(w-)/q_min)."""
    rows, cols = matrix.shape
    blocks = matrix.reshape(rows, cols // group, group)
    pos = blocks.clamp(min=0).amax(-1, keepdim=True)
    neg = blocks.clamp(max=0).amin(-1, keepdim=True)
    scale = torch.maximum(pos / q_max, neg / q_min).clamp(min=torch.finfo(torch.float32).smallest_normal)
    return (torch.clamp(torch.round(blocks * (1.0 / scale)), q_min, q_max) * scale).reshape(rows, cols)


# --------------------------------------------------------------------------- weight noise


def test_sigma_zero_leaves_the_loss_bitwise_unchanged_and_noise_grows_with_sigma():
    model, evaluate = tiny_model(), tiny_eval()
    before = state(model)
    result = R.weight_noise(model, evaluate, sigmas=[0.0, 0.05, 0.5], draws=3, seed=0)
    assert result["losses"][0] == [result["base_loss"]] * 3 and result["delta_mean"][0] == 0.0
    assert result["delta_mean"][2] > result["delta_mean"][1] > 0 and result["delta_std"][2] > 0
    assert_bitwise(model, before)
    again = R.weight_noise(model, evaluate, sigmas=[0.0, 0.05, 0.5], draws=3, seed=0)
    assert again["losses"] == result["losses"]  # seeded draws


def test_noise_is_relative_to_each_tensors_rms():
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    seen = {}

    def evaluate(m):
        seen["w"] = m[0].weight.detach().clone()
        return 0.0

    R.weight_noise(model, evaluate, sigmas=[0.1], draws=1)
    noise = seen["w"] - 3.0
    assert abs(float(noise.std()) - 0.3) < 0.01 and abs(float(noise.mean())) < 0.01
    assert torch.equal(model[0].weight, torch.full((256, 256), 3.0))


def test_negative_sigma_is_refused():
    with pytest.raises(ValueError, match="sigma"):
        R.weight_noise(tiny_model(), tiny_eval(), sigmas=[0.1, -0.01])


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("fmt,group", [("int8", 64), ("int4", 32), ("int4", 8)])
def test_rtn_matches_a_plain_reference(fmt, group):
    matrix = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    matrix[2] = 0.0  # an all-zero row: scale clamped, stays zero
    q_min, q_max = R.QUANT_FORMATS[fmt]
    got = R.rtn(matrix, fmt, group_size=group)
    want = reference_rtn(matrix, q_min, q_max, 64 if fmt == "int8" else group)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[2], torch.zeros(64))
    levels = (got.reshape(6, -1, 64 if fmt == "int8" else group)).unique(dim=None).numel()
    assert levels <= 6 * (64 // (64 if fmt == "int8" else group)) * (q_max - q_min + 1)


def _pinned_input() -> torch.Tensor:
    """6 x 64 values from integer arithmetic and one correctly rounded division: the same bits on
    every machine, no random generator involved. Row 2 is all zero."""
    i = torch.arange(6 * 64)
    matrix = ((i * 7919 % 1000 - 500).float() / 997.0).reshape(6, 64)
    matrix[2] = 0.0
    return matrix


# sha256 of the float32 bytes of rtn(_pinned_input()), and the first four values of row 0. Recorded
# with torchao 0.18.0's affine primitives (SYMMETRIC_NO_CLIPPING_ERR), which rtn reproduces bitwise.
PINNED = {
    ("int8", 64): (
        "5622cba4fedd3025c8be090c6fa18e19cb3fd41e94e32a718b167d5b05ded6d6",
        [-0.5015045404434204, 0.41922643780708313, 0.340866357088089, 0.2585882842540741],
    ),
    ("int4", 32): (
        "b4912b1c4c9149996bef016edd50b31a88db8d232021c4f7e5084c740bbd8c43",
        [-0.4764293134212494, 0.40836799144744873, 0.3403066396713257, 0.272245317697525],
    ),
    ("int4", 8): (
        "110179e8546ad503c502bd5bf87e0486286d79a21682c66fc5b82ad11ec5680d",
        [-0.5015045404434204, 0.43881648778915405, 0.31344032287597656, 0.2507522702217102],
    ),
}


@pytest.mark.parametrize("fmt,group", sorted(PINNED))
def test_rtn_values_are_pinned_bitwise(fmt, group):
    digest, head = PINNED[fmt, group]
    got = R.rtn(_pinned_input(), fmt, group_size=group)
    assert got.dtype == torch.float32 and got[0, :4].tolist() == head
    assert hashlib.sha256(got.contiguous().numpy().tobytes()).hexdigest() == digest
    assert not torch.signbit(got[2]).any()  # zeros are +0.0, as an integer grid has no -0


def test_rtn_keeps_the_weights_dtype_and_shape():
    matrix = _pinned_input()
    for dtype in (torch.bfloat16, torch.float16):
        got = R.rtn(matrix.to(dtype), "int4", group_size=8)
        assert got.dtype == dtype and torch.equal(got, R.rtn(matrix.to(dtype).float(), "int4", group_size=8).to(dtype))
    assert R.rtn(matrix[0], "int8").shape == (64,) and torch.equal(R.rtn(matrix[0], "int8"), R.rtn(matrix, "int8")[0])
    with pytest.raises(ValueError, match="unknown quantization format"):
        R.rtn(matrix, "int3")


def test_conv1d_is_quantized_per_output_channel():
    """GPT-2 stores its linear weights (in, out): a per-output-channel scale is per *column*."""
    model = tiny_model()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight (32, 128)
    linear_view = conv.weight.detach().t().clone()  # (out, in)
    R.quantize_weights(model, "int4", group_size=8)
    assert torch.equal(conv.weight.detach(), R.rtn(linear_view, "int4", group_size=8).t())


def _on_grid(model, fmt, group, scale=2.0**-6):
    q_min, q_max = R.QUANT_FORMATS[fmt]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, weight, transposed in R.quantizable_weights(model):
            matrix = weight.t() if transposed else weight
            q = torch.randint(q_min, q_max + 1, matrix.shape, generator=generator).float()
            block = matrix.shape[1] if fmt == "int8" else group
            q.view(matrix.shape[0], -1, block)[..., 0] = q_max  # each block reaches q_max: its scale is `scale`
            matrix.copy_(q * scale)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_weights_on_the_grid_are_left_bitwise_unchanged(fmt):
    model, evaluate = tiny_model(), tiny_eval()
    _on_grid(model, fmt, 32)
    before = state(model)
    R.quantize_weights(model, fmt, group_size=32)
    assert_bitwise(model, before)
    result = R.quantization(model, evaluate, formats=(fmt,), group_size=32)
    assert result[fmt]["loss"] == result["base_loss"] and result[fmt]["delta"] == 0.0


def test_quantization_leaves_embeddings_and_norms_unless_asked():
    model = tiny_model()
    names = [name for name, _, _ in R.quantizable_weights(model)]
    assert names and all(".attn." in n or ".mlp." in n for n in names)  # the 8 linear layers
    wte = model.transformer.wte.weight.detach().clone()
    ln = model.transformer.ln_f.weight.detach().clone()
    R.quantize_weights(model, "int4", group_size=8)
    assert torch.equal(model.transformer.wte.weight, wte) and torch.equal(model.transformer.ln_f.weight, ln)
    both = [n for n, _, _ in R.quantizable_weights(model, embeddings=True, norms=True)]
    assert "transformer.wte" in both and "transformer.ln_f" in both and "lm_head" not in both  # tied: once


def test_quantization_restores_the_model_and_int4_costs_more_than_int8():
    model, evaluate = tiny_model(), tiny_eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # larger weights: a visible quantization error
    before = state(model)
    result = R.quantization(model, evaluate, group_size=32)
    assert_bitwise(model, before)
    assert abs(result["int4"]["delta"]) > abs(result["int8"]["delta"]) > 0


def test_a_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(
        ValueError,
        match=r"group size 24 does not divide the input width 32 of layer "
        r"'transformer\.h\.0\.attn\.c_attn'",
    ):
        R.quantization(tiny_model(), tiny_eval(), group_size=24)


def test_every_measure_restores_the_model_even_when_the_loss_raises():
    model = tiny_model()
    model.train()
    before = state(model)
    calls = {"n": 0}

    def failing(m):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return 1.0

    for measure in (
        lambda: R.weight_noise(model, failing, sigmas=[0.5]),
        lambda: R.quantization(model, failing, group_size=8),
    ):
        calls["n"] = 0
        with pytest.raises(RuntimeError):
            measure()
        assert_bitwise(model, before)
        assert model.training


# --------------------------------------------------------------------------- the frontier


def test_frontier_and_interpolation():
    points = [
        {"lr": 1, "learning": 2.0, "original": 1.6},
        {"lr": 2, "learning": 1.5, "original": 1.9},
        {"lr": 3, "learning": 1.7, "original": 2.2},
    ]  # lr 3 learned less and forgot more than lr 2: dropped
    result = R.forgetting_summary(points, before_learning=3.0, before_original=1.5, target=2.5)
    assert result["frontier"] == [[1.5, pytest.approx(0.4)], [2.0, pytest.approx(0.1)], [3.0, 0.0]]
    assert result["increase"] == pytest.approx(0.05)  # halfway between 0.1 and 0
    assert [p["increase"] for p in result["points"]] == pytest.approx([0.1, 0.4, 0.7])
    at_dropped = R.forgetting_summary(points, before_learning=3.0, before_original=1.5, target=1.7)
    assert at_dropped["increase"] == pytest.approx(0.4 - 0.3 * 0.2 / 0.5)  # on the frontier, not lr 3's 0.7
    default = R.forgetting_summary(points, before_learning=3.0, before_original=1.5)
    assert default["target"] == 1.5 and default["increase"] == pytest.approx(0.4)
    assert R.interpolate([[1.5, 0.4], [3.0, 0.0]], 1.4) is None  # no extrapolation below the left end
    # both losses falling together (a model still learning): the start is dominated; a level every
    # point learned past reads the least forgetting that reached it
    falling = R.forgetting_summary(
        [{"lr": 1, "learning": 2.0, "original": 1.4}, {"lr": 2, "learning": 1.0, "original": 1.2}],
        before_learning=3.0,
        before_original=1.5,
        target=1.5,
    )
    assert falling["frontier"] == [[1.0, pytest.approx(-0.3)]] and falling["increase"] == pytest.approx(-0.3)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness") / "run"
    assert run_cli(["pretrain", *TINY, "--out", out, "--save-every", "3", "--keep-checkpoints", "5"]) == 0
    return out


def test_all_checkpoints_measures_each_kept_checkpoint_oldest_first(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    assert (
        run_cli(
            [
                "robustness",
                "--run",
                run,
                "--all-checkpoints",
                "--forget-steps",
                "0",
                "--noise-draws",
                "1",
                "--json",
                tmp_path / "all.json",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "all.json").read_text())
    assert [c["step"] for c in result["checkpoints"]] == [3, 6] and result["step"] == 6
    assert result["forgetting"] is None and not (run / "robustness").exists()
    assert (
        result["checkpoints"][0]["weight_noise"]["base_loss"] != result["checkpoints"][1]["weight_noise"]["base_loss"]
    )
    assert "step 3:" in capsys.readouterr().out


def _measure(run, **overrides):
    from samlm.harness.pretrain.robustness import measure_run

    return measure_run(run, overrides={**FORGET, **overrides})


def test_forgetting_resumes_after_an_interruption_with_the_same_numbers(trained, tmp_path):
    from samlm.harness.pretrain.robustness import measure_run

    straight = tmp_path / "straight"
    stopped = tmp_path / "stopped"
    shutil.copytree(trained, straight)
    shutil.copytree(trained, stopped)
    before = (straight / "checkpoints").stat().st_mtime_ns
    want = _measure(straight)
    calls = {"n": 0}

    def interrupt(step, stats):  # the second fine-tuning run, after its 2nd step
        calls["n"] += 1
        if calls["n"] == FORGET["forget_steps"] + 2:
            os.kill(os.getpid(), signal.SIGINT)

    partial = measure_run(stopped, overrides=FORGET, on_step=interrupt)
    assert partial["forgetting"]["interrupted"] == "SIGINT"
    summary = json.loads((stopped / "robustness/step6/forget-lr0.01/summary.json").read_text())
    assert summary["step"] == 2 and not summary["completed"]
    got = _measure(stopped)
    assert got["forgetting"]["points"] == want["forgetting"]["points"]
    assert got["forgetting"]["increase"] == want["forgetting"]["increase"]
    assert [p["lr"] for p in got["forgetting"]["points"]] == [1e-3, 1e-2]
    assert got["weight_noise"]["losses"] == want["weight_noise"]["losses"]
    assert got["quantization"]["int4"] == want["quantization"]["int4"]
    assert (straight / "checkpoints").stat().st_mtime_ns == before  # the run's own checkpoints untouched
    # other fine-tuning settings start those runs over (no "cannot resume" error)
    shorter = _measure(stopped, forget_steps=2)
    assert shorter["forgetting"]["steps"] == 2 and shorter["forgetting"]["points"] != got["forgetting"]["points"]


def test_pretrain_robustness_writes_the_summary_keys_and_the_cli_json(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--noise-sigmas", "0.05", "--noise-draws", "1", "--forget-steps", "2", "--forget-lrs", "3e-3"]
    assert run_cli(["pretrain", *TINY, "--out", out, "--robustness", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"weight_noise", "quantization", "forgetting"} <= set(summary)
    assert summary["forgetting"]["points"][0]["lr"] == 3e-3
    # the noise and quantization losses start from the run's own validation loss
    assert summary["weight_noise"]["base_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    capsys.readouterr()
    assert run_cli(["robustness", "--run", out, "--json", tmp_path / "r.json", *flags]) == 0
    measured = json.loads((tmp_path / "r.json").read_text())
    assert measured["step"] == 6 and measured["forgetting"]["points"] == summary["forgetting"]["points"]
    assert "int4 RTN" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input


def assert_one_line_error(code, err, expected):
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("samlm: error: "), f"not one error line:\n{err}"
    assert expected in err, err


def test_bad_inputs_are_one_line(trained, tmp_path, capsys):
    no_checkpoint = tmp_path / "no-checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(trained / "config.json", no_checkpoint / "config.json")
    t5 = save_t5(tmp_path / "t5")
    cases = [
        (["robustness", "--run", no_checkpoint], "has no checkpoint"),
        (["robustness", "--run", tmp_path / "missing"], "not found"),
        (["robustness", "--run", trained, "--forget-data", tmp_path / "missing.txt"], "missing.txt not found"),
        (
            ["pretrain", *TINY, "--out", tmp_path / "new", "--robustness", "--forget-data", tmp_path / "missing.txt"],
            "missing.txt not found",
        ),
        (["robustness", "--run", trained, "--noise-sigmas", "0.01,-0.1"], "--noise-sigmas must be"),
        (
            ["robustness", "--run", trained, "--quant-group-size", "24"],
            "group size 24 does not divide the input width 32 of layer 'transformer.h.0.attn.c_attn'",
        ),
        (["robustness", "--run", trained, "--forget-tokenizer", t5], "does not match the run's"),
        (
            ["pretrain", *TINY, "--out", tmp_path / "new", "--robustness", "--quant-group-size", "24"],
            "of layer 'transformer.h.0.attn.c_attn'",
        ),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        code = run_cli(argv)
        assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_a_run_directory_without_a_run_configuration_is_one_line_in_every_command(trained, tmp_path, capsys):
    """robustness, sharpness and a resume read a run's config.json the same way: one without its
    settings is not a run, whatever reads it."""
    run = shutil.copytree(trained, tmp_path / "run")
    (run / "config.json").write_text("{}")
    expected = f"{run} is not a samlm pretrain run (config.json has no run configuration)"
    for argv in (
        ["robustness", "--run", run],
        ["sharpness", "--run", run],
        ["pretrain", *TINY, "--out", run, "--resume"],
    ):
        capsys.readouterr()
        assert_one_line_error(run_cli(argv), capsys.readouterr().err, expected)


# --------------------------------------------------------------------------- the compare report


def _fixture_run(root, name, optimizer, seed, *, noise, int4, before, points):
    """A finished run's summary.json as ``pretrain --robustness`` writes it (no training)."""
    out = root / name
    out.mkdir(parents=True)
    summary = {
        "optimizer": optimizer,
        "rho": None if optimizer == "adamw" else 0.05,
        "lr": 1e-2,
        "seed": seed,
        "completed": True,
        "step": 10,
        "steps": 10,
        "val_loss": before[1],
        "config": {"sharpness": False},
        "weight_noise": {
            "base_loss": before[1],
            "sigmas": [0.01, 0.1],
            "draws": 2,
            "delta_mean": [noise / 10, noise],
            "delta_std": [0.0, 0.0],
        },
        "quantization": {
            "base_loss": before[1],
            "group_size": 32,
            "embeddings": False,
            "int8": {"delta": int4 / 10},
            "int4": {"delta": int4},
        },
        "forgetting": {
            "data": "python-stdlib",
            "steps": 5,
            "lrs": [1e-3, 1e-2],
            "before": {"learning": before[0], "original": before[1]},
            "points": [
                {"lr": lr, "learning": x, "original": before[1] + y} for lr, (x, y) in zip((1e-3, 1e-2), points)
            ],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_report_has_paired_robustness_columns_under_both_budgets_and_a_frontier_plot(tmp_path):
    from samlm.studies import report

    runs = {}
    for seed in (0, 1):
        runs[f"adamw-{seed}"] = _fixture_run(
            tmp_path,
            f"adamw-seed{seed}",
            "adamw",
            seed,
            noise=0.2 + seed / 10,
            int4=0.3,
            before=(3.0, 1.5),
            points=[(2.5, 0.1), (2.0, 0.3)],
        )
        runs[f"adamwc-{seed}"] = _fixture_run(
            tmp_path,
            f"adamw-seed{seed}-equal-compute",
            "adamw",
            seed,
            noise=0.4,
            int4=0.5,
            before=(3.0, 1.4),
            points=[(2.6, 0.2), (2.2, 0.4)],
        )
        runs[f"sam-{seed}"] = _fixture_run(
            tmp_path,
            f"sam-rho0.05-seed{seed}",
            "sam",
            seed,
            noise=0.1 + seed / 10,
            int4=0.2,
            before=(3.0, 1.5),
            points=[(2.5, 0.05), (2.1, 0.15)],
        )
    load = {k: report.load_run(v) for k, v in runs.items()}
    budgets = {
        "steps": [load["adamw-0"], load["adamw-1"], load["sam-0"], load["sam-1"]],
        "compute": [load["adamwc-0"], load["adamwc-1"], load["sam-0"], load["sam-1"]],
    }
    files = report.write_report(tmp_path / "out", budgets["steps"], budgets=budgets)
    text = files["report"].read_text()
    assert "## Robustness" in text and "![learning–forgetting frontier](forgetting.png)" in text
    assert files["forgetting"].read_bytes()[:4] == b"\x89PNG"
    steps_part = text.split("At equal steps")[1].split("At equal compute")[0]
    compute_part = text.split("At equal compute")[1]
    # x* = the largest of the most-learned losses: max(2.0, 2.1) = 2.1 at equal steps
    assert "(x* = 2.1000)" in steps_part and "(x* = 2.2000)" in compute_part
    header = (
        "| optimizer | ρ | seeds | noise σ=0.1 Δloss | noise σ=0.1: Δ vs adamw | int8 Δloss | int8: Δ vs adamw "
        "| int4 Δloss | int4: Δ vs adamw | forgetting Δloss | forgetting: Δ vs adamw |"
    )
    assert header in steps_part and header in compute_part
    sam_row = next(line for line in steps_part.splitlines() if line.startswith("| sam "))
    cells = [c.strip() for c in sam_row.strip("|").split("|")]
    assert cells[4] == "-0.1000 ± 0.0000 (n=2)"  # noise: 0.1+s/10 - (0.2+s/10), paired by seed
    assert cells[8] == "-0.1000 ± 0.0000 (n=2)"  # int4: 0.2 - 0.3
    # forgetting at x* = 2.1: adamw between (2.0, 0.3) and (2.5, 0.1) -> 0.26; sam at its own point 0.15
    assert cells[9] == "+0.1500 ± 0.0000" and cells[10] == "-0.1100 ± 0.0000 (n=2)"
    sam_compute = next(line for line in compute_part.splitlines() if line.startswith("| sam "))
    assert [c.strip() for c in sam_compute.strip("|").split("|")][8] == "-0.3000 ± 0.0000 (n=2)"  # 0.2 - 0.5
    # results.csv carries each run's measures too; forgetting at the x* of every run in the file (2.2)
    import csv

    rows = {r["run"]: r for r in csv.DictReader(files["csv"].read_text().splitlines())}
    sam = rows["sam-rho0.05-seed1"]
    assert float(sam["robust_noise_0.1"]) == pytest.approx(0.2) and float(sam["robust_int4"]) == pytest.approx(0.2)
    assert float(sam["robust_forgetting_level"]) == pytest.approx(2.2)
    assert float(sam["robust_forgetting"]) == pytest.approx(0.125)  # between (2.5, 0.05) and (2.1, 0.15)


def test_study_robustness_dry_run_lists_every_run_of_both_budgets(tmp_path, capsys):
    assert run_cli(["study", "robustness", "--dry-run", "--out", tmp_path / "study"]) == 0
    out = capsys.readouterr().out
    assert out.count("(steps+compute)") == 6 and out.count("(steps)") == 6 and out.count("(compute)") == 6
    assert "pfsam-rho0.2-seed2" in out and not (tmp_path / "study").exists()
    assert run_cli(["study", "robustness", "--dry-run", "--preset", "gpu-24m", "--out", tmp_path / "gpu"]) == 0


def test_study_group_size_rule():
    from samlm.harness.pretrain.robustness import group_size_for
    from samlm.studies.robustness_study import presets

    assert group_size_for(64) == 32 and group_size_for(40) == 40
    assert presets()["cpu"].base.quant_group_size == 40 and presets()["cpu"].base.robustness
