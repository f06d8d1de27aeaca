"""Subsampling a training set and mixing several tasks, as Bahri et al. (2022) and T5 do:
:func:`subsample` draws a deterministic fraction; :func:`parse_mixture` and
:class:`MixtureSampler` mix tasks example-proportionally, optionally with T5's per-task cap K."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Mapping, Sequence

from samlm.data.formats import Example
from samlm.data.tasks import MIXTURES, Task, get_task
from samlm.errors import UserError

# --------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------


def subsample(examples: Sequence[Example], rate: float, seed: int = 0) -> list[Example]:
    """A deterministic random fraction ``rate`` in (0, 1] of ``examples``, in original order.

    - Units are groups: examples sharing a ``group`` (a MultiRC question's answer options,
      ReCoRD's per-answer copies) are kept or dropped together; other examples are their own
      unit. ``round(rate * units)`` units are kept (halves round up), at least one.
    - Not stratified: the label mix of the sample follows chance.
    - Nested: with the same seed, the sample at a smaller rate is a subset of the sample at
      a larger one (both take a prefix of one seeded permutation).
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        percent = isinstance(rate, (int, float)) and 1 < rate <= 100
        hint = f" (did you mean {rate / 100:g}?)" if percent else ""
        raise UserError(f"subsample rate must be in (0, 1], got {rate!r}{hint}")
    if not examples:
        raise UserError("cannot subsample an empty list of examples")
    units: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        units.setdefault(example.group or f"\0{example.uid}\0{i}", []).append(i)
    keys = list(units)
    keep = max(1, math.floor(rate * len(keys) + 0.5))
    order = list(range(len(keys)))
    random.Random(f"samlm-subsample:{seed}").shuffle(order)
    chosen = sorted(i for k in order[:keep] for i in units[keys[k]])
    return [examples[i] for i in chosen]


# --------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------


def parse_mixture(spec: str) -> list[Task]:
    """Tasks named by a comma-separated list (``"glue/rte,superglue/cb"``).

    The names ``glue`` and ``superglue`` stand for T5's mixtures of the benchmark's tasks
    (GLUE without WNLI). Repeats are an error.
    """
    names: list[str] = []
    for part in (p.strip().lower() for p in str(spec).split(",")):
        if part:
            names.extend(MIXTURES.get(part, (part,)))
    if not names:
        raise UserError(f"empty task mixture {spec!r}; name one or more tasks, comma-separated")
    tasks = [get_task(n) for n in names]
    seen = set()
    for task in tasks:
        if task.name in seen:
            raise UserError(f"task mixture {spec!r} names {task.name} twice")
        seen.add(task.name)
    return tasks


def mixing_rates(sizes: Mapping[str, int], limit: int | None = None) -> dict[str, float]:
    """T5's examples-proportional rates: ``min(size, limit) / sum`` over tasks."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"mixture limit must be a positive integer, got {limit!r}")
    capped = {name: min(size, limit) if limit else size for name, size in sizes.items()}
    total = sum(capped.values())
    if total <= 0:
        raise UserError("cannot mix tasks that have no examples")
    return {name: size / total for name, size in capped.items()}


class MixtureSampler:
    """A deterministic, endless stream of examples mixed across tasks.

    Each draw picks a task with probability given by :func:`mixing_rates` (examples-
    proportional, each task's size capped at ``limit`` when given), then takes that task's
    next example. Every task is walked in epochs, each a fresh seeded permutation, so within
    a task every example is seen once before any is repeated.

    The stream is a pure function of ``(examples, limit, seed)``: ``iterate(start)`` resumes
    at draw ``start`` by replaying the draws before it (cheap: no example is copied).
    """

    def __init__(
        self, examples_by_task: Mapping[str, Sequence[Example]], limit: int | None = None, seed: int = 0
    ) -> None:
        if not examples_by_task:
            raise UserError("a task mixture needs at least one task")
        empty = [name for name, examples in examples_by_task.items() if not examples]
        if empty:
            raise UserError(f"task {empty[0]} has no examples to mix")
        self.examples = {name: list(examples) for name, examples in examples_by_task.items()}
        self.seed = seed
        self.rates = mixing_rates({n: len(e) for n, e in self.examples.items()}, limit)
        self._names = list(self.rates)
        cumulative, total = [], 0.0
        for name in self._names:
            total += self.rates[name]
            cumulative.append(total)
        self._cumulative = cumulative

    def iterate(self, start: int = 0) -> Iterator[Example]:
        """Examples from draw number ``start`` (0-based) on, forever."""
        choose = random.Random(f"samlm-mixture:{self.seed}")
        streams = {name: self._task_stream(name) for name in self._names}
        draw = 0
        while True:
            index = bisect.bisect_right(self._cumulative, choose.random() * self._cumulative[-1])
            name = self._names[min(index, len(self._names) - 1)]
            example = next(streams[name])
            if draw >= start:
                yield example
            draw += 1

    def take(self, count: int, start: int = 0) -> list[Example]:
        """``count`` examples from draw ``start`` on."""
        stream = self.iterate(start)
        return [next(stream) for _ in range(count)]

    def __iter__(self) -> Iterator[Example]:
        return self.iterate(0)

    def _task_stream(self, name: str) -> Iterator[Example]:
        examples = self.examples[name]
        epoch = 0
        while True:
            order = list(range(len(examples)))
            random.Random(f"samlm-mixture:{self.seed}:{name}:{epoch}").shuffle(order)
            for i in order:
                yield examples[i]
            epoch += 1
