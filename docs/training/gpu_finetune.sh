#!/bin/bash
# One-shot device run: fine-tune the shipped model's base and heads jointly on CelebA, then
# evaluate it on the first 256 test faces, within 9 minutes of a lent GPU (H200).
#
#   bash docs/training/gpu_finetune.sh [TRAIN_MINUTES] [INIT]
#
# TRAIN_MINUTES: joint fine-tuning time (default 5; decoding 256 faces for the evaluation
# takes ~1 minute on an H200, start-up ~1 more). INIT: the checkpoint to start from (default:
# the shipped weights; give the output of `bpd-sr fit-cond` to fine-tune around a stronger
# conditioning net). Environment: BS (batch, 128), LR (3e-4), K (10), REGIME (finetune, or
# distill: targets are the base's own decodes under the default rule), DATA (.gpu/train.npz),
# TEST (.gpu/test_32.npz), NEVAL (256), OUT ($OUT: what comes back), RUNS (/tmp/runs).
#
# Before the call, on the CPU machine (both files are ignored by git and travel with carry):
#   mkdir -p .gpu && cp ../shared/data/faces/test_32.npz .gpu/ && python -c "import numpy as n;
#   n.savez('.gpu/train.npz', images=n.load('../shared/data/faces/train_32.npz')['images'][:10000])"
# and call the device with carry [".gpu"] and this command. It writes to $OUT: default.pt
# (bf16, ~11 MB), log.jsonl, eval.json, eval.txt and run.txt.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MIN=${1:-5}; INIT=${2:-bpd_sr/weights/default.pt}
BS=${BS:-128}; LR=${LR:-3e-4}; K=${K:-10}; REGIME=${REGIME:-finetune}
DATA=${DATA:-.gpu/train.npz}; TEST=${TEST:-.gpu/test_32.npz}; NEVAL=${NEVAL:-256}
OUT=${OUT:?set OUT to the folder that comes back}; R=${RUNS:-/tmp/runs}
mkdir -p "$R" "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import torch; print('torch', torch.__version__)";
  echo "minutes=$MIN init=$INIT bs=$BS lr=$LR k=$K regime=$REGIME data=$DATA"; } | tee "$OUT/run.txt"
rm -rf "$R/ft"
python3 -m bpd_sr train --data "$DATA" --regime "$REGIME" --k "$K" --init "$INIT" --out "$R/ft" \
  --batch-size "$BS" --lr "$LR" --warmup-steps 30 --max-steps 1000000 --max-minutes "$MIN" \
  --eval-every 200 --ckpt-minutes 1 --quiet
cp "$R/ft/log.jsonl" "$OUT/"
python3 -m bpd_sr.cli export "$R/ft/last.pt" "$OUT/default.pt"
python3 -m bpd_sr.cli evaluate "$TEST" --limit "$NEVAL" --k 8 --epsilon 0,2 --rule mean \
  --batch-size 256 --checkpoint "$OUT/default.pt" --json "$OUT/eval.json" -q | tee "$OUT/eval.txt"
date -u | tee -a "$OUT/run.txt"
