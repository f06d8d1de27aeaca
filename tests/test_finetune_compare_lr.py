"""samlm finetune-compare with a learning-rate grid: run names, labels, and the "Tuned" table that
picks each method's best (lr, ρ) by best-checkpoint score and pairs its gain over the tuned
baseline by seed."""

import json
from pathlib import Path

import pytest

from samlm import cli
from samlm.errors import UserError
from samlm.harness.finetune import FinetuneConfig
from samlm.studies import finetune_compare as fc
from samlm.studies import finetune_runs as fr
from samlm.studies.finetune_grid import FinetuneGrid

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"
RTE_EVAL = {"glue/rte": {"eval": {"glue/rte": {"split": "validation", "examples": 277}}}}


def write_run(root, name, *, optimizer, seed, best, lr, rho=None, subsample=1.0, data=RTE_EVAL):
    """A summary.json with the fields finetune_compare reads (as harness.finetune writes them)."""
    summary = {
        "format": "samlm-finetune-summary",
        "version": 1,
        "completed": True,
        "metrics": {"glue/rte/accuracy": {"best": best, "final": best - 1}},
        "score": {"name": "mean task score", "best": best, "final": best - 1},
        "config": {
            "model": "runs/t5-small",
            "optimizer": optimizer,
            "base": "adafactor" if rho else None,
            "rho": rho,
            "lr": lr,
            "subsample": subsample,
            "seed": seed,
        },
        "model": {"name": "t5-small"},
        "data": data,
    }
    path = Path(root) / name
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return path


# best-checkpoint scores by seed 0, 1, 2 at each (optimizer, lr, ρ) point
POINTS = {
    ("adafactor", 1e-3, None): [60.0, 62.0, 64.0],  # mean 62
    ("adafactor", 3e-3, None): [63.0, 64.0, 62.0],  # mean 63: adafactor's tuned point
    ("sam", 1e-3, 0.05): [64.0, 66.0, 65.0],  # mean 65
    ("sam", 3e-3, 0.05): [61.0, 61.0, 61.0],  # mean 61
    ("sam", 1e-3, 0.15): [66.0, 65.0, 67.0],  # mean 66: sam's tuned point
}


@pytest.fixture
def lr_grid(tmp_path):
    runs = tmp_path / "runs"
    for (optimizer, lr, rho), scores in POINTS.items():
        for seed, best in enumerate(scores):
            write_run(
                runs, f"{optimizer}-{lr:g}-{rho}-{seed}", optimizer=optimizer, seed=seed, best=best, lr=lr, rho=rho
            )
    return fr.find_run_dirs([runs])


def test_tuned_table_picks_the_best_point_and_pairs_gains_by_seed(lr_grid, tmp_path):
    report = fc.compare_runs(lr_grid, tmp_path / "r")
    chosen = fr.tuned_groups(report)
    assert {key: (g.lr, g.rho, g.method) for key, g in chosen.items()} == {
        ("t5-small", 1.0, "adafactor"): (3e-3, None, "adafactor lr=0.003"),
        ("t5-small", 1.0, "sam"): (1e-3, 0.15, "sam rho=0.15 lr=0.001"),
    }
    md = (tmp_path / "r" / "results.md").read_text()
    tuned = md[md.index("## Tuned") :]
    assert "| t5-small | 100% | adafactor | 2 | 0.003 | – | 3 | 63.0 ± 1.0 | (reference) |" in tuned
    # sam rho=0.15 lr=1e-3 minus adafactor lr=3e-3, seed by seed: 3, 1, 5
    assert "| t5-small | 100% | sam | 3 | 0.001 | 0.15 | 3 | 66.0 ± 1.0 | +3.0 ± 2.0 (n=3) |" in tuned
    assert "selected and reported on glue/rte validation (277 examples)" in tuned
    assert "both use the best-checkpoint protocol, on the same split" in tuned and "optimistic" in tuned

    # The main tables list every point; their gains are over the tuned baseline (not "several baselines"),
    # and the baseline's other lr is not compared with it.
    assert "| t5-small | 100% | adafactor lr=0.001 | 3 | 62.0 ± 2.0 |" in md and "its tuned point at each data" in md
    gains = {g.method: g for g in report.gains if g.selection == "best" and g.metric == "score"}
    assert set(gains) == {"sam rho=0.05 lr=0.001", "sam rho=0.05 lr=0.003", "sam rho=0.15 lr=0.001"}
    assert gains["sam rho=0.15 lr=0.001"].diffs == [3.0, 1.0, 5.0]
    assert report.baselines == {"t5-small": fr.Baseline("adafactor")}
    assert "lr" in (tmp_path / "r" / "results.csv").read_text().splitlines()[0].split(",")

    # --baseline names a point (that one, at every fraction) or an optimizer (its tuned point).
    fixed = fr.build_report(lr_grid, tmp_path / "r2", baseline="adafactor lr=0.001")
    assert {g.method: g.diffs for g in fixed.gains if g.selection == "best" and g.metric == "score"}[
        "adafactor lr=0.003"
    ] == [3.0, 2.0, -2.0]
    assert "its tuned point" not in fc.render_markdown(fixed)
    assert fr.Baseline("adafactor", "adafactor lr=0.001") == fixed.baselines["t5-small"]
    by_family = fr.build_report(lr_grid, tmp_path / "r3", baseline="adafactor")
    assert [g.diffs for g in by_family.gains] == [g.diffs for g in report.gains]


def test_tuned_gain_pairs_only_common_seeds(tmp_path):
    runs = tmp_path / "runs"
    for seed, best in ((0, 50.0), (1, 52.0)):
        write_run(runs, f"a{seed}", optimizer="adafactor", seed=seed, best=best, lr=1e-3)
    for lr, scores in ((1e-3, {1: 55.0, 2: 57.0}), (3e-3, {1: 51.0, 2: 51.0})):
        for seed, best in scores.items():
            write_run(runs, f"s{lr:g}-{seed}", optimizer="sam", seed=seed, best=best, lr=lr, rho=0.05)
    report = fc.compare_runs(fr.find_run_dirs([runs]), tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    assert "| t5-small | 100% | sam | 2 | 0.001 | 0.05 | 2 | 56.0 ± 1.4 | +3.0 (n=1) |" in md  # seed 1: 55 - 52
    assert "| t5-small | 100% | adafactor | 1 | 0.001 | – | 2 | 51.0 ± 1.4 | (reference) |" in md
    # adafactor ran at one lr: its label stays as it was
    assert [g.method for g in report.groups] == ["adafactor", "sam rho=0.05 lr=0.001", "sam rho=0.05 lr=0.003"]


def test_without_a_grid_labels_and_report_are_unchanged(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, f"a{seed}", optimizer="adafactor", seed=seed, best=60.0 + seed, lr=1e-3)
        write_run(runs, f"s{seed}", optimizer="sam", seed=seed, best=62.0 + seed, lr=1e-3, rho=0.05)
    report = fc.compare_runs(fr.find_run_dirs([runs]), tmp_path / "r")
    assert [g.method for g in report.groups] == ["adafactor", "sam rho=0.05"]
    md = (tmp_path / "r" / "results.md").read_text()
    assert "## Tuned" not in md and "| t5-small | 100% | sam rho=0.05 | +2.0 ± 0.0 |" in md
    assert fr.tuned_groups(report)[("t5-small", 1.0, "sam")].method == "sam rho=0.05"


def test_split_text_names_every_task_split():
    runs = []
    for examples in (100, 9815):
        record = fr.RunRecord(Path("x"), "m", "", "adamw", None, None, 1e-3, 1.0, 0, "score", {}, [])
        record.eval_sets = {
            "glue/rte": {"split": "validation", "examples": 277},
            "glue/mnli:validation_matched": {"split": "validation_matched", "examples": examples},
        }
        runs.append(record)
    assert fc.split_text(runs) == (
        "glue/rte validation (277 examples), glue/mnli:validation_matched validation_matched (100/9815 examples)"
    )
    assert "do not name it" in fc.split_text([])


# --------------------------------------------------------------------------- the grid's runs


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tinymodels import save_t5

    return save_t5(tmp_path_factory.mktemp("t5"))


def grid_runs(t5_dir, tmp_path, **grid):
    base = FinetuneConfig(
        model=str(t5_dir), task="glue/rte", data_dir=str(FIXTURES / "glue"), steps=2, lr=grid.pop("base_lr", None)
    )
    return {name: config for name, config, _ in FinetuneGrid(out=str(tmp_path), base=base, **grid).runs()}


def test_grid_names_carry_the_lr_only_for_methods_with_several(t5_dir, tmp_path):
    plain = grid_runs(t5_dir, tmp_path, optimizers="adafactor,sam", seeds="0")
    assert {n: c.lr for n, c in plain.items()} == {"adafactor-sub1-seed0": None, "sam-sub1-seed0": None}
    one = grid_runs(t5_dir, tmp_path, optimizers="adafactor,sam", lr="3e-4")
    assert {n: c.lr for n, c in one.items()} == {"adafactor-sub1-seed0": 3e-4, "sam-sub1-seed0": 3e-4}

    every = grid_runs(t5_dir, tmp_path, optimizers="adafactor,sam", lr="1e-3,3e-3", rho="0.05", subsample="0.5")
    assert {n: (c.lr, c.rho) for n, c in every.items()} == {
        "adafactor-lr0.001-sub0.5-seed0": (1e-3, None),
        "adafactor-lr0.003-sub0.5-seed0": (3e-3, None),
        "sam-rho0.05-lr0.001-sub0.5-seed0": (1e-3, 0.05),
        "sam-rho0.05-lr0.003-sub0.5-seed0": (3e-3, 0.05),
    }
    assert every["sam-rho0.05-lr0.003-sub0.5-seed0"].out == str(tmp_path / "runs" / "sam-rho0.05-lr0.003-sub0.5-seed0")

    # Per method; a method not named runs at the base's lr (None: the model's default), under its old name.
    for base_lr in (None, 5e-4):
        per = grid_runs(
            t5_dir, tmp_path, optimizers="adafactor,sam", lr="sam=1e-3,sam=2e-3", seeds="0,1", base_lr=base_lr
        )
        assert {n: c.lr for n, c in per.items()} == {
            "adafactor-sub1-seed0": base_lr,
            "adafactor-sub1-seed1": base_lr,
            "sam-lr0.001-sub1-seed0": 1e-3,
            "sam-lr0.001-sub1-seed1": 1e-3,
            "sam-lr0.002-sub1-seed0": 2e-3,
            "sam-lr0.002-sub1-seed1": 2e-3,
        }
    with pytest.raises(UserError, match="--lr gives a value for fsam"):
        grid_runs(t5_dir, tmp_path, optimizers="adafactor,sam", lr="fsam=1e-3")


def samlm(capsys, *argv):
    code = cli.main(["finetune-compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dry_run_lists_the_lr_grid(t5_dir, tmp_path, capsys):
    code, out, err = samlm(
        capsys,
        "--out",
        tmp_path / "cmp",
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--data-dir",
        FIXTURES / "glue",
        "--optimizers",
        "adafactor,sam",
        "--lr",
        "sam=1e-3,sam=3e-3",
        "--steps",
        2,
        "--batch",
        2,
        "--dry-run",
    )
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "adafactor-sub1-seed0",
        "sam-lr0.001-sub1-seed0",
        "sam-lr0.003-sub1-seed0",
    ]
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    "lr, message",
    [
        ("abc", "--lr: 'abc' is not a number"),
        ("0", "--lr must be finite and > 0"),
        ("sam=-1e-3", "--lr must be finite and > 0"),
        ("samm=1e-3", "--lr: unknown optimizer 'samm'"),
        ("fsam=1e-3", "--lr gives a value for fsam, which is not in --optimizers"),
    ],
)
def test_bad_lr_is_a_one_line_error(t5_dir, tmp_path, capsys, lr, message):
    code, out, err = samlm(
        capsys,
        "--out",
        tmp_path / "cmp",
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--optimizers",
        "adafactor,sam",
        "--lr",
        lr,
        "--dry-run",
    )
    assert code == 2 and err.startswith("samlm: error: ") and message in err and err.count("\n") == 1, err
    assert not out


def test_lr_without_a_grid_is_an_error(tmp_path, capsys, lr_grid):
    code, _, err = samlm(capsys, "--out", tmp_path / "r", "--runs", *lr_grid, "--lr", "1e-3")
    assert code == 2 and "--lr needs a grid to run" in err and err.count("\n") == 1
