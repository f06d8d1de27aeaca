"""Official metrics of the fine-tuning tasks, scaled x100 as T5 reports them.

| metric key | meaning | tasks |
|---|---|---|
| ``accuracy`` | % correct | most classification tasks |
| ``f1`` (classification) | binary F1 of class 1 | MRPC, QQP |
| ``mcc`` | Matthews correlation | CoLA |
| ``pearson`` / ``spearman`` | correlation with the gold score | STS-B |
| ``macro_f1`` | unweighted mean of per-class F1 | CB |
| ``f1a`` / ``em`` | F1 over all answer options / % questions with every option right | MultiRC |
| ``f1`` / ``em`` (generation) | SQuAD token F1 / exact match, max over answers | ReCoRD, QA |

Predictions are class indices or generated strings for classification tasks, floats or
strings for STS-B, and strings for generation tasks. A generated string that is not one of
the task's label words counts as wrong (index -1); for binary F1 and MCC it is scored as the
opposite of the gold label, as T5's ``f1_score_with_invalid`` does. An unparseable STS-B
string becomes -1.0 (T5's ``string_to_float`` default). STS-B is correlated with the raw
gold score (GLUE's definition; T5 compared with its 0.2-rounded target strings, a tiny
difference). A correlation that is undefined (constant predictions or gold) is reported as 0.

:func:`benchmark_average` averages per-task means over the tasks of GLUE or SuperGLUE, as
``t5.evaluation.eval_utils.compute_avg_glue`` does (MNLI matched and mismatched count as one
task; WNLI is not in the GLUE average).
"""

from __future__ import annotations

import math
import operator
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from samlm.data.formats import Example
from samlm.data.tasks import CLASSIFICATION, GENERATION, REGRESSION, Task, get_task
from samlm.errors import UserError

__all__ = [
    "INVALID",
    "compute_metrics",
    "postprocess_generation",
    "squad_normalize",
    "exact_match",
    "token_f1",
    "task_score",
    "benchmark_average",
    "AVERAGED_TASKS",
]

INVALID = -1  # class index of a generated string that is no label word

# Tasks in each benchmark's average, as in T5's compute_avg_glue.
AVERAGED_TASKS: dict[str, tuple[str, ...]] = {
    "glue": ("glue/cola", "glue/sst2", "glue/mrpc", "glue/stsb", "glue/qqp", "glue/mnli", "glue/qnli", "glue/rte"),
    "superglue": (
        "superglue/boolq",
        "superglue/cb",
        "superglue/copa",
        "superglue/multirc",
        "superglue/record",
        "superglue/rte",
        "superglue/wic",
        "superglue/wsc",
    ),
}


# --------------------------------------------------------------------------------------
# Generated text -> prediction
# --------------------------------------------------------------------------------------


def postprocess_generation(task: str | Task, text: str) -> int | float | str:
    """Map a generated string to the task's prediction type.

    Classification: the index of the label word (exact match after stripping whitespace, as
    T5's ``string_label_to_class_id``), or :data:`INVALID` (-1) for anything else.
    Regression (STS-B): the float, or -1.0 if it does not parse. Generation: the stripped text.
    """
    task = get_task(task)
    text = str(text).strip()
    if task.kind == CLASSIFICATION:
        return task.labels.index(text) if text in task.labels else INVALID
    if task.kind == REGRESSION:
        try:
            value = float(text)
        except ValueError:
            return -1.0
        return value if math.isfinite(value) else -1.0
    return text


def _class_prediction(task: Task, prediction: Any) -> int:
    if isinstance(prediction, str):
        return int(postprocess_generation(task, prediction))
    try:
        index = operator.index(prediction)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise UserError(
            f"predictions for {task.name} must be class indices or generated strings, got {type(prediction).__name__}"
        ) from None
    return index if 0 <= index < len(task.labels) else INVALID


def _score_prediction(task: Task, prediction: Any) -> float:
    if isinstance(prediction, str):
        return float(postprocess_generation(task, prediction))
    try:
        value = float(prediction)
    except (TypeError, ValueError):
        raise UserError(
            f"predictions for {task.name} must be numbers or generated strings, got {type(prediction).__name__}"
        ) from None
    return value if math.isfinite(value) else -1.0


# --------------------------------------------------------------------------------------
# SQuAD-style answer scoring
# --------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 normalization: lower case, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(squad_normalize(prediction) == squad_normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 in [0, 1] between the normalized strings (0 when nothing overlaps)."""
    predicted = squad_normalize(prediction).split()
    expected = squad_normalize(gold).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _squad_scores(predictions: Sequence[str], answer_sets: Sequence[Sequence[str]]) -> dict[str, float]:
    f1 = [max(token_f1(p, a) for a in answers) for p, answers in zip(predictions, answer_sets)]
    em = [max(exact_match(p, a) for a in answers) for p, answers in zip(predictions, answer_sets)]
    return {"f1": 100 * float(np.mean(f1)), "em": 100 * float(np.mean(em))}


# --------------------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------------------


def compute_metrics(task: str | Task, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
    """The task's official metrics (x100) of ``predictions`` against ``examples``' gold labels.

    ``predictions[i]`` is the prediction for ``examples[i]``. Returns a dict with exactly the
    keys in ``get_task(task).metrics``.
    """
    task = get_task(task)
    predictions = list(predictions)
    if len(predictions) != len(examples):
        raise UserError(f"{task.name}: got {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise UserError(f"{task.name}: no examples to score")
    if task.kind == GENERATION:
        return _generation_metrics(task, predictions, examples)
    if task.kind == REGRESSION:
        return _regression_metrics(task, predictions, examples)
    gold = np.array([_gold_label(task, e) for e in examples], dtype=int)
    predicted = np.array([_class_prediction(task, p) for p in predictions], dtype=int)
    scores = {name: _CLASSIFICATION_METRICS[name](gold, predicted, task, examples) for name in task.metrics}
    return {name: float(value) for name, value in scores.items()}


def _gold_label(task: Task, example: Example) -> int | float:
    if example.label is None:
        raise UserError(f"{task.name}: example {example.uid} has no gold label (test splits are unlabelled)")
    return example.label


def _flip_invalid(gold: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Invalid predictions scored as the opposite of the gold label (binary tasks)."""
    return np.where(predicted == INVALID, 1 - gold, predicted)


# scipy.stats and sklearn.metrics take over a second to import, so each metric imports
# them when it runs rather than every `import samlm.data`.


def _accuracy(gold, predicted, task, examples) -> float:
    import sklearn.metrics

    return 100 * sklearn.metrics.accuracy_score(gold, predicted)


def _binary_f1(gold, predicted, task, examples) -> float:
    import sklearn.metrics

    return 100 * sklearn.metrics.f1_score(gold, _flip_invalid(gold, predicted), zero_division=0)


def _mcc(gold, predicted, task, examples) -> float:
    import sklearn.metrics

    return 100 * sklearn.metrics.matthews_corrcoef(gold, _flip_invalid(gold, predicted))


def _macro_f1(gold, predicted, task, examples) -> float:
    import sklearn.metrics

    # Invalid predictions are no class: a miss for the gold class, a false alarm for none.
    return 100 * sklearn.metrics.f1_score(
        gold, predicted, labels=range(len(task.labels)), average="macro", zero_division=0
    )


def _group_exact_match(gold, predicted, task, examples) -> float:
    """% of groups (MultiRC questions) whose every answer option is predicted right."""
    correct: dict[str, bool] = {}
    for example, g, p in zip(examples, gold, predicted):
        key = example.group or example.uid
        correct[key] = correct.get(key, True) and bool(g == p)
    return 100 * float(np.mean(list(correct.values())))


_CLASSIFICATION_METRICS = {
    "accuracy": _accuracy,
    "f1": _binary_f1,
    "f1a": _binary_f1,
    "mcc": _mcc,
    "macro_f1": _macro_f1,
    "em": _group_exact_match,
}


def _regression_metrics(task: Task, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
    import scipy.stats

    gold = np.array([_gold_label(task, e) for e in examples], dtype=float)
    predicted = np.array([_score_prediction(task, p) for p in predictions], dtype=float)
    return {
        "pearson": 100 * _correlation(scipy.stats.pearsonr, gold, predicted),
        "spearman": 100 * _correlation(scipy.stats.spearmanr, gold, predicted),
    }


def _correlation(statistic, gold: np.ndarray, predicted: np.ndarray) -> float:
    if len(gold) < 2 or np.ptp(gold) == 0 or np.ptp(predicted) == 0:
        return 0.0  # undefined; scipy would warn and return nan
    return float(statistic(gold, predicted)[0])


def _generation_metrics(task: Task, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
    texts, answer_sets, seen = [], [], set()
    for prediction, example in zip(predictions, examples):
        if not isinstance(prediction, str):
            raise UserError(f"predictions for {task.name} must be generated strings, got {type(prediction).__name__}")
        # Copies of one question (ReCoRD's per-answer training copies) count once, as T5's
        # deduplicate_metric does.
        if example.group is not None:
            if example.group in seen:
                continue
            seen.add(example.group)
        answers = example.answers or ((example.target,) if example.target else ())
        if not answers:
            raise UserError(f"{task.name}: example {example.uid} has no gold answers (test splits are unlabelled)")
        texts.append(prediction)
        answer_sets.append(answers)
    return _squad_scores(texts, answer_sets)


# --------------------------------------------------------------------------------------
# Averages
# --------------------------------------------------------------------------------------


def task_score(task: str | Task, metrics: Mapping[str, float]) -> float:
    """Mean of the task's official metrics (e.g. MRPC: (F1 + accuracy) / 2)."""
    task = get_task(task)
    missing = [m for m in task.metrics if m not in metrics]
    if missing:
        raise UserError(f"{task.name}: scores lack metric {missing[0]!r} (need {', '.join(task.metrics)})")
    return float(np.mean([metrics[m] for m in task.metrics]))


def benchmark_average(scores: Mapping[str, Mapping[str, float]], benchmark: str) -> float:
    """GLUE or SuperGLUE average of per-task means, as T5 computes it.

    ``scores`` maps ``"<task>"`` or ``"<task>:<eval split>"`` to that evaluation's metrics
    (the output of :func:`compute_metrics`). MNLI needs both
    ``"glue/mnli:validation_matched"`` and ``"glue/mnli:validation_mismatched"``; their
    accuracies are averaged into one task score. Other keys are ignored.
    """
    key = benchmark.strip().lower().replace("super_glue", "superglue")
    if key not in AVERAGED_TASKS:
        raise UserError(f"unknown benchmark {benchmark!r}; use glue or superglue")
    task_means = []
    for name in AVERAGED_TASKS[key]:
        task = get_task(name)
        per_split = [task_score(task, _lookup(scores, task, split)) for split in task.eval_splits]
        task_means.append(float(np.mean(per_split)))
    return float(np.mean(task_means))


def _lookup(scores: Mapping[str, Mapping[str, float]], task: Task, split: str) -> Mapping[str, float]:
    keys = [f"{task.name}:{split}"] + ([task.name] if len(task.eval_splits) == 1 else [])
    for key in keys:
        if key in scores:
            return scores[key]
    raise UserError(f"the {task.benchmark} average needs scores for {keys[0]}")
