"""Run a test module as N gloo ranks, with the environment variables torchrun sets, and collect
what each rank saved to ``OUT/rank{r}.pt`` (the module's ``__main__`` writes it)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, out_dir: Path, world_size: int = 2, timeout: float = 150) -> list[dict]:
    """``python script out_dir`` as ``world_size`` ranks; each rank's saved results, in rank order."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            TORCHELASTIC_RUN_ID="samlm-test",
        )
        env = {k: v for k, v in env.items() if not k.startswith("ACCELERATE_")}
        procs.append(
            subprocess.Popen(
                [sys.executable, script, str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("distributed workers timed out (a collective mismatch hangs)")
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    # our own files, written by the ranks just now: plain containers of tensors
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
