"""`make gpu-check`'s pre-flight (seconds): before any long step, check what the check needs on
this Python (CUDA, bf16, NCCL, torch.compile, and each import) and print one line per missing thing.

    python scripts/gpu_check_preflight.py [--smoke]

Exit 0 when everything is there, 2 when something is missing (each on its own line, on stderr).
``--smoke``: the CPU smoke mode, which needs no GPU: the CUDA items are reported as skipped.
Run it with the Python that will run the check (``PYTHONPATH=src`` for a checkout that is not
installed); it imports nothing of samlm's until torch is known to work.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time

# Third-party modules that `samlm bench` and `samlm pretrain` import (the harness extra), and
# samlm's own modules for the commands the check runs (they catch whatever this list misses).
IMPORTS = ("numpy", "transformers", "accelerate", "safetensors", "tqdm")
SAMLM_MODULES = ("samlm.cli.bench", "samlm.cli.pretrain", "torch.distributed.run")
TORCH_RANGE = ((2, 4), (2, 15))  # samlm's torch requirement: >=2.4,<2.15
HINT = "pip install 'samlm[harness]' (offline: docs/scale.md)"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check(smoke: bool) -> tuple[list[str], list[str]]:
    """(notes, missing): one line each."""
    notes: list[str] = []
    missing: list[str] = []
    if sys.version_info < (3, 10):  # noqa: UP036 - the cluster's Python may be older than samlm's
        missing.append(f"Python >= 3.10 (this is {sys.version.split()[0]})")
    for name in IMPORTS:  # find_spec: each missing one named, none imported yet
        if importlib.util.find_spec(name) is None:
            missing.append(f"{name} (import {name}): {HINT}")
    if importlib.util.find_spec("samlm") is None:
        missing.append("samlm (import samlm): run from the checkout with PYTHONPATH=src, or install it")
    try:
        import torch
    except Exception as err:  # whatever breaks `import torch` is the one line
        missing.insert(0, f"torch ({type(err).__name__}: {err}); install the cluster's PyTorch or {HINT}")
        return notes, missing
    low, high = TORCH_RANGE
    if not low <= _version(torch.__version__) < high:
        missing.append(f"torch >=2.4,<2.15 (this is {torch.__version__})")
    notes.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {sys.version.split()[0]}")

    if not missing:  # samlm's modules import the rest: only once all of it is there
        for name in SAMLM_MODULES:
            try:
                importlib.import_module(name)
            except ImportError as err:
                missing.append(f"{err.name or name} (import {name}: {err}): {HINT}")
            except Exception as err:  # a broken install: still one line
                missing.append(f"a working {name} ({type(err).__name__}: {err})")
        samlm = sys.modules.get("samlm")
        if samlm is not None:
            notes.append(f"samlm {samlm.__version__} from {samlm.__path__[0]}")

    import torch.distributed as dist

    if not dist.is_available():
        missing.append("torch.distributed (this torch is built without it)")
    if smoke:
        notes.append("CUDA, bf16, NCCL, torch.compile: skipped (smoke mode runs on the CPU, without --compile)")
        return notes, missing

    if not (dist.is_available() and dist.is_nccl_available()):
        missing.append("NCCL (torch.distributed.is_nccl_available() is False)")
    if not torch.cuda.is_available():
        missing.append(
            f"a CUDA GPU: gpu-check needs one (torch.cuda.is_available() is False, torch {torch.__version__})"
        )
        return notes, missing  # bf16 and torch.compile are checked on the GPU
    device = torch.device("cuda")
    notes.append(f"GPU {torch.cuda.get_device_name(device)}, capability {torch.cuda.get_device_capability(device)}")
    if dist.is_nccl_available():
        notes.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    try:
        x = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
        if not (torch.cuda.is_bf16_supported() and float((x @ x).float().sum()) == 512.0):
            missing.append("bf16 on this GPU (torch.cuda.is_bf16_supported() is False)")
    except RuntimeError as err:
        missing.append(f"bf16 on this GPU ({err})")
    try:
        start = time.perf_counter()
        compiled = torch.compile(lambda t: (t * 2).sin().sum())
        value = float(compiled(torch.zeros(16, device=device)))
        if value != 0.0:
            missing.append(f"torch.compile (a tiny function returned {value}, not 0)")
        notes.append(f"torch.compile: a tiny function in {time.perf_counter() - start:.1f} s")
    except Exception as err:  # inductor fails in many ways (no compiler, no triton, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        missing.append(f"torch.compile ({type(err).__name__}: {first[:200]})")
    return notes, missing


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    start = time.perf_counter()
    notes, missing = check(smoke)
    for line in notes:
        print(f"gpu-check: pre-flight: {line}", file=sys.stderr)
    for line in missing:
        print(f"gpu-check: missing: {line}", file=sys.stderr)
    print(
        f"gpu-check: pre-flight {'failed' if missing else 'ok'} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 2 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
