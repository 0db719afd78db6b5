"""The Long Range Arena's "LocalAttention", computed the way its code computes it.

LRA (lra_benchmarks/models/local/local_attention.py) pads a sequence of n tokens with
`block_size - n % block_size` zero vectors, reshapes the padded length n_p to
`[block_size, num_blocks]` (position p = a * num_blocks + g) and attends along the block_size
axis: position p sees the positions of its group g = p % num_blocks, which is
`patterns.lra_local(block_size)`, a strided pattern.

Its padding mask takes another route. It pads the mask with -1e9 (not 0) and reshapes it to
`[num_blocks, block_size]` as if groups were contiguous (group g, index a -> position
g * block_size + a), then allows (query a, key c) of group g where the product
`mask[g * block_size + a] * mask[g * block_size + c]` is positive. So whether query p may see key
q is decided by the padding of two other positions, and the disallowed logits get -1e10 added
rather than being removed: a row with no allowed key spreads its weight evenly over its group.
This module reproduces both, to test how much they cost LRA's "local" score.

One difference: LRA pads the layer's inputs, so its padded queries, keys and values are the
projections' biases; these pad the projected query, key and value with zeros. Real queries see
the padded keys only in rows with no allowed key.
"""

import jax
import jax.numpy as jnp

from transformer import patterns
from transformer.attention.xla import refuse_soft_cap_and_sinks

# LRA's constants: the padding mask's value past the sequence, and the bias on masked logits.
PADDED_MASK_VALUE = -1e9
MASKED_LOGIT_BIAS = -1e10


def lra_local_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid,
    scale,
    alibi_slopes,
    logit_soft_cap=None,
    sinks=None,
):
    """Self-attention under `patterns.lra_local(block_size)` with LRA's padding mask.

    query, key: `[batch, length, heads, head_dim]`; value `[batch, length, heads, value_dim]`;
    key_valid: bool `[batch, length]` or None. Returns `[batch, length, heads, value_dim]`.
    No soft cap and no sinks (LRA has neither): a ValueError.
    """
    refuse_soft_cap_and_sinks("lra_local", logit_soft_cap, sinks, "LRA's attention has neither")
    if not isinstance(pattern, patterns.LraLocal):
        raise ValueError(
            f"implementation 'lra_local' computes patterns.lra_local(block_size) only; got "
            f"pattern {pattern}."
        )
    if alibi_slopes is not None:
        raise ValueError("implementation 'lra_local' takes no alibi_slopes (LRA has none).")
    batch, length, heads, _ = query.shape
    if key.shape[1] != length:
        raise ValueError(
            f"implementation 'lra_local' is self-attention: q_len {length} != kv_len "
            f"{key.shape[1]}."
        )
    if key.shape[2] != heads:
        raise ValueError(
            f"implementation 'lra_local' needs as many key/value heads as query heads (LRA has "
            f"no grouped-query attention); got {key.shape[2]} key/value heads for {heads} query "
            "heads. Use 'block_sparse' or 'dense' with patterns.lra_local."
        )
    block_size = pattern.block_size
    num_blocks = pattern.stride(length)
    padded = num_blocks * block_size

    def blocks(x):  # [batch, length, heads, d] -> [batch, block_size, num_blocks, heads, d]
        x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
        return x.reshape(batch, block_size, num_blocks, heads, x.shape[-1])

    q, k, v = blocks(query), blocks(key), blocks(value)
    logits = jnp.einsum("bagnd,bcgnd->bgnac", q, k, preferred_element_type=jnp.float32)
    logits = logits * (query.shape[-1] ** -0.5 if scale is None else scale)

    valid = jnp.ones((batch, length)) if key_valid is None else key_valid.astype(jnp.float32)
    mask = jnp.pad(valid, ((0, 0), (0, padded - length)), constant_values=PADDED_MASK_VALUE)
    mask = mask.reshape(batch, num_blocks, block_size)  # LRA's contiguous reading
    allowed = mask[:, :, :, None] * mask[:, :, None, :] > 0  # [batch, group, a, c]
    logits = logits + jnp.where(allowed, 0.0, MASKED_LOGIT_BIAS)[:, :, None]

    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bgnac,bcgnd->bagnd", weights, v)
    return out.reshape(batch, padded, heads, value.shape[-1])[:, :length]
