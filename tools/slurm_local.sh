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
# which calls them) find it through SLURM_CONF, which `start` prints. The daemons listen on ports of their
# own, chosen free at start and recorded in that slurm.conf: slurmctld on the first port from SLURM's
# default 6817 on that is free together with the next ones (one per slurmd), so that another SLURM on this
# host (a developer's own test cluster on 6817/6818) is no obstacle. HPCGRAFT_SLURM_PORT=P takes P instead.
# A start that fails stops every daemon it started, and `stop` every daemon of this cluster's slurm.conf.
#
# The node is this host with CPUs=nproc, no GPUs (GRES), and a partition "debug" that overcommits:
# ask for more tasks than CPUs with `--nodes=1 --overcommit`. `start` on a running cluster only
# reprints how to use it.
#
# HPCGRAFT_SLURM_NODES=2 (or more) makes a cluster of that many nodes, n1, n2, ..., on this one host: one
# slurmd per node (slurmd -N n1, its own port, spool, log and pid file), each node with all of the host's
# CPUs. Jobs then span nodes as on a real cluster (SLURM_NODEID, SLURM_LOCALID, MPI's node-local
# communicators), except that the nodes share this host's /dev/shm and memory.
set -euo pipefail

dir=${HPCGRAFT_SLURM_DIR:-/tmp/hpcgraft-slurm}
port=${HPCGRAFT_SLURM_PORT:-}
conf=$dir/slurm.conf
# nodes of a new cluster; a running cluster's own count for status and stop
conf_nodes=$(grep -c '^NodeName=' "$conf" 2>/dev/null || true)
nodes=${HPCGRAFT_SLURM_NODES:-${conf_nodes:-1}}
[ "$nodes" -ge 1 ] 2>/dev/null || { echo "slurm_local: HPCGRAFT_SLURM_NODES=$nodes is not a node count (1, 2, ...)" >&2; exit 2; }
munge_socket=$dir/munge/munge.socket
export SLURM_CONF=$conf

die() { echo "slurm_local: $*" >&2; exit 1; }

pid_alive() { [ -s "$1" ] && ps -p "$(cat "$1")" >/dev/null 2>&1; }  # ps: works for any user

# The node names: this host, or with HPCGRAFT_SLURM_NODES=N > 1, N nodes n1..nN served by N slurmd on this
# host, each with its own port (slurmd -N NAME; SLURM's NodeName=... Port=...).
node_names() { if [ "$nodes" -gt 1 ]; then seq -f n%g "$nodes"; else hostname; fi; }

slurmd_pidfile() { if [ "$nodes" -gt 1 ]; then echo "$dir/slurmd-$1.pid"; else echo "$dir/slurmd.pid"; fi; }

daemons_alive() {
    pid_alive "$dir/munged.pid" && pid_alive "$dir/slurmctld.pid" || return 1
    local n
    for n in $(node_names); do pid_alive "$(slurmd_pidfile "$n")" || return 1; done
}

# The state of the first node that is not up (idle, mix, alloc), else of the first node; empty: no answer.
node_state() {
    local all
    all=$(sinfo -h -N -o %t 2>/dev/null) || return 0
    grep -v -x -E 'idle|mix|alloc' <<<"$all" | head -n1 | grep . || head -n1 <<<"$all"
}

# TCP ports some process listens on (IPv4 and IPv6), from the kernel's tables: no tool needed.
listening_ports() {
    local addr state
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | while read -r _ addr _ state _; do
        [ "$state" = 0A ] && echo $((16#${addr##*:}))
    done
    return 0
}

# The first port P from $1 on such that P (slurmctld) up to P+nodes (the slurmd's) are all free.
free_ports_from() {
    local p=$1 i busy
    busy=" $(listening_ports | tr '\n' ' ') "
    while [ "$p" -le $((65535 - nodes)) ]; do
        for ((i = 0; i <= nodes; i++)); do
            [[ $busy == *" $((p + i)) "* ]] && break
        done
        [ "$i" -gt "$nodes" ] && { echo "$p"; return; }
        p=$((p + i + 1))
    done
    die "no $((nodes + 1)) consecutive free TCP ports from $1 on; set HPCGRAFT_SLURM_PORT"
}

# Daemons of this cluster, found by their arguments (this slurm.conf, this munge socket), also those whose pid
# file a failed or interrupted start never wrote.
own_pids() {
    local cmdline args arg
    for cmdline in /proc/[0-9]*/cmdline; do
        mapfile -d '' args <"$cmdline" 2>/dev/null || continue
        case ${args[0]:-} in */slurmctld | slurmctld | */slurmd | slurmd | */munged | munged) ;; *) continue ;; esac
        for arg in "${args[@]:1}"; do
            if [ "$arg" = "$conf" ] || [ "$arg" = "--socket=$munge_socket" ]; then
                basename "$(dirname "$cmdline")"
                break
            fi
        done
    done
    return 0
}

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
    local suffix="" node_lines="NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN" i
    if [ "$nodes" -gt 1 ]; then
        # Every node claims all CPUs of this host (they share them) and its share of the memory.
        suffix=-%n node_lines=""
        for i in $(seq "$nodes"); do
            [ "$i" = 1 ] || node_lines+=$'\n'
            node_lines+="NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus RealMemory=$((mem / nodes)) State=UNKNOWN"
        done
    fi
    mkdir -p "$dir/state" "$dir/munge"
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
SlurmdSpoolDir=$dir/spool$suffix
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd$suffix.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd$suffix.log
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
# A node whose slurmd stops answering is DOWN after this many seconds (SLURM's default: 300), and its jobs
# end (NODE_FAIL) and, with --requeue, go back into the queue: tests of a lost node wait this long.
SlurmdTimeout=30
$node_lines
PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
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
        # a daemon that exited (a port in use, a value it refuses) fails the start now, not after the wait
        daemons_alive || { tail -n 5 "$dir"/slurm*.log >&2 || true; die "a daemon exited during start; logs above, in $dir"; }
        state=$(node_state)
        case $state in idle | mix | alloc) return ;; esac  # every node is up
        sleep 0.5
    done
    tail -n 5 "$dir"/slurm*.log >&2 || true
    die "the node did not become idle within 30 s (state: '${state:-no answer}'); logs above, in $dir"
}

usage_hint() {
    # The example fits the cluster as started: CPU ranks (no GPUs here), two per node, sharing the CPUs.
    local cpt=$(($(nproc) / 2)) what="one-node SLURM cluster up ($(hostname)"
    [ "$cpt" -ge 1 ] || cpt=1
    [ "$nodes" -gt 1 ] && what="$nodes-node SLURM cluster up ($(node_names | paste -sd,) on $(hostname)"
    cat <<EOF
slurm_local: $what, $(nproc) CPUs per node, partition debug); files in $dir
  export SLURM_CONF=$conf
  sinfo; sbatch --nodes=$nodes --ntasks-per-node=2 --overcommit --wrap 'srun --mpi=pmi2 hostname'
  HPCGRAFT_NODES=$nodes HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_TASKS_PER_NODE=2 HPCGRAFT_CPUS_PER_TASK=$cpt HPCGRAFT_CONFIG=configs/digits.yaml bash slurm/graft_cifar.sh train.epochs=3
      (from the repository root: $nodes x 2 CPU ranks grafting on the digits data, 3 epochs)
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
    local f pid
    for f in "$dir"/slurmd*.pid; do stop_pidfile "$f"; done
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
    for pid in $(own_pids); do  # started without a pid file (a failed start), or its pid file deleted
        kill -9 "$pid" 2>/dev/null || true
    done
}

# A start that fails leaves no daemon running (each would hold its port and the munge socket).
stop_failed_start() {
    local rc=$?
    [ "$rc" = 0 ] && return
    echo "slurm_local: start failed; stopping the daemons it started" >&2
    stop_cluster 2>/dev/null || true
    exit "$rc"
}

cmd=${1:-}
case $cmd in
start)
    [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and runs slurmd as root); run it with sudo"
    if [ -f "$conf" ] && [ "$conf_nodes" = "$nodes" ] && daemons_alive && [ -n "$(node_state)" ]; then
        usage_hint
        exit 0
    fi  # else (re)start, also to change the node count
    mkdir -p "$dir"
    install
    stop_cluster  # a half-started or crashed earlier instance
    rm -rf "$dir/state" "$dir"/spool*
    port=${port:-$(free_ports_from 6817)}
    trap stop_failed_start EXIT
    write_config
    start_munged
    slurmctld -f "$conf" -i || die "slurmctld did not start; see $dir/slurmctld.log"
    if [ "$nodes" -gt 1 ]; then
        for n in $(node_names); do
            mkdir -p "$dir/spool-$n"
            slurmd -f "$conf" -N "$n" || die "slurmd -N $n did not start; see $dir/slurmd-$n.log"
        done
    else
        mkdir -p "$dir/spool"
        slurmd -f "$conf" || die "slurmd did not start; see $dir/slurmd.log"
    fi
    wait_idle
    trap - EXIT
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
    nodes=${conf_nodes:-1}
    if [ ! -f "$conf" ] || ! daemons_alive; then
        echo "slurm_local: not running (no live daemons for $dir); start it with: tools/slurm_local.sh start"
        exit 3
    fi
    echo "export SLURM_CONF=$conf"
    sinfo
    squeue
    ;;
*)
    die "usage: tools/slurm_local.sh start|stop|status (HPCGRAFT_SLURM_DIR=$dir, HPCGRAFT_SLURM_NODES=$nodes)"
    ;;
esac
