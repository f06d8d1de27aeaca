"""Data layer. Pretraining data is one pipeline, a module per stage, each importing only earlier ones:
``readers`` (UTF-8 and JSON-lines files) -> ``sources`` (a ``--data`` spec -> documents) ->
``tokenizers`` (loading, identity, BPE training, the one encoder) -> ``store`` (the prepared
directory on disk) and ``writer`` (``prepare``: tokenize once) -> ``cache`` (``ensure_prepared``)
-> ``windows`` (LM windows and batches, ``lm_loss``). Fine-tuning tasks: records and generic
files (``formats``), the benchmarks' official files (``official``), the task registry and mixtures
(``tasks``) and each task's official metrics (``metrics``).

```python
from samlm.data import LMDataset, load_task, compute_metrics, subsample

data = LMDataset.from_corpus("tinyshakespeare", context=64)
train = subsample(load_task("superglue/cb", data_dir="data/CB", split="train"), rate=0.2, seed=0)
dev = load_task("superglue/cb", data_dir="data/CB", split="validation")
scores = compute_metrics("superglue/cb", predictions, dev)   # {"macro_f1": ..., "accuracy": ...}
```

See ``docs/data.md`` and ``docs/pretraining.md``. Depends on torch, numpy and the plumbing only
(transformers for hub tokenizers, datasets for hub data, scikit-learn/scipy for metrics, each
imported where it is used).
"""

from samlm.data.cache import ensure_prepared
from samlm.data.formats import GENERIC_KEYS, Example, load_generic, parse_column_mapping
from samlm.data.metrics import (
    AVERAGED_TASKS,
    INVALID,
    benchmark_average,
    compute_metrics,
    exact_match,
    postprocess_generation,
    squad_normalize,
    task_score,
    token_f1,
)
from samlm.data.mixtures import MixtureSampler, mixing_rates, parse_mixture, subsample
from samlm.data.sources import DEFAULT_CORPUS, load_corpus
from samlm.data.store import PreparedTokens, is_prepared_dir, load_prepared
from samlm.data.tasks import (
    CLASSIFICATION,
    GENERATION,
    MIXTURES,
    REGRESSION,
    TASKS,
    Task,
    demo_data_dir,
    generic_task,
    get_task,
    load_task,
    one_example_per_answer,
    stsb_target,
    task_names,
)
from samlm.data.tokenizers import ByteTokenizer, encode_text, load_tokenizer, tokenizer_vocab_size
from samlm.data.windows import IGNORE_INDEX, LMBatchIterator, LMDataset, count_targets, lm_loss
from samlm.data.writer import Budget, prepare

__all__ = [
    "AVERAGED_TASKS",
    "Budget",
    "ByteTokenizer",
    "CLASSIFICATION",
    "DEFAULT_CORPUS",
    "Example",
    "GENERATION",
    "GENERIC_KEYS",
    "IGNORE_INDEX",
    "INVALID",
    "LMBatchIterator",
    "LMDataset",
    "MIXTURES",
    "MixtureSampler",
    "PreparedTokens",
    "REGRESSION",
    "TASKS",
    "Task",
    "benchmark_average",
    "compute_metrics",
    "count_targets",
    "demo_data_dir",
    "encode_text",
    "ensure_prepared",
    "exact_match",
    "generic_task",
    "get_task",
    "is_prepared_dir",
    "lm_loss",
    "load_corpus",
    "load_generic",
    "load_prepared",
    "load_task",
    "load_tokenizer",
    "mixing_rates",
    "one_example_per_answer",
    "parse_column_mapping",
    "parse_mixture",
    "postprocess_generation",
    "prepare",
    "squad_normalize",
    "stsb_target",
    "subsample",
    "task_names",
    "task_score",
    "token_f1",
    "tokenizer_vocab_size",
]
