#!/usr/bin/env bash
# Install and start a real single-node SLURM cluster (slurmctld + slurmd + munge) for the pipeline's SLURM test.
# Needs root and Debian/Ubuntu apt. State, logs and pid files go to $SLURM_CI_DIR (default /tmp/gradmatch-slurm);
# .ci/slurm-down.sh stops the daemons by their pid files. See /work/shared/notes/slurm-single-node.md.
set -euo pipefail
dir=${SLURM_CI_DIR:-/tmp/gradmatch-slurm}
mkdir -p "$dir"
if command -v sinfo >/dev/null && [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null \
        && sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle\|mix\|alloc'; then
    echo "SLURM is already up (state in $dir)"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: runs as the munge user; its key, log and pid must be in folders munge owns.
mkdir -p /run/munge "$dir/munge" /etc/munge
chown munge:munge /run/munge "$dir/munge"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file="$dir/munge/munged.pid" -S /run/munge/munge.socket.2 \
        --log-file="$dir/munge/munged.log"
fi
for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge | grep -q "STATUS:.*Success" || { echo "munge does not work" >&2; exit 1; }

# slurm.conf: one node (this machine) named localhost, one default partition.
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<CONF
ClusterName=gradmatch-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# The executor plugin's job step drops every SLURM_* variable (SLURM_CONF too): use the default path.
mkdir -p /etc/slurm
ln -sfn "$dir/slurm.conf" /etc/slurm/slurm.conf

slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf" -N localhost
for _ in $(seq 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then break; fi
    sleep 0.5
done
sinfo
sinfo -h -o '%t' | grep -qx 'idle' || { echo "SLURM did not come up; see $dir/*.log" >&2; exit 1; }
echo "SLURM is up (state in $dir)"
