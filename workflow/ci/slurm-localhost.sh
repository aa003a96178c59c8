#!/usr/bin/env bash
# A real single-node Slurm cluster on 127.0.0.1, for CI and for trying the Slurm profile on a
# laptop (Debian/Ubuntu, as root, no systemd needed):
#
#     sudo workflow/ci/slurm-localhost.sh up       # install (apt) + start; idempotent
#     workflow/ci/slurm-localhost.sh status        # daemons, sinfo, accounting
#     sudo workflow/ci/slurm-localhost.sh down     # stop what `up` started, by pid
#
# Daemons: munged, MariaDB (own datadir, socket and port), slurmdbd (so `sacct` works as on
# real clusters), slurmctld, slurmd. One node `localhost` (all CPUs, ~90% of the memory,
# SLURM_LOCAL_GPUS fake GPUs as GRES) in two partitions named like the profile's: `cpu`
# (default) and `gpu`, so `snakemake --profile slurm` submits without edits.
# State, logs and the database live in $SLURM_LOCAL_DIR (default /var/tmp/slurm-localhost);
# the configs go to /etc/slurm/ (where Slurm's commands look; a slurm.conf not written by this
# script is never overwritten). `down` keeps the state; `down --purge` removes it too.
#
# Environment: SLURM_LOCAL_DIR, SLURM_LOCAL_GPUS (2), SLURM_LOCAL_DB_PORT (33061),
# SLURM_LOCAL_CLUSTER (localcluster), SLURM_LOCAL_ACCOUNT (omniad).
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/tmp/slurm-localhost}
GPUS=${SLURM_LOCAL_GPUS:-2}
DB_PORT=${SLURM_LOCAL_DB_PORT:-33061}
CLUSTER=${SLURM_LOCAL_CLUSTER:-localcluster}
ACCOUNT=${SLURM_LOCAL_ACCOUNT:-omniad}
ETC=/etc/slurm
MARK="# written by workflow/ci/slurm-localhost.sh"
DB_PASS=slurm-localhost   # the database listens on 127.0.0.1 only
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "[slurm-localhost] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "run as root (sudo $0 $*)"; }

alive() {  # alive PIDFILE: the process of that pid file is running
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local secs=$1 what=$2 i
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after $secs s waiting for $what"
  return 1
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d keeps the packages' init scripts from starting daemons we start ourselves.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"$STATE/apt.log" 2>&1 || { tail -n 30 "$STATE/apt.log"; die "apt-get install failed"; }
  ((own_policy)) && rm -f "$policy"
  return 0
}

write_file() {  # write_file PATH OWNER MODE < content: only files of ours are replaced
  local path=$1 owner=$2 mode=$3 tmp
  if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
    die "$path exists and was not written by this script; move it away first"
  fi
  tmp=$(mktemp "$path.XXXX")
  cat >"$tmp"
  chown "$owner" "$tmp"; chmod "$mode" "$tmp"
  if [[ -e $path ]] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 0; fi
  mv -f "$tmp" "$path"
  CHANGED=1
}

node_line() {  # NodeName line from `slurmd -C`, memory ~90% so the OS keeps some
  local c mem
  c=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$c")
  local cpus boards sockets cores threads
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$c")
  boards=$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$c")
  sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$c")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$c")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$c")
  local gres=""
  ((GPUS > 0)) && gres=" Gres=gpu:$GPUS"
  echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards" \
    "SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads" \
    "RealMemory=$((mem * 9 / 10))$gres State=UNKNOWN"
}

write_configs() {
  mkdir -p "$ETC" "$STATE"/{log,run,ctld,d,dev}
  chown slurm:slurm "$STATE/ctld" "$STATE/log" "$STATE/run"
  local gres_types="" i
  ((GPUS > 0)) && gres_types="GresTypes=gpu"
  write_file "$ETC/slurm.conf" root:root 644 <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, laptops without systemd delegation).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# Per CPU (hardware thread), so a 1-CPU job does not take a whole core.
SelectTypeParameters=CR_CPU_Memory
# Else a job without --mem takes the whole node's memory.
DefMemPerCPU=1000
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
# Seconds between SIGTERM and SIGKILL on cancel/requeue/preemption (a checkpoint fits).
KillWait=30
JobRequeue=1
$gres_types
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
# sacct shows the Snakemake plugin's --comment (rule and wildcards) of each job.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$(node_line)
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
  if ((GPUS > 0)); then
    # Fake GPUs: gres/gpu needs a File= per device; character devices (like /dev/null)
    # stand in for /dev/nvidia*. CUDA_VISIBLE_DEVICES is set for jobs that ask --gpus.
    for ((i = 0; i < GPUS; i++)); do
      [[ -e $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3 2>/dev/null \
        || touch "$STATE/dev/gpu$i"
    done
    write_file "$ETC/gres.conf" root:root 644 <<EOF
$MARK
AutoDetect=off
NodeName=localhost Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]
EOF
  elif [[ -e $ETC/gres.conf ]] && grep -qF "$MARK" "$ETC/gres.conf"; then
    rm -f "$ETC/gres.conf"
  fi
  write_file "$ETC/slurmdbd.conf" slurm:slurm 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f $STATE/run/munged.ours ]] || log "munged already running (not ours; left alone)"
    return 0
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/run/munged.pid"; touch "$STATE/run/munged.ours"
  wait_for 10 munge bash -c 'munge -n | unmunge' || die "munge does not work"
}

sql() { mariadb --no-defaults --socket="$STATE/mysql-run/mysql.sock" -uroot "$@"; }

start_mariadb() {
  if alive "$STATE/mysql-run/mariadbd.pid"; then return 0; fi
  if [[ ! -d $STATE/mysql/mysql ]]; then
    log "creating the database in $STATE/mysql"
    mkdir -p "$STATE/mysql"; chown mysql:mysql "$STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
      || { tail -n 20 "$STATE/log/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  mkdir -p "$STATE/mysql-run"; chown mysql:mysql "$STATE/mysql-run"
  log "starting mariadbd on 127.0.0.1:$DB_PORT"
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --socket="$STATE/mysql-run/mysql.sock" --pid-file="$STATE/mysql-run/mariadbd.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$STATE/mysql-run/mariadb.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --max-allowed-packet=64M \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb sql -e "SELECT 1" \
    || { tail -n 20 "$STATE/mysql-run/mariadb.log"; die "mariadbd did not start"; }
  sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
  if ! alive "$STATE/run/slurmdbd.pid"; then
    log "starting slurmdbd"
    slurmdbd
  fi
  wait_for 60 slurmdbd sacctmgr -n show cluster \
    || { tail -n 20 "$STATE/log/slurmdbd.log"; die "slurmdbd does not answer"; }
  # Register the cluster and an account with the users' associations (what sacct and the
  # Snakemake plugin's account check see on a real cluster).
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  if ! sacctmgr -n -P show account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=local Organization=local >/dev/null
  fi
  local u
  for u in root ${SUDO_USER:-}; do
    if ! sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" format=user | grep -qx "$u"; then
      sacctmgr -i add user "$u" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
    fi
  done
}

start_slurm() {
  if ! alive "$STATE/run/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
  fi
  wait_for 60 slurmctld scontrol ping || { tail -n 20 "$STATE/log/slurmctld.log"; die "slurmctld does not answer"; }
  if ! alive "$STATE/run/slurmd.pid"; then
    log "starting slurmd"
    slurmd -N localhost
  fi
  node_ready() { sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'; }
  if ! wait_for 30 node node_ready; then
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    wait_for 30 node node_ready || { sinfo -R; tail -n 20 "$STATE/log/slurmd.log"; die "node not ready"; }
  fi
}

cmd_up() {
  need_root up
  local t0=$SECONDS
  CHANGED=0
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  install_packages
  mkdir -p "$STATE/log" "$STATE/run"
  write_configs
  if ((CHANGED)) && alive "$STATE/run/slurmctld.pid"; then
    log "configuration changed: restarting the Slurm daemons"
    stop_pidfile slurmd "$STATE/run/slurmd.pid"
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
  fi
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  log "up in $((SECONDS - t0)) s: cluster $CLUSTER, partitions cpu (default) and gpu, $GPUS fake GPUs"
  sinfo
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait up to 30 s, then KILL
  local name=$1 file=$2 pid i
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(<"$file")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
    sleep 0.2
  done
  log "$name did not stop; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}

cmd_down() {
  need_root down
  local t0=$SECONDS
  if alive "$STATE/run/slurmctld.pid"; then
    # Jobs still running would outlive slurmd as orphans; cancel them first.
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: ${jobs//$'\n'/ }"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # shellcheck disable=SC2016
      wait_for 40 jobs bash -c '[[ -z $(squeue -h -t R,CG -o %i) ]]' || true
    fi
  fi
  stop_pidfile slurmd "$STATE/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
  stop_pidfile mariadbd "$STATE/mysql-run/mariadbd.pid"
  if [[ -f $STATE/run/munged.ours ]]; then
    stop_pidfile munged "$STATE/run/munged.pid"
    rm -f "$STATE/run/munged.ours"
  fi
  if [[ ${1:-} == --purge ]]; then
    log "removing $STATE and the configs written to $ETC"
    rm -rf "$STATE"
    local f
    for f in slurm.conf gres.conf slurmdbd.conf; do
      [[ -e $ETC/$f ]] && grep -qF "$MARK" "$ETC/$f" && rm -f "$ETC/$f"
    done
  fi
  log "down in $((SECONDS - t0)) s"
}

cmd_status() {
  local ok=0 d f
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    f=$STATE/run/$d.pid
    [[ $d == mariadbd ]] && f=$STATE/mysql-run/$d.pid
    if alive "$f"; then
      printf '%-10s running (pid %s)\n' "$d" "$(<"$f")"
    elif [[ $d == munged ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      printf '%-10s running (not started by this script)\n' "$d"
    else
      printf '%-10s stopped\n' "$d"; ok=1
    fi
  done
  if ((ok == 0)); then
    sinfo -o '%P %a %D %t %c %m %G' || ok=1
    sacctmgr -n show cluster format=cluster,controlhost,controlport || ok=1
  fi
  return $ok
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down [--purge]|status" >&2; exit 2 ;;
esac
