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
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SAMLM="$VENV/bin/samlm"
PY="$VENV/bin/python"
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"

if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  DEV=cpu; BF16=fp32; AMP=no; FP16=no; COMPILE=(); STRATEGY=none; STEPS=3; PRE_STEPS=4
  GPT2=(--layers 1 --width 32 --heads 2 --vocab 64 --context 16 --batch 4)
  SMALL=(--layers 1 --width 32 --heads 2 --context 16 --batch 4)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "samlm: error: gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)" >&2; exit 2; }
  DEV=cuda; BF16=bf16; AMP=bf16; FP16=fp16; COMPILE=(--compile); STRATEGY=ddp; STEPS=10; PRE_STEPS=300
  GPT2=(--layers 12 --width 768 --heads 12 --vocab 50257 --context 1024 --batch 8)
  SMALL=(--layers 6 --width 512 --heads 8 --context 256 --batch 32)
fi
COMMON=(--data tinyshakespeare --no-sharpness --no-progress --overwrite --device "$DEV")

echo "== 1. bench, GPT-2-small shape, every method" >&2
"$SAMLM" bench --device "$DEV" --dtype "$BF16" "${GPT2[@]}" --steps "$STEPS" --json "$OUT/bench.json"
"$SAMLM" bench --device "$DEV" --dtype "$BF16" "${GPT2[@]}" --steps "$STEPS" --sam-every 5 \
  --methods adamw,sam,fsam,pfsam --json "$OUT/bench-every5.json"

echo "== 2. pretrain: F-SAM bf16 + compile; AdamW against bench's bare loop" >&2
"$SAMLM" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer fsam --mixed-precision "$AMP" "${COMPILE[@]}" \
  --steps "$PRE_STEPS" --out "$OUT/pretrain-fsam"
"$SAMLM" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer adamw --mixed-precision "$AMP" \
  --steps "$PRE_STEPS" --out "$OUT/pretrain-adamw"
"$SAMLM" bench --device "$DEV" --dtype "$BF16" "${SMALL[@]}" --steps "$STEPS" --methods adamw --no-memory \
  --json "$OUT/bench-small.json"

echo "== 3. fp16 GradScaler (SAM)" >&2
"$SAMLM" pretrain "${COMMON[@]}" "${SMALL[@]}" --optimizer sam --mixed-precision "$FP16" \
  --steps "$STEPS" --out "$OUT/pretrain-sam-fp16"

echo "== 4. torchrun, one process (F-SAM, --strategy $STRATEGY)" >&2
"$VENV/bin/torchrun" --standalone --nproc_per_node 1 -m samlm pretrain "${COMMON[@]}" "${SMALL[@]}" \
  --optimizer fsam --strategy "$STRATEGY" --steps "$STEPS" --out "$OUT/torchrun-fsam"

"$PY" scripts/gpu_check_summary.py "$OUT"
