r"""Cached greedy decoding: what a token costs, beside PyTorch eager, and what the cache saves.

    python benchmarks/decoding_benchmark.py                       # every table
    python benchmarks/decoding_benchmark.py --tables generation --lengths 512,2048

A decoder-only LM (4 layers, or --num_layers; d_model 256, 4 heads, d_ff 1024, vocabulary 1024,
pre-LN, sinusoidal positions, tied embedding, random weights, float32, batch 1), with full
attention ("full") or a causal window of 256 keys back ("window"). Tables:

  generation  tokens/s generating N tokens from one start token, the cache holding N.
  buffers     ms/token at positions 144..207 for cache buffers of 256 to 8,192 positions: what a
              step costs should not depend on the buffer.
  positions   ms/token of each model just past positions 256 and 8,192.
  memory      XLA's buffer analysis of the compiled generation of N tokens (arguments, outputs
              and temporaries, the cache among them), and the bytes of each side's cache.
  uncached    cached decoding against full recomputation over a fixed [1, N] buffer, the work
              of a model without a cache (only --uncached_steps steps of it are timed).

Per-token costs are differences: (time of S2 steps - time of S1 steps) / (S2 - S1), each run
from the same prefilled state, so one-time costs (the call, the state's copy) cancel. The
PyTorch side (`torch_decoder.py`, when `torch` is installed; it is no dependency of the package)
is eager with a preallocated cache and `scaled_dot_product_attention` over its filled part (the
window's last 257 keys), under `torch.inference_mode()` with as many threads as cores. Timings
alternate the two sides, --repeats times each; tables show medians and the ratio JAX / PyTorch
in speed. Both generate from the same start token with the same greedy rule; their weights
differ, so their tokens do.

Writes `decoding_<table>.csv` per table and `decoding.png` into --out; rows end with the
model's num_layers and the machine's columns (`machine.py`), and the printed tables start with
`provenance.describe()`.
"""

import argparse
import csv
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import machine  # this directory's
import numpy as np

from transformer import decoding
from transformer.modules.models import build_model
from transformer.token_ids import PAD_ID
from transformer.training import provenance

SIZES = dict(vocab_size=1024, d_model=256, num_heads=4, d_ff=1024, num_layers=4)
MODEL = dict(
    **SIZES,
    dropout_rate=0.0,
    positional="sinusoidal",
    norm_position="pre",
    tie_output_embedding=True,
)
WINDOW = 256
PATTERNS = {
    "full": {},
    "window": dict(pattern="sliding_window", pattern_options={"left": WINDOW}),
}
START_TOKEN = SIZES["vocab_size"] - 1


def decoder_lm(pattern, max_len, num_layers):
    config = {**MODEL, **PATTERNS[pattern], "num_layers": num_layers}
    return build_model(dict(config, name="decoder_lm", max_len=max_len))


def variables_of(model):
    return jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def generate_fn(model, num_tokens, max_len):
    """Jitted (variables, state) -> `[1, num_tokens]` greedy tokens from START_TOKEN."""

    def run(variables, state):
        step = lambda state, token: model.apply(variables, state, token, method="decode_step")
        start = jnp.full((1,), START_TOKEN, jnp.int32)
        return decoding.greedy(step, state, start, max_len=num_tokens)

    return jax.jit(run)


def timed(function, *args, **kwargs):
    """Seconds `function` takes, until its result (JAX arrays, or PyTorch's) is ready."""
    start = time.perf_counter()
    jax.block_until_ready(function(*args, **kwargs))
    return time.perf_counter() - start


def alternate(functions, repeats):
    """Median seconds of each zero-argument function, timed in turn `repeats` times."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(function())
    return {name: statistics.median(values) for name, values in times.items()}


class Torch:
    """The PyTorch-eager peer, or None where torch is not installed."""

    def __init__(self, num_layers):
        import torch
        import torch_decoder  # this directory's

        torch.set_num_threads(os.cpu_count())
        self.torch, self.decoder = torch, torch_decoder
        self.models = {
            pattern: torch_decoder.build(
                **{**SIZES, "num_layers": num_layers},
                window=WINDOW if pattern == "window" else None,
            )
            for pattern in PATTERNS
        }

    def generate(self, pattern, num_tokens, *, max_len=None, start_position=0):
        """A function of no arguments: the seconds greedy generation of num_tokens takes."""
        return functools.partial(
            timed,
            self.decoder.greedy,
            self.models[pattern],
            START_TOKEN,
            num_tokens,
            max_len=max_len,
            start_position=start_position,
        )

    def cache_bytes(self, max_len):
        return sum(
            t.numel() * 4 for pair in self.models["full"].empty_cache(1, max_len) for t in pair
        )


def maybe_torch(num_layers):
    try:
        return Torch(num_layers)
    except ImportError:
        print("(torch is not installed: no PyTorch column)")
        return None


def per_token(seconds_short, seconds_long, steps_short, steps_long):
    return (seconds_long - seconds_short) / (steps_long - steps_short)


def generation_rows(lengths, repeats, peer, num_layers):
    rows = []
    for pattern in PATTERNS:
        for num_tokens in lengths:
            model = decoder_lm(pattern, num_tokens, num_layers)
            variables = variables_of(model)
            state = model.apply(variables, jnp.ones((1, 1)), num_tokens, method="init_decode_state")
            generate = generate_fn(model, num_tokens, num_tokens)
            generate(variables, state).block_until_ready()  # compiles
            functions = {"jax": functools.partial(timed, generate, variables, state)}
            if peer:
                peer.generate(pattern, 16)()  # warms up
                functions["torch"] = peer.generate(pattern, num_tokens)
            seconds = alternate(functions, repeats)
            row = dict(
                table="generation",
                pattern=pattern,
                tokens=num_tokens,
                jax_tokens_per_s=round(num_tokens / seconds["jax"], 1),
            )
            if peer:
                row["torch_tokens_per_s"] = round(num_tokens / seconds["torch"], 1)
                row["speed_ratio"] = round(seconds["torch"] / seconds["jax"], 2)
            rows.append(row)
            print_row(row)
    return rows


def prefilled(model, variables, position, max_len):
    prompt = jax.random.randint(jax.random.key(1), (1, position), 1, SIZES["vocab_size"])
    prefill = jax.jit(lambda v, p: model.apply(v, p, max_len, method="prefill"))
    return prefill(variables, prompt)


def step_cost(pattern, position, buffer, repeats, peer, num_layers, steps=(16, 80)):
    """ms/token at positions position+steps[0]..position+steps[1] with a cache of `buffer`."""
    model = decoder_lm(pattern, buffer, num_layers)
    variables = variables_of(model)
    state = prefilled(model, variables, position, buffer)
    short, long = (generate_fn(model, n, buffer) for n in steps)
    short(variables, state).block_until_ready()
    long(variables, state).block_until_ready()
    functions = {
        "jax_short": functools.partial(timed, short, variables, state),
        "jax_long": functools.partial(timed, long, variables, state),
    }
    if peer:
        for name, n in zip(("torch_short", "torch_long"), steps):
            functions[name] = peer.generate(pattern, n, max_len=buffer, start_position=position)
    seconds = alternate(functions, repeats)
    costs = {
        side: 1e3 * per_token(seconds[f"{side}_short"], seconds[f"{side}_long"], *steps)
        for side in ("jax", "torch")
        if f"{side}_short" in seconds
    }
    return costs


def cost_row(table, pattern, position, buffer, costs):
    row = dict(
        table=table,
        pattern=pattern,
        position=position,
        buffer=buffer,
        jax_ms_per_token=round(costs["jax"], 3),
    )
    if "torch" in costs:
        row["torch_ms_per_token"] = round(costs["torch"], 3)
        row["speed_ratio"] = round(costs["torch"] / costs["jax"], 2)
    return row


def buffer_rows(buffers, repeats, peer, num_layers):
    rows = []
    for buffer in buffers:
        costs = step_cost("full", 128, buffer, repeats, peer, num_layers)
        row = cost_row("buffers", "full", 128, buffer, costs)
        rows.append(row)
        print_row(row)
    return rows


def position_rows(positions, repeats, peer, num_layers):
    rows = []
    for pattern in PATTERNS:
        for position in positions:
            buffer = position + 128
            costs = step_cost(pattern, position, buffer, repeats, peer, num_layers)
            rows.append(cost_row("positions", pattern, position, buffer, costs))
            print_row(rows[-1])
    return rows


def memory_rows(lengths, peer, num_layers):
    rows = []
    for pattern in PATTERNS:
        for num_tokens in lengths:
            model = decoder_lm(pattern, num_tokens, num_layers)
            variables = variables_of(model)
            state = jax.eval_shape(
                lambda v, n=num_tokens, m=model: m.apply(
                    v, jnp.ones((1, 1)), n, method="init_decode_state"
                ),
                variables,
            )
            compiled = generate_fn(model, num_tokens, num_tokens).lower(variables, state).compile()
            analysis = compiled.memory_analysis()
            row = dict(
                table="memory",
                pattern=pattern,
                tokens=num_tokens,
                jax_cache_mb=round(
                    sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)) / 2**20,
                    2,
                ),
                jax_program_mb=round(
                    (
                        analysis.argument_size_in_bytes
                        + analysis.output_size_in_bytes
                        + analysis.temp_size_in_bytes
                    )
                    / 2**20,
                    2,
                ),
            )
            if peer:
                row["torch_cache_mb"] = round(peer.cache_bytes(num_tokens) / 2**20, 2)
            rows.append(row)
            print_row(row)
    return rows


def uncached_fn(model, num_tokens, steps):
    """Jitted variables -> the first `steps` of num_tokens greedy tokens, each by a full forward
    over a fixed [1, num_tokens] buffer holding the prefix (padding after it, which causal
    attention never reads): the work of a model without a cache, compiled once."""

    def body(variables, i, carry):
        buffer, out = carry
        logits = model.apply(variables, buffer)[:, i]
        token = jnp.argmax(logits.at[:, PAD_ID].set(-jnp.inf), axis=-1).astype(jnp.int32)
        # Position i + 1 takes the token; the last step's token needs no position.
        index = jnp.minimum(i + 1, num_tokens - 1)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, index))
        return buffer, out.at[:, i].set(token)

    def run(variables):
        buffer = jnp.zeros((1, num_tokens), jnp.int32).at[:, 0].set(START_TOKEN)
        out = jnp.zeros((1, steps), jnp.int32)
        step = functools.partial(body, variables)
        return jax.lax.fori_loop(0, steps, step, (buffer, out))[1]

    return jax.jit(run)


def uncached_rows(lengths, uncached_steps, repeats, num_layers):
    """Cached decoding against full recomputation at every step, for the full model."""
    rows = []
    for num_tokens in lengths:
        steps = min(num_tokens, uncached_steps)
        model = decoder_lm("full", num_tokens, num_layers)
        variables = variables_of(model)
        state = model.apply(variables, jnp.ones((1, 1)), num_tokens, method="init_decode_state")
        cached = generate_fn(model, num_tokens, num_tokens)
        uncached = uncached_fn(model, num_tokens, steps)
        cached_tokens = np.asarray(cached(variables, state))
        uncached_tokens = np.asarray(uncached(variables))
        seconds = alternate(
            {
                "cached": functools.partial(timed, cached, variables, state),
                "uncached": functools.partial(timed, uncached, variables),
            },
            repeats,
        )
        cached_rate, uncached_rate = num_tokens / seconds["cached"], steps / seconds["uncached"]
        row = dict(
            table="uncached",
            pattern="full",
            tokens=num_tokens,
            cached_tokens_per_s=round(cached_rate, 1),
            uncached_tokens_per_s=round(uncached_rate, 2),
            speedup=round(cached_rate / uncached_rate, 1),
            uncached_steps=steps,
            same_tokens=f"{int(np.sum(cached_tokens[:, :steps] == uncached_tokens))}/{steps}",
        )
        rows.append(row)
        print_row(row)
    return rows


def print_row(row):
    print(" | ".join(f"{key} {value}" for key, value in row.items()), flush=True)


def write_csv(rows, path):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot(tables, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("generation", "buffers") if tables.get(name)]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = tables[name]
        if name == "generation":
            for pattern in PATTERNS:
                mine = [r for r in rows if r["pattern"] == pattern]
                x = [r["tokens"] for r in mine]
                ax.plot(x, [r["jax_tokens_per_s"] for r in mine], "o-", label=f"JAX, {pattern}")
                if "torch_tokens_per_s" in mine[0]:
                    ax.plot(
                        x,
                        [r["torch_tokens_per_s"] for r in mine],
                        "s--",
                        label=f"PyTorch, {pattern}",
                    )
            ax.set_xlabel("tokens generated")
            ax.set_ylabel("tokens / s")
            ax.set_title("greedy generation, batch 1")
        else:
            x = [r["buffer"] for r in rows]
            ax.plot(x, [r["jax_ms_per_token"] for r in rows], "o-", label="JAX")
            if "torch_ms_per_token" in rows[0]:
                ax.plot(x, [r["torch_ms_per_token"] for r in rows], "s--", label="PyTorch")
            ax.set_xlabel("cache buffer (positions)")
            ax.set_ylabel("ms / token at positions 144..207")
            ax.set_ylim(bottom=0)
            ax.set_title("a step's cost against the buffer")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


TABLES = ("generation", "buffers", "positions", "memory", "uncached")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"some of {','.join(TABLES)}")
    parser.add_argument("--lengths", default="512,2048,8192", help="tokens generated")
    parser.add_argument("--buffers", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--positions", default="256,8192")
    parser.add_argument("--uncached_lengths", default="128,512")
    parser.add_argument("--uncached_steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/decoding")
    parser.add_argument(
        "--num_layers", type=int, default=SIZES["num_layers"], help="layers of both sides' model"
    )
    args = parser.parse_args()
    if args.num_layers < 1:
        raise SystemExit(f"error: --num_layers={args.num_layers}; allowed: a positive integer.")
    tables = args.tables.split(",")
    for name in tables:
        if name not in TABLES:
            raise SystemExit(f"error: unknown table {name!r}; allowed: {', '.join(TABLES)}.")
    numbers = lambda text: [int(n) for n in text.split(",")]
    layers = args.num_layers
    peer = maybe_torch(layers) if args.torch else None
    print(provenance.describe())
    print(f"decoder LM: num_layers {args.num_layers}, d_model {SIZES['d_model']}")
    if peer:
        print(f"PyTorch {peer.torch.__version__}, {peer.torch.get_num_threads()} threads")
    results = {}
    if "generation" in tables:
        results["generation"] = generation_rows(numbers(args.lengths), args.repeats, peer, layers)
    if "buffers" in tables:
        results["buffers"] = buffer_rows(numbers(args.buffers), args.repeats, peer, layers)
    if "positions" in tables:
        results["positions"] = position_rows(numbers(args.positions), args.repeats, peer, layers)
    if "memory" in tables:
        results["memory"] = memory_rows(numbers(args.lengths), peer, layers)
    if "uncached" in tables:
        results["uncached"] = uncached_rows(
            numbers(args.uncached_lengths), args.uncached_steps, args.repeats, layers
        )
    os.makedirs(args.out, exist_ok=True)
    columns = machine.columns()
    for name, rows in results.items():
        write_csv(
            [{**row, "num_layers": args.num_layers, **columns} for row in rows],
            os.path.join(args.out, f"decoding_{name}.csv"),
        )
    plot(results, os.path.join(args.out, "decoding.png"))


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    main()
