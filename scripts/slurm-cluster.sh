#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the job templates.
#
#   scripts/slurm-cluster.sh install   install Debian's slurm-wlm daemons, client and munge (apt, root)
#   scripts/slurm-cluster.sh start     write the config, start munged, slurmctld and slurmd
#   scripts/slurm-cluster.sh status    the daemons and the node's state
#   scripts/slurm-cluster.sh stop      stop the daemons (the state folder stays for inspection)
#
# Everything the cluster writes (config, munge key and socket, state, spool,
# logs, pid files) lives in $SLURM_CLUSTER_DIR (default /tmp/aau-slurm), so it
# never touches /etc/slurm or a running site installation. Clients find the
# cluster through SLURM_CONF; `start` prints the line to export.
#
# The node claims at least 8 CPUs (SlurmdParameters=config_overrides), whatever
# the machine has: the templates ask for --ntasks-per-node=4, which Slurm
# refuses beyond the node's CPUs even with --overcommit. Each CPU may also be
# shared by 8 jobs (OverSubscribe=FORCE:8). Slurm binds nothing (task/none), so
# the ranks see the machine's real cores.
# Jobs may requeue themselves (JobRequeue=1), which the preemption test needs.
set -euo pipefail

DIR=${SLURM_CLUSTER_DIR:-/tmp/aau-slurm}
CONF=$DIR/slurm.conf
# libpmix-dev: srun --mpi=pmix dlopens the unversioned libpmix.so that only it ships.
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev)
# Ports away from Slurm's defaults (6817/6818) so that a site daemon, if any, is left alone.
CTLD_PORT=${SLURM_CLUSTER_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_CLUSTER_SLURMD_PORT:-16818}

die() { echo "error: $*" >&2; exit 1; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
              command -v sbatch >/dev/null && command -v munged >/dev/null; }

packages_installed() {
    local package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || return 1
    done
}

install() {
    packages_installed && return 0
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root: run as root, or install ${PACKAGES[*]} yourself"
    command -v apt-get >/dev/null || die "no apt-get on this machine: install Slurm 22.05+ (${PACKAGES[*]}) with your package manager"
    export DEBIAN_FRONTEND=noninteractive
    # A stale package list fails the install; update only then (it is slow).
    apt-get install -y -q "${PACKAGES[@]}" >"$DIR.apt.log" 2>&1 ||
        { apt-get update -q >>"$DIR.apt.log" 2>&1 &&
          apt-get install -y -q "${PACKAGES[@]}" >>"$DIR.apt.log" 2>&1; } ||
        die "apt-get could not install ${PACKAGES[*]} (log: $DIR.apt.log)"
    # Debian starts the packaged services with /etc/slurm configs; ours run separately.
    for service in slurmctld slurmd munge; do
        command -v systemctl >/dev/null && systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
}

write_config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
    mkdir -p "$DIR"/{state,spool,munge,log}
    chmod 700 "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] ||
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    cat >"$CONF" <<EOF
# Written by scripts/slurm-cluster.sh: a one-node test cluster.
ClusterName=aau-test
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in a container: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
JobRequeue=1
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Quick turn-around for tests: poll often, start pending jobs as soon as possible.
SchedulerParameters=defer_batch=0,sched_interval=1
MessageTimeout=30
KillWait=10
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    installed || die "Slurm is not installed: run '$0 install' (as root, with apt) first"
    if pid_alive "$DIR/slurmctld.pid"; then
        echo "already running; export SLURM_CONF=$CONF"
        return 0
    fi
    write_config
    export SLURM_CONF=$CONF
    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
           --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
           --seed-file="$DIR/munge/munge.seed" --force
    # -i: ignore (and clear) state from an earlier cluster in this folder.
    slurmctld -i -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    die "the node did not become idle within 30 s: see $DIR/log/slurmctld.log and slurmd.log"
}

stop_daemon() {  # pid file, name
    pid_alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    echo "$2 (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    # Jobs first, so that no task outlives the cluster that started it.
    if pid_alive "$DIR/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon "$DIR/slurmd.pid" slurmd
    stop_daemon "$DIR/slurmctld.pid" slurmctld
    stop_daemon "$DIR/munge/munged.pid" munged
}

status() {
    local name running=0
    for name in slurmctld slurmd munge/munged; do
        if pid_alive "$DIR/$name.pid"; then
            echo "${name#munge/}: running (pid $(cat "$DIR/$name.pid"))"
            running=$((running + 1))
        else
            echo "${name#munge/}: stopped"
        fi
    done
    [ "$running" = 3 ] || return 1
    SLURM_CONF=$CONF sinfo
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 install|start|stop|status (cluster folder: \$SLURM_CLUSTER_DIR, now $DIR)" ;;
esac
