"""`block_sparse_attention`: computes only the blocks of the score matrix that a pattern needs.

It asks the planner (`plan.py`) for the pattern's non-empty blocks, then computes them with the
fused CPU kernel (`cpu_kernel.py`) where it applies, or with XLA's schedules (`xla_schedules.py`)
on every other backend and input. Rows whose queries see every key (BigBird's anchor rows) go to
chunked attention on the XLA path.

Non-finite inputs follow the dense reference (`dense.py`): padded keys and values are zeroed per
key before any block combines them, and each path selects excluded logits and restricts its
products to allowed pairs, so what the mask excludes never reaches the output or the gradients
and what it allows propagates (NaN in, NaN out).
"""

import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention.block_sparse import cpu_kernel
from transformer.attention.block_sparse.plan import grouped, make_plan
from transformer.attention.block_sparse.xla_schedules import _from_blocks, _to_blocks, attention_fn
from transformer.attention.chunked import chunked_attention
from transformer.attention.shapes import check_query_key_value, group_size, varying_like
from transformer.attention.sinks import check_sinks
from transformer.attention.soft_cap import check_logit_soft_cap


def block_sparse_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
    segment_ids=None,
    block_q=64,
    block_kv=None,
    use_kernel=True,
):
    """Attention over the non-empty blocks of `pattern` only; exact, forward and backward.

    Args:
      query: `[batch, q_len, heads, head_dim]`; any length (padded internally to the block).
      key: `[batch, kv_len, kv_heads, head_dim]`, kv_heads dividing heads (grouped-query
        attention: query head n reads key/value head n // (heads // kv_heads), never repeated).
      value: `[batch, kv_len, kv_heads, value_dim]`.
      pattern: a `transformer.patterns` pattern.
      key_valid: bool `[batch, kv_len]`, False at padded keys, or None.
      scale: multiplies the logits; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]`; adds -slope * |i - j|, computed block by block.
      logit_soft_cap: None or a float c > 0: each scaled score s becomes c * tanh(s / c), before
        ALiBi and the masks (`soft_cap.py`).
      sinks: None or `[heads]` sink logits, in every row's softmax denominator with a zero value
        (`sinks.py`); differentiable.
      segment_ids: None or a pair (q_segment_ids `[batch, q_len]`, kv_segment_ids
        `[batch, kv_len]`) of ints: packed documents, a query seeing a key only when their ids
        are equal. The kernel skips, per batch row and at run time, the pattern's blocks whose
        query and key ids cannot meet (disjoint id ranges) and compares ids per pair only in
        blocks that hold several; XLA's schedules compute every pattern block, masked per pair.
      block_q, block_kv: block sizes; block_kv defaults to block_q.
      use_kernel: on CPU, compute the scheduled rows with the fused kernel (`cpu_kernel.py`)
        where it applies (float32, no ALiBi, block_kv and head dims multiples of 16); False
        keeps XLA's schedules, as on other backends.

    Returns:
      `[batch, q_len, heads, value_dim]`; zeros for queries with no allowed key.
    """
    check_query_key_value(query, key, value)
    check_sinks(sinks, query.shape[2])
    logit_soft_cap = check_logit_soft_cap(logit_soft_cap)
    block_kv = block_q if block_kv is None else block_kv
    q_len, kv_len = query.shape[1], key.shape[1]
    if key_valid is not None:
        if (
            key_valid.ndim != 2
            or key_valid.shape[1] != kv_len
            or key_valid.shape[0] not in (1, query.shape[0])
        ):
            raise ValueError(
                f"key_valid must be [batch, kv_len] = [{query.shape[0]}, {kv_len}] "
                f"(or [1, {kv_len}]); got shape {key_valid.shape}"
            )
        key_valid = jnp.broadcast_to(key_valid, (query.shape[0], kv_len))
    kernel = use_kernel and cpu_kernel.supports(
        block_kv, query.shape[-1], value.shape[-1], query.dtype, alibi_slopes
    )
    # Dense rows go to chunked attention, which is slow on a few rows of queries, except with the
    # kernel, which walks them like any other row; chunked attention aligns ALiBi distances for
    # a suffix of queries only, not for any rows.
    plan = make_plan(
        pattern,
        q_len,
        kv_len,
        block_q,
        block_kv,
        # Chunked attention reads each query head's keys apart; grouped heads stay in the
        # schedules, where a group shares each key block.
        dense_rows_apart=alibi_slopes is None
        and not kernel
        and group_size(query, key) == 1
        and segment_ids is None,
    )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    extras = {"logit_soft_cap": logit_soft_cap, "sinks": sinks}
    if plan.schedules:
        out = _scheduled_attention(
            plan, query, key, value, key_valid, scale, alibi_slopes, kernel, segment_ids, **extras
        )
    else:  # no scheduled blocks: every row is dense or sees no key
        out = jnp.zeros(query.shape[:3] + value.shape[-1:], query.dtype)
    if len(plan.dense_q_blocks):
        rows = _row_positions(plan.dense_q_blocks, block_q, q_len)
        dense_out = chunked_attention(
            query[:, rows], key, value, scale=scale, key_valid=key_valid, **extras
        )
        out = out.at[:, rows].set(dense_out)
    return out


def _row_positions(q_blocks, block_q, q_len):
    """The query positions of `q_blocks`: a slice when they are consecutive, else an index array."""
    positions = (q_blocks[:, None] * block_q + np.arange(block_q)).reshape(-1)
    positions = positions[positions < q_len]
    if (np.diff(positions) == 1).all():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _scheduled_attention(
    plan,
    query,
    key,
    value,
    key_valid,
    scale,
    alibi_slopes,
    kernel,
    segment_ids,
    logit_soft_cap,
    sinks,
):
    """The plan's scheduled blocks: `[batch, q_len, heads, value_dim]`, zero in other rows."""
    block_q, block_kv = plan.block_q, plan.block_kv
    q_len, kv_len = query.shape[1], key.shape[1]
    if key_valid is not None:
        # Padded keys and values become zeros: a NaN there cannot reach a product (0 * NaN).
        valid = key_valid[:, :, None, None]
        key, value = jnp.where(valid, key, 0), jnp.where(valid, value, 0)
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    heads, group = query.shape[2], group_size(query, key)
    q = _to_blocks(query.astype(dtype) * scale, plan.num_q_blocks, block_q)
    k = _to_blocks(key.astype(dtype), plan.num_kv_blocks, block_kv)
    v = _to_blocks(value.astype(dtype), plan.num_kv_blocks, block_kv)
    key_bias = None
    if key_valid is not None:
        padded = jnp.pad(key_valid, ((0, 0), (0, plan.num_kv_blocks * block_kv - kv_len)))
        key_bias = (
            jnp.where(padded, 0.0, -jnp.inf)
            .astype(dtype)
            .reshape(key_valid.shape[0], plan.num_kv_blocks, block_kv)
        )
    slopes = (
        None if alibi_slopes is None else _per_row(jnp.asarray(alibi_slopes, dtype), group, block_q)
    )
    if sinks is not None:
        # Inside shard_map the sinks' gradient varies over the devices like q, k and v, and a
        # custom VJP must return the type it was given: so they enter it varying too.
        (sinks,) = varying_like((q, k, v, key_bias), jnp.asarray(sinks, dtype))
        if group > 1:
            sinks = _per_row(sinks, group, block_q)[:, None]
    # Grouped-query attention: the query heads that share a key/value head become rows of one
    # block (plan.grouped), so each key block is read once for the whole group.
    plan = grouped(plan, group)
    q = _fold_heads(q, group)
    segments = None
    if segment_ids is not None:
        segments = _segment_blocks(segment_ids, plan, group)
    if kernel:
        out = cpu_kernel.attention_fn(plan, logit_soft_cap)(q, k, v, key_bias, segments, sinks)
        return _from_blocks(_unfold_heads(out, group, heads), q_len).astype(query.dtype)
    attention = attention_fn(plan, logit_soft_cap)
    if q.shape[0] == 1:
        out = attention(q, k, v, key_bias, segments, slopes, sinks)
    else:
        # One batch element at a time: each step's blocks stay cache-sized whatever the batch
        # (the whole batch at once ran slower, at batch 8 x 4 heads x 4,096 tokens).
        def one(args):
            q, k, v, key_bias, segments = jax.tree.map(lambda x: x[None], args)
            return attention(q, k, v, key_bias, segments, slopes, sinks)[0]

        out = jax.lax.map(one, (q, k, v, key_bias, segments))
    return _from_blocks(_unfold_heads(out, group, heads), q_len).astype(query.dtype)


def _segment_blocks(segment_ids, plan, group):
    """(q `[batch, num_q_blocks, block_q]`, kv `[batch, num_kv_blocks, block_kv]`) segment ids
    in the plan's blocks (`plan` grouped: each folded head's rows repeat the block's ids).
    Padding positions get ids no real one equals (-1 and -2), so they meet nothing."""
    q_ids, kv_ids = (jnp.asarray(x, jnp.int32) for x in segment_ids)
    block_q = plan.query_block
    q_ids = jnp.pad(
        q_ids, ((0, 0), (0, plan.num_q_blocks * block_q - q_ids.shape[1])), constant_values=-1
    )
    kv_ids = jnp.pad(
        kv_ids,
        ((0, 0), (0, plan.num_kv_blocks * plan.block_kv - kv_ids.shape[1])),
        constant_values=-2,
    )
    q_ids = q_ids.reshape(q_ids.shape[0], plan.num_q_blocks, 1, block_q)
    q_ids = jnp.broadcast_to(q_ids, (q_ids.shape[0], plan.num_q_blocks, group, block_q))
    return (
        q_ids.reshape(q_ids.shape[0], plan.num_q_blocks, -1),
        kv_ids.reshape(kv_ids.shape[0], plan.num_kv_blocks, plan.block_kv),
    )


def _fold_heads(q, group):
    """`[batch, heads, num_q_blocks, block_q, d]` -> `[batch, kv_heads, num_q_blocks,
    group * block_q, d]`, rows ordered (head in group, position)."""
    if group == 1:
        return q
    batch, heads, num_blocks, block, dim = q.shape
    q = q.reshape(batch, heads // group, group, num_blocks, block, dim)
    return q.transpose(0, 1, 3, 2, 4, 5).reshape(batch, heads // group, num_blocks, -1, dim)


def _unfold_heads(out, group, heads):
    """The inverse of `_fold_heads`: `[batch, heads, num_q_blocks, block_q, d]`."""
    if group == 1:
        return out
    batch, kv_heads, num_blocks, rows, dim = out.shape
    out = out.reshape(batch, kv_heads, num_blocks, group, rows // group, dim)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, heads, num_blocks, -1, dim)


def _per_row(per_head, group, block_q):
    """`[heads]` (ALiBi slopes, sinks) -> each folded row's value `[kv_heads, group * block_q]`."""
    return jnp.repeat(per_head.reshape(-1, group), block_q, axis=1)
