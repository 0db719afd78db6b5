"""Packed documents: forward+backward time of block-sparse attention with segment ids against
the same pattern without them, and against full attention.

Batch 1, 8 heads, head dim 64, float32, blocks of 64; each sequence is packed with documents of
`--document` tokens (segment id = position // document). Every case of a length is compiled in
one process and timed alternately (the fastest of `--repeats` runs: other load on the machine
only ever adds time), together with the float32 matmul peak (a 2048^2 product), so ratios
compare runs under the same load.

The ideal speedup of a packed case over its unpacked counterpart is the ratio of the block
products each must compute at the kernel's block size: blocks of the pattern that hold at least
one allowed pair, with segments (a query and key of one document) and without. "of ideal" is
the measured speedup over that ratio. The fused CPU kernel finds the packed layout per batch row
at run time (`cpu_kernel.cc`, `Walks`); "xla" rows are block_sparse's XLA schedules
(`use_kernel=False`), which compute every block of the pattern and mask the pairs.

    python benchmarks/packed_documents.py --lengths 4096,8192,16384 \
        --out benchmarks/results/packed_documents

Writes `<out>/packed_documents.csv` (each row ending with the machine, `machine.py`) and
`<out>/time.png`, and prints a table.
"""

import argparse
import csv
import os
import time

import machine  # this directory's
import numpy as np

HEADS, HEAD_DIM, BLOCK = 8, 64, 64
# name: (pattern, packed, use_kernel, unpacked counterpart)
CASES = {
    "causal packed": ("causal", True, True, "causal"),
    "causal": ("causal", False, True, None),
    "full": ("full", False, True, None),
    "window packed": ("window", True, True, "window"),
    "window": ("window", False, True, None),
    "causal packed xla": ("causal", True, False, "causal xla"),
    "causal xla": ("causal", False, False, None),
}


def make_pattern(name):
    from transformer import patterns

    return {
        "causal": patterns.causal,
        "full": patterns.full,
        "window": lambda: patterns.sliding_window(256),
    }[name]()


def segment_ids(length, document):
    """`[1, length]` int32: the document of each position."""
    return (np.arange(length) // document).astype(np.int32)[None]


def needed_blocks(pattern, length, ids):
    """The (query block, key block) products that hold an allowed pair: of the pattern, and
    within one document when `ids` is given."""
    from transformer.attention.block_sparse import make_plan

    plan = make_plan(pattern, length, length, BLOCK, BLOCK, dense_rows_apart=False)
    rows, row_start, kv_block, mask_id = plan.row_blocks
    if ids is None:
        return len(kv_block)
    blocks = ids[0].reshape(-1, BLOCK)  # lengths here are multiples of the block
    count = 0
    for r, q_block in enumerate(rows):
        entries = slice(row_start[r], row_start[r + 1])
        same = blocks[q_block][None, :, None] == blocks[kv_block[entries]][:, None, :]
        count += int((same & plan.block_masks[mask_id[entries]]).any((1, 2)).sum())
    return count


def compiled_step(case, length, document):
    """jit(grad) of sum(out * q) over q, k, v: one forward+backward pass. (A constant cotangent
    would let XLA simplify some backward passes, as attention_benchmark.py explains.)"""
    import jax
    import jax.numpy as jnp

    from transformer.attention.block_sparse import block_sparse_attention

    pattern_name, packed, use_kernel, _ = CASES[case]
    ids = jnp.asarray(segment_ids(length, document)) if packed else None

    def loss(q, k, v):
        out = block_sparse_attention(
            q,
            k,
            v,
            pattern=make_pattern(pattern_name),
            segment_ids=None if ids is None else (ids, ids),
            block_q=BLOCK,
            use_kernel=use_kernel,
        )
        return (out * q).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_length(length, cases, repeats, document):
    """{case: (fastest seconds, median cores busy)} and the matmul peak (FLOP/s), timed
    alternately. Cores busy is the process's CPU time over the wall time of a step: 2 when the
    parallel split keeps both cores working (less when other load takes a core)."""
    import jax

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, HEADS, HEAD_DIM)) for key in keys)
    steps = {case: compiled_step(case, length, document) for case in cases}
    n = 2048
    a = jax.random.normal(jax.random.key(1), (n, n))
    matmul = jax.jit(lambda a: a @ a)
    steps["matmul"] = lambda q, k, v: matmul(a)
    for step in steps.values():
        jax.block_until_ready(step(q, k, v))  # compile and warm up
    times = {name: [] for name in steps}
    busy = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(step(q, k, v))
            times[name].append(time.perf_counter() - start)
            busy[name].append((time.process_time() - cpu) / times[name][-1])
    best = {name: (min(t), float(np.median(busy[name]))) for name, t in times.items()}
    return best, 2 * n**3 / best.pop("matmul")[0]


def rows_of_length(length, best, peak, document):
    rows = {}
    for case, (seconds, cores_busy) in best.items():
        pattern_name, packed, use_kernel, _ = CASES[case]
        pattern = make_pattern(pattern_name)
        blocks = needed_blocks(pattern, length, segment_ids(length, document) if packed else None)
        # Forward: 2 products per block; backward: 4 more (as attention_benchmark.py counts).
        flops = 6 * 2 * blocks * BLOCK * BLOCK * HEAD_DIM * HEADS
        rows[case] = {
            "case": case,
            "length": length,
            "document": document if packed else "",
            "kernel": use_kernel,
            "seconds": round(seconds, 4),
            "cores_busy": round(cores_busy, 2),
            "blocks": blocks,
            "fraction_of_matmul_peak": round(flops / seconds / peak, 3),
            "matmul_peak_gflops": round(peak / 1e9, 1),
        }
    for row in rows.values():
        counterpart = CASES[row["case"]][3]
        row["speedup"] = row["ideal_speedup"] = row["of_ideal"] = row["speedup_vs_full"] = ""
        if counterpart in rows:
            speedup = rows[counterpart]["seconds"] / row["seconds"]
            ideal = rows[counterpart]["blocks"] / row["blocks"]
            row["speedup"], row["ideal_speedup"] = round(speedup, 2), round(ideal, 2)
            row["of_ideal"] = round(speedup / ideal, 2)
        if "full" in rows and row["case"] != "full" and row["kernel"]:
            row["speedup_vs_full"] = round(rows["full"]["seconds"] / row["seconds"], 2)
    return list(rows.values())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for case in CASES:
        points = sorted((r["length"], r["seconds"]) for r in rows if r["case"] == case)
        if points:
            style = "--" if "packed" in case else "-"
            axes.plot(*zip(*points), style, marker="o", label=case)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("forward+backward time (s)")
    document = next((r["document"] for r in rows if r["document"]), "")
    axes.set_title(
        f"packed documents of {document} tokens; batch 1, {HEADS} heads, head dim {HEAD_DIM}"
    )
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def table(rows):
    header = (
        "| case | length | fwd+bwd s | blocks | speedup over unpacked | ideal | of ideal | "
        "speedup over full | % of matmul peak | cores busy |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['length']} | {r['seconds']:.3f} | {r['blocks']} | "
            f"{r['speedup'] or '-'} | {r['ideal_speedup'] or '-'} | {r['of_ideal'] or '-'} | "
            f"{r['speedup_vs_full'] or '-'} | {100 * r['fraction_of_matmul_peak']:.0f} | "
            f"{r['cores_busy']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--document", type=int, default=512, help="tokens per document")
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {list(CASES)}")
    parser.add_argument(
        "--xla-max-length", type=int, default=4096, help="longest length for the xla cases"
    )
    parser.add_argument(
        "--full-max-length", type=int, default=8192, help="longest length for the full case"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/packed_documents")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; allowed: {list(CASES)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(length % BLOCK or length % args.document for length in lengths):
        parser.error(f"lengths must be multiples of the block ({BLOCK}) and of --document")

    from transformer.training import provenance

    record = provenance.machine()
    print(provenance.describe(record), flush=True)
    rows = []
    for length in lengths:
        chosen = [
            c
            for c in cases
            if (CASES[c][2] or length <= args.xla_max_length)
            and (c != "full" or length <= args.full_max_length)
        ]
        best, peak = time_length(length, chosen, args.repeats, args.document)
        for row in rows_of_length(length, best, peak, args.document):
            rows.append(row)
            print(
                f"{row['case']:>18} {length:>6} {row['seconds']:.3f}s blocks {row['blocks']:>6} "
                f"of ideal {row['of_ideal'] or '-'}",
                flush=True,
            )
    for row in rows:
        row.update(machine.columns(record))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "packed_documents.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "time.png"))
    print()
    print(provenance.describe(record))
    print(table(rows))
    print(f"\nwrote {path}, {args.out}/time.png")


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    main()
