#!/usr/bin/env bash
# From a fresh checkout to docs/RESULTS.md: corpus -> AR -> RAD -> DCD -> every decoder evaluated.
#
#   bash scripts/speedrun.sh                  # tiny preset on CPU (the demo, <= 15 min on 2 cores)
#   bash scripts/speedrun.sh small cuda       # small preset on one GPU
#   IU=/data/NLMCXR_reports.tgz bash scripts/speedrun.sh small cuda
#
# Resumable: rerun the same line after an interruption; finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-tiny}
DEVICE=${2:-cpu}
IU=${IU:-../shared/data/iu/NLMCXR_reports.tgz}
IMAGES=${IMAGES:-../shared/data/iu/images}
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m echocxr.cli run --preset "$PRESET" --device "$DEVICE" \
  --iu "$IU" --images "$IMAGES" --out "runs/$PRESET" --results docs/RESULTS.md
