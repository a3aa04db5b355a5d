#!/usr/bin/env bash
# The whole HH-RLHF comparison for one profile: every method trained into ROOT/<run>, then evaluated, then the Pareto
# plot and results.json in ROOT/results.
#
#   bash experiments/hh_rlhf.sh [PROFILE] [ROOT]
#
# PROFILE names experiments/configs/hh_PROFILE.yaml (cpu-small, tiny, gpu-quick, gpu-8x, tpu-v5e-8; default
# cpu-small); ROOT (default runs/hh/PROFILE) holds the runs and the shared work directory and may be a gs:// URL
# (needed on multi-host TPU slices, where every worker runs this same script). Every `mopo train` / `mopo eval` joins
# the multi-process job itself (Cloud TPU and SLURM are detected). Each run resumes from its last checkpoint, so
# re-running after an interruption continues where it stopped; a run stopped by SIGTERM exits 143 and stops the
# script (set -e).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-cpu-small}"
root="${2:-runs/hh/${profile}}"
config="experiments/configs/hh_${profile}.yaml"
[[ -f $config ]] || { echo "hh_rlhf.sh: no profile $config" >&2; exit 2; }
runs=()
train() {
  local name="$1"; shift
  mopo train --config "$config" "run_dir=${root}/${name}" "work_dir=${root}/shared" "$@"
  runs+=("${root}/${name}")
}
weights() { python3 -c "import sys; w = float(sys.argv[1]); print(f'[{w}, {round(1 - w, 6)}]')" "$1"; }

train reference method.name=reference
train dpo_helpful method.name=dpo_helpful
train dpo_harmless method.name=dpo_harmless
train dpo_pooled method.name=dpo_pooled
for w in 0.3 0.7; do
  train "weighted_dpo_${w}" method.name=weighted_dpo "method.weights=$(weights "$w")"
  train "modpo_${w}" method.name=modpo "method.weights=$(weights "$w")"
  train "soups_${w}" method.name=rewarded_soups "method.weights=$(weights "$w")" \
    "method.soups_from=[${root}/dpo_helpful, ${root}/dpo_harmless]"
done
for b in 0.52 0.55 0.58; do
  train "mopo_b${b}" method.name=mopo_pairwise "method.threshold=${b}"
done
# The published algorithm: candidates sampled from the (lagged) reference, labelled by the labelers. On CPU fewer,
# smaller steps (sampling dominates); the accelerator profiles keep their own batch, which fills their mesh.
onpolicy=(mopo.eps=0.15)
case "$profile" in
  cpu-small) onpolicy+=(training.steps=32 training.batch_pairs=4) ;;
esac
train mopo_onpolicy_b0.55 method.name=mopo_onpolicy method.threshold=0.55 "${onpolicy[@]}"

mopo eval "${runs[@]}"
mopo pareto "${runs[@]}" --out "${root}/results/pareto.png" --results "${root}/results/results.json"
echo "results in ${root}/results"
