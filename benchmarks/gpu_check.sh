#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh        (from the repository root, on a machine with one CUDA GPU)
#
# The prepared GPU check (issue 16): every session lent a GPU runs it first. One command,
# at most ~7 minutes on one H100/H200 (each part has its own timeout; a failing part is
# logged and the next one runs). Results: $OUT if set, else runs/gpu_check/<date>/:
#   env.txt                 device, driver, versions
#   a_tests.log, a_kernel_check.log     kernel tests compiled for the GPU, compiled kernels vs references
#   b_kernels.log, b_tb/                benchmarks/kernels.py (rows-only masks, fp32 and bf16, importance, LM losses)
#   c_demo/  c_demo.log                 a real distill run of configs/demo.yaml (bf16, ZeRO-2, 200 steps)
#   d_llama1b/  d_llama1b.log           configs/gpu_smoke_llama1b.yaml (Llama-3.2-1B shape, seq 2048)
#   summary.md              the key figures (copy into docs/gpu.md)
# Optional: wheels in .whl/ (installed offline into a fresh mktemp -d directory), MiniLM's tokenizer files in
# .gpu/tokenizer (the device cannot fetch the MiniLM package; the runs use a random-init
# teacher of the demo's shape with that tokenizer).
# GPU_CHECK_PARTS="a c" runs only those parts (default: a b c d), e.g. to rerun after a fix.
# Without a GPU it prints one line and exits 0.
set -u
PARTS=${GPU_CHECK_PARTS:-a b c d}
want() { [[ " $PARTS " == *" $1 "* ]]; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: needs an NVIDIA GPU (no nvidia-smi or no device); nothing run"
    exit 0
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
RES=${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
START=$(date +%s)
STATUS=()

# Offline installs of what the device lacks (deepspeed from its sdist without building ops).
# A fresh private directory, not a fixed /tmp path: whatever another user left at a fixed name
# would be imported first (it heads PYTHONPATH).
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
if [ -d .whl ]; then
    echo "== install .whl/ into $SITE"
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" .whl/*.whl >"$RES/install.log" 2>&1 || echo "wheel install failed (see install.log)"
    if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
        DS_BUILD_OPS=0 timeout 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index \
            --target "$SITE" .whl/deepspeed-*.tar.gz >>"$RES/install.log" 2>&1 \
            || echo "deepspeed install failed (see install.log)"
    fi
fi
export PYTHONPATH=$SITE:$ROOT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

TOKENIZER=()
if [ -d .gpu/tokenizer ]; then
    TOKENIZER=("model.tokenizer=$ROOT/.gpu/tokenizer")
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    date -u +"%Y-%m-%d %H:%M UTC"
    git rev-parse --short HEAD 2>/dev/null
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
    python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt"

# part NAME SECONDS CMD...: run with a timeout, log to $RES/NAME.log, record the outcome.
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) STATUS+=("| $name | ok | ${took} s |") ;;
        124|137) STATUS+=("| $name | TIMEOUT after ${limit} s | ${took} s |") ;;
        *) STATUS+=("| $name | exit $rc | ${took} s |") ;;
    esac
    tail -n 3 "$RES/$name.log"
}

# a. kernel tests compiled for the GPU (not the interpreter), compiled kernels vs references
want a && part a_tests 60 env TRITON_INTERPRET=0 HOMODISTIL_TEST_DEVICE=cuda \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_importance.py tests/test_kernels_lm_losses.py \
    -k "not compile_for_h100"
want a && part a_kernel_check 40 python3 benchmarks/kernel_check.py

# b. kernel benchmarks: rows-only masks at 0/2/5/25/50%, fp32 and bf16, importance, the fused LM losses
want b && part b_kernels 110 python3 benchmarks/kernels.py --tokens 8192 --sparsity 0 0.02 0.05 0.25 0.5 \
    --dtype bf16 fp32 --warmup-ms 5 --rep-ms 15 --importance-shapes 768x3072 3072x768 \
    --loss-shapes 4096x30522 8192x128256 \
    --logdir "$RES/b_tb"

# c. the demo config, random-init teacher of the demo's shape (MiniLM: 6 x 384, 12 heads,
#    FFN 1536), King James Bible, bf16, ZeRO-2, 200 steps (the demo's schedule: t_f 150, a mask
#    update every step, a shrink every 7 steps)
want c && part c_demo 100 python3 benchmarks/gpu_run.py configs/demo.yaml "${TOKENIZER[@]}" \
    model.teacher=tiny model.tiny.family=bert model.tiny.hidden_size=384 \
    model.tiny.num_hidden_layers=6 model.tiny.num_attention_heads=12 \
    model.tiny.intermediate_size=1536 data.source=kjv \
    deepspeed.bf16.enabled=true deepspeed.zero_optimization.stage=2 \
    trainer.max_steps=200 trainer.save_every=0 trainer.export=false trainer.progress=false \
    trainer.log_every=20 "trainer.output_dir=$RES/c_demo/run" --out "$RES/c_demo"

# d. scale smoke test: Llama-3.2-1B shape, half FFN and hidden, bf16, ZeRO-2, seq 2048
LEFT=$(( 410 - ($(date +%s) - START) ))
[ "$LEFT" -gt 130 ] && LEFT=130
if ! want d; then
    STATUS+=("| d_llama1b | not asked for (GPU_CHECK_PARTS) | 0 s |")
elif [ "$LEFT" -gt 30 ]; then
    part d_llama1b "$LEFT" python3 benchmarks/gpu_run.py configs/gpu_smoke_llama1b.yaml \
        "${TOKENIZER[@]}" "trainer.output_dir=$RES/d_llama1b/run" --out "$RES/d_llama1b"
    timeout 30 python3 -m homodistil.cli plan configs/gpu_smoke_llama1b.yaml "${TOKENIZER[@]}" \
        --gpu h200 --nodes 1 --gpus-per-node 1 >"$RES/d_plan.txt" 2>&1
else
    STATUS+=("| d_llama1b | skipped: ${LEFT} s left of the budget | 0 s |")
fi

# e. summary
{
    echo "# GPU check $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    cat "$RES/env.txt"
    echo '```'
    echo
    echo "| part | outcome | wall |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "## a. kernel tests (compiled) and kernel_check"
    echo '```'
    tail -n 3 "$RES/a_tests.log" 2>/dev/null
    grep -E "^(ok|FAIL|ERR)|failure" "$RES/a_kernel_check.log" 2>/dev/null
    echo '```'
    echo
    echo "## b. benchmarks/kernels.py"
    echo '```'
    sed -n '/^masked_linear\|^importance\|^lm_losses/,/^$/p' "$RES/b_kernels.log" 2>/dev/null
    echo '```'
    for d in c_demo d_llama1b; do
        echo
        echo "## $d"
        if [ -f "$RES/$d/result.md" ]; then cat "$RES/$d/result.md"; else echo '```'; tail -n 15 "$RES/$d.log" 2>/dev/null; echo '```'; fi
    done
    echo
    echo "\`homodistil plan\` for part d: $(grep -E '^  total' "$RES/d_plan.txt" 2>/dev/null | tr -s ' ')"
    echo
    echo "Total wall time: $(( $(date +%s) - START )) s. Files: $RES"
} >"$RES/summary.md"
echo "== summary: $RES/summary.md"
cat "$RES/summary.md"
exit 0
