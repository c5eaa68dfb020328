#!/bin/bash
# One-shot device run under a deadline: fine-tune the shipped model's base and heads jointly
# on the aligned CelebA training faces, then time decoding on the device. Everything ends
# within DEADLINE seconds of the script's start (default 540, for a command limit of 560):
# training stops itself (its time budget, then SIGTERM, on which it saves), and the weights
# are exported (bf16) into $OUT every 2 minutes and at the end, so a run killed at the
# device's limit still returns its last export.
#
#   bash docs/training/gpu_finetune.sh
#
# Before the call, on the CPU machine (the folder is ignored by git and travels with carry):
#   python docs/training/prepare_gpu_data.py ../shared/data/faces/train_32.npz .gpu/train.npz
# then call the device with carry [".gpu"] and this command. No test faces go to the device:
# evaluate $OUT/default.pt here, on the CPU, on 256 test faces (docs/training/README.md).
#
# Writes into $OUT: default.pt (bf16, every 2 minutes and at the end), log.jsonl,
# profile.txt (20 profiled steps), grid.json (decode timing on the device) and run.txt.
# Environment: DEADLINE (540), GRID_SECONDS (60: the decode timing), BS (128), LR (peak;
# never above docs/training/previous_peak_lr), WARMUP (30 steps), K (10), INIT (the shipped
# weights), DATA (.gpu/train.npz), DEVICE (cuda), RUNS (/tmp/runs); for the CPU test:
# GRID_BATCHES (1,8,64), GRID_KS (4,8,10), EVAL_EVERY (200), EXPORT_MINUTES (2), PROFILE_STEPS (20), and the
# reserves in seconds: MARGIN (45: kept after training), STOP_GAP (20: from the training
# budget to its SIGTERM, for start-up), GRID_RESERVE (25: the grid's start-up and last decode).
set -euo pipefail
T0=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-540}; GRID_SECONDS=${GRID_SECONDS:-60}
BS=${BS:-128}; LR=${LR:-3e-4}; WARMUP=${WARMUP:-30}; K=${K:-10}
INIT=${INIT:-bpd_sr/weights/default.pt}; DATA=${DATA:-.gpu/train.npz}; DEVICE=${DEVICE:-cuda}
GRID_BATCHES=${GRID_BATCHES:-1,8,64}; GRID_KS=${GRID_KS:-4,8,10}; EVAL_EVERY=${EVAL_EVERY:-200}
OUT=${OUT:?set OUT to the folder that comes back}; R=${RUNS:-/tmp/runs}
PREV_LR=$(cat docs/training/previous_peak_lr)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
[ -f "$DATA" ] || { echo "no training data at $DATA: see this script's header" >&2; exit 2; }
python3 -c "import sys; sys.exit(float('$LR') > float('$PREV_LR'))" \
  || { echo "LR $LR is above the previous run's peak $PREV_LR" >&2; exit 2; }
mkdir -p "$R" "$OUT"
EPS_DEFAULT=$(python3 -c "from bpd_sr.config import DEFAULT_EPSILON; print(DEFAULT_EPSILON)")
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import torch; print('torch', torch.__version__)";
  echo "deadline=${DEADLINE}s init=$INIT bs=$BS lr=$LR (previous peak $PREV_LR) k=$K data=$DATA"; } | tee "$OUT/run.txt"

# 1. training: its budget is what is left after start-up, minus the decode timing and a margin
#    for the final save, export and the timing's start-up; the hard stop (SIGTERM: it saves)
#    comes 20 s after the budget
MARGIN=${MARGIN:-45}; STOP_GAP=${STOP_GAP:-20}; GRID_RESERVE=${GRID_RESERVE:-25}
TRAIN_S=$(( $(left) - GRID_SECONDS - MARGIN - STOP_GAP ))
[ "$TRAIN_S" -gt 3 ] || { echo "no time left to train (${TRAIN_S}s)" >&2; exit 2; }
rm -rf "$R/ft"
set +e
timeout -s TERM -k 15 $(( TRAIN_S + STOP_GAP )) python3 -m bpd_sr train --data "$DATA" --regime finetune \
  --k "$K" --init "$INIT" --out "$R/ft" --batch-size "$BS" --lr "$LR" --warmup-steps "$WARMUP" \
  --max-steps 100000000 --max-minutes "$(python3 -c "print($TRAIN_S / 60)")" \
  --eval-every "$EVAL_EVERY" --ckpt-minutes 2 --export "$OUT/default.pt" --export-minutes "${EXPORT_MINUTES:-2}" \
  --profile-steps "${PROFILE_STEPS:-20}" --quiet
TRAIN_RC=$?
set -e
cp "$R/ft/log.jsonl" "$R/ft/profile.txt" "$OUT/" 2>/dev/null || true
echo "train exit $TRAIN_RC after $(( $(date +%s) - T0 ))s" | tee -a "$OUT/run.txt"
[ -f "$OUT/default.pt" ] || { echo "training exported nothing" >&2; exit 1; }

# 2. decode timing on the device (training faces: timing only; quality is measured on the CPU)
GRID_S=$(( $(left) - GRID_RESERVE ))
if [ "$GRID_S" -gt 2 ]; then
  timeout -s KILL $(( GRID_S + 20 )) python3 -m bpd_sr benchmark --data "$DATA" --grid --limit 64 \
    --k "$GRID_KS" --epsilon "0,2,$EPS_DEFAULT" --batch-sizes "$GRID_BATCHES" \
    --budget-seconds "$(( GRID_S < GRID_SECONDS ? GRID_S : GRID_SECONDS ))" --device "$DEVICE" \
    --threads 0 --checkpoint "$OUT/default.pt" --out "$OUT" -q || echo "grid failed" | tee -a "$OUT/run.txt"
fi
echo "done after $(( $(date +%s) - T0 ))s" | tee -a "$OUT/run.txt"
