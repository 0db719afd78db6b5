"""Forward+backward time and peak memory of every attention implementation against length.

Batch 1, 8 heads, head dim 64, float32. For each length one fresh process compiles every
(pattern, implementation) that applies and times them alternately (the fastest of `--repeats`
runs: other load on the machine only ever adds time), so they are compared under the same load;
each (implementation, pattern, length) then gets its own fresh process for peak memory (max RSS),
so runs do not pollute each other. The
matmul peak (a 2048^2 float32 product) is timed in the same alternation, and achieved FLOP/s
(over the pattern's allowed pairs) are reported as a fraction of it.

    python benchmarks/attention_benchmark.py --lengths 1024,2048,4096,8192,16384 \
        --patterns full,causal,bigbird --out benchmarks/results

`--pairs full:chunked,bigbird:block_sparse` runs only those pairs (the block-sparse speed target).

Writes `<out>/attention_benchmark.csv`, `<out>/time.png` and `<out>/memory.png`, and prints a
table. Every row ends with the machine that timed it (`machine.py`: CPU model, cores, devices,
library versions), and the table starts with `provenance.describe()` of it.

Baselines: "jax.nn" is `jax.nn.dot_product_attention` with a dense mask, "flax" is
`flax.linen.MultiHeadDotProductAttention` with a dense mask (its projections included).
"block_sparse_xla" is block_sparse without its fused CPU kernel (`use_kernel=False`): XLA's
schedules, as on GPU. "block_products" is not an implementation but the floor under those
schedules: their products on inputs laid out contiguously in advance (`block_products.py`), for
whole-row patterns.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import machine  # this directory's

from transformer.training import provenance

HEADS, HEAD_DIM, BLOCK = 8, 64, 64
IMPLEMENTATIONS = (
    "dense",
    "jax.nn",
    "flax",
    "chunked",
    "block_sparse",
    "block_sparse_xla",
    "block_products",
    "auto",
)
DENSE_IMPLEMENTATIONS = ("dense", "jax.nn", "flax")  # materialise [heads, q_len, kv_len]


def make_pattern(name):
    from transformer import patterns

    # BigBird as docs/benchmarks.md measures it: block 64, a window of 3 blocks, 2 anchor and 3
    # random blocks.
    named = {
        "sliding_window": lambda: patterns.sliding_window(256),
        "causal_window": lambda: patterns.sliding_window(256) & patterns.causal(),
        # BigBird's other parts alone: 128 global tokens; 3 random blocks of 64 per row.
        "anchor": lambda: patterns.anchor(2 * BLOCK),
        "random": lambda: patterns.random(3, BLOCK, seed=0),
        "bigbird": lambda: patterns.bigbird(
            block_size=BLOCK, window_blocks=3, num_anchor_blocks=2, num_random_blocks=3
        ),
        "causal_bigbird": lambda: patterns.bigbird(block_size=BLOCK) & patterns.causal(),
    }
    return named[name]() if name in named else patterns.build(name)


def applies(implementation, pattern_name, length, dense_max_length):
    if implementation in DENSE_IMPLEMENTATIONS and length > dense_max_length:
        return False
    if implementation == "chunked":
        return pattern_name in ("full", "causal")
    if implementation == "block_products":  # whole-row layouts only (block_products.py)
        return pattern_name in ("sliding_window", "random", "bigbird")
    return True


def work(pattern, length):
    """(allowed query-key pairs, fraction of 64x64 blocks that block-sparse computes)."""
    import numpy as np

    from transformer.attention import block_sparse

    # Every non-empty block scheduled (none left to chunked attention), so their masks count all.
    plan = block_sparse.make_plan(pattern, length, length, BLOCK, BLOCK, dense_rows_apart=False)
    # Allowed pairs per distinct block mask, times its uses: indexing the masks by every block
    # would build [blocks, 64, 64] (4.3 GB of booleans for full attention at 65,536 tokens).
    pairs = int(plan.block_masks.sum((1, 2), dtype=np.int64)[plan.mask_id].sum())
    return pairs, plan.computed_blocks / (plan.num_q_blocks * plan.num_kv_blocks)


def attention_function(implementation, pattern, length):
    """fn(q, k, v) -> scalar loss whose gradient is the backward pass.

    The loss is sum(out * q), not sum(out): a constant cotangent (all ones) lets XLA simplify the
    backward pass of some implementations (dO V^T becomes a row sum), so they would not be timed
    doing the work a real model's backward pass does.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from transformer.attention import dot_product_attention

    if implementation == "jax.nn":
        mask = jnp.asarray(pattern.mask(length, length))[None, None]
        return lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, mask=mask) * q).sum()
    if implementation == "flax":
        mask = jnp.asarray(pattern.mask(length, length))[None, None]
        module = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM)
        x = jnp.zeros((1, length, HEADS * HEAD_DIM))
        params = module.init(jax.random.key(0), x, x, mask=mask)
        # Queries, keys and values enter as [batch, length, features] (before the projections).
        flat = lambda t: t.reshape(1, length, HEADS * HEAD_DIM)
        return lambda q, k, v: (module.apply(params, flat(q), flat(k), mask=mask) * flat(q)).sum()
    if implementation == "block_sparse_xla":
        from transformer.attention.block_sparse import block_sparse_attention

        return lambda q, k, v: (
            block_sparse_attention(q, k, v, pattern=pattern, use_kernel=False) * q
        ).sum()
    return lambda q, k, v: (
        dot_product_attention(q, k, v, pattern=pattern, implementation=implementation) * q
    ).sum()


def compiled_step(implementation, pattern, length):
    """fn(q, k, v) -> gradients: one forward+backward pass."""
    import jax

    if implementation == "block_products":
        import block_products  # this directory's

        q, k, v = inputs(length)
        step, (layouts, masks) = block_products.make_step(pattern, q, k, v, BLOCK)
        return lambda q, k, v: step(layouts, masks, q, k, v)
    loss = attention_function(implementation, pattern, length)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(length):
    import jax

    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (1, length, HEADS, HEAD_DIM)) for k in keys]


def worker_time(args):
    """Times every (pattern, implementation) at one length, alternating; prints JSON."""
    import jax

    q, k, v = inputs(args.length)
    steps = {}
    for combination in args.implementations.split(","):
        pattern_name, name = combination.split(":")
        steps[combination] = compiled_step(name, make_pattern(pattern_name), args.length)
        jax.block_until_ready(steps[combination](q, k, v))  # compile and warm up
    # The matmul peak is timed in the same alternation, so both see the same machine load.
    n = 2048
    a = jax.random.normal(jax.random.key(1), (n, n))
    matmul = jax.jit(lambda a: a @ a)
    steps["matmul"] = lambda q, k, v: matmul(a)
    jax.block_until_ready(matmul(a))
    times = {combination: [] for combination in steps}
    for _ in range(args.repeats):
        for combination, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times[combination].append(time.perf_counter() - start)
    result = {combination: min(t) for combination, t in times.items()}
    result["matmul"] = 2 * n**3 / min(times["matmul"])  # FLOP/s
    result["machine"] = provenance.machine()  # of the process that timed them
    print(json.dumps(result))


def worker_memory(args):
    """One forward+backward of one implementation; prints peak RSS in bytes (JSON), and the
    bytes XLA's buffer assignment gives the compiled step (arguments + outputs + temporaries).

    Max RSS is what the process really held, allocator and runtime included; XLA's figure is
    what the program needs, the same on every run.
    """
    import jax

    q, k, v = inputs(args.length)
    result = {}
    if args.implementations != "baseline":
        step = compiled_step(args.implementations, make_pattern(args.pattern), args.length)
        if hasattr(step, "lower"):  # a jitted function (block_products is a closure)
            step = step.lower(q, k, v).compile()
            analysis = step.memory_analysis()
            result["xla_bytes"] = (
                analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes
            )
        jax.block_until_ready(step(q, k, v))
    from peak_memory import peak_rss_bytes  # this directory's

    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


def run_worker(kind, timeout, **options):
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout}s"
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for column, label, filename in (
        ("seconds", "forward+backward time (s)", "time.png"),
        ("peak_gb", "peak memory (GB, max RSS)", "memory.png"),
    ):
        figure, axes = plt.subplots(figsize=(7, 5))
        series = {}
        for row in rows:
            if row.get(column) not in (None, ""):
                series.setdefault(f"{row['implementation']} / {row['pattern']}", []).append(
                    (row["length"], row[column])
                )
        for name, points in sorted(series.items()):
            points.sort()
            axes.plot(*zip(*points), marker="o", label=name)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("sequence length (tokens)")
        axes.set_ylabel(label)
        axes.set_title(f"batch 1, {HEADS} heads, head dim {HEAD_DIM}, float32")
        if series:
            axes.legend(fontsize=7)
        axes.grid(True, which="both", alpha=0.3)
        figure.savefig(os.path.join(out, filename), dpi=120, bbox_inches="tight")
        plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--patterns", default="full,causal,bigbird")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument(
        "--pairs",
        default="",
        help="pattern:implementation pairs to run instead of every pattern with "
        "every implementation, e.g. full:chunked,bigbird:block_sparse",
    )
    parser.add_argument(
        "--dense-max-length",
        type=int,
        default=4096,
        help="longest length for the implementations that build the full "
        "score matrix (8192 needs about 14 GB)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks/results")
    # Internal: the subprocesses.
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return {"time": worker_time, "memory": worker_memory}[args.worker](args)

    selected = [tuple(pair.split(":")) for pair in args.pairs.split(",") if pair]
    if any(len(pair) != 2 for pair in selected):
        parser.error(f"--pairs takes pattern:implementation pairs; got {args.pairs!r}")
    implementations = [n for _, n in selected] or args.implementations.split(",")
    unknown = set(implementations) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}; allowed: {list(IMPLEMENTATIONS)}")
    os.makedirs(args.out, exist_ok=True)
    baseline = None
    if not args.no_memory:
        result, _ = run_worker("memory", args.timeout, implementations="baseline", length=1024)
        baseline = result and result["peak_rss"]
        print(
            f"max RSS of a process that only imports JAX and makes inputs: {baseline / 1e9:.2f} GB"
        )

    rows = []
    record = None  # provenance.machine() of the first timing worker
    for length in map(int, args.lengths.split(",")):
        combinations = [
            (p, n)
            for p, n in selected
            or [(p, n) for p in args.patterns.split(",") for n in args.implementations.split(",")]
            if applies(n, p, length, args.dense_max_length)
        ]
        if not combinations:
            continue
        # One process per length times everything alternately: ratios under the same load.
        times, error = run_worker(
            "time",
            args.timeout,
            length=length,
            repeats=args.repeats,
            implementations=",".join(f"{p}:{n}" for p, n in combinations),
        )
        if times and record is None:
            record = times["machine"]
            print(provenance.describe(record), flush=True)
        for pattern_name, name in combinations:
            pairs, block_fraction = work(make_pattern(pattern_name), length)
            row = {
                "pattern": pattern_name,
                "length": length,
                "implementation": name,
                "block_fraction": round(block_fraction, 4),
                "seconds": None,
                "matmul_peak_gflops": None,
                "fraction_of_matmul_peak": None,
                "peak_gb": None,
                "xla_gb": None,
                "error": error or "",
            }
            if times:
                row["seconds"] = times[f"{pattern_name}:{name}"]
                row["matmul_peak_gflops"] = round(times["matmul"] / 1e9, 1)
                # Forward: 2 matmuls over the allowed pairs; backward: 4 more.
                flops = 6 * 2 * pairs * HEADS * HEAD_DIM
                row["fraction_of_matmul_peak"] = round(flops / row["seconds"] / times["matmul"], 3)
            # block_products' RSS would include its host-side layouts: time only.
            if not args.no_memory and name != "block_products":
                memory, memory_error = run_worker(
                    "memory",
                    args.timeout,
                    pattern=pattern_name,
                    length=length,
                    implementations=name,
                )
                row["peak_gb"] = memory and round(memory["peak_rss"] / 1e9, 3)
                row["xla_gb"] = (
                    memory and memory.get("xla_bytes") and round(memory["xla_bytes"] / 1e9, 3)
                )
                row["error"] = row["error"] or memory_error or ""
            rows.append(row)
            print(_format(row), flush=True)

    _add_speedups(rows)
    # No timing worker succeeded: this process runs on the same machine.
    record = record or provenance.machine()
    for row in rows:
        row.update(machine.columns(record))
    path = os.path.join(args.out, "attention_benchmark.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out)
    print()
    print(provenance.describe(record))
    print(_table(rows))
    print(f"\nwrote {path}, {args.out}/time.png, {args.out}/memory.png")


def _add_speedups(rows):
    """Speedup over chunked full attention at the same length, and its fraction of the ideal."""
    chunked_full = {
        r["length"]: r["seconds"]
        for r in rows
        if r["implementation"] == "chunked" and r["pattern"] == "full" and r["seconds"]
    }
    for row in rows:
        row["speedup_vs_chunked_full"] = row["fraction_of_ideal_speedup"] = None
        if row["seconds"] and row["length"] in chunked_full:
            speedup = chunked_full[row["length"]] / row["seconds"]
            row["speedup_vs_chunked_full"] = round(speedup, 2)
            row["fraction_of_ideal_speedup"] = round(speedup * row["block_fraction"], 2)


def _format(row):
    seconds = "-" if row["seconds"] is None else f"{row['seconds']:.3f}s"
    peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}GB"
    if row["xla_gb"]:
        peak += f" (XLA {row['xla_gb']:.2f}GB)"
    return (
        f"{row['pattern']:>14} {row['length']:>6} {row['implementation']:>12} {seconds:>9} "
        f"{peak:>8} {row['error']}"
    )


def _table(rows):
    header = (
        "| pattern | length | implementation | fwd+bwd s | peak GB (max RSS) | XLA GB | "
        "matmul GFLOP/s | % of matmul | blocks computed | speedup vs chunked full | "
        "of ideal |"
    )
    lines = [header, "|" + "---|" * 11]
    show = lambda x, f="{}": "-" if x in (None, "") else f.format(x)
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['length']} | {r['implementation']} | "
            f"{show(r['seconds'], '{:.3f}')} | {show(r['peak_gb'], '{:.2f}')} | "
            f"{show(r['xla_gb'], '{:.2f}')} | "
            f"{show(r['matmul_peak_gflops'])} | "
            f"{show(r['fraction_of_matmul_peak'] and 100 * r['fraction_of_matmul_peak'], '{:.0f}')} | "
            f"{show(r['block_fraction'], '{:.3f}')} | {show(r['speedup_vs_chunked_full'])} | "
            f"{show(r['fraction_of_ideal_speedup'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    main()
