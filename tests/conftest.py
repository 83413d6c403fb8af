"""Test set-up. Eight fake CPU devices, so pmap / mesh tests run on one machine; this must happen
before JAX initialises its backends, hence here and not in a fixture."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# GPU interpret mode runs every warpgroup of every block of a cluster as a thread that blocks in
# host callbacks; with XLA:CPU's default pool (one thread per core: two on CI) a cluster kernel
# with three warpgroups per block deadlocks (benchmarks/read_once.py). NPROC sizes that pool.
os.environ.setdefault("NPROC", "16")
