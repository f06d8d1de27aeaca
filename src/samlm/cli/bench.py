"""Benchmark step time and peak memory of AdamW, the PyPI peer's SAM and every samlm method."""

from __future__ import annotations

import argparse

from samlm.harness import settings
from samlm.studies.bench import BenchConfig, format_table, run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, BenchConfig)


def run(args: argparse.Namespace) -> int:
    print(format_table(run_bench(settings.from_args(BenchConfig, args))))
    return 0
