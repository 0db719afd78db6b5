"""Block-sparse attention as XLA programs: a `lax.scan` over the plan's steps, with a custom VJP.

Each step gathers a few query blocks and their key/value blocks into dense
`[block_q, slots * block_kv]` products, masked only where a block is partial. Work is
proportional to the number of non-empty blocks, memory to the length. The backward pass walks
the same steps, recomputing each item's probabilities from the saved log-sum-exp, so it stores
nothing quadratic either. These schedules serve every backend; on CPU the fused kernel
(`cpu_kernel.py`) replaces them where it applies.

Non-finite inputs follow the dense reference (`dense.py`): the caller has zeroed padded keys and
values, excluded logits are selected (never added) to -inf, and in partial blocks the products
run over the allowed pairs only (`dense.masked_einsum`); a NaN row maximum is not "no key".
"""

import functools

import jax
import jax.numpy as jnp

from transformer.attention.block_sparse.plan import _ROWS_PER_CHAIN
from transformer.attention.dense import masked_einsum
from transformer.attention.shapes import varying_like
from transformer.attention.sinks import sink_gradient, with_sinks
from transformer.attention.soft_cap import soft_cap_with_slope


def _to_blocks(x, num_blocks, block):
    """`[batch, length, heads, d]` -> `[batch, heads, num_blocks, block, d]`, zero-padded."""
    batch, length, heads, dim = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    return x.reshape(batch, num_blocks, block, heads, dim).transpose(0, 3, 1, 2, 4)


def _from_blocks(x, length):
    """`[batch, heads, num_blocks, block, d]` -> `[batch, length, heads, d]`."""
    batch, heads, num_blocks, block, dim = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(batch, num_blocks * block, heads, dim)[:, :length]


def _item_logits(
    plan, needs_mask, q, k, key_bias, segments, slopes, q_block, kv_block, mask_id, soft_cap
):
    """Masked logits of one step's items: `[batch, heads, items, block_q, slots * block_kv]`,
    the allowed pairs, broadcasting to them (`[1 or batch, 1, items, block_q, slots *
    block_kv]`; None if every pair of the items is allowed: `needs_mask` False and no
    segments), and the soft cap's slope at each logit (None without a cap).

    q: `[batch, heads, num_q_blocks, block_q, d]`, already scaled; k: like it for keys;
    key_bias: `[batch, num_kv_blocks, block_kv]` (0 or -inf) or None; segments: None or the
    segment ids of each row and key, (`[batch, num_q_blocks, block_q]`, `[batch, num_kv_blocks,
    block_kv]`); slopes: each row's slope,
    `[heads, block_q]`, or None;
    soft_cap: c or None, applied before ALiBi and the masks.
    """
    items, slots = kv_block.shape
    logits = jnp.einsum("bhiqd,bhikd->bhiqk", _take(q, q_block), _take_kv(k, kv_block))
    logits, cap_slope = soft_cap_with_slope(logits, soft_cap)
    allowed = None
    if needs_mask:
        # Gathered straight into [items, block_q, slots, block_kv] order: no transpose.
        rows = jnp.arange(plan.block_q)[None, :, None]
        allowed = jnp.asarray(plan.block_masks)[mask_id[:, None, :], rows]
        allowed = allowed.reshape(items, plan.block_q, -1)
        logits = jnp.where(allowed, logits, -jnp.inf)
    if key_bias is not None:
        bias = jnp.take(key_bias, kv_block.reshape(-1), axis=1, mode="clip")
        # Selected, not added: NaN + -inf would be NaN.
        padded = jnp.isneginf(bias.reshape(key_bias.shape[0], 1, items, 1, -1))
        logits = jnp.where(padded, -jnp.inf, logits)
    if segments is not None:
        # Packed documents: a pair is allowed only within one segment. Part of `allowed`, so
        # that the products run over allowed pairs only (a NaN in another document stays out).
        q_segments, kv_segments = segments
        batch = q_segments.shape[0]
        same = (
            jnp.take(q_segments, q_block, axis=1, mode="clip")[:, :, :, None]
            == jnp.take(kv_segments, kv_block.reshape(-1), axis=1, mode="clip").reshape(
                batch, items, 1, -1
            )
        )[:, None]
        allowed = same if allowed is None else allowed[None, None] & same
        logits = jnp.where(allowed, logits, -jnp.inf)
    elif allowed is not None:
        allowed = allowed[None, None]
    if slopes is not None:
        # Rows of a grouped plan are (head in group, position): the position repeats per head.
        q_pos = q_block[:, None] * plan.query_block + jnp.arange(plan.block_q) % plan.query_block
        k_pos = (kv_block[:, :, None] * plan.block_kv + jnp.arange(plan.block_kv)).reshape(
            items, -1
        )
        distance = jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(logits.dtype)
        logits = logits - slopes[None, :, None, :, None] * distance
    return logits, allowed, cap_slope


def _flat_index(x, blocks):
    """Row indices into `x` flattened to `[batch * heads * num_blocks, ...]`, `[b, h, *blocks.shape]`.

    Indexing the flattened array makes the gathered blocks come out in `[batch, heads, ...]` order
    directly; `jnp.take` along axis 2 would gather index-major and then transpose.
    """
    batch, heads, num_blocks = x.shape[:3]
    offsets = jnp.arange(batch * heads).reshape(batch, heads, *[1] * blocks.ndim) * num_blocks
    return offsets + blocks


def _take(x, blocks):
    """`x[:, :, blocks]`: `[batch, heads, *blocks.shape, ...]`; a padding index reads the last block."""
    flat = x.reshape(-1, *x.shape[3:])
    return jnp.take(flat, _flat_index(x, jnp.minimum(blocks, x.shape[2] - 1)), axis=0, mode="clip")


def _product(spec, weights, allowed, operand):
    """`einsum(spec, weights, operand)`, over the pattern's allowed pairs only where some are not."""
    if allowed is None:
        return jnp.einsum(spec, weights, operand)
    return masked_einsum(spec, weights, allowed, operand)


def _take_kv(x, kv_block):
    """Key or value blocks of each item side by side: `[batch, heads, items, slots * block, d]`."""
    items, slots = kv_block.shape
    return _take(x, kv_block).reshape(*x.shape[:2], items, slots * x.shape[3], x.shape[-1])


def _put(x, blocks, values, *, add=False):
    """`x[:, :, blocks] = values` (or `+=`); padding indices (== num_blocks) are dropped."""
    index = jnp.where(
        blocks < x.shape[2], _flat_index(x, blocks), x.shape[0] * x.shape[1] * x.shape[2]
    )
    slots = x.reshape(-1, *x.shape[3:]).at[index]
    flat = slots.add(values, mode="drop") if add else slots.set(values, mode="drop")
    return flat.reshape(x.shape)


def _schedule_arrays(schedule):
    return (
        jnp.asarray(schedule.q_block),
        jnp.asarray(schedule.kv_block),
        jnp.asarray(schedule.mask_id),
    )


def _steps_to_blocks(x):
    """Scan outputs `[steps, batch, heads, items, ...]` -> `[batch, heads, steps * items, ...]`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _halves(items):
    """The step's items as two independent halves, or one piece if there are too few.

    XLA's CPU runtime runs independent operations concurrently: two chains of cache-sized
    products keep both cores busy, where one chain of small products runs on one. The halves are
    written out separately, never joined: joining them would copy every gradient block once more.
    """
    count = items[0].shape[0]
    if count < 2 * _ROWS_PER_CHAIN:
        return [items]
    half = count // 2
    return [tuple(x[:half] for x in items), tuple(x[half:] for x in items)]


def _put_halves(x, schedule, halves_out):
    """Writes a whole-row scan's per-half outputs `[steps, batch, heads, items, ...]` into `x`."""
    start = 0
    for values in halves_out:
        count = values.shape[3]
        x = _put(
            x, schedule.q_block[:, start : start + count].reshape(-1), _steps_to_blocks(values)
        )
        start += count
    return x


def _forward(plan, soft_cap, q, k, v, key_bias, segments, slopes):
    """Returns output blocks `[batch, heads, num_q_blocks, block_q, dv]` and log-sum-exp."""
    batch, heads = q.shape[:2]
    rows = (batch, heads, plan.num_q_blocks, plan.block_q)
    out = jnp.zeros(rows + (v.shape[-1],), q.dtype)
    # +inf log-sum-exp makes every probability of a keyless row exactly 0 in the backward pass.
    lse = jnp.full(rows, jnp.inf, q.dtype)
    for schedule in plan.schedules:
        if schedule.whole_rows:
            out, lse = _forward_rows(
                plan, soft_cap, schedule, q, k, v, key_bias, segments, slopes, out, lse
            )
        else:
            # Its rows are none of the others': zero output and +inf log-sum-exp elsewhere.
            items_out, items_lse = _forward_items(
                plan, soft_cap, schedule, q, k, v, key_bias, segments, slopes
            )
            out, lse = out + items_out, jnp.minimum(lse, items_lse)
    return out, lse


def softmax_rows(logits, values, allowed=None):
    """Attention over whole rows: logits `[..., q, keys]` (-inf where not allowed), values
    `[..., keys, dv]` -> output `[..., q, dv]` and log-sum-exp `[..., q]`, which is +inf where a
    row sees no key (its output is 0). `allowed` (broadcasting to the logits, or None for all)
    restricts the product with the values to the allowed pairs."""
    row_max = logits.max(-1)
    # A keyless row has max -inf; shift by 0 so exp() gives 0, not NaN. A NaN max has keys.
    has_key = ~jnp.isneginf(row_max)
    shift = jnp.where(has_key, row_max, 0.0)
    probs = jnp.exp(logits - shift[..., None])
    row_sum = probs.sum(-1)
    safe_sum = jnp.where(has_key, row_sum, 1.0)
    spec = "...qk,...kd->...qd"
    out = (
        jnp.einsum(spec, probs, values)
        if allowed is None
        else masked_einsum(spec, probs, allowed, values)
    )
    return out / safe_sum[..., None], jnp.where(has_key, shift + jnp.log(safe_sum), jnp.inf)


def _forward_rows(plan, soft_cap, schedule, q, k, v, key_bias, segments, slopes, out, lse):
    """Whole rows per item: one plain softmax per row, written into `out` and `lse` once."""

    def rows(q_block, kv_block, mask_id, needs_mask=schedule.needs_mask):
        logits, allowed, _ = _item_logits(
            plan, needs_mask, q, k, key_bias, segments, slopes, q_block, kv_block, mask_id, soft_cap
        )
        return softmax_rows(logits, _take_kv(v, kv_block), allowed)

    def step(_, items):
        return None, tuple(rows(*half) for half in _halves(items))

    _, halves = jax.lax.scan(step, None, _schedule_arrays(schedule))
    out = _put_halves(out, schedule, [items_out for items_out, _ in halves])
    lse = _put_halves(lse, schedule, [items_lse for _, items_lse in halves])
    return out, lse


def _forward_items(plan, soft_cap, schedule, q, k, v, key_bias, segments, slopes):
    """Pieces of rows per item, combined by online softmax (as in FlashAttention)."""
    batch, heads = q.shape[:2]
    rows = (batch, heads, plan.num_q_blocks, plan.block_q)
    init = varying_like(
        (q, k, v, key_bias, *(segments or ()), slopes),
        jnp.full(rows, -jnp.inf, q.dtype),
        jnp.zeros(rows, q.dtype),
        jnp.zeros(rows + (v.shape[-1],), q.dtype),
    )

    def step(carry, items):
        row_max, row_sum, acc = carry
        q_block, kv_block, mask_id = items
        logits, allowed, _ = _item_logits(
            plan,
            schedule.needs_mask,
            q,
            k,
            key_bias,
            segments,
            slopes,
            q_block,
            kv_block,
            mask_id,
            soft_cap,
        )
        old_max = _take(row_max, q_block)
        new_max = jnp.maximum(old_max, logits.max(-1))
        # A row that has seen only masked keys keeps max -inf; shift by 0 so exp() gives 0, not NaN.
        shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
        probs = jnp.exp(logits - shift[..., None])
        rescale = jnp.exp(old_max - shift)
        new_sum = _take(row_sum, q_block) * rescale + probs.sum(-1)
        new_acc = _take(acc, q_block) * rescale[..., None] + _product(
            "bhiqk,bhikd->bhiqd", probs, allowed, _take_kv(v, kv_block)
        )
        carry = (
            _put(row_max, q_block, new_max),
            _put(row_sum, q_block, new_sum),
            _put(acc, q_block, new_acc),
        )
        return carry, None

    (row_max, row_sum, acc), _ = jax.lax.scan(step, init, _schedule_arrays(schedule))
    # Not row_sum > 0: a NaN row (NaN or +inf logits) has keys and gives NaN, not zeros.
    has_key = ~jnp.isneginf(row_max)
    out = jnp.where(has_key[..., None], acc / jnp.where(has_key, row_sum, 1.0)[..., None], 0.0)
    # +inf log-sum-exp makes every probability of a keyless row exactly 0 in the backward pass.
    lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, row_sum, 1.0)), jnp.inf)
    return out, lse


def _backward(plan, soft_cap, q, k, v, key_bias, segments, slopes, out, lse, d_out):
    # An einsum, not (d_out * out).sum(-1): the einsum is a dot_general, which XLA's CPU backend
    # runs far faster than that fused multiply-and-reduce.
    delta = jnp.einsum("bhiqd,bhiqd->bhiq", d_out, out)  # [batch, heads, num_q_blocks, block_q]
    # dK^T = Q^T dS and dV^T = dO^T P are plain matmuls when Q and dO are stored transposed,
    # [.., dim, block]; XLA's CPU backend runs P^T dO (contracting the rows) far slower. dK and dV
    # are accumulated transposed too, `[batch, heads, num_kv_blocks, dim, block_kv]`, so that
    # writing an item's blocks moves whole rows of floats, and are transposed once at the end.
    q_t, d_out_t = jnp.swapaxes(q, -1, -2), jnp.swapaxes(d_out, -1, -2)
    dq, dk_t, dv_t = varying_like(
        (q, k, v, key_bias, *(segments or ()), slopes, d_out),
        jnp.zeros_like(q),
        jnp.zeros_like(jnp.swapaxes(k, -1, -2)),
        jnp.zeros_like(jnp.swapaxes(v, -1, -2)),
    )

    for schedule in plan.schedules:

        def item_grads(q_block, kv_block, mask_id, needs_mask=schedule.needs_mask):
            """dQ of the items' query blocks; dK^T, dV^T of their key blocks `[.., slots, d, block]`."""
            logits, allowed, cap_slope = _item_logits(
                plan,
                needs_mask,
                q,
                k,
                key_bias,
                segments,
                slopes,
                q_block,
                kv_block,
                mask_id,
                soft_cap,
            )
            probs = jnp.exp(logits - _take(lse, q_block)[..., None])
            d_probs = jnp.einsum("bhiqd,bhikd->bhiqk", _take(d_out, q_block), _take_kv(v, kv_block))
            d_logits = probs * (d_probs - _take(delta, q_block)[..., None])
            if cap_slope is not None:
                d_logits = d_logits * cap_slope
            if allowed is None:
                dv_items = jnp.einsum("bhidq,bhiqk->bhidk", _take(d_out_t, q_block), probs)
                dq_items = jnp.einsum("bhiqk,bhikd->bhiqd", d_logits, _take_kv(k, kv_block))
                dk_items = jnp.einsum("bhidq,bhiqk->bhidk", _take(q_t, q_block), d_logits)
            else:
                # Over the allowed pairs only: a NaN row's excluded probabilities are
                # exp(-inf - NaN), and a NaN key or query an excluded pair holds stays out.
                mask = allowed
                probs = jnp.where(mask, probs, 0.0)
                d_logits = jnp.where(mask, d_logits, 0.0)
                dv_items = masked_einsum("bhiqk,bhiqd->bhidk", probs, mask, _take(d_out, q_block))
                dq_items = masked_einsum(
                    "bhiqk,bhikd->bhiqd", d_logits, mask, _take_kv(k, kv_block)
                )
                dk_items = masked_einsum("bhiqk,bhiqd->bhidk", d_logits, mask, _take(q, q_block))
            # [batch, heads, items, dim, slots * block] -> [batch, heads, items, slots, dim, block]
            to_slots = lambda x: jnp.swapaxes(
                x.reshape(*x.shape[:4], kv_block.shape[1], plan.block_kv), 3, 4
            )
            return dq_items, to_slots(dk_items), to_slots(dv_items)

        if schedule.whole_rows:
            # Each row's dQ is complete in its step: an output, written once.
            def step(carry, items, item_grads=item_grads):
                dk_t, dv_t = carry
                dq_halves = []
                for half in _halves(items):
                    dq_items, dk_items, dv_items = item_grads(*half)
                    dk_t = _put(dk_t, half[1], dk_items, add=True)
                    dv_t = _put(dv_t, half[1], dv_items, add=True)
                    dq_halves.append(dq_items)
                return (dk_t, dv_t), tuple(dq_halves)

            (dk_t, dv_t), dq_halves = jax.lax.scan(step, (dk_t, dv_t), _schedule_arrays(schedule))
            dq = _put_halves(dq, schedule, dq_halves)
        else:

            def step(carry, items, item_grads=item_grads):
                dq, dk_t, dv_t = carry
                q_block, kv_block, _ = items
                dq_items, dk_items, dv_items = item_grads(*items)
                return (
                    _put(dq, q_block, dq_items, add=True),
                    _put(dk_t, kv_block, dk_items, add=True),
                    _put(dv_t, kv_block, dv_items, add=True),
                ), None

            (dq, dk_t, dv_t), _ = jax.lax.scan(step, (dq, dk_t, dv_t), _schedule_arrays(schedule))
    return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


@functools.lru_cache(maxsize=32)
def attention_fn(plan, soft_cap=None):
    """The custom-VJP attention over blocks for one plan (NumPy constants closed over) and soft
    cap (a float or None): `attention(q, k, v, key_bias, segments, slopes, sinks)`, segments
    None or (q, kv) segment ids per row and key (`_item_logits`), slopes (ALiBi, per
    row) `[heads, block_q]` or None, sinks `[heads]` or per row `[heads, 1, block_q]`, or None.
    A grouped plan (`plan.grouped`) takes q `[batch, kv_heads, num_q_blocks, block_q, d]` with
    its rows folded, and k, v of kv_heads heads."""

    def forward_with_sinks(q, k, v, key_bias, segments, slopes, sinks):
        out, lse = _forward(plan, soft_cap, q, k, v, key_bias, segments, slopes)
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        return out, lse

    @jax.custom_vjp
    def attention(q, k, v, key_bias, segments, slopes, sinks):
        return forward_with_sinks(q, k, v, key_bias, segments, slopes, sinks)[0]

    def forward(q, k, v, key_bias, segments, slopes, sinks):
        out, lse = forward_with_sinks(q, k, v, key_bias, segments, slopes, sinks)
        return out, (q, k, v, key_bias, segments, slopes, sinks, out, lse)

    def backward(residuals, d_out):
        q, k, v, key_bias, segments, slopes, sinks, out, lse = residuals
        dq, dk, dv = _backward(plan, soft_cap, q, k, v, key_bias, segments, slopes, out, lse, d_out)
        d_sinks = None
        if sinks is not None:
            d_sinks = sink_gradient(sinks, lse, jnp.einsum("bhiqd,bhiqd->bhiq", d_out, out))
        # Padding and ALiBi slopes are not trained: zero cotangents.
        zeros = lambda x: None if x is None else jnp.zeros_like(x)
        return dq, dk, dv, zeros(key_bias), None, zeros(slopes), d_sinks

    attention.defvjp(forward, backward)
    return attention
