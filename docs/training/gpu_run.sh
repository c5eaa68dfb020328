#!/bin/bash
# Device run: train the shipped default (small preset) on 20k CelebA faces.
# usage: bash .gpu/run.sh BASE_MIN FT_MIN BATCH LR
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
BASE_MIN=$1; FT_MIN=$2; BS=$3; LR=$4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
R=/tmp/runs; mkdir -p $R $OUT/base $OUT/ft
python3 -m bpd_sr train --data .gpu/train_20k.npz --preset small --out $R/base \
  --batch-size $BS --lr $LR --warmup-steps 200 --max-steps 1000000 --max-minutes $BASE_MIN \
  --eval-every 200 --ckpt-minutes 1 --quiet || exit 1
cp $R/base/log.jsonl $OUT/base/
python3 -m bpd_sr.cli export $R/base/last.pt $OUT/base/base.pt
python3 -m bpd_sr train --data .gpu/train_20k.npz --regime finetune --k 10 --init $R/base/last.pt \
  --out $R/ft --batch-size $BS --lr $(python3 -c "print($LR/3)") --warmup-steps 50 --max-steps 1000000 \
  --max-minutes $FT_MIN --eval-every 200 --ckpt-minutes 1 --quiet || exit 1
cp $R/ft/log.jsonl $OUT/ft/
python3 -m bpd_sr.cli export $R/ft/last.pt $OUT/ft/default.pt
ls -la $OUT/*
