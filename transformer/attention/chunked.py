"""Chunked attention: exact softmax attention in memory linear in length.

The keys are visited one chunk at a time and the softmax is accumulated online: each query row
keeps its running maximum logit `m`, the running sum of exponentials `l` and the running weighted
sum of values, rescaled whenever `m` grows (Rabe & Staats 2021, "Self-attention does not need
O(n^2) memory"; Dao et al. 2022, FlashAttention). No `[q_len, kv_len]` array exists, only
`[query_chunk, key_chunk]` tiles.

The backward pass is a custom VJP in the manner of FlashAttention-2: the forward pass stores only
its output and the log-sum-exp of each query row; the backward pass recomputes each tile of
probabilities from them, so it too needs memory linear in length.

Causal attention visits only the key chunks at or below the diagonal, so it does about half the
work of full attention rather than masking the upper half away.

Non-finite inputs follow the dense reference (`dense.py`): padded keys and values are replaced by
zeros before anything combines them, excluded logits are selected (never added) to -inf, and in
the tiles the causal rule cuts, the products run over the allowed pairs only
(`dense.masked_einsum`), so a NaN or inf that the mask excludes never reaches the output or the
gradients, while one it allows propagates (a NaN row maximum is not "no key").
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention.dense import all_finite, masked_einsum
from transformer.attention.shapes import check_query_key_value, group_size, varying_like
from transformer.attention.sinks import check_sinks, sink_gradient, with_sinks
from transformer.attention.soft_cap import check_logit_soft_cap, soft_cap_with_slope

# Tile sizes that used the least CPU time for forward+backward at 4K and 8K tokens on a 2-core
# AVX-512 CPU among 256..1024 (benchmarks/chunked_benchmark.py); 512x256 float32 logits for 8
# heads is 4 MB. Short sequences shrink them to the padded length.
DEFAULT_QUERY_CHUNK = 512
DEFAULT_KEY_CHUNK = 256
# Logits per tile on CPU, over the batch elements and heads it holds: 512 x 256 for 4 heads,
# the tile of one element of experiments/train_speed.py's model. Shorter sequences put several
# batch elements in a tile, as one element per tile ran slower with many short sequences
# (batch 64 x 128 tokens).
_TILE_ELEMENTS = 4 * 512 * 256


def chunked_attention(
    query,
    key,
    value,
    *,
    scale=None,
    causal=False,
    key_valid=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
    segment_ids=None,
    chunk_size=None,
):
    """softmax(cap(q k^T * scale) + alibi, masked, with sinks) v, computed chunk by chunk.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[batch, kv_len, kv_heads, head_dim]`, kv_heads dividing heads (grouped-query
        attention: query head n reads key/value head n // (heads // kv_heads), never repeated).
      value: `[batch, kv_len, kv_heads, value_dim]`.
      scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
      causal: query i sees key j only if j <= i + (kv_len - q_len). When q_len != kv_len the
        queries are the last q_len positions of the key sequence (as when decoding the end of a
        cache); with q_len == kv_len this is the usual j <= i.
      key_valid: boolean `[batch, kv_len]`, False at padded keys; None means all are valid.
      alibi_slopes: `[heads]`; adds -slope * |i - j| to the logits (i, j positions aligned as for
        `causal`), computed tile by tile. Its gradient is computed too.
      logit_soft_cap: None or a float c > 0: each scaled score s becomes c * tanh(s / c), before
        ALiBi and the mask (`soft_cap.py`).
      sinks: None or `[heads]` sink logits, in every row's softmax denominator with a zero value
        (`sinks.py`); their gradient is computed too.
      segment_ids: None or a pair (q_segment_ids `[batch, q_len]`, kv_segment_ids
        `[batch, kv_len]`) of ints: packed documents, a query seeing a key only when their ids
        are equal. Every tile is then masked per pair (no tile is skipped for them yet).
      chunk_size: None for the tuned default, an int for square tiles, or a pair
        `(query_chunk, key_chunk)`. Any lengths work: the inputs are padded internally.

    Returns:
      `[batch, q_len, heads, value_dim]` in the dtype of `query`. A query with no valid key gets
      zeros in its output and its gradients. Softmax statistics are kept in float32.
    """
    _check_inputs(query, key, value, key_valid, alibi_slopes)
    check_sinks(sinks, query.shape[2])
    logit_soft_cap = check_logit_soft_cap(logit_soft_cap)
    batch, q_len, heads, head_dim = query.shape
    kv_len, head_group = key.shape[1], group_size(query, key)
    if scale is None:
        scale = head_dim**-0.5
    query_chunk, key_chunk = _chunk_sizes(chunk_size, q_len, kv_len)
    num_q_chunks = -(-q_len // query_chunk)
    num_k_chunks = -(-kv_len // key_chunk)

    if key_valid is not None:
        # Padded keys and values become zeros: a NaN there cannot reach a product (0 * NaN).
        valid = key_valid[:, :, None, None]
        key, value = jnp.where(valid, key, 0), jnp.where(valid, value, 0)
    # [batch, heads, length, dim] once, outside the loops, so every tile is a plain batched matmul.
    q = jnp.swapaxes(query, 1, 2)
    k = jnp.swapaxes(key, 1, 2)
    v = jnp.swapaxes(value, 1, 2)
    q = _pad_length(q, num_q_chunks * query_chunk)
    k = _pad_length(k, num_k_chunks * key_chunk)
    v = _pad_length(v, num_k_chunks * key_chunk)
    if key_valid is None and kv_len % key_chunk:
        key_valid = jnp.ones((batch, kv_len), bool)
    if key_valid is not None:
        key_valid = jnp.pad(key_valid, ((0, 0), (0, num_k_chunks * key_chunk - kv_len)))
    if alibi_slopes is not None:
        # Inside shard_map the slopes' gradient varies over the devices like q, k and v, and a
        # custom VJP must return the type it was given: so they enter the VJP varying too.
        (alibi_slopes,) = varying_like((q, k, v, key_valid), jnp.asarray(alibi_slopes, jnp.float32))
        alibi_slopes = _per_row(alibi_slopes, head_group, query_chunk)
    if sinks is not None:  # likewise
        (sinks,) = varying_like((q, k, v, key_valid), jnp.asarray(sinks, jnp.float32))
        if head_group > 1:
            sinks = _per_row(sinks, head_group, query_chunk, num_q_chunks)
    # Grouped-query attention: a group's query heads become rows of one chunk, so each key
    # tile serves them all and no key or value is repeated.
    q = _fold_heads(q, head_group, query_chunk)
    segments = None
    if segment_ids is not None:
        q_ids, kv_ids = (jnp.asarray(x, jnp.int32) for x in segment_ids)
        # Padding gets ids no real query and key share; each folded head repeats its chunk's.
        q_ids = jnp.pad(
            q_ids, ((0, 0), (0, num_q_chunks * query_chunk - q_len)), constant_values=-1
        )
        q_ids = _fold_heads(
            jnp.broadcast_to(q_ids[:, None, :, None], (batch, head_group, q_ids.shape[1], 1)),
            head_group,
            query_chunk,
        )[:, 0, :, 0]
        kv_ids = jnp.pad(
            kv_ids, ((0, 0), (0, num_k_chunks * key_chunk - kv_len)), constant_values=-2
        )
        segments = (q_ids, kv_ids)

    config = _Config(
        scale=float(scale),
        causal=bool(causal),
        offset=kv_len - q_len,
        query_chunk=query_chunk,
        key_chunk=key_chunk,
        num_q_chunks=num_q_chunks,
        num_k_chunks=num_k_chunks,
        soft_cap=logit_soft_cap,
        group=head_group,
    )
    # Tiles sized for a CPU's caches; accelerators take the whole batch in each tile.
    group = (
        _batch_group(batch, heads * query_chunk * key_chunk)
        if jax.default_backend() == "cpu"
        else batch
    )
    if group == batch:
        out = _attention(config, q, k, v, key_valid, segments, alibi_slopes, sinks)
    else:
        # A few batch elements at a time, so each tile stays cache-sized whatever the batch: the
        # train_speed experiment's model (batch 8 x 4 heads) trained faster at 1,024 and 4,096
        # tokens this way than with the whole batch in every tile (CHANGELOG.md, 2026-11-22).
        def grouped(x):
            return None if x is None else x.reshape(batch // group, group, *x.shape[1:])

        out = jax.lax.map(
            lambda args: _attention(config, *args[:4], args[4:] or None, alibi_slopes, sinks),
            tuple(grouped(x) for x in (q, k, v, key_valid, *(segments or ()))),
        )
        out = out.reshape(batch, *out.shape[2:])
    out = _unfold_heads(out, head_group, query_chunk)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2)


def _check_inputs(query, key, value, key_valid, alibi_slopes):
    check_query_key_value(query, key, value)
    if key_valid is not None:
        if key_valid.shape != key.shape[:2] or key_valid.dtype != bool:
            raise ValueError(
                f"key_valid must be boolean [batch, kv_len] = {list(key.shape[:2])}; "
                f"got {key_valid.dtype} {tuple(key_valid.shape)}."
            )
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (query.shape[2],):
        raise ValueError(
            f"alibi_slopes must be [heads] = [{query.shape[2]}]; got shape "
            f"{jnp.shape(alibi_slopes)}."
        )


def _chunk_sizes(chunk_size, q_len, kv_len):
    if chunk_size is None:
        query_chunk, key_chunk = DEFAULT_QUERY_CHUNK, DEFAULT_KEY_CHUNK
    elif isinstance(chunk_size, int):
        query_chunk = key_chunk = chunk_size
    else:
        query_chunk, key_chunk = chunk_size
    for name, size in (("query", query_chunk), ("key", key_chunk)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"chunk_size must be a positive int or a pair of them; got {name} chunk {size!r}."
            )
    # No point in tiles longer than the (8-aligned) sequence: that is only padding.
    return min(int(query_chunk), _round_up(q_len, 8)), min(int(key_chunk), _round_up(kv_len, 8))


def _batch_group(batch, tile_elements):
    """How many batch elements each tile holds: the most that keep a tile's logits (heads x
    query_chunk x key_chunk each) within _TILE_ELEMENTS, and that divide the batch."""
    most = max(1, _TILE_ELEMENTS // tile_elements)
    return max((d for d in range(1, min(batch, most) + 1) if batch % d == 0), default=1)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _pad_length(x, length):
    """Zero-pads axis 2 (length) of `[batch, heads, length, dim]` to `length`."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


class _Config(NamedTuple):
    """Static description of the tiling; hashable, so it can be a non-differentiable argument."""

    scale: float
    causal: bool
    offset: int  # position of query 0 relative to key 0
    query_chunk: int
    key_chunk: int
    num_q_chunks: int
    num_k_chunks: int
    soft_cap: float | None = None  # logit soft-capping's c, or None
    # Query heads per key/value head, folded into each query chunk's rows (grouped-query
    # attention): a chunk holds `rows` = group x query_chunk rows, ordered (head, position).
    group: int = 1
    # Products over allowed pairs only in the causal rule's partial tiles, so that a NaN or inf
    # the rule excludes stays out; taken only when an input holds one (`_attention`).
    careful: bool = False

    @property
    def rows(self):
        return self.group * self.query_chunk


# --- Which tiles to visit -------------------------------------------------------------------
# Query chunk i holds positions [i*Cq, (i+1)*Cq) + offset in key coordinates, key chunk j holds
# [j*Ck, (j+1)*Ck). Under the causal rule a tile is skipped when all its keys lie after its last
# query, and needs no mask when all its keys lie at or before its first query.


def _ceil_div(a, b):
    return -(-a // b)


def _key_chunk_ranges(config, q_index):
    """(unmasked_end, end) for query chunk `q_index`.

    Key chunks [0, unmasked_end) are wholly visible, [unmasked_end, end) partly (they need the
    causal mask) and [end, num_k_chunks) not at all, so they are never visited.
    """
    if not config.causal:
        return config.num_k_chunks, config.num_k_chunks
    first_query = q_index * config.query_chunk + config.offset
    last_query = first_query + config.query_chunk - 1
    end = jnp.clip(last_query // config.key_chunk + 1, 0, config.num_k_chunks)
    unmasked_end = jnp.clip((first_query + 1) // config.key_chunk, 0, end)
    return unmasked_end, end


def _query_chunk_ranges(config, k_index):
    """(start, unmasked_start) for key chunk `k_index`.

    Query chunks [0, start) see none of its keys and are never visited, [start, unmasked_start)
    see some (they need the causal mask) and [unmasked_start, num_q_chunks) see all.
    """
    if not config.causal:
        return 0, 0
    first_key = k_index * config.key_chunk
    last_key = first_key + config.key_chunk - 1
    start = jnp.clip(
        _ceil_div(first_key - config.offset - config.query_chunk + 1, config.query_chunk),
        0,
        config.num_q_chunks,
    )
    unmasked_start = jnp.clip(
        _ceil_div(last_key - config.offset, config.query_chunk), start, config.num_q_chunks
    )
    return start, unmasked_start


# --- One tile -------------------------------------------------------------------------------


def _einsum_f32(spec, a, b):
    """`einsum(spec, a, b)` accumulated in float32. XLA's CPU runtime has no bfloat16 x bfloat16
    -> float32 dot for batched operands, so on CPU the operands are widened first (exactly:
    every bfloat16 is a float32)."""
    if jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _tile_logits(
    config, q_tile, k_tile, q_index, k_index, key_valid, segments, slopes, causal_mask
):
    """`[batch, heads, Cq, Ck]` float32 logits of one tile, -inf where a query may not attend,
    the causal rule's `[Cq, Ck]` allowed pairs (None without `causal_mask`), and the soft cap's
    slope at each logit (None without a cap).

    `q_tile` is already multiplied by the scale. `causal_mask` (static) applies the causal rule
    inside the tile; tiles wholly below the diagonal skip that work.
    """
    logits = _einsum_f32("bhqd,bhkd->bhqk", q_tile, k_tile)
    logits, cap_slope = soft_cap_with_slope(logits, config.soft_cap)
    if causal_mask or slopes is not None:
        query_pos = _query_positions(config, q_index)[:, None]
        key_pos = (k_index * config.key_chunk + jnp.arange(config.key_chunk))[None, :]
    if slopes is not None:
        distance = jnp.abs(query_pos - key_pos).astype(jnp.float32)
        logits = logits - slopes[None, :, :, None] * distance
    allowed = None
    if causal_mask:
        allowed = key_pos <= query_pos
    if segments is not None:
        # Packed documents: the tile's pairs within one segment, `[batch, 1, rows, Ck]`.
        q_ids = _chunk(segments[0], q_index, config.rows, axis=1)
        kv_ids = _chunk(segments[1], k_index, config.key_chunk, axis=1)
        same = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
        allowed = same if allowed is None else allowed & same
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    if key_valid is not None:
        valid = _chunk(key_valid, k_index, config.key_chunk, axis=1)
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    return logits, allowed, cap_slope


def _query_positions(config, q_index):
    """`[rows]` positions (in key coordinates) of query chunk `q_index`'s rows; each folded
    head of a group repeats the chunk's positions."""
    within = jnp.arange(config.rows) % config.query_chunk
    return q_index * config.query_chunk + config.offset + within


def _fold_heads(x, group, chunk):
    """`[batch, heads, length, d]` (length a multiple of `chunk`) -> `[batch, kv_heads,
    length * group, d]`: each chunk's rows for the group's heads side by side, (head, position)."""
    if group == 1:
        return x
    batch, heads, length, dim = x.shape
    x = x.reshape(batch, heads // group, group, length // chunk, chunk, dim)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, heads // group, -1, dim)


def _unfold_heads(x, group, chunk):
    """The inverse of `_fold_heads`."""
    if group == 1:
        return x
    batch, kv_heads, rows, dim = x.shape
    x = x.reshape(batch, kv_heads, rows // (group * chunk), group, chunk, dim)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads * group, -1, dim)


def _per_row(per_head, group, chunk, num_chunks=1):
    """`[heads]` (ALiBi slopes, sinks) -> the value at each folded row,
    `[kv_heads, num_chunks * group * chunk]`."""
    x = jnp.broadcast_to(
        per_head.reshape(-1, 1, group, 1), (per_head.size // group, num_chunks, group, chunk)
    )
    return x.reshape(x.shape[0], -1)


def _chunk(x, index, size, axis=2):
    """Chunk `index` of `size` positions along the length axis of x."""
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


# --- Forward --------------------------------------------------------------------------------


def _forward(config, q, k, v, key_valid, segments, slopes, sinks):
    """Output `[batch, heads, Lq, value_dim]` and log-sum-exp `[batch, heads, Lq]` (float32),
    sinks included.

    The log-sum-exp is +inf for a query with no valid key, so that the backward pass's
    exp(logit - lse) is 0 there rather than NaN.
    """
    batch, heads, _, _ = q.shape
    value_dim = v.shape[-1]
    cq, ck = config.rows, config.key_chunk
    q = (q.astype(jnp.float32) * config.scale).astype(q.dtype)

    def query_chunk_step(_, q_index):
        q_tile = _chunk(q, q_index, cq)

        def key_chunk_step(k_index, carry, causal_mask):
            partial = causal_mask or segments is not None  # some of the tile's pairs excluded
            row_max, row_sum, acc = carry
            logits, allowed, _ = _tile_logits(
                config,
                q_tile,
                _chunk(k, k_index, ck),
                q_index,
                k_index,
                key_valid,
                segments,
                slopes,
                causal_mask,
            )
            new_max = jnp.maximum(row_max, logits.max(axis=-1))
            # While a row has seen only masked keys its max is -inf; shift by 0 instead so that
            # exp(-inf - shift) is 0 rather than NaN.
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            probs = jnp.exp(logits - shift[..., None])
            correction = jnp.exp(row_max - shift)
            row_sum = row_sum * correction + probs.sum(axis=-1)
            v_tile = _chunk(v, k_index, ck)
            if partial and config.careful:  # a NaN value the tile excludes stays out
                values = masked_einsum("bhqk,bhkd->bhqd", probs, allowed, v_tile, jnp.float32)
            else:
                values = _einsum_f32("bhqk,bhkd->bhqd", probs.astype(v.dtype), v_tile)
            acc = acc * correction[..., None] + values
            return new_max, row_sum, acc

        init = varying_like(
            (q, k, v, key_valid, *(segments or ()), slopes, sinks),
            jnp.full((batch, heads, cq), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, cq), jnp.float32),
            jnp.zeros((batch, heads, cq, value_dim), jnp.float32),
        )
        unmasked_end, end = _key_chunk_ranges(config, q_index)
        carry = jax.lax.fori_loop(
            0, unmasked_end, functools.partial(key_chunk_step, causal_mask=False), init
        )
        if config.causal:
            carry = jax.lax.fori_loop(
                unmasked_end, end, functools.partial(key_chunk_step, causal_mask=True), carry
            )
        row_max, row_sum, acc = carry
        empty = row_sum == 0.0
        out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
        lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
        return None, (out, lse)

    _, (out, lse) = jax.lax.scan(query_chunk_step, None, jnp.arange(config.num_q_chunks))
    # [num_q_chunks, batch, heads, Cq, ...] -> [batch, heads, Lq, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, -1, value_dim)
    lse = jnp.moveaxis(lse, 0, 2).reshape(batch, heads, -1)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return out.astype(q.dtype), lse


# --- Backward -------------------------------------------------------------------------------


def _backward(config, q, k, v, key_valid, segments, slopes, sinks, out, lse, d_out):
    """Gradients for q, k, v (and the ALiBi slopes and the sinks) by recomputing each tile's
    probabilities.

    Loops over key chunks outside (accumulating dk, dv of that chunk) and query chunks inside
    (adding into a full-length dq), as FlashAttention-2 does.
    """
    batch, heads, _, head_dim = q.shape
    value_dim = v.shape[-1]
    cq, ck = config.rows, config.key_chunk
    inputs = (q, k, v, key_valid, *(segments or ()), slopes, sinks, lse, d_out)
    q_scaled = (q.astype(jnp.float32) * config.scale).astype(q.dtype)
    # D_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax Jacobian's row term.
    row_dot = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_out = d_out.astype(v.dtype)
    # dK^T = Q^T dS and dV^T = dO^T P are plain [dim, Cq] x [Cq, Ck] products when Q and dO are
    # stored as [.., dim, length]: XLA's CPU backend runs those faster than P^T dO, which
    # contracts the rows, and transposing q and dO once costs only O(length * dim).
    q_scaled_t = jnp.swapaxes(q_scaled, 2, 3)
    d_out_t = jnp.swapaxes(d_out, 2, 3)

    def key_chunk_step(carry, k_index):
        d_q, d_slopes = carry
        k_tile = _chunk(k, k_index, ck)
        v_tile = _chunk(v, k_index, ck)

        def query_chunk_step(q_index, inner, causal_mask):
            partial = causal_mask or segments is not None  # some of the tile's pairs excluded
            d_q, d_k_t, d_v_t, d_slopes = inner
            q_tile = _chunk(q_scaled, q_index, cq)
            d_out_tile = _chunk(d_out, q_index, cq)
            logits, allowed, cap_slope = _tile_logits(
                config, q_tile, k_tile, q_index, k_index, key_valid, segments, slopes, causal_mask
            )
            probs = jnp.exp(logits - _chunk(lse, q_index, cq)[..., None])
            if partial and config.careful:
                # A NaN row's excluded probabilities are exp(-inf - NaN): they are exactly 0.
                probs = jnp.where(allowed, probs, 0.0)
                d_v_t = d_v_t + masked_einsum(
                    "bhqk,bhqd->bhdk", probs, allowed, d_out_tile, jnp.float32
                )
            else:
                d_v_t = d_v_t + _einsum_f32(
                    "bhdq,bhqk->bhdk", _chunk(d_out_t, q_index, cq, axis=3), probs.astype(v.dtype)
                )
            d_probs = _einsum_f32("bhqd,bhkd->bhqk", d_out_tile, v_tile)
            d_logits = probs * (d_probs - _chunk(row_dot, q_index, cq)[..., None])
            if partial and config.careful:
                d_logits = jnp.where(allowed, d_logits, 0.0)
            if slopes is not None:
                query_pos = _query_positions(config, q_index)
                key_pos = k_index * ck + jnp.arange(ck)
                distance = jnp.abs(query_pos[:, None] - key_pos[None, :]).astype(jnp.float32)
                d_slopes = d_slopes - jnp.einsum("bhqk,qk->hq", d_logits, distance)
            if cap_slope is not None:  # ALiBi is added after the cap: its gradient is not capped
                d_logits = d_logits * cap_slope
            if partial and config.careful:  # dS K and dS^T Q over the allowed pairs only
                d_q_items = masked_einsum("bhqk,bhkd->bhqd", d_logits, allowed, k_tile, jnp.float32)
                d_k_items = masked_einsum("bhqk,bhqd->bhdk", d_logits, allowed, q_tile, jnp.float32)
            else:
                d_logits = d_logits.astype(q.dtype)
                d_q_items = _einsum_f32("bhqk,bhkd->bhqd", d_logits, k_tile)
                d_k_items = _einsum_f32(
                    "bhdq,bhqk->bhdk", _chunk(q_scaled_t, q_index, cq, axis=3), d_logits
                )
            d_q_tile = _chunk(d_q, q_index, cq) + d_q_items
            d_q = jax.lax.dynamic_update_slice_in_dim(d_q, d_q_tile, q_index * cq, axis=2)
            d_k_t = d_k_t + d_k_items
            return d_q, d_k_t, d_v_t, d_slopes

        d_k_t, d_v_t = varying_like(
            inputs,
            jnp.zeros((batch, heads, head_dim, ck), jnp.float32),
            jnp.zeros((batch, heads, value_dim, ck), jnp.float32),
        )
        start, unmasked_start = _query_chunk_ranges(config, k_index)
        carry = (d_q, d_k_t, d_v_t, d_slopes)
        if config.causal:
            carry = jax.lax.fori_loop(
                start, unmasked_start, functools.partial(query_chunk_step, causal_mask=True), carry
            )
        d_q, d_k_t, d_v_t, d_slopes = jax.lax.fori_loop(
            unmasked_start,
            config.num_q_chunks,
            functools.partial(query_chunk_step, causal_mask=False),
            carry,
        )
        return (d_q, d_slopes), (jnp.swapaxes(d_k_t, 2, 3), jnp.swapaxes(d_v_t, 2, 3))

    init = varying_like(
        inputs, jnp.zeros(q.shape, jnp.float32), jnp.zeros((heads, cq), jnp.float32)
    )
    (d_q, d_slopes), (d_k, d_v) = jax.lax.scan(
        key_chunk_step, init, jnp.arange(config.num_k_chunks)
    )
    d_k = jnp.moveaxis(d_k, 0, 2).reshape(k.shape)
    d_v = jnp.moveaxis(d_v, 0, 2).reshape(v.shape)
    # The scale was folded into q for the logits: dL/dq = scale * dL/d(q*scale), while dk got
    # q*scale already.
    d_q = d_q * config.scale
    return (
        d_q.astype(q.dtype),
        d_k.astype(k.dtype),
        d_v.astype(v.dtype),
        None if slopes is None else d_slopes,
        None if sinks is None else sink_gradient(sinks, lse, row_dot),
    )


# --- Custom VJP -----------------------------------------------------------------------------


# Finite inputs take the plain tiles: a product's excluded pairs have weight exactly 0, and
# 0 * finite = 0, so nothing excluded can reach the results. Inputs holding a NaN or inf take
# the careful tiles instead (`_Config.careful`); one check, linear in length, picks.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, key_valid, segments, slopes, sinks):
    out, _ = _either_forward(config, q, k, v, key_valid, segments, slopes, sinks)
    return out


def _either_forward(config, q, k, v, key_valid, segments, slopes, sinks):
    if not config.causal and segments is None:
        # Without partial tiles the careful tiles would be the plain ones.
        return _forward(config, q, k, v, key_valid, segments, slopes, sinks)
    plain = functools.partial(_forward, config)
    careful = functools.partial(_forward, config._replace(careful=True))
    return jax.lax.cond(
        all_finite(q, k, v), plain, careful, q, k, v, key_valid, segments, slopes, sinks
    )


def _attention_fwd(config, q, k, v, key_valid, segments, slopes, sinks):
    out, lse = _either_forward(config, q, k, v, key_valid, segments, slopes, sinks)
    return out, (q, k, v, key_valid, segments, slopes, sinks, out, lse)


def _attention_bwd(config, residuals, d_out):
    q, k, v, key_valid, segments, slopes, sinks, out, lse = residuals
    backward = functools.partial(_backward, config)
    if config.causal or segments is not None:  # else the careful tiles would be the plain ones
        careful = functools.partial(_backward, config._replace(careful=True))
        # d_out too: a NaN in it would reach dv through an excluded pair's zero probability.
        finite = all_finite(q, k, v, d_out)
        backward = functools.partial(jax.lax.cond, finite, backward, careful)
    d_q, d_k, d_v, d_slopes, d_sinks = backward(
        q, k, v, key_valid, segments, slopes, sinks, out, lse, d_out
    )
    # key_valid is boolean: its cotangent is None.
    return d_q, d_k, d_v, None, None, d_slopes, d_sinks


_attention.defvjp(_attention_fwd, _attention_bwd)
