"""Score functions: how well a query matches each key, before the softmax.

Every function takes queries `[..., q_len, d_q]` and keys `[..., kv_len, d_k]` and returns
scores `[..., q_len, kv_len]`. The parametrised ones (general, additive) take their weights as
arrays, so the RNN decoders and the attention modules can own the parameters while the maths
stays a pure function.
"""

import jax.numpy as jnp


def dot_score(query, key):
    """s^T h: the plain dot product. Needs d_q == d_k."""
    return jnp.einsum("...qd,...kd->...qk", query, key)


def scaled_dot_score(query, key, scale=None):
    """s^T h / sqrt(d_k): keeps the logits' variance near one as d_k grows (Vaswani et al.)."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return dot_score(query, key) * scale


def general_score(query, key, weight):
    """s^T W h, Luong's "general" (multiplicative) score.

    weight: `[d_q, d_k]`.
    """
    return jnp.einsum("...qd,de,...ke->...qk", query, weight, key)


def additive_score(query, key, query_weight, key_weight, v):
    """v^T tanh(W [s; h]) = v^T tanh(W_s s + W_h h), Bahdanau's additive ("concat") score.

    W [s; h] is split into its query and key halves so the `[q_len, kv_len, d_attn]` tensor is
    built from two projections instead of from every concatenated pair.
    query_weight: `[d_q, d_attn]`; key_weight: `[d_k, d_attn]`; v: `[d_attn]`.
    """
    projected_query = query @ query_weight  # [..., q_len, d_attn]
    projected_key = key @ key_weight  # [..., kv_len, d_attn]
    hidden = jnp.tanh(projected_query[..., :, None, :] + projected_key[..., None, :, :])
    return hidden @ v


def mean_pool_score(query, key):
    """Equal scores for every key: softmax turns them into the mean, the unweighted baseline."""
    shape = jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2]) + (
        query.shape[-2],
        key.shape[-2],
    )
    return jnp.zeros(shape, jnp.result_type(query, key))


SCORE_FUNCTIONS = {
    "dot": dot_score,
    "scaled_dot": scaled_dot_score,
    "general": general_score,
    "additive": additive_score,
    "mean": mean_pool_score,
}
