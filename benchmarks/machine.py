"""The machine a benchmark ran on, as columns of every CSV row and a line above every table.

Times mean little without the CPU and the versions that made them (docs/benchmarks.md), so each
benchmark's CSV rows end with these columns and its printed tables start with
`transformer.training.provenance.describe()`.
"""

from transformer.training import provenance

# The distributions whose versions decide a benchmark's times (of provenance.LIBRARIES).
LIBRARIES = ("jax", "jaxlib", "flax", "numpy")


def columns(record=None):
    """{cpu_model, cpu_cores, devices, versions} for a CSV row, from `provenance.machine()`
    (or `record`, one such dict from another process), e.g. versions "jax 0.10.2, jaxlib 0.10.2,
    flax 0.12.8, numpy 2.4.6"."""
    record = record or provenance.machine()
    return {
        "cpu_model": record["cpu_model"],
        "cpu_cores": record["cpu_cores"],
        "devices": f"{record['device_kind']} x{record['device_count']}",
        "versions": ", ".join(f"{name} {record['versions'][name]}" for name in LIBRARIES),
    }
