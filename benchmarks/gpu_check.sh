#!/usr/bin/env bash
# One-GPU check (H100/H200): the gpt-1.3b MOPO pairwise step, bfloat16 compute, full remat, policy + live reference,
# 8 pairs x (512 prompt + 512 response) tokens = 16 sequences of 1024. Prints tokens/s, MFU against the published
# dense bf16 peak, and peak device memory. Usage: bash benchmarks/gpu_check.sh  (after: pip install -e ".[lm]" "jax[cuda12]")
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m mopo_jax.cli bench step --preset gpt-1.3b --dtype bfloat16 --remat full --loss mopo_pairwise \
  --pairs 8 --prompt-len 512 --response-len 512 --steps 10 --no-torch | tee "${OUT:-.}/gpu_check.json" | python3 -c '
import json, sys
report = json.load(sys.stdin)
step = report["steps"]["mopo_pairwise"]
print(f"device: {report[\"device\"][\"kind\"]} x{report[\"device\"][\"count\"]}")
print(f"step: {step[\"seconds_per_step\"]:.3f} s, {step[\"tokens_per_second\"]:.0f} tokens/s, MFU {100 * step[\"mfu\"]:.1f}%")
print(f"peak memory: {(step[\"peak_bytes_in_use\"] or 0) / 2**30:.2f} GiB")
'
