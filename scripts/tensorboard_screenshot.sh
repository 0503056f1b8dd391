#!/usr/bin/env bash
# bash scripts/tensorboard_screenshot.sh RUN_DIR OUT.png [TAG_REGEX]
#
# A PNG of TensorBoard's time-series page for a run (docs/profiling.md's screenshot): serves
# RUN_DIR/tensorboard on 127.0.0.1 with the venv's tensorboard ($TENSORBOARD overrides), captures it with headless
# Chromium (Debian: apt-get install chromium), and stops the server. TAG_REGEX filters the
# cards (default: the perf/* throughput, MFU and step-time scalars). It shows the SCALARS
# dashboard, whose charts are SVG (the time-series page draws with WebGL, blank headless).
set -euo pipefail
run=${1:?usage: $0 RUN_DIR OUT.png [TAG_REGEX]}
out=${2:?usage: $0 RUN_DIR OUT.png [TAG_REGEX]}
tags=${3:-perf/(tokens_per_s|mfu|tflops|step_s|phase/student|phase/importance)}
root=$(cd "$(dirname "$0")/.." && pwd)
command -v chromium >/dev/null || { echo "needs chromium: apt-get install chromium"; exit 2; }
# A port the kernel finds free now, and a random path prefix: the page Chromium renders must come
# from this server, not from whatever else answers on a guessed port of this machine.
port=$(python3 -c 'import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])')
nonce=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
logdir=$(cd "$run/tensorboard" && pwd)
base="http://127.0.0.1:$port/$nonce"
"${TENSORBOARD:-$root/.venv/bin/tensorboard}" --logdir "$logdir" --host 127.0.0.1 --port "$port" --path_prefix "/$nonce" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
ours=0
for _ in $(seq 60); do
    kill -0 "$server" 2>/dev/null || break
    # Only our server answers under the prefix, and it reports the log directory we gave it.
    if curl -sf "$base/data/environment" 2>/dev/null | python3 -c 'import json, sys
sys.exit(json.load(sys.stdin).get("data_location") != sys.argv[1])' "$logdir" 2>/dev/null; then
        ours=1
        break
    fi
    sleep 1
done
[ "$ours" = 1 ] || { echo "error: tensorboard did not come up on 127.0.0.1:$port serving $logdir" >&2; exit 1; }
query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$tags")
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1300 \
    --virtual-time-budget=60000 --run-all-compositor-stages-before-draw --screenshot="$out" \
    "$base/?darkMode=false#scalars&tagFilter=$query&_smoothingWeight=0" 2>/dev/null
echo "wrote $out"
