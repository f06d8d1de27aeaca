"""Fine-tuning data layer: task registry, official file formats, subsampling, mixtures, errors.

Fixtures under tests/fixtures/finetune/ are small hand-written files in each benchmark's
official layout; error cases write their own broken files into tmp_path.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samlm.data import (
    MIXTURES,
    Example,
    MixtureSampler,
    demo_data_dir,
    get_task,
    load_generic,
    load_task,
    mixing_rates,
    parse_column_mapping,
    parse_mixture,
    stsb_target,
    subsample,
    task_names,
)
from samlm.data.official import parse_webquestions_target
from samlm.data.tasks import mark_wsc_spans, pad_punctuation
from samlm.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"
GLUE = FIXTURES / "glue"
SUPERGLUE = FIXTURES / "superglue"


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_registry_has_every_task_of_the_study():
    expected = {
        "glue/cola",
        "glue/sst2",
        "glue/mrpc",
        "glue/stsb",
        "glue/qqp",
        "glue/mnli",
        "glue/qnli",
        "glue/rte",
        "glue/wnli",
        "superglue/boolq",
        "superglue/cb",
        "superglue/copa",
        "superglue/multirc",
        "superglue/record",
        "superglue/rte",
        "superglue/wic",
        "superglue/wsc",
        "cbqa/nq",
        "cbqa/webquestions",
        "cbqa/triviaqa",
        "tydiqa/goldp",
    }
    assert set(task_names()) == expected


@pytest.mark.parametrize(
    "name, kind, labels, metrics",
    [
        ("glue/cola", "classification", ("unacceptable", "acceptable"), ("mcc",)),
        ("glue/mrpc", "classification", ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        ("glue/qqp", "classification", ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        ("glue/stsb", "regression", (), ("pearson", "spearman")),
        ("glue/mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",)),
        ("glue/wnli", "classification", ("not_entailment", "entailment"), ("accuracy",)),
        ("superglue/cb", "classification", ("entailment", "contradiction", "neutral"), ("macro_f1", "accuracy")),
        ("superglue/multirc", "classification", ("False", "True"), ("f1a", "em")),
        ("superglue/record", "generation", (), ("f1", "em")),
        ("cbqa/nq", "generation", (), ("f1", "em")),
        ("tydiqa/goldp", "generation", (), ("f1", "em")),
    ],
)
def test_task_metadata(name, kind, labels, metrics):
    task = get_task(name)
    assert (task.kind, task.labels, task.metrics) == (kind, labels, metrics)


def test_mnli_evaluates_on_matched_and_mismatched():
    task = get_task("glue/mnli")
    assert task.eval_splits == ("validation_matched", "validation_mismatched")
    assert "validation" not in task.splits


def test_task_names_are_case_insensitive():
    assert get_task("GLUE/RTE").name == "glue/rte"


def test_glue_mixture_leaves_out_wnli_like_t5():
    assert "glue/wnli" not in MIXTURES["glue"] and len(MIXTURES["glue"]) == 8
    assert len(MIXTURES["superglue"]) == 8


def test_num_labels_is_the_classifier_output_size():
    assert get_task("glue/mnli").num_labels == 3
    assert get_task("glue/stsb").num_labels == 1
    assert get_task("cbqa/nq").num_labels == 0


# --------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------


def test_cola_train_has_no_header_and_four_columns():
    examples = load_task("glue/cola", GLUE, "train")
    assert len(examples) == 3  # no line was taken for a header
    first = examples[1]
    assert first.inputs == "cola sentence: They drank the pub."
    assert (first.target, first.label) == ("unacceptable", 0)
    assert examples[0].target == "acceptable"
    assert (first.text_a, first.text_b) == ("They drank the pub.", None)
    assert first.uid == "glue/cola:train:1"


def test_cola_test_split_has_a_header_and_no_labels():
    [example] = load_task("glue/cola", GLUE, "test")
    assert example.inputs == "cola sentence: Bill whistled past the house."
    assert (example.label, example.target) == (None, "")


def test_sst2_keeps_the_sentence_verbatim():
    examples = load_task("glue/sst2", GLUE, "train")
    assert examples[0].inputs == "sst2 sentence: hide new secretions from the parental units "
    assert [e.target for e in examples] == ["negative", "positive"]


def test_mrpc_raw_microsoft_file_with_byte_order_mark():
    raw = (GLUE / "MRPC" / "msr_paraphrase_train.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the fixture really has the BOM
    examples = load_task("glue/mrpc", GLUE, "train")
    assert [e.label for e in examples] == [1, 0]
    assert examples[0].target == "equivalent"
    # QUOTE_NONE: the double quotes inside the sentence stay as they are.
    assert examples[0].fields["sentence1"].startswith('Amrozi accused his brother , whom he called " the')
    assert examples[0].inputs.startswith("mrpc sentence1: Amrozi accused")
    assert ' sentence2: Referring to him as only " the witness "' in examples[0].inputs


def test_mrpc_dev_tsv_with_bom_and_unlabelled_test():
    [dev] = load_task("glue/mrpc", GLUE, "validation")
    assert dev.target == "equivalent"
    [test] = load_task("glue/mrpc", GLUE / "MRPC", "test")  # the task directory itself
    assert test.label is None and test.text_b.startswith("Current Chief Operating Officer")


def test_stsb_targets_round_to_a_fifth_like_t5():
    examples = load_task("glue/stsb", GLUE, "train")
    assert [e.label for e in examples] == [5.0, 3.8, 2.5, 0.75]
    # 2.5 * 5 = 12.5 rounds half-to-even to 12 -> "2.4"; 0.75 * 5 = 3.75 -> 4 -> "0.8".
    assert [e.target for e in examples] == ["5.0", "3.8", "2.4", "0.8"]
    assert examples[1].inputs == (
        "stsb sentence1: A man is playing a large flute. sentence2: A man is playing a flute."
    )


# Halves round to even like tf.round: 9.5 -> 10, 16.5 -> 16, 20.5 -> 20, 22.5 -> 22, 0.5 -> 0.
@pytest.mark.parametrize(
    "score, text",
    [(0.0, "0.0"), (1.9, "2.0"), (3.3, "3.2"), (4.1, "4.0"), (4.5, "4.4"), (3.76, "3.8"), (5.0, "5.0"), (0.1, "0.0")],
)
def test_stsb_target_strings(score, text):
    assert stsb_target(score) == text


def test_qqp_and_qnli_and_wnli_formats():
    qqp = load_task("glue/qqp", GLUE, "train")
    assert qqp[1].inputs == (
        "qqp question1: How do I control my horny emotions? question2: How do you control your horniness?"
    )
    assert [e.target for e in qqp] == ["not_duplicate", "duplicate"]
    [qnli] = load_task("glue/qnli", GLUE, "validation")
    assert qnli.inputs.startswith("qnli question: What came into force") and " sentence: As of" in qnli.inputs
    wnli = load_task("glue/wnli", GLUE, "train")
    assert [e.target for e in wnli] == ["entailment", "entailment", "not_entailment"]


def test_mnli_matched_and_mismatched_dev_files():
    matched = load_task("glue/mnli", GLUE, "validation_matched")
    mismatched = load_task("glue/mnli", GLUE, "validation_mismatched")
    assert [e.target for e in matched] == ["neutral", "contradiction"]
    assert [e.target for e in mismatched] == ["contradiction"]
    # T5 sorts the feature names: hypothesis before premise.
    assert matched[0].inputs == (
        "mnli hypothesis: Everyone really likes the newest benefits  premise: The new rights are nice enough"
    )
    assert (matched[0].text_a, matched[0].text_b) == (
        "The new rights are nice enough",
        "Everyone really likes the newest benefits ",
    )
    assert mismatched[0].uid == "glue/mnli:validation_mismatched:0"
    [train] = load_task("glue/mnli", GLUE, "train")  # 12-column train file
    assert train.target == "neutral"


def test_rte_splits_and_pair_view():
    train = load_task("glue/rte", GLUE, "train")
    assert train[2].inputs == (
        "rte sentence1: Herceptin was already approved to treat the sickest "
        "breast cancer patients. sentence2: Herceptin can be used to treat "
        "breast cancer."
    )
    assert [e.label for e in train] == [1, 1, 0]
    [test] = load_task("glue/rte", GLUE, "test")
    assert test.label is None and test.target == ""


def test_glue_root_and_task_directory_both_work():
    from_root = load_task("glue/rte", GLUE, "validation")
    from_task_dir = load_task("glue/rte", GLUE / "RTE", "validation")
    assert from_root == from_task_dir


def test_demo_data_loads():
    for name in ("glue/rte", "glue/sst2"):
        train = load_task(name, demo_data_dir(), "train")
        dev = load_task(name, demo_data_dir(), "validation")
        assert len(train) >= 10 and len(dev) >= 6
        assert {e.label for e in train} == {0, 1}


# --------------------------------------------------------------------------------------
# SuperGLUE
# --------------------------------------------------------------------------------------


def test_boolq_booleans_become_false_true():
    examples = load_task("superglue/boolq", SUPERGLUE, "validation")
    assert [(e.label, e.target) for e in examples] == [(0, "False"), (1, "True")]
    assert examples[1].inputs == (
        "boolq passage: Property tax -- Property tax or 'house tax' is a local tax on buildings. "
        "question: is house tax and property tax are same"
    )
    assert examples[1].text_a == "is house tax and property tax are same"


def test_cb_label_words_and_order():
    examples = load_task("superglue/cb", SUPERGLUE, "validation")
    assert [e.label for e in examples] == [1, 0, 2]  # contradiction, entailment, neutral
    assert examples[2].inputs == (
        "cb hypothesis: she had the nerve to go ahead premise: She "
        "swallowed hard, unsure if she had the nerve to go ahead."
    )


def test_copa_sorted_fields_and_choice_targets():
    example = load_task("superglue/copa", SUPERGLUE, "validation")[0]
    assert example.inputs == (
        "copa choice1: The toilet filled with water. choice2: Water flowed "
        "from the spout. premise: The man turned on the faucet. question: effect"
    )
    assert example.target == "choice2"


def test_superglue_rte_and_wic():
    [rte] = load_task("superglue/rte", SUPERGLUE, "validation")
    assert rte.inputs.startswith("rte hypothesis: Christopher Reeve had an accident. premise: Dana")
    assert rte.target == "not_entailment"
    [wic] = load_task("superglue/wic", SUPERGLUE, "validation")
    assert wic.inputs == (
        "wic sentence1: Do you want to come over to my place later? sentence2: "
        "A political system with no place for the less prominent groups. word: place"
    )
    assert wic.target == "False"
    assert wic.text_a == "place: Do you want to come over to my place later?"


def test_multirc_one_example_per_answer_grouped_by_question():
    examples = load_task("superglue/multirc", SUPERGLUE, "validation")
    assert len(examples) == 5
    assert [e.label for e in examples] == [1, 0, 1, 1, 0]
    groups = [e.group for e in examples]
    assert groups[:3] == ["superglue/multirc:validation:0-0"] * 3
    assert groups[3:] == ["superglue/multirc:validation:0-1"] * 2
    assert examples[3].uid == "superglue/multirc:validation:0-1-3"
    # HTML markup removed as T5 does: <br> -> space, <b>/</b> dropped.
    assert examples[0].inputs == (
        "multirc question: Who did Susan call? answer: Her friends paragraph: Sent 1: Susan wanted "
        "to have a birthday party. Sent 2: She called all of her friends. "
    )
    assert "<" not in examples[0].text_a


def test_record_validation_one_example_per_query_with_all_answers():
    examples = load_task("superglue/record", SUPERGLUE, "validation")
    assert len(examples) == 2
    second = examples[1]
    assert second.answers == ("Eiffel Tower", "Paris")  # sorted, as TFDS stores them
    assert second.target == "Eiffel Tower"
    # Entity ends are inclusive; entities are deduplicated and sorted; highlights become sentences.
    assert second.inputs == (
        "record query: Millions visit @placeholder. entities: Eiffel Tower, Paris, Workers "
        "passage: The Eiffel Tower was painted in Paris. Workers repainted the Eiffel Tower. "
        "Paris hosts millions"
    )


def test_record_training_split_has_one_example_per_answer():
    examples = load_task("superglue/record", SUPERGLUE, "train")
    assert [(e.uid.rsplit(":", 1)[1], e.target) for e in examples] == [
        ("7-0#0", "Eiffel Tower"),
        ("7-1#0", "Eiffel Tower"),
        ("7-1#1", "Paris"),
    ]
    assert examples[1].group == examples[2].group != examples[0].group


def test_wsc_spans_are_marked_like_t5():
    examples = load_task("superglue/wsc", SUPERGLUE, "validation")
    assert examples[0].inputs == (
        "wsc text: * Mark * told Pete many lies about himself, which "
        "Pete included in his book. # He # should have been more truthful."
    )
    # span 2 before span 1: no index shift
    assert examples[1].inputs == "wsc text: When # he # arrived, * Bob * was tired."
    assert examples[0].target == "True"
    [test] = load_task("superglue/wsc", SUPERGLUE, "test")
    assert test.label is None and "* trophy *" in test.inputs and "# it #" in test.inputs


def test_mark_wsc_spans_marks_nothing_where_the_span_is_not_at_its_index():
    fields = {"text": "a b c", "span1_text": "zzz", "span1_index": 1, "span2_text": "c", "span2_index": 2}
    # Like T5: span 1 is not found, yet span 2's index is still shifted by 2, so it is not
    # found either. The text passes through unmarked rather than failing.
    assert mark_wsc_spans(fields) == "a b c"


# --------------------------------------------------------------------------------------
# Closed-book QA and TyDiQA
# --------------------------------------------------------------------------------------


def test_nq_open_jsonl():
    examples = load_task("cbqa/nq", FIXTURES / "cbqa", "validation")
    assert examples[0].inputs == "nq question: when was the last time anyone was on the moon"
    assert examples[0].answers == ("14 December 1972 UTC", "December 1972")
    assert examples[0].target == "14 December 1972 UTC"


def test_nq_open_accepts_plain_dev_jsonl(tmp_path):
    (tmp_path / "dev.jsonl").write_text('{"question": "q?", "answer": ["a"]}\n')
    [example] = load_task("cbqa/nq", tmp_path, "validation")
    assert example.answers == ("a",)


def test_webquestions_answers_from_target_value():
    examples = load_task("cbqa/webquestions", FIXTURES / "cbqa", "train")
    assert examples[0].inputs == "wq question: what is the name of justin bieber brother?"
    assert examples[0].answers == ("Jazmyn Bieber", "Jaxon Bieber")
    assert examples[1].answers == ("Padmé",)  # bare, unquoted description
    assert examples[2].answers == ('The "Boss"',)  # escaped quotes


def test_parse_webquestions_target():
    assert parse_webquestions_target('(list (description "A B") (description C))') == ("A B", "C")
    assert parse_webquestions_target("(list)") == ()


def test_triviaqa_value_first_then_aliases():
    examples = load_task("cbqa/triviaqa", FIXTURES / "cbqa", "validation")
    assert examples[0].inputs.startswith("trivia_qa question: Which Lloyd Webber musical")
    assert examples[0].answers == ("Sunset Boulevard", "Sunset Blvd")
    assert examples[0].target == "Sunset Boulevard"
    assert examples[0].uid == "cbqa/triviaqa:validation:tc_33"


def test_tydiqa_goldp_pads_punctuation_like_mt5():
    examples = load_task("tydiqa/goldp", FIXTURES / "tydiqa", "validation")
    english, finnish = examples
    assert english.inputs == (
        "question: When did Apollo 17 launch ? context: Apollo 17 ( December 7 - 19 , 1972 ) was "
        "the final mission of NASA ' s Apollo program ."
    )
    assert english.answers == ("December 7 , 1972", "December 7")
    assert english.fields["language"] == "english"
    # letters with diacritics are not split (mT5 pads only non-letter/number/mark characters)
    assert finnish.inputs == "question: Mikä on Suomen pääkaupunki ? context: Helsinki on Suomen pääkaupunki ."
    assert (finnish.text_a, finnish.text_b) == ("Mikä on Suomen pääkaupunki?", "Helsinki on Suomen pääkaupunki.")


def test_pad_punctuation_keeps_underscores_and_accents():
    assert pad_punctuation("François_x (1.5)") == "François_x ( 1 . 5 ) "


# --------------------------------------------------------------------------------------
# The hub path (datasets.load_dataset monkeypatched; nothing is downloaded)
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []
    tables: dict[tuple, dict] = {}

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(tables[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hub_glue_rte(fake_hub):
    tables, calls = fake_hub
    tables[("nyu-mll/glue", "rte", "validation")] = {
        "sentence1": ["A dog ran.", "It rained."],
        "sentence2": ["An animal ran.", "It was dry."],
        "label": [0, 1],
        "idx": [0, 1],
    }
    examples = load_task("glue/rte", split="validation")
    assert calls == [("nyu-mll/glue", "rte", "validation")]
    assert examples[0].inputs == "rte sentence1: A dog ran. sentence2: An animal ran."
    assert [e.target for e in examples] == ["entailment", "not_entailment"]


def test_hub_test_split_labels_of_minus_one_are_unlabelled(fake_hub):
    tables, _ = fake_hub
    tables[("nyu-mll/glue", "stsb", "test")] = {"sentence1": ["a"], "sentence2": ["b"], "label": [-1.0], "idx": [0]}
    [example] = load_task("glue/stsb", split="test")
    assert example.label is None and example.target == ""


def test_hub_and_local_files_give_the_same_examples(fake_hub):
    tables, _ = fake_hub
    local = load_task("superglue/multirc", SUPERGLUE, "validation")
    tables[("aps/super_glue", "multirc", "validation")] = {
        "paragraph": [e.fields["paragraph"] for e in local],
        "question": [e.fields["question"] for e in local],
        "answer": [e.fields["answer"] for e in local],
        "idx": [{"paragraph": 0, "question": q, "answer": a} for q, a in [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]],
        "label": [e.label for e in local],
    }
    assert load_task("superglue/multirc", split="validation") == local


def test_hub_qa_datasets(fake_hub):
    tables, _ = fake_hub
    tables[("mandarjoshi/trivia_qa", "rc.nocontext", "validation")] = {
        "question": ["Who?"],
        "question_id": ["tc_1"],
        "answer": [{"value": "Ann", "aliases": ["Ann", "Annie"]}],
    }
    tables[("google-research-datasets/tydiqa", "secondary_task", "validation")] = {
        "id": ["english-1-0"],
        "title": ["t"],
        "question": ["Who?"],
        "context": ["Ann did."],
        "answers": [{"text": ["Ann"], "answer_start": [0]}],
    }
    tables[("google-research-datasets/nq_open", "nq_open", "train")] = {
        "question": ["where?"],
        "answer": [["here", "there"]],
    }
    tables[("Stanford/web_questions", None, "test")] = {"url": ["u"], "question": ["what?"], "answers": [["x"]]}
    assert load_task("cbqa/triviaqa", split="validation")[0].answers == ("Ann", "Annie")
    tables[("mandarjoshi/trivia_qa", "rc.nocontext", "test")] = {
        "question": ["Who?"],
        "question_id": ["tc_2"],
        "answer": [{"value": "<unk>", "aliases": []}],
    }
    [unanswered] = load_task("cbqa/triviaqa", split="test")
    assert (unanswered.answers, unanswered.target) == ((), "")
    assert load_task("tydiqa/goldp", split="validation")[0].inputs == "question: Who ? context: Ann did ."
    assert load_task("cbqa/nq", split="train")[0].target == "here"
    assert load_task("cbqa/webquestions", split="test")[0].inputs == "wq question: what?"


def test_hub_failure_is_a_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        UserError,
        match=r"could not load glue/rte train from the Hugging Face hub "
        r"nyu-mll/glue \(rte\): ConnectionError: Couldn't reach",
    ):
        load_task("glue/rte")


def test_hub_dataset_with_missing_column(fake_hub):
    tables, _ = fake_hub
    tables[("nyu-mll/glue", "rte", "train")] = {"premise": ["a"], "label": [0]}
    with pytest.raises(UserError, match="lacks column 'sentence1'"):
        load_task("glue/rte")


# --------------------------------------------------------------------------------------
# Generic files with a column mapping
# --------------------------------------------------------------------------------------


def test_parse_column_mapping():
    assert parse_column_mapping("input=question, target=answer") == {"input": "question", "target": "answer"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("target=answer", "needs input=<column>"),
        ("input=q,input=r", "names 'input' twice"),
        ("input", "should look like key=column"),
        ("input=q,label=l", "unknown column-mapping key 'label'"),
    ],
)
def test_parse_column_mapping_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_column_mapping(spec)


def test_generic_jsonl_generation():
    examples = load_generic(
        FIXTURES / "generic" / "qa.jsonl", "input=question,target=answer,answers=aliases,id=id", "generation"
    )
    assert examples[0].uid == "generic:q1"
    assert (examples[0].inputs, examples[0].target) == ("What is the capital of France?", "Paris")
    assert examples[0].answers == ("Paris", "City of Light")
    assert examples[1].answers == ("Shakespeare", "William Shakespeare")


def test_generic_csv_classification_with_quoted_multiline_field():
    path = FIXTURES / "generic" / "sentiment.csv"
    examples = load_generic(
        path, {"input": "text", "target": "label"}, "classification", labels=["negative", "positive"]
    )
    assert [e.inputs for e in examples] == ["Great, really great", "Boring.\nVery boring", "Fine I guess"]
    assert [e.label for e in examples] == [1, 0, 1]  # words and indices both accepted
    assert [e.uid for e in examples] == [
        "generic:sentiment.csv:2",
        "generic:sentiment.csv:3",
        "generic:sentiment.csv:5",
    ]  # line where each row starts


def test_generic_text_pairs_and_regression(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\tscore\nx y\tz\t0.25\n")
    [example] = load_generic(path, "input=a,input2=b,target=score", "regression")
    assert example.inputs == "a: x y b: z"
    assert (example.text_a, example.text_b, example.label, example.target) == ("x y", "z", 0.25, "0.25")


# --------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------


def _examples(n: int, groups: int | None = None) -> list[Example]:
    return [
        Example(
            uid=f"t:train:{i}", task="t", inputs=str(i), target="", group=None if groups is None else f"g{i % groups}"
        )
        for i in range(n)
    ]


def test_subsample_is_deterministic_and_keeps_the_rate():
    examples = _examples(1000)
    first = subsample(examples, 0.05, seed=3)
    assert first == subsample(examples, 0.05, seed=3)
    assert len(first) == 50
    assert first != subsample(examples, 0.05, seed=4)
    # original order kept, no repeats
    positions = [int(e.inputs) for e in first]
    assert positions == sorted(set(positions))


@pytest.mark.parametrize("n, rate, kept", [(250, 0.02, 5), (10, 0.25, 3), (10, 0.35, 4), (3, 0.01, 1), (7, 1.0, 7)])
def test_subsample_sizes_round_half_up_with_at_least_one(n, rate, kept):
    assert len(subsample(_examples(n), rate, seed=0)) == kept


def test_smaller_rates_are_subsets_of_larger_ones():
    examples = _examples(400)
    sizes = [0.02, 0.05, 0.2, 0.8]
    samples = [{e.uid for e in subsample(examples, r, seed=11)} for r in sizes]
    assert all(a < b for a, b in zip(samples, samples[1:]))


def test_subsample_keeps_groups_whole():
    examples = _examples(60, groups=20)  # 20 groups of 3
    sample = subsample(examples, 0.25, seed=1)
    counts = collections.Counter(e.group for e in sample)
    assert len(counts) == 5 and set(counts.values()) == {3}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), rate=st.floats(0.001, 1.0), seed=st.integers(0, 2**32))
def test_subsample_properties(n, rate, seed):
    examples = _examples(n)
    sample = subsample(examples, rate, seed)
    assert len(sample) == max(1, math.floor(rate * n + 0.5))
    assert sample == subsample(examples, rate, seed)
    positions = [int(e.inputs) for e in sample]
    assert positions == sorted(set(positions))  # a subset, in the original order


def test_examples_are_hashable():
    examples = load_task("glue/rte", GLUE, "train")
    assert len(set(examples + examples)) == 3


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, 20, float("nan"), True])
def test_subsample_rejects_rates_outside_zero_one(rate):
    with pytest.raises(UserError, match="rate must be in"):
        subsample(_examples(10), rate, seed=0)


def test_subsample_suggests_a_fraction_for_percentages():
    with pytest.raises(UserError, match=r"did you mean 0.05\?"):
        subsample(_examples(10), 5, seed=0)


# --------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------


def test_parse_mixture_names_and_aliases():
    assert [t.name for t in parse_mixture("glue/rte, superglue/cb")] == ["glue/rte", "superglue/cb"]
    assert len(parse_mixture("superglue")) == 8
    with pytest.raises(UserError, match="names glue/rte twice"):
        parse_mixture("glue/rte,glue/rte")
    with pytest.raises(UserError, match="did you mean 'superglue/boolq'"):
        parse_mixture("glue/rte,superglue/bolq")


def test_mixing_rates_are_example_proportional_with_a_cap():
    assert mixing_rates({"a": 100, "b": 300}) == {"a": 0.25, "b": 0.75}
    # T5's examples-proportional limit K: sizes capped at K before normalising.
    assert mixing_rates({"a": 100, "b": 300, "c": 50}, limit=100) == {"a": 0.4, "b": 0.4, "c": 0.2}
    with pytest.raises(UserError, match="positive integer"):
        mixing_rates({"a": 1}, limit=0)


def _task_examples(name: str, n: int) -> list[Example]:
    return [Example(uid=f"{name}:train:{i}", task=name, inputs=f"{name} {i}", target="") for i in range(n)]


def test_mixture_sampler_proportions_and_determinism():
    data = {"a": _task_examples("a", 100), "b": _task_examples("b", 300)}
    sampler = MixtureSampler(data, seed=7)
    drawn = sampler.take(4000)
    share_a = sum(e.task == "a" for e in drawn) / len(drawn)
    assert abs(share_a - 0.25) < 0.03  # 4000 draws: standard error ~0.007
    assert [e.uid for e in MixtureSampler(data, seed=7).take(200)] == [e.uid for e in drawn[:200]]
    assert [e.uid for e in MixtureSampler(data, seed=8).take(200)] != [e.uid for e in drawn[:200]]


def test_mixture_sampler_with_cap():
    data = {"a": _task_examples("a", 1000), "b": _task_examples("b", 10)}
    sampler = MixtureSampler(data, limit=10, seed=0)
    assert sampler.rates == {"a": 0.5, "b": 0.5}
    share_b = sum(e.task == "b" for e in sampler.take(2000)) / 2000
    assert abs(share_b - 0.5) < 0.05


def test_mixture_sampler_walks_each_task_in_epochs():
    data = {"a": _task_examples("a", 5)}
    drawn = [e.uid for e in MixtureSampler(data, seed=1).take(15)]
    for epoch in range(3):
        assert sorted(drawn[5 * epoch : 5 * epoch + 5]) == sorted(e.uid for e in data["a"])
    assert drawn[:5] != drawn[5:10]  # each epoch is a fresh permutation


def test_mixture_sampler_resumes_at_a_draw():
    data = {"a": _task_examples("a", 7), "b": _task_examples("b", 13)}
    sampler = MixtureSampler(data, seed=5)
    assert sampler.take(30, start=50) == sampler.take(80)[50:]


# --------------------------------------------------------------------------------------
# Errors: one UserError line naming the problem, the file and the line
# --------------------------------------------------------------------------------------


def _rte_dir(tmp_path: Path, body: str, name: str = "train.tsv") -> Path:
    directory = tmp_path / "RTE"
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(body, encoding="utf-8")
    return directory / name


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(
        UserError,
        match=r"unknown task 'superglue/multi_rc'; did you mean "
        r"'superglue/multirc'\? known tasks: glue/cola",
    ) as err:
        get_task("superglue/multi_rc")
    _assert_one_line(err)


def test_unknown_split_lists_the_splits():
    with pytest.raises(
        UserError,
        match=r"glue/mnli has no split 'validation' \(splits: train, "
        r"validation_matched, .*did you mean",
    ):
        load_task("glue/mnli", GLUE, "validation")


def test_missing_split_file_names_the_expected_paths(tmp_path):
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "validation")
    message = _assert_one_line(err)
    assert message.startswith("no validation file for glue/rte: expected ")
    assert str(tmp_path / "RTE" / "dev.tsv") in message and str(tmp_path / "dev.tsv") in message


def test_missing_data_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_task("glue/rte", tmp_path / "nope", "train")


def test_row_with_too_few_columns_names_file_and_line(tmp_path):
    rows = "".join(f"{i}\ts1\ts2\tentailment\n" for i in range(15))
    path = _rte_dir(tmp_path, RTE_HEADER + rows + "15\tonly two\n")
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "train")
    assert _assert_one_line(err) == f"{path}:17: expected 4 tab-separated columns, found 2"


def test_cola_row_with_wrong_column_count(tmp_path):
    (tmp_path / "train.tsv").write_text("gj04\t1\t\tFine.\ngj04\t0\tBad row\n")
    with pytest.raises(UserError, match=r"train.tsv:2: expected 4 tab-separated columns, found 3"):
        load_task("glue/cola", tmp_path, "train")


def test_label_outside_the_label_set(tmp_path):
    path = _rte_dir(tmp_path, RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "train")
    assert _assert_one_line(err) == (f"{path}:3: label 'maybe' is not one of entailment, not_entailment (or 0-1)")


def test_numeric_label_out_of_range(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(UserError, match=r"train.tsv:3: label '2' is not one of negative, positive"):
        load_task("glue/sst2", tmp_path, "train")


def test_stsb_score_outside_zero_to_five(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "dev.tsv").write_text(header + "0\tg\tf\ty\to\ts\ts\ta\tb\t7.5\n")
    with pytest.raises(UserError, match=r"dev.tsv:2: score '7.5' is outside \[0, 5\]"):
        load_task("glue/stsb", tmp_path, "validation")


def test_missing_column_in_header(tmp_path):
    path = _rte_dir(tmp_path, "index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "train")
    assert _assert_one_line(err) == (
        f"{path}:1: missing column 'label' (header has: index, sentence1, sentence2, gold)"
    )


def test_empty_file(tmp_path):
    path = _rte_dir(tmp_path, "")
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "train")
    assert _assert_one_line(err) == f"{path}: file is empty"


def test_header_without_rows(tmp_path):
    path = _rte_dir(tmp_path, RTE_HEADER)
    with pytest.raises(UserError, match=f"{path}: no data rows after the header"):
        load_task("glue/rte", tmp_path, "train")


def test_bytes_that_are_not_utf8_name_line_and_offset(tmp_path):
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(RTE_HEADER.encode() + b"0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n")
    with pytest.raises(UserError) as err:
        load_task("glue/rte", tmp_path, "train")
    offset = len(RTE_HEADER) + len("0\ta\tb\tentailment\n1\tcaf")
    assert _assert_one_line(err) == (
        f"{path}:3: bytes are not valid UTF-8 (0xe9 at byte offset {offset}); re-encode the file as UTF-8"
    )


def test_non_utf8_offset_counts_the_bom(tmp_path):
    path = tmp_path / "dev.tsv"
    header = b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"  # 40 bytes
    path.write_bytes(b"\xef\xbb\xbf" + header + b"1\t1\t2\t\xff\tb\n")
    # offset in the file: 3 (BOM) + 40 (header) + 6 ("1\t1\t2\t") = 49
    with pytest.raises(UserError, match=r"dev.tsv:2: bytes are not valid UTF-8 \(0xff at byte offset 49\)"):
        load_task("glue/mrpc", tmp_path, "validation")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(
        '{"question": "q", "passage": "p", "idx": 0, "label": true}\n\n'
        '{"question": "q", "passage": "p", "idx": 1, "label": tru}\n'
    )
    with pytest.raises(UserError) as err:
        load_task("superglue/boolq", tmp_path, "validation")
    assert _assert_one_line(err).startswith(f"{path}:3: invalid JSON (Expecting value")


def test_json_line_that_is_not_an_object(tmp_path):
    (tmp_path / "val.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"val.jsonl:1: expected a JSON object, found an array"):
        load_task("superglue/cb", tmp_path, "validation")


def test_missing_key_in_jsonl(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(
        '{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}\n'
        '{"premise": "p", "label": "neutral", "idx": 1}\n'
    )
    with pytest.raises(UserError) as err:
        load_task("superglue/cb", tmp_path, "validation")
    assert _assert_one_line(err) == f"{path}:2: missing key 'hypothesis'"


def test_wrong_type_of_nested_key(tmp_path):
    record = {
        "idx": 0,
        "passage": {
            "text": "t",
            "questions": [{"question": "q", "idx": 0, "answers": [{"text": 3, "idx": 0, "label": 1}]}],
        },
    }
    (tmp_path / "val.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(
        UserError,
        match=r"val.jsonl:1: key 'passage.questions\[0\].answers\[0\]"
        r".text' should be a string, found an integer",
    ):
        load_task("superglue/multirc", tmp_path, "validation")


def test_superglue_label_outside_the_set(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "unsure", "idx": 0}\n')
    with pytest.raises(
        UserError,
        match=r"val.jsonl:1: label 'unsure' is not one of entailment, "
        r"contradiction, neutral",
    ):
        load_task("superglue/cb", tmp_path, "validation")


def test_boolean_label_for_a_task_with_word_labels(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": true}\n')
    with pytest.raises(UserError, match=r"val.jsonl:1: label True is not one of"):
        load_task("superglue/rte", tmp_path, "validation")


def test_invalid_json_document_names_the_line(tmp_path):
    (tmp_path / "tydiqa-goldp-v1.1-dev.json").write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(UserError, match=r"tydiqa-goldp-v1.1-dev.json:2: invalid JSON"):
        load_task("tydiqa/goldp", tmp_path, "validation")


def test_json_document_errors_name_the_json_path(tmp_path):
    path = tmp_path / "unfiltered-web-dev.json"
    path.write_text(json.dumps({"Data": [{"Question": "q", "Answer": {"Value": "v"}}, {"Answer": {"Value": "v"}}]}))
    with pytest.raises(UserError) as err:
        load_task("cbqa/triviaqa", tmp_path, "validation")
    assert _assert_one_line(err) == f"{path}: Data[1]: missing key 'Question'"


def test_webquestions_target_value_without_answers(tmp_path):
    (tmp_path / "train.json").write_text('[{"url": "u", "targetValue": "(list)", "utterance": "q"}]')
    with pytest.raises(UserError, match=r"train.json: \[0\]: targetValue '\(list\)' has no"):
        load_task("cbqa/webquestions", tmp_path, "train")


def test_nq_open_without_answers(tmp_path):
    (tmp_path / "NQ-open.train.jsonl").write_text('{"question": "q", "answer": []}\n')
    with pytest.raises(UserError, match=r"NQ-open.train.jsonl:1: key 'answer' has no answers"):
        load_task("cbqa/nq", tmp_path, "train")


def test_generic_file_missing_a_mapped_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(UserError) as err:
        load_generic(path, "input=question,target=reply", "generation")
    assert _assert_one_line(err) == f"{path}:1: missing column 'reply' (header has: question, answer)"


def test_generic_jsonl_missing_key_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a", "t": "b"}\n{"q": "c"}\n')
    with pytest.raises(UserError, match=f"{path}:2: missing key 't'"):
        load_generic(path, "input=q,target=t", "generation")


def test_generic_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nok,positive\nnot,ok,negative\n")
    with pytest.raises(UserError, match=f"{path}:3: expected 2 columns, found 3"):
        load_generic(path, "input=text,target=label", "classification", ["negative", "positive"])


def test_generic_classification_label_outside_the_set(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": "a", "y": "spam"}\n')
    with pytest.raises(UserError, match=f"{path}:1: label 'spam' is not one of ham, eggs"):
        load_generic(path, "input=x,target=y", "classification", ["ham", "eggs"])


def test_generic_unsupported_suffix_and_kind(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.parquet'"):
        load_generic(path, "input=x", "generation")
    with pytest.raises(UserError, match="unknown kind 'ranking'"):
        load_generic(path, "input=x", "ranking")
