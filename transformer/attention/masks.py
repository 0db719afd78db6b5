"""Boolean attention masks, True where a query may attend to a key.

Masks are shaped to broadcast against `[batch, heads, q_len, kv_len]`.
"""

import jax.numpy as jnp


def causal_mask(q_len, kv_len=None, *, offset=0):
    """`[1, 1, q_len, kv_len]`: query i sees keys j <= i + offset.

    `offset` places the queries later in the sequence than the keys start, as when decoding the
    last `q_len` positions of a `kv_len`-long cache (offset = kv_len - q_len).
    """
    kv_len = q_len if kv_len is None else kv_len
    query_pos = jnp.arange(q_len)[:, None] + offset
    key_pos = jnp.arange(kv_len)[None, :]
    return (key_pos <= query_pos)[None, None]


def padding_mask_from_lengths(lengths, max_len):
    """`[batch, max_len]`: True at the first `lengths[b]` positions of each row."""
    return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def padding_mask_from_tokens(tokens, pad_id=0):
    """`[batch, length]`: True where `tokens` is not the padding id."""
    return tokens != pad_id


def attention_padding_mask(query_valid, key_valid=None):
    """`[batch, 1, q_len, kv_len]` from per-position validity `[batch, q_len]`, `[batch, kv_len]`.

    A padded query attends nowhere, so it gets zeros rather than a weighted mix of real tokens.
    """
    key_valid = query_valid if key_valid is None else key_valid
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def combine_masks(*masks):
    """Logical AND of the masks that are not None; None when all are None."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = jnp.logical_and(combined, mask)
    return combined
