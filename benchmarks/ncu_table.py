"""Condenses Nsight Compute raw CSVs (benchmarks/ncu_pallas.sh) into one short table per file."""

import csv
import sys

COLUMNS = {
    "us": "gpu__time_duration.sum",
    "grid": "launch__grid_size",
    "thr": "launch__block_size",
    "regs": "launch__registers_per_thread",
    "smem": "launch__shared_mem_per_block_dynamic",
    "spills": "derived__local_spilling_requests",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "dram%": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor%": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "lsb": "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
}


def main():
    for path in sys.argv[1:]:
        rows = list(csv.reader(open(path)))
        start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
        if start is None:
            print(path, "no table")
            continue
        head = rows[start]
        idx = {h: i for i, h in enumerate(head)}
        body = [r for r in rows[start + 2 :] if len(r) == len(head)]
        print(f"\n{path.rsplit('/', 1)[-1]}")
        print("kernel".ljust(28), *(c.rjust(9) for c in COLUMNS))
        for r in body:
            name = r[idx["Kernel Name"]]
            if "lightning" not in name:
                continue
            vals = [r[idx[m]].replace(",", "") if m in idx else "-" for m in COLUMNS.values()]
            print(name[:28].ljust(28), *(v[:9].rjust(9) for v in vals))


if __name__ == "__main__":
    main()
