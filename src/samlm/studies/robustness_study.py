"""The robustness study, a CPU analogue of Watts et al. (ICML 2026): ``samlm study robustness``.

Does the SAM family forget less, or lose less to weight noise and quantization, at equal compute?
One :func:`samlm.studies.compare.compare` of AdamW, SAM, F-SAM and PF-SAM, each at its tuned
(lr, ρ) — the demo's committed sweep choices (:mod:`samlm.studies.demo`), not tuned again — on every
seed, at equal steps *and* at equal compute, every run measured at its end with ``--robustness``
(weight noise, int8/int4 RTN, forgetting on the second corpus; docs/robustness.md). Checkpoints are
kept along training (``save_every``), and afterwards weight noise and quantization are measured at
each of them (:func:`samlm.harness.pretrain.robustness.measure_run` with ``--forget-steps 0``), so
that a gap that grows along training, as Armstrong (arXiv 2604.15167) found for INT4, would show.

``OUT/report.md`` is the comparison's report (its Robustness section and ``forgetting.png``) plus a
table of the measures along training; ``OUT/study.json`` records the settings and the time. Runs
that finished are skipped, interrupted ones resumed: rerunning the command continues the study.

Presets: ``cpu`` (the demo's 2x40 byte-level GPT-2 on Tiny Shakespeare, 20 tokens/param, 3 seeds,
not 5, to keep the time docs/results.md has) and ``gpu-24m`` (5 seeds; a ~24M llama-style model on
C4 with the GPT-2 tokenizer, the pretraining study's GPU settings; its (lr, ρ) are Watts et al.'s ρ = 0.05 for SAM and
the pretraining study's grid centre, not tuned: run ``samlm study pretrain --preset gpu-24m`` first
and pass its choices with ``--lr``/``--rho`` for a tuned comparison).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.settings import setting
from samlm.progress import say
from samlm.studies import robustness_report
from samlm.studies.compare import CompareConfig, CompareResult, compare
from samlm.studies.grid import (
    StudySettings,
    check_optimizers,
    check_out_dir,
    parse_optimizers,
    parse_seeds,
    study_seconds,
    study_time_text,
)
from samlm.studies.report import REPORT_FILE
from samlm.studies.runs import Run, group_label, group_runs, load_run
from samlm.studies.stats import format_delta, mean_std

ROBUSTNESS_OPTIMIZERS = ("adamw", "sam", "fsam", "pfsam")  # pinned with the CPU preset's (lr, ρ) below
STUDY_FILE = "study.json"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class RobustnessPreset:
    description: str
    base: PretrainConfig
    lr: str
    rho: str
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # the cpu preset keeps the demo's 3 (docs/comparing.md)
    jobs: int = 1
    minutes: str = ""


# The CPU preset is the model, budget and (lr, ρ) docs/results.md section 6 ran: the demo's until
# 2026-12-03 (2 x 40, 512 steps, the 40-wide demo's sweep), kept here so that the study stays what
# it reports when the demo changes.
CPU_LR = "adamw=9.6e-2,sam=1.2e-2,fsam=2.4e-2,pfsam=1.2e-2"
CPU_RHO = "sam=0.1,fsam=0.1,pfsam=0.2"


def _cpu_base() -> PretrainConfig:
    # Checkpoints along training for the measures along training; int4 groups of 40 (the model is 40
    # wide: the default 32 does not divide it; harness.pretrain.robustness.group_size_for).
    from samlm.harness.pretrain.robustness import group_size_for
    from samlm.studies.demo import DEMO_BASE

    return dataclasses.replace(
        DEMO_BASE,
        layers=2,
        width=40,
        heads=4,
        robustness=True,
        quant_group_size=group_size_for(40),
        save_every=128,
        keep_checkpoints=20,
    )


def _gpu_base() -> PretrainConfig:
    from samlm.studies.pretrain_study import GPU_BASE

    return dataclasses.replace(
        GPU_BASE,
        layers=6,
        width=320,
        heads=5,
        robustness=True,
        save_every=2000,
        keep_checkpoints=20,
        robustness_batches=16,
        noise_draws=3,
        noise_sigmas="0.009,0.03,0.1",
        forget_lrs="3e-4,4e-4,5e-4,6e-4,8e-4",
        forget_steps=200,
    )


def presets() -> dict[str, RobustnessPreset]:
    from samlm.studies.demo import DEMO_SEEDS

    return {
        "cpu": RobustnessPreset(
            "a 2x40 byte-level GPT-2 on Tiny Shakespeare (the demo's model until 2026-12-03), 20 tokens/param, "
            "each method at that demo's committed (lr, rho), 3 seeds, equal steps and equal compute; forgetting "
            "on python-stdlib",
            _cpu_base(),
            CPU_LR,
            CPU_RHO,
            tuple(DEMO_SEEDS),
            jobs=2,
            minutes="docs/results.md",
        ),
        "gpu-24m": RobustnessPreset(
            "a ~24M llama-style model on C4 (GPT-2 tokenizer), 20 tokens/param, lr 1e-3, SAM/F-SAM rho 0.05, "
            "PF-SAM rho 0.2 (not tuned), 5 seeds; forgetting on python-stdlib over Watts et al.'s lr grid",
            _gpu_base(),
            "1e-3",
            "sam=0.05,fsam=0.05,pfsam=0.2",
        ),
    }


PRESET_NAMES = ("cpu", "gpu-24m")


@dataclass
class RobustnessStudy:
    out: str
    preset: RobustnessPreset
    optimizers: Sequence[str] = ROBUSTNESS_OPTIMIZERS
    seeds: Sequence[int] | None = None
    jobs: int | None = None
    steps: int | None = None
    overwrite: bool = False
    lr: str | None = None
    rho: str | None = None

    def compare_config(self) -> CompareConfig:
        base = self.preset.base
        if self.steps is not None:
            base = dataclasses.replace(
                base,
                steps=self.steps,
                tokens_per_param=None,
                save_every=max(1, self.steps // 4),
                eval_every=max(1, self.steps // 4),
            )
        return CompareConfig(
            out=str(Path(self.out) / RUNS_DIR),
            optimizers=parse_optimizers(self.optimizers),
            seeds=parse_seeds(self.seeds or self.preset.seeds),
            rho=self.rho or self.preset.rho,
            lr=self.lr or self.preset.lr,
            base=base,
            overwrite=self.overwrite,
            jobs=self.jobs or self.preset.jobs,
            budget="steps,compute",
            title="samlm study robustness: AdamW vs the SAM family, weight noise, "
            "quantization and forgetting at equal steps and equal compute",
        )


@dataclass
class RobustnessStudySettings(StudySettings):
    """study"""

    preset: str = settings.override(
        StudySettings,
        "preset",
        choices=PRESET_NAMES,
        help="cpu: the demo's model and committed (lr, rho) choices, 3 seeds (5 would take 5/3 of its time, "
        "which docs/results.md has); gpu-24m: a ~24M llama-style model on C4 (lr, rho not tuned), 5 seeds",
    )
    out: str = settings.override(StudySettings, "out", default="runs/study-robustness")
    optimizers: str = setting(
        ",".join(ROBUSTNESS_OPTIMIZERS),
        "comma-separated methods (must include adamw)",
        check=check_optimizers,
        group="study",
    )
    lr: str | None = setting(
        None, "each method's lr instead of the preset's (METHOD=LR,...)", default_text="the preset's", group="study"
    )
    rho: str | None = setting(
        None, "each method's rho instead of the preset's (METHOD=RHO,...)", default_text="the preset's", group="study"
    )

    def study(self) -> RobustnessStudy:
        return RobustnessStudy(
            out=self.out,
            preset=presets()[self.preset],
            optimizers=parse_optimizers(self.optimizers),
            seeds=None if self.seeds is None else parse_seeds(self.seeds),
            jobs=self.jobs,
            steps=self.steps,
            overwrite=self.overwrite,
            lr=self.lr,
            rho=self.rho,
        )


@dataclass
class StudyResult:
    out: Path
    compare: CompareResult | None = None
    along: dict = field(default_factory=dict)  # run name -> [checkpoint measures]
    interrupted: str | None = None
    seconds: float = 0.0
    time: dict = field(default_factory=dict)


ALONG_FILE = "along_training.json"


def measure_along_training(run_dir: Path) -> list[dict]:
    """Weight noise and quantization at every kept checkpoint of a run (no forgetting), cached in
    ``RUN/robustness/along_training.json`` (keyed by the checkpoint steps)."""
    from samlm.harness.pretrain.robustness import ROBUSTNESS_DIR, measure_run

    cache = run_dir / ROBUSTNESS_DIR / ALONG_FILE
    steps = [step for step, _ in io.checkpoint_dirs(run_dir / "checkpoints")]
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if [c["step"] for c in saved] == steps:
                return saved
        except (ValueError, KeyError, TypeError):
            pass
    result = measure_run(run_dir, overrides={"forget_steps": 0}, all_checkpoints=True)
    measured = [
        {"step": c["step"], "weight_noise": c["weight_noise"], "quantization": c["quantization"]}
        for c in result["checkpoints"]
    ]
    io.atomic_write_json(cache, measured)
    return measured


def along_table(runs: dict[str, list[Run]], along: dict[str, list[dict]]) -> str:
    """Markdown: per method (ρ, lr group) and checkpoint step, mean over seeds of the int8, int4 and
    largest-σ noise Δloss (equal-steps runs)."""
    lines = [
        "| method | step | seeds | int8 Δloss | int4 Δloss | noise Δloss (largest σ) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, members in runs.items():
        by_step: dict[int, list[dict]] = {}
        for run in members:
            for point in along.get(run.name, []):
                by_step.setdefault(point["step"], []).append(point)
        for step in sorted(by_step):
            points = by_step[step]
            int8 = mean_std(p["quantization"]["int8"]["delta"] for p in points)
            int4 = mean_std(p["quantization"]["int4"]["delta"] for p in points)
            noise = mean_std(p["weight_noise"]["delta_mean"][-1] for p in points)
            cells = [label, str(step), str(len(points))] + [format_delta(d, show_n=False) for d in (int8, int4, noise)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_study(study: RobustnessStudy) -> StudyResult:
    """Run (or continue) the comparison, the measures along training, then the report."""
    started = time.perf_counter()
    out = check_out_dir(study.out)
    if "adamw" not in parse_optimizers(study.optimizers):
        raise UserError("the robustness study compares against AdamW: --optimizers must include adamw")
    config = study.compare_config()
    result = StudyResult(out=out)
    say("study robustness: pretraining and measuring every run")
    result.compare = compare(config)
    if not result.compare.completed:
        result.interrupted = result.compare.interrupted or "unfinished runs"
    else:
        planned = config.runs()
        steps_runs = [r for r in planned if "steps" in r.budgets]
        for index, run in enumerate(steps_runs, start=1):
            say(f"[{index}/{len(steps_runs)}] {run.name}: weight noise and quantization at every checkpoint")
            result.along[run.name] = measure_along_training(Path(run.config.out))
    result.seconds = time.perf_counter() - started
    result.time = study_seconds(out / STUDY_FILE, result.seconds, restart=study.overwrite)
    write_study(out, study, config, result)
    return result


def write_study(out: Path, study: RobustnessStudy, config: CompareConfig, result: StudyResult) -> None:
    compare_report = Path(config.out) / REPORT_FILE
    lines = [
        f"# samlm study robustness ({study.preset.description})",
        "",
        study_time_text(result.time, result.seconds),
        "",
        f"The comparison's report, with the tables, the Robustness section and the frontier plot: "
        f"[{RUNS_DIR}/report.md]({RUNS_DIR}/report.md).",
        "",
    ]
    if result.compare is not None and compare_report.is_file():
        planned = config.runs()
        finished = {r.name: load_run(Path(r.config.out)) for r in planned if r.name in result.compare.summaries}
        budgets = {
            kind: [finished[r.name] for r in planned if r.name in finished and kind in r.budgets]
            for kind in ("steps", "compute")
        }
        lines += robustness_report.section(budgets)
        if (Path(config.out) / robustness_report.FRONTIER_PLOT).is_file():
            lines += [f"![learning–forgetting frontier]({RUNS_DIR}/{robustness_report.FRONTIER_PLOT})", ""]
    if result.along:
        loaded = {name: load_run(Path(config.out) / name) for name in result.along}
        groups = group_runs(list(loaded.values()))
        lines += [
            "## Along training (equal steps)",
            "",
            "Weight noise (largest σ) and int8/int4 Δloss at every kept checkpoint, mean ± std over seeds "
            "(no forgetting runs: `samlm robustness --all-checkpoints --forget-steps 0`).",
            "",
            along_table({group_label(*key): members for key, members in groups.items()}, result.along),
            "",
        ]
    if result.interrupted:
        lines += [f"The study stopped ({result.interrupted}); run the same command again to continue.", ""]
    io.atomic_write_text(out / "report.md", "\n".join(lines))
    io.atomic_write_json(
        out / STUDY_FILE,
        io.json_safe(
            {
                "preset": study.preset.description,
                "optimizers": list(study.optimizers),
                "seeds": list(study.seeds or study.preset.seeds),
                "lr": study.lr or study.preset.lr,
                "rho": study.rho or study.preset.rho,
                "steps": study.steps,
                "seconds": result.seconds,
                **result.time,
            }
        ),
    )
