"""XLA_FLAGS for a test's subprocess: the suite's compile flags (conftest.py), with its own
number of CPU devices."""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(count=None):
    """The suite's XLA_FLAGS with `count` CPU devices (None: XLA's default, one)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [flag for flag in flags if not flag.startswith(DEVICE_COUNT_FLAG)]
    if count is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={count}")
    return " ".join(flags)
