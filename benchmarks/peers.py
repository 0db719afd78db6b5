"""This codebase beside what a user would otherwise pick on the same CPU, side by side.

Attention (batch 1, 8 heads, head dim 64, float32) and the train_speed model's training step,
each against its PyTorch peer in one process, alternated, the median of `--repeats` runs:

- full and causal attention, forward+backward: ours (`auto`, i.e. block-sparse's CPU kernel)
  against `torch.nn.functional.scaled_dot_product_attention` (its CPU flash kernel), and
  `jax.nn.dot_product_attention` up to `--jax-nn-max-length` (it builds the score matrix);
- sparse patterns at the longest length (a +-256 sliding window; BigBird with block 64, a window
  of 3 blocks, 2 anchor and 3 random blocks): ours forward against FlexAttention compiled with
  `torch.compile` (PyTorch 2.13 has no FlexAttention backward pass on CPU), and ours
  forward+backward against our own full attention: the speedup as a fraction of the ideal one,
  which is one over the share of non-empty 64 x 64 blocks;
- the matmul ceiling of each library (a float32 2048^3 product), timed in the same alternation,
  and each attention case's FLOP/s as a share of it (forward 4, forward+backward 12 FLOPs per
  allowed query-key pair and head dimension);
- the training step of the train_speed model (`experiments/train_speed.py`: its config, built by
  the training loop's own functions, data parallel over one XLA device per core as its sweep
  runs) against an eager `nn.TransformerEncoder` classifier of the same sizes and AdamW
  (`torch_peers.py`), at 1,024 and 4,096 tokens with full attention and at 4,096 with BigBird;
  PyTorch gets BigBird as a dense boolean mask (FlexAttention, its sparse path, has no backward
  pass on CPU). Tokens/s, and the model's FLOPs (over allowed pairs) as a share of each
  library's matmul ceiling.

    python benchmarks/peers.py --out benchmarks/results/peers
    python benchmarks/peers.py --quick --out /tmp/peers   # small lengths and the smoke model
    python benchmarks/peers.py --lengths "" --out /tmp/train  # the training steps only

PyTorch is optional and no dependency of the package (`pip install torch==2.13.0`, a CPU
build); without it, or with `--no-torch`, only our side is timed. Writes `<out>/peers.csv` (one
row per case, ending with the machine, `machine.py`) and `<out>/peers.png`, and prints a table
of ratios (the peer's time over ours: above 1, ours is faster) with the issue's targets.
"""

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

# The repository root, for experiments/ (and this checkout's transformer/) in every process.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attention_benchmark  # noqa: E402  (this directory's)
import machine  # noqa: E402  (this directory's)

from transformer.training import provenance  # noqa: E402

HEADS, HEAD_DIM = attention_benchmark.HEADS, attention_benchmark.HEAD_DIM
DENSE_PATTERNS = ("full", "causal")
SPARSE_PATTERNS = ("sliding_window", "bigbird")
# FlexAttention's tile: 64 (our block) ran BigBird and the window faster than its default 128.
FLEX_BLOCK = 64
MATMUL_SIZE = 2048
# What the targets ask: the peer's time over ours, or the share of the ideal speedup.
TARGETS = {
    "attention": 1.3,  # full and causal, forward+backward, against SDPA
    "flex": 1.5,  # sparse, against FlexAttention
    "ideal": 0.9,  # sparse, forward+backward, share of the ideal speedup over our full attention
    "train_full": 1.3,
    "train_bigbird": 2.0,
}
PRESETS = {
    "default": dict(
        lengths=(1024, 2048, 4096, 8192, 16384),
        sparse_length=16384,
        train_preset="cpu",
        train_variants=("full-1024", "full-4096", "bigbird-4096"),
    ),
    "quick": dict(
        lengths=(256, 512),
        sparse_length=512,
        train_preset="smoke",
        train_variants=("full-128", "bigbird-128"),
    ),
}


def torch_peers_module():
    """benchmarks/torch_peers.py, or None where torch is not installed."""
    try:
        import torch_peers  # this directory's; imports torch
    except ImportError:
        return None
    return torch_peers


# ---------------------------------------------------------------------------------------------
# The attention worker: one process per length.


def attention_steps(cases, length, peers):
    """{case: fn() -> result} for every (pattern, library, pass) in `cases`, compiled and warmed
    up, and {case: max |ours - theirs|} of the forward outputs on the same inputs."""
    import jax
    import numpy as np

    from transformer.attention import dot_product_attention

    q, k, v = attention_benchmark.inputs(length)  # [1, length, heads, head_dim]
    if peers:
        import torch

        as_torch = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy())
        torch_inputs = [as_torch(x).requires_grad_(True) for x in (q, k, v)]
        forward_inputs = [as_torch(x) for x in (q, k, v)]
    steps, differences = {}, {}
    for pattern_name, library, kind in cases:
        pattern = attention_benchmark.make_pattern(pattern_name)
        if library == "ours" and kind == "forward":
            forward = jax.jit(
                lambda q, k, v, p=pattern: dot_product_attention(
                    q, k, v, pattern=p, implementation="auto"
                )
            )
            steps[pattern_name, library, kind] = lambda f=forward: jax.block_until_ready(f(q, k, v))
        elif library in ("ours", "jax.nn"):
            implementation = "auto" if library == "ours" else "jax.nn"
            step = attention_benchmark.compiled_step(implementation, pattern, length)
            steps[pattern_name, library, kind] = lambda s=step: jax.block_until_ready(s(q, k, v))
        elif kind == "forward":  # FlexAttention
            mask = pattern.mask(length, length)
            steps[pattern_name, library, kind] = peers.flex_forward(
                *forward_inputs, mask, FLEX_BLOCK
            )
        else:
            steps[pattern_name, library, kind] = peers.sdpa_step(
                *torch_inputs, causal=pattern_name == "causal"
            )
        warm = steps[pattern_name, library, kind]()  # compiles; FlexAttention's: the output
        if library == "torch":
            if kind == "forward+backward":
                warm = peers.sdpa_forward(*forward_inputs, causal=pattern_name == "causal")
            ours = np.asarray(
                dot_product_attention(q, k, v, pattern=pattern, implementation="auto")
            )
            differences[pattern_name, library, kind] = float(
                np.abs(ours - warm.numpy().transpose(0, 2, 1, 3)).max()
            )
    return steps, differences


def jax_matmul_step():
    import jax

    a = jax.random.normal(jax.random.key(1), (MATMUL_SIZE, MATMUL_SIZE))
    product = jax.jit(lambda a: a @ a)
    jax.block_until_ready(product(a))
    return lambda: jax.block_until_ready(product(a))


def torch_matmul_step():
    import torch

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ a
    return lambda: a @ a


def alternate(steps, repeats):
    """{name: median seconds}: every step once per round, `repeats` rounds."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def worker_attention(args):
    peers = None if args.no_torch else torch_peers_module()
    cases = [tuple(case.split(":")) for case in args.cases.split(",")]
    cases = [case for case in cases if peers or case[1] != "torch"]
    steps, differences = attention_steps(cases, args.length, peers)
    steps = {":".join(case): step for case, step in steps.items()}
    steps["matmul:jax"] = jax_matmul_step()
    if peers:
        steps["matmul:torch"] = torch_matmul_step()
    seconds = alternate(steps, args.repeats)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "differences": {":".join(case): d for case, d in differences.items()},
                "machine": provenance.machine(),
                "torch": _torch_version(peers),
            }
        )
    )


def _torch_version(peers):
    if not peers:
        return None
    import torch

    return f"{torch.__version__}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# The training worker: one process per (pattern, length), one XLA device per core.


def ours_train_step(config):
    """(fn() -> None, model, batch as NumPy): one training step of `config`'s model, built by
    the training loop (`loop.programs`), data parallel over this process's devices."""
    import jax
    import numpy as np

    from transformer.data import data_info
    from transformer.training import loop, parallel

    mesh = parallel.make_mesh()
    setup = loop.prepare(config)
    programs = loop.programs(config, setup.model, setup.task, mesh)
    info = data_info(config.data)
    rng = np.random.default_rng(0)
    rows, length = config.global_batch_size, info.max_length
    # Token ids from 2 up: no padding (0) anywhere, as in the experiment's data.
    batch = {
        "inputs": rng.integers(2, info.vocab_size, (rows, length)).astype(np.int32),
        "targets": rng.integers(0, info.num_classes, rows).astype(np.int32),
    }
    state = [parallel.replicate(programs.init(config.seed, batch), mesh, config.parallel)]
    global_batch = parallel.global_batch(batch, mesh, config.parallel)

    def step():  # the state is donated: keep the new one
        state[0], _ = programs.train_step(state[0], global_batch)
        jax.block_until_ready(state[0])

    step()  # compile
    return step, setup.model, batch


def model_flops(model_config, batch, length, pairs):
    """FLOPs of one training step: forward and the backward's two matmuls per forward matmul,
    over the dense layers (Q, K, V, output, two feed-forward) and the allowed pairs per sequence
    of attention; embeddings, norms and the optimizer left out."""
    d, d_ff = model_config.d_model, model_config.d_ff
    per_layer = batch * (2 * length * (4 * d * d + 2 * d * d_ff) + 4 * pairs * d)
    return 3 * model_config.num_layers * per_layer


def worker_train(args):
    from experiments import train_speed
    from transformer.modules import models

    peers = None if args.no_torch else torch_peers_module()
    config = train_speed.get_config(f"{args.train_preset},{args.variant}")
    pattern_name, length = train_speed.split_variant(args.variant)
    ours, model, batch = ours_train_step(config)
    steps = {"ours": ours}
    # The pattern of the model's first layer (BigBird's random blocks differ per layer).
    pattern = models.layer_pattern(model.config, 0, causal=False)
    pairs = int(pattern.mask(length, length).sum())
    if peers:
        sizes = dict(
            vocab_size=model.config.vocab_size,
            num_classes=model.config.num_classes,
            d_model=model.config.d_model,
            num_heads=model.config.num_heads,
            d_ff=model.config.d_ff,
            num_layers=model.config.num_layers,
            epsilon=model.config.layer_norm_epsilon,
        )
        mask = None if pattern_name == "full" else pattern.mask(length, length)
        steps["torch"] = peers.train_step(sizes, batch["inputs"], batch["targets"], mask)
        steps["torch"]()  # warm up
        steps["matmul:torch"] = torch_matmul_step()
    steps["matmul:jax"] = jax_matmul_step()
    seconds = alternate(steps, args.repeats)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": batch["inputs"].size,
                "flops": model_flops(model.config, len(batch["inputs"]), length, pairs),
                "machine": provenance.machine(),
                "torch": _torch_version(peers),
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# The coordinator.


def attention_cases(length, sparse_length, jax_nn_max_length):
    """(pattern, library, pass) cases timed at `length`."""
    cases = []
    for pattern in DENSE_PATTERNS:
        cases += [(pattern, "ours", "forward+backward"), (pattern, "torch", "forward+backward")]
        if length <= jax_nn_max_length:
            cases.append((pattern, "jax.nn", "forward+backward"))
    if length == sparse_length:
        for pattern in SPARSE_PATTERNS:
            cases += [
                (pattern, "ours", "forward+backward"),
                (pattern, "ours", "forward"),
                (pattern, "torch", "forward"),
            ]
    return cases


def run_worker(kind, timeout, env=None, **options):
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            command += [f"--{key.replace('_', '-')}", str(value)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout}s"
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def attention_rows(length, cases, result, error):
    """One row per (pattern, pass) at `length`: ours against the peer."""
    seconds = (result or {}).get("seconds", {})
    jax_flops = seconds.get("matmul:jax") and 2 * MATMUL_SIZE**3 / seconds["matmul:jax"]
    torch_flops = seconds.get("matmul:torch") and 2 * MATMUL_SIZE**3 / seconds["matmul:torch"]
    rows = []
    for pattern_name, kind in dict.fromkeys((p, k) for p, _, k in cases):
        pairs, block_fraction = attention_benchmark.work(
            attention_benchmark.make_pattern(pattern_name), length
        )
        flops = (12 if kind == "forward+backward" else 4) * pairs * HEADS * HEAD_DIM
        ours = seconds.get(f"{pattern_name}:ours:{kind}")
        peer = seconds.get(f"{pattern_name}:torch:{kind}")
        sparse = pattern_name in SPARSE_PATTERNS
        row = empty_row("attention", pattern_name, length, kind)
        row.update(
            ours_seconds=ours,
            peer=_peer_name(pattern_name, kind),
            peer_seconds=peer,
            jax_nn_seconds=seconds.get(f"{pattern_name}:jax.nn:{kind}"),
            block_fraction=round(block_fraction, 4),
            max_abs_difference=(result or {})
            .get("differences", {})
            .get(f"{pattern_name}:torch:{kind}"),
            error=error or "",
        )
        _add_rates(row, flops, jax_flops, torch_flops)
        if ours and peer:
            row["ratio"] = round(peer / ours, 3)
        if not (sparse and kind == "forward+backward"):
            row["target"] = TARGETS["flex" if sparse else "attention"]
        rows.append(row)
    return rows


def _peer_name(pattern_name, kind):
    if pattern_name in SPARSE_PATTERNS:
        return "" if kind == "forward+backward" else "FlexAttention (compiled)"
    return "SDPA"


def _add_rates(row, flops, jax_flops, torch_flops):
    row["jax_matmul_gflops"] = jax_flops and round(jax_flops / 1e9, 1)
    row["torch_matmul_gflops"] = torch_flops and round(torch_flops / 1e9, 1)
    if row["ours_seconds"] and jax_flops:
        row["ours_of_jax_matmul"] = round(flops / row["ours_seconds"] / jax_flops, 3)
    if row["ours_seconds"] and torch_flops:
        row["ours_of_torch_matmul"] = round(flops / row["ours_seconds"] / torch_flops, 3)
    if row["peer_seconds"] and torch_flops:
        row["peer_of_torch_matmul"] = round(flops / row["peer_seconds"] / torch_flops, 3)


def add_ideal_speedups(rows):
    """Sparse forward+backward rows: speedup over our full attention at the same length, and
    that speedup times the share of non-empty blocks (1.0: as fast as the blocks allow)."""
    full = {
        r["length"]: r["ours_seconds"]
        for r in rows
        if (r["kind"], r["pattern"], r["pass"]) == ("attention", "full", "forward+backward")
    }
    for row in rows:
        if (
            row["pattern"] in SPARSE_PATTERNS
            and row["pass"] == "forward+backward"
            and row["ours_seconds"]
            and full.get(row["length"])
        ):
            speedup = full[row["length"]] / row["ours_seconds"]
            row["speedup_vs_full"] = round(speedup, 2)
            row["ratio"] = row["fraction_of_ideal"] = round(speedup * row["block_fraction"], 3)
            row["target"] = TARGETS["ideal"]


def train_row(variant, result, error):
    from experiments import train_speed

    pattern_name, length = train_speed.split_variant(variant)
    row = empty_row("train step", pattern_name, length, "AdamW step")
    row["error"] = error or ""
    row["peer"] = "nn.TransformerEncoder, eager" + (
        "" if pattern_name == "full" else ", dense mask"
    )
    row["target"] = TARGETS["train_full" if pattern_name == "full" else "train_bigbird"]
    if not result:
        return row
    seconds = result["seconds"]
    row["ours_seconds"], row["peer_seconds"] = seconds["ours"], seconds.get("torch")
    row["ours_tokens_per_s"] = round(result["tokens"] / seconds["ours"], 1)
    if row["peer_seconds"]:
        row["peer_tokens_per_s"] = round(result["tokens"] / row["peer_seconds"], 1)
        row["ratio"] = round(row["peer_seconds"] / row["ours_seconds"], 3)
    _add_rates(
        row,
        result["flops"],
        2 * MATMUL_SIZE**3 / seconds["matmul:jax"],
        seconds.get("matmul:torch") and 2 * MATMUL_SIZE**3 / seconds["matmul:torch"],
    )
    return row


def empty_row(kind, pattern, length, kind_of_pass):
    fields = (
        "peer ours_seconds peer_seconds ratio target met jax_nn_seconds ours_tokens_per_s "
        "peer_tokens_per_s jax_matmul_gflops torch_matmul_gflops ours_of_jax_matmul "
        "ours_of_torch_matmul peer_of_torch_matmul block_fraction speedup_vs_full "
        "fraction_of_ideal max_abs_difference torch error"
    ).split()
    return {
        "kind": kind,
        "pattern": pattern,
        "length": length,
        "pass": kind_of_pass,
    } | dict.fromkeys(fields)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, ratios) = plt.subplots(1, 2, figsize=(12, 4.5))
    for pattern in DENSE_PATTERNS:
        mine = [
            r
            for r in rows
            if r["kind"] == "attention" and r["pattern"] == pattern and r["ours_seconds"]
        ]
        for column, label, style in (
            ("ours_seconds", "ours (auto)", "o-"),
            ("peer_seconds", "PyTorch SDPA", "s--"),
            ("jax_nn_seconds", "jax.nn", "^:"),
        ):
            points = [(r["length"], r[column]) for r in mine if r[column]]
            if points:
                times.plot(*zip(*points), style, label=f"{pattern}: {label}")
    times.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length (tokens)",
        ylabel="forward+backward time (s)",
        title=f"attention, batch 1, {HEADS} heads, head dim {HEAD_DIM}, float32",
    )
    times.set_xscale("log", base=2)
    times.grid(True, which="both", alpha=0.3)
    times.legend(fontsize=7)
    compared = [r for r in rows if r["ratio"]]
    labels = [_label(r) for r in compared]
    ratios.barh(labels, [r["ratio"] for r in compared], color="tab:blue")
    ratios.scatter([r["target"] for r in compared], labels, marker="|", s=200, color="red")
    ratios.axvline(1.0, color="black", linewidth=0.8)
    ratios.set(xlabel="peer time / ours (of ideal for sparse fwd+bwd); red: target")
    ratios.invert_yaxis()
    ratios.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _label(row):
    short = {"forward+backward": "fwd+bwd", "forward": "fwd", "AdamW step": "train"}
    return f"{row['pattern']} {row['length']} {short[row['pass']]}"


def table(rows):
    show = lambda x, f="{}": "-" if x in (None, "") else f.format(x)
    percent = lambda x: show(x and 100 * x, "{:.0f}%")
    lines = [
        "| case | length | ours | peer | peer's | ratio (target) | ours % of JAX / PyTorch "
        "matmul | peer % of PyTorch matmul | jax.nn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "train step":
            ours = show(r["ours_tokens_per_s"], "{:,.0f} tok/s")
            theirs = show(r["peer_tokens_per_s"], "{:,.0f} tok/s")
        else:
            ours, theirs = show(r["ours_seconds"], "{:.3f} s"), show(r["peer_seconds"], "{:.3f} s")
        ratio = show(r["ratio"], "{:.2f}x")
        if r["fraction_of_ideal"] is not None:
            ratio = f"{percent(r['fraction_of_ideal'])} of ideal ({r['speedup_vs_full']}x full)"
        if r["target"] is not None:
            target = (
                f"{percent(r['target'])}"
                if r["fraction_of_ideal"] is not None
                else f"{r['target']}x"
            )
            mark = "" if r["met"] is None else (" met" if r["met"] else " missed")
            ratio += f" ({target}{mark})"
        lines.append(
            f"| {r['pattern']} {r['pass']} | {r['length']:,} | {ours} | {r['peer'] or '-'} | "
            f"{theirs} | {ratio} | {percent(r['ours_of_jax_matmul'])} / "
            f"{percent(r['ours_of_torch_matmul'])} | {percent(r['peer_of_torch_matmul'])} | "
            f"{show(r['jax_nn_seconds'], '{:.3f} s')} |" + (f" {r['error']}" if r["error"] else "")
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, the smoke model")
    parser.add_argument(
        "--lengths", help="attention lengths, comma-separated ('' for none; preset's default)"
    )
    parser.add_argument("--sparse-length", type=int, help="length of the sparse patterns' cases")
    parser.add_argument(
        "--train-variants", help="train_speed variants, e.g. full-1024,bigbird-4096 ('' for none)"
    )
    parser.add_argument("--jax-nn-max-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="attention rounds (median)")
    parser.add_argument("--train-repeats", type=int, default=5, help="training steps (median)")
    parser.add_argument("--no-torch", action="store_true", help="our side only")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks/results/peers")
    # Internal: the subprocesses.
    parser.add_argument("--worker", choices=("attention", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--train-preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return {"attention": worker_attention, "train": worker_train}[args.worker](args)

    preset = PRESETS["quick" if args.quick else "default"]
    lengths = preset["lengths"]
    if args.lengths is not None:
        lengths = [int(n) for n in args.lengths.split(",") if n]
    sparse_length = args.sparse_length or preset["sparse_length"]
    if lengths and sparse_length not in lengths:
        parser.error(f"--sparse-length {sparse_length} must be one of the lengths {lengths}")
    variants = preset["train_variants"]
    if args.train_variants is not None:
        variants = [v for v in args.train_variants.split(",") if v]
    peers = not args.no_torch and importlib.util.find_spec("torch") is not None
    if not peers:
        print(
            "PyTorch is not "
            + ("used (--no-torch)" if args.no_torch else "installed (pip install torch==2.13.0)")
            + ": our side only."
        )
    os.makedirs(args.out, exist_ok=True)

    rows, records = [], []
    for length in lengths:
        cases = attention_cases(length, sparse_length, args.jax_nn_max_length)
        result, error = run_worker(
            "attention",
            args.timeout,
            length=length,
            repeats=args.repeats,
            cases=",".join(":".join(case) for case in cases),
            no_torch=not peers,
        )
        records.append(result)
        rows += attention_rows(length, cases, result, error)
        _print_progress(rows, length)
    for variant in variants:
        result, error = run_worker(
            "train",
            args.timeout,
            # One XLA device per core, as the train_speed sweep runs.
            env={"JAX_NUM_CPU_DEVICES": str(os.cpu_count())},
            variant=variant,
            train_preset=preset["train_preset"],
            repeats=args.train_repeats,
            no_torch=not peers,
        )
        records.append(result)
        rows.append(train_row(variant, result, error))
        _print_progress(rows, variant)
    add_ideal_speedups(rows)

    record = next((r for r in records if r), None)
    for row in rows:
        if row["target"] is not None and row["ratio"] is not None:
            row["met"] = row["ratio"] >= row["target"]
        row["torch"] = record and record["torch"] or ""
        row.update(machine.columns(record and record["machine"]))
    path = os.path.join(args.out, "peers.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "peers.png"))
    print()
    print(provenance.describe(record and record["machine"]))
    if record and record["torch"]:
        print(f"PyTorch {record['torch']}")
    print(table(rows))
    print(f"\nwrote {path}, {args.out}/peers.png")


def _print_progress(rows, where):
    done = [r for r in rows if r["error"] == "" and (r["ours_seconds"] or r["peer_seconds"])]
    failed = [r for r in rows if r["error"]]
    print(
        f"{where}: {len(done)} cases timed" + (f"; {failed[-1]['error']}" if failed else ""),
        flush=True,
    )


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    main()
