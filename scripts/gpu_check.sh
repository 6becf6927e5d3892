#!/usr/bin/env bash
# One-command GPU check (issue #15 item 5; the decode half of `echocxr bench rehearse`, issue #21, on a GPU):
# Qwen2.5-VL-7B-shape logits vs transformers, memory floor, decode speed (transformers generate,
# our AR engine, our fused one-step decoder at batch 1/8/32), RAD vs symmetric step time, and an FSDP2
# smoke step, written to one JSON file: $OUT/gpu_check.json (or --out DIR). About 8 minutes on one
# H100/H200; every section has its own time limit and the JSON is rewritten after each one.
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--sections a,b,...]
#   bash scripts/gpu_check.sh --smoke        # tiny shapes on the CPU (what CI runs)
#
# It installs nothing and needs no network: it uses .venv/bin/python when the checkout has one
# (scripts/setup.sh, or setup.sh --system-torch on a machine with torch already installed), else the
# system python3 with src/ on PYTHONPATH (torch, transformers, tokenizers, numpy and Pillow must be there).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The sections guard themselves (SIGALRM); this outer limit is the last resort: 8 minutes in all.
exec timeout --signal=KILL 480 "$PY" -m echocxr.bench.gpu_check "$@"
