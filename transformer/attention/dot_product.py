"""`dot_product_attention`: one entry point, several implementations of the same maths.

Every implementation in `IMPLEMENTATIONS` is a function

    implementation(query, key, value, *, pattern, key_valid, scale, alibi_slopes,
                   logit_soft_cap=None, sinks=None) -> output

with query `[batch, q_len, heads, head_dim]`, key/value `[batch, kv_len, kv_heads, head_dim]`
(kv_heads dividing heads: grouped-query attention, query head n reading key/value head
n // (heads // kv_heads), never by repeating the keys and values; "lra_local" refuses it),
key_valid bool `[batch, kv_len]` or None, logit_soft_cap a float or None, sinks `[heads]` or
None, output `[batch, q_len, heads, value_dim]`, and zeros for a query that has no allowed key.
"dense" is the reference; "auto" picks one. Soft-capping and sinks are computed by the
implementations in `SOFT_CAP_AND_SINKS`; the others refuse them.
"""

import jax
import jax.numpy as jnp
import numpy as np

from transformer import patterns
from transformer.attention.auto import BLOCK_SIZE, auto_implementation
from transformer.attention.block_sparse import block_sparse_attention
from transformer.attention.chunked import chunked_attention
from transformer.attention.dense import dense_attention
from transformer.attention.lra_local import lra_local_attention
from transformer.attention.shapes import check_query_key_value
from transformer.attention.sinks import check_sinks
from transformer.attention.soft_cap import check_logit_soft_cap
from transformer.attention.splash import splash_attention
from transformer.attention.xla import cudnn_attention, xla_attention

# The implementations that compute logit soft-capping and attention sinks.
SOFT_CAP_AND_SINKS = ("dense", "chunked", "block_sparse", "splash", "auto")
# The implementations that compute segment ids (packed documents).
SEGMENT_IDS = ("dense", "chunked", "block_sparse", "splash", "auto")


def _dense(
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
    segment_ids=None,
):
    mask = pattern_mask(pattern, query.shape[1], key.shape[1], key_valid)
    if segment_ids is not None:
        mask = mask & _same_segment(*segment_ids)
    return dense_attention(
        query,
        key,
        value,
        mask=mask,
        scale=scale,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
    )


def _chunked(
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
    segment_ids=None,
):
    if type(pattern) not in (patterns.Full, patterns.Causal):
        raise ValueError(
            f"implementation 'chunked' computes full() and causal() attention only; "
            f"got pattern {pattern}. Use 'block_sparse' for sparse patterns."
        )
    causal = isinstance(pattern, patterns.Causal)
    if causal and query.shape[1] != key.shape[1]:
        raise ValueError(
            "implementation 'chunked' aligns causal() queries with the end of the "
            f"keys, which differs from the pattern's j <= i when q_len "
            f"{query.shape[1]} != kv_len {key.shape[1]}; use 'block_sparse'."
        )
    return chunked_attention(
        query,
        key,
        value,
        scale=scale,
        causal=causal,
        key_valid=key_valid,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
        segment_ids=segment_ids,
    )


def _block_sparse(
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
    segment_ids=None,
):
    return block_sparse_attention(
        query,
        key,
        value,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
        segment_ids=segment_ids,
        block_q=BLOCK_SIZE,
    )


def _auto(
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
    segment_ids=None,
):
    name = auto_implementation(
        query,
        key,
        value,
        pattern=pattern,
        alibi_slopes=alibi_slopes,
        key_padding=key_valid is not None,
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
    )
    extras = {}
    if segment_ids is not None:
        # Packed documents: the rule's pick if it computes them, else block-sparse's schedules.
        name = name if name in SEGMENT_IDS else "block_sparse"
        extras["segment_ids"] = segment_ids
    return IMPLEMENTATIONS[name](
        query,
        key,
        value,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
        **extras,
    )


IMPLEMENTATIONS = {
    "dense": _dense,
    "chunked": _chunked,
    "block_sparse": _block_sparse,
    "splash": splash_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "lra_local": lra_local_attention,
    "auto": _auto,
}


def pattern_mask(pattern, q_len, kv_len, key_valid=None):
    """Dense boolean mask `[batch or 1, 1, q_len, kv_len]` of `pattern` and key padding."""
    mask = jax.numpy.asarray(pattern.mask(q_len, kv_len))[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask


def _check_inputs(query, key, value, mask, bias, alibi_slopes, sinks, dropout_rate):
    """Raises a ValueError or TypeError naming the argument before anything is computed."""
    check_query_key_value(query, key, value)
    check_sinks(sinks, query.shape[2])
    full = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    for name, array in (("mask", mask), ("bias", bias)):
        if array is None:
            continue
        if not isinstance(array, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a jax or NumPy array or None; got {type(array).__name__}."
            )
        if array.ndim != 4 or any(a not in (1, f) for a, f in zip(array.shape, full)):
            raise ValueError(
                f"{name} of shape {array.shape} does not broadcast to "
                f"[batch, heads, q_len, kv_len] = {list(full)}."
            )
    if mask is not None and mask.dtype != bool:
        raise ValueError(f"mask must be boolean (True = may attend); got dtype {mask.dtype}.")
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype; got {bias.dtype}.")
    if alibi_slopes is not None and np.shape(alibi_slopes) != (query.shape[2],):
        # Slopes of another length would broadcast against the heads, or fail deep inside.
        raise ValueError(
            f"alibi_slopes must have shape [heads] = ({query.shape[2]},), one slope per head; "
            f"got shape {np.shape(alibi_slopes)}."
        )
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, (int, float, np.integer, np.floating))
        or not 0.0 <= dropout_rate < 1.0
    ):
        raise ValueError(f"dropout_rate must be a number in [0, 1); got {dropout_rate!r}.")


def _same_segment(q_segment_ids, kv_segment_ids):
    """`[batch, 1, q_len, kv_len]`: whether query i and key j lie in one segment."""
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def _check_segment_ids(segment_ids, query, key):
    """(q_segment_ids `[batch, q_len]`, kv_segment_ids `[batch, kv_len]`) of integers, or None;
    a ValueError naming what is wrong otherwise."""
    if segment_ids is None:
        return None
    batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids must be an int [batch, length] array or a pair (q_segment_ids, "
                f"kv_segment_ids); got a sequence of {len(segment_ids)}."
            )
        pair = tuple(segment_ids)
    else:
        if q_len != kv_len:
            raise ValueError(
                f"one segment_ids array is for self-attention (q_len == kv_len); got q_len "
                f"{q_len}, kv_len {kv_len}: pass (q_segment_ids, kv_segment_ids)."
            )
        pair = (segment_ids, segment_ids)
    for name, ids, length in zip(("q_segment_ids", "kv_segment_ids"), pair, (q_len, kv_len)):
        if not isinstance(ids, (jax.Array, np.ndarray)):
            raise ValueError(f"{name} must be a jax or NumPy array; got {type(ids).__name__}.")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype; got {ids.dtype}.")
        if ids.shape != (batch, length):
            raise ValueError(
                f"{name} must have shape [batch, length] = ({batch}, {length}); got {ids.shape}."
            )
    return tuple(jnp.asarray(ids) for ids in pair)


def _key_valid(mask, batch, implementation):
    """`[batch, kv_len]` from a key padding mask `[batch or 1, 1, 1, kv_len]`."""
    if mask is None:
        return None
    if mask.shape[1:3] != (1, 1):
        raise ValueError(
            f"implementation {implementation!r} takes only key padding masks of shape "
            f"[batch, 1, 1, kv_len]; got {tuple(mask.shape)}. Put structure into `pattern`, or use "
            "implementation='dense' for an arbitrary mask."
        )
    return jax.numpy.broadcast_to(mask[:, 0, 0, :], (batch, mask.shape[-1]))


def dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
    pattern=None,
    segment_ids=None,
    implementation="dense",
    dropout_rate=0.0,
    dropout_rng=None,
    return_weights=False,
):
    """Scaled dot-product attention, softmax(q k^T / sqrt(d) + bias) v, over masked keys.

    In order: s = q k^T * scale; the soft cap c * tanh(s / c); plus ALiBi and `bias`; the mask
    (excluded pairs -inf); the softmax over the allowed keys and the sink; the weighted sum of
    the values.

    Args:
      query: `[batch, q_len, heads, head_dim]` (the layout of `jax.nn.dot_product_attention`).
        query, key and value are jax or NumPy arrays of a floating dtype, no dimension empty.
      key: `[batch, kv_len, kv_heads, head_dim]`, kv_heads dividing heads: multi-head when
        equal, multi-query when 1, grouped-query otherwise (query head n reads key/value head
        n // (heads // kv_heads), as in `jax.nn.dot_product_attention`). No implementation
        repeats the keys and values to `heads`; "lra_local" refuses kv_heads != heads.
      value: `[batch, kv_len, kv_heads, value_dim]`.
      mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True where a query may
        attend. A query whose keys are all masked gets zeros, never NaN, in output and gradients.
        Implementations other than "dense" take only key padding, `[batch, 1, 1, kv_len]`.
      bias: float, broadcastable to `[batch, heads, q_len, kv_len]`, added to the logits
        ("dense" only).
      scale: multiplies the logits; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]` ALiBi slopes; adds -slope * |i - j| to the logits. Given as slopes
        rather than a bias array so that sparse implementations compute it block by block.
      logit_soft_cap: None (off) or a finite float c > 0: the scaled scores s become
        c * tanh(s / c) before ALiBi, the bias and the mask (Gemma 2; `soft_cap.py`).
      sinks: None or a float `[heads]` array of logits, learnable: each head's sink is a key
        that every query sees, with value zero, in the softmax's denominator (gpt-oss;
        `sinks.py`). A query with no allowed key still gets zeros.
        Soft-capping and sinks: the implementations in `SOFT_CAP_AND_SINKS` only.
      pattern: a `transformer.patterns` pattern, a name in `patterns.PATTERNS`, or None for full
        attention; combined with `mask` by logical AND.
      segment_ids: None, an int `[batch, length]` array (self-attention, q_len == kv_len), or a
        pair `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`: packed
        documents, a query attending to a key only when their ids are equal (and the pattern
        and mask allow it). The implementations in `SEGMENT_IDS` only: `jax.nn`'s attention,
        behind "xla" and "cudnn", takes no segment ids (pass the equivalent `mask` there).
      implementation: a name in `IMPLEMENTATIONS`: "dense" materialises the score matrix (the
        reference); "chunked" (full and causal), "block_sparse", "splash", "xla", "cudnn";
        "auto" picks one by the rule in `transformer/attention/auto.py`; "lra_local" runs
        `patterns.lra_local` with the Long Range Arena's own padding mask (lra_local.py).
      dropout_rate, dropout_rng: dropout on the attention weights ("dense" only); the rate is
        in [0, 1).
      return_weights: also return the weights `[batch, heads, q_len, kv_len]` ("dense" only).

    Returns:
      `[batch, q_len, heads, value_dim]`, and the weights when `return_weights`.

    Raises:
      TypeError or ValueError naming the argument, before any computation, for inputs that are
      not arrays, not floating, empty or of mismatched shapes, and for a bad mask, bias,
      alibi_slopes, logit_soft_cap, sinks, dropout_rate, pattern or implementation.
    """
    _check_inputs(query, key, value, mask, bias, alibi_slopes, sinks, dropout_rate)
    segments = _check_segment_ids(segment_ids, query, key)
    logit_soft_cap = check_logit_soft_cap(logit_soft_cap)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; allowed: {sorted(IMPLEMENTATIONS)}."
        )
    if segments is not None and implementation not in SEGMENT_IDS:
        raise ValueError(
            f"segment_ids is computed by implementations {list(SEGMENT_IDS)} only; got "
            f"implementation={implementation!r}."
        )
    for name, used in (
        ("logit_soft_cap", logit_soft_cap is not None),
        ("sinks", sinks is not None),
    ):
        if used and implementation not in SOFT_CAP_AND_SINKS:
            raise ValueError(
                f"{name} is computed by implementations {list(SOFT_CAP_AND_SINKS)} only; got "
                f"implementation={implementation!r}."
            )
    if pattern is None:
        pattern = patterns.full()
    elif isinstance(pattern, str):
        pattern = patterns.build(pattern)
    elif not isinstance(pattern, patterns.Pattern):
        raise ValueError(
            f"pattern must be a transformer.patterns pattern, a name in "
            f"{sorted(patterns.PATTERNS)} or None; got {type(pattern).__name__}."
        )

    if implementation == "dense":  # the reference: the only path with bias, dropout, weights
        pattern_and_mask = pattern_mask(pattern, query.shape[1], key.shape[1])
        if mask is not None:
            pattern_and_mask = pattern_and_mask & mask
        if segments is not None:
            pattern_and_mask = pattern_and_mask & _same_segment(*segments)
        return dense_attention(
            query,
            key,
            value,
            mask=pattern_and_mask,
            bias=bias,
            scale=scale,
            alibi_slopes=alibi_slopes,
            logit_soft_cap=logit_soft_cap,
            sinks=sinks,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            return_weights=return_weights,
        )

    dense_only = {
        "bias": bias is not None,
        "return_weights": return_weights,
        "dropout": dropout_rate > 0.0 and dropout_rng is not None,
    }
    for name, used in dense_only.items():
        if used:
            raise ValueError(
                f"{name} is supported by implementation='dense' only; got "
                f"implementation={implementation!r}."
            )
    key_valid = _key_valid(mask, query.shape[0], implementation)
    extras = {"logit_soft_cap": logit_soft_cap, "sinks": sinks, "segment_ids": segments}
    return IMPLEMENTATIONS[implementation](
        query,
        key,
        value,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        # Only when used: implementations without them keep their signature.
        **{name: given for name, given in extras.items() if given is not None},
    )
