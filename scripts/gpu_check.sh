#!/usr/bin/env bash
# `make gpu-check`: samlm's checks on one CUDA GPU, about 8 minutes (the integrations issue):
#   1. samlm bench at GPT-2-small shape in bf16, every method, and with --sam-every 5;
#   2. a bf16 + torch.compile F-SAM pretrain of a ~19M-parameter model, and an AdamW pretrain
#      of the same model against bench's bare AdamW loop (target: within 10% tokens/s);
#   3. the fp16 GradScaler path (SAM, fp16 autocast);
#   4. a one-process NCCL launch through torchrun (DDP, F-SAM).
# Everything goes to $OUT (default runs/gpu-check); summary.md holds the figures and the targets
# (SAM <= 1.25x, F-SAM <= 1.55x AdamW step time) for docs/benchmarks.md.
# GPU_CHECK_SMOKE=1: the same commands on the CPU with tiny shapes (what the test suite runs).
# PYTHON: the interpreter that runs everything (default .venv/bin/python, or $VENV/bin/python), e.g.
# the cluster's own Python with its CUDA PyTorch: samlm then runs from this checkout (PYTHONPATH=src)
# when it is not installed there; nothing is installed. A pre-flight of seconds checks CUDA, bf16,
# NCCL, torch.compile and the imports first, one line per missing thing (scripts/gpu_check_preflight.py).
set -euo pipefail
# A relative PYTHON names a file from where the caller stands (a bare name is looked up on PATH).
PYTHON=${PYTHON:-}
if [[ -n "$PYTHON" && "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-${VENV:-.venv}/bin/python}
OUT=${OUT:-runs/gpu-check}
SMOKE=${GPU_CHECK_SMOKE:-0}
command -v "$PYTHON" >/dev/null || { echo "gpu-check: missing: the Python to run it ($PYTHON); set PYTHON=" >&2; exit 2; }
# find_spec, not import: samlm's import pulls in torch (seconds).
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('samlm') is None)" 2>/dev/null \
  || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" scripts/gpu_check_preflight.py $([[ "$SMOKE" == 1 ]] && echo --smoke) || exit 2
SAMLM=("$PYTHON" -m samlm)
TORCHRUN=("$PYTHON" -m torch.distributed.run)
mkdir -p "$OUT"

if [[ "$SMOKE" == 1 ]]; then
  DEV=cpu; BF16=fp32; AMP=no; FP16=no; COMPILE=(); STRATEGY=none; STEPS=3; PRE_STEPS=4
  GPT2=(--layers 1 --width 32 --heads 2 --vocab 64 --context 16 --batch 4)
  SMALL=(--layers 1 --width 32 --heads 2 --context 16 --batch 4)
else
  DEV=cuda; BF16=bf16; AMP=bf16; FP16=fp16; COMPILE=(--compile); STRATEGY=ddp; STEPS=10; PRE_STEPS=300
  GPT2=(--layers 12 --width 768 --heads 12 --vocab 50257 --context 1024 --batch 8)
  SMALL=(--layers 6 --width 512 --heads 8 --context 256 --batch 32)
fi
COMMON=(--data tinyshakespeare --no-sharpness --no-progress --overwrite --device "$DEV")

echo "== 1. bench, GPT-2-small shape, every method" >&2
"${SAMLM[@]}" bench --device "$DEV" --dtype "$BF16" "${GPT2[@]}" --steps "$STEPS" --json "$OUT/bench.json"
"${SAMLM[@]}" bench --device "$DEV" --dtype "$BF16" "${GPT2[@]}" --steps "$STEPS" --sam-every 5 \
  --methods adamw,sam,fsam,pfsam --json "$OUT/bench-every5.json"

echo "== 2. pretrain: F-SAM bf16 + compile; AdamW against bench's bare loop" >&2
"${SAMLM[@]}" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer fsam --mixed-precision "$AMP" "${COMPILE[@]}" \
  --steps "$PRE_STEPS" --out "$OUT/pretrain-fsam"
"${SAMLM[@]}" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer adamw --mixed-precision "$AMP" \
  --steps "$PRE_STEPS" --out "$OUT/pretrain-adamw"
"${SAMLM[@]}" bench --device "$DEV" --dtype "$BF16" "${SMALL[@]}" --steps "$STEPS" --methods adamw --no-memory \
  --json "$OUT/bench-small.json"

echo "== 3. fp16 GradScaler (SAM)" >&2
"${SAMLM[@]}" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer sam --mixed-precision "$FP16" \
  --steps "$STEPS" --out "$OUT/pretrain-sam-fp16"

echo "== 4. torchrun, one process (F-SAM, --strategy $STRATEGY)" >&2
"${TORCHRUN[@]}" --standalone --nproc_per_node 1 -m samlm pretrain "${COMMON[@]}" "${SMALL[@]}" \
  --optimizer fsam --strategy "$STRATEGY" --steps "$STEPS" --out "$OUT/torchrun-fsam"

"$PYTHON" scripts/gpu_check_summary.py "$OUT"
