"""Tokenize a corpus once into memory-mapped token files that every run reads (--data DIR)."""

from __future__ import annotations

import argparse

from samlm.harness import settings
from samlm.harness.prepare import PrepareConfig, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    config = settings.from_args(PrepareConfig, args)
    meta = prepare(config)
    tokens = meta["tokens"]
    if meta.get("reused"):
        print(
            f"{config.out} is already prepared from {meta['source']['spec']} with tokenizer "
            f"{meta['tokenizer']['name']}: nothing to do ({tokens['train']:,} training, {tokens['val']:,} "
            "validation tokens)"
        )
        return 0
    source = meta["source"]
    rate = source["characters"] / max(meta["seconds"], 1e-9) / 1e6
    print(
        f"prepared {config.out}: {tokens['train']:,} training and {tokens['val']:,} validation tokens "
        f"({meta['dtype']}, vocabulary {meta['tokenizer']['vocab_size']:,}) from {source['documents']:,} "
        f"{'document' if source['documents'] == 1 else 'documents'} "
        f"of {source['spec']}, split by {meta['split']['rule']}, in {meta['seconds']:.1f} s ({rate:.2f} M chars/s)"
    )
    print(f"  use it with: samlm pretrain --data {config.out}")
    return 0
