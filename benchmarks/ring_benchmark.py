"""Ring attention over 1, 2, 4, 8 devices at fixed global work: memory, time, bytes, skipped work.

One sequence (batch 1) of --length tokens, split over a "context" mesh axis of each size in
--contexts, forward+backward of `ring.sharded_ring_attention` under each pattern. For each:

- per-device memory: XLA's compiled memory analysis of the whole step (arguments, outputs and
  temporaries of one device's program);
- step time: the median of --repeats runs after one warm-up (8 CPU devices share this machine's
  cores, so the time of 8 devices is the time of all 8 devices' work on those cores);
- bytes: what one device sends at most at one step and in the whole forward pass, and all
  devices together forward and backward (`RingPlan.bytes_per_step`, `bytes_per_device`,
  `total_bytes`);
- the plan: ring steps computed and skipped, shard pairs and chunk products skipped.

With --train, it measures instead the training step of a small BigBird decoder LM (2 layers,
d_model 64, 4 heads, vocabulary 256, blocks of 64; batch 1 of --length tokens) on a mesh of
`context` devices, context 1 being one device running the model as it does without a mesh
axis: per-device memory and step time, and the ring's bytes per layer (`train.md`, `train.csv`).

It makes 8 CPU devices itself (XLA_FLAGS, before JAX is imported). Writes ring.md (the table),
ring.csv (with the machine's columns) and ring.png to --out.

  python benchmarks/ring_benchmark.py --out=benchmarks/results/ring
  python benchmarks/ring_benchmark.py --length=4096 --repeats=2 --out=/tmp/ring
  python benchmarks/ring_benchmark.py --patterns=causal --order=zigzag --length=8192 \
      --out=benchmarks/results/ring/causal_zigzag
  python benchmarks/ring_benchmark.py --train --out=benchmarks/results/ring/train
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import csv  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (this directory's)

from transformer import patterns  # noqa: E402
from transformer.attention import ring  # noqa: E402
from transformer.training import provenance  # noqa: E402

_OUT = flags.DEFINE_string("out", "benchmarks/results/ring", "Folder for ring.md, .csv, .png.")
_LENGTH = flags.DEFINE_integer("length", 16384, "Global sequence length (batch 1).")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension (and value dimension).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "Sizes of the context axis.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case, after one warm-up.")
_WINDOW = flags.DEFINE_integer("window", 256, "Sliding window half-width (tokens each side).")
_ORDER = flags.DEFINE_enum("order", "contiguous", ring.ORDERS, "Token order over the shards.")
_TRAIN = flags.DEFINE_bool("train", False, "Measure a BigBird LM's training step instead.")
_PATTERNS = flags.DEFINE_list(
    "patterns", ["sliding_window", "bigbird"], "Of: sliding_window, bigbird, causal."
)


def _patterns():
    known = {
        "sliding_window": (
            f"sliding_window({_WINDOW.value})",
            patterns.sliding_window(_WINDOW.value),
        ),
        "bigbird": ("bigbird(64)", patterns.bigbird(block_size=64)),
        "causal": ("causal", patterns.causal()),
    }
    unknown = sorted(set(_PATTERNS.value) - set(known))
    if unknown:
        raise app.UsageError(f"--patterns: unknown {unknown}; allowed: {sorted(known)}.")
    return dict(known[name] for name in _PATTERNS.value)


def measure(name, pattern, context, length, heads, head_dim, repeats, order):
    """One row: the step's memory, time, bytes and plan at one context size."""
    mesh = Mesh(np.array(jax.devices()[:context]), ("context",))
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=(1, length, heads, head_dim)), jnp.float32) for _ in range(3)
    )

    if order == "zigzag":
        # As an input pipeline would feed them: in zig-zag order already, once, on the host.
        q, k, v = (ring.to_zigzag(x, context) for x in (q, k, v))

    def loss(q, k, v):
        out = ring.sharded_ring_attention(
            q, k, v, mesh=mesh, pattern=pattern, order=order, reorder=False
        )
        return (out * out).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    memory = compiled.memory_analysis()
    per_device = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    )
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    plan = ring.plan_ring(pattern, context, length // context, None, order)
    step_bytes = plan.bytes_per_step(1, heads, head_dim)
    forward, backward = plan.total_bytes(1, heads, head_dim)
    return {
        "pattern": name,
        "order": order,
        "context": context,
        "length": length,
        "heads": heads,
        "head_dim": head_dim,
        "memory_mb_per_device": per_device / 1e6,
        "temp_mb_per_device": memory.temp_size_in_bytes / 1e6,
        "step_s": statistics.median(times),
        "steps_computed": len(plan.steps),
        "exchanges": plan.exchanges,
        "offsets_skipped": len(plan.skipped_offsets),
        "bytes_per_step_per_device": max(step_bytes),
        "forward_mb_per_device": float(plan.bytes_per_device(1, heads, head_dim).max() / 1e6),
        "forward_mb_all": forward / 1e6,
        "backward_mb_all": backward / 1e6,
        "pairs_computed": plan.computed_pairs,
        "pairs_skipped": plan.skipped_pairs,
        "chunk": plan.chunk,
        "chunks_computed": plan.computed_chunks,
        "chunks_total": plan.total_chunks,
        "max_chunks_per_device": int(plan.chunks_per_device().max()),
    }


def _lm(length):
    """The small BigBird decoder LM of --train, its task and optimizer."""
    import ml_collections

    from transformer.modules.models import build_model
    from transformer.training import optimizer, tasks

    model = build_model(
        dict(
            name="decoder_lm",
            vocab_size=256,
            d_model=64,
            num_heads=4,
            d_ff=128,
            num_layers=2,
            max_len=length,
            pattern="bigbird",
            pattern_options=dict(block_size=64),
            positional="rotary",
            dropout_rate=0.0,
        )
    )
    opt = optimizer.make_optimizer(
        ml_collections.ConfigDict(
            dict(
                learning_rate=1e-3,
                warmup_steps=0,
                schedule="constant",
                weight_decay=0.0,
                b1=0.9,
                b2=0.98,
                eps=1e-9,
                grad_clip_norm=1.0,
            )
        ),
        total_steps=10,
    )
    return model, tasks.get_task("language_modelling"), opt


def measure_train(context, length, repeats):
    """One row: a BigBird LM's training step on `context` devices, each holding
    length / context tokens of the one sequence."""
    from transformer.training import loop, parallel

    model, task, opt = _lm(length)
    mesh = parallel.make_mesh(dict(data=1, context=context), jax.devices()[:context])
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 256, size=(1, length)).astype(np.int32)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1)}
    state = loop.make_init(model, task, opt, mesh)(0, batch)
    order = loop.context_order(model)
    step = parallel.distribute(
        loop.make_train_step(model, task, opt, label_smoothing=0.0, mesh=mesh), "shard_map", mesh
    )
    device_batch = parallel.global_batch(batch, mesh, "shard_map", order)
    compiled = step.lower(state, device_batch).compile()
    memory = compiled.memory_analysis()
    per_device = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    )
    jax.block_until_ready(compiled(state, device_batch))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, device_batch))
        times.append(time.perf_counter() - start)
    config = model.config
    from transformer.modules.models import layer_pattern

    plan = ring.plan_ring(
        layer_pattern(config, 0, causal=True), context, length // context, None, order
    )
    head_dim = config.d_model // config.num_heads
    forward, backward = plan.total_bytes(1, config.num_heads, head_dim)
    return {
        "model": "decoder_lm bigbird(64), 2 layers, d_model 64",
        "order": order if context > 1 else "-",
        "context": context,
        "length": length,
        "memory_mb_per_device": per_device / 1e6,
        "temp_mb_per_device": memory.temp_size_in_bytes / 1e6,
        "step_s": statistics.median(times),
        "tokens_per_s": length / statistics.median(times),
        "layer0_pairs_skipped": plan.skipped_pairs,
        "layer0_fwd_bwd_mb_all": backward / 1e6,
        "layer0_fwd_mb_all": forward / 1e6,
    }


def train_table(rows):
    lines = [
        "| context | order | memory / device (MB) | temporaries / device (MB) | step (s) | "
        "tokens/s | layer 0: shard pairs skipped | layer 0: sent, all, fwd / fwd+bwd (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['order']} | {r['memory_mb_per_device']:.0f} | "
            f"{r['temp_mb_per_device']:.0f} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['layer0_pairs_skipped']} of {r['context'] ** 2} | "
            f"{r['layer0_fwd_mb_all']:.1f} / {r['layer0_fwd_bwd_mb_all']:.1f} |"
        )
    return "\n".join(lines)


def write(rows, name, text):
    """`name`.csv (with the machine's columns) and `name`.md in --out."""
    machine_columns = machine.columns()
    with open(os.path.join(_OUT.value, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(machine_columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **machine_columns})
    with open(os.path.join(_OUT.value, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


def main_train():
    rows = []
    for context in map(int, _CONTEXTS.value):
        row = measure_train(context, _LENGTH.value, _REPEATS.value)
        print(row, flush=True)
        rows.append(row)
    text = (
        f"{provenance.describe()}\n\nbatch 1, {_LENGTH.value} tokens, float32, one training "
        f"step (forward, backward, AdamW)\n\n{train_table(rows)}\n"
    )
    write(rows, "train", text)


def table(rows):
    lines = [
        "| pattern | context | memory / device (MB) | step (s) | steps computed / skipped | "
        "bytes / step / device (MB) | sent / device, fwd (MB) | sent, all, fwd / fwd+bwd (MB) "
        "| shard pairs skipped | chunk products (max / device) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['context']} | {r['memory_mb_per_device']:.0f} | "
            f"{r['step_s']:.2f} | {r['steps_computed']} / {r['offsets_skipped']} | "
            f"{r['bytes_per_step_per_device'] / 1e6:.1f} | {r['forward_mb_per_device']:.1f} | "
            f"{r['forward_mb_all']:.1f} / {r['backward_mb_all']:.1f} | "
            f"{r['pairs_skipped']} of {r['context'] ** 2} | "
            f"{r['chunks_computed']} of {r['chunks_total']} ({r['max_chunks_per_device']}) |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(r["pattern"] for r in rows):
        mine = [r for r in rows if r["pattern"] == name]
        contexts = [r["context"] for r in mine]
        axes[0].plot(contexts, [r["memory_mb_per_device"] for r in mine], "o-", label=name)
        axes[1].plot(contexts, [r["forward_mb_per_device"] for r in mine], "o-", label=name)
        axes[2].plot(contexts, [r["step_s"] for r in mine], "o-", label=name)
    titles = (
        "memory per device (MB, XLA)",
        "sent per device, forward (MB)",
        "fwd+bwd step (s), all devices on 2 cores",
    )
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (devices)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    if _TRAIN.value:
        return main_train()
    rows = []
    for name, pattern in _patterns().items():
        for context in map(int, _CONTEXTS.value):
            row = measure(
                name,
                pattern,
                context,
                _LENGTH.value,
                _HEADS.value,
                _HEAD_DIM.value,
                _REPEATS.value,
                _ORDER.value,
            )
            print(row, flush=True)
            rows.append(row)
    text = (
        f"{provenance.describe()}\n\nbatch 1, {_LENGTH.value} tokens, {_HEADS.value} heads, "
        f"head_dim {_HEAD_DIM.value}, float32, forward+backward, {_ORDER.value} order\n\n"
        f"{table(rows)}\n"
    )
    write(rows, "ring", text)
    plot(rows, os.path.join(_OUT.value, "ring.png"))


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    app.run(main)
