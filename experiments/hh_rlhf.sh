#!/usr/bin/env bash
# The whole HH-RLHF comparison for one profile: every method trained into runs/hh/<profile>/<run>, then evaluated,
# then the Pareto plot and results.json. Usage: bash experiments/hh_rlhf.sh [cpu-small|tiny|gpu] [OUT_DIR]
# Each run resumes from its last checkpoint, so re-running after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-cpu-small}"
out="${2:-runs/hh/${profile}/results}"
config="experiments/configs/hh_${profile}.yaml"
root="runs/hh/${profile}"
mkdir -p "$out"
train() { local name="$1"; shift; mopo train --config "$config" "run_dir=${root}/${name}" "$@"; }

train reference method.name=reference
train dpo_helpful method.name=dpo_helpful
train dpo_harmless method.name=dpo_harmless
train dpo_pooled method.name=dpo_pooled
for w in 0.3 0.7; do
  train "weighted_dpo_${w}" method.name=weighted_dpo "method.weights=[${w}, $(python3 -c "print(round(1-${w}, 6))")]"
  train "modpo_${w}" method.name=modpo "method.weights=[${w}, $(python3 -c "print(round(1-${w}, 6))")]"
  train "soups_${w}" method.name=rewarded_soups "method.weights=[${w}, $(python3 -c "print(round(1-${w}, 6))")]" \
    "method.soups_from=[${root}/dpo_helpful, ${root}/dpo_harmless]"
done
for b in 0.52 0.55 0.58; do
  train "mopo_b${b}" method.name=mopo_pairwise "method.threshold=${b}"
done
# The published algorithm: candidates sampled from the (lagged) reference, labelled by the labelers.
train mopo_onpolicy_b0.55 method.name=mopo_onpolicy method.threshold=0.55 training.steps=32 training.batch_pairs=4 \
  mopo.eps=0.15

runs=$(ls -d ${root}/*/ | grep -v -e /shared/ -e /results/)
mopo eval $runs
mopo pareto $runs --out "${out}/pareto.png" --results "${out}/results.json"
echo "results in ${out}"
