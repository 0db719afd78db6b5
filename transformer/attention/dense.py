"""Dense attention: the full `[batch, heads, q_len, kv_len]` score matrix, masked and softmaxed.

This is the reference every other implementation is tested against, and the only one that can
return the attention weights (for plots) or apply dropout to them.

Non-finite inputs. What the mask excludes never reaches the output or the gradients: an excluded
pair's logit is replaced (selected, never added to) before the softmax, and the products that
combine pairs (weights times values, and in the backward pass the logits' gradients times keys
or queries) run over the allowed pairs only, so a NaN or inf at an excluded position is never
multiplied by a zero weight (0 * NaN = NaN). What the mask allows propagates as IEEE arithmetic
over the allowed pairs: a NaN logit or value gives NaN, a +inf logit gives a NaN row (inf - inf in
the softmax), a -inf logit gets weight 0. A row with no allowed key, or whose allowed logits are
all -inf, gets zeros and zero gradients. `masked_einsum` is that product; the other
implementations use it too.
"""

import functools
import string

import jax
import jax.numpy as jnp
from jax import lax

from transformer.attention.shapes import check_query_key_value
from transformer.attention.sinks import per_head
from transformer.attention.soft_cap import soft_cap


def masked_einsum(spec, weights, allowed, operand, preferred_element_type=None):
    """`einsum(spec, weights, operand)` summing over allowed pairs only.

    `weights` carries the pair axes (e.g. `[.., q, k]`), `allowed` is boolean and broadcasts to
    it, `operand` is contracted over one pair axis. An excluded pair contributes nothing, even
    where its operand entry is NaN or inf; an allowed pair contributes weight * entry in IEEE
    arithmetic (0 * inf = NaN). The plain product runs on the finite part of the operand; only
    when the operand holds a non-finite entry does one product of 0/1 indicators find where the
    non-finite terms land (NaN, +inf, -inf), so finite inputs cost one `where` and a reduction
    extra.
    """
    weights = jnp.where(allowed, weights, 0)
    finite = jnp.isfinite(operand)
    out = jnp.einsum(
        spec, weights, jnp.where(finite, operand, 0), preferred_element_type=preferred_element_type
    )

    def non_finite_terms():
        # One product of 0/1 indicators counts, per output entry, the allowed terms of each kind:
        # the weight's sign (positive, negative, zero or NaN) against the operand's non-finite
        # value (+inf, -inf, NaN). One product, not one per kind, keeps the branch cheap to trace
        # and compile. Only whether a count is positive matters, so its rounding does not.
        inputs, output_spec = spec.split("->")
        weights_spec, operand_spec = inputs.split(",")
        sign, kind = [label for label in string.ascii_letters if label not in spec][:2]
        allow = jnp.broadcast_to(allowed, weights.shape)
        positive, negative = allow & (weights > 0), allow & (weights < 0)
        signs = jnp.stack([positive, negative, allow & ~positive & ~negative], axis=-1)
        kinds = jnp.stack([jnp.isposinf(operand), jnp.isneginf(operand), jnp.isnan(operand)], -1)
        counts = jnp.einsum(
            f"{weights_spec}{sign},{operand_spec}{kind}->{output_spec}{sign}{kind}",
            signs.astype(out.dtype),
            kinds.astype(out.dtype),
            preferred_element_type=preferred_element_type,
        )
        meets = counts > 0  # [..., sign, kind]
        to_plus = meets[..., 0, 0] | meets[..., 1, 1]
        to_minus = meets[..., 0, 1] | meets[..., 1, 0]
        # NaN: a NaN operand, an infinite one times a zero (or NaN) weight, or inf - inf.
        nan = meets[..., :, 2].any(-1) | meets[..., 2, :2].any(-1) | (to_plus & to_minus)
        return jnp.where(
            nan, jnp.nan, jnp.where(to_plus, jnp.inf, jnp.where(to_minus, -jnp.inf, 0.0))
        ).astype(out.dtype)

    return out + lax.cond(finite.all(), lambda: jnp.zeros_like(out), non_finite_terms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _masked_values(spec, weights, allowed, values):
    """`masked_einsum` of the weights and the values, differentiable over allowed pairs only."""
    return masked_einsum(spec, weights, allowed, values)


def _masked_values_fwd(spec, weights, allowed, values):
    return _masked_values(spec, weights, allowed, values), (weights, allowed, values)


def _masked_values_bwd(spec, residuals, d_out):
    weights, allowed, values = residuals
    inputs, output = spec.split("->")
    weights_spec, values_spec = inputs.split(",")
    # dW_ij = dO_i . V_j: one pair each, then selected; dV = W^T dO over the allowed pairs.
    d_weights = jnp.where(
        allowed, jnp.einsum(f"{output},{values_spec}->{weights_spec}", d_out, values), 0
    )
    d_values = masked_einsum(f"{weights_spec},{output}->{values_spec}", weights, allowed, d_out)
    return d_weights.astype(weights.dtype), None, d_values.astype(values.dtype)


_masked_values.defvjp(_masked_values_fwd, _masked_values_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _masked_logits(spec, query, key, allowed, compute_dtype):
    """`einsum(spec, query, key)` (one logit per pair), -inf at excluded pairs; its gradients
    (dS K and dS^T Q) sum over the allowed pairs only."""
    logits = jnp.einsum(spec, query, key, preferred_element_type=compute_dtype)
    return jnp.where(allowed, logits, -jnp.inf)


def _masked_logits_fwd(spec, query, key, allowed, compute_dtype):
    return _masked_logits(spec, query, key, allowed, compute_dtype), (query, key, allowed)


def _masked_logits_bwd(spec, compute_dtype, residuals, d_logits):
    query, key, allowed = residuals
    inputs, logits_spec = spec.split("->")
    query_spec, key_spec = inputs.split(",")
    d_query = masked_einsum(
        f"{logits_spec},{key_spec}->{query_spec}", d_logits, allowed, key, compute_dtype
    )
    d_key = masked_einsum(
        f"{logits_spec},{query_spec}->{key_spec}", d_logits, allowed, query, compute_dtype
    )
    return d_query.astype(query.dtype), d_key.astype(key.dtype), None


_masked_logits.defvjp(_masked_logits_fwd, _masked_logits_bwd)


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
    logit_soft_cap=None,
    sinks=None,
    dropout_rate=0.0,
    dropout_rng=None,
    return_weights=False,
):
    """softmax(cap(q k^T * scale) + bias, masked, with sinks) v.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[batch, kv_len, kv_heads, head_dim]`, kv_heads dividing heads: query head n reads
        key/value head n // (heads // kv_heads) (grouped-query attention; never repeated).
      value: `[batch, kv_len, kv_heads, value_dim]`.
      mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True where a query may
        attend. A query with no key left gets zeros in its output and its gradients. What it
        excludes never reaches the output or gradients, even NaN or inf (module docstring).
      bias: added to the logits, broadcastable to `[batch, heads, q_len, kv_len]` (ALiBi, relative
        positions).
      scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]`; adds `alibi_bias` to the logits.
      logit_soft_cap: a float c > 0 or None; q k^T * scale becomes c * tanh(q k^T * scale / c)
        before the bias, ALiBi and the mask (`soft_cap.py`).
      sinks: `[heads]` or None; each head's sink logit joins every row's softmax denominator
        with a zero value (`sinks.py`). The returned weights leave out the sink's share.
      dropout_rate, dropout_rng: dropout on the attention weights; off when rate is 0 or rng None.
      return_weights: also return the weights `[batch, heads, q_len, kv_len]`.

    Returns:
      `[batch, q_len, heads, value_dim]`, and the weights when asked.
    """
    check_query_key_value(query, key, value)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
    arguments = dict(
        mask=mask,
        bias=bias,
        scale=scale,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_weights=return_weights,
    )
    # Finite inputs cannot carry a NaN or inf from an excluded position into a product (an
    # excluded weight is 0 and 0 * finite = 0), so they take the plain path; only inputs that hold
    # a NaN or inf pay for the careful one. One check over q, k and v, linear in length. The
    # sinks are an operand, not a constant of the branches: they may be trained.
    plain = lambda q, k, v, sinks: _plain(q, k, v, sinks=sinks, **arguments)
    careful = lambda q, k, v, sinks: careful_dense_attention(q, k, v, sinks=sinks, **arguments)
    return jax.lax.cond(
        all_finite(query, key, value),
        plain,
        jax.checkpoint(careful),
        query,
        key,
        value,
        None if sinks is None else jnp.asarray(sinks),
    )


def all_finite(*arrays):
    """Whether every entry of every array is finite: one scalar for a `lax.cond`."""
    return functools.reduce(jnp.logical_and, [jnp.isfinite(x).all() for x in arrays])


def kernel_unless_non_finite(finite, kernel, exact, *operands):
    """`kernel(*operands)` where `finite`, else `exact(*operands)`: for kernels that multiply
    excluded pairs' zero weights by their operands. Finite inputs cannot carry a NaN or inf from
    an excluded pair into a product (0 * finite = 0), so only inputs holding one pay for the
    exact branch. It is rematerialised, so that its residuals (the inputs) cost the kernel's
    branch nothing under differentiation."""
    return lax.cond(finite, kernel, jax.checkpoint(exact), *operands)


def _softmax_with_sinks(logits, sinks):
    """Softmax over the last axis of `[batch, heads, q_len, kv_len]` finite logits, with each
    head's sink logit `[heads]` in the denominator (plain softmax when `sinks` is None)."""
    if sinks is None:
        return jax.nn.softmax(logits, axis=-1)
    sink = per_head(sinks, logits.ndim, logits.dtype)
    # The shift cancels out: no gradient through it.
    shift = jax.lax.stop_gradient(jnp.maximum(logits.max(axis=-1, keepdims=True), sink))
    weights = jnp.exp(logits - shift)
    return weights / (weights.sum(axis=-1, keepdims=True) + jnp.exp(sink - shift))


def _split_query_heads(query, group):
    """`[batch, q_len, heads, d]` -> `[batch, q_len, kv_heads, group, d]`: query head n is
    (n // group, n % group), so that it meets key/value head n // group without the keys and
    values ever being repeated to `heads`."""
    return query.reshape(*query.shape[:2], -1, group, query.shape[-1])


def _split_heads(x, group):
    """`[batch, heads or 1, q_len, kv_len]` -> `[batch, kv_heads or 1, group or 1, ...]` (masks,
    weights); a mask of fewer dimensions broadcasts from the right, as it would against the
    logits."""
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], -1, group, *x.shape[2:])


def _merge_heads(out):
    """`[batch, q_len, kv_heads, group, d]` -> `[batch, q_len, heads, d]`."""
    return out.reshape(*out.shape[:2], -1, out.shape[-1])


def _grouped_logits(query, key, compute_dtype):
    """q k^T `[batch, heads, q_len, kv_len]` for key `[batch, kv_len, kv_heads, d]`, each group of
    heads // kv_heads query heads against its own key head."""
    group = query.shape[2] // key.shape[2]
    logits = jnp.einsum(
        "bqhgd,bkhd->bhgqk",
        _split_query_heads(query, group),
        key,
        preferred_element_type=compute_dtype,
    )
    return logits.reshape(logits.shape[0], -1, *logits.shape[3:])


def _with_biases(logits, bias, alibi_slopes):
    """`[batch, heads, q_len, kv_len]` logits plus `bias` and ALiBi's penalty, when given."""
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if alibi_slopes is not None:
        logits = logits + alibi_bias(alibi_slopes, logits.shape[-2], logits.shape[-1])
    return logits


def _dropout(weights, rate, rng):
    """Attention weights with dropout (kept ones scaled by 1 / (1 - rate)); off when rate is 0
    or rng None."""
    if rate > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
    return weights


def _plain(
    query,
    key,
    value,
    *,
    mask,
    bias,
    scale,
    alibi_slopes,
    logit_soft_cap,
    sinks,
    dropout_rate,
    dropout_rng,
    return_weights,
):
    """`dense_attention` for finite q, k and v."""
    # Softmax in float32 even for bfloat16 inputs: exp() of low-precision logits loses the tail.
    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    logits = _grouped_logits(query, key, compute_dtype)
    logits = _with_biases(soft_cap(logits * scale, logit_soft_cap), bias, alibi_slopes)
    if mask is not None:
        # A finite floor, not -inf: a row with every key masked would be exp(-inf - -inf) = NaN.
        logits = jnp.where(mask, logits, jnp.finfo(compute_dtype).min)
    weights = _softmax_with_sinks(logits, sinks)
    if mask is not None:
        # Rows with no valid key came out uniform over the floor; make them zero instead.
        weights = jnp.where(mask, weights, 0.0)
    weights = _dropout(weights, dropout_rate, dropout_rng)
    group = query.shape[2] // key.shape[2]
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd",
        _split_heads(weights.astype(value.dtype), group),
        value,
        preferred_element_type=compute_dtype,
    )
    out = _merge_heads(out).astype(query.dtype)
    if return_weights:
        return out, weights
    return out


def careful_dense_attention(
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
    dropout_rate=0.0,
    dropout_rng=None,
    return_weights=False,
):
    """`dense_attention` for any q, k and v: what the mask excludes never reaches the results,
    even NaN or inf (module docstring). `scale` must be given."""
    # Softmax in float32 even for bfloat16 inputs: exp() of low-precision logits loses the tail.
    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    group = query.shape[2] // key.shape[2]
    if mask is None:
        logits = _grouped_logits(query, key, compute_dtype)
    else:
        mask = jnp.asarray(mask).astype(bool)
        # Selected, not added: an excluded pair's logit never enters, even when it is NaN.
        logits = _masked_logits(
            "bqhgd,bkhd->bhgqk",
            _split_query_heads(query, group),
            key,
            _split_heads(mask, group),
            compute_dtype,
        )
        logits = logits.reshape(logits.shape[0], -1, *logits.shape[3:])
    logits = _with_biases(soft_cap(logits * scale, logit_soft_cap), bias, alibi_slopes)
    if mask is not None:
        # Again after the cap and the bias: excluded pairs stay -inf whatever they make of it.
        logits = jnp.where(mask, logits, -jnp.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    # A row with no allowed key (or only -inf logits) has max -inf: shift it by 0 so that its
    # weights are exp(-inf) = 0, not NaN. A NaN logit is not "no key": it makes the row NaN.
    # Asked of every logit, not of the max: XLA's CPU max can drop NaN, depending on the layout.
    has_key = jnp.any(logits != -jnp.inf, axis=-1, keepdims=True)
    shift = row_max
    if sinks is not None:
        sink = per_head(sinks, logits.ndim, logits.dtype)
        shift = jnp.maximum(row_max, sink)  # NaN if either is: a NaN sink makes the row NaN
    shift = jax.lax.stop_gradient(jnp.where(has_key, shift, 0.0))
    weights = jnp.exp(logits - shift)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        # A row with no key gets zeros, whatever its sink: nothing of the sink is added there.
        total = total + jnp.where(has_key, jnp.exp(sink - shift), 0.0)
    weights = weights / jnp.where(has_key, total, 1.0)
    if mask is not None:
        # A NaN row's excluded weights are exp(-inf - NaN); excluded weights are exactly 0.
        weights = jnp.where(mask, weights, 0.0)
    weights = _dropout(weights, dropout_rate, dropout_rng)
    if mask is None:
        out = jnp.einsum(
            "bhgqk,bkhd->bqhgd",
            _split_heads(weights.astype(value.dtype), group),
            value,
            preferred_element_type=compute_dtype,
        )
    else:
        out = _masked_values(
            "bhgqk,bkhd->bqhgd",
            _split_heads(weights.astype(compute_dtype), group),
            _split_heads(mask, group),
            value.astype(compute_dtype),
        )
    out = _merge_heads(out).astype(query.dtype)
    if return_weights:
        return out, weights
    return out
