"""Where a result came from: the machine, the devices and the library versions.

Every summary.json, sweep table and benchmark CSV records `machine()`, so that a number can be
traced to the CPU and the versions that made it. The same machine and versions reproduce a run
bit for bit; another CPU reproduces it only within the spread over seeds (XLA's CPU code and the
block-sparse kernel are compiled for the CPU they run on, and float32 sums differ in rounding).
"""

import functools
import importlib.metadata
import os
import platform

# The distributions whose versions decide what a run computes.
LIBRARIES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "numpy",
)


def cpu_model():
    """The CPU's model name, as the kernel reports it (e.g. "AMD EPYC 9R45", "Intel(R) Xeon(R)")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores():
    """Cores this process may run on (its affinity), which is what a run on CPU gets."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def library_versions():
    """{distribution: version} for LIBRARIES; "not installed" where one is missing."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.cache
def machine():
    """{cpu_model, cpu_cores, platform, python, backend, device_kind, device_count, process_count,
    versions}: the record a result carries."""
    import jax

    devices = jax.devices()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else "none",
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "versions": library_versions(),
    }


def describe(record=None):
    """One line for a table's caption, e.g. "Intel(R) Xeon(R) Processor, 2 cores, cpu x1;
    jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, ...". `record` defaults to this machine."""
    record = record or machine()
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    return (
        f"{record['cpu_model']}, {record['cpu_cores']} cores, {record['backend']} "
        f"x{record['device_count']}; {versions}"
    )
