# Shared part of slurm/graft_*.sh; sourced by them after their variable block, never run on its own.
#
# Outside a job it submits the calling script with sbatch, the job shape taken from the variables;
# inside a job it starts one MPI rank per task with srun and turns the training's exit status into
# the job's fate: 0 finished, 75 (a checkpoint was written on SIGUSR1) requeue, anything else failed.

hpcgraft_die() {
    echo "$(basename "$HPCGRAFT_SCRIPT"): $*" >&2
    exit 2
}

# Where the job runs, and what relative paths (CONFIG, DATA, RUN_DIR, PYTHON) are relative to: the
# repository root when these scripts are the checkout's (hpcgraft/slurm/, also reached as slurm/), else
# (scripts written out by `python -m hpcgraft.slurm DIR`) the directory they are submitted from.
# HPCGRAFT_ROOT overrides it; submitting exports it, and HPCGRAFT_SCRIPTS, for the job.
HPCGRAFT_SCRIPTS=$(cd "$here" && pwd -P)
if [ -z "${HPCGRAFT_ROOT:-}" ]; then
    if [ -f "$HPCGRAFT_SCRIPTS/__init__.py" ] && [ -f "$HPCGRAFT_SCRIPTS/../../pyproject.toml" ]; then
        HPCGRAFT_ROOT=$(cd "$HPCGRAFT_SCRIPTS/../.." && pwd)
    else
        HPCGRAFT_ROOT=${SLURM_SUBMIT_DIR:-$PWD}
    fi
fi

# A path from the variables as the job will see it: relative paths are relative to HPCGRAFT_ROOT.
hpcgraft_path() { case $1 in /*) echo "$1" ;; *) echo "$HPCGRAFT_ROOT/$1" ;; esac; }

# Submit mode: `bash slurm/graft_X.sh key=value ...` -> sbatch <shape from the variables> slurm/graft_X.sh key=value ...
# The log goes to the current directory, as with a plain sbatch.
hpcgraft_submit() {
    if [[ $PYTHON == */* ]]; then [ -x "$(hpcgraft_path "$PYTHON")" ]; else command -v "$PYTHON" >/dev/null; fi || hpcgraft_die "python $PYTHON not found; run 'make setup' or set HPCGRAFT_PYTHON"
    local ranks=$GPUS_PER_NODE
    [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null || ranks=$TASKS_PER_NODE
    [ "$ranks" -gt 0 ] 2>/dev/null || hpcgraft_die "GPUS_PER_NODE=$GPUS_PER_NODE and TASKS_PER_NODE=$TASKS_PER_NODE: need GPUs per node > 0, or 0 GPUs and TASKS_PER_NODE > 0 CPU ranks"
    local lead limit
    lead=$(sed -n 's/^#SBATCH --signal=B:USR1@//p' "$HPCGRAFT_SCRIPT" | head -n1)
    case $TIME in
    UNLIMITED | unlimited | INFINITE | infinite) limit=$((lead + 1)) ;;
    *) limit=$(hpcgraft_seconds "$TIME") || hpcgraft_die "TIME=$TIME is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])" ;;
    esac
    [ "$limit" -gt "${lead:-0}" ] || hpcgraft_die "TIME=$TIME is not longer than the ${lead} s warning before the limit (#SBATCH --signal): every start would stop at once; ask for more time"
    [[ $START_TIMEOUT =~ ^[0-9]+$ ]] || hpcgraft_die "START_TIMEOUT=$START_TIMEOUT is not a number of seconds (the time a rank may take to start MPI; 0: no limit)"
    [[ $START_RETRIES =~ ^[0-9]+$ ]] || hpcgraft_die "START_RETRIES=$START_RETRIES is not a count (how often a step whose ranks could not start MPI is started again; 0: never)"
    command -v sbatch >/dev/null || hpcgraft_die "sbatch not found: run this on a SLURM login node (for a local test cluster: sudo tools/slurm_local.sh start, then export SLURM_CONF=...)"
    # The config with the overrides, and the shape against sinfo (hpcgraft.launch's check): what can never
    # start is refused here, with the command line that would, instead of pending forever in the queue.
    (cd "$HPCGRAFT_ROOT" && "$PYTHON" -m hpcgraft.slurm.check --prog "$(basename "$HPCGRAFT_SCRIPT")" \
        --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --tasks-per-node "$TASKS_PER_NODE" \
        --cpus-per-task "$CPUS_PER_TASK" --partition "$PARTITION" --config "$CONFIG" --command "bash $0" -- "$@") || exit 2
    local opts=(--nodes="$NODES" --ntasks-per-node="$ranks" --cpus-per-task="$CPUS_PER_TASK" --time="$TIME")
    [ "$GPUS_PER_NODE" -gt 0 ] && opts+=(--gpus-per-task=1)
    [ -n "$PARTITION" ] && opts+=(--partition="$PARTITION")
    [ -n "$ACCOUNT" ] && opts+=(--account="$ACCOUNT")
    # shellcheck disable=SC2206 # word splitting is the point: extra sbatch options
    opts+=(${HPCGRAFT_SBATCH_ARGS:-})
    local out id
    out=$(sbatch --parsable "${opts[@]}" "$HPCGRAFT_SCRIPT" "$@") || exit $?
    id=${out%%;*}
    echo "Submitted batch job $id"
    echo "  $(hpcgraft_plural "$NODES" node) x $(hpcgraft_plural "$ranks" rank) per node ($([ "$GPUS_PER_NODE" -gt 0 ] && echo "one per GPU" || echo "CPU")); log: $PWD/$(hpcgraft_job_name)-$id.out"
    echo "  run dir: $(hpcgraft_path "$(SLURM_JOB_ID=$id SLURM_JOB_NAME=$(hpcgraft_job_name) hpcgraft_run_dir)")"
}

# SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds.
hpcgraft_seconds() {
    local t=$1 d=0 a b c
    [[ $t =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 1
    if [[ $t == *-* ]]; then
        d=${t%%-*}
        IFS=: read -r a b c <<<"${t#*-}"
        echo $((d * 86400 + 10#$a * 3600 + 10#${b:-0} * 60 + 10#${c:-0}))
        return
    fi
    IFS=: read -r a b c <<<"$t"
    if [ -n "$c" ]; then echo $((10#$a * 3600 + 10#$b * 60 + 10#$c)); else echo $((10#$a * 60 + 10#${b:-0})); fi
}

hpcgraft_plural() { if [ "$1" = 1 ]; then echo "$1 $2"; else echo "$1 ${2}s"; fi; }  # as hpcgraft.text.plural

hpcgraft_job_name() { sed -n 's/^#SBATCH --job-name=//p' "$HPCGRAFT_SCRIPT" | head -n1; }

# The number of tasks srun starts: SLURM_NTASKS, which plain sbatch without --ntasks leaves unset; then
# the sum of SLURM_TASKS_PER_NODE ("2(x3),1" is 2+2+2+1).
hpcgraft_tasks() {
    [ -n "${SLURM_NTASKS:-}" ] && { echo "$SLURM_NTASKS"; return; }
    local n=0 part count times
    for part in ${SLURM_TASKS_PER_NODE//,/ }; do
        count=${part%%(*} times=1
        [[ $part == *'(x'* ]] && times=${part#*(x} && times=${times%)}
        n=$((n + count * times))
    done
    echo "$n"
}

hpcgraft_run_dir() { echo "${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}"; }

# The nodes the job holds now: with --no-kill SLURM takes a lost node out of the job and the job goes on.
hpcgraft_job_nodes() { scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *NodeList=\([^ ]*\).*/\1/p' | head -n1; }

hpcgraft_hostnames() { scontrol show hostnames "$1" 2>/dev/null; }

# Job mode: one rank per task; USR1 (time limit near, or scancel --signal=USR1 --batch) is passed on to
# every rank, which checkpoint at the same step and exit 75; then the job requeues itself and the
# next start resumes from the checkpoint in the same run directory. A node lost during a step (the job
# runs --no-kill: SLURM ends the step and takes the node out of the job) starts the next step on the
# nodes left, with the same ranks per node, and the run resumes from its last complete checkpoint; how
# many peers each rank then hosts comes from hpcgraft.slurm.check --layout.
hpcgraft_run() {
    local run_dir srun_pid="" rc nodes=$SLURM_JOB_NODELIST count=$SLURM_JOB_NUM_NODES first per_node given
    local layout ranks step=0 now lost retried=0
    run_dir=$(hpcgraft_run_dir)
    export HPCGRAFT_START_TIMEOUT=$START_TIMEOUT  # the ranks' supervisors keep the start-up clock
    trap 'echo "hpcgraft: $(date +%T) USR1: asking every rank to checkpoint and stop"; [ -n "$srun_pid" ] && kill -USR1 "$srun_pid"' USR1
    local cmd=("$PYTHON" -m hpcgraft.train --config "$CONFIG" --out "$run_dir")
    [ -n "$DATA" ] && cmd+=("data.root=$DATA")
    local srun_opts=(--mpi="$SRUN_MPI" --kill-on-bad-exit=0)
    # srun does not inherit --cpus-per-task from sbatch since SLURM 22.05
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # A requeued start after ranks were killed (preemption, a node failure) must not meet their MPI leftovers.
    [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && bash "$HPCGRAFT_SCRIPTS/clean_mpich_shm.sh"
    first=$(hpcgraft_tasks) given=$first
    per_node=${SLURM_NTASKS_PER_NODE:-}
    [ -z "$per_node" ] && [ $((first % count)) = 0 ] && per_node=$((first / count))
    while :; do
        layout=$("$PYTHON" -m hpcgraft.slurm.check --prog "$(basename "$HPCGRAFT_SCRIPT")" --layout --ranks "$given" \
            --first-ranks "$first" --config "$CONFIG" -- "$@") || exit 2  # it said why, in one line
        ranks=${layout%%|*}
        echo "hpcgraft: $(date +%T) job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1))$([ "$step" -gt 0 ] && echo ", step $((step + 1))"): $(hpcgraft_plural "$ranks" rank) on $(hpcgraft_plural "$count" node) ($nodes), ${layout#*|}; run dir $(hpcgraft_path "$run_dir")"
        local shape=()
        if [ "$step" -gt 0 ]; then  # the nodes left; more ranks than tasks per node share a node's CPUs/GPUs
            # --overlap: the killed step may linger on these nodes, holding their CPUs, until SLURM hears from the
            # lost node again.
            shape=(--overlap --nodes="$count" --ntasks="$ranks" --ntasks-per-node=$(((ranks + count - 1) / count)))
            [ "$ranks" -gt "$given" ] && shape+=(--overcommit)
        fi
        srun "${srun_opts[@]}" "${shape[@]}" "${cmd[@]}" "$@" &
        srun_pid=$!
        # `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
        while :; do
            wait "$srun_pid" && rc=0 || rc=$?
            kill -0 "$srun_pid" 2>/dev/null || break
        done
        srun_pid="" step=$((step + 1))
        case $rc in 0 | 75 | 2) break ;; esac
        # srun's status is its tasks' highest: 69 when a rank's supervisor ended it before MPI was up.
        if [ "$rc" = 69 ] && [ "$retried" -lt "$START_RETRIES" ]; then
            retried=$((retried + 1))
            echo "hpcgraft: $(date +%T) MPI did not start on every rank (exit 69); starting the step again ($retried of $START_RETRIES)"
            SLURM_JOB_NUM_NODES=$count bash "$HPCGRAFT_SCRIPTS/clean_mpich_shm.sh" $((2 * step + 1))
            continue
        fi
        now=$(hpcgraft_job_nodes)
        lost=$(comm -23 <(hpcgraft_hostnames "$nodes" | sort) <(hpcgraft_hostnames "$now" | sort) | paste -sd,)
        [ -n "$now" ] && [ -n "$lost" ] && [ -n "$per_node" ] || break
        echo "hpcgraft: $(date +%T) lost $lost (SLURM took it out of the job); going on with the nodes left ($now) from the last checkpoint"
        nodes=$now count=$(hpcgraft_hostnames "$now" | wc -l)
        given=$((count * per_node))
        # The killed step's ranks took their supervisors, and with them the removal of their shared memory.
        SLURM_JOB_NUM_NODES=$count bash "$HPCGRAFT_SCRIPTS/clean_mpich_shm.sh" $((2 * step + 1))
    done
    case $rc in
    0) echo "hpcgraft: $(date +%T) finished; metrics in $run_dir/metrics.jsonl" ;;
    75)
        # Said first: the requeue ends this shell at once.
        echo "hpcgraft: $(date +%T) checkpoint written; requeueing job $SLURM_JOB_ID, the next start resumes from $run_dir"
        if scontrol requeue "$SLURM_JOB_ID"; then
            rc=0
        else
            echo "hpcgraft: $(date +%T) checkpoint written but the job could not be requeued; resubmit the same command to resume" >&2
        fi
        ;;
    *)
        # Ranks that SLURM killed when the step was aborted (a rank lost on another node, MPI_Abort) took
        # their supervisors with them, and with them the removal of MPICH's shared memory on their node.
        SLURM_JOB_NUM_NODES=$count bash "$HPCGRAFT_SCRIPTS/clean_mpich_shm.sh" $((2 * step + 1))
        echo "hpcgraft: $(date +%T) training failed with exit status $rc; not requeued" >&2
        ;;
    esac
    exit "$rc"
}

hpcgraft_main() {
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        cd "$HPCGRAFT_ROOT" || hpcgraft_die "cannot enter $HPCGRAFT_ROOT"
        hpcgraft_run "$@"
    else
        export HPCGRAFT_ROOT HPCGRAFT_SCRIPTS  # the job runs a copy of the script and finds the rest through these
        hpcgraft_submit "$@"
    fi
}
