#!/bin/bash
# Nsight Compute on the decode kernels (one device call): benchmarks/ncu_probe.py launches each
# case once under ncu; the CSV and a per-kernel summary go to $OUT. See BUILD.md for the prefix.
#   CASES="Q4_K:glu,Q8_0:glu,rope:fused,rope:two" bash benchmarks/run_ncu.sh
set -u
OUT=${OUT:-/tmp/out}
CASES=${CASES:-Q4_K:glu,Q8_0:glu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu here"; exit 1; }
"$NCU" --version | tail -1
timeout ${NCU_TIMEOUT:-480} "$NCU" --clock-control none --kernel-name regex:'qmatvec|rope|attention' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    --csv --page details --log-file "$OUT/ncu.csv" \
    python3 benchmarks/ncu_probe.py --cases "$CASES" > "$OUT/probe.log" 2>&1
echo "ncu rc=$?"
grep -v "^I1\|^W1" "$OUT/probe.log" | tail -${PROBE_TAIL:-20}
python3 benchmarks/ncu_probe.py --summarize "$OUT/ncu.csv" --out "$OUT/ncu.json" | cut -c1-600
