"""Fine-tune a T5 or an encoder classifier on GLUE/SuperGLUE/QA tasks, with or without SAM.

The Bahri et al. (2022) protocol: a pretrained T5 fine-tuned with Adafactor (constant lr 1e-3,
batch 128), optionally with efficient SAM (ascent gradient on 1/4 of the batch), on a training
set optionally subsampled to a fraction of its size; evaluated every ``eval_every`` steps; each
task-metric reported at its best checkpoint (chosen separately per task-metric pair) and at the
final checkpoint.

:func:`prepare` validates the settings, reads the model config and the data and resolves the
model's defaults, writing nothing (``--dry-run`` stops there); :func:`execute` loads the model,
trains and writes the run directory (:mod:`samlm.harness.rundir`)::

    config.json        the resolved settings (checked when resuming)
    metrics.jsonl      one line per evaluation: step, train_* means, <task>/<metric>, <task>/loss
    summary.json       best and final value + step of every metric, the overall score, the config
    checkpoints/checkpoint-<step>/   weights (safetensors) + optimizer/data/RNG state

Metric keys are ``<task>/<metric>`` (``glue/rte/accuracy``), or ``<task>:<split>/<metric>``
when the evaluation split is not the task's only default one (MNLI's two validation splits,
``eval_split``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from samlm import io
from samlm.data.formats import Example
from samlm.data.mixtures import MixtureSampler
from samlm.data.tasks import Task
from samlm.errors import UserError
from samlm.harness.finetune.build import (
    EvalSet,
    TrainBatches,
    data_fingerprint,
    load_data,
    lr_schedule,
    make_evaluator,
    overall_score,
    resolve_tasks,
    run_device,
)
from samlm.harness.finetune.config import FinetuneConfig, identity, resolve, validate
from samlm.harness.rundir import RunDir
from samlm.harness.settings import build_run_optimizer
from samlm.progress import say

SUMMARY_FORMAT = "samlm-finetune-summary"


@dataclass
class Plan:
    """Everything a run needs, validated and loaded; nothing written yet. ``config`` is resolved
    (no model-dependent ``None`` left); ``resolved`` holds what was derived from the model and data."""

    config: FinetuneConfig
    resolved: dict[str, Any]
    run_dir: RunDir
    info: Any
    tasks: list[Task]
    train: dict[str, list[Example]]
    train_sizes: dict[str, int]
    eval_sets: list[EvalSet]
    device: torch.device

    def record(self, parallel: Mapping[str, Any] | None = None) -> dict:
        """What ``config.json`` holds (and a resume is checked against)."""
        resolved = dict(self.resolved, parallel=dict(parallel) if parallel is not None else None)
        return {"config": self.config.as_dict(), "resolved": resolved}


# Fewer training examples than this many batches: the run works, but says it is small.
SMALL_TRAINING_SET_BATCHES = 10


def _check_training_set(config: FinetuneConfig, train: Mapping[str, list[Example]], batch: int) -> None:
    """Refuse a subsample smaller than one batch (its few examples would be drawn over and over
    without a word), and warn about one of only a few batches."""
    if config.subsample >= 1:
        return
    total = sum(len(examples) for examples in train.values())
    sub = f" (--subsample {config.subsample:g})"
    if total < batch:
        raise UserError(
            f"the subsampled training set has {total} example(s){sub}, fewer than one batch of {batch}: "
            "raise --subsample or lower --batch"
        )
    if total < SMALL_TRAINING_SET_BATCHES * batch:
        say(
            f"warning: only {total} training examples{sub}, {total / batch:.1f} batches of {batch}: "
            "each pass over them is a few steps, so expect noisy results"
        )


def prepare(config: FinetuneConfig) -> Plan:
    """Validate the settings, read the model config and the data, resolve defaults. Writes nothing.

    Cheap checks come first, so a mistake is reported before any weights are loaded.
    """
    from samlm.models import finetune as modeling

    validate(config)
    assert config.out is not None and config.model is not None  # check() refuses None
    run_dir = RunDir(config.out)
    run_dir.check_start(resume=config.resume, overwrite=config.overwrite)
    tasks = resolve_tasks(config)
    info = modeling.inspect_model(config.model, trust_remote_code=config.trust_remote_code)
    modeling.check_tasks(info, tasks)
    train, sizes, eval_sets = load_data(config, tasks)
    defaults = modeling.paper_defaults(info, config.optimizer)
    resolved_config = resolve(config, defaults)
    resolved = {
        "family": info.family,
        "model_type": info.model_type,
        "t5_size": info.t5_size,
        "tasks": [t.name for t in tasks],
        "micro_batch": resolved_config.micro_batch,
        "labels": list(tasks[0].labels) if config.columns is not None else None,
        "kind": tasks[0].kind if config.columns is not None else None,
        "defaults_from": defaults["source"],
        "eval_every": resolved_config.eval_every,
    }
    assert resolved_config.batch is not None  # resolve() sets it
    _check_training_set(config, train, resolved_config.batch)
    plan = Plan(
        config=resolved_config,
        resolved=resolved,
        run_dir=run_dir,
        info=info,
        tasks=tasks,
        train=train,
        train_sizes=sizes,
        eval_sets=eval_sets,
        device=run_device(config.device),
    )
    if config.resume:  # the launch is compared once the processes are known (execute)
        run_dir.check_resume(plan.record(), functools.partial(identity, parallel=False), "finetune")
    return plan


def execute(plan: Plan, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Load the model, train, write ``summary.json``; returns the summary."""
    from samlm.harness import parallel
    from samlm.harness.loop import LoopConfig, train
    from samlm.integrations import distributed
    from samlm.models.finetune import load_finetune_model

    s = plan.config
    run_dir = plan.run_dir
    info = parallel.setup(s.device)
    distributed.check_batch_split(s.micro_batch, info.world_size, "--batch / --grad-accum (the micro-batch)")
    first_task = plan.tasks[0]
    fm = load_finetune_model(
        plan.info,
        first_task,
        seed=s.seed,
        max_input_length=s.max_input_length,
        max_target_length=s.max_target_length,
        device=info.device,
    )
    par = parallel.parallelize(
        fm.model, info, strategy=s.strategy, sync_ascent=s.sync_ascent, mixed_precision=s.mixed_precision, sam=s.is_sam
    )
    if par.strategy == "fsdp" and "adafactor" in (s.optimizer, s.base):
        raise UserError(
            "Adafactor's factored second moments need whole weight matrices, which FSDP shards "
            "across processes: use --base adamw (or --optimizer adamw) with FSDP, or DDP"
        )
    record = plan.record(par.describe())
    if s.resume:
        run_dir.check_resume(record, identity, "finetune")
    model = par.module
    steps, warmup = cast(int, s.steps), cast(int, s.warmup)  # ints unless set to None through the API
    optimizer = build_run_optimizer(
        s,
        model,
        total_steps=steps,
        sam_kwargs=par.sam_kwargs,
        base=s.base or "adamw",
        ascent_fraction=s.ascent_fraction if s.ascent_fraction is not None else 0.25,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(s.lr_schedule, warmup, steps))
    sampler = MixtureSampler(plan.train, limit=s.mixture_limit, seed=s.seed)
    batches = distributed.shard_batches(
        TrainBatches(sampler, fm.collate, s.micro_batch, data_fingerprint(plan.train)), info.rank, info.world_size
    )
    evaluate = make_evaluator(fm, plan.eval_sets, s.eval_batch, autocast_dtype=par.autocast_dtype)

    # Written only now that everything loaded: a failed start leaves no trace in --out.
    if info.is_main:
        run_dir.begin(record, resume=s.resume)
    total = sum(len(v) for v in plan.train.values())
    say(
        f"fine-tuning {plan.info.spec} ({plan.info.family}, {plan.info.model_type}) on {', '.join(plan.train)}: "
        f"{total} training examples, {s.optimizer}"
        + (f"[{s.base}, rho={s.rho:g}, ascent fraction {s.ascent_fraction:g}]" if s.base else "")
        + f", lr {s.lr:g}, batch {s.batch}, {s.steps} steps (defaults: {plan.resolved['defaults_from']})"
    )

    result = train(
        par.model,
        optimizer,
        batches,
        config=LoopConfig.from_settings(s),
        evaluate=evaluate,
        scheduler=scheduler,
        forward=functools.partial(
            fm.forward, module=cast(torch.nn.Module, torch.compile(par.model)) if s.compile else par.model
        ),
        loss=fm.loss,
        scaler=par.scaler,
        step_kwargs=par.step_kwargs,
        on_step=on_step,
    )
    summary = build_summary(
        result, plan, {"model": {"parameters": sum(p.numel() for p in model.parameters())}, "parallel": par.describe()}
    )
    if info.is_main:
        run_dir.write_summary(summary)
    _report(summary, run_dir.path)
    distributed.barrier()
    return summary


def build_summary(result, plan: Plan, extra: Mapping[str, Any]) -> dict:
    """``summary.json``: best/final value and step of each metric, the score, the config."""
    loop = result.summary()
    best = result.best()
    final = result.final or {}
    metrics = {}
    for key, b in best.items():
        metrics[key] = {
            "best": b["value"],
            "best_step": b["step"],
            "mode": b["mode"],
            "final": final.get(key),
            "final_step": final.get("step"),
        }
    tasks = {t.name: t for t in plan.tasks}
    eval_keys: dict[str, list[str]] = {}
    for es in plan.eval_sets:
        eval_keys.setdefault(es.task.name, []).append(es.key)
    name, best_score = overall_score({k: v["best"] for k, v in metrics.items()}, eval_keys, tasks)
    _, final_score = overall_score(
        {k: v["final"] for k, v in metrics.items() if v["final"] is not None}, eval_keys, tasks
    )
    return io.json_safe(
        {
            "format": SUMMARY_FORMAT,
            "version": 1,
            "completed": loop["completed"],
            "interrupted": loop["interrupted"],
            "step": loop["step"],
            "steps": loop["steps"],
            "step_time_median_ms": loop["step_time_median_ms"],
            "step_time_warmup_steps": loop["step_time_warmup_steps"],
            "metrics": metrics,
            "score": {
                "name": name,
                "best": best_score,
                "final": final_score,
                "note": "best: from each task-metric's best checkpoint (Bahri et al.); final: last evaluation",
            },
            "config": plan.config.as_dict(),
            "resolved": plan.record(extra.get("parallel"))["resolved"],
            "model": {
                **plan.info.describe(),
                **extra.get("model", {}),
                **({"name": plan.config.model_label} if plan.config.model_label else {}),
            },
            "parallel": extra.get("parallel", {"world_size": 1}),
            "data": {
                name: {
                    "train_examples": len(plan.train[name]),
                    "train_examples_before_subsample": plan.train_sizes[name],
                    "eval": {
                        es.key: {"split": es.split, "examples": len(es.examples)}
                        for es in plan.eval_sets
                        if es.task.name == name
                    },
                }
                for name in plan.train
            },
            "loop": loop,
        }
    )


def _report(summary: Mapping[str, Any], out: Path) -> None:
    for key, m in summary["metrics"].items():
        if key.endswith("/loss"):
            continue
        final = "n/a" if m["final"] is None else f"{m['final']:.2f}"
        say(f"{key}: best {m['best']:.2f} (step {m['best_step']}), final {final} (step {m['final_step']})")
    score = summary["score"]
    if score["best"] is not None:
        final = "n/a" if score["final"] is None else f"{score['final']:.2f}"
        say(f"{score['name']}: {score['best']:.2f} from best checkpoints, {final} final")
    say(f"wrote {RunDir(out).summary_file}")
