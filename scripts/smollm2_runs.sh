#!/usr/bin/env bash
# The SmolLM2-135M measurements of docs/decoders.md: (a) HomoDistil (configs/smollm2.yaml as shipped) and
# (b) one-shot (pruning.schedule=oneshot), same steps, data and seed, for each seed of SEEDS; each pair
# evaluated the same way (homodistil evaluate: held-out perplexity and KL on >= 10,000 next tokens, CPU
# latency, continuations); then the paired table with 95% intervals over seeds.
#   scripts/smollm2_runs.sh [ROOT]        (SEEDS="0 1" by default; finished runs are skipped)
set -euo pipefail
root=${1:-runs/smollm2_study}
py=${PYTHON:-.venv/bin/python}
for seed in ${SEEDS:-0 1}; do
  for variant in homodistil oneshot; do
    dir=$root/$variant/seed$seed
    [ -f "$dir/export/config.json" ] && continue
    extra=(); [ "$variant" = oneshot ] && extra=(pruning.schedule=oneshot)
    start=$(date +%s)
    "$py" -m homodistil.cli distill configs/smollm2.yaml "trainer.seed=$seed" "trainer.output_dir=$dir" "${extra[@]}"
    echo $(( $(date +%s) - start )) > "$dir/wall_seconds"  # the run's wall time, read by the table
  done
  [ -f "$root/homodistil/seed$seed/eval/decoder_results.json" ] ||
    "$py" -m homodistil.cli evaluate "$root/homodistil/seed$seed/export" "$root/oneshot/seed$seed/export"
done
"$py" -m homodistil.apps.decoder_eval --study "$root" --page docs/decoders.md
