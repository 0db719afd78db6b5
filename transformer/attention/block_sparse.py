"""Block-sparse attention: computes only the blocks of the score matrix that the pattern needs.

The pattern's block layout says which (query block, key block) pairs are non-empty; the plan
walks them in a `lax.scan`, each step gathering a few query blocks and their key/value blocks
into dense `[block_q, slots * block_kv]` products, masked only where a block is partial. Work is
proportional to the number of non-empty blocks, memory to the length.

Two kinds of schedule, both derived from the layout alone:
- whole rows: when most query blocks need about the same number of key blocks (sliding windows,
  random blocks, BigBird without its anchor rows), rows are grouped by that number and each step
  computes a couple of complete rows: a plain softmax, nothing carried between steps, and each
  step's products small enough to stay in cache;
- row pieces: other rows (causal layouts, BigBird's anchor rows that see every key) are cut into
  items of `slots` key blocks dealt onto steps so that no two items of a step share a row, and
  combined by online softmax (max, sum, output, as in FlashAttention).

The backward pass (a custom VJP) walks the same steps, recomputing each item's probabilities from
the saved log-sum-exp, so it stores nothing quadratic either.

Dense rows, whose queries see every key (BigBird's anchor rows), are not scheduled at all: they go
to chunked attention, whose large tiles run at several times the FLOP rate of block-sized pieces.

On CPU all of this is replaced, where it applies, by a fused kernel (`block_sparse_cpu`) that
walks the same non-empty blocks row by row (`Plan.row_blocks`), dense rows included, at about
twice the speed; the XLA schedules serve other backends and inputs the kernel does not take.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention import block_sparse_cpu
from transformer.attention.chunked import chunked_attention
from transformer.attention.shapes import varying_like
from transformer.patterns import EMPTY, FULL

# Scores of one scan step stay under this many elements (per batch element and head): enough work
# per step to amortise the loop, little enough to stay in cache-friendly sizes.
_SCORES_PER_STEP = 256 * 1024
# The same for steps of whole rows, which keep no accumulators between steps: small enough that a
# step's scores stay in cache (on CPU, 1M-element steps ran at half the FLOP rate of these).
_ROW_SCORES_PER_STEP = 64 * 1024
# A step of at least twice this many rows is computed as two independent halves (`_halves`).
_ROWS_PER_CHAIN = 1
# Whole-row schedules are used when padding rows to their group's longest adds at most this
# fraction of work.
_MAX_ROW_PADDING = 1.1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which blocks each scan step computes: `[steps, items]` query blocks, `[steps, items,
    slots]` key blocks and mask ids. A query block index of `num_q_blocks` marks a padding item,
    whose writes are dropped; mask id 0 means all-allowed (a full block), 1 nothing allowed (a
    padding slot)."""

    q_block: np.ndarray
    kv_block: np.ndarray
    mask_id: np.ndarray
    whole_rows: bool  # each item is one query block with all its key blocks

    @property
    def needs_mask(self):
        return bool((self.mask_id != 0).any())


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class Plan:
    """How to walk a pattern's non-empty blocks; NumPy, built once per (pattern, shapes).

    Each query block (row) belongs to one schedule. When rows need about the same number of key
    blocks, they are grouped by that number and each item of a group's schedule is a whole row,
    so each step finishes its rows' softmax. Rows too wide for one step (BigBird's anchor rows)
    and layouts whose rows differ too much (causal) go to a schedule whose items are pieces of
    rows, combined by online softmax.
    """

    block_q: int
    block_kv: int
    num_q_blocks: int
    num_kv_blocks: int
    schedules: tuple
    block_masks: np.ndarray  # [num_masks, block_q, block_kv] bool
    computed_blocks: int  # non-empty (query block, key block) pairs, dense rows included
    dense_q_blocks: np.ndarray  # query blocks left to chunked attention (they see every key)
    # The scheduled blocks row by row, for the fused CPU kernel: (rows, row_start, kv_block,
    # mask_id), row r's key blocks being kv_block[row_start[r]:row_start[r + 1]].
    row_blocks: tuple

    @property
    def kv_block(self):
        """Every scheduled key block (padding slots included), flat."""
        return np.concatenate([s.kv_block.reshape(-1) for s in self.schedules] + [np.zeros(0, int)])

    @property
    def mask_id(self):
        """The mask id of every scheduled key block, flat like `kv_block`."""
        return np.concatenate([s.mask_id.reshape(-1) for s in self.schedules] + [np.zeros(0, int)])


def _partial_block_masks(pattern, q_len, kv_len, block_q, block_kv, q_blocks, kv_blocks):
    """`[n, block_q, block_kv]` exact masks of the given blocks; positions past the lengths are False."""
    q_pos = q_blocks[:, None, None] * block_q + np.arange(block_q)[None, :, None]
    k_pos = kv_blocks[:, None, None] * block_kv + np.arange(block_kv)[None, None, :]
    in_range = (q_pos < q_len) & (k_pos < kv_len)
    allowed = pattern.allows(
        np.minimum(q_pos, q_len - 1), np.minimum(k_pos, kv_len - 1), q_len, kv_len
    )
    return allowed & in_range


def _non_empty_blocks(pattern, q_len, kv_len, block_q, block_kv):
    """Row-major (query block, key block, mask id) of the non-empty blocks, and the masks."""
    layout = pattern.block_layout(q_len, kv_len, block_q, block_kv)
    # Classify partial blocks exactly: the layout may call a block partial when it is full or empty.
    q_idx, kv_idx = np.nonzero(layout != EMPTY)
    mask_id = np.zeros(len(q_idx), np.int64)
    masks = [np.ones((block_q, block_kv), bool), np.zeros((block_q, block_kv), bool)]
    partial = layout[q_idx, kv_idx] != FULL
    if partial.any():
        block_masks = _partial_block_masks(
            pattern, q_len, kv_len, block_q, block_kv, q_idx[partial], kv_idx[partial]
        )
        unique, inverse = np.unique(
            block_masks.reshape(len(block_masks), -1), axis=0, return_inverse=True
        )
        unique = unique.reshape(-1, block_q, block_kv)
        # Ids 0 and 1 are the all-True and all-False masks; the rest are the distinct partial ones.
        remap = np.where(
            unique.all((1, 2)), 0, np.where(~unique.any((1, 2)), 1, 2 + np.arange(len(unique)))
        )
        mask_id[partial] = remap[inverse.reshape(-1)]
        masks += list(unique)
    keep = mask_id != 1
    q_idx, kv_idx, mask_id = q_idx[keep], kv_idx[keep], mask_id[keep]
    masks = np.stack(masks)
    # Renumber mask ids densely, keeping 0 and 1 in place.
    used = np.union1d([0, 1], np.unique(mask_id))
    renumber = np.zeros(len(masks), np.int64)
    renumber[used] = np.arange(len(used))
    return q_idx, kv_idx, renumber[mask_id], masks[used]


def _dense_rows(q_len, kv_len, block_q, block_kv, q_idx, kv_idx, mask_id, masks):
    """Query blocks whose every query may attend to every key (positions past the lengths aside)."""
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
    candidate = np.bincount(q_idx, minlength=num_q_blocks) == num_kv_blocks
    chosen = candidate[q_idx]
    q_blocks, kv_blocks, ids = q_idx[chosen], kv_idx[chosen], mask_id[chosen]
    # Inside the lengths a block must be all-allowed (mask 0); a block on the edge must allow
    # exactly its positions inside the lengths.
    edge = ((q_blocks + 1) * block_q > q_len) | ((kv_blocks + 1) * block_kv > kv_len)
    allowed_all = ids == 0
    if edge.any():
        q_pos = q_blocks[edge, None, None] * block_q + np.arange(block_q)[None, :, None]
        k_pos = kv_blocks[edge, None, None] * block_kv + np.arange(block_kv)[None, None, :]
        in_range = (q_pos < q_len) & (k_pos < kv_len)
        allowed_all[edge] = (masks[ids[edge]] == in_range).all((1, 2))
    return np.setdiff1d(np.nonzero(candidate)[0], q_blocks[~allowed_all])


def _choose_slots(counts):
    """Key blocks per item: few padding slots, but not so few that accumulator traffic dominates."""

    def cost(slots):
        items = -(-counts // slots)
        return (items * slots).sum() + 0.5 * items.sum()

    return min((1, 2, 4, 8, 16), key=cost)


def _row_groups(counts):
    """Split the non-empty rows into (at most) two groups by count, or None if that pads too much.

    Each group is padded to its longest row; BigBird-like layouts (a few dense anchor rows, the
    rest with about the same number of blocks) pad little, causal-like ones (every count from 1
    to n) too much, and go to the item schedule instead.
    """
    rows = np.nonzero(counts)[0]
    if not len(rows):
        return None
    rows = rows[np.argsort(counts[rows], kind="stable")]
    ordered = counts[rows]
    # Split s: rows[:s] padded to ordered[s - 1], rows[s:] to ordered[-1].
    split = np.arange(len(rows))
    cost = split * ordered[np.maximum(split - 1, 0)] + (len(rows) - split) * ordered[-1]
    best = int(np.argmin(cost))
    if cost[best] > _MAX_ROW_PADDING * ordered.sum():
        return None
    return [group for group in (rows[:best], rows[best:]) if len(group)]


def _whole_row_schedule(group, counts, row_start, kv_idx, mask_id, num_q_blocks, block_q, block_kv):
    """Items of whole rows (ascending query block), padded with mask id 1 to the longest row."""
    group = np.sort(group)
    width = int(counts[group].max())
    entry = row_start[group][:, None] + np.arange(width)
    valid = np.arange(width) < counts[group][:, None]
    entry = np.where(valid, entry, 0)
    kv = np.where(valid, kv_idx[entry], 0)
    ids = np.where(valid, mask_id[entry], 1)
    rows_per_step = max(1, _ROW_SCORES_PER_STEP // (width * block_q * block_kv))
    steps = -(-len(group) // rows_per_step)
    per_step = -(-len(group) // steps)
    pad = steps * per_step - len(group)
    q = np.concatenate([group, np.full(pad, num_q_blocks)]).reshape(steps, per_step)
    kv = np.concatenate([kv, np.zeros((pad, width), int)]).reshape(steps, per_step, width)
    ids = np.concatenate([ids, np.ones((pad, width), int)]).reshape(steps, per_step, width)
    return Schedule(q.astype(np.int32), kv.astype(np.int32), ids.astype(np.int32), True)


def _item_schedule(q_idx, kv_idx, mask_id, counts, num_q_blocks, block_q, block_kv):
    """Rows cut into items of `slots` key blocks, dealt round-robin onto scan steps."""
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
        item_q, item_kv, item_mask = (
            np.full(1, num_q_blocks),
            np.zeros((1, slots), int),
            np.ones((1, slots), int),
        )

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
    order = lambda a: a.reshape(per_step, steps, *a.shape[1:]).swapaxes(0, 1).astype(np.int32)
    return Schedule(order(item_q), order(item_kv), order(item_mask), False)


@functools.lru_cache(maxsize=32)
def make_plan(pattern, q_len, kv_len, block_q, block_kv, dense_rows_apart=True):
    """The scan schedules for `pattern` at these lengths and block sizes (cached).

    With `dense_rows_apart`, query blocks that see every key are left out of the schedules, for
    chunked attention (`Plan.dense_q_blocks`).
    """
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
    q_idx, kv_idx, mask_id, masks = _non_empty_blocks(pattern, q_len, kv_len, block_q, block_kv)
    computed_blocks = len(q_idx)
    dense_q_blocks = np.zeros(0, np.int64)
    if dense_rows_apart:
        dense_q_blocks = _dense_rows(
            q_len, kv_len, block_q, block_kv, q_idx, kv_idx, mask_id, masks
        )
        scheduled = ~np.isin(q_idx, dense_q_blocks)
        q_idx, kv_idx, mask_id = q_idx[scheduled], kv_idx[scheduled], mask_id[scheduled]
    rows = np.unique(q_idx)
    row_blocks = (rows, np.searchsorted(q_idx, np.append(rows, num_q_blocks)), kv_idx, mask_id)
    if not len(q_idx):
        return Plan(
            block_q,
            block_kv,
            num_q_blocks,
            num_kv_blocks,
            (),
            masks,
            computed_blocks,
            dense_q_blocks,
            row_blocks,
        )
    counts = np.bincount(q_idx, minlength=num_q_blocks)
    groups = _row_groups(counts) or []
    wide = [g for g in groups if counts[g].max() * block_q * block_kv > _ROW_SCORES_PER_STEP]
    narrow = [g for g in groups if counts[g].max() * block_q * block_kv <= _ROW_SCORES_PER_STEP]
    row_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    schedules = [
        _whole_row_schedule(
            group, counts, row_start, kv_idx, mask_id, num_q_blocks, block_q, block_kv
        )
        for group in narrow
    ]
    if not groups or wide:
        rest = np.isin(q_idx, np.concatenate(wide)) if wide else np.ones(len(q_idx), bool)
        schedules.append(
            _item_schedule(
                q_idx[rest],
                kv_idx[rest],
                mask_id[rest],
                np.bincount(q_idx[rest], minlength=num_q_blocks),
                num_q_blocks,
                block_q,
                block_kv,
            )
        )
    return Plan(
        block_q,
        block_kv,
        num_q_blocks,
        num_kv_blocks,
        tuple(schedules),
        masks,
        computed_blocks,
        dense_q_blocks,
        row_blocks,
    )


def _to_blocks(x, num_blocks, block):
    """`[batch, length, heads, d]` -> `[batch, heads, num_blocks, block, d]`, zero-padded."""
    batch, length, heads, dim = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    return x.reshape(batch, num_blocks, block, heads, dim).transpose(0, 3, 1, 2, 4)


def _from_blocks(x, length):
    """`[batch, heads, num_blocks, block, d]` -> `[batch, length, heads, d]`."""
    batch, heads, num_blocks, block, dim = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(batch, num_blocks * block, heads, dim)[:, :length]


def _item_logits(plan, needs_mask, q, k, key_bias, slopes, q_block, kv_block, mask_id):
    """Masked logits of one step's items: `[batch, heads, items, block_q, slots * block_kv]`.

    q: `[batch, heads, num_q_blocks, block_q, d]`, already scaled; k: like it for keys;
    key_bias: `[batch, num_kv_blocks, block_kv]` (0 or -inf) or None; slopes: `[heads]` or None.
    """
    items, slots = kv_block.shape
    logits = jnp.einsum("bhiqd,bhikd->bhiqk", _take(q, q_block), _take_kv(k, kv_block))
    if needs_mask:
        # Gathered straight into [items, block_q, slots, block_kv] order: no transpose.
        rows = jnp.arange(plan.block_q)[None, :, None]
        allowed = jnp.asarray(plan.block_masks)[mask_id[:, None, :], rows]
        logits = jnp.where(allowed.reshape(items, plan.block_q, -1), logits, -jnp.inf)
    if key_bias is not None:
        bias = jnp.take(key_bias, kv_block.reshape(-1), axis=1, mode="clip")
        logits = logits + bias.reshape(key_bias.shape[0], 1, items, 1, slots * plan.block_kv)
    if slopes is not None:
        q_pos = q_block[:, None] * plan.block_q + jnp.arange(plan.block_q)
        k_pos = (kv_block[:, :, None] * plan.block_kv + jnp.arange(plan.block_kv)).reshape(
            items, -1
        )
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


def _forward(plan, q, k, v, key_bias, slopes):
    """Returns output blocks `[batch, heads, num_q_blocks, block_q, dv]` and log-sum-exp."""
    batch, heads = q.shape[:2]
    rows = (batch, heads, plan.num_q_blocks, plan.block_q)
    out = jnp.zeros(rows + (v.shape[-1],), q.dtype)
    # +inf log-sum-exp makes every probability of a keyless row exactly 0 in the backward pass.
    lse = jnp.full(rows, jnp.inf, q.dtype)
    for schedule in plan.schedules:
        if schedule.whole_rows:
            out, lse = _forward_rows(plan, schedule, q, k, v, key_bias, slopes, out, lse)
        else:
            # Its rows are none of the others': zero output and +inf log-sum-exp elsewhere.
            items_out, items_lse = _forward_items(plan, schedule, q, k, v, key_bias, slopes)
            out, lse = out + items_out, jnp.minimum(lse, items_lse)
    return out, lse


def softmax_rows(logits, values):
    """Attention over whole rows: logits `[..., q, keys]` (-inf where not allowed), values
    `[..., keys, dv]` -> output `[..., q, dv]` and log-sum-exp `[..., q]`, which is +inf where a
    row sees no key (its output is 0)."""
    row_max = logits.max(-1)
    # A keyless row has max -inf; shift by 0 so exp() gives 0, not NaN.
    shift = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    probs = jnp.exp(logits - shift[..., None])
    row_sum = probs.sum(-1)
    has_key = row_sum > 0
    safe_sum = jnp.where(has_key, row_sum, 1.0)
    out = jnp.einsum("...qk,...kd->...qd", probs, values)
    return out / safe_sum[..., None], jnp.where(has_key, shift + jnp.log(safe_sum), jnp.inf)


def _forward_rows(plan, schedule, q, k, v, key_bias, slopes, out, lse):
    """Whole rows per item: one plain softmax per row, written into `out` and `lse` once."""

    def rows(q_block, kv_block, mask_id, needs_mask=schedule.needs_mask):
        logits = _item_logits(plan, needs_mask, q, k, key_bias, slopes, q_block, kv_block, mask_id)
        return softmax_rows(logits, _take_kv(v, kv_block))

    def step(_, items):
        return None, tuple(rows(*half) for half in _halves(items))

    _, halves = jax.lax.scan(step, None, _schedule_arrays(schedule))
    out = _put_halves(out, schedule, [items_out for items_out, _ in halves])
    lse = _put_halves(lse, schedule, [items_lse for _, items_lse in halves])
    return out, lse


def _forward_items(plan, schedule, q, k, v, key_bias, slopes):
    """Pieces of rows per item, combined by online softmax (as in FlashAttention)."""
    batch, heads = q.shape[:2]
    rows = (batch, heads, plan.num_q_blocks, plan.block_q)
    init = varying_like(
        (q, k, v, key_bias, slopes),
        jnp.full(rows, -jnp.inf, q.dtype),
        jnp.zeros(rows, q.dtype),
        jnp.zeros(rows + (v.shape[-1],), q.dtype),
    )

    def step(carry, items):
        row_max, row_sum, acc = carry
        q_block, kv_block, mask_id = items
        logits = _item_logits(
            plan, schedule.needs_mask, q, k, key_bias, slopes, q_block, kv_block, mask_id
        )
        old_max = _take(row_max, q_block)
        new_max = jnp.maximum(old_max, logits.max(-1))
        # A row that has seen only masked keys keeps max -inf; shift by 0 so exp() gives 0, not NaN.
        shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
        probs = jnp.exp(logits - shift[..., None])
        rescale = jnp.exp(old_max - shift)
        new_sum = _take(row_sum, q_block) * rescale + probs.sum(-1)
        new_acc = _take(acc, q_block) * rescale[..., None] + jnp.einsum(
            "bhiqk,bhikd->bhiqd", probs, _take_kv(v, kv_block)
        )
        carry = (
            _put(row_max, q_block, new_max),
            _put(row_sum, q_block, new_sum),
            _put(acc, q_block, new_acc),
        )
        return carry, None

    (row_max, row_sum, acc), _ = jax.lax.scan(step, init, _schedule_arrays(schedule))
    has_key = row_sum > 0
    out = jnp.where(has_key[..., None], acc / jnp.where(has_key, row_sum, 1.0)[..., None], 0.0)
    # +inf log-sum-exp makes every probability of a keyless row exactly 0 in the backward pass.
    lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, row_sum, 1.0)), jnp.inf)
    return out, lse


def _backward(plan, q, k, v, key_bias, slopes, out, lse, d_out):
    # An einsum, not (d_out * out).sum(-1): XLA's CPU backend ran that fused reduction 50x slower.
    delta = jnp.einsum("bhiqd,bhiqd->bhiq", d_out, out)  # [batch, heads, num_q_blocks, block_q]
    # dK^T = Q^T dS and dV^T = dO^T P are plain matmuls when Q and dO are stored transposed,
    # [.., dim, block]; XLA's CPU backend runs P^T dO (contracting the rows) far slower. dK and dV
    # are accumulated transposed too, `[batch, heads, num_kv_blocks, dim, block_kv]`, so that
    # writing an item's blocks moves whole rows of floats, and are transposed once at the end.
    q_t, d_out_t = jnp.swapaxes(q, -1, -2), jnp.swapaxes(d_out, -1, -2)
    dq, dk_t, dv_t = varying_like(
        (q, k, v, key_bias, slopes, d_out),
        jnp.zeros_like(q),
        jnp.zeros_like(jnp.swapaxes(k, -1, -2)),
        jnp.zeros_like(jnp.swapaxes(v, -1, -2)),
    )

    for schedule in plan.schedules:

        def item_grads(q_block, kv_block, mask_id, needs_mask=schedule.needs_mask):
            """dQ of the items' query blocks; dK^T, dV^T of their key blocks `[.., slots, d, block]`."""
            logits = _item_logits(
                plan, needs_mask, q, k, key_bias, slopes, q_block, kv_block, mask_id
            )
            probs = jnp.exp(logits - _take(lse, q_block)[..., None])
            dv_items = jnp.einsum("bhidq,bhiqk->bhidk", _take(d_out_t, q_block), probs)
            d_probs = jnp.einsum("bhiqd,bhikd->bhiqk", _take(d_out, q_block), _take_kv(v, kv_block))
            d_logits = probs * (d_probs - _take(delta, q_block)[..., None])
            dq_items = jnp.einsum("bhiqk,bhikd->bhiqd", d_logits, _take_kv(k, kv_block))
            dk_items = jnp.einsum("bhidq,bhiqk->bhidk", _take(q_t, q_block), d_logits)
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


@functools.lru_cache(maxsize=32)
def _kernel_attention_fn(plan):
    """Like `_attention_fn`, with the fused CPU kernel (`block_sparse_cpu`) for every row."""

    @jax.custom_vjp
    def attention(q, k, v, key_bias):
        return block_sparse_cpu.forward(q, k, v, plan.row_blocks, plan.block_masks, key_bias)[0]

    def forward(q, k, v, key_bias):
        out, lse = block_sparse_cpu.forward(q, k, v, plan.row_blocks, plan.block_masks, key_bias)
        return out, (q, k, v, key_bias, out, lse)

    def backward(residuals, d_out):
        q, k, v, key_bias, out, lse = residuals
        delta = jnp.einsum("bhiqd,bhiqd->bhiq", d_out, out)
        dq, dk, dv = block_sparse_cpu.backward(
            q, k, v, lse, delta, d_out, plan.row_blocks, plan.block_masks, key_bias
        )
        return dq, dk, dv, None if key_bias is None else jnp.zeros_like(key_bias)

    attention.defvjp(forward, backward)
    return attention


def block_sparse_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid=None,
    scale=None,
    alibi_slopes=None,
    block_q=64,
    block_kv=None,
    use_kernel=True,
):
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
      use_kernel: on CPU, compute the scheduled rows with the fused kernel (`block_sparse_cpu`)
        where it applies (float32, no ALiBi, block_kv and head dims multiples of 16); False
        keeps XLA's schedules, as on other backends.

    Returns:
      `[batch, q_len, heads, value_dim]`; zeros for queries with no allowed key.
    """
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
    kernel = use_kernel and block_sparse_cpu.supports(
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
        dense_rows_apart=alibi_slopes is None and not kernel,
    )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if plan.schedules:
        out = _scheduled_attention(plan, query, key, value, key_valid, scale, alibi_slopes, kernel)
    else:  # no scheduled blocks: every row is dense or sees no key
        out = jnp.zeros(query.shape[:3] + value.shape[-1:], query.dtype)
    if len(plan.dense_q_blocks):
        rows = _row_positions(plan.dense_q_blocks, block_q, q_len)
        dense_out = chunked_attention(query[:, rows], key, value, scale=scale, key_valid=key_valid)
        out = out.at[:, rows].set(dense_out)
    return out


def _row_positions(q_blocks, block_q, q_len):
    """The query positions of `q_blocks`: a slice when they are consecutive, else an index array."""
    positions = (q_blocks[:, None] * block_q + np.arange(block_q)).reshape(-1)
    positions = positions[positions < q_len]
    if (np.diff(positions) == 1).all():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _scheduled_attention(plan, query, key, value, key_valid, scale, alibi_slopes, kernel):
    """The plan's scheduled blocks: `[batch, q_len, heads, value_dim]`, zero in other rows."""
    block_q, block_kv = plan.block_q, plan.block_kv
    q_len, kv_len = query.shape[1], key.shape[1]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
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
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, dtype)
    if kernel:
        out = _kernel_attention_fn(plan)(q, k, v, key_bias)
        return _from_blocks(out, q_len).astype(query.dtype)
    attention = _attention_fn(plan)
    if q.shape[0] == 1:
        out = attention(q, k, v, key_bias, slopes)
    else:
        # One batch element at a time: each step's blocks stay cache-sized whatever the batch
        # (at batch 8 x 4 heads x 4,096 tokens, all at once ran 1.2x slower).
        def one(args):
            q, k, v, key_bias = (None if x is None else x[None] for x in args)
            return attention(q, k, v, key_bias, slopes)[0]

        out = jax.lax.map(one, (q, k, v, key_bias))
    return _from_blocks(out, q_len).astype(query.dtype)
