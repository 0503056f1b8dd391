#!/bin/bash
# The launch shared by the sbatch scripts of slurm/: sourced by them (never run directly) after
# they have set CONFIG and moved to the submit directory; "$@" are the key=value overrides.
# One task per GPU runs `homodistil distill $CONFIG trainer.output_dir=runs/<job name> "$@"`;
# USR1 near the time limit saves a checkpoint and requeues the job (see docs/slurm.md).

if [ -z "${CONFIG:-}" ]; then
    echo "slurm/launch.sh is sourced by the sbatch scripts of slurm/ (e.g. sbatch slurm/homobert_base.sh)" >&2
    exit 2
fi

# ---- where we are ---------------------------------------------------------------------------
# Every path is relative to the directory sbatch was called from (the repository root). logs/
# must exist before sbatch runs: Slurm opens --output before the script starts and does not
# create directories.
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "submit this script with sbatch (see the header); for one machine run: homodistil distill $CONFIG" >&2
    exit 2
fi
cd "$SLURM_SUBMIT_DIR" || exit 1
# The job name becomes the output directory runs/<job name>: a name such as ../x would write
# outside runs/, so only plain file names are accepted.
if [[ ! "$SLURM_JOB_NAME" =~ ^[A-Za-z0-9._-]+$ || "$SLURM_JOB_NAME" == *..* ]]; then
    echo "homodistil: error: job name '$SLURM_JOB_NAME' must use only A-Z a-z 0-9 . _ - (and no '..'): it names runs/<job name>" >&2
    exit 2
fi

# ---- which homodistil -----------------------------------------------------------------------
# HOMODISTIL_CMD (the whole command, e.g. "/opt/venv/bin/homodistil") or HOMODISTIL_PYTHON (a
# python with homodistil installed, run as `python -m homodistil.cli`); else `homodistil` on PATH.
if [ -n "${HOMODISTIL_CMD:-}" ]; then
    read -r -a HD_CMD <<< "$HOMODISTIL_CMD"
elif [ -n "${HOMODISTIL_PYTHON:-}" ]; then
    HD_CMD=("$HOMODISTIL_PYTHON" -m homodistil.cli)
elif command -v homodistil > /dev/null; then
    HD_CMD=(homodistil)
else
    HD_CMD=(python3 -m homodistil.cli)
fi

# ---- distributed environment ----------------------------------------------------------------
# One task per GPU; each task derives RANK / WORLD_SIZE / LOCAL_RANK from SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID. Stale torchrun variables from the submitting shell would win, so drop them.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
# Rendezvous on the job's first node (where this batch script runs), on a port the kernel finds
# free there now: a port derived from the job id could be predicted and taken by another user,
# or collide with another job. Each (re)start of the job picks again.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$(python3 -c 'import socket, sys
with socket.socket() as s:
    s.bind((sys.argv[1], 0))
    print(s.getsockname()[1])' "$MASTER_ADDR") || {
    echo "homodistil: error: no free port on $MASTER_ADDR for the rendezvous" >&2
    exit 1
}
export MASTER_ADDR MASTER_PORT
# CPU threads per task: the CPUs Slurm gave it (oversubscribed OpenMP threads slow steps badly).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# srun (Slurm >= 22.05) no longer inherits --cpus-per-task from sbatch: pass it on explicitly.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export TOKENIZERS_PARALLELISM=false
# NCCL: a rank that dies makes the others raise instead of hanging in a collective until the
# time limit (then --kill-on-bad-exit below ends the step and the job can be requeued).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# WARN prints real problems only; use INFO to see the rings/transport chosen (IB vs sockets).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Multi-node: if NCCL picks the wrong network (docker0, a management NIC) and hangs at init,
# name the interface (and InfiniBand adapters) of your cluster here:
# export NCCL_SOCKET_IFNAME=ib0          # or eth0, ^docker0,lo
# export NCCL_IB_HCA=mlx5                 # InfiniBand HCAs to use
# Hub datasets and the teacher are cached here; set HF_HOME to shared storage on clusters.
# export HF_HOME=/shared/cache/huggingface

# ---- requeue on time limit ------------------------------------------------------------------
# 300 s before the limit Slurm sends USR1 to this batch shell only (--signal=B:USR1@300; by hand:
# `scancel --batch --signal=USR1 JOBID`). We pass SIGTERM to the tasks of the running step (not
# through srun, which would kill them): homodistil saves a checkpoint on all ranks and exits,
# then the job requeues itself (Slurm starts it again after ~2 min) and resumes from there.
# Preemption: with --requeue and PreemptMode=REQUEUE Slurm requeues the job itself; the tasks
# get SIGTERM and save if the partition's GraceTime allows, else it resumes from the last
# trainer.save_every checkpoint.
requeue() {
    echo "homodistil: $(date -Is) job $SLURM_JOB_ID near its time limit: saving, then requeueing"
    REQUEUE=1
    scancel --signal=TERM "$SLURM_JOB_ID"
}
trap requeue USR1
REQUEUE=0

echo "homodistil: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, command ${HD_CMD[*]}"

# ---- launch: one process per GPU; "$@" (named key=value overrides) comes last and wins ---------
srun --kill-on-bad-exit=1 --label "${HD_CMD[@]}" distill "$CONFIG" trainer.output_dir="runs/$SLURM_JOB_NAME" "$@" &

SRUN_PID=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun has exited.
while :; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2> /dev/null || break
done
if [ "$REQUEUE" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$rc"
