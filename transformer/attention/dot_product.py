"""`dot_product_attention`: one entry point, several implementations of the same maths."""

from transformer.attention.dense import dense_attention


def _check_shapes(query, key, value, mask, bias):
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, length, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}.")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {key.shape} and value {value.shape} must agree on "
                         "[batch, kv_len, heads].")
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query {query.shape} and key {key.shape} must agree on batch and heads.")
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query head_dim {query.shape[3]} != key head_dim {key.shape[3]}.")
    full = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    for name, array in (("mask", mask), ("bias", bias)):
        if array is None:
            continue
        if array.ndim != 4 or any(a not in (1, f) for a, f in zip(array.shape, full)):
            raise ValueError(f"{name} of shape {array.shape} does not broadcast to "
                             f"[batch, heads, q_len, kv_len] = {list(full)}.")
    if mask is not None and mask.dtype != bool:
        raise ValueError(f"mask must be boolean (True = may attend); got dtype {mask.dtype}.")


def dot_product_attention(query, key, value, *, mask=None, bias=None, scale=None,
                          alibi_slopes=None, pattern=None, implementation="dense",
                          dropout_rate=0.0, dropout_rng=None, return_weights=False):
    """Scaled dot-product attention, softmax(q k^T / sqrt(d) + bias) v, over masked keys.

    Args:
      query: `[batch, q_len, heads, head_dim]` (the layout of `jax.nn.dot_product_attention`).
      key: `[batch, kv_len, heads, head_dim]`.
      value: `[batch, kv_len, heads, value_dim]`.
      mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True where a query may
        attend. A query whose keys are all masked gets zeros, never NaN, in output and gradients.
      bias: float, broadcastable to `[batch, heads, q_len, kv_len]`, added to the logits.
      scale: multiplies the logits; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]` ALiBi slopes; adds -slope * |i - j| to the logits. Given as slopes
        rather than a bias array so that sparse implementations compute it block by block.
      pattern: an attention pattern (see `transformer.patterns`) or None for full attention;
        it is combined with `mask` by logical AND.
      implementation: how to compute it; "dense" materialises the score matrix (the reference).
      dropout_rate, dropout_rng: dropout on the attention weights.
      return_weights: also return the weights `[batch, heads, q_len, kv_len]`.

    Returns:
      `[batch, q_len, heads, value_dim]`, and the weights when `return_weights`.
    """
    _check_shapes(query, key, value, mask, bias)
    if implementation != "dense":
        raise ValueError(f"unknown implementation {implementation!r}; allowed: 'dense'.")
    if pattern is not None:
        pattern_mask = pattern.mask(query.shape[1], key.shape[1])[None, None]
        mask = pattern_mask if mask is None else mask & pattern_mask
    return dense_attention(query, key, value, mask=mask, bias=bias, scale=scale,
                           alibi_slopes=alibi_slopes,
                           dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                           return_weights=return_weights)
