#!/usr/bin/env bash
# launch/run.sh: this node's part of a monosem training run (one node or many), set up from the
# environment and started with `accelerate launch`. Run it once per node, from the repository root
# (or anywhere: CONFIG may be absolute), with the same variables on every node except NODE_RANK.
#
#   CONFIG=configs/paper.toml bash launch/run.sh                        # one node, every GPU on it
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 CONFIG=configs/paper.toml \
#       bash launch/run.sh --train_sae.steps=2000      # node 0; node 1 the same with NODE_RANK=1
#   VERB=train-lm CONFIG=configs/paper.toml bash launch/run.sh          # the LM, data parallel
#   sbatch launch/slurm.sbatch                                          # Slurm sets all of them
#
# Variables (defaults in brackets):
#   CONFIG          the run's TOML recipe (required)
#   VERB            monosem verb: train-sae or train-lm [train-sae]
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's rank, 0..NNODES-1 (required when NNODES > 1) [0]
#   NPROC_PER_NODE  processes on this node [the number of visible GPUs, or 1 without a GPU]
#   MASTER_ADDR     address of node 0, reachable from every node (required when NNODES > 1) [127.0.0.1]
#   MASTER_PORT     a free TCP port on node 0 (required when NNODES > 1) [0: any free port]
#   ACCELERATE_ARGS extra `accelerate launch` options, split on spaces (e.g. "--max_restarts 0")
#   PYTHON          the interpreter that has monosem installed [python]
#   DRY_RUN=1       print the launch command and exit (checks the variables, starts nothing)
# Arguments after the script's name go to monosem unchanged: --section.key=value overrides, --resume.
#
# Without a GPU it exports ACCELERATE_USE_CPU=1 (gloo, see ENVIRONMENT.md section 1) and gives each
# process an equal share of the cores (OMP_NUM_THREADS) unless set. Each launch gets its own TMPDIR
# (torchelastic leaves a torchelastic_* folder per launch there), removed at exit. SIGTERM/SIGINT are
# passed on to the launcher: the trainers write a checkpoint and exit 0 (resume with --resume).
# Multi-node: the run folder (run.root) must be on a filesystem that every node sees.
set -euo pipefail

die() { echo "launch/run.sh: $*" >&2; exit 2; }
int_var() {  # int_var NAME MIN: $NAME must be an integer >= MIN
    local v="${!1}"
    [[ "$v" =~ ^[0-9]+$ ]] && (( v >= $2 )) || die "$1=$v is not an integer >= $2"
}

PYTHON="${PYTHON:-python}"
VERB="${VERB:-train-sae}"
NNODES="${NNODES:-1}"
[[ -n "${CONFIG:-}" ]] || die "CONFIG is not set: name the run's recipe, e.g. CONFIG=configs/paper.toml"
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file (from $(pwd))"
case "$VERB" in
    train-sae|train-lm) ;;
    *) die "VERB=$VERB: run.sh launches train-sae or train-lm (run \`monosem prepare\` once, unlaunched)" ;;
esac
int_var NNODES 1
if (( NNODES > 1 )); then
    for v in NODE_RANK MASTER_ADDR MASTER_PORT; do
        [[ -n "${!v:-}" ]] || die "$v is not set; NNODES=$NNODES needs NODE_RANK (this node, 0..$((NNODES - 1))), \
MASTER_ADDR (node 0's address) and MASTER_PORT (a free port on node 0), the same on every node but NODE_RANK"
    done
    int_var MASTER_PORT 1
fi
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-0}"
int_var NODE_RANK 0
int_var MASTER_PORT 0
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"

if [[ "${ACCELERATE_USE_CPU:-}" =~ ^(1|true|yes)$ ]] || ! command -v nvidia-smi >/dev/null; then
    GPUS=0  # (no NVIDIA driver tools: no CUDA GPU; skips a torch import)
else
    GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" \
        || die "$PYTHON cannot import torch (set PYTHON to the interpreter monosem is installed in)"
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}"
int_var NPROC_PER_NODE 1
if (( GPUS == 0 )); then
    export ACCELERATE_USE_CPU=1  # else each process of a GPU-less launch trains alone (world size 1)
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))}"
elif (( NPROC_PER_NODE > GPUS )); then
    die "NPROC_PER_NODE=$NPROC_PER_NODE but this node has $GPUS visible GPU(s)"
fi

total=$(( NNODES * NPROC_PER_NODE ))
read -r -a extra <<< "${ACCELERATE_ARGS:-}"
cmd=("$PYTHON" -m accelerate.commands.launch --num_processes "$total" --mixed_precision no
     --dynamo_backend no)
if (( total > 1 )); then
    [[ " ${extra[*]} " == *" --use_deepspeed "* ]] || cmd+=(--multi_gpu)
    cmd+=(--num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR"
          --main_process_port "$MASTER_PORT" --rdzv_backend static --same_network)
fi
cmd+=("${extra[@]}" -m monosem "$VERB" "$CONFIG" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi

launch_tmp="$(mktemp -d "${TMPDIR:-/tmp}/monosem-launch.XXXXXX")"
trap 'rm -rf "$launch_tmp"' EXIT
export TMPDIR="$launch_tmp"
echo "launch/run.sh: node $NODE_RANK/$NNODES, $NPROC_PER_NODE process(es) here, $total in all, \
master $MASTER_ADDR:$MASTER_PORT, $([[ $GPUS == 0 ]] && echo "CPU, OMP_NUM_THREADS=$OMP_NUM_THREADS" || echo "$GPUS GPU(s)")" >&2

# In the background so that SIGTERM/SIGINT reach the launcher (the trainers then checkpoint and stop).
"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do  # the wait was cut short by a signal: wait for the real exit
    rc=0
    wait "$child" || rc=$?
done
exit "$rc"
