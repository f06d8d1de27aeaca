"""SAM at the base optimizer's price: ``samlm study cheap``.

Does a SAM variant that costs (nearly) what AdamW costs keep SAM's gain? AdamW, SAM, Functional-SAM,
Momentum-SAM (``msam``: ε from the base's momentum, no ascent pass), preconditioned Momentum-SAM
(``pmsam``), LookSAM (``looksam``: a SAM step every 5th step, its orthogonal part reused between) and
SAM every 5th step (``sam@every5``, a method variant of the grid: plain AdamW steps between), each
at its own (lr, ρ), on two corpora: the demo's (Tiny Shakespeare, bytes) and Python source at a
byte-level BPE of 512 tokens trained on it.

For each corpus, the pretraining study's two stages (:mod:`samlm.studies.pretrain_study`):

1. **sweep**: every method over its (lr, ρ) grid on two seeds, equal steps (``OUT/<corpus>/<size>/sweep``);
2. **final**: each method at the point with the lowest mean val loss on the tuning slice, on five
   seeds, at equal steps, at equal compute by the FLOP model and at equal compute by the clock
   (:mod:`samlm.studies.clock`: the steps that equalise the step times measured side by side
   before the runs), with the robustness measures (weight noise, int8/int4, forgetting on the other
   corpus) at the end of every run (``OUT/<corpus>/<size>/final``).

``OUT/report.md``: per corpus, the paired Δ report loss to AdamW under the three budgets with the
95% intervals and verdicts, the chosen points (an edge of the grid marked) and the clock budget's
calibration. Every stage skips finished runs and resumes interrupted ones, the calibration is
stored and reused: rerunning the command continues the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.settings import setting
from samlm.progress import say
from samlm.studies import clock
from samlm.studies.compare import CompareConfig, CompareResult, compare
from samlm.studies.demo import DEMO_BASE
from samlm.studies.grid import (
    StudySettings,
    check_optimizers,
    check_out_dir,
    check_seeds,
    method_cost,
    parse_optimizers,
    parse_seeds,
    study_seconds,
    study_time_text,
)
from samlm.studies.pretrain_study import (
    GPU_24M_TOKENS,
    GPU_BASE,
    ModelSize,
    PretrainStudy,
    StudyPreset,
    choose,
    swept_values,
)
from samlm.studies.report import budget_table
from samlm.studies.runs import REPORT_KEY, load_run
from samlm.studies.stats import edge_mark, value_text

CHEAP_OPTIMIZERS = ("adamw", "sam", "fsam", "msam", "pmsam", "looksam", "sam@every5")
CHEAP_BUDGET = "steps,compute,time"
STUDY_FILE = "study.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Corpus:
    """One corpus of the study: its directory, ``--data`` and ``--tokenizer``, the second corpus
    of its forgetting measure (another corpus), and, for the time estimate, its steps at
    20 tokens/param and an AdamW step's seconds on the machine the preset was sized on."""

    name: str
    data: str
    tokenizer: str | None
    forget_data: str
    steps: int
    step_seconds: float | None  # None: not measured, no estimate
    data_tokens: tuple[int, int] | None = None  # prepared once into OUT/<corpus>/data (the GPU preset)


@dataclass(frozen=True)
class CheapPreset:
    description: str
    size: ModelSize
    base: PretrainConfig
    corpora: tuple[Corpus, ...]
    lr: str  # the sweep's lr grid (samlm.studies.grid syntax)
    rho: str  # the sweep's ρ grid
    sweep_seeds: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    jobs: int = 2
    # seconds per run beyond its steps: a sweep run's (start-up, evaluations), a final run's (also the
    # sharpness and robustness measures)
    run_seconds: tuple[float, float] = (0.0, 0.0)
    # measured step time over the FLOP model's, for the estimate: the calibration at the cpu preset's
    # size gives 1.02-1.13 by method (docs/results.md)
    time_over_model: float = 1.0


def _grid(values: Mapping[str, Sequence[str]]) -> str:
    return ",".join(f"{method}={value}" for method, grid in values.items() for value in grid)


# Factors of 2 around the demo's choices at this size (docs/comparing.md, "The demo"): AdamW 4.8e-2,
# SAM 2.4e-2, F-SAM 1.2e-2; the cheap variants start from SAM's lr. ρ: SAM's pair; Momentum-SAM's
# ε is not along the gradient, so its useful ρ is larger (Becker et al.).
CPU_LR = _grid(
    {"adamw": ("2.4e-2", "4.8e-2", "9.6e-2"), "fsam": ("6e-3", "1.2e-2", "2.4e-2")}
    | {m: ("1.2e-2", "2.4e-2", "4.8e-2") for m in ("sam", "msam", "pmsam", "looksam", "sam@every5")}
)
CPU_RHO = _grid(
    {"sam": ("0.05", "0.1"), "fsam": ("0.05", "0.1"), "msam": ("0.1", "0.3"), "pmsam": ("0.05", "0.1")}
    | {"looksam": ("0.05", "0.1"), "sam@every5": ("0.05", "0.1")}
)
GPU_LR = _grid({m: ("5e-4", "1e-3", "2e-3") for m in CHEAP_OPTIMIZERS})
GPU_RHO = _grid(
    {"sam": ("0.01", "0.05"), "fsam": ("0.01", "0.05"), "msam": ("0.1", "0.3"), "pmsam": ("0.01", "0.05")}
    | {"looksam": ("0.01", "0.05"), "sam@every5": ("0.01", "0.05")}
)

# What the GPU preset prepares: up to twice the 24M model's 3589 steps at 20 tokens/param (batch 256 x
# context 512), room for the longest run at equal compute by the clock (AdamW's, at the costliest
# method's measured ratio, ~1.5-1.9x), plus the token that ends the last window; the validation
# tokens of the pretraining study's GPU presets. A longer run would start a second epoch.
CHEAP_GPU_TOKENS = (2 * 3589 * 256 * 512 + 1, GPU_24M_TOKENS[1])

PRESETS: dict[str, CheapPreset] = {
    "cpu": CheapPreset(
        "the demo's 2x32 GPT-2 (context 64, 20 tokens/param) on Tiny Shakespeare (bytes) and on python-stdlib "
        "with a byte-level BPE of 512 tokens",
        ModelSize("2x32", 2, 32, 4),
        DEMO_BASE,
        (
            Corpus("shakespeare", "tinyshakespeare", "bytes", "python-stdlib", 350, 0.031),
            Corpus("python-bpe512", "python-stdlib", "bpe:512", "tinyshakespeare", 429, 0.0345),
        ),
        CPU_LR,
        CPU_RHO,
        run_seconds=(3.0, 8.0),
        time_over_model=1.1,
    ),
    "gpu-24m": CheapPreset(
        "a ~24M-parameter llama-style model (GPT-2 tokenizer, context 512, batch 256, bf16) on C4, "
        "20 tokens/param; the small built-in corpora hold far less than 20 tokens/param of this size",
        ModelSize("24m", 6, 320, 5),
        GPU_BASE,
        (Corpus("c4", "allenai/c4:en", "gpt2", "python-stdlib", 3589, None, CHEAP_GPU_TOKENS),),
        GPU_LR,
        GPU_RHO,
        jobs=1,
        run_seconds=(60.0, 180.0),
    ),
}


@dataclass
class CheapStudy:
    """The study of ``preset`` under ``out``; ``seeds``/``sweep_seeds``/``jobs``/``steps`` override the preset's."""

    out: str
    preset: CheapPreset
    optimizers: Sequence[str] = CHEAP_OPTIMIZERS
    seeds: Sequence[int] | None = None
    sweep_seeds: Sequence[int] | None = None
    jobs: int | None = None
    steps: int | None = None
    overwrite: bool = False
    robustness: bool = True
    overrides: Mapping[str, object] = field(default_factory=dict)  # the trackers' settings, device

    def corpus_study(self, corpus: Corpus) -> PretrainStudy:
        """The pretraining study's protocol on one corpus (its sweep and final stages)."""
        base = dataclasses.replace(
            self.preset.base, data=corpus.data, tokenizer=corpus.tokenizer, forget_data=corpus.forget_data
        )
        preset = StudyPreset(
            f"{self.preset.description}: {corpus.name}",
            (self.preset.size,),
            base,
            self.preset.lr,
            self.preset.rho,
            sweep_seeds=self.preset.sweep_seeds,
            seeds=self.preset.seeds,
            jobs=self.preset.jobs,
            data_tokens=corpus.data_tokens,
        )
        return PretrainStudy(
            out=str(Path(self.out) / corpus.name),
            preset=preset,
            optimizers=parse_optimizers(self.optimizers),
            seeds=self.seeds,
            sweep_seeds=self.sweep_seeds,
            jobs=self.jobs,
            steps=self.steps,
            overwrite=self.overwrite,
            overrides=self.overrides,
            robustness=self.robustness,
        )

    def sweep(self, corpus: Corpus) -> CompareConfig:
        config = self.corpus_study(corpus).sweep(self.preset.size)
        return dataclasses.replace(config, title=f"samlm study cheap, {corpus.name}: the (lr, ρ) sweep")

    def final(self, corpus: Corpus, chosen: Mapping[str, tuple[float | None, float]]) -> CompareConfig:
        config = self.corpus_study(corpus).final(self.preset.size, chosen)
        return dataclasses.replace(
            config,
            budget=CHEAP_BUDGET,
            title=f"samlm study cheap, {corpus.name}: tuned methods at equal steps, equal compute (model) "
            "and equal compute (clock)",
        )

    def final_runs(self, corpus: Corpus, optimizers: Sequence[str] | None = None) -> list:
        """The final stage's runs before the sweep chose: every method at its first grid point."""
        optimizers = optimizers or parse_optimizers(self.optimizers)
        values = swept_values(self.corpus_study(corpus), self.preset.size)
        chosen = {m: (values[m]["rho"][0], values[m]["lr"][0]) for m in optimizers}
        return self.final(corpus, chosen).runs()


def estimate_seconds(study: CheapStudy) -> dict[str, float] | None:
    """The study's time by the FLOP model: every run's steps × its step cost × the measured step
    time over the model's × the corpus's AdamW step time, plus the preset's per-run seconds, over
    the runs at a time. Per stage; None where the preset's step times were not measured."""
    seconds: dict[str, float] = {}
    jobs = study.jobs or study.preset.jobs
    for corpus in study.preset.corpora:
        if corpus.step_seconds is None:
            return None
        stages = (("sweep", study.sweep(corpus).runs()), ("final", study.final_runs(corpus)))
        for (stage, runs), overhead in zip(stages, study.preset.run_seconds):
            total = 0.0
            for run in runs:
                steps = study.steps or corpus.steps
                cost = method_cost(run.method, run.config.ascent_fraction, sam_every=1)
                total += steps * run.factor * cost * study.preset.time_over_model * corpus.step_seconds + overhead
            seconds[f"{corpus.name}/{stage}"] = total / jobs
    return seconds


@dataclass
class CheapResult:
    out: Path
    stages: dict[str, CompareResult] = field(default_factory=dict)  # "<corpus>/sweep", "<corpus>/final"
    chosen: dict[str, dict] = field(default_factory=dict)  # corpus -> method -> {"rho", "lr"}
    interrupted: str | None = None
    seconds: float = 0.0
    time: dict = field(default_factory=dict)


def run_study(study: CheapStudy) -> CheapResult:
    """Run (or continue) every corpus's sweep and final runs, then write ``report.md`` and ``study.json``."""
    started = time.perf_counter()
    out = check_out_dir(study.out)
    optimizers = parse_optimizers(study.optimizers)
    if "adamw" not in optimizers:
        raise UserError("the cheap study compares against AdamW: --optimizers must include adamw")
    for corpus in study.preset.corpora:  # every stage's settings before anything runs
        study.sweep(corpus).runs()
        study.final_runs(corpus, optimizers)
    result = CheapResult(out=out)
    for corpus in study.preset.corpora:
        study.corpus_study(corpus).prepare_data()
        say(f"study cheap {corpus.name}: sweep")
        sweep_config = study.sweep(corpus)
        sweep = compare(sweep_config)
        result.stages[f"{corpus.name}/sweep"] = sweep
        if not sweep.completed:
            result.interrupted = sweep.interrupted or "unfinished sweep runs"
            break
        chosen = choose(Path(sweep_config.out), list(sweep.summaries), optimizers)
        result.chosen[corpus.name] = {m: {"rho": r, "lr": lr} for m, (r, lr) in chosen.items()}
        say(f"study cheap {corpus.name}: final runs, equal steps, equal compute (model) and (clock)")
        final = compare(study.final(corpus, chosen))
        result.stages[f"{corpus.name}/final"] = final
        if not final.completed:
            result.interrupted = final.interrupted or "unfinished final runs"
            break
    result.seconds = time.perf_counter() - started
    result.time = study_seconds(out / STUDY_FILE, result.seconds, restart=study.overwrite)
    write_study(out, study, result)
    return result


def corpus_section(study: CheapStudy, corpus: Corpus, result: CheapResult) -> list[str]:
    """The report's section of one corpus: chosen points, the three budgets' Δ, the calibration."""
    lines = [f"## {corpus.name}: `{corpus.data}`, tokenizer {corpus.tokenizer}", ""]
    final = result.stages.get(f"{corpus.name}/final")
    chosen = result.chosen.get(corpus.name)
    if final is None or not final.summaries or not chosen:
        return lines + ["Not run yet (run the same command to continue).", ""]
    config = study.final(corpus, {m: (c["rho"], c["lr"]) for m, c in chosen.items()})
    calibration = clock.stored(config.out, config.method_configs())
    planned = config.runs(calibration)
    loaded = {r.name: load_run(Path(r.config.out)) for r in planned if r.name in final.summaries}
    budgets = {
        kind: [loaded[r.name] for r in planned if r.name in loaded and kind in r.budgets]
        for kind in ("steps", "compute", "time")
    }
    values = swept_values(study.corpus_study(corpus), study.preset.size)
    lines += [
        "Chosen points (lowest mean val loss on the tuning slice over the sweep seeds; (edge): the smallest or "
        "largest value of its grid, so the optimum may lie beyond it):",
        "",
        "| method | lr | ρ |",
        "|---|---:|---:|",
    ]
    for method, point in chosen.items():
        lr, rho = point["lr"], point["rho"]
        swept = values.get(method, {})
        lr_cell = value_text(lr) + edge_mark(lr, swept.get("lr"))
        rho_cell = value_text(rho) + edge_mark(rho, swept.get("rho"))
        lines.append(f"| {method} | {lr_cell} | {rho_cell} |")
    table = budget_table(budgets, loss_key=REPORT_KEY)
    lines += [
        "",
        "Δ report loss vs AdamW, paired by seed, under each budget (the report slice, which the choice did not see):",
        "",
        table or "n/a",
        "",
    ]
    if calibration is not None:
        steps = {r.method: final.summaries[r.name].get("steps") for r in planned if "time" in r.budgets}
        lines += clock.calibration_section(calibration, {k: v for k, v in steps.items() if v is not None}, "###")
    lines += [
        f"The runs, the robustness measures and the plots: `{corpus.name}/{study.preset.size.name}/final/report.md`.",
        "",
    ]
    return lines


def study_markdown(study: CheapStudy, result: CheapResult) -> str:
    seeds = ",".join(map(str, study.seeds or study.preset.seeds))
    sweep_seeds = ",".join(map(str, study.sweep_seeds or study.preset.sweep_seeds))
    lines = [
        "# samlm study cheap: SAM at the base optimizer's price",
        "",
        f"Preset: {study.preset.description}. Methods: {', '.join(parse_optimizers(study.optimizers))}.",
        "",
        f"Protocol, per corpus: a sweep of every method over its (lr, ρ) grid on seed(s) {sweep_seeds} at equal "
        f"steps; each method's point with the lowest mean val loss on the tuning slice, rerun on seeds {seeds} at "
        "**equal steps**, **equal compute (model)** (the costliest method's forward+backward passes, a backward "
        "counted as 2 forwards) and **equal compute (clock)** (the costliest method's measured time on this "
        "machine, from the calibration below each table)"
        + (", the robustness measures at the end of every run. " if study.robustness else ". ")
        + "Equal compute (clock) is the budget this report calls equal compute; the model's transfers across "
        "machines. Δ: report loss minus AdamW's at the same seed, mean ± std over the seed pairs (n), the "
        "Student-t 95% interval, and the verdict: ahead or behind only when the interval excludes 0.",
        "",
    ]
    for corpus in study.preset.corpora:
        lines += corpus_section(study, corpus, result)
    if result.interrupted:
        lines += [f"The study stopped ({result.interrupted}); run the same command again to continue.", ""]
    if result.seconds:
        lines += [study_time_text(result.time, result.seconds)]
    return "\n".join(lines) + "\n"


def write_study(out: Path, study: CheapStudy, result: CheapResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "format": "samlm-cheap-study",
        "preset": study.preset.description,
        "optimizers": list(parse_optimizers(study.optimizers)),
        "corpora": [dataclasses.asdict(c) for c in study.preset.corpora],
        "lr_grid": study.preset.lr,
        "rho_grid": study.preset.rho,
        "chosen": result.chosen,
        "completed": result.interrupted is None,
        **(result.time or {"seconds": round(result.seconds, 1)}),
    }
    io.atomic_write_text(out / STUDY_FILE, json.dumps(record, indent=2) + "\n")
    io.atomic_write_text(out / REPORT_FILE, study_markdown(study, result))


@dataclass
class CheapStudySettings(StudySettings):
    """study"""

    preset: str = settings.override(
        StudySettings,
        "preset",
        choices=tuple(PRESETS),
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    out: str = settings.override(StudySettings, "out", default="runs/study-cheap")
    seeds: str | None = settings.override(StudySettings, "seeds", default_text="the preset's: 0,1,2,3,4")
    optimizers: str = setting(
        ",".join(CHEAP_OPTIMIZERS),
        "comma-separated methods (must include adamw; NAME@everyK: a SAM-family method with a SAM step every K-th step)",
        check=check_optimizers,
        group="study",
    )
    sweep_seeds: str | None = setting(
        None, "comma-separated seeds of the sweep", default_text="the preset's: 0,1", check=check_seeds, group="study"
    )
    no_robustness: bool = setting(False, "skip the robustness measures at the end of the final runs", group="study")
    device: str | None = settings.override(
        settings.ParallelSettings, "device", default=None, default_text="the preset's", group="study"
    )

    def study(self) -> CheapStudy:
        overrides: dict[str, object] = dict(self.tracking())
        if self.device is not None:
            overrides["device"] = self.device
        return CheapStudy(
            out=self.out,
            preset=PRESETS[self.preset],
            optimizers=parse_optimizers(self.optimizers),
            seeds=None if self.seeds is None else parse_seeds(self.seeds),
            sweep_seeds=None if self.sweep_seeds is None else parse_seeds(self.sweep_seeds),
            jobs=self.jobs,
            steps=self.steps,
            overwrite=self.overwrite,
            robustness=not self.no_robustness,
            overrides=overrides,
        )


def minutes_text(seconds: Mapping[str, float] | None) -> str:
    """The estimate of :func:`estimate_seconds` per stage and in all."""
    if seconds is None:
        return "none (the preset's step times were not measured)"
    return ", ".join(f"{stage} {s / 60:.0f} min" for stage, s in seconds.items()) + (
        f"; {math.fsum(seconds.values()) / 60:.0f} min in all"
    )
