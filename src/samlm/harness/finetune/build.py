"""Building a fine-tuning run from its settings: the tasks, their training and evaluation
data, the resumable training stream, the evaluator, the schedule and the one-number score."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from samlm.data.formats import Example, load_generic, parse_column_mapping
from samlm.data.metrics import AVERAGED_TASKS, benchmark_average, compute_metrics, task_score
from samlm.data.mixtures import MixtureSampler, parse_mixture, subsample
from samlm.data.tasks import CLASSIFICATION, GENERATION, MIXTURES, TASKS, Task, generic_task, load_task
from samlm.errors import UserError
from samlm.harness.finetune.config import FinetuneConfig

GENERIC_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
GENERIC_SPLIT_NAMES = {"validation": ("validation", "dev", "val"), "train": ("train",), "test": ("test",)}


@dataclass
class EvalSet:
    task: Task
    split: str
    key: str  # metric key prefix: "glue/rte" or "glue/mnli:validation_matched"
    examples: list[Example]


def resolve_tasks(args: FinetuneConfig) -> list[Task]:
    if args.columns is not None:
        if args.task is not None and ("," in args.task or args.task.strip().lower() in {*TASKS, *MIXTURES}):
            raise UserError(
                f"--columns reads generic files, so --task names that data and must not be a registered task "
                f"or a mixture (got {args.task!r}); drop --columns to read {args.task}'s official files"
            )
        parse_column_mapping(args.columns)
        labels = _split_list(args.labels)
        kind = args.kind or (CLASSIFICATION if labels else GENERATION)
        if kind != CLASSIFICATION and labels:
            raise UserError(f"--labels only applies to classification data, not --kind {kind}")
        return [generic_task(kind, labels or None, name=(args.task or "generic").strip())]
    if args.labels is not None or args.kind is not None:
        raise UserError("--labels and --kind describe generic data: use them with --columns")
    if not args.task:
        raise UserError("--task is required (a task such as glue/rte, a mixture, or --columns for generic data)")
    return parse_mixture(args.task)


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def load_data(args: FinetuneConfig, tasks: Sequence[Task]):
    """Training examples (subsampled) and evaluation sets of every task, checked for labels."""
    train: dict[str, list[Example]] = {}
    sizes: dict[str, int] = {}
    eval_sets: list[EvalSet] = []
    for task in tasks:
        examples = _read_split(args, task, "train")
        _check_labelled(task, "train", examples, training=True)
        sizes[task.name] = len(examples)
        train[task.name] = (
            subsample(examples, args.subsample, seed=args.subsample_seed) if args.subsample < 1 else examples
        )
        default_splits = ("validation",) if args.columns is not None else task.eval_splits
        splits = (args.eval_split,) if args.eval_split else default_splits
        for split in splits:
            examples = _read_split(args, task, split)
            if args.eval_examples:
                examples = examples[: args.eval_examples]
            _check_labelled(task, split, examples, training=False)
            one_default = len(default_splits) == 1 and split == default_splits[0]
            key = task.name if one_default else f"{task.name}:{split}"
            eval_sets.append(EvalSet(task, split, key, examples))
    return train, sizes, eval_sets


def _read_split(args: FinetuneConfig, task: Task, split: str) -> list[Example]:
    if args.columns is None:
        return load_task(task, data_dir=args.data_dir, split=split)
    if args.data_dir is None:
        raise UserError("--columns reads generic files from --data-dir; pass --data-dir")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found")
    names = GENERIC_SPLIT_NAMES.get(split, (split,))
    candidates = [data_dir / f"{name}{suffix}" for name in names for suffix in GENERIC_SUFFIXES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"no {split} file for generic data: expected {data_dir}/{names[0]}.jsonl, .csv or .tsv")
    return load_generic(path, args.columns, task.kind, list(task.labels) or None)


def _check_labelled(task: Task, split: str, examples: Sequence[Example], *, training: bool) -> None:
    for example in examples:
        if task.kind == GENERATION:
            ok = bool(example.answers or example.target)
        else:
            ok = example.label is not None
        if not ok:
            what = "train on" if training else "evaluate on"
            raise UserError(
                f"{task.name} {split}: example {example.uid} has no label (an unlabelled test split?); "
                f"cannot {what} it" + ("" if training else "; choose a labelled split with --eval-split")
            )


def run_device(spec: str) -> torch.device:
    from samlm.harness.parallel import resolve_device

    device = resolve_device(spec)
    return device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainBatches:
    """Endless micro-batches from a :class:`MixtureSampler`, resumable by draw count.

    ``state_dict()`` holds the number of examples drawn and a fingerprint of the training set,
    so a resume with different data (``--task``, ``--subsample``) is refused.
    """

    def __init__(self, sampler: MixtureSampler, collate, micro_batch: int, fingerprint: str):
        self.sampler = sampler
        self.collate = collate
        self.micro_batch = micro_batch
        self.fingerprint = fingerprint
        self.draws = 0
        self._stream = sampler.iterate(0)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self):
        examples = [next(self._stream) for _ in range(self.micro_batch)]
        self.draws += len(examples)
        return self.collate(examples)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "micro_batch": self.micro_batch, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                "the checkpoint was trained on other data (the tasks, data files or --subsample "
                "changed); resume with the original flags or start over with --overwrite"
            )
        self.draws = int(state["draws"])
        self._stream = self.sampler.iterate(self.draws)


def data_fingerprint(train: Mapping[str, Sequence[Example]]) -> str:
    h = hashlib.sha256()
    for name in sorted(train):
        for example in train[name]:
            h.update(f"{name}\t{example.uid}\t{example.target}\n".encode())
    return h.hexdigest()[:32]


def make_evaluator(fm, eval_sets: Sequence[EvalSet], batch_size: int, autocast_dtype=None):
    """``evaluate(model) -> {"<key>/<metric>": value, "<key>/loss": value}`` over every eval set."""

    def evaluate(model) -> dict[str, float]:
        record: dict[str, float] = {}
        for es in eval_sets:
            predictions, loss = fm.predict(es.task, es.examples, batch_size, autocast_dtype=autocast_dtype)
            for metric, value in compute_metrics(es.task, predictions, es.examples).items():
                record[f"{es.key}/{metric}"] = value
            record[f"{es.key}/loss"] = loss
        return record

    return evaluate


def overall_score(
    values: Mapping[str, float], eval_keys: Mapping[str, Sequence[str]], tasks: Mapping[str, Task]
) -> tuple[str, float | None]:
    """The run's one-number score from metric values (``<key>/<metric>`` -> value).

    Mean over tasks of each task's mean over its evaluation splits of ``task_score`` (the mean
    of its official metrics). When the tasks are exactly GLUE's or SuperGLUE's averaged set,
    this is T5's benchmark average and is named so.
    """
    per_key: dict[str, dict[str, float]] = {}
    for name, keys in eval_keys.items():
        for key in keys:
            metrics = {m: values.get(f"{key}/{m}") for m in tasks[name].metrics}
            if any(v is None for v in metrics.values()):
                return _score_name(eval_keys), None
            per_key[key] = cast("dict[str, float]", metrics)  # no None: returned above
    name = _score_name(eval_keys)
    benchmark = name.removesuffix(" average")
    if benchmark in AVERAGED_TASKS:
        try:
            return name, benchmark_average(per_key, benchmark)
        except UserError:
            pass  # evaluated on other splits: fall back to the plain mean
    task_means = [sum(task_score(tasks[n], per_key[k]) for k in keys) / len(keys) for n, keys in eval_keys.items()]
    return name, sum(task_means) / len(task_means)


def _score_name(eval_keys: Mapping[str, Sequence[str]]) -> str:
    names = set(eval_keys)
    for benchmark, members in AVERAGED_TASKS.items():
        if names == set(members):
            return f"{benchmark} average"
    return "mean task score"


def lr_schedule(kind: str, warmup: int, steps: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (steps - step) / max(1, steps - warmup))
        return 1.0

    return factor
