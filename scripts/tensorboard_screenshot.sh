#!/usr/bin/env bash
# bash scripts/tensorboard_screenshot.sh RUN_DIR OUT.png [TAG_REGEX]
#
# A PNG of TensorBoard's time-series page for a run (docs/profiling.md's screenshot): serves
# RUN_DIR/tensorboard on 127.0.0.1 with the venv's tensorboard, captures it with headless
# Chromium (Debian: apt-get install chromium), and stops the server. TAG_REGEX filters the
# cards (default: the perf/* throughput, MFU and step-time scalars). It shows the SCALARS
# dashboard, whose charts are SVG (the time-series page draws with WebGL, blank headless).
set -euo pipefail
run=${1:?usage: $0 RUN_DIR OUT.png [TAG_REGEX]}
out=${2:?usage: $0 RUN_DIR OUT.png [TAG_REGEX]}
tags=${3:-perf/(tokens_per_s|mfu|tflops|step_s|phase/student|phase/importance)}
root=$(cd "$(dirname "$0")/.." && pwd)
command -v chromium >/dev/null || { echo "needs chromium: apt-get install chromium"; exit 2; }
port=$((20000 + RANDOM % 20000))
"$root/.venv/bin/tensorboard" --logdir "$run/tensorboard" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 1; done
query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$tags")
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1300 \
    --virtual-time-budget=60000 --run-all-compositor-stages-before-draw --screenshot="$out" \
    "http://127.0.0.1:$port/?darkMode=false#scalars&tagFilter=$query&_smoothingWeight=0" 2>/dev/null
echo "wrote $out"
