"""Fine-tuning data layer: task registry, official file formats and metrics.

```python
from samlm.finetune import load_task, compute_metrics, subsample

train = subsample(load_task("superglue/cb", data_dir="data/CB", split="train"), rate=0.2, seed=0)
dev = load_task("superglue/cb", data_dir="data/CB", split="validation")
scores = compute_metrics("superglue/cb", predictions, dev)   # {"macro_f1": ..., "accuracy": ...}
```

See ``docs/data.md``. The training loop (``samlm.finetune.harness``) is built on this API.
"""

from samlm.finetune.formats import (
    GENERIC_KEYS,
    Example,
    load_generic,
    parse_column_mapping,
)
from samlm.finetune.metrics import (
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
from samlm.finetune.tasks import (
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

__all__ = [
    "AVERAGED_TASKS",
    "CLASSIFICATION",
    "GENERATION",
    "GENERIC_KEYS",
    "INVALID",
    "MIXTURES",
    "REGRESSION",
    "TASKS",
    "Example",
    "MixtureSampler",
    "Task",
    "benchmark_average",
    "compute_metrics",
    "demo_data_dir",
    "exact_match",
    "generic_task",
    "get_task",
    "load_generic",
    "load_task",
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
]
