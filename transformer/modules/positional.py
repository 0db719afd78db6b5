"""Positional encodings: what self-attention, which sees a set, needs to know about order.

Two families:
- added to the token embeddings before the first layer: sinusoidal (Vaswani et al., 2017) and
  learned (one trained vector per position, as in BERT and GPT);
- applied inside every attention layer: rotary (RoPE, Su et al., 2021) rotates queries and keys
  so that q.k depends only on their relative position; ALiBi (Press et al., 2022) adds
  -slope * distance to the logits, with one slope per head.

`"none"` leaves self-attention permutation-equivariant, the baseline the tests check.
"""

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from transformer.attention import ring

POSITIONAL_ENCODINGS = ("none", "sinusoidal", "learned", "rotary", "alibi")


def check_positional(name):
    """Raises a ValueError naming the allowed encodings when `name` is not one of them."""
    if name not in POSITIONAL_ENCODINGS:
        raise ValueError(
            f"unknown positional encoding {name!r}; allowed: {', '.join(POSITIONAL_ENCODINGS)}."
        )


def sinusoidal_encoding(length, d_model, *, max_timescale=10_000.0, positions=None):
    """`[length, d_model]` float32: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).

    The paper's formula, with sines at even and cosines at odd feature indices, at positions
    0..length-1 or at the integer `positions` given (a decoding step's): `[length]`, or
    `[batch, length]` for a table `[batch, length, d_model]`. Computed with
    jnp rather than NumPy so that a 64K-token table is a few ops in the compiled program, not a
    constant of hundreds of megabytes inside it.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encoding needs an even d_model; got {d_model}.")
    if positions is None:
        positions = jnp.arange(length)
    inverse_timescales = max_timescale ** (-np.arange(0, d_model, 2) / d_model)
    positions = jnp.asarray(positions, jnp.float32)
    angles = positions[..., None] * jnp.asarray(inverse_timescales, jnp.float32)
    # Interleave: [sin, cos] pairs along a new last axis, flattened to sin, cos, sin, cos, ...
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return table.reshape(positions.shape + (d_model,))


def context_shards(context_axis):
    """The number of devices on mesh axis `context_axis` (inside `jax.shard_map`); a clear error
    outside one."""
    try:
        return lax.axis_size(context_axis)
    except NameError:
        raise ValueError(
            f"context_axis={context_axis!r}: the model must be called inside jax.shard_map over a "
            "mesh with that axis, each device holding one shard of every sequence; set "
            "context_axis=None to run on whole sequences."
        ) from None


def default_positions(length, context_axis=None, context_order="contiguous"):
    """`[length]` int32: positions 0..length-1, or, with a `context_axis` (inside
    `jax.shard_map`, the sequence split over that axis in `context_order`), the global positions
    of this device's shard of `length` tokens (`ring.shard_positions`)."""
    if context_axis is None:
        return jnp.arange(length, dtype=jnp.int32)
    num_shards = context_shards(context_axis)
    table = ring.shard_positions(length * num_shards, num_shards, context_order)
    return jnp.asarray(table, jnp.int32)[lax.axis_index(context_axis)]


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to `[batch, length, d_model]` inputs. No parameters.

    `positions` (`[length]` or `[batch, length]` int, default 0..length-1) places the inputs
    elsewhere, as a decoding step does.
    """

    max_timescale: float = 10_000.0

    def __call__(self, inputs, positions=None):
        _, length, d_model = inputs.shape
        table = sinusoidal_encoding(
            length, d_model, max_timescale=self.max_timescale, positions=positions
        )
        return inputs + jnp.broadcast_to(table.astype(inputs.dtype), inputs.shape)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a trained vector per position to `[batch, length, d_model]` inputs.

    Has `max_len` vectors and cannot say anything about later positions, so a longer input is an
    error rather than a silent wrap-around or clip. `positions` (`[length]` or `[batch, length]`
    int, default 0..length-1) picks the vectors of a decoding step; those are not checked (they are traced),
    and a position past max_len reads NaN.
    """

    max_len: int
    # The token embeddings it is added to start at unit scale (`models.embed_tokens`); vectors
    # 50 times smaller (GPT-2's 0.02, whose tokens are 0.02 too) are drowned by them, and a
    # model can take thousands of steps to find order in them.
    stddev: float = 1.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs, positions=None):
        _, length, d_model = inputs.shape
        if positions is None and length > self.max_len:
            raise ValueError(
                f"input length {length} exceeds the learned positional embedding's max_len "
                f"{self.max_len}; raise max_len (the model's `max_len` field) or use a "
                "positional encoding without a maximum (sinusoidal, rotary, alibi)."
            )
        table = self.param(
            "embedding",
            nn.initializers.normal(self.stddev),
            (self.max_len, d_model),
            self.param_dtype,
        )
        if positions is None:
            return inputs + table[None, :length].astype(inputs.dtype)
        vectors = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)
        return inputs + jnp.broadcast_to(vectors.astype(inputs.dtype), inputs.shape)


# The encodings that are added to the embeddings, by name; the others add nothing there.
ADDED_POSITIONAL_ENCODINGS = {
    "sinusoidal": lambda max_len, param_dtype: SinusoidalPositionalEncoding(),
    "learned": lambda max_len, param_dtype: LearnedPositionalEmbedding(
        max_len=max_len, param_dtype=param_dtype
    ),
}


def rotary_frequencies(head_dim, base=10_000.0):
    """`[head_dim / 2]` float32: theta_i = base^(-2i / head_dim), RoPE's rotation speeds."""
    if head_dim % 2:
        raise ValueError(f"rotary encoding needs an even head_dim; got {head_dim}.")
    return (base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def apply_rotary(x, positions=None, *, base=10_000.0):
    """Rotates pairs of features of `x` by angle position * theta_i (RoPE).

    Feature i is paired with feature i + head_dim / 2 (the "rotate half" layout of GPT-NeoX and
    LLaMA; the paper pairs neighbours, which is the same maths on permuted features). Rotations
    keep norms, and <rot(q, m), rot(k, n)> depends on m - n only.

    Args:
      x: `[batch, length, heads, head_dim]` queries or keys.
      positions: `[length]` or `[batch, length]` integer positions; defaults to 0..length-1.
      base: the longest wavelength's base, 10,000 in the paper.

    Returns:
      `[batch, length, heads, head_dim]`, in the dtype of `x`.
    """
    head_dim = x.shape[-1]
    if positions is None:
        positions = jnp.arange(x.shape[1])
    positions = jnp.asarray(positions, jnp.float32)
    if positions.ndim == 1:
        positions = positions[None]
    angles = positions[:, :, None] * rotary_frequencies(head_dim, base)  # [batch, len, hd/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    # Rotate in float32: bfloat16 angles at position 1000 are off by whole radians.
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads):
    """`[num_heads]` float32: ALiBi's head slopes, the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For n heads a power of two, slope_h = 2^(-8h/n), h = 1..n. Otherwise, as in the paper's code,
    the slopes of the nearest lower power of two p, then every other slope of 2p for the rest.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive; got {num_heads}.")

    def power_of_two_slopes(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(np.floor(np.log2(num_heads)))
    slopes = power_of_two_slopes(closest)
    slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)
