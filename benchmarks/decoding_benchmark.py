r"""Greedy decoding with a key/value cache against full recomputation: tokens per second.

    python benchmarks/decoding_benchmark.py --lengths 128,512 --uncached_steps 512
    python benchmarks/decoding_benchmark.py --lengths 2048 --uncached_steps 64 \
        --out benchmarks/results/decoding_2048

A decoder-only LM and an encoder-decoder (4 layers each side, d_model 256, 4 heads, d_ff 1024,
vocabulary 1024, random weights, float32), batch 1, generating N tokens greedily from the start
token. Both ways are jitted whole (one `lax` loop each):

  cached    `decoding.greedy` over `decode_step`: one new token per step against the cache of
            N positions.
  uncached  at step i, the full forward over a fixed [1, N] buffer holding the prefix (padding
            after it, which causal attention never reads), then the argmax at position i: no
            recompilation per step, the work of a model without a cache.

Uncached steps all cost the same (the buffer has one shape), so at long lengths only the first
--uncached_steps tokens are generated and timed that way; tokens/s is still tokens / time. The
tokens of both ways are compared (the uncached ones against the cached prefix). Timings
alternate cached and uncached, --repeats times each, and the table shows the medians and their
ratio: on a shared machine, the ratio of one run is what to read.

Writes `<out>/decoding_benchmark.csv`, whose rows end with the machine they ran on
(`machine.py`: CPU model, cores, devices, library versions); the printed table starts with
`provenance.describe()`.
"""

import argparse
import csv
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

MODEL = dict(
    vocab_size=1024,
    d_model=256,
    num_heads=4,
    d_ff=1024,
    dropout_rate=0.0,
    positional="sinusoidal",
    norm_position="pre",
)
SOURCE_LENGTH = 32


def decoder_lm(num_tokens):
    return build_model(dict(name="decoder_lm", num_layers=4, max_len=num_tokens, **MODEL))


def encoder_decoder(num_tokens):
    return build_model(
        dict(
            name="encoder_decoder", num_layers=4, num_decoder_layers=4, max_len=num_tokens, **MODEL
        )
    )


def argmax_without_padding(logits):
    return jnp.argmax(logits.at[:, PAD_ID].set(-jnp.inf), axis=-1).astype(jnp.int32)


def cached_greedy(model, variables, inputs, start_token, num_tokens):
    """`decoding.greedy` over `decode_step` with a cache of num_tokens positions: `[1, N]`."""
    state = model.apply(variables, inputs, num_tokens, method="init_decode_state")
    step_fn = lambda state, token: model.apply(variables, state, token, method="decode_step")
    start = jnp.full((inputs.shape[0],), start_token, jnp.int32)
    return decoding.greedy(step_fn, state, start, max_len=num_tokens)


def uncached_greedy(logits_fn, num_tokens, num_steps):
    """Greedy decoding by full recomputation: logits_fn(buffer `[1, N]`) -> logits `[1, N, V]`
    where position i predicts the token after buffer[:, i]; buffer[:, 0] is the start token.
    Returns the first num_steps tokens `[1, num_steps]`."""

    def body(i, carry):
        buffer, out = carry
        token = argmax_without_padding(logits_fn(buffer)[:, i])
        # The last step's token has no position left in the buffer and needs none.
        buffer = jax.lax.dynamic_update_slice(
            buffer, token[:, None], (0, jnp.minimum(i + 1, num_tokens - 1))
        )
        return buffer, out.at[:, i].set(token)

    buffer = jnp.zeros((1, num_tokens), jnp.int32)
    out = jnp.zeros((1, num_steps), jnp.int32)
    return buffer, body, out


def programs(kind, num_tokens, num_steps):
    """(cached, uncached): jitted functions of (variables, source) -> tokens."""
    if kind == "decoder_lm":
        model = decoder_lm(num_tokens)
        start_token = model.config.vocab_size - 1  # any real token can start a language model

        def full_logits(variables, source, buffer):
            return model.apply(variables, buffer.at[:, 0].set(start_token))
    else:
        model = encoder_decoder(num_tokens)
        start_token = model.bos_id

        def full_logits(variables, source, buffer):
            # The model shifts its targets right, putting BOS first: buffer[:, 1:] are the
            # tokens generated so far, so targets = buffer[:, 1:], padded to length N.
            targets = jnp.pad(buffer[:, 1:], ((0, 0), (0, 1)))
            return model.apply(variables, source, targets)

    def cached(variables, source):
        return cached_greedy(model, variables, source, start_token, num_tokens)

    def uncached(variables, source):
        buffer, body, out = uncached_greedy(
            lambda buffer: full_logits(variables, source, buffer), num_tokens, num_steps
        )
        return jax.lax.fori_loop(0, num_steps, body, (buffer, out))[1]

    return model, jax.jit(cached), jax.jit(uncached)


def timed(function, *args):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def measure(kind, num_tokens, num_steps, repeats):
    """One row of the table: medians of alternating timings, and whether the tokens agree."""
    model, cached, uncached = programs(kind, num_tokens, num_steps)
    source = jax.random.randint(jax.random.key(1), (1, SOURCE_LENGTH), 4, MODEL["vocab_size"])
    variables = jax.jit(model.init)(
        jax.random.key(0), source[:, :8], *([source[:, :8]] if kind == "encoder_decoder" else [])
    )
    # First calls compile; their outputs are the tokens to compare.
    cached_tokens = np.asarray(cached(variables, source))
    uncached_tokens = np.asarray(uncached(variables, source))
    agree = int(np.sum(cached_tokens[:, :num_steps] == uncached_tokens))
    cached_times, uncached_times = [], []
    for _ in range(repeats):
        cached_times.append(timed(cached, variables, source))
        uncached_times.append(timed(uncached, variables, source))
    cached_rate = num_tokens / statistics.median(cached_times)
    uncached_rate = num_steps / statistics.median(uncached_times)
    return dict(
        model=kind,
        tokens=num_tokens,
        cached_tokens_per_s=round(cached_rate, 1),
        uncached_tokens_per_s=round(uncached_rate, 2),
        speedup=round(cached_rate / uncached_rate, 1),
        uncached_steps=num_steps,
        same_tokens=f"{agree}/{num_steps}",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", default="128,512,2048", help="comma-separated numbers of generated tokens"
    )
    parser.add_argument("--models", default="decoder_lm,encoder_decoder")
    parser.add_argument(
        "--uncached_steps",
        type=int,
        default=256,
        help="at most this many uncached steps are generated and timed",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/decoding")
    args = parser.parse_args()
    rows = []
    columns = (
        "model",
        "tokens",
        "cached_tokens_per_s",
        "uncached_tokens_per_s",
        "speedup",
        "uncached_steps",
        "same_tokens",
    )
    print(provenance.describe())
    print(" | ".join(columns), flush=True)
    for kind in args.models.split(","):
        if kind not in ("decoder_lm", "encoder_decoder"):
            raise ValueError(f"unknown model {kind!r}; allowed: decoder_lm, encoder_decoder.")
        for num_tokens in (int(n) for n in args.lengths.split(",")):
            row = measure(kind, num_tokens, min(num_tokens, args.uncached_steps), args.repeats)
            rows.append({**row, **machine.columns()})
            print(" | ".join(str(row[c]) for c in columns), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decoding_benchmark.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # as launch.py does, so times match training's
    main()
