"""Block-sparse attention: computes only the blocks of the score matrix that the pattern needs.

The pattern's block layout says which (query block, key block) pairs are non-empty. Each query
block's non-empty key blocks are cut into work items of `slots` key blocks; an item gathers its
query block and its key/value blocks into one dense `[block_q, slots * block_kv]` computation,
masked only where a block is partial. Items are dealt round-robin onto the steps of a `lax.scan`
so that no two items of one step share a query block: each step updates its rows' online-softmax
accumulators (max, sum, output, as in FlashAttention) with one scatter. Work is proportional to
the number of non-empty blocks, memory to the length.

The backward pass (a custom VJP) walks the same steps, recomputing each item's probabilities from
the saved log-sum-exp, so it stores nothing quadratic either.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer.patterns import EMPTY, FULL

# Scores of one scan step stay under this many elements (per batch element and head): enough work
# per step to amortise the loop, little enough to stay in cache-friendly sizes.
_SCORES_PER_STEP = 256 * 1024


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class Plan:
    """Which blocks each scan step computes; NumPy, built once per (pattern, shapes).

    Shapes: `[steps, items]` for query blocks, `[steps, items, slots]` for key blocks and mask ids.
    A query block index of `num_q_blocks` marks a padding item, whose writes are dropped; mask id
    0 means all-allowed (a full block), 1 nothing allowed (a padding slot).
    """
    block_q: int
    block_kv: int
    num_q_blocks: int
    num_kv_blocks: int
    q_block: np.ndarray
    kv_block: np.ndarray
    mask_id: np.ndarray
    block_masks: np.ndarray  # [num_masks, block_q, block_kv] bool
    computed_blocks: int  # non-empty (query block, key block) pairs

    @property
    def needs_mask(self):
        return bool((self.mask_id != 0).any())


def _partial_block_masks(pattern, q_len, kv_len, block_q, block_kv, q_blocks, kv_blocks):
    """`[n, block_q, block_kv]` exact masks of the given blocks; positions past the lengths are False."""
    q_pos = q_blocks[:, None, None] * block_q + np.arange(block_q)[None, :, None]
    k_pos = kv_blocks[:, None, None] * block_kv + np.arange(block_kv)[None, None, :]
    in_range = (q_pos < q_len) & (k_pos < kv_len)
    allowed = pattern.allows(np.minimum(q_pos, q_len - 1), np.minimum(k_pos, kv_len - 1),
                             q_len, kv_len)
    return allowed & in_range


def _choose_slots(counts):
    """Key blocks per item: few padding slots, but not so few that accumulator traffic dominates."""
    def cost(slots):
        items = -(-counts // slots)
        return (items * slots).sum() + 0.5 * items.sum()
    return min((1, 2, 4, 8, 16), key=cost)


@functools.lru_cache(maxsize=32)
def make_plan(pattern, q_len, kv_len, block_q, block_kv):
    """The scan schedule for `pattern` at these lengths and block sizes (cached)."""
    layout = pattern.block_layout(q_len, kv_len, block_q, block_kv)
    num_q_blocks, num_kv_blocks = layout.shape
    # Classify partial blocks exactly: the layout may call a block partial when it is full or empty.
    q_idx, kv_idx = np.nonzero(layout != EMPTY)
    mask_id = np.zeros(len(q_idx), np.int64)
    masks = [np.ones((block_q, block_kv), bool), np.zeros((block_q, block_kv), bool)]
    partial = layout[q_idx, kv_idx] != FULL
    if partial.any():
        block_masks = _partial_block_masks(pattern, q_len, kv_len, block_q, block_kv,
                                           q_idx[partial], kv_idx[partial])
        unique, inverse = np.unique(block_masks.reshape(len(block_masks), -1), axis=0,
                                    return_inverse=True)
        unique = unique.reshape(-1, block_q, block_kv)
        # Ids 0 and 1 are the all-True and all-False masks; the rest are the distinct partial ones.
        remap = np.where(unique.all((1, 2)), 0, np.where(~unique.any((1, 2)), 1,
                                                             2 + np.arange(len(unique))))
        mask_id[partial] = remap[inverse.reshape(-1)]
        masks += list(unique)
    keep = mask_id != 1
    q_idx, kv_idx, mask_id = q_idx[keep], kv_idx[keep], mask_id[keep]
    used = np.unique(mask_id)
    masks = np.stack(masks)
    # Renumber mask ids densely, keeping 0 and 1 in place.
    used = np.union1d([0, 1], used)
    renumber = np.zeros(len(masks), np.int64)
    renumber[used] = np.arange(len(used))
    mask_id, masks = renumber[mask_id], masks[used]

    counts = np.bincount(q_idx, minlength=num_q_blocks)
    slots = _choose_slots(counts[counts > 0]) if len(q_idx) else 1
    # Items: each row's key blocks (in order) cut into groups of `slots`, padded with slot id 1.
    row_start = np.concatenate([[0], np.cumsum(counts)])
    items_per_row = -(-counts // slots)
    num_items = max(int(items_per_row.sum()), 1)
    item_q = np.repeat(np.arange(num_q_blocks), items_per_row)
    item_first = np.concatenate([np.arange(0, c, slots) for c in counts if c] or [np.zeros(0, int)])
    item_row_end = np.repeat(row_start[1:], items_per_row)
    entry = (np.repeat(row_start[:-1], items_per_row) + item_first)[:, None] + np.arange(slots)
    valid = entry < item_row_end[:, None]
    entry = np.where(valid, entry, 0)
    item_kv = np.where(valid, kv_idx[entry] if len(kv_idx) else 0, 0)
    item_mask = np.where(valid, mask_id[entry] if len(mask_id) else 1, 1)
    if not len(q_idx):
        item_q, item_kv, item_mask = (np.full(1, num_q_blocks), np.zeros((1, slots), int),
                                      np.ones((1, slots), int))

    # Round-robin the items onto steps: a row's items are consecutive and no more than `steps`,
    # so they land on distinct steps.
    max_items = max(1, _SCORES_PER_STEP // (slots * block_q * block_kv))
    steps = max(int(items_per_row.max(initial=1)), -(-num_items // max_items))
    per_step = -(-num_items // steps)
    total = steps * per_step
    pad = total - num_items
    item_q = np.concatenate([item_q, np.full(pad, num_q_blocks)])
    item_kv = np.concatenate([item_kv, np.zeros((pad, slots), int)])
    item_mask = np.concatenate([item_mask, np.ones((pad, slots), int)])
    # Item t goes to step t % steps, position t // steps.
    order = lambda a: a.reshape(per_step, steps, *a.shape[1:]).swapaxes(0, 1)
    return Plan(block_q, block_kv, num_q_blocks, num_kv_blocks,
                order(item_q).astype(np.int32), order(item_kv).astype(np.int32),
                order(item_mask).astype(np.int32), masks, int(len(q_idx)))


def _to_blocks(x, num_blocks, block):
    """`[batch, length, heads, d]` -> `[batch, heads, num_blocks, block, d]`, zero-padded."""
    batch, length, heads, dim = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    return x.reshape(batch, num_blocks, block, heads, dim).transpose(0, 3, 1, 2, 4)


def _from_blocks(x, length):
    """`[batch, heads, num_blocks, block, d]` -> `[batch, length, heads, d]`."""
    batch, heads, num_blocks, block, dim = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(batch, num_blocks * block, heads, dim)[:, :length]


def _item_logits(plan, q, k, key_bias, slopes, q_block, kv_block, mask_id):
    """Masked logits of one step's items: `[batch, heads, items, block_q, slots * block_kv]`.

    q: `[batch, heads, num_q_blocks, block_q, d]`, already scaled; k: like it for keys;
    key_bias: `[batch, num_kv_blocks, block_kv]` (0 or -inf) or None; slopes: `[heads]` or None.
    """
    items, slots = kv_block.shape
    logits = jnp.einsum("bhiqd,bhikd->bhiqk", _take(q, q_block), _take_kv(k, kv_block))
    if plan.needs_mask:
        # Gathered straight into [items, block_q, slots, block_kv] order: no transpose.
        rows = jnp.arange(plan.block_q)[None, :, None]
        allowed = jnp.asarray(plan.block_masks)[mask_id[:, None, :], rows]
        logits = jnp.where(allowed.reshape(items, plan.block_q, -1), logits, -jnp.inf)
    if key_bias is not None:
        bias = jnp.take(key_bias, kv_block.reshape(-1), axis=1, mode="clip")
        logits = logits + bias.reshape(key_bias.shape[0], 1, items, 1, slots * plan.block_kv)
    if slopes is not None:
        q_pos = q_block[:, None] * plan.block_q + jnp.arange(plan.block_q)
        k_pos = (kv_block[:, :, None] * plan.block_kv + jnp.arange(plan.block_kv)).reshape(items, -1)
        distance = jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(logits.dtype)
        logits = logits - slopes[None, :, None, None, None] * distance
    return logits


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


def _take_kv(x, kv_block):
    """Key or value blocks of each item side by side: `[batch, heads, items, slots * block, d]`."""
    items, slots = kv_block.shape
    return _take(x, kv_block).reshape(*x.shape[:2], items, slots * x.shape[3], x.shape[-1])


def _put(x, blocks, values, *, add=False):
    """`x[:, :, blocks] = values` (or `+=`); padding indices (== num_blocks) are dropped."""
    index = jnp.where(blocks < x.shape[2], _flat_index(x, blocks), x.shape[0] * x.shape[1] * x.shape[2])
    slots = x.reshape(-1, *x.shape[3:]).at[index]
    flat = slots.add(values, mode="drop") if add else slots.set(values, mode="drop")
    return flat.reshape(x.shape)


def _varying_like(arrays, inits):
    """Marks scan carries as varying over the mesh axes the inputs vary over (inside shard_map).

    Fresh zeros are replicated across the mesh while the carries they become are per-device;
    outside `jax.shard_map` this is a no-op.
    """
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays if a is not None))
    marked = []
    for x in inits:
        missing = tuple(sorted(axes - jax.typeof(x).mat.varying))
        marked.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(marked)


def _forward(plan, q, k, v, key_bias, slopes):
    """Returns output blocks `[batch, heads, num_q_blocks, block_q, dv]` and log-sum-exp."""
    batch, heads = q.shape[:2]
    rows = (batch, heads, plan.num_q_blocks, plan.block_q)
    init = _varying_like((q, k, v, key_bias, slopes), (
        jnp.full(rows, -jnp.inf, q.dtype), jnp.zeros(rows, q.dtype),
        jnp.zeros(rows + (v.shape[-1],), q.dtype)))

    def step(carry, schedule):
        row_max, row_sum, acc = carry
        q_block, kv_block, mask_id = schedule
        logits = _item_logits(plan, q, k, key_bias, slopes, q_block, kv_block, mask_id)
        old_max = _take(row_max, q_block)
        new_max = jnp.maximum(old_max, logits.max(-1))
        # A row that has seen only masked keys keeps max -inf; shift by 0 so exp() gives 0, not NaN.
        shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
        probs = jnp.exp(logits - shift[..., None])
        rescale = jnp.exp(old_max - shift)
        new_sum = _take(row_sum, q_block) * rescale + probs.sum(-1)
        new_acc = (_take(acc, q_block) * rescale[..., None]
                   + jnp.einsum("bhiqk,bhikd->bhiqd", probs, _take_kv(v, kv_block)))
        carry = (_put(row_max, q_block, new_max), _put(row_sum, q_block, new_sum),
                 _put(acc, q_block, new_acc))
        return carry, None

    schedule = (jnp.asarray(plan.q_block), jnp.asarray(plan.kv_block), jnp.asarray(plan.mask_id))
    (row_max, row_sum, acc), _ = jax.lax.scan(step, init, schedule)
    has_key = row_sum > 0
    out = jnp.where(has_key[..., None], acc / jnp.where(has_key, row_sum, 1.0)[..., None], 0.0)
    # +inf log-sum-exp makes every probability of a keyless row exactly 0 in the backward pass.
    lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, row_sum, 1.0)), jnp.inf)
    return out, lse


def _backward(plan, q, k, v, key_bias, slopes, out, lse, d_out):
    delta = (d_out * out).sum(-1)  # [batch, heads, num_q_blocks, block_q]
    init = _varying_like((q, k, v, key_bias, slopes, d_out),
                         (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)))
    # dK^T = Q^T dS and dV^T = dO^T P are plain matmuls when Q and dO are stored transposed,
    # [.., dim, block]; XLA's CPU backend runs P^T dO (contracting the rows) far slower.
    q_t, d_out_t = jnp.swapaxes(q, -1, -2), jnp.swapaxes(d_out, -1, -2)

    def step(carry, schedule):
        dq, dk, dv = carry
        q_block, kv_block, mask_id = schedule
        logits = _item_logits(plan, q, k, key_bias, slopes, q_block, kv_block, mask_id)
        probs = jnp.exp(logits - _take(lse, q_block)[..., None])
        dv_t = jnp.einsum("bhidq,bhiqk->bhidk", _take(d_out_t, q_block), probs)
        d_probs = jnp.einsum("bhiqd,bhikd->bhiqk", _take(d_out, q_block), _take_kv(v, kv_block))
        d_logits = probs * (d_probs - _take(delta, q_block)[..., None])
        dq_items = jnp.einsum("bhiqk,bhikd->bhiqd", d_logits, _take_kv(k, kv_block))
        dk_t = jnp.einsum("bhidq,bhiqk->bhidk", _take(q_t, q_block), d_logits)
        # [batch, heads, items, dim, slots * block] -> [batch, heads, items, slots, block, dim]
        to_slots = lambda x: jnp.swapaxes(x, -1, -2).reshape(
            *x.shape[:3], *kv_block.shape[1:], plan.block_kv, x.shape[3])
        carry = (_put(dq, q_block, dq_items, add=True),
                 _put(dk, kv_block, to_slots(dk_t), add=True),
                 _put(dv, kv_block, to_slots(dv_t), add=True))
        return carry, None

    schedule = (jnp.asarray(plan.q_block), jnp.asarray(plan.kv_block), jnp.asarray(plan.mask_id))
    (dq, dk, dv), _ = jax.lax.scan(step, init, schedule)
    return dq, dk, dv


@functools.lru_cache(maxsize=32)
def _attention_fn(plan):
    """The custom-VJP attention over blocks for one plan (NumPy constants closed over)."""

    @jax.custom_vjp
    def attention(q, k, v, key_bias, slopes):
        return _forward(plan, q, k, v, key_bias, slopes)[0]

    def forward(q, k, v, key_bias, slopes):
        out, lse = _forward(plan, q, k, v, key_bias, slopes)
        return out, (q, k, v, key_bias, slopes, out, lse)

    def backward(residuals, d_out):
        q, k, v, key_bias, slopes, out, lse = residuals
        dq, dk, dv = _backward(plan, q, k, v, key_bias, slopes, out, lse, d_out)
        # Padding and ALiBi slopes are not trained: zero cotangents.
        zeros = lambda x: None if x is None else jnp.zeros_like(x)
        return dq, dk, dv, zeros(key_bias), zeros(slopes)

    attention.defvjp(forward, backward)
    return attention


def block_sparse_attention(query, key, value, *, pattern, key_valid=None, scale=None,
                           alibi_slopes=None, block_q=64, block_kv=None):
    """Attention over the non-empty blocks of `pattern` only; exact, forward and backward.

    Args:
      query: `[batch, q_len, heads, head_dim]`; any length (padded internally to the block).
      key: `[batch, kv_len, heads, head_dim]`.
      value: `[batch, kv_len, heads, value_dim]`.
      pattern: a `transformer.patterns` pattern.
      key_valid: bool `[batch, kv_len]`, False at padded keys, or None.
      scale: multiplies the logits; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]`; adds -slope * |i - j|, computed block by block.
      block_q, block_kv: block sizes; block_kv defaults to block_q.

    Returns:
      `[batch, q_len, heads, value_dim]`; zeros for queries with no allowed key.
    """
    block_kv = block_q if block_kv is None else block_kv
    q_len, kv_len = query.shape[1], key.shape[1]
    plan = make_plan(pattern, q_len, kv_len, block_q, block_kv)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = _to_blocks(query.astype(dtype) * scale, plan.num_q_blocks, block_q)
    k = _to_blocks(key.astype(dtype), plan.num_kv_blocks, block_kv)
    v = _to_blocks(value.astype(dtype), plan.num_kv_blocks, block_kv)
    key_bias = None
    if key_valid is not None:
        padded = jnp.pad(key_valid, ((0, 0), (0, plan.num_kv_blocks * block_kv - kv_len)))
        key_bias = jnp.where(padded, 0.0, -jnp.inf).astype(dtype).reshape(
            key_valid.shape[0], plan.num_kv_blocks, block_kv)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, dtype)
    out = _attention_fn(plan)(q, k, v, key_bias, slopes)
    return _from_blocks(out, q_len).astype(query.dtype)
