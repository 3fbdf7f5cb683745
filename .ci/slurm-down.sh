#!/usr/bin/env bash
# Stop the daemons .ci/slurm-up.sh started, by their pid files (never by name).
dir=${SLURM_CI_DIR:-/tmp/gradmatch-slurm}
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
    fi
done
