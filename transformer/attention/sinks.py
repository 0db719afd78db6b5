"""Attention sinks: one extra logit per head that takes part in the softmax and carries no value.

Each head h has a sink logit sink_h, a key that every query sees, whose value is zero (as in
gpt-oss, after the "attention sinks" of StreamingLLM). For a query with allowed keys j and
logits s_j, with m = max(sink_h, max_j s_j):

    out = sum_j exp(s_j - m) v_j / (exp(sink_h - m) + sum_j exp(s_j - m))

so a query may put weight on "nothing" instead of being forced to spread all of it over the keys.
The sink enters after soft-capping, ALiBi and masking: it is a logit of its own, neither capped
nor penalised by distance. A query with no allowed key outputs zeros, as without sinks (all its
weight is on the sink, whose value is zero), and gets zero gradients; it adds nothing to the
sink's gradient.

Implementations that keep each row's log-sum-exp (chunked, block-sparse) compute attention
without the sinks and add them at the end (`with_sinks`): the sink changes each row's normaliser
only. The sink's gradient is d sink_h = -sum over the head's queries of p_sink * (dO . O), where
p_sink = exp(sink_h - lse) is the sink's weight (`sink_gradient`).

Sinks are float `[heads]` arrays, learnable. A sink of -inf is no sink; a NaN sink makes the
rows of its head that have a key NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np


def check_sinks(sinks, heads):
    """Raises a TypeError or ValueError unless `sinks` is None or a floating `[heads]` array."""
    if sinks is None:
        return
    if not isinstance(sinks, (jax.Array, np.ndarray)):
        raise TypeError(
            f"sinks must be a jax or NumPy array of shape [heads] or None; got "
            f"{type(sinks).__name__}."
        )
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must have a floating dtype (logits); got {sinks.dtype}.")
    if sinks.shape != (heads,):
        raise ValueError(
            f"sinks must have shape [heads] = ({heads},), one logit per head; got shape "
            f"{sinks.shape}."
        )


def per_head(sinks, ndim, dtype=jnp.float32):
    """`[heads]` -> `[1, heads, 1, ...]` of `ndim` dimensions, for rows `[batch, heads, ...]`.
    Sinks of more dimensions, `[heads, ...]` (per row of a grouped block), get a batch axis."""
    sinks = jnp.asarray(sinks, dtype)
    if sinks.ndim > 1:
        return sinks[None]
    return sinks.reshape((1, -1) + (1,) * (ndim - 2))


def with_sinks(out, lse, sinks):
    """Rows normalised without sinks -> with them.

    out: `[batch, heads, ..., value_dim]`; lse: `[batch, heads, ...]`, each row's log-sum-exp
    (+inf for a row with no key, whose output is zero); sinks: `[heads]`.
    Returns out * exp(lse - lse') and lse' = logaddexp(lse, sink); a row with no key keeps
    zeros and +inf.
    """
    sink = per_head(sinks, lse.ndim, lse.dtype)
    has_key = lse != jnp.inf
    new_lse = jnp.logaddexp(jnp.where(has_key, lse, -jnp.inf), sink)
    keep = jnp.exp(jnp.where(has_key, lse - new_lse, -jnp.inf))
    return out * keep[..., None].astype(out.dtype), jnp.where(has_key, new_lse, jnp.inf)


def sink_gradient(sinks, lse, delta):
    """d loss / d sinks `[heads]`, in the dtype of `sinks`: -sum of p_sink * delta over every
    row of each head.

    lse: `[batch, heads, ...]`, with the sinks (+inf for a row with no key: p_sink 0 there);
    delta: dO . O of each row, same shape.
    """
    dtype = jnp.promote_types(lse.dtype, jnp.float32)
    sink = per_head(sinks, lse.ndim, dtype)
    p_sink = jnp.exp(sink - lse.astype(dtype))
    # Summed over every axis the sinks are broadcast along.
    axes = tuple(i for i in range(lse.ndim) if sink.shape[i] == 1 and lse.shape[i] != 1)
    grad = -jnp.sum(p_sink * delta.astype(dtype), axis=axes, keepdims=True)
    return grad.reshape(jnp.shape(sinks)).astype(sinks.dtype)
