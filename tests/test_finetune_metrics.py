"""Fine-tuning metrics against values computed by hand (in the comments), x100 like T5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samlm.data import (
    INVALID,
    Example,
    benchmark_average,
    compute_metrics,
    exact_match,
    generic_task,
    get_task,
    load_generic,
    load_task,
    postprocess_generation,
    squad_normalize,
    task_names,
    task_score,
    token_f1,
)
from samlm.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"


def _labelled(task: str, labels: list) -> list[Example]:
    return [
        Example(uid=f"{task}:validation:{i}", task=task, inputs="", target="", label=label)
        for i, label in enumerate(labels)
    ]


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------

# gold 1 1 1 1 1 0 0 0 vs predicted 1 1 1 0 0 1 0 0: TP=3, FN=2, FP=1, TN=2.
GOLD_8 = [1, 1, 1, 1, 1, 0, 0, 0]
PRED_8 = [1, 1, 1, 0, 0, 1, 0, 0]


def test_cola_matthews_correlation_of_a_two_by_two_table():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(4*5*3*4)
    expected = 100 * 4 / np.sqrt(240)  # 25.8199
    words = ["acceptable" if p else "unacceptable" for p in PRED_8]
    scores = compute_metrics("glue/cola", words, _labelled("glue/cola", GOLD_8))
    assert scores == {"mcc": pytest.approx(expected)}


def test_mrpc_f1_and_accuracy():
    # precision 3/4, recall 3/5 -> F1 = 2 * 0.45 / 1.35 = 2/3; accuracy 5/8
    scores = compute_metrics("glue/mrpc", PRED_8, _labelled("glue/mrpc", GOLD_8))
    assert scores == {"f1": pytest.approx(200 / 3), "accuracy": pytest.approx(62.5)}


def test_invalid_words_count_as_wrong_not_crash():
    # gold 1, 0; "banana" for the 0 is scored as a 1 for F1 (a false positive): P=1/2, R=1 -> 2/3
    scores = compute_metrics("glue/qqp", ["duplicate", "banana"], _labelled("glue/qqp", [1, 0]))
    assert scores == {"f1": pytest.approx(200 / 3), "accuracy": 50.0}
    # CoLA: an invalid answer to a gold 1 becomes a 0 -> gold 1 1 0 0, predicted 1 0 0 0:
    # TP=1, FN=1, TN=2, FP=0 -> MCC = 2 / sqrt(1*2*2*3) = 0.57735
    scores = compute_metrics(
        "glue/cola", ["acceptable", "???", "unacceptable", "unacceptable"], _labelled("glue/cola", [1, 1, 0, 0])
    )
    assert scores["mcc"] == pytest.approx(100 * 2 / np.sqrt(12))


def test_label_words_are_matched_exactly_after_stripping():
    task = "glue/cola"
    assert postprocess_generation(task, " acceptable\n") == 1
    assert postprocess_generation(task, "unacceptable") == 0
    assert postprocess_generation(task, "Acceptable") == INVALID  # T5 matches case-sensitively
    assert postprocess_generation(task, "") == INVALID


def test_cb_macro_f1_over_three_classes():
    # gold    e e c c n n   (0 0 1 1 2 2)
    # predict e c c c n e   (0 1 1 1 2 0)
    # entailment:    TP 1, FP 1, FN 1 -> F1 0.5
    # contradiction: TP 2, FP 1, FN 0 -> P 2/3, R 1 -> F1 0.8
    # neutral:       TP 1, FP 0, FN 1 -> P 1, R 1/2 -> F1 2/3
    expected = 100 * (0.5 + 0.8 + 2 / 3) / 3  # 65.556
    words = ["entailment", "contradiction", "contradiction", "contradiction", "neutral", "entailment"]
    scores = compute_metrics("superglue/cb", words, _labelled("superglue/cb", [0, 0, 1, 1, 2, 2]))
    assert scores == {"macro_f1": pytest.approx(expected), "accuracy": pytest.approx(400 / 6)}


def test_cb_invalid_prediction_is_a_miss_for_the_gold_class_only():
    # gold e c; predict e ??? -> entailment F1 1 (TP 1), contradiction F1 0 (FN 1), neutral F1 0
    scores = compute_metrics("superglue/cb", ["entailment", "???"], _labelled("superglue/cb", [0, 1]))
    assert scores["macro_f1"] == pytest.approx(100 / 3)


def test_multirc_f1a_and_exact_match_on_two_question_groups():
    examples = load_task("superglue/multirc", FIXTURES / "superglue", "validation")
    # question 0 options: gold 1 0 1, predicted 1 0 0 (one miss) -> not exact
    # question 1 options: gold 1 0,   predicted 1 0             -> exact
    # F1a over all 5 options: TP 2, FP 0, FN 1 -> P 1, R 2/3 -> F1 0.8; EM 1 of 2 questions
    predictions = ["True", "False", "False", 1, 0]
    scores = compute_metrics("superglue/multirc", predictions, examples)
    assert scores == {"f1a": pytest.approx(80.0), "em": 50.0}


def test_accuracy_accepts_numpy_integers_and_out_of_range_indices_are_wrong():
    scores = compute_metrics("superglue/wic", np.array([1, 0, 7]), _labelled("superglue/wic", [1, 1, 0]))
    assert scores == {"accuracy": pytest.approx(100 / 3)}


# --------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------


def test_stsb_pearson_and_spearman():
    # gold 1 2 3 4, predicted 1 3 2 4: deviations (-1.5 -.5 .5 1.5) and (-1.5 .5 -.5 1.5);
    # covariance sum 2.25 - .25 - .25 + 2.25 = 4; both variance sums 5 -> r = 0.8.
    # The ranks equal the values, so Spearman is 0.8 too.
    scores = compute_metrics("glue/stsb", ["1.0", "3.0", "2.0", "4.0"], _labelled("glue/stsb", [1.0, 2.0, 3.0, 4.0]))
    assert scores == {"pearson": pytest.approx(80.0), "spearman": pytest.approx(80.0)}


def test_stsb_pearson_differs_from_spearman_on_an_outlier():
    # predicted 1 2 3 10: ranks agree (Spearman 1); deviations (-3 -2 -1 6) -> covariance sum 14,
    # variance sums 5 and 50 -> r = 14 / sqrt(250) = 0.88544
    scores = compute_metrics("glue/stsb", [1.0, 2.0, 3.0, 10.0], _labelled("glue/stsb", [1.0, 2.0, 3.0, 4.0]))
    assert scores["pearson"] == pytest.approx(100 * 14 / np.sqrt(250))
    assert scores["spearman"] == pytest.approx(100.0)


def test_stsb_postprocessing():
    assert postprocess_generation("glue/stsb", " 3.8 ") == pytest.approx(3.8)
    assert postprocess_generation("glue/stsb", "similar") == -1.0  # T5's string_to_float default
    assert postprocess_generation("glue/stsb", "nan") == -1.0


def test_constant_predictions_give_zero_correlation_not_nan():
    scores = compute_metrics("glue/stsb", ["2.0"] * 3, _labelled("glue/stsb", [1.0, 2.0, 3.0]))
    assert scores == {"pearson": 0.0, "spearman": 0.0}


# --------------------------------------------------------------------------------------
# SQuAD-style answers
# --------------------------------------------------------------------------------------


def test_squad_normalization():
    assert squad_normalize("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert squad_normalize("an apple a day") == "apple day"


def test_token_f1_of_a_partial_overlap():
    # "eiffel tower in paris" vs "eiffel tower": 2 shared tokens, P 2/4, R 2/2 -> F1 2/3
    assert token_f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0


def _qa_examples(answer_sets: list[tuple[str, ...]]) -> list[Example]:
    return [
        Example(uid=f"cbqa/nq:validation:{i}", task="cbqa/nq", inputs="", target=a[0], answers=a)
        for i, a in enumerate(answer_sets)
    ]


def test_qa_scores_take_the_max_over_gold_answers():
    # against "tower in paris": 3 shared of 4 predicted, 3 gold -> P 3/4, R 1 -> F1 6/7
    examples = _qa_examples([("Eiffel Tower", "Tower in Paris")])
    scores = compute_metrics("cbqa/nq", ["the Eiffel Tower in Paris"], examples)
    assert scores == {"f1": pytest.approx(600 / 7), "em": 0.0}


def test_nq_fixture_f1_and_em():
    examples = load_task("cbqa/nq", FIXTURES / "cbqa", "validation")
    # 1: "December 1972" equals the second answer -> F1 1, EM 1
    # 2: "Bob" vs "Bob Russell": P 1, R 1/2 -> F1 2/3 (vs "Bobby Scott": 0), EM 0
    scores = compute_metrics("cbqa/nq", ["December 1972", "Bob"], examples)
    assert scores == {"f1": pytest.approx(100 * (1 + 2 / 3) / 2), "em": 50.0}


def test_record_max_over_answers():
    examples = load_task("superglue/record", FIXTURES / "superglue", "validation")
    # query 1 gold {Eiffel Tower}: "Tower" -> P 1, R 1/2 -> F1 2/3
    # query 2 gold {Eiffel Tower, Paris}: "Paris Hilton" vs "Paris" -> P 1/2, R 1 -> F1 2/3
    scores = compute_metrics("superglue/record", ["Tower", "Paris Hilton"], examples)
    assert scores == {"f1": pytest.approx(200 / 3), "em": 0.0}
    assert compute_metrics("superglue/record", ["the Eiffel Tower", "Paris."], examples) == {"f1": 100.0, "em": 100.0}


def test_record_per_answer_training_copies_count_once():
    examples = load_task("superglue/record", FIXTURES / "superglue", "train")
    assert len(examples) == 3  # query 2 has two copies
    # Only the first copy of each question is scored, like T5's deduplicate_metric.
    scores = compute_metrics("superglue/record", ["Eiffel Tower", "Paris", "garbage"], examples)
    assert scores == {"f1": 100.0, "em": 100.0}


def test_tydiqa_scores_padded_answers():
    examples = load_task("tydiqa/goldp", FIXTURES / "tydiqa", "validation")
    # "December 7, 1972" normalizes like the padded gold "December 7 , 1972" -> exact
    scores = compute_metrics("tydiqa/goldp", ["December 7, 1972", "Helsinki"], examples)
    assert scores == {"f1": 100.0, "em": 100.0}


# --------------------------------------------------------------------------------------
# Every task: perfect predictions score 100 on every official metric
# --------------------------------------------------------------------------------------


def _perfect_case(name: str) -> tuple[list, list[Example]]:
    task = get_task(name)
    if task.kind == "generation":
        examples = _qa_examples([("alpha beta",), ("gamma",), ("delta", "epsilon")])
        return [e.answers[-1] for e in examples], [
            Example(uid=e.uid.replace("cbqa/nq", name), task=name, inputs="", target=e.target, answers=e.answers)
            for e in examples
        ]
    if task.kind == "regression":
        examples = _labelled(name, [0.4, 2.2, 4.8, 1.0])
        return [str(e.label) for e in examples], examples
    labels = [i % len(task.labels) for i in range(2 * len(task.labels))]
    examples = [
        Example(uid=f"{name}:validation:{i}", task=name, inputs="", target="", label=y, group=f"q{i // 2}")
        for i, y in enumerate(labels)
    ]
    return [task.labels[y] for y in labels], examples


@pytest.mark.parametrize("name", task_names())
def test_perfect_predictions_score_100_on_every_metric(name):
    predictions, examples = _perfect_case(name)
    scores = compute_metrics(name, predictions, examples)
    assert list(scores) == list(get_task(name).metrics)
    assert scores == pytest.approx({metric: 100.0 for metric in scores})


def test_generic_task_metrics():
    task = generic_task("classification", ["ham", "spam"])
    # gold ham spam spam, predicted ham ham spam: accuracy 2/3;
    # ham: P 1/2, R 1 -> F1 2/3; spam: P 1, R 1/2 -> F1 2/3; macro 2/3
    scores = compute_metrics(task, ["ham", "ham", "spam"], _labelled("generic", [0, 1, 1]))
    assert scores == {"accuracy": pytest.approx(200 / 3), "macro_f1": pytest.approx(200 / 3)}
    examples = load_generic(
        FIXTURES / "generic" / "qa.jsonl", "input=question,target=answer,answers=aliases", "generation"
    )
    assert compute_metrics(generic_task("generation"), ["paris", "Shakespeare"], examples) == {"f1": 100.0, "em": 100.0}


# --------------------------------------------------------------------------------------
# Averages
# --------------------------------------------------------------------------------------


SUPERGLUE_SCORES = {
    "superglue/boolq": {"accuracy": 80.0},
    "superglue/cb": {"macro_f1": 70.0, "accuracy": 90.0},  # task mean 80
    "superglue/copa": {"accuracy": 60.0},
    "superglue/multirc": {"f1a": 70.0, "em": 30.0},  # 50
    "superglue/record": {"f1": 90.0, "em": 80.0},  # 85
    "superglue/rte:validation": {"accuracy": 75.0},  # the split-qualified key works too
    "superglue/wic": {"accuracy": 65.0},
    "superglue/wsc": {"accuracy": 65.0, "loss": 0.3},  # extra keys are ignored
}


def test_superglue_average_of_per_task_means():
    # (80 + 80 + 60 + 50 + 85 + 75 + 65 + 65) / 8 = 70
    assert benchmark_average(SUPERGLUE_SCORES, "superglue") == pytest.approx(70.0)
    assert task_score("superglue/cb", SUPERGLUE_SCORES["superglue/cb"]) == 80.0


def test_glue_average_counts_mnli_matched_and_mismatched_as_one_task():
    scores = {
        "glue/cola": {"mcc": 50.0},
        "glue/sst2": {"accuracy": 90.0},
        "glue/mrpc": {"f1": 90.0, "accuracy": 80.0},  # 85
        "glue/stsb": {"pearson": 88.0, "spearman": 86.0},  # 87
        "glue/qqp": {"f1": 70.0, "accuracy": 80.0},  # 75
        "glue/mnli:validation_matched": {"accuracy": 84.0},
        "glue/mnli:validation_mismatched": {"accuracy": 86.0},  # MNLI 85
        "glue/qnli": {"accuracy": 90.0},
        "glue/rte": {"accuracy": 70.0},
        "glue/wnli": {"accuracy": 0.0},  # not part of T5's GLUE average
    }
    # (50 + 90 + 85 + 87 + 75 + 85 + 90 + 70) / 8 = 79 (nine separate tasks would give 79.67)
    assert benchmark_average(scores, "glue") == pytest.approx(79.0)


def test_average_with_a_missing_task_or_metric():
    partial = {k: v for k, v in SUPERGLUE_SCORES.items() if k != "superglue/copa"}
    with pytest.raises(UserError, match="the superglue average needs scores for superglue/copa:validation"):
        benchmark_average(partial, "superglue")
    broken = dict(SUPERGLUE_SCORES, **{"superglue/cb": {"accuracy": 90.0}})
    with pytest.raises(UserError, match="superglue/cb: scores lack metric 'macro_f1'"):
        benchmark_average(broken, "superglue")
    with pytest.raises(UserError, match="unknown benchmark"):
        benchmark_average(SUPERGLUE_SCORES, "squad")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_prediction_count_must_match():
    with pytest.raises(UserError, match="glue/rte: got 1 predictions for 2 examples"):
        compute_metrics("glue/rte", [0], _labelled("glue/rte", [0, 1]))


def test_unlabelled_examples_cannot_be_scored():
    examples = load_task("glue/rte", FIXTURES / "glue", "test")
    with pytest.raises(UserError, match=r"example glue/rte:test:0 has no gold label"):
        compute_metrics("glue/rte", [0], examples)


def test_prediction_types_are_checked():
    with pytest.raises(UserError, match="must be class indices or generated strings, got float"):
        compute_metrics("glue/rte", [0.7], _labelled("glue/rte", [0]))
    with pytest.raises(UserError, match="must be generated strings, got int"):
        compute_metrics("cbqa/nq", [3], _qa_examples([("a",)]))


def test_unknown_task_in_metrics():
    with pytest.raises(UserError, match="unknown task 'glue/sts'"):
        compute_metrics("glue/sts", [], [])
