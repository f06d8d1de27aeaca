"""Run one pretraining run: build it from a :class:`PretrainConfig`, train, write the summary.

The pretraining study of methods.md §3: next-token prediction, the same number of steps for
every optimizer. :func:`pretrain` builds the data, model, optimizer and schedule
(:mod:`samlm.harness.pretrain.build`), runs :func:`samlm.harness.loop.train` and writes the run
directory (:mod:`samlm.harness.rundir`): ``config.json``, ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` (final and best validation loss and perplexity on the tuning slice, the final loss
and perplexity on the disjoint report slice (:func:`~samlm.harness.pretrain.build.validation_slices`),
sharpness, speed, config).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from samlm.errors import UserError
from samlm.harness import checks
from samlm.harness.pretrain.build import (
    RunData,
    build_model,
    load_data,
    lr_schedule,
    resolve_steps,
    sharpness_probe,
    validation_slices,
)
from samlm.harness.pretrain.config import PretrainConfig, identity, validate
from samlm.harness.rundir import RunDir
from samlm.harness.settings import build_run_optimizer, resolve_eval_every
from samlm.progress import say

# Summary keys that are wall-clock measurements (differ between otherwise identical runs).
TIMING_KEYS = frozenset(
    {
        "step_s",
        "tokens_per_s",
        "train_seconds",
        "wall_seconds",
        "sharpness_seconds",
        "robustness_seconds",
        "step_time_median_ms",
        "step_time_warmup_steps",  # each resume has its own warm-up
    }
)


@dataclass
class Resolved:
    """Values derived from the config once data and model exist (``config.json``'s ``resolved``)."""

    tokenizer: str
    total_steps: int
    warmup_steps: int
    eval_every: int  # --eval-every, or its default from the steps
    rho: float | None
    params: int
    non_embedding_params: int
    vocab_size: int
    tokens_per_step: int
    train_tokens: int
    val_tokens: int
    tuning_batches: int  # validation batches 1..tuning_batches: val_loss (the tuning slice)
    report_batches: int  # the next report_batches: report_loss (the report slice)
    parallel: dict  # world_size, strategy, mixed_precision, sync_ascent
    data: dict  # the prepared tokens read: content and tokenizer sha256, split, counts, path

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunEnd:
    """A completed run, as a :class:`RunHook` finishes it (on the main process)."""

    config: PretrainConfig
    model: Any  # the trained module (unwrapped): the final weights
    data: RunData
    tuning: list  # the tuning slice's validation batches
    step: int
    summary: dict  # as written to summary.json
    run_dir: RunDir
    on_step: Callable[[int, dict], None] | None


class RunHook(Protocol):
    """Work a run does besides training, for the settings that ask for it (``--robustness``):
    ``check`` before training, nothing written yet (it refuses settings it cannot honour);
    ``finish`` after a completed run, on the main process (the summary, written by the hook)."""

    def check(self, config: PretrainConfig, model, data: RunData, world_size: int) -> None: ...
    def finish(self, end: RunEnd) -> dict: ...


# Every run's hooks; the package registers --robustness's (samlm.harness.pretrain.robustness).
RUN_HOOKS: list[RunHook] = []


def _resolve_rho(config: PretrainConfig) -> float | None:
    from samlm.optim.registry import method

    entry = method(config.optimizer)
    if entry.is_sam:
        return entry.default_rho if config.rho is None else config.rho
    if config.rho is not None:
        say(f"--rho {config.rho} is ignored: {config.optimizer} has no perturbation radius")
    return None


def pretrain(config: PretrainConfig | Mapping[str, Any], *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) one pretraining run; returns the summary also written to ``OUT/summary.json``.

    ``summary["completed"]`` is False when a signal (Ctrl-C, SIGTERM) stopped the run early; its
    checkpoint and results so far are on disk and ``resume=True`` continues it exactly.
    """
    from samlm.harness import parallel
    from samlm.harness.loop import LoopConfig, lm_evaluator, train
    from samlm.integrations import distributed
    from samlm.models import count_parameters, lm_forward
    from samlm.optim.registry import method

    started = time.perf_counter()
    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.from_mapping(config)
    validate(config)
    run_dir = RunDir(config.out)
    run_dir.check_start(resume=config.resume, overwrite=config.overwrite)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = parallel.setup(config.device)
    distributed.check_batch_split(config.micro_batch, info.world_size)
    checks.step_split(config, info.world_size)

    data = load_data(config, progress=config.progress and info.is_main)
    dataset, tokenizer_name, vocab_size = data.dataset, data.tokenizer_name, data.vocab_size
    model = build_model(config, vocab_size)
    for hook in RUN_HOOKS:  # bad settings of what runs after training fail before it
        hook.check(config, model, data, info.world_size)
    params = count_parameters(model)
    non_embedding = count_parameters(model, exclude_embeddings=True)
    total_steps, warmup_steps = resolve_steps(config, params, non_embedding)
    par = parallel.parallelize(
        model,
        info,
        strategy=config.strategy,
        sync_ascent=config.sync_ascent,
        mixed_precision=config.mixed_precision,
        sam=method(config.optimizer).is_sam,
    )
    if par.strategy == "fsdp" and config.sharpness:
        raise UserError(
            "sharpness measurements need the whole model on each process: pass --no-sharpness with --strategy fsdp"
        )
    model = par.module
    rho = _resolve_rho(config)
    wanted = 2 * config.val_batches if config.val_batches else None  # the tuning and report slices
    tuning, held_out = validation_slices(
        dataset.val_batches(config.micro_batch, max_batches=wanted), config.val_batches
    )
    resolved = Resolved(
        tokenizer=tokenizer_name,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        eval_every=resolve_eval_every(config.eval_every, total_steps),
        rho=rho,
        params=params,
        non_embedding_params=non_embedding,
        vocab_size=vocab_size,
        tokens_per_step=config.batch * config.context,
        train_tokens=len(dataset.train_tokens),
        val_tokens=len(dataset.val_tokens),
        data=data.describe(),
        tuning_batches=len(tuning),
        report_batches=len(held_out),
        parallel=par.describe(),
    )
    record = {"config": config.as_dict(), "resolved": resolved.as_dict()}
    if config.resume:
        run_dir.check_resume(record, identity, "pretrain")

    train_batches = dataset.train_batches(config.micro_batch, seed=config.seed)  # checks batch vs corpus size
    train_batches = distributed.shard_batches(train_batches, info.rank, info.world_size)
    tune = lm_evaluator(tuning)
    report = lm_evaluator(held_out, prefix="report") if held_out else (lambda model: {})

    def evaluate(model) -> dict:  # the report slice after the tuning slice: val_loss is unchanged by it
        return {**tune(model), **report(model)}

    optimizer = build_run_optimizer(config, model, total_steps=total_steps, sam_kwargs=par.sam_kwargs)
    probe = None
    if config.sharpness:
        probe_batches = dataset.val_batches(config.sharpness_batch_size, max_batches=config.sharpness_batches)
        probe = sharpness_probe(
            probe_batches, iters=config.sharpness_iters, seed=config.seed, rho=config.sharpness_rho, optimizer=optimizer
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(total_steps, warmup_steps, config.min_lr_ratio)
    )
    loop_config = LoopConfig.from_settings(
        config, steps=total_steps, sharpness_every=config.sharpness_every if probe is not None else 0
    )
    # Notes once every check passed (a mistake stays one line on stderr):
    if data.origin is not None and config.progress:
        say(data.origin)
    if config.val_batches and not held_out:
        say(
            f"warning: the validation split has no batches left after the {len(tuning)} of the tuning slice "
            "(--val-batches): no report slice, so no report_loss; use more validation data or fewer --val-batches"
        )
    if config.dry_run:
        return {"dry_run": True, **record, **_environment(info.world_size)}
    if info.is_main:
        run_dir.begin(dict(record, **_environment(info.world_size)), resume=config.resume)

    # --compile: the training forward runs the compiled module; evaluation, sharpness and
    # checkpoints use the module itself (the same parameters).
    forward = lm_forward(cast(torch.nn.Module, torch.compile(par.model))) if config.compile else None
    result = train(
        par.model,
        optimizer,
        train_batches,
        config=loop_config,
        evaluate=evaluate,
        scheduler=scheduler,
        forward=forward,
        sharpness=probe,
        on_step=on_step,
        scaler=par.scaler,
        step_kwargs=par.step_kwargs,
        final_sharpness=probe is not None,
    )
    summary = build_summary(
        config,
        resolved,
        result,
        list(result.history),
        wall_seconds=time.perf_counter() - started,
        world_size=info.world_size,
    )
    if info.is_main:
        run_dir.write_summary(summary)
    if summary.get("completed") and info.is_main:
        end = RunEnd(config, model, data, tuning, result.step, summary, run_dir, on_step)
        for hook in RUN_HOOKS:
            end.summary = hook.finish(end)
        summary = end.summary
    distributed.barrier()
    return summary


def _environment(world_size: int = 1) -> dict:
    import samlm

    return {
        "samlm_version": samlm.__version__,
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processes": world_size,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
    }


def build_summary(
    config: PretrainConfig, resolved: Resolved, result, history: list[dict], *, wall_seconds: float, world_size: int = 1
) -> dict:
    """Flat headline numbers first, then the loop's summary and the full configuration."""
    from samlm import io

    loop = result.summary()
    final = loop.get("final") or {}
    best = loop.get("best") or {}
    sharp_lines = [r for r in history if isinstance(r.get("sharpness"), dict)]
    sharp = sharp_lines[-1]["sharpness"] if sharp_lines else {}
    train_lines = [r for r in history if "train_loss" in r]
    summary = {
        "optimizer": config.optimizer,
        "rho": resolved.rho,
        "lr": config.lr,
        "seed": config.seed,
        "completed": loop["completed"],
        "interrupted": loop["interrupted"],
        "step": loop["step"],
        "steps": loop["steps"],
        "val_loss": final.get("val_loss"),
        "val_ppl": final.get("val_ppl"),
        "best_val_loss": best.get("val_loss", {}).get("value"),
        "best_val_loss_step": best.get("val_loss", {}).get("step"),
        "best_val_ppl": best.get("val_ppl", {}).get("value"),
        "report_loss": final.get("report_loss"),
        "report_ppl": final.get("report_ppl"),
        "train_loss": train_lines[-1]["train_loss"] if train_lines else None,
        "hessian_lambda_max": sharp.get("hessian_lambda_max"),
        "gauss_newton_lambda_max": sharp.get("gauss_newton_lambda_max"),
        "functional_lambda": sharp.get("functional_lambda"),
        "preconditioned_lambda_max": sharp.get("preconditioned_lambda_max"),
        "logit_path_norm": sharp.get("logit_path_norm"),
        "functional_path_norm": sharp.get("functional_path_norm"),
        "logit_functional_ratio": sharp.get("logit_functional_ratio"),
        "sharpness_step": sharp_lines[-1]["step"] if sharp_lines else None,
        "step_s": loop["step_s"],
        "step_time_median_ms": loop["step_time_median_ms"],
        "step_time_warmup_steps": loop["step_time_warmup_steps"],
        "tokens_per_s": loop["tokens_per_s"],
        "train_seconds": loop["train_seconds"],
        "wall_seconds": wall_seconds,
        "sharpness_seconds": sum(float(r["sharpness"].get("seconds", 0.0)) for r in sharp_lines),
        "tokens": loop["tokens"],
        "params": resolved.params,
        "non_embedding_params": resolved.non_embedding_params,
        "nonfinite_steps": loop["nonfinite_steps"],
        "sharpness": sharp,
        "loop": loop,
        "config": config.as_dict(),
        "resolved": resolved.as_dict(),
    }
    summary.update(_environment(world_size))
    return io.json_safe(summary)
