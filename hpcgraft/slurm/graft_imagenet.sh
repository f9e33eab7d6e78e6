#!/bin/bash
# Filter grafting on ImageNet under SLURM: one MPI rank per GPU, every rank trains one peer (or, with
# dist.replicas=R, R ranks data-parallel per peer).
#
#   bash slurm/graft_imagenet.sh [key=value ...]
#       submits this script with sbatch; the job shape (nodes, ranks, GPUs, time...) comes from the
#       variables below. Run it from anywhere; the job runs in the repository root.
#   sbatch [sbatch options] slurm/graft_imagenet.sh [key=value ...]
#       the same job with the shape from your sbatch options (submit from the repository root).
#
# key=value arguments are config overrides for hpcgraft.train, e.g. data.workers=12 dist.replicas=2.
# Every variable below can be overridden from the environment as HPCGRAFT_<NAME> (HPCGRAFT_NODES=4,
# HPCGRAFT_GPUS_PER_NODE=0 ...), so neither users nor tests need to edit this file. Extra sbatch options
# (--qos, --constraint, --exclusive ...) go in HPCGRAFT_SBATCH_ARGS.
#
# Time limit and requeue: SLURM sends USR1 to this script 600 s before the limit (and so does
# `scancel --signal=USR1 --batch JOBID`); the script passes it to every rank, the ranks agree on a step,
# write a checkpoint and exit 75, and the job requeues itself; the next start resumes in the same run
# directory. Exit 0 (finished) or any failure ends the job without requeueing. Requeued starts append
# to the same log, %x-%j.out (job name - job id) in the directory it was submitted from.
#
# A failed start: MPI's wire-up through the launcher can fail or hang (exit 69 after START_TIMEOUT, each
# rank's supervisor ending it); nothing was trained, and the script starts the step again, START_RETRIES
# times at most.
#
# A lost node (--no-kill): SLURM ends the training step and takes the node out of the job; the script
# starts the next step on the nodes left, which resumes from the last checkpoint with the same peers
# (graft.peers=K: K / ranks per rank). NODES=MIN-MAX lets SLURM start the job on fewer nodes too; K must
# fit every node count in the range (checked before sbatch). docs/cluster.md, "Elastic runs".
#
# GPUs: one per rank (--gpus-per-task=1); how ranks find theirs is explained in slurm/graft_cifar.sh.
#
#SBATCH --job-name=graft-imagenet
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=B:USR1@600

# ------------------------------------------------------------------- what a user edits
NODES=${HPCGRAFT_NODES:-2}                   # N, or MIN-MAX (e.g. 2-4): as many as SLURM can give
GPUS_PER_NODE=${HPCGRAFT_GPUS_PER_NODE:-4}     # ranks per node = GPUs per node; 0: CPU ranks, see next line
TASKS_PER_NODE=${HPCGRAFT_TASKS_PER_NODE:-2}   # CPU ranks per node, only when GPUS_PER_NODE=0
CPUS_PER_TASK=${HPCGRAFT_CPUS_PER_TASK:-16}    # CPU cores per rank: JPEG decoding (set data.workers to match)
PARTITION=${HPCGRAFT_PARTITION:-}              # empty: the cluster's default partition
ACCOUNT=${HPCGRAFT_ACCOUNT:-}                  # empty: your default account
TIME=${HPCGRAFT_TIME:-24:00:00}                # per start; longer runs requeue and resume
CONFIG=${HPCGRAFT_CONFIG:-configs/imagenet_resnet18.yaml}
DATA=${HPCGRAFT_DATA:-}                        # data.root: train/ + val/ folders or packed shards; empty: the config's
RUN_DIR=${HPCGRAFT_RUN_DIR:-}                  # empty: runs/<job name>-<job id>, kept across requeues
PYTHON=${HPCGRAFT_PYTHON:-.venv/bin/python}    # relative to the repository root
SRUN_MPI=${HPCGRAFT_SRUN_MPI:-pmi2}            # srun --mpi=...: pmi2 for the MPICH wheel; pmix for many site MPIs
START_TIMEOUT=${HPCGRAFT_START_TIMEOUT:-600}   # seconds a rank may take to start MPI; past it the step ends (exit 69)
START_RETRIES=${HPCGRAFT_START_RETRIES:-2}     # a step whose ranks could not start MPI is started again this often
# ------------------------------------------------------------------- no edits needed below

HPCGRAFT_SCRIPT=$(realpath "$0")
here=$(dirname "$HPCGRAFT_SCRIPT")
[ -f "$here/common.sh" ] || here=${HPCGRAFT_SCRIPTS:-${HPCGRAFT_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm}  # sbatch runs a copy
# shellcheck source=slurm/common.sh
. "$here/common.sh" 2>/dev/null || { echo "graft_imagenet.sh: common.sh not found next to it; submit with bash, from the repository root, or set HPCGRAFT_SCRIPTS" >&2; exit 2; }
hpcgraft_main "$@"
