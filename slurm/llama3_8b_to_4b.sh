#!/bin/bash
# Llama-3.1-8B -> 4.5B (Minitron width shape) on 4 nodes of 8x H100-80GB; plan figures in docs/decoders.md.
#
#   sbatch slurm/llama3_8b_to_4b.sh                          # from the repository root
#   sbatch slurm/llama3_8b_to_4b.sh trainer.max_steps=100    # named key=value overrides pass through
#   sbatch --nodes=8 slurm/llama3_8b_to_4b.sh deepspeed.gradient_accumulation_steps=4   # 64 GPUs, same global batch
#
# Requeue / resume: the run lives in runs/<job name>/ (not the job id), so a requeued job *and* a
# resubmission of the same script resume from runs/<job name>/checkpoints/latest. Use
# `sbatch --job-name=other ...` (or trainer.output_dir=...) to start a separate run.
# When the time limit is near, Slurm sends USR1 to this script (--signal below): the tasks get
# SIGTERM and the job requeues itself. See docs/slurm.md.
#
#SBATCH --job-name=llama3_8b_to_4b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

CONFIG=configs/llama3_8b_to_4b.yaml

# ---- launch, shared by every script of slurm/ (Slurm runs a copy of this script from its spool
# directory: the shared part is found from the directory sbatch was called in, the repository root)
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" "$@"
