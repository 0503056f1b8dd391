#!/bin/bash
# HomoBERT-tiny (14.1M) from bert-base-uncased: the paper's recipe on one node of 8x A100-80GB.
#
#   sbatch slurm/homobert_tiny.sh                          # from the repository root
#   sbatch slurm/homobert_tiny.sh trainer.max_steps=100    # named key=value overrides pass through
#   sbatch --nodes=2 slurm/homobert_tiny.sh deepspeed.gradient_accumulation_steps=2   # 16 GPUs, same global batch
#
# Requeue / resume: the run lives in runs/<job name>/ (not the job id), so a requeued job *and* a
# resubmission of the same script resume from runs/<job name>/checkpoints/latest. Use
# `sbatch --job-name=other ...` (or trainer.output_dir=...) to start a separate run.
# When the time limit is near, Slurm sends USR1 to this script (--signal below): the tasks get
# SIGTERM and the job requeues itself. See docs/slurm.md.
#
#SBATCH --job-name=homobert_tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

CONFIG=configs/homobert_tiny.yaml

# ---- launch, shared by every script of slurm/ (Slurm runs a copy of this script from its spool
# directory: the shared part is found from the directory sbatch was called in, the repository root)
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" "$@"
