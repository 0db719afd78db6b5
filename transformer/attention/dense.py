"""Dense attention: the full `[batch, heads, q_len, kv_len]` score matrix, masked and softmaxed.

This is the reference every other implementation is tested against, and the only one that can
return the attention weights (for plots) or apply dropout to them.
"""

import jax
import jax.numpy as jnp


def alibi_bias(slopes, q_len, kv_len, *, offset=0):
    """`[1, heads, q_len, kv_len]`: -slope * |i - j|, ALiBi's linear distance penalty.

    With a causal pattern only j <= i survives, where this equals ALiBi's -slope * (i - j).
    `offset` is the position of the first query relative to the first key.
    """
    distance = jnp.abs(jnp.arange(q_len)[:, None] + offset - jnp.arange(kv_len)[None, :])
    return -jnp.asarray(slopes, jnp.float32)[None, :, None, None] * distance[None, None]


def dense_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    scale=None,
    alibi_slopes=None,
    dropout_rate=0.0,
    dropout_rng=None,
    return_weights=False,
):
    """softmax(q k^T * scale + bias, masked) v.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[batch, kv_len, heads, head_dim]`.
      value: `[batch, kv_len, heads, value_dim]`.
      mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True where a query may
        attend. A query with no key left gets zeros in its output and its gradients.
      bias: added to the logits, broadcastable to `[batch, heads, q_len, kv_len]` (ALiBi, relative
        positions).
      scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]`; adds `alibi_bias` to the logits.
      dropout_rate, dropout_rng: dropout on the attention weights; off when rate is 0 or rng None.
      return_weights: also return the weights `[batch, heads, q_len, kv_len]`.

    Returns:
      `[batch, q_len, heads, value_dim]`, and the weights when asked.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    # Softmax in float32 even for bfloat16 inputs: exp() of low-precision logits loses the tail.
    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=compute_dtype)
    logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(compute_dtype)
    if alibi_slopes is not None:
        logits = logits + alibi_bias(alibi_slopes, query.shape[1], key.shape[1])
    if mask is not None:
        # A finite floor, not -inf: a row with every key masked would be exp(-inf - -inf) = NaN.
        logits = jnp.where(mask, logits, jnp.finfo(compute_dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # Rows with no valid key came out uniform over the floor; make them zero instead.
        weights = jnp.where(mask, weights, 0.0)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", weights.astype(value.dtype), value, preferred_element_type=compute_dtype
    ).astype(query.dtype)
    if return_weights:
        return out, weights
    return out
