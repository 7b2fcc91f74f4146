#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the cluster tests (root; Debian/Ubuntu).
#
#   slurm/local_cluster.sh start   # install slurm-wlm + munge if missing, write slurm.conf, start the daemons
#   slurm/local_cluster.sh stop    # stop exactly the daemons this script started
#   slurm/local_cluster.sh status
#
# The node gets this machine's cores and memory (from `slurmd -C`). State lives in $MRL_SLURM_STATE
# (default /var/tmp/mrl_clip_slurm); /etc/slurm/slurm.conf is written only if no slurm.conf exists yet.
set -euo pipefail

STATE=${MRL_SLURM_STATE:-/var/tmp/mrl_clip_slurm}
CONF=/etc/slurm/slurm.conf

die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root: sudo apt-get install -y slurm-wlm munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local node host
  host=$(hostname -s)
  node=$(slurmd -C | head -n1)  # NodeName=<host> CPUs=... RealMemory=...
  mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm
  if [ -f "$CONF" ] && ! grep -q "written by mrl_clip" "$CONF"; then
    echo "keeping the existing $CONF" >&2
    return
  fi
  cat > "$CONF" <<EOF
# written by mrl_clip slurm/local_cluster.sh: a one-node test cluster
ClusterName=mrlclip
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
  [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root; run: sudo $0 start"
  install_packages
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile=/etc/munge/munge.key; fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  if ! munge -n >/dev/null 2>&1; then
    # as the munge user when it exists (munged refuses root by default)
    if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$STATE/munged.pid" \
      || /usr/sbin/munged --force --pid-file="$STATE/munged.pid"
    else /usr/sbin/munged --force --pid-file="$STATE/munged.pid"; fi
    echo started > "$STATE/munged.ours"
  fi
  if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld -i  # -i: ignore state saved by an earlier cluster of ours
    echo started > "$STATE/slurmctld.ours"
  fi
  if [ ! -s "$STATE/slurmd.pid" ] || ! kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
    slurmd
    echo started > "$STATE/slurmd.ours"
  fi
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
    if [ "$state" = idle ]; then echo "local Slurm cluster up: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"; return; fi
    sleep 1
  done
  die "Slurm node not idle after 60 s (state: ${state:-none}); logs in $STATE/log"
}

stop_one() {  # name pidfile
  local pid
  [ -f "$STATE/$1.ours" ] || return 0
  if [ -s "$2" ] && pid=$(cat "$2") && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$STATE/$1.ours"
}

stop() {
  stop_one slurmd "$STATE/slurmd.pid"
  stop_one slurmctld "$STATE/slurmctld.pid"
  stop_one munged "$STATE/munged.pid"
  echo "local Slurm cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -o '%N %c %m %T' ;;
  *) die "usage: $0 start|stop|status" ;;
esac
