#!/bin/bash
# Run inside a restarted (requeued) job, before its MPI step, and after a failed MPI step: removes the
# shared-memory files that MPICH ranks of this job left in /dev/shm when they were killed instead of
# exiting (their supervisors, which would remove them, are killed with them when SLURM aborts a step).
#
# Why: MPICH names its node-local shared memory after a hash of the PMI key-value-space name, which
# under srun is "<job id>.<step id>". A requeued job keeps its id and numbers its steps from 0 again, so
# its ranks open the dead start's files, read stale messages and fail in MPI_Init or hang there. Only
# those exact names are removed (FNV-1a of "<job id>.<step>" for the steps 0 .. LAST, the argument,
# default 1: the training step is step 0, or step 1 after the cleanup step this script runs on multi-node
# restarts; later steps after a lost node), on every node of the job. Other MPIs do not create these
# files; then this does nothing.
set -u
[ -n "${SLURM_JOB_ID:-}" ] || { echo "clean_mpich_shm.sh: run it inside a SLURM job" >&2; exit 2; }

fnv1a() {
    local s=$1 h=2166136261 i c
    for ((i = 0; i < ${#s}; i++)); do
        printf -v c '%d' "'${s:i:1}"
        h=$(((h ^ c) * 16777619 & 0xffffffff))
    done
    printf '%x' "$h"
}

patterns=""
last=${1:-1}
[[ $last =~ ^[0-9]+$ ]] || { echo "clean_mpich_shm.sh: LAST=$last is not a step number" >&2; exit 2; }
for ((step = 0; step <= last; step++)); do
    h=$(fnv1a "$SLURM_JOB_ID.$step")
    patterns+=" /dev/shm/mpich_shm_${h}_* /dev/shm/mpich_vci_${h}_*"
done
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task=1 \
        bash -c "rm -f $patterns"
else
    # shellcheck disable=SC2086 # the patterns are globs
    rm -f $patterns
fi
