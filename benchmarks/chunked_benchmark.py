"""Chunked attention against `jax.nn.dot_product_attention`: forward+backward time and peak memory.

Batch 1, 8 heads, head dim 64, float32 by default. Times are medians of runs that alternate
between the implementations (and a large float32 matmul that measures the machine's peak in the
same run), so that drifting load on a shared machine hits all of them alike. On a loaded
machine wall time mostly measures the other processes; the CPU seconds of this process (all its
threads) and GFLOP per CPU-second, against the matmul's, are the steadier measure of
efficiency. Peak memory is the maximum resident set size of a fresh subprocess that compiles
and runs one forward+backward pass.

FLOPs are counted per query-key pair that the implementation must compute: 4 * d per pair for the
forward (q.k and p.v, 2 FLOPs per multiply-add), and twice that for the backward (dP = dO V^T,
dV = P^T dO, dQ = dS K, dK = dS^T Q), i.e. 3x the forward in all, the same count for every
implementation. The chunked backward also recomputes q.k, which this count leaves out: its
real FLOP rate is 3.5/3 times the one reported. Full attention has q_len * kv_len pairs, causal
L (L + 1) / 2.

Writes `chunked_time.csv`, `chunked_memory.csv` and `chunked_benchmark.png` to --out_dir. Every
CSV row ends with the machine it ran on (`machine.py`: CPU model, cores, devices, library
versions), and the printed tables start with `provenance.describe()`.

  python benchmarks/chunked_benchmark.py --out_dir=/tmp/chunked_bench
  python benchmarks/chunked_benchmark.py --lengths=8192 --memory_lengths=16384,32768,65536
"""

import csv
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import machine  # this directory's
import numpy as np
from absl import app, flags
from peak_memory import peak_rss_bytes  # this directory's

from transformer.attention.chunked import chunked_attention
from transformer.training import provenance

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/chunked_benchmark", "Where CSV and PNG go.")
_LENGTHS = flags.DEFINE_list(
    "lengths", ["1024", "2048", "4096", "8192"], "Sequence lengths to time."
)
_MEMORY_LENGTHS = flags.DEFINE_list(
    "memory_lengths",
    ["4096", "8192", "16384"],
    "Sequence lengths whose peak memory is measured (chunked).",
)
_XLA_MAX_LENGTH = flags.DEFINE_integer(
    "xla_max_length",
    8192,
    "Longest length for jax.nn.dot_product_attention, whose [L, L] "
    "arrays take 13.6 GB at 8192 tokens.",
)
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations",
    ["chunked", "chunked_causal", "xla", "xla_causal"],
    "Which to time; 'xla' ones only up to --xla_max_length.",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each implementation per length.")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_CHUNK_SIZE = flags.DEFINE_list(
    "chunk_size", [], "Query and key chunk (one or two ints); empty for the default."
)
_MEASURE_MEMORY = flags.DEFINE_string(
    "measure_memory", None, "Internal: 'implementation:length', run in a subprocess."
)

MATMUL_SIZE = 4096


def chunk_size():
    sizes = [int(s) for s in _CHUNK_SIZE.value]
    return None if not sizes else sizes[0] if len(sizes) == 1 else tuple(sizes)


IMPLEMENTATIONS = {
    "chunked": lambda q, k, v: chunked_attention(q, k, v, chunk_size=chunk_size()),
    "chunked_causal": lambda q, k, v: chunked_attention(
        q, k, v, causal=True, chunk_size=chunk_size()
    ),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "xla_causal": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"
    ),
}


def attention_flops(name, length):
    """Forward+backward FLOPs of attention over `length` tokens, counted as the docstring says."""
    pairs = length * (length + 1) / 2 if name.endswith("causal") else length * length
    return 3 * 4 * _HEAD_DIM.value * _HEADS.value * pairs


def inputs(length):
    rng = np.random.default_rng(0)
    shape = (1, length, _HEADS.value, _HEAD_DIM.value)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def forward_backward(name):
    # sum(out * q), not sum(out): a constant cotangent lets XLA simplify the backward pass.
    loss = lambda q, k, v: (IMPLEMENTATIONS[name](q, k, v) * q).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def seconds(fn, *args):
    """(wall, CPU) seconds of one call; CPU time counts every thread of this process."""
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_length(length, names):
    """Median (wall, CPU) seconds of each implementation and of the matmul, runs alternating."""
    args = inputs(length)
    fns = {name: forward_backward(name) for name in names}
    matrix = jnp.asarray(
        np.random.default_rng(1).normal(size=(MATMUL_SIZE, MATMUL_SIZE)), jnp.float32
    )
    fns["matmul"] = jax.jit(jnp.dot)
    matmul_args = (matrix, matrix)
    for name, fn in fns.items():  # compile and warm up
        seconds(fn, *(matmul_args if name == "matmul" else args))
    times = {name: [] for name in fns}
    for _ in range(_REPEATS.value):
        for name, fn in fns.items():
            times[name].append(seconds(fn, *(matmul_args if name == "matmul" else args)))
    return {name: tuple(np.median(np.array(t), axis=0)) for name, t in times.items()}


def peak_memory(name, length):
    """Peak RSS, XLA temp bytes and seconds of a fresh process running one forward+backward.

    XLA's temporary buffers show the algorithm's own share of the peak.
    """
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--measure_memory={name}:{length}",
        f"--heads={_HEADS.value}",
        f"--head_dim={_HEAD_DIM.value}",
        f"--chunk_size={','.join(_CHUNK_SIZE.value)}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory run {name} at {length} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory_here(spec):
    name, length = spec.split(":")
    args = inputs(int(length))
    compiled = forward_backward(name).lower(*args).compile()
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    print(
        json.dumps(
            {
                "max_rss_bytes": peak_rss_bytes(),
                "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                "seconds": time.perf_counter() - start,
            }
        )
    )


def plot(rows, memory_rows, load_average, cores, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r["implementation"] for r in rows}):
        points = [(r["length"], r["seconds"]) for r in rows if r["implementation"] == name]
        ax_time.plot(*zip(*points), marker="o", label=name)
    for r in memory_rows:
        r["xla_temp_gb"] = r["xla_temp_mb"] / 1e3
    for key, label in (("peak_gb", "chunked, peak RSS"), ("xla_temp_gb", "chunked, XLA temps")):
        if memory_rows:
            ax_memory.plot(
                *zip(*[(r["length"], r[key]) for r in memory_rows]), marker="o", label=label
            )
    if memory_rows:
        ax_memory.axhline(4.0, color="grey", linestyle="--", label="4 GB target")
    ax_time.set(
        yscale="log",
        ylabel="forward+backward seconds",
        title=f"Time (median; load average {load_average:.1f} on {cores} cores)",
    )
    ax_memory.set(ylabel="GB", title="Peak memory of one forward+backward")
    for ax, table in ((ax_time, rows), (ax_memory, memory_rows)):
        if not table:
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"batch 1, {_HEADS.value} heads, head dim {_HEAD_DIM.value}, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    unknown = set(_IMPLEMENTATIONS.value) - set(IMPLEMENTATIONS)
    if unknown:
        raise app.UsageError(
            f"unknown --implementations {sorted(unknown)}; allowed: {sorted(IMPLEMENTATIONS)}."
        )
    if _MEASURE_MEMORY.value:
        measure_memory_here(_MEASURE_MEMORY.value)
        return
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    load_average = os.getloadavg()[0]
    print(provenance.describe())
    print(f"load average {load_average:.1f}; chunk_size={chunk_size()}")
    rows = []
    header = (
        f"{'implementation':16s} {'tokens':>7s} {'seconds':>9s} {'GFLOP/s':>8s} "
        f"{'of peak':>8s} {'vs xla':>7s} {'CPU s':>8s} {'GFLOP/CPU-s':>12s} "
        f"{'of matmul':>10s}"
    )
    if _LENGTHS.value:
        print(header)
    for length in map(int, _LENGTHS.value):
        names = [
            name
            for name in _IMPLEMENTATIONS.value
            if not name.startswith("xla") or length <= _XLA_MAX_LENGTH.value
        ]
        times = time_length(length, names)
        matmul_flops = 2 * MATMUL_SIZE**3
        peak, peak_per_cpu = (matmul_flops / t for t in times["matmul"])
        for name in names:
            flops = attention_flops(name, length)
            wall, cpu = times[name]
            xla_name = "xla_causal" if name.endswith("causal") else "xla"
            speedup = times[xla_name][0] / wall if xla_name in times else float("nan")
            row = dict(
                implementation=name,
                length=length,
                seconds=wall,
                gflops=flops / wall / 1e9,
                matmul_peak_gflops=peak / 1e9,
                fraction_of_peak=flops / wall / peak,
                speedup_vs_xla=speedup,
                cpu_seconds=cpu,
                gflops_per_cpu_second=flops / cpu / 1e9,
                fraction_of_matmul_per_cpu_second=flops / cpu / peak_per_cpu,
            )
            rows.append(row)
            print(
                f"{name:16s} {length:7d} {wall:9.3f} {row['gflops']:8.1f} "
                f"{row['fraction_of_peak']:8.1%} {speedup:7.2f} {cpu:8.2f} "
                f"{row['gflops_per_cpu_second']:12.1f} "
                f"{row['fraction_of_matmul_per_cpu_second']:10.1%}",
                flush=True,
            )
        print(
            f"{'matmul peak':16s} {length:7d} {times['matmul'][0]:9.3f} {peak / 1e9:8.1f} "
            f"{'':8s} {'':7s} {times['matmul'][1]:8.2f} {peak_per_cpu / 1e9:12.1f}",
            flush=True,
        )

    memory_rows = []
    for length in map(int, _MEMORY_LENGTHS.value):
        measured = peak_memory("chunked", length)
        row = dict(
            implementation="chunked",
            length=length,
            peak_gb=measured["max_rss_bytes"] / 1e9,
            xla_temp_mb=measured["xla_temp_bytes"] / 1e6,
            seconds=measured["seconds"],
        )
        memory_rows.append(row)
        growth = (
            row["peak_gb"] / memory_rows[-2]["peak_gb"] if len(memory_rows) > 1 else float("nan")
        )
        print(
            f"chunked {length:7d} tokens: peak RSS {row['peak_gb']:6.2f} GB "
            f"(x{growth:.2f} from the previous length), XLA temp buffers "
            f"{row['xla_temp_mb']:8.1f} MB, one forward+backward {row['seconds']:.1f} s",
            flush=True,
        )

    written = []
    for name, table in (("chunked_time.csv", rows), ("chunked_memory.csv", memory_rows)):
        if table:
            written.append(os.path.join(_OUT_DIR.value, name))
            with open(written[-1], "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[*table[0], *machine.columns()])
                writer.writeheader()
                writer.writerows({**row, **machine.columns()} for row in table)
    written.append(os.path.join(_OUT_DIR.value, "chunked_benchmark.png"))
    plot(rows, memory_rows, load_average, provenance.machine()["cpu_cores"], written[-1])
    print("wrote", ", ".join(written))


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    app.run(main)
