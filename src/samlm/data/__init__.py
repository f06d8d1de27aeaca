"""Data layer: prepared token files (``prepared``: tokenize once, memory-map everywhere), text
corpora and LM batches (``text``), and fine-tuning tasks: official file formats
(``formats``), the task registry and mixtures (``tasks``) and each task's official metrics (``metrics``).

```python
from samlm.data import LMDataset, load_task, compute_metrics, subsample

data = LMDataset.from_corpus("tinyshakespeare", context=64)
train = subsample(load_task("superglue/cb", data_dir="data/CB", split="train"), rate=0.2, seed=0)
dev = load_task("superglue/cb", data_dir="data/CB", split="validation")
scores = compute_metrics("superglue/cb", predictions, dev)   # {"macro_f1": ..., "accuracy": ...}
```

See ``docs/data.md``. Depends on torch and the plumbing only (transformers for hub tokenizers, datasets for
hub data, scikit-learn/scipy for metrics, each imported where it is used).
"""

from samlm.data.formats import (
    GENERIC_KEYS,
    Example,
    load_generic,
    parse_column_mapping,
)
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
from samlm.data.prepared import (
    Budget,
    PreparedTokens,
    ensure_prepared,
    load_prepared,
    prepare,
)
from samlm.data.tasks import (
    CLASSIFICATION,
    GENERATION,
    MIXTURES,
    REGRESSION,
    TASKS,
    MixtureSampler,
    Task,
    demo_data_dir,
    generic_task,
    get_task,
    load_task,
    mixing_rates,
    one_example_per_answer,
    parse_mixture,
    stsb_target,
    subsample,
    task_names,
)
from samlm.data.text import (
    DEFAULT_CORPUS,
    IGNORE_INDEX,
    ByteTokenizer,
    LMBatchIterator,
    LMDataset,
    count_targets,
    encode_text,
    lm_loss,
    load_corpus,
    load_tokenizer,
    tokenizer_vocab_size,
)

__all__ = [
    "AVERAGED_TASKS",
    "Budget",
    "PreparedTokens",
    "ensure_prepared",
    "load_prepared",
    "prepare",
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
    "REGRESSION",
    "TASKS",
    "Task",
    "benchmark_average",
    "compute_metrics",
    "count_targets",
    "demo_data_dir",
    "encode_text",
    "exact_match",
    "generic_task",
    "get_task",
    "lm_loss",
    "load_corpus",
    "load_generic",
    "load_task",
    "load_tokenizer",
    "mixing_rates",
    "one_example_per_answer",
    "parse_column_mapping",
    "parse_mixture",
    "postprocess_generation",
    "squad_normalize",
    "stsb_target",
    "subsample",
    "task_names",
    "task_score",
    "token_f1",
    "tokenizer_vocab_size",
]
