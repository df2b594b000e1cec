#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for the launch tests (tests/launch/).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge (apt-get; needs root), writes a
# slurm.conf for this host (enough CPUs for 2-task jobs, no cgroups, no accounting), starts
# munged, slurmctld and slurmd directly (no systemd needed) and waits until `sinfo` shows the
# node idle. Idempotent: run it again and it returns at once when the node is already up.
#
#   sudo launch/ci/start_slurm.sh            # then: sbatch --ntasks=2 launch/slurm/train.sbatch ...
#
# Environment: SLURM_CI_CPUS (CPUs the node advertises; default max(nproc, 4): SLURM then
# runs 2-task jobs even on a 1-core runner), SLURM_CI_TIMEOUT (seconds to wait, default 60).
set -euo pipefail

CPUS=${SLURM_CI_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
TIMEOUT=${SLURM_CI_TIMEOUT:-60}
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
say() { echo "start_slurm: $*"; }

node_idle() {
    command -v sinfo >/dev/null && [[ "$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null)" =~ ^idle ]]
}

if node_idle; then
    say "node $NODE already idle"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (apt-get, daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps it to the daemons and their plugins (~40 s)
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: every SLURM message is signed with this key.
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# One node, one partition. linuxproc/none plugins: no cgroups needed (containers, VMs).
# config_overrides: trust the CPU count here rather than the hardware's.
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=megatron-r1-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

say "waiting for node $NODE to be idle (up to ${TIMEOUT}s)"
for _ in $(seq "$TIMEOUT"); do
    if node_idle; then
        sinfo
        exit 0
    fi
    # A node left down/drained by an earlier run of this script comes back here.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 1
done
say "node $NODE did not become idle; sinfo and the daemon logs follow" >&2
sinfo -N -l >&2 || true
tail -n 30 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
