#!/usr/bin/env bash
# Nsight Compute over the Pallas kernels on the device machine: one raw CSV per shape in $OUT and a
# short table (duration, registers, occupancy, DRAM and tensor-pipe use) printed last.
#   bash benchmarks/ncu_pallas.sh 64x1024x16x128 1x65536x16x128
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
OUT=${OUT:-/tmp/ncu}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for shape in "$@"; do
  "$NCU" --clock-control none --launch-count 40 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --csv --page raw python3 benchmarks/profile_pallas.py --shape "$shape" --calls 0 \
    > "$OUT/ncu_$shape.csv" 2> "/tmp/ncu_$shape.err"
  echo "== $shape rc=$? lines=$(wc -l < "$OUT/ncu_$shape.csv")"; tail -3 "/tmp/ncu_$shape.err"
done
python3 benchmarks/ncu_table.py "$OUT"/ncu_*.csv
