"""Test set-up. Eight fake CPU devices, so pmap / mesh tests run on one machine; this must happen
before JAX initialises its backends, hence here and not in a fixture."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
