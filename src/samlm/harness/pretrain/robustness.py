"""Measuring a pretraining run's robustness: weight noise, int8/int4 quantization, forgetting.

The measures are :mod:`samlm.diagnostics.robustness`; this module feeds them a run's model and
data (the run's own validation batches and validation loss) and runs the forgetting measure's
fine-tuning runs. ``pretrain(--robustness)`` measures at the end of the run (this module's
:class:`RobustnessHook`, a :data:`~samlm.harness.pretrain.run.RUN_HOOKS` entry), ``samlm robustness
--run DIR`` measures a finished run's checkpoints afterwards. docs/robustness.md has the formulas.

Forgetting: the checkpoint's weights are exported once as a causal-LM directory
``RUN/robustness/step<N>/model/``; each learning rate of ``--forget-lrs`` is an ordinary
``samlm pretrain`` run ``RUN/robustness/step<N>/forget-lr<lr>/`` starting from it (``--model``;
plain AdamW, ``--forget-steps`` steps, the run's batch, context, seed and schedule shape, fresh
optimizer state) on ``--forget-data``. A finished one is reused, an interrupted one resumes from its
checkpoint, so the measure is resumable like any run. Per learning rate: the second corpus's
validation loss (its first ``--robustness-batches`` validation batches: the fine-tuning run's
``val_loss``) and the original corpus's (the first ``--robustness-batches`` of the run's tuning
slice, the batches the noise and quantization measures use too) after fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain.build import load_data, validation_slices
from samlm.harness.pretrain.config import PretrainConfig, RobustnessSettings
from samlm.harness.pretrain.measure import build_run, load_weights
from samlm.harness.pretrain.measure import read_run_config as read_run
from samlm.harness.pretrain.run import RUN_HOOKS, RunEnd, pretrain
from samlm.harness.rundir import RunDir
from samlm.progress import say

ROBUSTNESS_DIR = "robustness"
KEYS = ("weight_noise", "quantization", "forgetting")
FIELDS = tuple(f.name for f in dataclasses.fields(RobustnessSettings))


def group_size_for(width: int, default: int = 32) -> int:
    """The int4 group size the studies use for a model ``width`` wide: ``default`` where it divides
    the width, else the width itself (one group per row of the width-wide layers)."""
    return default if width % default == 0 else width


def numbers(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",")]


def lr_name(lr: float) -> str:
    return f"forget-lr{lr:g}"


# --------------------------------------------------------------------------- checks before a run


def check_model(config: PretrainConfig, model) -> None:
    """The int4 group size divides every quantized layer's input width (one line naming the layer)."""
    from samlm.diagnostics.robustness import check_group_size

    try:
        check_group_size(
            model, config.quant_group_size, embeddings=config.quantize_embeddings, norms=config.quantize_norms
        )
    except ValueError as exc:
        raise UserError(f"--quant-group-size: {exc}") from None


def check_tokenizer(config: PretrainConfig, data) -> None:
    """The second corpus must be in the run's tokenizer (``data``: the run's
    :class:`~samlm.harness.pretrain.build.RunData`): a prepared directory made with another
    tokenizer, or a ``--forget-tokenizer`` that is not the run's, is a one-line error."""
    from samlm.data import is_prepared_dir, load_prepared
    from samlm.data.tokenizers import tokenizer_sha256

    if is_prepared_dir(config.forget_data):
        other = load_prepared(config.forget_data)
        other_name, other_sha = other.tokenizer_name, other.tokenizer_sha256
    elif config.forget_tokenizer is not None:
        other_name = config.forget_tokenizer
        other_sha = tokenizer_sha256(other_name, trust_remote_code=config.trust_remote_code)
    else:
        return  # read with the run's own tokenizer
    if other_sha != data.prepared.tokenizer_sha256:
        raise UserError(
            f"the second corpus's tokenizer ({other_name}) does not match the run's ({data.tokenizer_name}): "
            "the model's embeddings index the run's tokens; give --forget-data in the run's tokenizer"
        )


def check_config(config: PretrainConfig, model, data) -> None:
    """Everything that can be checked before the run (or the measures): the group size, the
    second corpus's tokenizer, and the second corpus itself (read, and prepared once into the
    cache, now rather than after training)."""
    check_model(config, model)
    if config.forget_steps:
        check_tokenizer(config, data)
        load_data(second_corpus_config(config, data.prepared.tokenizer_path()))


def second_corpus_config(config: PretrainConfig, run_tokenizer: str) -> PretrainConfig:
    """``config`` reading the second corpus: a prepared directory with its own tokenizer (checked
    to be the run's), a raw spec with the run's tokenizer (``run_tokenizer``: ``bytes`` or the
    run's tokenizer directory, so a BPE trained for the run is reused, not retrained)."""
    from samlm.data import is_prepared_dir

    tokenizer = None if is_prepared_dir(config.forget_data) else run_tokenizer
    return dataclasses.replace(config, data=config.forget_data, max_chars=None, tokenizer=tokenizer, progress=False)


# --------------------------------------------------------------------------- the measures


def _evaluator(batches: list) -> Callable[[torch.nn.Module], float]:
    from samlm.harness.loop import lm_evaluator

    evaluate = lm_evaluator(batches)
    return lambda model: evaluate(model)["val_loss"]


def measure_model(
    config: PretrainConfig,
    model,
    tuning: list,
    *,
    run_dir: Path,
    step: int,
    run_tokenizer: str,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """The three measures of ``model`` (the run's weights at ``step``) on the first
    ``--robustness-batches`` of the run's tuning validation batches ``tuning``; ``{"weight_noise", "quantization", "forgetting"}`` (forgetting
    None with ``--forget-steps 0``; ``{"interrupted": ...}`` when a fine-tuning run was stopped)."""
    from samlm.diagnostics import robustness

    check_model(config, model)
    batches = tuning[: config.robustness_batches]
    evaluate = _evaluator(batches)
    started = time.perf_counter()
    noise = robustness.weight_noise(
        model, evaluate, sigmas=numbers(config.noise_sigmas), draws=config.noise_draws, seed=config.seed
    )
    noise["seconds"] = time.perf_counter() - started
    noise["batches"] = len(batches)
    started = time.perf_counter()
    quant = robustness.quantization(
        model,
        evaluate,
        group_size=config.quant_group_size,
        embeddings=config.quantize_embeddings,
        norms=config.quantize_norms,
        base_loss=noise["base_loss"],
    )
    quant["seconds"] = time.perf_counter() - started
    quant["batches"] = len(batches)
    forget = None
    if config.forget_steps:
        forget = forgetting(
            config,
            model,
            batches,
            run_dir=run_dir,
            step=step,
            run_tokenizer=run_tokenizer,
            on_step=on_step,
            before_original=noise["base_loss"],
        )
    return io.json_safe({"weight_noise": noise, "quantization": quant, "forgetting": forget})


def export_model(model, directory: Path) -> Path:
    """``model``'s weights as a causal-LM directory (``save_pretrained``, safetensors), written
    into a temporary sibling and renamed into place; an existing export is kept."""
    if (directory / "config.json").is_file():
        return directory
    from samlm.models.causal import quiet_transformers

    with quiet_transformers():  # transformers saves safetensors by default
        io.atomic_save_pretrained(model, directory)
    return directory


def finetune_config(
    config: PretrainConfig, *, model_dir: Path, lr: float, out: Path, run_tokenizer: str
) -> PretrainConfig:
    """The fine-tuning run at ``lr``: plain AdamW from ``model_dir`` on the second corpus for
    ``--forget-steps`` steps; the run's batch, context, seed, weight decay, betas and schedule shape;
    no sharpness, no robustness, evaluated (on ``--robustness-batches`` batches) and saved at the end.
    A run of these settings in ``out`` resumes; one of other settings (an earlier ``--forget-steps``,
    say) is started over."""
    tuned = dataclasses.replace(
        second_corpus_config(config, run_tokenizer),
        model=str(model_dir),
        optimizer="adamw",
        rho=None,
        lr=lr,
        steps=config.forget_steps,
        tokens_per_param=None,
        warmup=None,
        sam_every=1,
        sam_start=0,
        path_norms=False,
        sharpness=False,
        sharpness_every=0,
        robustness=False,
        eval_every=0,
        save_every=0,
        keep_checkpoints=1,
        val_batches=config.robustness_batches,
        out=str(out),
        dry_run=False,
        progress=False,
        compile=False,
    )
    saved = _saved_config(out)
    resume = saved is not None and RunDir(out).has_checkpoint() and _same(saved, tuned)
    return dataclasses.replace(tuned, resume=resume, overwrite=not resume)


_SAME_RUN = frozenset(f.name for f in dataclasses.fields(PretrainConfig) if f.metadata.get("resume", True)) | {
    "steps",
    "warmup",
}


def _same(saved: Mapping[str, Any], config: PretrainConfig) -> bool:
    """``saved`` (a run's recorded settings) describe the same fine-tuning run as ``config``."""
    wanted = config.as_dict()
    return all(saved.get(k) == wanted.get(k) for k in _SAME_RUN)


def _saved_config(out: Path) -> dict | None:
    try:
        record = RunDir(out).read_record("pretrain")
    except UserError:
        return None
    return record["config"] if record is not None else None


def _same_finished(config: PretrainConfig) -> dict | None:
    summary = RunDir(config.out).finished_summary()
    if summary is None or not _same(summary.get("config") or {}, config):
        return None
    return summary


def forgetting(
    config: PretrainConfig,
    model,
    tuning: list,
    *,
    run_dir: Path,
    step: int,
    run_tokenizer: str,
    on_step: Callable[[int, dict], None] | None = None,
    before_original: float | None = None,
) -> dict:
    """Fine-tune from ``model`` at each lr of ``--forget-lrs`` (resumable run directories under
    ``run_dir/robustness/step<step>/``) and summarise with
    :func:`samlm.diagnostics.robustness.forgetting_summary`."""
    from samlm.diagnostics.robustness import forgetting_summary

    started = time.perf_counter()
    root = Path(run_dir).resolve() / ROBUSTNESS_DIR / f"step{step}"
    model_dir = export_model(model, root / "model")
    training = model.training
    evaluate_original = _evaluator(tuning)
    model.eval()
    if before_original is None:
        before_original = evaluate_original(model)
    second = load_data(second_corpus_config(config, run_tokenizer)).dataset
    second_tuning = second.val_batches(config.micro_batch, max_batches=config.robustness_batches)
    before_learning = _evaluator(second_tuning)(model)
    tuned = copy.deepcopy(model)
    points = []
    for lr in numbers(config.forget_lrs):
        run_config = finetune_config(
            config, model_dir=model_dir, lr=lr, out=root / lr_name(lr), run_tokenizer=run_tokenizer
        )
        summary = _same_finished(run_config)
        if summary is None:
            say(f"forgetting: fine-tuning at lr {lr:g} for {config.forget_steps} steps on {config.forget_data}")
            summary = pretrain(run_config, on_step=on_step)
        if not summary.get("completed"):
            model.train(training)
            return {"interrupted": summary.get("interrupted") or "stopped", "run": str(run_config.out)}
        load_weights(tuned, io.load_latest_checkpoint(RunDir(run_config.out).checkpoints))
        tuned.eval()
        points.append(
            {
                "lr": lr,
                "learning": float(summary["val_loss"]),
                "original": evaluate_original(tuned),
                "run": str(Path(run_config.out).relative_to(root.parent.parent)),
            }
        )
    model.train(training)
    result = forgetting_summary(
        points, before_learning=before_learning, before_original=before_original, target=config.forget_target
    )
    result.update(
        data=config.forget_data,
        steps=config.forget_steps,
        lrs=numbers(config.forget_lrs),
        seconds=time.perf_counter() - started,
    )
    return result


# --------------------------------------------------------------------------- a finished run


def read_run_config(run_dir: Path, overrides: Mapping[str, Any]) -> PretrainConfig:
    """The run's settings from ``config.json``, with the robustness settings of ``overrides``."""
    _, config = read_run(run_dir)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise UserError(f"not a robustness setting: {', '.join(unknown)}")
    config = dataclasses.replace(config, **overrides)
    settings.validate(config)
    return config


def measure_run(
    run_dir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    all_checkpoints: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """``samlm robustness --run DIR``: the measures of the latest checkpoint (``all_checkpoints``:
    of every kept one, oldest first). ``{"run", "checkpoints": [{"step", "weight_noise",
    "quantization", "forgetting"}, ...]}``, plus the latest one's keys at the top level."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir, overrides or {})
    found = io.checkpoint_dirs(RunDir(run_dir).checkpoints)
    if not found:
        raise UserError(f"run directory {run_dir} has no checkpoint to measure (checkpoints/ is empty)")
    data, model = build_run(config)
    check_config(config, model, data)
    tuning, _ = validation_slices(data.dataset.val_batches(config.micro_batch), config.val_batches)
    chosen = found if all_checkpoints else found[-1:]
    results = []
    for step, path in chosen:
        try:
            checkpoint = io.load_checkpoint(path)
        except io.CheckpointError as exc:
            raise UserError(f"checkpoint {path} is unusable ({exc})") from None
        load_weights(model, checkpoint)
        say(f"robustness of {run_dir} at step {step}")
        measured = measure_model(
            config,
            model,
            tuning,
            run_dir=run_dir,
            step=step,
            run_tokenizer=data.prepared.tokenizer_path(),
            on_step=on_step,
        )
        results.append({"step": step, **measured})
        if (measured.get("forgetting") or {}).get("interrupted"):
            break
    return io.json_safe({"run": str(run_dir), **results[-1], "checkpoints": results})


def interrupted(result: Mapping[str, Any]) -> str | None:
    """The signal that stopped a forgetting run of a measurement, else None."""
    forget = result.get("forgetting")
    return forget.get("interrupted") if isinstance(forget, Mapping) else None


class RobustnessHook:
    """``--robustness`` in a run (:class:`~samlm.harness.pretrain.run.RunHook`): its settings checked
    before training, the measures of the final weights added to ``summary.json`` under
    ``weight_noise``, ``quantization`` and ``forgetting`` at the end."""

    def check(self, config: PretrainConfig, model, data, world_size: int) -> None:
        if not config.robustness:
            return
        if world_size > 1:
            raise UserError(
                "--robustness measures on one process: measure the finished run with "
                "'samlm robustness --run DIR' instead"
            )
        check_config(config, model, data)

    def finish(self, end: RunEnd) -> dict:
        config = end.config
        if not config.robustness:
            return end.summary
        started = time.perf_counter()
        measured = measure_model(
            config,
            end.model,
            end.tuning,
            run_dir=end.run_dir.path,
            step=end.step,
            run_tokenizer=end.data.prepared.tokenizer_path(),
            on_step=end.on_step,
        )
        summary = io.json_safe({**end.summary, **measured, "robustness_seconds": time.perf_counter() - started})
        stopped = interrupted(measured)
        if stopped:
            summary.update(completed=False, interrupted=stopped)
        end.run_dir.write_summary(summary)
        if config.report_to != "none":  # the run's trackers, continued: robustness/<measure>/...
            from samlm.integrations import tracking

            with tracking.continue_run(
                end.run_dir.path, config.report_to, run_name=config.run_name, group=config.run_group
            ) as trackers:
                trackers.log_final({k: measured[k] for k in KEYS if isinstance(measured.get(k), dict)}, end.step)
        return summary


RUN_HOOKS.append(RobustnessHook())
