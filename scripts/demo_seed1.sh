#!/bin/bash
# A second training seed for the demo's AR, RAD and DCD rows (issue #20), on the seed-0 run's Stage 0
# tower, corpus and eval phantoms: only the training seed of AR, RAD and DCD changes.
#   bash scripts/demo_seed1.sh RUN OUT      (RUN: a finished `echocxr demo --out RUN`)
set -e
export HF_HUB_OFFLINE=1
E="$(dirname "$0")/../.venv/bin/echocxr"
D=${1:?usage: demo_seed1.sh RUN OUT}; O=${2:?usage: demo_seed1.sh RUN OUT}
C="--corpus $D/data/corpus.jsonl --batch-size 8 --warmup 50 --device cpu --seed 1 --log-every 100"
[ -f $O/ar/final/config.json ] || $E train --stage ar --init $D/vision/final $C --out $O/ar --steps 1800 --lr 0.002 --save-every 450 --resume
[ -f $O/rad_b8/final/config.json ] || $E train --stage rad --init $O/ar/final $C --out $O/rad_b8 --steps 500 --lr 0.001 --save-every 125 --block-size 8 --resume
[ -f $O/dcd_b8/final/config.json ] || $E train --stage dcd --init $O/rad_b8/final $C --out $O/dcd_b8 --steps 200 --lr 0.0005 --save-every 50 --block-size 8 --distill-studies 128 --rounds 4 --teacher $O/ar/final --teacher-decoder ar --resume
M="--corpus $D/data/eval_en.jsonl --batch-size 32 --quiet --seed 0 --metrics rougeL_coco,label_f1,phantom_f1,phantom_grounding"
$E eval --ckpt $O/ar/final --out $O/eval/ar --decoder ar $M
$E eval --ckpt $O/rad_b8/final --out $O/eval/rad_k1 --decoder block --steps 1 $M
$E eval --ckpt $O/rad_b8/final --out $O/eval/rad_k8 --decoder block --steps 8 $M
$E eval --ckpt $O/dcd_b8/final --out $O/eval/dcd_fused --decoder onestep $M
