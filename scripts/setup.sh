#!/usr/bin/env bash
# Create .venv and install echocxr with its dev tools. Idempotent: a second run is quick.
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch would
# pull a multi-GB CUDA build. On a machine that already has torch 2.11-2.13, pass --system-torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if [ "${1:-}" = "--system-torch" ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if [ "${1:-}" != "--system-torch" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
fi
stamp=.venv/.echocxr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
# METEOR (pycocoevalcap) needs Java; the metric is skipped with a message where it is missing.
command -v java >/dev/null 2>&1 || echo "setup: java not found; METEOR will be skipped (apt-get install default-jre-headless)"
# The server's page test drives Debian's headless Chromium; install it when we can (root), never
# failing setup over it. Without it that test skips and says how to install it.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "setup: could not install chromium (apt-get install -y chromium chromium-driver); the page test will skip"
  else
    echo "setup: chromium not found; the page test will skip (sudo apt-get install -y chromium chromium-driver)"
  fi
fi
