#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian/Ubuntu, as root), so that the sbatch scripts
# in slurm/, requeueing and submitit's SlurmExecutor can be run and tested without a cluster.
#
#   tools/slurm_local.sh start     install slurm-wlm + munge if needed, start munged, slurmctld, slurmd
#   tools/slurm_local.sh status    sinfo and squeue of the local cluster
#   tools/slurm_local.sh stop      cancel its jobs, stop its daemons, delete its directory
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives under one
# directory, HPCGRAFT_SLURM_DIR (default /tmp/hpcgraft-slurm); /etc/slurm and the system munged are
# left alone. The daemons read that slurm.conf through -f; clients (sbatch, srun, sinfo, and submitit,
# which calls them) find it through SLURM_CONF, which `start` prints. HPCGRAFT_SLURM_PORT (default
# 6817; slurmd uses the next port) moves the daemons off the standard ports.
#
# The node is this host with CPUs=nproc, no GPUs (GRES), and a partition "debug" that overcommits:
# ask for more tasks than CPUs with `--nodes=1 --overcommit`. `start` on a running cluster only
# reprints how to use it.
set -euo pipefail

dir=${HPCGRAFT_SLURM_DIR:-/tmp/hpcgraft-slurm}
port=${HPCGRAFT_SLURM_PORT:-6817}
conf=$dir/slurm.conf
munge_socket=$dir/munge/munge.socket
export SLURM_CONF=$conf

die() { echo "slurm_local: $*" >&2; exit 1; }

pid_alive() { [ -s "$1" ] && ps -p "$(cat "$1")" >/dev/null 2>&1; }  # ps: works for any user

daemons_alive() { pid_alive "$dir/munged.pid" && pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid"; }

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get; install them with the system's package manager"
    echo "slurm_local: installing slurm-wlm and munge with apt-get (a minute or two)"
    apt-get update -q >"$dir/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
        >>"$dir/apt.log" 2>&1 || die "apt-get install slurm-wlm munge failed; see $dir/apt.log"
}

write_config() {
    local host cpus mem first_job_id
    host=$(hostname)
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # leave the OS its share
    first_job_id=$(($(date +%s) % 670000 * 100 + 1))  # a block of 100 ids per second of start, below 67108863
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 755 "$dir/munge"  # clients of any user reach the socket; the key itself is 0600
    cat >"$conf" <<EOF
# Written by tools/slurm_local.sh: a one-node test cluster; delete with tools/slurm_local.sh stop.
ClusterName=hpcgraft-local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
# cred_expire: how long a requeued job waits before it may start again (SLURM's default: 120 s)
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
PlugStackConfig=$dir/plugstack.conf
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
# Job ids differ between restarts of this cluster: MPICH names its shared memory after "<job id>.<step>",
# so a reused id would meet the files of a killed earlier job with that id.
FirstJobId=$first_job_id
# schedule pending (e.g. requeued) jobs within seconds instead of SLURM's default minute
SchedulerParameters=sched_interval=2
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    : >"$dir/plugstack.conf"  # no SPANK plugins (the system's plugstack.conf may name some)
}

start_munged() {
    pid_alive "$dir/munged.pid" && return
    if [ ! -s "$dir/munge/munge.key" ]; then
        (umask 077 && head -c 1024 /dev/urandom >"$dir/munge/munge.key")
    fi
    munged --force --socket="$munge_socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
        || die "munged did not start; see $dir/munge/munged.log"
}

wait_idle() {
    local state=""
    for _ in $(seq 60); do
        state=$(node_state)
        case $state in idle | mix | alloc) return ;; esac
        sleep 0.5
    done
    tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    die "the node did not become idle within 30 s (state: '${state:-no answer}'); logs above, in $dir"
}

usage_hint() {
    cat <<EOF
slurm_local: one-node SLURM cluster up ($(hostname), $(nproc) CPUs, partition debug); files in $dir
  export SLURM_CONF=$conf
  sinfo; sbatch --nodes=1 --ntasks=4 --overcommit --wrap 'srun --mpi=pmi2 hostname'
  HPCGRAFT_TASKS_PER_NODE=2 bash slurm/graft_cifar.sh data.name=digits model.name=digits_resnet
  tools/slurm_local.sh stop      (cancel jobs, stop the daemons, delete $dir)
EOF
}

stop_pidfile() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop_cluster() {
    if pid_alive "$dir/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
}

cmd=${1:-}
case $cmd in
start)
    [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and runs slurmd as root); run it with sudo"
    if [ -f "$conf" ] && daemons_alive && [ -n "$(node_state)" ]; then
        usage_hint
        exit 0
    fi
    mkdir -p "$dir"
    install
    stop_cluster  # a half-started or crashed earlier instance
    rm -rf "$dir/state" "$dir/spool"
    write_config
    start_munged
    slurmctld -f "$conf" -i || die "slurmctld did not start; see $dir/slurmctld.log"
    slurmd -f "$conf" || die "slurmd did not start; see $dir/slurmd.log"
    wait_idle
    usage_hint
    ;;
stop)
    [ -d "$dir" ] || { echo "slurm_local: nothing to stop ($dir does not exist)"; exit 0; }
    [ "$(id -u)" = 0 ] || die "stop needs root (the daemons run as root); run it with sudo"
    stop_cluster
    rm -rf "$dir"
    echo "slurm_local: stopped; removed $dir"
    ;;
status)
    if [ ! -f "$conf" ] || ! daemons_alive; then
        echo "slurm_local: not running (no live daemons for $dir); start it with: tools/slurm_local.sh start"
        exit 3
    fi
    echo "export SLURM_CONF=$conf"
    sinfo
    squeue
    ;;
*)
    die "usage: tools/slurm_local.sh start|stop|status (HPCGRAFT_SLURM_DIR=$dir)"
    ;;
esac
