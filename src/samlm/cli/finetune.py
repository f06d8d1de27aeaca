"""Fine-tune a T5 or an encoder classifier on GLUE/SuperGLUE/QA tasks, with or without SAM.

``samlm finetune --model DIR_OR_HUB_ID --task glue/rte --data-dir glue_data --optimizer sam --out runs/rte-sam``

Exit codes: 0 done, 2 a mistake (one line ``samlm: error: ...``), 130 stopped by SIGINT/SIGTERM
after saving a checkpoint (continue with ``--resume``); see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json

from samlm.harness import settings
from samlm.harness.finetune import FinetuneConfig, config_from_args, execute, prepare
from samlm.progress import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    plan = prepare(config_from_args(args))
    if plan.config.dry_run:
        print(json.dumps(plan.record(), indent=2, default=str))
        say(f"dry run: flags, model config, data and {plan.run_dir.path} are fine; nothing was written")
        return 0
    result = execute(plan)
    # 130: stopped by a signal before the last step (a checkpoint was saved; --resume continues).
    return 0 if result.get("completed") else 130
